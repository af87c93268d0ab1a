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
//!
//! IPv6 is measured beside IPv4 on the same loaded datapath: every service, backend and
//! client has an IPv6 twin (the IPv4 address embedded in fd00::/96), programmed through the
//! same sync into the IPv6 maps, and both families are timed in the same interleaved rounds
//! (`*_v6` rows).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use etherparse::PacketBuilder;
use proxy_common::{PROTO_TCP, SCOPE_INTERNAL, ServiceKey, StatsKey, port_to_map, verdict};
use proxy_tests::harness::{decode, decode6};
use proxy_userspace::{
    dataplane::maps::addr::{ip_to_map, ip6_to_map},
    model::{BackendAddr, DesiredState},
};

use crate::{
    Plan, check_interrupted,
    dp::Dataplane,
    median,
    report::{Row, XDP_RATIOS, row_id},
    rules,
};

const FROM_POD: &str = "from_pod";
const TO_POD: &str = "to_pod";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const CLIENT_PORT: u16 = 40000;
/// Port of the mirror frontend: every hit rewrites address and port, as a real DNAT does.
const MIRROR_PORT: u16 = 8080;

/// The IPv6 twin of an IPv4 address of the bench: embedded in fd00::/96.
pub fn twin(a: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = a.octets();
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))
}

/// Address `a` of the bench in family `v6`.
fn fam(a: Ipv4Addr, v6: bool) -> IpAddr {
    if v6 { twin(a).into() } else { a.into() }
}

/// An established-connection segment (ACK, no SYN) with a small payload.
fn ack_frame(src: (IpAddr, u16), dst: (IpAddr, u16)) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    };
    let mut v = Vec::new();
    ip.tcp(src.1, dst.1, 1000, 65535).ack(1).write(&mut v, b"0123456789abcdef").expect("build frame");
    v
}

/// (source, destination) as (address, port) of a frame of either family.
fn ends(frame: &[u8]) -> ((IpAddr, u16), (IpAddr, u16)) {
    let ip = |(a, p): (std::net::Ipv4Addr, u16)| (IpAddr::from(a), p);
    let ip6 = |(a, p): (Ipv6Addr, u16)| (IpAddr::from(a), p);
    if frame[12..14] == [0x86, 0xdd] {
        let d = decode6(frame);
        (ip6(d.src), ip6(d.dst))
    } else {
        let d = decode(frame);
        (ip(d.src), ip(d.dst))
    }
}

fn svc_id(dp: &Dataplane, vip: IpAddr, port: u16) -> Result<u32> {
    let (port_be, proto, scope) = (port_to_map(port), PROTO_TCP, SCOPE_INTERNAL);
    let v = match vip {
        IpAddr::V4(a) => dp.maps().services.get(&ServiceKey { addr: ip_to_map(a), port: port_be, proto, scope }, 0),
        IpAddr::V6(a) => dp.maps().services6.get(&ServiceKey { addr: ip6_to_map(a), port: port_be, proto, scope }, 0),
    };
    Ok(v.with_context(|| format!("service {vip}:{port} not in the map"))?.id)
}

/// The IPv6 twin of every frontend of `d` (addresses mapped with [`twin`]).
fn v6_twins(
    d: &DesiredState,
) -> Vec<(proxy_userspace::model::FrontendKey, Arc<proxy_userspace::model::FrontendEntry>)> {
    let v6 = |a: IpAddr| match a {
        IpAddr::V4(a) => IpAddr::V6(twin(a)),
        other => other,
    };
    d.frontends
        .iter()
        .map(|(k, e)| {
            let mut k = *k;
            k.addr = v6(k.addr);
            let mut e = e.clone();
            for b in &mut Arc::make_mut(&mut e).backends {
                b.addr = v6(b.addr);
            }
            (k, e)
        })
        .collect()
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

/// One family's frames and timings on a loaded size.
struct Fam {
    v6: bool,
    /// Ids of the mirrored pair (A, B).
    ids: [u32; 2],
    to_a: Vec<u8>,
    reply: Vec<u8>,
    miss: Vec<u8>,
    hit: Vec<f64>,
    miss_ns: Vec<f64>,
    reply_ns: Vec<f64>,
}

impl Fam {
    /// Row case name: `hit` for IPv4, `hit_v6` for IPv6.
    fn case(&self, c: &str) -> String {
        if self.v6 { format!("{c}_v6") } else { c.to_string() }
    }
}

/// One loaded size, primed for the timed loops.
struct Loaded {
    n: usize,
    dp: Dataplane,
    svcs: Vec<rules::Svc>,
    fams: [Fam; 2],
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
        for f in &l.fams {
            l.dp.time(FROM_POD, &f.to_a, repeat / 4 + 1)?;
        }
    }
    let mut before = Vec::new();
    for l in &loaded {
        for f in &l.fams {
            before.push((count(&l.dp, &f.ids, verdict::ESTABLISHED), count(&l.dp, &f.ids, verdict::REVERSE_NAT)));
        }
    }
    for _ in 0..runs {
        for l in &mut loaded {
            check_interrupted()?;
            // IPv4 and IPv6 back to back: whatever else the machine does lands on both.
            for f in &mut l.fams {
                f.hit.push(l.dp.time(FROM_POD, &f.to_a, repeat)?);
                f.miss_ns.push(l.dp.time(FROM_POD, &f.miss, repeat)?);
                f.reply_ns.push(l.dp.time(TO_POD, &f.reply, repeat)?);
            }
        }
    }
    let want = u64::from(repeat) * runs as u64;
    let mut before = before.into_iter();
    for l in &mut loaded {
        let n = l.n;
        for f in &l.fams {
            let (est0, rev0) = before.next().expect("one entry per family");
            let hits = count(&l.dp, &f.ids, verdict::ESTABLISHED) - est0;
            let nats = count(&l.dp, &f.ids, verdict::REVERSE_NAT) - rev0;
            let fam_name = if f.v6 { "IPv6" } else { "IPv4" };
            if hits < want || nats < want {
                bail!(
                    "{n} services, {fam_name}: {hits} established and {nats} reverse-NAT verdicts for {want} repetitions each"
                );
            }
            let least = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
            let how = format!("{fam_name}; least of {runs} interleaved rounds of {repeat} repetitions");
            rows.push(Row::new("per_packet", &f.case("hit"), Some(n), least(&f.hit), "ns").note(format!(
                "established flow: conntrack hit + DNAT of address and port; {how} (median {:.0}); \
                 {hits} established verdicts counted for {want} repetitions",
                median(f.hit.clone())
            )));
            rows.push(Row::new("per_packet", &f.case("miss"), Some(n), least(&f.miss_ns), "ns").note(format!(
                "non-service destination, passed untouched; {how} (median {:.0})",
                median(f.miss_ns.clone())
            )));
            rows.push(Row::new("per_packet", &f.case("reply"), Some(n), least(&f.reply_ns), "ns").note(format!(
                "to_pod reverse NAT of a tracked flow; {how} (median {:.0}); {nats} reverse-NAT verdicts counted",
                median(f.reply_ns.clone())
            )));
        }
        let (v4, v6) = (&l.fams[0], &l.fams[1]);
        // Paired: each round's IPv6 hit over the IPv4 hit timed just before it.
        let per_round: Vec<f64> = v6.hit.iter().zip(&v4.hit).map(|(a, b)| a / b).collect();
        if let Some(r) = Row::median_of("per_packet", "hit_v6_over_v4", Some(n), &per_round, "x") {
            rows.push(r.note(format!(
                "IPv6 hit / IPv4 hit, median of {} per-round ratios, same datapath (goal: within 1.15)",
                per_round.len()
            )));
        }
        single_runs(plan, l, rows)?;
    }
    check_interrupted()?;
    xdp_floor(plan, rows).context("per-packet, XDP against its floor")?;
    Ok(())
}

/// Load and program `n` services of 2 backends, in both families; the last one and one
/// extra "mirror" frontend point at each other (see the module docs). Every flow is primed.
fn load(n: usize, rows: &mut Vec<Row>) -> Result<Loaded> {
    // Both families' frontends share the service ids (and SERVICE_META).
    let mut dp = Dataplane::load(2 * (n + 1), 2)?;
    let svcs = rules::services(n, 2, None);
    let a = rules::vip(n - 1);
    let b = rules::vip(n);
    let mut desired = rules::desired(&svcs);
    let to_b = BackendAddr { addr: b.into(), port: MIRROR_PORT, local: true, terminating: false };
    Arc::make_mut(desired.frontends.get_mut(&rules::frontend_key(&svcs[n - 1])).expect("last service")).backends =
        vec![to_b];
    let mirror = rules::Svc { name: "mirror".into(), vip: b, port: MIRROR_PORT, endpoints: vec![(a, rules::SVC_PORT)] };
    desired.frontends.insert(rules::frontend_key(&mirror), Arc::new(rules::frontend_entry(&mirror)));
    let twins = v6_twins(&desired);
    desired.frontends.extend(twins);
    let t = Instant::now();
    let r = dp.syncer.apply(&desired);
    let sync_ms = t.elapsed().as_secs_f64() * 1e3;
    ensure!(r.errors.is_empty(), "sync errors: {:?}", r.errors.first());
    ensure!(r.services == 2 * (n + 1), "{} frontends programmed, wanted {}", r.services, 2 * (n + 1));
    rows.push(Row::new("per_packet", "sync_ms", Some(n), sync_ms, "ms").note(format!(
        "{} frontends (IPv4 and IPv6), {} map writes, cold",
        2 * (n + 1),
        r.writes
    )));
    let fams = [prime(&mut dp, n, false)?, prime(&mut dp, n, true)?];
    Ok(Loaded { n, dp, svcs, fams })
}

/// Prime one family's mirrored flows (each first run is a new flow that creates the
/// conntrack entries) and build its frames.
fn prime(dp: &mut Dataplane, n: usize, v6: bool) -> Result<Fam> {
    let (a, b) = (fam(rules::vip(n - 1), v6), fam(rules::vip(n), v6));
    let ids = [svc_id(dp, a, rules::SVC_PORT)?, svc_id(dp, b, MIRROR_PORT)?];
    let client = (fam(CLIENT, v6), CLIENT_PORT);
    let to_a = ack_frame(client, (a, rules::SVC_PORT));
    let (_, out) = dp.run(FROM_POD, &to_a)?;
    ensure!(ends(&out).1 == (b, MIRROR_PORT), "A:80 not DNATed to B:8080: {:?}", ends(&out));
    let (_, out) = dp.run(FROM_POD, &ack_frame(client, (b, MIRROR_PORT)))?;
    ensure!(ends(&out).1 == (a, rules::SVC_PORT), "B:8080 not DNATed to A:80");
    // The reply of those flows entering the client pod: B:8080 -> client, reverse NAT.
    let reply = ack_frame((b, MIRROR_PORT), client);
    let (_, out) = dp.run(TO_POD, &reply)?;
    ensure!(ends(&out).0 == (a, rules::SVC_PORT), "reply not reverse-NATed: {:?}", ends(&out));
    // A destination that is not a service (conntrack miss, service miss).
    let miss = ack_frame(client, (fam(Ipv4Addr::new(10, 244, 9, 9), v6), 9999));
    Ok(Fam { v6, ids, to_a, reply, miss, hit: vec![], miss_ns: vec![], reply_ns: vec![] })
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
    for f in &l.fams {
        let (mid_vip, client) = (fam(mid.vip, f.v6), fam(CLIENT, f.v6));
        let mid_id = svc_id(dp, mid_vip, mid.port)?;
        if n >= 3 && !f.v6 {
            let naive_frame = ack_frame((client, 39_999), (mid_vip, mid.port));
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
            let fr = ack_frame((client, 20_000 + i as u16), (mid_vip, mid.port));
            total += dp.time(FROM_POD, &fr, 1)?;
        }
        let created = count(dp, &[mid_id], verdict::NEW_FLOW) - before;
        ensure!(created == k as u64, "{created} new flows counted for {k} frames");
        rows.push(
            Row::new("per_packet", &f.case("new_flow"), Some(n), total / k as f64, "ns")
                .note(format!("mean of {k} single runs: service lookup, backend choice, 2 conntrack inserts, DNAT")),
        );
        let mut total = 0.0;
        for _ in 0..k {
            total += dp.time(FROM_POD, &f.miss, 1)?;
        }
        rows.push(
            Row::new("per_packet", &f.case("miss_single"), Some(n), total / k as f64, "ns")
                .note(format!("mean of {k} single runs of the miss frame (single-run overhead reference)")),
        );
    }
    Ok(())
}

// XDP against its floor: the uplink program beside two bench-only programs of the object
// (proxy-ebpf `floor`, never loaded by the agent): one that only returns XDP_PASS, and a
// bare forwarder (bpf_fib_lookup + MACs + bpf_redirect).

const FLOOR_PASS: &str = "floor_xdp_pass";
const FLOOR_FIB: &str = "floor_xdp_fib_forward";
const FROM_UPLINK: &str = "from_uplink";
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
/// The forwarding namespace: our uplink `up0` on the node address, node 2 (the next hop
/// towards the remote pod) as a permanent neighbour.
const UPLINK: &str = "up0";
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 2];
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const OUTSIDE_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 100);
const NODE_PORT: u16 = 30081;

/// The timed rows of this section (ns per packet).
pub const XDP_CASES: [&str; 4] = ["xdp_pass_floor", "xdp_fib_floor", "xdp_miss", "xdp_remote_hit"];

/// The per-packet rows of this section a run must produce.
pub fn xdp_rows() -> Vec<String> {
    XDP_CASES.iter().chain(XDP_RATIOS.iter().map(|(c, _, _)| c)).map(|c| row_id("per_packet", c, None)).collect()
}

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The four XDP figures in interleaved rounds, each ratio per round.
///
/// The XDP_PASS floor and the non-service frame leave the frame as it was, so `repeat`
/// times them exactly. A remote hit rewrites the frame (DNAT + SNAT, TTL), so `repeat`
/// would time one hit and then misses: it is timed as single runs on fresh copies, and so
/// is the bare forwarder it is compared with (same method on both sides of the ratio). A
/// single run carries the test-run harness's per-call overhead, taken off both as measured
/// on the XDP_PASS floor in the same round (its single-run mean minus its repeat mean);
/// what is left of a single run still includes colder caches than `repeat` sees (the
/// forwarder's `repeat` figure is in the row's note).
fn xdp_floor(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    let ns = proxy_tests::netns::Netns::new("epb-xdp-")?;
    ns.ip(&["link", "add", UPLINK, "address", &mac(UPLINK_MAC), "type", "veth", "peer", "name", "up0p"])?;
    ns.ip(&["link", "set", UPLINK, "up"])?;
    ns.ip(&["link", "set", "up0p", "up"])?;
    ns.ip(&["addr", "add", &format!("{NODE}/24"), "dev", UPLINK])?;
    ns.ip(&["route", "add", "10.244.2.0/24", "via", &NODE2.to_string(), "dev", UPLINK])?;
    ns.ip(&["neigh", "replace", &NODE2.to_string(), "lladdr", &mac(NODE2_MAC), "nud", "permanent", "dev", UPLINK])?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    let up0 = ns.run(|| {
        let name = std::ffi::CString::new(UPLINK).expect("no NUL");
        // SAFETY: a NUL-terminated name.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    });
    ensure!(up0 != 0, "no {UPLINK} in {}", ns.name);

    let mut dp = Dataplane::load(2, 2)?;
    let np = proxy_tests::harness::ext(NODE, NODE_PORT, proxy_userspace::model::Protocol::Tcp);
    let entry = proxy_tests::harness::ext_entry(
        proxy_userspace::model::FrontendKind::NodePort,
        &[(REMOTE_POD, rules::SVC_PORT, false)],
    );
    let r = dp.syncer.apply(&proxy_tests::harness::state(vec![(np, entry)]));
    ensure!(r.errors.is_empty(), "sync errors: {:?}", r.errors.first());
    // The agent's loader (which `Dataplane::load` is) leaves the floors out: loaded here only.
    for p in [FLOOR_PASS, FLOOR_FIB] {
        let program = dp.programs.ebpf.program(p).with_context(|| format!("{p} not in the eBPF object"))?;
        ensure!(program.info().is_err(), "{p} was loaded by the agent's loader: it is bench-only");
        dp.load_xdp(p)?;
    }

    let client: IpAddr = OUTSIDE_CLIENT.into();
    let remote = ack_frame((client, 40001), (NODE.into(), NODE_PORT));
    let miss = ack_frame((client, 40001), (NODE.into(), 22));
    let repeat = plan.pp_repeat;
    let singles = plan.pp_new_flows.clamp(1, 20_000);
    let runs = plan.pp_runs.max(1);
    let mut t: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut raw: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    ns.run(|| -> Result<()> {
        // The first packet creates the flow; every later one is an established remote hit.
        let (v, out, _) = dp.xdp_run(FROM_UPLINK, &remote, up0, 1)?;
        ensure!(v == XDP_TX, "NodePort remote hit: XDP verdict {v}, wanted XDP_TX");
        let (src, dst) = ends(&out);
        ensure!(
            dst == (REMOTE_POD.into(), rules::SVC_PORT) && src.0 == IpAddr::from(NODE),
            "not translated: {src:?} -> {dst:?}"
        );
        // The bare forwarder gets the packet as our program sends it: to the remote pod.
        let fwd = out;
        let (v, out, _) = dp.xdp_run(FLOOR_FIB, &fwd, up0, 1)?;
        ensure!(v == XDP_REDIRECT && out[..6] == NODE2_MAC, "bare forwarder: verdict {v}, MACs {:02x?}", &out[..12]);
        let (v, out, _) = dp.xdp_run(FROM_UPLINK, &miss, up0, 1)?;
        ensure!(v == XDP_PASS && out == miss, "non-service frame: verdict {v}, or rewritten");
        let (v, _, _) = dp.xdp_run(FLOOR_PASS, &miss, up0, 1)?;
        ensure!(v == XDP_PASS, "XDP_PASS floor: verdict {v}");
        // Warm-up.
        for (p, f) in [(FLOOR_PASS, &miss), (FLOOR_FIB, &fwd), (FROM_UPLINK, &miss)] {
            dp.xdp_run(p, f, up0, repeat / 4 + 1)?;
        }
        let single = |dp: &mut Dataplane, prog, frame: &[u8]| -> Result<f64> {
            let mut total = 0.0;
            for _ in 0..singles {
                total += dp.xdp_run(prog, frame, up0, 1)?.2;
            }
            Ok(total / singles as f64)
        };
        for _ in 0..runs {
            check_interrupted()?;
            let pass = dp.xdp_run(FLOOR_PASS, &miss, up0, repeat)?.2;
            let fib = dp.xdp_run(FLOOR_FIB, &fwd, up0, repeat)?.2;
            let our_miss = dp.xdp_run(FROM_UPLINK, &miss, up0, repeat)?.2;
            let pass_single = single(&mut dp, FLOOR_PASS, &miss)?;
            let fib_single = single(&mut dp, FLOOR_FIB, &fwd)?;
            let remote_single = single(&mut dp, FROM_UPLINK, &remote)?;
            let overhead = (pass_single - pass).max(0.0);
            let (hit, fib_floor) = (remote_single - overhead, fib_single - overhead);
            for (k, v) in [
                ("xdp_pass_floor", pass),
                ("xdp_fib_floor", fib_floor),
                ("xdp_miss", our_miss),
                ("xdp_remote_hit", hit),
                ("xdp_miss_vs_pass_floor", our_miss / pass),
                ("xdp_remote_vs_fib_floor", hit / fib_floor),
            ] {
                t.entry(k).or_default().push(v);
            }
            for (k, v) in [
                ("pass_single", pass_single),
                ("fib_single", fib_single),
                ("remote_single", remote_single),
                ("fib_repeat", fib),
            ] {
                raw.entry(k).or_default().push(v);
            }
        }
        // Still the intended paths after the timing.
        let (v, out, _) = dp.xdp_run(FROM_UPLINK, &remote, up0, 1)?;
        ensure!(v == XDP_TX && ends(&out).1 == (REMOTE_POD.into(), rules::SVC_PORT), "remote hit changed path: {v}");
        Ok(())
    })?;
    let med = |k: &str| raw.get(k).map(|v| median(v.clone())).unwrap_or(f64::NAN);
    let how = format!("median of {runs} interleaved rounds");
    let single = format!(
        "mean of {singles} single runs on fresh frames minus the harness's per-run overhead \
         (XDP_PASS floor: {:.1} ns single, {:.1} ns with repeat)",
        med("pass_single"),
        t.get("xdp_pass_floor").map(|v| median(v.clone())).unwrap_or(f64::NAN)
    );
    for (case, unit, note) in [
        ("xdp_pass_floor", "ns", format!("bench-only XDP program returning XDP_PASS; repeat {repeat}; {how}")),
        (
            "xdp_fib_floor",
            "ns",
            format!(
                "bench-only bare forwarder: bpf_fib_lookup, MACs written, bpf_redirect (XDP_REDIRECT): {single}; \
                 with repeat {repeat} (warm caches): {:.1} ns; {how}",
                med("fib_repeat")
            ),
        ),
        ("xdp_miss", "ns", format!("from_uplink, non-service frame (XDP_PASS untouched); repeat {repeat}; {how}")),
        (
            "xdp_remote_hit",
            "ns",
            format!(
                "from_uplink, established NodePort flow to a remote backend (DNAT + SNAT + fib + XDP_TX): {single}; {how}"
            ),
        ),
        ("xdp_miss_vs_pass_floor", "x", format!("per-round ratio, both with repeat {repeat}; {how} (goal: <= 1.3)")),
        (
            "xdp_remote_vs_fib_floor",
            "x",
            format!(
                "per-round ratio, both as single runs; {how} (goal: <= 1.5); before taking the overhead off: {:.2}x",
                med("remote_single") / med("fib_single")
            ),
        ),
    ] {
        let r = Row::median_of("per_packet", case, None, &t[case], unit).context("no rounds")?;
        rows.push(r.note(note));
    }
    Ok(())
}
