//! `destination.max_size` (README "Size limit for copies"): a copy of a
//! message larger than the destination accepts is not made, the local
//! delivery is unaffected; a redirect is made all the same. The milter
//! asks the MTA for the body only when a domain has a limit, and counts
//! it together with the headers and the client's `SIZE=`. `explain` says
//! where the rule applies. The same against a real Postfix is in
//! tests/postfix_e2e.rs.

mod support;
use indymilter_test::{EomAction, ProtoOpts, Status};
use support::protocol::{self, add, delete, header, Milter, Session, CLIENT};

const INSTANCE: &str = "mx1.dualroute.test";

/// dual.test copies alice to the destination, route.test redirects
/// everything; both take messages up to 1K; nolimit.test has no limit.
fn yaml(max_size: &str) -> String {
    format!(
        "instance: {INSTANCE}
domains:
  dual.test:
    mode: dual
    destination: {{ hosts: [\"[192.0.2.30]\"]{max_size} }}
    accounts:
      - list: [alice@dual.test]
  route.test:
    mode: route
    destination: {{ domain: legacy.example.net, change_envelope: true{max_size} }}
  nolimit.test:
    mode: dual
    destination: {{ hosts: [\"[192.0.2.31]\"] }}
    accounts:
      - list: [bob@nolimit.test]
"
    )
}

/// One message of `body` bytes to `rcpts`, with `mail_params` after the
/// sender (e.g. `SIZE=5000`).
async fn send(
    milter: &Milter,
    mail_params: &[&str],
    rcpts: &[&str],
    body: usize,
) -> (Vec<EomAction>, Status) {
    let mut s = milter.session(CLIENT).await;
    let mut mail = vec!["<sender@example.org>"];
    mail.extend_from_slice(mail_params);
    let status = s.conn.mail(mail).await.expect("mail stage");
    assert_eq!(status, s.continued(ProtoOpts::NOREPLY_MAIL));
    for r in rcpts {
        assert_eq!(s.rcpt(&[r]).await, Status::Continue, "{r}");
    }
    let status = s.conn.header("Subject", "size").await.expect("header");
    assert_eq!(status, s.continued(ProtoOpts::NOREPLY_HEADER));
    // In chunks, as Postfix passes a body on (at most 64K each).
    let line = "x".repeat(98) + "\r\n";
    let mut left = body;
    while left > 0 {
        let n = left.min(line.len());
        let status = s.conn.body(line[..n].to_owned()).await.expect("body");
        assert_eq!(status, s.continued(ProtoOpts::NOREPLY_BODY));
        left -= n;
    }
    let out = s.eom().await;
    s.close().await;
    out
}

fn copy_of_alice() -> EomAction {
    add(
        "<alice@dual.test.dualroute.invalid>",
        "ORCPT=rfc822;alice@dual.test NOTIFY=NEVER",
    )
}

#[tokio::test]
async fn body_is_asked_for_only_with_a_limit() {
    for (limit, wants_body) in [("", false), (", max_size: 1K", true)] {
        let milter = Milter::start(&yaml(limit)).await;
        let s: Session = milter.session(CLIENT).await;
        let opts = s.conn.negotiated_opts();
        assert_eq!(
            !opts.contains(ProtoOpts::NO_BODY),
            wants_body,
            "{limit:?}: {opts:?}"
        );
        assert_eq!(opts.contains(ProtoOpts::NOREPLY_BODY), wants_body);
        s.close().await;
        milter.shutdown().await;
    }
}

#[tokio::test]
async fn copies_past_the_limit_are_not_made() {
    let milter = Milter::start(&yaml(", max_size: 1K")).await;

    // Small: copied as always.
    let (actions, eom) = send(&milter, &[], &["<alice@dual.test>"], 200).await;
    assert_eq!(eom, Status::Continue);
    assert_eq!(actions, [copy_of_alice(), header(INSTANCE)]);

    // The body makes it larger than 1K: delivered here only, unmarked.
    let (actions, eom) = send(&milter, &[], &["<alice@dual.test>"], 2000).await;
    assert_eq!(eom, Status::Continue);
    assert_eq!(actions, []);

    // The client's SIZE= counts even when the body seen is small, in any
    // case; an unreadable one does not.
    let (actions, _) = send(&milter, &["size=5000"], &["<alice@dual.test>"], 200).await;
    assert_eq!(actions, []);
    let (actions, _) = send(&milter, &["SIZE=lots"], &["<alice@dual.test>"], 200).await;
    assert_eq!(actions, [copy_of_alice(), header(INSTANCE)]);

    // The limit is the domain's own: a domain without one still copies
    // the same big message.
    let (actions, _) = send(
        &milter,
        &[],
        &["<alice@dual.test>", "<bob@nolimit.test>"],
        2000,
    )
    .await;
    assert_eq!(
        actions,
        [
            add(
                "<bob@nolimit.test.dualroute.invalid>",
                "ORCPT=rfc822;bob@nolimit.test NOTIFY=NEVER"
            ),
            header(INSTANCE)
        ]
    );
    milter.shutdown().await;
}

#[tokio::test]
async fn redirects_ignore_the_limit() {
    let milter = Milter::start(&yaml(", max_size: 1K")).await;
    let (actions, eom) = send(&milter, &[], &["<carol@route.test>"], 2000).await;
    assert_eq!(eom, Status::Continue);
    assert_eq!(
        actions,
        [
            add(
                "<carol@legacy.example.net>",
                "ORCPT=rfc822;carol@route.test"
            ),
            delete("<carol@route.test>"),
            header(INSTANCE)
        ]
    );
    milter.shutdown().await;
}

#[test]
fn explain_shows_the_size_rule() {
    let policy = protocol::policy(&yaml(", max_size: 35M"));
    let holds = dualroute::holds::Holds::default();
    let envelope = dualroute::decision::Envelope::default();
    let explain = |a: &str| dualroute::explain::explain(&policy, &holds, &envelope, a);
    let copy = explain("alice@dual.test");
    assert!(
        copy.contains("only for messages up to destination.max_size 35M (36700160 bytes)"),
        "{copy}"
    );
    let redirect = explain("carol@route.test");
    assert!(
        redirect.contains("destination.max_size 35M (36700160 bytes) is not applied to a redirect"),
        "{redirect}"
    );
    // Where no copy or redirect is made, or the domain has no limit, the
    // rule is not mentioned.
    for a in ["zed@dual.test", "bob@nolimit.test", "x@elsewhere.test"] {
        assert!(!explain(a).contains("max_size"), "{}", explain(a));
    }
}
