//! EndpointSlices: parsed once each, grouped by the Service they belong to.
use super::*;

/// All usable endpoint data of one Service, merged from its slices (both families).
#[derive(Default)]
pub(super) struct ServiceEndpoints {
    pub(super) slices: Vec<ParsedSlice>,
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

/// Parse every slice once and group the results by owning Service.
pub(super) fn index_slices(
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    warnings: &mut Warnings,
) -> BTreeMap<ObjectId, ServiceEndpoints> {
    let mut index: BTreeMap<ObjectId, ServiceEndpoints> = BTreeMap::new();
    for slice in sorted_by_name(slices, |s| &s.metadata) {
        let Some(slice_id) = ObjectId::from_meta(&slice.metadata) else {
            warnings.push(KIND_SLICE, missing_id(&slice.metadata), Problem::MissingMetadata);
            continue;
        };
        // Without the label a slice joins no Service (upstream's EndpointSliceCache
        // reports it as an error too): say so, instead of silently giving no endpoints.
        let Some(service) = non_empty(label(&slice.metadata, LABEL_SERVICE_NAME)) else {
            warnings.push(KIND_SLICE, slice_id.to_string(), Problem::NoServiceNameLabel);
            continue;
        };
        let service_id = ObjectId { namespace: slice_id.namespace.clone(), name: service.to_owned() };
        let group = index.entry(service_id).or_default();
        match IpFamily::from_k8s(&slice.address_type) {
            Some(family) => {
                let mut problems = Vec::new();
                let parsed = parse_slice(slice, &slice_id, family, node, &mut problems);
                for problem in problems {
                    warnings.push(KIND_SLICE, slice_id.to_string(), problem);
                }
                group.slices.push(parsed);
            }
            // FQDN slices are for DNS, never proxied.
            None if slice.address_type == "FQDN" => {}
            None => {
                warnings.push(KIND_SLICE, slice_id.to_string(), Problem::UnknownAddressType(slice.address_type.clone()))
            }
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
    let endpoints = slice
        .endpoints
        .iter()
        .flatten()
        .filter_map(|ep| match parse_endpoint(ep, family, node) {
            Ok(parsed) => Some(parsed),
            Err(problem) => {
                problems.push(problem);
                None
            }
        })
        .collect();
    let owned_by_service = slice.metadata.owner_references.iter().flatten().any(|o| o.kind == KIND_SERVICE);
    ParsedSlice { id: id.clone(), family, owned_by_service, ports, endpoints }
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
