//! Loading the configuration and replacing it while the milter runs: on
//! SIGHUP and when an account file changes (docs/design.md §5, §7). A
//! reload that fails, or that would shrink a domain's accounts past
//! `accounts_shrink_limit`, keeps the running policy; the refusal is
//! recorded under `state_dir` for `dualroute status`.

use super::{notify, Service};
use crate::policy::Policy;
use crate::{accounts, config, state};
use std::path::Path;
use std::sync::Arc;

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
pub fn load_policy(path: &Path) -> Result<Policy, LoadError> {
    let config = config::read_file(path)?;
    Ok(Policy::load(config)?)
}

/// A reload asked for by SIGHUP. systemd (ExecReload) waits for READY=1
/// after RELOADING=1, stamped with the monotonic clock (sd_notify(3)).
pub async fn on_request(service: &Arc<Service>) {
    let mut reloading = vec![sd_notify::NotifyState::Reloading];
    reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
    notify(&reloading);
    let path = service.config_path().display();
    match reload(service).await {
        Ok(()) => tracing::info!("SIGHUP: reloaded {path}"),
        Err(e) => {
            tracing::error!("SIGHUP: reload failed, keeping the running configuration: {e}")
        }
    }
    notify(&[sd_notify::NotifyState::Ready]);
}

/// Re-reads the configuration; on error the running policy stays in force
/// (docs/design.md §5: a reload with an invalid file keeps the running
/// policy), and so it does when the new accounts shrank past the guard. A
/// refusal is recorded under `state_dir` for `dualroute status`; a good
/// reload clears it. The caller logs the error.
///
/// Every reload (SIGHUP, an account file change, the command refresh)
/// runs whole under the service's writer lock, on the blocking pool: the
/// file is read once the lock is held, so reloads happen one after the
/// other and each reads what is newest when its turn comes. A slow account
/// command can delay a SIGHUP; it can never install the configuration it
/// read after the SIGHUP installed a newer one (docs/design.md "Reload").
pub async fn reload(service: &Arc<Service>) -> Result<(), LoadError> {
    let service = service.clone();
    tokio::task::spawn_blocking(move || reload_now(&service))
        .await
        .unwrap_or_else(|e| {
            Err(LoadError::Config(config::ConfigError {
                file: String::new(),
                line: None,
                column: None,
                message: format!("reload task failed: {e}"),
            }))
        })
}

/// [`reload`] on the blocking pool.
fn reload_now(service: &Service) -> Result<(), LoadError> {
    let writer = service.write_lock();
    // The running policy is read under the lock: the shrink guard compares
    // against what is in force, not against what was when a slow reload
    // began.
    let running = service.policy();
    let state = state::StateDir::new(&running.config.state_dir);
    let loaded = load_policy(service.config_path()).and_then(|p| {
        let confirmed = |d: &str| state.shrink_confirmed(d).ok().flatten().map(|c| c.accounts);
        let shrunk = p.shrunk(&running, confirmed);
        match p.shrink_refusal(&shrunk) {
            None => Ok(p),
            Some(why) => {
                service.dispute(&writer, &running, p, &shrunk, &state);
                Err(LoadError::Shrink(why))
            }
        }
    });
    let mut loaded = match loaded {
        Ok(p) => p,
        Err(e) => {
            drop(writer);
            let result = match e {
                LoadError::Shrink(_) => "refused",
                _ => "invalid",
            };
            service.metrics.reload(result);
            if let Err(w) = state.refuse_reload(&e.to_string()) {
                tracing::error!("cannot record the refused reload for `dualroute status`: {w}");
            }
            service.outbox.notify(
                &service.policy().config,
                crate::notify::Event::ReloadRefused {
                    reason: e.to_string(),
                },
            );
            return Err(e);
        }
    };
    // The socket is bound and the connection limits are set once, at start
    // (src/main.rs, src/service/mod.rs): say so rather than ignore the change. The running
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
    if was.metrics != now.metrics {
        tracing::warn!(
            "metrics changed: the endpoint is set up at start; restart dualroute to apply it"
        );
        now.metrics = was.metrics.clone();
    }
    let names: Vec<String> = running
        .domains
        .keys()
        .chain(loaded.domains.keys())
        .cloned()
        .collect();
    for e in service.install(loaded, &writer) {
        tracing::error!("{e}; routing for that domain stays off");
    }
    drop(writer);
    // The accounts in force now passed the guard (or were confirmed): no
    // dispute remains, and a confirmation is used up.
    for name in names {
        let cleared = state
            .clear_dispute(&name)
            .and_then(|a| Ok(a | state.clear_shrink_confirmed(&name)?));
        match cleared {
            Ok(true) => tracing::info!(
                "{name}: the account list in force is settled; no address is held for it any more"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!("{name}: cannot clear the record of an account dispute: {e}"),
        }
    }
    if let Err(e) = state.clear_reload_refused() {
        tracing::warn!("cannot clear the record of a refused reload: {e}");
    }
    service.metrics.reload("ok");
    Ok(())
}

/// Reloads configuration and accounts when an account file changes
/// (checked every `service.intervals.accounts`). A change is acted on once
/// the file has been still for one interval, so that a file being
/// rewritten is not read half written. A failed reload keeps the running
/// policy and is retried only after a file changes again.
pub async fn watch_accounts(service: std::sync::Arc<Service>) {
    // The milter has just started with everything loaded: a refusal
    // recorded by an earlier run no longer describes it.
    let dir = state::StateDir::new(&service.policy().config.state_dir);
    if let Err(e) = dir.clear_reload_refused() {
        tracing::warn!("cannot clear the record of a refused reload: {e}");
    }
    // What the files looked like at the last look, and what a reload
    // failed on (not retried until a file changes again).
    let mut last_seen = None;
    let mut failed_for = None;
    loop {
        tokio::time::sleep(service.intervals.accounts).await;
        let policy = service.policy();
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
        let path = service.config_path().display();
        match reload(&service).await {
            Ok(()) => {
                tracing::info!("account file changed ({changed}): reloaded {path}");
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

/// Runs the account commands again (`command:` sources, README "Accounts
/// from a directory") every `refresh`, through the same [`reload`] as an
/// account file change: the same empty and shrink guards apply, and a
/// failed run keeps the accounts in force. The shortest `refresh` of the
/// policy in force counts; any reload (SIGHUP, a file change) starts the
/// wait again, since it ran the commands too.
pub async fn refresh_commands(service: std::sync::Arc<Service>) {
    let mut seen = service.policy();
    let mut since = std::time::Instant::now();
    loop {
        tokio::time::sleep(service.intervals.accounts).await;
        let policy = service.policy();
        if !std::sync::Arc::ptr_eq(&policy, &seen) {
            seen = policy;
            since = std::time::Instant::now();
            continue;
        }
        let Some(every) = command_refresh(&policy) else {
            continue;
        };
        if since.elapsed() < every {
            continue;
        }
        let path = service.config_path().display();
        match reload(&service).await {
            Ok(()) => tracing::info!("account commands refreshed: reloaded {path}"),
            // Hook for the metrics: count failed account refreshes here.
            Err(e) => tracing::error!(
                "account command refresh failed, keeping the last good accounts: {e}"
            ),
        }
        seen = service.policy();
        since = std::time::Instant::now();
    }
}

/// The shortest `refresh` of the policy's `command:` sources.
fn command_refresh(policy: &Policy) -> Option<std::time::Duration> {
    policy
        .config
        .domains
        .values()
        .flat_map(|d| d.accounts.iter().flatten())
        .filter_map(|s| match s {
            crate::config::AccountSource::Command(c) => Some(c.refresh.0),
            _ => None,
        })
        .min()
}
