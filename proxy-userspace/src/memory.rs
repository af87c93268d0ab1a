//! What the agent's structures hold on the heap, estimated from their contents (lengths,
//! capacities, the standard collections' layouts), so the bench can report bytes per
//! Service and per endpoint by structure without an instrumented allocator in the agent.
//! The `tests` keep the estimates honest: they must add up to the allocations an
//! instrumented allocator counts for the same pipeline, within 20%.
//!
//! Shared data (`Arc`) is counted once, by the structure that owns it: the source's
//! objects count their `Arc`s; an interned object id is counted where it is created.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    mem::size_of,
    net::IpAddr,
    sync::Arc,
};

/// Bytes a value holds on the heap beyond its own `size_of`.
pub trait HeapSize {
    fn heap_bytes(&self) -> usize;
}

/// Types that hold nothing on the heap.
macro_rules! no_heap {
    ($($t:ty),*) => { $(impl $crate::memory::HeapSize for $t { fn heap_bytes(&self) -> usize { 0 } })* };
}
pub(crate) use no_heap;
no_heap!(bool, u8, u16, u32, u64, usize, i32, i64, IpAddr, std::time::SystemTime, &'static str);

impl HeapSize for String {
    fn heap_bytes(&self) -> usize {
        self.capacity()
    }
}

impl HeapSize for Box<str> {
    fn heap_bytes(&self) -> usize {
        self.len()
    }
}

impl<T: HeapSize> HeapSize for Option<T> {
    fn heap_bytes(&self) -> usize {
        self.as_ref().map_or(0, T::heap_bytes)
    }
}

impl<T: HeapSize> HeapSize for Box<T> {
    fn heap_bytes(&self) -> usize {
        size_of::<T>() + (**self).heap_bytes()
    }
}

impl<T: HeapSize> HeapSize for Vec<T> {
    fn heap_bytes(&self) -> usize {
        self.capacity() * size_of::<T>() + self.iter().map(T::heap_bytes).sum::<usize>()
    }
}

impl<T: HeapSize> HeapSize for Box<[T]> {
    fn heap_bytes(&self) -> usize {
        self.len() * size_of::<T>() + self.iter().map(T::heap_bytes).sum::<usize>()
    }
}

/// An `Arc` this structure owns: its allocation (two counts and the value) and contents.
impl<T: HeapSize> HeapSize for Arc<T> {
    fn heap_bytes(&self) -> usize {
        2 * size_of::<usize>() + size_of::<T>() + (**self).heap_bytes()
    }
}

impl<A: HeapSize, B: HeapSize> HeapSize for (A, B) {
    fn heap_bytes(&self) -> usize {
        self.0.heap_bytes() + self.1.heap_bytes()
    }
}

impl<A: HeapSize, B: HeapSize, C: HeapSize> HeapSize for (A, B, C) {
    fn heap_bytes(&self) -> usize {
        self.0.heap_bytes() + self.1.heap_bytes() + self.2.heap_bytes()
    }
}

/// Entries per B-tree leaf: a node holds up to 11 and splits into 6 + 5, so trees built in
/// order (most of ours) hold about 6 per leaf plus one per parent.
const BTREE_PER_NODE: usize = 7;

/// The nodes of a B-tree of `len` entries of `kv` bytes each: leaves (parent pointer,
/// index, length, 11 slots) and, above them, one internal node (12 edges) per leaf's
/// worth of leaves.
pub fn btree_bytes(len: usize, kv: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let leaf = 16 + 11 * kv;
    let leaves = len.div_ceil(BTREE_PER_NODE);
    let internal = if leaves > 1 { leaves.div_ceil(BTREE_PER_NODE) * (leaf + 12 * size_of::<usize>()) } else { 0 };
    leaves * leaf + internal
}

/// A hashbrown table of `capacity` (what `capacity()` reports) entries of `kv` bytes: a
/// power of two of buckets (capacity is 7/8 of them), each with a control byte, plus one
/// group of trailing control bytes.
pub fn hash_table_bytes(capacity: usize, kv: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets =
        if capacity < 8 { (capacity + 1).next_power_of_two() } else { (capacity * 8 / 7).next_power_of_two() };
    (buckets * kv).next_multiple_of(16) + buckets + 16
}

impl<K: HeapSize, V: HeapSize> HeapSize for BTreeMap<K, V> {
    fn heap_bytes(&self) -> usize {
        btree_bytes(self.len(), size_of::<K>() + size_of::<V>())
            + self.iter().map(|(k, v)| k.heap_bytes() + v.heap_bytes()).sum::<usize>()
    }
}

impl<T: HeapSize> HeapSize for BTreeSet<T> {
    fn heap_bytes(&self) -> usize {
        btree_bytes(self.len(), size_of::<T>()) + self.iter().map(T::heap_bytes).sum::<usize>()
    }
}

impl<K: HeapSize, V: HeapSize, S> HeapSize for HashMap<K, V, S> {
    fn heap_bytes(&self) -> usize {
        hash_table_bytes(self.capacity(), size_of::<(K, V)>())
            + self.iter().map(|(k, v)| k.heap_bytes() + v.heap_bytes()).sum::<usize>()
    }
}

impl<T: HeapSize, S> HeapSize for HashSet<T, S> {
    fn heap_bytes(&self) -> usize {
        hash_table_bytes(self.capacity(), size_of::<T>()) + self.iter().map(T::heap_bytes).sum::<usize>()
    }
}

/// One structure's estimated heap bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    pub structure: &'static str,
    pub bytes: usize,
}

#[cfg(test)]
pub(crate) mod tests;
