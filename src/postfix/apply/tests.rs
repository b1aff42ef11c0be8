//! The plans of `--apply` and `--revert` together: applying then planning
//! again changes nothing, and reverting gives back what Postfix had, byte
//! for byte.

use super::wait::with_wait;
use super::*;
use crate::postfix::master_cf::{milter_overrides, set_override};
use crate::postfix::{Param, PostfixConfig};

fn want(milter: &str, transport: bool) -> PostfixConfig {
    let mut w = PostfixConfig::default();
    w.main.push(Param {
        why: "w".into(),
        name: "smtpd_milters".into(),
        value: milter.into(),
    });
    w.main.push(Param {
        why: "w".into(),
        name: "milter_protocol".into(),
        value: "6".into(),
    });
    if transport {
        w.main.push(Param {
            why: "w".into(),
            name: "transport_maps".into(),
            value: "hash:/m/dualroute_transport".into(),
        });
    }
    w
}

/// Applies a plan to `current` the way Postfix would.
fn run(current: &mut Current, changes: &[Change]) {
    for c in changes {
        match c {
            Change::Set { name, value, .. } => {
                current.main.insert(name.clone(), value.clone());
            }
            Change::Unset { name } => {
                current.main.remove(name);
            }
            Change::Service(s) => current.service = Some(service_line(s)),
            Change::RemoveService(_) => current.service = None,
            _ => {}
        }
    }
}

#[test]
fn merges_is_idempotent_and_reverts() {
    let mut cur = Current::default();
    cur.main.insert(
        "smtpd_milters".into(),
        "unix:/opendkim/opendkim.sock".into(),
    );
    let before = cur.clone();
    let (changes, record) = plan_apply(
        &want("unix:/dualroute/d.sock", true),
        Path::new("/m"),
        &cur,
        &Applied::default(),
    );
    run(&mut cur, &changes);
    assert_eq!(
        cur.main["smtpd_milters"],
        "unix:/opendkim/opendkim.sock, unix:/dualroute/d.sock"
    );
    let (again, record2) = plan_apply(
        &want("unix:/dualroute/d.sock", true),
        Path::new("/m"),
        &cur,
        &record,
    );
    assert_eq!(again, vec![]);
    assert_eq!(record2, record);
    // The transport is no longer needed (change_envelope): removed.
    let (less, record3) = plan_apply(
        &want("unix:/dualroute/d.sock", false),
        Path::new("/m"),
        &cur,
        &record,
    );
    assert_eq!(
        less,
        vec![Change::Unset {
            name: "transport_maps".into()
        }]
    );
    run(&mut cur, &less);
    let (undo, notes) = plan_revert(&cur, &record3);
    assert!(notes.is_empty());
    run(&mut cur, &undo);
    assert_eq!(cur, before);
}

#[test]
fn a_parameter_no_longer_needed_is_restored() {
    let mut cur = Current::default();
    cur.main
        .insert("dualroute_destination_rate_delay".into(), "9s".into());
    let mut with = want("unix:/dualroute/d.sock", true);
    for (name, value) in [
        ("dualroute_destination_concurrency_limit", "5"),
        ("dualroute_destination_rate_delay", "1s"),
    ] {
        with.main.push(Param {
            why: "w".into(),
            name: name.into(),
            value: value.into(),
        });
    }
    let (changes, record) = plan_apply(&with, Path::new("/m"), &cur, &Applied::default());
    run(&mut cur, &changes);
    assert_eq!(cur.main["dualroute_destination_concurrency_limit"], "5");
    let (less, record) = plan_apply(
        &want("unix:/dualroute/d.sock", true),
        Path::new("/m"),
        &cur,
        &record,
    );
    run(&mut cur, &less);
    assert_eq!(
        cur.main.get("dualroute_destination_concurrency_limit"),
        None
    );
    assert_eq!(cur.main["dualroute_destination_rate_delay"], "9s");
    assert!(record.set.is_empty() || !record.set.contains_key("dualroute_destination_rate_delay"));
    let (again, _) = plan_apply(
        &want("unix:/dualroute/d.sock", true),
        Path::new("/m"),
        &cur,
        &record,
    );
    assert_eq!(again, vec![]);
}

#[test]
fn lists_keep_braces_together() {
    assert_eq!(
        list_entries("hash:/a, pipemap:{hash:/b, static:{lmtp:unix:private/x}},hash:/c"),
        vec![
            "hash:/a",
            "pipemap:{hash:/b, static:{lmtp:unix:private/x}}",
            "hash:/c"
        ]
    );
}

const MASTER: &str = "# comment\nsmtp      inet  n       -       y       -       -       smtpd\nsubmission inet n       -       y       -       -       smtpd\n  -o syslog_name=postfix/submission\n#  -o smtpd_milters=commented\n  -o smtpd_milters=inet:localhost:8891\n  -o non_smtpd_milters=\nsmtps     inet  n - y - - smtpd -o smtpd_milters={ a, b }\n";

#[test]
fn overrides_merged_and_restored_byte_for_byte() {
    let (found, notes) = milter_overrides(MASTER);
    let got: Vec<(&str, &str, &str)> = found
        .iter()
        .map(|f| (f.service.as_str(), f.param.as_str(), f.value.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("submission/inet", "smtpd_milters", "inet:localhost:8891"),
            ("submission/inet", "non_smtpd_milters", ""),
        ]
    );
    assert_eq!(notes.len(), 1, "{notes:?}");
    let mut cur = Current {
        master_cf: MASTER.into(),
        ..Current::default()
    };
    let mut w = want("unix:/dualroute/d.sock", false);
    w.main.retain(|p| p.name == "smtpd_milters");
    let (changes, record, _) = plan_apply_notes(&w, Path::new("/m"), &cur, &Applied::default());
    for c in &changes {
        if let Change::SetOverride {
            service,
            param,
            value,
            ..
        } = c
        {
            cur.master_cf = set_override(&cur.master_cf, service, param, value).unwrap();
        }
    }
    assert!(cur.master_cf.contains(
        "  -o smtpd_milters=inet:localhost:8891,unix:/dualroute/d.sock\n  -o non_smtpd_milters=unix:/dualroute/d.sock\n"
    ));
    let (again, _, _) = plan_apply_notes(&w, Path::new("/m"), &cur, &record);
    assert!(
        !again
            .iter()
            .any(|c| matches!(c, Change::SetOverride { .. })),
        "{again:?}"
    );
    let (undo, notes) = plan_revert(&cur, &record);
    assert!(notes.is_empty(), "{notes:?}");
    for c in &undo {
        if let Change::SetOverride {
            service,
            param,
            value,
            ..
        } = c
        {
            cur.master_cf = set_override(&cur.master_cf, service, param, value).unwrap();
        }
    }
    assert_eq!(cur.master_cf, MASTER);
}

fn with_catchall(domains: &[&str]) -> PostfixConfig {
    let mut w = want("unix:/dualroute/d.sock", false);
    w.tables.push(Table {
        file: crate::postfix::CATCHALL_MAP.into(),
        why: "w".into(),
        entries: domains
            .iter()
            .map(|d| ("w".into(), format!("@{d}"), format!("{d}/c/")))
            .collect(),
    });
    w
}

#[test]
fn wait_wiring_keeps_mailboxes_on_their_transport() {
    let site = Site {
        mailbox_maps: vec![
            "hash:/etc/postfix/vmailbox".into(),
            "hash:/m/dualroute_catchall".into(),
        ],
        virtual_transport: "lmtp:unix:private/dovecot-lmtp".into(),
        virtual_domains: vec!["example.com".into()],
        domain_transports: vec![],
    };
    let (w, notes) = with_wait(
        &with_catchall(&["example.com", "local.test"]),
        Path::new("/m"),
        &site,
    );
    let transport: Vec<&str> = w
        .main
        .iter()
        .filter(|p| p.name == "transport_maps")
        .map(|p| p.value.as_str())
        .collect();
    assert_eq!(
        transport,
        [
            "pipemap:{hash:/etc/postfix/vmailbox, static:{lmtp:unix:private/dovecot-lmtp}}",
            "hash:/m/dualroute_transport"
        ]
    );
    let table = w
        .tables
        .iter()
        .find(|t| t.file == crate::postfix::TRANSPORT_MAP)
        .unwrap();
    let rows: Vec<(&str, &str)> = table
        .entries
        .iter()
        .map(|(_, k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(rows, [("example.com", "dualroute-wait:")]);
    assert!(w.wait.is_some());
    // local.test is not a virtual mailbox domain: said, not wired.
    assert!(
        notes
            .iter()
            .any(|n| n.contains("local.test is not listed in virtual_mailbox_domains")),
        "{notes:?}"
    );

    // A domain key in the admin's transport_maps: nothing wired.
    let site = Site {
        domain_transports: vec![(
            "example.com".into(),
            "lmtp:unix:private/dovecot-lmtp".into(),
        )],
        ..site
    };
    let (w, notes) = with_wait(&with_catchall(&["example.com"]), Path::new("/m"), &site);
    assert!(w.wait.is_none());
    assert!(!w.main.iter().any(|p| p.name == "transport_maps"));
    assert!(notes.iter().any(|n| n.contains("NOT wired")), "{notes:?}");
}
