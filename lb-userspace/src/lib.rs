//! Sluice's userspace: loading and pinning the XDP datapath, reading its counters, and the
//! `sluice` command line. `main.rs` is a thin wrapper over [`cli::main`].

pub mod alerts;
pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod conns;
pub mod datapath;
pub mod error;
pub mod events;
pub mod explain;
pub mod flowtab;
pub mod gc;
pub mod health;
pub mod journal;
pub mod lab;
pub mod maglev;
pub mod metrics;
pub mod neigh;
pub mod reconcile;
pub mod sinks;
pub mod stats;
pub mod tables;

pub use error::Error;
