//! Notification by mail (README "Notification by mail", src/notify/),
//! with the whole service in process and `smtp-sink` standing in for the
//! local MTA (needs the postfix package, scripts/test-deps.sh):
//! - refused reloads reach the administrator, rate-limited: one message
//!   at once, what follows within `interval` gathered into the next;
//! - an MTA that cannot be reached costs nothing: the milter decides and
//!   routes as before.
//!
//! The end-to-end test (the breaker trips in a real Postfix and the
//! message lands in the admin's Maildir, not routed) is in
//! tests/breaker.rs.

mod support;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};
use support::protocol::{Milter, CLIENT};

fn yaml(dir: &Path, via: &str, interval: &str) -> String {
    format!(
        r#"instance: notify.test
state_dir: {state}
domains:
  example.com:
    mode: route
    destination: {{ hosts: ["[192.0.2.30]:2525"] }}
notify: {{ to: [admin@example.org, second@example.org], via: "{via}", interval: {interval} }}
"#,
        state = dir.join("state").display()
    )
}

async fn start(dir: &Path, yaml: &str) -> Milter {
    let path = dir.join("milter.yaml");
    fs::write(&path, yaml).unwrap();
    Milter::serve(support::protocol::start_at(&path, Default::default())).await
}

/// Makes the next reload fail: a file that does not parse.
async fn refused_reload(milter: &Milter, dir: &Path, n: usize) {
    fs::write(dir.join("milter.yaml"), format!("broken_{n}: 1\n")).unwrap();
    milter.sighup().await;
}

#[tokio::test]
async fn refused_reloads_are_notified_at_most_once_per_interval() {
    let sink = support::SmtpSink::start();
    let dir = tempfile::tempdir().unwrap();
    let milter = start(
        dir.path(),
        &yaml(dir.path(), &format!("smtp:{}", sink.addr()), "4s"),
    )
    .await;

    refused_reload(&milter, dir.path(), 1).await;
    let arrived = |n: usize| {
        let got = sink.messages().len();
        async move { (got >= n).then(Instant::now) }
    };
    let first = support::wait_until("the first notification", || arrived(1)).await;
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(
        m.rcpt_addresses(),
        ["admin@example.org", "second@example.org"]
    );
    assert_eq!(m.mail_from(), "dualroute@notify.test");
    assert_eq!(
        m.header("Subject"),
        ["[dualroute notify.test] reload refused, the running configuration stays"]
    );
    assert!(m.text.contains("broken_1"), "{}", m.text);

    // Two more within the interval: nothing at once, then one message
    // with both.
    refused_reload(&milter, dir.path(), 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    refused_reload(&milter, dir.path(), 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sink.messages().len(),
        1,
        "a second message within the interval"
    );
    support::wait_until("the second notification", || arrived(2)).await;
    let messages = sink.messages();
    assert!(
        first.elapsed() >= Duration::from_secs(3),
        "the second message came {:?} after the first",
        first.elapsed()
    );
    let m = &messages[1];
    assert_eq!(
        m.header("Subject"),
        ["[dualroute notify.test] 2 events: reload refused, the running configuration stays, ..."]
    );
    assert!(
        m.text.contains("broken_2") && m.text.contains("broken_3"),
        "{}",
        m.text
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn an_mta_that_cannot_be_reached_does_not_touch_mail() {
    // Nothing listens there: reserved, never listening, so refused.
    let port = support::Port::reserve();
    let dir = tempfile::tempdir().unwrap();
    let milter = start(
        dir.path(),
        &yaml(dir.path(), &format!("smtp:127.0.0.1:{port}"), "1s"),
    )
    .await;
    refused_reload(&milter, dir.path(), 1).await;
    // The notifier fails to connect meanwhile; mail is routed as always,
    // without waiting for it.
    for _ in 0..3 {
        let started = Instant::now();
        let d = milter
            .deliver(CLIENT, None, &[&["<zed@example.com>"]])
            .await;
        assert_eq!(
            support::protocol::added(&d.actions),
            ["<zed@example.com.dualroute.invalid>".to_owned()].into(),
            "{d:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    milter.shutdown().await;
}
