//! The write order, pinned: the exact calls one pass makes for a changed frontend, a
//! removed frontend and a removed backend, and the module doc's lists held against them,
//! so the doc cannot drift from the code again.
use proxy_common::{CT_DIR_FORWARD, CtKey, CtValue, IdMarks, MaglevKey, PROTO_UDP, ServiceMeta, ServiceValue, SlotKey};

use super::{
    tests::{desired, fk, lb},
    *,
};
use crate::model::{FrontendEntry, IpFamily, IpPrefix, Protocol, ServicePortName};

/// MemStore with every call in its log, also those MemStore leaves out of it (counter
/// drops and purges, which are no map writes), so the whole sequence of a pass is seen.
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
    let k = CtKey {
        src_addr: 0x0a00_0007,
        dst_addr: 0x0a60_0002,
        src_port: 40000u16.to_be(),
        dst_port: 53u16.to_be(),
        proto: PROTO_UDP,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    store.conntrack.insert(k, CtValue { svc_id: 2, backend_id: 4, ..CtValue::default() });
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
        // then the purges: dns's UDP flows, and the affinity sweep of a pass after a start.
        "purge_conntrack -> 1",
        "purge_affinity -> 0",
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
