//! `smtp-sink` (from the postfix package) on a free loopback port: the
//! other server of a test. It writes one file per message with the
//! envelope it saw (`X-Mail-Args`, one `X-Rcpt-Args` per RCPT with its
//! ORCPT/NOTIFY) before the message itself.
//!
//! `smtp-sink` refuses to run as root without `-u USER` and writes its
//! dumps as USER, so the dump directory belongs to `nobody` inside a
//! world-searchable temporary directory. A transaction whose RCPTs were all
//! rejected leaves no dump file.

use super::{
    files_under, header_values, keep_tmp, poll, ports, set_mode, tool, user_ids, POLL, WAIT,
};
use std::fs;
use std::io::{Read, Seek};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// smtp-sink options that refuse every RCPT: -f implies -p (no
/// PIPELINING); -B sets the hard reject reply.
const REJECTING: &[&str] = &[
    "-f",
    "RCPT",
    "-B",
    "550 5.1.1 Error: recipient rejected by smtp-sink",
];

/// smtp-sink options that refuse every RCPT as a destination that does
/// not take our mail at all: the bounce breaker counts these, where it
/// does not count `5.1.1` for an unknown address (docs/design.md §7).
const REFUSING_RELAY: &[&str] = &["-f", "RCPT", "-B", "554 5.7.1 Relay access denied"];

/// `smtp-sink` on a free loopback port, dumping each message to a file:
/// the "other server" of a test. Route mail to it with a transport entry
/// like `example.com.dualroute.invalid smtp:` + [`SmtpSink::nexthop`].
/// Dropping it kills it.
pub struct SmtpSink {
    child: Child,
    port: u16,
    tmp: Option<tempfile::TempDir>,
    dump_dir: PathBuf,
}

impl SmtpSink {
    /// A sink that accepts everything.
    pub fn start() -> SmtpSink {
        Self::start_with(&[])
    }

    /// A sink that answers every RCPT `550 5.1.1` (so Postfix bounces).
    pub fn start_rejecting() -> SmtpSink {
        Self::start_with(REJECTING)
    }

    /// A sink that answers every RCPT `554 5.7.1 Relay access denied`.
    pub fn start_refusing_relay() -> SmtpSink {
        Self::start_with(REFUSING_RELAY)
    }

    /// Turns this sink into one that accepts everything, on the same port
    /// and dump directory (a destination that was fixed).
    pub fn accept_all(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let template = format!("{}/%Y%m%d%H%M%S.", self.dump_dir.display());
        let deadline = Instant::now() + Duration::from_secs(5);
        // The old process may hold the port for a moment after it died.
        // The port is in the test's configuration: it cannot change, so a
        // port another process took fails the test, saying so.
        loop {
            let (child, bound) = spawn_sink(&template, &[], self.port);
            self.child = child;
            match bound {
                Ok(()) => return,
                Err(why) => assert!(
                    Instant::now() < deadline,
                    "smtp-sink did not listen again on 127.0.0.1:{}: {why}",
                    self.port
                ),
            }
            std::thread::sleep(POLL);
        }
    }

    fn start_with(args: &[&str]) -> SmtpSink {
        let tmp = tempfile::Builder::new()
            .prefix("dualroute-sink-")
            .tempdir()
            .expect("create a temporary directory");
        // smtp-sink refuses to run as root without -u, and writes its dumps
        // as that user: nobody must be able to reach and write the dump
        // directory.
        set_mode(tmp.path(), 0o755);
        let dump_dir = tmp.path().join("dumps");
        fs::create_dir(&dump_dir).expect("create the sink dump directory");
        let (uid, gid) = user_ids("nobody");
        chown(&dump_dir, Some(uid), Some(gid)).expect("chown the sink dump directory to nobody");
        let template = format!("{}/%Y%m%d%H%M%S.", dump_dir.display());
        // smtp-sink binds its port itself: started again on another port
        // when another process has it (tests/support/ports.rs).
        let (child, port) = ports::start_on_a_port("smtp-sink", |port| {
            let (child, bound) = spawn_sink(&template, args, port);
            bound.map(|()| (child, port))
        });
        SmtpSink {
            child,
            port,
            tmp: Some(tmp),
            dump_dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.port)
    }

    /// `[127.0.0.1]:PORT`, the next hop of a transport entry (bracketed, so
    /// Postfix looks up no MX).
    pub fn nexthop(&self) -> String {
        format!("[127.0.0.1]:{}", self.port)
    }

    /// Where the dump files are.
    pub fn dump_dir(&self) -> &Path {
        &self.dump_dir
    }

    /// The messages received so far, oldest first.
    pub fn messages(&self) -> Vec<SinkMessage> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = files_under(&self.dump_dir)
            .into_iter()
            .filter_map(|path| {
                let modified = fs::metadata(&path).and_then(|m| m.modified()).ok()?;
                Some((modified, path))
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|(_, path)| {
                let text = fs::read_to_string(&path).ok()?;
                SinkMessage::parse(path, &text)
            })
            .collect()
    }

    /// Waits until at least `n` messages have arrived and returns them all.
    pub fn wait_messages(&self, n: usize) -> Vec<SinkMessage> {
        poll(|| {
            let messages = self.messages();
            (messages.len() >= n).then_some(messages)
        })
        .unwrap_or_else(|| {
            panic!(
                "timed out after {WAIT:?} waiting for {n} messages at the sink; got {:#?}",
                self.messages()
            )
        })
    }
}

/// Runs `smtp-sink` on 127.0.0.1:`port` dumping into `template`, and
/// waits until it listens there: `Err` (the child killed) when it could not
/// bind the port (it exits saying so, or another process listens there).
fn spawn_sink(template: &str, args: &[&str], port: u16) -> (Child, Result<(), String>) {
    let sink = tool("smtp-sink");
    let mut stderr = tempfile::tempfile().expect("create a temporary file");
    let mut child = Command::new(&sink)
        .args(["-u", "nobody", "-d", template])
        .args(args)
        .arg(format!("127.0.0.1:{port}"))
        .arg("32")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.try_clone().expect("clone a file handle"))
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", sink.display()));
    let pid = child.id();
    let bound = ports::wait_bound(
        port,
        Duration::from_secs(5),
        || vec![pid],
        || {
            let status = child.try_wait().ok().flatten()?;
            let mut message = String::new();
            let _ = stderr.rewind();
            let _ = stderr.read_to_string(&mut message);
            Some(format!("smtp-sink exited ({status}): {message}"))
        },
    );
    match bound {
        Ok(()) => (child, Ok(())),
        Err(ports::NotBound::Taken(why)) => {
            let _ = child.kill();
            let _ = child.wait();
            (child, Err(why))
        }
        Err(ports::NotBound::TimedOut) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("smtp-sink did not listen on 127.0.0.1:{port} within 5 s")
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(tmp) = self.tmp.take() {
            if keep_tmp() {
                eprintln!(
                    "DUALROUTE_KEEP_TMP: kept the smtp-sink dumps {}",
                    tmp.keep().display()
                );
            }
        }
    }
}

/// One message as `smtp-sink` dumped it.
#[derive(Clone, Debug)]
pub struct SinkMessage {
    pub path: PathBuf,
    /// `X-Client-Addr`: who delivered it.
    pub client_addr: String,
    /// `X-Helo-Args`.
    pub helo: Option<String>,
    /// `X-Mail-Args`: `<sender>` and its ESMTP parameters.
    pub mail_args: String,
    /// One per `X-Rcpt-Args`, in the order sent.
    pub rcpts: Vec<SinkRcpt>,
    /// The message as received (header and body), without smtp-sink's own
    /// header block.
    pub text: String,
}

impl SinkMessage {
    fn parse(path: PathBuf, dump: &str) -> Option<SinkMessage> {
        let mut client_addr = None;
        let mut helo = None;
        let mut mail_args = None;
        let mut rcpts = Vec::new();
        let mut lines = dump.split_inclusive('\n');
        // smtp-sink's block ends with its three-line Received: header.
        let mut in_received = false;
        let mut consumed = 0;
        for line in lines.by_ref() {
            let content = line.trim_end_matches(['\r', '\n']);
            if in_received {
                if content.starts_with([' ', '\t']) {
                    consumed += line.len();
                    continue;
                }
                break;
            }
            consumed += line.len();
            if let Some(v) = content.strip_prefix("X-Client-Addr: ") {
                client_addr = Some(v.to_owned());
            } else if let Some(v) = content.strip_prefix("X-Helo-Args: ") {
                helo = Some(v.to_owned());
            } else if let Some(v) = content.strip_prefix("X-Mail-Args: ") {
                mail_args = Some(v.to_owned());
            } else if let Some(v) = content.strip_prefix("X-Rcpt-Args: ") {
                rcpts.push(SinkRcpt::parse(v));
            } else if content.starts_with("Received: ") {
                in_received = true;
            }
        }
        if !in_received {
            // Still being written.
            return None;
        }
        let mut text = dump[consumed..].to_owned();
        // smtp-sink appends an empty line after the message.
        if text.ends_with("\n\n") {
            text.pop();
        }
        Some(SinkMessage {
            path,
            client_addr: client_addr?,
            helo,
            mail_args: mail_args?,
            rcpts,
            text,
        })
    }

    /// The envelope sender without angle brackets (empty for `<>`).
    pub fn mail_from(&self) -> String {
        let first = self.mail_args.split_whitespace().next().unwrap_or("");
        first
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_owned()
    }

    /// The RCPT addresses, in order.
    pub fn rcpt_addresses(&self) -> Vec<String> {
        self.rcpts.iter().map(|r| r.address.clone()).collect()
    }

    /// The RCPT for an address (exact match).
    pub fn rcpt(&self, address: &str) -> Option<&SinkRcpt> {
        self.rcpts.iter().find(|r| r.address == address)
    }

    /// The values of a header field of the message, unfolded, in order.
    pub fn header(&self, name: &str) -> Vec<String> {
        header_values(&self.text, name)
    }
}

/// One RCPT command as the sink received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkRcpt {
    /// The address without angle brackets.
    pub address: String,
    /// The ESMTP parameters as sent, e.g. `ORCPT=rfc822;bob@example.com`,
    /// `NOTIFY=SUCCESS,FAILURE`.
    pub params: Vec<String>,
}

impl SinkRcpt {
    fn parse(args: &str) -> SinkRcpt {
        // The path ends at the first `>` outside a quoted string: a quoted
        // local part may contain spaces (`<"john doe"@example.com>`).
        let args = args.trim_start();
        let mut end = args.find(char::is_whitespace).unwrap_or(args.len());
        if args.starts_with('<') {
            let (mut quoted, mut escaped) = (false, false);
            for (i, c) in args.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quoted => escaped = true,
                    '"' => quoted = !quoted,
                    '>' if !quoted => {
                        end = i + 1;
                        break;
                    }
                    _ => {}
                }
            }
        }
        let (path, rest) = args.split_at(end);
        let address = path
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_owned();
        SinkRcpt {
            address,
            params: rest.split_whitespace().map(str::to_owned).collect(),
        }
    }

    /// The value of an ESMTP parameter (name case-insensitive), as sent.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find_map(|p| {
            let (key, value) = p.split_once('=')?;
            key.eq_ignore_ascii_case(name).then_some(value)
        })
    }

    /// `NOTIFY`, e.g. `SUCCESS,FAILURE` or `NEVER`.
    pub fn notify(&self) -> Option<&str> {
        self.param("NOTIFY")
    }

    /// `ORCPT` with its xtext decoded (RFC 3461 §4), e.g.
    /// `rfc822;bob+news@example.com`.
    pub fn orcpt(&self) -> Option<String> {
        self.param("ORCPT").map(xtext_decode)
    }
}

/// RFC 3461 §4 xtext, for ORCPT values a test sends: `+`, `=`, and bytes
/// outside `!`..`~` become `+XX`. Postfix's smtpd answers an unencoded `+`
/// in ORCPT with `501 5.5.4 Error: Bad ORCPT parameter syntax`.
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if (b'!'..=b'~').contains(&byte) && byte != b'+' && byte != b'=' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("+{byte:02X}"));
        }
    }
    out
}

/// RFC 3461 §4: `+XX` is the byte with hex value XX.
pub fn xtext_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'+' {
            if let Some(byte) = s
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
