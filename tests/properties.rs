//! Nothing panics on input from the network or a file: random bytes into
//! the RCPT parser, the decision and the message plan, and into the config
//! reader.

use dualroute::address::{Address, RcptArg};
use dualroute::decision::Envelope;
use dualroute::policy::Policy;
use dualroute::session::Message;
use proptest::prelude::*;
use std::sync::{Arc, OnceLock};

fn policy() -> Arc<Policy> {
    static P: OnceLock<Arc<Policy>> = OnceLock::new();
    P.get_or_init(|| {
        let text = "domains:\n  example.com:\n    mode: split\n    destination: { hosts: [\"[192.0.2.1]\"] }\n    accounts: [{ list: [a@example.com] }]\n    users:\n      c@example.com: { copy_to: x@y.example }\n";
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

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
        let mut m = Message::new(policy(), Envelope::default(), "<s@x>".into());
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
