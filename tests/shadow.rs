//! Shadow mode and the metrics endpoint at the protocol level: the same
//! messages through a live and a shadow service (the whole service,
//! driven by indymilter-test as Postfix drives it). Shadow mode must send
//! no action and refuse nothing, and its metrics must count the same
//! decisions live mode makes; docs/rollout.md's table and alert rules
//! name what the endpoint serves. The end-to-end run in real Postfix is
//! in tests/postfix_e2e.rs.

mod support;
use support::metrics::{get, scrape, with_metrics, Scrape};
use support::protocol::*;

use indymilter_test::{EomAction, Status};
use std::path::Path;

const INSTANCE: &str = "shadow.test";

/// A split domain with a per-user copy, a dual domain, metrics on `port`;
/// `shadow` is the global `shadow:` and `org_shadow` example.org's own.
fn config(state: &Path, port: u16, shadow: bool, org_shadow: Option<bool>) -> String {
    format!(
        r#"instance: {INSTANCE}
state_dir: {state}
shadow: {shadow}
metrics: {{ listen: "127.0.0.1:{port}" }}
# The verification probe asks nothing beyond loopback.
dns: {{ nameservers: ["127.0.0.1:9"] }}
domains:
  example.com:
    mode: split
    destination: {{ hosts: ["[192.0.2.30]:2525"] }}
    accounts: [{{ list: [alice@example.com] }}]
    users:
      carol@example.com: {{ copy_to: [carol@zoho.example.net] }}
  example.org:
    mode: dual
    destination: {{ domain: example.org.test-google-a.com, change_envelope: true }}
    accounts: [{{ list: [frank@example.org] }}]
{org}"#,
        state = state.display(),
        org = org_shadow
            .map(|s| format!("    shadow: {s}\n"))
            .unwrap_or_default()
    )
}

/// What the milter did with the test's messages.
struct Run {
    deliveries: Vec<Delivery>,
    metrics: Scrape,
}

/// The test's messages through a service on `yaml`: one with a recipient
/// of each kind (and one of a domain not managed), one that carries our
/// own loop header, and one whose only recipient is refused.
async fn run(yaml: impl Fn(u16) -> String) -> Run {
    let (milter, addr) = with_metrics(|port| Milter::serve(start(&yaml(port)))).await;
    let mut deliveries = Vec::new();
    deliveries.push(
        milter
            .deliver(
                CLIENT,
                None,
                &[
                    &["<alice@example.com>"],
                    &["<zed@example.com>"],
                    &["<carol@example.com>"],
                    &["<frank@example.org>"],
                    &["<ghost@example.org>"],
                    &["<bob@elsewhere.test>"],
                ],
            )
            .await,
    );
    let mut session = milter.session(CLIENT).await;
    deliveries.push(
        session
            .message(None, &[&["<zed@example.com>"]], &[(LOOP_HEADER, INSTANCE)])
            .await,
    );
    session.close().await;
    // An MTA sends no DATA when every RCPT was refused; the milter then
    // sees an abort.
    let mut session = milter.session(CLIENT).await;
    session.mail(None).await;
    let status = session.rcpt(&["<nobody@example.org>"]).await;
    if status == Status::Continue {
        session.data(&[]).await;
        let (actions, eom) = session.eom().await;
        deliveries.push(Delivery {
            rcpt: vec![status],
            actions,
            eom,
        });
    } else {
        session.abort().await;
        deliveries.push(Delivery {
            rcpt: vec![status],
            actions: Vec::new(),
            eom: Status::Continue,
        });
    }
    session.close().await;
    let metrics = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .expect("scrape");
    milter.shutdown().await;
    Run {
        deliveries,
        metrics,
    }
}

/// decisions_total by (domain, kind) for one value of the shadow label.
fn decisions(s: &Scrape, shadow: &str) -> Vec<(String, String, f64)> {
    let mut found = Vec::new();
    for domain in ["example.com", "example.org"] {
        for kind in ["keep", "copy", "redirect", "reject", "tempfail", "loop"] {
            let n = s.count(
                "dualroute_decisions_total",
                &[("domain", domain), ("kind", kind), ("shadow", shadow)],
            );
            found.push((domain.to_owned(), kind.to_owned(), n));
        }
    }
    found
}

fn expected_decisions() -> Vec<(String, String, f64)> {
    let n = |d: &str, k: &str, v: f64| (d.to_owned(), k.to_owned(), v);
    vec![
        n("example.com", "keep", 1.0),
        n("example.com", "copy", 1.0),
        n("example.com", "redirect", 1.0),
        n("example.com", "reject", 0.0),
        n("example.com", "tempfail", 0.0),
        n("example.com", "loop", 1.0),
        n("example.org", "keep", 0.0),
        n("example.org", "copy", 1.0),
        n("example.org", "redirect", 0.0),
        n("example.org", "reject", 2.0),
        n("example.org", "tempfail", 0.0),
        n("example.org", "loop", 0.0),
    ]
}

#[tokio::test]
async fn shadow_changes_nothing_and_counts_what_live_mode_does() {
    let state = tempfile::tempdir().expect("temporary directory");
    let live = run(|port| config(state.path(), port, false, None)).await;
    let shadow = run(|port| config(state.path(), port, true, None)).await;

    // Live mode routes, refuses the unknown dual recipient and the looping
    // redirect.
    let first = &live.deliveries[0];
    assert!(matches!(first.rcpt[4], Status::Reject { .. }), "{first:?}");
    assert!(!first.actions.is_empty(), "{first:?}");
    assert!(
        matches!(live.deliveries[1].eom, Status::Reject { .. }),
        "{:?}",
        live.deliveries[1]
    );
    assert!(matches!(live.deliveries[2].rcpt[0], Status::Reject { .. }));

    // Shadow mode: every RCPT and every message continues, and no action
    // at all reaches the MTA.
    for d in &shadow.deliveries {
        assert!(
            d.rcpt.iter().all(|s| *s == Status::Continue),
            "shadow mode refused a recipient: {d:?}"
        );
        assert_eq!(d.eom, Status::Continue, "{d:?}");
        assert_actions(&d.actions, &[]);
    }

    // The same decisions, counted under shadow="true".
    assert_eq!(decisions(&live.metrics, "false"), expected_decisions());
    assert_eq!(decisions(&shadow.metrics, "true"), expected_decisions());
    assert!(decisions(&live.metrics, "true").iter().all(|d| d.2 == 0.0));
    assert!(decisions(&shadow.metrics, "false")
        .iter()
        .all(|d| d.2 == 0.0));
    // A domain dualroute does not manage is not counted.
    assert!(
        !live.metrics.text.contains("elsewhere.test"),
        "{}",
        live.metrics.text
    );
    // Three conversations each; messages timed: live mode's third never
    // reached end of message, shadow mode's did.
    for (run, messages) in [(&live, 2.0), (&shadow, 3.0)] {
        assert_eq!(run.metrics.count("dualroute_conversations_total", &[]), 3.0);
        assert_eq!(
            run.metrics.count("dualroute_milter_seconds_count", &[]),
            messages,
            "{}",
            run.metrics.text
        );
    }
    for (run, on) in [(&live, "0"), (&shadow, "1")] {
        assert_eq!(
            run.metrics
                .value("dualroute_shadow", &[("domain", "example.com")]),
            Some(on.parse().expect("a number")),
            "{}",
            run.metrics.text
        );
    }
}

/// A domain's own `shadow: false` beats the global `shadow: true`: in one
/// message, the live domain's recipient is copied and marked, the shadowed
/// domain's recipient is left alone.
#[tokio::test]
async fn a_domain_can_be_live_while_the_rest_is_in_shadow_mode() {
    let state = tempfile::tempdir().expect("temporary directory");
    let (milter, _) =
        with_metrics(|port| Milter::serve(start(&config(state.path(), port, true, Some(false)))))
            .await;
    let d = milter
        .deliver(
            CLIENT,
            None,
            &[&["<zed@example.com>"], &["<frank@example.org>"]],
        )
        .await;
    assert_eq!(d.rcpt, [Status::Continue, Status::Continue]);
    assert_actions(
        &d.actions,
        &[
            add(
                "<frank@example.org.test-google-a.com>",
                "ORCPT=rfc822;frank@example.org NOTIFY=NEVER",
            ),
            header(INSTANCE),
        ],
    );
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, EomAction::DeleteRecipient { .. })),
        "{d:?}"
    );
    // Refused in live mode, accepted in shadow mode.
    let refused = milter
        .deliver(CLIENT, None, &[&["<ghost@example.org>"]])
        .await;
    assert!(matches!(refused.rcpt[0], Status::Reject { .. }));
    milter.shutdown().await;
}

/// The endpoint: OpenMetrics text on GET /metrics, 404 elsewhere, the
/// state of each domain read from the service, and the result of each
/// reload.
/// 64 idle connections (a port scan, a stuck scraper) made `/metrics`
/// time out for as long as they stayed open (8 did not), issue 25.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_block_a_scrape() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (milter, addr) = with_metrics(|port| {
        Milter::serve(start(&config(&dir.path().join("state"), port, false, None)))
    })
    .await;
    let idle: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    let started = std::time::Instant::now();
    let s = tokio::task::spawn_blocking(move || get(addr, "/metrics"))
        .await
        .expect("scrape with 64 idle connections open");
    assert!(s.status.contains(" 200 "), "{s:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    drop(idle);
    milter.shutdown().await;
}

#[tokio::test]
async fn metrics_endpoint_shows_state_and_reloads() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("milter.yaml");
    let (milter, addr) = with_metrics(|port| {
        let yaml = config(&dir.path().join("state"), port, false, None).replace(
            "example.org:\n",
            "example.org:\n    verify: postmaster@example.org\n",
        );
        std::fs::write(&path, &yaml).expect("write milter.yaml");
        Milter::serve(start_at(&path, Default::default()))
    })
    .await;
    let fetch = |path: &'static str| tokio::task::spawn_blocking(move || get(addr, path));

    let s = fetch("/metrics").await.expect("scrape");
    assert!(s.status.contains(" 200 "), "{s:?}");
    assert!(
        s.content_type.starts_with("application/openmetrics-text"),
        "{s:?}"
    );
    assert!(s.text.trim_end().ends_with("# EOF"), "{}", s.text);
    let one = |name: &str, domain: &str| s.value(name, &[("domain", domain)]);
    assert_eq!(one("dualroute_accounts", "example.com"), Some(1.0));
    assert_eq!(one("dualroute_routing_on", "example.com"), Some(1.0));
    assert_eq!(one("dualroute_breaker_tripped", "example.com"), Some(0.0));
    // example.org waits for its destination to pass verification.
    assert_eq!(one("dualroute_routing_on", "example.org"), Some(0.0));
    assert_eq!(
        one("dualroute_verification_waiting", "example.org"),
        Some(1.0)
    );
    assert_eq!(
        one("dualroute_verification_waiting", "example.com"),
        Some(0.0)
    );
    let missing = fetch("/").await.expect("GET /");
    assert!(missing.status.contains(" 404 "), "{missing:?}");

    // A good reload, then one of an invalid file.
    milter.sighup().await;
    let reloads = |result: &'static str| async move {
        let s = fetch("/metrics").await.expect("scrape");
        (s.count("dualroute_reloads_total", &[("result", result)]) == 1.0).then_some(())
    };
    support::wait_until("a reload counted as ok", || reloads("ok")).await;
    std::fs::write(&path, "domains: [").expect("write an invalid milter.yaml");
    milter.sighup().await;
    support::wait_until("a reload counted as invalid", || reloads("invalid")).await;
    milter.shutdown().await;
}

/// `status` and `explain` say that a domain is in shadow mode, and
/// explain says what the milter would do.
#[test]
fn status_and_explain_show_shadow_mode() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("milter.yaml");
    let yaml = config(&dir.path().join("state"), 9899, true, Some(false));
    std::fs::write(&path, yaml).expect("write milter.yaml");
    support::pretend_running(&path);
    let (ok, out) = support::dualroute(&path, &["status"]);
    assert!(ok.success(), "{out}");
    assert!(
        out.contains("example.com: mode split: SHADOW (decisions are logged and counted, nothing is changed) active"),
        "{out}"
    );
    assert!(out.contains("example.org: mode dual: active"), "{out}");
    let (ok, out) = support::dualroute(&path, &["explain", "zed@example.com", "ghost@example.org"]);
    assert!(ok.success(), "{out}");
    assert!(
        out.contains("zed@example.com: shadow mode: would redirect to zed@example.com.dualroute.invalid — mode split, no account here; nothing is changed"),
        "{out}"
    );
    assert!(out.contains("ghost@example.org: reject 550 5.1.1"), "{out}");
}

/// docs/rollout.md's table of metrics is what the endpoint serves (each
/// family, with its type), and every `dualroute_…` name in its alert
/// rules is a series the endpoint serves: an administrator copies those
/// rules as they are. A family with labels shows only once it has a
/// sample, so every hook counts once first.
#[test]
fn rollout_md_names_the_metrics_the_endpoint_serves() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let policy = policy(&config(&dir.path().join("state"), 9, false, None));
    let m = dualroute::metrics::Metrics::new();
    m.decision("example.com", dualroute::metrics::Kind::Keep, false);
    m.conversation();
    m.error("eom_actions");
    m.reload("ok");
    m.probe("example.com", true);
    m.breaker_failure("example.com", "bounce");
    m.breaker_ignored("example.com", "user_unknown");
    m.breaker_source("journal", true);
    m.message_time(std::time::Duration::from_millis(1));
    // A callout and a cached answer (issue 23): callouts, cache hits and
    // the accept-all gauge.
    for origin in [
        dualroute::callout::Origin::Callout,
        dualroute::callout::Origin::Cache,
    ] {
        m.callout(
            "example.com",
            &dualroute::callout::Answer {
                verdict: dualroute::callout::Verdict::Unknown,
                reply: "550 5.1.1 no such user".into(),
                origin,
                at: 0,
                accept_all: false,
            },
        );
    }
    let s = m.render(&policy, &dualroute::holds::Holds::default());

    // Served: family → type, and the series names each family gives.
    let mut served = std::collections::BTreeMap::new();
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            served.insert(name.to_owned(), kind.to_owned());
        }
    }
    let series = |family: &str, kind: &str| -> Vec<String> {
        match kind {
            "counter" => vec![format!("{family}_total"), format!("{family}_created")],
            "histogram" => ["_bucket", "_sum", "_count", "_created"]
                .iter()
                .map(|s| format!("{family}{s}"))
                .collect(),
            _ => vec![family.to_owned()],
        }
    };

    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/rollout.md"))
        .expect("docs/rollout.md");
    // The table: | `name` | type | labels | what |
    let mut documented = std::collections::BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [_, name, kind, ..] = cells[..] {
            if let Some(name) = name
                .strip_prefix("`dualroute_")
                .and_then(|n| n.strip_suffix('`'))
            {
                let family = format!("dualroute_{name}");
                let family = match kind {
                    "counter" => family
                        .strip_suffix("_total")
                        .unwrap_or_else(|| panic!("{family}: a counter is written with _total"))
                        .to_owned(),
                    _ => family,
                };
                documented.insert(family, kind.to_owned());
            }
        }
    }
    assert_eq!(
        documented, served,
        "docs/rollout.md's table (left) against the endpoint (right)"
    );

    // The alert rules: the YAML block after "## Alert rules".
    let rules = doc
        .split_once("## Alert rules")
        .and_then(|(_, rest)| rest.split_once("```yaml\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("an alert rules block in docs/rollout.md");
    let rules: serde_yaml::Value = serde_yaml::from_str(rules).expect("the alert rules are YAML");
    let all: Vec<String> = served.iter().flat_map(|(f, k)| series(f, k)).collect();
    let mut exprs = 0;
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr");
            exprs += 1;
            let names = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("dualroute_"));
            for name in names {
                assert!(
                    all.iter().any(|s| s == name),
                    "alert {:?}: {name} is not served (served: {all:?})",
                    rule["alert"]
                );
            }
        }
    }
    assert!(exprs >= 7, "only {exprs} alert rules found");
}
