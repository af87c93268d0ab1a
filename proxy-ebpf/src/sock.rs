//! Socket-level load balancing: cgroup v2 `sock_addr` hooks that translate a frontend into a
//! backend when a socket connects (`connect4/6`: TCP, connected UDP) or sends (`sendmsg4/6`:
//! unconnected UDP), before any packet exists, and translate back what the application
//! reads (`recvmsg4/6`: the source of a datagram, `getpeername4/6`: the peer). Written once,
//! generic over the family (`SockFamily`: where the address sits in the hook's context and
//! which reverse map it uses); an IPv4-mapped address on an IPv6 socket
//! (`::ffff:a.b.c.d`) is served by the IPv4 maps. The same service
//! lookup and backend selection as the TC/XDP pipeline (`lb::select_backend`, session
//! affinity included) on the same maps, in the internal scope: the entries kube-proxy's
//! rules give node-originated traffic (ClusterIP with internalTrafficPolicy; NodePort,
//! ExternalIP and LoadBalancer frontends to all cluster endpoints, as upstream
//! short-circuits local traffic to external destinations). Shaped after Cilium's
//! `bpf_sock.c` (`__sock4_xlate_fwd` / `__sock4_xlate_rev`), written for these maps.
//!
//! A translated socket never touches conntrack: its packets carry the backend address from
//! the start, and the TC programs see them as non-service traffic. The socket is the state
//! for `connect()`; for unconnected UDP the backend given to a (socket, frontend) is kept in
//! `SOCK_UDP_BACKENDS` while the socket keeps sending, as conntrack keeps one per 5-tuple.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    maps::LruHashMap,
    programs::SockAddrContext,
};
use proxy_common::{
    Backend, Ipv6Words, PROTO_TCP, PROTO_UDP, SCOPE_INTERNAL, ServiceKey, ServiceValue, SockRevKey, SockRevValue,
    SockUdpKey, SockUdpValue, Verdict, service_cidr, sock_defaults, sock_flags, svc_flags,
};

use crate::{
    family::{Family, V4, V6},
    lb::{self, Selected},
    maps::{NODE_CONFIG, NODE_CONFIG6, SOCK_CONFIG, SOCK_REVNAT, SOCK_REVNAT6, SOCK_UDP_BACKENDS, SOCK_UDP_BACKENDS6},
    stats,
};

/// sock_addr programs return 1 to let the call go on, 0 to fail it (with the errno
/// `bpf_set_retval` set; EPERM without one).
const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;

/// What a frontend without endpoints answers, like kube-proxy's REJECT (an ICMP port
/// unreachable, which the client's kernel turns into ECONNREFUSED): here at once.
const ECONNREFUSED: i32 = 111;

/// Where a family's address sits in the hook's context, and its reverse-translation map.
/// Context fields are read and written one 32-bit word at a time, volatile: the verifier
/// accepts only 4-byte accesses to `user_ip6`, and LLVM would otherwise merge neighbours.
trait SockFamily: Family {
    /// The destination (connect, sendmsg) or peer (recvmsg, getpeername) address.
    fn user_addr(sa: *mut bpf_sock_addr) -> Self::Addr;
    fn set_user_addr(sa: *mut bpf_sock_addr, addr: Self::Addr);
    /// The socket's bound source address (all zero while unbound).
    fn bound_src(sa: *mut bpf_sock_addr) -> Self::Addr;
    /// The node's address of this family (what an unbound host socket's packets leave
    /// with), all zero when the agent wrote none.
    fn node_addr() -> Self::Addr;
    fn revnat() -> &'static LruHashMap<SockRevKey<Self::Addr>, SockRevValue<Self::Addr>>;
    /// The backends given to unconnected UDP sockets per frontend.
    fn udp_backends() -> &'static LruHashMap<SockUdpKey<Self::Addr>, SockUdpValue>;
    /// 127.0.0.0/8 or ::1: a frontend there (`--nodeport-localhost`) is the host's only.
    fn is_loopback(addr: Self::Addr) -> bool;
}

/// `bpf_sock_addr::sk`, always set for sock_addr programs.
#[inline(always)]
fn sk(sa: *mut bpf_sock_addr) -> *mut aya_ebpf::bindings::bpf_sock {
    // SAFETY: the context is valid for the whole program.
    unsafe { (*sa).__bindgen_anon_1.sk }
}

impl SockFamily for V4 {
    #[inline(always)]
    fn user_addr(sa: *mut bpf_sock_addr) -> u32 {
        // SAFETY: 4-byte read of a context field the verifier allows every sock_addr hook.
        unsafe { read_volatile(&raw const (*sa).user_ip4) }
    }
    #[inline(always)]
    fn set_user_addr(sa: *mut bpf_sock_addr, addr: u32) {
        // SAFETY: 4-byte write the verifier allows connect4/sendmsg4/recvmsg4/getpeername4.
        unsafe { write_volatile(&raw mut (*sa).user_ip4, addr) }
    }
    #[inline(always)]
    fn bound_src(sa: *mut bpf_sock_addr) -> u32 {
        let sk = sk(sa);
        if sk.is_null() {
            return 0;
        }
        // SAFETY: `sk` checked non-null; a 4-byte read of a `bpf_sock` field.
        unsafe { read_volatile(&raw const (*sk).src_ip4) }
    }
    #[inline(always)]
    fn node_addr() -> u32 {
        NODE_CONFIG.get(0).map_or(0, |c| c.snat_addr)
    }
    #[inline(always)]
    fn is_loopback(addr: u32) -> bool {
        // The map form holds the octets in wire order: the first is the lowest byte.
        addr.to_ne_bytes()[0] == 127
    }
    fn revnat() -> &'static LruHashMap<SockRevKey, SockRevValue> {
        &SOCK_REVNAT
    }
    fn udp_backends() -> &'static LruHashMap<SockUdpKey, SockUdpValue> {
        &SOCK_UDP_BACKENDS
    }
}

impl SockFamily for V6 {
    #[inline(always)]
    fn user_addr(sa: *mut bpf_sock_addr) -> Ipv6Words {
        let mut w = [0u32; 4];
        for (i, word) in w.iter_mut().enumerate() {
            // SAFETY: 4-byte reads of `user_ip6[i]`, as the verifier requires.
            *word = unsafe { read_volatile(&raw const (*sa).user_ip6[i]) };
        }
        w
    }
    #[inline(always)]
    fn set_user_addr(sa: *mut bpf_sock_addr, addr: Ipv6Words) {
        for (i, word) in addr.iter().enumerate() {
            // SAFETY: 4-byte writes of `user_ip6[i]`, allowed in the v6 hooks.
            unsafe { write_volatile(&raw mut (*sa).user_ip6[i], *word) };
        }
    }
    #[inline(always)]
    fn bound_src(sa: *mut bpf_sock_addr) -> Ipv6Words {
        let sk = sk(sa);
        let mut w = [0u32; 4];
        if sk.is_null() {
            return w;
        }
        for (i, word) in w.iter_mut().enumerate() {
            // SAFETY: `sk` checked non-null; 4-byte reads of `bpf_sock::src_ip6[i]`.
            *word = unsafe { read_volatile(&raw const (*sk).src_ip6[i]) };
        }
        w
    }
    #[inline(always)]
    fn node_addr() -> Ipv6Words {
        NODE_CONFIG6.get(0).map_or([0; 4], |c| c.snat_addr)
    }
    #[inline(always)]
    fn is_loopback(addr: Ipv6Words) -> bool {
        addr == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
    }
    fn revnat() -> &'static LruHashMap<SockRevKey<Ipv6Words>, SockRevValue<Ipv6Words>> {
        &SOCK_REVNAT6
    }
    fn udp_backends() -> &'static LruHashMap<SockUdpKey<Ipv6Words>, SockUdpValue> {
        &SOCK_UDP_BACKENDS6
    }
}

/// `::ffff:0:0/96` as the words of an address in network byte order.
const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// The IPv4 address of an IPv4-mapped IPv6 address.
#[inline(always)]
fn v4_mapped(a: &Ipv6Words) -> Option<u32> {
    (a[0] == V4_MAPPED_PREFIX[0] && a[1] == V4_MAPPED_PREFIX[1] && a[2] == V4_MAPPED_PREFIX[2]).then_some(a[3])
}

#[inline(always)]
fn mapped(a: u32) -> Ipv6Words {
    [V4_MAPPED_PREFIX[0], V4_MAPPED_PREFIX[1], V4_MAPPED_PREFIX[2], a]
}

/// Which forward hook runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `connect()`: the socket itself keeps the backend.
    Connect,
    /// `sendto()`/`sendmsg()` with an address: unconnected UDP, one decision per datagram.
    Send,
}

/// The socket as the hooks see it.
struct Sock {
    /// Is the socket in the host network namespace (the agent's)?
    host: bool,
    /// `--socket-lb=host-only`.
    host_only: bool,
    /// How long an unconnected UDP socket keeps its backend between datagrams, in ns.
    udp_timeout_ns: u64,
}

#[inline(always)]
fn sock_of(ctx: &SockAddrContext) -> Sock {
    let cfg = SOCK_CONFIG.get(0).copied().unwrap_or_default();
    let udp_timeout = if cfg.udp_timeout_secs == 0 { sock_defaults::UDP_TIMEOUT_SECS } else { cfg.udp_timeout_secs };
    // SAFETY: helper on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // Without a cookie written (never the case once the agent attached us) every socket
    // counts as the host's.
    let host = cfg.host_netns_cookie == 0 || netns == cfg.host_netns_cookie;
    Sock { host, host_only: cfg.flags & sock_flags::HOST_ONLY != 0, udp_timeout_ns: udp_timeout as u64 * 1_000_000_000 }
}

/// The client address session affinity is keyed by, as the TC path would see it: the
/// socket's bound source address, or for an unbound host socket the node's address (the
/// source its packets leave with). `None` for an unbound pod socket: its address is not
/// known before it connects, so an affinity service is left to the TC path, which keys
/// affinity by the pod's address (one affinity table for both paths). `bound` is the
/// socket's bound source in this family.
#[inline(always)]
fn affinity_client<F: SockFamily>(bound: F::Addr, sock: &Sock) -> Option<F::Addr> {
    if !F::is_unset(bound) {
        return Some(bound);
    }
    if sock.host {
        return Some(F::node_addr());
    }
    None
}

/// Frontends whose rules need the packet's source: loadBalancerSourceRanges. The node's own
/// sockets pass when the node's address is in the ranges (upstream lets local traffic
/// through the firewall chain only then); pod sockets are left to the TC path, which
/// checks the pod's address.
#[inline(always)]
fn source_ranges_allow<F: SockFamily>(svc: &ServiceValue, sock: &Sock) -> bool {
    if svc.flags & svc_flags::SOURCE_RANGES == 0 {
        return true;
    }
    if !sock.host {
        return false;
    }
    let node = F::node_addr();
    !F::is_unset(node) && F::source_allowed(svc.id, node)
}

/// What the forward hooks decided.
enum Forward<A> {
    /// Leave the call as it is.
    Untouched,
    /// Connect/send to this backend address and port instead.
    Backend(A, u16),
    /// Fail the call with ECONNREFUSED.
    Refuse,
}

/// The backend this unconnected UDP socket was given for the frontend `key` names, while
/// fresh (it sent there within the UDP timeout), picked for this service, and still existing
/// (the agent purges entries whose backend left the frontend, as it purges UDP conntrack;
/// the existence check covers the moment in between, as affinity does). Refreshes its age.
#[inline(always)]
fn udp_backend_kept<F: SockFamily>(
    key: &SockUdpKey<F::Addr>,
    svc: &ServiceValue,
    now: u64,
    timeout_ns: u64,
) -> Option<(u32, Backend<F::Addr>)> {
    let v = F::udp_backends().get_ptr_mut(key)?;
    // SAFETY: a pointer into the map value the helper returned, valid for this program run;
    // plain-old-data fields.
    let (backend_id, svc_id, last_used) = unsafe { ((*v).backend_id, (*v).svc_id, (*v).last_used) };
    if svc_id != svc.id || now.wrapping_sub(last_used) > timeout_ns {
        return None;
    }
    // SAFETY: plain-old-data copy out of the map value.
    let b = unsafe { F::backends().get(&backend_id).copied() }?;
    // SAFETY: as above; an 8-byte store into the value (a racing sender writes a time as
    // recent: either is right).
    unsafe { (*v).last_used = now };
    Some((backend_id, b))
}

/// connect and sendmsg: the backend for frontend `addr:port` (network byte order) of a
/// socket of protocol `proto`, recorded for the reverse hooks. `bound` is the socket's
/// bound source address in this family.
#[inline(always)]
fn forward<F: SockFamily>(
    ctx: &SockAddrContext,
    call: Call,
    proto: u32,
    addr: F::Addr,
    port: u16,
    bound: F::Addr,
) -> Forward<F::Addr> {
    let proto = match proto {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        // SCTP (multi-homed, several addresses per association) stays with the TC path.
        _ => return Forward::Untouched,
    };
    let key = ServiceKey { addr, port, proto, scope: SCOPE_INTERNAL };
    // SAFETY: plain-old-data copy out of the map value.
    let Some(svc) = (unsafe { F::services().get(&key).copied() }) else {
        return refuse_unserved::<F>(ctx, addr);
    };
    let sock = sock_of(ctx);
    // A pod's 127.0.0.1 is its own: NodePorts on loopback serve the host's sockets only.
    let foreign_loopback = !sock.host && F::is_loopback(addr);
    if (sock.host_only && !sock.host) || foreign_loopback || !source_ranges_allow::<F>(&svc, &sock) {
        return Forward::Untouched;
    }
    let client = if svc.flags & svc_flags::AFFINITY != 0 {
        match affinity_client::<F>(bound, &sock) {
            Some(c) => c,
            None => return Forward::Untouched,
        }
    } else {
        F::Addr::default()
    };
    let now = crate::ct::now();
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // Unconnected UDP keeps one backend per (socket, frontend) while it keeps sending.
    // Affinity services keep theirs through the affinity table, as before; a frontend
    // without endpoints refuses whatever a socket was given before.
    let sticky = call == Call::Send && proto == PROTO_UDP && svc.flags & svc_flags::AFFINITY == 0 && svc.count != 0;
    let ukey = SockUdpKey::new(cookie, addr, port);
    let kept = if sticky { udp_backend_kept::<F>(&ukey, &svc, now, sock.udp_timeout_ns) } else { None };
    let selected = match kept {
        Some((id, b)) => Selected::Backend(id, b),
        None => {
            // Maglev needs the flow's 5-tuple, and connect() has no source port yet; the
            // node choosing is the client's own, so agreement across nodes buys nothing
            // here: random (the flow hash 0 is never read without the MAGLEV flag).
            let mut random = svc;
            random.flags &= !svc_flags::MAGLEV;
            let s = lb::select_backend::<F>(&random, client, 0, now);
            if let (true, Selected::Backend(id, _)) = (sticky, &s) {
                // Best effort: without the entry the next datagram is balanced afresh.
                let v = SockUdpValue { backend_id: *id, svc_id: svc.id, last_used: now };
                let _ = F::udp_backends().insert(&ukey, &v, 0);
            }
            s
        }
    };
    match selected {
        Selected::Backend(_, b) => {
            let rev = SockRevValue { addr, port, _pad: 0, svc_id: svc.id };
            // Best effort: without the entry the application would see the backend's
            // address in recvmsg()/getpeername(); the connection itself works.
            let _ = F::revnat().insert(&SockRevKey::new(cookie, b.addr, b.port), &rev, 0);
            stats::count(Verdict::SockTranslate, F::STATS, svc.id, 0);
            Forward::Backend(b.addr, b.port)
        }
        Selected::Empty => {
            stats::count(Verdict::NoBackend, F::STATS, svc.id, 0);
            Forward::Refuse
        }
        // The agent is mid-update: leave the call as it is (the TC path, where it runs,
        // tries again per packet).
        Selected::Missing => {
            stats::count(Verdict::Error, F::STATS, svc.id, 0);
            Forward::Untouched
        }
    }
}

/// No frontend for the call's destination: inside a Service CIDR, an unallocated address
/// (or a ClusterIP's unserved port) fails at once with ECONNREFUSED, as the TC path
/// refuses its packets; anything else is left as it is. Sockets this mode leaves to TC
/// (`--socket-lb host-only`, pods) are left to it here too.
#[inline(always)]
fn refuse_unserved<F: SockFamily>(ctx: &SockAddrContext, addr: F::Addr) -> Forward<F::Addr> {
    let verdict = match F::service_cidr(addr) {
        service_cidr::CIDR => Verdict::UnallocatedServiceIp,
        service_cidr::CLUSTER_IP => Verdict::ClusterIpUnknownPort,
        _ => return Forward::Untouched,
    };
    let sock = sock_of(ctx);
    if sock.host_only && !sock.host {
        return Forward::Untouched;
    }
    stats::count(verdict, F::STATS, 0, 0);
    Forward::Refuse
}

/// The call's protocol and port (the big-endian port in the low 16 bits of `user_port`, as
/// the maps store it).
#[inline(always)]
fn proto_port(sa: *mut bpf_sock_addr) -> (u32, u16) {
    // SAFETY: 4-byte reads of context fields every sock_addr hook may read.
    unsafe { (read_volatile(&raw const (*sa).protocol), read_volatile(&raw const (*sa).user_port) as u16) }
}

#[inline(always)]
fn set_port(sa: *mut bpf_sock_addr, port: u16) {
    // SAFETY: 4-byte write the forward and reverse hooks may make.
    unsafe { write_volatile(&raw mut (*sa).user_port, port as u32) }
}

/// The return value of a forward hook for a decision.
#[inline(always)]
fn verdict_of(f: &Forward<impl Copy>) -> i32 {
    match f {
        Forward::Refuse => {
            // SAFETY: helper without preconditions; a negative errno is what it takes.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            SYS_REJECT
        }
        _ => SYS_PROCEED,
    }
}

/// connect4 and sendmsg4.
#[inline(always)]
pub fn forward4(ctx: &SockAddrContext, call: Call) -> i32 {
    let sa = ctx.sock_addr;
    let (proto, port) = proto_port(sa);
    let f = forward::<V4>(ctx, call, proto, V4::user_addr(sa), port, V4::bound_src(sa));
    if let Forward::Backend(addr, port) = f {
        V4::set_user_addr(sa, addr);
        set_port(sa, port);
    }
    verdict_of(&f)
}

/// connect6 and sendmsg6; an IPv4-mapped destination goes through the IPv4 maps.
#[inline(always)]
pub fn forward6(ctx: &SockAddrContext, call: Call) -> i32 {
    let sa = ctx.sock_addr;
    let (proto, port) = proto_port(sa);
    let addr = V6::user_addr(sa);
    if let Some(a4) = v4_mapped(&addr) {
        let bound = v4_mapped(&V6::bound_src(sa)).unwrap_or(0);
        let f = forward::<V4>(ctx, call, proto, a4, port, bound);
        if let Forward::Backend(b, port) = f {
            V6::set_user_addr(sa, mapped(b));
            set_port(sa, port);
        }
        return verdict_of(&f);
    }
    let f = forward::<V6>(ctx, call, proto, addr, port, V6::bound_src(sa));
    if let Forward::Backend(b, port) = f {
        V6::set_user_addr(sa, b);
        set_port(sa, port);
    }
    verdict_of(&f)
}

/// The frontend a backend `addr:port` this socket was sent to stands for.
#[inline(always)]
fn reverse<F: SockFamily>(ctx: &SockAddrContext, addr: F::Addr, port: u16) -> Option<SockRevValue<F::Addr>> {
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: plain-old-data copy out of the map value.
    unsafe { F::revnat().get(&SockRevKey::new(cookie, addr, port)).copied() }
}

/// recvmsg4 and getpeername4: a backend address this socket was sent to becomes the
/// frontend again. Must always let the call proceed (the kernel accepts nothing else).
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (_, port) = proto_port(sa);
    if let Some(v) = reverse::<V4>(ctx, V4::user_addr(sa), port) {
        V4::set_user_addr(sa, v.addr);
        set_port(sa, v.port);
    }
    SYS_PROCEED
}

/// recvmsg6 and getpeername6 (IPv4-mapped peers through the IPv4 map).
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (_, port) = proto_port(sa);
    let addr = V6::user_addr(sa);
    if let Some(a4) = v4_mapped(&addr) {
        if let Some(v) = reverse::<V4>(ctx, a4, port) {
            V6::set_user_addr(sa, mapped(v.addr));
            set_port(sa, v.port);
        }
        return SYS_PROCEED;
    }
    if let Some(v) = reverse::<V6>(ctx, addr, port) {
        V6::set_user_addr(sa, v.addr);
        set_port(sa, v.port);
    }
    SYS_PROCEED
}
