//! The MTA's connections below the milter protocol: the connection limit,
//! the timeouts, the TCP delayed-ACK stall, and a watch on the packet
//! framing so that garbage on the socket is logged with the peer that sent
//! it (indymilter drops such connections and logs at trace level only).
//!
//! [`Guarded`] wraps the listener handed to [`crate::run`]; each accepted
//! connection is a [`Guard`] around the socket. Both count the problems
//! they warn about in the metrics (`dualroute_errors_total`, kinds
//! `connection_limit`, each connection taken at the limit, and
//! `malformed_input`, one per connection).

use crate::config::ConnectionsConfig;
use crate::service::Service;
use indymilter::Listener;
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{ready, Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream},
    time::{Instant, Sleep},
};
use tracing::{info, warn};

/// A socket the milter serves an MTA on.
pub trait Peer: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Who is on the other end, for the log.
    fn describe(&self) -> String;

    /// Called once, when the connection is accepted.
    fn on_accept(&self) {}

    /// Called after every read that returned data.
    fn after_read(&self) {}
}

impl Peer for TcpStream {
    fn describe(&self) -> String {
        match self.peer_addr() {
            Ok(addr) => addr.to_string(),
            Err(_) => "an unknown TCP peer".into(),
        }
    }

    /// At end of message the milter writes its actions and its reply as
    /// packets in a row, each flushed on its own; with Nagle's algorithm on
    /// this side each waits for the MTA's delayed ACK of the one before
    /// (measured, tests/tcp_stall.rs: 47 ms per routed message over TCP
    /// against 0.27 ms over a unix socket). Nothing is gained by holding
    /// them back: every packet is complete and the MTA is waiting for it.
    fn on_accept(&self) {
        // Failure only costs the stall; the connection still works.
        let _ = self.set_nodelay(true);
    }

    /// Postfix 3.7's milter client writes the macro packet and the command
    /// that follows as two small writes. Nagle's algorithm holds the second
    /// until the first is acknowledged, and this side's kernel delays that
    /// ACK (up to 40 ms on Linux) because the milter sends no reply to a
    /// macro packet to carry it. Every such pair stalls: measured 165
    /// messages/s through Postfix over TCP against 430 over a unix socket.
    /// `TCP_NODELAY` here does not help (the waiting write is Postfix's);
    /// `TCP_QUICKACK` makes the kernel acknowledge at once, and it is not
    /// sticky (the kernel leaves quick-ACK mode on its own), so it is set
    /// again after each read: 400-510 messages/s, as over a unix socket.
    #[cfg(target_os = "linux")]
    fn after_read(&self) {
        // Failure only costs the stall; nothing to report per read.
        let _ = socket2::SockRef::from(self).set_tcp_quickack(true);
    }
}

impl Peer for UnixStream {
    fn describe(&self) -> String {
        match self.peer_cred() {
            Ok(cred) => match cred.pid() {
                Some(pid) => format!("unix socket peer pid {pid} uid {}", cred.uid()),
                None => format!("unix socket peer uid {}", cred.uid()),
            },
            Err(_) => "a unix socket peer".into(),
        }
    }
}

/// A listener that counts its connections and wraps each in a [`Guard`].
pub struct Guarded<L> {
    inner: L,
    limits: ConnectionsConfig,
    open: Arc<AtomicUsize>,
    /// When the limit was last reported reached (at most once a minute).
    reported_full: Arc<Mutex<Option<Instant>>>,
    /// For the metrics.
    service: Arc<Service>,
}

impl<L> Guarded<L> {
    pub fn new(inner: L, limits: ConnectionsConfig, service: Arc<Service>) -> Self {
        Guarded {
            inner,
            limits,
            open: Arc::new(AtomicUsize::new(0)),
            reported_full: Arc::new(Mutex::new(None)),
            service,
        }
    }
}

impl<L> Listener for Guarded<L>
where
    L: Listener,
    L::Io: Peer,
{
    type Io = Guard<L::Io>;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>> {
        let stream = ready!(self.inner.poll_accept(cx))?;
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let max = self.limits.max.get();
        if open >= max {
            // Every connection taken at the limit counts; the log says it
            // once a minute.
            self.service.metrics.error("connection_limit");
            let mut last = self.reported_full.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                *last = Some(Instant::now());
                warn!(
                    "connection limit reached: {open} MTA connections open (connections.max = {max}); \
                     new connections wait until one closes, and the MTA applies its default action \
                     after its connect timeout (Postfix: milter_connect_timeout, 30s)"
                );
            }
        }
        Poll::Ready(Ok(Guard::new(
            stream,
            &self.limits,
            self.open.clone(),
            self.service.clone(),
        )))
    }
}

/// One MTA connection: applies the timeouts, re-arms TCP quick ACKs, and
/// logs malformed input once.
pub struct Guard<S> {
    stream: S,
    framing: Framing,
    command_timeout: Duration,
    idle_timeout: Duration,
    /// When the MTA last sent something (or connected): taken when the
    /// connection next waits, not at every read (see `poll_read`).
    last_input: Instant,
    /// Input came since `last_input` was taken.
    fresh_input: bool,
    /// Woken at the deadline; moved lazily (not on every read).
    timer: Pin<Box<Sleep>>,
    open: Arc<AtomicUsize>,
    service: Arc<Service>,
}

impl<S: Peer> Guard<S> {
    fn new(
        stream: S,
        limits: &ConnectionsConfig,
        open: Arc<AtomicUsize>,
        service: Arc<Service>,
    ) -> Self {
        stream.on_accept();
        let now = Instant::now();
        let command_timeout = limits.command_timeout.0;
        Guard {
            stream,
            framing: Framing::default(),
            command_timeout,
            idle_timeout: limits.idle_timeout.0,
            last_input: now,
            fresh_input: false,
            timer: Box::pin(tokio::time::sleep_until(now + command_timeout)),
            open,
            service,
        }
    }

    /// How long the MTA may now stay silent: a packet it started, and the
    /// negotiation it opens every connection with, must arrive within the
    /// command timeout; between commands it may idle.
    fn patience(&self) -> Duration {
        if self.framing.mid_packet() || !self.framing.negotiated {
            self.command_timeout
        } else {
            self.idle_timeout
        }
    }

    fn report(&mut self, problem: Problem) {
        if !self.framing.reported {
            self.framing.reported = true;
            self.service.metrics.error("malformed_input");
            // Described only now: a string per connection otherwise.
            warn!(
                "malformed milter input from {}: {problem}",
                self.stream.describe()
            );
        }
    }
}

impl<S> Drop for Guard<S> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S: Peer> AsyncRead for Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let input = &buf.filled()[before..];
                if input.is_empty() {
                    if this.framing.mid_packet() {
                        this.report(Problem::Truncated);
                    }
                } else {
                    this.stream.after_read();
                    this.fresh_input = true;
                    if let Some(problem) = this.framing.feed(input) {
                        this.report(problem);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // The clock is read when the connection starts to wait, not
                // at every read: the reads before a wait follow each other
                // within microseconds, and a clock read costs as much as
                // the rest of this function.
                if std::mem::take(&mut this.fresh_input) {
                    this.last_input = Instant::now();
                }
                // The timer is moved only when it would fire too late
                // (the patience shrank mid-packet) or when it fired
                // before the deadline (input came since): moving it on
                // every read takes the runtime's timer lock once per
                // command, and at 64 connections that lock is contended.
                let deadline = this.last_input + this.patience();
                if this.timer.deadline() > deadline {
                    this.timer.as_mut().reset(deadline);
                }
                loop {
                    ready!(this.timer.as_mut().poll(cx));
                    if this.timer.deadline() >= deadline {
                        break;
                    }
                    this.timer.as_mut().reset(deadline);
                }
                let waited = this.patience().as_secs();
                if this.framing.mid_packet() {
                    this.report(Problem::Stalled(waited));
                } else if !this.framing.negotiated {
                    this.report(Problem::Silent(waited));
                } else {
                    info!(
                        "closing the milter connection from {}: idle for {waited}s (connections.idle_timeout)",
                        this.stream.describe()
                    );
                }
                Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
            }
            other => other,
        }
    }
}

impl<S: Peer> AsyncWrite for Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// indymilter's limit on a packet's payload (1 MiB - 1); it drops the
/// connection on a longer one. Postfix sends body chunks of at most 64 KiB.
const MAX_PAYLOAD: usize = 1024 * 1024 - 1;

/// What can be wrong with the MTA's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A packet length of zero (there is not even a command byte).
    ZeroLength,
    /// A packet longer than indymilter accepts.
    Oversized(u32),
    /// A command byte that is no milter command.
    Unknown(u8),
    /// A known command where the protocol does not allow it.
    OutOfOrder(u8),
    /// The connection closed in the middle of a packet.
    Truncated,
    /// A started packet did not complete within this many seconds.
    Stalled(u64),
    /// Nothing at all within this many seconds of connecting.
    Silent(u64),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::ZeroLength => write!(f, "packet of length 0; closing the connection"),
            Problem::Oversized(len) => write!(
                f,
                "packet of {len} bytes, longer than the {} the milter accepts; closing the connection",
                MAX_PAYLOAD + 1
            ),
            Problem::Unknown(cmd) => write!(
                f,
                "unknown command byte {cmd:#04x}; closing the connection (is this an MTA speaking the milter protocol?)"
            ),
            Problem::OutOfOrder(cmd) => write!(
                f,
                "command '{}' out of order; ignored",
                char::from(*cmd).escape_default()
            ),
            Problem::Truncated => write!(f, "connection closed in the middle of a packet"),
            Problem::Stalled(secs) => write!(
                f,
                "packet incomplete for {secs}s (connections.command_timeout); closing the connection"
            ),
            Problem::Silent(secs) => write!(
                f,
                "no option negotiation within {secs}s of connecting (connections.command_timeout); closing the connection"
            ),
        }
    }
}

/// Follows the packet framing of the MTA's input (4-byte length, command
/// byte, payload) exactly as indymilter reads it, and the order of the
/// commands as far as it can be checked without the negotiated options.
#[derive(Debug, Default)]
pub struct Framing {
    header: [u8; 5],
    header_len: usize,
    payload_left: usize,
    /// The first problem made the rest unreadable (indymilter closes).
    broken: bool,
    pub negotiated: bool,
    in_transaction: bool,
    reported: bool,
}

impl Framing {
    /// True while a packet has started but not completed.
    pub fn mid_packet(&self) -> bool {
        !self.broken && (self.header_len > 0 || self.payload_left > 0)
    }

    /// Takes the next bytes of input; returns the first problem in them.
    pub fn feed(&mut self, mut input: &[u8]) -> Option<Problem> {
        let mut first = None;
        while !input.is_empty() && !self.broken {
            if self.payload_left > 0 {
                let n = self.payload_left.min(input.len());
                self.payload_left -= n;
                input = &input[n..];
                continue;
            }
            // A whole header in the input, the usual case, is read where it
            // is; a split one is gathered in `self.header`.
            let header = match input.split_first_chunk::<5>() {
                Some((header, rest)) if self.header_len == 0 => {
                    input = rest;
                    *header
                }
                _ => {
                    let n = (self.header.len() - self.header_len).min(input.len());
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&input[..n]);
                    self.header_len += n;
                    input = &input[n..];
                    if self.header_len < self.header.len() {
                        break;
                    }
                    self.header_len = 0;
                    self.header
                }
            };
            let [a, b, c, d, command] = header;
            let len = u32::from_be_bytes([a, b, c, d]);
            let problem = self.packet(len, command);
            first = first.or(problem);
        }
        first
    }

    fn packet(&mut self, len: u32, command: u8) -> Option<Problem> {
        let payload = usize::try_from(len).unwrap_or(usize::MAX).saturating_sub(1);
        if len == 0 {
            self.broken = true;
            return Some(Problem::ZeroLength);
        }
        if payload > MAX_PAYLOAD {
            self.broken = true;
            return Some(Problem::Oversized(len));
        }
        self.payload_left = payload;
        self.command(command)
    }

    /// The milter protocol's commands (libmilter's `mfdef.h`, Postfix's
    /// `milter8.c`): negotiation first; RCPT, DATA, headers, body and end of
    /// message only inside a transaction that MAIL opened.
    fn command(&mut self, command: u8) -> Option<Problem> {
        let in_order = match command {
            b'O' => !std::mem::replace(&mut self.negotiated, true),
            _ if !self.negotiated => {
                // Still accept the rest of the session as negotiated, so
                // that one early packet is one warning.
                self.negotiated = true;
                false
            }
            b'M' => {
                self.in_transaction = true;
                true
            }
            b'R' | b'T' | b'L' | b'N' | b'B' => self.in_transaction,
            b'E' => std::mem::replace(&mut self.in_transaction, false),
            b'A' | b'K' => {
                self.in_transaction = false;
                true
            }
            b'C' | b'D' | b'H' | b'Q' | b'U' => true,
            other => {
                self.broken = true;
                return Some(Problem::Unknown(other));
            }
        };
        (!in_order).then_some(Problem::OutOfOrder(command))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(command: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = u32::try_from(payload.len() + 1)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        p.push(command);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn a_postfix_conversation_is_in_order_byte_by_byte() {
        let mut input = packet(b'O', &[0, 0, 0, 6, 0, 0, 1, 0xff, 0, 0x1f, 0xff, 0xff]);
        for (cmd, payload) in [
            (b'D', &b"Cj\0mx\0"[..]),
            (b'C', b"client\x004\x00\x19127.0.0.1\0"),
            (b'M', b"<a@b>\0"),
            (b'R', b"<c@d>\0"),
            (b'L', b"Subject\0x\0"),
            (b'N', b""),
            (b'E', b""),
            (b'M', b"<a@b>\0"),
            (b'A', b""),
            (b'Q', b""),
        ] {
            input.extend(packet(cmd, payload));
        }
        let mut framing = Framing::default();
        for byte in &input {
            assert_eq!(framing.feed(std::slice::from_ref(byte)), None);
        }
        assert!(!framing.mid_packet());
        let mut whole = Framing::default();
        assert_eq!(whole.feed(&input), None);
        // Cut anywhere: a header read where it is or gathered over two
        // reads comes to the same.
        for cut in 0..input.len() {
            let mut f = Framing::default();
            assert_eq!(f.feed(&input[..cut]), None, "cut at {cut}");
            assert_eq!(f.feed(&input[cut..]), None, "cut at {cut}");
            assert!(!f.mid_packet(), "cut at {cut}");
        }
        let mut garbage = packet(b'O', &[0; 12]);
        garbage.extend(packet(b'Z', b"x"));
        for cut in 0..garbage.len() {
            let mut f = Framing::default();
            let first = f.feed(&garbage[..cut]);
            let second = f.feed(&garbage[cut..]);
            assert_eq!(
                first.or(second),
                Some(Problem::Unknown(b'Z')),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn garbage_is_named() {
        let mut f = Framing::default();
        assert_eq!(
            f.feed(b"GET / HTTP/1.1\r\n"),
            Some(Problem::Oversized(0x47455420))
        );
        let mut f = Framing::default();
        assert_eq!(f.feed(&[0, 0, 0, 0, b'O']), Some(Problem::ZeroLength));
        let mut f = Framing::default();
        f.feed(&packet(b'O', &[0; 12]));
        assert_eq!(f.feed(&packet(b'Z', b"")), Some(Problem::Unknown(b'Z')));
        let mut f = Framing::default();
        f.feed(&packet(b'O', &[0; 12]));
        assert_eq!(
            f.feed(&packet(b'R', b"<c@d>\0")),
            Some(Problem::OutOfOrder(b'R'))
        );
        let mut f = Framing::default();
        assert_eq!(
            f.feed(&packet(b'M', b"<a@b>\0")),
            Some(Problem::OutOfOrder(b'M'))
        );
    }

    #[test]
    fn a_half_packet_is_mid_packet() {
        let mut f = Framing::default();
        let p = packet(b'O', &[0; 12]);
        f.feed(&p[..3]);
        assert!(f.mid_packet());
        f.feed(&p[3..8]);
        assert!(f.mid_packet());
        f.feed(&p[8..]);
        assert!(!f.mid_packet());
        assert!(f.negotiated);
    }
}
