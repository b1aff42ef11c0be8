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
use crate::metrics::Metrics;
use framing::{Framing, Problem};
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

mod framing;

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
pub(crate) struct Guarded<L> {
    inner: L,
    limits: ConnectionsConfig,
    open: Arc<AtomicUsize>,
    /// When the limit was last reported reached (at most once a minute).
    reported_full: Arc<Mutex<Option<Instant>>>,
    metrics: Arc<Metrics>,
}

impl<L> Guarded<L> {
    pub(crate) fn new(inner: L, limits: ConnectionsConfig, metrics: Arc<Metrics>) -> Self {
        Guarded {
            inner,
            limits,
            open: Arc::new(AtomicUsize::new(0)),
            reported_full: Arc::new(Mutex::new(None)),
            metrics,
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
            self.metrics.error("connection_limit");
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
            self.metrics.clone(),
        )))
    }
}

/// One MTA connection: applies the timeouts, re-arms TCP quick ACKs, and
/// logs malformed input once.
pub(crate) struct Guard<S> {
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
    metrics: Arc<Metrics>,
    /// Malformed input was logged: once per connection.
    reported: bool,
}

impl<S: Peer> Guard<S> {
    fn new(
        stream: S,
        limits: &ConnectionsConfig,
        open: Arc<AtomicUsize>,
        metrics: Arc<Metrics>,
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
            metrics,
            reported: false,
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
        if !self.reported {
            self.reported = true;
            self.metrics.error("malformed_input");
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
