//! `dualroute status` shows what the running milter runs, not only the
//! files (issue 25; src/running.rs, src/status.rs): after an edit the
//! SIGHUP missed, after a reload the milter refused, after the milter was
//! killed; with exit codes 0/1/2 and `--json` for monitoring.
//!
//! Before issue 25, after `shadow: true` → `shadow: false` without a
//! reload, `status` said "example.com: mode route: active" (from the file)
//! while the milter went on changing nothing, and exited 0 whether or not
//! a milter ran.

mod support;
use support::{dualroute, MilterProcess, Port};

use std::path::{Path, PathBuf};

fn write_config(dir: &Path, port: u16, shadow: bool) -> PathBuf {
    let path = dir.join("milter.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: inet:127.0.0.1:{port}\ninstance: live.test\nstate_dir: {}\nshadow: {shadow}\ndomains:\n  example.com:\n    mode: route\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

/// A route domain and a breaker following `DIR/mail.log`, with `extra`
/// lines first.
fn breaker_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("milter.yaml");
    std::fs::write(
        &path,
        format!(
            "{extra}state_dir: {}\nbreaker:\n  maillog: {}\ndomains:\n  example.com:\n    mode: route\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n",
            dir.join("state").display(),
            dir.join("mail.log").display()
        ),
    )
    .unwrap();
    path
}

fn json(config: &Path) -> serde_json::Value {
    let out = support::dualroute_output(config, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(
        out.status.code().map(i64::from),
        v["exit"].as_i64(),
        "the exit code is the report's: {v}"
    );
    v
}

/// Polls `status` until `want` holds of its (exit code, output).
fn status_until(config: &Path, what: &str, want: impl Fn(i32, &str) -> bool) -> String {
    let mut last = String::new();
    support::poll(|| {
        let (code, out) = dualroute(config, &["status"]);
        let ok = want(code.code().unwrap_or(-1), &out);
        last = format!("exit {code}: {out}");
        ok.then_some(())
    })
    .unwrap_or_else(|| panic!("status never showed {what}; last:\n{last}"));
    last
}

#[test]
fn status_shows_what_runs_after_an_unloaded_edit_a_refused_reload_and_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let port = Port::reserve();
    let config = write_config(dir.path(), port.number(), true);
    let mut milter = MilterProcess::start(&config, &port, &dir.path().join("stderr"));

    // Running as configured: exit 0, shadow shown.
    let out = status_until(&config, "the running milter", |code, out| {
        code == 0 && out.contains("milter: running, pid ")
    });
    assert!(
        out.contains("example.com: mode route: SHADOW (decisions are logged and counted, nothing is changed) active"),
        "{out}"
    );
    let v = json(&config);
    assert_eq!(v["milter"]["state"], "running", "{v}");
    assert_eq!(
        v["milter"]["pid"].as_u64(),
        Some(u64::from(milter.pid())),
        "{v}"
    );
    assert_eq!(v["domains"][0]["shadow"], true, "{v}");
    assert_eq!(v["domains"][0]["routing"], true, "{v}");

    // The edit the SIGHUP missed: the milter still runs shadow mode, and
    // status says so, and that the file differs (exit 1).
    write_config(dir.path(), port.number(), false);
    let (code, out) = dualroute(&config, &["status"]);
    assert_eq!(code.code(), Some(1), "{out}");
    assert!(
        out.contains("milter.yaml changed since the running milter loaded it"),
        "{out}"
    );
    assert!(
        out.contains(&format!("kill -HUP {}", milter.pid())),
        "{out}"
    );
    assert!(
        out.contains("example.com: mode route: SHADOW (decisions"),
        "what runs is shown, not the file: {out}"
    );
    assert!(
        out.contains(
            "  NOT LOADED: shadow: milter.yaml says false, the running milter has true: reload"
        ),
        "{out}"
    );
    let v = json(&config);
    assert_eq!(v["milter"]["config_changed"], true, "{v}");
    assert_eq!(v["domains"][0]["shadow"], true, "{v}");

    // Reloaded: what runs is the file again (exit 0).
    milter.signal("HUP");
    let out = status_until(&config, "the reloaded configuration", |code, out| {
        code == 0 && out.contains("example.com: mode route: active")
    });
    assert!(
        !out.contains("SHADOW") && !out.contains("changed since"),
        "{out}"
    );

    // A reload the milter refuses (the file no longer loads): status still
    // shows the running milter, the error with its line, and exit 1.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("mode: route", "mode: rout"),
    )
    .unwrap();
    milter.signal("HUP");
    let out = status_until(&config, "the refused reload", |code, out| {
        code == 1 && out.contains("RELOAD REFUSED since")
    });
    assert!(out.contains("milter: running, pid "), "{out}");
    assert!(
        out.contains("milter.yaml:"),
        "the file and line of the error: {out}"
    );
    assert!(out.contains("does not load"), "{out}");

    // Killed: its record stays behind, its process is gone: exit 2.
    milter.kill();
    let (code, out) = dualroute(&config, &["status"]);
    assert_eq!(code.code(), Some(2), "{out}");
    assert!(
        out.contains("milter: NOT RUNNING: the last milter (pid "),
        "{out}"
    );
}

#[test]
fn a_stopped_milter_removes_its_record_and_status_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let port = Port::reserve();
    let config = write_config(dir.path(), port.number(), false);
    let (code, out) = dualroute(&config, &["status"]);
    assert_eq!(code.code(), Some(2), "no milter has run: {out}");
    assert!(
        out.contains("milter: NOT RUNNING: no running milter has published"),
        "{out}"
    );
    assert!(out.contains("status: CRITICAL (exit 2)"), "{out}");

    let mut milter = MilterProcess::start(&config, &port, &dir.path().join("stderr"));
    status_until(&config, "the running milter", |code, _| code == 0);
    assert!(dir.path().join("state/running").exists());
    // SIGTERM: a clean stop removes the record.
    milter.signal("TERM");
    milter.wait_exit();
    support::poll(|| (!dir.path().join("state/running").exists()).then_some(()))
        .expect("the record is removed at a clean stop");
    let (code, out) = dualroute(&config, &["status"]);
    assert_eq!(code.code(), Some(2), "{out}");
    assert!(out.contains("no running milter has published"), "{out}");
}

/// A breaker that cannot read its source is a safety net that is not
/// there: ✘ and exit 2, whatever the domains say.
#[test]
fn a_blind_breaker_is_a_cross_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = breaker_config(dir.path(), "");
    support::pretend_running(&path);
    let mut counts = dualroute::state::BreakerCounts {
        at: 1_796_000_000,
        window_secs: 3600,
        ..Default::default()
    };
    counts.source = Some(dualroute::state::BreakerSource {
        name: "/var/log/mail.log".into(),
        readable: true,
        error: String::new(),
        since: 1_796_000_000,
    });
    let dir_ = dualroute::state::StateDir::new(&state);
    dir_.write_breaker_counts(&counts).unwrap();
    let (code, out) = dualroute(&path, &["status"]);
    assert_eq!(code.code(), Some(0), "{out}");
    assert!(out.contains("breaker: ✔ reads /var/log/mail.log"), "{out}");

    counts.source = Some(dualroute::state::BreakerSource {
        name: "/var/log/mail.log".into(),
        readable: false,
        error: "Permission denied (os error 13)".into(),
        since: 1_796_000_000,
    });
    dir_.write_breaker_counts(&counts).unwrap();
    let (code, out) = dualroute(&path, &["status"]);
    assert_eq!(code.code(), Some(2), "{out}");
    assert!(
        out.contains("breaker: ✘ BLIND: cannot read /var/log/mail.log since ")
            && out.contains("Permission denied"),
        "{out}"
    );
    let v = json(&path);
    assert_eq!(v["breaker"]["readable"], false, "{v}");
    assert!(
        v["problems"].as_array().is_some_and(|p| p
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.contains("BLIND")))),
        "{v}"
    );
}

/// The same from a real milter whose breaker cannot read its log (the
/// file is not there, as /var/log/mail.log on a Debian 12 without
/// rsyslog): ✘, exit 2; once the file appears, ✔ and exit 0.
#[test]
fn a_running_milter_with_an_unreadable_maillog_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let port = Port::reserve();
    let maillog = dir.path().join("mail.log");
    let path = breaker_config(
        dir.path(),
        &format!(
            "listen: inet:127.0.0.1:{}\ninstance: live.test\n",
            port.number()
        ),
    );
    let mut milter = MilterProcess::start(&path, &port, &dir.path().join("stderr"));
    let out = status_until(&path, "the blind breaker", |code, out| {
        code == 2 && out.contains("breaker: ✘ BLIND: cannot read ")
    });
    assert!(out.contains("milter: running, pid "), "{out}");
    assert!(out.contains(&maillog.display().to_string()), "{out}");
    std::fs::write(&maillog, "").unwrap();
    let out = status_until(&path, "the breaker reading", |code, out| {
        code == 0 && out.contains("breaker: ✔ reads ")
    });
    assert!(!out.contains("BLIND"), "{out}");
    milter.kill();
}
