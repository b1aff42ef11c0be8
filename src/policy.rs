//! The loaded policy: the configuration plus the account sets it names.
//!
//! A `Policy` is immutable. The service (src/service/) holds the current
//! one behind an `Arc`, and each message keeps the `Arc` it started with,
//! so a reload never changes the rules under a message in flight
//! (docs/design.md §7). What can change at any moment, the runtime holds,
//! is not part of it (src/holds/).

use crate::accounts::{self, Accounts, LoadError, LoadReport, MatchRules};
use crate::address::Address;
use crate::config::{Config, Destination, DomainConfig, Mode, UserRule};
use rustc_hash::FxHashMap;
use std::net::IpAddr;

mod aliases;
pub use aliases::Misrouted;

#[derive(Debug)]
pub struct DomainPolicy {
    pub name: String,
    pub config: DomainConfig,
    /// `None` when the domain has no `accounts:`.
    pub accounts: Option<Accounts>,
    pub report: LoadReport,
    /// The destination's own address list (`destination.reject_unknown.
    /// accounts`, DESIGN.md §10): the addresses of [`DomainPolicy::
    /// arrival_domain`] the destination takes mail for. `None` when not
    /// given.
    pub destination_accounts: Option<Accounts>,
    pub destination_report: LoadReport,
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

    /// The domain routed addresses of this domain have when they arrive
    /// at the destination: the `change_envelope` domain, else the domain
    /// itself (`smtp_generic_maps` restores it on the way out,
    /// docs/design.md §4). The destination's address list names
    /// addresses of this domain.
    pub fn arrival_domain(&self) -> &str {
        self.config.arrival_domain(&self.name)
    }
}

impl Policy {
    /// For a routing address (a redirect's target, docs/design.md §4): the
    /// managed domain with `reject_unknown` whose destination it
    /// goes to, and the address exactly as it arrives there, which is
    /// what a callout asks and the destination's list is searched for
    /// (`local@<domain>.<relay_suffix>` arrives as
    /// `local@<domain>`: `smtp_generic_maps` restores it on the way out;
    /// a `change_envelope` address arrives as it is; with `mta: sendmail`
    /// the relay domain stays, docs/sendmail.md). `None` for an
    /// address that is not routed (a mailbox here, an address outside the
    /// managed domains) or whose domain has no `reject_unknown`.
    pub fn callout_target(&self, routed: &str) -> Option<(&DomainPolicy, String)> {
        let asks = |d: &DomainPolicy| d.config.reject_unknown.is_some();
        let (local, at) = routed.rsplit_once('@')?;
        let suffix = &self.config.relay_suffix.0;
        if let Some(name) = at
            .strip_suffix(suffix.as_str())
            .and_then(|n| n.strip_suffix('.'))
        {
            if let Some(d) = self.domains.get(name) {
                if d.relay_domain(suffix).is_some() {
                    // Sendmail has no recipient-side generic map: the
                    // relay domain arrives as it is (docs/sendmail.md).
                    let arrives = match self.config.mta {
                        crate::config::Mta::Sendmail => routed.to_owned(),
                        _ => [local, "@", name].concat(),
                    };
                    return asks(d).then_some((d, arrives));
                }
            }
        }
        // Several domains may share a `change_envelope` destination; they
        // ask the same hosts the same address, so any of them answers (the
        // first by name, not the hash order's). No allocation: this runs
        // for every routed RCPT.
        self.domains
            .values()
            .filter(|d| match &d.config.destination {
                Destination::Domain {
                    domain,
                    change_envelope: true,
                } => domain.0.eq_ignore_ascii_case(at) && asks(d),
                _ => false,
            })
            .min_by(|a, b| a.name.cmp(&b.name))
            .map(|d| (d, routed.to_owned()))
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
    /// When it was loaded and from what, for the live state the running
    /// milter publishes (src/running.rs).
    pub loaded: Loaded,
}

/// When a policy was loaded, and the SHA-256 of the `milter.yaml` bytes it
/// was loaded from (empty for a policy not read from a file).
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub at: u64,
    pub config_sha256: String,
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
        let mut account_files: Vec<_> = config
            .domains
            .values()
            .flat_map(|d| d.accounts.iter().flatten().chain(d.destination_list()))
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
                    // `postfix:` sources: the tables main.cf names.
                    account_files.extend(r.watched.iter().cloned());
                    (Some(a), r)
                }
                None => (None, LoadReport::default()),
            };
            // The destination's list, loaded as accounts are, with the same
            // guard against an emptied source (accounts::load refuses a
            // list without an address of the domain).
            let arrival = d.arrival_domain(&name.0).to_owned();
            let (destination_accounts, destination_report) = match &d.reject_unknown {
                Some(r) if !r.accounts.is_empty() => {
                    let (a, rep) = accounts::load(&arrival, &r.accounts, &rules).map_err(|e| {
                        LoadError {
                            message: format!(
                                "{} (destination.reject_unknown.accounts of {name}: the destination's addresses of {arrival})",
                                e.message
                            ),
                            ..e
                        }
                    })?;
                    for w in &rep.warnings {
                        tracing::warn!("{name}: destination.reject_unknown.accounts: {w}");
                    }
                    (Some(a), rep)
                }
                _ => (None, LoadReport::default()),
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
                    destination_accounts,
                    destination_report,
                    users,
                },
            );
        }
        let policy = Policy {
            config,
            rules,
            domains,
            account_files,
            loaded: Loaded {
                at: crate::state::now(),
                config_sha256: String::new(),
            },
        };
        policy.check_mailboxes()?;
        policy.check_aliases()?;
        Ok(policy)
    }

    /// The domains whose accounts this policy, loaded by a reload, has
    /// lost past `accounts_shrink_limit` against `running` (docs/design.md
    /// §5): a truncated `vmailbox` must not send local users away. One
    /// lost account never counts: that is what deleting a mailbox looks
    /// like, also in a domain of two (and an emptied list is refused
    /// anyway). A domain whose new size the administrator has confirmed
    /// (`confirmed`, from `dualroute confirm-accounts`, by
    /// [`Shrunk::key`]) may shrink to it. The destination's address list
    /// (`reject_unknown.accounts`) is guarded the same way: a truncated
    /// export of the destination's users would refuse real addresses with
    /// 550 (DESIGN.md §10).
    pub fn shrunk(
        &self,
        running: &Policy,
        confirmed: impl Fn(&str) -> Option<usize>,
    ) -> Vec<Shrunk> {
        let limit = self.config.accounts_shrink_limit.0;
        let mut names: Vec<&String> = self.domains.keys().collect();
        names.sort();
        let list = |p: &Policy, name: &str, destination: bool| {
            let d = p.domains.get(name)?;
            if destination {
                d.destination_accounts.as_ref().map(Accounts::len)
            } else {
                d.accounts.as_ref().map(Accounts::len)
            }
        };
        names
            .into_iter()
            .flat_map(|name| [(name, false), (name, true)])
            .filter_map(|(name, destination)| {
                let now = list(self, name, destination)?;
                let before = list(running, name, destination)?;
                let lost = before.saturating_sub(now);
                let s = Shrunk {
                    domain: name.clone(),
                    before,
                    now,
                    destination,
                };
                (lost > 1
                    && lost as f64 >= limit * before as f64
                    && confirmed(&s.key()) != Some(now))
                .then_some(s)
            })
            .collect()
    }

    /// Why a reload is refused, from [`Policy::shrunk`]'s list.
    pub fn shrink_refusal(&self, shrunk: &[Shrunk]) -> Option<String> {
        let limit = self.config.accounts_shrink_limit.0;
        let list: Vec<String> = shrunk
            .iter()
            .map(|s| {
                if s.destination {
                    format!(
                        "the destination's address list of {} (reject_unknown.accounts) would go from {} to {} addresses",
                        s.domain, s.before, s.now
                    )
                } else {
                    format!(
                        "{} would go from {} to {} accounts",
                        s.domain, s.before, s.now
                    )
                }
            })
            .collect();
        (!list.is_empty()).then(|| {
            let mut confirm: Vec<String> = shrunk
                .iter()
                .map(|s| format!("`dualroute confirm-accounts {}`", s.domain))
                .collect();
            confirm.dedup();
            format!(
                "{}, a loss accounts_shrink_limit ({}) does not allow; the running lists stay, and the addresses the two account lists disagree on are refused with 451 4.4.4 (addresses only in the running destination list stay accepted and routed) until you decide: if the new list is right, run {}; if the running one is, restore the source",
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
    /// The destination's address list (`reject_unknown.accounts`), not
    /// the domain's accounts.
    pub destination: bool,
}

impl Shrunk {
    /// Where its dispute and its confirmation are kept in `state_dir`:
    /// the domain, or [`crate::state::destination_list`] of it.
    pub fn key(&self) -> String {
        if self.destination {
            crate::state::destination_list(&self.domain)
        } else {
            self.domain.clone()
        }
    }
}

// ---------------------------------------------------------------------
// Addresses that must reach a mailbox (issue 21 §3, docs/design.md §2
// rule 4 and §5). They need the accounts, so they are checked here, on
// every load and reload: a reload that breaks one keeps the running policy.
// ---------------------------------------------------------------------

impl Policy {
    /// Whether the local part with comparison key `key` has a mailbox here
    /// in `domain` (through its base before the delimiter, as Postfix looks
    /// it up). Without `accounts`, every address the MTA accepted counts as
    /// present in a `dual` domain (the dual row) and none elsewhere.
    pub fn present(&self, domain: &DomainPolicy, key: &str) -> bool {
        match &domain.accounts {
            Some(accounts) => {
                accounts.contains(key) || self.rules.base(key).is_some_and(|b| accounts.contains(b))
            }
            None => domain.config.mode == Mode::Dual,
        }
    }

    /// Why mail for `address` that nobody routes would be filed into the
    /// catch-all: an address of a split or route domain without a mailbox
    /// here (the catch-all Postfix needs for such domains, docs/design.md
    /// §8, is where it would land).
    pub(crate) fn catch_all(&self, address: &Address) -> Option<String> {
        let d = self.domain(address)?;
        if d.config.mode == Mode::Dual {
            return None;
        }
        let unquoted = address.unquoted_local();
        let key = self.rules.key(&unquoted);
        if self.present(d, &key) {
            return None;
        }
        Some(match d.accounts {
            Some(_) => format!(
                "{address} has no mailbox here (not in the accounts of {}, mode {})",
                d.name, d.config.mode
            ),
            None => format!(
                "{address} has no mailbox here that dualroute knows of ({} has no accounts, mode {})",
                d.name, d.config.mode
            ),
        })
    }

    /// The rules whose mail would end where nobody reads it or nowhere:
    /// - `keep: true` for an address of a split or route domain without a
    ///   mailbox here: kept, Postfix files it into the catch-all;
    /// - a `notify.to` address of the same kind: dualroute never routes its
    ///   own notifications (docs/design.md §7), so they would land there too;
    /// - a `copy_to`/`redirect_to` target with its own `copy_to` or
    ///   `redirect_to`: a recipient the milter adds is not decided again
    ///   (docs/design.md §8), so that rule would not apply, and back to
    ///   the user it is a loop;
    /// - a target of a `dual` domain without a mailbox here: a message to
    ///   it is refused, so there is nowhere to send it.
    ///
    /// The error names the line in milter.yaml.
    fn check_mailboxes(&self) -> Result<(), LoadError> {
        let source = &self.config.source;
        let fail = |keys: &[&str], message: String| {
            let shown = keys.iter().fold(String::new(), |mut s, k| {
                if !s.is_empty() && !k.starts_with('[') {
                    s.push('.');
                }
                s.push_str(k);
                s
            });
            Err(LoadError {
                file: source.file.clone(),
                line: crate::config::read::line_of(source, keys),
                message: format!("{shown}: {message}"),
            })
        };
        for (name, d) in &self.config.domains {
            for (user, rule) in &d.users {
                let u = user.to_string();
                let targets: Vec<(&str, Option<usize>, &Address)> = match rule {
                    UserRule::Keep => {
                        if let Some(why) = self.catch_all(user) {
                            return fail(
                                &["domains", &name.0, "users", &u, "keep"],
                                format!("{why}: mail kept for it would be filed into the catch-all; add it to the accounts, or remove the rule"),
                            );
                        }
                        continue;
                    }
                    UserRule::RedirectTo(t) => vec![("redirect_to", None, t)],
                    UserRule::CopyTo(list) => list
                        .iter()
                        .enumerate()
                        .map(|(i, t)| ("copy_to", Some(i), t))
                        .collect(),
                };
                for (kind, i, t) in targets {
                    let index = i.map(|i| format!("[{i}]"));
                    let mut keys = vec!["domains", &name.0, "users", &u, kind];
                    keys.extend(index.as_deref());
                    let Some(td) = self.domain(t) else {
                        continue;
                    };
                    let unquoted = t.unquoted_local();
                    let key = self.rules.key(&unquoted);
                    let own = td
                        .users
                        .get(&*key)
                        .or_else(|| self.rules.base(&key).and_then(|b| td.users.get(b)));
                    let onward: Vec<&Address> = match own {
                        Some(UserRule::RedirectTo(a)) => vec![a],
                        Some(UserRule::CopyTo(l)) => l.iter().collect(),
                        _ => vec![],
                    };
                    // Back to the user, also through a subaddress of it.
                    let user_local = user.unquoted_local();
                    let user_key = self.rules.key(&user_local);
                    let same = |a: &Address| {
                        let local = a.unquoted_local();
                        let k = self.rules.key(&local);
                        a.domain == user.domain
                            && (k == user_key || self.rules.base(&k) == Some(&*user_key))
                    };
                    if onward.iter().any(|a| same(a)) {
                        return fail(
                            &keys,
                            format!(
                                "{t}'s own rule sends its mail back to {user}: that would loop"
                            ),
                        );
                    }
                    if let Some(first) = onward.first() {
                        return fail(&keys, format!("{t} has its own rule (to {first}): a recipient dualroute adds is not decided again, so that rule would not apply to this mail; name the final address here"));
                    }
                    if td.config.mode == Mode::Dual && !self.present(td, &key) {
                        return fail(&keys, format!("{t} has no mailbox here and {} is mode dual: a message to it would be refused (550 5.1.1); name an address with a mailbox here or outside the managed domains", td.name));
                    }
                }
            }
        }
        if let Some(n) = &self.config.notify {
            for (i, to) in n.to.iter().enumerate() {
                if let Some(why) = self.catch_all(&to.0) {
                    let index = format!("[{i}]");
                    return fail(
                        &["notify", "to", &index],
                        format!("{why}: dualroute does not route its own notifications, so they would be filed into the catch-all; name an address with a mailbox here or outside the managed domains"),
                    );
                }
            }
        }
        Ok(())
    }
}

/// A file's modification time, `None` when it cannot be read.
pub fn modified(p: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}
