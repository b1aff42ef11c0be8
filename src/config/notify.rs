//! `notify:` in `milter.yaml`: who is told by mail when something needs a
//! human, from which address, through which door of the local MTA, and
//! how often.

use super::de::deserialize_from_str;
use super::{ConfigAddress, Window};
use serde::Deserialize;
use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

/// How a notification reaches the local MTA (`notify.via`).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum NotifyVia {
    /// SMTP to `host:port`: `smtp:127.0.0.1:25`, `smtp:[::1]:25`.
    Smtp { host: String, port: u16 },
    /// The `sendmail` command (`sendmail` or `sendmail:/path`).
    Sendmail(PathBuf),
}

impl Default for NotifyVia {
    fn default() -> Self {
        NotifyVia::Smtp {
            host: "127.0.0.1".into(),
            port: 25,
        }
    }
}

impl fmt::Display for NotifyVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotifyVia::Smtp { host, port } if host.contains(':') => {
                write!(f, "smtp:[{host}]:{port}")
            }
            NotifyVia::Smtp { host, port } => write!(f, "smtp:{host}:{port}"),
            NotifyVia::Sendmail(p) => write!(f, "sendmail:{}", p.display()),
        }
    }
}

/// Where Debian (and most systems) install the `sendmail` command.
pub const SENDMAIL_COMMAND: &str = "/usr/sbin/sendmail";

impl FromStr for NotifyVia {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "sendmail" {
            return Ok(NotifyVia::Sendmail(PathBuf::from(SENDMAIL_COMMAND)));
        }
        if let Some(path) = s.strip_prefix("sendmail:") {
            return if path.starts_with('/') {
                Ok(NotifyVia::Sendmail(PathBuf::from(path)))
            } else {
                Err(format!(
                    "{s:?}: the sendmail command must be an absolute path"
                ))
            };
        }
        let rest = s.strip_prefix("smtp:").unwrap_or(s);
        let (host, port) = match rest.strip_prefix('[') {
            Some(b) => b
                .split_once("]:")
                .ok_or_else(|| format!("{s:?}: expected smtp:[ADDR]:PORT"))?,
            None => rest.rsplit_once(':').ok_or_else(|| {
                format!("{s:?}: expected smtp:HOST:PORT (e.g. smtp:127.0.0.1:25) or sendmail")
            })?,
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{s:?}: bad port {port:?}"))?;
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(format!("{s:?}: bad host {host:?}"));
        }
        Ok(NotifyVia::Smtp {
            host: host.to_owned(),
            port,
        })
    }
}
deserialize_from_str!(NotifyVia, "notify.via");

/// Mail to the administrator when something needs a human (`notify:`,
/// README "Notification by mail").
#[derive(Clone, Debug, Eq, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    pub to: Vec<ConfigAddress>,
    /// Header From and envelope sender; default `dualroute@<instance>`.
    pub from: Option<ConfigAddress>,
    #[serde(default)]
    pub via: NotifyVia,
    /// At most one message per interval; what happens in between is
    /// gathered into the next one.
    #[serde(default = "default_notify_interval")]
    pub interval: Window,
}

fn default_notify_interval() -> Window {
    Window(Duration::from_secs(600))
}
