//! Announcing this node's VIPs through BIRD (a cluster behind a router's ECMP).
//!
//! A VIP is announced while this node can serve it: the datapath attached, the config applied
//! (the daemon runs only then), a service on that VIP with an active backend, and the node not
//! drained. The daemon never speaks BGP: it writes the VIPs as `route VIP/32 blackhole;` lines
//! into two files (`vips4.conf`, `vips6.conf` in `cluster.announce_dir`) that the node's BIRD
//! config includes in a static protocol exported over BGP, then asks BIRD to `configure` over its
//! control socket. BIRD applies the difference (adds or withdraws those routes) without touching
//! its sessions.
//!
//! A task of its own does it, so a dead or refusing BIRD never blocks the daemon: it retries every
//! second, the datapath keeps forwarding, and the alert `SluiceNotAnnouncing` fires while a VIP
//! that should be announced is not. A daemon that stops leaves the files and BIRD as they are: a
//! restart or upgrade withdraws nothing (the pinned datapath keeps forwarding meanwhile).

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use crate::status::announce::{files, Status};
use crate::{cfgfile::Staged, config::ClusterCfg, daemon::Daemon};

fn render(vips: &BTreeSet<IpAddr>, v4: bool, node: &str) -> String {
    let mut t = format!("# Written by the sluice daemon on node \"{node}\": the VIPs it can serve now. Do not edit.\n");
    for vip in vips.iter().filter(|v| v.is_ipv4() == v4) {
        let len = if v4 { 32 } else { 128 };
        t.push_str(&format!("route {vip}/{len} blackhole;\n"));
    }
    t
}

/// The VIPs the files name (what a previous daemon left in BIRD).
fn read_files(dir: &Path) -> BTreeSet<IpAddr> {
    let (f4, f6) = files(dir);
    [f4, f6]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().filter_map(|l| l.trim().strip_prefix("route ").and_then(|r| r.split('/').next()).and_then(|ip| ip.parse().ok())).collect::<Vec<IpAddr>>())
        .collect()
}

/// Writes the files and has BIRD reconfigure.
async fn push(cfg: &ClusterCfg, vips: &BTreeSet<IpAddr>) -> Result<(), String> {
    let (f4, f6) = files(&cfg.announce_dir);
    for (f, v4) in [(&f4, true), (&f6, false)] {
        let staged = Staged::write(f, &render(vips, v4, &cfg.node)).map_err(|e| format!("writing {}: {e}", f.display()))?;
        staged.commit().map_err(|e| format!("writing {}: {e}", f.display()))?;
    }
    configure(&cfg.bird_socket).await
}

/// `configure` on BIRD's control socket: BIRD re-reads its config (with the files included).
pub async fn configure(socket: &Path) -> Result<(), String> {
    use birdc::Message;
    let fail = |what: String| format!("BIRD control socket {} (cluster.bird_socket), command `configure`: {what}", socket.display());
    let exchange = async {
        let mut conn = birdc::Client::for_unix_socket(socket).connect().await.map_err(|e| fail(format!("cannot connect: {e} (is BIRD running?)")))?;
        conn.send_request("configure").await.map_err(|e| fail(e.to_string()))
    };
    let messages = tokio::time::timeout(Duration::from_secs(5), exchange).await.map_err(|_| fail("no answer within 5 s".into()))??;
    let ok = messages.iter().any(|m| {
        matches!(
            m,
            Message::Reconfigured(_) | Message::ReconfigurationInProgress(_) | Message::ReconfigurationQueued(_) | Message::ReconfigurationConfirmed(_) | Message::NothingToDo(_)
        )
    });
    if ok {
        Ok(())
    } else {
        Err(fail(format!("refused: {messages:?}")))
    }
}

/// Starts the announcer. `wanted` carries the VIPs to announce; the task keeps BIRD in step.
pub fn spawn(cfg: ClusterCfg, daemon: Daemon, status: Arc<Mutex<Status>>, mut wanted: watch::Receiver<BTreeSet<IpAddr>>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut in_bird = read_files(&cfg.announce_dir);
        status.lock().expect("status").announced.clone_from(&in_bird);
        let mut last_error: Option<String> = None;
        // Once at start whatever the files say: a `configure` a previous daemon saw fail may
        // have left them ahead of BIRD. With unchanged files BIRD changes nothing (no withdraw).
        let mut force = true;
        loop {
            let want = wanted.borrow_and_update().clone();
            if want == in_bird && !force {
                let mut s = status.lock().expect("status");
                s.error = None;
                s.behind_since = None;
            } else {
                match push(&cfg, &want).await {
                    Ok(()) => {
                        for vip in want.difference(&in_bird) {
                            tracing::info!(vip = %vip, node = %cfg.node, "announced VIP {vip} through BIRD");
                            daemon.journal("cluster", format!("node \"{}\" announced VIP {vip}", cfg.node), vec![]);
                        }
                        for vip in in_bird.difference(&want) {
                            tracing::warn!(vip = %vip, node = %cfg.node, "withdrew VIP {vip} through BIRD");
                            daemon.journal("cluster", format!("node \"{}\" withdrew VIP {vip}", cfg.node), vec![]);
                        }
                        in_bird.clone_from(&want);
                        force = false;
                        let mut s = status.lock().expect("status");
                        s.announced.clone_from(&want);
                        s.error = None;
                        s.behind_since = None;
                        last_error = None;
                    }
                    Err(e) => {
                        if last_error.as_ref() != Some(&e) {
                            tracing::error!("announcing through BIRD failed (the datapath keeps forwarding; retrying every second): {e}");
                            daemon.journal("cluster", format!("node \"{}\": BIRD did not take the VIPs", cfg.node), vec![e.clone()]);
                        }
                        let mut s = status.lock().expect("status");
                        s.error = Some(e.clone());
                        s.behind_since.get_or_insert_with(Instant::now);
                        last_error = Some(e);
                        // The files may already say `want` while BIRD still has `in_bird` (or,
                        // restarted, reads the files): push again even if `want` returns to
                        // what BIRD last took.
                        force = true;
                    }
                }
            }
            let retry = want != in_bird || force;
            tokio::select! {
                () = stop.cancelled() => break,
                r = wanted.changed() => if r.is_err() { break },
                () = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
            }
        }
    })
}

impl Status {
    /// One line for `sluice status`.
    pub fn line(&self) -> String {
        let list = |s: &BTreeSet<IpAddr>| if s.is_empty() { "none".to_owned() } else { s.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ") };
        let mut t = format!("node \"{}\"{}: announcing {}", self.node, if self.drained { " (DRAINED)" } else { "" }, list(&self.announced));
        if self.wanted != self.announced {
            t.push_str(&format!("; should announce {}", list(&self.wanted)));
        }
        if let Some(e) = &self.error {
            t.push_str(&format!("; BIRD: {e}"));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip() {
        let dir = std::env::temp_dir().join(format!("sluice-announce-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let vips: BTreeSet<IpAddr> = ["198.19.0.100", "2001:db8::100"].iter().map(|s| s.parse().expect("ip")).collect();
        let (f4, f6) = files(&dir);
        std::fs::write(&f4, render(&vips, true, "n1")).expect("write");
        std::fs::write(&f6, render(&vips, false, "n1")).expect("write");
        assert!(std::fs::read_to_string(&f4).expect("read").contains("route 198.19.0.100/32 blackhole;"));
        assert!(std::fs::read_to_string(&f6).expect("read").contains("route 2001:db8::100/128 blackhole;"));
        assert_eq!(read_files(&dir), vips);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
