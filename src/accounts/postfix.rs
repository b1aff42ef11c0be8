//! Postfix's own recipient tables, as Postfix has them (docs/design.md
//! "Aliases"): the `postfix:` account source, and what `dualroute check`
//! compares the accounts with (src/postfix/recipients.rs).
//!
//! Read with Postfix's tools on the configuration directory given
//! (`postconf -c DIR -h -x`, `postmap -c DIR -s TYPE:NAME`), so what is
//! read is what Postfix looks up. A table that cannot be listed (mysql:,
//! ldap:, pcre:, unix:, ...) is never skipped in silence: it is named in
//! [`Tables::unlistable`], and the `postfix:` source refuses to load
//! without it.

use super::read::{postmap_keys, read_stable};
use super::LoadError;
use crate::config::PostfixTable;
use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};

/// How deep an alias may expand into aliases. Postfix's own
/// `virtual_alias_recursion_limit` is 1000; a chain longer than this is
/// reported, not followed.
const MAX_DEPTH: usize = 100;

/// A table key (lower case) and the table it came from, as main.cf
/// names it.
type Entry = (String, String);

/// The recipient tables of one Postfix instance.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub config_dir: PathBuf,
    /// `virtual_mailbox_maps` keys `user@domain` (lower case), with the
    /// table each came from. `@domain` keys are catch-alls, not here.
    pub mailboxes: Vec<Entry>,
    /// `virtual_alias_maps`: lower-case key → targets as written, and
    /// the table. Keys are `user@domain`, bare `user` (for the domains in
    /// `mydestination`) or `@domain` (a catch-all).
    pub aliases: FxHashMap<String, (Vec<String>, String)>,
    /// `alias_maps` keys (local aliases of the `mydestination` domains)
    /// and the table; read only when asked for.
    pub local_aliases: Vec<Entry>,
    /// `mydestination`, lower case.
    pub local_domains: Vec<String>,
    /// `myorigin`: what cleanup appends to a target without a domain
    /// (`append_at_myorigin`).
    pub myorigin: String,
    /// (parameter, table) of every table that could not be listed.
    pub unlistable: Vec<(String, String)>,
    /// The files whose changes change what Postfix accepts: main.cf and
    /// every listed table's file, with its modification time before it
    /// was read (a change during the read triggers a reload).
    pub watched: Vec<(PathBuf, Option<std::time::SystemTime>)>,
}

impl Tables {
    /// Reads `virtual_mailbox_maps` and `virtual_alias_maps` (and, with
    /// `local`, `alias_maps`) of the instance in `config_dir`.
    pub fn read(config_dir: &Path, local: bool) -> Result<Tables, LoadError> {
        let params = [
            "myorigin",
            "mydestination",
            "virtual_mailbox_maps",
            "virtual_alias_maps",
            "alias_maps",
        ];
        let values = postconf(config_dir, &params)?;
        let lower = |s: &str| s.to_ascii_lowercase();
        let main_cf = config_dir.join("main.cf");
        let mut t = Tables {
            config_dir: config_dir.to_owned(),
            myorigin: lower(values[0].trim()),
            local_domains: list(&values[1]).iter().map(|d| lower(d)).collect(),
            watched: vec![(main_cf.clone(), modified(&main_cf))],
            ..Tables::default()
        };
        t.each_key(&values[2], "virtual_mailbox_maps", &mut |key, _, table| {
            if !key.starts_with('@') && key.contains('@') {
                t_push(key, table)
            } else {
                None
            }
        })
        .map(|found| t.mailboxes = found)?;
        let mut aliases = FxHashMap::default();
        t.each_key(
            &values[3],
            "virtual_alias_maps",
            &mut |key, value, table| {
                let targets = value
                    .split([',', ' ', '\t'])
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>();
                // The first table that has a key wins, as in Postfix's lookup.
                aliases
                    .entry(key.to_ascii_lowercase())
                    .or_insert_with(|| (targets, table.to_owned()));
                None
            },
        )?;
        t.aliases = aliases;
        if local {
            t.local_aliases = t.each_key(&values[4], "alias_maps", &mut |key, _, table| {
                t_push(key, table)
            })?;
        }
        Ok(t)
    }

    /// Calls `each(key, value, table)` for every entry of every table of
    /// the list `value` of `param`, collecting what it returns. A table
    /// that cannot be listed goes to `unlistable`.
    fn each_key(
        &mut self,
        value: &str,
        param: &str,
        each: &mut dyn FnMut(&str, &str, &str) -> Option<Entry>,
    ) -> Result<Vec<Entry>, LoadError> {
        let mut found = Vec::new();
        for name in list(value) {
            // proxymap(8) only forwards the lookup: the table behind it is
            // what holds the keys.
            let inner = name.strip_prefix("proxy:").unwrap_or(&name);
            if let Some(body) = inner
                .strip_prefix("inline:{")
                .and_then(|b| b.strip_suffix('}'))
                .filter(|b| !b.contains('{'))
            {
                for pair in body.split(',') {
                    if let Some((k, v)) = pair.split_once('=') {
                        found.extend(each(k.trim(), v.trim(), &name));
                    }
                }
                continue;
            }
            let table: Option<PostfixTable> = inner
                .parse()
                .ok()
                .filter(|t: &PostfixTable| t.kind.is_some());
            let Some(table) = table else {
                self.unlistable.push((param.to_owned(), name.clone()));
                continue;
            };
            let compiled = table.compiled_file();
            self.watched.push((compiled.clone(), modified(&compiled)));
            let mark = found.len();
            read_stable(&compiled, &mut || {
                found.truncate(mark);
                postmap_keys(&table, Some(&self.config_dir), |_, line| {
                    let (key, value) = line.split_once('\t').unwrap_or((line, ""));
                    found.extend(each(key, value, &name));
                    Ok(())
                })
            })?;
        }
        Ok(found)
    }

    /// What Postfix's virtual alias expansion makes of `address`
    /// (lower case): the final addresses, in order, each once. An address
    /// without an alias is its own result; so is an alias target equal to
    /// its key (ADDRESS_REWRITING_README: "a virtual alias that maps to
    /// itself"). Lookup order as in Postfix: `user@domain`, bare `user`
    /// for the `mydestination` domains, `@domain`. `Err` with the chain
    /// when it is deeper than [`MAX_DEPTH`] or loops.
    pub fn expand(&self, address: &str) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        self.expand_into(address, &mut vec![address.to_owned()], &mut out)?;
        Ok(out)
    }

    fn expand_into(
        &self,
        address: &str,
        chain: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), String> {
        let Some(targets) = self.lookup(address) else {
            if !out.iter().any(|o| o == address) {
                out.push(address.to_owned());
            }
            return Ok(());
        };
        let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
        for target in targets {
            let target = target.to_ascii_lowercase();
            let target = if let Some(d) = target.strip_prefix('@') {
                // `@example.org @example.com`: the whole domain.
                format!("{local}@{d}")
            } else if !target.contains('@') {
                format!("{target}@{}", self.myorigin)
            } else {
                target
            };
            if target == address {
                if !out.contains(&target) {
                    out.push(target);
                }
                continue;
            }
            if chain.contains(&target) || chain.len() > MAX_DEPTH {
                chain.push(target);
                return Err(format!(
                    "{} loops or is deeper than {MAX_DEPTH}",
                    chain.join(" → ")
                ));
            }
            chain.push(target.clone());
            self.expand_into(&target, chain, out)?;
            chain.pop();
        }
        Ok(())
    }

    /// The targets of the virtual alias that applies to `address`.
    pub fn lookup(&self, address: &str) -> Option<&Vec<String>> {
        let (local, domain) = address.rsplit_once('@')?;
        self.aliases
            .get(address)
            .or_else(|| {
                self.local_domains
                    .iter()
                    .any(|d| d == domain)
                    .then(|| self.aliases.get(local))
                    .flatten()
            })
            .or_else(|| self.aliases.get(&format!("@{domain}")))
            .map(|(t, _)| t)
    }

    /// The `user@domain` alias keys of `domain` (and bare keys, when the
    /// domain is in `mydestination`), as full lower-case addresses, with
    /// their table.
    pub fn alias_keys_of<'a>(
        &'a self,
        domain: &'a str,
    ) -> impl Iterator<Item = (String, &'a str)> + 'a {
        let local = self.local_domains.iter().any(|d| d == domain);
        self.aliases
            .iter()
            .filter_map(move |(k, (_, table))| match k.rsplit_once('@') {
                Some((l, d)) if !l.is_empty() && d == domain => Some((k.clone(), table.as_str())),
                None if local => Some((format!("{k}@{domain}"), table.as_str())),
                _ => None,
            })
    }
}

/// A file's modification time (as `policy::modified`, which this module
/// cannot import: the policy imports the accounts).
fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn t_push(key: &str, table: &str) -> Option<Entry> {
    Some((key.to_ascii_lowercase(), table.to_owned()))
}

/// A Postfix list parameter's items: separated by commas or white space,
/// except inside `{ }` (postconf(5), "inline:{...}").
fn list(value: &str) -> Vec<String> {
    let mut items = Vec::new();
    let (mut depth, mut item) = (0usize, String::new());
    for c in value.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' | ' ' | '\t' | '\n' if depth == 0 => {
                if !item.is_empty() {
                    items.push(std::mem::take(&mut item));
                }
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    if !item.is_empty() {
        items.push(item);
    }
    items
}

/// `postconf -c DIR -h -x NAME…`: the values, `$name`s expanded, in the
/// order asked.
fn postconf(config_dir: &Path, params: &[&str]) -> Result<Vec<String>, LoadError> {
    let fail = |message| LoadError {
        file: config_dir.join("main.cf").display().to_string(),
        line: None,
        message,
    };
    if !config_dir.join("main.cf").is_file() {
        return Err(fail(format!(
            "no main.cf in {}: `postfix:` names the Postfix configuration directory (as `postconf -c`)",
            config_dir.display()
        )));
    }
    let postconf = ["/usr/sbin/postconf", "/usr/local/sbin/postconf"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("postconf");
    let out = std::process::Command::new(postconf)
        .arg("-c")
        .arg(config_dir)
        .args(["-h", "-x"])
        .args(params)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| fail(format!("cannot run postconf ({e}): install postfix")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let values: Vec<String> = text.lines().map(str::to_owned).collect();
    if !out.status.success() || values.len() != params.len() {
        return Err(fail(format!(
            "postconf -c {} -h -x {} failed ({}): {}",
            config_dir.display(),
            params.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(aliases: &[(&str, &str)]) -> Tables {
        Tables {
            myorigin: "mx.example".into(),
            local_domains: vec!["mx.example".into()],
            aliases: aliases
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        (
                            v.split(", ").map(str::to_owned).collect(),
                            "hash:/v".to_owned(),
                        ),
                    )
                })
                .collect(),
            ..Tables::default()
        }
    }

    #[test]
    fn lists_split_outside_braces() {
        assert_eq!(
            list("hash:/a, inline:{ a=b, c=d }  mysql:/m.cf,"),
            ["hash:/a", "inline:{ a=b, c=d }", "mysql:/m.cf"]
        );
    }

    #[test]
    fn expansion_follows_postfix() {
        let t = tables(&[
            ("info@example.com", "alice@example.com"),
            ("team@example.com", "info@example.com, carol@example.com"),
            ("self@example.com", "self@example.com, archive@example.net"),
            ("@example.org", "@example.com"),
            ("root", "alice"),
            ("loop@example.com", "loop2@example.com"),
            ("loop2@example.com", "loop@example.com"),
        ]);
        let e = |a: &str| t.expand(a).unwrap();
        assert_eq!(e("info@example.com"), ["alice@example.com"]);
        assert_eq!(
            e("team@example.com"),
            ["alice@example.com", "carol@example.com"]
        );
        assert_eq!(
            e("self@example.com"),
            ["self@example.com", "archive@example.net"]
        );
        assert_eq!(e("bob@example.org"), ["bob@example.com"]);
        assert_eq!(e("root@mx.example"), ["alice@mx.example"]);
        assert_eq!(e("nobody@example.com"), ["nobody@example.com"]);
        assert!(t.expand("loop@example.com").unwrap_err().contains("loops"));
        let mut keys: Vec<String> = t.alias_keys_of("example.com").map(|(k, _)| k).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "info@example.com",
                "loop2@example.com",
                "loop@example.com",
                "self@example.com",
                "team@example.com"
            ]
        );
    }
}
