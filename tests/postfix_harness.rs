//! Tests of the end-to-end harness itself (tests/support/): a
//! private Postfix delivers to Maildirs, relays to an smtp-sink through
//! transport_maps and smtp_generic_maps, and rejects what it should. Every
//! later end-to-end test stands on these. They need root and Postfix
//! (scripts/test-deps.sh).

mod support;

use support::{
    is_listening, processes_in, xtext_encode, Postfix, PostfixOptions, SmtpClient, SmtpSink,
    OUTSIDE_IP,
};

const SENDER: &str = "sender@outside.test";

fn message(subject: &str) -> String {
    format!("From: {SENDER}\nSubject: {subject}\n\n{subject}\n.a line that starts with a dot\n")
}

#[test]
fn virtual_mailbox_and_catchall_deliveries() {
    let pf = Postfix::start(
        PostfixOptions::default().domain("example.com", &["alice@example.com", "bob@example.com"]),
    );
    let client = SmtpClient::new(pf.smtp_addr()).bind(OUTSIDE_IP);

    let t = client.send(SENDER, &["alice@example.com"], &message("for alice"));
    assert!(t.accepted(), "{t}");
    assert!(t.queue_id().is_some(), "{t}");
    pf.wait_queue_empty();

    let alice = pf.maildir_messages("alice@example.com");
    assert_eq!(alice.len(), 1, "{}", pf.diagnostics());
    assert!(alice[0].text.contains("\nfor alice\n"), "{}", alice[0].text);
    // Dot-stuffing was undone by Postfix: the line arrives as written.
    assert!(alice[0].text.contains("\n.a line that starts with a dot\n"));
    assert_eq!(alice[0].header("Delivered-To"), ["alice@example.com"]);
    assert!(pf.maildir_messages("bob@example.com").is_empty());
    assert!(pf.maildir_messages("@example.com").is_empty());

    let t = client.send(SENDER, &["nobody@example.com"], &message("for nobody"));
    assert!(t.accepted(), "{t}");
    pf.wait_queue_empty();

    let catchall = pf.maildir_messages("@example.com");
    assert_eq!(catchall.len(), 1, "{}", pf.diagnostics());
    assert_eq!(catchall[0].header("X-Original-To"), ["nobody@example.com"]);
    assert_eq!(pf.maildir_messages("alice@example.com").len(), 1);

    let deliveries = pf.wait_deliveries(2);
    let to: Vec<(&str, &str, &str)> = deliveries
        .iter()
        .map(|d| (d.agent.as_str(), d.to.as_str(), d.status.as_str()))
        .collect();
    assert_eq!(
        to,
        [
            ("virtual", "alice@example.com", "sent"),
            ("virtual", "nobody@example.com", "sent")
        ]
    );
    assert!(pf.bounced().is_empty(), "{}", pf.diagnostics());
    pf.assert_no_deferred_or_held();
}

#[test]
fn relay_domain_reaches_the_sink_with_notify_and_orcpt() {
    let sink = SmtpSink::start();
    let pf = Postfix::start(
        PostfixOptions::default()
            .map(
                "transport",
                &format!("example.com.dualroute.invalid smtp:{}\n", sink.nexthop()),
            )
            // A bare map name: the harness points it at the config directory.
            .main_cf("transport_maps = hash:transport"),
    );
    assert_eq!(
        pf.postconf("transport_maps"),
        format!("hash:{}/transport", pf.config_dir().display())
    );

    // From 127.0.0.1, which is in mynetworks, so relaying is allowed.
    let rcpt = format!(
        "bob@example.com.dualroute.invalid NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;{}",
        xtext_encode("bob+news@example.com")
    );
    let t = SmtpClient::new(pf.smtp_addr()).send(SENDER, &[&rcpt], &message("relayed"));
    assert!(t.accepted(), "{t}");
    pf.wait_queue_empty();

    let messages = sink.wait_messages(1);
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let m = &messages[0];
    assert_eq!(m.mail_from(), SENDER);
    assert_eq!(m.client_addr, "127.0.0.1");
    assert_eq!(m.rcpt_addresses(), ["bob@example.com.dualroute.invalid"]);
    let rcpt = &m.rcpts[0];
    assert_eq!(rcpt.notify(), Some("SUCCESS,FAILURE"));
    // Postfix xtext-encodes ORCPT ('+' is +2B); orcpt() decodes it.
    assert_eq!(rcpt.param("ORCPT"), Some("rfc822;bob+2Bnews@example.com"));
    assert_eq!(rcpt.orcpt().as_deref(), Some("rfc822;bob+news@example.com"));
    assert_eq!(m.header("Subject"), ["relayed"]);
    assert!(m.text.contains("\nrelayed\n"), "{}", m.text);

    let deliveries = pf.wait_deliveries(1);
    assert_eq!(deliveries[0].status, "sent", "{}", pf.diagnostics());
    assert_eq!(
        deliveries[0].relay,
        format!("127.0.0.1[127.0.0.1]:{}", sink.port())
    );
    pf.assert_no_deferred_or_held();
}

/// The mechanism `dualroute postfix-config` relies on (docs/design.md §4): a
/// dedicated smtp transport whose smtp_generic_maps turns the relay domain
/// back into the real one, on RCPT TO only (§8: not ORCPT).
#[test]
fn dedicated_transport_restores_the_domain_with_generic_maps() {
    let sink = SmtpSink::start();
    let pf = Postfix::start(
        PostfixOptions::default()
            .map(
                "dualroute_transport",
                &format!("example.com.dualroute.invalid dualroute:{}\n", sink.nexthop()),
            )
            .map("dualroute_generic", "@example.com.dualroute.invalid @example.com\n")
            // As `dualroute postfix-config` would print them for /etc/postfix.
            .main_cf("transport_maps = hash:/etc/postfix/dualroute_transport")
            .master_cf(
                "dualroute unix - - n - - smtp -o smtp_generic_maps=hash:/etc/postfix/dualroute_generic",
            ),
    );

    let t = SmtpClient::new(pf.smtp_addr()).send(
        SENDER,
        &[
            "bob@example.com.dualroute.invalid NOTIFY=NEVER ORCPT=rfc822;bob@example.com",
            "carol@example.com.dualroute.invalid",
        ],
        &message("generic"),
    );
    assert!(t.accepted(), "{t}");
    pf.wait_queue_empty();

    let messages = sink.wait_messages(1);
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let m = &messages[0];
    assert_eq!(m.rcpt_addresses(), ["bob@example.com", "carol@example.com"]);
    let bob = m.rcpt("bob@example.com").unwrap();
    assert_eq!(bob.notify(), Some("NEVER"));
    assert_eq!(bob.orcpt().as_deref(), Some("rfc822;bob@example.com"));
    // Without an ORCPT from the client, Postfix sends the address it
    // received, before the generic rewrite: the relay address leaks in
    // ORCPT. That is why the milter adds ORCPT itself (docs/design.md §4).
    let carol = m.rcpt("carol@example.com").unwrap();
    assert_eq!(
        carol.orcpt().as_deref(),
        Some("rfc822;carol@example.com.dualroute.invalid")
    );
    pf.assert_no_deferred_or_held();
}

#[test]
fn rejected_recipients_get_5xx_and_the_rest_is_delivered() {
    let pf = Postfix::start(
        PostfixOptions::default().domain_without_catchall("example.com", &["alice@example.com"]),
    );
    let t = SmtpClient::new(pf.smtp_addr()).bind(OUTSIDE_IP).send(
        SENDER,
        &[
            "someone@elsewhere.test",
            "zed@example.com",
            "alice@example.com",
        ],
        &message("mixed"),
    );
    let relay = t.rcpt("someone@elsewhere.test");
    assert_eq!((relay.code, relay.enhanced()), (554, Some("5.7.1")), "{t}");
    assert!(relay.text.contains("Relay access denied"), "{t}");
    let unknown = t.rcpt("zed@example.com");
    assert_eq!(
        (unknown.code, unknown.enhanced()),
        (550, Some("5.1.1")),
        "{t}"
    );
    assert_eq!(t.rcpt("alice@example.com").code, 250, "{t}");
    assert!(t.accepted(), "{t}");
    pf.wait_queue_empty();
    assert_eq!(pf.maildir_messages("alice@example.com").len(), 1);
    // The rejection is in the log too.
    assert!(
        pf.maillog()
            .contains("NOQUEUE: reject: RCPT from unknown[127.0.0.2]"),
        "{}",
        pf.diagnostics()
    );

    // Nothing accepted: no DATA at all.
    let t = SmtpClient::new(pf.smtp_addr()).bind(OUTSIDE_IP).send(
        SENDER,
        &["someone@elsewhere.test"],
        &message("none"),
    );
    assert!(t.reply("DATA").is_none(), "{t}");
    assert!(!t.accepted(), "{t}");
}

#[test]
fn sink_rejection_is_a_logged_bounce() {
    let sink = SmtpSink::start_rejecting();
    let pf = Postfix::start(
        PostfixOptions::default()
            .map(
                "transport",
                &format!("example.com.dualroute.invalid smtp:{}\n", sink.nexthop()),
            )
            .main_cf("transport_maps = hash:$config_directory/transport"),
    );
    let t = SmtpClient::new(pf.smtp_addr()).send(
        SENDER,
        &["bob@example.com.dualroute.invalid"],
        &message("rejected"),
    );
    assert!(t.accepted(), "{t}");
    pf.wait_queue_empty();

    let bounced = pf.bounced();
    let bob = bounced
        .iter()
        .find(|d| d.to == "bob@example.com.dualroute.invalid")
        .unwrap_or_else(|| panic!("no bounce for bob\n{}", pf.diagnostics()));
    assert_eq!(bob.dsn, "5.1.1");
    assert!(
        bob.text.contains("recipient rejected by smtp-sink"),
        "{}",
        bob.line
    );
    // The non-delivery notice to the outside sender is bounced by the
    // error transport: nothing leaves loopback.
    let notice = bounced.iter().find(|d| d.to == SENDER);
    assert_eq!(
        notice.map(|d| d.agent.as_str()),
        Some("error"),
        "{}",
        pf.diagnostics()
    );
    assert!(sink.messages().is_empty());
}

/// docs/design.md §8: with the milter down and milter_default_action = tempfail,
/// Postfix answers 451 4.7.1 at MAIL.
#[test]
fn unreachable_milter_tempfails_at_mail() {
    // Reserved, never listening: Postfix's connection is refused.
    let milter = support::Port::reserve();
    let pf = Postfix::start(
        PostfixOptions::default()
            .domain("example.com", &["alice@example.com"])
            .milter(&format!("inet:127.0.0.1:{milter}")),
    );
    let t = SmtpClient::new(pf.smtp_addr()).bind(OUTSIDE_IP).send(
        SENDER,
        &["alice@example.com"],
        &message("milter down"),
    );
    let mail = t.mail();
    assert_eq!((mail.code, mail.enhanced()), (451, Some("4.7.1")), "{t}");
    assert!(t.reply("RCPT").is_none(), "{t}");
    assert!(pf.queue().is_empty());
}

#[test]
fn drop_leaves_no_daemon_behind() {
    let pf = Postfix::start(PostfixOptions::default().domain("example.com", &[]));
    let port = pf.port();
    let queue = pf.queue_dir();
    let root = pf.dir().to_path_buf();
    assert!(is_listening(port));
    assert!(!processes_in(&queue).is_empty());
    drop(pf);
    assert!(!is_listening(port), "smtpd port {port} still open");
    assert_eq!(processes_in(&queue), Vec::<u32>::new());
    if std::env::var_os("DUALROUTE_KEEP_TMP").is_none() {
        assert!(!root.exists(), "{} was not removed", root.display());
    }

    let sink = SmtpSink::start();
    let port = sink.port();
    drop(sink);
    assert!(!is_listening(port), "smtp-sink port {port} still open");
}
