//! Problems with input objects (each becomes one warning), object ids, small parsers.

use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{ANNOTATION_LB_ALGORITHM, DEFAULT_AFFINITY_TIMEOUT, LABEL_SERVICE_NAME, MAX_AFFINITY_TIMEOUT};
use crate::model::types::{IpFamily, ObjectName, Warning};

/// What an object without namespace or name is told, here and by the manifests source
/// (which cannot key such an object at all).
pub const MISSING_METADATA: &str = "metadata.namespace or metadata.name is missing, skipped";

/// Everything that can be wrong with an input object; each becomes one `Warning`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum Problem {
    #[error("{MISSING_METADATA}")]
    MissingMetadata,
    #[error("unknown spec.type {0:?}, skipped")]
    UnknownType(String),
    #[error("unparsable clusterIP {0:?}, skipped")]
    BadClusterIp(String),
    #[error("port {port}: port number {value} is out of range 1-65535, service skipped")]
    BadPort { port: String, value: i32 },
    #[error("port {port}: nodePort {value} is out of range 1-65535, service skipped")]
    BadNodePort { port: String, value: i32 },
    #[error("port {port}: unknown protocol {protocol:?}, service skipped")]
    UnknownProtocol { port: String, protocol: String },
    #[error("unparsable externalIP {0:?}, skipped")]
    BadExternalIp(String),
    #[error("unparsable loadBalancer ingress IP {0:?}, skipped")]
    BadIngressIp(String),
    #[error("loadBalancer ingress {ip}: unknown ipMode {mode:?}, skipped")]
    UnknownIpMode { ip: String, mode: String },
    #[error("invalid loadBalancerSourceRange {0:?}, skipped")]
    BadSourceRange(String),
    #[error(
        "sessionAffinityConfig.clientIP.timeoutSeconds {0} is out of range 1-{MAX_AFFINITY_TIMEOUT}, \
         using {DEFAULT_AFFINITY_TIMEOUT}"
    )]
    BadAffinityTimeout(i32),
    #[error(
        "annotation {ANNOTATION_LB_ALGORITHM} has unknown value {0:?} (random or maglev), using the node's default"
    )]
    BadLbAlgorithm(String),
    #[error("unknown spec.ipFamilies entry {0:?}, ignored")]
    UnknownIpFamily(String),
    #[error("clusterIPs[{index}] {ip} is not an {family} address as spec.ipFamilies[{index}] says, skipped")]
    ClusterIpFamilyMismatch { index: usize, ip: String, family: IpFamily },
    #[error("no clusterIP matches its spec.ipFamilies entry, skipped")]
    NoClusterIpOfItsFamily,
    #[error("{field} {ip} is {family} but the service has no {family} clusterIP, skipped")]
    AddressOfOtherFamily { field: &'static str, ip: String, family: IpFamily },
    #[error("endpoint address {ip} is not an {family} address as the slice's addressType says, skipped")]
    EndpointOfOtherFamily { ip: String, family: IpFamily },
    #[error("frontends already used by other services, skipped: {0}")]
    Conflict(String),
    #[error("endpoint has no addresses, skipped")]
    EndpointWithoutAddress,
    #[error("unparsable endpoint address {0:?}, skipped")]
    BadEndpointAddress(String),
    #[error("port {port}: port number {value} is out of range 1-65535, skipped")]
    BadSlicePort { port: String, value: i32 },
    #[error("port {port}: unknown protocol {protocol:?}, skipped")]
    UnknownSliceProtocol { port: String, protocol: String },
    #[error("unknown addressType {0:?}, skipped")]
    UnknownAddressType(String),
    #[error("healthCheckNodePort {0} is out of range 1-65535, not served")]
    BadHealthCheckNodePort(i32),
    #[error("healthCheckNodePort {port} is already served for {owner}, not served")]
    HealthCheckConflict { port: u16, owner: String },
    #[error("no {LABEL_SERVICE_NAME} label: belongs to no Service, its endpoints are not used")]
    NoServiceNameLabel,
    #[error("{LABEL_SERVICE_NAME} names Service {0}, which does not exist: its endpoints are not used")]
    NoSuchService(String),
    #[error(
        "ports {ports} match no port of Service {service} ({service_ports}; name and protocol \
         must match): their endpoints are not used"
    )]
    SlicePortsUnmatched { ports: String, service: String, service_ports: String },
    #[error(
        "SCTP frontends {0} need a port rewritten, which SCTP's CRC32c covers: their new flows \
         are dropped and counted as sctp_port_nat (serve SCTP with targetPort equal to port, \
         through the ClusterIP or with externalTrafficPolicy: Local)"
    )]
    SctpPortRewrite(String),
}

#[derive(Default)]
pub(super) struct Warnings(pub(super) Vec<Warning>);

impl Warnings {
    pub(super) fn push(&mut self, kind: &'static str, object: String, problem: Problem) {
        self.0.push(Warning { object, kind, message: problem.to_string() });
    }
}

/// "namespace/name" of a Service or EndpointSlice; also the join key slice -> service.
/// Shared, not copied: the translation keeps each id in several indexes (claims, slice
/// groups, winners) and each frontend names its Service by it; at 100,000 Services the
/// copies were a good part of its memory.
pub(super) type ObjectId = ObjectName;

pub(super) fn id_key(id: &ObjectId) -> (String, String) {
    (id.namespace().to_owned(), id.name().to_owned())
}

pub(super) fn id_from_meta(meta: &ObjectMeta) -> Option<ObjectId> {
    Some(ObjectId::new(non_empty(meta.namespace.as_deref())?, non_empty(meta.name.as_deref())?))
}

/// Best-effort name of an object whose namespace or name is missing, for the warning.
pub(super) fn missing_id(meta: &ObjectMeta) -> String {
    let part = |s: Option<&str>| non_empty(s).unwrap_or("<missing>").to_owned();
    format!("{}/{}", part(meta.namespace.as_deref()), part(meta.name.as_deref()))
}

pub(super) fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

/// Objects in namespace/name order, so "first wins" rules and warning order do not depend
/// on the order the caller's caches happen to return.
pub(super) fn sorted_by_name<T>(objects: &[T], meta: impl Fn(&T) -> &ObjectMeta) -> Vec<&T> {
    let mut sorted: Vec<&T> = objects.iter().collect();
    sorted.sort_by(|a, b| {
        let key = |m: &ObjectMeta| (m.namespace.clone(), m.name.clone());
        key(meta(a)).cmp(&key(meta(b)))
    });
    sorted
}

pub(super) fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// Sloppy like kube-proxy (`ParseIPSloppy`: IPv4 octets with leading zeros are decimal).
pub(super) fn parse_ip(s: &str) -> Option<IpAddr> {
    crate::model::addr::parse_ip_sloppy(s)
}

/// A port number from the API (i32) if it is in 1..=65535.
pub(super) fn valid_port(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|&p| p != 0)
}

/// How a port is named in warnings: its name, or its position when unnamed.
pub(super) fn port_label(index: usize, name: &str) -> String {
    if name.is_empty() { format!("#{index}") } else { format!("{name:?}") }
}

pub(super) fn push_unique<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}
