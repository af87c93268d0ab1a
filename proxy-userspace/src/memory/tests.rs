//! The estimates against what an instrumented allocator counts for the agent's pipeline:
//! objects as the API server sends them, parsed; the translation; the sync's mirror.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Service, ServicePort},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{HeapSize, Usage};
use crate::{
    model::{NodeInfo, Translator},
    source::Objects,
    sync::{Syncer, store::MemStore},
};

/// Counts the bytes each thread has allocated and not freed (requested sizes, as the
/// estimates count them), so tests running in parallel do not disturb each other.
struct Counting;

thread_local! {
    static NET: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // During thread teardown the counter may be gone: nothing to count then.
    let _ = NET.try_with(|n| n.set(n.get() + delta));
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counting touches
// only a const-initialised thread-local `Cell` (no allocation, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: the caller's contract is System's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's contract is System's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocated() -> isize {
    NET.with(Cell::get)
}

/// Service `i` as the API server sends it (managedFields dropped, as the source does).
fn service_json(i: usize) -> String {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": format!("svc-{i}"), "namespace": "bench",
            "uid": format!("6b1f3c2e-0000-4000-8000-{i:012}"), "resourceVersion": format!("{}", 100_000 + i),
            "creationTimestamp": "2026-12-07T00:00:00Z",
            "labels": {"app": format!("svc-{i}")}
        },
        "spec": {
            "type": "ClusterIP", "clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
            "clusterIPs": [format!("10.96.{}.{}", i / 250, i % 250 + 1)],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
            "selector": {"app": format!("svc-{i}")},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
        },
        "status": {"loadBalancer": {}}
    })
    .to_string()
}

/// Its one EndpointSlice of `e` ready endpoints.
fn slice_json(i: usize, e: usize) -> String {
    let endpoints: Vec<_> = (0..e)
        .map(|j| {
            serde_json::json!({
                "addresses": [format!("10.{}.{}.{}", 128 + i / 6000, (i * e + j) / 250 % 250, (i * e + j) % 250 + 1)],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", j % 3),
                "targetRef": {"kind": "Pod", "name": format!("svc-{i}-{j}"), "namespace": "bench",
                              "uid": format!("7c2a4d3f-0000-4000-8000-{j:012}")}
            })
        })
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("svc-{i}-abcde"), "namespace": "bench",
            "uid": format!("8d3b5e4a-0000-4000-8000-{i:012}"), "resourceVersion": format!("{}", 200_000 + i),
            "labels": {"kubernetes.io/service-name": format!("svc-{i}"),
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": format!("svc-{i}"),
                                 "uid": format!("6b1f3c2e-0000-4000-8000-{i:012}"),
                                 "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
    .to_string()
}

// The Kubernetes objects as parsed, which no structure of the agent keeps any more: what the
// pipeline's input costs, to check the estimates of what comes after it against a measured
// start. The fields they can carry (the API source drops managedFields).

impl HeapSize for ObjectMeta {
    fn heap_bytes(&self) -> usize {
        self.annotations.heap_bytes()
            + self.finalizers.heap_bytes()
            + self.generate_name.heap_bytes()
            + self.labels.heap_bytes()
            + self.managed_fields.as_ref().map_or(0, |m| m.capacity() * size_of_val(&m[..]) / m.len().max(1))
            + self.name.heap_bytes()
            + self.namespace.heap_bytes()
            + self.owner_references.as_ref().map_or(0, |o| {
                o.capacity() * size_of::<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>()
                    + o.iter()
                        .map(|r| r.api_version.capacity() + r.kind.capacity() + r.name.capacity() + r.uid.capacity())
                        .sum::<usize>()
            })
            + self.resource_version.heap_bytes()
            + self.self_link.heap_bytes()
            + self.uid.heap_bytes()
    }
}

impl HeapSize for ServicePort {
    fn heap_bytes(&self) -> usize {
        let target = match &self.target_port {
            Some(IntOrString::String(s)) => s.capacity(),
            _ => 0,
        };
        self.app_protocol.heap_bytes() + self.name.heap_bytes() + self.protocol.heap_bytes() + target
    }
}

impl HeapSize for Service {
    fn heap_bytes(&self) -> usize {
        let spec = self.spec.as_ref().map_or(0, |s| {
            s.cluster_ip.heap_bytes()
                + s.cluster_ips.heap_bytes()
                + s.external_ips.heap_bytes()
                + s.external_name.heap_bytes()
                + s.external_traffic_policy.heap_bytes()
                + s.internal_traffic_policy.heap_bytes()
                + s.ip_families.heap_bytes()
                + s.ip_family_policy.heap_bytes()
                + s.load_balancer_class.heap_bytes()
                + s.load_balancer_ip.heap_bytes()
                + s.load_balancer_source_ranges.heap_bytes()
                + s.ports.heap_bytes()
                + s.selector.heap_bytes()
                + s.session_affinity.heap_bytes()
                + s.traffic_distribution.heap_bytes()
                + s.type_.heap_bytes()
        });
        let status = self.status.as_ref().and_then(|s| s.load_balancer.as_ref()?.ingress.as_ref()).map_or(0, |v| {
            v.capacity() * size_of::<k8s_openapi::api::core::v1::LoadBalancerIngress>()
                + v.iter().map(|i| i.hostname.heap_bytes() + i.ip.heap_bytes() + i.ip_mode.heap_bytes()).sum::<usize>()
        });
        self.metadata.heap_bytes() + spec + status
    }
}

impl HeapSize for ObjectReference {
    fn heap_bytes(&self) -> usize {
        self.api_version.heap_bytes()
            + self.field_path.heap_bytes()
            + self.kind.heap_bytes()
            + self.name.heap_bytes()
            + self.namespace.heap_bytes()
            + self.resource_version.heap_bytes()
            + self.uid.heap_bytes()
    }
}

impl HeapSize for Endpoint {
    fn heap_bytes(&self) -> usize {
        let hints = self.hints.as_ref().map_or(0, |h| {
            h.for_zones.as_ref().map_or(0, |z| {
                z.capacity() * size_of::<k8s_openapi::api::discovery::v1::ForZone>()
                    + z.iter().map(|z| z.name.capacity()).sum::<usize>()
            }) + h.for_nodes.as_ref().map_or(0, |n| {
                n.capacity() * size_of::<k8s_openapi::api::discovery::v1::ForNode>()
                    + n.iter().map(|n| n.name.capacity()).sum::<usize>()
            })
        });
        self.addresses.heap_bytes()
            + self.deprecated_topology.heap_bytes()
            + hints
            + self.hostname.heap_bytes()
            + self.node_name.heap_bytes()
            + self.target_ref.heap_bytes()
            + self.zone.heap_bytes()
    }
}

impl HeapSize for EndpointPort {
    fn heap_bytes(&self) -> usize {
        self.app_protocol.heap_bytes() + self.name.heap_bytes() + self.protocol.heap_bytes()
    }
}

impl HeapSize for EndpointSlice {
    fn heap_bytes(&self) -> usize {
        self.address_type.heap_bytes()
            + self.endpoints.heap_bytes()
            + self.metadata.heap_bytes()
            + self.ports.heap_bytes()
    }
}

/// Heap bytes of the parsed objects, each counted whole.
fn source_usage(objects: &Objects) -> Vec<Usage> {
    vec![
        Usage { structure: "source.services", bytes: objects.services.heap_bytes() },
        Usage { structure: "source.slices", bytes: objects.slices.heap_bytes() },
    ]
}

fn total(u: &[Usage]) -> usize {
    u.iter().map(|u| u.bytes).sum()
}

/// `estimated` within `tolerance` (a fraction) of `measured`.
fn close(what: &str, estimated: usize, measured: isize, tolerance: f64) {
    let m = measured as f64;
    let off = (estimated as f64 - m).abs() / m;
    assert!(off <= tolerance, "{what}: estimated {estimated} B, measured {measured} B ({:.0}% off)", off * 100.0);
}

/// The reported bytes per Service add up to the measured growth within 20%, in total and
/// for each stage (the source's objects, the translation, the sync).
#[test]
fn reported_bytes_per_service_add_up_to_the_measured_growth() {
    const N: usize = 2000;
    const E: usize = 10;
    let texts: Vec<(String, String)> = (0..N).map(|i| (service_json(i), slice_json(i, E))).collect();
    let node = NodeInfo { name: "node-0".into(), nodeport_addrs: vec![], zone: None };

    let start = allocated();
    let mut objects = Objects::default();
    for (svc, slice) in &texts {
        objects.services.push(Arc::new(serde_json::from_str::<Service>(svc).expect("service")));
        objects.slices.push(Arc::new(serde_json::from_str::<EndpointSlice>(slice).expect("slice")));
    }
    let parsed = allocated();

    let mut translator = Translator::new(node);
    let mut syncer = Syncer::new(MemStore::default()).expect("syncer");
    let empty = allocated();
    translator.replace_services(&objects.services);
    translator.replace_slices(&objects.slices);
    translator.commit(&syncer);
    let translated = allocated();
    let report = syncer.apply(translator.desired());
    assert!(report.errors.is_empty() && report.backends == N * E, "{report:?}");
    drop(report);
    // The store stands for the kernel's maps: not the agent's memory.
    drop(std::mem::take(syncer.store_mut()));
    let synced = allocated();

    let source = source_usage(&objects);
    let translation = translator.memory_usage();
    let sync = syncer.memory_usage();
    for u in source.iter().chain(&translation).chain(&sync) {
        eprintln!("{:<28} {:>8.0} B per Service", u.structure, u.bytes as f64 / N as f64);
    }
    let (m_source, m_translation, m_sync) = (parsed - start, translated - empty, synced - translated);
    eprintln!(
        "measured per Service: source {:.0} B, translation {:.0} B, sync {:.0} B",
        m_source as f64 / N as f64,
        m_translation as f64 / N as f64,
        m_sync as f64 / N as f64
    );
    close("source objects", total(&source), m_source, 0.2);
    close("translation", total(&translation), m_translation, 0.2);
    close("sync", total(&sync), m_sync, 0.2);
    close("everything", total(&source) + total(&translation) + total(&sync), m_source + m_translation + m_sync, 0.2);
    drop(texts);
}
