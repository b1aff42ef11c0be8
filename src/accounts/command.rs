//! `command:` account sources: a program such as `ldapsearch`, `mysql` or
//! `psql` that prints the accounts (README "Accounts from a directory").
//!
//! The program runs without a shell (argv only: nothing in an argument is
//! ever expanded), with no input. Only a run that exits 0 within the
//! timeout counts; anything else is an error, and an error keeps the
//! accounts in force (src/service/reload.rs).
//!
//! What a run may cost is bounded (docs/design.md §5 "Accounts from a
//! command"): its output is parsed as it is read, never held whole, and
//! past [`MAX_LINES`] lines or [`MAX_BYTES`] bytes the run is stopped and
//! fails. When the run ends — exit, timeout, bound — every process it
//! started is ended, including one that left its process group with
//! `setsid`: the program runs under a small supervisor process that is a
//! child subreaper (prctl(2) `PR_SET_CHILD_SUBREAPER`), so that whatever
//! the program leaves behind is reparented to the supervisor, which kills
//! it. A pid namespace would need privileges the service does not have
//! (CAP_SYS_ADMIN, or a user namespace the unit may forbid), and a cgroup
//! needs systemd's delegation; a subreaper needs neither.

use super::read::{for_each_line, LineResult};
use super::LoadError;
use crate::config::{AccountCommand, CommandFormat};
use std::io::{BufRead, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// At most this many lines of output. An LDIF export of ten million
/// accounts (BENCHMARKS.md measures 10M) is about 30 million lines
/// (`dn:`, `mail:`, blank); one address per line, about 10 million.
const MAX_LINES: u64 = 1 << 25;
/// At most this many bytes of output: such an LDIF export is some 800 MB.
/// The output is parsed as it is read, so the milter's memory is that of
/// the accounts (BENCHMARKS.md: 10M accounts, about 300 MiB), not of the
/// output.
const MAX_BYTES: u64 = 1 << 30;
/// How much of the program's stderr is kept for the error message.
const MAX_STDERR: u64 = 2048;
/// How long the supervisor gets to end the run once asked to, before it
/// is killed itself (it needs milliseconds).
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Lists the children of the calling thread: the supervisor finds what
/// was reparented to it here (proc(5); Debian's kernels have
/// CONFIG_PROC_CHILDREN).
const CHILDREN: &std::ffi::CStr = c"/proc/thread-self/children";

/// Runs `cmd` and calls `each` with every entry it printed (line number in
/// the output, address), in the command's `format`, as it prints them.
pub(super) fn read(
    cmd: &AccountCommand,
    each: &mut dyn FnMut(usize, &str) -> LineResult,
) -> Result<(), LoadError> {
    let program = cmd.program();
    let fail = |message: String| LoadError {
        file: format!("command {program}"),
        line: None,
        message,
    };
    let mut run = Run::start(cmd).map_err(fail)?;
    let label = format!("output of {program}");
    let mut out = Bounded {
        pipe: run.stdout.take(),
        bytes: 0,
        lines: 0,
        over: None,
    };
    let parsed = match cmd.format {
        CommandFormat::Lines => for_each_line(&label, &mut out, |n, line| each(n, line.trim())),
        CommandFormat::Ldif => {
            ldif_values(std::io::BufReader::with_capacity(1 << 16, &mut out), each).map_err(
                |(line, message)| LoadError {
                    file: label,
                    line,
                    message,
                },
            )
        }
    };
    if parsed.is_err() && out.over.is_none() {
        // Output that is not accounts: the rest is read (within the
        // bounds) and dropped, so that a program that failed is reported
        // as failed, with its stderr, rather than by its output.
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    }
    let over = out.over.take();
    if over.is_some() {
        run.stop();
    }
    drop(out);
    let (status, stderr) = run.finish().map_err(fail)?;
    if run.timed_out {
        return Err(fail(format!(
            "did not finish within its timeout ({}s): killed; raise `timeout` if the directory is that slow",
            cmd.timeout.0.as_secs()
        )));
    }
    if let Some(over) = over {
        return Err(fail(format!(
            "printed more than {over}: stopped (a command's output is bounded at {MAX_LINES} lines and {MAX_BYTES} bytes, enough for an LDIF export of some ten million accounts); check that it prints each account once"
        )));
    }
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr);
        return Err(fail(format!(
            "failed ({status}){}",
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", stderr.trim())
            }
        )));
    }
    parsed
}

/// The program's output, counted as it is read: past a bound, reading
/// fails and `over` says which bound.
struct Bounded<R> {
    pipe: Option<R>,
    bytes: u64,
    lines: u64,
    over: Option<String>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(pipe) = self.pipe.as_mut() else {
            return Ok(0);
        };
        if self.over.is_some() {
            return Err(std::io::Error::other("output bound reached"));
        }
        let n = pipe.read(buf)?;
        self.bytes += n as u64;
        self.lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        if self.lines > MAX_LINES {
            self.over = Some(format!("{MAX_LINES} lines"));
        } else if self.bytes > MAX_BYTES {
            self.over = Some(format!("{MAX_BYTES} bytes"));
        }
        if self.over.is_some() {
            return Err(std::io::Error::other("output bound reached"));
        }
        Ok(n)
    }
}

/// One run of a command under its supervisor (see the module comment).
struct Run {
    child: std::process::Child,
    stdout: Option<std::process::ChildStdout>,
    stderr: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    deadline: Instant,
    /// Stops the run at the deadline while the output is read; dropping
    /// the sender ends it.
    watchdog: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    watchdog_fired: Arc<AtomicBool>,
    stopped_at: Option<Instant>,
    timed_out: bool,
}

impl Run {
    fn start(cmd: &AccountCommand) -> Result<Run, String> {
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
    fn stop(&mut self) {
        if self.stopped_at.is_none() {
            self.stopped_at = Some(Instant::now());
            // SAFETY: kill(2) touches no memory of ours.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// Waits for the run to end (stopping it at the deadline), and returns
    /// the program's exit status, as the supervisor passes it on, with the
    /// start of its stderr.
    fn finish(&mut self) -> Result<(std::process::ExitStatus, Vec<u8>), String> {
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
                // A supervisor that does not end the run: killed, which
                // leaves the program's group to be killed here.
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
        // No core file of the supervisor for the program's crash.
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

/// The attribute values of LDIF (RFC 2849) as `ldapsearch -LLL` prints
/// it: `dn:` lines are skipped, a line starting with one space continues
/// the one before (RFC 2849 "SEP ... FILL"), `attr:: ` values are base64
/// (ldapsearch's form for non-ASCII addresses), `#` lines are comments.
fn ldif_values(
    mut input: impl BufRead,
    each: &mut dyn FnMut(usize, &str) -> LineResult,
) -> Result<(), (Option<usize>, String)> {
    let mut entry: Option<(usize, String)> = None;
    let mut flush = |entry: &mut Option<(usize, String)>| -> LineResult {
        let Some((n, line)) = entry.take() else {
            return Ok(());
        };
        if line.starts_with('#') {
            return Ok(());
        }
        let Some((attr, value)) = line.split_once(':') else {
            return Err((Some(n), format!("{line:?} is not LDIF (attribute: value)")));
        };
        if attr.eq_ignore_ascii_case("dn") {
            return Ok(());
        }
        if let Some(b64) = value.strip_prefix(':') {
            let bytes = base64(b64.trim()).ok_or((Some(n), format!("{line:?}: bad base64")))?;
            let value = String::from_utf8(bytes)
                .map_err(|_| (Some(n), format!("{line:?}: the value is not UTF-8")))?;
            return each(n, value.trim());
        }
        if value.starts_with('<') {
            return Err((Some(n), format!("{line:?}: a URL value cannot be read")));
        }
        each(n, value.trim())
    };
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        match input.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => n += 1,
            Err(e) => return Err((Some(n + 1), format!("cannot read: {e}"))),
        }
        let line = std::str::from_utf8(&buf).map_err(|_| (Some(n), "not UTF-8".to_string()))?;
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        match (line.strip_prefix(' '), &mut entry) {
            (Some(more), Some((_, current))) => current.push_str(more),
            _ if line.is_empty() => flush(&mut entry)?,
            _ => {
                flush(&mut entry)?;
                entry = Some((n, line.to_owned()));
            }
        }
    }
    flush(&mut entry)
}

/// Standard base64 (RFC 4648 §4) with padding, as LDIF uses it.
fn base64(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let s = s.as_bytes();
    if s.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for chunk in s.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n: u32 = 0;
        for &c in &chunk[..4 - pad] {
            n = n << 6 | u32::from(value(c)?);
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values and their lines; `None` when the LDIF is refused.
    fn values(ldif: &str) -> Option<Vec<(usize, String)>> {
        let mut got = Vec::new();
        ldif_values(ldif.as_bytes(), &mut |n, v| {
            got.push((n, v.to_owned()));
            Ok(())
        })
        .ok()?;
        Some(got)
    }

    #[test]
    fn ldif_as_ldapsearch_prints_it() {
        let ldif = "dn: uid=alice,ou=people,dc=example,dc=com\nmail: alice@example.com\nmail: a.smith@example.com\n\n# a comment\ndn: uid=bob,ou=people,dc=exam\n ple,dc=com\nmail: bob@exa\n mple.com\n\ndn:: dWlkPWrDtnJnLGRjPWV4YW1wbGU=\nmail:: asO2cmdAZXhhbXBsZS5jb20=\n";
        assert_eq!(
            values(ldif).unwrap(),
            [
                (2, "alice@example.com".to_owned()),
                (3, "a.smith@example.com".to_owned()),
                (8, "bob@example.com".to_owned()),
                (12, "jörg@example.com".to_owned()),
            ]
        );
        // Without -LLL, ldapsearch adds `search:`/`result:` lines: their
        // values are not addresses, which the caller reports.
        assert!(values("mail: x\nnot ldif\n").is_none());
        assert!(values("mail:: !!!!\n").is_none());
    }

    #[test]
    fn base64_decodes() {
        assert_eq!(base64("TWFu").unwrap(), b"Man");
        assert_eq!(base64("TWE=").unwrap(), b"Ma");
        assert_eq!(base64("TQ==").unwrap(), b"M");
        assert_eq!(base64("").unwrap(), b"");
        assert!(base64("TQ=").is_none());
        assert!(base64("T===").is_none());
        assert!(base64("T*==").is_none());
    }
}
