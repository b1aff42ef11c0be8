//! `domains.*.accounts` in `milter.yaml`: the sources of account names
//! (`list`, `file`, `postfix_map`, `postfix`, `command`), and the top-level
//! `accounts_shrink_limit` that guards their reloads.

use super::de::{checked_map, deserialize_from_str};
use super::{ConfigAddress, Window};
use serde::{de, Deserialize, Deserializer};
use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

/// One source of account names (docs/design.md §5 `accounts:`).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum AccountSource {
    List(Vec<ConfigAddress>),
    File(PathBuf),
    PostfixMap(PostfixTable),
    /// `postfix: /etc/postfix`: Postfix's own recipient tables of the
    /// instance in that configuration directory, aliases included
    /// (docs/design.md "Aliases").
    Postfix(PathBuf),
    Command(AccountCommand),
}

impl AccountSource {
    /// The file whose changes mean the accounts changed: the account file,
    /// or the file Postfix itself reads for the table (the `.db` of a
    /// `hash:` table, not its text). `None` for `list:`.
    pub fn watched_file(&self) -> Option<PathBuf> {
        match self {
            AccountSource::List(_) => None,
            AccountSource::File(p) => Some(p.clone()),
            AccountSource::PostfixMap(t) => Some(t.compiled_file()),
            // The tables main.cf names are only known once it is read:
            // they are watched from the load's report (LoadReport::watched).
            AccountSource::Postfix(dir) => Some(dir.join("main.cf")),
            AccountSource::Command(_) => None,
        }
    }

    /// The YAML key of the source, for messages.
    pub fn key(&self) -> &'static str {
        match self {
            AccountSource::List(_) => "list",
            AccountSource::File(_) => "file",
            AccountSource::PostfixMap(_) => "postfix_map",
            AccountSource::Postfix(_) => "postfix",
            AccountSource::Command(_) => "command",
        }
    }
}

/// The Postfix lookup table types whose keys `postmap -s` can list
/// (postmap(1); `lmdb` and `cdb` need the postfix-lmdb / postfix-cdb
/// packages). Network and pattern tables (mysql, ldap, pcre, ...) cannot
/// be listed, so they cannot be account sources.
pub const LISTABLE_TABLE_TYPES: [&str; 5] = ["hash", "btree", "lmdb", "cdb", "texthash"];

/// `postfix_map:` — a Postfix table, either as Postfix names it
/// (`hash:/etc/postfix/vmailbox`), read through Postfix's own reader, or
/// as a bare path to its text source, read directly.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct PostfixTable {
    /// `hash`, `lmdb`, ...; `None` for a bare path.
    pub kind: Option<String>,
    pub path: PathBuf,
}

impl PostfixTable {
    /// What Postfix opens (dict_db.c, dict_lmdb.c, dict_cdb.c append the
    /// suffix to the table name; texthash reads the text itself).
    pub fn compiled_file(&self) -> PathBuf {
        let suffix = match self.kind.as_deref() {
            Some("hash" | "btree") => "db",
            Some("lmdb") => "lmdb",
            Some("cdb") => "cdb",
            _ => return self.path.clone(),
        };
        let mut name = self.path.clone().into_os_string();
        name.push(".");
        name.push(suffix);
        PathBuf::from(name)
    }
}

impl fmt::Display for PostfixTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Some(k) => write!(f, "{k}:{}", self.path.display()),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

impl FromStr for PostfixTable {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // `type:name` as in main.cf; a path never starts with a word and a
        // colon (a relative path that does must be written as ./name).
        let typed = s.split_once(':').filter(|(k, _)| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
        match typed {
            Some((kind, name)) if LISTABLE_TABLE_TYPES.contains(&kind) => {
                if name.is_empty() {
                    return Err(format!("{s:?}: missing the table's path after {kind}:"));
                }
                Ok(PostfixTable {
                    kind: Some(kind.to_owned()),
                    path: PathBuf::from(name),
                })
            }
            Some((kind, _)) => Err(format!(
                "{s:?}: a {kind}: table cannot be listed, so it cannot be an account source; use one of {} (or a file: of addresses)",
                LISTABLE_TABLE_TYPES.map(|k| format!("{k}:")).join(", ")
            )),
            None if s.is_empty() => Err("empty path".into()),
            None => Ok(PostfixTable {
                kind: None,
                path: PathBuf::from(s),
            }),
        }
    }
}
deserialize_from_str!(PostfixTable, "Postfix table");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccountSource {
    list: Option<Vec<ConfigAddress>>,
    file: Option<PathBuf>,
    postfix_map: Option<PostfixTable>,
    postfix: Option<PathBuf>,
    command: Option<Vec<String>>,
    refresh: Option<Window>,
    timeout: Option<Window>,
    format: Option<CommandFormat>,
}

impl<'de> Deserialize<'de> for AccountSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |raw: RawAccountSource| {
            const ONE_OF: &str =
                "each source is exactly one of `list`, `file`, `postfix_map`, `postfix`, `command`";
            let command_keys =
                raw.refresh.is_some() || raw.timeout.is_some() || raw.format.is_some();
            let given = [
                raw.list.is_some(),
                raw.file.is_some(),
                raw.postfix_map.is_some(),
                raw.postfix.is_some(),
                raw.command.is_some(),
            ];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(ONE_OF.into());
            }
            if let Some(argv) = raw.command {
                return AccountCommand::new(argv, raw.refresh, raw.timeout, raw.format)
                    .map(AccountSource::Command);
            }
            if command_keys {
                return Err(
                    "`refresh`, `timeout` and `format` belong to a `command` source".into(),
                );
            }
            if let Some(dir) = raw.postfix {
                if !dir.is_absolute() {
                    return Err(format!(
                        "`postfix`: {:?} must be the absolute path of the Postfix configuration directory (as `postconf -c`), e.g. /etc/postfix",
                        dir.display().to_string()
                    ));
                }
                return Ok(AccountSource::Postfix(dir));
            }
            match (raw.list, raw.file, raw.postfix_map) {
                (Some(l), None, None) => Ok(AccountSource::List(l)),
                (None, Some(f), None) => Ok(AccountSource::File(f)),
                (None, None, Some(m)) => Ok(AccountSource::PostfixMap(m)),
                _ => Err(ONE_OF.into()),
            }
        })
    }
}

/// `command:` — a program that prints the accounts, such as `ldapsearch`
/// or `mysql` (README "Accounts from a directory"). It runs without a
/// shell, so nothing in an argument is ever interpreted.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct AccountCommand {
    /// The program (an absolute path) and its arguments.
    pub argv: Vec<String>,
    /// How often it runs again while the milter runs.
    pub refresh: Window,
    /// How long one run may take before it is killed and counts as failed.
    pub timeout: Window,
    pub format: CommandFormat,
}

/// What the command prints.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandFormat {
    /// One address per line (`mysql -N -B`, `psql -At`).
    #[default]
    Lines,
    /// LDIF as `ldapsearch -LLL` prints it: the value of every attribute
    /// but `dn` is an address.
    Ldif,
}

impl AccountCommand {
    /// Default `refresh`: often enough that a new mailbox gets its mail
    /// within minutes, rarely enough not to load the directory.
    pub const DEFAULT_REFRESH_SECS: u64 = 300;
    /// Default `timeout`.
    pub const DEFAULT_TIMEOUT_SECS: u64 = 60;

    fn new(
        argv: Vec<String>,
        refresh: Option<Window>,
        timeout: Option<Window>,
        format: Option<CommandFormat>,
    ) -> Result<AccountCommand, String> {
        let Some(program) = argv.first() else {
            return Err("`command` is empty; give the program and its arguments as a list".into());
        };
        if !program.starts_with('/') {
            return Err(format!(
                "`command`: {program:?} must be an absolute path (the milter's PATH is not the shell's), e.g. /usr/bin/{program}"
            ));
        }
        if argv.len() == 1 && program.contains(' ') {
            return Err(format!(
                "`command`: {program:?} is one word with spaces; no shell splits it: give each argument as its own list item"
            ));
        }
        Ok(AccountCommand {
            argv,
            refresh: refresh.unwrap_or(Window(Duration::from_secs(Self::DEFAULT_REFRESH_SECS))),
            timeout: timeout.unwrap_or(Window(Duration::from_secs(Self::DEFAULT_TIMEOUT_SECS))),
            format: format.unwrap_or_default(),
        })
    }

    /// The program only: its arguments may hold a bind password, which
    /// must not end up in the log.
    pub fn program(&self) -> &str {
        self.argv.first().map_or("", String::as_str)
    }
}

/// `accounts_shrink_limit`: a reload that would remove this fraction of a
/// domain's accounts or more is refused (0 to 1; 0: any loss, 1: only
/// losing all, which is an error anyway). Never NaN, hence `Eq`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShrinkLimit(pub f64);

impl Eq for ShrinkLimit {}

impl Default for ShrinkLimit {
    fn default() -> Self {
        ShrinkLimit(0.5)
    }
}

impl<'de> Deserialize<'de> for ShrinkLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ShrinkLimit;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a fraction between 0 and 1")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ShrinkLimit, E> {
                if (0.0..=1.0).contains(&v) {
                    Ok(ShrinkLimit(v))
                } else {
                    Err(E::custom(format!(
                        "{v}: must be between 0 and 1 (0.5: a reload that would remove half of a domain's accounts or more is refused; 1: no limit)"
                    )))
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ShrinkLimit, E> {
                self.visit_f64(v as f64)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ShrinkLimit, E> {
                self.visit_f64(v as f64)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postfix_source() {
        let parse = |y: &str| serde_yaml::from_str::<AccountSource>(y).map_err(|e| e.to_string());
        assert_eq!(
            parse("{ postfix: /etc/postfix }").unwrap(),
            AccountSource::Postfix(PathBuf::from("/etc/postfix"))
        );
        assert!(parse("{ postfix: etc/postfix }")
            .unwrap_err()
            .contains("absolute path of the Postfix configuration directory"));
        assert!(parse("{ postfix: /etc/postfix, file: /x }")
            .unwrap_err()
            .contains("exactly one of"));
    }

    #[test]
    fn postfix_tables() {
        let t = |s: &str| s.parse::<PostfixTable>();
        let hash = t("hash:/etc/postfix/vmailbox").unwrap();
        assert_eq!(hash.kind.as_deref(), Some("hash"));
        assert_eq!(
            hash.compiled_file(),
            PathBuf::from("/etc/postfix/vmailbox.db")
        );
        assert_eq!(hash.to_string(), "hash:/etc/postfix/vmailbox");
        assert_eq!(
            t("lmdb:/x").unwrap().compiled_file(),
            PathBuf::from("/x.lmdb")
        );
        assert_eq!(
            t("cdb:/x").unwrap().compiled_file(),
            PathBuf::from("/x.cdb")
        );
        assert_eq!(
            t("texthash:/x").unwrap().compiled_file(),
            PathBuf::from("/x")
        );
        let bare = t("/etc/postfix/vmailbox").unwrap();
        assert_eq!(bare.kind, None);
        assert_eq!(bare.compiled_file(), PathBuf::from("/etc/postfix/vmailbox"));
        assert_eq!(t("./a:b").unwrap().kind, None);
        assert!(t("mysql:/etc/postfix/mysql.cf")
            .unwrap_err()
            .contains("cannot be listed"));
        assert!(t("pcre:/x").is_err());
        assert!(t("hash:").is_err());
    }
}
