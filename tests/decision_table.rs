//! docs/design.md §2, cell by cell and rule by rule, against the pure
//! [`decide`] function (no milter, no I/O).

use dualroute::address::RcptArg;
use dualroute::decision::{decide_rcpt, Decision, Envelope, Off, OffEffect, Rule};
use dualroute::holds::{Hold, Holds};
use dualroute::policy::Policy;
use dualroute::state::{Disabled, TripCause, Tripped, Verification};

const CONFIG: &str = r#"
instance: mx1.test
gateways: [192.0.2.25, "2001:db8::/64"]
domains:
  split.test:
    mode: split
    destination: { hosts: ["[192.0.2.30]:2525"] }
    accounts: [{ list: [alice@split.test, bob@split.test, erin@split.test] }]
    users:
      carol@split.test: { copy_to: [carol@new.example, archive@new.example] }
      dave@split.test: { redirect_to: dave@new.example }
      erin@split.test: { keep: true }
  dual.test:
    mode: dual
    destination: { hosts: ["legacy.example"] }
    accounts: [{ list: [alice@dual.test] }]
  dualall.test:
    mode: dual
    destination: { domain: dualall.test.alias.example, change_envelope: true }
  route.test:
    mode: route
    destination: { domain: new.example }
    accounts: [{ list: [alice@route.test, erin@route.test] }]
    users:
      erin@route.test: { keep: true }
  off.test:
    mode: route
    enabled: false
    destination: { domain: new.example }
  locked.test:
    mode: split
    require_gateway: true
    destination: { hosts: ["[192.0.2.25]"] }
    accounts: [{ list: [alice@locked.test] }]
"#;

fn policy() -> Policy {
    Policy::load(dualroute::config::parse(CONFIG, "decision_table.yaml").unwrap()).unwrap()
}

fn verdict(p: &Policy, env: &Envelope, rcpt: &str) -> (Decision, Rule) {
    verdict_held(p, &Holds::default(), env, rcpt)
}

fn verdict_held(p: &Policy, holds: &Holds, env: &Envelope, rcpt: &str) -> (Decision, Rule) {
    let arg = RcptArg::parse(&[rcpt]);
    let v = decide_rcpt(p, holds, env, &arg, None);
    (v.decision, v.rule)
}

fn tempfail_code(d: &Decision) -> Option<(&'static str, &'static str)> {
    match d {
        Decision::Tempfail(r) => Some((r.code, r.xcode)),
        _ => None,
    }
}

fn outsider() -> Envelope {
    Envelope {
        client: Some("203.0.113.9".parse().unwrap()),
        auth: None,
    }
}

fn gateway() -> Envelope {
    Envelope {
        client: Some("192.0.2.25".parse().unwrap()),
        auth: None,
    }
}

fn redirect(to: &str) -> Decision {
    Decision::Redirect(to.into())
}

fn copy(to: &[&str]) -> Decision {
    Decision::Copy(to.iter().map(|s| s.to_string()).collect())
}

fn reject_code(d: &Decision) -> Option<(&str, &str)> {
    match d {
        Decision::Reject(r) => Some((r.code, r.xcode)),
        _ => None,
    }
}

#[test]
fn mode_rows() {
    let p = policy();
    let e = outsider();
    use dualroute::config::Mode::*;
    let mode = |mode, present, has_accounts| Rule::Mode {
        mode,
        present,
        has_accounts,
    };
    // split: keep | redirect
    assert_eq!(
        verdict(&p, &e, "<alice@split.test>"),
        (Decision::Keep, mode(Split, true, true))
    );
    assert_eq!(
        verdict(&p, &e, "<zed@split.test>"),
        (
            redirect("zed@split.test.dualroute.invalid"),
            mode(Split, false, true)
        )
    );
    // dual: copy | reject 550 5.1.1
    assert_eq!(
        verdict(&p, &e, "<alice@dual.test>"),
        (
            copy(&["alice@dual.test.dualroute.invalid"]),
            mode(Dual, true, true)
        )
    );
    let (d, r) = verdict(&p, &e, "<zed@dual.test>");
    assert_eq!(
        (reject_code(&d), r),
        (Some(("550", "5.1.1")), mode(Dual, false, true))
    );
    // dual without accounts: everything counts as present.
    assert_eq!(
        verdict(&p, &e, "<zed@dualall.test>"),
        (
            copy(&["zed@dualall.test.alias.example"]),
            mode(Dual, true, false)
        )
    );
    // route: redirect | redirect (domain destination without change_envelope
    // uses the relay domain).
    assert_eq!(
        verdict(&p, &e, "<alice@route.test>"),
        (
            redirect("alice@route.test.dualroute.invalid"),
            mode(Route, true, true)
        )
    );
    assert_eq!(
        verdict(&p, &e, "<zed@route.test>"),
        (
            redirect("zed@route.test.dualroute.invalid"),
            mode(Route, false, true)
        )
    );
}

#[test]
fn rule_1_not_managed_or_disabled() {
    let p = policy();
    let e = outsider();
    assert_eq!(
        verdict(&p, &e, "<alice@elsewhere.example>"),
        (Decision::Keep, Rule::NotManaged)
    );
    // enabled: false: what routing would send away and has no mailbox here
    // is refused for now, never delivered into the catch-all.
    let paused = Rule::Off {
        why: Off::Config,
        effect: OffEffect::Paused,
    };
    let (d, r) = verdict(&p, &e, "<alice@off.test>");
    assert_eq!(
        (tempfail_code(&d), r),
        (Some(("451", "4.4.4")), paused.clone())
    );
    // Routing off wins over the gateway rule.
    let (d, r) = verdict(&p, &gateway(), "<zed@off.test>");
    assert_eq!((tempfail_code(&d), r), (Some(("451", "4.4.4")), paused));
    assert_eq!(verdict(&p, &e, "<>"), (Decision::Keep, Rule::NotAnAddress));
    // An argument of a managed domain that cannot be parsed is refused
    // 550 5.1.3; one of another domain is left alone.
    let (d, r) = verdict(&p, &e, "<not an address@split.test>");
    assert_eq!(reject_code(&d), Some(("550", "5.1.3")), "{r}");
    assert!(matches!(r, Rule::BadAddress(_)), "{r:?}");
    assert_eq!(
        verdict(&p, &e, "<not an address@elsewhere.example>"),
        (Decision::Keep, Rule::NotAnAddress)
    );
}

/// Every cause of "routing off" gives the same decisions (docs/design.md,
/// "Routing off"): mailboxes here are kept without copies, what would be
/// routed away and has no mailbox here gets 451 4.4.4, refusals stay.
#[test]
fn routing_off_same_for_every_cause() {
    let p = policy();
    let causes = [
        Hold::Disabled(Disabled {
            since: 1,
            reason: "maintenance".into(),
        }),
        Hold::Tripped(Tripped {
            since: 1,
            bounces: 20,
            deferrals: 0,
            cause: TripCause::Bounces,
            window_secs: 3600,
            last: "status=bounced".into(),
            recent: Vec::new(),
        }),
        // A trip on deferrals holds the same way (its own cause text).
        Hold::Tripped(Tripped {
            since: 1,
            bounces: 0,
            deferrals: 11,
            cause: TripCause::Deferrals,
            window_secs: 3600,
            last: "status=deferred".into(),
            recent: Vec::new(),
        }),
        Hold::Verification {
            address: "postmaster@new.example".into(),
            last: Some(Verification {
                at: 1,
                passed: false,
                detail: "550 no".into(),
                target: String::new(),
            }),
        },
        Hold::Unreadable("split.test.tripped: bad".into()),
    ];
    let e = outsider();
    for hold in causes {
        let mut holds = Holds::default();
        for d in [
            "split.test",
            "dual.test",
            "dualall.test",
            "route.test",
            "locked.test",
        ] {
            holds.insert(d, hold.clone());
        }
        let off = |effect| Rule::Off {
            why: Off::Hold(hold.clone()),
            effect,
        };
        let v = |rcpt: &str| verdict_held(&p, &holds, &e, rcpt);
        assert_eq!(
            v("<alice@split.test>"),
            (Decision::Keep, off(OffEffect::Kept))
        );
        assert_eq!(
            v("<erin@split.test>"),
            (Decision::Keep, off(OffEffect::Kept))
        );
        assert_eq!(
            v("<carol@split.test>"),
            (Decision::Keep, off(OffEffect::CopySkipped))
        );
        assert_eq!(
            v("<alice@dual.test>"),
            (Decision::Keep, off(OffEffect::CopySkipped))
        );
        assert_eq!(
            v("<zed@dualall.test>"),
            (Decision::Keep, off(OffEffect::CopySkipped))
        );
        assert_eq!(
            v("<alice@route.test>"),
            (Decision::Keep, off(OffEffect::KeptInsteadOfRedirect))
        );
        for paused in ["<zed@split.test>", "<dave@split.test>", "<zed@route.test>"] {
            let (d, r) = v(paused);
            assert_eq!(tempfail_code(&d), Some(("451", "4.4.4")), "{paused}: {d}");
            assert_eq!(r, off(OffEffect::Paused), "{paused}");
            assert!(d.to_string().contains("paused"), "{d}");
        }
        // Unknown in dual mode is still unknown; the lock-down still holds.
        let (d, _) = v("<zed@dual.test>");
        assert_eq!(reject_code(&d), Some(("550", "5.1.1")));
        let (d, r) = v("<alice@locked.test>");
        assert_eq!(
            (reject_code(&d), r),
            (Some(("550", "5.7.1")), Rule::RequireGateway)
        );
        // The gateway is exempt from the lock-down, not from the hold.
        let (d, _) = verdict_held(&p, &holds, &gateway(), "<zed@locked.test>");
        assert_eq!(tempfail_code(&d), Some(("451", "4.4.4")));
    }
}

#[test]
fn rule_2_gateway() {
    let p = policy();
    let g = gateway();
    assert_eq!(
        verdict(&p, &g, "<alice@split.test>"),
        (Decision::Keep, Rule::Gateway { present: true })
    );
    let (d, r) = verdict(&p, &g, "<zed@split.test>");
    assert_eq!(
        (reject_code(&d), r),
        (Some(("550", "5.1.1")), Rule::Gateway { present: false })
    );
    // Routing of any kind is off for gateway clients: route mode, per-user
    // rules and dual copies included.
    assert_eq!(
        verdict(&p, &g, "<alice@route.test>"),
        (Decision::Keep, Rule::Gateway { present: true })
    );
    assert_eq!(
        verdict(&p, &g, "<dave@split.test>").1,
        Rule::Gateway { present: false }
    );
    assert_eq!(
        verdict(&p, &g, "<alice@dual.test>"),
        (Decision::Keep, Rule::Gateway { present: true })
    );
    // Without accounts, nothing is unknown: kept.
    assert_eq!(
        verdict(&p, &g, "<zed@dualall.test>"),
        (Decision::Keep, Rule::Gateway { present: true })
    );
    // IPv6 network and v4-mapped addresses.
    let v6 = Envelope {
        client: Some("2001:db8::25".parse().unwrap()),
        auth: None,
    };
    assert_eq!(
        verdict(&p, &v6, "<alice@route.test>").1,
        Rule::Gateway { present: true }
    );
    let mapped = Envelope {
        client: Some("::ffff:192.0.2.25".parse().unwrap()),
        auth: None,
    };
    assert_eq!(
        verdict(&p, &mapped, "<alice@route.test>").1,
        Rule::Gateway { present: true }
    );
    // The gateway beats require_gateway, trivially.
    assert_eq!(
        verdict(&p, &g, "<alice@locked.test>"),
        (Decision::Keep, Rule::Gateway { present: true })
    );
}

#[test]
fn rule_3_require_gateway() {
    let p = policy();
    let (d, r) = verdict(&p, &outsider(), "<alice@locked.test>");
    assert_eq!(
        (reject_code(&d), r),
        (Some(("550", "5.7.1")), Rule::RequireGateway)
    );
    let no_client = Envelope::default();
    assert_eq!(
        verdict(&p, &no_client, "<alice@locked.test>").1,
        Rule::RequireGateway
    );
    let empty_auth = Envelope {
        auth: Some(String::new()),
        ..outsider()
    };
    assert_eq!(
        verdict(&p, &empty_auth, "<alice@locked.test>").1,
        Rule::RequireGateway
    );
    // Authenticated senders get the mode's row.
    let authed = Envelope {
        auth: Some("alice".into()),
        ..outsider()
    };
    assert_eq!(
        verdict(&p, &authed, "<alice@locked.test>").0,
        Decision::Keep
    );
    assert_eq!(
        verdict(&p, &authed, "<zed@locked.test>").0,
        redirect("zed@locked.test.dualroute.invalid")
    );
    // Other domains are not locked.
    assert_eq!(
        verdict(&p, &outsider(), "<alice@split.test>").0,
        Decision::Keep
    );
}

#[test]
fn rule_4_per_user() {
    let p = policy();
    let e = outsider();
    assert_eq!(
        verdict(&p, &e, "<carol@split.test>"),
        (
            copy(&["carol@new.example", "archive@new.example"]),
            Rule::User("copy_to")
        )
    );
    assert_eq!(
        verdict(&p, &e, "<dave@split.test>"),
        (redirect("dave@new.example"), Rule::User("redirect_to"))
    );
    assert_eq!(
        verdict(&p, &e, "<erin@split.test>"),
        (Decision::Keep, Rule::User("keep"))
    );
    // keep overrides route mode.
    assert_eq!(
        verdict(&p, &e, "<erin@route.test>"),
        (Decision::Keep, Rule::User("keep"))
    );
    // Rules match case-insensitively and through the subaddress.
    assert_eq!(
        verdict(&p, &e, "<DAVE+lists@Split.Test>").1,
        Rule::User("redirect_to")
    );
}

#[test]
fn addresses_case_and_subaddress() {
    let p = policy();
    let e = outsider();
    assert_eq!(verdict(&p, &e, "<ALICE@SPLIT.TEST>").0, Decision::Keep);
    assert_eq!(verdict(&p, &e, "<alice+news@split.test>").0, Decision::Keep);
    assert_eq!(
        verdict(&p, &e, "<@relay.example:alice@split.test>").0,
        Decision::Keep
    );
    // The routing address keeps the local part as written, tag included.
    assert_eq!(
        verdict(&p, &e, "<Zed+News@Split.Test>").0,
        redirect("Zed+News@split.test.dualroute.invalid")
    );
    assert_eq!(
        verdict(&p, &e, "<\"zed doe\"@split.test>").0,
        redirect("\"zed doe\"@split.test.dualroute.invalid")
    );
}

#[test]
fn case_sensitive_and_no_delimiter() {
    let text = CONFIG.replace(
        "instance: mx1.test",
        "instance: mx1.test\nlocal_part_case: sensitive\nrecipient_delimiter: \"\"",
    );
    let p = Policy::load(dualroute::config::parse(&text, "t.yaml").unwrap()).unwrap();
    let e = outsider();
    assert_eq!(verdict(&p, &e, "<alice@split.test>").0, Decision::Keep);
    assert_eq!(
        verdict(&p, &e, "<Alice@split.test>").0,
        redirect("Alice@split.test.dualroute.invalid")
    );
    assert_eq!(
        verdict(&p, &e, "<alice+news@split.test>").0,
        redirect("alice+news@split.test.dualroute.invalid")
    );
}

/// Targets of per-user rules inside managed domains (docs/design.md §2
/// rule 4, issue 21 §3): a recipient the milter adds skips the milter, so
/// the target is decided here, as a message to it would be.
const TARGETS: &str = r#"
instance: mx1.test
domains:
  example.com:
    mode: split
    destination: { hosts: ["[192.0.2.30]:2525"] }
    accounts: [{ list: [alice@example.com, bob@example.com] }]
    users:
      erin@example.com: { redirect_to: carol@example.com }
      frank@example.com: { redirect_to: Alice@example.com }
      gina@example.com: { copy_to: [carol+tag@example.com, x@outside.example, bob@example.com] }
"#;

#[test]
fn rule_4_split_target_without_a_mailbox_here_is_routed() {
    let p = Policy::load(dualroute::config::parse(TARGETS, "targets.yaml").unwrap()).unwrap();
    let e = outsider();
    // carol has no mailbox here: a message to her is routed, and so is
    // erin's mail redirected to her (not delivered to carol@example.com,
    // which Postfix would file into the catch-all).
    assert_eq!(
        verdict(&p, &e, "<erin@example.com>").0,
        redirect("carol@example.com.dualroute.invalid")
    );
    // alice has one: the target itself.
    assert_eq!(
        verdict(&p, &e, "<frank@example.com>").0,
        redirect("Alice@example.com")
    );
    // Each copy target on its own; the tag stays on the routing address.
    assert_eq!(
        verdict(&p, &e, "<gina@example.com>").0,
        copy(&[
            "carol+tag@example.com.dualroute.invalid",
            "x@outside.example",
            "bob@example.com"
        ])
    );
}

/// Every mode's row for a target, and routing off for the target's domain
/// (docs/design.md §2 rule 4): the target ends where a message to it would.
#[test]
fn rule_4_targets_in_every_mode_and_under_holds() {
    let text = TARGETS.replace(
        "      gina@example.com:",
        "      hal@example.com: { redirect_to: zed@route.test }
      ivy@example.com: { redirect_to: alice@dual.test }
      jo@example.com: { copy_to: [Alice+x@dual.test, zed@route.test] }
      kim@example.com: { redirect_to: pat@route.test }
      gina@example.com:",
    ) + r#"  route.test:
    mode: route
    destination: { domain: new.example, change_envelope: true }
    accounts: [{ list: [pat@route.test] }]
    users:
      pat@route.test: { keep: true }
  dual.test:
    mode: dual
    bounce: true
    destination: { hosts: ["legacy.example"] }
    accounts: [{ list: [alice@dual.test] }]
"#;
    let p = Policy::load(dualroute::config::parse(&text, "targets.yaml").unwrap()).unwrap();
    let e = outsider();
    let v = |holds: &Holds, rcpt: &str| verdict_held(&p, holds, &e, rcpt);
    let none = Holds::default();
    // route: its routing address (change_envelope: local@D).
    let (d, rule) = v(&none, "<hal@example.com>");
    assert_eq!(d, redirect("zed@new.example"));
    assert_eq!(
        rule.to_string(),
        "per-user rule redirect_to; zed@route.test: mode route of route.test: routed to the destination"
    );
    // A target kept by its own `keep: true` is the target itself.
    assert_eq!(v(&none, "<kim@example.com>").0, redirect("pat@route.test"));
    // dual, present: the target and dual's copy of it (once each).
    assert_eq!(
        v(&none, "<ivy@example.com>").0,
        Decision::Redirect(dualroute::decision::RedirectTo {
            to: "alice@dual.test".into(),
            copy: Some("alice@dual.test.dualroute.invalid".into()),
        })
    );
    assert_eq!(
        v(&none, "<jo@example.com>").0,
        copy(&[
            "Alice+x@dual.test",
            "Alice+x@dual.test.dualroute.invalid",
            "zed@new.example"
        ])
    );

    // Routing off for the target's domain: what would be routed is
    // refused for now (redirect) or not made (copy); a mailbox there is
    // still delivered, without dual's copy.
    let disabled = Hold::Disabled(Disabled {
        since: 1,
        reason: "maintenance".into(),
    });
    let mut held = Holds::default();
    held.insert("route.test", disabled.clone());
    held.insert("dual.test", disabled);
    let (d, rule) = v(&held, "<hal@example.com>");
    assert_eq!(tempfail_code(&d), Some(("451", "4.4.4")), "{d}");
    assert!(
        d.to_string()
            .contains("<hal@example.com>: routing of mail for route.test is paused (disabled by the administrator)"),
        "{d}"
    );
    assert!(
        rule.to_string()
            .ends_with(": refused for now, the sender retries until routing resumes"),
        "{rule}"
    );
    assert_eq!(v(&held, "<kim@example.com>").0, redirect("pat@route.test"));
    assert_eq!(v(&held, "<ivy@example.com>").0, redirect("alice@dual.test"));
    let (d, rule) = v(&held, "<jo@example.com>");
    assert_eq!(d, copy(&["Alice+x@dual.test"]));
    assert!(
        rule.to_string()
            .contains("zed@route.test: would be routed, and routing off for route.test"),
        "{rule}"
    );
    assert!(rule.to_string().ends_with(": not copied"), "{rule}");

    // Routing off for the user's own domain: its rules are off as before
    // (rule 1), whatever the target.
    let mut own = Holds::default();
    own.insert(
        "example.com",
        Hold::Disabled(Disabled {
            since: 1,
            reason: "maintenance".into(),
        }),
    );
    assert_eq!(
        tempfail_code(&v(&own, "<hal@example.com>").0),
        Some(("451", "4.4.4"))
    );
    assert_eq!(v(&own, "<jo@example.com>").0, Decision::Keep);
}
