//! The bounce breaker (docs/design.md §7).
//!
//! A milter never learns what happened to the mail it routed: the MTA
//! delivers it later, from its queue, and only writes the result to its
//! log. So the breaker follows that log (`breaker.maillog`), picks out the
//! permanent failures ([`parse_line`]), attributes routing addresses to the
//! managed domain that produced them ([`Attribution`]), and counts them per
//! domain over a sliding window ([`Window`]). At `threshold` failures within
//! `window` the domain is tripped: the trip is written under `state_dir`
//! (so a restart keeps it), the running milter's holds are refreshed at
//! once (the domain now behaves as `enabled: false`), and an error says why
//! and how to switch routing back on (`dualroute enable DOMAIN`).
//!
//! Why it exists: a destination that starts refusing routed mail (the
//! mailboxes were never created there, the account expired, a typo in
//! `destination`) turns every routed message into a bounce to an outside
//! sender. Zoho's "bounce notification" has the same purpose; here routing
//! stops instead of merely telling someone.
//!
//! What the follower does with the log file ([`Follower`]):
//! - it starts at the end: what was logged before the milter started is
//!   history, and counting it again after every restart would trip on old
//!   news;
//! - rotation by rename (logrotate's default, newsyslog): the path names a
//!   new file (a different inode). The old file is read to its end, then
//!   the new one from its start; the old one is still read for a few
//!   seconds, since the MTA or syslog daemon writes to it until it reopens
//!   its log;
//! - rotation by `copytruncate`: the file shrinks below our offset; it is
//!   read again from its start. (Lines written between the copy and the
//!   truncation are lost to every follower, `tail -F` included.)
//! - a missing file (not yet created, or rotated away and not yet
//!   replaced) is waited for and logged once; when it appears it is read
//!   from its start.
//!
//! Failures are counted when they are read, not by the time stamp in the
//! line: syslog time stamp formats differ (RFC 3164 without a year, RFC
//! 5424, journald exports) and the follower reads within a second anyway.
//! Failures of a domain that is already tripped or disabled are not counted:
//! they are late bounces of mail routed before, and must not trip the domain
//! again as soon as an administrator enables it.

use crate::config::BreakerConfig;
use crate::policy::{Policy, SharedPolicy};
use crate::state::{self, StateDir, Tripped};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the log is looked at.
pub const POLL: Duration = Duration::from_millis(500);

/// How long a rotated-away file is still read: until the MTA (Postfix's
/// postlogd after `postfix logrotate`, or rsyslog after its HUP) reopens
/// the new one, it keeps writing to the old.
const DRAIN: Duration = Duration::from_secs(10);

/// Read at most this much per poll, so that a large file that appears at
/// once is worked through a piece at a time.
const MAX_READ: u64 = 4 << 20;

/// A "line" longer than this without a newline is not a log line (syslog
/// lines are at most a few KiB): it is dropped rather than buffered.
const MAX_LINE: usize = 64 << 10;

// ---------------------------------------------------------------------
// Log lines.
// ---------------------------------------------------------------------

/// A permanent delivery failure as the MTA logged it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Failure {
    /// The envelope recipients the line reports on, as logged, without
    /// angle brackets. Postfix logs one per line; Sendmail may log several
    /// (`to=<a@x>,<b@x>`) when it delivered them in one transaction.
    pub recipients: Vec<String>,
    /// The enhanced status code (RFC 3463), e.g. `5.1.1`.
    pub dsn: String,
    /// The whole line, for the administrator.
    pub line: String,
}

/// Parses one delivery line of Postfix or Sendmail and returns it when it
/// reports a permanent failure:
///
/// - Postfix: `postfix/smtp[123]: QID: to=<a@b>, orig_to=<…>, relay=…,
///   delay=…, delays=…, dsn=5.1.1, status=bounced (…)`. Only
///   `status=bounced` with a `5.x.x` dsn: `deferred` is a temporary
///   failure, and with `soft_bounce = yes` Postfix logs 5xx replies as
///   deferred with a 4.x.x dsn (they are retried, nothing bounces).
/// - Sendmail: `sendmail[123]: QID: to=<a@b>, delay=…, xdelay=…,
///   mailer=esmtp, pri=…, relay=…, dsn=5.1.1, stat=User unknown`. A `5.x.x`
///   dsn with a `stat=` other than `Sent` or `Deferred`.
///
/// Both put the queue id and `: to=` first, which also keeps out the
/// `NOQUEUE: reject: … from=<…> to=<…>` lines of refused RCPTs (a refusal
/// at RCPT time reaches the client, not a bounce).
pub fn parse_line(line: &str) -> Option<Failure> {
    let line = line.trim_end_matches(['\r', '\n']);
    let at = line.find(": to=")?;
    let rest = &line[at + ": to=".len()..];
    // Fields are separated by ", "; within `to=` Sendmail separates
    // recipients by "," alone.
    let mut fields = rest.split(", ");
    let to = fields.next()?;
    let mut dsn = None;
    let mut permanent = None;
    for field in fields {
        if let Some(v) = field.strip_prefix("dsn=") {
            dsn.get_or_insert(v);
        } else if let Some(v) = field.strip_prefix("status=") {
            // Postfix: the last field; its text may contain anything.
            permanent = Some(v.split(' ').next() == Some("bounced"));
            break;
        } else if let Some(v) = field.strip_prefix("stat=") {
            permanent = Some(!(v.starts_with("Sent") || v.starts_with("Deferred")));
            break;
        }
    }
    let dsn = dsn?;
    if permanent != Some(true) || !is_permanent_dsn(dsn) {
        return None;
    }
    let recipients: Vec<String> = to
        .split(',')
        .map(|r| {
            r.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
        .filter(|r| !r.is_empty())
        .collect();
    if recipients.is_empty() {
        return None;
    }
    Some(Failure {
        recipients,
        dsn: dsn.to_owned(),
        line: line.to_owned(),
    })
}

/// `5.X.Y` (RFC 3463 §2: class 5 is a permanent failure).
fn is_permanent_dsn(dsn: &str) -> bool {
    let mut parts = dsn.split('.');
    parts.next() == Some("5")
        && parts
            .next()
            .is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        && parts
            .next()
            .is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        && parts.next().is_none()
}

// ---------------------------------------------------------------------
// Which domain a routing address belongs to.
// ---------------------------------------------------------------------

/// Maps routing addresses back to the managed domain that produced them
/// (docs/design.md §4):
/// - `local@<domain>.<relay_suffix>` → domain;
/// - `local@D` where D is the `change_envelope` destination of one or more
///   domains → those domains (several domains may share a destination, and
///   the address alone cannot tell them apart);
/// - a per-user `copy_to`/`redirect_to` target → the user's domain (and
///   only that: other mail to the target's domain is not ours).
///
/// Any other address is not routed mail and is ignored.
#[derive(Clone, Debug, Default)]
pub struct Attribution {
    relay_domains: HashMap<String, String>,
    envelope_domains: HashMap<String, Vec<String>>,
    targets: HashMap<String, Vec<String>>,
}

impl Attribution {
    pub fn new(policy: &Policy) -> Attribution {
        let suffix = &policy.config.relay_suffix.0;
        let mut a = Attribution::default();
        let mut names: Vec<&String> = policy.domains.keys().collect();
        names.sort();
        for name in names {
            let d = &policy.domains[name];
            match d.relay_domain(suffix) {
                Some(relay) => {
                    a.relay_domains.insert(relay, name.clone());
                }
                None => {
                    if let crate::config::Destination::Domain { domain, .. } = &d.config.destination
                    {
                        a.envelope_domains
                            .entry(domain.0.clone())
                            .or_default()
                            .push(name.clone());
                    }
                }
            }
            for (_, rule) in &d.config.users {
                let targets: Vec<&crate::address::Address> = match rule {
                    crate::config::UserRule::CopyTo(to) => to.iter().collect(),
                    crate::config::UserRule::RedirectTo(to) => vec![to],
                    crate::config::UserRule::Keep => Vec::new(),
                };
                for t in targets {
                    let owners = a
                        .targets
                        .entry(target_key(&t.local, &t.domain))
                        .or_default();
                    if !owners.contains(name) {
                        owners.push(name.clone());
                    }
                }
            }
        }
        a
    }

    /// The managed domains whose routing produced `recipient` (as logged);
    /// empty for mail that was not routed by us.
    pub fn domains(&self, recipient: &str) -> &[String] {
        let Some((local, domain)) = recipient.rsplit_once('@') else {
            return &[];
        };
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if let Some(owners) = self.targets.get(&target_key(local, &domain)) {
            return owners;
        }
        if let Some(owner) = self.relay_domains.get(&domain) {
            return std::slice::from_ref(owner);
        }
        self.envelope_domains
            .get(&domain)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// Local parts compared without case: the log shows the address as the
/// milter added it, but a configuration may spell a target's local part
/// in another case than an administrator expects to matter.
fn target_key(local: &str, domain: &str) -> String {
    format!("{}@{domain}", local.to_lowercase())
}

// ---------------------------------------------------------------------
// Counting.
// ---------------------------------------------------------------------

/// The failures of one domain within the sliding window.
#[derive(Clone, Debug)]
pub struct Window {
    threshold: u32,
    span: Duration,
    hits: VecDeque<Instant>,
}

impl Window {
    pub fn new(threshold: u32, span: Duration) -> Window {
        Window {
            threshold: threshold.max(1),
            span,
            hits: VecDeque::new(),
        }
    }

    /// New limits after a reload; the failures counted so far stay.
    pub fn set_limits(&mut self, threshold: u32, span: Duration) {
        self.threshold = threshold.max(1);
        self.span = span;
    }

    /// Counts a failure at `at`. Returns the number of failures within the
    /// window when it reaches the threshold; the count is kept until
    /// [`Window::reset`] (after the trip has been recorded), so that a trip
    /// that could not be recorded is tried again at the next failure.
    pub fn record(&mut self, at: Instant) -> Option<u32> {
        self.hits.push_back(at);
        let count = self.count(at);
        (count >= self.threshold).then_some(count)
    }

    /// The failures within the window ending at `at`; older ones are
    /// forgotten.
    pub fn count(&mut self, at: Instant) -> u32 {
        while let Some(&first) = self.hits.front() {
            if at.saturating_duration_since(first) >= self.span {
                self.hits.pop_front();
            } else {
                break;
            }
        }
        u32::try_from(self.hits.len()).unwrap_or(u32::MAX)
    }

    pub fn reset(&mut self) {
        self.hits.clear();
    }
}

/// `1h`, `30m`, `90s`: a window as the configuration writes it.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        _ if s % 86400 == 0 => format!("{}d", s / 86400),
        _ if s % 3600 == 0 => format!("{}h", s / 3600),
        _ if s % 60 == 0 => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

// ---------------------------------------------------------------------
// Following the log file.
// ---------------------------------------------------------------------

/// One open log file and how far it has been read.
#[derive(Debug)]
struct Source {
    file: File,
    dev: u64,
    ino: u64,
    offset: u64,
    partial: Vec<u8>,
}

impl Source {
    fn open(path: &Path, at_end: bool) -> io::Result<Source> {
        let file = File::open(path)?;
        // fstat, not stat: the identity of what we opened, whatever the
        // path names a moment later.
        let meta = file.metadata()?;
        let offset = if at_end { meta.len() } else { 0 };
        Ok(Source {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            offset,
            partial: Vec::new(),
        })
    }

    fn is(&self, meta: &std::fs::Metadata) -> bool {
        self.dev == meta.dev() && self.ino == meta.ino()
    }

    /// Appends the lines completed since the last read to `lines`.
    fn read_new(&mut self, path: &Path, lines: &mut Vec<String>) -> io::Result<()> {
        let len = self.file.metadata()?.len();
        if len < self.offset {
            tracing::info!(
                "bounce breaker: {} was truncated (copytruncate rotation); reading it from the start",
                path.display()
            );
            self.offset = 0;
            self.partial.clear();
        }
        if len == self.offset {
            return Ok(());
        }
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        let n = (&mut self.file).take(MAX_READ).read_to_end(&mut buf)?;
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf);
        let complete = match self.partial.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => {
                if self.partial.len() > MAX_LINE {
                    self.partial.clear();
                }
                return Ok(());
            }
        };
        let rest = self.partial.split_off(complete);
        for line in self.partial.split(|&b| b == b'\n') {
            if !line.is_empty() {
                lines.push(
                    String::from_utf8_lossy(line)
                        .trim_end_matches('\r')
                        .to_owned(),
                );
            }
        }
        self.partial = rest;
        Ok(())
    }
}

/// Follows a log file by path, as `tail -F` does: across rotation by
/// rename and by truncation, and through the file's absence. See the
/// module documentation.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    current: Option<Source>,
    /// The file before the last rotation, still read for [`DRAIN`].
    previous: Option<(Source, Instant)>,
    /// The last problem logged, so that each is logged once.
    problem: Option<String>,
}

impl Follower {
    /// Starts following `path` from its current end. A missing file is
    /// waited for (and, once it appears, read from its start).
    pub fn at_end(path: &Path) -> Follower {
        let mut f = Follower {
            path: path.to_owned(),
            current: None,
            previous: None,
            problem: None,
        };
        match Source::open(path, true) {
            Ok(s) => f.current = Some(s),
            Err(e) => f.report(&e),
        }
        f
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lines completed since the last call (or since the start), in
    /// the order they were written.
    pub fn poll(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some((old, since)) = &mut self.previous {
            // Errors reading a rotated-away file end its grace period.
            if old.read_new(&self.path, &mut lines).is_err() || since.elapsed() > DRAIN {
                self.previous = None;
            }
        }
        if let Some(cur) = &mut self.current {
            if let Err(e) = cur.read_new(&self.path, &mut lines) {
                tracing::warn!(
                    "bounce breaker: cannot read {}: {e}; reopening it",
                    self.path.display()
                );
                self.current = None;
            }
        }
        match std::fs::metadata(&self.path) {
            Ok(meta) if self.current.as_ref().is_some_and(|c| c.is(&meta)) => {}
            Ok(_) => match Source::open(&self.path, false) {
                Ok(mut new) => {
                    if self.current.is_some() {
                        tracing::info!(
                            "bounce breaker: {} was rotated; following the new file",
                            self.path.display()
                        );
                    } else {
                        tracing::info!("bounce breaker: following {}", self.path.display());
                    }
                    self.problem = None;
                    if let Err(e) = new.read_new(&self.path, &mut lines) {
                        self.report(&e);
                    }
                    if let Some(old) = self.current.replace(new) {
                        self.previous = Some((old, Instant::now()));
                    }
                }
                Err(e) => self.report(&e),
            },
            // Rotated away and not yet replaced: keep reading the old
            // file until the new one appears.
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.current.is_some() => {}
            Err(e) => self.report(&e),
        }
        lines
    }

    fn report(&mut self, e: &io::Error) {
        let problem = if e.kind() == io::ErrorKind::NotFound {
            format!(
                "{} does not exist (yet); waiting for it",
                self.path.display()
            )
        } else {
            format!("cannot read {}: {e}; retrying", self.path.display())
        };
        if self.problem.as_ref() != Some(&problem) {
            tracing::warn!("bounce breaker: {problem}");
            self.problem = Some(problem);
        }
    }
}

// ---------------------------------------------------------------------
// The task.
// ---------------------------------------------------------------------

/// The breaker's state between polls.
struct Breaker {
    config: BreakerConfig,
    follower: Follower,
    /// The attribution and the policy it was built from.
    attribution: Option<(Arc<Policy>, Attribution)>,
    windows: HashMap<String, Window>,
}

impl Breaker {
    fn new(config: BreakerConfig) -> Breaker {
        tracing::info!(
            "bounce breaker: following {} (trips at {} permanent failures of routed mail within {})",
            config.maillog.display(),
            config.threshold,
            human(config.window.0)
        );
        let follower = Follower::at_end(&config.maillog);
        Breaker {
            config,
            follower,
            attribution: None,
            windows: HashMap::new(),
        }
    }

    /// Takes the configuration of a reload: a new `maillog` is followed
    /// from its end; new limits apply to the counts so far.
    fn reconfigure(&mut self, config: &BreakerConfig) {
        if config.maillog != self.config.maillog {
            *self = Breaker::new(config.clone());
            return;
        }
        if *config != self.config {
            for w in self.windows.values_mut() {
                w.set_limits(config.threshold, config.window.0);
            }
            self.config = config.clone();
        }
    }

    fn attribution(&mut self, policy: &Arc<Policy>) -> &Attribution {
        if !matches!(&self.attribution, Some((p, _)) if Arc::ptr_eq(p, policy)) {
            self.attribution = None;
        }
        &self
            .attribution
            .get_or_insert_with(|| (policy.clone(), Attribution::new(policy)))
            .1
    }

    fn tick(&mut self, policy: &Arc<Policy>, shared: &SharedPolicy) {
        let lines = self.follower.poll();
        let failures: Vec<Failure> = lines.iter().filter_map(|l| parse_line(l)).collect();
        if failures.is_empty() {
            return;
        }
        let dir = StateDir::new(&policy.config.state_dir);
        let now = Instant::now();
        for f in &failures {
            let mut owners: Vec<String> = Vec::new();
            for rcpt in &f.recipients {
                owners.extend(self.attribution(policy).domains(rcpt).iter().cloned());
            }
            for domain in owners {
                self.count(policy, shared, &dir, &domain, f, now);
            }
        }
    }

    fn count(
        &mut self,
        policy: &Arc<Policy>,
        shared: &SharedPolicy,
        dir: &StateDir,
        domain: &str,
        f: &Failure,
        now: Instant,
    ) {
        // Routing is already off (or the state is unreadable, which holds
        // the domain too): a late bounce of mail routed before.
        match dir.load(domain) {
            Ok(st) if st.tripped.is_none() && st.disabled.is_none() => {}
            _ => {
                self.windows.remove(domain);
                return;
            }
        }
        let (threshold, span) = (self.config.threshold, self.config.window.0);
        let window = self
            .windows
            .entry(domain.to_owned())
            .or_insert_with(|| Window::new(threshold, span));
        let Some(count) = window.record(now) else {
            tracing::warn!(
                "{domain}: routed mail failed permanently ({} of {threshold} within {} before routing is switched off): {}",
                window.count(now),
                human(span),
                f.line
            );
            return;
        };
        let trip = Tripped {
            since: state::now(),
            bounces: count,
            window_secs: span.as_secs(),
            last: f.line.clone(),
        };
        if let Err(e) = dir.trip(domain, &trip) {
            tracing::error!(
                "{domain}: {count} permanent failures of routed mail within {}, but the bounce breaker cannot record the trip in {}: {e}; routing stays ON until it can",
                human(span),
                dir.dir.display()
            );
            return;
        }
        window.reset();
        // Take effect now, not at the state follower's next look: for
        // messages in flight (they keep the policy they started with) and,
        // after a reload during this poll, for new ones.
        let latest = crate::current(shared);
        let mut errors = policy.refresh_state();
        if !Arc::ptr_eq(&latest, policy) {
            errors.extend(latest.refresh_state());
        }
        for e in errors {
            tracing::error!("{e}; routing for that domain stays off");
        }
        tracing::error!(
            "{domain}: bounce breaker tripped: {count} permanent failures of routed mail within {} (threshold {threshold}); routing for {domain} is switched off (mailboxes here still get their mail; addresses that would be routed are refused with 451 4.4.4 until routing is back on) and stays off across restarts ({}); last failure: {}; check the destination, then run `dualroute enable {domain}` to switch routing back on",
            human(span),
            dir.dir.join(format!("{domain}.tripped")).display(),
            f.line
        );
    }
}

/// Runs the breaker for the life of the milter: polls `breaker.maillog`
/// every [`POLL`] and trips domains as described in the module
/// documentation. Follows reloads: a `breaker:` section added, changed or
/// removed by SIGHUP takes effect at the next poll. Does nothing while the
/// configuration has no `breaker:`.
pub async fn run(shared: SharedPolicy) {
    let mut breaker: Option<Breaker> = None;
    loop {
        let policy = crate::current(&shared);
        let shared = shared.clone();
        // File reads, state files and the error log are blocking I/O; each
        // poll is short, so shutdown never waits for it.
        let task = tokio::task::spawn_blocking(move || {
            match (&policy.config.breaker, &mut breaker) {
                (None, b) => {
                    if b.take().is_some() {
                        tracing::info!(
                            "bounce breaker: no `breaker:` in the configuration any more; stopped"
                        );
                    }
                }
                (Some(c), Some(b)) => b.reconfigure(c),
                (Some(c), b @ None) => *b = Some(Breaker::new(c.clone())),
            }
            if let Some(b) = &mut breaker {
                b.tick(&policy, &shared);
            }
            breaker
        });
        breaker = match task.await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("bounce breaker failed: {e}; routed bounces are no longer counted until dualroute restarts");
                return;
            }
        };
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_dsn_codes() {
        for ok in ["5.1.1", "5.0.0", "5.7.26", "5.100.999"] {
            assert!(is_permanent_dsn(ok), "{ok}");
        }
        for not in [
            "4.1.1", "2.0.0", "5.1", "5.1.1.1", "5..1", "5.1.x", "5.1000.1", "55.1.1", "",
        ] {
            assert!(!is_permanent_dsn(not), "{not}");
        }
    }

    #[test]
    fn windows_as_written_in_the_configuration() {
        assert_eq!(human(Duration::from_secs(3600)), "1h");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_secs(1800)), "30m");
        assert_eq!(human(Duration::from_secs(2 * 86400)), "2d");
    }
}
