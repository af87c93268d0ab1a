//! ICMP errors about translated flows (ICMP destination unreachable — fragmentation needed
//! included —, time exceeded, parameter problem; ICMPv6 destination unreachable, packet too
//! big, time exceeded, parameter problem). The error quotes the packet as it travelled,
//! translated; its recipient matches it to a socket by the quoted addresses and ports, so
//! they are translated back the way the flow's own packets are, and the outer header with
//! them — what netfilter's NAT does for conntrack's RELATED packets. Without it a client
//! never learns of a smaller path MTU behind a Service (a large upload stalls) and gets no
//! port unreachable or TTL exceeded either.
//!
//! The quoted packet belongs to one of a flow's two directions, found by its reversed tuple:
//! - *about a forward packet* (client -> backend as translated; sent by the backend or a
//!   router on the way to it): the reversed tuple is the flow's reply entry. The quote gets
//!   the frontend back as destination (and the client as source if it was source-NATed),
//!   the outer header goes to the client, from the frontend if the backend itself sent it.
//! - *about a reply* (backend -> client as translated, i.e. frontend -> client; sent by the
//!   client or a router on the way to it): the reversed tuple is the forward entry. The
//!   quote gets the backend back as source, the outer header goes to the backend.
//!
//! Only errors whose outer and quoted IP headers are plain (IPv4 without options, IPv6
//! without extension headers) and quote TCP or UDP are translated; others pass untouched
//! (`other_l4`, as before). A quote too short to hold the TCP checksum (RFC 792 promises only
//! 8 bytes of it) gets its ports translated and that checksum left alone, as netfilter does.
use proxy_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CtKey, CtValue, Ipv6Words, PROTO_TCP, PROTO_UDP, ct_flags};

use crate::{
    csum,
    family::{Family, V4, V6},
    hdr::{
        ETH_HLEN, ICMP_CSUM_OFF, ICMP_DEST_UNREACH, ICMP_HLEN, ICMP_PARAMETER_PROB, ICMP_TIME_EXCEEDED,
        ICMP6_DEST_UNREACH, ICMP6_PARAM_PROB, IP_CSUM_OFF, IP_DST_OFF, IP_HLEN, IP_PROTO_OFF, IP_SRC_OFF, IP6_DST_OFF,
        IP6_HLEN, IP6_NEXT_OFF, IP6_SRC_OFF, IPV4_VIHL, L4_DPORT_OFF, L4_SPORT_OFF, PROTO_ICMP, PROTO_ICMP6,
        TCP_CSUM_OFF, UDP_CSUM_OFF,
    },
    parse::Packet,
    pipeline::{Nat, Seen},
    wire,
};

/// Of the quoted transport header only the first 8 bytes (the ports, and UDP's checksum)
/// are guaranteed to be there.
const QUOTED_L4: usize = 8;

/// What differs between the families: header layout, ICMP's protocol number and error
/// types, and which checksums cover an address.
pub trait IcmpFamily: Family {
    /// Length of a plain IP header (IPv4 without options, IPv6 without extension headers).
    const HLEN: usize;
    const PROTO_ICMP: u8;
    const SRC_OFF: usize;
    const DST_OFF: usize;
    /// The IP header checksum's offset (IPv6 has none).
    const IP_CSUM: Option<usize>;
    /// ICMPv6's checksum covers a pseudo-header with the outer addresses; ICMP's does not.
    const PSEUDO: bool;
    fn is_error(icmp_type: u8) -> bool;
    /// The protocol of a plain IP header of this family at `ip`, or `None`.
    ///
    /// # Safety
    /// `ip` must point at `HLEN` readable bytes.
    unsafe fn plain_proto(ip: *const u8) -> Option<u8>;
    /// Write `n`'s addresses where they differ from `p`'s into the IP header at `ip`, and
    /// fix IPv4's header checksum (always complete, so by hand, RFC 1624). Returns the
    /// difference they make to the L4 pseudo-header (`csum::addr_diff`, 0 when neither
    /// changed), computed in the same pass: TC hands it to the kernel's checksum helper;
    /// XDP, which fixes the L4 checksum word by word, drops it (inlined, it costs nothing).
    ///
    /// # Safety
    /// `ip` must point at `HLEN` writable bytes of packet data.
    unsafe fn nat_addrs(ip: *mut u8, p: &Packet<Self::Addr>, n: &Nat<Self::Addr>) -> u64;
}

impl IcmpFamily for V4 {
    const HLEN: usize = IP_HLEN;
    const PROTO_ICMP: u8 = PROTO_ICMP;
    const SRC_OFF: usize = IP_SRC_OFF;
    const DST_OFF: usize = IP_DST_OFF;
    const IP_CSUM: Option<usize> = Some(IP_CSUM_OFF);
    const PSEUDO: bool = false;
    #[inline(always)]
    fn is_error(t: u8) -> bool {
        matches!(t, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB)
    }
    #[inline(always)]
    unsafe fn plain_proto(ip: *const u8) -> Option<u8> {
        // SAFETY: the caller guarantees HLEN readable bytes.
        unsafe { (*ip == IPV4_VIHL).then(|| *ip.add(IP_PROTO_OFF)) }
    }
    #[inline(always)]
    unsafe fn nat_addrs(ip: *mut u8, p: &Packet<u32>, n: &Nat<u32>) -> u64 {
        // SAFETY: the caller guarantees a writable IPv4 header at `ip`.
        unsafe {
            let mut c = wire::u16_at::<{ IP_CSUM_OFF as i16 }>(ip);
            let mut diff = 0;
            if n.saddr != p.saddr {
                c = csum::replace4(c, p.saddr, n.saddr);
                diff += csum::addr_diff::<V4>(p.saddr, n.saddr);
                wire::set_u32::<{ IP_SRC_OFF as i16 }>(ip, n.saddr);
            }
            if n.daddr != p.daddr {
                c = csum::replace4(c, p.daddr, n.daddr);
                diff += csum::addr_diff::<V4>(p.daddr, n.daddr);
                wire::set_u32::<{ IP_DST_OFF as i16 }>(ip, n.daddr);
            }
            wire::set_u16::<{ IP_CSUM_OFF as i16 }>(ip, c);
            diff
        }
    }
}

impl IcmpFamily for V6 {
    const HLEN: usize = IP6_HLEN;
    const PROTO_ICMP: u8 = PROTO_ICMP6;
    const SRC_OFF: usize = IP6_SRC_OFF;
    const DST_OFF: usize = IP6_DST_OFF;
    const IP_CSUM: Option<usize> = None;
    const PSEUDO: bool = true;
    #[inline(always)]
    fn is_error(t: u8) -> bool {
        matches!(t, ICMP6_DEST_UNREACH..=ICMP6_PARAM_PROB)
    }
    #[inline(always)]
    unsafe fn plain_proto(ip: *const u8) -> Option<u8> {
        // SAFETY: the caller guarantees HLEN readable bytes.
        unsafe { (*ip >> 4 == 6).then(|| *ip.add(IP6_NEXT_OFF)) }
    }
    #[inline(always)]
    unsafe fn nat_addrs(ip: *mut u8, p: &Packet<Ipv6Words>, n: &Nat<Ipv6Words>) -> u64 {
        // SAFETY: the caller guarantees a writable IPv6 header at `ip` (no header checksum).
        unsafe {
            let mut diff = 0;
            if n.saddr != p.saddr {
                diff += csum::addr_diff::<V6>(p.saddr, n.saddr);
                wire::set_words::<{ IP6_SRC_OFF as i16 }>(ip, n.saddr);
            }
            if n.daddr != p.daddr {
                diff += csum::addr_diff::<V6>(p.daddr, n.daddr);
                wire::set_words::<{ IP6_DST_OFF as i16 }>(ip, n.daddr);
            }
            diff
        }
    }
}

/// An ICMP error's addresses: the outer header's, and the quoted packet's tuple.
#[derive(Clone, Copy)]
pub struct IcmpErr<A> {
    pub outer_src: A,
    pub outer_dst: A,
    pub proto: u8,
    pub src: A,
    pub dst: A,
    pub sport: u16,
    pub dport: u16,
}

/// Offsets of a plain error frame: the ICMP header, the quoted IP header, its transport
/// header.
#[inline(always)]
fn offsets<F: IcmpFamily>() -> (usize, usize, usize) {
    let icmp = ETH_HLEN + F::HLEN;
    (icmp, icmp + ICMP_HLEN, icmp + ICMP_HLEN + F::HLEN)
}

/// Parse an ICMP error frame (`start..end`, linear) that quotes TCP or UDP.
#[inline(always)]
pub fn parse<F: IcmpFamily>(start: usize, end: usize) -> Option<IcmpErr<F::Addr>> {
    let (icmp, inner, l4) = offsets::<F>();
    if start + l4 + QUOTED_L4 > end {
        return None;
    }
    let b = start as *const u8;
    // SAFETY: every read is within the `l4 + QUOTED_L4` bytes checked above.
    unsafe {
        if F::plain_proto(b.add(ETH_HLEN))? != F::PROTO_ICMP || !F::is_error(*b.add(icmp)) {
            return None;
        }
        let proto = F::plain_proto(b.add(inner))?;
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        let addr = |off: usize| (b.add(off) as *const F::Addr).read_unaligned();
        let port = |off: usize| (b.add(off) as *const u16).read_unaligned();
        Some(IcmpErr {
            outer_src: addr(ETH_HLEN + F::SRC_OFF),
            outer_dst: addr(ETH_HLEN + F::DST_OFF),
            proto,
            src: addr(inner + F::SRC_OFF),
            dst: addr(inner + F::DST_OFF),
            sport: port(l4 + L4_SPORT_OFF),
            dport: port(l4 + L4_DPORT_OFF),
        })
    }
}

/// The conntrack entry of the quoted packet's reversed tuple in direction `dir`. A plain
/// lookup: an error neither refreshes nor changes the flow.
#[inline(always)]
fn entry<F: Family>(e: &IcmpErr<F::Addr>, dir: u8) -> Option<CtValue<F::Addr>> {
    let key =
        CtKey { src_addr: e.dst, dst_addr: e.src, src_port: e.dport, dst_port: e.sport, proto: e.proto, dir, _pad: 0 };
    crate::ct::get::<F>(&key)
}

/// About a forward packet; `ct` is the flow's reply entry (see the module docs).
#[inline(always)]
fn about_forward<A: Copy + PartialEq>(e: &IcmpErr<A>, ct: &CtValue<A>) -> IcmpErr<A> {
    let mut t = *e;
    if ct.flags & ct_flags::SNAT != 0 {
        (t.src, t.sport, t.outer_dst) = (ct.snat_addr, ct.snat_port, ct.snat_addr);
    }
    if e.outer_src == e.dst {
        t.outer_src = ct.nat_addr;
    }
    (t.dst, t.dport) = (ct.nat_addr, ct.nat_port);
    t
}

/// About a reply; `ct` is the flow's forward entry.
#[inline(always)]
fn about_reply<A: Copy>(e: &IcmpErr<A>, ct: &CtValue<A>) -> IcmpErr<A> {
    let mut t = *e;
    (t.src, t.sport, t.outer_dst) = (ct.nat_addr, ct.nat_port, ct.nat_addr);
    if ct.flags & ct_flags::SNAT != 0 {
        (t.dst, t.dport, t.outer_src) = (ct.snat_addr, ct.snat_port, ct.snat_addr);
    }
    t
}

/// The translated error, whether it must be sent on like its flow's source-NATed packets
/// (`Action::Redirect`: only on an uplink, where XDP forwards them) rather than handed to
/// the stack, and the flow's service; `None`: not about a flow translated
/// where the error was seen. Leaving a pod (`FromPod`): a client pod's error about a reply
/// it received. Towards a client (`ToClient`): an error about a client's packet to a
/// backend reached without source NAT. On an uplink (`FromUplink`): an error about a
/// source-NATed flow's packet to a remote backend, or an outside client's error about a
/// reply.
#[inline(always)]
pub fn decide<F: Family>(e: &IcmpErr<F::Addr>, seen: Seen) -> Option<(IcmpErr<F::Addr>, bool, u32)> {
    let snat = |ct: &CtValue<F::Addr>| ct.flags & ct_flags::SNAT != 0;
    match seen {
        Seen::ToClient => {
            entry::<F>(e, CT_DIR_REPLY).filter(|c| !snat(c)).map(|c| (about_forward(e, &c), false, c.svc_id))
        }
        Seen::FromPod => {
            entry::<F>(e, CT_DIR_FORWARD).filter(|c| !snat(c)).map(|c| (about_reply(e, &c), false, c.svc_id))
        }
        Seen::FromUplink => {
            if let Some(c) = entry::<F>(e, CT_DIR_REPLY).filter(snat) {
                return Some((about_forward(e, &c), true, c.svc_id));
            }
            entry::<F>(e, CT_DIR_FORWARD).map(|c| (about_reply(e, &c), snat(&c), c.svc_id))
        }
    }
}

/// Rewrite the error frame `start..end` (parsed as `old`) to `new`, with every checksum
/// that covers a changed field: the quoted IPv4 header's, the quoted TCP/UDP checksum
/// (pseudo-header and ports; when quoted and in use), the ICMP checksum over the whole
/// message (and, for ICMPv6, its pseudo-header with the outer addresses), the outer IPv4
/// header's. RFC 1624 arithmetic on the bytes in place: errors carry complete checksums.
#[inline(always)]
pub fn rewrite<F: IcmpFamily>(start: usize, end: usize, old: &IcmpErr<F::Addr>, new: &IcmpErr<F::Addr>) -> bool {
    let (icmp, inner, l4) = offsets::<F>();
    if start + l4 + QUOTED_L4 > end {
        return false;
    }
    let b = start as *mut u8;
    // SAFETY: every access is within the `l4 + QUOTED_L4` bytes checked above, except the
    // TCP checksum, checked on its own.
    unsafe {
        let l4_csum = match old.proto {
            PROTO_TCP if start + l4 + TCP_CSUM_OFF + 2 <= end => Some(b.add(l4 + TCP_CSUM_OFF) as *mut u16),
            PROTO_UDP => Some(b.add(l4 + UDP_CSUM_OFF) as *mut u16),
            _ => None,
        }
        // A zero UDP checksum means "none" and stays zero.
        .filter(|p| !(old.proto == PROTO_UDP && p.read_unaligned() == 0));
        let ip_csum = F::IP_CSUM.map(|o| b.add(inner + (o & 0x1f)) as *mut u16);
        let icmp_csum = b.add(icmp + ICMP_CSUM_OFF) as *mut u16;
        let mut ic = icmp_csum.read_unaligned();
        let mut lc = l4_csum.map_or(0, |p| p.read_unaligned());
        let mut ipc = ip_csum.map_or(0, |p| p.read_unaligned());

        // The quoted packet: addresses (its IPv4 header and its pseudo-header), ports.
        for (off, o, n) in [(F::SRC_OFF, old.src, new.src), (F::DST_OFF, old.dst, new.dst)] {
            if o != n {
                (b.add(inner + off) as *mut F::Addr).write_unaligned(n);
                ic = csum::replace_addr::<F>(ic, o, n);
                lc = csum::replace_addr::<F>(lc, o, n);
                ipc = csum::replace_addr::<F>(ipc, o, n);
            }
        }
        for (off, o, n) in [(L4_SPORT_OFF, old.sport, new.sport), (L4_DPORT_OFF, old.dport, new.dport)] {
            if o != n {
                (b.add(l4 + off) as *mut u16).write_unaligned(n);
                ic = csum::replace2(ic, o, n);
                lc = csum::replace2(lc, o, n);
            }
        }
        // The checksums just recomputed are part of the ICMP message too.
        for (p, v) in [(ip_csum, ipc), (l4_csum, lc)] {
            if let Some(p) = p {
                ic = csum::replace2(ic, p.read_unaligned(), v);
                p.write_unaligned(v);
            }
        }
        // The outer header.
        let mut oc = F::IP_CSUM.map_or(0, |o| (b.add(ETH_HLEN + (o & 0x1f)) as *const u16).read_unaligned());
        for (off, o, n) in [(F::SRC_OFF, old.outer_src, new.outer_src), (F::DST_OFF, old.outer_dst, new.outer_dst)] {
            if o != n {
                (b.add(ETH_HLEN + off) as *mut F::Addr).write_unaligned(n);
                oc = csum::replace_addr::<F>(oc, o, n);
                if F::PSEUDO {
                    ic = csum::replace_addr::<F>(ic, o, n);
                }
            }
        }
        if let Some(o) = F::IP_CSUM {
            (b.add(ETH_HLEN + (o & 0x1f)) as *mut u16).write_unaligned(oc);
        }
        icmp_csum.write_unaligned(ic);
    }
    true
}
