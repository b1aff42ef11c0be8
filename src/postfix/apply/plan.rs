//! Computing the changes of `dualroute postfix-config --apply`: a pure
//! function of (what Postfix has now, what this configuration needs, what
//! an earlier `--apply` recorded) → the changes and the new record.

use super::revert::restore_list;
use super::wait::with_wait;
use super::{list_entries, service_line, table_path, Applied, Change, Current, Override, LISTS};
use crate::postfix::master_cf::milter_overrides;
use crate::postfix::{PostfixConfig, Service};
use std::collections::BTreeMap;
use std::path::Path;

/// The changes that bring Postfix from `current` to what `want` needs,
/// and the record of it. Running the changes and planning again yields no
/// changes. The round-trip tests' entry (apply/tests.rs); the command
/// uses [`plan_apply_notes`].
#[cfg(test)]
pub fn plan_apply(
    want: &PostfixConfig,
    map_dir: &Path,
    current: &Current,
    before: &Applied,
) -> (Vec<Change>, Applied) {
    let (changes, record, _) = plan_apply_notes(want, map_dir, current, before);
    (changes, record)
}

/// [`plan_apply`], and what the administrator must know about it (the
/// wait wiring refused for a layout, a master.cf override it cannot
/// read).
pub fn plan_apply_notes(
    want: &PostfixConfig,
    map_dir: &Path,
    current: &Current,
    before: &Applied,
) -> (Vec<Change>, Applied, Vec<String>) {
    let (want, mut notes) = with_wait(want, map_dir, &current.site);
    let want = &want;
    let mut changes = Vec::new();
    let mut record = before.clone();
    let remember = |name: &str, record: &mut Applied| {
        record
            .original
            .entry(name.to_owned())
            .or_insert_with(|| current.main.get(name).cloned());
    };

    // The list entries this configuration needs, per parameter.
    let mut wanted: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
    for p in &want.main {
        if LISTS.contains(&p.name.as_str()) {
            wanted
                .entry(p.name.as_str())
                .or_default()
                .push((p.value.clone(), p.why.clone()));
        } else if current.main.get(&p.name) != Some(&p.value) {
            remember(&p.name, &mut record);
            record.set.insert(p.name.clone(), p.value.clone());
            changes.push(Change::Set {
                name: p.name.clone(),
                value: p.value.clone(),
                why: p.why.clone(),
            });
        } else if record.original.contains_key(&p.name) {
            record.set.insert(p.name.clone(), p.value.clone());
        }
    }
    // Single-valued parameters an earlier --apply set that this
    // configuration no longer needs (a `concurrency` removed from
    // milter.yaml): back to what they were, unless the admin changed them.
    for (name, value) in &before.set {
        if want.main.iter().any(|p| &p.name == name) {
            continue;
        }
        if current.main.get(name) == Some(value) {
            changes.push(match record.original.get(name) {
                Some(Some(orig)) => Change::Set {
                    name: name.clone(),
                    value: orig.clone(),
                    why: "no longer needed".into(),
                },
                _ => Change::Unset { name: name.clone() },
            });
        }
        record.set.remove(name);
        record.original.remove(name);
    }
    if let Some(catchall) = want
        .tables
        .iter()
        .find(|t| t.file == crate::postfix::CATCHALL_MAP)
    {
        wanted.entry("virtual_mailbox_maps").or_default().push((
            format!("hash:{}", table_path(map_dir, catchall).display()),
            "accept every address of split/route domains after your own mailboxes, so dualroute can route them".into(),
        ));
    }
    for name in LISTS {
        let now = current.main.get(name).map(|v| list_entries(v));
        let mut entries = now.clone().unwrap_or_default();
        let ours_before = before.added.get(name).cloned().unwrap_or_default();
        let want_here = wanted.get(name).cloned().unwrap_or_default();
        // Entries an earlier --apply added that this configuration no
        // longer needs (e.g. after switching to change_envelope).
        entries.retain(|e| !ours_before.contains(e) || want_here.iter().any(|(w, _)| w == e));
        let mut added: Vec<String> = ours_before
            .iter()
            .filter(|e| want_here.iter().any(|(w, _)| w == *e))
            .cloned()
            .collect();
        let mut why = Vec::new();
        for (w, reason) in &want_here {
            if !entries.contains(w) {
                entries.push(w.clone());
                added.push(w.clone());
                why.push(reason.clone());
            }
        }
        if Some(&entries) != now.as_ref() && !(now.is_none() && entries.is_empty()) {
            remember(name, &mut record);
            let restored = restore_list(name, &entries, &record);
            changes.push(match restored {
                Some(value) => Change::Set {
                    name: name.into(),
                    value,
                    why: why.join("; "),
                },
                None => Change::Unset { name: name.into() },
            });
        }
        if added.is_empty() {
            record.added.remove(name);
        } else {
            record.added.insert(name.into(), added);
        }
    }

    record.service = plan_service(
        want.service.as_ref(),
        &format!("{}/unix", crate::postfix::TRANSPORT),
        current.service.as_deref(),
        before.service,
        &mut changes,
    );
    record.wait_service = plan_service(
        want.wait.as_ref(),
        &format!("{}/unix", crate::postfix::WAIT_TRANSPORT),
        current.wait_service.as_deref(),
        before.wait_service,
        &mut changes,
    );
    let socket = want
        .main
        .iter()
        .find(|p| p.name == "smtpd_milters")
        .map(|p| p.value.clone());
    record.overrides = plan_overrides(
        socket.as_deref(),
        &current.master_cf,
        before,
        &mut changes,
        &mut notes,
    );

    let mut tables = Vec::new();
    for t in &want.tables {
        let path = table_path(map_dir, t);
        let text = t.render();
        let (now, stale_index) = current.tables.get(&path).cloned().unwrap_or((None, true));
        if now.as_deref() != Some(text.as_str()) {
            changes.push(Change::WriteTable {
                path: path.clone(),
                text,
            });
            changes.push(Change::Postmap(path.clone()));
        } else if stale_index {
            changes.push(Change::Postmap(path.clone()));
        }
        tables.push(path);
    }
    for old in &before.tables {
        if !tables.contains(old) {
            changes.push(Change::RemoveTable(old.clone()));
        }
    }
    record.tables = tables;
    (changes, record, notes)
}

/// Creates, updates or removes one of our master.cf services; whether
/// `--apply` created it (and `--revert` must remove it).
fn plan_service(
    want: Option<&Service>,
    name: &str,
    now: Option<&str>,
    created: bool,
    changes: &mut Vec<Change>,
) -> bool {
    match (want, now) {
        (Some(s), now) if now != Some(service_line(s).as_str()) => {
            changes.push(Change::Service(s.clone()));
            created || now.is_none()
        }
        (Some(_), _) => created,
        (None, Some(_)) if created => {
            changes.push(Change::RemoveService(name.to_owned()));
            false
        }
        (None, _) => false,
    }
}

/// Adds our socket to every master.cf milter override that leaves it out
/// (docs/design.md §9), keeping the milters listed there; returns what
/// the record keeps.
fn plan_overrides(
    socket: Option<&str>,
    master_cf: &str,
    before: &Applied,
    changes: &mut Vec<Change>,
    notes: &mut Vec<String>,
) -> Vec<Override> {
    let (found, unread) = milter_overrides(master_cf);
    notes.extend(unread);
    let mut kept = Vec::new();
    for f in found {
        let earlier = before
            .overrides
            .iter()
            .find(|o| o.service == f.service && o.param == f.param);
        // What the administrator had: an earlier --apply's value is ours.
        let base = match earlier {
            Some(o) if o.after == f.value => o.before.clone(),
            _ => f.value.clone(),
        };
        let mut entries = list_entries(&base);
        if let Some(socket) = socket {
            if !entries.iter().any(|e| e == socket) {
                entries.push(socket.to_owned());
            }
        }
        // No white space: postconf and master(5) end an -o value there.
        let after = if list_entries(&base) == entries {
            base.clone()
        } else {
            entries.join(",")
        };
        if after != f.value {
            changes.push(Change::SetOverride {
                service: f.service.clone(),
                param: f.param.clone(),
                value: after.clone(),
                why: format!(
                    "this service overrides {} and would bypass dualroute",
                    f.param
                ),
            });
        }
        if after != base {
            kept.push(Override {
                service: f.service,
                param: f.param,
                before: base,
                after,
            });
        }
    }
    kept
}
