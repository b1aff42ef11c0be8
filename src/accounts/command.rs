//! `command:` account sources: a program such as `ldapsearch`, `mysql` or
//! `psql` that prints the accounts (README "Accounts from a directory").
//!
//! The program runs without a shell (argv only: nothing in an argument is
//! ever expanded), with no input, in a process group of its own so that a
//! run past its `timeout` is killed with everything it started. Only a run
//! that exits 0 within the timeout counts; anything else is an error, and
//! an error keeps the accounts in force (src/service/reload.rs).

use super::read::{for_each_line, LineResult};
use super::LoadError;
use crate::config::{AccountCommand, CommandFormat};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// More output than this is refused rather than held in memory: a billion
/// bytes is some twenty million addresses, far more than any server has.
const MAX_OUTPUT: u64 = 1 << 30;
/// How much of the program's stderr is kept for the error message.
const MAX_STDERR: u64 = 2048;

/// Runs `cmd` and calls `each` with every entry it printed (line number in
/// the output, address), in the command's `format`.
pub(super) fn read(
    cmd: &AccountCommand,
    each: &mut dyn FnMut(usize, &str) -> LineResult,
) -> Result<(), LoadError> {
    let output = run(cmd)?;
    let label = format!("output of {}", cmd.program());
    match cmd.format {
        CommandFormat::Lines => for_each_line(&label, &output[..], |n, line| each(n, line.trim())),
        CommandFormat::Ldif => ldif_values(&output, each).map_err(|(line, message)| LoadError {
            file: label,
            line,
            message,
        }),
    }
}

/// The program's standard output, once it has exited 0 within the timeout.
fn run(cmd: &AccountCommand) -> Result<Vec<u8>, LoadError> {
    let program = cmd.program();
    let fail = |message: String| LoadError {
        file: format!("command {program}"),
        line: None,
        message,
    };
    let started = Instant::now();
    let deadline = started + cmd.timeout.0;
    let mut child = Command::new(program)
        .args(&cmd.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a timeout kills a wrapper script's
        // children too, which would otherwise hold the pipe open.
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("cannot run: {e}")))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(fail("no pipe to the command".into()));
    };
    // Both pipes are drained while the program runs, so that it never
    // blocks on a full pipe.
    let out = drain(stdout, MAX_OUTPUT + 1);
    let err = drain(stderr, MAX_STDERR);
    let group = i32::try_from(child.id()).ok();
    let kill_group = || {
        if let Some(pgid) = group {
            // SAFETY: kill(2) with a negative pid signals the process
            // group the child leads; it touches no memory of ours.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                kill_group();
                let _ = child.wait();
                return Err(fail(format!("cannot wait for it: {e}")));
            }
        }
        if Instant::now() >= deadline {
            kill_group();
            let _ = child.wait();
            return Err(fail(format!(
                "did not finish within its timeout ({}s): killed; raise `timeout` if the directory is that slow",
                cmd.timeout.0.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Whatever it started is no longer needed either.
    kill_group();
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    let stderr = err
        .recv_timeout(wait)
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let stderr = String::from_utf8_lossy(&stderr);
    if !status.success() {
        return Err(fail(format!(
            "failed ({status}){}",
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", stderr.trim())
            }
        )));
    }
    let output = match out.recv_timeout(wait) {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(fail(format!("cannot read its output: {e}"))),
        Err(_) => return Err(fail("its output did not end after it exited".into())),
    };
    if output.len() as u64 > MAX_OUTPUT {
        return Err(fail(format!(
            "printed more than {MAX_OUTPUT} bytes; print one address per line"
        )));
    }
    tracing::debug!(
        "command {program}: {} bytes in {:?}",
        output.len(),
        started.elapsed()
    );
    Ok(output)
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
    output: &[u8],
    each: &mut dyn FnMut(usize, &str) -> LineResult,
) -> Result<(), (Option<usize>, String)> {
    let text = std::str::from_utf8(output).map_err(|e| {
        let line = output[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        (Some(line), "not UTF-8".to_string())
    })?;
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
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        match (line.strip_prefix(' '), &mut entry) {
            (Some(more), Some((_, current))) => current.push_str(more),
            _ if line.is_empty() => flush(&mut entry)?,
            _ => {
                flush(&mut entry)?;
                entry = Some((i + 1, line.to_owned()));
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
