//! The decision for one recipient (docs/design.md, "Decision table"): a pure
//! function of the policy, the runtime holds, the envelope facts and the
//! address, returning what to do and the rule that said so. The milter and
//! `dualroute explain` both call [`decide_rcpt`], so what `explain` prints
//! is what the milter does.
//!
//! The vocabulary of the answer (the decision, the rule, the replies) is
//! src/decision/verdict.rs.

mod verdict;

use verdict::{
    accounts_disputed, bad_syntax, not_from_gateway, routing_paused, shown, unknown_user,
};
pub use verdict::{Decision, Off, OffEffect, RedirectTo, Rejection, Rule, Verdict};

use crate::address::{loose_domain, Address, RcptArg};
use crate::config::{Mode, UserRule};
use crate::holds::Holds;
use crate::policy::{DomainPolicy, Policy};
use std::net::IpAddr;

/// Facts about the SMTP session that the decision depends on.
#[derive(Clone, Debug, Default)]
pub struct Envelope {
    /// The client's address, from the connect stage.
    pub client: Option<IpAddr>,
    /// The `{auth_authen}` macro: the SASL login name, when authenticated.
    pub auth: Option<String>,
}

/// Looks a local part up the way Postfix does with `recipient_delimiter`:
/// the full comparison key first, then its base (`bob+news` → `bob`).
fn lookup<'k, T>(policy: &Policy, key: &'k str, get: impl Fn(&'k str) -> Option<T>) -> Option<T> {
    get(key).or_else(|| policy.rules.base(key).and_then(get))
}

/// Decides what happens to one RCPT: `arg` is the argument as received,
/// `mta` the MTA's own parse of it when it gives one (Postfix: the
/// `{rcpt_addr}` macro at RCPT).
///
/// The decision is made on the mailbox the MTA will deliver to. The milter
/// parses the argument itself and checks that parse against the MTA's: a
/// recipient of a managed domain whose argument cannot be parsed, or whose
/// parse names another mailbox than the MTA's, is refused `550 5.1.3` —
/// Postfix normalises `<alice@example.com@>` or `<<bob@example.com>>` into
/// real mailboxes, and keeping what the milter cannot read would let such
/// forms past `require_gateway` or into the catch-all.
pub fn decide_rcpt(
    policy: &Policy,
    holds: &Holds,
    envelope: &Envelope,
    arg: &RcptArg,
    mta: Option<&str>,
) -> Verdict {
    // RFC 5321 §4.5.1: every server accepts `<postmaster>` without a
    // domain, for its own postmaster. Postfix delivers it to
    // postmaster@$myorigin (docs/design.md §3): kept as the MTA has it,
    // never routed to the other server's postmaster, never refused.
    if arg.is_postmaster() {
        return Verdict::new(Decision::Keep, Rule::Postmaster);
    }
    // An unqualified path (`<zed>`) is decided on the mailbox the MTA
    // delivers it to (src/session.rs qualifies it at RCPT already; this is
    // for `explain`).
    let qualified;
    let arg = if arg.address.is_none() {
        let mut a = arg.clone();
        a.qualify(mta);
        qualified = a;
        &qualified
    } else {
        arg
    };
    // An `{rcpt_addr}` without '@' is not a mailbox: Sendmail gives the
    // local user name for its local mailer. Then only our own parse counts.
    let mta = mta.map(str::trim).filter(|m| m.contains('@'));
    // The usual case: the MTA's text is the argument's mailbox as it
    // stands (`<bob@example.com>` and `bob@example.com`), which parses as
    // ours did. Not parsed twice: this runs for every RCPT.
    if let (Some(ours), Some(m)) = (&arg.address, mta) {
        if arg.original_mailbox() == Some(m) {
            return decide(policy, holds, envelope, Some(ours));
        }
    }
    let theirs = mta.map(Address::parse);
    let managed = |a: &Address| policy.domain(a).is_some();
    match (&arg.address, theirs) {
        (Some(ours), Some(Ok(theirs))) if !same_mailbox(ours, &theirs) => {
            if managed(ours) || managed(&theirs) {
                Verdict::new(
                    Decision::Reject(bad_syntax()),
                    Rule::BadAddress(format!(
                        "the MTA reads {} as {theirs}, dualroute as {ours}",
                        arg.raw
                    )),
                )
            } else {
                Verdict::new(Decision::Keep, Rule::NotManaged)
            }
        }
        (Some(ours), Some(Err(e))) if managed(ours) => Verdict::new(
            Decision::Reject(bad_syntax()),
            Rule::BadAddress(format!("the MTA's form of {} is unusable: {e}", arg.raw)),
        ),
        (Some(ours), _) => decide(policy, holds, envelope, Some(ours)),
        (None, theirs) => {
            let domain = match theirs {
                Some(Ok(a)) => Some(a.domain),
                _ => loose_domain(&arg.raw),
            };
            match domain {
                Some(d) if policy.domains.contains_key(&d) => Verdict::new(
                    Decision::Reject(bad_syntax()),
                    Rule::BadAddress(format!("cannot parse {} (domain {d})", arg.raw)),
                ),
                _ => decide(policy, holds, envelope, None),
            }
        }
    }
}

/// Whether two parses name the same mailbox: same domain, same local part
/// without quoting, compared without case (Postfix's table lookups fold
/// case; a difference in case alone is no reason to refuse mail).
fn same_mailbox(a: &Address, b: &Address) -> bool {
    let fold = |s: &str| s.chars().flat_map(char::to_lowercase).collect::<Vec<_>>();
    let (x, y) = (a.unquoted_local(), b.unquoted_local());
    a.domain == b.domain && (x.eq_ignore_ascii_case(&y) || fold(&x) == fold(&y))
}

/// Decides what happens to one recipient, given the mailbox.
pub fn decide(
    policy: &Policy,
    holds: &Holds,
    envelope: &Envelope,
    address: Option<&Address>,
) -> Verdict {
    let Some(address) = address else {
        return Verdict::new(Decision::Keep, Rule::NotAnAddress);
    };
    // 1. Not ours: transparent.
    let Some(domain) = policy.domain(address) else {
        return Verdict::new(Decision::Keep, Rule::NotManaged);
    };
    let unquoted = address.unquoted_local();
    let key = policy.rules.key(&unquoted);
    // Without `accounts`, every address the MTA accepted counts as present
    // (dual row of the table).
    let present = policy.present(domain, &key);
    let gateway = envelope.client.is_some_and(|ip| policy.is_gateway(ip));
    let locked_out = domain.config.require_gateway
        && !gateway
        && envelope.auth.as_deref().is_none_or(str::is_empty);
    // Neither account list is trusted while the shrink guard refuses a
    // reload of the domain's accounts (docs/design.md "Shrink guard"): an
    // address the running and the refused lists disagree on is neither
    // kept (Postfix may no longer have its mailbox: the catch-all) nor
    // routed away (it may have one now). The lock-down still refuses.
    if let Some(refused) = holds.disputed(&domain.name) {
        let there = lookup(policy, &key, |k| refused.contains(k).then_some(())).is_some();
        if there != present && !locked_out {
            return Verdict::new(
                Decision::Tempfail(accounts_disputed(address, present)),
                Rule::Disputed {
                    present,
                    domain: domain.name.clone(),
                },
            );
        }
    }
    // 1. Routing off (enabled: false, or held at run time).
    let off = if !domain.config.enabled {
        Some(Off::Config)
    } else {
        holds
            .get_for(&domain.name, &domain.config)
            .cloned()
            .map(Off::Hold)
    };
    if let Some(why) = off {
        // The lock-down is access control, not routing: pausing routing
        // must not open the domain to clients that bypass its gateway.
        if locked_out {
            return Verdict::new(
                Decision::Reject(not_from_gateway(address)),
                Rule::RequireGateway,
            );
        }
        let routed = route(policy, holds, domain, &key, present, address);
        // A tempfail from rule 4 is a redirect whose target cannot be
        // reached now: with this domain's routing off it is a redirect
        // like any other.
        let (decision, effect) = match routed.decision {
            Decision::Reject(_) => return routed,
            Decision::Keep => (Decision::Keep, OffEffect::Kept),
            Decision::Copy(_) => (Decision::Keep, OffEffect::CopySkipped),
            Decision::Redirect(_) | Decision::Tempfail(_) if present => {
                (Decision::Keep, OffEffect::KeptInsteadOfRedirect)
            }
            Decision::Redirect(_) | Decision::Tempfail(_) => (
                Decision::Tempfail(routing_paused(address, &address.domain, &why)),
                OffEffect::Paused,
            ),
        };
        return Verdict::new(decision, Rule::Off { why, effect });
    }
    // 2. A gateway relays to us on purpose; sending its mail back out
    // would loop.
    if gateway {
        let present = domain.accounts.is_none() || present;
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
    if locked_out {
        return Verdict::new(
            Decision::Reject(not_from_gateway(address)),
            Rule::RequireGateway,
        );
    }
    route(policy, holds, domain, &key, present, address)
}

/// Rules 4 and 5: the per-user rule, else the mode's row.
fn route(
    policy: &Policy,
    holds: &Holds,
    domain: &DomainPolicy,
    key: &str,
    present: bool,
    address: &Address,
) -> Verdict {
    // 4. Per-user rules.
    if let Some(rule) = lookup(policy, key, |k| domain.users.get(k)) {
        return match rule {
            UserRule::Keep => Verdict::new(Decision::Keep, Rule::User("keep")),
            UserRule::CopyTo(to) => copy_to(policy, holds, to),
            UserRule::RedirectTo(to) => redirect_to(policy, holds, address, to),
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
        (Mode::Split, false) | (Mode::Route, _) => Decision::Redirect(routed().into()),
        (Mode::Dual, true) => Decision::Copy(vec![routed()]),
        (Mode::Dual, false) => Decision::Reject(unknown_user(address)),
    };
    Verdict::new(decision, rule)
}

/// What a per-user rule's target becomes (docs/design.md §2 rule 4).
enum Target {
    /// Delivered as written: outside the managed domains, or a mailbox
    /// here (kept by its domain's row or its own `keep: true`); `copy` is
    /// a `dual` domain's copy of it, while routing is on.
    Itself { copy: Option<String> },
    /// Routed to its domain's destination: its routing address.
    Routed(String),
    /// It would be routed, and routing for its domain is off.
    Paused { domain: String, why: Off },
    /// A `dual` address without a mailbox here: a message to it is
    /// refused. `Policy::load` refuses a rule that names one, so this is
    /// only met by a policy built otherwise.
    Refused,
}

/// Decides a per-user rule's target as a message to it would be decided,
/// and says how when the target is in a managed domain. A recipient the
/// milter adds skips the milter (docs/design.md §8), so nothing would
/// decide it later: Postfix would deliver a split or route address
/// without a mailbox here into the catch-all. The target's own
/// `copy_to`/`redirect_to` is not followed (chains and loops are refused
/// at load, src/policy.rs).
fn target(policy: &Policy, holds: &Holds, t: &Address) -> (Target, Option<String>) {
    let Some(d) = policy.domain(t) else {
        return (Target::Itself { copy: None }, None);
    };
    let unquoted = t.unquoted_local();
    let key = policy.rules.key(&unquoted);
    let kept = matches!(
        lookup(policy, &key, |k| d.users.get(k)),
        Some(UserRule::Keep)
    );
    let present = policy.present(d, &key);
    // Routing off for the target's domain is routing off for it, exactly
    // as for a recipient of that domain (rule 1).
    let off = if !d.config.enabled {
        Some(Off::Config)
    } else {
        holds.get(&d.name).cloned().map(Off::Hold)
    };
    let mode = d.config.mode;
    let routed = || d.routing_address(&t.local, &policy.config.relay_suffix.0);
    let (fate, note) = match (mode, off) {
        _ if kept => (
            Target::Itself { copy: None },
            format!("{t}: kept here by its own rule keep: true"),
        ),
        (Mode::Split, _) if present => (
            Target::Itself { copy: None },
            format!("{t}: has a mailbox here"),
        ),
        (Mode::Dual, None) if present => (
            Target::Itself {
                copy: Some(routed()),
            },
            format!(
                "{t}: has a mailbox here, and mode dual of {} copies it to the destination",
                d.name
            ),
        ),
        (Mode::Dual, Some(why)) if present => (
            Target::Itself { copy: None },
            format!(
                "{t}: has a mailbox here; routing off for {} ({why}): no copy to the destination",
                d.name
            ),
        ),
        (Mode::Dual, _) => (
            Target::Refused,
            format!(
                "{t}: no mailbox here, and mode dual of {} refuses it",
                d.name
            ),
        ),
        (_, None) => (
            Target::Routed(routed()),
            format!(
                "{t}: mode {mode} of {}{}: routed to the destination",
                d.name,
                if mode == Mode::Split {
                    ", no mailbox here"
                } else {
                    ""
                }
            ),
        ),
        (_, Some(why)) => (
            Target::Paused {
                domain: d.name.clone(),
                why: why.clone(),
            },
            format!(
                "{t}: would be routed, and routing off for {} ({why})",
                d.name
            ),
        ),
    };
    (fate, Some(note))
}

/// The rule that made a decision on targets: `User` when none is in a
/// managed domain (nothing to say), else what became of each.
fn user_rule(kind: &'static str, targets: Vec<String>) -> Rule {
    if targets.is_empty() {
        Rule::User(kind)
    } else {
        Rule::UserTarget { kind, targets }
    }
}

/// `copy_to`: every target decided on its own. A copy that cannot be made
/// now (its domain's routing is off) is not made, as a `dual` copy is not
/// while routing is off (rule 1): the recipient is still delivered here.
fn copy_to(policy: &Policy, holds: &Holds, to: &[Address]) -> Verdict {
    let mut copies = Vec::with_capacity(to.len());
    let mut notes = Vec::new();
    for t in to {
        let (fate, note) = target(policy, holds, t);
        match fate {
            Target::Itself { copy } => {
                copies.push(t.to_string());
                copies.extend(copy);
                notes.extend(note);
            }
            Target::Routed(r) => {
                copies.push(r);
                notes.extend(note);
            }
            Target::Paused { .. } | Target::Refused => {
                notes.extend(note.map(|n| n + ": not copied"));
            }
        }
    }
    let decision = if copies.is_empty() {
        Decision::Keep
    } else {
        Decision::Copy(copies)
    };
    Verdict::new(decision, user_rule("copy_to", notes))
}

/// `redirect_to`: the target decided. One whose domain's routing is off
/// and that would be routed gets `451 4.4.4`, as a message to it would:
/// the sender retries, and the mail is routed once routing is back.
fn redirect_to(policy: &Policy, holds: &Holds, address: &Address, t: &Address) -> Verdict {
    let (fate, note) = target(policy, holds, t);
    let notes = |suffix: &str| {
        user_rule(
            "redirect_to",
            note.iter().map(|n| [n, suffix].concat()).collect(),
        )
    };
    match fate {
        Target::Itself { copy } => Verdict::new(
            Decision::Redirect(RedirectTo {
                to: t.to_string(),
                copy,
            }),
            notes(""),
        ),
        Target::Routed(r) => Verdict::new(Decision::Redirect(r.into()), notes("")),
        Target::Paused { domain, why } => Verdict::new(
            Decision::Tempfail(routing_paused(address, &domain, &why)),
            notes(": refused for now, the sender retries until routing resumes"),
        ),
        // RFC 3463 X.3.5: system incorrectly configured.
        Target::Refused => Verdict::new(
            Decision::Tempfail(Rejection {
                code: "451",
                xcode: "4.3.5",
                text: format!(
                    "{}: the configuration redirects it to an address that has no mailbox; try again later",
                    shown(address)
                ),
            }),
            notes(""),
        ),
    }
}
