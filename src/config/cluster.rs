//! `cluster:` in `milter.yaml` (DESIGN.md §11): the Redis that several MX
//! hosts share their routing state through (docs/design.md "Several MX
//! hosts").

use super::de::deserialize_from_str;
use super::units::Window;
use serde::Deserialize;
use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

/// A Redis URL: `redis://[user:password@]host[:port][/db]`, `rediss://`
/// for TLS, `redis+unix:///path` or `unix:///path`. Shown without its
/// password.
#[derive(Clone, Eq, PartialEq)]
pub struct RedisUrl(pub String);

impl FromStr for RedisUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let scheme = s.split("://").next().unwrap_or_default();
        if !matches!(scheme, "redis" | "rediss" | "redis+unix" | "unix") || !s.contains("://") {
            return Err(format!(
                "{}: expected redis://HOST[:PORT][/DB], rediss:// (TLS) or redis+unix:///PATH",
                RedisUrl(s.to_owned())
            ));
        }
        Ok(RedisUrl(s.to_owned()))
    }
}
deserialize_from_str!(RedisUrl, "Redis URL");

impl RedisUrl {
    /// Whether the URL carries a password (`redis://:secret@host`,
    /// `redis://user:secret@host`, `redis+unix:///path?pass=secret`); a
    /// user alone (`redis://dualroute@host`) is not one.
    pub fn has_password(&self) -> bool {
        let userinfo = self.authority().rsplit_once('@').map(|(u, _)| u);
        userinfo.is_some_and(|u| u.contains(':')) || self.query_password().is_some()
    }

    /// The `pass=` of a unix socket URL's query.
    fn query_password(&self) -> Option<&str> {
        let (_, query) = self.0.split_once('?')?;
        query.split('&').find_map(|kv| kv.strip_prefix("pass="))
    }

    fn authority(&self) -> &str {
        let rest = self.0.split_once("://").map(|(_, r)| r).unwrap_or(&self.0);
        rest.split('/').next().unwrap_or(rest)
    }
}

impl fmt::Display for RedisUrl {
    /// The URL with its password replaced by `***`: it is shown by
    /// `status`, `check` and the log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(pass) = self.query_password() {
            return f.write_str(&self.0.replace(&format!("pass={pass}"), "pass=***"));
        }
        let auth = self.authority();
        match auth.rsplit_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') => {
                let user = userinfo.split(':').next().unwrap_or_default();
                let (scheme, rest) = self.0.split_once("://").unwrap_or(("", &self.0));
                let path = &rest[auth.len()..];
                write!(f, "{scheme}://{user}:***@{host}{path}")
            }
            Some(_) => f.write_str(&self.0),
            None => f.write_str(&self.0),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

/// `cluster:` (DESIGN.md §11). Read at start; a change needs a restart.
#[derive(Clone, Debug, Eq, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub redis: RedisUrl,
    /// A file whose first line is the password (for a URL without one):
    /// keeps the secret out of milter.yaml, which `check` prints from.
    pub password_file: Option<PathBuf>,
    /// The prefix of every key and channel: one Redis (or one ACL user)
    /// for several fleets, or beside rspamd.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How often a node compares its state with the fleet's, besides the
    /// changes it hears at once (pub/sub), and says it is alive.
    #[serde(default = "default_sync")]
    pub sync: Window,
    /// A node not heard of for this long is shown SILENT by `status`.
    #[serde(default = "default_silent")]
    pub silent_after: Window,
}

fn default_prefix() -> String {
    "dualroute:".into()
}
fn default_sync() -> Window {
    Window(Duration::from_secs(5))
}
fn default_silent() -> Window {
    Window(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_their_password() {
        for good in [
            "redis://127.0.0.1:6379/0",
            "rediss://redis.example.net",
            "redis+unix:///run/redis/redis.sock",
        ] {
            assert_eq!(good.parse::<RedisUrl>().unwrap().to_string(), good);
        }
        for bad in ["127.0.0.1:6379", "http://x", "redis:/x", ""] {
            assert!(bad.parse::<RedisUrl>().is_err(), "{bad}");
        }
        let u: RedisUrl = "redis://dualroute:s3cret@10.0.0.5:6379/2".parse().unwrap();
        assert!(u.has_password());
        assert_eq!(u.to_string(), "redis://dualroute:***@10.0.0.5:6379/2");
        assert!(!format!("{u:?}").contains("s3cret"));
        let u: RedisUrl = "redis://:s3cret@10.0.0.5".parse().unwrap();
        assert_eq!(u.to_string(), "redis://:***@10.0.0.5");
        // A user without a password: the password comes from
        // password_file.
        let u: RedisUrl = "redis://dualroute@10.0.0.5".parse().unwrap();
        assert!(!u.has_password());
        assert_eq!(u.to_string(), "redis://dualroute@10.0.0.5");
        let u: RedisUrl = "redis+unix:///run/redis.sock?db=1&pass=s3cret"
            .parse()
            .unwrap();
        assert!(u.has_password());
        assert_eq!(u.to_string(), "redis+unix:///run/redis.sock?db=1&pass=***");
        let e = "ftp://:s3cret@x".parse::<RedisUrl>().unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
