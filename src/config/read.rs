//! `milter.yaml` → [`Config`], with errors as `FILE:LINE:COL: message`.
//!
//! Value errors (bad address, bad CIDR, unknown key) are raised while
//! serde_yaml deserializes, so it knows where they are. Checks that need the
//! whole file (a user key outside its domain, a routing loop) run afterwards
//! and find their position again with [`locate`], which walks the YAML to
//! the offending node and lets serde_yaml report that node's mark.

use super::*;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use std::{fmt, path::Path};

pub use super::locate::{locate, Seg};
use super::locate::{Locate, FOUND};

/// A configuration error, located in its file when possible.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Reads and validates a configuration file.
pub fn read_file(path: &Path) -> Result<Config, ConfigError> {
    read_file_digest(path).map(|(config, _)| config)
}

/// SHA-256 of a file's bytes, hex: what the running milter publishes of
/// the `milter.yaml` it loaded, and what `status` compares with the file
/// on disk (issue 25).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// [`read_file`], and the SHA-256 of the very bytes it read
/// ([`sha256_hex`]): read once, so the digest is of what was loaded even
/// when the file changes meanwhile.
pub fn read_file_digest(path: &Path) -> Result<(Config, String), ConfigError> {
    let label = path.display().to_string();
    let fail = |line, column, message| ConfigError {
        file: label.clone(),
        line,
        column,
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(None, None, format!("cannot read: {e}")))?;
    let digest = sha256_hex(&bytes);
    let text = String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let bad = e.utf8_error().valid_up_to();
        let (line, column) = position(&bytes[..bad]);
        fail(
            Some(line),
            Some(column),
            format!(
                "not UTF-8 (byte 0x{:02X}): save the file as UTF-8",
                bytes[bad]
            ),
        )
    })?;
    let mut config = parse(&text, &label)?;
    // Relative paths in the file are relative to the file, not to wherever
    // the daemon happens to be started.
    if let Some(base) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        let fix = |p: &mut std::path::PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut config.state_dir);
        for p in config.breaker.iter_mut().flat_map(|b| b.paths_mut()) {
            fix(p);
        }
        for d in config.domains.values_mut() {
            let destination_list = d.reject_unknown.iter_mut().flat_map(|r| &mut r.accounts);
            for source in d.accounts.iter_mut().flatten().chain(destination_list) {
                match source {
                    AccountSource::File(p) | AccountSource::Postfix(p) => fix(p),
                    AccountSource::PostfixMap(t) => fix(&mut t.path),
                    AccountSource::List(_) | AccountSource::Command(_) => {}
                }
            }
        }
    }
    // A missing account file is a mistake in this file (a typo, a table
    // not yet `postmap`ed): say which line names it.
    for (name, d) in &config.domains {
        // The domain's own accounts, and the destination's address list
        // (`destination.reject_unknown.accounts`, DESIGN.md §10).
        let here = d
            .accounts
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, s)| (vec![key("accounts")], "accounts", i, s));
        let there = d.reject_unknown.iter().flat_map(|r| {
            r.accounts.iter().enumerate().map(|(i, s)| {
                (
                    vec![key("destination"), key("reject_unknown"), key("accounts")],
                    "destination.reject_unknown.accounts",
                    i,
                    s,
                )
            })
        });
        for (list, shown, i, source) in here.chain(there) {
            // A command's program is checked as a file is: a typo in its
            // path is this file's mistake.
            let file = match source {
                AccountSource::Command(c) => std::path::PathBuf::from(c.program()),
                _ => match source.watched_file() {
                    Some(file) => file,
                    None => continue,
                },
            };
            if let Err(e) = std::fs::metadata(&file) {
                let mut at = vec![key("domains"), key(name)];
                at.extend(list);
                at.extend([Seg::Index(i), key(source.key())]);
                let (line, column) = locate(&text, &at).unzip();
                let hint = match source {
                    AccountSource::PostfixMap(t) if t.compiled_file() != t.path => {
                        format!(" (run `postmap {t}` to build it)")
                    }
                    _ => String::new(),
                };
                return Err(fail(
                    line,
                    column,
                    format!(
                        "domains.{name}.{shown}[{i}].{}: {}: cannot read: {e}{hint}",
                        source.key(),
                        file.display()
                    ),
                ));
            }
        }
    }
    Ok((config, digest))
}

/// `FILE:LINE:COL: ` of the node at `keys` in the configuration file, or
/// `FILE: ` when it cannot be found; for checks made after loading.
pub fn locate_in_file(path: &Path, keys: &[&str]) -> String {
    let at: Vec<Seg> = keys.iter().map(key).collect();
    let found = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| locate(&text, &at));
    match found {
        Some((l, c)) => format!("{}:{l}:{c}: ", path.display()),
        None => format!("{}: ", path.display()),
    }
}

/// The line of the node at `keys` (mapping keys, or `[n]` for the n-th
/// element of a sequence) in the text the configuration was read from; for
/// checks made after loading (src/policy.rs).
pub fn line_of(source: &Source, keys: &[&str]) -> Option<usize> {
    let at: Vec<Seg> = keys
        .iter()
        .map(|k| {
            match k
                .strip_prefix('[')
                .and_then(|k| k.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
            {
                Some(n) => Seg::Index(n),
                None => key(k),
            }
        })
        .collect();
    locate_value(&source.text, &at).map(|(line, _)| line)
}

/// [`locate`], and for the first element of a list that was written as
/// one value (`copy_to: ADDR`), that value.
fn locate_value(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    locate(text, path).or_else(|| {
        let (last, parent) = path.split_last()?;
        matches!(last, Seg::Index(0)).then(|| locate(text, parent))?
    })
}

/// 1-based line and column (in bytes) just after `before`.
fn position(before: &[u8]) -> (usize, usize) {
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.len()
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
        + 1;
    (line, column)
}

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    if let Some((line, column)) = too_deep(text) {
        return Err(ConfigError {
            file: file.to_owned(),
            line: Some(line),
            column: Some(column),
            message: format!("nested more than {MAX_DEPTH} levels deep (`[` and `{{`): milter.yaml needs fewer than 10; close the brackets"),
        });
    }
    let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| raw_error(text, file, &e))?;
    let locate_err = |invalid: Invalid| located(text, file, invalid);
    let twice = |at: Vec<Seg>, shown: String| given_twice(text, file, at, shown);
    // Duplicate keys: serde would keep the last silently (docs/design.md §5).
    if let Some(name) = first_repeat(raw.domains.0.iter().map(|(n, _)| n.0.clone())) {
        return Err(twice(vec![key("domains"), key(&name)], name));
    }
    let case = raw.local_part_case;
    for (name, d) in &raw.domains.0 {
        let users = d
            .users
            .iter()
            .map(|(a, _)| format!("{}@{}", case.key(&a.unquoted_local()), a.domain));
        if let Some(user) = first_repeat(users) {
            return Err(twice(
                vec![key("domains"), key(name), key("users"), key(&user)],
                user,
            ));
        }
    }
    let config = Config {
        listen: raw.listen,
        instance: raw.instance.unwrap_or_else(host_name),
        relay_suffix: raw.relay_suffix,
        recipient_delimiter: raw.recipient_delimiter,
        local_part_case: raw.local_part_case,
        gateways: raw.gateways,
        state_dir: raw.state_dir,
        domains: raw.domains.0.into_iter().collect(),
        breaker: raw.breaker,
        notify: raw.notify,
        dns: raw.dns,
        accounts_shrink_limit: raw.accounts_shrink_limit,
        mta: raw.mta,
        connections: raw.connections,
        shadow: raw.shadow,
        metrics: raw.metrics,
        cluster: raw.cluster,
        max_recipients: raw.max_recipients,
        source: Source {
            file: file.to_owned(),
            text: text.into(),
        },
    };
    validate(&config).map_err(locate_err)?;
    Ok(config)
}

/// The first key that occurs a second time (one pass, hashed: a domain
/// may have hundreds of thousands of users).
fn first_repeat(keys: impl Iterator<Item = String>) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    keys.into_iter().find(|k| !seen.insert(k.clone()))
}

/// Flow collections (`[`, `{`) nested deeper than this are refused before
/// serde_yaml sees them: it took ~40 s of CPU to refuse 100,000 levels
/// (issue 25), and a reload waits for it. A real milter.yaml nests fewer
/// than 10 levels; block nesting costs a line of indentation per level.
const MAX_DEPTH: usize = 64;

/// Line and column of the first `[` or `{` deeper than [`MAX_DEPTH`],
/// outside quoted scalars and comments. A quote or `#` counts only where
/// YAML lets it start a scalar or a comment (after a blank, a bracket,
/// `,` or `:`), so `don't` and `a#b` are plain text.
fn too_deep(text: &str) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let starts = i == 0
            || matches!(
                bytes[i - 1],
                b' ' | b'\t' | b'\n' | b'\r' | b'[' | b'{' | b',' | b':'
            );
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(position(&bytes[..i]));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'#' if starts => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' if starts => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            // In a single-quoted scalar, '' is a quote, not its end.
            b'\'' if starts => {
                i += 1;
                while i < bytes.len() {
                    match (bytes[i], bytes.get(i + 1)) {
                        (b'\'', Some(b'\'')) => i += 2,
                        (b'\'', _) => break,
                        _ => i += 1,
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// serde_yaml's error, placed where a mail admin must look.
fn raw_error(text: &str, file: &str, e: &serde_yaml::Error) -> ConfigError {
    let message = e.to_string();
    // serde places "duplicate field `x`" at the start of the mapping
    // that holds it (1:1 for a second `domains:`); a duplicate key
    // names both of its lines instead (docs/design.md §5).
    let field = message
        .split_once("duplicate field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(name, _)| name.to_owned());
    if let Some((mut at, name)) = field.and_then(|name| Some((repeated(text, &name)?, name))) {
        at.push(key(&name));
        return given_twice(text, file, at, name);
    }
    // serde_yaml says "more than one document" without a position.
    if message.contains("more than one document") {
        if let Some((line, column)) = second_document(text) {
            return ConfigError {
                file: file.to_owned(),
                line: Some(line),
                column: Some(column),
                message: "a second YAML document begins here (after a `---` line): dualroute reads one document; merge the two or remove the `---`".into(),
            };
        }
    }
    yaml_error(file, e)
}

/// The position of the second document's first node.
fn second_document(text: &str) -> Option<(usize, usize)> {
    let de = serde_yaml::Deserializer::from_str(text).nth(1)?;
    match Locate(&[]).deserialize(de) {
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| (l.line(), l.column())),
        _ => None,
    }
}

/// The error for the node at `path`, located in `text`, its message
/// prefixed with the path (`domains.example.com.mode: ...`).
fn located(text: &str, file: &str, (path, message): Invalid) -> ConfigError {
    let (line, column) = locate_value(text, &path).unzip();
    let mut shown = String::new();
    for seg in &path {
        match seg {
            Seg::Index(i) => shown.push_str(&format!("[{i}]")),
            Seg::Again(..) => {}
            _ if shown.is_empty() => shown.push_str(&seg.to_string()),
            _ => shown.push_str(&format!(".{seg}")),
        }
    }
    ConfigError {
        file: file.to_owned(),
        line,
        column,
        message: if shown.is_empty() {
            message
        } else {
            format!("{shown}: {message}")
        },
    }
}

/// "`shown` is given twice (lines A and B): keep one", at the second of
/// the two keys `at` ends with.
fn given_twice(text: &str, file: &str, at: Vec<Seg>, shown: String) -> ConfigError {
    let (head, name) = at.split_at(at.len() - 1);
    let name = name[0].to_string();
    let line = |n| {
        let mut p = head.to_vec();
        p.push(Seg::Again(name.clone(), n));
        locate(text, &p).map_or("?".to_owned(), |(l, _)| l.to_string())
    };
    let mut p = head.to_vec();
    p.push(Seg::Again(name.clone(), 1));
    located(
        text,
        file,
        (
            p,
            format!(
                "{shown} is given twice (lines {} and {}): keep one",
                line(0),
                line(1)
            ),
        ),
    )
}

/// The path of the first mapping in which the key `name` occurs twice.
fn repeated(text: &str, name: &str) -> Option<Vec<Seg>> {
    let found = std::cell::RefCell::new(None);
    let de = serde_yaml::Deserializer::from_str(text);
    let _ = Repeat {
        name,
        at: Vec::new(),
        found: &found,
    }
    .deserialize(de);
    found.into_inner()
}

/// Walks the document until a mapping holds `name` twice, and records
/// where that mapping is.
struct Repeat<'a> {
    name: &'a str,
    at: Vec<Seg>,
    found: &'a std::cell::RefCell<Option<Vec<Seg>>>,
}

impl<'de> DeserializeSeed<'de> for Repeat<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Repeat<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        let mut seen = false;
        while let Some(k) = m.next_key::<Option<String>>()? {
            let k = k.unwrap_or_default();
            if k == self.name {
                if seen {
                    *self.found.borrow_mut() = Some(self.at.clone());
                    return Err(de::Error::custom(FOUND));
                }
                seen = true;
            }
            let mut at = self.at.clone();
            at.push(key(&k));
            m.next_value_seed(Repeat { at, ..self })?;
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let mut at = self.at.clone();
            at.push(Seg::Index(i));
            if s.next_element_seed(Repeat { at, ..self })?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

fn yaml_error(file: &str, e: &serde_yaml::Error) -> ConfigError {
    let mut message = e.to_string();
    // serde_yaml appends " at line L column C"; we print the position first.
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    let loc = e.location();
    ConfigError {
        file: file.to_owned(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        message,
    }
}

type Invalid = (Vec<Seg>, String);

fn key(k: impl fmt::Display) -> Seg {
    Seg::Key(k.to_string())
}

fn validate(c: &Config) -> Result<(), Invalid> {
    if c.instance.is_empty()
        || c.instance
            .contains(|ch: char| ch.is_whitespace() || ch.is_control())
    {
        return Err((
            vec![key("instance")],
            format!(
                "{:?}: must be one word (it is written into the X-Dualroute header)",
                c.instance
            ),
        ));
    }
    if c.recipient_delimiter.contains(['@', '"'])
        || c.recipient_delimiter.chars().any(|ch| ch.is_whitespace())
    {
        return Err((
            vec![key("recipient_delimiter")],
            "must not contain '@', quotes or spaces".into(),
        ));
    }
    if let Some(cl) = &c.cluster {
        // A node says it is alive at every sync: a shorter silence would
        // show healthy nodes SILENT.
        if cl.silent_after.0 < cl.sync.0 * 2 {
            return Err((
                vec![key("cluster"), key("silent_after")],
                format!(
                    "{} is less than twice `sync` ({}): every node would look SILENT between two syncs; make it at least {}",
                    crate::config::human(cl.silent_after.0),
                    crate::config::human(cl.sync.0),
                    crate::config::human(cl.sync.0 * 2)
                ),
            ));
        }
        if cl.sync.0.is_zero() {
            return Err((
                vec![key("cluster"), key("sync")],
                "must be at least 1s".into(),
            ));
        }
    }
    let managed = |d: &str| c.domains.keys().any(|m| m.0 == d);
    let suffix = &c.relay_suffix.0;
    if let Some(m) = c
        .domains
        .keys()
        .find(|m| suffix == &m.0 || suffix.ends_with(&format!(".{}", m.0)))
    {
        return Err((
            vec![key("relay_suffix")],
            format!("{suffix} lies inside managed domain {m}: routed mail would come back here"),
        ));
    }
    for (name, d) in &c.domains {
        let at = |rest: Vec<Seg>| {
            let mut p = vec![key("domains"), key(name)];
            p.extend(rest);
            p
        };
        if let Destination::Domain { domain, .. } = &d.destination {
            if managed(&domain.0) {
                return Err((at(vec![key("destination"), key("domain")]), format!(
                    "{domain} is itself a managed domain: its MX is this server, so routed mail would loop"
                )));
            }
        }
        // In dual mode nothing is routed away: a recipient with a mailbox
        // here is kept and copied, one without is refused 550 already
        // (DESIGN.md §2). Refusing at RCPT what the destination does not
        // know would refuse mail for real mailboxes here.
        if d.reject_unknown.is_some() && d.mode == Mode::Dual {
            return Err((
                at(vec![key("destination"), key("reject_unknown")]),
                "mode `dual` routes nothing away: a recipient without a mailbox here is refused already, and one with a mailbox here must get its mail whatever the destination knows; remove `reject_unknown` or use `mode: split`".into(),
            ));
        }
        if d.require_gateway && c.gateways.is_empty() {
            return Err((
                at(vec![key("require_gateway")]),
                "needs `gateways`: with none listed, every unauthenticated sender would be refused"
                    .into(),
            ));
        }
        for (user, rule) in &d.users {
            if user.domain != name.0 {
                return Err((
                    at(vec![key("users"), Seg::KeyItself(user.to_string())]),
                    format!("{user} is not in domain {name}"),
                ));
            }
            let targets: Vec<(Vec<Seg>, &crate::address::Address)> = match rule {
                UserRule::CopyTo(list) => list
                    .iter()
                    .enumerate()
                    .map(|(j, a)| {
                        (
                            vec![key("users"), key(user), key("copy_to"), Seg::Index(j)],
                            a,
                        )
                    })
                    .collect(),
                UserRule::RedirectTo(a) => {
                    vec![(vec![key("users"), key(user), key("redirect_to")], a)]
                }
                UserRule::Keep => vec![],
            };
            for (path, target) in targets {
                let same = target.domain == user.domain
                    && target
                        .unquoted_local()
                        .eq_ignore_ascii_case(&user.unquoted_local());
                // A target in a managed domain is decided as a message to
                // it would be (src/decision.rs `target`); what needs the
                // accounts is checked when they are loaded
                // (src/policy.rs, "Addresses that must reach a mailbox").
                if same {
                    return Err((
                        at(path),
                        format!("{target} is the user itself: that would loop"),
                    ));
                }
            }
        }
    }
    if let Some(b) = &c.breaker {
        if b.threshold == 0 {
            return Err((
                vec![key("breaker"), key("threshold")],
                "must be at least 1".into(),
            ));
        }
        if b.deferrals == Some(0) {
            return Err((
                vec![key("breaker"), key("deferrals")],
                "must be at least 1; leave it out to count deferrals without tripping".into(),
            ));
        }
    }
    if let Some(n) = &c.notify {
        validate_notify(c, n)?;
    }
    Ok(())
}

/// `notify:`: someone to tell, and a way to reach them that the milter can
/// recognise as its own (README "Notification by mail").
fn validate_notify(c: &Config, n: &NotifyConfig) -> Result<(), Invalid> {
    if n.to.is_empty() {
        return Err((
            vec![key("notify"), key("to")],
            "is empty; give the administrator's address".into(),
        ));
    }
    // Sendmail's `sendmail` command hands the message to the MTA over SMTP
    // (the MSP, submit.cf), so the milter sees it as one more local client
    // it cannot tell apart from others, and would route it.
    if let (Mta::Sendmail, NotifyVia::Sendmail(_)) = (c.mta, &n.via) {
        return Err((
            vec![key("notify"), key("via")],
            "with mta: sendmail, the sendmail command submits through the MTA's SMTP port and the milter cannot recognise the notification as its own; use smtp:127.0.0.1:25".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_finds_nodes() {
        let text = "a: 1\nb:\n  Example.COM:\n    users:\n      x@example.com: {keep: true}\n    list: [p, q]\n";
        assert_eq!(locate(text, &[key("a")]), Some((1, 4)));
        assert_eq!(locate(text, &[key("b"), key("example.com")]), Some((4, 5)));
        assert_eq!(
            locate(
                text,
                &[
                    key("b"),
                    key("example.com"),
                    key("users"),
                    Seg::KeyItself("X@Example.com".into())
                ]
            ),
            Some((5, 7))
        );
        assert_eq!(
            locate(
                text,
                &[key("b"), key("example.com"), key("list"), Seg::Index(1)]
            ),
            Some((6, 15))
        );
        assert_eq!(locate(text, &[key("c")]), None);
        assert_eq!(locate("{{{", &[key("c")]), None);
    }

    #[test]
    fn a_missing_destination_account_file_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("milter.yaml");
        let yaml = "domains:\n  example.com:\n    mode: route\n    destination:\n      hosts: [mx.legacy.test]\n      reject_unknown:\n        accounts:\n          - file: legacy-users.txt\n";
        std::fs::write(&path, yaml).unwrap();
        let e = read_file(&path).unwrap_err().to_string();
        let shown = dir.path().join("legacy-users.txt");
        assert!(
            e.contains(":8:19: domains.example.com.destination.reject_unknown.accounts[0].file: ")
                && e.contains(&format!("{}: cannot read", shown.display())),
            "{e}"
        );
        // Relative to the configuration file, as the domain's accounts.
        std::fs::write(&shown, "a@example.com\n").unwrap();
        let c = read_file(&path).unwrap();
        let ru = c
            .domains
            .values()
            .next()
            .unwrap()
            .reject_unknown
            .clone()
            .unwrap();
        assert_eq!(ru.accounts, vec![AccountSource::File(shown)]);
    }
    #[test]
    fn cluster_silent_after_must_outlast_two_syncs() {
        let yaml =
            "cluster:\n  redis: redis://127.0.0.1:6379/0\n  sync: 30s\n  silent_after: 40s\n";
        let e = parse(yaml, "m.yaml").unwrap_err().to_string();
        assert!(
            e.starts_with("m.yaml:4:")
                && e.contains("cluster.silent_after")
                && e.contains("less than twice `sync`"),
            "{e}"
        );
        let ok = "cluster:\n  redis: redis://127.0.0.1:6379/0\n  sync: 30s\n  silent_after: 60s\n";
        assert!(parse(ok, "m.yaml").is_ok());
        let e = parse("cluster:\n  redis: 127.0.0.1:6379\n", "m.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("m.yaml:2:") && e.contains("expected redis://"),
            "{e}"
        );
    }
}
