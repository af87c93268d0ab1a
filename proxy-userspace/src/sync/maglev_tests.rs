//! Maglev tables in the sync, against the in-memory store: written before the `SERVICES`
//! value that publishes them, rewritten slot by slot (only what changed), read back at
//! start (a restart writes nothing), deleted after the value that reached them, and chosen
//! by annotation or, for north-south frontends, by `--lb-algorithm`.
use std::collections::{BTreeMap, BTreeSet};

use proxy_common::svc_flags;

use super::{
    tests::{desired, fe, fk},
    *,
};
use crate::model::{FrontendEntry, FrontendKey, FrontendKind, LbAlgorithm, Protocol, Scope, maglev};

/// A small prime table: the properties do not depend on the size.
const M: u32 = 251;

fn syncer(north_south: LbAlgorithm) -> Syncer<MemStore> {
    let mut s = Syncer::new(MemStore::default()).unwrap();
    s.set_maglev(MaglevConfig { table_size: M, north_south });
    s
}

fn maglev_fe(name: &str, backends: &[u8]) -> FrontendEntry {
    FrontendEntry { lb_algorithm: Some(LbAlgorithm::Maglev), ..fe(name, backends) }
}

fn log(s: &mut Syncer<MemStore>) -> Vec<String> {
    std::mem::take(&mut s.store_mut().log)
}

fn count(log: &[String], prefix: &str) -> usize {
    log.iter().filter(|l| l.starts_with(prefix)).count()
}

fn first(log: &[String], prefix: &str) -> usize {
    log.iter().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} not in {log:?}"))
}

fn last(log: &[String], prefix: &str) -> usize {
    log.iter().rposition(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} not in {log:?}"))
}

/// Every slot of every table names a backend in the store.
fn tables_name_live_backends(s: &Syncer<MemStore>) {
    for (k, b) in &s.store().maglev {
        assert!(s.store().backends.contains_key(b), "slot {k:?} names backend {b}, not in BACKENDS");
    }
}

#[test]
fn table_is_written_before_the_service_that_publishes_it() {
    // The first start (bulk) and a later pass (one by one) alike.
    let mut s = syncer(LbAlgorithm::Random);
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), maglev_fe("a", &[1, 2, 3]))]));
    let l = log(&mut s);
    assert_eq!(count(&l, "put_maglev"), M as usize);
    assert!(last(&l, "put_maglev") < first(&l, "put_service"), "{l:?}");
    let r = s.apply(&desired(vec![
        (fk(1, 80, Protocol::Tcp), maglev_fe("a", &[1, 2, 3])),
        (fk(2, 80, Protocol::Tcp), maglev_fe("b", &[4, 5])),
    ]));
    assert!(r.errors.is_empty());
    let l = log(&mut s);
    assert_eq!(count(&l, "put_maglev"), M as usize);
    assert!(last(&l, "put_maglev") < first(&l, "put_service"), "{l:?}");
    for v in s.store().services.values() {
        assert_eq!(v.flags & svc_flags::MAGLEV, svc_flags::MAGLEV);
        assert_eq!(v.maglev_size, M);
    }
    assert_eq!(s.store().maglev.len(), 2 * M as usize);
    tables_name_live_backends(&s);
}

#[test]
fn a_backend_change_writes_only_the_slots_that_moved_and_deletes_the_backend_last() {
    let mut s = syncer(LbAlgorithm::Random);
    let key = fk(1, 80, Protocol::Tcp);
    s.apply(&desired(vec![(key, maglev_fe("a", &[1, 2, 3, 4, 5]))]));
    log(&mut s);
    let r = s.apply_changes(&desired(vec![(key, maglev_fe("a", &[1, 2, 4, 5]))]), &BTreeSet::from([key]));
    assert!(r.errors.is_empty());
    let l = log(&mut s);
    let written = count(&l, "put_maglev");
    // The removed backend's slots (about M/5) plus the few the paper's fill moves.
    assert!(written > 0 && written < M as usize / 3, "{written} slots written: {l:?}");
    assert!(last(&l, "put_maglev") < first(&l, "del_backend"), "{l:?}");
    assert_eq!(count(&l, "del_maglev"), 0, "same size: nothing to delete");
    assert_eq!(s.store().maglev.len(), M as usize);
    tables_name_live_backends(&s);
    // Nothing changed: nothing written.
    let r = s.apply(&desired(vec![(key, maglev_fe("a", &[1, 2, 4, 5]))]));
    assert_eq!(r.writes, 0);
}

#[test]
fn a_restart_reads_the_tables_back_and_writes_nothing() {
    let mut s = syncer(LbAlgorithm::Random);
    let d = desired(vec![(fk(1, 80, Protocol::Tcp), maglev_fe("a", &[1, 2, 3]))]);
    s.apply(&d);
    let mut again = Syncer::new(s.store().clone()).unwrap();
    again.set_maglev(MaglevConfig { table_size: M, north_south: LbAlgorithm::Random });
    let r = again.apply(&d);
    assert_eq!(r.writes, 0, "{:?}", again.store().log.iter().rev().take(5).collect::<Vec<_>>());
    // A table the maps hold only in part is rewritten whole, and its stray slots go.
    let mut store = s.store().clone();
    let id = store.services.values().next().unwrap().id;
    store.maglev.remove(&proxy_common::MaglevKey { svc_id: id, slot: 7 });
    store.maglev.insert(proxy_common::MaglevKey { svc_id: id, slot: M + 3 }, 1);
    store.maglev.insert(proxy_common::MaglevKey { svc_id: 999, slot: 0 }, 1);
    let mut again = Syncer::new(store).unwrap();
    again.set_maglev(MaglevConfig { table_size: M, north_south: LbAlgorithm::Random });
    again.apply(&d);
    assert_eq!(again.store().maglev, s.store().maglev);
}

#[test]
fn turning_maglev_off_unpublishes_the_table_before_deleting_it() {
    let mut s = syncer(LbAlgorithm::Random);
    let key = fk(1, 80, Protocol::Tcp);
    s.apply(&desired(vec![(key, maglev_fe("a", &[1, 2]))]));
    log(&mut s);
    s.apply(&desired(vec![(key, fe("a", &[1, 2]))]));
    let l = log(&mut s);
    assert!(first(&l, "put_service") < first(&l, "del_maglev"), "{l:?}");
    assert_eq!(count(&l, "del_maglev"), M as usize);
    let v = s.store().services.values().next().unwrap();
    assert_eq!((v.flags & svc_flags::MAGLEV, v.maglev_size), (0, 0));
    assert!(s.store().maglev.is_empty());
}

#[test]
fn a_removed_frontend_takes_its_table_with_it() {
    let mut s = syncer(LbAlgorithm::Random);
    s.apply(&desired(vec![(fk(1, 80, Protocol::Tcp), maglev_fe("a", &[1, 2]))]));
    log(&mut s);
    s.apply(&desired(vec![]));
    let l = log(&mut s);
    assert!(first(&l, "del_service") < first(&l, "del_maglev"), "{l:?}");
    assert!(s.store().maglev.is_empty());
}

#[test]
fn north_south_default_and_annotations() {
    let np = |name: &str, algorithm| FrontendEntry {
        kind: FrontendKind::NodePort,
        lb_algorithm: algorithm,
        weights: vec![],
        ..fe(name, &[1, 2])
    };
    let ext = |last: u8| FrontendKey { scope: Scope::External, ..fk(last, 80, Protocol::Tcp) };
    let keys = [fk(1, 80, Protocol::Tcp), ext(2), fk(2, 80, Protocol::Tcp), ext(3), fk(4, 80, Protocol::Tcp)];
    let mut s = syncer(LbAlgorithm::Maglev);
    s.apply(&desired(vec![
        // ClusterIP without annotation: random whatever the flag.
        (keys[0], fe("cluster", &[1, 2])),
        // NodePort without annotation: the flag's default for traffic from outside, random
        // for pods (the internal scope).
        (keys[1], np("nodeport", None)),
        (keys[2], np("nodeport", None)),
        // The annotation wins both ways.
        (keys[3], np("nodeport-random", Some(LbAlgorithm::Random))),
        (keys[4], maglev_fe("cluster-maglev", &[1, 2])),
    ]));
    let maglev: Vec<bool> = keys
        .iter()
        .map(|k| {
            let v = s.store().services[&plan::service_key(k)];
            v.flags & svc_flags::MAGLEV != 0 && v.maglev_size == M
        })
        .collect();
    assert_eq!(maglev, [false, true, false, false, true]);
    // Random by default: today's behaviour, no table anywhere.
    let mut s = syncer(LbAlgorithm::Random);
    s.apply(&desired(vec![(keys[1], np("nodeport", None))]));
    assert!(s.store().maglev.is_empty());
}

#[test]
fn the_table_is_the_models_and_does_not_depend_on_backend_ids() {
    let mut s = syncer(LbAlgorithm::Random);
    // Backend ids handed out in another order first.
    s.apply(&desired(vec![(fk(9, 80, Protocol::Tcp), fe("decoy", &[3, 2, 1]))]));
    s.apply(&desired(vec![
        (fk(9, 80, Protocol::Tcp), fe("decoy", &[3, 2, 1])),
        (fk(1, 80, Protocol::Tcp), maglev_fe("a", &[1, 2, 3])),
    ]));
    let v = s.store().services[&plan::service_key(&fk(1, 80, Protocol::Tcp))];
    let backends: Vec<maglev::MaglevBackend> = fe("a", &[1, 2, 3])
        .backends
        .iter()
        .map(|b| maglev::MaglevBackend { addr: b.addr, port: b.port, weight: 1 })
        .collect();
    let expected = maglev::build_table(&backends, M);
    for (slot, i) in expected.iter().enumerate() {
        let id = s.store().maglev[&proxy_common::MaglevKey { svc_id: v.id, slot: slot as u32 }];
        assert_eq!(s.store().backends[&id].addr, backends[*i as usize].addr, "slot {slot}");
    }
}

/// A backend standing for several endpoints (slices repeating its address) gets that many
/// shares of the table, and a change of weight alone rewrites the moved slots.
#[test]
fn weights_from_the_model_give_proportional_slots() {
    let mut s = syncer(LbAlgorithm::Random);
    let key = fk(1, 80, Protocol::Tcp);
    let mut e = maglev_fe("a", &[1, 2, 3]);
    let heavy = e.backends[0];
    e.weights = vec![crate::model::BackendWeight { addr: heavy.addr, port: heavy.port, weight: 3 }];
    s.apply(&desired(vec![(key, e.clone())]));
    let shares = |s: &Syncer<MemStore>| -> BTreeMap<std::net::IpAddr, usize> {
        let mut c = BTreeMap::new();
        for id in s.store().maglev.values() {
            *c.entry(s.store().backends[id].addr).or_insert(0) += 1;
        }
        c
    };
    let c = shares(&s);
    // 3 : 1 : 1 of M slots (within the paper's spread).
    let unit = f64::from(M) / 5.0;
    for b in &e.backends {
        let want = if b.addr == heavy.addr { 3.0 * unit } else { unit };
        let got = c[&b.addr] as f64;
        assert!((got - want).abs() / want < 0.05, "{} holds {got} of {M} slots, want ~{want:.0}: {c:?}", b.addr);
    }
    // Back to weight 1: only the heavy backend's surplus slots move.
    log(&mut s);
    let r = s.apply_changes(&desired(vec![(key, maglev_fe("a", &[1, 2, 3]))]), &BTreeSet::from([key]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let written = count(&log(&mut s), "put_maglev");
    assert!(written > 0 && written < M as usize / 2, "{written} slots written");
    let c = shares(&s);
    assert!(c.values().all(|&n| (n as f64 - f64::from(M) / 3.0).abs() < 0.05 * f64::from(M) / 3.0), "{c:?}");
}
