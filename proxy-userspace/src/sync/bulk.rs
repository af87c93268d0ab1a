//! The bulk start: into empty maps (a node's first start) every entry is new, so the first
//! pass writes them in a few batched syscalls (`BPF_MAP_UPDATE_BATCH` in the kernel store)
//! instead of one syscall each, in the order a packet needs them: backends, slots, source
//! ranges and metadata (in chunks of `BATCH_CHUNK` entries, kind by kind within a chunk),
//! then the services pointing at them. Nothing is reachable before its service entry, so
//! the order of everything before the services does not matter. A
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
use crate::model::{DesiredState, FrontendKind, IpPrefix};

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
        // Room for every entry up front: a table growing past a doubling holds its old and
        // its new buckets at once, and the backends' last doubling was the start-up's peak.
        // A Service port's backends are those of its clusterIP frontend (the other kinds
        // share them), so those count each backend about once.
        let backends = desired
            .frontends
            .values()
            .filter(|e| e.kind == FrontendKind::ClusterIP)
            .map(|e| e.backends.len())
            .sum::<usize>();
        self.mirror.make_room(desired.frontends.len(), backends);
        self.ids.services.make_room(desired.frontends.len());
        self.ids.backends.make_room(backends);
        let mut batch = Batch::default();
        let mut writes = 0;
        let mut services: Vec<(AnyServiceKey, ServiceValue)> = Vec::with_capacity(desired.frontends.len());
        // Boxed as the mirror keeps them: moved in at the end, not copied.
        let mut programmed: Vec<(AnyServiceKey, Box<Programmed>)> = Vec::with_capacity(desired.frontends.len());
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
                        batch.backends.push((id, v));
                        id
                    }
                };
                ids.push(id);
            }
            let id = self.ids.services.alloc();
            let target = Target::new(entry, fk.scope, ids, &self.maglev);
            let svc_id = id.get();
            let slots = target.backends.iter().enumerate().map(|(i, b)| (SlotKey::new(svc_id, 0, i as u32), *b));
            batch.slots.extend(slots);
            let maglev = target.maglev.iter().enumerate().map(|(i, b)| (MaglevKey { svc_id, slot: i as u32 }, *b));
            batch.maglev.extend(maglev);
            batch.ranges.extend(entry.source_ranges.iter().map(|p| (id, *p)));
            batch.metas.push((id, target.meta));
            let value = target.value(id, 0);
            services.push((key, value));
            programmed.push((
                key,
                Box::new(Programmed::written(value, target.backends, target.maglev, target.meta, target.ranges)),
            ));
            if batch.is_full() {
                writes += self.write_batch(&mut batch)?;
            }
        }
        writes += self.write_batch(&mut batch)?;
        drop(batch);
        // Everything a frontend needs is written; nothing is reachable yet.
        self.run_before_services(|s| programmed.iter().map(|(key, p)| s.ids_of(key, p)).collect());
        self.store.put_services(&services)?;
        writes += services.len() as u64;
        drop(services);
        let mut released = HashSet::new();
        for (key, mut prog) in programmed {
            let refs = prog.active.clone();
            self.mirror.set_refs(&mut prog, refs, &mut released);
            self.mirror.put_frontend(key, prog);
        }
        self.total_writes += writes;
        let mut report = SyncReport { writes, ..SyncReport::default() };
        self.count_into(&mut report);
        Ok(report)
    }

    /// Write what `batch` holds, every kind (the id marks first: nothing may name an id
    /// they do not cover), and empty it; the writes issued.
    fn write_batch(&mut self, batch: &mut Batch) -> Result<u64, StoreError> {
        let mut writes = 0;
        self.persist_id_marks(&mut writes)?;
        self.store.put_backends_and_slots(&batch.backends, &batch.slots)?;
        self.store.put_maglevs(&batch.maglev)?;
        for (id, p) in &batch.ranges {
            self.store.put_range(*id, *p)?;
        }
        self.store.put_metas(&batch.metas)?;
        writes += batch.len() as u64;
        batch.clear();
        Ok(writes)
    }
}

/// Entries of one kind a start-up batch holds before it is written. The kinds behind the
/// services are written chunk by chunk as the frontends are gone through, so the buffers
/// stay small (the whole start-up at 100,000 Services x 10 endpoints held about 130 MB
/// beside the mirror; chunks of 65,536 still raised the peak at 10,000 Services by about
/// 5 MiB), while a chunk is still one syscall for thousands of entries.
const BATCH_CHUNK: usize = 8_192;

/// The entries behind the services, not written yet.
#[derive(Default)]
struct Batch {
    backends: Vec<(BackendId, AnyBackend)>,
    slots: Vec<(SlotKey, BackendId)>,
    maglev: Vec<(MaglevKey, BackendId)>,
    ranges: Vec<(ServiceId, IpPrefix)>,
    metas: Vec<(ServiceId, ServiceMeta)>,
}

impl Batch {
    /// Entries held, by kind.
    fn lens(&self) -> [usize; 5] {
        [self.backends.len(), self.slots.len(), self.maglev.len(), self.ranges.len(), self.metas.len()]
    }

    fn len(&self) -> usize {
        self.lens().into_iter().sum()
    }

    fn is_full(&self) -> bool {
        self.lens().into_iter().any(|n| n >= BATCH_CHUNK)
    }

    fn clear(&mut self) {
        self.backends.clear();
        self.slots.clear();
        self.maglev.clear();
        self.ranges.clear();
        self.metas.clear();
    }
}
