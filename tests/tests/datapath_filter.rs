//! The frontend filter (`proxy_common::frontend_filter`) through BPF_PROG_TEST_RUN: the
//! programs' fast exit passes what is nothing of ours without a lookup, and never a packet
//! of a flow we track. Every other datapath test runs with the filter in force too
//! (`TestDataplane::load`), so each of their translations also says its bit was set.
use aya::maps::{Array, Map, MapData};
use proxy_common::{
    frontend_filter::{Block, ENTRIES},
    map_names, verdict,
};
use proxy_tests::{family::*, harness::*};
use proxy_userspace::{
    dataplane::paths,
    model::{FrontendKind, Protocol},
};

/// Clear every bit of the pinned filter, leaving it in force: what an agent that did not
/// keep it (an older release, rolled back to and from) leaves behind.
fn clear_bits(dp: &TestDataplane) {
    let path = paths::maps_dir(&dp.pins.0).join(map_names::FRONTEND_FILTER);
    let data = MapData::from_pin(&path).expect("FRONTEND_FILTER pinned");
    let mut filter: Array<MapData, Block> = Array::try_from(Map::Array(data)).expect("an array of blocks");
    for i in 1..ENTRIES {
        filter.set(i, Block::default(), 0).expect("clear a block");
    }
}

/// A flow outlives its frontend: once the Service is gone, its bit stays and the flow's
/// packets still reach conntrack. A packet to a destination that is nothing of ours passes
/// untouched, counted once. Without its bit the fast exit would pass the flow's packets
/// (which shows the programs read the filter), and a restart sets it again from conntrack
/// before the filter is back in force.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn a_flow_outlives_its_frontend_and_a_restart_restores_its_bit() {
    require_root("a_flow_outlives_its_frontend_and_a_restart_restores_its_bit");
    run_cases(Family::ALL.map(|f| (f.name().to_string(), f)), |fam| {
        let a = fam.addrs();
        let mut dp = TestDataplane::load();
        let key = Hook::Pod.frontend(&a, Protocol::Tcp);
        dp.program(vec![(key, svc(FrontendKind::ClusterIP, &[(a.b1, 8080, true)]))]);
        // A retransmitted SYN of a live connection is one of its packets (it keeps the
        // connection's backend).
        let syn = fam.tcp((a.client, 40_000), (a.vip, 80), b"");
        assert_eq!(decode_any(&dp.run(FROM_POD, &syn).1).dst, (a.b1, 8080), "new flow");
        let reply = fam.segment((a.b1, 8080), (a.client, 40_000), tcp::SYN | tcp::ACK, b"");
        assert_eq!(decode_any(&dp.run(TO_POD, &reply).1).src, (a.vip, 80), "reply from the frontend");
        dp.program(vec![]);
        assert_eq!(decode_any(&dp.run(FROM_POD, &syn).1).dst, (a.b1, 8080), "the flow outlives its Service");

        let other = fam.tcp((a.client, 40_001), (a.b2, 9090), b"");
        let passed = dp.global(verdict::PASS);
        let (v, out) = dp.run(FROM_POD, &other);
        assert_eq!((v, out), (TC_ACT_UNSPEC, other.clone()), "nothing of ours passes untouched");
        assert_eq!(dp.global(verdict::PASS), passed + 1, "counted once, as passed");
        let (v, out) = dp.run(TO_POD, &other);
        assert_eq!((v, out), (TC_ACT_UNSPEC, other.clone()), "no backend sent it: no reply of ours");

        clear_bits(&dp);
        let (_, out) = dp.run(FROM_POD, &syn);
        assert_eq!(decode_any(&out).dst, (a.vip, 80), "without its bit the fast exit passes the flow's packet");
        let (_, out) = dp.run(TO_POD, &reply);
        assert_eq!(decode_any(&out).src, (a.b1, 8080), "and the reply, without the backend's bit");
        dp.restart();
        assert_eq!(decode_any(&dp.run(FROM_POD, &syn).1).dst, (a.b1, 8080), "the restart set the bit from conntrack");
        assert_eq!(decode_any(&dp.run(TO_POD, &reply).1).src, (a.vip, 80), "and the backend's, from the reply entry");
        assert_eq!(dp.maps().filter_state().map(|(_, on)| on), Some(true), "the filter is in force again");
        assert_eq!(dp.run(FROM_POD, &other).1, other, "and passes what is nothing of ours");
    });
}
