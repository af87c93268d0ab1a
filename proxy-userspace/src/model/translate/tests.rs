use std::collections::BTreeMap;

use FrontendKind::{ClusterIP, ExternalIP, LoadBalancer, NodePort};
use Protocol::{Sctp, Tcp, Udp};
use Scope::{External, Internal};
use serde_json::{Value, json};

use super::*;
use crate::model::types::{
    BackendAddr, BackendWeight, ClaimHolder, ClaimKey, Explanation, FrontendEntry, FrontendKey, FrontendKind,
    HealthCheck, IpFamily, IpPrefix, LbAlgorithm, Protocol, Reason, Scope, ServicePortName,
};

const NODE: &str = "node-a";
const ZONE: &str = "zone-a";
const NODE_IP: &str = "192.168.1.10";

// --- builders --------------------------------------------------------------------

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node() -> NodeInfo {
    NodeInfo { name: NODE.into(), nodeport_addrs: vec![ip(NODE_IP)], zone: Some(ZONE.into()) }
}

/// Shallow-merge `overrides` into the JSON object `base` (`null` removes a key).
fn merged(mut base: Value, overrides: Value) -> Value {
    if let (Some(base), Value::Object(overrides)) = (base.as_object_mut(), overrides) {
        for (k, v) in overrides {
            if v.is_null() {
                base.remove(&k);
            } else {
                base.insert(k, v);
            }
        }
    }
    base
}

/// Service "default/<name>": ClusterIP 10.96.0.1, one unnamed TCP port 80; `spec`
/// overrides keys of that default spec.
fn svc(name: &str, spec: Value) -> Service {
    svc_full(json!({"namespace": "default", "name": name}), spec, json!(null))
}

/// Service with explicit metadata, spec overrides and status.
fn svc_full(metadata: Value, spec: Value, status: Value) -> Service {
    let spec = merged(json!({"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}), spec);
    serde_json::from_value(json!({"metadata": metadata, "spec": spec, "status": status})).unwrap()
}

fn lb_status(ingress: Value) -> Value {
    json!({"loadBalancer": {"ingress": ingress}})
}

/// IPv4 EndpointSlice "default/<name>" for service "default/<service>".
fn slice(name: &str, service: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    slice_json(json!({
        "metadata": {"namespace": "default", "name": name,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
    }))
}

fn slice_json(v: Value) -> EndpointSlice {
    serde_json::from_value(v).unwrap()
}

/// The slice port matching the default service port ("" / TCP) -> 8080.
fn p8080() -> Value {
    json!([{"name": "", "port": 8080, "protocol": "TCP"}])
}

/// A ready endpoint (conditions absent) on `node`.
fn ep(addr: &str, node: &str) -> Value {
    json!({"addresses": [addr], "nodeName": node})
}

/// An endpoint with explicit conditions (`None` = field absent).
fn ep_cond(addr: &str, node: &str, ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Value {
    json!({"addresses": [addr], "nodeName": node,
           "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

fn be(addr: &str, port: u16, local: bool) -> BackendAddr {
    BackendAddr { addr: ip(addr), port, local, terminating: false }
}

fn be_term(addr: &str, port: u16, local: bool) -> BackendAddr {
    BackendAddr { terminating: true, ..be(addr, port, local) }
}

fn key(addr: &str, port: u16, proto: Protocol, scope: Scope) -> FrontendKey {
    FrontendKey { addr: ip(addr), port, proto, scope }
}

/// Expected entry for "default/<svc>" port `port_name`; local_only false, no affinity,
/// no source ranges (override with struct-update syntax).
fn entry(svc: &str, port_name: &str, kind: FrontendKind, backends: Vec<BackendAddr>) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName::new("default", svc, port_name),
        kind,
        backends,
        affinity_timeout: None,
        local_only: false,
        source_ranges: vec![],
        lb_algorithm: None,
        weights: vec![],
    }
}

fn local_only(e: FrontendEntry) -> FrontendEntry {
    FrontendEntry { local_only: true, ..e }
}

fn run(services: &[Service], slices: &[EndpointSlice]) -> (DesiredState, Vec<Warning>) {
    translate(services, slices, &node())
}

fn state(entries: Vec<(FrontendKey, FrontendEntry)>) -> DesiredState {
    entries.into_iter().collect()
}

/// Each expected warning: (kind, object, fragment of the message), in order.
#[track_caller]
fn assert_warnings(actual: &[Warning], expected: &[(&str, &str, &str)]) {
    let ok = actual.len() == expected.len()
        && actual
            .iter()
            .zip(expected)
            .all(|(w, (kind, object, msg))| w.kind == *kind && w.object == *object && w.message.contains(msg));
    assert!(ok, "warnings differ:\n actual:   {actual:#?}\n expected: {expected:#?}");
}

#[track_caller]
fn assert_translates(
    services: &[Service],
    slices: &[EndpointSlice],
    expected: Vec<(FrontendKey, FrontendEntry)>,
    warnings: &[(&str, &str, &str)],
) {
    let (actual, actual_warnings) = run(services, slices);
    assert_eq!(actual, state(expected));
    assert_warnings(&actual_warnings, warnings);
}

/// The standard "default/web" ClusterIP frontend with the given backends.
fn web_cluster_ip(backends: Vec<BackendAddr>) -> (FrontendKey, FrontendEntry) {
    (key("10.96.0.1", 80, Tcp, Internal), entry("web", "", ClusterIP, backends))
}

/// A service "default/good" on 10.96.0.2 with one local backend, programmed alongside
/// malformed objects to show they do not disturb others.
fn good() -> (Service, EndpointSlice, (FrontendKey, FrontendEntry)) {
    (
        svc("good", json!({"clusterIP": "10.96.0.2"})),
        slice("good-1", "good", p8080(), json!([ep("10.0.0.9", NODE)])),
        (key("10.96.0.2", 80, Tcp, Internal), entry("good", "", ClusterIP, vec![be("10.0.0.9", 8080, true)])),
    )
}

// --- basic ClusterIP -----------------------------------------------------------

#[test]
fn cluster_ip_with_backends() {
    assert_translates(
        &[svc("web", json!({}))],
        &[slice("web-1", "web", p8080(), json!([ep("10.0.0.2", "node-b"), ep("10.0.0.1", NODE)]))],
        vec![web_cluster_ip(vec![be("10.0.0.1", 8080, true), be("10.0.0.2", 8080, false)])],
        &[],
    );
}

#[test]
fn no_endpoints_gives_empty_backends() {
    assert_translates(&[svc("web", json!({}))], &[], vec![web_cluster_ip(vec![])], &[]);
}

#[test]
fn skipped_services_are_silent() {
    let cases: Vec<(&str, Service)> = vec![
        ("ExternalName", svc("web", json!({"type": "ExternalName", "externalName": "x.example"}))),
        ("headless clusterIP", svc("web", json!({"clusterIP": "None"}))),
        ("headless clusterIPs", svc("web", json!({"clusterIP": "None", "clusterIPs": ["None"]}))),
        ("no cluster IP", svc("web", json!({"clusterIP": null}))),
        ("empty cluster IP", svc("web", json!({"clusterIP": "", "clusterIPs": []}))),
        (
            "no cluster IP, NodePort type",
            svc("web", json!({"clusterIP": null, "type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]})),
        ),
        (
            "service-proxy-name label",
            svc_full(
                json!({"namespace": "default", "name": "web",
                       "labels": {"service.kubernetes.io/service-proxy-name": "other"}}),
                json!({}),
                json!(null),
            ),
        ),
        ("no spec", serde_json::from_value(json!({"metadata": {"namespace": "default", "name": "web"}})).unwrap()),
    ];
    let slices = [slice("web-1", "web", p8080(), json!([ep("10.0.0.1", NODE)]))];
    for (name, service) in cases {
        let (state, warnings) = run(&[service], &slices);
        assert!(state.frontends.is_empty(), "{name}: {state:?}");
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
    }
}

#[test]
fn cluster_ips_preferred_over_cluster_ip_and_all_ipv4_used() {
    let service = svc("web", json!({"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "10.96.0.7"]}));
    assert_translates(
        &[service],
        &[],
        vec![web_cluster_ip(vec![]), (key("10.96.0.7", 80, Tcp, Internal), entry("web", "", ClusterIP, vec![]))],
        &[],
    );
}

#[test]
fn protocols_and_named_ports() {
    let service = svc(
        "web",
        json!({"ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53},
            {"name": "sig", "port": 9000, "protocol": "SCTP"},
        ]}),
    );
    let ports = json!([
        {"name": "dns", "port": 5353, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 5354, "protocol": "TCP"},
        {"name": "sig", "port": 9900, "protocol": "SCTP"},
    ]);
    let slices = [slice("web-1", "web", ports, json!([ep("10.0.0.1", NODE)]))];
    assert_translates(
        &[service],
        &slices,
        vec![
            (key("10.96.0.1", 53, Udp, Internal), entry("web", "dns", ClusterIP, vec![be("10.0.0.1", 5353, true)])),
            (key("10.96.0.1", 53, Tcp, Internal), entry("web", "dns-tcp", ClusterIP, vec![be("10.0.0.1", 5354, true)])),
            (key("10.96.0.1", 9000, Sctp, Internal), entry("web", "sig", ClusterIP, vec![be("10.0.0.1", 9900, true)])),
        ],
        // 9000 -> 9900 needs the port rewritten, which the datapath refuses for SCTP.
        &[("Service", "default/web", "SCTP frontends 10.96.0.1:9000 need a port rewritten")],
    );
}

// --- Dual-stack and IPv6 ------------------------------------------------------------
//
// Upstream runs one proxier per family (MetaProxier); each sees a Service only through
// `GetClusterIPByFamily` and filters everything else of the Service by its family
// (`newBaseServiceInfo`), and each family's EndpointsChangeTracker takes only slices of
// its `addressType`. Every row names the rule it follows.

const NODE_IP6: &str = "fd00:1::10";

/// IPv6 EndpointSlice "default/<name>" for service "default/<service>".
fn slice6(name: &str, service: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    slice_json(json!({
        "metadata": {"namespace": "default", "name": name,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv6", "ports": ports, "endpoints": endpoints,
    }))
}

fn dual_node() -> NodeInfo {
    NodeInfo { name: NODE.into(), nodeport_addrs: vec![ip(NODE_IP), ip(NODE_IP6)], zone: Some(ZONE.into()) }
}

/// "default/web", dual-stack: 10.96.0.1 and fd00::1 (`spec` overrides).
fn dual(spec: Value, status: Value) -> Service {
    let spec = merged(
        json!({"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00::1"],
               "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}),
        spec,
    );
    svc_full(json!({"namespace": "default", "name": "web"}), spec, status)
}

/// One IPv4 and one IPv6 slice of "web", each with one local endpoint on 8080.
fn dual_slices() -> [EndpointSlice; 2] {
    [
        slice("web-v4", "web", p8080(), json!([ep("10.0.0.1", NODE)])),
        slice6("web-v6", "web", p8080(), json!([ep("fd00:10::1", NODE)])),
    ]
}

/// Rule: every address of `clusterIPs` is served in its family, and each family's
/// frontends get the endpoints of that family's slices only (upstream: one proxier per
/// family; EndpointsChangeTracker skips slices of the other `addressType`).
#[test]
fn dual_stack_cluster_ips_join_their_family_slices() {
    let (actual, warnings) = translate(&[dual(json!({}), json!(null))], &dual_slices(), &dual_node());
    let expected = state(vec![
        web_cluster_ip(vec![be("10.0.0.1", 8080, true)]),
        (key("fd00::1", 80, Tcp, Internal), entry("web", "", ClusterIP, vec![be("fd00:10::1", 8080, true)])),
    ]);
    assert_eq!(actual, expected);
    assert_warnings(&warnings, &[]);
}

/// Rule: an IPv6-only Service on an IPv6-only node works with no IPv4 anywhere: its
/// ClusterIP and its NodePort on the node's IPv6 addresses (upstream's IPv4 proxier gets
/// "" from GetClusterIPByFamily and skips the Service; the IPv6 one serves it).
#[test]
fn ipv6_only_service_on_an_ipv6_only_node() {
    let service = svc(
        "web",
        json!({"clusterIP": "fd00::1", "clusterIPs": ["fd00::1"], "ipFamilies": ["IPv6"],
               "ipFamilyPolicy": "SingleStack", "type": "NodePort",
               "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    let slices = [slice6("web-1", "web", p8080(), json!([ep("fd00:10::1", NODE), ep("fd00:10::2", "node-b")]))];
    let node = NodeInfo { name: NODE.into(), nodeport_addrs: vec![ip(NODE_IP6)], zone: None };
    let (actual, warnings) = translate(&[service], &slices, &node);
    let b = vec![be("fd00:10::1", 8080, true), be("fd00:10::2", 8080, false)];
    let mut expected = vec![(key("fd00::1", 80, Tcp, Internal), entry("web", "", ClusterIP, b.clone()))];
    for scope in [Internal, External] {
        expected.push((key(NODE_IP6, 30080, Tcp, scope), entry("web", "", NodePort, b.clone())));
    }
    assert_eq!(actual, state(expected));
    assert_warnings(&warnings, &[]);
    assert!(actual.frontends.keys().all(|k| k.addr.is_ipv6()));
}

/// Rule: a single-stack IPv4 Service is not served over IPv6 at all, not even its
/// NodePort on the node's IPv6 addresses, and its IPv6 slices are unused (the IPv6
/// proxier skips a Service without an IPv6 clusterIP). No warning: a dual-stack
/// EndpointSlice controller writes IPv6 slices for it as a matter of course.
#[test]
fn single_stack_ipv4_service_is_not_served_over_ipv6() {
    let service = svc(
        "web",
        json!({"ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                                     "type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    let (actual, warnings) = translate(&[service], &dual_slices(), &dual_node());
    let b = vec![be("10.0.0.1", 8080, true)];
    let mut expected = vec![web_cluster_ip(b.clone())];
    for scope in [Internal, External] {
        expected.push((key(NODE_IP, 30080, Tcp, scope), entry("web", "", NodePort, b.clone())));
    }
    assert_eq!(actual, state(expected));
    assert_warnings(&warnings, &[]);
}

/// Rule: kube-proxy never reads `ipFamilyPolicy`; it serves what the API server
/// allocated. PreferDualStack on a single-stack cluster has one clusterIP: one family.
#[test]
fn ip_family_policy_does_not_change_what_is_served() {
    let rows = [
        ("PreferDualStack, one family allocated", json!(["10.96.0.1"]), json!(["IPv4"]), 1),
        ("PreferDualStack, both allocated", json!(["10.96.0.1", "fd00::1"]), json!(["IPv4", "IPv6"]), 2),
        ("RequireDualStack, IPv6 primary", json!(["fd00::1", "10.96.0.1"]), json!(["IPv6", "IPv4"]), 2),
    ];
    for (name, ips, families, n) in rows {
        let policy = if name.starts_with("Prefer") { "PreferDualStack" } else { "RequireDualStack" };
        let service = dual(json!({"clusterIPs": ips, "ipFamilies": families, "ipFamilyPolicy": policy}), json!(null));
        let (actual, warnings) = translate(&[service], &dual_slices(), &dual_node());
        assert_eq!(actual.frontends.len(), n, "{name}: {actual:?}");
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
    }
}

/// Rule: externalIPs and load-balancer ingress IPs of both families, each served in
/// its family with that family's backends, and NodePorts on each family's node
/// addresses (upstream's `MapIPsByIPFamily` for externalIPs, `GetIPFamilyFromIP` for
/// ingress IPs, `NodePortAddresses` per family).
#[test]
fn external_and_load_balancer_ips_of_both_families() {
    let service = dual(
        json!({"type": "LoadBalancer", "externalIPs": ["203.0.113.1", "2001:db8::1"],
               "ports": [{"port": 80, "nodePort": 30080}]}),
        lb_status(json!([{"ip": "198.51.100.1"}, {"ip": "2001:db8:ff::1"}])),
    );
    let (actual, warnings) = translate(&[service], &dual_slices(), &dual_node());
    let b4 = vec![be("10.0.0.1", 8080, true)];
    let b6 = vec![be("fd00:10::1", 8080, true)];
    let mut expected =
        vec![web_cluster_ip(b4.clone()), (key("fd00::1", 80, Tcp, Internal), entry("web", "", ClusterIP, b6.clone()))];
    for scope in [Internal, External] {
        for (addr, port, kind, b) in [
            (NODE_IP, 30080, NodePort, &b4),
            (NODE_IP6, 30080, NodePort, &b6),
            ("203.0.113.1", 80, ExternalIP, &b4),
            ("2001:db8::1", 80, ExternalIP, &b6),
            ("198.51.100.1", 80, LoadBalancer, &b4),
            ("2001:db8:ff::1", 80, LoadBalancer, &b6),
        ] {
            expected.push((key(addr, port, Tcp, scope), entry("web", "", kind, b.clone())));
        }
    }
    assert_eq!(actual, state(expected));
    assert_warnings(&warnings, &[]);
}

/// Rule: an externalIP of a family the Service has no clusterIP of is served nowhere
/// (neither upstream proxier takes it); we say so, naming the Service. Ingress IPs and
/// source ranges of that family are dropped silently: a proxying load balancer may use
/// an IP of the other family (upstream: "irrelevant to kube-proxy"), and templates list
/// ranges of both families.
#[test]
fn addresses_of_a_family_the_service_lacks_are_warned() {
    let service = svc_full(
        json!({"namespace": "default", "name": "web"}),
        json!({"type": "LoadBalancer", "externalIPs": ["2001:db8::1"],
               "loadBalancerSourceRanges": ["2001:db8::/32"], "ports": [{"port": 80}]}),
        lb_status(json!([{"ip": "2001:db8:ff::1"}])),
    );
    assert_translates(
        &[service],
        &[],
        vec![web_cluster_ip(vec![])],
        &[("Service", "default/web", "externalIP 2001:db8::1 is IPv6 but the service has no IPv6 clusterIP")],
    );
}

/// Rule: loadBalancerSourceRanges constrain the frontends of their own family only;
/// with ranges of one family only, the other family's LB IPs are open (upstream's
/// `MapCIDRsByIPFamily` leaves that proxier no ranges, so it writes no firewall chain).
#[test]
fn source_ranges_constrain_their_own_family_only() {
    type Ranges<'a> = Vec<(&'a str, u8)>;
    let rows: [(&str, Value, Ranges, Ranges); 3] = [
        ("both", json!(["10.0.0.0/8", "2001:db8::/32"]), vec![("10.0.0.0", 8)], vec![("2001:db8::", 32)]),
        ("IPv6 only", json!(["2001:db8::5/32"]), vec![], vec![("2001:db8::", 32)]),
        ("IPv4 only", json!(["10.0.0.0/8"]), vec![("10.0.0.0", 8)], vec![]),
    ];
    for (name, ranges, want4, want6) in rows {
        let service = dual(
            json!({"type": "LoadBalancer", "loadBalancerSourceRanges": ranges}),
            lb_status(json!([{"ip": "198.51.100.1"}, {"ip": "2001:db8:ff::1"}])),
        );
        let (actual, warnings) = translate(&[service], &[] as &[EndpointSlice], &dual_node());
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        let prefixes = |r: &[(&str, u8)]| r.iter().map(|&(a, len)| IpPrefix { addr: ip(a), len }).collect::<Vec<_>>();
        for scope in [Internal, External] {
            assert_eq!(
                actual.frontends[&key("198.51.100.1", 80, Tcp, scope)].source_ranges,
                prefixes(&want4),
                "{name}"
            );
            assert_eq!(
                actual.frontends[&key("2001:db8:ff::1", 80, Tcp, scope)].source_ranges,
                prefixes(&want6),
                "{name}"
            );
        }
    }
}

/// Rule: `clusterIPs[i]` pairs with `ipFamilies[i]` (upstream's `GetClusterIPByFamily`
/// indexes one by the other). An address contradicting its family entry is skipped with
/// a warning; with none left the Service is skipped; an unknown family name is warned
/// about and the address still served by its own family.
#[test]
fn cluster_ips_checked_against_ip_families() {
    let swapped = dual(json!({"ipFamilies": ["IPv6", "IPv4"]}), json!(null));
    assert_translates(&[swapped], &[], vec![], &[("Service", "default/web", "no clusterIP matches")]);

    let second_wrong = dual(json!({"clusterIPs": ["10.96.0.1", "10.96.0.9"]}), json!(null));
    assert_translates(
        &[second_wrong],
        &[],
        vec![web_cluster_ip(vec![])],
        &[("Service", "default/web", "clusterIPs[1] 10.96.0.9 is not an IPv6 address")],
    );

    let unknown = dual(json!({"ipFamilies": ["IPv4", "IPv7"]}), json!(null));
    assert_translates(
        &[unknown],
        &[],
        vec![web_cluster_ip(vec![]), (key("fd00::1", 80, Tcp, Internal), entry("web", "", ClusterIP, vec![]))],
        &[("Service", "default/web", "unknown spec.ipFamilies entry \"IPv7\"")],
    );

    // Objects written before dual-stack carry no ipFamilies: the address decides.
    let legacy = svc("web", json!({"clusterIP": "fd00::1", "clusterIPs": null}));
    assert_translates(
        &[legacy],
        &[],
        vec![(key("fd00::1", 80, Tcp, Internal), entry("web", "", ClusterIP, vec![]))],
        &[],
    );
}

/// Rule: an endpoint whose address is not of its slice's `addressType` is skipped
/// (upstream's EndpointSliceCache drops "incorrect IP version" endpoints), with one
/// warning naming the slice.
#[test]
fn endpoint_of_the_other_family_is_skipped_with_a_warning() {
    let slices = [
        slice("web-v4", "web", p8080(), json!([ep("10.0.0.1", NODE), ep("fd00:10::5", NODE)])),
        slice6("web-v6", "web", p8080(), json!([ep("10.0.0.6", NODE), ep("fd00:10::1", NODE)])),
    ];
    let (actual, warnings) = translate(&[dual(json!({}), json!(null))], &slices, &dual_node());
    assert_eq!(
        actual,
        state(vec![
            web_cluster_ip(vec![be("10.0.0.1", 8080, true)]),
            (key("fd00::1", 80, Tcp, Internal), entry("web", "", ClusterIP, vec![be("fd00:10::1", 8080, true)])),
        ])
    );
    assert_warnings(
        &warnings,
        &[
            ("EndpointSlice", "default/web-v4", "fd00:10::5 is not an IPv4 address"),
            ("EndpointSlice", "default/web-v6", "10.0.0.6 is not an IPv6 address"),
        ],
    );
}

/// Rule: traffic policies apply per family (each proxier categorises its own
/// endpoints); the health check counts the primary family's local endpoints, so a
/// dual-stack pod counts once (each upstream proxier reports its own family).
#[test]
fn dual_stack_local_policy_and_health_check() {
    let service = dual(
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
               "ports": [{"port": 80, "nodePort": 30080}]}),
        lb_status(json!([{"ip": "2001:db8:ff::1"}])),
    );
    let slices = [
        slice("web-v4", "web", p8080(), json!([ep("10.0.0.1", NODE), ep("10.0.0.2", "node-b")])),
        slice6("web-v6", "web", p8080(), json!([ep("fd00:10::1", NODE), ep("fd00:10::2", "node-b")])),
    ];
    let (actual, warnings) = translate(&[service], &slices, &dual_node());
    assert_warnings(&warnings, &[]);
    let lb = &actual.frontends[&key("2001:db8:ff::1", 80, Tcp, External)];
    assert!(lb.local_only);
    assert_eq!(lb.backends, vec![be("fd00:10::1", 8080, true)]);
    let np6 = &actual.frontends[&key(NODE_IP6, 30080, Tcp, Internal)];
    assert_eq!(np6.backends, vec![be("fd00:10::1", 8080, true), be("fd00:10::2", 8080, false)]);
    assert_eq!(actual.health_checks[&32000].local_endpoints, 1);
}

/// Rule: claims are per address, whatever the family: two Services asking for one IPv6
/// clusterIP resolve like IPv4 ones (first in namespace/name order).
#[test]
fn ipv6_claims_conflict_like_ipv4() {
    let a = svc("a", json!({"clusterIP": "fd00::1", "clusterIPs": ["fd00::1"], "ipFamilies": ["IPv6"]}));
    let b = svc("b", json!({"clusterIP": "fd00::1", "clusterIPs": ["fd00::1"], "ipFamilies": ["IPv6"]}));
    assert_translates(
        &[b, a],
        &[],
        vec![(key("fd00::1", 80, Tcp, Internal), entry("a", "", ClusterIP, vec![]))],
        &[("Service", "default/b", "[fd00::1]:80/TCP (ClusterIP, used by ClusterIP of default/a)")],
    );
}

// --- NodePort / externalIPs / LoadBalancer --------------------------------------

#[test]
fn node_port_in_both_scopes_on_every_node_address() {
    let service = svc("web", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}));
    let slices = [slice("web-1", "web", p8080(), json!([ep("10.0.0.1", NODE)]))];
    let node =
        NodeInfo { name: NODE.into(), nodeport_addrs: vec![ip(NODE_IP), ip("10.1.0.10"), ip(NODE_IP)], zone: None };
    let (actual, warnings) = translate(&[service], &slices, &node);
    let b = vec![be("10.0.0.1", 8080, true)];
    let mut expected = vec![web_cluster_ip(b.clone())];
    for addr in [NODE_IP, "10.1.0.10"] {
        for scope in [Internal, External] {
            expected.push((key(addr, 30080, Tcp, scope), entry("web", "", NodePort, b.clone())));
        }
    }
    assert_eq!(actual, state(expected));
    assert_warnings(&warnings, &[]);
}

#[test]
fn node_port_only_for_node_port_and_load_balancer_types() {
    let cases = [
        ("ClusterIP type ignores nodePort", json!({"ports": [{"port": 80, "nodePort": 30080}]})),
        ("nodePort 0", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 0}]})),
        ("nodePort absent", json!({"type": "LoadBalancer", "ports": [{"port": 80}]})),
    ];
    for (name, spec) in cases {
        let (actual, warnings) = run(&[svc("web", spec)], &[]);
        assert_eq!(actual, state(vec![web_cluster_ip(vec![])]), "{name}");
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
    }
}

#[test]
fn external_ips_in_both_scopes() {
    let service = svc("web", json!({"externalIPs": ["203.0.113.1", "203.0.113.1"]}));
    assert_translates(
        &[service],
        &[],
        vec![
            web_cluster_ip(vec![]),
            (key("203.0.113.1", 80, Tcp, Internal), entry("web", "", ExternalIP, vec![])),
            (key("203.0.113.1", 80, Tcp, External), entry("web", "", ExternalIP, vec![])),
        ],
        &[],
    );
}

/// Upstream parses every address and CIDR of an object with `netutils.ParseIPSloppy`
/// / `ParseCIDRSloppy` (kube-proxy's `proxy/util`), which read IPv4 octets with leading
/// zeros as decimal; objects stored before the API server rejected them still carry
/// such addresses, and kube-proxy serves them instead of dropping the Service.
#[test]
fn addresses_with_leading_zeros_parse_as_decimal() {
    let service = svc_full(
        json!({"namespace": "default", "name": "web"}),
        json!({
            "clusterIP": "10.096.000.001",
            "type": "LoadBalancer",
            "ports": [{"port": 80, "nodePort": 30080}],
            "externalIPs": ["203.000.113.001"],
            "loadBalancerSourceRanges": ["192.0.002.000/024"],
        }),
        lb_status(json!([{"ip": "198.051.100.001"}])),
    );
    let slices = [slice("web-1", "web", p8080(), json!([ep("10.000.000.001", NODE)]))];
    let backends = vec![be("10.0.0.1", 8080, true)];
    let ranges = vec![IpPrefix { addr: ip("192.0.2.0"), len: 24 }];
    let mut expected = vec![web_cluster_ip(backends.clone())];
    for scope in [Internal, External] {
        expected.push((key(NODE_IP, 30080, Tcp, scope), entry("web", "", NodePort, backends.clone())));
        expected.push((key("203.0.113.1", 80, Tcp, scope), entry("web", "", ExternalIP, backends.clone())));
        let lb = FrontendEntry { source_ranges: ranges.clone(), ..entry("web", "", LoadBalancer, backends.clone()) };
        expected.push((key("198.51.100.1", 80, Tcp, scope), lb));
    }
    assert_translates(&[service], &slices, expected, &[]);
}

#[test]
fn load_balancer_ingress_ips() {
    let service = svc_full(
        json!({"namespace": "default", "name": "web"}),
        json!({"type": "LoadBalancer", "ports": [{"port": 80, "nodePort": 30080}]}),
        lb_status(json!([
            {"ip": "198.51.100.1"},
            {"ip": "198.51.100.2", "ipMode": "VIP"},
            {"ip": "198.51.100.3", "ipMode": "Proxy"},
            {"hostname": "lb.example"},
        ])),
    );
    let mut expected = vec![web_cluster_ip(vec![])];
    for scope in [Internal, External] {
        expected.push((key(NODE_IP, 30080, Tcp, scope), entry("web", "", NodePort, vec![])));
        for lb in ["198.51.100.1", "198.51.100.2"] {
            expected.push((key(lb, 80, Tcp, scope), entry("web", "", LoadBalancer, vec![])));
        }
    }
    assert_translates(&[service], &[], expected, &[]);
}

#[test]
fn ingress_ignored_unless_load_balancer_type() {
    let service = svc_full(
        json!({"namespace": "default", "name": "web"}),
        json!({"type": "ClusterIP"}),
        lb_status(json!([{"ip": "198.51.100.1"}])),
    );
    assert_translates(&[service], &[], vec![web_cluster_ip(vec![])], &[]);
}

// --- EndpointSlice joining and port resolution ------------------------------------

#[test]
fn slices_merged_and_duplicates_removed() {
    let slices = [
        slice("web-1", "web", p8080(), json!([ep("10.0.0.1", NODE), ep("10.0.0.2", "node-b")])),
        slice("web-2", "web", p8080(), json!([ep("10.0.0.2", "node-b"), ep("10.0.0.3", "node-b")])),
    ];
    assert_translates(
        &[svc("web", json!({}))],
        &slices,
        vec![web_cluster_ip(vec![
            be("10.0.0.1", 8080, true),
            be("10.0.0.2", 8080, false),
            be("10.0.0.3", 8080, false),
        ])],
        &[],
    );
}

#[test]
fn duplicate_endpoint_prefers_non_terminating_copy() {
    let slices = [
        slice("web-1", "web", p8080(), json!([ep_cond("10.0.0.1", NODE, Some(false), Some(true), Some(true))])),
        slice("web-2", "web", p8080(), json!([ep("10.0.0.1", NODE)])),
    ];
    assert_translates(&[svc("web", json!({}))], &slices, vec![web_cluster_ip(vec![be("10.0.0.1", 8080, true)])], &[]);
}

/// Weights for Maglev: a slice repeating an address stands for that many endpoints; the
/// same address in two slices (an endpoint moving between them) counts once; a terminating
/// copy beside a ready one does not count.
#[test]
fn repeated_addresses_weigh_by_endpoint_count() {
    let slices = [
        slice(
            "web-1",
            "web",
            p8080(),
            json!([
                ep("10.0.0.1", NODE),
                ep("10.0.0.1", NODE),
                ep("10.0.0.1", NODE),
                ep("10.0.0.2", "node-b"),
                ep("10.0.0.3", "node-b"),
                ep_cond("10.0.0.3", "node-b", Some(false), Some(true), Some(true)),
            ]),
        ),
        slice("web-2", "web", p8080(), json!([ep("10.0.0.2", "node-b"), ep("10.0.0.1", NODE)])),
    ];
    let (k, e) =
        web_cluster_ip(vec![be("10.0.0.1", 8080, true), be("10.0.0.2", 8080, false), be("10.0.0.3", 8080, false)]);
    let weighted =
        FrontendEntry { weights: vec![BackendWeight { addr: ip("10.0.0.1"), port: 8080, weight: 3 }], ..e.clone() };
    assert_eq!(weighted.weight_of(&be("10.0.0.1", 8080, true)), 3);
    assert_eq!(weighted.weight_of(&be("10.0.0.2", 8080, false)), 1);
    assert_translates(&[svc("web", json!({}))], &slices, vec![(k, weighted)], &[]);
    // The order of the slices does not matter.
    let reversed = [slices[1].clone(), slices[0].clone()];
    let (forward, _) = run(&[svc("web", json!({}))], &slices);
    assert_eq!(run(&[svc("web", json!({}))], &reversed).0, forward);
}

#[test]
fn only_matching_slices_are_joined() {
    let other_ns = slice_json(json!({
        "metadata": {"namespace": "other", "name": "web-1",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": p8080(), "endpoints": [ep("10.0.0.2", NODE)],
    }));
    let no_label = slice_json(json!({
        "metadata": {"namespace": "default", "name": "custom"},
        "addressType": "IPv4", "ports": p8080(), "endpoints": [ep("10.0.0.3", NODE)],
    }));
    let fqdn = slice_json(json!({
        "metadata": {"namespace": "default", "name": "web-fqdn",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "FQDN", "ports": p8080(), "endpoints": [{"addresses": ["a.example"]}],
    }));
    let slices = [
        slice("web-1", "web", p8080(), json!([ep("10.0.0.1", NODE)])),
        slice("api-1", "api", p8080(), json!([ep("10.0.0.4", NODE)])),
        other_ns,
        no_label,
        fqdn,
    ];
    // Each slice that joins nothing says so, once (FQDN slices are never proxied).
    assert_translates(
        &[svc("web", json!({}))],
        &slices,
        vec![web_cluster_ip(vec![be("10.0.0.1", 8080, true)])],
        &[
            ("EndpointSlice", "default/custom", "no kubernetes.io/service-name label"),
            ("EndpointSlice", "default/api-1", "names Service default/api, which does not exist"),
            ("EndpointSlice", "other/web-1", "names Service other/web, which does not exist"),
        ],
    );
}

#[test]
fn port_resolution_by_name_and_protocol() {
    let service = svc("web", json!({"ports": [{"name": "http", "port": 80}, {"name": "metrics", "port": 9090}]}));
    let slices = [
        // Matches both ports (order in the slice does not matter).
        slice(
            "web-1",
            "web",
            json!([{"name": "metrics", "port": 9100}, {"name": "http", "port": 8080}]),
            json!([ep("10.0.0.1", NODE)]),
        ),
        // Same name but UDP, port 0, and no port number: contribute nothing.
        slice(
            "web-2",
            "web",
            json!([{"name": "http", "port": 8081, "protocol": "UDP"},
                   {"name": "metrics", "port": 0}, {"name": "http"}]),
            json!([ep("10.0.0.2", NODE)]),
        ),
        // Only "http": contributes nothing to "metrics".
        slice("web-3", "web", json!([{"name": "http", "port": 8080}]), json!([ep("10.0.0.3", NODE)])),
    ];
    assert_translates(
        &[service],
        &slices,
        vec![
            (
                key("10.96.0.1", 80, Tcp, Internal),
                entry("web", "http", ClusterIP, vec![be("10.0.0.1", 8080, true), be("10.0.0.3", 8080, true)]),
            ),
            (
                key("10.96.0.1", 9090, Tcp, Internal),
                entry("web", "metrics", ClusterIP, vec![be("10.0.0.1", 9100, true)]),
            ),
        ],
        // Ports without a number are ignored, like upstream; the UDP one is a mistake.
        &[("EndpointSlice", "default/web-2", "ports \"http\"/UDP match no port of Service default/web")],
    );
}

#[test]
fn unnamed_port_matches_absent_or_empty_name() {
    let slices = [
        slice("web-1", "web", json!([{"port": 8080}]), json!([ep("10.0.0.1", NODE)])),
        slice("web-2", "web", json!([{"name": "", "port": 8080}]), json!([ep("10.0.0.2", NODE)])),
    ];
    assert_translates(
        &[svc("web", json!({"ports": [{"name": "", "port": 80}]}))],
        &slices,
        vec![web_cluster_ip(vec![be("10.0.0.1", 8080, true), be("10.0.0.2", 8080, true)])],
        &[],
    );
}

// --- topology-aware routing ------------------------------------------------------

/// A ready endpoint on `node` with zone hints `zones` and node hints `nodes` (an empty
/// list: no hint of that kind).
fn ep_hints(addr: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Value {
    let mut hints = serde_json::Map::new();
    if !zones.is_empty() {
        hints.insert("forZones".into(), json!(zones.iter().map(|z| json!({"name": z})).collect::<Vec<_>>()));
    }
    if !nodes.is_empty() {
        hints.insert("forNodes".into(), json!(nodes.iter().map(|n| json!({"name": n})).collect::<Vec<_>>()));
    }
    json!({"addresses": [addr], "nodeName": node, "hints": hints})
}

/// Upstream's CategorizeEndpoints / topologyModeFromHints (pkg/proxy/topology.go), one
/// row per rule and fallback. This node is node-a in zone-a; e1 runs here, e2 on node-b
/// in zone-a, e3 on node-c in zone-b.
#[test]
fn topology_aware_routing() {
    let (e1, e2, e3) = (be("10.0.0.1", 8080, true), be("10.0.0.2", 8080, false), be("10.0.0.3", 8080, false));
    let all = vec![e1, e2, e3];
    let not_ready_unhinted = ep_cond("10.0.0.4", "node-d", Some(false), Some(false), None);
    let t = |a: &str, zone: &str| {
        json!({"addresses": [a], "nodeName": "node-c", "hints": {"forZones": [{"name": zone}]},
               "conditions": {"ready": false, "serving": true, "terminating": true}})
    };
    // (rule, endpoints, node zone, expected ClusterIP backends)
    let rows: Vec<(&str, Value, Option<&str>, Vec<BackendAddr>)> = vec![
        (
            "no hints: every ready endpoint",
            json!([ep("10.0.0.1", NODE), ep("10.0.0.2", "node-b"), ep("10.0.0.3", "node-c")]),
            Some(ZONE),
            all.clone(),
        ),
        (
            "PreferSameZone: every ready endpoint hinted, some for this zone -> those",
            json!([
                ep_hints("10.0.0.1", NODE, &[ZONE], &[]),
                ep_hints("10.0.0.2", "node-b", &[ZONE], &[]),
                ep_hints("10.0.0.3", "node-c", &["zone-b"], &[])
            ]),
            Some(ZONE),
            vec![e1, e2],
        ),
        (
            "an endpoint without zone hints: hints ignored",
            json!([
                ep_hints("10.0.0.1", NODE, &[ZONE], &[]),
                ep_hints("10.0.0.2", "node-b", &[ZONE], &[]),
                ep("10.0.0.3", "node-c")
            ]),
            Some(ZONE),
            all.clone(),
        ),
        (
            "no endpoint hinted for this zone: hints ignored",
            json!([
                ep_hints("10.0.0.1", NODE, &["zone-b"], &[]),
                ep_hints("10.0.0.2", "node-b", &["zone-b"], &[]),
                ep_hints("10.0.0.3", "node-c", &["zone-b"], &[])
            ]),
            Some(ZONE),
            all.clone(),
        ),
        (
            "node without a zone label: hints ignored",
            json!([
                ep_hints("10.0.0.1", NODE, &[ZONE], &[]),
                ep_hints("10.0.0.2", "node-b", &[ZONE], &[]),
                ep_hints("10.0.0.3", "node-c", &["zone-b"], &[])
            ]),
            None,
            all.clone(),
        ),
        (
            "PreferSameNode: node hints checked first",
            json!([
                ep_hints("10.0.0.1", NODE, &[ZONE], &[NODE]),
                ep_hints("10.0.0.2", "node-b", &[ZONE], &["node-b"]),
                ep_hints("10.0.0.3", "node-c", &["zone-b"], &["node-c"])
            ]),
            Some(ZONE),
            vec![e1],
        ),
        (
            "node hints for other nodes only: falls back to zone hints",
            json!([
                ep_hints("10.0.0.1", NODE, &[ZONE], &["node-x"]),
                ep_hints("10.0.0.2", "node-b", &[ZONE], &["node-b"]),
                ep_hints("10.0.0.3", "node-c", &["zone-b"], &["node-c"])
            ]),
            Some(ZONE),
            vec![e1, e2],
        ),
        (
            "an endpoint without node hints: zone hints decide",
            json!([
                ep_hints("10.0.0.1", NODE, &[ZONE], &[NODE]),
                ep_hints("10.0.0.2", "node-b", &[ZONE], &[]),
                ep_hints("10.0.0.3", "node-c", &["zone-b"], &["node-c"])
            ]),
            Some(ZONE),
            vec![e1, e2],
        ),
        (
            "not-ready endpoints do not count against the hints",
            json!([
                ep_hints("10.0.0.1", NODE, &[ZONE], &[]),
                ep_hints("10.0.0.3", "node-c", &["zone-b"], &[]),
                not_ready_unhinted
            ]),
            Some(ZONE),
            vec![e1],
        ),
        (
            "terminating fallback ignores topology",
            json!([t("10.0.0.5", "zone-b")]),
            Some(ZONE),
            vec![be_term("10.0.0.5", 8080, false)],
        ),
    ];
    for (rule, endpoints, zone, backends) in rows {
        let slices = [slice("web-1", "web", p8080(), endpoints)];
        let node = NodeInfo { zone: zone.map(str::to_string), ..node() };
        let (actual, warnings) = translate(&[svc("web", json!({}))], &slices, &node);
        assert_eq!(actual, state(vec![web_cluster_ip(backends)]), "{rule}");
        assert!(warnings.is_empty(), "{rule}: {warnings:?}");
    }
}

/// Local traffic policies ignore topology (upstream applies hints to cluster endpoints
/// only): internalTrafficPolicy Local serves every local endpoint even where the hints
/// would send traffic elsewhere.
#[test]
fn local_policies_ignore_topology() {
    let slices = [slice(
        "web-1",
        "web",
        p8080(),
        json!([ep_hints("10.0.0.1", NODE, &["zone-b"], &[]), ep_hints("10.0.0.2", "node-b", &[ZONE], &[])]),
    )];
    let (actual, _) = run(&[svc("web", json!({"internalTrafficPolicy": "Local"}))], &slices);
    let (k, e) = web_cluster_ip(vec![be("10.0.0.1", 8080, true)]);
    assert_eq!(actual, state(vec![(k, local_only(e))]));
    // The same endpoints under Cluster policy: the hints pick zone-a's endpoint.
    let (actual, _) = run(&[svc("web", json!({}))], &slices);
    assert_eq!(actual, state(vec![web_cluster_ip(vec![be("10.0.0.2", 8080, false)])]));
}

// --- endpoint conditions ---------------------------------------------------------

#[test]
fn endpoint_conditions() {
    // (case, endpoints, expected ClusterIP backends)
    let t = |a| ep_cond(a, NODE, Some(false), Some(true), Some(true));
    let cases: Vec<(&str, Value, Vec<BackendAddr>)> = vec![
        (
            "nil ready means ready",
            json!([{"addresses": ["10.0.0.1"], "nodeName": NODE, "conditions": {}}]),
            vec![be("10.0.0.1", 8080, true)],
        ),
        (
            "not ready is excluded",
            json!([ep("10.0.0.1", NODE), ep_cond("10.0.0.2", NODE, Some(false), None, None)]),
            vec![be("10.0.0.1", 8080, true)],
        ),
        (
            "ready preferred over serving-terminating",
            json!([ep("10.0.0.1", "node-b"), t("10.0.0.2")]),
            vec![be("10.0.0.1", 8080, false)],
        ),
        (
            "fallback to serving-terminating",
            json!([t("10.0.0.2"), ep_cond("10.0.0.3", NODE, Some(false), Some(false), Some(true))]),
            vec![be_term("10.0.0.2", 8080, true)],
        ),
        ("nil serving follows ready", json!([ep_cond("10.0.0.2", NODE, Some(false), None, Some(true))]), vec![]),
        (
            "serving but not terminating is not a fallback",
            json!([ep_cond("10.0.0.2", NODE, Some(false), Some(true), None)]),
            vec![],
        ),
    ];
    for (name, endpoints, backends) in cases {
        let slices = [slice("web-1", "web", p8080(), endpoints)];
        let (actual, warnings) = run(&[svc("web", json!({}))], &slices);
        assert_eq!(actual, state(vec![web_cluster_ip(backends)]), "{name}");
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
    }
}

// --- traffic policies ------------------------------------------------------------

#[test]
fn internal_traffic_policy_local() {
    let service = svc(
        "web",
        json!({"type": "NodePort", "internalTrafficPolicy": "Local", "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    let slices = [slice("web-1", "web", p8080(), json!([ep("10.0.0.1", NODE), ep("10.0.0.2", "node-b")]))];
    let all = vec![be("10.0.0.1", 8080, true), be("10.0.0.2", 8080, false)];
    assert_translates(
        &[service],
        &slices,
        vec![
            (
                key("10.96.0.1", 80, Tcp, Internal),
                local_only(entry("web", "", ClusterIP, vec![be("10.0.0.1", 8080, true)])),
            ),
            // iTP does not apply to external destinations, from pods or from outside.
            (key(NODE_IP, 30080, Tcp, Internal), entry("web", "", NodePort, all.clone())),
            (key(NODE_IP, 30080, Tcp, External), entry("web", "", NodePort, all)),
        ],
        &[],
    );
}

#[test]
fn internal_traffic_policy_local_falls_back_among_local_endpoints() {
    let service = svc("web", json!({"internalTrafficPolicy": "Local"}));
    let slices = [slice(
        "web-1",
        "web",
        p8080(),
        json!([ep_cond("10.0.0.1", NODE, Some(false), Some(true), Some(true)), ep("10.0.0.2", "node-b")]),
    )];
    assert_translates(
        &[service],
        &slices,
        vec![(
            key("10.96.0.1", 80, Tcp, Internal),
            local_only(entry("web", "", ClusterIP, vec![be_term("10.0.0.1", 8080, true)])),
        )],
        &[],
    );
}

#[test]
fn external_traffic_policy_local_node_port_and_load_balancer() {
    let service = svc_full(
        json!({"namespace": "default", "name": "web"}),
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80, "nodePort": 30080}]}),
        lb_status(json!([{"ip": "198.51.100.1"}])),
    );
    let slices = [slice("web-1", "web", p8080(), json!([ep("10.0.0.1", NODE), ep("10.0.0.2", "node-b")]))];
    let all = vec![be("10.0.0.1", 8080, true), be("10.0.0.2", 8080, false)];
    let local = vec![be("10.0.0.1", 8080, true)];
    assert_translates(
        &[service],
        &slices,
        vec![
            web_cluster_ip(all.clone()),
            // Pods reaching external destinations short-circuit to all endpoints.
            (key(NODE_IP, 30080, Tcp, Internal), entry("web", "", NodePort, all.clone())),
            (key(NODE_IP, 30080, Tcp, External), local_only(entry("web", "", NodePort, local.clone()))),
            (key("198.51.100.1", 80, Tcp, Internal), entry("web", "", LoadBalancer, all)),
            (key("198.51.100.1", 80, Tcp, External), local_only(entry("web", "", LoadBalancer, local))),
        ],
        &[],
    );
}

#[test]
fn health_check_node_port_counts_distinct_local_ready_endpoints() {
    let lb = |name: &str, policy: &str, hc: i32| {
        svc_full(
            json!({"namespace": "default", "name": name}),
            json!({"type": "LoadBalancer", "externalTrafficPolicy": policy, "healthCheckNodePort": hc,
                   "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                             {"name": "https", "port": 443, "nodePort": 30443}]}),
            lb_status(json!([{"ip": "198.51.100.1"}])),
        )
    };
    let ports = json!([{"name": "http", "port": 8080}, {"name": "https", "port": 8443}]);
    let endpoints = json!([
        ep("10.0.0.1", NODE),
        ep_cond("10.0.0.2", NODE, Some(false), Some(false), None),
        ep("10.0.0.3", "node-b"),
        ep_cond("10.0.0.4", NODE, Some(false), Some(true), Some(true)),
    ]);
    let slices = [
        slice("web-1", "web", ports.clone(), endpoints),
        slice("empty-1", "empty", ports, json!([ep("10.0.0.9", "node-b")])),
    ];
    let services = [
        lb("web", "Local", 32000),
        // No local endpoint: served, reporting 0 (-> 503).
        lb("empty", "Local", 32001),
        // Cluster policy: kube-proxy serves no health check.
        lb("cluster", "Cluster", 32002),
        // Same port as "web": the first in namespace/name order keeps it.
        lb("zz-dup", "Local", 32000),
        lb("bad", "Local", 70000),
    ];
    let (state, warnings) = run(&services, &slices);
    let hc = |ns: &str, name: &str, n| HealthCheck { namespace: ns.into(), name: name.into(), local_endpoints: n };
    assert_eq!(
        state.health_checks,
        BTreeMap::from([(32000, hc("default", "web", 1)), (32001, hc("default", "empty", 0))]),
        "10.0.0.1 counted once over both ports; not-ready, terminating and remote ones not at all"
    );
    // (Every LB here also asks for the same frontends; those conflicts are not the point.)
    let hc_warnings: Vec<Warning> =
        warnings.into_iter().filter(|w| w.message.contains("healthCheckNodePort")).collect();
    assert_warnings(
        &hc_warnings,
        &[
            ("Service", "default/bad", "healthCheckNodePort 70000 is out of range"),
            ("Service", "default/zz-dup", "healthCheckNodePort 32000 is already served for default/web"),
        ],
    );
    // A NodePort service with Local policy has no health check port.
    let np = svc(
        "np",
        json!({"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32003,
                             "ports": [{"port": 80, "nodePort": 30081}]}),
    );
    assert!(run(&[np], &[]).0.health_checks.is_empty());
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_drops() {
    let service = svc(
        "web",
        json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                                     "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    let slices = [slice("web-1", "web", p8080(), json!([ep("10.0.0.2", "node-b")]))];
    let all = vec![be("10.0.0.2", 8080, false)];
    assert_translates(
        &[service],
        &slices,
        vec![
            web_cluster_ip(all.clone()),
            (key(NODE_IP, 30080, Tcp, Internal), entry("web", "", NodePort, all)),
            (key(NODE_IP, 30080, Tcp, External), local_only(entry("web", "", NodePort, vec![]))),
        ],
        &[],
    );
}

#[test]
fn external_traffic_policy_local_applies_to_external_ips_of_cluster_ip_service() {
    let service = svc("web", json!({"externalTrafficPolicy": "Local", "externalIPs": ["203.0.113.1"]}));
    let slices = [slice("web-1", "web", p8080(), json!([ep("10.0.0.1", NODE), ep("10.0.0.2", "node-b")]))];
    let all = vec![be("10.0.0.1", 8080, true), be("10.0.0.2", 8080, false)];
    assert_translates(
        &[service],
        &slices,
        vec![
            web_cluster_ip(all.clone()),
            (key("203.0.113.1", 80, Tcp, Internal), entry("web", "", ExternalIP, all)),
            (
                key("203.0.113.1", 80, Tcp, External),
                local_only(entry("web", "", ExternalIP, vec![be("10.0.0.1", 8080, true)])),
            ),
        ],
        &[],
    );
}

// --- session affinity ------------------------------------------------------------

#[test]
fn session_affinity() {
    // (case, spec overrides, expected timeout, expected warning fragment)
    let cases: Vec<(&str, Value, Option<u32>, Option<&str>)> = vec![
        ("none", json!({"sessionAffinity": "None"}), None, None),
        ("default timeout", json!({"sessionAffinity": "ClientIP"}), Some(10800), None),
        (
            "configured",
            json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
            Some(60),
            None,
        ),
        (
            "maximum",
            json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}}}),
            Some(86400),
            None,
        ),
        (
            "zero",
            json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
            Some(10800),
            Some("timeoutSeconds 0"),
        ),
        (
            "too large",
            json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}}),
            Some(10800),
            Some("timeoutSeconds 86401"),
        ),
    ];
    for (name, spec, timeout, warning) in cases {
        let (actual, warnings) = run(&[svc("web", spec)], &[]);
        let (key, e) = web_cluster_ip(vec![]);
        let expected = state(vec![(key, FrontendEntry { affinity_timeout: timeout, ..e })]);
        assert_eq!(actual, expected, "{name}");
        let expected_warnings: Vec<_> = warning.map(|m| ("Service", "default/web", m)).into_iter().collect();
        assert_warnings(&warnings, &expected_warnings);
    }
}

// --- loadBalancerSourceRanges ----------------------------------------------------

fn lb_with_ranges(annotations: Value, ranges: Value) -> Service {
    svc_full(
        json!({"namespace": "default", "name": "web", "annotations": annotations}),
        json!({"type": "LoadBalancer", "loadBalancerSourceRanges": ranges, "externalIPs": ["203.0.113.1"]}),
        lb_status(json!([{"ip": "198.51.100.1"}])),
    )
}

/// Expected frontends of `lb_with_ranges`: ranges on both LB entries (upstream's
/// firewall check applies to pods too), never on the ExternalIP or ClusterIP.
fn lb_frontends(ranges: &[(&str, u8)]) -> Vec<(FrontendKey, FrontendEntry)> {
    let ranges: Vec<IpPrefix> = ranges.iter().map(|&(a, len)| IpPrefix { addr: ip(a), len }).collect();
    vec![
        web_cluster_ip(vec![]),
        (key("203.0.113.1", 80, Tcp, Internal), entry("web", "", ExternalIP, vec![])),
        (key("203.0.113.1", 80, Tcp, External), entry("web", "", ExternalIP, vec![])),
        (
            key("198.51.100.1", 80, Tcp, Internal),
            FrontendEntry { source_ranges: ranges.clone(), ..entry("web", "", LoadBalancer, vec![]) },
        ),
        (
            key("198.51.100.1", 80, Tcp, External),
            FrontendEntry { source_ranges: ranges, ..entry("web", "", LoadBalancer, vec![]) },
        ),
    ]
}

#[test]
fn source_ranges_from_field() {
    assert_translates(
        &[lb_with_ranges(json!(null), json!([" 10.0.0.0/8 ", "192.168.1.7/24", "10.0.0.0/8"]))],
        &[],
        lb_frontends(&[("10.0.0.0", 8), ("192.168.1.0", 24)]),
        &[],
    );
}

#[test]
fn invalid_source_range_skipped_with_warning() {
    assert_translates(
        &[lb_with_ranges(json!(null), json!(["10.0.0.0/8", "10.0.0.0/33", "bogus"]))],
        &[],
        lb_frontends(&[("10.0.0.0", 8)]),
        &[("Service", "default/web", "\"10.0.0.0/33\""), ("Service", "default/web", "\"bogus\"")],
    );
}

#[test]
fn source_ranges_from_annotation_only_when_field_empty() {
    let annotation = json!({"service.beta.kubernetes.io/load-balancer-source-ranges": "10.1.0.0/16, 172.16.0.0/12,"});
    assert_translates(
        &[lb_with_ranges(annotation.clone(), json!([]))],
        &[],
        lb_frontends(&[("10.1.0.0", 16), ("172.16.0.0", 12)]),
        &[],
    );
    assert_translates(&[lb_with_ranges(annotation, json!(["10.0.0.0/8"]))], &[], lb_frontends(&[("10.0.0.0", 8)]), &[]);
}

// --- lb-algorithm annotation ------------------------------------------------------

#[test]
fn lb_algorithm_annotation_reaches_every_frontend_and_a_bad_value_is_warned() {
    let with = |value: &str| lb_with_ranges(json!({ANNOTATION_LB_ALGORITHM: value}), json!([]));
    let annotated = |algorithm| -> Vec<(FrontendKey, FrontendEntry)> {
        lb_frontends(&[]).into_iter().map(|(k, e)| (k, FrontendEntry { lb_algorithm: algorithm, ..e })).collect()
    };
    assert_translates(&[with("maglev")], &[], annotated(Some(LbAlgorithm::Maglev)), &[]);
    assert_translates(&[with(" random ")], &[], annotated(Some(LbAlgorithm::Random)), &[]);
    // Unknown: the node's default, with one warning naming the value.
    assert_translates(&[with("ring-hash")], &[], lb_frontends(&[]), &[("Service", "default/web", "\"ring-hash\"")]);
}

#[test]
fn explain_says_how_backends_are_chosen() {
    let node = node();
    let view = |svc: &Service, traffic: &str| -> String {
        let e = explain(std::slice::from_ref(svc), &[] as &[EndpointSlice], &node, "default", "web").unwrap();
        e.frontends.iter().find(|v| v.traffic.starts_with(traffic)).unwrap().selection.clone()
    };
    let plain = lb_with_ranges(json!(null), json!([]));
    assert_eq!(view(&plain, "cluster"), "random (ClusterIP default)");
    assert!(view(&plain, "external").contains("--lb-algorithm"));
    let maglev = lb_with_ranges(json!({ANNOTATION_LB_ALGORITHM: "maglev"}), json!([]));
    assert!(view(&maglev, "cluster").starts_with("maglev (ebpf-proxy.io/lb-algorithm)"));
    assert!(view(&maglev, "external").starts_with("maglev"));
}

// --- conflicts and determinism -----------------------------------------------------

#[test]
fn same_frontend_twice_first_service_wins() {
    let a = svc("a", json!({"clusterIP": "10.96.0.1", "externalIPs": ["203.0.113.1"]}));
    let b = svc("b", json!({"clusterIP": "10.96.0.2", "externalIPs": ["203.0.113.1"]}));
    let expected = vec![
        (key("10.96.0.1", 80, Tcp, Internal), entry("a", "", ClusterIP, vec![])),
        (key("10.96.0.2", 80, Tcp, Internal), entry("b", "", ClusterIP, vec![])),
        (key("203.0.113.1", 80, Tcp, Internal), entry("a", "", ExternalIP, vec![])),
        (key("203.0.113.1", 80, Tcp, External), entry("a", "", ExternalIP, vec![])),
    ];
    let warning = [("Service", "default/b", "203.0.113.1:80/TCP (ExternalIP, used by ExternalIP of default/a)")];
    assert_translates(&[a.clone(), b.clone()], &[], expected.clone(), &warning);
    // Input order does not matter.
    assert_translates(&[b, a], &[], expected, &warning);
}

#[test]
fn cluster_ip_wins_over_external_ip_of_earlier_service() {
    // "a" sorts first but tries to capture "b"'s clusterIP with an externalIP.
    let a = svc("a", json!({"clusterIP": "10.96.0.1", "externalIPs": ["10.96.0.2"]}));
    let b = svc("b", json!({"clusterIP": "10.96.0.2"}));
    assert_translates(
        &[a, b],
        &[],
        vec![
            (key("10.96.0.1", 80, Tcp, Internal), entry("a", "", ClusterIP, vec![])),
            (key("10.96.0.2", 80, Tcp, Internal), entry("b", "", ClusterIP, vec![])),
        ],
        &[("Service", "default/a", "used by ClusterIP of default/b")],
    );
}

#[test]
fn output_independent_of_input_order() {
    let services = vec![
        svc("a", json!({"clusterIP": "10.96.0.1", "externalIPs": ["203.0.113.1"]})),
        svc("b", json!({"clusterIP": "10.96.0.2", "externalIPs": ["203.0.113.1"], "ports": [{"port": 0}]})),
        svc("c", json!({"clusterIP": "10.96.0.3", "externalIPs": ["203.0.113.1", "x"]})),
        // Dual-stack, with slices of both families and one endpoint of the wrong one.
        svc("d", json!({"clusterIPs": ["10.96.0.4", "fd00::4"], "ipFamilies": ["IPv4", "IPv6"]})),
    ];
    let slices = vec![
        slice("a-1", "a", p8080(), json!([ep("10.0.0.1", NODE), {"addresses": ["bad"]}])),
        slice("a-2", "a", p8080(), json!([ep("10.0.0.2", NODE)])),
        slice("c-1", "c", p8080(), json!([ep("10.0.0.3", NODE)])),
        slice("z-1", "z", p8080(), json!([ep("10.0.0.4", NODE)])),
        slice("c-2", "c", json!([{"name": "x", "port": 1}]), json!([ep("10.0.0.5", NODE)])),
        slice6("d-v6", "d", p8080(), json!([ep("fd00:10::1", NODE), ep("10.0.0.9", NODE)])),
        slice("d-v4", "d", p8080(), json!([ep("10.0.0.6", NODE)])),
    ];
    // "c" holds the contested externalIP now.
    let claims: Claims = [(
        ClaimKey { addr: ip("203.0.113.1"), port: 80, proto: Tcp },
        ClaimHolder { namespace: "default".into(), name: "c".into() },
    )]
    .into();
    let run =
        |services: &[Service], slices: &[EndpointSlice]| translate_with_claims(services, slices, &node(), &claims);
    let forward = run(&services, &slices);
    let mut rev_services = services.clone();
    rev_services.reverse();
    let mut rev_slices = slices.clone();
    rev_slices.reverse();
    assert_eq!(forward, run(&rev_services, &rev_slices));
    assert_eq!(forward.1.len(), 7, "{:?}", forward.1);
    assert_eq!(forward.0.frontends[&key("203.0.113.1", 80, Tcp, External)].service.name(), "c");
    assert_eq!(forward.0.frontends[&key("fd00::4", 80, Tcp, Internal)].backends, vec![be("fd00:10::1", 8080, true)]);
}

#[test]
fn incumbent_keeps_its_address_against_a_newcomer_sorting_first() {
    // "b" is programmed on 203.0.113.1:80; "a" (sorts first) is added asking for it too.
    let a = svc("a", json!({"clusterIP": "10.96.0.1", "externalIPs": ["203.0.113.1"]}));
    let b = svc("b", json!({"clusterIP": "10.96.0.2", "externalIPs": ["203.0.113.1"]}));
    let claim = |addr: &str, holder: &str| {
        (
            ClaimKey { addr: ip(addr), port: 80, proto: Tcp },
            ClaimHolder { namespace: "default".into(), name: holder.into() },
        )
    };
    let claims: Claims = [claim("203.0.113.1", "b"), claim("10.96.0.2", "b")].into();
    let expected = state(vec![
        (key("10.96.0.1", 80, Tcp, Internal), entry("a", "", ClusterIP, vec![])),
        (key("10.96.0.2", 80, Tcp, Internal), entry("b", "", ClusterIP, vec![])),
        (key("203.0.113.1", 80, Tcp, Internal), entry("b", "", ExternalIP, vec![])),
        (key("203.0.113.1", 80, Tcp, External), entry("b", "", ExternalIP, vec![])),
    ]);
    let warning = [(
        "Service",
        "default/a",
        "203.0.113.1:80/TCP (ExternalIP, used by ExternalIP of default/b, already programmed)",
    )];
    for services in [[a.clone(), b.clone()], [b.clone(), a.clone()]] {
        let (actual, warnings) = translate_with_claims(&services, &[] as &[EndpointSlice], &node(), &claims);
        assert_eq!(actual, expected);
        assert_warnings(&warnings, &warning);
    }
    // Once "b" lets go (deleted), "a" takes the address.
    let (actual, warnings) = translate_with_claims(&[a], &[] as &[EndpointSlice], &node(), &claims);
    assert!(actual.frontends.contains_key(&key("203.0.113.1", 80, Tcp, External)));
    assert_eq!(actual.frontends[&key("203.0.113.1", 80, Tcp, Internal)].service.name(), "a");
    assert_warnings(&warnings, &[]);
}

#[test]
fn holding_an_address_does_not_beat_a_higher_priority_claim() {
    // "a" held 10.96.0.2 as an externalIP before "b" got it as its clusterIP: the
    // clusterIP still wins (CVE-2020-8554), holder or not.
    let a = svc("a", json!({"clusterIP": "10.96.0.1", "externalIPs": ["10.96.0.2"]}));
    let b = svc("b", json!({"clusterIP": "10.96.0.2"}));
    let claims: Claims = [(
        ClaimKey { addr: ip("10.96.0.2"), port: 80, proto: Tcp },
        ClaimHolder { namespace: "default".into(), name: "a".into() },
    )]
    .into();
    let (actual, warnings) = translate_with_claims(&[a, b], &[] as &[EndpointSlice], &node(), &claims);
    assert_eq!(actual.frontends[&key("10.96.0.2", 80, Tcp, Internal)].service.name(), "b");
    assert_warnings(&warnings, &[("Service", "default/a", "used by ClusterIP of default/b")]);
}

// --- slices that silently give no endpoints --------------------------------------------

#[test]
fn slice_without_service_name_label_warns_once() {
    let unlabelled = slice_json(json!({
        "metadata": {"namespace": "default", "name": "hand-written"},
        "addressType": "IPv4", "ports": p8080(), "endpoints": [ep("10.0.0.1", NODE)],
    }));
    assert_translates(
        &[svc("web", json!({}))],
        &[unlabelled],
        vec![web_cluster_ip(vec![])],
        &[("EndpointSlice", "default/hand-written", "no kubernetes.io/service-name label")],
    );
}

#[test]
fn slice_naming_no_service_warns_once_unless_skipped_or_being_collected() {
    let typo = slice("web-1", "wbe", p8080(), json!([ep("10.0.0.1", NODE)]));
    assert_translates(
        &[svc("web", json!({}))],
        std::slice::from_ref(&typo),
        vec![web_cluster_ip(vec![])],
        &[("EndpointSlice", "default/web-1", "names Service default/wbe, which does not exist")],
    );
    // A Service we skip on purpose (headless) still exists: its slices are not orphans.
    let headless = svc("wbe", json!({"clusterIP": "None"}));
    assert_translates(
        &[svc("web", json!({})), headless],
        std::slice::from_ref(&typo),
        vec![web_cluster_ip(vec![])],
        &[],
    );
    // A slice owned by its (just deleted) Service is garbage-collected: no warning.
    let collected = slice_json(json!({
        "metadata": {"namespace": "default", "name": "gone-1",
                     "labels": {"kubernetes.io/service-name": "gone"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service",
                                          "name": "gone", "uid": "1"}]},
        "addressType": "IPv4", "ports": p8080(), "endpoints": [ep("10.0.0.1", NODE)],
    }));
    assert_translates(&[svc("web", json!({}))], &[collected], vec![web_cluster_ip(vec![])], &[]);
}

#[test]
fn slice_port_name_matching_no_service_port_warns_once() {
    // The Service's port is unnamed; the slice calls it "http": zero endpoints.
    let named = slice(
        "web-1",
        "web",
        json!([{"name": "http", "port": 8080}, {"name": "admin", "port": 9000}]),
        json!([ep("10.0.0.1", NODE), ep("10.0.0.2", NODE)]),
    );
    let good = slice("web-2", "web", p8080(), json!([ep("10.0.0.3", NODE)]));
    assert_translates(
        &[svc("web", json!({}))],
        &[named, good],
        vec![web_cluster_ip(vec![be("10.0.0.3", 8080, true)])],
        &[(
            "EndpointSlice",
            "default/web-1",
            "ports \"http\"/TCP, \"admin\"/TCP match no port of Service default/web (\"\"/TCP;",
        )],
    );
}

// --- malformed input ---------------------------------------------------------------

#[test]
fn malformed_services_skipped_with_one_warning() {
    let meta = |ns: Value, name: Value| json!({"namespace": ns, "name": name});
    // (case, service, warned object, message fragment)
    let cases: Vec<(&str, Service, &str, &str)> = vec![
        (
            "unparsable clusterIP",
            svc("bad", json!({"clusterIP": "10.96.0.300"})),
            "default/bad",
            "clusterIP \"10.96.0.300\"",
        ),
        (
            "unparsable clusterIPs entry",
            svc("bad", json!({"clusterIPs": ["10.96.0.5", "nope"]})),
            "default/bad",
            "clusterIP \"nope\"",
        ),
        ("port 0", svc("bad", json!({"ports": [{"port": 80}, {"port": 0}]})), "default/bad", "port #1: port number 0"),
        (
            "port out of range",
            svc("bad", json!({"ports": [{"name": "http", "port": 70000}]})),
            "default/bad",
            "port \"http\": port number 70000",
        ),
        ("port missing", svc("bad", json!({"ports": [{"name": "http"}]})), "default/bad", "port number 0"),
        ("negative port", svc("bad", json!({"ports": [{"port": -1}]})), "default/bad", "port number -1"),
        (
            "unknown protocol",
            svc("bad", json!({"ports": [{"port": 80, "protocol": "ICMP"}]})),
            "default/bad",
            "unknown protocol \"ICMP\"",
        ),
        (
            "nodePort out of range",
            svc("bad", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 65536}]})),
            "default/bad",
            "nodePort 65536",
        ),
        ("unknown type", svc("bad", json!({"type": "Weird"})), "default/bad", "unknown spec.type \"Weird\""),
        (
            "missing name",
            svc_full(meta(json!("default"), json!(null)), json!({}), json!(null)),
            "default/<missing>",
            "metadata",
        ),
        (
            "missing namespace",
            svc_full(meta(json!(null), json!("bad")), json!({}), json!(null)),
            "<missing>/bad",
            "metadata",
        ),
        (
            "empty name",
            svc_full(meta(json!("default"), json!("")), json!({}), json!(null)),
            "default/<missing>",
            "metadata",
        ),
        ("no metadata at all", Service::default(), "<missing>/<missing>", "metadata"),
    ];
    for (name, bad, object, message) in cases {
        let (good_svc, good_slice, good_frontend) = good();
        // A slice for the bad service must not leak anywhere either.
        let bad_slice = slice("bad-1", "bad", p8080(), json!([ep("10.0.0.66", NODE)]));
        let (actual, warnings) = run(&[bad, good_svc], &[good_slice, bad_slice]);
        assert_eq!(actual, state(vec![good_frontend]), "{name}");
        if object == "default/bad" {
            assert_warnings(&warnings, &[("Service", object, message)]);
        } else {
            // Without a name there is no "default/bad" the slice could belong to.
            assert_warnings(
                &warnings,
                &[("Service", object, message), ("EndpointSlice", "default/bad-1", "names Service default/bad")],
            );
        }
    }
}

#[test]
fn unparsable_external_ip_skipped_rest_programmed() {
    let service = svc("web", json!({"externalIPs": ["203.0.113.1", "203.0.113.x"]}));
    assert_translates(
        &[service],
        &[],
        vec![
            web_cluster_ip(vec![]),
            (key("203.0.113.1", 80, Tcp, Internal), entry("web", "", ExternalIP, vec![])),
            (key("203.0.113.1", 80, Tcp, External), entry("web", "", ExternalIP, vec![])),
        ],
        &[("Service", "default/web", "externalIP \"203.0.113.x\"")],
    );
}

#[test]
fn unparsable_ingress_ip_skipped_rest_programmed() {
    let service = svc_full(
        json!({"namespace": "default", "name": "web"}),
        json!({"type": "LoadBalancer"}),
        lb_status(json!([{"ip": "198.51.100.1"}, {"ip": "198.51.100"}, {"ip": "198.51.100.3", "ipMode": "Bogus"}])),
    );
    assert_translates(
        &[service],
        &[],
        vec![
            web_cluster_ip(vec![]),
            (key("198.51.100.1", 80, Tcp, Internal), entry("web", "", LoadBalancer, vec![])),
            (key("198.51.100.1", 80, Tcp, External), entry("web", "", LoadBalancer, vec![])),
        ],
        &[
            ("Service", "default/web", "ingress IP \"198.51.100\""),
            ("Service", "default/web", "unknown ipMode \"Bogus\""),
        ],
    );
}

#[test]
fn malformed_endpoints_skipped_with_warning_on_slice() {
    let endpoints = json!([
        ep("10.0.0.1", NODE),
        {"addresses": ["10.0.0.999"], "nodeName": NODE},
        {"addresses": [], "nodeName": NODE},
    ]);
    assert_translates(
        &[svc("web", json!({}))],
        &[slice("web-1", "web", p8080(), endpoints)],
        vec![web_cluster_ip(vec![be("10.0.0.1", 8080, true)])],
        &[
            ("EndpointSlice", "default/web-1", "endpoint address \"10.0.0.999\""),
            ("EndpointSlice", "default/web-1", "no addresses"),
        ],
    );
}

#[test]
fn malformed_slice_ports_skipped_with_warning() {
    let ports = json!([
        {"name": "", "port": 8080, "protocol": "TCP"},
        {"name": "", "port": 70000, "protocol": "TCP"},
        {"name": "x", "port": 8081, "protocol": "ICMP"},
    ]);
    assert_translates(
        &[svc("web", json!({}))],
        &[slice("web-1", "web", ports, json!([ep("10.0.0.1", NODE)]))],
        vec![web_cluster_ip(vec![be("10.0.0.1", 8080, true)])],
        &[
            ("EndpointSlice", "default/web-1", "port #1: port number 70000"),
            ("EndpointSlice", "default/web-1", "port \"x\": unknown protocol \"ICMP\""),
        ],
    );
}

#[test]
fn malformed_slice_metadata_and_address_type() {
    let nameless = slice_json(json!({
        "metadata": {"namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": p8080(), "endpoints": [ep("10.0.0.7", NODE)],
    }));
    let weird = slice_json(json!({
        "metadata": {"namespace": "default", "name": "web-x", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPX", "ports": p8080(), "endpoints": [ep("10.0.0.8", NODE)],
    }));
    let default = EndpointSlice::default();
    assert_translates(
        &[svc("web", json!({}))],
        &[nameless, weird, default, slice("web-1", "web", p8080(), json!([ep("10.0.0.1", NODE)]))],
        vec![web_cluster_ip(vec![be("10.0.0.1", 8080, true)])],
        &[
            ("EndpointSlice", "<missing>/<missing>", "metadata"),
            ("EndpointSlice", "default/<missing>", "metadata"),
            ("EndpointSlice", "default/web-x", "unknown addressType \"IPX\""),
        ],
    );
}

// --- explain ----------------------------------------------------------------------

/// The reason `explain` gives `addr` in the view whose traffic starts with `traffic`.
fn reason_of(e: &Explanation, traffic: &str, family: IpFamily, addr: &str) -> Reason {
    let view = e
        .frontends
        .iter()
        .find(|v| v.traffic.starts_with(traffic) && v.family == family)
        .unwrap_or_else(|| panic!("no {traffic} view in {e:#?}"));
    view.endpoints.iter().find(|x| x.address == ip(addr)).unwrap_or_else(|| panic!("{addr} not in {view:#?}")).reason
}

/// `explain` reports the model's own decision for every endpoint, with each exclusion
/// reason, and agrees with what `translate` programs.
#[test]
fn explain_gives_every_exclusion_reason() {
    use IpFamily::{V4, V6};
    let node = dual_node();
    // Ready here; not ready; terminating while others are ready; on another node.
    let main = slice(
        "web-1",
        "web",
        p8080(),
        json!([
            ep("10.0.0.1", NODE),
            ep_cond("10.0.0.2", NODE, Some(false), Some(false), Some(false)),
            ep_cond("10.0.0.3", NODE, Some(false), Some(true), Some(true)),
            ep("10.0.0.4", "node-b"),
        ]),
    );
    // A slice whose only port has another name: no endpoints for the unnamed port.
    let other_port = slice(
        "web-2",
        "web",
        json!([{"name": "metrics", "port": 9090, "protocol": "TCP"}]),
        json!([ep("10.0.0.5", NODE)]),
    );
    let v6 = slice6("web-v6", "web", p8080(), json!([ep("fd00:10::1", NODE)]));
    let web = dual(
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80, "nodePort": 30080}]}),
        lb_status(json!([{"ip": "203.0.113.9"}])),
    );
    let services = [web.clone()];
    let slices = [main.clone(), other_port.clone(), v6.clone()];
    let e = explain(&services, &slices, &node, "default", "web").unwrap();
    assert_eq!(reason_of(&e, "cluster", V4, "10.0.0.1"), Reason::Backend);
    assert_eq!(reason_of(&e, "cluster", V4, "10.0.0.2"), Reason::NotReady);
    assert_eq!(reason_of(&e, "cluster", V4, "10.0.0.3"), Reason::Terminating);
    assert_eq!(reason_of(&e, "cluster", V4, "10.0.0.4"), Reason::Backend, "cluster traffic uses remote endpoints");
    assert_eq!(reason_of(&e, "external", V4, "10.0.0.4"), Reason::NotLocal, "eTP Local");
    assert_eq!(reason_of(&e, "cluster", V4, "10.0.0.5"), Reason::PortNameNotMatched);
    assert_eq!(reason_of(&e, "cluster", V4, "fd00:10::1"), Reason::AddressFamily);
    assert_eq!(reason_of(&e, "cluster", V6, "fd00:10::1"), Reason::Backend);
    assert_eq!(reason_of(&e, "cluster", V6, "10.0.0.1"), Reason::AddressFamily);

    // The same decisions as `translate`: the cluster view's backends are the
    // ClusterIP's backends.
    let (state, _) = translate(&services, &slices, &node);
    let programmed: BTreeSet<IpAddr> =
        state.frontends[&key("10.96.0.1", 80, Tcp, Internal)].backends.iter().map(|b| b.addr).collect();
    let explained: BTreeSet<IpAddr> = e.frontends[0]
        .endpoints
        .iter()
        .filter(|x| matches!(x.reason, Reason::Backend | Reason::TerminatingFallback))
        .map(|x| x.address)
        .collect();
    assert_eq!(programmed, explained);

    // Terminating fallback: nothing ready, one still serving.
    let draining = slice(
        "web-1",
        "web",
        p8080(),
        json!([
            ep_cond("10.0.0.3", NODE, Some(false), Some(true), Some(true)),
            ep_cond("10.0.0.2", NODE, Some(false), Some(false), Some(false))
        ]),
    );
    let e = explain(&services, &[draining], &node, "default", "web").unwrap();
    assert_eq!(reason_of(&e, "cluster", V4, "10.0.0.3"), Reason::TerminatingFallback);
    assert_eq!(reason_of(&e, "cluster", V4, "10.0.0.2"), Reason::NotReady);

    // Topology hints: zone-a is ours; an endpoint hinted for zone-b is excluded, and
    // node hints for another node exclude too.
    let hinted = slice(
        "web-1",
        "web",
        p8080(),
        json!([ep_hints("10.0.0.1", "node-b", &[ZONE], &[]), ep_hints("10.0.0.6", "node-c", &["zone-b"], &[])]),
    );
    let plain = svc("web", json!({}));
    let e = explain(std::slice::from_ref(&plain), &[hinted], &node, "default", "web").unwrap();
    assert_eq!(reason_of(&e, "cluster", V4, "10.0.0.1"), Reason::Backend);
    assert_eq!(reason_of(&e, "cluster", V4, "10.0.0.6"), Reason::OtherZoneByHints);
    let node_hinted = slice(
        "web-1",
        "web",
        p8080(),
        json!([ep_hints("10.0.0.1", NODE, &[], &[NODE]), ep_hints("10.0.0.7", "node-b", &[], &["node-b"])]),
    );
    let e = explain(&[plain], &[node_hinted], &node, "default", "web").unwrap();
    assert_eq!(reason_of(&e, "cluster", V4, "10.0.0.7"), Reason::OtherNodeByHints);

    assert!(explain(&services, &slices, &node, "default", "nope").unwrap_err().contains("no Service default/nope"));
}

/// kube-proxy's network programming latency starts at the slice's
/// last-change-trigger-time: the translator hands each new one over as data (no clock),
/// once per change (a relist or a repeat of the same time is not a change), and names the
/// slice whose annotation is not a time.
#[test]
fn trigger_times_are_handed_over_once_per_change() {
    let annotated = |name: &str, at: &str| {
        let mut s = slice("web-1", "web", p8080(), json!([ep("10.0.0.1", "n")]));
        s.metadata.name = Some(name.into());
        s.metadata.annotations = Some([(ANNOTATION_TRIGGER_TIME.to_string(), at.to_string())].into());
        s
    };
    let at = |s: &str| std::time::SystemTime::from(s.parse::<k8s_openapi::jiff::Timestamp>().unwrap());
    let mut t = Translator::new(node());
    t.upsert_service(&svc("web", json!({"clusterIP": "10.96.0.1", "ports": [{"port": 80, "targetPort": 8080}]})));
    assert_eq!(t.take_trigger_times(), TriggerTimes::default());

    t.upsert_slice(&annotated("web-1", "2026-12-06T20:00:00.123456789Z"));
    t.upsert_slice(&annotated("web-2", "2026-12-06T20:00:01+01:00"));
    let got = t.take_trigger_times();
    assert_eq!(got.times, vec![at("2026-12-06T20:00:00.123456789Z"), at("2026-12-06T19:00:01Z")]);
    assert!(got.malformed.is_empty());

    // The same time again (a relist) is no change; a later one is.
    t.upsert_slice(&annotated("web-1", "2026-12-06T20:00:00.123456789Z"));
    assert_eq!(t.take_trigger_times(), TriggerTimes::default());
    t.upsert_slice(&annotated("web-1", "2026-12-06T20:00:05Z"));
    assert_eq!(t.take_trigger_times().times, vec![at("2026-12-06T20:00:05Z")]);

    // Deletions carry none; a slice re-created with its old time is a change again.
    t.delete_slice("default", "web-2");
    assert_eq!(t.take_trigger_times(), TriggerTimes::default());
    t.upsert_slice(&annotated("web-2", "2026-12-06T20:00:01+01:00"));
    assert_eq!(t.take_trigger_times().times.len(), 1);

    t.upsert_slice(&annotated("web-1", "yesterday"));
    let got = t.take_trigger_times();
    assert!(got.times.is_empty());
    assert_eq!(got.malformed, vec![("default/web-1".to_string(), "yesterday".to_string())]);
    // The translation itself does not depend on the annotation.
    t.commit(&Claims::default());
    assert_eq!(t.desired().frontends.len(), 1, "{:?}", t.desired().frontends);
}

/// `--nodeport-localhost`: the NodePort on 127.0.0.1 (an IPv4 Service; ::1 is IPv6's) with
/// the internal scope only and cluster endpoints whatever the external policy, as upstream
/// sends node-originated NodePort traffic.
#[test]
fn nodeport_on_localhost_is_internal_only() {
    let es = slice("web-1", "web", p8080(), json!([ep("10.0.0.2", "node-b"), ep("10.0.0.1", NODE)]));
    let spec = json!({"clusterIP": "10.96.0.1", "type": "NodePort", "externalTrafficPolicy": "Local",
                      "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]});
    let mut with_localhost = node();
    crate::model::node::serve_localhost(&mut with_localhost);
    let (actual, _) = translate(&[svc("web", spec.clone())], std::slice::from_ref(&es), &with_localhost);
    let loopback: Vec<_> =
        actual.frontends.iter().filter(|(k, _)| k.addr.is_loopback()).map(|(k, e)| (k, &**e)).collect();
    let b = vec![be("10.0.0.1", 8080, true), be("10.0.0.2", 8080, false)];
    assert_eq!(loopback, vec![(&key("127.0.0.1", 30080, Tcp, Internal), &entry("web", "", NodePort, b))]);
    // Without the flag: no loopback frontend.
    let (plain, _) = translate(&[svc("web", spec)], &[es], &node());
    assert!(plain.frontends.keys().all(|k| !k.addr.is_loopback()));
}

/// SCTP frontends whose ports the datapath would have to rewrite are refused there
/// (`sctp_port_nat`): the Service is warned about, naming them; one whose backends listen
/// on its own port is not.
#[test]
fn sctp_port_rewrites_are_warned() {
    let ports = |target: u16| json!([{"port": 80, "targetPort": target, "protocol": "SCTP"}]);
    let sctp_slice =
        |port: u16| slice("web-1", "web", json!([{"port": port, "protocol": "SCTP"}]), json!([ep("10.0.0.1", NODE)]));
    let (_, warnings) = run(&[svc("web", json!({"ports": ports(8080)}))], &[sctp_slice(8080)]);
    assert_warnings(&warnings, &[("Service", "default/web", "SCTP frontends 10.96.0.1:80 need a port rewritten")]);
    let (state, warnings) = run(&[svc("web", json!({"ports": ports(80)}))], &[sctp_slice(80)]);
    assert_warnings(&warnings, &[]);
    assert_eq!(state.frontends.len(), 1);
}
