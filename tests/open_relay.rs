//! dualroute is never an open relay: for any configuration proptest
//! generates and any recipient string, the recipients the milter adds are
//! only `local@<managed domain>.<relay_suffix>`, `local@<change_envelope
//! destination>`, or a configured `copy_to`/`redirect_to` target — never a
//! domain taken from the input (README "Where routed mail goes").
//!
//! The configuration goes through the real loader (`config::parse`,
//! `Policy::load`) and each recipient through the milter's own path:
//! `Message::rcpt` (which calls `decision::decide_rcpt`) and
//! `Message::plan`, whose additions `milter.rs` sends to the MTA as they
//! are. What is allowed is worked out here from the generated parameters,
//! not from the loaded policy.

use dualroute::address::RcptArg;
use dualroute::decision::Envelope;
use dualroute::policy::Policy;
use dualroute::session::Message;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::Arc;

const NAMES: [&str; 5] = ["a.test", "b.example", "c.test", "mail.d.test", "e.test"];
const LOCALS: [&str; 6] = ["alice", "bob", "carol", "dave", "x.y", "zed"];

#[derive(Clone, Debug)]
enum Dest {
    Hosts,
    Domain(String),
    Envelope(String),
}

#[derive(Clone, Debug)]
enum Rule {
    Copy(Vec<String>),
    Redirect(String),
    Keep,
}

#[derive(Clone, Debug)]
struct DomainSpec {
    name: String,
    mode: &'static str,
    enabled: bool,
    require_gateway: bool,
    dest: Dest,
    accounts: Option<Vec<String>>,
    users: Vec<(String, Rule)>,
}

#[derive(Clone, Debug)]
struct Spec {
    relay_suffix: String,
    delimiter: &'static str,
    sensitive: bool,
    domains: Vec<DomainSpec>,
}

/// An address outside every managed name: a target or a destination.
fn outside_domain() -> impl Strategy<Value = String> {
    "[a-z]{1,8}\\.(net|org|example)"
}

fn target() -> impl Strategy<Value = String> {
    ("[a-z][a-z0-9.+_-]{0,8}", outside_domain()).prop_map(|(l, d)| format!("{l}@{d}"))
}

fn rule() -> impl Strategy<Value = Rule> {
    prop_oneof![
        proptest::collection::vec(target(), 1..3).prop_map(Rule::Copy),
        target().prop_map(Rule::Redirect),
        Just(Rule::Keep),
    ]
}

fn domain(name: &'static str) -> impl Strategy<Value = DomainSpec> {
    (
        prop::sample::select(vec!["split", "dual", "route"]),
        (prop::bool::weighted(0.8), any::<bool>()),
        prop_oneof![
            Just(Dest::Hosts),
            outside_domain().prop_map(Dest::Domain),
            outside_domain().prop_map(Dest::Envelope),
        ],
        proptest::option::of(proptest::collection::vec(
            prop::sample::select(LOCALS.to_vec()),
            1..4,
        )),
        proptest::collection::vec((prop::sample::select(LOCALS.to_vec()), rule()), 0..3),
    )
        .prop_map(
            move |(mode, (enabled, require_gateway), dest, accounts, users)| {
                // split needs accounts.
                let mut accounts: Option<Vec<String>> = match (mode, accounts) {
                    ("split", None) => Some(vec!["alice".to_owned()]),
                    (_, a) => a.map(|v| v.into_iter().map(str::to_owned).collect()),
                };
                // keep: true in a split or route domain needs a mailbox
                // here (issue 21 §3: else it is a load error).
                if mode != "dual" {
                    for (l, r) in &users {
                        if matches!(r, Rule::Keep) {
                            accounts.get_or_insert_with(Vec::new).push(l.to_string());
                        }
                    }
                }
                DomainSpec {
                    name: name.to_owned(),
                    mode,
                    enabled,
                    require_gateway,
                    dest,
                    accounts,
                    users: users.into_iter().map(|(l, r)| (l.to_owned(), r)).collect(),
                }
            },
        )
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::sample::select(vec!["dualroute.invalid", "relay.example", "x.invalid"]),
        prop::sample::select(vec!["+", "", "+-"]),
        any::<bool>(),
        prop::sample::subsequence(NAMES.to_vec(), 1..=NAMES.len()),
    )
        .prop_flat_map(|(suffix, delimiter, sensitive, names)| {
            let domains: Vec<_> = names.into_iter().map(domain).collect();
            domains.prop_map(move |domains| Spec {
                relay_suffix: suffix.to_owned(),
                delimiter,
                sensitive,
                domains,
            })
        })
}

impl Spec {
    fn yaml(&self) -> String {
        let mut y = format!(
            "instance: relay.test\nrelay_suffix: {}\nrecipient_delimiter: \"{}\"\nlocal_part_case: {}\ngateways: [192.0.2.25]\nstate_dir: /nonexistent/dualroute-open-relay\ndomains:\n",
            self.relay_suffix,
            self.delimiter,
            if self.sensitive { "sensitive" } else { "insensitive" }
        );
        for d in &self.domains {
            y += &format!(
                "  {}:\n    mode: {}\n    enabled: {}\n    require_gateway: {}\n",
                d.name, d.mode, d.enabled, d.require_gateway
            );
            y += &match &d.dest {
                Dest::Hosts => "    destination: { hosts: [\"[192.0.2.1]\"] }\n".to_owned(),
                Dest::Domain(x) => format!("    destination: {{ domain: {x} }}\n"),
                Dest::Envelope(x) => {
                    format!("    destination: {{ domain: {x}, change_envelope: true }}\n")
                }
            };
            if let Some(accounts) = &d.accounts {
                let list: Vec<String> =
                    accounts.iter().map(|l| format!("{l}@{}", d.name)).collect();
                y += &format!("    accounts: [{{ list: [{}] }}]\n", list.join(", "));
            }
            if !d.users.is_empty() {
                y += "    users:\n";
                for (local, rule) in &d.users {
                    let r = match rule {
                        Rule::Copy(t) => format!("{{ copy_to: [{}] }}", t.join(", ")),
                        Rule::Redirect(t) => format!("{{ redirect_to: {t} }}"),
                        Rule::Keep => "{ keep: true }".to_owned(),
                    };
                    y += &format!("      {local}@{}: {r}\n", d.name);
                }
            }
        }
        y
    }

    /// Where added recipients may go: domains, and whole addresses.
    fn allowed(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut domains = BTreeSet::new();
        let mut targets = BTreeSet::new();
        for d in &self.domains {
            domains.insert(format!("{}.{}", d.name, self.relay_suffix));
            if let Dest::Envelope(x) = &d.dest {
                domains.insert(x.clone());
            }
            for (_, rule) in &d.users {
                match rule {
                    Rule::Copy(t) => targets.extend(t.iter().cloned()),
                    Rule::Redirect(t) => {
                        targets.insert(t.clone());
                    }
                    Rule::Keep => {}
                }
            }
        }
        (domains, targets)
    }
}

/// RCPT arguments: noise, and addresses in and around the generated
/// domains, with the tricks a relay abuser tries (source routes, quoted
/// '@', '%' hacks, a second '@', brackets, a trailing dot, case).
fn recipient() -> impl Strategy<Value = Vec<String>> {
    let name = prop::sample::select(NAMES.to_vec());
    let local = prop_oneof![
        prop::sample::select(LOCALS.to_vec()).prop_map(str::to_owned),
        "[a-zA-Z0-9.+%!\"@\\\\ -]{0,12}",
        "\"[a-z@>< ]{0,8}\"",
        prop::sample::select(LOCALS.to_vec()).prop_map(|l| format!("{l}+tag")),
    ];
    let path = (
        local,
        name,
        prop_oneof![
            Just(String::new()),
            Just(".".to_owned()),
            outside_domain().prop_map(|d| format!("@{d}")),
            outside_domain().prop_map(|d| format!("%{d}")),
            Just(">".to_owned()),
        ],
        prop_oneof![
            Just(String::new()),
            outside_domain().prop_map(|d| format!("@{d}:")),
        ],
        any::<bool>(),
    )
        .prop_map(|(l, d, tail, route, upper)| {
            let d = if upper {
                d.to_uppercase()
            } else {
                d.to_owned()
            };
            format!("<{route}{l}@{d}{tail}>")
        });
    let params = proptest::collection::vec(
        prop_oneof![
            Just("NOTIFY=NEVER".to_owned()),
            Just("NOTIFY=SUCCESS,FAILURE".to_owned()),
            "ORCPT=rfc822;[a-z@.+]{1,12}",
            "[A-Z]{1,6}=[a-z@.]{0,8}",
        ],
        0..3,
    );
    (prop_oneof![3 => path, 1 => any::<String>()], params).prop_map(|(p, mut params)| {
        params.insert(0, p);
        params
    })
}

/// What the MTA may send as `{rcpt_addr}`.
fn mta_form() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(String::new())),
        "[a-z]{1,5}@[a-z.]{1,12}".prop_map(Some),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn added_recipients_only_go_where_the_configuration_says(
        spec in spec(),
        rcpts in proptest::collection::vec((recipient(), mta_form(), any::<bool>()), 1..6),
        gateway in any::<bool>(),
        auth in any::<bool>(),
        loop_header in any::<bool>(),
    ) {
        let yaml = spec.yaml();
        // Some generated configurations are refused: a target that is the
        // user itself (parse), or, once the accounts are known, a target
        // with a rule of its own or a dual target without a mailbox here
        // (issue 21 §3, tests/config_errors.rs). Those never run.
        let Ok(config) = dualroute::config::parse(&yaml, "open-relay.yaml") else {
            return Ok(());
        };
        let Ok(policy) = Policy::load(config) else {
            return Ok(());
        };
        let policy = Arc::new(policy);
        let (domains, targets) = spec.allowed();
        let envelope = Envelope {
            client: Some(if gateway { [192, 0, 2, 25] } else { [203, 0, 113, 9] }.into()),
            auth: auth.then(|| "user".to_owned()),
        };
        let mut message = Message::new(policy.clone(), Default::default(), envelope, "<s@outside.example>".into());
        for (args, mta, own_parse) in &rcpts {
            let arg = RcptArg::parse(args);
            // The MTA's parse: none, its own idea, or the same as ours.
            let mta = if *own_parse { arg.address.as_ref().map(ToString::to_string) } else { mta.clone() };
            message.rcpt(arg, mta.as_deref());
        }
        if loop_header {
            message.header("X-Dualroute", "relay.test");
        }
        let plan = message.plan();
        for (path, args) in &plan.add {
            let address = path.strip_prefix('<').and_then(|p| p.strip_suffix('>'))
                .ok_or_else(|| TestCaseError::fail(format!("{path}: not a path")))?;
            let (local, domain) = address.rsplit_once('@')
                .ok_or_else(|| TestCaseError::fail(format!("{path}: no '@'")))?;
            prop_assert!(!local.is_empty(), "{}", path);
            prop_assert!(
                domains.contains(domain) || targets.contains(address),
                "{} added (args {}) for {:?}: allowed domains {:?}, targets {:?}\n{}",
                path, args, rcpts, domains, targets, yaml
            );
            // The MTA reads the path with that same domain: a local part
            // cannot carry another one in.
            let reread = RcptArg::parse(&[path.as_str()]).address;
            prop_assert_eq!(reread.map(|a| a.domain), Some(domain.to_owned()), "{}", path);
            // And the ESMTP arguments cannot add a recipient either.
            for p in args.split(' ') {
                prop_assert!(p.starts_with("ORCPT=") || p.starts_with("NOTIFY="), "{}", args);
                prop_assert!(!p.contains(['\r', '\n', '\0']), "{}", args);
            }
        }
        // A deleted recipient is one the client gave.
        for d in &plan.delete {
            prop_assert!(
                rcpts.iter().any(|(args, _, _)| {
                    let raw = RcptArg::parse(args).raw;
                    raw == *d || raw.ends_with(d.trim_start_matches('<'))
                }),
                "deleted {} of {:?}", d, rcpts
            );
        }
        // A gateway's mail and a looping message are never routed.
        if gateway || loop_header {
            prop_assert!(plan.add.is_empty(), "{:?}", plan);
        }
    }
}
