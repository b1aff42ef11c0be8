//! Whole messages through the milter protocol: several recipients with
//! different fates, several messages per connection, aborted messages,
//! duplicate recipients, the loop header, and RCPT arguments that are not
//! addresses (docs/design.md §2, §3).

mod support;
use support::protocol;

use indymilter_test::{EomAction, Status};
use protocol::*;

const CONFIG: &str = include_str!("messages.yaml");
const INSTANCE: &str = "mx1.dualroute.test";

/// docs/design.md §2: a recipient never disappears without a replacement. Every
/// deleted recipient was one of the message's own, and has exactly one
/// added replacement whose ORCPT names it (the test addresses need no
/// xtext encoding).
#[track_caller]
fn assert_nothing_lost(originals: &[&str], actions: &[EomAction]) {
    for gone in deleted(actions) {
        assert!(
            originals.contains(&gone.as_str()),
            "deleted {gone}, which was never a recipient"
        );
        let inner = gone.trim_start_matches('<').trim_end_matches('>');
        let orcpt = format!("ORCPT=rfc822;{inner}");
        let replacements = actions
            .iter()
            .filter(|a| {
                matches!(a, EomAction::AddRecipient { args: Some(args), .. }
                if args.to_string_lossy().split_ascii_whitespace().any(|p| p == orcpt))
            })
            .count();
        assert_eq!(
            replacements, 1,
            "{gone} was deleted with {replacements} replacements: {actions:?}"
        );
    }
}

/// The actions for a message whose one recipient, `<local@domain>`, is
/// routed: it is deleted and replaced by its relay address
/// `<local@domain.dualroute.invalid>`, with an ORCPT naming it (docs/design.md
/// §2), and the message gets our loop header.
fn redirected(rcpt: &str) -> [EomAction; 3] {
    let address = rcpt.trim_start_matches('<').trim_end_matches('>');
    [
        delete(rcpt),
        add(
            &format!("<{address}.dualroute.invalid>"),
            &format!("ORCPT=rfc822;{address}"),
        ),
        header(INSTANCE),
    ]
}

#[tokio::test]
async fn mixed_message_gets_exactly_its_actions() {
    let milter = Milter::start(CONFIG).await;
    let rcpts: &[&[&str]] = &[
        &["<alice@split.test>"],         // split, present: keep
        &["<friend@elsewhere.example>"], // not managed: keep
        &["<carol@split.test>"],         // per-user copy_to
        &["<alice@dual.test>"],          // dual, present: copy
        &["<zed@split.test>"],           // split, unknown: redirect
        &["<nobody@dual.test>"],         // dual, unknown: reject
        &["<zoe@route.test>"],           // route: redirect
    ];
    let d = milter.deliver(CLIENT, None, rcpts).await;
    for (i, status) in d.rcpt.iter().enumerate() {
        if i == 5 {
            assert_rejected(status, "550 5.1.1");
        } else {
            assert_eq!(status, &Status::Continue, "RCPT {:?}", rcpts[i]);
        }
    }
    assert_actions(
        &d.actions,
        &[
            add(
                "<carol@zoho.example.net>",
                "ORCPT=rfc822;carol@split.test NOTIFY=NEVER",
            ),
            add(
                "<alice@dual.test.dualroute.invalid>",
                "ORCPT=rfc822;alice@dual.test NOTIFY=NEVER",
            ),
            delete("<zed@split.test>"),
            add(
                "<zed@split.test.dualroute.invalid>",
                "ORCPT=rfc822;zed@split.test",
            ),
            delete("<zoe@route.test>"),
            add(
                "<zoe@route.test.dualroute.invalid>",
                "ORCPT=rfc822;zoe@route.test",
            ),
            header(INSTANCE),
        ],
    );
    assert_nothing_lost(&["<zed@split.test>", "<zoe@route.test>"], &d.actions);
    assert_eq!(d.eom, Status::Continue);
    milter.shutdown().await;
}

#[tokio::test]
async fn all_recipients_redirected_none_lost() {
    let milter = Milter::start(CONFIG).await;
    let originals = ["<ann@route.test>", "<ben@route.test>", "<zed@split.test>"];
    let rcpts: Vec<&[&str]> = originals.iter().map(std::slice::from_ref).collect();
    let d = milter.deliver(CLIENT, None, &rcpts).await;
    assert!(
        d.rcpt.iter().all(|s| *s == Status::Continue),
        "{:?}",
        d.rcpt
    );
    // Deleting every recipient without adding would make Postfix drop the
    // message silently (docs/design.md §8): each one must have its replacement.
    assert_actions(
        &d.actions,
        &[
            delete("<ann@route.test>"),
            add(
                "<ann@route.test.dualroute.invalid>",
                "ORCPT=rfc822;ann@route.test",
            ),
            delete("<ben@route.test>"),
            add(
                "<ben@route.test.dualroute.invalid>",
                "ORCPT=rfc822;ben@route.test",
            ),
            delete("<zed@split.test>"),
            add(
                "<zed@split.test.dualroute.invalid>",
                "ORCPT=rfc822;zed@split.test",
            ),
            header(INSTANCE),
        ],
    );
    assert_eq!(deleted(&d.actions).len(), originals.len());
    assert_nothing_lost(&originals, &d.actions);
    milter.shutdown().await;
}

#[tokio::test]
async fn messages_on_one_connection_are_independent() {
    let milter = Milter::start(CONFIG).await;
    let mut session = milter.session(CLIENT).await;

    let first = session.message(None, &[&["<zed@split.test>"]], &[]).await;
    assert_actions(&first.actions, &redirected("<zed@split.test>"));

    let second = session.message(None, &[&["<ann@route.test>"]], &[]).await;
    assert_actions(&second.actions, &redirected("<ann@route.test>"));

    // A message that needs nothing gets nothing, even after routed ones.
    let third = session.message(None, &[&["<alice@split.test>"]], &[]).await;
    assert_actions(&third.actions, &[]);

    // A rejection in one message does not carry over to the next.
    let fourth = session.message(None, &[&["<nobody@dual.test>"]], &[]).await;
    assert_rejected(fourth.status(), "550 5.1.1");
    assert_actions(&fourth.actions, &[]);
    let fifth = session.message(None, &[&["<alice@dual.test>"]], &[]).await;
    assert_eq!(fifth.status(), &Status::Continue);
    assert_actions(
        &fifth.actions,
        &[
            add(
                "<alice@dual.test.dualroute.invalid>",
                "ORCPT=rfc822;alice@dual.test NOTIFY=NEVER",
            ),
            header(INSTANCE),
        ],
    );

    session.close().await;
    milter.shutdown().await;
}

#[tokio::test]
async fn aborted_message_leaves_nothing_behind() {
    let milter = Milter::start(CONFIG).await;
    let mut session = milter.session(CLIENT).await;

    // Aborted after RCPT (RSET): its recipients must not reappear.
    session.mail(None).await;
    assert_eq!(session.rcpt(&["<zed@split.test>"]).await, Status::Continue);
    assert_eq!(session.rcpt(&["<alice@dual.test>"]).await, Status::Continue);
    session.abort().await;

    let clean = session.message(None, &[&["<alice@split.test>"]], &[]).await;
    assert_eq!(clean.status(), &Status::Continue);
    assert_actions(&clean.actions, &[]);

    let routed = session.message(None, &[&["<ann@route.test>"]], &[]).await;
    assert_actions(&routed.actions, &redirected("<ann@route.test>"));

    // Aborted after its headers, one of which was our loop header: the next
    // message is not taken for a loop.
    session.mail(None).await;
    assert_eq!(session.rcpt(&["<ben@route.test>"]).await, Status::Continue);
    session.data(&[(LOOP_HEADER, INSTANCE)]).await;
    session.abort().await;

    let after = session.message(None, &[&["<zed@split.test>"]], &[]).await;
    assert_actions(&after.actions, &redirected("<zed@split.test>"));

    session.close().await;
    milter.shutdown().await;
}

#[tokio::test]
async fn duplicate_rcpt_is_routed_once() {
    let milter = Milter::start(CONFIG).await;
    let d = milter
        .deliver(
            CLIENT,
            None,
            &[&["<zed@split.test>"], &["<zed@split.test>"]],
        )
        .await;
    assert_actions(&d.actions, &redirected("<zed@split.test>"));

    let d = milter
        .deliver(
            CLIENT,
            None,
            &[&["<alice@dual.test>"], &["<alice@dual.test>"]],
        )
        .await;
    assert_actions(
        &d.actions,
        &[
            add(
                "<alice@dual.test.dualroute.invalid>",
                "ORCPT=rfc822;alice@dual.test NOTIFY=NEVER",
            ),
            header(INSTANCE),
        ],
    );

    // The same mailbox in two spellings: the MTA holds two recipients, so
    // both are deleted (each exactly as given), and the mailbox is added once.
    let d = milter
        .deliver(
            CLIENT,
            None,
            &[&["<zed@split.test>"], &["<ZED@Split.test>"]],
        )
        .await;
    assert_eq!(
        deleted(&d.actions),
        ["<ZED@Split.test>".to_owned(), "<zed@split.test>".to_owned()]
            .into_iter()
            .collect(),
        "{:?}",
        d.actions
    );
    let adds: Vec<String> = added(&d.actions).into_iter().collect();
    assert_eq!(adds.len(), 1, "{:?}", d.actions);
    assert!(
        adds[0].eq_ignore_ascii_case("<zed@split.test.dualroute.invalid>"),
        "{adds:?}"
    );
    assert_eq!(
        d.actions.len(),
        4,
        "two deletes, one add, one header: {:?}",
        d.actions
    );
    milter.shutdown().await;
}

/// Our own `X-Dualroute` header: copies are not made again, and a message
/// with a recipient to redirect is refused 554 5.4.6 (routing loop) —
/// never delivered into the catch-all.
#[tokio::test]
async fn own_loop_header_refuses_redirects_and_skips_copies() {
    let milter = Milter::start(CONFIG).await;
    let copies: &[&[&str]] = &[
        &["<alice@dual.test>"],
        &["<carol@split.test>"],
        &["<alice@split.test>"],
    ];
    let with_redirect: &[&[&str]] = &[
        &["<zed@split.test>"],
        &["<alice@dual.test>"],
        &["<carol@split.test>"],
        &["<ann@route.test>"],
    ];
    let variants: [&[(&str, &str)]; 3] = [
        &[(LOOP_HEADER, INSTANCE)],
        // Header names and host names are case-insensitive.
        &[("x-dualroute", "MX1.DualRoute.TEST")],
        // One of several X-Dualroute headers names us.
        &[(LOOP_HEADER, "mx9.other.example"), (LOOP_HEADER, INSTANCE)],
    ];
    for headers in variants {
        let mut session = milter.session(CLIENT).await;
        let d = session.message(None, copies, headers).await;
        assert!(
            d.rcpt.iter().all(|s| *s == Status::Continue),
            "{headers:?}: {:?}",
            d.rcpt
        );
        assert_actions(&d.actions, &[]);
        assert_eq!(d.eom, Status::Continue, "{headers:?}");

        let d = session.message(None, with_redirect, headers).await;
        assert!(
            d.rcpt.iter().all(|s| *s == Status::Continue),
            "{:?}",
            d.rcpt
        );
        assert_actions(&d.actions, &[]);
        let reply = rejection(&d.eom);
        assert!(
            reply.starts_with("554 5.4.6 ") && reply.contains("routing loop"),
            "{headers:?}: {reply}"
        );
        session.close().await;
    }
    milter.shutdown().await;
}

#[tokio::test]
async fn another_instances_loop_header_is_routed_normally() {
    let milter = Milter::start(CONFIG).await;
    let mut session = milter.session(CLIENT).await;
    for other in [
        "mx2.dualroute.test",
        "dualroute.test",
        "mx1.dualroute.test.example",
    ] {
        let d = session
            .message(None, &[&["<zed@split.test>"]], &[(LOOP_HEADER, other)])
            .await;
        assert_actions(&d.actions, &redirected("<zed@split.test>"));
    }
    session.close().await;
    milter.shutdown().await;
}

/// `<>`, garbage and addresses of other domains are left alone; an
/// argument of a managed domain that cannot be parsed is refused 550 5.1.3
/// (never kept: the MTA may read it as a real mailbox).
#[tokio::test]
async fn garbage_left_alone_unparsable_managed_refused() {
    let milter = Milter::start(CONFIG).await;
    let mut session = milter.session(CLIENT).await;
    let garbage: &[&str] = &[
        "<>",
        "<not an address>",
        "<postmaster>",
        "garbage",
        "<@>",
        "<zed@>",
        "<zed@-bad-.split.test>",
        "<@relay.example:>",
        "<zed@elsewhere.example@>",
        "",
    ];
    for g in garbage {
        let d = session.message(None, &[&[g]], &[]).await;
        assert_eq!(d.status(), &Status::Continue, "RCPT {g:?}");
        assert_actions(&d.actions, &[]);
        assert_eq!(d.eom, Status::Continue, "{g:?}");
    }
    let unparsable: &[&str] = &[
        "<@split.test>",
        "<zed@split.test",
        "<\"unterminated@split.test>",
        "<zed@split.test@>",
        "<<alice@split.test>>",
        "alice@split.test>",
        "<not an address@split.test>",
    ];
    for u in unparsable {
        session.mail(None).await;
        assert_rejected(&session.rcpt(&[u]).await, "550 5.1.3");
        session.abort().await;
    }
    // Bytes that are not UTF-8, in a managed domain: refused too.
    session.mail(None).await;
    assert_rejected(
        &session.rcpt_bytes(&[b"<z\xffed@split.test>"]).await,
        "550 5.1.3",
    );
    session.abort().await;

    // Garbage next to a real recipient: only the real one is touched. A
    // panic in the milter would have dropped this connection, so this also
    // shows the session survived all of the above.
    let mut rcpts: Vec<&[&str]> = garbage.iter().map(std::slice::from_ref).collect();
    rcpts.push(&["<zed@split.test>"]);
    let d = session.message(None, &rcpts, &[]).await;
    assert_actions(&d.actions, &redirected("<zed@split.test>"));
    session.close().await;
    milter.shutdown().await;
}

/// An MTA that cannot add recipients with ESMTP parameters (old Postfix
/// milter protocol, Sendmail before 8.14) still gets its recipients
/// redirected, plainly, instead of a negotiation failure.
#[tokio::test]
async fn mta_without_add_recipient_with_parameters() {
    use indymilter_test::{Actions, TestConnection};
    let milter = Milter::start(CONFIG).await;
    let offered =
        Actions::ADD_RCPT | Actions::DELETE_RCPT | Actions::ADD_HEADER | Actions::CHANGE_HEADER;
    let mut conn = TestConnection::configure()
        .available_actions(offered)
        .open_tcp(milter.addr())
        .await
        .unwrap();
    assert!(!conn.negotiated_actions().contains(Actions::ADD_RCPT_EXT));
    conn.connect("client.test", [203, 0, 113, 9]).await.unwrap();
    conn.mail(["<s@sender.test>"]).await.unwrap();
    conn.rcpt(["<zed@split.test>"]).await.unwrap();
    let (actions, status) = conn.eom().await.unwrap();
    assert_eq!(status, Status::Continue);
    assert!(
        actions.has_delete_recipient("<zed@split.test>"),
        "{actions:?}"
    );
    assert!(
        actions.actions.contains(&EomAction::AddRecipient {
            rcpt: c"<zed@split.test.dualroute.invalid>".into(),
            args: None
        }),
        "{actions:?}"
    );
    conn.close().await.unwrap();
    milter.shutdown().await;
}

/// A copy target that is already a recipient of the message is not added
/// again: Postfix would deliver it twice (its ORCPT and NOTIFY differ).
#[tokio::test]
async fn copy_target_already_a_recipient_is_not_added_again() {
    let milter = Milter::start(CONFIG).await;
    let d = milter
        .deliver(
            CLIENT,
            None,
            &[&["<carol@split.test>"], &["<Carol@Zoho.Example.NET>"]],
        )
        .await;
    // Nothing to add, nothing to delete (carol stays, her copy target is
    // already there), so the message is not marked either.
    assert_actions(&d.actions, &[]);
    milter.shutdown().await;
}
