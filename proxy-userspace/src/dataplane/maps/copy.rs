//! How entries move from one map into another of the same layout: the copy functions a
//! migration (`migrate`) picks per map from the catalogue (`catalogue`), generic over the
//! map's `Pod` key and value types and never looking inside them, and the hooks through
//! which the owners of a value rewrite it on the way ([`Upgrade`], [`Legacy`]).
use std::path::Path;

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, lpm_trie::Key},
};

/// `BPF_NOEXIST`: insert only if the key is absent, so a copy never overwrites what the new
/// programs or the agent already wrote into the new map.
pub(crate) const BPF_NOEXIST: u64 = 1;

/// What decides whether a pin can be re-used as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// `bpf_map_type`, as the kernel numbers it.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapSpec {
    pub(crate) fn of_pin(data: &MapData) -> Result<Self, MapError> {
        let i = data.info()?;
        Ok(MapSpec {
            // `MapType` is `#[repr]` over the kernel's numbers.
            map_type: i.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            key_size: i.key_size(),
            value_size: i.value_size(),
            max_entries: i.max_entries(),
            flags: i.map_flags(),
        })
    }

    pub(crate) fn layout_matches(&self, other: &MapSpec) -> bool {
        self.key_size == other.key_size && self.value_size == other.value_size
    }
}

impl std::fmt::Display for MapSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B max_entries {} flags {:#x}",
            type_name(self.map_type),
            self.key_size,
            self.value_size,
            self.max_entries,
            self.flags
        )
    }
}

/// The kernel's name of the map types this project uses (for logs and errors).
pub(crate) fn type_name(t: u32) -> String {
    use aya::maps::MapType as T;
    let known = [
        (T::Hash, "hash"),
        (T::LruHash, "lru_hash"),
        (T::Array, "array"),
        (T::PerCpuHash, "percpu_hash"),
        (T::LruPerCpuHash, "lru_percpu_hash"),
        (T::PerCpuArray, "percpu_array"),
        (T::LpmTrie, "lpm_trie"),
    ];
    known.iter().find(|(k, _)| *k as u32 == t).map(|(_, n)| (*n).to_string()).unwrap_or_else(|| t.to_string())
}

/// Entries one copy pass moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Inserted into the new map.
    pub copied: usize,
    /// Already in the new map (written there since; left as they are).
    pub present: usize,
    /// No room in the new map.
    pub dropped: usize,
}

impl Copied {
    pub(crate) fn add(&mut self, o: Copied) {
        self.copied += o.copied;
        self.present += o.present;
        self.dropped += o.dropped;
    }
}

/// Copies every entry of the old map (its spec given) into the new one.
pub type CopyFn = fn(&Map, &mut Map, &MapSpec) -> Result<Copied, MapError>;

/// Rewrites a value carried over from an older map (`old` describes it): the hook for a map
/// whose entries keep their layout but change meaning between versions. It lives with the
/// code that owns the value's fields (named by the map's catalogue row), never here.
pub trait Upgrade<K, V> {
    fn upgrade(old: &MapSpec, key: &K, value: V) -> V;
}

/// Values carried over as they are.
pub struct AsIs;

impl<K, V> Upgrade<K, V> for AsIs {
    fn upgrade(_: &MapSpec, _: &K, value: V) -> V {
        value
    }
}

/// Copies the entries of an old map of an older layout into the new map (its spec given);
/// the path is the pin of the row's sibling map, where a conversion may place entries
/// (conntrack's unassured flows go to `CT_NEW`).
pub type LegacyCopyFn = fn(&Map, &mut Map, &MapSpec, &Path) -> Result<Copied, MapError>;

/// An older value layout a map is carried over from (an upgrade in place, where the value
/// grew fields). The conversion lives with the code that owns the value's fields.
pub struct Legacy {
    /// The older value size in bytes (the key is unchanged).
    pub value_size: u32,
    /// The map the conversion may also write (pinned beside this one).
    pub sibling: &'static str,
    pub copy: LegacyCopyFn,
}

pub(crate) fn errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// Walk `src` (bounded: a hash map walk restarts when the current key is deleted under it,
/// so a busy map could otherwise keep it going) and `put` each entry.
pub(crate) fn copy_entries<T>(
    src: impl Iterator<Item = Result<T, MapError>>,
    bound: usize,
    mut put: impl FnMut(T) -> Result<(), MapError>,
) -> Result<Copied, MapError> {
    let mut c = Copied::default();
    for item in src.take(bound) {
        match put(item?) {
            Ok(()) => c.copied += 1,
            Err(e) if errno(&e) == Some(libc::EEXIST) => c.present += 1,
            // E2BIG: a plain hash is full; ENOMEM: no-prealloc map out of room; ENOSPC: an
            // LPM trie is full.
            Err(e) if matches!(errno(&e), Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC)) => c.dropped += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(c)
}

pub(crate) fn bound(m: &Map) -> usize {
    let max = match m {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuHashMap(d) | Map::PerCpuLruHashMap(d) | Map::LpmTrie(d) => {
            d.info().map(|i| i.max_entries()).unwrap_or(0)
        }
        _ => 0,
    };
    (max as usize).saturating_mul(2).saturating_add(16)
}

/// HASH and LRU_HASH, in either direction.
pub(crate) fn copy_hash<K: Pod, V: Pod>(old: &Map, new: &mut Map, spec: &MapSpec) -> Result<Copied, MapError> {
    copy_hash_upgraded::<K, V, AsIs>(old, new, spec)
}

/// HASH and LRU_HASH, each value passed through `U` on the way.
pub(crate) fn copy_hash_upgraded<K: Pod, V: Pod, U: Upgrade<K, V>>(
    old: &Map,
    new: &mut Map,
    spec: &MapSpec,
) -> Result<Copied, MapError> {
    let limit = bound(old);
    let src = HashMap::<&MapData, K, V>::try_from(old)?;
    let mut dst = HashMap::<&mut MapData, K, V>::try_from(new)?;
    copy_entries(src.iter(), limit, |(k, v)| dst.insert(k, U::upgrade(spec, &k, v), BPF_NOEXIST))
}

pub(crate) fn copy_percpu_hash<K: Pod, V: Pod>(old: &Map, new: &mut Map, _: &MapSpec) -> Result<Copied, MapError> {
    let limit = bound(old);
    let src = PerCpuHashMap::<&MapData, K, V>::try_from(old)?;
    let mut dst = PerCpuHashMap::<&mut MapData, K, V>::try_from(new)?;
    copy_entries(src.iter(), limit, |(k, v): (K, PerCpuValues<V>)| dst.insert(k, v, BPF_NOEXIST))
}

pub(crate) fn copy_lpm<K: Pod, V: Pod>(old: &Map, new: &mut Map, _: &MapSpec) -> Result<Copied, MapError> {
    let limit = bound(old);
    let src = LpmTrie::<&MapData, K, V>::try_from(old)?;
    let mut dst = LpmTrie::<&mut MapData, K, V>::try_from(new)?;
    copy_entries(src.iter(), limit, |(k, v): (Key<K>, V)| dst.insert(&k, v, BPF_NOEXIST))
}

/// Arrays: indices present in both (a larger array keeps zeroes past the old size).
pub(crate) fn copy_array<V: Pod>(old: &Map, new: &mut Map, _: &MapSpec) -> Result<Copied, MapError> {
    let src = Array::<&MapData, V>::try_from(old)?;
    let mut dst = Array::<&mut MapData, V>::try_from(new)?;
    let n = src.len().min(dst.len());
    let mut c = Copied { dropped: src.len().saturating_sub(n) as usize, ..Copied::default() };
    for i in 0..n {
        dst.set(i, src.get(&i, 0)?, 0)?;
        c.copied += 1;
    }
    Ok(c)
}

pub(crate) fn copy_percpu_array<V: Pod>(old: &Map, new: &mut Map, _: &MapSpec) -> Result<Copied, MapError> {
    let src = PerCpuArray::<&MapData, V>::try_from(old)?;
    let mut dst = PerCpuArray::<&mut MapData, V>::try_from(new)?;
    let n = src.len().min(dst.len());
    let mut c = Copied { dropped: src.len().saturating_sub(n) as usize, ..Copied::default() };
    for i in 0..n {
        dst.set(i, src.get(&i, 0)?, 0)?;
        c.copied += 1;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use aya::maps::MapType as T;

    use super::*;

    #[test]
    fn spec_display_names_the_type() {
        let s = MapSpec { map_type: T::LruHash as u32, key_size: 16, value_size: 32, max_entries: 1024, flags: 0 };
        assert_eq!(s.to_string(), "type lru_hash key 16 B value 32 B max_entries 1024 flags 0x0");
        let other = MapSpec { max_entries: 4096, map_type: T::Hash as u32, ..s };
        assert!(s.layout_matches(&other));
        assert!(!s.layout_matches(&MapSpec { value_size: 40, ..s }));
    }
}
