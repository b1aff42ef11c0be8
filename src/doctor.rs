//! `dualroute doctor` (docs/design.md §6): the DNS facts a migration depends
//! on, checked per domain and printed as a ✔/✘ checklist with one line of
//! advice per ✘.
//!
//! - MX: where the domain's mail arrives (this server, the destination or
//!   elsewhere); none at all, or one that does not resolve, is a ✘.
//! - SPF: routed mail keeps its original sender, so the destination checks
//!   the *sender's* SPF against this server; and the domain's users send
//!   from whichever server holds their mailbox. The domain's own SPF record
//!   must therefore authorize both this server and the destination. This is
//!   why Google, Microsoft and Zoho ask to add the forwarding server to the
//!   domain's SPF record for split and dual delivery.
//! - The destination resolves (as the MTA would look it up), and not to
//!   this server (routed mail would loop).
//! - The relay domain `<domain>.<relay_suffix>` does not resolve: if the
//!   MTA's transport for it were missing, routed mail would otherwise go to
//!   whatever host it names.
//!
//! DNS failures are ✘ with the error text: doctor cannot vouch for what it
//! could not look up.

pub mod spf_trace;
pub mod trust;

use crate::config::{Config, DomainConfig, Host};
use crate::dns::{DnsError, Lookup};
use crate::probe::host_targets;
use spf_trace::{check_host, Cost, Verdict, MAX_LOOKUPS};
use std::{fmt, net::IpAddr};
use viaspf::{lookup::Lookup as SpfLookup, SpfResult};

/// One line of the checklist.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Check {
    pub ok: bool,
    pub text: String,
    /// What to do about a ✘.
    pub advice: Option<String>,
}

impl Check {
    fn pass(text: String) -> Check {
        Check {
            ok: true,
            text,
            advice: None,
        }
    }
    fn fail(text: String, advice: String) -> Check {
        Check {
            ok: false,
            text,
            advice: Some(advice),
        }
    }
}

#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Section {
    pub title: String,
    pub checks: Vec<Check>,
    /// Settings to make elsewhere that the DNS cannot show (the
    /// provider's side, src/doctor/trust.rs); printed as `•` lines.
    pub todo: Vec<String>,
}

/// The whole checklist.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Report {
    pub sections: Vec<Section>,
}

impl Report {
    /// The number of ✘.
    pub fn problems(&self) -> usize {
        self.sections
            .iter()
            .flat_map(|s| &s.checks)
            .filter(|c| !c.ok)
            .count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.sections {
            writeln!(f, "{}", s.title)?;
            for c in &s.checks {
                writeln!(f, "  {} {}", if c.ok { "✔" } else { "✘" }, c.text)?;
                if let Some(a) = &c.advice {
                    writeln!(f, "      → {a}")?;
                }
            }
            for t in &s.todo {
                writeln!(f, "  • {t}")?;
            }
        }
        match self.problems() {
            0 => write!(f, "no problems found"),
            1 => write!(f, "1 problem found"),
            n => write!(f, "{n} problems found"),
        }
    }
}

/// Checks every managed domain. `given` are this server's addresses from
/// the command line; when empty, the addresses of the `instance` name.
/// It needs the configuration only, not the accounts.
pub async fn diagnose(
    config: &Config,
    given: &[IpAddr],
    dns: &(impl Lookup + SpfLookup),
) -> Report {
    let instance = config.instance.as_str();
    // Every check needs the DNS: when the name servers do not answer at
    // all, say so once instead of timing out on every lookup.
    if let Some(first) = config.domains.keys().next() {
        if let Err(DnsError::NoAnswer(e)) = dns.mx(&first.0).await {
            let servers = if config.dns.nameservers.is_empty() {
                "the system's, from /etc/resolv.conf".to_owned()
            } else {
                config
                    .dns
                    .nameservers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let check = Check::fail(
                format!("the name servers do not answer ({servers}): {e}"),
                "check `dns: nameservers` in milter.yaml, or /etc/resolv.conf without it; nothing else can be checked until they answer".into(),
            );
            return Report {
                sections: vec![Section {
                    title: "DNS".into(),
                    checks: vec![check],
                    todo: Vec::new(),
                }],
            };
        }
    }
    let mut head = Section {
        title: format!("this server ({instance})"),
        checks: Vec::new(),
        todo: Vec::new(),
    };
    let this: Vec<IpAddr> = if !given.is_empty() {
        head.checks.push(Check::pass(format!(
            "addresses given with --ip: {}",
            list(given)
        )));
        given.to_vec()
    } else {
        let advice = "the SPF checks need this server's public addresses: set `instance:` in milter.yaml to its DNS name, or give them with --ip".to_owned();
        match dns.ips(instance).await {
            Ok(ips) if !ips.is_empty() => {
                head.checks
                    .push(Check::pass(format!("{instance} resolves: {}", list(&ips))));
                ips
            }
            Ok(_) => {
                head.checks.push(Check::fail(
                    format!("{instance} (`instance`) has no A or AAAA record"),
                    advice,
                ));
                Vec::new()
            }
            Err(e) => {
                head.checks.push(Check::fail(
                    format!("addresses of {instance} (`instance`): {e}"),
                    advice,
                ));
                Vec::new()
            }
        }
    };
    let mut sections = vec![head];
    for (name, d) in &config.domains {
        sections.push(domain(config, &name.0, d, &this, dns).await);
    }
    Report { sections }
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn domain(
    config: &Config,
    name: &str,
    d: &DomainConfig,
    this: &[IpAddr],
    dns: &(impl Lookup + SpfLookup),
) -> Section {
    let hosts = d.destination.hosts();
    let shown: Vec<String> = hosts.iter().map(ToString::to_string).collect();
    let title = format!(
        "{name} (mode {}, destination {}{})",
        d.mode,
        shown.join(", "),
        if d.enabled { "" } else { "; enabled: false" }
    );
    let mut checks = Vec::new();

    // The destination first: the MX and SPF checks need its addresses.
    let mut dest: Vec<(IpAddr, String)> = Vec::new();
    let mut dest_hosts: Vec<String> = Vec::new();
    let mut dest_checks = Vec::new();
    for h in &hosts {
        match host_targets(h, dns).await {
            Ok(targets) => {
                let looped: Vec<IpAddr> = targets.iter().map(|t| t.addr.ip()).filter(|ip| this.contains(ip)).collect();
                let text = if h.name.parse::<IpAddr>().is_ok() {
                    format!("destination {h} is an address literal")
                } else {
                    let mut parts: Vec<(String, Vec<IpAddr>)> = Vec::new();
                    for t in &targets {
                        match parts.iter_mut().find(|(via, _)| *via == t.via) {
                            Some((_, ips)) => ips.push(t.addr.ip()),
                            None => parts.push((t.via.clone(), vec![t.addr.ip()])),
                        }
                    }
                    let parts: Vec<String> = parts.iter().map(|(via, ips)| format!("{via} → {}", list(ips))).collect();
                    format!("destination {h} resolves: {}", parts.join("; "))
                };
                if looped.is_empty() {
                    dest_checks.push(Check::pass(text));
                } else {
                    dest_checks.push(Check::fail(
                        format!("destination {h} resolves to this server ({})", list(&looped)),
                        "routed mail would come back here and loop: `destination` must name the other server".into(),
                    ));
                }
                for t in targets {
                    if !dest_hosts.contains(&t.host) {
                        dest_hosts.push(t.host.clone());
                    }
                    if !dest.iter().any(|(ip, _)| *ip == t.addr.ip()) {
                        dest.push((t.addr.ip(), format!("destination {h}")));
                    }
                }
            }
            Err(e) => dest_checks.push(Check::fail(
                format!("destination {h} does not resolve: {e}"),
                format!("the MTA cannot deliver routed mail for {name} and keeps it deferred: publish the records, or correct `destination` in milter.yaml"),
            )),
        }
    }

    checks.push(mx(name, &config.instance, this, &hosts, &dest, dns).await);
    checks.extend(dest_checks);
    checks.extend(spf(name, &config.instance, this, &dest, dns).await);
    if let Some(relay) = d.relay_domain(name, &config.relay_suffix.0) {
        checks.push(relay_check(&relay, dns).await);
    }
    let mut todo = Vec::new();
    if let Some(t) = trust::trust(name, d, this, &dest_hosts, dns).await {
        checks.push(t.check);
        todo = t.todo;
    }
    // Backscatter (DESIGN.md §10): what the destination would refuse.
    match &d.reject_unknown {
        None if d.mode != crate::config::Mode::Dual => todo.push(format!(
            "mode {} without destination.reject_unknown: an address unknown here and at the destination is accepted, then bounces from this server to a sender who is usually forged (backscatter); set `reject_unknown: {{ callout: true }}` or give the destination's address list (docs/rollout.md)",
            d.mode
        )),
        Some(r) if r.callout => {
            if let Ok(Some(s)) = crate::callout::summary(&config.state_dir, name, d) {
                match &s.accept_all {
                    Some((true, _, reply)) => checks.push(Check::fail(
                        format!("the destination of {name} accepts any address (a random local part: {reply})"),
                        "reject_unknown's callout cannot tell unknown addresses there, so they bounce from here: switch the destination's catch-all off, or give its address list in `reject_unknown.accounts`".into(),
                    )),
                    Some((false, _, _)) => checks.push(Check::pass(format!(
                        "the destination of {name} refuses unknown addresses: reject_unknown's callouts refuse them at RCPT"
                    ))),
                    None => {}
                }
            }
        }
        _ => {}
    }
    Section {
        title,
        checks,
        todo,
    }
}

async fn mx(
    name: &str,
    instance: &str,
    this: &[IpAddr],
    hosts: &[Host],
    dest: &[(IpAddr, String)],
    dns: &impl Lookup,
) -> Check {
    let records = match dns.mx(name).await {
        Ok(r) => r,
        Err(e) => {
            return Check::fail(
                format!("MX of {name}: {e}"),
                "check the name servers (`dns:` in milter.yaml) and run doctor again".into(),
            )
        }
    };
    if records.is_empty() {
        return Check::fail(
            format!("{name} has no MX record"),
            format!("publish an MX record for {name} naming the server that receives its mail: this server ({instance}), or the destination"),
        );
    }
    if records.iter().any(|(_, host)| host.is_empty()) {
        return Check::fail(
            format!("{name} has a null MX record (RFC 7505): it accepts no mail"),
            format!(
                "replace it with an MX record naming this server ({instance}) or the destination"
            ),
        );
    }
    let mut parts = Vec::new();
    let mut unreachable = Vec::new();
    for (pref, host) in &records {
        match dns.ips(host).await {
            Ok(ips) if !ips.is_empty() => {
                let role = if ips.iter().any(|ip| this.contains(ip)) {
                    "this server"
                } else if ips.iter().any(|ip| dest.iter().any(|(d, _)| d == ip))
                    || hosts.iter().any(|h| h.name == *host)
                {
                    "the destination"
                } else {
                    "neither this server nor the destination"
                };
                parts.push(format!("{pref} {host} → {} ({role})", list(&ips)));
            }
            Ok(_) => {
                parts.push(format!("{pref} {host} (no A or AAAA record)"));
                unreachable.push(host.as_str());
            }
            Err(e) => {
                parts.push(format!("{pref} {host} ({e})"));
                unreachable.push(host.as_str());
            }
        }
    }
    let text = format!("MX of {name}: {}", parts.join("; "));
    if unreachable.is_empty() {
        Check::pass(text)
    } else {
        Check::fail(
            text,
            format!(
                "senders cannot reach {}: give it an A/AAAA record or remove the MX record",
                unreachable.join(", ")
            ),
        )
    }
}

/// `ip4:…`/`ip6:…` for an address.
fn mechanism(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("ip4:{a}"),
        IpAddr::V6(a) => format!("ip6:{a}"),
    }
}

async fn spf(
    name: &str,
    instance: &str,
    this: &[IpAddr],
    dest: &[(IpAddr, String)],
    dns: &(impl Lookup + SpfLookup),
) -> Vec<Check> {
    let all: Vec<IpAddr> = this
        .iter()
        .copied()
        .chain(dest.iter().map(|(ip, _)| *ip))
        .fold(Vec::new(), |mut v, ip| {
            if !v.contains(&ip) {
                v.push(ip);
            }
            v
        });
    let suggestion = || {
        let mechs: Vec<String> = all.iter().map(|&ip| mechanism(ip)).collect();
        format!("\"v=spf1 {} ~all\"", mechs.join(" "))
    };
    // The record itself first, so that a missing or doubled record is one
    // ✘, not one per address.
    let txt = match dns.txt(name).await {
        Ok(t) => t,
        Err(e) => {
            return vec![Check::fail(
                format!("SPF record of {name}: {e}"),
                "check the name servers of the domain, then run doctor again".into(),
            )]
        }
    };
    let record = match spf_trace::spf_records(&txt).as_slice() {
        [one] => one.to_string(),
        [] => {
            return vec![Check::fail(
                format!("{name} has no SPF record"),
                format!("publish the TXT record {} at {name}: receivers then accept mail from {name} sent by this server and by the destination", suggestion()),
            )]
        }
        more => {
            return vec![Check::fail(
                format!("SPF record of {name}: {} SPF records; there must be exactly one (RFC 7208 §4.5)", more.len()),
                "merge them into one TXT record".into(),
            )]
        }
    };
    // A record receivers cannot parse is a permerror for every address
    // (RFC 7208 §4.6): one ✘ naming the term, not one per address.
    if let Some(e) = spf_trace::syntax_error(&record) {
        return vec![Check::fail(
            format!("SPF record of {name} is broken: {e}"),
            format!("receivers treat every mail from {name} as a permerror until it is fixed (now \"{record}\")"),
        )];
    }
    let this_labelled: Vec<(IpAddr, String)> = this
        .iter()
        .map(|&ip| (ip, "this server".to_owned()))
        .collect();
    let roles = [
        (
            "this server",
            this_labelled.as_slice(),
            format!("mail this server routes to the destination keeps its sender's address, so the destination checks it against {name}'s SPF"),
        ),
        (
            "the destination",
            dest,
            format!("users of {name} whose mailbox is on the destination send their mail from there (for a hosted provider, add the include: it documents instead)"),
        ),
    ];
    let mut checks = Vec::new();
    for (role, ips, why) in roles {
        if ips.is_empty() {
            continue;
        }
        let mut passed = Vec::new();
        let mut missing: Vec<(IpAddr, &str, Verdict)> = Vec::new();
        for (ip, label) in ips {
            let v = check_host(dns, *ip, name, instance).await;
            if v.result == SpfResult::Pass {
                passed.push(format!("{ip} ({})", v.term.unwrap_or_default()));
            } else {
                missing.push((*ip, label, v));
            }
        }
        if missing.is_empty() {
            checks.push(Check::pass(format!(
                "SPF of {name} authorizes {role}: {}",
                passed.join(", ")
            )));
            continue;
        }
        let shown: Vec<String> = missing
            .iter()
            .map(|(ip, label, v)| match &v.term {
                Some(t) => format!("{ip} ({label}: {} by {t})", shown(v)),
                None => format!("{ip} ({label}: {})", shown(v)),
            })
            .collect();
        let text = format!("SPF of {name} does not authorize {}", shown.join(", "));
        let error = missing.iter().find_map(|(_, _, v)| match (&v.result, &v.error) {
            (SpfResult::Permerror, Some(e)) => Some(format!("the SPF record of {name} is broken ({e}); receivers treat that as an error: fix it")),
            (SpfResult::Temperror, Some(e)) => Some(format!("a DNS lookup failed ({e}): check the name servers and run doctor again")),
            _ => None,
        });
        let advice = error.unwrap_or_else(|| {
            let mechs: Vec<String> = missing.iter().map(|(ip, _, _)| mechanism(*ip)).collect();
            format!(
                "add {} to the SPF record of {name} (now \"{record}\"): {why}",
                mechs.join(" ")
            )
        });
        checks.push(Check::fail(text, advice));
    }
    let cost = spf_trace::cost(dns, name, instance).await;
    // An error the address checks above already show is one ✘, not two;
    // one they did not reach (a broken include after the terms that
    // matched) is only seen here.
    if cost.incomplete.is_none() || checks.iter().all(|c| c.ok) {
        checks.push(lookup_cost(name, &cost));
    }
    checks
}

/// `fail by -all`, `permerror (…)`.
fn shown(v: &Verdict) -> String {
    match &v.error {
        Some(e) => format!("{}: {e}", v.result),
        None => v.result.to_string(),
    }
}

/// The record's DNS-lookup count against the limit of RFC 7208 §4.6.4,
/// per include: the limit is what a second provider's include usually
/// breaks, and receivers then reject (permerror) mail they would accept.
fn lookup_cost(name: &str, cost: &Cost) -> Check {
    let total = cost.total();
    let parts: Vec<String> = cost.terms.iter().map(|(t, n)| format!("{t} {n}")).collect();
    let parts = if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join(", "))
    };
    if let Some(e) = &cost.incomplete {
        return Check::fail(
            format!("SPF of {name} ends in an error for addresses it does not list earlier ({e}), after {total} DNS lookups{parts}"),
            "receivers then answer permerror or temperror for mail sent from addresses listed after that point, and for forged mail: fix the record, then run doctor again".into(),
        );
    }
    if total <= MAX_LOOKUPS {
        Check::pass(format!(
            "SPF of {name} needs {total} of the {MAX_LOOKUPS} DNS lookups receivers allow (RFC 7208 §4.6.4){parts}"
        ))
    } else {
        Check::fail(
            format!("SPF of {name} needs {total} DNS lookups, more than the {MAX_LOOKUPS} receivers allow (RFC 7208 §4.6.4){parts}"),
            format!("receivers give up after {MAX_LOOKUPS} (permerror) and may reject mail from {name} sent by addresses listed after that: drop includes no longer used, or replace one with the ip4:/ip6: ranges it lists"),
        )
    }
}

async fn relay_check(relay: &str, dns: &impl Lookup) -> Check {
    // RFC 6761 §6.4: names under .invalid never exist, and resolvers (hickory
    // included) answer NXDOMAIN for them without asking a name server.
    if relay.ends_with(".invalid") {
        return Check::pass(format!(
            "relay domain {relay} does not resolve (.invalid never does, RFC 6761)"
        ));
    }
    let found = async {
        let mut found: Vec<String> = dns
            .mx(relay)
            .await?
            .into_iter()
            .map(|(p, h)| format!("MX {p} {h}"))
            .collect();
        found.extend(dns.ips(relay).await?.into_iter().map(|ip| ip.to_string()));
        Ok::<_, crate::dns::DnsError>(found)
    };
    match found.await {
        Ok(found) if found.is_empty() => Check::pass(format!("relay domain {relay} does not resolve")),
        Ok(found) => Check::fail(
            format!("relay domain {relay} resolves: {}", found.join(", ")),
            "if the MTA's transport for it is missing, routed mail goes to that host instead of the destination: use a relay_suffix under .invalid (the default, dualroute.invalid), which never resolves".into(),
        ),
        Err(e) => Check::fail(
            format!("relay domain {relay}: {e}"),
            "doctor cannot tell whether it resolves: check the name servers and run doctor again".into(),
        ),
    }
}
