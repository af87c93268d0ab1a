//! The collector's thread in the agent: passes at `--conntrack-gc-interval`, or every
//! [`PRESSURE_INTERVAL`] while the table is under pressure (nearly full, or the datapath
//! counted `ct_full` drops since the last pass). It runs on its own OS thread, so neither
//! the sync loop nor the HTTP server ever waits for it, and a pass is bounded by the budget.
use std::{
    thread,
    time::{Duration, Instant},
};

use proxy_common::{ct::CtState, verdict};
use tracing::{debug, info, warn};

use super::{Census, Gc, GcConfig, Reason};
use crate::{
    dataplane::{ct_table::KernelCtTable, maps::GlobalStats},
    metrics::{Metrics, ReasonLabel, StateLabel},
};

/// Pass interval while the table is under pressure.
pub const PRESSURE_INTERVAL: Duration = Duration::from_millis(100);
/// Fill ratio from which the table counts as under pressure.
pub const PRESSURE_FILL: f64 = 0.9;

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`, which the datapath
/// stamps entries with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub struct GcTask {
    pub gc: Gc<KernelCtTable>,
    pub stats: GlobalStats,
    pub capacity: u32,
    pub interval: Duration,
    pub metrics: Metrics,
}

impl GcTask {
    pub fn new(table: KernelCtTable, stats: GlobalStats, cfg: GcConfig, interval: Duration, metrics: Metrics) -> Self {
        let capacity = match table.capacity() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot read the conntrack map's size; fill ratio unknown");
                0
            }
        };
        GcTask { gc: Gc::new(table, cfg), stats, capacity, interval, metrics }
    }

    /// Run forever on a thread of its own.
    pub fn spawn(mut self) {
        let spawned = thread::Builder::new().name("conntrack-gc".into()).spawn(move || {
            let mut last_full = self.ct_full_drops();
            let mut fill = 0.0;
            loop {
                let full = self.ct_full_drops();
                let pressure = fill >= PRESSURE_FILL || full > last_full;
                if full > last_full {
                    self.metrics.conntrack_full_drops.inc_by(full - last_full);
                }
                last_full = full;
                if let Some(f) = self.pass(pressure) {
                    fill = f;
                }
                thread::sleep(if pressure { PRESSURE_INTERVAL } else { self.interval });
            }
        });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the conntrack collector; closed flows will not be removed");
        }
    }

    fn ct_full_drops(&self) -> u64 {
        self.stats.total(verdict::CT_FULL).map(|c| c.packets).unwrap_or(0)
    }

    /// One pass; returns the fill ratio when the pass finished a walk over the table.
    fn pass(&mut self, pressure: bool) -> Option<f64> {
        let t = Instant::now();
        let report = match self.gc.pass(monotonic_ns(), pressure) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "conntrack GC pass failed");
                return None;
            }
        };
        let m = &self.metrics;
        m.conntrack_gc_runs.inc();
        m.conntrack_gc_duration.observe(t.elapsed().as_secs_f64());
        for (i, r) in Reason::ALL.iter().enumerate() {
            if report.deleted[i] > 0 {
                m.conntrack_gc_deleted
                    .get_or_create(&ReasonLabel { reason: r.name().into() })
                    .inc_by(report.deleted[i]);
            }
        }
        if report.deleted_total() > 0 {
            let [expired, pressured, orphans] = report.deleted;
            if pressured > 0 {
                info!(
                    scanned = report.scanned,
                    expired,
                    pressure = pressured,
                    orphans,
                    "conntrack under pressure: removed closed and unanswered flows"
                );
            } else {
                debug!(scanned = report.scanned, expired, orphans, "conntrack GC pass");
            }
        }
        let census: Census = report.census?;
        for (i, s) in CtState::ALL.iter().enumerate() {
            m.conntrack_flows
                .get_or_create(&StateLabel { state: s.name().into() })
                .set(census.flows_by_state[i] as i64);
        }
        m.conntrack_entries.set(census.entries as i64);
        let fill = if self.capacity > 0 { census.entries as f64 / f64::from(self.capacity) } else { 0.0 };
        m.map_fill
            .get_or_create(&crate::metrics::MapLabel { map: proxy_common::map_names::CONNTRACK.into() })
            .set(fill);
        Some(fill)
    }
}
