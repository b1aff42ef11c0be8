//! dualroute: a milter that gives a self-hosted mail server split delivery,
//! dual delivery, routing and per-user copy/redirect rules during a mail
//! migration. See docs/design.md for the contract and README.md for use.
//!
//! The decision for a recipient is the pure function [`decision::decide`];
//! everything else is a shell around it: [`milter`] for the protocol,
//! [`explain`] for the command line.

pub mod accounts;
pub mod address;
pub mod breaker;
pub mod cli;
pub mod commands;
pub mod config;
pub mod decision;
pub mod dns;
pub mod doctor;
pub mod explain;
pub mod holds;
pub mod listener;
pub mod milter;
pub mod policy;
pub mod postfix;
pub mod probe;
pub mod provider;
pub mod sendmail;
pub mod session;
pub mod socket;
pub mod state;
pub mod table;

use policy::{current, Policy, SharedPolicy};
use std::{future::Future, io, path::Path, sync::Arc};

/// Anything that stops a configuration from loading.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Accounts(#[from] accounts::LoadError),
    /// A reload that loaded fine but would shrink a domain's accounts past
    /// `accounts_shrink_limit`.
    #[error("{0}")]
    Shrink(String),
}

/// Reads `milter.yaml` and every account source it names.
/// The routing state under `state_dir` is read too (errors are logged and
/// hold the domain concerned).
pub fn load_policy(path: &Path) -> Result<Policy, LoadError> {
    let config = config::read_file(path)?;
    let policy = Policy::load(config)?;
    for e in policy.refresh_state() {
        tracing::error!("{e}; routing for that domain stays off");
    }
    Ok(policy)
}

/// Follows `state_dir` (admin enable/disable, breaker trips) so that the
/// running milter obeys `dualroute enable`/`disable` within seconds.
pub async fn state_loop(shared: SharedPolicy, every: std::time::Duration) {
    let mut last_errors = Vec::new();
    loop {
        tokio::time::sleep(every).await;
        let policy = current(&shared);
        let holds = |p: &Policy| -> Vec<(String, Option<holds::Hold>)> {
            let now = p.holds.current();
            let mut names: Vec<&String> = p.domains.keys().collect();
            names.sort();
            names
                .into_iter()
                .map(|n| (n.clone(), now.get(n).cloned()))
                .collect()
        };
        let before = holds(&policy);
        let (errors, after) = tokio::task::spawn_blocking(move || {
            let errors = policy.refresh_state();
            (errors, holds(&policy))
        })
        .await
        .unwrap_or_default();
        // One line when the running milter picks up `enable`/`disable` or
        // a breaker trip written by another process.
        for ((name, was), (_, now)) in before.iter().zip(&after) {
            match (was, now) {
                (None, Some(why)) => tracing::warn!("{name}: routing is off: {why}"),
                (Some(_), None) => tracing::info!("{name}: routing is on again"),
                // A new cause; a new probe result is logged by the probe.
                (Some(a), Some(b)) if a.cause() != b.cause() => {
                    tracing::warn!("{name}: routing is off: {b}")
                }
                _ => {}
            }
        }
        if errors != last_errors {
            for e in &errors {
                tracing::error!("{e}; routing for that domain stays off");
            }
            last_errors = errors;
        }
    }
}

/// Wraps a policy for sharing between the milter and the reload task.
pub fn share(policy: Policy) -> SharedPolicy {
    Arc::new(std::sync::RwLock::new(Arc::new(policy)))
}

/// Re-reads the configuration; on error the running policy stays in force
/// (docs/design.md §5: a reload with an invalid file keeps the running policy),
/// and so it does when the new accounts shrank past the guard. A refusal
/// is recorded under `state_dir` for `dualroute status`; a good reload
/// clears it. The caller logs the error.
pub async fn reload(shared: &SharedPolicy, path: &Path) -> Result<(), LoadError> {
    let path = path.to_owned();
    let running = current(shared);
    let loaded = tokio::task::spawn_blocking(move || load_policy(&path))
        .await
        .unwrap_or_else(|e| {
            Err(LoadError::Config(config::ConfigError {
                file: String::new(),
                line: None,
                column: None,
                message: format!("reload task failed: {e}"),
            }))
        })
        .and_then(|p| match p.shrink_refusal(&running) {
            Some(why) => Err(LoadError::Shrink(why)),
            None => Ok(p),
        });
    let state = state::StateDir::new(&running.config.state_dir);
    let loaded = match loaded {
        Ok(p) => p,
        Err(e) => {
            if let Err(w) = state.refuse_reload(&e.to_string()) {
                tracing::error!("cannot record the refused reload for `dualroute status`: {w}");
            }
            return Err(e);
        }
    };
    let mut loaded = loaded;
    // The socket is bound and the connection limits are set once, at start
    // (src/main.rs): say so rather than ignore the change. The running
    // values stay in the policy in force, so every reload repeats the
    // warning until a restart.
    let (was, now) = (&running.config, &mut loaded.config);
    if was.listen != now.listen {
        tracing::warn!(
            "listen changed from {} to {}: a reload does not move the socket; restart dualroute to listen on {} (still listening on {})",
            was.listen, now.listen, now.listen, was.listen
        );
        now.listen = was.listen.clone();
    }
    if was.connections != now.connections {
        tracing::warn!(
            "connections changed: a reload does not change them; restart dualroute to apply them"
        );
        now.connections = was.connections.clone();
    }
    for e in loaded.take_over_holds(&running) {
        tracing::error!("{e}; routing for that domain stays off");
    }
    let new = Arc::new(loaded);
    match shared.write() {
        Ok(mut guard) => *guard = new,
        Err(poisoned) => *poisoned.into_inner() = new,
    }
    if let Err(e) = state.clear_reload_refused() {
        tracing::warn!("cannot clear the record of a refused reload: {e}");
    }
    Ok(())
}

/// Reloads configuration and accounts when an account file changes
/// (checked every `every`). A change is acted on once the file has been
/// still for one interval, so that a file being rewritten is not read half
/// written. A failed reload keeps the running policy and is retried only
/// after a file changes again.
pub async fn watch_accounts(
    shared: SharedPolicy,
    path: std::path::PathBuf,
    every: std::time::Duration,
) {
    // The milter has just started with everything loaded: a refusal
    // recorded by an earlier run no longer describes it.
    let dir = state::StateDir::new(&current(&shared).config.state_dir);
    if let Err(e) = dir.clear_reload_refused() {
        tracing::warn!("cannot clear the record of a refused reload: {e}");
    }
    // What the files looked like at the last look, and what a reload
    // failed on (not retried until a file changes again).
    let mut last_seen = None;
    let mut failed_for = None;
    loop {
        tokio::time::sleep(every).await;
        let policy = current(&shared);
        let now: Vec<_> = policy
            .account_files
            .iter()
            .map(|(p, _)| file_stamp(p))
            .collect();
        let changed: Vec<String> = policy
            .account_files
            .iter()
            .zip(&now)
            .filter(|((_, then), now)| *then != now.1)
            .map(|((p, _), _)| p.display().to_string())
            .collect();
        let settled = last_seen.as_ref() == Some(&now);
        last_seen = Some(now.clone());
        if changed.is_empty() || !settled || failed_for.as_ref() == Some(&now) {
            continue;
        }
        let changed = changed.join(", ");
        match reload(&shared, &path).await {
            Ok(()) => {
                tracing::info!(
                    "account file changed ({changed}): reloaded {}",
                    path.display()
                );
                failed_for = None;
            }
            Err(e) => {
                tracing::error!(
                    "account file changed ({changed}) but the reload was refused, keeping the running configuration: {e}"
                );
                failed_for = Some(now);
            }
        }
    }
}

/// A file's size and modification time, `None` when it cannot be read.
fn file_stamp(p: &Path) -> (Option<u64>, Option<std::time::SystemTime>) {
    let m = std::fs::metadata(p).ok();
    (
        m.as_ref().map(|m| m.len()),
        m.and_then(|m| m.modified().ok()),
    )
}

/// Probes held domains until their destination accepts the `verify`
/// address, then releases them; retries with backoff (30 s doubling to
/// 10 min). Runs for the life of the milter and follows reloads.
pub async fn verify_loop(shared: SharedPolicy) {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};
    let mut next: HashMap<String, (Instant, Duration)> = HashMap::new();
    loop {
        let policy = current(&shared);
        let now = Instant::now();
        // The result goes to state_dir first and the holds are read back
        // from there, so the milter, `status` and `explain` agree
        // (src/holds.rs). A result that cannot be recorded keeps routing
        // off: when in doubt, do not route.
        let record = |name: &str, d: &policy::DomainPolicy, passed: bool, detail: String| {
            let v = state::Verification {
                at: state::now(),
                passed,
                detail,
                target: holds::probe_target(&d.config),
            };
            match state::StateDir::new(&policy.config.state_dir).record_verification(name, &v) {
                Ok(()) => {
                    for e in current(&shared).refresh_state() {
                        tracing::error!("{e}; routing for that domain stays off");
                    }
                    true
                }
                Err(e) => {
                    if passed {
                        tracing::error!(
                            "{name}: the destination passed verification, but the result cannot be recorded in {}: {e}; routing stays off until it can",
                            policy.config.state_dir.display()
                        );
                    } else {
                        tracing::warn!("{name}: cannot record the probe result: {e}");
                    }
                    false
                }
            }
        };
        for (name, d) in &policy.domains {
            let Some(addr) = &d.config.verify else {
                continue;
            };
            if !policy.holds.current().awaiting_verification(name) {
                continue;
            }
            let (due, backoff) = next
                .get(name)
                .copied()
                .unwrap_or((now, Duration::from_secs(30)));
            if due > now {
                continue;
            }
            let rcpt = addr.to_string();
            // issue 13 (wt-dest): the probe takes the domain's settings,
            // for STARTTLS at the destination's `tls` level.
            let outcome = match probe::verify(
                &d.config,
                &policy.config.dns,
                &policy.config.instance,
                &rcpt,
                probe::STEP_TIMEOUT,
                false,
            )
            .await
            {
                Ok(reports) => match reports.iter().find(|r| r.accepted) {
                    Some(r) => Ok(format!("{} accepts {rcpt}", r.target.addr)),
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
            match outcome {
                Ok(detail) => {
                    tracing::info!("{name}: verification passed ({detail}); routing starts");
                    if record(name, d, true, detail) {
                        next.remove(name);
                        continue;
                    }
                }
                Err(why) => {
                    tracing::warn!(
                        "{name}: verification of {rcpt} failed ({why}); routing stays off, retry in {}s",
                        backoff.as_secs()
                    );
                    record(name, d, false, why);
                }
            }
            next.insert(
                name.clone(),
                (
                    Instant::now() + backoff,
                    (backoff * 2).min(Duration::from_secs(600)),
                ),
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Serves the milter on `listener` until `shutdown` completes, with the
/// connection limit and timeouts of the configuration's `connections:`.
pub async fn run<L>(listener: L, policy: SharedPolicy, shutdown: impl Future) -> io::Result<()>
where
    L: indymilter::Listener,
    L::Io: listener::Peer,
{
    let limits = current(&policy).config.connections.clone();
    // indymilter's own timeout covers a whole read, idle time included, and
    // writes: it only backs up the guard's finer ones (listener.rs).
    let config = indymilter::Config {
        max_connections: limits.max.get(),
        connection_timeout: limits.idle_timeout.0 + limits.command_timeout.0,
        ..Default::default()
    };
    let listener = listener::Guarded::new(listener, limits);
    indymilter::run(listener, milter::callbacks(policy), config, shutdown).await
}
