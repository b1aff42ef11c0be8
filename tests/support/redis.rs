//! A private `redis-server` for the cluster tests (issue 24,
//! docs/design.md "Several MX hosts"): loopback only, on a port of its own,
//! no persistence (`--save "" --appendonly no`), its working directory in a
//! temporary tree. The test can kill it (SIGKILL, as a crash or a pulled
//! cable would) and start it again on the same port with nothing in it,
//! which is what a Redis without persistence looks like after a restart,
//! or with the data of an explicit `SAVE` (a Redis with persistence, or
//! a network partition that healed).
//!
//! Redis binds its own port (it takes no socket from us and has no port
//! 0), so it is started through [`ports::start_on_a_port`]: a candidate
//! port from the daemons' range, and another one when something else had
//! it (tests/support/ports.rs).
//!
//! Requirement: Debian's `redis-server` package (`redis-server` and
//! `redis-cli`); `scripts/test-deps.sh` installs it. A missing binary fails
//! the test, it is never skipped.

use super::{keep_tmp, ports};
use std::fs;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const NOT_INSTALLED: &str = "redis-server is not installed: run scripts/test-deps.sh (as root) \
     or `apt-get install redis-server`";

/// How long a fresh redis-server may take to listen (it starts in a few
/// milliseconds; the margin is for a loaded test machine).
const START: Duration = Duration::from_secs(10);

/// A running private `redis-server`; killed when dropped.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    tmp: Option<tempfile::TempDir>,
    /// The working directory of the current run (emptied at each start).
    dir: PathBuf,
    /// Restarts so far, to name each run's log.
    runs: u32,
}

impl Redis {
    /// Starts redis-server on a free loopback port.
    pub fn start() -> Redis {
        let tmp = tempfile::Builder::new()
            .prefix("dualroute-redis.")
            .tempdir()
            .expect("create a temporary directory");
        let dir = tmp.path().join("data");
        let (child, port) = ports::start_on_a_port("redis-server", |port| {
            spawn(&dir, tmp.path(), 0, port).map(|child| (child, port))
        });
        Redis {
            child: Some(child),
            port,
            tmp: Some(tmp),
            dir,
            runs: 0,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL for `cluster.redis` in a milter.yaml: database 0 of this
    /// server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server with SIGKILL (no shutdown, no save) and waits until
    /// it is gone: from now on a connection to the port is refused.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the server runs (not killed, not exited by itself).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts the server again on the same port, empty: a new working
    /// directory and no persistence, as a Redis without persistence comes
    /// back after a crash. Kills the running one first if there is one.
    /// The nodes under test have this port in their configuration, so it
    /// cannot move: when another process took it meanwhile, the test fails
    /// and says so.
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
        self.respawn();
    }

    /// Saves the data (`SAVE`: a snapshot in the working directory) and
    /// kills the server; the outage lasts until [`Redis::come_back`]. A
    /// Redis with persistence that crashed, or a network partition: the
    /// nodes lose it for a while and find it again with its data.
    pub fn save_and_kill(&mut self) {
        assert_eq!(self.cli(&["SAVE"]).trim(), "OK", "SAVE before the kill");
        self.kill();
    }

    /// Starts the killed server again on the same port with whatever its
    /// working directory holds (the snapshot of [`Redis::save_and_kill`]).
    pub fn come_back(&mut self) {
        self.kill();
        self.respawn();
    }

    fn respawn(&mut self) {
        self.runs += 1;
        let base = self.tmp.as_ref().expect("the temporary tree").path();
        let child = spawn(&self.dir, base, self.runs, self.port).unwrap_or_else(|why| {
            panic!(
                "redis-server could not listen on 127.0.0.1:{} again: {why}",
                self.port
            )
        });
        self.child = Some(child);
    }

    /// Runs `redis-cli` against this server with `args` (e.g. `["DBSIZE"]`,
    /// `["KEYS", "*"]`, `["FLUSHALL"]`) and returns what it printed, stdout
    /// then stderr. redis-cli exits 0 on a Redis error reply too: the text
    /// then starts with `ERR` or similar, for the test to check.
    pub fn cli(&self, args: &[&str]) -> String {
        let cli = find("redis-cli");
        let port = self.port.to_string();
        let output = Command::new(&cli)
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", cli.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "redis-cli {args:?} against 127.0.0.1:{port} failed ({}): {text}",
            output.status
        );
        text
    }

    /// The server's log of all its runs, for failure messages.
    pub fn log(&self) -> String {
        let Some(tmp) = self.tmp.as_ref() else {
            return String::new();
        };
        (0..=self.runs)
            .map(|run| {
                let path = log_path(tmp.path(), run);
                format!(
                    "--- {} ---\n{}",
                    path.display(),
                    fs::read_to_string(&path).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if let Some(tmp) = self.tmp.take() {
            if keep_tmp() {
                eprintln!(
                    "DUALROUTE_KEEP_TMP: kept the redis-server tree {}",
                    tmp.keep().display()
                );
            }
        }
    }
}

fn log_path(base: &Path, run: u32) -> PathBuf {
    base.join(format!("redis.{run}.log"))
}

/// `redis-server` or `redis-cli` from $PATH or /usr/bin (Debian's place).
fn find(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{NOT_INSTALLED} ({name} not found)"))
}

/// Runs redis-server on 127.0.0.1:`port` with its working directory
/// `dir` (created empty) and its log in `base`, and waits until it listens
/// there. `Err` (the child killed) when it could not bind the port: it
/// exits saying so, or another process listens there.
fn spawn(dir: &Path, base: &Path, run: u32, port: u16) -> Result<Child, String> {
    let server = find("redis-server");
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let log = log_path(base, run);
    // Read back when the server exits at start (the reason it gives).
    let mut stdout = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&log)
        .unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    // Options on the command line, no configuration file: nothing from
    // /etc/redis is read. `--daemonize no` keeps it our child, so SIGKILL
    // reaches it; `--logfile ""` logs to stdout, which goes to the file.
    let mut child = Command::new(&server)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .args(["--logfile", ""])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().expect("clone a file handle"))
        .stderr(stdout.try_clone().expect("clone a file handle"))
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e} ({NOT_INSTALLED})", server.display()));
    let pid = child.id();
    let bound = ports::wait_bound(
        port,
        START,
        || vec![pid],
        || {
            let status = child.try_wait().ok().flatten()?;
            let mut message = String::new();
            let _ = stdout.rewind();
            let _ = stdout.read_to_string(&mut message);
            Some(format!("redis-server exited ({status}): {message}"))
        },
    );
    match bound {
        Ok(()) => Ok(child),
        Err(ports::NotBound::Taken(why)) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(why)
        }
        Err(ports::NotBound::TimedOut) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "redis-server did not listen on 127.0.0.1:{port} within {START:?}; its log:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            )
        }
    }
}
