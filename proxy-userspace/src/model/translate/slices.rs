//! EndpointSlices: parsed once each, grouped by the Service they belong to.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};

use super::{
    ANNOTATION_TRIGGER_TIME, KIND_SERVICE, KIND_SLICE, LABEL_SERVICE_NAME,
    problems::{
        ObjectId, Problem, Warnings, id_from_meta, label, non_empty, parse_ip, port_label, sorted_by_name, valid_port,
    },
};
use crate::model::types::{IpFamily, NodeInfo, Protocol, Warning};

/// All usable endpoint data of one Service: its slices (both families), in name order.
#[derive(Default)]
pub(super) struct ServiceEndpoints<'a> {
    pub(super) slices: Vec<&'a ParsedSlice>,
}

pub(super) struct ParsedSlice {
    /// The slice itself, for warnings about it.
    pub(super) id: ObjectId,
    /// Its `addressType`: it feeds that family's frontends only (upstream's
    /// EndpointsChangeTracker of each family takes the slices of its address type).
    pub(super) family: IpFamily,
    /// It has an ownerReference to a Service (made by the EndpointSlice controller).
    pub(super) owned_by_service: bool,
    pub(super) ports: Vec<SlicePort>,
    pub(super) endpoints: Vec<ParsedEndpoint>,
    /// `hints.forZones` of each endpoint, by index; empty when no endpoint has any (the
    /// usual case, no allocation). Kept so a change of the node's zone re-derives
    /// `zone_hint` without the raw object.
    pub(super) zones: Vec<Box<[Box<str>]>>,
}

impl ParsedSlice {
    /// Re-derive every endpoint's `zone_hint` for a node in `zone`.
    pub(super) fn rehint(&mut self, zone: Option<&str>) {
        for (ep, names) in self.endpoints.iter_mut().zip(&self.zones) {
            ep.zone_hint = Hint::of(Some(names.iter().map(|n| &**n)), zone);
        }
    }
}

pub(super) struct SlicePort {
    /// "" for an unnamed port (None and "" are the same thing).
    pub(super) name: String,
    pub(super) port: u16,
    pub(super) proto: Protocol,
}

#[derive(Clone, Copy)]
pub(super) struct ParsedEndpoint {
    pub(super) addr: IpAddr,
    pub(super) local: bool,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    /// Topology hints as they concern this node: `hints.forZones` against its zone,
    /// `hints.forNodes` against its name.
    pub(super) zone_hint: Hint,
    pub(super) node_hint: Hint,
}

/// How an endpoint's topology hints relate to this node.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(super) enum Hint {
    /// The endpoint carries no hint of this kind.
    Absent,
    /// It has hints, none for this node (or its zone).
    Elsewhere,
    /// One of its hints is for this node (or its zone).
    Here,
}

impl Hint {
    pub(super) fn of<'a>(names: Option<impl Iterator<Item = &'a str>>, ours: Option<&str>) -> Hint {
        let Some(mut names) = names.map(|n| n.peekable()) else { return Hint::Absent };
        if names.peek().is_none() {
            return Hint::Absent;
        }
        if names.any(|n| Some(n) == ours) { Hint::Here } else { Hint::Elsewhere }
    }
}

/// One EndpointSlice as the translation keeps it: which Service it joins, its parsed
/// endpoints, and the warnings it gives.
pub(super) struct SliceParse {
    /// The Service its `kubernetes.io/service-name` label names (same namespace).
    pub(super) service: Option<ObjectId>,
    /// `None` for FQDN slices, unknown address types and slices joining no Service.
    pub(super) parsed: Option<ParsedSlice>,
    pub(super) warnings: Vec<Warning>,
}

/// Parse one named slice (`id` from its metadata).
pub(super) fn parse_slice_object(slice: &EndpointSlice, id: &ObjectId, node: &NodeInfo) -> SliceParse {
    let mut warnings = Warnings::default();
    // Without the label a slice joins no Service (upstream's EndpointSliceCache reports it
    // as an error too): say so, instead of silently giving no endpoints.
    let Some(service) = non_empty(label(&slice.metadata, LABEL_SERVICE_NAME)) else {
        warnings.push(KIND_SLICE, id.to_string(), Problem::NoServiceNameLabel);
        return SliceParse { service: None, parsed: None, warnings: warnings.0 };
    };
    let service = ObjectId::new(id.namespace(), service);
    let parsed = match IpFamily::from_k8s(&slice.address_type) {
        Some(family) => {
            let mut problems = Vec::new();
            let parsed = parse_slice(slice, id, family, node, &mut problems);
            for problem in problems {
                warnings.push(KIND_SLICE, id.to_string(), problem);
            }
            Some(parsed)
        }
        // FQDN slices are for DNS, never proxied.
        None if slice.address_type == "FQDN" => None,
        None => {
            warnings.push(KIND_SLICE, id.to_string(), Problem::UnknownAddressType(slice.address_type.clone()));
            None
        }
    };
    SliceParse { service: Some(service), parsed, warnings: warnings.0 }
}

/// The slice's `endpoints.kubernetes.io/last-change-trigger-time` (RFC 3339, as the
/// EndpointSlice controller writes it): `None` without the annotation, the annotation's
/// value as the error when it is not a time.
pub(super) fn trigger_time(slice: &EndpointSlice) -> Option<Result<std::time::SystemTime, String>> {
    let raw = slice.metadata.annotations.as_ref()?.get(ANNOTATION_TRIGGER_TIME)?;
    Some(raw.parse::<k8s_openapi::jiff::Timestamp>().map(std::time::SystemTime::from).map_err(|_| raw.clone()))
}

/// Parse every slice once and group the results by owning Service (for `explain`).
pub(super) fn index_slices(slices: &[&EndpointSlice], node: &NodeInfo) -> BTreeMap<ObjectId, Vec<ParsedSlice>> {
    let mut index: BTreeMap<ObjectId, Vec<ParsedSlice>> = BTreeMap::new();
    for slice in sorted_by_name(slices, |s| &s.metadata) {
        let Some(id) = id_from_meta(&slice.metadata) else { continue };
        let p = parse_slice_object(slice, &id, node);
        if let (Some(service), Some(parsed)) = (p.service, p.parsed) {
            index.entry(service).or_default().push(parsed);
        }
    }
    index
}

pub(super) fn parse_slice(
    slice: &EndpointSlice,
    id: &ObjectId,
    family: IpFamily,
    node: &NodeInfo,
    problems: &mut Vec<Problem>,
) -> ParsedSlice {
    let ports = slice
        .ports
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(index, port)| {
            parse_slice_port(index, port).unwrap_or_else(|p| {
                problems.push(p);
                None
            })
        })
        .collect();
    let mut endpoints = Vec::new();
    let mut zones: Vec<Box<[Box<str>]>> = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        match parse_endpoint(ep, family, node) {
            Ok(parsed) => {
                let names: Box<[Box<str>]> = ep
                    .hints
                    .iter()
                    .flat_map(|h| h.for_zones.iter().flatten())
                    .map(|z| z.name.as_str().into())
                    .collect();
                if !names.is_empty() && zones.is_empty() {
                    zones.resize(endpoints.len(), Box::default());
                }
                if !names.is_empty() || !zones.is_empty() {
                    zones.push(names);
                }
                endpoints.push(parsed);
            }
            Err(problem) => problems.push(problem),
        }
    }
    let owned_by_service = slice.metadata.owner_references.iter().flatten().any(|o| o.kind == KIND_SERVICE);
    // Kept for the slice's lifetime: no room to grow (a Vec grown by pushes keeps up to
    // twice its length).
    endpoints.shrink_to_fit();
    zones.shrink_to_fit();
    ParsedSlice { id: id.clone(), family, owned_by_service, ports, endpoints, zones }
}

/// `Ok(None)`: a port without a number, ignored like upstream does.
pub(super) fn parse_slice_port(index: usize, port: &EndpointPort) -> Result<Option<SlicePort>, Problem> {
    let name = port.name.clone().unwrap_or_default();
    let value = match port.port {
        None | Some(0) => return Ok(None),
        Some(value) => value,
    };
    let number = valid_port(value).ok_or_else(|| Problem::BadSlicePort { port: port_label(index, &name), value })?;
    let proto = Protocol::from_k8s(port.protocol.as_deref()).ok_or_else(|| Problem::UnknownSliceProtocol {
        port: port_label(index, &name),
        protocol: port.protocol.clone().unwrap_or_default(),
    })?;
    Ok(Some(SlicePort { name, port: number, proto }))
}

pub(super) fn parse_endpoint(ep: &Endpoint, family: IpFamily, node: &NodeInfo) -> Result<ParsedEndpoint, Problem> {
    // Addresses are fungible and upstream only ever uses the first one.
    let raw = ep.addresses.first().ok_or(Problem::EndpointWithoutAddress)?;
    let addr = parse_ip(raw).ok_or_else(|| Problem::BadEndpointAddress(raw.clone()))?;
    // Upstream's EndpointSliceCache skips an endpoint whose address is not of the
    // proxier's family ("incorrect IP version"); here the slice's addressType says which.
    if IpFamily::of(addr) != family {
        return Err(Problem::EndpointOfOtherFamily { ip: addr.to_string(), family });
    }
    // API semantics: nil ready = ready, nil serving = defer to ready, nil terminating = false.
    let conditions = ep.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    let local = non_empty(ep.node_name.as_deref()).is_some_and(|n| n == node.name);
    let hints = ep.hints.as_ref();
    let zone_hint = Hint::of(
        hints.and_then(|h| h.for_zones.as_ref()).map(|z| z.iter().map(|z| z.name.as_str())),
        node.zone.as_deref(),
    );
    let node_hint = Hint::of(
        hints.and_then(|h| h.for_nodes.as_ref()).map(|n| n.iter().map(|n| n.name.as_str())),
        Some(node.name.as_str()),
    );
    Ok(ParsedEndpoint { addr, local, ready, serving, terminating, zone_hint, node_hint })
}
