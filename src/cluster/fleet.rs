//! The breaker's failures across the fleet (DESIGN.md §11: "the breaker
//! counts the fleet's failures together against `threshold`"). Each
//! node's breaker counts what its own MTA logged; through this handle it
//! hands every counted failure to the node's fleet task, which adds it to
//! a sorted set in Redis (one per domain and kind, scored by time, one
//! member per node, queue id and recipient, so a failure is counted once),
//! and learns how many the other nodes counted within the window. The
//! breaker trips when its own count and the others' together reach the
//! threshold. Redis down: each node counts alone, as without `cluster:`.

use std::collections::HashMap;
use std::sync::Mutex;

/// A failure counted by this node's breaker, to be shared.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Counted {
    pub domain: String,
    /// `bounce` or `deferral`.
    pub kind: &'static str,
    /// The MTA's queue id and the recipient: one failure however often
    /// it is logged.
    pub queue_id: String,
    pub recipient: String,
    /// When it was counted (Unix seconds).
    pub at: u64,
}

/// Shared between the breaker (writer of [`Counted`], reader of the
/// others' counts) and the fleet task.
#[derive(Debug, Default)]
pub struct FleetFailures {
    pending: Mutex<Vec<Counted>>,
    /// (domain, kind) → failures the other nodes counted within the window,
    /// as of the last sync.
    others: Mutex<HashMap<(String, &'static str), u32>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FleetFailures {
    /// The breaker counted `c`.
    pub fn counted(&self, c: Counted) {
        let mut pending = lock(&self.pending);
        // Bounded: while Redis is away the list would otherwise grow with
        // every failure; the newest matter for the window.
        if pending.len() >= 10_000 {
            pending.remove(0);
        }
        pending.push(c);
    }

    /// What the other nodes counted for `domain` and `kind` in the window.
    pub fn others(&self, domain: &str, kind: &'static str) -> u32 {
        lock(&self.others)
            .get(&(domain.to_owned(), kind))
            .copied()
            .unwrap_or(0)
    }

    /// Every (domain, kind) the other nodes have counts for.
    pub fn domains(&self) -> Vec<(String, &'static str)> {
        lock(&self.others).keys().cloned().collect()
    }

    /// Whether failures wait to be shared.
    pub fn has_pending(&self) -> bool {
        !lock(&self.pending).is_empty()
    }

    /// The failures to push (the fleet task), taken.
    pub(super) fn take(&self) -> Vec<Counted> {
        std::mem::take(&mut *lock(&self.pending))
    }

    /// Puts back what could not be pushed (Redis away).
    pub(super) fn put_back(&self, mut failed: Vec<Counted>) {
        let mut pending = lock(&self.pending);
        failed.append(&mut pending);
        *pending = failed;
    }

    /// The others' counts as of now (the fleet task).
    pub(super) fn set_others(&self, others: HashMap<(String, &'static str), u32>) {
        *lock(&self.others) = others;
    }
}
