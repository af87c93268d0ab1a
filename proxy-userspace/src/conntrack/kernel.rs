//! The kernel's conntrack maps of one family (`CONNTRACK` + `CT_NEW` for IPv4, `CONNTRACK6` +
//! `CT_NEW6` for IPv6) as a [`CtTable`] for the garbage collector: one type, generic over
//! the address.
//!
//! Chunks are read with `BPF_MAP_LOOKUP_BATCH` (`bpfsys::map_lookup_batch`: aya 0.14 has
//! no batch operations), a few hundred entries per syscall instead of two syscalls per entry
//! (`get_next_key` + lookup), which is what keeps a pass over a quarter-million-entry table
//! to milliseconds.
use std::{io, path::Path};

use aya::maps::{HashMap, MapData, MapError};
use proxy_common::{CtKey, CtValue};

use crate::conntrack::{Chunk, CtTable};
use crate::dataplane::maps::addr::MapAddr;
use crate::dataplane::maps::ct::{self, Table};
use crate::dataplane::{DataplaneError, paths};

/// Entries asked for per syscall. A hash bucket must fit in one call (ENOSPC otherwise, and
/// we retry larger); buckets hold a handful of entries, so this is plenty.
const BATCH: usize = 512;

pub struct KernelCtTable<A = u32> {
    /// Indexed like [`Table::ALL`]: the assured table, then the unassured one.
    maps: [HashMap<MapData, CtKey<A>, CtValue<A>>; 2],
}

impl<A: MapAddr> KernelCtTable<A>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    /// Open the pinned conntrack maps of this family (`CONNTRACK` and `CT_NEW`, or their
    /// IPv6 twins) of the agent at `root`.
    pub fn open_pinned(root: &Path) -> Result<Self, DataplaneError> {
        let open = |name: &'static str| {
            let path = paths::maps_dir(root).join(name);
            let data = MapData::from_pin(&path).map_err(|e| DataplaneError::from_map(name, e))?;
            aya::maps::Map::from_map_data(data).map_err(|e| DataplaneError::from_map(name, e))
        };
        Self::new(open(A::ct_map(Table::Assured))?, open(A::ct_map(Table::Unassured))?)
    }

    /// From the assured and the unassured map.
    pub fn new(assured: aya::maps::Map, unassured: aya::maps::Map) -> Result<Self, DataplaneError> {
        let typed = |map, name: &'static str| {
            // The unassured table is an LRU (and pins made by an older agent may be): read
            // them as plain hashes, the layout is the same.
            let map = match map {
                aya::maps::Map::LruHashMap(d) => aya::maps::Map::HashMap(d),
                other => other,
            };
            HashMap::try_from(map).map_err(|e| DataplaneError::from_map(name, e))
        };
        Ok(KernelCtTable {
            maps: [typed(assured, A::ct_map(Table::Assured))?, typed(unassured, A::ct_map(Table::Unassured))?],
        })
    }

    /// Capacity of `table` as the kernel has it (not as a flag asked for).
    pub fn capacity(&self, table: Table) -> Result<u32, DataplaneError> {
        let info = self.map_data(table).info().map_err(|e| DataplaneError::from_map(A::ct_map(table), e))?;
        Ok(info.max_entries())
    }

    /// Write `key` -> `value` into `table` (`flags`: `BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`).
    /// Only `takeover` writes entries from user space (adopted and handed-back flows).
    pub fn insert(&mut self, table: Table, key: &CtKey<A>, value: &CtValue<A>, flags: u64) -> Result<(), MapError> {
        self.maps[table.index()].insert(key, value, flags)
    }

    fn map(&self, table: Table) -> &HashMap<MapData, CtKey<A>, CtValue<A>> {
        &self.maps[table.index()]
    }

    fn map_data(&self, table: Table) -> &MapData {
        aya::maps::IterableMap::map(self.map(table))
    }
}

impl<A: MapAddr> CtTable for KernelCtTable<A>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    type Addr = A;
    type Error = DataplaneError;

    fn read_chunk(&mut self, table: Table, cursor: Option<u32>, max: usize) -> Result<Chunk<A>, DataplaneError> {
        let (entries, next) = ct::read_chunk(self.map_data(table), cursor, max.clamp(1, BATCH)).map_err(|source| {
            let context = format!("reading map {} in batches", A::ct_map(table));
            DataplaneError::Io { context, source }
        })?;
        Ok(Chunk { entries, next })
    }

    fn get(&self, table: Table, key: &CtKey<A>) -> Result<Option<CtValue<A>>, DataplaneError> {
        match self.map(table).get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DataplaneError::from_map(A::ct_map(table), e)),
        }
    }

    fn delete(&mut self, table: Table, key: &CtKey<A>) -> Result<bool, DataplaneError> {
        match self.maps[table.index()].remove(key) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(DataplaneError::from_map(A::ct_map(table), e)),
        }
    }
}
