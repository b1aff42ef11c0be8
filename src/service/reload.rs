//! The two tasks that ask for a reload when the accounts may have changed
//! (docs/design.md §5, §7): the account-file watch and the account-command
//! refresh. Both ask the reload actor (src/service/actor.rs) through an
//! [`Installer`], as SIGHUP does; the actor keeps the running policy when
//! the new one fails to load or shrinks a domain's accounts past
//! `accounts_shrink_limit`, and records the refusal under `state_dir` for
//! `dualroute status`.

use crate::live::{Installer, LivePolicy};
use crate::policy::Policy;
use crate::state;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Reloads configuration and accounts when an account file changes
/// (checked every `every`). A change is acted on once
/// the file has been still for one interval, so that a file being
/// rewritten is not read half written. A failed reload keeps the running
/// policy and is retried only after a file changes again.
pub(crate) async fn watch_accounts(
    policy: Arc<LivePolicy>,
    installer: Installer,
    config_path: PathBuf,
    every: Duration,
) {
    // The milter has just started with everything loaded: a refusal
    // recorded by an earlier run no longer describes it.
    let dir = state::StateDir::new(&policy.current().config.state_dir);
    if let Err(e) = dir.clear_reload_refused() {
        tracing::warn!("cannot clear the record of a refused reload: {e}");
    }
    // What the files looked like at the last look, and what a reload
    // failed on (not retried until a file changes again).
    let mut last_seen = None;
    let mut failed_for = None;
    loop {
        tokio::time::sleep(every).await;
        let now_policy = policy.current();
        let now: Vec<_> = now_policy
            .account_files
            .iter()
            .map(|(p, _)| file_stamp(p))
            .collect();
        let changed: Vec<String> = now_policy
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
        let path = config_path.display();
        match installer.reload().await {
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
/// from a directory") every `refresh`, through the same reload actor as an
/// account file change: the same empty and shrink guards apply, and a
/// failed run keeps the accounts in force. The shortest `refresh` of the
/// policy in force counts; any reload (SIGHUP, a file change) starts the
/// wait again, since it ran the commands too.
pub(crate) async fn refresh_commands(
    live: Arc<LivePolicy>,
    installer: Installer,
    config_path: PathBuf,
    every: Duration,
) {
    let mut seen = live.current();
    let mut since = std::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let policy = live.current();
        if !Arc::ptr_eq(&policy, &seen) {
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
        let path = config_path.display();
        match installer.reload().await {
            Ok(()) => tracing::info!("account commands refreshed: reloaded {path}"),
            // Hook for the metrics: count failed account refreshes here.
            Err(e) => tracing::error!(
                "account command refresh failed, keeping the last good accounts: {e}"
            ),
        }
        seen = live.current();
        since = std::time::Instant::now();
    }
}

/// The shortest `refresh` of the policy's `command:` sources.
fn command_refresh(policy: &Policy) -> Option<Duration> {
    policy
        .config
        .domains
        .values()
        .flat_map(|d| d.accounts.iter().flatten().chain(d.destination_list()))
        .filter_map(|s| match s {
            crate::config::AccountSource::Command(c) => Some(c.refresh.0),
            _ => None,
        })
        .min()
}
