//! Several MX hosts act as one through Redis, end to end with real parts
//! (issue 24, ../shared/DESIGN.md §11, docs/design.md "Several MX hosts"):
//! two private Postfix instances, P1 and P2 (tests/support/postfix.rs),
//! each with its own `dualroute run` process (tests/support/milter.rs),
//! nodes `mx-1.test` and `mx-2.test` with their own state_dir, one private
//! `redis-server` (tests/support/redis.rs) in both `cluster.redis`, and one
//! smtp-sink as the destination both route to (tests/support/sink.rs).
//! tests/cluster.rs covers the behaviour with two in-process nodes; here
//! the admin's command, the MTA's SMTP replies, the Maildir, the sink and
//! each Postfix's own log are the real thing.
//!
//! - routing on: `zed@example.com` (no mailbox here) through P1 and
//!   through P2 arrives at the sink;
//! - `dualroute --config node1.yaml disable example.com` holds on node 2
//!   within seconds (P2 answers `451 4.4.4` at RCPT, alice still gets her
//!   mail there); `enable` through node 2 routes through P1 again;
//! - the bounce breaker: each node follows its own Postfix's log; two
//!   bounces through P1 and one through P2 add up to one trip (threshold
//!   3) that holds on both;
//! - the kill soak, two nodes: load spread over both Postfix instances,
//!   each milter SIGKILLed and restarted every N messages, Redis killed
//!   and restarted empty in the middle: 0 lost, 0 duplicated, 0 misrouted;
//!   a domain disabled through node 1 before the load stays held (451
//!   4.4.4) on both nodes all along, and is in the refilled Redis again.
//!
//! Soak knobs (as tests/kill_soak.rs): `DUALROUTE_SOAK_MESSAGES` (default
//! 1000), `DUALROUTE_SOAK_KILL_EVERY` (default 100: messages between two
//! kills of the same milter; the two nodes' kills are staggered by half of
//! it), `DUALROUTE_SOAK_CLIENTS` (default 4).
//!
//! Needs root, Postfix and redis-server (scripts/test-deps.sh). "Within
//! seconds" is a poll of up to [`support::WAIT`], never a fixed sleep; a
//! negative check waits for a barrier (the breaker's own log line that it
//! counted a failure) first.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::redis::Redis;
use support::soak::{knob, Progress};
use support::{
    dualroute, postfix_config, read_maildir, MilterProcess, Port, Postfix, PostfixOptions,
    SmtpClient, SmtpSink, SmtpTranscript, OUTSIDE_IP, SENDER,
};

const N1: &str = "mx-1.test";
const N2: &str = "mx-2.test";

/// The key prefix of the shared state (`cluster.prefix`'s default,
/// src/cluster/mod.rs).
const NODES_KEY: &str = "dualroute:nodes";

/// example.com split: alice has a mailbox here (on both hosts), every
/// other address is routed to the destination (`{SINK}`).
const EXAMPLE_COM: &str = "  example.com:
    mode: split
    destination: { hosts: [\"{SINK}\"] }
    accounts: [{ list: [alice@example.com] }]
";

/// One MX host: a private Postfix and its `dualroute run`.
struct Node {
    name: &'static str,
    config: PathBuf,
    pf: Postfix,
    milter: Option<MilterProcess>,
    _tmp: tempfile::TempDir,
}

/// What a node is made of besides its name.
struct Setup<'a> {
    redis: &'a Redis,
    sink: &'a SmtpSink,
    /// The `domains:` entries, `{SINK}` standing for the sink's next hop.
    domains: &'a str,
    /// (domain, accounts with a Maildir here) for Postfix.
    mailboxes: &'a [(&'a str, &'a [&'a str])],
    /// Follow this node's Postfix log (`breaker.maillog`), threshold 3.
    breaker: bool,
}

impl Node {
    fn start(name: &'static str, s: &Setup) -> Node {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("dualroute-{name}."))
            .tempdir()
            .expect("create a temporary directory");
        let dir = tmp.path();
        let port = Port::reserve();
        let config = dir.join("milter.yaml");
        let yaml = format!(
            "listen: inet:127.0.0.1:{port}\ninstance: {name}\nstate_dir: {state}\ncluster: {{ redis: \"{redis}\", sync: 1s }}\ndomains:\n{domains}",
            port = port.number(),
            state = dir.join("state").display(),
            redis = s.redis.url(),
            domains = s.domains.replace("{SINK}", &s.sink.nexthop()),
        );
        fs::write(&config, &yaml).expect("write milter.yaml");
        let mut opts = PostfixOptions::default()
            // No delay after the client's errors (a refused RCPT is
            // expected here).
            .main_cf("smtpd_error_sleep_time = 0")
            .main_cf("smtpd_soft_error_limit = 100");
        for (domain, accounts) in s.mailboxes {
            opts = opts.domain_without_catchall(domain, accounts);
        }
        let opts = postfix_config(&config, &dir.join("postfix-config")).apply_to(opts);
        let pf = Postfix::start(opts);
        if s.breaker {
            // Only now is the maillog's path known; breaker.maillog is
            // left out of the configuration digest (each host has its
            // own log), so the nodes still agree.
            fs::write(
                &config,
                format!(
                    "{yaml}breaker: {{ maillog: {}, threshold: 3, window: 1h }}\n",
                    pf.maillog_path().display()
                ),
            )
            .expect("write milter.yaml");
        }
        let milter = MilterProcess::start(&config, &port, &dir.join("milter.log"));
        if s.breaker {
            // The breaker starts at the log's end a moment after the
            // milter serves: a bounce logged before that is never counted.
            wait_log(&milter, "bounce breaker: following");
        }
        Node {
            name,
            config,
            pf,
            milter: Some(milter),
            _tmp: tmp,
        }
    }

    fn milter(&self) -> &MilterProcess {
        self.milter.as_ref().expect("the milter")
    }

    fn client(&self) -> SmtpClient {
        SmtpClient::new(self.pf.smtp_addr()).bind(OUTSIDE_IP)
    }

    fn send(&self, rcpts: &[&str], subject: &str) -> SmtpTranscript {
        self.client().send(SENDER, rcpts, &message(subject))
    }

    /// `dualroute --config NODE.yaml ARGS…`, which must succeed.
    fn admin(&self, args: &[&str]) -> String {
        let (status, out) = dualroute(&self.config, args);
        assert!(
            status.success(),
            "dualroute --config {} {args:?} failed ({status}):\n{out}",
            self.config.display()
        );
        out
    }

    fn status(&self) -> String {
        dualroute(&self.config, &["status"]).1
    }

    /// Sends fresh addresses of `domain` through this node until one gets
    /// `code` at RCPT (451: held, 250: routing on): the running milter
    /// follows the fleet's state (it reads its state_dir every 2 s). Err:
    /// the last transcript, after [`support::WAIT`].
    fn until_rcpt(&self, domain: &str, code: u16, n: &mut usize) -> Result<SmtpTranscript, String> {
        let deadline = Instant::now() + support::WAIT;
        loop {
            *n += 1;
            let probe = format!("probe{n}@{domain}");
            let t = self.send(&[&probe], &format!("probe {n} via {}", self.name));
            if t.rcpt(&probe).code == code {
                return Ok(t);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{probe} through {}: still not {code} after {:?}: {t}",
                    self.name,
                    support::WAIT
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Everything about this node, for failure messages.
    fn diag(&self) -> String {
        format!(
            "=== {} ===\n{}\n--- milter log ---\n{}\n--- status ---\n{}",
            self.name,
            self.pf.diagnostics(),
            self.milter
                .as_ref()
                .map(MilterProcess::log)
                .unwrap_or_default(),
            self.status()
        )
    }

    /// The routed deliveries of zed… in this Postfix's log that bounced
    /// (not the probes of [`Fleet::until_rcpt`]: one that is routed in the
    /// moment between a trip and the milter's next look at its state_dir
    /// bounces too).
    fn routed_bounces(&self) -> Vec<support::Delivery> {
        self.pf
            .bounced()
            .into_iter()
            .filter(|d| d.to.starts_with("zed") && d.to.ends_with("@example.com.dualroute.invalid"))
            .collect()
    }
}

/// The whole fleet of the end-to-end tests.
struct Fleet {
    n1: Node,
    n2: Node,
    sink: SmtpSink,
    redis: Redis,
}

impl Fleet {
    /// Redis, the sink (refusing every RCPT with `554 5.7.1` when
    /// `refusing`), and the two nodes with example.com split; waits until
    /// both nodes have registered in Redis.
    fn start(refusing: bool) -> Fleet {
        let redis = Redis::start();
        let sink = if refusing {
            SmtpSink::start_refusing_relay()
        } else {
            SmtpSink::start()
        };
        let setup = Setup {
            redis: &redis,
            sink: &sink,
            domains: EXAMPLE_COM,
            mailboxes: &[("example.com", &["alice@example.com"])],
            breaker: true,
        };
        let n1 = Node::start(N1, &setup);
        let n2 = Node::start(N2, &setup);
        let fleet = Fleet {
            n1,
            n2,
            sink,
            redis,
        };
        fleet.wait(
            "both nodes to register in Redis",
            Box::new(|| both_registered(&fleet.redis)),
        );
        fleet
    }

    fn diag(&self) -> String {
        format!(
            "{}\n{}\n--- redis ---\n{}\n--- redis keys ---\n{}",
            self.n1.diag(),
            self.n2.diag(),
            self.redis.log(),
            self.redis.cli(&["KEYS", "*"])
        )
    }

    fn wait(&self, what: &str, mut probe: Box<dyn FnMut() -> bool + '_>) {
        if support::poll(|| probe().then_some(())).is_none() {
            panic!(
                "timed out after {:?} waiting for {what}\n{}",
                support::WAIT,
                self.diag()
            );
        }
    }

    /// Whether a message with this subject reached the sink for `rcpt`.
    fn at_sink(&self, rcpt: &str, subject: &str) -> bool {
        self.sink.messages().iter().any(|m| {
            m.rcpt_addresses().iter().any(|r| r == rcpt)
                && m.header("Subject").iter().any(|s| s == subject)
        })
    }

    /// Sends `rcpt` through `node` and waits until the sink has it: the
    /// message was routed.
    fn routed(&self, node: &Node, rcpt: &str, subject: &str) {
        let t = node.send(&[rcpt], subject);
        assert!(
            t.rcpt(rcpt).is_positive() && t.accepted(),
            "{rcpt} through {}: {t}\n{}",
            node.name,
            self.diag()
        );
        self.wait(
            &format!("{subject} to {rcpt} through {} at the sink", node.name),
            Box::new(|| self.at_sink(rcpt, subject)),
        );
    }

    /// Sends fresh addresses of example.com through `node` until one gets
    /// `code` at RCPT (451: held, 250: routing on): the node follows the
    /// fleet's change. Returns the transcript that did.
    fn until_rcpt(&self, node: &Node, code: u16, n: &mut usize) -> SmtpTranscript {
        node.until_rcpt("example.com", code, n)
            .unwrap_or_else(|t| panic!("{t}\n{}", self.diag()))
    }

    /// `rcpt` through `node` is refused `451 4.4.4` at RCPT, naming `cause`.
    fn held(&self, node: &Node, rcpt: &str, subject: &str, cause: &str) -> SmtpTranscript {
        let t = node.send(&["alice@example.com", rcpt], subject);
        let r = t.rcpt(rcpt);
        assert_eq!(
            (r.code, r.enhanced()),
            (451, Some("4.4.4")),
            "{rcpt} through {}: {t}\n{}",
            node.name,
            self.diag()
        );
        assert!(
            r.text.contains(cause),
            "{cause:?} missing from the reply to {rcpt} through {}: {t}",
            node.name
        );
        t
    }
}

fn both_registered(redis: &Redis) -> bool {
    let keys = redis.cli(&["HKEYS", NODES_KEY]);
    keys.lines().any(|l| l.trim() == N1) && keys.lines().any(|l| l.trim() == N2)
}

fn wait_log(milter: &MilterProcess, words: &str) {
    if support::poll(|| milter.log().contains(words).then_some(())).is_none() {
        panic!(
            "timed out after {:?} waiting for {words:?} in the milter log:\n{}",
            support::WAIT,
            milter.log()
        );
    }
}

fn message(subject: &str) -> String {
    format!(
        "From: {SENDER}\nTo: undisclosed-recipients:;\nSubject: {subject}\n\nbody of {subject}\n"
    )
}

/// Routing on: zed (no mailbox here) through either host arrives at the
/// destination, and nothing is left in either queue or catch-all.
#[test]
fn zed_is_routed_through_either_node() {
    let started = Instant::now();
    let f = Fleet::start(false);
    f.routed(&f.n1, "zed@example.com", "zed via mx-1");
    f.routed(&f.n2, "zed@example.com", "zed via mx-2");
    for node in [&f.n1, &f.n2] {
        node.pf.wait_queue_empty();
        assert!(node.pf.bounced().is_empty(), "{}", f.diag());
        assert!(
            node.pf.maildir_messages("alice@example.com").is_empty(),
            "{}",
            f.diag()
        );
        let catchall = node
            .pf
            .maildir_root()
            .join("example.com/dualroute-catchall/");
        assert!(read_maildir(&catchall).is_empty(), "{}", f.diag());
    }
    eprintln!("routed through both nodes in {:?}", started.elapsed());
}

/// `dualroute disable` typed on node 1 holds on node 2 within seconds:
/// through P2, zed is refused `451 4.4.4` at RCPT while alice, in the same
/// transaction, is still delivered to her Maildir there; `enable` typed
/// on node 2 routes zed through P1 again.
#[test]
fn a_disable_on_node_1_holds_through_node_2_and_an_enable_on_node_2_routes_through_node_1() {
    let started = Instant::now();
    let f = Fleet::start(false);
    let mut n = 0;
    // Both route before the disable.
    f.routed(&f.n1, "zed@example.com", "before via mx-1");
    f.routed(&f.n2, "zed@example.com", "before via mx-2");

    f.n1.admin(&["disable", "example.com"]);
    let t0 = Instant::now();
    f.until_rcpt(&f.n2, 451, &mut n);
    let reached = t0.elapsed();
    let t = f.held(
        &f.n2,
        "zed@example.com",
        "held via mx-2",
        "disabled by the administrator",
    );
    assert!(t.accepted(), "alice must still get it through P2: {t}");
    f.n2.pf.wait_queue_empty();
    let alice = f.n2.pf.maildir_messages("alice@example.com");
    assert!(
        alice
            .iter()
            .any(|m| m.header("Subject").iter().any(|s| s == "held via mx-2")),
        "alice's Maildir on P2 lacks the message: {alice:?}\n{}",
        f.diag()
    );
    // And on the node where it was typed.
    f.until_rcpt(&f.n1, 451, &mut n);
    f.held(
        &f.n1,
        "zed@example.com",
        "held via mx-1",
        "disabled by the administrator",
    );
    assert!(!f.at_sink("zed@example.com", "held via mx-2"));

    f.n2.admin(&["enable", "example.com"]);
    let t1 = Instant::now();
    f.until_rcpt(&f.n1, 250, &mut n);
    let back = t1.elapsed();
    f.routed(&f.n1, "zed@example.com", "after via mx-1");
    f.until_rcpt(&f.n2, 250, &mut n);
    f.routed(&f.n2, "zed@example.com", "after via mx-2");

    for node in [&f.n1, &f.n2] {
        node.pf.wait_queue_empty();
        assert!(node.pf.bounced().is_empty(), "{}", f.diag());
        let catchall = node
            .pf
            .maildir_root()
            .join("example.com/dualroute-catchall/");
        assert!(read_maildir(&catchall).is_empty(), "{}", f.diag());
    }
    eprintln!(
        "disable on {N1} held on {N2} after {reached:?}; enable on {N2} routed on {N1} after {back:?}; test {:?}",
        started.elapsed()
    );
}

/// The bounce breaker counts the fleet's failures together: each node
/// follows its own Postfix's log; the destination refuses every RCPT with
/// `554 5.7.1` (a 5.1.1 "user unknown" would not count, docs/design.md
/// §7). Two bounces through P1 do not trip (threshold 3); a third through
/// P2 does, and the trip holds on both: a further zed gets `451 4.4.4`
/// through P1 and through P2, alice still gets her mail.
#[test]
fn bounces_through_both_postfix_instances_add_up_to_one_trip_on_both_nodes() {
    let started = Instant::now();
    let f = Fleet::start(true);
    let bounce = |node: &Node, rcpt: &str, subject: &str| {
        let t = node.send(&[rcpt], subject);
        assert!(
            t.accepted(),
            "{rcpt} through {}: {t}\n{}",
            node.name,
            f.diag()
        );
        node.pf.wait_queue_empty();
    };

    bounce(&f.n1, "zed1@example.com", "first via mx-1");
    wait_log(f.n1.milter(), "(1 of 3 within 1h");
    bounce(&f.n1, "zed2@example.com", "second via mx-1");
    // The barrier: node 1 counted the second failure, and did not trip.
    wait_log(f.n1.milter(), "(2 of 3 within 1h");
    for node in [&f.n1, &f.n2] {
        let st = node.status();
        assert!(
            st.contains("example.com: mode split: active"),
            "two bounces tripped {}:\n{st}\n{}",
            node.name,
            f.diag()
        );
    }
    bounce(&f.n2, "zed3@example.com", "third via mx-2");
    assert_eq!(f.n1.routed_bounces().len(), 2, "{}", f.diag());
    assert_eq!(f.n2.routed_bounces().len(), 1, "{}", f.diag());
    for b in f.n1.routed_bounces().iter().chain(&f.n2.routed_bounces()) {
        assert_eq!(b.dsn, "5.7.1", "{}", b.line);
    }

    for node in [&f.n1, &f.n2] {
        f.wait(
            &format!("{}'s status to show the trip", node.name),
            Box::new(|| {
                node.status()
                    .contains("example.com: mode split: TRIPPED by the bounce breaker")
            }),
        );
    }
    let mut n = 0;
    for node in [&f.n1, &f.n2] {
        // The status file and the running milter's state are read apart:
        // wait until the milter holds too.
        f.until_rcpt(node, 451, &mut n);
        let subject = format!("after the trip via {}", node.name);
        let t = f.held(
            node,
            "zed4@example.com",
            &subject,
            "switched off by the bounce breaker",
        );
        assert!(t.accepted(), "alice must still get it: {t}");
        node.pf.wait_queue_empty();
        assert!(
            node.pf
                .maildir_messages("alice@example.com")
                .iter()
                .any(|m| m.header("Subject").contains(&subject)),
            "alice's Maildir on {} lacks {subject:?}\n{}",
            node.name,
            f.diag()
        );
    }
    // No more routed mail bounced: the holds came before another failure.
    assert_eq!(f.n1.routed_bounces().len(), 2, "{}", f.diag());
    assert_eq!(f.n2.routed_bounces().len(), 1, "{}", f.diag());
    eprintln!("fleet trip test {:?}", started.elapsed());
}

// ---------------------------------------------------------------------
// The kill soak, two nodes (tests/kill_soak.rs has the single-node one;
// the knobs and the progress they pace faults by are tests/support/soak.rs).
// ---------------------------------------------------------------------

const SOAK_DOMAINS: &str = "  split.test:
    mode: split
    destination: { hosts: [\"{SINK}\"] }
    accounts: [{ list: [alice@split.test, bob@split.test] }]
  dual.test:
    mode: dual
    destination: { hosts: [\"{SINK}\"] }
    accounts: [{ list: [d1@dual.test, d2@dual.test] }]
  held.test:
    mode: split
    destination: { hosts: [\"{SINK}\"] }
    accounts: [{ list: [keep@held.test] }]
";

/// Where one recipient's mail must end up (`maildir:ADDRESS` on whichever
/// host took the message, `sink:ADDRESS`), as in tests/kill_soak.rs.
fn places(rcpt: &str) -> Vec<String> {
    match rcpt {
        "alice@split.test" | "bob@split.test" => vec![format!("maildir:{rcpt}")],
        "zed@split.test" | "yan@split.test" => vec![format!("sink:{rcpt}")],
        "d1@dual.test" | "d2@dual.test" => vec![format!("maildir:{rcpt}"), format!("sink:{rcpt}")],
        "nobody@dual.test" => vec![],
        // Disabled on node 1 before the load: refused 451 4.4.4 on both
        // nodes all along, across milter restarts and the emptied Redis.
        "zed@held.test" => vec![],
        other => panic!("no expectation for {other}"),
    }
}

fn recipients(i: usize) -> &'static [&'static str] {
    const MIXES: [&[&str]; 5] = [
        &["alice@split.test"],
        &["zed@split.test"],
        &["d1@dual.test"],
        &[
            "alice@split.test",
            "zed@split.test",
            "d2@dual.test",
            "bob@split.test",
            "yan@split.test",
        ],
        &[
            "nobody@dual.test",
            "bob@split.test",
            "d1@dual.test",
            "zed@held.test",
        ],
    ];
    MIXES[i % MIXES.len()]
}

fn soak_subject(i: usize) -> String {
    format!("soak {i}")
}

/// A fault of the soak, at a number of started messages.
enum Fault {
    /// SIGKILL node 0 or 1's milter and start it again.
    Kill(usize),
    /// Kill Redis and start it again, empty, on the same port.
    RedisEmpty,
}

#[test]
fn two_node_kill_soak_with_redis_restarted_loses_duplicates_and_misroutes_nothing() {
    let n = knob("DUALROUTE_SOAK_MESSAGES", 1000);
    let clients = knob("DUALROUTE_SOAK_CLIENTS", 4).max(1);
    let every = knob("DUALROUTE_SOAK_KILL_EVERY", 100).max(2);
    let started = Instant::now();
    let redis = Redis::start();
    let sink = SmtpSink::start();
    let setup = Setup {
        redis: &redis,
        sink: &sink,
        domains: SOAK_DOMAINS,
        mailboxes: &[
            ("split.test", &["alice@split.test", "bob@split.test"]),
            ("dual.test", &["d1@dual.test", "d2@dual.test"]),
            ("held.test", &["keep@held.test"]),
        ],
        breaker: false,
    };
    let mut nodes = [Node::start(N1, &setup), Node::start(N2, &setup)];
    if support::poll(|| both_registered(&redis).then_some(())).is_none() {
        panic!(
            "the nodes did not register in Redis\n{}\n{}",
            nodes[0].diag(),
            nodes[1].diag()
        );
    }
    // held.test is disabled through node 1 and held by node 2 before the
    // load: it must stay held everywhere, whatever restarts.
    nodes[0].admin(&["disable", "held.test"]);
    for node in &nodes {
        if support::poll(|| {
            node.status()
                .contains("held.test: mode split: DISABLED by an administrator")
                .then_some(())
        })
        .is_none()
        {
            panic!(
                "held.test is not disabled on {}\n{}",
                node.name,
                node.diag()
            );
        }
        // And the running milter holds it (a probe routed before that is
        // left out of the count below: it is not a soak message).
        let mut probes = 0;
        if let Err(e) = node.until_rcpt("held.test", 451, &mut probes) {
            panic!("{e}\n{}", node.diag());
        }
    }
    let setup_took = started.elapsed();

    // The faults, by started message: node 0 every `every`, node 1 every
    // `every` half a period later, Redis once in the middle.
    let mut faults: Vec<(usize, Fault)> = Vec::new();
    let mut at = every;
    while at < n {
        faults.push((at, Fault::Kill(0)));
        if at + every / 2 < n {
            faults.push((at + every / 2, Fault::Kill(1)));
        }
        at += every;
    }
    faults.push((n / 2, Fault::RedisEmpty));
    faults.sort_by_key(|(at, _)| *at);

    let progress = Arc::new(Progress::default());
    let milters = [
        nodes[0].milter.take().expect("milter 1"),
        nodes[1].milter.take().expect("milter 2"),
    ];
    let fault_thread = {
        let progress = progress.clone();
        let mut redis = redis;
        std::thread::spawn(move || {
            let mut milters = milters;
            let mut kills = [0usize; 2];
            let mut redis_restarts = 0;
            for (at, fault) in faults {
                if !progress.reached(at) {
                    break;
                }
                match fault {
                    Fault::Kill(k) => {
                        // Down until the new process listens: its Postfix
                        // tempfails what comes meanwhile.
                        milters[k].kill();
                        kills[k] += 1;
                        milters[k].spawn();
                    }
                    Fault::RedisEmpty => {
                        redis.restart_empty();
                        redis_restarts += 1;
                    }
                }
            }
            (milters, redis, kills, redis_restarts)
        })
    };
    let results = Arc::new(Mutex::new(BTreeMap::new()));
    let addrs = [nodes[0].pf.smtp_addr(), nodes[1].pf.smtp_addr()];
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (progress, results) = (progress.clone(), results.clone());
            let clients = addrs.map(|a| SmtpClient::new(a).bind(OUTSIDE_IP));
            std::thread::spawn(move || loop {
                let i = progress.started.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                // Spread over both hosts, each mix through both.
                let node = (i / 5) % 2;
                let t = clients[node].send(SENDER, recipients(i), &message(&soak_subject(i)));
                if !t.accepted() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(i, (node, t));
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread panicked");
    }
    progress.done.store(true, Ordering::SeqCst);
    let load_took = started.elapsed() - setup_took;
    let (milters, redis, kills, redis_restarts) =
        fault_thread.join().expect("the fault thread panicked");
    for (node, milter) in nodes.iter_mut().zip(milters) {
        node.milter = Some(milter);
    }
    let transcripts: Vec<(usize, SmtpTranscript)> = Arc::try_unwrap(results)
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .unwrap_or_default()
        .into_values()
        .collect();
    assert_eq!(transcripts.len(), n);
    let diag = |nodes: &[Node; 2], redis: &Redis| {
        format!(
            "{}\n{}\n--- redis ---\n{}",
            nodes[0].diag(),
            nodes[1].diag(),
            redis.log()
        )
    };

    // Everything delivered: flush both queues.
    for node in &nodes {
        node.pf.flush();
    }
    for node in &nodes {
        node.pf.wait_queue_empty();
    }

    // Expected places, from what each client was told.
    let mut expected: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut refused = [0usize; 2];
    let mut accepted = [0usize; 2];
    for (i, (node, t)) in transcripts.iter().enumerate() {
        if !t.accepted() {
            refused[*node] += 1;
            // Refused for now, never for good: the sender retries.
            let last = t
                .steps
                .iter()
                .rev()
                .find(|(command, _)| command != "QUIT")
                .map(|(_, reply)| reply.code);
            assert!(
                last.is_some_and(|code| (400..500).contains(&code)),
                "message {i} through {} refused without 4xx:\n{t}",
                nodes[*node].name
            );
            continue;
        }
        accepted[*node] += 1;
        for (rcpt, reply) in t.rcpts() {
            if rcpt == "zed@held.test" {
                // Held, or the milter was down: 4xx, never accepted.
                assert!(
                    reply.code / 100 == 4,
                    "message {i} through {}: held.test accepted: {reply:?}\n{t}",
                    nodes[*node].name
                );
            }
            if reply.is_positive() {
                for place in places(rcpt) {
                    *expected.entry((place, soak_subject(i))).or_insert(0) += 1;
                }
            } else {
                assert!(
                    reply.code / 100 == 4 || (rcpt == "nobody@dual.test" && reply.code == 550),
                    "message {i} through {}: RCPT {rcpt}: {reply:?}\n{t}",
                    nodes[*node].name
                );
            }
        }
    }

    // What arrived: the Maildirs and catch-alls of both hosts, the sink.
    let mut arrived: BTreeMap<(String, String), usize> = BTreeMap::new();
    for node in &nodes {
        for rcpt in [
            "alice@split.test",
            "bob@split.test",
            "d1@dual.test",
            "d2@dual.test",
        ] {
            for m in node.pf.maildir_messages(rcpt) {
                for s in m.header("Subject") {
                    *arrived.entry((format!("maildir:{rcpt}"), s)).or_insert(0) += 1;
                }
            }
        }
        for domain in ["split.test", "dual.test", "held.test"] {
            let catchall = node
                .pf
                .maildir_root()
                .join(format!("{domain}/dualroute-catchall/"));
            for m in read_maildir(&catchall) {
                for s in m.header("Subject") {
                    *arrived
                        .entry((format!("catchall:{domain}@{}", node.name), s))
                        .or_insert(0) += 1;
                }
            }
        }
    }
    for m in sink.messages() {
        let subject = m.header("Subject").into_iter().next().unwrap_or_default();
        // The probes of the setup are not the load's.
        if subject.starts_with("probe ") {
            continue;
        }
        for r in m.rcpt_addresses() {
            *arrived
                .entry((format!("sink:{r}"), subject.clone()))
                .or_insert(0) += 1;
        }
    }
    let diff: Vec<String> = expected
        .keys()
        .chain(arrived.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| expected.get(*k) != arrived.get(*k))
        .map(|k| {
            format!(
                "{} {}: expected {}, arrived {}",
                k.0,
                k.1,
                expected.get(k).unwrap_or(&0),
                arrived.get(k).unwrap_or(&0)
            )
        })
        .collect();
    assert!(
        diff.is_empty(),
        "{} of {} places wrong (lost, duplicated or misrouted):\n{}\n{}",
        diff.len(),
        expected.len().max(arrived.len()),
        diff.join("\n"),
        diag(&nodes, &redis)
    );
    for node in &nodes {
        let st = node.status();
        assert!(
            st.contains("held.test: mode split: DISABLED by an administrator"),
            "held.test no longer disabled on {}:\n{st}\n{}",
            node.name,
            diag(&nodes, &redis)
        );
        assert!(
            node.pf.bounced().is_empty(),
            "bounced through {}: {:?}\n{}",
            node.name,
            node.pf.bounced(),
            diag(&nodes, &redis)
        );
        assert!(node.pf.queue().is_empty(), "{}", node.pf.diagnostics());
    }
    // The emptied Redis was refilled: both nodes registered again, and
    // the hold is in it again.
    if support::poll(|| {
        (both_registered(&redis)
            && redis.cli(&["EXISTS", "dualroute:domain:held.test"]).trim() == "1")
            .then_some(())
    })
    .is_none()
    {
        panic!(
            "the nodes did not register again in the emptied Redis\n{}",
            diag(&nodes, &redis)
        );
    }
    eprintln!(
        "two-node kill soak: {n} messages in {load_took:?} (setup {setup_took:?}), SIGKILLs {kills:?}, {redis_restarts} Redis restart, accepted {accepted:?} and delivered exactly once, refused with 4xx {refused:?}; total {:?}",
        started.elapsed()
    );
    assert_eq!(redis_restarts, 1, "Redis was not restarted during the load");
    assert!(
        kills.iter().all(|&k| k >= 1),
        "kills {kills:?}, one every {every} messages of {n}: the load ended too soon"
    );
    assert!(
        refused.iter().sum::<usize>() > 0,
        "no message met a dead milter: the kills did nothing"
    );
    for k in 0..2 {
        assert!(
            accepted[k] > n / 4,
            "{} of {n} accepted through {}",
            accepted[k],
            nodes[k].name
        );
    }
}
