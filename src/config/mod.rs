//! Configuration: the typed model, and reading it from `milter.yaml`.

pub mod model;
pub mod read;

pub use model::*;
pub use read::{parse, read_file, ConfigError};

use std::path::{Path, PathBuf};

/// The system-wide configuration file, used when `./milter.yaml` is absent.
pub const SYSTEM_CONFIG: &str = "/etc/dualroute/milter.yaml";

/// `--config` if given; else `./milter.yaml` if it exists; else
/// [`SYSTEM_CONFIG`] (docs/design.md §6).
pub fn config_path(given: Option<&Path>) -> PathBuf {
    match given {
        Some(p) => p.to_owned(),
        None if Path::new("milter.yaml").exists() => PathBuf::from("milter.yaml"),
        None => PathBuf::from(SYSTEM_CONFIG),
    }
}
