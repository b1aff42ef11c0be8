//! The policy in force, as the milter and the service's tasks read it.
//!
//! A low floor: it knows the policy and nothing that runs. The policy is
//! immutable and replaced whole (docs/design.md §7 "Reload"); a message
//! keeps the `Arc` it took at MAIL FROM. Only the reload path installs
//! (src/service/); everything else reads.

use crate::policy::Policy;
use std::sync::{Arc, RwLock};

/// The policy in force now, shared by handle.
#[derive(Debug)]
pub struct LivePolicy(RwLock<Arc<Policy>>);

impl LivePolicy {
    pub fn new(policy: Policy) -> LivePolicy {
        LivePolicy(RwLock::new(Arc::new(policy)))
    }

    /// The policy in force now. A poisoned lock still holds a complete
    /// policy (it is only ever replaced whole), so it is used rather than
    /// failing.
    pub fn current(&self) -> Arc<Policy> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `policy` in force. Only the reload path calls it, holding the
    /// writer's lock (src/service/).
    pub(crate) fn replace(&self, policy: Policy) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }
}
