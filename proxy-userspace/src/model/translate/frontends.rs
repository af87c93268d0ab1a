//! Frontends: each Service port expanded into candidate frontends, and the claims that
//! resolve two Services asking for one address.

use std::{net::IpAddr, sync::Arc};

use super::{
    backends::{PortEndpoint, Topology, endpoints_for_port, select_backends, topology_mode},
    problems::{ObjectId, Problem, push_unique},
    services::{ParsedPort, ParsedService, ServiceType},
    slices::ServiceEndpoints,
};
use crate::model::types::{
    BackendAddr, BackendWeight, FrontendEntry, FrontendKind, IpFamily, IpPrefix, NodeInfo, Protocol, ServicePortName,
};

/// One frontend address of one service port, with its entry for each scope it is served in.
pub(super) struct Candidate {
    pub(super) addr: IpAddr,
    pub(super) port: u16,
    pub(super) proto: Protocol,
    pub(super) kind: FrontendKind,
    /// Shared with the desired state while this candidate wins its address.
    pub(super) internal: Arc<FrontendEntry>,
    pub(super) external: Option<Arc<FrontendEntry>>,
}

pub(super) fn expand_service(
    id: &ObjectId,
    svc: &ParsedService,
    endpoints: Option<&ServiceEndpoints>,
    node: &NodeInfo,
) -> Vec<Candidate> {
    let mut out = Vec::new();
    for port in &svc.ports {
        // One pass per family the Service has a clusterIP of, as upstream's per-family
        // proxiers: each sees only its family's endpoints, addresses and source ranges.
        for &family in &svc.families {
            expand_port(id, svc, port, family, endpoints, node, &mut out);
        }
    }
    // Kept until the Service or its slices change: no room to grow (a Vec's first push
    // makes room for four candidates, most Services have one).
    out.shrink_to_fit();
    out
}

pub(super) fn expand_port(
    id: &ObjectId,
    svc: &ParsedService,
    port: &ParsedPort,
    family: IpFamily,
    endpoints: Option<&ServiceEndpoints>,
    node: &NodeInfo,
    out: &mut Vec<Candidate>,
) {
    let port_eps = endpoints.map(|g| endpoints_for_port(g, port, family)).unwrap_or_default();
    // Cluster policy follows the topology hints; Local policies ignore them, as
    // upstream's CategorizeEndpoints does, and redo the ready/terminating choice among
    // local endpoints only.
    let cluster = select_backends(port_eps.iter(), topology_mode(port_eps.iter()));
    let local = select_backends(port_eps.iter().filter(|e| e.ep.local), Topology::Any);

    let service = ServicePortName { service: id.clone(), port_name: port.name.clone() };
    // Kept until the Service or its slices change: `to_vec` leaves no room to grow.
    let entry = |kind, backends: &[BackendAddr], local_only, ranges: &[IpPrefix]| {
        Arc::new(FrontendEntry {
            service: service.clone(),
            kind,
            backends: backends.to_vec(),
            affinity_timeout: svc.affinity_timeout,
            lb_algorithm: svc.lb_algorithm,
            local_only,
            source_ranges: ranges.to_vec(),
            weights: weights(&port_eps, backends),
        })
    };
    let candidate = |kind, addr, port_number, internal, external| Candidate {
        addr,
        port: port_number,
        proto: port.proto,
        kind,
        internal,
        external,
    };

    // internalTrafficPolicy applies to the clusterIP only.
    let (internal_backends, internal_local) = if svc.internal_local { (&local, true) } else { (&cluster, false) };
    for &ip in svc.cluster_ips.iter().filter(|ip| IpFamily::of(**ip) == family) {
        let internal = entry(FrontendKind::ClusterIP, internal_backends, internal_local, &[]);
        out.push(candidate(FrontendKind::ClusterIP, ip, port.port, internal, None));
    }

    // A range of the other family never constrains this family's frontends: with only
    // ranges of the other family, this family's LB IPs are open (upstream's
    // `MapCIDRsByIPFamily` leaves the proxier no ranges, hence no firewall chain).
    let family_ranges: Vec<IpPrefix> = svc.source_ranges.iter().filter(|r| r.family() == family).copied().collect();
    // externalTrafficPolicy applies to traffic from outside; pods reaching an external
    // destination are short-circuited to all cluster endpoints, as upstream does.
    let (external_backends, external_local) = if svc.external_local { (&local, true) } else { (&cluster, false) };
    for (kind, addr, port_number) in external_destinations(svc, port, node, family) {
        let ranges: &[IpPrefix] = if kind == FrontendKind::LoadBalancer { &family_ranges } else { &[] };
        // loadBalancerSourceRanges apply to every source, pods included: upstream's
        // firewall chain drops a pod outside the ranges on its way to the LB IP (its
        // NodePort and ClusterIP stay open to it).
        let internal = entry(kind, &cluster, false, ranges);
        // NodePorts on loopback (`--nodeport-localhost`) are for node processes only, which
        // upstream sends to cluster endpoints whatever the policy: no external scope.
        let external = (!addr.is_loopback()).then(|| entry(kind, external_backends, external_local, ranges));
        out.push(candidate(kind, addr, port_number, internal, external));
    }
}

/// The weights of `backends` that stand for several endpoints of `port_eps` (sorted by
/// address and port, as `endpoints_for_port` returns them; so are `backends`).
fn weights(port_eps: &[PortEndpoint], backends: &[BackendAddr]) -> Vec<BackendWeight> {
    // Nearly always every endpoint stands for one: no weight to look up.
    if port_eps.iter().all(|e| e.count <= 1) {
        return Vec::new();
    }
    backends
        .iter()
        .filter_map(|b| {
            let i = port_eps.binary_search_by(|e| (e.addr, e.port).cmp(&(b.addr, b.port))).ok()?;
            let weight = port_eps[i].count;
            (weight > 1).then_some(BackendWeight { addr: b.addr, port: b.port, weight })
        })
        .collect()
}

/// NodePorts on the node's addresses, externalIPs, and load-balancer IPs of one port, in
/// `family`.
pub(super) fn external_destinations(
    svc: &ParsedService,
    port: &ParsedPort,
    node: &NodeInfo,
    family: IpFamily,
) -> Vec<(FrontendKind, IpAddr, u16)> {
    let of_family = |ip: &&IpAddr| IpFamily::of(**ip) == family;
    let mut out = Vec::new();
    let has_node_ports = matches!(svc.svc_type, ServiceType::NodePort | ServiceType::LoadBalancer);
    if let Some(node_port) = port.node_port.filter(|_| has_node_ports) {
        let mut addrs = Vec::new();
        for &addr in node.nodeport_addrs.iter().filter(of_family) {
            push_unique(&mut addrs, addr);
        }
        out.extend(addrs.into_iter().map(|a| (FrontendKind::NodePort, a, node_port)));
    }
    out.extend(svc.external_ips.iter().filter(of_family).map(|&ip| (FrontendKind::ExternalIP, ip, port.port)));
    out.extend(svc.lb_ips.iter().filter(of_family).map(|&ip| (FrontendKind::LoadBalancer, ip, port.port)));
    out
}

/// SCTP frontends whose packets would need a port rewritten (a backend port other than the
/// frontend's, or a source-NATed flow to a backend on another node): the datapath refuses
/// their new flows (`sctp_port_nat`), since SCTP's CRC32c covers the ports. One problem
/// naming them all, for the Service's warning.
pub(super) fn sctp_port_rewrites(candidates: &[Candidate]) -> Option<Problem> {
    let mut frontends = Vec::new();
    for c in candidates.iter().filter(|c| c.proto == Protocol::Sctp) {
        let entries = std::iter::once(&c.internal).chain(c.external.as_ref());
        let remapped = entries.clone().flat_map(|e| &e.backends).any(|b| b.port != c.port);
        let snat = c.external.as_ref().is_some_and(|e| !e.local_only && e.backends.iter().any(|b| !b.local));
        if remapped || snat {
            push_unique(&mut frontends, std::net::SocketAddr::new(c.addr, c.port).to_string());
        }
    }
    (!frontends.is_empty()).then(|| Problem::SctpPortRewrite(frontends.join(", ")))
}

/// Which frontend keeps an `addr:port/proto` two frontends both ask for. Addresses the
/// cluster allocates (clusterIPs, then nodePorts on node addresses, then LB status set by a
/// controller) beat user-chosen externalIPs, so an externalIP cannot hijack another service's
/// clusterIP (CVE-2020-8554) whatever the namespace/name order.
pub(super) fn claim_priority(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::ClusterIP => 0,
        FrontendKind::NodePort => 1,
        FrontendKind::LoadBalancer => 2,
        FrontendKind::ExternalIP => 3,
    }
}
