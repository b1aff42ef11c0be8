//! Reading the mail log: which lines report a failed delivery, permanent
//! or temporary ([`parse_line`]), and which managed domain a failed
//! routing address belongs to ([`Attribution`]). Pure functions of text
//! and policy; the breaker (`mod.rs`) does the counting.

use crate::address::Address;
use crate::policy::Policy;
use std::collections::HashMap;

/// Whether a delivery failed for good or will be retried.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum FailureKind {
    /// A permanent failure (`threshold`): the mail bounced, or the
    /// destination refused it with a 5xx reply that `soft_bounce = yes`
    /// turned into a deferral.
    Bounce,
    /// A temporary failure (`deferrals`): the MTA will try again.
    /// Throttling of new senders looks like this (Google `421 4.7.28`,
    /// Microsoft `451 4.7.500`), and so does a destination that is down.
    Deferral,
}

/// A failed delivery as the MTA logged it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    /// The queue id the line is about (the field before `to=`), so that
    /// the retries of one deferred message count once.
    pub queue_id: String,
    /// The envelope recipients the line reports on, as logged, without
    /// angle brackets. Postfix logs one per line; Sendmail may log several
    /// (`to=<a@x>,<b@x>`) when it delivered them in one transaction.
    pub recipients: Vec<String>,
    /// The enhanced status code (RFC 3463), e.g. `5.1.1`.
    pub dsn: String,
    /// A permanent failure that says the destination has no such mailbox
    /// ([`unknown_mailbox`]): it is about the address, not the
    /// destination, and the breaker counts it only for an address the
    /// destination must have ([`Attribution::expected`]).
    pub unknown_mailbox: bool,
    /// The whole line, for the administrator.
    pub line: String,
}

/// Parses one delivery line of Postfix or Sendmail and returns it when it
/// reports a failure:
///
/// - Postfix: `postfix/smtp[123]: QID: to=<a@b>, orig_to=<…>, relay=…,
///   delay=…, delays=…, dsn=5.1.1, status=bounced (…)`. `status=bounced`
///   with a `5.x.x` dsn is a bounce; `status=deferred` with a `4.x.x` dsn
///   a deferral — unless the text quotes a 5xx reply of the other server
///   (`host … said: 550 5.1.1 …`): with `soft_bounce = yes` Postfix logs a
///   permanent refusal as deferred with a 4.x.x dsn and keeps the mail
///   queued, but the destination has refused it for good, so it is a
///   bounce for the breaker.
/// - Sendmail: `sendmail[123]: QID: to=<a@b>, delay=…, xdelay=…,
///   mailer=esmtp, pri=…, relay=…, dsn=5.1.1, stat=User unknown`. A `5.x.x`
///   dsn with a `stat=` other than `Sent` or `Deferred` is a bounce;
///   `stat=Deferred…` with a `4.x.x` dsn a deferral (the same rule for a
///   quoted 5xx reply).
///
/// Both put the queue id and `: to=` first, which also keeps out the
/// `NOQUEUE: reject: … from=<…> to=<…>` lines of refused RCPTs (a refusal
/// at RCPT time reaches the client, not a bounce).
pub fn parse_line(line: &str) -> Option<Failure> {
    let line = line.trim_end_matches(['\r', '\n']);
    let at = line.find(": to=")?;
    let queue_id = line[..at].rsplit(' ').next().unwrap_or_default();
    let rest = &line[at + ": to=".len()..];
    // Fields are separated by ", "; within `to=` Sendmail separates
    // recipients by "," alone.
    let mut fields = rest.split(", ");
    let to = fields.next()?;
    let mut dsn = None;
    let mut outcome = None;
    // From the dsn on: Postfix's outcome and reply text; Sendmail 8.17's
    // `reply=` (the other server's words) and `stat=`.
    let mut text = "";
    for field in fields {
        if let Some(v) = field.strip_prefix("dsn=") {
            if dsn.is_none() {
                text = rest_from(rest, field);
            }
            dsn.get_or_insert(v);
        } else if let Some(v) = field.strip_prefix("status=") {
            // Postfix: the last field; its text may contain anything.
            outcome = Some(match v.split(' ').next() {
                Some("bounced") => Outcome::Failed,
                Some("deferred") => {
                    Outcome::Deferred(v.split_once(" said: ").and_then(|(_, r)| reply_code(r)))
                }
                _ => Outcome::Other,
            });
            break;
        } else if let Some(v) = field.strip_prefix("stat=") {
            outcome = Some(if v.starts_with("Sent") {
                Outcome::Other
            } else if let Some(text) = v.strip_prefix("Deferred") {
                Outcome::Deferred(reply_code(text.trim_start_matches([':', ' '])))
            } else {
                Outcome::Failed
            });
            break;
        }
    }
    let dsn = dsn?;
    let kind = match (outcome?, dsn_class(dsn)?) {
        (Outcome::Failed, '5') => FailureKind::Bounce,
        (Outcome::Deferred(Some('5')), '4') => FailureKind::Bounce,
        (Outcome::Deferred(_), '4') => FailureKind::Deferral,
        _ => return None,
    };
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
    if recipients.is_empty() || queue_id.is_empty() {
        return None;
    }
    Some(Failure {
        kind,
        queue_id: queue_id.to_owned(),
        recipients,
        unknown_mailbox: kind == FailureKind::Bounce && unknown_mailbox(dsn, text),
        dsn: dsn.to_owned(),
        line: line.to_owned(),
    })
}

/// `rest` from where `part`, a field `split` out of it, starts, to its
/// end: the reply text may itself contain ", ". (`split` gives no
/// offsets; a sub-slice's address does.)
fn rest_from<'a>(rest: &'a str, part: &'a str) -> &'a str {
    let at = (part.as_ptr() as usize).saturating_sub(rest.as_ptr() as usize);
    rest.get(at..).unwrap_or(part)
}

/// Whether a permanent failure with enhanced status `dsn` and outcome
/// `text` says that the destination has no such mailbox — which is
/// about the address, not the destination (docs/design.md §7, "What the
/// breaker counts"):
///
/// - `X.1.1` "bad destination mailbox address" and `X.1.6` "destination
///   mailbox has moved" (RFC 3463 §3.2): Postfix's "User unknown in
///   virtual mailbox table", Sendmail's `dsn=5.1.1` (its `stat=User
///   unknown` is not read: Sendmail writes it for any 550 at RCPT,
///   relay denied included), Google's
///   "The email account that you tried to reach does not exist",
///   Microsoft's `5.1.1 RESOLVER.ADR.RecipNotFound`. (`soft_bounce`
///   turns the class into 4 and keeps subject and detail: `4.1.1`.)
/// - `X.1.0` "other address status" only with a text that says so ("user
///   unknown", "no such user", "unknown user"): Postfix answers `5.1.0`
///   for an unknown *sender* too ("Sender address rejected: User
///   unknown"), and a destination that refuses our senders refuses all
///   routed mail. "Recipient address rejected" alone is not enough: it
///   begins every Postfix recipient restriction's reply, access denied
///   included.
/// - `X.1.10` only as Microsoft 365 uses it ("RecipientNotFound"): RFC
///   7505 gave `X.1.10` to a null MX, which is a destination that takes
///   no mail at all.
///
/// Everything else counts, `X.1.2` (the destination does not know the
/// domain), `X.2.x` (mailbox disabled or full: an existing mailbox, and
/// "disabled" for every user is an expired subscription) and `X.7.x`
/// (relay or policy denied) included.
fn unknown_mailbox(dsn: &str, text: &str) -> bool {
    let mut parts = dsn.splitn(2, '.').skip(1);
    let text = text.to_ascii_lowercase();
    let says = |words: &[&str]| words.iter().any(|w| text.contains(w));
    match parts.next().unwrap_or_default() {
        "1.1" | "1.6" => true,
        "1.0" => {
            !says(&["sender address"]) && says(&["user unknown", "no such user", "unknown user"])
        }
        "1.10" => says(&["recipientnotfound"]),
        _ => false,
    }
}

/// What a delivery line says happened.
enum Outcome {
    Failed,
    /// Deferred, with the class of the other server's reply when the line
    /// quotes one.
    Deferred(Option<char>),
    Other,
}

/// The class digit of an SMTP reply at the start of `text` (`550 5.1.1
/// …` → `5`), if it starts with one.
fn reply_code(text: &str) -> Option<char> {
    let code = text.get(..4)?;
    let mut c = code.chars();
    let class = c.next().filter(|d| matches!(d, '2'..='5'))?;
    (c.next()?.is_ascii_digit() && c.next()?.is_ascii_digit() && matches!(c.next()?, ' ' | '-'))
        .then_some(class)
}

/// The class of an enhanced status code `C.X.Y` (RFC 3463 §2: 4 is a
/// temporary failure, 5 a permanent one), if it is well formed.
fn dsn_class(dsn: &str) -> Option<char> {
    let mut parts = dsn.split('.');
    let class = parts.next()?;
    let num = |p: Option<&str>| {
        p.is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    };
    if !(num(parts.next()) && num(parts.next()) && parts.next().is_none()) {
        return None;
    }
    match class {
        "2" => Some('2'),
        "4" => Some('4'),
        "5" => Some('5'),
        _ => None,
    }
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

/// Why the destination of a managed domain must know an address: a
/// "no such mailbox" answer for it is then a broken destination (its
/// directory lost its users, the accounts were never created there), not
/// an address a spammer made up, and counts (docs/design.md §7).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Expected {
    /// The domain's `verify:` address, which the destination accepted
    /// before routing began.
    Verify,
    /// The address has a mailbox here (in the domain's accounts; in a
    /// `dual` domain without accounts, every address the MTA accepted):
    /// its copy or its routed mail goes to a user who exists, and who
    /// must exist there too.
    Mailbox,
    /// A per-user `copy_to`/`redirect_to` target: the administrator
    /// named it in milter.yaml.
    Target,
    /// The destination's own address list (`reject_unknown.accounts`)
    /// names it: the destination said it has this address, and the
    /// milter routed it on that word.
    Listed,
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expected::Verify => "it is the domain's `verify` address",
            Expected::Mailbox => "it has a mailbox here, so the destination must know it",
            Expected::Target => "it is a `copy_to`/`redirect_to` target in the configuration",
            Expected::Listed => {
                "the destination's own address list (reject_unknown.accounts) names it"
            }
        })
    }
}

impl Attribution {
    /// Why the destination of `domain` must know `recipient`, a routing
    /// address of `domain` as logged ([`Attribution::domains`]), if it
    /// must; `None` for an address nobody here vouches for (a split
    /// address without a mailbox here, any address of a route domain
    /// without accounts, not in the destination's own list), whose "user
    /// unknown" is not counted.
    pub fn expected(&self, policy: &Policy, domain: &str, recipient: &str) -> Option<Expected> {
        if let Some((local, at)) = recipient.rsplit_once('@') {
            let key = target_key(local, &at.trim_end_matches('.').to_ascii_lowercase());
            if self
                .targets
                .get(&key)
                .is_some_and(|d| d.iter().any(|d| d == domain))
            {
                return Some(Expected::Target);
            }
        }
        let d = policy.domains.get(domain)?;
        let address = Address::parse(recipient.trim_end_matches('.')).ok()?;
        // The address as it arrives there (docs/design.md §4): the relay
        // domain is the managed domain again after `smtp_generic_maps`; a
        // `change_envelope` address arrives as it is.
        let arrives_at = match d.relay_domain(&policy.config.relay_suffix.0) {
            Some(relay) if relay == address.domain => d.name.as_str(),
            _ => address.domain.as_str(),
        };
        let key = policy.rules.key(&address.unquoted_local()).into_owned();
        if d.config
            .verify
            .as_ref()
            .is_some_and(|v| v.domain == arrives_at && policy.rules.key(&v.unquoted_local()) == key)
        {
            return Some(Expected::Verify);
        }
        if policy.present(d, &key) {
            return Some(Expected::Mailbox);
        }
        // The lookup the milter made at RCPT (the local part only, as
        // accounts are looked up), so that both agree on what is listed.
        crate::callout::listed(policy, d, recipient)
            .is_some_and(|a| a.verdict == crate::callout::Verdict::Known)
            .then_some(Expected::Listed)
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
    fn dsn_classes() {
        for (dsn, class) in [
            ("5.1.1", '5'),
            ("5.0.0", '5'),
            ("4.7.28", '4'),
            ("5.100.999", '5'),
            ("2.0.0", '2'),
        ] {
            assert_eq!(dsn_class(dsn), Some(class), "{dsn}");
        }
        for not in [
            "3.1.1", "5.1", "5.1.1.1", "5..1", "5.1.x", "5.1000.1", "55.1.1", "",
        ] {
            assert_eq!(dsn_class(not), None, "{not}");
        }
    }

    #[test]
    fn reply_codes() {
        assert_eq!(reply_code("550 5.1.1 unknown"), Some('5'));
        assert_eq!(reply_code("421-4.7.28 slow down"), Some('4'));
        assert_eq!(reply_code("Connection refused"), None);
        assert_eq!(reply_code("55"), None);
        assert_eq!(reply_code("650 x"), None);
    }
}
