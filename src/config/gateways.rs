//! `gateways:` in `milter.yaml`: the clients that relay to us on purpose
//! (docs/design.md §2), as addresses or CIDR networks.

use super::de::deserialize_from_str;
use ipnet::IpNet;
use std::{fmt, net::IpAddr, str::FromStr};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
