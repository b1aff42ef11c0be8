//! A destination for recipient callouts (tests/callout.rs): an SMTP server
//! on loopback that knows some addresses, refuses the others `550 5.1.1`,
//! or answers every RCPT `450` or `250` (a catch-all), optionally after a
//! pause; it records every RCPT and how many sessions were open at once.
//! Unlike `smtp-sink` (tests/support/sink.rs) it answers per address and
//! never takes a message: a callout never sends one.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

struct Shared {
    known: HashSet<String>,
    mode: Mutex<Mode>,
    delay: Mutex<Duration>,
    rcpts: Mutex<Vec<String>>,
    open: AtomicUsize,
    most_open: AtomicUsize,
    stop: AtomicBool,
}

/// The running stub; it stops accepting when dropped.
pub struct CalloutStub {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl CalloutStub {
    /// A stub that knows `known` (compared lowercased).
    pub fn start(known: &[&str], mode: Mode) -> CalloutStub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the callout stub on loopback");
        let addr = listener.local_addr().expect("the stub's address");
        let shared = Arc::new(Shared {
            known: known.iter().map(|a| a.to_lowercase()).collect(),
            mode: Mutex::new(mode),
            delay: Mutex::new(Duration::ZERO),
            rcpts: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            most_open: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || session(conn, &s));
            }
        });
        CalloutStub { addr, shared }
    }

    /// `[127.0.0.1]:PORT`, as `destination.hosts` takes it.
    pub fn host(&self) -> String {
        format!("[127.0.0.1]:{}", self.addr.port())
    }

    /// Answers RCPT only after `d` from now on.
    pub fn set_delay(&self, d: Duration) {
        *self.shared.delay.lock().unwrap() = d;
    }

    pub fn set_mode(&self, m: Mode) {
        *self.shared.mode.lock().unwrap() = m;
    }

    /// Every RCPT address received, in order.
    pub fn rcpts(&self) -> Vec<String> {
        self.shared.rcpts.lock().unwrap().clone()
    }

    /// How many RCPTs named `address`.
    pub fn asked(&self, address: &str) -> usize {
        self.rcpts()
            .iter()
            .filter(|a| a.as_str() == address)
            .count()
    }

    /// The most sessions that were open at once.
    pub fn most_open(&self) -> usize {
        self.shared.most_open.load(Ordering::SeqCst)
    }
}

impl Drop for CalloutStub {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn session(conn: TcpStream, s: &Shared) {
    let now = s.open.fetch_add(1, Ordering::SeqCst) + 1;
    s.most_open.fetch_max(now, Ordering::SeqCst);
    let _ = converse(conn, s);
    s.open.fetch_sub(1, Ordering::SeqCst);
}

fn converse(conn: TcpStream, s: &Shared) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut lines = BufReader::new(conn);
    out.write_all(b"220 stub.test ESMTP callout stub\r\n")?;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end();
        let upper = cmd.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            "250-stub.test\r\n250 8BITMIME\r\n".to_owned()
        } else if upper.starts_with("MAIL FROM:") || upper == "RSET" {
            "250 2.1.0 ok\r\n".to_owned()
        } else if upper.starts_with("RCPT TO:<") {
            let address = cmd[9..].trim_end_matches('>').to_lowercase();
            s.rcpts.lock().unwrap().push(address.clone());
            let delay = *s.delay.lock().unwrap();
            std::thread::sleep(delay);
            let mode = *s.mode.lock().unwrap();
            match mode {
                Mode::TempFail => "450 4.2.1 try again later\r\n".to_owned(),
                Mode::AcceptAll => "250 2.1.5 ok\r\n".to_owned(),
                Mode::Directory if s.known.contains(&address) => "250 2.1.5 ok\r\n".to_owned(),
                Mode::Directory => format!("550 5.1.1 <{address}>: user unknown\r\n"),
            }
        } else if upper == "QUIT" {
            out.write_all(b"221 2.0.0 bye\r\n")?;
            return Ok(());
        } else {
            "502 5.5.2 not here\r\n".to_owned()
        };
        out.write_all(reply.as_bytes())?;
    }
}
