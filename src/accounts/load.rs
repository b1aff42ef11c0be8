//! Loading a domain's accounts from its sources (docs/design.md §5
//! `accounts:`): lists in milter.yaml, files, Postfix maps, Postfix's
//! own recipient tables and commands, each line checked to be an address,
//! into one [`Accounts`] set.

use super::command;
use super::postfix::Tables;
use super::read::{postmap_keys, read_lines, read_stable, stale_db};
use super::set::{Accounts, MatchRules, TooMany};
use crate::address::{forbidden_in_local_part, normalize_domain, Address};
use crate::config::AccountSource;
use std::fmt;

/// A problem in an account source.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub struct LoadError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl From<TooMany> for LoadError {
    fn from(_: TooMany) -> Self {
        LoadError {
            file: String::new(),
            line: None,
            message: "more than 4 GiB of account names".into(),
        }
    }
}

/// What one source gave, for `dualroute check` and the log.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct SourceReport {
    /// `file /path`, `postfix_map hash:/path`, `list`.
    pub source: String,
    /// Entries of the domain (before merging with the other sources).
    pub accounts: usize,
    /// Entries of other domains (ignored by design).
    pub other_domains: usize,
    /// Postfix map keys that are not accounts: `@domain` catch-alls, bare
    /// local parts, regular expressions.
    pub not_accounts: usize,
}

impl SourceReport {
    /// The source is read again from the start.
    fn restart(&mut self) {
        self.accounts = 0;
        self.other_domains = 0;
        self.not_accounts = 0;
    }
}

/// What loading found, for `dualroute check` and the log.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct LoadReport {
    /// Distinct accounts of the domain, all sources together.
    pub accounts: usize,
    pub other_domains: usize,
    pub not_accounts: usize,
    pub sources: Vec<SourceReport>,
    /// Things an administrator should fix that do not stop the load.
    pub warnings: Vec<String>,
    /// `postfix:` sources: each virtual alias of the domain (full
    /// address, lower case) with what Postfix expands it to, for the
    /// check that no alias is expanded after the milter into an address
    /// the milter would route (docs/design.md "Aliases").
    pub aliases: Vec<(String, Vec<String>)>,
    /// `postfix:` sources: main.cf and the tables it names, with their
    /// modification times before they were read, watched for reloads.
    pub watched: Vec<(std::path::PathBuf, Option<std::time::SystemTime>)>,
}

/// Loads the accounts of `domain` (A-label, lower case) from its sources.
///
/// Every line must be an address, a comment or blank: a line that is not
/// (a stray `#tag`, a tab, a NUL, Latin-1 bytes) would otherwise silently
/// drop a mailbox, and in split mode its mail would be routed away. A
/// domain left without any account is an error for the same reason.
pub fn load(
    domain: &str,
    sources: &[AccountSource],
    rules: &MatchRules,
) -> Result<(Accounts, LoadReport), LoadError> {
    let mut acc = Accounts::default();
    let mut report = LoadReport::default();
    for source in sources {
        let mut r = SourceReport::default();
        match source {
            AccountSource::List(list) => {
                r.source = "list".into();
                for a in list {
                    if a.0.domain == domain {
                        acc.push(&rules.key(&a.0.unquoted_local()))
                            .map_err(LoadError::from)?;
                        r.accounts += 1;
                    } else {
                        r.other_domains += 1;
                    }
                }
            }
            AccountSource::File(path) => {
                r.source = format!("file {}", path.display());
                let mark = acc.mark();
                read_stable(path, &mut || {
                    acc.reset(mark);
                    r.restart();
                    read_lines(path, |n, line| {
                        let comment = [" #", "\t#"].iter().filter_map(|c| line.find(c)).min();
                        let entry = comment.map_or(line, |i| &line[..i]).trim();
                        add_entry(&mut acc, &mut r, domain, rules, entry).map_err(|m| (Some(n), m))
                    })
                })?;
            }
            AccountSource::PostfixMap(table) => {
                r.source = format!("postfix_map {table}");
                if table.kind.is_none() {
                    report.warnings.extend(stale_db(&table.path));
                }
                let compiled = table.compiled_file();
                let mark = acc.mark();
                read_stable(&compiled, &mut || {
                    acc.reset(mark);
                    r.restart();
                    let mut each = |n: usize, line: &str| {
                        // Postfix table syntax (postmap(1)): a line that
                        // starts with whitespace continues the previous one.
                        if line.starts_with([' ', '\t']) {
                            return Ok(());
                        }
                        let key = line.split([' ', '\t']).next().unwrap_or("");
                        if key.starts_with('@') || !key.contains('@') || key.starts_with('/') {
                            r.not_accounts += 1;
                            return Ok(());
                        }
                        add_entry(&mut acc, &mut r, domain, rules, key).map_err(|m| (Some(n), m))
                    };
                    match &table.kind {
                        None => read_lines(&table.path, &mut each),
                        Some(_) => postmap_keys(table, None, &mut each),
                    }
                })?;
            }
            AccountSource::Postfix(dir) => {
                r.source = format!("postfix {}", dir.display());
                let tables = Tables::read(dir, false)?;
                postfix_source(&tables, &mut acc, &mut r, &mut report, domain, rules)?;
            }
            AccountSource::Command(cmd) => {
                // Only the program: its arguments may hold a password.
                r.source = format!("command {}", cmd.program());
                command::read(cmd, &mut |n, entry| {
                    add_entry(&mut acc, &mut r, domain, rules, entry).map_err(|m| (Some(n), m))
                })?;
            }
        }
        report.other_domains += r.other_domains;
        report.not_accounts += r.not_accounts;
        report.sources.push(r);
    }
    acc.finish();
    report.accounts = acc.len();
    if acc.is_empty() {
        let names: Vec<&str> = report.sources.iter().map(|r| r.source.as_str()).collect();
        return Err(LoadError {
            file: names.join(", "),
            line: None,
            message: format!(
                "no account of {domain} in its sources: every recipient here would count as without a mailbox (split would route all of them away, dual would refuse all of them); fix the sources, or remove `accounts` if that is meant"
            ),
        });
    }
    Ok((acc, report))
}

/// The accounts of `domain` in Postfix's tables: every `user@domain` key
/// of `virtual_mailbox_maps` and of `virtual_alias_maps` (an alias is an
/// address Postfix delivers, so the milter must keep it; where its targets
/// would be routed is checked with the whole policy, src/policy/aliases.rs).
/// A catch-all (`@domain`) is not an account: every address would be one,
/// and nothing would be routed. A table that cannot be listed, or a domain
/// in `mydestination` (whose recipients are the system's users), is an
/// error: accounts missing from it would be routed away.
fn postfix_source(
    tables: &Tables,
    acc: &mut Accounts,
    r: &mut SourceReport,
    report: &mut LoadReport,
    domain: &str,
    rules: &MatchRules,
) -> Result<(), LoadError> {
    let main_cf = tables.config_dir.join("main.cf").display().to_string();
    let fail = |message: String| LoadError {
        file: main_cf.clone(),
        line: None,
        message,
    };
    if let Some((param, table)) = tables.unlistable.first() {
        return Err(fail(format!(
            "{param} has {table}, which cannot be listed: the `postfix` source would miss its addresses of {domain} and they would be routed away; list them with a `command:` source (e.g. `mysql -N -B -e 'SELECT ...'`, README \"Accounts from a directory\") and the listable tables with `postfix_map:`"
        )));
    }
    if tables.local_domains.iter().any(|d| d == domain) {
        return Err(fail(format!(
            "{domain} is in mydestination: its recipients are the system's users and alias_maps (local_recipient_maps), which the `postfix` source does not list; use a `file:` or `command:` source (e.g. /usr/bin/getent passwd)"
        )));
    }
    for (key, table) in &tables.mailboxes {
        if key.rsplit_once('@').is_some_and(|(_, d)| d == domain) {
            add_entry(acc, r, domain, rules, key).map_err(|m| fail(format!("{table}: {m}")))?;
        } else {
            r.other_domains += 1;
        }
    }
    if let Some((targets, table)) = tables.aliases.get(&format!("@{domain}")) {
        r.not_accounts += 1;
        report.warnings.push(format!(
            "@{domain} in {table} (virtual_alias_maps) is a catch-all alias to {}: it is not an account; the milter routes every address of {domain} that is not an account before Postfix applies it, so only the accounts without their own alias reach it (docs/design.md \"Aliases\")",
            targets.join(", ")
        ));
    }
    let mut keys: Vec<(String, &str)> = tables.alias_keys_of(domain).collect();
    keys.sort();
    for (key, table) in keys {
        add_entry(acc, r, domain, rules, &key).map_err(|m| fail(format!("{table}: {m}")))?;
        let leaves = tables
            .expand(&key)
            .map_err(|e| fail(format!("{table}: alias {e}")))?;
        report.aliases.push((key, leaves));
    }
    report.watched.extend(tables.watched.iter().cloned());
    Ok(())
}

/// Checks that `entry` is an address and, when it is of `domain`, adds it.
fn add_entry(
    acc: &mut Accounts,
    report: &mut SourceReport,
    domain: &str,
    rules: &MatchRules,
    entry: &str,
) -> Result<(), String> {
    let bad = |why: &str| format!("{entry:?} is not an address ({why}): one address per line");
    if entry.starts_with('"') {
        // Quoted local part (RFC 5321 §4.1.2): the full parser.
        let a = Address::parse(entry).map_err(|e| bad(&e.to_string()))?;
        if a.domain == domain {
            acc.push(&rules.key(&a.unquoted_local()))
                .map_err(|e| LoadError::from(e).message)?;
            report.accounts += 1;
        } else {
            report.other_domains += 1;
        }
        return Ok(());
    }
    let Some(at) = entry.rfind('@') else {
        return Err(bad("missing '@'"));
    };
    let (local, d) = (&entry[..at], &entry[at + 1..]);
    if local.is_empty() {
        return Err(bad("empty local part"));
    }
    if let Some(&b) = local
        .as_bytes()
        .iter()
        .find(|&&b| forbidden_in_local_part(b))
    {
        return Err(bad(&format!("{:?} in the local part", b as char)));
    }
    // Fast path for the common case, an entry of this very domain (already
    // a valid name); other names are checked, and only non-ASCII ones pay
    // for IDNA, which matters on million-line files.
    let bare = d.strip_suffix('.').unwrap_or(d);
    let ours = if bare.eq_ignore_ascii_case(domain) {
        true
    } else if d.is_ascii() {
        let label_ok = |l: &str| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if !bare.split('.').all(label_ok) {
            return Err(bad(&format!("{d:?} is not a domain name")));
        }
        false
    } else {
        normalize_domain(d).map_err(|e| bad(&e.to_string()))? == domain
    };
    if ours {
        acc.push(&rules.key(local))
            .map_err(|e| LoadError::from(e).message)?;
        report.accounts += 1;
    } else {
        report.other_domains += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigAddress;
    use crate::config::LocalPartCase;
    use std::io::Write;

    fn rules() -> MatchRules {
        MatchRules {
            case: LocalPartCase::Insensitive,
            delimiters: "+".into(),
        }
    }

    #[test]
    fn sources_merge_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("accounts");
        let map = dir.path().join("vmailbox");
        let mut f = std::fs::File::create(&file).unwrap();
        writeln!(f, "# comment\nAlice@Example.com\n\n  bob@example.com   # trailing\nzed@other.example\n\"john doe\"@example.com").unwrap();
        let mut f = std::fs::File::create(&map).unwrap();
        writeln!(f, "carol@example.com  example.com/carol/\n@example.com  example.com/catchall/\n  continued\nlocalonly x\ndave@EXAMPLE.COM. d/").unwrap();
        let list = AccountSource::List(vec![
            "erin@example.com".parse::<ConfigAddress>().unwrap(),
            "x@y.example".parse().unwrap(),
        ]);
        let sources = [
            list,
            AccountSource::File(file),
            AccountSource::PostfixMap(crate::config::PostfixTable {
                kind: None,
                path: map.clone(),
            }),
        ];
        let (acc, report) = load("example.com", &sources, &rules()).unwrap();
        for present in ["alice", "bob", "carol", "dave", "erin", "john doe"] {
            assert!(acc.contains(present), "{present}");
        }
        assert!(!acc.contains(""));
        assert!(!acc.contains("zed"));
        assert_eq!(
            (report.accounts, report.other_domains, report.not_accounts),
            (6, 2, 2)
        );
        let per_source: Vec<_> = report
            .sources
            .iter()
            .map(|s| (s.accounts, s.other_domains, s.not_accounts))
            .collect();
        assert_eq!(per_source, [(1, 1, 0), (3, 1, 0), (2, 0, 2)]);
        assert_eq!(
            report.sources[2].source,
            format!("postfix_map {}", map.display())
        );
    }

    #[test]
    fn bad_line_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("accounts");
        std::fs::write(&file, "a@example.com\nnot-an-address\n").unwrap();
        let err = load(
            "example.com",
            &[AccountSource::File(file.clone())],
            &rules(),
        )
        .unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(
            err.to_string()
                .starts_with(&format!("{}:2: ", file.display())),
            "{err}"
        );
        let missing = load(
            "example.com",
            &[AccountSource::File(dir.path().join("nope"))],
            &rules(),
        )
        .unwrap_err();
        assert!(missing.message.contains("cannot read"), "{missing}");
    }

    #[test]
    fn entries_that_are_not_addresses() {
        let mut acc = Accounts::default();
        let mut r = SourceReport::default();
        for bad in [
            "alice@example.com#pilot",
            "alice@example.com\tx",
            "alice@example.com\0",
            "alice@",
            "@example.com",
            "al ice@example.com",
            "alice@-example.com",
            "alice@[192.0.2.1]",
        ] {
            assert!(
                add_entry(&mut acc, &mut r, "example.com", &rules(), bad).is_err(),
                "{bad:?}"
            );
        }
        for good in [
            "alice@example.com",
            "a.b+c@EXAMPLE.com.",
            "jörg@example.com",
            "x@bücher.example",
        ] {
            add_entry(&mut acc, &mut r, "example.com", &rules(), good).unwrap();
        }
        assert_eq!((r.accounts, r.other_domains), (3, 1));
    }
}
