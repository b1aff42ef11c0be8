//! What the other side must be told about this server, for Google
//! Workspace and Microsoft 365 destinations (recognised from the
//! destination's names or its MX hosts, src/provider.rs).
//!
//! Both providers judge mail by the address it comes from. Routed mail
//! comes from this server but carries someone else's sender, so without
//! being told, the provider checks the sender's SPF against this server,
//! and its spam filter scores this server as the origin. Google's answer
//! is the inbound gateway (Admin console: Gmail → Spam, phishing and
//! malware → Inbound gateway), Microsoft's an inbound connector from "your
//! organization's email server" plus Enhanced Filtering for Connectors
//! (skip listing). None of that is visible in the DNS: doctor prints what
//! to set, filled in with this server's addresses, and uses the DNS for
//! what it can tell — who the provider is, and whether the domain's MX
//! points here, which decides whether "reject mail not from gateway IPs"
//! is safe and whether skip listing is needed.

use super::Check;
use crate::config::{Destination, DomainConfig};
use crate::dns::Lookup;
use crate::provider::Provider;
use std::net::IpAddr;

/// The provider section of a domain: a ✔ naming the provider and how it
/// was recognised, and the settings to make on its side.
pub struct Trust {
    pub check: Check,
    pub todo: Vec<String>,
}

/// `this`: this server's addresses; `dest_hosts`: the host names the
/// destination resolved to (its MX hosts).
pub async fn trust(
    name: &str,
    d: &DomainConfig,
    this: &[IpAddr],
    dest_hosts: &[String],
    dns: &impl Lookup,
) -> Option<Trust> {
    let (provider, how) = match Provider::of_destination(&d.destination) {
        Some(p) => (p, "by the destination's name".to_owned()),
        None => {
            let host = dest_hosts.iter().find(|h| Provider::of_name(h).is_some())?;
            (Provider::of_name(host)?, format!("by its MX host {host}"))
        }
    };
    let check = Check::pass(format!("the destination is {provider} (recognised {how})"));
    // Where the domain's mail arrives: at this server (then the provider
    // receives it only through us), or at the provider itself.
    let mx_here = match dns.mx(name).await {
        Ok(records) => {
            let mut here = false;
            for (_, host) in &records {
                if let Ok(ips) = dns.ips(host).await {
                    here |= ips.iter().any(|ip| this.contains(ip));
                }
            }
            Some(here)
        }
        Err(_) => None,
    };
    let ips = if this.is_empty() {
        "this server's public addresses (give them with --ip)".to_owned()
    } else {
        this.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let routing = routing_domain(name, d, provider);
    let mut todo = match provider {
        Provider::Google => google(name, &ips, mx_here),
        Provider::Microsoft => microsoft(name, &ips, mx_here),
    };
    todo.push(format!(
        "never use {routing} as an envelope sender (MAIL FROM), e.g. in sender_canonical_maps or masquerade_domains: it is {provider}'s routing domain, its SPF does not name this server, and {provider} rejects or quarantines such mail as forged; dualroute itself only ever writes it into recipients"
    ));
    Some(Trust { check, todo })
}

/// The name routed mail is addressed to at the provider.
fn routing_domain(name: &str, d: &DomainConfig, provider: Provider) -> String {
    match (&d.destination, provider) {
        (Destination::Domain { domain, .. }, _) if Provider::of_name(&domain.0).is_some() => {
            domain.0.clone()
        }
        (_, Provider::Google) => format!("{name}.test-google-a.com"),
        (_, Provider::Microsoft) => "<tenant>.mail.onmicrosoft.com".to_owned(),
    }
}

fn google(name: &str, ips: &str, mx_here: Option<bool>) -> Vec<String> {
    let mut todo = vec![format!(
        "Google Admin console → Apps → Google Workspace → Gmail → Spam, phishing and malware → Inbound gateway: add {ips} as gateway IPs and tick \"Automatically detect external IP\", so Google checks SPF and spam against the server that sent the mail to us, not against this server"
    )];
    todo.push(match mx_here {
        Some(true) => format!(
            "the MX of {name} points here, so every outside message reaches Google through this server: in the same Inbound gateway setting you can tick \"Reject all mail not from gateway IPs\", which stops spammers from bypassing this server by sending to Google's MX directly"
        ),
        Some(false) => format!(
            "the MX of {name} does not point here: leave \"Reject all mail not from gateway IPs\" unticked, or Google rejects the mail that reaches it directly"
        ),
        None => format!(
            "tick \"Reject all mail not from gateway IPs\" only once the MX of {name} points here (doctor could not look it up)"
        ),
    });
    todo
}

fn microsoft(name: &str, ips: &str, mx_here: Option<bool>) -> Vec<String> {
    let mut todo = vec![format!(
        "Exchange admin center → Mail flow → Connectors: add a connector from \"Your organization's email server\" to \"Office 365\" that identifies this server by its IP addresses ({ips}), or by the subject name of the certificate it presents (Postfix: smtp_tls_cert_file on the dualroute transport, with tls: encrypt or higher); without it Microsoft treats routed mail as mail from the internet about {name}"
    )];
    todo.push(match mx_here {
        Some(true) => format!(
            "the MX of {name} points here, so Microsoft sees this server as the origin of all outside mail: turn on Enhanced Filtering for Connectors (security portal → Policies & rules → Threat policies → Enhanced filtering) on that connector and skip {ips}, so SPF, DMARC and spam checks look at the server that sent the mail to us"
        ),
        Some(false) => format!(
            "the MX of {name} does not point here: Enhanced Filtering for Connectors is needed only for mail that arrives through this server; skip {ips} on the connector if you turn it on"
        ),
        None => format!(
            "once the MX of {name} points here, turn on Enhanced Filtering for Connectors and skip {ips} (doctor could not look the MX up)"
        ),
    });
    todo
}
