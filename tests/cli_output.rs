//! What the command-line tools print, as a user or a monitoring script
//! sees it (issue 25, "smaller things").

mod support;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

/// A configuration with `n` route domains, so that `status` prints more
/// than a pipe holds (64 KiB on Linux).
fn many_domains(dir: &Path, n: usize) -> std::path::PathBuf {
    let mut yaml = format!("state_dir: {}\ndomains:\n", dir.join("state").display());
    for i in 0..n {
        yaml.push_str(&format!(
            "  d{i}.example:\n    mode: route\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n"
        ));
    }
    let path = dir.join("milter.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn a_closed_stdout_ends_quietly() {
    // `dualroute status | head -1`: the reader goes away after one line.
    // It panicked with "failed printing to stdout: Broken pipe" (issue 25).
    let dir = tempfile::tempdir().unwrap();
    let path = many_domains(dir.path(), 2000);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args(["--config", path.to_str().unwrap(), "status"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("milter: NOT RUNNING"), "{first}");
    // The reader is dropped here: what status prints next meets a closed pipe.
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    // Ended as `yes | head -1` ends `yes`: by SIGPIPE, which a shell
    // pipeline does not report.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?} {stderr}");
}

/// `status` for monitoring: it exited 0 with a domain TRIPPED or
/// DISABLED, and after a trip printed "TRIPPED … 3 permanent failures"
/// then "breaker: 0 permanent failures" (the breaker counts again from
/// the trip), issue 25.
#[test]
fn status_exits_1_when_a_domain_is_held_and_says_the_counts_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let path = dir.path().join("milter.yaml");
    std::fs::write(
        &path,
        format!(
            "state_dir: {}\nbreaker:\n  maillog: {}\n  threshold: 3\ndomains:\n  example.com:\n    mode: route\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n  example.org:\n    mode: route\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n",
            state.display(),
            dir.path().join("mail.log").display()
        ),
    )
    .unwrap();
    let status = |want: i32| {
        let out = Command::new(env!("CARGO_BIN_EXE_dualroute"))
            .args(["--config", path.to_str().unwrap(), "status"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(want), "{text}");
        text
    };
    // A milter runs (its record under this test's pid, src/running.rs):
    // the exit code is about the domains.
    support::pretend_running(&path);
    let out = status(0);
    assert!(out.contains("example.com: mode route: active"), "{out}");

    std::fs::write(
        state.join("example.com.tripped"),
        "since: 1795000000\nbounces: 3\nwindow_secs: 3600\nlast: 550 5.1.1 no such user\n",
    )
    .unwrap();
    let out = status(1);
    assert!(
        out.contains("example.com: mode route: TRIPPED by the bounce breaker"),
        "{out}"
    );
    assert!(out.contains("3 permanent failures within 3600s"), "{out}");
    assert!(
        out.contains("  breaker: counting again since the trip: 0 permanent failures (trips at 3)"),
        "{out}"
    );
    // The domain that is not held keeps the plain count.
    assert!(
        out.contains("  breaker: 0 permanent failures (trips at 3)"),
        "{out}"
    );

    std::fs::remove_file(state.join("example.com.tripped")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args([
            "--config",
            path.to_str().unwrap(),
            "disable",
            "example.org",
            "--reason",
            "test",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = status(1);
    assert!(
        out.contains("example.org: mode route: DISABLED by an administrator"),
        "{out}"
    );
}
