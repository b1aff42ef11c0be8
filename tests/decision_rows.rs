//! Every row of the decision table (docs/design.md §2), the rule order, and the
//! routing addresses of §4, observed through the milter protocol: what the
//! milter answers at RCPT and which actions it sends at end of message.

mod support;
use support::protocol;

use indymilter_test::Status;
use protocol::*;
use std::net::IpAddr;

const CONFIG: &str = include_str!("decision_rows.yaml");
const INSTANCE: &str = "mx1.dualroute.test";

/// One message with one recipient from an ordinary, unauthenticated client.
async fn one(milter: &Milter, rcpt: &[&str]) -> Delivery {
    milter.deliver(CLIENT, None, &[rcpt]).await
}

/// The recipient was accepted and nothing at all was changed: no recipient
/// added or deleted, no header.
#[track_caller]
fn assert_untouched(d: &Delivery) {
    for s in &d.rcpt {
        assert_eq!(s, &Status::Continue, "RCPT reply");
    }
    assert_actions(&d.actions, &[]);
    assert_eq!(d.eom, Status::Continue, "end-of-message reply");
}

/// The recipient was accepted and exactly `expected` was done.
#[track_caller]
fn assert_routed(d: &Delivery, expected: &[indymilter_test::EomAction]) {
    for s in &d.rcpt {
        assert_eq!(s, &Status::Continue, "RCPT reply");
    }
    assert_actions(&d.actions, expected);
    assert_eq!(d.eom, Status::Continue, "end-of-message reply");
}

/// The recipient was refused at RCPT with `code`, and so nothing happens
/// to it at end of message.
#[track_caller]
fn assert_refused(d: &Delivery, code: &str) {
    assert_rejected(d.status(), code);
    assert_actions(&d.actions, &[]);
}

#[tokio::test]
async fn split_present_is_kept() {
    let milter = Milter::start(CONFIG).await;
    assert_untouched(&one(&milter, &["<alice@split.test>"]).await);
    assert_untouched(&one(&milter, &["<bob@split.test>"]).await);
    milter.shutdown().await;
}

#[tokio::test]
async fn split_unknown_is_redirected_with_the_exact_original_argument() {
    let milter = Milter::start(CONFIG).await;
    let d = one(&milter, &["<Zed@Split.TEST>"]).await;
    assert_routed(
        &d,
        &[
            delete("<Zed@Split.TEST>"),
            add(
                "<Zed@split.test.dualroute.invalid>",
                "ORCPT=rfc822;Zed@Split.TEST",
            ),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn orcpt_is_xtext() {
    let milter = Milter::start(CONFIG).await;
    // `+` is the one character of a subaddress that xtext must encode
    // (RFC 3461 §4); a quoted space is another.
    let d = one(&milter, &["<zed+tag@split.test>"]).await;
    assert_routed(
        &d,
        &[
            delete("<zed+tag@split.test>"),
            add(
                "<zed+tag@split.test.dualroute.invalid>",
                "ORCPT=rfc822;zed+2Btag@split.test",
            ),
            header(INSTANCE),
        ],
    );
    let d = one(&milter, &["<\"john doe\"@split.test>"]).await;
    assert_routed(
        &d,
        &[
            delete("<\"john doe\"@split.test>"),
            add(
                "<\"john doe\"@split.test.dualroute.invalid>",
                "ORCPT=rfc822;\"john+20doe\"@split.test",
            ),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn source_route_is_ignored_for_matching_but_kept_for_delete() {
    let milter = Milter::start(CONFIG).await;
    let raw = "<@relay1.example,@relay2.example:zed@split.test>";
    let d = one(&milter, &[raw]).await;
    assert_routed(
        &d,
        // The exact argument for Sendmail, the bare path for Postfix, which
        // drops the route before queueing (tests/postfix_e2e.rs shows it).
        &[
            delete(raw),
            delete("<zed@split.test>"),
            add(
                "<zed@split.test.dualroute.invalid>",
                "ORCPT=rfc822;zed@split.test",
            ),
            header(INSTANCE),
        ],
    );
    // A present account behind a source route is still present.
    assert_untouched(&one(&milter, &["<@relay1.example:alice@split.test>"]).await);
    milter.shutdown().await;
}

#[tokio::test]
async fn dual_present_is_copied_without_bounces() {
    let milter = Milter::start(CONFIG).await;
    let d = one(&milter, &["<alice@dual.test>"]).await;
    assert_routed(
        &d,
        &[
            add(
                "<alice@dual.test.dualroute.invalid>",
                "ORCPT=rfc822;alice@dual.test NOTIFY=NEVER",
            ),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn dual_with_bounce_asks_for_failure_notices() {
    let milter = Milter::start(CONFIG).await;
    let d = one(&milter, &["<alice@bounce.test>"]).await;
    assert_routed(
        &d,
        &[
            add(
                "<alice@bounce.test.dualroute.invalid>",
                "ORCPT=rfc822;alice@bounce.test NOTIFY=FAILURE",
            ),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn dual_unknown_is_rejected_at_rcpt() {
    let milter = Milter::start(CONFIG).await;
    for rcpt in [
        "<nobody@dual.test>",
        "<Nobody@DUAL.test>",
        "<nobody@bounce.test>",
    ] {
        let d = one(&milter, &[rcpt]).await;
        assert_refused(&d, "550 5.1.1");
        assert_eq!(d.eom, Status::Continue, "{rcpt}");
    }
    milter.shutdown().await;
}

#[tokio::test]
async fn dual_without_accounts_copies_everything() {
    let milter = Milter::start(CONFIG).await;
    for local in ["anyone", "Someone.Else"] {
        let d = one(&milter, &[&format!("<{local}@open.test>")]).await;
        assert_routed(
            &d,
            &[
                add(
                    &format!("<{local}@open.test.dualroute.invalid>"),
                    &format!("ORCPT=rfc822;{local}@open.test NOTIFY=NEVER"),
                ),
                header(INSTANCE),
            ],
        );
    }
    milter.shutdown().await;
}

#[tokio::test]
async fn route_redirects_present_and_unknown() {
    let milter = Milter::start(CONFIG).await;
    for local in ["alice", "zed"] {
        let rcpt = format!("<{local}@route.test>");
        let d = one(&milter, &[&rcpt]).await;
        assert_routed(
            &d,
            &[
                delete(&rcpt),
                add(
                    &format!("<{local}@route.test.dualroute.invalid>"),
                    &format!("ORCPT=rfc822;{local}@route.test"),
                ),
                header(INSTANCE),
            ],
        );
    }
    milter.shutdown().await;
}

#[tokio::test]
async fn change_envelope_routes_to_the_destination_domain() {
    let milter = Milter::start(CONFIG).await;
    let d = one(&milter, &["<zed@envelope.test>"]).await;
    assert_routed(
        &d,
        &[
            delete("<zed@envelope.test>"),
            add(
                "<zed@envelope.test.test-google-a.com>",
                "ORCPT=rfc822;zed@envelope.test",
            ),
            header(INSTANCE),
        ],
    );
    assert_untouched(&one(&milter, &["<alice@envelope.test>"]).await);
    milter.shutdown().await;
}

#[tokio::test]
async fn domain_destination_without_change_envelope_uses_the_relay_domain() {
    let milter = Milter::start(CONFIG).await;
    let d = one(&milter, &["<zed@mx.test>"]).await;
    assert_routed(
        &d,
        &[
            delete("<zed@mx.test>"),
            add(
                "<zed@mx.test.dualroute.invalid>",
                "ORCPT=rfc822;zed@mx.test",
            ),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn unmanaged_domains_are_transparent() {
    let milter = Milter::start(CONFIG).await;
    for rcpt in ["<someone@elsewhere.example>", "<alice@sub.split.test>"] {
        assert_untouched(&one(&milter, &[rcpt]).await);
    }
    milter.shutdown().await;
}

/// Routing off (`enabled: false`, rule 1): a mailbox here is kept, what
/// would be routed away and has no mailbox here is refused for now — from
/// an ordinary client and from a gateway alike.
#[tokio::test]
async fn disabled_domain_keeps_mailboxes_and_tempfails_the_rest() {
    let milter = Milter::start(CONFIG).await;
    for client in [CLIENT, GATEWAY] {
        let d = milter.deliver(client, None, &[&["<alice@off.test>"]]).await;
        assert_untouched(&d);
        let d = milter.deliver(client, None, &[&["<zed@off.test>"]]).await;
        match d.status() {
            Status::Tempfail { message: Some(m) } => {
                let m = m.to_string_lossy();
                assert!(
                    m.starts_with("451 4.4.4 <zed@off.test>: routing of mail for off.test is paused (enabled: false"),
                    "{m}"
                );
            }
            other => panic!("expected 451 4.4.4, got {other:?}"),
        }
        assert_actions(&d.actions, &[]);
    }
    milter.shutdown().await;
}

#[tokio::test]
async fn gateway_mail_is_never_routed_again() {
    let milter = Milter::start(CONFIG).await;
    let v6: IpAddr = "2001:db8::7".parse().unwrap();
    let mapped: IpAddr = "::ffff:192.0.2.25".parse().unwrap();
    for client in [GATEWAY, v6, mapped] {
        // Present, or a domain without accounts: kept, not copied or redirected.
        for rcpt in [
            "<alice@split.test>",
            "<alice@dual.test>",
            "<anyone@open.test>",
            "<alice@route.test>",
            "<alice@locked.test>",
        ] {
            let d = milter.deliver(client, None, &[&[rcpt]]).await;
            assert_untouched(&d);
        }
        // Not present, in a domain with accounts: refused. This comes before
        // per-user rules (rule 2 before rule 4), so even a user with a
        // rule but no mailbox here is refused.
        for rcpt in [
            "<zed@split.test>",
            "<nobody@dual.test>",
            "<zed@route.test>",
            "<zed@locked.test>",
            "<carol@split.test>",
        ] {
            let d = milter.deliver(client, None, &[&[rcpt]]).await;
            assert_refused(&d, "550 5.1.1");
        }
    }
    milter.shutdown().await;
}

#[tokio::test]
async fn require_gateway_refuses_unauthenticated_clients() {
    let milter = Milter::start(CONFIG).await;
    for rcpt in ["<alice@locked.test>", "<zed@locked.test>"] {
        assert_refused(&milter.deliver(CLIENT, None, &[&[rcpt]]).await, "550 5.7.1");
        // An empty `{auth_authen}` is no authentication.
        assert_refused(
            &milter.deliver(CLIENT, Some(""), &[&[rcpt]]).await,
            "550 5.7.1",
        );
    }
    // Other domains are not locked down for the same client.
    assert_untouched(
        &milter
            .deliver(CLIENT, None, &[&["<alice@split.test>"]])
            .await,
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn require_gateway_lets_authenticated_senders_through_to_the_mode() {
    let milter = Milter::start(CONFIG).await;
    let auth = Some("alice@locked.test");
    assert_untouched(
        &milter
            .deliver(CLIENT, auth, &[&["<alice@locked.test>"]])
            .await,
    );
    let d = milter
        .deliver(CLIENT, auth, &[&["<zed@locked.test>"]])
        .await;
    assert_routed(
        &d,
        &[
            delete("<zed@locked.test>"),
            add(
                "<zed@locked.test.dualroute.invalid>",
                "ORCPT=rfc822;zed@locked.test",
            ),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn per_user_copy_to_several_targets() {
    let milter = Milter::start(CONFIG).await;
    let d = one(&milter, &["<carol@split.test>"]).await;
    assert_routed(
        &d,
        &[
            add(
                "<carol@zoho.example.net>",
                "ORCPT=rfc822;carol@split.test NOTIFY=NEVER",
            ),
            add(
                "<carol@backup.example.org>",
                "ORCPT=rfc822;carol@split.test NOTIFY=NEVER",
            ),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}

/// Targets inside managed domains end where mail to them would
/// (docs/design.md §2 rule 4): a redirect to a mailbox of a dual domain
/// adds it (a redirect: the client's NOTIFY and ORCPT) and its dual copy
/// (a copy: NOTIFY after that domain's `bounce: true`); copy targets get
/// their routing address, or, in a dual domain, the address and its copy.
/// A message to the user and the target gets each address once.
#[tokio::test]
async fn per_user_targets_in_managed_domains() {
    let milter = Milter::start(CONFIG).await;
    let d = one(&milter, &["<gus@split.test>", "NOTIFY=SUCCESS"]).await;
    assert_routed(
        &d,
        &[
            delete("<gus@split.test>"),
            add(
                "<alice@bounce.test>",
                "ORCPT=rfc822;gus@split.test NOTIFY=SUCCESS",
            ),
            add(
                "<alice@bounce.test.dualroute.invalid>",
                "ORCPT=rfc822;gus@split.test NOTIFY=FAILURE",
            ),
            header(INSTANCE),
        ],
    );
    let d = one(&milter, &["<hank@split.test>"]).await;
    assert_routed(
        &d,
        &[
            add(
                "<zed@split.test.dualroute.invalid>",
                "ORCPT=rfc822;hank@split.test NOTIFY=NEVER",
            ),
            add(
                "<alice@dual.test>",
                "ORCPT=rfc822;hank@split.test NOTIFY=NEVER",
            ),
            add(
                "<alice@dual.test.dualroute.invalid>",
                "ORCPT=rfc822;hank@split.test NOTIFY=NEVER",
            ),
            header(INSTANCE),
        ],
    );
    // hank and alice@dual.test in one message: alice is a recipient
    // already and her copy is made once.
    let d = milter
        .deliver(
            CLIENT,
            None,
            &[&["<hank@split.test>"], &["<alice@dual.test>"]],
        )
        .await;
    assert_routed(
        &d,
        &[
            add(
                "<zed@split.test.dualroute.invalid>",
                "ORCPT=rfc822;hank@split.test NOTIFY=NEVER",
            ),
            add(
                "<alice@dual.test.dualroute.invalid>",
                "ORCPT=rfc822;hank@split.test NOTIFY=NEVER",
            ),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn per_user_redirect_to() {
    let milter = Milter::start(CONFIG).await;
    let d = one(&milter, &["<dave@split.test>"]).await;
    assert_routed(
        &d,
        &[
            delete("<dave@split.test>"),
            add("<dave@legacy.example.net>", "ORCPT=rfc822;dave@split.test"),
            header(INSTANCE),
        ],
    );
    // The rule matches case-insensitively; the delete repeats the argument
    // as given and ORCPT names the address as the client wrote it.
    let d = one(&milter, &["<DAVE@Split.Test>"]).await;
    assert_routed(
        &d,
        &[
            delete("<DAVE@Split.Test>"),
            add("<dave@legacy.example.net>", "ORCPT=rfc822;DAVE@Split.Test"),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn per_user_keep_overrides_route_mode() {
    let milter = Milter::start(CONFIG).await;
    for rcpt in [
        "<erin@route.test>",
        "<Erin@ROUTE.test>",
        "<erin+list@route.test>",
    ] {
        assert_untouched(&one(&milter, &[rcpt]).await);
    }
    milter.shutdown().await;
}

#[tokio::test]
async fn subaddress_matches_the_account_and_keeps_its_tag() {
    let milter = Milter::start(CONFIG).await;
    // split: bob+news is bob, present: kept.
    assert_untouched(&one(&milter, &["<bob+news@split.test>"]).await);
    // dual: bob+news is present, so copied; the copy keeps the tag.
    let d = one(&milter, &["<bob+news@dual.test>"]).await;
    assert_routed(
        &d,
        &[
            add(
                "<bob+news@dual.test.dualroute.invalid>",
                "ORCPT=rfc822;bob+2Bnews@dual.test NOTIFY=NEVER",
            ),
            header(INSTANCE),
        ],
    );
    // route: the redirect keeps the tag.
    let d = one(&milter, &["<alice+x@route.test>"]).await;
    assert_routed(
        &d,
        &[
            delete("<alice+x@route.test>"),
            add(
                "<alice+x@route.test.dualroute.invalid>",
                "ORCPT=rfc822;alice+2Bx@route.test",
            ),
            header(INSTANCE),
        ],
    );
    // A tag on an address without an account is still unknown.
    assert_refused(
        &one(&milter, &["<nobody+news@dual.test>"]).await,
        "550 5.1.1",
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn upper_case_variants_match_and_keep_their_spelling() {
    let milter = Milter::start(CONFIG).await;
    for rcpt in [
        "<ALICE@SPLIT.TEST>",
        "<Alice@Split.Test>",
        "<BOB+News@split.test>",
        "<\"alice\"@split.test>",
    ] {
        assert_untouched(&one(&milter, &[rcpt]).await);
    }
    let d = one(&milter, &["<Alice@Dual.Test>"]).await;
    assert_routed(
        &d,
        &[
            add(
                "<Alice@dual.test.dualroute.invalid>",
                "ORCPT=rfc822;Alice@Dual.Test NOTIFY=NEVER",
            ),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn redirect_carries_the_original_esmtp_parameters() {
    let milter = Milter::start(CONFIG).await;
    let d = one(
        &milter,
        &[
            "<zed@split.test>",
            "NOTIFY=SUCCESS,FAILURE",
            "ORCPT=rfc822;x@y",
        ],
    )
    .await;
    assert_routed(
        &d,
        &[
            delete("<zed@split.test>"),
            add(
                "<zed@split.test.dualroute.invalid>",
                "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y",
            ),
            header(INSTANCE),
        ],
    );
    // NOTIFY without ORCPT: NOTIFY is kept and ORCPT names the original.
    let d = one(&milter, &["<zed@split.test>", "NOTIFY=NEVER"]).await;
    assert_routed(
        &d,
        &[
            delete("<zed@split.test>"),
            add(
                "<zed@split.test.dualroute.invalid>",
                "NOTIFY=NEVER ORCPT=rfc822;zed@split.test",
            ),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn copy_keeps_the_clients_orcpt() {
    let milter = Milter::start(CONFIG).await;
    // RFC 3461 §4.2: a client's ORCPT already names the original recipient.
    let d = one(
        &milter,
        &[
            "<alice@dual.test>",
            "ORCPT=rfc822;alias@example.org",
            "NOTIFY=SUCCESS",
        ],
    )
    .await;
    assert_routed(
        &d,
        &[
            add(
                "<alice@dual.test.dualroute.invalid>",
                "ORCPT=rfc822;alias@example.org NOTIFY=NEVER",
            ),
            header(INSTANCE),
        ],
    );
    milter.shutdown().await;
}
