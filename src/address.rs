//! Envelope addresses as the MTA hands them to a milter (docs/design.md §3).
//!
//! A RCPT argument arrives exactly as the client wrote it after `RCPT TO:`:
//! `<local@domain>`, perhaps with a source route (`<@a,@b:local@domain>`,
//! RFC 5321 §4.1.2, to be ignored), perhaps with a quoted local part, and
//! the ESMTP parameters as separate arguments. Nothing here may panic on
//! whatever bytes a client sends; what cannot be parsed is left alone.
//!
//! This file holds the address itself and the domain rules; the RCPT
//! command's argument list (the path, its ESMTP parameters, xtext) is
//! src/address/rcpt.rs.

mod rcpt;

pub use rcpt::{loose_domain, push_xtext, xtext, EsmtpParam, RcptArg};

use std::{borrow::Cow, fmt};

/// A mail address split into local part and domain.
///
/// `local` is kept as the client wrote it (quotes and case included): the
/// routing address must carry it unchanged. `domain` is the ASCII (A-label),
/// lower-case form used for matching and for building routing addresses.
#[derive(Clone, Debug, Eq, PartialEq, Hash)]
pub struct Address {
    pub local: String,
    pub domain: String,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// Why a string is not a usable address.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum AddressError {
    #[error("empty address")]
    Empty,
    #[error("missing '@'")]
    NoAt,
    #[error("empty local part")]
    EmptyLocal,
    #[error("bad domain {0:?}: {1}")]
    BadDomain(String, String),
    #[error("unterminated quoted local part")]
    Unterminated,
    #[error("space, control character or special character in the local part (quote it)")]
    BadChar,
}

impl Address {
    /// Parses `local@domain` (no angle brackets). The domain is converted to
    /// its A-label form and lower-cased (IDNA, UTS #46), so that
    /// `bob@BÜCHER.example` and `bob@xn--bcher-kva.example` are the same.
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        let at = split_at_domain(s)?;
        let (local, domain) = (&s[..at], &s[at + 1..]);
        if local.is_empty() {
            return Err(AddressError::EmptyLocal);
        }
        if !local.starts_with('"') && local.bytes().any(forbidden_in_local_part) {
            return Err(AddressError::BadChar);
        }
        Ok(Address {
            local: local.to_owned(),
            domain: normalize_domain(domain)?,
        })
    }

    /// The local part with quoting removed: `"john doe"` → `john doe`,
    /// `"bob"` → `bob` (RFC 5321 §4.1.2: a quoted string that needs no
    /// quoting denotes the same mailbox as the plain one).
    pub fn unquoted_local(&self) -> Cow<'_, str> {
        unquote(&self.local)
    }
}

/// Finds the `@` that separates local part and domain, skipping a quoted
/// local part (which may itself contain `@`).
fn split_at_domain(s: &str) -> Result<usize, AddressError> {
    let bytes = s.as_bytes();
    if bytes.first() == Some(&b'"') {
        let mut i = 1;
        loop {
            match bytes.get(i) {
                None => return Err(AddressError::Unterminated),
                Some(b'\\') => i += 2,
                Some(b'"') => {
                    i += 1;
                    break;
                }
                Some(_) => i += 1,
            }
        }
        return match bytes.get(i) {
            Some(b'@') => Ok(i),
            _ => Err(AddressError::NoAt),
        };
    }
    bytes
        .iter()
        .rposition(|&b| b == b'@')
        .ok_or(AddressError::NoAt)
}

fn unquote(local: &str) -> Cow<'_, str> {
    let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) else {
        return Cow::Borrowed(local);
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A domain in the form used for matching: A-labels, lower case, no trailing
/// dot. Address literals (`[192.0.2.1]`) are kept as they are.
pub fn normalize_domain(domain: &str) -> Result<String, AddressError> {
    let bad = |why: &str| AddressError::BadDomain(domain.to_owned(), why.to_owned());
    let d = domain.strip_suffix('.').unwrap_or(domain);
    if d.is_empty() {
        return Err(bad("empty"));
    }
    if d.starts_with('[') {
        return address_literal(d).ok_or_else(|| bad("malformed address literal"));
    }
    // Plain ASCII names, the usual case, skip IDNA (it would only fold
    // their case). This runs for every RCPT. Anything else, IDNA, and the
    // same label rules after it.
    if let Some(plain) = plain_domain(d) {
        return Ok(plain);
    }
    let ascii = idna::domain_to_ascii(d).map_err(|_| bad("not a valid domain name"))?;
    if ascii.len() <= 253 && ascii.as_bytes().split(|&b| b == b'.').all(valid_label) {
        Ok(ascii)
    } else {
        Err(bad("not a valid domain name"))
    }
}

/// `d` in lower case if it is an address literal of RFC 5321 §4.1.3: an
/// IPv4 address, `IPv6:` and an IPv6 address, or `tag:content` (the tag
/// a label, as [`valid_label`] has it; the content printable ASCII but
/// `[`, `]`, `\`, and `<`, `>`, which would end the path around it).
fn address_literal(d: &str) -> Option<String> {
    let inner = d.strip_prefix('[')?.strip_suffix(']')?;
    if inner.parse::<std::net::Ipv4Addr>().is_ok() {
        return Some(d.to_owned());
    }
    let (tag, content) = inner.split_once(':')?;
    let ok = if tag.eq_ignore_ascii_case("IPv6") {
        content.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        valid_label(tag.as_bytes())
            && !content.is_empty()
            && content.bytes().all(|b| {
                matches!(b, b'!'..=b'~') && !matches!(b, b'[' | b']' | b'\\' | b'<' | b'>')
            })
    };
    ok.then(|| d.to_ascii_lowercase())
}

/// `d` in lower case if it is a plain ASCII name: at most 253 bytes of
/// valid labels ([`valid_label`]), none an A-label (`xn--`, whose Punycode
/// IDNA must check). Checked and lower-cased in one pass.
fn plain_domain(d: &str) -> Option<String> {
    if d.len() > 253 {
        return None;
    }
    let mut out = Vec::with_capacity(d.len());
    // The current label's length, and the byte before (`.` at a start).
    let (mut len, mut prev) = (0usize, b'.');
    for &b in d.as_bytes() {
        let lower = match b {
            b'.' if len > 0 && prev != b'-' => {
                len = 0;
                b
            }
            b'-' if len > 0 => {
                len += 1;
                // `xn--`: the fourth byte of an A-label.
                if len == 4 && out.ends_with(b"xn-") {
                    return None;
                }
                b
            }
            b'a'..=b'z' | b'0'..=b'9' | b'_' => {
                len += 1;
                b
            }
            b'A'..=b'Z' => {
                len += 1;
                b.to_ascii_lowercase()
            }
            _ => return None,
        };
        if len > 63 {
            return None;
        }
        out.push(lower);
        prev = b;
    }
    if len == 0 || prev == b'-' {
        return None;
    }
    String::from_utf8(out).ok()
}

/// A DNS label as a mail domain may have it: 1 to 63 letters, digits,
/// '-' and '_', not starting or ending with '-'.
fn valid_label(label: &[u8]) -> bool {
    matches!((label.first(), label.last()), (Some(&f), Some(&l)) if f != b'-' && l != b'-')
        && label.len() <= 63
        && label
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A byte a Dot-string local part may not hold (RFC 5321 §4.1.2: atext
/// and dots, UTF-8 allowed by RFC 6531): spaces, controls and specials,
/// which only a quoted local part may contain.
pub fn forbidden_in_local_part(b: u8) -> bool {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Address literals as RFC 5321 §4.1.3 has them: IPv4, `IPv6:` and a
    /// general literal `tag:content`. Whatever is accepted must come back
    /// the same from `<local@literal>`: the fuzzer found
    /// `jjfave@[a.<[a.0.>l]jjjj<\x10plls0.l]` accepted bare and refused in
    /// angle brackets (fuzz/corpus/rcpt_arg/literal-brackets).
    #[test]
    fn address_literals_follow_rfc_5321() {
        for ok in [
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "[ipv6:::ffff:192.0.2.1]",
            "[x-tag:some.content]",
        ] {
            let n = normalize_domain(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(n, ok.to_ascii_lowercase());
            let a = Address::parse(&format!("a@{ok}")).expect(ok);
            let again = RcptArg::parse(&[format!("<{a}>")]);
            assert_eq!(again.address.as_ref(), Some(&a), "{ok}");
        }
        for bad in [
            "[a.<[a.0.>l]jjjj<\x10plls0.l]",
            "[]",
            "[192.0.2]",
            "[192.0.2.256]",
            "[IPv6:2001:db8::g]",
            "[IPv6:192.0.2.1]",
            "[tag:]",
            "[-tag:x]",
            "[tag:a>b]",
            "[tag:a]b]",
            "[tag:a\\b]",
            "[tag:a\x7fb]",
            "[192.0.2.1",
            "[[192.0.2.1]]",
        ] {
            assert!(normalize_domain(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// The one-pass check takes exactly the names the label rules take:
    /// every string of up to five bytes from an alphabet of the edge cases,
    /// and long labels and names.
    #[test]
    fn plain_domains_follow_the_label_rules() {
        let by_labels = |d: &str| {
            let a_label = |l: &[u8]| l.len() >= 4 && l[..4].eq_ignore_ascii_case(b"xn--");
            (d.len() <= 253
                && d.as_bytes()
                    .split(|&b| b == b'.')
                    .all(|l| valid_label(l) && !a_label(l)))
            .then(|| d.to_ascii_lowercase())
        };
        let alphabet = ["a", "X", "x", "N", "n", "-", ".", "_", "1", "é", " "];
        let mut names = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> = names
                .iter()
                .flat_map(|n| alphabet.iter().map(move |c| format!("{n}{c}")))
                .collect();
            names.extend(longer);
        }
        names.sort();
        names.dedup();
        let label = |n: usize| "a".repeat(n);
        names.extend([
            label(63),
            label(64),
            format!("{}.{}", label(63), label(3)),
            format!("{}.{}", label(64), label(3)),
            [label(63), label(63), label(63), label(61)].join("."),
            [label(63), label(63), label(63), label(62)].join("."),
            "XN--bcher-kva.example".into(),
            "bxn--a.example".into(),
        ]);
        for name in &names {
            assert_eq!(plain_domain(name), by_labels(name), "{name:?}");
        }
    }
}
