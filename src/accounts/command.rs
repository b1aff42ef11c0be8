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
//! `setsid` (src/accounts/command/supervisor.rs says how, and why so).

mod supervisor;

use super::read::{for_each_line, LineResult};
use super::LoadError;
use crate::config::{AccountCommand, CommandFormat};
use std::io::{BufRead, Read};
use supervisor::Run;

/// At most this many lines of output. An LDIF export of ten million
/// accounts (BENCHMARKS.md measures 10M) is about 30 million lines
/// (`dn:`, `mail:`, blank); one address per line, about 10 million.
const MAX_LINES: u64 = 1 << 25;
/// At most this many bytes of output: such an LDIF export is some 800 MB.
/// The output is parsed as it is read, so the milter's memory is that of
/// the accounts (BENCHMARKS.md: 10M accounts, about 300 MiB), not of the
/// output.
const MAX_BYTES: u64 = 1 << 30;

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

/// Standard base64 (RFC 4648 §4) with padding, as LDIF uses it (RFC 2849
/// "BASE64-STRING"). Unused bits of the last symbol are not checked, as
/// the decoder this replaced did not: a writer that leaves them set still
/// gives its accounts.
const LDIF_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

fn base64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    LDIF_BASE64.decode(s).ok()
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
        assert!(base64("TQ").is_none());
        assert!(base64("T Q==").is_none());
        // Unused bits set in the last symbol: accepted, as before.
        assert_eq!(base64("TR==").unwrap(), b"M");
    }
}
