//! `dualroute postfix-config`: the Postfix settings a `milter.yaml` needs
//! (docs/design.md §4, §8), each with the reason for it.

use crate::config::{Destination, Mode, Socket};
use crate::policy::Policy;
use std::{fmt::Write as _, io, path::Path};

pub mod apply;

/// The name of the dedicated smtp transport in master.cf.
pub const TRANSPORT: &str = "dualroute";
const TRANSPORT_MAP: &str = "dualroute_transport";
const GENERIC_MAP: &str = "dualroute_generic";
const CATCHALL_MAP: &str = "dualroute_catchall";
/// How the note about the catch-all begins (`--apply` does that step).
pub const CATCHALL_NOTE: &str = "Postfix checks recipients";

/// A `main.cf` parameter with the reason it is needed.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Param {
    pub why: String,
    pub name: String,
    pub value: String,
}

pub use crate::table::Table;

/// The master.cf service of the dedicated smtp transport.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Service {
    /// `dualroute unix - - n - - smtp`
    pub entry: String,
    /// `-o name=value` overrides.
    pub params: Vec<(String, String)>,
}

impl Service {
    /// `postconf -M`'s name for it.
    pub fn name(&self) -> String {
        format!("{TRANSPORT}/unix")
    }

    /// The entry as master.cf holds it, continuation lines indented.
    pub fn render(&self) -> String {
        let mut s = self.entry.clone();
        for (k, v) in &self.params {
            let _ = write!(s, "\n  -o {k}={v}");
        }
        s
    }
}

/// Everything Postfix needs.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct PostfixConfig {
    pub main: Vec<Param>,
    pub service: Option<Service>,
    pub tables: Vec<Table>,
    /// Things the administrator must do by hand, with the reason.
    pub notes: Vec<String>,
}

/// The `smtpd_milters` value for our socket. Debian runs smtpd chrooted in
/// /var/spool/postfix, where Postfix resolves a unix socket path relative
/// to the queue directory (MILTER_README "unix:pathname").
pub fn milter_socket(listen: &Socket, queue_dir: &str) -> String {
    match listen {
        Socket::Unix(p) => match p.strip_prefix(queue_dir) {
            Ok(rel) => format!("unix:/{}", rel.display()),
            Err(_) => format!("unix:{}", p.display()),
        },
        Socket::Inet { host, port } if host.contains(':') => format!("inet:[{host}]:{port}"),
        Socket::Inet { host, port } => format!("inet:{host}:{port}"),
    }
}

/// Builds the configuration; `map_dir` is where the tables will live
/// (normally /etc/postfix).
pub fn generate(policy: &Policy, map_dir: &Path) -> PostfixConfig {
    let c = &policy.config;
    let map = |name: &str| format!("hash:{}", map_dir.join(name).display());
    let mut out = PostfixConfig::default();
    let param = |why: &str, name: &str, value: String| Param {
        why: why.into(),
        name: name.into(),
        value,
    };

    out.main.push(param(
        "hand every SMTP session to dualroute (merge with existing smtpd_milters, comma-separated)",
        "smtpd_milters",
        milter_socket(&c.listen, "/var/spool/postfix"),
    ));
    out.main.push(param(
        "if dualroute is down, answer 451 at MAIL: senders retry, nothing is lost or misrouted",
        "milter_default_action",
        "tempfail".into(),
    ));
    out.main.push(param(
        "protocol 6: add-recipient with ESMTP parameters (ORCPT, NOTIFY) and macro requests",
        "milter_protocol",
        "6".into(),
    ));
    out.main.push(param(
        "must equal the milter's recipient_delimiter, or Postfix and dualroute disagree about who bob+tag@ is",
        "recipient_delimiter",
        c.recipient_delimiter.clone(),
    ));

    let mut transport = Table {
        file: TRANSPORT_MAP.into(),
        why: "send each relay domain to its destination through the dualroute transport".into(),
        entries: Vec::new(),
    };
    let mut generic = Table {
        file: GENERIC_MAP.into(),
        why: "restore the real domain on routed mail as it leaves (RCPT TO; ORCPT already names the original)".into(),
        entries: Vec::new(),
    };
    let mut catchall = Table {
        file: CATCHALL_MAP.into(),
        why: "let Postfix accept addresses it has no mailbox for, so dualroute can route them"
            .into(),
        entries: Vec::new(),
    };
    let mut names: Vec<&String> = policy.domains.keys().collect();
    names.sort();
    for name in names {
        let d = &policy.domains[name];
        if let Some(relay) = d.relay_domain(&c.relay_suffix.0) {
            let nexthop = match &d.config.destination {
                Destination::Hosts(hosts) => hosts
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                Destination::Domain { domain, .. } => domain.0.clone(),
            };
            transport.entries.push((
                format!("{name}: routed mail goes to {nexthop}"),
                relay.clone(),
                format!("{TRANSPORT}:{nexthop}"),
            ));
            generic.entries.push((
                format!("{relay} → {name}"),
                format!("@{relay}"),
                format!("@{name}"),
            ));
        }
        if matches!(d.config.mode, Mode::Split | Mode::Route) {
            catchall.entries.push((
                format!(
                    "{name} is {}: WARNING: if the milter is bypassed (removed from smtpd_milters, or milter_default_action = accept), mail for addresses without a mailbox lands here instead of being routed or refused: watch this mailbox",
                    d.config.mode
                ),
                format!("@{name}"),
                format!("{name}/dualroute-catchall/"),
            ));
        }
    }
    if !transport.entries.is_empty() {
        out.main.push(param(
            "route the relay domains (merge with an existing transport_maps, comma-separated)",
            "transport_maps",
            map(TRANSPORT_MAP),
        ));
        out.service = Some(Service {
            entry: format!("{TRANSPORT} unix  -       -       n       -       -       smtp"),
            params: vec![
                ("smtp_generic_maps".into(), map(GENERIC_MAP)),
                // Routed deliveries stand out in the mail log:
                // postfix/dualroute[PID]: ... to=<...>, relay=...
                ("syslog_name".into(), "postfix/dualroute".into()),
            ],
        });
        out.tables.push(transport);
        out.tables.push(generic);
    }
    if !catchall.entries.is_empty() {
        out.notes.push(format!(
            "{CATCHALL_NOTE} (smtpd_reject_unlisted_recipient) before the milter sees them, so for split and route domains it must accept addresses it has no mailbox for. For virtual mailbox domains add {} to virtual_mailbox_maps after your own table, e.g.\n  postconf -e \"virtual_mailbox_maps = $(postconf -h virtual_mailbox_maps), {}\"\nFor other setups (relay_domains with relay_recipient_maps, mydestination with local_recipient_maps) add the same @domain catch-all key to that table.",
            map(CATCHALL_MAP),
            map(CATCHALL_MAP)
        ));
        out.tables.push(catchall);
    }
    if let Socket::Unix(p) = &c.listen {
        if !p.starts_with(crate::socket::POSTFIX_CHROOT) {
            out.notes.push(format!(
                "WARNING: {} is outside /var/spool/postfix: Debian's smtpd runs chrooted there and cannot reach it; use a socket below /var/spool/postfix (e.g. unix:/var/spool/postfix/dualroute/dualroute.sock)",
                p.display()
            ));
        }
    }
    out
}

impl PostfixConfig {
    /// The main.cf lines, `postconf -e`-ready (one `name = value` per line,
    /// comments above).
    pub fn main_cf(&self) -> String {
        let mut s = String::new();
        for p in &self.main {
            let _ = writeln!(s, "# dualroute: {}\n{} = {}", p.why, p.name, p.value);
        }
        s
    }

    pub fn master_cf(&self) -> String {
        match &self.service {
            Some(service) => format!(
                "# dualroute: smtp client for routed mail; restores the real domain with smtp_generic_maps\n{}\n",
                service.render()
            ),
            None => String::new(),
        }
    }

    /// Everything, as printed by `dualroute postfix-config`.
    pub fn render(&self, map_dir: &Path) -> String {
        let mut s = String::from(
            "# Apply all of this with: dualroute postfix-config --apply (docs/postfix.md)\n# === main.cf ===\n",
        );
        s.push_str(&self.main_cf());
        if self.service.is_some() {
            s.push_str("\n# === master.cf (append) ===\n");
            s.push_str(&self.master_cf());
        }
        for t in &self.tables {
            let _ = write!(
                s,
                "\n# === {} (then: postmap {}) ===\n{}",
                map_dir.join(&t.file).display(),
                map_dir.join(&t.file).display(),
                t.render()
            );
        }
        s.push_str(&crate::table::render_notes(&self.notes));
        s
    }

    /// Writes `main.cf.dualroute`, `master.cf.dualroute` and the tables into
    /// `dir` (tables are not `postmap`ed: that needs Postfix).
    pub fn write(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut files = vec![
            ("main.cf.dualroute".to_owned(), self.main_cf()),
            ("master.cf.dualroute".to_owned(), self.master_cf()),
        ];
        files.extend(self.tables.iter().map(|t| (t.file.clone(), t.render())));
        crate::table::write_files(dir, files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets() {
        let s = |x: &str| x.parse::<Socket>().unwrap();
        assert_eq!(
            milter_socket(
                &s("unix:/var/spool/postfix/dualroute/d.sock"),
                "/var/spool/postfix"
            ),
            "unix:/dualroute/d.sock"
        );
        assert_eq!(
            milter_socket(&s("unix:/run/d.sock"), "/var/spool/postfix"),
            "unix:/run/d.sock"
        );
        assert_eq!(
            milter_socket(&s("inet:8899@127.0.0.1"), "/var/spool/postfix"),
            "inet:127.0.0.1:8899"
        );
        assert_eq!(
            milter_socket(&s("inet6:8899@::1"), "/var/spool/postfix"),
            "inet:[::1]:8899"
        );
    }
}
