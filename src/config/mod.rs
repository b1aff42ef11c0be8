//! Configuration: the typed model, and reading it from `milter.yaml`.

pub mod model;
pub mod read;

pub use model::*;
pub use read::{parse, read_file, ConfigError};

/// The configuration file when `--config` is not given, and the only
/// default: never a file in the current directory, which in a source
/// checkout is the example (docs/design.md §6; src/cli.rs).
pub const SYSTEM_CONFIG: &str = "/etc/dualroute/milter.yaml";
