//! `dualroute check` against Postfix's own recipient tables (issue 25 §3,
//! docs/design.md "Aliases"): every address Postfix accepts for a managed
//! domain that the accounts lack (the milter would route it away, or
//! refuse it in a dual domain), and every alias the milter keeps that
//! Postfix expands, after the milter, into an address the milter would
//! route (it would be filed into the catch-all). Tables that cannot be
//! listed are named with what to do, never skipped in silence.

use crate::accounts::postfix::Tables;
use crate::address::Address;
use crate::config::{AccountSource, Mode};
use crate::policy::Policy;
use std::path::PathBuf;

/// How many addresses of one kind are listed before "and N more".
const SHOWN: usize = 20;

/// The Postfix instance to read: the directory of a `postfix:` source,
/// else `$MAIL_CONFIG` (as every Postfix command), else /etc/postfix.
fn config_dir(policy: &Policy) -> PathBuf {
    policy
        .config
        .domains
        .values()
        .flat_map(|d| d.accounts.iter().flatten())
        .find_map(|s| match s {
            AccountSource::Postfix(dir) => Some(dir.clone()),
            _ => None,
        })
        .or_else(|| std::env::var_os("MAIL_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| "/etc/postfix".into())
}

/// Prints the comparison; `true` when an alias would be misrouted: an
/// alias Postfix accepts that the milter routes away (or refuses), or
/// one it keeps whose expansion it would route. A misroute is as bad as
/// a lost message (docs/design.md), so `check` exits 1 for it. Addresses
/// of `virtual_mailbox_maps` that are not accounts are a warning: moving
/// a mailbox to the destination before deleting it here is a normal step
/// of a migration.
pub fn report(policy: &Policy) -> bool {
    if policy.domains.is_empty() {
        // Nothing managed: nothing the milter could misroute.
        return false;
    }
    let dir = config_dir(policy);
    if !dir.join("main.cf").is_file() {
        println!(
            "NOTE: no Postfix main.cf in {}: the accounts were not compared with Postfix's recipient tables (set MAIL_CONFIG=DIR for another instance)",
            dir.display()
        );
        return false;
    }
    let mut tables = match Tables::read(&dir, false) {
        Ok(t) => t,
        Err(e) => {
            println!("ERROR: Postfix's recipient tables: {e}");
            return true;
        }
    };
    let mut names: Vec<&String> = policy.domains.keys().collect();
    names.sort();
    if names.iter().any(|n| tables.local_domains.contains(n)) {
        match Tables::read(&dir, true) {
            Ok(t) => tables = t,
            Err(e) => println!("ERROR: Postfix's alias_maps: {e}"),
        }
    }
    println!(
        "postfix {}: {} virtual mailboxes, {} virtual aliases",
        dir.display(),
        tables.mailboxes.len(),
        tables.aliases.len()
    );
    let mut misroutes = 0;
    for name in &names {
        let d = &policy.domains[*name];
        if d.config.mode == Mode::Route {
            // Every address of a route domain goes to the destination.
            continue;
        }
        let fate = match d.config.mode {
            Mode::Dual => "refused (550 5.1.1)",
            _ => "routed to the destination",
        };
        // Split or dual here: without a mailbox and without a rule, the
        // milter routes it (split) or refuses it (dual).
        let lacking = |a: &str| {
            Address::parse(a).is_ok_and(|a| {
                !policy.present(d, &policy.rules.key(&a.unquoted_local())) && !policy.has_rule(&a)
            })
        };
        // (a) Addresses Postfix accepts that the accounts lack.
        let mailboxes: Vec<&str> = tables
            .mailboxes
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| {
                k.rsplit_once('@')
                    .is_some_and(|(_, dom)| dom == name.as_str())
            })
            .filter(|k| lacking(k))
            .collect();
        if !mailboxes.is_empty() {
            println!(
                "{name}: WARNING: {} address(es) of virtual_mailbox_maps are not accounts, so mail for them is {fate}: {}",
                mailboxes.len(),
                shown(&mailboxes)
            );
        }
        let mut aliases: Vec<(String, &str)> = tables
            .alias_keys_of(name)
            .filter(|(k, _)| lacking(k))
            .collect();
        if tables.local_domains.contains(name) {
            aliases.extend(
                tables
                    .local_aliases
                    .iter()
                    .map(|(k, t)| (format!("{k}@{name}"), t.as_str()))
                    .filter(|(k, _)| lacking(k)),
            );
            println!(
                "{name}: NOTE: {name} is in mydestination: the system's users (local_recipient_maps) are not listed here; every user that receives mail for {name} must be an account"
            );
        }
        aliases.sort();
        for (alias, table) in &aliases {
            misroutes += 1;
            let targets = tables
                .lookup(alias)
                .map(|t| t.join(", "))
                .unwrap_or_default();
            println!(
                "{name}: ERROR: {alias} is an alias in {table} (→ {targets}) but not an account: the milter sees {alias} before Postfix expands it, so mail for it is {fate}. Fix: add it to the accounts (`postfix: {}` takes every alias and mailbox from Postfix), give it a `users:` rule, or remove it from Postfix if the destination has it (docs/design.md \"Aliases\")",
                dir.display()
            );
        }
        // A `postfix:` source has said it already, under the domain.
        let said = d
            .report
            .warnings
            .iter()
            .any(|w| w.starts_with(&format!("@{name} in ")));
        if let Some((targets, table)) = tables.aliases.get(&format!("@{name}")).filter(|_| !said) {
            println!(
                "{name}: WARNING: @{name} in {table} is a catch-all alias (→ {}): the milter routes every address of {name} that is not an account before Postfix applies it, so it no longer catches them (docs/design.md \"Aliases\")",
                targets.join(", ")
            );
        }
    }
    // (b) Aliases the milter keeps whose expansion it would route.
    let mut keys: Vec<String> = tables
        .aliases
        .keys()
        .filter(|k| !k.starts_with('@'))
        .flat_map(|k| {
            if k.contains('@') {
                vec![k.clone()]
            } else {
                tables
                    .local_domains
                    .iter()
                    .map(|d| format!("{k}@{d}"))
                    .collect()
            }
        })
        .collect();
    keys.sort();
    for alias in keys {
        let Ok(a) = Address::parse(&alias) else {
            continue;
        };
        if !policy.kept(&a) {
            continue;
        }
        match tables.expand(&alias) {
            Ok(leaves) => {
                let bad = policy.misrouted(&leaves);
                if !bad.is_empty() {
                    misroutes += 1;
                    let targets = tables.lookup(&alias).cloned().unwrap_or_default();
                    println!("ERROR: {}", policy.alias_error(&alias, &targets, &bad));
                }
            }
            Err(e) => println!("WARNING: virtual alias {e}: Postfix bounces such mail"),
        }
    }
    for (param, table) in &tables.unlistable {
        println!(
            "WARNING: {param}: {table} cannot be listed (postmap -s), so its addresses were not compared with the accounts: check each address of a managed domain in it with `dualroute explain ADDRESS`, and add those Postfix delivers here to the accounts (a `command:` source can list a mysql:/ldap: table, README \"Accounts from a directory\")"
        );
    }
    if misroutes > 0 {
        println!(
            "{misroutes} alias(es) of Postfix would be misrouted: fix them before routing (check exits 1)"
        );
    }
    misroutes > 0
}

fn shown(list: &[&str]) -> String {
    let mut s = list
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > SHOWN {
        s.push_str(&format!(" and {} more", list.len() - SHOWN));
    }
    s
}
