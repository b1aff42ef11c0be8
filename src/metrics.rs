//! The Prometheus/OpenMetrics endpoint (`metrics: { listen: … }`;
//! docs/rollout.md lists the metrics, what to watch and the alert rules).
//!
//! Two kinds of numbers:
//! - **counters**, incremented by small hooks in the shells: every
//!   decision of the milter (src/milter.rs), conversations and errors,
//!   reload results (src/service/actor.rs), verification probes
//!   (src/service/verify.rs), failures the bounce breaker counted or
//!   read and did not count (src/breaker/), and the histogram of milter
//!   time per message;
//! - **state**, read from the handles at each scrape rather than kept in
//!   step by hooks: account-set sizes from the policy in force, and trip,
//!   verification, routing and shadow state per domain from the holds in
//!   force. A scrape therefore shows exactly what the milter decides
//!   with, and a domain that a reload removed disappears from it.
//!
//! The endpoint is off unless configured, and never affects mail: a port
//! that cannot be bound is an ERROR in the log and the milter runs on
//! without metrics (Prometheus then shows the target down).

use crate::decision::Decision;
use crate::holds::{Hold, Holds, LiveHolds};
use crate::live::LivePolicy;
use crate::policy::Policy;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{exponential_buckets, Histogram},
};
use prometheus_client::registry::Registry;
use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use std::{convert::Infallible, fmt};

/// The OpenMetrics text format (prometheus-client writes it; Prometheus
/// asks for it first).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections open at once. A scraper needs one; a ninth connection
/// closes the oldest, which is the one most likely idle: 64 idle
/// connections (a port scan, stuck clients) that held the slots kept
/// every scrape waiting in the listen queue for as long as they stayed
/// open (issue 25).
const MAX_CONNECTIONS: usize = 8;

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the milter did with a recipient, as the `kind` label says it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Kind {
    Keep,
    Copy,
    Redirect,
    Reject,
    Tempfail,
    /// A copy or redirect not made because the message had already passed
    /// through this instance (docs/design.md, end of message).
    Loop,
}

impl Kind {
    pub fn of(decision: &Decision) -> Kind {
        match decision {
            Decision::Keep => Kind::Keep,
            Decision::Copy(_) => Kind::Copy,
            Decision::Redirect(_) => Kind::Redirect,
            Decision::Reject(_) => Kind::Reject,
            Decision::Tempfail(_) => Kind::Tempfail,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Keep => "keep",
            Kind::Copy => "copy",
            Kind::Redirect => "redirect",
            Kind::Reject => "reject",
            Kind::Tempfail => "tempfail",
            Kind::Loop => "loop",
        }
    }
}

/// One domain's decision counters: per [`Kind`], live and shadow.
type DecisionCounters = [OnceLock<Counter>; KINDS * 2];

/// How many [`Kind`]s there are.
const KINDS: usize = 6;
const _: () = assert!(Kind::Loop as usize + 1 == KINDS);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    domain: String,
    kind: &'static str,
    /// "true": decided in shadow mode, logged and counted, not carried out.
    shadow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabels {
    domain: String,
}

/// The breaker's source: `journal` or the log file's path.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainKindLabels {
    domain: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainResultLabels {
    domain: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainReasonLabels {
    domain: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

/// The service's metrics: one per running service (`run` makes it), so
/// that two services in one process (the tests) count apart.
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    /// The decision counters by domain, shared with `decisions` (a
    /// `Counter` is a handle): one FxHash lookup per recipient instead of
    /// the family's label hashing and a `String` per lookup. A counter is
    /// made on first use, as the family makes them.
    decision_counters: std::sync::RwLock<FxHashMap<String, DecisionCounters>>,
    conversations: Counter,
    errors: Family<ErrorLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    probes: Family<DomainResultLabels, Counter>,
    breaker_failures: Family<DomainKindLabels, Counter>,
    breaker_ignored: Family<DomainReasonLabels, Counter>,
    /// Whether the breaker reads its source (issue 25); set by the breaker,
    /// cleared when it stops.
    breaker_source: Family<SourceLabels, Gauge>,
    callouts: Family<DomainResultLabels, Counter>,
    callout_cache_hits: Family<DomainLabels, Counter>,
    callout_accept_all: Family<DomainLabels, Gauge>,
    milter_seconds: Histogram,
    accounts: Family<DomainLabels, Gauge>,
    routing: Family<DomainLabels, Gauge>,
    shadow: Family<DomainLabels, Gauge>,
    tripped: Family<DomainLabels, Gauge>,
    verifying: Family<DomainLabels, Gauge>,
    /// What waits in Postfix's queue because the milter did not route it
    /// (src/postfix/queue.rs; docs/postfix.md "Mail waiting in the queue").
    waiting_messages: Gauge,
    waiting_recipients: Gauge,
    /// The fleet (`cluster:`, src/cluster/): connected to Redis, nodes
    /// heard of, the last agreement (Unix seconds).
    cluster_connected: Gauge,
    cluster_nodes: Gauge,
    cluster_last_sync: Gauge,
    /// A scrape sets the state gauges and encodes them in one go.
    scrape: Mutex<()>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dualroute");
        let decisions = Family::default();
        registry.register(
            "decisions",
            "Recipients of managed domains by what was decided (keep, copy, redirect, reject, tempfail, loop); shadow=\"true\": decided in shadow mode and not carried out",
            decisions.clone(),
        );
        let conversations = Counter::default();
        registry.register(
            "conversations",
            "Milter conversations (the MTA opens one per SMTP session)",
            conversations.clone(),
        );
        let errors = Family::default();
        registry.register(
            "errors",
            "Errors by kind: eom_actions (the MTA did not take the end-of-message changes: message tempfailed), mta_offer (the MTA does not offer what routing needs), malformed_input (a connection sent what is not the milter protocol, or stalled in a packet or before negotiating: closed), connection_limit (a connection was accepted with connections.max open: further ones wait)",
            errors.clone(),
        );
        let reloads = Family::default();
        registry.register(
            "reloads",
            "Reloads by result: ok, invalid (the configuration or an account source did not load), refused (accounts_shrink_limit)",
            reloads.clone(),
        );
        let probes = Family::default();
        registry.register(
            "verification_probes",
            "Verification probes of the destination by domain and result (pass, fail)",
            probes.clone(),
        );
        let breaker_failures = Family::default();
        registry.register(
            "breaker_failures",
            "Delivery failures of routed mail the breaker counted, by domain and kind (bounce: permanent)",
            breaker_failures.clone(),
        );
        let breaker_ignored = Family::default();
        registry.register(
            "breaker_ignored",
            "Permanent failures of routed mail the breaker did not count, by domain and reason (user_unknown: the destination has no such mailbox, and nothing here says it should have; docs/design.md §7)",
            breaker_ignored.clone(),
        );
        let callouts = Family::default();
        registry.register(
            "callouts",
            "reject_unknown callouts at RCPT by domain and result: known, unknown (refused 550 5.1.1), unreachable (4xx, timeout, down), throttled (the destination's rate of new callouts reached), deadline (no answer in time; the callout goes on), listed and not_listed (answered by the destination's address list, reject_unknown.accounts: no callout); cached answers count in callout_cache_hits",
            callouts.clone(),
        );
        let breaker_source = Family::default();
        registry.register(
            "breaker_source_readable",
            "1 while the bounce breaker reads its source (breaker.maillog: the journal or the log file); 0 while it cannot, and sees no bounce and trips nothing",
            breaker_source.clone(),
        );
        let callout_cache_hits = Family::default();
        registry.register(
            "callout_cache_hits",
            "reject_unknown answers served from the callout cache, by domain",
            callout_cache_hits.clone(),
        );
        let callout_accept_all = Family::default();
        registry.register(
            "callout_accept_all",
            "1 when the domain's destination accepted a random local part the last time it was asked: it takes any address and reject_unknown protects nothing",
            callout_accept_all.clone(),
        );
        let milter_seconds = Histogram::new(exponential_buckets(0.000_05, 4.0, 10));
        registry.register(
            "milter_seconds",
            "Time spent in the milter per message (its callbacks from MAIL to end of message, without the time the MTA and the client take)",
            milter_seconds.clone(),
        );
        let accounts = Family::default();
        registry.register(
            "accounts",
            "Accounts of each managed domain in the policy in force (domains without accounts: none)",
            accounts.clone(),
        );
        let routing = Family::default();
        registry.register(
            "routing_on",
            "1 while routing for the domain is on; 0 while it is off (enabled: false, disabled, breaker trip, waiting for verification, unreadable state)",
            routing.clone(),
        );
        let shadow = Family::default();
        registry.register(
            "shadow",
            "1 while the domain runs in shadow mode (decisions logged and counted, nothing changed)",
            shadow.clone(),
        );
        let tripped = Family::default();
        registry.register(
            "breaker_tripped",
            "1 while the bounce breaker holds routing for the domain off",
            tripped.clone(),
        );
        let verifying = Family::default();
        registry.register(
            "verification_waiting",
            "1 while routing for the domain waits for its destination to pass verification",
            verifying.clone(),
        );
        let waiting_messages = Gauge::default();
        registry.register(
            "queue_waiting_messages",
            "Messages in Postfix's queue that the milter did not route and the wait transport holds (dualroute-wait): released by resubmitting them (docs/postfix.md); counted every 15 s with postqueue -j",
            waiting_messages.clone(),
        );
        let waiting_recipients = Gauge::default();
        registry.register(
            "queue_waiting_recipients",
            "Recipients of those messages",
            waiting_recipients.clone(),
        );
        let cluster_connected = Gauge::default();
        registry.register(
            "cluster_connected",
            "1 while this node reaches the fleet's Redis (cluster:); 0 while it serves on its last known state",
            cluster_connected.clone(),
        );
        let cluster_nodes = Gauge::default();
        registry.register(
            "cluster_nodes",
            "Nodes of the fleet heard of within cluster.silent_after, this one included",
            cluster_nodes.clone(),
        );
        let cluster_last_sync = Gauge::default();
        registry.register(
            "cluster_last_sync_timestamp_seconds",
            "When this node last agreed with the fleet's Redis (Unix seconds; 0: never)",
            cluster_last_sync.clone(),
        );
        Metrics {
            registry,
            decisions,
            decision_counters: Default::default(),
            conversations,
            errors,
            reloads,
            probes,
            breaker_failures,
            breaker_ignored,
            breaker_source,
            callouts,
            callout_cache_hits,
            callout_accept_all,
            milter_seconds,
            accounts,
            routing,
            shadow,
            tripped,
            verifying,
            waiting_messages,
            waiting_recipients,
            cluster_connected,
            cluster_nodes,
            cluster_last_sync,
            scrape: Mutex::new(()),
        }
    }

    /// What the last look at Postfix's queue found waiting.
    pub fn waiting(&self, w: crate::postfix::queue::Waiting) {
        let n = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
        self.waiting_messages.set(n(w.messages));
        self.waiting_recipients.set(n(w.recipients));
    }

    /// A `reject_unknown` answer for a recipient of `domain` (src/milter/callout.rs).
    pub fn callout(&self, domain: &str, answer: &crate::callout::Answer) {
        use crate::callout::{Origin, Verdict};
        let result = match (answer.origin, answer.verdict) {
            (Origin::Cache, _) => None,
            (Origin::List, Verdict::Known) => Some("listed"),
            (Origin::List, _) => Some("not_listed"),
            (Origin::Throttled, _) => Some("throttled"),
            (Origin::Deadline, _) => Some("deadline"),
            (Origin::Callout, Verdict::Known) => Some("known"),
            (Origin::Callout, Verdict::Unknown) => Some("unknown"),
            (Origin::Callout, Verdict::Unreachable) => Some("unreachable"),
        };
        let labels = DomainLabels {
            domain: domain.to_owned(),
        };
        match result {
            Some(result) => {
                self.callouts
                    .get_or_create(&DomainResultLabels {
                        domain: domain.to_owned(),
                        result,
                    })
                    .inc();
            }
            None => {
                self.callout_cache_hits.get_or_create(&labels).inc();
            }
        }
        self.callout_accept_all
            .get_or_create(&labels)
            .set(i64::from(answer.accept_all));
    }

    /// The fleet as this node last saw it (src/cluster/).
    pub fn cluster(&self, connected: bool, nodes: usize, last_sync: Option<u64>) {
        self.cluster_connected.set(i64::from(connected));
        self.cluster_nodes.set(nodes as i64);
        if let Some(at) = last_sync {
            self.cluster_last_sync.set(at as i64);
        }
    }

    /// One recipient of managed domain `domain` was decided `kind`.
    pub fn decision(&self, domain: &str, kind: Kind, shadow: bool) {
        let inc = |counters: &DecisionCounters| {
            counters[kind as usize * 2 + usize::from(shadow)]
                .get_or_init(|| {
                    self.decisions
                        .get_or_create(&DecisionLabels {
                            domain: domain.to_owned(),
                            kind: kind.label(),
                            shadow: if shadow { "true" } else { "false" },
                        })
                        .clone()
                })
                .inc();
        };
        let known = self
            .decision_counters
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(counters) = known.get(domain) {
            return inc(counters);
        }
        drop(known);
        let mut known = self
            .decision_counters
            .write()
            .unwrap_or_else(|p| p.into_inner());
        inc(known.entry(domain.to_owned()).or_default());
    }

    /// The MTA opened a milter conversation.
    pub fn conversation(&self) {
        self.conversations.inc();
    }

    /// An error of `kind` (see the metric's help).
    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    /// A reload ended with `result`: `ok`, `invalid` or `refused`.
    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// A verification probe of `domain`'s destination passed or failed.
    pub fn probe(&self, domain: &str, passed: bool) {
        self.probes
            .get_or_create(&DomainResultLabels {
                domain: domain.to_owned(),
                result: if passed { "pass" } else { "fail" },
            })
            .inc();
    }

    /// The breaker counted a delivery failure of mail routed for `domain`;
    /// `kind` says which (`bounce`: a permanent failure).
    pub fn breaker_failure(&self, domain: &str, kind: &str) {
        self.breaker_failures
            .get_or_create(&DomainKindLabels {
                domain: domain.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// The breaker read a permanent failure of mail routed for `domain`
    /// and did not count it, for `reason` (`user_unknown`).
    pub fn breaker_ignored(&self, domain: &str, reason: &'static str) {
        self.breaker_ignored
            .get_or_create(&DomainReasonLabels {
                domain: domain.to_owned(),
                reason,
            })
            .inc();
    }

    /// The milter spent `busy` on one message.
    pub fn message_time(&self, busy: Duration) {
        self.milter_seconds.observe(busy.as_secs_f64());
    }

    /// The breaker stopped (a reload removed `breaker:`): no source.
    pub fn breaker_source_gone(&self) {
        self.breaker_source.clear();
    }

    /// Whether the breaker reads `source` (src/breaker/source.rs); the
    /// one source of the moment, a previous one is forgotten.
    pub fn breaker_source(&self, source: &str, readable: bool) {
        let labels = SourceLabels {
            source: source.to_owned(),
        };
        if self.breaker_source.get(&labels).is_none() {
            self.breaker_source.clear();
        }
        self.breaker_source
            .get_or_create(&labels)
            .set(i64::from(readable));
    }

    /// The metrics in the OpenMetrics text format, with the state of
    /// `policy` and `holds` (those in force, when the endpoint serves it).
    pub fn render(&self, policy: &Policy, holds: &Holds) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        // Cleared first: a domain a reload removed is no longer shown.
        for family in [
            &self.accounts,
            &self.routing,
            &self.shadow,
            &self.tripped,
            &self.verifying,
        ] {
            family.clear();
        }
        for (name, d) in &policy.domains {
            let labels = DomainLabels {
                domain: name.clone(),
            };
            let set = |family: &Family<DomainLabels, Gauge>, on: bool| {
                family.get_or_create(&labels).set(i64::from(on));
            };
            if let Some(a) = &d.accounts {
                self.accounts
                    .get_or_create(&labels)
                    .set(i64::try_from(a.len()).unwrap_or(i64::MAX));
            }
            let hold = holds.get(name);
            set(&self.routing, d.config.enabled && hold.is_none());
            set(&self.shadow, policy.config.shadow(&d.config));
            set(&self.tripped, matches!(hold, Some(Hold::Tripped(_))));
            set(
                &self.verifying,
                matches!(hold, Some(Hold::Verification { .. })),
            );
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!("metrics: cannot encode: {e}");
        }
        text
    }
}

/// Serves `GET /metrics` on `metrics.listen` for the life of the service;
/// returns at once when there is no `metrics:`. Read at start: a reload
/// that changes `metrics:` needs a restart (src/service/actor.rs says
/// so).
pub(crate) async fn serve(metrics: Arc<Metrics>, policy: Arc<LivePolicy>, holds: Arc<LiveHolds>) {
    let Some(config) = policy.current().config.metrics.clone() else {
        return;
    };
    let addr = config.listen.0;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                "metrics: cannot listen on {addr}: {e}; the milter runs on without metrics (change metrics.listen and restart)"
            );
            return;
        }
    };
    tracing::info!("metrics: serving http://{addr}/metrics");
    // Connections live in this set, so they end with this task; `open`
    // holds them oldest first.
    let mut connections = tokio::task::JoinSet::new();
    let mut open = std::collections::VecDeque::<tokio::task::AbortHandle>::new();
    loop {
        while connections.try_join_next().is_some() {}
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: wait rather than spin.
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        open.retain(|c| !c.is_finished());
        if open.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = open.pop_front() {
                oldest.abort();
            }
        }
        let state = (metrics.clone(), policy.clone(), holds.clone());
        let connection = connections.spawn(async move {
            let handler = hyper::service::service_fn(move |request| {
                let (metrics, policy, holds) = &state;
                let text = || metrics.render(&policy.current(), &holds.current());
                let response = respond(text, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), handler);
            // A bound of our own on the whole connection, whatever
            // hyper's header timeout covers (a client that sends nothing,
            // one that reads the reply slowly): a slot is never held
            // longer than this.
            match tokio::time::timeout(REQUEST_TIMEOUT * 2, served).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("metrics: connection ended: {e}"),
                Err(_) => {
                    tracing::debug!("metrics: connection closed after {:?}", REQUEST_TIMEOUT * 2)
                }
            }
        });
        open.push_back(connection);
    }
}

/// The reply to `request`; `text` renders the metrics (only for a GET of
/// /metrics).
fn respond(text: impl FnOnce() -> String, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => reply(StatusCode::OK, CONTENT_TYPE, text()),
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "dualroute serves /metrics only\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_name_the_decisions() {
        let r = crate::decision::Rejection {
            code: "550",
            xcode: "5.1.1",
            text: String::new(),
        };
        assert_eq!(Kind::of(&Decision::Keep).label(), "keep");
        assert_eq!(Kind::of(&Decision::Copy(vec![])).label(), "copy");
        assert_eq!(
            Kind::of(&Decision::Redirect(String::new().into())).label(),
            "redirect"
        );
        assert_eq!(Kind::of(&Decision::Reject(r.clone())).label(), "reject");
        assert_eq!(Kind::of(&Decision::Tempfail(r)).label(), "tempfail");
        assert_eq!(Kind::Loop.label(), "loop");
    }
}
