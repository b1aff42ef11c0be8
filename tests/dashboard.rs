//! The Grafana dashboard (packaging/grafana/dualroute.json, installed as
//! /usr/share/dualroute/grafana/dualroute.json; docs/rollout.md
//! "Dashboard") queries only what the metrics endpoint serves: every
//! metric name in every PromQL expression of its panels and variables is
//! a series a real milter's `/metrics` declares (`# TYPE`), and every
//! label the dashboard selects on or groups by is one that series
//! carries. A renamed metric or label makes a panel silently empty in
//! Grafana; here it fails.
//!
//! The milter runs the whole service (tests/support/protocol.rs) with
//! metrics on loopback, and the test makes a sample of every labelled
//! family the dashboard queries (a decision, a reload, a callout and a
//! cache hit, a verification probe, breaker lines in its maillog, a
//! malformed connection): a family without samples shows no label names
//! to check against.

#[path = "support/callout_stub.rs"]
mod callout_stub;
mod support;

use callout_stub::{CalloutStub, Mode};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;
use support::metrics::{scrape, with_metrics};
use support::protocol::{Milter, CLIENT};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/grafana/dualroute.json"
);

/// Labels Prometheus adds to every series it scrapes (the target's).
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// PromQL's functions and aggregation operators (Prometheus 2.x
/// "Functions" and "Operators"): an identifier followed by `(` must be
/// one of them.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "count_values",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "group",
    "histogram_quantile",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "minute",
    "month",
    "predict_linear",
    "present_over_time",
    "quantile",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev",
    "stddev_over_time",
    "stdvar",
    "stdvar_over_time",
    "sum",
    "sum_over_time",
    "time",
    "timestamp",
    "topk",
    "vector",
    "year",
];

/// Keywords followed by a list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other keywords (binary operators and modifiers).
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

/// What one PromQL expression queries.
#[derive(Debug, Default, PartialEq)]
struct Query {
    /// Each metric name with the label names its selector matches on.
    selectors: Vec<(String, BTreeSet<String>)>,
    /// Label names in `by (…)`, `without (…)`, `on (…)` and the like:
    /// each must be on every series the expression queries.
    grouping: BTreeSet<String>,
}

/// Reads the metric names and label names of a PromQL expression. Grafana
/// variables (`$domain`, `${x}`, `$__rate_interval`) are skipped; so are
/// strings, numbers and durations.
fn parse_promql(expr: &str) -> Result<Query, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut q = Query::default();
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_space = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let read_ident = |mut i: usize| {
        let start = i;
        while i < chars.len() && ident_char(chars[i]) {
            i += 1;
        }
        (chars[start..i].iter().collect::<String>(), i)
    };
    let skip_string = |i: usize| -> Result<usize, String> {
        let quote = chars[i];
        let mut j = i + 1;
        while j < chars.len() && chars[j] != quote {
            j += if chars[j] == '\\' { 2 } else { 1 };
        }
        if j >= chars.len() {
            return Err(format!("unterminated string in {expr:?}"));
        }
        Ok(j + 1)
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            i = skip_string(i)?;
        } else if c == '$' {
            // A Grafana variable: $name or ${name}.
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                i = read_ident(i).1;
            }
        } else if c == '[' {
            // A range or subquery: durations and variables only.
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (1e3, 0.99, 5m).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '{' {
            return Err(format!(
                "a selector without a metric name in {expr:?}: the test cannot check it"
            ));
        } else if ident_start(c) {
            let (word, end) = read_ident(i);
            let next = skip_space(end);
            let lower = word.to_ascii_lowercase();
            if GROUPING.contains(&lower.as_str()) {
                i = next;
                if chars.get(i) == Some(&'(') {
                    let close = (i..chars.len())
                        .find(|&j| chars[j] == ')')
                        .ok_or_else(|| format!("unclosed {word} (…) in {expr:?}"))?;
                    let list: String = chars[i + 1..close].iter().collect();
                    for label in list.split(',').map(str::trim).filter(|l| !l.is_empty()) {
                        q.grouping.insert(label.to_owned());
                    }
                    i = close + 1;
                }
            } else if KEYWORDS.contains(&lower.as_str()) {
                i = end;
            } else if chars.get(next) == Some(&'(')
                || (FUNCTIONS.contains(&word.as_str())
                    && GROUPING[..2].contains(&read_ident(next).0.as_str()))
            {
                if !FUNCTIONS.contains(&word.as_str()) {
                    return Err(format!("{word}( in {expr:?} is not a PromQL function"));
                }
                i = next;
            } else {
                // A metric name, with its selector's matchers if any.
                let mut labels = BTreeSet::new();
                i = end;
                if chars.get(next) == Some(&'{') {
                    i = next + 1;
                    loop {
                        i = skip_space(i);
                        match chars.get(i) {
                            None => return Err(format!("unclosed selector in {expr:?}")),
                            Some('}') => {
                                i += 1;
                                break;
                            }
                            Some(',') => i += 1,
                            Some(&c) if ident_start(c) => {
                                let (label, end) = read_ident(i);
                                labels.insert(label);
                                // The operator, then the quoted value.
                                i = skip_space(end);
                                while i < chars.len() && "=!~".contains(chars[i]) {
                                    i += 1;
                                }
                                i = skip_space(i);
                                if !matches!(chars.get(i), Some('"' | '\'' | '`')) {
                                    return Err(format!(
                                        "label {:?} in {expr:?}: expected a quoted value",
                                        labels.last()
                                    ));
                                }
                                i = skip_string(i)?;
                            }
                            Some(other) => {
                                return Err(format!(
                                    "unexpected {other:?} in a selector of {expr:?}"
                                ))
                            }
                        }
                    }
                }
                q.selectors.push((word, labels));
            }
        } else {
            // Operators, parentheses, commas.
            i += 1;
        }
    }
    Ok(q)
}

/// Grafana's `label_values(selector, label)` (a template variable's
/// query) as the selector's [`Query`], the label as its grouping.
fn parse_label_values(query: &str) -> Result<Query, String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .ok_or_else(|| format!("variable query {query:?}: expected label_values(…, label)"))?;
    let (selector, label) = inner
        .rsplit_once(',')
        .ok_or_else(|| format!("variable query {query:?}: expected label_values(…, label)"))?;
    let mut q = parse_promql(selector)?;
    q.grouping.insert(label.trim().to_owned());
    Ok(q)
}

/// Every query of the dashboard: (where, the query).
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, Query)> {
    let mut found = Vec::new();
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    let mut todo: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels in the dashboard")
        .iter()
        .collect();
    while let Some(p) = todo.pop() {
        if let Some(inner) = p["panels"].as_array() {
            todo.extend(inner);
        }
        panels.push(p);
    }
    for p in panels {
        let title = p["title"].as_str().unwrap_or("(no title)");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr: {t}"));
            let q = parse_promql(expr).unwrap_or_else(|e| panic!("panel {title:?}: {e}"));
            found.push((format!("panel {title:?}: {expr}"), q));
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = v["name"].as_str().unwrap_or("(no name)");
        if v["type"] != "query" {
            continue;
        }
        let query = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .unwrap_or_else(|| panic!("variable {name}: no query: {v}"));
        let q = parse_label_values(query).unwrap_or_else(|e| panic!("variable {name}: {e}"));
        found.push((format!("variable ${name}: {query}"), q));
    }
    found
}

/// What the endpoint serves: each `# TYPE` family with its type, and the
/// label names of each sample name.
struct Served {
    types: BTreeMap<String, String>,
    labels: BTreeMap<String, BTreeSet<String>>,
}

impl Served {
    fn parse(text: &str) -> Served {
        let mut types = BTreeMap::new();
        let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    types.insert(name.to_owned(), kind.to_owned());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
                let (name, inner) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.strip_suffix('}').unwrap_or(rest)),
                    None => (series, ""),
                };
                labels
                    .entry(name.to_owned())
                    .or_default()
                    .extend(label_names(inner));
            }
        }
        Served { types, labels }
    }

    /// Whether `name` is a series of a declared family: the family
    /// itself, a counter's `_total`, a histogram's `_bucket`, `_sum` or
    /// `_count` (OpenMetrics declares the family without the suffix).
    fn declares(&self, name: &str) -> Result<(), String> {
        if self.types.contains_key(name) {
            return Ok(());
        }
        let family = |suffix: &str, kind: &str| {
            name.strip_suffix(suffix)
                .is_some_and(|base| self.types.get(base).is_some_and(|t| t == kind))
        };
        if family("_total", "counter")
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| family(s, "histogram"))
        {
            return Ok(());
        }
        Err(format!("{name} is not served (no # TYPE for it)"))
    }
}

/// The label names of a sample's `name="value",…` (values quoted, with
/// backslash escapes).
fn label_names(mut inner: &str) -> Vec<String> {
    let mut names = Vec::new();
    while let Some((name, rest)) = inner.split_once("=\"") {
        names.push(name.trim_start_matches(',').trim().to_owned());
        let mut escaped = false;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                let close = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                close
            })
            .map_or(rest.len(), |(at, _)| at + 1);
        inner = &rest[end..];
    }
    names
}

/// Every problem of the dashboard's queries against the scrape `text`.
fn problems(dashboard: &serde_json::Value, text: &str) -> Vec<String> {
    let served = Served::parse(text);
    let mut problems = Vec::new();
    let queries = dashboard_queries(dashboard);
    assert!(!queries.is_empty(), "the dashboard queries nothing");
    for (place, q) in &queries {
        if q.selectors.is_empty() {
            problems.push(format!("{place}: no metric in it"));
        }
        for (name, selected) in &q.selectors {
            if let Err(e) = served.declares(name) {
                problems.push(format!("{place}: {e}"));
                continue;
            }
            let Some(has) = served.labels.get(name) else {
                problems.push(format!(
                    "{place}: {name} has no sample in the test's scrape, so its labels cannot be checked: make one in traffic()"
                ));
                continue;
            };
            for label in selected.iter().chain(&q.grouping) {
                if !has.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!(
                        "{place}: {name} has no label {label:?} (it has {has:?})"
                    ));
                }
            }
        }
    }
    problems
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("packaging/grafana/dualroute.json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// A breaker line (Postfix's smtp client): the destination refused `zed`
/// with `dsn`, as tests/breaker.rs writes them.
fn bounce(qid: &str, dsn: &str, reply: &str) -> String {
    format!("Jan 12 10:00:11 mx postfix/smtp[1234]: {qid}: to=<zed@example.com.dualroute.invalid>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.05, delays=0.01/0.01/0.02/0.01, dsn={dsn}, status=bounced (host 127.0.0.1[127.0.0.1] said: {reply} (in reply to RCPT TO command))\n")
}

/// The milter with every family the dashboard shows: a split domain with
/// callouts to `stub`, a route domain that waits for verification, the
/// breaker on `maillog`.
fn config(state: &Path, maillog: &Path, stub: &str, port: u16) -> String {
    format!(
        r#"instance: dashboard.test
state_dir: {state}
metrics: {{ listen: "127.0.0.1:{port}" }}
dns: {{ nameservers: ["127.0.0.1:9"] }}
breaker: {{ maillog: {maillog}, threshold: 3, deferrals: 3, window: 1h }}
domains:
  example.com:
    mode: split
    destination: {{ hosts: ["{stub}"], reject_unknown: {{ callout: true }} }}
    accounts: [{{ list: [alice@example.com] }}]
  example.org:
    mode: route
    verify: postmaster@example.org
    destination: {{ hosts: ["{stub}"] }}
"#,
        state = state.display(),
        maillog = maillog.display(),
    )
}

/// Makes a sample of each labelled family: decisions, a callout and a
/// cache hit, breaker failures counted and ignored, a reload, a
/// malformed connection; waits for the verification probe.
async fn traffic(milter: &Milter, maillog: &Path) {
    let mut session = milter.session(CLIENT).await;
    for _ in 0..2 {
        // bob: a callout, then the cache; alice: a mailbox here.
        session
            .message(
                None,
                &[&["<alice@example.com>"], &["<bob@example.com>"]],
                &[],
            )
            .await;
    }
    session.close().await;
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(maillog)
        .expect("open the maillog");
    tokio::time::sleep(dualroute::breaker::POLL * 3).await;
    log.write_all(
        format!(
            "{}{}",
            bounce("4Bc1xY2z3Kz9x", "5.1.1", "550 5.1.1 <zed@example.com>: Recipient address rejected: User unknown in virtual mailbox table"),
            bounce("4Bc1xY2z3Kz9y", "5.7.1", "554 5.7.1 <zed@example.com>: Relay access denied"),
        )
        .as_bytes(),
    )
    .expect("append to the maillog");
    milter.reload().await.expect("reload");
    // Not the milter protocol: an HTTP request on the milter's port.
    let addr = milter.addr();
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect to the milter");
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = s.read(&mut [0u8; 64]);
    })
    .await
    .expect("malformed connection");
    for family in [
        "dualroute_breaker_failures_total{",
        "dualroute_breaker_ignored_total{",
        "dualroute_verification_probes_total{",
        "dualroute_callout_cache_hits_total{",
        "dualroute_errors_total{",
    ] {
        support::wait_until(&format!("a sample of {family}…}}"), || {
            let found = milter.metrics().contains(family);
            async move { found.then_some(()) }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_dashboard_queries_is_served() {
    let dashboard = dashboard();
    let stub = CalloutStub::start(
        &["bob@example.com", "postmaster@example.org"],
        Mode::Directory,
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    let maillog = dir.path().join("mail.log");
    std::fs::write(&maillog, "").expect("the maillog");
    let state = dir.path().join("state");
    let yaml = dir.path().join("milter.yaml");
    let (milter, addr) = with_metrics(|port| {
        std::fs::write(&yaml, config(&state, &maillog, &stub.host(), port))
            .expect("write milter.yaml");
        Milter::serve(support::protocol::start_at(&yaml, Default::default()))
    })
    .await;
    traffic(&milter, &maillog).await;
    let text = tokio::task::spawn_blocking(move || scrape(addr).text)
        .await
        .expect("scrape");
    milter.shutdown().await;

    let problems = problems(&dashboard, &text);
    assert!(
        problems.is_empty(),
        "packaging/grafana/dualroute.json queries what the endpoint does not serve:\n  {}\n\nThe endpoint served:\n{text}",
        problems.join("\n  ")
    );
}

/// The dashboard imports anywhere: its data source is the input
/// `DS_PROMETHEUS` that Grafana asks for at import, never a uid of the
/// machine it was made on.
#[test]
fn the_data_source_is_an_import_input() {
    let d = dashboard();
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    let text = std::fs::read_to_string(DASHBOARD).expect("dashboard");
    let uids: BTreeSet<&str> = text
        .match_indices("\"uid\": \"")
        .map(|(at, m)| {
            let rest = &text[at + m.len()..];
            &rest[..rest.find('"').unwrap_or(0)]
        })
        .collect();
    assert_eq!(
        uids,
        BTreeSet::from(["${DS_PROMETHEUS}", "dualroute"]),
        "data source uids (and the dashboard's own)"
    );
}

/// The tokenizer finds metric names and labels where PromQL has them,
/// and nothing in strings, ranges, numbers or Grafana variables.
#[test]
fn promql_names_and_labels_are_read() {
    let q = parse_promql(
        r#"histogram_quantile(0.99, sum by (le, domain) (rate(a_bucket{instance=~"$instance", kind!="x{y}"}[$__rate_interval]))) / on (domain) group_left b_total offset 5m > bool 1e3 and time() - c"#,
    )
    .expect("parses");
    let names: Vec<&str> = q.selectors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a_bucket", "b_total", "c"]);
    assert_eq!(
        q.selectors[0].1,
        BTreeSet::from(["instance".to_owned(), "kind".to_owned()])
    );
    assert_eq!(
        q.grouping,
        BTreeSet::from(["le".to_owned(), "domain".to_owned()])
    );
    assert!(parse_promql("rat(x[5m])").is_err(), "an unknown function");
    let v =
        parse_label_values(r#"label_values(d{instance=~"$instance"}, domain)"#).expect("parses");
    assert_eq!(v.selectors[0].0, "d");
    assert_eq!(v.grouping, BTreeSet::from(["domain".to_owned()]));
}

/// The check itself fails on a renamed metric, a label a family lacks,
/// and a family without samples.
#[test]
fn a_renamed_metric_or_label_is_reported() {
    let text = "# TYPE dualroute_decisions counter\ndualroute_decisions_total{domain=\"a\",kind=\"keep\",shadow=\"false\"} 1\n# TYPE dualroute_milter_seconds histogram\ndualroute_milter_seconds_bucket{le=\"0.1\"} 1\n# TYPE dualroute_shadow gauge\n";
    let dash =
        |expr: &str| serde_json::json!({"panels": [{"title": "t", "targets": [{"expr": expr}]}]});
    assert!(problems(
        &dash("sum by (domain) (rate(dualroute_decisions_total{kind=\"keep\"}[5m]))"),
        text
    )
    .is_empty());
    assert!(problems(
        &dash("histogram_quantile(0.9, sum by (le) (rate(dualroute_milter_seconds_bucket[5m])))"),
        text
    )
    .is_empty());
    for (expr, want) in [
        (
            "rate(dualroute_decision_total[5m])",
            "dualroute_decision_total is not served",
        ),
        (
            "rate(dualroute_decisions_total{result=\"x\"}[5m])",
            "no label \"result\"",
        ),
        (
            "sum by (reason) (rate(dualroute_decisions_total[5m]))",
            "no label \"reason\"",
        ),
        ("dualroute_shadow", "has no sample"),
        // A _total of a gauge, a _bucket of a counter: not series.
        ("dualroute_shadow_total", "is not served"),
        ("dualroute_decisions_bucket", "is not served"),
    ] {
        let found = problems(&dash(expr), text);
        assert!(found.iter().any(|p| p.contains(want)), "{expr}: {found:?}");
    }
}
