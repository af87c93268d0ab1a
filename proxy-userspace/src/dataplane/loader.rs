//! Load the embedded eBPF object: maps pinned by name under `<root>/maps` (re-used when
//! already pinned, so a restart keeps services and conntrack), programs verified and loaded.
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, Xdp},
};
use proxy_common::map_names as n;

use super::{DataplaneError, EBPF_OBJECT, maps::Maps, paths};

/// Program names in the object.
pub const PROG_FROM_POD: &str = "from_pod";
pub const PROG_TO_POD: &str = "to_pod";
/// XDP on the uplink (north-south service traffic).
pub const PROG_FROM_UPLINK: &str = "from_uplink";
/// TC egress of the uplink (reverse NAT of replies from local backends).
pub const PROG_TO_UPLINK: &str = "to_uplink";

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub bpffs_root: PathBuf,
    pub max_services: u32,
    pub max_backends: u32,
    pub max_conntrack: u32,
}

impl LoaderConfig {
    pub fn new(bpffs_root: impl Into<PathBuf>) -> Self {
        LoaderConfig {
            bpffs_root: bpffs_root.into(),
            max_services: proxy_common::sizes::MAX_SERVICES,
            max_backends: proxy_common::sizes::MAX_BACKENDS,
            max_conntrack: proxy_common::sizes::MAX_CONNTRACK,
        }
    }
}

/// Loaded programs (the maps are handed out separately, see [`Maps`]).
pub struct Programs {
    pub ebpf: Ebpf,
}

impl Programs {
    pub fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DataplaneError> {
        let prog = self.ebpf.program_mut(name).ok_or(DataplaneError::MissingObject(name))?;
        prog.try_into().map_err(|source| DataplaneError::Program { program: name, source })
    }

    pub fn xdp(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        let prog = self.ebpf.program_mut(name).ok_or(DataplaneError::MissingObject(name))?;
        prog.try_into().map_err(|source| DataplaneError::Program { program: name, source })
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Fail early, with the fix in the message, when the pin directory is not on bpffs.
pub fn check_bpffs(root: &Path) -> Result<(), DataplaneError> {
    let mut probe = root;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).map_err(|_| {
        DataplaneError::Io {
            context: format!("path {}", probe.display()),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        }
    })?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(DataplaneError::Io {
            context: format!("statfs {}", probe.display()),
            source: io::Error::last_os_error(),
        });
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(DataplaneError::NotBpffs { path: probe.to_path_buf() });
    }
    Ok(())
}

fn create_dir(path: &Path) -> Result<(), DataplaneError> {
    std::fs::create_dir_all(path).map_err(|source| match source.kind() {
        io::ErrorKind::PermissionDenied => DataplaneError::Permission { path: path.to_path_buf() },
        _ => DataplaneError::Io { context: format!("creating {}", path.display()), source },
    })
}

/// Load the object with maps pinned under `cfg.bpffs_root`, and load (verify) every
/// program: the TC pair for pod veths, the XDP program and TC egress program for uplinks. Existing pins are re-used as they are, whatever sizes they were created with.
pub fn load(cfg: &LoaderConfig) -> Result<(Programs, Maps), DataplaneError> {
    check_bpffs(&cfg.bpffs_root)?;
    let maps_dir = paths::maps_dir(&cfg.bpffs_root);
    create_dir(&maps_dir)?;
    create_dir(&paths::links_dir(&cfg.bpffs_root))?;
    let slots = cfg.max_backends.saturating_mul(2);
    let stats = cfg.max_services.saturating_mul(4);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&maps_dir)
        .map_max_entries(n::SERVICES, cfg.max_services)
        .map_max_entries(n::SERVICE_META, cfg.max_services)
        .map_max_entries(n::SERVICE_STATS, stats)
        .map_max_entries(n::BACKENDS, cfg.max_backends)
        .map_max_entries(n::BACKEND_SLOTS, slots)
        .map_max_entries(n::CONNTRACK, cfg.max_conntrack)
        .load(EBPF_OBJECT)?;
    for name in [PROG_FROM_POD, PROG_TO_POD, PROG_TO_UPLINK] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingObject(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { program: name, source })?;
        prog.load().map_err(|source| DataplaneError::Program { program: name, source })?;
    }
    let xdp: &mut Xdp = ebpf
        .program_mut(PROG_FROM_UPLINK)
        .ok_or(DataplaneError::MissingObject(PROG_FROM_UPLINK))?
        .try_into()
        .map_err(|source| DataplaneError::Program { program: PROG_FROM_UPLINK, source })?;
    xdp.load().map_err(|source| DataplaneError::Program { program: PROG_FROM_UPLINK, source })?;
    let maps = Maps::from_ebpf(&mut ebpf)?;
    Ok((Programs { ebpf }, maps))
}
