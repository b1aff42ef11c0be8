//! `connections:` in `milter.yaml`: how many MTA connections the milter
//! serves at once and how long it waits on one.

use super::Window;
use serde::Deserialize;
use std::time::Duration;

/// The MTA's connections to the milter (`connections:`). Read at start;
/// a change needs a restart.
#[derive(Clone, Debug, Eq, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// Connections served at once; further ones wait in the listen queue
    /// (Postfix gives up after `milter_connect_timeout`, 30 s).
    #[serde(default = "default_max_connections")]
    pub max: std::num::NonZeroUsize,
    /// How long a started packet may take to arrive, and how long a new
    /// connection may take to start negotiating: Postfix's own
    /// `milter_command_timeout` (30 s) on the other side.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: Window,
    /// How long the MTA may send nothing between commands. Postfix keeps the
    /// connection for the whole SMTP session, idle while the client sends
    /// the message (no upper bound but `smtpd_timeout` per read), so this
    /// must exceed the slowest message transfer; 1h is Sendmail's own data
    /// block timeout.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Window,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max: default_max_connections(),
            command_timeout: default_command_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

fn default_max_connections() -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(1000).unwrap_or(std::num::NonZeroUsize::MIN)
}
fn default_command_timeout() -> Window {
    Window(Duration::from_secs(30))
}
fn default_idle_timeout() -> Window {
    Window(Duration::from_secs(3600))
}
