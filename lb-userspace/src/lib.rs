//! Sluice's userspace: loading and pinning the XDP datapath, reading its counters, and the
//! `sluice` command line. `main.rs` is a thin wrapper over [`cli::main`].

// The flow table's lock-free protocol (lb-ebpf/src/flow.rs, flowtab.rs) relies on x86-64's
// ordering of stores with stores and loads with loads; other architectures need barriers.
#[cfg(not(target_arch = "x86_64"))]
compile_error!("Sluice's datapath is written for x86-64 memory ordering (see docs/ARCHITECTURE.md, \"The flow table\")");

pub mod alerts;
pub mod announce;
pub mod api;
pub mod cfgfile;
pub mod cli;
pub mod client;
pub mod config;
pub mod conns;
pub mod daemon;
pub mod datapath;
pub mod error;
pub mod events;
pub mod explain;
pub mod flowtab;
pub mod gc;
pub mod guard;
pub mod health;
pub mod history;
pub mod journal;
pub mod limits;
pub mod listen;
pub mod maglev;
pub mod metrics;
pub mod neigh;
pub mod node;
pub mod openfiles;
pub mod peers;
pub mod reconcile;
pub mod shares;
pub mod sinks;
pub mod stats;
pub mod status;
pub mod statuspage;
pub mod tables;
pub mod tls;
pub mod webconfig;
pub mod wire;

pub use error::Error;
