//! The milter protocol below the decisions: what dualroute negotiates with
//! MTAs that offer milter protocol versions 2 to 6, and how it treats
//! garbage, stalls, idle connections and the connection limit.
//!
//! Three kinds of test: indymilter-test acting as Postfix at each
//! `milter_protocol` (what Postfix's `milter8.c` offers there), raw bytes on
//! a socket of the real `dualroute run` (whose log is checked), and a real
//! private Postfix at `milter_protocol = 2, 3, 4, 6` (tests/support/).

mod support;
use support::protocol;

use indymilter_test::{Actions, EomAction, ProtoOpts, Status, TestConnection};
use protocol::*;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};
use support::wire::{self, packet};
use support::{postfix_config, MilterProcess, Port, Postfix, PostfixOptions, SmtpSink};

const CONFIG: &str = include_str!("messages.yaml");
const INSTANCE: &str = "mx1.dualroute.test";

/// Every action Postfix offers, at every protocol version (`milter8.c`,
/// `my_actions`).
fn postfix_actions() -> Actions {
    Actions::all()
}

/// The events Postfix offers at `milter_protocol = version`
/// (`MILTER8_V2_PROTO_MASK` and the masks that extend it).
fn postfix_opts(version: u32) -> ProtoOpts {
    let v2 = ProtoOpts::NO_CONNECT
        | ProtoOpts::NO_HELO
        | ProtoOpts::NO_MAIL
        | ProtoOpts::NO_RCPT
        | ProtoOpts::NO_BODY
        | ProtoOpts::NO_HEADER
        | ProtoOpts::NO_EOH;
    match version {
        2 => v2,
        3 => v2 | ProtoOpts::NO_UNKNOWN,
        4 => v2 | ProtoOpts::NO_UNKNOWN | ProtoOpts::NO_DATA,
        _ => ProtoOpts::all(),
    }
}

fn mta(version: u32, actions: Actions) -> indymilter_test::TestConnectionBuilder {
    TestConnection::configure()
        .protocol_version(version)
        .available_actions(actions)
        .available_opts(postfix_opts(version))
}

/// One message to zed@split.test (no account here: routed) and
/// alice@split.test (kept).
async fn routed_message(session: &mut Session) -> Delivery {
    session
        .message(None, &[&["<zed@split.test>"], &["<alice@split.test>"]], &[])
        .await
}

#[tokio::test]
async fn every_postfix_protocol_version_routes() {
    let milter = Milter::start(CONFIG).await;
    for version in [2, 3, 4, 6] {
        let mut session =
            Session::open_as(mta(version, postfix_actions()), milter.addr(), CLIENT).await;
        let opts = session.conn.negotiated_opts();
        assert!(
            postfix_opts(version).contains(opts),
            "protocol {version}: asked for {opts:?}, more than offered"
        );
        assert!(
            !opts.contains(ProtoOpts::NO_HEADER) && !opts.contains(ProtoOpts::NO_MAIL),
            "protocol {version}: the headers (loop header) and MAIL are needed: {opts:?}"
        );
        let d = routed_message(&mut session).await;
        assert_eq!(d.rcpt, [Status::Continue, Status::Continue], "v{version}");
        assert_eq!(d.eom, Status::Continue, "v{version}");
        assert_actions(
            &d.actions,
            &[
                delete("<zed@split.test>"),
                add(
                    "<zed@split.test.dualroute.invalid>",
                    "ORCPT=rfc822;zed@split.test",
                ),
                header(INSTANCE),
            ],
        );
        session.close().await;
    }
    milter.shutdown().await;
}

/// Protocol 6: dualroute skips the stages it never reads and does not make
/// the MTA wait for replies that are always "continue".
#[tokio::test]
async fn protocol_6_skips_unneeded_stages_and_replies() {
    let milter = Milter::start(CONFIG).await;
    let session = Session::open_as(mta(6, postfix_actions()), milter.addr(), CLIENT).await;
    let opts = session.conn.negotiated_opts();
    for skipped in [
        ProtoOpts::NO_HELO,
        ProtoOpts::NO_DATA,
        ProtoOpts::NO_EOH,
        ProtoOpts::NO_BODY,
        ProtoOpts::NO_UNKNOWN,
        ProtoOpts::NOREPLY_CONNECT,
        ProtoOpts::NOREPLY_MAIL,
        ProtoOpts::NOREPLY_HEADER,
    ] {
        assert!(
            opts.contains(skipped),
            "{skipped:?} not negotiated: {opts:?}"
        );
    }
    assert!(
        !opts.contains(ProtoOpts::NOREPLY_RCPT),
        "RCPT must be able to refuse"
    );
    let actions = session.conn.negotiated_actions();
    assert!(
        !actions.contains(Actions::REPLACE_BODY) && !actions.contains(Actions::CHANGE_SENDER),
        "asked for actions it never uses: {actions:?}"
    );
    session.close().await;
    milter.shutdown().await;
}

/// Sendmail before 8.14 offers no add-recipient with parameters: the
/// recipient is added plainly (ORCPT and NOTIFY lost, and logged).
#[tokio::test]
async fn without_add_recipient_with_parameters_the_copy_is_added_plainly() {
    let milter = Milter::start(CONFIG).await;
    let actions = postfix_actions() - Actions::ADD_RCPT_EXT;
    let mut session = Session::open_as(mta(2, actions), milter.addr(), CLIENT).await;
    let d = routed_message(&mut session).await;
    assert_eq!(d.eom, Status::Continue);
    let plain: Vec<_> = d
        .actions
        .iter()
        .filter(|a| matches!(a, EomAction::AddRecipient { args: None, .. }))
        .collect();
    assert_eq!(plain.len(), 1, "{:?}", d.actions);
    assert!(deleted(&d.actions).contains("<zed@split.test>"));
    session.close().await;
    milter.shutdown().await;
}

/// An MTA that does not let the milter delete recipients: mail that needs
/// no change still flows; a message that must be routed is tempfailed,
/// never delivered unrouted.
#[tokio::test]
async fn without_a_needed_action_routed_mail_is_tempfailed_and_other_mail_flows() {
    let milter = Milter::start(CONFIG).await;
    let actions = postfix_actions() - Actions::DELETE_RCPT;
    let mut session = Session::open_as(mta(6, actions), milter.addr(), CLIENT).await;
    let kept = session.message(None, &[&["<alice@split.test>"]], &[]).await;
    assert_eq!(kept.eom, Status::Continue);
    assert!(kept.actions.is_empty(), "{:?}", kept.actions);
    let routed = routed_message(&mut session).await;
    assert!(
        matches!(routed.eom, Status::Tempfail { .. }),
        "{:?} {:?}",
        routed.eom,
        routed.actions
    );
    session.close().await;
    milter.shutdown().await;
}

// ---------------------------------------------------------------------
// Raw bytes against `dualroute run`.
// ---------------------------------------------------------------------

/// `dualroute run` with short timeouts and a limit of two connections,
/// and where its metrics endpoint listens (a port the milter binds itself:
/// started again on another when another process has it).
fn start_milter(dir: &Path) -> (MilterProcess, std::net::SocketAddr) {
    let port = Port::reserve();
    let config = dir.join("milter.yaml");
    support::start_on_a_port("the milter's metrics endpoint", |metrics_port| {
        let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
        let yaml = format!(
            "listen: inet:127.0.0.1:{port}\nstate_dir: {}\nconnections:\n  max: 2\n  command_timeout: 1s\n  idle_timeout: 3s\nmetrics:\n  listen: {metrics}\n{}",
            dir.join("state").display(),
            CONFIG
        );
        std::fs::write(&config, yaml).expect("write milter.yaml");
        let milter = MilterProcess::start(&config, &port, &dir.join("milter.log"));
        milter
            .metrics_bound(metrics_port)
            .map(|()| (milter, metrics))
    })
}

/// `dualroute_errors_total{kind}` now.
fn errors(metrics: std::net::SocketAddr, kind: &str) -> f64 {
    support::metrics::scrape(metrics).count("dualroute_errors_total", &[("kind", kind)])
}

/// Postfix's negotiation at protocol 6.
fn optneg() -> Vec<u8> {
    wire::optneg(0x1f_ffff)
}

/// Sends `bytes`, then waits until the milter closes the connection (or
/// `within` passes); returns how long that took.
fn send_until_closed(milter: &MilterProcess, bytes: &[u8], within: Duration) -> (String, Duration) {
    let mut s = TcpStream::connect(milter.addr()).expect("connect to the milter");
    let me = s.local_addr().expect("local address").to_string();
    let started = Instant::now();
    s.write_all(bytes).expect("write to the milter");
    s.set_read_timeout(Some(within)).expect("read timeout");
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    (me, started.elapsed())
}

#[test]
fn garbage_is_logged_with_the_peer_and_the_connection_closed() {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let (milter, metrics) = start_milter(tmp.path());
    assert_eq!(errors(metrics, "malformed_input"), 0.0);

    // An HTTP request on the milter port: its first four bytes read as a
    // length of 1.2 GB.
    let (me, _) = send_until_closed(&milter, b"GET / HTTP/1.0\r\n\r\n", Duration::from_secs(5));
    let line = milter.wait_log(&["WARN", &me, "longer than"], 1);
    assert!(line.contains("malformed milter input"), "{line}");

    // An unknown command after a good negotiation.
    let mut bytes = optneg();
    bytes.extend(packet(b'Z', b"x"));
    let (me, _) = send_until_closed(&milter, &bytes, Duration::from_secs(5));
    milter.wait_log(&["WARN", &me, "unknown command byte 0x5a"], 1);

    // RCPT before MAIL, then more of the same: one warning per connection.
    let mut bytes = optneg();
    for _ in 0..3 {
        bytes.extend(packet(b'R', b"<zed@split.test>\0"));
    }
    let (me, _) = send_until_closed(&milter, &bytes, Duration::from_secs(6));
    milter.wait_log(&["WARN", &me, "'R' out of order"], 1);
    let count = milter
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&me))
        .count();
    assert_eq!(count, 1, "one warning per connection:\n{}", milter.log());
    // Counted as logged: once for each of the three connections.
    assert_eq!(errors(metrics, "malformed_input"), 3.0);
}

#[test]
fn stalled_silent_and_idle_connections_are_closed() {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let (milter, _) = start_milter(tmp.path());

    // Half a packet, then nothing: closed after command_timeout (1s).
    let half = &optneg()[..7];
    let (me, took) = send_until_closed(&milter, half, Duration::from_secs(20));
    assert!(
        took < Duration::from_secs(10),
        "stalled packet held {took:?}"
    );
    milter.wait_log(&["WARN", &me, "packet incomplete for 1s"], 1);

    // Connected, never negotiated: closed after command_timeout.
    let (me, took) = send_until_closed(&milter, b"", Duration::from_secs(20));
    assert!(
        took < Duration::from_secs(10),
        "silent connection held {took:?}"
    );
    milter.wait_log(&["WARN", &me, "no option negotiation within 1s"], 1);

    // Negotiated, then idle: closed after idle_timeout (3s), not before
    // command_timeout would have.
    let (me, took) = send_until_closed(&milter, &optneg(), Duration::from_secs(20));
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "idle connection closed after {took:?}"
    );
    milter.wait_log(&["INFO", &me, "idle for 3s"], 1);
}

#[test]
fn reaching_the_connection_limit_is_logged_and_counted() {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let (milter, metrics) = start_milter(tmp.path());
    assert_eq!(errors(metrics, "connection_limit"), 0.0);
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(milter.addr()).expect("connect");
        s.write_all(&optneg()).expect("negotiate");
        open.push(s);
    }
    let line = milter.wait_log(&["WARN", "connection limit reached"], 1);
    assert!(line.contains("connections.max = 2"), "{line}");
    // The second connection reached the limit of two.
    assert_eq!(errors(metrics, "connection_limit"), 1.0);
    drop(open);
}

/// One MTA offer is reported once, not once per connection.
#[tokio::test]
async fn an_old_protocol_is_reported_once() {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let (milter, _) = start_milter(tmp.path());
    for _ in 0..3 {
        let conn = mta(2, postfix_actions() - Actions::ADD_RCPT_EXT)
            .open_tcp(milter.addr())
            .await
            .expect("negotiation at protocol 2");
        conn.close().await.expect("close");
    }
    let line = milter.wait_log(&["WARN", "older milter protocol"], 1);
    for words in [
        "ORCPT and NOTIFY",
        "no no-reply options",
        "milter_protocol = 6",
    ] {
        assert!(line.contains(words), "{words:?} not in {line}");
    }
    let count = milter
        .log()
        .lines()
        .filter(|l| l.contains("older milter protocol"))
        .count();
    assert_eq!(count, 1, "{}", milter.log());
}

// ---------------------------------------------------------------------
// A real Postfix at each milter_protocol.
// ---------------------------------------------------------------------

/// Mail to alice@split.test (a mailbox here) and zed@split.test (routed to
/// the sink) through Postfix at `milter_protocol = version`.
fn through_postfix(version: u32) {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = tmp.path();
    let sink = SmtpSink::start();
    let port = Port::reserve();
    let config = dir.join("milter.yaml");
    let yaml = format!(
        "listen: inet:127.0.0.1:{port}\ninstance: proto.test\nstate_dir: {}\ndomains:\n  split.test:\n    mode: split\n    destination: {{ hosts: [\"{}\"] }}\n    accounts:\n      - list: [alice@split.test]\n",
        dir.join("state").display(),
        sink.nexthop()
    );
    std::fs::write(&config, yaml).expect("write milter.yaml");
    let generated = postfix_config(&config, &dir.join("postfix-config"));
    let opts = generated
        .apply_to(
            PostfixOptions::default().domain_without_catchall("split.test", &["alice@split.test"]),
        )
        .main_cf(&format!("milter_protocol = {version}"));
    let pf = Postfix::start(opts);
    assert_eq!(pf.postconf("milter_protocol"), version.to_string());
    let milter = MilterProcess::start(&config, &port, &dir.join("milter.log"));

    let t = support::send(
        pf.smtp_addr(),
        "sender@outside.test",
        &["alice@split.test", "zed@split.test"],
        "Subject: protocol\n\nbody\n",
    );
    let diag = || format!("{}\n--- milter log ---\n{}", pf.diagnostics(), milter.log());
    assert!(
        t.accepted(),
        "milter_protocol = {version}: {t:?}\n{}",
        diag()
    );
    let sunk = sink.wait_messages(1);
    let zed = sunk[0]
        .rcpt("zed@split.test.dualroute.invalid")
        .or_else(|| sunk[0].rcpt("zed@split.test"))
        .unwrap_or_else(|| panic!("zed not at the sink: {:?}\n{}", sunk[0].rcpts, diag()));
    assert_eq!(
        zed.orcpt().as_deref(),
        Some("rfc822;zed@split.test"),
        "ORCPT at protocol {version}"
    );
    pf.wait_deliveries(2);
    assert_eq!(
        pf.maildir_messages("alice@split.test").len(),
        1,
        "{}",
        diag()
    );
    let warned = milter.log().contains("older milter protocol");
    assert_eq!(
        warned,
        version < 6,
        "WARN at protocol {version}:\n{}",
        milter.log()
    );
}

#[test]
fn postfix_milter_protocol_2() {
    through_postfix(2);
}

#[test]
fn postfix_milter_protocol_3() {
    through_postfix(3);
}

#[test]
fn postfix_milter_protocol_4() {
    through_postfix(4);
}

#[test]
fn postfix_milter_protocol_6() {
    through_postfix(6);
}

// ---------------------------------------------------------------------
// The `connections:` keys.
// ---------------------------------------------------------------------

#[test]
fn connections_keys_have_postfix_like_defaults_and_are_checked() {
    let parse = |head: &str| dualroute::config::parse(&format!("{head}{CONFIG}"), "milter.yaml");
    let defaults = parse("").expect("the test configuration");
    let c = &defaults.connections;
    assert_eq!(c.max.get(), 1000);
    assert_eq!(c.command_timeout.0, Duration::from_secs(30));
    assert_eq!(c.idle_timeout.0, Duration::from_secs(3600));

    let set = parse("connections: {max: 5, command_timeout: 10s, idle_timeout: 2m}\n")
        .expect("connections set");
    assert_eq!(set.connections.max.get(), 5);
    assert_eq!(set.connections.command_timeout.0, Duration::from_secs(10));
    assert_eq!(set.connections.idle_timeout.0, Duration::from_secs(120));

    for bad in [
        "connections: {max: 0}\n",
        "connections: {idle_timeout: 0s}\n",
        "connections: {idle: 1h}\n",
    ] {
        let e = parse(bad).expect_err(bad).to_string();
        assert!(e.starts_with("milter.yaml:1:"), "{bad}: {e}");
    }
}

/// A split domain, one with routing off, a dual domain.
const LOCAL_SUBMISSION: &str = r#"instance: mx1.dualroute.test
domains:
  split.test:
    mode: split
    destination: { hosts: ["[192.0.2.30]:2525"] }
    accounts: [{ list: [alice@split.test] }]
  off.test:
    mode: split
    enabled: false
    destination: { hosts: ["[192.0.2.30]:2525"] }
    accounts: [{ list: [alice@off.test] }]
  dual.test:
    mode: dual
    destination: { hosts: [mx.legacy.example.net] }
    accounts: [{ list: [alice@dual.test] }]
"#;

/// On a non-SMTP conversation nothing is refused at RCPT (Postfix would
/// keep the message with 4.3.5, "milter configuration error"): the
/// whole message gets the refusal at end of message, a tempfail before a
/// reject. A redirect also deletes the bare local part, Postfix's original
/// recipient of `sendmail yan`. Over SMTP the same recipients are refused
/// at RCPT as before.
#[tokio::test]
async fn a_non_smtp_conversation_refuses_at_end_of_message_not_at_rcpt() {
    let milter = Milter::start(LOCAL_SUBMISSION).await;
    let mut session = non_smtp_session(&milter).await;
    // Held (routing off, no mailbox here) and refused (dual unknown):
    // the tempfail wins; nothing is changed.
    let d = session
        .message(
            None,
            &[&["zed@dual.test"], &["zed@off.test"], &["alice@split.test"]],
            &[],
        )
        .await;
    assert_eq!(
        d.rcpt,
        [Status::Continue, Status::Continue, Status::Continue]
    );
    assert_actions(&d.actions, &[]);
    match &d.eom {
        Status::Tempfail { message: Some(m) } => {
            let m = m.to_string_lossy();
            assert!(m.starts_with("451 4.4.4 ") && m.contains("off.test"), "{m}");
        }
        other => panic!("expected 451 4.4.4 at end of message, got {other:?}"),
    }
    // Only the reject: 550 5.1.1 for the whole message.
    let d = session
        .message(None, &[&["zed@dual.test"], &["alice@split.test"]], &[])
        .await;
    assert_eq!(d.rcpt, [Status::Continue, Status::Continue]);
    assert_actions(&d.actions, &[]);
    assert_rejected(&d.eom, "550 5.1.1");
    // A redirect: the address as shown and the bare local part deleted.
    let d = session.message(None, &[&["yan@split.test"]], &[]).await;
    assert_eq!(d.eom, Status::Continue);
    for want in [
        delete("yan@split.test"),
        delete("<yan>"),
        add(
            "<yan@split.test.dualroute.invalid>",
            "ORCPT=rfc822;yan@split.test",
        ),
    ] {
        assert!(
            d.actions.contains(&want),
            "{want:?} missing: {:?}",
            d.actions
        );
    }
    session.close().await;

    // Over SMTP (a real client port): refused at RCPT.
    let mut session = milter.session(CLIENT).await;
    session.mail(None).await;
    assert_rejected(&session.rcpt(&["<zed@dual.test>"]).await, "550 5.1.1");
    assert!(matches!(
        session.rcpt(&["<zed@off.test>"]).await,
        Status::Tempfail { .. }
    ));
    session.close().await;

    // Over SMTP, unqualified: `<yan>` is decided as Postfix's
    // `{rcpt_addr}` (myorigin appended) and routed, its own path deleted;
    // `<postmaster>` is accepted and never routed (RFC 5321 §4.5.1), even
    // where postmaster@ has no mailbox here.
    let mut session = milter.session(CLIENT).await;
    session.mail(None).await;
    assert_eq!(
        session.rcpt_as_parsed(&["<yan>"], "yan@split.test").await,
        Status::Continue
    );
    assert_eq!(
        session
            .rcpt_as_parsed(&["<postmaster>"], "postmaster@split.test")
            .await,
        Status::Continue
    );
    session.data(&[]).await;
    let (actions, eom) = session.eom().await;
    assert_eq!(eom, Status::Continue);
    assert_actions(
        &actions,
        &[
            add(
                "<yan@split.test.dualroute.invalid>",
                "ORCPT=rfc822;yan@split.test",
            ),
            delete("<yan>"),
            header(INSTANCE),
        ],
    );
    session.close().await;
    milter.shutdown().await;
}
