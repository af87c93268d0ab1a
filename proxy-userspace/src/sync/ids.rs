//! Service and backend ids as types of their own, so the sync cannot hand a backend id
//! where a service id belongs (both are `u32` in the maps).
//!
//! The maps' key and value structs (proxy-common) keep their `u32` fields: their layout is
//! shared with the eBPF programs. Ids become raw numbers only where they are written to or
//! read from a map (`get`, `From`).
//!
//! Here too: how the sync hands ids out (`IdAlloc`, `Ids`), never twice on the same pins.
use std::{fmt, marker::PhantomData};

use proxy_common::IdMarks;

/// One id type: a `u32` newtype with the conversions the map boundary needs, printed as
/// the bare number (as logs and `ebpf-proxy show` always printed ids).
macro_rules! map_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u32);

        impl $name {
            pub const fn new(raw: u32) -> Self {
                $name(raw)
            }

            /// The number the maps hold.
            pub const fn get(self) -> u32 {
                self.0
            }
        }

        impl From<u32> for $name {
            fn from(raw: u32) -> Self {
                $name(raw)
            }
        }

        impl From<$name> for u32 {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

map_id!(
    /// A service frontend's id: the `ServiceValue::id` its `SERVICES` entry carries, and the
    /// key of its slots, metadata, source ranges and counters.
    ServiceId
);

map_id!(
    /// A backend's id: the key of its `BACKENDS` / `BACKENDS6` entry, what slots point at.
    BackendId
);

/// How far ahead of the ids handed out the persisted high-water mark is moved: one
/// `SYNC_IDS` write per this many new ids, and at most this many ids skipped per restart.
const ID_MARK_AHEAD: u32 = 1024;

/// Allocates 32-bit ids of type `I`, monotonically (wrapping), skipping ids in use, so a
/// freed id is not handed out again soon: stale conntrack or affinity entries of a deleted
/// service then never alias a new one. Across restarts too: `mark` (persisted in
/// `SYNC_IDS` before any id reaching it is handed out) bounds every id handed out on these
/// pins, and a restarted agent resumes there, not at the highest id still live.
#[derive(Debug)]
pub(super) struct IdAlloc<I> {
    next: u32,
    used: crate::hashing::HashSet<u32>,
    /// The persisted high-water mark: every id handed out is below it.
    mark: u32,
    id: PhantomData<I>,
}

// Not derived: a derive would require `I: Default`, which ids have no use for.
impl<I> Default for IdAlloc<I> {
    fn default() -> Self {
        IdAlloc { next: 0, used: Default::default(), mark: 0, id: PhantomData }
    }
}

impl<I: Copy + From<u32> + Into<u32>> IdAlloc<I> {
    /// The allocator of ids read back: those in use are taken, and it continues after the
    /// mark an earlier agent persisted (ids below it may have been handed out and released
    /// while entries still name them).
    fn read_back(in_use: impl IntoIterator<Item = I>, mark: u32) -> Self {
        let mut a = IdAlloc::default();
        for id in in_use {
            a.reserve(id);
        }
        a.next = a.next.max(mark);
        a.mark = mark;
        a
    }
    fn reserve(&mut self, id: I) {
        let id: u32 = id.into();
        self.used.insert(id);
        if id >= self.next {
            self.next = id.wrapping_add(1);
        }
    }
    /// Room for `more` ids without growing.
    pub(super) fn make_room(&mut self, more: usize) {
        self.used.reserve(more);
    }
    pub(super) fn alloc(&mut self) -> I {
        loop {
            // 0 is never used so a zeroed value is recognisably unset.
            let id = self.next.max(1);
            self.next = id.wrapping_add(1);
            if self.used.insert(id) {
                return I::from(id);
            }
        }
    }
    pub(super) fn free(&mut self, id: I) {
        self.used.remove(&id.into());
    }
    /// The ids handed out reached the persisted mark: it must move before they are used.
    /// (After 2^32 ids the counter wraps, as it always did.)
    fn mark_needed(&self) -> bool {
        self.next > self.mark
    }
    /// The next mark: `ID_MARK_AHEAD` ids ahead, never behind the current one.
    fn mark_ahead(&self) -> u32 {
        self.next.saturating_add(ID_MARK_AHEAD).max(self.mark)
    }
}

/// The sync's two allocators, whose marks are persisted together (one `SYNC_IDS` value).
#[derive(Debug, Default)]
pub(super) struct Ids {
    pub(super) services: IdAlloc<ServiceId>,
    pub(super) backends: IdAlloc<BackendId>,
}

impl Ids {
    /// The allocators of what the maps hold: `services` and `backends` are the ids in use,
    /// `marks` what an earlier agent persisted.
    pub(super) fn read_back(
        services: impl IntoIterator<Item = ServiceId>,
        backends: impl IntoIterator<Item = BackendId>,
        marks: IdMarks,
    ) -> Self {
        Ids {
            services: IdAlloc::read_back(services, marks.next_service_id),
            backends: IdAlloc::read_back(backends, marks.next_backend_id),
        }
    }

    /// The marks to persist before the ids handed out are used, if those reached the
    /// current ones. Both move ahead in the one write (new services usually bring new
    /// backends).
    pub(super) fn marks_due(&self) -> Option<IdMarks> {
        (self.services.mark_needed() || self.backends.mark_needed()).then(|| IdMarks {
            next_service_id: self.services.mark_ahead(),
            next_backend_id: self.backends.mark_ahead(),
        })
    }

    /// `marks` are persisted.
    pub(super) fn marks_written(&mut self, marks: IdMarks) {
        self.services.mark = marks.next_service_id;
        self.backends.mark = marks.next_backend_id;
    }
}

impl Ids {
    /// Estimated heap bytes of the ids in use (`crate::memory`).
    pub(super) fn heap_bytes(&self) -> usize {
        use crate::memory::HeapSize;
        self.services.used.heap_bytes() + self.backends.used.heap_bytes()
    }
}
