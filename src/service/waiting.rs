//! The running milter's count of what waits in Postfix's queue for the
//! metrics (src/postfix/queue.rs reads the queue; docs/postfix.md "Mail
//! waiting in the queue"). A task of the service, beside the metrics
//! rather than in src/postfix/, so that the Postfix readers do not import
//! the metrics that import them.

use crate::live::LivePolicy;
use crate::metrics::Metrics;
use crate::postfix::queue::{status_line, waiting, Waiting};
use std::sync::Arc;

/// How often the running milter counts what waits (`postqueue -j` asks
/// showq to read the queue, as `mailq` does; every 15 s, a usual scrape
/// interval). A message Postfix is retrying at that moment is in the
/// active queue without its delay reason, so one count may be short by
/// the messages being retried; the next one sees them again.
const LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// Counts what waits for the metrics (`dualroute_queue_waiting_*`) every
/// [`LOOK_EVERY`] for the life of the service, on the blocking pool, while the
/// configuration says `mta: postfix` and a configured Postfix is here. A
/// failed count is logged once (WARN) until one succeeds again; it never
/// affects mail flow.
pub(crate) async fn follow(policy: Arc<LivePolicy>, metrics: Arc<Metrics>) {
    let mut failing = false;
    let mut last = Waiting::default();
    loop {
        if policy.current().config.mta == crate::config::Mta::Postfix {
            let counted = tokio::task::spawn_blocking(|| waiting(None))
                .await
                .unwrap_or_else(|e| Err(format!("the count failed: {e}")));
            match counted {
                Ok(Some(w)) => {
                    // Said when it changes, not at every look.
                    if w != last && w.recipients > 0 {
                        tracing::warn!("{}", status_line(w));
                    }
                    last = w;
                    metrics.waiting(w);
                    failing = false;
                }
                Ok(None) => {}
                Err(e) if !failing => {
                    tracing::warn!("cannot count the mail waiting in Postfix's queue: {e}");
                    failing = true;
                }
                Err(_) => {}
            }
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
}
