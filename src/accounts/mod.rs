//! Which addresses have a mailbox here (docs/design.md §5 `accounts:`).
//!
//! A domain may list a million mailboxes, so the set is compact: all local
//! parts of a domain live in one string arena, indexed by a sorted vector of
//! (offset, length) pairs; a lookup is a binary search. No per-entry heap
//! allocation, about 8 bytes of overhead per address.

mod command;
mod read;

use crate::address::{normalize_domain, Address};
use crate::config::{AccountSource, LocalPartCase};
use read::{postmap_keys, read_lines, read_stable, stale_db};
use std::{borrow::Cow, fmt};

/// How local parts are compared (`local_part_case`, `recipient_delimiter`).
#[derive(Clone, Debug)]
pub struct MatchRules {
    pub case: LocalPartCase,
    pub delimiters: String,
}

impl MatchRules {
    /// The comparison key of an unquoted local part.
    pub fn key<'a>(&self, unquoted_local: &'a str) -> Cow<'a, str> {
        match self.case {
            LocalPartCase::Sensitive => Cow::Borrowed(unquoted_local),
            LocalPartCase::Insensitive
                if unquoted_local
                    .bytes()
                    .any(|b| b.is_ascii_uppercase() || b >= 0x80) =>
            {
                Cow::Owned(unquoted_local.to_lowercase())
            }
            LocalPartCase::Insensitive => Cow::Borrowed(unquoted_local),
        }
    }

    /// `bob+news` → `bob`: the part before the first delimiter, as Postfix
    /// does with `recipient_delimiter`. `None` when there is no extension.
    pub fn base<'a>(&self, key: &'a str) -> Option<&'a str> {
        if self.delimiters.is_empty() {
            return None;
        }
        let i = key.find(|c| self.delimiters.contains(c))?;
        (i > 0).then(|| &key[..i])
    }
}

/// The set of local parts with a mailbox here, for one domain.
#[derive(Clone, Default)]
pub struct Accounts {
    arena: String,
    index: Vec<(u32, u32)>,
}

impl fmt::Debug for Accounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Accounts({} addresses)", self.len())
    }
}

impl Accounts {
    fn get(&self, (start, len): (u32, u32)) -> &str {
        &self.arena[start as usize..(start + len) as usize]
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether a comparison key (see [`MatchRules::key`]) is an account.
    pub fn contains(&self, key: &str) -> bool {
        self.index
            .binary_search_by(|&e| self.get(e).cmp(key))
            .is_ok()
    }

    fn push(&mut self, key: &str) -> Result<(), LoadError> {
        let start = u32::try_from(self.arena.len()).ok();
        let len = u32::try_from(key.len()).ok();
        match (start, len) {
            (Some(s), Some(l)) if s.checked_add(l).is_some() => {
                self.arena.push_str(key);
                self.index.push((s, l));
                Ok(())
            }
            _ => Err(LoadError {
                file: String::new(),
                line: None,
                message: "more than 4 GiB of account names".into(),
            }),
        }
    }

    /// Where the entries of a source start, to drop them when the source is
    /// read again (see [`read_stable`]).
    fn mark(&self) -> (usize, usize) {
        (self.arena.len(), self.index.len())
    }

    fn reset(&mut self, (arena, index): (usize, usize)) {
        self.arena.truncate(arena);
        self.index.truncate(index);
    }

    fn finish(&mut self) {
        let arena = &self.arena;
        let get = |(s, l): (u32, u32)| &arena[s as usize..(s + l) as usize];
        self.index.sort_unstable_by(|&a, &b| get(a).cmp(get(b)));
        self.index.dedup_by(|a, b| get(*a) == get(*b));
        self.index.shrink_to_fit();
        self.arena.shrink_to_fit();
    }
}

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
                        acc.push(&rules.key(&a.0.unquoted_local()))?;
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
                        Some(_) => postmap_keys(table, &mut each),
                    }
                })?;
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
                .map_err(|e| e.message)?;
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
    // RFC 5321 §4.1.2 Dot-string: atext and dots, UTF-8 allowed (RFC
    // 6531); no spaces, controls or specials outside quotes.
    if local.is_empty() {
        return Err(bad("empty local part"));
    }
    if let Some(&b) = local.as_bytes().iter().find(|&&b| {
        b <= b' '
            || matches!(
                b,
                0x7f | b'('
                    | b')'
                    | b'<'
                    | b'>'
                    | b'['
                    | b']'
                    | b':'
                    | b';'
                    | b'@'
                    | b'\\'
                    | b','
                    | b'"'
            )
    }) {
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
        acc.push(&rules.key(local)).map_err(|e| e.message)?;
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
    use std::io::Write;

    fn rules() -> MatchRules {
        MatchRules {
            case: LocalPartCase::Insensitive,
            delimiters: "+".into(),
        }
    }

    #[test]
    fn base_and_key() {
        let r = rules();
        assert_eq!(r.key("Bob"), "bob");
        assert_eq!(r.base("bob+news"), Some("bob"));
        assert_eq!(r.base("+news"), None);
        assert_eq!(r.base("bob"), None);
        let r = MatchRules {
            case: LocalPartCase::Sensitive,
            delimiters: "".into(),
        };
        assert_eq!(r.key("Bob"), "Bob");
        assert_eq!(r.base("bob+news"), None);
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
