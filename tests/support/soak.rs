//! What the fault soaks share (tests/kill_soak.rs, tests/cluster_e2e.rs):
//! their size knobs and the load's progress, which paces the faults by
//! messages, not by time (a faster machine meets the same faults).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// A whole-number knob from the environment (`DUALROUTE_SOAK_*`), or
/// `default`.
pub fn knob(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected a whole number")),
        Err(_) => default,
    }
}

/// How far the load has gone, for the fault thread.
#[derive(Default)]
pub struct Progress {
    /// Messages the clients have started (the next index to take).
    pub started: AtomicUsize,
    /// Set when every client has finished.
    pub done: AtomicBool,
}

impl Progress {
    /// Waits until the clients have started `count` messages. False when
    /// the load ended first.
    pub fn reached(&self, count: usize) -> bool {
        loop {
            if self.done.load(Ordering::SeqCst) {
                return false;
            }
            if self.started.load(Ordering::SeqCst) >= count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
