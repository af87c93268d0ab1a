//! Sync logic against the in-memory store: ordering, minimality, restart, failures.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use proxy_common::{CT_DIR_FORWARD, CtKey, CtValue, PROTO_TCP, PROTO_UDP, SlotKey, svc_flags};

use super::{plan::service_key, *};
use crate::model::{BackendAddr, ClaimHolder, FrontendEntry, FrontendKind, IpPrefix, Protocol, Scope, ServicePortName};

pub(super) fn fk(last: u8, port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey { addr: IpAddr::V4(Ipv4Addr::new(10, 96, 0, last)), port, proto, scope: Scope::Internal }
}

pub(super) fn fe(name: &str, backends: &[u8]) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName::new("ns", name, ""),
        kind: FrontendKind::ClusterIP,
        backends: backends
            .iter()
            .map(|b| BackendAddr {
                addr: IpAddr::V4(Ipv4Addr::new(10, 244, 0, *b)),
                port: 8080,
                local: false,
                terminating: false,
            })
            .collect(),
        affinity_timeout: None,
        local_only: false,
        source_ranges: vec![],
        lb_algorithm: None,
        weights: vec![],
    }
}

pub(super) fn desired(entries: Vec<(FrontendKey, FrontendEntry)>) -> DesiredState {
    entries.into_iter().collect()
}

fn syncer() -> Syncer<MemStore> {
    Syncer::new(MemStore::default()).unwrap()
}

fn take_log(s: &mut Syncer<MemStore>) -> Vec<String> {
    std::mem::take(&mut s.store_mut().log)
}

fn pos(log: &[String], prefix: &str) -> usize {
    log.iter().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} not in {log:?}"))
}

#[test]
fn new_service_writes_backends_and_slots_before_the_service() {
    let mut s = syncer();
    let r = s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1, 2]))]));
    assert!(r.errors.is_empty());
    let log = take_log(&mut s);
    assert_eq!(log.len() as u64, r.writes);
    let svc = pos(&log, "put_service");
    assert!(pos(&log, "put_backend") < svc);
    assert!(pos(&log, "put_slot") < svc);
    assert_eq!(log.iter().filter(|l| l.starts_with("put_slot")).count(), 2);
    assert_eq!(svc, log.len() - 1, "service entry is the last write: {log:?}");
    let v = s.store().services.values().next().unwrap();
    assert_eq!((v.count, v.generation), (2, 0));
}

#[test]
fn unchanged_state_writes_nothing() {
    let mut s = syncer();
    let d = desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1, 2, 3]))]);
    s.apply(&d);
    assert_eq!(s.apply(&d).writes, 0);
}

#[test]
fn restarted_syncer_reads_back_and_writes_nothing() {
    let mut s = syncer();
    let d = desired(vec![
        (fk(1, 80, Protocol::Tcp), fe("a", &[1, 2, 3])),
        (fk(2, 53, Protocol::Udp), fe("b", &[4])),
        (fk(3, 80, Protocol::Tcp), fe("empty", &[])),
    ]);
    s.apply(&d);
    // Scale once so the inactive generation holds something too.
    let d2 = desired(vec![
        (fk(1, 80, Protocol::Tcp), fe("a", &[1, 2])),
        (fk(2, 53, Protocol::Udp), fe("b", &[4])),
        (fk(3, 80, Protocol::Tcp), fe("empty", &[])),
    ]);
    s.apply(&d2);
    let store = s.store().clone();
    let mut restarted = Syncer::new(store).unwrap();
    let r = restarted.apply(&d2);
    assert_eq!(r.writes, 0, "log: {:?}", restarted.store().log.len());
    assert_eq!(restarted.service_count(), 3);
    // And a later change still works from the read-back state.
    let r = restarted.apply(&d);
    assert!(r.writes > 0);
    assert_eq!(restarted.store().services.values().find(|v| v.count == 3).map(|v| v.count), Some(3));
}

#[test]
fn scaling_flips_generation_after_filling_the_spare() {
    let mut s = syncer();
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1, 2]))]));
    take_log(&mut s);
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1, 2, 3]))]));
    let log = take_log(&mut s);
    let svc = pos(&log, "put_service");
    for l in &log[..svc] {
        if l.starts_with("put_slot") {
            assert!(l.contains("/1/"), "slots go to generation 1: {log:?}");
        }
    }
    let v = s.store().services.values().next().unwrap();
    assert_eq!((v.count, v.generation), (3, 1));
    // Active generation slots hold exactly the 3 backends.
    let active: Vec<_> = s.store().slots.iter().filter(|(k, _)| k.generation() == 1).collect();
    assert_eq!(active.len(), 3);
}

#[test]
fn scaling_down_deletes_stale_slots_only_after_the_flip() {
    let mut s = syncer();
    let k = fk(1, 80, Protocol::Tcp);
    s.apply(&desired(vec![(k, fe("a", &[1, 2, 3, 4]))])); // gen 0: 4
    s.apply(&desired(vec![(k, fe("a", &[1, 2, 3, 4, 5]))])); // gen 1: 5
    take_log(&mut s);
    s.apply(&desired(vec![(k, fe("a", &[1]))])); // gen 0: 1, slots 1..3 stale
    let log = take_log(&mut s);
    let svc = pos(&log, "put_service");
    let dels: Vec<usize> = log.iter().enumerate().filter(|(_, l)| l.starts_with("del_slot")).map(|(i, _)| i).collect();
    assert_eq!(dels.len(), 3, "{log:?}");
    assert!(dels.iter().all(|i| *i > svc), "stale slots deleted after the flip: {log:?}");
    let gen0: Vec<_> = s.store().slots.keys().filter(|k| k.generation() == 0).collect();
    assert_eq!(gen0.len(), 1);
}

#[test]
fn removal_deletes_service_first_and_backends_last() {
    let mut s = syncer();
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1, 2]))]));
    take_log(&mut s);
    let r = s.apply(&DesiredState::default());
    let log = take_log(&mut s);
    assert_eq!(pos(&log, "del_service"), 0, "{log:?}");
    assert!(pos(&log, "del_backend") > pos(&log, "del_slot"));
    assert!(s.store().services.is_empty() && s.store().slots.is_empty());
    assert!(s.store().backends.is_empty() && s.store().meta.is_empty());
    assert_eq!(s.store().stats_deleted.len(), 1);
    assert_eq!(r.services, 0);
}

#[test]
fn shared_backend_survives_removal_of_one_service() {
    let mut s = syncer();
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1])), (fk(2, 80, Protocol::Tcp), fe("b", &[1]))]));
    assert_eq!(s.store().backends.len(), 1, "one entry per endpoint");
    s.apply(&desired(vec![(fk(2, 80, Protocol::Tcp), fe("b", &[1]))]));
    assert_eq!(s.store().backends.len(), 1);
}

fn ct(proto: u8, svc_id: u32, backend_id: u32, sport: u16) -> (CtKey, CtValue) {
    (
        CtKey { src_addr: 1, dst_addr: 2, src_port: sport, dst_port: 80, proto, dir: CT_DIR_FORWARD, _pad: 0 },
        CtValue { svc_id, backend_id, ..Default::default() },
    )
}

#[test]
fn removed_udp_backend_loses_its_conntrack_but_tcp_keeps_it() {
    let mut s = syncer();
    s.apply(&desired(vec![
        (fk(1, 53, Protocol::Udp), fe("dns", &[1, 2])),
        (fk(1, 80, Protocol::Tcp), fe("web", &[1, 2])),
    ]));
    let udp_id = s.store().services.iter().find(|(k, _)| k.proto == PROTO_UDP).unwrap().1.id;
    let tcp_id = s.store().services.iter().find(|(k, _)| k.proto == PROTO_TCP).unwrap().1.id;
    let b = |last: u8| {
        let a = IpAddr::V4(Ipv4Addr::new(10, 244, 0, last));
        *s.store().backends.iter().find(|(_, v)| v.addr == a).unwrap().0
    };
    let (b1, b2) = (b(1), b(2));
    let entries = [ct(PROTO_UDP, udp_id, b1, 1), ct(PROTO_UDP, udp_id, b2, 2), ct(PROTO_TCP, tcp_id, b2, 3)];
    s.store_mut().conntrack.extend(entries);
    let r = s.apply(&desired(vec![
        (fk(1, 53, Protocol::Udp), fe("dns", &[1])),
        (fk(1, 80, Protocol::Tcp), fe("web", &[1])),
    ]));
    assert_eq!(r.conntrack_purged, 1);
    let left: Vec<u16> = s.store().conntrack.keys().map(|k| k.src_port).collect();
    assert_eq!(left, vec![1, 3], "UDP flow to the removed backend purged, TCP kept");
}

#[test]
fn deleted_udp_service_loses_its_conntrack() {
    let mut s = syncer();
    s.apply(&desired(vec![(fk(1, 53, Protocol::Udp), fe("dns", &[1]))]));
    let id = s.store().services.values().next().unwrap().id;
    let b1 = *s.store().backends.keys().next().unwrap();
    s.store_mut().conntrack.extend([ct(PROTO_UDP, id, b1, 1)]);
    let r = s.apply(&DesiredState::default());
    assert_eq!(r.conntrack_purged, 1);
}

#[test]
fn full_map_fails_one_frontend_and_programs_the_rest() {
    let store = MemStore { max_services: Some(1), ..MemStore::default() };
    let mut s = Syncer::new(store).unwrap();
    let r =
        s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1])), (fk(2, 80, Protocol::Tcp), fe("b", &[2]))]));
    assert_eq!(r.errors.len(), 1);
    let (failed, err) = &r.errors[0];
    assert_eq!(*failed, fk(2, 80, Protocol::Tcp));
    assert!(err.to_string().contains("max-services"), "{err}");
    assert_eq!(s.store().services.len(), 1);
    // Counted as programmed: what is in the map, not what was wanted.
    assert_eq!(r.services, 1);
    assert_eq!(s.programmed_count(), 1);
    // Once there is room, the next sync programs it.
    s.store_mut().max_services = Some(2);
    let r =
        s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1])), (fk(2, 80, Protocol::Tcp), fe("b", &[2]))]));
    assert!(r.errors.is_empty());
    assert_eq!(s.store().services.len(), 2);
    assert_eq!(r.services, 2);
}

#[test]
fn claims_name_the_service_of_each_programmed_address_also_after_a_restart() {
    let store = MemStore { max_services: Some(1), ..MemStore::default() };
    let mut s = Syncer::new(store).unwrap();
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1])), (fk(2, 80, Protocol::Tcp), fe("b", &[2]))]));
    let holder = |name: &str| ClaimHolder { namespace: "ns".into(), name: name.into() };
    let key = ClaimKey { addr: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), port: 80, proto: Protocol::Tcp };
    // "b" did not fit: it holds nothing.
    let want: Claims = [(key, holder("a"))].into();
    assert_eq!(s.claims(), want);
    let restarted = Syncer::new(s.store().clone()).unwrap();
    assert_eq!(restarted.claims(), want);
}

#[test]
fn ids_are_not_reused_right_away() {
    let mut s = syncer();
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1]))]));
    let first = s.store().services.values().next().unwrap().id;
    s.apply(&DesiredState::default());
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1]))]));
    let second = s.store().services.values().next().unwrap().id;
    assert_ne!(first, second);
}

#[test]
fn flags_and_metadata_follow_the_entry() {
    let mut s = syncer();
    let mut e = fe("aff", &[1]);
    e.affinity_timeout = Some(30);
    e.kind = FrontendKind::LoadBalancer;
    e.source_ranges = vec![IpPrefix { addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)), len: 24 }];
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), e.clone())]));
    let v = *s.store().services.values().next().unwrap();
    assert_eq!(v.affinity_timeout, 30);
    assert_ne!(v.flags & svc_flags::AFFINITY, 0);
    assert_ne!(v.flags & svc_flags::SOURCE_RANGES, 0);
    assert_ne!(v.flags & svc_flags::LOADBALANCER, 0);
    assert_eq!(s.store().ranges.len(), 1);
    let m = s.store().meta[&v.id];
    assert_eq!(&m.name[..3], b"aff");
    // Dropping the range: flag cleared in the same service write, range deleted after.
    e.source_ranges.clear();
    take_log(&mut s);
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), e)]));
    let log = take_log(&mut s);
    assert!(pos(&log, "del_range") > pos(&log, "put_service"), "{log:?}");
    assert!(s.store().ranges.is_empty());
}

fn slots_full_syncer(max_slots: usize) -> Syncer<MemStore> {
    Syncer::new(MemStore { max_slots: Some(max_slots), ..MemStore::default() }).unwrap()
}

/// Ten services sharing three backends, slots for eight lists of three: the rest fail with
/// the named error, and the failed ones hold no slot.
#[test]
fn full_slots_fail_named_frontends_only() {
    let mut s = slots_full_syncer(24);
    let all: Vec<_> = (1..=10).map(|i| (fk(i, 80, Protocol::Tcp), fe(&format!("s{i}"), &[1, 2, 3]))).collect();
    let r = s.apply(&desired(all));
    assert_eq!(s.store().services.len(), 8);
    assert_eq!(r.errors.len(), 2);
    for (_, e) in &r.errors {
        assert_eq!(e.to_string(), "map BACKEND_SLOTS is full: raise --max-backends");
    }
    assert_eq!(s.store().slots.len(), 24, "failed frontends gave their partial slots back");
    assert_eq!(r.slots, 24);
    assert_eq!(s.store().backends.len(), 3, "shared backends are stored once");
}

/// With the slots map full, a scale-down cannot fill the spare generation: it shrinks the
/// active one in place, in an order a reader can never see harmfully half-done.
#[test]
fn scale_down_succeeds_in_place_when_slots_are_full() {
    let mut s = slots_full_syncer(6);
    let (a, b) = (fk(1, 80, Protocol::Tcp), fk(2, 80, Protocol::Tcp));
    let r = s.apply(&desired(vec![(a, fe("a", &[1, 2, 3])), (b, fe("b", &[1, 2, 3]))]));
    assert!(r.errors.is_empty());
    assert_eq!(s.store().slots.len(), 6);
    take_log(&mut s);
    // Remove backend 2 (middle of the list) from both services.
    let r = s.apply(&desired(vec![(a, fe("a", &[1, 3])), (b, fe("b", &[1, 3]))]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let log = take_log(&mut s);
    // For each service, in its active generation: overwrite below the new count, publish,
    // delete the tail. (A try at the unreachable spare generation may come first.)
    for v in s.store().services.values() {
        let (id, g) = (v.id, v.generation);
        let mine: Vec<&String> = log
            .iter()
            .filter(|l| {
                l.starts_with(&format!("put_slot {id}/{g}/"))
                    || l.starts_with(&format!("put_service {id} "))
                    || l.starts_with(&format!("del_slot {id}/{g}/"))
            })
            .collect();
        let svc = mine.iter().position(|l| l.starts_with("put_service")).unwrap();
        assert!(mine[..svc].iter().all(|l| l.starts_with("put_slot")), "{mine:?}");
        assert!(mine[svc + 1..].iter().all(|l| l.starts_with("del_slot")), "{mine:?}");
        assert_eq!(mine.iter().filter(|l| l.starts_with("del_slot")).count(), 1, "{mine:?}");
    }
    // The removed backend is in no slot and gone from BACKENDS, deleted after the counts.
    let b2 = IpAddr::V4(Ipv4Addr::new(10, 244, 0, 2));
    assert!(s.store().backends.values().all(|b| b.addr != b2));
    let del_backend = pos(&log, "del_backend");
    assert!(log.iter().rposition(|l| l.starts_with("put_service")).unwrap() < del_backend, "{log:?}");
    for v in s.store().services.values() {
        assert_eq!(v.count, 2);
        let ids: Vec<u32> = (0..v.count).map(|i| s.store().slots[&SlotKey::new(v.id, v.generation, i)]).collect();
        for bid in ids {
            assert!(s.store().backends.contains_key(&bid), "every reachable slot points at a live backend");
        }
    }
    assert_eq!(s.store().slots.len(), 4);
    // The restarted syncer reads the in-place result back and writes nothing.
    let mut restarted = Syncer::new(s.store().clone()).unwrap();
    assert_eq!(restarted.apply(&desired(vec![(a, fe("a", &[1, 3])), (b, fe("b", &[1, 3]))])).writes, 0);
}

/// Replacing a pod (same count) also works with the map full; growing does not, and says so.
#[test]
fn replace_in_place_and_growth_reports_full_slots() {
    let mut s = slots_full_syncer(3);
    let a = fk(1, 80, Protocol::Tcp);
    s.apply(&desired(vec![(a, fe("a", &[1, 2, 3]))]));
    let r = s.apply(&desired(vec![(a, fe("a", &[1, 2, 4]))]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let b4 = IpAddr::V4(Ipv4Addr::new(10, 244, 0, 4));
    let v = *s.store().services.values().next().unwrap();
    let reachable: Vec<u32> = (0..v.count).map(|i| s.store().slots[&SlotKey::new(v.id, v.generation, i)]).collect();
    assert!(reachable.iter().any(|id| s.store().backends[id].addr == b4));
    let r = s.apply(&desired(vec![(a, fe("a", &[1, 2, 4, 5]))]));
    assert_eq!(r.errors.len(), 1);
    assert!(r.errors[0].1.to_string().contains("BACKEND_SLOTS is full: raise --max-backends"));
    assert_eq!(s.store().services.values().next().unwrap().count, 3, "keeps its previous list");
}

/// Deleting services never needs room: with the slots map full, removal succeeds and frees
/// room for a frontend that did not fit.
#[test]
fn service_delete_with_full_slots_frees_room() {
    let mut s = slots_full_syncer(4);
    let (a, b, c) = (fk(1, 80, Protocol::Tcp), fk(2, 80, Protocol::Tcp), fk(3, 80, Protocol::Tcp));
    let r = s.apply(&desired(vec![(a, fe("a", &[1, 2])), (b, fe("b", &[1, 2])), (c, fe("c", &[1, 2]))]));
    assert_eq!(r.errors.len(), 1);
    let r = s.apply(&desired(vec![(b, fe("b", &[1, 2])), (c, fe("c", &[1, 2]))]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(s.store().services.len(), 2);
}

/// Ten services over four shared backends with room for 32 slots: eight fit. Removing one
/// backend everywhere shrinks them (in place or through the spare), frees the spares, and
/// the two left out are programmed in the same sync.
#[test]
fn scale_down_with_full_slots_makes_room_for_the_rest() {
    let mut s = slots_full_syncer(32);
    let with = |backends: &[u8]| {
        desired((1..=10).map(|i| (fk(i, 80, Protocol::Tcp), fe(&format!("s{i}"), backends))).collect())
    };
    let r = s.apply(&with(&[1, 2, 3, 4]));
    assert_eq!((s.store().services.len(), r.errors.len()), (8, 2));
    let r = s.apply(&with(&[1, 2, 3]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(s.store().services.len(), 10);
    assert!(s.store().services.values().all(|v| v.count == 3));
    assert_eq!(s.store().backends.len(), 3);
    assert!(s.store().slots.len() <= 32);
    assert_eq!(r.slots, s.store().slots.len(), "the slot metric counts what the map holds");
}

// --- dual-stack ----------------------------------------------------------------------

fn fk6(last: u16, port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey { addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last)), port, proto, scope: Scope::Internal }
}

/// An IPv6 entry with backends fd00:10::<b>:8080.
fn fe6(name: &str, backends: &[u16]) -> FrontendEntry {
    FrontendEntry {
        backends: backends
            .iter()
            .map(|b| BackendAddr {
                addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, *b)),
                port: 8080,
                local: false,
                terminating: false,
            })
            .collect(),
        ..fe(name, &[])
    }
}

/// A dual-stack Service: its IPv4 and IPv6 frontends get ids from one space, backend ids
/// from one space, and each family's entries land in its own map (the key's address);
/// every IPv6 frontend's slots are written before its SERVICES6 entry, as for IPv4.
#[test]
fn dual_stack_frontends_share_id_spaces_and_keep_the_write_order() {
    let mut s = syncer();
    let d =
        desired(vec![(fk(1, 80, Protocol::Tcp), fe("web", &[1, 2])), (fk6(1, 80, Protocol::Tcp), fe6("web", &[1, 2]))]);
    let r = s.apply(&d);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.services, r.services6, r.backends, r.backends6), (2, 1, 4, 2));
    let ids: BTreeSet<u32> = s.store().services.values().map(|v| v.id).collect();
    assert_eq!(ids.len(), 2, "one service id space");
    let backend_ids: BTreeSet<u32> = s.store().backends.keys().copied().collect();
    assert_eq!(backend_ids.len(), 4, "one backend id space");
    let v6: Vec<_> = s.store().backends.values().filter(|b| b.addr.is_ipv6()).collect();
    assert_eq!(v6.len(), 2);
    let key6 = service_key(&fk6(1, 80, Protocol::Tcp));
    let v = s.store().services[&key6];
    assert_eq!(v.count, 2);
    // Every slot of the IPv6 frontend points at an IPv6 backend.
    for i in 0..v.count {
        let bid = s.store().slots[&SlotKey::new(v.id, v.generation, i)];
        assert!(s.store().backends[&bid].addr.is_ipv6());
    }
    let log = take_log(&mut s);
    let put6 = log.iter().position(|l| l.starts_with(&format!("put_service {}", v.id))).unwrap();
    let slot6 = log.iter().position(|l| l.starts_with(&format!("put_slot {}/", v.id))).unwrap();
    assert!(slot6 < put6, "{log:?}");
    // Unchanged: nothing written; a restart reading both families back writes nothing.
    assert_eq!(s.apply(&d).writes, 0);
    let mut restarted = Syncer::new(s.store().clone()).unwrap();
    assert_eq!(restarted.apply(&d).writes, 0);
    assert_eq!(restarted.claims().len(), 2, "claims of both families read back");
}

/// A full SERVICES6 fails only the IPv6 frontend, named after its own map; IPv4 is
/// programmed.
#[test]
fn full_services6_fails_only_the_ipv6_frontend() {
    let store = MemStore { max_services: Some(1), ..MemStore::default() };
    let mut s = Syncer::new(store).unwrap();
    let r = s.apply(&desired(vec![
        (fk(1, 80, Protocol::Tcp), fe("a", &[1])),
        (fk6(1, 80, Protocol::Tcp), fe6("a", &[1])),
        (fk6(2, 80, Protocol::Tcp), fe6("b", &[1])),
    ]));
    assert_eq!(r.errors.len(), 1);
    let (key, err) = &r.errors[0];
    assert!(key.addr.is_ipv6());
    assert_eq!(err.to_string(), StoreError::MapFull { map: "SERVICES6", flag: "max-services" }.to_string());
    assert_eq!((r.services, r.services6), (2, 1));
}

/// IPv6 source ranges go with their frontend; a removed IPv6 endpoint leaves BACKENDS6 and
/// its UDP conntrack entries in CONNTRACK6 go, while IPv4 is untouched.
#[test]
fn ipv6_ranges_and_removed_ipv6_backend() {
    let mut s = syncer();
    let mut e6 = fe6("dns", &[1, 2]);
    e6.source_ranges = vec!["2001:db8::/32".parse().unwrap()];
    let key4 = fk(1, 53, Protocol::Udp);
    let key6 = fk6(1, 53, Protocol::Udp);
    s.apply(&desired(vec![(key4, fe("dns", &[1])), (key6, e6.clone())]));
    assert_eq!(s.store().ranges.keys().map(|(_, p)| p.to_string()).collect::<Vec<_>>(), vec!["2001:db8::/32"]);
    let id6 = s.store().services[&service_key(&key6)].id;
    let removed = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2));
    let gone_id = *s.store().backends.iter().find(|(_, b)| b.addr == removed).unwrap().0;
    let ct6 = |backend_id, sport| {
        let k = proxy_common::CtKey6 { src_port: sport, proto: PROTO_UDP, dir: CT_DIR_FORWARD, ..Default::default() };
        (k, proxy_common::CtValue6 { svc_id: id6, backend_id, ..Default::default() })
    };
    let kept_id = *s.store().backends.iter().find(|(_, b)| b.addr.is_ipv6() && b.addr != removed).unwrap().0;
    s.store_mut().conntrack6.extend([ct6(gone_id, 1), ct6(kept_id, 2)]);
    e6.backends.truncate(1);
    e6.source_ranges.clear();
    let r = s.apply(&desired(vec![(key4, fe("dns", &[1])), (key6, e6)]));
    assert!(r.errors.is_empty());
    assert!(!s.store().backends.values().any(|b| b.addr == removed), "removed from BACKENDS6");
    assert_eq!(r.conntrack_purged, 1);
    assert_eq!(s.store().conntrack6.values().map(|v| v.backend_id).collect::<Vec<_>>(), vec![kept_id]);
    assert!(s.store().ranges.is_empty());
    assert_eq!(s.store().services.len(), 2);
}

/// A backend that leaves a frontend with session affinity takes its affinity entries with
/// it (else a pinned client's new connections keep going to it for the affinity timeout),
/// whatever the protocol; the remaining backends' entries and frontends without affinity
/// are left alone.
#[test]
fn removed_backends_lose_their_affinity_entries() {
    let mut s = syncer();
    let mut aff = fe("aff", &[1, 2]);
    aff.affinity_timeout = Some(10_800);
    let plain = fe("plain", &[1, 2]);
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), aff.clone()), (fk(2, 80, Protocol::Tcp), plain.clone())]));
    let id_of = |s: &Syncer<MemStore>, last: u8| {
        s.store().services.iter().find(|(k, _)| k.addr == IpAddr::V4(Ipv4Addr::new(10, 96, 0, last))).unwrap().1.id
    };
    let backend = |s: &Syncer<MemStore>, b: u8| {
        *s.store().backends.iter().find(|(_, v)| v.addr == IpAddr::V4(Ipv4Addr::new(10, 244, 0, b))).unwrap().0
    };
    let (aff_id, plain_id, b1, b2) = (id_of(&s, 1), id_of(&s, 2), backend(&s, 1), backend(&s, 2));
    let client = |i: u8| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i));
    let store = s.store_mut();
    store.affinity.insert((client(1), aff_id), b1);
    store.affinity.insert((client(2), aff_id), b2);
    store.affinity.insert((client(3), plain_id), b2);

    aff.backends.truncate(1);
    let mut plain = plain;
    plain.backends.truncate(1);
    let r = s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), aff), (fk(2, 80, Protocol::Tcp), plain)]));
    assert_eq!(r.affinity_purged, 1);
    let left: Vec<_> = s.store().affinity.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(left, vec![((client(1), aff_id), b1), ((client(3), plain_id), b2)]);
}

/// `verify` finds nothing when the store holds what was applied, and names each kind of
/// tampering: a frontend deleted, a backend changed, a slot deleted, an extra frontend.
#[test]
fn verify_reports_each_difference() {
    use crate::sync::verify::{DriftKind, verify};
    let mut s = syncer();
    let want = desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1, 2])), (fk(2, 80, Protocol::Tcp), fe("b", &[3]))]);
    s.apply(&want);
    assert_eq!(verify(&want, &s.store().snapshot().unwrap()), vec![]);

    let store = s.store_mut();
    let (k1, v1) = store
        .services
        .iter()
        .find(|(k, _)| k.addr == IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)))
        .map(|(k, v)| (*k, *v))
        .unwrap();
    store.services.remove(&k1);
    let b3 = store.backends.iter_mut().find(|(_, b)| b.addr == IpAddr::V4(Ipv4Addr::new(10, 244, 0, 3))).unwrap().1;
    b3.port = 9999u16.to_be();
    let mut extra = k1;
    extra.port = 81u16.to_be();
    store.services.insert(extra, v1);
    let drift = verify(&want, &store.snapshot().unwrap());
    let kinds: Vec<&DriftKind> = drift.iter().map(|d| &d.kind).collect();
    assert!(kinds.contains(&&DriftKind::Missing), "{drift:#?}");
    assert!(kinds.contains(&&DriftKind::Extra), "{drift:#?}");
    assert!(
        drift.iter().any(|d| matches!(&d.kind, DriftKind::Backends { missing, extra }
            if missing == &["10.244.0.3:8080".to_string()] && extra == &["10.244.0.3:9999".to_string()])),
        "{drift:#?}"
    );
    assert_eq!(drift.len(), 3, "{drift:#?}");

    // A slot deleted from under a frontend.
    let store = s.store_mut();
    let b_id = store.services.iter().find(|(k, _)| k.addr == IpAddr::V4(Ipv4Addr::new(10, 96, 0, 2))).unwrap().1.id;
    let slot = *store.slots.keys().find(|k| k.svc_id == b_id).unwrap();
    store.slots.remove(&slot);
    let drift = verify(&want, &store.snapshot().unwrap());
    assert!(drift.iter().any(|d| matches!(d.kind, DriftKind::BrokenSlot { .. })), "{drift:#?}");
}

/// The cold start into empty maps writes kind by kind in batches; the maps must end up
/// exactly as the one-by-one path leaves them, and a map too small for the batch falls back
/// to that path, naming the frontends that do not fit.
/// `bulk` (after a start-up into empty maps) holds what the one-by-one pass writes for
/// `d`, and has nothing left to write.
fn assert_same_as_one_by_one(bulk: &mut Syncer<MemStore>, d: &DesiredState) {
    let mut one_by_one = syncer();
    let keys: BTreeSet<FrontendKey> = d.frontends.keys().copied().collect();
    one_by_one.apply_changes(d, &keys);
    let maps = |s: &Syncer<MemStore>| {
        let st = s.store();
        (st.services.clone(), st.slots.clone(), st.backends.clone(), st.meta.clone())
    };
    let (b, o) = (maps(bulk), maps(&one_by_one));
    assert!(
        b == o,
        "bulk and one-by-one maps differ: {} / {} services, {} / {} slots, {} / {} backends",
        b.0.len(),
        o.0.len(),
        b.1.len(),
        o.1.len(),
        b.2.len(),
        o.2.len()
    );
    assert_eq!(bulk.apply(d).writes, 0, "nothing left to write after the bulk start");
}

#[test]
fn bulk_start_equals_one_by_one_and_falls_back_when_full() {
    let d = desired(vec![
        (fk(1, 80, Protocol::Tcp), fe("a", &[1, 2])),
        (fk(2, 53, Protocol::Udp), fe("b", &[2, 3])),
        (fk(3, 80, Protocol::Tcp), fe("c", &[])),
    ]);
    let mut bulk = syncer();
    let r = bulk.apply(&d);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let log = take_log(&mut bulk);
    // Kind by kind: every backend, then every slot, then metadata, then services.
    let first = |what: &str| log.iter().position(|l| l.starts_with(what)).unwrap_or(usize::MAX);
    let last = |what: &str| log.iter().rposition(|l| l.starts_with(what)).unwrap_or(0);
    assert!(last("put_backend") < first("put_slot") && last("put_slot") < first("put_service"), "{log:?}");

    assert_same_as_one_by_one(&mut bulk, &d);

    let mut small = Syncer::new(MemStore { max_services: Some(2), ..MemStore::default() }).unwrap();
    let r = small.apply(&d);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(r.services, 2);
    assert_eq!(small.store().services.len(), 2);
}

/// A start-up bigger than one batch chunk (7,000 frontends x 10 endpoints of their own:
/// 70,000 backends and slots) is written chunk by chunk: every entry after the id marks
/// that cover its ids, every service last, and the maps end up as the one-by-one pass
/// leaves them.
#[test]
fn bulk_start_in_chunks_covers_ids_and_equals_one_by_one() {
    let v4 = |base: Ipv4Addr, i: u32| IpAddr::V4(Ipv4Addr::from(u32::from(base) + i));
    let entries = (0..7_000u32)
        .map(|i| {
            let key = FrontendKey {
                addr: v4(Ipv4Addr::new(10, 96, 0, 0), i),
                port: 80,
                proto: Protocol::Tcp,
                scope: Scope::Internal,
            };
            let mut e = fe(&format!("s{i}"), &[]);
            e.backends = (0..10)
                .map(|j| BackendAddr {
                    addr: v4(Ipv4Addr::new(10, 128, 0, 0), i * 10 + j),
                    port: 8080,
                    local: false,
                    terminating: false,
                })
                .collect();
            (key, e)
        })
        .collect();
    let d = desired(entries);
    let mut bulk = syncer();
    let r = bulk.apply(&d);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let log = take_log(&mut bulk);
    assert_eq!(log.len() as u64, r.writes);
    let last_backend = log.iter().rposition(|l| l.starts_with("put_backend")).unwrap();
    assert!(pos(&log, "put_slot") < last_backend, "more than one chunk");
    let first_service = pos(&log, "put_service ");
    assert!(log[first_service..].iter().all(|l| l.starts_with("put_service ")), "services last");
    assert!(first_service > last_backend);
    // Replay: no backend or slot names a backend id, no slot or metadata a service id, at
    // or past the marks persisted before it.
    let (mut next_svc, mut next_backend) = (0u32, 0u32);
    let num = |s: &str| s.parse::<u32>().unwrap();
    for l in &log {
        let mut w = l.split([' ', '/', '=']);
        match w.next().unwrap() {
            "put_id_marks" => (next_svc, next_backend) = (num(w.next().unwrap()), num(w.next().unwrap())),
            "put_backend" => assert!(num(w.next().unwrap()) < next_backend, "{l}"),
            "put_slot" => {
                let (svc, backend) = (num(w.next().unwrap()), num(w.nth(2).unwrap()));
                assert!(svc < next_svc && backend < next_backend, "{l}");
            }
            "put_meta" | "put_service" => assert!(num(w.next().unwrap()) < next_svc, "{l}"),
            _ => {}
        }
    }
    assert_same_as_one_by_one(&mut bulk, &d);
}

/// The frontend id and backend id the store holds for VIP 10.96.0.`vip` and endpoint
/// 10.244.0.`b`.
fn svc_id_of(s: &Syncer<MemStore>, vip: u8) -> u32 {
    s.store().services.iter().find(|(k, _)| k.addr == IpAddr::V4(Ipv4Addr::new(10, 96, 0, vip))).unwrap().1.id
}

fn backend_id_of(s: &Syncer<MemStore>, b: u8) -> u32 {
    *s.store().backends.iter().find(|(_, v)| v.addr == IpAddr::V4(Ipv4Addr::new(10, 244, 0, b))).unwrap().0
}

fn sticky(name: &str, backends: &[u8]) -> FrontendEntry {
    FrontendEntry { affinity_timeout: Some(10_800), ..fe(name, backends) }
}

/// Issue 19, item 5: Service A (affinity) shares endpoint X with Service C; a client is
/// pinned to X under A's id. A is removed: its affinity entries go with it. The agent
/// restarts on the same maps and Service B (affinity, endpoint Y) is created: B gets an id
/// no earlier frontend had (the persisted marks), so even an entry of A that survived (a
/// packet racing the removal writes one back) can never send B's client to C's pod; and the
/// restarted agent sweeps that entry away on its first sync.
#[test]
fn affinity_never_crosses_services_across_a_restart() {
    let client = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
    let (c, a, b) = (fk(10, 80, Protocol::Tcp), fk(20, 80, Protocol::Tcp), fk(30, 80, Protocol::Tcp));
    let mut s = syncer();
    s.apply(&desired(vec![(c, fe("c", &[1])), (a, sticky("a", &[1]))]));
    let (a_id, x_id) = (svc_id_of(&s, 20), backend_id_of(&s, 1));
    s.store_mut().affinity.insert((client, a_id), x_id);

    // (a) A removed: its entries are purged, C's backend stays.
    let r = s.apply(&desired(vec![(c, fe("c", &[1]))]));
    assert_eq!(r.affinity_purged, 1, "A's affinity entry purged with A");
    assert!(s.store().affinity.is_empty(), "{:?}", s.store().affinity);
    assert_eq!(backend_id_of(&s, 1), x_id, "X is still C's backend");
    // A packet that read A's SERVICES value before the delete writes its entry back.
    s.store_mut().affinity.insert((client, a_id), x_id);

    // (b) Restart on the same maps, then B with affinity.
    let mut restarted = Syncer::new(s.store().clone()).unwrap();
    let r = restarted.apply(&desired(vec![(c, fe("c", &[1])), (b, sticky("b", &[2]))]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let (b_id, y_id) = (svc_id_of(&restarted, 30), backend_id_of(&restarted, 2));
    assert_ne!(b_id, a_id, "B must not inherit A's service id");
    assert_ne!(y_id, x_id);
    assert_eq!(r.affinity_purged, 1, "the stale entry of A is swept at the first sync");
    // What the datapath would find for B's client: no entry, so a slot of B (Y), never X.
    assert_eq!(restarted.store().affinity.get(&(client, b_id)), None);
    assert!(restarted.store().affinity.is_empty());
}

/// Ids are not handed out again after a restart, even when the restart finds no live id
/// above them (the allocators resume at the persisted marks, not at max(live id) + 1); a
/// restart that changes nothing still writes nothing.
#[test]
fn ids_are_not_reused_across_restarts() {
    let mut s = syncer();
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1]))]));
    let (first, first_backend) = (svc_id_of(&s, 1), backend_id_of(&s, 1));
    s.apply(&DesiredState::default());
    let mut restarted = Syncer::new(s.store().clone()).unwrap();
    assert_eq!(restarted.apply(&DesiredState::default()).writes, 0);
    restarted.apply(&desired(vec![(fk(2, 80, Protocol::Tcp), fe("b", &[2]))]));
    assert!(svc_id_of(&restarted, 2) > first, "a new service id after the restart");
    assert!(backend_id_of(&restarted, 2) > first_backend, "a new backend id after the restart");
    // The marks are written before the ids they cover, and rarely.
    let log = take_log(&mut restarted);
    assert!(pos(&log, "put_id_marks") < pos(&log, "put_backend"), "{log:?}");
    let mut again = Syncer::new(restarted.store().clone()).unwrap();
    let d = desired(vec![(fk(2, 80, Protocol::Tcp), fe("b", &[2]))]);
    assert_eq!(again.apply(&d).writes, 0, "nothing changed, nothing written");
    let many: Vec<_> = (1..=50).map(|i| (fk(i, 80, Protocol::Tcp), fe(&format!("s{i}"), &[i]))).collect();
    again.apply(&desired(many));
    let marks = again.store().log.iter().filter(|l| l.starts_with("put_id_marks")).count();
    assert_eq!(marks, 1, "one marks write covers many new ids");
}

/// Turning session affinity off drops every entry of the frontend: turned on again later,
/// clients start afresh instead of finding entries that may name backends since removed.
#[test]
fn affinity_turned_off_purges_the_frontends_entries() {
    let client = |i: u8| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i));
    let k = fk(1, 80, Protocol::Tcp);
    let mut s = syncer();
    s.apply(&desired(vec![(k, sticky("a", &[1, 2])), (fk(2, 80, Protocol::Tcp), sticky("other", &[1]))]));
    let (id, other, b1, b2) = (svc_id_of(&s, 1), svc_id_of(&s, 2), backend_id_of(&s, 1), backend_id_of(&s, 2));
    let st = s.store_mut();
    st.affinity.insert((client(1), id), b1);
    st.affinity.insert((client(2), id), b2);
    st.affinity.insert((client(1), other), b1);
    let r = s.apply(&desired(vec![(k, fe("a", &[1, 2])), (fk(2, 80, Protocol::Tcp), sticky("other", &[1]))]));
    assert_eq!(r.affinity_purged, 2);
    assert_eq!(s.store().affinity.keys().copied().collect::<Vec<_>>(), vec![(client(1), other)]);
}

pub(super) fn lb(name: &str, backends: &[u8], ranges: &[u8]) -> FrontendEntry {
    FrontendEntry {
        kind: FrontendKind::LoadBalancer,
        source_ranges: ranges
            .iter()
            .map(|i| IpPrefix { addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, *i)), len: 32 })
            .collect(),
        ..fe(name, backends)
    }
}

/// Issue 19, item 6: a live LoadBalancer given more source ranges than the trie has room
/// for is taken out of SERVICES (fail closed: not served to anyone, rather than to
/// everyone), reported with its Service; other frontends are untouched; once room is freed
/// the next sync serves it with its ranges in force, and the maps agree with the API.
#[test]
fn source_ranges_that_do_not_fit_fail_closed_until_they_do() {
    use crate::sync::verify::verify;
    let store = MemStore { max_ranges: Some(3), ..MemStore::default() };
    let mut s = Syncer::new(store).unwrap();
    let (web, open, other) = (fk(1, 80, Protocol::Tcp), fk(2, 80, Protocol::Tcp), fk(3, 80, Protocol::Tcp));
    let d = desired(vec![(web, lb("web", &[1], &[])), (open, fe("open", &[2])), (other, lb("other", &[3], &[9, 10]))]);
    assert!(s.apply(&d).errors.is_empty());
    let web_key = service_key(&web);
    let served = |s: &Syncer<MemStore>, k: &FrontendKey| s.store().services.contains_key(&service_key(k));

    // Three ranges for "web" do not fit beside "other"'s two.
    let restricted = desired(vec![
        (web, lb("web", &[1], &[1, 2, 3])),
        (open, fe("open", &[2])),
        (other, lb("other", &[3], &[9, 10])),
    ]);
    let r = s.apply_changes(&restricted, &[web].into());
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(r.errors[0].1.to_string().contains("max-source-ranges"), "{}", r.errors[0].1);
    assert_eq!(r.unserved_ranges, vec![(web, "ns/web".to_string())]);
    assert!(!s.store().services.contains_key(&web_key), "fail closed: web is not served");
    assert!(served(&s, &open) && served(&s, &other), "the other frontends are untouched");
    assert_eq!(r.services, 2);

    // Still full: still closed, still reported, on a sync that changes nothing else.
    let r = s.apply_changes(&restricted, &BTreeSet::new());
    assert_eq!(r.unserved_ranges.len(), 1);
    assert!(!served(&s, &web));

    // "other" drops its ranges: the retry of web in the same sync finds the room.
    let freed =
        desired(vec![(web, lb("web", &[1], &[1, 2, 3])), (open, fe("open", &[2])), (other, lb("other", &[3], &[]))]);
    let r = s.apply_changes(&freed, &[other].into());
    assert!(r.errors.is_empty() && r.unserved_ranges.is_empty(), "{:?}", r.errors);
    let v = s.store().services[&web_key];
    assert_ne!(v.flags & svc_flags::SOURCE_RANGES, 0, "served with the restriction");
    let drift = verify(&freed, &s.store().snapshot().unwrap());
    assert!(drift.is_empty(), "{drift:#?}");
    // And it keeps working from there (generations consistent): a backend change.
    let scaled =
        desired(vec![(web, lb("web", &[1, 4], &[1, 2, 3])), (open, fe("open", &[2])), (other, lb("other", &[3], &[]))]);
    assert!(s.apply_changes(&scaled, &[web].into()).errors.is_empty());
    let drift = verify(&scaled, &s.store().snapshot().unwrap());
    assert!(drift.is_empty(), "{drift:#?}");
}

/// A new LoadBalancer whose ranges do not fit is never served; one that fits is.
#[test]
fn new_frontend_with_ranges_that_do_not_fit_is_never_served() {
    let store = MemStore { max_ranges: Some(2), ..MemStore::default() };
    let mut s = Syncer::new(store).unwrap();
    let (a, b) = (fk(1, 80, Protocol::Tcp), fk(2, 80, Protocol::Tcp));
    let r = s.apply(&desired(vec![(a, lb("a", &[1], &[1])), (b, lb("b", &[2], &[2, 3]))]));
    assert_eq!(r.unserved_ranges, vec![(b, "ns/b".to_string())]);
    assert!(s.store().services.contains_key(&service_key(&a)));
    assert!(!s.store().services.contains_key(&service_key(&b)));
}

/// IPv6 ranges fill their own trie: a full `SOURCE_RANGES6` fails the IPv6 LoadBalancer
/// closed (named with `SOURCE_RANGES6`), while the IPv4 one with its ranges is served.
#[test]
fn full_ipv6_ranges_fail_only_the_ipv6_frontend_closed() {
    let store = MemStore { max_ranges: Some(1), ..MemStore::default() };
    let mut s = Syncer::new(store).unwrap();
    let v6_range = |i: u16| IpPrefix { addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, i, 0, 0, 0, 0, 0)), len: 48 };
    let lb6 = |ranges: Vec<IpPrefix>| FrontendEntry {
        kind: FrontendKind::LoadBalancer,
        source_ranges: ranges,
        ..fe6("web", &[1])
    };
    let (k4, k6) = (fk(1, 80, Protocol::Tcp), fk6(1, 80, Protocol::Tcp));
    s.apply(&desired(vec![(k4, lb("web", &[1], &[1])), (k6, lb6(vec![]))]));
    assert!(s.store().services.contains_key(&service_key(&k6)), "open IPv6 LB served");
    let r = s.apply(&desired(vec![(k4, lb("web", &[1], &[1])), (k6, lb6(vec![v6_range(1), v6_range(2)]))]));
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(r.errors[0].1.to_string().contains("SOURCE_RANGES6"), "{}", r.errors[0].1);
    assert_eq!(r.unserved_ranges, vec![(k6, "ns/web".to_string())]);
    assert!(!s.store().services.contains_key(&service_key(&k6)), "IPv6 LB not served");
    assert!(s.store().services.contains_key(&service_key(&k4)), "IPv4 LB still served");
}

#[test]
fn the_before_services_hook_runs_once_with_the_ids_written() {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<Vec<FrontendIds>>>> = Arc::default();
    let hook = |seen: &Arc<Mutex<Vec<Vec<FrontendIds>>>>| -> BeforeServices {
        let seen = Arc::clone(seen);
        Box::new(move |ids: &dyn Fn() -> Vec<FrontendIds>| seen.lock().unwrap().push(ids()))
    };
    let mut s = syncer();
    s.before_first_services(hook(&seen));
    let d = desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1, 2]))]);
    s.apply(&d);
    s.apply(&d);
    let calls = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(calls.len(), 1, "once: {calls:?}");
    let ids = &calls[0];
    assert_eq!(ids.len(), 1);
    let (key, value) = s.store().services.iter().next().map(|(k, v)| (*k, *v)).unwrap();
    assert_eq!((ids[0].key, ids[0].svc_id), (key, value.id), "the id the SERVICES entry carries");
    let mut backends: Vec<(IpAddr, u32)> = ids[0].backends.iter().map(|(b, id)| (b.addr, *id)).collect();
    backends.sort();
    let stored: Vec<(IpAddr, u32)> = {
        let mut v: Vec<(IpAddr, u32)> = s.store().backends.iter().map(|(id, b)| (b.addr, *id)).collect();
        v.sort();
        v
    };
    assert_eq!(backends, stored, "each backend with the id BACKENDS holds it under");

    // A restart onto programmed maps: no batch, the hook runs after the sync, same ids.
    let mut restarted = Syncer::new(std::mem::take(s.store_mut())).unwrap();
    restarted.before_first_services(hook(&seen));
    restarted.apply(&d);
    let calls = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0][0].svc_id, ids[0].svc_id);
}
