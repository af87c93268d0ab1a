//! Per-packet cost of the TC programs through BPF_PROG_TEST_RUN.
//!
//! BPF_PROG_TEST_RUN with `repeat` runs the program again and again on the *same* skb: a
//! rewrite made by one repetition is what the next one sees. A plain "service hit" frame is
//! therefore a hit once and, DNATed to its backend, a non-service packet for every other
//! repetition. To time the established path for real, the hit is measured on a pair of
//! frontends that are each other's backend (A:80 -> B:8080, B:8080 -> A:80): once both flows
//! are tracked, every repetition is a conntrack hit that rewrites destination address and port (A:80 ->
//! B:8080, then back, ...) with checksum updates and per-service counters, like any established
//! packet. The reply (to_pod, reverse NAT) alternates the same way. The per-service
//! counters are read back to check that every repetition took the intended path.
//!
//! The sizes are loaded side by side and timed in interleaved rounds (size 1, 1,000, ...,
//! then again), keeping the least of the rounds: interference from the rest of a shared
//! machine only ever adds time, and interleaving spreads it over every size instead of
//! landing on one.
//!
//! A new flow cannot repeat (it creates the conntrack entry), so it is timed with one run
//! per call over many distinct flows; "miss (single run)" is the same kind of measurement
//! of a non-service packet, for comparison (single runs include timer overhead).
use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context, Result, bail, ensure};
use etherparse::PacketBuilder;
use proxy_common::{PROTO_TCP, SCOPE_INTERNAL, ServiceKey, StatsKey, verdict};
use proxy_tests::harness::decode;
use proxy_userspace::{
    dataplane::addr::{ip_to_map, port_to_map},
    model::BackendAddr,
};

use crate::{Plan, check_interrupted, dp::Dataplane, median, report::Row, rules};

const FROM_POD: &str = "from_pod";
const TO_POD: &str = "to_pod";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const CLIENT_PORT: u16 = 40000;
/// Port of the mirror frontend: every hit rewrites address and port, as a real DNAT does.
const MIRROR_PORT: u16 = 8080;

/// An established-connection segment (ACK, no SYN) with a small payload.
fn ack_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 65535)
        .ack(1);
    let mut v = Vec::new();
    b.write(&mut v, b"0123456789abcdef").expect("build frame");
    v
}

fn svc_id(dp: &Dataplane, vip: Ipv4Addr, port: u16) -> Result<u32> {
    let key = ServiceKey { addr: ip_to_map(vip), port: port_to_map(port), proto: PROTO_TCP, scope: SCOPE_INTERNAL };
    Ok(dp.maps().services.get(&key, 0).with_context(|| format!("service {vip}:{port} not in the map"))?.id)
}

fn count(dp: &Dataplane, ids: &[u32], v: u32) -> u64 {
    ids.iter()
        .map(|id| {
            dp.maps()
                .service_stats
                .get(&StatsKey { svc_id: *id, verdict: v }, 0)
                .map(|pc| pc.iter().map(|c| c.packets).sum::<u64>())
                .unwrap_or(0)
        })
        .sum()
}

/// One loaded size, primed for the timed loops.
struct Loaded {
    n: usize,
    dp: Dataplane,
    svcs: Vec<rules::Svc>,
    /// Ids of the mirrored pair (A, B).
    ids: [u32; 2],
    to_a: Vec<u8>,
    reply: Vec<u8>,
    miss: Vec<u8>,
    hit: Vec<f64>,
    miss_ns: Vec<f64>,
    reply_ns: Vec<f64>,
}

pub fn run(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    let mut loaded = Vec::new();
    for &n in &plan.pp_sizes {
        check_interrupted()?;
        loaded.push(load(n, rows).with_context(|| format!("per-packet, {n} services"))?);
    }
    let repeat = plan.pp_repeat;
    let runs = plan.pp_runs.max(1);
    // Warm-up (not reported).
    for l in &mut loaded {
        l.dp.time(FROM_POD, &l.to_a, repeat / 4 + 1)?;
    }
    let mut before = Vec::new();
    for l in &loaded {
        before.push((count(&l.dp, &l.ids, verdict::ESTABLISHED), count(&l.dp, &l.ids, verdict::REVERSE_NAT)));
    }
    for _ in 0..runs {
        for l in &mut loaded {
            check_interrupted()?;
            let hit = l.dp.time(FROM_POD, &l.to_a, repeat)?;
            let miss = l.dp.time(FROM_POD, &l.miss, repeat)?;
            let reply = l.dp.time(TO_POD, &l.reply, repeat)?;
            l.hit.push(hit);
            l.miss_ns.push(miss);
            l.reply_ns.push(reply);
        }
    }
    let want = u64::from(repeat) * runs as u64;
    for (l, (est0, rev0)) in loaded.iter_mut().zip(before) {
        let n = l.n;
        let hits = count(&l.dp, &l.ids, verdict::ESTABLISHED) - est0;
        let nats = count(&l.dp, &l.ids, verdict::REVERSE_NAT) - rev0;
        if hits < want || nats < want {
            bail!("{n} services: {hits} established and {nats} reverse-NAT verdicts for {want} repetitions each");
        }
        let least = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let how = format!("least of {runs} interleaved rounds of {repeat} repetitions");
        rows.push(Row::new("per_packet", "hit", Some(n), least(&l.hit), "ns").note(format!(
            "established flow: conntrack hit + DNAT of address and port; {how} (median {:.0}); \
             {hits} established verdicts counted for {want} repetitions",
            median(l.hit.clone())
        )));
        rows.push(Row::new("per_packet", "miss", Some(n), least(&l.miss_ns), "ns").note(format!(
            "non-service destination, passed untouched; {how} (median {:.0})",
            median(l.miss_ns.clone())
        )));
        rows.push(Row::new("per_packet", "reply", Some(n), least(&l.reply_ns), "ns").note(format!(
            "to_pod reverse NAT of a tracked flow; {how} (median {:.0}); {nats} reverse-NAT verdicts counted",
            median(l.reply_ns.clone())
        )));
        single_runs(plan, l, rows)?;
    }
    Ok(())
}

/// Load and program `n` services of 2 backends; the last one and one extra "mirror"
/// frontend point at each other (see the module docs). Both flows are primed.
fn load(n: usize, rows: &mut Vec<Row>) -> Result<Loaded> {
    let mut dp = Dataplane::load(n + 1, 2)?;
    let svcs = rules::services(n, 2, None);
    let a = rules::vip(n - 1);
    let b = rules::vip(n);
    let mut desired = rules::desired(&svcs);
    let to_b = BackendAddr { addr: b.into(), port: MIRROR_PORT, local: true, terminating: false };
    desired.frontends.get_mut(&rules::frontend_key(&svcs[n - 1])).expect("last service").backends = vec![to_b];
    let mirror = rules::Svc { name: "mirror".into(), vip: b, port: MIRROR_PORT, endpoints: vec![(a, rules::SVC_PORT)] };
    desired.frontends.insert(rules::frontend_key(&mirror), rules::frontend_entry(&mirror));
    let t = Instant::now();
    let r = dp.syncer.apply(&desired);
    let sync_ms = t.elapsed().as_secs_f64() * 1e3;
    ensure!(r.errors.is_empty(), "sync errors: {:?}", r.errors.first());
    ensure!(r.services == n + 1, "{} frontends programmed, wanted {}", r.services, n + 1);
    rows.push(Row::new("per_packet", "sync_ms", Some(n), sync_ms, "ms").note(format!(
        "{} frontends, {} map writes, cold",
        n + 1,
        r.writes
    )));
    let ids = [svc_id(&dp, a, rules::SVC_PORT)?, svc_id(&dp, b, MIRROR_PORT)?];

    // Prime both flows (each first run is a new flow that creates the conntrack entries).
    let client = (CLIENT, CLIENT_PORT);
    let to_a = ack_frame(client, (a, rules::SVC_PORT));
    let (_, out) = dp.run(FROM_POD, &to_a)?;
    ensure!(decode(&out).dst == (b, MIRROR_PORT), "A:80 not DNATed to B:8080: {:?}", decode(&out));
    let (_, out) = dp.run(FROM_POD, &ack_frame(client, (b, MIRROR_PORT)))?;
    ensure!(decode(&out).dst == (a, rules::SVC_PORT), "B:8080 not DNATed to A:80");
    // The reply of those flows entering the client pod: B:8080 -> client, reverse NAT.
    let reply = ack_frame((b, MIRROR_PORT), client);
    let (_, out) = dp.run(TO_POD, &reply)?;
    ensure!(decode(&out).src == (a, rules::SVC_PORT), "reply not reverse-NATed: {:?}", decode(&out));
    // A destination that is not a service (conntrack miss, service miss).
    let miss = ack_frame(client, (Ipv4Addr::new(10, 244, 9, 9), 9999));
    Ok(Loaded { n, dp, svcs, ids, to_a, reply, miss, hit: vec![], miss_ns: vec![], reply_ns: vec![] })
}

/// What cannot repeat on one skb: new flows (and, for reference, single runs of the miss).
fn single_runs(plan: &Plan, l: &mut Loaded, rows: &mut Vec<Row>) -> Result<()> {
    let n = l.n;
    let repeat = plan.pp_repeat;
    let dp = &mut l.dp;
    // For comparison, the naive measurement: `repeat` on one frame of a regular service.
    // Only its first repetition is a hit; the rest see the already-DNATed packet. (Needs a
    // service other than the mirrored last one.)
    let mid = &l.svcs[n / 2];
    let mid_id = svc_id(dp, mid.vip, mid.port)?;
    if n >= 3 {
        let naive_frame = ack_frame((CLIENT, 39_999), (mid.vip, mid.port));
        dp.run(FROM_POD, &naive_frame)?;
        let before = count(dp, &[mid_id], verdict::ESTABLISHED);
        let naive = dp.time(FROM_POD, &naive_frame, repeat)?;
        let naive_hits = count(dp, &[mid_id], verdict::ESTABLISHED) - before;
        rows.push(Row::new("per_packet", "hit_naive", Some(n), naive, "ns").note(format!(
            "NOT a hit cost: repeat on one service frame; {naive_hits} of {repeat} repetitions were hits, the rest missed"
        )));
    }
    // New flows: one run per call, distinct source ports, to a service in the middle.
    let k = plan.pp_new_flows.min(20_000);
    let before = count(dp, &[mid_id], verdict::NEW_FLOW);
    let mut total = 0.0;
    for i in 0..k {
        let f = ack_frame((CLIENT, 20_000 + i as u16), (mid.vip, mid.port));
        total += dp.time(FROM_POD, &f, 1)?;
    }
    let created = count(dp, &[mid_id], verdict::NEW_FLOW) - before;
    ensure!(created == k as u64, "{created} new flows counted for {k} frames");
    rows.push(
        Row::new("per_packet", "new_flow", Some(n), total / k as f64, "ns")
            .note(format!("mean of {k} single runs: service lookup, backend choice, 2 conntrack inserts, DNAT")),
    );
    let mut total = 0.0;
    for _ in 0..k {
        total += dp.time(FROM_POD, &l.miss, 1)?;
    }
    rows.push(
        Row::new("per_packet", "miss_single", Some(n), total / k as f64, "ns")
            .note(format!("mean of {k} single runs of the miss frame (single-run overhead reference)")),
    );
    Ok(())
}
