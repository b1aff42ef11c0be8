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
//! They need root and Postfix (scripts/test-deps.sh). Set
//! `DUALROUTE_KEEP_TMP=1` to keep the trees (milter.yaml, generated config,
//! milter log) of a run.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use support::{
    postfix_config, read_maildir, MaildirMessage, MilterProcess, Postfix, PostfixConfig,
    PostfixOptions, SinkMessage, SinkRcpt, SmtpClient, SmtpSink, SmtpTranscript, OUTSIDE_IP,
};

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

/// A recipient as the sink saw it, with the message it came in.
#[derive(Debug)]
struct SinkDelivery {
    rcpt: SinkRcpt,
    message: SinkMessage,
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
    fn sink_deliveries(&self) -> Vec<SinkDelivery> {
        self.sink
            .messages()
            .into_iter()
            .flat_map(|m| {
                m.rcpts.clone().into_iter().map(move |rcpt| SinkDelivery {
                    rcpt,
                    message: m.clone(),
                })
            })
            .collect()
    }

    /// Waits until the sink has received `n` RCPTs in all.
    fn wait_sink_rcpts(&self, n: usize) -> Vec<SinkDelivery> {
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
    fn sink_rcpt(&self, address: &str) -> SinkDelivery {
        let mut found: Vec<SinkDelivery> = self
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
        let queue_id = t.queue_id().expect("a queue id");
        let found = support::poll(|| {
            let log = self.milter.log();
            let line = log
                .lines()
                .find(|l| l.contains(&queue_id) && words.iter().all(|w| l.contains(w)))
                .map(str::to_owned);
            line
        });
        assert!(
            found.is_some(),
            "no milter log line with queue id {queue_id} and {words:?}\n{}",
            self.diag()
        );
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

/// split: present here only; unknown only at the sink, as the original
/// address (generic map) with ORCPT naming it; nothing in the catch-all.
#[test]
fn split_keeps_present_and_routes_unknown_with_original_address() {
    let e = setup(SPLIT_EXAMPLE_COM)
        .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
        .start();
    let t = e.send_ok(
        &e.client(),
        &["alice@example.com", "zed@example.com"],
        "split",
    );
    assert_eq!(t.rcpt("alice@example.com").code, 250, "{t}");
    assert_eq!(t.rcpt("zed@example.com").code, 250, "{t}");
    e.finish();

    let alice = e.mailbox("alice@example.com");
    assert_eq!(alice.len(), 1, "{}", e.diag());
    assert_eq!(alice[0].header("Delivered-To"), ["alice@example.com"]);
    // Postfix delivers the message the milter changed: the header is there.
    assert_eq!(alice[0].header("X-Dualroute"), [INSTANCE], "{}", e.diag());
    assert!(e.mailbox("bob@example.com").is_empty());
    assert!(
        e.catchall("example.com").is_empty(),
        "zed reached the catch-all\n{}",
        e.diag()
    );

    e.wait_sink_rcpts(1);
    let zed = e.sink_rcpt("zed@example.com");
    assert_eq!(e.sink_deliveries().len(), 1, "{}", e.diag());
    assert_eq!(
        zed.rcpt.orcpt().as_deref(),
        Some("rfc822;zed@example.com"),
        "{}",
        e.diag()
    );
    assert_eq!(zed.message.mail_from(), SENDER);
    assert_eq!(zed.message.header("X-Dualroute"), [INSTANCE]);
    assert_eq!(zed.message.header("Subject"), ["split"]);
    assert!(zed.message.text.contains("body of split"));
    assert_eq!(
        e.maildir_counts(),
        counts(&[("example.com/alice", 1)]),
        "{}",
        e.diag()
    );

    // The maillog shows the relay address going out through the dualroute
    // transport to the sink.
    let out =
        e.pf.deliveries()
            .into_iter()
            .find(|d| d.to == "zed@example.com.dualroute.invalid")
            .unwrap_or_else(|| panic!("no delivery of the relay address\n{}", e.diag()));
    assert_eq!(out.status, "sent");
    assert_eq!(out.relay, format!("127.0.0.1[127.0.0.1]:{}", e.sink.port()));
    e.milter_logged(
        &t,
        &[
            "zed@example.com",
            "redirect to zed@example.com.dualroute.invalid",
        ],
    );
}

/// dual: present here and at the sink (NOTIFY=NEVER with `bounce: false`,
/// NOTIFY=FAILURE with `bounce: true`, ORCPT the original); unknown refused
/// at RCPT and delivered nowhere. In example.com Postfix refuses the
/// unknown address itself (no catch-all: the setup postfix-config
/// implies); example.org has a catch-all of its own, so there the milter
/// refuses it.
#[test]
fn dual_copies_present_and_refuses_unknown() {
    let e = setup(
        r#"  example.com:
    mode: dual
    destination: { hosts: ["{SINK}"] }
    bounce: false
    accounts: [{ list: [alice@example.com] }]
  example.org:
    mode: dual
    destination: { hosts: ["{SINK}"] }
    bounce: true
    accounts: [{ list: [frank@example.org] }]
"#,
    )
    .mailboxes("example.com", &["alice@example.com"])
    .mailboxes_accept_all("example.org", &["frank@example.org"])
    .without_dualroute_catchall()
    .start();
    // No split/route domain: postfix-config prints no catch-all.
    assert!(
        !e.generated.has_table("dualroute_catchall"),
        "{}",
        e.generated.printed
    );

    let t = e.client().send(
        SENDER,
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
    e.finish();
    let log = e.pf.maillog();
    assert!(
        log.lines().any(|l| l.contains(": reject: RCPT")
            && l.contains("<zed@example.com>: Recipient address rejected: User unknown")),
        "Postfix itself should refuse zed\n{}",
        e.diag()
    );
    assert!(
        log.lines().any(|l| l.contains("milter-reject: RCPT")
            && l.contains("5.1.1")
            && l.contains("yan@example.org")),
        "the milter should refuse yan\n{}",
        e.diag()
    );

    assert_eq!(
        e.maildir_counts(),
        counts(&[("example.com/alice", 1), ("example.org/frank", 1)]),
        "{}",
        e.diag()
    );
    e.wait_sink_rcpts(2);
    let sink = e.sink_deliveries();
    let mut addresses: Vec<&str> = sink.iter().map(|d| d.rcpt.address.as_str()).collect();
    addresses.sort();
    assert_eq!(
        addresses,
        ["alice@example.com", "frank@example.org"],
        "{}",
        e.diag()
    );

    let alice = e.sink_rcpt("alice@example.com");
    assert_eq!(alice.rcpt.notify(), Some("NEVER"), "{}", e.diag());
    assert_eq!(
        alice.rcpt.orcpt().as_deref(),
        Some("rfc822;alice@example.com")
    );
    assert_eq!(alice.message.header("X-Dualroute"), [INSTANCE]);
    let frank = e.sink_rcpt("frank@example.org");
    assert_eq!(frank.rcpt.notify(), Some("FAILURE"), "{}", e.diag());
    assert_eq!(
        frank.rcpt.orcpt().as_deref(),
        Some("rfc822;frank@example.org")
    );
    assert_eq!(frank.message.header("X-Dualroute"), [INSTANCE]);

    // The local copies too went through the milter once.
    for address in ["alice@example.com", "frank@example.org"] {
        let local = e.mailbox(address);
        assert_eq!(local[0].header("X-Dualroute"), [INSTANCE], "{address}");
    }
    // Nothing anywhere for the refused addresses.
    assert!(
        e.pf.deliveries()
            .iter()
            .all(|d| !d.to.starts_with("zed@") && !d.to.starts_with("yan@")),
        "{}",
        e.diag()
    );
    assert!(
        e.pf.maildir_messages("@example.org").is_empty(),
        "{}",
        e.diag()
    );
}

/// route: nothing stays here (neither the mailbox nor the catch-all),
/// everything goes to the sink.
#[test]
fn route_sends_everything_to_the_destination() {
    let e = setup(
        r#"  example.com:
    mode: route
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com] }]
"#,
    )
    .mailboxes("example.com", &["alice@example.com"])
    .start();
    let t = e.send_ok(
        &e.client(),
        &["alice@example.com", "zed@example.com"],
        "route",
    );
    e.finish();

    e.wait_sink_rcpts(2);
    assert_eq!(e.sink_deliveries().len(), 2, "{}", e.diag());
    for address in ["alice@example.com", "zed@example.com"] {
        let d = e.sink_rcpt(address);
        assert_eq!(
            d.rcpt.orcpt(),
            Some(format!("rfc822;{address}")),
            "{}",
            e.diag()
        );
        assert_eq!(d.message.header("X-Dualroute"), [INSTANCE]);
    }
    assert!(e.mailbox("alice@example.com").is_empty(), "{}", e.diag());
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
    assert_eq!(e.maildir_counts(), counts(&[]), "{}", e.diag());
    e.milter_logged(
        &t,
        &[
            "redirect to alice@example.com.dualroute.invalid",
            "redirect to zed@example.com.dualroute.invalid",
        ],
    );
}

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

/// Per-user rules: copy_to (kept here and copied), redirect_to (only there),
/// keep in a route domain (only here); everyone else by the mode.
#[test]
fn per_user_copy_redirect_and_keep() {
    let e = setup(
        r#"  example.com:
    mode: split
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com, carol@example.com, dave@example.com] }]
    users:
      carol@example.com: { copy_to: [carol@pilot.test] }
      dave@example.com: { redirect_to: dave@pilot.test }
  example.net:
    mode: route
    destination: { hosts: ["{SINK}"] }
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
    .route_to_sink("pilot.test")
    .start();
    let t = e.send_ok(
        &e.client(),
        &[
            "alice@example.com",
            "carol@example.com",
            "dave@example.com",
            "erin@example.net",
            "gus@example.net",
        ],
        "pilots",
    );
    e.finish();

    assert_eq!(
        e.maildir_counts(),
        counts(&[
            ("example.com/alice", 1),
            ("example.com/carol", 1),
            ("example.net/erin", 1)
        ]),
        "{}",
        e.diag()
    );
    e.wait_sink_rcpts(3);
    let mut at_sink: Vec<String> = e
        .sink_deliveries()
        .into_iter()
        .map(|d| d.rcpt.address)
        .collect();
    at_sink.sort();
    assert_eq!(
        at_sink,
        ["carol@pilot.test", "dave@pilot.test", "gus@example.net"],
        "{}",
        e.diag()
    );

    let carol = e.sink_rcpt("carol@pilot.test");
    assert_eq!(
        carol.rcpt.orcpt().as_deref(),
        Some("rfc822;carol@example.com")
    );
    assert_eq!(carol.rcpt.notify(), Some("NEVER"), "a copy, bounce: false");
    let dave = e.sink_rcpt("dave@pilot.test");
    assert_eq!(
        dave.rcpt.orcpt().as_deref(),
        Some("rfc822;dave@example.com")
    );
    let gus = e.sink_rcpt("gus@example.net");
    assert_eq!(gus.rcpt.orcpt().as_deref(), Some("rfc822;gus@example.net"));
    for d in [&carol, &dave, &gus] {
        assert_eq!(d.message.header("X-Dualroute"), [INSTANCE]);
    }
    assert!(e.catchall("example.com").is_empty());
    assert!(e.catchall("example.net").is_empty());
    e.milter_logged(
        &t,
        &[
            "copy to carol@pilot.test",
            "redirect to dave@pilot.test",
            "erin@example.net> keep",
        ],
    );
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

/// `enabled: false`: routing is off. A mailbox here gets its mail; an
/// address that would be routed and has none here is refused for now
/// (451 4.4.4), never filed in the catch-all; nothing at the sink, no header.
#[test]
fn disabled_domain_keeps_mailboxes_and_tempfails_the_rest() {
    let e = setup(
        r#"  example.com:
    mode: split
    enabled: false
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com] }]
"#,
    )
    .mailboxes("example.com", &["alice@example.com"])
    .start();
    let t = e.send_ok(
        &e.client(),
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
    e.finish();

    assert_eq!(
        e.maildir_counts(),
        counts(&[("example.com/alice", 1)]),
        "{}",
        e.diag()
    );
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
    for (_, m) in e.maildir_files() {
        assert!(m.header("X-Dualroute").is_empty(), "{}", m.text);
    }
    assert!(e.sink.messages().is_empty(), "{}", e.diag());
    e.milter_logged(
        &t,
        &["alice@example.com> keep (routing off (the domain has enabled: false))"],
    );
    assert!(
        e.milter
            .log()
            .contains("NOQUEUE: RCPT <zed@example.com>: tempfail 451 4.4.4"),
        "{}",
        e.diag()
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

/// `require_gateway: true`: other clients are refused 550 5.7.1 at RCPT;
/// the gateway gets through (and is not routed).
#[test]
fn require_gateway_refuses_other_clients() {
    let e = setup(
        r#"  example.com:
    mode: split
    require_gateway: true
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com] }]
"#,
    )
    .mailboxes("example.com", &["alice@example.com"])
    .gateway(GATEWAY_IP)
    .start();

    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), OTHER_IP] {
        let t = e.client_from(ip).send(
            SENDER,
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
    assert!(e.pf.queue().is_empty(), "{}", e.diag());

    let t = e.send_ok(
        &e.client_from(GATEWAY_IP),
        &["alice@example.com"],
        "via the gateway",
    );
    assert_eq!(t.rcpt("alice@example.com").code, 250, "{t}");
    e.finish();
    assert_eq!(
        e.maildir_counts(),
        counts(&[("example.com/alice", 1)]),
        "{}",
        e.diag()
    );
    assert_eq!(
        e.mailbox("alice@example.com")[0].header("Subject"),
        ["via the gateway"]
    );
    assert!(e.sink.messages().is_empty(), "{}", e.diag());
}

/// A message that already carries our X-Dualroute header (forged, or a real
/// loop) and has a recipient to redirect is refused 554 5.4.6 at end of
/// data: nothing reaches the catch-all, the sink or alice. Without a
/// redirect it is delivered here, without copies. Another instance's header
/// does not stop routing.
#[test]
fn loop_header_refuses_redirects() {
    let e = setup(
        r#"  example.com:
    mode: split
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com, bob@example.com] }]
    users:
      bob@example.com: { copy_to: [bob@pilot.test] }
"#,
    )
    .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
    .route_to_sink("pilot.test")
    .start();
    let looped = format!("X-Dualroute: {INSTANCE}\n{}", message("looped"));
    let t = e
        .client()
        .send(SENDER, &["alice@example.com", "zed@example.com"], &looped);
    let eod = t.end_of_data().expect("a reply to the end of data");
    assert_eq!(
        (eod.code, eod.enhanced()),
        (554, Some("5.4.6")),
        "{t}\n{}",
        e.diag()
    );
    assert!(eod.text.contains("routing loop"), "{t}");
    assert!(!t.accepted(), "{t}");
    assert!(e.pf.queue().is_empty(), "{}", e.diag());
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
    assert!(e.mailbox("alice@example.com").is_empty(), "{}", e.diag());
    assert!(
        e.milter
            .log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("routing loop") && l.contains("554 5.4.6")),
        "no warning about the loop\n{}",
        e.diag()
    );

    // Only a copy to make: delivered here, the copy is not made again.
    let t = e.client().send(SENDER, &["bob@example.com"], &looped);
    assert!(t.accepted(), "{t}\n{}", e.diag());
    e.finish();
    assert_eq!(e.mailbox("bob@example.com").len(), 1, "{}", e.diag());
    assert!(e.sink.messages().is_empty(), "{}", e.diag());

    // Another MX's header: routed as usual, our header added once.
    let other = format!(
        "X-Dualroute: mx9.elsewhere.test\n{}",
        message("other instance")
    );
    let t = e.client().send(SENDER, &["zed@example.com"], &other);
    assert!(t.accepted(), "{t}");
    e.finish();
    e.wait_sink_rcpts(1);
    let zed = e.sink_rcpt("zed@example.com");
    let headers = zed.message.header("X-Dualroute");
    assert_eq!(
        headers.iter().filter(|v| *v == INSTANCE).count(),
        1,
        "{headers:?}"
    );
    assert!(
        headers.iter().any(|v| v == "mx9.elsewhere.test"),
        "{headers:?}"
    );
    assert!(e.catchall("example.com").is_empty(), "{}", e.diag());
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

/// One message with every kind of recipient: each ends up exactly once in
/// the right place, nothing anywhere else.
#[test]
fn mixed_message_every_recipient_exactly_once() {
    let e = setup(
        r#"  example.com:
    mode: split
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [alice@example.com, bob@example.com, carol@example.com, dave@example.com] }]
    users:
      carol@example.com: { copy_to: carol@pilot.test }
      dave@example.com: { redirect_to: dave@pilot.test }
  example.org:
    mode: dual
    destination: { hosts: ["{SINK}"] }
    bounce: true
    accounts: [{ list: [frank@example.org] }]
  example.net:
    mode: route
    destination: { hosts: ["{SINK}"] }
    accounts: [{ list: [erin@example.net] }]
    users:
      erin@example.net: { keep: true }
  example.edu:
    mode: split
    enabled: false
    destination: { hosts: ["{SINK}"] }
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
            "dave@example.com",
        ],
    )
    .mailboxes("example.org", &["frank@example.org"])
    .mailboxes("example.net", &["erin@example.net", "gus@example.net"])
    .mailboxes("example.edu", &["hal@example.edu"])
    .mailboxes("example.info", &["ivy@example.info"])
    .mailboxes("unmanaged.test", &["jo@unmanaged.test"])
    .route_to_sink("pilot.test")
    .route_to_sink("newdest.test")
    .main_cf("recipient_delimiter = +")
    .start();
    let rcpts = [
        "alice@example.com",    // split, present: here
        "bob+news@example.com", // split, present via subaddress: here
        "zed@example.com",      // split, unknown: sink
        "zed+x@example.com",    // split, unknown with a tag: sink
        "carol@example.com",    // copy_to: here + sink
        "dave@example.com",     // redirect_to: sink
        "frank@example.org",    // dual present: here + sink
        "yan@example.org",      // dual unknown: refused
        "erin@example.net",     // keep in route: here
        "gus@example.net",      // route: sink
        "hal@example.edu",      // disabled, present: here
        "kim@example.edu",      // disabled, unknown: 451 (routing paused)
        "ivy@example.info",     // split with change_envelope, present: here
        "lou@example.info",     // split with change_envelope, unknown: sink as lou@newdest.test
        "jo@unmanaged.test",    // not managed: here
    ];
    let t = e.client().send(SENDER, &rcpts, &message("everything"));
    for (rcpt, reply) in t.rcpts() {
        let expected = match rcpt {
            "yan@example.org" => 550,
            "kim@example.edu" => 451,
            _ => 250,
        };
        assert_eq!(reply.code, expected, "{rcpt}: {t}\n{}", e.diag());
    }
    assert!(t.accepted(), "{t}");
    e.finish();

    assert_eq!(
        e.maildir_counts(),
        counts(&[
            ("example.com/alice", 1),
            ("example.com/bob", 1),
            ("example.com/carol", 1),
            ("example.edu/hal", 1),
            ("example.info/ivy", 1),
            ("example.net/erin", 1),
            ("example.org/frank", 1),
            ("unmanaged.test/jo", 1),
        ]),
        "{}",
        e.diag()
    );
    assert!(e.catchall("example.edu").is_empty(), "{}", e.diag());

    let expected_sink = [
        ("carol@pilot.test", "carol@example.com", Some("NEVER")),
        ("dave@pilot.test", "dave@example.com", None),
        ("frank@example.org", "frank@example.org", Some("FAILURE")),
        ("gus@example.net", "gus@example.net", None),
        ("lou@newdest.test", "lou@example.info", None),
        ("zed+x@example.com", "zed+x@example.com", None),
        ("zed@example.com", "zed@example.com", None),
    ];
    e.wait_sink_rcpts(expected_sink.len());
    let sink = e.sink_deliveries();
    let mut at_sink: Vec<&str> = sink.iter().map(|d| d.rcpt.address.as_str()).collect();
    at_sink.sort();
    let expected: Vec<&str> = expected_sink.iter().map(|(a, _, _)| *a).collect();
    assert_eq!(at_sink, expected, "{}", e.diag());
    for (address, original, notify) in expected_sink {
        let d = e.sink_rcpt(address);
        assert_eq!(
            d.rcpt.orcpt(),
            Some(format!("rfc822;{original}")),
            "{address}\n{}",
            e.diag()
        );
        if let Some(notify) = notify {
            assert_eq!(d.rcpt.notify(), Some(notify), "{address}");
        }
    }
    // One X-Dualroute header on every copy, routed or local (it is one
    // message), and the body intact.
    for m in e.sink.messages() {
        assert_eq!(m.header("X-Dualroute"), [INSTANCE], "{}", m.text);
        assert!(m.text.contains("body of everything"));
    }
    for (dir, m) in e.maildir_files() {
        assert_eq!(m.header("X-Dualroute"), [INSTANCE], "{dir}");
    }
    // Every delivery in the maillog is a success, and each final
    // destination appears once.
    let deliveries = e.pf.deliveries();
    assert_eq!(deliveries.len(), 8 + expected_sink.len(), "{}", e.diag());
    assert!(
        deliveries.iter().all(|d| d.status == "sent"),
        "{}",
        e.diag()
    );
}

/// The milter dies: Postfix answers 451 4.7.1 and queues nothing; once it
/// is back, the client's retry is delivered exactly once.
#[test]
fn milter_down_tempfails_then_retry_delivers_once() {
    let mut e = setup(SPLIT_EXAMPLE_COM)
        .mailboxes("example.com", &["alice@example.com", "bob@example.com"])
        .start();
    e.milter.kill();

    let rcpts = ["alice@example.com", "zed@example.com"];
    let t = e.client().send(SENDER, &rcpts, &message("retried"));
    let tempfail = t
        .steps
        .iter()
        .find(|(command, _)| command.starts_with("MAIL") || command.starts_with("RCPT"))
        .filter(|(_, r)| r.code == 451)
        .map(|(_, r)| r.clone());
    assert_eq!(
        tempfail.as_ref().map(|r| r.enhanced()),
        Some(Some("4.7.1")),
        "expected 451 4.7.1 at MAIL or RCPT: {t}\n{}",
        e.diag()
    );
    assert!(!t.accepted(), "{t}");
    assert!(e.pf.queue().is_empty(), "{}", e.diag());
    assert!(e.pf.maillog().contains("milter"), "{}", e.diag());

    e.milter.spawn();
    let t = e.send_ok(&e.client(), &rcpts, "retried");
    e.finish();
    assert_eq!(
        e.maildir_counts(),
        counts(&[("example.com/alice", 1)]),
        "{}",
        e.diag()
    );
    e.wait_sink_rcpts(1);
    // Give a duplicate a chance to show up before counting.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(e.sink_deliveries().len(), 1, "{}", e.diag());
    e.sink_rcpt("zed@example.com");
    e.milter_logged(&t, &["redirect to zed@example.com.dualroute.invalid"]);
    let _ = std::io::stderr().flush();
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
    e.wait_sink_rcpts(2);
    std::thread::sleep(Duration::from_millis(300));
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
    std::thread::sleep(Duration::from_secs(1));

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
    // Give a wrongly routed copy time to arrive before saying none did.
    std::thread::sleep(Duration::from_millis(500));
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
    // Retried by pickup, still held, still waiting.
    e.pf.wake_pickup();
    std::thread::sleep(Duration::from_secs(1));
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
