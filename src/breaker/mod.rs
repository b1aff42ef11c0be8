//! The bounce breaker (docs/design.md §7).
//!
//! A milter never learns what happened to the mail it routed: the MTA
//! delivers it later, from its queue, and only writes the result to its
//! log. So the breaker follows that log (`breaker.maillog`), picks out the
//! permanent failures ([`parse_line`]), attributes routing addresses to the
//! managed domain that produced them ([`Attribution`]), and counts them per
//! domain over a sliding window ([`Window`]). At `threshold` failures within
//! `window` the domain is tripped: the trip is written under `state_dir`
//! (so a restart keeps it), the running milter's holds are refreshed at
//! once (the domain now behaves as `enabled: false`), and an error says why
//! and how to switch routing back on (`dualroute enable DOMAIN`).
//!
//! Why it exists: a destination that starts refusing routed mail (relay
//! denied, the account expired, the mailboxes of our users were never
//! created there, a typo in `destination`) turns every routed message
//! into a bounce to an outside sender. Zoho's "bounce notification" has the same purpose; here routing
//! stops instead of merely telling someone.
//!
//! What the follower does with the log file ([`Follower`]):
//! - it starts at the end: what was logged before the milter started is
//!   history, and counting it again after every restart would trip on old
//!   news;
//! - rotation by rename (logrotate's default, newsyslog): the path names a
//!   new file (a different inode). The old file is read to its end, then
//!   the new one from its start; the old one is still read for a few
//!   seconds, since the MTA or syslog daemon writes to it until it reopens
//!   its log;
//! - rotation by `copytruncate`: the file shrinks below our offset; it is
//!   read again from its start. (Lines written between the copy and the
//!   truncation are lost to every follower, `tail -F` included.)
//! - a missing file (not yet created, or rotated away and not yet
//!   replaced) is waited for and logged once; when it appears it is read
//!   from its start.
//!
//! Failures are counted when they are read, not by the time stamp in the
//! line: syslog time stamp formats differ (RFC 3164 without a year, RFC
//! 5424, journald exports) and the follower reads within a second anyway.
//! Failures of a domain that is already tripped or disabled are not counted:
//! they are late bounces of mail routed before, and must not trip the domain
//! again as soon as an administrator enables it.
//!
//! A permanent failure that says the destination has no such mailbox
//! (`5.1.1` user unknown: [`Failure::unknown_mailbox`]) is about the
//! address, not the destination: a dictionary spammer makes up thousands,
//! each accepted here, routed and bounced there, and must not switch
//! routing off (issue 23: three of them tripped a domain with a low
//! threshold). It counts only for an address the destination must have
//! ([`Attribution::expected`]: the `verify` address, a mailbox here, a
//! configured target, the destination's own list), which is how a destination that lost all its users
//! still trips; otherwise it is logged at INFO and counted in
//! `dualroute_breaker_ignored_total`. docs/design.md §7, "What the breaker
//! counts".
//!
//! Deferrals (temporary failures) are counted beside the bounces, each
//! (queue id, recipient) once per window however often the MTA retries
//! it: a destination that throttles new senders (Google `421 4.7.28`,
//! Microsoft `451 4.7.500`) or is down shows here long before the queue
//! fills. With `deferrals: N` a domain trips at N of them, as Zoho stops
//! forwarding after more than 10 temporary failures; without it they are
//! only counted, logged and shown by `dualroute status`. The counts are
//! written to `state_dir` (`breaker-counts`) for `status`.
//!
//! With `maillog: journal` the lines come from the systemd journal's mail
//! facility instead ([`journal`]), rebuilt as syslog lines for the same
//! parser and resumed from the last entry read after a restart. A breaker
//! that cannot read its source is shown as such ([`source`], issue 25):
//! in `breaker-counts` for `dualroute status`, in a metric, in an ERROR
//! once a minute and by mail.
//!
//! The parts: [`maillog`] reads lines and attributes addresses, [`follow`]
//! follows the file, [`journal`] the journal, [`source`] chooses and
//! watches whether it is read, [`access`] is `dualroute check`'s test of
//! it as the service user; this module counts and trips.

pub mod access;
mod follow;
pub mod journal;
mod maillog;
mod source;

pub use follow::Follower;
pub use maillog::{parse_line, Attribution, Expected, Failure, FailureKind};
pub use source::{Source, NAG};

use crate::cluster::fleet::{Counted, FleetFailures};
use crate::config::{human, BreakerConfig};
use crate::live::{Installer, LivePolicy};
use crate::metrics::Metrics;
use crate::notify::{Event, Outbox};
use crate::policy::Policy;
use crate::state::{self, BreakerCounts, FailureCounts, StateDir, TripCause, Tripped};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the log is looked at.
pub const POLL: Duration = Duration::from_millis(500);

/// The failures of one domain within the sliding window.
#[derive(Clone, Debug)]
pub struct Window {
    threshold: u32,
    span: Duration,
    hits: VecDeque<Instant>,
}

impl Window {
    pub fn new(threshold: u32, span: Duration) -> Window {
        Window {
            threshold: threshold.max(1),
            span,
            hits: VecDeque::new(),
        }
    }

    /// New limits after a reload; the failures counted so far stay.
    pub fn set_limits(&mut self, threshold: u32, span: Duration) {
        self.threshold = threshold.max(1);
        self.span = span;
    }

    /// Counts a failure at `at`. Returns the number of failures within the
    /// window when it reaches the threshold; the count is kept until
    /// [`Window::reset`] (after the trip has been recorded), so that a trip
    /// that could not be recorded is tried again at the next failure.
    pub fn record(&mut self, at: Instant) -> Option<u32> {
        self.record_with(at, 0)
    }

    /// [`Window::record`] with `others` failures counted elsewhere (the
    /// other nodes of the fleet, src/cluster/fleet.rs) added to the count.
    pub fn record_with(&mut self, at: Instant, others: u32) -> Option<u32> {
        self.hits.push_back(at);
        let count = self.count(at).saturating_add(others);
        (count >= self.threshold).then_some(count)
    }

    /// The failures within the window ending at `at`; older ones are
    /// forgotten.
    pub fn count(&mut self, at: Instant) -> u32 {
        while let Some(&first) = self.hits.front() {
            if at.saturating_duration_since(first) >= self.span {
                self.hits.pop_front();
            } else {
                break;
            }
        }
        u32::try_from(self.hits.len()).unwrap_or(u32::MAX)
    }

    pub fn reset(&mut self) {
        self.hits.clear();
    }
}

/// The failures a trip notification and `status` show.
const RECENT: usize = 10;

/// One domain's counts.
#[derive(Clone, Debug)]
struct Counts {
    bounces: Window,
    deferrals: Window,
    /// The last [`RECENT`] failures counted, oldest first.
    recent: VecDeque<String>,
}

impl Counts {
    fn new(config: &BreakerConfig) -> Counts {
        let (bounces, deferrals) = limits(config);
        Counts {
            bounces: Window::new(bounces, config.window.0),
            deferrals: Window::new(deferrals, config.window.0),
            recent: VecDeque::new(),
        }
    }

    fn at(&mut self, now: Instant) -> FailureCounts {
        FailureCounts {
            bounces: self.bounces.count(now),
            deferrals: self.deferrals.count(now),
        }
    }
}

/// The trip points of the two counts; without `deferrals` that count
/// never trips.
fn limits(config: &BreakerConfig) -> (u32, u32) {
    (config.threshold, config.deferrals.unwrap_or(u32::MAX))
}

/// What a trip reaches: the holds are read again through the reload actor
/// (the one writer), the metrics count, the outbox tells the
/// administrator.
#[derive(Clone)]
pub(crate) struct Reach {
    pub installer: Installer,
    pub metrics: Arc<Metrics>,
    pub outbox: Arc<Outbox>,
    /// With `cluster:`, the fleet's failures (src/cluster/fleet.rs): this
    /// node's counted failures are shared, the others' add to its counts.
    pub fleet: Option<Arc<FleetFailures>>,
}

/// The breaker's state between polls.
struct Breaker {
    config: BreakerConfig,
    source: Source,
    /// Whether `source` is read (issue 25: a blind breaker is shown).
    sight: source::Sight,
    /// The attribution and the policy it was built from.
    attribution: Option<(Arc<Policy>, Attribution)>,
    windows: HashMap<String, Counts>,
    /// (kind, queue id, recipient) of deferred deliveries counted within
    /// the window: the MTA logs them again at every retry.
    seen: HashMap<(FailureKind, String, String), Instant>,
    /// What was last written to `breaker-counts`.
    written: Option<Written>,
}

/// The window, the counts and the source's state last written.
type Written = (
    u64,
    std::collections::BTreeMap<String, FailureCounts>,
    Option<state::BreakerSource>,
);

impl Breaker {
    fn new(config: BreakerConfig, state_dir: &std::path::Path) -> Breaker {
        let deferrals = match config.deferrals {
            Some(n) => format!("at {n} deferrals"),
            None => "deferrals counted, not a trip (no `deferrals:`)".into(),
        };
        tracing::info!(
            "bounce breaker: following {} (trips at {} permanent failures of routed mail within {}; {deferrals})",
            config.maillog,
            config.threshold,
            human(config.window.0)
        );
        let source = Source::new(&config, state_dir);
        Breaker {
            sight: source::Sight::new(&config),
            config,
            source,
            attribution: None,
            windows: HashMap::new(),
            seen: HashMap::new(),
            written: None,
        }
    }

    /// Takes the configuration of a reload: a new `maillog` is followed
    /// from its end; new limits apply to the counts so far.
    fn reconfigure(&mut self, config: &BreakerConfig, state_dir: &std::path::Path) {
        if config.maillog != self.config.maillog
            || config.journal_directory != self.config.journal_directory
        {
            *self = Breaker::new(config.clone(), state_dir);
            return;
        }
        if *config != self.config {
            self.source.reconfigure(config);
            let (bounces, deferrals) = limits(config);
            for c in self.windows.values_mut() {
                c.bounces.set_limits(bounces, config.window.0);
                c.deferrals.set_limits(deferrals, config.window.0);
            }
            self.config = config.clone();
        }
    }

    fn attribution(&mut self, policy: &Arc<Policy>) -> &Attribution {
        if !matches!(&self.attribution, Some((p, _)) if Arc::ptr_eq(p, policy)) {
            self.attribution = None;
        }
        &self
            .attribution
            .get_or_insert_with(|| (policy.clone(), Attribution::new(policy)))
            .1
    }

    fn tick(&mut self, policy: &Arc<Policy>, reach: &Reach) {
        let lines = self.source.poll();
        let health = self.source.health();
        self.sight
            .update(health, &policy.config, &reach.metrics, &reach.outbox);
        // Each failure with when it was logged: a journal entry read after
        // a restart leaves the window when its time is up, not an hour
        // after it was read.
        let now = Instant::now();
        let failures: Vec<(Failure, Instant)> = lines
            .iter()
            .filter_map(|(l, age)| parse_line(l).map(|f| (f, now.checked_sub(*age).unwrap_or(now))))
            .collect();
        let dir = StateDir::new(&policy.config.state_dir);
        let span = self.config.window.0;
        self.seen
            .retain(|_, at| now.saturating_duration_since(*at) < span);
        for (f, at) in &failures {
            // (domain, why a "no such mailbox" counts) to count.
            let mut owners: Vec<(String, Option<Expected>)> = Vec::new();
            // (domain, recipient) of "no such mailbox" answers not counted.
            let mut unknown: Vec<(String, &str)> = Vec::new();
            // A 4.x.x dsn: the MTA keeps the message and logs it again at
            // every retry (a bounce is logged once).
            let retried = f.dsn.starts_with('4');
            for rcpt in &f.recipients {
                let key = (f.kind, f.queue_id.clone(), rcpt.to_ascii_lowercase());
                if retried && self.seen.contains_key(&key) {
                    continue;
                }
                let attribution = self.attribution(policy);
                let mine = attribution.domains(rcpt).to_vec();
                // Seen once, counted or not: a soft-bounced unknown is
                // logged again at every retry, and is one address.
                let ours = !mine.is_empty();
                let mut counted = Vec::with_capacity(mine.len());
                for domain in mine {
                    if !f.unknown_mailbox {
                        counted.push((domain, None));
                        continue;
                    }
                    // docs/design.md §7, "What the breaker counts": an
                    // unknown address is the sender's mistake or a
                    // dictionary's guess, unless the destination must
                    // know it.
                    match attribution.expected(policy, &domain, rcpt) {
                        Some(why) => counted.push((domain, Some(why))),
                        None => unknown.push((domain, rcpt)),
                    }
                }
                if retried && ours {
                    self.seen.insert(key, now);
                }
                owners.extend(counted);
            }
            for (domain, rcpt) in unknown {
                not_counted(policy, reach, &domain, rcpt, f);
            }
            for (domain, why) in owners {
                self.count(policy, reach, &domain, f, why, *at);
            }
        }
        self.source.commit();
        self.fleet_check(policy, reach, now);
        self.record_counts(&dir, now);
    }

    /// Trips a domain whose failures here and on the other nodes of the
    /// fleet together reach a limit, though none arrived here since: the
    /// others' counts come with the fleet's sync, not with a log line.
    fn fleet_check(&mut self, policy: &Arc<Policy>, reach: &Reach, now: Instant) {
        let Some(fleet) = reach.fleet.clone() else {
            return;
        };
        let (threshold, deferrals) = limits(&self.config);
        for (domain, kind) in fleet.domains() {
            if !policy.domains.contains_key(&domain) {
                continue;
            }
            let others = fleet.others(&domain, kind);
            let local = self
                .windows
                .get_mut(&domain)
                .map(|c| c.at(now))
                .unwrap_or_default();
            let (here, limit, cause) = match kind {
                "bounce" => (local.bounces, threshold, TripCause::Bounces),
                _ => (local.deferrals, deferrals, TripCause::Deferrals),
            };
            if others == 0 || here.saturating_add(others) < limit {
                continue;
            }
            let dir = StateDir::new(&policy.config.state_dir);
            match dir.load(&domain) {
                Ok(st) if st.tripped.is_none() && st.disabled.is_none() => {}
                _ => continue,
            }
            let recent: Vec<String> = self
                .windows
                .get(&domain)
                .map(|c| c.recent.iter().cloned().collect())
                .unwrap_or_default();
            let last = recent.last().cloned().unwrap_or_else(|| {
                format!("{others} failures counted by the other nodes of the fleet")
            });
            let counts = FailureCounts {
                bounces: local.bounces + fleet.others(&domain, "bounce"),
                deferrals: local.deferrals + fleet.others(&domain, "deferral"),
            };
            self.trip(policy, reach, &domain, cause, counts, last, recent);
        }
    }

    /// Writes the counts for `dualroute status` when they changed (also
    /// when failures left the window).
    fn record_counts(&mut self, dir: &StateDir, now: Instant) {
        let mut domains = std::collections::BTreeMap::new();
        for (name, c) in &mut self.windows {
            let counts = c.at(now);
            if counts != FailureCounts::default() {
                domains.insert(name.clone(), counts);
            }
        }
        let window_secs = self.config.window.0.as_secs();
        let source = self.sight.record();
        let now_written = (window_secs, domains.clone(), source.clone());
        if self.written.as_ref() == Some(&now_written) {
            return;
        }
        // The metrics count each failure as it is read (`count`); the
        // windowed counts go to `state_dir` for `dualroute status`.
        let counts = BreakerCounts {
            at: state::now(),
            window_secs,
            domains,
            source,
        };
        match dir.write_breaker_counts(&counts) {
            Ok(()) => self.written = Some(now_written),
            Err(e) => tracing::warn!(
                "bounce breaker: cannot record its counts for `dualroute status` in {}: {e}",
                dir.dir.display()
            ),
        }
    }

    fn count(
        &mut self,
        policy: &Policy,
        reach: &Reach,
        domain: &str,
        f: &Failure,
        expected: Option<Expected>,
        now: Instant,
    ) {
        let dir = StateDir::new(&policy.config.state_dir);
        // Routing is already off (or the state is unreadable, which holds
        // the domain too): a late bounce of mail routed before.
        match dir.load(domain) {
            Ok(st) if st.tripped.is_none() && st.disabled.is_none() => {}
            _ => {
                self.windows.remove(domain);
                return;
            }
        }
        reach.metrics.breaker_failure(
            domain,
            match f.kind {
                FailureKind::Bounce => "bounce",
                FailureKind::Deferral => "deferral",
            },
        );
        let (threshold, span) = (self.config.threshold, self.config.window.0);
        let config = &self.config;
        let counts = self
            .windows
            .entry(domain.to_owned())
            .or_insert_with(|| Counts::new(config));
        if counts.recent.len() == RECENT {
            counts.recent.pop_front();
        }
        counts.recent.push_back(f.line.clone());
        let kind = match f.kind {
            FailureKind::Bounce => "bounce",
            FailureKind::Deferral => "deferral",
        };
        // Shared with the fleet; the others' count toward the limits.
        let others = |kind| reach.fleet.as_ref().map_or(0, |fl| fl.others(domain, kind));
        if let Some(fleet) = &reach.fleet {
            fleet.counted(Counted {
                domain: domain.to_owned(),
                kind,
                queue_id: f.queue_id.clone(),
                recipient: f.recipients.join(","),
                at: state::now(),
            });
        }
        let (tripped, cause) = match f.kind {
            FailureKind::Bounce => (
                counts.bounces.record_with(now, others("bounce")),
                TripCause::Bounces,
            ),
            FailureKind::Deferral => (
                counts.deferrals.record_with(now, others("deferral")),
                TripCause::Deferrals,
            ),
        };
        let local = counts.at(now);
        let now_counts = FailureCounts {
            bounces: local.bounces + others("bounce"),
            deferrals: local.deferrals + others("deferral"),
        };
        if tripped.is_none() {
            let limit = match config.deferrals {
                Some(n) => format!("{n} before routing is switched off"),
                None => "not a trip condition".into(),
            };
            // Why a "no such mailbox" answer counted, for the
            // administrator who knows that most do not.
            let why = expected
                .map(|e| format!("no such mailbox at the destination, counted: {e}; "))
                .unwrap_or_default();
            match f.kind {
                FailureKind::Bounce => tracing::warn!(
                    "{domain}: routed mail failed permanently ({why}{} of {threshold} within {} before routing is switched off; {} deferrals): {}",
                    now_counts.bounces,
                    human(span),
                    now_counts.deferrals,
                    f.line
                ),
                FailureKind::Deferral => tracing::warn!(
                    "{domain}: routed mail deferred ({} deferrals within {}, {limit}; {} permanent failures): {}",
                    now_counts.deferrals,
                    human(span),
                    now_counts.bounces,
                    f.line
                ),
            }
            return;
        }
        let recent = counts.recent.iter().cloned().collect();
        self.trip(
            policy,
            reach,
            domain,
            cause,
            now_counts,
            f.line.clone(),
            recent,
        );
    }

    /// Switches routing for `domain` off: `counts` (this node's and the
    /// fleet's) reached the limit of `cause`.
    #[allow(clippy::too_many_arguments)]
    fn trip(
        &mut self,
        policy: &Policy,
        reach: &Reach,
        domain: &str,
        cause: TripCause,
        counts: FailureCounts,
        last: String,
        recent: Vec<String>,
    ) {
        let dir = StateDir::new(&policy.config.state_dir);
        let (threshold, span) = (self.config.threshold, self.config.window.0);
        let config = &self.config;
        let trip = Tripped {
            since: state::now(),
            bounces: counts.bounces,
            deferrals: counts.deferrals,
            cause,
            window_secs: span.as_secs(),
            last: last.clone(),
            recent,
        };
        let what = match cause {
            TripCause::Bounces => format!("{} permanent failures", trip.bounces),
            TripCause::Deferrals => format!(
                "{} temporary failures (deferrals: the destination throttles or cannot be reached)",
                trip.deferrals
            ),
        };
        if let Err(e) = dir.trip(domain, &trip) {
            tracing::error!(
                "{domain}: {what} of routed mail within {}, but the bounce breaker cannot record the trip in {}: {e}; routing stays ON until it can",
                human(span),
                dir.dir.display()
            );
            return;
        }
        self.windows.remove(domain);
        // Take effect now, not at the state follower's next look: holds
        // are read per RCPT, also by messages in flight. (On the blocking
        // pool: the poll runs there.)
        for e in reach.installer.refresh_holds_blocking() {
            tracing::error!("{e}; routing for that domain stays off");
        }
        let limit = match cause {
            TripCause::Bounces => format!("threshold {threshold}"),
            TripCause::Deferrals => format!("deferrals {}", config.deferrals.unwrap_or_default()),
        };
        let name = match cause {
            TripCause::Bounces => "bounce breaker tripped",
            TripCause::Deferrals => "breaker tripped on deferrals",
        };
        let fleet = if reach.fleet.is_some() {
            " (this node's and the other nodes' together)"
        } else {
            ""
        };
        tracing::error!(
            "{domain}: {name}: {what}{fleet} of routed mail within {} ({limit}); routing for {domain} is switched off (mailboxes here still get their mail; addresses that would be routed are refused with 451 4.4.4 until routing is back on) and stays off across restarts ({}); last failure: {}; check the destination, then run `dualroute enable {domain}` to switch routing back on",
            human(span),
            dir.dir.join(format!("{domain}.tripped")).display(),
            last
        );
        reach.outbox.notify(
            &policy.config,
            Event::Tripped {
                domain: domain.to_owned(),
                trip,
            },
        );
    }
}

/// A "no such mailbox" answer for `rcpt`, routed for `domain`, that the
/// breaker does not count (docs/design.md §7, "What the breaker
/// counts"): one INFO line that says so and why, and the metric. The MTA
/// has logged the bounce itself; this line says what the breaker made of
/// it.
fn not_counted(policy: &Policy, reach: &Reach, domain: &str, rcpt: &str, f: &Failure) {
    reach.metrics.breaker_ignored(domain, "user_unknown");
    let asks = policy
        .domains
        .get(domain)
        .and_then(|d| d.config.reject_unknown.as_ref())
        .is_some_and(|r| r.callout);
    let hint = if asks {
        ""
    } else {
        "; `destination.reject_unknown` would refuse such addresses at RCPT instead, with no bounce"
    };
    tracing::info!(
        "{domain}: routed mail to <{rcpt}> bounced: no such mailbox at the destination (dsn={}); not counted by the bounce breaker: an unknown address says nothing about the destination, and dictionary spam must not switch routing off{hint}: {}",
        f.dsn,
        f.line
    );
}

/// Runs the breaker for the life of the milter: polls `breaker.maillog`
/// every [`POLL`] and trips domains as described in the module
/// documentation. Follows reloads: a `breaker:` section added, changed or
/// removed by SIGHUP takes effect at the next poll. Does nothing while the
/// configuration has no `breaker:`.
pub(crate) async fn run(live: Arc<LivePolicy>, reach: Reach) {
    let mut breaker: Option<Breaker> = None;
    loop {
        let policy = live.current();
        let reach = reach.clone();
        // File reads, state files and the error log are blocking I/O; each
        // poll is short, so shutdown never waits for it.
        let task = tokio::task::spawn_blocking(move || {
            match (&policy.config.breaker, &mut breaker) {
                (None, b) => {
                    if b.take().is_some() {
                        reach.metrics.breaker_source_gone();
                        tracing::info!(
                            "bounce breaker: no `breaker:` in the configuration any more; stopped"
                        );
                    }
                }
                (Some(c), Some(b)) => b.reconfigure(c, &policy.config.state_dir),
                (Some(c), b @ None) => *b = Some(Breaker::new(c.clone(), &policy.config.state_dir)),
            }
            if let Some(b) = &mut breaker {
                b.tick(&policy, &reach);
            }
            breaker
        });
        breaker = match task.await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("bounce breaker failed: {e}; routed bounces are no longer counted until dualroute restarts");
                return;
            }
        };
        tokio::time::sleep(POLL).await;
    }
}
