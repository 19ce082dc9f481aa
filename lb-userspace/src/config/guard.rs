//! `[guard]`: what the guard (`guard.rs`) judges a change against.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[guard]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GuardCfg {
    /// The peaks a change is judged against.
    #[serde(default = "default_window", with = "crate::config::humantime_str")]
    pub window: Duration,
    /// `sluice config review` suggests `max_conns` = peak × this, and flags a limit below it.
    #[serde(default = "default_headroom")]
    pub headroom: f64,
    /// Refuse what it judges (default); `false` only warns (a lab that changes limits under
    /// load on purpose).
    #[serde(default = "default_enforce")]
    pub enforce: bool,
}

fn default_enforce() -> bool {
    true
}

fn default_window() -> Duration {
    Duration::from_hours(24)
}
fn default_headroom() -> f64 {
    1.25
}

impl Default for GuardCfg {
    fn default() -> Self {
        Self { window: default_window(), headroom: default_headroom(), enforce: true }
    }
}
