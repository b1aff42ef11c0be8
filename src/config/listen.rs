//! `listen:` in `milter.yaml`: the socket the MTA connects to.

use super::de::deserialize_from_str;
use std::{fmt, path::PathBuf, str::FromStr};

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
}
