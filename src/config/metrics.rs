//! `metrics:` in `milter.yaml`: where the Prometheus/OpenMetrics endpoint
//! listens.

use super::de::deserialize_from_str;
use serde::Deserialize;
use std::{net::SocketAddr, str::FromStr};

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
