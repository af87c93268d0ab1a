//! The translation itself. See the module docs of `model`.
//!
//! Pipeline:
//! 1. parse every EndpointSlice once, grouped by the Service it belongs to (so a bad slice
//!    warns once, not once per service port);
//! 2. parse every Service in namespace/name order and expand each port into candidate
//!    frontends (both scopes) with their backends, per kube-proxy's traffic-policy rules;
//! 3. claim frontend addresses in a fixed priority order, so that two services asking for
//!    the same `addr:port/proto` resolve the same way on every node and every sync; within a
//!    priority, the service that holds the address now (`Claims`, an input) keeps it;
//! 4. warn about slices that silently give no endpoints (no service-name label, naming no
//!    Service, or ports no Service port matches).
//!
//! Dual-stack follows upstream's MetaProxier, which runs one proxier per IP family over the
//! same objects: a Service is served in each family it has a clusterIP of, and in that
//! family only with that family's externalIPs, load-balancer IPs, source ranges, node
//! addresses and EndpointSlices (`addressType` IPv4 or IPv6). `ipFamilyPolicy` only tells
//! the API server what to allocate; like kube-proxy, the translation reads what was
//! allocated (`clusterIPs`, checked against `ipFamilies`).

use std::{borrow::Borrow, collections::BTreeSet, net::IpAddr};

pub use explain::explain;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
pub use problems::MISSING_METADATA;
pub use translator::{ClaimSource, ObjectKey, Translator, TriggerTimes, object_key};

use self::{
    backends::endpoints_for_port,
    problems::{ObjectId, Problem, Warnings},
    services::ParsedService,
    slices::ServiceEndpoints,
};
use super::types::{Claims, DesiredState, NodeInfo, Warning};

mod backends;
mod explain;
mod frontends;
mod problems;
mod services;
mod slices;
#[cfg(test)]
mod tests;
mod translator;

/// Services carrying this label belong to another proxy (upstream filters them out).
const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Joins an EndpointSlice to its Service.
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// When the change this slice carries was triggered (a pod or Service change), set by the
/// EndpointSlice controller: the start of kube-proxy's network programming latency.
const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Legacy spelling of `spec.loadBalancerSourceRanges`, used when the field is empty.
const ANNOTATION_LB_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// How new flows of the Service pick a backend: `random` or `maglev` (every node picks the
/// same backend for a flow). Without it, the node's `--lb-algorithm` for north-south
/// frontends, random for ClusterIPs. As Cilium's `service.cilium.io/lb-algorithm`.
pub const ANNOTATION_LB_ALGORITHM: &str = "ebpf-proxy.io/lb-algorithm";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default and maximum (API defaults).
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
const MAX_AFFINITY_TIMEOUT: u32 = 86400;

const KIND_SERVICE: &str = "Service";
const KIND_SLICE: &str = "EndpointSlice";

/// Translate every Service with its EndpointSlices into the desired frontends for `node`,
/// with nothing programmed yet (see `translate_with_claims`).
pub fn translate(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    node: &NodeInfo,
) -> (DesiredState, Vec<Warning>) {
    translate_with_claims(services, slices, node, &Claims::new())
}

/// Translate every Service with its EndpointSlices into the desired frontends for `node`.
/// `claims` says which Service holds each frontend address in the maps now: on a conflict
/// it keeps the address. Malformed objects produce one `Warning` each and are skipped; the
/// rest still translate. Objects may be shared (`Arc<Service>`): nothing is cloned.
pub fn translate_with_claims(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    node: &NodeInfo,
    claims: &impl ClaimSource,
) -> (DesiredState, Vec<Warning>) {
    let mut t = Translator::new(node.clone());
    for svc in services {
        t.upsert_service(svc.borrow());
    }
    for slice in slices {
        t.upsert_slice(slice.borrow());
    }
    t.commit(claims);
    let warnings = t.warnings();
    (t.into_desired(), warnings)
}

/// A slice port that no port of its Service matches (by name and protocol) gives that
/// Service no endpoints, silently: a typo in a hand-written slice. One warning per slice.
fn warn_unmatched_slice_ports(
    service: &ObjectId,
    svc: &ParsedService,
    group: &ServiceEndpoints,
    warnings: &mut Warnings,
) {
    for slice in &group.slices {
        let unmatched: Vec<String> = slice
            .ports
            .iter()
            .filter(|sp| !svc.ports.iter().any(|p| p.name == sp.name && p.proto == sp.proto))
            .map(|sp| format!("{:?}/{}", sp.name, sp.proto))
            .collect();
        if !unmatched.is_empty() {
            let service_ports =
                svc.ports.iter().map(|p| format!("{:?}/{}", p.name, p.proto)).collect::<Vec<_>>().join(", ");
            warnings.push(
                KIND_SLICE,
                slice.id.to_string(),
                Problem::SlicePortsUnmatched {
                    ports: unmatched.join(", "),
                    service: service.to_string(),
                    service_ports,
                },
            );
        }
    }
}

/// kube-proxy's count for the health check: distinct addresses of this node's ready
/// endpoints over the service's ports (a pod serving two ports counts once). A dual-stack
/// Service counts its primary family (the first of its clusterIPs), so a dual-stack pod
/// counts once, as each upstream proxier reports its own family's endpoints.
fn local_ready_endpoints(svc: &ParsedService, endpoints: Option<&ServiceEndpoints>) -> usize {
    let (Some(group), Some(&primary)) = (endpoints, svc.families.first()) else { return 0 };
    let addrs: BTreeSet<IpAddr> = svc
        .ports
        .iter()
        .flat_map(|port| endpoints_for_port(group, port, primary))
        .filter(|e| e.ep.local && e.ep.ready)
        .map(|e| e.addr)
        .collect();
    addrs.len()
}
