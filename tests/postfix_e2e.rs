//! End-to-end: the real `dualroute` binary in front of a real, private
//! Postfix (tests/support/), with an `smtp-sink` as the other server.
//!
//! Every scenario
//! 1. writes a milter.yaml (listen on a free loopback port, instance
//!    `e2e.test`, destinations pointing at its own sink);
//! 2. runs `dualroute postfix-config --write DIR --map-dir /etc/postfix` and
//!    feeds all of its output (main.cf lines, master.cf lines, tables) into
//!    the Postfix instance; the only hand-written additions are the test's
//!    mailboxes, `dualroute_catchall` in `virtual_mailbox_maps` (the step
//!    docs/postfix.md §3 does by hand) and, where a scenario needs it, a
//!    transport entry for a domain that has no DNS here;
//! 3. starts `dualroute run --config milter.yaml` as a child process;
//! 4. sends real SMTP and checks the real effects: Maildirs, sink dumps,
//!    SMTP replies, the maillog, the milter's own log, and an empty queue
//!    with nothing bounced at the end.
//!
//! The scenarios Sendmail runs too (split, dual, route, per-user rules,
//! require_gateway, a mixed message, the milter down, routing off, a loop)
//! are written once in tests/support/scenarios.rs and run here as
//! `shared::*`; this file holds what only Postfix does.
//!
//! They need root and Postfix (scripts/test-deps.sh). Set
//! `DUALROUTE_KEEP_TMP=1` to keep the trees (milter.yaml, generated config,
//! milter log) of a run.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use support::{
    postfix_config, read_maildir, MaildirMessage, MilterProcess, Postfix, PostfixConfig,
    PostfixOptions, SmtpClient, SmtpSink, SmtpTranscript, OUTSIDE_IP,
};

use support::scenarios::{self, received, sinks_settled, Delivered, Mta, Received, World};
use support::{message, GATEWAY_IP, INSTANCE, OTHER_IP, SENDER};

// ---------------------------------------------------------------------
// One scenario: sink + milter.yaml + postfix-config + Postfix + milter.
// ---------------------------------------------------------------------

struct Setup {
    /// The `domains:` section of milter.yaml, indented by two spaces per
    /// level below `domains:`; `{SINK}` becomes the sink's `[127.0.0.1]:PORT`.
    domains_yaml: String,
    gateways: Vec<String>,
    postfix: PostfixOptions,
    /// Domains a test-added transport entry sends to the sink (no DNS here).
    to_sink: Vec<String>,
    /// Expect postfix-config to generate `dualroute_catchall` (which
    /// [`PostfixConfig::apply_to`] adds to `virtual_mailbox_maps`).
    catchall: bool,
    /// The other server refuses every RCPT at first.
    rejecting_sink: bool,
    /// Top-level keys of milter.yaml besides the ones every scenario has.
    top_level: String,
    /// `non_smtpd_milters` points at the milter too: mail submitted with
    /// the `sendmail` command passes through it (docs/design.md
    /// "Local submission").
    local_submission: bool,
}

fn setup(domains_yaml: &str) -> Setup {
    Setup {
        domains_yaml: domains_yaml.to_owned(),
        gateways: Vec::new(),
        postfix: PostfixOptions::default(),
        to_sink: Vec::new(),
        catchall: true,
        rejecting_sink: false,
        top_level: String::new(),
        local_submission: false,
    }
}

impl Setup {
    /// Postfix mailboxes (without the harness's own catch-all: the generated
    /// `dualroute_catchall` plays that part).
    fn mailboxes(mut self, domain: &str, accounts: &[&str]) -> Self {
        self.postfix = self.postfix.domain_without_catchall(domain, accounts);
        self
    }

    /// Postfix mailboxes plus the harness's own `@domain` catch-all
    /// (`catchall/DOMAIN/`): Postfix accepts every address of the domain,
    /// so whatever is refused is refused by the milter.
    fn mailboxes_accept_all(mut self, domain: &str, accounts: &[&str]) -> Self {
        self.postfix = self.postfix.domain(domain, accounts);
        self
    }

    /// Expect no `dualroute_catchall` (there is none without split/route
    /// domains).
    fn without_dualroute_catchall(mut self) -> Self {
        self.catchall = false;
        self
    }

    fn gateway(mut self, ip: IpAddr) -> Self {
        self.gateways.push(ip.to_string());
        self
    }

    fn rejecting_sink(mut self) -> Self {
        self.rejecting_sink = true;
        self
    }

    /// Adds top-level keys (`shadow: true`, `metrics: …`) to milter.yaml.
    fn top_level(mut self, yaml: &str) -> Self {
        self.top_level.push_str(yaml);
        self
    }

    fn route_to_sink(mut self, domain: &str) -> Self {
        self.to_sink.push(domain.to_owned());
        self
    }

    fn main_cf(mut self, line: &str) -> Self {
        self.postfix = self.postfix.main_cf(line);
        self
    }

    /// The milter in `non_smtpd_milters` too.
    fn local_submission(mut self) -> Self {
        self.local_submission = true;
        self
    }

    fn start(self) -> E2e {
        let tmp = tempfile::Builder::new()
            .prefix("dualroute-e2e-")
            .tempdir()
            .expect("create a temporary directory");
        let dir = tmp.path().to_path_buf();
        let sink = if self.rejecting_sink {
            SmtpSink::start_rejecting()
        } else {
            SmtpSink::start()
        };
        let milter_port = support::Port::reserve();

        // 1. milter.yaml
        let gateways = self
            .gateways
            .iter()
            .map(|g| format!("\"{g}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let yaml = format!(
            "listen: inet:127.0.0.1:{milter_port}\ninstance: {INSTANCE}\nstate_dir: {state}\n{gw}{top}domains:\n{domains}",
            state = dir.join("state").display(),
            top = self.top_level,
            gw = if gateways.is_empty() { String::new() } else { format!("gateways: [{gateways}]\n") },
            domains = self.domains_yaml.replace("{SINK}", &sink.nexthop()),
        );
        let config = dir.join("milter.yaml");
        fs::write(&config, &yaml).expect("write milter.yaml");

        // 2. dualroute postfix-config
        let generated = postfix_config(&config, &dir.join("postfix-config"));
        if self.catchall {
            assert!(
                generated.has_table("dualroute_catchall"),
                "postfix-config printed no dualroute_catchall table for a configuration with split/route domains:\n{}",
                generated.printed
            );
        }
        let mut opts = generated.apply_to(self.postfix);
        if self.local_submission {
            opts = opts.non_smtpd_milters(&format!("inet:127.0.0.1:{milter_port}"));
        }
        if !self.to_sink.is_empty() {
            let entries: String = self
                .to_sink
                .iter()
                .map(|d| format!("{d} smtp:{}\n", sink.nexthop()))
                .collect();
            opts = opts.map("e2e_transport", &entries);
            // Appended to the generated transport_maps, or on its own.
            match opts
                .main_cf
                .iter_mut()
                .find(|l| l.starts_with("transport_maps"))
            {
                Some(line) => line.push_str(", hash:/etc/postfix/e2e_transport"),
                None => opts
                    .main_cf
                    .push("transport_maps = hash:/etc/postfix/e2e_transport".into()),
            }
        }
        let pf = Postfix::start(opts);
        // The generated milter setting is the one in force (the harness
        // adds none of its own).
        assert_eq!(
            pf.postconf("smtpd_milters"),
            format!("inet:127.0.0.1:{milter_port}")
        );
        assert_eq!(pf.postconf("milter_default_action"), "tempfail");

        // 3. dualroute run
        let milter = MilterProcess::start(&config, &milter_port, &dir.join("milter.log"));

        E2e {
            milter,
            pf,
            sink,
            generated,
            tmp: Some(tmp),
        }
    }
}

/// A running scenario. Fields drop in order: the milter, then Postfix, then
/// the sink, then the temporary tree.
struct E2e {
    milter: MilterProcess,
    pf: Postfix,
    sink: SmtpSink,
    generated: PostfixConfig,
    tmp: Option<tempfile::TempDir>,
}

impl Drop for E2e {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            if support::keep_tmp() {
                eprintln!(
                    "DUALROUTE_KEEP_TMP: kept the scenario tree {}",
                    tmp.keep().display()
                );
            }
        }
    }
}

impl E2e {
    /// An outside client (not in mynetworks, not a gateway).
    fn client(&self) -> SmtpClient {
        SmtpClient::new(self.pf.smtp_addr()).bind(OUTSIDE_IP)
    }

    fn client_from(&self, ip: IpAddr) -> SmtpClient {
        SmtpClient::new(self.pf.smtp_addr()).bind(ip)
    }

    /// Everything that helps understand a failure.
    fn diag(&self) -> String {
        let sink: Vec<String> = self
            .sink
            .messages()
            .iter()
            .map(|m| {
                format!(
                    "{}: MAIL {} RCPT {:?}",
                    m.path.display(),
                    m.mail_args,
                    m.rcpts
                )
            })
            .collect();
        let maildirs: Vec<String> = self
            .maildir_files()
            .iter()
            .map(|(dir, m)| format!("{dir}: {}", m.path.display()))
            .collect();
        format!(
            "{}\n--- milter log ({}) ---\n{}\n--- sink ---\n{}\n--- Maildir files ---\n{}\n--- postfix-config ---\n{}",
            self.pf.diagnostics(),
            self.milter.log_path().display(),
            self.milter.log(),
            sink.join("\n"),
            maildirs.join("\n"),
            self.generated.printed,
        )
    }

    /// The generated catch-all Maildir of a split/route domain.
    fn catchall(&self, domain: &str) -> Vec<MaildirMessage> {
        read_maildir(
            &self
                .pf
                .maildir_root()
                .join(format!("{domain}/dualroute-catchall/")),
        )
    }

    fn mailbox(&self, address: &str) -> Vec<MaildirMessage> {
        self.pf.maildir_messages(address)
    }

    /// Every message file in every Maildir under the Maildir root, with
    /// the Maildir it is in (relative to the root, e.g. `example.com/alice`).
    fn maildir_files(&self) -> Vec<(String, MaildirMessage)> {
        let root = self.pf.maildir_root();
        let mut found = Vec::new();
        collect_maildirs(&root, &root, &mut found);
        found.sort_by(|a, b| a.1.path.cmp(&b.1.path));
        found
    }

    /// How many messages each Maildir holds (only non-empty ones).
    fn maildir_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (dir, _) in self.maildir_files() {
            *counts.entry(dir).or_insert(0) += 1;
        }
        counts
    }

    /// Every RCPT the sink received, over all messages.
    fn sink_deliveries(&self) -> Vec<Received> {
        received(&self.sink)
    }

    /// Waits until the sink has received `n` RCPTs in all.
    fn wait_sink_rcpts(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + support::WAIT;
        loop {
            let found = self.sink_deliveries();
            if found.len() >= n {
                return found;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {n} RCPTs at the sink, got {}\n{}",
                    found.len(),
                    self.diag()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The one sink RCPT for `address`; panics when there is none or more.
    fn sink_rcpt(&self, address: &str) -> Received {
        let mut found: Vec<Received> = self
            .sink_deliveries()
            .into_iter()
            .filter(|d| d.rcpt.address == address)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "RCPTs for {address} at the sink\n{}",
            self.diag()
        );
        found.remove(0)
    }

    /// The queue is empty, nothing is deferred, held or bounced.
    fn finish(&self) {
        self.pf.wait_queue_empty();
        self.pf.assert_no_deferred_or_held();
        let log = self.pf.maillog();
        assert!(!log.contains("status=bounced"), "a bounce\n{}", self.diag());
        assert!(
            !log.contains("status=deferred"),
            "a deferral\n{}",
            self.diag()
        );
    }

    /// Sends and checks that the message was taken.
    fn send_ok(&self, client: &SmtpClient, rcpts: &[&str], subject: &str) -> SmtpTranscript {
        let t = client.send(SENDER, rcpts, &message(subject));
        assert!(t.accepted(), "{t}\n{}", self.diag());
        t
    }

    /// The milter logged the decisions for this queue id.
    fn milter_logged(&self, t: &SmtpTranscript, words: &[&str]) {
        scenarios::milter_logged(self, t, words);
    }
}

// ---------------------------------------------------------------------
// The shared scenarios (tests/support/scenarios.rs) on Postfix.
// ---------------------------------------------------------------------

crate::shared_scenarios!(E2e);

impl Mta for E2e {
    fn start(world: &World) -> E2e {
        let mut s = setup(&world.domains.replace("{OTHER}", "{SINK}"));
        for (domain, accounts, accept_all) in &world.mailboxes {
            let accounts: Vec<&str> = accounts.iter().map(String::as_str).collect();
            s = if *accept_all {
                s.mailboxes_accept_all(domain, &accounts)
            } else {
                s.mailboxes(domain, &accounts)
            };
        }
        for domain in &world.elsewhere {
            s = s.route_to_sink(domain);
        }
        // Outside clients may send to these domains too, as Sendmail's
        // `To:domain RELAY` lets them (a recipient of the other server in
        // the message, beside the copies the milter adds).
        if !world.elsewhere.is_empty() {
            s = s.main_cf(&format!("relay_domains = {}", world.elsewhere.join(", ")));
        }
        for ip in &world.gateways {
            s = s.gateway(*ip);
        }
        // postfix-config prints `dualroute_catchall` only for split and
        // route domains (docs/postfix.md §3).
        if !world.domains.contains("mode: split") && !world.domains.contains("mode: route") {
            s = s.without_dualroute_catchall();
        }
        s.start()
    }

    fn send(&self, from: IpAddr, rcpts: &[&str], message: &str) -> SmtpTranscript {
        self.client_from(from).send(SENDER, rcpts, message)
    }

    fn settle(&self) {
        self.finish();
    }

    fn queue_is_empty(&self) -> bool {
        self.pf.queue().is_empty()
    }

    /// Every Maildir file: `example.com/alice` is alice@example.com; the
    /// generated `dualroute-catchall` and the harness's `catchall/DOMAIN`
    /// keep their directory name, which matches no address.
    fn here(&self) -> Vec<Delivered> {
        self.maildir_files()
            .into_iter()
            .map(|(dir, m)| {
                let mailbox = match dir.split_once('/') {
                    Some((domain, local)) if !dir.contains("catchall") => {
                        format!("{local}@{domain}")
                    }
                    _ => format!("(catch-all {dir})"),
                };
                Delivered {
                    mailbox,
                    text: m.text,
                }
            })
            .collect()
    }

    fn other(&self) -> &SmtpSink {
        &self.sink
    }

    fn sinks(&self) -> Vec<&SmtpSink> {
        vec![&self.sink]
    }

    fn logged_sent_to_sinks(&self) -> usize {
        let relay = format!("127.0.0.1[127.0.0.1]:{}", self.sink.port());
        self.pf
            .deliveries()
            .iter()
            .filter(|d| d.status == "sent" && d.relay == relay)
            .count()
    }

    fn logged_sent(&self, envelope: &str) -> String {
        let out = self
            .pf
            .deliveries()
            .into_iter()
            .find(|d| d.to == envelope)
            .unwrap_or_else(|| panic!("no delivery of {envelope}\n{}", self.diag()));
        assert_eq!(out.status, "sent", "{}", self.diag());
        assert_eq!(
            out.relay,
            format!("127.0.0.1[127.0.0.1]:{}", self.sink.port())
        );
        out.line
    }

    fn at_other_server(&self, envelope: &str) -> String {
        envelope
            .strip_suffix(".dualroute.invalid")
            .unwrap_or(envelope)
            .to_owned()
    }

    fn queue_id(&self, t: &SmtpTranscript) -> Option<String> {
        t.queue_id()
    }

    fn milter_log(&self) -> String {
        self.milter.log()
    }

    fn kill_milter(&mut self) {
        self.milter.kill();
    }

    fn restart_milter(&mut self) {
        self.milter.spawn();
    }

    /// `milter_default_action = tempfail`: 451 4.7.1 at MAIL (or RCPT).
    fn milter_down_refusal(&self) -> (&'static [&'static str], u16, &'static str) {
        (&["MAIL", "RCPT"], 451, "4.7.1")
    }

    fn diag(&self) -> String {
        E2e::diag(self)
    }

    fn also(&self, scenario: &str) {
        let log = self.pf.maillog();
        match scenario {
            "split_keeps_present_and_routes_unknown_with_orcpt" => {
                let alice = self.mailbox("alice@example.com");
                assert_eq!(alice[0].header("Delivered-To"), ["alice@example.com"]);
            }
            "dual_copies_present_and_refuses_unknown" => {
                // No split/route domain: postfix-config prints no catch-all.
                assert!(
                    !self.generated.has_table("dualroute_catchall"),
                    "{}",
                    self.generated.printed
                );
                assert!(
                    log.lines().any(|l| l.contains(": reject: RCPT")
                        && l.contains(
                            "<zed@example.com>: Recipient address rejected: User unknown"
                        )),
                    "Postfix itself should refuse zed\n{}",
                    self.diag()
                );
                assert!(
                    log.lines().any(|l| l.contains("milter-reject: RCPT")
                        && l.contains("5.1.1")
                        && l.contains("yan@example.org")),
                    "the milter should refuse yan\n{}",
                    self.diag()
                );
                assert!(
                    self.pf
                        .deliveries()
                        .iter()
                        .all(|d| !d.to.starts_with("zed@") && !d.to.starts_with("yan@")),
                    "{}",
                    self.diag()
                );
            }
            "mixed_message_every_recipient_exactly_once" => {
                // Every delivery in the maillog is a success, one per
                // Maildir file and one per RCPT at the sink.
                let deliveries = self.pf.deliveries();
                let expected = self.maildir_files().len() + self.sink_deliveries().len();
                assert_eq!(deliveries.len(), expected, "{}", self.diag());
                assert!(
                    deliveries.iter().all(|d| d.status == "sent"),
                    "{}",
                    self.diag()
                );
            }
            "milter_down_tempfails_then_retry_delivers_once" => {
                assert!(log.contains("milter"), "{}", self.diag());
            }
            "disabled_domain_keeps_mailboxes_and_tempfails_the_rest" => {
                assert!(
                    self.milter
                        .log()
                        .contains("NOQUEUE: RCPT <zed@example.com>: tempfail 451 4.4.4"),
                    "{}",
                    self.diag()
                );
            }
            _ => {}
        }
    }
}

fn collect_maildirs(root: &Path, dir: &Path, found: &mut Vec<(String, MaildirMessage)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut is_maildir = false;
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        match path.file_name().and_then(|n| n.to_str()) {
            Some("new" | "cur" | "tmp") => is_maildir = true,
            _ => collect_maildirs(root, &path, found),
        }
    }
    if is_maildir {
        let name = dir.strip_prefix(root).unwrap_or(dir).display().to_string();
        for m in read_maildir(dir) {
            found.push((name.clone(), m));
        }
    }
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

// ---------------------------------------------------------------------
// Scenarios.
// ---------------------------------------------------------------------

const SPLIT_EXAMPLE_COM: &str = r#"  example.com:
    mode: split
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com, bob@example.com] }]
"#;

/// `destination: { domain: D, change_envelope: true }`: the routing address
/// is local@D, delivered as ordinary mail for D (here: a test-added
/// transport entry, there is no DNS).
#[test]
fn change_envelope_destination_rewrites_to_the_destination_domain() {
    let e = setup(
        r#"  example.com:
    mode: split
    destination: { domain: newdest.test, change_envelope: true }
    accounts: [{ list: [alice@example.com] }]
"#,
    )
    .mailboxes("example.com", &["alice@example.com"])
    .route_to_sink("newdest.test")
    .start();
    let t = e.send_ok(
        &e.client(),
        &["alice@example.com", "zed@example.com"],
        "change envelope",
    );
    e.finish();

    assert_eq!(
        e.maildir_counts(),
        counts(&[("example.com/alice", 1)]),
        "{}",
        e.diag()
    );
    e.wait_sink_rcpts(1);
    assert_eq!(e.sink_deliveries().len(), 1, "{}", e.diag());
    let zed = e.sink_rcpt("zed@newdest.test");
    assert_eq!(
        zed.rcpt.orcpt().as_deref(),
        Some("rfc822;zed@example.com"),
        "{}",
        e.diag()
    );
    assert_eq!(zed.message.header("X-Dualroute"), [INSTANCE]);
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
    e.milter_logged(&t, &["redirect to zed@newdest.test"]);
}

/// A per-user target inside a managed domain is decided as mail to it
/// would be (docs/design.md §2 rule 4, issue 21 §3): erin's redirect to
/// carol, who has no mailbox here, goes to the other server as carol. A
/// recipient the milter adds skips the milter, so before this Postfix
/// delivered carol@example.com as it stood: into the catch-all. frank's
/// target is in a domain whose routing is off: 451 4.4.4 at RCPT.
#[test]
fn redirect_target_without_a_mailbox_here_is_routed() {
    let e = setup(
        r#"  example.com:
    mode: split
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com] }]
    users:
      erin@example.com: { redirect_to: carol@example.com }
      frank@example.com: { redirect_to: zed@example.net }
  example.net:
    mode: route
    enabled: false
    destination: { hosts: ["{SINK}"] }
"#,
    )
    .mailboxes("example.com", &["alice@example.com"])
    .start();
    let t = e.send_ok(&e.client(), &["erin@example.com"], "target");
    // Routing for the target's domain is off: refused for now at RCPT, as
    // mail to zed@example.net itself is (docs/design.md §2 rule 1).
    let held = e
        .client()
        .send(SENDER, &["frank@example.com"], &message("held"));
    assert_eq!(held.rcpt("frank@example.com").code, 451, "{held}");
    assert!(
        held.rcpt("frank@example.com")
            .text
            .contains("4.4.4 <frank@example.com>: routing of mail for example.net is paused"),
        "{held}"
    );
    e.finish();

    e.wait_sink_rcpts(1);
    let carol = e.sink_rcpt("carol@example.com");
    assert_eq!(e.sink_deliveries().len(), 1, "{}", e.diag());
    assert_eq!(
        carol.rcpt.orcpt().as_deref(),
        Some("rfc822;erin@example.com"),
        "{}",
        e.diag()
    );
    assert_eq!(carol.message.header("Subject"), ["target"]);
    // Out through the dualroute transport, as the routing address.
    let out =
        e.pf.deliveries()
            .into_iter()
            .find(|d| d.to == "carol@example.com.dualroute.invalid")
            .unwrap_or_else(|| panic!("no delivery of carol's routing address\n{}", e.diag()));
    assert_eq!(out.status, "sent");
    // No Maildir has it: not carol's (she has none), not the catch-all.
    assert_eq!(e.maildir_counts(), counts(&[]), "{}", e.diag());
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
    e.milter_logged(
        &t,
        &[
            "redirect to carol@example.com.dualroute.invalid",
            "per-user rule redirect_to",
        ],
    );
}

/// A gateway client: nothing is routed; an address without a mailbox is
/// refused by the milter (Postfix itself accepted it: catch-all).
#[test]
fn gateway_client_is_never_routed() {
    let e = setup(SPLIT_EXAMPLE_COM)
        .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
        .gateway(GATEWAY_IP)
        .start();
    let t = e.client_from(GATEWAY_IP).send(
        SENDER,
        &["alice@example.com", "zed@example.com"],
        &message("from the gateway"),
    );
    let zed = t.rcpt("zed@example.com");
    assert_eq!(
        (zed.code, zed.enhanced()),
        (550, Some("5.1.1")),
        "{t}\n{}",
        e.diag()
    );
    assert!(zed.text.contains("zed@example.com"), "{t}");
    assert_eq!(t.rcpt("alice@example.com").code, 250, "{t}");
    assert!(t.accepted(), "{t}");
    e.finish();

    assert_eq!(
        e.maildir_counts(),
        counts(&[("example.com/alice", 1)]),
        "{}",
        e.diag()
    );
    assert!(e.mailbox("alice@example.com")[0]
        .header("X-Dualroute")
        .is_empty());
    assert!(e.sink.messages().is_empty(), "{}", e.diag());
    // The refusal came from the milter, not from Postfix's own tables.
    assert!(
        e.pf.maillog().contains("milter-reject: RCPT from"),
        "{}",
        e.diag()
    );

    // The same from a client that is not a gateway is routed.
    e.send_ok(
        &e.client_from(OTHER_IP),
        &["zed@example.com"],
        "not from the gateway",
    );
    e.finish();
    e.wait_sink_rcpts(1);
    assert_eq!(
        e.sink_rcpt("zed@example.com").message.header("Subject"),
        ["not from the gateway"]
    );
}

/// Subaddresses and case: `bob+news@` is bob's; `zed+x@` is routed with its
/// tag (ORCPT xtext-encoded); `ALICE@EXAMPLE.COM` is alice's.
///
/// Postfix must split `+` tags too, or it looks `bob+news@` up as it is and
/// files it in the catch-all while the milter (which matched bob) keeps it:
/// `recipient_delimiter = +` is set here to match the milter's default.
#[test]
fn subaddresses_and_case() {
    let e = setup(SPLIT_EXAMPLE_COM)
        .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
        .main_cf("recipient_delimiter = +")
        .start();
    let t = e.send_ok(
        &e.client(),
        &[
            "bob+news@example.com",
            "zed+x@example.com",
            "ALICE@EXAMPLE.COM",
        ],
        "tags and case",
    );
    e.finish();

    assert_eq!(
        e.maildir_counts(),
        counts(&[("example.com/alice", 1), ("example.com/bob", 1)]),
        "{}",
        e.diag()
    );
    assert_eq!(
        e.mailbox("bob@example.com")[0].header("X-Original-To"),
        ["bob+news@example.com"]
    );
    assert_eq!(
        e.mailbox("alice@example.com")[0].header("X-Original-To"),
        ["ALICE@EXAMPLE.COM"]
    );
    e.wait_sink_rcpts(1);
    assert_eq!(e.sink_deliveries().len(), 1, "{}", e.diag());
    let zed = e.sink_rcpt("zed+x@example.com");
    assert_eq!(
        zed.rcpt.param("ORCPT"),
        Some("rfc822;zed+2Bx@example.com"),
        "{}",
        e.diag()
    );
    assert_eq!(
        zed.rcpt.orcpt().as_deref(),
        Some("rfc822;zed+x@example.com")
    );
    e.milter_logged(&t, &["redirect to zed+x@example.com.dualroute.invalid"]);
}

/// The envelope as clients really write it: a redirect keeps the client's
/// own NOTIFY and ORCPT; a quoted local part is matched, routed and
/// deleted (nothing left in the catch-all); a kept recipient with a source
/// route is delivered here.
#[test]
fn envelope_forms_survive_the_round_trip() {
    let e = setup(SPLIT_EXAMPLE_COM)
        .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
        .start();
    let t = e.send_ok(
        &e.client(),
        &[
            "zed@example.com NOTIFY=FAILURE ORCPT=rfc822;zed-original@example.com",
            "<\"john doe\"@example.com>",
            "<@relay.test:bob@example.com>",
        ],
        "envelope forms",
    );
    for (rcpt, reply) in t.rcpts() {
        assert_eq!(reply.code, 250, "{rcpt}: {t}");
    }
    e.finish();
    // Everything the maillog says went to the sink is there, and no more.
    sinks_settled(&e);
    assert_eq!(
        e.maildir_counts(),
        counts(&[("example.com/bob", 1)]),
        "{}",
        e.diag()
    );
    assert_eq!(e.sink_deliveries().len(), 2, "{}", e.diag());

    let zed = e.sink_rcpt("zed@example.com");
    assert_eq!(zed.rcpt.notify(), Some("FAILURE"), "{}", e.diag());
    assert_eq!(
        zed.rcpt.orcpt().as_deref(),
        Some("rfc822;zed-original@example.com"),
        "{}",
        e.diag()
    );
    let john = e.sink_rcpt("\"john doe\"@example.com");
    assert_eq!(
        john.rcpt.param("ORCPT"),
        Some("rfc822;\"john+20doe\"@example.com"),
        "{}",
        e.diag()
    );
}

/// A recipient with a source route, `<@relay.test:yu@example.com>`, in a
/// split domain without a mailbox: Postfix strips the route when it queues
/// the recipient (`to=<yu@example.com>`), so the milter must also delete
/// `<yu@example.com>`, or the recipient would be routed AND kept.
#[test]
fn source_routed_recipient_is_routed_exactly_once() {
    let e = setup(SPLIT_EXAMPLE_COM)
        .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
        .start();
    e.send_ok(
        &e.client(),
        &["<@relay.test:yu@example.com>"],
        "source route",
    );
    e.finish();
    e.wait_sink_rcpts(1);
    let yu = e.sink_rcpt("yu@example.com");
    assert_eq!(
        yu.rcpt.orcpt().as_deref(),
        Some("rfc822;yu@example.com"),
        "{}",
        e.diag()
    );
    assert!(
        e.catchall("example.com").is_empty(),
        "yu also landed in the catch-all\n{}",
        e.diag()
    );
}

/// The milter matches `bob+news@` to bob with its default
/// `recipient_delimiter: "+"` and keeps it; Postfix must agree (its
/// built-in default is empty), so `postfix-config` prints
/// `recipient_delimiter`. With only the generated settings, bob+news@
/// reaches bob's Maildir, not the catch-all.
#[test]
fn subaddress_of_a_present_user_with_only_postfix_config_settings() {
    let e = setup(SPLIT_EXAMPLE_COM)
        .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
        .start();
    e.send_ok(&e.client(), &["bob+news@example.com"], "tagged");
    e.finish();
    assert_eq!(
        e.maildir_counts(),
        counts(&[("example.com/bob", 1)]),
        "{}",
        e.diag()
    );
}

/// Where one odd RCPT form ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fate {
    /// Refused at RCPT with this code and enhanced code.
    Refused(u16, &'static str),
    /// Delivered into this Maildir (relative to the Maildir root).
    Maildir(&'static str),
    /// Received by the sink (the other server) as this address.
    Sink(&'static str),
}

/// Odd RCPT forms (docs/design.md §3, docs/design.md "Addresses") from an
/// outside client that is neither a gateway nor authenticated, through the
/// real Postfix: to a `split` domain and to a `require_gateway` domain.
/// Postfix parses each form into a mailbox (`{rcpt_addr}`); the milter
/// either decides on that same mailbox or refuses `550 5.1.3` — never keeps
/// what it cannot read, so nothing lands in the catch-all and nothing gets
/// past the lock-down. The table of what happened is printed (it is the
/// before/after table of issue 7).
#[test]
fn odd_recipient_forms_are_decided_on_the_mta_address_or_refused() {
    let long = format!("{}@example.com", "l".repeat(200));
    let long: &'static str = Box::leak(long.into_boxed_str());
    let e = setup(
        r#"  example.com:
    mode: split
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com, bob@example.com] }]
  locked.test:
    mode: split
    require_gateway: true
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@locked.test] }]
"#,
    )
    .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
    .mailboxes("locked.test", &["alice@locked.test"])
    .gateway(GATEWAY_IP)
    .start();
    let bad = Fate::Refused(550, "5.1.3");
    let locked = Fate::Refused(550, "5.7.1");
    let forms: Vec<(&str, Fate)> = vec![
        // Postfix normalises these into real mailboxes; the milter cannot
        // parse them: refused, not kept.
        ("<alice@example.com@>", bad.clone()),
        ("<<alice@example.com>>", bad.clone()),
        ("alice@example.com>", bad.clone()),
        ("<bob@example.com@>", bad.clone()),
        ("<zed@example.com@>", bad.clone()),
        ("<@example.com>", bad.clone()),
        // Forms both read the same way: decided as usual.
        (
            "<\"alice\"@example.com>",
            Fate::Maildir("example.com/alice"),
        ),
        (
            "<@relay.test:alice@example.com>",
            Fate::Maildir("example.com/alice"),
        ),
        ("<ALICE@EXAMPLE.COM.>", Fate::Maildir("example.com/alice")),
        ("<\"a>b\"@example.com>", Fate::Sink("\"a>b\"@example.com")),
        // Postfix itself reads `%` as a route to other.test (its percent
        // hack) and refuses to relay: the milter never sees it.
        ("<zed%other.test@example.com>", Fate::Refused(554, "5.7.1")),
        (long, Fate::Sink(long)),
        // 8-bit (SMTPUTF8) local part: routed like any other (smtp-sink's
        // dump shows each 8-bit byte as '?').
        ("<zoë@example.com>", Fate::Sink("zo??@example.com")),
        // The lock-down holds for every form.
        ("<alice@locked.test>", locked.clone()),
        ("<alice@locked.test@>", bad.clone()),
        ("<<alice@locked.test>>", bad.clone()),
        ("alice@locked.test>", bad.clone()),
        ("<\"alice\"@locked.test>", locked.clone()),
        ("<@relay.test:alice@locked.test>", locked.clone()),
        ("<ALICE@LOCKED.TEST.>", locked.clone()),
        ("<@locked.test>", bad.clone()),
    ];
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for (i, (form, want)) in forms.iter().enumerate() {
        let subject = format!("odd form {i}");
        let sink_before = e.sink_deliveries().len();
        let t = e
            .client_from(OTHER_IP)
            .send(SENDER, &[form], &message(&subject));
        let (_, reply) = t
            .steps
            .iter()
            .find(|(c, _)| c.starts_with("RCPT TO:"))
            .unwrap_or_else(|| panic!("no RCPT for {form}: {t}"));
        let got = if !reply.is_positive() {
            format!("{} {}", reply.code, reply.enhanced().unwrap_or("-"))
        } else {
            // Postfix accepted it: find where it went.
            e.finish();
            let sink: Vec<String> = e.sink_deliveries()[sink_before..]
                .iter()
                .map(|d| format!("sink {}", d.rcpt.address))
                .collect();
            let files = e.maildir_files();
            let mailboxes: Vec<String> = files
                .iter()
                .filter(|(_, m)| m.header("Subject") == [subject.as_str()])
                .map(|(dir, _)| format!("maildir {dir}"))
                .collect();
            [sink, mailboxes].concat().join(", ")
        };
        let expected = match want {
            Fate::Refused(code, x) => format!("{code} {x}"),
            Fate::Maildir(dir) => format!("maildir {dir}"),
            Fate::Sink(a) => format!("sink {a}"),
        };
        let text: String = reply.text.chars().take(90).collect();
        table.push(format!("| `{form}` | {got} | {text} |"));
        if got != expected {
            failures.push(format!("{form}: expected {expected}, got {got}\n{t}"));
        }
    }
    eprintln!(
        "| RCPT argument | result |\n|---|---|\n{}",
        table.join("\n")
    );
    assert!(failures.is_empty(), "{}\n{}", failures.join("\n"), e.diag());
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
    assert!(e.catchall("locked.test").is_empty(), "{}", e.diag());
}

/// Routing off, whatever the cause — waiting for verification, `dualroute
/// disable`, an unreadable state file (the breaker: tests/breaker.rs) — is
/// the same through real Postfix: a mailbox here gets its mail, an address
/// that would be routed gets `451 4.4.4` naming the cause, the catch-all
/// stays empty; once routing is back, the sender's retry is routed.
#[test]
fn routing_off_for_every_cause_tempfails_then_the_retry_is_routed() {
    let mut e = setup(
        r#"  example.com:
    mode: split
    verify: postmaster@example.com
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com, bob@example.com] }]
"#,
    )
    .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
    .rejecting_sink()
    .start();
    let config = e.milter.config().to_owned();
    let client = e.client_from(OTHER_IP);
    // Waits until the running milter follows the new state (it re-reads
    // state_dir every 2 s), with throw-away recipients, then sends alice
    // and `rcpt` together: alice delivered, `rcpt` refused for now.
    let attempts = std::cell::Cell::new(0);
    let paused = |e: &E2e, rcpt: &str, cause: &str| {
        let deadline = Instant::now() + support::WAIT;
        loop {
            attempts.set(attempts.get() + 1);
            let probe = format!("wait{}@example.com", attempts.get());
            let t = client.send(SENDER, &[&probe], &message(&probe));
            if t.rcpt(&probe).code == 451 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{probe} not refused: {t}\n{}",
                e.diag()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let t = client.send(SENDER, &["alice@example.com", rcpt], &message(rcpt));
        let r = t.rcpt(rcpt);
        assert_eq!(
            (r.code, r.enhanced()),
            (451, Some("4.4.4")),
            "{t}\n{}",
            e.diag()
        );
        assert!(r.text.contains(cause), "{cause:?} missing: {t}");
        assert!(t.accepted(), "alice must still get it: {t}");
    };
    let routed = |e: &E2e, rcpt: &str| {
        let deadline = Instant::now() + support::WAIT;
        loop {
            let t = client.send(SENDER, &[rcpt], &message(rcpt));
            if t.accepted() {
                e.finish();
                let deadline = Instant::now() + support::WAIT;
                while !e.sink_deliveries().iter().any(|d| d.rcpt.address == rcpt) {
                    assert!(
                        Instant::now() < deadline,
                        "{rcpt} not at the sink\n{}",
                        e.diag()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                return;
            }
            assert_eq!(t.rcpt(rcpt).code, 451, "{t}\n{}", e.diag());
            assert!(
                Instant::now() < deadline,
                "{rcpt} still refused: {t}\n{}",
                e.diag()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };

    // 1. Verification: the destination refuses the probe address.
    paused(
        &e,
        "zed1@example.com",
        "waiting for verification of the destination",
    );
    let (_, st) = support::dualroute(&config, &["status"]);
    assert!(st.contains("WAITING for verification"), "{st}");
    // The destination is fixed; the admin re-verifies at once.
    e.sink.accept_all();
    let (exit, out) = support::dualroute(&config, &["verify", "example.com"]);
    assert!(exit.success(), "{out}");
    routed(&e, "zed1@example.com");

    // 2. An administrator's disable.
    let (exit, out) = support::dualroute(&config, &["disable", "example.com"]);
    assert!(exit.success(), "{out}");
    paused(&e, "zed2@example.com", "disabled by the administrator");
    let (exit, out) = support::dualroute(&config, &["enable", "example.com"]);
    assert!(exit.success(), "{out}");
    routed(&e, "zed2@example.com");

    // 3. A state file that cannot be read.
    let state = config.parent().unwrap().join("state/example.com.disabled");
    fs::write(&state, "{{{{ not yaml").unwrap();
    paused(&e, "zed3@example.com", "routing state unreadable");
    let (exit, st) = support::dualroute(&config, &["status"]);
    assert!(!exit.success() && st.contains("ERROR"), "{st}");
    fs::remove_file(&state).unwrap();
    routed(&e, "zed3@example.com");

    e.finish();
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
    assert_eq!(e.mailbox("alice@example.com").len(), 3, "{}", e.diag());
    for rcpt in ["zed1@example.com", "zed2@example.com", "zed3@example.com"] {
        e.sink_rcpt(rcpt);
    }
}

/// A real loop through a second hop: the other server sends example.com
/// mail back to us. The routed message comes back carrying our
/// X-Dualroute header, and the milter refuses it `554 5.4.6` instead of
/// routing it again or filing it in the catch-all; the second hop's log
/// shows the refusal (so its postmaster sees the loop).
#[test]
fn real_loop_through_a_second_hop_is_refused() {
    // The second hop: relays example.com (from loopback, in its
    // mynetworks) back to us once our port is known.
    let hop = Postfix::start(
        PostfixOptions::default()
            .map("loop_transport", "example.com error:4.4.1 not yet\n")
            .main_cf("transport_maps = hash:loop_transport"),
    );
    let e = setup(&format!(
        r#"  example.com:
    mode: split
    destination: {{ hosts: ["[127.0.0.1]:{}"] }}
    accounts: [{{ list: [alice@example.com] }}]
"#,
        hop.port()
    ))
    .mailboxes("example.com", &["alice@example.com"])
    .start();
    let map = hop.config_dir().join("loop_transport");
    fs::write(
        &map,
        format!("example.com smtp:[127.0.0.1]:{}\n", e.pf.port()),
    )
    .unwrap();
    for (cmd, args) in [
        (
            "postmap",
            vec![
                "-c".into(),
                hop.config_dir().display().to_string(),
                format!("hash:{}", map.display()),
            ],
        ),
        (
            "postfix",
            vec![
                "-c".into(),
                hop.config_dir().display().to_string(),
                "reload".into(),
            ],
        ),
    ] {
        let out = std::process::Command::new(support::tool(cmd))
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
    }
    // The hop's master logs `reload -- version …` once it has read the
    // new configuration; its trivial-rewrite reopens a changed hash table
    // on its own ("table has changed -- restarting").
    support::poll(|| hop.maillog().contains("reload -- version").then_some(()))
        .unwrap_or_else(|| panic!("the hop did not reload\n{}", hop.diagnostics()));

    let t = e.send_ok(&e.client_from(OTHER_IP), &["zed@example.com"], "loop");
    // Routed once to the hop, sent back, refused by our milter.
    let refused = support::poll(|| {
        hop.maillog()
            .lines()
            .find(|l| l.contains("554 5.4.6") && l.contains("routing loop"))
            .map(str::to_owned)
    });
    assert!(
        refused.is_some(),
        "the hop never saw 554 5.4.6\n--- hop ---\n{}\n{}",
        hop.diagnostics(),
        e.diag()
    );
    e.pf.wait_queue_empty();
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
    assert!(e.mailbox("alice@example.com").is_empty(), "{}", e.diag());
    e.milter_logged(&t, &["redirect to zed@example.com.dualroute.invalid"]);
    assert!(
        e.milter
            .log()
            .lines()
            .any(|l| l.contains("routing loop") && l.contains("554 5.4.6")),
        "{}",
        e.diag()
    );
    // Exactly one pass: the hop received it once and never got it again.
    let back: Vec<_> = hop
        .deliveries()
        .into_iter()
        .filter(|d| d.to == "zed@example.com")
        .collect();
    assert_eq!(back.len(), 1, "{}", hop.diagnostics());
    assert_ne!(back[0].status, "sent", "{}", hop.diagnostics());
}

/// `destination.max_size` (README "Size limit for copies"): a message
/// larger than the limit is delivered to the dual mailbox here and no copy
/// reaches the sink; a small one is copied as usual. It works only because
/// the milter asked Postfix for the body, which it does when a limit is set.
#[test]
fn copies_past_max_size_are_not_made() {
    let e = setup(
        r#"  example.com:
    mode: dual
    destination: { hosts: ["{SINK}"], max_size: 20K }
    accounts: [{ list: [alice@example.com] }]
"#,
    )
    .mailboxes("example.com", &["alice@example.com"])
    .without_dualroute_catchall()
    .start();
    // 40 000 bytes of body, twice the limit; no SIZE= from this client.
    let line = "0123456789".repeat(7) + "\n";
    let big = message("big") + &line.repeat(40_000 / line.len());
    let t = e.client().send(SENDER, &["alice@example.com"], &big);
    assert!(t.accepted(), "{t}\n{}", e.diag());
    e.milter_logged(&t, &["copy to", "not made", "max_size 20K"]);
    e.send_ok(&e.client(), &["alice@example.com"], "small");
    e.wait_sink_rcpts(1);
    e.finish();

    let sink = e.sink_deliveries();
    assert_eq!(
        sink.len(),
        1,
        "only the small message is copied\n{}",
        e.diag()
    );
    assert_eq!(sink[0].rcpt.address, "alice@example.com");
    assert_eq!(sink[0].message.header("Subject"), ["small"], "{}", e.diag());
    // Both are delivered here; only the copied one is marked.
    let mut here: Vec<(String, Vec<String>)> = e
        .mailbox("alice@example.com")
        .iter()
        .map(|m| (m.header("Subject").concat(), m.header("X-Dualroute")))
        .collect();
    here.sort();
    assert_eq!(
        here,
        [
            ("big".to_owned(), vec![]),
            ("small".to_owned(), vec![INSTANCE.to_owned()])
        ],
        "{}",
        e.diag()
    );
}

// ---------------------------------------------------------------------
// Shadow mode and the metrics endpoint (docs/rollout.md).
// ---------------------------------------------------------------------

const SHADOW_DOMAINS: &str = r#"  example.com:
    mode: split
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com, bob@example.com] }]
  example.org:
    mode: dual
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [frank@example.org] }]
"#;

/// The same messages for the live and the shadow run: one recipient of
/// each kind (keep alice, redirect zed, copy frank, reject ghost), one
/// that is kept, one whose only recipient is refused in live mode.
const SHADOW_MESSAGES: [(&[&str], &str); 3] = [
    (
        &[
            "alice@example.com",
            "zed@example.com",
            "frank@example.org",
            "ghost@example.org",
        ],
        "mixed",
    ),
    (&["bob@example.com"], "bob"),
    (&["ghost@example.org"], "ghost"),
];

/// The decisions both runs must log, as live mode writes them (shadow
/// mode writes `would ` before the decision and `; shadow mode` after the
/// rule).
const SHADOW_DECISIONS: [(&str, &str, &str); 4] = [
    ("<alice@example.com>", "keep", "mode split, account present here"),
    (
        "<zed@example.com>",
        "redirect to zed@example.com.dualroute.invalid",
        "mode split, no account here",
    ),
    (
        "<frank@example.org>",
        "copy to frank@example.org.dualroute.invalid",
        "mode dual, account present here",
    ),
    (
        "<ghost@example.org>",
        "reject 550 5.1.1 <ghost@example.org>: Recipient address rejected: no mailbox here by that name",
        "mode dual, no account here",
    ),
];

/// Sends [`SHADOW_MESSAGES`] through a scenario with `top_level` keys and
/// the metrics endpoint on; returns it once everything is delivered,
/// with the SMTP transcripts and a scrape.
fn shadow_scenario(top_level: &str) -> (E2e, Vec<SmtpTranscript>, support::metrics::Scrape) {
    // The milter binds its metrics port itself: started again on another
    // when another process has it.
    let (e, port) = support::start_on_a_port("the metrics endpoint", |port| {
        let e = setup(SHADOW_DOMAINS)
            .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
            .mailboxes_accept_all("example.org", &["frank@example.org"])
            .top_level(&format!(
                "{top_level}metrics: {{ listen: 127.0.0.1:{port} }}\n"
            ))
            .start();
        e.milter.metrics_bound(port).map(|()| (e, port))
    });
    let client = e.client();
    let transcripts: Vec<SmtpTranscript> = SHADOW_MESSAGES
        .iter()
        .map(|(rcpts, subject)| client.send(SENDER, rcpts, &message(subject)))
        .collect();
    e.finish();
    let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // The milter counts a message before it answers end of message, and
    // Postfix answers the client only after that: the numbers are there.
    let scrape = support::metrics::scrape(addr);
    (e, transcripts, scrape)
}

/// Shadow mode in real Postfix: every message is delivered exactly as
/// Postfix alone delivers it (each address to its mailbox or the
/// catch-all, nothing to the other server, no X-Dualroute header), while
/// the milter's log and metrics record the same decisions a live-mode run
/// of the same messages makes.
#[test]
fn shadow_mode_delivers_as_without_the_milter_and_records_the_live_decisions() {
    let (live, live_t, live_m) = shadow_scenario("");
    let (shadow, shadow_t, shadow_m) = shadow_scenario("shadow: true\n");

    // Live mode: ghost refused at RCPT, zed redirected and frank copied to
    // the other server.
    assert_eq!(
        live_t[0].rcpt("ghost@example.org").code,
        550,
        "{}",
        live_t[0]
    );
    assert!(!live_t[2].accepted(), "{}", live_t[2]);
    live.wait_sink_rcpts(2);
    let mut routed: Vec<String> = live
        .sink_deliveries()
        .into_iter()
        .map(|d| d.rcpt.address)
        .collect();
    routed.sort();
    assert_eq!(
        routed,
        ["frank@example.org", "zed@example.com"],
        "{}",
        live.diag()
    );

    // Shadow mode: what Postfix does without a milter. Every RCPT is
    // taken, every address lands in its own mailbox or the domain's
    // catch-all, nothing reaches the other server, nothing is marked.
    for t in &shadow_t {
        assert!(t.accepted(), "{t}\n{}", shadow.diag());
        for (address, reply) in t.rcpts() {
            assert_eq!(reply.code, 250, "{address}: {t}");
        }
    }
    assert_eq!(
        shadow.maildir_counts(),
        counts(&[
            ("catchall/example.org", 2),
            ("example.com/alice", 1),
            ("example.com/bob", 1),
            ("example.com/dualroute-catchall", 1),
            ("example.org/frank", 1),
        ]),
        "{}",
        shadow.diag()
    );
    for (dir, m) in shadow.maildir_files() {
        assert!(
            m.header("X-Dualroute").is_empty(),
            "{dir}: shadow mode marked a message\n{}",
            shadow.diag()
        );
    }
    // The queue is empty (shadow_scenario) and the sink holds exactly
    // what the maillog says was sent to it: a wrongly routed copy would
    // be a `status=sent` line to the sink, waited for here.
    sinks_settled(&shadow);
    assert!(shadow.sink.messages().is_empty(), "{}", shadow.diag());

    // The log: the same decision for each recipient, in live mode's words.
    let (live_log, shadow_log) = (live.milter.log(), shadow.milter.log());
    for (rcpt, decision, rule) in SHADOW_DECISIONS {
        let said = format!("{rcpt} {decision} ({rule})");
        assert!(
            live_log.contains(&said),
            "live mode did not log {said:?}\n{live_log}"
        );
        let would = format!("{rcpt} would {decision} ({rule}; shadow mode)");
        let shadow_said = if decision == "keep" { said } else { would };
        assert!(
            shadow_log.contains(&shadow_said),
            "shadow mode did not log {shadow_said:?}\n{shadow_log}"
        );
    }
    // ... and the actions live mode took, as what it would have done.
    assert!(
        shadow_log.contains("shadow mode: changed nothing; live mode would: add <zed@example.com.dualroute.invalid> ORCPT=rfc822;zed@example.com"),
        "{shadow_log}"
    );
    assert!(
        shadow_log.contains("shadow mode: RCPT <ghost@example.org>: would reject 550 5.1.1"),
        "{shadow_log}"
    );

    // The metrics: the numbers of the messages sent, the same in both
    // runs, under shadow="false" and shadow="true".
    let expected = [
        ("example.com", "keep", 2.0),
        ("example.com", "redirect", 1.0),
        ("example.org", "copy", 1.0),
        ("example.org", "reject", 2.0),
    ];
    for (m, shadow_label) in [(&live_m, "false"), (&shadow_m, "true")] {
        let mut got = m.samples("dualroute_decisions_total");
        got.retain(|(_, n)| *n > 0.0);
        let mut want: Vec<(String, f64)> = expected
            .iter()
            .map(|(domain, kind, n)| {
                (
                    format!("domain=\"{domain}\",kind=\"{kind}\",shadow=\"{shadow_label}\""),
                    *n,
                )
            })
            .collect();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want, "{}", m.text);
        assert_eq!(
            m.count("dualroute_conversations_total", &[]),
            3.0,
            "{}",
            m.text
        );
        assert_eq!(
            m.value("dualroute_accounts", &[("domain", "example.com")]),
            Some(2.0)
        );
    }
    // Messages timed: live mode's third never reached end of message.
    assert_eq!(live_m.count("dualroute_milter_seconds_count", &[]), 2.0);
    assert_eq!(shadow_m.count("dualroute_milter_seconds_count", &[]), 3.0);
}

// ---------------------------------------------------------------------
// Local submission (issue 21 §1): Postfix's `sendmail` command → postdrop
// → pickup → cleanup, which runs `non_smtpd_milters` in a simulated SMTP
// conversation (docs/design.md "Local submission").
// ---------------------------------------------------------------------

const LOCAL_DOMAINS: &str = r#"  example.com:
    mode: split
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com, postmaster@example.com] }]
  dual.example:
    mode: dual
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [dave@dual.example] }]
"#;

/// A split and a dual domain, the milter in `non_smtpd_milters` too, and
/// `myorigin` = the split domain (Debian's /etc/mailname often is): an
/// unqualified `sendmail zed` or cron's mail to `root` is then for
/// `zed@example.com`, `root@example.com`.
fn local_setup() -> E2e {
    setup(LOCAL_DOMAINS)
        .mailboxes(
            "example.com",
            &["alice@example.com", "postmaster@example.com"],
        )
        .mailboxes("dual.example", &["dave@dual.example"])
        .main_cf("myorigin = example.com")
        .local_submission()
        .start()
}

impl E2e {
    /// Submits with the `sendmail` command, as alice (her mailbox gets
    /// any bounce).
    fn submit(&self, rcpts: &[&str], text: &str) {
        let mut args = vec!["-f", "alice@example.com"];
        args.extend(rcpts);
        let out = self.pf.sendmail(&args, text);
        assert!(
            out.status.success(),
            "sendmail {args:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.diag()
        );
    }

    /// Waits until the milter follows `dualroute disable`/`enable` (it
    /// re-reads state_dir every 2 s): an SMTP probe to a fresh address of
    /// example.com gets `code` (451 held, 250 routed).
    fn wait_probe(&self, code: u16, n: &mut usize) {
        let deadline = Instant::now() + support::WAIT;
        loop {
            *n += 1;
            let probe = format!("probe{n}@example.com");
            let t = self.client().send(SENDER, &[&probe], &message(&probe));
            if t.rcpt(&probe).code == code {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{probe}: not {code}: {t}\n{}",
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// Locally submitted mail is decided as SMTP mail is, on the address
/// Postfix delivers to: a split unknown goes to the destination, a present
/// user stays here, a dual user is copied, unqualified `yan` and `root`
/// (myorigin appended) are routed — and nothing lands in the catch-all.
/// A forged loop header refuses the message at end of message, which
/// Postfix bounces to the local sender. Over SMTP, `RCPT TO:<zed3>` is
/// decided as zed3@example.com and `RCPT TO:<postmaster>` is accepted
/// (RFC 5321 §4.5.1) and delivered to the postmaster here.
#[test]
fn local_submission_is_decided_on_the_delivered_address() {
    let e = local_setup();
    e.submit(&["zed@example.com"], &message("local zed"));
    e.submit(&["alice@example.com"], &message("local alice"));
    e.submit(&["dave@dual.example"], &message("local dave"));
    e.submit(&["yan"], &message("local yan"));
    e.submit(&["root"], &message("cron root"));
    e.wait_sink_rcpts(4);
    e.finish();
    for (rcpt, subject) in [
        ("zed@example.com", "local zed"),
        ("dave@dual.example", "local dave"),
        ("yan@example.com", "local yan"),
        ("root@example.com", "cron root"),
    ] {
        let d = e.sink_rcpt(rcpt);
        assert_eq!(d.message.header("Subject"), [subject], "{}", e.diag());
        assert_eq!(d.message.header("X-Dualroute"), [INSTANCE], "{}", e.diag());
        assert_eq!(
            d.rcpt.orcpt().as_deref(),
            Some(format!("rfc822;{rcpt}").as_str()),
            "{}",
            e.diag()
        );
    }
    assert_eq!(e.sink_deliveries().len(), 4, "{}", e.diag());
    assert!(
        e.catchall("example.com").is_empty(),
        "local mail in the catch-all\n{}",
        e.diag()
    );
    assert_eq!(
        e.maildir_counts(),
        counts(&[("example.com/alice", 1), ("dual.example/dave", 1)]),
        "{}",
        e.diag()
    );

    // Over SMTP: an unqualified recipient is decided on {rcpt_addr}
    // (myorigin appended), `<postmaster>` is accepted.
    let t = e
        .client()
        .send(SENDER, &["<zed3>", "<postmaster>"], &message("bare"));
    assert_eq!(t.rcpt("zed3").code, 250, "{t}\n{}", e.diag());
    assert_eq!(t.rcpt("postmaster").code, 250, "{t}\n{}", e.diag());
    assert!(t.accepted(), "{t}");
    e.finish();
    let zed3 = e.sink_rcpt("zed3@example.com");
    assert_eq!(zed3.message.header("Subject"), ["bare"]);
    let postmaster = e.mailbox("postmaster@example.com");
    assert_eq!(postmaster.len(), 1, "{}", e.diag());
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());

    // A forged loop header on a message with a recipient to redirect:
    // 554 5.4.6 at end of message; cleanup bounces it to alice.
    let looped = format!("X-Dualroute: {INSTANCE}\n{}", message("forged loop"));
    e.submit(&["zed2@example.com"], &looped);
    let bounce = support::poll(|| {
        e.mailbox("alice@example.com")
            .into_iter()
            .find(|m| m.text.contains("5.4.6"))
    })
    .unwrap_or_else(|| panic!("no bounce with 5.4.6 for alice\n{}", e.diag()));
    assert!(bounce.text.contains("routing loop"), "{}", bounce.text);
    e.pf.wait_queue_empty();
    let bounced = e.pf.bounced();
    assert_eq!(bounced.len(), 1, "{}", e.diag());
    assert_eq!(bounced[0].to, "zed2@example.com");
    assert_eq!(bounced[0].dsn, "5.4.6");
    assert!(
        !e.sink_deliveries()
            .iter()
            .any(|d| d.rcpt.address == "zed2@example.com"),
        "{}",
        e.diag()
    );
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
}

/// While routing is off, a locally submitted message with a recipient to
/// redirect waits in Postfix's queue as a whole (a tempfail at end of
/// message: cleanup keeps it in the maildrop, pickup retries), with
/// nothing delivered, not even to alice, who is in the same message; after
/// `dualroute enable` it goes out routed, each recipient exactly once.
#[test]
fn local_submission_held_waits_then_goes_out_routed_once() {
    let e = local_setup();
    let config = e.milter.config().to_owned();
    let mut probes = 0;
    let (exit, out) = support::dualroute(&config, &["disable", "example.com"]);
    assert!(exit.success(), "{out}");
    e.wait_probe(451, &mut probes);

    e.submit(&["alice@example.com", "held@example.com"], &message("held"));
    e.milter.wait_log(&["held@example.com", "451 4.4.4"], 1);
    // Retried by pickup, still held, still waiting: the milter's second
    // refusal of it shows the retry was decided before we look.
    e.pf.wake_pickup();
    e.milter.wait_log(&["held@example.com", "451 4.4.4"], 2);
    assert!(
        e.pf.queue().iter().any(|(q, _)| q == "maildrop"),
        "the held message is not waiting in the maildrop\n{}",
        e.diag()
    );
    assert!(e.mailbox("alice@example.com").is_empty(), "{}", e.diag());
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
    assert!(
        !e.pf.maillog().contains("milter configuration error"),
        "{}",
        e.diag()
    );

    let (exit, out) = support::dualroute(&config, &["enable", "example.com"]);
    assert!(exit.success(), "{out}");
    e.wait_probe(250, &mut probes);
    // `postqueue -f` wakes pickup too: the maildrop is read at once
    // (without it, at pickup's next 60 s wake-up).
    e.pf.flush();
    let deadline = Instant::now() + support::WAIT;
    while !e
        .sink_deliveries()
        .iter()
        .any(|d| d.rcpt.address == "held@example.com")
    {
        assert!(Instant::now() < deadline, "held@ not routed\n{}", e.diag());
        std::thread::sleep(Duration::from_millis(100));
    }
    e.finish();
    // Postfix's own words: refused for now at end of message, never the
    // RCPT "milter configuration error".
    let log = e.pf.maillog();
    assert!(
        log.lines()
            .any(|l| l.contains("milter-reject: END-OF-MESSAGE") && l.contains("4.4.4")),
        "{}",
        e.diag()
    );
    assert!(!log.contains("milter configuration error"), "{}", e.diag());
    let held = e.sink_rcpt("held@example.com");
    assert_eq!(held.message.header("Subject"), ["held"]);
    assert_eq!(e.mailbox("alice@example.com").len(), 1, "{}", e.diag());
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
}

/// The notifier's own message, given to Postfix's `sendmail` command
/// (`via: sendmail`), now passes through the milter (non_smtpd_milters):
/// it is recognised by its one-time token and not routed (dave is a dual
/// user: no copy at the sink), and the token header is deleted. A local
/// user who forges the header with a token of their own is decided as
/// anyone else (copied) and loses the header too.
#[test]
fn local_submission_own_notification_is_recognised_by_its_token() {
    let bin = tempfile::Builder::new()
        .prefix("dualroute-notify-bin-")
        .tempdir()
        .expect("create a temporary directory");
    let wrapper = bin.path().join("sendmail");
    let e = setup(LOCAL_DOMAINS)
        .mailboxes(
            "example.com",
            &["alice@example.com", "postmaster@example.com"],
        )
        .mailboxes("dual.example", &["dave@dual.example"])
        .main_cf("myorigin = example.com")
        .local_submission()
        .top_level(&format!(
            "notify: {{ to: [dave@dual.example], via: \"sendmail:{}\" }}\n",
            wrapper.display()
        ))
        .start();
    // Postfix's sendmail into this instance (its config directory is
    // known only now).
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec /usr/sbin/sendmail -C '{}' \"$@\"\n",
            e.pf.config_dir().display()
        ),
    )
    .unwrap();
    support::set_mode(&wrapper, 0o755);

    // A refused reload is an event: the notifier sends.
    let config = e.milter.config().to_owned();
    let good = fs::read_to_string(&config).unwrap();
    fs::write(&config, format!("{good}bogus_key: 1\n")).unwrap();
    e.milter.signal("HUP");
    let note = support::poll(|| {
        e.mailbox("dave@dual.example")
            .into_iter()
            .find(|m| !m.header("X-Dualroute-Notify").is_empty())
    })
    .unwrap_or_else(|| panic!("no notification for dave\n{}", e.diag()));
    fs::write(&config, &good).unwrap();
    assert!(
        note.header("X-Dualroute-Notify-Token").is_empty(),
        "{}",
        note.text
    );
    assert!(note.header("X-Dualroute").is_empty(), "{}", note.text);
    e.milter
        .wait_log(&["own notifier (sendmail): not routed"], 1);

    // A forged token: copied like any message to dave, header gone.
    let forged = format!(
        "X-Dualroute-Notify-Token: 00112233445566778899aabbccddeeff\n{}",
        message("forged token")
    );
    e.submit(&["dave@dual.example"], &forged);
    let copy = e.wait_sink_rcpts(1);
    assert_eq!(copy.len(), 1, "{}", e.diag());
    assert_eq!(copy[0].message.header("Subject"), ["forged token"]);
    assert!(copy[0]
        .message
        .header("X-Dualroute-Notify-Token")
        .is_empty());
    e.finish();
    let dave = e.mailbox("dave@dual.example");
    assert_eq!(dave.len(), 2, "{}", e.diag());
    for m in &dave {
        assert!(
            m.header("X-Dualroute-Notify-Token").is_empty(),
            "{}",
            m.text
        );
    }
    // The notification was never copied.
    assert_eq!(e.sink.messages().len(), 1, "{}", e.diag());
}
