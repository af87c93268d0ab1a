//! XDP on the node's uplink(s): north-south service traffic (NodePort on a node address,
//! ExternalIPs, LoadBalancer ingress IPs). A rewriter of `pipeline::decide(.., Uplink)`:
//!
//! - Local backend: DNAT, `XDP_PASS`; the stack routes the packet to the pod. Replies leave
//!   through the uplink, where `to_uplink` (TC egress) puts the frontend back as source.
//! - Remote backend: DNAT + SNAT to this node's address with a port of our own, then
//!   forwarded with `bpf_fib_lookup` + `XDP_TX` (out of the uplink it came in on), or,
//!   towards another device (a tunnel of an overlay CNI, another NIC), tagged for the
//!   uplink's TC ingress to redirect (`handoff`). A bare `XDP_PASS` is not an option: the
//!   kernel drops a forwarded packet whose source is a local address (martian).
//!   The backend's replies come back to the SNAT address; their reply entry (`SNAT`) undoes
//!   both translations and they are forwarded to the client the same way.
//! - Everything else is passed untouched.
//!
//! Checksums are updated incrementally (RFC 1624, `csum.rs`): XDP has no checksum helpers.
//! This assumes complete checksums, which is what arrives from a wire; see docs/datapath.md
//! for CHECKSUM_PARTIAL packets from a local veth peer.
use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect, bpf_xdp_get_buff_len},
    programs::XdpContext,
};
use proxy_common::{Ipv6Words, NeighKey, PROTO_UDP, StatsFamily, Verdict};

use crate::{
    csum,
    ct::CtWork,
    family::{V4, V6},
    frag, handoff,
    icmp::{self, IcmpFamily, Side},
    parse::{
        self, ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_HLEN, IP_SRC_OFF, IP_TOS_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF,
        IP6_DST_OFF, IP6_HLEN, IP6_HOP_OFF, IP6_PLEN_OFF, IP6_SRC_OFF, L3, L4_DPORT_OFF, L4_SPORT_OFF, Packet,
    },
    pipeline::{self, Action, Decision, Hook, Nat},
    reject, stats,
};

/// The Ethernet addresses (destination, source) at the start of the frame.
const MACS_LEN: usize = 12;
/// Bytes of the SCTP header we touch (ports only: its CRC32c does not cover addresses).
const PORTS_LEN: usize = 4;

#[inline(always)]
fn ptr_mut<T>(start: usize, end: usize, off: usize) -> Option<*mut T> {
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// What differs between the families on the uplink: the IP header's layout and checksum,
/// the FIB lookup's parameters, the hop limit, and the reset.
trait XdpFamily: IcmpFamily {
    /// Rewrite the IP header's addresses (and its checksum, where it has one).
    fn nat_l3(ctx: &XdpContext, p: &Packet<Self::Addr>, n: &Nat<Self::Addr>) -> Result<(), ()>;
    /// The L4 checksum after an address in its pseudo-header changed.
    fn csum_addr(c: u16, old: Self::Addr, new: Self::Addr) -> u16;
    /// Fill the FIB lookup for `n` from the IP header at `ip`; returns the TTL / hop limit.
    ///
    /// # Safety
    /// `ip` must point at a complete IP header of this family.
    unsafe fn fib_params(ip: *const u8, fib: &mut FibParams, n: &Nat<Self::Addr>) -> u8;
    /// Decrement the TTL / hop limit (fixing the IPv4 header checksum).
    ///
    /// # Safety
    /// `ip` must point at a complete, writable IP header of this family.
    unsafe fn dec_ttl(ip: *mut u8, ttl: u8);
    /// The next hop the FIB lookup reported (for a NO_NEIGH result).
    fn fib_next_hop(fib: &FibParams) -> Self::Addr;
    const IP_HLEN: usize;
    fn reset(ctx: &XdpContext, p: &Packet<Self::Addr>) -> u32;
}

impl XdpFamily for V4 {
    const IP_HLEN: usize = IP_HLEN;
    #[inline(always)]
    fn nat_l3(ctx: &XdpContext, p: &Packet<u32>, n: &Nat<u32>) -> Result<(), ()> {
        let ip = ptr_mut::<[u8; IP_HLEN]>(ctx.data(), ctx.data_end(), ETH_HLEN).ok_or(())? as *mut u8;
        // SAFETY: within the IPv4 header checked above.
        unsafe {
            let ip_csum = ip.add(IP_CSUM_OFF) as *mut u16;
            let mut c = ip_csum.read_unaligned();
            if n.saddr != p.saddr {
                c = csum::replace4(c, p.saddr, n.saddr);
                (ip.add(IP_SRC_OFF) as *mut u32).write_unaligned(n.saddr);
            }
            if n.daddr != p.daddr {
                c = csum::replace4(c, p.daddr, n.daddr);
                (ip.add(IP_DST_OFF) as *mut u32).write_unaligned(n.daddr);
            }
            ip_csum.write_unaligned(c);
        }
        Ok(())
    }
    #[inline(always)]
    fn csum_addr(c: u16, old: u32, new: u32) -> u16 {
        csum::replace4(c, old, new)
    }
    #[inline(always)]
    unsafe fn fib_params(ip: *const u8, fib: &mut FibParams, n: &Nat<u32>) -> u8 {
        // SAFETY: the caller guarantees a complete IPv4 header; writing union members.
        unsafe {
            fib.__bindgen_anon_1.tot_len = u16::from_be((ip.add(IP_TOT_LEN_OFF) as *const u16).read_unaligned());
            fib.__bindgen_anon_2.tos = *ip.add(IP_TOS_OFF);
            fib.__bindgen_anon_3.ipv4_src = n.saddr;
            fib.__bindgen_anon_4.ipv4_dst = n.daddr;
            *ip.add(IP_TTL_OFF)
        }
    }
    #[inline(always)]
    unsafe fn dec_ttl(ip: *mut u8, ttl: u8) {
        // SAFETY: the caller guarantees a complete, writable IPv4 header.
        unsafe {
            // TTL shares a 16-bit checksum word with the protocol byte.
            let ttl_word = ip.add(IP_TTL_OFF) as *mut u16;
            let old = ttl_word.read_unaligned();
            *ip.add(IP_TTL_OFF) = ttl - 1;
            let new = ttl_word.read_unaligned();
            let ip_csum = ip.add(IP_CSUM_OFF) as *mut u16;
            ip_csum.write_unaligned(csum::replace2(ip_csum.read_unaligned(), old, new));
        }
    }
    #[inline(always)]
    fn fib_next_hop(fib: &FibParams) -> u32 {
        // SAFETY: reading the union member the kernel wrote for AF_INET.
        unsafe { fib.__bindgen_anon_4.ipv4_dst }
    }
    #[inline(always)]
    fn reset(ctx: &XdpContext, p: &Packet<u32>) -> u32 {
        reject::xdp_reset(ctx, p)
    }
}

impl XdpFamily for V6 {
    const IP_HLEN: usize = IP6_HLEN;
    #[inline(always)]
    fn nat_l3(ctx: &XdpContext, p: &Packet<Ipv6Words>, n: &Nat<Ipv6Words>) -> Result<(), ()> {
        let ip = ptr_mut::<[u8; IP6_HLEN]>(ctx.data(), ctx.data_end(), ETH_HLEN).ok_or(())? as *mut u8;
        // SAFETY: within the IPv6 header checked above (no header checksum in IPv6).
        unsafe {
            if n.saddr != p.saddr {
                (ip.add(IP6_SRC_OFF) as *mut Ipv6Words).write_unaligned(n.saddr);
            }
            if n.daddr != p.daddr {
                (ip.add(IP6_DST_OFF) as *mut Ipv6Words).write_unaligned(n.daddr);
            }
        }
        Ok(())
    }
    #[inline(always)]
    fn csum_addr(mut c: u16, old: Ipv6Words, new: Ipv6Words) -> u16 {
        let mut i = 0;
        while i < 4 {
            c = csum::replace4(c, old[i], new[i]);
            i += 1;
        }
        c
    }
    #[inline(always)]
    unsafe fn fib_params(ip: *const u8, fib: &mut FibParams, n: &Nat<Ipv6Words>) -> u8 {
        // SAFETY: the caller guarantees a complete IPv6 header; writing union members.
        unsafe {
            fib.__bindgen_anon_1.tot_len =
                u16::from_be((ip.add(IP6_PLEN_OFF) as *const u16).read_unaligned()) + IP6_HLEN as u16;
            fib.__bindgen_anon_3.ipv6_src = n.saddr;
            fib.__bindgen_anon_4.ipv6_dst = n.daddr;
            *ip.add(IP6_HOP_OFF)
        }
    }
    #[inline(always)]
    unsafe fn dec_ttl(ip: *mut u8, ttl: u8) {
        // SAFETY: the caller guarantees a complete, writable IPv6 header.
        unsafe { *ip.add(IP6_HOP_OFF) = ttl - 1 };
    }
    #[inline(always)]
    fn fib_next_hop(fib: &FibParams) -> Ipv6Words {
        // SAFETY: reading the union member the kernel wrote for AF_INET6.
        unsafe { fib.__bindgen_anon_4.ipv6_dst }
    }
    #[inline(always)]
    fn reset(ctx: &XdpContext, p: &Packet<Ipv6Words>) -> u32 {
        reject::xdp_reset6(ctx, p)
    }
}

/// Rewrite the packet's addresses and ports to `n`, updating the IP header checksum (IPv4)
/// and the TCP/UDP checksum (pseudo-header addresses and ports). A UDP checksum of 0 means
/// "none" and stays 0 (IPv4; RFC 768); a computed 0 is sent as 0xffff. A later fragment
/// has no L4 header: only its addresses change (the datagram's L4 checksum is in the first
/// fragment, updated there for the whole datagram).
#[inline(always)]
fn nat<F: XdpFamily>(ctx: &XdpContext, p: &Packet<F::Addr>, n: &Nat<F::Addr>) -> Result<(), ()> {
    F::nat_l3(ctx, p, n)?;
    if p.no_l4() {
        return Ok(());
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    // Masked so the verifier sees a bounded offset (IPv4 options or IPv6 extension headers
    // put it at most a few hundred bytes in).
    let l4_off = p.l4_off & 0x3ff;
    let csum_field = p.l4_csum_field();
    // The L4 header through its checksum field (TCP, UDP), or the ports (SCTP).
    let l4_need = match csum_field {
        Some(f) => f + 2,
        None => PORTS_LEN,
    };
    if start + l4_off + l4_need > end {
        return Err(());
    }
    // SAFETY: all accesses are within the bounds checked above.
    unsafe {
        let l4 = (start + l4_off) as *mut u8;
        if let Some(off) = csum_field {
            // Bounded for the verifier: the checksum field is at 6 (UDP) or 16 (TCP).
            let l4_csum = l4.add(off & 0x1f) as *mut u16;
            let mut c = l4_csum.read_unaligned();
            if !(p.proto == PROTO_UDP && c == 0) {
                if n.saddr != p.saddr {
                    c = F::csum_addr(c, p.saddr, n.saddr);
                }
                if n.daddr != p.daddr {
                    c = F::csum_addr(c, p.daddr, n.daddr);
                }
                if n.sport != p.sport {
                    c = csum::replace2(c, p.sport, n.sport);
                }
                if n.dport != p.dport {
                    c = csum::replace2(c, p.dport, n.dport);
                }
                if p.proto == PROTO_UDP && c == 0 {
                    c = 0xffff;
                }
                l4_csum.write_unaligned(c);
            }
        }
        (l4.add(L4_SPORT_OFF) as *mut u16).write_unaligned(n.sport);
        (l4.add(L4_DPORT_OFF) as *mut u16).write_unaligned(n.dport);
    }
    Ok(())
}

/// Route the (already translated) packet like the kernel would, without the kernel: FIB
/// lookup for its destination, MACs from the neighbour table, TTL / hop limit decremented,
/// then out of the same interface (`XDP_TX`) or another one (`handoff`, else `bpf_redirect`).
///
/// `Err` when it cannot be forwarded: no route, TTL expired, or no neighbour entry for the
/// next hop yet. XDP cannot resolve neighbours (ARP or NDP), so the miss is queued for the
/// agent, which asks the kernel to resolve it; the client's retransmission then goes
/// through.
#[inline(always)]
fn fib_forward<F: XdpFamily>(ctx: &XdpContext, proto: u8, n: &Nat<F::Addr>) -> Result<u32, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + F::IP_HLEN > end {
        return Err(());
    }
    let ip = (start + ETH_HLEN) as *mut u8;
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: the zeroed struct is a valid `bpf_fib_lookup` (plain integers and unions of
    // integers); the IP header is within the bounds checked above.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = F::AF;
    fib.l4_protocol = proto;
    fib.sport = n.sport;
    fib.dport = n.dport;
    fib.ifindex = ingress;
    // SAFETY: a complete IP header of this family is at `ip` (checked above).
    let ttl = unsafe { F::fib_params(ip, &mut fib, n) };
    if ttl <= 1 {
        return Err(());
    }
    // SAFETY: `fib` is a properly sized, initialised parameter block on our stack.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut fib, size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // On NO_NEIGH the kernel has filled in the egress ifindex and, for a gatewayed
        // route, the gateway as the destination: exactly the neighbour to resolve.
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        let _ = F::neigh_misses().insert(&NeighKey { ifindex: fib.ifindex, addr: F::fib_next_hop(&fib) }, &now, 0);
        return Err(());
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Err(());
    }
    // SAFETY: bounds checked above (the IP header).
    unsafe { F::dec_ttl(ip, ttl) };
    // Out of another device: it may be one XDP cannot transmit on (a tunnel); the uplink's
    // TC ingress sends it there (`handoff`). Without XDP metadata, a plain redirect.
    if fib.ifindex != ingress && handoff::tag(ctx, fib.ifindex) {
        return Ok(xdp_action::XDP_PASS);
    }
    // Fresh bounds: the metadata helper invalidated the earlier ones.
    let (start, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_mut::<[u8; MACS_LEN]>(start, end, 0).ok_or(())?;
    // SAFETY: bounds checked just above (the Ethernet addresses).
    unsafe {
        let eth = &mut *eth;
        eth[..6].copy_from_slice(&fib.dmac);
        eth[6..].copy_from_slice(&fib.smac);
    }
    if fib.ifindex == ingress {
        Ok(xdp_action::XDP_TX)
    } else {
        // SAFETY: helper without preconditions; returns XDP_REDIRECT (or XDP_ABORTED).
        Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as u32)
    }
}

/// Length of the whole frame, fragments (multi-buffer XDP) included.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: helper on our own context.
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

/// Parse, decide, apply, count once (here, for every packet of the family; a frame of
/// neither family is counted by `from_uplink`). Not inlined: each family gets its own BPF
/// function and stack frame, and returning only the action keeps the caller's frame empty
/// (the verifier adds up the frames of a call chain, 512 bytes at most).
#[inline(never)]
fn handle<F: XdpFamily>(ctx: &XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let (ret, verdict, svc_id) = if F::OUTLINE { staged::<F>(ctx) } else { inlined::<F>(ctx) };
    if verdict == Verdict::OtherL4 {
        return OTHER_L4;
    }
    stats::count(verdict, F::STATS, svc_id, len);
    ret
}

/// What `handle` returns for a frame of another L4 protocol: its caller then runs
/// `icmp_error`, as a sibling call so the two frames never add up on the stack.
const OTHER_L4: u32 = u32::MAX;

/// IPv4: the steps inlined into one function, their state on its stack.
#[inline(always)]
fn inlined<F: XdpFamily>(ctx: &XdpContext) -> (u32, Verdict, u32) {
    let mut slot = core::mem::MaybeUninit::uninit();
    let ct = CtWork::zeroed_in(&mut slot);
    match F::parse(ctx.data(), ctx.data_end(), frame_len(ctx)) {
        Ok(p) => {
            let d = pipeline::decide::<F>(&p, Hook::Uplink, 0, ct);
            let (ret, verdict) = apply::<F>(ctx, &p, &d);
            frag::remember::<F>(&p, &d);
            (ret, verdict, d.svc_id)
        }
        Err(v) => (xdp_action::XDP_PASS, v, 0),
    }
}

/// ICMP errors about translated flows (see `icmp`): rewritten, then forwarded like the
/// flow's packets (source-NATed flows) or handed to the stack (a local backend). Anything
/// else of another L4 protocol passes untouched. A BPF function of its own: rare, and off
/// the fast path's stack.
#[inline(never)]
fn icmp_error<F: XdpFamily>(ctx: &XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let (ret, verdict, svc_id) = icmp_translate::<F>(ctx);
    stats::count(verdict, F::STATS, svc_id, len);
    ret
}

#[inline(always)]
fn icmp_translate<F: XdpFamily>(ctx: &XdpContext) -> (u32, Verdict, u32) {
    let untouched = (xdp_action::XDP_PASS, Verdict::OtherL4, 0);
    let Some(e) = icmp::parse::<F>(ctx.data(), ctx.data_end()) else {
        return untouched;
    };
    let Some((t, forward, svc_id)) = icmp::decide::<F>(&e, Side::Uplink) else {
        return untouched;
    };
    if !icmp::rewrite::<F>(ctx.data(), ctx.data_end(), &e, &t) {
        return (xdp_action::XDP_DROP, Verdict::Error, svc_id);
    }
    if !forward {
        return (xdp_action::XDP_PASS, Verdict::IcmpError, svc_id);
    }
    let to = Nat { saddr: t.outer_src, sport: 0, daddr: t.outer_dst, dport: 0 };
    match fib_forward::<F>(ctx, F::PROTO_ICMP, &to) {
        Ok(action) => (action, Verdict::IcmpError, svc_id),
        Err(()) => (xdp_action::XDP_DROP, Verdict::NoRoute, svc_id),
    }
}

/// IPv6: each step a BPF function of its own, their state in the per-CPU `Work` (see
/// `Family::OUTLINE`), so only one step's frame is on the stack at a time.
#[inline(always)]
fn staged<F: XdpFamily>(ctx: &XdpContext) -> (u32, Verdict, u32) {
    let Some(w) = pipeline::work::<F>() else {
        return (xdp_action::XDP_PASS, Verdict::Error, 0);
    };
    if let Err(v) = parse_step::<F>(ctx, &mut w.p) {
        return (xdp_action::XDP_PASS, v, 0);
    }
    decide_step::<F>(&w.p, &mut w.ct, &mut w.d);
    let (ret, verdict) = apply_step::<F>(ctx, &w.p, &w.d);
    if w.p.frag == frag::Frag::First {
        remember_step::<F>(&w.p, &w.d);
    }
    (ret, verdict, w.d.svc_id)
}

#[inline(never)]
fn parse_step<F: XdpFamily>(ctx: &XdpContext, out: &mut Packet<F::Addr>) -> Result<(), Verdict> {
    *out = F::parse(ctx.data(), ctx.data_end(), frame_len(ctx))?;
    Ok(())
}

#[inline(never)]
fn decide_step<F: XdpFamily>(p: &Packet<F::Addr>, ct: &mut CtWork<F::Addr>, out: &mut Decision<F::Addr>) {
    *out = pipeline::decide::<F>(p, Hook::Uplink, 0, ct);
}

#[inline(never)]
fn remember_step<F: XdpFamily>(p: &Packet<F::Addr>, d: &Decision<F::Addr>) {
    frag::remember::<F>(p, d);
}

#[inline(never)]
fn apply_step<F: XdpFamily>(ctx: &XdpContext, p: &Packet<F::Addr>, d: &Decision<F::Addr>) -> (u32, Verdict) {
    apply::<F>(ctx, p, d)
}

/// Carry out a decision; a failed rewrite or forward turns into a counted drop.
#[inline(always)]
fn apply<F: XdpFamily>(ctx: &XdpContext, p: &Packet<F::Addr>, d: &Decision<F::Addr>) -> (u32, Verdict) {
    match d.action {
        Action::Pass => (xdp_action::XDP_PASS, d.verdict),
        Action::Drop => (xdp_action::XDP_DROP, d.verdict),
        // A later fragment has no header to answer about: dropped.
        Action::Reject if p.no_l4() => (xdp_action::XDP_DROP, d.verdict),
        Action::Reject => (F::reset(ctx, p), d.verdict),
        Action::Rewrite => match nat::<F>(ctx, p, &d.nat) {
            Ok(()) => (xdp_action::XDP_PASS, d.verdict),
            Err(()) => (xdp_action::XDP_DROP, Verdict::Error),
        },
        Action::Forward => match nat::<F>(ctx, p, &d.nat).map(|()| fib_forward::<F>(ctx, p.proto, &d.nat)) {
            Ok(Ok(action)) => (action, d.verdict),
            Ok(Err(())) => (xdp_action::XDP_DROP, Verdict::NoRoute),
            Err(()) => (xdp_action::XDP_DROP, Verdict::Error),
        },
        // Only TC bounces.
        Action::Bounce => (xdp_action::XDP_DROP, Verdict::Error),
    }
}

pub fn from_uplink(ctx: &XdpContext) -> u32 {
    match parse::l3(ctx.data(), ctx.data_end()) {
        Ok(L3::V4) => match handle::<V4>(ctx) {
            OTHER_L4 => icmp_error::<V4>(ctx),
            ret => ret,
        },
        Ok(L3::V6) => match handle::<V6>(ctx) {
            OTHER_L4 => icmp_error::<V6>(ctx),
            ret => ret,
        },
        Err(v) => {
            stats::count(v, StatsFamily::Other, 0, (ctx.data_end() - ctx.data()) as u32);
            xdp_action::XDP_PASS
        }
    }
}
