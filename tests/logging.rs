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
