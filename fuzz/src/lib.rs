//! What the fuzz targets share: one policy with every kind of domain and
//! per-user rule, and the properties every routing decision must have,
//! checked against the configuration (not against the code that routes).

use dualroute::address::RcptArg;
use dualroute::config::{Config, Destination, UserRule};
use dualroute::policy::Policy;
use std::sync::{Arc, OnceLock};

/// A split domain with per-user copy/redirect/keep rules, a dual domain
/// whose destination changes the envelope, a route domain that only
/// gateways may use, and an IDN domain.
pub const CONFIG: &str = r#"instance: fuzz.test
relay_suffix: dualroute.invalid
gateways: [192.0.2.25]
state_dir: /nonexistent/dualroute-fuzz
domains:
  split.test:
    mode: split
    destination: { hosts: ["[192.0.2.1]"] }
    accounts: [{ list: [alice@split.test, '"j d"@split.test', bob@split.test, erin@split.test] }]
    users:
      carol@split.test: { copy_to: [carol@copy.example, c2@copy2.example] }
      dave@split.test: { redirect_to: dave@legacy.example }
      erin@split.test: { keep: true }
  dual.test:
    mode: dual
    bounce: true
    destination: { domain: dual.test.google.example, change_envelope: true }
    accounts: [{ list: [a@dual.test, b@dual.test] }]
  route.test:
    mode: route
    require_gateway: true
    destination: { domain: route.example }
  bücher.test:
    mode: split
    destination: { hosts: ["[192.0.2.2]"] }
    accounts: [{ list: [anna@bücher.test] }]
"#;

/// Loads the policy of [`CONFIG`].
pub fn load_policy() -> Policy {
    let config = dualroute::config::parse(CONFIG, "fuzz.yaml")
        .unwrap_or_else(|e| panic!("fuzz config: {e}"));
    Policy::load(config).unwrap_or_else(|e| panic!("fuzz accounts: {e}"))
}

/// The policy of [`CONFIG`], loaded once per process.
pub fn policy() -> Arc<Policy> {
    static P: OnceLock<Arc<Policy>> = OnceLock::new();
    P.get_or_init(|| Arc::new(load_policy())).clone()
}

/// Checks that `address` (no angle brackets), added by the milter, can
/// only reach a place the configuration names: `local@<managed
/// domain>.<relay_suffix>`, `local@<change_envelope destination>`, or a
/// `copy_to`/`redirect_to` target; and that the MTA reads it with that
/// domain (a local part cannot smuggle in another one).
pub fn check_routing_address(config: &Config, address: &str) -> Result<(), String> {
    let target = |a: &dualroute::address::Address| a.to_string();
    let is_target = config.domains.values().any(|d| {
        d.users.iter().any(|(_, rule)| match rule {
            UserRule::CopyTo(list) => list.iter().any(|t| target(t) == address),
            UserRule::RedirectTo(t) => target(t) == address,
            UserRule::Keep => false,
        })
    });
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(format!("{address:?}: no '@'"));
    };
    let relay = config
        .domains
        .keys()
        .any(|d| domain == format!("{}.{}", d.0, config.relay_suffix.0));
    let envelope = config.domains.values().any(|d| {
        matches!(&d.destination, Destination::Domain { domain: dest, change_envelope: true } if dest.0 == domain)
    });
    if !(is_target || relay || envelope) {
        return Err(format!(
            "{address:?}: not a relay address, an envelope destination or a configured target"
        ));
    }
    if local.is_empty() {
        return Err(format!("{address:?}: empty local part"));
    }
    // As the MTA will read the path: the same domain.
    let parsed = RcptArg::parse(&[format!("<{address}>")]);
    match parsed.address {
        Some(a) if a.domain == domain.to_ascii_lowercase() => Ok(()),
        other => Err(format!("{address:?} reads back as {other:?}")),
    }
}

/// Checks the ESMTP arguments of an added recipient: exactly one ORCPT,
/// at most one NOTIFY, nothing else, no whitespace inside a value.
pub fn check_esmtp_args(args: &str) -> Result<(), String> {
    let mut orcpt = 0;
    let mut notify = 0;
    for p in args.split(' ') {
        let upper = p.to_ascii_uppercase();
        if upper.starts_with("ORCPT=") {
            orcpt += 1;
        } else if upper.starts_with("NOTIFY=") {
            notify += 1;
        } else {
            return Err(format!("{args:?}: unexpected parameter {p:?}"));
        }
        // The MTA splits the arguments on whitespace.
        if p.is_empty() || p.contains(['\t', '\r', '\n', '\x0c']) {
            return Err(format!("{args:?}: empty, or whitespace in {p:?}"));
        }
    }
    if orcpt != 1 || notify > 1 {
        return Err(format!("{args:?}: {orcpt} ORCPT, {notify} NOTIFY"));
    }
    Ok(())
}
