//! Mail to the administrator when something needs a human (`notify:`,
//! README "Notification by mail"): the breaker tripped, verification of a
//! destination failed or passed again, a reload was refused.
//!
//! The rules, and why:
//! - **A failure to notify never touches mail flow.** The hooks only put
//!   an [`Event`] in a bounded queue ([`QUEUE`] events; more are counted
//!   and mentioned, not kept) and return; one task of its own ([`run`])
//!   sends, with a timeout on every step, and logs what it could not send.
//! - **No storm.** At most one message per `notify.interval` (default
//!   10 min); what happens in between is gathered into the next message.
//!   The first event after a quiet interval goes out at once (after
//!   [`GATHER`], so that events of one moment travel together).
//!   Verification is reported on a change only (failing after passing or
//!   at the first probe, passing after failing), not at every retry.
//! - **Never routed by dualroute itself.** The message goes through the
//!   local MTA, which hands it to this milter like any other. The loop
//!   header cannot mark it (`X-Dualroute` means "routed already": a
//!   redirect would be refused with 554), and no header could keep the
//!   RCPT stage, which comes first, from deciding. So the notifier
//!   remembers the local address and port of its own SMTP connection while
//!   it is open, and the milter, which learns the client's address and
//!   port at connect (Postfix and Sendmail both pass the port), leaves a
//!   session from exactly there alone: no decision, no change. An outside
//!   client cannot connect from our own socket, so nobody can borrow the
//!   mark. Postfix's `sendmail` command reaches the milter through
//!   cleanup (`non_smtpd_milters`), in a simulated conversation from
//!   127.0.0.1 port 0 that anyone's `sendmail` shares: there the mark is a
//!   header instead, [`NOTIFY_TOKEN_HEADER`], the first of the message,
//!   with a random token made for that one message and known only to
//!   this process. The milter checks it at end of message (where it
//!   decides everything on that path anyway), honours it once, and
//!   deletes the header from every message, so a token never reaches a
//!   mailbox where someone could read and reuse it.
//!   Sendmail's `sendmail` command submits over SMTP from a port we do not
//!   know, which is why `via: sendmail` is refused with `mta: sendmail`.
//! - **Automatic**: `Auto-Submitted: auto-generated` (RFC 3834 §5), so
//!   vacation responders stay quiet.
//!
//! The files: [`Event`] and its texts (`event.rs`), the [`Outbox`] shared
//! with the milter (`outbox.rs`), the message (`message.rs`, lettre's
//! builder) and the ways it goes to the MTA (`send.rs`, lettre's SMTP
//! client on a socket of our own).
//!
//! [`NOTIFY_TOKEN_HEADER`]: crate::session::NOTIFY_TOKEN_HEADER

mod event;
mod message;
mod outbox;
mod send;

pub use event::Event;
pub use outbox::Outbox;

use crate::config::{NotifyConfig, NotifyVia};
use crate::live::LivePolicy;
use crate::state;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events waiting to be sent, at most; later ones are counted as dropped.
pub const QUEUE: usize = 50;
/// How long the first event waits for others of the same moment.
pub const GATHER: Duration = Duration::from_secs(1);
/// Per SMTP step, and for the `sendmail` command as a whole.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// A message that could not be sent is tried again this often ...
const RETRY: Duration = Duration::from_secs(60);
/// ... this many times in all, then given up (the log has every event).
const ATTEMPTS: u32 = 5;

/// Sends the queued events for the life of the service (see the module
/// documentation for the rate limit). Follows reloads: the `notify:` in
/// force when a message is sent is the one used; without it, events are
/// dropped.
pub async fn run(policy: Arc<LivePolicy>, outbox: Arc<Outbox>) {
    let mut last_sent: Option<Instant> = None;
    let mut batch: Vec<(u64, Event)> = Vec::new();
    let mut dropped = 0;
    let mut attempts = 0;
    loop {
        if batch.is_empty() {
            outbox.wait().await;
            tokio::time::sleep(GATHER).await;
        }
        let Some(config) = policy.current().config.notify.clone() else {
            let _ = outbox.take();
            batch.clear();
            continue;
        };
        if let Some(due) = last_sent.map(|t| t + config.interval.0) {
            tokio::time::sleep_until(due.into()).await;
        }
        let (more, lost) = outbox.take();
        batch.extend(more);
        dropped += lost;
        if batch.is_empty() && dropped == 0 {
            continue;
        }
        let instance = policy.current().config.instance.clone();
        let result = send(&outbox, &config, &instance, &batch, dropped).await;
        match result {
            Ok(()) => {
                // Only a message that went out counts for the rate limit:
                // a failed one is retried after RETRY, not after interval.
                last_sent = Some(Instant::now());
                tracing::info!(
                    "notified {} of {} event(s) via {}",
                    recipients(&config).join(", "),
                    batch.len(),
                    config.via
                );
                batch.clear();
                dropped = 0;
                attempts = 0;
            }
            Err(e) => {
                attempts += 1;
                if attempts >= ATTEMPTS {
                    tracing::error!(
                        "cannot notify {} via {}: {e}; gave up after {attempts} attempts on {} event(s) (they are in this log)",
                        recipients(&config).join(", "),
                        config.via,
                        batch.len()
                    );
                    batch.clear();
                    dropped = 0;
                    attempts = 0;
                } else {
                    tracing::warn!(
                        "cannot notify {} via {}: {e}; trying again in {}s",
                        recipients(&config).join(", "),
                        config.via,
                        RETRY.as_secs()
                    );
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }
}

fn recipients(config: &NotifyConfig) -> Vec<String> {
    config.to.iter().map(|a| a.0.to_string()).collect()
}

fn sender(config: &NotifyConfig, instance: &str) -> String {
    match &config.from {
        Some(a) => a.0.to_string(),
        None => format!("dualroute@{instance}"),
    }
}

async fn send(
    outbox: &Outbox,
    config: &NotifyConfig,
    instance: &str,
    events: &[(u64, Event)],
    dropped: usize,
) -> Result<(), String> {
    let from = sender(config, instance);
    let to = recipients(config);
    let now = state::now();
    match &config.via {
        NotifyVia::Smtp { host, port } => {
            let message = message::render(instance, &from, &to, events, dropped, now, None)?;
            send::smtp(outbox, host, *port, instance, &message).await
        }
        NotifyVia::Sendmail(path) => {
            // Through cleanup and non_smtpd_milters: the token marks the
            // message as ours (module documentation).
            let token = outbox.token().await?;
            let message =
                message::render(instance, &from, &to, events, dropped, now, Some(&token))?;
            send::sendmail(path, &message).await
        }
    }
}
