//! `dualroute sendmail-config`: the Sendmail settings a `milter.yaml` needs
//! (docs/sendmail.md), each with the reason for it: the `sendmail.mc`
//! lines (milter, macros, mailers for destination ports) and the
//! `mailertable` entries that send each relay domain to its destination.
//!
//! Sendmail has no recipient-side counterpart of Postfix's
//! `smtp_generic_maps` (its genericstable rewrites senders only), so mail
//! routed through a relay domain leaves with `local@<domain>.<relay_suffix>`
//! in RCPT TO; the original address travels in ORCPT. The notes say so for
//! each such domain.

use crate::config::{Destination, Host, Mode, Socket};
use crate::policy::Policy;
use crate::table::Table;
use std::{fmt::Write as _, io, path::Path};

/// The milter's name in `INPUT_MAIL_FILTER` (and in Sendmail's log lines,
/// `milter=dualroute`).
pub const FILTER: &str = "dualroute";
const MC_FILE: &str = "sendmail.mc.dualroute";
const MAILERTABLE: &str = "mailertable.dualroute";

/// A line of `sendmail.mc` with the reason it is needed.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct McLine {
    pub why: String,
    pub line: String,
}

/// Everything Sendmail needs.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct SendmailConfig {
    /// Lines for `sendmail.mc`, before its `MAILER()` lines.
    pub mc: Vec<McLine>,
    /// Mailer definitions (`M` lines of sendmail.cf) for destinations on a
    /// port other than 25.
    pub mailers: Vec<McLine>,
    /// `mailertable` (entries to merge into /etc/mail/mailertable).
    pub tables: Vec<Table>,
    /// Things the administrator must do by hand, with the reason.
    pub notes: Vec<String>,
}

/// The socket in libmilter's syntax, which `INPUT_MAIL_FILTER`'s `S=`
/// takes: `inet:PORT@HOST`, `inet6:PORT@HOST`, `unix:/path` (Sendmail's
/// cf/README, "Mail Filter (Milter) Definitions").
pub fn milter_socket(listen: &Socket) -> String {
    match listen {
        Socket::Unix(p) => format!("unix:{}", p.display()),
        Socket::Inet { host, port } if host.contains(':') => format!("inet6:{port}@{host}"),
        Socket::Inet { host, port } => format!("inet:{port}@{host}"),
    }
}

/// The name of the mailer that connects to `port`: Sendmail's mailertable
/// names a host but no port, so each port gets an `esmtp`-like mailer with
/// `A=TCP $h PORT`.
pub fn mailer_name(port: Option<u16>) -> String {
    match port {
        None | Some(25) => "esmtp".into(),
        Some(p) => format!("{FILTER}{p}"),
    }
}

/// The sendmail.cf definition of mailer `name`: Sendmail's `esmtp` mailer
/// as Debian's cf/mailer/smtp.m4 defines it (flags, rulesets, line
/// limit), connecting to `port`.
pub fn mailer_definition(name: &str, port: u16) -> String {
    format!(
        "M{name}, P=[IPC], F=mDFMuXa, S=EnvFromSMTP/HdrFromSMTP, R=EnvToSMTP, E=\\r\\n, L=990,\n\tT=DNS/RFC822/SMTP,\n\tA=TCP $h {port}"
    )
}

/// A mailertable host: `[literal]` or a name (Sendmail looks up its MX
/// unless it is bracketed, as Postfix does); IPv6 literals take Sendmail's
/// `IPv6:` tag.
fn mailertable_host(h: &Host) -> String {
    match (h.bracketed, h.name.contains(':')) {
        (true, true) => format!("[IPv6:{}]", h.name),
        (true, false) => format!("[{}]", h.name),
        (false, _) => h.name.clone(),
    }
}

/// The mailertable value (`mailer:host:host…`) for a destination, or a note
/// when its hosts use different ports (one mailertable entry has one mailer,
/// and so one port): then only the hosts on the first host's port are used.
fn mailertable_value(hosts: &[Host]) -> (String, Option<u16>, Option<String>) {
    let port = hosts.first().and_then(|h| h.port);
    let (same, other): (Vec<&Host>, Vec<&Host>) = hosts
        .iter()
        .partition(|h| h.port.unwrap_or(25) == port.unwrap_or(25));
    let list: Vec<String> = same.iter().map(|h| mailertable_host(h)).collect();
    let note = (!other.is_empty()).then(|| {
        let left: Vec<String> = other.iter().map(ToString::to_string).collect();
        format!(
            "a Sendmail mailertable entry reaches one port; {} left out (give all hosts the same port)",
            left.join(", ")
        )
    });
    (
        format!("{}:{}", mailer_name(port), list.join(":")),
        port,
        note,
    )
}

/// Builds the configuration.
pub fn generate(policy: &Policy) -> SendmailConfig {
    let c = &policy.config;
    let mut out = SendmailConfig::default();
    let mc = |why: &str, line: String| McLine {
        why: why.into(),
        line,
    };

    out.mc.push(mc(
        "hand every SMTP session to dualroute; F=T: when dualroute is down or times out, answer 451 4.3.2 (senders retry, nothing is lost or misrouted); T=C:connect;S:send;R:read;E:end of message — E is generous because dualroute answers at end of message only after it has queued every recipient change",
        format!(
            "INPUT_MAIL_FILTER(`{FILTER}', `S={}, F=T, T=C:10s;S:30s;R:30s;E:5m')dnl",
            milter_socket(&c.listen)
        ),
    ));
    out.mc.push(mc(
        "macros at MAIL: {auth_authen} decides require_gateway (an authenticated sender counts as a gateway); i is the queue id for dualroute's log (the rest is Sendmail's default list, kept for other milters)",
        "define(`confMILTER_MACROS_ENVFROM', ``i, {auth_type}, {auth_authen}, {auth_ssf}, {auth_author}, {mail_mailer}, {mail_host}, {mail_addr}'')dnl".into(),
    ));
    out.mc.push(mc(
        "macros at RCPT: Sendmail's parse of the recipient (mailer, host, address), as Sendmail's default list",
        "define(`confMILTER_MACROS_ENVRCPT', ``{rcpt_mailer}, {rcpt_host}, {rcpt_addr}'')dnl".into(),
    ));
    out.mc.push(mc(
        "macros at end of message: i, so the log line of each message names its queue id (Sendmail's default list has {msg_id} only)",
        "define(`confMILTER_MACROS_EOM', ``{msg_id}, i'')dnl".into(),
    ));

    let mut table = Table {
        file: MAILERTABLE.into(),
        why: "send each relay domain to its destination (merge into /etc/mail/mailertable; no access or relay-domains entry is needed: recipients a milter adds skip check_rcpt)".into(),
        entries: Vec::new(),
    };
    let mut ports: Vec<u16> = Vec::new();
    let mut names: Vec<&String> = policy.domains.keys().collect();
    names.sort();
    for name in names {
        let d = &policy.domains[name];
        out.notes.extend(destination_rules(name, &d.config));
        let Some(relay) = d.relay_domain(&c.relay_suffix.0) else {
            continue;
        };
        let (value, port, note) = mailertable_value(&d.config.destination.hosts());
        let shown: Vec<String> = d
            .config
            .destination
            .hosts()
            .iter()
            .map(ToString::to_string)
            .collect();
        table.entries.push((
            format!("{name}: routed mail goes to {}", shown.join(", ")),
            relay.clone(),
            value,
        ));
        if let Some(n) = note {
            out.notes.push(format!("{name}: {n}"));
        }
        if let Some(p) = port.filter(|&p| p != 25) {
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let alternative = match &d.config.destination {
            Destination::Domain { domain, .. } => format!(
                "set `change_envelope: true` on its destination (routed mail then goes to local@{domain} by {domain}'s MX)"
            ),
            Destination::Hosts(_) => {
                "give the destination as a `domain` with `change_envelope: true`".into()
            }
        };
        out.notes.push(format!(
            "{name}: Sendmail cannot restore @{name} on routed mail as Postfix's smtp_generic_maps does (its genericstable rewrites senders only): the destination receives RCPT TO:<local@{relay}> (ORCPT names local@{name}). Either the destination accepts {relay} as a domain of its own, or {alternative}."
        ));
    }
    for p in ports {
        out.mailers.push(mc(
            &format!("a mailer for destinations on port {p}: Sendmail's esmtp mailer with A=TCP $h {p} (a mailertable entry names a host, not a port)"),
            mailer_definition(&mailer_name(Some(p)), p),
        ));
    }
    if !table.entries.is_empty() {
        out.mc.push(mc(
            "look up each recipient domain in /etc/mail/mailertable (unless sendmail.mc already has FEATURE(`mailertable'))",
            "ifdef(`_MAILER_TABLE_', `dnl', `FEATURE(`mailertable')dnl')".into(),
        ));
        out.tables.push(table);
    }
    let split_or_route: Vec<&String> = {
        let mut v: Vec<&String> = policy
            .domains
            .iter()
            .filter(|(_, d)| matches!(d.config.mode, Mode::Split | Mode::Route))
            .map(|(n, _)| n)
            .collect();
        v.sort();
        v
    };
    if !split_or_route.is_empty() {
        let list: Vec<&str> = split_or_route.iter().map(|s| s.as_str()).collect();
        out.notes.push(format!(
            "Sendmail refuses unknown local users at RCPT (550 5.1.1 User unknown) before the milter sees them, so for split and route domains ({}) it must accept addresses it has no mailbox for: with the domain in local-host-names, a virtusertable catch-all (`@example.com  catchall-user`); with the domain relayed to a mail store, relay-domains or `To:example.com RELAY` in access. WARNING: if the milter is bypassed (INPUT_MAIL_FILTER removed, or F=T dropped), that catch-all receives mail meant for the other server: watch it.",
            list.join(", ")
        ));
    }
    if c.recipient_delimiter != "+" {
        // Sendmail's cf rulesets (cf/m4/proto.m4: local mailer, virtusertable
        // `user+*@domain`) hardcode `+` as the detail delimiter: Postfix's
        // recipient_delimiter has no Sendmail counterpart to set.
        out.notes.push(format!(
            "recipient_delimiter is {:?}, but Sendmail's +detail handling uses \"+\" only: Sendmail would deliver bob+tag@ to bob while dualroute treats bob+tag@ as another address; set recipient_delimiter: \"+\"",
            c.recipient_delimiter
        ));
    }
    if let Socket::Unix(p) = &c.listen {
        out.notes.push(format!(
            "{} must be reachable by Sendmail's SMTP server processes (they run as root until delivery); keep its directory writable by dualroute only",
            p.display()
        ));
    }
    out
}

/// What Sendmail can do of the destination's `tls`, `concurrency` and
/// `rate_delay` (issue 13): its TLS policy lives in the access map, keyed
/// by the server's host name (`TLS_Srv:`, cf/README "STARTTLS"), which
/// dualroute does not write; it has no per-destination concurrency or
/// rate limit at all.
fn destination_rules(name: &str, d: &crate::config::DomainConfig) -> Vec<String> {
    use crate::config::TlsLevel;
    let mut notes = Vec::new();
    if let Some(level) = d.transport.tls {
        let hosts: Vec<String> = d
            .destination
            .hosts()
            .iter()
            .map(|h| h.name.clone())
            .collect();
        let rhs = match level {
            TlsLevel::None => Some("Try_TLS:{host} NO"),
            TlsLevel::May => None,
            TlsLevel::Encrypt => Some("TLS_Srv:{host} ENCR:128"),
            TlsLevel::Verify | TlsLevel::Secure => Some("TLS_Srv:{host} VERIFY"),
        };
        if let Some(rhs) = rhs {
            let lines: Vec<String> = hosts
                .iter()
                .map(|h| format!("  {}", rhs.replace("{host}", h)))
                .collect();
            let names = if level.verifies() {
                " VERIFY requires a certificate that verifies against confCACERT/confCACERT_PATH; it does not match the certificate's names against `tls_match` as Postfix does (for a name requirement on ${cn_subject}, see \"STARTTLS\" in the cf/README of your Sendmail)."
            } else {
                ""
            };
            notes.push(format!(
                "{name}: tls {level}: Sendmail takes its TLS policy from the access map (FEATURE(`access_db'), then makemap): add, for each host Sendmail connects to (an MX of a domain destination: its MX host names):\n{}\n{names}",
                lines.join("\n")
            ));
        }
    }
    if crate::provider::concurrency(d).is_some() || d.transport.rate_delay.is_some() {
        notes.push(format!(
            "{name}: Sendmail has no per-destination concurrency or rate limit (only limits for the whole queue, such as confMAX_QUEUE_CHILDREN): `concurrency` and `rate_delay` apply to Postfix only"
        ));
    }
    notes
}

impl SendmailConfig {
    /// The `sendmail.mc` fragment: the lines, each with its reason as a
    /// `dnl` comment, and the mailer definitions, which go into the mailer
    /// section of sendmail.cf (m4 diversion 7, as `MAILER()` does).
    pub fn mc(&self) -> String {
        let mut s = String::from(
            "dnl dualroute: include this file in sendmail.mc before its MAILER() lines, e.g.\ndnl   include(`/etc/mail/dualroute/sendmail.mc.dualroute')dnl\n",
        );
        for l in &self.mc {
            let _ = writeln!(s, "dnl # dualroute: {}\n{}", l.why, l.line);
        }
        if !self.mailers.is_empty() {
            s.push_str("PUSHDIVERT(7)dnl\n");
            for m in &self.mailers {
                let _ = writeln!(s, "dnl # dualroute: {}\n{}", m.why, m.line);
            }
            s.push_str("POPDIVERT`'dnl\n");
        }
        s
    }

    /// Everything, as printed by `dualroute sendmail-config`.
    pub fn render(&self) -> String {
        let mut s = String::from("dnl === sendmail.mc ===\n");
        s.push_str(&self.mc());
        for t in &self.tables {
            let _ = write!(
                s,
                "\n# === /etc/mail/mailertable (merge, then: make -C /etc/mail) ===\n{}",
                t.render()
            );
        }
        s.push_str("\n# Then rebuild sendmail.cf and the maps and restart: make -C /etc/mail && systemctl restart sendmail\n");
        s.push_str(&crate::table::render_notes(&self.notes));
        s
    }

    /// Writes `sendmail.mc.dualroute` and the tables into `dir` (the
    /// tables are not `makemap`ed: they are to be merged first).
    pub fn write(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut files = vec![(MC_FILE.to_owned(), self.mc())];
        files.extend(self.tables.iter().map(|t| (t.file.clone(), t.render())));
        crate::table::write_files(dir, files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_rules_are_notes_for_the_access_map() {
        let yaml = "state_dir: /nonexistent\nmta: sendmail\ndomains:\n  example.com:\n    mode: route\n    destination: { hosts: [mx.legacy.test], tls: secure, tls_match: [mx.legacy.test], concurrency: 2 }\n";
        let policy = Policy::load(crate::config::parse(yaml, "t.yaml").unwrap()).unwrap();
        let notes = generate(&policy).notes.join("\n");
        assert!(notes.contains("  TLS_Srv:mx.legacy.test VERIFY"), "{notes}");
        assert!(
            notes.contains("does not match the certificate's names"),
            "{notes}"
        );
        assert!(
            notes.contains("`concurrency` and `rate_delay` apply to Postfix only"),
            "{notes}"
        );
    }

    #[test]
    fn sockets() {
        let s = |x: &str| x.parse::<Socket>().unwrap();
        assert_eq!(
            milter_socket(&s("inet:127.0.0.1:8899")),
            "inet:8899@127.0.0.1"
        );
        assert_eq!(milter_socket(&s("inet6:8899@::1")), "inet6:8899@::1");
        assert_eq!(milter_socket(&s("unix:/run/d.sock")), "unix:/run/d.sock");
    }

    #[test]
    fn mailertable_values() {
        let h = |x: &str| x.parse::<Host>().unwrap();
        assert_eq!(
            mailertable_value(&[h("mx1.legacy.example.net")]),
            ("esmtp:mx1.legacy.example.net".into(), None, None)
        );
        assert_eq!(
            mailertable_value(&[h("[192.0.2.30]:2525"), h("[192.0.2.31]:2525")]),
            (
                "dualroute2525:[192.0.2.30]:[192.0.2.31]".into(),
                Some(2525),
                None
            )
        );
        assert_eq!(
            mailertable_value(&[h("[2001:db8::1]")]).0,
            "esmtp:[IPv6:2001:db8::1]"
        );
        let (value, _, note) = mailertable_value(&[h("[192.0.2.30]:2525"), h("mx.example")]);
        assert_eq!(value, "dualroute2525:[192.0.2.30]");
        assert!(note.is_some_and(|n| n.contains("mx.example left out")));
    }

    fn generated(yaml: &str) -> SendmailConfig {
        let config = crate::config::parse(yaml, "milter.yaml").unwrap();
        generate(&Policy::load(config).unwrap())
    }

    #[test]
    fn one_mailertable_entry_per_relay_domain_and_one_mailer_per_port() {
        let sm = generated(
            r#"
listen: unix:/run/dualroute/dualroute.sock
state_dir: /nonexistent
domains:
  a.example:
    mode: route
    destination: { hosts: ["[192.0.2.30]:2525", "[192.0.2.31]:2525"] }
  b.example:
    mode: route
    destination: { hosts: ["[192.0.2.40]:2525"] }
  c.example:
    mode: route
    destination: { domain: legacy.example.net }
  d.example:
    mode: route
    destination: { domain: d.example.test-google-a.com, change_envelope: true }
"#,
        );
        let entries: Vec<(&str, &str)> = sm.tables[0]
            .entries
            .iter()
            .map(|(_, k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            entries,
            vec![
                (
                    "a.example.dualroute.invalid",
                    "dualroute2525:[192.0.2.30]:[192.0.2.31]"
                ),
                ("b.example.dualroute.invalid", "dualroute2525:[192.0.2.40]"),
                ("c.example.dualroute.invalid", "esmtp:legacy.example.net"),
            ]
        );
        assert_eq!(sm.mailers.len(), 1);
        assert!(sm.mailers[0].line.ends_with("A=TCP $h 2525"));
        let mc = sm.mc();
        assert!(mc.contains(
            "INPUT_MAIL_FILTER(`dualroute', `S=unix:/run/dualroute/dualroute.sock, F=T,"
        ));
        assert!(mc
            .contains("PUSHDIVERT(7)dnl\ndnl # dualroute: a mailer for destinations on port 2525"));
        // What Sendmail cannot do: a note per relay domain, none for the
        // change_envelope domain.
        let cannot: Vec<&String> = sm
            .notes
            .iter()
            .filter(|n| n.contains("cannot restore"))
            .collect();
        assert_eq!(cannot.len(), 3, "{cannot:?}");
        assert!(!cannot.iter().any(|n| n.starts_with("d.example")));
        assert!(!sm.notes.iter().any(|n| n.contains("recipient_delimiter")));
        let other_delimiter = generated(
            "recipient_delimiter: \"-\"\nstate_dir: /nonexistent\ndomains:\n  d.example:\n    mode: route\n    destination: { domain: x.example.net, change_envelope: true }\n",
        );
        assert!(other_delimiter
            .notes
            .iter()
            .any(|n| n.starts_with("recipient_delimiter is \"-\"")));
    }
}
