//! The callout engine in the running service (docs/design.md "Refusing
//! unknown recipients"): one [`Callouts`] for the life of the milter,
//! whose caches are read here, off the RCPT path, at start and after each
//! reload that brings a domain with `reject_unknown.callout`.

use crate::callout::{Callouts, Limits};
use crate::dns::Dns;
use crate::live::LivePolicy;
use crate::policy::Policy;
use std::sync::Arc;
use std::time::Duration;

/// The engine, greeting as `instance` with a resolver built as the
/// verification probe builds its own (src/service/verify.rs). `None` when
/// the resolver cannot be built: routed recipients of a domain with
/// `reject_unknown.callout` then get its `unreachable` answer
/// (src/milter/callout.rs), which the log says.
pub(super) fn build(policy: &Policy) -> Option<Arc<Callouts>> {
    match Dns::new(&policy.config.dns) {
        Ok(dns) => Some(Arc::new(Callouts::new(
            &policy.config.state_dir,
            &policy.config.instance,
            Arc::new(dns),
            Limits::default(),
        ))),
        Err(e) => {
            tracing::error!("reject_unknown: cannot build a DNS resolver for callouts: {e}; recipients that need one get their domain's `unreachable` answer until dualroute restarts");
            None
        }
    }
}

/// Reads the cache file of every domain of `policy` that asks callouts.
/// Blocking file reads: callers run it off the async threads.
fn load(callouts: &Callouts, policy: &Policy) {
    for (name, d) in &policy.domains {
        if d.config.reject_unknown.as_ref().is_some_and(|r| r.callout) {
            callouts.load(name, &d.config);
        }
    }
}

/// Loads the caches of the policy in force now, then follows reloads
/// (looked at every `every`): a domain a reload adds, or gives
/// `reject_unknown`, has its cache read before its first RCPT needs it.
/// Loading a domain already loaded keeps what it has.
pub(super) async fn follow(live: Arc<LivePolicy>, callouts: Arc<Callouts>, every: Duration) {
    let mut seen: Option<Arc<Policy>> = None;
    loop {
        let policy = live.current();
        if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &policy)) {
            let (c, p) = (callouts.clone(), policy.clone());
            if let Err(e) = tokio::task::spawn_blocking(move || load(&c, &p)).await {
                tracing::error!("reject_unknown: loading the callout caches failed: {e}; each is read at its domain's first callout instead");
            }
            seen = Some(policy);
        }
        tokio::time::sleep(every).await;
    }
}
