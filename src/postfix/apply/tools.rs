//! Running the changes with Postfix's own tools on one configuration
//! directory: reading it (`postconf -n`/`-M`/`-xh`), the timestamped
//! backups of main.cf and master.cf, the record, the changes themselves
//! (`postconf`, `postmap`), `postfix check` and the reload.

use super::{collapse, list_entries, Applied, Change, Current, Site, RECORD, REGISTRY};
use crate::postfix::master_cf::set_override;
use std::path::{Path, PathBuf};
use std::process::Command;

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
        let name = format!("{}/unix", crate::postfix::TRANSPORT);
        let service = self
            .run("postconf", &["-M", &name])?
            .lines()
            .next()
            .map(collapse)
            .filter(|s| !s.is_empty());
        let wait_name = format!("{}/unix", crate::postfix::WAIT_TRANSPORT);
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
                    && !t.ends_with(&format!("/{}", crate::postfix::TRANSPORT_MAP))
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

    /// Copies main.cf and master.cf to `NAME.dualroute-YYYYMMDDTHHMMSSZ`
    /// (`…Z-2`, `-3`… for another run in the same second: two runs of a
    /// script, an --apply then a --revert, must not overwrite the backup
    /// of what was there first).
    fn backup(&self) -> Result<Vec<PathBuf>, String> {
        let second = timestamp();
        let taken = |stamp: &String| {
            ["main.cf", "master.cf"].iter().any(|name| {
                self.config_dir
                    .join(format!("{name}.dualroute-{stamp}"))
                    .exists()
            })
        };
        let stamp = std::iter::once(second.clone())
            .chain((2..).map(|n| format!("{second}-{n}")))
            .find(|s| !taken(s))
            .unwrap_or(second);
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

    /// What a `--revert` leaves in place, to be said after it (issue 25:
    /// it left the backups and the catch-all Maildir without a word).
    /// The backups are the administrator's way back to any earlier state,
    /// and the catch-all holds mail: neither is removed here.
    pub fn left_behind(&self, maildirs: &[(String, String)]) -> Vec<String> {
        let mut lines = Vec::new();
        let mut backups: Vec<PathBuf> = std::fs::read_dir(&self.config_dir)
            .map(|dir| {
                dir.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.contains(".cf.dualroute-"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        backups.sort();
        if !backups.is_empty() {
            lines.push(format!(
                "left in place: {} backups of main.cf and master.cf that --apply and --revert made (remove them when you no longer need them: rm {}/*.cf.dualroute-*):",
                backups.len(),
                self.config_dir.display()
            ));
            lines.extend(backups.iter().map(|b| format!("  {}", b.display())));
        }
        // Postfix's virtual(8) finds a Maildir below virtual_mailbox_base,
        // which must be absolute for it to deliver at all.
        let base = self
            .run("postconf", &["-xh", "virtual_mailbox_base"])
            .map(|b| PathBuf::from(b.trim()))
            .unwrap_or_default();
        for (domain, maildir) in maildirs.iter().filter(|_| base.is_absolute()) {
            let dir = base.join(maildir);
            if !dir.is_dir() {
                continue;
            }
            let messages: usize = ["new", "cur"]
                .iter()
                .filter_map(|sub| std::fs::read_dir(dir.join(sub)).ok())
                .map(|entries| entries.flatten().filter(|e| e.path().is_file()).count())
                .sum();
            lines.push(format!(
                "left in place: {}/: the catch-all Maildir of {domain}, {messages} messages: mail for addresses without a mailbox here that was not routed; read each and forward it to whom it was for (never delete it unread)",
                dir.display().to_string().trim_end_matches('/')
            ));
        }
        lines
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

    #[test]
    fn timestamp_format() {
        let t = timestamp();
        assert_eq!(t.len(), 16, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
