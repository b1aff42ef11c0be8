//! `dualroute run` as a process: it serves on the configured socket, reloads
//! on SIGHUP (keeping the running policy when the new file is invalid), and
//! shuts down cleanly on SIGTERM.

mod support;
use support::{dualroute_output, poll, MilterProcess, Port};

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
    let port = Port::reserve();
    let path = dir.path().join("milter.yaml");
    let good = |mode: &str| {
        format!("listen: inet:127.0.0.1:{port}\ninstance: cli.test\ndomains:\n  example.com:\n    mode: {mode}\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n")
    };
    std::fs::write(&path, good("route")).unwrap();
    let mut milter = MilterProcess::start(&path, &port, &dir.path().join("stderr"));
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
    // Its first line names the file it serves (docs/design.md §6).
    let log = milter.log();
    let first = log.lines().next().unwrap_or_default();
    assert!(
        first.contains(&format!("configuration {}", path.display())),
        "{log}"
    );
    assert!(
        TcpStream::connect(port.addr()).is_err(),
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
    let (port, other) = (Port::reserve(), Port::reserve());
    let path = dir.path().join("milter.yaml");
    let config = |port: u16| {
        format!("listen: inet:127.0.0.1:{port}\ninstance: cli.test\ndomains:\n  example.com:\n    mode: route\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n")
    };
    std::fs::write(&path, config(port.number())).unwrap();
    let milter = MilterProcess::start(&path, &port, &dir.path().join("stderr"));

    std::fs::write(&path, config(other.number())).unwrap();
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
    assert!(TcpStream::connect(port.addr()).is_ok(), "{log}");

    // Every further reload repeats it until a restart.
    milter.signal("HUP");
    wait_for(
        || milter.log().matches(&warning).count() == 2,
        "the warning on the second reload",
    );
}

/// `--config` defaults to /etc/dualroute/milter.yaml only, never to a file
/// in the current directory (docs/design.md §6): from a source checkout,
/// `postfix-config --apply` once read the example milter.yaml and wired
/// Postfix to the example's destination.
#[test]
fn the_default_configuration_is_never_the_current_directorys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("milter.yaml"),
        "instance: from-the-current-directory.test\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .arg("check")
        .current_dir(dir.path())
        .output()
        .expect("run dualroute");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("from-the-current-directory.test"),
        "./milter.yaml was read: {text}"
    );
    assert!(text.contains("/etc/dualroute/milter.yaml"), "{text}");
    if !std::path::Path::new("/etc/dualroute/milter.yaml").exists() {
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains(
                "/etc/dualroute/milter.yaml: cannot read: No such file or directory (os error 2); it is the default configuration file: give another with --config FILE"
            ),
            "{text}"
        );
    }
}

/// Runs `dualroute ARGS` with stdout and stderr into one file, so that
/// what comes first is seen; returns its exit status and that text.
fn merged(args: &[&str]) -> (std::process::ExitStatus, String) {
    let file = tempfile::NamedTempFile::new().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args(args)
        // One open file description (dup): one offset for both.
        .stdout(file.as_file().try_clone().unwrap())
        .stderr(file.as_file().try_clone().unwrap())
        .status()
        .expect("run dualroute");
    (status, std::fs::read_to_string(file.path()).unwrap())
}

/// Every command names the file it read, first: `enable`, `disable`,
/// `confirm-accounts` and `postfix-config --apply`/`--revert` before they
/// change anything (the
/// ones here fail at their first change, and still named it first).
/// postfix-config prints it on stderr: its stdout is pasted into main.cf.
#[test]
fn every_command_names_its_configuration_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.yaml");
    // state_dir under a regular file: every write to it fails.
    std::fs::write(dir.path().join("file"), "").unwrap();
    std::fs::write(
        &path,
        format!(
            "instance: cli.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: route\n    destination: {{ hosts: [\"[127.0.0.1]:1\"] }}\n    verify: postmaster@legacy.invalid\ndns: {{ nameservers: [\"127.0.0.1:1\"] }}\n",
            dir.path().join("file/state").display()
        ),
    )
    .unwrap();
    let config = path.to_str().unwrap();
    // doctor without domains: with them it waits for the DNS timeouts.
    let bare = dir.path().join("bare.yaml");
    std::fs::write(&bare, "instance: cli.test\n").unwrap();
    let postfix_dir = dir.path().join("postfix");
    std::fs::create_dir(&postfix_dir).unwrap();
    let postfix_dir = postfix_dir.to_str().unwrap();
    let bare = bare.to_str().unwrap();
    for (args, read) in [
        (&["check"][..], config),
        (&["explain", "alice@example.com"], config),
        (&["status"], config),
        (&["postfix-config"], config),
        (&["sendmail-config"], config),
        (&["verify", "example.com"], config),
        (&["doctor", "--ip", "192.0.2.25"], bare),
        (&["enable", "example.com"], config),
        (&["disable", "example.com"], config),
        (&["confirm-accounts", "example.com"], config),
        (
            &[
                "postfix-config",
                "--apply",
                "--postfix-config-dir",
                postfix_dir,
            ],
            config,
        ),
        (
            &[
                "postfix-config",
                "--revert",
                "--postfix-config-dir",
                postfix_dir,
            ],
            config,
        ),
    ] {
        let (_, text) = merged(&[args, &["--config", read]].concat());
        assert!(
            text.starts_with(&format!("dualroute: configuration {read}\n")),
            "{args:?} does not name {read} first:\n{text}"
        );
    }
    // postfix-config's stdout stays what goes into main.cf.
    let out = support::dualroute_output(&path, &["postfix-config"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(config),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
