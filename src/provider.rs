//! Hosted providers recognised by name: Google Workspace and Microsoft
//! 365. Their rules (throttling, TLS, inbound gateway or connector) are
//! not in the DNS, so `postfix-config` and `doctor` need to know who the
//! other side is; the names give it away (docs/design.md "The
//! destination's rules").

use crate::config::{Destination, DomainConfig};
use std::fmt;

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Provider {
    Google,
    Microsoft,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Google => "Google Workspace",
            Provider::Microsoft => "Microsoft 365",
        })
    }
}

/// Google's MX hosts (`aspmx.l.google.com`, `smtp.google.com`) and the
/// test alias domain every Workspace domain gets
/// (`example.com.test-google-a.com`, whose MX is Google's).
const GOOGLE: [&str; 3] = ["google.com", "googlemail.com", "test-google-a.com"];

/// Microsoft 365's MX hosts (`example-com.mail.protection.outlook.com`)
/// and the routing domain of every tenant (`example.mail.onmicrosoft.com`).
const MICROSOFT: [&str; 2] = ["mail.protection.outlook.com", "mail.onmicrosoft.com"];

/// The concurrency for a Google or Microsoft destination when
/// `concurrency`/`rate_delay` are not given. Neither provider publishes a
/// per-connection limit; both publish per-mailbox receiving limits that a
/// migration cannot exceed by going slower or faster (Google: 60 a minute,
/// 3,600 an hour per user, support.google.com/a/answer/1366776 "Email
/// receiving limits"; Microsoft: 3,600 an hour per mailbox,
/// learn.microsoft.com "Exchange Online limits", Receiving limits). What
/// they do throttle is a burst from an address they do not know yet,
/// with 4xx replies (Google `421 4.7.28`, Microsoft `451 4.7.500`). Postfix
/// starts at `initial_destination_concurrency` (5) and climbs towards
/// `default_destination_concurrency_limit` (20) while deliveries succeed
/// (SCHEDULER_README, "concurrency feedback"): capping it at that start
/// keeps a migration's backlog from looking like such a burst.
pub const DEFAULT_CONCURRENCY: u32 = 5;

impl Provider {
    /// The provider a host or domain name belongs to.
    pub fn of_name(name: &str) -> Option<Provider> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let under = |zones: &[&str]| {
            zones
                .iter()
                .any(|z| name == *z || name.ends_with(&format!(".{z}")))
        };
        if under(&GOOGLE) {
            Some(Provider::Google)
        } else if under(&MICROSOFT) {
            Some(Provider::Microsoft)
        } else {
            None
        }
    }

    /// The provider a destination names (its hosts or its domain); `None`
    /// when the names do not tell (doctor then looks at the MX records).
    pub fn of_destination(destination: &Destination) -> Option<Provider> {
        match destination {
            Destination::Hosts(hosts) => hosts.iter().find_map(|h| Provider::of_name(&h.name)),
            Destination::Domain { domain, .. } => Provider::of_name(&domain.0),
        }
    }
}

/// The concurrency limit routed mail to this domain's destination gets,
/// and why: `concurrency:`, or [`DEFAULT_CONCURRENCY`] for a Google or
/// Microsoft destination without `concurrency`/`rate_delay`.
pub fn concurrency(d: &DomainConfig) -> Option<(u32, String)> {
    match (d.transport.concurrency, d.transport.rate_delay) {
        (Some(n), _) => Some((n, "destination.concurrency".into())),
        (None, Some(_)) => None,
        (None, None) => Provider::of_destination(&d.destination).map(|p| {
            (
                DEFAULT_CONCURRENCY,
                format!("default for {p}: a burst from a new address is deferred"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for (name, want) in [
            ("aspmx.l.google.com", Some(Provider::Google)),
            ("ALT1.ASPMX.L.GOOGLE.COM.", Some(Provider::Google)),
            ("smtp.google.com", Some(Provider::Google)),
            ("example.com.test-google-a.com", Some(Provider::Google)),
            (
                "example-com.mail.protection.outlook.com",
                Some(Provider::Microsoft),
            ),
            ("example.mail.onmicrosoft.com", Some(Provider::Microsoft)),
            ("notgoogle.com", None),
            ("google.com.example.net", None),
            ("mx1.legacy.example.net", None),
        ] {
            assert_eq!(Provider::of_name(name), want, "{name}");
        }
    }
}
