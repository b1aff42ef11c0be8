//! The units `milter.yaml` writes values in, in every section: durations
//! (`90s`, `30m`, `1h`, `2d`) and message sizes (`35M`).

use super::de::deserialize_from_str;
use std::{fmt, str::FromStr, time::Duration};

/// A duration such as `90s`, `30m`, `1h`, `2d`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Window(pub Duration);

impl Window {
    /// Ten years: longer than any timeout or breaker window means.
    pub const LONGEST_SECS: u64 = 3650 * 86400;
}

impl FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?}: expected a number with a unit, e.g. 1h"))?;
        let unit_secs = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
        };
        // Checked: release builds wrap on overflow, which would turn a typo
        // into some other window without a word. The bound also keeps the
        // clock arithmetic done with it (`Instant + Duration`, which panics
        // on overflow) safe.
        let secs = n
            .checked_mul(unit_secs)
            .filter(|&secs| secs <= Window::LONGEST_SECS)
            .ok_or_else(|| {
                format!(
                    "{s:?} is too large: at most {}d",
                    Window::LONGEST_SECS / 86400
                )
            })?;
        if secs == 0 {
            return Err(format!("{s:?}: must be longer than zero"));
        }
        Ok(Window(Duration::from_secs(secs)))
    }
}
deserialize_from_str!(Window, "duration");

/// A message size: bytes, or a number with `K`, `M` or `G` (binary
/// multiples, as Exchange Online counts its 35 MB limit: 35840 KB).
/// Shown as written, so log lines match milter.yaml.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct MessageSize {
    pub bytes: u64,
    pub written: String,
}

impl FromStr for MessageSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{t:?}: expected bytes, or a number with K, M or G (35M)"))?;
        let unit_bytes: u64 = match unit.trim() {
            "" => 1,
            "K" | "k" => 1 << 10,
            "M" | "m" => 1 << 20,
            "G" | "g" => 1 << 30,
            _ => return Err(format!("{t:?}: unit must be K, M or G (35M)")),
        };
        // Checked: a wrapped product would silently become another limit.
        let bytes = n
            .checked_mul(unit_bytes)
            .ok_or_else(|| format!("{t:?} is too large"))?;
        if bytes == 0 {
            return Err(format!(
                "{t:?}: must be larger than zero (remove the key for no limit)"
            ));
        }
        Ok(MessageSize {
            bytes,
            written: t.to_owned(),
        })
    }
}
deserialize_from_str!(MessageSize, "message size");

impl fmt::Display for MessageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.written)
    }
}

/// `1h`, `30m`, `90s`: a window as the configuration writes it.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        _ if s % 86400 == 0 => format!("{}d", s / 86400),
        _ if s % 3600 == 0 => format!("{}h", s / 3600),
        _ if s % 60 == 0 => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_sizes() {
        let b = |s: &str| s.parse::<MessageSize>().map(|m| m.bytes);
        assert_eq!(b("35M"), Ok(35 << 20));
        assert_eq!(b("35840K"), Ok(35 << 20));
        assert_eq!(b("1G"), Ok(1 << 30));
        assert_eq!(b("10485760"), Ok(10_485_760));
        assert_eq!("35M".parse::<MessageSize>().unwrap().to_string(), "35M");
        assert!(b("0").is_err());
        assert!(b("35MB").is_err());
        assert!(b("M").is_err());
        assert!(b("-1M").is_err());
        assert!(b("99999999999999G").is_err());
    }

    #[test]
    fn windows() {
        assert_eq!("1h".parse(), Ok(Window(Duration::from_secs(3600))));
        assert_eq!("90s".parse(), Ok(Window(Duration::from_secs(90))));
        assert!("1w".parse::<Window>().is_err());
        assert!("0m".parse::<Window>().is_err());
        assert_eq!(
            "3650d".parse(),
            Ok(Window(Duration::from_secs(3650 * 86400)))
        );
        assert!("3651d".parse::<Window>().is_err());
        assert!("213503982334602d".parse::<Window>().is_err());
        assert!("h".parse::<Window>().is_err());
    }

    #[test]
    fn windows_as_written_in_the_configuration() {
        assert_eq!(human(Duration::from_secs(3600)), "1h");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_secs(1800)), "30m");
        assert_eq!(human(Duration::from_secs(2 * 86400)), "2d");
    }
}
