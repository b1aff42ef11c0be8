//! The end-to-end scenarios every MTA runs, written once (issue 22 §Tests):
//! split, dual, route, per-user rules, require_gateway, one message with
//! every kind of recipient, the milter down, routing off, and a loop.
//!
//! A scenario describes a [`World`] (the `domains:` of milter.yaml, the
//! mailboxes here, the domains of the other server), sends real SMTP
//! through an [`Mta`] and checks the real effects: the SMTP replies, what
//! was delivered here, what the other server received (RCPT, ORCPT,
//! NOTIFY, the X-Dualroute header), the MTA's log and the milter's log.
//! tests/postfix_e2e.rs and tests/sendmail_e2e.rs each implement [`Mta`]
//! for their running scenario and call [`shared_scenarios!`], which makes
//! one `#[test]` per scenario, so a failure names both the MTA (the test
//! binary) and the scenario. What only one MTA can do stays in its file.

use super::{message, poll, SinkMessage, SinkRcpt, SmtpSink, SmtpTranscript, WAIT};
use super::{GATEWAY_IP, INSTANCE, OTHER_IP, OUTSIDE_IP, SENDER};
use std::net::{IpAddr, Ipv4Addr};

/// What a scenario needs before the MTA starts.
pub struct World {
    /// The `domains:` section of milter.yaml, two spaces per level below
    /// `domains:`; `{OTHER}` becomes the other server's `[127.0.0.1]:PORT`.
    pub domains: String,
    /// Domains whose mail is delivered here, with their mailboxes, and
    /// whether the MTA itself accepts every address of the domain (Postfix:
    /// a catch-all of the harness's own; otherwise Postfix refuses an
    /// unknown address itself unless the generated `dualroute_catchall`
    /// covers the domain). Sendmail relays every address of these
    /// domains to the mail store.
    pub mailboxes: Vec<(String, Vec<String>, bool)>,
    /// Domains (per-user targets, `change_envelope` destinations) that
    /// the MTA sends to the other server: there is no DNS here.
    pub elsewhere: Vec<String>,
    pub gateways: Vec<IpAddr>,
}

impl World {
    fn new(domains: &str) -> World {
        World {
            domains: domains.to_owned(),
            mailboxes: Vec::new(),
            elsewhere: Vec::new(),
            gateways: Vec::new(),
        }
    }

    fn mailboxes(mut self, domain: &str, accounts: &[&str]) -> World {
        let accounts = accounts.iter().map(|a| a.to_string()).collect();
        self.mailboxes.push((domain.to_owned(), accounts, false));
        self
    }

    fn mailboxes_accept_all(mut self, domain: &str, accounts: &[&str]) -> World {
        let accounts = accounts.iter().map(|a| a.to_string()).collect();
        self.mailboxes.push((domain.to_owned(), accounts, true));
        self
    }

    fn elsewhere(mut self, domain: &str) -> World {
        self.elsewhere.push(domain.to_owned());
        self
    }

    fn gateway(mut self, ip: IpAddr) -> World {
        self.gateways.push(ip);
        self
    }
}

/// A message delivered here: the mailbox it is in (`alice@example.com`;
/// anything that is not a mailbox, such as a catch-all, is named so that
/// it matches no address) and its text.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub mailbox: String,
    pub text: String,
}

impl Delivered {
    pub fn header(&self, name: &str) -> Vec<String> {
        super::header_values(&self.text, name)
    }
}

/// What a scenario needs from a running MTA with the milter in front of it
/// and the other server (an `smtp-sink`) behind it.
pub trait Mta: Sized {
    /// The MTA with milter.yaml, the MTA's configuration from
    /// `dualroute {postfix,sendmail}-config`, and `dualroute run`.
    fn start(world: &World) -> Self;
    /// One SMTP transaction from client address `from`.
    fn send(&self, from: IpAddr, rcpts: &[&str], message: &str) -> SmtpTranscript;
    /// Waits until the MTA's queue is empty; fails on anything deferred,
    /// held or bounced.
    fn settle(&self);
    /// Whether the queue is empty now (right after a refusal).
    fn queue_is_empty(&self) -> bool;
    /// Every message delivered here so far.
    fn here(&self) -> Vec<Delivered>;
    /// The other server.
    fn other(&self) -> &SmtpSink;
    /// Every `smtp-sink` the MTA delivers to (the other server, and
    /// Sendmail's mail store).
    fn sinks(&self) -> Vec<&SmtpSink>;
    /// How many recipients the MTA's log says it handed to the sinks
    /// (`status=sent` / `stat=Sent` lines).
    fn logged_sent_to_sinks(&self) -> usize;
    /// The MTA log line of the delivery of `envelope` to the other server;
    /// fails when there is none or it was not sent.
    fn logged_sent(&self, envelope: &str) -> String;
    /// The address the other server receives for a recipient the milter
    /// set to `envelope`: Postfix's `smtp_generic_maps` (from
    /// postfix-config) turns `local@domain.dualroute.invalid` back into
    /// the original address; Sendmail sends it as it is (docs/sendmail.md).
    fn at_other_server(&self, envelope: &str) -> String;
    /// The queue id in the reply to the end of data.
    fn queue_id(&self, t: &SmtpTranscript) -> Option<String>;
    fn milter_log(&self) -> String;
    fn kill_milter(&mut self);
    fn restart_milter(&mut self);
    /// The refusal while the milter is down (`milter_default_action =
    /// tempfail`, Sendmail's `F=T`): the commands it may come at and its
    /// code and enhanced status.
    fn milter_down_refusal(&self) -> (&'static [&'static str], u16, &'static str);
    /// Everything that helps understand a failure.
    fn diag(&self) -> String;
    /// Checks of the MTA's own for a scenario, beside the shared ones.
    /// `scenario` is the name of the scenario's function.
    fn also(&self, _scenario: &str) {}
}

/// A recipient as the other server received it, with its message.
#[derive(Clone, Debug)]
pub struct Received {
    pub rcpt: SinkRcpt,
    pub message: SinkMessage,
}

/// Every RCPT a sink received, over all its messages.
pub fn received(sink: &SmtpSink) -> Vec<Received> {
    sink.messages()
        .into_iter()
        .flat_map(|m| {
            m.rcpts.clone().into_iter().map(move |rcpt| Received {
                rcpt,
                message: m.clone(),
            })
        })
        .collect()
}

/// The positive barrier before "nothing else arrived": once the queue is
/// empty, every recipient the MTA handed to a sink has its RCPT in a
/// sink's dump (smtp-sink closes the dump file before it answers the
/// final dot) and its line in the MTA's log (written a moment later:
/// Postfix's postlogd and syslog both write asynchronously). Waits until
/// the two counts agree; a duplicate is an extra line and an extra RCPT,
/// and the scenario's exact comparisons then fail, never a race.
pub fn sinks_settled<M: Mta>(m: &M) {
    let count = || m.sinks().iter().map(|s| received(s).len()).sum::<usize>();
    let agreed = poll(|| {
        let sent = m.logged_sent_to_sinks();
        (count() == sent).then_some(())
    });
    assert!(
        agreed.is_some(),
        "after {WAIT:?} the MTA's log says {} recipients were sent to the sinks, the sinks have {}\n{}",
        m.logged_sent_to_sinks(),
        count(),
        m.diag()
    );
}

/// The sorted mailboxes that got mail here.
fn here_sorted<M: Mta>(m: &M) -> Vec<String> {
    let mut here: Vec<String> = m.here().into_iter().map(|d| d.mailbox).collect();
    here.sort();
    here
}

/// Exactly these mailboxes (in any order) got mail here.
fn assert_here<M: Mta>(m: &M, expected: &[&str]) {
    assert_eq!(
        here_sorted(m),
        sorted(expected),
        "delivered here\n{}",
        m.diag()
    );
}

/// The other server received exactly these RCPTs (in any order).
fn assert_there<M: Mta>(m: &M, expected: &[&str]) {
    let mut there: Vec<String> = received(m.other())
        .into_iter()
        .map(|r| r.rcpt.address)
        .collect();
    there.sort();
    assert_eq!(
        there,
        sorted(expected),
        "received by the other server\n{}",
        m.diag()
    );
}

/// The one RCPT `there` at the other server, routed by the milter: ORCPT
/// names `original`, the message carries our X-Dualroute header once.
fn routed<M: Mta>(m: &M, there: &str, original: &str) -> Received {
    let r = other_rcpt(m, there);
    assert_eq!(
        r.rcpt.orcpt(),
        Some(format!("rfc822;{original}")),
        "{there}\n{}",
        m.diag()
    );
    assert_eq!(r.message.header("X-Dualroute"), [INSTANCE], "{there}");
    r
}

/// The one RCPT of `address` at the other server.
fn other_rcpt<M: Mta>(m: &M, address: &str) -> Received {
    let mut found: Vec<Received> = received(m.other())
        .into_iter()
        .filter(|r| r.rcpt.address == address)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "RCPTs for {address} at the other server\n{}",
        m.diag()
    );
    found.remove(0)
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn send_ok<M: Mta>(m: &M, from: IpAddr, rcpts: &[&str], subject: &str) -> SmtpTranscript {
    let t = m.send(from, rcpts, &message(subject));
    assert!(t.accepted(), "{t}\n{}", m.diag());
    t
}

/// The milter logged a line with this message's queue id and `words`.
pub fn milter_logged<M: Mta>(m: &M, t: &SmtpTranscript, words: &[&str]) {
    let queue_id = m
        .queue_id(t)
        .unwrap_or_else(|| panic!("no queue id in the reply to DATA: {t}"));
    let found = poll(|| {
        m.milter_log()
            .lines()
            .any(|l| l.contains(&queue_id) && words.iter().all(|w| l.contains(w)))
            .then_some(())
    });
    assert!(
        found.is_some(),
        "no milter log line with queue id {queue_id} and {words:?}\n{}",
        m.diag()
    );
}

/// The MTA is done with every message and the sinks hold what it sent.
fn settle<M: Mta>(m: &M) {
    m.settle();
    sinks_settled(m);
}

const SPLIT: &str = r#"  example.com:
    mode: split
    destination: { hosts: ["{OTHER}"] }
    accounts: [{ list: [alice@example.com, bob@example.com] }]
"#;

/// split: present here only; unknown only at the other server, with ORCPT
/// naming the original and X-Dualroute once; nothing in a catch-all; the
/// MTA's log shows the routing address going out, the milter's log the
/// decision under the message's queue id.
pub fn split_keeps_present_and_routes_unknown_with_orcpt<M: Mta>() {
    let e = M::start(
        &World::new(SPLIT).mailboxes("example.com", &["alice@example.com", "bob@example.com"]),
    );
    let t = send_ok(
        &e,
        OUTSIDE_IP,
        &["alice@example.com", "zed@example.com"],
        "split",
    );
    assert_eq!(t.rcpt("alice@example.com").code, 250, "{t}");
    assert_eq!(t.rcpt("zed@example.com").code, 250, "{t}");
    settle(&e);

    let here = e.here();
    assert_here(&e, &["alice@example.com"]);
    // The MTA delivers the message the milter changed: the header is there.
    assert_eq!(here[0].header("X-Dualroute"), [INSTANCE], "{}", e.diag());

    let zed_there = e.at_other_server("zed@example.com.dualroute.invalid");
    assert_there(&e, &[&zed_there]);
    let zed = routed(&e, &zed_there, "zed@example.com");
    assert_eq!(zed.message.mail_from(), SENDER);
    assert_eq!(zed.message.header("Subject"), ["split"]);
    assert!(zed.message.text.contains("body of split"));
    e.logged_sent("zed@example.com.dualroute.invalid");
    milter_logged(
        &e,
        &t,
        &[
            "zed@example.com",
            "redirect to zed@example.com.dualroute.invalid",
        ],
    );
    e.also("split_keeps_present_and_routes_unknown_with_orcpt");
}

/// dual: present here and at the other server (NOTIFY=NEVER with `bounce:
/// false`, NOTIFY=FAILURE with `bounce: true`, ORCPT the original);
/// unknown refused 550 5.1.1 at RCPT and delivered nowhere. Postfix
/// refuses zed@example.com itself (no catch-all there), the milter
/// yan@example.org (the MTA accepts every address of example.org).
pub fn dual_copies_present_and_refuses_unknown<M: Mta>() {
    let e = M::start(
        &World::new(
            r#"  example.com:
    mode: dual
    destination: { hosts: ["{OTHER}"] }
    bounce: false
    accounts: [{ list: [alice@example.com] }]
  example.org:
    mode: dual
    destination: { hosts: ["{OTHER}"] }
    bounce: true
    accounts: [{ list: [frank@example.org] }]
"#,
        )
        .mailboxes("example.com", &["alice@example.com"])
        .mailboxes_accept_all("example.org", &["frank@example.org"]),
    );
    let t = e.send(
        OUTSIDE_IP,
        &[
            "alice@example.com",
            "zed@example.com",
            "frank@example.org",
            "yan@example.org",
        ],
        &message("dual"),
    );
    for unknown in ["zed@example.com", "yan@example.org"] {
        let r = t.rcpt(unknown);
        assert_eq!(
            (r.code, r.enhanced()),
            (550, Some("5.1.1")),
            "{t}\n{}",
            e.diag()
        );
    }
    assert_eq!(t.rcpt("alice@example.com").code, 250, "{t}");
    assert_eq!(t.rcpt("frank@example.org").code, 250, "{t}");
    assert!(t.accepted(), "{t}\n{}", e.diag());
    settle(&e);

    assert_here(&e, &["alice@example.com", "frank@example.org"]);
    let (alice_there, frank_there) = (
        e.at_other_server("alice@example.com.dualroute.invalid"),
        e.at_other_server("frank@example.org.dualroute.invalid"),
    );
    assert_there(&e, &[&alice_there, &frank_there]);
    let alice = routed(&e, &alice_there, "alice@example.com");
    assert_eq!(alice.rcpt.notify(), Some("NEVER"), "{}", e.diag());
    let frank = routed(&e, &frank_there, "frank@example.org");
    assert_eq!(frank.rcpt.notify(), Some("FAILURE"), "{}", e.diag());
    // The copies kept here too went through the milter once.
    for d in e.here() {
        assert_eq!(d.header("X-Dualroute"), [INSTANCE], "{}", d.mailbox);
    }
    e.also("dual_copies_present_and_refuses_unknown");
}

/// route: nothing stays here (neither the mailbox nor a catch-all),
/// everything goes to the other server with ORCPT the original.
pub fn route_sends_everything_to_the_destination<M: Mta>() {
    let e = M::start(
        &World::new(
            r#"  example.com:
    mode: route
    destination: { hosts: ["{OTHER}"] }
    accounts: [{ list: [alice@example.com] }]
"#,
        )
        .mailboxes("example.com", &["alice@example.com"]),
    );
    let t = send_ok(
        &e,
        OUTSIDE_IP,
        &["alice@example.com", "zed@example.com"],
        "route",
    );
    settle(&e);

    let alice_there = e.at_other_server("alice@example.com.dualroute.invalid");
    let zed_there = e.at_other_server("zed@example.com.dualroute.invalid");
    assert_there(&e, &[&alice_there, &zed_there]);
    routed(&e, &alice_there, "alice@example.com");
    routed(&e, &zed_there, "zed@example.com");
    assert_here(&e, &[]);
    milter_logged(
        &e,
        &t,
        &[
            "redirect to alice@example.com.dualroute.invalid",
            "redirect to zed@example.com.dualroute.invalid",
        ],
    );
    e.also("route_sends_everything_to_the_destination");
}

/// Per-user rules: copy_to (kept here and copied), redirect_to (only
/// there), keep in a route domain (only here); everyone else by the mode.
pub fn per_user_copy_redirect_and_keep<M: Mta>() {
    let e = M::start(
        &World::new(
            r#"  example.com:
    mode: split
    destination: { hosts: ["{OTHER}"] }
    accounts: [{ list: [alice@example.com, carol@example.com, dave@example.com] }]
    users:
      carol@example.com: { copy_to: [carol@pilot.test] }
      dave@example.com: { redirect_to: dave@pilot.test }
  example.net:
    mode: route
    destination: { hosts: ["{OTHER}"] }
    accounts: [{ list: [erin@example.net, gus@example.net] }]
    users:
      erin@example.net: { keep: true }
"#,
        )
        .mailboxes(
            "example.com",
            &["alice@example.com", "carol@example.com", "dave@example.com"],
        )
        .mailboxes("example.net", &["erin@example.net", "gus@example.net"])
        .elsewhere("pilot.test"),
    );
    let t = send_ok(
        &e,
        OUTSIDE_IP,
        &[
            "alice@example.com",
            "carol@example.com",
            "dave@example.com",
            "erin@example.net",
            "gus@example.net",
        ],
        "pilots",
    );
    settle(&e);

    assert_here(
        &e,
        &["alice@example.com", "carol@example.com", "erin@example.net"],
    );
    let gus_there = e.at_other_server("gus@example.net.dualroute.invalid");
    assert_there(&e, &["carol@pilot.test", "dave@pilot.test", &gus_there]);
    let carol = routed(&e, "carol@pilot.test", "carol@example.com");
    assert_eq!(carol.rcpt.notify(), Some("NEVER"), "a copy, bounce: false");
    routed(&e, "dave@pilot.test", "dave@example.com");
    routed(&e, &gus_there, "gus@example.net");
    milter_logged(
        &e,
        &t,
        &[
            "copy to carol@pilot.test",
            "redirect to dave@pilot.test",
            "erin@example.net> keep",
        ],
    );
    e.also("per_user_copy_redirect_and_keep");
}

/// `require_gateway: true`: other clients (from mynetworks or not) are
/// refused 550 5.7.1 at RCPT and nothing is queued; from the gateway
/// nothing is routed: alice is delivered here, zed (no mailbox) is refused
/// 550 5.1.1 by the milter.
pub fn require_gateway_refuses_other_clients<M: Mta>() {
    let e = M::start(
        &World::new(
            r#"  example.com:
    mode: split
    require_gateway: true
    destination: { hosts: ["{OTHER}"] }
    accounts: [{ list: [alice@example.com] }]
"#,
        )
        .mailboxes("example.com", &["alice@example.com"])
        .gateway(GATEWAY_IP),
    );
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), OTHER_IP] {
        let t = e.send(
            ip,
            &["alice@example.com", "zed@example.com"],
            &message("direct"),
        );
        for rcpt in ["alice@example.com", "zed@example.com"] {
            let r = t.rcpt(rcpt);
            assert_eq!(
                (r.code, r.enhanced()),
                (550, Some("5.7.1")),
                "from {ip}: {t}\n{}",
                e.diag()
            );
        }
        assert!(!t.accepted(), "{t}");
    }
    assert!(e.queue_is_empty(), "{}", e.diag());

    let t = send_ok(
        &e,
        GATEWAY_IP,
        &["alice@example.com", "zed@example.com"],
        "via the gateway",
    );
    assert_eq!(t.rcpt("alice@example.com").code, 250, "{t}");
    let zed = t.rcpt("zed@example.com");
    assert_eq!(
        (zed.code, zed.enhanced()),
        (550, Some("5.1.1")),
        "{t}\n{}",
        e.diag()
    );
    settle(&e);
    assert_here(&e, &["alice@example.com"]);
    assert_eq!(e.here()[0].header("Subject"), ["via the gateway"]);
    assert_there(&e, &[]);
    e.also("require_gateway_refuses_other_clients");
}

/// One message with every kind of recipient: each ends up exactly once in
/// the right place, nothing anywhere else; the same recipient twice, and a
/// copy target that is a recipient of its own, arrive once.
pub fn mixed_message_every_recipient_exactly_once<M: Mta>() {
    let e = M::start(
        &World::new(
            r#"  example.com:
    mode: split
    destination: { hosts: ["{OTHER}"] }
    accounts: [{ list: [alice@example.com, bob@example.com, carol@example.com, cy@example.com, dave@example.com] }]
    users:
      carol@example.com: { copy_to: carol@pilot.test }
      cy@example.com: { copy_to: cy@pilot.test }
      dave@example.com: { redirect_to: dave@pilot.test }
  example.org:
    mode: dual
    destination: { hosts: ["{OTHER}"] }
    bounce: true
    accounts: [{ list: [frank@example.org] }]
  example.net:
    mode: route
    destination: { hosts: ["{OTHER}"] }
    accounts: [{ list: [erin@example.net] }]
    users:
      erin@example.net: { keep: true }
  example.edu:
    mode: split
    enabled: false
    destination: { hosts: ["{OTHER}"] }
    accounts: [{ list: [hal@example.edu] }]
  example.info:
    mode: split
    destination: { domain: newdest.test, change_envelope: true }
    accounts: [{ list: [ivy@example.info] }]
"#,
        )
        .mailboxes(
            "example.com",
            &[
                "alice@example.com",
                "bob@example.com",
                "carol@example.com",
                "cy@example.com",
                "dave@example.com",
            ],
        )
        .mailboxes("example.org", &["frank@example.org"])
        .mailboxes("example.net", &["erin@example.net", "gus@example.net"])
        .mailboxes("example.edu", &["hal@example.edu"])
        .mailboxes("example.info", &["ivy@example.info"])
        .mailboxes("unmanaged.test", &["jo@unmanaged.test"])
        .elsewhere("pilot.test")
        .elsewhere("newdest.test"),
    );
    let rcpts = [
        "alice@example.com",    // split, present: here
        "bob+news@example.com", // split, present via subaddress: here
        "zed@example.com",      // split, unknown: there
        "zed+x@example.com",    // split, unknown with a tag: there
        "carol@example.com",    // copy_to: here + there
        "dave@example.com",     // redirect_to: there
        "frank@example.org",    // dual present: here + there
        "yan@example.org",      // dual unknown: refused
        "erin@example.net",     // keep in route: here
        "gus@example.net",      // route: there
        "hal@example.edu",      // disabled, present: here
        "kim@example.edu",      // disabled, unknown: 451 (routing paused)
        "ivy@example.info",     // split with change_envelope, present: here
        "lou@example.info",     // change_envelope, unknown: there as lou@newdest.test
        "jo@unmanaged.test",    // not managed: here
        "alice@example.com",    // the same recipient again: one delivery
        "cy@example.com",       // copy_to: here, the copy not made, as
        "cy@pilot.test",        // its target is a recipient of its own
    ];
    let t = e.send(OUTSIDE_IP, &rcpts, &message("everything"));
    for (rcpt, reply) in t.rcpts() {
        let expected = match rcpt {
            "yan@example.org" => 550,
            "kim@example.edu" => 451,
            _ => 250,
        };
        assert_eq!(reply.code, expected, "{rcpt}: {t}\n{}", e.diag());
    }
    assert!(t.accepted(), "{t}");
    settle(&e);

    assert_here(
        &e,
        &[
            "alice@example.com",
            "bob@example.com",
            "carol@example.com",
            "cy@example.com",
            "erin@example.net",
            "frank@example.org",
            "hal@example.edu",
            "ivy@example.info",
            "jo@unmanaged.test",
        ],
    );

    let there = |envelope: &str| e.at_other_server(envelope);
    let (frank, gus) = (
        there("frank@example.org.dualroute.invalid"),
        there("gus@example.net.dualroute.invalid"),
    );
    let (zed, zed_x) = (
        there("zed@example.com.dualroute.invalid"),
        there("zed+x@example.com.dualroute.invalid"),
    );
    assert_there(
        &e,
        &[
            "carol@pilot.test",
            "cy@pilot.test",
            "dave@pilot.test",
            &frank,
            &gus,
            "lou@newdest.test",
            &zed,
            &zed_x,
        ],
    );
    let carol = routed(&e, "carol@pilot.test", "carol@example.com");
    assert_eq!(carol.rcpt.notify(), Some("NEVER"), "{}", e.diag());
    routed(&e, "dave@pilot.test", "dave@example.com");
    let frank = routed(&e, &frank, "frank@example.org");
    assert_eq!(frank.rcpt.notify(), Some("FAILURE"), "{}", e.diag());
    routed(&e, &gus, "gus@example.net");
    routed(&e, "lou@newdest.test", "lou@example.info");
    routed(&e, &zed, "zed@example.com");
    routed(&e, &zed_x, "zed+x@example.com");
    // cy's copy target is already a recipient: it arrives once, as the
    // sender's recipient, without the copy's ORCPT and NOTIFY (the milter
    // does not add it again, docs/design.md §4). Postfix names the
    // recipient itself in ORCPT, Sendmail none.
    let cy = other_rcpt(&e, "cy@pilot.test").rcpt;
    assert!(
        matches!(cy.orcpt().as_deref(), None | Some("rfc822;cy@pilot.test"))
            && cy.notify().is_none(),
        "{cy:?}\n{}",
        e.diag()
    );
    // One X-Dualroute header on every copy, routed or here (it is one
    // message), and the body intact.
    for m in e.other().messages() {
        assert_eq!(m.header("X-Dualroute"), [INSTANCE], "{}", m.text);
        assert!(m.text.contains("body of everything"));
    }
    for d in e.here() {
        assert_eq!(d.header("X-Dualroute"), [INSTANCE], "{}", d.mailbox);
    }
    e.also("mixed_message_every_recipient_exactly_once");
}

/// The milter is down: the MTA tempfails (451) and queues nothing; once
/// it is back, the client's retry is delivered exactly once.
pub fn milter_down_tempfails_then_retry_delivers_once<M: Mta>() {
    let mut e = M::start(
        &World::new(SPLIT).mailboxes("example.com", &["alice@example.com", "bob@example.com"]),
    );
    e.kill_milter();
    let rcpts = ["alice@example.com", "zed@example.com"];
    let t = e.send(OUTSIDE_IP, &rcpts, &message("retried"));
    let (commands, code, enhanced) = e.milter_down_refusal();
    let (command, refused) = t
        .steps
        .iter()
        .find(|(_, r)| !r.is_positive())
        .unwrap_or_else(|| panic!("no refusal: {t}\n{}", e.diag()));
    assert!(
        commands.iter().any(|c| command.starts_with(c)),
        "refused at {command}, expected at {commands:?}: {t}"
    );
    assert_eq!(
        (refused.code, refused.enhanced()),
        (code, Some(enhanced)),
        "{t}\n{}",
        e.diag()
    );
    assert!(!t.accepted(), "{t}");
    assert!(e.queue_is_empty(), "{}", e.diag());

    e.restart_milter();
    let t = send_ok(&e, OUTSIDE_IP, &rcpts, "retried");
    settle(&e);
    assert_here(&e, &["alice@example.com"]);
    let zed_there = e.at_other_server("zed@example.com.dualroute.invalid");
    assert_there(&e, &[&zed_there]);
    milter_logged(&e, &t, &["redirect to zed@example.com.dualroute.invalid"]);
    e.also("milter_down_tempfails_then_retry_delivers_once");
}

/// `enabled: false`: routing is off. A mailbox here gets its mail; an
/// address that would be routed is refused for now (451 4.4.4), never
/// filed in a catch-all; nothing at the other server, no header.
pub fn disabled_domain_keeps_mailboxes_and_tempfails_the_rest<M: Mta>() {
    let e = M::start(
        &World::new(
            r#"  example.com:
    mode: split
    enabled: false
    destination: { hosts: ["{OTHER}"] }
    accounts: [{ list: [alice@example.com] }]
"#,
        )
        .mailboxes("example.com", &["alice@example.com"]),
    );
    let t = send_ok(
        &e,
        OUTSIDE_IP,
        &["alice@example.com", "zed@example.com"],
        "disabled",
    );
    let zed = t.rcpt("zed@example.com");
    assert_eq!((zed.code, zed.enhanced()), (451, Some("4.4.4")), "{t}");
    assert!(
        zed.text
            .contains("routing of mail for example.com is paused"),
        "{t}"
    );
    settle(&e);

    assert_here(&e, &["alice@example.com"]);
    for d in e.here() {
        assert!(d.header("X-Dualroute").is_empty(), "{}", d.text);
    }
    assert_there(&e, &[]);
    milter_logged(
        &e,
        &t,
        &["alice@example.com> keep (routing off (the domain has enabled: false))"],
    );
    assert!(
        e.milter_log()
            .contains("RCPT <zed@example.com>: tempfail 451 4.4.4"),
        "{}",
        e.diag()
    );
    e.also("disabled_domain_keeps_mailboxes_and_tempfails_the_rest");
}

/// A message that already carries our X-Dualroute header (forged, or a
/// real loop) and has a recipient to redirect is refused 554 5.4.6 at end
/// of data: nothing is queued, nothing reaches alice or the other server.
/// Without a redirect it is delivered here, without copies. Another
/// instance's header does not stop routing.
pub fn loop_header_refuses_redirects<M: Mta>() {
    let e = M::start(
        &World::new(
            r#"  example.com:
    mode: split
    destination: { hosts: ["{OTHER}"] }
    accounts: [{ list: [alice@example.com, bob@example.com] }]
    users:
      bob@example.com: { copy_to: [bob@pilot.test] }
"#,
        )
        .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
        .elsewhere("pilot.test"),
    );
    let looped = format!("X-Dualroute: {INSTANCE}\n{}", message("looped"));
    let t = e.send(
        OUTSIDE_IP,
        &["alice@example.com", "zed@example.com"],
        &looped,
    );
    let eod = t.end_of_data().expect("a reply to the end of data");
    assert_eq!(
        (eod.code, eod.enhanced()),
        (554, Some("5.4.6")),
        "{t}\n{}",
        e.diag()
    );
    assert!(eod.text.contains("routing loop"), "{t}");
    assert!(!t.accepted(), "{t}");
    assert!(e.queue_is_empty(), "{}", e.diag());
    assert!(
        e.milter_log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("routing loop") && l.contains("554 5.4.6")),
        "no warning about the loop\n{}",
        e.diag()
    );

    // Only a copy to make: delivered here, the copy is not made again.
    let t = e.send(OUTSIDE_IP, &["bob@example.com"], &looped);
    assert!(t.accepted(), "{t}\n{}", e.diag());
    settle(&e);
    assert_here(&e, &["bob@example.com"]);
    assert_there(&e, &[]);

    // Another MX's header: routed as usual, our header added once.
    let other = format!(
        "X-Dualroute: mx9.elsewhere.test\n{}",
        message("other instance")
    );
    let t = e.send(OUTSIDE_IP, &["zed@example.com"], &other);
    assert!(t.accepted(), "{t}");
    settle(&e);
    let zed_there = e.at_other_server("zed@example.com.dualroute.invalid");
    assert_there(&e, &[&zed_there]);
    let headers = other_rcpt(&e, &zed_there).message.header("X-Dualroute");
    assert_eq!(
        headers.iter().filter(|v| *v == INSTANCE).count(),
        1,
        "{headers:?}"
    );
    assert!(
        headers.iter().any(|v| v == "mx9.elsewhere.test"),
        "{headers:?}"
    );
    assert_here(&e, &["bob@example.com"]);
    e.also("loop_header_refuses_redirects");
}

/// One `#[test]` per shared scenario for the [`Mta`] type `$mta` of the
/// calling test file, in a module `shared`: the table both suites run.
#[macro_export]
macro_rules! shared_scenarios {
    ($mta:ident) => {
        $crate::shared_scenarios!(@tests $mta;
            split_keeps_present_and_routes_unknown_with_orcpt,
            dual_copies_present_and_refuses_unknown,
            route_sends_everything_to_the_destination,
            per_user_copy_redirect_and_keep,
            require_gateway_refuses_other_clients,
            mixed_message_every_recipient_exactly_once,
            milter_down_tempfails_then_retry_delivers_once,
            disabled_domain_keeps_mailboxes_and_tempfails_the_rest,
            loop_header_refuses_redirects,
        );
    };
    (@tests $mta:ident; $($name:ident),* $(,)?) => {
        /// The scenarios of tests/support/scenarios.rs on this MTA.
        mod shared {
            $(
                #[test]
                fn $name() {
                    $crate::support::scenarios::$name::<super::$mta>();
                }
            )*
        }
    };
}
