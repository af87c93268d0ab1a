//! Issue 19, items 5 and 6, through BPF_PROG_TEST_RUN on the real programs and pinned maps:
//! session affinity never crosses Services across an agent restart, and a LoadBalancer
//! whose source ranges do not fit the trie is not served (fail closed).
use std::net::Ipv4Addr;

use proxy_common::{AffinityKey, verdict};
use proxy_tests::harness::*;
use proxy_userspace::{
    dataplane::{
        maps::addr::ip_to_map,
        maps::loader::{self, LoaderConfig},
        maps::{Maps, global_total},
    },
    model::{FrontendKind, IpPrefix, Protocol},
    sync::Syncer,
};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const FROM_POD: &str = "from_pod";

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 5);
const X: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const Y: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

fn sticky(name: &str, backends: &[(Ipv4Addr, u16)]) -> proxy_userspace::model::FrontendEntry {
    let mut e = entry(name, backends);
    e.affinity_timeout = Some(10_800);
    e
}

/// The service id SERVICES holds for `vip`:80/TCP.
fn svc_id(dp: &TestDataplane, vip: Ipv4Addr) -> Option<u32> {
    dp.maps().services.iter().filter_map(Result::ok).find(|(k, _)| k.addr == ip_to_map(vip)).map(|(_, v)| v.id)
}

fn affinity_ids(dp: &TestDataplane) -> Vec<u32> {
    dp.maps().affinity.keys().filter_map(Result::ok).map(|k: AffinityKey| k.svc_id).collect()
}

/// The repro of issue 19, item 5: Service A (affinity) and Service C share pod X; a client
/// is pinned to X under A's id. A is removed, the agent restarts on the same pins (a new
/// object whose `Syncer` reads them back), and Service B (affinity, pod Y)
/// is created. On main, B took A's id (ids restarted at max(live) + 1) and the stale entry
/// sent B's client to C's pod X. Now A's entries go with A, B gets a fresh id, and even an
/// entry of A written back by a packet racing the removal is never found by B.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn affinity_does_not_cross_services_after_a_restart() {
    require_root("affinity_does_not_cross_services_after_a_restart");
    let (vip_c, vip_a, vip_b) =
        (Ipv4Addr::new(10, 96, 0, 21), Ipv4Addr::new(10, 96, 0, 22), Ipv4Addr::new(10, 96, 0, 23));
    let mut dp = TestDataplane::load();
    let c = (frontend(vip_c, 80, Protocol::Tcp), entry("c", &[(X, 8080)]));
    let r = dp.syncer.apply(&state(vec![c.clone(), (frontend(vip_a, 80, Protocol::Tcp), sticky("a", &[(X, 8080)]))]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let a_id = svc_id(&dp, vip_a).expect("A programmed");
    let d = decode(&dp.run(FROM_POD, &tcp_frame((CLIENT, 1000), (vip_a, 80), b"")).1);
    assert_eq!(d.dst, (X, 8080));
    assert_eq!(affinity_ids(&dp), vec![a_id], "the client is pinned under A's id");
    let stale = dp.maps().affinity.iter().filter_map(Result::ok).next().expect("the entry");

    // A removed: its affinity entry goes with it.
    let r = dp.syncer.apply(&state(vec![c.clone()]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(affinity_ids(&dp), Vec::<u32>::new(), "A's affinity entries purged with A");
    // A packet that read A's SERVICES value just before the delete writes it back.
    let mut affinity = Maps::open_pinned(&dp.pins.0).expect("pins").affinity;
    affinity.insert(stale.0, stale.1, 0).expect("stale entry back");

    // The agent restarts on the same pins (its own object: the maps it writes include the
    // frontend filter, which the pinned handles of the CLI do not).
    dp.restart();
    let r = dp.syncer.apply(&state(vec![c, (frontend(vip_b, 80, Protocol::Tcp), sticky("b", &[(Y, 8080)]))]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let b_id = svc_id(&dp, vip_b).expect("B programmed");
    assert_ne!(b_id, a_id, "B must not inherit A's service id");
    for port in 2000..2010u16 {
        let d = decode(&dp.run(FROM_POD, &tcp_frame((CLIENT, port), (vip_b, 80), b"")).1);
        assert_eq!(d.dst, (Y, 8080), "B's client from port {port} must reach B's pod, never A's (C's) X");
    }
    assert!(!affinity_ids(&dp).contains(&a_id), "the stale entry was swept at the restart's first sync");
}

fn range(a: [u8; 4], len: u8) -> IpPrefix {
    IpPrefix { addr: Ipv4Addr::from(a).into(), len }
}

/// Issue 19, item 6, with a four-entry trie (`--max-source-ranges 4`): a live
/// LoadBalancer given three ranges beside another's two cannot have them written, so it is
/// taken out of SERVICES: a client inside its ranges and one outside both pass untouched
/// (not translated, not served), and the sync names the Service. The ClusterIP and the
/// other LoadBalancer keep working. Once the other drops its ranges, the next sync serves
/// it again with the restriction in force.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn load_balancer_whose_ranges_do_not_fit_is_not_served() {
    require_root("load_balancer_whose_ranges_do_not_fit_is_not_served");
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
    const LB_WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 31);
    const LB_OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 32);
    const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 9);
    let pins = PinDir::new();
    let cfg = LoaderConfig { max_source_ranges: 4, ..LoaderConfig::new(&pins.0) };
    let (programs, maps) = loader::load(&cfg).expect("load");
    let syncer = Syncer::new(maps).expect("read back");
    let mut dp = TestDataplane { programs, syncer, pins };
    let lb = |name: &str, backend: Ipv4Addr, ranges: Vec<IpPrefix>| {
        let mut e = entry(name, &[(backend, 8080)]);
        e.kind = FrontendKind::LoadBalancer;
        e.source_ranges = ranges;
        e
    };
    let other_ranges = vec![range([10, 244, 7, 0], 24), range([192, 0, 2, 0], 24)];
    let desired = |web_ranges: Vec<IpPrefix>, other_ranges: Vec<IpPrefix>| {
        state(vec![
            (frontend(VIP, 80, Protocol::Tcp), entry("web", &[(X, 8080)])),
            (frontend(LB_WEB, 80, Protocol::Tcp), lb("web", X, web_ranges)),
            (frontend(LB_OTHER, 80, Protocol::Tcp), lb("other", Y, other_ranges)),
        ])
    };
    let r = dp.syncer.apply(&desired(vec![], other_ranges.clone()));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let mut port = 40000u16;
    let mut send = |dp: &mut TestDataplane, src: Ipv4Addr, dst: Ipv4Addr| {
        port += 1;
        let frame = tcp_frame((src, port), (dst, 80), b"x");
        let (v, out) = dp.run(FROM_POD, &frame);
        (v, out, frame)
    };
    let (v, out, _) = send(&mut dp, OUTSIDE, LB_WEB);
    assert_eq!((v, decode(&out).dst), (TC_ACT_UNSPEC, (X, 8080)), "open LB before the change");

    // Three ranges for web: 2 + 3 > 4.
    let web_ranges = vec![range([10, 244, 7, 0], 24), range([203, 0, 113, 0], 24), range([198, 18, 0, 0], 15)];
    let r = dp.syncer.apply(&desired(web_ranges.clone(), other_ranges.clone()));
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(
        r.errors[0].1.to_string().contains("SOURCE_RANGES is full: raise --max-source-ranges"),
        "{}",
        r.errors[0].1
    );
    assert_eq!(r.unserved_ranges, vec![(frontend(LB_WEB, 80, Protocol::Tcp), "default/web".to_string())]);
    for src in [CLIENT, OUTSIDE] {
        let (v, out, frame) = send(&mut dp, src, LB_WEB);
        assert_eq!((v, &out), (TC_ACT_UNSPEC, &frame), "from {src}: not served (passed untranslated)");
    }
    // Everything else unaffected.
    let (v, out, _) = send(&mut dp, OUTSIDE, VIP);
    assert_eq!((v, decode(&out).dst), (TC_ACT_UNSPEC, (X, 8080)), "the ClusterIP is served");
    let (v, out, _) = send(&mut dp, CLIENT, LB_OTHER);
    assert_eq!((v, decode(&out).dst), (TC_ACT_UNSPEC, (Y, 8080)), "the other LB serves its ranges");
    let (v, _, _) = send(&mut dp, OUTSIDE, LB_OTHER);
    assert_eq!(v, TC_ACT_SHOT, "and refuses the rest");

    // The other LB drops its ranges: web fits, and is served with its restriction.
    let r = dp.syncer.apply(&desired(web_ranges, vec![]));
    assert!(r.errors.is_empty() && r.unserved_ranges.is_empty(), "{:?}", r.errors);
    let drops_before = global_total(&dp.maps().global_stats, verdict::SOURCE_RANGE_DROP).unwrap().packets;
    let (v, out, _) = send(&mut dp, CLIENT, LB_WEB);
    assert_eq!((v, decode(&out).dst), (TC_ACT_UNSPEC, (X, 8080)), "inside web's ranges: served");
    let (v, _, _) = send(&mut dp, OUTSIDE, LB_WEB);
    assert_eq!(v, TC_ACT_SHOT, "outside web's ranges: refused");
    let drops = global_total(&dp.maps().global_stats, verdict::SOURCE_RANGE_DROP).unwrap().packets;
    assert_eq!(drops, drops_before + 1);
}
