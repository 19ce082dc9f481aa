//! `explain`: which backend a flow goes to (or would go to), and whether it would be admitted
//! or refused and why — computed with the datapath's own hash, rings, probe sequence, backend
//! states and counters.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use lb_common::{flow_hash, probe_slot, FlowKey, Reason};
use serde::Serialize;

use crate::{
    config::Proto,
    maglev,
    reconcile::{addr16, ip_of, service_key, state_name, Applied},
    tables::TablesRead,
    Error,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Candidate {
    pub backend: IpAddr,
    pub backend_id: u32,
    pub state: Cow<'static, str>,
    pub open: u64,
    pub max_conns: u32,
    /// Why it would refuse a new flow now (the datapath's model, `lb_common::backend_admits`),
    /// or nothing if it would take it.
    pub refuses: Option<Cow<'static, str>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    /// Not addressed to a service: passed to the kernel.
    NotService,
    /// A flow exists: its packets go to this backend, whatever the limits.
    ExistingFlow { backend: IpAddr, state: u8 },
    /// A new flow would be admitted to this backend.
    Admitted { backend: IpAddr, spilled: bool },
    /// A new flow would be refused.
    Refused { reason: Cow<'static, str>, backend: Option<IpAddr> },
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Explanation {
    pub service: Option<String>,
    pub hash: u32,
    pub ring_slot: Option<u32>,
    /// The probe sequence's distinct backends, in order, with their state and load.
    pub candidates: Vec<Candidate>,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// One sentence for an operator.
    pub summary: String,
}

pub fn flow_key(src: SocketAddr, dst: SocketAddr, proto: Proto) -> FlowKey {
    FlowKey { src: addr16(src.ip()).0, dst: addr16(dst.ip()).0, sport_be: src.port().to_be_bytes(), dport_be: dst.port().to_be_bytes(), proto: proto as u8, ..FlowKey::default() }
}

/// Explains the flow `src → dst` over `proto`.
pub fn explain(applied: &Applied, t: &TablesRead<'_>, src: SocketAddr, dst: SocketAddr, proto: Proto) -> Result<Explanation, Error> {
    let key = flow_key(src, dst, proto);
    let hash = flow_hash(&key);
    let skey = service_key(dst.ip(), dst.port(), proto);
    let flow = t.flow(&key)?;
    let Some(svc) = applied.services.values().find(|s| service_key(s.cfg.vip, s.cfg.port, s.cfg.proto) == skey) else {
        // The datapath looks a flow up before its service: a connection outlives its service.
        if let Some(flow) = flow {
            let addr = ip_of(&t.backend(flow.backend_id)?);
            return Ok(Explanation {
                service: None,
                hash,
                ring_slot: None,
                candidates: Vec::new(),
                summary: format!("an existing flow of a service no longer configured: its packets still go to backend {addr} (draining) until it closes or idles out"),
                verdict: Verdict::ExistingFlow { backend: addr, state: flow.state },
            });
        }
        return Ok(Explanation {
            service: None,
            hash,
            ring_slot: None,
            candidates: Vec::new(),
            summary: format!("{dst} {proto:?} is not a service of this load balancer: passed to the kernel").to_lowercase(),
            verdict: Verdict::NotService,
        });
    };
    let by_id = |id: u32| svc.backends.values().find(|b| b.id == id);
    let (mut candidates, mut refusing) = (Vec::new(), Vec::new());
    for id in maglev::candidates(&svc.ring, &key, svc.cfg.overflow.spill.candidates()) {
        let Some(b) = by_id(id) else { continue };
        let datapath = t.backend(id)?;
        let open = t.conns(id)?;
        let refuses = lb_common::backend_admits(&datapath, open).err();
        refusing.push(refuses);
        candidates.push(Candidate {
            backend: b.address,
            backend_id: id,
            state: state_name(datapath.state).into(),
            open,
            max_conns: datapath.max_conns,
            refuses: refuses.map(|r| r.name().into()),
        });
    }
    let ring_slot = (!svc.ring.is_empty()).then(|| probe_slot(hash, 0, svc.ring.len() as u32));
    let name = svc.name.clone();
    let (verdict, summary) = if let Some(flow) = flow {
        let addr = svc.backends.values().find(|b| b.id == flow.backend_id).map_or_else(|| IpAddr::from([0, 0, 0, 0]), |b| b.address);
        (Verdict::ExistingFlow { backend: addr, state: flow.state }, format!("an existing flow of service \"{name}\": its packets go to backend {addr}, limits do not apply to it"))
    } else if candidates.is_empty() {
        (Verdict::Refused { reason: "no_backend".into(), backend: None }, format!("service \"{name}\" has no backend in its ring: a new connection would be refused (no_backend)"))
    } else if let Some(i) = refusing.iter().position(Option::is_none) {
        let c = &candidates[i];
        let spilled = i > 0;
        let how = if spilled { format!(" (spilled: {} cannot take it)", candidates[0].backend) } else { String::new() };
        (
            Verdict::Admitted { backend: c.backend, spilled },
            format!("a new connection would be admitted to backend {}{how}: {} of max_conns = {} open", c.backend, c.open, c.max_conns),
        )
    } else {
        let first = &candidates[0];
        // As the datapath decides (lb-ebpf/src/admission.rs): a spill that found a candidate
        // short only of this node's share is share_exhausted, demand for more share.
        let spill = svc.cfg.overflow.spill.candidates() > 0;
        let short_of_share = refusing.contains(&Some(Reason::ShareExhausted));
        let reason = match (spill, short_of_share) {
            (true, true) => Reason::ShareExhausted,
            (true, false) => Reason::ServiceSaturated,
            (false, _) => refusing[0].unwrap_or(Reason::BackendLimit),
        };
        let why = match reason {
            Reason::ServiceSaturated => format!("every candidate ({}) is full, draining or down", candidates.iter().map(|c| c.backend.to_string()).collect::<Vec<_>>().join(", ")),
            Reason::BackendDraining => format!("backend {} is draining", first.backend),
            Reason::BackendDown => format!("backend {} is down", first.backend),
            Reason::ShareExhausted if spill => format!(
                "every candidate ({}) is at this node's share of its cluster-wide limit, and the cluster has room: the allocator grants more share to a node that refuses (`sluice cluster status`)",
                candidates.iter().map(|c| format!("{} {} open", c.backend, c.open)).collect::<Vec<_>>().join(", ")
            ),
            Reason::ShareExhausted => format!(
                "backend {} has {} open connections, this node's share of the cluster-wide limit (service \"{name}\" backend {} max_conns, `sluice cluster status`)",
                first.backend, first.open, first.backend
            ),
            _ => format!("backend {} has {} open connections, its limit: service \"{name}\" backend {} max_conns = {}", first.backend, first.open, first.backend, first.max_conns),
        };
        let reason = reason.name();
        (Verdict::Refused { reason: reason.into(), backend: Some(first.backend) }, format!("a new connection would be REFUSED by the load balancer ({reason}): {why}"))
    };
    Ok(Explanation { service: Some(name), hash, ring_slot, candidates, verdict, summary })
}
