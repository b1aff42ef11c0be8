//! `dualroute status`, `disable`, `enable` (docs/design.md §6–7): the state
//! survives in `state_dir`, `status` reports it, and the running milter
//! follows within seconds without a restart.

mod support;
use support::{dualroute, MilterProcess, Port};

use indymilter_test::{EomAction, Status, TestConnection};
use std::path::Path;
use std::time::{Duration, Instant};

fn write_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("milter.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: inet:127.0.0.1:{port}\ninstance: state.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: route\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n  example.org:\n    mode: route\n    verify: postmaster@example.org\n    destination: {{ hosts: [\"[127.0.0.1]:1\"] }}\n  example.net:\n    mode: route\n    enabled: false\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

/// Whether the milter routes `zed@example.com` (no mailbox here); `false`
/// when it refuses it for now because routing is off (451 4.4.4).
async fn routed(addr: std::net::SocketAddr) -> bool {
    let mut conn = TestConnection::open(addr).await.unwrap();
    conn.connect("client.test", [203, 0, 113, 7]).await.unwrap();
    conn.mail(["<s@sender.test>"]).await.unwrap();
    match conn.rcpt(["<zed@example.com>"]).await.unwrap() {
        Status::Continue => {}
        Status::Tempfail { message: Some(m) } if m.to_string_lossy().starts_with("451 4.4.4 ") => {
            conn.close().await.unwrap();
            return false;
        }
        other => panic!("RCPT <zed@example.com>: {other:?}"),
    }
    let (actions, _) = conn.eom().await.unwrap();
    conn.close().await.unwrap();
    actions.actions.contains(&EomAction::DeleteRecipient {
        rcpt: c"<zed@example.com>".into(),
    })
}

/// Whether mail to zed gets routed reaches `want` within the wait.
async fn wait_until(addr: std::net::SocketAddr, want: bool) -> bool {
    let deadline = Instant::now() + support::WAIT;
    while routed(addr).await != want {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    true
}

#[test]
fn status_disable_enable_with_a_running_milter() {
    let dir = tempfile::tempdir().unwrap();
    let port = Port::reserve();
    let config = write_config(dir.path(), port.number());

    let (status, out) = dualroute(&config, &["status"]);
    // No milter runs yet: exit 2, and the configuration on disk is shown
    // (example.org waits for its probe, example.net is off).
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("milter: NOT RUNNING"), "{out}");
    assert!(out.contains("example.com: mode route: active"), "{out}");
    assert!(out.contains("example.org: mode route: WAITING for verification of postmaster@example.org; no probe yet"), "{out}");
    assert!(
        out.contains("example.net: mode route: routing OFF (enabled: false"),
        "{out}"
    );

    let mut milter = MilterProcess::start(&config, &port, &dir.path().join("stderr"));
    let addr = milter.addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result: Result<(), String> = rt.block_on(async {
        if !routed(addr).await {
            return Err("example.com should be routed at first".into());
        }
        let (status, out) = dualroute(&config, &["disable", "example.com", "--reason", "legacy server maintenance"]);
        if status.code() != Some(0) {
            return Err(out);
        }
        if !wait_until(addr, false).await {
            return Err("the running milter did not follow `disable`".into());
        }
        let (status, out) = dualroute(&config, &["status"]);
        if !out.contains("example.com: mode route: DISABLED by an administrator since") || !out.contains("legacy server maintenance") {
            return Err(format!("status after disable: {out}"));
        }
        // A milter runs, a domain is held: exit 1.
        if status.code() != Some(1) || !out.contains("milter: running, pid ") {
            return Err(format!("status after disable, exit {status}: {out}"));
        }
        // The milter's probe of example.org (closed port) has failed by now.
        let (_, out) = dualroute(&config, &["status"]);
        if !out.contains("example.org: mode route: WAITING for verification of postmaster@example.org; last probe") {
            return Err(format!("status after a failed probe: {out}"));
        }
        let (status, out) = dualroute(&config, &["enable", "example.com"]);
        if status.code() != Some(0) || !out.contains("admin disable cleared") {
            return Err(out);
        }
        if !wait_until(addr, true).await {
            return Err("the running milter did not follow `enable`".into());
        }
        Ok(())
    });
    milter.kill();
    result.unwrap_or_else(|e| panic!("{e}\nmilter stderr:\n{}", milter.log()));
    // Killed: its record stays, its process is gone (issue 25).
    let (status, out) = dualroute(&config, &["status"]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("milter: NOT RUNNING: the last milter (pid "),
        "{out}"
    );

    // The state survives a restart: disable, then a new process (explain
    // loads the same state) still sees it.
    dualroute(&config, &["disable", "example.com"]);
    let (_, out) = dualroute(&config, &["explain", "zed@example.com"]);
    assert!(
        out.contains("zed@example.com: tempfail 451 4.4.4 <zed@example.com>: routing of mail for example.com is paused (disabled by the administrator); try again later — routing off (disabled by an administrator since"),
        "{out}"
    );
    let (status, out) = dualroute(&config, &["enable", "nosuch.example"]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("not a managed domain"), "{out}");
}

/// `dualroute explain` (a one-shot process reading state_dir) and the
/// running milter agree in every routing state: verification pending,
/// failed, passed, passed for another destination, disabled, tripped, an
/// unreadable state file.
#[test]
fn explain_and_the_running_milter_agree_in_every_hold_state() {
    let dir = tempfile::tempdir().unwrap();
    let port = Port::reserve();
    let state = dir.path().join("state");
    let path = dir.path().join("milter.yaml");
    let destination = "[127.0.0.1]:1";
    std::fs::write(
        &path,
        format!(
            "listen: inet:127.0.0.1:{port}\ninstance: state.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: route\n    verify: postmaster@example.com\n    destination: {{ hosts: [\"{destination}\"] }}\n",
            state.display()
        ),
    )
    .unwrap();
    let target = format!("RCPT TO:<postmaster@example.com> at hosts {destination}");
    let verify = |passed: bool, target: &str| {
        format!("at: 1795000000\npassed: {passed}\ndetail: test\ntarget: \"{target}\"\n")
    };
    let tripped = "since: 1795000000\nbounces: 3\nwindow_secs: 3600\nlast: x\n";
    let disabled = "since: 1795000000\nreason: test\n";
    // (files to write, whether zed@ is routed, words explain must print)
    type Case<'a> = (Vec<(&'a str, String)>, bool, &'a str);
    let cases: Vec<Case> = vec![
        (vec![], false, "waiting for verification"),
        (
            vec![("verify", verify(false, &target))],
            false,
            "last probe failed",
        ),
        (vec![("verify", verify(true, &target))], true, "mode route"),
        (
            vec![(
                "verify",
                verify(
                    true,
                    "RCPT TO:<postmaster@example.com> at hosts [192.0.2.9]",
                ),
            )],
            false,
            "waiting for verification",
        ),
        (
            vec![
                ("verify", verify(true, &target)),
                ("disabled", disabled.into()),
            ],
            false,
            "disabled by an administrator since 2026-11-18 11:06:40 UTC",
        ),
        (
            vec![
                ("verify", verify(true, &target)),
                ("tripped", tripped.into()),
            ],
            false,
            "bounce breaker tripped since 2026-11-18 11:06:40 UTC",
        ),
        (
            vec![
                ("verify", verify(true, &target)),
                ("tripped", "{{{ not yaml".into()),
            ],
            false,
            "state file unreadable",
        ),
    ];
    let mut milter = MilterProcess::start(&path, &port, &dir.path().join("stderr"));
    let addr = milter.addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut failures = Vec::new();
    for (files, want_routed, words) in &cases {
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        for (kind, text) in files {
            std::fs::write(state.join(format!("example.com.{kind}")), text).unwrap();
        }
        let (_, out) = dualroute(&path, &["explain", "zed@example.com"]);
        let explained_routed = out.contains("zed@example.com: redirect to ");
        let explained_paused = out.contains("zed@example.com: tempfail 451 4.4.4 ");
        if explained_routed != *want_routed
            || explained_routed == explained_paused
            || !out.contains(words)
        {
            failures.push(format!("{files:?}: explain printed {out}"));
            continue;
        }
        // The running milter follows state_dir within 2 s.
        if !rt.block_on(wait_until(addr, *want_routed)) {
            failures.push(format!(
                "{files:?}: explain says routed={want_routed}, the milter disagrees"
            ));
        }
    }
    milter.kill();
    assert!(
        failures.is_empty(),
        "{}\nmilter log:\n{}",
        failures.join("\n"),
        milter.log()
    );
}

#[test]
fn disable_and_enable_do_not_read_the_account_sources() {
    // During an incident the account file may be huge, half written or
    // unreadable: `disable`, `enable`, `status`, `verify` and `doctor`
    // need only milter.yaml and state_dir.
    let dir = tempfile::tempdir().unwrap();
    let accounts = dir.path().join("accounts");
    let path = dir.path().join("milter.yaml");
    // A name server nobody answers: no command here may ask it.
    let dns = Port::reserve();
    std::fs::write(
        &path,
        format!(
            "instance: state.test\nstate_dir: {}\ndns:\n  nameservers: [\"127.0.0.1:{}\"]\ndomains:\n  example.com:\n    mode: split\n    verify: postmaster@example.com\n    destination: {{ hosts: [\"[127.0.0.1]:1\"] }}\n    accounts: [{{ file: {} }}]\n",
            dir.path().join("state").display(),
            dns.number(),
            accounts.display()
        ),
    )
    .unwrap();
    // A path that exists but cannot be read as a file (unreadable even to
    // root, who runs these tests): `check` (which loads the accounts)
    // fails ...
    std::fs::create_dir(&accounts).unwrap();
    let (code, out) = dualroute(&path, &["check"]);
    assert!(
        !code.success(),
        "check with an unreadable account file: {out}"
    );
    // ... and the state commands still work.
    let (code, out) = dualroute(&path, &["disable", "example.com", "--reason", "incident"]);
    assert!(code.success(), "disable: {out}");
    assert!(out.contains("example.com: routing disabled"), "{out}");
    let (code, out) = dualroute(&path, &["status"]);
    assert!(
        out.contains("DISABLED by an administrator"),
        "{code:?}: {out}"
    );
    let (code, out) = dualroute(&path, &["enable", "example.com"]);
    assert!(code.success(), "enable: {out}");
    assert!(out.contains("admin disable cleared"), "{out}");
    let (code, out) = dualroute(&path, &["disable", "example.org", "--reason", "x"]);
    assert!(!code.success(), "an unmanaged domain: {out}");
    assert!(out.contains("example.org is not a managed domain"), "{out}");
    // `verify` and `doctor` get as far as the network: nothing accepts on
    // port 1, no name server answers.
    let (code, out) = dualroute(&path, &["verify", "example.com"]);
    assert!(
        out.contains("example.com: NOT verified"),
        "verify: {code:?}: {out}"
    );
    let (code, out) = dualroute(&path, &["doctor", "--ip", "127.0.0.1"]);
    assert!(
        out.contains("the name servers do not answer"),
        "doctor: {code:?}: {out}"
    );
}
