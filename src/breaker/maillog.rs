//! Reading the mail log: which lines report a permanent delivery failure
//! ([`parse_line`]), and which managed domain a failed routing address
//! belongs to ([`Attribution`]). Pure functions of text and policy; the
//! breaker (`mod.rs`) does the counting.

use crate::policy::Policy;
use std::collections::HashMap;

/// A permanent delivery failure as the MTA logged it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Failure {
    /// The envelope recipients the line reports on, as logged, without
    /// angle brackets. Postfix logs one per line; Sendmail may log several
    /// (`to=<a@x>,<b@x>`) when it delivered them in one transaction.
    pub recipients: Vec<String>,
    /// The enhanced status code (RFC 3463), e.g. `5.1.1`.
    pub dsn: String,
    /// The whole line, for the administrator.
    pub line: String,
}

/// Parses one delivery line of Postfix or Sendmail and returns it when it
/// reports a permanent failure:
///
/// - Postfix: `postfix/smtp[123]: QID: to=<a@b>, orig_to=<…>, relay=…,
///   delay=…, delays=…, dsn=5.1.1, status=bounced (…)`. Only
///   `status=bounced` with a `5.x.x` dsn: `deferred` is a temporary
///   failure, and with `soft_bounce = yes` Postfix logs 5xx replies as
///   deferred with a 4.x.x dsn (they are retried, nothing bounces).
/// - Sendmail: `sendmail[123]: QID: to=<a@b>, delay=…, xdelay=…,
///   mailer=esmtp, pri=…, relay=…, dsn=5.1.1, stat=User unknown`. A `5.x.x`
///   dsn with a `stat=` other than `Sent` or `Deferred`.
///
/// Both put the queue id and `: to=` first, which also keeps out the
/// `NOQUEUE: reject: … from=<…> to=<…>` lines of refused RCPTs (a refusal
/// at RCPT time reaches the client, not a bounce).
pub fn parse_line(line: &str) -> Option<Failure> {
    let line = line.trim_end_matches(['\r', '\n']);
    let at = line.find(": to=")?;
    let rest = &line[at + ": to=".len()..];
    // Fields are separated by ", "; within `to=` Sendmail separates
    // recipients by "," alone.
    let mut fields = rest.split(", ");
    let to = fields.next()?;
    let mut dsn = None;
    let mut permanent = None;
    for field in fields {
        if let Some(v) = field.strip_prefix("dsn=") {
            dsn.get_or_insert(v);
        } else if let Some(v) = field.strip_prefix("status=") {
            // Postfix: the last field; its text may contain anything.
            permanent = Some(v.split(' ').next() == Some("bounced"));
            break;
        } else if let Some(v) = field.strip_prefix("stat=") {
            permanent = Some(!(v.starts_with("Sent") || v.starts_with("Deferred")));
            break;
        }
    }
    let dsn = dsn?;
    if permanent != Some(true) || !is_permanent_dsn(dsn) {
        return None;
    }
    let recipients: Vec<String> = to
        .split(',')
        .map(|r| {
            r.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
        .filter(|r| !r.is_empty())
        .collect();
    if recipients.is_empty() {
        return None;
    }
    Some(Failure {
        recipients,
        dsn: dsn.to_owned(),
        line: line.to_owned(),
    })
}

/// `5.X.Y` (RFC 3463 §2: class 5 is a permanent failure).
fn is_permanent_dsn(dsn: &str) -> bool {
    let mut parts = dsn.split('.');
    parts.next() == Some("5")
        && parts
            .next()
            .is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        && parts
            .next()
            .is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        && parts.next().is_none()
}

/// Maps routing addresses back to the managed domain that produced them
/// (docs/design.md §4):
/// - `local@<domain>.<relay_suffix>` → domain;
/// - `local@D` where D is the `change_envelope` destination of one or more
///   domains → those domains (several domains may share a destination, and
///   the address alone cannot tell them apart);
/// - a per-user `copy_to`/`redirect_to` target → the user's domain (and
///   only that: other mail to the target's domain is not ours).
///
/// Any other address is not routed mail and is ignored.
#[derive(Clone, Debug, Default)]
pub struct Attribution {
    relay_domains: HashMap<String, String>,
    envelope_domains: HashMap<String, Vec<String>>,
    targets: HashMap<String, Vec<String>>,
}

impl Attribution {
    pub fn new(policy: &Policy) -> Attribution {
        let suffix = &policy.config.relay_suffix.0;
        let mut a = Attribution::default();
        let mut names: Vec<&String> = policy.domains.keys().collect();
        names.sort();
        for name in names {
            let d = &policy.domains[name];
            match d.relay_domain(suffix) {
                Some(relay) => {
                    a.relay_domains.insert(relay, name.clone());
                }
                None => {
                    if let crate::config::Destination::Domain { domain, .. } = &d.config.destination
                    {
                        a.envelope_domains
                            .entry(domain.0.clone())
                            .or_default()
                            .push(name.clone());
                    }
                }
            }
            for (_, rule) in &d.config.users {
                let targets: Vec<&crate::address::Address> = match rule {
                    crate::config::UserRule::CopyTo(to) => to.iter().collect(),
                    crate::config::UserRule::RedirectTo(to) => vec![to],
                    crate::config::UserRule::Keep => Vec::new(),
                };
                for t in targets {
                    let owners = a
                        .targets
                        .entry(target_key(&t.local, &t.domain))
                        .or_default();
                    if !owners.contains(name) {
                        owners.push(name.clone());
                    }
                }
            }
        }
        a
    }

    /// The managed domains whose routing produced `recipient` (as logged);
    /// empty for mail that was not routed by us.
    pub fn domains(&self, recipient: &str) -> &[String] {
        let Some((local, domain)) = recipient.rsplit_once('@') else {
            return &[];
        };
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if let Some(owners) = self.targets.get(&target_key(local, &domain)) {
            return owners;
        }
        if let Some(owner) = self.relay_domains.get(&domain) {
            return std::slice::from_ref(owner);
        }
        self.envelope_domains
            .get(&domain)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// Local parts compared without case: the log shows the address as the
/// milter added it, but a configuration may spell a target's local part
/// in another case than an administrator expects to matter.
fn target_key(local: &str, domain: &str) -> String {
    format!("{}@{domain}", local.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_dsn_codes() {
        for ok in ["5.1.1", "5.0.0", "5.7.26", "5.100.999"] {
            assert!(is_permanent_dsn(ok), "{ok}");
        }
        for not in [
            "4.1.1", "2.0.0", "5.1", "5.1.1.1", "5..1", "5.1.x", "5.1000.1", "55.1.1", "",
        ] {
            assert!(!is_permanent_dsn(not), "{not}");
        }
    }
}
