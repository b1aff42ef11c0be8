//! Envelope addresses as the MTA hands them to a milter (docs/design.md §3).
//!
//! A RCPT argument arrives exactly as the client wrote it after `RCPT TO:`:
//! `<local@domain>`, perhaps with a source route (`<@a,@b:local@domain>`,
//! RFC 5321 §4.1.2, to be ignored), perhaps with a quoted local part, and
//! the ESMTP parameters as separate arguments. Nothing here may panic on
//! whatever bytes a client sends; what cannot be parsed is left alone.

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

/// One ESMTP parameter of a RCPT command, e.g. `NOTIFY=NEVER`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct EsmtpParam {
    /// Upper-cased keyword.
    pub keyword: String,
    pub value: Option<String>,
}

impl fmt::Display for EsmtpParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={}", self.keyword, v),
            None => f.write_str(&self.keyword),
        }
    }
}

/// A RCPT command's argument list, as given to the milter.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct RcptArg {
    /// The path exactly as received, angle brackets included. Delete
    /// requests must use this: Postfix and Sendmail compare byte for byte.
    pub raw: String,
    /// The mailbox, when the path could be parsed; `None` for `<>`,
    /// `<postmaster>` without domain, or garbage.
    pub address: Option<Address>,
    pub params: Vec<EsmtpParam>,
}

impl RcptArg {
    /// Parses the RCPT arguments: the first is the path, the rest ESMTP
    /// parameters. Postfix sends them split; Sendmail too. A single argument
    /// that still holds parameters after the closing `>` is split here.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> RcptArg {
        let first = args.first().map(|s| s.as_ref()).unwrap_or("");
        let (path, trailing) = match closing_bracket(first) {
            Some(end) if first.starts_with('<') => (&first[..=end], first[end + 1..].trim()),
            _ => (first, ""),
        };
        // Every argument is split on whitespace too: an MTA sends one
        // parameter per argument, but a parameter holding a space would be
        // carried into an added recipient's ESMTP arguments as two (found
        // by fuzz/fuzz_targets/rcpt_arg.rs).
        let params = trailing
            .split_ascii_whitespace()
            .chain(
                args.iter()
                    .skip(1)
                    .flat_map(|s| s.as_ref().split_ascii_whitespace()),
            )
            .map(parse_param)
            .collect();
        // Text glued to the closing bracket (`<a@b.example>>`) is not an
        // ESMTP parameter: the argument as a whole cannot be parsed.
        let glued = first
            .get(path.len()..)
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with(char::is_whitespace));
        RcptArg {
            raw: path.to_owned(),
            address: if glued { None } else { parse_path(path) },
            params,
        }
    }

    pub fn param(&self, keyword: &str) -> Option<&EsmtpParam> {
        self.params
            .iter()
            .find(|p| p.keyword.eq_ignore_ascii_case(keyword))
    }

    /// The address without angle brackets and source route, as the client
    /// wrote it (the domain in its original spelling): used for ORCPT.
    /// Postfix's cleanup passes the recipients of locally submitted mail
    /// without brackets (cleanup_milter.c `cleanup_milter_emul_rcpt`), so
    /// a path without them is taken as it stands.
    pub fn original_mailbox(&self) -> Option<&str> {
        let inner = match self.raw.strip_prefix('<') {
            Some(rest) => rest.strip_suffix('>')?,
            None => self.raw.as_str(),
        };
        let inner = strip_source_route(inner);
        (!inner.is_empty()).then_some(inner)
    }

    /// The local part of an unqualified path (`<zed>`, `<postmaster>`):
    /// one without `@` that is a local part of its own (RFC 5321 §4.1.2),
    /// whether or not [`RcptArg::qualify`] has given it an address since.
    fn unqualified(&self) -> Option<&str> {
        let inner = self.raw.strip_prefix('<')?.strip_suffix('>')?;
        let plain = !inner.is_empty() && !inner.bytes().any(forbidden_in_local_part);
        let quoted = inner.len() > 1 && inner.starts_with('"') && inner.ends_with('"');
        (plain || quoted).then_some(inner)
    }

    /// `RCPT TO:<postmaster>` without a domain: RFC 5321 §4.5.1 requires
    /// every SMTP server to accept it for its own postmaster.
    pub fn is_postmaster(&self) -> bool {
        self.unqualified()
            .is_some_and(|l| unquote(l).eq_ignore_ascii_case("postmaster"))
    }

    /// Gives an unqualified path (`<zed>`) the mailbox the MTA delivers it
    /// to: Postfix appends `myorigin` (trivial-rewrite, "local" context,
    /// which envelope addresses always get) and says so in `{rcpt_addr}`
    /// (`mta`). Only when that mailbox has the same local part: anything
    /// else is not the MTA's parse of this path. The raw path stays as it
    /// was received: a delete must repeat it.
    pub fn qualify(&mut self, mta: Option<&str>) {
        if self.address.is_some() {
            return;
        }
        let Some(local) = self.unqualified() else {
            return;
        };
        let Some(Ok(theirs)) = mta
            .map(str::trim)
            .filter(|m| m.contains('@'))
            .map(Address::parse)
        else {
            return;
        };
        if unquote(local).eq_ignore_ascii_case(&theirs.unquoted_local()) {
            self.address = Some(theirs);
        }
    }
}

/// The `>` that closes a path: not one inside a quoted local part
/// (`<"a>b"@example.com>`, RFC 5321 §4.1.2 Quoted-string).
fn closing_bracket(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// The domain a RCPT argument that cannot be parsed seems to be for: the
/// last non-empty text after an `@`, without brackets and dots around it
/// (`<alice@example.com@>` → `example.com`, `<@example.com>` →
/// `example.com`). Only used to decide whether to refuse such an argument,
/// never to route it.
pub fn loose_domain(raw: &str) -> Option<String> {
    raw.rsplit('@')
        .map(|part| {
            let end = part
                .find(|c: char| c == '>' || c.is_whitespace())
                .unwrap_or(part.len());
            part[..end].trim_matches(|c: char| c == '<' || c == '.' || c == '"')
        })
        .take_while(|_| raw.contains('@'))
        .find(|d| !d.is_empty())
        .and_then(|d| normalize_domain(d).ok())
}

fn parse_param(p: &str) -> EsmtpParam {
    match p.split_once('=') {
        Some((k, v)) => EsmtpParam {
            keyword: k.to_ascii_uppercase(),
            value: Some(v.to_owned()),
        },
        None => EsmtpParam {
            keyword: p.to_ascii_uppercase(),
            value: None,
        },
    }
}

/// `@a,@b:local@domain` → `local@domain` (RFC 5321 §4.1.2 says the route
/// is to be ignored by the receiver).
fn strip_source_route(s: &str) -> &str {
    if s.starts_with('@') {
        match s.find(':') {
            Some(colon) => &s[colon + 1..],
            None => s,
        }
    } else {
        s
    }
}

fn parse_path(path: &str) -> Option<Address> {
    let inner = path.trim();
    // Postfix passes the argument with its brackets; tolerate clients that
    // omit them (Postfix accepts that with `strict_rfc821_envelopes = no`).
    let inner = match inner.strip_prefix('<') {
        Some(rest) => rest.strip_suffix('>')?,
        None => inner,
    };
    let inner = strip_source_route(inner);
    Address::parse(inner).ok()
}

/// Encodes a value as RFC 3461 §4 xtext: `+`, `=` and characters outside
/// `!`..`~` become `+XX`. ORCPT values must be xtext, and a subaddress
/// (`bob+news`) contains exactly the character that needs it.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    push_xtext(&mut out, s);
    out
}

/// [`xtext`], appended to `out`.
pub fn push_xtext(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push('+');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
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

    fn addr(local: &str, domain: &str) -> Option<Address> {
        Some(Address {
            local: local.into(),
            domain: domain.into(),
        })
    }

    /// `<zed>` takes the MTA's mailbox only when the local part is the
    /// same; `<postmaster>` without a domain is recognised in any case or
    /// quoting; a path without brackets (Postfix's cleanup) keeps its
    /// mailbox for ORCPT.
    #[test]
    fn unqualified_paths_and_postmaster() {
        let qualified = |raw: &str, mta: Option<&str>| {
            let mut a = RcptArg::parse(&[raw]);
            a.qualify(mta);
            a
        };
        let zed = qualified("<zed>", Some("zed@example.com"));
        assert_eq!(zed.address, addr("zed", "example.com"));
        assert_eq!(zed.raw, "<zed>", "a delete repeats the path as received");
        assert_eq!(
            qualified("<Zed>", Some(" zed@example.com")).address,
            addr("zed", "example.com")
        );
        assert_eq!(qualified("<zed>", Some("root@example.com")).address, None);
        assert_eq!(
            qualified("<zed>", Some("zed")).address,
            None,
            "Sendmail's local user"
        );
        assert_eq!(qualified("<zed>", None).address, None);
        assert_eq!(
            qualified("<not an address>", Some("not@example.com")).address,
            None
        );
        assert_eq!(
            qualified("<alice@example.org>", Some("zed@example.com")).address,
            addr("alice", "example.org")
        );
        for p in ["<postmaster>", "<PostMaster>", "<\"postmaster\">"] {
            assert!(RcptArg::parse(&[p]).is_postmaster(), "{p}");
            assert!(
                qualified(p, Some("postmaster@example.com")).is_postmaster(),
                "{p}"
            );
        }
        for p in [
            "<postmaster@example.com>",
            "postmaster",
            "<postmaster2>",
            "<>",
        ] {
            assert!(!RcptArg::parse(&[p]).is_postmaster(), "{p}");
        }
        assert_eq!(
            RcptArg::parse(&["zed@example.com"]).original_mailbox(),
            Some("zed@example.com")
        );
    }

    #[test]
    fn a_parameter_with_a_space_is_two_parameters() {
        let r = RcptArg::parse(&["<a@b.example>", "NOTIFY=NEVER ORCPT=rfc822;x@y", ""]);
        let shown: Vec<String> = r.params.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["NOTIFY=NEVER", "ORCPT=rfc822;x@y"]);
    }

    #[test]
    fn plain_path() {
        let r = RcptArg::parse(&["<Bob@Example.COM>"]);
        assert_eq!(r.raw, "<Bob@Example.COM>");
        assert_eq!(r.address, addr("Bob", "example.com"));
        assert!(r.params.is_empty());
        assert_eq!(r.original_mailbox(), Some("Bob@Example.COM"));
    }

    #[test]
    fn params_separate_and_trailing() {
        let r = RcptArg::parse(&["<a@x.example>", "notify=NEVER", "ORCPT=rfc822;a@x.example"]);
        assert_eq!(
            r.param("NOTIFY").and_then(|p| p.value.as_deref()),
            Some("NEVER")
        );
        assert_eq!(
            r.param("orcpt").and_then(|p| p.value.as_deref()),
            Some("rfc822;a@x.example")
        );
        let r = RcptArg::parse(&["<a@x.example> NOTIFY=NEVER"]);
        assert_eq!(r.raw, "<a@x.example>");
        assert_eq!(r.params.len(), 1);
    }

    #[test]
    fn source_route_is_ignored() {
        let r = RcptArg::parse(&["<@relay1.example,@relay2.example:joe@example.com>"]);
        assert_eq!(r.address, addr("joe", "example.com"));
        assert_eq!(r.original_mailbox(), Some("joe@example.com"));
    }

    #[test]
    fn quoted_local_part() {
        let r = RcptArg::parse(&["<\"john doe\"@example.com>"]);
        let a = r.address.unwrap();
        assert_eq!(a.local, "\"john doe\"");
        assert_eq!(a.unquoted_local(), "john doe");
        let r = RcptArg::parse(&["<\"a@b\\\"c\"@example.com>"]);
        assert_eq!(r.address.unwrap().unquoted_local(), "a@b\"c");
    }

    #[test]
    fn null_and_garbage_are_left_alone() {
        for bad in [
            "<>",
            "",
            "<",
            ">",
            "<@>",
            "<postmaster>",
            "<a@>",
            "<@x>",
            "<a b@x>",
            "<\"x@y>",
            "<a@-x.example>",
        ] {
            let r = RcptArg::parse(&[bad]);
            assert_eq!(r.address, None, "{bad:?}");
        }
        assert_eq!(RcptArg::parse::<&str>(&[]).address, None);
    }

    #[test]
    fn quoted_bracket_and_loose_domain() {
        let r = RcptArg::parse(&["<\"a>b\"@example.com>"]);
        assert_eq!(r.raw, "<\"a>b\"@example.com>");
        assert_eq!(r.address, addr("\"a>b\"", "example.com"));
        assert!(r.params.is_empty());
        for (raw, domain) in [
            ("<alice@example.com@>", Some("example.com")),
            ("<<alice@Example.COM>>", Some("example.com")),
            ("alice@example.com>", Some("example.com")),
            ("<@example.com>", Some("example.com")),
            ("<postmaster>", None),
            ("<>", None),
            ("", None),
        ] {
            assert_eq!(loose_domain(raw).as_deref(), domain, "{raw:?}");
        }
    }

    #[test]
    fn idna_domain() {
        let r = RcptArg::parse(&["<bob@BÜCHER.example>"]);
        assert_eq!(r.address, addr("bob", "xn--bcher-kva.example"));
        assert_eq!(normalize_domain("Example.COM.").unwrap(), "example.com");
    }

    #[test]
    fn xtext_encoding() {
        assert_eq!(xtext("bob+news@example.com"), "bob+2Bnews@example.com");
        assert_eq!(xtext("a=b c"), "a+3Db+20c");
    }
}
