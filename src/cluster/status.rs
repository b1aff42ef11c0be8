//! What `dualroute status` says of the fleet (DESIGN.md §11), from what
//! the running node wrote (`state_dir/cluster.status`).

use super::{ClusterStatus, NodeInfo};
use crate::config::ClusterConfig;
use crate::state::when;

/// The lines of `status` for `cfg`, and whether all is well (connected,
/// every node alive and running the same configuration). `status` is
/// `None` when no node with `cluster:` has run on this state_dir yet.
pub fn lines(cfg: &ClusterConfig, status: Option<&ClusterStatus>, now: u64) -> (Vec<String>, bool) {
    let Some(s) = status else {
        return (
            vec![format!(
                "cluster: {}: no running milter has reported on it yet (state_dir/cluster.status); is `dualroute run` running with this configuration?",
                cfg.redis
            )],
            false,
        );
    };
    let mut out = Vec::new();
    let mut ok = true;
    let ago = |t: u64| human(now.saturating_sub(t));
    if s.connected {
        out.push(format!(
            "cluster: {} connected since {}; last sync {} ago; {} nodes",
            s.redis,
            when(s.since),
            s.last_sync.map(ago).unwrap_or_else(|| "never".into()),
            s.nodes.len()
        ));
    } else {
        ok = false;
        out.push(format!(
            "cluster: {} UNREACHABLE since {} ({}): this node serves on its last known state{}; what changes here (disable, enable, a trip) is pushed when Redis is back",
            s.redis,
            when(s.since),
            s.error.as_deref().unwrap_or("not connected yet"),
            s.last_sync
                .map(|t| format!(" (last sync {} ago)", ago(t)))
                .unwrap_or_default()
        ));
    }
    // The report is the running node's: an old one means it is not running.
    if now.saturating_sub(s.at) > s.silent_after.max(30) {
        ok = false;
        out.push(format!(
            "  WARNING: this report is {} old: is the milter running?",
            ago(s.at)
        ));
    }
    let mut nodes: Vec<&NodeInfo> = s.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    if nodes.is_empty() {
        nodes.push(&s.this);
    }
    for n in nodes {
        let me = n.name == s.this.name;
        let mut line = format!(
            "  {}{}: dualroute {}, configuration {}, last seen {} ago",
            n.name,
            if me { " (this node)" } else { "" },
            n.version,
            if n.digest.is_empty() { "?" } else { &n.digest },
            ago(n.seen)
        );
        if !me && !s.this.digest.is_empty() && n.digest != s.this.digest {
            ok = false;
            line.push_str(&format!(
                "; CONFIGURATION DIFFERS from this node's ({}): the nodes decide differently; give them the same milter.yaml and account lists",
                s.this.digest
            ));
        }
        if !me && now.saturating_sub(n.seen) > s.silent_after {
            ok = false;
            line.push_str(&format!(
                "; SILENT for {}: not running, or cannot reach Redis (it serves on its own last known state)",
                ago(n.seen)
            ));
        }
        out.push(line);
    }
    for (at, domain, record) in &s.held_won {
        out.push(format!(
            "  held wins: {domain}: its {record} record was changed on this node and another while they could not agree ({}); the hold won, routing stays off until `dualroute enable {domain}`",
            when(*at)
        ));
    }
    (out, ok)
}

fn human(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}
