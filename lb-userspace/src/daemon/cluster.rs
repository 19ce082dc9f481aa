//! This node's part in a cluster (`[cluster]`): what it announces through BIRD, its drain, the
//! peer channel and the cluster-wide limits' status, as the daemon keeps them.

use std::{
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tokio::sync::mpsc;

use crate::{
    config,
    status::{
        announce::{self, drained_marker},
        limits, peers,
    },
    Error,
};

use super::State;

/// A cluster node's announcement state, kept by the daemon; `announce.rs` keeps BIRD in step.
pub struct Cluster {
    pub(super) cfg: config::ClusterCfg,
    pub(super) status: Arc<Mutex<announce::Status>>,
    /// Withdrawn on purpose (`sluice node drain`); kept across restarts by a marker file.
    pub(super) drained: bool,
    /// Withdrawn because this node cannot coordinate its share of the cluster-wide limits
    /// while its peers can (`limits.rs`); announced again once it is granted shares.
    pub(super) fenced: bool,
    /// This node's last round on etcd succeeded: told to the peers, who fence without it.
    pub(super) etcd_ok: Arc<std::sync::atomic::AtomicBool>,
    pub(super) wanted: tokio::sync::watch::Sender<std::collections::BTreeSet<IpAddr>>,
    pub(super) wanted_rx: Option<tokio::sync::watch::Receiver<std::collections::BTreeSet<IpAddr>>>,
    /// The peer channel, with `cluster.peers` or `cluster.peer_listen`.
    pub(super) peers: Option<Peers>,
    /// Cluster-wide limits through etcd, with `[cluster.limits]` (`limits.rs`).
    pub(super) limits: Option<Arc<Mutex<limits::Status>>>,
}

/// This node's side of the peer channel (`peers.rs`).
pub struct Peers {
    pub(super) stats: Arc<Mutex<peers::Stats>>,
    pub(super) tx: mpsc::UnboundedSender<peers::Batch>,
    pub(super) rx: Option<mpsc::UnboundedReceiver<peers::Batch>>,
}

impl Cluster {
    /// This node's name (`cluster.node`).
    pub fn node(&self) -> &str {
        &self.cfg.node
    }
    /// What it announces, as the announcer last reported.
    pub fn status(&self) -> announce::Status {
        self.status.lock().expect("status").clone()
    }
    /// The peer channel's counts, with `cluster.peers` or `cluster.peer_listen`.
    pub fn peer_stats(&self) -> Option<peers::Stats> {
        self.peers.as_ref().map(|p| p.stats.lock().expect("stats").clone())
    }
    /// The cluster-wide limits' status, with `[cluster.limits]`.
    pub fn limits(&self) -> Option<limits::Status> {
        self.limits.as_ref().map(|l| l.lock().expect("limits status").clone())
    }
}

/// The cluster state from `[cluster]`: its directory made, a drain kept from before.
pub(super) fn cluster(cfg: &config::Config) -> Result<Option<Cluster>, Error> {
    let Some(c) = &cfg.cluster else { return Ok(None) };
    // 0755 and files 0644: BIRD runs as its own user and reads them.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&c.announce_dir)
        .map_err(|e| Error::other(format!("creating {} (cluster.announce_dir)", c.announce_dir.display()), e))?;
    // BIRD refuses a config whose included files are missing: make them (empty) before this
    // daemon serves, so BIRD may start any time after it.
    for f in <[PathBuf; 2]>::from(announce::files(&c.announce_dir)) {
        if !f.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&f)
                .map_err(|e| Error::other(format!("creating {} (cluster.announce_dir)", f.display()), e))?;
        }
    }
    let drained = drained_marker(&c.announce_dir).exists();
    if drained {
        tracing::warn!(node = %c.node, "this node was drained (`sluice node drain`) and stays so until `sluice node undrain`");
    }
    let (wanted, wanted_rx) = tokio::sync::watch::channel(Default::default());
    let status = announce::Status { node: c.node.clone(), drained, ..Default::default() };
    let peers = match () {
        () if (c.peer_key_file.is_some() || c.tls.is_some()) && (!c.peers.is_empty() || c.peer_listen.is_some()) => {
            let (tx, rx) = mpsc::unbounded_channel();
            // From 0: the first report holds every adopted flow in the table, those the datapath
            // adopted while no daemon ran (a restart, an upgrade) included; peers ignore the
            // ones they do not hold.
            Some(Peers { stats: Arc::default(), tx, rx: Some(rx) })
        }
        () => None,
    };
    let limits = c.limits.as_ref().map(|l| {
        Arc::new(Mutex::new(limits::Status { node: c.node.clone(), etcd: l.etcd.clone(), prefix: l.prefix.clone(), lease_ttl_s: l.lease_ttl.as_secs(), ..Default::default() }))
    });
    Ok(Some(Cluster { cfg: c.clone(), status: Arc::new(Mutex::new(status)), drained, fenced: false, etcd_ok: Arc::default(), wanted, wanted_rx: Some(wanted_rx), peers, limits }))
}

impl State {
    /// Tells the announcer which VIPs this node should announce now.
    pub(super) fn publish_wanted(&mut self) {
        let servable = self.applied.servable();
        if let Some(c) = &mut self.cluster {
            let wanted = if c.drained || c.fenced { Default::default() } else { servable };
            {
                let mut s = c.status.lock().expect("status");
                s.wanted.clone_from(&wanted);
                s.drained = c.drained;
                s.fenced = c.fenced;
            }
            c.wanted.send_if_modified(|w| {
                let changed = *w != wanted;
                *w = wanted;
                changed
            });
        }
    }

    /// Fences (true) this node out of the cluster or lets it back: withdraws or announces its
    /// VIPs (a drain stays a drain either way).
    pub(super) fn set_fenced(&mut self, fenced: bool, why: &str) {
        let Some(c) = self.cluster.as_mut() else { return };
        if c.fenced == fenced {
            return;
        }
        c.fenced = fenced;
        let node = c.cfg.node.clone();
        let what = if fenced { "fenced: withdrawing its VIPs" } else { "no longer fenced: announcing its VIPs again" };
        tracing::warn!(node = %node, "node {what}: {why}");
        self.journal.record("cluster", format!("node \"{node}\" {what}"), vec![why.to_owned()]);
        self.publish_wanted();
    }

    /// Drains (true) or undrains this node: withdraws or announces its VIPs.
    pub(super) fn set_drained(&mut self, drained: bool) -> Result<(), Error> {
        let c = self
            .cluster
            .as_mut()
            .ok_or_else(|| Error::other("node drain", anyhow::anyhow!("this daemon has no [cluster] section: a single node announces nothing to withdraw")))?;
        let marker = drained_marker(&c.cfg.announce_dir);
        let written = if drained {
            std::fs::write(&marker, b"drained by `sluice node drain`\n")
        } else {
            std::fs::remove_file(&marker).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        };
        written.map_err(|e| Error::other(format!("recording the drain in {}", marker.display()), e))?;
        c.drained = drained;
        let node = c.cfg.node.clone();
        let what = if drained { "drained: withdrawing its VIPs, forwarding what still arrives" } else { "undrained: announcing its VIPs again" };
        tracing::warn!(node = %node, "node {what}");
        self.journal.record("cluster", format!("node \"{node}\" {what}"), vec![]);
        self.publish_wanted();
        Ok(())
    }
}
