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
    // As the MTA would pass it: an address typed without brackets gets
    // them; anything with a bracket is taken as written.
    let path = if input.starts_with('<') || input.ends_with('>') {
        input.to_owned()
    } else {
        format!("<{input}>")
    };
    let arg = RcptArg::parse(&[path]);
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
