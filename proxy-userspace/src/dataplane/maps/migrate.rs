//! Pinned maps whose definition changed since they were created (`--max-*` flags, a map type
//! such as LRU_HASH -> HASH, flags) are migrated instead of silently re-used.
//!
//! `aya` re-uses a pin by name whatever its size or type, so the loader compares every pin
//! with what the object declares (with the configured sizes) *before* loading:
//!
//! 1. equal: re-used as before;
//! 2. key or value size differs: the entries cannot be carried over, start is refused
//!    ([`DataplaneError::IncompatiblePin`]) naming the map and how to proceed, unless the
//!    map's catalogue row names that older layout ([`Legacy`]: a value that grew fields), in
//!    which case it is migrated as in 3 with the row's conversion;
//! 3. anything else differs: the old pin is moved aside to `<root>/migrating/<NAME>-<id>`
//!    (we keep its fd), the loader creates and pins the new map, and every live entry is
//!    copied old -> new ([`Migration::copy_pass`]). Programs keep running on the old maps until
//!    the attach step swaps the new programs into the pinned links; then a second pass copies,
//!    insert-if-absent, what the old programs created in between (datapath-written maps
//!    only), and the old map is unpinned ([`Migration::finish`]).
//!
//! Keeping the old map pinned (aside) rather than only holding its fd makes an interrupted
//! migration resumable: a later start finds `<root>/migrating/<NAME>-*` and copies from it
//! too. The copy is generic over the map's `Pod` key and value types (chosen by the map's row
//! in the catalogue, `super::catalogue`, with its policy); it never looks inside them.
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    time::Instant,
};

use aya::maps::{Map, MapData, MapError};
use tracing::{info, warn};

// The copy side is `super::copy`; `MapSpec` is named here too, where migrations report it.
pub use crate::dataplane::maps::copy::MapSpec;
use crate::dataplane::{
    DataplaneError,
    maps::catalogue::{self, MapDef, Policy},
    maps::copy::{Copied, CopyFn, Legacy, errno, type_name},
    paths,
};

/// How one map is carried over: its catalogue row's copy function and [`Policy`].
#[derive(Clone, Copy)]
struct Kind {
    name: &'static str,
    repeat: bool,
    must_fit: bool,
    copy: CopyFn,
    legacy: Option<&'static Legacy>,
}

impl Kind {
    fn of(m: &'static MapDef, p: &'static Policy) -> Self {
        Kind { name: m.name, repeat: p.repeat, must_fit: p.must_fit, copy: m.layout.copy, legacy: p.legacy.as_ref() }
    }
}

/// A map a migration can carry over (its catalogue row has a [`Policy`]).
fn kind(name: &str) -> Option<Kind> {
    catalogue::get(name).and_then(|m| m.migrate.as_ref().map(|p| Kind::of(m, p)))
}

/// Whether a map changed type only within one family, so that one copy function reads the
/// old and writes the new (LRU_HASH <-> HASH and the like).
fn same_family(a: u32, b: u32) -> bool {
    use aya::maps::MapType as T;
    let family = |t: u32| -> u32 {
        match t {
            x if x == T::LruHash as u32 => T::Hash as u32,
            x if x == T::LruPerCpuHash as u32 => T::PerCpuHash as u32,
            x => x,
        }
    };
    family(a) == family(b)
}

/// One map being migrated.
struct Pending {
    kind: Kind,
    /// The old map (its fd keeps it alive; the old programs still use it).
    old: Map,
    old_spec: MapSpec,
    new_spec: MapSpec,
    /// The old map has the row's older layout: copied with its conversion.
    legacy: bool,
    /// Where the old map is pinned aside.
    aside: PathBuf,
    /// Moved aside by this start (a rollback moves it back); false for a leftover of an
    /// interrupted earlier migration.
    moved_now: bool,
    first: Copied,
    second: Copied,
}

/// A migration decided by `prepare`, before any pin is moved.
struct Planned {
    kind: Kind,
    data: MapData,
    old_spec: MapSpec,
    new_spec: MapSpec,
    legacy: bool,
    aside: PathBuf,
    /// The pin to move aside (None: already aside, from an interrupted migration).
    move_from: Option<PathBuf>,
}

/// What one finished migration did (also logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migrated {
    pub map: &'static str,
    pub old: MapSpec,
    pub new: MapSpec,
    /// Entries copied before the new programs were attached.
    pub copied: usize,
    /// Entries the old programs created in between, copied after the swap.
    pub copied_after_swap: usize,
    /// Entries that did not fit into the new map.
    pub dropped: usize,
}

/// Pinned maps being migrated by this start. Empty when every pin matched.
#[derive(Default)]
pub struct Migration {
    root: PathBuf,
    pending: Vec<Pending>,
}

fn pin_err(map: &str, path: &Path, e: MapError) -> DataplaneError {
    match e {
        MapError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
            DataplaneError::Permission { path: path.to_path_buf() }
        }
        MapError::SyscallError(s) => {
            DataplaneError::Io { context: format!("pinned map {map} ({})", path.display()), source: s.io_error }
        }
        e => DataplaneError::Io {
            context: format!("pinned map {map} ({})", path.display()),
            source: io::Error::other(e.to_string()),
        },
    }
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> DataplaneError {
    move |source| DataplaneError::Io { context, source }
}

/// Open a pin; `None` when there is none.
fn open_pin(map: &str, path: &Path) -> Result<Option<MapData>, DataplaneError> {
    match MapData::from_pin(path) {
        Ok(d) => Ok(Some(d)),
        Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(pin_err(map, path, e)),
    }
}

/// Remove the pins of maps no program of this release uses (`catalogue::RETIRED`); the old
/// programs, if any still run, keep theirs until they are gone.
fn unpin_retired(maps_dir: &Path) {
    for name in catalogue::RETIRED {
        let pin = maps_dir.join(name);
        match std::fs::remove_file(&pin) {
            Ok(()) => info!(map = *name, pin = %pin.display(), "unpinned a map this release no longer uses"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(map = *name, pin = %pin.display(), error = %e, "cannot unpin a retired map"),
        }
    }
}

impl Migration {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Names of the maps being migrated.
    pub fn maps(&self) -> Vec<&'static str> {
        self.pending.iter().map(|p| p.kind.name).collect()
    }

    /// Before loading: compare each pin under `<root>/maps` with `declared`. Refuses (and
    /// changes nothing) when a layout is incompatible, or when a map whose catalogue row has
    /// no migration policy differs; otherwise moves each differing pin aside so the loader creates the
    /// new map in its place.
    pub fn prepare(root: &Path, declared: &BTreeMap<String, MapSpec>) -> Result<Self, DataplaneError> {
        let maps_dir = paths::maps_dir(root);
        let aside_dir = paths::migrating_dir(root);
        // Leftovers of an interrupted migration: copied from as well.
        let mut leftovers: Vec<(&'static str, PathBuf)> = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&aside_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(k) = name.rsplit_once('-').and_then(|(m, _)| kind(m)) else { continue };
                leftovers.push((k.name, e.path()));
            }
        }
        // Phase 1: decide everything (errors leave the pins untouched).
        let mut plan: Vec<Planned> = Vec::new();
        for (name, want) in declared {
            let name = name.as_str();
            let main = maps_dir.join(name);
            let mut olds: Vec<(MapData, PathBuf, bool)> = Vec::new();
            if let Some(data) = open_pin(name, &main)? {
                olds.push((data, main.clone(), true));
            }
            for (_, p) in leftovers.iter().filter(|(m, _)| *m == name) {
                if let Some(data) = open_pin(name, p)? {
                    olds.push((data, p.clone(), false));
                }
            }
            for (data, path, is_main) in olds {
                let have = MapSpec::of_pin(&data).map_err(|e| pin_err(name, &path, e))?;
                if is_main && have == *want {
                    continue;
                }
                let legacy = kind(name).and_then(|k| k.legacy).is_some_and(|l| {
                    have.key_size == want.key_size
                        && have.value_size == l.value_size
                        && have.value_size != want.value_size
                });
                let Some(k) = kind(name)
                    .filter(|_| (legacy || have.layout_matches(want)) && same_family(have.map_type, want.map_type))
                else {
                    return Err(DataplaneError::IncompatiblePin {
                        map: name.to_string(),
                        path,
                        pinned: have.to_string(),
                        wanted: want.to_string(),
                        root: root.to_path_buf(),
                    });
                };
                let id = data.info().map(|i| i.id()).unwrap_or(0);
                let (aside, move_from) =
                    if is_main { (aside_dir.join(format!("{name}-{id}")), Some(path)) } else { (path, None) };
                plan.push(Planned { kind: k, data, old_spec: have, new_spec: *want, legacy, aside, move_from });
            }
        }
        // Phase 2: move the pins aside.
        let mut m = Migration { root: root.to_path_buf(), pending: Vec::new() };
        for Planned { kind, data, old_spec, new_spec, legacy, aside, move_from } in plan {
            if let Some(from) = &move_from {
                let moved = std::fs::create_dir_all(&aside_dir)
                    .and_then(|()| std::fs::rename(from, &aside))
                    .map_err(io_err(format!("moving {} aside to {}", from.display(), aside.display())));
                if let Err(e) = moved {
                    m.rollback();
                    return Err(e);
                }
                info!(
                    map = kind.name,
                    old = %old_spec,
                    new = %new_spec,
                    legacy,
                    aside = %aside.display(),
                    "pinned map differs from the configuration: migrating its entries to a new map"
                );
            } else {
                info!(map = kind.name, aside = %aside.display(), "resuming an interrupted migration");
            }
            let old = match Map::from_map_data(data) {
                Ok(o) => o,
                Err(e) => {
                    m.rollback();
                    return Err(DataplaneError::from_map(kind.name, e));
                }
            };
            m.pending.push(Pending {
                kind,
                old,
                old_spec,
                new_spec,
                legacy,
                aside,
                moved_now: move_from.is_some(),
                first: Copied::default(),
                second: Copied::default(),
            });
        }
        Ok(m)
    }

    /// Copy old -> new (insert-if-absent). The first pass covers every map and checks that
    /// the agent's maps fit; later passes cover the maps the datapath writes.
    pub fn copy_pass(&mut self, first: bool) -> Result<(), DataplaneError> {
        let maps_dir = paths::maps_dir(&self.root);
        for p in &mut self.pending {
            if !first && !p.kind.repeat {
                continue;
            }
            let path = maps_dir.join(p.kind.name);
            let data = open_pin(p.kind.name, &path)?.ok_or_else(|| DataplaneError::NotPinned { path: path.clone() })?;
            let mut new = Map::from_map_data(data).map_err(|e| DataplaneError::from_map(p.kind.name, e))?;
            let c = match p.kind.legacy.filter(|_| p.legacy) {
                Some(l) => (l.copy)(&p.old, &mut new, &p.old_spec, &maps_dir.join(l.sibling)),
                None => (p.kind.copy)(&p.old, &mut new, &p.old_spec),
            }
            .map_err(|e| DataplaneError::from_map(p.kind.name, e))?;
            if first {
                p.first.add(c);
                if p.kind.must_fit && c.dropped > 0 {
                    return Err(DataplaneError::MapTooSmall {
                        map: p.kind.name,
                        entries: c.copied + c.present + c.dropped,
                        max_entries: p.new_spec.max_entries,
                        flag: catalogue::size_flag(p.kind.name),
                    });
                }
            } else {
                p.second.add(c);
            }
        }
        Ok(())
    }

    /// Undo `prepare` after a failed start, before any program was attached: the new pins
    /// are removed and the old ones put back, so the next start sees what this one saw.
    pub fn rollback(&mut self) {
        let maps_dir = paths::maps_dir(&self.root);
        for p in self.pending.drain(..) {
            if !p.moved_now {
                continue;
            }
            let main = maps_dir.join(p.kind.name);
            let _ = std::fs::remove_file(&main);
            if let Err(e) = std::fs::rename(&p.aside, &main) {
                warn!(map = p.kind.name, aside = %p.aside.display(), error = %e, "cannot move the old map back");
            }
        }
        let _ = std::fs::remove_dir(paths::migrating_dir(&self.root));
    }

    /// After the new programs replaced the old ones in every pinned link: copy what the old
    /// programs created in between, then unpin and drop the old maps. Returns (and logs)
    /// what each map migration did.
    pub fn finish(mut self) -> Result<Vec<Migrated>, DataplaneError> {
        unpin_retired(&paths::maps_dir(&self.root));
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let t = Instant::now();
        self.copy_pass(false)?;
        let mut out = Vec::new();
        for p in self.pending.drain(..) {
            if let Err(e) = std::fs::remove_file(&p.aside) {
                warn!(map = p.kind.name, aside = %p.aside.display(), error = %e, "cannot unpin the old map");
            }
            let dropped = p.first.dropped + p.second.dropped;
            let m = Migrated {
                map: p.kind.name,
                old: p.old_spec,
                new: p.new_spec,
                copied: p.first.copied,
                copied_after_swap: p.second.copied,
                dropped,
            };
            let log = |m: &Migrated| {
                info!(
                    map = m.map,
                    old_type = %type_name(m.old.map_type),
                    new_type = %type_name(m.new.map_type),
                    old_max_entries = m.old.max_entries,
                    new_max_entries = m.new.max_entries,
                    entries_copied = m.copied,
                    entries_copied_after_swap = m.copied_after_swap,
                    entries_dropped = m.dropped,
                    "migrated pinned map"
                )
            };
            if dropped > 0 {
                warn!(map = m.map, entries_dropped = dropped, "the new map is smaller than the live entries");
            }
            log(&m);
            out.push(m);
            // `p.old` drops here: the old map is freed once no program uses it.
        }
        let _ = std::fs::remove_dir(paths::migrating_dir(&self.root));
        info!(maps = out.len(), duration_ms = t.elapsed().as_secs_f64() * 1e3, "map migration finished");
        Ok(out)
    }
}

impl Drop for Migration {
    /// A migration dropped unfinished (the agent stopped before attaching) keeps the old maps
    /// pinned aside, so the next start resumes it.
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            warn!(maps = ?self.maps(), "map migration not finished; the next start resumes it");
        }
    }
}

#[cfg(test)]
mod tests {
    use aya::maps::MapType as T;
    use proxy_common::{CtValue, CtValue6, map_names as n};

    use super::*;

    #[test]
    fn hash_flavours_are_one_family() {
        assert!(same_family(T::LruHash as u32, T::Hash as u32));
        assert!(same_family(T::Hash as u32, T::LruHash as u32));
        assert!(same_family(T::PerCpuHash as u32, T::LruPerCpuHash as u32));
        assert!(!same_family(T::Hash as u32, T::Array as u32));
        assert!(!same_family(T::Hash as u32, T::PerCpuHash as u32));
    }

    #[test]
    fn every_map_has_one_migration_entry() {
        // The agent's maps must fit; datapath state is best effort and copied again.
        assert!(kind(n::SERVICES).is_some_and(|k| k.must_fit && !k.repeat));
        assert!(kind(n::CONNTRACK).is_some_and(|k| !k.must_fit && k.repeat));
        assert!(kind(n::SERVICES6).is_some_and(|k| k.must_fit && !k.repeat));
        assert!(kind(n::CONNTRACK6).is_some_and(|k| !k.must_fit && k.repeat));
    }

    /// The conntrack tables can be carried over from the layout before the assured table:
    /// the older value is the new one's prefix up to `ifindex`.
    #[test]
    fn conntrack_has_its_older_layout() {
        use std::mem::{offset_of, size_of};
        let old = |name| kind(name).and_then(|k| k.legacy).map(|l| l.value_size);
        assert_eq!(old(n::CONNTRACK), Some(32));
        assert_eq!(old(n::CONNTRACK6), Some(56));
        assert_eq!(offset_of!(CtValue, ifindex), 32);
        assert_eq!(offset_of!(CtValue6, ifindex), 56);
        assert!(size_of::<CtValue>() > 32 && size_of::<CtValue6>() > 56);
        // The frontends' values before `maglev_base` (the Maglev array): its prefix.
        assert_eq!(old(n::SERVICES), Some(24));
        assert_eq!(old(n::SERVICES6), Some(24));
        assert_eq!(offset_of!(proxy_common::ServiceValue, maglev_base), 24);
        assert_eq!(old(n::BACKENDS), None);
    }
}
