//! `domains:` in `milter.yaml`: each managed domain's settings (`mode`,
//! `enabled`, `bounce`, `verify`, `require_gateway`, `shadow`) and its
//! `users:` rules. Its `destination:` and `accounts:` have their own files.

use super::de::{checked_map, entries};
use super::destination::DestinationEntry;
use super::{AccountSource, ConfigAddress, Destination, DomainName, MessageSize, Transport};
use crate::address::Address;
use serde::{Deserialize, Deserializer};
use std::fmt;

#[derive(Clone, Copy, Debug, Eq, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Split,
    Dual,
    Route,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Split => "split",
            Mode::Dual => "dual",
            Mode::Route => "route",
        })
    }
}

/// A per-user rule.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum UserRule {
    CopyTo(Vec<Address>),
    RedirectTo(Address),
    Keep,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUserRule {
    copy_to: Option<OneOrMany<ConfigAddress>>,
    redirect_to: Option<ConfigAddress>,
    keep: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<'de> Deserialize<'de> for UserRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |raw: RawUserRule| {
            match (raw.copy_to, raw.redirect_to, raw.keep) {
                (Some(c), None, None) => {
                    let list: Vec<Address> = match c {
                        OneOrMany::One(a) => vec![a.0],
                        OneOrMany::Many(v) => v.into_iter().map(|a| a.0).collect(),
                    };
                    if list.is_empty() {
                        return Err("`copy_to` is empty".into());
                    }
                    Ok(UserRule::CopyTo(list))
                }
                (None, Some(r), None) => Ok(UserRule::RedirectTo(r.0)),
                (None, None, Some(true)) => Ok(UserRule::Keep),
                (None, None, Some(false)) => {
                    Err("`keep: false` means nothing; remove the rule".into())
                }
                (None, None, None) => {
                    Err("needs one of `copy_to`, `redirect_to`, `keep: true`".into())
                }
                _ => Err("`copy_to`, `redirect_to` and `keep` are mutually exclusive".into()),
            }
        })
    }
}

/// Settings of one managed domain.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct DomainConfig {
    pub mode: Mode,
    pub enabled: bool,
    pub destination: Destination,
    /// The destination's TLS and throttling keys (`destination.tls`, …).
    pub transport: Transport,
    pub bounce: bool,
    pub verify: Option<Address>,
    pub require_gateway: bool,
    /// `None` when the domain has no `accounts:` key.
    pub accounts: Option<Vec<AccountSource>>,
    /// Keys as written (normalized by the policy with the case rules).
    pub users: Vec<(Address, UserRule)>,
    /// `destination.max_size`: copies of larger messages are not made.
    pub max_size: Option<MessageSize>,
    /// `destination.reject_unknown` (DESIGN.md §10); `None`: recipients
    /// are routed without asking the destination.
    pub reject_unknown: Option<super::RejectUnknown>,
    /// `shadow:` of the domain; `None`: the global `shadow:` applies
    /// ([`super::Config::shadow`]).
    pub shadow: Option<bool>,
}

impl DomainConfig {
    /// The relay domain of managed domain `name`, for destinations that
    /// need one (docs/design.md §4).
    pub fn relay_domain(&self, name: &str, relay_suffix: &str) -> Option<String> {
        match &self.destination {
            Destination::Domain {
                change_envelope: true,
                ..
            } => None,
            _ => Some(format!("{name}.{relay_suffix}")),
        }
    }

    /// The domain routed addresses of managed domain `name` have when they
    /// arrive at the destination: the `change_envelope` domain, else
    /// `name` (docs/design.md §4).
    pub fn arrival_domain<'a>(&'a self, name: &'a str) -> &'a str {
        match &self.destination {
            Destination::Domain {
                domain,
                change_envelope: true,
            } => &domain.0,
            _ => name,
        }
    }

    /// The sources of the destination's address list
    /// (`destination.reject_unknown.accounts`); empty when not given.
    pub fn destination_list(&self) -> impl Iterator<Item = &super::AccountSource> {
        self.reject_unknown.iter().flat_map(|r| &r.accounts)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomainConfig {
    mode: Mode,
    #[serde(default = "yes")]
    enabled: bool,
    destination: DestinationEntry,
    #[serde(default)]
    bounce: bool,
    verify: Option<ConfigAddress>,
    #[serde(default)]
    require_gateway: bool,
    accounts: Option<Vec<AccountSource>>,
    #[serde(default)]
    users: UserEntries,
    shadow: Option<bool>,
}

/// `users:` is a mapping in YAML; read it as a sequence of entries so that
/// the order is kept and a duplicate key is seen (the validation reports
/// it with both lines) rather than silently overriding the first.
#[derive(Default)]
struct UserEntries(Vec<(ConfigAddress, UserRule)>);

impl<'de> Deserialize<'de> for UserEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        entries(d, "a mapping of address → rule").map(UserEntries)
    }
}

/// `domains:` as written, duplicates included (see [`UserEntries`]);
/// empty when the key is absent or has no value.
#[derive(Default)]
pub(crate) struct DomainEntries(pub Vec<(DomainName, DomainConfig)>);

impl<'de> Deserialize<'de> for DomainEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        entries(d, "a mapping of domain → settings").map(DomainEntries)
    }
}

fn yes() -> bool {
    true
}

impl<'de> Deserialize<'de> for DomainConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |raw: RawDomainConfig| {
            if matches!(&raw.accounts, Some(a) if a.is_empty()) {
                return Err(
                    "`accounts` is empty; give at least one source or remove the key".into(),
                );
            }
            if raw.mode == Mode::Split && raw.accounts.is_none() {
                return Err("mode `split` needs `accounts`: without them nothing is known to be present here, so everything would be redirected (use `mode: route` for that)".into());
            }
            Ok(DomainConfig {
                mode: raw.mode,
                enabled: raw.enabled,
                destination: raw.destination.destination,
                transport: raw.destination.transport,
                bounce: raw.bounce,
                verify: raw.verify.map(|a| a.0),
                require_gateway: raw.require_gateway,
                accounts: raw.accounts,
                users: raw.users.0.into_iter().map(|(k, r)| (k.0, r)).collect(),
                max_size: raw.destination.max_size,
                reject_unknown: raw.destination.reject_unknown,
                shadow: raw.shadow,
            })
        })
    }
}
