//! Follows `state_dir` for the running service, so that the milter obeys
//! `dualroute enable`/`disable` and a breaker trip written by another
//! process within seconds (docs/design.md, "Routing off").

use super::LiveHolds;
use crate::live::{Installer, LivePolicy};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Re-reads the holds every `every` for the life of the service, through
/// the reload actor (the one writer), and logs a line when routing for a
/// domain goes off or on. `config_path` is only named in the log.
pub(crate) async fn run(
    policy: Arc<LivePolicy>,
    holds: Arc<LiveHolds>,
    installer: Installer,
    config_path: Arc<Path>,
    every: Duration,
) {
    let mut last_errors = Vec::new();
    let mut tried = None;
    loop {
        tokio::time::sleep(every).await;
        let names = {
            let policy = policy.current();
            let mut names: Vec<String> = policy.domains.keys().cloned().collect();
            names.sort();
            names
        };
        let snapshot = || {
            let now = holds.current();
            names
                .iter()
                .map(|n| now.get(n).cloned())
                .collect::<Vec<_>>()
        };
        let before = snapshot();
        // The actor reads the files on the blocking pool.
        let refreshed = installer.refresh(true).await;
        let (errors, confirmed) = (refreshed.errors, refreshed.confirmed);
        // `dualroute confirm-accounts` wrote its confirmation: reload now,
        // through the one reload path, rather than at the next change of
        // an account source.
        if let Some((domain, since)) = confirmed.filter(|c| tried.as_ref() != Some(c)) {
            // One reload per confirmation: a failed one waits for the next
            // confirmation or a change of the sources.
            tried = Some((domain.clone(), since));
            let path = config_path.display();
            match installer.reload().await {
                Ok(()) => tracing::info!(
                    "{domain}: the administrator confirmed the new account list: reloaded {path}"
                ),
                Err(e) => tracing::error!(
                    "{domain}: the administrator confirmed the new account list, but the reload failed: {e}"
                ),
            }
        }
        let after = snapshot();
        for ((name, was), now) in names.iter().zip(&before).zip(&after) {
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
