//! `dualroute run` as a process: it serves on the configured socket, reloads
//! on SIGHUP (keeping the running policy when the new file is invalid), and
//! shuts down cleanly on SIGTERM.

mod support;
use support::{dualroute_output, free_port, poll, MilterProcess};

use std::net::TcpStream;

fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    assert!(
        poll(|| f().then_some(())).is_some(),
        "timed out waiting for {what}"
    );
}

#[test]
fn serves_reloads_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("milter.yaml");
    let good = |mode: &str| {
        format!("listen: inet:127.0.0.1:{port}\ninstance: cli.test\ndomains:\n  example.com:\n    mode: {mode}\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n")
    };
    std::fs::write(&path, good("route")).unwrap();
    let mut milter = MilterProcess::start(&path, port, &dir.path().join("stderr"));
    assert!(
        milter
            .log()
            .contains(&format!("listening on inet:127.0.0.1:{port}")),
        "{}",
        milter.log()
    );

    // An invalid file: reload refused, old policy kept, error logged.
    std::fs::write(
        &path,
        good("route").replace("mode: route", "mode: sideways"),
    )
    .unwrap();
    milter.signal("HUP");
    wait_for(
        || milter.log().contains("reload failed"),
        "the reload error",
    );
    assert!(
        milter.log().contains("keeping the running configuration"),
        "{}",
        milter.log()
    );
    assert!(
        milter.log().contains("unknown variant `sideways`"),
        "{}",
        milter.log()
    );
    assert!(milter.is_running(), "the milter must survive a bad reload");

    std::fs::write(&path, good("dual")).unwrap();
    milter.signal("HUP");
    wait_for(|| milter.log().contains("SIGHUP: reloaded"), "the reload");

    milter.signal("TERM");
    let status = milter.wait_exit();
    assert!(status.success(), "exit status {status:?}: {}", milter.log());
    assert!(milter.log().contains("SIGTERM: shutting down"));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening after exit"
    );
}

#[test]
fn refuses_to_start_on_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.yaml");
    std::fs::write(&path, "domains:\n  example.com:\n    mode: split\n    destination: { hosts: [\"[192.0.2.1]\"] }\n").unwrap();
    let out = dualroute_output(&path, &["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("milter.yaml:3:5: domains.example.com: mode `split` needs `accounts`"));
}

#[test]
fn reload_that_changes_listen_warns_that_it_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (port, other) = (free_port(), free_port());
    let path = dir.path().join("milter.yaml");
    let config = |port: u16| {
        format!("listen: inet:127.0.0.1:{port}\ninstance: cli.test\ndomains:\n  example.com:\n    mode: route\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n")
    };
    std::fs::write(&path, config(port)).unwrap();
    let milter = MilterProcess::start(&path, port, &dir.path().join("stderr"));

    std::fs::write(&path, config(other)).unwrap();
    milter.signal("HUP");
    wait_for(|| milter.log().contains("SIGHUP: reloaded"), "the reload");
    let warning = format!("listen changed from inet:127.0.0.1:{port} to inet:127.0.0.1:{other}: a reload does not move the socket; restart dualroute");
    let log = milter.log();
    let line = log.lines().find(|l| l.contains(&warning));
    assert!(
        line.is_some_and(|l| l.contains("WARN")),
        "a WARN {warning:?} expected:\n{log}"
    );
    // Still served where it was.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok(), "{log}");

    // Every further reload repeats it until a restart.
    milter.signal("HUP");
    wait_for(
        || milter.log().matches(&warning).count() == 2,
        "the warning on the second reload",
    );
}
