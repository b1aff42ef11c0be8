//! Nothing panics on input from the network or a file: random bytes into
//! the RCPT parser, the decision and the message plan, and into the config
//! reader.

use dualroute::address::{Address, RcptArg};
use dualroute::decision::{decide_rcpt, Decision, Envelope};
use dualroute::holds::{Hold, Holds};
use dualroute::policy::Policy;
use dualroute::session::Message;
use dualroute::state::{Disabled, Tripped};
use proptest::prelude::*;
use std::sync::{Arc, OnceLock};

fn policy() -> Arc<Policy> {
    static P: OnceLock<Arc<Policy>> = OnceLock::new();
    P.get_or_init(|| {
        let text = "gateways: [192.0.2.25]\ndomains:\n  example.com:\n    mode: split\n    destination: { hosts: [\"[192.0.2.1]\"] }\n    accounts: [{ list: [a@example.com] }]\n    users:\n      c@example.com: { copy_to: x@y.example }\n";
        Arc::new(Policy::load(dualroute::config::parse(text, "t").unwrap()).unwrap())
    })
    .clone()
}

/// Strings shaped like RCPT arguments, to reach deeper than pure noise.
fn rcpt_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[<>@\"\\\\:,. a-zA-Z+=;]{0,40}",
        "<[a-zA-Z+\"\\\\ .]{0,10}@[a-zA-Z.\\-\u{e9}]{0,20}>( [A-Z]{1,6}=[a-z;@+]{0,10}){0,3}",
        "<@[a-z.]{0,8}(,@[a-z.]{0,8})*:[a-z]{0,5}@example\\.com>",
    ]
}

/// Every routing state a domain can be in.
fn hold_state() -> impl Strategy<Value = Option<Hold>> {
    prop_oneof![
        Just(None),
        Just(Some(Hold::Disabled(Disabled {
            since: 1,
            reason: "x".into()
        }))),
        Just(Some(Hold::Tripped(Tripped {
            since: 1,
            bounces: 3,
            deferrals: 0,
            cause: dualroute::state::TripCause::Bounces,
            window_secs: 60,
            last: "x".into(),
            recent: Vec::new(),
        }))),
        Just(Some(Hold::Verification {
            address: "p@y.example".into(),
            last: None
        })),
        Just(Some(Hold::Unreadable("x".into()))),
    ]
}

/// What the MTA may send as `{rcpt_addr}`: nothing, its parse of the
/// argument (here: ours), or anything at all.
fn mta_form(arg: &RcptArg, pick: u8, other: &str) -> Option<String> {
    match pick % 3 {
        0 => None,
        1 => arg.address.as_ref().map(ToString::to_string),
        _ => Some(other.to_owned()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// An `{rcpt_addr}` that is the argument's own mailbox text is decided
    /// without a second parse (src/decision.rs): the same verdict as the
    /// full comparison gives for another spelling of the same mailbox.
    #[test]
    fn the_mtas_own_text_decides_as_the_full_comparison(
        raw in rcpt_like(),
        gateway in any::<bool>(),
    ) {
        let arg = RcptArg::parse(&[raw.as_str()]);
        let Some(text) = arg.original_mailbox().filter(|_| arg.address.is_some()) else {
            return Ok(());
        };
        // The same mailbox spelt otherwise: the domain in capitals.
        let Some(at) = text.rfind('@') else { return Ok(()) };
        let other = format!("{}{}", &text[..=at], text[at + 1..].to_ascii_uppercase());
        prop_assume!(other != text);
        let envelope = Envelope {
            client: Some(if gateway { [192, 0, 2, 25] } else { [203, 0, 113, 9] }.into()),
            auth: None,
        };
        let (policy, holds) = (policy(), Holds::default());
        let shortcut = decide_rcpt(&policy, &holds, &envelope, &arg, Some(text));
        let full = decide_rcpt(&policy, &holds, &envelope, &arg, Some(&other));
        prop_assert_eq!(shortcut, full);
    }

    /// docs/design.md: every recipient ends kept (perhaps with copies),
    /// replaced by exactly one routing address, refused, or tempfailed —
    /// whatever the address and the routing state — and `explain` prints
    /// the milter's decision.
    #[test]
    fn every_recipient_has_one_fate_and_explain_agrees(
        raw in rcpt_like(),
        hold in hold_state(),
        pick in any::<u8>(),
        other in "[a-zA-Z@.\"<>]{0,20}",
        gateway in any::<bool>(),
    ) {
        let policy = policy();
        let mut holds = Holds::default();
        if let Some(h) = hold {
            holds.insert("example.com", h);
        }
        let envelope = Envelope {
            client: Some(if gateway { [192, 0, 2, 25] } else { [203, 0, 113, 9] }.into()),
            auth: None,
        };
        let arg = RcptArg::parse(&[raw.as_str()]);
        let mta = mta_form(&arg, pick, &other);
        let v = decide_rcpt(&policy, &holds, &envelope, &arg, mta.as_deref());
        match &v.decision {
            Decision::Reject(r) => prop_assert!(r.code.starts_with('5') && r.xcode.starts_with('5')),
            Decision::Tempfail(r) => prop_assert!(r.code.starts_with('4') && r.xcode.starts_with('4')),
            Decision::Redirect(to) => prop_assert!(to.to.contains('@')),
            Decision::Copy(to) => prop_assert!(!to.is_empty()),
            Decision::Keep => {}
        }
        // Routing off or a gateway never routes.
        if holds.get("example.com").is_some() || gateway {
            prop_assert!(!matches!(v.decision, Decision::Copy(_) | Decision::Redirect(_)), "{:?}", v);
        }
        // The milter's plan: a redirect deletes the argument as received
        // and adds exactly one address; nothing else is deleted.
        let mut m = Message::new(policy.clone(), Default::default(), envelope.clone(), "<s@x>".into());
        if holds.get("example.com").is_none() {
            m.rcpt(arg.clone(), mta.as_deref());
            let plan = m.plan();
            match &v.decision {
                Decision::Redirect(to) => {
                    prop_assert!(plan.delete.contains(&arg.raw));
                    prop_assert_eq!(&plan.add.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(), &vec![format!("<{}>", to.to)]);
                }
                _ => prop_assert!(plan.delete.is_empty()),
            }
        }
        // explain takes what an admin types and has no MTA parse: it agrees
        // whenever the MTA's parse is ours or absent.
        if pick % 3 != 2 && !raw.trim().is_empty() && raw.trim().starts_with('<') && !raw.contains('\0') {
            let line = dualroute::explain::explain(&policy, &holds, &envelope, &raw);
            let decision = v.decision.to_string();
            prop_assert!(
                line.starts_with(&format!("{}: {decision} — ", raw.trim())),
                "explain {:?} vs milter {:?}", line, decision
            );
        }
    }

    #[test]
    fn rcpt_parsing_and_planning_never_panics(args in proptest::collection::vec(rcpt_like(), 0..4), hdr in any::<String>()) {
        let arg = RcptArg::parse(&args);
        // What is parsed must round-trip through the parser.
        if let Some(a) = &arg.address {
            prop_assert!(!a.local.is_empty());
            let again = Address::parse(&a.to_string()).ok();
            prop_assert_eq!(again.as_ref(), Some(a));
        }
        let _ = arg.original_mailbox();
        let mut m = Message::new(policy(), Default::default(), Envelope::default(), "<s@x>".into());
        m.rcpt(arg.clone(), None);
        m.header("X-Dualroute", &hdr);
        let plan = m.plan();
        // Every delete names the RCPT argument exactly as received, or (for
        // a source route, which Postfix drops) its bare path.
        let bare = arg.original_mailbox().map(|m| format!("<{m}>"));
        for d in &plan.delete {
            prop_assert!(d == &arg.raw || Some(d) == bare.as_ref(), "{} vs {}", d, arg.raw);
        }
        let _ = m.summary();
    }

    #[test]
    fn config_reader_never_panics(text in any::<String>()) {
        let _ = dualroute::config::parse(&text, "fuzz.yaml");
    }

    #[test]
    fn config_reader_never_panics_on_near_misses(
        mode in "[a-z]{0,6}",
        addr in "[a-z@.\\[\\]0-9:]{0,20}",
        net in "[0-9./:a-f]{0,20}",
    ) {
        let text = format!(
            "gateways: [\"{net}\"]\ndomains:\n  example.com:\n    mode: {mode}\n    destination: {{ hosts: [\"{addr}\"] }}\n    accounts: [{{ list: [\"{addr}\"] }}]\n"
        );
        if let Err(e) = dualroute::config::parse(&text, "fuzz.yaml") {
            prop_assert!(e.to_string().starts_with("fuzz.yaml:"), "{}", e);
            prop_assert!(e.line.is_some(), "no position: {}", e);
        }
    }
}
