//! XDP on the node's uplink(s): north-south service traffic (NodePort on a node address,
//! ExternalIPs, LoadBalancer ingress IPs). A rewriter of `pipeline::decide(.., Uplink)`:
//!
//! - Local backend: DNAT, `XDP_PASS`; the stack routes the packet to the pod. Replies leave
//!   through the uplink, where `to_uplink` (TC egress) puts the frontend back as source.
//! - Remote backend: DNAT + SNAT to this node's address with a port of our own, then
//!   forwarded with `bpf_fib_lookup` + `XDP_TX`/`bpf_redirect`. `XDP_PASS` is not an
//!   option: the kernel drops a forwarded packet whose source is a local address (martian).
//!   The backend's replies come back to the SNAT address; their reply entry (`SNAT`) undoes
//!   both translations and they are forwarded to the client the same way.
//! - Everything else is passed untouched.
//!
//! Checksums are updated incrementally (RFC 1624, `csum.rs`): XDP has no checksum helpers.
//! This assumes complete checksums, which is what arrives from a wire; see docs/datapath.md
//! for CHECKSUM_PARTIAL packets from a local veth peer.
use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect, bpf_xdp_get_buff_len},
    programs::XdpContext,
    EbpfContext,
};
use proxy_common::{NeighKey, Verdict, PROTO_UDP};

use crate::{
    csum,
    maps::NEIGH_MISSES,
    parse::{
        self, Packet, ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_HLEN, IP_SRC_OFF, IP_TOS_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF,
        L4_DPORT_OFF, L4_SPORT_OFF,
    },
    pipeline::{self, Action, Hook, Nat},
    reject, stats,
};

const AF_INET: u8 = 2;
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

/// Rewrite the packet's addresses and ports to `n`, updating the IP header checksum and the
/// TCP/UDP checksum (pseudo-header addresses and ports). A UDP checksum of 0 means "none"
/// and stays 0; a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
fn nat(ctx: &XdpContext, p: &Packet, n: &Nat) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = ptr_mut::<[u8; IP_HLEN]>(start, end, ETH_HLEN).ok_or(())? as *mut u8;
    // Masked so the verifier sees a bounded offset (IHL makes it at most 14 + 60).
    let l4_off = p.l4_off & 0x7f;
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

        let l4 = (start + l4_off) as *mut u8;
        if let Some(off) = csum_field {
            // Bounded for the verifier: the checksum field is at 6 (UDP) or 16 (TCP).
            let l4_csum = l4.add(off & 0x1f) as *mut u16;
            let mut c = l4_csum.read_unaligned();
            if !(p.proto == PROTO_UDP && c == 0) {
                if n.saddr != p.saddr {
                    c = csum::replace4(c, p.saddr, n.saddr);
                }
                if n.daddr != p.daddr {
                    c = csum::replace4(c, p.daddr, n.daddr);
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
/// lookup for its destination, MACs from the neighbour table, TTL decremented, then out of
/// the same interface (`XDP_TX`) or another one (`bpf_redirect`).
///
/// `Err` when it cannot be forwarded: no route, TTL expired, or no neighbour entry for the
/// next hop yet. XDP cannot resolve neighbours, so the miss is queued in `NEIGH_MISSES`
/// for the agent, which asks the kernel to resolve it; the client's retransmission then
/// goes through.
#[inline(always)]
fn fib_forward(ctx: &XdpContext, proto: u8, n: &Nat) -> Result<u32, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = ptr_mut::<[u8; IP_HLEN]>(start, end, ETH_HLEN).ok_or(())? as *mut u8;
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: the zeroed struct is a valid `bpf_fib_lookup` (plain integers and unions of
    // integers); packet reads are within the bounds checked above.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    let ttl = unsafe {
        fib.family = AF_INET;
        fib.l4_protocol = proto;
        fib.sport = n.sport;
        fib.dport = n.dport;
        fib.__bindgen_anon_1.tot_len = u16::from_be((ip.add(IP_TOT_LEN_OFF) as *const u16).read_unaligned());
        fib.ifindex = ingress;
        fib.__bindgen_anon_2.tos = *ip.add(IP_TOS_OFF);
        fib.__bindgen_anon_3.ipv4_src = n.saddr;
        fib.__bindgen_anon_4.ipv4_dst = n.daddr;
        *ip.add(IP_TTL_OFF)
    };
    if ttl <= 1 {
        return Err(());
    }
    // SAFETY: `fib` is a properly sized, initialised parameter block on our stack.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut fib, size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // On NO_NEIGH the kernel has filled in the egress ifindex and, for a gatewayed
        // route, the gateway as ipv4_dst: exactly the neighbour to resolve.
        // SAFETY: reading the union member the kernel wrote.
        let addr = unsafe { fib.__bindgen_anon_4.ipv4_dst };
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        let _ = NEIGH_MISSES.insert(NeighKey { ifindex: fib.ifindex, addr }, now, 0);
        return Err(());
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Err(());
    }
    let eth = ptr_mut::<[u8; MACS_LEN]>(start, end, 0).ok_or(())?;
    // SAFETY: bounds checked above (eth and the fixed IPv4 header).
    unsafe {
        let eth = &mut *eth;
        eth[..6].copy_from_slice(&fib.dmac);
        eth[6..].copy_from_slice(&fib.smac);
        // TTL shares a 16-bit checksum word with the protocol byte.
        let ttl_word = ip.add(IP_TTL_OFF) as *mut u16;
        let old = ttl_word.read_unaligned();
        *ip.add(IP_TTL_OFF) = ttl - 1;
        let new = ttl_word.read_unaligned();
        let ip_csum = ip.add(IP_CSUM_OFF) as *mut u16;
        ip_csum.write_unaligned(csum::replace2(ip_csum.read_unaligned(), old, new));
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

pub fn from_uplink(ctx: &XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let (ret, verdict, svc_id) = match parse::parse(ctx.data(), ctx.data_end(), frame_len(ctx)) {
        Ok(p) => {
            let d = pipeline::decide(&p, Hook::Uplink);
            let (ret, verdict) = match &d.action {
                Action::Pass => (xdp_action::XDP_PASS, d.verdict),
                Action::Drop => (xdp_action::XDP_DROP, d.verdict),
                Action::Reject => (reject::tcp_reset(ctx, &p), d.verdict),
                Action::Rewrite(n) => match nat(ctx, &p, n) {
                    Ok(()) => (xdp_action::XDP_PASS, d.verdict),
                    Err(()) => (xdp_action::XDP_DROP, Verdict::Error),
                },
                Action::Forward(n) => match nat(ctx, &p, n).map(|()| fib_forward(ctx, p.proto, n)) {
                    Ok(Ok(action)) => (action, d.verdict),
                    Ok(Err(())) => (xdp_action::XDP_DROP, Verdict::NoRoute),
                    Err(()) => (xdp_action::XDP_DROP, Verdict::Error),
                },
                // Only TC bounces.
                Action::Bounce(_) => (xdp_action::XDP_DROP, Verdict::Error),
            };
            (ret, verdict, d.svc_id)
        }
        Err(v) => (xdp_action::XDP_PASS, v, None),
    };
    stats::count(verdict, svc_id, len);
    ret
}
