//! The reload actor: the one task that changes the policy and the holds in
//! force (docs/design.md §7 "One writer").
//!
//! Everything that wants a change (SIGHUP through [`crate::Control`], the
//! account-file watch and the command refresh (src/service/reload.rs), the
//! state follower (src/holds/follow.rs), the verification probe
//! (src/service/verify.rs), a breaker trip (src/breaker/)) sends a
//! [`Request`] through an [`Installer`](crate::live::Installer) and waits
//! for the answer. The actor takes one request at a time, in the order
//! they came, and does it whole on the blocking pool (file reads, account
//! commands) before it takes the next. So a reload reads the files when
//! its turn comes and compares against what is in force then, and no
//! holds refresh installs what it read for a policy a reload has since
//! replaced. A slow account command delays a SIGHUP; it can never install
//! the configuration it read after the SIGHUP installed a newer one.

use crate::holds::{Holds, LiveHolds};
use crate::live::{load_policy, LivePolicy, LoadError, Refreshed, Request};
use crate::metrics::Metrics;
use crate::notify::{Event, Outbox};
use crate::policy::{Policy, Shrunk};
use crate::state::{self, StateDir};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;

/// What the actor owns: the only writer of `policy` and `holds`.
#[derive(Debug)]
pub(crate) struct Actor {
    pub config_path: PathBuf,
    pub policy: Arc<LivePolicy>,
    pub holds: Arc<LiveHolds>,
    pub metrics: Arc<Metrics>,
    pub outbox: Arc<Outbox>,
    /// What runs, for `status`: published after each request, before the
    /// answer (src/service/publish.rs).
    pub publisher: Arc<super::publish::Publisher>,
}

/// Performs `requests` one after the other until every sender is gone or
/// the service stops.
pub(crate) async fn run(actor: Actor, mut requests: mpsc::Receiver<Request>) {
    let actor = Arc::new(actor);
    while let Some(request) = requests.recv().await {
        let actor = actor.clone();
        // Waited for before the next request is taken: this is what makes
        // the changes one at a time. A panic drops the reply, and the
        // requester hears that nothing was done.
        if let Err(e) = tokio::task::spawn_blocking(move || actor.perform(request)).await {
            tracing::error!(
                "a reload or holds refresh failed: {e}; the running configuration and holds stay"
            );
        }
    }
}

impl Actor {
    /// Does `request` and answers it. Blocking: on the blocking pool.
    fn perform(&self, request: Request) {
        match request {
            Request::Reload(reply) => {
                let result = self.reload();
                self.publisher.publish();
                let _ = reply.send(result);
            }
            Request::RefreshHolds { confirmed, reply } => {
                let errors = self.refresh_holds();
                let confirmed = if confirmed {
                    self.shrink_confirmed()
                } else {
                    None
                };
                self.publisher.publish();
                let _ = reply.send(Refreshed { errors, confirmed });
            }
        }
    }

    /// Re-reads the holds of the policy in force from `state_dir`; returns
    /// the errors for the log (each holds its domain).
    fn refresh_holds(&self) -> Vec<String> {
        let (holds, errors) = Holds::read(&self.policy.current().config);
        // Disputes live in memory only (the refused lists): they stay
        // until a reload settles them.
        let disputes = self.holds.current().disputes().clone();
        self.holds.replace(holds.with_disputes(disputes));
        errors
    }

    /// A domain whose account dispute the administrator has confirmed
    /// (`dualroute confirm-accounts`) and that a reload should now settle.
    fn shrink_confirmed(&self) -> Option<(String, u64)> {
        let holds = self.holds.current();
        let state = StateDir::new(&self.policy.current().config.state_dir);
        let policy = self.policy.current();
        // The destination lists are not held (the running one stays in
        // force), so their disputes are only in state_dir.
        let lists = policy
            .domains
            .values()
            .filter(|d| d.destination_accounts.is_some())
            .map(|d| state::destination_list(&d.name))
            .filter(|key| state.dispute(key).ok().flatten().is_some());
        let mut names: Vec<String> = holds.disputes().0.keys().cloned().chain(lists).collect();
        names.sort();
        names.into_iter().find_map(|d| {
            let c = state.shrink_confirmed(&d).ok().flatten()?;
            Some((d, c.since))
        })
    }

    /// Re-reads the configuration; on error the running policy stays in
    /// force (docs/design.md §5: a reload with an invalid file keeps the
    /// running policy), and so it does when the new accounts shrank past
    /// the guard. A refusal is recorded under `state_dir` for `dualroute
    /// status`; a good reload clears it. The requester logs the error.
    fn reload(&self) -> Result<(), LoadError> {
        // The running policy is read when this reload's turn comes: the
        // shrink guard compares against what is in force, not against what
        // was when the request was made.
        let running = self.policy.current();
        let state = StateDir::new(&running.config.state_dir);
        let loaded = load_policy(&self.config_path).and_then(|p| {
            let confirmed = |d: &str| state.shrink_confirmed(d).ok().flatten().map(|c| c.accounts);
            let shrunk = p.shrunk(&running, confirmed);
            match p.shrink_refusal(&shrunk) {
                None => Ok(p),
                Some(why) => {
                    self.dispute(&running, p, &shrunk, &state);
                    Err(LoadError::Shrink(why))
                }
            }
        });
        let mut loaded = match loaded {
            Ok(p) => p,
            Err(e) => {
                let result = match e {
                    LoadError::Shrink(_) => "refused",
                    _ => "invalid",
                };
                self.metrics.reload(result);
                if let Err(w) = state.refuse_reload(&e.to_string()) {
                    tracing::error!("cannot record the refused reload for `dualroute status`: {w}");
                }
                self.outbox.notify(
                    &self.policy.current().config,
                    Event::ReloadRefused {
                        reason: e.to_string(),
                    },
                );
                return Err(e);
            }
        };
        // The socket is bound and the connection limits are set once, at
        // start (src/main.rs, src/service/mod.rs): say so rather than
        // ignore the change. The running values stay in the policy in
        // force, so every reload repeats the warning until a restart.
        let (was, now) = (&running.config, &mut loaded.config);
        if was.listen != now.listen {
            tracing::warn!(
                "listen changed from {} to {}: a reload does not move the socket; restart dualroute to listen on {} (still listening on {})",
                was.listen, now.listen, now.listen, was.listen
            );
            now.listen = was.listen.clone();
        }
        if was.connections != now.connections {
            tracing::warn!(
                "connections changed: a reload does not change them; restart dualroute to apply them"
            );
            now.connections = was.connections.clone();
        }
        if was.cluster != now.cluster {
            tracing::warn!(
                "cluster changed: the fleet's Redis is set up at start; restart dualroute to apply it"
            );
            now.cluster = was.cluster.clone();
        }
        if was.metrics != now.metrics {
            tracing::warn!(
                "metrics changed: the endpoint is set up at start; restart dualroute to apply it"
            );
            now.metrics = was.metrics.clone();
        }
        let names: Vec<String> = running
            .domains
            .keys()
            .chain(loaded.domains.keys())
            .cloned()
            .collect();
        for e in self.install(loaded) {
            tracing::error!("{e}; routing for that domain stays off");
        }
        // The accounts in force now passed the guard (or were confirmed):
        // no dispute remains, and a confirmation is used up.
        let keys = names
            .iter()
            .flat_map(|n| [n.clone(), state::destination_list(n)]);
        for name in keys {
            let cleared = state
                .clear_dispute(&name)
                .and_then(|a| Ok(a | state.clear_shrink_confirmed(&name)?));
            match cleared {
                Ok(true) => tracing::info!(
                    "{name}: the account list in force is settled; no address is held for it any more"
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!("{name}: cannot clear the record of an account dispute: {e}")
                }
            }
        }
        if let Err(e) = state.clear_reload_refused() {
            tracing::warn!("cannot clear the record of a refused reload: {e}");
        }
        self.metrics.reload("ok");
        Ok(())
    }

    /// The shrink guard refused `refused` against `running` for the
    /// domains of `shrunk`. From now on, until a reload succeeds, the
    /// addresses the two lists disagree on are tempfailed (docs/design.md
    /// "Shrink guard"); the dispute is recorded in `state_dir` for
    /// `status` and `confirm-accounts`.
    fn dispute(&self, running: &Policy, mut refused: Policy, shrunk: &[Shrunk], state: &StateDir) {
        let mut disputes = self.holds.current().disputes().clone();
        for s in shrunk {
            let list = |p: &mut Policy| {
                p.domains.get_mut(&s.domain).and_then(|d| {
                    if s.destination {
                        d.destination_accounts.take()
                    } else {
                        d.accounts.take()
                    }
                })
            };
            let (Some(was), Some(now)) = (
                running.domains.get(&s.domain).and_then(|d| {
                    if s.destination {
                        d.destination_accounts.as_ref()
                    } else {
                        d.accounts.as_ref()
                    }
                }),
                // The refused policy is dropped after this: its lists are
                // taken, not copied (one may hold millions).
                list(&mut refused),
            ) else {
                continue;
            };
            let mut differ: Vec<&str> = was
                .keys()
                .filter(|k| !now.contains(k))
                .chain(now.keys().filter(|k| !was.contains(k)))
                .collect();
            differ.sort_unstable();
            let at = match running.domains.get(&s.domain) {
                Some(d) if s.destination => d.arrival_domain().to_owned(),
                _ => s.domain.clone(),
            };
            let record = state::Dispute {
                since: state::now(),
                running: was.len(),
                refused: now.len(),
                disputed: differ.len(),
                sample: differ
                    .iter()
                    .take(10)
                    .map(|k| format!("{k}@{at}"))
                    .collect(),
            };
            if s.destination {
                // The running list stays in force: an address only in it
                // is accepted and routed as before (at worst it bounces
                // there, as without the list); one only in the new list
                // is asked of the callout, or refused as before. Nothing
                // to hold.
                tracing::error!(
                    "{}: the reload of the destination's address list (reject_unknown.accounts) is refused ({} -> {} addresses); the running list stays in force until `dualroute confirm-accounts {}` accepts the new one or the source is restored (they disagree on {} addresses, e.g. {})",
                    s.domain,
                    record.running,
                    record.refused,
                    s.domain,
                    record.disputed,
                    record.sample.join(", ")
                );
            } else {
                tracing::error!(
                    "{}: the account reload is refused ({} -> {} accounts); the {} addresses the two lists disagree on (e.g. {}) get 451 4.4.4 until `dualroute confirm-accounts {}` accepts the new list or the account source is restored",
                    s.domain,
                    record.running,
                    record.refused,
                    record.disputed,
                    record.sample.join(", "),
                    s.domain
                );
            }
            if let Err(e) = state.record_dispute(&s.key(), &record) {
                tracing::error!(
                    "{}: cannot record the account dispute for `dualroute status`: {e}",
                    s.domain
                );
            }
            if !s.destination {
                disputes.0.insert(s.domain.clone(), Arc::new(now));
            }
        }
        let holds = (*self.holds.current()).clone().with_disputes(disputes);
        self.holds.replace(holds);
    }

    /// Puts `new` in force. The holds are read for `new` and installed
    /// before it: from that instant a message that still has the running
    /// policy finds every domain the reload removed, or whose destination
    /// it changed, held ([`Hold::NotRead`](crate::holds::Hold::NotRead)),
    /// and a message that takes the new policy finds the holds read for
    /// it.
    fn install(&self, new: Policy) -> Vec<String> {
        let (holds, errors) = Holds::read(&new.config);
        self.holds.replace(holds);
        self.policy.replace(new);
        errors
    }
}
