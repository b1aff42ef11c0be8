//! `breaker:` in `milter.yaml`: when the bounce breaker switches routing
//! off for a domain, and where it reads the MTA's delivery results.

use super::de::{checked_map, deserialize_from_str};
use super::Window;
use serde::{Deserialize, Deserializer};
use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

/// The bounce breaker (docs/design.md §7).
#[derive(Clone, Debug, Eq, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    maillog: Maillog,
    #[serde(default)]
    journal_directory: Option<PathBuf>,
    #[serde(default = "default_threshold")]
    threshold: u32,
    #[serde(default = "default_window")]
    window: Window,
    #[serde(default)]
    deferrals: Option<u32>,
}

/// The bounce breaker (docs/design.md §7).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct BreakerConfig {
    pub maillog: Maillog,
    /// With `maillog: journal`: the journal directory to read
    /// (`journalctl -D`) instead of the system journal, for a host whose
    /// journal lives elsewhere (and for the tests, which write journal
    /// files of their own).
    pub journal_directory: Option<PathBuf>,
    pub threshold: u32,
    pub window: Window,
    /// Temporary failures (deferred deliveries) of routed mail within
    /// `window` at which routing for the domain is switched off, as Zoho
    /// stops forwarding after more than 10 (README "Deferrals"). Absent:
    /// deferrals are counted and shown, never a trip.
    pub deferrals: Option<u32>,
}

impl BreakerConfig {
    /// The paths in the section (the log file, the journal directory),
    /// which are relative to milter.yaml when written so.
    pub fn paths_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        let file = match &mut self.maillog {
            Maillog::File(p) => Some(p),
            Maillog::Journal => None,
        };
        file.into_iter().chain(self.journal_directory.as_mut())
    }
}

impl<'de> Deserialize<'de> for BreakerConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |r: RawBreaker| {
            if r.journal_directory.is_some() && r.maillog != Maillog::Journal {
                return Err(
                    "journal_directory is read with `maillog: journal` only: remove it, or write `maillog: journal`"
                        .to_owned(),
                );
            }
            Ok(BreakerConfig {
                maillog: r.maillog,
                journal_directory: r.journal_directory,
                threshold: r.threshold,
                window: r.window,
                deferrals: r.deferrals,
            })
        })
    }
}

/// Where the MTA's delivery results are read (docs/design.md §7, "The
/// breaker's source").
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Maillog {
    /// The systemd journal (`maillog: journal`): Debian 12 without rsyslog
    /// logs mail there only.
    Journal,
    /// A log file, followed as `tail -F` does.
    File(PathBuf),
}

impl Maillog {
    /// What `status`, the log and the metric call it.
    pub fn name(&self) -> String {
        match self {
            Maillog::Journal => "journal".to_owned(),
            Maillog::File(p) => p.display().to_string(),
        }
    }
}

impl fmt::Display for Maillog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for Maillog {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "journal" => Ok(Maillog::Journal),
            "" => Err(
                "empty: write `journal` (the systemd journal) or the path of the file the MTA logs to, e.g. /var/log/mail.log"
                    .to_owned(),
            ),
            // A file called "journal" in the configuration's directory is
            // still reachable as ./journal.
            p => Ok(Maillog::File(PathBuf::from(p))),
        }
    }
}
deserialize_from_str!(Maillog, "`journal` or the path of the mail log");

fn default_threshold() -> u32 {
    20
}
fn default_window() -> Window {
    Window(Duration::from_secs(3600))
}
