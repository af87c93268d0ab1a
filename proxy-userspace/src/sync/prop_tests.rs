//! Property: random sequences of object changes, applied incrementally
//! (`Translator::commit`, then `Syncer::apply_changes`), leave exactly the maps, desired
//! state and warnings that the full path leaves after the same sequence
//! (`translate_with_claims` of all objects, then `Syncer::apply`: what the agent did per
//! sync before). Both also keep exactly the backends the desired state uses. The object pools are small on purpose:
//! clusterIPs, externalIPs and NodePorts collide (VIP conflicts), slices move between
//! Services, Services come and go under their slices, and the node's addresses and zone
//! change.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proptest::prelude::*;
use proxy_common::port_to_map;
use serde_json::json;

use super::*;
use crate::model::{NodeInfo, Translator, translate_with_claims};

const SERVICES: usize = 5;
const SLICES: usize = 6;
const NODE: &str = "node-a";

#[derive(Clone, Debug)]
enum Op {
    Service(usize, Option<Value>),
    Slice(usize, Option<Value>),
    Node { second_addr: bool, zone: Option<&'static str> },
}

type Value = serde_json::Value;

fn service_spec() -> impl Strategy<Value = Value> {
    let cluster_ip = prop::sample::select(vec!["10.96.0.1", "10.96.0.2", "fd00::1", "None", "10.96.0.300"]);
    let ty = prop::sample::select(vec!["ClusterIP", "NodePort", "LoadBalancer"]);
    let ports = prop::sample::subsequence(vec![(80, "TCP", "http"), (53, "UDP", "dns"), (443, "TCP", "https")], 1..=2);
    let external = prop::option::of(prop::sample::select(vec!["10.96.0.1", "203.0.113.1", "fd00::9"]));
    let ingress = prop::option::of(prop::sample::select(vec!["198.51.100.1", "203.0.113.1"]));
    let node_port = prop::sample::select(vec![30080, 30081]);
    (cluster_ip, ty, ports, external, ingress, node_port, any::<bool>(), any::<bool>()).prop_map(
        |(ip, ty, ports, external, ingress, node_port, local, affinity)| {
            let family = if ip.contains(':') { "IPv6" } else { "IPv4" };
            let ports: Vec<Value> = ports
                .iter()
                .map(|(p, proto, name)| json!({"name": name, "port": p, "protocol": proto, "nodePort": node_port + p % 2}))
                .collect();
            let mut spec = json!({
                "type": ty, "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": [family], "ports": ports,
                "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                "healthCheckNodePort": 32000,
            });
            if let Some(e) = external {
                spec["externalIPs"] = json!([e]);
            }
            if affinity {
                spec["sessionAffinity"] = json!("ClientIP");
            }
            let mut svc = json!({"spec": spec});
            if let Some(i) = ingress {
                svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": i}]}});
            }
            svc
        },
    )
}

fn slice_spec() -> impl Strategy<Value = Value> {
    let owner = 0..SERVICES + 1;
    let v6 = any::<bool>();
    let eps = prop::collection::vec((0u8..5, any::<bool>(), any::<bool>(), any::<bool>()), 0..4);
    let port = prop::sample::select(vec![("http", "TCP"), ("dns", "UDP"), ("https", "TCP"), ("other", "TCP")]);
    (owner, v6, eps, port, any::<bool>()).prop_map(|(owner, v6, eps, (pname, proto), hinted)| {
        let endpoints: Vec<Value> = eps
            .iter()
            .map(|(a, ready, terminating, zone)| {
                let addr = if v6 { format!("fd00:244::{a}") } else { format!("10.244.0.{a}") };
                let mut ep = json!({
                    "addresses": [addr],
                    "conditions": {"ready": ready, "serving": ready, "terminating": terminating},
                    // One address, one node, whichever Service's slice lists it (a pod runs
                    // on one node): slices disagreeing on it would make the shared backend
                    // entry's LOCAL flag depend on write order.
                    "nodeName": if a % 2 == 0 { NODE } else { "node-b" },
                });
                if hinted {
                    ep["hints"] = json!({"forZones": [{"name": if *zone { "z1" } else { "z2" }}]});
                }
                ep
            })
            .collect();
        json!({
            "metadata": {"labels": {"kubernetes.io/service-name": format!("s{owner}")}},
            "addressType": if v6 { "IPv6" } else { "IPv4" },
            "endpoints": endpoints,
            "ports": [{"name": pname, "port": 8080, "protocol": proto}],
        })
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SERVICES, prop::option::weighted(0.85, service_spec())).prop_map(|(i, s)| Op::Service(i, s)),
        5 => (0..SLICES, prop::option::weighted(0.85, slice_spec())).prop_map(|(i, s)| Op::Slice(i, s)),
        1 => (any::<bool>(), prop::option::of(prop::sample::select(vec!["z1", "z2"])))
            .prop_map(|(second_addr, zone)| Op::Node { second_addr, zone }),
    ]
}

fn named(mut v: Value, name: String) -> Value {
    v["metadata"]["name"] = json!(name);
    v["metadata"]["namespace"] = json!("d");
    v
}

fn node_info(second_addr: bool, zone: Option<&str>) -> NodeInfo {
    let mut addrs: Vec<IpAddr> = vec!["192.0.2.1".parse().unwrap()];
    if second_addr {
        addrs.push("fd00:192::1".parse().unwrap());
    }
    NodeInfo { name: NODE.into(), nodeport_addrs: addrs, zone: zone.map(str::to_string) }
}

/// Everything the maps hold, as sorted sets of plain values.
fn maps(s: &Syncer<MemStore>) -> impl PartialEq + std::fmt::Debug {
    let st = s.store();
    (st.services.clone(), st.slots.clone(), st.backends.clone(), st.meta.clone(), st.ranges.clone())
}

fn sorted(mut w: Vec<crate::model::Warning>) -> Vec<String> {
    let mut out: Vec<String> = w.drain(..).map(|w| w.to_string()).collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn incremental_equals_full(batches in prop::collection::vec(prop::collection::vec(op(), 1..4), 1..12)) {
        let mut node = node_info(false, None);
        let mut translator = Translator::new(node.clone());
        let mut incremental = Syncer::new(MemStore::default()).unwrap();
        let mut full = Syncer::new(MemStore::default()).unwrap();
        let mut services: BTreeMap<usize, Arc<Service>> = BTreeMap::new();
        let mut slices: BTreeMap<usize, Arc<EndpointSlice>> = BTreeMap::new();
        for (step, batch) in batches.into_iter().enumerate() {
            for op in batch {
                match op {
                    Op::Service(i, Some(v)) => {
                        let svc: Service = serde_json::from_value(named(v, format!("s{i}"))).unwrap();
                        translator.upsert_service(&svc);
                        services.insert(i, Arc::new(svc));
                    }
                    Op::Service(i, None) => {
                        translator.delete_service("d", &format!("s{i}"));
                        services.remove(&i);
                    }
                    Op::Slice(i, Some(v)) => {
                        let slice: EndpointSlice = serde_json::from_value(named(v, format!("e{i}"))).unwrap();
                        translator.upsert_slice(&slice);
                        slices.insert(i, Arc::new(slice));
                    }
                    Op::Slice(i, None) => {
                        translator.delete_slice("d", &format!("e{i}"));
                        slices.remove(&i);
                    }
                    Op::Node { second_addr, zone } => {
                        node = node_info(second_addr, zone);
                        translator.set_node(node.clone());
                    }
                }
            }
            let changed = translator.commit(&incremental);
            let r = incremental.apply_changes(translator.desired(), &changed);
            prop_assert!(r.errors.is_empty(), "step {step}: {:?}", r.errors);

            let svcs: Vec<Arc<Service>> = services.values().cloned().collect();
            let sls: Vec<Arc<EndpointSlice>> = slices.values().cloned().collect();
            let (desired, warnings) = translate_with_claims(&svcs, &sls, &node, &full);
            let r = full.apply(&desired);
            prop_assert!(r.errors.is_empty(), "step {step}: {:?}", r.errors);

            prop_assert_eq!(translator.desired(), &desired, "desired state differs at step {}", step);
            prop_assert_eq!(sorted(translator.warnings()), sorted(warnings), "warnings differ at step {}", step);
            prop_assert_eq!(maps(&incremental), maps(&full), "maps differ at step {}", step);
            // Backend garbage collection, checked against the desired state itself (both
            // paths share the reference counting).
            let used: BTreeSet<(IpAddr, u16, u8)> = desired
                .frontends
                .iter()
                .flat_map(|(k, e)| e.backends.iter().map(|b| (b.addr, port_to_map(b.port), k.proto.number())))
                .collect();
            let held: BTreeSet<(IpAddr, u16, u8)> =
                incremental.store().backends.values().map(|b| (b.addr, b.port, b.proto)).collect();
            prop_assert_eq!(held, used, "backends kept differ from those used at step {}", step);
        }
    }
}
