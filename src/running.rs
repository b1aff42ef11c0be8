//! What the running milter runs, published in `state_dir` for `dualroute
//! status` (issue 25; docs/design.md §7 "What runs").
//!
//! `status` used to read the files only: after an edit the SIGHUP missed,
//! or a reload the milter refused, it showed the configuration on disk
//! while the milter ran another (`shadow: false` in the file, "shadow
//! mode: changed nothing" in the log). So the running service writes
//! [`Running`] to `state_dir/running` when it starts, whenever the policy
//! or the holds in force change, and every [`HEARTBEAT`] besides; `status`
//! compares it with the files and with the process table. A low floor:
//! the record and how to read it, nothing that runs.

use crate::holds::Holds;
use crate::policy::Policy;
use crate::state::StateDir;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::time::Duration;

/// The file under `state_dir`.
pub const FILE: &str = "running";

/// How often the record is rewritten while nothing changes, so that a
/// milter that stopped publishing (hung, or its state_dir unwritable) is
/// told from one that runs.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// A record older than this, of a process that still exists, is of a
/// milter that no longer publishes: `status` says so and exits 2.
pub const STALE: Duration = Duration::from_secs(60);

/// What one running milter runs.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct Running {
    pub pid: u32,
    /// The process's start time in clock ticks after boot (/proc/PID/stat
    /// field 22): with the pid, which process this is, even once the pid
    /// is reused.
    #[serde(default)]
    pub proc_start: u64,
    pub version: String,
    /// When the process started (Unix seconds).
    pub started: u64,
    /// When this record was written.
    pub heartbeat: u64,
    /// The `milter.yaml` it runs, as given to `--config`.
    pub config_path: String,
    /// SHA-256 of the bytes of that file it loaded.
    pub config_sha256: String,
    /// When the policy in force was loaded.
    pub loaded: u64,
    /// Every domain of the policy in force.
    pub domains: BTreeMap<String, RunningDomain>,
}

/// One domain as the running milter has it.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct RunningDomain {
    pub mode: String,
    pub enabled: bool,
    pub shadow: bool,
    /// What holds routing off in the running milter, in a few words
    /// (`Hold::cause`); absent when it routes.
    #[serde(default)]
    pub hold: Option<String>,
}

impl Running {
    /// The record of `policy` and `holds` in force in this process.
    pub fn of(config_path: &Path, started: u64, policy: &Policy, holds: &Holds) -> Running {
        let c = &policy.config;
        let domains = c
            .domains
            .iter()
            .map(|(name, d)| {
                let hold = holds.get(&name.0).map(|h| h.cause().to_owned());
                (
                    name.0.clone(),
                    RunningDomain {
                        mode: d.mode.to_string(),
                        enabled: d.enabled,
                        shadow: c.shadow(d),
                        hold,
                    },
                )
            })
            .collect();
        Running {
            pid: std::process::id(),
            proc_start: own_start(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started,
            heartbeat: crate::state::now(),
            config_path: config_path.display().to_string(),
            config_sha256: policy.loaded.config_sha256.clone(),
            loaded: policy.loaded.at,
            domains,
        }
    }

    /// Whether `other` says the same as this record, the heartbeat aside.
    pub fn same(&self, other: &Running) -> bool {
        Running {
            heartbeat: other.heartbeat,
            ..self.clone()
        } == *other
    }
}

/// Writes the record (atomically, as every state file).
pub fn write(dir: &StateDir, running: &Running) -> io::Result<()> {
    dir.write_path(&dir.dir.join(FILE), running)
}

/// Removes the record: the milter stops.
pub fn remove(dir: &StateDir) {
    let _ = std::fs::remove_file(dir.dir.join(FILE));
}

/// The record, if a milter ever published one here.
pub fn read(dir: &StateDir) -> io::Result<Option<Running>> {
    dir.read_path(&dir.dir.join(FILE))
}

/// Whether the publisher of `running` is alive, as far as this process
/// can see.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Liveness {
    /// Its process exists and it published within [`STALE`].
    Alive,
    /// No process with its pid runs any more (killed, crashed, stopped
    /// without removing the record).
    Gone,
    /// Its process exists but has not published for this long.
    Silent(u64),
}

/// Looks `running` up in the process table (`/proc`) and at its
/// heartbeat.
pub fn liveness(running: &Running, now: u64) -> Liveness {
    let proc = Path::new("/proc").join(running.pid.to_string());
    // /proc/PID/comm is readable for any process, whoever runs `status`;
    // the milter's is "dualroute" (the binary's name, at most 15 bytes).
    // Where /proc is hidden (hidepid) the heartbeat alone decides.
    // The pid of another program that reused it has another start time
    // (field 22 of /proc/PID/stat); a killed milter its parent has not
    // reaped yet is a zombie (state Z). Where /proc is hidden (hidepid)
    // or unreadable the heartbeat alone decides.
    let alive = match std::fs::read_to_string(proc.join("stat")) {
        Ok(stat) => match stat_fields(&stat) {
            Some((state, start)) => {
                state != "Z"
                    && state != "X"
                    && (running.proc_start == 0 || start == running.proc_start)
            }
            None => true,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(_) => true,
    };
    let age = now.saturating_sub(running.heartbeat);
    if !alive {
        Liveness::Gone
    } else if age > STALE.as_secs() {
        Liveness::Silent(age)
    } else {
        Liveness::Alive
    }
}

/// The state and the start time (clock ticks after boot) in the text of
/// /proc/PID/stat: the fields after the command name, which is in
/// parentheses and may hold spaces and parentheses itself.
fn stat_fields(stat: &str) -> Option<(&str, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 3 is the state; field 22 the start time (proc(5)).
    Some((fields.first()?, fields.get(19)?.parse().ok()?))
}

/// This process's start time, as [`liveness`] compares it (0 when
/// /proc cannot say). It never changes: read once, not at every publish.
pub fn own_start() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| stat_fields(&s).map(|(_, start)| start))
            .unwrap_or(0)
    })
}
