//! Writing the wanted frontends, one at a time, in the order of the module doc: its
//! backends, metadata and gained source ranges, then its backend list into the slot
//! generation that is not active, then the one `SERVICES` write that publishes it, then
//! what it no longer needs. A frontend that finds a map full gets a second chance after
//! the pass's removals; one that cannot be written keeps what it had (or, if its source
//! ranges are no longer in force, is not served: `fail_closed`) and is retried by every
//! pass.
use std::collections::{BTreeSet, HashSet};

use proxy_common::{MaglevKey, PROTO_UDP, SlotKey, svc_flags};
use tracing::{error, warn};

use super::{
    Pass, Syncer,
    ids::{BackendId, ServiceId},
    mirror::{BackendIdent, Programmed},
    plan::{Target, backend_value, service_key},
    store::{AnyBackend, AnyServiceKey, MapStore, StoreError},
};
use crate::model::{FrontendEntry, FrontendKey, IpPrefix, Scope};

/// Frontends that found a map full, for their second chance.
#[derive(Default)]
pub(super) struct Deferred<'a> {
    frontends: Vec<(&'a FrontendKey, &'a FrontendEntry)>,
    /// One of them found `BACKEND_SLOTS` full: the spare generations are freed first.
    slots_full: bool,
}

/// The slots map is full (an insert of a new slot key failed).
fn is_slots_full(e: &StoreError) -> bool {
    matches!(e, StoreError::MapFull { map, .. } if *map == proxy_common::map_names::BACKEND_SLOTS)
}

impl<S: MapStore> Syncer<S> {
    /// Write the wanted frontends; those that found a map full are handed back for
    /// `write_deferred`, after the removals have made room.
    pub(super) fn write_frontends<'a>(
        &mut self,
        wanted: Vec<(&'a FrontendKey, &'a FrontendEntry)>,
        pass: &mut Pass,
    ) -> Deferred<'a> {
        let mut deferred = Deferred::default();
        for (fk, entry) in wanted {
            match self.apply_frontend(&service_key(fk), entry, pass) {
                Ok(()) => {}
                Err(e @ StoreError::MapFull { .. }) => {
                    deferred.slots_full |= is_slots_full(&e);
                    deferred.frontends.push((fk, entry));
                }
                // Reported, not logged: the caller logs it once per change, not on every
                // sync while a map stays full.
                Err(e) => self.not_programmed(fk, entry, e, pass),
            }
        }
        deferred
    }

    /// The second chance of frontends that found a map full, now that removed frontends
    /// have freed their entries (a delete never needs room, a write may), and after the
    /// spare generations of every other frontend are freed ("free before write"). A spare
    /// is unreachable: no SERVICES value points at it. Spares switched away from earlier in
    /// this pass are included: a packet that read the SERVICES value before that switch
    /// looks its slot up within the same program run (microseconds, under RCU), while this
    /// point comes after every other frontend's writes and the removals; should one still
    /// miss, it is counted `error` and passed untouched.
    pub(super) fn write_deferred(&mut self, deferred: Deferred<'_>, pass: &mut Pass) {
        if deferred.slots_full {
            self.reclaim_spares(&mut pass.writes);
        }
        for (fk, entry) in deferred.frontends {
            if let Err(e) = self.apply_frontend(&service_key(fk), entry, pass) {
                warn!(frontend = %fk, service = %entry.service, error = %e, "cannot program frontend");
                self.not_programmed(fk, entry, e, pass);
            }
        }
    }

    /// `fk` could not be written: fail closed if it must, retry it next pass, report it.
    fn not_programmed(&mut self, fk: &FrontendKey, entry: &FrontendEntry, e: StoreError, pass: &mut Pass) {
        self.fail_closed(fk, entry, &e, pass);
        self.retry.insert(*fk);
        pass.report.errors.push((*fk, e));
    }

    fn apply_frontend(
        &mut self,
        key: &AnyServiceKey,
        entry: &FrontendEntry,
        pass: &mut Pass,
    ) -> Result<(), StoreError> {
        let wanted: Vec<AnyBackend> = entry.backends.iter().map(|b| backend_value(b, key.proto)).collect();
        let mut ids = Vec::with_capacity(wanted.len());
        for v in &wanted {
            match self.ensure_backend(v, &mut pass.writes) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    // It keeps what it had, and what it wants (of what exists) stays for
                    // the retry.
                    let existing: Vec<BackendId> =
                        wanted.iter().filter_map(|v| self.mirror.backend_id(&BackendIdent::of(v))).collect();
                    match self.mirror.take_frontend(key) {
                        Some(mut p) => {
                            let held = self.mirror.live(p.active.iter().chain(&p.inactive));
                            self.mirror.set_refs(&mut p, [existing, held].concat(), &mut pass.released);
                            self.mirror.put_frontend(*key, p);
                        }
                        // Not programmed at all: nothing holds the backends it created.
                        None => pass.released.extend(existing),
                    }
                    return Err(e);
                }
            }
        }
        let scope = Scope::from_number(key.scope).unwrap_or(Scope::Internal);
        let target = Target::new(entry, scope, ids, &self.maglev);

        let mut prog = match self.mirror.take_frontend(key) {
            Some(p) => p,
            None => match self.new_service_id(&mut pass.writes) {
                Ok(id) => Programmed::new(id),
                Err(e) => {
                    // Not programmed at all: nothing holds the backends it ensured.
                    pass.released.extend(target.backends);
                    return Err(e);
                }
            },
        };
        // Whatever happens, the record goes back into the mirror with what was written, so
        // the next pass continues from there and a removal cleans up everything.
        let before = prog.active.clone();
        let had_affinity = prog.has_affinity();
        let result = self.write_frontend(key, &mut prog, &target, &mut pass.writes);
        let affinity = had_affinity || target.flags & svc_flags::AFFINITY != 0;
        // A TCP frontend without affinity leaves nothing to purge: no walk.
        if key.proto == PROTO_UDP || affinity {
            let now: HashSet<BackendId> = prog.active.iter().copied().collect();
            for old in before.iter().chain(&prog.inactive).filter(|b| !now.contains(b)) {
                pass.purges.backend_dropped(prog.id(), *old, key.proto, affinity);
            }
        }
        // Affinity turned off (and the value without it written): no entry of it may be
        // found again should it be turned back on.
        if had_affinity && !prog.has_affinity() {
            pass.purges.affinity_off(prog.id());
        }
        let refs = match &result {
            Ok(()) => target.backends,
            Err(_) => [target.backends, self.mirror.live(prog.active.iter().chain(&prog.inactive))].concat(),
        };
        self.mirror.set_refs(&mut prog, refs, &mut pass.released);
        self.mirror.put_frontend(*key, prog);
        result
    }

    /// Ensure the backend exists with the right flags; returns its id.
    fn ensure_backend(&mut self, b: &AnyBackend, writes: &mut u64) -> Result<BackendId, StoreError> {
        let ident = BackendIdent::of(b);
        if let Some(id) = self.mirror.backend_id(&ident) {
            if self.mirror.backend_of(id).as_ref() == Some(b) {
                return Ok(id);
            }
            self.store.put_backend(id, b)?;
            *writes += 1;
            self.mirror.set_backend_value(id, *b);
            return Ok(id);
        }
        let id = self.new_backend_id(writes)?;
        if let Err(e) = self.store.put_backend(id, b) {
            self.ids.backends.free(id);
            return Err(e);
        }
        *writes += 1;
        self.mirror.track_backend(id, *b);
        Ok(id)
    }

    /// Bring one frontend from `prog` (what the maps hold) to `target`.
    fn write_frontend(
        &mut self,
        key: &AnyServiceKey,
        prog: &mut Programmed,
        target: &Target,
        writes: &mut u64,
    ) -> Result<(), StoreError> {
        let id = prog.id();
        if prog.meta.as_ref() != Some(&target.meta) {
            self.store.put_meta(id, &target.meta)?;
            *writes += 1;
            prog.meta = Some(target.meta);
        }
        let gained: Vec<IpPrefix> = target.ranges.difference(&prog.ranges).copied().collect();
        for p in gained {
            self.store.put_range(id, p)?;
            *writes += 1;
            prog.ranges.insert(p);
        }
        // The Maglev table first, in place and only the slots that differ: it is reachable
        // as soon as it is written if the frontend already has a table (every slot names a
        // backend of the old or the new list, all in `BACKENDS` until the end of the pass);
        // a new table is published by the `SERVICES` write below.
        self.put_maglev_slots(id, prog, &target.maglev, writes)?;
        let unchanged = prog.in_map
            && prog.active == target.backends
            && prog.value.maglev_size == target.maglev.len() as u32
            && prog.value.flags == target.flags
            && prog.value.affinity_timeout == target.affinity_timeout;
        if !unchanged {
            match self.switch_generation(key, prog, target, writes) {
                Ok(()) => {}
                Err(e) if is_slots_full(&e) && prog.in_map && target.backends.len() <= prog.active.len() => {
                    // The spare generation cannot hold the new list and the map is full,
                    // but the new list is no longer than the active one (a scale-down or a
                    // pod replaced): rewrite the active generation in place, which needs no
                    // new entry. Removals therefore always succeed. What it wrote into the
                    // (unreachable) spare is given back first.
                    self.release_spare(prog, writes);
                    self.shrink_in_place(key, prog, target, writes)?;
                }
                Err(e) => {
                    if is_slots_full(&e) {
                        // The spare generation it half filled is unreachable: give its slots
                        // back so other frontends can still change. The frontend keeps what
                        // it had (or stays unprogrammed) and is reported.
                        self.release_spare(prog, writes);
                    }
                    return Err(e);
                }
            }
        }
        // Slots past the new table's size (a smaller table, or none any more) are unreachable
        // now that `SERVICES` says so.
        self.del_maglev_past(id, prog, target.maglev.len(), writes)?;
        let lost: Vec<IpPrefix> = prog.ranges.difference(&target.ranges).copied().collect();
        for p in lost {
            self.store.del_range(id, p)?;
            *writes += 1;
            prog.ranges.remove(&p);
        }
        Ok(())
    }

    /// The normal update: fill the generation that is not active, then switch `SERVICES`
    /// to it in one atomic write; slots past the new count are deleted after the switch.
    fn switch_generation(
        &mut self,
        key: &AnyServiceKey,
        prog: &mut Programmed,
        target: &Target,
        writes: &mut u64,
    ) -> Result<(), StoreError> {
        let id = prog.id();
        let ids = &target.backends;
        let generation = if prog.in_map { prog.value.generation ^ 1 } else { 0 };
        // Fill the inactive generation; slots already holding the right id are kept.
        self.put_slots(id, generation, &mut prog.inactive, ids, writes)?;
        let value = target.value(id, generation);
        self.store.put_service(key, &value)?;
        *writes += 1;
        prog.value = value;
        prog.in_map = true;
        // Slots past the new count in this generation are leftovers of an older,
        // longer backend list: unreachable now that the count is in place.
        self.del_slots_past(id, generation, &mut prog.inactive, ids.len(), writes)?;
        // The filled generation is now active; the previous one is the spare.
        std::mem::swap(&mut prog.active, &mut prog.inactive);
        Ok(())
    }

    /// Fallback when `BACKEND_SLOTS` is full and the new list is no longer than the active
    /// one: rewrite the active generation in place.
    ///
    /// Why a reader never sees this half-done in a harmful way: a packet reads the
    /// `SERVICES` value (count `c`), picks one index below `c`, and looks that slot up.
    /// 1. Slots below the new count `c'` are overwritten first, while the published count
    ///    is still `c`. Overwriting an existing key needs no free entry (the kernel swaps
    ///    in a per-CPU spare element), so it cannot fail on a full map. Every slot below `c`
    ///    holds, at every instant, a backend of the old list or of the new one, and all of
    ///    them are still in `BACKENDS` (unused backends are deleted at the end of the pass,
    ///    after this). A new flow in that window goes to an old or a new backend, like one
    ///    that raced the atomic switch; only the spread over them is briefly uneven.
    /// 2. One atomic `SERVICES` write publishes `c'` (and flags): from then on no new flow
    ///    picks a removed backend.
    /// 3. Slots `c'..c` are deleted last; a packet that read the old count just before step
    ///    2 and looks one up just after step 3 finds no slot and is counted `error` and
    ///    passed untouched (a SYN is retransmitted) - the same microsecond window as a
    ///    concurrent service delete, and only when the map is full.
    ///
    /// Established flows are not affected: they follow conntrack, not the slots.
    fn shrink_in_place(
        &mut self,
        key: &AnyServiceKey,
        prog: &mut Programmed,
        target: &Target,
        writes: &mut u64,
    ) -> Result<(), StoreError> {
        let id = prog.id();
        let ids = &target.backends;
        let generation = prog.value.generation;
        self.put_slots(id, generation, &mut prog.active, ids, writes)?;
        let value = target.value(id, generation);
        self.store.put_service(key, &value)?;
        *writes += 1;
        prog.value = value;
        self.del_slots_past(id, generation, &mut prog.active, ids.len(), writes)?;
        tracing::info!(svc_id = id.get(), count = ids.len(), "BACKEND_SLOTS full: backend list shrunk in place");
        Ok(())
    }

    /// Write `ids` into slot generation `generation` of service `id`, whose slots hold
    /// `have`: only the slots that differ.
    fn put_slots(
        &mut self,
        id: ServiceId,
        generation: u32,
        have: &mut Vec<BackendId>,
        ids: &[BackendId],
        writes: &mut u64,
    ) -> Result<(), StoreError> {
        for (i, bid) in ids.iter().enumerate() {
            if have.get(i) != Some(bid) {
                self.store.put_slot(&SlotKey::new(id.get(), generation, i as u32), *bid)?;
                *writes += 1;
                if i < have.len() {
                    have[i] = *bid;
                } else {
                    have.push(*bid);
                }
            }
        }
        Ok(())
    }

    /// Write the Maglev table `table` of service `id` over what `prog` holds: only the slots
    /// that differ, in one batch (a backend change moves about 1/N of a table's thousands
    /// of slots: one syscall instead of one each). A batch that fails may have landed in
    /// part, so the slots are then written one by one, recording each (writing a slot again
    /// is harmless), and the mirror stays exact.
    fn put_maglev_slots(
        &mut self,
        id: ServiceId,
        prog: &mut Programmed,
        table: &[BackendId],
        writes: &mut u64,
    ) -> Result<(), StoreError> {
        let changed: Vec<(MaglevKey, BackendId)> = table
            .iter()
            .enumerate()
            .filter(|(slot, bid)| prog.maglev.get(*slot) != Some(*bid))
            .map(|(slot, bid)| (MaglevKey { svc_id: id.get(), slot: slot as u32 }, *bid))
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        if self.store.put_maglevs(&changed).is_ok() {
            *writes += changed.len() as u64;
            prog.maglev.resize(prog.maglev.len().max(table.len()), BackendId::new(0));
            for (k, bid) in &changed {
                prog.maglev[k.slot as usize] = *bid;
            }
            return Ok(());
        }
        for (slot, bid) in table.iter().enumerate() {
            if prog.maglev.get(slot) != Some(bid) {
                self.store.put_maglev(&MaglevKey { svc_id: id.get(), slot: slot as u32 }, *bid)?;
                *writes += 1;
                if slot < prog.maglev.len() {
                    prog.maglev[slot] = *bid;
                } else {
                    prog.maglev.push(*bid);
                }
            }
        }
        Ok(())
    }

    /// Delete the Maglev slots of service `id` from `len` on (once `SERVICES` no longer
    /// reaches them).
    fn del_maglev_past(
        &mut self,
        id: ServiceId,
        prog: &mut Programmed,
        len: usize,
        writes: &mut u64,
    ) -> Result<(), StoreError> {
        while prog.maglev.len() > len {
            let slot = prog.maglev.len() - 1;
            if prog.value.maglev_size as usize > slot {
                // Still published (the SERVICES write failed): keep it.
                break;
            }
            self.store.del_maglev(&MaglevKey { svc_id: id.get(), slot: slot as u32 })?;
            *writes += 1;
            prog.maglev.pop();
        }
        Ok(())
    }

    /// Delete the slots of generation `generation` of service `id` (holding `have`) from
    /// index `len` on.
    fn del_slots_past(
        &mut self,
        id: ServiceId,
        generation: u32,
        have: &mut Vec<BackendId>,
        len: usize,
        writes: &mut u64,
    ) -> Result<(), StoreError> {
        for i in len..have.len() {
            self.store.del_slot(&SlotKey::new(id.get(), generation, i as u32))?;
            *writes += 1;
        }
        have.truncate(len);
        Ok(())
    }

    /// Delete the slots of a frontend's spare generation (unreachable: no `SERVICES` value
    /// points at it). Best effort; what cannot be deleted stays in the mirror.
    fn release_spare(&mut self, prog: &mut Programmed, writes: &mut u64) {
        let generation = if prog.in_map { prog.value.generation ^ 1 } else { 0 };
        while let Some(last) = prog.inactive.len().checked_sub(1) {
            if self.store.del_slot(&SlotKey::new(prog.value.id, generation, last as u32)).is_err() {
                break;
            }
            *writes += 1;
            prog.inactive.pop();
        }
    }

    /// Free the spare generation of every frontend (see `write_deferred` for why that is
    /// safe).
    fn reclaim_spares(&mut self, writes: &mut u64) {
        let keys: Vec<AnyServiceKey> =
            self.mirror.frontends.iter().filter(|(_, p)| !p.inactive.is_empty()).map(|(k, _)| *k).collect();
        let before = *writes;
        for k in keys {
            if let Some(mut p) = self.mirror.take_frontend(&k) {
                self.release_spare(&mut p, writes);
                self.mirror.put_frontend(k, p);
            }
        }
        tracing::info!(slots_freed = *writes - before, "BACKEND_SLOTS full: freed the spare generations");
    }

    /// Fail closed: a frontend that wants loadBalancerSourceRanges is served only with
    /// exactly those in force (its `SOURCE_RANGES` flag set, every wanted prefix and no
    /// other in the trie). After a failed write that may not hold (typically a full trie:
    /// the old value, without the restriction, would stay open to every source), so its
    /// `SERVICES` entry is removed; it is retried by every pass and served again once the
    /// write succeeds whole. A frontend never served stays unserved.
    fn fail_closed(&mut self, fk: &FrontendKey, entry: &FrontendEntry, err: &StoreError, pass: &mut Pass) {
        if entry.source_ranges.is_empty() {
            return;
        }
        let key = service_key(fk);
        let Some(mut p) = self.mirror.take_frontend(&key) else { return };
        let wanted: BTreeSet<IpPrefix> = entry.source_ranges.iter().copied().collect();
        let in_force = p.value.flags & svc_flags::SOURCE_RANGES != 0 && p.ranges == wanted;
        if p.in_map && !in_force {
            match self.store.del_service(&key) {
                Ok(()) => {
                    pass.writes += 1;
                    p.in_map = false;
                    // Without a SERVICES entry the next write fills generation 0 and takes
                    // `inactive` to be what it holds (`switch_generation`): keep the lists
                    // in that convention.
                    if p.value.generation == 0 {
                        std::mem::swap(&mut p.active, &mut p.inactive);
                        p.value.generation = 1;
                    }
                    warn!(
                        service = %entry.service,
                        frontend = %fk,
                        error = %err,
                        "loadBalancerSourceRanges not in force: frontend no longer served (fail closed) until they are written"
                    );
                }
                Err(e) => error!(
                    service = %entry.service,
                    frontend = %fk,
                    error = %e,
                    "cannot take out a frontend whose loadBalancerSourceRanges are not in force"
                ),
            }
        }
        let ranges_full = matches!(err, StoreError::MapFull { map, .. }
            if *map == proxy_common::map_names::SOURCE_RANGES || *map == proxy_common::map_names::SOURCE_RANGES6);
        if !p.in_map && ranges_full {
            pass.report.unserved_ranges.push((*fk, entry.service.to_string()));
        }
        self.mirror.put_frontend(key, p);
    }

    /// Persist the id marks if the ids handed out reached them (before any of those ids is
    /// written anywhere).
    pub(super) fn persist_id_marks(&mut self, writes: &mut u64) -> Result<(), StoreError> {
        if let Some(marks) = self.ids.marks_due() {
            self.store.put_id_marks(&marks)?;
            *writes += 1;
            self.ids.marks_written(marks);
        }
        Ok(())
    }

    fn new_service_id(&mut self, writes: &mut u64) -> Result<ServiceId, StoreError> {
        let id = self.ids.services.alloc();
        if let Err(e) = self.persist_id_marks(writes) {
            self.ids.services.free(id);
            return Err(e);
        }
        Ok(id)
    }

    fn new_backend_id(&mut self, writes: &mut u64) -> Result<BackendId, StoreError> {
        let id = self.ids.backends.alloc();
        if let Err(e) = self.persist_id_marks(writes) {
            self.ids.backends.free(id);
            return Err(e);
        }
        Ok(id)
    }
}
