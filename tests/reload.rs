//! Live reload (docs/design.md §7) under load: many conversations run while the
//! policy is reloaded. None fails; a message keeps the policy it started
//! with (at MAIL); messages begun after the reload get the new one. And the
//! real binary reloads by itself when an account file changes.

mod support;
use support::protocol;
use support::{MilterProcess, Port};

use indymilter_test::{EomAction, Status, TestConnection};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(dir: &std::path::Path, mode: &str) -> String {
    format!(
        "instance: reload.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: {mode}\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n    accounts: [{{ list: [zed@example.com] }}]\n",
        dir.join("state").display()
    )
}

/// The outcome of one message for `<zed@example.com>`: routed (old policy,
/// route) or kept (new policy, split with zed present).
#[derive(Debug, PartialEq)]
enum Seen {
    Routed,
    Kept,
}

async fn conversation(
    addr: std::net::SocketAddr,
    hold: Option<Arc<AtomicBool>>,
) -> Result<(Seen, Instant, Instant), String> {
    // As an MTA that offers no no-reply options: then MAIL's reply marks
    // the moment the milter took its policy snapshot (with NR_MAIL the MTA
    // does not wait for MAIL to be processed).
    let mut conn = TestConnection::configure()
        .available_opts(
            indymilter_test::ProtoOpts::all()
                - indymilter_test::ProtoOpts::NOREPLY_CONNECT
                - indymilter_test::ProtoOpts::NOREPLY_MAIL,
        )
        .open_tcp(addr)
        .await
        .map_err(|e| format!("open: {e}"))?;
    conn.connect("client.test", [203, 0, 113, 7])
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mail_start = Instant::now();
    let s = conn
        .mail(["<s@sender.test>"])
        .await
        .map_err(|e| format!("mail: {e}"))?;
    let mail_done = Instant::now();
    if s != Status::Continue {
        return Err(format!("MAIL answered {s:?}"));
    }
    // A message in flight across the reload: wait until it has happened.
    if let Some(flag) = hold {
        while !flag.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let s = conn
        .rcpt(["<zed@example.com>"])
        .await
        .map_err(|e| format!("rcpt: {e}"))?;
    if s != Status::Continue {
        return Err(format!("RCPT answered {s:?}"));
    }
    let (actions, s) = conn.eom().await.map_err(|e| format!("eom: {e}"))?;
    if s != Status::Continue {
        return Err(format!("EOM answered {s:?}"));
    }
    conn.close().await.map_err(|e| format!("close: {e}"))?;
    let routed = actions.actions.contains(&EomAction::DeleteRecipient {
        rcpt: c"<zed@example.com>".into(),
    });
    match (routed, actions.actions.is_empty()) {
        (true, false) => Ok((Seen::Routed, mail_start, mail_done)),
        (false, true) => Ok((Seen::Kept, mail_start, mail_done)),
        _ => Err(format!("unexpected actions {:?}", actions.actions)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_keeps_each_message_on_its_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.yaml");
    std::fs::write(&path, config(dir.path(), "route")).unwrap();
    let milter = protocol::Milter::serve(protocol::start_at(&path, Default::default())).await;
    let addr = milter.addr();

    let reloaded = Arc::new(AtomicBool::new(false));
    // Messages begun before the reload that finish after it.
    let mut in_flight = Vec::new();
    for _ in 0..20 {
        in_flight.push(tokio::spawn(conversation(addr, Some(reloaded.clone()))));
    }
    // A steady load of short conversations throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..8 {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut results = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                results.push(conversation(addr, None).await);
            }
            results
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&path, config(dir.path(), "split")).unwrap();
    let reload_start = Instant::now();
    milter.reload().await.expect("reload");
    let reload_done = Instant::now();
    reloaded.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);

    for h in in_flight {
        let (seen, _, _) = h.await.unwrap().expect("in-flight conversation failed");
        assert_eq!(
            seen,
            Seen::Routed,
            "a message begun before the reload must keep the old policy"
        );
    }
    let (mut before, mut after, mut total) = (0, 0, 0);
    for h in load {
        for r in h.await.unwrap() {
            let (seen, mail_start, mail_done) = r.expect("conversation failed during reload");
            total += 1;
            if mail_done < reload_start {
                assert_eq!(seen, Seen::Routed, "MAIL before the reload");
                before += 1;
            } else if mail_start > reload_done {
                assert_eq!(seen, Seen::Kept, "MAIL after the reload");
                after += 1;
            }
        }
    }
    assert!(
        before > 10 && after > 10,
        "too little load to show anything: {before} before, {after} after, {total} in all"
    );
}

#[test]
fn binary_reloads_when_an_account_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let port = Port::reserve();
    let accounts = dir.path().join("accounts");
    std::fs::write(&accounts, "alice@example.com\n").unwrap();
    let path = dir.path().join("milter.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: inet:127.0.0.1:{port}\ninstance: reload.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: split\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n    accounts: [{{ file: accounts }}]\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut milter = MilterProcess::start(&path, &port, &dir.path().join("stderr"));
    let addr = milter.addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let (seen, _, _) = conversation(addr, None).await?;
        if seen != Seen::Routed {
            return Err(format!(
                "zed is not an account yet, expected routed, got {seen:?}"
            ));
        }
        std::fs::write(&accounts, "alice@example.com\nzed@example.com\n")
            .map_err(|e| e.to_string())?;
        support::wait_until(
            "the milter to pick up the changed account file",
            || async move {
                match conversation(addr, None).await {
                    Ok((Seen::Kept, _, _)) => Some(Ok(())),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                }
            },
        )
        .await
    });
    milter.kill();
    let stderr = milter.log();
    result.unwrap_or_else(|e| panic!("{e}\nmilter stderr:\n{stderr}"));
    assert!(stderr.contains("account file changed"), "{stderr}");
}
