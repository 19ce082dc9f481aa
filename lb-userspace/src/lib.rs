//! Sluice's userspace: loading and pinning the XDP datapath, reading its counters, and the
//! `sluice` command line. `main.rs` is a thin wrapper over [`cli::main`].
//!
//! Public: what the `sluice` binary, the lab (`lab/`) and the tests (`tests/`) use (the
//! config, the daemon and its API, the datapath's tables, the cluster's peer channel and
//! limits); every other module is private to the crate, so a test reaches the daemon through
//! the same surface an operator's tools do, and `cargo xtask layers` sees the rest whole.

// The flow table's lock-free protocol (lb-ebpf/src/flow.rs, flowtab.rs) relies on x86-64's
// ordering of stores with stores and loads with loads; other architectures need barriers.
#[cfg(not(target_arch = "x86_64"))]
compile_error!("Sluice's datapath is written for x86-64 memory ordering (see docs/ARCHITECTURE.md, \"The flow table\")");

pub mod alerts;
mod announce;
pub mod api;
mod cfgfile;
pub mod cli;
pub mod client;
pub mod config;
pub mod conns;
pub mod daemon;
pub mod datapath;
mod error;
pub mod events;
pub mod explain;
pub mod flowtab;
pub mod gc;
mod guard;
mod health;
mod history;
pub mod journal;
pub mod key;
pub mod limits;
mod listen;
pub mod maglev;
mod metrics;
mod neigh;
mod node;
mod openfiles;
pub mod peers;
pub mod reconcile;
mod shares;
mod sinks;
pub mod stats;
mod status;
pub mod statuspage;
pub mod tables;
pub mod tls;
mod webconfig;
mod wire;

pub use error::Error;
