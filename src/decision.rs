//! The decision for one recipient (DESIGN.md §2): a pure function of the
//! policy, the envelope facts and the address, returning what to do and the
//! rule that said so. The milter and `dualroute explain` both call
//! [`decide`], so what `explain` prints is what the milter does.

use crate::address::Address;
use crate::config::{Mode, UserRule};
use crate::policy::Policy;
use std::{fmt, net::IpAddr};

/// Facts about the SMTP session that the decision depends on.
#[derive(Clone, Debug, Default)]
pub struct Envelope {
    /// The client's address, from the connect stage.
    pub client: Option<IpAddr>,
    /// The `{auth_authen}` macro: the SASL login name, when authenticated.
    pub auth: Option<String>,
}

/// A refusal at RCPT time.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Rejection {
    pub code: &'static str,
    pub xcode: &'static str,
    pub text: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.code, self.xcode, self.text)
    }
}

#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Decision {
    /// Leave the recipient exactly as the MTA has it.
    Keep,
    /// Keep it and add these routing addresses.
    Copy(Vec<String>),
    /// Delete it and add this routing address.
    Redirect(String),
    /// Refuse it at RCPT.
    Reject(Rejection),
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Keep => f.write_str("keep"),
            Decision::Copy(to) => write!(f, "copy to {}", to.join(", ")),
            Decision::Redirect(to) => write!(f, "redirect to {to}"),
            Decision::Reject(r) => write!(f, "reject {}", r),
        }
    }
}

/// The rule of DESIGN.md §2 that made a decision.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Rule {
    /// `<>`, no domain, or unparsable: left alone.
    NotAnAddress,
    NotManaged,
    Disabled,
    /// Routing is held back at run time (waiting for verification).
    Held(String),
    /// The client is a gateway: never routed again.
    Gateway {
        present: bool,
    },
    /// `require_gateway` and the client is neither gateway nor authenticated.
    RequireGateway,
    User(&'static str),
    Mode {
        mode: Mode,
        present: bool,
        has_accounts: bool,
    },
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::NotAnAddress => f.write_str("not a routable address"),
            Rule::NotManaged => f.write_str("domain not managed by dualroute"),
            Rule::Disabled => f.write_str("domain has enabled: false"),
            Rule::Held(why) => write!(f, "routing held: {why}"),
            Rule::Gateway { present: true } => {
                f.write_str("client is a gateway: mail it relays is not routed again")
            }
            Rule::Gateway { present: false } => {
                f.write_str("client is a gateway and the address has no mailbox here")
            }
            Rule::RequireGateway => {
                f.write_str("require_gateway: client is neither a gateway nor authenticated")
            }
            Rule::User(kind) => write!(f, "per-user rule {kind}"),
            Rule::Mode {
                mode,
                present: _,
                has_accounts: false,
            } if *mode == Mode::Dual => {
                write!(
                    f,
                    "mode dual, no accounts configured: every accepted address counts as present"
                )
            }
            Rule::Mode {
                mode,
                present: _,
                has_accounts: false,
            } => write!(f, "mode {mode}"),
            Rule::Mode {
                mode,
                present: true,
                ..
            } => write!(f, "mode {mode}, account present here"),
            Rule::Mode {
                mode,
                present: false,
                ..
            } => write!(f, "mode {mode}, no account here"),
        }
    }
}

#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Verdict {
    pub decision: Decision,
    pub rule: Rule,
}

impl Verdict {
    fn new(decision: Decision, rule: Rule) -> Verdict {
        Verdict { decision, rule }
    }
}

/// The address as shown in a reply text. libmilter's smfi_setreply: a
/// lone '%' makes Sendmail drop the text, so such addresses are not shown.
fn shown(address: &Address) -> String {
    let a = address.to_string();
    if a.contains('%') {
        "recipient".into()
    } else {
        format!("<{a}>")
    }
}

fn unknown_user(address: &Address) -> Rejection {
    Rejection {
        code: "550",
        xcode: "5.1.1",
        text: format!(
            "{}: Recipient address rejected: no mailbox here by that name",
            shown(address)
        ),
    }
}

fn not_from_gateway(address: &Address) -> Rejection {
    Rejection {
        code: "550",
        xcode: "5.7.1",
        text: format!(
            "{}: Recipient address rejected: mail for {} is accepted only through its designated gateway",
            shown(address),
            address.domain
        ),
    }
}

/// Looks a local part up the way Postfix does with `recipient_delimiter`:
/// the full comparison key first, then its base (`bob+news` → `bob`).
fn lookup<'k, T>(policy: &Policy, key: &'k str, get: impl Fn(&'k str) -> Option<T>) -> Option<T> {
    get(key).or_else(|| policy.rules.base(key).and_then(get))
}

/// Decides what happens to one recipient.
pub fn decide(policy: &Policy, envelope: &Envelope, address: Option<&Address>) -> Verdict {
    let Some(address) = address else {
        return Verdict::new(Decision::Keep, Rule::NotAnAddress);
    };
    // 1. Not ours, or switched off: transparent.
    let Some(domain) = policy.domain(address) else {
        return Verdict::new(Decision::Keep, Rule::NotManaged);
    };
    if !domain.config.enabled {
        return Verdict::new(Decision::Keep, Rule::Disabled);
    }
    // Held domains behave as `enabled: false` (DESIGN.md §7).
    if let Some(why) = policy.holds.reason(&domain.name) {
        return Verdict::new(Decision::Keep, Rule::Held(why));
    }
    let unquoted = address.unquoted_local();
    let key = policy.rules.key(&unquoted);
    // Without `accounts`, every address the MTA accepted counts as present
    // (DESIGN.md §2, dual row).
    let present = match &domain.accounts {
        Some(accounts) => lookup(policy, &key, |k| accounts.contains(k).then_some(())).is_some(),
        None => true,
    };
    // 2. A gateway relays to us on purpose; sending its mail back out
    // would loop.
    let gateway = envelope.client.is_some_and(|ip| policy.is_gateway(ip));
    if gateway {
        return if present {
            Verdict::new(Decision::Keep, Rule::Gateway { present: true })
        } else {
            Verdict::new(
                Decision::Reject(unknown_user(address)),
                Rule::Gateway { present: false },
            )
        };
    }
    // 3. Lock-down: only the gateway or our own authenticated users.
    if domain.config.require_gateway && envelope.auth.as_deref().is_none_or(str::is_empty) {
        return Verdict::new(
            Decision::Reject(not_from_gateway(address)),
            Rule::RequireGateway,
        );
    }
    // 4. Per-user rules.
    if let Some(rule) = lookup(policy, &key, |k| domain.users.get(k)) {
        return match rule {
            UserRule::Keep => Verdict::new(Decision::Keep, Rule::User("keep")),
            UserRule::CopyTo(to) => Verdict::new(
                Decision::Copy(to.iter().map(ToString::to_string).collect()),
                Rule::User("copy_to"),
            ),
            UserRule::RedirectTo(to) => Verdict::new(
                Decision::Redirect(to.to_string()),
                Rule::User("redirect_to"),
            ),
        };
    }
    // 5. The mode's row.
    let mode = domain.config.mode;
    let rule = Rule::Mode {
        mode,
        present,
        has_accounts: domain.accounts.is_some(),
    };
    let routed = || domain.routing_address(&address.local, &policy.config.relay_suffix.0);
    let decision = match (mode, present) {
        (Mode::Split, true) => Decision::Keep,
        (Mode::Split, false) | (Mode::Route, _) => Decision::Redirect(routed()),
        (Mode::Dual, true) => Decision::Copy(vec![routed()]),
        (Mode::Dual, false) => Decision::Reject(unknown_user(address)),
    };
    Verdict::new(decision, rule)
}
