//! What the peer channel (`peers.rs`) carries and reports: the flows a node adopted, and the
//! channel's counts with what each peer last said.

use std::time::Duration;

use lb_common::FlowKey;
use serde::{Deserialize, Serialize};

/// One flow this node adopted, and how long before the message was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Milliseconds between the adoption and the message being sent.
    pub ago_ms: u64,
}

impl Moved {
    pub fn key(&self) -> FlowKey {
        FlowKey { src: self.src, dst: self.dst, sport_be: self.sport.to_be_bytes(), dport_be: self.dport.to_be_bytes(), proto: self.proto, ..FlowKey::default() }
    }
}

/// Flows adopted since the last walk, and the moment of that walk: each flow's `ago_ms` is as
/// of then, and the time the batch waits before it is sent is added to it (a peer releases a
/// slot only for a flow idle there since before the adoption, so an age too small would
/// release one that moved back meanwhile).
pub type Batch = (std::time::Instant, Vec<Moved>);

/// What the peer channel reports (status, metrics).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Adopted flows this node reported to its peers.
    pub reported: u64,
    /// Flows peers reported that were here and whose slots this node released.
    pub released: u64,
    /// Reported flows that were not here (each report goes to every peer).
    pub ignored: u64,
    /// Reported flows whose packets still arrive here (left alone).
    pub still_here: u64,
    /// Messages refused (bad MAC, stale, malformed).
    pub refused: u64,
    /// Batches not delivered yet, per peer.
    pub pending: Vec<(String, usize)>,
    pub last_error: Option<String>,
    /// Each peer's last failure, until a delivery to it succeeds (`last_error` is the latest).
    #[serde(skip)]
    pub peer_errors: std::collections::BTreeMap<String, String>,
    /// When each peer last said (in a signed message) that it reaches etcd: a node cut off
    /// from etcd while its peers are not fences itself (`limits.rs`).
    #[serde(skip)]
    pub etcd_seen: std::collections::BTreeMap<String, std::time::Instant>,
    /// What each peer last said it may hold, and when that arrived.
    #[serde(skip)]
    pub holds_seen: std::collections::BTreeMap<String, (std::time::Instant, crate::shares::Holds)>,
}

impl Stats {
    /// Peers that said within `within` that they reach etcd.
    pub fn peers_with_etcd(&self, within: Duration) -> Vec<String> {
        self.etcd_seen.iter().filter(|(_, at)| at.elapsed() < within).map(|(n, _)| n.clone()).collect()
    }

    /// What `node` said within `within` that it may hold.
    pub fn holds_of(&self, node: &str, within: Duration) -> Option<&crate::shares::Holds> {
        self.holds_seen.get(node).filter(|(at, _)| at.elapsed() < within).map(|(_, h)| h)
    }
}
