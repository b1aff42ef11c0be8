//! `dualroute run` as a process: it serves on the configured socket, reloads
//! on SIGHUP (keeping the running policy when the new file is invalid), and
//! shuts down cleanly on SIGTERM.

mod support;
use support::free_port;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};


fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill -{sig} {pid}");
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let log = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(|| TcpStream::connect(("127.0.0.1", port)).is_ok(), "the milter to listen");
    assert!(read_log().contains(&format!("listening on inet:127.0.0.1:{port}")), "{}", read_log());

    // An invalid file: reload refused, old policy kept, error logged.
    std::fs::write(&path, good("route").replace("mode: route", "mode: sideways")).unwrap();
    signal(child.id(), "HUP");
    wait_for(|| read_log().contains("reload failed"), "the reload error");
    assert!(read_log().contains("keeping the running configuration"), "{}", read_log());
    assert!(read_log().contains("unknown variant `sideways`"), "{}", read_log());
    assert!(child.try_wait().unwrap().is_none(), "the milter must survive a bad reload");

    std::fs::write(&path, good("dual")).unwrap();
    signal(child.id(), "HUP");
    wait_for(|| read_log().contains("SIGHUP: reloaded"), "the reload");

    signal(child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}: {}", read_log());
    assert!(read_log().contains("SIGTERM: shutting down"));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "still listening after exit");
}

#[test]
fn refuses_to_start_on_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.yaml");
    std::fs::write(&path, "domains:\n  example.com:\n    mode: split\n    destination: { hosts: [\"[192.0.2.1]\"] }\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dualroute")).args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("milter.yaml:3:5: domains.example.com: mode `split` needs `accounts`"));
}
