//! The verification probe (docs/design.md §7): before routing starts, ask the
//! destination whether it accepts the `verify` address — EHLO, MAIL
//! FROM:<>, RCPT TO:<verify>, QUIT — and report every step. It never sends
//! a message: routing itself stays with the MTA.
//!
//! When the destination's `tls` level makes Postfix insist on TLS
//! (`encrypt`, `verify`, `secure`), the probe says STARTTLS after EHLO and
//! reports the certificate (src/probe/tls.rs); a host Postfix would not
//! deliver to is not accepted.

pub mod tls;

use crate::config::{Destination, DnsConfig, DomainConfig, Host};
use crate::dns::{Dns, Lookup};
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// One host to probe, and how it was found.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Target {
    pub addr: SocketAddr,
    /// e.g. `MX 10 mx1.example.net` or `[192.0.2.30]:2525`.
    pub via: String,
    /// The host's name (the MX host, or the next hop itself), as Postfix's
    /// `hostname` certificate match uses it.
    pub host: String,
    /// The next hop it was found from, as Postfix's `nexthop` match uses it.
    pub nexthop: String,
}

/// One SMTP exchange step.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Step {
    pub sent: Option<String>,
    pub code: u16,
    pub reply: String,
}

#[derive(Clone, Debug)]
pub struct HostReport {
    pub target: Target,
    pub steps: Vec<Step>,
    pub accepted: bool,
    pub error: Option<String>,
    /// The STARTTLS session, when the probe asked for one.
    pub tls: Option<tls::TlsReport>,
}

impl fmt::Display for HostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} ({}):", self.target.addr, self.target.via)?;
        for s in &self.steps {
            match &s.sent {
                Some(c) => writeln!(f, "  > {c}\n  < {}", s.reply)?,
                None => writeln!(f, "  < {}", s.reply)?,
            }
        }
        if let Some(t) = &self.tls {
            writeln!(f, "{t}")?;
        }
        if let Some(e) = &self.error {
            writeln!(f, "  ✘ {e}")?;
        }
        write!(
            f,
            "  {}",
            if self.accepted {
                "✔ accepted"
            } else {
                "✘ not accepted"
            }
        )
    }
}

/// Per-step timeout: RFC 5321 §4.5.3.2 allows minutes; a probe that waits
/// that long only delays routing, so it gives up sooner and retries later.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds the hosts of a destination, in the order the MTA would try them
/// (see [`host_targets`]).
pub async fn targets(destination: &Destination, dns: &impl Lookup) -> Result<Vec<Target>, String> {
    let hosts = destination.hosts();
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for h in &hosts {
        match host_targets(h, dns).await {
            Ok(t) => out.extend(t),
            Err(e) => errors.push(e),
        }
    }
    if out.is_empty() {
        Err(if errors.is_empty() {
            "no hosts".into()
        } else {
            errors.join("; ")
        })
    } else {
        Ok(out)
    }
}

/// The addresses of one next hop, in the order the MTA would try them: MX
/// records by preference for names (falling back to the address records
/// when there is no MX, RFC 5321 §5.1), address records only for `[name]`,
/// literals as they are. The error names every lookup that failed or
/// found nothing.
pub async fn host_targets(h: &Host, dns: &impl Lookup) -> Result<Vec<Target>, String> {
    let port = h.port.unwrap_or(25);
    if let Ok(ip) = h.name.parse::<IpAddr>() {
        return Ok(vec![Target {
            addr: SocketAddr::new(ip, port),
            via: h.to_string(),
            host: h.name.clone(),
            nexthop: h.name.clone(),
        }]);
    }
    let names: Vec<(String, String)> = if h.bracketed {
        vec![(h.name.clone(), h.to_string())]
    } else {
        match dns.mx(&h.name).await {
            Ok(mx) if !mx.is_empty() => mx
                .into_iter()
                .map(|(pref, n)| (n.clone(), format!("MX {pref} {n} of {}", h.name)))
                .collect(),
            Ok(_) => vec![(
                h.name.clone(),
                format!("{} (no MX: address records)", h.name),
            )],
            Err(e) => return Err(e.to_string()),
        }
    };
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (name, via) in names {
        match dns.ips(&name).await {
            Ok(ips) if ips.is_empty() => errors.push(format!("{name} has no address records")),
            Ok(ips) => out.extend(ips.into_iter().map(|ip| Target {
                addr: SocketAddr::new(ip, port),
                via: via.clone(),
                host: name.clone(),
                nexthop: h.name.clone(),
            })),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if out.is_empty() {
        Err(errors.join("; "))
    } else {
        Ok(out)
    }
}

/// Probes one host: EHLO, [STARTTLS, EHLO,] MAIL FROM:<>, RCPT TO:<rcpt>,
/// QUIT. With `send`, a short test message follows the accepted RCPT
/// (DATA).
pub async fn probe_host(
    target: Target,
    helo: &str,
    rcpt: &str,
    step_timeout: Duration,
    send: bool,
    tls: &tls::TlsCheck,
) -> HostReport {
    let mut report = HostReport {
        target,
        steps: Vec::new(),
        accepted: false,
        error: None,
        tls: None,
    };
    let probe = Probe {
        helo,
        rcpt,
        t: step_timeout,
        send,
    };
    if let Err(e) = probe.converse(&mut report, tls).await {
        report.error = Some(e);
    }
    report
}

/// One probe's fixed parts.
struct Probe<'a> {
    helo: &'a str,
    rcpt: &'a str,
    t: Duration,
    send: bool,
}

fn step(report: &mut HostReport, sent: Option<String>, (code, reply): (u16, String)) -> u16 {
    report.steps.push(Step { sent, code, reply });
    code
}

/// Whether an EHLO reply (lines joined by " / ") lists an extension.
fn offers(ehlo_reply: &str, extension: &str) -> bool {
    ehlo_reply.split(" / ").any(|line| {
        line.get(4..)
            .is_some_and(|k| k.split_whitespace().next() == Some(extension))
    })
}

impl Probe<'_> {
    async fn converse(&self, report: &mut HostReport, tls: &tls::TlsCheck) -> Result<(), String> {
        let t = self.t;
        let addr = report.target.addr;
        let stream = timeout(t, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect to {addr}: timed out"))?
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let mut conn = BufReader::new(stream);
        if step(report, None, reply(&mut conn, t, "greeting").await?) != 220 {
            return Err("no 220 greeting".into());
        }
        self.command(report, &mut conn, format!("EHLO {}", self.helo), 250)
            .await?;
        if !tls.wanted() {
            return self.transaction(report, &mut conn).await;
        }
        let level = tls.level.unwrap_or(crate::config::TlsLevel::Encrypt);
        let ehlo = report
            .steps
            .last()
            .map(|s| s.reply.clone())
            .unwrap_or_default();
        if !offers(&ehlo, "STARTTLS") {
            let _ = conn.write_all(b"QUIT\r\n").await;
            return Err(format!("the server does not offer STARTTLS, which tls {level} requires: Postfix would not deliver routed mail to it"));
        }
        self.command(report, &mut conn, "STARTTLS".into(), 220)
            .await?;
        // RFC 3207 §4.2: the client discards what it knew from before TLS
        // and the handshake starts right after the 220; nothing may be
        // buffered in between.
        if !conn.buffer().is_empty() {
            return Err(
                "the server sent data after its STARTTLS reply (RFC 3207 §4.2 forbids that)".into(),
            );
        }
        let config = tls::client_config()?;
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let name = tls::server_name(&report.target.host)?;
        let stream = timeout(t, connector.connect(name, conn.into_inner()))
            .await
            .map_err(|_| "TLS handshake: timed out".to_owned())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let verdict = tls::judge(
            tls,
            stream.get_ref().1,
            &report.target.host,
            &report.target.nexthop,
        );
        let problem = verdict.problem();
        report.tls = Some(verdict);
        let mut conn = BufReader::new(stream);
        if let Some(problem) = problem {
            let _ = conn.write_all(b"QUIT\r\n").await;
            return Err(problem);
        }
        self.command(report, &mut conn, format!("EHLO {}", self.helo), 250)
            .await?;
        self.transaction(report, &mut conn).await
    }

    /// Sends one command and reads its reply; an error unless the reply is
    /// of the class of `want`.
    async fn command<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        report: &mut HostReport,
        conn: &mut BufReader<S>,
        cmd: String,
        want: u16,
    ) -> Result<(), String> {
        conn.write_all(format!("{cmd}\r\n").as_bytes())
            .await
            .map_err(|e| format!("{cmd}: {e}"))?;
        let code = step(report, Some(cmd.clone()), reply(conn, self.t, &cmd).await?);
        if code / 100 != want / 100 {
            // RFC 5321 §4.1.1.10: the client SHOULD wait for the reply to
            // QUIT, even after an error reply. A callout ends here on
            // every 5xx to RCPT; waiting also means its turn among the
            // destination's concurrent callouts (src/callout/) ends when
            // the destination's session does.
            let _ = conn.write_all(b"QUIT\r\n").await;
            let _ = reply(conn, self.t, "QUIT").await;
            return Err(format!("{cmd} refused"));
        }
        Ok(())
    }

    /// MAIL FROM:<>, RCPT TO, [DATA,] QUIT.
    async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        report: &mut HostReport,
        conn: &mut BufReader<S>,
    ) -> Result<(), String> {
        let (helo, rcpt, t) = (self.helo, self.rcpt, self.t);
        self.command(report, conn, "MAIL FROM:<>".into(), 250)
            .await?;
        self.command(report, conn, format!("RCPT TO:<{rcpt}>"), 250)
            .await?;
        if self.send {
            conn.write_all(b"DATA\r\n")
                .await
                .map_err(|e| format!("DATA: {e}"))?;
            if step(report, Some("DATA".into()), reply(conn, t, "DATA").await?) != 354 {
                return Err("DATA refused".into());
            }
            let date = crate::state::rfc5322_date(crate::state::now());
            let message = format!(
                "From: <MAILER-DAEMON@{helo}>\r\nTo: <{rcpt}>\r\nSubject: dualroute verification test\r\nDate: {date}\r\nMessage-ID: <dualroute-verify-{}@{helo}>\r\n\r\nA test message from dualroute on {helo}: the destination accepts mail\r\nfor {rcpt}. Mail routed by dualroute will arrive like this one.\r\n.\r\n",
                crate::state::now()
            );
            conn.write_all(message.as_bytes())
                .await
                .map_err(|e| format!("message: {e}"))?;
            let code = step(
                report,
                Some("(message) .".into()),
                reply(conn, t, "(message) .").await?,
            );
            if code != 250 {
                return Err("the test message was refused".into());
            }
        }
        report.accepted = true;
        let _ = conn.write_all(b"QUIT\r\n").await;
        if let Ok(r) = reply(conn, t, "QUIT").await {
            step(report, Some("QUIT".into()), r);
        }
        Ok(())
    }
}

/// RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets, CRLF included.
pub const MAX_REPLY_LINE: usize = 512;

/// Continuation lines a reply may have. RFC 5321 sets no number; an EHLO
/// reply lists one extension a line, a few dozen at most. Past this the
/// server is not going to end its reply.
pub const MAX_REPLY_LINES: usize = 100;

/// Reads one (possibly multi-line) SMTP reply within `t` for the whole
/// reply, each line at most [`MAX_REPLY_LINE`] octets, at most
/// [`MAX_REPLY_LINES`] lines: a broken or hostile server ends the probe
/// with an error instead of holding it or filling memory.
/// Errors name the reply: `EHLO mx.example.com: …`.
pub(crate) async fn reply<R: tokio::io::AsyncBufRead + Unpin>(
    read: &mut R,
    t: Duration,
    to: &str,
) -> Result<(u16, String), String> {
    timeout(t, reply_lines(read))
        .await
        .unwrap_or_else(|_| Err("timed out waiting for a reply".to_owned()))
        .map_err(|e| format!("{to}: {e}"))
}

async fn reply_lines<R: tokio::io::AsyncBufRead + Unpin>(
    read: &mut R,
) -> Result<(u16, String), String> {
    let mut text = Vec::new();
    let mut raw = Vec::with_capacity(MAX_REPLY_LINE);
    loop {
        if text.len() == MAX_REPLY_LINES {
            return Err(format!(
                "the reply goes on past {MAX_REPLY_LINES} lines (last: {:?}): the server does not end it",
                text.last().map(String::as_str).unwrap_or_default()
            ));
        }
        raw.clear();
        let n = (&mut *read)
            .take(MAX_REPLY_LINE as u64)
            .read_until(b'\n', &mut raw)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        if raw.last() != Some(&b'\n') {
            if n < MAX_REPLY_LINE {
                return Err("connection closed in the middle of a reply line".into());
            }
            let start = String::from_utf8_lossy(&raw[..40]);
            return Err(format!(
                "a reply line longer than {MAX_REPLY_LINE} octets (starting {start:?}), more than RFC 5321 §4.5.3.1.5 allows"
            ));
        }
        let line = String::from_utf8_lossy(&raw).trim_end().to_owned();
        let code = line
            .get(..3)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("not an SMTP reply: {line:?}"))?;
        let more = line.as_bytes().get(3) == Some(&b'-');
        text.push(line);
        if !more {
            return Ok((code, text.join(" / ")));
        }
    }
}

/// Probes the destination's hosts in order until one accepts; names are
/// looked up with the name servers of `dns:`. STARTTLS when the
/// destination's `tls` level requires TLS.
pub async fn verify(
    d: &DomainConfig,
    dns: &DnsConfig,
    helo: &str,
    rcpt: &str,
    step_timeout: Duration,
    send: bool,
) -> Result<Vec<HostReport>, String> {
    let dns = Dns::new(dns).map_err(|e| e.to_string())?;
    verify_with(d, &dns, helo, rcpt, step_timeout, send).await
}

/// [`verify`] with a resolver the caller keeps (the running service builds
/// one for all its probes instead of reading resolv.conf for each).
pub async fn verify_with(
    d: &DomainConfig,
    dns: &Dns,
    helo: &str,
    rcpt: &str,
    step_timeout: Duration,
    send: bool,
) -> Result<Vec<HostReport>, String> {
    let check = tls::TlsCheck {
        level: d.transport.tls,
        matches: d.transport.tls_match.clone(),
    };
    let mut reports = Vec::new();
    for target in targets(&d.destination, dns).await? {
        let r = probe_host(target, helo, rcpt, step_timeout, send, &check).await;
        let done = r.accepted;
        reports.push(r);
        if done {
            break;
        }
    }
    Ok(reports)
}
