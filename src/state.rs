//! Routing state that must survive restarts (docs/design.md §7), kept under
//! `state_dir` as one small file per domain and concern, so that the
//! running milter and the `enable`/`disable` commands never write the same
//! file:
//!
//! - `<domain>.disabled` — written by `dualroute disable`, removed by `enable`;
//! - `<domain>.tripped`  — written by the bounce breaker, removed by `enable`;
//! - `<domain>.verify`   — the last probe result, written by the milter;
//! - `reload-refused`    — a reload the running milter refused (kept its
//!   policy), for `dualroute status`; removed by the next good load.
//!
//! Every write goes to a temporary file that is then renamed over the old
//! one, so a reader never sees half a file and a crash never leaves one.

use serde::{Deserialize, Serialize};
use std::{
    io,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `dualroute disable DOMAIN`.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct Disabled {
    pub since: u64,
    pub reason: String,
}

/// A breaker trip.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct Tripped {
    pub since: u64,
    /// Permanent failures of routed mail counted within the window.
    pub bounces: u32,
    /// Temporary failures (deferrals) counted within the window. Records
    /// written before deferrals were counted read as 0.
    #[serde(default)]
    pub deferrals: u32,
    /// Which count reached its limit; older records were all bounces.
    #[serde(default)]
    pub cause: TripCause,
    pub window_secs: u64,
    /// The last failure's log line, for the administrator.
    pub last: String,
    /// The last failures counted (oldest first, at most a few), for the
    /// notification and `status`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent: Vec<String>,
}

/// Which of the breaker's counts tripped it (docs/design.md, "Deferrals").
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TripCause {
    /// `threshold` permanent failures.
    #[default]
    Bounces,
    /// `deferrals` temporary failures.
    Deferrals,
}

/// The breaker's counts of the running milter, for `dualroute status`:
/// rewritten by the breaker whenever a count changes (also when failures
/// leave the window), so they are as of `at`.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct BreakerCounts {
    pub at: u64,
    pub window_secs: u64,
    /// Domains with a count above zero.
    pub domains: std::collections::BTreeMap<String, FailureCounts>,
    /// What the breaker reads and whether it can (issue 25): a breaker
    /// that cannot read its source never trips, so `status` shows it as
    /// ✘ and exits 2. Absent in records of older versions.
    #[serde(default)]
    pub source: Option<BreakerSource>,
}

/// The breaker's source of delivery results and whether it is read.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct BreakerSource {
    /// `journal`, or the path of the log file followed.
    pub name: String,
    /// false: the breaker is blind.
    pub readable: bool,
    /// Why it cannot read, when it cannot (empty otherwise).
    #[serde(default)]
    pub error: String,
    /// Since when (Unix seconds) it is in this state.
    pub since: u64,
}

/// Failures of one domain's routed mail within the window.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct FailureCounts {
    pub bounces: u32,
    pub deferrals: u32,
}

/// The last verification probe.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub at: u64,
    pub passed: bool,
    pub detail: String,
    /// What was probed (`holds::probe_target`): a pass counts only for the
    /// destination and address configured when it was recorded. Records
    /// from before this field read as empty, i.e. "probe again".
    #[serde(default)]
    pub target: String,
}

/// The running milter refused a reload of a domain's accounts
/// (`accounts_shrink_limit`): until the administrator confirms the new
/// list (`dualroute confirm-accounts DOMAIN`) or restores the source, the
/// addresses the two lists disagree on are tempfailed (docs/design.md
/// "Shrink guard"). Written and removed by the running milter.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct Dispute {
    pub since: u64,
    /// Accounts in the running list and in the refused one.
    pub running: usize,
    pub refused: usize,
    /// How many addresses the two lists disagree on, and a few of them.
    pub disputed: usize,
    pub sample: Vec<String>,
}

/// The name under which the dispute and the confirmation of a domain's
/// destination address list (`reject_unknown.accounts`) are kept: beside
/// the domain's own (`DOMAIN.disputed`), as `DOMAIN.destination-list.
/// disputed` (a managed domain would have to be named
/// `….destination-list` to collide).
pub fn destination_list(domain: &str) -> String {
    format!("{domain}.destination-list")
}

/// `dualroute confirm-accounts DOMAIN`: the administrator accepts the
/// refused list of `accounts` accounts; the running milter's next reload
/// lets the domain shrink to it, then removes this.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct ShrinkConfirmed {
    pub since: u64,
    pub accounts: usize,
}

/// Everything persisted about one domain.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct DomainState {
    pub disabled: Option<Disabled>,
    pub tripped: Option<Tripped>,
    pub verification: Option<Verification>,
}

/// Year, month, day, hour, minute, second (UTC) of a Unix time, by Howard
/// Hinnant's civil-from-days algorithm.
pub(crate) fn civil(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let rem = secs % 86400;
    let z = (secs / 86400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A Unix time as UTC `YYYY-MM-DD HH:MM:SS UTC`.
pub fn when(secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(secs);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02} UTC")
}

/// A Unix time as an RFC 5322 §3.3 date: `Thu, 26 Nov 2026 23:16:27 +0000`.
pub fn rfc5322_date(secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(secs);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let wd = DAYS[((secs / 86400) % 7) as usize];
    let mon = MONTHS[(m - 1).clamp(0, 11) as usize];
    format!("{wd}, {d} {mon} {y:04} {hh:02}:{mm:02}:{ss:02} +0000")
}

/// A reload the running milter refused: it still runs the policy it had.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct ReloadRefused {
    pub since: u64,
    pub reason: String,
}

/// No domain file has this name: those are always `DOMAIN.KIND`.
const RELOAD_REFUSED: &str = "reload-refused";
/// Not a domain file either.
const BREAKER_COUNTS: &str = "breaker-counts";

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
        }
    }

    fn file(&self, domain: &str, kind: &str) -> PathBuf {
        self.dir.join(format!("{domain}.{kind}"))
    }

    fn read<T: for<'de> Deserialize<'de>>(
        &self,
        domain: &str,
        kind: &str,
    ) -> io::Result<Option<T>> {
        self.read_path(&self.file(domain, kind))
    }

    pub(crate) fn read_path<T: for<'de> Deserialize<'de>>(
        &self,
        path: &Path,
    ) -> io::Result<Option<T>> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_yaml::from_str(&text).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }

    fn write<T: Serialize>(&self, domain: &str, kind: &str, value: &T) -> io::Result<()> {
        self.write_path(&self.file(domain, kind), value)
    }

    pub(crate) fn write_path<T: Serialize>(&self, path: &Path, value: &T) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let text = serde_yaml::to_string(value)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = self.dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        // The rename lives in the directory: without syncing it a crash can
        // lose a breaker trip or a `disable` that was already reported.
        std::fs::File::open(&self.dir)?.sync_all()
    }

    fn remove(&self, domain: &str, kind: &str) -> io::Result<bool> {
        self.remove_path(&self.file(domain, kind))
    }

    fn remove_path(&self, path: &Path) -> io::Result<bool> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn load(&self, domain: &str) -> io::Result<DomainState> {
        Ok(DomainState {
            disabled: self.read(domain, "disabled")?,
            tripped: self.read(domain, "tripped")?,
            verification: self.read(domain, "verify")?,
        })
    }

    /// The record `kind` (`disabled`, `tripped`, `verify`) of `domain` as
    /// canonical YAML, for the fleet (src/cluster/): what is shared is
    /// what this process could read, written as this version writes it.
    pub(crate) fn register(&self, domain: &str, kind: &str) -> io::Result<Option<String>> {
        fn canonical<T: Serialize + for<'de> Deserialize<'de>>(
            dir: &StateDir,
            domain: &str,
            kind: &str,
        ) -> io::Result<Option<String>> {
            dir.read::<T>(domain, kind)?
                .map(|v| {
                    serde_yaml::to_string(&v)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
                })
                .transpose()
        }
        match kind {
            "disabled" => canonical::<Disabled>(self, domain, kind),
            "tripped" => canonical::<Tripped>(self, domain, kind),
            "verify" => canonical::<Verification>(self, domain, kind),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no shared record {kind}"),
            )),
        }
    }

    /// Writes (or, with `None`, removes) the record `kind` of `domain`
    /// from the fleet's canonical YAML; a text that is not such a record
    /// is refused, so nothing read from Redis lands in state_dir unread.
    pub(crate) fn set_register(
        &self,
        domain: &str,
        kind: &str,
        text: Option<&str>,
    ) -> io::Result<()> {
        let Some(text) = text else {
            return self.remove(domain, kind).map(|_| ());
        };
        let bad = |e: serde_yaml::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        match kind {
            "disabled" => self.write(
                domain,
                kind,
                &serde_yaml::from_str::<Disabled>(text).map_err(bad)?,
            ),
            "tripped" => self.write(
                domain,
                kind,
                &serde_yaml::from_str::<Tripped>(text).map_err(bad)?,
            ),
            "verify" => self.write(
                domain,
                kind,
                &serde_yaml::from_str::<Verification>(text).map_err(bad)?,
            ),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no shared record {kind}"),
            )),
        }
    }

    pub fn disable(&self, domain: &str, reason: &str) -> io::Result<()> {
        self.write(
            domain,
            "disabled",
            &Disabled {
                since: now(),
                reason: reason.to_owned(),
            },
        )
    }

    /// Clears an admin disable and a breaker trip. Returns what was cleared.
    pub fn enable(&self, domain: &str) -> io::Result<(bool, bool)> {
        Ok((
            self.remove(domain, "disabled")?,
            self.remove(domain, "tripped")?,
        ))
    }

    pub fn trip(&self, domain: &str, trip: &Tripped) -> io::Result<()> {
        self.write(domain, "tripped", trip)
    }

    pub fn record_verification(&self, domain: &str, v: &Verification) -> io::Result<()> {
        self.write(domain, "verify", v)
    }

    pub fn record_dispute(&self, domain: &str, d: &Dispute) -> io::Result<()> {
        self.write(domain, "disputed", d)
    }

    pub fn dispute(&self, domain: &str) -> io::Result<Option<Dispute>> {
        self.read(domain, "disputed")
    }

    pub fn clear_dispute(&self, domain: &str) -> io::Result<bool> {
        self.remove(domain, "disputed")
    }

    pub fn confirm_shrink(&self, domain: &str, c: &ShrinkConfirmed) -> io::Result<()> {
        self.write(domain, "shrink-confirmed", c)
    }

    pub fn shrink_confirmed(&self, domain: &str) -> io::Result<Option<ShrinkConfirmed>> {
        self.read(domain, "shrink-confirmed")
    }

    pub fn clear_shrink_confirmed(&self, domain: &str) -> io::Result<bool> {
        self.remove(domain, "shrink-confirmed")
    }

    /// Records that the running milter refused a reload.
    pub fn refuse_reload(&self, reason: &str) -> io::Result<()> {
        let r = ReloadRefused {
            since: now(),
            reason: reason.to_owned(),
        };
        self.write_path(&self.dir.join(RELOAD_REFUSED), &r)
    }

    /// The last refused reload, unless a good load came after it.
    pub fn reload_refused(&self) -> io::Result<Option<ReloadRefused>> {
        self.read_path(&self.dir.join(RELOAD_REFUSED))
    }

    /// A load succeeded: an earlier refusal no longer describes the milter.
    pub fn clear_reload_refused(&self) -> io::Result<bool> {
        self.remove_path(&self.dir.join(RELOAD_REFUSED))
    }

    /// Records the breaker's current counts (the running milter).
    pub fn write_breaker_counts(&self, counts: &BreakerCounts) -> io::Result<()> {
        self.write_path(&self.dir.join(BREAKER_COUNTS), counts)
    }

    /// The breaker's counts as last recorded, if a breaker ever ran here.
    pub fn breaker_counts(&self) -> io::Result<Option<BreakerCounts>> {
        self.read_path(&self.dir.join(BREAKER_COUNTS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_enable() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(&dir.path().join("state"));
        assert_eq!(s.load("example.com").unwrap(), DomainState::default());
        s.disable("example.com", "maintenance").unwrap();
        let t = Tripped {
            since: 1,
            bounces: 20,
            deferrals: 0,
            cause: TripCause::Bounces,
            window_secs: 3600,
            last: "x".into(),
            recent: vec!["x".into()],
        };
        s.trip("example.com", &t).unwrap();
        let st = s.load("example.com").unwrap();
        assert_eq!(
            st.disabled.map(|d| d.reason).as_deref(),
            Some("maintenance")
        );
        assert_eq!(st.tripped, Some(t));
        assert_eq!(s.enable("example.com").unwrap(), (true, true));
        assert_eq!(s.load("example.com").unwrap(), DomainState::default());
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(&s.dir).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("example.com.tripped"), "{{{{").unwrap();
        let e = StateDir::new(dir.path()).load("example.com").unwrap_err();
        assert!(e.to_string().contains("example.com.tripped"), "{e}");
    }

    #[test]
    fn dates() {
        assert_eq!(when(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(when(1_795_000_000), "2026-11-18 11:06:40 UTC");
        assert_eq!(
            rfc5322_date(1_795_000_000),
            "Wed, 18 Nov 2026 11:06:40 +0000"
        );
    }
}
