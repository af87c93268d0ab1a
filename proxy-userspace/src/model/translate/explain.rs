//! `explain`: every endpoint of every frontend group with the reason it is or is not a backend.

use std::{borrow::Borrow, net::SocketAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    ANNOTATION_LB_ALGORITHM,
    backends::{PortEndpoint, Topology, choose, endpoints_for_port, ready_in_use, topology_mode},
    frontends::external_destinations,
    problems::{ObjectId, id_from_meta},
    services::parse_service,
    slices::{ServiceEndpoints, index_slices},
};
use crate::model::types::{EndpointVerdict, Explanation, FrontendView, IpFamily, LbAlgorithm, NodeInfo, Reason};

/// Why each endpoint of Service `namespace/name` is or is not a backend of each of its
/// frontends on `node` (`ebpf-proxy explain`): the decisions of `expand_port` and
/// `select_backends`, reported instead of applied. `Err` when the Service is absent,
/// malformed or not ours to proxy.
pub fn explain(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    node: &NodeInfo,
    namespace: &str,
    name: &str,
) -> Result<Explanation, String> {
    let wanted = ObjectId::new(namespace, name);
    let svc = services
        .iter()
        .map(Borrow::borrow)
        .find(|s| id_from_meta(&s.metadata).as_ref() == Some(&wanted))
        .ok_or_else(|| format!("no Service {wanted}"))?;
    let parsed = match parse_service(svc) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(format!(
                "Service {wanted} is not proxied by kube-proxy (headless, ExternalName or another proxy's)"
            ));
        }
        Err(problem) => return Err(format!("Service {wanted} is skipped: {problem}")),
    };
    let slices: Vec<&EndpointSlice> = slices.iter().map(Borrow::borrow).collect();
    let index = index_slices(&slices, node);
    let group = ServiceEndpoints { slices: index.get(&wanted).into_iter().flatten().collect() };
    let group = &group;
    let mut views = Vec::new();
    for port in &parsed.ports {
        for &family in &parsed.families {
            let port_eps = endpoints_for_port(group, port, family);
            let topology = topology_mode(port_eps.iter());
            let mut view = |traffic: String, local_policy: Option<&'static str>, north_south: bool| {
                let (pool, topo): (Vec<&PortEndpoint>, Topology) = match local_policy {
                    Some(_) => (port_eps.iter().filter(|e| e.ep.local).collect(), Topology::Any),
                    None => (port_eps.iter().collect(), topology),
                };
                let in_use = ready_in_use(pool.iter().copied(), topo);
                let mut endpoints = Vec::new();
                for slice in &group.slices {
                    let port_match =
                        slice.ports.iter().find(|sp| sp.name == port.name && sp.proto == port.proto).map(|sp| sp.port);
                    for ep in &slice.endpoints {
                        let reason = if slice.family != family {
                            Reason::AddressFamily
                        } else if port_match.is_none() {
                            Reason::PortNameNotMatched
                        } else if local_policy.is_some() && !ep.local {
                            Reason::NotLocal
                        } else {
                            // The merged copy `select_backends` saw (a duplicate address
                            // keeps its preferred conditions).
                            let merged = port_eps.iter().find(|e| e.addr == ep.addr && Some(e.port) == port_match);
                            choose(merged.map_or(ep, |m| &m.ep), topo, in_use)
                        };
                        endpoints.push(EndpointVerdict {
                            address: ep.addr,
                            port: port_match,
                            slice: slice.id.to_string(),
                            local: ep.local,
                            reason,
                        });
                    }
                }
                views.push(FrontendView {
                    port: if port.name.is_empty() {
                        port.port.to_string()
                    } else {
                        format!("{} ({})", port.name, port.port)
                    },
                    protocol: port.proto,
                    family,
                    traffic,
                    policy: local_policy
                        .map_or_else(|| format!("Cluster, topology: {}", topo.describe()), |p| format!("{p}: Local")),
                    endpoints,
                    selection: selection(parsed.lb_algorithm, north_south),
                });
            };
            let ips: Vec<String> = parsed
                .cluster_ips
                .iter()
                .filter(|ip| IpFamily::of(**ip) == family)
                .map(|ip| SocketAddr::new(*ip, port.port).to_string())
                .collect();
            view(
                format!("cluster: ClusterIP {}", ips.join(", ")),
                parsed.internal_local.then_some("internalTrafficPolicy"),
                false,
            );
            let external: Vec<String> = external_destinations(&parsed, port, node, family)
                .into_iter()
                .map(|(kind, addr, p)| format!("{kind:?} {}", SocketAddr::new(addr, p)))
                .collect();
            if !external.is_empty() {
                view(
                    format!("external: {}", external.join(", ")),
                    parsed.external_local.then_some("externalTrafficPolicy"),
                    true,
                );
            }
        }
    }
    Ok(Explanation { service: wanted.to_string(), node: node.name.clone(), zone: node.zone.clone(), frontends: views })
}

/// How new flows of a frontend group pick their backend, and what decided it.
fn selection(annotated: Option<LbAlgorithm>, north_south: bool) -> String {
    match (annotated, north_south) {
        (Some(LbAlgorithm::Maglev), _) => {
            format!("maglev ({ANNOTATION_LB_ALGORITHM}): every node picks the same backend for a flow")
        }
        (Some(LbAlgorithm::Random), _) => format!("random ({ANNOTATION_LB_ALGORITHM})"),
        (None, false) => "random (ClusterIP default)".to_string(),
        (None, true) => {
            "the node's --lb-algorithm for traffic from outside (random unless set to maglev), random from pods"
                .to_string()
        }
    }
}
