//! What a decision says (docs/design.md, "Decision table"): the
//! [`Decision`] on a recipient, the [`Rule`] that made it as `explain` and
//! the log show it, and the SMTP replies of a refusal. How a decision is
//! made is src/decision.rs.

use crate::address::Address;
use crate::config::Mode;
use crate::holds::Hold;
use std::fmt;

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
    Redirect(RedirectTo),
    /// Refuse it at RCPT (5xx).
    Reject(Rejection),
    /// Refuse it at RCPT for now (4xx): the sender's MTA retries.
    Tempfail(Rejection),
}

/// Where a redirect sends a recipient: one address, and, when that address
/// is a mailbox of a `dual` domain, the copy a message to it gets there
/// (docs/design.md §2 rule 4: a target ends where a message to it would).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct RedirectTo {
    pub to: String,
    /// The target's own dual copy (added as a copy: `NOTIFY` after its
    /// domain's `bounce`).
    pub copy: Option<String>,
}

impl From<String> for RedirectTo {
    fn from(to: String) -> RedirectTo {
        RedirectTo { to, copy: None }
    }
}

impl From<&str> for RedirectTo {
    fn from(to: &str) -> RedirectTo {
        to.to_owned().into()
    }
}

impl fmt::Display for RedirectTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to)?;
        if let Some(copy) = &self.copy {
            f.write_str(" and copy to ")?;
            f.write_str(copy)?;
        }
        Ok(())
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Keep => f.write_str("keep"),
            // Piece by piece, not `write!`: every message's log line
            // holds its recipients' decisions and rules.
            Decision::Copy(to) => {
                f.write_str("copy to ")?;
                for (i, t) in to.iter().enumerate() {
                    f.write_str(if i == 0 { "" } else { ", " })?;
                    f.write_str(t)?;
                }
                Ok(())
            }
            Decision::Redirect(to) => {
                f.write_str("redirect to ")?;
                fmt::Display::fmt(to, f)
            }
            Decision::Reject(r) => write!(f, "reject {}", r),
            Decision::Tempfail(r) => write!(f, "tempfail {}", r),
        }
    }
}

/// Why routing for a domain is off.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Off {
    /// `enabled: false` in the configuration.
    Config,
    /// A runtime hold (src/holds/).
    Hold(Hold),
}

impl Off {
    fn cause(&self) -> &'static str {
        match self {
            Off::Config => "enabled: false in the configuration",
            Off::Hold(h) => h.cause(),
        }
    }
}

impl fmt::Display for Off {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Off::Config => f.write_str("the domain has enabled: false"),
            Off::Hold(h) => h.fmt(f),
        }
    }
}

/// What routing being off did to a recipient.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum OffEffect {
    /// It would have been kept anyway.
    Kept,
    /// It would have been copied: kept, the copy is not made.
    CopySkipped,
    /// It would have been redirected, but it has a mailbox here: kept.
    KeptInsteadOfRedirect,
    /// It would have been redirected and has no mailbox here: tempfail.
    Paused,
}

/// The rule of docs/design.md ("Decision table") that made a decision.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Rule {
    /// `<>`, no domain, or an unparsable argument outside managed domains:
    /// left alone.
    NotAnAddress,
    /// An argument of a managed domain that cannot be parsed, or that the
    /// MTA parsed into another mailbox.
    BadAddress(String),
    NotManaged,
    /// Routing for the domain is off.
    Off {
        why: Off,
        effect: OffEffect,
    },
    /// The client is a gateway: never routed again.
    Gateway {
        present: bool,
    },
    /// `require_gateway` and the client is neither gateway nor authenticated.
    RequireGateway,
    User(&'static str),
    /// A per-user rule with a target in a managed domain, decided as a
    /// message to it would be: what became of each such target.
    UserTarget {
        kind: &'static str,
        targets: Vec<String>,
    },
    Mode {
        mode: Mode,
        present: bool,
        has_accounts: bool,
    },
    /// The message already has `max_recipients` recipients (src/session.rs).
    TooManyRecipients(usize),
    /// The shrink guard refused a reload of the domain's accounts and the
    /// two lists disagree on the address (`present` in the running one).
    Disputed {
        present: bool,
        domain: String,
    },
    /// `reject_unknown.callout`: the destination's answer for the address
    /// as it arrives there (src/milter/callout.rs).
    Callout {
        address: String,
        answer: String,
    },
    /// `<postmaster>` without a domain: this MTA's own postmaster (RFC 5321
    /// §4.5.1), never routed or refused.
    Postmaster,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::NotAnAddress => f.write_str("not a routable address"),
            Rule::BadAddress(why) => write!(f, "unusable address of a managed domain: {why}"),
            Rule::NotManaged => f.write_str("domain not managed by dualroute"),
            Rule::Off { why, effect } => {
                write!(f, "routing off ({why})")?;
                match effect {
                    OffEffect::Kept => Ok(()),
                    OffEffect::CopySkipped => {
                        f.write_str(": delivered here, no copy to the destination")
                    }
                    OffEffect::KeptInsteadOfRedirect => {
                        f.write_str(": has a mailbox here, delivered here instead of redirected")
                    }
                    OffEffect::Paused => f.write_str(
                        ": no mailbox here; refused for now, the sender retries until routing resumes",
                    ),
                }
            }
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
            Rule::UserTarget { kind, targets } => {
                write!(f, "per-user rule {kind}")?;
                for t in targets {
                    f.write_str("; ")?;
                    f.write_str(t)?;
                }
                Ok(())
            }
            Rule::TooManyRecipients(limit) => {
                write!(f, "max_recipients: the message already has {limit}")
            }
            Rule::Disputed { present, domain } => write!(
                f,
                "accounts_shrink_limit refused a reload of the accounts, and the address is {} the running list but {} the refused one: refused for now until `dualroute confirm-accounts {domain}` accepts the new list or the account source is restored",
                if *present { "in" } else { "not in" },
                if *present { "not in" } else { "in" },
            ),
            Rule::Callout { address, answer } => {
                write!(f, "reject_unknown callout for <{address}>: {answer}")
            }
            Rule::Postmaster => f.write_str(
                "<postmaster> without a domain (RFC 5321 §4.5.1): the MTA's own postmaster, never routed",
            ),
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
            Rule::Mode { mode, present, .. } => {
                f.write_str("mode ")?;
                fmt::Display::fmt(mode, f)?;
                f.write_str(if *present {
                    ", account present here"
                } else {
                    ", no account here"
                })
            }
        }
    }
}

#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Verdict {
    pub decision: Decision,
    pub rule: Rule,
}

impl Verdict {
    pub(super) fn new(decision: Decision, rule: Rule) -> Verdict {
        Verdict { decision, rule }
    }
}

/// The address as shown in a reply text. libmilter's smfi_setreply: a
/// lone '%' makes Sendmail drop the text, so such addresses are not shown.
pub(super) fn shown(address: &Address) -> String {
    let a = address.to_string();
    if a.contains('%') {
        "recipient".into()
    } else {
        format!("<{a}>")
    }
}

pub(super) fn unknown_user(address: &Address) -> Rejection {
    Rejection {
        code: "550",
        xcode: "5.1.1",
        text: format!(
            "{}: Recipient address rejected: no mailbox here by that name",
            shown(address)
        ),
    }
}

pub(super) fn not_from_gateway(address: &Address) -> Rejection {
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

/// `451 4.4.4`: the recipient would be routed, routing is off and it has
/// no mailbox here. Postfix's rule for a doubtful recipient: tempfail, so
/// the sender's MTA retries and the mail arrives once routing resumes —
/// never into the catch-all (RFC 3463 X.4.4: unable to route).
/// `domain` is the recipient's own, or that of the per-user rule's target
/// that would be routed (rule 4).
pub(super) fn routing_paused(address: &Address, domain: &str, why: &Off) -> Rejection {
    Rejection {
        code: "451",
        xcode: "4.4.4",
        text: format!(
            "{}: routing of mail for {} is paused ({}); try again later",
            shown(address),
            domain,
            why.cause()
        ),
    }
}

/// `451 4.4.4`: the running and the refused account lists disagree on the
/// address (docs/design.md "Shrink guard"); the sender retries until the
/// administrator has settled which list is right.
pub(super) fn accounts_disputed(address: &Address, present: bool) -> Rejection {
    Rejection {
        code: "451",
        xcode: "4.4.4",
        text: format!(
            "{}: the mailbox list of {} is being checked (an account was {} it); try again later",
            shown(address),
            address.domain,
            if present { "removed from" } else { "added to" }
        ),
    }
}

/// `550 5.1.3` (RFC 3463: bad destination mailbox address syntax).
pub(super) fn bad_syntax() -> Rejection {
    Rejection {
        code: "550",
        xcode: "5.1.3",
        text: "Recipient address rejected: bad address syntax; write it as <local@domain>".into(),
    }
}
