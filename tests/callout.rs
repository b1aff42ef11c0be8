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
