//! Services: the parts the translation uses, validated.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use super::{
    ANNOTATION_LB_ALGORITHM, ANNOTATION_LB_SOURCE_RANGES, DEFAULT_AFFINITY_TIMEOUT, LABEL_SERVICE_PROXY_NAME,
    MAX_AFFINITY_TIMEOUT,
    problems::{Problem, label, non_empty, parse_ip, port_label, push_unique, valid_port},
};
use crate::model::types::{IpFamily, IpPrefix, LbAlgorithm, Protocol};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// The parts of a Service the translation uses, validated.
pub(super) struct ParsedService {
    pub(super) svc_type: ServiceType,
    /// Every usable address of `clusterIPs`, in order.
    pub(super) cluster_ips: Vec<IpAddr>,
    /// The families of `cluster_ips`, primary first: the families the Service is served in.
    pub(super) families: Vec<IpFamily>,
    pub(super) ports: Vec<ParsedPort>,
    /// Of the Service's families only (the others were warned about).
    pub(super) external_ips: Vec<IpAddr>,
    pub(super) lb_ips: Vec<IpAddr>,
    /// Both families; each frontend takes those of its own family.
    pub(super) source_ranges: Vec<IpPrefix>,
    pub(super) affinity_timeout: Option<u32>,
    /// The `ebpf-proxy.io/lb-algorithm` annotation; `None`: the node's default.
    pub(super) lb_algorithm: Option<LbAlgorithm>,
    pub(super) internal_local: bool,
    pub(super) external_local: bool,
    /// `spec.healthCheckNodePort` of a LoadBalancer service with externalTrafficPolicy
    /// Local (the only case it is allocated for and kube-proxy serves it).
    pub(super) health_check_node_port: Option<u16>,
    /// Non-fatal problems: the bad part was dropped, the service is still programmed.
    pub(super) notes: Vec<Problem>,
}

pub(super) struct ParsedPort {
    /// "" for a single unnamed port.
    pub(super) name: String,
    pub(super) port: u16,
    pub(super) node_port: Option<u16>,
    pub(super) proto: Protocol,
}

/// `Ok(None)`: not ours to proxy (skipped silently). `Err`: malformed, skipped with a warning.
/// Fatal checks come first so a malformed service yields exactly one warning.
pub(super) fn parse_service(svc: &Service) -> Result<Option<ParsedService>, Problem> {
    if label(&svc.metadata, LABEL_SERVICE_PROXY_NAME).is_some() {
        return Ok(None);
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    let svc_type = match spec.type_.as_deref() {
        None | Some("" | "ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return Ok(None),
        Some(other) => return Err(Problem::UnknownType(other.to_owned())),
    };

    let raw_cluster_ips = cluster_ip_strings(spec);
    // Headless, or no IP allocated: kube-proxy does not program these at all.
    if raw_cluster_ips.is_empty() || raw_cluster_ips.contains(&"None") {
        return Ok(None);
    }
    let mut notes = Vec::new();
    let cluster_ips = cluster_ips(spec, &raw_cluster_ips, &mut notes)?;
    let mut families = Vec::new();
    for ip in &cluster_ips {
        push_unique(&mut families, IpFamily::of(*ip));
    }

    let ports = spec
        .ports
        .iter()
        .flatten()
        .enumerate()
        .map(|(index, port)| parse_port(index, port))
        .collect::<Result<Vec<_>, _>>()?;

    let external_ips = of_families(external_ips(spec, &mut notes), &families, "externalIP", &mut notes);
    let (lb_ips, source_ranges) = if svc_type == ServiceType::LoadBalancer {
        // Ingress IPs of another family are dropped silently: a proxying load balancer may
        // front a Service of one family with an IP of the other, which upstream expects
        // and ignores ("irrelevant to kube-proxy").
        let lb_ips =
            ingress_ips(svc, &mut notes).into_iter().filter(|ip| families.contains(&IpFamily::of(*ip))).collect();
        (lb_ips, source_ranges(svc, spec, &mut notes))
    } else {
        (Vec::new(), Vec::new())
    };
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = match spec.health_check_node_port {
        Some(value) if svc_type == ServiceType::LoadBalancer && external_local => {
            let port = valid_port(value);
            if port.is_none() {
                notes.push(Problem::BadHealthCheckNodePort(value));
            }
            port
        }
        _ => None,
    };
    // Kept for the Service's lifetime: no room to grow.
    let (mut cluster_ips, mut families, mut ports) = (cluster_ips, families, ports);
    cluster_ips.shrink_to_fit();
    families.shrink_to_fit();
    ports.shrink_to_fit();
    Ok(Some(ParsedService {
        svc_type,
        cluster_ips,
        families,
        ports,
        external_ips,
        lb_ips,
        source_ranges,
        affinity_timeout: affinity_timeout(spec, &mut notes),
        lb_algorithm: lb_algorithm(svc, &mut notes),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local,
        health_check_node_port,
        notes,
    }))
}

/// `spec.clusterIPs`, falling back to `spec.clusterIP` (objects written by old clients).
pub(super) fn cluster_ip_strings(spec: &ServiceSpec) -> Vec<&str> {
    match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => non_empty(spec.cluster_ip.as_deref()).into_iter().collect(),
    }
}

/// The usable addresses of `clusterIPs`, each checked against the `spec.ipFamilies` entry
/// at its index (upstream's `GetClusterIPByFamily` pairs them by index). Every address is
/// served, in its own family; an unparsable one skips the Service (as upstream's
/// validation would have rejected it), one of the wrong family is skipped alone.
pub(super) fn cluster_ips(spec: &ServiceSpec, raw: &[&str], notes: &mut Vec<Problem>) -> Result<Vec<IpAddr>, Problem> {
    let mut declared = Vec::new();
    for name in spec.ip_families.iter().flatten() {
        let family = IpFamily::from_k8s(name);
        if family.is_none() {
            notes.push(Problem::UnknownIpFamily(name.clone()));
        }
        declared.push(family);
    }
    let mut ips = Vec::new();
    for (index, raw) in raw.iter().enumerate() {
        let ip = parse_ip(raw).ok_or_else(|| Problem::BadClusterIp((*raw).to_owned()))?;
        match declared.get(index).copied().flatten() {
            Some(family) if family != IpFamily::of(ip) => {
                notes.push(Problem::ClusterIpFamilyMismatch { index, ip: ip.to_string(), family });
            }
            _ => push_unique(&mut ips, ip),
        }
    }
    if ips.is_empty() {
        return Err(Problem::NoClusterIpOfItsFamily);
    }
    Ok(ips)
}

/// The addresses of the Service's own families; each other one is warned about (upstream's
/// proxier of a family the Service is not in never sees the Service, and the other proxier
/// filters the address out: it is served nowhere).
pub(super) fn of_families(
    ips: Vec<IpAddr>,
    families: &[IpFamily],
    field: &'static str,
    notes: &mut Vec<Problem>,
) -> Vec<IpAddr> {
    ips.into_iter()
        .filter(|ip| {
            let family = IpFamily::of(*ip);
            let ok = families.contains(&family);
            if !ok {
                notes.push(Problem::AddressOfOtherFamily { field, ip: ip.to_string(), family });
            }
            ok
        })
        .collect()
}

pub(super) fn parse_port(index: usize, port: &ServicePort) -> Result<ParsedPort, Problem> {
    let name = port.name.clone().unwrap_or_default();
    let label = || port_label(index, &name);
    let number = valid_port(port.port).ok_or_else(|| Problem::BadPort { port: label(), value: port.port })?;
    let proto = Protocol::from_k8s(port.protocol.as_deref()).ok_or_else(|| Problem::UnknownProtocol {
        port: label(),
        protocol: port.protocol.clone().unwrap_or_default(),
    })?;
    let node_port = match port.node_port {
        None | Some(0) => None,
        Some(value) => Some(valid_port(value).ok_or_else(|| Problem::BadNodePort { port: label(), value })?),
    };
    Ok(ParsedPort { name, port: number, node_port, proto })
}

pub(super) fn external_ips(spec: &ServiceSpec, notes: &mut Vec<Problem>) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for raw in spec.external_ips.iter().flatten() {
        match parse_ip(raw) {
            Some(ip) => push_unique(&mut ips, ip),
            None => notes.push(Problem::BadExternalIp(raw.clone())),
        }
    }
    ips
}

/// `status.loadBalancer.ingress[].ip`, except `ipMode: Proxy` entries: there the load
/// balancer delivers to the node with its own address, so kube-proxy must not capture the IP.
pub(super) fn ingress_ips(svc: &Service, notes: &mut Vec<Problem>) -> Vec<IpAddr> {
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
    let mut ips = Vec::new();
    for entry in ingress.into_iter().flatten() {
        // Hostname-only entries carry no IP to program.
        let Some(raw) = non_empty(entry.ip.as_deref()) else {
            continue;
        };
        match entry.ip_mode.as_deref() {
            None | Some("VIP") => {}
            Some("Proxy") => continue,
            Some(mode) => {
                notes.push(Problem::UnknownIpMode { ip: raw.to_owned(), mode: mode.to_owned() });
                continue;
            }
        }
        match parse_ip(raw) {
            Some(ip) => push_unique(&mut ips, ip),
            None => notes.push(Problem::BadIngressIp(raw.to_owned())),
        }
    }
    ips
}

/// `spec.loadBalancerSourceRanges`, or the legacy annotation when the field is empty; both
/// families (each frontend takes its own family's, as upstream's `MapCIDRsByIPFamily`).
pub(super) fn source_ranges(svc: &Service, spec: &ServiceSpec, notes: &mut Vec<Problem>) -> Vec<IpPrefix> {
    let raw: Vec<&str> = match spec.load_balancer_source_ranges.as_deref() {
        Some(field) if !field.is_empty() => field.iter().map(String::as_str).collect(),
        _ => svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_LB_SOURCE_RANGES))
            .map(|a| a.split(',').collect())
            .unwrap_or_default(),
    };
    let mut ranges = Vec::new();
    for range in raw.into_iter().map(str::trim).filter(|r| !r.is_empty()) {
        match range.parse::<IpPrefix>() {
            Ok(prefix) => ranges.push(prefix),
            Err(_) => notes.push(Problem::BadSourceRange(range.to_owned())),
        }
    }
    ranges.sort();
    ranges.dedup();
    ranges
}

/// The `ebpf-proxy.io/lb-algorithm` annotation; an unknown value is a note, and the node's
/// default applies.
pub(super) fn lb_algorithm(svc: &Service, notes: &mut Vec<Problem>) -> Option<LbAlgorithm> {
    let raw = svc.metadata.annotations.as_ref()?.get(ANNOTATION_LB_ALGORITHM)?;
    match raw.trim().parse::<LbAlgorithm>() {
        Ok(a) => Some(a),
        Err(_) => {
            notes.push(Problem::BadLbAlgorithm(raw.clone()));
            None
        }
    }
}

pub(super) fn affinity_timeout(spec: &ServiceSpec, notes: &mut Vec<Problem>) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let configured =
        spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds);
    let Some(seconds) = configured else {
        return Some(DEFAULT_AFFINITY_TIMEOUT);
    };
    match u32::try_from(seconds) {
        Ok(t) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => Some(t),
        _ => {
            notes.push(Problem::BadAffinityTimeout(seconds));
            Some(DEFAULT_AFFINITY_TIMEOUT)
        }
    }
}
