//! Destroying connected UDP sockets whose backend went away, over sock_diag
//! (`SOCK_DESTROY`, CONFIG_INET_DIAG_DESTROY), so their applications reconnect through the
//! hooks to a live backend.
use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    io,
    net::IpAddr,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use proxy_common::Ipv6Words;
use tracing::debug;

use crate::dataplane::maps::addr;

/// netlink families and message types (`linux/netlink.h`, `linux/sock_diag.h`).
const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// `struct nlmsghdr`, `struct inet_diag_req_v2`, `struct inet_diag_msg` sizes.
const NLMSG_HDR: usize = 16;
const REQ_V2: usize = 56;
const DIAG_MSG: usize = 72;
/// Offset of `struct inet_diag_sockid` in both the request and the answer.
const SOCKID_OFF: usize = 4;
const SOCKID_LEN: usize = 48;

/// What one destruction pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestroyReport {
    /// Network namespaces searched (those of the processes in the cgroup tree).
    pub namespaces: usize,
    /// Sockets destroyed.
    pub destroyed: usize,
    /// Sockets found but not destroyed (gone meanwhile, or refused).
    pub failed: usize,
    pub elapsed: Duration,
}

/// A socket's peer as the maps store it: IPv4 (also for an IPv6 socket connected to an
/// IPv4-mapped address, which the hooks translate through the IPv4 maps) or IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Peer {
    V4(u32),
    V6(Ipv6Words),
}

impl Peer {
    fn of(ip: IpAddr) -> Peer {
        match ip {
            IpAddr::V4(a) => Peer::V4(addr::ip_to_map(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Peer::V4(addr::ip_to_map(v4)),
                None => Peer::V6(addr::ip6_to_map(a)),
            },
        }
    }
}

/// The network namespaces of the processes in the cgroup tree under `cgroup` (the sockets
/// the hooks can have translated live there), one `/proc/<pid>/ns/net` path per namespace.
fn namespaces_in(cgroup: &Path) -> BTreeMap<(u64, u64), PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![cgroup.to_path_buf()];
    // Bounded: a cgroup tree is small, but never walk forever.
    let mut budget = 100_000usize;
    while let Some(dir) = stack.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter(|l| !l.is_empty()) {
                let p = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Ok(m) = std::fs::metadata(&p) {
                    out.entry((m.dev(), m.ino())).or_insert(p);
                }
            }
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if budget == 0 {
                return out;
            }
            budget -= 1;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    out
}

fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket call; the fd is owned by the OwnedFd from here on.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd from the kernel.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval { tv_sec: 1, tv_usec: 0 };
    // SAFETY: setsockopt reads the timeval we own.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of_val(&tv) as libc::socklen_t,
        );
    }
    Ok(fd)
}

/// An `inet_diag_req_v2` for UDP sockets of `family` in a netlink message of `msg_type`.
fn udp_request(family: libc::c_int, msg_type: u16, flags: u16, sockid: Option<&[u8]>) -> Vec<u8> {
    let mut m = vec![0u8; NLMSG_HDR + REQ_V2];
    m[0..4].copy_from_slice(&((NLMSG_HDR + REQ_V2) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&msg_type.to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    let r = &mut m[NLMSG_HDR..];
    r[0] = family as u8;
    r[1] = libc::IPPROTO_UDP as u8;
    // idiag_states: every state (connected UDP sockets are TCP_ESTABLISHED).
    r[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    if let Some(id) = sockid {
        r[8..8 + SOCKID_LEN].copy_from_slice(id);
    }
    m
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: sends from a buffer we own to the kernel (nl_pid 0), with a zeroed sockaddr_nl.
    let rc = unsafe {
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Read netlink messages until DONE (dump) or the first ERROR (ack); `each` sees every
/// payload of `msg_type`. Returns the ack's errno (0 = success) when one came.
fn receive(fd: &OwnedFd, mut each: impl FnMut(&[u8])) -> io::Result<i32> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: reads into the buffer we own, at most its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + NLMSG_HDR <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or([0; 2]));
            if len < NLMSG_HDR || off + len > n {
                return Err(io::Error::from(io::ErrorKind::InvalidData));
            }
            match ty {
                NLMSG_DONE => return Ok(0),
                NLMSG_ERROR => {
                    let err = buf
                        .get(off + NLMSG_HDR..off + NLMSG_HDR + 4)
                        .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or([0; 4])))
                        .unwrap_or(0);
                    return Ok(-err);
                }
                _ => each(&buf[off + NLMSG_HDR..off + len]),
            }
            // NLMSG_ALIGN
            off += (len + 3) & !3;
        }
    }
}

/// The peer of an `inet_diag_sockid` (`idiag_dst`) of a socket of `family`, as the maps
/// store it.
fn peer(family: libc::c_int, id: &[u8]) -> Peer {
    let word = |i: usize| u32::from_ne_bytes([id[20 + 4 * i], id[21 + 4 * i], id[22 + 4 * i], id[23 + 4 * i]]);
    if family == libc::AF_INET {
        return Peer::V4(word(0));
    }
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&id[20..36]);
    Peer::of(IpAddr::V6(std::net::Ipv6Addr::from(octets)))
}

/// Destroy, in the namespace the thread is in, the connected UDP sockets (both families)
/// whose peer is one of `backends`, found by their destination alone: whether the hooks
/// still hold a reverse entry for them (`SOCK_REVNAT`, an LRU that evicts) or the
/// application dialled the pod itself, a socket connected to a backend that left every
/// frontend would keep sending to a deleted pod. Returns (destroyed, failed).
fn destroy_here(backends: &HashSet<(Peer, u16)>) -> io::Result<(usize, usize)> {
    let (mut destroyed, mut failed) = (0, 0);
    for family in [libc::AF_INET, libc::AF_INET6] {
        let dump = netlink_socket()?;
        send(&dump, &udp_request(family, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, None))?;
        let mut victims: Vec<Vec<u8>> = Vec::new();
        receive(&dump, |msg| {
            if msg.len() < DIAG_MSG {
                return;
            }
            let id = &msg[SOCKID_OFF..SOCKID_OFF + SOCKID_LEN];
            // inet_diag_sockid: sport, dport (big-endian u16), src[4], dst[4], if, cookie[2].
            let dport = u16::from_ne_bytes([id[2], id[3]]);
            // An unconnected socket's destination is all zero: it never matches.
            if backends.contains(&(peer(family, id), dport)) {
                victims.push(id.to_vec());
            }
        })?;
        if victims.is_empty() {
            continue;
        }
        let ctl = netlink_socket()?;
        for id in victims {
            send(&ctl, &udp_request(family, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, Some(&id)))?;
            match receive(&ctl, |_| {})? {
                0 => destroyed += 1,
                errno => {
                    debug!(errno, "SOCK_DESTROY refused");
                    failed += 1;
                }
            }
        }
    }
    Ok((destroyed, failed))
}

/// Destroy the connected UDP sockets connected to `backends` (address, port in network byte
/// order; backends the sync deleted, which no frontend uses any more), in every network
/// namespace of a process in the `cgroup` tree.
/// Their owners get ECONNABORTED on the next call and reconnect, through the hooks, to a
/// live backend (kube-proxy's conntrack flush for UDP, kube-proxy #48370, at the socket).
/// Uses sock_diag `SOCK_DESTROY` (CONFIG_INET_DIAG_DESTROY), from a thread that enters each
/// other namespace: sock_diag only sees the sockets of its own namespace. Other namespaces
/// (pods) are found through `/proc/<pid>/ns/net` and entered with setns, which needs the
/// host's PID namespace and CAP_SYS_ADMIN; without them only the agent's own namespace is
/// searched (node processes and hostNetwork pods).
pub fn destroy_udp_sockets(cgroup: &Path, backends: &[(IpAddr, u16)]) -> DestroyReport {
    let t = Instant::now();
    let wanted: HashSet<(Peer, u16)> = backends.iter().map(|(a, p)| (Peer::of(*a), *p)).collect();
    let mut namespaces = namespaces_in(cgroup);
    // The agent's own namespace (the host's) first, without entering it: in the DaemonSet
    // (hostNetwork, no hostPID) it is the one namespace always reachable.
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| (m.dev(), m.ino())).ok();
    let mut report = DestroyReport { namespaces: 1, ..Default::default() };
    match destroy_here(&wanted) {
        Ok((d, f)) => {
            report.destroyed += d;
            report.failed += f;
        }
        Err(e) => debug!(error = %e, "cannot search the host namespace for stale UDP sockets"),
    }
    if let Some(own) = own {
        namespaces.remove(&own);
    }
    report.namespaces += namespaces.len();
    for path in namespaces.values() {
        let result = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<(usize, usize)> {
                let ns = File::open(path)?;
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                destroy_here(&wanted)
            })
            .join()
        });
        match result {
            Ok(Ok((d, f))) => {
                report.destroyed += d;
                report.failed += f;
            }
            // The process (and maybe its namespace) went away meanwhile.
            Ok(Err(e)) => {
                debug!(netns = %path.display(), error = %e, "cannot search a namespace for stale UDP sockets")
            }
            Err(_) => debug!(netns = %path.display(), "stale-UDP search thread panicked"),
        }
    }
    report.elapsed = t.elapsed();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_laid_out_like_the_kernel_structs() {
        let id = [7u8; SOCKID_LEN];
        let m = udp_request(libc::AF_INET, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, Some(&id));
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), SOCK_DESTROY);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], libc::IPPROTO_UDP as u8);
        assert_eq!(&m[24..72], &id[..]);
        // An IPv6 socket's peer ::ffff:10.96.0.10 is the IPv4 peer 10.96.0.10.
        let mut id = [0u8; SOCKID_LEN];
        id[28..32].copy_from_slice(&[0, 0, 0xff, 0xff]);
        id[32..36].copy_from_slice(&[10, 96, 0, 10]);
        assert_eq!(peer(libc::AF_INET6, &id), Peer::V4(u32::from_ne_bytes([10, 96, 0, 10])));
        id[28] = 1;
        let v6 = std::net::Ipv6Addr::from([0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0xff, 0xff, 10, 96, 0, 10]);
        assert_eq!(peer(libc::AF_INET6, &id), Peer::V6(addr::ip6_to_map(v6)));
        id[20..24].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(peer(libc::AF_INET, &id), Peer::V4(u32::from_ne_bytes([10, 0, 0, 1])));
        assert_eq!(Peer::of("::ffff:10.0.0.1".parse().unwrap()), Peer::V4(u32::from_ne_bytes([10, 0, 0, 1])));
    }
}
