//! The write order, pinned: the exact calls one pass makes for a changed frontend, a
//! removed frontend and a removed backend, where the node's entries and the destruction of
//! UDP sockets stand among them, and the module doc's lists held against them, so the doc
//! cannot drift from the code again.
use std::net::{Ipv4Addr, Ipv6Addr};

use proxy_common::{CT_DIR_FORWARD, CtKey, CtValue, IdMarks, MaglevKey, PROTO_UDP, ServiceMeta, ServiceValue, SlotKey};

use super::{
    tests::{desired, fk, lb},
    *,
};
use crate::model::{FrontendEntry, IpFamily, IpPrefix, Protocol, ServicePortName};

/// MemStore with every call in its log, also those MemStore leaves out of it (counter
/// drops, purges, the node's entries and socket destruction, which are no Service map
/// writes), so the whole sequence of a pass is seen.
#[derive(Default)]
struct Recording(MemStore);

impl Recording {
    fn note(&mut self, line: String) {
        self.0.log.push(line);
    }
}

impl MapStore for Recording {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.0.snapshot()
    }
    fn put_service(&mut self, k: &AnyServiceKey, v: &ServiceValue) -> Result<(), StoreError> {
        self.0.put_service(k, v)
    }
    fn put_service_cidr(&mut self, p: IpPrefix, e: store::CidrEntry) -> Result<(), StoreError> {
        self.0.put_service_cidr(p, e)
    }
    fn del_service_cidr(&mut self, p: IpPrefix) -> Result<(), StoreError> {
        self.0.del_service_cidr(p)
    }
    fn del_service(&mut self, k: &AnyServiceKey) -> Result<(), StoreError> {
        self.0.del_service(k)
    }
    fn put_slot(&mut self, k: &SlotKey, backend_id: BackendId) -> Result<(), StoreError> {
        self.0.put_slot(k, backend_id)
    }
    fn del_slot(&mut self, k: &SlotKey) -> Result<(), StoreError> {
        self.0.del_slot(k)
    }
    fn put_backend(&mut self, id: BackendId, b: &AnyBackend) -> Result<(), StoreError> {
        self.0.put_backend(id, b)
    }
    fn del_backend(&mut self, id: BackendId, family: IpFamily) -> Result<(), StoreError> {
        self.0.del_backend(id, family)
    }
    fn put_meta(&mut self, id: ServiceId, m: &ServiceMeta) -> Result<(), StoreError> {
        self.0.put_meta(id, m)
    }
    fn del_meta(&mut self, id: ServiceId) -> Result<(), StoreError> {
        self.0.del_meta(id)
    }
    fn del_stats(&mut self, id: ServiceId) -> Result<(), StoreError> {
        self.note(format!("del_stats {id}"));
        self.0.del_stats(id)
    }
    fn put_range(&mut self, svc_id: ServiceId, p: IpPrefix) -> Result<(), StoreError> {
        self.0.put_range(svc_id, p)
    }
    fn del_range(&mut self, svc_id: ServiceId, p: IpPrefix) -> Result<(), StoreError> {
        self.0.del_range(svc_id, p)
    }
    fn purge_conntrack(&mut self, pred: &dyn Fn(CtFacts) -> bool) -> Result<usize, StoreError> {
        let n = self.0.purge_conntrack(pred)?;
        self.note(format!("purge_conntrack -> {n}"));
        Ok(n)
    }
    fn purge_affinity(&mut self, pred: &dyn Fn(ServiceId, BackendId) -> bool) -> Result<usize, StoreError> {
        let n = self.0.purge_affinity(pred)?;
        self.note(format!("purge_affinity -> {n}"));
        Ok(n)
    }
    fn put_id_marks(&mut self, marks: &IdMarks) -> Result<(), StoreError> {
        self.0.put_id_marks(marks)
    }
    fn put_node_config(&mut self, facts: &NodeFacts) -> Result<(), StoreError> {
        let snat = match facts {
            NodeFacts::V4 { snat, .. } => snat.map(IpAddr::V4),
            NodeFacts::V6 { snat, .. } => snat.map(IpAddr::V6),
        };
        let snat = snat.map_or_else(|| "none".to_string(), |a| a.to_string());
        self.note(format!("put_node_config {} snat={snat}", facts.family().name()));
        self.0.put_node_config(facts)
    }
    fn destroy_udp_sockets(&mut self, backends: &[(IpAddr, u16)]) -> Option<SocketsDestroyed> {
        let peers: Vec<String> = backends.iter().map(|(a, p)| format!("{a}:{}", u16::from_be(*p))).collect();
        self.note(format!("destroy_udp_sockets {}", peers.join(" ")));
        self.0.destroy_udp_sockets(backends)
    }
    fn put_maglev(&mut self, k: &MaglevKey, backend_id: BackendId) -> Result<(), StoreError> {
        self.0.put_maglev(k, backend_id)
    }
    fn del_maglev(&mut self, k: &MaglevKey) -> Result<(), StoreError> {
        self.0.del_maglev(k)
    }
}

/// A LoadBalancer frontend (`tests::lb`) of Service `name`, port `port_name`.
fn named(name: &str, port_name: &str, backends: &[u8], ranges: &[u8]) -> FrontendEntry {
    let e = lb(name, backends, ranges);
    FrontendEntry { service: ServicePortName { port_name: port_name.into(), ..e.service }, ..e }
}

/// The log of one pass that changes frontend `web` in every way a frontend changes (new
/// backends and so new ids, its port renamed, a source range swapped, a shorter list into
/// a spare generation that held a longer one), removes the UDP frontend `dns` (with a
/// range) and with it its backend, and keeps `keep` (which shares a backend with `web`)
/// as it is.
fn one_pass_log() -> Vec<String> {
    let (web, dns, keep) = (fk(1, 80, Protocol::Tcp), fk(2, 53, Protocol::Udp), fk(3, 80, Protocol::Tcp));
    let mut s = Syncer::new(Recording::default()).unwrap();
    // Ids in key order: services web 1, dns 2, keep 3; backends .1 -> 1, .2 -> 2, .3 -> 3,
    // dns's .9 -> 4 (`keep` shares .1).
    s.apply(&desired(vec![
        (web, named("web", "http", &[1, 2, 3], &[1])),
        (dns, named("dns", "dns", &[9], &[3])),
        (keep, named("keep", "http", &[1], &[])),
    ]));
    // Scaled down: generation 1 holds [.1], the spare generation 0 still [.1, .2, .3].
    s.apply(&desired(vec![
        (web, named("web", "http", &[1], &[1])),
        (dns, named("dns", "dns", &[9], &[3])),
        (keep, named("keep", "http", &[1], &[])),
    ]));
    // Restart on maps whose id marks the ids handed out have reached (as every 1,024 new
    // ids): the pass's first new id moves them.
    let mut store = std::mem::take(&mut s.store_mut().0);
    store.id_marks = IdMarks { next_service_id: 4, next_backend_id: 5 };
    store.log.clear();
    // A UDP flow of dns to its backend: purged with them.
    let (k, v) = udp_flow(2, 4);
    store.conntrack.insert(k, v);
    let mut s = Syncer::new(Recording(store)).unwrap();
    s.apply(&desired(vec![(web, named("web", "web", &[4, 5], &[2])), (keep, named("keep", "http", &[1], &[]))]));
    std::mem::take(&mut s.store_mut().0.log)
}

#[test]
fn one_pass_writes_in_the_documented_order() {
    let expected = [
        // web, changed: new ids move the marks before either is written,
        "put_id_marks 1028 1030",
        // its new backends, then its metadata and gained range,
        "put_backend 5",
        "put_backend 6",
        "put_meta 1",
        "put_range 1 192.0.2.2/32",
        // its new list into the spare generation 0, the atomic switch to it, the spare's
        // stale tail, and the range it lost;
        "put_slot 1/0/0=5",
        "put_slot 1/0/1=6",
        "put_service 1 count=2 gen=0",
        "del_slot 1/0/2",
        "del_range 1 192.0.2.1/32",
        // keep: unchanged, nothing. dns, removed: its SERVICES entry first,
        "del_service 2",
        "del_slot 2/0/0",
        "del_meta 2",
        "del_range 2 192.0.2.3/32",
        "del_stats 2",
        // backends no frontend holds any more (.1 stays: keep holds it),
        "del_backend 4",
        // then the purges: dns's UDP flows, and the affinity sweep of a pass after a start;
        "purge_conntrack -> 1",
        "purge_affinity -> 0",
        // last, the connected UDP sockets of dns's deleted backend.
        "destroy_udp_sockets 10.244.0.9:8080",
    ];
    assert_eq!(one_pass_log(), expected);
}

/// The store calls that lead the items of each numbered sub-list in the module doc
/// (`   1. \`put_id_marks\`: ...`), one list per top-level step that has one.
fn documented_orders() -> Vec<Vec<String>> {
    let mut lists: Vec<Vec<String>> = Vec::new();
    let mut in_list = false;
    for line in include_str!("mod.rs").lines().map_while(|l| l.strip_prefix("//!")) {
        let text = line.trim_start();
        let numbered =
            text.split_once(". ").is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        let nested = line.len() - text.len() > 1;
        match (numbered, nested) {
            (true, true) => {
                if !in_list {
                    lists.push(Vec::new());
                    in_list = true;
                }
                let call = text.split('`').nth(1).unwrap_or_default().to_string();
                lists.last_mut().expect("pushed above").push(call);
            }
            // A top-level step or a blank line ends a sub-list; other lines continue an item.
            (true, false) => in_list = false,
            (false, _) if text.is_empty() => in_list = false,
            (false, _) => {}
        }
    }
    lists
}

/// The kinds of call in `log[range]`, each run of one kind counted once.
fn kinds(log: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in log {
        let kind = l.split(' ').next().unwrap_or_default().to_string();
        if out.last() != Some(&kind) {
            out.push(kind);
        }
    }
    out
}

#[test]
fn module_doc_states_the_write_order_the_code_follows() {
    let log = one_pass_log();
    let removal = log.iter().position(|l| l.starts_with("del_service")).unwrap();
    let backends = log.iter().position(|l| l.starts_with("del_backend")).unwrap();
    let documented = documented_orders();
    assert_eq!(documented.len(), 2, "the module doc lists the writes of a changed and of a removed frontend");
    assert_eq!(documented[0], kinds(&log[..removal]), "a changed frontend's writes, as the module doc lists them");
    assert_eq!(
        documented[1],
        kinds(&log[removal..backends]),
        "a removed frontend's writes, as the module doc lists them"
    );
}

/// A UDP conntrack entry of service `svc` to backend `backend` (ids), as the datapath
/// writes it.
fn udp_flow(svc: u32, backend: u32) -> (CtKey, CtValue) {
    let k = CtKey {
        src_addr: 0x0a00_0007,
        dst_addr: 0x0a60_0000 | svc,
        src_port: 40000u16.to_be(),
        dst_port: 53u16.to_be(),
        proto: PROTO_UDP,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    (k, CtValue { svc_id: svc, backend_id: backend, ..CtValue::default() })
}

/// A UDP backend leaves its frontend: the frontend's slots are rewritten and switched to
/// first, then the backend is deleted, then its conntrack entries purged, and only then
/// are the connected sockets pointed at it destroyed (an application that reconnects at
/// once must find neither a slot nor a flow leading to the dead backend).
#[test]
fn a_removed_udp_backend_is_switched_away_from_purged_then_its_sockets_destroyed() {
    let dns = fk(1, 53, Protocol::Udp);
    let mut s = Syncer::new(Recording::default()).unwrap();
    // Service 1; backends .9 -> 1, .10 -> 2.
    s.apply(&desired(vec![(dns, named("dns", "dns", &[9, 10], &[]))]));
    let (k, v) = udp_flow(1, 2);
    s.store_mut().0.conntrack.insert(k, v);
    s.store_mut().0.log.clear();
    let r = s.apply_changes(&desired(vec![(dns, named("dns", "dns", &[9], &[]))]), &[dns].into());
    assert_eq!(r.udp_sockets, Some(SocketsDestroyed::default()));
    let expected = [
        // The shorter list into the spare generation 1, and the switch to it;
        "put_slot 1/1/0=1",
        "put_service 1 count=1 gen=1",
        // the backend no slot names any more;
        "del_backend 2",
        // its UDP flows;
        "purge_conntrack -> 1",
        // its connected sockets.
        "destroy_udp_sockets 10.244.0.10:8080",
    ];
    assert_eq!(std::mem::take(&mut s.store_mut().0.log), expected);
}

/// The node's facts are written before anything of the frontends of the pass that first
/// has them (a flow to a new remote backend reads the SNAT address), also into empty maps
/// (the batch of a first start); afterwards only a family whose facts changed is written
/// again, still first.
#[test]
fn node_config_is_written_before_the_frontends_that_need_it() {
    let v4 = |last| NodeFacts::V4 {
        snat: Some(Ipv4Addr::new(192, 168, 0, last)),
        hairpin: Ipv4Addr::new(169, 254, 7, 127),
        snat_ports: (30000, 60999),
        lb_mode: crate::model::node::LbMode::Snat,
    };
    let v6 = NodeFacts::V6 { snat: None, hairpin: Ipv6Addr::LOCALHOST };
    let (web, api) = (fk(1, 80, Protocol::Tcp), fk(2, 80, Protocol::Tcp));
    let mut s = Syncer::new(Recording::default()).unwrap();
    s.set_node_facts([v4(1), v6]);
    s.apply(&desired(vec![(web, named("web", "http", &[1], &[]))]));
    let expected = [
        // The node's entries, then the batch of a first start, its service entry last,
        "put_node_config IPv4 snat=192.168.0.1",
        "put_node_config IPv6 snat=none",
        "put_id_marks 1026 1026",
        "put_backend 1",
        "put_slot 1/0/0=1",
        "put_meta 1",
        "put_service 1 count=1 gen=0",
        // and the affinity sweep of a first pass.
        "purge_affinity -> 0",
    ];
    assert_eq!(std::mem::take(&mut s.store_mut().0.log), expected);

    // The Node's address changes as a Service with a new backend comes.
    s.set_node_facts([v4(2), v6]);
    let after = desired(vec![(web, named("web", "http", &[1], &[])), (api, named("api", "http", &[2], &[]))]);
    s.apply_changes(&after, &[api].into());
    let expected = ["put_node_config IPv4 snat=192.168.0.2", "put_backend 2", "put_meta 2", "put_slot 2/0/0=2"];
    assert_eq!(std::mem::take(&mut s.store_mut().0.log)[..4], expected);

    // Unchanged facts: nothing.
    s.set_node_facts([v4(2), v6]);
    s.apply(&after);
    assert_eq!(std::mem::take(&mut s.store_mut().0.log), Vec::<String>::new());
    assert_eq!(s.store().0.node_config.get(&IpFamily::V4), Some(&v4(2)));
}

/// A node config write that fails is not lost: the next pass writes it again, and the
/// Services are programmed all the same.
#[test]
fn a_failed_node_config_write_is_retried_by_the_next_pass() {
    let facts = NodeFacts::V6 { snat: Some(Ipv6Addr::LOCALHOST), hairpin: Ipv6Addr::UNSPECIFIED };
    let web = fk(1, 80, Protocol::Tcp);
    let mut s = Syncer::new(MemStore { refuse_node_config: true, ..MemStore::default() }).unwrap();
    s.set_node_facts([facts]);
    let r = s.apply(&desired(vec![(web, named("web", "http", &[1], &[]))]));
    assert!(r.errors.is_empty() && r.services == 1, "{r:?}");
    assert!(s.store().node_config.is_empty());
    s.store_mut().refuse_node_config = false;
    assert_eq!(s.apply(&desired(vec![(web, named("web", "http", &[1], &[]))])).writes, 0);
    assert_eq!(s.store().node_config.get(&IpFamily::V6), Some(&facts));
}
