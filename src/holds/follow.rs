//! Follows `state_dir` for the running service, so that the milter obeys
//! `dualroute enable`/`disable` and a breaker trip written by another
//! process within seconds (docs/design.md, "Routing off").

use crate::service::Service;
use std::sync::Arc;

/// Re-reads the holds every `service.intervals.state` for the life of the
/// service, and logs a line when routing for a domain goes off or on.
pub async fn run(service: Arc<Service>) {
    let mut last_errors = Vec::new();
    let mut tried = None;
    loop {
        tokio::time::sleep(service.intervals.state).await;
        let names = {
            let policy = service.policy();
            let mut names: Vec<String> = policy.domains.keys().cloned().collect();
            names.sort();
            names
        };
        let snapshot = |service: &Service| {
            let now = service.holds();
            names
                .iter()
                .map(|n| now.get(n).cloned())
                .collect::<Vec<_>>()
        };
        let before = snapshot(&service);
        // File reads are blocking I/O: off the runtime's workers.
        let reader = service.clone();
        let (errors, confirmed) = tokio::task::spawn_blocking(move || {
            let errors = reader.refresh_holds();
            (errors, reader.shrink_confirmed())
        })
        .await
        .unwrap_or_default();
        // `dualroute confirm-accounts` wrote its confirmation: reload now,
        // through the one reload path, rather than at the next change of
        // an account source.
        if let Some((domain, since)) = confirmed.filter(|c| tried.as_ref() != Some(c)) {
            // One reload per confirmation: a failed one waits for the next
            // confirmation or a change of the sources.
            tried = Some((domain.clone(), since));
            let path = service.config_path().display();
            match crate::service::reload::reload(&service).await {
                Ok(()) => tracing::info!(
                    "{domain}: the administrator confirmed the new account list: reloaded {path}"
                ),
                Err(e) => tracing::error!(
                    "{domain}: the administrator confirmed the new account list, but the reload failed: {e}"
                ),
            }
        }
        let after = snapshot(&service);
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
