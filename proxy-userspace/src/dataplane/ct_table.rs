//! The kernel's `CONNTRACK` map as a [`CtTable`] for the garbage collector.
//!
//! Chunks are read with `BPF_MAP_LOOKUP_BATCH`, a few hundred entries per syscall instead of
//! two syscalls per entry (`get_next_key` + lookup), which is what keeps a pass over a
//! quarter-million-entry table to milliseconds. aya 0.14 has no batch operations, so this is
//! the one raw `bpf(2)` call of the agent. The batch cursor of a hash map is a bucket index:
//! deleting entries between calls does not make the walk restart or skip buckets.
use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::maps::{HashMap, MapData, MapError};
use proxy_common::{CtKey, CtValue, map_names as n};

use super::{DataplaneError, paths};
use crate::conntrack::{Chunk, CtTable};

/// `enum bpf_cmd`: BPF_MAP_LOOKUP_BATCH.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per syscall. A hash bucket must fit in one call (ENOSPC otherwise, and
/// we retry larger); buckets hold a handful of entries, so this is plenty.
const BATCH: usize = 512;

/// `union bpf_attr`, the `batch` member used by the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

pub struct KernelCtTable {
    map: HashMap<MapData, CtKey, CtValue>,
}

impl KernelCtTable {
    /// Open the pinned CONNTRACK map of the agent at `root`.
    pub fn open_pinned(root: &Path) -> Result<Self, DataplaneError> {
        let path = paths::maps_dir(root).join(n::CONNTRACK);
        let data = MapData::from_pin(&path).map_err(|e| DataplaneError::from_map(n::CONNTRACK, e))?;
        let map = aya::maps::Map::from_map_data(data).map_err(|e| DataplaneError::from_map(n::CONNTRACK, e))?;
        Self::new(map)
    }

    pub fn new(map: aya::maps::Map) -> Result<Self, DataplaneError> {
        // Pins made by an older agent are LRU maps of the same layout: read them the same way.
        let map = match map {
            aya::maps::Map::LruHashMap(d) => aya::maps::Map::HashMap(d),
            other => other,
        };
        let map = HashMap::try_from(map).map_err(|e| DataplaneError::from_map(n::CONNTRACK, e))?;
        Ok(KernelCtTable { map })
    }

    /// Capacity of the map as the kernel has it (not as a flag asked for).
    pub fn capacity(&self) -> Result<u32, DataplaneError> {
        let info = self.map_data().info().map_err(|e| DataplaneError::from_map(n::CONNTRACK, e))?;
        Ok(info.max_entries())
    }

    fn map_data(&self) -> &MapData {
        aya::maps::IterableMap::map(&self.map)
    }

    fn lookup_batch(&self, cursor: Option<u32>, count: usize) -> io::Result<(Vec<(CtKey, CtValue)>, Option<u32>)> {
        let mut keys = vec![CtKey::default_key(); count];
        let mut values = vec![CtValue::<u32>::default(); count];
        let in_batch = cursor.unwrap_or(0);
        let mut out_batch = 0u32;
        let mut attr = BatchAttr {
            in_batch: if cursor.is_some() { &in_batch as *const u32 as u64 } else { 0 },
            out_batch: &mut out_batch as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: count as u32,
            map_fd: self.map_data().fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` describes buffers we own of `count` keys and values of the map's
        // key and value sizes (checked by aya when the typed map was built), and a u32 batch
        // token (the hash map's bucket index); the kernel writes at most that much.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
        };
        let n = attr.count as usize;
        let done = if rc < 0 {
            let err = io::Error::last_os_error();
            // ENOENT: the walk reached the end (the last entries are in this answer).
            if err.raw_os_error() != Some(libc::ENOENT) {
                return Err(err);
            }
            true
        } else {
            false
        };
        keys.truncate(n);
        values.truncate(n);
        Ok((keys.into_iter().zip(values).collect(), if done { None } else { Some(out_batch) }))
    }
}

trait DefaultKey {
    fn default_key() -> Self;
}

impl DefaultKey for CtKey {
    fn default_key() -> Self {
        CtKey { src_addr: 0, dst_addr: 0, src_port: 0, dst_port: 0, proto: 0, dir: 0, _pad: 0 }
    }
}

impl CtTable for KernelCtTable {
    type Error = DataplaneError;

    fn read_chunk(&mut self, cursor: Option<u32>, max: usize) -> Result<Chunk, DataplaneError> {
        let mut want = max.clamp(1, BATCH);
        loop {
            match self.lookup_batch(cursor, want) {
                Ok((entries, next)) => return Ok(Chunk { entries, next }),
                // One bucket holds more entries than we asked for: ask for more.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && want < 1 << 16 => want *= 4,
                Err(source) => {
                    return Err(DataplaneError::Io { context: format!("reading map {} in batches", n::CONNTRACK), source });
                }
            }
        }
    }

    fn get(&self, key: &CtKey) -> Result<Option<CtValue>, DataplaneError> {
        match self.map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DataplaneError::from_map(n::CONNTRACK, e)),
        }
    }

    fn delete(&mut self, key: &CtKey) -> Result<bool, DataplaneError> {
        match self.map.remove(key) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(DataplaneError::from_map(n::CONNTRACK, e)),
        }
    }
}
