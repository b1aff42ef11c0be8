//! Aliases that Postfix expands after the milter (docs/design.md
//! "Aliases", issue 25 §3). smtpd hands the milter the recipient as the
//! client wrote it; cleanup(8) applies `virtual_alias_maps` afterwards,
//! to what is queued (ADDRESS_REWRITING_README, "Virtual aliasing"). So an
//! alias the milter keeps is expanded into addresses the milter never
//! sees: one that the milter would route (no mailbox here in a split or
//! route domain) is filed into the catch-all instead.

use super::Policy;
use crate::accounts::LoadError;
use crate::address::Address;
use crate::config::{Mode, UserRule};

/// A target of a kept alias that the milter would have routed.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Misrouted {
    pub target: String,
    /// Why it has no mailbox here.
    pub why: String,
    /// The address that reaches it at the destination (docs/design.md
    /// §4): what the alias should name instead.
    pub routing_address: String,
}

impl Policy {
    /// Whether the milter leaves `address` to Postfix (keep or copy):
    /// outside the managed domains, or with a mailbox here in a split or
    /// dual domain and no `redirect_to` rule. Only such an address
    /// reaches Postfix's alias expansion.
    pub fn kept(&self, address: &Address) -> bool {
        let Some(d) = self.domain(address) else {
            return true;
        };
        let local = address.unquoted_local();
        let key = self.rules.key(&local);
        let rule = d
            .users
            .get(&*key)
            .or_else(|| self.rules.base(&key).and_then(|b| d.users.get(b)));
        match rule {
            Some(UserRule::RedirectTo(_)) => false,
            Some(UserRule::Keep) => true,
            _ => d.config.mode != Mode::Route && self.present(d, &key),
        }
    }

    /// Whether `address` has a per-user rule in its managed domain.
    pub fn has_rule(&self, address: &Address) -> bool {
        self.domain(address).is_some_and(|d| {
            let local = address.unquoted_local();
            let key = self.rules.key(&local);
            d.users.contains_key(&*key)
                || self
                    .rules
                    .base(&key)
                    .is_some_and(|b| d.users.contains_key(b))
        })
    }

    /// The targets among `targets` (what Postfix expands an alias to)
    /// that the milter would route: filed into the catch-all when the
    /// alias is kept.
    pub fn misrouted(&self, targets: &[String]) -> Vec<Misrouted> {
        targets
            .iter()
            .filter_map(|t| {
                let a = Address::parse(t).ok()?;
                let why = self.catch_all(&a)?;
                let d = self.domain(&a)?;
                Some(Misrouted {
                    target: t.clone(),
                    why,
                    routing_address: d
                        .routing_address(&a.unquoted_local(), &self.config.relay_suffix.0),
                })
            })
            .collect()
    }

    /// The error for an alias kept by the milter whose targets include
    /// `bad`: the alias, its targets and the fix.
    pub fn alias_error(&self, alias: &str, targets: &[String], bad: &[Misrouted]) -> String {
        let first = &bad[0];
        let mut s = format!(
            "virtual alias {alias} → {}: {}; the milter sees {alias} (and keeps it), Postfix expands the alias after the milter, so mail for it would be filed into the catch-all. Fix: point the alias at {} (the routing address, which Postfix sends to the destination)",
            targets.join(", "),
            first.why,
            bad.iter().map(|m| m.routing_address.as_str()).collect::<Vec<_>>().join(", "),
        );
        if targets.len() == 1 {
            s.push_str(&format!(
                ", or give {alias} a `users:` rule `redirect_to: {}` (the milter then routes it before Postfix expands it)",
                first.target
            ));
        }
        s.push_str(" (docs/design.md \"Aliases\")");
        s
    }

    /// Every alias a `postfix:` source made an account: kept by the
    /// milter, so its targets must not be ones the milter would route.
    /// Checked at every load; a reload that breaks it keeps the running
    /// policy.
    pub(super) fn check_aliases(&self) -> Result<(), LoadError> {
        let mut names: Vec<&String> = self.domains.keys().collect();
        names.sort();
        for name in names {
            let d = &self.domains[name];
            for (alias, targets) in &d.report.aliases {
                let Ok(a) = Address::parse(alias) else {
                    continue;
                };
                if !self.kept(&a) {
                    continue;
                }
                let bad = self.misrouted(targets);
                if bad.is_empty() {
                    continue;
                }
                let source = &self.config.source;
                return Err(LoadError {
                    file: source.file.clone(),
                    line: crate::config::read::line_of(source, &["domains", name, "accounts"]),
                    message: format!(
                        "domains.{name}.accounts: postfix: {}",
                        self.alias_error(alias, targets, &bad)
                    ),
                });
            }
        }
        Ok(())
    }
}
