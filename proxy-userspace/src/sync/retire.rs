//! Taking out what is no longer wanted: frontends (their `SERVICES` entry first, so no new
//! packet reaches what follows), then backends no frontend holds any more (last, after
//! every frontend that pointed at them has switched away), and the orphans a read-back
//! found. A delete that fails is retried by the next pass.
use tracing::warn;

use super::{
    Pass, Syncer,
    ids::ServiceId,
    mirror::Programmed,
    plan::frontend_key,
    store::{AnyServiceKey, MapStore, StoreError},
};
use proxy_common::{MaglevKey, SlotKey};

impl<S: MapStore> Syncer<S> {
    /// Remove the frontends no longer desired.
    pub(super) fn retire_frontends(&mut self, stale: Vec<AnyServiceKey>, pass: &mut Pass) {
        for key in stale {
            let had_affinity = self.mirror.frontends.get(&key).is_some_and(|p| p.has_affinity());
            match self.remove_frontend(&key, pass) {
                Ok(id) => pass.purges.frontend_removed(id, key.proto, had_affinity),
                Err(e) => {
                    warn!(error = %e, "cannot remove frontend; will retry on next sync");
                    if let Some(fk) = frontend_key(&key) {
                        self.retry.insert(fk);
                    }
                }
            }
        }
    }

    /// Remove a frontend; returns its id (0, never allocated, if it was not programmed).
    fn remove_frontend(&mut self, key: &AnyServiceKey, pass: &mut Pass) -> Result<ServiceId, StoreError> {
        let Some(mut prog) = self.mirror.take_frontend(key) else { return Ok(ServiceId::new(0)) };
        let result = self.delete_frontend(key, &prog, &mut pass.writes);
        match &result {
            Ok(_) => {
                self.mirror.set_refs(&mut prog, Vec::new(), &mut pass.released);
                self.ids.services.free(prog.id());
            }
            Err(_) => {
                // Half removed: its slots may still point at its backends.
                let held = self.mirror.live(prog.active.iter().chain(&prog.inactive));
                self.mirror.set_refs(&mut prog, held, &mut pass.released);
                self.mirror.put_frontend(*key, prog);
            }
        }
        result
    }

    fn delete_frontend(
        &mut self,
        key: &AnyServiceKey,
        prog: &Programmed,
        writes: &mut u64,
    ) -> Result<ServiceId, StoreError> {
        let id = prog.id();
        if prog.in_map {
            self.store.del_service(key)?;
            *writes += 1;
        }
        for (generation, list) in [(prog.value.generation, &prog.active), (prog.value.generation ^ 1, &prog.inactive)] {
            for i in 0..list.len() {
                self.store.del_slot(&SlotKey::new(id.get(), generation, i as u32))?;
                *writes += 1;
            }
        }
        for slot in 0..prog.maglev.len() as u32 {
            self.store.del_maglev(&MaglevKey { svc_id: id.get(), slot })?;
            *writes += 1;
        }
        if prog.meta.is_some() {
            self.store.del_meta(id)?;
            *writes += 1;
        }
        for p in &prog.ranges {
            self.store.del_range(id, *p)?;
            *writes += 1;
        }
        self.store.del_stats(id)?;
        Ok(id)
    }

    /// Delete the backends the pass released that no frontend took again.
    pub(super) fn retire_backends(&mut self, pass: &mut Pass) {
        for id in std::mem::take(&mut pass.released) {
            if self.mirror.referenced(id) {
                continue;
            }
            let Some(ident) = self.mirror.backend_of(id).as_ref().map(super::mirror::BackendIdent::of) else {
                continue;
            };
            match self.store.del_backend(id, ident.family()) {
                Ok(()) => {
                    pass.writes += 1;
                    pass.purges.backend_deleted(id, ident.proto);
                    if ident.proto == proxy_common::PROTO_UDP {
                        // Connected UDP sockets pointed at it are destroyed at the pass's end.
                        pass.report.removed_udp_backends.push((ident.addr, ident.port));
                    }
                    self.mirror.untrack_backend(id, ident);
                    self.ids.backends.free(id);
                }
                Err(e) => {
                    warn!(backend_id = id.get(), error = %e, "cannot delete backend");
                    self.unreferenced.insert(id);
                }
            }
        }
    }

    /// Delete the orphans found at read-back; what cannot be deleted is retried next time.
    /// Returns the deletes issued.
    pub(super) fn delete_orphans(&mut self) -> u64 {
        let o = std::mem::take(&mut self.orphans);
        let mut writes = 0;
        for k in o.slots {
            match self.store.del_slot(&k) {
                Ok(()) => writes += 1,
                Err(_) => self.orphans.slots.push(k),
            }
        }
        for k in o.maglev {
            match self.store.del_maglev(&k) {
                Ok(()) => writes += 1,
                Err(_) => self.orphans.maglev.push(k),
            }
        }
        for id in o.meta {
            match self.store.del_meta(id) {
                Ok(()) => writes += 1,
                Err(_) => self.orphans.meta.push(id),
            }
        }
        for (id, p) in o.ranges {
            match self.store.del_range(id, p) {
                Ok(()) => writes += 1,
                Err(_) => self.orphans.ranges.push((id, p)),
            }
        }
        if writes > 0 {
            tracing::info!(deleted = writes, "deleted slots, metadata and source ranges of no service");
        }
        writes
    }
}
