//! Typed configuration values (docs/design.md §5). Every value that can be wrong
//! is parsed through `FromStr` with an error an administrator can act on;
//! the YAML reader attaches file, line and column.

use crate::address::{normalize_domain, Address};
use ipnet::IpNet;
use serde::{de, Deserialize, Deserializer};
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

/// Implements `Deserialize` through `FromStr`. The parse runs inside the
/// visitor, so serde_yaml marks the error with the scalar's own position.
macro_rules! deserialize_from_str {
    ($t:ty, $what:expr) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> de::Visitor<'de> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        write!(f, "a {}", $what)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$t, E> {
                        s.parse().map_err(|e| E::custom(format!("{}: {e}", $what)))
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

/// Deserializes a mapping as `R`, then checks it with `check`, inside the
/// mapping's own deserialization so that errors point at the mapping.
fn checked_map<'de, D, R, T>(
    d: D,
    check: impl FnOnce(R) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    R: Deserialize<'de>,
{
    struct V<R, F>(F, std::marker::PhantomData<R>);
    impl<'de, R: Deserialize<'de>, T, F: FnOnce(R) -> Result<T, String>> de::Visitor<'de> for V<R, F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a mapping")
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let raw = R::deserialize(de::value::MapAccessDeserializer::new(map))?;
            (self.0)(raw).map_err(de::Error::custom)
        }
    }
    d.deserialize_map(V(check, std::marker::PhantomData))
}

/// Where the milter listens. Both Postfix's syntax (`inet:host:port`,
/// `unix:/path`) and libmilter's (`inet:port@host`, `inet6:port@host`,
/// `local:/path`) are accepted, since admins copy either from their MTA.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Socket {
    Inet { host: String, port: u16 },
    Unix(PathBuf),
}

impl fmt::Display for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Socket::Inet { host, port } if host.contains(':') => write!(f, "inet:[{host}]:{port}"),
            Socket::Inet { host, port } => write!(f, "inet:{host}:{port}"),
            Socket::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl FromStr for Socket {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            format!("{s:?}: expected inet:HOST:PORT, inet:PORT@HOST or unix:/PATH")
        })?;
        match kind {
            "unix" | "local" => {
                if rest.starts_with('/') {
                    Ok(Socket::Unix(PathBuf::from(rest)))
                } else {
                    Err(format!("{s:?}: the socket path must be absolute"))
                }
            }
            "inet" | "inet6" => {
                let (host, port) = if let Some((port, host)) = rest.split_once('@') {
                    (host, port)
                } else if let Some(bracketed) = rest.strip_prefix('[') {
                    let (host, port) = bracketed
                        .split_once("]:")
                        .ok_or_else(|| format!("{s:?}: expected inet:[ADDR]:PORT"))?;
                    (host, port)
                } else {
                    rest.rsplit_once(':')
                        .ok_or_else(|| format!("{s:?}: missing port (inet:HOST:PORT)"))?
                };
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if host.is_empty() {
                    return Err(format!("{s:?}: missing host"));
                }
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("{s:?}: bad port {port:?}"))?;
                Ok(Socket::Inet {
                    host: host.to_owned(),
                    port,
                })
            }
            _ => Err(format!(
                "{s:?}: unknown socket type {kind:?} (use inet: or unix:)"
            )),
        }
    }
}
deserialize_from_str!(Socket, "listen");

/// A domain name, normalized to lower-case A-labels.
#[derive(Clone, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub struct DomainName(pub String);

impl FromStr for DomainName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with('[') {
            return Err(format!("{s:?}: an address literal is not a mail domain"));
        }
        normalize_domain(s)
            .map(DomainName)
            .map_err(|e| e.to_string())
    }
}
deserialize_from_str!(DomainName, "domain");

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A full mail address given in the configuration.
#[derive(Clone, Debug, Eq, PartialEq, Hash)]
pub struct ConfigAddress(pub Address);

impl FromStr for ConfigAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let inner = s
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .unwrap_or(s);
        match Address::parse(inner) {
            Ok(a) if a.domain.starts_with('[') => {
                Err(format!("{s:?}: use a domain name, not an address literal"))
            }
            Ok(a) => Ok(ConfigAddress(a)),
            Err(e) => Err(format!("{s:?} is not a mail address: {e}")),
        }
    }
}
deserialize_from_str!(ConfigAddress, "address");

/// A gateway: one IP address or a CIDR network.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Gateway(pub IpNet);

impl Gateway {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

impl FromStr for Gateway {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(net) = s.parse::<IpNet>() {
            if net.trunc() != net {
                return Err(format!(
                    "{s:?}: host bits are set; did you mean {}?",
                    net.trunc()
                ));
            }
            return Ok(Gateway(net));
        }
        s.parse::<IpAddr>()
            .map(|ip| Gateway(IpNet::from(ip)))
            .map_err(|_| format!("{s:?} is not an IP address or CIDR network"))
    }
}
deserialize_from_str!(Gateway, "gateway");

impl fmt::Display for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Clone, Copy, Debug, Eq, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Split,
    Dual,
    Route,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Split => "split",
            Mode::Dual => "dual",
            Mode::Route => "route",
        })
    }
}

#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalPartCase {
    #[default]
    Insensitive,
    Sensitive,
}

/// A destination host: `name`, `name:port`, `[ip]` or `[ip]:port`, as in
/// Postfix's next-hop syntax (brackets: no MX lookup).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Host {
    pub name: String,
    /// `[name]`: use the address records (or literal) only, no MX lookup.
    pub bracketed: bool,
    pub port: Option<u16>,
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.bracketed {
            write!(f, "[{}]", self.name)?;
        } else {
            f.write_str(&self.name)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl FromStr for Host {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, bracketed, port) = if let Some(rest) = s.strip_prefix('[') {
            let (name, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: missing ']'"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{s:?}: expected ':PORT' after ']'"))?,
                ),
            };
            (name, true, port)
        } else {
            match s.rsplit_once(':') {
                Some((n, p)) => (n, false, Some(p)),
                None => (s, false, None),
            }
        };
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("{s:?}: bad port {p:?}"))
            })
            .transpose()?;
        let name = if name.parse::<IpAddr>().is_ok() {
            if !bracketed {
                return Err(format!("{s:?}: write an IP address in brackets, [{name}]"));
            }
            name.to_owned()
        } else {
            normalize_domain(name).map_err(|e| format!("{s:?}: {e}"))?
        };
        Ok(Host {
            name,
            bracketed,
            port,
        })
    }
}
deserialize_from_str!(Host, "host");

/// The other server (docs/design.md §4).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Destination {
    /// Explicit hosts: routing addresses use the relay domain.
    Hosts(Vec<Host>),
    /// A domain whose MX receives routed mail.
    Domain {
        domain: DomainName,
        change_envelope: bool,
    },
}

impl Destination {
    /// The next hops routed mail goes to: the hosts, or the destination
    /// domain as a name to look up (its MX first).
    pub fn hosts(&self) -> Vec<Host> {
        match self {
            Destination::Hosts(h) => h.clone(),
            Destination::Domain { domain, .. } => vec![Host {
                name: domain.0.clone(),
                bracketed: false,
                port: None,
            }],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    hosts: Option<Vec<Host>>,
    domain: Option<DomainName>,
    change_envelope: Option<bool>,
    // The largest message the destination accepts (README "Size limit
    // for copies").
    max_size: Option<MessageSize>,
    // What the other side demands of the connection (docs/design.md
    // "The destination's rules").
    tls: Option<TlsLevel>,
    tls_match: Option<Vec<TlsMatch>>,
    concurrency: Option<u32>,
    rate_delay: Option<Window>,
}

/// `destination:` as written: where routed mail goes, how the MTA must
/// talk to it, and the largest message the other side takes.
struct DestinationEntry {
    destination: Destination,
    transport: Transport,
    max_size: Option<MessageSize>,
}

impl<'de> Deserialize<'de> for DestinationEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |raw: RawDestination| {
            let max_size = raw.max_size;
            let transport =
                Transport::from_raw(raw.tls, raw.tls_match, raw.concurrency, raw.rate_delay)?;
            let destination: Result<Destination, String> = match (raw.hosts, raw.domain, raw.change_envelope) {
            (Some(_), Some(_), _) => Err("`hosts` and `domain` are mutually exclusive".into()),
            (Some(_), None, Some(true)) => {
                Err("`change_envelope` needs `domain`: with `hosts`, routed mail uses the relay domain".into())
            }
            (Some(hosts), None, _) if hosts.is_empty() => Err("`hosts` is empty".into()),
            (Some(hosts), None, _) => Ok(Destination::Hosts(hosts)),
            (None, Some(domain), ce) => Ok(Destination::Domain { domain, change_envelope: ce.unwrap_or(false) }),
            (None, None, _) => Err("needs `hosts` or `domain`".into()),
        };
            Ok(DestinationEntry {
                destination: destination?,
                transport,
                max_size,
            })
        })
    }
}

/// Postfix's TLS security levels for the smtp client, under their Postfix
/// names (postconf(5) `smtp_tls_security_level`, TLS_README "Client-side
/// TLS security levels").
#[derive(Clone, Copy, Debug, Eq, PartialEq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsLevel {
    /// No TLS, even when offered.
    None,
    /// STARTTLS when offered, else plain text; no certificate check.
    May,
    /// TLS required; any certificate.
    Encrypt,
    /// TLS required; a trusted certificate naming the MX host.
    Verify,
    /// TLS required; a trusted certificate naming one of `tls_match`.
    Secure,
}

impl TlsLevel {
    /// Whether Postfix refuses to deliver without TLS at this level.
    pub fn requires_tls(self) -> bool {
        self >= TlsLevel::Encrypt
    }

    /// Whether Postfix checks the certificate's trust and names.
    pub fn verifies(self) -> bool {
        self >= TlsLevel::Verify
    }
}

impl fmt::Display for TlsLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Encrypt => "encrypt",
            TlsLevel::Verify => "verify",
            TlsLevel::Secure => "secure",
        })
    }
}

/// One `tls_match` entry, as `smtp_tls_policy_maps` takes it (TLS_README
/// "Mandatory server certificate verification"): a host name, `.domain`
/// for any name below it, or Postfix's `hostname`, `nexthop`,
/// `dot-nexthop`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct TlsMatch(pub String);

impl TlsMatch {
    pub const KEYWORDS: [&'static str; 3] = ["hostname", "nexthop", "dot-nexthop"];
}

impl FromStr for TlsMatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if TlsMatch::KEYWORDS.contains(&s) {
            return Ok(TlsMatch(s.to_owned()));
        }
        let (dot, name) = match s.strip_prefix('.') {
            Some(rest) => (".", rest),
            None => ("", s),
        };
        if name.contains([':', '[', ']']) || name.is_empty() {
            return Err(format!(
                "{s:?}: expected a host name, .domain, hostname, nexthop or dot-nexthop"
            ));
        }
        normalize_domain(name)
            .map(|n| TlsMatch(format!("{dot}{n}")))
            .map_err(|e| format!("{s:?}: {e}"))
    }
}
deserialize_from_str!(TlsMatch, "tls_match entry");

impl fmt::Display for TlsMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the destination demands of the connection: TLS, and how fast the
/// MTA may deliver to it. Every field unset: the MTA's own settings.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Transport {
    pub tls: Option<TlsLevel>,
    /// Only with `verify` or `secure`; empty: Postfix's default for the
    /// level (`hostname` for verify, `nexthop:dot-nexthop` for secure).
    pub tls_match: Vec<TlsMatch>,
    /// Parallel deliveries per destination host.
    pub concurrency: Option<u32>,
    /// Pause between deliveries to a destination host.
    pub rate_delay: Option<Window>,
}

impl Transport {
    /// A bound against typos: Postfix's own default is 20 parallel
    /// deliveries per destination (`default_destination_concurrency_limit`).
    pub const MAX_CONCURRENCY: u32 = 1000;

    /// The `smtp_tls_policy_maps` value: `secure match=a:b`, or the level
    /// alone without `tls_match`. `None` without `tls`.
    pub fn tls_policy(&self) -> Option<String> {
        let level = self.tls?;
        if self.tls_match.is_empty() {
            return Some(level.to_string());
        }
        let names: Vec<&str> = self.tls_match.iter().map(|m| m.0.as_str()).collect();
        Some(format!("{level} match={}", names.join(":")))
    }

    fn from_raw(
        tls: Option<TlsLevel>,
        tls_match: Option<Vec<TlsMatch>>,
        concurrency: Option<u32>,
        rate_delay: Option<Window>,
    ) -> Result<Transport, String> {
        if tls_match.is_some() && !tls.is_some_and(TlsLevel::verifies) {
            return Err("`tls_match` needs `tls: verify` or `tls: secure`: at lower levels Postfix does not look at the certificate's names".into());
        }
        if matches!(&tls_match, Some(m) if m.is_empty()) {
            return Err(
                "`tls_match` is empty; name the certificate's names or remove the key".into(),
            );
        }
        match concurrency {
            Some(0) => return Err("`concurrency` must be at least 1".into()),
            Some(n) if n > Transport::MAX_CONCURRENCY => {
                return Err(format!(
                    "`concurrency` {n}: at most {}",
                    Transport::MAX_CONCURRENCY
                ))
            }
            Some(n) if n > 1 && rate_delay.is_some() => {
                // Wietse Venema on postfix-users: with a rate delay there is
                // no concurrency; delivery 2 starts after delivery 1 ended
                // and the delay passed (postconf(5)
                // transport_destination_rate_delay).
                return Err("`rate_delay` makes Postfix deliver one message at a time to a destination, so `concurrency` above 1 would be ignored: give one of them".into());
            }
            _ => {}
        }
        Ok(Transport {
            tls,
            tls_match: tls_match.unwrap_or_default(),
            concurrency,
            rate_delay,
        })
    }
}

/// One source of account names (docs/design.md §5 `accounts:`).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum AccountSource {
    List(Vec<ConfigAddress>),
    File(PathBuf),
    PostfixMap(PostfixTable),
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
            AccountSource::Command(_) => None,
        }
    }

    /// The YAML key of the source, for messages.
    pub fn key(&self) -> &'static str {
        match self {
            AccountSource::List(_) => "list",
            AccountSource::File(_) => "file",
            AccountSource::PostfixMap(_) => "postfix_map",
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
    command: Option<Vec<String>>,
    refresh: Option<Window>,
    timeout: Option<Window>,
    format: Option<CommandFormat>,
}

impl<'de> Deserialize<'de> for AccountSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |raw: RawAccountSource| {
            let command_keys =
                raw.refresh.is_some() || raw.timeout.is_some() || raw.format.is_some();
            if let Some(argv) = raw.command {
                if raw.list.is_some() || raw.file.is_some() || raw.postfix_map.is_some() {
                    return Err(
                        "each source is exactly one of `list`, `file`, `postfix_map`, `command`"
                            .into(),
                    );
                }
                return AccountCommand::new(argv, raw.refresh, raw.timeout, raw.format)
                    .map(AccountSource::Command);
            }
            if command_keys {
                return Err(
                    "`refresh`, `timeout` and `format` belong to a `command` source".into(),
                );
            }
            match (raw.list, raw.file, raw.postfix_map) {
                (Some(l), None, None) => Ok(AccountSource::List(l)),
                (None, Some(f), None) => Ok(AccountSource::File(f)),
                (None, None, Some(m)) => Ok(AccountSource::PostfixMap(m)),
                _ => Err(
                    "each source is exactly one of `list`, `file`, `postfix_map`, `command`".into(),
                ),
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

/// A per-user rule.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum UserRule {
    CopyTo(Vec<Address>),
    RedirectTo(Address),
    Keep,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUserRule {
    copy_to: Option<OneOrMany<ConfigAddress>>,
    redirect_to: Option<ConfigAddress>,
    keep: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<'de> Deserialize<'de> for UserRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |raw: RawUserRule| {
            match (raw.copy_to, raw.redirect_to, raw.keep) {
                (Some(c), None, None) => {
                    let list: Vec<Address> = match c {
                        OneOrMany::One(a) => vec![a.0],
                        OneOrMany::Many(v) => v.into_iter().map(|a| a.0).collect(),
                    };
                    if list.is_empty() {
                        return Err("`copy_to` is empty".into());
                    }
                    Ok(UserRule::CopyTo(list))
                }
                (None, Some(r), None) => Ok(UserRule::RedirectTo(r.0)),
                (None, None, Some(true)) => Ok(UserRule::Keep),
                (None, None, Some(false)) => {
                    Err("`keep: false` means nothing; remove the rule".into())
                }
                (None, None, None) => {
                    Err("needs one of `copy_to`, `redirect_to`, `keep: true`".into())
                }
                _ => Err("`copy_to`, `redirect_to` and `keep` are mutually exclusive".into()),
            }
        })
    }
}

/// Settings of one managed domain.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct DomainConfig {
    pub mode: Mode,
    pub enabled: bool,
    pub destination: Destination,
    /// The destination's TLS and throttling keys (`destination.tls`, …).
    pub transport: Transport,
    pub bounce: bool,
    pub verify: Option<Address>,
    pub require_gateway: bool,
    /// `None` when the domain has no `accounts:` key.
    pub accounts: Option<Vec<AccountSource>>,
    /// Keys as written (normalized by the policy with the case rules).
    pub users: Vec<(Address, UserRule)>,
    /// `destination.max_size`: copies of larger messages are not made.
    pub max_size: Option<MessageSize>,
    /// `shadow:` of the domain; `None`: the global `shadow:` applies
    /// ([`Config::shadow`]).
    pub shadow: Option<bool>,
}

impl DomainConfig {
    /// The relay domain of managed domain `name`, for destinations that
    /// need one (docs/design.md §4).
    pub fn relay_domain(&self, name: &str, relay_suffix: &str) -> Option<String> {
        match &self.destination {
            Destination::Domain {
                change_envelope: true,
                ..
            } => None,
            _ => Some(format!("{name}.{relay_suffix}")),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomainConfig {
    mode: Mode,
    #[serde(default = "yes")]
    enabled: bool,
    destination: DestinationEntry,
    #[serde(default)]
    bounce: bool,
    verify: Option<ConfigAddress>,
    #[serde(default)]
    require_gateway: bool,
    accounts: Option<Vec<AccountSource>>,
    #[serde(default)]
    users: UserEntries,
    shadow: Option<bool>,
}

/// `users:` is a mapping in YAML; read it as a sequence of entries so that
/// the order is kept and a duplicate key is seen (the validation reports
/// it with both lines) rather than silently overriding the first.
#[derive(Default)]
struct UserEntries(Vec<(ConfigAddress, UserRule)>);

impl<'de> Deserialize<'de> for UserEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        entries(d, "a mapping of address → rule").map(UserEntries)
    }
}

/// A YAML mapping as its entries in order, duplicates included.
fn entries<'de, D, K, V>(d: D, what: &'static str) -> Result<Vec<(K, V)>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de>,
    V: Deserialize<'de>,
{
    struct Entries<K, V>(&'static str, std::marker::PhantomData<(K, V)>);
    impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> de::Visitor<'de> for Entries<K, V> {
        type Value = Vec<(K, V)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(k) = m.next_key::<K>()? {
                out.push((k, m.next_value::<V>()?));
            }
            Ok(out)
        }
    }
    d.deserialize_map(Entries(what, std::marker::PhantomData))
}

/// `domains:` as written, duplicates included (see [`UserEntries`]);
/// empty when the key is absent or has no value.
#[derive(Default)]
pub(crate) struct DomainEntries(pub Vec<(DomainName, DomainConfig)>);

impl<'de> Deserialize<'de> for DomainEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        entries(d, "a mapping of domain → settings").map(DomainEntries)
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

fn yes() -> bool {
    true
}

impl<'de> Deserialize<'de> for DomainConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |raw: RawDomainConfig| {
            if matches!(&raw.accounts, Some(a) if a.is_empty()) {
                return Err(
                    "`accounts` is empty; give at least one source or remove the key".into(),
                );
            }
            if raw.mode == Mode::Split && raw.accounts.is_none() {
                return Err("mode `split` needs `accounts`: without them nothing is known to be present here, so everything would be redirected (use `mode: route` for that)".into());
            }
            Ok(DomainConfig {
                mode: raw.mode,
                enabled: raw.enabled,
                destination: raw.destination.destination,
                transport: raw.destination.transport,
                bounce: raw.bounce,
                verify: raw.verify.map(|a| a.0),
                require_gateway: raw.require_gateway,
                accounts: raw.accounts,
                users: raw.users.0.into_iter().map(|(k, r)| (k.0, r)).collect(),
                max_size: raw.destination.max_size,
                shadow: raw.shadow,
            })
        })
    }
}

/// A duration such as `90s`, `30m`, `1h`, `2d`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Window(pub Duration);

impl Window {
    /// Ten years: longer than any timeout or breaker window means.
    pub const LONGEST_SECS: u64 = 3650 * 86400;
}

impl FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?}: expected a number with a unit, e.g. 1h"))?;
        let unit_secs = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
        };
        // Checked: release builds wrap on overflow, which would turn a typo
        // into some other window without a word. The bound also keeps the
        // clock arithmetic done with it (`Instant + Duration`, which panics
        // on overflow) safe.
        let secs = n
            .checked_mul(unit_secs)
            .filter(|&secs| secs <= Window::LONGEST_SECS)
            .ok_or_else(|| {
                format!(
                    "{s:?} is too large: at most {}d",
                    Window::LONGEST_SECS / 86400
                )
            })?;
        if secs == 0 {
            return Err(format!("{s:?}: must be longer than zero"));
        }
        Ok(Window(Duration::from_secs(secs)))
    }
}
deserialize_from_str!(Window, "duration");

/// A message size: bytes, or a number with `K`, `M` or `G` (binary
/// multiples, as Exchange Online counts its 35 MB limit: 35840 KB).
/// Shown as written, so log lines match milter.yaml.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct MessageSize {
    pub bytes: u64,
    pub written: String,
}

impl FromStr for MessageSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{t:?}: expected bytes, or a number with K, M or G (35M)"))?;
        let unit_bytes: u64 = match unit.trim() {
            "" => 1,
            "K" | "k" => 1 << 10,
            "M" | "m" => 1 << 20,
            "G" | "g" => 1 << 30,
            _ => return Err(format!("{t:?}: unit must be K, M or G (35M)")),
        };
        // Checked: a wrapped product would silently become another limit.
        let bytes = n
            .checked_mul(unit_bytes)
            .ok_or_else(|| format!("{t:?} is too large"))?;
        if bytes == 0 {
            return Err(format!(
                "{t:?}: must be larger than zero (remove the key for no limit)"
            ));
        }
        Ok(MessageSize {
            bytes,
            written: t.to_owned(),
        })
    }
}
deserialize_from_str!(MessageSize, "message size");

impl fmt::Display for MessageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.written)
    }
}

/// The bounce breaker (docs/design.md §7).
#[derive(Clone, Debug, Eq, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    pub maillog: PathBuf,
    #[serde(default = "default_threshold")]
    pub threshold: u32,
    #[serde(default = "default_window")]
    pub window: Window,
    /// Temporary failures (deferred deliveries) of routed mail within
    /// `window` at which routing for the domain is switched off, as Zoho
    /// stops forwarding after more than 10 (README "Deferrals"). Absent:
    /// deferrals are counted and shown, never a trip.
    #[serde(default)]
    pub deferrals: Option<u32>,
}

fn default_threshold() -> u32 {
    20
}
fn default_window() -> Window {
    Window(Duration::from_secs(3600))
}

/// How a notification reaches the local MTA (`notify.via`).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum NotifyVia {
    /// SMTP to `host:port`: `smtp:127.0.0.1:25`, `smtp:[::1]:25`.
    Smtp { host: String, port: u16 },
    /// The `sendmail` command (`sendmail` or `sendmail:/path`).
    Sendmail(PathBuf),
}

impl Default for NotifyVia {
    fn default() -> Self {
        NotifyVia::Smtp {
            host: "127.0.0.1".into(),
            port: 25,
        }
    }
}

impl fmt::Display for NotifyVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotifyVia::Smtp { host, port } if host.contains(':') => {
                write!(f, "smtp:[{host}]:{port}")
            }
            NotifyVia::Smtp { host, port } => write!(f, "smtp:{host}:{port}"),
            NotifyVia::Sendmail(p) => write!(f, "sendmail:{}", p.display()),
        }
    }
}

/// Where Debian (and most systems) install the `sendmail` command.
pub const SENDMAIL_COMMAND: &str = "/usr/sbin/sendmail";

impl FromStr for NotifyVia {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "sendmail" {
            return Ok(NotifyVia::Sendmail(PathBuf::from(SENDMAIL_COMMAND)));
        }
        if let Some(path) = s.strip_prefix("sendmail:") {
            return if path.starts_with('/') {
                Ok(NotifyVia::Sendmail(PathBuf::from(path)))
            } else {
                Err(format!(
                    "{s:?}: the sendmail command must be an absolute path"
                ))
            };
        }
        let rest = s.strip_prefix("smtp:").unwrap_or(s);
        let (host, port) = match rest.strip_prefix('[') {
            Some(b) => b
                .split_once("]:")
                .ok_or_else(|| format!("{s:?}: expected smtp:[ADDR]:PORT"))?,
            None => rest.rsplit_once(':').ok_or_else(|| {
                format!("{s:?}: expected smtp:HOST:PORT (e.g. smtp:127.0.0.1:25) or sendmail")
            })?,
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{s:?}: bad port {port:?}"))?;
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(format!("{s:?}: bad host {host:?}"));
        }
        Ok(NotifyVia::Smtp {
            host: host.to_owned(),
            port,
        })
    }
}
deserialize_from_str!(NotifyVia, "notify.via");

/// Mail to the administrator when something needs a human (`notify:`,
/// README "Notification by mail").
#[derive(Clone, Debug, Eq, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    pub to: Vec<ConfigAddress>,
    /// Header From and envelope sender; default `dualroute@<instance>`.
    pub from: Option<ConfigAddress>,
    #[serde(default)]
    pub via: NotifyVia,
    /// At most one message per interval; what happens in between is
    /// gathered into the next one.
    #[serde(default = "default_notify_interval")]
    pub interval: Window,
}

fn default_notify_interval() -> Window {
    Window(Duration::from_secs(600))
}

/// The MTA's connections to the milter (`connections:`). Read at start;
/// a change needs a restart.
#[derive(Clone, Debug, Eq, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// Connections served at once; further ones wait in the listen queue
    /// (Postfix gives up after `milter_connect_timeout`, 30 s).
    #[serde(default = "default_max_connections")]
    pub max: std::num::NonZeroUsize,
    /// How long a started packet may take to arrive, and how long a new
    /// connection may take to start negotiating: Postfix's own
    /// `milter_command_timeout` (30 s) on the other side.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: Window,
    /// How long the MTA may send nothing between commands. Postfix keeps the
    /// connection for the whole SMTP session, idle while the client sends
    /// the message (no upper bound but `smtpd_timeout` per read), so this
    /// must exceed the slowest message transfer; 1h is Sendmail's own data
    /// block timeout.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Window,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max: default_max_connections(),
            command_timeout: default_command_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

fn default_max_connections() -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(1000).unwrap_or(std::num::NonZeroUsize::MIN)
}
fn default_command_timeout() -> Window {
    Window(Duration::from_secs(30))
}
fn default_idle_timeout() -> Window {
    Window(Duration::from_secs(3600))
}

/// Where the metrics endpoint listens: `IP:PORT` (`[IPv6]:PORT`), or a
/// port alone for 127.0.0.1. Loopback unless written otherwise: the
/// counters name the managed domains and the traffic they get.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct MetricsListen(pub SocketAddr);

impl FromStr for MetricsListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let addr = match s.parse::<u16>() {
            Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
            Err(_) => s.parse::<SocketAddr>().map_err(|_| {
                format!("{s:?}: expected IP:PORT, [IPv6]:PORT or a port (127.0.0.1 then)")
            })?,
        };
        if addr.port() == 0 {
            return Err(format!("{s:?}: port 0"));
        }
        Ok(MetricsListen(addr))
    }
}
deserialize_from_str!(MetricsListen, "metrics address");

/// The Prometheus/OpenMetrics endpoint (`metrics:`, docs/rollout.md "Metrics").
/// Read at start; a change needs a restart.
#[derive(Clone, Debug, Eq, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "default_metrics_listen")]
    pub listen: MetricsListen,
}

fn default_metrics_listen() -> MetricsListen {
    MetricsListen(SocketAddr::from(([127, 0, 0, 1], 9899)))
}

/// `max_recipients:` default: Postfix's own `smtpd_recipient_limit`
/// (1000), so that with Postfix in front the milter's limit is never the
/// one a sender meets first. Every recipient a message has costs the
/// milter memory until end of message; the limit bounds it.
fn default_max_recipients() -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(1000).unwrap_or(std::num::NonZeroUsize::MIN)
}

/// A DNS server: `IP`, `IP:PORT` or `[IPv6]:PORT`; port 53 when none is given.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Nameserver(pub SocketAddr);

impl FromStr for Nameserver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(ip) = s
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(Nameserver(SocketAddr::new(ip, 53)));
        }
        match s.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => Err(format!("{s:?}: port 0")),
            Ok(a) => Ok(Nameserver(a)),
            Err(_) => Err(format!(
                "{s:?}: expected IP, IP:PORT or [IPv6]:PORT (a name server is given by address)"
            )),
        }
    }
}
deserialize_from_str!(Nameserver, "name server");

/// Which DNS servers `doctor` and the verification probe ask.
/// No `nameservers`: the system's (`/etc/resolv.conf`).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct DnsConfig {
    pub nameservers: Vec<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDnsConfig {
    #[serde(default)]
    nameservers: Vec<Nameserver>,
}

impl<'de> Deserialize<'de> for DnsConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, |raw: RawDnsConfig| {
            Ok(DnsConfig {
                nameservers: raw.nameservers.into_iter().map(|n| n.0).collect(),
            })
        })
    }
}

/// The whole `milter.yaml`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Config {
    pub listen: Socket,
    pub instance: String,
    pub relay_suffix: DomainName,
    /// Each character is a delimiter, as in Postfix's `recipient_delimiter`.
    pub recipient_delimiter: String,
    pub local_part_case: LocalPartCase,
    pub gateways: Vec<Gateway>,
    pub state_dir: PathBuf,
    pub domains: BTreeMap<DomainName, DomainConfig>,
    pub breaker: Option<BreakerConfig>,
    pub notify: Option<NotifyConfig>,
    pub dns: DnsConfig,
    /// A reload that would remove this fraction of a domain's accounts or
    /// more is refused (README "Account sources").
    pub accounts_shrink_limit: ShrinkLimit,
    pub mta: Mta,
    pub connections: ConnectionsConfig,
    /// `shadow:` for every domain that does not set its own.
    pub shadow: bool,
    /// `metrics:`; `None`: no metrics endpoint.
    pub metrics: Option<MetricsConfig>,
    /// Recipients one message may have in the milter (`max_recipients:`).
    pub max_recipients: std::num::NonZeroUsize,
    /// The file this was read from: the checks that need the accounts
    /// (src/policy.rs, "Addresses that must reach a mailbox") run after
    /// reading, and still name the line.
    pub source: Source,
}

/// A configuration file's name and text, kept to locate errors found
/// after reading.
#[derive(Clone, Default, Eq, PartialEq)]
pub struct Source {
    pub file: String,
    pub text: std::sync::Arc<str>,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)
    }
}

impl Config {
    /// Whether the domain runs in shadow mode (docs/rollout.md): its own
    /// `shadow:` if it has one, else the global one.
    pub fn shadow(&self, domain: &DomainConfig) -> bool {
        domain.shadow.unwrap_or(self.shadow)
    }
}

/// The MTA dualroute runs in (`mta:`, default `postfix`). Only `check`
/// reads it: Sendmail cannot restore `@domain` on routed mail as Postfix's
/// `smtp_generic_maps` does (docs/sendmail.md), so a `hosts` destination
/// needs the other server to accept the relay domain.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mta {
    #[default]
    Postfix,
    Sendmail,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default = "default_listen")]
    pub listen: Socket,
    pub instance: Option<String>,
    #[serde(default = "default_relay_suffix")]
    pub relay_suffix: DomainName,
    #[serde(default = "default_delimiter")]
    pub recipient_delimiter: String,
    #[serde(default)]
    pub local_part_case: LocalPartCase,
    #[serde(default)]
    pub gateways: Vec<Gateway>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub domains: DomainEntries,
    pub breaker: Option<BreakerConfig>,
    pub notify: Option<NotifyConfig>,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub mta: Mta,
    #[serde(default)]
    pub accounts_shrink_limit: ShrinkLimit,
    #[serde(default)]
    pub connections: ConnectionsConfig,
    #[serde(default)]
    pub shadow: bool,
    pub metrics: Option<MetricsConfig>,
    #[serde(default = "default_max_recipients")]
    pub max_recipients: std::num::NonZeroUsize,
}

fn default_listen() -> Socket {
    Socket::Inet {
        host: "127.0.0.1".into(),
        port: 8899,
    }
}
fn default_relay_suffix() -> DomainName {
    DomainName("dualroute.invalid".into())
}
fn default_delimiter() -> String {
    "+".into()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/dualroute")
}

/// The host name, for the default `instance`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets() {
        let inet = |h: &str, p| Socket::Inet {
            host: h.into(),
            port: p,
        };
        assert_eq!("inet:127.0.0.1:8899".parse(), Ok(inet("127.0.0.1", 8899)));
        assert_eq!("inet:8899@127.0.0.1".parse(), Ok(inet("127.0.0.1", 8899)));
        assert_eq!("inet6:8899@::1".parse(), Ok(inet("::1", 8899)));
        assert_eq!("inet:[::1]:8899".parse(), Ok(inet("::1", 8899)));
        assert_eq!(
            "unix:/run/x.sock".parse(),
            Ok(Socket::Unix("/run/x.sock".into()))
        );
        assert!("unix:relative".parse::<Socket>().is_err());
        assert!("inet:127.0.0.1".parse::<Socket>().is_err());
        assert!("tcp:1@x".parse::<Socket>().is_err());
        assert!("inet:x:99999".parse::<Socket>().is_err());
    }

    #[test]
    fn hosts() {
        let h: Host = "[192.0.2.30]:2525".parse().unwrap();
        assert_eq!(
            (h.name.as_str(), h.bracketed, h.port),
            ("192.0.2.30", true, Some(2525))
        );
        let h: Host = "MX1.Legacy.example.net".parse().unwrap();
        assert_eq!(
            (h.name.as_str(), h.bracketed, h.port),
            ("mx1.legacy.example.net", false, None)
        );
        assert!("192.0.2.30".parse::<Host>().is_err());
        assert!("[192.0.2.30".parse::<Host>().is_err());
        assert!("mx:0".parse::<Host>().is_err());
    }

    #[test]
    fn gateways() {
        let g: Gateway = "192.0.2.25".parse().unwrap();
        assert!(g.contains("192.0.2.25".parse().unwrap()));
        assert!(g.contains("::ffff:192.0.2.25".parse().unwrap()));
        assert!(!g.contains("192.0.2.26".parse().unwrap()));
        let g: Gateway = "2001:db8::/64".parse().unwrap();
        assert!(g.contains("2001:db8::7".parse().unwrap()));
        assert!("192.0.2.1/24".parse::<Gateway>().is_err());
        assert!("192.0.2.0/33".parse::<Gateway>().is_err());
        assert!("mx.example".parse::<Gateway>().is_err());
    }

    #[test]
    fn nameservers() {
        let ns = |s: &str| s.parse::<Nameserver>().map(|n| n.0.to_string());
        assert_eq!(ns("192.0.2.53"), Ok("192.0.2.53:53".into()));
        assert_eq!(ns("127.0.0.1:5353"), Ok("127.0.0.1:5353".into()));
        assert_eq!(ns("2001:db8::53"), Ok("[2001:db8::53]:53".into()));
        assert_eq!(ns("[2001:db8::53]"), Ok("[2001:db8::53]:53".into()));
        assert_eq!(ns("[2001:db8::53]:5353"), Ok("[2001:db8::53]:5353".into()));
        assert!(ns("ns1.example.net").is_err());
        assert!(ns("127.0.0.1:0").is_err());
        assert!(ns("127.0.0.1:99999").is_err());
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

    #[test]
    fn message_sizes() {
        let b = |s: &str| s.parse::<MessageSize>().map(|m| m.bytes);
        assert_eq!(b("35M"), Ok(35 << 20));
        assert_eq!(b("35840K"), Ok(35 << 20));
        assert_eq!(b("1G"), Ok(1 << 30));
        assert_eq!(b("10485760"), Ok(10_485_760));
        assert_eq!("35M".parse::<MessageSize>().unwrap().to_string(), "35M");
        assert!(b("0").is_err());
        assert!(b("35MB").is_err());
        assert!(b("M").is_err());
        assert!(b("-1M").is_err());
        assert!(b("99999999999999G").is_err());
    }

    #[test]
    fn destination_rules() {
        let parse = |dest: &str| {
            let yaml =
                format!("domains:\n  example.com:\n    mode: route\n    destination: {dest}\n");
            crate::config::parse(&yaml, "m.yaml")
                .map(|c| c.domains.into_values().next().unwrap().transport)
        };
        let t = parse("{ hosts: [mx.legacy.test], tls: secure, tls_match: [MX.Legacy.test, .legacy.test, nexthop] }").unwrap();
        assert_eq!(t.tls, Some(TlsLevel::Secure));
        assert_eq!(
            t.tls_policy().unwrap(),
            "secure match=mx.legacy.test:.legacy.test:nexthop"
        );
        assert_eq!(
            parse("{ domain: x.test, tls: may }")
                .unwrap()
                .tls_policy()
                .unwrap(),
            "may"
        );
        let err = |dest: &str| parse(dest).unwrap_err().to_string();
        let e = err("{ hosts: [mx.legacy.test], tls: encrypt, tls_match: [mx.legacy.test] }");
        assert!(
            e.starts_with(
                "m.yaml:4:18: domains.example.com.destination: `tls_match` needs `tls: verify`"
            ),
            "{e}"
        );
        assert!(
            err("{ hosts: [mx.legacy.test], tls: strict }").contains("unknown variant `strict`")
        );
        assert!(
            err("{ hosts: [mx.legacy.test], tls: verify, tls_match: [\"[192.0.2.1]\"] }")
                .contains("tls_match entry")
        );
        assert!(err("{ hosts: [mx.legacy.test], concurrency: 0 }").contains("at least 1"));
        assert!(
            err("{ hosts: [mx.legacy.test], concurrency: 4, rate_delay: 1s }")
                .contains("one message at a time")
        );
        let t = parse("{ hosts: [mx.legacy.test], concurrency: 1, rate_delay: 2s }").unwrap();
        assert_eq!(
            (t.concurrency, t.rate_delay.map(|w| w.0.as_secs())),
            (Some(1), Some(2))
        );
    }

    #[test]
    fn windows() {
        assert_eq!("1h".parse(), Ok(Window(Duration::from_secs(3600))));
        assert_eq!("90s".parse(), Ok(Window(Duration::from_secs(90))));
        assert!("1w".parse::<Window>().is_err());
        assert!("0m".parse::<Window>().is_err());
        assert_eq!(
            "3650d".parse(),
            Ok(Window(Duration::from_secs(3650 * 86400)))
        );
        assert!("3651d".parse::<Window>().is_err());
        assert!("213503982334602d".parse::<Window>().is_err());
        assert!("h".parse::<Window>().is_err());
    }
}
