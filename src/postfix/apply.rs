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
const LISTS: [&str; 3] = ["smtpd_milters", "transport_maps", "virtual_mailbox_maps"];

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
        }
    }
}

/// The tables' paths and `hash:` references.
fn table_path(map_dir: &Path, t: &Table) -> PathBuf {
    map_dir.join(&t.file)
}

/// Splits a Postfix list value.
pub fn list_entries(value: &str) -> Vec<String> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
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

    match (&want.service, &current.service) {
        (Some(s), now) if now.as_deref() != Some(service_line(s).as_str()) => {
            record.service = record.service || now.is_none();
            changes.push(Change::Service(s.clone()));
        }
        (None, Some(_)) if before.service => {
            record.service = false;
            changes.push(Change::RemoveService(format!("{}/unix", super::TRANSPORT)));
        }
        _ => {}
    }

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
    (changes, record)
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
    fn timestamp_format() {
        let t = timestamp();
        assert_eq!(t.len(), 16, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
