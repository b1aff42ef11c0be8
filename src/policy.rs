//! The loaded policy: the configuration plus the account sets it names.
//!
//! A `Policy` is immutable. The service (src/service/) holds the current
//! one behind an `Arc`, and each message keeps the `Arc` it started with,
//! so a reload never changes the rules under a message in flight
//! (docs/design.md §7). What can change at any moment, the runtime holds,
//! is not part of it (src/holds/).

use crate::accounts::{self, Accounts, LoadError, LoadReport, MatchRules};
use crate::address::Address;
use crate::config::{Config, Destination, DomainConfig, UserRule};
use rustc_hash::FxHashMap;
use std::net::IpAddr;

#[derive(Debug)]
pub struct DomainPolicy {
    pub name: String,
    pub config: DomainConfig,
    /// `None` when the domain has no `accounts:`.
    pub accounts: Option<Accounts>,
    pub report: LoadReport,
    /// Per-user rules by comparison key of the local part.
    /// (FxHash: looked up per RCPT; the keys are the administrator's.)
    pub users: FxHashMap<String, UserRule>,
}

impl DomainPolicy {
    /// The address mail for `local` is routed to (docs/design.md §4).
    pub fn routing_address(&self, local: &str, relay_suffix: &str) -> String {
        match &self.config.destination {
            Destination::Domain {
                domain,
                change_envelope: true,
            } => [local, "@", &domain.0].concat(),
            _ => [local, "@", &self.name, ".", relay_suffix].concat(),
        }
    }

    /// The relay domain for destinations that need one.
    pub fn relay_domain(&self, relay_suffix: &str) -> Option<String> {
        self.config.relay_domain(&self.name, relay_suffix)
    }
}

#[derive(Debug)]
pub struct Policy {
    pub config: Config,
    pub rules: MatchRules,
    /// Looked up several times per RCPT: FxHash, not SipHash. The keys
    /// are the administrator's, so there is nothing for a client to flood.
    pub domains: FxHashMap<String, DomainPolicy>,
    /// Account files and their modification times when they were read, to
    /// reload when one changes (docs/design.md §7).
    pub account_files: Vec<(std::path::PathBuf, Option<std::time::SystemTime>)>,
}

impl Policy {
    /// Loads every account source the configuration names.
    pub fn load(config: Config) -> Result<Policy, LoadError> {
        let rules = MatchRules {
            case: config.local_part_case,
            delimiters: config.recipient_delimiter.clone(),
        };
        let mut domains = FxHashMap::default();
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
        Ok(Policy {
            config,
            rules,
            domains,
            account_files,
        })
    }

    /// The domains whose accounts this policy, loaded by a reload, has
    /// lost past `accounts_shrink_limit` against `running` (docs/design.md
    /// §5): a truncated `vmailbox` must not send local users away. One
    /// lost account never counts: that is what deleting a mailbox looks
    /// like, also in a domain of two (and an emptied list is refused
    /// anyway). A domain whose new size the administrator has confirmed
    /// (`confirmed`, from `dualroute confirm-accounts`) may shrink to it.
    pub fn shrunk(
        &self,
        running: &Policy,
        confirmed: impl Fn(&str) -> Option<usize>,
    ) -> Vec<Shrunk> {
        let limit = self.config.accounts_shrink_limit.0;
        let mut names: Vec<&String> = self.domains.keys().collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|name| {
                let now = self.domains[name].accounts.as_ref()?.len();
                let before = running.domains.get(name)?.accounts.as_ref()?.len();
                let lost = before.saturating_sub(now);
                (lost > 1 && lost as f64 >= limit * before as f64 && confirmed(name) != Some(now))
                    .then(|| Shrunk {
                        domain: name.clone(),
                        before,
                        now,
                    })
            })
            .collect()
    }

    /// Why a reload is refused, from [`Policy::shrunk`]'s list.
    pub fn shrink_refusal(&self, shrunk: &[Shrunk]) -> Option<String> {
        let limit = self.config.accounts_shrink_limit.0;
        let list: Vec<String> = shrunk
            .iter()
            .map(|s| {
                format!(
                    "{} would go from {} to {} accounts",
                    s.domain, s.before, s.now
                )
            })
            .collect();
        (!list.is_empty()).then(|| {
            let confirm: Vec<String> = shrunk
                .iter()
                .map(|s| format!("`dualroute confirm-accounts {}`", s.domain))
                .collect();
            format!(
                "{}, a loss accounts_shrink_limit ({}) does not allow; the running accounts stay, and the addresses the two lists disagree on are refused with 451 4.4.4 until you decide: if the new list is right, run {}; if the running one is, restore the account source",
                list.join("; "),
                limit,
                confirm.join(" and ")
            )
        })
    }

    pub fn is_gateway(&self, ip: IpAddr) -> bool {
        self.config.gateways.iter().any(|g| g.contains(ip))
    }

    pub fn domain(&self, address: &Address) -> Option<&DomainPolicy> {
        self.domains.get(&address.domain)
    }
}

/// A domain a reload would shrink past the guard ([`Policy::shrunk`]).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Shrunk {
    pub domain: String,
    pub before: usize,
    pub now: usize,
}

/// A file's modification time, `None` when it cannot be read.
pub fn modified(p: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}
