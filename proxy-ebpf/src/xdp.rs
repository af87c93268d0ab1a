//! XDP on the node's uplink(s): north-south service traffic (NodePort on a node address,
//! ExternalIPs, LoadBalancer ingress IPs), looked up in `SERVICES` with `SCOPE_EXTERNAL`.
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
//! Checksums are updated incrementally (RFC 1624, eqn. 3): XDP has no checksum helpers.
//! This assumes complete checksums, which is what arrives from a wire; see docs/datapath.md
//! for CHECKSUM_PARTIAL packets from a local veth peer.
use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    programs::XdpContext,
    EbpfContext,
};
use proxy_common::{
    backend_flags, ct_flags, svc_flags, verdict, NeighKey, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL,
};

use crate::{
    lb::{self, Selected},
    maps::NEIGH_MISSES,
    parse::{self, Packet, ETH_HLEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::{count_global, count_service},
};

const AF_INET: u8 = 2;
const IP_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
/// Ethernet + IPv4 without options + TCP without options: the size of a reset we send.
const RST_FRAME_LEN: usize = ETH_HLEN + IP_HLEN + TCP_HLEN;

#[inline(always)]
fn ptr_mut<T>(start: usize, end: usize, off: usize) -> Option<*mut T> {
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Fold a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), for a 16-bit field. Values are as stored in
/// the packet (read natively); the one's-complement sum does not care about byte order as
/// long as every word is read the same way.
#[inline(always)]
pub fn csum_replace2(csum: u16, old: u16, new: u16) -> u16 {
    !fold(!csum as u32 + !old as u32 + new as u32)
}

/// RFC 1624 eqn. 3 for a 32-bit field (two 16-bit words).
#[inline(always)]
pub fn csum_replace4(csum: u16, old: u32, new: u32) -> u16 {
    let s = !csum as u32
        + (!old & 0xffff)
        + (!old >> 16)
        + (new & 0xffff)
        + (new >> 16);
    !fold(s)
}

/// Rewrite the packet's addresses and ports to `saddr:sport -> daddr:dport`, updating the
/// IP header checksum and the TCP/UDP checksum (pseudo-header addresses and ports). A UDP
/// checksum of 0 means "none" and stays 0; a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
fn nat(ctx: &XdpContext, p: &Packet, saddr: u32, sport: u16, daddr: u32, dport: u16) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = ptr_mut::<[u8; IP_HLEN]>(start, end, ETH_HLEN).ok_or(())? as *mut u8;
    // Masked so the verifier sees a bounded offset (IHL makes it at most 14 + 60).
    let l4_off = p.l4_off & 0x7f;
    // SAFETY: all accesses are within the bounds checked above and below.
    unsafe {
        let ip_csum = ip.add(10) as *mut u16;
        let mut c = ip_csum.read_unaligned();
        if saddr != p.saddr {
            c = csum_replace4(c, p.saddr, saddr);
            (ip.add(12) as *mut u32).write_unaligned(saddr);
        }
        if daddr != p.daddr {
            c = csum_replace4(c, p.daddr, daddr);
            (ip.add(16) as *mut u32).write_unaligned(daddr);
        }
        ip_csum.write_unaligned(c);

        let csum_off = match p.proto {
            PROTO_TCP => {
                ptr_mut::<[u8; TCP_HLEN]>(start, end, l4_off).ok_or(())?;
                Some(16)
            }
            PROTO_UDP => {
                ptr_mut::<[u8; 8]>(start, end, l4_off).ok_or(())?;
                Some(6)
            }
            // SCTP: CRC32c over the payload only, nothing to fix for addresses.
            _ => {
                ptr_mut::<[u8; 4]>(start, end, l4_off).ok_or(())?;
                None
            }
        };
        let l4 = (start + l4_off) as *mut u8;
        if let Some(off) = csum_off {
            let l4_csum = l4.add(off) as *mut u16;
            let mut c = l4_csum.read_unaligned();
            if !(p.proto == PROTO_UDP && c == 0) {
                if saddr != p.saddr {
                    c = csum_replace4(c, p.saddr, saddr);
                }
                if daddr != p.daddr {
                    c = csum_replace4(c, p.daddr, daddr);
                }
                if sport != p.sport {
                    c = csum_replace2(c, p.sport, sport);
                }
                if dport != p.dport {
                    c = csum_replace2(c, p.dport, dport);
                }
                if p.proto == PROTO_UDP && c == 0 {
                    c = 0xffff;
                }
                l4_csum.write_unaligned(c);
            }
        }
        (l4 as *mut u16).write_unaligned(sport);
        (l4.add(2) as *mut u16).write_unaligned(dport);
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
fn fib_forward(ctx: &XdpContext, proto: u8, sport: u16, dport: u16) -> Result<u32, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = ptr_mut::<[u8; IP_HLEN]>(start, end, ETH_HLEN).ok_or(())? as *mut u8;
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: the zeroed struct is a valid `bpf_fib_lookup` (plain integers and unions of
    // integers); packet reads are within the bounds checked above.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    let ttl = unsafe {
        fib.family = AF_INET;
        fib.l4_protocol = proto;
        fib.sport = sport;
        fib.dport = dport;
        fib.__bindgen_anon_1.tot_len = u16::from_be((ip.add(2) as *const u16).read_unaligned());
        fib.ifindex = ingress;
        fib.__bindgen_anon_2.tos = *ip.add(1);
        fib.__bindgen_anon_3.ipv4_src = (ip.add(12) as *const u32).read_unaligned();
        fib.__bindgen_anon_4.ipv4_dst = (ip.add(16) as *const u32).read_unaligned();
        *ip.add(8)
    };
    if ttl <= 1 {
        return Err(());
    }
    // SAFETY: `fib` is a properly sized, initialised parameter block on our stack.
    let rc = unsafe {
        bpf_fib_lookup(ctx.as_ptr(), &mut fib, size_of::<FibParams>() as i32, 0)
    };
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
    let eth = ptr_mut::<[u8; 12]>(start, end, 0).ok_or(())?;
    // SAFETY: bounds checked above (eth and the fixed IPv4 header).
    unsafe {
        let eth = &mut *eth;
        eth[..6].copy_from_slice(&fib.dmac);
        eth[6..].copy_from_slice(&fib.smac);
        let ttl_word = ip.add(8) as *mut u16;
        let old = ttl_word.read_unaligned();
        *ip.add(8) = ttl - 1;
        let new = ttl_word.read_unaligned();
        let ip_csum = ip.add(10) as *mut u16;
        ip_csum.write_unaligned(csum_replace2(ip_csum.read_unaligned(), old, new));
    }
    if fib.ifindex == ingress {
        Ok(xdp_action::XDP_TX)
    } else {
        // SAFETY: helper without preconditions; returns XDP_REDIRECT (or XDP_ABORTED).
        Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as u32)
    }
}

/// Forward a translated packet, counting `v` on success and `no_route` otherwise.
#[inline(always)]
fn forward(ctx: &XdpContext, svc_id: u32, v: u32, len: u32, proto: u8, sport: u16, dport: u16) -> u32 {
    match fib_forward(ctx, proto, sport, dport) {
        Ok(action) => {
            count_service(svc_id, v, len);
            action
        }
        Err(()) => {
            count_service(svc_id, verdict::NO_ROUTE, len);
            xdp_action::XDP_DROP
        }
    }
}

/// Sum of a header's 16-bit words as big-endian numbers (for a checksum built from scratch).
#[inline(always)]
fn sum_words<const N: usize>(b: &[u8; N]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < N {
        s += ((b[i] as u32) << 8) | b[i + 1] as u32;
        i += 2;
    }
    s
}

/// Answer a TCP segment to a service without endpoints with a reset, in place: the client
/// fails fast (like kube-proxy's REJECT) instead of retrying SYNs into a drop. Anything
/// else (UDP, a RST, IP options) is dropped; building an ICMP error would need to grow the
/// frame and quote the original, which this does not do yet.
#[inline(always)]
fn reject(ctx: &XdpContext, p: &Packet) -> u32 {
    if p.proto != PROTO_TCP || p.tcp_flags & TCP_RST != 0 || p.l4_off != ETH_HLEN + IP_HLEN {
        return xdp_action::XDP_DROP;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(hdr) = ptr_mut::<[u8; RST_FRAME_LEN]>(start, end, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: the whole Ethernet + IPv4 + TCP header block is within bounds.
    let (macs, ip_len, seq, ack, doff) = unsafe {
        let h = &*hdr;
        let mut macs = [0u8; 12];
        macs.copy_from_slice(&h[..12]);
        let ip_len = u16::from_be_bytes([h[16], h[17]]) as u32;
        let t = ETH_HLEN + IP_HLEN;
        let seq = u32::from_be_bytes([h[t + 4], h[t + 5], h[t + 6], h[t + 7]]);
        let ack = u32::from_be_bytes([h[t + 8], h[t + 9], h[t + 10], h[t + 11]]);
        (macs, ip_len, seq, ack, ((h[t + 12] >> 4) as u32) * 4)
    };
    // RFC 9293 3.10.7.1: reply to a segment with ACK by seq = its ack; otherwise seq 0 and
    // ack = its seq + segment length (SYN and FIN count one each).
    let (rst_seq, rst_ack, flags) = if p.tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let payload = ip_len.saturating_sub(IP_HLEN as u32 + doff);
        let ctl = (p.tcp_flags & TCP_SYN != 0) as u32 + (p.tcp_flags & TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(payload + ctl), TCP_RST | TCP_ACK)
    };
    // The whole frame, fragments included: shrinking by only the linear part would leave
    // the original's trailing bytes behind the reset.
    // SAFETY: helper on our own context.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as i32;
    if len > RST_FRAME_LEN as i32 {
        // SAFETY: shrinking the frame we own; pointers are re-derived afterwards.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, RST_FRAME_LEN as i32 - len) } != 0 {
            return xdp_action::XDP_DROP;
        }
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(hdr) = ptr_mut::<[u8; RST_FRAME_LEN]>(start, end, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked just above.
    let h = unsafe { &mut *hdr };
    h[..6].copy_from_slice(&macs[6..]);
    h[6..12].copy_from_slice(&macs[..6]);
    let (s, d) = (p.daddr.to_ne_bytes(), p.saddr.to_ne_bytes());
    let mut ip = [0u8; IP_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_HLEN + TCP_HLEN) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = PROTO_TCP;
    ip[12..16].copy_from_slice(&s);
    ip[16..20].copy_from_slice(&d);
    let c = !fold(sum_words(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = [0u8; TCP_HLEN];
    tcp[0..2].copy_from_slice(&p.dport.to_ne_bytes());
    tcp[2..4].copy_from_slice(&p.sport.to_ne_bytes());
    tcp[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    // Pseudo-header: addresses, protocol, TCP length.
    let pseudo = sum_words(&s) + sum_words(&d) + PROTO_TCP as u32 + TCP_HLEN as u32;
    let c = !fold(pseudo + sum_words(&tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    h[ETH_HLEN..ETH_HLEN + IP_HLEN].copy_from_slice(&ip);
    h[ETH_HLEN + IP_HLEN..].copy_from_slice(&tcp);
    xdp_action::XDP_TX
}

/// Length of the whole frame, fragments (multi-buffer XDP) included.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: helper on our own context.
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

pub fn from_uplink(ctx: &XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let p = match parse::parse(ctx.data(), ctx.data_end(), frame_len(ctx)) {
        Ok(p) => p,
        Err(v) => {
            count_global(v, len);
            return xdp_action::XDP_PASS;
        }
    };

    // A remote backend answering a flow we source-NATed: undo both translations and send
    // it back to the client.
    if let Some(ct) = lb::ct_reply(&p) {
        if ct.flags & ct_flags::SNAT != 0 {
            if nat(ctx, &p, ct.nat_addr, ct.nat_port, ct.snat_addr, ct.snat_port).is_err() {
                count_service(ct.svc_id, verdict::ERROR, len);
                return xdp_action::XDP_DROP;
            }
            return forward(ctx, ct.svc_id, verdict::REVERSE_NAT, len, p.proto, ct.nat_port, ct.snat_port);
        }
        // The reply of a pod's own flow to a backend on another node: `to_pod` on that
        // pod's veth restores the VIP.
        count_global(verdict::PASS, len);
        return xdp_action::XDP_PASS;
    }

    // Tracked flow: same backend (and SNAT port) as its first packet, even if the backend
    // or the service has gone since; a SYN on a closed tuple is a new connection, which
    // first gives back the old connection's reply entry and SNAT port.
    if let Some(ct) = lb::ct_forward(&p) {
        if p.tcp_syn() && ct.flags & ct_flags::CLOSING != 0 {
            lb::ct_release_reply(&p, &ct);
        } else {
            if ct.flags & ct_flags::SNAT != 0 {
                if nat(ctx, &p, ct.snat_addr, ct.snat_port, ct.nat_addr, ct.nat_port).is_err() {
                    count_service(ct.svc_id, verdict::ERROR, len);
                    return xdp_action::XDP_DROP;
                }
                return forward(ctx, ct.svc_id, verdict::ESTABLISHED, len, p.proto, ct.snat_port, ct.nat_port);
            }
            if nat(ctx, &p, p.saddr, p.sport, ct.nat_addr, ct.nat_port).is_err() {
                count_service(ct.svc_id, verdict::ERROR, len);
                return xdp_action::XDP_DROP;
            }
            count_service(ct.svc_id, verdict::ESTABLISHED, len);
            return xdp_action::XDP_PASS;
        }
    }

    let Some(svc) = lb::service_lookup(&p, SCOPE_EXTERNAL) else {
        count_global(verdict::PASS, len);
        return xdp_action::XDP_PASS;
    };
    if !lb::source_allowed(&svc, p.saddr) {
        count_service(svc.id, verdict::SOURCE_RANGE_DROP, len);
        return xdp_action::XDP_DROP;
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (backend_id, b) = match lb::select_backend(&svc, p.saddr, now) {
        Selected::Backend(id, b) => (id, b),
        Selected::Empty => {
            count_service(svc.id, verdict::NO_BACKEND, len);
            return reject(ctx, &p);
        }
        Selected::Missing => {
            count_service(svc.id, verdict::ERROR, len);
            return xdp_action::XDP_DROP;
        }
    };

    // Local backend (always the case with externalTrafficPolicy: Local): DNAT only, so the
    // pod sees the client's address, and let the stack deliver it.
    if b.flags & backend_flags::LOCAL != 0 || svc.flags & svc_flags::LOCAL_ONLY != 0 {
        if let Err(e) = lb::ct_create(&p, svc.id, backend_id, &b, now) {
            count_service(svc.id, e.verdict(), len);
            return xdp_action::XDP_DROP;
        }
        if nat(ctx, &p, p.saddr, p.sport, b.addr, b.port).is_err() {
            count_service(svc.id, verdict::ERROR, len);
            return xdp_action::XDP_DROP;
        }
        count_service(svc.id, verdict::NEW_FLOW, len);
        return xdp_action::XDP_PASS;
    }

    // Remote backend: its replies must come back through this node to be un-NATed, so the
    // source becomes this node's address (the one the client used if the agent set none).
    let cfg = lb::node_config();
    let snat_addr = if cfg.snat_addr != 0 { cfg.snat_addr } else { p.daddr };
    let port = match lb::ct_create_snat(&p, svc.id, backend_id, &b, snat_addr, &cfg, now) {
        Ok(port) => port,
        Err(e) => {
            count_service(svc.id, e.verdict(), len);
            return xdp_action::XDP_DROP;
        }
    };
    if nat(ctx, &p, snat_addr, port, b.addr, b.port).is_err() {
        count_service(svc.id, verdict::ERROR, len);
        return xdp_action::XDP_DROP;
    }
    forward(ctx, svc.id, verdict::NEW_FLOW, len, p.proto, port, b.port)
}
