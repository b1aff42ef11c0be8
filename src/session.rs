//! What the milter remembers about one SMTP session and its current
//! message, and the end-of-message plan derived from it. Nothing here
//! speaks the milter protocol: `milter.rs` feeds events in and carries the
//! [`Plan`] out, so the plan is testable on its own.

use crate::address::{xtext, EsmtpParam, RcptArg};
use crate::config::LocalPartCase;
use crate::decision::{decide_rcpt, Decision, Envelope, Rejection, Rule, Verdict};
use crate::policy::Policy;
use std::{fmt::Write as _, net::IpAddr, sync::Arc};

/// The header that marks a message this instance has routed.
pub const LOOP_HEADER: &str = "X-Dualroute";

/// One SMTP connection.
#[derive(Debug, Default)]
pub struct Session {
    pub client: Option<IpAddr>,
    pub message: Option<Message>,
    /// The stages the MTA agreed not to wait for a reply to (negotiated in
    /// `milter.rs`).
    pub no_reply: indymilter::ProtoOpts,
}

/// One accepted recipient and what was decided for it.
#[derive(Clone, Debug)]
pub struct Recipient {
    pub arg: RcptArg,
    pub verdict: Verdict,
}

/// One message, from MAIL to end of message or abort.
#[derive(Debug)]
pub struct Message {
    /// The policy this message started with; a reload does not change it.
    pub policy: Arc<Policy>,
    pub envelope: Envelope,
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// Recipients refused at RCPT, for the log line.
    pub rejected: Vec<Recipient>,
    /// The message carries `X-Dualroute: <our instance>`.
    pub loop_header: bool,
    /// RCPTs refused because the message already had `max_recipients`, and
    /// the verdict they got (made once).
    pub overflow: Option<(usize, Verdict)>,
}

impl Message {
    pub fn new(policy: Arc<Policy>, envelope: Envelope, sender: String) -> Message {
        Message {
            policy,
            envelope,
            sender,
            recipients: Vec::new(),
            rejected: Vec::new(),
            loop_header: false,
            overflow: None,
        }
    }

    /// Decides a RCPT and remembers it; `mta` is the MTA's own parse of
    /// the address (`{rcpt_addr}`), when it sent one. A recipient given
    /// twice with the same argument is decided once.
    pub fn rcpt(&mut self, arg: RcptArg, mta: Option<&str>) -> &Verdict {
        if let Some(i) = self.recipients.iter().position(|r| r.arg.raw == arg.raw) {
            return &self.recipients[i].verdict;
        }
        // Every recipient is remembered until end of message: past the
        // limit, refuse rather than grow without bound. 452 is the reply
        // RFC 5321 §4.5.3.1.10 gives for too many recipients (the client
        // sends the rest in another transaction); 4.5.3 is RFC 3463's
        // "too many recipients". Postfix says the same past
        // `smtpd_recipient_limit`.
        let limit = self.policy.config.max_recipients.get();
        if self.recipients.len() + self.rejected.len() >= limit {
            let (count, verdict) = self
                .overflow
                .get_or_insert_with(|| (0, too_many_recipients(limit)));
            *count += 1;
            return verdict;
        }
        // Holds are read per RCPT, not per message: a `disable` or a
        // breaker trip takes effect at once.
        let holds = self.policy.holds.current();
        let verdict = decide_rcpt(&self.policy, &holds, &self.envelope, &arg, mta);
        let list = if matches!(
            verdict.decision,
            Decision::Reject(_) | Decision::Tempfail(_)
        ) {
            &mut self.rejected
        } else {
            &mut self.recipients
        };
        list.push(Recipient { arg, verdict });
        &list[list.len() - 1].verdict
    }

    pub fn header(&mut self, name: &str, value: &str) {
        if name.eq_ignore_ascii_case(LOOP_HEADER)
            && value
                .split([',', ' ', '\t'])
                .any(|v| v.trim().eq_ignore_ascii_case(&self.policy.config.instance))
        {
            self.loop_header = true;
        }
    }

    /// The end-of-message actions.
    pub fn plan(&self) -> Plan {
        let mut plan = Plan::default();
        let routes = self.recipients.iter().any(|r| {
            matches!(
                r.verdict.decision,
                Decision::Copy(_) | Decision::Redirect(_)
            )
        });
        if !routes {
            return plan;
        }
        // Our own header: the message has passed through this instance
        // before. Copies are not made again (local recipients still get it);
        // a recipient to redirect would go round the loop or, kept, into the
        // catch-all, so the message is refused, as Postfix refuses a
        // forwarding loop (554 5.4.6, RFC 3463: routing loop detected). A
        // forged header only refuses the forger's own message.
        if self.loop_header {
            plan.loop_detected = true;
            plan.refuse_loop = self
                .recipients
                .iter()
                .any(|r| matches!(r.verdict.decision, Decision::Redirect(_)));
            return plan;
        }
        // Every recipient the message will have, as paths: the ones it keeps
        // and the ones added so far. Adding one of them again would deliver
        // it twice on Postfix (it only merges recipients whose address,
        // ORCPT and NOTIFY all match, docs/design.md §8), so each is added once.
        let fold = self.policy.config.local_part_case == LocalPartCase::Insensitive;
        let mut present: Vec<String> = self
            .recipients
            .iter()
            .filter(|r| !matches!(r.verdict.decision, Decision::Redirect(_)))
            .filter_map(|r| r.arg.address.as_ref().map(|a| format!("<{a}>")))
            .collect();
        let mut add = |plan: &mut Plan, address: &str, args: String| {
            let path = format!("<{address}>");
            let same = |p: &String| {
                if fold {
                    p.eq_ignore_ascii_case(&path)
                } else {
                    *p == path
                }
            };
            if !present.iter().any(same) {
                present.push(path.clone());
                plan.add.push((path, args));
            }
        };
        for r in &self.recipients {
            let bounce = r
                .arg
                .address
                .as_ref()
                .and_then(|a| self.policy.domain(a))
                .is_some_and(|d| d.config.bounce);
            match &r.verdict.decision {
                Decision::Copy(targets) => {
                    let args = format!(
                        "{} NOTIFY={}",
                        orcpt(&r.arg),
                        if bounce { "FAILURE" } else { "NEVER" }
                    );
                    for t in targets {
                        add(&mut plan, t, args.clone());
                    }
                }
                Decision::Redirect(target) => {
                    if !plan.delete.contains(&r.arg.raw) {
                        plan.delete.push(r.arg.raw.clone());
                    }
                    // Postfix drops a source route (RFC 5321 §4.1.2) before it
                    // queues the recipient, so a delete of the argument as
                    // received would match nothing: delete the bare path too.
                    // A delete that matches nothing does no harm.
                    if let Some(bare) = r.arg.original_mailbox().map(|m| format!("<{m}>")) {
                        if bare != r.arg.raw && !plan.delete.contains(&bare) {
                            plan.delete.push(bare);
                        }
                    }
                    // Carry NOTIFY and ORCPT over, so the sender's DSN
                    // request and the original recipient survive.
                    let mut args = orcpt(&r.arg);
                    if let Some(notify) = r.arg.param("NOTIFY").filter(|p| has_value(p)) {
                        let _ = write!(args, " {notify}");
                    }
                    add(&mut plan, target, args);
                }
                Decision::Keep | Decision::Reject(_) | Decision::Tempfail(_) => {}
            }
        }
        // Only a message that was changed is marked.
        if !plan.add.is_empty() || !plan.delete.is_empty() {
            plan.header = Some(self.policy.config.instance.clone());
        }
        plan
    }

    /// One line for the log: each recipient and its decision.
    pub fn summary(&self) -> String {
        let mut line = String::new();
        for r in self.recipients.iter().chain(&self.rejected) {
            if !line.is_empty() {
                line.push_str("; ");
            }
            let _ = write!(
                line,
                "{} {} ({})",
                r.arg.raw, r.verdict.decision, r.verdict.rule
            );
        }
        if let Some((count, verdict)) = &self.overflow {
            let _ = write!(
                line,
                "; {count} more: {} ({})",
                verdict.decision, verdict.rule
            );
        }
        line
    }
}

/// The verdict for a RCPT past `max_recipients`.
fn too_many_recipients(limit: usize) -> Verdict {
    Verdict {
        decision: Decision::Tempfail(Rejection {
            code: "452",
            xcode: "4.5.3",
            text: format!(
                "Too many recipients for one message (more than {limit}); send the rest in another message"
            ),
        }),
        rule: Rule::TooManyRecipients(limit),
    }
}

/// `ORCPT=rfc822;<original>`: the client's own ORCPT if it sent one (RFC
/// 3461 §4.2: it already names the original recipient), else the address
/// as received, so the relay address never leaks into DSNs.
fn orcpt(arg: &RcptArg) -> String {
    match arg.param("ORCPT").filter(|p| has_value(p)) {
        Some(p) => p.to_string(),
        None => format!(
            "ORCPT=rfc822;{}",
            xtext(arg.original_mailbox().unwrap_or_default())
        ),
    }
}

/// Only a parameter with a value is carried over to an added recipient:
/// a bare `NOTIFY` or `ORCPT` (RFC 3461 §4.1, §4.2 require one) would be
/// passed on as an invalid parameter (found by
/// fuzz/fuzz_targets/rcpt_arg.rs).
fn has_value(p: &EsmtpParam) -> bool {
    p.value.as_deref().is_some_and(|v| !v.is_empty())
}

/// What to do at end of message.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Plan {
    /// Recipients to add: path with angle brackets, ESMTP arguments.
    pub add: Vec<(String, String)>,
    /// RCPT arguments to delete, exactly as received (plus the bare path
    /// of a source-routed one).
    pub delete: Vec<String>,
    /// Value of the `X-Dualroute` header to add.
    pub header: Option<String>,
    /// The message already passed through this instance: nothing routed.
    pub loop_detected: bool,
    /// ... and a recipient would be redirected: refuse it (554 5.4.6).
    pub refuse_loop: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redirect carries NOTIFY and ORCPT over only when they have a
    /// value; without one it gets its own ORCPT and no NOTIFY.
    #[test]
    fn parameters_without_a_value_are_not_carried_over() {
        let yaml = "domains:\n  split.test:\n    mode: split\n    destination: { hosts: [\"[192.0.2.1]\"] }\n    accounts: [{ list: [alice@split.test] }]\n";
        let config = crate::config::parse(yaml, "t.yaml").expect("config");
        let policy = Arc::new(Policy::load(config).expect("accounts"));
        let mut m = Message::new(policy, Envelope::default(), "<s@x.example>".into());
        m.rcpt(
            RcptArg::parse(&["<zed@split.test>", "NOTIFY", "ORCPT="]),
            None,
        );
        let plan = m.plan();
        assert_eq!(
            plan.add,
            [(
                "<zed@split.test.dualroute.invalid>".to_owned(),
                "ORCPT=rfc822;zed@split.test".to_owned()
            )]
        );
    }
}
