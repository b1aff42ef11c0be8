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
//!   header instead, [`NOTIFY_TOKEN_HEADER`] with a random token made for
//!   that one message and known only to this process. The milter checks it
//!   at end of message (where it decides everything on that path anyway),
//!   honours it once, and deletes the header from every message, so a
//!   token never reaches a mailbox where someone could read and reuse it.
//!   Sendmail's `sendmail` command submits over SMTP from a port we do not
//!   know, which is why `via: sendmail` is refused with `mta: sendmail`.
//! - **Automatic**: `Auto-Submitted: auto-generated` (RFC 3834 §5), so
//!   vacation responders stay quiet.

use crate::config::{NotifyConfig, NotifyVia};
use crate::live::LivePolicy;
use crate::session::NOTIFY_TOKEN_HEADER;
use crate::state::{self, TripCause, Tripped};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader};

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
/// RFC 5322 §2.1.1: at most 998 characters a line; long log lines are
/// broken well before that.
const LINE: usize = 900;
/// How long a token of a message given to the `sendmail` command is
/// honoured: long enough for a message that waits in the maildrop while
/// Postfix or the milter is down, short enough that a token cannot be kept.
const TOKEN_LIFE: Duration = Duration::from_secs(24 * 3600);
/// Tokens waiting to be seen, at most (6 messages an hour at the default
/// interval, 5 attempts each).
const TOKENS: usize = 256;

/// Something the administrator should hear of.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Event {
    /// The breaker switched routing for `domain` off.
    Tripped { domain: String, trip: Tripped },
    /// The destination did not accept the probe address (first failure).
    VerificationFailed {
        domain: String,
        address: String,
        detail: String,
    },
    /// The destination accepts the probe address again: routing starts.
    VerificationPassed {
        domain: String,
        address: String,
        detail: String,
    },
    /// A reload kept the running configuration.
    ReloadRefused { reason: String },
}

impl Event {
    /// The verification event a probe result is worth, if any: a change
    /// only, so a destination that stays down is reported once, not at
    /// every retry (`previous` is the last recorded probe of the same
    /// target).
    pub fn verification(
        domain: &str,
        previous: Option<&state::Verification>,
        now: &state::Verification,
        address: &str,
    ) -> Option<Event> {
        let (domain, address, detail) = (domain.to_owned(), address.to_owned(), now.detail.clone());
        match (previous.map(|p| p.passed), now.passed) {
            (Some(false), true) => Some(Event::VerificationPassed {
                domain,
                address,
                detail,
            }),
            (None | Some(true), false) => Some(Event::VerificationFailed {
                domain,
                address,
                detail,
            }),
            _ => None,
        }
    }

    /// A few words for the subject.
    pub fn subject(&self) -> String {
        match self {
            Event::Tripped { domain, trip } if trip.cause == TripCause::Deferrals => {
                format!("{domain}: routing switched off: too many deferrals")
            }
            Event::Tripped { domain, .. } => {
                format!("{domain}: routing switched off by the bounce breaker")
            }
            Event::VerificationFailed { domain, .. } => {
                format!("{domain}: verification of the destination failed")
            }
            Event::VerificationPassed { domain, .. } => {
                format!("{domain}: verification passed, routing is on")
            }
            Event::ReloadRefused { .. } => {
                "reload refused, the running configuration stays".to_owned()
            }
        }
    }

    /// What happened, what it means for mail, and what to do.
    pub fn body(&self) -> String {
        match self {
            Event::Tripped { domain, trip } => {
                let window = crate::config::human(Duration::from_secs(trip.window_secs));
                let what = match trip.cause {
                    TripCause::Bounces => format!(
                        "{} permanent failures of routed mail within {window} ({} deferrals)",
                        trip.bounces, trip.deferrals
                    ),
                    TripCause::Deferrals => format!(
                        "{} temporary failures (deferrals) of routed mail within {window} ({} permanent failures): the destination throttles new senders or cannot be reached",
                        trip.deferrals, trip.bounces
                    ),
                };
                let mut recent = trip.recent.clone();
                if recent.is_empty() {
                    recent.push(trip.last.clone());
                }
                let lines: Vec<String> = recent.iter().map(|l| format!("  {l}")).collect();
                format!(
                    "The breaker switched routing for {domain} off at {}: {what}.\n\nMailboxes here still get their mail; addresses that would be routed are refused with 451 4.4.4 (senders retry) until routing is back on. This stays so across restarts.\n\nThe last failures it counted:\n{}\n\nCheck the destination, then switch routing back on with:\n\n  dualroute enable {domain}\n",
                    state::when(trip.since),
                    lines.join("\n")
                )
            }
            Event::VerificationFailed {
                domain,
                address,
                detail,
            } => format!(
                "The destination of {domain} did not accept the probe address {address}: {detail}\n\nRouting for {domain} stays off (addresses that would be routed are refused with 451 4.4.4) until it does; the probe is retried (30 s, doubling to 10 min). `dualroute verify {domain}` shows each step; `dualroute status` the state.\n"
            ),
            Event::VerificationPassed {
                domain,
                address,
                detail,
            } => format!(
                "The destination of {domain} accepts the probe address {address} again ({detail}): routing for {domain} is on.\n"
            ),
            Event::ReloadRefused { reason } => format!(
                "A reload was refused; dualroute keeps running the configuration and accounts it had:\n\n  {reason}\n\nFix the file or the account source, then reload again (systemctl reload dualroute). `dualroute status` shows the refusal until a reload succeeds.\n"
            ),
        }
    }
}

/// The queue between the hooks and the sender, and the connections the
/// sender has open (for the milter to recognise). One per running
/// service, shared by handle.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: Mutex<Pending>,
    wake: tokio::sync::Notify,
    own: Mutex<Vec<SocketAddr>>,
    /// Tokens of messages given to the `sendmail` command, not yet seen
    /// by the milter, and when they were made.
    tokens: Mutex<VecDeque<(String, Instant)>>,
}

#[derive(Debug, Default)]
struct Pending {
    events: VecDeque<(u64, Event)>,
    dropped: usize,
}

impl Outbox {
    fn push(&self, event: Event) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.events.len() >= QUEUE {
            p.dropped += 1;
        } else {
            p.events.push_back((state::now(), event));
        }
        drop(p);
        self.wake.notify_one();
    }

    fn take(&self) -> (Vec<(u64, Event)>, usize) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = std::mem::take(&mut p.dropped);
        (p.events.drain(..).collect(), dropped)
    }

    fn is_empty(&self) -> bool {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.events.is_empty() && p.dropped == 0
    }

    /// Marks `addr` as the local end of one of our own connections to the
    /// MTA until the guard is dropped.
    fn own(&self, addr: SocketAddr) -> OwnConnection<'_> {
        self.own
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(addr);
        OwnConnection { outbox: self, addr }
    }
}

impl Outbox {
    /// A new token for one message given to the `sendmail` command: 128
    /// bits from the kernel's random source, in hex.
    async fn token(&self) -> Result<String, String> {
        use tokio::io::AsyncReadExt as _;
        let mut bytes = [0u8; 16];
        let mut random = tokio::fs::File::open("/dev/urandom")
            .await
            .map_err(|e| format!("/dev/urandom: {e}"))?;
        random
            .read_exact(&mut bytes)
            .await
            .map_err(|e| format!("/dev/urandom: {e}"))?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if tokens.len() >= TOKENS {
            tokens.pop_front();
        }
        tokens.push_back((token.clone(), Instant::now()));
        Ok(token)
    }

    /// Whether `token` is one of ours and still fresh; it is honoured
    /// once.
    fn take_token(&self, token: &str) -> bool {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.retain(|(_, made)| made.elapsed() < TOKEN_LIFE);
        match tokens.iter().position(|(t, _)| t == token) {
            Some(i) => {
                tokens.remove(i);
                true
            }
            None => false,
        }
    }
}

/// One of our connections to the MTA, for as long as it is open.
struct OwnConnection<'a> {
    outbox: &'a Outbox,
    addr: SocketAddr,
}

impl Drop for OwnConnection<'_> {
    fn drop(&mut self) {
        let mut own = self.outbox.own.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = own.iter().position(|a| *a == self.addr) {
            own.swap_remove(i);
        }
    }
}

/// An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

impl Outbox {
    /// Queues `event` for the administrator when `config` (the policy in
    /// force) has `notify:`; never blocks and never fails (see the module
    /// documentation).
    pub fn notify(&self, config: &crate::config::Config, event: Event) {
        if config.notify.is_some() {
            self.push(event);
        }
    }

    /// Whether the SMTP client at `peer` is this service's own notifier:
    /// the milter leaves that session alone.
    pub fn is_own_connection(&self, peer: SocketAddr) -> bool {
        let peer = canonical(peer);
        self.own
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|a| canonical(*a) == peer)
    }

    /// Whether a message submitted without SMTP carries the token of one
    /// of this service's own notifications ([`NOTIFY_TOKEN_HEADER`]); the
    /// token is honoured once.
    pub fn is_own_token(&self, tokens: &[String]) -> bool {
        tokens.iter().any(|t| self.take_token(t))
    }
}

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
            while outbox.is_empty() {
                outbox.wake.notified().await;
            }
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
    let text = render(instance, &from, &to, events, dropped, state::now());
    match &config.via {
        NotifyVia::Smtp { host, port } => {
            // The whole conversation, not only each step: a server that
            // trickles replies must not hold the notifier for ever.
            tokio::time::timeout(
                STEP_TIMEOUT * 8,
                smtp(outbox, host, *port, instance, &from, &to, &text),
            )
            .await
            .unwrap_or_else(|_| Err("timed out".into()))
        }
        NotifyVia::Sendmail(path) => {
            // Through cleanup and non_smtpd_milters: the token marks the
            // message as ours (module documentation).
            let token = outbox.token().await?;
            let text = format!("{NOTIFY_TOKEN_HEADER}: {token}\r\n{text}");
            sendmail(path, &from, &to, &text).await
        }
    }
}

/// The message, lines ending in CRLF, not yet dot-stuffed.
pub fn render(
    instance: &str,
    from: &str,
    to: &[String],
    events: &[(u64, Event)],
    dropped: usize,
    now: u64,
) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let subject = match events {
        [(_, e)] if dropped == 0 => e.subject(),
        [(_, e), ..] => format!("{} events: {}, ...", events.len() + dropped, e.subject()),
        [] => format!("{dropped} events"),
    };
    let mut body = String::new();
    for (at, e) in events {
        body.push_str(&format!(
            "== {}: {}\n\n{}\n",
            state::when(*at),
            e.subject(),
            e.body()
        ));
    }
    if dropped > 0 {
        body.push_str(&format!(
            "== {dropped} more event(s) were not queued (more than {QUEUE} waiting); the log of dualroute has them.\n"
        ));
    }
    body.push_str(&format!(
        "\n-- \ndualroute on {instance}; at most one such message per interval (notify.interval).\n"
    ));
    let mut out = String::new();
    for (name, value) in [
        ("From", format!("dualroute on {instance} <{from}>")),
        (
            "To",
            to.iter()
                .map(|t| format!("<{t}>"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("Subject", format!("[dualroute {instance}] {subject}")),
        ("Date", state::rfc5322_date(now)),
        (
            "Message-ID",
            format!(
                "<dualroute.{now}.{}.{}@{instance}>",
                std::process::id(),
                SERIAL.fetch_add(1, Ordering::Relaxed)
            ),
        ),
        ("Auto-Submitted", "auto-generated".into()),
        ("X-Dualroute-Notify", instance.to_owned()),
        ("MIME-Version", "1.0".into()),
        ("Content-Type", "text/plain; charset=us-ascii".into()),
        ("Content-Transfer-Encoding", "7bit".into()),
    ] {
        out.push_str(&format!("{name}: {}\r\n", ascii(&value)));
    }
    out.push_str("\r\n");
    for line in body.lines() {
        let line = ascii(line);
        let chars: Vec<char> = line.chars().collect();
        if chars.is_empty() {
            out.push_str("\r\n");
        }
        for chunk in chars.chunks(LINE) {
            out.extend(chunk);
            out.push_str("\r\n");
        }
    }
    out
}

/// 7-bit text: the message says `charset=us-ascii`, and a log line may
/// hold anything (a path, a reply text).
fn ascii(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii() && (!c.is_ascii_control() || c == '\t') {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// RFC 5321 §4.5.2: a line that starts with a period gets one more.
fn dot_stuff(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.split_inclusive("\r\n") {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
    }
    out
}

async fn smtp(
    outbox: &Outbox,
    host: &str,
    port: u16,
    helo: &str,
    from: &str,
    to: &[String],
    text: &str,
) -> Result<(), String> {
    let t = STEP_TIMEOUT;
    let addrs: Vec<SocketAddr> = tokio::time::timeout(t, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| format!("looking up {host}: timed out"))?
        .map_err(|e| format!("looking up {host}: {e}"))?
        .collect();
    let mut last = format!("{host} has no address");
    for addr in addrs {
        let stream = match tokio::time::timeout(t, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                last = format!("connect to {addr}: {e}");
                continue;
            }
            Err(_) => {
                last = format!("connect to {addr}: timed out");
                continue;
            }
        };
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        // Marked before MAIL is sent: the milter looks at MAIL time.
        let _own = outbox.own(local);
        return converse(stream, helo, from, to, text).await;
    }
    Err(last)
}

async fn converse(
    stream: tokio::net::TcpStream,
    helo: &str,
    from: &str,
    to: &[String],
    text: &str,
) -> Result<(), String> {
    let t = STEP_TIMEOUT;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let (code, reply) = crate::probe::reply(&mut read, t, "greeting").await?;
    if code != 220 {
        return Err(format!("greeting: {reply}"));
    }
    let mut accepted = 0;
    let mut refused = Vec::new();
    let commands = [format!("EHLO {helo}"), format!("MAIL FROM:<{from}>")]
        .into_iter()
        .map(|c| (c, false))
        .chain(to.iter().map(|r| (format!("RCPT TO:<{r}>"), true)));
    for (cmd, is_rcpt) in commands {
        tokio::time::timeout(t, write.write_all(format!("{cmd}\r\n").as_bytes()))
            .await
            .map_err(|_| format!("{cmd}: timed out"))?
            .map_err(|e| format!("{cmd}: {e}"))?;
        let (code, reply) = crate::probe::reply(&mut read, t, &cmd).await?;
        match (code / 100, is_rcpt) {
            (2, true) => accepted += 1,
            (_, true) => refused.push(format!("{cmd}: {reply}")),
            (2, false) => {}
            (_, false) => {
                let _ = write.write_all(b"QUIT\r\n").await;
                return Err(format!("{cmd}: {reply}"));
            }
        }
    }
    if accepted == 0 {
        let _ = write.write_all(b"QUIT\r\n").await;
        return Err(refused.join("; "));
    }
    for (cmd, data, want) in [
        ("DATA", "DATA\r\n".to_owned(), 354),
        ("(message) .", format!("{}.\r\n", dot_stuff(text)), 250),
    ] {
        tokio::time::timeout(t, write.write_all(data.as_bytes()))
            .await
            .map_err(|_| format!("{cmd}: timed out"))?
            .map_err(|e| format!("{cmd}: {e}"))?;
        let (code, reply) = crate::probe::reply(&mut read, t, cmd).await?;
        if code != want {
            let _ = write.write_all(b"QUIT\r\n").await;
            return Err(format!("{cmd}: {reply}"));
        }
    }
    let _ = write.write_all(b"QUIT\r\n").await;
    let _ = crate::probe::reply(&mut read, t, "QUIT").await;
    for r in refused {
        tracing::warn!("notification: a recipient was refused: {r}");
    }
    Ok(())
}

/// `sendmail -i -f FROM -- TO...` (`-i`: a line with a single period is
/// text, not the end), the message on standard input with LF line ends.
async fn sendmail(
    path: &std::path::Path,
    from: &str,
    to: &[String],
    text: &str,
) -> Result<(), String> {
    let shown = path.display();
    let mut child = tokio::process::Command::new(path)
        .arg("-i")
        .arg("-f")
        .arg(from)
        .arg("--")
        .args(to)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("run {shown}: {e}"))?;
    let text = text.replace("\r\n", "\n");
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(text.as_bytes())
                .await
                .map_err(|e| format!("{shown}: writing the message: {e}"))?;
        }
        child
            .wait_with_output()
            .await
            .map_err(|e| format!("{shown}: {e}"))
    };
    let output = tokio::time::timeout(STEP_TIMEOUT, run)
        .await
        .map_err(|_| format!("{shown}: timed out"))??;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "{shown} exited with {}: {}",
            output.status,
            stderr.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verification(passed: bool) -> state::Verification {
        state::Verification {
            at: 1,
            passed,
            detail: if passed { "250 ok" } else { "550 no" }.into(),
            target: "t".into(),
        }
    }

    #[test]
    fn verification_is_reported_on_a_change_only() {
        let (ok, bad) = (verification(true), verification(false));
        let e = |prev: Option<&state::Verification>, now| {
            Event::verification("example.com", prev, now, "p@x.test")
        };
        assert!(matches!(
            e(None, &bad),
            Some(Event::VerificationFailed { .. })
        ));
        assert!(matches!(
            e(Some(&ok), &bad),
            Some(Event::VerificationFailed { .. })
        ));
        assert_eq!(e(Some(&bad), &bad), None, "a retry that fails again");
        assert!(matches!(
            e(Some(&bad), &ok),
            Some(Event::VerificationPassed { .. })
        ));
        assert_eq!(e(Some(&ok), &ok), None);
        assert_eq!(e(None, &ok), None, "a first pass is no news");
    }

    #[test]
    fn message_is_7bit_with_short_lines_and_headers() {
        let long = format!("x: to=<a@b>, status=deferred ({}) é", "y".repeat(2000));
        let trip = Tripped {
            since: 1_795_000_000,
            bounces: 0,
            deferrals: 11,
            cause: TripCause::Deferrals,
            window_secs: 3600,
            last: long.clone(),
            recent: vec![".dot".into(), long],
        };
        let events = vec![(
            1_795_000_000,
            Event::Tripped {
                domain: "example.com".into(),
                trip,
            },
        )];
        let m = render(
            "mx1.test",
            "dualroute@mx1.test",
            &["admin@example.org".into()],
            &events,
            0,
            1_795_000_000,
        );
        assert!(m.is_ascii());
        assert!(m.split("\r\n").all(|l| l.len() <= 998));
        for h in [
            "From: dualroute on mx1.test <dualroute@mx1.test>\r\n",
            "To: <admin@example.org>\r\n",
            "Subject: [dualroute mx1.test] example.com: routing switched off: too many deferrals\r\n",
            "Auto-Submitted: auto-generated\r\n",
            "Date: Wed, 18 Nov 2026 11:06:40 +0000\r\n",
        ] {
            assert!(m.contains(h), "{h:?} missing:\n{m}");
        }
        assert!(m.contains("  dualroute enable example.com\r\n"), "{m}");
        assert!(m.contains("11 temporary failures"), "{m}");
        // A line that starts with a period is stuffed on the wire.
        assert_eq!(dot_stuff(".a\r\nb\r\n.\r\n"), "..a\r\nb\r\n..\r\n");
    }

    #[test]
    fn several_events_and_dropped_ones_in_one_message() {
        let events = vec![
            (
                1,
                Event::ReloadRefused {
                    reason: "accounts emptied".into(),
                },
            ),
            (
                2,
                Event::VerificationPassed {
                    domain: "example.com".into(),
                    address: "p@x.test".into(),
                    detail: "ok".into(),
                },
            ),
        ];
        let m = render("i", "f@i.test", &["a@b.test".into()], &events, 3, 5);
        assert!(
            m.contains("Subject: [dualroute i] 5 events: reload refused"),
            "{m}"
        );
        assert!(
            m.contains("accounts emptied") && m.contains("routing for example.com is on"),
            "{m}"
        );
        assert!(m.contains("3 more event(s) were not queued"), "{m}");
    }

    #[test]
    fn own_connections_match_exactly_while_open() {
        let outbox = Outbox::default();
        let addr: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        let is_own = |a: SocketAddr| outbox.is_own_connection(a);
        {
            let _g = outbox.own(addr);
            assert!(is_own(addr) && is_own(mapped));
            assert!(!is_own("127.0.0.1:40001".parse().unwrap()));
            assert!(!is_own("127.0.0.2:40000".parse().unwrap()));
        }
        assert!(!is_own(addr), "still marked after the connection closed");
    }

    #[tokio::test]
    async fn tokens_are_random_honoured_once_and_only_ours() {
        let outbox = Outbox::default();
        let a = outbox.token().await.unwrap();
        let b = outbox.token().await.unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(!outbox.is_own_token(&["0123456789abcdef0123456789abcdef".into()]));
        assert!(!outbox.is_own_token(&[String::new()]));
        assert!(outbox.is_own_token(&[b.clone()]));
        assert!(!outbox.is_own_token(&[b]), "honoured twice");
        assert!(outbox.is_own_token(&[a]));
    }

    #[test]
    fn a_full_queue_counts_what_it_drops() {
        let outbox = Outbox::default();
        for _ in 0..QUEUE + 2 {
            outbox.push(Event::ReloadRefused { reason: "x".into() });
        }
        let (events, dropped) = outbox.take();
        assert_eq!((events.len(), dropped), (QUEUE, 2));
        assert!(outbox.is_empty());
    }
}
