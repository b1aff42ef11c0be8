//! `dualroute explain` says what the milter does (STYLE.md: both call the
//! same decision function). For every address of a list that covers every
//! rule of docs/design.md §2, under several clients, this compares the library's
//! `explain`, the `dualroute explain` command and what the milter actually
//! does over the protocol:
//!
//! | explain says     | the milter                                     |
//! |------------------|------------------------------------------------|
//! | keep             | accepts the RCPT, no action at all             |
//! | copy to X, Y     | adds `<X>` and `<Y>`, deletes nothing          |
//! | redirect to X    | deletes the RCPT argument, adds `<X>`          |
//! | … and copy to Y  | … and adds `<Y>` (a target in a dual domain)   |
//! | reject C X text  | refuses the RCPT with `C X text`               |

mod support;
use support::protocol;

use dualroute::address::RcptArg;
use dualroute::config::Mode;
use dualroute::decision::{decide_rcpt, Envelope, Off, OffEffect, Rule};
use dualroute::explain::explain;
use dualroute::holds::Holds;
use indymilter_test::{EomAction, Status};
use protocol::*;
use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, process::Command};

const CONFIG: &str = include_str!("explain_matches_milter.yaml");
const INSTANCE: &str = "mx1.dualroute.test";

/// Addresses as an administrator would type them after `dualroute explain`.
const ADDRESSES: &[&str] = &[
    "<>",
    "someone@elsewhere.example",
    "alice@off.test",
    "alice@split.test",
    "ALICE@Split.TEST",
    "bob+news@split.test",
    "Zed@Split.TEST",
    "zed+tag@split.test",
    "\"john doe\"@split.test",
    "carol@split.test",
    "dave@split.test",
    "Dave+x@split.test",
    "frank@split.test",
    "gus@split.test",
    "hank@split.test",
    "ida@split.test",
    "jane@split.test",
    "alice@dual.test",
    "nobody@dual.test",
    "anyone@open.test",
    "alice@route.test",
    "zed@route.test",
    "erin@route.test",
    "zed@envelope.test",
    "alice@locked.test",
    "zed@locked.test",
];

/// What happens to one recipient, as explain tells it or as the milter does it.
#[derive(Clone, Debug, Eq, PartialEq)]
enum Fate {
    Keep,
    Copy(BTreeSet<String>),
    /// The target, and its dual copy when it has one.
    Redirect(BTreeSet<String>),
    /// The full reply: code, enhanced code, text.
    Reject(String),
    /// A 4xx refusal at RCPT, with its full reply.
    Tempfail(String),
}

/// The decision part of an explain line: `INPUT: DECISION — RULE[ (note)]`.
fn explained_fate(input: &str, line: &str) -> Fate {
    let rest = line
        .strip_prefix(input)
        .and_then(|r| r.strip_prefix(": "))
        .unwrap_or_else(|| panic!("explain line does not start with {input:?}: {line:?}"));
    let (decision, _rule) = rest
        .split_once(" — ")
        .unwrap_or_else(|| panic!("explain line has no ' — RULE': {line:?}"));
    if decision == "keep" {
        Fate::Keep
    } else if let Some(to) = decision.strip_prefix("copy to ") {
        Fate::Copy(to.split(", ").map(str::to_owned).collect())
    } else if let Some(to) = decision.strip_prefix("redirect to ") {
        Fate::Redirect(to.split(" and copy to ").map(str::to_owned).collect())
    } else if let Some(reply) = decision.strip_prefix("reject ") {
        Fate::Reject(reply.to_owned())
    } else if let Some(reply) = decision.strip_prefix("tempfail ") {
        Fate::Tempfail(reply.to_owned())
    } else {
        panic!("unknown decision in explain line {line:?}")
    }
}

fn unbracket(path: &str) -> String {
    path.strip_prefix('<')
        .and_then(|p| p.strip_suffix('>'))
        .unwrap_or(path)
        .to_owned()
}

/// What the milter did with a one-recipient message whose RCPT was `raw`.
fn milter_fate(raw: &str, d: &Delivery) -> Fate {
    if let Status::Reject { .. } = d.status() {
        assert_actions(&d.actions, &[]);
        return Fate::Reject(rejection(d.status()));
    }
    if let Status::Tempfail { message } = d.status() {
        assert_actions(&d.actions, &[]);
        let reply = message.as_ref().map(|m| m.to_string_lossy().into_owned());
        return Fate::Tempfail(reply.unwrap_or_default());
    }
    assert_eq!(d.status(), &Status::Continue, "RCPT {raw}");
    assert_eq!(d.eom, Status::Continue, "end of message for {raw}");
    let deletes = deleted(&d.actions);
    let adds: BTreeSet<String> = added(&d.actions).iter().map(|p| unbracket(p)).collect();
    let headers = d
        .actions
        .iter()
        .filter(|a| matches!(a, EomAction::AddHeader { .. }))
        .count();
    let fate = if deletes.is_empty() && adds.is_empty() {
        Fate::Keep
    } else if deletes == BTreeSet::from([raw.to_owned()]) && !adds.is_empty() {
        Fate::Redirect(adds)
    } else if deletes.is_empty() {
        Fate::Copy(adds)
    } else {
        panic!("RCPT {raw}: actions fit no decision: {:?}", d.actions)
    };
    // The loop header goes with routing, once; a kept recipient gets none.
    let want_header = if fate == Fate::Keep { 0 } else { 1 };
    assert_eq!(headers, want_header, "RCPT {raw}: {:?}", d.actions);
    if want_header == 1 {
        assert!(
            d.actions.contains(&header(INSTANCE)),
            "RCPT {raw}: {:?}",
            d.actions
        );
    }
    fate
}

/// The RCPT argument an MTA hands over for an address typed to explain.
fn rcpt_arg(input: &str) -> String {
    if input.starts_with('<') {
        input.to_owned()
    } else {
        format!("<{input}>")
    }
}

fn config_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/explain_matches_milter.yaml")
}

/// `dualroute --config … explain ADDR… [--client IP] [--auth USER]`, one
/// line per address.
fn explain_command(client: Option<IpAddr>, auth: Option<&str>) -> Vec<String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dualroute"));
    cmd.arg("--config")
        .arg(config_path())
        .arg("explain")
        .args(ADDRESSES);
    if let Some(ip) = client {
        cmd.arg("--client").arg(ip.to_string());
    }
    if let Some(user) = auth {
        cmd.arg("--auth").arg(user);
    }
    let out = cmd.output().expect("run dualroute explain");
    assert!(
        out.status.success(),
        "dualroute explain failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("explain prints UTF-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// For one client/authentication: the library, the command and the milter
/// agree on every address.
async fn compare(explain_client: Option<IpAddr>, milter_client: IpAddr, auth: Option<&str>) {
    let policy = policy(CONFIG);
    let envelope = Envelope {
        client: explain_client,
        auth: auth.map(str::to_owned),
    };
    let lines = explain_command(explain_client, auth);
    assert_eq!(
        lines.len(),
        ADDRESSES.len(),
        "one line per address: {lines:#?}"
    );

    let milter = Milter::start(CONFIG).await;
    for (input, command_line) in ADDRESSES.iter().zip(&lines) {
        let library_line = explain(&policy, &Holds::read(&policy.config).0, &envelope, input);
        assert_eq!(
            command_line, &library_line,
            "`dualroute explain` and explain() differ for {input}"
        );

        let raw = rcpt_arg(input);
        let d = milter.deliver(milter_client, auth, &[&[&raw]]).await;
        assert_eq!(
            milter_fate(&raw, &d),
            explained_fate(input, &library_line),
            "client {milter_client}, auth {auth:?}: explain says {library_line:?}, the milter did {:?} {:?}",
            d.rcpt,
            d.actions,
        );
    }
    milter.shutdown().await;
}

#[tokio::test]
async fn ordinary_client() {
    compare(Some(CLIENT), CLIENT, None).await;
}

#[tokio::test]
async fn no_client_given_means_an_ordinary_client() {
    compare(None, CLIENT, None).await;
}

#[tokio::test]
async fn gateway_client() {
    compare(Some(GATEWAY), GATEWAY, None).await;
    let v6: IpAddr = "2001:db8::25".parse().unwrap();
    compare(Some(v6), v6, None).await;
}

#[tokio::test]
async fn authenticated_client() {
    compare(Some(CLIENT), CLIENT, Some("alice@locked.test")).await;
}

/// The address list really covers every rule: otherwise the comparison
/// above would prove less than it claims.
#[test]
fn addresses_cover_every_rule() {
    let policy = policy(CONFIG);
    let envelopes = [
        Envelope {
            client: Some(CLIENT),
            auth: None,
        },
        Envelope {
            client: Some(GATEWAY),
            auth: None,
        },
        Envelope {
            client: Some(CLIENT),
            auth: Some("alice@locked.test".into()),
        },
    ];
    let mut seen = Vec::new();
    for envelope in &envelopes {
        for input in ADDRESSES {
            let arg = RcptArg::parse(&[rcpt_arg(input)]);
            let rule = decide_rcpt(
                &policy,
                &Holds::read(&policy.config).0,
                envelope,
                &arg,
                None,
            )
            .rule;
            if !seen.contains(&rule) {
                seen.push(rule);
            }
        }
    }
    let mode = |mode, present, has_accounts| Rule::Mode {
        mode,
        present,
        has_accounts,
    };
    let every = [
        Rule::NotAnAddress,
        Rule::NotManaged,
        Rule::Off {
            why: Off::Config,
            effect: OffEffect::Paused,
        },
        Rule::Gateway { present: true },
        Rule::Gateway { present: false },
        Rule::RequireGateway,
        Rule::User("keep"),
        Rule::User("copy_to"),
        Rule::User("redirect_to"),
        // Targets in managed domains: routed, a mailbox of a dual domain
        // (with its copy), routing off for the target's domain.
        Rule::UserTarget {
            kind: "redirect_to",
            targets: vec!["zed@split.test: mode split of split.test, no mailbox here: routed to the destination".into()],
        },
        Rule::UserTarget {
            kind: "redirect_to",
            targets: vec!["alice@dual.test: has a mailbox here, and mode dual of dual.test copies it to the destination".into()],
        },
        Rule::UserTarget {
            kind: "copy_to",
            targets: vec![
                "zed@route.test: mode route of route.test: routed to the destination".into(),
                "bob@split.test: has a mailbox here".into(),
            ],
        },
        Rule::UserTarget {
            kind: "redirect_to",
            targets: vec!["zed@off.test: would be routed, and routing off for off.test (the domain has enabled: false): refused for now, the sender retries until routing resumes".into()],
        },
        mode(Mode::Split, true, true),
        mode(Mode::Split, false, true),
        mode(Mode::Dual, true, true),
        mode(Mode::Dual, false, true),
        mode(Mode::Dual, true, false),
        mode(Mode::Route, true, true),
        mode(Mode::Route, false, true),
        mode(Mode::Route, false, false),
    ];
    for rule in every {
        assert!(
            seen.contains(&rule),
            "no address in the list is decided by {rule:?}"
        );
    }
}

/// Odd RCPT forms with `{rcpt_addr}` as real Postfix 3.7 sends it
/// (checked through tests/postfix_e2e.rs; docs/design.md §8): explain (which has
/// no MTA) and the milter (which checks its parse against the MTA's) agree
/// on every one, from an ordinary client and under `require_gateway`.
#[tokio::test]
async fn odd_forms_agree_with_the_mtas_parse() {
    let policy = policy(CONFIG);
    let forms: &[(&str, &str)] = &[
        ("<alice@split.test@>", "alice@split.test"),
        ("<<alice@split.test>>", "alice@split.test"),
        ("alice@split.test>", "alice@split.test"),
        ("<zed@split.test@>", "zed@split.test"),
        ("<@relay.example:alice@split.test>", "alice@split.test"),
        ("<\"alice\"@split.test>", "alice@split.test"),
        ("<ALICE@SPLIT.TEST.>", "alice@split.test"),
        ("<@split.test>", "\"\"@split.test"),
        ("<\"a>b\"@split.test>", "\"a>b\"@split.test"),
        ("<\"john doe\"@split.test>", "\"john doe\"@split.test"),
        (
            "<zed%other.example@split.test>",
            "zed%other.example@split.test",
        ),
        ("<zoë@split.test>", "zoë@split.test"),
        ("<alice@locked.test@>", "alice@locked.test"),
        ("<<alice@locked.test>>", "alice@locked.test"),
        ("<\"alice\"@locked.test>", "alice@locked.test"),
        ("<@locked.test>", "\"\"@locked.test"),
        ("<>", ""),
        ("<postmaster>", "postmaster"),
        ("<alice@elsewhere.example@>", "alice@elsewhere.example"),
    ];
    let long = format!("<{}@split.test>", "x".repeat(300));
    let long_parsed = format!("{}@split.test", "x".repeat(300));
    let milter = Milter::start(CONFIG).await;
    let envelope = Envelope {
        client: Some(CLIENT),
        auth: None,
    };
    for (raw, parsed) in forms
        .iter()
        .copied()
        .chain([(long.as_str(), long_parsed.as_str())])
    {
        let line = explain(&policy, &Holds::read(&policy.config).0, &envelope, raw);
        let mut session = milter.session(CLIENT).await;
        session.mail(None).await;
        let status = session.rcpt_as_parsed(&[raw], parsed).await;
        let d = if matches!(status, Status::Continue) {
            session.data(&[]).await;
            let (actions, eom) = session.eom().await;
            Delivery {
                rcpt: vec![status],
                actions,
                eom,
            }
        } else {
            session.abort().await;
            Delivery {
                rcpt: vec![status],
                actions: Vec::new(),
                eom: Status::Continue,
            }
        };
        session.close().await;
        assert_eq!(
            milter_fate(raw, &d),
            explained_fate(raw, &line),
            "{raw} (MTA: {parsed}): explain says {line:?}, the milter did {:?} {:?}",
            d.rcpt,
            d.actions
        );
    }
    milter.shutdown().await;
}
