//! Recipient callouts (DESIGN.md §10, docs/design.md "Refusing unknown
//! recipients"): before a recipient is routed away, ask the destination
//! whether it knows the address, so that an unknown one can be refused at
//! RCPT instead of accepted and bounced to a forged sender.
//!
//! [`listed`] answers from the destination's address list
//! (`reject_unknown.accounts`), loaded with the policy; [`Callouts`] is
//! the engine the milter asks per recipient when the list does not
//! settle it (src/milter/callout.rs). The engine keeps, per managed
//! domain:
//!
//! - a cache of the destination's answers (src/callout/cache.rs), served at
//!   once, refreshed in the background in the last quarter of its
//!   lifetime, and kept in `state_dir/<domain>.callouts` across restarts;
//! - single flight: concurrent checks of one address share one callout;
//! - bounds per destination (shared by the domains routed to the same
//!   hosts), so that a dictionary attack cannot turn the MX into a probe
//!   cannon (and get it blocklisted at the destination's provider): at
//!   most [`Limits::concurrency`] callouts to the destination at once, at
//!   most [`Limits::per_minute`] new ones a minute (past it the answer is
//!   [`Verdict::Unreachable`], counted in [`Stats::throttled`]);
//! - accept-all detection: after a callout is accepted, a random local
//!   part is asked too (Exim's callout `random`); a destination that takes
//!   it takes anything, and every answer then says so
//!   ([`Answer::accept_all`]), so the caller can say the check protects
//!   nothing.
//!
//! A caller that cannot wait (the milter inside Postfix's
//! `milter_command_timeout`, 30 s by default) passes a deadline: past it
//! the answer is Unreachable, while the callout goes on in the background
//! and its answer is cached for the sender's retry.
//!
//! It uses the configuration, the probe's SMTP client, the state
//! directory's atomic writes and the DNS; never the service or the milter.

mod cache;
mod smtp;

use crate::config::{CalloutCache, DomainConfig};
use crate::dns::Dns;
use crate::policy::{DomainPolicy, Policy};
use crate::state::StateDir;
use cache::{AcceptAll, Cache, Entry};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::time::timeout;

/// What the destination says about an address.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Verdict {
    /// 2xx to RCPT: it takes mail for the address.
    Known,
    /// 5xx to RCPT: it refuses the address; refuse it here (550 5.1.1).
    Unknown,
    /// 4xx, timeout, no host reachable, the bounds reached or the deadline
    /// passed: it cannot say now; `reject_unknown.unreachable` decides.
    Unreachable,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Known => "known",
            Verdict::Unknown => "unknown",
            Verdict::Unreachable => "unreachable",
        })
    }
}

/// Where an answer came from.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Origin {
    /// The cache: no callout was made.
    Cache,
    /// A callout made (or joined) for this check.
    Callout,
    /// No callout: the destination's rate of new callouts was reached.
    Throttled,
    /// The callout did not answer within the caller's deadline; it goes
    /// on in the background and its answer will be cached.
    Deadline,
    /// The destination's address list (`reject_unknown.accounts`): no
    /// callout was made.
    List,
}

/// The answer to one check.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Answer {
    pub verdict: Verdict,
    /// The destination's reply to RCPT, or why there is none; for the log
    /// and `explain`.
    pub reply: String,
    pub origin: Origin,
    /// When the destination gave the answer (Unix seconds).
    pub at: u64,
    /// The destination accepted a random local part the last time it was
    /// asked: it takes any address, so [`Verdict::Known`] means nothing.
    pub accept_all: bool,
}

/// The bounds of the callouts to one destination.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Limits {
    /// Callouts to the destination at once; more wait for a turn.
    pub concurrency: usize,
    /// New callouts a minute (answers from the cache and checks that join
    /// a callout in flight are free).
    pub per_minute: u32,
    /// Each SMTP step's timeout (connect, each reply).
    pub step_timeout: Duration,
    /// One callout's whole time, waiting for a turn included; past it the
    /// answer is Unreachable.
    pub callout_timeout: Duration,
    /// Addresses cached per domain; the oldest go first.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // Postfix verify(8) makes its probes through the queue, one
            // delivery agent each; four at once keep a cold burst of
            // recipients fast without looking like an attack to the MX.
            concurrency: 4,
            // A real burst (a message to a list of new addresses) fits;
            // a dictionary attack is held to one probe a second.
            per_minute: 60,
            step_timeout: Duration::from_secs(10),
            callout_timeout: Duration::from_secs(30),
            max_entries: 50_000,
        }
    }
}

/// The budget a caller inside the milter gives a check: a third of
/// Postfix's `milter_command_timeout` (30 s), so a cold callout answers
/// well before Postfix gives up on the milter.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The current time in Unix seconds; replaceable so tests can move it.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Counts of one domain's checks since start, for the metrics and
/// `status`.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Stats {
    /// Callouts by result.
    pub known: u64,
    pub unknown: u64,
    pub unreachable: u64,
    /// Checks answered from the cache.
    pub cache_hits: u64,
    /// Checks refused a callout by [`Limits::per_minute`].
    pub throttled: u64,
    /// Checks whose callout passed the caller's deadline.
    pub deadline: u64,
    /// Whether the destination accepts any address; `None`: not asked yet.
    pub accept_all: Option<bool>,
}

/// The callout engine; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Callouts {
    inner: Arc<Inner>,
}

struct Inner {
    state: StateDir,
    helo: String,
    dns: Arc<Dns>,
    clock: Clock,
    limits: Limits,
    domains: Mutex<HashMap<String, Arc<Domain>>>,
    /// Per destination ([`destination_key`]): domains routed to the same
    /// hosts share their bounds, as the hosts see them.
    bounds: Mutex<HashMap<String, Arc<Bounds>>>,
    /// With `cluster:` ([`Callouts::share`]): answers of this node's
    /// callouts, for the fleet task to hand to the other nodes.
    exports: Mutex<Option<Vec<Shared>>>,
}

/// A destination's answer as the nodes of a fleet exchange it (DESIGN.md
/// §11: the recipient-callout cache is shared).
#[derive(Clone, Debug, Eq, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Shared {
    pub domain: String,
    /// The address as asked (as it arrives at the destination).
    pub address: String,
    pub known: bool,
    /// When the destination gave it (Unix seconds).
    pub at: u64,
    pub reply: String,
    /// The destination the answer came from ([`destination_key`]): an
    /// answer from other hosts is not taken.
    pub destination: String,
}

/// The bounds of the callouts to one destination.
struct Bounds {
    permits: Semaphore,
    /// The current minute and the callouts started in it.
    minute: Mutex<(u64, u32)>,
}

/// One managed domain's callouts.
struct Domain {
    name: String,
    /// The destination the cache belongs to (what [`destination_key`] is
    /// made of), to tell a changed destination cheaply.
    destination: crate::config::Destination,
    tls: (
        Option<crate::config::TlsLevel>,
        Vec<crate::config::TlsMatch>,
    ),
    cache: Mutex<Cache>,
    /// Addresses with a callout in flight, and where its answer appears.
    flights: Mutex<HashMap<String, watch::Receiver<Option<Answer>>>>,
    bounds: Arc<Bounds>,
    stats: Mutex<Stats>,
    /// One writer of the cache file at a time (src/state.rs names its
    /// temporary file after the process).
    writing: Mutex<()>,
    /// An accept-all callout is in flight.
    asking_random: AtomicBool,
}

/// A mutex whose holder panicked still holds consistent data here (every
/// critical section is a few assignments): go on with it rather than take
/// the milter down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the cached answers depend on: the hosts asked and the TLS level
/// the conversation used. Answers from another destination are not used.
fn destination_key(d: &DomainConfig) -> String {
    let hosts: Vec<String> = d
        .destination
        .hosts()
        .iter()
        .map(ToString::to_string)
        .collect();
    match d.transport.tls_policy() {
        Some(tls) => format!("{} tls={tls}", hosts.join(" ")),
        None => hosts.join(" "),
    }
}

fn lifetimes(d: &DomainConfig) -> CalloutCache {
    d.reject_unknown
        .as_ref()
        .map(|r| r.cache)
        .unwrap_or_default()
}

impl Callouts {
    /// An engine that keeps its caches under `state_dir`, greets with
    /// `helo` (the `instance:`), and finds the destination's hosts with
    /// `dns`.
    pub fn new(state_dir: &Path, helo: &str, dns: Arc<Dns>, limits: Limits) -> Callouts {
        Callouts::with_clock(state_dir, helo, dns, limits, Arc::new(crate::state::now))
    }

    /// [`Callouts::new`] with another clock (tests).
    pub fn with_clock(
        state_dir: &Path,
        helo: &str,
        dns: Arc<Dns>,
        limits: Limits,
        clock: Clock,
    ) -> Callouts {
        Callouts {
            inner: Arc::new(Inner {
                state: StateDir::new(state_dir),
                helo: helo.to_owned(),
                dns,
                clock,
                limits,
                domains: Mutex::new(HashMap::new()),
                bounds: Mutex::new(HashMap::new()),
                exports: Mutex::new(None),
            }),
        }
    }

    /// Reads `domain`'s cache file now (the service at start and after a
    /// reload), so that the first check does not read it on the RCPT path.
    pub fn load(&self, domain: &str, d: &DomainConfig) {
        self.domain(domain, d);
    }

    /// From now on, every answer a callout of this node gets is also kept
    /// for [`Callouts::take_shared`] (the fleet task, src/cluster/).
    pub fn share(&self) {
        lock(&self.inner.exports).get_or_insert_with(Vec::new);
    }

    /// The answers to hand to the other nodes, taken.
    pub fn take_shared(&self) -> Vec<Shared> {
        lock(&self.inner.exports)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Takes answers another node got (through the fleet), for `domain`
    /// configured as `d`: each replaces what is cached for its address
    /// when it is newer, and only when it came from the same destination.
    /// Returns how many were taken. Writes the cache file once.
    pub async fn import(&self, domain: &str, d: &DomainConfig, answers: Vec<Shared>) -> usize {
        let dom = self.domain(domain, d);
        let key = destination_key(d);
        let (life, now, max) = (
            lifetimes(d),
            (self.inner.clock)(),
            self.inner.limits.max_entries,
        );
        let mut taken = 0;
        {
            let mut cache = lock(&dom.cache);
            for a in answers {
                if a.domain != domain || a.destination != key {
                    continue;
                }
                let newer = cache.entries.get(&a.address).is_none_or(|e| e.at < a.at);
                let entry = Entry {
                    known: a.known,
                    at: a.at,
                    reply: a.reply,
                };
                if newer && entry.fresh(&life, now) {
                    cache.insert(a.address, entry, &life, now, max);
                    taken += 1;
                }
            }
        }
        if taken > 0 {
            self.persist(&dom).await;
        }
        taken
    }

    /// The cache file of `domain`.
    pub fn cache_file(&self, domain: &str) -> PathBuf {
        self.inner.state.dir.join(format!("{domain}.callouts"))
    }

    /// Whether the destination of `domain` (configured as `d`) knows
    /// `address`, the address exactly as it will arrive there (after the
    /// routing rewrite and `change_envelope`, docs/design.md §3): from the
    /// cache at once, else by a callout shared with every concurrent check
    /// of the same address, waiting at most `deadline`.
    pub async fn check(
        &self,
        domain: &str,
        d: &DomainConfig,
        address: &str,
        deadline: Duration,
    ) -> Answer {
        let dom = self.domain(domain, d);
        let life = lifetimes(d);
        let now = (self.inner.clock)();
        let hit = {
            let cache = lock(&dom.cache);
            cache
                .get(address, &life, now)
                .cloned()
                .map(|e| (e, cache.accept_all.as_ref().is_some_and(|a| a.accepts)))
        };
        if let Some((entry, accept_all)) = hit {
            lock(&dom.stats).cache_hits += 1;
            if entry.refresh_due(&life, now) {
                // In the background: the answer at hand is still good.
                // A refresh the rate refuses waits for the next check.
                let _ = self.start(&dom, d, address, true);
            }
            return answer(&entry, Origin::Cache, accept_all);
        }
        let mut rx = match self.start(&dom, d, address, false) {
            Ok(rx) => rx,
            Err(throttled) => return throttled,
        };
        let waited = timeout(deadline, async {
            rx.wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|a| a.clone())
        })
        .await;
        match waited {
            Ok(Some(a)) => a,
            // Ok(None): the callout task ended without an answer (it
            // cannot, short of a panic); treat it as the deadline.
            _ => {
                lock(&dom.stats).deadline += 1;
                Answer {
                    verdict: Verdict::Unreachable,
                    reply: format!(
                        "the destination did not answer within {deadline:?}; the callout goes on and its answer will be cached"
                    ),
                    origin: Origin::Deadline,
                    at: (self.inner.clock)(),
                    accept_all: lock(&dom.cache).accept_all.as_ref().is_some_and(|a| a.accepts),
                }
            }
        }
    }

    /// The cached answer for `address`, without a callout (for `explain`).
    pub fn cached(&self, domain: &str, d: &DomainConfig, address: &str) -> Option<Answer> {
        let dom = self.domain(domain, d);
        let cache = lock(&dom.cache);
        let accept_all = cache.accept_all.as_ref().is_some_and(|a| a.accepts);
        cache
            .get(address, &lifetimes(d), (self.inner.clock)())
            .map(|e| answer(e, Origin::Cache, accept_all))
    }

    /// A callout made now for `address`, for `explain --callout`: outside
    /// the cache and the rate of new callouts (one administrator's
    /// question), within the turn and the time bounds. Its answer is
    /// shown, not cached: the running milter owns the cache file, and
    /// this process's copy of it would overwrite the milter's newer one.
    /// A Known answer is followed by a random local part, so the answer
    /// says whether the destination accepts any address.
    pub async fn live(&self, domain: &str, d: &DomainConfig, address: &str) -> Answer {
        let dom = self.domain(domain, d);
        let unanswered = |e: tokio::time::error::Elapsed| smtp::Reply {
            verdict: Verdict::Unreachable,
            text: format!(
                "no answer within {}s ({e})",
                self.inner.limits.callout_timeout.as_secs()
            ),
        };
        let asked = self.ask(&dom, d, address).await.unwrap_or_else(unanswered);
        let mut accept_all = false;
        if asked.verdict == Verdict::Known {
            if let Some((_, at)) = address.rsplit_once('@') {
                let random = format!("{}@{at}", smtp::random_local_part());
                accept_all = self
                    .ask(&dom, d, &random)
                    .await
                    .is_ok_and(|r| r.verdict == Verdict::Known);
            }
        }
        Answer {
            verdict: asked.verdict,
            reply: asked.text,
            origin: Origin::Callout,
            at: (self.inner.clock)(),
            accept_all,
        }
    }

    /// The counts of `domain` since start; `None` before its first check.
    pub fn stats(&self, domain: &str) -> Option<Stats> {
        let dom = lock(&self.inner.domains).get(domain).cloned()?;
        let mut stats = lock(&dom.stats).clone();
        stats.accept_all = lock(&dom.cache).accept_all.as_ref().map(|a| a.accepts);
        Some(stats)
    }

    /// The domain's state, created (and its cache file read) on first use
    /// and again when its destination changed.
    fn domain(&self, name: &str, d: &DomainConfig) -> Arc<Domain> {
        let mut domains = lock(&self.inner.domains);
        // Compared by value, not by [`destination_key`]: this runs for
        // every routed RCPT, and formatting the key is most of the cost
        // of a cache hit.
        if let Some(dom) = domains.get(name).filter(|dom| {
            dom.destination == d.destination
                && dom.tls.0 == d.transport.tls
                && dom.tls.1 == d.transport.tls_match
        }) {
            return dom.clone();
        }
        let key = destination_key(d);
        let file = self.cache_file(name);
        let cache = match self.inner.state.read_path::<Cache>(&file) {
            Ok(Some(c)) if c.destination == key => c,
            Ok(Some(_)) => {
                tracing::info!(
                    "{}: written for another destination; {name}'s callouts start afresh",
                    file.display()
                );
                Cache::default()
            }
            Ok(None) => Cache::default(),
            // The cache only saves callouts: losing it costs time, not
            // mail. It is rewritten by the next answer.
            Err(e) => {
                tracing::warn!("{e}: the callout cache of {name} is unreadable and starts empty; it is rewritten with the next answer");
                Cache::default()
            }
        };
        let bounds = lock(&self.inner.bounds)
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Bounds {
                    permits: Semaphore::new(self.inner.limits.concurrency.max(1)),
                    minute: Mutex::new((0, 0)),
                })
            })
            .clone();
        let dom = Arc::new(Domain {
            name: name.to_owned(),
            destination: d.destination.clone(),
            tls: (d.transport.tls, d.transport.tls_match.clone()),
            cache: Mutex::new(Cache {
                destination: key,
                ..cache
            }),
            flights: Mutex::new(HashMap::new()),
            bounds,
            stats: Mutex::new(Stats::default()),
            writing: Mutex::new(()),
            asking_random: AtomicBool::new(false),
        });
        domains.insert(name.to_owned(), dom.clone());
        dom
    }

    /// Joins the callout in flight for `address`, or starts one if the
    /// rate allows; the receiver sees its answer. A `refresh` the rate
    /// refuses is not counted: no check went without its answer.
    fn start(
        &self,
        dom: &Arc<Domain>,
        d: &DomainConfig,
        address: &str,
        refresh: bool,
    ) -> Result<watch::Receiver<Option<Answer>>, Answer> {
        let mut flights = lock(&dom.flights);
        if let Some(rx) = flights.get(address) {
            return Ok(rx.clone());
        }
        let now = (self.inner.clock)();
        {
            let mut minute = lock(&dom.bounds.minute);
            if minute.0 != now / 60 {
                *minute = (now / 60, 0);
            }
            if minute.1 >= self.inner.limits.per_minute {
                if !refresh {
                    lock(&dom.stats).throttled += 1;
                }
                return Err(Answer {
                    verdict: Verdict::Unreachable,
                    reply: format!(
                        "{} new callouts to the destination of {} this minute already (the limit): not asked",
                        minute.1, dom.name
                    ),
                    origin: Origin::Throttled,
                    at: now,
                    accept_all: lock(&dom.cache).accept_all.as_ref().is_some_and(|a| a.accepts),
                });
            }
            minute.1 += 1;
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(address.to_owned(), rx.clone());
        drop(flights);
        let this = self.clone();
        let dom = dom.clone();
        let d = d.clone();
        let address = address.to_owned();
        tokio::spawn(async move {
            let a = this.callout(&dom, &d, &address).await;
            // The cache holds the answer before the flight ends, so no
            // check in between starts a second callout.
            lock(&dom.flights).remove(&address);
            let known = a.verdict == Verdict::Known;
            tx.send_replace(Some(a));
            // After the answer, so the check does not wait for it.
            if known && this.accept_all_stale(&dom, &d) {
                this.ask_random(&dom, &d, &address).await;
            }
        });
        Ok(rx)
    }

    /// `address` asked of the destination within its bounds (a turn among
    /// its concurrent callouts, the whole callout within
    /// `callout_timeout`); the one place a callout is made.
    async fn ask(
        &self,
        dom: &Arc<Domain>,
        d: &DomainConfig,
        address: &str,
    ) -> Result<smtp::Reply, tokio::time::error::Elapsed> {
        let limits = &self.inner.limits;
        timeout(limits.callout_timeout, async {
            let _turn = dom.bounds.permits.acquire().await;
            smtp::ask(
                d,
                &*self.inner.dns,
                &self.inner.helo,
                address,
                limits.step_timeout,
            )
            .await
        })
        .await
    }

    /// One callout, within the destination's bounds; its answer is cached
    /// unless it is Unreachable (a cached answer stays while the
    /// destination is down).
    async fn callout(&self, dom: &Arc<Domain>, d: &DomainConfig, address: &str) -> Answer {
        let limits = &self.inner.limits;
        let asked = self
            .ask(dom, d, address)
            .await
            .unwrap_or_else(|_| smtp::Reply {
                verdict: Verdict::Unreachable,
                text: format!("no answer within {}s", limits.callout_timeout.as_secs()),
            });
        let now = (self.inner.clock)();
        let life = lifetimes(d);
        let changed = {
            let mut stats = lock(&dom.stats);
            match asked.verdict {
                Verdict::Known => stats.known += 1,
                Verdict::Unknown => stats.unknown += 1,
                Verdict::Unreachable => stats.unreachable += 1,
            }
            drop(stats);
            let mut cache = lock(&dom.cache);
            if asked.verdict == Verdict::Unknown {
                // A refusal proves the destination does not take anything.
                cache.accept_all = Some(AcceptAll {
                    accepts: false,
                    at: now,
                    reply: asked.text.clone(),
                });
            }
            (asked.verdict != Verdict::Unreachable).then(|| {
                let entry = Entry {
                    known: asked.verdict == Verdict::Known,
                    at: now,
                    reply: asked.text.clone(),
                };
                if let Some(exports) = lock(&self.inner.exports).as_mut() {
                    // Bounded while the fleet task cannot hand them on.
                    if exports.len() < 10_000 {
                        exports.push(Shared {
                            domain: dom.name.clone(),
                            address: address.to_owned(),
                            known: entry.known,
                            at: now,
                            reply: entry.reply.clone(),
                            destination: destination_key(d),
                        });
                    }
                }
                cache.insert(address.to_owned(), entry, &life, now, limits.max_entries);
            })
        };
        let accept_all = lock(&dom.cache)
            .accept_all
            .as_ref()
            .is_some_and(|a| a.accepts);
        if changed.is_some() {
            self.persist(dom).await;
        }
        Answer {
            verdict: asked.verdict,
            reply: asked.text,
            origin: Origin::Callout,
            at: now,
            accept_all,
        }
    }

    /// Whether the accept-all verdict is missing or older than the
    /// negative lifetime (a destination's catch-all can be switched on or
    /// off; asking once per negative lifetime costs one callout).
    fn accept_all_stale(&self, dom: &Domain, d: &DomainConfig) -> bool {
        let now = (self.inner.clock)();
        let negative = lifetimes(d).negative.0.as_secs();
        lock(&dom.cache)
            .accept_all
            .as_ref()
            .is_none_or(|a| now >= a.at.saturating_add(negative))
    }

    /// Asks the destination for a random local part in the domain of
    /// `address` and records whether it takes it.
    async fn ask_random(&self, dom: &Arc<Domain>, d: &DomainConfig, address: &str) {
        let Some((_, domain)) = address.rsplit_once('@') else {
            return;
        };
        if dom.asking_random.swap(true, Ordering::SeqCst) {
            return;
        }
        let random = format!("{}@{domain}", smtp::random_local_part());
        let asked = self.ask(dom, d, &random).await;
        dom.asking_random.store(false, Ordering::SeqCst);
        let reply = match asked {
            Ok(reply) if reply.verdict != Verdict::Unreachable => reply,
            // No answer: the verdict stays as it was; asked again after
            // the next accepted callout.
            _ => return,
        };
        let accepts = reply.verdict == Verdict::Known;
        if accepts {
            tracing::warn!(
                "the destination of {} accepts any address ({random}: {}): reject_unknown's callout cannot tell unknown addresses there",
                dom.name,
                reply.text
            );
        }
        lock(&dom.cache).accept_all = Some(AcceptAll {
            accepts,
            at: (self.inner.clock)(),
            reply: reply.text,
        });
        self.persist(dom).await;
    }

    /// Writes the cache file off the async threads, one writer at a time;
    /// each writes the cache as it is when its turn comes, so the file
    /// never goes back to an older state.
    async fn persist(&self, dom: &Arc<Domain>) {
        let state = self.inner.state.clone();
        let file = self.cache_file(&dom.name);
        let name = dom.name.clone();
        let dom = dom.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _one = lock(&dom.writing);
            let cache = lock(&dom.cache).clone();
            state.write_path(&file, &cache)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                "cannot write the callout cache of {name}: {e}; answers are kept in memory"
            ),
            Err(e) => tracing::warn!("cannot write the callout cache of {name}: {e}"),
        }
    }
}

/// What a domain's callout cache file says, for `status` and `check`
/// (read from `state_dir` as the milter wrote it; no engine, no callout).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Summary {
    /// Fresh answers: Known and Unknown.
    pub known: usize,
    pub unknown: usize,
    /// Whether the destination accepted a random local part, when it was
    /// asked, and its reply; `None`: not asked yet.
    pub accept_all: Option<(bool, u64, String)>,
}

impl Summary {
    /// One line for `status`/`check`, with the warning an accept-all
    /// destination deserves.
    pub fn line(&self) -> String {
        let mut line = format!(
            "reject_unknown callouts: {} known and {} unknown addresses cached",
            self.known, self.unknown
        );
        match &self.accept_all {
            Some((true, at, reply)) => line.push_str(&format!(
                "; WARNING: the destination accepts any address (a random local part was accepted {}: {reply}): the callout cannot tell unknown addresses, they are accepted and will bounce from here; use `reject_unknown.accounts` (the destination's address list) or switch its catch-all off",
                crate::state::when(*at)
            )),
            Some((false, at, _)) => line.push_str(&format!(
                "; the destination refuses unknown addresses (checked {})",
                crate::state::when(*at)
            )),
            None => line.push_str("; whether the destination accepts any address is not known yet (asked after its first accepted callout)"),
        }
        line
    }
}

/// The summary of `domain`'s cache file under `state_dir`; `Ok(None)`
/// when there is none or it was written for another destination.
pub fn summary(
    state_dir: &Path,
    domain: &str,
    d: &DomainConfig,
) -> std::io::Result<Option<Summary>> {
    let state = StateDir::new(state_dir);
    let file = state_dir.join(format!("{domain}.callouts"));
    let Some(cache) = state.read_path::<Cache>(&file)? else {
        return Ok(None);
    };
    if cache.destination != destination_key(d) {
        return Ok(None);
    }
    let (life, now) = (lifetimes(d), crate::state::now());
    let mut summary = Summary {
        accept_all: cache
            .accept_all
            .as_ref()
            .map(|a| (a.accepts, a.at, a.reply.clone())),
        ..Summary::default()
    };
    for e in cache.entries.values().filter(|e| e.fresh(&life, now)) {
        if e.known {
            summary.known += 1;
        } else {
            summary.unknown += 1;
        }
    }
    Ok(Some(summary))
}

/// What the destination's address list (`reject_unknown.accounts`) says
/// of `address`, the address as it arrives there (DESIGN.md §10), looked
/// up as accounts are (the same `local_part_case`, the base before a
/// `recipient_delimiter` counts): listed → Known; not listed → Unknown
/// when the domain asks no callout, `None` (ask the callout) when it does:
/// a list exported every so often lags behind a user created since.
/// `None` too when the domain has no list.
pub fn listed(policy: &Policy, domain: &DomainPolicy, address: &str) -> Option<Answer> {
    let list = domain.destination_accounts.as_ref()?;
    let callout = domain
        .config
        .reject_unknown
        .as_ref()
        .is_some_and(|r| r.callout);
    let local = match crate::address::Address::parse(address) {
        Ok(a) => a.unquoted_local().into_owned(),
        // Not an address: nothing to find; the callout (or the refusal)
        // decides as for any address not listed.
        Err(_) => String::new(),
    };
    let key = policy.rules.key(&local);
    let found = !local.is_empty()
        && (list.contains(&key) || policy.rules.base(&key).is_some_and(|b| list.contains(b)));
    let at = crate::state::now();
    if found {
        return Some(Answer {
            verdict: Verdict::Known,
            reply: format!(
                "in the destination's address list ({} addresses)",
                list.len()
            ),
            origin: Origin::List,
            at,
            accept_all: false,
        });
    }
    (!callout).then(|| Answer {
        verdict: Verdict::Unknown,
        reply: format!(
            "not in the destination's address list ({} addresses)",
            list.len()
        ),
        origin: Origin::List,
        at,
        accept_all: false,
    })
}

fn answer(e: &Entry, origin: Origin, accept_all: bool) -> Answer {
    Answer {
        verdict: e.verdict(),
        reply: e.reply.clone(),
        origin,
        at: e.at,
        accept_all,
    }
}
