//! What the announcer reports (`announce.rs` keeps BIRD in step), and where the files BIRD
//! includes live: the daemon keeps the record and the paths without knowing the task.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Instant,
};

use serde::{Deserialize, Serialize};

/// What the announcer reports (status, metrics, alerts).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub drained: bool,
    /// Withdrawn: cut off from etcd while its peers are not (`limits.rs`).
    #[serde(default)]
    pub fenced: bool,
    /// VIPs this node should announce now.
    pub wanted: BTreeSet<IpAddr>,
    /// VIPs in BIRD's config as of the last successful `configure`.
    pub announced: BTreeSet<IpAddr>,
    /// Why BIRD does not have what is wanted (while it does not).
    pub error: Option<String>,
    /// Since when BIRD has differed from what is wanted.
    #[serde(skip)]
    pub behind_since: Option<Instant>,
}

/// Where the files BIRD includes live, and the marker that keeps a drained node drained across
/// daemon restarts.
pub fn files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("vips4.conf"), dir.join("vips6.conf"))
}

pub fn drained_marker(dir: &Path) -> PathBuf {
    dir.join("drained")
}
