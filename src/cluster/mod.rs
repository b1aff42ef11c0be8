//! Several MX hosts as one fleet through Redis (DESIGN.md §11,
//! docs/design.md "Several MX hosts").
//!
//! The shared state is the state directory's records (`DOMAIN.disabled`,
//! `DOMAIN.tripped`, `DOMAIN.verify`), so everything that already writes
//! them (`dualroute disable`/`enable` typed on any node, a breaker trip,
//! a verification) is shared without knowing of the fleet, and a node
//! without Redis works exactly as one without `cluster:`. One task per
//! node ([`run`]) keeps its records and Redis in agreement
//! (src/cluster/merge.rs says who wins): at once when a record changes
//! here (looked at every second) or another node announces a change
//! (pub/sub), and every `cluster.sync` anyway. What it learns it writes
//! into state_dir and asks the reload actor to read, as the holds
//! follower would: **Redis is never on the per-recipient path**, and a
//! node restarted while Redis is down starts from its state_dir.
//!
//! Keys, under `cluster.prefix` (default `dualroute:`):
//! - `epoch`: set by the first node to find the store empty; a new epoch
//!   (Redis emptied or replaced) means no node's memory of the last
//!   agreement holds, so the most restrictive state wins;
//! - `domain:NAME`: a hash of the shared records, canonical YAML;
//! - `nodes`: a hash, node name → [`NodeInfo`];
//! - `failures:DOMAIN:KIND` (`bounce`, `deferral`): a sorted set of the
//!   failures the nodes' breakers counted, scored by time, one member per
//!   node, queue id and recipient (src/cluster/fleet.rs);
//! - `held-wins`: a hash, `DOMAIN RECORD` → when both sides had changed
//!   the record and the hold won (shown by every node's `status` for a
//!   day, or until the record is lifted);
//! - `callouts:DOMAIN`: a hash, address → a callout answer
//!   ([`crate::callout::Shared`]), and channel `callout-answers` (the
//!   node's name, a tab, the answer): the recipient-callout cache of
//!   DESIGN.md §10 is the fleet's, so a dictionary attack spread over the
//!   MX hosts costs one callout per address, not one per host;
//! - channel `changes`: a node's name after it changed the store.
//!
//! What this node saw goes into `state_dir/cluster.status` for `dualroute
//! status`, and into the metrics.

pub mod fleet;
pub mod merge;
mod share;
pub mod status;

use crate::callout::Callouts;
use crate::config::ClusterConfig;
use crate::live::{Installer, LivePolicy};
use crate::metrics::Metrics;
use crate::notify::{Event, Outbox};
use crate::policy::Policy;
use crate::state::{now, StateDir};
use merge::{Kind, Synced};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::timeout;

/// One node as the fleet sees it (`nodes` in Redis).
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// When it last said it was alive (Unix seconds).
    pub seen: u64,
    /// Its dualroute version.
    pub version: String,
    /// The digest of its configuration ([`digest`]).
    pub digest: String,
}

/// What the running node knows of the fleet, for `dualroute status`
/// (`state_dir/cluster.status`), rewritten after every sync attempt.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The Redis URL without its password.
    pub redis: String,
    pub connected: bool,
    /// Since when it is connected or not.
    pub since: u64,
    /// The last agreement with the fleet; `None`: never.
    pub last_sync: Option<u64>,
    /// Why Redis cannot be used, while not connected.
    pub error: Option<String>,
    /// This node.
    pub this: NodeInfo,
    /// Every node the fleet knows, this one included, by name.
    pub nodes: Vec<NodeInfo>,
    /// Domains where both sides had changed a record while they could not
    /// agree and the hold won: (when, domain, which record).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_won: Vec<(u64, String, String)>,
    /// `cluster.silent_after`, in seconds.
    pub silent_after: u64,
    /// When this was written.
    pub at: u64,
}

const STATUS: &str = "cluster.status";
const SYNCED: &str = "cluster.synced";

/// Reads what the running node wrote (`dualroute status`); `Ok(None)`
/// when no node with `cluster:` has run on this state_dir.
pub fn read_status(state_dir: &Path) -> std::io::Result<Option<ClusterStatus>> {
    StateDir::new(state_dir).read_path(&state_dir.join(STATUS))
}

/// The digest of a node's configuration, compared across the fleet: what
/// decides a recipient (the domains, gateways, relay suffix, address
/// rules, shadow, breaker, limits) and the size of every domain's
/// accounts and destination list (the same file name can hold other
/// accounts on another node), not what differs by design from node to
/// node (`instance`, `listen`, `state_dir`, `metrics`, `connections`,
/// `notify`, `breaker.maillog`). SHA-256 of their debug form (the version is compared
/// besides), 16 hex digits shown.
pub fn digest(policy: &Policy) -> String {
    let c = &policy.config;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let decisive = format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n",
        c.domains,
        c.gateways,
        c.relay_suffix,
        c.recipient_delimiter,
        c.local_part_case,
        c.shadow,
        // The limits, not `maillog`: where the MTA logs is the host's.
        c.breaker
            .as_ref()
            .map(|b| (b.threshold, b.window, b.deferrals)),
        c.max_recipients,
        c.accounts_shrink_limit,
        c.mta
    );
    ctx.update(decisive.as_bytes());
    let mut names: Vec<&String> = policy.domains.keys().collect();
    names.sort();
    for name in names {
        let d = &policy.domains[name];
        let sizes = format!(
            "{name} {} {}\n",
            d.accounts.as_ref().map_or(0, |a| a.len()),
            d.destination_accounts.as_ref().map_or(0, |a| a.len())
        );
        ctx.update(sizes.as_bytes());
    }
    ctx.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The Redis client for `cfg`: the URL, with the password of
/// `password_file` when the URL carries none.
fn client(cfg: &ClusterConfig) -> Result<redis::Client, String> {
    use redis::IntoConnectionInfo;
    let mut info = cfg
        .redis
        .0
        .as_str()
        .into_connection_info()
        .map_err(|e| format!("cluster.redis {}: {e}", cfg.redis))?;
    if let Some(file) = &cfg.password_file {
        if !cfg.redis.has_password() {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cluster.password_file {}: {e}", file.display()))?;
            let password = text.lines().next().unwrap_or_default().trim().to_owned();
            if password.is_empty() {
                return Err(format!(
                    "cluster.password_file {}: the first line is empty",
                    file.display()
                ));
            }
            info.redis.password = Some(password);
        }
    }
    redis::Client::open(info).map_err(|e| format!("cluster.redis {}: {e}", cfg.redis))
}

/// How long one Redis command may take before the node counts Redis as
/// unreachable and goes on from its own state.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// Compare-and-set of one record: written only if the field still holds
/// what this node read (`""`: absent), so two nodes changing it at once
/// cannot overwrite each other unseen; the loser merges again.
const CAS: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur == false then cur = '' end
if cur ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
";

/// The node's fleet task, for the life of the service.
pub(crate) async fn run(
    cfg: ClusterConfig,
    live: Arc<LivePolicy>,
    installer: Installer,
    metrics: Arc<Metrics>,
    fleet: Arc<fleet::FleetFailures>,
    outbox: Arc<Outbox>,
    callouts: Option<Arc<Callouts>>,
) {
    if let Some(c) = &callouts {
        c.share();
    }
    let state_dir = live.current().config.state_dir.clone();
    let instance = live.current().config.instance.clone();
    let mut node = Node {
        status: ClusterStatus {
            redis: cfg.redis.to_string(),
            since: now(),
            silent_after: cfg.silent_after.0.as_secs(),
            this: NodeInfo {
                name: instance.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                ..NodeInfo::default()
            },
            ..ClusterStatus::default()
        },
        synced: StateDir::new(&state_dir)
            .read_path::<Synced>(&state_dir.join(SYNCED))
            .unwrap_or_else(|e| {
                tracing::warn!("cluster: {e}: starting without the last agreement with the fleet (the most restrictive state wins once)");
                None
            })
            .unwrap_or_default(),
        state_dir,
        conn: None,
        cfg: cfg.clone(),
        client: None,
        digest: None,
        fleet,
        outbox,
        live: live.clone(),
        callouts: callouts.clone(),
        imported: None,
    };
    match client(&cfg) {
        Ok(c) => node.client = Some(c),
        Err(e) => {
            tracing::error!(
                "cluster: {e}; this node runs alone until it is fixed and dualroute restarted"
            );
            node.status.error = Some(e);
        }
    }
    let changed = Arc::new(Notify::new());
    if let Some(c) = node.client.clone() {
        tokio::spawn(listen(
            c,
            cfg.prefix.clone(),
            instance.clone(),
            changed.clone(),
            callouts.clone().map(|c| (c, live.clone())),
        ));
    }
    let mut last_local: Option<BTreeMap<String, Vec<Option<String>>>> = None;
    let mut last_full = tokio::time::Instant::now() - cfg.sync.0;
    loop {
        let policy = live.current();
        let local = {
            let (dir, names) = (node.state_dir.clone(), domains(&policy));
            tokio::task::spawn_blocking(move || read_local(&dir, &names))
                .await
                .unwrap_or_default()
        };
        let due = last_full.elapsed() >= cfg.sync.0
            || last_local.as_ref() != Some(&local)
            || node.fleet.has_pending();
        if due && node.client.is_some() {
            last_full = tokio::time::Instant::now();
            if node.sync(&policy, &installer).await {
                // What the sync wrote here is the new local state.
                let (dir, names) = (node.state_dir.clone(), domains(&policy));
                last_local = tokio::task::spawn_blocking(move || read_local(&dir, &names))
                    .await
                    .ok();
            } else {
                last_local = Some(local);
            }
            metrics.cluster(
                node.status.connected,
                node.live_nodes(),
                node.status.last_sync,
            );
            node.write_status().await;
        } else if node.client.is_none() && last_local.is_none() {
            last_local = Some(local);
            metrics.cluster(false, 0, None);
            node.write_status().await;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = changed.notified() => { last_full = tokio::time::Instant::now() - cfg.sync.0; }
        }
    }
}

/// The managed domains, sorted.
fn domains(policy: &Policy) -> Vec<String> {
    let mut names: Vec<String> = policy.domains.keys().cloned().collect();
    names.sort();
    names
}

/// This node's records of `names`, in [`Kind::ALL`] order; an unreadable
/// record reads as absent here and is logged by the holds (which hold
/// the domain for it).
fn read_local(dir: &Path, names: &[String]) -> BTreeMap<String, Vec<Option<String>>> {
    let state = StateDir::new(dir);
    names
        .iter()
        .map(|n| {
            let records = Kind::ALL
                .iter()
                .map(|k| state.register(n, k.name()).ok().flatten())
                .collect();
            (n.clone(), records)
        })
        .collect()
}

/// Subscribes to the fleet's change announcements for the life of the
/// service, reconnecting while Redis is away; another node's announcement
/// wakes the sync at once. With callouts, the answers other nodes got
/// arrive here too and go into this node's cache at once.
async fn listen(
    client: redis::Client,
    prefix: String,
    me: String,
    changed: Arc<Notify>,
    callouts: Option<(Arc<Callouts>, Arc<LivePolicy>)>,
) {
    use futures_util::StreamExt;
    let (changes, answers) = (
        format!("{prefix}changes"),
        format!("{prefix}callout-answers"),
    );
    let mut wait = Duration::from_secs(1);
    loop {
        if let Ok(Ok(mut pubsub)) = timeout(COMMAND_TIMEOUT, client.get_async_pubsub()).await {
            if pubsub.subscribe(&[&changes, &answers]).await.is_ok() {
                wait = Duration::from_secs(1);
                // A change made while this node was not listening.
                changed.notify_one();
                let mut messages = pubsub.on_message();
                while let Some(m) = messages.next().await {
                    let payload: String = m.get_payload().unwrap_or_default();
                    if m.get_channel_name() == answers {
                        if let Some((c, live)) = &callouts {
                            share::import_answer(c, live, &me, &payload).await;
                        }
                    } else if payload != me {
                        changed.notify_one();
                    }
                }
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

struct Node {
    cfg: ClusterConfig,
    client: Option<redis::Client>,
    conn: Option<ConnectionManager>,
    state_dir: PathBuf,
    synced: Synced,
    status: ClusterStatus,
    /// The digest of the policy it was computed for.
    digest: Option<(Arc<Policy>, String)>,
    /// The breaker's failures to share and the others' counts.
    fleet: Arc<fleet::FleetFailures>,
    /// Tells the administrator when Redis goes away and comes back.
    outbox: Arc<Outbox>,
    live: Arc<LivePolicy>,
    callouts: Option<Arc<Callouts>>,
    /// The epoch whose callout answers this node has read whole; read
    /// again after a reconnect or a new epoch.
    imported: Option<String>,
}

impl Node {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.cfg.prefix)
    }

    fn live_nodes(&self) -> usize {
        let silent = self.cfg.silent_after.0.as_secs();
        let now = now();
        self.status
            .nodes
            .iter()
            .filter(|n| now.saturating_sub(n.seen) <= silent)
            .count()
    }

    async fn connection(&mut self) -> Result<ConnectionManager, String> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let client = self.client.clone().ok_or("no Redis client")?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(COMMAND_TIMEOUT)
            .set_response_timeout(COMMAND_TIMEOUT)
            .set_number_of_retries(1);
        let c = timeout(
            COMMAND_TIMEOUT,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| format!("no answer within {}s", COMMAND_TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// One round of agreement; false when Redis could not be used (the
    /// node goes on from its own state, and says so).
    async fn sync(&mut self, policy: &Arc<Policy>, installer: &Installer) -> bool {
        let result = self.try_sync(policy).await;
        let (was, at) = (self.status.connected, now());
        match result {
            Ok(wrote_here) => {
                if !was {
                    tracing::info!(
                        "cluster: {} reached; this node shares the fleet's state again",
                        self.status.redis
                    );
                    // Only after an outage: not at every start.
                    if self.status.error.is_some() {
                        self.outbox.notify(
                            &self.live.current().config,
                            Event::ClusterBack {
                                redis: self.status.redis.clone(),
                                since: self.status.since,
                            },
                        );
                    }
                    self.status.since = at;
                }
                self.status.connected = true;
                self.status.error = None;
                self.status.last_sync = Some(at);
                if wrote_here {
                    // As the holds follower would, through the one writer.
                    let refreshed = installer.refresh(false).await;
                    for e in refreshed.errors {
                        tracing::error!("{e}; routing for that domain stays off");
                    }
                }
                true
            }
            Err(e) => {
                if was || self.status.error.is_none() {
                    tracing::error!(
                        "cluster: {} unreachable: {e}; this node serves on its last known state, and what changes here is pushed when Redis is back",
                        self.status.redis
                    );
                    self.outbox.notify(
                        &self.live.current().config,
                        Event::ClusterUnreachable {
                            redis: self.status.redis.clone(),
                            error: e.clone(),
                        },
                    );
                    self.status.since = at;
                }
                self.status.connected = false;
                self.status.error = Some(e);
                // The manager reconnects by itself, but one made while
                // Redis was down may never have connected: start afresh.
                self.conn = None;
                false
            }
        }
    }

    /// Returns whether a record here was changed.
    async fn try_sync(&mut self, policy: &Arc<Policy>) -> Result<bool, String> {
        let mut conn = self.connection().await?;
        let t = |e: tokio::time::error::Elapsed| e.to_string();
        let r = |e: redis::RedisError| e.to_string();
        // The store's epoch: a new one when it is empty.
        let epoch_key = self.key("epoch");
        let fresh = format!("{}-{}", now(), std::process::id());
        let _: Option<String> = timeout(
            COMMAND_TIMEOUT,
            redis::cmd("SET")
                .arg(&epoch_key)
                .arg(&fresh)
                .arg("NX")
                .query_async(&mut conn),
        )
        .await
        .map_err(t)?
        .map_err(r)?;
        let epoch: String = timeout(
            COMMAND_TIMEOUT,
            redis::cmd("GET").arg(&epoch_key).query_async(&mut conn),
        )
        .await
        .map_err(t)?
        .map_err(r)?;
        let mut lifted = std::mem::take(&mut self.synced.lifted);
        if epoch != self.synced.epoch && !self.synced.epoch.is_empty() {
            tracing::warn!(
                "cluster: the fleet's store is new (epoch {epoch}, was {}): Redis was emptied or replaced; this node pushes its state, and where nodes disagree the hold wins",
                self.synced.epoch
            );
            // The holds this node lifted since its last agreement: if
            // another node pushes them back, its hold overruled the lift.
            let state = StateDir::new(&self.state_dir);
            for (domain, records) in &self.synced.domains {
                for kind in [Kind::Disabled, Kind::Tripped] {
                    let held = records.get(kind.name()).is_some_and(|v| v.is_some());
                    let here = state.register(domain, kind.name()).ok().flatten();
                    if held && here.is_none() {
                        lifted.insert(format!("{domain} {}", kind.name()), now());
                    }
                }
            }
        }
        // An hour is long enough for every node to come back.
        let hour_ago = now().saturating_sub(3600);
        lifted.retain(|_, at| *at >= hour_ago);
        let mut wrote_here = false;
        let mut announced = false;
        let state = StateDir::new(&self.state_dir);
        let mut next = Synced {
            epoch: epoch.clone(),
            ..Synced::default()
        };
        for name in domains(policy) {
            let key = self.key(&format!("domain:{name}"));
            let fleet: BTreeMap<String, String> = timeout(
                COMMAND_TIMEOUT,
                redis::cmd("HGETALL").arg(&key).query_async(&mut conn),
            )
            .await
            .map_err(t)?
            .map_err(r)?;
            for kind in Kind::ALL {
                // A record this node cannot read is not an absent one
                // (that would be an enable for the whole fleet): it is
                // left alone, here and there; the holds hold the domain
                // here for it, and the log says why.
                let local = match state.register(&name, kind.name()) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(
                            "cluster: {name}: {e}: this record is not shared until it can be read"
                        );
                        if let Some(base) = self.synced.base(&epoch, &name, kind) {
                            next.set(&name, kind, base.map(str::to_owned));
                        }
                        continue;
                    }
                };
                let there = fleet.get(kind.name()).map(String::as_str);
                let base = self.synced.base(&epoch, &name, kind);
                let mut merged = merge::merge(kind, local.as_deref(), there, base);
                if merged.held_won {
                    lifted.remove(&format!("{name} {}", kind.name()));
                }
                // An emptied Redis has no base, but this node knows which
                // holds it lifted while cut off: one that comes back from
                // the fleet, set before this node found the store new,
                // overruled its enable.
                let mark = format!("{name} {}", kind.name());
                if let (Some(found), None, Some(v)) = (
                    lifted.get(&mark).copied(),
                    local.as_deref(),
                    merged.value.as_deref(),
                ) {
                    if kind.stamp(v).is_some_and(|at| at <= found) {
                        merged.held_won = true;
                        lifted.remove(&mark);
                    }
                }
                let note = format!("{name} {}", kind.name());
                if merged.held_won {
                    tracing::warn!(
                        "cluster: {name}: its {} record was changed here and on another node while they could not agree; the hold wins: routing stays off until `dualroute enable {name}`",
                        kind.name()
                    );
                    // For every node's status, not only the one that saw it.
                    let _: i64 = timeout(
                        COMMAND_TIMEOUT,
                        redis::cmd("HSET")
                            .arg(self.key("held-wins"))
                            .arg(&note)
                            .arg(now())
                            .query_async(&mut conn),
                    )
                    .await
                    .map_err(t)?
                    .map_err(r)?;
                } else if merged.value.is_none()
                    && self
                        .status
                        .held_won
                        .iter()
                        .any(|(_, d, k)| *d == name && k == kind.name())
                {
                    // Lifted since: the note is history.
                    let _: i64 = timeout(
                        COMMAND_TIMEOUT,
                        redis::cmd("HDEL")
                            .arg(self.key("held-wins"))
                            .arg(&note)
                            .query_async(&mut conn),
                    )
                    .await
                    .map_err(t)?
                    .map_err(r)?;
                }
                let mut agreed = true;
                if merged.value != local {
                    match state.set_register(&name, kind.name(), merged.value.as_deref()) {
                        Ok(()) => {
                            wrote_here = true;
                            tracing::info!(
                                "cluster: {name}: {} {} from the fleet",
                                kind.name(),
                                if merged.value.is_some() {
                                    "taken"
                                } else {
                                    "cleared"
                                }
                            );
                        }
                        Err(e) => {
                            agreed = false;
                            tracing::error!(
                                "cluster: {name}: cannot write the {} record the fleet holds: {e}",
                                kind.name()
                            );
                        }
                    }
                }
                if merged.value.as_deref() != there {
                    let set: i64 = timeout(
                        COMMAND_TIMEOUT,
                        redis::cmd("EVAL")
                            .arg(CAS)
                            .arg(1)
                            .arg(&key)
                            .arg(kind.name())
                            .arg(fleet.get(kind.name()).map(String::as_str).unwrap_or(""))
                            .arg(merged.value.as_deref().unwrap_or(""))
                            .query_async(&mut conn),
                    )
                    .await
                    .map_err(t)?
                    .map_err(r)?;
                    if set == 1 {
                        announced = true;
                    } else {
                        // Another node changed it meanwhile: the next
                        // round merges again from what it wrote.
                        agreed = false;
                    }
                }
                let value = if agreed {
                    merged.value
                } else {
                    base.flatten().map(str::to_owned)
                };
                if agreed || base.is_some() {
                    next.set(&name, kind, value);
                }
            }
        }
        self.share_failures(&mut conn, policy).await?;
        self.share_answers(&mut conn, policy, &epoch).await?;
        if announced {
            let _: i64 = timeout(
                COMMAND_TIMEOUT,
                redis::cmd("PUBLISH")
                    .arg(self.key("changes"))
                    .arg(&self.status.this.name)
                    .query_async(&mut conn),
            )
            .await
            .map_err(t)?
            .map_err(r)?;
        }
        // Alive, with what it runs.
        let digest = match &self.digest {
            Some((p, d)) if Arc::ptr_eq(p, policy) => d.clone(),
            _ => {
                let d = digest(policy);
                self.digest = Some((policy.clone(), d.clone()));
                d
            }
        };
        self.status.this.digest = digest;
        self.status.this.seen = now();
        let me = serde_yaml::to_string(&self.status.this).map_err(|e| e.to_string())?;
        let nodes_key = self.key("nodes");
        let _: i64 = timeout(
            COMMAND_TIMEOUT,
            redis::cmd("HSET")
                .arg(&nodes_key)
                .arg(&self.status.this.name)
                .arg(me)
                .query_async(&mut conn),
        )
        .await
        .map_err(t)?
        .map_err(r)?;
        let nodes: BTreeMap<String, String> = timeout(
            COMMAND_TIMEOUT,
            redis::cmd("HGETALL").arg(&nodes_key).query_async(&mut conn),
        )
        .await
        .map_err(t)?
        .map_err(r)?;
        self.status.nodes = nodes
            .values()
            .filter_map(|v| serde_yaml::from_str::<NodeInfo>(v).ok())
            .collect();
        // The fleet's held-wins notes of the last day.
        let notes: BTreeMap<String, u64> = timeout(
            COMMAND_TIMEOUT,
            redis::cmd("HGETALL")
                .arg(self.key("held-wins"))
                .query_async(&mut conn),
        )
        .await
        .map_err(t)?
        .map_err(r)?;
        let day_ago = now().saturating_sub(86_400);
        self.status.held_won = notes
            .into_iter()
            .filter(|(_, at)| *at >= day_ago)
            .filter_map(|(note, at)| {
                let (domain, record) = note.split_once(' ')?;
                Some((at, domain.to_owned(), record.to_owned()))
            })
            .collect();
        next.lifted = lifted;
        self.synced = next;
        let (dir, synced) = (self.state_dir.clone(), self.synced.clone());
        let saved = tokio::task::spawn_blocking(move || {
            StateDir::new(&dir).write_path(&dir.join(SYNCED), &synced)
        })
        .await;
        if let Ok(Err(e)) | Err(e) = saved.map_err(std::io::Error::other) {
            tracing::warn!("cluster: cannot keep the last agreement in state_dir: {e}");
        }
        Ok(wrote_here)
    }

    async fn write_status(&mut self) {
        self.status.at = now();
        let (dir, status) = (self.state_dir.clone(), self.status.clone());
        let written = tokio::task::spawn_blocking(move || {
            StateDir::new(&dir).write_path(&dir.join(STATUS), &status)
        })
        .await;
        if let Ok(Err(e)) = written {
            tracing::warn!("cluster: cannot write {STATUS} for `dualroute status`: {e}");
        }
    }
}
