//! The RCPT argument parser and address normaliser (src/address.rs), and
//! the decision and end-of-message plan made on what they parse.
//!
//! Input: the RCPT arguments as the MTA hands them over, NUL-separated
//! (path first, then ESMTP parameters).
#![no_main]

use dualroute::address::{normalize_domain, xtext, RcptArg};
use dualroute::decision::{decide_rcpt, Decision, Envelope};
use dualroute::holds::Holds;
use dualroute::session::Message;
use dualroute_fuzz::{check_esmtp_args, check_routing_address, policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let args: Vec<&str> = text.split('\0').collect();
    let arg = RcptArg::parse(&args);
    // The path kept for delete requests is the argument as received.
    assert!(
        args[0].starts_with(&arg.raw),
        "{:?} vs {:?}",
        arg.raw,
        args[0]
    );
    if let Some(a) = &arg.address {
        // A parsed address re-serialises to a path that parses to itself
        // (what the milter adds is read back the same by the MTA).
        assert!(!a.local.is_empty());
        let again = RcptArg::parse(&[format!("<{a}>")]);
        assert_eq!(again.address.as_ref(), Some(a), "{a}");
        assert_eq!(
            normalize_domain(&a.domain).as_deref(),
            Ok(a.domain.as_str())
        );
    }
    if let Some(m) = arg.original_mailbox() {
        // ORCPT's value is xtext (RFC 3461 §4): printable ASCII, no '+'
        // or '=' but as +XX, never a space that would split the parameter.
        let x = xtext(m);
        assert!(
            x.bytes().all(|b| (b'!'..=b'~').contains(&b) && b != b'='),
            "{x}"
        );
    }
    let policy = policy();
    let holds = Holds::default();
    let mta_forms = [None, arg.address.as_ref().map(ToString::to_string)];
    for client in [[203, 0, 113, 9], [192, 0, 2, 25]] {
        for auth in [None, Some("user".to_owned())] {
            let envelope = Envelope {
                client: Some(client.into()),
                auth,
            };
            for mta in &mta_forms {
                let v = decide_rcpt(&policy, &holds, &envelope, &arg, mta.as_deref());
                match &v.decision {
                    Decision::Reject(r) => {
                        assert!(r.code.starts_with('5') && r.xcode.starts_with('5'))
                    }
                    Decision::Tempfail(r) => {
                        assert!(r.code.starts_with('4') && r.xcode.starts_with('4'))
                    }
                    Decision::Copy(to) => {
                        assert!(!to.is_empty());
                        for t in to {
                            check_routing_address(&policy.config, t).unwrap();
                        }
                    }
                    Decision::Redirect(to) => check_routing_address(&policy.config, &to.to).unwrap(),
                    Decision::Keep => {}
                }
                // The plan: additions only to allowed places, with sane
                // ESMTP arguments; deletions only of what was received.
                let mut m = Message::new(
                    policy.clone(),
                    Default::default(),
                    envelope.clone(),
                    "<s@x>".into(),
                );
                m.rcpt(arg.clone(), mta.as_deref());
                let plan = m.plan();
                for (path, args) in &plan.add {
                    let inner = path.strip_prefix('<').and_then(|p| p.strip_suffix('>'));
                    check_routing_address(&policy.config, inner.unwrap_or("")).unwrap();
                    check_esmtp_args(args).unwrap();
                }
                let bare = arg.original_mailbox().map(|m| format!("<{m}>"));
                for d in &plan.delete {
                    assert!(
                        *d == arg.raw || Some(d) == bare.as_ref(),
                        "{d} vs {}",
                        arg.raw
                    );
                }
                if !plan.delete.is_empty() {
                    assert_eq!(plan.add.len(), 1, "a redirect has one replacement");
                }
                let _ = m.summary();
            }
        }
    }
});
