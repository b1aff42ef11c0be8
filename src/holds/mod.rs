//! Why routing for a domain is off at run time (docs/design.md, "Routing
//! off"): an administrator's `dualroute disable`, a bounce-breaker trip, a
//! destination not yet verified, or a state file that cannot be read.
//!
//! Every hold is derived from the configuration and the files under
//! `state_dir` by one function, [`Holds::read`], so the running milter and
//! the one-shot commands (`explain`, `status`) see the same truth. The
//! verification probe records its result there too, with the destination
//! and address it probed: a pass counts only while both are unchanged, so
//! a restart keeps a verified domain routing and a changed destination is
//! probed again.
//!
//! The running service keeps the holds in force in one [`LiveHolds`],
//! apart from the (immutable) policy: a hold takes effect at once, also
//! for messages that started before it. [`follow`] re-reads them when
//! another process (`dualroute disable`, a second instance's breaker)
//! changes a state file.

use crate::config::{Config, Destination, DomainConfig};
use crate::state::{self, Disabled, StateDir, TripCause, Tripped, Verification};
use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, RwLock},
};

pub(crate) mod follow;

/// One reason routing for a domain is off.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Hold {
    /// `dualroute disable DOMAIN`.
    Disabled(Disabled),
    /// The bounce breaker switched routing off.
    Tripped(Tripped),
    /// `verify:` is set and the destination has not (yet) accepted the
    /// probe address; `last` is the most recent probe of this destination.
    Verification {
        address: String,
        last: Option<Verification>,
    },
    /// A state file of the domain cannot be read: when in doubt, do not
    /// route.
    Unreadable(String),
    /// The holds in force were not read for this domain: a message that
    /// began under a configuration a reload has since changed still
    /// manages it (or the holds of a domain the reload adds are not
    /// installed yet). When in doubt, do not route (docs/design.md
    /// "Reload").
    NotRead,
}

impl Hold {
    /// A few words for the SMTP reply: what paused routing, without the
    /// details (those go to the log and to `explain`).
    pub fn cause(&self) -> &'static str {
        match self {
            Hold::Disabled(_) => "disabled by the administrator",
            Hold::Tripped(t) if t.cause == TripCause::Deferrals => {
                "switched off by the breaker: too many deferrals"
            }
            Hold::Tripped(_) => "switched off by the bounce breaker",
            Hold::Verification { .. } => "waiting for verification of the destination",
            Hold::Unreadable(_) => "routing state unreadable",
            Hold::NotRead => "routing state being reloaded",
        }
    }
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::Disabled(d) => write!(
                f,
                "disabled by an administrator since {} ({}); `dualroute enable` switches it back on",
                state::when(d.since),
                d.reason
            ),
            Hold::Tripped(t) if t.cause == TripCause::Deferrals => write!(
                f,
                "breaker tripped on deferrals since {}: {} temporary failures of routed mail within {}s (the destination throttles or cannot be reached); `dualroute enable` switches it back on",
                state::when(t.since),
                t.deferrals,
                t.window_secs
            ),
            Hold::Tripped(t) => write!(
                f,
                "bounce breaker tripped since {}: {} permanent failures of routed mail within {}s; `dualroute enable` switches it back on",
                state::when(t.since),
                t.bounces,
                t.window_secs
            ),
            Hold::Verification { address, last: None } => write!(
                f,
                "waiting for verification: the destination has not yet accepted {address} (no probe yet)"
            ),
            Hold::Verification {
                address,
                last: Some(v),
            } => write!(
                f,
                "waiting for verification of {address}: last probe failed {}: {}",
                state::when(v.at),
                v.detail
            ),
            Hold::Unreadable(e) => write!(
                f,
                "state file unreadable: {e}; fix or remove it to resume routing"
            ),
            Hold::NotRead => write!(
                f,
                "the routing state of this domain has not been read under the configuration in force (a reload added or removed it while the message was in flight); the sender retries"
            ),
        }
    }
}

/// What the verification probe of a domain checks: the destination and
/// the probe address. A recorded pass is valid for exactly this.
pub fn probe_target(d: &DomainConfig) -> String {
    let verify = d
        .verify
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let dest = match &d.destination {
        Destination::Hosts(h) => {
            let h: Vec<String> = h.iter().map(ToString::to_string).collect();
            format!("hosts {}", h.join(", "))
        }
        Destination::Domain {
            domain,
            change_envelope,
        } => format!("domain {domain} change_envelope={change_envelope}"),
    };
    format!("RCPT TO:<{verify}> at {dest}")
}

/// The holds of every managed domain, as read from `state_dir`.
///
/// Holds read for a configuration ([`Holds::read`]) fail closed: a domain
/// they were not read for is held ([`Hold::NotRead`]), so a message whose
/// policy still manages a domain that a reload removed (or whose holds
/// are not yet installed) never routes it on a missing entry. The
/// `Default` value holds nothing and knows no domain: it stands for
/// "routing on everywhere" in tests and for unmanaged addresses.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Holds {
    by_domain: HashMap<String, Hold>,
    /// The domains these holds were read for, with what their
    /// verification depends on; `None` for `Default`.
    read_for: Option<HashMap<String, Probed>>,
    /// Domains whose account reload the shrink guard refused, with the
    /// refused list (docs/design.md "Shrink guard"). Kept by the running
    /// service across holds refreshes; empty for the one-shot commands.
    disputes: Disputes,
}

/// The refused account lists of the running service, by domain.
#[derive(Clone, Debug, Default)]
pub struct Disputes(pub HashMap<String, Arc<crate::accounts::Accounts>>);

impl PartialEq for Disputes {
    fn eq(&self, other: &Disputes) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .all(|(d, a)| other.0.get(d).is_some_and(|b| Arc::ptr_eq(a, b)))
    }
}

impl Eq for Disputes {}

/// What a domain's verification hold was read against: a message whose
/// policy names another destination or probe address for the domain (it
/// began before a reload changed them) is held rather than routed on a
/// verification of something else.
#[derive(Clone, Debug, Eq, PartialEq)]
struct Probed {
    destination: Destination,
    verify: Option<crate::address::Address>,
}

impl Probed {
    fn of(d: &DomainConfig) -> Probed {
        Probed {
            destination: d.destination.clone(),
            verify: d.verify.clone(),
        }
    }

    fn is(&self, d: &DomainConfig) -> bool {
        self.destination == d.destination && self.verify == d.verify
    }
}

/// What [`Holds::get`] answers for a domain the holds were not read for.
static NOT_READ: Hold = Hold::NotRead;

impl Holds {
    /// Reads the holds of every domain of `config`. A state file that
    /// cannot be read holds its domain; the errors are returned for the log.
    pub fn read(config: &Config) -> (Holds, Vec<String>) {
        let dir = StateDir::new(&config.state_dir);
        let mut by_domain = HashMap::new();
        let mut errors = Vec::new();
        let mut read_for = HashMap::new();
        for (name, d) in &config.domains {
            let name = &name.0;
            read_for.insert(name.clone(), Probed::of(d));
            let st = match dir.load(name) {
                Ok(st) => st,
                Err(e) => {
                    errors.push(e.to_string());
                    by_domain.insert(name.clone(), Hold::Unreadable(e.to_string()));
                    continue;
                }
            };
            let hold = if let Some(x) = st.disabled {
                Some(Hold::Disabled(x))
            } else if let Some(t) = st.tripped {
                Some(Hold::Tripped(t))
            } else if let Some(address) = &d.verify {
                // Only a probe of the destination and address configured now
                // counts; an older record (another destination) is ignored.
                let last = st.verification.filter(|v| v.target == probe_target(d));
                match last {
                    Some(v) if v.passed => None,
                    last => Some(Hold::Verification {
                        address: address.to_string(),
                        last,
                    }),
                }
            } else {
                None
            };
            if let Some(h) = hold {
                by_domain.insert(name.clone(), h);
            }
        }
        (
            Holds {
                by_domain,
                read_for: Some(read_for),
                disputes: Disputes::default(),
            },
            errors,
        )
    }

    /// Why routing for `domain` is off, if it is. A domain these holds
    /// were not read for is held (fail closed).
    pub fn get(&self, domain: &str) -> Option<&Hold> {
        match &self.read_for {
            Some(read) if !read.contains_key(domain) => Some(&NOT_READ),
            _ => self.by_domain.get(domain),
        }
    }

    /// Why routing for `domain`, configured as `d` in the policy a message
    /// began with, is off: as [`Holds::get`], and held as well when the
    /// holds were read for another destination or probe address of the
    /// domain (a reload changed them while the message was in flight).
    pub fn get_for(&self, domain: &str, d: &DomainConfig) -> Option<&Hold> {
        match &self.read_for {
            Some(read) if !read.get(domain).is_some_and(|p| p.is(d)) => Some(&NOT_READ),
            _ => self.by_domain.get(domain),
        }
    }

    /// The refused account list of `domain`, while the shrink guard holds
    /// a reload of it.
    pub fn disputed(&self, domain: &str) -> Option<&crate::accounts::Accounts> {
        // Asked per RCPT; almost always there is no dispute at all.
        if self.disputes.0.is_empty() {
            return None;
        }
        self.disputes.0.get(domain).map(|a| &**a)
    }

    pub fn disputes(&self) -> &Disputes {
        &self.disputes
    }

    /// These holds with the running service's disputes.
    pub fn with_disputes(mut self, disputes: Disputes) -> Holds {
        self.disputes = disputes;
        self
    }

    /// Every held domain and why.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Hold)> {
        self.by_domain.iter().map(|(n, h)| (n.as_str(), h))
    }

    /// Whether `domain` waits for a successful verification probe.
    pub fn awaiting_verification(&self, domain: &str) -> bool {
        matches!(self.get(domain), Some(Hold::Verification { .. }))
    }

    /// Holds `domain` (tests, and the one-off holds of callers that know
    /// better than the state files).
    pub fn insert(&mut self, domain: &str, hold: Hold) {
        self.by_domain.insert(domain.to_owned(), hold);
    }
}

/// The holds in force in the running service, replaced whole whenever they
/// are read again. `run` (src/service/mod.rs) makes the one instance; only
/// the reload actor (src/service/actor.rs) replaces it.
#[derive(Debug, Default)]
pub struct LiveHolds(RwLock<Arc<Holds>>);

impl LiveHolds {
    pub fn new(holds: Holds) -> LiveHolds {
        LiveHolds(RwLock::new(Arc::new(holds)))
    }

    /// The holds now. A poisoned lock still holds a complete value (it is
    /// only ever replaced whole).
    pub fn current(&self) -> Arc<Holds> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn replace(&self, holds: Holds) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(holds);
    }
}
