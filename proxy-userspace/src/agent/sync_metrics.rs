//! The reconciler's metrics: the changes it is told of as they come (`changed`), what a
//! sync did, recorded by one call with the sync's summary (`record`), and what a periodic
//! verify found (`verified`).
use std::{
    collections::HashSet,
    time::{Duration, SystemTime},
};

use proxy_common::map_names;

use crate::{
    dataplane::maps::{Capacities, catalogue},
    metrics::{FamilyLabel, MapLabel, Metrics, PhaseLabel, ReasonLabel, unix_seconds},
    model::IpFamily,
    source::{Delta, Update},
    sync::SyncReport,
};

/// What one sync did, as its metrics count it.
pub(super) struct PassSummary<'a> {
    /// Translation and map writes (the socket destruction at the end has a histogram of its
    /// own: `report.udp_sockets`).
    pub(super) duration: Duration,
    /// From the first change of the burst it applied to its map writes; `None` for a sync
    /// no change asked for.
    pub(super) event_to_map: Option<Duration>,
    /// Malformed objects the translation skips.
    pub(super) object_warnings: usize,
    /// The last-change-trigger-times of the EndpointSlice changes it applied.
    pub(super) trigger_times: Vec<SystemTime>,
    pub(super) report: &'a SyncReport,
}

pub(super) struct SyncMetrics {
    pub(super) metrics: Metrics,
    /// The sizes of the maps in use, for their fill ratios.
    capacities: Capacities,
    /// Slice changes triggered before this are not timed (kube-proxy ignores trigger times
    /// before its own start: a restart would otherwise report the age of every slice).
    started: SystemTime,
    pending: Pending,
}

/// Services and EndpointSlices changed since the last sync (kube-proxy's
/// `*_changes_pending`), by a hash of (namespace, name): a gauge needs only how many
/// differ, and a start-up's every object then costs 8 bytes here instead of a copy of its
/// two names (about 25 MB at 100,000 Services).
#[derive(Default)]
struct Pending {
    services: HashSet<u64>,
    slices: HashSet<u64>,
}

/// The pending-change key of `(namespace, name)`.
fn key_hash(namespace: &str, name: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one((namespace, name))
}

/// The pending-change key of an object.
fn meta_key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    key_hash(m.namespace.as_deref().unwrap_or_default(), m.name.as_deref().unwrap_or_default())
}

impl SyncMetrics {
    /// The start-up's phases (`startup::Startup`): one gauge each, and one log line.
    pub(super) fn started(&self, phases: &[(&'static str, Duration)]) {
        for (phase, d) in phases {
            self.metrics.startup.get_or_create(&PhaseLabel { phase: (*phase).to_string() }).set(d.as_secs_f64());
        }
        let ms = |name: &str| phases.iter().find(|(p, _)| *p == name).map_or(0.0, |(_, d)| d.as_secs_f64() * 1e3);
        tracing::info!(
            prepare_ms = ms("prepare"),
            load_ms = ms("load"),
            setup_ms = ms("setup"),
            objects_ms = ms("objects"),
            translate_ms = ms("translate"),
            apply_ms = ms("apply"),
            total_ms = ms("total"),
            "started: the first sync is done"
        );
    }

    /// Fill ratios are zero until `set_capacities` (the maps load after the first changes
    /// come in).
    pub(super) fn new(metrics: Metrics) -> Self {
        SyncMetrics {
            metrics,
            capacities: Capacities::default(),
            started: SystemTime::now(),
            pending: Pending::default(),
        }
    }

    /// The sizes of the maps in use, for their fill ratios.
    pub(super) fn set_capacities(&mut self, capacities: Capacities) {
        self.capacities = capacities;
    }

    /// A change a sync is owed for (an event of the source), now.
    pub(super) fn queued(&self) {
        self.metrics.queued_now();
    }

    /// One change of a Service or an EndpointSlice: counted, and pending until the next
    /// sync.
    pub(super) fn changed(&mut self, u: &Update) {
        let m = &self.metrics;
        let (changes, pending, key) = match u {
            Update::Services(Delta::Apply(s)) => {
                (&m.service_changes, &mut self.pending.services, meta_key(&s.metadata))
            }
            Update::Services(Delta::Delete((ns, name))) => {
                (&m.service_changes, &mut self.pending.services, key_hash(ns, name))
            }
            Update::Slices(Delta::Apply(s)) => (&m.endpoint_changes, &mut self.pending.slices, meta_key(&s.metadata)),
            Update::Slices(Delta::Delete((ns, name))) => {
                (&m.endpoint_changes, &mut self.pending.slices, key_hash(ns, name))
            }
            _ => return,
        };
        changes.inc();
        pending.insert(key);
        m.service_changes_pending.set(self.pending.services.len() as i64);
        m.endpoint_changes_pending.set(self.pending.slices.len() as i64);
    }

    /// Everything one sync did: its durations, kube-proxy's network programming latency of
    /// every slice change it applied, nothing pending any more, what it left in the maps
    /// (counts, fill ratios, errors) and the sockets it destroyed.
    pub(super) fn record(&mut self, pass: &PassSummary) {
        let m = &self.metrics;
        m.object_warnings.set(pass.object_warnings as i64);
        m.sync_duration.observe(pass.duration.as_secs_f64());
        if let Some(d) = pass.event_to_map {
            m.event_to_map.observe(d.as_secs_f64());
        }
        let now = SystemTime::now();
        for at in pass.trigger_times.iter().filter(|t| **t >= self.started) {
            // A node clock behind the controller's gives a negative age: count it as 0.
            m.network_programming.observe(now.duration_since(*at).map_or(0.0, |d| d.as_secs_f64()));
        }
        m.sync_last.set(unix_seconds(now));
        self.pending = Pending::default();
        m.service_changes_pending.set(0);
        m.endpoint_changes_pending.set(0);
        self.record_maps(pass.report);
        if let Some(s) = pass.report.udp_sockets {
            m.sock_udp_destroyed.inc_by(s.destroyed as u64);
            m.sock_destroy_duration.observe(s.elapsed.as_secs_f64());
        }
    }

    /// What the sync left in the maps.
    fn record_maps(&self, report: &SyncReport) {
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

    /// A periodic verify found `drift` differences.
    pub(super) fn verified(&self, drift: usize) {
        self.metrics.verify_runs.inc();
        self.metrics.datapath_drift.set(drift as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn slice(ns: &str, name: &str) -> Update {
        let s =
            serde_json::json!({"metadata": {"namespace": ns, "name": name}, "addressType": "IPv4", "endpoints": []});
        Update::Slices(Delta::Apply(Arc::new(serde_json::from_value(s).unwrap())))
    }

    /// kube-proxy's `endpoint_changes_pending`: distinct slices changed since the last sync
    /// (the same one twice, or changed then deleted, is one), every change counted.
    #[test]
    fn pending_changes_count_distinct_objects() {
        let mut m = SyncMetrics::new(Metrics::new());
        m.changed(&slice("a", "web-1"));
        m.changed(&slice("a", "web-1"));
        m.changed(&slice("b", "web-1"));
        // The same letters split differently between namespace and name: two objects.
        m.changed(&slice("ab", "c"));
        m.changed(&slice("a", "bc"));
        m.changed(&Update::Slices(Delta::Delete(("a".into(), "web-1".into()))));
        assert_eq!(m.metrics.endpoint_changes_pending.get(), 4);
        assert_eq!(m.metrics.endpoint_changes.get(), 6);
        assert_eq!(m.metrics.service_changes_pending.get(), 0);
    }
}
