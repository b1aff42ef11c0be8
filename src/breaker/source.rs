//! Where the breaker reads delivery results (`breaker.maillog`: a log
//! file or the journal) and whether it can (docs/design.md §7, "The
//! breaker's source").
//!
//! A breaker that cannot read its source sees no bounce and never trips,
//! and before issue 25 said so once, at WARN, and then looked healthy
//! (`status` showed "0 permanent failures", the metrics nothing). Now
//! blindness is a state ([`Sight`]): written to `breaker-counts` for
//! `dualroute status` (which shows it as ✘ and exits 2), the gauge
//! `dualroute_breaker_source_readable`, an ERROR once a minute for as long
//! as it lasts, and a notice by mail when it starts and when it ends.

use super::journal::Journal;
use super::Follower;
use crate::config::{BreakerConfig, Maillog};
use crate::metrics::Metrics;
use crate::notify::{Event, Outbox};
use crate::state::{self, BreakerSource};
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a blind breaker says so in the log.
pub const NAG: Duration = Duration::from_secs(60);

/// A line to parse and how long ago it was logged (zero for a log file,
/// whose lines are read within a second of being written).
pub type Line = (String, Duration);

/// The source followed.
pub enum Source {
    File(Follower),
    Journal(Journal),
}

impl Source {
    pub fn new(config: &BreakerConfig, state_dir: &Path) -> Source {
        match &config.maillog {
            Maillog::File(p) => Source::File(Follower::at_end(p)),
            Maillog::Journal => Source::Journal(Journal::new(
                config.journal_directory.clone(),
                state_dir,
                config.window.0,
            )),
        }
    }

    /// New limits after a reload.
    pub fn reconfigure(&mut self, config: &BreakerConfig) {
        if let Source::Journal(j) = self {
            j.set_window(config.window.0);
        }
    }

    /// The lines logged since the last call.
    pub fn poll(&mut self) -> Vec<Line> {
        match self {
            Source::File(f) => f.poll().into_iter().map(|l| (l, Duration::ZERO)).collect(),
            Source::Journal(j) => j.poll().into_iter().map(|e| (e.line, e.age)).collect(),
        }
    }

    /// The lines of the last poll are counted: a journal keeps its cursor.
    pub fn commit(&mut self) {
        if let Source::Journal(j) = self {
            j.commit();
        }
    }

    /// Ok while the source is read; Err says why not.
    pub fn health(&mut self) -> Result<(), String> {
        match self {
            Source::File(f) => f.error().map_or(Ok(()), Err),
            Source::Journal(j) => j.health(),
        }
    }
}

/// Whether the breaker reads its source, and what it did about a change.
pub struct Sight {
    name: String,
    /// None until the first look.
    now: Option<BreakerSource>,
    nagged: Option<Instant>,
}

impl Sight {
    pub fn new(config: &BreakerConfig) -> Sight {
        Sight {
            name: config.maillog.name(),
            now: None,
            nagged: None,
        }
    }

    /// The record for `breaker-counts`.
    pub fn record(&self) -> Option<BreakerSource> {
        self.now.clone()
    }

    /// Takes the source's health after a poll: the metric, the ERROR once
    /// a [`NAG`] while blind, a notice at each change.
    pub fn update(
        &mut self,
        health: Result<(), String>,
        config: &crate::config::Config,
        metrics: &Metrics,
        outbox: &Outbox,
    ) {
        let readable = health.is_ok();
        let error = health.err().unwrap_or_default();
        let before = self.now.clone();
        let changed = before
            .as_ref()
            .is_none_or(|b| b.readable != readable || b.error != error);
        if changed {
            let since = match &before {
                Some(b) if b.readable == readable => b.since,
                _ => state::now(),
            };
            self.now = Some(BreakerSource {
                name: self.name.clone(),
                readable,
                error: error.clone(),
                since,
            });
        }
        metrics.breaker_source(&self.name, readable);
        if readable {
            if let Some(b) = before.filter(|b| !b.readable) {
                tracing::info!(
                    "bounce breaker: reads {} again (it could not since {})",
                    self.name,
                    state::when(b.since)
                );
                outbox.notify(
                    config,
                    Event::BreakerSees {
                        source: self.name.clone(),
                        blind_since: b.since,
                    },
                );
            }
            self.nagged = None;
            return;
        }
        if before.as_ref().is_none_or(|b| b.readable) {
            outbox.notify(
                config,
                Event::BreakerBlind {
                    source: self.name.clone(),
                    error: error.clone(),
                },
            );
        }
        if changed || self.nagged.is_none_or(|t| t.elapsed() >= NAG) {
            let since = self.now.as_ref().map_or(0, |n| n.since);
            tracing::error!(
                "bounce breaker: cannot read {} (since {}): {error}; it sees no delivery failure and trips no domain until it can; `dualroute check` tests the access as the service user",
                self.name,
                state::when(since)
            );
            self.nagged = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blindness_is_recorded_and_mailed_when_it_starts_and_ends() {
        let config = crate::config::parse(
            "domains: {}\nnotify: { to: [admin@example.org] }\nbreaker: { maillog: journal }\n",
            "milter.yaml",
        )
        .unwrap();
        let (metrics, outbox) = (Metrics::new(), Outbox::default());
        let mut sight = Sight::new(config.breaker.as_ref().unwrap());
        let events = || -> Vec<Event> { outbox.take().0.into_iter().map(|(_, e)| e).collect() };
        sight.update(Ok(()), &config, &metrics, &outbox);
        let r = sight.record().unwrap();
        assert!(
            r.readable && r.name == "journal" && r.error.is_empty(),
            "{r:?}"
        );
        assert_eq!(events(), [], "readable at start is no news");

        sight.update(Err("no group".into()), &config, &metrics, &outbox);
        let r = sight.record().unwrap();
        assert!(!r.readable && r.error == "no group", "{r:?}");
        let blind_since = r.since;
        assert_eq!(
            events(),
            [Event::BreakerBlind {
                source: "journal".into(),
                error: "no group".into()
            }]
        );
        sight.update(Err("no group".into()), &config, &metrics, &outbox);
        assert_eq!(events(), [], "mailed once, not at every poll");

        sight.update(Ok(()), &config, &metrics, &outbox);
        assert!(sight.record().unwrap().readable);
        assert_eq!(
            events(),
            [Event::BreakerSees {
                source: "journal".into(),
                blind_since
            }]
        );
    }
}
