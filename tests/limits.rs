//! The limits a production admin expects (README "Limits"): recipients per
//! message, the defaults against Postfix's own, and the milter's memory
//! with 1,000 MTA connections open at once.

mod support;

use indymilter_test::{ProtoOpts, Status, TestConnection};
use std::io::Write as _;
use std::net::TcpStream;
use std::time::Duration;
use support::wire::{packet, read_command};
use support::{wire, MilterProcess, Port};

/// A dual domain: every recipient is remembered until end of message
/// (copied or refused), which is what the recipient limit bounds.
const DOMAINS: &str = "domains:\n  dual.test:\n    mode: dual\n    destination: { hosts: [\"[192.0.2.1]\"] }\n    accounts: [{ list: [a@dual.test] }]\n";

/// The milter in-process, as `dualroute run` serves it, on 127.0.0.1:0;
/// it stops when the returned handle is dropped with the test's runtime.
async fn serve(yaml: &str) -> (std::net::SocketAddr, support::protocol::Milter) {
    let milter = support::protocol::Milter::start(yaml).await;
    (milter.addr(), milter)
}

#[tokio::test]
async fn recipients_past_max_recipients_get_452_4_5_3_and_are_not_routed() {
    let yaml = format!("max_recipients: 3\ninstance: limits.test\n{DOMAINS}");
    let (addr, _stop) = serve(&yaml).await;
    let mut conn = TestConnection::configure()
        .available_opts(ProtoOpts::empty())
        .open_tcp(addr)
        .await
        .expect("negotiate");
    conn.connect("client.example.org", [203, 0, 113, 9])
        .await
        .expect("connect");
    conn.mail(["<s@example.org>"]).await.expect("mail");
    // One unknown (refused: it counts, it is remembered for the log),
    // two accounts... the third recipient the milter tracks is the last.
    let mut replies = Vec::new();
    for rcpt in [
        "<nobody@dual.test>",
        "<a@dual.test>",
        "<a+x@dual.test>",
        "<a+y@dual.test>",
        "<other@elsewhere.test>",
    ] {
        replies.push(conn.rcpt([rcpt]).await.expect("rcpt"));
    }
    assert!(
        matches!(&replies[0], Status::Reject { message: Some(m) } if m.to_string_lossy().starts_with("550 5.1.1")),
        "{replies:?}"
    );
    assert_eq!(replies[1..3], [Status::Continue, Status::Continue]);
    for r in &replies[3..] {
        let Status::Tempfail { message: Some(m) } = r else {
            panic!("past max_recipients: {replies:?}");
        };
        let m = m.to_string_lossy();
        assert!(
            m.starts_with("452 4.5.3 ") && m.contains("more than 3"),
            "{m}"
        );
    }
    // End of message: the two accepted ones are copied; the refused ones
    // never show up in the actions.
    let (actions, status) = conn.eom().await.expect("eom");
    assert_eq!(status, Status::Continue);
    assert!(actions.has_add_recipient("<a@dual.test.dualroute.invalid>", indymilter_test::any()));
    assert!(actions.has_add_recipient("<a+x@dual.test.dualroute.invalid>", indymilter_test::any()));
    assert!(
        !actions.has_add_recipient("<a+y@dual.test.dualroute.invalid>", indymilter_test::any()),
        "{actions:?}"
    );
    // The next message starts from zero.
    conn.mail(["<s@example.org>"]).await.expect("mail");
    assert_eq!(
        conn.rcpt(["<a+y@dual.test>"]).await.expect("rcpt"),
        Status::Continue
    );
}

/// Reads Postfix's compiled-in default of a parameter (`postconf -d`).
fn postfix_default(parameter: &str) -> String {
    let postconf = ["/usr/sbin/postconf", "/sbin/postconf"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect(
            "postconf not found: run scripts/test-deps.sh (as root) or `apt-get install postfix`",
        );
    let out = std::process::Command::new(postconf)
        .args(["-d", "-h", parameter])
        .output()
        .expect("run postconf -d");
    assert!(out.status.success(), "postconf -d {parameter}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Postfix durations: a number with an optional unit (default seconds).
fn seconds(value: &str) -> u64 {
    let (n, unit) = value.split_at(
        value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len()),
    );
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("duration {value:?}"));
    n * match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        other => panic!("unit {other:?} in {value:?}"),
    }
}

#[test]
fn defaults_match_postfix() {
    let config = dualroute::config::parse("{}\n", "empty.yaml").expect("empty configuration");
    // Postfix waits milter_command_timeout for each reply and gives up on
    // the milter after it; the milter waits as long for a started packet.
    assert_eq!(
        config.connections.command_timeout.0.as_secs(),
        seconds(&postfix_default("milter_command_timeout"))
    );
    // Between commands Postfix may be sending the message: idle_timeout
    // must outlast milter_content_timeout, or the milter would close a
    // connection Postfix still uses.
    assert!(
        config.connections.idle_timeout.0.as_secs()
            >= seconds(&postfix_default("milter_content_timeout"))
    );
    // Postfix refuses recipients past smtpd_recipient_limit itself: the
    // milter's limit is the same, so a sender meets Postfix's first.
    assert_eq!(
        config.max_recipients.get().to_string(),
        postfix_default("smtpd_recipient_limit")
    );
    // A connection per smtpd process: Postfix's default process limit
    // (100) is well within the milter's.
    assert!(
        config.connections.max.get()
            >= postfix_default("default_process_limit")
                .parse::<usize>()
                .expect("a number")
    );
}

#[test]
fn max_recipients_zero_is_an_error_with_its_place() {
    let err = dualroute::config::parse("instance: x\nmax_recipients: 0\n", "milter.yaml")
        .expect_err("max_recipients: 0");
    let text = err.to_string();
    assert!(text.starts_with("milter.yaml:2:"), "{text}");
    assert!(text.contains("max_recipients"), "{text}");
}

/// Raises this process's open-file limit (inherited by the milter it
/// starts) to `want`, within the hard limit.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= want,
        "the open-file limit is {} (hard {}): 1,000 connections need {want}; raise it with ulimit -n",
        lim.rlim_cur,
        lim.rlim_max
    );
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// 1,000 MTA connections at once (the default `connections.max`), each in
/// the middle of a message (negotiated, connected, MAIL, one RCPT): every
/// one is served, the limit is reported once, and the milter's resident
/// memory stays small. The figure is printed (README "Limits" records it).
#[test]
fn a_thousand_connections_in_mid_message() {
    const N: usize = 1000;
    raise_nofile(4096);
    let tmp = tempfile::tempdir().expect("temporary directory");
    let port = Port::reserve();
    let config = tmp.path().join("milter.yaml");
    let yaml = format!(
        "listen: inet:127.0.0.1:{port}\ninstance: limits.test\nstate_dir: {}\n{DOMAINS}",
        tmp.path().join("state").display()
    );
    std::fs::write(&config, yaml).expect("write milter.yaml");
    let milter = MilterProcess::start(&config, &port, &tmp.path().join("milter.log"));
    let (idle_rss, _) = memory_kib(milter.pid());

    // Protocol 6 without no-reply options: every command is answered.
    let optneg = wire::optneg(0);
    let mut conns = Vec::with_capacity(N);
    for i in 0..N {
        let mut s = TcpStream::connect(milter.addr()).expect("connect to the milter");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        s.write_all(&optneg).expect("negotiate");
        assert_eq!(read_command(&mut s), b'O', "connection {i}: negotiation");
        let mut connect = b"client.example.org\x004".to_vec();
        connect.extend(25u16.to_be_bytes());
        connect.extend(b"203.0.113.9\0");
        s.write_all(&packet(b'C', &connect)).expect("connect");
        assert_eq!(read_command(&mut s), b'c', "connection {i}: connect");
        s.write_all(&packet(b'M', b"<s@example.org>\0"))
            .expect("mail");
        assert_eq!(read_command(&mut s), b'c', "connection {i}: MAIL");
        s.write_all(&packet(b'R', format!("<a+{i}@dual.test>\0").as_bytes()))
            .expect("rcpt");
        assert_eq!(read_command(&mut s), b'c', "connection {i}: RCPT");
        conns.push(s);
    }
    let (rss, hwm) = memory_kib(milter.pid());
    println!(
        "dualroute with {N} connections in mid-message: VmRSS {rss} KiB (idle {idle_rss} KiB), VmHWM {hwm} KiB, {} KiB per connection",
        rss.saturating_sub(idle_rss) / N as u64
    );
    assert!(
        rss < 64 * 1024,
        "{rss} KiB resident with {N} connections (idle: {idle_rss} KiB)"
    );
    let log = milter.log();
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("connection limit reached"))
        .count();
    assert_eq!(warned, 1, "the limit is reported once:\n{log}");
    drop(conns);
}
