//! A one-message-per-connection SMTP client that records every reply, so a
//! test can assert what Postfix (and the milter behind it) answered to each
//! command.

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

/// One SMTP reply: the code and the text after it (multi-line replies
/// joined with `\n`), e.g. 550 / `5.1.1 <x@example.com>: Recipient address
/// rejected: …`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// 0 when the connection failed or closed instead of a reply; `text`
    /// then says why.
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The enhanced status code (RFC 3463) at the start of the text, if any.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.text.split_whitespace().next()?;
        let parts: Vec<&str> = first.split('.').collect();
        let valid = parts.len() == 3 && parts.iter().all(|p| p.parse::<u16>().is_ok());
        valid.then_some(first)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// Every command a client sent and the reply it got, in order. The first
/// entry is the greeting (command `CONNECT`).
#[derive(Clone, Debug)]
pub struct SmtpTranscript {
    pub server: SocketAddr,
    pub steps: Vec<(String, Reply)>,
}

impl SmtpTranscript {
    /// The reply to the first command that starts with `prefix` (`EHLO`,
    /// `MAIL`, `DATA`, …).
    pub fn reply(&self, prefix: &str) -> Option<&Reply> {
        self.steps
            .iter()
            .find(|(command, _)| command.starts_with(prefix))
            .map(|(_, reply)| reply)
    }

    pub fn greeting(&self) -> &Reply {
        &self.steps[0].1
    }

    /// The reply to MAIL FROM. Panics (with the transcript) when MAIL was
    /// not sent.
    pub fn mail(&self) -> &Reply {
        self.reply("MAIL FROM:")
            .unwrap_or_else(|| panic!("MAIL was not sent:\n{self}"))
    }

    /// The reply to the RCPT for `address` (without angle brackets).
    /// Panics (with the transcript) when there was no such RCPT.
    pub fn rcpt(&self, address: &str) -> &Reply {
        self.rcpts()
            .into_iter()
            .find(|(a, _)| *a == address)
            .map(|(_, reply)| reply)
            .unwrap_or_else(|| panic!("no RCPT for {address}:\n{self}"))
    }

    /// (address, reply) for each RCPT sent.
    pub fn rcpts(&self) -> Vec<(&str, &Reply)> {
        self.steps
            .iter()
            .filter_map(|(command, reply)| {
                let arg = command.strip_prefix("RCPT TO:")?;
                let address = arg.split_whitespace().next().unwrap_or("");
                Some((address.trim_start_matches('<').trim_end_matches('>'), reply))
            })
            .collect()
    }

    /// The reply to the end of the message data (the final `.`): whether
    /// the server took the message. None when DATA was never completed.
    pub fn end_of_data(&self) -> Option<&Reply> {
        self.reply(".")
    }

    /// True when the server took the message (2xx after the final `.`).
    pub fn accepted(&self) -> bool {
        self.end_of_data()
            .is_some_and(|r| (200..300).contains(&r.code))
    }

    /// The queue id from Postfix's `250 2.0.0 Ok: queued as ID`.
    pub fn queue_id(&self) -> Option<String> {
        let text = &self.end_of_data()?.text;
        let id = text.split("queued as ").nth(1)?.split_whitespace().next()?;
        Some(id.to_owned())
    }
}

impl fmt::Display for SmtpTranscript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "SMTP transcript with {}:", self.server)?;
        for (command, reply) in &self.steps {
            writeln!(f, "  C: {command}")?;
            for (i, line) in reply.text.split('\n').enumerate() {
                let sep = if i == 0 { ' ' } else { '+' };
                writeln!(f, "  S:{sep}{} {line}", reply.code)?;
            }
        }
        Ok(())
    }
}

/// A one-message-per-connection SMTP client, without pipelining, that
/// records every reply.
#[derive(Clone, Debug)]
pub struct SmtpClient {
    server: SocketAddr,
    local: Option<IpAddr>,
    helo: String,
}

impl SmtpClient {
    pub fn new(server: SocketAddr) -> SmtpClient {
        SmtpClient {
            server,
            local: None,
            helo: "client.dualroute-test.invalid".to_owned(),
        }
    }

    /// Connects from this local address, e.g. [`super::OUTSIDE_IP`].
    pub fn bind(mut self, ip: IpAddr) -> SmtpClient {
        self.local = Some(ip);
        self
    }

    /// The EHLO argument.
    pub fn helo(mut self, name: &str) -> SmtpClient {
        self.helo = name.to_owned();
        self
    }

    /// Sends one message and returns the transcript. `from` and each of
    /// `rcpts` are an address optionally followed by ESMTP parameters
    /// (`bob@example.com NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.com`);
    /// the address gets angle brackets unless it already starts with `<`
    /// (so `<>` and `<@a,@b:x@y>` go out as written); an empty `from` is
    /// `<>`. `message` is the header and body; line ends become CRLF and
    /// lines starting with `.` are dot-stuffed.
    ///
    /// The conversation stops, like a real client's, at a negative reply
    /// to the greeting, EHLO or MAIL; DATA is sent only when a RCPT was
    /// accepted. A closed connection ends it with a reply of code 0.
    /// Panics only when it cannot connect.
    pub fn send(&self, from: &str, rcpts: &[&str], message: &str) -> SmtpTranscript {
        let stream = self.connect();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set a read timeout");
        let mut session = Session {
            reader: BufReader::new(stream.try_clone().expect("clone a TcpStream")),
            writer: stream,
            transcript: SmtpTranscript {
                server: self.server,
                steps: Vec::new(),
            },
        };
        session.run(&self.helo, from, rcpts, message);
        session.transcript
    }

    fn connect(&self) -> TcpStream {
        let result = match self.local {
            None => TcpStream::connect_timeout(&self.server, Duration::from_secs(10)),
            Some(local) => connect_from(local, self.server),
        };
        result.unwrap_or_else(|e| {
            let from = self.local.map(|l| format!(" from {l}")).unwrap_or_default();
            panic!("cannot connect to {}{from}: {e}", self.server)
        })
    }
}

/// Shorthand for `SmtpClient::new(server).send(from, rcpts, message)`.
pub fn send(server: SocketAddr, from: &str, rcpts: &[&str], message: &str) -> SmtpTranscript {
    SmtpClient::new(server).send(from, rcpts, message)
}

/// std cannot bind a socket before connecting; tokio (a dependency of the
/// crate anyway) can. The stream goes back to blocking std afterwards.
fn connect_from(local: IpAddr, server: SocketAddr) -> io::Result<TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let stream = runtime.block_on(async {
        let socket = match local {
            IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(local, 0))?;
        let connect = socket.connect(server);
        let stream = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.into_std()
    })?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    transcript: SmtpTranscript,
}

impl Session {
    fn run(&mut self, helo: &str, from: &str, rcpts: &[&str], message: &str) {
        if !self.step("CONNECT", None) {
            return self.quit();
        }
        if !self.command(&format!("EHLO {helo}")) {
            return self.quit();
        }
        if !self.command(&format!("MAIL FROM:{}", envelope_arg(from))) {
            return self.quit();
        }
        let mut any_accepted = false;
        for rcpt in rcpts {
            any_accepted |= self.command(&format!("RCPT TO:{}", envelope_arg(rcpt)));
            if self.closed() {
                return;
            }
        }
        if !any_accepted || !self.command("DATA") {
            return self.quit();
        }
        let data = dot_stuff(message);
        self.step(".", Some(data.as_bytes()));
        self.quit();
    }

    /// Sends `command` and records the reply; true when it is positive.
    fn command(&mut self, command: &str) -> bool {
        let line = format!("{command}\r\n");
        self.step(command, Some(line.as_bytes()))
    }

    fn step(&mut self, name: &str, send: Option<&[u8]>) -> bool {
        let reply = match send.map(|bytes| self.writer.write_all(bytes)) {
            Some(Err(e)) => Reply {
                code: 0,
                text: format!("write failed: {e}"),
            },
            _ => read_reply(&mut self.reader),
        };
        let positive = reply.is_positive();
        self.transcript.steps.push((name.to_owned(), reply));
        positive
    }

    fn closed(&self) -> bool {
        self.transcript
            .steps
            .last()
            .is_some_and(|(_, reply)| reply.code == 0 || reply.code == 421)
    }

    fn quit(&mut self) {
        if !self.closed() {
            self.command("QUIT");
        }
    }
}

fn read_reply(reader: &mut impl BufRead) -> Reply {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => {
                lines.push("connection closed by the server".to_owned());
                return Reply {
                    code: 0,
                    text: lines.join("\n"),
                };
            }
            Err(e) => {
                lines.push(format!("read failed: {e}"));
                return Reply {
                    code: 0,
                    text: lines.join("\n"),
                };
            }
            Ok(_) => {}
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        lines.push(line.get(4..).unwrap_or("").to_owned());
        if line.as_bytes().get(3) != Some(&b'-') {
            return Reply {
                code,
                text: lines.join("\n"),
            };
        }
    }
}

/// `addr PARAMS` → `<addr> PARAMS`; `<…>…` and `…>` as they are (odd
/// forms a test sends on purpose); empty → `<>`.
fn envelope_arg(arg: &str) -> String {
    let arg = arg.trim();
    if arg.starts_with('<') || arg.ends_with('>') {
        return arg.to_owned();
    }
    match arg.split_once(char::is_whitespace) {
        Some((address, params)) => format!("<{address}> {}", params.trim()),
        None => format!("<{arg}>"),
    }
}

/// CRLF line ends, dot-stuffing (RFC 5321 §4.5.2) and the final `.`.
fn dot_stuff(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 16);
    for line in message.lines() {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(".\r\n");
    out
}
