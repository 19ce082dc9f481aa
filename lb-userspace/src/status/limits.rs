//! What the cluster-wide limits report (`[cluster.limits]`): the records `limits.rs` keeps up
//! to date and the status, the metrics, the status page and the alerts read.

use std::{collections::BTreeMap, time::Instant};

use serde::{Deserialize, Serialize};

use crate::shares::{Grant, Holds, Report};

/// Requests and bytes exchanged with etcd since the daemon started (`BENCHMARKS.md`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    pub rounds: u64,
    pub requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub reports: u64,
    pub grants_written: u64,
    pub grants_applied: u64,
}

/// What `sluice status`, `sluice cluster status`, the metrics and the alerts show.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub etcd: Vec<String>,
    pub prefix: String,
    pub lease_ttl_s: u64,
    /// etcd answered this node's last round.
    pub connected: bool,
    pub lease: Option<i64>,
    /// The node computing the shares now.
    pub leader: Option<String>,
    /// Enforcing safe shares: etcd was lost for longer than the lease.
    pub fallback: bool,
    /// Withdrawn and admitting nothing: cut off from etcd while a peer reaches it.
    #[serde(default)]
    pub fenced: bool,
    /// Nodes whose lease is gone and what the allocator still reserves for them (as the
    /// allocator last computed it; empty on the other nodes).
    #[serde(default)]
    pub reserved: BTreeMap<String, Holds>,
    /// Seconds since etcd last answered, while it does not.
    pub lost_for_s: Option<f64>,
    pub error: Option<String>,
    /// The grant this node enforces.
    pub applied_seq: u64,
    /// Every live node's last report, and the grants (as last read).
    pub nodes: BTreeMap<String, Report>,
    pub grants: BTreeMap<String, Grant>,
    /// This node's share and the cluster's open connections, per backend key.
    pub backends: BTreeMap<String, BackendLimit>,
    pub traffic: Traffic,
    #[serde(skip)]
    pub lost_since: Option<Instant>,
}

/// One backend's cluster-wide limit as this node sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BackendLimit {
    pub max_conns: u32,
    /// What this node enforces (its share, or its safe share in fallback).
    pub share: u32,
    /// Open here.
    pub open: u64,
    /// Open over every live node (their last reports; this node's now).
    pub cluster_open: u64,
    pub safe_share: u32,
}
