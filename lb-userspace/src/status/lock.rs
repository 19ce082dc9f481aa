//! The daemon's state lock, as counted (`daemon/lock.rs` counts it).

use serde::{Deserialize, Serialize};

/// The lock's counts since the daemon started (`sluice status --json`, `/metrics`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LockReport {
    /// Times the lock was taken.
    pub holds: u64,
    /// The longest hold, in milliseconds, and the source line that took the lock for it.
    pub longest_ms: f64,
    pub longest_at: String,
    /// Holds longer than 10 ms and than 100 ms.
    pub over_10ms: u64,
    pub over_100ms: u64,
}
