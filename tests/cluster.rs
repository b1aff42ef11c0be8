//! Several MX hosts act as one through Redis (issue 24, ../shared/DESIGN.md
//! §11, docs/design.md "Several MX hosts"): two nodes, A (`mx-a.test`) and
//! B (`mx-b.test`), each with its own milter.yaml and state_dir, the same
//! managed domains, and one private `redis-server` (tests/support/redis.rs)
//! in their `cluster.redis`.
//!
//! Each node is the whole service in-process (tests/support/protocol.rs,
//! `dualroute::run` as `dualroute run` runs it), driven RCPT by RCPT as an
//! MTA would; the admin commands are the real binary (`dualroute --config
//! X.yaml disable|enable|status`), which writes that node's state_dir as
//! an admin's command would. Every test asserts what the MTA and the admin
//! see: RCPT replies and end-of-message actions, `status` output, the
//! metrics.
//!
//! What "routed", "held" and "kept" mean here (../shared/DESIGN.md §2):
//! `zed@example.com` has no mailbox here, so split delivery routes it away
//! (the milter deletes it and adds its routing address at end of message);
//! while routing for example.com is off it is refused `451 4.4.4` at RCPT
//! ("held"). `alice@example.com` has a mailbox here and is kept (no action)
//! in every state. example.org is a second managed domain nobody disables.
//!
//! "Within seconds" is a poll of up to [`WITHIN`], never a fixed sleep;
//! the nodes resync every second (`cluster.sync: 1s`) and read their
//! state_dir every 100 ms.

#[path = "support/callout_stub.rs"]
mod callout_stub;
mod support;

use indymilter_test::{EomAction, Status};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::metrics::Scrape;
use support::protocol::{Milter, Session, CLIENT};
use support::redis::Redis;
use support::Port;

/// How long a change may take to reach a node, or a node to notice Redis
/// is gone or back (a pub/sub message, or at worst the 1 s resync plus a
/// reconnection).
const WITHIN: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);
/// How long one message may take (Postfix's `milter_command_timeout` is
/// 30 s; nothing here is slow unless something blocks).
const MESSAGE: Duration = Duration::from_secs(5);
/// How long one `dualroute` command may take.
const COMMAND: Duration = Duration::from_secs(20);

const A: &str = "mx-a.test";
const B: &str = "mx-b.test";

/// No mailbox here: routed while routing is on, held (451 4.4.4) while off.
const ZED: &str = "<zed@example.com>";
/// A mailbox here: kept in every state.
const ALICE: &str = "<alice@example.com>";
/// No mailbox here, in the domain nobody disables.
const ZED_ORG: &str = "<zed@example.org>";

/// The accounts of example.com on both nodes, unless a test gives a node
/// other ones.
const ACCOUNTS: &str = "alice@example.com, bob@example.com";

/// What a node did with one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// Accepted, deleted and replaced by its routing address.
    Routed,
    /// Refused `451 4.4.4` at RCPT: routing for its domain is paused.
    Held,
    /// Accepted and left alone (a mailbox here).
    Kept,
    /// Anything else, described.
    Other(String),
}

/// Polls `$probe` (an expression, awaited inside, giving
/// `Result<T, String>`) every [`POLL`] until it is `Ok`, for up to
/// [`WITHIN`]; then fails the test with `$what` and the last `Err`.
macro_rules! eventually {
    ($what:expr, $probe:expr) => {{
        let start = Instant::now();
        loop {
            let probe: Result<_, String> = $probe;
            match probe {
                Ok(found) => break found,
                Err(last) if start.elapsed() >= WITHIN => panic!(
                    "timed out after {WITHIN:?} waiting for {}; last seen: {last}",
                    $what
                ),
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }};
}

/// One dualroute node: its configuration, its state_dir and, while it
/// runs, the service in-process.
struct Node {
    name: &'static str,
    dir: tempfile::TempDir,
    config: PathBuf,
    milter: Option<Milter>,
}

impl Node {
    /// Writes the node's milter.yaml (split domains example.com and
    /// example.org, destination the reserved, refusing port `dead`,
    /// example.com's accounts `accounts`) and starts the service.
    async fn start(name: &'static str, redis: &Redis, dead: &Port, accounts: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix(&format!("dualroute-{name}."))
            .tempdir()
            .expect("create a temporary directory");
        let config = dir.path().join("milter.yaml");
        let node = Node {
            name,
            config,
            milter: None,
            dir,
        };
        node.write_config(&redis.url(), dead, accounts);
        node.started().await
    }

    fn write_config(&self, redis: &str, dead: &Port, accounts: &str) {
        let state = self.dir.path().join("state");
        let yaml = format!(
            "instance: {name}
state_dir: {state}
cluster:
  redis: {redis}
  sync: 1s
domains:
  example.com:
    mode: split
    destination: {{ hosts: [\"[127.0.0.1]:{dead}\"] }}
    accounts: [ {{ list: [{accounts}] }} ]
  example.org:
    mode: split
    destination: {{ hosts: [\"[127.0.0.1]:{dead}\"] }}
    accounts: [ {{ list: [alice@example.org] }} ]
breaker: {{ maillog: {maillog}, threshold: 3, window: 1h }}
",
            name = self.name,
            state = state.display(),
            maillog = self.maillog().display(),
        );
        std::fs::write(&self.config, yaml)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.config.display()));
    }

    /// The MTA log this node's breaker follows (each node has its own
    /// MTA, so its own log).
    fn maillog(&self) -> PathBuf {
        self.dir.path().join("mail.log")
    }

    /// Appends a Postfix line to the node's MTA log: the routed copy of
    /// `local@example.com` in queue `queue_id` bounced because the
    /// destination refuses to relay (5.7.1: the destination is at fault,
    /// so the breaker counts it; a 5.1.1 "no such user" of a made-up
    /// address would not count, docs/design.md §7).
    fn bounce(&self, queue_id: &str, local: &str) {
        use std::io::Write as _;
        let line = format!(
            "Dec  5 01:00:00 {name} postfix/smtp[1234]: {queue_id}: to=<{local}@example.com.dualroute.invalid>, orig_to=<{local}@example.com>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.05, delays=0.01/0.01/0.02/0.01, dsn=5.7.1, status=bounced (host 127.0.0.1[127.0.0.1] said: 554 5.7.1 <{local}@example.com.dualroute.invalid>: Relay access denied (in reply to RCPT TO command))\n",
            name = self.name,
        );
        let path = self.maillog();
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
    }

    /// Starts the service from the node's configuration file, as
    /// `dualroute run` would.
    async fn started(mut self) -> Node {
        let intervals = dualroute::Intervals {
            state: Duration::from_millis(100),
            ..dualroute::Intervals::default()
        };
        let start = support::protocol::start_at(&self.config, intervals);
        // A node must start without Redis too (from its state_dir).
        let milter = tokio::time::timeout(WITHIN, Milter::serve(start))
            .await
            .unwrap_or_else(|_| panic!("{} did not start within {WITHIN:?}", self.name));
        self.milter = Some(milter);
        self
    }

    /// Stops the service (the node's state_dir stays), failing the test
    /// if it does not stop within [`WITHIN`] (e.g. waiting for Redis).
    async fn stop(&mut self) {
        if let Some(milter) = self.milter.take() {
            tokio::time::timeout(WITHIN, milter.shutdown())
                .await
                .unwrap_or_else(|_| panic!("{} did not shut down within {WITHIN:?}", self.name));
        }
    }

    fn milter(&self) -> &Milter {
        self.milter
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
    }

    /// One message to `rcpt` from an ordinary client: what the node did.
    /// A message the node does not finish within [`MESSAGE`] is a failure
    /// of its own (Redis must never be on the per-recipient path, so an
    /// outage must not slow a message down).
    async fn fate(&self, rcpt: &str) -> Fate {
        tokio::time::timeout(MESSAGE, self.try_fate(rcpt))
            .await
            .unwrap_or_else(|_| Fate::Other(format!("no answer within {MESSAGE:?}")))
    }

    async fn try_fate(&self, rcpt: &str) -> Fate {
        let mut session = Session::open(self.milter().addr(), CLIENT).await;
        session.mail(None).await;
        let fate = match session.rcpt(&[rcpt]).await {
            Status::Continue => {
                session.data(&[]).await;
                let (actions, eom) = session.eom().await;
                let deleted = actions.iter().any(|a| {
                    matches!(a, EomAction::DeleteRecipient { rcpt: r } if r.to_bytes() == rcpt.as_bytes())
                });
                let touched = actions.iter().any(|a| {
                    matches!(
                        a,
                        EomAction::DeleteRecipient { .. } | EomAction::AddRecipient { .. }
                    )
                });
                match (deleted, touched, &eom) {
                    (true, _, Status::Continue | Status::Accept) => Fate::Routed,
                    (false, false, Status::Continue | Status::Accept) => Fate::Kept,
                    _ => Fate::Other(format!("accepted, then {actions:?} and {eom:?}")),
                }
            }
            Status::Tempfail { message: Some(m) }
                if m.to_string_lossy().starts_with("451 4.4.4 ") =>
            {
                Fate::Held
            }
            other => Fate::Other(format!("RCPT answered {other:?}")),
        };
        session.close().await;
        fate
    }

    /// `Ok` when the node does `want` with `rcpt`.
    async fn does(&self, rcpt: &str, want: Fate) -> Result<(), String> {
        let fate = self.fate(rcpt).await;
        if fate == want {
            Ok(())
        } else {
            Err(format!("{}: {rcpt} {fate:?}, want {want:?}", self.name))
        }
    }

    /// Polls until the node does `want` with `rcpt`.
    async fn comes_to(&self, rcpt: &str, want: Fate) {
        eventually!(
            format!("{} to answer {rcpt} with {want:?}", self.name),
            self.does(rcpt, want.clone()).await
        )
    }

    /// Asserts the node does `want` with `rcpt` now, at the first try.
    #[track_caller]
    fn assert_now(&self, rcpt: &str, fate: Fate, want: Fate, when: &str) {
        assert_eq!(fate, want, "{}: {rcpt} {when}", self.name);
    }

    /// Runs `dualroute ARGS --config <this node's milter.yaml>` (the real
    /// binary, as tests/support/milter.rs `dualroute` runs it, but
    /// awaited, and killed after [`COMMAND`]: a command that waits for a
    /// dead Redis fails the test instead of hanging it): exit status and
    /// output, stdout then stderr.
    async fn command(&self, args: &[&str]) -> (std::process::ExitStatus, String) {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dualroute"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(COMMAND, child)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: dualroute {args:?} did not finish within {COMMAND:?}",
                    self.name
                )
            })
            .expect("run dualroute");
        (
            out.status,
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// A command that must succeed; its output.
    async fn admin(&self, args: &[&str]) -> String {
        let (status, out) = self.command(args).await;
        assert!(
            status.success(),
            "{}: dualroute {args:?} exited {status}: {out}",
            self.name
        );
        out
    }

    /// `dualroute status`, whatever its exit code (a status that reports a
    /// problem may exit non-zero).
    async fn status(&self) -> String {
        self.command(&["status"]).await.1
    }

    /// `Ok(status text)` when `status` contains every one of `words`.
    async fn status_says(&self, words: &[&str]) -> Result<String, String> {
        let out = self.status().await;
        match words.iter().find(|w| !out.contains(*w)) {
            None => Ok(out),
            Some(missing) => Err(format!("{} status without {missing:?}:\n{out}", self.name)),
        }
    }

    /// The value of `dualroute_cluster_connected` in the node's metrics.
    fn connected(&self) -> Option<f64> {
        metric(self.milter(), "dualroute_cluster_connected")
    }

    /// `Ok` when `dualroute_cluster_connected` is `want` (1 or 0).
    fn is_connected(&self, want: f64) -> Result<(), String> {
        match self.connected() {
            Some(v) if v == want => Ok(()),
            other => Err(format!(
                "{}: dualroute_cluster_connected {other:?}, want {want} in\n{}",
                self.name,
                self.milter().metrics()
            )),
        }
    }

    /// Polls until the node's metrics say it is (1) or is not (0)
    /// connected to Redis.
    async fn connection_is(&self, want: f64) {
        eventually!(
            format!("{} to report dualroute_cluster_connected {want}", self.name),
            self.is_connected(want)
        )
    }
}

/// The value of the unlabelled sample `name` in the milter's metrics, read
/// as a scrape would (tests/support/metrics.rs).
fn metric(milter: &Milter, name: &str) -> Option<f64> {
    Scrape {
        status: String::new(),
        content_type: String::new(),
        text: milter.metrics(),
    }
    .value(name, &[])
}

/// A Redis, a refusing destination port, and nodes A and B with the same
/// configuration, both connected to Redis and routing.
async fn fleet() -> (Redis, Port, Node, Node) {
    let redis = Redis::start();
    let dead = Port::reserve();
    let a = Node::start(A, &redis, &dead, ACCOUNTS).await;
    let b = Node::start(B, &redis, &dead, ACCOUNTS).await;
    a.connection_is(1.0).await;
    b.connection_is(1.0).await;
    for node in [&a, &b] {
        node.comes_to(ZED, Fate::Routed).await;
        node.comes_to(ALICE, Fate::Kept).await;
    }
    (redis, dead, a, b)
}

/// Waits until the wall clock has passed the whole second after `since`
/// (seconds since the epoch). Admin changes are time-stamped; state files
/// keep whole seconds. Not a sleep for a node to react: it makes the next
/// change strictly later than the one before, at any clock resolution.
async fn next_second(since: u64) {
    while now() <= since {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// The number of keys in Redis, from `DBSIZE`.
fn keys_in(redis: &Redis) -> Result<u64, String> {
    let out = redis.cli(&["DBSIZE"]);
    out.trim()
        .parse()
        .map_err(|_| format!("DBSIZE answered {out:?}"))
}

fn state_dir(node: &Node) -> PathBuf {
    node.dir.path().join("state")
}

/// The files of a node's state_dir, for failure messages.
fn listing(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.join(", ")
}

/// (a, b) `disable` given on A holds on A at once and on B within seconds;
/// a mailbox here is kept on both meanwhile; `enable` given on B routes on
/// both again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disable_on_one_node_holds_on_both_and_an_enable_on_the_other_routes_both() {
    let (_redis, _dead, a, b) = fleet().await;

    a.admin(&["disable", "example.com", "--reason", "test"])
        .await;
    a.comes_to(ZED, Fate::Held).await;
    b.comes_to(ZED, Fate::Held).await;
    for node in [&a, &b] {
        let fate = node.fate(ALICE).await;
        node.assert_now(ALICE, fate, Fate::Kept, "while example.com is disabled");
        let fate = node.fate(ZED_ORG).await;
        node.assert_now(
            ZED_ORG,
            fate,
            Fate::Routed,
            "(example.org was not disabled)",
        );
    }

    b.admin(&["enable", "example.com"]).await;
    b.comes_to(ZED, Fate::Routed).await;
    a.comes_to(ZED, Fate::Routed).await;
    for node in [&a, &b] {
        let fate = node.fate(ALICE).await;
        node.assert_now(ALICE, fate, Fate::Kept, "after enable");
    }
}

/// (c) Redis killed: both nodes keep serving on what they know (a routed
/// recipient is still routed, a mailbox still kept, no error), and A says
/// so: `status` reports the cluster UNREACHABLE and the metric
/// `dualroute_cluster_connected` drops to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_both_nodes_keep_serving_and_say_so() {
    let (mut redis, _dead, a, b) = fleet().await;

    redis.kill();
    // At once, before any node has noticed ...
    for node in [&a, &b] {
        let fate = node.fate(ZED).await;
        node.assert_now(ZED, fate, Fate::Routed, "right after Redis died");
    }
    // ... and once they have.
    a.connection_is(0.0).await;
    b.connection_is(0.0).await;
    eventually!(
        "A's status to report the cluster UNREACHABLE",
        a.status_says(&["UNREACHABLE"]).await
    );
    for node in [&a, &b] {
        for (rcpt, want) in [
            (ZED, Fate::Routed),
            (ALICE, Fate::Kept),
            (ZED_ORG, Fate::Routed),
        ] {
            let fate = node.fate(rcpt).await;
            node.assert_now(rcpt, fate, want, "with Redis down");
        }
    }
}

/// (d) During an outage, `disable` on A holds on A at once and not on B
/// (nothing carries it there); when Redis comes back EMPTY (restarted
/// without persistence), A pushes what changed into it and B holds within
/// seconds. A stays held throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disable_during_an_outage_reaches_the_other_node_through_a_restarted_empty_redis() {
    let (mut redis, _dead, a, b) = fleet().await;

    redis.kill();
    a.connection_is(0.0).await;
    b.connection_is(0.0).await;
    a.admin(&["disable", "example.com", "--reason", "during the outage"])
        .await;
    a.comes_to(ZED, Fate::Held).await;
    let fate = b.fate(ZED).await;
    b.assert_now(
        ZED,
        fate,
        Fate::Routed,
        "with Redis down, after A's disable",
    );

    // Empty: no persistence, a new working directory (checked by the
    // harness's own test below; not here, where a node may already have
    // written into it).
    redis.restart_empty();
    a.connection_is(1.0).await;
    b.comes_to(ZED, Fate::Held).await;
    let fate = a.fate(ZED).await;
    a.assert_now(ZED, fate, Fate::Held, "after Redis came back");
    for node in [&a, &b] {
        let fate = node.fate(ALICE).await;
        node.assert_now(ALICE, fate, Fate::Kept, "after Redis came back");
    }
    // A refilled the empty Redis (whatever its key layout).
    eventually!(
        "A to write its state into the restarted Redis",
        keys_in(&redis).and_then(|n| match n {
            0 => Err("DBSIZE 0".to_owned()),
            n => Ok(n),
        })
    );
}

/// (e) A node restarted while Redis is down starts from its state_dir:
/// B learned A's disable through Redis before the outage, and after a
/// restart without Redis it still holds example.com from its first RCPT
/// (never "everything on"), keeps the mailbox, and still routes example.org
/// (its state_dir says routing is on there: a Redis outage must not become
/// a routing outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_during_an_outage_keeps_the_fleets_holds() {
    let (mut redis, _dead, a, mut b) = fleet().await;

    a.admin(&["disable", "example.com", "--reason", "before the outage"])
        .await;
    b.comes_to(ZED, Fate::Held).await;

    redis.kill();
    b.connection_is(0.0).await;
    b.stop().await;
    let b = b.started().await;
    let fate = b.fate(ZED).await;
    assert_eq!(
        fate,
        Fate::Held,
        "B restarted with Redis down forgot the fleet's disable of example.com; its state_dir holds: {}",
        listing(&state_dir(&b))
    );
    let fate = b.fate(ALICE).await;
    b.assert_now(ALICE, fate, Fate::Kept, "after the restart");
    b.comes_to(ZED_ORG, Fate::Routed).await;
    let fate = b.fate(ZED).await;
    b.assert_now(ZED, fate, Fate::Held, "after the restart, later");
    let fate = a.fate(ZED).await;
    a.assert_now(ZED, fate, Fate::Held, "(its own disable)");
}

/// The bounce breaker counts the fleet's failures together (issue 24):
/// with `threshold: 3`, two bounces of routed mail in A's MTA log and one
/// in B's trip example.com, and the trip holds on both nodes. Counted per
/// node, neither would trip (2 and 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounces_seen_by_different_nodes_add_up_to_one_trip() {
    let (_redis, _dead, a, b) = fleet().await;

    // Different messages, different recipients: three failures.
    a.bounce("4Bc1xY2z3KzA1", "ann");
    b.bounce("7Qd9wV8u1JzB1", "ben");
    a.bounce("4Bc1xY2z3KzA2", "cid");
    a.comes_to(ZED, Fate::Held).await;
    b.comes_to(ZED, Fate::Held).await;
    for node in [&a, &b] {
        eventually!(
            format!("{}'s status to show the trip", node.name),
            node.status_says(&["TRIPPED by the bounce breaker"]).await
        );
        let fate = node.fate(ZED_ORG).await;
        node.assert_now(ZED_ORG, fate, Fate::Routed, "(example.org had no failures)");
    }
}

/// (f) `status` lists the nodes of the fleet by instance name, with when
/// each was last seen; with the same configuration it flags nothing,
/// and once B runs with another account list for example.com (restarted
/// from a changed milter.yaml) A's status says CONFIGURATION DIFFERS.
///
/// "The same configuration" as two MX hosts have it: the nodes' files
/// differ only in what is the node's own, `instance`, `state_dir` and
/// the MTA log the breaker follows (`breaker.maillog`: each node reads
/// its own MTA's log, and a Debian and a RHEL host call it
/// /var/log/mail.log and /var/log/maillog). None of them changes what a
/// node decides for a recipient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_the_nodes_and_flags_a_node_whose_configuration_differs() {
    let (redis, dead, a, mut b) = fleet().await;

    let out = eventually!(
        "A's status to list both nodes",
        a.status_says(&[A, B, "last seen"]).await
    );
    assert!(
        !out.contains("CONFIGURATION DIFFERS"),
        "identical configurations flagged:\n{out}"
    );

    b.stop().await;
    b.write_config(
        &redis.url(),
        &dead,
        "alice@example.com, bob@example.com, carol@example.com",
    );
    let b = b.started().await;
    b.connection_is(1.0).await;
    eventually!(
        "A's status to flag B's different configuration",
        a.status_says(&[A, B, "CONFIGURATION DIFFERS"]).await
    );
    // B's view of the fleet says the same.
    eventually!(
        "B's status to flag the difference",
        b.status_says(&[A, B, "CONFIGURATION DIFFERS"]).await
    );
}

/// How Redis comes back after an outage.
#[derive(Clone, Copy, Debug)]
enum Back {
    /// With the data it had (persistence, or a network partition that
    /// healed).
    WithData,
    /// Empty (restarted without persistence, or replaced).
    Empty,
    /// Empty, and B (which lifted the hold) agrees with the empty store
    /// before A (which kept it) is back: A is stopped meanwhile. A run of
    /// `Empty` took this order by chance and lost the "held wins" note.
    EmptyLifterFirst,
}

/// (g) Two nodes change the same domain in opposite ways during one
/// outage: the most restrictive state wins (held beats routing) on both
/// once Redis is back, and `status` says so.
///
/// The scenario, step by step:
/// 1. Before the outage A disables example.com; both hold it.
/// 2. Redis dies; both nodes notice.
/// 3. A disables example.com again (a new reason: a change of its own
///    during the outage).
/// 4. In a later second, B enables example.com: B routes at once (commands
///    act where given), A still holds. B's change is the LATER one, so
///    "the last writer wins" would route on both: only "held wins" holds.
/// 5. Redis comes back (`back`). Within seconds both hold, and `status`
///    says "held wins" on both nodes: on B, whose `enable` was overruled
///    (the admin who typed it must learn why B holds again), and on A.
async fn opposite_changes_during_an_outage(back: Back) {
    let (mut redis, _dead, mut a, b) = fleet().await;

    // 1.
    a.admin(&["disable", "example.com", "--reason", "before the outage"])
        .await;
    b.comes_to(ZED, Fate::Held).await;
    // 2.
    match back {
        Back::WithData => redis.save_and_kill(),
        Back::Empty | Back::EmptyLifterFirst => redis.kill(),
    }
    a.connection_is(0.0).await;
    b.connection_is(0.0).await;
    // 3.
    a.admin(&["disable", "example.com", "--reason", "still broken"])
        .await;
    let disabled_at = now();
    // 4.
    next_second(disabled_at).await;
    b.admin(&["enable", "example.com"]).await;
    b.comes_to(ZED, Fate::Routed).await;
    let fate = a.fate(ZED).await;
    a.assert_now(ZED, fate, Fate::Held, "during the outage, after B's enable");
    // 5.
    match back {
        Back::WithData => redis.come_back(),
        Back::Empty => redis.restart_empty(),
        Back::EmptyLifterFirst => {
            a.stop().await;
            redis.restart_empty();
            b.connection_is(1.0).await;
            a = a.started().await;
        }
    }
    a.connection_is(1.0).await;
    b.connection_is(1.0).await;
    b.comes_to(ZED, Fate::Held).await;
    let fate = a.fate(ZED).await;
    a.assert_now(ZED, fate, Fate::Held, "after Redis came back");
    for node in [&b, &a] {
        eventually!(
            format!(
                "{}'s status to say held wins (Redis back {back:?})",
                node.name
            ),
            node.status_says(&["held wins"]).await
        );
        let fate = node.fate(ALICE).await;
        node.assert_now(ALICE, fate, Fate::Kept, "after the conflict");
    }
}

/// (g) with Redis back with its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_changes_during_an_outage_resolve_to_held_on_both() {
    opposite_changes_during_an_outage(Back::WithData).await;
}

/// (g) with Redis back empty: the nodes' memory of their last agreement
/// with the fleet is all that tells them both changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_changes_during_an_outage_resolve_to_held_on_both_through_an_emptied_redis() {
    opposite_changes_during_an_outage(Back::Empty).await;
}

/// (g) with Redis back empty, the node that lifted the hold agreeing with
/// the empty store first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_changes_during_an_outage_resolve_to_held_when_the_lifter_syncs_first() {
    opposite_changes_during_an_outage(Back::EmptyLifterFirst).await;
}

/// The harness itself (tests/support/redis.rs): the test Redis keeps what
/// it is given, is gone after a kill, and comes back on the same port
/// empty, or with its data after a `SAVE`, which the outage tests above
/// rely on.
#[test]
fn the_test_redis_dies_and_comes_back_empty_on_the_same_port() {
    let mut redis = Redis::start();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/0"));
    assert_eq!(redis.cli(&["SET", "dualroute-test", "1"]).trim(), "OK");
    assert_eq!(keys_in(&redis), Ok(1));

    redis.kill();
    assert!(!redis.is_running());
    assert!(
        !support::is_listening(port),
        "something listens on {port} after the kill"
    );

    redis.restart_empty();
    assert_eq!(redis.port(), port);
    assert_eq!(keys_in(&redis), Ok(0), "{}", redis.log());
    // A snapshot survives a kill when asked for.
    assert_eq!(redis.cli(&["SET", "dualroute-test", "2"]).trim(), "OK");
    redis.save_and_kill();
    assert!(!support::is_listening(port));
    redis.come_back();
    assert_eq!(
        redis.cli(&["GET", "dualroute-test"]).trim(),
        "2",
        "{}",
        redis.log()
    );
    assert_eq!(
        redis.cli(&["CONFIG", "GET", "save"]).lines().nth(1),
        Some("")
    );
    assert_eq!(
        redis.cli(&["CONFIG", "GET", "appendonly"]).lines().nth(1),
        Some("no")
    );
    assert_eq!(
        redis.cli(&["CONFIG", "GET", "bind"]).lines().nth(1),
        Some("127.0.0.1")
    );
}

/// The administrator hears by mail (`notify:`) when the node loses the
/// fleet's Redis and when it has it back (DESIGN.md §11: "says so").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_and_regaining_redis_is_told_by_mail() {
    let mut redis = Redis::start();
    let sink = support::SmtpSink::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("milter.yaml");
    std::fs::write(
        &config,
        format!(
            "instance: {A}
state_dir: {}
cluster: {{ redis: \"{}\", sync: 1s }}
notify: {{ to: [admin@example.org], via: \"smtp:{}\", interval: 1s }}
domains:
  example.com:
    mode: split
    destination: {{ hosts: [\"[192.0.2.30]:2525\"] }}
    accounts: [ {{ list: [alice@example.com] }} ]
",
            dir.path().join("state").display(),
            redis.url(),
            sink.addr()
        ),
    )
    .expect("write milter.yaml");
    let intervals = dualroute::Intervals {
        state: Duration::from_millis(100),
        ..Default::default()
    };
    let milter = Milter::serve(support::protocol::start_at(&config, intervals)).await;
    let subjects = || -> Vec<String> {
        sink.messages()
            .iter()
            .flat_map(|m| m.header("Subject"))
            .collect()
    };
    let start = Instant::now();
    let wait = |what: &'static str| {
        let subjects = &subjects;
        async move {
            while !subjects().iter().any(|s| s.contains(what)) {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "no mail saying {what:?}; got {:?}",
                    subjects()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Connected at start: nothing to tell.
    let metrics_up = || milter.metrics().contains("dualroute_cluster_connected 1");
    while !metrics_up() {
        assert!(start.elapsed() < Duration::from_secs(10), "never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(subjects().is_empty(), "{:?}", subjects());
    redis.kill();
    wait("the fleet's Redis is unreachable").await;
    let body = sink.messages()[0].text.clone();
    assert!(body.contains("Mail is not affected"), "{body}");
    redis.restart_empty();
    wait("the fleet's Redis is reachable again").await;
    milter.shutdown().await;
}

/// Whether `m` refuses zed@example.com with 550 5.1.1 at RCPT.
async fn refused(m: &Milter) -> bool {
    let d = m.deliver(CLIENT, None, &[&["<zed@example.com>"]]).await;
    matches!(&d.rcpt[0], Status::Reject { message: Some(t) } if t.to_string_lossy().starts_with("550 5.1.1"))
}

/// The recipient-callout cache is the fleet's (DESIGN.md §10, §11): an
/// address one node asked the destination about is answered on the
/// other node from the shared answer, without a second callout; a node
/// started later reads the fleet's answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callout_answers_are_shared_by_the_fleet() {
    let redis = Redis::start();
    let stub =
        callout_stub::CalloutStub::start(&["bob@example.com"], callout_stub::Mode::Directory);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let start_node = |name: &'static str| {
        let config = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                "instance: {name}
state_dir: {}
cluster: {{ redis: \"{}\", sync: 1s }}
domains:
  example.com:
    mode: split
    destination:
      hosts: [\"{}\"]
      reject_unknown: {{ callout: true }}
    accounts: [ {{ list: [alice@example.com] }} ]
",
                dir.path().join(format!("state-{name}")).display(),
                redis.url(),
                stub.host()
            ),
        )
        .expect("write milter.yaml");
        let intervals = dualroute::Intervals {
            state: Duration::from_millis(100),
            ..Default::default()
        };
        Milter::serve(support::protocol::start_at(&config, intervals))
    };
    let a = start_node(A).await;
    let b = start_node(B).await;
    let connected = |m: &Milter| m.metrics().contains("dualroute_cluster_connected 1");
    let start = Instant::now();
    while !(connected(&a) && connected(&b)) {
        assert!(start.elapsed() < WITHIN, "the nodes never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused(&a).await, "A did not refuse zed");
    assert_eq!(stub.callouts_for("zed@example.com"), 1);
    // B learns A's answer within seconds; until then a check of its own
    // would make a second callout, so wait for the fleet's answer in B's
    // cache file before asking B.
    let b_cache = dir.path().join(format!("state-{B}/example.com.callouts"));
    let start = Instant::now();
    while !std::fs::read_to_string(&b_cache).is_ok_and(|t| t.contains("zed@example.com")) {
        assert!(start.elapsed() < WITHIN, "B never took A's answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused(&b).await, "B did not refuse zed");
    assert_eq!(
        stub.callouts_for("zed@example.com"),
        1,
        "B asked the destination again: {:?}",
        stub.callouts()
    );
    a.shutdown().await;
    b.shutdown().await;
    // A third node, started afterwards, reads the fleet's answers.
    let c = start_node("mx-c.test").await;
    let c_cache = dir.path().join("state-mx-c.test/example.com.callouts");
    let start = Instant::now();
    while !std::fs::read_to_string(&c_cache).is_ok_and(|t| t.contains("zed@example.com")) {
        assert!(
            start.elapsed() < WITHIN,
            "a new node never read the fleet's answers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused(&c).await, "C did not refuse zed");
    assert_eq!(
        stub.callouts_for("zed@example.com"),
        1,
        "{:?}",
        stub.callouts()
    );
    c.shutdown().await;
}
