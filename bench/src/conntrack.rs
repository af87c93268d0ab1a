//! The conntrack collector's cost: one complete walk over a table of live flows, the first
//! with a quarter of them closed long ago (removed) and the second with nothing left to do
//! (the steady state). Entries are written straight into a freshly loaded CONNTRACK map and
//! collected with the agent's own `Gc` over the kernel maps (`BPF_MAP_LOOKUP_BATCH`; the
//! walk covers the empty CT_NEW too). Each removal re-reads the entry and its partner first
//! (compare before delete), which this walk's cost includes.
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use proxy_common::{CT_DIR_FORWARD, CtKey, CtValue, PROTO_TCP, ct_flags};
use proxy_userspace::{
    conntrack::kernel::KernelCtTable,
    conntrack::{Gc, GcConfig, task::monotonic_ns},
};

use crate::{Plan, dp::Dataplane, report::Row};

const SECTION: &str = "conntrack";
const S: u64 = 1_000_000_000;

/// Walk the whole table once; returns (total ms, slowest pass ms, entries removed, passes).
fn walk(gc: &mut Gc<KernelCtTable>) -> Result<(f64, f64, u64, usize)> {
    let (t, mut slowest, mut removed, mut passes) = (Instant::now(), 0f64, 0u64, 0usize);
    loop {
        let p = Instant::now();
        let r = gc.pass(monotonic_ns(), false).context("GC pass")?;
        slowest = slowest.max(p.elapsed().as_secs_f64() * 1e3);
        removed += r.deleted_total();
        passes += 1;
        if r.census.is_some() {
            return Ok((t.elapsed().as_secs_f64() * 1e3, slowest, removed, passes));
        }
    }
}

/// Flows in the table: (flows, entries at the start, entries live after the first walk).
fn sizes(plan: &Plan) -> (usize, usize, usize) {
    let flows: usize = if plan.quick { 5_000 } else { 100_000 };
    (flows, flows * 2, flows * 2 - flows / 4 * 2)
}

/// The rows `run` produces.
pub fn expected_rows(plan: &Plan) -> Vec<String> {
    let (_, entries, left) = sizes(plan);
    let mut v: Vec<String> = ["walk_with_expired_ms", "slowest_pass_ms", "passes_per_walk"]
        .iter()
        .map(|c| crate::report::row_id(SECTION, c, Some(entries)))
        .collect();
    for c in ["walk_steady_ms", "steady_slowest_pass_ms", "walk_us_per_1000_entries"] {
        v.push(crate::report::row_id(SECTION, c, Some(left)));
    }
    v
}

pub fn run(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    let (flows, entries, left) = sizes(plan);
    let dp = Dataplane::load(1, 1)?;
    let now = monotonic_ns();
    let mut ct = aya::maps::HashMap::<_, CtKey, CtValue>::try_from(aya::maps::Map::HashMap(
        aya::maps::MapData::from_pin(dp.pins.0.join("maps/CONNTRACK")).context("CONNTRACK pin")?,
    ))?;
    for i in 0..flows as u32 {
        let fwd = CtKey {
            src_addr: i.to_be(),
            dst_addr: 0x0a60_000a,
            src_port: 1000,
            dst_port: 80,
            proto: PROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        // A quarter closed a minute ago (expired), the rest established and recently used:
        // assured flows, which is what CONNTRACK holds.
        let closed = i % 4 == 0;
        let assured = ct_flags::SEEN_REPLY | ct_flags::ASSURED;
        let flags = assured | if closed { ct_flags::CLOSING | ct_flags::FIN_FWD | ct_flags::FIN_REV } else { 0 };
        let seen = if closed { now.saturating_sub(60 * S) } else { now };
        let v = CtValue {
            nat_addr: 0x0af4_0101,
            nat_port: 8080,
            flags,
            last_seen: seen,
            svc_id: 1,
            backend_id: 1,
            ..Default::default()
        };
        let rk = fwd.reply_of_forward(&v);
        let rv = CtValue {
            nat_addr: fwd.dst_addr,
            nat_port: fwd.dst_port,
            flags,
            last_seen: seen,
            svc_id: 1,
            backend_id: 1,
            ..Default::default()
        };
        ct.insert(fwd, v, 0)?;
        ct.insert(rk, rv, 0)?;
    }
    let mut gc = Gc::new(KernelCtTable::open_pinned(&dp.pins.0)?, GcConfig::default());
    let (ms, slowest, removed, passes) = walk(&mut gc)?;
    ensure!(removed == (flows / 4 * 2) as u64, "expected {} entries removed, got {removed}", flows / 4 * 2);
    rows.push(Row::new(SECTION, "walk_with_expired_ms", Some(entries), ms, "ms"));
    rows.push(Row::new(SECTION, "slowest_pass_ms", Some(entries), slowest, "ms"));
    rows.push(Row::new(SECTION, "passes_per_walk", Some(entries), passes as f64, "passes"));
    let (ms, slowest, removed, _) = walk(&mut gc)?;
    ensure!(removed == 0, "a second walk removed {removed} live entries");
    rows.push(Row::new(SECTION, "walk_steady_ms", Some(left), ms, "ms"));
    rows.push(Row::new(SECTION, "steady_slowest_pass_ms", Some(left), slowest, "ms"));
    rows.push(Row::new(SECTION, "walk_us_per_1000_entries", Some(left), ms * 1e3 / (left as f64 / 1e3), "us"));
    Ok(())
}
