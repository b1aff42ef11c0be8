//! Over TCP, Postfix's milter client writes the macro packet and the command
//! after it as two small writes; Nagle's algorithm holds the second until
//! the first is acknowledged, and a milter whose kernel delays that ACK
//! stalls every such pair by up to 40 ms (docs/design.md §8; 165 messages/s
//! through Postfix instead of 430). This test makes the same writes, over
//! TCP and over a unix socket side by side in one run, and compares the
//! round trips: a ratio, not a timed assertion.

mod support;
use support::protocol;

use indymilter_test::{MacroStage, Status, TestConnection};
use protocol::*;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UnixListener};

/// Rounds measured on each socket, after the warm-up rounds (Linux
/// acknowledges the first segments of a connection at once whatever the
/// milter does).
const ROUNDS: usize = 40;
const WARM_UP: usize = 20;

/// A healthy TCP round trip on loopback costs about what a unix socket
/// round trip costs (measured: within 2x); a stalled one costs 40 ms, some
/// hundred times more. 10x fails on the stall and not on a busy machine.
const BOUND: f64 = 10.0;

/// Negotiation, connect and MAIL, as an MTA does them.
async fn open_transaction(mut conn: TestConnection) -> TestConnection {
    let status = conn
        .connect("client.example.org", CLIENT)
        .await
        .expect("connect");
    assert!(matches!(status, Status::Continue | Status::Noreply));
    let status = conn.mail(["<sender@example.org>"]).await.expect("MAIL");
    assert!(matches!(status, Status::Continue | Status::Noreply));
    conn
}

/// One RCPT as Postfix sends it: the macro packet, then the command, each
/// its own write; returns how long until the milter's reply.
async fn rcpt_round(conn: &mut TestConnection) -> Duration {
    let started = Instant::now();
    conn.macros(MacroStage::Rcpt, [("{rcpt_addr}", "alice@split.test")])
        .await
        .expect("macros at RCPT");
    let status = conn.rcpt(["<alice@split.test>"]).await.expect("RCPT");
    assert_eq!(status, Status::Continue);
    started.elapsed()
}

/// A whole message to a routed recipient: end of message brings three
/// actions and the final reply, four packets the milter writes in a row
/// (on its side Nagle's algorithm would hold each behind the MTA's delayed
/// ACK of the one before).
async fn message_round(conn: &mut TestConnection) -> Duration {
    let started = Instant::now();
    let status = conn.mail(["<sender@example.org>"]).await.expect("MAIL");
    assert!(matches!(status, Status::Continue | Status::Noreply));
    let status = conn.rcpt(["<zed@split.test>"]).await.expect("RCPT");
    assert_eq!(status, Status::Continue);
    let (actions, status) = conn.eom().await.expect("end of message");
    assert_eq!(status, Status::Continue);
    assert_eq!(actions.actions.len(), 3, "{:?}", actions.actions);
    started.elapsed()
}

#[derive(Clone, Copy, Debug)]
enum Round {
    /// [`rcpt_round`]
    Rcpt,
    /// [`message_round`]
    Message,
}

async fn round(kind: Round, conn: &mut TestConnection) -> Duration {
    match kind {
        Round::Rcpt => rcpt_round(conn).await,
        Round::Message => message_round(conn).await,
    }
}

/// Runs `kind` rounds on both connections, interleaved so that both see
/// the same machine load, and fails when the TCP median is more than
/// [`BOUND`] times the unix one.
async fn compare(kind: Round, tcp: &mut TestConnection, unix: &mut TestConnection) {
    let (mut tcp_rounds, mut unix_rounds) = (Vec::new(), Vec::new());
    for i in 0..WARM_UP + ROUNDS {
        let t = round(kind, tcp).await;
        let u = round(kind, unix).await;
        if i >= WARM_UP {
            tcp_rounds.push(t);
            unix_rounds.push(u);
        }
    }
    let (t, u) = (median(tcp_rounds), median(unix_rounds));
    let ratio = t.as_secs_f64() / u.as_secs_f64().max(1e-6);
    eprintln!("{kind:?}, median: TCP {t:?}, unix {u:?}, ratio {ratio:.1}");
    assert!(
        ratio < BOUND,
        "{kind:?} over TCP stalls: median {t:?} against {u:?} over a unix socket ({ratio:.0}x)"
    );
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_round_trips_cost_what_unix_ones_do() {
    // RCPTs with their macro packets, then whole routed messages.

    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind TCP");
    let tcp_addr = tcp.local_addr().expect("TCP address");
    let tmp = tempfile::tempdir().expect("temporary directory");
    let path = tmp.path().join("milter.sock");
    let unix = UnixListener::bind(&path).expect("bind unix socket");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    let start = || protocol::start(include_str!("messages.yaml"));
    let requests = || dualroute::control().1;
    let tcp_milter = tokio::spawn(dualroute::run(
        tcp,
        start(),
        requests(),
        stopped(stop.clone()),
    ));
    let unix_milter = tokio::spawn(dualroute::run(unix, start(), requests(), stopped(stop)));

    let mut over_tcp = open_transaction(
        TestConnection::configure()
            .open_tcp(tcp_addr)
            .await
            .expect("negotiate over TCP"),
    )
    .await;
    let mut over_unix = open_transaction(
        TestConnection::configure()
            .open_unix(&path)
            .await
            .expect("negotiate over the unix socket"),
    )
    .await;

    compare(Round::Rcpt, &mut over_tcp, &mut over_unix).await;
    // The open transactions end; whole messages follow.
    over_tcp.abort().await.expect("abort over TCP");
    over_unix.abort().await.expect("abort over the unix socket");
    compare(Round::Message, &mut over_tcp, &mut over_unix).await;

    over_tcp.close().await.expect("close TCP");
    over_unix.close().await.expect("close unix");
    let _ = stop_tx.send(true);
    for milter in [tcp_milter, unix_milter] {
        milter
            .await
            .expect("milter task panicked")
            .expect("milter ended with an error");
    }
}
