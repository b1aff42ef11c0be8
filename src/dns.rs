//! DNS lookups for `dualroute doctor` and the verification probe, through
//! the name servers of `dns:` in milter.yaml or, without them, the system's
//! (`/etc/resolv.conf`).
//!
//! `/etc/hosts` is never consulted: other mail servers see this domain
//! through the DNS only (Postfix's own default, `smtp_host_lookup = dns`),
//! and on Debian the host's own name is listed there as 127.0.1.1.

use crate::config::DnsConfig;
use hickory_resolver::config::{
    NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveError, TokioResolver};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use viaspf::lookup::{LookupError, LookupResult, Name};

/// A lookup that failed. "No such name" and "no records of that type" are
/// not errors: they come back as an empty answer.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum DnsError {
    /// The name server answered with an error code (SERVFAIL, REFUSED, …):
    /// this name is in trouble, others may be fine.
    #[error("{0}")]
    Answer(String),
    /// No answer at all (timeout, unreachable): the name servers are.
    #[error("{0}")]
    NoAnswer(String),
}

/// An address family, for the A or the AAAA records of a name.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// The lookups `doctor` and the SPF evaluator make. A trait so that the
/// SPF rules can be tested against a table of records.
#[allow(async_fn_in_trait)]
pub trait Lookup {
    /// MX records as (preference, exchange without the final dot), by preference.
    async fn mx(&self, name: &str) -> Result<Vec<(u16, String)>, DnsError>;
    /// TXT records, each one's strings joined (RFC 7208 §3.3).
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError>;
    /// A (`V4`) or AAAA (`V6`) records.
    async fn addrs(&self, name: &str, family: Family) -> Result<Vec<IpAddr>, DnsError>;

    /// A and AAAA records.
    async fn ips(&self, name: &str) -> Result<Vec<IpAddr>, DnsError> {
        let mut out = self.addrs(name, Family::V4).await?;
        out.extend(self.addrs(name, Family::V6).await?);
        Ok(out)
    }
}

/// The resolver for `dns:` (see the module comment).
pub fn resolver(config: &DnsConfig) -> Result<TokioResolver, DnsError> {
    let mut builder = if config.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| {
            DnsError::NoAnswer(format!("cannot read the system's DNS configuration: {e}"))
        })?
    } else {
        let mut group = NameServerConfigGroup::new();
        for &addr in &config.nameservers {
            // UDP first, TCP for truncated answers (RFC 7766), as
            // NameServerConfigGroup::from_ips_clear does for a shared port.
            for protocol in [Protocol::Udp, Protocol::Tcp] {
                let mut ns = NameServerConfig::new(addr, protocol);
                ns.trust_negative_responses = true;
                group.push(ns);
            }
        }
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], group),
            TokioConnectionProvider::default(),
        )
    };
    builder.options_mut().use_hosts_file = ResolveHosts::Never;
    Ok(builder.build())
}

/// The DNS as configured: a [`Lookup`] over a hickory resolver.
pub struct Dns(pub TokioResolver);

impl Dns {
    pub fn new(config: &DnsConfig) -> Result<Dns, DnsError> {
        resolver(config).map(Dns)
    }
}

/// Fully qualified, so that no search domain is ever appended.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

/// Empty answers (NXDOMAIN, NOERROR without records) are `Ok(None)`.
/// hickory reports SERVFAIL and REFUSED as "no records found" too, with
/// their response code: those are failures, not answers.
fn classify(name: &str, rtype: &str, e: ResolveError) -> Result<(), DnsError> {
    if let Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) = e.proto().map(|p| p.kind())
    {
        return match response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => Ok(()),
            code => Err(DnsError::Answer(format!(
                "{rtype} lookup of {name}: the name server answered {} ({code})",
                code_name(*code)
            ))),
        };
    }
    // ResolveError says "proto error: request timed out"; the cause is enough.
    let why = e
        .proto()
        .map(ToString::to_string)
        .unwrap_or_else(|| e.to_string());
    Err(DnsError::NoAnswer(format!(
        "{rtype} lookup of {name}: {why}"
    )))
}

fn code_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        other => u16::from(other).to_string(),
    }
}

impl Lookup for Dns {
    async fn mx(&self, name: &str) -> Result<Vec<(u16, String)>, DnsError> {
        match self.0.mx_lookup(fqdn(name)).await {
            Ok(lookup) => {
                let mut mx: Vec<(u16, String)> = lookup
                    .iter()
                    .map(|r| {
                        (
                            r.preference(),
                            r.exchange().to_ascii().trim_end_matches('.').to_lowercase(),
                        )
                    })
                    .collect();
                mx.sort();
                Ok(mx)
            }
            Err(e) => classify(name, "MX", e).map(|()| Vec::new()),
        }
    }

    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        match self.0.txt_lookup(fqdn(name)).await {
            Ok(lookup) => Ok(lookup
                .iter()
                .map(|t| {
                    t.txt_data()
                        .iter()
                        .map(|s| String::from_utf8_lossy(s))
                        .collect::<String>()
                })
                .collect()),
            Err(e) => classify(name, "TXT", e).map(|()| Vec::new()),
        }
    }

    async fn addrs(&self, name: &str, family: Family) -> Result<Vec<IpAddr>, DnsError> {
        match family {
            Family::V4 => match self.0.ipv4_lookup(fqdn(name)).await {
                Ok(l) => Ok(l.iter().map(|a| IpAddr::V4(a.0)).collect()),
                Err(e) => classify(name, "A", e).map(|()| Vec::new()),
            },
            Family::V6 => match self.0.ipv6_lookup(fqdn(name)).await {
                Ok(l) => Ok(l.iter().map(|a| IpAddr::V6(a.0)).collect()),
                Err(e) => classify(name, "AAAA", e).map(|()| Vec::new()),
            },
        }
    }
}

/// viaspf's view of the DNS, for `doctor`'s SPF checks: the same resolver,
/// so `dns: nameservers` applies to SPF as to everything else. "No such
/// name" and "no records" are empty answers (RFC 7208 §5: evaluation goes
/// on as if zero records came back); a failed lookup keeps its text for
/// the doctor's line.
#[async_trait::async_trait]
impl viaspf::lookup::Lookup for Dns {
    async fn lookup_a<'lookup, 'a>(&'lookup self, name: &'a Name) -> LookupResult<Vec<Ipv4Addr>> {
        self.spf_addrs(name, Family::V4, |ip| match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
        .await
    }

    async fn lookup_aaaa<'lookup, 'a>(
        &'lookup self,
        name: &'a Name,
    ) -> LookupResult<Vec<Ipv6Addr>> {
        self.spf_addrs(name, Family::V6, |ip| match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        })
        .await
    }

    async fn lookup_mx<'lookup, 'a>(&'lookup self, name: &'a Name) -> LookupResult<Vec<Name>> {
        let mx = Lookup::mx(self, name.as_str()).await.map_err(spf_error)?;
        // A null MX (RFC 7505, exchange ".") names no host to try.
        mx.into_iter()
            .filter(|(_, host)| !host.is_empty())
            .map(|(_, host)| Name::new(&host).map_err(|e| LookupError::Dns(Some(Box::new(e)))))
            .collect()
    }

    async fn lookup_txt<'lookup, 'a>(&'lookup self, name: &'a Name) -> LookupResult<Vec<String>> {
        Lookup::txt(self, name.as_str()).await.map_err(spf_error)
    }

    async fn lookup_ptr<'lookup>(&'lookup self, ip: IpAddr) -> LookupResult<Vec<Name>> {
        match self.0.reverse_lookup(ip).await {
            Ok(names) => names
                .iter()
                .map(|n| Name::new(&n.to_ascii()).map_err(|e| LookupError::Dns(Some(Box::new(e)))))
                .collect(),
            Err(e) => match classify(&ip.to_string(), "PTR", e) {
                Ok(()) => Ok(Vec::new()),
                Err(e) => Err(spf_error(e)),
            },
        }
    }
}

impl Dns {
    /// The A or AAAA records of `name` as viaspf wants them.
    async fn spf_addrs<T>(
        &self,
        name: &Name,
        family: Family,
        pick: fn(IpAddr) -> Option<T>,
    ) -> LookupResult<Vec<T>> {
        let ips = Lookup::addrs(self, name.as_str(), family)
            .await
            .map_err(spf_error)?;
        Ok(ips.into_iter().filter_map(pick).collect())
    }
}

/// Keeps our text ("TXT lookup of …: the name server answered SERVFAIL")
/// as the error's source, where the doctor finds it again.
fn spf_error(e: DnsError) -> LookupError {
    LookupError::Dns(Some(Box::new(e)))
}
