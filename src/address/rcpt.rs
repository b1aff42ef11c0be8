//! The RCPT command's argument list as the MTA hands it to a milter
//! (docs/design.md §3): the path (source route, quoting, brackets), the
//! ESMTP parameters, the MTA's own parse of it, and the xtext that ORCPT
//! values need (RFC 3461 §4).

use super::{forbidden_in_local_part, normalize_domain, unquote, Address};
use std::fmt;

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
