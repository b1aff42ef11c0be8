//! Reading the mail facility of the systemd journal (`breaker.maillog:
//! journal`, docs/design.md §7 "The breaker's source"): Debian 12 without
//! rsyslog has no /var/log/mail.log, the journal is the only log.
//!
//! `journalctl --follow --output=json SYSLOG_FACILITY=2` runs as a child
//! (killed with the milter, restarted with a backoff when it exits). The
//! mail facility (2, LOG_MAIL) is what Postfix (`syslog_facility = mail`,
//! its default) and Sendmail (LOG_MAIL, fixed) log with, whatever
//! `syslog_name` says, so no identifier list is needed. Each entry becomes
//! the syslog line rsyslog would have written (`identifier[pid]:
//! MESSAGE`, after an RFC 3339 time stamp) and goes to the same parser as
//! a log file's lines ([`super::parse_line`]), so attribution is shared.
//!
//! It resumes where it stopped: the last entry's `__CURSOR` is kept in
//! `state_dir` (`breaker-journal-cursor`) and given back as
//! `--after-cursor`, so a restart neither counts an entry twice nor misses
//! what was logged while the milter was down. The first start begins at
//! the end (`--since` the breaker's start), as a log file is followed from its end. Entries
//! older than the breaker's window are not counted (they would already
//! have left it).
//!
//! Whether it can read ([`Journal::health`]) is decided by opening the
//! journal files, as the service user, not by journalctl's exit code: a
//! user without the `systemd-journal` (or `adm`) group gets only the
//! entries of its own processes, and journalctl merely prints a hint on
//! stderr and goes on. Not the hint either: under the unit's
//! `PrivateUsers=yes` the group is present for the kernel but shows as
//! `nogroup` to getgroups(2), so journalctl prints the hint while every
//! file opens (systemd issue 41994). The hint is logged; the files decide.

use crate::state::StateDir;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The state file with the last entry read.
pub const CURSOR_FILE: &str = "breaker-journal-cursor";
/// The journalctl program; `PATH` is searched.
const JOURNALCTL: &str = "journalctl";
/// Where journald keeps the journal (persistent, then volatile).
pub const SYSTEM_DIRS: [&str; 2] = ["/var/log/journal", "/run/log/journal"];
/// A JSON line longer than this is not an entry we can use (journald caps
/// a syslog message at 48 KiB, `LineMax`): it is skipped, not buffered.
const MAX_LINE: usize = 1 << 20;
/// Entries handed over per poll at most, so that a backlog after a long
/// stop is worked through a piece at a time.
const MAX_ENTRIES: usize = 20_000;
/// The restart backoff after journalctl exits: from this ...
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// ... doubling to this.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A restarted journalctl that has run this long is taken to work.
const PROVEN: Duration = Duration::from_secs(5);
/// The journal files are looked at this often for readability.
const CHECK_EVERY: Duration = Duration::from_secs(10);

/// What the reader threads hand over.
enum Msg {
    Entry(Vec<u8>),
    Stderr(String),
}

/// The running journalctl and what it writes.
struct Running {
    child: Child,
    rx: Receiver<Msg>,
    started: Instant,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The milter stops, or the source is replaced by a reload: the
        // child must not outlive it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One journal entry as a syslog line, and how old it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub line: String,
    pub age: Duration,
}

/// Follows the journal's mail facility (see the module documentation).
pub struct Journal {
    directory: Option<PathBuf>,
    state: StateDir,
    window: Duration,
    /// When the breaker started (Unix seconds): where a first start reads
    /// from.
    began: u64,
    cursor: Option<String>,
    saved: Option<String>,
    running: Option<Running>,
    restart_at: Instant,
    backoff: Duration,
    /// Why journalctl is not running (it exited), if so.
    exited: Option<String>,
    /// The files' readability, looked at every [`CHECK_EVERY`].
    files: Result<(), String>,
    checked: Option<Instant>,
}

impl Journal {
    /// Follows the journal (`directory`: `journalctl -D`; otherwise the
    /// system journal), resuming from the cursor kept in `state_dir`.
    pub fn new(directory: Option<PathBuf>, state_dir: &Path, window: Duration) -> Journal {
        let state = StateDir::new(state_dir);
        let path = state.dir.join(CURSOR_FILE);
        let cursor = match std::fs::read_to_string(&path) {
            Ok(c) => Some(c.trim().to_owned()).filter(|c| !c.is_empty()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(
                    "bounce breaker: cannot read the journal cursor {}: {e}; starting at the journal's end (what was logged while dualroute was stopped is not counted)",
                    path.display()
                );
                None
            }
        };
        Journal {
            directory,
            state,
            window,
            began: crate::state::now(),
            saved: cursor.clone(),
            cursor,
            running: None,
            restart_at: Instant::now(),
            backoff: BACKOFF_MIN,
            exited: None,
            files: Ok(()),
            checked: None,
        }
    }

    /// A new window after a reload.
    pub fn set_window(&mut self, window: Duration) {
        self.window = window;
    }

    /// The command that follows the journal from the cursor (or its end).
    fn command(&self) -> Command {
        let mut cmd = Command::new(JOURNALCTL);
        if let Some(d) = &self.directory {
            cmd.arg("--directory").arg(d);
        }
        cmd.args(["--follow", "--output=json", "--no-pager"]);
        match &self.cursor {
            // --no-tail: everything after the cursor, not the last 10.
            Some(c) => cmd.arg(format!("--after-cursor={c}")).arg("--no-tail"),
            // The first start: from when the breaker started (whole
            // seconds), so that what is logged before journalctl runs is
            // not lost, and nothing older is counted.
            None => cmd.arg(format!("--since=@{}", self.began)),
        };
        // The mail facility (LOG_MAIL = 2): Postfix's and Sendmail's.
        cmd.arg("SYSLOG_FACILITY=2");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn start(&mut self) {
        let mut child = match self.command().spawn() {
            Ok(c) => c,
            Err(e) => {
                self.failed(format!(
                    "cannot run {JOURNALCTL}: {e} (package systemd; it must be in PATH)"
                ));
                return;
            }
        };
        let (tx, rx) = mpsc::sync_channel(4096);
        if let Some(out) = child.stdout.take() {
            let tx = tx.clone();
            spawn_reader("journal", move || read_entries(out, &tx));
        }
        if let Some(err) = child.stderr.take() {
            spawn_reader("journal-stderr", move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(Msg::Stderr(line)).is_err() {
                        break;
                    }
                }
            });
        }
        tracing::info!(
            "bounce breaker: following the journal{} ({JOURNALCTL} pid {}, mail facility, {})",
            self.directory
                .as_ref()
                .map(|d| format!(" in {}", d.display()))
                .unwrap_or_default(),
            child.id(),
            if self.cursor.is_some() {
                "from where it stopped"
            } else {
                "from its end"
            }
        );
        self.running = Some(Running {
            child,
            rx,
            started: Instant::now(),
        });
    }

    fn failed(&mut self, why: String) {
        tracing::warn!(
            "bounce breaker: {why}; trying again in {}s",
            self.backoff.as_secs()
        );
        self.exited = Some(why);
        self.running = None;
        self.restart_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// The entries logged since the last call, oldest first.
    pub fn poll(&mut self) -> Vec<Entry> {
        let mut entries = Vec::new();
        if self.running.is_none() && Instant::now() >= self.restart_at {
            self.start();
        }
        let mut stderr = Vec::new();
        let mut gone = false;
        if let Some(r) = &mut self.running {
            while entries.len() < MAX_ENTRIES {
                match r.rx.try_recv() {
                    Ok(Msg::Entry(json)) => {
                        if let Some((e, cursor)) = entry(&json, SystemTime::now()) {
                            if let Some(c) = cursor {
                                self.cursor = Some(c);
                            }
                            if let Some(e) = e.filter(|e| e.age < self.window) {
                                entries.push(e);
                            }
                        }
                    }
                    Ok(Msg::Stderr(line)) => stderr.push(line),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        gone = true;
                        break;
                    }
                }
            }
            if !entries.is_empty() && r.started.elapsed() > BACKOFF_MAX {
                self.backoff = BACKOFF_MIN;
            }
            // A journalctl that exited counts as read again once its
            // successor has run for a while (or handed over an entry), not
            // at the restart: one that exits at once would otherwise flap
            // between blind and seeing, a notice each time.
            if self.exited.is_some() && (!entries.is_empty() || r.started.elapsed() > PROVEN) {
                self.exited = None;
            }
        }
        for line in &stderr {
            tracing::warn!("bounce breaker: {JOURNALCTL}: {line}");
            if line.contains("not seeing messages from other users") {
                // See the module documentation: the files decide.
                self.checked = None;
            }
        }
        if gone {
            let status = self
                .running
                .as_mut()
                .and_then(|r| r.child.wait().ok())
                .map(|s| s.to_string())
                .unwrap_or_else(|| "gone".into());
            let last = stderr.last().map(|l| format!(": {l}")).unwrap_or_default();
            self.failed(format!("{JOURNALCTL} exited ({status}){last}"));
        }
        entries
    }

    /// Keeps the cursor of the last entry handed over, once the breaker
    /// has counted it: a restart goes on after it. Written at every poll
    /// that read something, by rename (a killed milter leaves the old or
    /// the new cursor, never half of one) and without fsync, which would
    /// cost a disk flush twice a second on a busy host: a power cut may
    /// count the last few entries again.
    pub fn commit(&mut self) {
        if self.cursor == self.saved {
            return;
        }
        let Some(cursor) = &self.cursor else {
            return;
        };
        let path = self.state.dir.join(CURSOR_FILE);
        let tmp = self
            .state
            .dir
            .join(format!(".{CURSOR_FILE}.{}", std::process::id()));
        let written = std::fs::create_dir_all(&self.state.dir)
            .and_then(|()| std::fs::write(&tmp, format!("{cursor}\n")))
            .and_then(|()| std::fs::rename(&tmp, &path));
        match written {
            Ok(()) => self.saved = self.cursor.clone(),
            Err(e) => tracing::warn!(
                "bounce breaker: cannot record the journal cursor in {}: {e}; a restart would count again what was read since the last cursor recorded",
                path.display()
            ),
        }
    }

    /// Whether the journal is read: journalctl runs and every journal file
    /// opens. Err says why not.
    pub fn health(&mut self) -> Result<(), String> {
        if self.checked.is_none_or(|t| t.elapsed() >= CHECK_EVERY) {
            self.files = files_readable(self.directory.as_deref());
            self.checked = Some(Instant::now());
        }
        self.files.clone()?;
        match &self.exited {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }
}

fn spawn_reader(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new()
        .name(format!("breaker-{name}"))
        .spawn(f)
    {
        tracing::error!("bounce breaker: cannot start a thread to read {JOURNALCTL}: {e}");
    }
}

/// Hands each line of journalctl's output over; a line longer than
/// [`MAX_LINE`] is skipped.
fn read_entries(out: impl Read, tx: &SyncSender<Msg>) {
    let mut r = BufReader::with_capacity(64 << 10, out);
    let mut line = Vec::new();
    let mut skipping = false;
    loop {
        let buf = match r.fill_buf() {
            Ok([]) | Err(_) => return,
            Ok(b) => b,
        };
        let (chunk, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !skipping {
            line.extend_from_slice(chunk);
            if line.len() > MAX_LINE {
                tracing::warn!(
                    "bounce breaker: a journal entry of more than {MAX_LINE} bytes skipped"
                );
                skipping = true;
                line = Vec::new();
            }
        }
        let used = end.unwrap_or(buf.len());
        r.consume(used);
        if end.is_some() {
            if !skipping && tx.send(Msg::Entry(std::mem::take(&mut line))).is_err() {
                return;
            }
            skipping = false;
            line.clear();
        }
    }
}

/// A field of a journalctl JSON entry as text: a string; an array of
/// numbers (journalctl's form of a value that is not valid UTF-8 or has
/// control characters); the first of several values of one field.
fn field(v: &Value, name: &str) -> Option<String> {
    fn text(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Array(a) if a.iter().all(Value::is_u64) => {
                let bytes: Vec<u8> = a
                    .iter()
                    .filter_map(|n| n.as_u64().and_then(|n| u8::try_from(n).ok()))
                    .collect();
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            Value::Array(a) => a.first().and_then(text),
            _ => None,
        }
    }
    v.get(name).and_then(text)
}

/// One line of `journalctl --output=json`: the syslog line to parse and
/// its age at `now` (None for an entry without a MESSAGE), and the entry's
/// cursor. None when the line is not a JSON object.
pub fn entry(json: &[u8], now: SystemTime) -> Option<(Option<Entry>, Option<String>)> {
    let v: Value = serde_json::from_slice(json).ok()?;
    if !v.is_object() {
        return None;
    }
    let cursor = field(&v, "__CURSOR");
    let Some(message) = field(&v, "MESSAGE") else {
        return Some((None, cursor));
    };
    let at = field(&v, "__REALTIME_TIMESTAMP")
        .and_then(|t| t.parse::<u64>().ok())
        .and_then(|us| UNIX_EPOCH.checked_add(Duration::from_micros(us)))
        .unwrap_or(now);
    let age = now.duration_since(at).unwrap_or_default();
    let ident = field(&v, "SYSLOG_IDENTIFIER")
        .or_else(|| field(&v, "_COMM"))
        .unwrap_or_else(|| "-".into());
    let pid = field(&v, "SYSLOG_PID")
        .or_else(|| field(&v, "_PID"))
        .map(|p| format!("[{p}]"))
        .unwrap_or_default();
    let stamp = humantime::format_rfc3339_seconds(at);
    let line = format!("{stamp} {ident}{pid}: {message}");
    Some((Some(Entry { line, age }), cursor))
}

/// The journal files of `directory` (or of the system journal), one level
/// of machine-id directories down.
pub fn journal_files(directory: Option<&Path>) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let dirs: Vec<PathBuf> = match directory {
        Some(d) => vec![d.to_owned()],
        None => SYSTEM_DIRS.iter().map(PathBuf::from).collect(),
    };
    let mut files = Vec::new();
    let mut todo: Vec<(PathBuf, u8)> = dirs.iter().map(|d| (d.clone(), 0)).collect();
    while let Some((dir, depth)) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && depth == 0 {
                todo.push((p, 1));
            } else if p.extension().is_some_and(|x| x == "journal") {
                files.push(p);
            }
        }
    }
    files.sort();
    (dirs, files)
}

/// Whether this process can read the journal: at least one journal file,
/// and every one opens. Err says why not and what to do.
pub fn files_readable(directory: Option<&Path>) -> Result<(), String> {
    let (dirs, files) = journal_files(directory);
    let shown: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    if let Some(d) = directory {
        if let Err(e) = std::fs::read_dir(d) {
            return Err(format!(
                "cannot read the journal directory {}: {e}",
                d.display()
            ));
        }
    }
    if files.is_empty() {
        return Err(format!(
            "no journal files in {}: is systemd-journald running (or breaker.journal_directory wrong)?",
            shown.join(" or ")
        ));
    }
    for f in &files {
        if let Err(e) = std::fs::File::open(f) {
            return Err(format!(
                "cannot read {}: {e}; without it the breaker sees only the entries of its own user: give the service the systemd-journal group (SupplementaryGroups=systemd-journal, `systemctl edit dualroute`)",
                f.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn an_entry_becomes_a_syslog_line() {
        let json = br#"{"__CURSOR":"s=1;i=2","__REALTIME_TIMESTAMP":"1796440708000000","SYSLOG_IDENTIFIER":"postfix/smtp","_PID":"42","MESSAGE":"4Bc1: to=<a@b>, relay=x, delay=1, delays=0/0/0/0, dsn=5.7.1, status=bounced (no)"}"#;
        let (e, cursor) = entry(json, at(1_796_440_718)).unwrap();
        let e = e.unwrap();
        assert_eq!(cursor.as_deref(), Some("s=1;i=2"));
        assert_eq!(e.age, Duration::from_secs(10));
        assert_eq!(
            e.line,
            "2026-12-05T03:18:28Z postfix/smtp[42]: 4Bc1: to=<a@b>, relay=x, delay=1, delays=0/0/0/0, dsn=5.7.1, status=bounced (no)"
        );
        let f = crate::breaker::parse_line(&e.line).unwrap();
        assert_eq!((f.queue_id.as_str(), f.dsn.as_str()), ("4Bc1", "5.7.1"));
    }

    #[test]
    fn odd_json_is_skipped_or_read_without_panic() {
        let now = at(1000);
        for bad in [
            &b""[..],
            b"null",
            b"[1,2]",
            b"{",
            b"\"x\"",
            b"{\"MESSAGE\": {\"a\": 1}}",
            b"{\"MESSAGE\": [300, -1]}",
            b"{\"MESSAGE\": null, \"__CURSOR\": 5}",
            b"{\"__REALTIME_TIMESTAMP\": \"99999999999999999999999\", \"MESSAGE\": \"m\"}",
            b"\xff\xfe",
        ] {
            let _ = entry(bad, now);
        }
        // Bytes for a MESSAGE that is not UTF-8; several values of a field;
        // a time stamp in the future.
        let (e, _) = entry(
            br#"{"MESSAGE":[104,105,255],"SYSLOG_IDENTIFIER":["sm-mta","x"],"__REALTIME_TIMESTAMP":"2000000000000"}"#,
            now,
        )
        .unwrap();
        let e = e.unwrap();
        assert!(e.line.ends_with("sm-mta: hi\u{fffd}"), "{}", e.line);
        assert_eq!(e.age, Duration::ZERO);
    }
}
