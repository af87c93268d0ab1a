//! Maglev backend selection in the datapath (issue 24 item 1), through BPF_PROG_TEST_RUN:
//! two independent dataplanes (separate pin dirs, backend ids handed out in a different
//! order) given the same Service send the same new flows to the same backends, and the
//! choice is the datapath's own (a frame in, the rewritten destination out). Removing one
//! of N backends moves at most 1/N + 1% of the flows that did not go to it. Without Maglev
//! (random, today's behaviour) the two dataplanes agree only by chance, which is what the
//! last test shows.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use proxy_common::svc_flags;
use proxy_tests::harness::*;
use proxy_userspace::model::{
    BackendAddr, FrontendEntry, FrontendKey, LbAlgorithm, Protocol, Scope, maglev::DEFAULT_TABLE_SIZE,
};

const FROM_POD: &str = "from_pod";
const TC_ACT_UNSPEC: i32 = -1;
const FLOWS: usize = 10_000;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 7, 10);
const DECOY: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 99);

fn backends4(n: u8) -> Vec<IpAddr> {
    (1..=n).map(|i| IpAddr::V4(Ipv4Addr::new(10, 244, i, 7))).collect()
}

fn backends6(n: u16) -> Vec<IpAddr> {
    (1..=n).map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, i, 0, 0, 0, 0, 7))).collect()
}

fn maglev_entry(name: &str, backends: &[IpAddr], algorithm: Option<LbAlgorithm>) -> FrontendEntry {
    FrontendEntry {
        backends: backends
            .iter()
            .map(|a| BackendAddr { addr: *a, port: 8080, local: true, terminating: false })
            .collect(),
        lb_algorithm: algorithm,
        weights: vec![],
        ..entry(name, &[])
    }
}

fn key(vip: IpAddr) -> FrontendKey {
    FrontendKey { addr: vip, port: 80, proto: Protocol::Tcp, scope: Scope::Internal }
}

fn program(dp: &mut TestDataplane, entries: Vec<(FrontendKey, FrontendEntry)>) {
    let r = dp.syncer.apply(&state(entries));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

/// A dataplane whose backend ids were handed out in another order first: a decoy Service
/// takes the same backends in reverse order (plus one more) before the real one is written.
fn load_with_shuffled_ids(vip: IpAddr, backends: &[IpAddr], algorithm: Option<LbAlgorithm>) -> TestDataplane {
    let mut dp = TestDataplane::load();
    let mut rev: Vec<IpAddr> = backends.iter().rev().copied().collect();
    rev.insert(
        0,
        if vip.is_ipv4() { IpAddr::V4(Ipv4Addr::new(10, 244, 250, 1)) } else { "fd00:244:fa::1".parse().unwrap() },
    );
    let decoy = if vip.is_ipv4() { IpAddr::V4(DECOY) } else { "fd00:96::7:99".parse().unwrap() };
    program(&mut dp, vec![(key(decoy), maglev_entry("decoy", &rev, None))]);
    program(
        &mut dp,
        vec![(key(decoy), maglev_entry("decoy", &rev, None)), (key(vip), maglev_entry("web", backends, algorithm))],
    );
    dp
}

/// Backend id of every backend address, as this dataplane's BACKENDS / BACKENDS6 hold them.
fn backend_ids(dp: &TestDataplane) -> HashMap<IpAddr, u32> {
    let m = dp.maps();
    let mut ids = HashMap::new();
    for (id, b) in m.backends.iter().filter_map(Result::ok) {
        ids.insert(IpAddr::V4(proxy_userspace::dataplane::maps::addr::ip_from_map(b.addr)), id);
    }
    for (id, b) in m.backends6.iter().filter_map(Result::ok) {
        ids.insert(IpAddr::V6(ip6_from_map(b.addr)), id);
    }
    ids
}

/// `FLOWS` client 5-tuples (client address, source port), the same on every call.
fn flows(v6: bool) -> Vec<(IpAddr, u16)> {
    let mut rng = fastrand::Rng::with_seed(0x6d61_676c);
    (0..FLOWS)
        .map(|_| {
            let addr = if v6 {
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, rng.u16(..), 0, 0, 0, rng.u16(..), rng.u16(1..)))
            } else {
                IpAddr::V4(Ipv4Addr::new(198, 18, rng.u8(..), rng.u8(1..255)))
            };
            (addr, rng.u16(1024..))
        })
        .collect()
}

/// The backend the datapath sends the first packet (a SYN) of `flow` to `vip`:80.
fn chosen(dp: &mut TestDataplane, vip: IpAddr, flow: (IpAddr, u16)) -> IpAddr {
    const SYN: u8 = 0x02;
    match (flow.0, vip) {
        (IpAddr::V4(c), IpAddr::V4(v)) => {
            let (verdict, out) = dp.run(FROM_POD, &tcp_segment((c, flow.1), (v, 80), SYN, b""));
            assert_eq!(verdict, TC_ACT_UNSPEC);
            let d = decode(&out);
            assert_eq!(d.dst.1, 8080, "not balanced: {d:?}");
            assert!(d.ip_csum_ok && d.l4_csum_ok, "checksums: {d:?}");
            IpAddr::V4(d.dst.0)
        }
        (IpAddr::V6(c), IpAddr::V6(v)) => {
            let (verdict, out) = dp.run(FROM_POD, &tcp6_segment((c, flow.1), (v, 80), SYN, b""));
            assert_eq!(verdict, TC_ACT_UNSPEC);
            let d = decode6(&out);
            assert_eq!(d.dst.1, 8080, "not balanced: {d:?}");
            assert!(d.l4_csum_ok, "checksum: {d:?}");
            IpAddr::V6(d.dst.0)
        }
        _ => unreachable!("one family per test"),
    }
}

/// Forget every flow (both conntrack tables of both families), so the next packet of each
/// is a new flow again.
fn forget_flows(dp: &mut TestDataplane) {
    let m = &mut dp.syncer.store_mut();
    let keys: Vec<_> = m.ct_new.keys().filter_map(Result::ok).collect();
    for k in keys {
        let _ = m.ct_new.remove(&k);
    }
    let keys: Vec<_> = m.ct_new6.keys().filter_map(Result::ok).collect();
    for k in keys {
        let _ = m.ct_new6.remove(&k);
    }
}

fn same_backend_on_two_nodes(vip: IpAddr, backends: &[IpAddr]) {
    let v6 = vip.is_ipv6();
    let mut a = TestDataplane::load();
    program(&mut a, vec![(key(vip), maglev_entry("web", backends, Some(LbAlgorithm::Maglev)))]);
    let mut b = load_with_shuffled_ids(vip, backends, Some(LbAlgorithm::Maglev));
    // The two nodes number the backends differently: the agreement below cannot come from
    // the ids.
    let (ids_a, ids_b) = (backend_ids(&a), backend_ids(&b));
    assert!(backends.iter().any(|x| ids_a[x] != ids_b[x]), "ids should differ: {ids_a:?} {ids_b:?}");
    // The table is in MAGLEV, published by the SERVICES value.
    let svc = |dp: &TestDataplane| -> proxy_common::ServiceValue {
        let m = dp.maps();
        let all: Vec<_> = if v6 {
            m.services6.iter().filter_map(Result::ok).map(|(_, v)| v).collect()
        } else {
            m.services.iter().filter_map(Result::ok).map(|(_, v)| v).collect()
        };
        *all.iter().find(|v| v.flags & svc_flags::MAGLEV != 0).expect("a Maglev frontend")
    };
    let va = svc(&a);
    assert_eq!(va.maglev_size, DEFAULT_TABLE_SIZE);
    let slot0 = a.maps().maglev.as_ref().expect("MAGLEV").get(&va.maglev_base, 0);
    assert!(va.maglev_base != 0 && slot0.is_ok_and(|id| id != 0), "slot 0 written");

    let flows = flows(v6);
    let mut on_a = Vec::with_capacity(FLOWS);
    let mut share: HashMap<IpAddr, usize> = HashMap::new();
    for (i, f) in flows.iter().enumerate() {
        let x = chosen(&mut a, vip, *f);
        let y = chosen(&mut b, vip, *f);
        assert_eq!(x, y, "flow {i} {f:?}: node A chose {x}, node B {y}");
        *share.entry(x).or_default() += 1;
        on_a.push(x);
    }
    // Every backend gets flows (10,000 flows over a handful of backends).
    assert_eq!(share.len(), backends.len(), "{share:?}");

    // Removing one of N: at most 1/N + 1% of the flows that did not go to it move.
    let gone = backends[backends.len() / 2];
    let rest: Vec<IpAddr> = backends.iter().copied().filter(|x| *x != gone).collect();
    let before = a.syncer.total_writes();
    program(&mut a, vec![(key(vip), maglev_entry("web", &rest, Some(LbAlgorithm::Maglev)))]);
    let table_writes = a.syncer.total_writes() - before;
    // Only the slots that changed were written (about 1/N of them), not the whole table.
    assert!(
        table_writes < u64::from(DEFAULT_TABLE_SIZE) / 2,
        "{table_writes} writes for one backend removed from {} slots",
        DEFAULT_TABLE_SIZE
    );
    forget_flows(&mut a);
    let (mut others, mut moved) = (0usize, 0usize);
    for (f, was) in flows.iter().zip(&on_a) {
        let now = chosen(&mut a, vip, *f);
        assert_ne!(now, gone, "flow {f:?} still sent to the removed backend");
        if *was != gone {
            others += 1;
            moved += usize::from(now != *was);
        }
    }
    let bound = 1.0 / backends.len() as f64 + 0.01;
    let frac = moved as f64 / others as f64;
    assert!(frac <= bound, "{moved} of {others} flows moved ({:.2}%, bound {:.2}%)", frac * 100.0, bound * 100.0);
}

#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn maglev_two_nodes_choose_the_same_backend_ipv4() {
    require_root("maglev_two_nodes_choose_the_same_backend_ipv4");
    same_backend_on_two_nodes(IpAddr::V4(VIP), &backends4(5));
}

#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn maglev_two_nodes_choose_the_same_backend_ipv6() {
    require_root("maglev_two_nodes_choose_the_same_backend_ipv6");
    same_backend_on_two_nodes(IpAddr::V6(VIP6), &backends6(5));
}

/// Why Maglev exists: with random selection (today's default) two nodes agree on a flow's
/// backend only by chance, about 1/N of the time.
#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn random_selection_disagrees_across_nodes() {
    require_root("random_selection_disagrees_across_nodes");
    let vip = IpAddr::V4(VIP);
    let backends = backends4(5);
    let mut a = TestDataplane::load();
    program(&mut a, vec![(key(vip), maglev_entry("web", &backends, None))]);
    let mut b = load_with_shuffled_ids(vip, &backends, None);
    let flows = flows(false);
    let agree = flows[..2_000].iter().filter(|f| chosen(&mut a, vip, **f) == chosen(&mut b, vip, **f)).count();
    assert!(agree < 2_000 / 2, "random selection agreed on {agree} of 2000 flows");
}

/// `ebpf-proxy trace` says when Maglev chose, with the table slot, and its private run picks
/// the backend the live datapath picks for the same new flow; a random frontend says
/// `random`.
#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn trace_says_when_maglev_chose() {
    require_root("trace_says_when_maglev_chose");
    let vip = IpAddr::V4(VIP);
    let mut dp = TestDataplane::load();
    let backends = backends4(4);
    program(
        &mut dp,
        vec![
            (key(vip), maglev_entry("web", &backends, Some(LbAlgorithm::Maglev))),
            (key(IpAddr::V4(DECOY)), maglev_entry("plain", &backends, None)),
        ],
    );
    let root = dp.pins.0.to_str().unwrap().to_string();
    let trace = |from: &str, to: &str| -> serde_json::Value {
        let out = proxy_tests::agent::cli(&[
            "trace",
            "--bpffs-root",
            &root,
            "-o",
            "json",
            "--from",
            from,
            "--to",
            to,
            "--syn",
        ])
        .expect("ebpf-proxy trace");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    for port in [41_000u16, 41_001, 52_345] {
        let t = trace(&format!("198.18.0.9:{port}"), &format!("{VIP}:80"));
        assert_eq!(t["verdict"], "new_flow", "{t:#}");
        let sel = t["selection"].as_str().unwrap_or_default();
        assert!(sel.starts_with("maglev: table slot ") && sel.contains("of 16381"), "{t:#}");
        let live = chosen(&mut dp, vip, (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)), port));
        assert_eq!(t["output"]["dst"], format!("{live}:8080"), "{t:#}");
    }
    let t = trace("198.18.0.9:41000", &format!("{DECOY}:80"));
    assert_eq!(t["selection"], "random", "{t:#}");
}

/// The tables live in one array, each frontend's a run its `SERVICES` value names
/// (`maglev_base`, `maglev_size`), runs disjoint; an agent restart on the same pins (new
/// programs, a new sync reading the maps back) finds every table where it was, writes
/// nothing, and sends new flows to the same backends; a backend change afterwards rewrites
/// the table inside its run.
#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn tables_live_in_one_array_and_survive_a_restart() {
    require_root("tables_live_in_one_array_and_survive_a_restart");
    let (vip, vip6, decoy) = (IpAddr::V4(VIP), IpAddr::V6(VIP6), IpAddr::V4(DECOY));
    let maglev = Some(LbAlgorithm::Maglev);
    let desired = |n: u8| {
        vec![
            (key(vip), maglev_entry("web", &backends4(n), maglev)),
            (key(vip6), maglev_entry("web6", &backends6(5), maglev)),
            (key(decoy), maglev_entry("decoy", &backends4(3), maglev)),
        ]
    };
    let mut dp = TestDataplane::load();
    program(&mut dp, desired(5));
    let runs = |dp: &TestDataplane| -> Vec<(u32, u32, u32)> {
        let m = dp.maps();
        let v4 = m.services.iter().filter_map(Result::ok).map(|(_, v)| v);
        let v6 = m.services6.iter().filter_map(Result::ok).map(|(_, v)| v);
        let mut r: Vec<(u32, u32, u32)> = v4.chain(v6).map(|v| (v.maglev_base, v.maglev_size, v.id)).collect();
        r.sort();
        r
    };
    let before_runs = runs(&dp);
    assert_eq!(before_runs.len(), 3, "{before_runs:?}");
    for w in before_runs.windows(2) {
        assert!(w[0].0 != 0 && w[0].0 + w[0].1 <= w[1].0, "runs overlap or are unplaced: {before_runs:?}");
    }
    assert!(before_runs.iter().all(|r| r.1 == DEFAULT_TABLE_SIZE));
    // Every slot of every run names a backend of its frontend.
    let array = dp.maps().maglev.as_ref().expect("MAGLEV");
    let ids: std::collections::HashSet<u32> = backend_ids(&dp).into_values().collect();
    for (base, size, id) in &before_runs {
        for slot in [0, size / 2, size - 1] {
            let b = array.get(&(base + slot), 0).expect("slot");
            assert!(ids.contains(&b), "frontend {id} slot {slot}: backend {b} unknown");
        }
    }
    let flows = &flows(false)[..2_000];
    let before: Vec<IpAddr> = flows.iter().map(|f| chosen(&mut dp, vip, *f)).collect();

    // The agent restarts on the same pins.
    let (programs, maps) = proxy_userspace::dataplane::maps::loader::load(
        &proxy_userspace::dataplane::maps::loader::LoaderConfig::new(&dp.pins.0),
    )
    .expect("reload");
    assert!(programs.migration.is_empty(), "same layout: pins re-used");
    dp.programs = programs;
    dp.syncer = proxy_userspace::sync::Syncer::new(maps).expect("read back");
    let r = dp.syncer.apply(&state(desired(5)));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.writes, 0, "every table read back whole");
    assert_eq!(runs(&dp), before_runs, "tables where they were");
    forget_flows(&mut dp);
    let after: Vec<IpAddr> = flows.iter().map(|f| chosen(&mut dp, vip, *f)).collect();
    assert_eq!(after, before, "new flows keep their backends across the restart");

    // One backend gone: rewritten in its run, about 1/5 of the slots.
    let r = dp.syncer.apply(&state(desired(4)));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.writes < u64::from(DEFAULT_TABLE_SIZE) / 2, "{} writes", r.writes);
    assert_eq!(runs(&dp), before_runs, "same runs");
    forget_flows(&mut dp);
    let gone = backends4(5)[4];
    for f in flows {
        assert_ne!(chosen(&mut dp, vip, *f), gone, "flow {f:?} still sent to the removed backend");
    }
}

/// An upgrade from the agent before the Maglev array (`SERVICES` values of 24 bytes, the
/// tables in a hash named `MAGLEV`): the frontends are carried over, a Maglev frontend
/// balances its new flows at random until the first sync (never drops them), and that sync
/// writes its table into a run of the array and publishes it: the same backends as before.
#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn an_upgrade_from_the_hash_layout_republishes_the_tables() {
    use aya::maps::{HashMap as BpfHash, Map, MapData};
    use proxy_common::{ServiceKey, ServiceValue, map_names as n};
    use proxy_userspace::dataplane::maps::loader::{self, LoaderConfig};
    require_root("an_upgrade_from_the_hash_layout_republishes_the_tables");
    const OLD: usize = 24;
    let vip = IpAddr::V4(VIP);
    let desired = || vec![(key(vip), maglev_entry("web", &backends4(5), Some(LbAlgorithm::Maglev)))];
    let mut dp = TestDataplane::load();
    program(&mut dp, desired());
    let flows = &flows(false)[..500];
    let before: Vec<IpAddr> = flows.iter().map(|f| chosen(&mut dp, vip, *f)).collect();

    // The older agent's pins: SERVICES with 24-byte values, and its MAGLEV hash.
    let entries: Vec<(ServiceKey, ServiceValue)> = dp.maps().services.iter().filter_map(Result::ok).collect();
    let dir = dp.pins.0.join("maps");
    let max = MapData::from_pin(dir.join(n::SERVICES)).unwrap().info().unwrap().max_entries();
    std::fs::remove_file(dir.join(n::SERVICES)).unwrap();
    let pin_old = |name: &str, key: u32, value: u32| -> MapData {
        let obj = aya_obj::maps::Map::new_from_params(aya::maps::MapType::Hash as u32, key, value, max, 0);
        let m = MapData::create(obj, name, None).expect("create map");
        m.pin(dir.join(name)).expect("pin");
        m
    };
    let mut old: BpfHash<MapData, ServiceKey, [u8; OLD]> =
        BpfHash::try_from(Map::from_map_data(pin_old(n::SERVICES, 8, OLD as u32)).unwrap()).unwrap();
    for (k, v) in &entries {
        let mut bytes = [0u8; OLD];
        // SAFETY: `ServiceValue` is `#[repr(C)]` u32 fields, longer than OLD bytes.
        unsafe { std::ptr::copy_nonoverlapping((v as *const ServiceValue).cast::<u8>(), bytes.as_mut_ptr(), OLD) };
        old.insert(k, bytes, 0).unwrap();
    }
    let _old_maglev = pin_old("MAGLEV", 8, 4);

    let (programs, maps) = loader::load(&LoaderConfig::new(&dp.pins.0)).expect("the older layout migrates");
    assert!(programs.migration.maps().contains(&n::SERVICES), "{:?}", programs.migration.maps());
    let v = maps.services.iter().filter_map(Result::ok).map(|(_, v)| v).next().expect("carried over");
    assert_eq!((v.flags & svc_flags::MAGLEV, v.maglev_size, v.maglev_base), (svc_flags::MAGLEV, DEFAULT_TABLE_SIZE, 0));
    dp.programs = programs;
    dp.syncer = proxy_userspace::sync::Syncer::new(maps).expect("read back");
    // Before the first sync: no table published, new flows still served (at random).
    forget_flows(&mut dp);
    for f in &flows[..50] {
        assert!(backends4(5).contains(&chosen(&mut dp, vip, *f)));
    }
    let r = dp.syncer.apply(&state(desired()));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let v = dp.maps().services.iter().filter_map(Result::ok).map(|(_, v)| v).next().unwrap();
    assert!(v.maglev_base != 0 && v.maglev_size == DEFAULT_TABLE_SIZE, "{v:?}");
    forget_flows(&mut dp);
    let after: Vec<IpAddr> = flows.iter().map(|f| chosen(&mut dp, vip, *f)).collect();
    assert_eq!(after, before, "the republished table is the same table");
    assert!(dir.join("MAGLEV").exists(), "the old hash stays pinned until the new programs are in place");
    std::mem::take(&mut dp.programs.migration).finish().expect("finish");
    assert!(!dir.join("MAGLEV").exists(), "the retired MAGLEV hash is unpinned");
}
