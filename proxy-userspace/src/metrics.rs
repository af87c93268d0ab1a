//! Prometheus metrics of the agent (prometheus-client).
use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

/// Conntrack flows by state, per address family ("IPv4", "IPv6").
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
    pub family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabel {
    pub family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    /// `namespace/name:port-name` of the frontend's Service port.
    pub service: String,
    /// The frontend's id (one Service port has several frontends: ClusterIP, NodePorts...).
    pub frontend_id: String,
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    pub services: Gauge,
    pub backends: Gauge,
    /// `services` per address family.
    pub frontends: Family<FamilyLabel, Gauge>,
    pub sync_duration: Histogram,
    pub event_to_map: Histogram,
    pub map_writes: Counter,
    pub sync_errors: Counter,
    pub object_warnings: Gauge,
    pub map_fill: Family<MapLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub attached_interfaces: Gauge,
    pub conntrack_flows: Family<StateLabel, Gauge>,
    pub conntrack_entries: Family<FamilyLabel, Gauge>,
    pub conntrack_gc_runs: Counter,
    pub conntrack_gc_deleted: Family<ReasonLabel, Counter>,
    pub conntrack_gc_duration: Histogram,
    pub conntrack_full_drops: Counter,
    pub datapath_repairs: Counter,
    pub sock_attached: Gauge,
    pub sock_translations: Family<ServiceLabel, Gauge>,
    pub sock_udp_destroyed: Counter,
    pub sock_destroy_duration: Histogram,
    /// Differences between the maps and the API at the last periodic verify.
    pub datapath_drift: Gauge,
    pub verify_runs: Counter,
    /// Frontends wanted but not served, by reason ("source_ranges_full": their
    /// loadBalancerSourceRanges do not fit, so they fail closed).
    pub frontends_unserved: Family<ReasonLabel, Gauge>,
}

fn buckets() -> impl Iterator<Item = f64> {
    [
        0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
        1.0, 2.5, 5.0,
    ]
    .into_iter()
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("ebpf_proxy");
        let m = Metrics {
            registry: Arc::new(Mutex::new(Registry::default())),
            services: Gauge::default(),
            backends: Gauge::default(),
            frontends: Family::default(),
            sync_duration: Histogram::new(buckets()),
            event_to_map: Histogram::new(buckets()),
            map_writes: Counter::default(),
            sync_errors: Counter::default(),
            object_warnings: Gauge::default(),
            map_fill: Family::default(),
            attached_interfaces: Gauge::default(),
            conntrack_flows: Family::default(),
            conntrack_entries: Family::default(),
            conntrack_gc_runs: Counter::default(),
            conntrack_gc_deleted: Family::default(),
            conntrack_gc_duration: Histogram::new(buckets()),
            conntrack_full_drops: Counter::default(),
            datapath_repairs: Counter::default(),
            sock_attached: Gauge::default(),
            sock_translations: Family::default(),
            sock_udp_destroyed: Counter::default(),
            sock_destroy_duration: Histogram::new(buckets()),
            datapath_drift: Gauge::default(),
            verify_runs: Counter::default(),
            frontends_unserved: Family::default(),
        };
        r.register("services_programmed", "Service frontends in the services map", m.services.clone());
        r.register("backends_programmed", "Backends in the backends map", m.backends.clone());
        r.register(
            "frontends_programmed",
            "Service frontends in the services maps, per address family (SERVICES, SERVICES6)",
            m.frontends.clone(),
        );
        r.register("sync_duration_seconds", "Duration of one map sync", m.sync_duration.clone());
        r.register(
            "event_to_map_seconds",
            "Time from the first Kubernetes event of a burst to its last map write",
            m.event_to_map.clone(),
        );
        r.register("map_writes", "Map updates and deletes issued", m.map_writes.clone());
        r.register("sync_errors", "Frontends that could not be programmed", m.sync_errors.clone());
        r.register(
            "frontends_unserved",
            "Frontends not served, by reason (source_ranges_full: loadBalancerSourceRanges do not fit \
             --max-source-ranges, so the frontend fails closed)",
            m.frontends_unserved.clone(),
        );
        r.register("object_warnings", "Objects currently skipped as malformed", m.object_warnings.clone());
        r.register("map_fill_ratio", "Entries over capacity, per map", m.map_fill.clone());
        r.register("attached_interfaces", "Pod interfaces with programs attached", m.attached_interfaces.clone());
        r.register(
            "conntrack_flows",
            "Tracked flows by state and address family, as of the collector's last complete walk",
            m.conntrack_flows.clone(),
        );
        r.register(
            "conntrack_entries",
            "Conntrack entries (two per flow) per address family, as of the last complete walk",
            m.conntrack_entries.clone(),
        );
        r.register("conntrack_gc_runs", "Conntrack collector passes", m.conntrack_gc_runs.clone());
        r.register(
            "conntrack_gc_deleted",
            "Conntrack entries removed, by reason (expired, pressure, orphan)",
            m.conntrack_gc_deleted.clone(),
        );
        r.register(
            "conntrack_gc_duration_seconds",
            "Duration of one conntrack collector pass",
            m.conntrack_gc_duration.clone(),
        );
        r.register(
            "conntrack_full_drops",
            "New flows dropped because the conntrack table was full of live flows",
            m.conntrack_full_drops.clone(),
        );
        r.register(
            "datapath_repairs",
            "Datapath checks that found pins missing or programs detached, and restored them",
            m.datapath_repairs.clone(),
        );
        r.register(
            "socket_lb_attached",
            "1 when the socket-level programs are attached to the cgroup root",
            m.sock_attached.clone(),
        );
        r.register(
            "socket_lb_translations",
            "connect()/sendmsg() calls translated at the socket, per frontend (from the datapath's counters)",
            m.sock_translations.clone(),
        );
        r.register(
            "socket_lb_udp_sockets_destroyed",
            "Connected UDP sockets destroyed because their backend was removed",
            m.sock_udp_destroyed.clone(),
        );
        r.register(
            "socket_lb_destroy_duration_seconds",
            "Duration of one pass destroying UDP sockets of removed backends",
            m.sock_destroy_duration.clone(),
        );
        r.register(
            "datapath_drift",
            "Differences (missing, extra or different frontends, backends, flags) between the pinned maps and \
             what the API says, at the last periodic verify (see ebpf-proxy verify)",
            m.datapath_drift.clone(),
        );
        r.register("verify_runs", "Periodic verifications of the maps against the API", m.verify_runs.clone());
        *m.registry.lock().expect("fresh mutex") = r;
        m
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = encode(&mut out, &r);
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
