//! The verification probe (docs/design.md §7) against real SMTP servers on
//! loopback: `smtp-sink` accepting, `smtp-sink` refusing recipients, and a
//! closed port; and the running milter holding a domain's routing until
//! the probe passes.

mod support;
use support::protocol;

use dualroute::decision::Decision;
use indymilter_test::{EomAction, Status, TestConnection};
use std::time::Duration;
use support::{dualroute, dualroute_output, loopback_listener, wait_until, Port, SmtpSink};

/// The sender and recipient of the barrier message sent straight to a sink.
const BARRIER: &str = "barrier@probe.test";

/// A route domain whose destination is `nexthop`, probed with postmaster@.
fn yaml(nexthop: &str) -> String {
    // A state directory of its own per configuration of this process.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let state = std::env::temp_dir().join(format!(
        "dualroute-probe-state-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    format!(
        "instance: probe.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: route\n    verify: postmaster@example.com\n    destination: {{ hosts: [\"{nexthop}\"] }}\n",
        state.display()
    )
}

fn config(dir: &std::path::Path, nexthop: &str) -> std::path::PathBuf {
    let path = dir.join("milter.yaml");
    std::fs::write(&path, yaml(nexthop)).unwrap();
    path
}

/// `dualroute verify example.com` with `nexthop` as the destination: its
/// exit code and everything it printed.
fn verify(nexthop: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let (status, out) = dualroute(&config(dir.path(), nexthop), &["verify", "example.com"]);
    (status.code(), out)
}

#[test]
fn probe_accepted() {
    let sink = SmtpSink::start();
    let (code, out) = verify(&sink.nexthop());
    assert_eq!(code, Some(0), "{out}");
    for step in [
        "< 220",
        "> EHLO probe.test",
        "> MAIL FROM:<>",
        "> RCPT TO:<postmaster@example.com>",
        "✔ accepted",
        "verified",
    ] {
        assert!(out.contains(step), "{step:?} missing in:\n{out}");
    }
    // A probe never sends a message: its transcript has no DATA, and the
    // sink has no message from it. smtp-sink closes a message's dump file
    // before it answers the final dot, and the probe has exited, so a
    // message of its session would be dumped by now; the barrier message
    // sent after it shows the sink is dumping what it is sent.
    assert!(!out.contains("> DATA"), "{out}");
    let barrier = support::send(
        sink.addr(),
        BARRIER,
        &[BARRIER],
        &support::message("barrier"),
    );
    assert!(barrier.accepted(), "{barrier}");
    let messages = support::poll(|| {
        let messages = sink.messages();
        messages
            .iter()
            .any(|m| m.mail_from() == BARRIER)
            .then_some(messages)
    })
    .expect("the barrier message never reached the sink");
    let from_probe: Vec<_> = messages
        .iter()
        .filter(|m| m.mail_from() != BARRIER)
        .collect();
    assert!(
        from_probe.is_empty(),
        "the probe must not deliver anything: {from_probe:#?}"
    );
}

#[test]
fn probe_send_delivers_one_test_message() {
    let sink = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), &sink.nexthop());
    let out = dualroute_output(&path, &["verify", "example.com", "--send"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("> DATA") && text.contains("< 354"), "{text}");
    let messages = sink.wait_messages(1);
    assert_eq!(messages.len(), 1, "exactly one test message");
    assert_eq!(
        messages[0].rcpt_addresses(),
        vec!["postmaster@example.com".to_owned()]
    );
    assert!(
        messages[0]
            .text
            .contains("Subject: dualroute verification test"),
        "{}",
        messages[0].text
    );
}

#[test]
fn probe_refused() {
    let sink = SmtpSink::start_rejecting();
    let (code, out) = verify(&sink.nexthop());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("< 550"), "{out}");
    assert!(
        out.contains("RCPT TO:<postmaster@example.com> refused"),
        "{out}"
    );
    assert!(out.contains("NOT verified"), "{out}");
}

#[test]
fn probe_closed_port() {
    // Reserved and not listening: refused, and no other process takes it.
    let port = Port::reserve();
    let (code, out) = verify(&format!("[127.0.0.1]:{port}"));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("connect to 127.0.0.1:{port}")),
        "{out}"
    );
    assert!(out.contains("NOT verified"), "{out}");
}

/// In shadow mode a passed probe changes nothing: `verify` said "routing
/// starts within seconds" (issue 25).
#[test]
fn probe_accepted_in_shadow_mode_says_nothing_is_routed() {
    let sink = SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.yaml");
    std::fs::write(&path, format!("shadow: true\n{}", yaml(&sink.nexthop()))).unwrap();
    let (status, out) = dualroute(&path, &["verify", "example.com"]);
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(!out.contains("routing starts"), "{out}");
    assert!(
        out.contains("example.com: verified: the destination accepts postmaster@example.com; the domain is in shadow mode: nothing is routed until shadow is switched off"),
        "{out}"
    );
}

#[test]
fn unknown_domain_or_no_verify_address() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "[127.0.0.1]:9");
    let out = dualroute_output(&path, &["verify", "other.example"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a managed domain"));
}

/// Sends one message to `zed@example.com` (no mailbox here): `None` when
/// the milter refused the RCPT for now (`451 4.4.4`, routing held), else the
/// end-of-message actions.
async fn route_once(addr: std::net::SocketAddr) -> Option<Vec<EomAction>> {
    let mut conn = TestConnection::open(addr).await.unwrap();
    // No reply at all where the milter negotiated none (NR_CONN, NR_MAIL).
    let status = conn.connect("client.test", [203, 0, 113, 5]).await.unwrap();
    assert!(
        matches!(status, Status::Continue | Status::Noreply),
        "{status:?}"
    );
    let status = conn.mail(["<s@sender.test>"]).await.unwrap();
    assert!(
        matches!(status, Status::Continue | Status::Noreply),
        "{status:?}"
    );
    match conn.rcpt(["<zed@example.com>"]).await.unwrap() {
        Status::Continue => {}
        Status::Tempfail { message } => {
            let reply = message.map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned());
            assert!(
                reply
                    .as_deref()
                    .is_some_and(|r| r.starts_with("451 4.4.4 ")),
                "{reply:?}"
            );
            conn.close().await.unwrap();
            return None;
        }
        other => panic!("RCPT <zed@example.com>: {other:?}"),
    }
    let (actions, status) = conn.eom().await.unwrap();
    assert_eq!(status, Status::Continue);
    conn.close().await.unwrap();
    Some(actions.actions)
}

async fn milter_with_verify(nexthop: &str) -> protocol::Milter {
    // The whole service, verification probe included, as `dualroute run`
    // starts it.
    protocol::Milter::start(&yaml(nexthop)).await
}

#[tokio::test]
async fn milter_holds_routing_until_verified() {
    let sink = SmtpSink::start();
    let milter = milter_with_verify(&sink.nexthop()).await;
    let service = &milter;
    let addr = milter.addr();
    // The probe runs at once; until it passes the domain is held.
    wait_until("routing to start once the sink accepts the probe", || {
        // Read before the message: the probe may release the domain while
        // the message is under way, but a message that starts after the
        // release must be routed.
        let held_before = service.holds().get("example.com").is_some();
        async move {
            let actions = route_once(addr).await;
            match actions {
                Some(actions) => {
                    assert!(
                        actions.contains(&EomAction::DeleteRecipient {
                            rcpt: c"<zed@example.com>".into()
                        }),
                        "{actions:?}"
                    );
                    Some(())
                }
                None => {
                    assert!(held_before, "refused although the domain was not held");
                    None
                }
            }
        }
    })
    .await;
}

#[tokio::test]
async fn milter_keeps_routing_off_when_probe_refused() {
    let sink = SmtpSink::start_rejecting();
    let milter = milter_with_verify(&sink.nexthop()).await;
    let service = &milter;
    // Wait for the first probe to have run and failed.
    let reason = wait_until("the first probe to fail", || {
        let reason = service
            .holds()
            .get("example.com")
            .map(ToString::to_string)
            .unwrap_or_default();
        async move { reason.contains("last probe failed").then_some(reason) }
    })
    .await;
    assert!(reason.contains("last probe failed"), "{reason}");
    assert_eq!(
        route_once(milter.addr()).await,
        None,
        "a held domain must not be routed"
    );
    let v = dualroute::decision::decide(
        &service.policy(),
        &service.holds(),
        &Default::default(),
        dualroute::address::RcptArg::parse(&["<zed@example.com>"])
            .address
            .as_ref(),
    );
    assert!(matches!(v.decision, Decision::Tempfail(_)), "{v:?}");
}

/// One destination that accepts the connection and never says a word (the
/// probe waits 30 s for its greeting) must not delay the verification of
/// the others: probes run concurrently (src/service/verify.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_destination_does_not_delay_the_others() {
    let sink = SmtpSink::start();
    // Kept bound and never answered for the whole test.
    let silent = loopback_listener();
    let silent_port = silent.local_addr().expect("local address").port();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept() {
            conns.push(c);
        }
    });
    let state = tempfile::tempdir().unwrap();
    // Several silent domains: the old, sequential probe visited the domains
    // in hash order and got to example.com after them in most runs.
    let mut yaml = format!(
        "instance: probe.test\nstate_dir: {}\ndomains:\n",
        state.path().display()
    );
    for d in [
        "silent1.test",
        "silent2.test",
        "silent3.test",
        "example.com",
    ] {
        let hop = if d == "example.com" {
            sink.nexthop()
        } else {
            format!("[127.0.0.1]:{silent_port}")
        };
        yaml.push_str(&format!(
            "  {d}:\n    mode: route\n    verify: postmaster@{d}\n    destination: {{ hosts: [\"{hop}\"] }}\n"
        ));
    }
    let milter = protocol::Milter::start(&yaml).await;
    let service = &milter;
    let started = std::time::Instant::now();
    wait_until(
        "example.com to be verified while the silent destinations hang",
        || {
            let held = service.holds().get("example.com").is_some();
            async move { (!held).then_some(()) }
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "example.com was verified only after {:?}",
        started.elapsed()
    );
    for d in ["silent1.test", "silent2.test", "silent3.test"] {
        assert!(service.holds().get(d).is_some(), "{d} must stay held");
    }
    milter.shutdown().await;
    drop(held);
}
