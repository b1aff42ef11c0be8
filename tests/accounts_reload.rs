//! A reload must not take a domain's mailboxes away by accident (docs/design.md
//! §5): an account file emptied or cut short is refused, the running
//! accounts stay, the refusal is logged by the caller and shown by
//! `dualroute status` until a good load clears it.

mod support;
use dualroute::Intervals;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::{protocol, wait_until};

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("milter.yaml");
    std::fs::write(
        &path,
        format!(
            "{extra}state_dir: {}\ndomains:\n  example.com:\n    mode: split\n    destination: {{ hosts: [\"[192.0.2.30]\"] }}\n    accounts:\n      - file: accounts\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

fn accounts(dir: &Path, names: &[&str]) {
    let text: String = names.iter().map(|n| format!("{n}@example.com\n")).collect();
    std::fs::write(dir.join("accounts"), text).unwrap();
}

fn status(path: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args(["status", "--config"])
        .arg(path)
        .output()
        .expect("run dualroute");
    // Its first word is the file it read (docs/design.md §6).
    let stderr = String::from_utf8_lossy(&out.stderr);
    let named = format!("dualroute: configuration {}\n", path.display());
    assert!(stderr.starts_with(&named), "{stderr}");
    // The in-process service publishes what it runs (src/running.rs): the
    // first line says so, the last one the exit code in words; the lines
    // between are the domains these tests look at.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("milter: running, pid ")),
        "{stdout}"
    );
    assert!(
        lines.last().is_some_and(|l| l.starts_with("status: ")),
        "{stdout}"
    );
    lines.remove(0);
    lines.pop();
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    (
        out.status.success(),
        format!("{body}{}", &stderr[named.len()..]),
    )
}

fn count(milter: &protocol::Milter) -> usize {
    let p = milter.policy();
    p.domains["example.com"].accounts.as_ref().unwrap().len()
}

/// Intervals for a service that reloads only when the test asks: its
/// watches look first after an hour.
fn by_hand() -> Intervals {
    let hour = std::time::Duration::from_secs(3600);
    Intervals {
        state: hour,
        accounts: hour,
        verify: hour,
    }
}

#[tokio::test]
async fn emptied_account_file_is_refused_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    accounts(dir.path(), &["alice", "bob", "carol", "dave"]);
    let path = write_config(dir.path(), "");
    let service = protocol::Milter::serve(protocol::start_at(&path, by_hand())).await;
    assert_eq!(
        status(&path),
        (true, "example.com: mode split: active\n".into())
    );

    std::fs::write(dir.path().join("accounts"), "").unwrap();
    let e = service.reload().await.unwrap_err().to_string();
    assert!(e.contains("no account of example.com"), "{e}");
    assert_eq!(count(&service), 4, "the running accounts stay");
    let (ok, out) = status(&path);
    assert!(!ok, "status exits 1 while a reload is refused: {out}");
    assert!(
        out.starts_with("RELOAD REFUSED since ") && out.contains("no account of example.com"),
        "{out}"
    );

    // Fixed: the next reload loads and clears the refusal.
    accounts(dir.path(), &["alice", "bob", "carol", "dave", "erin"]);
    service.reload().await.unwrap();
    assert_eq!(count(&service), 5);
    assert_eq!(
        status(&path),
        (true, "example.com: mode split: active\n".into())
    );
}

#[tokio::test]
async fn shrinking_by_half_is_refused_unless_the_limit_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    accounts(dir.path(), &["alice", "bob", "carol", "dave"]);
    let path = write_config(dir.path(), "");
    let service = protocol::Milter::serve(protocol::start_at(&path, by_hand())).await;

    // One of four gone: a normal change.
    accounts(dir.path(), &["alice", "bob", "carol"]);
    service.reload().await.unwrap();
    assert_eq!(count(&service), 3);
    accounts(dir.path(), &["alice", "bob", "carol", "dave"]);
    service.reload().await.unwrap();

    // Half gone: refused (default limit 0.5).
    accounts(dir.path(), &["alice", "bob"]);
    let e = service.reload().await.unwrap_err().to_string();
    assert!(
        e.contains("example.com would go from 4 to 2 accounts")
            && e.contains("accounts_shrink_limit"),
        "{e}"
    );
    assert_eq!(count(&service), 4);
    let (ok, out) = status(&path);
    assert!(!ok && out.contains("from 4 to 2 accounts"), "{out}");

    // The administrator means it: the new limit applies to this reload.
    write_config(dir.path(), "accounts_shrink_limit: 0.8\n");
    service.reload().await.unwrap();
    assert_eq!(count(&service), 2);
    let (ok, out) = status(&path);
    assert!(ok && !out.contains("REFUSED"), "{out}");
}

/// `postfix_map: hash:…` follows what Postfix reads: editing the text does
/// nothing until `postmap` rebuilds the .db, which the watcher then sees.
/// A watcher that starts also clears a refusal left by an earlier run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_table_reloads_after_postmap_not_after_an_edit() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("postfix-etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("main.cf"), "compatibility_level = 3.6\n").unwrap();
    // postmap (run by us and by the milter) reads main.cf from here.
    std::env::set_var("MAIL_CONFIG", &etc);
    let map = dir.path().join("vmailbox");
    let postmap = || {
        let out = Command::new("postmap")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .arg(format!("hash:{}", map.display()))
            .output()
            .expect(
                "postmap is not installed: run scripts/test-deps.sh or `apt-get install postfix`",
            );
        assert!(out.status.success(), "{out:?}");
    };
    std::fs::write(&map, "alice@example.com a/\nbob@example.com b/\n").unwrap();
    postmap();
    let path = dir.path().join("milter.yaml");
    std::fs::write(
        &path,
        format!(
            "state_dir: {}\ndomains:\n  example.com:\n    mode: split\n    destination: {{ hosts: [\"[192.0.2.30]\"] }}\n    accounts:\n      - postfix_map: \"hash:{}\"\n",
            dir.path().join("state").display(),
            map.display()
        ),
    )
    .unwrap();
    let every = std::time::Duration::from_millis(100);
    let intervals = Intervals {
        accounts: every,
        ..Intervals::default()
    };
    let state = dualroute::state::StateDir::new(&dir.path().join("state"));
    state.refuse_reload("left by an earlier run").unwrap();
    // The whole service, as `dualroute run` starts it: its account watch
    // clears a refusal left by an earlier run.
    let milter = protocol::Milter::serve(protocol::start_at(&path, intervals)).await;
    let service = &milter;
    assert_eq!(count(service), 2);
    tokio::time::sleep(every * 5).await;
    assert_eq!(state.reload_refused().unwrap(), None);

    std::fs::write(
        &map,
        "alice@example.com a/\nbob@example.com b/\ncarol@example.com c/\n",
    )
    .unwrap();
    tokio::time::sleep(every * 10).await;
    assert_eq!(count(service), 2, "the text changed, Postfix's .db did not");
    postmap();
    wait_until("the postmap'ed table to be reloaded", || {
        let n = count(service);
        async move { (n == 3).then_some(()) }
    })
    .await;
    milter.shutdown().await;
}

/// What the milter answers to RCPT `<rcpt>` from an outside client, and
/// what it does at end of message.
async fn rcpt_outcome(milter: &protocol::Milter, rcpt: &str) -> String {
    let client = std::net::IpAddr::from([203, 0, 113, 5]);
    let d = milter.deliver(client, None, &[&[rcpt]]).await;
    match &d.rcpt[0] {
        indymilter_test::Status::Tempfail { message: Some(m) }
        | indymilter_test::Status::Reject { message: Some(m) } => m.to_string_lossy().into_owned(),
        _ if protocol::deleted(&d.actions).contains(rcpt) => "routed".to_owned(),
        _ if d.actions.is_empty() => "kept".to_owned(),
        other => format!("{other:?} {:?}", d.actions),
    }
}

/// Issue 21 §4: while the shrink guard refuses a reload, the addresses the
/// running and the refused lists disagree on are tempfailed — bob, removed
/// from the source, is no longer kept for a mailbox Postfix may have lost
/// (the catch-all), and erin, added, is not routed away — until the
/// administrator confirms the new list with `dualroute confirm-accounts`.
#[tokio::test]
async fn a_refused_shrink_holds_the_disputed_addresses_until_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    accounts(dir.path(), &["alice", "bob", "carol", "dave"]);
    let path = write_config(dir.path(), "");
    let intervals = Intervals {
        state: std::time::Duration::from_millis(50),
        accounts: std::time::Duration::from_millis(50),
        verify: std::time::Duration::from_secs(3600),
    };
    let milter = protocol::Milter::serve(protocol::start_at(&path, intervals)).await;
    let service = &milter;

    accounts(dir.path(), &["alice", "erin"]);
    let e = service.reload().await.unwrap_err().to_string();
    assert!(
        e.contains("from 4 to 2 accounts") && e.contains("dualroute confirm-accounts example.com"),
        "{e}"
    );
    for held in [
        "<bob@example.com>",
        "<carol@example.com>",
        "<erin@example.com>",
    ] {
        let got = rcpt_outcome(&milter, held).await;
        assert!(
            got.starts_with("451 4.4.4 "),
            "{held} is disputed: got {got}"
        );
    }
    assert_eq!(rcpt_outcome(&milter, "<alice@example.com>").await, "kept");
    assert_eq!(rcpt_outcome(&milter, "<zed@example.com>").await, "routed");
    let (ok, out) = status(&path);
    assert!(
        !ok && out.contains("ACCOUNTS HELD since")
            && out.contains("the 4 addresses the two lists disagree on get 451 4.4.4")
            && out.contains("bob@example.com")
            && out.contains("`dualroute confirm-accounts example.com`"),
        "{out}"
    );

    let (done, said) = support::dualroute(&path, &["confirm-accounts", "example.com"]);
    assert!(done.success(), "{said}");
    wait_until("the confirmed reload", || {
        let n = count(service);
        std::future::ready((n == 2).then_some(()))
    })
    .await;
    assert_eq!(rcpt_outcome(&milter, "<bob@example.com>").await, "routed");
    assert_eq!(rcpt_outcome(&milter, "<erin@example.com>").await, "kept");
    let (ok, out) = status(&path);
    assert!(
        ok && !out.contains("HELD") && !out.contains("REFUSED"),
        "{out}"
    );
    let (done, said) = support::dualroute(&path, &["confirm-accounts", "example.com"]);
    assert!(
        !done.success() && said.contains("nothing to confirm"),
        "a second confirmation has nothing to confirm: {said}"
    );
    milter.shutdown().await;
}

/// Restoring the account source settles a dispute too: the running list
/// was right, the next reload passes the guard and nothing stays held.
#[tokio::test]
async fn restoring_the_source_settles_a_dispute() {
    let dir = tempfile::tempdir().unwrap();
    accounts(dir.path(), &["alice", "bob", "carol", "dave"]);
    let path = write_config(dir.path(), "");
    let milter = protocol::Milter::serve(protocol::start_at(&path, Intervals::default())).await;
    let service = &milter;
    accounts(dir.path(), &["alice"]);
    service.reload().await.unwrap_err();
    assert!(rcpt_outcome(&milter, "<bob@example.com>")
        .await
        .starts_with("451 4.4.4 "));
    accounts(dir.path(), &["alice", "bob", "carol", "dave"]);
    service.reload().await.unwrap();
    assert_eq!(rcpt_outcome(&milter, "<bob@example.com>").await, "kept");
    let (ok, out) = status(&path);
    assert!(ok && !out.contains("HELD"), "{out}");
    milter.shutdown().await;
}

/// A domain of two that loses one mailbox is an administrator deleting
/// it, not a truncated file: no guard, no admin at 3 a.m.
#[tokio::test]
async fn losing_one_account_of_two_is_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    accounts(dir.path(), &["alice", "bob"]);
    let path = write_config(dir.path(), "");
    let service = protocol::Milter::serve(protocol::start_at(&path, by_hand())).await;
    accounts(dir.path(), &["alice"]);
    service.reload().await.unwrap();
    assert_eq!(count(&service), 1);
}
