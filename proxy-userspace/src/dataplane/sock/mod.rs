//! Socket-level load balancing, the kernel side: attach the cgroup v2 `sock_addr` programs
//! (`proxy-ebpf/src/sock.rs`) to `--cgroup-root` through bpf_links pinned under
//! `<root>/cgroup-links/<cgroup id>-<program>`, so that a restarted agent swaps its new
//! programs into the same links (BPF_LINK_UPDATE: no instant without translation), like the
//! tcx links; write the mode (`SOCK_CONFIG`); and destroy connected UDP sockets whose
//! backend went away (sock_diag `SOCK_DESTROY`), so their applications reconnect.
pub mod destroy;

use std::{
    collections::HashSet,
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{Array, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use proxy_common::{SockConfig, map_names as n, sock_flags};
use tracing::{debug, info, warn};

use crate::dataplane::{
    kernel::bpfsys,
    maps::loader::{Programs, SOCK_PROGRAMS},
    paths,
};

/// `enum bpf_attach_type` of each program's hook, in the order of [`SOCK_PROGRAMS`].
pub const SOCK_ATTACH_TYPES: [u32; 8] = [
    10, // BPF_CGROUP_INET4_CONNECT
    14, // BPF_CGROUP_UDP4_SENDMSG
    19, // BPF_CGROUP_UDP4_RECVMSG
    29, // BPF_CGROUP_INET4_GETPEERNAME
    11, // BPF_CGROUP_INET6_CONNECT
    15, // BPF_CGROUP_UDP6_SENDMSG
    20, // BPF_CGROUP_UDP6_RECVMSG
    30, // BPF_CGROUP_INET6_GETPEERNAME
];

/// `--socket-lb`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SocketLbMode {
    /// Every socket in the cgroup is translated at connect()/sendmsg().
    #[default]
    On,
    /// No socket-level translation; the links of an earlier agent are removed.
    Off,
    /// Only sockets of the host network namespace; pod sockets go through the TC path (for
    /// service meshes whose sidecars must see the ClusterIP).
    HostOnly,
}

#[derive(Debug, thiserror::Error)]
pub enum SockError {
    #[error(
        "no cgroup v2 hierarchy found in /proc/self/mountinfo: mount one (or pass --cgroup-root), or run with --socket-lb=off"
    )]
    NoCgroup2,
    #[error("--cgroup-root {0} is not a directory of a cgroup v2 hierarchy (cgroup2 filesystem)")]
    NotCgroup2(PathBuf),
    #[error(
        "program {program}: {source} (socket-level load balancing needs cgroup sock_addr programs with \
         bpf_set_retval, kernel >= 5.18; run with --socket-lb=off on older kernels)"
    )]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> SockError {
    let context = context.into();
    move |source| SockError::Io { context, source }
}

pub fn links_dir(root: &Path) -> PathBuf {
    paths::cgroup_links_dir(root)
}

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// The node's cgroup v2 root: the first `cgroup2` mount in this mount namespace
/// (`/sys/fs/cgroup` on a pure v2 host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn detect_cgroup_root() -> Result<PathBuf, SockError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(io_err("reading /proc/self/mountinfo"))?;
    cgroup2_mount(&info).ok_or(SockError::NoCgroup2)
}

/// The mount point of the first cgroup2 line of a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ..."
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn check_cgroup2(path: &Path) -> Result<(), SockError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| SockError::NotCgroup2(path.to_path_buf()))?;
    // SAFETY: `statfs` is plain integers; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into the struct we own; the path is NUL-terminated.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 || st.f_type as i64 != CGROUP2_MAGIC {
        return Err(SockError::NotCgroup2(path.to_path_buf()));
    }
    Ok(())
}

/// `path` if it is a cgroup v2 directory, else its `unified` child when that is one: the
/// host's /sys/fs/cgroup mounted into the agent's container is the v2 root on a pure v2
/// host and a tmpfs holding `unified` on a hybrid one.
pub fn resolve_cgroup2(path: &Path) -> Result<PathBuf, SockError> {
    if check_cgroup2(path).is_ok() {
        return Ok(path.to_path_buf());
    }
    let unified = path.join("unified");
    check_cgroup2(&unified).map(|()| unified).map_err(|_| SockError::NotCgroup2(path.to_path_buf()))
}

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the caller's network namespace, as `bpf_get_netns_cookie` returns it.
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: a socket we close before returning; getsockopt writes at most `len` bytes into
    // the u64 we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        if libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }
}

/// What the hooks are told through `SOCK_CONFIG`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockSettings {
    pub mode: SocketLbMode,
    /// How long an unconnected UDP socket keeps its backend for a frontend between two
    /// datagrams (`--conntrack-udp-timeout-stream`); zero: the datapath's default
    /// (`proxy_common::sock_defaults::UDP_TIMEOUT_SECS`).
    pub udp_timeout: Duration,
}

impl From<SocketLbMode> for SockSettings {
    fn from(mode: SocketLbMode) -> Self {
        SockSettings { mode, udp_timeout: Duration::ZERO }
    }
}

/// How the programs ended up attached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SockAttach {
    /// Links of an earlier agent that now run the new programs.
    pub replaced: usize,
    /// Links created (and pinned) now.
    pub created: usize,
    /// Pinned links on another cgroup (an earlier `--cgroup-root`), detached.
    pub detached: usize,
    /// Links of our programs on this cgroup that are not this root's (an agent on another
    /// `--bpffs-root` left them), detached.
    pub foreign_detached: usize,
}

/// A cgroup link running one of our socket-level programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLink {
    pub link_id: u32,
    pub prog_id: u32,
    pub program: String,
    pub attach_type: u32,
}

/// The ids of the cgroup links pinned under `root` (this root's own).
pub fn pinned_link_ids(root: &Path) -> HashSet<u32> {
    let Ok(entries) = std::fs::read_dir(links_dir(root)) else { return HashSet::new() };
    entries
        .flatten()
        .filter_map(|e| bpfsys::obj_get(&e.path()).ok())
        .filter_map(|fd| bpfsys::cgroup_link_info(&fd).ok().flatten())
        .map(|i| i.id)
        .collect()
}

/// Links on the cgroup `cgroup_id` (its inode) that run one of our socket-level programs,
/// whoever attached them: recognised by program name and the maps it uses, as the
/// interface attachments are (`ownership`). Needs CAP_SYS_ADMIN to look programs up by id;
/// without it nothing is found.
pub fn our_links_on(cgroup_id: u64) -> Vec<CgroupLink> {
    let mut out = Vec::new();
    for id in bpfsys::link_ids() {
        let Ok(fd) = bpfsys::link_fd_by_id(id) else { continue };
        let Ok(Some(info)) = bpfsys::cgroup_link_info(&fd) else { continue };
        if info.cgroup_id != cgroup_id || !SOCK_ATTACH_TYPES.contains(&info.attach_type) {
            continue;
        }
        if let Some(program) = crate::dataplane::attach::ownership::sock_program_ours(info.prog_id) {
            out.push(CgroupLink { link_id: id, prog_id: info.prog_id, program, attach_type: info.attach_type });
        }
    }
    out
}

/// Detach the links of our programs on `cgroup_id` that are not pinned under `root`: an
/// agent that ran with another `--bpffs-root` left them, and they would keep translating
/// with that root's maps (to old backends) before or after ours. `BPF_LINK_DETACH` makes
/// their pins, wherever they are, defunct. Returns how many were detached.
fn detach_foreign_links(root: &Path, cgroup_id: u64) -> usize {
    let mine = pinned_link_ids(root);
    let mut detached = 0;
    for l in our_links_on(cgroup_id).into_iter().filter(|l| !mine.contains(&l.link_id)) {
        let result = bpfsys::link_fd_by_id(l.link_id).and_then(|fd| bpfsys::link_detach(&fd));
        match result {
            Ok(()) => {
                warn!(
                    program = %l.program,
                    prog_id = l.prog_id,
                    link_id = l.link_id,
                    cgroup_id,
                    "detached a socket-level program of ours left on the cgroup by another --bpffs-root"
                );
                detached += 1;
            }
            Err(e) => warn!(
                program = %l.program,
                link_id = l.link_id,
                error = %e,
                "cannot detach a socket-level program of ours left on the cgroup by another --bpffs-root"
            ),
        }
    }
    detached
}

/// The programs attached directly to `cgroup` on each of our hooks, as the kernel lists
/// them (`BPF_PROG_QUERY`), in the order of [`SOCK_PROGRAMS`].
pub fn cgroup_programs(cgroup: &Path) -> io::Result<Vec<(&'static str, Vec<u32>)>> {
    let fd = File::open(cgroup)?;
    SOCK_PROGRAMS
        .iter()
        .zip(SOCK_ATTACH_TYPES)
        .map(|(p, at)| bpfsys::cgroup_query(fd.as_fd(), at).map(|ids| (*p, ids)))
        .collect()
}

fn pin_name(cgroup_id: u64, program: &str) -> String {
    format!("{cgroup_id}-{program}")
}

/// `SockConfig::udp_timeout_secs` of a timeout: zero stays 0 (the datapath's default), anything
/// else is at least a second, since 0 would mean "the default".
fn udp_timeout_secs(d: Duration) -> u32 {
    if d.is_zero() { 0 } else { u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX) }
}

/// Write the settings into `SOCK_CONFIG` (before the programs can run with them).
fn write_config(progs: &mut Programs, settings: &SockSettings) -> Result<(), SockError> {
    let cookie = netns_cookie().map_err(io_err("reading the host network namespace's cookie (SO_NETNS_COOKIE)"))?;
    let cfg = SockConfig {
        flags: if settings.mode == SocketLbMode::HostOnly { sock_flags::HOST_ONLY } else { 0 },
        udp_timeout_secs: udp_timeout_secs(settings.udp_timeout),
        host_netns_cookie: cookie,
    };
    let map = progs.ebpf.map_mut(n::SOCK_CONFIG).ok_or_else(|| SockError::Io {
        context: format!("the eBPF object has no map {}", n::SOCK_CONFIG),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    let mut arr: Array<&mut MapData, SockConfig> =
        Array::try_from(map).map_err(|source| SockError::Map { map: n::SOCK_CONFIG, source })?;
    arr.set(0, cfg, 0).map_err(|source| SockError::Map { map: n::SOCK_CONFIG, source })
}

/// Attach the socket-level programs to `cgroup` (mode `On` or `HostOnly`), replacing the
/// programs in links an earlier agent pinned on the same cgroup, and detaching those it
/// pinned on another one.
pub fn attach(
    progs: &mut Programs,
    root: &Path,
    cgroup: &Path,
    settings: impl Into<SockSettings>,
) -> Result<SockAttach, SockError> {
    let settings = settings.into();
    let cgroup = &resolve_cgroup2(cgroup)?;
    let cgroup_id = std::fs::metadata(cgroup).map_err(io_err(format!("stat {}", cgroup.display())))?.ino();
    let dir = links_dir(root);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    write_config(progs, &settings)?;
    let mut out = SockAttach::default();
    // Links on another cgroup: the operator moved --cgroup-root. Unpinning detaches.
    for e in std::fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let on_ours = name.split_once('-').and_then(|(id, _)| id.parse::<u64>().ok()) == Some(cgroup_id);
        if !on_ours && std::fs::remove_file(e.path()).is_ok() {
            info!(pin = %name, "detached socket-level program from a previous --cgroup-root");
            out.detached += 1;
        }
    }
    let cgroup_fd = File::open(cgroup).map_err(io_err(format!("opening {}", cgroup.display())))?;
    for program in SOCK_PROGRAMS {
        let prog: &mut CgroupSockAddr = progs
            .ebpf
            .program_mut(program)
            .ok_or_else(|| SockError::Io {
                context: format!("the eBPF object has no program {program}"),
                source: io::Error::from(io::ErrorKind::NotFound),
            })?
            .try_into()
            .map_err(|source| SockError::Program { program, source })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| SockError::Program { program, source })?;
        }
        let pin = dir.join(pin_name(cgroup_id, program));
        if let Ok(old) = bpfsys::obj_get(&pin) {
            let prog_fd = prog.fd().map_err(|source| SockError::Program { program, source })?;
            match bpfsys::link_update(old.as_fd(), prog_fd.as_fd()) {
                Ok(()) => {
                    debug!(program, "replaced program in pinned cgroup link");
                    out.replaced += 1;
                    continue;
                }
                Err(e) => {
                    // Defunct (its cgroup was removed and re-created): start afresh.
                    debug!(program, error = %e, "pinned cgroup link unusable, re-attaching");
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        // A bpf_link on a cgroup always runs alongside other programs (the kernel wants no
        // flags for it: `Single` is aya's "no flags"), so another agent's or a CNI's stay.
        let id = prog
            .attach(cgroup_fd.as_fd(), CgroupAttachMode::Single)
            .map_err(|source| SockError::Program { program, source })?;
        let link = prog.take_link(id).map_err(|source| SockError::Program { program, source })?;
        let fd: FdLink = link.try_into().map_err(|e| SockError::Io {
            context: format!("{program}: no bpf_link for cgroup programs on this kernel (< 5.7): {e}"),
            source: io::Error::from(io::ErrorKind::Unsupported),
        })?;
        fd.pin(&pin).map_err(|e| SockError::Io {
            context: format!("pinning {}: {e}", pin.display()),
            source: io::Error::other("pin"),
        })?;
        out.created += 1;
    }
    // Only once ours run: the old programs keep translating until then.
    out.foreign_detached = detach_foreign_links(root, cgroup_id);
    Ok(out)
}

/// Remove every pinned cgroup link under `root` (detaching the programs). Returns the pin
/// names removed.
pub fn detach_all(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(links_dir(root)) else { return Vec::new() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        if std::fs::remove_file(e.path()).is_ok() {
            removed.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    removed
}

/// Are the programs attached (every program's pin present) on `cgroup` under `root`?
pub fn attached_on(root: &Path, cgroup: &Path) -> bool {
    let Ok(id) = std::fs::metadata(cgroup).map(|m| m.ino()) else { return false };
    SOCK_PROGRAMS.iter().all(|p| links_dir(root).join(pin_name(id, p)).exists())
}

// --- Stale UDP sockets -------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "25 1 0:23 / /sys rw - sysfs sysfs rw\n\
                      30 25 0:26 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw,nsdelegate\n\
                      32 30 0:28 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,name=systemd\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let pure = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("32 30 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw\n"), None);
    }

    #[test]
    fn udp_timeout_reaches_the_datapath_in_whole_seconds() {
        assert_eq!(udp_timeout_secs(Duration::ZERO), 0);
        assert_eq!(udp_timeout_secs(Duration::from_millis(300)), 1);
        assert_eq!(udp_timeout_secs(Duration::from_secs(120)), 120);
        assert_eq!(udp_timeout_secs(Duration::from_secs(u64::MAX)), u32::MAX);
        assert_eq!(SockSettings::from(SocketLbMode::HostOnly).udp_timeout, Duration::ZERO);
        // The hooks' order matches their attach types.
        assert_eq!(SOCK_PROGRAMS.len(), SOCK_ATTACH_TYPES.len());
        assert_eq!((SOCK_PROGRAMS[3], SOCK_ATTACH_TYPES[3]), ("sock_peername4", 29));
        assert_eq!(pin_name(42, "sock_connect4"), "42-sock_connect4");
    }
}
