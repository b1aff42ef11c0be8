//! `breaker:` in `milter.yaml`: when the bounce breaker switches routing
//! off for a domain.

use super::Window;
use serde::Deserialize;
use std::{path::PathBuf, time::Duration};

/// The bounce breaker (docs/design.md §7).
#[derive(Clone, Debug, Eq, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    pub maillog: PathBuf,
    #[serde(default = "default_threshold")]
    pub threshold: u32,
    #[serde(default = "default_window")]
    pub window: Window,
    /// Temporary failures (deferred deliveries) of routed mail within
    /// `window` at which routing for the domain is switched off, as Zoho
    /// stops forwarding after more than 10 (README "Deferrals"). Absent:
    /// deferrals are counted and shown, never a trip.
    #[serde(default)]
    pub deferrals: Option<u32>,
}

fn default_threshold() -> u32 {
    20
}
fn default_window() -> Window {
    Window(Duration::from_secs(3600))
}
