//! Computing the changes of `dualroute postfix-config --revert`: undo
//! what the record says `--apply` did, leave alone what the administrator
//! changed since.

use super::{list_entries, Applied, Change, Current};
use crate::postfix::master_cf::milter_overrides;

/// The value a list parameter gets: its original text when the entries
/// are the original ones (so main.cf comes back as it was), None when it
/// was unset and is empty again.
pub(super) fn restore_list(name: &str, entries: &[String], record: &Applied) -> Option<String> {
    match record.original.get(name) {
        Some(Some(orig)) if list_entries(orig) == entries => Some(orig.clone()),
        Some(None) | None if entries.is_empty() => None,
        _ => Some(entries.join(", ")),
    }
}

/// The changes that undo what `record` says `--apply` did, leaving alone
/// what the administrator changed since.
pub fn plan_revert(current: &Current, record: &Applied) -> (Vec<Change>, Vec<String>) {
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let restore = |name: &str| match record.original.get(name) {
        Some(Some(v)) => Change::Set {
            name: name.into(),
            value: v.clone(),
            why: String::new(),
        },
        _ => Change::Unset { name: name.into() },
    };
    for (name, value) in &record.set {
        match current.main.get(name) {
            Some(now) if now == value => changes.push(restore(name)),
            _ => notes.push(format!("{name} was changed after --apply; left as it is")),
        }
    }
    for (name, added) in &record.added {
        let now = current
            .main
            .get(name)
            .map(|v| list_entries(v))
            .unwrap_or_default();
        let rest: Vec<String> = now.iter().filter(|e| !added.contains(e)).cloned().collect();
        if rest != now {
            changes.push(match restore_list(name, &rest, record) {
                Some(value) => Change::Set {
                    name: name.clone(),
                    value,
                    why: String::new(),
                },
                None => Change::Unset { name: name.clone() },
            });
        }
    }
    if record.service && current.service.is_some() {
        changes.push(Change::RemoveService(format!(
            "{}/unix",
            crate::postfix::TRANSPORT
        )));
    }
    if record.wait_service && current.wait_service.is_some() {
        changes.push(Change::RemoveService(format!(
            "{}/unix",
            crate::postfix::WAIT_TRANSPORT
        )));
    }
    let (found, _) = milter_overrides(&current.master_cf);
    for o in &record.overrides {
        match found
            .iter()
            .find(|f| f.service == o.service && f.param == o.param)
        {
            Some(f) if f.value == o.after => changes.push(Change::SetOverride {
                service: o.service.clone(),
                param: o.param.clone(),
                value: o.before.clone(),
                why: String::new(),
            }),
            _ => notes.push(format!(
                "master.cf {} -o {} was changed after --apply; left as it is",
                o.service, o.param
            )),
        }
    }
    for t in &record.tables {
        changes.push(Change::RemoveTable(t.clone()));
    }
    (changes, notes)
}

/// The catch-all Maildirs the catch-all table of `record` filed mail
/// into: (domain, Maildir relative to `virtual_mailbox_base`), read from
/// the table as it is before `--revert` removes it. The Maildirs stay:
/// what is in them is mail someone must read (docs/postfix.md).
pub fn catchall_maildirs(current: &Current, record: &Applied) -> Vec<(String, String)> {
    record
        .tables
        .iter()
        .filter(|t| {
            t.file_name()
                .is_some_and(|n| n == crate::postfix::CATCHALL_MAP)
        })
        .filter_map(|t| current.tables.get(t).and_then(|(text, _)| text.as_deref()))
        .flat_map(|text| text.lines())
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let domain = words.next()?.strip_prefix('@')?;
            Some((domain.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}
