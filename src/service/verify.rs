//! The verification probe of the running service (docs/design.md,
//! "Routing off"): a domain with `verify:` routes only once its
//! destination has accepted the probe address. Held domains are probed
//! concurrently (a dead destination does not delay the others), with one
//! resolver for all probes, and retried with backoff (30 s doubling to
//! 10 min). The result is written to `state_dir` and the holds are read
//! back from there, so the milter, `status` and `explain` agree
//! (src/holds/).

use crate::config::{DnsConfig, DomainConfig};
use crate::dns::Dns;
use crate::holds::LiveHolds;
use crate::live::{Installer, LivePolicy};
use crate::metrics::Metrics;
use crate::notify::{Event, Outbox};
use crate::{holds, probe, state};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

const FIRST_RETRY: Duration = Duration::from_secs(30);
const LAST_RETRY: Duration = Duration::from_secs(600);

/// One finished probe.
struct Outcome {
    domain: String,
    /// What was probed (`holds::probe_target`), taken when the probe
    /// started: a pass of a destination a reload has since changed does
    /// not count for the new one.
    target: String,
    address: String,
    result: Result<String, String>,
}

/// What the probe reads, records and reports through.
pub(crate) struct Verify {
    pub policy: Arc<LivePolicy>,
    pub holds: Arc<LiveHolds>,
    /// A recorded result is read back into the holds through the reload
    /// actor.
    pub installer: Installer,
    pub metrics: Arc<Metrics>,
    pub outbox: Arc<Outbox>,
    /// The scheduler's tick.
    pub every: Duration,
}

/// Probes held domains for the life of the service, following reloads.
pub(crate) async fn run(service: Verify) {
    let mut next: HashMap<String, (Instant, Duration)> = HashMap::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut probes: JoinSet<Outcome> = JoinSet::new();
    let mut resolver: Option<(DnsConfig, Arc<Dns>)> = None;
    loop {
        let policy = service.policy.current();
        let holds = service.holds.current();
        let now = Instant::now();
        let mut names: Vec<&String> = policy.domains.keys().collect();
        names.sort();
        for name in names {
            let d = &policy.domains[name];
            if d.config.verify.is_none()
                || !holds.awaiting_verification(name)
                || in_flight.contains(name)
                || next.get(name).is_some_and(|(due, _)| *due > now)
            {
                continue;
            }
            let dns = match &resolver {
                Some((config, dns)) if *config == policy.config.dns => dns.clone(),
                _ => match Dns::new(&policy.config.dns) {
                    Ok(dns) => {
                        let dns = Arc::new(dns);
                        resolver = Some((policy.config.dns.clone(), dns.clone()));
                        dns
                    }
                    Err(e) => {
                        tracing::warn!("cannot set up DNS for the verification probe: {e}; routing stays off, retry in {}s", FIRST_RETRY.as_secs());
                        next.insert(name.clone(), (now + FIRST_RETRY, FIRST_RETRY));
                        continue;
                    }
                },
            };
            in_flight.insert(name.clone());
            probes.spawn(probe_one(
                name.clone(),
                d.config.clone(),
                dns,
                policy.config.instance.clone(),
            ));
        }
        let done = tokio::select! {
            Some(done) = probes.join_next(), if !probes.is_empty() => done,
            _ = tokio::time::sleep(service.every) => continue,
        };
        let Ok(outcome) = done else {
            // A probe task that panicked or was cancelled: its domain is
            // no longer known here; clear everything in flight that has no
            // task left so it is probed again.
            if probes.is_empty() {
                in_flight.clear();
            }
            continue;
        };
        in_flight.remove(&outcome.domain);
        let backoff = next.get(&outcome.domain).map_or(FIRST_RETRY, |(_, b)| *b);
        if settle(&service, &outcome, backoff).await {
            next.remove(&outcome.domain);
        } else {
            next.insert(
                outcome.domain.clone(),
                (Instant::now() + backoff, (backoff * 2).min(LAST_RETRY)),
            );
        }
    }
}

async fn probe_one(domain: String, d: DomainConfig, dns: Arc<Dns>, helo: String) -> Outcome {
    let address = d
        .verify
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let target = holds::probe_target(&d);
    // The domain's whole configuration: the probe does STARTTLS where
    // `destination.tls` requires it (docs/design.md "The destination's
    // rules").
    let result =
        match probe::verify_with(&d, &dns, &helo, &address, probe::STEP_TIMEOUT, false).await {
            Ok(reports) => match reports.iter().find(|r| r.accepted) {
                Some(r) => Ok(format!("{} accepts {address}", r.target.addr)),
                None => Err(reports
                    .iter()
                    .map(|r| {
                        let e = r.error.as_deref().unwrap_or("not accepted");
                        format!("{}: {e}", r.target.addr)
                    })
                    .collect::<Vec<_>>()
                    .join("; ")),
            },
            Err(e) => Err(e),
        };
    Outcome {
        domain,
        target,
        address,
        result,
    }
}

/// Logs and records a probe result; true when the domain is verified and
/// the pass is recorded (a pass that cannot be recorded keeps routing
/// off: when in doubt, do not route).
async fn settle(service: &Verify, o: &Outcome, backoff: Duration) -> bool {
    let name = &o.domain;
    service.metrics.probe(name, o.result.is_ok());
    let (passed, detail) = match &o.result {
        Ok(detail) => {
            tracing::info!("{name}: verification passed ({detail}); routing starts");
            (true, detail.clone())
        }
        Err(why) => {
            tracing::warn!(
                "{name}: verification of {} failed ({why}); routing stays off, retry in {}s",
                o.address,
                backoff.as_secs()
            );
            (false, why.clone())
        }
    };
    let address = o.address.clone();
    let v = state::Verification {
        at: state::now(),
        passed,
        detail,
        target: o.target.clone(),
    };
    let (live, outbox, name2) = (service.policy.clone(), service.outbox.clone(), name.clone());
    // State writes fsync: blocking I/O, off the runtime's workers.
    let written = tokio::task::spawn_blocking(move || {
        let dir = state::StateDir::new(&live.current().config.state_dir);
        // The administrator hears of a change only (src/notify/).
        let previous = dir.load(&name2).ok().and_then(|s| s.verification);
        let previous = previous.filter(|p| p.target == v.target);
        let news = Event::verification(&name2, previous.as_ref(), &v, &address);
        let r = dir.record_verification(&name2, &v);
        if let (Ok(()), Some(news)) = (&r, news) {
            outbox.notify(&live.current().config, news);
        }
        r.map_err(|e| (e.to_string(), dir.dir.display().to_string()))
    })
    .await;
    match written {
        Ok(Ok(())) => {
            // What was recorded takes effect now: the holds are read
            // again, through the one writer.
            for e in service.installer.refresh_holds().await {
                tracing::error!("{e}; routing for that domain stays off");
            }
            passed
        }
        Ok(Err((e, dir))) => {
            if passed {
                tracing::error!(
                    "{name}: the destination passed verification, but the result cannot be recorded in {dir}: {e}; routing stays off until it can"
                );
            } else {
                tracing::warn!("{name}: cannot record the probe result: {e}");
            }
            false
        }
        Err(e) => {
            tracing::error!("{name}: recording the probe result failed: {e}");
            false
        }
    }
}
