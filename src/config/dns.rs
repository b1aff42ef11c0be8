//! `dns:` in `milter.yaml`: the name servers `doctor` and the verification
//! probe ask.

use super::de::{checked_map, deserialize_from_str};
use serde::{Deserialize, Deserializer};
use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
