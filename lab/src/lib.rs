//! Sluice's lab (`sluice-lab`, also run as `sluice lab`): a whole deployment in network
//! namespaces on one host — for demos, training, end-to-end tests and benchmarks. Its own
//! crate, so that the production `sluice` binary carries no load generator, SYN flooder or
//! fault injector.
//!
//! - `netns.rs`: the namespace primitives everything here is built from;
//! - `topo.rs`: the lab's topology ([`Lab`]); `l2lab.rs`: the tests' small `l2dsr` deployment;
//! - `probe.rs`: clients that probe the VIP and record each connection's fate;
//!   `report.rs`: the end state (the daemon's view, the pinned maps) and the checks;
//! - the scenarios: `incident.rs`, `chaos.rs`, `flood.rs`, `cluster.rs`, `limits.rs`; `load.rs`
//!   (`sluice lab load`), `serve.rs` (the backends' HTTP server), `plot.rs`; `cli.rs`;
//! - `drill/`: `sluice lab drill`, training — one fault, only what users report, a score.
//!
//! ```text
//!   client 1..C ─┐                      ┌─ backend 1..N  (VIP on lo; `l2dsr`: replies
//!   (cl0)        ├── switch (bridge) ───┤   straight to the client; `ipip`: `sluice decap`)
//!   lb (lb0) ────┘   sw-* ports         └─ …
//! ```
//!
//! Addresses come from the benchmarking range 198.18.0.0/15 and the documentation prefix
//! 2001:db8::/32; only the lab's own namespaces are touched (every link lives in one of them,
//! so deleting the namespaces deletes the links). The switch port facing the load balancer runs
//! `sluice decap` as a pass-through XDP program: on these kernels a frame sent with `XDP_TX`
//! into a veth is delivered only if the peer has an XDP program.

pub mod chaos;
pub mod cli;
pub mod cluster;
pub mod drill;
pub mod flood;
pub mod incident;
pub mod l2lab;
pub mod limits;
pub mod load;
pub mod netns;
pub mod pki;
pub mod plot;
pub mod probe;
pub mod report;
pub mod serve;
pub mod topo;

pub use topo::{cleanup as topo_cleanup, Lab, Spec};

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// The `sluice` binary the lab runs (the daemon, `sluice decap`): `$SLUICE_BIN` (`sluice lab`
/// and `cargo xtask test` set it), else the one beside this executable, else the workspace's
/// debug build.
pub fn sluice_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        return p.into();
    }
    let beside = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("sluice"))).filter(|p| p.exists());
    beside.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sluice"))
}

static NEXT_PIN: AtomicU32 = AtomicU32::new(0);

/// A private pin directory under /sys/fs/bpf; removed (with its pins) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new() -> Self {
        let p = PathBuf::from(format!("/sys/fs/bpf/sluice-test-{}-{}", std::process::id(), NEXT_PIN.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sets the flag however a scope is left (an early `?` included), so that the threads watching
/// it stop and the scope does not wait for them for ever.
pub(crate) struct SetOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The link all namespaces share.
pub const NET4: &str = "198.18.0.0/24";
pub const LB4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 100);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 0x100);
/// The service port of the lab's HTTP backends.
pub const PORT: u16 = 80;
/// Most clients and backends a lab can have (addresses are .2–.9 and .11–.60).
pub const MAX_CLIENTS: u8 = 8;
pub const MAX_BACKENDS: u8 = 50;

/// Backend `n` (1-based).
pub fn backend4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + n)
}
pub fn backend6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 0x10 + u16::from(n))
}
/// Client `n` (1-based).
pub fn client4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 1 + n)
}
pub fn client6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1 + u16::from(n))
}

/// The VIP of the family asked for.
pub fn vip(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(VIP6)
    } else {
        IpAddr::V4(VIP4)
    }
}

/// Lifts the soft open-files limit to the hard one: a lab holds thousands of connections.
pub fn raise_nofile() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r);
        }
    }
}
