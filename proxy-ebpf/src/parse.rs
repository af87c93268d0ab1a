//! Header parsing over direct packet pointers, shared by the TC and XDP hooks, with the
//! header layouts of `network-types` and the offsets of `hdr`.
//!
//! Verdicts for odd frames (documented in docs/datapath.md): anything that is not an
//! IPv4 or IPv6 frame we can read completely is *passed untouched* and counted; the kernel
//! judges it as if we were not there. Only frames that parse cleanly as IPv4/IPv6 +
//! TCP/UDP/SCTP are candidates for translation, and later fragments of datagrams whose
//! first fragment was translated (with that first fragment's ports, see `frag`).
use core::mem::size_of;

use aya_ebpf::maps::LruHashMap;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use proxy_common::{
    FragKey, FragPorts, Ipv6Words, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Verdict,
    dsr::{
        EXT6_HDR_LEN as DSR_EXT6_HDR_LEN, EXT6_LEN as DSR_EXT6_LEN, OPT4_LEN as DSR_OPT4_LEN,
        OPT4_TYPE as DSR_OPT4_TYPE, OPT6_DATA_LEN as DSR_OPT6_DATA_LEN, OPT6_OFF as DSR_OPT6_OFF,
        OPT6_TYPE as DSR_OPT6_TYPE,
    },
};

use crate::{
    family::{Family, V4, V6},
    hdr::{
        ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, FRAG6_HLEN, FRAG6_M, FRAG6_OFFSET, IP_DST_OFF, IP_FRAGS_OFF, IP_HLEN,
        IP_ID_OFF, IP_MF, IP_OFFSET, IP_PROTO_OFF, IP_SRC_OFF, IP_TOT_LEN_OFF, IP6_DST_OFF, IP6_HLEN, IP6_NEXT_OFF,
        IP6_PLEN_OFF, IP6_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF, NEXT_DEST_OPTS, NEXT_FRAGMENT, NEXT_HOP_BY_HOP,
        NEXT_ROUTING, SCTP_HLEN, TCP_ACK, TCP_ACK_OFF, TCP_CSUM_OFF, TCP_DOFF_OFF, TCP_FIN, TCP_FLAGS_OFF, TCP_HLEN,
        TCP_SEQ_OFF, TCP_SYN, UDP_CSUM_OFF, UDP_HLEN, UDP_LEN_OFF,
    },
    maps::{FRAGS, FRAGS6},
    wire,
};

/// IPv6 extension headers skipped before the transport header, at most (a bound the
/// verifier can see); a fragment header gets the fragment's handling (`frag`).
const MAX_EXT_HDRS: usize = 4;
/// The largest transport-header offset a frame may have for us (offsets are masked with it
/// for the verifier, so a larger one must never reach a mask).
pub const MAX_L4_OFF: usize = 0x3ff;

/// Where a packet sits in its datagram.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub enum Frag {
    /// A whole datagram (IPv4 with MF clear and offset 0; IPv6 without a fragment header, or
    /// an atomic fragment, RFC 6946).
    #[default]
    Whole,
    /// Offset 0 with more fragments: the transport header is here, the rest follows.
    First,
    /// Offset > 0: no transport header; the ports come from `FRAGS` (see `frag`).
    Later,
}

/// Protocols whose fragments we translate: those with ports.
#[inline(always)]
fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
}

/// The ports of the datagram a later fragment belongs to, if its first fragment was
/// translated here (`frag::remember`).
#[inline(always)]
fn later_ports<A: Copy>(
    map: &LruHashMap<FragKey<A>, FragPorts>,
    saddr: A,
    daddr: A,
    proto: u8,
    id: u32,
) -> Option<FragPorts> {
    let key = FragKey { src_addr: saddr, dst_addr: daddr, id, proto, _pad: [0; 3] };
    // SAFETY: the value is copied out at once; a concurrent update writes the same ports.
    unsafe { map.get(&key).copied() }
}

/// Parse a frame of this family (`parse_v4`, `parse_v6`).
pub trait Parse: Family {
    fn parse(start: usize, end: usize, pkt_len: usize) -> Result<Packet<Self::Addr>, Verdict>;
}

impl Parse for V4 {
    #[inline(always)]
    fn parse(start: usize, end: usize, pkt_len: usize) -> Result<Packet, Verdict> {
        parse_v4(start, end, pkt_len)
    }
}

impl Parse for V6 {
    #[inline(always)]
    fn parse(start: usize, end: usize, pkt_len: usize) -> Result<Packet<Ipv6Words>, Verdict> {
        parse_v6(start, end, pkt_len)
    }
}

/// Where the parsed fields live in the frame, and their values (addresses and ports in
/// network byte order, as on the wire). `A` is the address: `u32` or `Ipv6Words`.
#[derive(Clone, Copy, Default)]
pub struct Packet<A = u32> {
    pub l3_off: usize,
    pub l4_off: usize,
    pub proto: u8,
    /// TCP flags; 0 for other protocols.
    pub tcp_flags: u8,
    /// TCP (host byte order, 0 for other protocols): the sequence number, the
    /// acknowledgement number, and the sequence space the segment occupies (payload, plus
    /// one each for SYN and FIN), for conntrack's window checks.
    pub seq: u32,
    pub ack: u32,
    pub seg_len: u32,
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    /// Whole datagram, first fragment, or a later fragment (no L4 header: `sport`/`dport`
    /// come from its first fragment, and only addresses may be rewritten).
    pub frag: Frag,
    /// The datagram's identification, for fragments (IPv4: 16 bits, IPv6: 32).
    pub frag_id: u32,
    /// The frontend a DSR option carries (`proxy_common::dsr`), network byte order;
    /// `dsr_port` 0: none.
    pub dsr_addr: A,
    pub dsr_port: u16,
}

/// The network protocol of a frame, from its EtherType.
pub enum L3 {
    V4,
    V6,
}

impl<A> Packet<A> {
    /// A SYN without ACK: a client opening a connection.
    #[inline(always)]
    pub fn tcp_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// A later fragment: nothing at `l4_off` is a transport header (no ports, no L4
    /// checksum to update, no reset or ICMP error to build from it).
    #[inline(always)]
    pub fn no_l4(&self) -> bool {
        self.frag == Frag::Later
    }

    /// Offset of the L4 checksum field in its header, or `None` for SCTP (CRC32c over the
    /// payload, no pseudo-header: address rewrites do not touch it).
    #[inline(always)]
    pub fn l4_csum_field(&self) -> Option<usize> {
        match self.proto {
            PROTO_TCP => Some(TCP_CSUM_OFF),
            PROTO_UDP => Some(UDP_CSUM_OFF),
            _ => None,
        }
    }
}

#[inline(always)]
fn ptr_at<T>(start: usize, end: usize, off: usize) -> Result<*const T, Verdict> {
    if start + off + size_of::<T>() > end {
        return Err(Verdict::Malformed);
    }
    Ok((start + off) as *const T)
}

/// Which family a frame is: Ethernet + IPv4 or IPv6 (then parsed with `parse_v4` /
/// `parse_v6`: the IP header, its lengths and the L4 ports). `Err(verdict)` says why the
/// frame is not a candidate.
/// `pkt_len` is the whole frame's length, including bytes outside the linear area `start..end`
/// (an skb's paged data, an XDP frame's fragments).
///
/// Lengths are validated the way the kernel's receive path does, so we never translate (and
/// leave conntrack entries for) a frame the stack would drop: the IPv4 total length must
/// cover the header and fit in the frame (Ethernet padding after it is fine), the TCP data
/// offset must fit in the IP payload, and the UDP length must be at least a header and no
/// more than the IP payload (shorter is trailing padding, which `udp_rcv` trims).
///
/// Reads are laid out for the verifier: the fixed Ethernet + IPv4 header is bounds-checked
/// as one block, and the L4 header (at a variable offset because of IP options) through its
/// own pointer with its own check.
///
/// This is the first step, [`Parse::parse`] the second: each
/// family is parsed (and handled) in its own BPF function, so their stack frames never add
/// up.
#[inline(always)]
pub fn l3(start: usize, end: usize) -> Result<L3, Verdict> {
    // SAFETY: bounds-checked by `ptr_at`; unaligned read.
    let ether_type = unsafe {
        let eth = ptr_at::<EthHdr>(start, end, 0)?;
        u16::from_be(core::ptr::addr_of!((*eth).ether_type).read_unaligned())
    };
    match ether_type {
        ETH_P_IPV4 => Ok(L3::V4),
        ETH_P_IPV6 => Ok(L3::V6),
        _ => Err(Verdict::NotIp),
    }
}

/// What the transport header says: ports (network byte order), and for TCP the flags,
/// sequence and acknowledgement numbers and the segment's length in sequence space.
#[derive(Clone, Copy, Default)]
struct L4 {
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    seq: u32,
    ack: u32,
    seg_len: u32,
}

impl<A: Default> Packet<A> {
    /// The packet whose headers start at `l3` / `l4`, from its addresses, what its transport
    /// header says (or, for a later fragment, the ports its first fragment carried) and its
    /// fragment facts: one constructor for both families.
    #[inline(always)]
    fn new(l3: usize, l4: usize, proto: u8, (saddr, daddr): (A, A), t: &L4, (frag, frag_id): (Frag, u32)) -> Self {
        Packet {
            l3_off: l3,
            l4_off: l4,
            proto,
            tcp_flags: t.tcp_flags,
            seq: t.seq,
            ack: t.ack,
            seg_len: t.seg_len,
            saddr,
            daddr,
            sport: t.sport,
            dport: t.dport,
            frag,
            frag_id,
            dsr_addr: A::default(),
            dsr_port: 0,
        }
    }
}

/// The transport header at `l4` (absolute address `start + l4`), `l4_len` bytes of IP
/// payload long, with the length checks of [`parse`]. In a first fragment the UDP length
/// covers the whole datagram, so it may exceed the payload.
#[inline(always)]
fn transport(start: usize, end: usize, l4: usize, l4_len: usize, proto: u8, first_frag: bool) -> Result<L4, Verdict> {
    // Bytes of L4 header we need: through the checksum field for TCP, the whole header
    // for UDP, the common header for SCTP. Each protocol checks its own length next to
    // its reads: with one shared length the compiler may reload the protocol after the
    // check, and the verifier then cannot tell which length was checked.
    let l4p = start + l4;
    let b = l4p as *const u8;
    let ports = |b: *const u8| {
        // SAFETY: the caller checked at least the 4 bytes of ports at `b`.
        unsafe {
            L4 {
                sport: wire::u16_at::<{ L4_SPORT_OFF as i16 }>(b),
                dport: wire::u16_at::<{ L4_DPORT_OFF as i16 }>(b),
                ..L4::default()
            }
        }
    };
    match proto {
        PROTO_TCP => {
            if l4_len < TCP_HLEN || l4p + TCP_HLEN > end {
                return Err(Verdict::Malformed);
            }
            let mut t = ports(b);
            // SAFETY: the 20 bytes of the TCP header are within bounds (checked above).
            unsafe {
                let doff = ((*b.add(TCP_DOFF_OFF) >> 4) as usize) * 4;
                if doff < TCP_HLEN || doff > l4_len {
                    return Err(Verdict::Malformed);
                }
                t.tcp_flags = *b.add(TCP_FLAGS_OFF);
                t.seq = u32::from_be(wire::u32_at::<{ TCP_SEQ_OFF as i16 }>(b));
                t.ack = u32::from_be(wire::u32_at::<{ TCP_ACK_OFF as i16 }>(b));
                // SYN and FIN each take one sequence number.
                t.seg_len =
                    (l4_len - doff) as u32 + (t.tcp_flags & TCP_SYN != 0) as u32 + (t.tcp_flags & TCP_FIN) as u32;
            }
            Ok(t)
        }
        PROTO_UDP => {
            if l4_len < UDP_HLEN || l4p + UDP_HLEN > end {
                return Err(Verdict::Malformed);
            }
            // SAFETY: the 8 bytes of the UDP header are within bounds (checked above).
            let ulen = unsafe { u16::from_be(wire::u16_at::<{ UDP_LEN_OFF as i16 }>(b)) as usize };
            if ulen < UDP_HLEN || (ulen > l4_len && !first_frag) {
                return Err(Verdict::Malformed);
            }
            Ok(ports(b))
        }
        PROTO_SCTP => {
            if l4_len < SCTP_HLEN || l4p + SCTP_HLEN > end {
                return Err(Verdict::Malformed);
            }
            Ok(ports(b))
        }
        _ => Err(Verdict::OtherL4),
    }
}

/// IPv6: the fixed header, the extension headers a stack sends (hop-by-hop, routing,
/// destination options, fragment; at most `MAX_EXT_HDRS`), then the transport header. A
/// first fragment is parsed like a whole datagram; a later one gets its first fragment's
/// ports (`frag`), or passes untouched (`fragment`) when there are none; ICMPv6 (neighbour discovery, router advertisements, errors) and
/// anything else pass untouched. The payload length must fit in the frame; a zero one
/// (a jumbogram) is not something we translate.
#[inline(always)]
pub fn parse_v6(start: usize, end: usize, pkt_len: usize) -> Result<Packet<Ipv6Words>, Verdict> {
    let l3 = ETH_HLEN;
    // Fields are read one by one from the frame: copying the 40-byte header to the stack
    // first would cost IPv6 stack space it does not have.
    let ip = ptr_at::<Ipv6Hdr>(start, end, l3)? as *const u8;
    // SAFETY: within the IPv6 header checked above.
    let (version, payload, next_hdr) = unsafe {
        (*ip >> 4, u16::from_be(wire::u16_at::<{ IP6_PLEN_OFF as i16 }>(ip)) as usize, *ip.add(IP6_NEXT_OFF))
    };
    if version != 6 {
        return Err(Verdict::Malformed);
    }
    if payload == 0 || l3 + IP6_HLEN + payload > pkt_len {
        return Err(Verdict::Malformed);
    }
    let ip_end = l3 + IP6_HLEN + payload;
    let (dsr_port, dsr_addr) = dsr_ext6(start, end, next_hdr).unwrap_or_default();
    let mut next = next_hdr;
    let mut off = l3 + IP6_HLEN;
    let mut i = 0;
    let mut frag = Frag::Whole;
    let mut frag_id = 0;
    while i < MAX_EXT_HDRS {
        match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS => {
                // Masked so the verifier sees a bounded offset.
                let o = off & MAX_L4_OFF;
                let h = ptr_at::<[u8; 2]>(start, end, o)?;
                // SAFETY: bounds-checked just above.
                let [nh, len] = unsafe { h.read_unaligned() };
                next = nh;
                off = o + (len as usize + 1) * 8;
                if off > ip_end {
                    return Err(Verdict::Malformed);
                }
                // Beyond the offsets the masks below keep (not a wrap-around into the
                // extension headers): not ours, like a chain longer than MAX_EXT_HDRS.
                if off > MAX_L4_OFF {
                    return Err(Verdict::OtherL4);
                }
            }
            NEXT_FRAGMENT => {
                let o = off & MAX_L4_OFF;
                let h = ptr_at::<[u8; FRAG6_HLEN]>(start, end, o)?;
                // SAFETY: bounds-checked just above.
                let [nh, _, o_hi, o_lo, id0, id1, id2, id3] = unsafe { h.read_unaligned() };
                next = nh;
                off = o + FRAG6_HLEN;
                if off > ip_end {
                    return Err(Verdict::Malformed);
                }
                // Beyond the offsets the masks below keep, as for the other extension
                // headers: a transport header read there would wrap into the frame's start.
                if off > MAX_L4_OFF {
                    return Err(Verdict::OtherL4);
                }
                let offset_m = u16::from_be_bytes([o_hi, o_lo]);
                frag_id = u32::from_be_bytes([id0, id1, id2, id3]);
                if offset_m & FRAG6_OFFSET != 0 {
                    // What follows is the middle of a datagram, not headers.
                    frag = Frag::Later;
                    break;
                }
                // Offset 0 without M is an atomic fragment (RFC 6946): a whole datagram.
                if offset_m & FRAG6_M != 0 {
                    frag = Frag::First;
                }
            }
            _ => break,
        }
        i += 1;
    }
    let l4 = off & MAX_L4_OFF;
    // SAFETY: both addresses are within the IPv6 header checked above.
    let (saddr, daddr) =
        unsafe { (wire::words_at::<{ IP6_SRC_OFF as i16 }>(ip), wire::words_at::<{ IP6_DST_OFF as i16 }>(ip)) };
    // A fragment of something without ports (ICMPv6, an extension header after the
    // fragment header of a later fragment) is not ours, nor an ICMP error to translate.
    if frag != Frag::Whole && !has_ports(next) {
        return Err(Verdict::Fragment);
    }
    let t = if frag == Frag::Later {
        let ports = later_ports(&FRAGS6, saddr, daddr, next, frag_id).ok_or(Verdict::Fragment)?;
        L4 { sport: ports.sport, dport: ports.dport, ..L4::default() }
    } else {
        transport(start, end, l4, ip_end - l4, next, frag == Frag::First)?
    };
    let mut p = Packet::new(l3, l4, next, (saddr, daddr), &t, (frag, frag_id));
    p.dsr_port = dsr_port;
    p.dsr_addr = dsr_addr;
    Ok(p)
}

/// The frontend in a DSR Destination Options header (`proxy_common::dsr`), which the
/// ingress node puts right after the fixed header: (port, address), network byte order.
/// Read at a constant offset, apart from the walk over the extension headers.
#[inline(always)]
fn dsr_ext6(start: usize, end: usize, next_hdr: u8) -> Option<(u16, Ipv6Words)> {
    if next_hdr != NEXT_DEST_OPTS {
        return None;
    }
    let h = ptr_at::<[u8; DSR_EXT6_LEN]>(start, end, ETH_HLEN + IP6_HLEN).ok()? as *const u8;
    // SAFETY: every read is within the DSR_EXT6_LEN bytes checked above.
    unsafe {
        let o = h.add(DSR_OPT6_OFF);
        if *h.add(1) != DSR_EXT6_HDR_LEN || *o != DSR_OPT6_TYPE || *o.add(1) != DSR_OPT6_DATA_LEN {
            return None;
        }
        Some((wire::u16_at::<2>(o), wire::words_at::<4>(o)))
    }
}

#[inline(always)]
pub fn parse_v4(start: usize, end: usize, pkt_len: usize) -> Result<Packet, Verdict> {
    // SAFETY: every read is bounds-checked against `end` by `ptr_at`; multi-byte reads go
    // through `wire`, as frames give no alignment guarantee.
    unsafe {
        let l3 = ETH_HLEN;
        let ip = ptr_at::<Ipv4Hdr>(start, end, l3)? as *const u8;
        let vihl = *ip;
        if vihl >> 4 != 4 {
            return Err(Verdict::Malformed);
        }
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < IP_HLEN {
            return Err(Verdict::Malformed);
        }
        let tot_len = u16::from_be(wire::u16_at::<{ IP_TOT_LEN_OFF as i16 }>(ip)) as usize;
        if tot_len < ihl || l3 + tot_len > pkt_len {
            return Err(Verdict::Malformed);
        }
        let frags = u16::from_be(wire::u16_at::<{ IP_FRAGS_OFF as i16 }>(ip));
        let frag = if frags & IP_OFFSET != 0 {
            Frag::Later
        } else if frags & IP_MF != 0 {
            Frag::First
        } else {
            Frag::Whole
        };
        let proto = *ip.add(IP_PROTO_OFF);
        // A fragment of something without ports (ICMP) is not ours, nor an ICMP error to
        // translate.
        if frag != Frag::Whole && !has_ports(proto) {
            return Err(Verdict::Fragment);
        }
        let frag_id = u16::from_be(wire::u16_at::<{ IP_ID_OFF as i16 }>(ip)) as u32;
        let (saddr, daddr) = (wire::u32_at::<{ IP_SRC_OFF as i16 }>(ip), wire::u32_at::<{ IP_DST_OFF as i16 }>(ip));
        let l4 = l3 + ihl;
        let t = if frag == Frag::Later {
            let ports = later_ports(&FRAGS, saddr, daddr, proto, frag_id).ok_or(Verdict::Fragment)?;
            L4 { sport: ports.sport, dport: ports.dport, ..L4::default() }
        } else {
            transport(start, end, l4, tot_len - ihl, proto, frag == Frag::First)?
        };
        let mut p = Packet::new(l3, l4, proto, (saddr, daddr), &t, (frag, frag_id));
        // Exactly one 8-byte option: maybe the frontend a DSR ingress node put there.
        if ihl == IP_HLEN + DSR_OPT4_LEN as usize {
            let o = ptr_at::<[u8; DSR_OPT4_LEN as usize]>(start, end, l3 + IP_HLEN)?.read_unaligned();
            if o[0] == DSR_OPT4_TYPE && o[1] == DSR_OPT4_LEN {
                p.dsr_port = u16::from_ne_bytes([o[2], o[3]]);
                p.dsr_addr = u32::from_ne_bytes([o[4], o[5], o[6], o[7]]);
            }
        }
        Ok(p)
    }
}
