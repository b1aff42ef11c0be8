//! A destination for recipient callouts (tests/callout.rs,
//! tests/callout_e2e.rs, tests/sendmail_e2e.rs): an SMTP server on
//! loopback that knows some addresses, refuses the others `550 5.1.1`,
//! or answers every RCPT `450` or `250` (a catch-all), optionally after a
//! pause; it records every RCPT and how many sessions were open at once.
//! Unlike `smtp-sink` (tests/support/sink.rs) it answers per address, so
//! the same server both answers the milter's callouts (`MAIL FROM:<>`,
//! RCPT, QUIT) and takes the MTA's real delivery of the addresses it
//! knows (DATA), as the destination of a split domain does. It can go
//! down (its port closed, open sessions cut) and come back on the same
//! port.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the stub answers RCPT.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Mode {
    /// 250 for the known addresses, 550 5.1.1 for the others.
    Directory,
    /// 250 for every address (a catch-all).
    AcceptAll,
    /// 450 4.2.1 for every address (greylisting, a full mailbox store).
    TempFail,
}

/// One RCPT the stub received.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Rcpt {
    /// The session's MAIL FROM address (empty: `MAIL FROM:<>`, a callout).
    pub mail_from: String,
    /// The address, lowercased, without its ESMTP parameters.
    pub address: String,
    /// The ESMTP parameters as sent (`NOTIFY=NEVER ORCPT=rfc822;…`: the
    /// stub announces DSN, so an MTA passes them on).
    pub params: String,
    /// The first digit of the stub's answer: 2, 4 or 5 (0 while the
    /// answer is still being paused).
    pub class: u8,
}

/// A message the stub took (DATA, a real delivery).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Delivered {
    pub mail_from: String,
    /// The recipients the stub accepted in the transaction.
    pub rcpts: Vec<String>,
    /// Header and body, dot-unstuffed, lines ending in `\n`.
    pub text: String,
}

impl Delivered {
    /// The values of header field `name` (case-insensitive), unfolded.
    pub fn header(&self, name: &str) -> Vec<String> {
        let mut values = Vec::new();
        for line in self.text.lines() {
            if line.is_empty() {
                break;
            }
            if let Some((field, value)) = line.split_once(':') {
                if field.eq_ignore_ascii_case(name) {
                    values.push(value.trim().to_owned());
                }
            }
        }
        values
    }
}

struct Shared {
    known: HashSet<String>,
    /// (alias domain, domain): an address at the alias is looked up at the
    /// domain, as a destination that takes a relay domain as an alias
    /// domain of its own (docs/sendmail.md).
    aliases: Mutex<Vec<(String, String)>>,
    mode: Mutex<Mode>,
    delay: Mutex<Duration>,
    rcpts: Mutex<Vec<Rcpt>>,
    messages: Mutex<Vec<Delivered>>,
    /// A clone of every session's stream, to cut them when going down.
    sessions: Mutex<Vec<TcpStream>>,
    open: AtomicUsize,
    most_open: AtomicUsize,
    stop: AtomicBool,
}

/// The running stub; it stops accepting when dropped.
pub struct CalloutStub {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accepting: Mutex<Option<JoinHandle<()>>>,
}

impl CalloutStub {
    /// A stub that knows `known` (compared lowercased).
    pub fn start(known: &[&str], mode: Mode) -> CalloutStub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the callout stub on loopback");
        let addr = listener.local_addr().expect("the stub's address");
        let shared = Arc::new(Shared {
            known: known.iter().map(|a| a.to_lowercase()).collect(),
            aliases: Mutex::new(Vec::new()),
            mode: Mutex::new(mode),
            delay: Mutex::new(Duration::ZERO),
            rcpts: Mutex::new(Vec::new()),
            messages: Mutex::new(Vec::new()),
            sessions: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            most_open: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let accepting = accept_loop(listener, shared.clone());
        CalloutStub {
            addr,
            shared,
            accepting: Mutex::new(Some(accepting)),
        }
    }

    /// `[127.0.0.1]:PORT`, as `destination.hosts` takes it.
    pub fn host(&self) -> String {
        format!("[127.0.0.1]:{}", self.addr.port())
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Addresses `local@alias` are known when `local@domain` is.
    pub fn alias_domain(&self, alias: &str, domain: &str) {
        self.shared
            .aliases
            .lock()
            .unwrap()
            .push((alias.to_lowercase(), domain.to_lowercase()));
    }

    /// Answers RCPT only after `d` from now on.
    pub fn set_delay(&self, d: Duration) {
        *self.shared.delay.lock().unwrap() = d;
    }

    pub fn set_mode(&self, m: Mode) {
        *self.shared.mode.lock().unwrap() = m;
    }

    /// The destination goes down: its port is closed (a connection is
    /// refused) and every open session is cut. Returns once the listening
    /// socket is closed.
    pub fn down(&self) {
        let Some(accepting) = self.accepting.lock().unwrap().take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop` and drops the listener.
        let _ = TcpStream::connect(self.addr);
        let _ = accepting.join();
        for s in self.shared.sessions.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The destination is back, on the same port.
    pub fn up(&self) {
        let mut accepting = self.accepting.lock().unwrap();
        if accepting.is_some() {
            return;
        }
        // std sets SO_REUSEADDR on Unix: the port of the closed listener
        // binds again at once, TIME_WAIT sessions or not. While it was
        // closed the kernel may have given it to an outgoing connection
        // as its ephemeral port: that one ends within moments.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("bind the callout stub again on {}: {e}", self.addr),
            }
        };
        self.shared.stop.store(false, Ordering::SeqCst);
        *accepting = Some(accept_loop(listener, self.shared.clone()));
    }

    /// Every RCPT address received, in order (callouts and deliveries).
    pub fn rcpts(&self) -> Vec<String> {
        self.rcpt_log().into_iter().map(|r| r.address).collect()
    }

    /// Every RCPT received, with its session's sender and the answer.
    pub fn rcpt_log(&self) -> Vec<Rcpt> {
        self.shared.rcpts.lock().unwrap().clone()
    }

    /// How many RCPTs named `address`.
    pub fn asked(&self, address: &str) -> usize {
        self.rcpts()
            .iter()
            .filter(|a| a.as_str() == address)
            .count()
    }

    /// The addresses of the callouts received (RCPTs after `MAIL
    /// FROM:<>`), in order.
    pub fn callouts(&self) -> Vec<String> {
        self.rcpt_log()
            .into_iter()
            .filter(|r| r.mail_from.is_empty())
            .map(|r| r.address)
            .collect()
    }

    /// How many callouts named `address`.
    pub fn callouts_for(&self, address: &str) -> usize {
        self.callouts().iter().filter(|a| *a == address).count()
    }

    /// The messages taken so far.
    pub fn messages(&self) -> Vec<Delivered> {
        self.shared.messages.lock().unwrap().clone()
    }

    /// The most sessions that were open at once.
    pub fn most_open(&self) -> usize {
        self.shared.most_open.load(Ordering::SeqCst)
    }
}

impl Drop for CalloutStub {
    fn drop(&mut self) {
        self.down();
    }
}

fn accept_loop(listener: TcpListener, s: Arc<Shared>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if s.stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            if let Ok(clone) = conn.try_clone() {
                s.sessions.lock().unwrap().push(clone);
            }
            let s = s.clone();
            std::thread::spawn(move || session(conn, &s));
        }
    })
}

fn session(conn: TcpStream, s: &Shared) {
    let now = s.open.fetch_add(1, Ordering::SeqCst) + 1;
    s.most_open.fetch_max(now, Ordering::SeqCst);
    let counted = std::sync::atomic::AtomicBool::new(true);
    let _ = converse(conn, s, &counted);
    if counted.swap(false, Ordering::SeqCst) {
        s.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The address of `RCPT TO:<address> PARAMS` or `MAIL FROM:<address>
/// PARAMS` (the command's first 9 or 10 characters cut), lowercased.
fn path(arg: &str) -> String {
    let arg = arg.trim_start();
    let inner = match arg.strip_prefix('<') {
        Some(rest) => rest.split('>').next().unwrap_or(""),
        None => arg.split_whitespace().next().unwrap_or(""),
    };
    inner.to_lowercase()
}

fn knows(s: &Shared, address: &str) -> bool {
    if s.known.contains(address) {
        return true;
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    s.aliases
        .lock()
        .unwrap()
        .iter()
        .any(|(alias, real)| alias == domain && s.known.contains(&format!("{local}@{real}")))
}

fn converse(
    conn: TcpStream,
    s: &Shared,
    counted: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut lines = BufReader::new(conn);
    out.write_all(b"220 stub.test ESMTP callout stub\r\n")?;
    // The transaction: MAIL FROM's address and the accepted RCPTs.
    let mut mail_from: Option<String> = None;
    let mut accepted: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end();
        let upper = cmd.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            "250-stub.test\r\n250-8BITMIME\r\n250 DSN\r\n".to_owned()
        } else if upper.starts_with("MAIL FROM:") {
            mail_from = Some(path(&cmd[10..]));
            accepted.clear();
            "250 2.1.0 ok\r\n".to_owned()
        } else if upper == "RSET" {
            mail_from = None;
            accepted.clear();
            "250 2.1.0 ok\r\n".to_owned()
        } else if upper.starts_with("RCPT TO:") {
            let address = path(&cmd[8..]);
            let params = cmd[8..]
                .split_once('>')
                .map_or("", |(_, p)| p)
                .trim()
                .to_owned();
            // Recorded before the pause: a test sees a callout in flight.
            let index = {
                let mut rcpts = s.rcpts.lock().unwrap();
                rcpts.push(Rcpt {
                    mail_from: mail_from.clone().unwrap_or_default(),
                    address: address.clone(),
                    params,
                    class: 0,
                });
                rcpts.len() - 1
            };
            let delay = *s.delay.lock().unwrap();
            std::thread::sleep(delay);
            let mode = *s.mode.lock().unwrap();
            let reply = match mode {
                Mode::TempFail => "450 4.2.1 try again later\r\n".to_owned(),
                Mode::AcceptAll => "250 2.1.5 ok\r\n".to_owned(),
                Mode::Directory if knows(s, &address) => "250 2.1.5 ok\r\n".to_owned(),
                Mode::Directory => format!("550 5.1.1 <{address}>: user unknown\r\n"),
            };
            s.rcpts.lock().unwrap()[index].class = reply.as_bytes()[0] - b'0';
            if reply.starts_with('2') {
                accepted.push(address);
            }
            reply
        } else if upper == "DATA" {
            match (&mail_from, accepted.is_empty()) {
                (Some(from), false) => {
                    out.write_all(b"354 go ahead\r\n")?;
                    let mut text = String::new();
                    loop {
                        line.clear();
                        if lines.read_line(&mut line)? == 0 {
                            return Ok(());
                        }
                        let l = line.trim_end_matches(['\r', '\n']);
                        if l == "." {
                            break;
                        }
                        text.push_str(l.strip_prefix('.').unwrap_or(l));
                        text.push('\n');
                    }
                    s.messages.lock().unwrap().push(Delivered {
                        mail_from: from.clone(),
                        rcpts: std::mem::take(&mut accepted),
                        text,
                    });
                    mail_from = None;
                    "250 2.0.0 queued\r\n".to_owned()
                }
                _ => "503 5.5.1 no valid recipients\r\n".to_owned(),
            }
        } else if upper == "QUIT" {
            // The session ends here for the count: the client may start
            // its next one as soon as it reads the 221, before this
            // thread gets to count down (a CI run saw "3 sessions at
            // once" with two allowed).
            if counted.swap(false, Ordering::SeqCst) {
                s.open.fetch_sub(1, Ordering::SeqCst);
            }
            out.write_all(b"221 2.0.0 bye\r\n")?;
            return Ok(());
        } else {
            "502 5.5.2 not here\r\n".to_owned()
        };
        out.write_all(reply.as_bytes())?;
    }
}
