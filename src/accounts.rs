//! Which addresses have a mailbox here (DESIGN.md §5 `accounts:`).
//!
//! A domain may list a million mailboxes, so the set is compact: all local
//! parts of a domain live in one string arena, indexed by a sorted vector of
//! (offset, length) pairs; a lookup is a binary search. No per-entry heap
//! allocation, about 8 bytes of overhead per address.

use crate::address::{normalize_domain, Address};
use crate::config::{AccountSource, LocalPartCase};
use std::{borrow::Cow, fmt, path::Path};

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

/// What loading found, for `dualroute check` and the log.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct LoadReport {
    pub accounts: usize,
    /// Entries of other domains (ignored by design).
    pub other_domains: usize,
    /// Postfix map keys that are not accounts: `@domain` catch-alls, bare
    /// local parts, regular expressions.
    pub not_accounts: usize,
}

/// Loads the accounts of `domain` (A-label, lower case) from its sources.
pub fn load(
    domain: &str,
    sources: &[AccountSource],
    rules: &MatchRules,
) -> Result<(Accounts, LoadReport), LoadError> {
    let mut acc = Accounts::default();
    let mut report = LoadReport::default();
    for source in sources {
        match source {
            AccountSource::List(list) => {
                for a in list {
                    if a.0.domain == domain {
                        acc.push(&rules.key(&a.0.unquoted_local()))?;
                    } else {
                        report.other_domains += 1;
                    }
                }
            }
            AccountSource::File(path) => {
                read_lines(path, |n, line| {
                    let line = line.trim();
                    let comment = [" #", "\t#"].iter().filter_map(|c| line.find(c)).min();
                    let entry = comment.map_or(line, |i| line[..i].trim_end());
                    add_entry(&mut acc, &mut report, domain, rules, entry).map_err(|m| (Some(n), m))
                })?;
            }
            AccountSource::PostfixMap(path) => {
                read_lines(path, |n, line| {
                    // Postfix table syntax (postmap(1)): a line that starts
                    // with whitespace continues the previous one.
                    if line.starts_with([' ', '\t']) {
                        return Ok(());
                    }
                    let key = line.split_ascii_whitespace().next().unwrap_or("");
                    if key.starts_with('@') || !key.contains('@') || key.starts_with('/') {
                        report.not_accounts += 1;
                        return Ok(());
                    }
                    add_entry(&mut acc, &mut report, domain, rules, key).map_err(|m| (Some(n), m))
                })?;
            }
        }
    }
    acc.finish();
    report.accounts = acc.len();
    Ok((acc, report))
}

fn add_entry(
    acc: &mut Accounts,
    report: &mut LoadReport,
    domain: &str,
    rules: &MatchRules,
    entry: &str,
) -> Result<(), String> {
    let entry = entry.trim();
    let Some(at) = entry.rfind('@') else {
        return Err(format!("{entry:?} is not an address (missing '@')"));
    };
    let d = &entry[at + 1..];
    // Fast path for the common case (an ASCII domain), avoiding IDNA work
    // per line on million-line files.
    let ours = if d.is_ascii() {
        d.strip_suffix('.')
            .unwrap_or(d)
            .eq_ignore_ascii_case(domain)
    } else {
        normalize_domain(d).map(|n| n == domain).unwrap_or(false)
    };
    if !ours {
        report.other_domains += 1;
        return Ok(());
    }
    let local = &entry[..at];
    let unquoted = if local.starts_with('"') {
        Cow::Owned(
            Address::parse(entry)
                .map_err(|e| format!("{entry:?}: {e}"))?
                .unquoted_local()
                .into_owned(),
        )
    } else if local.is_empty() || local.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("{entry:?} is not a valid address"));
    } else {
        Cow::Borrowed(local)
    };
    acc.push(&rules.key(&unquoted)).map_err(|e| e.message)
}

/// Calls `each` with every non-blank, non-comment line, streaming the file
/// so that a million-line table never sits in memory twice.
fn read_lines(
    path: &Path,
    mut each: impl FnMut(usize, &str) -> Result<(), (Option<usize>, String)>,
) -> Result<(), LoadError> {
    use std::io::BufRead;
    let source = path.display().to_string();
    let fail = |line, message| LoadError {
        file: source.clone(),
        line,
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| fail(None, format!("cannot read: {e}")))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => n += 1,
            Err(e) => return Err(fail(Some(n + 1), format!("cannot read: {e}"))),
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        each(n, line).map_err(|(line, message)| fail(line, message))?;
    }
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
            AccountSource::PostfixMap(map),
        ];
        let (acc, report) = load("example.com", &sources, &rules()).unwrap();
        for present in ["alice", "bob", "carol", "dave", "erin", "john doe"] {
            assert!(acc.contains(present), "{present}");
        }
        assert!(!acc.contains(""));
        assert!(!acc.contains("zed"));
        assert_eq!(
            report,
            LoadReport {
                accounts: 6,
                other_domains: 2,
                not_accounts: 2
            }
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
}
