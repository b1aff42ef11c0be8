//! The real `dualroute` binary as the tests run it: `dualroute run` as a
//! child process ([`MilterProcess`]), a one-shot command such as `status`
//! or `enable` ([`dualroute`]), and `dualroute postfix-config` fed into a
//! private Postfix instance ([`postfix_config`], [`PostfixConfig::apply_to`]).
//!
//! (`protocol.rs` has the other milter: `dualroute::run` in-process,
//! driven by indymilter-test.)

use super::{is_listening, Port, PostfixOptions};
use std::fs;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long `dualroute run` may take to listen, or to exit after a signal.
const START: Duration = Duration::from_secs(10);

/// What `dualroute run` logs when it serves (src/service/mod.rs, beside
/// sd_notify READY=1).
const READY: &str = " listening on ";

/// `dualroute run --config …` as a child process, its stderr appended to a
/// log file (logging `info`, and `debug` for dualroute itself: the
/// decisions). Killed on Drop.
///
/// On TCP it gets its listening socket from the test, by systemd's socket
/// activation protocol (sd_listen_fds(3): the socket as fd 3, LISTEN_FDS=1,
/// LISTEN_PID its pid; docs/design.md "Socket activation"), on a [`Port`]
/// the test reserved: no other process can take the port, before the
/// first start or between a kill and the next [`MilterProcess::spawn`].
pub struct MilterProcess {
    child: Option<Child>,
    /// `listen: inet:127.0.0.1:PORT` (`None` for a unix socket).
    port: Option<Port>,
    /// `listen: unix:PATH` instead of the port.
    socket: Option<PathBuf>,
    /// Extra environment (NOTIFY_SOCKET, JOURNAL_STREAM, a DUALROUTE_LOG of
    /// the test's own).
    env: Vec<(String, String)>,
    config: PathBuf,
    log: PathBuf,
}

impl MilterProcess {
    /// Starts the milter on `config`, whose `listen:` is
    /// `inet:127.0.0.1:PORT`, and waits until it listens.
    pub fn start(config: &Path, port: &Port, log: &Path) -> MilterProcess {
        let mut milter = MilterProcess {
            child: None,
            port: Some(port.try_clone()),
            socket: None,
            env: Vec::new(),
            config: config.to_owned(),
            log: log.to_owned(),
        };
        milter.spawn();
        milter
    }

    /// Starts the milter on `config`, whose `listen:` is `unix:SOCKET`, with
    /// extra environment variables, and waits until the socket accepts.
    pub fn start_unix(
        config: &Path,
        socket: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> MilterProcess {
        let mut milter = MilterProcess {
            child: None,
            port: None,
            socket: Some(socket.to_owned()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            config: config.to_owned(),
            log: log.to_owned(),
        };
        milter.spawn();
        milter
    }

    /// Starts the milter on `config` (`listen: inet:127.0.0.1:PORT`) with
    /// extra environment variables, and waits until it listens.
    pub fn start_with_env(
        config: &Path,
        port: &Port,
        log: &Path,
        env: &[(&str, &str)],
    ) -> MilterProcess {
        let mut milter = MilterProcess {
            child: None,
            port: Some(port.try_clone()),
            socket: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            config: config.to_owned(),
            log: log.to_owned(),
        };
        milter.spawn();
        milter
    }

    /// Whether the milter's socket accepts connections.
    fn is_serving(&self) -> bool {
        match (&self.socket, &self.port) {
            (Some(path), _) => std::os::unix::net::UnixStream::connect(path).is_ok(),
            (None, Some(port)) => is_listening(port.number()),
            (None, None) => false,
        }
    }

    /// Where the milter listens, for messages.
    fn endpoint(&self) -> String {
        match (&self.socket, &self.port) {
            (Some(path), _) => format!("unix:{}", path.display()),
            (None, Some(port)) => port.addr().to_string(),
            (None, None) => "nowhere".to_owned(),
        }
    }

    /// The process id of the running milter.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the milter is not running").id()
    }

    /// Starts the binary (again, after [`MilterProcess::kill`]) and waits
    /// until its port listens.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the milter is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let started_before = self.log().matches(READY).count();
        // The Command holds our copy of the listening socket: it goes out
        // of scope with spawn, so that only the child listens.
        let mut child = match &self.port {
            Some(port) => activated(port.listen()),
            None => Command::new(env!("CARGO_BIN_EXE_dualroute")),
        }
        .args(["run", "--config"])
        .arg(&self.config)
        .env("DUALROUTE_LOG", "info,dualroute=debug")
        .env("NO_COLOR", "1")
        .envs(self.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("run dualroute");
        let deadline = Instant::now() + START;
        // A passed socket listens from the fork on, before the milter has
        // loaded its configuration: ready is its "listening on" line (what
        // it logs as it tells systemd READY=1), one more than before. A
        // unix socket it binds itself, after loading (tests/socket.rs
        // signals it while it is stalled there).
        let ready = |milter: &Self| {
            milter.is_serving()
                && (milter.port.is_none() || milter.log().matches(READY).count() > started_before)
        };
        while !ready(self) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "dualroute run exited ({status}) before listening on {}:\n{}",
                    self.endpoint(),
                    self.log()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "dualroute run does not listen on {} after {START:?}:\n{}",
                    self.endpoint(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// SIGKILL, as a crash would. Waits until the port is closed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.is_serving() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !self.is_serving(),
            "milter {} still open after kill",
            self.endpoint()
        );
    }

    /// Sends a signal by name (`HUP`, `TERM`) to the running milter.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("the milter is not running").id();
        let ok = Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Whether the process is still there (it has not exited by itself).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Waits for the process to exit by itself (after a signal) and
    /// returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the milter is not running");
        let deadline = Instant::now() + START;
        loop {
            if let Some(status) = child.try_wait().expect("wait for dualroute run") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "dualroute run did not exit within {START:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where the milter listens (TCP).
    pub fn addr(&self) -> SocketAddr {
        self.port
            .as_ref()
            .expect("the milter listens on a unix socket")
            .addr()
    }

    /// Everything the milter logged so far, without colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Waits until the log has `n` lines that contain every one of
    /// `words`, and returns the `n`th (fails the test, with the log, when
    /// that does not happen within [`super::WAIT`]).
    #[track_caller]
    pub fn wait_log(&self, words: &[&str], n: usize) -> String {
        let found = super::poll(|| {
            self.log()
                .lines()
                .filter(|l| words.iter().all(|w| l.contains(w)))
                .nth(n.saturating_sub(1))
                .map(str::to_owned)
        });
        found.unwrap_or_else(|| {
            panic!(
                "no {n}th log line with {words:?} in the milter's log:\n{}",
                self.log()
            )
        })
    }

    /// Whether the metrics endpoint (`metrics.listen`, which the milter
    /// binds itself) serves on 127.0.0.1:`port`: `Err` with the milter's
    /// words when it could not bind it, for
    /// [`super::ports::start_on_a_port`] to try another port.
    pub fn metrics_bound(&self, port: u16) -> Result<(), String> {
        let serving = format!("metrics: serving http://127.0.0.1:{port}/metrics");
        let refused = format!("metrics: cannot listen on 127.0.0.1:{port}");
        let found = super::poll(|| {
            self.log()
                .lines()
                .find(|l| l.contains(&serving) || l.contains(&refused))
                .map(str::to_owned)
        });
        match found {
            Some(line) if line.contains(&serving) => Ok(()),
            Some(line) => Err(line),
            None => panic!(
                "the milter says neither {serving:?} nor {refused:?}:\n{}",
                self.log()
            ),
        }
    }

    /// The milter.yaml it runs with.
    pub fn config(&self) -> &Path {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for MilterProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `dualroute` started with `listener` as a socket-activated service
/// would be: the socket as fd 3 (SD_LISTEN_FDS_START), LISTEN_FDS=1, and
/// LISTEN_PID the pid of the process that execs `dualroute`. The pid is
/// only known after fork, so a shell sets it (`$$`) and execs the binary
/// in place, keeping its pid, as systemd sets it between fork and exec.
pub fn activated(listener: std::net::TcpListener) -> Command {
    let mut command = Command::new("/bin/sh");
    command
        .args([
            "-c",
            "LISTEN_PID=$$ LISTEN_FDS=1; export LISTEN_PID LISTEN_FDS; exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_dualroute"),
        ])
        .env_remove("LISTEN_FDNAMES");
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls dup2 and fcntl, which are async-signal-safe; `fd` is open (the
    // listener lives in this process until spawn returns: the closure keeps
    // it), and fd 3 is free to be replaced (std set up 0-2 already; every
    // other descriptor of the test is close-on-exec).
    unsafe {
        command.pre_exec(move || {
            let fd = listener.as_raw_fd();
            let moved = if fd == 3 {
                // dup2 onto itself would keep FD_CLOEXEC.
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if moved == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs `dualroute ARGS --config CONFIG` to the end; for a test that cares
/// which of stdout and stderr says something.
pub fn dualroute_output(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run dualroute")
}

/// Runs `dualroute ARGS --config CONFIG` and returns its exit status and
/// what it wrote (stdout, then stderr).
pub fn dualroute(config: &Path, args: &[&str]) -> (ExitStatus, String) {
    let out = dualroute_output(config, args);
    (
        out.status,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// What `dualroute postfix-config` produced for a configuration.
pub struct PostfixConfig {
    /// `name = value` lines of main.cf.dualroute.
    pub main_cf: Vec<String>,
    /// master.cf.dualroute, line by line.
    pub master_cf: Vec<String>,
    /// (file name, contents) of each table.
    pub tables: Vec<(String, String)>,
    /// The printed form (`postfix-config` without `--write`), for messages.
    pub printed: String,
}

/// Runs `dualroute postfix-config --map-dir /etc/postfix` on `config`, once
/// printing and once with `--write out_dir`, and reads what it wrote.
pub fn postfix_config(config: &Path, out_dir: &Path) -> PostfixConfig {
    let run = |extra: &[&str]| {
        let args = [&["postfix-config", "--map-dir", "/etc/postfix"], extra].concat();
        let output = dualroute_output(config, &args);
        assert!(
            output.status.success(),
            "dualroute postfix-config failed ({}):\n{}\n--- milter.yaml ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            fs::read_to_string(config).unwrap_or_default()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let out = out_dir.to_str().expect("a UTF-8 temporary path");
    let printed = run(&[]);
    let written = run(&["--write", out]);
    let read = |name: &str| {
        fs::read_to_string(out_dir.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    };
    let main_cf: Vec<String> = read("main.cf.dualroute")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let master_cf: Vec<String> = read("master.cf.dualroute")
        .lines()
        .map(str::to_owned)
        .collect();
    let tables = written
        .lines()
        .filter_map(|path| Path::new(path.trim()).file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".cf.dualroute"))
        .map(|name| {
            let contents = read(&name);
            (name, contents)
        })
        .collect();
    // Both forms say the same about main.cf.
    for line in &main_cf {
        assert!(
            printed.contains(line.as_str()),
            "{line:?} missing from the printed form:\n{printed}"
        );
    }
    PostfixConfig {
        main_cf,
        master_cf,
        tables,
        printed,
    }
}

impl PostfixConfig {
    /// Whether postfix-config generated the table `name`.
    pub fn has_table(&self, name: &str) -> bool {
        self.tables.iter().any(|(table, _)| table == name)
    }

    /// Adds all of it to a Postfix instance's options: every main.cf and
    /// master.cf line and every table, and, where there is a
    /// `dualroute_catchall` (split/route domains), that table in
    /// `virtual_mailbox_maps` after the instance's own mailbox table: the
    /// step docs/postfix.md §3 does by hand.
    pub fn apply_to(&self, mut opts: PostfixOptions) -> PostfixOptions {
        for line in &self.main_cf {
            opts = opts.main_cf(line);
        }
        if self.has_table("dualroute_catchall") {
            opts = opts.main_cf(
                "virtual_mailbox_maps = hash:$config_directory/vmailbox, hash:/etc/postfix/dualroute_catchall",
            );
        }
        for line in &self.master_cf {
            opts = opts.master_cf(line);
        }
        for (name, contents) in &self.tables {
            opts = opts.map(name, contents);
        }
        opts
    }
}

/// A temporary tree for `dualroute run` on a unix socket: `milter.yaml`
/// listening on `spool/dualroute.sock` below it, state in `state/`, and a
/// dual domain `example.com` whose only account is alice@ (so an unknown
/// recipient is refused at RCPT: only a milter applying this policy does
/// that).
pub struct UnixTree {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
}

impl UnixTree {
    pub fn new(prefix: &str) -> UnixTree {
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("temporary directory");
        let dir = tmp.path().to_path_buf();
        let sockdir = dir.join("spool");
        fs::create_dir(&sockdir).expect("create the socket directory");
        let socket = sockdir.join("dualroute.sock");
        let config = unix_config(&dir, &socket);
        UnixTree {
            _tmp: tmp,
            dir,
            socket,
            config,
        }
    }
}

/// Writes DIR/milter.yaml listening on `unix:SOCKET` (see [`UnixTree`]).
pub fn unix_config(dir: &Path, socket: &Path) -> PathBuf {
    let path = dir.join("milter.yaml");
    fs::write(
        &path,
        format!(
            "listen: unix:{}\ninstance: unix.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: dual\n    destination: {{ hosts: [\"[127.0.0.1]:9\"] }}\n    accounts:\n      - list: [alice@example.com]\n",
            socket.display(),
            dir.join("state").display()
        ),
    )
    .expect("write milter.yaml");
    path
}
