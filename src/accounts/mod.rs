//! Which addresses have a mailbox here (docs/design.md §5 `accounts:`).
//!
//! A domain may list millions of mailboxes, and every RCPT of a managed
//! domain looks one up, so the set is compact and a lookup touches little
//! memory: all local parts of a domain live in one byte arena, each behind
//! its length, and an open-addressing hash table of arena offsets, each
//! with 32 bits of its key's hash, finds them: 11 to 22 bytes of overhead
//! per address (8-byte slots, 3/8 to 3/4 full, and a length byte), and two
//! cache misses per lookup (the slot, then the key)
//! where a binary search over a million entries took about twenty
//! (BENCHMARKS.md, "Accounts").

mod command;
mod read;

use crate::address::{forbidden_in_local_part, normalize_domain, Address};
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
        let i = match self.delimiters.as_bytes() {
            [] => return None,
            // One ASCII delimiter, the usual `+`: a byte search (this runs
            // for every RCPT that is not an account as it stands).
            &[d] => key.bytes().position(|b| b == d)?,
            _ => key.find(|c| self.delimiters.contains(c))?,
        };
        (i > 0).then(|| &key[..i])
    }
}

/// The set of local parts with a mailbox here, for one domain.
#[derive(Clone, Default)]
pub struct Accounts {
    /// Every key, each behind its length as a LEB128 number (one byte below
    /// 128 bytes), one after the other. While loading it may hold a key
    /// twice; [`Accounts::finish`] keeps one of each.
    arena: Vec<u8>,
    /// The hash table: the upper 32 bits of a key's hash, then its arena
    /// offset + 1 in the lower 32 (0: an empty slot). The hash bits let a
    /// probe pass other keys without reading them. A power of two long, at
    /// most 3/4 full, probed linearly.
    slots: Vec<u64>,
    len: usize,
}

impl fmt::Debug for Accounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Accounts({} addresses)", self.len())
    }
}

/// The hash of a key: eight bytes at a time, each word multiplied in,
/// then MurmurHash3's 64-bit finaliser, so that keys differing in one
/// digit land far apart. Not keyed: the table is built from the
/// administrator's own files, so no outside party chooses where its keys
/// land (a RCPT only probes).
fn hash(key: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = (key.len() as u64).wrapping_mul(K);
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl Accounts {
    /// Where the key of the entry at `offset` starts and ends.
    fn key_range(&self, offset: usize) -> std::ops::Range<usize> {
        let (mut len, mut shift, mut at) = (0usize, 0, offset);
        while let Some(&b) = self.arena.get(at) {
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            at += 1;
            if b < 0x80 {
                break;
            }
        }
        at..at + len
    }

    /// The key of the entry at `offset`.
    fn key_at(&self, offset: usize) -> &[u8] {
        self.arena.get(self.key_range(offset)).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Every comparison key, in no particular order (the shrink guard's
    /// list of the addresses two account lists disagree on).
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.slots
            .iter()
            .filter(|&&s| s != 0)
            .filter_map(move |&s| {
                std::str::from_utf8(self.key_at((s & u64::from(u32::MAX)) as usize - 1)).ok()
            })
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slot of `key`, or the empty slot where it would go, and the
    /// hash bits stored with it.
    fn slot(&self, key: &[u8]) -> (usize, u64) {
        let h = hash(key);
        let tag = h & !u64::from(u32::MAX);
        let mask = self.slots.len() - 1;
        let mut i = h as usize & mask;
        loop {
            match self.slots[i] {
                0 => return (i, tag),
                s if s & !u64::from(u32::MAX) == tag
                    && self.key_at((s & u64::from(u32::MAX)) as usize - 1) == key =>
                {
                    return (i, tag)
                }
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Whether a comparison key (see [`MatchRules::key`]) is an account.
    pub fn contains(&self, key: &str) -> bool {
        !self.slots.is_empty() && self.slots[self.slot(key.as_bytes()).0] != 0
    }

    fn push(&mut self, key: &str) -> Result<(), LoadError> {
        let too_many = || LoadError {
            file: String::new(),
            line: None,
            message: "more than 4 GiB of account names".into(),
        };
        // The offset is stored + 1 in a u32 slot, with up to 10 bytes of
        // length before the key.
        u32::try_from(self.arena.len())
            .ok()
            .filter(|s| u64::from(*s) + key.len() as u64 + 11 < u64::from(u32::MAX))
            .ok_or_else(too_many)?;
        let mut n = key.len();
        while n >= 0x80 {
            self.arena.push((n & 0x7f) as u8 | 0x80);
            n >>= 7;
        }
        self.arena.push(n as u8);
        self.arena.extend_from_slice(key.as_bytes());
        Ok(())
    }

    /// Where the entries of a source start, to drop them when the source is
    /// read again (see [`read_stable`]).
    fn mark(&self) -> usize {
        self.arena.len()
    }

    fn reset(&mut self, arena: usize) {
        self.arena.truncate(arena);
    }

    /// Reads the slot where the entry at `at` hashes to, so that it is in
    /// the cache when the entry is inserted; returns the next entry's
    /// offset.
    fn touch_slot(&self, at: usize, mask: usize) -> usize {
        if at >= self.arena.len() {
            return at;
        }
        let range = self.key_range(at);
        let h = hash(self.arena.get(range.clone()).unwrap_or_default());
        std::hint::black_box(self.slots[h as usize & mask]);
        range.end
    }

    /// Builds the hash table, keeping one of each key: a duplicate's
    /// bytes are dropped from the arena (moved down over them).
    fn finish(&mut self) {
        let mut entries: usize = 0;
        let mut at = 0;
        while at < self.arena.len() {
            at = self.key_range(at).end;
            entries += 1;
        }
        let capacity = (entries + entries / 3 + 1).next_power_of_two();
        self.slots = vec![0; capacity];
        self.len = 0;
        let mask = capacity - 1;
        let (mut start, mut end) = (0, 0);
        // A few entries ahead, their slots are read early: the table is
        // larger than the CPU's caches, and a read that misses while the
        // current entry is inserted is one the loop need not wait for (a
        // profile of a 1M load showed it waiting on the slot reads; what
        // the read-ahead saves alone was not measured on this busy machine).
        let mut ahead = 0;
        for _ in 0..16 {
            ahead = self.touch_slot(ahead, mask);
        }
        while start < self.arena.len() {
            ahead = self.touch_slot(ahead, mask);
            let entry_len = self.key_range(start).end - start;
            // Move the entry down to the end of the kept ones (a duplicate
            // is then overwritten by the next), and look it up there.
            self.arena.copy_within(start..start + entry_len, end);
            start += entry_len;
            let (i, tag) = self.slot(self.key_at(end));
            if self.slots[i] == 0 {
                // `end` < `start` ≤ u32::MAX - 11 (checked by `push`).
                self.slots[i] = tag | (end as u64 + 1);
                self.len += 1;
                end += entry_len;
            }
        }
        self.arena.truncate(end);
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
    fn table_keeps_one_of_each() {
        let mut acc = Accounts::default();
        assert!(!acc.contains("alice"));
        let long = "l".repeat(300); // a length of two LEB128 bytes
        let keys: Vec<String> = (0..5000).map(|i| format!("user{i}")).collect();
        for k in keys
            .iter()
            .chain(&keys)
            .chain([&long, &long, &String::new()])
        {
            acc.push(k).unwrap();
        }
        let mark = acc.mark();
        acc.push("dropped").unwrap();
        acc.reset(mark);
        acc.finish();
        assert_eq!(acc.len(), 5002);
        for k in &keys {
            assert!(acc.contains(k), "{k}");
        }
        assert!(acc.contains(&long) && acc.contains(""));
        for absent in ["dropped", "user5000", "user", "l", &"l".repeat(299)] {
            assert!(!acc.contains(absent), "{absent}");
        }
        // Duplicates leave no bytes behind: each key once, behind its length.
        let bytes: usize = keys.iter().map(|k| k.len() + 1).sum::<usize>() + 302 + 1;
        assert_eq!(acc.arena.len(), bytes);
        let mut empty = Accounts::default();
        empty.finish();
        assert!(empty.is_empty() && !empty.contains(""));
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
