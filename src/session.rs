//! What the milter remembers about one SMTP session and its current
//! message, and the end-of-message plan derived from it. Nothing here
//! speaks the milter protocol: `milter.rs` feeds events in and carries the
//! [`Plan`] out, so the plan is testable on its own.

use crate::address::{loose_domain, push_xtext, EsmtpParam, RcptArg};
use crate::config::LocalPartCase;
use crate::decision::{decide_rcpt, Decision, Envelope, Rejection, Rule, Verdict};
use crate::holds::LiveHolds;
use crate::policy::{DomainPolicy, Policy};
use std::{fmt::Write as _, net::IpAddr, sync::Arc, time::Duration};

/// The header that marks a message this instance has routed.
pub const LOOP_HEADER: &str = "X-Dualroute";

/// One SMTP connection.
#[derive(Debug, Default)]
pub struct Session {
    pub client: Option<IpAddr>,
    /// The client's address and port, to recognise dualroute's own
    /// notifications (src/notify/).
    pub peer: Option<std::net::SocketAddr>,
    pub message: Option<Message>,
    /// The stages the MTA agreed not to wait for a reply to (negotiated in
    /// `milter.rs`).
    pub no_reply: indymilter::ProtoOpts,
    /// A conversation Postfix's cleanup simulates for mail that did not
    /// come through smtpd (the `sendmail` command, pickup): nothing may be
    /// refused at its RCPT (docs/design.md "Local submission").
    pub non_smtp: bool,
}

/// One accepted recipient and what was decided for it.
#[derive(Clone, Debug)]
pub struct Recipient {
    pub arg: RcptArg,
    pub verdict: Verdict,
    /// Its domain runs in shadow mode (docs/rollout.md: its decision is
    /// made, logged and counted, and nothing of it is carried out), taken
    /// once at RCPT: the plan, the log line and the counters ask again.
    pub shadow: bool,
    /// It belongs to a managed domain ([`managed_domain`]), also taken once.
    pub managed: bool,
}

/// What [`Message::rcpt`] decided for one RCPT.
pub struct Rcpt<'m> {
    pub verdict: &'m Verdict,
    /// The managed domain the recipient belongs to ([`managed_domain`]).
    pub domain: Option<&'m DomainPolicy>,
    /// That domain runs in shadow mode.
    pub shadow: bool,
}

/// One message, from MAIL to end of message or abort.
#[derive(Debug)]
pub struct Message {
    /// The policy this message started with; a reload does not change it.
    pub policy: Arc<Policy>,
    /// The holds in force, read per RCPT (src/holds/).
    pub holds: Arc<LiveHolds>,
    pub envelope: Envelope,
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// Recipients refused at RCPT, for the log line.
    pub rejected: Vec<Recipient>,
    /// The message carries `X-Dualroute: <our instance>`.
    pub loop_header: bool,
    /// How big the message is, for `destination.max_size`.
    pub size: MessageSize,
    /// Time spent in the milter's callbacks for this message so far (the
    /// metrics' histogram of milter time per message).
    pub busy: Duration,
    /// RCPTs refused because the message already had `max_recipients`, and
    /// the verdict they got (made once).
    pub overflow: Option<(usize, Verdict)>,
    /// Submitted without SMTP ([`Session::non_smtp`]): refusals wait for
    /// end of message ([`Message::refusal_at_end`]) and a redirect also
    /// deletes the unqualified form Postfix keeps as the original
    /// recipient.
    pub non_smtp: bool,
    /// Values of the notifier's token header ([`NOTIFY_TOKEN_HEADER`]),
    /// checked at end of message (src/notify/).
    pub notify_tokens: Vec<String>,
}

/// The header that carries the notifier's one-time token on mail it
/// submits with the `sendmail` command (src/notify/).
pub const NOTIFY_TOKEN_HEADER: &str = "X-Dualroute-Notify-Token";

/// What the milter knows of a message's size: the client's `SIZE=` at
/// MAIL (RFC 1870 §6: its estimate, which may be absent or low) and the
/// header and body bytes the MTA passed on. The body is only passed on
/// when a domain has `max_size` (src/milter.rs `negotiate`).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct MessageSize {
    pub declared: Option<u64>,
    pub seen: u64,
}

impl MessageSize {
    /// The larger of the two: a client that declares less than it sends
    /// does not get a copy past the limit, nor one that sends less.
    pub fn bytes(&self) -> u64 {
        self.declared.unwrap_or(0).max(self.seen)
    }

    /// `SIZE=n` among the MAIL parameters (case-insensitive, RFC 5321
    /// §2.4); anything unreadable counts as not declared.
    pub fn declare(&mut self, params: &[&str]) {
        self.declared = params.iter().find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.eq_ignore_ascii_case("SIZE").then(|| v.parse().ok())?
        });
    }

    /// A header line as it travels: `Name: value` and CRLF.
    pub fn header(&mut self, name: &str, value: &str) {
        self.add(name.len() as u64 + value.len() as u64 + 4);
    }

    /// A body chunk as the MTA passes it on.
    pub fn body(&mut self, chunk: usize) {
        self.add(chunk as u64);
    }

    fn add(&mut self, n: u64) {
        self.seen = self.seen.saturating_add(n);
    }
}

impl Message {
    pub fn new(
        policy: Arc<Policy>,
        holds: Arc<LiveHolds>,
        envelope: Envelope,
        sender: String,
    ) -> Message {
        Message {
            policy,
            holds,
            envelope,
            sender,
            recipients: Vec::new(),
            rejected: Vec::new(),
            loop_header: false,
            size: MessageSize::default(),
            busy: Duration::ZERO,
            overflow: None,
            non_smtp: false,
            notify_tokens: Vec::new(),
        }
    }

    /// Decides a RCPT and remembers it; `mta` is the MTA's own parse of
    /// the address (`{rcpt_addr}`), when it sent one. A recipient given
    /// twice with the same argument is decided once.
    pub fn rcpt(&mut self, mut arg: RcptArg, mta: Option<&str>) -> Rcpt<'_> {
        // `<zed>`: decided, counted and shadowed as the mailbox the MTA
        // delivers it to (docs/design.md §3).
        arg.qualify(mta);
        // Looked up once here, for the shadow flag and the caller's
        // counters: this runs for every RCPT.
        let domain = managed_domain(&self.policy, &arg);
        let shadow = domain.is_some_and(|d| self.policy.config.shadow(&d.config));
        let answer = |verdict| Rcpt {
            verdict,
            domain,
            shadow,
        };
        if let Some(i) = self.recipients.iter().position(|r| r.arg.raw == arg.raw) {
            return answer(&self.recipients[i].verdict);
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
            return answer(verdict);
        }
        // Holds are read per RCPT, not per message: a `disable` or a
        // breaker trip takes effect at once.
        let holds = self.holds.current();
        let verdict = decide_rcpt(&self.policy, &holds, &self.envelope, &arg, mta);
        let list = if matches!(
            verdict.decision,
            Decision::Reject(_) | Decision::Tempfail(_)
        ) {
            &mut self.rejected
        } else {
            &mut self.recipients
        };
        list.push(Recipient {
            arg,
            verdict,
            shadow,
            managed: domain.is_some(),
        });
        answer(&list[list.len() - 1].verdict)
    }

    pub fn header(&mut self, name: &str, value: &str) {
        self.size.header(name, value);
        if name.eq_ignore_ascii_case(NOTIFY_TOKEN_HEADER) && self.notify_tokens.len() < 4 {
            self.notify_tokens.push(value.trim().to_owned());
        }
        if name.eq_ignore_ascii_case(LOOP_HEADER)
            && value
                .split([',', ' ', '\t'])
                .any(|v| v.trim().eq_ignore_ascii_case(&self.policy.config.instance))
        {
            self.loop_header = true;
        }
    }

    /// The end-of-message actions: those of the recipients of domains in
    /// live mode. A shadowed recipient stays as the MTA has it.
    pub fn plan(&self) -> Plan {
        self.plan_for(|r| !r.shadow)
    }

    /// The end-of-message actions live mode would take for the whole
    /// message, shadowed domains included: what shadow mode logs instead.
    pub fn plan_if_live(&self) -> Plan {
        self.plan_for(|_| true)
    }

    /// The actions for the recipients `acts` selects; the others are kept
    /// as they are.
    fn plan_for<'m>(&'m self, acts: impl Fn(&Recipient) -> bool) -> Plan {
        let mut plan = Plan::default();
        let routed = |r: &Recipient| {
            acts(r)
                && matches!(
                    r.verdict.decision,
                    Decision::Copy(_) | Decision::Redirect(_)
                )
        };
        let routes = self.recipients.iter().any(routed);
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
                .any(|r| acts(r) && matches!(r.verdict.decision, Decision::Redirect(_)));
            return plan;
        }
        // Every recipient the message will have, as paths: the ones it keeps
        // and the ones added so far. Adding one of them again would deliver
        // it twice on Postfix (it only merges recipients whose address,
        // ORCPT and NOTIFY all match, docs/design.md §8), so each is added once.
        // Compared as (local part, domain), split at the last '@' (a
        // domain has none): the same as comparing `local@domain`, without
        // writing each out.
        let fold = self.policy.config.local_part_case == LocalPartCase::Insensitive;
        let mut present: Vec<(&str, &str)> = self
            .recipients
            .iter()
            .filter(|r| !(acts(r) && matches!(r.verdict.decision, Decision::Redirect(_))))
            .filter_map(|r| r.arg.address.as_ref())
            .map(|a| (a.local.as_str(), a.domain.as_str()))
            .collect();
        let mut add = |plan: &mut Plan, address: &'m str, args: String| {
            let key = address.rsplit_once('@').unwrap_or((address, ""));
            let same = |p: &(&str, &str)| {
                if fold {
                    p.0.eq_ignore_ascii_case(key.0) && p.1.eq_ignore_ascii_case(key.1)
                } else {
                    *p == key
                }
            };
            if !present.iter().any(same) {
                present.push(key);
                plan.add.push((["<", address, ">"].concat(), args));
            }
        };
        let size = self.size.bytes();
        for r in self.recipients.iter().filter(|r| acts(r)) {
            let domain = r.arg.address.as_ref().and_then(|a| self.policy.domain(a));
            let bounce = domain.is_some_and(|d| d.config.bounce);
            // The destination's size limit (README "Size limit for
            // copies"): a copy it would refuse is not made, since its
            // bounce is worse than no copy; a redirect is made all the
            // same (the mail has nowhere else to go), with a warning.
            let routed = matches!(
                r.verdict.decision,
                Decision::Copy(_) | Decision::Redirect(_)
            );
            let too_big = domain
                .and_then(|d| d.config.max_size.as_ref())
                .filter(|limit| routed && size > limit.bytes);
            if let Some(limit) = too_big {
                plan.too_big.push(TooBig {
                    rcpt: r.arg.raw.clone(),
                    decision: r.verdict.decision.clone(),
                    size,
                    limit: limit.clone(),
                });
            }
            match &r.verdict.decision {
                Decision::Copy(_) if too_big.is_some() => {}
                Decision::Copy(targets) => {
                    let args = copy_args(&r.arg, bounce);
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
                    // (The raw argument is `<m>` itself unless it had a source
                    // route: no string made then.)
                    if let Some(m) = r.arg.original_mailbox() {
                        if r.arg.raw.starts_with('<') && r.arg.raw.len() != m.len() + 2 {
                            let bare = ["<", m, ">"].concat();
                            if !plan.delete.contains(&bare) {
                                plan.delete.push(bare);
                            }
                        }
                    }
                    // Local submission: cleanup matches a delete against
                    // the original recipient (cleanup_milter.c
                    // `cleanup_del_rcpt`), and for `sendmail zed` that is
                    // `zed`, not the `zed@myorigin` the milter is shown.
                    // Deleting only the latter left zed in the catch-all
                    // and added the routing address as well. So the bare
                    // local part is deleted too — unless another recipient
                    // of the message has the same local part, when the
                    // bare form could be that one's original.
                    if self.non_smtp {
                        if let Some(a) = &r.arg.address {
                            let local = a.unquoted_local();
                            let shared = self
                                .recipients
                                .iter()
                                .chain(&self.rejected)
                                .filter(|o| o.arg.raw != r.arg.raw)
                                .filter_map(|o| o.arg.address.as_ref())
                                .any(|o| o.unquoted_local().eq_ignore_ascii_case(&local));
                            let bare = ["<", &a.local, ">"].concat();
                            if !shared && !plan.delete.contains(&bare) {
                                plan.delete.push(bare);
                            }
                        }
                    }
                    // Carry NOTIFY and ORCPT over, so the sender's DSN
                    // request and the original recipient survive.
                    let mut args = orcpt(&r.arg);
                    if let Some(notify) = r.arg.param("NOTIFY").filter(|p| has_value(p)) {
                        let _ = write!(args, " {notify}");
                    }
                    add(&mut plan, &target.to, args);
                    // A copy of its own when the target is a mailbox of a
                    // dual domain (docs/design.md §2 rule 4): a copy, so
                    // NOTIFY follows that domain's `bounce`.
                    if let Some(copy) = &target.copy {
                        let dual_bounce = target
                            .to
                            .rsplit_once('@')
                            .and_then(|(_, d)| self.policy.domains.get(d))
                            .is_some_and(|d| d.config.bounce);
                        add(&mut plan, copy, copy_args(&r.arg, dual_bounce));
                    }
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

    /// On a non-SMTP submission nothing is refused at RCPT (Postfix calls
    /// that a milter configuration error, docs/design.md "Local
    /// submission"): the refusal the whole message gets at end of message
    /// instead, if any. A tempfail wins over a reject (when in doubt, the
    /// message waits and is decided again); a message past
    /// `max_recipients` would never pass, so it is refused for good.
    pub fn refusal_at_end(&self) -> Option<Decision> {
        let mut reject = None;
        for r in self.rejected.iter().filter(|r| !r.shadow) {
            match &r.verdict.decision {
                d @ Decision::Tempfail(_) => return Some(d.clone()),
                d @ Decision::Reject(_) if reject.is_none() => reject = Some(d.clone()),
                _ => {}
            }
        }
        reject.or_else(|| {
            self.overflow.as_ref().map(|_| {
                let limit = self.policy.config.max_recipients.get();
                Decision::Reject(Rejection {
                    code: "550",
                    xcode: "5.5.3",
                    text: format!(
                        "Too many recipients for one message (more than {limit}); send them in several messages"
                    ),
                })
            })
        })
    }

    /// One line for the log: each recipient and its decision. Written
    /// straight into the log line (no string of its own): it is formatted
    /// for every message.
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }
}

/// [`Message::summary`].
pub struct Summary<'a>(&'a Message);

impl std::fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        for (i, r) in m.recipients.iter().chain(&m.rejected).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            // Shadow mode says what live mode would have done, in the
            // same words (docs/rollout.md compares the two).
            // (Piece by piece: `write!` with five arguments costs more
            // than the rest of the line.)
            let shadow = !matches!(r.verdict.decision, Decision::Keep) && r.shadow;
            f.write_str(&r.arg.raw)?;
            f.write_str(if shadow { " would " } else { " " })?;
            std::fmt::Display::fmt(&r.verdict.decision, f)?;
            f.write_str(" (")?;
            std::fmt::Display::fmt(&r.verdict.rule, f)?;
            f.write_str(if shadow { "; shadow mode)" } else { ")" })?;
        }
        if let Some((count, verdict)) = &m.overflow {
            write!(f, "; {count} more: {} ({})", verdict.decision, verdict.rule)?;
        }
        Ok(())
    }
}

/// The managed domain a recipient belongs to: that of the milter's parse,
/// else the one the argument names (an unparsable argument of a managed
/// domain is refused, and that refusal belongs to the domain).
pub fn managed_domain<'p>(policy: &'p Policy, arg: &RcptArg) -> Option<&'p DomainPolicy> {
    match &arg.address {
        Some(a) => policy.domain(a),
        None => loose_domain(&arg.raw).and_then(|d| policy.domains.get(&d)),
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

/// The ESMTP arguments of a copy (docs/design.md §4): the original
/// recipient as ORCPT, and NOTIFY by the domain's `bounce`.
fn copy_args(arg: &RcptArg, bounce: bool) -> String {
    let mut args = orcpt(arg);
    args.push_str(if bounce {
        " NOTIFY=FAILURE"
    } else {
        " NOTIFY=NEVER"
    });
    args
}

/// `ORCPT=rfc822;<original>`: the client's own ORCPT if it sent one (RFC
/// 3461 §4.2: it already names the original recipient), else the address
/// as received, so the relay address never leaks into DSNs.
fn orcpt(arg: &RcptArg) -> String {
    match arg.param("ORCPT").filter(|p| has_value(p)) {
        Some(p) => p.to_string(),
        None => {
            // An unqualified path (`<zed>`) names the mailbox it was
            // qualified to ([`RcptArg::qualify`]).
            let qualified;
            let mailbox = match (arg.original_mailbox(), &arg.address) {
                (Some(m), Some(a)) if !m.contains('@') => {
                    qualified = a.to_string();
                    qualified.as_str()
                }
                (m, _) => m.unwrap_or_default(),
            };
            // Room for the usual case (nothing to encode) and the NOTIFY
            // that follows.
            let mut s = String::with_capacity(32 + mailbox.len());
            s.push_str("ORCPT=rfc822;");
            push_xtext(&mut s, mailbox);
            s
        }
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
    /// Copies not made and redirects made although the message is larger
    /// than the destination's `max_size`, for the log.
    pub too_big: Vec<TooBig>,
}

/// A recipient whose routing met the destination's `max_size`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct TooBig {
    /// The RCPT argument as received.
    pub rcpt: String,
    /// A copy (not made) or a redirect (made).
    pub decision: Decision,
    pub size: u64,
    pub limit: crate::config::MessageSize,
}

impl std::fmt::Display for TooBig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (size, limit) = (self.size, &self.limit);
        match &self.decision {
            Decision::Redirect(to) => write!(
                f,
                "{}: redirected to {to} although the message ({size} bytes) exceeds destination.max_size {limit} ({} bytes): the destination may refuse it",
                self.rcpt, limit.bytes
            ),
            other => write!(
                f,
                "{}: {other} not made: the message ({size} bytes) exceeds destination.max_size {limit} ({} bytes); delivered here only",
                self.rcpt, limit.bytes
            ),
        }
    }
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
        let mut m = Message::new(
            policy,
            Default::default(),
            Envelope::default(),
            "<s@x.example>".into(),
        );
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
