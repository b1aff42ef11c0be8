//! How a node and the fleet agree on a domain's shared state (docs/design.md
//! "Several MX hosts"): pure functions, no Redis, no files.
//!
//! Each shared record of a domain is a register holding the canonical
//! YAML of its state file (`DOMAIN.disabled`, `DOMAIN.tripped`,
//! `DOMAIN.verify`) or nothing. A node remembers, per register, the value
//! it last agreed on with the fleet (its base). Then:
//!
//! - local and fleet equal: nothing to do;
//! - only one side differs from the base: that side changed, it wins
//!   (a `disable` typed on one node, an `enable` on another);
//! - both differ, or there is no base (the node's first contact, an
//!   emptied Redis): the most restrictive wins. A hold (`disabled`,
//!   `tripped`) beats its absence, so an `enable` on one node during an
//!   outage does not undo a `disable` or a trip on another; between two
//!   records the newer wins (a verification too).

use crate::state::{Disabled, Tripped, Verification};
use serde::{Deserialize, Serialize};

/// The shared records of a domain.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash, Ord, PartialOrd)]
pub enum Kind {
    Disabled,
    Tripped,
    Verify,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Disabled, Kind::Tripped, Kind::Verify];

    /// The state file's extension, and the field in Redis.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Disabled => "disabled",
            Kind::Tripped => "tripped",
            Kind::Verify => "verify",
        }
    }

    /// Whether a record of this kind holds routing.
    fn holds(self) -> bool {
        matches!(self, Kind::Disabled | Kind::Tripped)
    }

    /// The record's time, to tell the newer of two; `None` when the text is
    /// not a record of this kind (never written by dualroute: it loses).
    pub fn stamp(self, text: &str) -> Option<u64> {
        match self {
            Kind::Disabled => serde_yaml::from_str::<Disabled>(text).ok().map(|d| d.since),
            Kind::Tripped => serde_yaml::from_str::<Tripped>(text).ok().map(|t| t.since),
            Kind::Verify => serde_yaml::from_str::<Verification>(text)
                .ok()
                .map(|v| v.at),
        }
    }

    /// Whether `text` is a record of this kind: a node trusts only what
    /// it can read (a value in Redis that is not is ignored).
    pub fn valid(self, text: &str) -> bool {
        self.stamp(text).is_some()
    }
}

/// The outcome of merging one register.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Merged {
    /// The value both sides should hold now.
    pub value: Option<String>,
    /// Both sides had changed it and they disagreed on whether routing is
    /// held: the hold won (for `status` and the log).
    pub held_won: bool,
}

/// Merges one register: `local` (this node's file), `fleet` (Redis), and
/// `base`, the value this node last agreed on with the fleet (`None`: no
/// base, everything counts as changed).
pub fn merge(
    kind: Kind,
    local: Option<&str>,
    fleet: Option<&str>,
    base: Option<Option<&str>>,
) -> Merged {
    let same = |v: Option<&str>| Merged {
        value: v.map(str::to_owned),
        held_won: false,
    };
    // What this node cannot read is not the fleet's word (not an enable
    // either): this node's record stands, and replaces it there.
    if fleet.is_some_and(|t| !kind.valid(t)) {
        return same(local);
    }
    if local == fleet {
        return same(local);
    }
    if let Some(base) = base {
        if local == base {
            return same(fleet);
        }
        if fleet == base {
            return same(local);
        }
    }
    // Both changed, or nothing to compare with.
    match (local, fleet) {
        (Some(l), Some(f)) => {
            let newer = if kind.stamp(l) >= kind.stamp(f) { l } else { f };
            same(Some(newer))
        }
        (Some(one), None) | (None, Some(one)) => Merged {
            value: Some(one.to_owned()),
            // With a base both sides moved: one took the record away
            // (an `enable`), the other kept or set it. Without one, an
            // empty side is only empty (a new node, an emptied Redis).
            held_won: kind.holds() && base.is_some(),
        },
        (None, None) => same(None),
    }
}

/// What a node remembers of its last agreement with the fleet, kept in
/// `state_dir/cluster.synced` so that a node restarted during an outage
/// still knows which of its records changed since.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct Synced {
    /// The fleet's store as last seen (changes when Redis was emptied: then
    /// no base holds).
    pub epoch: String,
    /// Domain → record kind name → the agreed value.
    pub domains:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, Option<String>>>,
    /// Holds this node had lifted while cut off when it found the store
    /// emptied (`DOMAIN KIND` → when it found it): a hold of before then
    /// that the fleet still has overruled that lift ("held wins"), even
    /// when the other node's push comes after this node agreed with the
    /// empty store.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub lifted: std::collections::BTreeMap<String, u64>,
}

impl Synced {
    /// The base of a register, when the fleet's store is still `epoch`.
    pub fn base(&self, epoch: &str, domain: &str, kind: Kind) -> Option<Option<&str>> {
        if self.epoch != epoch {
            return None;
        }
        self.domains
            .get(domain)
            .and_then(|d| d.get(kind.name()))
            .map(|v| v.as_deref())
    }

    pub fn set(&mut self, domain: &str, kind: Kind, value: Option<String>) {
        self.domains
            .entry(domain.to_owned())
            .or_default()
            .insert(kind.name().to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disabled(since: u64) -> String {
        serde_yaml::to_string(&Disabled {
            since,
            reason: "r".into(),
        })
        .unwrap()
    }

    fn m(local: Option<&str>, fleet: Option<&str>, base: Option<Option<&str>>) -> Merged {
        merge(Kind::Disabled, local, fleet, base)
    }

    #[test]
    fn the_side_that_changed_wins() {
        let (d1, d2) = (disabled(1), disabled(2));
        // A disable typed here reaches the fleet; one typed elsewhere
        // reaches here.
        assert_eq!(m(Some(&d1), None, Some(None)).value.as_deref(), Some(&*d1));
        assert_eq!(m(None, Some(&d1), Some(None)).value.as_deref(), Some(&*d1));
        // An enable anywhere clears it everywhere.
        assert_eq!(m(None, Some(&d1), Some(Some(&d1))).value, None);
        assert_eq!(m(Some(&d1), None, Some(Some(&d1))).value, None);
        // A newer disable replaces an older one.
        assert_eq!(
            m(Some(&d1), Some(&d2), Some(Some(&d1))).value.as_deref(),
            Some(&*d2)
        );
        assert!(!m(None, Some(&d1), Some(Some(&d1))).held_won);
    }

    #[test]
    fn when_both_changed_the_hold_wins() {
        let (d0, d1, d2) = (disabled(0), disabled(1), disabled(2));
        // Before the outage both held d0; during it one node enabled, the
        // other disabled again: held, and said so.
        let r = m(None, Some(&d1), Some(Some(&d0)));
        assert_eq!((r.value.as_deref(), r.held_won), (Some(&*d1), true));
        let r = m(Some(&d1), None, Some(Some(&d0)));
        assert_eq!((r.value.as_deref(), r.held_won), (Some(&*d1), true));
        // Both disabled anew: the newer.
        let r = m(Some(&d1), Some(&d2), Some(Some(&d0)));
        assert_eq!((r.value.as_deref(), r.held_won), (Some(&*d2), false));
    }

    #[test]
    fn without_a_base_nothing_held_is_dropped() {
        let d1 = disabled(1);
        // An emptied Redis: this node's hold is pushed, not dropped.
        let r = m(Some(&d1), None, None);
        assert_eq!((r.value.as_deref(), r.held_won), (Some(&*d1), false));
        // A new node learns the fleet's hold.
        assert_eq!(m(None, Some(&d1), None).value.as_deref(), Some(&*d1));
    }

    #[test]
    fn what_is_not_a_record_is_ignored() {
        let d1 = disabled(1);
        assert_eq!(
            m(Some(&d1), Some("garbage: [1"), Some(Some(&d1)))
                .value
                .as_deref(),
            Some(&*d1)
        );
        assert_eq!(m(None, Some("{}"), None).value, None);
        assert_eq!(m(Some(&d1), Some("{}"), None).value.as_deref(), Some(&*d1));
    }

    #[test]
    fn bases_belong_to_an_epoch() {
        let mut s = Synced {
            epoch: "e1".into(),
            ..Synced::default()
        };
        s.set("example.com", Kind::Disabled, Some("x".into()));
        assert_eq!(s.base("e1", "example.com", Kind::Disabled), Some(Some("x")));
        assert_eq!(s.base("e1", "example.com", Kind::Tripped), None);
        assert_eq!(s.base("e2", "example.com", Kind::Disabled), None);
    }
}
