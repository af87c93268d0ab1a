//! The pinned maps held against the catalogue: what `ebpf-proxy maps` lists (every row,
//! with its fill), and the check `verify` and `trace` make before they read (every map
//! their catalogue column names is pinned, with this binary's layout), so a missing or
//! older pin is named up front instead of failing half-way through a read.
use std::{os::fd::AsFd, path::Path};

use aya::maps::{MapData, MapError, MapInfo, MapType};
use serde::Serialize;

use super::{
    catalogue::{MAPS, MapDef},
    open_pin,
};
use crate::dataplane::{DataplaneError, kernel::bpfsys, paths};

/// One catalogue row and its pin.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PinnedMap {
    pub name: &'static str,
    /// `IPv4`, `IPv6`, or `both` for the maps the families share.
    pub family: &'static str,
    /// The kernel's map type (`hash`, `lru_hash`, `array`, ...); empty when not pinned.
    #[serde(rename = "type")]
    pub map_type: String,
    /// Entries present: counted for hashes and tries, every index for arrays.
    pub entries: u64,
    pub max_entries: u32,
    /// The flag that sizes it (`max-services`, ...), empty for a fixed size.
    pub sized_by: &'static str,
    pub status: PinStatus,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinStatus {
    Ok,
    /// Not pinned under the root.
    Absent,
    /// Pinned with other key or value sizes than this binary's catalogue says.
    LayoutDiffers {
        pinned: String,
        wanted: String,
    },
}

impl PinnedMap {
    pub fn fill(&self) -> f64 {
        if self.max_entries == 0 { 0.0 } else { self.entries as f64 / f64::from(self.max_entries) }
    }
}

fn family(def: &MapDef) -> &'static str {
    match (def.twin(), def.v6()) {
        (None, _) => "both",
        (Some(_), false) => "IPv4",
        (Some(_), true) => "IPv6",
    }
}

fn sizes(key: u32, value: u32) -> String {
    format!("key {key} B, value {value} B")
}

fn type_name(t: Result<MapType, MapError>) -> String {
    match t {
        Ok(MapType::Hash) => "hash".into(),
        Ok(MapType::LruHash) => "lru_hash".into(),
        Ok(MapType::PerCpuHash) => "percpu_hash".into(),
        Ok(MapType::LruPerCpuHash) => "lru_percpu_hash".into(),
        Ok(MapType::Array) => "array".into(),
        Ok(MapType::PerCpuArray) => "percpu_array".into(),
        Ok(MapType::LpmTrie) => "lpm_trie".into(),
        Ok(other) => format!("{other:?}"),
        Err(_) => "unknown".into(),
    }
}

/// Keys present in a hash or trie, walked by raw key bytes; bounded by `max + 1` steps so
/// a map written to during the walk cannot keep it going.
fn count_keys(data: &MapData, key_size: u32, max: u32) -> Result<u64, DataplaneError> {
    let fd = data.fd().as_fd();
    let (mut key, mut next) = (vec![0u8; key_size as usize], vec![0u8; key_size as usize]);
    let mut n = 0u64;
    let mut first = true;
    while n <= u64::from(max) {
        let more = bpfsys::map_next_key(fd, (!first).then_some(key.as_slice()), &mut next)
            .map_err(|e| DataplaneError::Io { context: "walking a pinned map's keys".into(), source: e })?;
        if !more {
            break;
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(n)
}

/// `def`'s pin under `root`, as `ebpf-proxy maps` shows it.
pub fn inspect(root: &Path, def: &'static MapDef) -> Result<PinnedMap, DataplaneError> {
    let mut row = PinnedMap {
        name: def.name,
        family: family(def),
        map_type: String::new(),
        entries: 0,
        max_entries: 0,
        sized_by: def.size_flag().map(|f| f.name()).unwrap_or(""),
        status: PinStatus::Absent,
    };
    let Some(data) = open_pin(&paths::maps_dir(root), def.name)? else { return Ok(row) };
    let info = data.info().map_err(|e| DataplaneError::from_map(def.name, e))?;
    let map_type = info.map_type();
    let array = matches!(map_type, Ok(MapType::Array | MapType::PerCpuArray));
    row.map_type = type_name(map_type);
    row.max_entries = info.max_entries();
    row.status = layout_status(&info, def);
    row.entries = if array { u64::from(row.max_entries) } else { count_keys(&data, info.key_size(), row.max_entries)? };
    Ok(row)
}

/// Whether the pin's key and value sizes are the ones this binary's catalogue gives `def`.
fn layout_status(info: &MapInfo, def: &MapDef) -> PinStatus {
    let (key, value) = (info.key_size(), info.value_size());
    if (key, value) == (def.layout.key_size, def.layout.value_size) {
        PinStatus::Ok
    } else {
        PinStatus::LayoutDiffers {
            pinned: sizes(key, value),
            wanted: sizes(def.layout.key_size, def.layout.value_size),
        }
    }
}

/// Every catalogue row with its pin under `root`, in catalogue order.
pub fn list(root: &Path) -> Result<Vec<PinnedMap>, DataplaneError> {
    MAPS.iter().map(|def| inspect(root, def)).collect()
}

/// Before a tool reads the pins under `root`: every map `reads` selects (a catalogue
/// column: `trace_seeds`, `verify_reads`) is pinned with this binary's layout.
pub fn check(root: &Path, reads: impl Fn(&MapDef) -> bool) -> Result<(), DataplaneError> {
    let dir = paths::maps_dir(root);
    for def in MAPS.iter().filter(|d| reads(d)) {
        let Some(data) = open_pin(&dir, def.name)? else {
            return Err(DataplaneError::MapNotPinned { map: def.name, path: dir.join(def.name) });
        };
        let info = data.info().map_err(|e| DataplaneError::from_map(def.name, e))?;
        if let PinStatus::LayoutDiffers { pinned, wanted } = layout_status(&info, def) {
            return Err(DataplaneError::StalePin { map: def.name, pinned, wanted });
        }
    }
    Ok(())
}
