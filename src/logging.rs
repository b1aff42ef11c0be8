//! The running milter's log: one line per event on stderr, in
//! tracing-subscriber's own layout (`TIME LEVEL target: message
//! field=value …`), written by a formatter of our own.
//!
//! Why our own: the milter logs one line per message, and the stock
//! formatter writes every field through a character-at-a-time escaping
//! writer: a fifth of the milter's own instructions per message
//! (BENCHMARKS.md, "Third round"). [`LineFormat`] formats the line in one
//! go and then makes it safe in one pass: every control character
//! (C0, DEL, C1) is written as an escape, so a line from the network can
//! neither colour a terminal nor split itself into two log lines.
//!
//! On a terminal (colour) the stock formatter is kept: nobody runs a
//! production MX with stderr on a terminal.
//!
//! `dualroute run --log syslog` sends the same lines to syslog instead
//! ([`init_syslog`]), facility `mail` by default, as opendkim and
//! spf-milter do: on a host with rsyslog they land in mail.log beside
//! Postfix's own lines for the same queue id. Under systemd the default
//! stays stderr, which is the journal; the packaged unit sets
//! `SyslogFacility=mail` so that journald files them as mail too.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Logs to stderr at `DUALROUTE_LOG` (default `info`). Colour only on a
/// terminal (files and the journal get plain text); no timestamp of our
/// own when stderr is the journal, which stamps every line itself
/// (systemd.exec(5): JOURNAL_STREAM holds the device and inode of the
/// stream it connected to stderr).
pub fn init() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUALROUTE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let time = !stderr_is_journal();
    if std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        let builder = builder.with_ansi(true);
        if time {
            builder.init();
        } else {
            builder.without_time().init();
        }
    } else {
        builder
            .with_ansi(false)
            .event_format(LineFormat { time })
            .init();
    }
}

/// A syslog facility `--syslog-facility` accepts: the ones a mail
/// service uses (syslog(3)).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Eq, PartialEq)]
pub enum Facility {
    Mail,
    Daemon,
    User,
    Local0,
    Local1,
    Local2,
    Local3,
    Local4,
    Local5,
    Local6,
    Local7,
}

impl Facility {
    fn syslog(self) -> syslog::Facility {
        use syslog::Facility as F;
        match self {
            Facility::Mail => F::LOG_MAIL,
            Facility::Daemon => F::LOG_DAEMON,
            Facility::User => F::LOG_USER,
            Facility::Local0 => F::LOG_LOCAL0,
            Facility::Local1 => F::LOG_LOCAL1,
            Facility::Local2 => F::LOG_LOCAL2,
            Facility::Local3 => F::LOG_LOCAL3,
            Facility::Local4 => F::LOG_LOCAL4,
            Facility::Local5 => F::LOG_LOCAL5,
            Facility::Local6 => F::LOG_LOCAL6,
            Facility::Local7 => F::LOG_LOCAL7,
        }
    }
}

/// Logs to the syslog daemon listening on `socket` (`/dev/log`), with
/// `facility`, at `DUALROUTE_LOG` (default `info`): the lines of [`init`]
/// without a timestamp (syslog stamps them), the level as the severity,
/// the tag `dualroute[PID]`. When the daemon is not there, or goes away,
/// a line is written to stderr instead, with one warning, and the socket
/// is tried again for the next line at most once a second: a missing
/// syslog never stops the milter (docs/design.md "Logging").
pub fn init_syslog(facility: Facility, socket: &std::path::Path) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUALROUTE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = Syslog::new(facility, socket);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .event_format(LineFormat { time: false })
        .with_writer(writer)
        .init();
}

/// The connection to the syslog daemon, shared by every line.
#[derive(Clone)]
struct Syslog(std::sync::Arc<std::sync::Mutex<SyslogState>>);

type SyslogLogger = syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>;

struct SyslogState {
    formatter: syslog::Formatter3164,
    socket: std::path::PathBuf,
    logger: Option<SyslogLogger>,
    /// When the socket was last tried and failed.
    failed: Option<std::time::Instant>,
}

impl Syslog {
    fn new(facility: Facility, socket: &std::path::Path) -> Syslog {
        let formatter = syslog::Formatter3164 {
            facility: facility.syslog(),
            hostname: None,
            process: "dualroute".into(),
            pid: std::process::id(),
        };
        let mut state = SyslogState {
            formatter,
            socket: socket.to_owned(),
            logger: None,
            failed: None,
        };
        state.connect();
        Syslog(std::sync::Arc::new(std::sync::Mutex::new(state)))
    }
}

impl SyslogState {
    fn connect(&mut self) {
        match syslog::unix_custom(self.formatter.clone(), &self.socket) {
            Ok(l) => {
                self.logger = Some(l);
                self.failed = None;
            }
            Err(e) => {
                if self.failed.is_none() {
                    eprintln!(
                        "dualroute: cannot log to syslog at {}: {e}; logging to stderr until it is there",
                        self.socket.display()
                    );
                }
                self.logger = None;
                self.failed = Some(std::time::Instant::now());
            }
        }
    }

    fn send(&mut self, level: Level, line: &str) {
        if self.logger.is_none()
            && self
                .failed
                .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1))
        {
            self.connect();
        }
        if let Some(logger) = self.logger.as_mut() {
            let sent = match level {
                Level::ERROR => logger.err(line),
                Level::WARN => logger.warning(line),
                Level::INFO => logger.info(line),
                _ => logger.debug(line),
            };
            match sent {
                Ok(()) => return,
                // The daemon restarted: one new connection, then stderr.
                Err(_) => {
                    self.logger = None;
                    self.failed = None;
                    self.connect();
                    if let Some(logger) = self.logger.as_mut() {
                        let again = match level {
                            Level::ERROR => logger.err(line),
                            Level::WARN => logger.warning(line),
                            Level::INFO => logger.info(line),
                            _ => logger.debug(line),
                        };
                        if again.is_ok() {
                            return;
                        }
                        self.logger = None;
                        self.failed = Some(std::time::Instant::now());
                    }
                }
            }
        }
        eprintln!("{line}");
    }
}

/// One line on its way to syslog: sent whole when the formatter is done
/// with it (dropped).
struct SyslogLine {
    syslog: Syslog,
    level: Level,
    buf: Vec<u8>,
}

impl std::io::Write for SyslogLine {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine {
    fn drop(&mut self) {
        let line = String::from_utf8_lossy(&self.buf);
        let line = line.trim_end_matches('\n');
        if line.is_empty() {
            return;
        }
        let mut state = self.syslog.0.lock().unwrap_or_else(|p| p.into_inner());
        state.send(self.level, line);
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Syslog {
    type Writer = SyslogLine;

    fn make_writer(&'a self) -> SyslogLine {
        SyslogLine {
            syslog: self.clone(),
            level: Level::INFO,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> SyslogLine {
        SyslogLine {
            syslog: self.clone(),
            level: *meta.level(),
            buf: Vec::new(),
        }
    }
}

fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

/// One event as one line: `2026-11-29T17:21:35.155000Z  INFO
/// dualroute::milter: message queue_id=… from=…` (the timestamp only with
/// `time`), control characters escaped.
#[derive(Clone, Copy, Debug)]
pub struct LineFormat {
    pub time: bool,
}

thread_local! {
    /// The line being formatted, reused from event to event.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    /// The timestamp up to its second (`2026-11-29T17:21:35.`) and the
    /// second it is for: formatted once a second, not once a line.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `now` as tracing-subscriber writes it: RFC 3339, UTC, microseconds.
fn push_timestamp(line: &mut String, now: std::time::SystemTime) {
    let Ok(since) = now.duration_since(std::time::UNIX_EPOCH) else {
        let _ = write!(line, "{}", humantime::format_rfc3339_micros(now));
        return;
    };
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != since.as_secs() {
            let full = humantime::format_rfc3339_micros(now).to_string();
            second.1.clear();
            second
                .1
                .push_str(full.get(..full.len() - 7).unwrap_or(&full));
            second.0 = since.as_secs();
        }
        line.push_str(&second.1);
    });
    let micros = since.subsec_micros();
    let _ = write!(line, "{micros:06}Z");
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _cx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        LINE.with(|line| {
            // An event logged while one is formatted (a Display impl that
            // logs) gets a line of its own.
            let mut own = String::new();
            let mut shared = line.try_borrow_mut().ok();
            let line = shared.as_deref_mut().unwrap_or(&mut own);
            line.clear();
            self.format(line, event)?;
            write_escaped(&mut writer, line)
        })
    }
}

impl LineFormat {
    /// The line, unescaped, with its newline.
    pub fn format(&self, line: &mut String, event: &Event<'_>) -> fmt::Result {
        if self.time {
            push_timestamp(line, std::time::SystemTime::now());
            line.push(' ');
        }
        let meta = event.metadata();
        line.push_str(level(meta.level()));
        line.push(' ');
        line.push_str(meta.target());
        line.push_str(": ");
        let mut fields = Fields { line, first: true };
        event.record(&mut fields);
        line.push('\n');
        Ok(())
    }
}

/// Padded to five, as tracing-subscriber writes it.
fn level(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// The event's fields: the message as it is, the others as
/// `name=value` (a string field quoted), separated by spaces.
struct Fields<'a> {
    line: &'a mut String,
    first: bool,
}

impl Fields<'_> {
    /// The separator and the name; `false` for a field not shown.
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name.starts_with("log.") {
            return false;
        }
        if !std::mem::take(&mut self.first) {
            self.line.push(' ');
        }
        if name != "message" {
            self.line.push_str(name.strip_prefix("r#").unwrap_or(name));
            self.line.push('=');
        }
        true
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.start(field) {
            return;
        }
        if field.name() == "message" {
            self.line.push_str(value);
        } else {
            let _ = write!(self.line, "{value:?}");
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            let _ = write!(self.line, "{value:?}");
        }
    }
}

/// Writes `line`, every control character but its final newline as an
/// escape (`\x1b`, `\x0a`, `\u{9b}`). The usual line has none and is
/// written in one piece.
fn write_escaped(out: &mut impl fmt::Write, line: &str) -> fmt::Result {
    let body = line.strip_suffix('\n').unwrap_or(line);
    // C1 controls are U+0080..U+009F: 0xc2 and a second byte in UTF-8.
    // No early exit: the compiler checks many bytes at a time.
    let plain = !body
        .bytes()
        .fold(false, |bad, b| bad | (b < 0x20) | (b == 0x7f) | (b == 0xc2));
    if plain {
        return out.write_str(line);
    }
    for c in body.chars() {
        match c as u32 {
            n @ (0..=0x1f | 0x7f) => write!(out, "\\x{n:02x}")?,
            n @ 0x80..=0x9f => write!(out, "\\u{{{n:x}}}")?,
            _ => out.write_char(c)?,
        }
    }
    out.write_char('\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        write_escaped(&mut out, s).unwrap();
        out
    }

    #[test]
    fn timestamps_are_rfc_3339_with_microseconds_within_and_across_seconds() {
        use std::time::{Duration, UNIX_EPOCH};
        let at = |s: u64, us: u64| {
            let mut line = String::new();
            push_timestamp(
                &mut line,
                UNIX_EPOCH + Duration::from_micros(s * 1_000_000 + us),
            );
            line
        };
        assert_eq!(at(1_796_232_095, 155_000), "2026-12-02T17:21:35.155000Z");
        assert_eq!(at(1_796_232_095, 7), "2026-12-02T17:21:35.000007Z");
        assert_eq!(at(1_796_232_096, 999_999), "2026-12-02T17:21:36.999999Z");
        assert_eq!(at(0, 1), "1970-01-01T00:00:00.000001Z");
    }

    #[test]
    fn a_clean_line_is_written_as_it_is() {
        let line = "2026-11-29T17:21:35.155000Z  INFO dualroute: bücher <a@b.example> ✓\n";
        assert_eq!(escaped(line), line);
    }

    #[test]
    fn control_characters_become_escapes_and_the_line_stays_one_line() {
        assert_eq!(
            escaped("RCPT <a\x1b[31m@b>\nforged line\t\u{9b}x\x7f\n"),
            "RCPT <a\\x1b[31m@b>\\x0aforged line\\x09\\u{9b}x\\x7f\n"
        );
    }

    #[test]
    fn the_stock_layout_is_kept() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::fmt::MakeWriter;
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl<'a> MakeWriter<'a> for Sink {
            type Writer = Sink;
            fn make_writer(&'a self) -> Sink {
                self.clone()
            }
        }
        let log = |ours: bool| {
            let sink = Sink::default();
            let builder = tracing_subscriber::fmt()
                .with_writer(sink.clone())
                .with_ansi(false)
                .without_time();
            let emit = || {
                let (queue_id, from, name) = ("4ABC", "<s@x.example>", "quoted");
                tracing::info!(queue_id = %queue_id, from = %from, "<a@b> keep ({})", "account");
                tracing::warn!(r#type = name, count = 3, flag = true, "plain");
                tracing::error!("no fields");
            };
            if ours {
                tracing::subscriber::with_default(
                    builder.event_format(LineFormat { time: false }).finish(),
                    emit,
                );
            } else {
                tracing::subscriber::with_default(builder.finish(), emit);
            }
            let bytes = sink.0.lock().unwrap().clone();
            String::from_utf8(bytes).unwrap()
        };
        let stock = log(false);
        assert!(
            stock.contains("queue_id=4ABC from=<s@x.example>"),
            "{stock}"
        );
        assert_eq!(log(true), stock);
    }
}
