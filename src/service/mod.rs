//! The running milter: [`run`] is the composition root, the only code that
//! knows every part (docs/design.md §7 "The running service").
//!
//! It builds the shared handles (the policy in force, the holds in force,
//! the metrics, the notifier's outbox; src/live.rs, src/holds/,
//! src/metrics.rs, src/notify/) and the reload actor that alone changes
//! the first two ([`actor`]), then starts each task with only the handles
//! it uses, and the milter's callbacks (src/milter.rs) with theirs. No
//! part imports this module back.
//!
//! From outside, the running service is reached through a [`Control`]
//! (made with [`control`], before `run`): `dualroute run` turns SIGHUP
//! into [`Control::reload`], and the tests reload and look at the policy,
//! the holds and the metrics through it.

mod actor;
mod callouts;
mod publish;
mod reload;
mod verify;
mod waiting;

use crate::holds::{Holds, LiveHolds};
use crate::live::{Installer, LivePolicy, LoadError, Request};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::{breaker, holds, listener, milter, notify, systemd};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

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

/// What [`run`] starts from.
#[derive(Debug)]
pub struct Start {
    /// `milter.yaml`, which every reload reads again.
    pub config_path: PathBuf,
    /// The policy loaded from it ([`crate::load_policy`]).
    pub policy: Policy,
    pub intervals: Intervals,
}

/// A handle on the running service, for the binary and the tests: made
/// with [`control`] together with the [`Requests`] that [`run`] takes.
/// Cheap to clone; every clone reaches the same service.
#[derive(Clone, Debug)]
pub struct Control {
    installer: Installer,
    view: watch::Receiver<Option<View>>,
}

/// The receiving end of a [`Control`]: hand it to [`run`].
#[derive(Debug)]
pub struct Requests {
    requests: mpsc::Receiver<Request>,
    /// For the service's own tasks: they ask the actor as a Control
    /// does, in the same queue.
    tasks: Installer,
    view: watch::Sender<Option<View>>,
}

/// What a [`Control`] reads, put in place by [`run`].
#[derive(Clone, Debug)]
struct View {
    policy: Arc<LivePolicy>,
    holds: Arc<LiveHolds>,
    metrics: Arc<Metrics>,
}

/// A [`Control`] and the [`Requests`] for [`run`].
pub fn control() -> (Control, Requests) {
    // Requests wait here while the actor does one; few ever queue (SIGHUP
    // waits for its answer, each task asks one at a time).
    let (tx, rx) = mpsc::channel(16);
    let (view_tx, view_rx) = watch::channel(None);
    (
        Control {
            installer: Installer::new(tx.clone()),
            view: view_rx,
        },
        Requests {
            requests: rx,
            tasks: Installer::new(tx),
            view: view_tx,
        },
    )
}

impl Control {
    /// Reloads the configuration and the accounts, as SIGHUP does, and
    /// waits until the reload is done: after it, or after the reloads and
    /// holds refreshes asked for before it (one at a time, docs/design.md
    /// "One writer"). On error the running policy stays in force and the
    /// error says why (a refusal is also recorded under `state_dir`). Asked
    /// before [`run`] starts, it waits for it; [`LoadError::Stopped`]
    /// once the service has stopped.
    pub async fn reload(&self) -> Result<(), LoadError> {
        self.installer.reload().await
    }

    /// Waits until [`run`] has put the service's handles in place; false
    /// when the service ended (or its [`Requests`] were dropped) first.
    pub async fn running(&self) -> bool {
        self.view.clone().wait_for(Option::is_some).await.is_ok()
    }

    /// The policy in force; `None` before [`run`] has started.
    pub fn policy(&self) -> Option<Arc<Policy>> {
        self.view.borrow().as_ref().map(|v| v.policy.current())
    }

    /// The holds in force; `None` before [`run`] has started.
    pub fn holds(&self) -> Option<Arc<Holds>> {
        self.view.borrow().as_ref().map(|v| v.holds.current())
    }

    /// The metrics as the endpoint serves them (OpenMetrics text), also
    /// without `metrics:`; `None` before [`run`] has started.
    pub fn metrics(&self) -> Option<String> {
        let view = self.view.borrow().clone()?;
        Some(
            view.metrics
                .render(&view.policy.current(), &view.holds.current()),
        )
    }
}

/// Runs the whole service until `shutdown` completes: the milter on
/// `listener`, with the connection limit and timeouts of `connections:`,
/// and beside it the reload actor (serving `requests`, see [`Control`]),
/// the account-file watch, the account-command refresh, the verification
/// probe, the state follower, the bounce breaker, the metrics endpoint,
/// the count of Postfix's waiting mail, the notifier, the loading of
/// the callout caches and the live state for `status`. The tasks stop
/// with the milter.
pub async fn run<L>(
    listener: L,
    start: Start,
    requests: Requests,
    shutdown: impl Future,
) -> std::io::Result<()>
where
    L: indymilter::Listener,
    L::Io: listener::Peer,
{
    let Start {
        config_path,
        policy,
        intervals,
    } = start;
    // The holds are read before anything runs, so that no instant exists
    // in which a disabled or unverified domain routes.
    let (read, errors) = Holds::read(&policy.config);
    for e in errors {
        tracing::error!("{e}; routing for that domain stays off");
    }
    let limits = policy.config.connections.clone();
    let listen = policy.config.listen.clone();
    let policy = Arc::new(LivePolicy::new(policy));
    let holds = Arc::new(LiveHolds::new(read));
    let metrics = Arc::new(Metrics::new());
    let outbox: Arc<notify::Outbox> = Default::default();
    // One engine for the life of the milter: its caches, bounds and
    // flights outlive reloads (docs/design.md "Refusing unknown
    // recipients").
    let callouts = callouts::build(&policy.current());
    let Requests {
        requests,
        tasks: installer,
        view: control_view,
    } = requests;

    let mut tasks = tokio::task::JoinSet::new();
    let publisher = Arc::new(publish::Publisher::new(
        config_path.clone(),
        policy.clone(),
        holds.clone(),
    ));
    // Before the milter listens: `status` shows what runs from the start.
    publisher.publish();
    let actor = actor::Actor {
        publisher: publisher.clone(),
        config_path: config_path.clone(),
        policy: policy.clone(),
        holds: holds.clone(),
        metrics: metrics.clone(),
        outbox: outbox.clone(),
    };
    tasks.spawn(actor::run(actor, requests));
    tasks.spawn(verify::run(verify::Verify {
        policy: policy.clone(),
        holds: holds.clone(),
        installer: installer.clone(),
        metrics: metrics.clone(),
        outbox: outbox.clone(),
        every: intervals.verify,
    }));
    tasks.spawn(holds::follow::run(
        policy.clone(),
        holds.clone(),
        installer.clone(),
        Arc::from(config_path.as_path()),
        intervals.state,
    ));
    tasks.spawn(reload::watch_accounts(
        policy.clone(),
        installer.clone(),
        config_path.clone(),
        intervals.accounts,
    ));
    tasks.spawn(reload::refresh_commands(
        policy.clone(),
        installer.clone(),
        config_path.clone(),
        intervals.accounts,
    ));
    // The fleet (`cluster:`, DESIGN.md §11): read at start, as `listen`.
    let fleet = policy.current().config.cluster.clone().map(|cluster| {
        let fleet = Arc::new(crate::cluster::fleet::FleetFailures::default());
        tasks.spawn(crate::cluster::run(
            cluster,
            policy.clone(),
            installer.clone(),
            metrics.clone(),
            fleet.clone(),
            outbox.clone(),
            callouts.clone(),
        ));
        fleet
    });
    // The bounce breaker (docs/design.md §7) idles while there is no
    // `breaker:`, and follows reloads that add, change or remove it.
    tasks.spawn(breaker::run(
        policy.clone(),
        breaker::Reach {
            installer,
            metrics: metrics.clone(),
            outbox: outbox.clone(),
            fleet,
        },
    ));
    tasks.spawn(crate::metrics::serve(
        metrics.clone(),
        policy.clone(),
        holds.clone(),
    ));
    tasks.spawn(waiting::follow(policy.clone(), metrics.clone()));
    // What runs, for `dualroute status` (src/running.rs, issue 25).
    tasks.spawn(publish::run(publisher.clone()));
    tasks.spawn(notify::run(policy.clone(), outbox.clone()));
    if let Some(c) = &callouts {
        tasks.spawn(callouts::follow(policy.clone(), c.clone(), intervals.state));
    }
    control_view.send_replace(Some(View {
        policy: policy.clone(),
        holds: holds.clone(),
        metrics: metrics.clone(),
    }));

    // indymilter's own timeout covers a whole read, idle time included, and
    // writes: it only backs up the guard's finer ones (src/listener/).
    let config = indymilter::Config {
        max_connections: limits.max.get(),
        connection_timeout: limits.idle_timeout.0 + limits.command_timeout.0,
        ..Default::default()
    };
    let listener = listener::Guarded::new(listener, limits, metrics.clone());
    let callbacks = milter::callbacks(Arc::new(milter::Shared {
        policy,
        holds,
        metrics,
        outbox,
        callouts,
    }));
    tracing::info!(
        "dualroute {} listening on {listen}",
        env!("CARGO_PKG_VERSION"),
    );
    systemd::notify(&[sd_notify::NotifyState::Ready]);
    let result = indymilter::run(listener, callbacks, config, shutdown).await;
    tasks.abort_all();
    // Aborted tasks end at their next await; waiting for them lets their
    // guards run now (the live state's record is removed, so `status`
    // says at once that no milter runs). Bounded: stopping never hangs.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    // A Control that asks now hears that the service stopped.
    drop(control_view);
    result
}
