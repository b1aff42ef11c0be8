//! The verification probe against a broken or hostile SMTP server on
//! 127.0.0.1: a reply that never ends, a line with no end. The probe must
//! give up promptly with an error that says why (RFC 5321 §4.5.3.1.5: a
//! reply line is at most 512 octets), not wait for its step timeout, hang
//! or read without bound.

mod support;

use dualroute::probe::{probe_host, HostReport, Target, MAX_REPLY_LINE, MAX_REPLY_LINES};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Longer than any of these probes may take: the step timeout is far
/// beyond it, so a probe that ends only by timing out fails the test.
const PROMPT: Duration = Duration::from_secs(10);
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// A server on 127.0.0.1 that runs `talk` for each connection.
fn server(talk: fn(TcpStream)) -> SocketAddr {
    let listener = support::loopback_listener();
    let addr = listener.local_addr().expect("local address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || talk(stream));
        }
    });
    addr
}

/// Probes `addr`, failing the test unless the probe ends within [`PROMPT`].
fn probe(addr: SocketAddr) -> HostReport {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let target = Target {
        addr,
        via: format!("[{}]:{}", addr.ip(), addr.port()),
        host: addr.ip().to_string(),
        nexthop: addr.ip().to_string(),
    };
    let report = runtime
        .block_on(async {
            tokio::time::timeout(
                PROMPT,
                probe_host(
                    target,
                    "mx.example.test",
                    "postmaster@example.test",
                    STEP_TIMEOUT,
                    false,
                    &Default::default(),
                ),
            )
            .await
        })
        .unwrap_or_else(|_| panic!("the probe of {addr} did not end within {PROMPT:?}"));
    eprintln!("{report}\n(in {:?})", started.elapsed());
    report
}

/// Writes `bytes` until the client goes away.
fn endless(mut stream: TcpStream, first: &[u8], bytes: &[u8]) {
    if stream.write_all(first).is_err() {
        return;
    }
    while stream.write_all(bytes).is_ok() {}
}

#[test]
fn endless_continuation_lines_end_the_probe() {
    let addr = server(|s| endless(s, b"", b"220-still greeting you\r\n"));
    let r = probe(addr);
    assert!(!r.accepted, "{r}");
    let e = r.error.as_deref().unwrap_or_default();
    assert_eq!(
        e,
        format!(
            "greeting: the reply goes on past {MAX_REPLY_LINES} lines (last: \"220-still greeting you\"): the server does not end it"
        ),
        "{r}"
    );
    assert!(r.steps.is_empty(), "no step is recorded for it: {r}");
}

#[test]
fn endless_line_ends_the_probe() {
    let addr = server(|s| endless(s, b"220 ", b"x"));
    let r = probe(addr);
    assert!(!r.accepted, "{r}");
    let e = r.error.as_deref().unwrap_or_default();
    assert!(
        e.starts_with(&format!(
            "greeting: a reply line longer than {MAX_REPLY_LINE} octets (starting \"220 xxx"
        )) && e.ends_with("more than RFC 5321 §4.5.3.1.5 allows"),
        "{r}"
    );
}

#[test]
fn long_line_after_ehlo_names_the_step() {
    // A good greeting, then an EHLO reply whose second line is too long.
    let addr = server(|stream| {
        let mut read = BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        let _ = stream.write_all(b"220 mx.legacy.test ESMTP\r\n");
        let mut line = String::new();
        if read.read_line(&mut line).is_ok_and(|n| n > 0) {
            let long = format!("250-{}\r\n", "y".repeat(600));
            let _ = stream.write_all(b"250-mx.legacy.test\r\n");
            let _ = stream.write_all(long.as_bytes());
            let _ = stream.write_all(b"250 8BITMIME\r\n");
            // Hold the connection: the probe must not wait for its close.
            std::thread::sleep(Duration::from_secs(30));
        }
    });
    let r = probe(addr);
    assert!(!r.accepted, "{r}");
    assert_eq!(r.steps.len(), 1, "only the greeting: {r}");
    let e = r.error.as_deref().unwrap_or_default();
    assert!(
        e.starts_with("EHLO mx.example.test: a reply line longer than 512 octets"),
        "{r}"
    );
}

#[test]
fn longest_allowed_lines_and_many_of_them_are_read() {
    // A 512-octet line (CRLF included) and 99 continuation lines are
    // within the limits: the probe goes on and the RCPT is accepted.
    let addr = server(|stream| {
        let mut read = BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        let longest = format!("220-{}\r\n", "z".repeat(MAX_REPLY_LINE - 6));
        assert_eq!(longest.len(), MAX_REPLY_LINE);
        let _ = stream.write_all(longest.as_bytes());
        let _ = stream.write_all(b"220 mx.legacy.test ESMTP\r\n");
        let mut line = String::new();
        while read.read_line(&mut line).is_ok_and(|n| n > 0) {
            let reply = if line.starts_with("EHLO") {
                let mut r = String::new();
                for i in 0..MAX_REPLY_LINES - 1 {
                    r.push_str(&format!("250-X-EXTENSION-{i}\r\n"));
                }
                r + "250 8BITMIME\r\n"
            } else if line.starts_with("QUIT") {
                "221 bye\r\n".to_owned()
            } else {
                "250 ok\r\n".to_owned()
            };
            if stream.write_all(reply.as_bytes()).is_err() || line.starts_with("QUIT") {
                break;
            }
            line.clear();
        }
    });
    let r = probe(addr);
    assert!(r.accepted, "{r}");
    assert_eq!(r.error, None, "{r}");
    assert_eq!(
        r.steps[1].reply.matches(" / ").count(),
        MAX_REPLY_LINES - 1,
        "{r}"
    );
}
