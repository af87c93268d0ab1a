//! Load the embedded eBPF object: maps pinned by name under `<root>/maps` (re-used when
//! already pinned with the same definition, so a restart keeps services and conntrack;
//! migrated when the configured size or the map type changed, see `migrate`), programs
//! verified and loaded.
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{Program, SchedClassifier, Xdp},
};

use crate::dataplane::{
    DataplaneError, EBPF_OBJECT,
    maps::Maps,
    maps::catalogue::{self, SizeFlag},
    maps::migrate::{MapSpec, Migration},
    paths,
};

/// Program names in the object.
pub const PROG_FROM_POD: &str = "from_pod";
pub const PROG_TO_POD: &str = "to_pod";
/// XDP on the uplink (north-south service traffic).
pub const PROG_FROM_UPLINK: &str = "from_uplink";
/// TC egress of the uplink (reverse NAT of replies from local backends).
pub const PROG_TO_UPLINK: &str = "to_uplink";
/// TC ingress of the uplink: sends on what XDP translated for a device it cannot transmit
/// on (a tunnel of an overlay CNI).
pub const PROG_UPLINK_HANDOFF: &str = "uplink_handoff";
/// The TC and XDP programs the agent loads and attaches (ownership recognises them by
/// these names).
pub const NET_PROGRAMS: [&str; 5] = [PROG_FROM_POD, PROG_TO_POD, PROG_FROM_UPLINK, PROG_TO_UPLINK, PROG_UPLINK_HANDOFF];
/// The socket-level programs (cgroup sock_addr hooks, see `sock`): here with the other
/// program names, so that ownership and sock both read them without importing each other.
pub const SOCK_PROGRAMS: [&str; 8] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_peername4",
    "sock_connect6",
    "sock_sendmsg6",
    "sock_recvmsg6",
    "sock_peername6",
];

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub bpffs_root: PathBuf,
    pub max_services: u32,
    pub max_backends: u32,
    pub max_conntrack: u32,
    /// `SOURCE_RANGES` and `SOURCE_RANGES6` (loadBalancerSourceRanges prefixes, each).
    pub max_source_ranges: u32,
    /// `MAGLEV` (Maglev table slots of every frontend together).
    pub max_maglev_slots: u32,
}

impl LoaderConfig {
    pub fn new(bpffs_root: impl Into<PathBuf>) -> Self {
        LoaderConfig {
            bpffs_root: bpffs_root.into(),
            max_services: proxy_common::sizes::MAX_SERVICES,
            max_backends: proxy_common::sizes::MAX_BACKENDS,
            max_conntrack: proxy_common::sizes::MAX_CONNTRACK,
            max_source_ranges: proxy_common::sizes::MAX_SOURCE_RANGES,
            max_maglev_slots: proxy_common::sizes::MAX_MAGLEV_SLOTS,
        }
    }
}

impl LoaderConfig {
    /// `max_entries` of the maps the flags size (their catalogue rows say which flag and
    /// how). The IPv6 twins follow the same flags as their IPv4 maps (`--max-services`
    /// sizes SERVICES and SERVICES6 each); slots, metadata and counters are shared by both
    /// families.
    pub(super) fn sizes(&self) -> Vec<(&'static str, u32)> {
        catalogue::MAPS.iter().filter(|m| m.flag_sized()).map(|m| (m.name, m.max_entries(|f| self.flag(f)))).collect()
    }

    /// The value of a size flag.
    fn flag(&self, f: SizeFlag) -> u32 {
        match f {
            SizeFlag::MaxServices => self.max_services,
            SizeFlag::MaxBackends => self.max_backends,
            SizeFlag::MaxConntrack => self.max_conntrack,
            SizeFlag::MaxSourceRanges => self.max_source_ranges,
            SizeFlag::MaxMaglevSlots => self.max_maglev_slots,
        }
    }
}

/// What the object declares for each pinned map, with the configured sizes applied: what a
/// pin must match to be re-used as it is.
pub fn declared_maps(cfg: &LoaderConfig) -> Result<BTreeMap<String, MapSpec>, DataplaneError> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| DataplaneError::Io {
        context: format!("parsing the embedded eBPF object: {e}"),
        source: io::Error::from(io::ErrorKind::InvalidData),
    })?;
    let sizes = cfg.sizes();
    let mut out = BTreeMap::new();
    for (name, m) in &obj.maps {
        if m.pinning() != aya_obj::maps::PinningType::ByName {
            continue;
        }
        let max_entries = sizes.iter().find(|(n, _)| n == name).map(|(_, v)| *v).unwrap_or(m.max_entries());
        out.insert(
            name.clone(),
            MapSpec {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries,
                flags: m.map_flags(),
            },
        );
    }
    for m in catalogue::MAPS {
        if !out.contains_key(m.name) {
            return Err(DataplaneError::MissingObject(m.name));
        }
    }
    Ok(out)
}

/// Loaded programs (the maps are handed out separately, see [`Maps`]).
pub struct Programs {
    pub ebpf: Ebpf,
    /// Pinned maps being migrated to a new size or type by this start. The agent calls
    /// [`Migration::finish`] once the new programs are attached (swapped into the pinned
    /// links), which copies what the old programs wrote in between and drops the old maps.
    pub migration: Migration,
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
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).map_err(|_| DataplaneError::Io {
        context: format!("path {}", probe.display()),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: `statfs` is plain integers; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into the struct we own; the path is NUL-terminated.
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

/// Capability bits (`linux/capability.h`).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Refuse early, with one actionable line, when the process cannot load the datapath:
/// otherwise the first bpf() or bpffs call fails with a bare "Operation not permitted".
/// Loading needs CAP_BPF (or CAP_SYS_ADMIN, before 5.8) and CAP_NET_ADMIN (TC/XDP programs).
pub fn check_privileges() -> Result<(), DataplaneError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(eff) =
        status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        // No /proc: let the syscalls speak for themselves.
        return Ok(());
    };
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !missing.is_empty() {
        return Err(DataplaneError::NotPrivileged { missing: missing.join(" and "), uid: euid });
    }
    // The capabilities are there; a seccomp filter may still refuse bpf() itself.
    let seccomp = status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map(str::trim).unwrap_or("0");
    if seccomp != "0" && bpf_refused() {
        let mode = if seccomp == "2" { "2 (filter)".to_string() } else { seccomp.to_string() };
        return Err(DataplaneError::SeccompBlocksBpf { uid: euid, mode });
    }
    Ok(())
}

/// Does bpf() answer EPERM to the smallest request that needs only CAP_BPF (creating a
/// one-entry array map, closed at once)?
fn bpf_refused() -> bool {
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries
    // (u32 each), the rest zero. 128 bytes: the kernel accepts a shorter attr whose tail
    // it does not know as long as that tail is zero.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32, 4, 4, 1]);
    // SAFETY: bpf(BPF_MAP_CREATE) reads `size_of_val(&attr)` bytes from a valid buffer and
    // returns a new fd or -1; the fd is closed below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_MAP_CREATE as libc::c_int,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd >= 0 {
        // SAFETY: `fd` is the map fd just created and owned here.
        unsafe { libc::close(fd as i32) };
        return false;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes, on drop, the part of a bpffs root that it created, unless disarmed: a start
/// that fails leaves no empty (or half-filled) pin directory behind, but never removes one
/// that existed before.
pub struct CreatedRoot {
    created: Option<PathBuf>,
}

impl CreatedRoot {
    /// Remember the topmost missing directory of `root`, before anything creates it.
    pub fn remember(root: &Path) -> Self {
        let mut top = None;
        let mut probe = Some(root);
        while let Some(p) = probe {
            if p.exists() {
                break;
            }
            top = Some(p.to_path_buf());
            probe = p.parent();
        }
        CreatedRoot { created: top }
    }

    /// Keep the directory (the start succeeded).
    pub fn keep(mut self) {
        self.created = None;
    }
}

impl Drop for CreatedRoot {
    fn drop(&mut self) {
        if let Some(dir) = self.created.take() {
            // Unpinning drops our maps and links with the directory.
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Load the object with maps pinned under `cfg.bpffs_root`, and load (verify) every
/// program: the TC pair for pod veths, the XDP program and TC egress program for uplinks.
/// Pins that match the configuration are re-used; pins whose size, type or flags differ are
/// migrated (`Programs::migration`); pins with another key/value layout make the load fail
/// with [`DataplaneError::IncompatiblePin`]. On failure, a pin directory this call created
/// is removed, and pins moved aside are put back.
pub fn load(cfg: &LoaderConfig) -> Result<(Programs, Maps), DataplaneError> {
    check_privileges()?;
    check_bpffs(&cfg.bpffs_root)?;
    let root_guard = CreatedRoot::remember(&cfg.bpffs_root);
    let maps_dir = paths::maps_dir(&cfg.bpffs_root);
    create_dir(&maps_dir)?;
    create_dir(&paths::links_dir(&cfg.bpffs_root))?;
    let declared = declared_maps(cfg)?;
    let mut migration = Migration::prepare(&cfg.bpffs_root, &declared)?;
    match load_programs(cfg, &maps_dir, &mut migration) {
        Ok((ebpf, maps)) => {
            root_guard.keep();
            Ok((Programs { ebpf, migration }, maps))
        }
        Err(e) => {
            migration.rollback();
            Err(e)
        }
    }
}

/// Whether XDP programs may call `bpf_xdp_adjust_meta` (some kernels refuse it to XDP). A
/// failed probe counts as yes: the helper exists since Linux 4.15, and the load then says
/// what is wrong. Probed once per process (the agent's feature line and every load ask).
pub fn xdp_metadata_supported() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| {
        use aya::{programs::ProgramType, sys::BpfHelper};
        aya::sys::is_helper_supported(ProgramType::Xdp, BpfHelper::BPF_FUNC_xdp_adjust_meta).ok() != Some(false)
    })
}

fn load_programs(
    cfg: &LoaderConfig,
    maps_dir: &Path,
    migration: &mut Migration,
) -> Result<(Ebpf, Maps), DataplaneError> {
    // The loader holds the kernel's BTF, parsed (about 12 MB of heap), for the object's
    // relocations only: it goes before the verifier's wait, while the initial lists are
    // being translated, so the translation reuses that memory instead of adding to it.
    let mut ebpf = {
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(maps_dir);
        for (name, size) in cfg.sizes() {
            loader.map_max_entries(name, size);
        }
        // The XDP hand-off to tunnel devices needs XDP metadata; where the kernel refuses
        // the helper, the program is loaded with it pruned (see `handoff.rs` in proxy-ebpf).
        let xdp_metadata = u8::from(xdp_metadata_supported());
        loader.override_global("XDP_METADATA", &xdp_metadata, true);
        loader.load(EBPF_OBJECT)?
    };
    verify_in_parallel(&mut ebpf)?;
    // The new maps exist (and are pinned); no program runs on them yet. Carry the entries
    // over now, after the verifier, so that little happens in the old maps between this
    // copy and the swap of the programs (`attach::swap_pinned_links`).
    migration.copy_pass(true)?;
    let maps = Maps::from_ebpf(&mut ebpf)?;
    Ok((ebpf, maps))
}

/// Load (verify) the TC and XDP programs, each on a thread of its own: the verifier's time
/// is most of a start (about 0.3 s for `from_uplink` and 0.25 s for `from_pod` on a 2-vCPU
/// machine), and the kernel verifies programs concurrently.
fn verify_in_parallel(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let mut progs: Vec<(&'static str, &mut Program)> = Vec::with_capacity(NET_PROGRAMS.len());
    for (name, prog) in ebpf.programs_mut() {
        if let Some(ours) = NET_PROGRAMS.iter().find(|n| **n == name) {
            progs.push((ours, prog));
        }
    }
    if let Some(missing) = NET_PROGRAMS.iter().find(|n| !progs.iter().any(|(p, _)| p == *n)) {
        return Err(DataplaneError::MissingObject(missing));
    }
    std::thread::scope(|s| {
        let verifying: Vec<_> = progs.into_iter().map(|(name, prog)| s.spawn(move || verify(name, prog))).collect();
        // Every thread is joined before the first error is returned: none is left running
        // on a program the caller is about to drop.
        let results: Vec<_> = verifying.into_iter().map(|t| t.join()).collect();
        results.into_iter().try_for_each(|r| r.unwrap_or_else(|_| Err(DataplaneError::VerifierThread)))
    })
}

/// Verify one program of ours: XDP or a classifier, as its name says.
fn verify(name: &'static str, prog: &mut Program) -> Result<(), DataplaneError> {
    let wrap = |source| DataplaneError::Program { program: name, source };
    if name == PROG_FROM_UPLINK {
        let xdp: &mut Xdp = prog.try_into().map_err(wrap)?;
        xdp.load().map_err(wrap)
    } else {
        let tc: &mut SchedClassifier = prog.try_into().map_err(wrap)?;
        tc.load().map_err(wrap)
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::map_names as n;

    use super::*;
    use crate::dataplane::maps::catalogue::slots_for;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ebpf-proxy-loader-{}-{name}", std::process::id()))
    }

    #[test]
    fn created_root_removes_only_what_it_created() {
        let base = tmp("new");
        let root = base.join("a/b");
        let guard = CreatedRoot::remember(&root);
        std::fs::create_dir_all(root.join("maps")).unwrap();
        drop(guard);
        assert!(!base.exists(), "the topmost created directory is removed");

        let existing = tmp("existing");
        std::fs::create_dir_all(&existing).unwrap();
        let guard = CreatedRoot::remember(&existing);
        std::fs::create_dir_all(existing.join("maps")).unwrap();
        drop(guard);
        assert!(existing.join("maps").exists(), "a directory that existed is never removed");
        std::fs::remove_dir_all(&existing).unwrap();

        let kept = tmp("kept");
        let guard = CreatedRoot::remember(&kept);
        std::fs::create_dir_all(&kept).unwrap();
        guard.keep();
        assert!(kept.exists(), "a successful start keeps it");
        std::fs::remove_dir_all(&kept).unwrap();
    }

    #[test]
    fn slots_cover_both_generations_of_shared_backends() {
        assert_eq!(slots_for(8), 64);
        assert_eq!(slots_for(u32::MAX), u32::MAX, "saturates");
        let sizes = LoaderConfig { max_backends: 4, ..LoaderConfig::new("/x") }.sizes();
        assert!(sizes.contains(&(n::BACKEND_SLOTS, 32)));
    }

    #[test]
    fn declared_maps_follow_the_flags() {
        let cfg = LoaderConfig {
            max_services: 10,
            max_backends: 20,
            max_conntrack: 30,
            max_source_ranges: 40,
            ..LoaderConfig::new("/x")
        };
        let d = declared_maps(&cfg).unwrap();
        assert_eq!(d[n::SERVICES].max_entries, 10);
        assert_eq!(d[n::SERVICE_META].max_entries, 10);
        assert_eq!(d[n::BACKENDS].max_entries, 20);
        assert_eq!(d[n::BACKEND_SLOTS].max_entries, 160);
        assert_eq!(d[n::CONNTRACK].max_entries, 30);
        assert_eq!(d[n::CONNTRACK].key_size as usize, size_of::<proxy_common::CtKey>());
        assert_eq!(d[n::CONNTRACK].value_size as usize, size_of::<proxy_common::CtValue>());
        // The IPv6 twins follow the same flags, with their own layouts.
        assert_eq!(
            (d[n::SERVICES6].max_entries, d[n::BACKENDS6].max_entries, d[n::CONNTRACK6].max_entries),
            (10, 20, 30)
        );
        assert_eq!(d[n::CONNTRACK6].key_size as usize, size_of::<proxy_common::CtKey6>());
        assert_eq!((d[n::SOURCE_RANGES].max_entries, d[n::SOURCE_RANGES6].max_entries), (40, 40));
        assert_eq!(d[n::CONNTRACK6].value_size as usize, size_of::<proxy_common::CtValue6>());
        assert_eq!(d[n::SERVICES6].key_size as usize, size_of::<proxy_common::ServiceKey6>());
        for m in catalogue::MAPS {
            assert!(d.contains_key(m.name), "{} declared", m.name);
        }
    }
}
