//! What the sync needs from the maps, as a trait: the kernel maps implement it
//! (`dataplane::maps`), and `MemStore` implements it in memory so the diff logic is
//! unit-tested without a kernel.
use std::collections::BTreeMap;

use proxy_common::{Backend, CtKey, CtValue, ServiceKey, ServiceMeta, ServiceValue, SlotKey};

use crate::{dataplane::DataplaneError, model::Ipv4Prefix};

/// Everything the sync reads back at start-up.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub slots: Vec<(SlotKey, u32)>,
    pub backends: Vec<(u32, Backend)>,
    pub meta: Vec<(u32, ServiceMeta)>,
    pub ranges: Vec<(u32, Ipv4Prefix)>,
}

pub type StoreResult<T = ()> = Result<T, DataplaneError>;

pub trait MapStore {
    fn snapshot(&self) -> StoreResult<Snapshot>;
    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> StoreResult;
    fn del_service(&mut self, k: &ServiceKey) -> StoreResult;
    fn put_slot(&mut self, k: &SlotKey, backend_id: u32) -> StoreResult;
    fn del_slot(&mut self, k: &SlotKey) -> StoreResult;
    fn put_backend(&mut self, id: u32, b: &Backend) -> StoreResult;
    fn del_backend(&mut self, id: u32) -> StoreResult;
    fn put_meta(&mut self, id: u32, m: &ServiceMeta) -> StoreResult;
    fn del_meta(&mut self, id: u32) -> StoreResult;
    /// Drop the per-service counters of a removed service.
    fn del_stats(&mut self, id: u32) -> StoreResult;
    fn put_range(&mut self, svc_id: u32, p: Ipv4Prefix) -> StoreResult;
    fn del_range(&mut self, svc_id: u32, p: Ipv4Prefix) -> StoreResult;
    /// Delete every conntrack entry matching `pred`; returns how many.
    fn purge_conntrack(&mut self, pred: &dyn Fn(&CtKey, &CtValue) -> bool) -> StoreResult<usize>;
}

/// In-memory store with capacity limits, for tests.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, Backend>,
    pub meta: BTreeMap<u32, ServiceMeta>,
    pub ranges: BTreeMap<(u32, Ipv4Prefix), ()>,
    pub conntrack: BTreeMap<CtKey, CtValue>,
    pub stats_deleted: Vec<u32>,
    /// Maximum number of service entries (None = unlimited), to test "map full".
    pub max_services: Option<usize>,
    /// Maximum number of slot entries (None = unlimited), to test a full `BACKEND_SLOTS`.
    pub max_slots: Option<usize>,
    /// Every write, in order, as text: lets tests assert ordering and minimality.
    pub log: Vec<String>,
}

impl MapStore for MemStore {
    fn snapshot(&self) -> StoreResult<Snapshot> {
        Ok(Snapshot {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            slots: self.slots.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            meta: self.meta.iter().map(|(k, v)| (*k, *v)).collect(),
            ranges: self.ranges.keys().copied().collect(),
        })
    }
    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> StoreResult {
        if self.max_services.is_some_and(|max| !self.services.contains_key(k) && self.services.len() >= max) {
            return Err(DataplaneError::MapFull { map: "SERVICES", flag: "max-services" });
        }
        self.log.push(format!("put_service {} count={} gen={}", v.id, v.count, v.generation));
        self.services.insert(*k, *v);
        Ok(())
    }
    fn del_service(&mut self, k: &ServiceKey) -> StoreResult {
        if let Some(v) = self.services.remove(k) {
            self.log.push(format!("del_service {}", v.id));
        }
        Ok(())
    }
    fn put_slot(&mut self, k: &SlotKey, backend_id: u32) -> StoreResult {
        // Like a kernel hash map: overwriting an existing key works when full.
        if self.max_slots.is_some_and(|max| !self.slots.contains_key(k) && self.slots.len() >= max) {
            return Err(DataplaneError::MapFull { map: "BACKEND_SLOTS", flag: "max-backends" });
        }
        self.log.push(format!("put_slot {}/{}/{}={}", k.svc_id, k.generation(), k.index(), backend_id));
        self.slots.insert(*k, backend_id);
        Ok(())
    }
    fn del_slot(&mut self, k: &SlotKey) -> StoreResult {
        self.log.push(format!("del_slot {}/{}/{}", k.svc_id, k.generation(), k.index()));
        self.slots.remove(k);
        Ok(())
    }
    fn put_backend(&mut self, id: u32, b: &Backend) -> StoreResult {
        self.log.push(format!("put_backend {id}"));
        self.backends.insert(id, *b);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> StoreResult {
        self.log.push(format!("del_backend {id}"));
        self.backends.remove(&id);
        Ok(())
    }
    fn put_meta(&mut self, id: u32, m: &ServiceMeta) -> StoreResult {
        self.log.push(format!("put_meta {id}"));
        self.meta.insert(id, *m);
        Ok(())
    }
    fn del_meta(&mut self, id: u32) -> StoreResult {
        self.log.push(format!("del_meta {id}"));
        self.meta.remove(&id);
        Ok(())
    }
    fn del_stats(&mut self, id: u32) -> StoreResult {
        self.stats_deleted.push(id);
        Ok(())
    }
    fn put_range(&mut self, svc_id: u32, p: Ipv4Prefix) -> StoreResult {
        self.log.push(format!("put_range {svc_id} {}/{}", p.addr, p.len));
        self.ranges.insert((svc_id, p), ());
        Ok(())
    }
    fn del_range(&mut self, svc_id: u32, p: Ipv4Prefix) -> StoreResult {
        self.log.push(format!("del_range {svc_id} {}/{}", p.addr, p.len));
        self.ranges.remove(&(svc_id, p));
        Ok(())
    }
    fn purge_conntrack(&mut self, pred: &dyn Fn(&CtKey, &CtValue) -> bool) -> StoreResult<usize> {
        let before = self.conntrack.len();
        self.conntrack.retain(|k, v| !pred(k, v));
        Ok(before - self.conntrack.len())
    }
}
