//! Configuration: the typed model, and reading it from `milter.yaml`.

pub mod model;
pub mod read;

pub use model::*;
pub use read::{parse, read_file, ConfigError};

/// The configuration file when `--config` is not given, and the only
/// default: never a file in the current directory, which in a source
/// checkout is the example (docs/design.md §6; src/cli.rs).
pub const SYSTEM_CONFIG: &str = "/etc/dualroute/milter.yaml";

/// `1h`, `30m`, `90s`: a window as the configuration writes it.
pub fn human(d: std::time::Duration) -> String {
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
    use super::human;
    use std::time::Duration;

    #[test]
    fn windows_as_written_in_the_configuration() {
        assert_eq!(human(Duration::from_secs(3600)), "1h");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_secs(1800)), "30m");
        assert_eq!(human(Duration::from_secs(2 * 86400)), "2d");
    }
}
