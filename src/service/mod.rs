//! The running milter service: the policy in force, the holds in force,
//! and every task that keeps them current, started and stopped together
//! by [`run`].
//!
//! The policy (configuration plus accounts) is immutable and replaced
//! whole by a reload ([`reload`]); each message keeps the policy it
//! started with. The holds (src/holds/) are kept apart from it and read
//! per RCPT, so a `disable` or a breaker trip takes effect at once. The
//! milter (src/milter.rs), the reload, the verification probe
//! ([`verify`]), the state follower (src/holds/follow.rs) and the bounce
//! breaker (src/breaker/) all share one [`Service`].

pub mod reload;
pub mod verify;

use crate::holds::{Holds, LiveHolds};
use crate::live::LivePolicy;
use crate::policy::Policy;
use crate::{breaker, holds, listener, milter};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc;

pub use reload::{load_policy, LoadError};

/// How often the service's tasks look at the files they follow.
#[derive(Clone, Debug)]
pub struct Intervals {
    /// `state_dir` (admin enable/disable, trips by another process).
    pub state: Duration,
    /// Account files (a change triggers a reload once the file is still).
    pub accounts: Duration,
    /// The verification scheduler's tick (the probes' own backoff is 30 s
    /// doubling to 10 min).
    pub verify: Duration,
}

impl Default for Intervals {
    fn default() -> Intervals {
        Intervals {
            state: Duration::from_secs(2),
            accounts: Duration::from_secs(2),
            verify: Duration::from_secs(1),
        }
    }
}

/// What the milter and the service's tasks share.
#[derive(Debug)]
pub struct Service {
    config_path: PathBuf,
    policy: Arc<LivePolicy>,
    holds: Arc<LiveHolds>,
    /// The one path through which the policy and the holds in force
    /// change: a reload (SIGHUP, an account file, the command refresh)
    /// and every holds refresh (the state follower, the verification
    /// probe, a breaker trip) take it for the whole of their read and
    /// install, so none installs what it read before another installed
    /// something newer (docs/design.md "Reload"). Taken only on the
    /// blocking pool, never on the runtime's threads.
    writer: Mutex<()>,
    pub intervals: Intervals,
    /// Counters the milter and the tasks increment (src/metrics.rs).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Admin notifications waiting to be sent (src/notify.rs).
    pub outbox: Arc<crate::notify::Outbox>,
}

impl Service {
    /// A service for `policy`, loaded from `config_path` (which reloads
    /// read again). The holds are read now, so that no instant exists in
    /// which a disabled or unverified domain routes.
    pub fn new(config_path: &Path, policy: Policy, intervals: Intervals) -> Arc<Service> {
        let (holds, errors) = Holds::read(&policy.config);
        for e in errors {
            tracing::error!("{e}; routing for that domain stays off");
        }
        Arc::new(Service {
            config_path: config_path.to_owned(),
            policy: Arc::new(LivePolicy::new(policy)),
            holds: Arc::new(LiveHolds::new(holds)),
            writer: Mutex::new(()),
            intervals,
            metrics: Arc::new(crate::metrics::Metrics::new()),
            outbox: Default::default(),
        })
    }

    /// The policy in force now. A poisoned lock still holds a complete
    /// policy (it is only ever replaced whole), so it is used rather than
    /// failing.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.current()
    }

    /// The holds in force now.
    pub fn holds(&self) -> Arc<Holds> {
        self.holds.current()
    }

    /// The holds, for a message to read per RCPT.
    pub fn live_holds(&self) -> Arc<LiveHolds> {
        self.holds.clone()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Takes the writer's lock (see `writer`). Blocking: call it on the
    /// blocking pool. A poisoned lock guards nothing but the order of
    /// writers, so it is taken anyway.
    pub(crate) fn write_lock(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the holds of the policy in force from `state_dir`, under
    /// the writer's lock, so that a reload cannot install a newer policy
    /// between the read and the install; returns the errors for the log
    /// (each holds its domain). Blocking file reads: call it on the
    /// blocking pool.
    pub fn refresh_holds(&self) -> Vec<String> {
        let _writer = self.write_lock();
        let (holds, errors) = Holds::read(&self.policy().config);
        // Disputes live in memory only (the refused lists): they stay
        // until a reload settles them.
        let disputes = self.holds.current().disputes().clone();
        self.holds.replace(holds.with_disputes(disputes));
        errors
    }

    /// A domain whose account dispute the administrator has confirmed
    /// (`dualroute confirm-accounts`) and that a reload should now settle.
    /// Blocking file reads: call it on the blocking pool.
    pub fn shrink_confirmed(&self) -> Option<(String, u64)> {
        let holds = self.holds.current();
        let state = crate::state::StateDir::new(&self.policy().config.state_dir);
        let mut names: Vec<&String> = holds.disputes().0.keys().collect();
        names.sort();
        names.into_iter().find_map(|d| {
            let c = state.shrink_confirmed(d).ok().flatten()?;
            Some((d.clone(), c.since))
        })
    }

    /// The shrink guard refused `refused` against `running` for the
    /// domains of `shrunk`; the caller holds the writer's lock. From now
    /// on, until a reload succeeds, the addresses the two lists disagree
    /// on are tempfailed (docs/design.md "Shrink guard"); the dispute is
    /// recorded in `state_dir` for `status` and `confirm-accounts`.
    pub(crate) fn dispute(
        &self,
        _writer: &MutexGuard<'_, ()>,
        running: &Policy,
        mut refused: Policy,
        shrunk: &[crate::policy::Shrunk],
        state: &crate::state::StateDir,
    ) {
        let mut disputes = self.holds.current().disputes().clone();
        for s in shrunk {
            let (Some(was), Some(now)) = (
                running
                    .domains
                    .get(&s.domain)
                    .and_then(|d| d.accounts.as_ref()),
                // The refused policy is dropped after this: its lists are
                // taken, not copied (one may hold millions).
                refused
                    .domains
                    .get_mut(&s.domain)
                    .and_then(|d| d.accounts.take()),
            ) else {
                continue;
            };
            let mut differ: Vec<&str> = was
                .keys()
                .filter(|k| !now.contains(k))
                .chain(now.keys().filter(|k| !was.contains(k)))
                .collect();
            differ.sort_unstable();
            let record = crate::state::Dispute {
                since: crate::state::now(),
                running: was.len(),
                refused: now.len(),
                disputed: differ.len(),
                sample: differ
                    .iter()
                    .take(10)
                    .map(|k| format!("{k}@{}", s.domain))
                    .collect(),
            };
            tracing::error!(
                "{}: the account reload is refused ({} -> {} accounts); the {} addresses the two lists disagree on (e.g. {}) get 451 4.4.4 until `dualroute confirm-accounts {}` accepts the new list or the account source is restored",
                s.domain,
                record.running,
                record.refused,
                record.disputed,
                record.sample.join(", "),
                s.domain
            );
            if let Err(e) = state.record_dispute(&s.domain, &record) {
                tracing::error!(
                    "{}: cannot record the account dispute for `dualroute status`: {e}",
                    s.domain
                );
            }
            disputes.0.insert(s.domain.clone(), Arc::new(now));
        }
        let holds = (*self.holds.current()).clone().with_disputes(disputes);
        self.holds.replace(holds);
    }

    /// Puts `new` in force; the caller holds the writer's lock. The holds
    /// are read for `new` and installed before it: from that instant a
    /// message that still has the running policy finds every domain the
    /// reload removed, or whose destination it changed, held
    /// ([`Hold::NotRead`](crate::holds::Hold::NotRead)), and a message
    /// that takes the new policy finds the holds read for it.
    fn install(&self, new: Policy, _writer: &MutexGuard<'_, ()>) -> Vec<String> {
        let (holds, errors) = Holds::read(&new.config);
        self.holds.replace(holds);
        self.policy.replace(new);
        errors
    }
}

/// Runs the whole service until `shutdown` completes: the milter on
/// `listener`, with the connection limit and timeouts of `connections:`,
/// and beside it the reload on every message of `reloads` (SIGHUP in
/// `main.rs`), the account-file watch, the verification probe, the state
/// follower and the bounce breaker. The tasks stop with the milter.
pub async fn run<L>(
    listener: L,
    service: Arc<Service>,
    mut reloads: mpsc::Receiver<()>,
    shutdown: impl Future,
) -> std::io::Result<()>
where
    L: indymilter::Listener,
    L::Io: listener::Peer,
{
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(verify::run(service.clone()));
    tasks.spawn(holds::follow::run(service.clone()));
    tasks.spawn(reload::watch_accounts(service.clone()));
    tasks.spawn(reload::refresh_commands(service.clone()));
    // The bounce breaker (docs/design.md §7) idles while there is no
    // `breaker:`, and follows reloads that add, change or remove it.
    tasks.spawn(breaker::run(service.clone()));
    tasks.spawn(crate::metrics::serve(service.clone()));
    tasks.spawn(crate::postfix::queue::follow(service.clone()));
    tasks.spawn(crate::notify::run(
        service.policy.clone(),
        service.outbox.clone(),
    ));
    let reloader = service.clone();
    tasks.spawn(async move {
        while reloads.recv().await.is_some() {
            reload::on_request(&reloader).await;
        }
    });
    let limits = service.policy().config.connections.clone();
    // indymilter's own timeout covers a whole read, idle time included, and
    // writes: it only backs up the guard's finer ones (listener.rs).
    let config = indymilter::Config {
        max_connections: limits.max.get(),
        connection_timeout: limits.idle_timeout.0 + limits.command_timeout.0,
        ..Default::default()
    };
    let listener = listener::Guarded::new(listener, limits, service.clone());
    tracing::info!(
        "dualroute {} listening on {}",
        env!("CARGO_PKG_VERSION"),
        service.policy().config.listen
    );
    notify(&[sd_notify::NotifyState::Ready]);
    let result = indymilter::run(listener, milter::callbacks(service), config, shutdown).await;
    tasks.abort_all();
    result
}

/// Tells systemd (Type=notify) where we are; a no-op without
/// NOTIFY_SOCKET.
pub fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}
