//! The drill's cluster lab: two nodes behind a router's ECMP, built with `sluice lab cluster`'s
//! own pieces (`crate::cluster::Cluster`: the router's and the nodes' BIRD, a daemon per node),
//! each backend's `max_conns` per node, so that one node alone cannot carry the users.

use std::{path::PathBuf, time::Instant};

use anyhow::Result;

use crate::{
    cluster::{node_ns, Cluster},
    Lab,
};

pub const NODES: u8 = 2;
/// Each backend's `max_conns` on each node: the users keep ~75 open on it through each node,
/// ~150 through one node alone.
pub const NODE_LIMIT: u32 = 110;

/// Node `k`'s files (`cluster.rs` lays them out so).
pub fn dir(lab: &Lab, k: u8) -> PathBuf {
    lab.spec.dir.join(format!("node{k}"))
}
pub fn socket(lab: &Lab, k: u8) -> PathBuf {
    dir(lab, k).join("sluice.sock")
}
pub fn journal(lab: &Lab, k: u8) -> PathBuf {
    dir(lab, k).join("journal.jsonl")
}

/// Builds the router and the nodes in `lab` (no daemon of its own yet); returns once the
/// router has a next hop per node.
pub fn build(lab: &Lab) -> Result<()> {
    let cl = Cluster { lab, up: (1..=NODES).collect(), max: NODES, limits: None, spill: false };
    cl.build()?;
    for k in 1..=NODES {
        cl.write_node(k)?;
        let path = cl.dir(k).join("sluice.toml");
        let text = std::fs::read_to_string(&path)?.replace("max_conns = 10000", &format!("max_conns = {NODE_LIMIT}"));
        std::fs::write(&path, text)?;
        cl.start_daemon(k)?;
        cl.start_bird(&node_ns(k), &format!("bird-n{k}"), &cl.dir(k))?;
    }
    cl.converge(Instant::now())?;
    Ok(())
}
