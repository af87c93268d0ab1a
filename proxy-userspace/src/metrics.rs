//! Prometheus metrics of the agent (prometheus-client), served as OpenMetrics text.
//!
//! kube-proxy's names (`kubeproxy_*`, pkg/proxy/metrics) where ours measure the same thing,
//! so its dashboards and alerts carry over; `ebpf_proxy_*` for the rest; the Go client's
//! `process_*` names. Series counts are bounded by the verdicts, maps and families, never
//! by the number of Services (the per-frontend socket-LB gauge is opt-in).
use std::{
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};

use proxy_common::StatsFamily;

use crate::dataplane::maps::GlobalStats;

/// The body's content type: prometheus-client writes OpenMetrics 1.0 (`# EOF`, `_total`
/// counters, `# UNIT`); served as text/plain 0.0.4 a scraper would parse it as the older
/// format and lose the metadata.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A float gauge (seconds since the epoch, ratios).
pub type FloatGauge = Gauge<f64, AtomicU64>;

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

/// A phase of the agent's start-up (`agent::startup`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
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

/// The HTTP status of a health answer (`kubeproxy_healthz_total{code}`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: String,
    git_commit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
    family: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    pub services: Gauge,
    pub backends: Gauge,
    /// `services` per address family.
    pub frontends: Family<FamilyLabel, Gauge>,
    /// kube-proxy's `sync_proxy_rules_duration_seconds`: one sync (translate and write).
    pub sync_duration: Histogram,
    pub event_to_map: Histogram,
    /// kube-proxy's `network_programming_duration_seconds`: from an EndpointSlice's
    /// last-change-trigger-time to the map write that applied it.
    pub network_programming: Histogram,
    /// kube-proxy's `sync_proxy_rules_last_timestamp_seconds`: end of the last sync.
    pub sync_last: FloatGauge,
    /// kube-proxy's `sync_proxy_rules_last_queued_timestamp_seconds`: the last change that
    /// asked for a sync.
    pub sync_last_queued: FloatGauge,
    /// kube-proxy's `sync_proxy_rules_{endpoint,service}_changes_{pending,total}`.
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes: Counter,
    /// kube-proxy's `healthz_total{code}` and `livez_total{code}`: answers given.
    pub healthz: Family<CodeLabel, Counter>,
    pub livez: Family<CodeLabel, Counter>,
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
    /// The start-up by phase, set once after the first sync.
    pub startup: Family<PhaseLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

/// kube-proxy's sync buckets: 1 ms doubling 15 times (to ~16 s).
fn sync_buckets() -> impl Iterator<Item = f64> {
    (0..15).map(|i| 0.001 * f64::from(1u32 << i))
}

/// kube-proxy's network programming buckets (0.25 s to 5 min: the SLO is in seconds), so
/// quantiles computed over a mixed fleet agree.
fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..60).map(f64::from));
    b.extend((0..12).map(|i| f64::from(60 + 5 * i)));
    b.extend((0..7).map(|i| f64::from(120 + 30 * i)));
    b
}

/// Seconds since the epoch, for the timestamp gauges.
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs_f64()
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
        let mut root = Registry::default();
        let m = Metrics {
            registry: Arc::new(Mutex::new(Registry::default())),
            services: Gauge::default(),
            backends: Gauge::default(),
            frontends: Family::default(),
            sync_duration: Histogram::new(sync_buckets()),
            event_to_map: Histogram::new(buckets()),
            network_programming: Histogram::new(programming_buckets()),
            sync_last: FloatGauge::default(),
            sync_last_queued: FloatGauge::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            healthz: Family::default(),
            livez: Family::default(),
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
            startup: Family::default(),
        };
        let kp = root.sub_registry_with_prefix("kubeproxy");
        kp.register(
            "sync_proxy_rules_duration_seconds",
            "Duration of one sync of the Services to the maps (translation and map writes)",
            m.sync_duration.clone(),
        );
        kp.register(
            "network_programming_duration_seconds",
            "Time from an EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time to the map write that \
             applied it (changes triggered before the agent started are not counted)",
            m.network_programming.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "When the last sync wrote the maps (seconds since the epoch)",
            m.sync_last.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "When the last object change asking for a sync arrived (seconds since the epoch)",
            m.sync_last_queued.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "EndpointSlices changed since the last sync",
            m.endpoint_changes_pending.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes",
            "EndpointSlice changes (adds, updates, deletes) received",
            m.endpoint_changes.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes_pending",
            "Services changed since the last sync",
            m.service_changes_pending.clone(),
        );
        kp.register("sync_proxy_rules_service_changes", "Service changes received", m.service_changes.clone());
        // Both answers exist from the start, so rate() and alerts see a 0, not no series.
        for code in [200, 503] {
            m.healthz.get_or_create(&CodeLabel { code: code.to_string() }).inc_by(0);
            m.livez.get_or_create(&CodeLabel { code: code.to_string() }).inc_by(0);
        }
        kp.register("healthz", "/healthz answers, by HTTP status", m.healthz.clone());
        kp.register("livez", "/livez answers, by HTTP status", m.livez.clone());
        root.register_collector(Box::new(ProcessCollector));
        let r = root.sub_registry_with_prefix("ebpf_proxy");
        let build = Family::<BuildLabel, Gauge>::default();
        build
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION").into(),
                git_commit: env!("EBPF_PROXY_GIT_COMMIT").into(),
            })
            .set(1);
        r.register("build_info", "The agent's version and git commit (value 1)", build);
        r.register("services_programmed", "Service frontends in the services map", m.services.clone());
        r.register("backends_programmed", "Backends in the backends map", m.backends.clone());
        r.register(
            "frontends_programmed",
            "Service frontends in the services maps, per address family (SERVICES, SERVICES6)",
            m.frontends.clone(),
        );
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
        r.register(
            "startup_seconds",
            "The agent's start-up by phase, set after the first sync: prepare (kernel probe, pin lock), load \
             (programs and maps, while the source lists and parses the objects), setup (hooks, attacher, read-back), \
             objects (the rest of the initial lists), translate and apply (the first sync), total",
            m.startup.clone(),
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
        if let Ok(mut reg) = m.registry.lock() {
            *reg = root;
        }
        m
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = encode(&mut out, &r);
        }
        out
    }

    /// `ebpf_proxy_datapath_packets_total{verdict}` and `..._bytes_total{verdict}`, read from
    /// GLOBAL_STATS at each scrape (one per-CPU array of a few verdicts: bounded cost).
    pub fn register_datapath(&self, stats: GlobalStats) {
        if let Ok(mut reg) = self.registry.lock() {
            reg.sub_registry_with_prefix("ebpf_proxy")
                .register_collector(Box::new(DatapathCollector(Mutex::new(stats))));
        }
    }

    /// `ebpf_proxy_socket_lb_translations{service, frontend_id}`: one series per frontend
    /// (10,000 Services make 10,000+ series per node), so only with
    /// `--metrics-per-frontend`; the node-wide count is
    /// `ebpf_proxy_datapath_packets_total{verdict="sock_translate"}`.
    pub fn register_per_frontend(&self) {
        if let Ok(mut reg) = self.registry.lock() {
            reg.sub_registry_with_prefix("ebpf_proxy").register(
                "socket_lb_translations",
                "connect()/sendmsg() calls translated at the socket, per frontend (from the datapath's counters)",
                self.sock_translations.clone(),
            );
        }
    }

    /// A health answer with `code`, for `kubeproxy_healthz_total` / `kubeproxy_livez_total`.
    pub fn count_answer(family: &Family<CodeLabel, Counter>, code: u16) {
        family.get_or_create(&CodeLabel { code: code.to_string() }).inc();
    }

    /// Now, as the last time a change asked for a sync.
    pub fn queued_now(&self) {
        self.sync_last_queued.set(unix_seconds(SystemTime::now()));
    }
}

/// The per-verdict node-wide datapath counters, read at scrape time.
struct DatapathCollector(Mutex<GlobalStats>);

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathCollector(GLOBAL_STATS)")
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(stats) = self.0.lock() else { return Ok(()) };
        // Indices a GLOBAL_STATS pinned by an older datapath lacks read as zero (its flat
        // layout reads back as the `other` family).
        let mut counts = Vec::new();
        for family in StatsFamily::ALL {
            for v in proxy_common::Verdict::ALL {
                if let Ok(c) = stats.counters(family, v as u32) {
                    counts.push((VerdictLabel { verdict: v.name(), family: family.name() }, c));
                }
            }
        }
        drop(stats);
        let packets = ConstCounter::new(0u64);
        let mut family = enc.encode_descriptor(
            "datapath_packets",
            "Packets (socket-level: connect()/sendmsg() calls) the datapath handled, by verdict and address family \
             (`other`: not IPv4/IPv6; see `ebpf-proxy stats`)",
            None,
            packets.metric_type(),
        )?;
        for (label, c) in &counts {
            ConstCounter::new(c.packets).encode(family.encode_family(label)?)?;
        }
        let mut family = enc.encode_descriptor(
            "datapath_bytes",
            "Bytes the datapath handled, by verdict and address family",
            None,
            packets.metric_type(),
        )?;
        for (label, c) in &counts {
            ConstCounter::new(c.bytes).encode(family.encode_family(label)?)?;
        }
        Ok(())
    }
}

/// The Go client's process metrics (same names, so the usual panels work), from
/// /proc/self at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(me) = procfs::process::Process::myself() else { return Ok(()) };
        fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
        }
        if let Ok(stat) = me.stat() {
            let ticks = procfs::ticks_per_second().max(1) as f64;
            if let Ok(boot) = procfs::boot_time_secs() {
                gauge(
                    &mut enc,
                    "process_start_time_seconds",
                    "Start time of the process since the epoch in seconds",
                    boot as f64 + stat.starttime as f64 / ticks,
                )?;
            }
            gauge(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                (stat.rss * procfs::page_size()) as f64,
            )?;
            gauge(&mut enc, "process_virtual_memory_bytes", "Virtual memory size in bytes", stat.vsize as f64)?;
            let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / ticks);
            cpu.encode(enc.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?)?;
        }
        if let Ok(n) = me.fd_count() {
            gauge(&mut enc, "process_open_fds", "Number of open file descriptors", n as f64)?;
        }
        if let Ok(procfs::process::LimitValue::Value(max)) = me.limits().map(|l| l.max_open_files.soft_limit) {
            gauge(&mut enc, "process_max_fds", "Maximum number of open file descriptors", max as f64)?;
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kube-proxy's names with their types, the process and build metrics, and the
    /// per-frontend series only when asked for.
    #[test]
    fn names_and_types() {
        let m = Metrics::new();
        m.sync_duration.observe(0.01);
        Metrics::count_answer(&m.healthz, 200);
        let body = m.encode();
        for (name, kind) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
            ("kubeproxy_network_programming_duration_seconds", "histogram"),
            ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
            ("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "gauge"),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "gauge"),
            ("kubeproxy_sync_proxy_rules_endpoint_changes", "counter"),
            ("kubeproxy_sync_proxy_rules_service_changes", "counter"),
            ("kubeproxy_healthz", "counter"),
            ("process_cpu_seconds", "counter"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_start_time_seconds", "gauge"),
            ("process_open_fds", "gauge"),
            ("process_max_fds", "gauge"),
            ("process_virtual_memory_bytes", "gauge"),
            ("ebpf_proxy_build_info", "gauge"),
        ] {
            assert!(body.contains(&format!("# TYPE {name} {kind}\n")), "{name} {kind}:\n{body}");
        }
        assert!(body.contains("kubeproxy_healthz_total{code=\"200\"} 1\n"), "{body}");
        assert!(body.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.016\"} 1\n"), "{body}");
        assert!(body.contains(&format!("git_commit=\"{}\"", env!("EBPF_PROXY_GIT_COMMIT"))), "{body}");
        assert!(body.ends_with("# EOF\n"), "OpenMetrics: {body}");
        assert!(!body.contains("socket_lb_translations"), "{body}");
        m.register_per_frontend();
        m.sock_translations
            .get_or_create(&ServiceLabel { service: "default/web:http".into(), frontend_id: "7".into() })
            .set(3);
        let body = m.encode();
        assert!(
            body.contains("ebpf_proxy_socket_lb_translations{service=\"default/web:http\",frontend_id=\"7\"} 3\n"),
            "{body}"
        );
    }

    #[test]
    fn programming_buckets_are_kube_proxys() {
        let b = programming_buckets();
        assert_eq!(b.len(), 1 + 2 + 59 + 12 + 7);
        assert_eq!(
            (b[0], b[1], b[2], b[3], b[61], b[62], b[73], b[74], b[80]),
            (0.0, 0.25, 0.5, 1.0, 59.0, 60.0, 115.0, 120.0, 300.0)
        );
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
