//! The policy and the holds change through one path (issue 21 §6,
//! docs/design.md "Reload"). Each test makes one race of the old code
//! deterministic — a FIFO as a state file stalls the reader that opens it,
//! a FIFO as an account command's input stalls the command — and checks
//! that no message is routed for a held domain and that no older
//! configuration replaces a newer one.

mod support;
use support::protocol::Milter;

use dualroute::state::StateDir;
use dualroute::{Intervals, Start};
use indymilter_test::Status;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));

/// A split domain whose only mailbox is alice; everything else is routed.
fn domain(name: &str, extra: &str) -> String {
    format!(
        "  {name}:\n    mode: split\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n    accounts: [{{ list: [alice@{name}] }}]\n{extra}"
    )
}

fn config(state: &Path, domains: &[String]) -> String {
    format!(
        "instance: races.test\nstate_dir: {}\ndomains:\n{}",
        state.display(),
        domains.concat()
    )
}

fn mkfifo(path: &Path) {
    let made = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo (coreutils)");
    assert!(made.success(), "mkfifo {}", path.display());
}

/// The writing end of a FIFO a reader in the milter has opened: while it
/// is held the reader's read waits; [`Gate::release`] ends it.
struct Gate(fs::File);

impl Gate {
    /// Waits until a reader has opened `fifo` (a non-blocking open for
    /// writing fails with ENXIO until one has) and holds it there.
    async fn wait(what: &str, fifo: &Path) -> Gate {
        use std::os::unix::fs::OpenOptionsExt;
        let start = Instant::now();
        loop {
            let opened = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(fifo);
            if let Ok(f) = opened {
                return Gate(f);
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: no reader opened {}",
                fifo.display()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Gives the reader `content` and the end of the file.
    fn release(mut self, content: &str) {
        use std::io::Write;
        self.0
            .write_all(content.as_bytes())
            .expect("write the FIFO");
    }
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("{what}: not within {limit:?}");
    false
}

fn intervals(state: Duration) -> Intervals {
    Intervals {
        state,
        accounts: Duration::from_millis(50),
        verify: Duration::from_secs(3600),
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    path: PathBuf,
    state: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    fs::create_dir_all(&state).expect("state dir");
    Setup {
        path: dir.path().join("milter.yaml"),
        state,
        _dir: dir,
    }
}

/// Successful reloads so far, as the metrics endpoint serves them.
fn reloads_ok(milter: &Milter) -> u64 {
    let text = milter.metrics();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("dualroute_reloads_total{result=\"ok\"} ")
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What the milter answers to RCPT `<rcpt>` in a message whose MAIL it has
/// already seen.
async fn rcpt_reply(session: &mut support::protocol::Session, rcpt: &str) -> String {
    match session.rcpt(&[rcpt]).await {
        Status::Continue => "continue".to_owned(),
        Status::Reject { message: Some(m) } | Status::Tempfail { message: Some(m) } => {
            m.to_string_lossy().into_owned()
        }
        other => format!("{other:?}"),
    }
}

/// Mechanism 1: a reload removes a domain held by `dualroute disable`
/// while a message that began before it (and keeps the old policy, which
/// manages the domain) is in flight. The old install kept the removed
/// domain's hold, then re-read the holds for the new configuration alone
/// and dropped it: the message's later recipient was routed.
#[tokio::test]
async fn a_reload_that_removes_a_held_domain_does_not_route_mail_in_flight() {
    let s = setup();
    StateDir::new(&s.state)
        .disable("held.test", "migration paused")
        .expect("disable held.test");
    let v1 = config(
        &s.state,
        &[domain("held.test", ""), domain("other.test", "")],
    );
    fs::write(&s.path, v1).expect("write v1");
    let start = Start {
        config_path: s.path.clone(),
        policy: dualroute::load_policy(&s.path).expect("v1 loads"),
        intervals: intervals(Duration::from_secs(3600)),
    };
    let milter = Milter::serve(start).await;
    let mut session = milter.session(CLIENT).await;
    session.mail(None).await;
    assert!(
        rcpt_reply(&mut session, "<zed@held.test>")
            .await
            .starts_with("451 4.4.4"),
        "before the reload, held.test is held"
    );
    fs::write(&s.path, config(&s.state, &[domain("other.test", "")])).expect("write v2");
    milter.sighup().await;
    assert!(
        wait_for("the reload", Duration::from_secs(10), || {
            !milter.policy().domains.contains_key("held.test")
        })
        .await,
        "the reload removing held.test did not happen"
    );
    let reply = rcpt_reply(&mut session, "<zed2@held.test>").await;
    assert!(
        reply.starts_with("451 4.4.4"),
        "a message that began when held.test was managed and held must not route it after a reload removed it; got {reply}"
    );
    session.close().await;
    milter.shutdown().await;
}

/// Mechanism 2: the state follower read the policy, then the state files
/// (stalled here on a FIFO), then installed what it read — after a reload
/// had installed a configuration that adds a disabled domain. The added
/// domain lost its hold until the follower's next look.
#[tokio::test]
async fn the_state_follower_cannot_drop_the_hold_of_a_domain_a_reload_adds() {
    let s = setup();
    StateDir::new(&s.state)
        .disable("added.test", "not yet")
        .expect("disable added.test");
    fs::write(&s.path, config(&s.state, &[domain("old.test", "")])).expect("write v1");
    // The follower looks every second: its stale install is not repaired
    // by a next look before the RCPT below.
    let start = Start {
        config_path: s.path.clone(),
        policy: dualroute::load_policy(&s.path).expect("v1 loads"),
        intervals: intervals(Duration::from_secs(1)),
    };
    let milter = Milter::serve(start).await;
    let fifo = s.state.join("old.test.disabled");
    mkfifo(&fifo);
    // The follower's next look opens the FIFO and stalls, having read the
    // policy (v1) it reads the holds for.
    let gate = Gate::wait("the state follower reads old.test's state", &fifo).await;
    let v2 = config(&s.state, &[domain("added.test", "")]);
    fs::write(&s.path, v2).expect("write v2");
    milter.sighup().await;
    // The old code installs v2 at once; with one writer the reload waits
    // for the follower. Either way, go on after a while.
    let installed_early = wait_for(
        "v2 in force before the follower ends",
        Duration::from_secs(2),
        || milter.policy().domains.contains_key("added.test"),
    )
    .await;
    let before = milter.holds();
    gate.release("");
    let _ = fs::remove_file(&fifo);
    assert!(
        wait_for("v2 in force", Duration::from_secs(10), || {
            milter.policy().domains.contains_key("added.test")
        })
        .await,
        "the reload adding added.test never happened"
    );
    // The follower's stalled look has installed what it read.
    assert!(
        wait_for("the follower's install", Duration::from_secs(10), || {
            !Arc::ptr_eq(&milter.holds(), &before)
        })
        .await,
        "the follower never finished its look"
    );
    let mut session = milter.session(CLIENT).await;
    session.mail(None).await;
    let reply = rcpt_reply(&mut session, "<zed@added.test>").await;
    assert!(
        reply.starts_with("451 4.4.4"),
        "added.test is disabled: its unknown recipient must be tempfailed, not routed (v2 installed before the follower ended: {installed_early}); got {reply}"
    );
    session.close().await;
    milter.shutdown().await;
}

/// Mechanism 3: the account-command refresh (stalled on a FIFO) started
/// on v1; a SIGHUP installed v2 (`enabled: false`); the refresh then
/// installed the v1 it had read, and zed@ was routed again.
#[tokio::test]
async fn a_slow_account_refresh_cannot_reinstall_an_older_configuration() {
    let s = setup();
    let input = s.state.join("../accounts.fifo");
    // The first load (at start) reads a plain file; the refresh after it
    // reads the FIFO and stalls.
    let accounts = s.state.join("../accounts.txt");
    fs::write(&accounts, "alice@example.com\n").expect("accounts");
    let command = |file: &Path| {
        format!(
            "    accounts: [{{ command: [/bin/cat, {}], refresh: 1s }}]\n",
            file.display()
        )
    };
    let v1 = format!(
        "instance: races.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: split\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n{}",
        s.state.display(),
        command(&accounts)
    );
    fs::write(&s.path, &v1).expect("write v1");
    let start = Start {
        config_path: s.path.clone(),
        policy: dualroute::load_policy(&s.path).expect("v1 loads"),
        intervals: intervals(Duration::from_secs(3600)),
    };
    mkfifo(&input);
    fs::remove_file(&accounts).expect("remove the plain accounts file");
    std::os::unix::fs::symlink(&input, &accounts).expect("accounts file -> FIFO");
    let milter = Milter::serve(start).await;
    let gate = Gate::wait("the account command refresh", &input).await;
    // v2: routing off for the domain, accounts from a list (no command).
    let v2 = format!(
        "instance: races.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: split\n    enabled: false\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n    accounts: [{{ list: [alice@example.com] }}]\n",
        s.state.display()
    );
    fs::write(&s.path, &v2).expect("write v2");
    let ok_before = reloads_ok(&milter);
    milter.sighup().await;
    let installed_early = wait_for(
        "v2 in force before the refresh ends",
        Duration::from_secs(2),
        || !milter.policy().domains["example.com"].config.enabled,
    )
    .await;
    gate.release("alice@example.com\n");
    // Both reloads have run once two more have succeeded than before the
    // SIGHUP: the one that ends last decides what is in force. (The old
    // code installed v2 first, then the refresh's v1, and kept v1 until
    // the next refresh.)
    assert!(
        wait_for("both reloads", Duration::from_secs(10), || {
            reloads_ok(&milter) >= ok_before + 2
        })
        .await,
        "the two reloads did not both succeed"
    );
    assert!(
        !milter.policy().domains["example.com"].config.enabled,
        "an older configuration (v1, enabled) replaced the newer one (v2, enabled: false) after the SIGHUP (v2 installed before the refresh ended: {installed_early})"
    );
    let mut session = milter.session(CLIENT).await;
    session.mail(None).await;
    let reply = rcpt_reply(&mut session, "<zed@example.com>").await;
    assert!(
        reply.starts_with("451 4.4.4"),
        "zed@ with routing off: got {reply}"
    );
    session.close().await;
    milter.shutdown().await;
}
