//! The whole `milter.yaml` (docs/design.md §5): [`Config`], its top-level
//! keys and their defaults. Every value that can be wrong is parsed
//! through `FromStr` with an error an administrator can act on; the YAML
//! reader attaches file, line and column. Each section's types live in the
//! file named after it (listen.rs, domains.rs, destination.rs, accounts.rs,
//! breaker.rs, notify.rs, connections.rs, metrics.rs, dns.rs; the units in
//! units.rs).

use super::cluster::ClusterConfig;
use super::domains::DomainEntries;
use super::{
    BreakerConfig, ConnectionsConfig, DnsConfig, DomainConfig, DomainName, Gateway, MetricsConfig,
    NotifyConfig, ShrinkLimit, Socket,
};
use serde::Deserialize;
use std::{collections::BTreeMap, fmt, path::PathBuf};

#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalPartCase {
    #[default]
    Insensitive,
    Sensitive,
}

impl LocalPartCase {
    /// The comparison key of an unquoted local part: lower case unless
    /// `local_part_case: sensitive`. The account set
    /// ([`MatchRules`](crate::accounts::MatchRules)) and the check for a
    /// user given twice compare with it.
    pub fn key(self, unquoted_local: &str) -> std::borrow::Cow<'_, str> {
        use std::borrow::Cow;
        match self {
            LocalPartCase::Sensitive => Cow::Borrowed(unquoted_local),
            LocalPartCase::Insensitive
                if unquoted_local
                    .bytes()
                    .any(|b| b.is_ascii_uppercase() || b >= 0x80) =>
            {
                Cow::Owned(unquoted_local.to_lowercase())
            }
            LocalPartCase::Insensitive => Cow::Borrowed(unquoted_local),
        }
    }
}

/// `max_recipients:` default: Postfix's own `smtpd_recipient_limit`
/// (1000), so that with Postfix in front the milter's limit is never the
/// one a sender meets first. Every recipient a message has costs the
/// milter memory until end of message; the limit bounds it.
fn default_max_recipients() -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(1000).unwrap_or(std::num::NonZeroUsize::MIN)
}

/// The whole `milter.yaml`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Config {
    pub listen: Socket,
    pub instance: String,
    pub relay_suffix: DomainName,
    /// Each character is a delimiter, as in Postfix's `recipient_delimiter`.
    pub recipient_delimiter: String,
    pub local_part_case: LocalPartCase,
    pub gateways: Vec<Gateway>,
    pub state_dir: PathBuf,
    pub domains: BTreeMap<DomainName, DomainConfig>,
    pub breaker: Option<BreakerConfig>,
    pub notify: Option<NotifyConfig>,
    pub dns: DnsConfig,
    /// A reload that would remove this fraction of a domain's accounts or
    /// more is refused (README "Account sources").
    pub accounts_shrink_limit: ShrinkLimit,
    pub mta: Mta,
    pub connections: ConnectionsConfig,
    /// `shadow:` for every domain that does not set its own.
    pub shadow: bool,
    /// `metrics:`; `None`: no metrics endpoint.
    pub metrics: Option<MetricsConfig>,
    /// `cluster:`; `None`: this node alone (DESIGN.md §11).
    pub cluster: Option<ClusterConfig>,
    /// Recipients one message may have in the milter (`max_recipients:`).
    pub max_recipients: std::num::NonZeroUsize,
    /// The file this was read from: the checks that need the accounts
    /// (src/policy.rs, "Addresses that must reach a mailbox") run after
    /// reading, and still name the line.
    pub source: Source,
}

/// A configuration file's name and text, kept to locate errors found
/// after reading.
#[derive(Clone, Default, Eq, PartialEq)]
pub struct Source {
    pub file: String,
    pub text: std::sync::Arc<str>,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)
    }
}

impl Config {
    /// Whether the domain runs in shadow mode (docs/rollout.md): its own
    /// `shadow:` if it has one, else the global one.
    pub fn shadow(&self, domain: &DomainConfig) -> bool {
        domain.shadow.unwrap_or(self.shadow)
    }
}

/// The MTA dualroute runs in (`mta:`, default `postfix`). Only `check`
/// reads it: Sendmail cannot restore `@domain` on routed mail as Postfix's
/// `smtp_generic_maps` does (docs/sendmail.md), so a `hosts` destination
/// needs the other server to accept the relay domain.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mta {
    #[default]
    Postfix,
    Sendmail,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default = "default_listen")]
    pub listen: Socket,
    pub instance: Option<String>,
    #[serde(default = "default_relay_suffix")]
    pub relay_suffix: DomainName,
    #[serde(default = "default_delimiter")]
    pub recipient_delimiter: String,
    #[serde(default)]
    pub local_part_case: LocalPartCase,
    #[serde(default)]
    pub gateways: Vec<Gateway>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub domains: DomainEntries,
    pub breaker: Option<BreakerConfig>,
    pub notify: Option<NotifyConfig>,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub mta: Mta,
    #[serde(default)]
    pub accounts_shrink_limit: ShrinkLimit,
    #[serde(default)]
    pub connections: ConnectionsConfig,
    #[serde(default)]
    pub shadow: bool,
    pub metrics: Option<MetricsConfig>,
    pub cluster: Option<ClusterConfig>,
    #[serde(default = "default_max_recipients")]
    pub max_recipients: std::num::NonZeroUsize,
}

fn default_listen() -> Socket {
    Socket::Inet {
        host: "127.0.0.1".into(),
        port: 8899,
    }
}
fn default_relay_suffix() -> DomainName {
    DomainName("dualroute.invalid".into())
}
fn default_delimiter() -> String {
    "+".into()
}
/// `state_dir` when milter.yaml names none.
pub fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/dualroute")
}

/// The host name, for the default `instance`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
