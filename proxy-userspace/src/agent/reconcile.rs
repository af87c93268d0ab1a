//! The reconciler: feed object changes into the translation as they arrive (`update`),
//! apply what they changed to the maps (`sync`), compare the pinned maps with the desired
//! state (`verify`), and the metrics both set.
//!
//! A sync re-translates only the Services the changes touched and writes only the frontends
//! whose desired entry changed (`Translator::commit`, `Syncer::apply_changes`). The first
//! sync, and the first after a relist, look at every frontend (`Syncer::apply`): what the
//! pinned maps hold from before may include Services deleted while the agent was away.
use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Instant, SystemTime},
};

use tracing::{error, info, warn};

use super::socket_lb::SockLb;
use crate::{
    dataplane::{
        maps::{Capacities, Maps},
        node::{NodeMaps, PortRange, node_config, node_config6},
        sock,
    },
    healthcheck::HealthServers,
    metrics::{FamilyLabel, MapLabel, Metrics, ReasonLabel, unix_seconds},
    model::{
        IpFamily, Translator,
        node::{NodePortAddresses, node_eligible, node_info, node_ips, snat_address, snat_address6},
    },
    source::{Delta, Snapshots, Source, Update},
    sync::Syncer,
};

pub(super) struct SyncLoop {
    pub(super) syncer: Syncer<Maps>,
    pub(super) node_maps: NodeMaps,
    pub(super) health: HealthServers,
    /// /healthz, /livez, /readyz: told when the Node is on its way out.
    pub(super) proxy_health: std::sync::Arc<crate::health::Health>,
    pub(super) source: Source,
    /// Every object's parsed form and the desired state, kept up to date by `update`.
    pub(super) translator: Translator,
    /// The files source's previous snapshot, to turn the next one into changes.
    pub(super) snapshots: Snapshots,
    /// This node's Node object, when known.
    pub(super) node: Option<std::sync::Arc<k8s_openapi::api::core::v1::Node>>,
    /// The next sync looks at every frontend (start-up, relist).
    pub(super) full_sync: bool,
    pub(super) node_name: String,
    pub(super) nodeport_addresses: NodePortAddresses,
    /// The network namespace's addresses (`dataplane::local_addrs`), which NodePorts are
    /// served on as `nodeport_addresses` selects.
    pub(super) local_addrs: Vec<IpAddr>,
    pub(super) hairpin_address: Ipv4Addr,
    pub(super) hairpin_address6: Ipv6Addr,
    pub(super) snat_port_range: PortRange,
    pub(super) last_node_config: Option<proxy_common::NodeConfig>,
    pub(super) last_node_config6: Option<proxy_common::NodeConfig6>,
    pub(super) metrics: Metrics,
    pub(super) capacities: Capacities,
    pub(super) last_warnings: BTreeSet<String>,
    /// Frontends not programmed at the last sync, with why: logged when this set changes.
    pub(super) last_errors: BTreeSet<String>,
    /// The Node's InternalIP/ExternalIP addresses, for uplink detection (when `--uplink`
    /// names none). Not every NodePort address: that would put XDP on bridges and overlay
    /// devices holding a local address.
    pub(super) node_addrs: tokio::sync::watch::Sender<Vec<IpAddr>>,
    /// Whether a sync has run (verify compares against its desired state), and the drift
    /// the last verify found (logged when it changes).
    pub(super) synced_once: bool,
    pub(super) last_drift: BTreeSet<String>,
    pub(super) bpffs_root: std::path::PathBuf,
    /// Socket-level load balancing, when attached: stale UDP sockets to destroy.
    pub(super) sock: Option<SockLb>,
    /// Slice changes triggered before this are not timed (kube-proxy ignores trigger times
    /// before its own start: a restart would otherwise report the age of every slice).
    pub(super) started: SystemTime,
    /// Services and EndpointSlices changed since the last sync (kube-proxy's
    /// `*_changes_pending`).
    pub(super) pending_services: HashSet<(String, String)>,
    pub(super) pending_slices: HashSet<(String, String)>,
}

/// `(namespace, name)` of an object, for the pending-change gauges.
fn meta_key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
}

impl SyncLoop {
    /// One change from the API source: parsed into the translation now, applied at the
    /// next `sync`.
    pub(super) fn update(&mut self, u: Update) {
        match &u {
            Update::Services(Delta::Apply(s)) => {
                self.metrics.service_changes.inc();
                self.pending_services.insert(meta_key(&s.metadata));
            }
            Update::Services(Delta::Delete(key)) => {
                self.metrics.service_changes.inc();
                self.pending_services.insert(key.clone());
            }
            Update::Slices(Delta::Apply(s)) => {
                self.metrics.endpoint_changes.inc();
                self.pending_slices.insert(meta_key(&s.metadata));
            }
            Update::Slices(Delta::Delete(key)) => {
                self.metrics.endpoint_changes.inc();
                self.pending_slices.insert(key.clone());
            }
            _ => {}
        }
        self.metrics.service_changes_pending.set(self.pending_services.len() as i64);
        self.metrics.endpoint_changes_pending.set(self.pending_slices.len() as i64);
        let t = &mut self.translator;
        match u {
            Update::Services(Delta::Apply(s)) => t.upsert_service(&s),
            Update::Services(Delta::Delete((ns, name))) => t.delete_service(&ns, &name),
            Update::Services(Delta::Relisted(seen)) => {
                t.retain_services(&seen);
                self.full_sync = true;
            }
            Update::Slices(Delta::Apply(s)) => t.upsert_slice(&s),
            Update::Slices(Delta::Delete((ns, name))) => t.delete_slice(&ns, &name),
            Update::Slices(Delta::Relisted(seen)) => {
                t.retain_slices(&seen);
                self.full_sync = true;
            }
            Update::Nodes(Delta::Apply(n)) => self.node = Some(n),
            Update::Nodes(Delta::Delete(_)) => self.node = None,
            Update::Nodes(Delta::Relisted(seen)) => {
                if seen.is_empty() {
                    self.node = None;
                }
            }
        }
    }

    /// Apply what changed since the last sync.
    pub(super) fn sync(&mut self, burst_start: Option<Instant>) {
        let t = Instant::now();
        if let Some(snapshot) = self.source.snapshot() {
            match snapshot {
                Ok(objects) => {
                    self.translator.clear_unnamed();
                    for u in self.snapshots.diff(objects) {
                        self.update(u);
                    }
                }
                Err(e) => {
                    // Keep every frontend as it is: nothing here says the objects are gone.
                    error!(error = %e, "cannot read the objects; the maps are left as they are");
                    return;
                }
            }
        }
        let eligible = node_eligible(self.node.as_deref());
        if self.proxy_health.set_node_eligible(eligible) {
            match eligible {
                Err(why) => {
                    warn!(node = %self.node_name, reason = why, "/healthz now fails: load balancers drain this node")
                }
                Ok(()) => {
                    info!(node = %self.node_name, "/healthz passes again: the node is eligible for load-balanced traffic")
                }
            }
        }
        let node = node_info(&self.node_name, self.node.as_deref(), &self.nodeport_addresses, &self.local_addrs);
        if node.nodeport_addrs != self.translator.node().nodeport_addrs {
            info!(addresses = ?node.nodeport_addrs, nodeport_addresses = %self.nodeport_addresses, "NodePort addresses");
        }
        let ips = node_ips(self.node.as_deref());
        self.node_addrs.send_if_modified(|a| {
            let changed = *a != ips;
            a.clone_from(&ips);
            changed
        });
        self.translator.set_node(node);
        // The addresses programmed now stay with their Services on a conflict.
        let changed = self.translator.commit(&self.syncer);
        let translated = t.elapsed();
        let warnings = self.translator.warnings();
        // Each malformed object is logged once, not on every sync.
        let now: BTreeSet<String> = warnings.iter().map(|w| w.to_string()).collect();
        for w in &warnings {
            if !self.last_warnings.contains(&w.to_string()) {
                warn!(kind = w.kind, object = %w.object, "skipped: {}", w.message);
            }
        }
        self.metrics.object_warnings.set(now.len() as i64);
        self.last_warnings = now;

        // Node facts first: a flow to a new remote backend needs the SNAT address.
        let snat = snat_address(self.node.as_deref());
        let cfg = node_config(snat, Some(self.hairpin_address), self.snat_port_range);
        if self.last_node_config != Some(cfg) {
            match self.node_maps.set_config(&cfg) {
                Ok(()) => {
                    info!(
                        snat_address = %snat.map(|a| a.to_string()).unwrap_or_else(|| "(address the client used)".into()),
                        hairpin_address = %self.hairpin_address,
                        snat_ports = %self.snat_port_range,
                        "node config written"
                    );
                    self.last_node_config = Some(cfg);
                }
                Err(e) => error!(error = %e, "cannot write the node config"),
            }
        }
        let snat6 = snat_address6(self.node.as_deref());
        let cfg6 = node_config6(snat6, Some(self.hairpin_address6));
        if self.last_node_config6 != Some(cfg6) {
            match self.node_maps.set_config6(&cfg6) {
                Ok(()) => {
                    info!(
                        snat_address6 = %snat6.map(|a| a.to_string()).unwrap_or_else(|| "(address the client used)".into()),
                        hairpin_address6 = %self.hairpin_address6,
                        "IPv6 node config written"
                    );
                    self.last_node_config6 = Some(cfg6);
                }
                Err(e) => error!(error = %e, "cannot write the IPv6 node config"),
            }
        }
        let desired = self.translator.desired();
        self.health.update(&desired.health_checks);

        let full = std::mem::take(&mut self.full_sync);
        let report = if full { self.syncer.apply(desired) } else { self.syncer.apply_changes(desired, &changed) };
        self.synced_once = true;
        let elapsed = t.elapsed();
        self.metrics.sync_duration.observe(elapsed.as_secs_f64());
        if let Some(start) = burst_start {
            self.metrics.event_to_map.observe(start.elapsed().as_secs_f64());
        }
        self.observe_programming();
        self.metrics.map_writes.inc_by(report.writes);
        self.metrics.sync_errors.inc_by(report.errors.len() as u64);
        self.metrics.services.set(report.services as i64);
        self.metrics.backends.set(report.backends as i64);
        let (services4, backends4) = (report.services - report.services6, report.backends - report.backends6);
        for (family, n) in [(IpFamily::V4, services4), (IpFamily::V6, report.services6)] {
            self.metrics.frontends.get_or_create(&FamilyLabel { family: family.name().into() }).set(n as i64);
        }
        let fill = |n: usize, max: u32| n as f64 / f64::from(max.max(1));
        let c = self.capacities;
        for (map, n, max) in [
            ("SERVICES", services4, c.services),
            ("BACKENDS", backends4, c.backends),
            ("BACKEND_SLOTS", report.slots, c.slots),
            ("SERVICES6", report.services6, c.services6),
            ("BACKENDS6", report.backends6, c.backends6),
        ] {
            self.metrics.map_fill.get_or_create(&MapLabel { map: map.into() }).set(fill(n, max));
        }
        // A map that stays full fails the same frontends on every sync: log each once.
        let errors: BTreeSet<String> = report.errors.iter().map(|(fk, e)| format!("{fk}: {e}")).collect();
        for (fk, e) in &report.errors {
            if !self.last_errors.contains(&format!("{fk}: {e}")) {
                match report.unserved_ranges.iter().find(|(k, _)| k == fk) {
                    Some((_, service)) => warn!(
                        service = %service,
                        frontend = %fk,
                        error = %e,
                        "loadBalancerSourceRanges do not fit: frontend not served (fail closed) until they do"
                    ),
                    None => error!(frontend = %fk, error = %e, "frontend not programmed"),
                }
            }
        }
        self.metrics
            .frontends_unserved
            .get_or_create(&ReasonLabel { reason: "source_ranges_full".into() })
            .set(report.unserved_ranges.len() as i64);
        if errors.is_empty() && !self.last_errors.is_empty() {
            info!("every frontend programmed again");
        }
        self.last_errors = errors;
        if let Some(sl) = self.sock.as_ref().filter(|_| !report.removed_udp_backends.is_empty()) {
            let r = sock::destroy_udp_sockets(&sl.cgroup, &report.removed_udp_backends);
            self.metrics.sock_udp_destroyed.inc_by(r.destroyed as u64);
            self.metrics.sock_destroy_duration.observe(r.elapsed.as_secs_f64());
            info!(
                backends = report.removed_udp_backends.len(),
                namespaces = r.namespaces,
                destroyed = r.destroyed,
                failed = r.failed,
                duration_ms = r.elapsed.as_secs_f64() * 1e3,
                "destroyed connected UDP sockets of removed backends"
            );
        }
        info!(
            services = report.services,
            backends = report.backends,
            changed = changed.len(),
            full,
            translate_ms = translated.as_secs_f64() * 1e3,
            writes = report.writes,
            conntrack_purged = report.conntrack_purged,
            errors = report.errors.len(),
            duration_ms = elapsed.as_secs_f64() * 1e3,
            "synced"
        );
    }
}

impl SyncLoop {
    /// After a map write: kube-proxy's network programming latency of every slice change it
    /// applied, the last-sync time, and nothing pending any more.
    fn observe_programming(&mut self) {
        let now = SystemTime::now();
        let triggers = self.translator.take_trigger_times();
        for (slice, value) in &triggers.malformed {
            warn!(
                endpointslice = %slice,
                value = %value,
                "endpoints.kubernetes.io/last-change-trigger-time is not an RFC 3339 time: change not timed"
            );
        }
        for at in triggers.times.into_iter().filter(|t| *t >= self.started) {
            // A node clock behind the controller's gives a negative age: count it as 0.
            self.metrics.network_programming.observe(now.duration_since(at).map_or(0.0, |d| d.as_secs_f64()));
        }
        self.metrics.sync_last.set(unix_seconds(now));
        self.pending_services.clear();
        self.pending_slices.clear();
        self.metrics.service_changes_pending.set(0);
        self.metrics.endpoint_changes_pending.set(0);
    }

    /// Re-read the maps from their pins (not the syncer's own record of what it wrote) and
    /// compare them with the last desired state, as `ebpf-proxy verify` does: whatever
    /// changed them behind our back shows up here.
    pub(super) fn verify(&mut self) {
        if !self.synced_once {
            return;
        }
        let desired = self.translator.desired();
        let snap = match crate::dataplane::maps::Maps::open_pinned(&self.bpffs_root).and_then(|m| m.read_snapshot()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "verify: cannot read the pinned maps");
                return;
            }
        };
        let drift = crate::sync::verify::verify(desired, &snap);
        self.metrics.verify_runs.inc();
        self.metrics.datapath_drift.set(drift.len() as i64);
        let now: BTreeSet<String> = drift.iter().map(|d| d.to_string()).collect();
        for d in now.difference(&self.last_drift) {
            warn!(drift = %d, "the maps differ from what the API says");
        }
        if now.is_empty() && !self.last_drift.is_empty() {
            info!("the maps agree with the API again");
        }
        self.last_drift = now;
    }
}
