//! The loaded policy: the configuration plus the account sets it names.
//!
//! A `Policy` is immutable. The milter holds the current one behind an
//! `Arc`, and each message keeps the `Arc` it started with, so a reload
//! never changes the rules under a message in flight (docs/design.md §7).

use crate::accounts::{self, Accounts, LoadError, LoadReport, MatchRules};
use crate::address::Address;
use crate::config::{Config, Destination, DomainConfig, UserRule};
use crate::holds::Holds;
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

#[derive(Debug)]
pub struct DomainPolicy {
    pub name: String,
    pub config: DomainConfig,
    /// `None` when the domain has no `accounts:`.
    pub accounts: Option<Accounts>,
    pub report: LoadReport,
    /// Per-user rules by comparison key of the local part.
    pub users: HashMap<String, UserRule>,
}

impl DomainPolicy {
    /// The address mail for `local` is routed to (docs/design.md §4).
    pub fn routing_address(&self, local: &str, relay_suffix: &str) -> String {
        match &self.config.destination {
            Destination::Domain {
                domain,
                change_envelope: true,
            } => format!("{local}@{domain}"),
            _ => format!("{local}@{}.{relay_suffix}", self.name),
        }
    }

    /// The relay domain for destinations that need one.
    pub fn relay_domain(&self, relay_suffix: &str) -> Option<String> {
        self.config.relay_domain(&self.name, relay_suffix)
    }
}

/// The holds in force (src/holds.rs), shared by every policy a reload
/// produces: unlike the rest of the policy, a hold must take effect at
/// once, also for messages that started before it.
#[derive(Debug, Default)]
pub struct HoldsHandle(RwLock<Arc<Holds>>);

impl HoldsHandle {
    /// The holds now. A poisoned lock still holds a complete value (it is
    /// only ever replaced whole).
    pub fn current(&self) -> Arc<Holds> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, holds: Holds) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(holds);
    }
}

#[derive(Debug)]
pub struct Policy {
    pub config: Config,
    pub rules: MatchRules,
    pub domains: HashMap<String, DomainPolicy>,
    /// Runtime holds; [`Policy::refresh_state`] re-reads them.
    pub holds: Arc<HoldsHandle>,
    /// Account files and their modification times when they were read, to
    /// reload when one changes (docs/design.md §7).
    pub account_files: Vec<(std::path::PathBuf, Option<std::time::SystemTime>)>,
}

pub type SharedPolicy = Arc<std::sync::RwLock<Arc<Policy>>>;

/// The policy in force now. A poisoned lock still holds a complete policy
/// (it is only ever replaced whole), so it is used rather than failing.
pub fn current(shared: &SharedPolicy) -> Arc<Policy> {
    match shared.read() {
        Ok(p) => p.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

impl Policy {
    /// Loads every account source the configuration names.
    pub fn load(config: Config) -> Result<Policy, LoadError> {
        let rules = MatchRules {
            case: config.local_part_case,
            delimiters: config.recipient_delimiter.clone(),
        };
        let mut domains = HashMap::new();
        // Taken before reading: a change during the read triggers a reload.
        let account_files = config
            .domains
            .values()
            .flat_map(|d| d.accounts.iter().flatten())
            .filter_map(|s| s.watched_file())
            .map(|p| {
                let m = modified(&p);
                (p, m)
            })
            .collect();
        if config.domains.is_empty() {
            tracing::warn!("no domains configured: dualroute changes nothing");
        }
        for (name, d) in &config.domains {
            let (accounts, report) = match &d.accounts {
                Some(sources) => {
                    let (a, r) = accounts::load(&name.0, sources, &rules)?;
                    for w in &r.warnings {
                        tracing::warn!("{name}: {w}");
                    }
                    (Some(a), r)
                }
                None => (None, LoadReport::default()),
            };
            let users = d
                .users
                .iter()
                .map(|(a, r)| (rules.key(&a.unquoted_local()).into_owned(), r.clone()))
                .collect();
            domains.insert(
                name.0.clone(),
                DomainPolicy {
                    name: name.0.clone(),
                    config: d.clone(),
                    accounts,
                    report,
                    users,
                },
            );
        }
        // The holds are read with the policy, so that no instant exists in
        // which a disabled or unverified domain routes.
        let (holds, _) = Holds::read(&config);
        Ok(Policy {
            config,
            rules,
            domains,
            holds: Arc::new(HoldsHandle(RwLock::new(Arc::new(holds)))),
            account_files,
        })
    }

    /// Why this policy must not replace `running` (docs/design.md §5): a domain
    /// would lose `accounts_shrink_limit` of its accounts or more, which
    /// is what a truncated or half-generated account file looks like. Its
    /// mail would be routed away (split) or refused (dual), so the running
    /// accounts stay until the administrator confirms by raising the limit
    /// or restarting.
    pub fn shrink_refusal(&self, running: &Policy) -> Option<String> {
        let limit = self.config.accounts_shrink_limit.0;
        let mut names: Vec<&String> = self.domains.keys().collect();
        names.sort();
        let shrunk: Vec<String> = names
            .into_iter()
            .filter_map(|name| {
                let now = self.domains[name].accounts.as_ref()?.len();
                let before = running.domains.get(name)?.accounts.as_ref()?.len();
                let lost = before.saturating_sub(now);
                (lost > 0 && lost as f64 >= limit * before as f64)
                    .then(|| format!("{name} would go from {before} to {now} accounts"))
            })
            .collect();
        (!shrunk.is_empty()).then(|| {
            format!(
                "{}, a loss accounts_shrink_limit ({}) does not allow; if that is meant, raise accounts_shrink_limit in the configuration (1: no limit) and reload, or restart dualroute",
                shrunk.join("; "),
                limit
            )
        })
    }

    /// After a reload: the new policy takes over the running holds
    /// handle (so messages that started under the old policy follow holds
    /// too) and fills it from `state_dir` for its own domains.
    pub fn take_over_holds(&mut self, old: &Policy) -> Vec<String> {
        self.holds = old.holds.clone();
        self.refresh_state()
    }

    /// Re-reads the admin, breaker and verification state of every domain
    /// from `state_dir` (src/holds.rs). A state file that cannot be read
    /// holds its domain: when in doubt, do not route (errors are returned
    /// for the log).
    pub fn refresh_state(&self) -> Vec<String> {
        let (holds, errors) = Holds::read(&self.config);
        self.holds.replace(holds);
        errors
    }

    pub fn is_gateway(&self, ip: IpAddr) -> bool {
        self.config.gateways.iter().any(|g| g.contains(ip))
    }

    pub fn domain(&self, address: &Address) -> Option<&DomainPolicy> {
        self.domains.get(&address.domain)
    }
}

/// A file's modification time, `None` when it cannot be read.
pub fn modified(p: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}
