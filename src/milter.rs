//! The milter protocol shell: translates indymilter callbacks into calls on
//! [`Session`]/[`Message`] and carries out the end-of-message [`Plan`].

use crate::address::RcptArg;
use crate::decision::{Decision, Envelope, Rejection};
use crate::policy::SharedPolicy;
use crate::session::{Message, Session, LOOP_HEADER};
use indymilter::{
    Actions, Callbacks, Context, ContextActions, EomContext, MacroStage, NegotiateContext,
    SetErrorReply, SocketInfo, Status,
};
use std::ffi::{CStr, CString};
use tracing::{debug, error, info, warn};

pub fn callbacks(policy: SharedPolicy) -> Callbacks<Session> {
    Callbacks::new()
        .on_negotiate(|cx, offered, _| Box::pin(negotiate(cx, offered)))
        .on_connect(|cx, _, socket| Box::pin(connect(cx, socket)))
        .on_mail(move |cx, args| Box::pin(mail(policy.clone(), cx, args)))
        .on_rcpt(|cx, args| Box::pin(rcpt(cx, args)))
        .on_header(|cx, name, value| Box::pin(header(cx, name, value)))
        .on_eom(|cx| Box::pin(eom(cx)))
        .on_abort(|cx| Box::pin(abort(cx)))
}

async fn negotiate(cx: &mut NegotiateContext<Session>, offered: Actions) -> Status {
    let needed = Actions::ADD_RCPT | Actions::DELETE_RCPT | Actions::ADD_HEADER;
    if !offered.contains(needed) {
        // Requesting them anyway fails the negotiation, and the MTA applies
        // its default action (tempfail): nothing is delivered unrouted.
        error!("the MTA does not allow adding/deleting recipients and adding headers ({offered:?}); dualroute cannot work with it");
    }
    // Recipients with ESMTP parameters (ORCPT, NOTIFY) when the MTA can;
    // otherwise plain (see eom).
    cx.requested_actions |= needed | (offered & Actions::ADD_RCPT_EXT);
    // `{auth_authen}` decides `require_gateway`; the queue id `i` is only
    // known at end of message on Postfix (DESIGN.md §8).
    cx.requested_macros
        .insert(MacroStage::Mail, c"{auth_authen}".into());
    cx.requested_macros.insert(MacroStage::Eom, c"i".into());
    // `{rcpt_addr}`: the MTA's own parse of the RCPT argument, the mailbox
    // it will deliver to; the decision is checked against it (src/decision.rs).
    cx.requested_macros
        .insert(MacroStage::Rcpt, c"{rcpt_addr}".into());
    cx.data = Some(Session::default());
    Status::Continue
}

/// `{client_addr}` is not in Postfix's default macro lists; the connect
/// stage's socket address is always there.
async fn connect(cx: &mut Context<Session>, socket: SocketInfo) -> Status {
    let session = cx.data.get_or_insert_with(Session::default);
    session.client = match socket {
        SocketInfo::Inet(addr) => Some(addr.ip()),
        _ => None,
    };
    Status::Continue
}

fn text(s: &CStr) -> String {
    s.to_string_lossy().into_owned()
}

async fn mail(policy: SharedPolicy, cx: &mut Context<Session>, args: Vec<CString>) -> Status {
    let auth = cx
        .macros
        .get(c"{auth_authen}")
        .map(text)
        .filter(|s| !s.is_empty());
    let snapshot = crate::policy::current(&policy);
    let session = cx.data.get_or_insert_with(Session::default);
    let envelope = Envelope {
        client: session.client,
        auth,
    };
    let sender = args.first().map(|s| text(s)).unwrap_or_default();
    session.message = Some(Message::new(snapshot, envelope, sender));
    Status::Continue
}

async fn rcpt(cx: &mut Context<Session>, args: Vec<CString>) -> Status {
    // Only valid UTF-8 is parsed: a delete must repeat the argument byte for
    // byte, which a lossy conversion could not.
    let strings: Option<Vec<&str>> = args.iter().map(|a| a.to_str().ok()).collect();
    let arg = match strings {
        Some(s) => RcptArg::parse(&s),
        None => RcptArg {
            raw: args.first().map(|a| text(a)).unwrap_or_default(),
            address: None,
            params: Vec::new(),
        },
    };
    let mta = cx.macros.get(c"{rcpt_addr}").map(text);
    let Some(message) = cx.data.as_mut().and_then(|s| s.message.as_mut()) else {
        return Status::Continue;
    };
    let verdict = message.rcpt(arg, mta.as_deref()).clone();
    let shown = args.first().map(|a| text(a)).unwrap_or_default();
    let from = cx
        .data
        .as_ref()
        .and_then(|s| s.message.as_ref())
        .map(|m| m.sender.as_str());
    // A refused recipient never reaches end of message, where the message's
    // line is logged: say it now, as Postfix logs its own "NOQUEUE: reject".
    if matches!(
        verdict.decision,
        Decision::Reject(_) | Decision::Tempfail(_)
    ) {
        info!(
            "NOQUEUE: RCPT {shown}: {} ({}); from={}, MTA address {}",
            verdict.decision,
            verdict.rule,
            from.unwrap_or(""),
            mta.as_deref().unwrap_or("-")
        );
    } else {
        debug!(
            "RCPT {shown}: {} ({}); MTA address {}",
            verdict.decision,
            verdict.rule,
            mta.as_deref().unwrap_or("-")
        );
    }
    match &verdict.decision {
        Decision::Reject(r) => refuse(&mut cx.reply, r, Status::Reject),
        Decision::Tempfail(r) => refuse(&mut cx.reply, r, Status::Tempfail),
        _ => Status::Continue,
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
    if let Some(m) = cx.data.as_mut().and_then(|s| s.message.as_mut()) {
        m.header(&text(&name), &text(&value));
    }
    Status::Continue
}

async fn eom(cx: &mut EomContext<Session>) -> Status {
    let Some(message) = cx.data.as_mut().and_then(|s| s.message.take()) else {
        return Status::Continue;
    };
    let queue_id = cx
        .macros
        .get(c"i")
        .map(text)
        .unwrap_or_else(|| "NOQUEUE".into());
    let plan = message.plan();
    if plan.refuse_loop {
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
        warn!(
            queue_id = %queue_id,
            from = %message.sender,
            "the message already carries {LOOP_HEADER}: {}: delivered here without copies (mail loop?): {}",
            message.policy.config.instance,
            message.summary()
        );
        return Status::Continue;
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
            info!(queue_id = %queue_id, from = %message.sender, "{}", message.summary());
            Status::Continue
        }
        Err(e) => {
            // The MTA applies none of a failed message's changes; a
            // temporary failure makes the client retry (nothing lost).
            error!(queue_id = %queue_id, "could not send end-of-message actions: {e}; tempfail");
            Status::Tempfail
        }
    }
}

async fn abort(cx: &mut Context<Session>) -> Status {
    if let Some(session) = cx.data.as_mut() {
        session.message = None;
    }
    Status::Continue
}
