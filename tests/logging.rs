//! What the running milter writes to stderr, as journald and log files
//! get it: no colour codes unless stderr is a terminal, no timestamp of its
//! own under journald (JOURNAL_STREAM), and one line when it picks up
//! `dualroute disable`/`enable` run by the administrator.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use support::{dualroute, MilterProcess, UnixTree};

fn setup() -> UnixTree {
    UnixTree::new("dualroute-logging-")
}

fn first_line_with(log: &Path, what: &str) -> String {
    let raw = fs::read_to_string(log).expect("log");
    raw.lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no line with {what:?} in:\n{raw}"))
        .to_owned()
}

#[test]
fn logs_have_no_colour_in_a_file_and_no_timestamp_under_journald() {
    let s = setup();
    // Colour: the harness sets NO_COLOR; this one must be plain without it.
    let log = s.dir.join("plain.log");
    let mut milter = MilterProcess::start_unix(&s.config, &s.socket, &log, &[("NO_COLOR", "")]);
    milter.signal("TERM");
    milter.wait_exit();
    let raw = fs::read_to_string(&log).expect("log");
    assert!(!raw.contains('\u{1b}'), "ANSI codes in a log file:\n{raw}");
    let listening = first_line_with(&log, "listening on");
    assert!(
        listening.starts_with("20"),
        "outside journald a line starts with its timestamp: {listening}"
    );

    // journald: JOURNAL_STREAM names the device and inode of stderr.
    let log = s.dir.join("journal.log");
    fs::write(&log, "").expect("create");
    let meta = fs::metadata(&log).expect("stat");
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut milter =
        MilterProcess::start_unix(&s.config, &s.socket, &log, &[("JOURNAL_STREAM", &stream)]);
    milter.signal("TERM");
    milter.wait_exit();
    let listening = first_line_with(&log, "listening on");
    assert!(
        listening.trim_start().starts_with("INFO"),
        "under journald no timestamp of our own: {listening}"
    );
}

#[test]
fn one_line_when_the_running_milter_picks_up_disable_and_enable() {
    let s = setup();
    let mut milter = MilterProcess::start_unix(&s.config, &s.socket, &s.dir.join("m.log"), &[]);
    let (status, out) = dualroute(
        &s.config,
        &["disable", "example.com", "--reason", "cut-over paused"],
    );
    assert!(status.success(), "{out}");
    let off = support::poll(|| {
        let log = milter.log();
        log.lines()
            .find(|l| l.contains("example.com: routing is off"))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no line for the disable:\n{}", milter.log()));
    assert!(off.contains("cut-over paused"), "{off}");
    let (status, out) = dualroute(&s.config, &["enable", "example.com"]);
    assert!(status.success(), "{out}");
    support::poll(|| {
        milter
            .log()
            .contains("example.com: routing is on again")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no line for the enable:\n{}", milter.log()));
    assert_eq!(
        milter.log().matches("routing is off").count(),
        1,
        "one line per change:\n{}",
        milter.log()
    );
    milter.signal("TERM");
    milter.wait_exit();
}

/// Datagrams a private "syslog daemon" on `socket` receives until one
/// contains `what` (or 20 s pass).
fn datagrams_until(socket: &std::os::unix::net::UnixDatagram, what: &str) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut buf = vec![0u8; 65536];
    while std::time::Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let d = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = d.contains(what);
                got.push(d);
                if done {
                    return got;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading the syslog socket: {e}"),
        }
    }
    panic!("no syslog line with {what:?} in 20 s; received: {got:#?}");
}

#[test]
fn log_syslog_sends_the_lines_to_the_syslog_socket_with_facility_mail() {
    let s = setup();
    let path = s.dir.join("log.sock");
    let syslog = std::os::unix::net::UnixDatagram::bind(&path).expect("bind the syslog socket");
    syslog
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .expect("timeout");
    for (facility, code) in [(None, 2), (Some("local3"), 19)] {
        let stderr = s.dir.join("stderr.log");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dualroute"));
        cmd.arg("run")
            .arg("--config")
            .arg(&s.config)
            .arg("--log")
            .arg("syslog")
            .arg("--syslog-socket")
            .arg(&path)
            .stderr(fs::File::create(&stderr).expect("stderr file"));
        if let Some(f) = facility {
            cmd.arg("--syslog-facility").arg(f);
        }
        let mut child = cmd.spawn().expect("start dualroute run");
        let lines = datagrams_until(&syslog, "listening on");
        let line = lines.last().expect("a line");
        // <PRI> = facility * 8 + severity (info = 6), RFC 3164.
        let pri = format!("<{}>", code * 8 + 6);
        assert!(line.starts_with(&pri), "want {pri} first: {line}");
        let tag = format!("dualroute[{}]: ", child.id());
        assert!(line.contains(&tag), "want the tag {tag:?}: {line}");
        assert!(
            line.contains("INFO") && !line.contains("\u{1b}"),
            "the line as the journal gets it: {line}"
        );
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let status = child.wait().expect("wait");
        assert!(status.success(), "exit: {status}");
        let err = fs::read_to_string(&stderr).expect("stderr");
        assert!(
            !err.contains("listening on"),
            "the lines went to syslog, not stderr:\n{err}"
        );
    }
}

#[test]
fn log_syslog_without_a_daemon_writes_to_stderr_and_says_so() {
    let s = setup();
    let log = s.dir.join("m.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .arg("run")
        .arg("--config")
        .arg(&s.config)
        .args(["--log", "syslog", "--syslog-socket"])
        .arg(s.dir.join("nobody-listens.sock"))
        .stderr(fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start dualroute run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening on")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no `listening on` on stderr:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    child.wait().expect("wait");
    let err = fs::read_to_string(&log).expect("log");
    assert!(
        err.contains("cannot log to syslog at") && err.contains("logging to stderr"),
        "one warning that says where the lines go:\n{err}"
    );
    assert_eq!(err.matches("cannot log to syslog").count(), 1, "{err}");
}
