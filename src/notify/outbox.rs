//! The notifier's shared state ([`Outbox`]): the bounded queue between the
//! hooks and the sending task, the local addresses of the sender's own
//! SMTP connections, and the tokens of messages given to the `sendmail`
//! command. The milter asks the last two whether a session is ours
//! (module documentation of `notify`, docs/design.md "Notification by
//! mail").

use super::{Event, QUEUE};
use crate::state;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a token of a message given to the `sendmail` command is
/// honoured: long enough for a message that waits in the maildrop while
/// Postfix or the milter is down, short enough that a token cannot be kept.
const TOKEN_LIFE: Duration = Duration::from_secs(24 * 3600);
/// Tokens waiting to be seen, at most (6 messages an hour at the default
/// interval, 5 attempts each).
const TOKENS: usize = 256;

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

    pub(crate) fn take(&self) -> (Vec<(u64, Event)>, usize) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = std::mem::take(&mut p.dropped);
        (p.events.drain(..).collect(), dropped)
    }

    /// Returns once there is something to send (at once if there is).
    pub(super) async fn wait(&self) {
        while self.is_empty() {
            self.wake.notified().await;
        }
    }

    fn is_empty(&self) -> bool {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.events.is_empty() && p.dropped == 0
    }

    /// Marks `addr` as the local end of one of our own connections to the
    /// MTA until the guard is dropped.
    pub(super) fn own(&self, addr: SocketAddr) -> OwnConnection<'_> {
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
    pub(super) async fn token(&self) -> Result<String, String> {
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
pub(super) struct OwnConnection<'a> {
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
    /// of this service's own notifications (the header
    /// [`NOTIFY_TOKEN_HEADER`](crate::session::NOTIFY_TOKEN_HEADER)); the
    /// token is honoured once.
    pub fn is_own_token(&self, tokens: &[String]) -> bool {
        tokens.iter().any(|t| self.take_token(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(outbox.is_own_token(std::slice::from_ref(&b)));
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
