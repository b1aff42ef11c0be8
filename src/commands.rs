//! The one-shot commands of the `dualroute` program: `check`, `explain`,
//! `postfix-config`, `verify`, `doctor`, `status`, `enable`, `disable`.
//! Each prints its result and returns the exit code; an error (`Err`) is
//! printed by `main` with exit status 1.

use crate::{decision::Envelope, policy::Policy};
use std::{net::IpAddr, path::Path, process::ExitCode};

fn load(path: &Path) -> Result<Policy, String> {
    crate::load_policy(path).map_err(|e| e.to_string())
}

pub fn explain(path: &Path, addresses: &[String], envelope: &Envelope) -> Result<ExitCode, String> {
    let policy = load(path)?;
    for a in addresses {
        println!("{}", crate::explain::explain(&policy, envelope, a));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn postfix_config(
    path: &Path,
    write: Option<&Path>,
    map_dir: &Path,
) -> Result<ExitCode, String> {
    let policy = load(path)?;
    let pf = crate::postfix::generate(&policy, map_dir);
    match write {
        None => print!("{}", pf.render(map_dir)),
        Some(dir) => {
            let files = pf
                .write(dir)
                .map_err(|e| format!("cannot write {}: {e}", dir.display()))?;
            for f in files {
                println!("{}", dir.join(f).display());
            }
            for n in &pf.notes {
                eprintln!("NOTE: {n}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `postfix-config --apply` / `--revert` [`--dry-run`] on a Postfix
/// configuration directory.
pub fn postfix_apply(
    path: &Path,
    config_dir: &Path,
    map_dir: &Path,
    revert: bool,
    dry_run: bool,
) -> Result<ExitCode, String> {
    use crate::postfix::apply;
    let postfix = apply::Postfix {
        config_dir: config_dir.to_owned(),
    };
    let before = postfix.record()?;
    let (changes, record, notes) = if revert {
        let Some(before) = before else {
            println!(
                "{}: nothing to revert (no {} there)",
                config_dir.display(),
                apply::RECORD
            );
            return Ok(ExitCode::SUCCESS);
        };
        let current = postfix.current(&before.tables)?;
        let (changes, notes) = apply::plan_revert(&current, &before);
        (changes, None, notes)
    } else {
        let policy = load(path)?;
        let want = crate::postfix::generate(&policy, map_dir);
        let before = before.unwrap_or_default();
        let mut tables: Vec<_> = want.tables.iter().map(|t| map_dir.join(&t.file)).collect();
        tables.extend(before.tables.iter().cloned());
        let current = postfix.current(&tables)?;
        let (changes, record) = apply::plan_apply(&want, map_dir, &current, &before);
        // --apply puts the catch-all into virtual_mailbox_maps itself: the
        // hand-made step of the printed form does not apply.
        let mut notes: Vec<String> = want
            .notes
            .iter()
            .filter(|n| !n.starts_with(crate::postfix::CATCHALL_NOTE))
            .cloned()
            .collect();
        if want
            .notes
            .iter()
            .any(|n| n.starts_with(crate::postfix::CATCHALL_NOTE))
        {
            notes.push("the dualroute_catchall table goes into virtual_mailbox_maps, for virtual mailbox domains; a split or route domain in relay_domains (relay_recipient_maps) or mydestination (local_recipient_maps) needs its @domain key in that table instead".into());
        }
        (changes, Some(record), notes)
    };
    for n in &notes {
        eprintln!("NOTE: {}", n.replace('\n', "\n  "));
    }
    if changes.is_empty() {
        println!("{}: nothing to change", config_dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    if dry_run {
        println!("would run (--dry-run, nothing changed):");
        changes.iter().for_each(|c| println!("  {c}"));
        return Ok(ExitCode::SUCCESS);
    }
    postfix.commit(&changes, record.as_ref())?;
    Ok(ExitCode::SUCCESS)
}

pub fn doctor(path: &Path, ips: &[IpAddr]) -> Result<ExitCode, String> {
    let policy = load(path)?;
    let dns = match crate::dns::Dns::new(&policy.config.dns) {
        Ok(d) => d,
        Err(e) => return Err(e.to_string()),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return Err(format!("cannot start the runtime: {e}")),
    };
    let report = runtime.block_on(crate::doctor::diagnose(&policy, ips, &dns));
    println!("{report}");
    Ok(if report.problems() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn status(path: &Path) -> Result<ExitCode, String> {
    let policy = load(path)?;
    let dir = crate::state::StateDir::new(&policy.config.state_dir);
    let mut names: Vec<&String> = policy.domains.keys().collect();
    names.sort();
    let mut ok = true;
    for name in names {
        let d = &policy.domains[name];
        let st = match dir.load(name) {
            Ok(s) => s,
            Err(e) => {
                ok = false;
                println!("{name}: ERROR: {e} (routing is off until the file is fixed or removed)");
                continue;
            }
        };
        let mode = d.config.mode;
        let line = if !d.config.enabled {
            "transparent (enabled: false in the configuration)".to_owned()
        } else if let Some(x) = &st.disabled {
            format!(
                "DISABLED by an administrator since {}: {}",
                crate::state::when(x.since),
                x.reason
            )
        } else if let Some(t) = &st.tripped {
            format!(
                "TRIPPED by the bounce breaker since {}: {} permanent failures within {}s; last: {}",
                crate::state::when(t.since),
                t.bounces,
                t.window_secs,
                t.last
            )
        } else if let Some(addr) = &d.config.verify {
            match &st.verification {
                Some(v) if v.passed => format!(
                    "active (verified {}: {})",
                    crate::state::when(v.at),
                    v.detail
                ),
                Some(v) => format!(
                    "WAITING for verification of {addr}; last probe {}: {}",
                    crate::state::when(v.at),
                    v.detail
                ),
                None => format!("WAITING for verification of {addr}; no probe yet"),
            }
        } else {
            "active".to_owned()
        };
        println!("{name}: mode {mode}: {line}");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn switch(path: &Path, domain: &str, disable: Option<&str>) -> Result<ExitCode, String> {
    let policy = load(path)?;
    let name = crate::address::normalize_domain(domain).unwrap_or_else(|_| domain.to_owned());
    if !policy.domains.contains_key(&name) {
        return Err(format!(
            "{domain} is not a managed domain in {}",
            path.display()
        ));
    }
    let dir = crate::state::StateDir::new(&policy.config.state_dir);
    match disable {
        Some(reason) => match dir.disable(&name, reason) {
            Ok(()) => {
                println!("{name}: routing disabled; the running milter follows within seconds")
            }
            Err(e) => return Err(format!("cannot write {}: {e}", dir.dir.display())),
        },
        None => {
            match dir.enable(&name) {
                Ok((was_disabled, was_tripped)) => {
                    let what = match (was_disabled, was_tripped) {
                        (false, false) => "was not disabled or tripped",
                        (true, false) => "admin disable cleared",
                        (false, true) => "breaker trip cleared",
                        (true, true) => "admin disable and breaker trip cleared",
                    };
                    println!("{name}: routing enabled ({what}); the running milter follows within seconds");
                }
                Err(e) => return Err(format!("cannot write {}: {e}", dir.dir.display())),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(path: &Path, domain: &str, send: bool) -> Result<ExitCode, String> {
    let policy = load(path)?;
    let name = crate::address::normalize_domain(domain).unwrap_or_else(|_| domain.to_owned());
    let Some(d) = policy.domains.get(&name) else {
        return Err(format!(
            "{domain} is not a managed domain in {}",
            path.display()
        ));
    };
    let Some(rcpt) = &d.config.verify else {
        return Err(format!("{name} has no `verify:` address to probe"));
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return Err(format!("cannot start the runtime: {e}")),
    };
    let rcpt = rcpt.to_string();
    let result = runtime.block_on(crate::probe::verify(
        &d.config.destination,
        &policy.config.dns,
        &policy.config.instance,
        &rcpt,
        crate::probe::STEP_TIMEOUT,
        send,
    ));
    match result {
        Err(e) => Err(format!("{name}: cannot find the destination's hosts: {e}")),
        Ok(reports) => {
            for r in &reports {
                println!("{r}");
            }
            if reports.iter().any(|r| r.accepted) {
                println!("{name}: verified: the destination accepts {rcpt}");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{name}: NOT verified: no host accepted {rcpt}");
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

pub fn check(path: &Path) -> Result<ExitCode, String> {
    let policy = load(path)?;
    let c = &policy.config;
    let socket_notes = crate::socket::check(&c.listen).map_err(|e| e.to_string())?;
    println!("{}: OK", path.display());
    socket_notes.iter().for_each(|n| println!("NOTE: {n}"));
    println!(
        "listen {}, instance {}, relay suffix {}",
        c.listen, c.instance, c.relay_suffix
    );
    if !c.gateways.is_empty() {
        let g: Vec<String> = c.gateways.iter().map(ToString::to_string).collect();
        println!("gateways: {}", g.join(", "));
    }
    for name in c.domains.keys() {
        let Some(d) = policy.domains.get(&name.0) else {
            continue;
        };
        let dest = match &d.config.destination {
            crate::config::Destination::Hosts(h) => {
                let h: Vec<String> = h.iter().map(ToString::to_string).collect();
                format!("hosts {}", h.join(", "))
            }
            crate::config::Destination::Domain {
                domain,
                change_envelope,
            } => {
                format!(
                    "domain {domain}{}",
                    if *change_envelope {
                        " (change_envelope)"
                    } else {
                        ""
                    }
                )
            }
        };
        let via = d
            .relay_domain(&c.relay_suffix.0)
            .map(|r| format!(" via {r}"))
            .unwrap_or_default();
        let accounts = match &d.accounts {
            Some(a) => format!(
                "{} accounts ({} entries of other domains ignored, {} map keys not accounts)",
                a.len(),
                d.report.other_domains,
                d.report.not_accounts
            ),
            None => "no accounts".into(),
        };
        println!(
            "{name}: mode {}{}, destination {dest}{via}; {accounts}; {} per-user rules{}",
            d.config.mode,
            if d.config.enabled {
                ""
            } else {
                " (enabled: false)"
            },
            d.users.len(),
            if d.config.require_gateway {
                "; require_gateway"
            } else {
                ""
            },
        );
    }
    Ok(ExitCode::SUCCESS)
}
