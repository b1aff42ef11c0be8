//! `dualroute postfix-config --apply` and `--revert`: wire Postfix with its
//! own tools (`postconf -e`/`-X` for main.cf, `postconf -M`/`-P`/`-MX` for
//! master.cf, `postmap` for the tables), idempotently, merging with what the
//! administrator already has, and undoing exactly what it did.
//!
//! The plan is a pure function of (what Postfix has now, what this
//! configuration needs, what an earlier `--apply` recorded) → changes; the
//! shell around it reads Postfix with `postconf -n`/`-M`, runs the changes,
//! keeps a timestamped backup of main.cf and master.cf and runs
//! `postfix check`.
//!
//! What an `--apply` did is recorded in `dualroute.applied` in the Postfix
//! configuration directory: each main.cf parameter's value before the first
//! `--apply` (or that it was unset), the list entries it added, the
//! master.cf service and the tables it wrote. `--revert` restores those
//! values (so main.cf is byte for byte what it was when its lines had
//! `postconf`'s own `name = value` form), removes the service and the tables.

use super::master_cf::{milter_overrides, set_override};
use super::{PostfixConfig, Service, Table};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The record of what `--apply` changed, in the Postfix config directory.
pub const RECORD: &str = "dualroute.applied";

/// Parameters whose value is a list: ours are merged into it, never
/// replace it (an OpenDKIM milter, a transport table of the admin's own).
/// Postfix splits such lists on commas and white space.
const LISTS: [&str; 4] = [
    "smtpd_milters",
    "non_smtpd_milters",
    "transport_maps",
    "virtual_mailbox_maps",
];

/// Where `--apply` lists the Postfix configuration directories it wired
/// while the Debian package is installed, so that removing the package
/// can revert each of them (packaging/debian/prerm; docs/design.md §9):
/// a second instance or a private one has its own directory.
pub const REGISTRY: &str = "/var/lib/dualroute/postfix-applied";

/// What an earlier `--apply` did.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// main.cf parameters before the first `--apply`; `None`: not set.
    pub original: BTreeMap<String, Option<String>>,
    /// Values `--apply` gave to single-valued parameters.
    pub set: BTreeMap<String, String>,
    /// Entries `--apply` added to list parameters.
    pub added: BTreeMap<String, Vec<String>>,
    /// Whether `--apply` created the master.cf service.
    pub service: bool,
    /// Tables `--apply` wrote (and `postmap`ed).
    pub tables: Vec<PathBuf>,
    /// Whether `--apply` created the master.cf service of the wait
    /// transport ([`super::WAIT_TRANSPORT`]).
    #[serde(default)]
    pub wait_service: bool,
    /// master.cf `-o` milter overrides `--apply` changed: what they said
    /// before and after, so that `--revert` gives master.cf back byte for
    /// byte.
    #[serde(default)]
    pub overrides: Vec<Override>,
}

/// One `-o smtpd_milters=…` / `-o non_smtpd_milters=…` of a master.cf
/// service.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct Override {
    /// `name/type`, as `postconf -M` names it (`submission/inet`).
    pub service: String,
    pub param: String,
    /// The value before `--apply`.
    pub before: String,
    /// The value `--apply` gave it.
    pub after: String,
}

/// What the Postfix instance delivers with, as far as the wait wiring
/// needs it (`postconf -xh`, i.e. with `$name` expanded: transport(5)
/// lookups inside `pipemap:{…}` did not expand `$virtual_transport` on
/// 3.7.11, they failed with "returns an empty string result").
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Site {
    /// virtual_mailbox_maps, one table per entry.
    pub mailbox_maps: Vec<String>,
    pub virtual_transport: String,
    /// virtual_mailbox_domains, one entry each.
    pub virtual_domains: Vec<String>,
    /// Domains of virtual_mailbox_domains that the administrator's own
    /// transport_maps sends somewhere by a domain key, with that result.
    pub domain_transports: Vec<(String, String)>,
}

/// What Postfix has now.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Current {
    /// `postconf -n`: explicitly set main.cf parameters.
    pub main: BTreeMap<String, String>,
    /// `postconf -M dualroute/unix`, white space collapsed; None: absent.
    pub service: Option<String>,
    /// Each table file's contents (None: absent) and whether its indexed
    /// form is missing or older than it.
    pub tables: BTreeMap<PathBuf, (Option<String>, bool)>,
    /// `postconf -M dualroute-wait/unix`, white space collapsed.
    pub wait_service: Option<String>,
    /// master.cf as it is.
    pub master_cf: String,
    pub site: Site,
}

/// One change to Postfix's configuration.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Change {
    Set {
        name: String,
        value: String,
        why: String,
    },
    Unset {
        name: String,
    },
    Service(Service),
    RemoveService(String),
    WriteTable {
        path: PathBuf,
        text: String,
    },
    Postmap(PathBuf),
    RemoveTable(PathBuf),
    /// Gives a master.cf `-o` override a new value, editing only that
    /// value (`postconf -P` rewrites the whole entry in its own layout,
    /// and `--revert` could not give master.cf back byte for byte).
    SetOverride {
        service: String,
        param: String,
        value: String,
        why: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Set { name, value, why } if why.is_empty() => {
                write!(f, "postconf -e '{name} = {value}'")
            }
            Change::Set { name, value, why } => {
                write!(f, "postconf -e '{name} = {value}'    # {why}")
            }
            Change::Unset { name } => write!(f, "postconf -X {name}"),
            Change::Service(s) => write!(
                f,
                "postconf -M {}='{}'{}",
                s.name(),
                collapse(&s.entry),
                s.params
                    .iter()
                    .map(|(k, v)| format!(" && postconf -P {}/{k}={v}", s.name()))
                    .collect::<String>()
            ),
            Change::RemoveService(name) => write!(f, "postconf -MX {name}"),
            Change::WriteTable { path, .. } => write!(f, "write {}", path.display()),
            Change::Postmap(path) => write!(f, "postmap hash:{}", path.display()),
            Change::RemoveTable(path) => {
                write!(f, "rm {} {}.db", path.display(), path.display())
            }
            Change::SetOverride {
                service,
                param,
                value,
                why,
            } => {
                write!(f, "master.cf {service}: -o {param}={value}")?;
                if !why.is_empty() {
                    write!(f, "    # {why}")?;
                }
                Ok(())
            }
        }
    }
}

/// The tables' paths and `hash:` references.
fn table_path(map_dir: &Path, t: &Table) -> PathBuf {
    map_dir.join(&t.file)
}

/// Splits a Postfix list value on commas and white space outside `{…}`
/// (Postfix's own rule: `pipemap:{hash:a, static:{b}}` is one entry).
pub fn list_entries(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0usize;
    for c in value.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth == 0 && (c == ',' || c.is_whitespace()) {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The service as `postconf -M` prints it, white space collapsed.
fn service_line(s: &Service) -> String {
    let mut line = collapse(&s.entry);
    for (k, v) in &s.params {
        line.push_str(&format!(" -o {k}={v}"));
    }
    line
}

/// The changes that bring Postfix from `current` to what `want` needs,
/// and the record of it. Running the changes and planning again yields no
/// changes.
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
    if let Some(catchall) = want.tables.iter().find(|t| t.file == super::CATCHALL_MAP) {
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
        &format!("{}/unix", super::TRANSPORT),
        current.service.as_deref(),
        before.service,
        &mut changes,
    );
    record.wait_service = plan_service(
        want.wait.as_ref(),
        &format!("{}/unix", super::WAIT_TRANSPORT),
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
fn with_wait(want: &PostfixConfig, map_dir: &Path, site: &Site) -> (PostfixConfig, Vec<String>) {
    let mut want = want.clone();
    let mut notes = Vec::new();
    let Some(catchall) = want.tables.iter().find(|t| t.file == super::CATCHALL_MAP) else {
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
                format!("{}:", super::WAIT_TRANSPORT),
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
    let transport_ref = format!("hash:{}", map_dir.join(super::TRANSPORT_MAP).display());
    match want
        .tables
        .iter_mut()
        .find(|t| t.file == super::TRANSPORT_MAP)
    {
        Some(t) => t.entries.extend(rows),
        None => want.tables.push(Table {
            file: super::TRANSPORT_MAP.into(),
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
        want.main.push(super::Param {
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
        want.main.push(super::Param {
            why: "unrouted mail of split/route domains waits in the queue".into(),
            name: "transport_maps".into(),
            value: transport_ref,
        });
    }
    want.wait = Some(super::wait_service());
    (want, notes)
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

/// The value a list parameter gets: its original text when the entries
/// are the original ones (so main.cf comes back as it was), None when it
/// was unset and is empty again.
fn restore_list(name: &str, entries: &[String], record: &Applied) -> Option<String> {
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
        changes.push(Change::RemoveService(format!("{}/unix", super::TRANSPORT)));
    }
    if record.wait_service && current.wait_service.is_some() {
        changes.push(Change::RemoveService(format!(
            "{}/unix",
            super::WAIT_TRANSPORT
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

/// Postfix's command-line tools on one configuration directory.
pub struct Postfix {
    pub config_dir: PathBuf,
}

impl Postfix {
    fn tool(name: &str) -> PathBuf {
        ["/usr/sbin", "/usr/bin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// Runs a Postfix tool with `-c CONFIG_DIR`; its stdout, or its own
    /// words on failure.
    fn run(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(Self::tool(tool))
            .arg("-c")
            .arg(&self.config_dir)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {tool} (is Postfix installed?): {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{tool} -c {} {}: {}{}",
                self.config_dir.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        }
    }

    /// Reads main.cf (explicit settings), the service and the tables.
    pub fn current(&self, tables: &[PathBuf]) -> Result<Current, String> {
        let main = self
            .run("postconf", &["-n"])?
            .lines()
            .filter_map(|l| l.split_once(" = ").or_else(|| l.split_once(" =")))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let name = format!("{}/unix", super::TRANSPORT);
        let service = self
            .run("postconf", &["-M", &name])?
            .lines()
            .next()
            .map(collapse)
            .filter(|s| !s.is_empty());
        let wait_name = format!("{}/unix", super::WAIT_TRANSPORT);
        let wait_service = self
            .run("postconf", &["-M", &wait_name])?
            .lines()
            .next()
            .map(collapse)
            .filter(|s| !s.is_empty());
        let master_path = self.config_dir.join("master.cf");
        let master_cf = std::fs::read_to_string(&master_path)
            .map_err(|e| format!("cannot read {}: {e}", master_path.display()))?;
        let site = self.site()?;
        let tables = tables
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).ok();
                let db = PathBuf::from(format!("{}.db", p.display()));
                let stale = match (modified(p), modified(&db)) {
                    (Some(src), Some(idx)) => idx < src,
                    _ => true,
                };
                (p.clone(), (text, stale))
            })
            .collect();
        Ok(Current {
            main,
            service,
            tables,
            wait_service,
            master_cf,
            site,
        })
    }

    /// What the wait wiring needs to know of this Postfix ([`Site`]).
    fn site(&self) -> Result<Site, String> {
        let names = [
            "virtual_mailbox_maps",
            "virtual_transport",
            "virtual_mailbox_domains",
            "transport_maps",
        ];
        let out = self.run("postconf", &[&["-xh"][..], &names[..]].concat())?;
        let mut values = out.lines().map(str::trim);
        let mut next = || values.next().unwrap_or("").to_owned();
        let (maps, vt, domains, transport) = (next(), next(), next(), next());
        let virtual_domains: Vec<String> = list_entries(&domains)
            .into_iter()
            .filter(|d| !d.contains(':') && !d.starts_with('/'))
            .collect();
        // The administrator's own transport tables: not ours (the
        // transport table and the pipemaps --apply adds), and not regexp
        // or pcre tables, which transport(5) queries with the full address
        // only (they come first in transport_maps and keep winning).
        let theirs: Vec<String> = list_entries(&transport)
            .into_iter()
            .filter(|t| {
                !t.starts_with("pipemap:")
                    && !t.ends_with(&format!("/{}", super::TRANSPORT_MAP))
                    && !t.starts_with("regexp:")
                    && !t.starts_with("pcre:")
            })
            .collect();
        let mut domain_transports = Vec::new();
        for d in &virtual_domains {
            for t in &theirs {
                if let Ok(hit) = self.run("postmap", &["-q", d, t]) {
                    domain_transports.push((d.clone(), hit.trim().to_owned()));
                    break;
                }
            }
        }
        Ok(Site {
            mailbox_maps: list_entries(&maps),
            virtual_transport: vt,
            virtual_domains,
            domain_transports,
        })
    }

    fn record_path(&self) -> PathBuf {
        self.config_dir.join(RECORD)
    }

    pub fn record(&self) -> Result<Option<Applied>, String> {
        let path = self.record_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_yaml::from_str(&text).map(Some).map_err(|e| {
                format!(
                    "{}: {e}; remove it only if you undo --apply by hand",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    fn save_record(&self, record: Option<&Applied>) -> Result<(), String> {
        let path = self.record_path();
        match record {
            Some(r) => {
                let text = serde_yaml::to_string(r).map_err(|e| e.to_string())?;
                std::fs::write(
                    &path,
                    format!(
                        "# written by dualroute postfix-config --apply; --revert reads it\n{text}"
                    ),
                )
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
            },
        }
    }

    /// Copies main.cf and master.cf to `NAME.dualroute-YYYYMMDDTHHMMSS`.
    fn backup(&self) -> Result<Vec<PathBuf>, String> {
        let stamp = timestamp();
        let mut made = Vec::new();
        for name in ["main.cf", "master.cf"] {
            let from = self.config_dir.join(name);
            let to = self.config_dir.join(format!("{name}.dualroute-{stamp}"));
            std::fs::copy(&from, &to)
                .map_err(|e| format!("cannot back up {}: {e}", from.display()))?;
            made.push(to);
        }
        Ok(made)
    }

    fn execute(&self, change: &Change) -> Result<(), String> {
        match change {
            Change::Set { name, value, .. } => {
                self.run("postconf", &["-e", &format!("{name} = {value}")])?;
            }
            Change::Unset { name } => {
                self.run("postconf", &["-X", name])?;
            }
            Change::Service(s) => {
                self.run("postconf", &["-M", &format!("{}={}", s.name(), s.entry)])?;
                for (k, v) in &s.params {
                    self.run("postconf", &["-P", &format!("{}/{k}={v}", s.name())])?;
                }
            }
            Change::RemoveService(name) => {
                self.run("postconf", &["-MX", name])?;
            }
            Change::WriteTable { path, text } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                }
                std::fs::write(path, text)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Change::Postmap(path) => {
                self.run("postmap", &[&format!("hash:{}", path.display())])?;
            }
            Change::SetOverride {
                service,
                param,
                value,
                ..
            } => {
                let path = self.config_dir.join("master.cf");
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let edited = set_override(&text, service, param, value).ok_or_else(|| {
                    format!(
                        "{}: {service} has no -o {param}= any more; run --apply again",
                        path.display()
                    )
                })?;
                std::fs::write(&path, edited)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Change::RemoveTable(path) => {
                for p in [
                    path.clone(),
                    PathBuf::from(format!("{}.db", path.display())),
                ] {
                    match std::fs::remove_file(&p) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(format!("cannot remove {}: {e}", p.display()))
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs the changes after a backup, saves the record, runs
    /// `postfix check` and reloads a running Postfix. Prints each step.
    pub fn commit(&self, changes: &[Change], record: Option<&Applied>) -> Result<(), String> {
        for b in self.backup()? {
            println!("backup: {}", b.display());
        }
        for c in changes {
            println!("{c}");
            self.execute(c)?;
        }
        self.save_record(record)?;
        register(Path::new(REGISTRY), &self.config_dir, record.is_some());
        self.run("postfix", &["check"])
            .map_err(|e| format!("postfix check failed after the changes (backups above): {e}"))?;
        println!("postfix check: OK");
        if self.run("postfix", &["status"]).is_ok() {
            self.run("postfix", &["reload"])?;
            println!("postfix reload: done");
        } else {
            println!("Postfix is not running: the changes take effect when it starts");
        }
        Ok(())
    }
}

/// Adds `config_dir` to (or removes it from) the registry the package's
/// prerm reads ([`REGISTRY`]), one directory a line. Only where the
/// package's state directory exists: without the package nothing would
/// read it. A failure is said, not fatal: --apply itself succeeded.
fn register(registry: &Path, config_dir: &Path, applied: bool) {
    if !registry.parent().is_some_and(Path::is_dir) {
        return;
    }
    let dir = std::fs::canonicalize(config_dir).unwrap_or_else(|_| config_dir.to_owned());
    let dir = dir.display().to_string();
    let text = std::fs::read_to_string(registry).unwrap_or_default();
    let mut lines: Vec<&str> = text.lines().filter(|l| *l != dir).collect();
    if applied {
        lines.push(&dir);
    }
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    if let Err(e) = std::fs::write(registry, out) {
        eprintln!(
            "WARNING: cannot write {}: {e}; removing the package will not revert {dir} (run `dualroute postfix-config --revert --postfix-config-dir {dir}` before)",
            registry.display()
        );
    }
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The backup suffix: UTC (local time needs a time zone database), as
/// `YYYYMMDDTHHMMSSZ`.
fn timestamp() -> String {
    let (y, m, d, hh, mm, ss) = crate::state::civil(crate::state::now());
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postfix::Param;

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
        assert!(
            record.set.is_empty() || !record.set.contains_key("dualroute_destination_rate_delay")
        );
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

    #[test]
    fn timestamp_format() {
        let t = timestamp();
        assert_eq!(t.len(), 16, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
