//! The one-shot commands of the `dualroute` program: `check`, `explain`,
//! `postfix-config`, `sendmail-config`, `verify`, `doctor`, `status`, `enable`, `disable`.
//! Each prints its result and returns the exit code; an error (`Err`) is
//! printed by `main` with exit status 1.

use crate::{decision::Envelope, policy::Policy};
use std::{net::IpAddr, path::Path, process::ExitCode};

/// The configuration and every account source: for the commands that show
/// or generate what the accounts decide.
fn load(path: &Path) -> Result<Policy, String> {
    crate::load_policy(path).map_err(|e| e.to_string())
}

/// The configuration alone: the commands an administrator runs during an
/// incident (`enable`, `disable`, `verify`, `doctor`, `status`) must not
/// wait on, or fail on, a million-line or half-written account file.
fn read_config(path: &Path) -> Result<crate::config::Config, String> {
    crate::config::read_file(path).map_err(|e| e.to_string())
}

/// The managed domain `domain` names, normalized as in milter.yaml.
fn managed<'a>(
    config: &'a crate::config::Config,
    path: &Path,
    domain: &str,
) -> Result<(String, &'a crate::config::DomainConfig), String> {
    let name = crate::address::normalize_domain(domain).unwrap_or_else(|_| domain.to_owned());
    match config.domains.get(&crate::config::DomainName(name.clone())) {
        Some(d) => Ok((name, d)),
        None => Err(format!(
            "{domain} is not a managed domain in {}",
            path.display()
        )),
    }
}

pub fn explain(
    path: &Path,
    addresses: &[String],
    envelope: &Envelope,
    live: bool,
) -> Result<ExitCode, String> {
    let policy = load(path)?;
    // Read from state_dir exactly as the running service reads them
    // (src/holds/): explain prints what the milter does.
    let (holds, errors) = crate::holds::Holds::read(&policy.config);
    for e in errors {
        eprintln!("dualroute: {e}; routing for that domain stays off");
    }
    // The callout cache as the milter reads it (state_dir). Built on the
    // first address that needs it; a live callout (`--callout`) needs a
    // runtime too.
    let mut callouts: Option<Option<crate::callout::Callouts>> = None;
    let mut runtime: Option<tokio::runtime::Runtime> = None;
    for a in addresses {
        println!("{}", crate::explain::explain(&policy, &holds, envelope, a));
        let Some((d, asked)) = crate::explain::callout_target(&policy, &holds, envelope, a) else {
            if live {
                println!("  reject_unknown: no callout: the milter asks the destination only about a recipient it routes away to a domain with `reject_unknown`");
            }
            continue;
        };
        if let Some(answer) = crate::callout::listed(&policy, d, &asked) {
            println!(
                "{}",
                crate::explain::reject_unknown_line(
                    &policy,
                    d,
                    &asked,
                    Some(&answer),
                    "address list"
                )
            );
            continue;
        }
        let engine = callouts.get_or_insert_with(|| {
            crate::dns::Dns::new(&policy.config.dns).ok().map(|dns| {
                crate::callout::Callouts::new(
                    &policy.config.state_dir,
                    &policy.config.instance,
                    std::sync::Arc::new(dns),
                    crate::callout::Limits::default(),
                )
            })
        });
        let Some(engine) = engine.as_ref() else {
            return Err(
                "cannot build a DNS resolver for callouts (see `dns:` in the configuration)".into(),
            );
        };
        if live {
            let rt = match &mut runtime {
                Some(rt) => rt,
                None => runtime.insert(
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("cannot start the runtime: {e}"))?,
                ),
            };
            let answer = rt.block_on(engine.live(&d.name, &d.config, &asked));
            println!(
                "{}",
                crate::explain::reject_unknown_line(
                    &policy,
                    d,
                    &asked,
                    Some(&answer),
                    "live callout"
                )
            );
        } else {
            let answer = engine.cached(&d.name, &d.config, &asked);
            println!(
                "{}",
                crate::explain::reject_unknown_line(
                    &policy,
                    d,
                    &asked,
                    answer.as_ref(),
                    "cached answer"
                )
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a generated MTA configuration, or writes its files into `write`
/// and lists them, with the notes on stderr.
fn print_or_write(
    write: Option<&Path>,
    printed: impl FnOnce() -> String,
    files: impl FnOnce(&Path) -> std::io::Result<Vec<String>>,
    notes: &[String],
) -> Result<ExitCode, String> {
    match write {
        None => print!("{}", printed()),
        Some(dir) => {
            let written = files(dir).map_err(|e| format!("cannot write {}: {e}", dir.display()))?;
            for f in written {
                println!("{}", dir.join(f).display());
            }
            for n in notes {
                eprintln!("NOTE: {n}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn postfix_config(
    path: &Path,
    write: Option<&Path>,
    map_dir: &Path,
    postfix_dir: &Path,
) -> Result<ExitCode, String> {
    let policy = load(path)?;
    let mut pf = crate::postfix::generate(&policy, map_dir);
    // issue 21 §2: the master.cf services that would bypass dualroute.
    pf.notes
        .extend(crate::postfix::override_notes(postfix_dir, &pf));
    print_or_write(write, || pf.render(map_dir), |dir| pf.write(dir), &pf.notes)
}

pub fn sendmail_config(path: &Path, write: Option<&Path>) -> Result<ExitCode, String> {
    let policy = load(path)?;
    let sm = crate::sendmail::generate(&policy);
    print_or_write(write, || sm.render(), |dir| sm.write(dir), &sm.notes)
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
    // What a --revert leaves (the catch-all Maildirs), said after it.
    let mut catchall = None;
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
        catchall = Some(apply::catchall_maildirs(&current, &before));
        (changes, None, notes)
    } else {
        let policy = load(path)?;
        let want = crate::postfix::generate(&policy, map_dir);
        let before = before.unwrap_or_default();
        let mut tables: Vec<_> = want.tables.iter().map(|t| map_dir.join(&t.file)).collect();
        tables.extend(before.tables.iter().cloned());
        let current = postfix.current(&tables)?;
        let (changes, record, wiring_notes) =
            apply::plan_apply_notes(&want, map_dir, &current, &before);
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
        notes.extend(wiring_notes);
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
    if let Some(maildirs) = catchall {
        postfix
            .left_behind(&maildirs)
            .iter()
            .for_each(|l| println!("{l}"));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn doctor(path: &Path, ips: &[IpAddr]) -> Result<ExitCode, String> {
    let config = read_config(path)?;
    let dns = match crate::dns::Dns::new(&config.dns) {
        Ok(d) => d,
        Err(e) => return Err(e.to_string()),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return Err(format!("cannot start the runtime: {e}")),
    };
    let report = runtime.block_on(crate::doctor::diagnose(&config, ips, &dns));
    println!("{report}");
    Ok(if report.problems() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn switch(path: &Path, domain: &str, disable: Option<&str>) -> Result<ExitCode, String> {
    let config = read_config(path)?;
    let (name, _) = managed(&config, path, domain)?;
    let dir = crate::state::StateDir::new(&config.state_dir);
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

/// What the callout cache of `name` in `state_dir` says (answers, and
/// whether the destination accepts any address: then the callout protects
/// nothing, DESIGN.md §10).
pub(crate) fn callout_line(
    state_dir: &Path,
    name: &str,
    d: &crate::config::DomainConfig,
) -> String {
    match crate::callout::summary(state_dir, name, d) {
        Ok(Some(s)) => s.line(),
        Ok(None) => {
            "reject_unknown callouts: nothing cached yet (the milter asks at the first routed RCPT)"
                .into()
        }
        Err(e) => format!(
            "reject_unknown callouts: cannot read the cache in {}: {e}",
            state_dir.display()
        ),
    }
}

/// `dualroute confirm-accounts DOMAIN` (docs/design.md "Shrink guard"):
/// the administrator accepts the smaller account list the running milter
/// refused. Writes the confirmation into `state_dir`; the running milter
/// sees it within seconds and reloads, letting the domain shrink to
/// exactly that many accounts.
pub fn confirm_accounts(path: &Path, domain: &str) -> Result<ExitCode, String> {
    let config = read_config(path)?;
    let (name, _) = managed(&config, path, domain)?;
    let dir = crate::state::StateDir::new(&config.state_dir);
    // The domain's accounts and the destination's address list
    // (`reject_unknown.accounts`) are guarded apart; confirm whichever the
    // milter refused.
    let keys = [
        (name.clone(), "account list", "accounts"),
        (
            crate::state::destination_list(&name),
            "destination address list (reject_unknown.accounts)",
            "addresses",
        ),
    ];
    let mut confirmed_any = false;
    for (key, what, unit) in keys {
        let dispute = dir.dispute(&key).map_err(|e| {
            format!(
                "cannot read the state of {name} in {}: {e}",
                dir.dir.display()
            )
        })?;
        let Some(d) = dispute else {
            continue;
        };
        let confirmed = crate::state::ShrinkConfirmed {
            since: crate::state::now(),
            accounts: d.refused,
        };
        dir.confirm_shrink(&key, &confirmed)
            .map_err(|e| format!("cannot write {}: {e}", dir.dir.display()))?;
        confirmed_any = true;
        println!(
            "{name}: the new {what} ({} {unit}, was {}) is confirmed; the running milter reloads within seconds and takes it ({} addresses differed)",
            d.refused, d.running, d.disputed
        );
    }
    if !confirmed_any {
        return Err(format!(
            "{name}: the running milter holds no refused account reload (no {name}.disputed in {}); nothing to confirm",
            dir.dir.display()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(path: &Path, domain: &str, send: bool) -> Result<ExitCode, String> {
    let config = read_config(path)?;
    let (name, d) = managed(&config, path, domain)?;
    let Some(rcpt) = &d.verify else {
        return Err(format!("{name} has no `verify:` address to probe"));
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return Err(format!("cannot start the runtime: {e}")),
    };
    let rcpt = rcpt.to_string();
    let result = runtime.block_on(crate::probe::verify(
        d,
        &config.dns,
        &config.instance,
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
            let accepted = reports.iter().find(|r| r.accepted);
            // Recorded as the running milter records its own probes: a pass
            // releases a domain held for verification within seconds,
            // without waiting for the milter's next retry (src/holds/).
            let v = crate::state::Verification {
                at: crate::state::now(),
                passed: accepted.is_some(),
                detail: match accepted {
                    Some(r) => format!("{} accepts {rcpt} (dualroute verify)", r.target.addr),
                    None => format!("no host accepted {rcpt} (dualroute verify)"),
                },
                target: crate::holds::probe_target(d),
            };
            let dir = crate::state::StateDir::new(&config.state_dir);
            if let Err(e) = dir.record_verification(&name, &v) {
                eprintln!(
                    "{name}: cannot record the result in {}: {e}",
                    dir.dir.display()
                );
            }
            if accepted.is_some() {
                // Shadow mode changes no message whatever the probe says
                // (docs/design.md, "Shadow mode and metrics"): promising routing
                // would mislead.
                let next = if config.shadow(d) {
                    "the domain is in shadow mode: nothing is routed until shadow is switched off (shadow: false, then reload)"
                } else {
                    "routing starts within seconds"
                };
                println!("{name}: verified: the destination accepts {rcpt}; {next}");
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
    // The breaker's source, as the service user reads it: unreadable, the
    // breaker would never trip (src/breaker/access.rs).
    let breaker_note = match &c.breaker {
        Some(b) => match crate::breaker::access::check(b) {
            Ok(note) => Some(note),
            Err(e) => {
                let at = crate::config::read::locate_in_file(path, &["breaker", "maillog"]);
                return Err(format!("{at}{e}"));
            }
        },
        None => None,
    };
    println!("{}: OK", path.display());
    breaker_note.iter().for_each(|n| println!("{n}"));
    socket_notes.iter().for_each(|n| println!("NOTE: {n}"));
    println!(
        "listen {}, instance {}, relay suffix {}",
        c.listen, c.instance, c.relay_suffix
    );
    if !c.gateways.is_empty() {
        let g: Vec<String> = c.gateways.iter().map(ToString::to_string).collect();
        println!("gateways: {}", g.join(", "));
    }
    if c.domains.is_empty() {
        println!("no domains configured: dualroute changes nothing");
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
        let mut via = d
            .relay_domain(&c.relay_suffix.0)
            .map(|r| format!(" via {r}"))
            .unwrap_or_default();
        // The destination's rules (issue 13): what postfix-config wires.
        if let Some(level) = d.config.transport.tls {
            via.push_str(&format!(", tls {level}"));
        }
        if let Some((n, why)) = crate::provider::concurrency(&d.config) {
            via.push_str(&format!(", concurrency {n} ({why})"));
        }
        if let Some(w) = d.config.transport.rate_delay {
            via.push_str(&format!(", rate_delay {}s", w.0.as_secs()));
        }
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
            match (d.config.enabled, c.shadow(&d.config)) {
                (true, false) => "",
                (true, true) => " (shadow)",
                (false, false) => " (enabled: false)",
                (false, true) => " (enabled: false, shadow)",
            },
            d.users.len(),
            if d.config.require_gateway {
                "; require_gateway"
            } else {
                ""
            },
        );
        for s in &d.report.sources {
            let mut line = format!("  {}: {} accounts of {name}", s.source, s.accounts);
            if s.other_domains > 0 {
                line.push_str(&format!(", {} entries of other domains", s.other_domains));
            }
            if s.not_accounts > 0 {
                line.push_str(&format!(", {} map keys not accounts", s.not_accounts));
            }
            println!("{line}");
        }
        for w in &d.report.warnings {
            println!("  WARNING: {w}");
        }
        // Without `reject_unknown`, a split or route domain accepts every
        // address it routes, and the destination's refusals bounce from
        // here (docs/design.md "Refusing unknown recipients").
        match &d.config.reject_unknown {
            None if d.config.mode != crate::config::Mode::Dual => println!(
                "  WARNING: mode {} without destination.reject_unknown: unknown addresses will be accepted and bounce from this server: backscatter (docs/design.md \"Refusing unknown recipients\")",
                d.config.mode
            ),
            None => {}
            Some(r) => {
                if let Some(list) = &d.destination_accounts {
                    println!(
                        "  reject_unknown: the destination's address list has {} addresses of {}{}",
                        list.len(),
                        d.arrival_domain(),
                        if r.callout {
                            "; an address not in it is asked of the destination (callout)"
                        } else {
                            "; an address not in it is refused with 550 5.1.1"
                        }
                    );
                    for w in &d.destination_report.warnings {
                        println!("  WARNING: destination.reject_unknown.accounts: {w}");
                    }
                }
                if r.callout {
                    println!("  {}", callout_line(&c.state_dir, &name.0, &d.config));
                }
            }
        }
        if let (crate::config::Mta::Sendmail, Some(relay)) =
            (c.mta, &d.relay_domain(&c.relay_suffix.0))
        {
            println!(
                "{name}: WARNING: mta is sendmail, which cannot restore @{name} on routed mail (no recipient-side generic map): the destination receives local@{relay}, so it must accept {relay}; or use a `domain` destination with `change_envelope: true` (docs/sendmail.md)"
            );
        }
    }
    // Aliases Postfix expands after the milter (docs/design.md "Aliases").
    if c.mta == crate::config::Mta::Postfix && crate::postfix::recipients::report(&policy) {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
