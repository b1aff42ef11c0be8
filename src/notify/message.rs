//! The notification as an RFC 5322 message, built with lettre's message
//! builder (header encoding and folding, the Date and Message-ID syntax,
//! the MIME headers): one message for the events of one interval.
//!
//! What stays here is what lettre leaves to its caller or does otherwise:
//! the text is made 7-bit ([`ascii`]) and its lines are broken at
//! [`LINE`] characters, then handed to lettre as a `7bit` body as it is
//! (`Body::dangerous_pre_encoded`). lettre's own choice
//! (`Body::new_with_encoding(.., SevenBit)`, email-encoding 0.4.1
//! `body/chooser.rs`) takes a line of 76 characters or more as too long
//! for `7bit` and refused every notification in the unit tests below
//! (the texts have long lines: a log line, a reply); its automatic choice
//! would be quoted-printable, which turns a log line into `=`-broken
//! pieces that `grep` in a Maildir no longer finds. RFC 5322 §2.1.1
//! allows 998 characters, and the message stays plain text as before.

use super::{Event, QUEUE};
use crate::session::NOTIFY_TOKEN_HEADER;
use crate::state;
use lettre::message::header::{ContentTransferEncoding, ContentType, HeaderName, HeaderValue};
use lettre::message::{Body, Mailbox, SinglePart};
use lettre::{Address, Message};
use std::time::{Duration, SystemTime};

/// RFC 5322 §2.1.1: at most 998 characters a line; long log lines are
/// broken well before that.
const LINE: usize = 900;

/// The message from `from` to `to` about `events` (and `dropped` events
/// that found the queue full), dated `now`. With a `token` (the `sendmail`
/// command), [`NOTIFY_TOKEN_HEADER`] comes first: the milter honours it
/// once and deletes it (module documentation of `notify`).
pub(super) fn render(
    instance: &str,
    from: &str,
    to: &[String],
    events: &[(u64, Event)],
    dropped: usize,
    now: u64,
    token: Option<&str>,
) -> Result<Message, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let address = |a: &str| {
        a.parse::<Address>()
            .map_err(|e| format!("the address {a}: {e}"))
    };
    let sender = address(from)?;
    let recipients = to
        .iter()
        .map(|a| address(a))
        .collect::<Result<Vec<_>, _>>()?;
    let header = |name: &'static str, value: &str| {
        HeaderValue::new(HeaderName::new_from_ascii_str(name), ascii(value))
    };
    let mut builder = Message::builder();
    if let Some(token) = token {
        builder = builder.raw_header(header(NOTIFY_TOKEN_HEADER, token));
    }
    builder = builder.from(Mailbox::new(
        Some(ascii(&format!("dualroute on {instance}"))),
        sender.clone(),
    ));
    for r in &recipients {
        builder = builder.to(Mailbox::new(None, r.clone()));
    }
    let content_type = ContentType::parse("text/plain; charset=us-ascii")
        .map_err(|e| format!("Content-Type: {e}"))?;
    // 7-bit with lines of at most LINE by construction (module
    // documentation).
    let body = Body::dangerous_pre_encoded(
        text(instance, events, dropped).into_bytes(),
        ContentTransferEncoding::SevenBit,
    );
    builder
        .subject(ascii(&format!(
            "[dualroute {instance}] {}",
            subject(events, dropped)
        )))
        .date(SystemTime::UNIX_EPOCH + Duration::from_secs(now))
        .message_id(Some(format!(
            "<dualroute.{now}.{}.{}@{instance}>",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        )))
        // RFC 3834 §5: vacation responders stay quiet.
        .raw_header(header("Auto-Submitted", "auto-generated"))
        .raw_header(header("X-Dualroute-Notify", instance))
        .envelope(
            lettre::address::Envelope::new(Some(sender), recipients)
                .map_err(|e| format!("the envelope: {e}"))?,
        )
        .singlepart(SinglePart::builder().header(content_type).body(body))
        .map_err(|e| format!("the message: {e}"))
}

/// One event's subject, or the count and the first one's.
fn subject(events: &[(u64, Event)], dropped: usize) -> String {
    match events {
        [(_, e)] if dropped == 0 => e.subject(),
        [(_, e), ..] => format!("{} events: {}, ...", events.len() + dropped, e.subject()),
        [] => format!("{dropped} events"),
    }
}

/// The body: every event, what was dropped, and who sent it; 7-bit, lines
/// of at most [`LINE`] characters, CRLF line ends, none after the last
/// line (the end of DATA brings one).
fn text(instance: &str, events: &[(u64, Event)], dropped: usize) -> String {
    let mut body = String::new();
    for (at, e) in events {
        body.push_str(&format!(
            "== {}: {}\n\n{}\n",
            state::when(*at),
            e.subject(),
            e.body()
        ));
    }
    if dropped > 0 {
        body.push_str(&format!(
            "== {dropped} more event(s) were not queued (more than {QUEUE} waiting); the log of dualroute has them.\n"
        ));
    }
    body.push_str(&format!(
        "\n-- \ndualroute on {instance}; at most one such message per interval (notify.interval).\n"
    ));
    let mut lines = Vec::new();
    for line in body.lines() {
        let chars: Vec<char> = ascii(line).chars().collect();
        if chars.is_empty() {
            lines.push(String::new());
        }
        lines.extend(chars.chunks(LINE).map(|c| c.iter().collect::<String>()));
    }
    lines.join("\r\n")
}

/// 7-bit text: the message says `charset=us-ascii`, and a log line may
/// hold anything (a path, a reply text).
fn ascii(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii() && (!c.is_ascii_control() || c == '\t') {
                c
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{TripCause, Tripped};

    /// The message as it goes on the wire, header lines unfolded.
    fn wire(m: &Message) -> String {
        String::from_utf8(m.formatted())
            .unwrap()
            .replace("\r\n ", " ")
    }

    #[test]
    fn message_is_7bit_with_short_lines_and_headers() {
        let long = format!("x: to=<a@b>, status=deferred ({}) é", "y".repeat(2000));
        let trip = Tripped {
            since: 1_795_000_000,
            bounces: 0,
            deferrals: 11,
            cause: TripCause::Deferrals,
            window_secs: 3600,
            last: long.clone(),
            recent: vec![".dot".into(), long],
        };
        let events = vec![(
            1_795_000_000,
            Event::Tripped {
                domain: "example.com".into(),
                trip,
            },
        )];
        let m = render(
            "mx1.test",
            "dualroute@mx1.test",
            &["admin@example.org".into()],
            &events,
            0,
            1_795_000_000,
            None,
        )
        .unwrap();
        let raw = String::from_utf8(m.formatted()).unwrap();
        assert!(raw.is_ascii());
        assert!(raw.split("\r\n").all(|l| l.len() <= 998));
        let m = wire(&m);
        for h in [
            "From: \"dualroute on mx1.test\" <dualroute@mx1.test>\r\n",
            "To: admin@example.org\r\n",
            "Subject: [dualroute mx1.test] example.com: routing switched off: too many deferrals\r\n",
            "Auto-Submitted: auto-generated\r\n",
            "Date: Wed, 18 Nov 2026 11:06:40 +0000\r\n",
            "Content-Type: text/plain; charset=us-ascii\r\n",
            "Content-Transfer-Encoding: 7bit\r\n",
        ] {
            assert!(m.contains(h), "{h:?} missing:\n{m}");
        }
        assert!(!m.contains(NOTIFY_TOKEN_HEADER), "{m}");
        assert!(m.contains("  dualroute enable example.com\r\n"), "{m}");
        assert!(m.contains("11 temporary failures"), "{m}");
        // The long line arrives whole, broken into pieces of LINE.
        assert!(m.contains(&format!("{}\r\n", "y".repeat(LINE))), "{m}");
        assert!(m.contains(") ?\r\n"), "{m}");
    }

    #[test]
    fn the_token_header_comes_first() {
        let events = [(1, Event::ReloadRefused { reason: "x".into() })];
        let m = render(
            "i",
            "f@i.test",
            &["a@b.test".into()],
            &events,
            0,
            5,
            Some("00ff"),
        )
        .unwrap();
        let m = wire(&m);
        assert!(
            m.starts_with(&format!("{NOTIFY_TOKEN_HEADER}: 00ff\r\nFrom: ")),
            "{m}"
        );
    }

    #[test]
    fn several_events_and_dropped_ones_in_one_message() {
        let events = vec![
            (
                1,
                Event::ReloadRefused {
                    reason: "accounts emptied".into(),
                },
            ),
            (
                2,
                Event::VerificationPassed {
                    domain: "example.com".into(),
                    address: "p@x.test".into(),
                    detail: "ok".into(),
                },
            ),
        ];
        let m = render("i", "f@i.test", &["a@b.test".into()], &events, 3, 5, None).unwrap();
        let m = wire(&m);
        assert!(
            m.contains("Subject: [dualroute i] 5 events: reload refused"),
            "{m}"
        );
        assert!(
            m.contains("accounts emptied") && m.contains("routing for example.com is on"),
            "{m}"
        );
        assert!(m.contains("3 more event(s) were not queued"), "{m}");
    }
}
