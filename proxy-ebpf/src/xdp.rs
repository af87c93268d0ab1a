//! XDP, the hook of the program on the node's uplink(s) (`from_uplink`): north-south
//! service traffic (NodePort on a node address, ExternalIPs, LoadBalancer ingress IPs). How
//! the driver reads, rewrites and forwards packets here, for the decisions `FromUplink`
//! gets:
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
use core::mem::{MaybeUninit, align_of, size_of};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_get_buff_len},
    programs::XdpContext,
};
use proxy_common::{
    Ipv6Words, NeighKey, PROTO_UDP, Verdict,
    dsr::{
        EXT6_HDR_LEN as DSR_EXT6_HDR_LEN, EXT6_LEN as DSR_EXT6_LEN, OPT4_LEN as DSR_OPT4_LEN,
        OPT4_TYPE as DSR_OPT4_TYPE, OPT6_DATA_LEN as DSR_OPT6_DATA_LEN, OPT6_OFF as DSR_OPT6_OFF,
        OPT6_TYPE as DSR_OPT6_TYPE, PADN as DSR_PADN,
    },
};

use crate::{
    csum,
    driver::{Hook, Rewrite},
    family::{V4, V6},
    handoff,
    hdr::{
        ETH_HLEN, IP_CSUM_OFF, IP_HLEN, IP_TOS_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF, IP6_HLEN, IP6_HOP_OFF, IP6_NEXT_OFF,
        IP6_PLEN_OFF, IPV4_VIHL, L4_DPORT_OFF, L4_PORTS_LEN, L4_SPORT_OFF, MACS_LEN, NEXT_DEST_OPTS, NEXT_HOP_BY_HOP,
    },
    icmp::IcmpFamily,
    parse::{MAX_L4_OFF, Packet, Parse},
    pipeline::{Nat, Seen},
    reject, wire,
};

/// The XDP hook.
pub struct Xdp;

impl Hook for Xdp {
    type Ctx = XdpContext;
    type Ret = u32;
    const SEEN: Seen = Seen::FromUplink;
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;
    const OTHER_L4: u32 = u32::MAX;

    #[inline(always)]
    fn data(ctx: &XdpContext) -> (usize, usize) {
        (ctx.data(), ctx.data_end())
    }

    #[inline(always)]
    fn len(ctx: &XdpContext) -> u32 {
        (ctx.data_end() - ctx.data()) as u32
    }

    /// Uplinks are one side to conntrack (`IFINDEX_UPLINK`, which `decide` puts in).
    #[inline(always)]
    fn ifindex(_ctx: &XdpContext) -> u32 {
        0
    }

    /// Checked against the linear part first: a frame without fragments (nearly all) is
    /// parsed without the helper call that measures a multi-buffer frame; one whose IP
    /// length runs past its linear part is parsed again with its whole length. The length
    /// only bounds the IP length, so the first parse succeeds only where the second would.
    ///
    /// The linear length is hidden from the compiler (`wire::opaque`): known to be
    /// `end - start`, it lets LLVM drop later bounds checks (a DSR option's) that the IP
    /// length implies, which the verifier cannot follow.
    #[inline(always)]
    fn parse<F: Parse>(ctx: &XdpContext) -> Result<Packet<F::Addr>, Verdict> {
        let (start, end) = (ctx.data(), ctx.data_end());
        match F::parse(start, end, wire::opaque(end - start)) {
            Err(Verdict::Malformed) => F::parse(ctx.data(), ctx.data_end(), frame_len(ctx)),
            r => r,
        }
    }

    /// An XDP frame's headers are in its linear part already.
    #[inline(always)]
    fn linearize(_ctx: &XdpContext) -> bool {
        true
    }
}

impl<F: XdpFamily> Rewrite<F> for Xdp {
    #[inline(always)]
    fn rewrite(ctx: &XdpContext, p: &Packet<F::Addr>, n: &Nat<F::Addr>) -> Result<(), ()> {
        nat::<F>(ctx, p, n)
    }

    /// Forwarded with the FIB; `no_route` when it cannot be.
    #[inline(always)]
    fn redirect(ctx: &XdpContext, proto: u8, n: &Nat<F::Addr>) -> Result<u32, Verdict> {
        fib_forward::<F>(ctx, proto, n).map_err(|()| Verdict::NoRoute)
    }

    /// A later fragment never gets here (`apply` drops it): a reset for TCP, else a drop.
    #[inline(always)]
    fn reject(ctx: &XdpContext, p: &Packet<F::Addr>) -> u32 {
        F::reset(ctx, p)
    }

    #[inline(always)]
    fn dsr_option(ctx: &XdpContext, vip: F::Addr, vport: u16) -> Result<(), Verdict> {
        F::dsr_option(ctx, vip, vport).map_err(|()| Verdict::Error)
    }

    #[inline(always)]
    fn dsr_too_big(ctx: &XdpContext, p: &Packet<F::Addr>) -> Option<u32> {
        F::dsr_too_big(ctx, p)
    }
}

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
    fn reset(ctx: &XdpContext, p: &Packet<Self::Addr>) -> u32;
    /// Direct server return: carry `vip`:`vport` to the backend's node (`proxy_common::dsr`).
    fn dsr_option(ctx: &XdpContext, vip: Self::Addr, vport: u16) -> Result<(), ()>;
    /// See `Rewrite::dsr_too_big`.
    fn dsr_too_big(ctx: &XdpContext, p: &Packet<Self::Addr>) -> Option<u32>;
}

impl XdpFamily for V4 {
    #[inline(always)]
    unsafe fn fib_params(ip: *const u8, fib: &mut FibParams, n: &Nat<u32>) -> u8 {
        // SAFETY: the caller guarantees a complete IPv4 header; writing union members.
        unsafe {
            fib.__bindgen_anon_1.tot_len = u16::from_be(wire::u16_at::<{ IP_TOT_LEN_OFF as i16 }>(ip));
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
            let old = wire::u16_at::<{ IP_TTL_OFF as i16 }>(ip);
            *ip.add(IP_TTL_OFF) = ttl - 1;
            let new = wire::u16_at::<{ IP_TTL_OFF as i16 }>(ip);
            let c = wire::u16_at::<{ IP_CSUM_OFF as i16 }>(ip);
            wire::set_u16::<{ IP_CSUM_OFF as i16 }>(ip, csum::replace2(c, old, new));
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
    #[inline(always)]
    fn dsr_option(ctx: &XdpContext, vip: u32, vport: u16) -> Result<(), ()> {
        dsr_option4(ctx, vip, vport)
    }
    /// The client is told the MTU less the option (`too_big_room`).
    #[inline(always)]
    fn dsr_too_big(ctx: &XdpContext, p: &Packet<u32>) -> Option<u32> {
        let room = too_big_room(ctx, DSR_OPT)?;
        Some(reject::xdp_frag_needed(ctx, p, room as u16))
    }
}

impl XdpFamily for V6 {
    #[inline(always)]
    unsafe fn fib_params(ip: *const u8, fib: &mut FibParams, n: &Nat<Ipv6Words>) -> u8 {
        // SAFETY: the caller guarantees a complete IPv6 header; writing union members.
        unsafe {
            fib.__bindgen_anon_1.tot_len = u16::from_be(wire::u16_at::<{ IP6_PLEN_OFF as i16 }>(ip)) + IP6_HLEN as u16;
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
    #[inline(always)]
    fn dsr_option(ctx: &XdpContext, vip: Ipv6Words, vport: u16) -> Result<(), ()> {
        dsr_option6(ctx, vip, vport)
    }
    /// As IPv4's, with the Destination Options header's 24 bytes and ICMPv6 Packet Too Big.
    #[inline(always)]
    fn dsr_too_big(ctx: &XdpContext, p: &Packet<Ipv6Words>) -> Option<u32> {
        let room = too_big_room(ctx, DSR_EXT6_LEN)?;
        Some(reject::xdp_packet_too_big6(ctx, p, room))
    }
}

/// If the frame grown by `grow` bytes would not fit the MTU of the uplink it came in on
/// (where XDP sends it back out), the MTU a client must keep to so that it fits: what the
/// ICMP error tells it. `None`: it fits. (A route out of another device is still checked by
/// the FIB lookup, which drops what does not fit as `no_route`.)
#[inline(always)]
fn too_big_room(ctx: &XdpContext, grow: usize) -> Option<u32> {
    // In: 0 = check the frame's own length; out: the device's (L3) MTU.
    let mut mtu: u32 = 0;
    // SAFETY: helper on our own context; `mtu` is a valid u32 on our stack.
    let rc = unsafe { bpf_check_mtu(ctx.ctx as *mut _, 0, &mut mtu, grow as i32, 0) };
    if rc != BPF_MTU_CHK_RET_FRAG_NEEDED as i64 {
        return None;
    }
    Some(mtu.saturating_sub(grow as u32))
}

/// Grow the frame by `GAP` bytes at its head and move its first `HDRS` bytes (Ethernet and
/// the fixed IP header) to the new start, leaving the gap right after them, where an IP
/// option or extension header goes. `T` is `[u8; HDRS + GAP]` (checked at compile time):
/// the bytes bounds-checked for the caller. Returns the frame's start.
#[inline(always)]
fn open_gap<const HDRS: usize, const GAP: usize, T>(ctx: &XdpContext) -> Result<*mut u8, ()> {
    const { assert!(size_of::<T>() == HDRS + GAP) };
    // SAFETY: helper on our own context; a negative delta grows the frame at its head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GAP as i32)) } != 0 {
        return Err(());
    }
    let hdrs = ptr_mut::<T>(ctx.data(), ctx.data_end(), 0).ok_or(())? as *mut u8;
    // SAFETY: every access is within the HDRS + GAP bytes checked just above.
    unsafe {
        // Move the headers forward, 2 bytes at a time from the front: the source is
        // always ahead of the destination, so nothing is overwritten before it is read.
        let mut i = 0;
        while i < HDRS {
            (hdrs.add(i) as *mut u16).write_unaligned((hdrs.add(i + GAP) as *const u16).read_unaligned());
            i += 2;
        }
    }
    Ok(hdrs)
}

/// The Ethernet and IPv4 headers the DSR option is inserted after.
const DSR_HDRS: usize = ETH_HLEN + IP_HLEN;
const DSR_OPT: usize = DSR_OPT4_LEN as usize;
/// The Ethernet and IPv6 headers the DSR extension header is inserted after.
const DSR_HDRS6: usize = ETH_HLEN + IP6_HLEN;

/// Insert the DSR option (`proxy_common::dsr`) after the IPv4 header of an option-less
/// packet: the frame grows by 8 bytes at its head, the Ethernet and IP headers move to the
/// new start, the option fills the gap they left. IHL, total length and the header
/// checksum follow; the L4 checksum does not change (its pseudo-header has the L4 length,
/// not the IP one).
#[inline(always)]
fn dsr_option4(ctx: &XdpContext, vip: u32, vport: u16) -> Result<(), ()> {
    // Only an IPv4 header without options gets one (the pipeline decides DSR for those).
    let ip = ptr_mut::<[u8; IP_HLEN]>(ctx.data(), ctx.data_end(), ETH_HLEN).ok_or(())? as *const u8;
    // SAFETY: within the IPv4 header checked above.
    if unsafe { *ip } != IPV4_VIHL {
        return Err(());
    }
    let hdrs = open_gap::<DSR_HDRS, DSR_OPT, [u8; DSR_HDRS + DSR_OPT]>(ctx)?;
    // SAFETY: every access is within the DSR_HDRS + DSR_OPT bytes `open_gap` checked.
    unsafe {
        let opt = hdrs.add(DSR_HDRS);
        *opt = DSR_OPT4_TYPE;
        *opt.add(1) = DSR_OPT4_LEN;
        (opt.add(2) as *mut u16).write_unaligned(vport);
        (opt.add(4) as *mut u32).write_unaligned(vip);
        let ip = hdrs.add(ETH_HLEN);
        let vihl_word = ip as *mut u16;
        let old_vihl = vihl_word.read_unaligned();
        *ip = IPV4_VIHL + (DSR_OPT / 4) as u8;
        let new_vihl = vihl_word.read_unaligned();
        let tot_len = ip.add(IP_TOT_LEN_OFF) as *mut u16;
        let old_len = tot_len.read_unaligned();
        let new_len = (u16::from_be(old_len) + DSR_OPT as u16).to_be();
        tot_len.write_unaligned(new_len);
        let ip_csum = ip.add(IP_CSUM_OFF) as *mut u16;
        let mut c = csum::replace2(ip_csum.read_unaligned(), old_vihl, new_vihl);
        c = csum::replace2(c, old_len, new_len);
        // The option's two words enter the sum (replacing the zero they were not).
        c = csum::replace4(c, 0, (opt as *const u32).read_unaligned());
        c = csum::replace4(c, 0, (opt.add(4) as *const u32).read_unaligned());
        ip_csum.write_unaligned(c);
    }
    Ok(())
}

/// Insert the DSR Destination Options header (`proxy_common::dsr`) right after the fixed
/// IPv6 header, as `dsr_option4` does the option: it takes over the fixed header's next
/// header, which becomes 60, and the payload length grows by its 24 bytes. No checksum
/// changes: IPv6 has no header checksum, and the L4 pseudo-header has the upper-layer
/// length. A packet with a hop-by-hop header (which must stay first) gets none: an error.
#[inline(always)]
fn dsr_option6(ctx: &XdpContext, vip: Ipv6Words, vport: u16) -> Result<(), ()> {
    let ip = ptr_mut::<[u8; IP6_HLEN]>(ctx.data(), ctx.data_end(), ETH_HLEN).ok_or(())? as *const u8;
    // SAFETY: within the IPv6 header checked above.
    let next = unsafe { *ip.add(IP6_NEXT_OFF) };
    if next == NEXT_HOP_BY_HOP {
        return Err(());
    }
    let hdrs = open_gap::<DSR_HDRS6, DSR_EXT6_LEN, [u8; DSR_HDRS6 + DSR_EXT6_LEN]>(ctx)?;
    // SAFETY: every access is within the DSR_HDRS6 + DSR_EXT6_LEN bytes `open_gap` checked.
    unsafe {
        let ext = hdrs.add(DSR_HDRS6);
        *ext = next;
        *ext.add(1) = DSR_EXT6_HDR_LEN;
        let opt = ext.add(DSR_OPT6_OFF);
        *opt = DSR_OPT6_TYPE;
        *opt.add(1) = DSR_OPT6_DATA_LEN;
        (opt.add(2) as *mut u16).write_unaligned(vport);
        (opt.add(4) as *mut Ipv6Words).write_unaligned(vip);
        let pad = opt.add(2 + DSR_OPT6_DATA_LEN as usize);
        *pad = DSR_PADN;
        *pad.add(1) = 0;
        let ip = hdrs.add(ETH_HLEN);
        *ip.add(IP6_NEXT_OFF) = NEXT_DEST_OPTS;
        let plen = ip.add(IP6_PLEN_OFF) as *mut u16;
        plen.write_unaligned((u16::from_be(plen.read_unaligned()) + DSR_EXT6_LEN as u16).to_be());
    }
    Ok(())
}

/// Rewrite the packet's addresses and ports to `n`, updating the IP header checksum (IPv4)
/// and the TCP/UDP checksum (pseudo-header addresses and ports). A UDP checksum of 0 means
/// "none" and stays 0 (IPv4; RFC 768); a computed 0 is sent as 0xffff. A later fragment
/// has no L4 header: only its addresses change (the datagram's L4 checksum is in the first
/// fragment, updated there for the whole datagram).
#[inline(always)]
fn nat<F: XdpFamily>(ctx: &XdpContext, p: &Packet<F::Addr>, n: &Nat<F::Addr>) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + F::HLEN > end {
        return Err(());
    }
    // The pseudo-header difference it returns is for TC's helper; the L4 checksum is fixed
    // below.
    // SAFETY: a complete IP header of this family follows the Ethernet header (checked
    // just above).
    unsafe { F::nat_addrs((start + ETH_HLEN) as *mut u8, p, n) };
    if p.no_l4() {
        return Ok(());
    }
    // Masked so the verifier sees a bounded offset (IPv4 options or IPv6 extension headers
    // put it at most a few hundred bytes in).
    let l4_off = p.l4_off & MAX_L4_OFF;
    let csum_field = p.l4_csum_field();
    // The L4 header through its checksum field (TCP, UDP), or the ports (SCTP).
    let l4_need = match csum_field {
        Some(f) => f + 2,
        None => L4_PORTS_LEN,
    };
    if start + l4_off + l4_need > end {
        return Err(());
    }
    // SAFETY: all accesses are within the bounds checked above.
    unsafe {
        let l4 = (start + l4_off) as *mut u8;
        if let Some(off) = csum_field {
            // Bounded for the verifier: the checksum field is at 6 (UDP) or 16 (TCP).
            let l4_csum = l4.add(off & 0x1f);
            let mut c = wire::u16_at::<0>(l4_csum);
            if !(p.proto == PROTO_UDP && c == 0) {
                if n.saddr != p.saddr {
                    c = csum::replace_addr::<F>(c, p.saddr, n.saddr);
                }
                if n.daddr != p.daddr {
                    c = csum::replace_addr::<F>(c, p.daddr, n.daddr);
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
                wire::set_u16::<0>(l4_csum, c);
            }
        }
        wire::set_u16::<{ L4_SPORT_OFF as i16 }>(l4, n.sport);
        wire::set_u16::<{ L4_DPORT_OFF as i16 }>(l4, n.dport);
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
    if start + ETH_HLEN + F::HLEN > end {
        return Err(());
    }
    let ip = (start + ETH_HLEN) as *mut u8;
    let ingress = ctx.ingress_ifindex() as u32;
    let mut slot = MaybeUninit::uninit();
    let fib = fib_zeroed(&mut slot);
    fib.family = F::AF;
    fib.l4_protocol = proto;
    fib.sport = n.sport;
    fib.dport = n.dport;
    fib.ifindex = ingress;
    // SAFETY: a complete IP header of this family is at `ip` (checked above).
    let ttl = unsafe { F::fib_params(ip, fib, n) };
    if ttl <= 1 {
        return Err(());
    }
    // SAFETY: `fib` is a properly sized, initialised parameter block on our stack.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), fib, size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // On NO_NEIGH the kernel has filled in the egress ifindex and, for a gatewayed
        // route, the gateway as the destination: exactly the neighbour to resolve.
        let now = crate::ct::now();
        let _ = F::neigh_misses().insert(&NeighKey { ifindex: fib.ifindex, addr: F::fib_next_hop(fib) }, &now, 0);
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

/// `slot` as a zeroed `bpf_fib_lookup` block, in 16 word stores. `mem::zeroed` would be a
/// call to the linker's `memset`, a loop of one byte per iteration (bpf-linker has LLVM
/// expand memcpy in order, which leaves every memset to that call): 52-64 iterations per
/// forwarded packet. Zeroed in place: a block returned by value was zeroed again by memset.
#[inline(always)]
pub fn fib_zeroed(slot: &mut MaybeUninit<FibParams>) -> &mut FibParams {
    const WORDS: usize = size_of::<FibParams>() / 4;
    const _: () = assert!(size_of::<FibParams>().is_multiple_of(4) && align_of::<FibParams>() >= 4);
    let w = slot.as_mut_ptr() as *mut u32;
    let mut i = 0;
    while i < WORDS {
        // SAFETY: word `i` lies within the block (a whole number of aligned words). Volatile,
        // so that the stores are not merged back into a memset.
        unsafe { w.add(i).write_volatile(0) };
        i += 1;
    }
    // SAFETY: every byte was written; zero is a valid `bpf_fib_lookup` (plain integers and
    // unions of integers).
    unsafe { slot.assume_init_mut() }
}

/// Length of the whole frame, fragments (multi-buffer XDP) included.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: helper on our own context.
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}
