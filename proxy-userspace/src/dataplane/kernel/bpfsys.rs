//! The few bpf(2) commands aya 0.14 does not expose: the ifindex of a link
//! (`bpf_link_info.tcx/xdp`), the link ids of a tcx query, detaching a link by id, a
//! program's name and map ids by program id, batched map reads (the conntrack collector)
//! and batched writes (the sync's cold start), and the next key of any map by raw bytes
//! (`ebpf-proxy maps` counts entries without knowing each map's types). Each is one syscall on a zeroed attribute
//! buffer laid out as in `include/uapi/linux/bpf.h`.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `enum bpf_attach_type` values of tcx.
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

/// `enum bpf_link_type`.
pub const BPF_LINK_TYPE_XDP: u32 = 6;
pub const BPF_LINK_TYPE_TCX: u32 = 11;
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// Large enough for every attribute struct we use; the kernel requires unused tail bytes
/// to be zero, which a zeroed buffer guarantees.
type Attr = [u8; 128];

fn put_u32(a: &mut [u8], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put_u64(a: &mut [u8], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}
fn get_u32(a: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&a[off..off + 4]);
    u32::from_ne_bytes(b)
}
fn get_u64(a: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&a[off..off + 8]);
    u64::from_ne_bytes(b)
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) reads and writes at most `attr.len()` bytes of the buffer we own; any
    // pointers stored in it point at live buffers of the caller for the whole call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Swap `prog` into `link` (BPF_LINK_UPDATE): the link stays attached, only its program
/// changes, atomically. aya 0.14 offers this for tcx and XDP links only; the socket-level
/// cgroup links need it too.
pub fn link_update(link: std::os::fd::BorrowedFd<'_>, prog: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let mut attr: Attr = [0; 128];
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

fn bpf_fd(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: on success these commands return a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info`.
fn obj_info(fd: &OwnedFd, info: &mut [u8]) -> io::Result<()> {
    let mut a: Attr = [0; 128];
    put_u32(&mut a, 0, fd.as_raw_fd() as u32);
    put_u32(&mut a, 4, info.len() as u32);
    put_u64(&mut a, 8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).map(drop)
}

/// `BPF_MAP_LOOKUP_BATCH` on the hash map `map_fd`: up to `count` entries from `cursor`
/// (`None`: the beginning) into `keys` / `values` (room for `count` of each, of the map's
/// key and value sizes). Returns how many were read and the next cursor, `None` once the
/// walk reached the end (the kernel says so with ENOENT, still returning the last
/// entries). A hash map's cursor is a bucket index, so deleting entries between calls
/// neither restarts nor skips the walk.
pub fn map_lookup_batch(
    map_fd: std::os::fd::BorrowedFd<'_>,
    cursor: Option<u32>,
    keys: &mut [u8],
    values: &mut [u8],
    count: u32,
) -> io::Result<(usize, Option<u32>)> {
    let in_batch = cursor.unwrap_or(0);
    let mut out_batch = 0u32;
    let mut a: Attr = [0; 128];
    // in_batch 0, out_batch 8, keys 16, values 24, count 32, map_fd 36 (elem_flags, flags 0).
    if cursor.is_some() {
        put_u64(&mut a, 0, &in_batch as *const u32 as u64);
    }
    put_u64(&mut a, 8, &mut out_batch as *mut u32 as u64);
    put_u64(&mut a, 16, keys.as_mut_ptr() as u64);
    put_u64(&mut a, 24, values.as_mut_ptr() as u64);
    put_u32(&mut a, 32, count);
    put_u32(&mut a, 36, map_fd.as_raw_fd() as u32);
    let done = match bpf(BPF_MAP_LOOKUP_BATCH, &mut a) {
        Ok(_) => false,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
        Err(e) => return Err(e),
    };
    let n = get_u32(&a, 32) as usize;
    Ok((n, if done { None } else { Some(out_batch) }))
}

/// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (`None`: the first) into `next` (the map's
/// key size). `Ok(false)` past the last key.
pub fn map_next_key(map_fd: std::os::fd::BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    let mut a: Attr = [0; 128];
    // map_fd 0, key 8 (NULL: the first key), next_key 16.
    put_u32(&mut a, 0, map_fd.as_raw_fd() as u32);
    if let Some(k) = key {
        put_u64(&mut a, 8, k.as_ptr() as u64);
    }
    put_u64(&mut a, 16, next.as_mut_ptr() as u64);
    match bpf(BPF_MAP_GET_NEXT_KEY, &mut a) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_UPDATE_BATCH`: write `count` entries (`keys` / `values` hold `count` of each,
/// of the map's key and value sizes) in one syscall. Returns how many the kernel wrote
/// before an error, with the error.
pub fn map_update_batch(
    map_fd: std::os::fd::BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: u32,
) -> Result<(), (usize, io::Error)> {
    let mut a: Attr = [0; 128];
    // keys 16, values 24, count 32, map_fd 36, elem_flags 40 (BPF_ANY).
    put_u64(&mut a, 16, keys.as_ptr() as u64);
    put_u64(&mut a, 24, values.as_ptr() as u64);
    put_u32(&mut a, 32, count);
    put_u32(&mut a, 36, map_fd.as_raw_fd() as u32);
    bpf(BPF_MAP_UPDATE_BATCH, &mut a).map(drop).map_err(|e| (get_u32(&a, 32) as usize, e))
}

/// Open a pinned object (`BPF_OBJ_GET`).
pub fn obj_get(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut a: Attr = [0; 128];
    // pathname (pointer) at 0, bpf_fd 8, file_flags 12.
    put_u64(&mut a, 0, c.as_ptr() as u64);
    bpf_fd(BPF_OBJ_GET, &mut a)
}

/// Every link id in the system (all network namespaces).
pub fn link_ids() -> Vec<u32> {
    let mut out = Vec::new();
    let mut start = 0u32;
    // Bounded: ids are unique and increasing; ENOENT ends the walk.
    for _ in 0..1_000_000 {
        let mut a: Attr = [0; 128];
        put_u32(&mut a, 0, start);
        if bpf(BPF_LINK_GET_NEXT_ID, &mut a).is_err() {
            break;
        }
        start = get_u32(&a, 4);
        out.push(start);
    }
    out
}

pub fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut a: Attr = [0; 128];
    put_u32(&mut a, 0, id);
    bpf_fd(BPF_LINK_GET_FD_BY_ID, &mut a)
}

/// What `bpf_link_info` says about a tcx or XDP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// 0 once the link is detached (device gone, or `BPF_LINK_DETACH`).
    pub ifindex: u32,
    /// tcx only.
    pub attach_type: u32,
}

pub fn link_info(fd: &OwnedFd) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union at offset 16 whose
    // tcx member is {ifindex, attach_type} and xdp member {ifindex}.
    let mut info = [0u8; 64];
    obj_info(fd, &mut info)?;
    Ok(LinkInfo {
        link_type: get_u32(&info, 0),
        id: get_u32(&info, 4),
        prog_id: get_u32(&info, 8),
        ifindex: get_u32(&info, 16),
        attach_type: get_u32(&info, 20),
    })
}

/// Detach a link (it stays valid, and pinned, but defunct).
pub fn link_detach(fd: &OwnedFd) -> io::Result<()> {
    let mut a: Attr = [0; 128];
    put_u32(&mut a, 0, fd.as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut a).map(drop)
}

/// A program's name (as the kernel truncates it, 15 bytes) and the ids of its maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    pub map_ids: Vec<u32>,
}

pub fn prog_info(id: u32) -> io::Result<ProgInfo> {
    let mut a: Attr = [0; 128];
    put_u32(&mut a, 0, id);
    let fd = bpf_fd(BPF_PROG_GET_FD_BY_ID, &mut a)?;
    // struct bpf_prog_info: nr_map_ids at 52, map_ids (pointer) at 56, name[16] at 64.
    let mut info = [0u8; 256];
    obj_info(&fd, &mut info)?;
    let nr = get_u32(&info, 52).min(64);
    let mut maps = vec![0u32; nr as usize];
    let mut info2 = [0u8; 256];
    put_u32(&mut info2, 52, nr);
    put_u64(&mut info2, 56, maps.as_mut_ptr() as u64);
    obj_info(&fd, &mut info2)?;
    let name_bytes = &info2[64..80];
    let end = name_bytes.iter().position(|b| *b == 0).unwrap_or(name_bytes.len());
    let got = get_u32(&info2, 52).min(nr) as usize;
    maps.truncate(got);
    Ok(ProgInfo {
        id: get_u32(&info2, 4),
        name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
        map_ids: maps,
    })
}

/// Whether the kernel has tcx (Linux >= 6.6): a query of loopback's tcx ingress hook is not
/// refused as an unknown attach type (EINVAL). Loopback is ifindex 1 in every namespace.
pub fn tcx_supported() -> bool {
    let mut a: Attr = [0; 128];
    put_u32(&mut a, 0, 1);
    put_u32(&mut a, 4, BPF_TCX_INGRESS);
    !matches!(bpf(BPF_PROG_QUERY, &mut a), Err(e) if e.raw_os_error() == Some(libc::EINVAL))
}

/// Programs and links on a tcx hook of `ifindex` in the caller's network namespace (the
/// kernel resolves the ifindex there), in run order.
pub fn tcx_query(ifindex: u32, attach_type: u32) -> io::Result<Vec<(u32, u32)>> {
    // Bounded by the kernel's limit of programs per tcx hook (64).
    const MAX: usize = 64;
    let mut progs = [0u32; MAX];
    let mut links = [0u32; MAX];
    let mut a: Attr = [0; 128];
    // query: target_ifindex 0, attach_type 4, query_flags 8, attach_flags 12,
    // prog_ids 16, count 24, prog_attach_flags 32, link_ids 40, link_attach_flags 48,
    // revision 56.
    put_u32(&mut a, 0, ifindex);
    put_u32(&mut a, 4, attach_type);
    put_u64(&mut a, 16, progs.as_mut_ptr() as u64);
    put_u32(&mut a, 24, MAX as u32);
    put_u64(&mut a, 40, links.as_mut_ptr() as u64);
    match bpf(BPF_PROG_QUERY, &mut a) {
        Ok(_) => {}
        // No tcx entry on this device yet, or no tcx on this kernel.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    let n = (get_u32(&a, 24) as usize).min(MAX);
    let _revision = get_u64(&a, 56);
    Ok((0..n).map(|i| (progs[i], links[i])).collect())
}

/// What `bpf_link_info` says about a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// The cgroup's id (its inode number on cgroup2); 0 once the link is detached.
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// The cgroup link `fd` refers to; `None` for a link of another type.
pub fn cgroup_link_info(fd: &OwnedFd) -> io::Result<Option<CgroupLinkInfo>> {
    // struct bpf_link_info: type, id, prog_id, then the 8-aligned union at offset 16 whose
    // cgroup member is {__u64 cgroup_id; __u32 attach_type}.
    let mut info = [0u8; 64];
    obj_info(fd, &mut info)?;
    if get_u32(&info, 0) != BPF_LINK_TYPE_CGROUP {
        return Ok(None);
    }
    Ok(Some(CgroupLinkInfo {
        id: get_u32(&info, 4),
        prog_id: get_u32(&info, 8),
        cgroup_id: get_u64(&info, 16),
        attach_type: get_u32(&info, 24),
    }))
}

/// Programs attached to the cgroup `cgroup_fd` itself (not inherited) on `attach_type`.
pub fn cgroup_query(cgroup_fd: std::os::fd::BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    // Bounded by the kernel's limit of programs per cgroup hook (64).
    const MAX: usize = 64;
    let mut progs = [0u32; MAX];
    let mut a: Attr = [0; 128];
    // query: target_fd 0, attach_type 4, query_flags 8, attach_flags 12, prog_ids 16,
    // prog_cnt 24.
    put_u32(&mut a, 0, cgroup_fd.as_raw_fd() as u32);
    put_u32(&mut a, 4, attach_type);
    put_u64(&mut a, 16, progs.as_mut_ptr() as u64);
    put_u32(&mut a, 24, MAX as u32);
    bpf(BPF_PROG_QUERY, &mut a)?;
    let n = (get_u32(&a, 24) as usize).min(MAX);
    Ok(progs[..n].to_vec())
}
