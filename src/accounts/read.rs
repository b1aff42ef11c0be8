//! Reading account sources: text files line by line, Postfix tables
//! through Postfix's own reader, and only ever a file that held still
//! while it was read.

use super::LoadError;
use crate::config::PostfixTable;
use std::path::Path;

/// A bare `postfix_map:` path is read as text, but Postfix reads
/// `PATH.db`: until `postmap` runs, the two disagree.
pub(super) fn stale_db(text: &Path) -> Option<String> {
    let mut db = text.as_os_str().to_owned();
    db.push(".db");
    let db = std::path::PathBuf::from(db);
    let (Ok(t), Ok(d)) = (
        std::fs::metadata(text).and_then(|m| m.modified()),
        std::fs::metadata(&db).and_then(|m| m.modified()),
    ) else {
        return None;
    };
    (d < t).then(|| {
        format!(
            "{} is older than {}: Postfix reads the .db until `postmap {}` runs, so it may disagree with the accounts read from the text; write `postfix_map: hash:{}` to read what Postfix reads",
            db.display(),
            text.display(),
            text.display(),
            text.display()
        )
    })
}

pub(super) type LineResult = Result<(), (Option<usize>, String)>;

/// Runs `read` until the file it reads did not change while it was read
/// (same size and modification time before and after), so that a file
/// caught in the middle of a rewrite is never taken half-written. Gives up
/// after a few tries: an error keeps the running accounts.
pub(super) fn read_stable<T>(
    path: &Path,
    read: &mut dyn FnMut() -> Result<T, LoadError>,
) -> Result<T, LoadError> {
    let stamp = || {
        std::fs::metadata(path)
            .map(|m| (m.len(), m.modified().ok()))
            .map_err(|e| LoadError {
                file: path.display().to_string(),
                line: None,
                message: format!("cannot read: {e}"),
            })
    };
    for _ in 0..10 {
        let before = stamp()?;
        let result = read();
        if stamp()? == before {
            return result;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Err(LoadError {
        file: path.display().to_string(),
        line: None,
        message: "kept changing while being read (10 tries); the previous accounts stay".into(),
    })
}

/// Calls `each` with every non-blank, non-comment line, streaming the file
/// so that a million-line table never sits in memory twice. A UTF-8 byte
/// order mark is skipped; any other byte sequence that is not UTF-8 is an
/// error (guessing an encoding would invent or lose a mailbox).
pub(super) fn read_lines(
    path: &Path,
    each: impl FnMut(usize, &str) -> LineResult,
) -> Result<(), LoadError> {
    let file = std::fs::File::open(path).map_err(|e| LoadError {
        file: path.display().to_string(),
        line: None,
        message: format!("cannot read: {e}"),
    })?;
    for_each_line(&path.display().to_string(), file, each)
}

pub(super) fn for_each_line(
    source: &str,
    input: impl std::io::Read,
    mut each: impl FnMut(usize, &str) -> LineResult,
) -> Result<(), LoadError> {
    use std::io::BufRead;
    let fail = |line, message| LoadError {
        file: source.to_owned(),
        line,
        message,
    };
    let mut reader = std::io::BufReader::with_capacity(1 << 16, input);
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => n += 1,
            Err(e) => return Err(fail(Some(n + 1), format!("cannot read: {e}"))),
        }
        let bytes = match buf.strip_prefix(b"\xEF\xBB\xBF") {
            Some(rest) if n == 1 => rest,
            _ => &buf[..],
        };
        let line = std::str::from_utf8(bytes).map_err(|e| {
            let bad = bytes[e.valid_up_to()];
            fail(
                Some(n),
                format!(
                    "not UTF-8 (byte 0x{bad:02X} at column {}): save the file as UTF-8",
                    e.valid_up_to() + 1
                ),
            )
        })?;
        let line = line.trim_end_matches(['\n', '\r']);
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        each(n, line).map_err(|(line, message)| fail(line, message))?;
    }
}

/// Lists a table's keys with Postfix's own reader, `postmap -s type:name`
/// (postmap(1)): what it prints is what Postfix looks up, whatever the text
/// file says. `postmap` reads main.cf from /etc/postfix, or from
/// `$MAIL_CONFIG` like every Postfix command, or from `config_dir`
/// (`postmap -c`). Lines are `key<TAB>value`; numbered from 1 in that
/// listing.
pub(super) fn postmap_keys(
    table: &PostfixTable,
    config_dir: Option<&Path>,
    each: impl FnMut(usize, &str) -> LineResult,
) -> Result<(), LoadError> {
    use std::process::{Command, Stdio};
    let name = table.to_string();
    let fail = |message| LoadError {
        file: name.clone(),
        line: None,
        message,
    };
    let postmap = ["/usr/sbin/postmap", "/usr/local/sbin/postmap"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("postmap");
    let mut command = Command::new(postmap);
    if let Some(dir) = config_dir {
        command.arg("-c").arg(dir);
    }
    let mut child = command
        .arg("-s")
        .arg(&name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot run postmap ({e}): a {}: table is read with Postfix's postmap; install postfix, or give the text file's path",
                table.kind.as_deref().unwrap_or("")
            ))
        })?;
    let Some(stdout) = child.stdout.take() else {
        return Err(fail("postmap gave no output".into()));
    };
    let listed = for_each_line(&format!("postmap -s {name}"), stdout, each);
    let output = child
        .wait_with_output()
        .map_err(|e| fail(format!("postmap: {e}")))?;
    if !output.status.success() {
        let why = String::from_utf8_lossy(&output.stderr);
        return Err(fail(format!(
            "postmap -s {name} failed ({}): {}",
            output.status,
            why.trim()
        )));
    }
    listed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file rewritten while it is read is read again, not taken half
    /// written: the reader sees it change under it and starts over.
    #[test]
    fn a_file_changing_while_read_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("accounts");
        std::fs::write(&file, "a@example.com\nb@example.com\n").unwrap();
        let mut tries = 0;
        let lines = read_stable(&file, &mut || {
            tries += 1;
            let mut lines = 0;
            read_lines(&file, |_, _| {
                lines += 1;
                Ok(())
            })?;
            if tries == 1 {
                // The writer finishes during the first read.
                std::fs::write(&file, "a@example.com\nb@example.com\nc@example.com\n").unwrap();
            }
            Ok(lines)
        })
        .unwrap();
        assert_eq!((tries, lines), (2, 3));
    }
}
