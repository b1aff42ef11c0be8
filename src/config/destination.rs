//! `domains.*.destination` in `milter.yaml`: where routed mail goes
//! (`hosts` or `domain`), what the other side demands of the connection
//! (`tls`, `tls_match`, `concurrency`, `rate_delay`) and the largest message
//! it takes (`max_size`), and whether recipients it would refuse are
//! refused here at RCPT first (`reject_unknown`, DESIGN.md §10).

use super::de::{checked_map, deserialize_from_str};
use super::{AccountSource, DomainName, MessageSize, Window};
use crate::address::normalize_domain;
use serde::{Deserialize, Deserializer};
use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

/// A destination host: `name`, `name:port`, `[ip]` or `[ip]:port`, as in
/// Postfix's next-hop syntax (brackets: no MX lookup).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Host {
    pub name: String,
    /// `[name]`: use the address records (or literal) only, no MX lookup.
    pub bracketed: bool,
    pub port: Option<u16>,
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.bracketed {
            write!(f, "[{}]", self.name)?;
        } else {
            f.write_str(&self.name)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl FromStr for Host {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, bracketed, port) = if let Some(rest) = s.strip_prefix('[') {
            let (name, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: missing ']'"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{s:?}: expected ':PORT' after ']'"))?,
                ),
            };
            (name, true, port)
        } else {
            match s.rsplit_once(':') {
                Some((n, p)) => (n, false, Some(p)),
                None => (s, false, None),
            }
        };
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("{s:?}: bad port {p:?}"))
            })
            .transpose()?;
        let name = if name.parse::<IpAddr>().is_ok() {
            if !bracketed {
                return Err(format!("{s:?}: write an IP address in brackets, [{name}]"));
            }
            name.to_owned()
        } else {
            normalize_domain(name).map_err(|e| format!("{s:?}: {e}"))?
        };
        Ok(Host {
            name,
            bracketed,
            port,
        })
    }
}
deserialize_from_str!(Host, "host");

/// The other server (docs/design.md §4).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Destination {
    /// Explicit hosts: routing addresses use the relay domain.
    Hosts(Vec<Host>),
    /// A domain whose MX receives routed mail.
    Domain {
        domain: DomainName,
        change_envelope: bool,
    },
}

impl Destination {
    /// The next hops routed mail goes to: the hosts, or the destination
    /// domain as a name to look up (its MX first).
    pub fn hosts(&self) -> Vec<Host> {
        match self {
            Destination::Hosts(h) => h.clone(),
            Destination::Domain { domain, .. } => vec![Host {
                name: domain.0.clone(),
                bracketed: false,
                port: None,
            }],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    hosts: Option<Vec<Host>>,
    domain: Option<DomainName>,
    change_envelope: Option<bool>,
    // The largest message the destination accepts (README "Size limit
    // for copies").
    max_size: Option<MessageSize>,
    // What the other side demands of the connection (docs/design.md
    // "The destination's rules").
    tls: Option<TlsLevel>,
    tls_match: Option<Vec<TlsMatch>>,
    concurrency: Option<u32>,
    rate_delay: Option<Window>,
    // Refuse at RCPT what the destination would refuse (DESIGN.md §10).
    reject_unknown: Option<RejectUnknown>,
}

/// `destination.reject_unknown` (DESIGN.md §10): before a recipient is
/// routed away, ask whether the destination knows it, so that an unknown
/// address is refused at RCPT (`550 5.1.1`: nothing queued, no bounce to a
/// forged sender) instead of accepted and bounced later.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct RejectUnknown {
    /// Ask the destination itself: EHLO, MAIL FROM:<>, RCPT TO (src/callout/).
    pub callout: bool,
    /// The destination's own address list, from the same sources as
    /// `accounts:`; empty when not given.
    pub accounts: Vec<AccountSource>,
    /// What to answer when the destination cannot say (4xx, timeout, down).
    pub unreachable: Unreachable,
    /// How long answers are kept.
    pub cache: CalloutCache,
}

/// `reject_unknown.unreachable`: the answer for a recipient whose
/// destination cannot be asked.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unreachable {
    /// `451 4.4.3`: the sender retries, and by then the destination may
    /// answer (the project's rule: when in doubt, tempfail).
    #[default]
    Tempfail,
    /// Accept and route as without `reject_unknown`: an unknown address
    /// then bounces later, as before.
    Accept,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unreachable::Tempfail => "tempfail",
            Unreachable::Accept => "accept",
        })
    }
}

/// `reject_unknown.cache`: how long a callout's answer is served.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct CalloutCache {
    /// The destination accepted the address.
    pub positive: Window,
    /// The destination refused it.
    pub negative: Window,
}

impl CalloutCache {
    /// Between Postfix verify(8)'s refresh times (positive 7d, negative
    /// 3h; `address_verify_positive_refresh_time`,
    /// `address_verify_negative_refresh_time`) and Exim's callout cache
    /// (24h / 2h): a new mailbox there is refused for at most 3 hours.
    pub const DEFAULT_POSITIVE_SECS: u64 = 7 * 86400;
    pub const DEFAULT_NEGATIVE_SECS: u64 = 3 * 3600;
}

impl Default for CalloutCache {
    fn default() -> Self {
        CalloutCache {
            positive: Window(Duration::from_secs(Self::DEFAULT_POSITIVE_SECS)),
            negative: Window(Duration::from_secs(Self::DEFAULT_NEGATIVE_SECS)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCalloutCache {
    positive: Option<Window>,
    negative: Option<Window>,
}

impl<'de> Deserialize<'de> for CalloutCache {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |raw: RawCalloutCache| {
            let default = CalloutCache::default();
            Ok(CalloutCache {
                positive: raw.positive.unwrap_or(default.positive),
                negative: raw.negative.unwrap_or(default.negative),
            })
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRejectUnknown {
    #[serde(default)]
    callout: bool,
    accounts: Option<Vec<AccountSource>>,
    #[serde(default)]
    unreachable: Unreachable,
    #[serde(default)]
    cache: CalloutCache,
}

impl<'de> Deserialize<'de> for RejectUnknown {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |raw: RawRejectUnknown| {
            if matches!(&raw.accounts, Some(a) if a.is_empty()) {
                return Err(
                    "`accounts` is empty; give at least one source or remove the key".into(),
                );
            }
            if !raw.callout && raw.accounts.is_none() {
                return Err("needs `callout: true` or `accounts`: without either nothing says which addresses the destination knows".into());
            }
            Ok(RejectUnknown {
                callout: raw.callout,
                accounts: raw.accounts.unwrap_or_default(),
                unreachable: raw.unreachable,
                cache: raw.cache,
            })
        })
    }
}

/// `destination:` as written: where routed mail goes, how the MTA must
/// talk to it, and the largest message the other side takes.
pub(super) struct DestinationEntry {
    pub(super) destination: Destination,
    pub(super) transport: Transport,
    pub(super) max_size: Option<MessageSize>,
    pub(super) reject_unknown: Option<RejectUnknown>,
}

impl<'de> Deserialize<'de> for DestinationEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |raw: RawDestination| {
            let max_size = raw.max_size;
            let reject_unknown = raw.reject_unknown;
            let transport =
                Transport::from_raw(raw.tls, raw.tls_match, raw.concurrency, raw.rate_delay)?;
            let destination: Result<Destination, String> = match (raw.hosts, raw.domain, raw.change_envelope) {
            (Some(_), Some(_), _) => Err("`hosts` and `domain` are mutually exclusive".into()),
            (Some(_), None, Some(true)) => {
                Err("`change_envelope` needs `domain`: with `hosts`, routed mail uses the relay domain".into())
            }
            (Some(hosts), None, _) if hosts.is_empty() => Err("`hosts` is empty".into()),
            (Some(hosts), None, _) => Ok(Destination::Hosts(hosts)),
            (None, Some(domain), ce) => Ok(Destination::Domain { domain, change_envelope: ce.unwrap_or(false) }),
            (None, None, _) => Err("needs `hosts` or `domain`".into()),
        };
            Ok(DestinationEntry {
                destination: destination?,
                transport,
                max_size,
                reject_unknown,
            })
        })
    }
}

/// Postfix's TLS security levels for the smtp client, under their Postfix
/// names (postconf(5) `smtp_tls_security_level`, TLS_README "Client-side
/// TLS security levels").
#[derive(Clone, Copy, Debug, Eq, PartialEq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsLevel {
    /// No TLS, even when offered.
    None,
    /// STARTTLS when offered, else plain text; no certificate check.
    May,
    /// TLS required; any certificate.
    Encrypt,
    /// TLS required; a trusted certificate naming the MX host.
    Verify,
    /// TLS required; a trusted certificate naming one of `tls_match`.
    Secure,
}

impl TlsLevel {
    /// Whether Postfix refuses to deliver without TLS at this level.
    pub fn requires_tls(self) -> bool {
        self >= TlsLevel::Encrypt
    }

    /// Whether Postfix checks the certificate's trust and names.
    pub fn verifies(self) -> bool {
        self >= TlsLevel::Verify
    }
}

impl fmt::Display for TlsLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Encrypt => "encrypt",
            TlsLevel::Verify => "verify",
            TlsLevel::Secure => "secure",
        })
    }
}

/// One `tls_match` entry, as `smtp_tls_policy_maps` takes it (TLS_README
/// "Mandatory server certificate verification"): a host name, `.domain`
/// for any name below it, or Postfix's `hostname`, `nexthop`,
/// `dot-nexthop`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct TlsMatch(pub String);

impl TlsMatch {
    pub const KEYWORDS: [&'static str; 3] = ["hostname", "nexthop", "dot-nexthop"];
}

impl FromStr for TlsMatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if TlsMatch::KEYWORDS.contains(&s) {
            return Ok(TlsMatch(s.to_owned()));
        }
        let (dot, name) = match s.strip_prefix('.') {
            Some(rest) => (".", rest),
            None => ("", s),
        };
        if name.contains([':', '[', ']']) || name.is_empty() {
            return Err(format!(
                "{s:?}: expected a host name, .domain, hostname, nexthop or dot-nexthop"
            ));
        }
        normalize_domain(name)
            .map(|n| TlsMatch(format!("{dot}{n}")))
            .map_err(|e| format!("{s:?}: {e}"))
    }
}
deserialize_from_str!(TlsMatch, "tls_match entry");

impl fmt::Display for TlsMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the destination demands of the connection: TLS, and how fast the
/// MTA may deliver to it. Every field unset: the MTA's own settings.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Transport {
    pub tls: Option<TlsLevel>,
    /// Only with `verify` or `secure`; empty: Postfix's default for the
    /// level (`hostname` for verify, `nexthop:dot-nexthop` for secure).
    pub tls_match: Vec<TlsMatch>,
    /// Parallel deliveries per destination host.
    pub concurrency: Option<u32>,
    /// Pause between deliveries to a destination host.
    pub rate_delay: Option<Window>,
}

impl Transport {
    /// A bound against typos: Postfix's own default is 20 parallel
    /// deliveries per destination (`default_destination_concurrency_limit`).
    pub const MAX_CONCURRENCY: u32 = 1000;

    /// The `smtp_tls_policy_maps` value: `secure match=a:b`, or the level
    /// alone without `tls_match`. `None` without `tls`.
    pub fn tls_policy(&self) -> Option<String> {
        let level = self.tls?;
        if self.tls_match.is_empty() {
            return Some(level.to_string());
        }
        let names: Vec<&str> = self.tls_match.iter().map(|m| m.0.as_str()).collect();
        Some(format!("{level} match={}", names.join(":")))
    }

    fn from_raw(
        tls: Option<TlsLevel>,
        tls_match: Option<Vec<TlsMatch>>,
        concurrency: Option<u32>,
        rate_delay: Option<Window>,
    ) -> Result<Transport, String> {
        if tls_match.is_some() && !tls.is_some_and(TlsLevel::verifies) {
            return Err("`tls_match` needs `tls: verify` or `tls: secure`: at lower levels Postfix does not look at the certificate's names".into());
        }
        if matches!(&tls_match, Some(m) if m.is_empty()) {
            return Err(
                "`tls_match` is empty; name the certificate's names or remove the key".into(),
            );
        }
        match concurrency {
            Some(0) => return Err("`concurrency` must be at least 1".into()),
            Some(n) if n > Transport::MAX_CONCURRENCY => {
                return Err(format!(
                    "`concurrency` {n}: at most {}",
                    Transport::MAX_CONCURRENCY
                ))
            }
            Some(n) if n > 1 && rate_delay.is_some() => {
                // Wietse Venema on postfix-users: with a rate delay there is
                // no concurrency; delivery 2 starts after delivery 1 ended
                // and the delay passed (postconf(5)
                // transport_destination_rate_delay).
                return Err("`rate_delay` makes Postfix deliver one message at a time to a destination, so `concurrency` above 1 would be ignored: give one of them".into());
            }
            _ => {}
        }
        Ok(Transport {
            tls,
            tls_match: tls_match.unwrap_or_default(),
            concurrency,
            rate_delay,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let h: Host = "[192.0.2.30]:2525".parse().unwrap();
        assert_eq!(
            (h.name.as_str(), h.bracketed, h.port),
            ("192.0.2.30", true, Some(2525))
        );
        let h: Host = "MX1.Legacy.example.net".parse().unwrap();
        assert_eq!(
            (h.name.as_str(), h.bracketed, h.port),
            ("mx1.legacy.example.net", false, None)
        );
        assert!("192.0.2.30".parse::<Host>().is_err());
        assert!("[192.0.2.30".parse::<Host>().is_err());
        assert!("mx:0".parse::<Host>().is_err());
    }
    #[test]
    fn destination_rules() {
        let parse = |dest: &str| {
            let yaml =
                format!("domains:\n  example.com:\n    mode: route\n    destination: {dest}\n");
            crate::config::parse(&yaml, "m.yaml")
                .map(|c| c.domains.into_values().next().unwrap().transport)
        };
        let t = parse("{ hosts: [mx.legacy.test], tls: secure, tls_match: [MX.Legacy.test, .legacy.test, nexthop] }").unwrap();
        assert_eq!(t.tls, Some(TlsLevel::Secure));
        assert_eq!(
            t.tls_policy().unwrap(),
            "secure match=mx.legacy.test:.legacy.test:nexthop"
        );
        assert_eq!(
            parse("{ domain: x.test, tls: may }")
                .unwrap()
                .tls_policy()
                .unwrap(),
            "may"
        );
        let err = |dest: &str| parse(dest).unwrap_err().to_string();
        let e = err("{ hosts: [mx.legacy.test], tls: encrypt, tls_match: [mx.legacy.test] }");
        assert!(
            e.starts_with(
                "m.yaml:4:18: domains.example.com.destination: `tls_match` needs `tls: verify`"
            ),
            "{e}"
        );
        assert!(
            err("{ hosts: [mx.legacy.test], tls: strict }").contains("unknown variant `strict`")
        );
        assert!(
            err("{ hosts: [mx.legacy.test], tls: verify, tls_match: [\"[192.0.2.1]\"] }")
                .contains("tls_match entry")
        );
        assert!(err("{ hosts: [mx.legacy.test], concurrency: 0 }").contains("at least 1"));
        assert!(
            err("{ hosts: [mx.legacy.test], concurrency: 4, rate_delay: 1s }")
                .contains("one message at a time")
        );
        let t = parse("{ hosts: [mx.legacy.test], concurrency: 1, rate_delay: 2s }").unwrap();
        assert_eq!(
            (t.concurrency, t.rate_delay.map(|w| w.0.as_secs())),
            (Some(1), Some(2))
        );
    }

    #[test]
    fn reject_unknown() {
        let parse = |mode: &str, ru: &str| {
            let yaml = format!(
                "domains:\n  example.com:\n    mode: {mode}\n    accounts: [{{ list: [a@example.com] }}]\n    destination:\n      hosts: [\"[192.0.2.30]:2525\"]\n      reject_unknown: {ru}\n"
            );
            crate::config::parse(&yaml, "m.yaml")
                .map(|c| c.domains.into_values().next().unwrap().reject_unknown)
        };
        let r = parse("split", "{ callout: true }").unwrap().unwrap();
        assert!(r.callout);
        assert!(r.accounts.is_empty());
        assert_eq!(r.unreachable, Unreachable::Tempfail);
        assert_eq!(r.cache, CalloutCache::default());
        assert_eq!(r.cache.positive.0, Duration::from_secs(7 * 86400));
        assert_eq!(r.cache.negative.0, Duration::from_secs(3 * 3600));
        let r = parse(
            "route",
            "{ accounts: [ { list: [b@example.com] } ], unreachable: accept, cache: { negative: 10m } }",
        )
        .unwrap()
        .unwrap();
        assert!(!r.callout);
        assert_eq!(r.accounts.len(), 1);
        assert_eq!(r.unreachable, Unreachable::Accept);
        assert_eq!(r.cache.negative.0, Duration::from_secs(600));
        assert_eq!(r.cache.positive, CalloutCache::default().positive);
        let err = |mode: &str, ru: &str| parse(mode, ru).unwrap_err().to_string();
        let e = err("split", "{ callout: false }");
        assert!(
            e.starts_with("m.yaml:7:23: domains.example.com.destination.reject_unknown: needs `callout: true` or `accounts`"),
            "{e}"
        );
        assert!(err("split", "{ accounts: [] }").contains("`accounts` is empty"));
        let e = err("split", "{ callout: true, unreachable: bounce }");
        assert!(
            e.starts_with("m.yaml:7:") && e.contains("unknown variant `bounce`"),
            "{e}"
        );
        let e = err("split", "{ callout: true, cache: { positive: 0d } }");
        assert!(
            e.starts_with("m.yaml:7:") && e.contains("longer than zero"),
            "{e}"
        );
        assert!(err("split", "{ callout: true, cache: { postive: 1d } }")
            .contains("unknown field `postive`"));
        let e = err("dual", "{ callout: true }");
        assert!(
            e.starts_with("m.yaml:7:23: domains.example.com.destination.reject_unknown: mode `dual` routes nothing away"),
            "{e}"
        );
    }
}
