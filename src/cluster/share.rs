//! What the fleet task shares besides the records (src/cluster/mod.rs):
//! the breaker's counted failures (src/cluster/fleet.rs) and the
//! recipient-callout answers (DESIGN.md §10, §11).

use super::{domains, Node, COMMAND_TIMEOUT};
use crate::callout::{Callouts, Shared};
use crate::live::LivePolicy;
use crate::policy::Policy;
use crate::state::now;
use redis::aio::ConnectionManager;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::time::timeout;

/// One answer another node published (`callout-answers`: the node's name,
/// a tab, the answer as YAML): into this node's cache, when its domain
/// asks callouts here too. What does not parse is ignored.
pub(super) async fn import_answer(callouts: &Callouts, live: &LivePolicy, me: &str, payload: &str) {
    let Some((from, text)) = payload.split_once('\t') else {
        return;
    };
    if from == me {
        return;
    }
    let Ok(answer) = serde_yaml::from_str::<Shared>(text) else {
        return;
    };
    let policy = live.current();
    let Some(d) = policy.domains.get(&answer.domain) else {
        return;
    };
    if d.config.reject_unknown.as_ref().is_some_and(|r| r.callout) {
        callouts.import(&d.name, &d.config, vec![answer]).await;
    }
}

impl Node {
    /// Adds this node's counted failures to the fleet's sorted sets and
    /// reads how many the others counted within the breaker's window.
    pub(super) async fn share_failures(
        &mut self,
        conn: &mut ConnectionManager,
        policy: &Arc<Policy>,
    ) -> Result<(), String> {
        let Some(breaker) = &policy.config.breaker else {
            self.fleet.take();
            return Ok(());
        };
        let window = breaker.window.0.as_secs();
        let me = self.status.this.name.clone();
        let t = |e: tokio::time::error::Elapsed| e.to_string();
        let r = |e: redis::RedisError| e.to_string();
        let pending = self.fleet.take();
        let mut pipe = redis::pipe();
        for c in &pending {
            pipe.cmd("ZADD")
                .arg(self.key(&format!("failures:{}:{}", c.domain, c.kind)))
                .arg(c.at)
                .arg(format!("{me} {} {}", c.queue_id, c.recipient))
                .ignore();
        }
        if !pending.is_empty() {
            let pushed: Result<(), String> =
                match timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(conn)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
            if let Err(e) = pushed {
                self.fleet.put_back(pending);
                return Err(e);
            }
        }
        let oldest = now().saturating_sub(window);
        let mut others = std::collections::HashMap::new();
        for name in domains(policy) {
            for kind in ["bounce", "deferral"] {
                let key = self.key(&format!("failures:{name}:{kind}"));
                let _: i64 = timeout(
                    COMMAND_TIMEOUT,
                    redis::cmd("ZREMRANGEBYSCORE")
                        .arg(&key)
                        .arg("-inf")
                        .arg(format!("({oldest}"))
                        .query_async(conn),
                )
                .await
                .map_err(t)?
                .map_err(r)?;
                let members: Vec<String> = timeout(
                    COMMAND_TIMEOUT,
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(&key)
                        .arg(oldest)
                        .arg("+inf")
                        .query_async(conn),
                )
                .await
                .map_err(t)?
                .map_err(r)?;
                let theirs = members
                    .iter()
                    .filter(|m| m.split(' ').next() != Some(me.as_str()))
                    .count();
                if theirs > 0 {
                    others.insert((name.clone(), kind), theirs as u32);
                }
            }
        }
        self.fleet.set_others(others);
        Ok(())
    }

    /// Hands this node's callout answers to the fleet (a hash per domain,
    /// for nodes that start later, and `callout-answers` for the running
    /// ones), and after a reconnect or a new epoch reads the fleet's whole.
    pub(super) async fn share_answers(
        &mut self,
        conn: &mut ConnectionManager,
        policy: &Arc<Policy>,
        epoch: &str,
    ) -> Result<(), String> {
        let Some(callouts) = self.callouts.clone() else {
            return Ok(());
        };
        let t = |e: tokio::time::error::Elapsed| e.to_string();
        let r = |e: redis::RedisError| e.to_string();
        let answers = callouts.take_shared();
        if !answers.is_empty() {
            let mut pipe = redis::pipe();
            for a in &answers {
                let Ok(text) = serde_yaml::to_string(a) else {
                    continue;
                };
                pipe.cmd("HSET")
                    .arg(self.key(&format!("callouts:{}", a.domain)))
                    .arg(&a.address)
                    .arg(&text)
                    .ignore();
                pipe.cmd("PUBLISH")
                    .arg(self.key("callout-answers"))
                    .arg(format!("{}\t{text}", self.status.this.name))
                    .ignore();
            }
            // Lost if Redis fails now: they stay in this node's cache, and
            // the other nodes ask for themselves.
            timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(conn))
                .await
                .map_err(t)?
                .map_err(r)?;
        }
        if self.imported.as_deref() == Some(epoch) && self.status.connected {
            return Ok(());
        }
        for name in domains(policy) {
            let d = &policy.domains[&name];
            let Some(ru) = &d.config.reject_unknown else {
                continue;
            };
            if !ru.callout {
                continue;
            }
            let key = self.key(&format!("callouts:{name}"));
            let all: BTreeMap<String, String> = timeout(
                COMMAND_TIMEOUT,
                redis::cmd("HGETALL").arg(&key).query_async(conn),
            )
            .await
            .map_err(t)?
            .map_err(r)?;
            // Answers past their lifetime go from the fleet's hash too.
            let longest = ru.cache.positive.0.max(ru.cache.negative.0).as_secs();
            let stale: Vec<&String> = all
                .iter()
                .filter(|(_, v)| {
                    serde_yaml::from_str::<Shared>(v)
                        .map_or(true, |a| a.at.saturating_add(longest) < now())
                })
                .map(|(k, _)| k)
                .collect();
            if !stale.is_empty() {
                let _: i64 = timeout(
                    COMMAND_TIMEOUT,
                    redis::cmd("HDEL").arg(&key).arg(&stale).query_async(conn),
                )
                .await
                .map_err(t)?
                .map_err(r)?;
            }
            let answers: Vec<Shared> = all
                .values()
                .filter_map(|v| serde_yaml::from_str(v).ok())
                .collect();
            let taken = callouts.import(&name, &d.config, answers).await;
            if taken > 0 {
                tracing::info!("cluster: {name}: {taken} callout answers taken from the fleet");
            }
        }
        self.imported = Some(epoch.to_owned());
        Ok(())
    }
}
