//! The recipient-callout engine (src/callout/, DESIGN.md §10) against a
//! loopback SMTP destination (tests/support/callout_stub.rs): what each
//! reply class means, one callout for concurrent checks, the bounds,
//! accept-all detection, the cache across a restart and its lifetimes.
//! Time is the engine's injectable clock, never a sleep; waits poll the
//! stub for the effect they expect.

#[path = "support/callout_stub.rs"]
mod callout_stub;

use callout_stub::{CalloutStub, Mode};
use dualroute::callout::{Answer, Callouts, Limits, Origin, Verdict, DEADLINE};
use dualroute::config::{DnsConfig, DomainConfig};
use dualroute::dns::Dns;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KNOWN: &str = "alice@example.com";
const UNKNOWN: &str = "zed@example.com";
/// 2026-12-04 00:00:00 UTC, a minute boundary.
const T0: u64 = 1_796_342_400;

/// `example.com` in route mode, its destination `host`, with
/// `reject_unknown` (`cache` as given, or the defaults).
fn domain(host: &str, cache: &str) -> DomainConfig {
    let yaml = format!(
        "domains:\n  example.com:\n    mode: route\n    destination:\n      hosts: [\"{host}\"]\n      reject_unknown: {{ callout: true{cache} }}\n"
    );
    dualroute::config::parse(&yaml, "milter.yaml")
        .expect("test configuration")
        .domains
        .into_values()
        .next()
        .expect("one domain")
}

struct Engine {
    callouts: Callouts,
    clock: Arc<AtomicU64>,
}

impl Engine {
    fn new(state: &Path, limits: Limits) -> Engine {
        let clock = Arc::new(AtomicU64::new(T0));
        let c = clock.clone();
        let dns = Arc::new(Dns::new(&DnsConfig::default()).expect("a resolver"));
        Engine {
            callouts: Callouts::with_clock(
                state,
                "mx.test",
                dns,
                limits,
                Arc::new(move || c.load(Ordering::SeqCst)),
            ),
            clock,
        }
    }

    fn advance(&self, secs: u64) {
        self.clock.fetch_add(secs, Ordering::SeqCst);
    }

    async fn check(&self, d: &DomainConfig, address: &str) -> Answer {
        self.callouts
            .check("example.com", d, address, DEADLINE)
            .await
    }
}

/// A port nothing listens on: a destination that is down.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("[127.0.0.1]:{port}")
}

/// Polls `what` until it holds, for at most 10 s.
async fn until(what: impl Fn() -> bool, waiting_for: &str) {
    let start = Instant::now();
    while !what() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {waiting_for}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_unknown_tempfail_and_down() {
    let stub = CalloutStub::start(&[KNOWN], Mode::Directory);
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::new(dir.path(), Limits::default());
    let d = domain(&stub.host(), "");

    let a = e.check(&d, KNOWN).await;
    assert_eq!(
        (a.verdict, a.origin),
        (Verdict::Known, Origin::Callout),
        "{a:?}"
    );
    assert!(a.reply.starts_with("250"), "{a:?}");
    assert!(!a.accept_all, "{a:?}");
    // The accept-all question follows the first accepted callout.
    until(|| stub.rcpts().len() == 2, "the random local part").await;
    let a = e.check(&d, UNKNOWN).await;
    assert_eq!(
        (a.verdict, a.origin),
        (Verdict::Unknown, Origin::Callout),
        "{a:?}"
    );
    assert!(a.reply.starts_with("550 5.1.1"), "{a:?}");
    // Both answers are cached now: no further RCPT reaches the stub.
    let before = stub.rcpts().len();
    assert_eq!(e.check(&d, KNOWN).await.origin, Origin::Cache);
    assert_eq!(e.check(&d, UNKNOWN).await.verdict, Verdict::Unknown);
    assert_eq!(stub.rcpts().len(), before, "{:?}", stub.rcpts());

    stub.set_mode(Mode::TempFail);
    let a = e.check(&d, "new@example.com").await;
    assert_eq!(a.verdict, Verdict::Unreachable, "{a:?}");
    assert!(a.reply.starts_with("450"), "{a:?}");
    // A 4xx is not cached: the next check asks again.
    e.check(&d, "new@example.com").await;
    assert_eq!(stub.asked("new@example.com"), 2);

    let down = domain(&closed_port(), "");
    let a = e.check(&down, KNOWN).await;
    assert_eq!(a.verdict, Verdict::Unreachable, "{a:?}");
    assert!(a.reply.contains("connect"), "{a:?}");

    // Another destination starts the domain's state afresh: its counts
    // are the down destination's only.
    let stats = e.callouts.stats("example.com").unwrap();
    assert_eq!((stats.known, stats.unknown), (0, 0), "{stats:?}");
    assert_eq!(stats.unreachable, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_share_one_callout() {
    let stub = CalloutStub::start(&[KNOWN], Mode::Directory);
    stub.set_delay(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let e = Arc::new(Engine::new(dir.path(), Limits::default()));
    let d = domain(&stub.host(), "");
    let checks: Vec<_> = (0..20)
        .map(|_| {
            let (e, d) = (e.clone(), d.clone());
            tokio::spawn(async move { e.check(&d, KNOWN).await })
        })
        .collect();
    for c in checks {
        let a = c.await.unwrap();
        assert_eq!(a.verdict, Verdict::Known, "{a:?}");
    }
    assert_eq!(stub.asked(KNOWN), 1, "{:?}", stub.rcpts());
    let stats = e.callouts.stats("example.com").unwrap();
    assert_eq!(stats.known, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_callouts_per_minute_and_at_once_are_bounded() {
    let stub = CalloutStub::start(&[], Mode::Directory);
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        per_minute: 3,
        concurrency: 2,
        ..Limits::default()
    };
    let e = Arc::new(Engine::new(dir.path(), limits));
    let d = domain(&stub.host(), "");
    stub.set_delay(Duration::from_millis(200));
    let words = ["a", "b", "c", "d", "e"];
    let checks: Vec<_> = words
        .iter()
        .map(|w| {
            let (e, d) = (e.clone(), d.clone());
            let address = format!("{w}@example.com");
            tokio::spawn(async move { e.check(&d, &address).await })
        })
        .collect();
    let mut answers = Vec::new();
    for c in checks {
        answers.push(c.await.unwrap());
    }
    let throttled = answers
        .iter()
        .filter(|a| a.origin == Origin::Throttled)
        .count();
    let refused = answers
        .iter()
        .filter(|a| a.verdict == Verdict::Unknown)
        .count();
    assert_eq!((refused, throttled), (3, 2), "{answers:?}");
    assert!(answers
        .iter()
        .filter(|a| a.origin == Origin::Throttled)
        .all(|a| a.verdict == Verdict::Unreachable));
    // Only three reached the destination, at most two at a time.
    assert_eq!(stub.rcpts().len(), 3, "{:?}", stub.rcpts());
    assert!(
        stub.most_open() <= 2,
        "{} sessions at once",
        stub.most_open()
    );
    assert_eq!(e.callouts.stats("example.com").unwrap().throttled, 2);
    // The negative cache absorbs repeats without spending the rate.
    let asked = answers
        .iter()
        .zip(words)
        .find(|(a, _)| a.verdict == Verdict::Unknown)
        .map(|(_, w)| format!("{w}@example.com"))
        .unwrap();
    assert_eq!(e.check(&d, &asked).await.origin, Origin::Cache);
    // Another domain routed to the same hosts shares their bound.
    let yaml = format!(
        "domains:\n  example.org:\n    mode: route\n    destination:\n      hosts: [\"{}\"]\n      reject_unknown: {{ callout: true }}\n",
        stub.host()
    );
    let org = dualroute::config::parse(&yaml, "milter.yaml")
        .unwrap()
        .domains
        .into_values()
        .next()
        .unwrap();
    let a = e
        .callouts
        .check("example.org", &org, "a@example.org", DEADLINE)
        .await;
    assert_eq!(a.origin, Origin::Throttled, "{a:?}");
    assert_eq!(stub.rcpts().len(), 3, "{:?}", stub.rcpts());
    // The next minute allows new callouts again.
    e.advance(60);
    stub.set_delay(Duration::ZERO);
    let a = e.check(&d, "f@example.com").await;
    assert_eq!(
        (a.verdict, a.origin),
        (Verdict::Unknown, Origin::Callout),
        "{a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_accepts_anything_is_reported() {
    let stub = CalloutStub::start(&[], Mode::AcceptAll);
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::new(dir.path(), Limits::default());
    let d = domain(&stub.host(), "");
    let a = e.check(&d, "whoever@example.com").await;
    assert_eq!(a.verdict, Verdict::Known, "{a:?}");
    // Then, without making the check wait, a random local part in the
    // same domain.
    until(
        || e.callouts.stats("example.com").unwrap().accept_all == Some(true),
        "the accept-all verdict",
    )
    .await;
    let rcpts = stub.rcpts();
    assert_eq!(rcpts.len(), 2, "{rcpts:?}");
    assert!(
        rcpts[1].starts_with("dualroute-check-") && rcpts[1].ends_with("@example.com"),
        "{rcpts:?}"
    );
    assert_eq!(
        e.callouts.stats("example.com").unwrap().accept_all,
        Some(true)
    );
    // Cached answers carry the flag too, and the check is not repeated
    // for every callout.
    assert!(e.check(&d, "whoever@example.com").await.accept_all);
    assert!(e.check(&d, "other@example.com").await.accept_all);
    assert_eq!(stub.rcpts().len(), 3, "{:?}", stub.rcpts());

    // A destination that refuses the random local part is not accept-all.
    let stub = CalloutStub::start(&[KNOWN], Mode::Directory);
    let e = Engine::new(dir.path(), Limits::default());
    let a = e.check(&domain(&stub.host(), ""), KNOWN).await;
    assert!(!a.accept_all, "{a:?}");
    until(
        || e.callouts.stats("example.com").unwrap().accept_all == Some(false),
        "the accept-all verdict",
    )
    .await;
    assert_eq!(stub.rcpts().len(), 2, "{:?}", stub.rcpts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_survives_a_restart_and_serves_while_the_destination_is_down() {
    let stub = CalloutStub::start(&[KNOWN], Mode::Directory);
    let dir = tempfile::tempdir().unwrap();
    let d = domain(&stub.host(), "");
    {
        let e = Engine::new(dir.path(), Limits::default());
        assert_eq!(e.check(&d, KNOWN).await.verdict, Verdict::Known);
        until(|| stub.rcpts().len() == 2, "the random local part").await;
        assert_eq!(e.check(&d, UNKNOWN).await.verdict, Verdict::Unknown);
    }
    let file = dir.path().join("example.com.callouts");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(KNOWN) && text.contains(UNKNOWN), "{text}");
    let asked = stub.rcpts().len();
    stub.set_mode(Mode::TempFail);

    let e = Engine::new(dir.path(), Limits::default());
    e.callouts.load("example.com", &d);
    let cached = e.callouts.cached("example.com", &d, KNOWN).unwrap();
    assert_eq!(
        (cached.verdict, cached.origin),
        (Verdict::Known, Origin::Cache)
    );
    assert!(e
        .callouts
        .cached("example.com", &d, "new@example.com")
        .is_none());
    let a = e.check(&d, UNKNOWN).await;
    assert_eq!(
        (a.verdict, a.origin),
        (Verdict::Unknown, Origin::Cache),
        "{a:?}"
    );
    assert_eq!(stub.rcpts().len(), asked);
    // Uncached addresses are Unreachable while the destination cannot say.
    assert_eq!(
        e.check(&d, "new@example.com").await.verdict,
        Verdict::Unreachable
    );

    // The cache belongs to its destination: other hosts start afresh.
    let other = CalloutStub::start(&[], Mode::Directory);
    let e = Engine::new(dir.path(), Limits::default());
    assert!(e
        .callouts
        .cached("example.com", &domain(&other.host(), ""), KNOWN)
        .is_none());

    // A damaged file costs the cache, not the check.
    std::fs::write(&file, "{{{{").unwrap();
    let e = Engine::new(dir.path(), Limits::default());
    stub.set_mode(Mode::Directory);
    assert_eq!(e.check(&d, KNOWN).await.verdict, Verdict::Known);
    assert!(std::fs::read_to_string(&file).unwrap().contains(KNOWN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetimes_expire_and_answers_are_refreshed_before() {
    let stub = CalloutStub::start(&[KNOWN], Mode::Directory);
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::new(dir.path(), Limits::default());
    let d = domain(&stub.host(), ", cache: { positive: 1d, negative: 1h }");
    assert_eq!(e.check(&d, UNKNOWN).await.verdict, Verdict::Unknown);
    assert_eq!(e.check(&d, KNOWN).await.verdict, Verdict::Known);
    assert_eq!((stub.asked(UNKNOWN), stub.asked(KNOWN)), (1, 1));

    // Within the first three quarters: served, nothing asked.
    e.advance(2700 - 1);
    assert_eq!(e.check(&d, UNKNOWN).await.origin, Origin::Cache);
    assert_eq!(stub.asked(UNKNOWN), 1);

    // An hour later the negative answer is gone; the positive one stays.
    e.advance(901);
    assert!(e.callouts.cached("example.com", &d, UNKNOWN).is_none());
    assert!(e.callouts.cached("example.com", &d, KNOWN).is_some());
    let a = e.check(&d, UNKNOWN).await;
    assert_eq!((a.verdict, a.origin), (Verdict::Unknown, Origin::Callout));
    assert_eq!(stub.asked(UNKNOWN), 2);
    assert_eq!(stub.asked(KNOWN), 1);

    // In the last quarter of its day the positive answer is served at
    // once and asked again in the background.
    e.advance(86_400 - 3600 - 5000);
    let a = e.check(&d, KNOWN).await;
    assert_eq!((a.verdict, a.origin), (Verdict::Known, Origin::Cache));
    until(|| stub.asked(KNOWN) == 2, "the background refresh").await;
    // The refreshed answer starts a new lifetime: past the first day it
    // is still served.
    until(
        || {
            e.callouts
                .cached("example.com", &d, KNOWN)
                .is_some_and(|a| a.at > T0)
        },
        "the refreshed answer in the cache",
    )
    .await;
    e.advance(6000);
    assert!(e.callouts.cached("example.com", &d, KNOWN).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_destination_answers_unreachable_by_the_deadline_and_is_cached_after() {
    let stub = CalloutStub::start(&[KNOWN], Mode::Directory);
    stub.set_delay(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::new(dir.path(), Limits::default());
    let d = domain(&stub.host(), "");
    let started = Instant::now();
    let a = e
        .callouts
        .check("example.com", &d, KNOWN, Duration::from_millis(200))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        (a.verdict, a.origin),
        (Verdict::Unreachable, Origin::Deadline),
        "{a:?}"
    );
    assert_eq!(e.callouts.stats("example.com").unwrap().deadline, 1);
    // The callout went on: the sender's retry finds the answer.
    until(
        || e.callouts.cached("example.com", &d, KNOWN).is_some(),
        "the late answer in the cache",
    )
    .await;
    assert_eq!(e.check(&d, KNOWN).await.origin, Origin::Cache);
}

// ---------------------------------------------------------------------
// At RCPT: the whole service (`dualroute::run`, tests/support/protocol.rs)
// driven as Postfix drives it, asking the loopback stub.

mod support;
use indymilter_test::{EomAction, Status};
use support::protocol::{self, assert_actions, assert_rejected, Milter, CLIENT};

/// split.test, alice has a mailbox here; its destination is `host`, asked
/// with `reject_unknown` (`extra` adds to it); `domain_extra` is added to
/// the domain (e.g. `shadow: true`).
fn milter_config(state: &Path, host: &str, extra: &str, domain_extra: &str) -> String {
    format!(
        "instance: mx.test\nstate_dir: {}\ndomains:\n  split.test:\n    mode: split\n{domain_extra}    destination:\n      hosts: [\"{host}\"]\n      reject_unknown: {{ callout: true{extra} }}\n    accounts:\n      - list: [alice@split.test]\n",
        state.display()
    )
}

fn tempfailed(status: &Status) -> String {
    match status {
        Status::Tempfail { message: Some(m) } => m.to_string_lossy().into_owned(),
        other => panic!("expected a tempfail with a reply text, got {other:?}"),
    }
}

/// The redirect of `local@split.test` to its routing address.
fn routed(local: &str) -> Vec<EomAction> {
    vec![
        EomAction::DeleteRecipient {
            rcpt: std::ffi::CString::new(format!("<{local}@split.test>")).unwrap(),
        },
        EomAction::AddRecipient {
            rcpt: std::ffi::CString::new(format!("<{local}@split.test.dualroute.invalid>"))
                .unwrap(),
            args: Some(std::ffi::CString::new(format!("ORCPT=rfc822;{local}@split.test")).unwrap()),
        },
        EomAction::AddHeader {
            name: c"X-Dualroute".into(),
            value: c"mx.test".into(),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_rcpt_unknown_is_refused_known_routed_and_a_mailbox_here_asks_nothing() {
    let stub = CalloutStub::start(&["bob@split.test"], Mode::Directory);
    let state = tempfile::tempdir().unwrap();
    let milter = Milter::start(&milter_config(state.path(), &stub.host(), "", "")).await;
    let mut session = milter.session(CLIENT).await;
    // A mailbox here: kept, and the destination is never asked.
    let d = session.message(None, &[&["<alice@split.test>"]], &[]).await;
    assert_eq!(d.rcpt, [Status::Continue]);
    assert_actions(&d.actions, &[]);
    assert!(stub.rcpts().is_empty(), "asked: {:?}", stub.rcpts());
    // Unknown at the destination: 550 5.1.1 at RCPT; known: routed.
    let d = session
        .message(None, &[&["<zed@split.test>"], &["<bob@split.test>"]], &[])
        .await;
    assert_rejected(&d.rcpt[0], "550 5.1.1");
    assert!(protocol::rejection(&d.rcpt[0]).contains("<zed@split.test>"));
    assert_eq!(d.rcpt[1], Status::Continue);
    assert_eq!(d.eom, Status::Continue);
    assert_actions(&d.actions, &routed("bob"));
    // Asked as it arrives there (smtp_generic_maps restores the domain).
    assert_eq!(stub.asked("zed@split.test"), 1, "{:?}", stub.rcpts());
    assert_eq!(stub.asked("bob@split.test"), 1, "{:?}", stub.rcpts());
    // Again, bob twice in one message: the cache answers (the repeat in
    // the message is not even looked up), no new callout.
    let d = session
        .message(
            None,
            &[
                &["<zed@split.test>"],
                &["<bob@split.test>"],
                &["<bob@split.test>"],
            ],
            &[],
        )
        .await;
    assert_rejected(&d.rcpt[0], "550 5.1.1");
    assert_eq!(d.rcpt[1..], [Status::Continue, Status::Continue]);
    assert_actions(&d.actions, &routed("bob"));
    assert_eq!(stub.asked("zed@split.test"), 1, "{:?}", stub.rcpts());
    assert_eq!(stub.asked("bob@split.test"), 1, "{:?}", stub.rcpts());
    let metrics = milter.metrics();
    for line in [
        "dualroute_callouts_total{domain=\"split.test\",result=\"unknown\"} 1",
        "dualroute_callouts_total{domain=\"split.test\",result=\"known\"} 1",
        "dualroute_callout_cache_hits_total{domain=\"split.test\"} 2",
        "dualroute_callout_accept_all{domain=\"split.test\"} 0",
        "dualroute_decisions_total{domain=\"split.test\",kind=\"reject\",shadow=\"false\"} 2",
    ] {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }
    session.close().await;
    milter.shutdown().await;
    // `explain` shows the answers the milter cached, from state_dir.
    let config = state.path().join("milter.yaml");
    std::fs::write(&config, milter_config(state.path(), &stub.host(), "", "")).unwrap();
    let explain = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dualroute"))
            .arg("--config")
            .arg(&config)
            .args([
                "explain",
                "zed@split.test",
                "bob@split.test",
                "alice@split.test",
                "carol@split.test",
            ])
            .output()
            .expect("run dualroute explain");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    until(
        || explain().contains("cached answer for <zed@split.test>: unknown"),
        "explain to show the cached answer",
    )
    .await;
    let out = explain();
    assert!(
        out.contains("cached answer for <bob@split.test>: known"),
        "{out}"
    );
    assert!(
        out.contains("no cached answer for <carol@split.test>"),
        "{out}"
    );
    assert!(
        !out.contains("<alice@split.test>: n") && !out.contains("for <alice"),
        "{out}"
    );
}

/// Drops the stub and waits until its port refuses connections.
async fn stop(stub: CalloutStub) {
    let addr = format!("127.0.0.1:{}", stub.host().rsplit(':').next().unwrap());
    drop(stub);
    until(
        || std::net::TcpStream::connect(&addr).is_err(),
        "the stub's port to close",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_down_tempfails_the_uncached_and_serves_the_cached() {
    let stub = CalloutStub::start(&["bob@split.test"], Mode::Directory);
    let state = tempfile::tempdir().unwrap();
    let milter = Milter::start(&milter_config(state.path(), &stub.host(), "", "")).await;
    let mut session = milter.session(CLIENT).await;
    let d = session.message(None, &[&["<bob@split.test>"]], &[]).await;
    assert_eq!(d.rcpt, [Status::Continue]);
    stop(stub).await;
    // Cached: still routed. Uncached: 451 4.4.3, nothing routed.
    let d = session
        .message(None, &[&["<bob@split.test>"], &["<carol@split.test>"]], &[])
        .await;
    assert_eq!(d.rcpt[0], Status::Continue);
    let text = tempfailed(&d.rcpt[1]);
    assert!(text.starts_with("451 4.4.3 "), "{text}");
    assert_actions(&d.actions, &routed("bob"));
    let metrics = milter.metrics();
    let line = "dualroute_callouts_total{domain=\"split.test\",result=\"unreachable\"} 1";
    assert!(metrics.contains(line), "no {line} in\n{metrics}");
    session.close().await;
    milter.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_accept_routes_as_without_reject_unknown() {
    let stub = CalloutStub::start(&[], Mode::Directory);
    let host = stub.host();
    stop(stub).await;
    let state = tempfile::tempdir().unwrap();
    let milter = Milter::start(&milter_config(
        state.path(),
        &host,
        ", unreachable: accept",
        "",
    ))
    .await;
    let d = milter
        .deliver(CLIENT, None, &[&["<carol@split.test>"]])
        .await;
    assert_eq!(d.rcpt, [Status::Continue]);
    assert_eq!(d.eom, Status::Continue);
    assert_actions(&d.actions, &routed("carol"));
    milter.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_never_refuses_and_counts_what_it_would_do() {
    let stub = CalloutStub::start(&[], Mode::Directory);
    let state = tempfile::tempdir().unwrap();
    let yaml = milter_config(state.path(), &stub.host(), "", "    shadow: true\n");
    let milter = Milter::start(&yaml).await;
    let d = milter.deliver(CLIENT, None, &[&["<zed@split.test>"]]).await;
    assert_eq!(d.rcpt, [Status::Continue]);
    assert_eq!(d.eom, Status::Continue);
    // Shadow mode changes nothing (docs/rollout.md).
    assert_actions(&d.actions, &[]);
    assert_eq!(stub.asked("zed@split.test"), 1, "{:?}", stub.rcpts());
    let metrics = milter.metrics();
    for line in [
        "dualroute_callouts_total{domain=\"split.test\",result=\"unknown\"} 1",
        "dualroute_decisions_total{domain=\"split.test\",kind=\"reject\",shadow=\"true\"} 1",
    ] {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }
    // Counted once, as what live mode would do: not also as a redirect.
    assert!(
        !metrics.contains("kind=\"redirect\""),
        "a refused recipient counted as routed too:\n{metrics}"
    );
    milter.shutdown().await;
}

/// A local submission (Postfix's non_smtpd_milters): nothing is refused
/// at RCPT there; the whole message gets the refusal at end of message,
/// as with every other refusal (docs/design.md "Local submission").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_submission_gets_the_refusal_at_end_of_message() {
    let stub = CalloutStub::start(&["bob@split.test"], Mode::Directory);
    let state = tempfile::tempdir().unwrap();
    let milter = Milter::start(&milter_config(state.path(), &stub.host(), "", "")).await;
    let mut session = protocol::non_smtp_session(&milter).await;
    let d = session
        .message(None, &[&["zed@split.test"], &["bob@split.test"]], &[])
        .await;
    assert_eq!(d.rcpt, [Status::Continue, Status::Continue]);
    assert_actions(&d.actions, &[]);
    assert_rejected(&d.eom, "550 5.1.1");
    assert_eq!(stub.asked("zed@split.test"), 1, "{:?}", stub.rcpts());
    // Known only: routed as before.
    let d = session.message(None, &[&["bob@split.test"]], &[]).await;
    assert_eq!(d.eom, Status::Continue);
    assert!(
        protocol::added(&d.actions).contains("<bob@split.test.dualroute.invalid>"),
        "{:?}",
        d.actions
    );
    session.close().await;
    milter.shutdown().await;
}

/// The address a callout asks is the one that arrives at the destination
/// (docs/design.md §4): the relay domain's form restored, a
/// `change_envelope` address as it is; nothing for a domain without
/// `reject_unknown.callout` or an address that is not routed.
#[test]
fn the_address_asked_is_the_one_that_arrives_there() {
    let p = protocol::policy(
        "domains:\n  split.test:\n    mode: split\n    destination:\n      hosts: [\"[192.0.2.1]\"]\n      reject_unknown: { callout: true }\n    accounts:\n      - list: [alice@split.test]\n  env.test:\n    mode: route\n    destination:\n      domain: alias.example\n      change_envelope: true\n      reject_unknown: { callout: true }\n  plain.test:\n    mode: route\n    destination:\n      hosts: [\"[192.0.2.2]\"]\n",
    );
    let asked = |routed: &str| {
        p.callout_target(routed)
            .map(|(d, a)| format!("{} {a}", d.name))
    };
    assert_eq!(
        asked("Zed@split.test.dualroute.invalid").as_deref(),
        Some("split.test Zed@split.test")
    );
    assert_eq!(
        asked("zed@alias.example").as_deref(),
        Some("env.test zed@alias.example")
    );
    assert_eq!(asked("zed@plain.test.dualroute.invalid"), None);
    assert_eq!(asked("alice@split.test"), None);
    assert_eq!(asked("bob@elsewhere.example"), None);
}

// ---------------------------------------------------------------------
// The destination's address list (`reject_unknown.accounts`, DESIGN.md
// §10) and `explain --callout`.

/// split.test with alice here, routed to `host`, with `reject_unknown`
/// set to `reject_unknown` (a YAML flow map).
fn list_config(state: &Path, host: &str, reject_unknown: &str) -> String {
    format!(
        "instance: mx.test\nstate_dir: {}\ndomains:\n  split.test:\n    mode: split\n    destination:\n      hosts: [\"{host}\"]\n      reject_unknown: {reject_unknown}\n    accounts:\n      - list: [alice@split.test]\n",
        state.display()
    )
}

/// Runs `dualroute --config CONFIG ARGS…`; its stdout, or a panic with
/// its stderr.
fn dualroute(config: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run dualroute");
    assert!(
        out.status.success(),
        "dualroute {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_list_alone_refuses_what_it_does_not_name_without_a_callout() {
    // The stub would accept anyone: were it asked, zed would be routed.
    let stub = CalloutStub::start(&[], Mode::AcceptAll);
    let state = tempfile::tempdir().unwrap();
    let yaml = list_config(
        state.path(),
        &stub.host(),
        "{ accounts: [ { list: [bob@split.test, \"carol+news@split.test\"] } ] }",
    );
    let milter = Milter::start(&yaml).await;
    let mut session = milter.session(CLIENT).await;
    let d = session
        .message(
            None,
            &[
                &["<zed@split.test>"],
                &["<bob@split.test>"],
                // Looked up as accounts are: the base before the
                // delimiter counts, the case of the local part folds.
                &["<BOB+lists@split.test>"],
                &["<alice@split.test>"],
            ],
            &[],
        )
        .await;
    assert_rejected(&d.rcpt[0], "550 5.1.1");
    assert!(protocol::rejection(&d.rcpt[0]).contains("unknown at the destination of split.test"));
    assert_eq!(
        d.rcpt[1..],
        [Status::Continue, Status::Continue, Status::Continue]
    );
    assert!(
        protocol::deleted(&d.actions).contains("<bob@split.test>"),
        "{:?}",
        d.actions
    );
    assert!(
        stub.rcpts().is_empty(),
        "the destination was asked: {:?}",
        stub.rcpts()
    );
    let metrics = milter.metrics();
    for line in [
        "dualroute_callouts_total{domain=\"split.test\",result=\"not_listed\"} 1",
        "dualroute_callouts_total{domain=\"split.test\",result=\"listed\"} 2",
    ] {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }
    session.close().await;
    milter.shutdown().await;

    // explain says the same, from the list.
    let config = state.path().join("milter.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let out = dualroute(&config, &["explain", "zed@split.test", "bob@split.test"]);
    assert!(
        out.contains("reject_unknown: address list for <zed@split.test>: unknown (not in the destination's address list (2 addresses)): refused at RCPT with 550 5.1.1"),
        "{out}"
    );
    assert!(
        out.contains("reject_unknown: address list for <bob@split.test>: known (in the destination's address list (2 addresses)): routed"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_list_and_callouts_the_listed_are_not_asked_and_the_others_are() {
    let stub = CalloutStub::start(&["bob@split.test", "carol@split.test"], Mode::Directory);
    let state = tempfile::tempdir().unwrap();
    let yaml = list_config(
        state.path(),
        &stub.host(),
        "{ callout: true, accounts: [ { list: [bob@split.test] } ] }",
    );
    let milter = Milter::start(&yaml).await;
    let mut session = milter.session(CLIENT).await;
    let d = session
        .message(
            None,
            &[
                &["<bob@split.test>"],
                &["<carol@split.test>"],
                &["<zed@split.test>"],
            ],
            &[],
        )
        .await;
    // bob from the list; carol, created since the list was exported, and
    // zed from a callout.
    assert_eq!(d.rcpt[..2], [Status::Continue, Status::Continue]);
    assert_rejected(&d.rcpt[2], "550 5.1.1");
    assert_eq!(
        (
            stub.asked("bob@split.test"),
            stub.asked("carol@split.test"),
            stub.asked("zed@split.test")
        ),
        (0, 1, 1),
        "{:?}",
        stub.rcpts()
    );
    session.close().await;
    milter.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_callout_asks_the_destination_now_and_caches_nothing() {
    let stub = CalloutStub::start(&["bob@split.test"], Mode::Directory);
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("milter.yaml");
    std::fs::write(&config, milter_config(state.path(), &stub.host(), "", "")).unwrap();
    let out = dualroute(
        &config,
        &[
            "explain",
            "--callout",
            "bob@split.test",
            "zed@split.test",
            "alice@split.test",
        ],
    );
    assert!(
        out.contains("reject_unknown: live callout for <bob@split.test>: known (250"),
        "{out}"
    );
    assert!(out.contains("): routed"), "{out}");
    assert!(
        out.contains("reject_unknown: live callout for <zed@split.test>: unknown (550")
            && out.contains("refused at RCPT with 550 5.1.1"),
        "{out}"
    );
    // alice has a mailbox here: nothing to ask, and explain says so.
    assert!(out.contains("no callout: the milter asks"), "{out}");
    // bob, zed, and a random local part after bob's 250 (accept-all).
    assert_eq!(
        (stub.asked("bob@split.test"), stub.asked("zed@split.test")),
        (1, 1),
        "{:?}",
        stub.rcpts()
    );
    assert_eq!(stub.rcpts().len(), 3, "{:?}", stub.rcpts());
    assert!(
        !state.path().join("split.test.callouts").exists(),
        "explain --callout wrote the milter's cache"
    );
    // A destination that takes anything: the line says `known` proves
    // nothing.
    stub.set_mode(Mode::AcceptAll);
    let out = dualroute(&config, &["explain", "--callout", "nobody@split.test"]);
    assert!(
        out.contains("WARNING: the destination accepts any address"),
        "{out}"
    );
    // Down: what the milter does then (`unreachable: tempfail`).
    drop(stub);
    let out = dualroute(&config, &["explain", "--callout", "zed@split.test"]);
    assert!(
        out.contains("live callout for <zed@split.test>: unreachable") && out.contains("451 4.4.3"),
        "{out}"
    );
}

/// The destination's list is guarded as accounts are: a truncated export
/// is refused by a reload (the running list stays in force, `status`
/// says so), and `confirm-accounts` takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrunk_destination_list_is_refused_until_confirmed() {
    let stub = CalloutStub::start(&[], Mode::Directory);
    let state = tempfile::tempdir().unwrap();
    let list = state.path().join("there.txt");
    let names = |n: usize| {
        (0..n)
            .map(|i| format!("user{i}@split.test\n"))
            .collect::<String>()
    };
    std::fs::write(&list, names(10)).unwrap();
    let config = state.path().join("milter.yaml");
    std::fs::write(
        &config,
        list_config(
            state.path(),
            &stub.host(),
            &format!("{{ accounts: [ {{ file: {} }} ] }}", list.display()),
        ),
    )
    .unwrap();
    let intervals = dualroute::Intervals {
        state: Duration::from_millis(50),
        accounts: Duration::from_secs(3600),
        verify: Duration::from_secs(3600),
    };
    let milter = Milter::serve(protocol::start_at(&config, intervals)).await;
    let outcome = |rcpt: &'static str| {
        let milter = &milter;
        async move {
            let d = milter.deliver(CLIENT, None, &[&[rcpt]]).await;
            match &d.rcpt[0] {
                Status::Reject { message: Some(m) } => m.to_string_lossy().into_owned(),
                Status::Continue => "accepted".to_owned(),
                other => format!("{other:?}"),
            }
        }
    };
    assert_eq!(outcome("<user7@split.test>").await, "accepted");

    // Emptied: refused as an emptied account source is.
    std::fs::write(&list, "").unwrap();
    let e = milter.reload().await.unwrap_err().to_string();
    assert!(e.contains("there.txt"), "{e}");
    // Truncated to 3 of 10: refused by the shrink guard.
    std::fs::write(&list, names(3)).unwrap();
    let e = milter.reload().await.unwrap_err().to_string();
    assert!(
        e.contains("the destination's address list of split.test (reject_unknown.accounts) would go from 10 to 3 addresses")
            && e.contains("dualroute confirm-accounts split.test"),
        "{e}"
    );
    // The running list stays: user7 is still accepted.
    assert_eq!(outcome("<user7@split.test>").await, "accepted");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("DESTINATION LIST HELD since") && said.contains("from 10 to 3 addresses"),
        "{said}"
    );
    let said = dualroute(&config, &["confirm-accounts", "split.test"]);
    assert!(
        said.contains("the new destination address list (reject_unknown.accounts) (3 addresses, was 10) is confirmed"),
        "{said}"
    );
    // The milter sees the confirmation and reloads: user7 is refused now.
    let start = Instant::now();
    loop {
        let got = outcome("<user7@split.test>").await;
        if got.starts_with("550 5.1.1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the confirmed list was not taken: {got}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(outcome("<user2@split.test>").await, "accepted");
    assert!(stub.rcpts().is_empty(), "{:?}", stub.rcpts());
    milter.shutdown().await;
}

/// A destination that takes any address makes the callout useless:
/// `status` and `check` say so from the cache the milter wrote, and the
/// metric shows it (DESIGN.md §10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_all_destination_is_flagged_in_status_check_and_metrics() {
    let stub = CalloutStub::start(&[], Mode::AcceptAll);
    let state = tempfile::tempdir().unwrap();
    let yaml = milter_config(state.path(), &stub.host(), "", "");
    let config = state.path().join("milter.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let milter = Milter::start(&yaml).await;
    let d = milter.deliver(CLIENT, None, &[&["<zed@split.test>"]]).await;
    assert_eq!(d.rcpt, [Status::Continue]);
    // The random local part is asked after the answer, in the background.
    until(
        || {
            std::fs::read_to_string(state.path().join("split.test.callouts"))
                .is_ok_and(|t| t.contains("accepts: true"))
        },
        "the accept-all answer in the cache",
    )
    .await;
    let d = milter.deliver(CLIENT, None, &[&["<yan@split.test>"]]).await;
    assert_eq!(d.rcpt, [Status::Continue]);
    let metrics = milter.metrics();
    assert!(
        metrics.contains("dualroute_callout_accept_all{domain=\"split.test\"} 1"),
        "{metrics}"
    );
    milter.shutdown().await;
    for command in ["status", "check"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dualroute"))
            .arg("--config")
            .arg(&config)
            .arg(command)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("reject_unknown callouts: 2 known and 0 unknown addresses cached; WARNING: the destination accepts any address"),
            "{command}: {said}"
        );
    }
    // A destination that refuses: no warning.
    let stub = CalloutStub::start(&[], Mode::Directory);
    let yaml = milter_config(state.path(), &stub.host(), "", "");
    std::fs::write(&config, &yaml).unwrap();
    let milter = Milter::start(&yaml).await;
    let d = milter.deliver(CLIENT, None, &[&["<zed@split.test>"]]).await;
    assert_rejected(&d.rcpt[0], "550 5.1.1");
    milter.shutdown().await;
    let said = dualroute(&config, &["check"]);
    assert!(
        said.contains("reject_unknown callouts: 0 known and 1 unknown addresses cached; the destination refuses unknown addresses"),
        "{said}"
    );
}
