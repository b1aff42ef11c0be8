//! End-to-end (issue 7 §4): an account file emptied or cut in half while
//! the milter runs must not route the mailboxes it lost away. The real
//! `dualroute run` in front of a private Postfix (tests/support/), an
//! `smtp-sink` as the other server: after each bad rewrite the milter logs
//! an ERROR, keeps its accounts and `dualroute status` shows the refusal.
//! Emptied, alice's next message still lands in her Maildir; halved with
//! alice among the lost, she is tempfailed (issue 21 §4) until the file
//! is restored. Never at the sink.
//!
//! Needs root and Postfix (scripts/test-deps.sh).

mod support;

use std::fs;
use std::path::Path;
use support::{
    dualroute, poll, postfix_config, MilterProcess, Postfix, PostfixOptions, SmtpClient, SmtpSink,
    OUTSIDE_IP,
};

const SENDER: &str = "sender@outside.test";

fn message(subject: &str) -> String {
    format!("From: {SENDER}\nTo: alice@example.com\nSubject: {subject}\n\nbody of {subject}\n")
}

/// Rewrites the file in place, as an editor or `>` in a script does.
fn rewrite(path: &Path, names: &[&str]) {
    let text: String = names.iter().map(|n| format!("{n}@example.com\n")).collect();
    fs::write(path, text).unwrap();
}

#[test]
fn emptied_or_halved_account_file_keeps_mail_local() {
    let tmp = tempfile::Builder::new()
        .prefix("dualroute-accounts-e2e-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let sink = SmtpSink::start();
    let port = support::Port::reserve();
    let accounts = dir.join("example.com.accounts");
    rewrite(&accounts, &["alice", "bob", "carol", "dave"]);
    let config = dir.join("milter.yaml");
    fs::write(
        &config,
        format!(
            "listen: inet:127.0.0.1:{port}\ninstance: e2e.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: split\n    destination: {{ hosts: [\"{}\"] }}\n    accounts:\n      - file: {}\n",
            dir.join("state").display(),
            sink.nexthop(),
            accounts.display()
        ),
    )
    .unwrap();
    let generated = postfix_config(&config, &dir.join("postfix-config"));
    let opts = PostfixOptions::default().domain_without_catchall(
        "example.com",
        &[
            "alice@example.com",
            "bob@example.com",
            "carol@example.com",
            "dave@example.com",
        ],
    );
    let pf = Postfix::start(generated.apply_to(opts));
    let milter = MilterProcess::start(&config, &port, &dir.join("milter.log"));
    let client = SmtpClient::new(pf.smtp_addr()).bind(OUTSIDE_IP);
    let diag = |what: &str| {
        format!(
            "{what}\n{}\n--- milter log ---\n{}\n--- sink ---\n{:?}",
            pf.diagnostics(),
            milter.log(),
            sink.messages()
                .iter()
                .map(|m| m.rcpts.clone())
                .collect::<Vec<_>>()
        )
    };
    let send = |subject: &str| {
        let t = client.send(SENDER, &["alice@example.com"], &message(subject));
        assert!(t.accepted(), "{t}\n{}", diag("not accepted"));
        pf.wait_queue_empty();
    };

    send("before");
    let mut expected = 1;
    let mut changes = 0;
    let refused = |what: &str, changes: usize| {
        // The milter saw the change and refused the reload ...
        milter.wait_log(&["account file changed"], changes);
        let log = milter.log();
        let refusal = log
            .lines()
            .filter(|l| l.contains("account file changed"))
            .nth(changes - 1)
            .unwrap_or_default()
            .to_owned();
        assert!(
            refusal.contains("ERROR") && refusal.contains("reload was refused"),
            "{what}: {refusal}"
        );
        let (ok, status) = dualroute(&config, &["status"]);
        assert!(!ok.success(), "{what}: status exit 0:\n{status}");
        assert!(status.contains("RELOAD REFUSED since"), "{what}: {status}");
        status
    };
    // Emptied: no statement about any address, an error; the running
    // accounts are trusted and alice's next message lands here.
    rewrite(&accounts, &[]);
    changes += 1;
    refused("emptied", changes);
    send("emptied");
    expected += 1;
    assert_eq!(
        pf.maildir_messages("alice@example.com").len(),
        expected,
        "{}",
        diag("emptied")
    );
    assert!(sink.messages().is_empty(), "{}", diag("emptied"));
    // Halved, alice among the lost (issue 21 §4): neither list is trusted
    // for the addresses they disagree on. alice is tempfailed (the sender
    // retries), never routed to the sink nor filed anywhere.
    rewrite(&accounts, &["bob", "carol"]);
    changes += 1;
    let status = refused("halved", changes);
    assert!(
        status.contains("ACCOUNTS HELD")
            && status.contains("`dualroute confirm-accounts example.com`"),
        "{status}"
    );
    let t = client.send(SENDER, &["alice@example.com"], &message("halved"));
    assert!(
        t.to_string().contains("451 4.4.4 <alice@example.com>"),
        "{t}\n{}",
        diag("halved")
    );
    assert_eq!(
        pf.maildir_messages("alice@example.com").len(),
        expected,
        "{}",
        diag("halved")
    );
    assert!(sink.messages().is_empty(), "{}", diag("halved"));
    assert!(
        milter.log().contains("would go from 4 to 2 accounts"),
        "{}",
        diag("halving")
    );
    assert!(
        milter.log().contains("no account of example.com"),
        "{}",
        diag("emptying")
    );

    // Put back (and one more): reloaded, the refusal is gone.
    rewrite(&accounts, &["alice", "bob", "carol", "dave", "erin"]);
    milter.wait_log(&["account file changed"], changes + 1);
    let restored = poll(|| {
        let (ok, status) = dualroute(&config, &["status"]);
        (ok.success() && !status.contains("REFUSED")).then_some(())
    });
    assert!(restored.is_some(), "{}", diag("restore"));
    send("restored");
    assert_eq!(
        pf.maildir_messages("alice@example.com").len(),
        expected + 1,
        "{}",
        diag("restored")
    );
    assert!(pf.maillog().lines().all(|l| !l.contains("status=bounced")));
    drop(milter);
    drop(tmp);
}

/// docs/design.md §5: no domains is valid; `check` says the milter changes
/// nothing, and `run` starts (transparent) with a WARN saying so.
#[test]
fn no_domains_starts_transparent_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let port = support::Port::reserve();
    let config = tmp.path().join("milter.yaml");
    fs::write(
        &config,
        format!(
            "listen: inet:127.0.0.1:{port}\nstate_dir: {}\n",
            tmp.path().join("state").display()
        ),
    )
    .unwrap();
    let (ok, out) = dualroute(&config, &["check"]);
    assert!(ok.success(), "{out}");
    assert!(
        out.contains("no domains configured: dualroute changes nothing"),
        "{out}"
    );
    let milter = MilterProcess::start(&config, &port, &tmp.path().join("milter.log"));
    milter.wait_log(&["no domains configured"], 1);
    let log = milter.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("dualroute changes nothing")),
        "{log}"
    );
}
