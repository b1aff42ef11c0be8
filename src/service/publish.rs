//! Publishes what the milter runs in `state_dir` (src/running.rs) for
//! `dualroute status`: at start, by the reload actor after every request it
//! performs (before it answers, so that once `systemctl reload` returns,
//! `status` shows the new configuration), and by a task every second,
//! which rewrites the record when anything else changed and every
//! `running::HEARTBEAT` besides. Both go through one [`Publisher`]: it
//! builds the record from the handles in force under its lock, so the
//! last write is always of the newest state (docs/design.md "One
//! writer": the actor changes the handles, this only reads them).

use crate::holds::LiveHolds;
use crate::live::LivePolicy;
use crate::running::{self, Running};
use crate::state::StateDir;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the task looks at the handles.
const LOOK: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct Publisher {
    config_path: PathBuf,
    started: u64,
    policy: Arc<LivePolicy>,
    holds: Arc<LiveHolds>,
    last: Mutex<Last>,
}

#[derive(Debug, Default)]
struct Last {
    /// What was written last, and when.
    written: Option<(Running, Instant)>,
    /// Where: a reload that moves state_dir removes the old record.
    dir: Option<StateDir>,
    failed: bool,
}

impl Publisher {
    pub fn new(config_path: PathBuf, policy: Arc<LivePolicy>, holds: Arc<LiveHolds>) -> Publisher {
        Publisher {
            config_path,
            started: crate::state::now(),
            policy,
            holds,
            last: Mutex::default(),
        }
    }

    /// Writes the record when it changed or the heartbeat is due.
    /// Blocking (a small file): from the actor's blocking pool, or the
    /// task's.
    pub fn publish(&self) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let p = self.policy.current();
        let now = Running::of(&self.config_path, self.started, &p, &self.holds.current());
        let due = match &last.written {
            Some((w, at)) => !w.same(&now) || at.elapsed() >= running::HEARTBEAT,
            None => true,
        };
        if !due {
            return;
        }
        let dir = StateDir::new(&p.config.state_dir);
        match running::write(&dir, &now) {
            Ok(()) => {
                if last.failed {
                    tracing::info!(
                        "the live state for `dualroute status` is written to {} again",
                        dir.dir.display()
                    );
                }
                last.failed = false;
                if let Some(old) = last.dir.replace(dir.clone()) {
                    if old.dir != dir.dir {
                        running::remove(&old);
                    }
                }
            }
            Err(e) => {
                if !last.failed {
                    tracing::error!(
                        "cannot write the live state for `dualroute status` to {}: {e}; status will say that no milter publishes; make state_dir writable by the service user",
                        dir.dir.display()
                    );
                }
                last.failed = true;
            }
        }
        last.written = Some((now, Instant::now()));
    }

    /// Removes the record: the service stops.
    fn remove(&self) {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(dir) = &last.dir {
            running::remove(dir);
        }
    }
}

/// Removes the record when the task ends (aborted as the service stops):
/// `status` then says at once that no milter runs.
struct Remove(Arc<Publisher>);

impl Drop for Remove {
    fn drop(&mut self) {
        self.0.remove();
    }
}

pub(crate) async fn run(publisher: Arc<Publisher>) {
    let guard = Remove(publisher);
    loop {
        let p = guard.0.clone();
        // A small file write: off the runtime's worker threads.
        let _ = tokio::task::spawn_blocking(move || p.publish()).await;
        tokio::time::sleep(LOOK).await;
    }
}
