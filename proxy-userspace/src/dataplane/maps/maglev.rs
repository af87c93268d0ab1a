//! Where each Maglev frontend's table lives in the `MAGLEV_SLOTS` array: a run of
//! consecutive elements per frontend (`ServiceValue::maglev_base`, `maglev_size`), handed out
//! here so that the datapath reads a new flow's backend with one array lookup.
//!
//! The sync names slots as (frontend id, slot) and never sees the runs: this store places
//! them, and fills `maglev_base` into the `SERVICES` values it writes. A run is taken when a
//! frontend's first slot is written, moved (copied) when a bigger table needs more room (a
//! restart with another `--maglev-table-size`), and given back once none of its slots is
//! left; a run given back is not handed out again for `COOL_OFF`, as a program that read
//! the frontend's previous `SERVICES` value may still be indexing it.
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use proxy_common::{ServiceValue, svc_flags};

/// How long a run given back stays unused: far longer than any program run (microseconds)
/// that read a value naming it.
const COOL_OFF: Duration = Duration::from_secs(1);

/// Index 0 is never handed out: `maglev_base` 0 means "no table".
const FIRST_INDEX: u32 = 1;

/// One frontend's run.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Run {
    base: u32,
    len: u32,
    /// Slots written and not deleted (one bit each); the run goes back at zero.
    live: Vec<u64>,
    live_count: u32,
    /// The run it moved from, given back once a value naming this one is written.
    moved_from: Option<(u32, u32)>,
}

impl Run {
    fn new(base: u32, len: u32) -> Self {
        Run { base, len, live: vec![0; len.div_ceil(64) as usize], live_count: 0, moved_from: None }
    }
    fn set(&mut self, slot: u32) {
        let (w, b) = ((slot / 64) as usize, slot % 64);
        if self.live[w] & (1 << b) == 0 {
            self.live[w] |= 1 << b;
            self.live_count += 1;
        }
    }
    fn clear(&mut self, slot: u32) {
        let (w, b) = ((slot / 64) as usize, slot % 64);
        if let Some(word) = self.live.get_mut(w)
            && *word & (1 << b) != 0
        {
            *word &= !(1 << b);
            self.live_count -= 1;
        }
    }
}

/// Where a slot write goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// Write the element at this index.
    At(u32),
    /// The frontend's table outgrew its run: copy `len` elements from `from` to `to`
    /// first, then write at `index`.
    Moved { from: u32, to: u32, len: u32, index: u32 },
}

/// The runs of `MAGLEV_SLOTS` (`capacity` elements).
#[derive(Debug)]
pub(crate) struct Runs {
    by_service: HashMap<u32, Run>,
    /// Free runs: start -> length, coalesced.
    free: BTreeMap<u32, u32>,
    /// Given back, reusable from the instant recorded.
    cooling: Vec<(Instant, u32, u32)>,
    /// First index never handed out.
    next: u32,
    capacity: u32,
    /// The size of a new table (`--maglev-table-size`): the run a frontend's first slot takes.
    table_size: u32,
}

/// The array has no room for another run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Full;

impl Runs {
    pub(crate) fn new(capacity: u32) -> Self {
        Runs {
            by_service: HashMap::new(),
            free: BTreeMap::new(),
            cooling: Vec::new(),
            next: FIRST_INDEX,
            capacity,
            table_size: crate::model::maglev::DEFAULT_TABLE_SIZE,
        }
    }

    /// The runs the `SERVICES` values read back name (an agent restart): each Maglev value's
    /// `[maglev_base, maglev_base + maglev_size)`, unless it leaves the array or overlaps one
    /// taken before (then the frontend has no run here, the snapshot shows no table, and the
    /// sync writes it afresh into a new one). The gaps between them are free.
    pub(crate) fn read_back<'a>(capacity: u32, values: impl IntoIterator<Item = &'a ServiceValue>) -> Self {
        let mut runs = Runs::new(capacity);
        let mut taken: BTreeMap<u32, u32> = BTreeMap::new();
        for v in values {
            let Some((base, len)) = published(v) else { continue };
            let end = u64::from(base) + u64::from(len);
            let overlaps = taken.range(..base + len).next_back().is_some_and(|(b, l)| b + l > base);
            if end > u64::from(capacity) || overlaps || runs.by_service.contains_key(&v.id) {
                continue;
            }
            let mut run = Run::new(base, len);
            for slot in 0..len {
                run.set(slot);
            }
            taken.insert(base, len);
            runs.by_service.insert(v.id, run);
        }
        let mut at = FIRST_INDEX;
        for (&base, &len) in &taken {
            if base > at {
                runs.free.insert(at, base - at);
            }
            at = base + len;
        }
        runs.next = at;
        runs
    }

    /// New tables get `m` slots.
    pub(crate) fn set_table_size(&mut self, m: u32) {
        self.table_size = m;
    }

    /// Where slot `slot` of frontend `svc_id`'s table goes (taking or moving its run).
    pub(crate) fn place(&mut self, svc_id: u32, slot: u32) -> Result<Place, Full> {
        if let Some(run) = self.by_service.get_mut(&svc_id) {
            if slot < run.len {
                run.set(slot);
                return Ok(Place::At(run.base + slot));
            }
            let (from, old_len, moved_from) = (run.base, run.len, run.moved_from);
            let len = self.table_size.max(slot + 1);
            let to = self.take(len)?;
            let mut new = Run::new(to, len);
            let old = &self.by_service[&svc_id];
            for s in 0..old_len {
                if old.live[(s / 64) as usize] & (1 << (s % 64)) != 0 {
                    new.set(s);
                }
            }
            new.set(slot);
            // A run moved twice before a value named the second: the first goes back now.
            if let Some((b, l)) = moved_from {
                self.give_back(b, l);
            }
            new.moved_from = Some((from, old_len));
            self.by_service.insert(svc_id, new);
            return Ok(Place::Moved { from, to, len: old_len, index: to + slot });
        }
        let len = self.table_size.max(slot + 1);
        let base = self.take(len)?;
        let mut run = Run::new(base, len);
        run.set(slot);
        self.by_service.insert(svc_id, run);
        Ok(Place::At(base + slot))
    }

    /// The index of a slot written before, if any (reads: trace, snapshots).
    pub(crate) fn index(&self, svc_id: u32, slot: u32) -> Option<u32> {
        self.by_service.get(&svc_id).filter(|r| slot < r.len).map(|r| r.base + slot)
    }

    /// Slot `slot` of `svc_id` deleted: its run goes back with its last slot. Nothing to
    /// write: the element is unreachable once no value names it.
    pub(crate) fn remove(&mut self, svc_id: u32, slot: u32) {
        let Some(run) = self.by_service.get_mut(&svc_id) else { return };
        run.clear(slot);
        if run.live_count == 0 {
            let (base, len, moved_from) = (run.base, run.len, run.moved_from);
            self.by_service.remove(&svc_id);
            self.give_back(base, len);
            if let Some((b, l)) = moved_from {
                self.give_back(b, l);
            }
        }
    }

    /// `v` as written to `SERVICES`: its `maglev_base` filled in (0 when it publishes no
    /// table, or its run is missing or too short: random then, never another table). A
    /// value that names a moved run gives the old one back.
    pub(crate) fn fill(&mut self, v: &ServiceValue) -> ServiceValue {
        let mut out = *v;
        out.maglev_base = 0;
        if v.flags & svc_flags::MAGLEV == 0 || v.maglev_size == 0 {
            return out;
        }
        let Some(run) = self.by_service.get_mut(&v.id) else { return out };
        if run.len < v.maglev_size {
            return out;
        }
        out.maglev_base = run.base;
        if let Some((b, l)) = run.moved_from.take() {
            self.give_back(b, l);
        }
        out
    }

    fn give_back(&mut self, base: u32, len: u32) {
        self.cooling.push((Instant::now() + COOL_OFF, base, len));
    }

    /// A free run of `len` elements: the first that fits among those given back (and
    /// cooled off), else past the last one handed out.
    fn take(&mut self, len: u32) -> Result<u32, Full> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.cooling.len() {
            if self.cooling[i].0 <= now {
                let (_, b, l) = self.cooling.swap_remove(i);
                self.insert_free(b, l);
            } else {
                i += 1;
            }
        }
        if let Some((&b, &l)) = self.free.iter().find(|(_, l)| **l >= len) {
            self.free.remove(&b);
            if l > len {
                self.free.insert(b + len, l - len);
            }
            return Ok(b);
        }
        let end = u64::from(self.next) + u64::from(len);
        if end > u64::from(self.capacity) {
            return Err(Full);
        }
        let b = self.next;
        self.next += len;
        Ok(b)
    }

    /// Return `[b, b + l)` to the free runs, merged with its neighbours.
    fn insert_free(&mut self, mut b: u32, mut l: u32) {
        if let Some((&pb, &pl)) = self.free.range(..b).next_back()
            && pb + pl == b
        {
            self.free.remove(&pb);
            b = pb;
            l += pl;
        }
        if let Some(&nl) = self.free.get(&(b + l)) {
            self.free.remove(&(b + l));
            l += nl;
        }
        self.free.insert(b, l);
    }
}

/// The run a value read back names: (base, size) of a Maglev value with a table.
pub(crate) fn published(v: &ServiceValue) -> Option<(u32, u32)> {
    (v.flags & svc_flags::MAGLEV != 0 && v.maglev_size > 0 && v.maglev_base >= FIRST_INDEX)
        .then_some((v.maglev_base, v.maglev_size))
}

/// `SERVICES` values before `maglev_base` (24 bytes).
pub(crate) const LEGACY_VALUE_SIZE: usize = std::mem::offset_of!(ServiceValue, maglev_base);

/// Carry `SERVICES` (or `SERVICES6`) entries of the layout before `maglev_base` over: the
/// new field is 0, so a Maglev frontend's table is unpublished (random selection) until
/// the first sync writes it into a run and publishes it; nothing else changes.
pub(crate) fn copy_legacy_services<K: aya::Pod>(
    old: &aya::maps::Map,
    new: &mut aya::maps::Map,
    _: &crate::dataplane::maps::copy::MapSpec,
    _: &std::path::Path,
) -> Result<crate::dataplane::maps::copy::Copied, aya::maps::MapError> {
    use aya::maps::{HashMap as BpfHash, MapData};

    use crate::dataplane::maps::copy as map_copy;
    let limit = map_copy::bound(old);
    let src = BpfHash::<&MapData, K, [u8; LEGACY_VALUE_SIZE]>::try_from(old)?;
    let mut dst = BpfHash::<&mut MapData, K, ServiceValue>::try_from(new)?;
    map_copy::copy_entries(src.iter(), limit, |(k, bytes)| {
        let mut v = ServiceValue::default();
        // SAFETY: `ServiceValue` is `#[repr(C)]` u32 fields (every bit pattern valid); only
        // the bytes before `maglev_base` are written, where the older layout's fields sit
        // (same order and offsets: the field was appended).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut ServiceValue).cast::<u8>(), bytes.len())
        };
        dst.insert(k, v, map_copy::BPF_NOEXIST)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(id: u32, base: u32, size: u32) -> ServiceValue {
        ServiceValue { id, flags: svc_flags::MAGLEV, maglev_size: size, maglev_base: base, ..Default::default() }
    }

    #[test]
    fn runs_are_disjoint_and_index_0_is_never_handed_out() {
        let mut r = Runs::new(100);
        r.set_table_size(7);
        assert_eq!(r.place(5, 0), Ok(Place::At(1)));
        assert_eq!(r.place(5, 6), Ok(Place::At(7)));
        assert_eq!(r.place(9, 3), Ok(Place::At(8 + 3)));
        assert_eq!(r.fill(&value(5, 0, 7)).maglev_base, 1);
        assert_eq!(r.fill(&value(9, 0, 7)).maglev_base, 8);
        // No table published, or a size the run cannot hold: no base.
        assert_eq!(r.fill(&value(9, 0, 0)).maglev_base, 0);
        assert_eq!(r.fill(&value(9, 0, 11)).maglev_base, 0);
        assert_eq!(r.fill(&value(77, 0, 7)).maglev_base, 0);
    }

    #[test]
    fn a_run_goes_back_with_its_last_slot_and_cools_off() {
        let mut r = Runs::new(16);
        r.set_table_size(7);
        for s in 0..7 {
            r.place(1, s).unwrap();
        }
        for s in 0..7 {
            r.place(2, s).unwrap();
        }
        assert_eq!(r.place(3, 0), Err(Full), "15 of 16 used, index 0 reserved");
        for s in 0..7 {
            r.remove(1, s);
        }
        assert_eq!(r.index(1, 0), None);
        // Still cooling: not handed out at once.
        assert_eq!(r.place(3, 0), Err(Full));
        for c in &mut r.cooling {
            c.0 = Instant::now();
        }
        assert_eq!(r.place(3, 0), Ok(Place::At(1)));
    }

    #[test]
    fn a_bigger_table_moves_its_run_and_the_old_one_goes_back_once_published() {
        let mut r = Runs::new(1000);
        r.set_table_size(7);
        for s in 0..7 {
            r.place(1, s).unwrap();
        }
        r.set_table_size(11);
        assert_eq!(r.place(1, 3), Ok(Place::At(4)), "slots inside the run stay in place");
        assert_eq!(r.place(1, 9), Ok(Place::Moved { from: 1, to: 8, len: 7, index: 17 }));
        assert!(r.cooling.is_empty(), "the old run is still published");
        assert_eq!(r.fill(&value(1, 0, 11)).maglev_base, 8);
        assert_eq!(r.cooling.len(), 1);
    }

    #[test]
    fn read_back_rebuilds_runs_and_free_gaps_and_skips_bad_ones() {
        let values = [
            value(1, 1, 7),
            value(2, 20, 7),
            // Overlaps 2: rewritten elsewhere.
            value(3, 25, 7),
            // Past the array's end.
            value(4, 95, 7),
            ServiceValue { id: 5, ..Default::default() },
        ];
        let mut r = Runs::read_back(100, &values);
        assert_eq!(r.index(1, 6), Some(7));
        assert_eq!(r.index(2, 0), Some(20));
        assert_eq!((r.index(3, 0), r.index(4, 0)), (None, None));
        assert_eq!(r.fill(&value(2, 0, 7)).maglev_base, 20);
        r.set_table_size(7);
        // The gap 8..20 is free, then past 27.
        assert_eq!(r.place(6, 0), Ok(Place::At(8)));
        assert_eq!(r.place(7, 0), Ok(Place::At(27)));
    }
}
