//! `dualroute explain`: the decision for an address, in words. It calls
//! the same [`decide`] as the milter.

use crate::address::RcptArg;
use crate::decision::{decide_rcpt, Decision, Envelope};
use crate::holds::Holds;
use crate::policy::Policy;

/// Explains what the milter does with `input` (an address with or without
/// angle brackets, as it would appear in RCPT TO), under `holds` (read from
/// `state_dir` as the running milter reads them).
pub fn explain(policy: &Policy, holds: &Holds, envelope: &Envelope, input: &str) -> String {
    let input = input.trim();
    let arg = rcpt_arg(input);
    let verdict = decide_rcpt(policy, holds, envelope, &arg, None);
    let shadow = crate::session::managed_domain(policy, &arg)
        .is_some_and(|d| policy.config.shadow(&d.config));
    let mut line = if shadow {
        // As the milter logs it (src/milter.rs): decided, not carried out.
        format!(
            "{input}: shadow mode: would {} — {}; nothing is changed",
            verdict.decision, verdict.rule
        )
    } else {
        format!("{input}: {} — {}", verdict.decision, verdict.rule)
    };
    if let (Some(a), Decision::Copy(_) | Decision::Redirect(_)) = (&arg.address, &verdict.decision)
    {
        if let Some(d) = policy.domain(a) {
            if let Some(relay) = d.relay_domain(&policy.config.relay_suffix.0) {
                if matches!(verdict.rule, crate::decision::Rule::Mode { .. }) {
                    line.push_str(&format!(
                        " (the MTA sends {relay} to the destination and restores @{})",
                        d.name
                    ));
                }
            }
            // Only mail to the destination goes through the dualroute
            // transport and its TLS policy; per-user targets outside the
            // managed domains do not. (A target routed by its own domain,
            // rule 4, follows that domain's rules; its fate is in the rule.)
            if let (Some(level), Some(policy), crate::decision::Rule::Mode { .. }) = (
                d.config.transport.tls,
                d.config.transport.tls_policy(),
                &verdict.rule,
            ) {
                line.push_str(&format!(
                    " [tls {policy}: Postfix delivers it to the destination only {}]",
                    match level {
                        crate::config::TlsLevel::None => "in clear text",
                        crate::config::TlsLevel::May => "over TLS when offered, else in clear text",
                        crate::config::TlsLevel::Encrypt => "over TLS",
                        _ => "over TLS with a trusted certificate that matches",
                    }
                ));
            }
        }
    }
    if let (Some(d), Decision::Copy(_) | Decision::Redirect(_)) = (
        arg.address.as_ref().and_then(|a| policy.domain(a)),
        &verdict.decision,
    ) {
        if let Some(limit) = &d.config.max_size {
            line.push_str(&size_rule(&verdict.decision, limit));
        }
    }
    line
}

/// `input` as the MTA would pass it: an address typed without brackets
/// gets them; anything with a bracket is taken as written.
fn rcpt_arg(input: &str) -> RcptArg {
    let path = if input.starts_with('<') || input.ends_with('>') {
        input.to_owned()
    } else {
        format!("<{input}>")
    };
    RcptArg::parse(&[path])
}

/// The domain whose `reject_unknown.callout` the milter asks for `input`
/// at RCPT, and the address it asks (src/milter/callout.rs: a redirect
/// to a routing address only); `None` when it asks nothing.
pub fn callout_target<'p>(
    policy: &'p Policy,
    holds: &Holds,
    envelope: &Envelope,
    input: &str,
) -> Option<(&'p crate::policy::DomainPolicy, String)> {
    let verdict = decide_rcpt(policy, holds, envelope, &rcpt_arg(input.trim()), None);
    match &verdict.decision {
        Decision::Redirect(crate::decision::RedirectTo { to, copy: None }) => {
            policy.callout_target(to)
        }
        _ => None,
    }
}

/// What `reject_unknown` makes of `answer` for `asked` (the address as it
/// arrives at the destination of `d`), as src/milter/callout.rs acts on
/// it; `answer` is `None` when nothing is cached yet. `source` says where
/// the answer comes from (address list, cached answer, live callout).
pub fn reject_unknown_line(
    policy: &Policy,
    d: &crate::policy::DomainPolicy,
    asked: &str,
    answer: Option<&crate::callout::Answer>,
    source: &str,
) -> String {
    use crate::callout::Verdict as Said;
    use crate::config::Unreachable;
    let Some(answer) = answer else {
        return format!(
            "  reject_unknown: no cached answer for <{asked}>: the milter asks the destination at RCPT (a callout of at most {}s; past it the recipient gets the `unreachable` answer); `dualroute explain --callout` asks now",
            crate::callout::DEADLINE.as_secs()
        );
    };
    let unreachable = d
        .config
        .reject_unknown
        .as_ref()
        .map(|r| r.unreachable)
        .unwrap_or_default();
    let act = match (answer.verdict, unreachable) {
        (Said::Known, _) => "routed".to_owned(),
        (Said::Unknown, _) => {
            "refused at RCPT with 550 5.1.1 (nothing queued, no bounce)".to_owned()
        }
        (Said::Unreachable, Unreachable::Tempfail) => {
            "refused for now with 451 4.4.3 (unreachable: tempfail; the sender retries)".to_owned()
        }
        (Said::Unreachable, Unreachable::Accept) => {
            "accepted and routed (unreachable: accept)".to_owned()
        }
    };
    let act = if policy.config.shadow(&d.config) && answer.verdict != Said::Known {
        format!("shadow mode: would be {act}; accepted and routed")
    } else {
        act
    };
    let when = if source == "cached answer" {
        format!(" (asked {})", crate::state::when(answer.at))
    } else {
        String::new()
    };
    format!(
        "  reject_unknown: {source} for <{asked}>: {} ({}){when}: {act}{}",
        answer.verdict,
        answer.reply,
        if answer.accept_all {
            "; WARNING: the destination accepts any address, so `known` proves nothing"
        } else {
            ""
        }
    )
}

/// What `destination.max_size` does to a copy or a redirect (README "Size
/// limit for copies"), as the milter applies it at end of message.
fn size_rule(decision: &Decision, limit: &crate::config::MessageSize) -> String {
    match decision {
        Decision::Redirect(_) => format!(
            "; destination.max_size {limit} ({} bytes) is not applied to a redirect (a larger message is redirected all the same, with a warning in the log)",
            limit.bytes
        ),
        _ => format!(
            "; only for messages up to destination.max_size {limit} ({} bytes): a larger one is delivered here without the copy",
            limit.bytes
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_level_where_mail_goes_to_the_destination() {
        let yaml = "state_dir: /nonexistent\ndomains:\n  example.com:\n    mode: split\n    destination: { hosts: [mx.legacy.test], tls: secure, tls_match: [.legacy.test] }\n    accounts:\n      - list: [alice@example.com]\n    users:\n      carol@example.com: { redirect_to: carol@elsewhere.test }\n";
        let policy = Policy::load(crate::config::parse(yaml, "t.yaml").unwrap()).unwrap();
        let envelope = Envelope {
            client: None,
            auth: None,
        };
        let say = |a: &str| explain(&policy, &Holds::default(), &envelope, a);
        let routed = say("zed@example.com");
        assert!(
            routed.contains("[tls secure match=.legacy.test: Postfix delivers it to the destination only over TLS with a trusted certificate that matches]"),
            "{routed}"
        );
        // Kept here, or sent to a per-user target: no TLS rule applies.
        assert!(!say("alice@example.com").contains("tls"));
        assert!(!say("carol@example.com").contains("tls "));
    }
}
