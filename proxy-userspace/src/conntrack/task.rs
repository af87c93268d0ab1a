//! The collector's thread in the agent: passes at `--conntrack-gc-interval`, or every
//! [`PRESSURE_INTERVAL`] while the assured table is under pressure (nearly full, or the
//! datapath counted `ct_full` drops since the last pass; the unassured table is an LRU and
//! makes its own room). It runs on its own OS thread, so neither the sync loop nor the HTTP
//! server ever waits for it, and a pass is bounded by the budget. One collector per family
//! (`CONNTRACK` + `CT_NEW`, `CONNTRACK6` + `CT_NEW6`), each with its own cursor and fill
//! ratios, on the same thread.
use std::{
    thread,
    time::{Duration, Instant},
};

use proxy_common::{CtKey, CtValue, Ipv6Words, ct::CtState, verdict};
use tracing::{debug, info, warn};

use super::{Census, Gc, GcConfig, Reason, kernel::KernelCtTable};
use crate::dataplane::maps::addr::MapAddr;
use crate::{
    dataplane::maps::{GlobalStats, ct::Table},
    metrics::{FamilyLabel, Metrics, ReasonLabel, StateLabel},
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

/// One family's collector and what the task remembers of it.
pub struct FamilyGc<A: MapAddr> {
    pub gc: Gc<KernelCtTable<A>>,
    /// Capacity of each table (indexed like [`Table::ALL`]).
    pub capacity: [u32; 2],
    /// Fill ratio of the assured table at the last complete walk: what pressure is about.
    fill: f64,
}

impl<A: MapAddr> FamilyGc<A>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    fn new(table: KernelCtTable<A>, cfg: GcConfig) -> Self {
        let capacity = Table::ALL.map(|t| match table.capacity(t) {
            Ok(c) => c,
            Err(e) => {
                warn!(map = A::ct_map(t), error = %e, "cannot read the conntrack map's size; fill ratio unknown");
                0
            }
        });
        FamilyGc { gc: Gc::new(table, cfg), capacity, fill: 0.0 }
    }

    /// One pass; keeps the fill ratio when the pass finished a walk over the table.
    fn pass(&mut self, pressure: bool, metrics: &Metrics) {
        let t = Instant::now();
        let report = match self.gc.pass(monotonic_ns(), pressure) {
            Ok(r) => r,
            Err(e) => {
                warn!(map = A::ct_map(Table::Assured), error = %e, "conntrack GC pass failed");
                return;
            }
        };
        let m = metrics;
        m.conntrack_gc_runs.inc();
        m.conntrack_gc_duration.observe(t.elapsed().as_secs_f64());
        for (i, r) in Reason::ALL.iter().enumerate() {
            if report.deleted[i] > 0 {
                m.conntrack_gc_deleted
                    .get_or_create(&ReasonLabel { reason: r.name().into() })
                    .inc_by(report.deleted[i]);
            }
        }
        if report.deleted_total() > 0 || report.spared > 0 {
            let [expired, pressured, orphans] = report.deleted;
            let spared = report.spared;
            if pressured > 0 {
                info!(
                    map = A::ct_map(Table::Assured),
                    scanned = report.scanned,
                    expired,
                    pressure = pressured,
                    orphans,
                    spared,
                    "conntrack under pressure: removed closed flows"
                );
            } else {
                debug!(
                    map = A::ct_map(Table::Assured),
                    scanned = report.scanned,
                    expired,
                    orphans,
                    spared,
                    "conntrack GC pass"
                );
            }
        }
        let Some(census): Option<Census> = report.census else { return };
        for (i, s) in CtState::ALL.iter().enumerate() {
            m.conntrack_flows
                .get_or_create(&StateLabel { state: s.name().into(), family: A::NAME.into() })
                .set(census.flows_by_state[i] as i64);
        }
        m.conntrack_entries.get_or_create(&FamilyLabel { family: A::NAME.into() }).set(census.entries() as i64);
        for t in Table::ALL {
            let cap = self.capacity[t.index()];
            let fill = if cap > 0 { census.entries_by_table[t.index()] as f64 / f64::from(cap) } else { 0.0 };
            m.map_fill.get_or_create(&crate::metrics::MapLabel { map: A::ct_map(t).into() }).set(fill);
            if t == Table::Assured {
                self.fill = fill;
            }
        }
    }
}

pub struct GcTask {
    pub v4: FamilyGc<u32>,
    pub v6: FamilyGc<Ipv6Words>,
    pub stats: GlobalStats,
    pub interval: Duration,
    pub metrics: Metrics,
}

impl GcTask {
    pub fn new(
        tables: (KernelCtTable<u32>, KernelCtTable<Ipv6Words>),
        stats: GlobalStats,
        cfg: GcConfig,
        interval: Duration,
        metrics: Metrics,
    ) -> Self {
        GcTask { v4: FamilyGc::new(tables.0, cfg), v6: FamilyGc::new(tables.1, cfg), stats, interval, metrics }
    }

    /// Run forever on a thread of its own.
    pub fn spawn(mut self) {
        let spawned = thread::Builder::new().name("conntrack-gc".into()).spawn(move || {
            let mut last_full = self.ct_full_drops();
            loop {
                // `ct_full` is counted for both families together: drops put both under
                // pressure; a nearly full assured table puts only its family.
                let full = self.ct_full_drops();
                let dropped = full > last_full;
                if dropped {
                    self.metrics.conntrack_full_drops.inc_by(full - last_full);
                }
                last_full = full;
                let (p4, p6) = (dropped || self.v4.fill >= PRESSURE_FILL, dropped || self.v6.fill >= PRESSURE_FILL);
                self.v4.pass(p4, &self.metrics);
                self.v6.pass(p6, &self.metrics);
                thread::sleep(if p4 || p6 { PRESSURE_INTERVAL } else { self.interval });
            }
        });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the conntrack collector; closed flows will not be removed");
        }
    }

    fn ct_full_drops(&self) -> u64 {
        self.stats.total(verdict::CT_FULL).map(|c| c.packets).unwrap_or(0)
    }
}
