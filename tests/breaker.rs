//! The bounce breaker (docs/design.md §7, src/breaker/):
//! - the parser on real Postfix and Sendmail delivery lines;
//! - attribution of routing addresses to their domain;
//! - the sliding window;
//! - the log follower on a temporary file: start at the end, rotation by
//!   rename and by copytruncate, a file that appears later;
//! - the breaker task on a temporary maillog: trips at the threshold,
//!   persists, holds the domain at once, counts anew after `enable`;
//! - end to end: the real `dualroute run` in front of a private Postfix
//!   whose destination refuses everything (needs root and Postfix,
//!   scripts/test-deps.sh).

mod support;

use dualroute::breaker::{parse_line, Attribution, FailureKind, Follower, Window};
use dualroute::policy::Policy;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{dualroute, postfix_config, MilterProcess};

// ---------------------------------------------------------------------
// Lines as Postfix 3.7 and Sendmail 8.17 write them.
// ---------------------------------------------------------------------

const POSTFIX_BOUNCED: &str = "Jan 12 10:00:01 mx postfix/smtp[1234]: 4Bc1xY2z3Kz9t: to=<zed@example.com.dualroute.invalid>, orig_to=<zed@example.com>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.05, delays=0.01/0.01/0.02/0.01, dsn=5.1.1, status=bounced (host 127.0.0.1[127.0.0.1] said: 550 5.1.1 Error: recipient rejected, dsn=2.0.0, status=sent (in reply to RCPT TO command))";
const POSTFIX_DEFERRED: &str = "Jan 12 10:00:02 mx postfix/smtp[1234]: 4Bc1xY2z3Kz9t: to=<zed@example.com.dualroute.invalid>, orig_to=<zed@example.com>, relay=none, delay=30, delays=0.01/0/30/0, dsn=4.4.1, status=deferred (connect to 127.0.0.1[127.0.0.1]:2525: Connection refused)";
const POSTFIX_SOFT_BOUNCE: &str = "Jan 12 10:00:02 mx postfix/smtp[1234]: 4Bc1xY2z3Kz9t: to=<zed@example.com.dualroute.invalid>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.1, delays=0.01/0.01/0.02/0.06, dsn=4.1.1, status=deferred (host 127.0.0.1[127.0.0.1] said: 550 5.1.1 unknown (in reply to RCPT TO command))";
const POSTFIX_SENT: &str = "Jan 12 10:00:03 mx postfix/smtp[1234]: 4Bc1xY2z3Kz9t: to=<zed@example.com.dualroute.invalid>, orig_to=<zed@example.com>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.05, delays=0.01/0.01/0.02/0.01, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 7A1B2C3D)";
const POSTFIX_NOQUEUE: &str = "Jan 12 10:00:04 mx postfix/smtpd[99]: NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 550 5.1.1 <zed@example.com.dualroute.invalid>: Recipient address rejected: dsn=5.1.1, status=bounced; from=<s@outside.test> to=<zed@example.com.dualroute.invalid> proto=ESMTP helo=<x>";
const POSTFIX_ISO_BOUNCED: &str = "2025-01-12T10:00:01.123456+00:00 mx postfix/dualroute/smtp[77]: 4Bc1xY2z3Kz9u: to=<bob+news@example.com.dualroute.invalid>, relay=none, delay=0.01, delays=0/0/0.01/0, dsn=5.4.4, status=bounced (Host or domain name not found. Name service error for name=legacy.example.net type=MX: Host not found)";
const SENDMAIL_BOUNCED: &str = "Jan 12 10:00:05 mx sm-mta[4242]: 40CA05ab004242: to=<zed@example.com.dualroute.invalid>, delay=00:00:01, xdelay=00:00:01, mailer=esmtp, pri=120456, relay=mx.legacy.example.net. [192.0.2.30], dsn=5.1.1, stat=User unknown";
const SENDMAIL_TWO: &str = "Jan 12 10:00:05 mx sendmail[4242]: 40CA05ab004243: to=zed@example.com.dualroute.invalid,<yan@example.com.dualroute.invalid>, delay=00:00:01, xdelay=00:00:01, mailer=esmtp, pri=150456, relay=mx.legacy.example.net. [192.0.2.30], dsn=5.0.0, stat=Service unavailable";
const SENDMAIL_DEFERRED: &str = "Jan 12 10:00:06 mx sm-mta[4242]: 40CA05ab004242: to=<zed@example.com.dualroute.invalid>, delay=00:00:01, xdelay=00:00:01, mailer=esmtp, pri=120456, relay=mx.legacy.example.net., dsn=4.0.0, stat=Deferred: Connection refused by mx.legacy.example.net.";
const SENDMAIL_SENT: &str = "Jan 12 10:00:07 mx sm-mta[4242]: 40CA05ab004242: to=<zed@example.com.dualroute.invalid>, delay=00:00:01, xdelay=00:00:01, mailer=esmtp, pri=120456, relay=mx.legacy.example.net. [192.0.2.30], dsn=2.0.0, stat=Sent (OK id=1abc)";
/// Throttling of a new sender, as Google and Microsoft answer it (the
/// reply texts are theirs; the line is Postfix's).
const POSTFIX_GOOGLE_421: &str = "Jan 12 10:00:08 mx postfix/smtp[1234]: 4Bc1xY2z3Kz9v: to=<zed@example.com.dualroute.invalid>, relay=aspmx.l.google.com[192.0.2.40]:25, delay=1.2, delays=0.01/0/0.6/0.6, dsn=4.7.28, status=deferred (host aspmx.l.google.com[192.0.2.40] said: 421-4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from your IP address. (in reply to end of DATA command))";
const POSTFIX_MICROSOFT_451: &str = "Jan 12 10:00:09 mx postfix/smtp[1234]: 4Bc1xY2z3Kz9w: to=<zed@example.com.dualroute.invalid>, relay=example-com.mail.protection.outlook.com[192.0.2.41]:25, delay=0.9, delays=0.01/0/0.4/0.5, dsn=4.7.500, status=deferred (host example-com.mail.protection.outlook.com[192.0.2.41] said: 451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719) (in reply to RCPT TO command))";
/// Sendmail says "User unknown" for any 550 at RCPT (its EX_NOUSER); the
/// dsn is the destination's own enhanced code, here a relay refusal (the
/// line Sendmail 8.17.1.9 wrote in tests/sendmail_e2e.rs, with `reply=`).
const SENDMAIL_RELAY_DENIED: &str = "Jan 12 10:00:05 mx sendmail[16753]: 6B50TW6M016751: to=<zed@example.com.dualroute.invalid>, delay=00:00:00, xdelay=00:00:00, mailer=esmtp, pri=30091, relay=[127.0.0.1] [127.0.0.1], dsn=5.7.1, reply=550 5.7.1 Relay access denied, stat=User unknown";
const SENDMAIL_DSN_LINE: &str =
    "Jan 12 10:00:05 mx sm-mta[4242]: 40CA05ab004242: 40CA05ab004244: DSN: User unknown";

#[test]
fn postfix_bounced_is_a_failure_with_its_recipient_and_dsn() {
    let f = parse_line(POSTFIX_BOUNCED).expect("a Postfix bounce");
    assert_eq!(f.recipients, ["zed@example.com.dualroute.invalid"]);
    // The first dsn= field, not the one inside the reply text.
    assert_eq!(f.dsn, "5.1.1");
    assert_eq!(f.line, POSTFIX_BOUNCED);
    // RFC 5424 time stamps and a syslog_name with a slash.
    let f = parse_line(POSTFIX_ISO_BOUNCED).expect("a Postfix bounce");
    assert_eq!(f.recipients, ["bob+news@example.com.dualroute.invalid"]);
    assert_eq!(f.dsn, "5.4.4");
    // A trailing newline (as read from the file) changes nothing.
    assert_eq!(
        parse_line(&format!("{POSTFIX_BOUNCED}\n")).map(|f| f.line),
        Some(POSTFIX_BOUNCED.to_owned())
    );
}

#[test]
fn postfix_sent_and_refused_are_not_failures() {
    for line in [POSTFIX_SENT, POSTFIX_NOQUEUE] {
        assert_eq!(parse_line(line), None, "{line}");
    }
    assert_eq!(
        parse_line(POSTFIX_BOUNCED).map(|f| f.kind),
        Some(FailureKind::Bounce)
    );
    // status=bounced with a dsn that is not 5.x.x is not trusted either.
    let odd = POSTFIX_BOUNCED.replace("dsn=5.1.1", "dsn=4.1.1");
    assert_eq!(parse_line(&odd), None);
    let odd = POSTFIX_BOUNCED.replace("dsn=5.1.1", "dsn=5.x.1");
    assert_eq!(parse_line(&odd), None);
}

#[test]
fn deferrals_are_temporary_failures_with_their_queue_id() {
    for (line, dsn, qid) in [
        (POSTFIX_DEFERRED, "4.4.1", "4Bc1xY2z3Kz9t"),
        (POSTFIX_GOOGLE_421, "4.7.28", "4Bc1xY2z3Kz9v"),
        (POSTFIX_MICROSOFT_451, "4.7.500", "4Bc1xY2z3Kz9w"),
        (SENDMAIL_DEFERRED, "4.0.0", "40CA05ab004242"),
    ] {
        let f = parse_line(line).unwrap_or_else(|| panic!("a deferral: {line}"));
        assert_eq!(f.kind, FailureKind::Deferral, "{line}");
        assert_eq!((f.dsn.as_str(), f.queue_id.as_str()), (dsn, qid));
        assert_eq!(f.recipients, ["zed@example.com.dualroute.invalid"]);
    }
    // `status=deferred` with a 5.x.x dsn, or `deferred` with a 2.x.x one,
    // is not trusted.
    for odd in [
        POSTFIX_DEFERRED.replace("dsn=4.4.1", "dsn=5.4.1"),
        POSTFIX_DEFERRED.replace("dsn=4.4.1", "dsn=2.0.0"),
    ] {
        assert_eq!(parse_line(&odd), None, "{odd}");
    }
}

/// `soft_bounce = yes` (a common safety net during a migration): Postfix
/// logs the destination's 550 as deferred with a 4.x.x dsn and keeps the
/// mail. The destination refused it for good: a bounce for the breaker,
/// not a deferral.
#[test]
fn soft_bounced_refusals_are_bounces() {
    let f = parse_line(POSTFIX_SOFT_BOUNCE).expect("a soft-bounced refusal");
    assert_eq!((f.kind, f.dsn.as_str()), (FailureKind::Bounce, "4.1.1"));
    let sendmail = SENDMAIL_DEFERRED.replace(
        "stat=Deferred: Connection refused by mx.legacy.example.net.",
        "stat=Deferred: 550 5.1.1 <zed@example.com.dualroute.invalid>... User unknown",
    );
    assert_eq!(
        parse_line(&sendmail).map(|f| f.kind),
        Some(FailureKind::Bounce)
    );
}

#[test]
fn sendmail_permanent_failures_only() {
    let f = parse_line(SENDMAIL_BOUNCED).expect("a Sendmail failure");
    assert_eq!(f.recipients, ["zed@example.com.dualroute.invalid"]);
    assert_eq!(f.dsn, "5.1.1");
    // Several recipients in one to=, with and without brackets.
    let f = parse_line(SENDMAIL_TWO).expect("a Sendmail failure");
    assert_eq!(
        f.recipients,
        [
            "zed@example.com.dualroute.invalid",
            "yan@example.com.dualroute.invalid"
        ]
    );
    assert_eq!(f.dsn, "5.0.0");
    for line in [SENDMAIL_SENT, SENDMAIL_DSN_LINE] {
        assert_eq!(parse_line(line), None, "{line}");
    }
    assert_eq!(
        parse_line(SENDMAIL_DEFERRED).map(|f| f.kind),
        Some(FailureKind::Deferral)
    );
}

/// docs/design.md §7, "What the breaker counts": the permanent failures
/// that say the destination has no such mailbox (about the address, not
/// counted unless the destination must know it) against the rest.
#[test]
fn unknown_mailbox_answers_are_told_apart() {
    let postfix = |dsn: &str, text: &str| {
        format!("Jan 12 10:00:01 mx postfix/smtp[1234]: 4Bc1xY2z3Kz9t: to=<zed@example.com.dualroute.invalid>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.05, delays=0.01/0.01/0.02/0.01, dsn={dsn}, status=bounced ({text})")
    };
    let said = |reply: &str| {
        format!("host 127.0.0.1[127.0.0.1] said: {reply} (in reply to RCPT TO command)")
    };
    let unknown = [
        POSTFIX_USER_UNKNOWN.to_owned(),
        SENDMAIL_BOUNCED.to_owned(),
        // soft_bounce = yes: 4.1.1, quoting the 550.
        POSTFIX_SOFT_BOUNCE.to_owned(),
        postfix("5.1.1", &said("550-5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos")),
        postfix("5.1.1", &said("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found")),
        postfix("5.1.6", &said("551 5.1.6 User has moved; please try <zed@elsewhere.test>")),
        postfix("5.1.0", &said("550 5.1.0 <zed@example.com>: User unknown")),
        postfix("5.1.0", &said("550 5.1.0 No such user here")),
        SENDMAIL_RELAY_DENIED.replace("dsn=5.7.1, reply=550 5.7.1 Relay access denied", "dsn=5.1.1, reply=550 5.1.1 <zed@example.com>... User unknown"),
        postfix("5.1.10", &said("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup")),
    ];
    for line in &unknown {
        let f = parse_line(line).unwrap_or_else(|| panic!("a failure: {line}"));
        assert_eq!(f.kind, FailureKind::Bounce, "{line}");
        assert!(
            f.unknown_mailbox,
            "not taken for an unknown mailbox: {line}"
        );
    }
    let destination = [
        POSTFIX_RELAY_DENIED.to_owned(),
        // Sendmail's "User unknown" is its word for any 550 at RCPT: the
        // dsn says what the destination meant.
        SENDMAIL_RELAY_DENIED.to_owned(),
        SENDMAIL_TWO.to_owned(),
        POSTFIX_ISO_BOUNCED.to_owned(),
        // The destination refuses our senders: all routed mail.
        postfix("5.1.0", &said("550 5.1.0 <sender@outside.test>: Sender address rejected: User unknown in local recipient table")),
        postfix("5.1.0", &said("550 5.1.0 <zed@example.com>: Recipient address rejected: Access denied")),
        // The destination does not know the domain, or takes no mail.
        postfix("5.1.2", &said("550 5.1.2 <zed@example.com>: Recipient address rejected: Domain not found")),
        postfix("5.1.10", "Domain legacy.example.net does not accept mail (nullMX)"),
        // An existing mailbox, disabled or full.
        postfix("5.2.1", &said("550 5.2.1 The email account that you tried to reach is disabled")),
        postfix("5.2.2", &said("552 5.2.2 <zed@example.com>: mailbox full")),
        postfix("5.7.1", &said("550 5.7.1 Service unavailable; client [192.0.2.1] blocked")),
        // Sendmail 8.17 quotes the reply: the sender, not the recipient.
        SENDMAIL_RELAY_DENIED.replace("dsn=5.7.1, reply=550 5.7.1 Relay access denied", "dsn=5.1.0, reply=550 5.1.0 <sender@outside.test>: Sender address rejected: User unknown in local recipient table"),
    ];
    for line in &destination {
        let f = parse_line(line).unwrap_or_else(|| panic!("a failure: {line}"));
        assert_eq!(f.kind, FailureKind::Bounce, "{line}");
        assert!(!f.unknown_mailbox, "taken for an unknown mailbox: {line}");
    }
    // Deferrals are counted as before, whatever they say.
    let deferred = POSTFIX_DEFERRED.replace("dsn=4.4.1", "dsn=4.1.1");
    let f = parse_line(&deferred).expect("a deferral");
    assert_eq!((f.kind, f.unknown_mailbox), (FailureKind::Deferral, false));
}

/// Whose "no such mailbox" counts: addresses the destination must have.
#[test]
fn expected_addresses_are_the_ones_the_destination_must_have() {
    let p = policy(
        r#"
state_dir: /nonexistent
domains:
  example.com:
    mode: split
    verify: Postmaster@example.com
    destination: { hosts: ["[192.0.2.30]:2525"] }
    accounts: [{ list: [alice@example.com, carol@example.com] }]
    users:
      carol@example.com: { copy_to: carol@pilot.test }
  example.edu:
    mode: dual
    destination: { domain: google.test, change_envelope: true }
  example.info:
    mode: route
    verify: probe@newdest.test
    destination: { domain: newdest.test, change_envelope: true }
    accounts: [{ list: [ivy@example.info] }]
  example.org:
    mode: route
    destination:
      hosts: ["[192.0.2.30]:2525"]
      reject_unknown: { accounts: [ { list: [bob@example.org] } ] }
"#,
    );
    let a = Attribution::new(&p);
    let expected = |domain: &str, rcpt: &str| a.expected(&p, domain, rcpt);
    use dualroute::breaker::Expected;
    for (domain, rcpt, want) in [
        // The verify address, in any case, as it arrives there.
        (
            "example.com",
            "postmaster@example.com.dualroute.invalid",
            Some(Expected::Verify),
        ),
        ("example.info", "Probe@NEWDEST.test", Some(Expected::Verify)),
        // A target the configuration names.
        ("example.com", "carol@pilot.test", Some(Expected::Target)),
        // A mailbox here (also with an extension), and every address of a
        // dual domain without accounts (the MTA refused the others).
        (
            "example.com",
            "alice@example.com.dualroute.invalid",
            Some(Expected::Mailbox),
        ),
        (
            "example.com",
            "alice+news@example.com.dualroute.invalid",
            Some(Expected::Mailbox),
        ),
        ("example.edu", "anyone@google.test", Some(Expected::Mailbox)),
        ("example.info", "ivy@newdest.test", Some(Expected::Mailbox)),
        // The destination's own list names bob (with an extension too).
        (
            "example.org",
            "bob@example.org.dualroute.invalid",
            Some(Expected::Listed),
        ),
        (
            "example.org",
            "bob+x@example.org.dualroute.invalid",
            Some(Expected::Listed),
        ),
        ("example.org", "zed@example.org.dualroute.invalid", None),
        // Nobody here vouches for these.
        ("example.com", "zed@example.com.dualroute.invalid", None),
        ("example.info", "zed@newdest.test", None),
        ("example.com", "postmaster@elsewhere.test", None),
        ("example.com", "not an address", None),
    ] {
        assert_eq!(expected(domain, rcpt), want, "{domain}: {rcpt}");
    }
}

#[test]
fn garbage_is_not_a_failure() {
    for line in [
        "",
        "to=",
        ": to=",
        ": to=<>, dsn=5.1.1, status=bounced",
        "x: to=<a@b>, dsn=5.1.1",
        "\u{fffd}: to=<a@b>, status=bounced",
    ] {
        assert_eq!(parse_line(line), None, "{line:?}");
    }
}

// ---------------------------------------------------------------------
// Attribution.
// ---------------------------------------------------------------------

fn policy(yaml: &str) -> Policy {
    let config =
        dualroute::config::parse(yaml, "milter.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    Policy::load(config).expect("load the policy")
}

const ATTRIBUTION_YAML: &str = r#"
state_dir: /nonexistent
domains:
  example.com:
    mode: split
    destination: { hosts: ["[192.0.2.30]:2525"] }
    accounts: [{ list: [alice@example.com, carol@example.com, dave@example.com] }]
    users:
      carol@example.com: { copy_to: [Carol@Pilot.test, carol2@pilot.test] }
      dave@example.com: { redirect_to: dave@pilot.test }
  example.org:
    mode: route
    destination: { domain: legacy.example.net }
  example.info:
    mode: split
    destination: { domain: newdest.test, change_envelope: true }
    accounts: [{ list: [ivy@example.info] }]
  example.biz:
    mode: route
    destination: { domain: newdest.test, change_envelope: true }
  example.edu:
    mode: dual
    destination: { domain: google.test, change_envelope: true }
    users:
      ed@example.edu: { copy_to: carol2@pilot.test }
"#;

#[test]
fn routing_addresses_belong_to_their_domain() {
    let a = Attribution::new(&policy(ATTRIBUTION_YAML));
    let of = |addr: &str| {
        let mut d = a.domains(addr).to_vec();
        d.sort();
        d
    };
    // Relay domains, also for destinations given as a domain without
    // change_envelope; case of the domain does not matter.
    assert_eq!(of("zed@example.com.dualroute.invalid"), ["example.com"]);
    assert_eq!(of("zed+tag@EXAMPLE.COM.dualroute.invalid"), ["example.com"]);
    assert_eq!(of("gus@example.org.dualroute.invalid"), ["example.org"]);
    // change_envelope destinations: every domain routing there.
    assert_eq!(of("lou@newdest.test"), ["example.biz", "example.info"]);
    assert_eq!(of("ed@google.test"), ["example.edu"]);
    // Per-user targets: the user's domain, whatever the target's domain is;
    // a target shared by two domains' users belongs to both.
    assert_eq!(of("carol@pilot.test"), ["example.com"]);
    assert_eq!(of("dave@pilot.test"), ["example.com"]);
    assert_eq!(of("carol2@pilot.test"), ["example.com", "example.edu"]);
}

#[test]
fn other_addresses_are_not_routed_mail() {
    let a = Attribution::new(&policy(ATTRIBUTION_YAML));
    for addr in [
        "zed@example.com",                   // the managed domain itself
        "someone@pilot.test",                // a target's domain, not a target
        "x@other.example.dualroute.invalid", // a relay domain that is not ours
        "x@legacy.example.net",              // a destination without change_envelope
        "sender@outside.test",               // the bounce to the sender
        "MAILER-DAEMON",
        "",
    ] {
        assert!(
            a.domains(addr).is_empty(),
            "{addr:?} → {:?}",
            a.domains(addr)
        );
    }
}

// ---------------------------------------------------------------------
// The window.
// ---------------------------------------------------------------------

#[test]
fn window_trips_at_threshold_within_span_only() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut w = Window::new(3, s(60));
    assert_eq!(w.record(t0), None);
    assert_eq!(w.record(t0 + s(10)), None);
    // The first failure is 60 s old: out of the window.
    assert_eq!(w.record(t0 + s(60)), None);
    assert_eq!(w.count(t0 + s(60)), 2);
    assert_eq!(w.record(t0 + s(61)), Some(3));
    // Until reset, the count stands (a trip that could not be written is
    // tried again at the next failure).
    assert_eq!(w.record(t0 + s(62)), Some(4));
    w.reset();
    assert_eq!(w.count(t0 + s(62)), 0);
    assert_eq!(w.record(t0 + s(63)), None);
    // Everything expires.
    assert_eq!(w.count(t0 + s(200)), 0);
    // Threshold 1 trips at once.
    assert_eq!(Window::new(1, s(1)).record(t0), Some(1));
}

// ---------------------------------------------------------------------
// The follower.
// ---------------------------------------------------------------------

fn append(path: &Path, text: &str) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the log");
    f.write_all(text.as_bytes()).expect("append to the log");
}

#[test]
fn follower_starts_at_the_end_and_returns_complete_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mail.log");
    append(&log, "old 1\nold 2\n");
    let mut f = Follower::at_end(&log);
    assert!(f.poll().is_empty());
    append(&log, "new 1\nnew 2\nhalf");
    assert_eq!(f.poll(), ["new 1", "new 2"]);
    assert!(f.poll().is_empty());
    append(&log, " a line\r\n");
    assert_eq!(f.poll(), ["half a line"]);
}

#[test]
fn follower_survives_rename_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mail.log");
    let rotated = dir.path().join("mail.log.1");
    append(&log, "before start\n");
    let mut f = Follower::at_end(&log);
    append(&log, "a\n");
    assert_eq!(f.poll(), ["a"]);

    // logrotate renames; the MTA writes on to its open file until it
    // reopens; then the new file appears.
    fs::rename(&log, &rotated).unwrap();
    append(&rotated, "b (old file, after the rename)\n");
    assert_eq!(f.poll(), ["b (old file, after the rename)"]);
    append(&rotated, "c (old file)\n");
    append(&log, "d (new file)\n");
    assert_eq!(f.poll(), ["c (old file)", "d (new file)"]);
    // A late write to the old file is still read, and the new one is
    // followed.
    append(&rotated, "e (old file, late)\n");
    append(&log, "f (new file)\n");
    assert_eq!(f.poll(), ["e (old file, late)", "f (new file)"]);
    assert!(f.poll().is_empty());
}

#[test]
fn follower_survives_copytruncate() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mail.log");
    append(&log, "before start, a long line to make the file long\n");
    let mut f = Follower::at_end(&log);
    append(&log, "a\nb\n");
    assert_eq!(f.poll(), ["a", "b"]);
    // copytruncate: copied elsewhere, then truncated in place.
    fs::copy(&log, dir.path().join("mail.log.1")).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&log, "c\n");
    assert_eq!(f.poll(), ["c"]);
    append(&log, "d\n");
    assert_eq!(f.poll(), ["d"]);
}

#[test]
fn follower_waits_for_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mail.log");
    let mut f = Follower::at_end(&log);
    assert!(f.poll().is_empty());
    assert!(f.poll().is_empty());
    // Everything in a file that appears after the start is new.
    append(&log, "first\nsecond\n");
    assert_eq!(f.poll(), ["first", "second"]);
    // Removed (rotated away with no new file yet), then recreated.
    fs::remove_file(&log).unwrap();
    assert!(f.poll().is_empty());
    append(&log, "third\n");
    assert_eq!(f.poll(), ["third"]);
}

// ---------------------------------------------------------------------
// The breaker task on a temporary maillog.
// ---------------------------------------------------------------------

struct Task {
    /// The whole service (`dualroute::run`), breaker included; it stops
    /// with the test's runtime.
    milter: support::protocol::Milter,
    log: PathBuf,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts the service with a breaker of threshold 3 within 1 h on
/// `mail.log` in a temporary directory; `before` is written to the log
/// first.
async fn start_task(before: &str, create_log: bool) -> Task {
    start_task_with(TASK_DOMAINS, before, create_log).await
}

const TASK_DOMAINS: &str = r#"
  example.com:
    mode: split
    destination: { hosts: ["[192.0.2.30]:2525"] }
    accounts: [{ list: [alice@example.com] }]
  example.org:
    mode: route
    destination: { hosts: ["[192.0.2.30]:2525"] }
"#;

/// [`start_task`] with other `domains:`.
async fn start_task_with(domains: &str, before: &str, create_log: bool) -> Task {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mail.log");
    let state = dir.path().join("state");
    if create_log {
        append(&log, before);
    }
    let yaml = format!(
        r#"
state_dir: {state}
domains:{domains}breaker: {{ maillog: {log}, threshold: 3, deferrals: 3, window: 1h }}
"#,
        state = state.display(),
        log = log.display()
    );
    // The state follower looks first after an hour: a hold seen here is
    // the breaker's own refresh.
    let mut start = support::protocol::start(&yaml);
    start.intervals.state = std::time::Duration::from_secs(3600);
    let milter = support::protocol::Milter::serve(start).await;
    Task {
        milter,
        log,
        state,
        _dir: dir,
    }
}

/// A permanent failure that counts: the destination refuses to relay
/// for `to` (docs/design.md §7; an unknown address would not count).
fn bounce(to: &str) -> String {
    POSTFIX_RELAY_DENIED
        .replace("zed@example.com.dualroute.invalid", to)
        .replace(
            "<zed@example.com>",
            &format!("<{}>", to.replace(".dualroute.invalid", "")),
        )
        + "\n"
}

impl Task {
    fn tripped(&self, domain: &str) -> bool {
        self.state.join(format!("{domain}.tripped")).exists()
    }

    fn held(&self, domain: &str) -> Option<String> {
        self.milter.holds().get(domain).map(ToString::to_string)
    }

    /// Waits until `domain` is tripped: the trip recorded, and the holds
    /// in force read again by the breaker through the reload actor (the
    /// trip is written first, so the hold follows it by a moment).
    async fn wait_tripped(&self, domain: &str) {
        let tripped =
            || self.tripped(domain) && self.held(domain).is_some_and(|h| h.contains("tripped"));
        support::wait_until(&format!("{domain} to be tripped"), || {
            let t = tripped();
            async move { t.then_some(()) }
        })
        .await;
    }

    /// Gives the task time for a few polls.
    async fn settle(&self) {
        tokio::time::sleep(dualroute::breaker::POLL * 3).await;
    }
}

#[tokio::test]
async fn task_counts_new_failures_and_trips_at_the_threshold() {
    // Three failures before the start are history.
    let before = bounce("a@example.com.dualroute.invalid").repeat(3);
    let task = start_task(&before, true).await;
    task.settle().await;
    assert!(!task.tripped("example.com"));

    // Not routed mail, deferrals and another domain's failures do not
    // count for example.com.
    append(&task.log, &bounce("a@example.com"));
    append(
        &task.log,
        &format!("{POSTFIX_DEFERRED}\n{SENDMAIL_DEFERRED}\n"),
    );
    append(&task.log, &bounce("b@example.org.dualroute.invalid"));
    append(&task.log, &bounce("b@example.com.dualroute.invalid"));
    append(&task.log, &format!("{SENDMAIL_RELAY_DENIED}\n"));
    task.settle().await;
    assert!(!task.tripped("example.com"), "tripped at 2 failures");
    assert_eq!(task.held("example.com"), None);

    append(&task.log, &bounce("c@example.com.dualroute.invalid"));
    task.wait_tripped("example.com").await;
    // Held at once, not at the state follower's next look (it does not
    // run in this test at all).
    let why = task
        .held("example.com")
        .expect("example.com held after the trip");
    assert!(why.contains("bounce breaker tripped"), "{why}");
    let st = dualroute::state::StateDir::new(&task.state)
        .load("example.com")
        .unwrap();
    let t = st.tripped.expect("the trip is persisted");
    assert_eq!((t.bounces, t.window_secs), (3, 3600));
    assert!(
        t.last.contains("to=<c@example.com.dualroute.invalid>"),
        "{}",
        t.last
    );
    // The other domain had one failure: untouched.
    assert!(!task.tripped("example.org"));
    assert_eq!(task.held("example.org"), None);
}

#[tokio::test]
async fn task_does_not_count_while_tripped_and_counts_anew_after_enable() {
    let task = start_task("", true).await;
    task.settle().await;
    append(
        &task.log,
        &bounce("a@example.com.dualroute.invalid").repeat(3),
    );
    task.wait_tripped("example.com").await;
    let first = fs::read_to_string(task.state.join("example.com.tripped")).unwrap();

    // Late bounces while tripped: the trip stays as it was.
    append(
        &task.log,
        &bounce("b@example.com.dualroute.invalid").repeat(5),
    );
    task.settle().await;
    assert_eq!(
        fs::read_to_string(task.state.join("example.com.tripped")).unwrap(),
        first
    );

    // `dualroute enable`: the count starts from zero.
    assert_eq!(
        dualroute::state::StateDir::new(&task.state)
            .enable("example.com")
            .unwrap(),
        (false, true)
    );
    append(
        &task.log,
        &bounce("c@example.com.dualroute.invalid").repeat(2),
    );
    task.settle().await;
    assert!(
        !task.tripped("example.com"),
        "tripped again with 2 new failures: old ones were counted"
    );
    append(&task.log, &bounce("d@example.com.dualroute.invalid"));
    task.wait_tripped("example.com").await;
}

/// Deferrals count apart from bounces, each (queue id, recipient) once
/// however often the MTA retries it, and trip at `deferrals` with their
/// own cause in the hold, the 451 reply and the persisted trip.
#[tokio::test]
async fn task_trips_on_deferrals_counting_each_message_once() {
    let task = start_task("", true).await;
    task.settle().await;
    let deferred = |qid: &str, to: &str| {
        POSTFIX_GOOGLE_421
            .replace("4Bc1xY2z3Kz9v", qid)
            .replace("zed@example.com.dualroute.invalid", to)
            + "\n"
    };
    // One message retried five times, and a second one: two deferrals.
    append(
        &task.log,
        &deferred("AAAA1", "a@example.com.dualroute.invalid").repeat(5),
    );
    append(
        &task.log,
        &deferred("AAAA2", "a@example.com.dualroute.invalid"),
    );
    append(&task.log, &bounce("b@example.com.dualroute.invalid"));
    let counts = || {
        dualroute::state::StateDir::new(&task.state)
            .breaker_counts()
            .unwrap()
            .and_then(|c| c.domains.get("example.com").copied())
    };
    let want = dualroute::state::FailureCounts {
        bounces: 1,
        deferrals: 2,
    };
    support::wait_until("the counts for status", || {
        let c = counts();
        async move { (c == Some(want)).then_some(()) }
    })
    .await;
    assert!(!task.tripped("example.com"));

    append(
        &task.log,
        &deferred("AAAA3", "c@example.com.dualroute.invalid"),
    );
    task.wait_tripped("example.com").await;
    let why = task.held("example.com").expect("held after the trip");
    assert!(why.contains("breaker tripped on deferrals"), "{why}");
    let t = dualroute::state::StateDir::new(&task.state)
        .load("example.com")
        .unwrap()
        .tripped
        .expect("the trip is persisted");
    assert_eq!(
        (t.cause, t.deferrals, t.bounces),
        (dualroute::state::TripCause::Deferrals, 3, 1)
    );
    // The failures counted, in order, the retries of AAAA1 once.
    assert_eq!(t.recent.len(), 4, "{:#?}", t.recent);
    assert!(t.recent[3].contains("AAAA3"), "{:#?}", t.recent);
    // Its own words in the reply an unrouted address gets.
    let d = task
        .milter
        .deliver(support::protocol::CLIENT, None, &[&["<zed@example.com>"]])
        .await;
    match &d.rcpt[0] {
        indymilter_test::Status::Tempfail { message: Some(m) } => {
            let m = m.to_string_lossy();
            assert!(
                m.starts_with("451 4.4.4")
                    && m.contains("switched off by the breaker: too many deferrals"),
                "{m}"
            );
        }
        other => panic!("expected 451 4.4.4, got {other:?}"),
    }
    // After a trip the domain's counts start again from zero.
    support::wait_until("the counts to be cleared", || {
        let c = counts();
        async move { c.is_none().then_some(()) }
    })
    .await;
}

/// A destination's answer that the address does not exist, as Postfix
/// logs it (the destination is a Postfix with virtual mailboxes) and a
/// destination's refusal to relay at all.
const POSTFIX_USER_UNKNOWN: &str = "Jan 12 10:00:10 mx postfix/smtp[1234]: 4Bc1xY2z3Kz9x: to=<zed@example.com.dualroute.invalid>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.05, delays=0.01/0.01/0.02/0.01, dsn=5.1.1, status=bounced (host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <zed@example.com>: Recipient address rejected: User unknown in virtual mailbox table (in reply to RCPT TO command))";
const POSTFIX_RELAY_DENIED: &str = "Jan 12 10:00:11 mx postfix/smtp[1234]: 4Bc1xY2z3Kz9y: to=<zed@example.com.dualroute.invalid>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.05, delays=0.01/0.01/0.02/0.01, dsn=5.7.1, status=bounced (host 127.0.0.1[127.0.0.1] said: 554 5.7.1 <zed@example.com>: Relay access denied (in reply to RCPT TO command))";

/// `template` (a line about `zed@example.com.dualroute.invalid`) about
/// routing address `to` in message `qid` instead.
fn failure(template: &str, qid: &str, to: &str) -> String {
    let original = to.replace(".dualroute.invalid", "");
    let line = template
        .replace("zed@example.com.dualroute.invalid", to)
        .replace("<zed@example.com>", &format!("<{original}>"));
    // The queue id is the word before ": to=".
    let (head, tail) = line.split_once(": to=").expect("a delivery line");
    let (head, _) = head.rsplit_once(' ').expect("a queue id");
    format!("{head} {qid}: to={tail}\n")
}

const UNKNOWN_DOMAINS: &str = r#"
  example.com:
    mode: split
    destination: { hosts: ["[192.0.2.30]:2525"] }
    accounts: [{ list: [alice@example.com] }]
  example.edu:
    mode: dual
    destination: { hosts: ["[192.0.2.30]:2525"] }
    accounts: [{ list: [ed@example.edu] }]
  example.net:
    mode: route
    verify: postmaster@example.net
    destination: { hosts: ["[192.0.2.30]:2525"] }
"#;

/// Issue 23: dictionary spam must not switch routing off. 25 unknown
/// addresses of a split domain bounce (`550 5.1.1 … User unknown`, as
/// Postfix and Sendmail log it) with threshold 3: not counted, counted
/// as ignored instead. A destination that refuses everything (`554 5.7.1
/// Relay access denied`) still trips at 3. And `5.1.1` for an address
/// the destination must have — a copy of a local user of a dual domain,
/// the domain's `verify` address — is a broken destination and trips
/// too (docs/design.md §7, "What the breaker counts").
#[tokio::test]
async fn task_does_not_trip_on_unknown_addresses_but_on_a_refusing_destination() {
    let task = start_task_with(UNKNOWN_DOMAINS, "", true).await;
    task.settle().await;
    let mut spam = String::new();
    for i in 0..25 {
        let template = if i % 2 == 0 {
            POSTFIX_USER_UNKNOWN
        } else {
            SENDMAIL_BOUNCED
        };
        let to = format!("zed{i}@example.com.dualroute.invalid");
        spam.push_str(&failure(template, &format!("4Bc1xY2z3K{i:03}"), &to));
    }
    append(&task.log, &spam);
    let metric = |name: &str, domain: &str, label: (&str, &str)| {
        support::metrics::Scrape {
            status: String::new(),
            content_type: String::new(),
            text: task.milter.metrics(),
        }
        .count(name, &[("domain", domain), label])
    };
    let ignored = || {
        metric(
            "dualroute_breaker_ignored_total",
            "example.com",
            ("reason", "user_unknown"),
        )
    };
    support::wait_until("25 unknown addresses read (or a trip)", || {
        let done = ignored() == 25.0 || task.tripped("example.com");
        async move { done.then_some(()) }
    })
    .await;
    task.settle().await;
    assert!(
        !task.tripped("example.com"),
        "25 unknown addresses tripped the breaker: {:?}",
        task.held("example.com")
    );
    assert_eq!(task.held("example.com"), None);
    assert_eq!(ignored(), 25.0);
    // With `soft_bounce = yes` Postfix keeps the message and logs the
    // refusal again at every retry: one address, seen once.
    append(
        &task.log,
        &failure(
            POSTFIX_SOFT_BOUNCE,
            "4Bc1xY2z3S001",
            "zed25@example.com.dualroute.invalid",
        )
        .repeat(3),
    );
    support::wait_until("the soft-bounced unknown read", || {
        let done = ignored() >= 26.0;
        async move { done.then_some(()) }
    })
    .await;
    task.settle().await;
    assert_eq!(ignored(), 26.0);
    assert!(!task.tripped("example.com"));
    assert_eq!(
        metric(
            "dualroute_breaker_failures_total",
            "example.com",
            ("kind", "bounce")
        ),
        0.0
    );

    // The destination refuses to relay: three permanent failures trip.
    let mut refused = String::new();
    for i in 0..3 {
        let to = format!("rcpt{i}@example.com.dualroute.invalid");
        refused.push_str(&failure(
            POSTFIX_RELAY_DENIED,
            &format!("4Bc1xY2z3R{i:03}"),
            &to,
        ));
    }
    append(&task.log, &refused);
    task.wait_tripped("example.com").await;
    let state = dualroute::state::StateDir::new(&task.state);
    let t = state.load("example.com").unwrap().tripped.unwrap();
    assert_eq!(t.bounces, 3, "{t:#?}");
    assert!(
        t.recent.iter().all(|l| l.contains("dsn=5.7.1")),
        "the unknowns are not among the failures counted: {:#?}",
        t.recent
    );

    // 5.1.1 for ed, who has a mailbox here (example.edu is dual: his copy
    // goes to the destination, which must know him), and for the verify
    // address of example.net: the destination lost its users.
    for (domain, to, template) in [
        (
            "example.edu",
            "ed@example.edu.dualroute.invalid",
            POSTFIX_USER_UNKNOWN,
        ),
        (
            "example.net",
            "postmaster@example.net.dualroute.invalid",
            SENDMAIL_BOUNCED,
        ),
    ] {
        let mut lines = String::new();
        for i in 0..3 {
            lines.push_str(&failure(template, &format!("4Bc1xY2z3E{i:03}"), to));
        }
        append(&task.log, &lines);
        task.wait_tripped(domain).await;
        let t = state.load(domain).unwrap().tripped.unwrap();
        assert_eq!(t.bounces, 3, "{domain}: {t:#?}");
    }
}

/// Issue 25: a breaker whose log is missing (Debian 12 without rsyslog
/// has no /var/log/mail.log) or unreadable sees nothing and never trips.
/// Before, it said so once at WARN and `status` and the metrics looked
/// healthy; now `breaker-counts` records the source as not readable (for
/// `status`'s ✘), the gauge says 0 and an ERROR is logged, until the log
/// can be read.
#[tokio::test]
async fn task_shows_a_blind_breaker() {
    let task = start_task("", false).await;
    let source = || {
        dualroute::state::StateDir::new(&task.state)
            .breaker_counts()
            .unwrap()
            .and_then(|c| c.source)
    };
    let gauge = |v: u8| {
        format!(
            "dualroute_breaker_source_readable{{source=\"{}\"}} {v}",
            task.log.display()
        )
    };
    support::wait_until("the source to be recorded as not readable", || {
        let s = source();
        async move { s.filter(|s| !s.readable).map(|_| ()) }
    })
    .await;
    let s = source().unwrap();
    assert_eq!(s.name, task.log.display().to_string());
    assert!(s.error.contains("does not exist"), "{s:?}");
    let metrics = task.milter.metrics();
    assert!(metrics.contains(&gauge(0)), "{metrics}");

    // The log appears: read again, and shown so.
    append(&task.log, "");
    support::wait_until("the source to be recorded as readable", || {
        let s = source();
        async move { s.filter(|s| s.readable).map(|_| ()) }
    })
    .await;
    let metrics = task.milter.metrics();
    assert!(metrics.contains(&gauge(1)), "{metrics}");
    assert!(source().unwrap().error.is_empty());
}

#[tokio::test]
async fn task_follows_rotation_and_a_log_that_appears_later() {
    let task = start_task("", false).await;
    task.settle().await;
    // The log appears after the start: all of it counts.
    append(&task.log, &bounce("a@example.com.dualroute.invalid"));
    task.settle().await;
    // Rename rotation.
    let rotated = task.log.with_extension("log.1");
    fs::rename(&task.log, &rotated).unwrap();
    append(&task.log, &bounce("b@example.com.dualroute.invalid"));
    task.settle().await;
    assert!(!task.tripped("example.com"));
    // copytruncate (noticed before the file grows back to where we were:
    // see src/breaker.rs on what no follower can see).
    fs::OpenOptions::new()
        .write(true)
        .open(&task.log)
        .unwrap()
        .set_len(0)
        .unwrap();
    task.settle().await;
    append(&task.log, &bounce("c@example.com.dualroute.invalid"));
    task.wait_tripped("example.com").await;
    let t = dualroute::state::StateDir::new(&task.state)
        .load("example.com")
        .unwrap()
        .tripped
        .unwrap();
    assert_eq!(t.bounces, 3);
}

// ---------------------------------------------------------------------
// End to end: dualroute run + private Postfix + a refusing smtp-sink.
// ---------------------------------------------------------------------

/// Waits until the breaker of `milter` follows the mail log: it starts
/// at the log's end a moment after the milter serves, and a bounce
/// logged before that is history, never counted.
fn wait_following(milter: &MilterProcess) {
    if support::poll(|| {
        milter
            .log()
            .contains("bounce breaker: following")
            .then_some(())
    })
    .is_none()
    {
        panic!("the breaker did not start\n{}", milter.log());
    }
}

const SENDER: &str = "sender@outside.test";
const INSTANCE: &str = "breaker.test";

fn message(subject: &str) -> String {
    format!(
        "From: {SENDER}\nTo: undisclosed-recipients:;\nSubject: {subject}\n\nbody of {subject}\n"
    )
}

/// A private Postfix in front of `dualroute run`: example.com split, alice
/// here, routed to `sink`; the breaker follows that Postfix's log
/// (threshold 3 within an hour) and is following it when this returns.
struct Rig {
    tmp: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
    pf: support::Postfix,
    milter: MilterProcess,
}

fn rig(prefix: &str, sink: &support::SmtpSink) -> Rig {
    rig_with(prefix, sink, |pf| {
        format!(
            "{{ maillog: {}, threshold: 3, window: 1h }}",
            pf.maillog_path().display()
        )
    })
}

/// [`rig`] with the `breaker:` that `breaker` writes for the Postfix.
fn rig_with(
    prefix: &str,
    sink: &support::SmtpSink,
    breaker: impl FnOnce(&support::Postfix) -> String,
) -> Rig {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("a temporary directory");
    let dir = tmp.path();
    let milter_port = support::Port::reserve();
    let config = dir.join("milter.yaml");
    let state = dir.join("state");
    let domains = format!(
        r#"listen: inet:127.0.0.1:{milter_port}
instance: {INSTANCE}
state_dir: {state}
domains:
  example.com:
    mode: split
    destination: {{ hosts: ["{sink}"] }}
    accounts: [{{ list: [alice@example.com] }}]
"#,
        state = state.display(),
        sink = sink.nexthop()
    );
    fs::write(&config, &domains).unwrap();
    let opts = support::PostfixOptions::default()
        .domain_without_catchall("example.com", &["alice@example.com"]);
    let opts = postfix_config(&config, &dir.join("postfix-config")).apply_to(opts);
    let pf = support::Postfix::start(opts);
    // Only now is the maillog's path known.
    fs::write(&config, format!("{domains}breaker: {}\n", breaker(&pf))).unwrap();
    let milter = MilterProcess::start(&config, &milter_port, &dir.join("milter.log"));
    wait_following(&milter);
    Rig {
        tmp,
        config,
        state,
        pf,
        milter,
    }
}

/// The real thing: example.com is split and routed to a destination that
/// refuses every recipient (`554 5.7.1 Relay access denied`: it does not
/// take our mail at all). Three bounces of routed mail trip the breaker
/// (threshold 3 within 1 h); from then on the milter is transparent for
/// example.com, so Postfix files an unknown address in the catch-all
/// Maildir instead of routing it; a restart keeps that; `dualroute enable`
/// brings routing back within seconds.
#[test]
fn postfix_bounces_trip_the_breaker_end_to_end() {
    let sink = support::SmtpSink::start_refusing_relay();
    let Rig {
        tmp,
        config,
        state,
        pf,
        mut milter,
    } = rig("dualroute-breaker-", &sink);

    let client = support::SmtpClient::new(pf.smtp_addr()).bind(support::OUTSIDE_IP);
    let diag = |milter: &MilterProcess| {
        format!(
            "{}\n--- milter log ---\n{}\n--- status ---\n{}",
            pf.diagnostics(),
            milter.log(),
            dualroute(&config, &["status"]).1
        )
    };
    // The relay-domain deliveries (routed mail) in the maillog.
    let routed = || -> Vec<support::Delivery> {
        pf.deliveries()
            .into_iter()
            .filter(|d| d.to.ends_with("@example.com.dualroute.invalid"))
            .collect()
    };
    let send = |milter: &MilterProcess, rcpts: &[&str], subject: &str| {
        let t = client.send(SENDER, rcpts, &message(subject));
        assert!(t.accepted(), "{t}\n{}", diag(milter));
        pf.wait_queue_empty();
        t
    };
    let wait_for =
        |milter: &MilterProcess, what: &str, mut probe: Box<dyn FnMut() -> bool + '_>| {
            if support::poll(|| probe().then_some(())).is_none() {
                panic!("timed out waiting for {what}\n{}", diag(milter));
            }
        };
    let status = || dualroute(&config, &["status"]).1;

    // 1. One bounce: counted, not tripped.
    send(&milter, &["zed1@example.com"], "first");
    wait_for(
        &milter,
        "the first bounce to be counted",
        Box::new(|| milter.log().contains("(1 of 3 within 1h")),
    );
    let bounced = routed();
    assert_eq!(bounced.len(), 1, "{}", diag(&milter));
    assert_eq!(
        (bounced[0].status.as_str(), bounced[0].dsn.as_str()),
        ("bounced", "5.7.1")
    );
    assert_eq!(
        bounced[0].relay,
        format!("127.0.0.1[127.0.0.1]:{}", sink.port())
    );
    assert!(
        status().contains("example.com: mode split: active"),
        "{}",
        status()
    );

    // 2. Two more: tripped.
    send(&milter, &["zed2@example.com", "zed3@example.com"], "second");
    // The error is logged after the holds are refreshed: from then on the
    // milter is transparent.
    wait_for(
        &milter,
        "the trip",
        Box::new(|| milter.log().contains("bounce breaker tripped")),
    );
    assert!(
        state.join("example.com.tripped").exists(),
        "{}",
        diag(&milter)
    );
    assert_eq!(
        routed().iter().filter(|d| d.status == "bounced").count(),
        3,
        "{}",
        diag(&milter)
    );
    let st = status();
    assert!(
        st.contains("example.com: mode split: TRIPPED by the bounce breaker")
            && st.contains("3 permanent failures within 3600s"),
        "{st}"
    );
    let trip = fs::read_to_string(state.join("example.com.tripped")).unwrap();
    assert!(trip.contains("bounces: 3"), "{trip}");
    let errors: Vec<String> = milter
        .log()
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("bounce breaker tripped"))
        .map(str::to_owned)
        .collect();
    assert_eq!(errors.len(), 1, "{}", diag(&milter));
    for words in [
        "example.com",
        "3 permanent failures",
        "within 1h",
        "status=bounced",
        "run `dualroute enable example.com`",
    ] {
        assert!(
            errors[0].contains(words),
            "{words:?} missing from {}",
            errors[0]
        );
    }

    // 3. Tripped: routing is off, and an address without a mailbox here is
    // refused for now (451 4.4.4) — never delivered into the catch-all.
    let catchall = pf.maildir_root().join("example.com/dualroute-catchall/");
    let refused = |milter: &MilterProcess, rcpt: &str| {
        let t = client.send(SENDER, &[rcpt], &message("while tripped"));
        let reply = t.rcpt(rcpt);
        assert_eq!(
            (reply.code, reply.enhanced()),
            (451, Some("4.4.4")),
            "{t}\n{}",
            diag(milter)
        );
        assert!(
            reply.text.contains("switched off by the bounce breaker"),
            "{t}"
        );
        assert!(!t.accepted(), "{t}");
    };
    refused(&milter, "zed4@example.com");
    assert!(
        support::read_maildir(&catchall).is_empty(),
        "{}",
        diag(&milter)
    );
    assert_eq!(routed().len(), 3, "routed while tripped\n{}", diag(&milter));
    assert!(
        milter.log().lines().any(|l| l
            .contains("NOQUEUE: RCPT <zed4@example.com>: tempfail 451 4.4.4")
            && l.contains("routing off (bounce breaker tripped")),
        "{}",
        diag(&milter)
    );

    // 4. A restart keeps the trip, and does not count old lines again.
    milter.kill();
    milter.spawn();
    assert!(
        status().contains("TRIPPED by the bounce breaker"),
        "{}",
        status()
    );
    refused(&milter, "zed5@example.com");
    assert!(
        support::read_maildir(&catchall).is_empty(),
        "{}",
        diag(&milter)
    );
    assert_eq!(
        routed().len(),
        3,
        "routed after the restart\n{}",
        diag(&milter)
    );

    // 5. `dualroute enable`: routing is back within seconds (the running
    // milter follows state_dir every 2 s), and the breaker counts from 0.
    let (exit, out) = dualroute(&config, &["enable", "example.com"]);
    assert!(
        exit.success() && out.contains("breaker trip cleared"),
        "{out}"
    );
    assert!(
        status().contains("example.com: mode split: active"),
        "{}",
        status()
    );
    std::thread::sleep(Duration::from_secs(3));
    send(&milter, &["zed6@example.com"], "after enable");
    wait_for(
        &milter,
        "zed6 to reach the sink again",
        Box::new(|| {
            routed()
                .iter()
                .any(|d| d.to == "zed6@example.com.dualroute.invalid")
        }),
    );
    let zed6 = routed()
        .into_iter()
        .find(|d| d.to == "zed6@example.com.dualroute.invalid")
        .unwrap();
    assert_eq!(
        zed6.relay,
        format!("127.0.0.1[127.0.0.1]:{}", sink.port()),
        "{}",
        diag(&milter)
    );
    assert!(zed6.text.contains("Relay access denied"), "{}", zed6.line);
    assert!(
        support::read_maildir(&catchall).is_empty(),
        "{}",
        diag(&milter)
    );
    wait_for(
        &milter,
        "zed6's bounce to be counted as the first after enable",
        Box::new(|| {
            milter
                .log()
                .lines()
                .any(|l| l.contains("zed6@") && l.contains("(1 of 3 within 1h"))
        }),
    );
    assert!(
        !state.join("example.com.tripped").exists(),
        "{}",
        diag(&milter)
    );
    drop(milter);
    drop(pf);
    if support::keep_tmp() {
        eprintln!("DUALROUTE_KEEP_TMP: kept {}", tmp.keep().display());
    }
}

/// The issue 23 trial, for real: example.com is split, its destination
/// knows nobody we send it (every RCPT `550 5.1.1`), and three messages
/// to made-up addresses (zed1, zed2, zed3) bounce with threshold 3. Before,
/// that tripped the breaker and carol, who is real, got 451; now each
/// bounce is logged as not counted, `status` shows 0 permanent failures
/// and the domain still routes.
#[test]
fn postfix_unknown_addresses_do_not_trip_end_to_end() {
    let sink = support::SmtpSink::start_rejecting();
    let Rig {
        tmp,
        config,
        state,
        pf,
        milter,
    } = rig("dualroute-unknown-", &sink);
    let client = support::SmtpClient::new(pf.smtp_addr()).bind(support::OUTSIDE_IP);
    let diag = || format!("{}\n--- milter log ---\n{}", pf.diagnostics(), milter.log());
    for (i, subject) in ["first", "second", "third"].iter().enumerate() {
        let rcpt = format!("zed{}@example.com", i + 1);
        let t = client.send(SENDER, &[&rcpt], &message(subject));
        assert!(t.accepted(), "{t}\n{}", diag());
    }
    pf.wait_queue_empty();
    let not_counted = || {
        milter
            .log()
            .lines()
            .filter(|l| l.contains("not counted by the bounce breaker"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    if support::poll(|| (not_counted().len() == 3).then_some(())).is_none() {
        panic!("timed out waiting for 3 uncounted bounces\n{}", diag());
    }
    // The bounces are Postfix's own: 5.1.1 from the destination.
    let bounced: Vec<support::Delivery> = pf
        .deliveries()
        .into_iter()
        .filter(|d| d.to.ends_with("@example.com.dualroute.invalid"))
        .collect();
    assert_eq!(bounced.len(), 3, "{}", diag());
    assert!(
        bounced
            .iter()
            .all(|d| d.status == "bounced" && d.dsn == "5.1.1"),
        "{}",
        diag()
    );
    // One line per address, in the order Postfix delivered them.
    let lines = not_counted();
    for line in &lines {
        assert!(
            line.contains("INFO")
                && line.contains("no such mailbox at the destination (dsn=5.1.1)")
                && line.contains("destination.reject_unknown"),
            "{line}"
        );
    }
    for n in 1..=3 {
        let to = format!("<zed{n}@example.com.dualroute.invalid>");
        assert_eq!(
            lines.iter().filter(|l| l.contains(&to)).count(),
            1,
            "{to}: {lines:#?}"
        );
    }
    assert!(!state.join("example.com.tripped").exists(), "{}", diag());
    assert!(
        !milter.log().contains("bounce breaker tripped"),
        "{}",
        diag()
    );
    let (_, status) = dualroute(&config, &["status"]);
    assert!(
        status.contains("example.com: mode split: active")
            && status.contains("breaker: 0 permanent failures (trips at 3)"),
        "{status}"
    );
    // Still routing: the next unknown address goes to the destination
    // again instead of 451 4.4.4.
    let t = client.send(SENDER, &["zed4@example.com"], &message("fourth"));
    assert!(t.accepted(), "{t}\n{}", diag());
    drop(milter);
    drop(pf);
    if support::keep_tmp() {
        eprintln!("DUALROUTE_KEEP_TMP: kept {}", tmp.keep().display());
    }
}

/// Notification by mail (README "Notification by mail"), for real: the
/// breaker trips in a private Postfix and the administrator's message
/// lands in their Maildir, through the same Postfix and so through this
/// milter, which leaves it alone although the administrator's domain is
/// `dual` (every message to it is copied to the other server: the control
/// message shows that).
#[test]
fn postfix_trip_notifies_the_admin_end_to_end() {
    let tmp = tempfile::Builder::new()
        .prefix("dualroute-notify-")
        .tempdir()
        .expect("a temporary directory");
    let dir = tmp.path();
    let refusing = support::SmtpSink::start_refusing_relay();
    let other = support::SmtpSink::start();
    let milter_port = support::Port::reserve();
    let config = dir.join("milter.yaml");
    let state = dir.join("state");
    let domains = format!(
        r#"listen: inet:127.0.0.1:{milter_port}
instance: notify.test
state_dir: {state}
domains:
  example.com:
    mode: split
    destination: {{ hosts: ["{refusing}"] }}
    accounts: [{{ list: [alice@example.com] }}]
  example.net:
    mode: dual
    destination: {{ hosts: ["{other}"] }}
    accounts: [{{ list: [postmaster@example.net] }}]
"#,
        state = state.display(),
        refusing = refusing.nexthop(),
        other = other.nexthop()
    );
    fs::write(&config, &domains).unwrap();
    let opts = support::PostfixOptions::default()
        .domain_without_catchall("example.com", &["alice@example.com"])
        .domain_without_catchall("example.net", &["postmaster@example.net"]);
    let opts = postfix_config(&config, &dir.join("postfix-config")).apply_to(opts);
    let pf = support::Postfix::start(opts);
    // Only now are the maillog and the SMTP port known.
    fs::write(
        &config,
        format!(
            "{domains}breaker: {{ maillog: {}, threshold: 2, window: 1h }}\nnotify: {{ to: [postmaster@example.net], from: dualroute@notify.test, via: \"smtp:{}\" }}\n",
            pf.maillog_path().display(),
            pf.smtp_addr()
        ),
    )
    .unwrap();
    let milter = MilterProcess::start(&config, &milter_port, &dir.join("milter.log"));
    wait_following(&milter);
    let client = support::SmtpClient::new(pf.smtp_addr()).bind(support::OUTSIDE_IP);
    let diag = || format!("{}\n--- milter log ---\n{}", pf.diagnostics(), milter.log());
    let admin = || pf.maildir_messages("postmaster@example.net");

    // Control: mail to the administrator from outside is copied to the
    // other server (example.net is dual, routing is on).
    let t = client.send(SENDER, &["postmaster@example.net"], &message("control"));
    assert!(t.accepted(), "{t}\n{}", diag());
    pf.wait_queue_empty();
    assert_eq!(other.wait_messages(1).len(), 1, "{}", diag());
    assert_eq!(admin().len(), 1, "{}", diag());
    let status = dualroute(&config, &["status"]).1;
    assert!(
        status.contains("breaker: 0 permanent failures (trips at 2), 0 deferrals (counted only)"),
        "{status}"
    );

    // Two bounces of routed mail trip example.com.
    let t = client.send(
        SENDER,
        &["zed1@example.com", "zed2@example.com"],
        &message("refused there"),
    );
    assert!(t.accepted(), "{t}\n{}", diag());
    if support::poll(|| {
        milter
            .log()
            .contains("bounce breaker tripped")
            .then_some(())
    })
    .is_none()
    {
        panic!("timed out waiting for the trip\n{}", diag());
    }

    // The notification lands in the administrator's Maildir.
    let Some(note) = support::poll(|| {
        admin()
            .into_iter()
            .find(|m| m.text.contains("X-Dualroute-Notify"))
    }) else {
        panic!("no notification in the Maildir\n{}", diag());
    };
    assert_eq!(
        note.header("Subject"),
        ["[dualroute notify.test] example.com: routing switched off by the bounce breaker"],
        "{}",
        note.text
    );
    assert_eq!(note.header("Auto-Submitted"), ["auto-generated"]);
    assert_eq!(
        note.header("From"),
        // RFC 5322 §3.2.5: a display name with "." is a quoted-string.
        ["\"dualroute on notify.test\" <dualroute@notify.test>"]
    );
    for words in [
        "2 permanent failures of routed mail within 1h",
        "to=<zed1@example.com.dualroute.invalid>",
        "to=<zed2@example.com.dualroute.invalid>",
        "status=bounced",
        "  dualroute enable example.com",
    ] {
        assert!(
            note.text.contains(words),
            "{words:?} missing:\n{}",
            note.text
        );
    }
    // Not routed: no loop header, no copy to the other server (the
    // control message's copy is still the only one), and the milter says
    // why.
    assert!(note.header("X-Dualroute").is_empty(), "{}", note.text);
    pf.wait_queue_empty();
    assert_eq!(
        other.messages().len(),
        1,
        "the notification was copied\n{}",
        diag()
    );
    assert!(
        milter
            .log()
            .contains("dualroute's own notifier: not routed"),
        "{}",
        diag()
    );
    // One event, one message.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(admin().len(), 2, "{}", diag());
    drop(milter);
    drop(pf);
    if support::keep_tmp() {
        eprintln!("DUALROUTE_KEEP_TMP: kept {}", tmp.keep().display());
    }
}

// ---------------------------------------------------------------------
// The journal (`maillog: journal`, issue 25).
// ---------------------------------------------------------------------

/// systemd-journal-remote, which writes journal files from the journal
/// export format (package systemd-journal-remote, scripts/test-deps.sh).
const JOURNAL_REMOTE: &str = "/lib/systemd/systemd-journal-remote";

/// One journal entry: identifier, pid, MESSAGE, facility, and how long
/// ago it was logged.
struct JournalEntry {
    ident: String,
    pid: String,
    message: String,
    facility: u8,
    ago: Duration,
}

impl JournalEntry {
    /// A syslog line as the MTA wrote it (`… ident[pid]: message`), as
    /// journald would have stored it had the MTA logged to /dev/log: the
    /// mail facility, logged now.
    fn from_syslog(line: &str) -> JournalEntry {
        let at = line
            .find("]: ")
            .unwrap_or_else(|| panic!("not a syslog line: {line}"));
        let tag = &line[..at];
        let tag = &tag[tag.rfind(' ').map_or(0, |i| i + 1)..];
        let (ident, pid) = tag.split_once('[').expect("ident[pid]");
        JournalEntry {
            ident: ident.to_owned(),
            pid: pid.to_owned(),
            message: line[at + 3..].to_owned(),
            facility: 2,
            ago: Duration::ZERO,
        }
    }
}

/// Appends `entries` to the journal file `DIR/mail.journal`, as journald
/// would have written them: the export format piped to
/// systemd-journal-remote. The boot id is this boot's, as in a real
/// journal (journalctl --follow reads the current boot).
fn journal_write(dir: &Path, entries: &[JournalEntry]) {
    assert!(
        Path::new(JOURNAL_REMOTE).exists(),
        "{JOURNAL_REMOTE} is missing: install the package systemd-journal-remote (scripts/test-deps.sh)"
    );
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .replace('-', "");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let mut export = String::new();
    for e in entries {
        let at = now.saturating_sub(e.ago).as_micros();
        export += &format!(
            "__REALTIME_TIMESTAMP={at}\n_BOOT_ID={boot}\nSYSLOG_FACILITY={}\nSYSLOG_IDENTIFIER={}\n_PID={}\nMESSAGE={}\n\n",
            e.facility, e.ident, e.pid, e.message
        );
    }
    let mut child = std::process::Command::new(JOURNAL_REMOTE)
        .arg(format!("--output={}", dir.join("mail.journal").display()))
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(export.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{JOURNAL_REMOTE}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The breaker tripping from the journal on a Postfix that logs only
/// there. A private journald is not needed: the private Postfix writes its
/// real delivery lines to its own maillog_file, and the test is the
/// syslog transport, storing each as journald stores a syslog message
/// (MESSAGE, SYSLOG_IDENTIFIER, _PID, SYSLOG_FACILITY=2, the time) in a
/// journal file with systemd-journal-remote; the milter reads nothing but
/// that journal (`maillog: journal, journal_directory: DIR`), through the
/// real journalctl. Then: counted one by one, resumed from its cursor
/// after a restart (an entry logged while it was down counts, the ones
/// before do not count again, one older than the window and one of
/// another facility not at all), tripped at 3, 451 at RCPT.
#[test]
fn postfix_bounces_trip_the_breaker_from_the_journal() {
    let sink = support::SmtpSink::start_refusing_relay();
    let journal = tempfile::tempdir().unwrap();
    // journalctl needs a journal file to follow: one unrelated entry.
    journal_write(
        journal.path(),
        &[JournalEntry {
            ident: "kernel".into(),
            pid: "1".into(),
            message: "booted".into(),
            facility: 0,
            ago: Duration::ZERO,
        }],
    );
    let jdir = journal.path().to_owned();
    let Rig {
        tmp,
        config,
        state,
        pf,
        mut milter,
    } = rig_with("dualroute-breaker-journal-", &sink, |_| {
        format!(
            "{{ maillog: journal, journal_directory: {}, threshold: 3, window: 1h }}",
            jdir.display()
        )
    });
    let client = support::SmtpClient::new(pf.smtp_addr()).bind(support::OUTSIDE_IP);
    let diag = |milter: &MilterProcess| {
        format!(
            "{}\n--- milter log ---\n{}\n--- status ---\n{}",
            pf.diagnostics(),
            milter.log(),
            dualroute(&config, &["status"]).1
        )
    };
    // Sends to `rcpt`, waits for its bounce in Postfix's log, and returns
    // that line as a journal entry.
    let bounce_of = |milter: &MilterProcess, rcpt: &str| -> JournalEntry {
        let t = client.send(SENDER, &[rcpt], &message(rcpt));
        assert!(t.accepted(), "{t}\n{}", diag(milter));
        pf.wait_queue_empty();
        let routed = rcpt.replace("@example.com", "@example.com.dualroute.invalid");
        let d = support::poll(|| {
            pf.deliveries()
                .into_iter()
                .find(|d| d.to == routed && d.status == "bounced")
        })
        .unwrap_or_else(|| panic!("no bounce of {routed}\n{}", diag(milter)));
        JournalEntry::from_syslog(&d.line)
    };
    let counted = |milter: &MilterProcess, n: u32| {
        milter
            .log()
            .matches(&format!("({n} of 3 within 1h"))
            .count()
    };
    let wait_for = |milter: &MilterProcess, what: &str, probe: &dyn Fn() -> bool| {
        if support::poll(|| probe().then_some(())).is_none() {
            panic!("timed out waiting for {what}\n{}", diag(milter));
        }
    };

    // The breaker reads the journal, and says so.
    wait_for(&milter, "journalctl to run", &|| {
        milter.log().contains("following the journal in")
    });
    let source = || {
        dualroute::state::StateDir::new(&state)
            .breaker_counts()
            .unwrap()
            .and_then(|c| c.source)
    };
    wait_for(&milter, "the source recorded as readable", &|| {
        source().is_some_and(|s| s.readable && s.name == "journal")
    });

    // 1. Two bounces, logged to the journal: counted one by one.
    let zed1 = bounce_of(&milter, "zed1@example.com");
    assert!(zed1.ident.ends_with("/smtp"), "{}", zed1.ident);
    journal_write(&jdir, &[zed1]);
    wait_for(&milter, "zed1 counted", &|| counted(&milter, 1) == 1);
    // zed1's cursor (the first entry of the mail facility), kept once it
    // is counted.
    let cursor = state.join("breaker-journal-cursor");
    wait_for(&milter, "the cursor saved", &|| cursor.exists());
    let first = fs::read_to_string(&cursor).unwrap();
    let zed2 = bounce_of(&milter, "zed2@example.com");
    // zed3 bounces now and reaches the journal while the milter is down.
    let zed3 = bounce_of(&milter, "zed3@example.com");
    journal_write(&jdir, &[zed2]);
    wait_for(&milter, "zed2 counted", &|| counted(&milter, 2) == 1);
    wait_for(&milter, "zed2's cursor saved", &|| {
        fs::read_to_string(&cursor).is_ok_and(|c| c != first)
    });

    // 2. Stopped; meanwhile zed3's bounce, one older than the window and
    // one of another facility are logged.
    milter.kill();
    let mut old = JournalEntry::from_syslog(&zed3_line(&zed3, "zedold"));
    old.ago = Duration::from_secs(2 * 3600);
    let mut daemon = JournalEntry::from_syslog(&zed3_line(&zed3, "zeddaemon"));
    daemon.facility = 3;
    journal_write(&jdir, &[old, daemon, zed3]);
    milter.spawn();
    // Resumed from the cursor: zed3 is the first count after the restart
    // (from the start, zed1 and zed2 would count again and trip; from the
    // end, zed3 would not count).
    wait_for(&milter, "zed3 counted after the restart", &|| {
        milter
            .log()
            .lines()
            .any(|l| l.contains("zed3@") && l.contains("(1 of 3 within 1h"))
    });
    std::thread::sleep(dualroute::breaker::POLL * 4);
    assert_eq!(counted(&milter, 2), 1, "counted twice\n{}", diag(&milter));
    let log = milter.log();
    assert!(
        !log.contains("zedold@"),
        "an entry older than the window counted\n{log}"
    );
    assert!(
        !log.contains("zeddaemon@"),
        "another facility counted\n{log}"
    );
    assert!(
        !state.join("example.com.tripped").exists(),
        "{}",
        diag(&milter)
    );

    // 3. Two more: tripped, and routing is off (451 at RCPT).
    let zed4 = bounce_of(&milter, "zed4@example.com");
    let zed5 = bounce_of(&milter, "zed5@example.com");
    journal_write(&jdir, &[zed4, zed5]);
    wait_for(&milter, "the trip", &|| {
        milter.log().contains("bounce breaker tripped")
    });
    let trip = fs::read_to_string(state.join("example.com.tripped")).unwrap();
    assert!(trip.contains("bounces: 3"), "{trip}");
    let st = dualroute(&config, &["status"]).1;
    assert!(st.contains("TRIPPED by the bounce breaker"), "{st}");
    let t = client.send(SENDER, &["zed6@example.com"], &message("tripped"));
    let reply = t.rcpt("zed6@example.com");
    assert_eq!(
        (reply.code, reply.enhanced()),
        (451, Some("4.4.4")),
        "{t}\n{}",
        diag(&milter)
    );
    drop(milter);
    drop(pf);
    if support::keep_tmp() {
        eprintln!("DUALROUTE_KEEP_TMP: kept {}", tmp.keep().display());
    }
}

/// zed3's bounce line, for another recipient.
fn zed3_line(zed3: &JournalEntry, local: &str) -> String {
    format!(
        "mx {}[{}]: {}",
        zed3.ident,
        zed3.pid,
        zed3.message.replace("zed3@", &format!("{local}@"))
    )
}

/// A journal the breaker cannot read is shown as not readable: here a
/// journal directory that does not exist (the milter runs as root in
/// the tests; permissions are tested as another user below).
#[tokio::test]
async fn task_shows_an_unreadable_journal() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let missing = dir.path().join("no-journal");
    let yaml = format!(
        "state_dir: {}\ndomains:{TASK_DOMAINS}breaker: {{ maillog: journal, journal_directory: {}, threshold: 3 }}\n",
        state.display(),
        missing.display()
    );
    let milter = support::protocol::Milter::serve(support::protocol::start(&yaml)).await;
    let source = || {
        dualroute::state::StateDir::new(&state)
            .breaker_counts()
            .unwrap()
            .and_then(|c| c.source)
    };
    support::wait_until("the journal recorded as not readable", || {
        let s = source();
        async move { s.filter(|s| !s.readable).map(|_| ()) }
    })
    .await;
    let s = source().unwrap();
    assert_eq!(s.name, "journal");
    assert!(s.error.contains("no-journal"), "{s:?}");
    let m = milter.metrics();
    assert!(
        m.contains("dualroute_breaker_source_readable{source=\"journal\"} 0"),
        "{m}"
    );
}

/// `check`'s test of the source runs as the service user with its groups
/// and the unit's SupplementaryGroups (src/breaker/access.rs): a journal
/// file of group systemd-journal, mode 0640, is not readable by `nobody`,
/// and is with `SupplementaryGroups=systemd-journal` in a drop-in. Needs
/// root (setpriv).
#[test]
fn check_tests_the_journal_as_the_service_user() {
    use dualroute::breaker::access::check_as;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let jdir = dir.path().join("journal");
    fs::create_dir(&jdir).unwrap();
    journal_write(
        &jdir,
        &[JournalEntry::from_syslog(&format!(
            "mx postfix/smtp[1]: {}",
            "x"
        ))],
    );
    let file = jdir.join("mail.journal");
    let chgrp = std::process::Command::new("chgrp")
        .args(["systemd-journal"])
        .arg(&file)
        .status()
        .unwrap();
    assert!(
        chgrp.success(),
        "no group systemd-journal (package systemd)"
    );
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
    let config = dualroute::config::parse(
        &format!(
            "domains: {{}}\nbreaker: {{ maillog: journal, journal_directory: {} }}\n",
            jdir.display()
        ),
        "milter.yaml",
    )
    .unwrap()
    .breaker
    .unwrap();
    let units = dir.path().join("units");
    let dropin = units.join("dualroute.service.d");
    fs::create_dir_all(&dropin).unwrap();
    let e = check_as(&config, "nobody", std::slice::from_ref(&units)).unwrap_err();
    assert!(
        e.contains("NOT readable as user nobody")
            && e.contains("mail.journal")
            && e.contains("SupplementaryGroups")
            && e.contains("systemd-journal"),
        "{e}"
    );
    fs::write(
        dropin.join("override.conf"),
        "[Service]\nSupplementaryGroups=systemd-journal\n",
    )
    .unwrap();
    let ok = check_as(&config, "nobody", &[units]).unwrap();
    assert!(
        ok.contains("readable as user nobody") && ok.contains("systemd-journal from the unit"),
        "{ok}"
    );
}

/// The cost of the journal path against the file path (BENCHMARKS.md,
/// "Issue 25: breaker from the journal"): N Postfix bounce lines, as a
/// file read and parsed, and as journal entries that journalctl writes as
/// JSON and the breaker turns back into lines and parses. Prints CPU
/// seconds; not a pass/fail test:
///
///     cargo test --release --test breaker journal_cost -- --ignored --nocapture
#[test]
#[ignore]
fn journal_cost() {
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let line = |i: usize| POSTFIX_RELAY_DENIED.replace("zed@", &format!("zed{i}@"));
    // The file path: read and parse.
    let file = dir.path().join("mail.log");
    let text: String = (0..N).map(|i| line(i) + "\n").collect();
    fs::write(&file, "").unwrap();
    let mut f = Follower::at_end(&file);
    append(&file, &text);
    let t = Instant::now();
    let mut read = 0;
    let mut failures = 0;
    while read < N {
        let lines = f.poll();
        if lines.is_empty() {
            break;
        }
        read += lines.len();
        failures += lines.iter().filter_map(|l| parse_line(l)).count();
    }
    let file_secs = t.elapsed().as_secs_f64();
    assert_eq!(failures, N);
    // The journal path: journalctl's JSON (its own CPU measured by
    // time(1)), then entry() and parse_line.
    let jdir = dir.path().join("journal");
    fs::create_dir(&jdir).unwrap();
    let entries: Vec<JournalEntry> = (0..N)
        .map(|i| JournalEntry::from_syslog(&line(i)))
        .collect();
    journal_write(&jdir, &entries);
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%U %S", "journalctl", "--directory"])
        .arg(&jdir)
        .args(["--output=json", "--no-pager", "SYSLOG_FACILITY=2"])
        .output()
        .unwrap();
    let times = String::from_utf8_lossy(&out.stderr);
    let jctl: f64 = times
        .split_whitespace()
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    let t = Instant::now();
    let now = std::time::SystemTime::now();
    let mut failures = 0;
    for json in out.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        if let Some((Some(e), _)) = dualroute::breaker::journal::entry(json, now) {
            failures += usize::from(parse_line(&e.line).is_some());
        }
    }
    let ours = t.elapsed().as_secs_f64();
    assert_eq!(failures, N);
    let us = |s: f64| s * 1e6 / N as f64;
    println!(
        "{N} bounce lines\nfile:    {file_secs:.3} s ({:.2} µs/line) read and parsed\njournal: {jctl:.3} s journalctl (user+sys, {:.2} µs/entry) + {ours:.3} s JSON to line and parsed ({:.2} µs/entry); JSON {} bytes, file {} bytes",
        us(file_secs),
        us(jctl),
        us(ours),
        out.stdout.len(),
        text.len()
    );
}

/// `maillog: journal` is the keyword, anything else a path (relative to
/// milter.yaml); an empty value and a `journal_directory` beside a log
/// file are errors at their file:line.
#[test]
fn maillog_is_the_journal_or_a_path() {
    use dualroute::config::{parse, Maillog};
    let breaker = |yaml: &str| parse(&format!("domains: {{}}\n{yaml}"), "milter.yaml");
    let b = breaker("breaker:\n  maillog: journal\n  journal_directory: /j\n")
        .unwrap()
        .breaker
        .unwrap();
    assert_eq!(b.maillog, Maillog::Journal);
    assert_eq!(b.journal_directory, Some(PathBuf::from("/j")));
    let b = breaker("breaker: { maillog: /var/log/mail.log }\n")
        .unwrap()
        .breaker
        .unwrap();
    assert_eq!(b.maillog, Maillog::File("/var/log/mail.log".into()));
    let e = breaker("breaker:\n  maillog: \"\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("milter.yaml:3:") && e.contains("write `journal`"),
        "{e}"
    );
    let e = breaker("breaker:\n  maillog: /var/log/mail.log\n  journal_directory: /j\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("milter.yaml:3:") && e.contains("with `maillog: journal` only"),
        "{e}"
    );
    // Relative to the configuration file, as before.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.yaml");
    fs::write(&path, "domains: {}\nbreaker: { maillog: mail.log }\n").unwrap();
    let c = dualroute::config::read_file(&path).unwrap();
    assert_eq!(
        c.breaker.unwrap().maillog,
        Maillog::File(dir.path().join("mail.log"))
    );
}
