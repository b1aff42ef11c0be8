//! The milter protocol shell: translates indymilter callbacks into calls on
//! [`Session`]/[`Message`] and carries out the end-of-message [`Plan`].
//!
//! Over 700 lines because it is one conversation, callback by callback,
//! in the order the MTA calls them (negotiation, connect, MAIL, RCPT,
//! headers, end of message); what is not the protocol lives beside it
//! (src/session.rs: the message's state; milter/callout.rs: the
//! destination's answer at RCPT).

mod callout;

use crate::address::RcptArg;
use crate::decision::{Decision, Envelope, Rejection};
use crate::holds::LiveHolds;
use crate::live::LivePolicy;
use crate::metrics::Kind;
use crate::metrics::Metrics;
use crate::notify::Outbox;
use crate::session::{
    managed_domain, Message, Plan, Rcpt, Session, LOOP_HEADER, NOTIFY_TOKEN_HEADER,
};
use indymilter::{
    Actions, Callbacks, Context, ContextActions, EomContext, MacroStage, NegotiateContext,
    ProtoOpts, SetErrorReply, SocketInfo, Status,
};
use std::borrow::Cow;
use std::ffi::{CStr, CString};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, error, info, warn};

/// What the callbacks use of the running service (the policy in force,
/// each message keeping the one it began with; the holds, read per RCPT;
/// the counters; the outbox, which knows the milter's own notifications;
/// the callout engine of `reject_unknown`).
/// `run` hands it over (src/service/mod.rs).
pub(crate) struct Shared {
    pub policy: Arc<LivePolicy>,
    pub holds: Arc<LiveHolds>,
    pub metrics: Arc<Metrics>,
    pub outbox: Arc<Outbox>,
    /// The callout engine (src/milter/callout.rs); `None` when its
    /// resolver could not be built.
    pub callouts: Option<Arc<crate::callout::Callouts>>,
}

pub(crate) fn callbacks(shared: Arc<Shared>) -> Callbacks<Session> {
    let (at_negotiate, at_rcpt, at_eom) = (shared.clone(), shared.clone(), shared.clone());
    Callbacks::new()
        .on_negotiate(move |cx, offered, opts| {
            // The body only when some domain has a size limit: counting it
            // is all it is needed for, and it is the bulk of the traffic.
            let want_body = at_negotiate
                .policy
                .current()
                .domains
                .values()
                .any(|d| d.config.max_size.is_some());
            let shared = at_negotiate.clone();
            Box::pin(negotiate(shared, cx, offered, opts, want_body))
        })
        .on_connect(|cx, hostname, socket| Box::pin(connect(cx, hostname, socket)))
        .on_mail(move |cx, args| Box::pin(mail(shared.clone(), cx, args)))
        .on_rcpt(move |cx, args| Box::pin(rcpt(at_rcpt.clone(), cx, args)))
        .on_header(|cx, name, value| {
            Box::pin(async move {
                let status = header(cx, name, value).await;
                quiet(cx, ProtoOpts::NOREPLY_HEADER, status)
            })
        })
        .on_body(|cx, chunk| {
            Box::pin(async move {
                if let Some(m) = cx.data.as_mut().and_then(|s| s.message.as_mut()) {
                    m.size.body(chunk.len());
                }
                quiet(cx, ProtoOpts::NOREPLY_BODY, Status::Continue)
            })
        })
        .on_eom(move |cx| Box::pin(eom(at_eom.clone(), cx)))
        .on_abort(|cx| Box::pin(abort(cx)))
}

/// Actions dualroute cannot route without: copies and redirects are added
/// recipients, a redirect deletes the original, and routed mail carries the
/// loop header.
const NEEDED_ACTIONS: Actions = Actions::ADD_RCPT
    .union(Actions::DELETE_RCPT)
    .union(Actions::ADD_HEADER);

/// Stages dualroute never looks at; the MTA need not send them
/// (`SMFIP_NO*`). HELO, DATA, end of headers, the body and unknown SMTP
/// commands play no part in the decision (docs/design.md §2); connect (client
/// address), MAIL, RCPT, the headers (loop header) and end of message do.
/// The body is asked for after all when a domain has `max_size`
/// ([`Negotiation::with_body`]).
const SKIPPED_STAGES: ProtoOpts = ProtoOpts::NO_HELO
    .union(ProtoOpts::NO_DATA)
    .union(ProtoOpts::NO_EOH)
    .union(ProtoOpts::NO_BODY)
    .union(ProtoOpts::NO_UNKNOWN);

/// Stages whose reply is always "continue", so the MTA need not wait for it
/// (`SMFIP_NR_*`, protocol 6): one round trip less per header line, per
/// MAIL and per connection. RCPT must be able to refuse, so it replies; a
/// stage listed here can never refuse (its reply is not sent), so take it
/// out before making its callback return anything but `Continue`.
const QUIET_STAGES: ProtoOpts = ProtoOpts::NOREPLY_CONNECT
    .union(ProtoOpts::NOREPLY_MAIL)
    .union(ProtoOpts::NOREPLY_HEADER);

async fn negotiate(
    shared: Arc<Shared>,
    cx: &mut NegotiateContext<Session>,
    offered: Actions,
    offered_opts: ProtoOpts,
    want_body: bool,
) -> Status {
    shared.metrics.conversation();
    let mut offer = negotiation(offered, offered_opts);
    if want_body {
        offer = offer.with_body(offered_opts);
    }
    if !offer.missing.is_empty() {
        shared.metrics.error("mta_offer");
    }
    // Every connection of an MTA offers the same: say it once, not per
    // SMTP session.
    if let Some(problem) = offer.problem() {
        static REPORTED: std::sync::Mutex<Vec<(Actions, ProtoOpts)>> =
            std::sync::Mutex::new(Vec::new());
        let mut reported = REPORTED.lock().unwrap_or_else(|e| e.into_inner());
        if !reported.contains(&(offered, offered_opts)) {
            reported.push((offered, offered_opts));
            match problem {
                OfferProblem::Missing(text) => error!("{text}"),
                OfferProblem::Degraded(text) => warn!("{text}"),
            }
        }
    }
    // Only what the MTA offers: asking for more makes indymilter drop the
    // connection, and the MTA then applies its default action to every
    // message of the session (Postfix: 451 4.7.1 at CONNECT, HELO and MAIL).
    cx.requested_actions = offer.actions;
    cx.requested_opts = offer.opts;
    // `{auth_authen}` decides `require_gateway`; the queue id `i` is only
    // known at end of message on Postfix (docs/design.md §8). An MTA that does
    // not take macro requests sends its default lists, which on Postfix
    // hold both.
    cx.requested_macros
        .insert(MacroStage::Mail, c"{auth_authen}".into());
    cx.requested_macros.insert(MacroStage::Eom, c"i".into());
    // `{rcpt_addr}`: the MTA's own parse of the RCPT argument, the mailbox
    // it will deliver to; the decision is checked against it (src/decision.rs).
    cx.requested_macros
        .insert(MacroStage::Rcpt, c"{rcpt_addr}".into());
    cx.data = Some(Session {
        no_reply: offer.opts & (QUIET_STAGES | ProtoOpts::NOREPLY_BODY),
        ..Session::default()
    });
    Status::Continue
}

/// What dualroute asks of an MTA's offer, and what the offer lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiation {
    pub actions: Actions,
    pub opts: ProtoOpts,
    /// Needed actions the MTA does not offer.
    pub missing: Actions,
    /// What works, but less well, with this offer.
    pub degraded: Vec<&'static str>,
}

/// How the offer falls short, as the one log line an admin reads.
pub enum OfferProblem {
    /// Routed mail cannot be delivered: ERROR.
    Missing(String),
    /// Everything is routed, with a loss: WARN.
    Degraded(String),
}

/// The MTA setting that offers everything (Postfix `milter_protocol`
/// defaults to 6 since 2.6; Sendmail offers it since 8.14).
const FULL_PROTOCOL: &str =
    "set milter_protocol = 6 in Postfix's main.cf (Sendmail: use 8.14 or later)";

/// Decides what to request from the actions and protocol options the MTA
/// offers (milter protocol versions 2 to 6 offer different sets: Postfix at
/// `milter_protocol = 2` offers no `NO_UNKNOWN`, `NO_DATA` or no-reply
/// options; at 3 no `NO_DATA` or no-reply options; at 4 no no-reply options).
pub fn negotiation(offered: Actions, offered_opts: ProtoOpts) -> Negotiation {
    let mut degraded = Vec::new();
    if !offered.contains(Actions::ADD_RCPT_EXT) {
        degraded.push("no add-recipient with ESMTP parameters: copies and redirects lose ORCPT and NOTIFY (the destination sees the relay address, and NOTIFY=NEVER on copies is lost)");
    }
    if !offered.contains(Actions::REQUEST_MACROS) {
        degraded.push("no macro requests: {auth_authen} at MAIL and i at end of message come only if the MTA's default macro lists hold them (Postfix's do: milter_mail_macros, milter_end_of_data_macros)");
    }
    if !offered_opts.contains(QUIET_STAGES) {
        degraded
            .push("no no-reply options: one more round trip per header line, MAIL and connection");
    }
    // CHANGE_HEADER deletes the notifier's token header (src/notify/);
    // without it the token is only ever honoured once.
    Negotiation {
        actions: (NEEDED_ACTIONS
            | Actions::ADD_RCPT_EXT
            | Actions::REQUEST_MACROS
            | Actions::CHANGE_HEADER)
            & offered,
        opts: (SKIPPED_STAGES | QUIET_STAGES) & offered_opts,
        missing: NEEDED_ACTIONS - offered,
        degraded,
    }
}

impl Negotiation {
    /// Asks for the body after all (`destination.max_size` counts it),
    /// without waiting for a reply to each chunk where the MTA allows.
    /// A milter that skips the body stage does so by asking; an MTA that
    /// cannot skip it sends it anyway.
    pub fn with_body(mut self, offered_opts: ProtoOpts) -> Negotiation {
        self.opts.remove(ProtoOpts::NO_BODY);
        self.opts |= ProtoOpts::NOREPLY_BODY & offered_opts;
        self
    }

    pub fn problem(&self) -> Option<OfferProblem> {
        if !self.missing.is_empty() {
            return Some(OfferProblem::Missing(format!(
                "the MTA does not allow {:?} (it offers {:?}): routed messages will be tempfailed at end of message, mail that needs no change is delivered; {FULL_PROTOCOL}",
                self.missing, self.actions
            )));
        }
        if self.degraded.is_empty() {
            return None;
        }
        Some(OfferProblem::Degraded(format!(
            "the MTA offers an older milter protocol; dualroute works with: {}; {FULL_PROTOCOL}",
            self.degraded.join("; ")
        )))
    }
}

/// `{client_addr}` is not in Postfix's default macro lists; the connect
/// stage's socket address is always there.
///
/// It also tells a non-SMTP conversation. For mail that did not come
/// through smtpd (the `sendmail` command, via postdrop and pickup),
/// Postfix's cleanup simulates connect, HELO, MAIL and RCPT for
/// `non_smtpd_milters`, from host name `localhost`, 127.0.0.1 and port 0
/// (cleanup_milter.c `cleanup_milter_client_init`: "localhost",
/// `NO_CLIENT_PORT "0"`; seen on Postfix 3.7.11, tests/postfix_e2e.rs).
/// A TCP client never has port 0 (the kernel does not hand it out as a
/// source port), so port 0 with the name `localhost` is the signal; the
/// address (127.0.0.1, or ::1 with IPv6 first) and `{daemon_name}` (the
/// same `milter_macro_daemon_name` smtpd sends) are not. Either way a
/// mistake is safe: a non-SMTP message taken for SMTP is kept queued by
/// Postfix (4.3.5), an SMTP one taken for non-SMTP is refused at end of
/// message instead of at RCPT. Sendmail runs milters on SMTP connections
/// only (its MSP submits over SMTP), where refusing at RCPT is fine.
async fn connect(cx: &mut Context<Session>, hostname: CString, socket: SocketInfo) -> Status {
    let session = cx.data.get_or_insert_with(Session::default);
    session.peer = match socket {
        SocketInfo::Inet(addr) => Some(addr),
        _ => None,
    };
    session.client = session.peer.map(|a| a.ip());
    session.non_smtp =
        session.peer.is_some_and(|a| a.port() == 0) && hostname.as_bytes() == b"localhost";
    debug!(
        "connect from {}{}",
        session
            .peer
            .map_or_else(|| "an unknown socket".to_owned(), |p| p.to_string()),
        if session.non_smtp {
            ": a non-SMTP submission (port 0): refusals wait for end of message"
        } else {
            ""
        }
    );
    quiet(cx, ProtoOpts::NOREPLY_CONNECT, Status::Continue)
}

/// `Continue` becomes no reply at all where the MTA agreed not to wait
/// for one (a reply it does not expect would desynchronise the protocol).
fn quiet(cx: &Context<Session>, stage: ProtoOpts, status: Status) -> Status {
    let no_reply = cx.data.as_ref().is_some_and(|s| s.no_reply.contains(stage));
    if no_reply && status == Status::Continue {
        Status::Noreply
    } else {
        status
    }
}

fn text(s: &CStr) -> String {
    s.to_string_lossy().into_owned()
}

/// `s` as text, borrowed when it is valid UTF-8 (the usual case; checked
/// faster than by `to_string_lossy`).
fn borrowed(s: &CStr) -> Cow<'_, str> {
    match s.to_str() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => s.to_string_lossy(),
    }
}

async fn mail(shared: Arc<Shared>, cx: &mut Context<Session>, args: Vec<CString>) -> Status {
    let started = Instant::now();
    let policy = shared.policy.current();
    // Only `require_gateway` looks at the login (src/decision.rs): a macro
    // lookup less per message without it.
    let auth = policy
        .domains
        .values()
        .any(|d| d.config.require_gateway)
        .then(|| cx.macros.get(c"{auth_authen}").map(text))
        .flatten()
        .filter(|s| !s.is_empty());
    let session = cx.data.get_or_insert_with(Session::default);
    // dualroute's own notification to the administrator: never routed
    // (src/notify/). Without a message, RCPT and end of message change
    // nothing.
    if session
        .peer
        .is_some_and(|p| shared.outbox.is_own_connection(p))
    {
        info!("MAIL from dualroute's own notifier: not routed, no changes");
        session.message = None;
        return quiet(cx, ProtoOpts::NOREPLY_MAIL, Status::Continue);
    }
    let envelope = Envelope {
        client: session.client,
        auth,
    };
    let sender = args.first().map(|s| text(s)).unwrap_or_default();
    let mut message = Message::new(policy, shared.holds.clone(), envelope, sender);
    message.non_smtp = session.non_smtp;
    let params: Vec<&str> = args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str().ok())
        .collect();
    message.size.declare(&params);
    message.busy = started.elapsed();
    session.message = Some(message);
    quiet(cx, ProtoOpts::NOREPLY_MAIL, Status::Continue)
}

async fn rcpt(shared: Arc<Shared>, cx: &mut Context<Session>, args: Vec<CString>) -> Status {
    let started = Instant::now();
    let arg = rcpt_arg(&args);
    // Borrowed, not copied, in the usual case (valid UTF-8): this runs for
    // every RCPT.
    let mta = cx.macros.get(c"{rcpt_addr}").map(borrowed);
    let Some(message) = cx.data.as_mut().and_then(|s| s.message.as_mut()) else {
        return Status::Continue;
    };
    let shown = || {
        args.first()
            .map(|a| a.to_string_lossy())
            .unwrap_or_default()
    };
    let before = message.recipients.len();
    let Rcpt {
        verdict,
        domain,
        shadow,
    } = message.rcpt(arg, mta.as_deref());
    if !matches!(
        verdict.decision,
        Decision::Reject(_) | Decision::Tempfail(_)
    ) {
        debug!(
            "RCPT {}: {} ({}); MTA address {}",
            shown(),
            verdict.decision,
            verdict.rule,
            mta.as_deref().unwrap_or("-")
        );
        message.busy += started.elapsed();
        // A recipient routed away may be refused after all when its
        // destination would refuse it (`reject_unknown`); a repeated RCPT
        // was asked about the first time.
        if message.recipients.len() > before {
            return callout::rcpt(&shared, message, &mut cx.reply, &shown()).await;
        }
        return Status::Continue;
    }
    // Refused (the rare case from here on). Refusals are counted now: the
    // recipient never reaches end of message, where the others are.
    if let Some(domain) = domain {
        shared
            .metrics
            .decision(&domain.name, Kind::of(&verdict.decision), shadow);
    }
    let verdict = verdict.clone();
    message.busy += started.elapsed();
    if shadow {
        // Shadow mode (docs/rollout.md): the decision is logged and
        // counted, and the recipient is accepted as without the milter.
        info!(
            "shadow mode: RCPT {}: would {} ({}); accepted; from={}, MTA address {}",
            shown(),
            verdict.decision,
            verdict.rule,
            message.sender,
            mta.as_deref().unwrap_or("-")
        );
        return Status::Continue;
    }
    // Postfix's cleanup calls a refusal of a simulated RCPT a "milter
    // configuration error" and keeps the message with 4.3.5
    // (cleanup_milter.c `cleanup_milter_emul_rcpt`): on a non-SMTP
    // submission the refusal waits for end of message, where it applies
    // to the whole message (docs/design.md "Local submission").
    if message.non_smtp {
        info!(
            "RCPT {}: {} ({}); non-SMTP submission: the whole message gets it at end of message; from={}",
            shown(),
            verdict.decision,
            verdict.rule,
            message.sender
        );
        return Status::Continue;
    }
    // A refused recipient never reaches end of message, where the message's
    // line is logged: say it now, as Postfix logs its own "NOQUEUE: reject".
    info!(
        "NOQUEUE: RCPT {}: {} ({}); from={}, MTA address {}",
        shown(),
        verdict.decision,
        verdict.rule,
        message.sender,
        mta.as_deref().unwrap_or("-")
    );
    match &verdict.decision {
        Decision::Reject(r) => refuse(&mut cx.reply, r, Status::Reject),
        Decision::Tempfail(r) => refuse(&mut cx.reply, r, Status::Tempfail),
        _ => Status::Continue,
    }
}

/// The RCPT arguments, parsed. Only valid UTF-8 is parsed: a delete must
/// repeat the argument byte for byte, which a lossy conversion could not.
/// (Postfix sends one argument per parameter: the usual RCPT has one or
/// two, read without a vector of their own.)
fn rcpt_arg(args: &[CString]) -> RcptArg {
    let mut few = [""; 4];
    if args.len() <= few.len()
        && args
            .iter()
            .zip(few.iter_mut())
            .all(|(a, slot)| a.to_str().map(|s| *slot = s).is_ok())
    {
        return RcptArg::parse(&few[..args.len()]);
    }
    let strings: Option<Vec<&str>> = args.iter().map(|a| a.to_str().ok()).collect();
    match strings {
        Some(s) => RcptArg::parse(&s),
        None => RcptArg {
            raw: args.first().map(|a| text(a)).unwrap_or_default(),
            address: None,
            params: Vec::new(),
        },
    }
}

/// Refuses with the rejection's own reply; should the reply not be
/// accepted, the MTA's default reply of the same class still refuses.
fn refuse(reply: &mut impl SetErrorReply, r: &Rejection, status: Status) -> Status {
    if let Err(e) = reply.set_error_reply(r.code, Some(r.xcode), [r.text.as_str()]) {
        error!("cannot set reply {r}: {e}");
    }
    status
}

async fn header(cx: &mut Context<Session>, name: CString, value: CString) -> Status {
    let started = Instant::now();
    // Borrowed, not copied, in the usual case (valid UTF-8): this runs
    // for every header line of every message.
    if let Some(m) = cx.data.as_mut().and_then(|s| s.message.as_mut()) {
        m.header(&name.to_string_lossy(), &value.to_string_lossy());
        m.busy += started.elapsed();
    }
    Status::Continue
}

async fn eom(shared: Arc<Shared>, cx: &mut EomContext<Session>) -> Status {
    let started = Instant::now();
    let Some(message) = cx.data.as_mut().and_then(|s| s.message.take()) else {
        return Status::Continue;
    };
    let status = end_of_message(&shared, cx, &message).await;
    shared
        .metrics
        .message_time(message.busy + started.elapsed());
    status
}

/// Counts the decisions for the recipients that reached end of message
/// (refusals were counted at RCPT). A copy or redirect not made because
/// the message carries our own loop header counts as `loop`, in shadow
/// mode too: that is what live mode would have done.
fn count_decisions(shared: &Shared, message: &Message) {
    for r in message.recipients.iter().filter(|r| r.managed) {
        // Its domain as the policy names it: the parsed one, which found
        // the domain at RCPT (not looked up again per recipient).
        let domain = match &r.arg.address {
            Some(a) => a.domain.as_str(),
            None => match managed_domain(&message.policy, &r.arg) {
                Some(d) => d.name.as_str(),
                None => continue,
            },
        };
        let routes = matches!(
            r.verdict.decision,
            Decision::Copy(_) | Decision::Redirect(_)
        );
        let kind = if routes && message.loop_header {
            Kind::Loop
        } else {
            Kind::of(&r.verdict.decision)
        };
        shared.metrics.decision(domain, kind, r.shadow);
    }
}

/// What live mode would do beyond `plan` (the shadowed domains' part), in
/// words for the log; empty when nothing.
fn shadowed_actions(plan: &Plan, would: &Plan) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    if would.refuse_loop && !plan.refuse_loop {
        words.push(format!(
            "refuse the message with 554 5.4.6 (routing loop: it already carries {LOOP_HEADER})"
        ));
    } else if would.loop_detected && !plan.loop_detected {
        words.push(format!(
            "make no copies (routing loop: it already carries {LOOP_HEADER})"
        ));
    }
    for (rcpt, args) in would.add.iter().filter(|a| !plan.add.contains(a)) {
        words.push(format!("add {rcpt} {args}"));
    }
    for rcpt in would.delete.iter().filter(|d| !plan.delete.contains(d)) {
        words.push(format!("delete {rcpt}"));
    }
    if let (Some(value), None) = (&would.header, &plan.header) {
        words.push(format!("add {LOOP_HEADER}: {value}"));
    }
    words
}

async fn end_of_message(
    shared: &Shared,
    cx: &mut EomContext<Session>,
    message: &Message,
) -> Status {
    let queue_id = cx
        .macros
        .get(c"i")
        .map_or(Cow::Borrowed("NOQUEUE"), borrowed);
    // The notifier's token never stays in a message (src/notify/).
    delete_token_headers(&cx.actions, message, &queue_id).await;
    if message.non_smtp {
        // Our own notification, submitted with the `sendmail` command: not
        // routed, as on the SMTP path (src/notify/).
        if shared.outbox.is_own_token(&message.notify_tokens) {
            info!(queue_id = %queue_id, from = %message.sender, "message from dualroute's own notifier (sendmail): not routed, no changes");
            return Status::Continue;
        }
        // What would have been refused at RCPT (src/milter.rs `rcpt`).
        if let Some(decision) = message.refusal_at_end() {
            // The refusals were counted at RCPT; the other recipients
            // count when the message comes back, as after any refusal.
            let (r, status, what) = match &decision {
                Decision::Tempfail(r) => (
                    r,
                    Status::Tempfail,
                    "tempfailed: Postfix keeps it in the maildrop and pickup retries it",
                ),
                Decision::Reject(r) => (
                    r,
                    Status::Reject,
                    "refused: Postfix returns it to the sender",
                ),
                _ => return Status::Continue,
            };
            info!(
                queue_id = %queue_id,
                from = %message.sender,
                "non-SMTP submission {what} with {r}: {}",
                message.summary()
            );
            return refuse(&mut cx.reply, r, status);
        }
    }
    let plan = message.plan();
    // Shadow mode (docs/rollout.md): what live mode would have done with
    // the shadowed domains' recipients is logged, not done. (Without a
    // shadowed recipient the two plans are the same: not planned twice.)
    let shadowed = message.recipients.iter().any(|r| r.shadow);
    let would = match shadowed {
        true => shadowed_actions(&plan, &message.plan_if_live()),
        false => Vec::new(),
    };
    if !would.is_empty() {
        info!(
            queue_id = %queue_id,
            from = %message.sender,
            "shadow mode: changed nothing; live mode would: {}",
            would.join("; ")
        );
    }
    if plan.refuse_loop {
        count_decisions(shared, message);
        let r = Rejection {
            code: "554",
            xcode: "5.4.6",
            text: format!(
                "message refused: routing loop detected (it already carries {LOOP_HEADER}: {})",
                message.policy.config.instance
            ),
        };
        warn!(
            queue_id = %queue_id,
            from = %message.sender,
            "routing loop: the message already carries {LOOP_HEADER}: {} and would be redirected again; refused with {r}: {}",
            message.policy.config.instance,
            message.summary()
        );
        return refuse(&mut cx.reply, &r, Status::Reject);
    }
    if plan.loop_detected {
        count_decisions(shared, message);
        warn!(
            queue_id = %queue_id,
            from = %message.sender,
            "the message already carries {LOOP_HEADER}: {}: delivered here without copies (mail loop?): {}",
            message.policy.config.instance,
            message.summary()
        );
        return Status::Continue;
    }
    for t in &plan.too_big {
        // Hook for the metrics: count copies skipped and oversized
        // redirects per domain here.
        match t.decision {
            Decision::Redirect(_) => warn!(queue_id = %queue_id, from = %message.sender, "{t}"),
            _ => info!(queue_id = %queue_id, from = %message.sender, "{t}"),
        }
    }
    let result: Result<(), indymilter::ActionError> = async {
        for (rcpt, args) in &plan.add {
            match cx.actions.add_recipient_ext(rcpt.as_str(), Some(args.as_str())).await {
                // An MTA without add-recipient-with-parameters (Postfix
                // before milter_protocol 6, Sendmail before 8.14): add the
                // recipient plainly rather than tempfail every routed
                // message; ORCPT and NOTIFY are lost, so say so.
                Err(indymilter::ActionError::NotAvailable) => {
                    warn!(queue_id = %queue_id, "the MTA did not grant add-recipient with ESMTP parameters (set milter_protocol = 6): {rcpt} added without {args}");
                    cx.actions.add_recipient(rcpt.as_str()).await?;
                }
                other => other?,
            }
        }
        for rcpt in &plan.delete {
            cx.actions.delete_recipient(rcpt.as_str()).await?;
        }
        if let Some(value) = &plan.header {
            cx.actions.add_header(LOOP_HEADER, value.as_str()).await?;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            count_decisions(shared, message);
            info!(queue_id = %queue_id, from = %message.sender, "{}", message.summary());
            Status::Continue
        }
        Err(e) => {
            // The MTA applies none of a failed message's changes; a
            // temporary failure makes the client retry (nothing lost, and
            // its decisions are counted when it comes back).
            shared.metrics.error("eom_actions");
            error!(queue_id = %queue_id, "could not send end-of-message actions: {e}; tempfail");
            Status::Tempfail
        }
    }
}

/// Deletes every [`NOTIFY_TOKEN_HEADER`] of the message, last first (an
/// index counts the header's occurrences, RFC-less milter convention):
/// a token, ours or forged, never reaches a mailbox. An MTA that does not
/// allow header changes keeps it (the token is honoured once anyway).
async fn delete_token_headers(actions: &impl ContextActions, message: &Message, queue_id: &str) {
    for index in (1..=message.notify_tokens.len()).rev() {
        let index = i32::try_from(index).unwrap_or(i32::MAX);
        if let Err(e) = actions
            .change_header(NOTIFY_TOKEN_HEADER, index, None::<&str>)
            .await
        {
            warn!(queue_id = %queue_id, "cannot delete the {NOTIFY_TOKEN_HEADER} header: {e}");
            return;
        }
    }
}

async fn abort(cx: &mut Context<Session>) -> Status {
    if let Some(session) = cx.data.as_mut() {
        session.message = None;
    }
    Status::Continue
}
