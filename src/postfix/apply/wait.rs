//! The wait wiring an `--apply` adds (docs/design.md §9, docs/postfix.md
//! "Mail waiting in the queue"): which addresses wait in the queue for
//! `dualroute-wait:` and which keep the administrator's own transport.

use super::{table_path, Site};
use crate::postfix::{PostfixConfig, Table};
use std::path::Path;

/// The wait wiring for this Postfix (docs/design.md §9, docs/postfix.md
/// "Mail waiting in the queue"): `want` plus, for each split/route domain
/// of `virtual_mailbox_domains`, a `DOMAIN dualroute-wait:` row in the
/// transport table, and `pipemap:{TABLE, static:{VIRTUAL_TRANSPORT}}` in
/// transport_maps for each of the administrator's own mailbox tables.
/// transport(5) tries the full address (then without its extension) in
/// every table before it tries the domain, so a mailbox keeps the
/// administrator's delivery transport and any other address of the domain
/// waits. Where that would change where the administrator's own mail
/// goes, nothing is wired and a note says why.
pub(super) fn with_wait(
    want: &PostfixConfig,
    map_dir: &Path,
    site: &Site,
) -> (PostfixConfig, Vec<String>) {
    let mut want = want.clone();
    let mut notes = Vec::new();
    let Some(catchall) = want
        .tables
        .iter()
        .find(|t| t.file == crate::postfix::CATCHALL_MAP)
    else {
        return (want, notes);
    };
    let catchall_ref = format!("hash:{}", table_path(map_dir, catchall).display());
    let domains: Vec<String> = catchall
        .entries
        .iter()
        .map(|(_, k, _)| k.trim_start_matches('@').to_owned())
        .collect();
    if !site.domain_transports.is_empty() {
        notes.push(format!(
            "WARNING: mail the milter did not route is NOT wired to wait in the queue: your transport_maps sends {} by a domain key, and the wiring's pipemap (which matches mailboxes by full address, tried before the domain) would send those mailboxes to virtual_transport ({}) instead. Until then such mail for {} goes where that transport sends unknown addresses (virtual(8): the catch-all Maildir; Dovecot: refused, so Postfix bounces it). Set virtual_transport to that transport and drop the domain keys, then --apply again (docs/postfix.md, \"Mail waiting in the queue\").",
            site.domain_transports
                .iter()
                .map(|(d, t)| format!("{d} to {t}"))
                .collect::<Vec<_>>()
                .join(", "),
            site.virtual_transport,
            domains.join(", ")
        ));
        return (want, notes);
    }
    let mut rows = Vec::new();
    for d in &domains {
        if site
            .virtual_domains
            .iter()
            .any(|v| v.eq_ignore_ascii_case(d))
        {
            rows.push((
                format!("{d}: what the milter did not route waits in the queue (mailboxes match the pipemap first)"),
                d.clone(),
                format!("{}:", crate::postfix::WAIT_TRANSPORT),
            ));
        } else {
            notes.push(format!(
                "WARNING: {d} is not listed in virtual_mailbox_domains: the wiring that makes unrouted mail wait in the queue covers virtual mailbox domains only (mydestination and relay_domains cannot express it, docs/postfix.md); mail for {d} that the milter did not route is delivered as before"
            ));
        }
    }
    if rows.is_empty() {
        return (want, notes);
    }
    let transport_ref = format!(
        "hash:{}",
        map_dir.join(crate::postfix::TRANSPORT_MAP).display()
    );
    match want
        .tables
        .iter_mut()
        .find(|t| t.file == crate::postfix::TRANSPORT_MAP)
    {
        Some(t) => t.entries.extend(rows),
        None => want.tables.push(Table {
            file: crate::postfix::TRANSPORT_MAP.into(),
            why: "what the milter did not route waits in the queue".into(),
            entries: rows,
        }),
    }
    let vt = if site.virtual_transport.is_empty() {
        "virtual"
    } else {
        site.virtual_transport.as_str()
    };
    for map in site.mailbox_maps.iter().filter(|m| **m != catchall_ref) {
        want.main.push(crate::postfix::Param {
            why: format!("mailboxes in {map} keep their transport ({vt})"),
            name: "transport_maps".into(),
            value: format!("pipemap:{{{map}, static:{{{vt}}}}}"),
        });
    }
    if !want
        .main
        .iter()
        .any(|p| p.name == "transport_maps" && p.value == transport_ref)
    {
        want.main.push(crate::postfix::Param {
            why: "unrouted mail of split/route domains waits in the queue".into(),
            name: "transport_maps".into(),
            value: transport_ref,
        });
    }
    want.wait = Some(crate::postfix::wait_service());
    (want, notes)
}
