//! Desired state: what the maps should hold, independent of how it is stored. Produced by
//! the pure translation in `model::translate`, consumed by `sync`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::memory::{HeapSize, no_heap};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::PROTO_TCP,
            Protocol::Udp => proxy_common::PROTO_UDP,
            Protocol::Sctp => proxy_common::PROTO_SCTP,
        }
    }
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::PROTO_TCP => Some(Protocol::Tcp),
            proxy_common::PROTO_UDP => Some(Protocol::Udp),
            proxy_common::PROTO_SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }
    /// Parse a Kubernetes protocol string ("TCP", "UDP", "SCTP"; absent means TCP).
    pub fn from_k8s(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// Internal: traffic from pods (TC). External: traffic from outside the node (XDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Internal,
    External,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Scope::Internal => proxy_common::SCOPE_INTERNAL,
            Scope::External => proxy_common::SCOPE_EXTERNAL,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        [Scope::Internal, Scope::External].into_iter().find(|s| s.number() == n)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    ExternalIP,
    LoadBalancer,
}

impl FrontendKind {
    pub fn number(self) -> u8 {
        use proxy_common::frontend_kind::*;
        match self {
            FrontendKind::ClusterIP => CLUSTER_IP,
            FrontendKind::NodePort => NODE_PORT,
            FrontendKind::ExternalIP => EXTERNAL_IP,
            FrontendKind::LoadBalancer => LOAD_BALANCER,
        }
    }
    pub fn from_number(n: u8) -> Option<Self> {
        use proxy_common::frontend_kind::*;
        match n {
            CLUSTER_IP => Some(FrontendKind::ClusterIP),
            NODE_PORT => Some(FrontendKind::NodePort),
            EXTERNAL_IP => Some(FrontendKind::ExternalIP),
            LOAD_BALANCER => Some(FrontendKind::LoadBalancer),
            _ => None,
        }
    }
}

/// An address family. A dual-stack Service is served in both: each family has its own
/// frontends (`SERVICES` / `SERVICES6`) and backends, as upstream runs one proxier per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IpFamily {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl IpFamily {
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 }
    }

    /// The Kubernetes spelling (`spec.ipFamilies`, `addressType`), also the metrics label.
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    pub fn from_k8s(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One frontend: the key of a `SERVICES` (IPv4) or `SERVICES6` (IPv6) entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    pub scope: Scope,
}

impl FrontendKey {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.addr)
    }
}

impl fmt::Display for FrontendKey {
    /// `10.96.0.1:80/TCP`, `[fd00::1]:80/TCP`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.addr, self.port), self.proto)
    }
}

/// An object's namespace and name in one allocation, shared by everything that names the
/// object (the translation's indexes, each frontend of a Service) instead of copied. Compared
/// and ordered as the pair (namespace, name).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectName(Arc<NameParts>);

#[derive(PartialEq, Eq, Hash)]
struct NameParts {
    /// The namespace, then the name, with nothing between: `split` says where.
    text: Box<str>,
    split: u32,
}

impl Ord for NameParts {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // The translator's maps compare names all the time (a third of a cold translation's
        // instructions went here). The same allocation is the same name; namespaces of one
        // length (one namespace, say) order the pair as their texts order, with one
        // comparison instead of two.
        if std::ptr::eq(self, other) {
            return std::cmp::Ordering::Equal;
        }
        if self.split == other.split {
            return self.text.cmp(&other.text);
        }
        (self.namespace(), self.name()).cmp(&(other.namespace(), other.name()))
    }
}

impl PartialOrd for NameParts {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl NameParts {
    fn namespace(&self) -> &str {
        // `split` is the namespace's length, a char boundary of `text` by construction.
        self.text.get(..self.split as usize).unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.text.get(self.split as usize..).unwrap_or_default()
    }
}

impl ObjectName {
    pub fn new(namespace: &str, name: &str) -> Self {
        // A namespace is a DNS label (63 bytes at most); the fallback is unreachable.
        let split = u32::try_from(namespace.len()).unwrap_or(u32::MAX);
        ObjectName(Arc::new(NameParts { text: [namespace, name].concat().into_boxed_str(), split }))
    }

    pub fn namespace(&self) -> &str {
        self.0.namespace()
    }

    pub fn name(&self) -> &str {
        self.0.name()
    }

    /// The same allocation (one shared name), not only an equal one.
    pub fn shares(&self, other: &ObjectName) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Heap bytes of its one allocation, for the owner that counts it (`crate::memory`).
    pub fn own_heap_bytes(&self) -> usize {
        2 * size_of::<usize>() + size_of::<NameParts>() + self.0.text.len()
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace(), self.name())
    }
}

impl fmt::Debug for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

/// Which Service port a frontend belongs to ("namespace/name:port-name"). Every frontend
/// of a Service shares the Service's name; serialized as the three strings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "PortNameFields", from = "PortNameFields")]
pub struct ServicePortName {
    pub service: ObjectName,
    /// Service port name; empty for a single unnamed port.
    pub port_name: String,
}

impl ServicePortName {
    pub fn new(namespace: &str, name: &str, port_name: &str) -> Self {
        ServicePortName { service: ObjectName::new(namespace, name), port_name: port_name.to_owned() }
    }

    pub fn namespace(&self) -> &str {
        self.service.namespace()
    }

    pub fn name(&self) -> &str {
        self.service.name()
    }
}

/// `ServicePortName` as JSON and YAML show it.
#[derive(Serialize, Deserialize)]
struct PortNameFields {
    namespace: String,
    name: String,
    port_name: String,
}

impl From<ServicePortName> for PortNameFields {
    fn from(p: ServicePortName) -> Self {
        PortNameFields { namespace: p.namespace().to_owned(), name: p.name().to_owned(), port_name: p.port_name }
    }
}

impl From<PortNameFields> for ServicePortName {
    fn from(f: PortNameFields) -> Self {
        ServicePortName { service: ObjectName::new(&f.namespace, &f.name), port_name: f.port_name }
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.service)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
    }
}

/// One endpoint a frontend can send to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendAddr {
    /// Of the family of the frontends it serves (IPv6 slices feed IPv6 frontends only).
    pub addr: IpAddr,
    pub port: u16,
    /// On this node (endpoint.nodeName == our node).
    pub local: bool,
    /// Serving but terminating (only present as kube-proxy's fallback when none is ready).
    pub terminating: bool,
}

/// An IPv4 or IPv6 prefix (loadBalancerSourceRanges, `--nodeport-addresses`); host bits
/// are zero (see `model::addr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Everything the datapath needs for one frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendEntry {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    /// Sorted and deduplicated. Empty = service has no usable endpoints (datapath drops).
    pub backends: Vec<BackendAddr>,
    /// sessionAffinity: ClientIP timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// A traffic policy of Local applied to this entry (backends are node-local only and,
    /// for external scope, the client address is preserved).
    pub local_only: bool,
    /// loadBalancerSourceRanges of the frontend's family (LoadBalancer frontends); empty =
    /// all. A range of the other family never constrains it (upstream filters the ranges
    /// by family: an IPv4 LB IP with only IPv6 ranges is open).
    pub source_ranges: Vec<IpPrefix>,
    /// The Service's `ebpf-proxy.io/lb-algorithm`; `None`: the node's default
    /// (`--lb-algorithm` for north-south frontends, random for ClusterIPs; the sync applies
    /// it, `LbAlgorithm::for_frontend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb_algorithm: Option<LbAlgorithm>,
    /// Backends that stand for several endpoints (slices repeating their address), sorted
    /// by address and port; the others weigh 1. Maglev gives each backend slots in
    /// proportion (random selection ignores it, as upstream's kube-proxy does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<BackendWeight>,
}

impl FrontendEntry {
    /// How many endpoints `b` stands for (`weights`; 1 when not listed).
    pub fn weight_of(&self, b: &BackendAddr) -> u32 {
        self.weights.binary_search_by(|w| (w.addr, w.port).cmp(&(b.addr, b.port))).map_or(1, |i| self.weights[i].weight)
    }
}

/// A backend of a frontend standing for `weight` (> 1) endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackendWeight {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
}

/// How a frontend's new flows pick a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LbAlgorithm {
    /// Uniformly at random, on each node independently (kube-proxy's behaviour).
    #[default]
    Random,
    /// From the frontend's Maglev table by a hash of the 5-tuple: every node picks the same
    /// backend for a flow, and a backend change moves about 1/N of the flows.
    Maglev,
}

impl LbAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            LbAlgorithm::Random => "random",
            LbAlgorithm::Maglev => "maglev",
        }
    }

    /// The algorithm of a frontend of `kind` in `scope` whose Service asks for `annotated`:
    /// the annotation, else `north_south` for the external scope of NodePort, ExternalIP and
    /// LoadBalancer frontends (traffic from outside, which a router may move between
    /// nodes), random for the rest (east-west: the client's own node decides, so agreement
    /// across nodes buys nothing, and a table per frontend costs memory).
    pub fn for_frontend(
        annotated: Option<LbAlgorithm>,
        kind: FrontendKind,
        scope: Scope,
        north_south: LbAlgorithm,
    ) -> Self {
        match (annotated, kind, scope) {
            (Some(a), _, _) => a,
            (None, FrontendKind::ClusterIP, _) | (None, _, Scope::Internal) => LbAlgorithm::Random,
            (None, _, Scope::External) => north_south,
        }
    }
}

impl std::fmt::Display for LbAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LbAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(LbAlgorithm::Random),
            "maglev" => Ok(LbAlgorithm::Maglev),
            other => Err(format!("unknown load-balancing algorithm {other:?} (random or maglev)")),
        }
    }
}

/// What a `healthCheckNodePort` reports (kube-proxy's service health server): a load
/// balancer sends external traffic only to nodes that answer 200, i.e. that have a local
/// endpoint, which is what `externalTrafficPolicy: Local` needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Distinct ready endpoint addresses of the service on this node.
    pub local_endpoints: usize,
}

/// The complete desired state of the node's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Shared with the translation's candidates (`Arc`): the desired state points at the
    /// entry the winning candidate holds instead of holding a copy.
    pub frontends: BTreeMap<FrontendKey, Arc<FrontendEntry>>,
    /// Health-check node ports to serve, by port (LoadBalancer services with
    /// `externalTrafficPolicy: Local`). Served by the agent, not the datapath.
    #[serde(default)]
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// The Service CIDRs (ServiceCIDR objects, `--service-cidr`): new flows to an address
    /// inside them that no frontend holds are refused (`model::service_cidrs`).
    #[serde(default)]
    pub service_cidrs: BTreeSet<IpPrefix>,
}

/// The agent's own node, as the translation needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Addresses NodePorts are served on (after `--nodeport-addresses` filtering), both
    /// families: a Service's NodePort is served on those of its own families.
    pub nodeport_addrs: Vec<IpAddr>,
    /// The node's `topology.kubernetes.io/zone` label, for topology-aware routing.
    pub zone: Option<String>,
}

/// An `addr:port/proto` that one Service may own (both scopes go with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClaimKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

/// The Service ("namespace", "name") that holds a claim.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClaimHolder {
    pub namespace: String,
    pub name: String,
}

/// Which Service each frontend address is programmed for right now (the sync's mirror of
/// the maps). An input of the translation, so it stays pure: when two Services of the same
/// claim priority ask for one address, the one already programmed keeps it, and adding a
/// Service never takes a live address away from another.
pub type Claims = BTreeMap<ClaimKey, ClaimHolder>;

/// Why an object (or part of it) was skipped; each becomes one logged warning naming it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// "namespace/name" of the object.
    pub object: String,
    pub kind: &'static str,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.object, self.message)
    }
}

/// Why an endpoint is or is not a backend of a frontend (`ebpf-proxy explain`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Ready (and allowed by topology): a backend.
    Backend,
    /// Not ready but serving while terminating, and no endpoint is ready: a backend so
    /// connections drain (upstream's terminating fallback).
    TerminatingFallback,
    /// Not ready (and not a terminating fallback).
    NotReady,
    /// Terminating while ready endpoints exist.
    Terminating,
    /// Topology hints (`hints.forNodes`, trafficDistribution PreferSameNode) send cluster
    /// traffic to endpoints for this node only.
    OtherNodeByHints,
    /// Topology hints (`hints.forZones`) send cluster traffic to this zone's endpoints only.
    OtherZoneByHints,
    /// On another node, and the traffic policy for this frontend is Local.
    NotLocal,
    /// Its slice has no port of this Service port's name and protocol.
    PortNameNotMatched,
    /// Its slice is of the other address family than this frontend.
    AddressFamily,
}

impl Reason {
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Backend => "backend",
            Reason::TerminatingFallback => "backend (terminating fallback: no endpoint is ready)",
            Reason::NotReady => "not ready",
            Reason::Terminating => "terminating (ready endpoints exist)",
            Reason::OtherNodeByHints => "not for this node by topology hints",
            Reason::OtherZoneByHints => "other zone by topology hints",
            Reason::NotLocal => "not local, and the traffic policy is Local",
            Reason::PortNameNotMatched => "its slice has no port matching this port's name and protocol",
            Reason::AddressFamily => "other address family than this frontend",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointVerdict {
    pub address: IpAddr,
    /// The backend port its slice gives this Service port (None: no matching port).
    pub port: Option<u16>,
    pub slice: String,
    pub local: bool,
    pub reason: Reason,
}

/// One group of frontends of a Service port in one family and traffic direction.
#[derive(Clone, Debug, Serialize)]
pub struct FrontendView {
    /// The Service port's name ("" for a single unnamed port).
    pub port: String,
    pub protocol: Protocol,
    pub family: IpFamily,
    /// "cluster: ClusterIP ..." or "external: NodePort ..., LoadBalancer ...".
    pub traffic: String,
    /// Which traffic policy applies and, for Cluster, the topology mode chosen.
    pub policy: String,
    pub endpoints: Vec<EndpointVerdict>,
    /// How new flows pick a backend (`random`, `maglev`) and what decided it.
    pub selection: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub service: String,
    pub node: String,
    pub zone: Option<String>,
    pub frontends: Vec<FrontendView>,
}

// Heap accounting (`crate::memory`) of the model's public types.

no_heap!(BackendAddr, FrontendKey, ClaimKey, IpPrefix, IpFamily, BackendWeight);

impl HeapSize for FrontendEntry {
    fn heap_bytes(&self) -> usize {
        // The Service's name is shared and counted by its owner (the translator's index).
        self.service.port_name.heap_bytes()
            + self.backends.heap_bytes()
            + self.weights.heap_bytes()
            + self.source_ranges.heap_bytes()
    }
}

impl HeapSize for HealthCheck {
    fn heap_bytes(&self) -> usize {
        self.namespace.heap_bytes() + self.name.heap_bytes()
    }
}

impl HeapSize for Warning {
    fn heap_bytes(&self) -> usize {
        self.object.heap_bytes() + self.message.heap_bytes()
    }
}

/// A desired state of exactly these frontends (no health checks, no Service CIDRs), as
/// tests and the bench build one by hand; the translator builds its own, sharing its
/// candidates' entries.
impl FromIterator<(FrontendKey, FrontendEntry)> for DesiredState {
    fn from_iter<I: IntoIterator<Item = (FrontendKey, FrontendEntry)>>(entries: I) -> Self {
        DesiredState {
            frontends: entries.into_iter().map(|(k, e)| (k, Arc::new(e))).collect(),
            ..DesiredState::default()
        }
    }
}

impl HeapSize for DesiredState {
    /// The entries are the translation's candidates' (shared), counted there: here only
    /// the map and its pointers.
    fn heap_bytes(&self) -> usize {
        crate::memory::btree_bytes(self.frontends.len(), size_of::<(FrontendKey, Arc<FrontendEntry>)>())
            + self.health_checks.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::{ObjectName, ServicePortName};

    /// One string inside, but compared, ordered and shown as the pair it stands for: a
    /// namespace that is a prefix of another sorts first, whatever its name.
    #[test]
    fn object_names_order_as_namespace_then_name() {
        let (a, b) = (ObjectName::new("a", "z"), ObjectName::new("a-b", "c"));
        assert!(a < b, "(a, z) sorts before (a-b, c)");
        assert_ne!(ObjectName::new("ab", "c"), ObjectName::new("a", "bc"));
        assert_eq!(ObjectName::new("ns", "web"), ObjectName::new("ns", "web"));
        let n = ObjectName::new("kube-system", "kube-dns");
        assert_eq!((n.namespace(), n.name()), ("kube-system", "kube-dns"));
        assert_eq!(n.to_string(), "kube-system/kube-dns");
        assert_eq!(format!("{n:?}"), "\"kube-system/kube-dns\"");
        assert!(n.shares(&n.clone()) && !n.shares(&ObjectName::new("kube-system", "kube-dns")));
    }

    /// The one-comparison path (namespaces of one length) and the pair path order every
    /// pair exactly as (namespace, name) tuples do.
    #[test]
    fn object_name_order_equals_the_pairs_order() {
        let parts = ["", "a", "b", "ab", "ba", "a-b", "abc", "z", "zz"];
        for (n1, m1) in parts.iter().flat_map(|n| parts.iter().map(move |m| (*n, *m))) {
            for (n2, m2) in parts.iter().flat_map(|n| parts.iter().map(move |m| (*n, *m))) {
                let (x, y) = (ObjectName::new(n1, m1), ObjectName::new(n2, m2));
                assert_eq!(x.cmp(&y), (n1, m1).cmp(&(n2, m2)), "({n1}, {m1}) against ({n2}, {m2})");
            }
        }
    }

    /// The desired state's JSON keeps its three fields.
    #[test]
    fn service_port_names_serialize_as_three_fields() {
        let p = ServicePortName::new("ns", "web", "http");
        let json = serde_json::to_value(&p).expect("serialize");
        assert_eq!(json, serde_json::json!({"namespace": "ns", "name": "web", "port_name": "http"}));
        assert_eq!(serde_json::from_value::<ServicePortName>(json).expect("deserialize"), p);
        assert_eq!(p.to_string(), "ns/web:http");
        assert_eq!(ServicePortName::new("ns", "web", "").to_string(), "ns/web");
    }
}
