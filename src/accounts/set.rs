//! The set of local parts with a mailbox here, and how local parts are
//! compared (docs/design.md §5 `accounts:`).
//!
//! A domain may list millions of mailboxes, and every RCPT of a managed
//! domain looks one up, so the set is compact and a lookup touches little
//! memory: all local parts of a domain live in one byte arena, each behind
//! its length, and a `hashbrown::HashTable` of 32-bit arena offsets finds
//! them: 5 bytes a bucket (the offset and hashbrown's control byte with 7
//! bits of the key's hash, so that a probe passes other keys without
//! reading them), buckets a power of two at most 7/8 full, and a length
//! byte: 7 to 12 bytes of overhead per address, where a binary search over
//! a million entries took about twenty cache misses per lookup
//! (BENCHMARKS.md, "Accounts", and "Issue 22" for the table).

use crate::config::LocalPartCase;
use hashbrown::HashTable;
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
        self.case.key(unquoted_local)
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

/// The arena grew past what a 32-bit offset reaches.
#[derive(Debug)]
pub(super) struct TooMany;

/// The set of local parts with a mailbox here, for one domain.
#[derive(Clone, Default)]
pub struct Accounts {
    /// Every key, each behind its length as a LEB128 number (one byte below
    /// 128 bytes), one after the other. While loading it may hold a key
    /// twice; [`Accounts::finish`] keeps one of each.
    arena: Vec<u8>,
    /// The arena offset of every kept key, found by [`hash`] of the key.
    /// Empty until [`Accounts::finish`].
    table: HashTable<u32>,
}

impl fmt::Debug for Accounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Accounts({} addresses)", self.len())
    }
}

/// The hash of a key: eight bytes at a time, each word multiplied in,
/// then MurmurHash3's 64-bit finaliser, so that keys differing in one
/// digit land far apart (hashbrown takes the bucket from the low bits and
/// the control byte from the top 7). Not keyed: the table is built from
/// the administrator's own files, so no outside party chooses where its
/// keys land (a RCPT only probes).
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

/// Where the key of the entry at `offset` of `arena` starts and ends.
fn key_range(arena: &[u8], offset: usize) -> std::ops::Range<usize> {
    let (mut len, mut shift, mut at) = (0usize, 0, offset);
    while let Some(&b) = arena.get(at) {
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        at += 1;
        if b < 0x80 {
            break;
        }
    }
    at..at + len
}

/// The key of the entry at `offset` of `arena`.
fn key_at(arena: &[u8], offset: u32) -> &[u8] {
    arena
        .get(key_range(arena, offset as usize))
        .unwrap_or_default()
}

impl Accounts {
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Every comparison key, in no particular order (the shrink guard's
    /// list of the addresses two account lists disagree on).
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.table
            .iter()
            .filter_map(move |&at| std::str::from_utf8(key_at(&self.arena, at)).ok())
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Whether a comparison key (see [`MatchRules::key`]) is an account.
    pub fn contains(&self, key: &str) -> bool {
        let key = key.as_bytes();
        self.table
            .find(hash(key), |&at| key_at(&self.arena, at) == key)
            .is_some()
    }

    /// Adds `key` to the arena; it counts once [`Accounts::finish`] ran.
    pub(super) fn push(&mut self, key: &str) -> Result<(), TooMany> {
        // The offset is a u32, with up to 10 bytes of length before the key.
        u32::try_from(self.arena.len())
            .ok()
            .filter(|s| u64::from(*s) + key.len() as u64 + 11 < u64::from(u32::MAX))
            .ok_or(TooMany)?;
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
    /// read again (see `read::read_stable`).
    pub(super) fn mark(&self) -> usize {
        self.arena.len()
    }

    pub(super) fn reset(&mut self, arena: usize) {
        self.arena.truncate(arena);
    }

    /// Builds the hash table, keeping one of each key: a duplicate's
    /// bytes are dropped from the arena (moved down over them).
    pub(super) fn finish(&mut self) {
        let mut entries: usize = 0;
        let mut at = 0;
        while at < self.arena.len() {
            at = key_range(&self.arena, at).end;
            entries += 1;
        }
        // Sized for every entry, so that inserting never rehashes.
        let mut table = HashTable::with_capacity(entries);
        let arena = &mut self.arena;
        let (mut start, mut end) = (0, 0);
        while start < arena.len() {
            let entry_len = key_range(arena, start).end - start;
            // Move the entry down to the end of the kept ones (a duplicate
            // is then overwritten by the next), and look it up there.
            arena.copy_within(start..start + entry_len, end);
            start += entry_len;
            // `end` < `start` ≤ u32::MAX - 11 (checked by `push`).
            let offset = end as u32;
            let key = key_at(arena, offset);
            let h = hash(key);
            if table.find(h, |&at| key_at(arena, at) == key).is_none() {
                table.insert_unique(h, offset, |&at| hash(key_at(arena, at)));
                end += entry_len;
            }
        }
        arena.truncate(end);
        arena.shrink_to_fit();
        // Duplicates left the table larger than its keys need.
        table.shrink_to_fit(|&at| hash(key_at(arena, at)));
        self.table = table;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Every key listed once.
        let mut listed: Vec<&str> = acc.keys().collect();
        listed.sort_unstable();
        listed.dedup();
        assert_eq!(listed.len(), 5002);
        let mut empty = Accounts::default();
        empty.finish();
        assert!(empty.is_empty() && !empty.contains(""));
    }
}
