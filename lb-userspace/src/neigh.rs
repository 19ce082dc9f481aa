//! Backend MAC addresses for `l2dsr`, from the kernel's neighbour table over netlink
//! (rtnetlink). A backend without an entry is poked with one UDP datagram to its discard port
//! so the kernel resolves it (ARP / neighbour discovery), then the table is read again.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use futures::TryStreamExt as _;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};

use crate::Error;

/// The current neighbour table: IP → MAC, for usable entries.
pub async fn table() -> Result<HashMap<IpAddr, [u8; 6]>, Error> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| Error::other("opening a netlink socket", e))?;
    let task = tokio::spawn(conn);
    let mut out = HashMap::new();
    let mut stream = handle.neighbours().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(|e| Error::other("reading the neighbour table", e))? {
        if matches!(msg.header.state, NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None) {
            continue;
        }
        let mut ip = None;
        let mut mac = None;
        for a in &msg.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(IpAddr::V4(*v)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => ip = Some(IpAddr::V6(*v)),
                NeighbourAttribute::LinkLocalAddress(l) if l.len() == 6 => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            out.insert(ip, mac);
        }
    }
    task.abort();
    Ok(out)
}

/// MACs of `addrs`, resolving missing ones for up to `wait`.
pub async fn resolve(addrs: &[IpAddr], wait: Duration) -> Result<HashMap<IpAddr, [u8; 6]>, Error> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let t = table().await?;
        let missing: Vec<IpAddr> = addrs.iter().copied().filter(|a| !t.contains_key(a)).collect();
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(t);
        }
        for a in missing {
            let bind: SocketAddr = if a.is_ipv4() { "0.0.0.0:0".parse().expect("addr") } else { "[::]:0".parse().expect("addr") };
            if let Ok(s) = UdpSocket::bind(bind) {
                let _ = s.send_to(b"sluice: resolving", SocketAddr::new(a, 9));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
