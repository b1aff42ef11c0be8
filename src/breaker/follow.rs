//! Following a log file by path as `tail -F` does: across rotation by
//! rename and by `copytruncate`, and through the file's absence (see the
//! breaker's module documentation for the rules).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a rotated-away file is still read: until the MTA (Postfix's
/// postlogd after `postfix logrotate`, or rsyslog after its HUP) reopens
/// the new one, it keeps writing to the old.
const DRAIN: Duration = Duration::from_secs(10);

/// Read at most this much per poll, so that a large file that appears at
/// once is worked through a piece at a time.
const MAX_READ: u64 = 4 << 20;

/// A "line" longer than this without a newline is not a log line (syslog
/// lines are at most a few KiB): it is dropped rather than buffered.
const MAX_LINE: usize = 64 << 10;

/// One open log file and how far it has been read.
#[derive(Debug)]
struct Source {
    file: File,
    dev: u64,
    ino: u64,
    offset: u64,
    partial: Vec<u8>,
}

impl Source {
    fn open(path: &Path, at_end: bool) -> io::Result<Source> {
        let file = File::open(path)?;
        // fstat, not stat: the identity of what we opened, whatever the
        // path names a moment later.
        let meta = file.metadata()?;
        let offset = if at_end { meta.len() } else { 0 };
        Ok(Source {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            offset,
            partial: Vec::new(),
        })
    }

    fn is(&self, meta: &std::fs::Metadata) -> bool {
        self.dev == meta.dev() && self.ino == meta.ino()
    }

    /// Appends the lines completed since the last read to `lines`.
    fn read_new(&mut self, path: &Path, lines: &mut Vec<String>) -> io::Result<()> {
        let len = self.file.metadata()?.len();
        if len < self.offset {
            tracing::info!(
                "bounce breaker: {} was truncated (copytruncate rotation); reading it from the start",
                path.display()
            );
            self.offset = 0;
            self.partial.clear();
        }
        if len == self.offset {
            return Ok(());
        }
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        let n = (&mut self.file).take(MAX_READ).read_to_end(&mut buf)?;
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf);
        let complete = match self.partial.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => {
                if self.partial.len() > MAX_LINE {
                    self.partial.clear();
                }
                return Ok(());
            }
        };
        let rest = self.partial.split_off(complete);
        for line in self.partial.split(|&b| b == b'\n') {
            if !line.is_empty() {
                lines.push(
                    String::from_utf8_lossy(line)
                        .trim_end_matches('\r')
                        .to_owned(),
                );
            }
        }
        self.partial = rest;
        Ok(())
    }
}

/// Follows a log file by path, as `tail -F` does: across rotation by
/// rename and by truncation, and through the file's absence. See the
/// module documentation.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    current: Option<Source>,
    /// The file before the last rotation, still read for [`DRAIN`].
    previous: Option<(Source, Instant)>,
    /// The last problem logged, so that each is logged once.
    problem: Option<String>,
}

impl Follower {
    /// Starts following `path` from its current end. A missing file is
    /// waited for (and, once it appears, read from its start).
    pub fn at_end(path: &Path) -> Follower {
        let mut f = Follower {
            path: path.to_owned(),
            current: None,
            previous: None,
            problem: None,
        };
        match Source::open(path, true) {
            Ok(s) => f.current = Some(s),
            Err(e) => f.report(&e),
        }
        f
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the file is not being read, while it is not (missing or
    /// unreadable); a rotated-away file still read while its successor
    /// is awaited counts as read.
    pub fn error(&self) -> Option<String> {
        match (&self.current, &self.problem) {
            (Some(_), _) => None,
            (None, Some(p)) => Some(p.clone()),
            (None, None) => Some(format!("{} is not open", self.path.display())),
        }
    }

    /// The lines completed since the last call (or since the start), in
    /// the order they were written.
    pub fn poll(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some((old, since)) = &mut self.previous {
            // Errors reading a rotated-away file end its grace period.
            if old.read_new(&self.path, &mut lines).is_err() || since.elapsed() > DRAIN {
                self.previous = None;
            }
        }
        if let Some(cur) = &mut self.current {
            if let Err(e) = cur.read_new(&self.path, &mut lines) {
                tracing::warn!(
                    "bounce breaker: cannot read {}: {e}; reopening it",
                    self.path.display()
                );
                self.current = None;
            }
        }
        match std::fs::metadata(&self.path) {
            Ok(meta) if self.current.as_ref().is_some_and(|c| c.is(&meta)) => {}
            Ok(_) => match Source::open(&self.path, false) {
                Ok(mut new) => {
                    if self.current.is_some() {
                        tracing::info!(
                            "bounce breaker: {} was rotated; following the new file",
                            self.path.display()
                        );
                    } else {
                        tracing::info!("bounce breaker: following {}", self.path.display());
                    }
                    self.problem = None;
                    if let Err(e) = new.read_new(&self.path, &mut lines) {
                        self.report(&e);
                    }
                    if let Some(old) = self.current.replace(new) {
                        self.previous = Some((old, Instant::now()));
                    }
                }
                Err(e) => self.report(&e),
            },
            // Rotated away and not yet replaced: keep reading the old
            // file until the new one appears.
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.current.is_some() => {}
            Err(e) => self.report(&e),
        }
        lines
    }

    fn report(&mut self, e: &io::Error) {
        let problem = if e.kind() == io::ErrorKind::NotFound {
            format!(
                "{} does not exist (yet); waiting for it",
                self.path.display()
            )
        } else {
            format!("cannot read {}: {e}; retrying", self.path.display())
        };
        if self.problem.as_ref() != Some(&problem) {
            tracing::warn!("bounce breaker: {problem}");
            self.problem = Some(problem);
        }
    }
}
