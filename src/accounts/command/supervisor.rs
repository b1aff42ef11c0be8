//! One run of a `command:` account source, contained (docs/design.md §5
//! "Accounts from a command"): the program runs under a supervisor
//! process, forked for it, that is a child subreaper (prctl(2)
//! `PR_SET_CHILD_SUBREAPER`). Whatever the program leaves behind, even a
//! process that left its group with `setsid`, is reparented to the
//! supervisor instead of init, and the supervisor kills it when the run
//! ends: exit, timeout, or a stop asked by the reader (output bound).
//! A pid namespace would need privileges the service lacks
//! (CAP_SYS_ADMIN, or a user namespace, which the unit's
//! `RestrictNamespaces=yes` forbids), and a cgroup needs systemd's
//! `Delegate=`; a subreaper needs no privilege.

use crate::config::AccountCommand;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How much of the program's stderr is kept for the error message.
const MAX_STDERR: u64 = 2048;
/// How long the supervisor gets to end the run once asked to, before it
/// is killed itself (it needs milliseconds).
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Lists the children of the calling thread: the supervisor finds what
/// was reparented to it here (proc(5); Debian's kernels have
/// CONFIG_PROC_CHILDREN). Still there under the unit's `ProcSubset=pid`
/// and `ProtectProc=invisible` (tried: tests/accounts.rs passes with /proc
/// mounted `subset=pid,hidepid=invisible`).
const CHILDREN: &std::ffi::CStr = c"/proc/thread-self/children";

/// One run of a command under its supervisor.
pub(super) struct Run {
    child: std::process::Child,
    pub(super) stdout: Option<std::process::ChildStdout>,
    stderr: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    deadline: Instant,
    /// Stops the run at the deadline while the output is read; dropping
    /// the sender ends it.
    watchdog: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    watchdog_fired: Arc<AtomicBool>,
    stopped_at: Option<Instant>,
    pub(super) timed_out: bool,
}

impl Run {
    pub(super) fn start(cmd: &AccountCommand) -> Result<Run, String> {
        if !std::path::Path::new(CHILDREN.to_str().unwrap_or_default()).exists() {
            return Err(format!(
                "cannot run it contained: {} is missing (a kernel without CONFIG_PROC_CHILDREN), so what it starts could outlive it",
                CHILDREN.to_string_lossy()
            ));
        }
        let deadline = Instant::now() + cmd.timeout.0;
        let mut command = Command::new(cmd.program());
        command
            .args(&cmd.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // The supervisor in a process group of its own, away from the
            // milter's (a terminal's ^C is not for it).
            .process_group(0);
        // SAFETY: `supervise` runs in the forked child before exec and
        // makes only async-signal-safe system calls, without allocating
        // (fork(2) in a multi-threaded process).
        unsafe { command.pre_exec(supervise) };
        let mut child = command.spawn().map_err(|e| format!("cannot run: {e}"))?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("no pipe to the command".into());
        };
        let supervisor = child.id() as libc::pid_t;
        let fired = Arc::new(AtomicBool::new(false));
        let (done, wait) = mpsc::channel::<()>();
        let watchdog = {
            let fired = fired.clone();
            let timeout = cmd.timeout.0;
            std::thread::spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(timeout) {
                    fired.store(true, Ordering::SeqCst);
                    // The supervisor cannot have been reaped: only
                    // `finish` reaps it, after this thread has ended.
                    // SAFETY: kill(2) touches no memory of ours.
                    unsafe { libc::kill(supervisor, libc::SIGTERM) };
                }
            })
        };
        Ok(Run {
            child,
            stdout: Some(stdout),
            // Drained while the program runs, so that it never blocks on
            // a full pipe.
            stderr: drain(stderr, MAX_STDERR),
            deadline,
            watchdog: Some((done, watchdog)),
            watchdog_fired: fired,
            stopped_at: None,
            timed_out: false,
        })
    }

    /// Asks the supervisor to end the run: it kills the program and
    /// everything it started. Only before `finish` has reaped it.
    pub(super) fn stop(&mut self) {
        if self.stopped_at.is_none() {
            self.stopped_at = Some(Instant::now());
            // SAFETY: kill(2) touches no memory of ours.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// Waits for the run to end (stopping it at the deadline), and returns
    /// the program's exit status, as the supervisor passes it on, with the
    /// start of its stderr.
    pub(super) fn finish(&mut self) -> Result<(std::process::ExitStatus, Vec<u8>), String> {
        if let Some((done, watchdog)) = self.watchdog.take() {
            drop(done);
            let _ = watchdog.join();
        }
        if self.watchdog_fired.load(Ordering::SeqCst) {
            self.timed_out = true;
            self.stopped_at.get_or_insert_with(Instant::now);
        }
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!("cannot wait for it: {e}"));
                }
            }
            let now = Instant::now();
            match self.stopped_at {
                None if now >= self.deadline => {
                    self.timed_out = true;
                    self.stop();
                }
                // A supervisor that does not end the run (never seen: it
                // needs milliseconds) is killed, so that the load ends.
                Some(at) if now >= at + STOP_GRACE => {
                    // SAFETY: kill(2) touches no memory of ours.
                    unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stderr = self
            .stderr
            .recv_timeout(STOP_GRACE)
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        Ok((status, stderr))
    }
}

/// Set by the supervisor's SIGTERM handler: end the run.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The supervisor, in the child forked by `spawn`: becomes a child
/// subreaper, forks the program (which returns to `spawn` and execs),
/// waits for it, then ends whatever is left and exits as the program did.
/// It never returns. Async-signal-safe system calls only.
fn supervise() -> std::io::Result<()> {
    // SAFETY: plain system calls on values of our own; see `Run::start`.
    unsafe {
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The milter killed in mid-run: the supervisor ends the run.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
        // Before the fork, so that a SIGTERM that comes once `spawn` has
        // returned is always caught (the program's exec resets it). SIGHUP
        // and SIGINT too: the milter's own handlers for them, inherited,
        // would write to descriptors closed below.
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let program = libc::fork();
        if program < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if program == 0 {
            // A group of its own, so that a wrapper script's children go
            // with it in one kill.
            libc::setpgid(0, 0);
            return Ok(());
        }
        libc::setpgid(program, program);
        // The pipes (and spawn's own error pipe) belong to the program:
        // its output ends when it and its descendants are gone.
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            for fd in 0..1024 {
                libc::close(fd);
            }
        }
        let status = wait_for(program);
        end_all(program);
        exit_as(status)
    }
}

/// The program's wait status; kills its group when asked to stop.
unsafe fn wait_for(program: libc::pid_t) -> libc::c_int {
    let mut killed = false;
    loop {
        // Orphans reparented here that exit meanwhile are reaped too.
        loop {
            let mut status = 0;
            let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
            if pid == program {
                return status;
            }
            if pid <= 0 {
                break;
            }
        }
        if STOP.load(Ordering::SeqCst) && !killed {
            killed = true;
            libc::kill(-program, libc::SIGKILL);
            libc::kill(program, libc::SIGKILL);
        }
        pause(10);
    }
}

/// Kills every descendant: the program's group, then each child of the
/// supervisor (what the program left is reparented here, the subreaper),
/// again as their own children are reparented, until none is left.
unsafe fn end_all(program: libc::pid_t) {
    libc::kill(-program, libc::SIGKILL);
    loop {
        let fd = libc::open(CHILDREN.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return;
        }
        // "PID PID … " (proc(5)); a list longer than the buffer is taken
        // in turns, since this loops until there are no children.
        let mut buf = [0u8; 4096];
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        let mut pid: libc::pid_t = 0;
        for &b in &buf[..n.max(0) as usize] {
            if b.is_ascii_digit() {
                pid = pid
                    .saturating_mul(10)
                    .saturating_add(libc::pid_t::from(b - b'0'));
            } else {
                if pid > 0 {
                    libc::kill(pid, libc::SIGKILL);
                }
                pid = 0;
            }
        }
        loop {
            let r = libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG);
            if r > 0 {
                continue;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                // ECHILD: nothing left.
                return;
            }
            break;
        }
        pause(5);
    }
}

/// Exits with the program's wait status: its exit code, or its signal.
unsafe fn exit_as(status: libc::c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // No core file of the supervisor for the program's crash (under
        // the unit's `~@resources` filter setrlimit fails, and the
        // service's own core limit applies).
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
        libc::_exit(128 + sig);
    }
    libc::_exit(libc::WEXITSTATUS(status))
}

fn pause(ms: i64) {
    let t = libc::timespec {
        tv_sec: 0,
        tv_nsec: ms * 1_000_000,
    };
    // SAFETY: nanosleep(2) reads `t` only.
    unsafe { libc::nanosleep(&t, std::ptr::null_mut()) };
}

/// Reads `pipe` to its end on a thread of its own, keeping at most
/// `limit` bytes (the rest is read and dropped, so the writer never
/// blocks).
fn drain(
    mut pipe: impl Read + Send + 'static,
    limit: u64,
) -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let result = (&mut pipe)
            .take(limit)
            .read_to_end(&mut kept)
            .and_then(|_| std::io::copy(&mut pipe, &mut std::io::sink()))
            .map(|_| kept);
        let _ = tx.send(result);
    });
    rx
}
