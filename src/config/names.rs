//! The names `milter.yaml` is written in: domain names (the keys of
//! `domains:`, `relay_suffix:`, `destination.domain`) and mail addresses
//! (`users:`, `verify:`, `notify.to`, `list:`).

use super::de::deserialize_from_str;
use crate::address::{normalize_domain, Address};
use std::{fmt, str::FromStr};

/// A domain name, normalized to lower-case A-labels.
#[derive(Clone, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub struct DomainName(pub String);

impl FromStr for DomainName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with('[') {
            return Err(format!("{s:?}: an address literal is not a mail domain"));
        }
        normalize_domain(s)
            .map(DomainName)
            .map_err(|e| e.to_string())
    }
}
deserialize_from_str!(DomainName, "domain");

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A full mail address given in the configuration.
#[derive(Clone, Debug, Eq, PartialEq, Hash)]
pub struct ConfigAddress(pub Address);

impl FromStr for ConfigAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let inner = s
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .unwrap_or(s);
        match Address::parse(inner) {
            Ok(a) if a.domain.starts_with('[') => {
                Err(format!("{s:?}: use a domain name, not an address literal"))
            }
            Ok(a) => Ok(ConfigAddress(a)),
            Err(e) => Err(format!("{s:?} is not a mail address: {e}")),
        }
    }
}
deserialize_from_str!(ConfigAddress, "address");
