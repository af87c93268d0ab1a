//! The bulk start: into empty maps (a node's first start) every entry is new, so the first
//! pass writes them kind by kind in a few batched syscalls (`BPF_MAP_UPDATE_BATCH` in the
//! kernel store) instead of one syscall each, in the order a packet needs them: backends,
//! slots, source ranges and metadata, then the services pointing at them. Nothing is
//! reachable before its service entry, so the order inside each kind does not matter. A
//! batch that fails (a full map) falls back to the one-by-one pass after reading back what
//! landed, which then names each frontend that does not fit.
use std::collections::HashSet;

use proxy_common::{MaglevKey, ServiceMeta, ServiceValue, SlotKey};
use tracing::warn;

use super::{
    SyncReport, Syncer,
    ids::{BackendId, ServiceId},
    mirror::{BackendIdent, Programmed},
    plan::{Target, backend_value, service_key},
    store::{AnyBackend, AnyServiceKey, MapStore, StoreError},
};
use crate::model::{DesiredState, IpPrefix};

impl<S: MapStore> Syncer<S> {
    /// Write `desired` into the empty maps in batches: the pass's report, or `None` when a
    /// batch failed, the mirror has been read back, and the one-by-one pass must follow.
    /// `writes` are the deletes the pass issued before (orphans), and what it issues here
    /// on the way to `None`.
    pub(super) fn bulk_start(&mut self, desired: &DesiredState, writes: &mut u64) -> Option<SyncReport> {
        match self.bulk_load(desired) {
            Ok(mut report) => {
                report.writes += *writes;
                self.total_writes += *writes;
                self.sweep_affinity(&mut report);
                Some(report)
            }
            Err(e) => {
                // Whatever landed is read back; the one-by-one pass does the rest and names
                // each frontend that does not fit.
                warn!(error = %e, "batched start-up write failed; writing one entry at a time");
                if let Err(e) = self.read_back() {
                    warn!(error = %e, "cannot read the maps back");
                }
                // What the batch wrote for frontends it did not get to.
                *writes += self.delete_orphans();
                None
            }
        }
    }

    /// Program `desired` into empty maps with batched writes. On error the mirror is
    /// stale: the caller reads the maps back.
    fn bulk_load(&mut self, desired: &DesiredState) -> Result<SyncReport, StoreError> {
        let mut backends: Vec<(BackendId, AnyBackend)> = Vec::new();
        let mut slots: Vec<(SlotKey, BackendId)> = Vec::new();
        let mut maglev: Vec<(MaglevKey, BackendId)> = Vec::new();
        let mut ranges: Vec<(ServiceId, IpPrefix)> = Vec::new();
        let mut metas: Vec<(ServiceId, ServiceMeta)> = Vec::with_capacity(desired.frontends.len());
        let mut services: Vec<(AnyServiceKey, ServiceValue)> = Vec::with_capacity(desired.frontends.len());
        let mut programmed: Vec<(AnyServiceKey, Programmed)> = Vec::with_capacity(desired.frontends.len());
        for (fk, entry) in &desired.frontends {
            let key = service_key(fk);
            let mut ids = Vec::with_capacity(entry.backends.len());
            for b in &entry.backends {
                let v = backend_value(b, key.proto);
                let id = match self.mirror.backend_id(&BackendIdent::of(&v)) {
                    Some(id) => id,
                    None => {
                        let id = self.ids.backends.alloc();
                        self.mirror.track_backend(id, v);
                        backends.push((id, v));
                        id
                    }
                };
                ids.push(id);
            }
            let id = self.ids.services.alloc();
            let target = Target::new(entry, fk.scope, ids, &self.maglev);
            slots.extend(target.backends.iter().enumerate().map(|(i, b)| (SlotKey::new(id.get(), 0, i as u32), *b)));
            let svc_id = id.get();
            maglev.extend(target.maglev.iter().enumerate().map(|(i, b)| (MaglevKey { svc_id, slot: i as u32 }, *b)));
            ranges.extend(entry.source_ranges.iter().map(|p| (id, *p)));
            metas.push((id, target.meta));
            let value = target.value(id, 0);
            services.push((key, value));
            programmed
                .push((key, Programmed::written(value, target.backends, target.maglev, target.meta, target.ranges)));
        }
        // The marks first: nothing may name an id the marks do not cover.
        let mut mark_writes = 0;
        self.persist_id_marks(&mut mark_writes)?;
        self.store.put_backends_and_slots(&backends, &slots)?;
        self.store.put_maglevs(&maglev)?;
        for (id, p) in &ranges {
            self.store.put_range(*id, *p)?;
        }
        self.store.put_metas(&metas)?;
        // Everything a frontend needs is written; nothing is reachable yet.
        self.run_before_services(|s| programmed.iter().map(|(key, p)| s.ids_of(key, p)).collect());
        self.store.put_services(&services)?;
        let mut released = HashSet::new();
        for (key, mut prog) in programmed {
            let refs = prog.active.clone();
            self.mirror.set_refs(&mut prog, refs, &mut released);
            self.mirror.put_frontend(key, prog);
        }
        let writes = mark_writes
            + (backends.len() + slots.len() + maglev.len() + ranges.len() + metas.len() + services.len()) as u64;
        self.total_writes += writes;
        let mut report = SyncReport { writes, ..SyncReport::default() };
        self.count_into(&mut report);
        Ok(report)
    }
}
