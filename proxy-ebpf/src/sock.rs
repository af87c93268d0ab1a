//! Socket-level load balancing: cgroup v2 `sock_addr` hooks that translate a frontend into a
//! backend when a socket connects (`connect4`: TCP, connected UDP) or sends (`sendmsg4`:
//! unconnected UDP), before any packet exists, and translate back what the application
//! reads (`recvmsg4`: the source of a datagram, `getpeername4`: the peer). The same service
//! lookup and backend selection as the TC/XDP pipeline (`lb::select_backend`, session
//! affinity included) on the same maps, in the internal scope: the entries kube-proxy's
//! rules give node-originated traffic (ClusterIP with internalTrafficPolicy; NodePort,
//! ExternalIP and LoadBalancer frontends to all cluster endpoints, as upstream
//! short-circuits local traffic to external destinations). Shaped after Cilium's
//! `bpf_sock.c` (`__sock4_xlate_fwd` / `__sock4_xlate_rev`), written for these maps.
//!
//! A translated socket never touches conntrack: its packets carry the backend address from
//! the start, and the TC programs see them as non-service traffic.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    PROTO_TCP, PROTO_UDP, SCOPE_INTERNAL, ServiceKey, ServiceValue, SockRevKey, SockRevValue, Verdict, sock_flags,
    svc_flags,
};

use crate::{
    family::{Family, V4},
    lb::{self, Selected},
    maps::{NODE_CONFIG, SOCK_CONFIG, SOCK_REVNAT},
    stats,
};

/// sock_addr programs return 1 to let the call go on, 0 to fail it (with the errno
/// `bpf_set_retval` set; EPERM without one).
const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;

/// What a frontend without endpoints answers, like kube-proxy's REJECT (an ICMP port
/// unreachable, which the client's kernel turns into ECONNREFUSED): here at once.
const ECONNREFUSED: i32 = 111;

/// The socket as the hooks see it.
struct Sock {
    /// Is the socket in the host network namespace (the agent's)?
    host: bool,
    /// `--socket-lb=host-only`.
    host_only: bool,
}

#[inline(always)]
fn sock_of(ctx: &SockAddrContext) -> Sock {
    let cfg = SOCK_CONFIG.get(0).copied().unwrap_or_default();
    // SAFETY: helper on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // Without a cookie written (never the case once the agent attached us) every socket
    // counts as the host's.
    let host = cfg.host_netns_cookie == 0 || netns == cfg.host_netns_cookie;
    Sock { host, host_only: cfg.flags & sock_flags::HOST_ONLY != 0 }
}

/// The client address session affinity is keyed by, as the TC path would see it: the
/// socket's bound source address, or for an unbound host socket the node's address (the
/// source its packets leave with). `None` for an unbound pod socket: its address is not
/// known before it connects, so an affinity service is left to the TC path, which keys
/// affinity by the pod's address (one affinity table for both paths).
#[inline(always)]
fn affinity_client(ctx: &SockAddrContext, sock: &Sock) -> Option<u32> {
    // SAFETY: `sk` is always set for sock_addr programs; the verifier checks the field
    // read through it (`bpf_sock::src_ip4`, network byte order, 0 while unbound).
    let bound = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() { 0 } else { (*sk).src_ip4 }
    };
    if bound != 0 {
        return Some(bound);
    }
    if sock.host {
        return Some(NODE_CONFIG.get(0).map_or(0, |c| c.snat_addr));
    }
    None
}

/// Frontends whose rules need the packet's source: loadBalancerSourceRanges. The node's own
/// sockets pass when the node's address is in the ranges (upstream lets local traffic
/// through the firewall chain only then); pod sockets are left to the TC path, which
/// checks the pod's address.
#[inline(always)]
fn source_ranges_allow(svc: &ServiceValue, sock: &Sock) -> bool {
    if svc.flags & svc_flags::SOURCE_RANGES == 0 {
        return true;
    }
    if !sock.host {
        return false;
    }
    let node = NODE_CONFIG.get(0).map_or(0, |c| c.snat_addr);
    node != 0 && V4::source_allowed(svc.id, node)
}

/// connect4 and sendmsg4: frontend -> backend in the call's address.
#[inline(always)]
fn forward4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context is valid for the whole program; the verifier checks each field
    // access (4-byte reads of user_ip4, user_port, protocol).
    let (proto, addr, port) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    let proto = match proto {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        // SCTP (multi-homed, several addresses per association) stays with the TC path.
        _ => return SYS_PROCEED,
    };
    // user_port holds the big-endian port in its low 16 bits, as the maps store it.
    let key = ServiceKey { addr, port: port as u16, proto, scope: SCOPE_INTERNAL };
    // SAFETY: plain-old-data copy out of the map value.
    let Some(svc) = (unsafe { V4::services().get(&key).copied() }) else {
        return SYS_PROCEED;
    };
    let sock = sock_of(ctx);
    if (sock.host_only && !sock.host) || !source_ranges_allow(&svc, &sock) {
        return SYS_PROCEED;
    }
    let client = if svc.flags & svc_flags::AFFINITY != 0 {
        match affinity_client(ctx, &sock) {
            Some(c) => c,
            None => return SYS_PROCEED,
        }
    } else {
        0
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match lb::select_backend::<V4>(&svc, client, now) {
        Selected::Backend(_, b) => {
            // SAFETY: helper on the program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
            let rev = SockRevValue { addr, port: port as u16, _pad: 0, svc_id: svc.id };
            // Best effort: without the entry the application would see the backend's
            // address in recvmsg()/getpeername(), the connection itself works.
            let _ = SOCK_REVNAT.insert(&SockRevKey::new(cookie, b.addr, b.port), &rev, 0);
            // SAFETY: 4-byte writes to the fields the verifier allows connect4/sendmsg4 to
            // rewrite.
            unsafe {
                (*sa).user_ip4 = b.addr;
                (*sa).user_port = b.port as u32;
            }
            stats::count(Verdict::SockTranslate, svc.id, 0);
            SYS_PROCEED
        }
        Selected::Empty => {
            // SAFETY: helper without preconditions; a negative errno is what it takes.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            stats::count(Verdict::NoBackend, svc.id, 0);
            SYS_REJECT
        }
        // The agent is mid-update: leave the call as it is (the TC path, where it runs,
        // tries again per packet).
        Selected::Missing => {
            stats::count(Verdict::Error, svc.id, 0);
            SYS_PROCEED
        }
    }
}

pub fn connect4(ctx: &SockAddrContext) -> i32 {
    forward4(ctx)
}

pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    forward4(ctx)
}

/// recvmsg4 and getpeername4: a backend address this socket was sent to becomes the
/// frontend again. Must always let the call proceed (the kernel accepts nothing else).
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: see `forward4`.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // SAFETY: plain-old-data copy out of the map value.
    if let Some(v) = unsafe { SOCK_REVNAT.get(&SockRevKey::new(cookie, addr, port as u16)).copied() } {
        // SAFETY: recvmsg4 and getpeername4 may rewrite these fields.
        unsafe {
            (*sa).user_ip4 = v.addr;
            (*sa).user_port = v.port as u32;
        }
    }
    SYS_PROCEED
}
