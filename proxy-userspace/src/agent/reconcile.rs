//! The reconciler: feed object changes into the translation as they arrive (`update`),
//! apply what they changed to the maps (`sync`), compare the pinned maps with the desired
//! state (`verify`), and the metrics both set.
//!
//! A sync re-translates only the Services the changes touched and writes only the frontends
//! whose desired entry changed (`Translator::commit`, `Syncer::apply_changes`). The first
//! sync, and the first after a relist, look at every frontend (`Syncer::apply`): what the
//! pinned maps hold from before may include Services deleted while the agent was away.
use std::{
    collections::HashSet,
    net::IpAddr,
    time::{Instant, SystemTime},
};

use proxy_common::map_names;
use tracing::{error, info, warn};

use super::{log_once::LogOnce, node_config::NodeConfigs, socket_lb::SockLb};
use crate::{
    dataplane::{
        maps::catalogue,
        maps::{Capacities, Maps},
        sock,
    },
    healthcheck::HealthServers,
    metrics::{FamilyLabel, MapLabel, Metrics, ReasonLabel, unix_seconds},
    model::{
        IpFamily, Translator,
        node::{NodePortAddresses, node_eligible, node_info, node_ips, serve_localhost},
    },
    source::{Delta, Snapshots, Source, Update},
    sync::{SyncReport, Syncer},
};

pub(super) struct SyncLoop {
    pub(super) syncer: Syncer<Maps>,
    /// `NODE_CONFIG`, `NODE_CONFIG6`: written before the maps at every sync.
    pub(super) node_configs: NodeConfigs,
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
    /// `--nodeport-localhost`.
    pub(super) nodeport_localhost: bool,
    /// The network namespace's addresses (`dataplane::kernel::local_addrs`), which NodePorts are
    /// served on as `nodeport_addresses` selects.
    pub(super) local_addrs: Vec<IpAddr>,
    pub(super) metrics: Metrics,
    pub(super) capacities: Capacities,
    /// Malformed objects, frontends not programmed and drift: logged when they appear.
    pub(super) logged: Logged,
    /// The Node's InternalIP/ExternalIP addresses, for uplink detection (when `--uplink`
    /// names none). Not every NodePort address: that would put XDP on bridges and overlay
    /// devices holding a local address.
    pub(super) node_addrs: tokio::sync::watch::Sender<Vec<IpAddr>>,
    /// Whether a sync has run (verify compares against its desired state).
    pub(super) synced_once: bool,
    pub(super) bpffs_root: std::path::PathBuf,
    /// Socket-level load balancing, when attached: stale UDP sockets to destroy.
    pub(super) sock: Option<SockLb>,
    /// Slice changes triggered before this are not timed (kube-proxy ignores trigger times
    /// before its own start: a restart would otherwise report the age of every slice).
    pub(super) started: SystemTime,
    pub(super) pending: Pending,
}

/// Services and EndpointSlices changed since the last sync (kube-proxy's
/// `*_changes_pending`), by (namespace, name).
#[derive(Default)]
pub(super) struct Pending {
    services: HashSet<(String, String)>,
    slices: HashSet<(String, String)>,
}

/// What was logged as lasting, so it is not logged again on every sync while it lasts.
#[derive(Default)]
pub(super) struct Logged {
    /// Malformed objects skipped by the translation.
    warnings: LogOnce,
    /// Frontends not programmed, with why.
    errors: LogOnce,
    /// Where the maps differ from the API (`verify`).
    drift: LogOnce,
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
                self.pending.services.insert(meta_key(&s.metadata));
            }
            Update::Services(Delta::Delete(key)) => {
                self.metrics.service_changes.inc();
                self.pending.services.insert(key.clone());
            }
            Update::Slices(Delta::Apply(s)) => {
                self.metrics.endpoint_changes.inc();
                self.pending.slices.insert(meta_key(&s.metadata));
            }
            Update::Slices(Delta::Delete(key)) => {
                self.metrics.endpoint_changes.inc();
                self.pending.slices.insert(key.clone());
            }
            _ => {}
        }
        self.metrics.service_changes_pending.set(self.pending.services.len() as i64);
        self.metrics.endpoint_changes_pending.set(self.pending.slices.len() as i64);
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

    /// Apply what changed since the last sync: the objects' changes (`read_objects`) and the
    /// Node's state into the translation, the node's facts and then the translation into
    /// the maps; then what that did into the metrics and the log.
    pub(super) fn sync(&mut self, burst_start: Option<Instant>) {
        let t = Instant::now();
        if !self.read_objects() {
            return;
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
        let mut node = node_info(&self.node_name, self.node.as_deref(), &self.nodeport_addresses, &self.local_addrs);
        if self.nodeport_localhost {
            serve_localhost(&mut node);
        }
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
        self.logged.warnings.round(warnings.iter().map(|w| (w.to_string(), w)), |w| {
            warn!(kind = w.kind, object = %w.object, "skipped: {}", w.message);
        });
        self.metrics.object_warnings.set(self.logged.warnings.len() as i64);

        // Node facts first: a flow to a new remote backend needs the SNAT address.
        self.node_configs.write(self.node.as_deref());
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
        self.record(&report);
        self.log_errors(&report);
        self.destroy_udp_sockets(&report.removed_udp_backends);
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
    /// A files source's changes since the last sync, into the translation (an API source
    /// delivers its changes through `update` as they come). False: the objects cannot be
    /// read, and the maps stay as they are.
    fn read_objects(&mut self) -> bool {
        match self.source.snapshot() {
            None => true,
            Some(Ok(objects)) => {
                self.translator.clear_unnamed();
                for u in self.snapshots.diff(objects) {
                    self.update(u);
                }
                true
            }
            Some(Err(e)) => {
                // Keep every frontend as it is: nothing here says the objects are gone.
                error!(error = %e, "cannot read the objects; the maps are left as they are");
                false
            }
        }
    }

    /// What the sync left in the maps, into the metrics.
    fn record(&mut self, report: &SyncReport) {
        let m = &self.metrics;
        m.map_writes.inc_by(report.writes);
        m.sync_errors.inc_by(report.errors.len() as u64);
        m.services.set(report.services as i64);
        m.backends.set(report.backends as i64);
        let (services4, backends4) = (report.services - report.services6, report.backends - report.backends6);
        for (family, n) in [(IpFamily::V4, services4), (IpFamily::V6, report.services6)] {
            m.frontends.get_or_create(&FamilyLabel { family: family.name().into() }).set(n as i64);
        }
        let fill = |n: usize, max: u32| n as f64 / f64::from(max.max(1));
        let c = self.capacities;
        // The maps whose catalogue row exports a fill ratio and that the sync fills (the
        // conntrack tables' come from their GC, `conntrack::task`).
        for row in catalogue::MAPS.iter().filter(|r| r.fill_ratio) {
            let (n, max) = match row.name {
                map_names::SERVICES => (services4, c.services),
                map_names::BACKENDS => (backends4, c.backends),
                map_names::BACKEND_SLOTS => (report.slots, c.slots),
                map_names::SERVICES6 => (report.services6, c.services6),
                map_names::BACKENDS6 => (report.backends6, c.backends6),
                _ => continue,
            };
            m.map_fill.get_or_create(&MapLabel { map: row.name.into() }).set(fill(n, max));
        }
        m.frontends_unserved
            .get_or_create(&ReasonLabel { reason: "source_ranges_full".into() })
            .set(report.unserved_ranges.len() as i64);
    }

    /// A map that stays full fails the same frontends on every sync: each is logged when it
    /// starts to fail, and the end once.
    fn log_errors(&mut self, report: &SyncReport) {
        let errors = report.errors.iter().map(|(fk, e)| (format!("{fk}: {e}"), (fk, e)));
        let cleared =
            self.logged.errors.round(errors, |(fk, e)| match report.unserved_ranges.iter().find(|(k, _)| k == fk) {
                Some((_, service)) => warn!(
                    service = %service,
                    frontend = %fk,
                    error = %e,
                    "loadBalancerSourceRanges do not fit: frontend not served (fail closed) until they do"
                ),
                None => error!(frontend = %fk, error = %e, "frontend not programmed"),
            });
        if cleared {
            info!("every frontend programmed again");
        }
    }

    /// With socket-level load balancing: connected UDP sockets pointed at the UDP backends
    /// the sync deleted are destroyed, so their applications reconnect.
    fn destroy_udp_sockets(&mut self, removed: &[(IpAddr, u16)]) {
        let Some(sl) = self.sock.as_ref().filter(|_| !removed.is_empty()) else { return };
        let r = sock::destroy::destroy_udp_sockets(&sl.cgroup, removed);
        self.metrics.sock_udp_destroyed.inc_by(r.destroyed as u64);
        self.metrics.sock_destroy_duration.observe(r.elapsed.as_secs_f64());
        info!(
            backends = removed.len(),
            namespaces = r.namespaces,
            destroyed = r.destroyed,
            failed = r.failed,
            duration_ms = r.elapsed.as_secs_f64() * 1e3,
            "destroyed connected UDP sockets of removed backends"
        );
    }

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
        self.pending = Pending::default();
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
        let cleared = self.logged.drift.round(drift.iter().map(|d| (d.to_string(), d)), |d| {
            warn!(drift = %d, "the maps differ from what the API says");
        });
        if cleared {
            info!("the maps agree with the API again");
        }
    }
}
