//! `reject_unknown` at RCPT (docs/design.md "Refusing unknown
//! recipients"): a recipient the decision routes to a destination with
//! `reject_unknown` is refused here when that destination would refuse it
//! (its address list does not have it, or a callout says so), so nothing
//! is queued and nothing bounces to a forged sender.

use super::{refuse, Shared};
use crate::callout::{Answer, Origin, Verdict as Said, DEADLINE};
use crate::config::Unreachable;
use crate::decision::{Decision, RedirectTo, Rejection, Rule, Verdict};
use crate::metrics::Kind;
use crate::session::Message;
use indymilter::{SetErrorReply, Status};
use tracing::info;

/// Asks the destination about the recipient [`Message::rcpt`] has just
/// added (the last of `message.recipients`), when its decision routes it
/// away: a redirect to a routing address (split without a mailbox here,
/// route, or a `redirect_to` whose target is routed; §2 rules 4 and 5),
/// never a recipient kept here or a copy of one. Known, or a domain
/// without `reject_unknown.callout`: `Continue` as before. Unknown:
/// `550 5.1.1`; Unreachable: `451 4.4.3` with `unreachable: tempfail`.
/// A refusal moves the recipient to `message.rejected`, as
/// [`Message::rcpt`] files a refusal of its own; in shadow mode it is
/// logged and counted and the recipient stays; on a non-SMTP submission
/// it waits for end of message, where the whole message gets it
/// ([`Message::refusal_at_end`], as every refusal there).
pub(super) async fn rcpt(
    shared: &Shared,
    message: &mut Message,
    reply: &mut impl SetErrorReply,
    shown: &str,
) -> Status {
    let Some(last) = message.recipients.last() else {
        return Status::Continue;
    };
    let Decision::Redirect(RedirectTo { to, copy: None }) = &last.verdict.decision else {
        return Status::Continue;
    };
    let policy = message.policy.clone();
    let Some((domain, address)) = policy.callout_target(to) else {
        return Status::Continue;
    };
    let Some(settings) = domain.config.reject_unknown.as_ref() else {
        return Status::Continue;
    };
    let shadow = last.shadow;
    let listed = crate::callout::listed(&policy, domain, &address);
    let answer = match (listed, &shared.callouts) {
        (Some(answer), _) => answer,
        (None, Some(c)) => {
            c.check(&domain.name, &domain.config, &address, DEADLINE)
                .await
        }
        (None, None) => Answer {
            verdict: Said::Unreachable,
            reply: "no callout engine (no DNS resolver, see the log at start)".into(),
            origin: Origin::Deadline,
            at: crate::state::now(),
            accept_all: false,
        },
    };
    shared.metrics.callout(&domain.name, &answer);
    let refusal = match (answer.verdict, settings.unreachable) {
        (Said::Known, _) | (Said::Unreachable, Unreachable::Accept) => None,
        (Said::Unknown, _) => Some(Decision::Reject(Rejection {
            code: "550",
            xcode: "5.1.1",
            text: format!(
                "{}: Recipient address rejected: unknown at the destination of {}",
                visible(&address),
                domain.name
            ),
        })),
        (Said::Unreachable, Unreachable::Tempfail) => Some(Decision::Tempfail(Rejection {
            code: "451",
            xcode: "4.4.3",
            text: format!(
                "{}: Recipient address cannot be verified now: the destination of {} does not answer; try again later",
                visible(&address),
                domain.name
            ),
        })),
    };
    let origin = match answer.origin {
        Origin::Cache => "cached",
        Origin::Callout => "callout",
        Origin::Throttled => "throttled",
        Origin::Deadline => "deadline",
        Origin::List => "address list",
    };
    let accept_all = if answer.accept_all {
        " (the destination accepts any address: this answer protects nothing)"
    } else {
        ""
    };
    let Some(decision) = refusal else {
        // A live callout is worth a line; an answer the cache or the list
        // gives for every routed RCPT is routine (and a line per RCPT is
        // most of a cache hit's cost): debug.
        let routine = matches!(answer.origin, Origin::Cache | Origin::List)
            && answer.verdict == Said::Known
            && !answer.accept_all;
        if routine {
            tracing::debug!(
                "callout: RCPT {shown}: <{address}> {} at the destination of {} ({origin}: {}); routed; from={}",
                answer.verdict, domain.name, answer.reply, message.sender
            );
        } else {
            info!(
                "callout: RCPT {shown}: <{address}> {} at the destination of {} ({origin}: {}){accept_all}; routed; from={}",
                answer.verdict, domain.name, answer.reply, message.sender
            );
        }
        return Status::Continue;
    };
    let word = match decision {
        Decision::Reject(_) => "reject",
        _ => "tempfail",
    };
    shared
        .metrics
        .decision(&domain.name, Kind::of(&decision), shadow);
    let verdict = Verdict {
        decision,
        rule: Rule::Callout {
            address: address.clone(),
            answer: format!("{} ({origin}: {})", answer.verdict, answer.reply),
        },
    };
    // The recipient [`Message::rcpt`] filed as accepted is refused after
    // all: filed with the refusals, it plays no part at end of message
    // (nor is it counted again there).
    if let Some(r) = message.recipients.pop() {
        message
            .rejected
            .push(crate::session::Recipient { verdict, ..r });
    }
    let Some(r) = message.rejected.last() else {
        return Status::Continue;
    };
    let (Decision::Reject(rejection) | Decision::Tempfail(rejection)) = &r.verdict.decision else {
        return Status::Continue;
    };
    if shadow {
        // Filed with the refusals as [`Message::rcpt`] files a shadowed
        // one: counted once (above, as live mode would), left out of the
        // plan live mode would carry out, and accepted.
        info!(
            "shadow mode: callout: RCPT {shown}: <{address}> {} at the destination of {} ({origin}: {}); would {word} with {rejection}; accepted; from={}",
            answer.verdict, domain.name, answer.reply, message.sender
        );
        return Status::Continue;
    }
    if message.non_smtp {
        info!(
            "callout: RCPT {shown}: <{address}> {} at the destination of {} ({origin}: {}); non-SMTP submission: the whole message gets {rejection} at end of message; from={}",
            answer.verdict, domain.name, answer.reply, message.sender
        );
        return Status::Continue;
    }
    info!(
        "NOQUEUE: callout: RCPT {shown}: <{address}> {} at the destination of {} ({origin}: {}); {word} with {rejection}; from={}",
        answer.verdict, domain.name, answer.reply, message.sender
    );
    let status = match word {
        "reject" => Status::Reject,
        _ => Status::Tempfail,
    };
    refuse(reply, rejection, status)
}

/// The address as shown in a reply text: libmilter's smfi_setreply drops
/// a text with a lone '%' (src/decision/verdict.rs does the same).
fn visible(address: &str) -> String {
    if address.contains('%') {
        "recipient".into()
    } else {
        format!("<{address}>")
    }
}
