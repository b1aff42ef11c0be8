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
//!
//! This file holds what the jobs share: the record, what Postfix has now
//! and the vocabulary of changes. The jobs have a file each: plan.rs
//! computes the changes of an `--apply`, wait.rs the wait wiring it adds,
//! revert.rs the changes of a `--revert`, tools.rs runs them with Postfix's
//! own tools (backups, the record, `postfix check`); master.cf editing is
//! src/postfix/master_cf.rs.

mod plan;
mod revert;
#[cfg(test)]
mod tests;
mod tools;
mod wait;

#[cfg(test)]
pub use plan::plan_apply;
pub use plan::plan_apply_notes;
pub use revert::{catchall_maildirs, plan_revert};
pub use tools::Postfix;

use super::{Service, Table};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

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
