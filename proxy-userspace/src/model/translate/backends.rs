//! Which endpoints become backends of a frontend (readiness, terminating, topology).

use std::{cmp::Ordering, net::IpAddr};

use super::{
    services::ParsedPort,
    slices::{Hint, ParsedEndpoint, ServiceEndpoints},
};
use crate::model::types::{BackendAddr, IpFamily, Reason};

/// One endpoint resolved to a concrete backend port.
pub(super) struct PortEndpoint {
    pub(super) addr: IpAddr,
    pub(super) port: u16,
    pub(super) ep: ParsedEndpoint,
    /// Endpoints this address stands for (Maglev's weight): how many entries of one slice
    /// name it as well as the merged copy does, the most of any slice (see
    /// `endpoints_for_port`). At least 1.
    pub(super) count: u32,
}

impl PortEndpoint {
    pub(super) fn backend(&self, terminating: bool) -> BackendAddr {
        BackendAddr { addr: self.addr, port: self.port, local: self.ep.local, terminating }
    }
}

/// Endpoints of `port` from the slices of `family`: the slice port with the same name and
/// protocol gives the backend port; duplicates (same IP:port, e.g. while moving between
/// slices) merge.
///
/// Each merged address also counts the endpoints it stands for, Maglev's weight: entries
/// of one slice repeating an address are distinct endpoints (a slice controller never lists
/// one pod twice; hand-made slices repeat an address to weight it), while the same address
/// in two slices is most often one endpoint moving between them, so the count is the most
/// any one slice holds of the preferred kind (ready before terminating, as the merge).
pub(super) fn endpoints_for_port(group: &ServiceEndpoints, port: &ParsedPort, family: IpFamily) -> Vec<PortEndpoint> {
    // Sorted vectors folded run by run rather than maps: a port has a handful of endpoints,
    // and two B-trees per port were a tenth of a cold translation. The sorts are stable, so
    // each run keeps the order the maps saw its entries in (slice order, then entry order).
    let mut merged: Vec<PortEndpoint> = Vec::new();
    for slice in group.slices.iter().filter(|s| s.family == family) {
        let matching = slice.ports.iter().filter(|sp| sp.name == port.name && sp.proto == port.proto);
        for slice_port in matching {
            let mut here: Vec<&ParsedEndpoint> = slice.endpoints.iter().collect();
            here.sort_by_key(|ep| ep.addr);
            // This slice's best copy of each address and how many entries are that good.
            for run in here.chunk_by(|a, b| a.addr == b.addr) {
                let (mut best, mut count) = (run[0], 1);
                for ep in &run[1..] {
                    match preference(ep).cmp(&preference(best)) {
                        Ordering::Greater => (best, count) = (ep, 1),
                        Ordering::Equal => count += 1,
                        Ordering::Less => {}
                    }
                }
                merged.push(PortEndpoint { addr: best.addr, port: slice_port.port, ep: *best, count });
            }
        }
    }
    merged.sort_by_key(|e| (e.addr, e.port));
    let mut out: Vec<PortEndpoint> = Vec::with_capacity(merged.len());
    for e in merged {
        match out.last_mut() {
            // Upstream prefers the non-terminating copy (an IP reused by a new pod before
            // the old one is gone); ranking all flags keeps it order-independent.
            Some(best) if (best.addr, best.port) == (e.addr, e.port) => {
                match preference(&e.ep).cmp(&preference(&best.ep)) {
                    Ordering::Greater => *best = e,
                    Ordering::Equal => best.count = best.count.max(e.count),
                    Ordering::Less => {}
                }
            }
            _ => out.push(e),
        }
    }
    out
}

pub(super) fn preference(ep: &ParsedEndpoint) -> (bool, bool, bool, bool) {
    (!ep.terminating, ep.ready, ep.serving, ep.local)
}

/// Topology-aware routing for cluster-policy traffic, as upstream's `topologyModeFromHints`
/// (pkg/proxy/topology.go) decides it from the ready endpoints' hints: same node when every
/// ready endpoint has node hints and one is for this node (trafficDistribution
/// PreferSameNode); otherwise same zone when every ready endpoint has zone hints and one is
/// for this node's zone (PreferSameZone / PreferClose, topology-mode Auto); otherwise none.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Topology {
    Any,
    SameNode,
    SameZone,
}

pub(super) fn topology_mode<'a>(endpoints: impl Iterator<Item = &'a PortEndpoint>) -> Topology {
    let (mut all_node, mut node_here, mut all_zone, mut zone_here) = (true, false, true, false);
    for e in endpoints.filter(|e| e.ep.ready) {
        all_node &= e.ep.node_hint != Hint::Absent;
        node_here |= e.ep.node_hint == Hint::Here;
        all_zone &= e.ep.zone_hint != Hint::Absent;
        zone_here |= e.ep.zone_hint == Hint::Here;
    }
    if all_node && node_here {
        Topology::SameNode
    } else if all_zone && zone_here {
        Topology::SameZone
    } else {
        Topology::Any
    }
}

impl Topology {
    pub(super) fn describe(self) -> &'static str {
        match self {
            Topology::Any => "all endpoints",
            Topology::SameNode => "this node's endpoints (node hints)",
            Topology::SameZone => "this zone's endpoints (zone hints)",
        }
    }

    pub(super) fn allows(self, ep: &ParsedEndpoint) -> bool {
        match self {
            Topology::Any => true,
            Topology::SameNode => ep.node_hint == Hint::Here,
            Topology::SameZone => ep.zone_hint == Hint::Here,
        }
    }
}

/// kube-proxy's choice for one endpoint among a set: the ready ones (that `topology`
/// allows), or — when none is (`ready_in_use` false) — the ones still serving while
/// terminating, so connections drain instead of being dropped (topology no longer matters
/// then, as upstream: a mode is only chosen when a ready endpoint fits it). The one place
/// this rule is written: `select_backends` picks with it, `explain` reports it.
pub(super) fn choose(ep: &ParsedEndpoint, topology: Topology, ready_in_use: bool) -> Reason {
    if !ready_in_use {
        return if ep.serving && ep.terminating { Reason::TerminatingFallback } else { Reason::NotReady };
    }
    if !ep.ready {
        return if ep.terminating { Reason::Terminating } else { Reason::NotReady };
    }
    match topology {
        Topology::SameNode if ep.node_hint != Hint::Here => Reason::OtherNodeByHints,
        Topology::SameZone if ep.zone_hint != Hint::Here => Reason::OtherZoneByHints,
        _ => Reason::Backend,
    }
}

pub(super) fn ready_in_use<'a>(mut endpoints: impl Iterator<Item = &'a PortEndpoint>, topology: Topology) -> bool {
    endpoints.any(|e| e.ep.ready && topology.allows(&e.ep))
}

/// The backends among `endpoints` (see `choose`).
pub(super) fn select_backends<'a>(
    endpoints: impl Iterator<Item = &'a PortEndpoint> + Clone,
    topology: Topology,
) -> Vec<BackendAddr> {
    let in_use = ready_in_use(endpoints.clone(), topology);
    let mut chosen: Vec<BackendAddr> = endpoints
        .filter_map(|e| match choose(&e.ep, topology, in_use) {
            Reason::Backend => Some(e.backend(false)),
            Reason::TerminatingFallback => Some(e.backend(true)),
            _ => None,
        })
        .collect();
    chosen.sort();
    chosen.dedup();
    chosen
}
