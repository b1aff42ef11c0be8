//! `dualroute postfix-config`: the Postfix settings a `milter.yaml` needs
//! (docs/design.md §4, §8), each with the reason for it.

use crate::config::{Destination, DomainConfig, Mode, Socket};
use crate::policy::Policy;
use std::{fmt::Write as _, io, path::Path};

pub mod apply;
pub mod master_cf;
pub mod queue;
pub mod recipients;

/// The name of the dedicated smtp transport in master.cf.
pub const TRANSPORT: &str = "dualroute";
pub(crate) const TRANSPORT_MAP: &str = "dualroute_transport";
const GENERIC_MAP: &str = "dualroute_generic";
pub(crate) const CATCHALL_MAP: &str = "dualroute_catchall";
const TLS_POLICY_MAP: &str = "dualroute_tls_policy";
/// The master.cf service that keeps mail the milter did not route waiting
/// in the queue (docs/design.md §9, docs/postfix.md "Mail waiting in the
/// queue"). A pipe(8) whose command exits 75 (EX_TEMPFAIL): Postfix defers
/// the recipient and retries. Not error(8)/retry(8): smtpd resolves each
/// RCPT and refuses an address whose transport is `error` or `retry`
/// (checked on 3.7.11: `450 4.4.4 ... Recipient address rejected`) before
/// the milter sees it, so split routing would stop; and error(8) refuses
/// to run under any other service name.
pub const WAIT_TRANSPORT: &str = "dualroute-wait";
/// What the wait transport says; `postqueue -j` shows it as the
/// recipient's `delay_reason` (after pipe(8)'s "temporary failure.
/// Command output: "), which is how `dualroute status` counts what waits.
pub const WAIT_REASON: &str =
    "dualroute: not routed by the milter, waiting in the queue (docs/postfix.md)";
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
    /// `dualroute unix - - n - - smtp`; its first word names the service.
    pub entry: String,
    /// `-o name=value` overrides.
    pub params: Vec<(String, String)>,
}

impl Service {
    /// `postconf -M`'s name for it.
    pub fn name(&self) -> String {
        let name = self.entry.split_whitespace().next().unwrap_or(TRANSPORT);
        format!("{name}/unix")
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
    /// The wait transport's master.cf service: `--apply` adds it where the
    /// layout allows (src/postfix/apply/wait.rs `with_wait`).
    pub wait: Option<Service>,
}

/// The master.cf service behind [`WAIT_TRANSPORT`]. `postconf -M` prints
/// the command's `{...}` group without inner padding: written the same
/// way, a second `--apply` finds it unchanged. The command reads the
/// message first, so pipe(8) never sees a broken pipe, whatever its size.
pub fn wait_service() -> Service {
    Service {
        entry: format!(
            "{WAIT_TRANSPORT} unix  -       n       n       -       -       pipe user=nobody argv=/bin/sh -c {{cat >/dev/null; echo \"{WAIT_REASON}\"; exit 75}}"
        ),
        params: Vec::new(),
    }
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
        "hand locally submitted mail to dualroute too: cron, `mail`, web applications and monitoring submit through sendmail/pickup, and cleanup runs non_smtpd_milters, never smtpd_milters (merge with existing non_smtpd_milters, comma-separated)",
        "non_smtpd_milters",
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
    let mut tls_policy = Table {
        file: TLS_POLICY_MAP.into(),
        why: "the TLS the destinations demand, for routed mail only (smtp_tls_policy_maps of the dualroute transport)".into(),
        entries: Vec::new(),
    };
    let mut throttle = Throttle::default();
    let mut names: Vec<&String> = policy.domains.keys().collect();
    names.sort();
    for name in names {
        let d = &policy.domains[name];
        tls_entries(&mut tls_policy, &mut out.notes, name, &d.config);
        throttle.add(name, &d.config);
        if let Destination::Domain {
            domain,
            change_envelope: true,
        } = &d.config.destination
        {
            // Routed mail is addressed to the destination domain itself and
            // would leave through the default smtp transport, which knows
            // nothing of the destination's TLS or pace: send that domain
            // through ours (same next hop, its MX).
            if d.config.transport.tls.is_some()
                || crate::provider::concurrency(&d.config).is_some()
                || d.config.transport.rate_delay.is_some()
            {
                transport.entries.push((
                    format!("{name}: routed mail is addressed to {domain}; its TLS and pace are in the dualroute transport"),
                    domain.0.clone(),
                    format!("{TRANSPORT}:{domain}"),
                ));
            }
        }
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
                    "{name} is {}: lets smtpd accept addresses without a mailbox so the milter can route them; with the {WAIT_TRANSPORT} transport (--apply, see the note below) mail the milter did not route waits in the queue instead of being filed here",
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
        let mut params = vec![
            ("smtp_generic_maps".into(), map(GENERIC_MAP)),
            // Routed deliveries stand out in the mail log:
            // postfix/dualroute[PID]: ... to=<...>, relay=...
            ("syslog_name".into(), "postfix/dualroute".into()),
        ];
        if !tls_policy.entries.is_empty() {
            // On this transport only: the admin's own smtp_tls_policy_maps
            // (if any) keeps governing all other mail.
            params.push(("smtp_tls_policy_maps".into(), map(TLS_POLICY_MAP)));
        }
        out.service = Some(Service {
            entry: format!("{TRANSPORT} unix  -       -       n       -       -       smtp"),
            params,
        });
        out.tables.push(transport);
        out.tables.push(generic);
        if !tls_policy.entries.is_empty() {
            out.tables.push(tls_policy);
        }
        // The queue manager reads these from main.cf, per transport
        // (postconf(5) transport_destination_concurrency_limit,
        // transport_destination_rate_delay): a `-o` in master.cf would not
        // reach it.
        out.main.extend(throttle.params());
        out.notes.extend(throttle.notes);
    }
    if !catchall.entries.is_empty() {
        let domains: Vec<String> = catchall
            .entries
            .iter()
            .map(|(_, k, _)| k.trim_start_matches('@').to_owned())
            .collect();
        out.notes.push(format!(
            "{CATCHALL_NOTE} (smtpd_reject_unlisted_recipient) before the milter sees them, so for split and route domains it must accept addresses it has no mailbox for. For virtual mailbox domains add {} to virtual_mailbox_maps after your own table, e.g.\n  postconf -e \"virtual_mailbox_maps = $(postconf -h virtual_mailbox_maps), {}\"\n\
Then make what the milter did not route (milter bypassed, down with milter_default_action = accept, a service without it) WAIT IN THE QUEUE instead of landing in the catch-all, while real mailboxes keep your delivery transport ({}):\n  \
- master.cf: {}\n  \
- {} lines in {}:\n{}\n  \
- transport_maps = <yours>, pipemap:{{<each table of your own virtual_mailbox_maps>, static:{{<your virtual_transport>}}}}, {}\n    \
e.g. postconf -e \"transport_maps = $(postconf -h transport_maps), pipemap:{{hash:/etc/postfix/vmailbox, static:{{$(postconf -xh virtual_transport)}}}}, {}\"\n\
(transport(5) looks up the full address, then the address without its extension, then the domain: a mailbox matches the pipemap, any other address of the domain matches {WAIT_TRANSPORT}). `--apply` does all of this, and refuses the wait wiring where it would change where your own mail goes (see docs/postfix.md). mydestination (local) and relay_domains layouts: add the same @domain catch-all key to local_recipient_maps/relay_recipient_maps; the wait wiring cannot be expressed there (docs/postfix.md).",
            map(CATCHALL_MAP),
            map(CATCHALL_MAP),
            domains.join(", "),
            wait_service().entry,
            domains.len(),
            map(TRANSPORT_MAP),
            domains
                .iter()
                .map(|d| format!("    {d}  {WAIT_TRANSPORT}:"))
                .collect::<Vec<_>>()
                .join("\n"),
            map(TRANSPORT_MAP),
            map(TRANSPORT_MAP),
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

/// For the printed form: the master.cf services of the Postfix in
/// `postfix_dir` whose own `-o smtpd_milters=` / `-o non_smtpd_milters=`
/// leaves dualroute out, so mail through them bypasses it (docs/design.md
/// §9). Nothing when there is no master.cf there (another host).
pub fn override_notes(postfix_dir: &Path, pf: &PostfixConfig) -> Vec<String> {
    let Ok(master_cf) = std::fs::read_to_string(postfix_dir.join("master.cf")) else {
        return Vec::new();
    };
    let Some(socket) = pf.main.iter().find(|p| p.name == "smtpd_milters") else {
        return Vec::new();
    };
    let (found, mut notes) = master_cf::milter_overrides(&master_cf);
    for f in found {
        let entries = apply::list_entries(&f.value);
        if entries.contains(&socket.value) {
            continue;
        }
        let mut merged = entries.clone();
        merged.push(socket.value.clone());
        notes.push(format!(
            "WARNING: master.cf {} has its own -o {}={}: mail through it bypasses dualroute. `--apply` makes it -o {}={} (keeping the milters listed there; --revert restores it)",
            f.service,
            f.param,
            f.value,
            f.param,
            merged.join(",")
        ));
    }
    notes
}

/// The `smtp_tls_policy_maps` entries of one domain's destination: one per
/// next hop, keyed as the transport names it (TLS_README "TLS policy
/// table": the next-hop destination, `[host]:port` included).
fn tls_entries(table: &mut Table, notes: &mut Vec<String>, name: &str, d: &DomainConfig) {
    let (Some(level), Some(value)) = (d.transport.tls, d.transport.tls_policy()) else {
        return;
    };
    for hop in d.destination.hosts() {
        let key = hop.to_string();
        match table.entries.iter().find(|(_, k, _)| *k == key) {
            Some((_, _, v)) if *v != value => notes.push(format!(
                "WARNING: {key} is the destination of several domains with different TLS settings ({v} and {value}, from {name}); the table keeps the first: give them the same `tls`"
            )),
            Some(_) => {}
            None => table.entries.push((format!("{name}: tls {level}"), key, value.clone())),
        }
    }
    if level.verifies() {
        notes.push(format!(
            "{name}: tls {level} checks the destination's certificate against the CAs Postfix trusts: smtp_tls_CApath or smtp_tls_CAfile must be set (Debian's main.cf sets smtp_tls_CApath=/etc/ssl/certs, from the ca-certificates package); without them routed mail stays deferred (\"certificate verification failed\"). `dualroute verify {name}` shows what the destination presents."
        ));
    }
}

/// The pace of the one dualroute transport: the strictest any domain asks
/// for, since all routed mail shares it.
#[derive(Default)]
struct Throttle {
    concurrency: Option<(u32, String)>,
    rate_delay: Option<(u64, String)>,
    notes: Vec<String>,
}

impl Throttle {
    fn add(&mut self, name: &str, d: &DomainConfig) {
        if let Some((n, why)) = crate::provider::concurrency(d) {
            match &self.concurrency {
                Some((m, _)) if *m == n => {}
                Some((m, other)) => {
                    self.notes.push(format!("the dualroute transport is shared: {name} asks for concurrency {n}, {other} for {m}; all get {}", n.min(*m)));
                    if n < *m {
                        self.concurrency = Some((n, format!("{name} ({why})")));
                    }
                }
                None => self.concurrency = Some((n, format!("{name} ({why})"))),
            }
        }
        if let Some(w) = d.transport.rate_delay {
            let secs = w.0.as_secs();
            match &self.rate_delay {
                Some((m, _)) if *m >= secs => {}
                _ => self.rate_delay = Some((secs, name.to_owned())),
            }
        }
    }

    fn params(&self) -> Vec<Param> {
        let mut out = Vec::new();
        if let Some((n, who)) = &self.concurrency {
            out.push(Param {
                why: format!(
                    "at most {n} deliveries at once to each destination host of routed mail: {who}"
                ),
                name: format!("{TRANSPORT}_destination_concurrency_limit"),
                value: n.to_string(),
            });
        }
        if let Some((secs, who)) = &self.rate_delay {
            out.push(Param {
                why: format!("pause between deliveries to each destination host of routed mail, one at a time: {who}"),
                name: format!("{TRANSPORT}_destination_rate_delay"),
                value: format!("{secs}s"),
            });
        }
        out
    }
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

    fn generated(domains: &str) -> PostfixConfig {
        let yaml = format!("state_dir: /nonexistent\ndomains:\n{domains}");
        let config = crate::config::parse(&yaml, "t.yaml").unwrap();
        let policy = Policy::load(config).unwrap();
        generate(&policy, Path::new("/m"))
    }

    fn main_value<'a>(pf: &'a PostfixConfig, name: &str) -> Option<&'a str> {
        pf.main
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value.as_str())
    }

    #[test]
    fn tls_policy_on_the_transport_only() {
        let pf = generated(
            "  example.com:\n    mode: route\n    destination: { hosts: [\"[192.0.2.30]:2525\", mx.legacy.test], tls: secure, tls_match: [mx.legacy.test, .legacy.test] }\n  example.org:\n    mode: route\n    destination: { domain: other.test, tls: encrypt }\n",
        );
        let table = pf
            .tables
            .iter()
            .find(|t| t.file == TLS_POLICY_MAP)
            .expect("a TLS policy table");
        let rows: Vec<(&str, &str)> = table
            .entries
            .iter()
            .map(|(_, k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "[192.0.2.30]:2525",
                    "secure match=mx.legacy.test:.legacy.test"
                ),
                ("mx.legacy.test", "secure match=mx.legacy.test:.legacy.test"),
                ("other.test", "encrypt"),
            ]
        );
        let service = pf.service.as_ref().expect("service");
        assert!(service.params.contains(&(
            "smtp_tls_policy_maps".into(),
            "hash:/m/dualroute_tls_policy".into()
        )));
        // Never in main.cf: that would change the TLS of all other mail.
        assert_eq!(main_value(&pf, "smtp_tls_policy_maps"), None);
        assert!(pf.notes.iter().any(|n| n.contains("smtp_tls_CApath")));
    }

    #[test]
    fn no_tls_keys_no_table() {
        let pf = generated(
            "  example.com:\n    mode: route\n    destination: { hosts: [mx.legacy.test] }\n",
        );
        assert!(pf.tables.iter().all(|t| t.file != TLS_POLICY_MAP));
        let service = pf.service.as_ref().expect("service");
        assert!(service
            .params
            .iter()
            .all(|(k, _)| k != "smtp_tls_policy_maps"));
        assert_eq!(
            main_value(&pf, "dualroute_destination_concurrency_limit"),
            None
        );
        assert_eq!(main_value(&pf, "dualroute_destination_rate_delay"), None);
    }

    #[test]
    fn throttling_in_main_cf_strictest_wins() {
        let pf = generated(
            "  example.com:\n    mode: route\n    destination: { hosts: [mx.legacy.test], concurrency: 8 }\n  example.net:\n    mode: route\n    destination: { hosts: [mx.other.test], concurrency: 3 }\n  example.org:\n    mode: route\n    destination: { hosts: [mx.third.test], rate_delay: 2s }\n",
        );
        assert_eq!(
            main_value(&pf, "dualroute_destination_concurrency_limit"),
            Some("3")
        );
        assert_eq!(
            main_value(&pf, "dualroute_destination_rate_delay"),
            Some("2s")
        );
        assert!(
            pf.notes.iter().any(|n| n.contains("shared")),
            "{:?}",
            pf.notes
        );
    }

    #[test]
    fn provider_defaults_and_change_envelope_through_the_transport() {
        let pf = generated(
            "  example.com:\n    mode: route\n    destination: { domain: example.com.test-google-a.com, change_envelope: true }\n",
        );
        assert_eq!(
            main_value(&pf, "dualroute_destination_concurrency_limit"),
            Some(crate::provider::DEFAULT_CONCURRENCY.to_string().as_str())
        );
        let transport = pf
            .tables
            .iter()
            .find(|t| t.file == TRANSPORT_MAP)
            .expect("transport table");
        assert_eq!(
            (
                transport.entries[0].1.as_str(),
                transport.entries[0].2.as_str()
            ),
            (
                "example.com.test-google-a.com",
                "dualroute:example.com.test-google-a.com"
            )
        );
        // An explicit rate_delay replaces the default concurrency.
        let pf = generated(
            "  example.com:\n    mode: route\n    destination: { hosts: [aspmx.l.google.com], rate_delay: 1s }\n",
        );
        assert_eq!(
            main_value(&pf, "dualroute_destination_concurrency_limit"),
            None
        );
        assert_eq!(
            main_value(&pf, "dualroute_destination_rate_delay"),
            Some("1s")
        );
        // change_envelope to a domain that is no provider, without keys: no transport.
        let pf = generated(
            "  example.com:\n    mode: route\n    destination: { domain: legacy.test, change_envelope: true }\n",
        );
        assert!(pf.service.is_none());
    }

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
