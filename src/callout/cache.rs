//! The callout cache of one domain (DESIGN.md §10): the destination's
//! answers per address, with a positive and a negative lifetime, kept in
//! `state_dir/<domain>.callouts` so that a restart does not send every
//! address to the destination again (src/state.rs writes it: a temporary
//! file renamed over the old one).
//!
//! Answers are stored with the time they were learned, not with an expiry,
//! so that a new `cache:` lifetime applies to what is stored. They belong
//! to one destination: a file written for other hosts (or another `tls`
//! level) is not used.

use super::Verdict;
use crate::config::CalloutCache;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One stored answer.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub(super) struct Entry {
    /// Known (2xx) or Unknown (5xx); Unreachable is never stored.
    pub known: bool,
    /// When the destination gave it (Unix seconds).
    pub at: u64,
    /// Its reply, for `explain` and the log.
    pub reply: String,
}

impl Entry {
    pub fn verdict(&self) -> Verdict {
        if self.known {
            Verdict::Known
        } else {
            Verdict::Unknown
        }
    }

    fn lifetime(&self, life: &CalloutCache) -> u64 {
        if self.known {
            life.positive.0.as_secs()
        } else {
            life.negative.0.as_secs()
        }
    }

    /// Whether it may still be served at `now`.
    pub fn fresh(&self, life: &CalloutCache, now: u64) -> bool {
        now < self.at.saturating_add(self.lifetime(life))
    }

    /// Whether it should be asked again in the background: in the last
    /// quarter of its lifetime, so a busy address never goes cold (as
    /// Postfix verify(8) refreshes before the expiry).
    pub fn refresh_due(&self, life: &CalloutCache, now: u64) -> bool {
        let lifetime = self.lifetime(life);
        now >= self.at.saturating_add(lifetime - lifetime / 4)
    }
}

/// Whether the destination takes any address (a random local part).
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub(super) struct AcceptAll {
    pub accepts: bool,
    pub at: u64,
    pub reply: String,
}

/// The file's contents.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub(super) struct Cache {
    /// The destination the answers came from ([`super::destination_key`]).
    pub destination: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_all: Option<AcceptAll>,
    #[serde(default)]
    pub entries: HashMap<String, Entry>,
}

impl Cache {
    /// The stored answer for `address` if it is still fresh.
    pub fn get(&self, address: &str, life: &CalloutCache, now: u64) -> Option<&Entry> {
        self.entries.get(address).filter(|e| e.fresh(life, now))
    }

    /// Stores an answer; past `max` entries, those no longer fresh go
    /// first, then the oldest tenth, so that one insert does not pay for a
    /// sweep each time (a dictionary attack fills the negative cache).
    pub fn insert(
        &mut self,
        address: String,
        entry: Entry,
        life: &CalloutCache,
        now: u64,
        max: usize,
    ) {
        if self.entries.len() >= max && !self.entries.contains_key(&address) {
            self.entries.retain(|_, e| e.fresh(life, now));
            if self.entries.len() >= max {
                let mut ages: Vec<u64> = self.entries.values().map(|e| e.at).collect();
                ages.sort_unstable();
                if let Some(&cut) = ages.get(ages.len() / 10) {
                    self.entries.retain(|_, e| e.at > cut);
                }
            }
        }
        self.entries.insert(address, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Window;
    use std::time::Duration;

    fn life() -> CalloutCache {
        CalloutCache {
            positive: Window(Duration::from_secs(400)),
            negative: Window(Duration::from_secs(100)),
        }
    }

    fn entry(known: bool, at: u64) -> Entry {
        Entry {
            known,
            at,
            reply: String::new(),
        }
    }

    #[test]
    fn lifetimes_and_refresh() {
        let l = life();
        let neg = entry(false, 1000);
        assert!(neg.fresh(&l, 1099) && !neg.fresh(&l, 1100));
        assert!(!neg.refresh_due(&l, 1074) && neg.refresh_due(&l, 1075));
        let pos = entry(true, 1000);
        assert!(pos.fresh(&l, 1399) && !pos.fresh(&l, 1400));
        assert!(!pos.refresh_due(&l, 1299) && pos.refresh_due(&l, 1300));
        let mut c = Cache::default();
        c.insert("a@x".into(), neg, &l, 1000, 10);
        assert!(c.get("a@x", &l, 1050).is_some());
        assert!(c.get("a@x", &l, 1100).is_none());
    }

    #[test]
    fn bounded() {
        let l = life();
        let mut c = Cache::default();
        for i in 0..100u64 {
            c.insert(format!("{i}@x"), entry(true, 1000 + i), &l, 1100, 50);
        }
        assert!(c.entries.len() <= 50, "{}", c.entries.len());
        // The newest are kept.
        assert!(c.entries.contains_key("99@x"));
        assert!(!c.entries.contains_key("0@x"));
        // Expired entries make room first.
        let mut c = Cache::default();
        c.insert("old@x".into(), entry(false, 0), &l, 0, 2);
        c.insert("new@x".into(), entry(true, 500), &l, 500, 2);
        c.insert("newer@x".into(), entry(true, 501), &l, 501, 2);
        assert!(!c.entries.contains_key("old@x"));
        assert_eq!(c.entries.len(), 2);
    }
}
