//! Keeping the datapath in place under a running agent: someone may remove the pins (`rm -rf`
//! of the root, a careless cleanup) or detach the links. Links are pinned and the pin is
//! their only reference, so removing a link's pin detaches it; maps live on while programs
//! use them, but the CLI and the next agent would no longer find them.
//!
//! The guard holds its own fd of every pinned map (opened at start), so it can pin them
//! again where they were, and the root's lock, which it takes again on a re-created root. It
//! asks the kernel whether our programs are still attached where the agent attached them;
//! re-attaching is the attacher's (it owns the programs).
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use aya::maps::MapData;

use crate::dataplane::{
    DataplaneError,
    attach::ownership::Iface,
    kernel::bpfsys::{self, BPF_TCX_EGRESS, BPF_TCX_INGRESS},
    lock::RootLock,
    maps::loader::{PROG_FROM_POD, PROG_FROM_UPLINK, PROG_TO_POD, PROG_TO_UPLINK, PROG_UPLINK_HANDOFF, Programs},
    paths,
};

/// The kernel ids of the programs this agent loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OurPrograms {
    pub from_pod: u32,
    pub to_pod: u32,
    pub from_uplink: u32,
    pub to_uplink: u32,
    pub uplink_handoff: u32,
}

impl OurPrograms {
    pub fn of(programs: &Programs) -> Result<Self, DataplaneError> {
        let id = |name: &'static str| -> Result<u32, DataplaneError> {
            let p = programs.ebpf.program(name).ok_or(DataplaneError::MissingObject(name))?;
            p.info().map(|i| i.id()).map_err(|source| DataplaneError::Program { program: name, source })
        };
        Ok(OurPrograms {
            from_pod: id(PROG_FROM_POD)?,
            to_pod: id(PROG_TO_POD)?,
            from_uplink: id(PROG_FROM_UPLINK)?,
            to_uplink: id(PROG_TO_UPLINK)?,
            uplink_handoff: id(PROG_UPLINK_HANDOFF)?,
        })
    }

    pub fn ids(&self) -> HashSet<u32> {
        [self.from_pod, self.to_pod, self.from_uplink, self.to_uplink, self.uplink_handoff].into()
    }

    /// What is wrong with `iface` (attached by us as a pod interface or an uplink), if
    /// anything: each of our programs must be on its hook.
    pub fn check_iface(&self, iface: &Iface, uplink: bool) -> Result<(), String> {
        let tcx = |at: u32| bpfsys::tcx_query(iface.index, at).unwrap_or_default();
        let has = |at: u32, id: u32| tcx(at).iter().any(|(p, _)| *p == id);
        let missing: Vec<&str> = if uplink {
            [
                (iface.xdp_prog != Some(self.from_uplink)).then_some("xdp from_uplink"),
                (!has(BPF_TCX_EGRESS, self.to_uplink)).then_some("tcx egress to_uplink"),
                (!has(BPF_TCX_INGRESS, self.uplink_handoff)).then_some("tcx ingress uplink_handoff"),
            ]
            .into_iter()
            .flatten()
            .collect()
        } else {
            [
                (!has(BPF_TCX_INGRESS, self.from_pod)).then_some("tcx ingress from_pod"),
                (!has(BPF_TCX_EGRESS, self.to_pod)).then_some("tcx egress to_pod"),
            ]
            .into_iter()
            .flatten()
            .collect()
        };
        if missing.is_empty() { Ok(()) } else { Err(format!("{}: not attached: {}", iface.name, missing.join(", "))) }
    }
}

pub struct DatapathGuard {
    root: PathBuf,
    lock: RootLock,
    maps: Vec<(PathBuf, MapData)>,
}

impl DatapathGuard {
    /// Open every map pinned under `root` (call right after loading).
    pub fn new(root: &Path, lock: RootLock) -> Result<Self, DataplaneError> {
        let dir = paths::maps_dir(root);
        let rd = std::fs::read_dir(&dir)
            .map_err(|source| DataplaneError::Io { context: format!("reading {}", dir.display()), source })?;
        let mut maps = Vec::new();
        for e in rd.flatten() {
            let path = e.path();
            match MapData::from_pin(&path) {
                Ok(m) => maps.push((path, m)),
                // Not a map (a directory, another object): not ours to keep pinned, and no
                // reason to refuse to start.
                Err(error) => {
                    tracing::debug!(path = %path.display(), error = %error, "not a map pin; the datapath check ignores it")
                }
            }
        }
        if maps.is_empty() {
            return Err(DataplaneError::NotPinned { path: dir });
        }
        maps.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(DatapathGuard { root: root.to_path_buf(), lock, maps })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Pins that are missing, and a lost lock.
    pub fn check_pins(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .maps
            .iter()
            .filter(|(p, _)| !p.exists())
            .map(|(p, _)| format!("map pin {} missing", p.display()))
            .collect();
        if !self.lock.still_held() {
            out.push(format!("{} was removed or replaced (lock lost)", self.root.display()));
        }
        out
    }

    /// Re-create the directories, take the lock again, and pin the maps where they were.
    /// Returns what was done (for the log) and what failed.
    pub fn restore_pins(&mut self) -> (Vec<String>, Vec<String>) {
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        for d in [paths::maps_dir(&self.root), paths::links_dir(&self.root)] {
            if !d.exists() {
                match std::fs::create_dir_all(&d) {
                    Ok(()) => done.push(format!("re-created {}", d.display())),
                    Err(e) => failed.push(format!("creating {}: {e}", d.display())),
                }
            }
        }
        if !self.lock.still_held() {
            match self.lock.relock() {
                Ok(()) => done.push(format!("locked {} again", self.root.display())),
                Err(e) => failed.push(e.to_string()),
            }
        }
        for (path, map) in &self.maps {
            if path.exists() {
                continue;
            }
            match map.pin(path) {
                Ok(()) => done.push(format!("re-pinned {}", path.display())),
                Err(e) => failed.push(format!("re-pinning {}: {e}", path.display())),
            }
        }
        (done, failed)
    }
}
