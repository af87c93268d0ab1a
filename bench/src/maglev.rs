//! Maglev backend selection (issue 24 item 1): what a new flow costs with Maglev beside
//! random selection at 1 and 10,000 Services (BPF_PROG_TEST_RUN, one run per distinct new
//! flow, the two kinds interleaved on one loaded datapath so interference lands on both),
//! the time to build a table at 16,381 and 65,521 slots, the memory a table costs per
//! frontend (the run of the kernel's Maglev array a table takes, 4 bytes a slot), and one
//! backend change of a Maglev Service with the others loaded (the control-plane budget:
//! p99 under 5 ms at 10,000 Services).
//!
//! Only some of the loaded Services are Maglev (`MAGLEV_SERVICES`): 10,000 tables of 16,381
//! slots would be 160 M array elements (640 MiB); the lookups the rows time do not depend on
//! how many tables there are.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use proxy_common::{svc_flags, verdict};
use proxy_userspace::model::{
    BackendAddr, FrontendEntry, FrontendKey, LbAlgorithm,
    maglev::{self, MaglevBackend},
};
use proxy_userspace::sync::MaglevConfig;

use crate::{Plan, check_interrupted, dp::Dataplane, median, report::Row, rules};

const SECTION: &str = "maglev";
const FROM_POD: &str = "from_pod";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
/// Maglev Services among the loaded ones (the rest random).
const MAGLEV_SERVICES: usize = 16;
/// Backends of the Services whose tables are built and timed.
const TABLE_BACKENDS: usize = 100;

/// Every row of the section.
pub fn run(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    table_rows(plan, rows)?;
    let sizes: Vec<usize> = if plan.quick { vec![1, 100] } else { vec![1, 10_000] };
    for n in sizes {
        check_interrupted()?;
        new_flow_rows(plan, n, rows)?;
    }
    Ok(())
}

/// A Service's backends as Maglev sees them.
fn backends(n: usize) -> Vec<MaglevBackend> {
    (0..n).map(|j| MaglevBackend { addr: IpAddr::V4(rules::fake_endpoint(0, j, n)), port: 8080, weight: 1 }).collect()
}

/// Build time (userspace) and memory per frontend (kernel and the agent's mirror).
fn table_rows(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    let reps = if plan.quick { 3 } else { 21 };
    for m in [maglev::DEFAULT_TABLE_SIZE, 65_521] {
        let b = backends(TABLE_BACKENDS);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            let table = maglev::build_table(&b, m);
            times.push(t.elapsed().as_secs_f64() * 1e6);
            ensure!(table.len() == m as usize, "table of {} slots for {m}", table.len());
        }
        rows.push(
            Row::new(SECTION, &format!("table_build_m{m}"), Some(TABLE_BACKENDS), median(times), "us")
                .note(format!("median of {reps}: one table of {m} slots for {TABLE_BACKENDS} backends")),
        );
        let kernel = kernel_bytes_per_table(m)?;
        rows.push(Row::new(SECTION, &format!("table_kernel_bytes_m{m}"), Some(1), kernel as f64 / 1024.0, "KiB").note(
            "the run of the Maglev array (4 B a slot, preallocated) one frontend's table takes: per Maglev frontend",
        ));
        rows.push(
            Row::new(SECTION, &format!("table_agent_bytes_m{m}"), Some(1), f64::from(m) * 4.0 / 1024.0, "KiB")
                .note("the agent's mirror of one table (a backend id per slot)"),
        );
    }
    Ok(())
}

/// The kernel memory one frontend's table takes: the run of the Maglev array it was given
/// (the array is preallocated, so `memlock` does not move; the run's length is read from
/// the `SERVICES` value and checked against the array's element size), written through
/// the sync into an empty map.
fn kernel_bytes_per_table(m: u32) -> Result<u64> {
    let mut dp = Dataplane::load(1, TABLE_BACKENDS)?;
    dp.syncer.set_maglev(MaglevConfig { table_size: m, north_south: LbAlgorithm::Random });
    let svcs = rules::services(1, TABLE_BACKENDS, None);
    let r = dp.syncer.apply(&desired(&svcs, 1));
    ensure!(r.errors.is_empty(), "{:?}", r.errors);
    let v = dp
        .maps()
        .services
        .iter()
        .filter_map(Result::ok)
        .map(|(_, v)| v)
        .find(|v| v.flags & svc_flags::MAGLEV != 0)
        .context("no Maglev frontend in SERVICES")?;
    ensure!(v.maglev_size == m && v.maglev_base != 0, "table of {} slots at {} for {m}", v.maglev_size, v.maglev_base);
    let array = dp.maps().maglev.as_ref().context("no MAGLEV map")?;
    ensure!(array.get(&(v.maglev_base + m - 1), 0).is_ok_and(|id| id != 0), "the run's last slot is empty");
    Ok(maglev::kernel_bytes(v.maglev_size))
}

/// `svcs` as frontends, the first `maglev` of them Maglev.
fn desired(svcs: &[rules::Svc], maglev: usize) -> proxy_userspace::model::DesiredState {
    let mut d = rules::desired(svcs);
    for (i, e) in d.frontends.values_mut().enumerate() {
        if i < maglev {
            std::sync::Arc::make_mut(e).lb_algorithm = Some(LbAlgorithm::Maglev);
        }
    }
    d
}

/// A SYN of a new flow from the client's source port `sport` to `vip`:`port`.
fn syn(sport: u16, vip: Ipv4Addr, port: u16) -> Vec<u8> {
    proxy_tests::harness::tcp_segment((CLIENT, sport), (vip, port), 0x02, b"")
}

fn new_flows_counted(dp: &Dataplane, id: u32) -> u64 {
    dp.maps()
        .service_stats
        .get(&proxy_common::StatsKey { svc_id: id, verdict: verdict::NEW_FLOW }, 0)
        .map(|pc| pc.iter().map(|c| c.packets).sum())
        .unwrap_or(0)
}

/// New flows to a Maglev Service and to a random one, interleaved, with `n` Services
/// loaded; then one backend change of a Maglev Service.
fn new_flow_rows(plan: &Plan, n: usize, rows: &mut Vec<Row>) -> Result<()> {
    let per = 10;
    let mut dp = Dataplane::load(n, per)?;
    let svcs = rules::services(n.max(2), per, None);
    let maglev_count = MAGLEV_SERVICES.min(svcs.len() - 1);
    let d = desired(&svcs, maglev_count);
    let r = dp.syncer.apply(&d);
    ensure!(r.errors.is_empty(), "{:?}", r.errors);
    let id_of = |dp: &Dataplane, s: &rules::Svc| -> Result<(u32, u32)> {
        let key = proxy_common::ServiceKey {
            addr: proxy_userspace::dataplane::maps::addr::ip_to_map(s.vip),
            port: proxy_common::port_to_map(s.port),
            proto: proxy_common::PROTO_TCP,
            scope: proxy_common::SCOPE_INTERNAL,
        };
        let v = dp.maps().services.get(&key, 0).with_context(|| format!("{} not in SERVICES", s.vip))?;
        Ok((v.id, v.flags))
    };
    // The keys are in address order: the first Services are the Maglev ones.
    let (mg, rnd) = (&svcs[0], &svcs[svcs.len() - 1]);
    let (mg_id, mg_flags) = id_of(&dp, mg)?;
    let (rnd_id, rnd_flags) = id_of(&dp, rnd)?;
    ensure!(mg_flags & svc_flags::MAGLEV != 0 && rnd_flags & svc_flags::MAGLEV == 0, "algorithms not as set");

    let k = plan.pp_new_flows.min(20_000);
    // Frames built first; the two kinds take turns running first, so neither always
    // follows the userspace work between pairs (cold caches) nor always the other's run.
    // The turns follow the Thue-Morse sequence (parity of the pair's set bits), not plain
    // alternation: the kernel does some work in batches that recur every 2^k runs, and
    // plain alternation put every such batch on the same kind. The conntrack LRU map
    // (`CT_NEW`) refills its per-CPU free list every 128 inserts, ~6 us each time: every
    // 32 pairs here (4 inserts a pair), always the first run of an even pair, so always the
    // Maglev one (+190 ns on its mean, none of it Maglev's). Thue-Morse shares any period of
    // 2^k pairs evenly: each kind is first in half the pairs of every aligned block.
    let frames: Vec<(Vec<u8>, Vec<u8>)> = (0..k)
        .map(|i| {
            let sport = 20_000 + i as u16;
            (syn(sport, mg.vip, mg.port), syn(sport, rnd.vip, rnd.port))
        })
        .collect();
    let (mut t_mg, mut t_rnd) = (0.0, 0.0);
    for (i, (to_mg, to_rnd)) in frames.iter().enumerate() {
        if i.count_ones() % 2 == 0 {
            t_mg += dp.time(FROM_POD, to_mg, 1)?;
            t_rnd += dp.time(FROM_POD, to_rnd, 1)?;
        } else {
            t_rnd += dp.time(FROM_POD, to_rnd, 1)?;
            t_mg += dp.time(FROM_POD, to_mg, 1)?;
        }
    }
    ensure!(new_flows_counted(&dp, mg_id) == k as u64, "Maglev new flows not all counted");
    ensure!(new_flows_counted(&dp, rnd_id) == k as u64, "random new flows not all counted");
    let note = |what: &str| {
        format!(
            "mean of {k} single runs (SYNs of distinct flows) to a {what} Service; {maglev_count} of {n} Services Maglev"
        )
    };
    rows.push(Row::new(SECTION, "new_flow_maglev", Some(n), t_mg / k as f64, "ns").note(note("Maglev")));
    rows.push(Row::new(SECTION, "new_flow_random", Some(n), t_rnd / k as f64, "ns").note(note("random")));

    // One backend change of a Maglev Service (one endpoint replaced), n Services loaded.
    let reps = plan.cp_change_reps.max(5);
    let key: FrontendKey = rules::frontend_key(mg);
    let mut d = d;
    let mut times = Vec::with_capacity(reps);
    for rep in 0..reps {
        let e: &mut FrontendEntry = std::sync::Arc::make_mut(d.frontends.get_mut(&key).context("the Maglev Service")?);
        let last = e.backends.len() - 1;
        e.backends[last] = BackendAddr {
            addr: IpAddr::V4(Ipv4Addr::new(10, 250, (rep / 250) as u8, (rep % 250) as u8 + 1)),
            port: 8080,
            local: true,
            terminating: false,
        };
        let t = Instant::now();
        let r = dp.syncer.apply_changes(&d, &[key].into_iter().collect());
        times.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(r.errors.is_empty(), "{:?}", r.errors);
    }
    times.sort_by(f64::total_cmp);
    let p99 = crate::percentile(&times, 99.0);
    rows.push(Row::new(SECTION, "change_maglev_p99", Some(n), p99, "ms").note(format!(
        "p99 of {reps}: one endpoint of a Maglev Service replaced (table rebuilt, moved slots written)"
    )));
    Ok(())
}
