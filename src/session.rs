//! What the milter remembers about one SMTP session and its current
//! message, and the end-of-message plan derived from it. Nothing here
//! speaks the milter protocol: `milter.rs` feeds events in and carries the
//! [`Plan`] out, so the plan is testable on its own.

use crate::address::{xtext, RcptArg};
use crate::config::LocalPartCase;
use crate::decision::{decide, Decision, Envelope, Verdict};
use crate::policy::Policy;
use std::{fmt::Write as _, net::IpAddr, sync::Arc};

/// The header that marks a message this instance has routed.
pub const LOOP_HEADER: &str = "X-Dualroute";

/// One SMTP connection.
#[derive(Debug, Default)]
pub struct Session {
    pub client: Option<IpAddr>,
    pub message: Option<Message>,
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
        }
    }

    /// Decides a RCPT and remembers it. A recipient given twice with the
    /// same argument is decided once.
    pub fn rcpt(&mut self, arg: RcptArg) -> &Verdict {
        if let Some(i) = self.recipients.iter().position(|r| r.arg.raw == arg.raw) {
            return &self.recipients[i].verdict;
        }
        let verdict = decide(&self.policy, &self.envelope, arg.address.as_ref());
        let list = if matches!(verdict.decision, Decision::Reject(_)) {
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
        let fold = self.policy.config.local_part_case == LocalPartCase::Insensitive;
        if self.loop_header {
            plan.loop_detected = true;
            return plan;
        }
        // Recipients that stay as they are: adding one of them again would
        // deliver it twice on Postfix (DESIGN.md §8).
        let staying: Vec<String> = self
            .recipients
            .iter()
            .filter(|r| !matches!(r.verdict.decision, Decision::Redirect(_)))
            .filter_map(|r| r.arg.address.as_ref().map(|a| a.to_string()))
            .collect();
        plan.existing = staying.iter().map(|a| format!("<{a}>")).collect();
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
                        plan.add(t, args.clone(), fold);
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
                    if let Some(notify) = r.arg.param("NOTIFY") {
                        let _ = write!(args, " {notify}");
                    }
                    plan.add(target, args, fold);
                }
                Decision::Keep | Decision::Reject(_) => {}
            }
        }
        plan.header = Some(self.policy.config.instance.clone());
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
        line
    }
}

/// `ORCPT=rfc822;<original>`: the client's own ORCPT if it sent one (RFC
/// 3461 §4.2: it already names the original recipient), else the address
/// as received, so the relay address never leaks into DSNs.
fn orcpt(arg: &RcptArg) -> String {
    match arg.param("ORCPT") {
        Some(p) => p.to_string(),
        None => format!(
            "ORCPT=rfc822;{}",
            xtext(arg.original_mailbox().unwrap_or_default())
        ),
    }
}

/// What to do at end of message.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Plan {
    /// Recipients to add: path with angle brackets, ESMTP arguments.
    pub add: Vec<(String, String)>,
    /// RCPT arguments to delete, exactly as received.
    pub delete: Vec<String>,
    /// Value of the `X-Dualroute` header to add.
    pub header: Option<String>,
    /// The message already passed through this instance: nothing routed.
    pub loop_detected: bool,
    /// Recipients the message keeps, which must not be added again.
    existing: Vec<String>,
}

impl Plan {
    fn add(&mut self, address: &str, args: String, fold_case: bool) {
        let path = format!("<{address}>");
        // Postfix delivers a duplicate added recipient twice unless address,
        // ORCPT and NOTIFY all match (DESIGN.md §8): add each address once.
        let same = |p: &String| {
            if fold_case {
                p.eq_ignore_ascii_case(&path)
            } else {
                *p == path
            }
        };
        if !self.add.iter().any(|(p, _)| same(p)) && !self.existing.iter().any(same) {
            self.add.push((path, args));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.delete.is_empty() && self.header.is_none()
    }
}
