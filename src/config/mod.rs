//! Configuration: the typed model of `milter.yaml`, one file per section
//! (model.rs holds the whole file and its top-level keys), and reading it
//! (read.rs). Every type is re-exported here, so the rest of the program
//! names it `crate::config::X` whichever file holds it.

mod accounts;
mod breaker;
mod cluster;
mod connections;
mod de;
mod destination;
mod dns;
mod domains;
mod gateways;
mod listen;
mod locate;
mod metrics;
mod model;
mod names;
mod notify;
pub mod read;
mod units;

pub use accounts::*;
pub use breaker::*;
pub use cluster::*;
pub use connections::*;
pub use destination::*;
pub use dns::*;
pub use domains::*;
pub use gateways::*;
pub use listen::*;
pub use metrics::*;
pub use model::*;
pub use names::*;
pub use notify::*;
pub use read::{parse, read_file, ConfigError};
pub use units::*;

/// The configuration file when `--config` is not given, and the only
/// default: never a file in the current directory, which in a source
/// checkout is the example (docs/design.md §6; src/cli.rs).
pub const SYSTEM_CONFIG: &str = "/etc/dualroute/milter.yaml";
