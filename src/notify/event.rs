//! What the administrator hears of ([`Event`]) and the words for it: a
//! subject and a body that say what happened, what it means for mail and
//! what to do (docs/design.md "Notification by mail").

use crate::state::{self, TripCause, Tripped};
use std::time::Duration;

/// Something the administrator should hear of.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Event {
    /// The breaker switched routing for `domain` off.
    Tripped { domain: String, trip: Tripped },
    /// The destination did not accept the probe address (first failure).
    VerificationFailed {
        domain: String,
        address: String,
        detail: String,
    },
    /// The destination accepts the probe address again: routing starts.
    VerificationPassed {
        domain: String,
        address: String,
        detail: String,
    },
    /// A reload kept the running configuration.
    ReloadRefused { reason: String },
    /// This node lost the fleet's Redis (`cluster:`): it serves on its
    /// last known state.
    ClusterUnreachable { redis: String, error: String },
    /// This node reaches the fleet's Redis again.
    ClusterBack { redis: String, since: u64 },
    /// The breaker cannot read its source (`breaker.maillog`): it sees no
    /// bounce and trips no domain (issue 25).
    BreakerBlind { source: String, error: String },
    /// The breaker reads its source again.
    BreakerSees { source: String, blind_since: u64 },
}

impl Event {
    /// The verification event a probe result is worth, if any: a change
    /// only, so a destination that stays down is reported once, not at
    /// every retry (`previous` is the last recorded probe of the same
    /// target).
    pub fn verification(
        domain: &str,
        previous: Option<&state::Verification>,
        now: &state::Verification,
        address: &str,
    ) -> Option<Event> {
        let (domain, address, detail) = (domain.to_owned(), address.to_owned(), now.detail.clone());
        match (previous.map(|p| p.passed), now.passed) {
            (Some(false), true) => Some(Event::VerificationPassed {
                domain,
                address,
                detail,
            }),
            (None | Some(true), false) => Some(Event::VerificationFailed {
                domain,
                address,
                detail,
            }),
            _ => None,
        }
    }

    /// A few words for the subject.
    pub fn subject(&self) -> String {
        match self {
            Event::Tripped { domain, trip } if trip.cause == TripCause::Deferrals => {
                format!("{domain}: routing switched off: too many deferrals")
            }
            Event::Tripped { domain, .. } => {
                format!("{domain}: routing switched off by the bounce breaker")
            }
            Event::VerificationFailed { domain, .. } => {
                format!("{domain}: verification of the destination failed")
            }
            Event::VerificationPassed { domain, .. } => {
                format!("{domain}: verification passed, routing is on")
            }
            Event::ReloadRefused { .. } => {
                "reload refused, the running configuration stays".to_owned()
            }
            Event::ClusterUnreachable { .. } => {
                "the fleet's Redis is unreachable: this node serves on its last known state"
                    .to_owned()
            }
            Event::ClusterBack { .. } => "the fleet's Redis is reachable again".to_owned(),
            Event::BreakerBlind { .. } => {
                "the bounce breaker cannot read the mail log: it cannot trip".to_owned()
            }
            Event::BreakerSees { .. } => "the bounce breaker reads the mail log again".to_owned(),
        }
    }

    /// What happened, what it means for mail, and what to do.
    pub fn body(&self) -> String {
        match self {
            Event::Tripped { domain, trip } => {
                let window = crate::config::human(Duration::from_secs(trip.window_secs));
                let what = match trip.cause {
                    TripCause::Bounces => format!(
                        "{} permanent failures of routed mail within {window} ({} deferrals)",
                        trip.bounces, trip.deferrals
                    ),
                    TripCause::Deferrals => format!(
                        "{} temporary failures (deferrals) of routed mail within {window} ({} permanent failures): the destination throttles new senders or cannot be reached",
                        trip.deferrals, trip.bounces
                    ),
                };
                let mut recent = trip.recent.clone();
                if recent.is_empty() {
                    recent.push(trip.last.clone());
                }
                let lines: Vec<String> = recent.iter().map(|l| format!("  {l}")).collect();
                format!(
                    "The breaker switched routing for {domain} off at {}: {what}.\n\nMailboxes here still get their mail; addresses that would be routed are refused with 451 4.4.4 (senders retry) until routing is back on. This stays so across restarts.\n\nThe last failures it counted:\n{}\n\nCheck the destination, then switch routing back on with:\n\n  dualroute enable {domain}\n",
                    state::when(trip.since),
                    lines.join("\n")
                )
            }
            Event::VerificationFailed {
                domain,
                address,
                detail,
            } => format!(
                "The destination of {domain} did not accept the probe address {address}: {detail}\n\nRouting for {domain} stays off (addresses that would be routed are refused with 451 4.4.4) until it does; the probe is retried (30 s, doubling to 10 min). `dualroute verify {domain}` shows each step; `dualroute status` the state.\n"
            ),
            Event::VerificationPassed {
                domain,
                address,
                detail,
            } => format!(
                "The destination of {domain} accepts the probe address {address} again ({detail}): routing for {domain} is on.\n"
            ),
            Event::ReloadRefused { reason } => format!(
                "A reload was refused; dualroute keeps running the configuration and accounts it had:\n\n  {reason}\n\nFix the file or the account source, then reload again (systemctl reload dualroute). `dualroute status` shows the refusal until a reload succeeds.\n"
            ),
            Event::ClusterUnreachable { redis, error } => format!(
                "This node cannot reach the fleet's Redis ({redis}): {error}\n\nMail is not affected: the node keeps deciding on the state it last shared (disabled domains, breaker trips, verifications), and commands typed here (dualroute disable/enable) act here at once. What changes here is pushed to the other nodes when Redis is back; a change made on another node meanwhile reaches this one then. Where two nodes changed the same domain, the hold wins.\n\nCheck Redis and the network; `dualroute status` shows the fleet as this node last saw it.\n"
            ),
            Event::ClusterBack { redis, since } => format!(
                "This node reaches the fleet's Redis ({redis}) again, after being cut off since {}; it has pushed its changes and taken the fleet's. `dualroute status` shows the fleet.\n",
                state::when(*since)
            ),
            Event::BreakerBlind { source, error } => format!(
                "The bounce breaker cannot read {source}: {error}\n\nWhile it cannot, it sees no delivery failure: a destination that refuses routed mail keeps turning it into bounces to outside senders, and routing is never switched off. Mail flow is not otherwise affected.\n\nGive the service read access (maillog: journal needs the systemd-journal group, a file such as /var/log/mail.log the adm group: SupplementaryGroups= with `systemctl edit dualroute`, then `systemctl restart dualroute`), or point breaker.maillog at what the MTA writes. `dualroute check` tests the access as the service user; `dualroute status` shows the breaker until it reads again.\n"
            ),
            Event::BreakerSees { source, blind_since } => format!(
                "The bounce breaker reads {source} again, after being unable to since {}. Delivery failures logged meanwhile may not have been counted.\n",
                state::when(*blind_since)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verification(passed: bool) -> state::Verification {
        state::Verification {
            at: 1,
            passed,
            detail: if passed { "250 ok" } else { "550 no" }.into(),
            target: "t".into(),
        }
    }

    #[test]
    fn verification_is_reported_on_a_change_only() {
        let (ok, bad) = (verification(true), verification(false));
        let e = |prev: Option<&state::Verification>, now| {
            Event::verification("example.com", prev, now, "p@x.test")
        };
        assert!(matches!(
            e(None, &bad),
            Some(Event::VerificationFailed { .. })
        ));
        assert!(matches!(
            e(Some(&ok), &bad),
            Some(Event::VerificationFailed { .. })
        ));
        assert_eq!(e(Some(&bad), &bad), None, "a retry that fails again");
        assert!(matches!(
            e(Some(&bad), &ok),
            Some(Event::VerificationPassed { .. })
        ));
        assert_eq!(e(Some(&ok), &ok), None);
        assert_eq!(e(None, &ok), None, "a first pass is no news");
    }
}
