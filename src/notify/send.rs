//! The two ways a notification reaches the local MTA: SMTP on a
//! connection this process opens itself (`via: smtp:HOST:PORT`), and the
//! `sendmail` command (`via: sendmail`).
//!
//! SMTP is lettre's client (`AsyncSmtpConnection`: reply parsing, EHLO,
//! the command syntax, dot-stuffing and the end of DATA), on a socket
//! connected here, because the milter must know the socket's local
//! address before the MTA asks it about the session: the mark
//! ([`Outbox::own`]) is set between `connect` and the greeting, then the
//! stream is handed to lettre (`connect_with_transport`). The transaction
//! is driven here with lettre's commands rather than with its `send`,
//! because `send` gives up at the first refused recipient (in lettre
//! 0.11.19, `async_connection.rs`: every RCPT goes through `try_smtp!`,
//! which aborts), while a notification goes to the recipients that were
//! accepted and the refused ones are logged. lettre sets no timeout on a
//! stream it did not connect itself, so every step has one here.
//!
//! The `sendmail` command stays hand-written (40 lines of
//! `tokio::process`): lettre's `AsyncSendmailTransport` (0.11.19,
//! `transport/sendmail/mod.rs`) writes the message with CRLF line ends,
//! where sendmail(1) reads local text with LF (Postfix repairs it only by
//! `sendmail_fix_line_endings`), and its error keeps only the command's
//! standard error, not its path or exit status, which the log line needs
//! for the administrator to act.

use super::outbox::Outbox;
use super::STEP_TIMEOUT;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailParameter};
use lettre::Message;
use std::future::Future;
use std::net::SocketAddr;
use tokio::io::AsyncWriteExt;

/// Sends `message` by SMTP to `host:port`, `helo` the name in EHLO. The
/// whole conversation is bounded, not only each step: a server that
/// trickles replies must not hold the notifier for ever.
pub(super) async fn smtp(
    outbox: &Outbox,
    host: &str,
    port: u16,
    helo: &str,
    message: &Message,
) -> Result<(), String> {
    tokio::time::timeout(STEP_TIMEOUT * 8, connect(outbox, host, port, helo, message))
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

async fn connect(
    outbox: &Outbox,
    host: &str,
    port: u16,
    helo: &str,
    message: &Message,
) -> Result<(), String> {
    let t = STEP_TIMEOUT;
    let addrs: Vec<SocketAddr> = tokio::time::timeout(t, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| format!("looking up {host}: timed out"))?
        .map_err(|e| format!("looking up {host}: {e}"))?
        .collect();
    let mut last = format!("{host} has no address");
    for addr in addrs {
        let stream = match tokio::time::timeout(t, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                last = format!("connect to {addr}: {e}");
                continue;
            }
            Err(_) => {
                last = format!("connect to {addr}: timed out");
                continue;
            }
        };
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        // Marked before the greeting is read, so before MAIL: the milter
        // looks at MAIL time.
        let _own = outbox.own(local);
        return converse(stream, helo, message).await;
    }
    Err(last)
}

/// One step of the conversation within [`STEP_TIMEOUT`], its error named
/// after the step.
async fn step<T>(
    what: &str,
    f: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(STEP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out")),
    }
}

async fn converse(
    stream: tokio::net::TcpStream,
    helo: &str,
    message: &Message,
) -> Result<(), String> {
    let hello = ClientId::Domain(helo.to_owned());
    // The greeting and EHLO are one call in lettre: one step each.
    let mut conn = match tokio::time::timeout(
        STEP_TIMEOUT * 2,
        AsyncSmtpConnection::connect_with_transport(Box::new(stream), &hello),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("greeting or EHLO: {e}")),
        Err(_) => return Err("greeting or EHLO: timed out".into()),
    };
    let envelope = message.envelope();
    let mut params = Vec::new();
    // RFC 6531 §3.4, as lettre's own `send` does: a non-ASCII address
    // needs SMTPUTF8, and without it the server must not be sent one.
    let non_ascii = envelope.from().into_iter().chain(envelope.to());
    if non_ascii.map(|a| a.as_ref()).any(|a: &str| !a.is_ascii()) {
        if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
            conn.abort().await;
            return Err("a non-ASCII address, and the server has no SMTPUTF8".into());
        }
        params.push(MailParameter::SmtpUtfEight);
    }
    let from = envelope.from().cloned();
    let shown = from.as_ref().map(|a| a.to_string()).unwrap_or_default();
    if let Err(e) = step(
        &format!("MAIL FROM:<{shown}>"),
        conn.command(Mail::new(from, params)),
    )
    .await
    {
        quit(&mut conn).await;
        return Err(e);
    }
    let mut accepted = 0;
    let mut refused = Vec::new();
    for rcpt in envelope.to() {
        let what = format!("RCPT TO:<{rcpt}>");
        match tokio::time::timeout(STEP_TIMEOUT, conn.command(Rcpt::new(rcpt.clone(), vec![])))
            .await
        {
            Ok(Ok(_)) => accepted += 1,
            // A reply: this recipient is refused, the others may be taken.
            Ok(Err(e)) if e.status().is_some() => refused.push(format!("{what}: {e}")),
            Ok(Err(e)) => return Err(format!("{what}: {e}")),
            Err(_) => return Err(format!("{what}: timed out")),
        }
    }
    if accepted == 0 {
        quit(&mut conn).await;
        return Err(refused.join("; "));
    }
    let sent = match step("DATA", conn.command(Data)).await {
        Ok(_) => {
            // lettre ends the data with CRLF "." CRLF itself (RFC 5321
            // §4.1.1.4); the message's own last line end would add an
            // empty line.
            let data = message.formatted();
            let data = data.strip_suffix(b"\r\n").unwrap_or(&data);
            step("(message) .", conn.message(data)).await
        }
        Err(e) => Err(e),
    };
    quit(&mut conn).await;
    sent?;
    for r in refused {
        tracing::warn!("notification: a recipient was refused: {r}");
    }
    Ok(())
}

/// QUIT, as a courtesy: its reply changes nothing.
async fn quit(conn: &mut AsyncSmtpConnection) {
    let _ = tokio::time::timeout(STEP_TIMEOUT, conn.abort()).await;
}

/// `sendmail -i -f FROM -- TO...` (`-i`: a line with a single period is
/// text, not the end), the message on standard input with LF line ends.
pub(super) async fn sendmail(path: &std::path::Path, message: &Message) -> Result<(), String> {
    let shown = path.display();
    let envelope = message.envelope();
    let from = envelope.from().map(|a| a.to_string()).unwrap_or_default();
    let mut child = tokio::process::Command::new(path)
        .arg("-i")
        .arg("-f")
        .arg(from)
        .arg("--")
        .args(envelope.to().iter().map(|a| a.to_string()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("run {shown}: {e}"))?;
    let text = String::from_utf8_lossy(&message.formatted()).replace("\r\n", "\n");
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(text.as_bytes())
                .await
                .map_err(|e| format!("{shown}: writing the message: {e}"))?;
        }
        child
            .wait_with_output()
            .await
            .map_err(|e| format!("{shown}: {e}"))
    };
    let output = tokio::time::timeout(STEP_TIMEOUT, run)
        .await
        .map_err(|_| format!("{shown}: timed out"))??;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "{shown} exited with {}: {}",
            output.status,
            stderr.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{message, Event};
    use tokio::io::{AsyncBufReadExt, BufReader};

    /// What a scripted server saw: whether the notifier's mark was on its
    /// client when it greeted, the commands, and the data as it came.
    #[derive(Debug, Default)]
    struct Seen {
        peer: Option<SocketAddr>,
        marked: bool,
        commands: Vec<String>,
        data: String,
    }

    /// One SMTP session on 127.0.0.1 that refuses `RCPT TO:<refused...>`.
    async fn server(outbox: std::sync::Arc<Outbox>) -> (u16, tokio::task::JoinHandle<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            let mut seen = Seen {
                peer: Some(peer),
                marked: outbox.is_own_connection(peer),
                ..Seen::default()
            };
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(b"220 test ESMTP\r\n").await.unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply: &[u8] = if line.starts_with("EHLO") {
                    b"250-test\r\n250 PIPELINING\r\n"
                } else if line.starts_with("RCPT TO:<refused") {
                    b"550 5.1.1 no such user\r\n"
                } else if line == "DATA" {
                    b"354 go on\r\n"
                } else if line == "QUIT" {
                    b"221 bye\r\n"
                } else {
                    b"250 ok\r\n"
                };
                seen.commands.push(line.clone());
                write.write_all(reply).await.unwrap();
                if line == "DATA" {
                    while let Ok(Some(l)) = lines.next_line().await {
                        seen.data.push_str(&l);
                        seen.data.push('\n');
                        if l == "." {
                            break;
                        }
                    }
                    write.write_all(b"250 queued\r\n").await.unwrap();
                }
                if line == "QUIT" {
                    break;
                }
            }
            seen
        });
        (port, task)
    }

    fn message(to: &[&str]) -> Message {
        let to: Vec<String> = to.iter().map(|s| s.to_string()).collect();
        let reason = "a reason of two lines,\n.the second starts with a period".to_owned();
        let events = [(1, Event::ReloadRefused { reason })];
        message::render("mx.test", "dualroute@mx.test", &to, &events, 0, 5, None).unwrap()
    }

    #[tokio::test]
    async fn smtp_marks_its_connection_and_tolerates_a_refused_recipient() {
        let outbox = std::sync::Arc::new(Outbox::default());
        let (port, seen) = server(outbox.clone()).await;
        let m = message(&["refused@example.org", "admin@example.org"]);
        smtp(&outbox, "127.0.0.1", port, "mx.test", &m)
            .await
            .unwrap();
        let seen = seen.await.unwrap();
        assert!(seen.marked, "not marked as ours at the greeting");
        assert_eq!(
            seen.commands,
            [
                "EHLO mx.test",
                "MAIL FROM:<dualroute@mx.test>",
                "RCPT TO:<refused@example.org>",
                "RCPT TO:<admin@example.org>",
                "DATA",
                "QUIT"
            ]
        );
        // Dot-stuffed, and no empty line added before the end.
        assert!(seen.data.contains("\n..the second starts"), "{}", seen.data);
        assert!(
            seen.data.ends_with("(notify.interval).\n.\n"),
            "{}",
            seen.data
        );
        assert!(
            !outbox.is_own_connection(seen.peer.unwrap()),
            "a mark outlived its connection"
        );
    }

    #[tokio::test]
    async fn smtp_fails_when_every_recipient_is_refused() {
        let outbox = std::sync::Arc::new(Outbox::default());
        let (port, seen) = server(outbox.clone()).await;
        let m = message(&["refused@example.org"]);
        let e = smtp(&outbox, "127.0.0.1", port, "mx.test", &m)
            .await
            .unwrap_err();
        assert!(
            e.contains("RCPT TO:<refused@example.org>") && e.contains("no such user"),
            "{e}"
        );
        let seen = seen.await.unwrap();
        assert!(!seen.commands.contains(&"DATA".to_owned()), "{seen:?}");
        assert_eq!(seen.commands.last().map(String::as_str), Some("QUIT"));
    }
}
