//! The async runtime `dualroute run` serves on: how many threads answer
//! the MTA (`DUALROUTE_THREADS`, see `dualroute --help`).
//!
//! A milter conversation is a chain of small request/reply steps: one
//! thread saves the cross-thread wake-ups of a pool, a pool gets more of
//! the CPUs when the MTA and others compete for them (BENCHMARKS.md,
//! "Runtime" and "Third round", has both measured). Account loading,
//! state-file writes and the maillog follower run on tokio's separate
//! blocking pool in either flavour, so one thread does not make a reload
//! stall the mail path.

use std::io;

/// The environment variable that sets the number of milter threads.
pub const THREADS_VAR: &str = "DUALROUTE_THREADS";

/// How many threads serve the milter.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Threads {
    /// One thread (tokio's current-thread runtime).
    One,
    /// A pool of this many worker threads (tokio's multi-thread runtime).
    Pool(usize),
}

/// What `DUALROUTE_THREADS` asks for: unset or empty → the default (one
/// thread), `N` → N threads (1: a single thread).
pub fn threads_from(value: Option<&str>) -> Result<Threads, String> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT);
    };
    match v.parse::<usize>() {
        Ok(1) => Ok(Threads::One),
        Ok(n) if (2..=1024).contains(&n) => Ok(Threads::Pool(n)),
        _ => Err(format!(
            "{THREADS_VAR}={v:?} is not a thread count: set it to a number from 1 to 1024, or unset it for the default (one thread)"
        )),
    }
}

/// The default, from BENCHMARKS.md ("Third round", "Runtime"): on an idle
/// 2-CPU machine one thread served 1.35-1.38× the conversations of a pool
/// of two at one MTA connection, 0.89-1.09× at 8 and 64, and took 3-45%
/// less CPU per conversation at every concurrency. A pool only served
/// more (1.5×) when other work kept both CPUs busy *and* the milter had to
/// serve far more than any MTA sends (thousands of conversations a
/// second): there, `DUALROUTE_THREADS=2` or more.
pub const DEFAULT: Threads = Threads::One;

/// Builds the runtime `DUALROUTE_THREADS` asks for.
pub fn build(threads: Threads) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::Pool(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build()
}

/// The runtime for `dualroute run`, as the environment asks.
pub fn from_env() -> Result<tokio::runtime::Runtime, String> {
    let value = std::env::var(THREADS_VAR).ok();
    let threads = threads_from(value.as_deref())?;
    build(threads).map_err(|e| format!("cannot start the runtime ({threads:?}): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts() {
        assert_eq!(threads_from(None), Ok(DEFAULT));
        assert_eq!(threads_from(Some(" ")), Ok(DEFAULT));
        assert_eq!(threads_from(Some("1")), Ok(Threads::One));
        assert_eq!(threads_from(Some("4")), Ok(Threads::Pool(4)));
        for bad in ["0", "-1", "two", "1025"] {
            let e = threads_from(Some(bad)).unwrap_err();
            assert!(e.starts_with("DUALROUTE_THREADS="), "{e}");
        }
    }
}
