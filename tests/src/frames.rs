//! Frame builders and independent readings of frames for both IP families, shared by the
//! fuzzers: UDP and SCTP frames for either family, IPv4 and IPv6 fragments of a frame, a
//! family-agnostic view with checksums recomputed by etherparse, and an independent reading
//! (from the RFCs, not the datapath's parser) of when a frame is malformed.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const ETH_HLEN: usize = 14;
const IP4_HLEN: usize = 20;
const IP6_HLEN: usize = 40;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;
/// IPv6 next-header values the datapath skips (hop-by-hop, routing, destination options)
/// and the fragment header.
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_DEST_OPTS: u8 = 60;
/// IPv6 fragment header (RFC 8200 4.5): its length, the offset's bits and M (more
/// fragments) in its third and fourth bytes.
const FRAG6_HLEN: usize = 8;
const FRAG6_OFFSET: u16 = 0xfff8;
const FRAG6_M: u16 = 0x0001;
/// IPv4 fragment offset (13 bits) and MF in the flags/offset field (RFC 791).
const IP4_OFFSET: u16 = 0x1fff;
const IP4_MF: u16 = 0x2000;
/// How many extension headers the datapath walks (docs/datapath.md: "up to 4").
const MAX_EXT_HDRS: usize = 4;
/// The largest transport offset the datapath reads an IPv6 frame at; beyond it the frame
/// is "other L4" (passed untouched), not malformed.
const MAX_L4_OFF: usize = 0x3ff;

/// An Ethernet + IPv4/IPv6 + UDP frame with a valid checksum. Both addresses must be of
/// one family.
pub fn udp_any(src: (IpAddr, u16), dst: (IpAddr, u16), payload: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let ip = match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("udp_any: {src:?} and {dst:?} are of different families"),
    };
    let mut v = Vec::new();
    ip.udp(src.1, dst.1).write(&mut v, payload).expect("build frame");
    v
}

/// An SCTP frame (common header, then `chunks`) of either family. The CRC32c is left
/// zero: it covers no address, so no translation may touch it.
pub fn sctp_any(src: (IpAddr, u16), dst: (IpAddr, u16), chunks: &[u8]) -> Vec<u8> {
    // Built from a UDP frame of the same length (12-byte common header + chunks): the
    // protocol number is set by hand, and the IPv4 header checksum recomputed.
    let mut body = vec![0u8; 4];
    body.extend_from_slice(chunks);
    let mut f = udp_any(src, dst, &body);
    match src.0 {
        IpAddr::V4(_) => {
            f[ETH_HLEN + 9] = PROTO_SCTP;
            fix_ipv4_csum(&mut f);
        }
        IpAddr::V6(_) => f[ETH_HLEN + 6] = PROTO_SCTP,
    }
    let l4 = l4_offset(&f);
    f[l4 + 4..l4 + 12].fill(0);
    f
}

/// Where the transport header of a frame this module built starts (no options, no
/// extension headers).
fn l4_offset(f: &[u8]) -> usize {
    if u16::from_be_bytes([f[12], f[13]]) == ETH_P_IPV6 { ETH_HLEN + IP6_HLEN } else { ETH_HLEN + IP4_HLEN }
}

/// Recompute the IPv4 header checksum of an Ethernet + IPv4 frame (any IHL).
pub fn fix_ipv4_csum(f: &mut [u8]) {
    let ihl = usize::from(f[ETH_HLEN] & 0xf) * 4;
    f[ETH_HLEN + 10] = 0;
    f[ETH_HLEN + 11] = 0;
    let c = crate::harness::inet_csum(&f[ETH_HLEN..ETH_HLEN + ihl]);
    f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
}

/// A fragment of `frame` (an Ethernet + IPv4 or IPv6 frame without options or extension
/// headers): the first fragment (`offset_units` 0: the frame itself with more-fragments
/// set) or a later one (`offset_units` x 8 bytes in, carrying `data` instead of the
/// transport header), with identification `id`. IPv4 keeps a valid header checksum; IPv6
/// gets a fragment header (RFC 8200 4.5).
pub fn fragment_of(frame: &[u8], offset_units: u16, more: bool, id: u32, data: &[u8]) -> Vec<u8> {
    let l4 = l4_offset(frame);
    let body = if offset_units == 0 { &frame[l4..] } else { data };
    fragment_with(frame, offset_units, more, id, body)
}

/// The first fragment of `frame` as a sender cut at an MTU would send it: the first
/// `keep` bytes of its transport part (a multiple of 8, as RFC 791 and 8200 cut), the
/// transport header untouched, so a UDP length covers the whole datagram, beyond the
/// fragment; identification `id`.
pub fn first_fragment_of(frame: &[u8], keep: usize, id: u32) -> Vec<u8> {
    let l4 = l4_offset(frame);
    let keep = (keep / 8 * 8).min(frame.len() - l4);
    fragment_with(frame, 0, true, id, &frame[l4..l4 + keep])
}

fn fragment_with(frame: &[u8], offset_units: u16, more: bool, id: u32, body: &[u8]) -> Vec<u8> {
    let l4 = l4_offset(frame);
    let mut f = frame[..l4].to_vec();
    f.extend_from_slice(body);
    let frag = (offset_units & IP4_OFFSET) | if more { IP4_MF } else { 0 };
    if l4 == ETH_HLEN + IP4_HLEN {
        let total = (f.len() - ETH_HLEN) as u16;
        f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total.to_be_bytes());
        f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&(id as u16).to_be_bytes());
        f[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&frag.to_be_bytes());
        fix_ipv4_csum(&mut f);
    } else {
        let next = f[ETH_HLEN + 6];
        let mut hdr = vec![next, 0];
        hdr.extend_from_slice(&((offset_units & 0x1fff) << 3 | u16::from(more)).to_be_bytes());
        hdr.extend_from_slice(&id.to_be_bytes());
        f.splice(l4..l4, hdr);
        f[ETH_HLEN + 6] = NEXT_FRAGMENT;
        let payload = (f.len() - ETH_HLEN - IP6_HLEN) as u16;
        f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&payload.to_be_bytes());
    }
    f
}

/// The IP header of a frame, read independently: (source, destination, is a fragment).
/// `None` when it is not a complete IPv4/IPv6 header.
pub fn ip_addrs(f: &[u8]) -> Option<(IpAddr, IpAddr, bool)> {
    let ip = f.get(ETH_HLEN..)?;
    match u16::from_be_bytes([*f.get(12)?, *f.get(13)?]) {
        ETH_P_IPV4 if ip.len() >= IP4_HLEN => {
            let a = |o: usize| IpAddr::V4(Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]));
            Some((a(12), a(16), u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0))
        }
        ETH_P_IPV6 if ip.len() >= IP6_HLEN => {
            let a = |o: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).unwrap()));
            Some((a(8), a(24), ip[6] == NEXT_FRAGMENT))
        }
        _ => None,
    }
}

/// Whether the IPv4 header checksum of a frame is valid (always true for IPv6, which has
/// none).
pub fn ip_csum_ok(f: &[u8]) -> bool {
    if u16::from_be_bytes([f[12], f[13]]) != ETH_P_IPV4 {
        return true;
    }
    let ihl = usize::from(f[ETH_HLEN] & 0xf) * 4;
    f.len() >= ETH_HLEN + ihl && crate::harness::inet_csum(&f[ETH_HLEN..ETH_HLEN + ihl]) == 0
}

/// The L4 checks both families share (RFC 9293, 768, 9260 and the kernel's receive
/// checks): `l4` is the IP payload from the transport header on, `in_frame` the bytes of it
/// actually present in the frame. In a first fragment the UDP length covers the whole
/// datagram, so it may exceed the fragment's payload.
fn l4_malformed(proto: u8, l4: &[u8], in_frame: usize, first_fragment: bool) -> Option<bool> {
    let need = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        PROTO_SCTP => 12,
        _ => return None,
    };
    if l4.len() < need || in_frame < need {
        return Some(true);
    }
    Some(match proto {
        PROTO_TCP => {
            let doff = usize::from(l4[12] >> 4) * 4;
            doff < 20 || doff > l4.len()
        }
        PROTO_UDP => {
            let ulen = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
            ulen < 8 || (ulen > l4.len() && !first_fragment)
        }
        _ => false,
    })
}

/// Where a packet sits in its datagram (RFC 791's fragment offset and more-fragments flag,
/// RFC 8200's fragment header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragPos {
    /// A whole datagram (IPv6: also an atomic fragment, offset 0 without M, RFC 6946).
    Whole,
    /// Offset 0 with more fragments: the transport header is here, the rest follows.
    First,
    /// Offset > 0: no transport header.
    Later,
}

/// Protocols with ports, whose fragments the datapath translates.
fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
}

/// The IP layer of a frame, read independently: addresses, the transport protocol, where
/// the transport bytes are (`l4..end`, frame offsets; for a later fragment: its data), and
/// the datagram it belongs to.
#[derive(Clone, Copy, Debug)]
struct IpLayer {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: usize,
    end: usize,
    frag: FragPos,
    /// The datagram's identification (IPv4: 16 bits; IPv6: the fragment header's 32).
    id: u32,
}

/// `Err(Some(true))`: the IP layer is malformed; `Err(None)`: not a candidate at all (other
/// EtherType, a fragment of a protocol without ports, an IPv6 extension header chain longer
/// than the datapath walks or past the offsets it reads).
fn ip_layer(f: &[u8]) -> Result<IpLayer, Option<bool>> {
    if f.len() < ETH_HLEN {
        return Err(None);
    }
    let ip = &f[ETH_HLEN..];
    let layer = match u16::from_be_bytes([f[12], f[13]]) {
        ETH_P_IPV4 => {
            if ip.len() < IP4_HLEN || ip[0] >> 4 != 4 {
                return Err(Some(true));
            }
            let ihl = usize::from(ip[0] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if ihl < IP4_HLEN || ip.len() < ihl || total < ihl || total > ip.len() {
                return Err(Some(true));
            }
            let frags = u16::from_be_bytes([ip[6], ip[7]]);
            let frag = if frags & IP4_OFFSET != 0 {
                FragPos::Later
            } else if frags & IP4_MF != 0 {
                FragPos::First
            } else {
                FragPos::Whole
            };
            let a = |o: usize| IpAddr::V4(Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]));
            IpLayer {
                src: a(12),
                dst: a(16),
                proto: ip[9],
                l4: ETH_HLEN + ihl,
                end: ETH_HLEN + total,
                frag,
                id: u32::from(u16::from_be_bytes([ip[4], ip[5]])),
            }
        }
        ETH_P_IPV6 => {
            if ip.len() < IP6_HLEN || ip[0] >> 4 != 6 {
                return Err(Some(true));
            }
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if payload == 0 || IP6_HLEN + payload > ip.len() {
                return Err(Some(true));
            }
            let end = IP6_HLEN + payload;
            let (mut next, mut off) = (ip[6], IP6_HLEN);
            let (mut frag, mut id) = (FragPos::Whole, 0);
            for _ in 0..MAX_EXT_HDRS {
                match next {
                    NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS => {
                        if off + 2 > ip.len() {
                            return Err(Some(true));
                        }
                        next = ip[off];
                        off += (usize::from(ip[off + 1]) + 1) * 8;
                        if off > end {
                            return Err(Some(true));
                        }
                        if ETH_HLEN + off > MAX_L4_OFF {
                            return Err(None);
                        }
                    }
                    NEXT_FRAGMENT => {
                        if off + FRAG6_HLEN > ip.len() {
                            return Err(Some(true));
                        }
                        next = ip[off];
                        let offset_m = u16::from_be_bytes([ip[off + 2], ip[off + 3]]);
                        id = u32::from_be_bytes([ip[off + 4], ip[off + 5], ip[off + 6], ip[off + 7]]);
                        off += FRAG6_HLEN;
                        if off > end {
                            return Err(Some(true));
                        }
                        if offset_m & FRAG6_OFFSET != 0 {
                            // What follows is the middle of a datagram, not headers.
                            frag = FragPos::Later;
                            break;
                        }
                        if offset_m & FRAG6_M != 0 {
                            frag = FragPos::First;
                        }
                        // Headers after this one are read too: past the offsets the
                        // datapath reads, the packet is not one it may translate.
                        if ETH_HLEN + off > MAX_L4_OFF {
                            return Err(None);
                        }
                    }
                    _ => break,
                }
            }
            let a = |o: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).unwrap()));
            IpLayer { src: a(8), dst: a(24), proto: next, l4: ETH_HLEN + off, end: ETH_HLEN + end, frag, id }
        }
        _ => return Err(None),
    };
    if layer.frag != FragPos::Whole && !has_ports(layer.proto) {
        return Err(None);
    }
    Ok(layer)
}

/// An independent reading of when an Ethernet frame is a translatable IPv4 or IPv6
/// TCP/UDP/SCTP packet: `Some(true)` when it claims to be one but is malformed (RFC 791,
/// 8200 and the L4 RFCs, and the kernel's receive checks), `Some(false)` when it is a
/// well-formed one, `None` when it is not a candidate at all (other EtherType or protocol,
/// an IPv6 extension header chain longer than the datapath walks, a later fragment, a
/// fragment of a protocol without ports). A first fragment of TCP/UDP/SCTP is a candidate
/// like a whole datagram (its UDP length may exceed the fragment); a later fragment is
/// translated only when its first fragment was ([`later_fragment`]).
pub fn malformed(f: &[u8]) -> Option<bool> {
    let l = match ip_layer(f) {
        Ok(l) => l,
        Err(m) => return m,
    };
    if l.frag == FragPos::Later {
        return None;
    }
    l4_malformed(l.proto, &f[l.l4..l.end], l.end - l.l4, l.frag == FragPos::First)
}

/// A datagram's name as the datapath remembers a first fragment's ports under it: source,
/// destination, protocol, identification (as the fragment arrived).
pub type FragName = (IpAddr, IpAddr, u8, u32);

/// The datagram a TCP/UDP/SCTP fragment with a readable IP header belongs to, and where
/// in it the fragment sits. `None` for whole datagrams and non-candidates.
pub fn fragment(f: &[u8]) -> Option<(FragName, FragPos)> {
    let l = ip_layer(f).ok()?;
    (l.frag != FragPos::Whole).then_some(((l.src, l.dst, l.proto, l.id), l.frag))
}

/// A later fragment (offset > 0) of a TCP/UDP/SCTP datagram: its datagram's name.
pub fn later_fragment(f: &[u8]) -> Option<FragName> {
    match fragment(f)? {
        (name, FragPos::Later) => Some(name),
        _ => None,
    }
}

/// What a translation may change in a later fragment, which carries no ports and whose
/// transport checksum lives in the first fragment: the addresses, the IPv4 header checksum
/// (valid exactly when it was), and where it is forwarded the MACs and the TTL / hop
/// limit. Every other byte stays. `Err` names the byte that changed.
pub fn check_later_fragment(before: &[u8], after: &[u8]) -> Result<(), String> {
    if after.len() != before.len() {
        return Err(format!("length {} -> {}", before.len(), after.len()));
    }
    let v6 = u16::from_be_bytes([before[12], before[13]]) == ETH_P_IPV6;
    let may_change = |i: usize| {
        i < 12
            || if v6 {
                i == ETH_HLEN + 7 || (ETH_HLEN + 8..ETH_HLEN + 40).contains(&i)
            } else {
                i == ETH_HLEN + 8 || (ETH_HLEN + 10..ETH_HLEN + 20).contains(&i)
            }
    };
    if let Some(i) = (0..after.len()).find(|i| !may_change(*i) && after[*i] != before[*i]) {
        return Err(format!("byte {i} changed"));
    }
    if ip_csum_ok(after) != ip_csum_ok(before) {
        return Err("IPv4 header checksum validity changed".into());
    }
    Ok(())
}

/// The one's-complement sum of what the transport checksum covers and a first fragment
/// holds: the pseudo-header's addresses and protocol, and the transport bytes present
/// (checksum field included). The pseudo-header's length and the later fragments' bytes
/// are left out: a translation changes neither, so a correct incremental update keeps
/// this sum (0 and 0xffff are the same one's-complement value, normalised to 0xffff).
fn partial_l4_sum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let mut b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [s.octets(), d.octets()].concat(),
        (IpAddr::V6(s), IpAddr::V6(d)) => [s.octets(), d.octets()].concat(),
        _ => unreachable!("one family"),
    };
    b.extend_from_slice(&[0, proto]);
    b.extend_from_slice(l4);
    match !crate::harness::inet_csum(&b) {
        0 => 0xffff,
        s => s,
    }
}

/// Addresses, ports, TCP flags and checksum validity of a well-formed TCP/UDP/SCTP frame
/// of either family (a whole datagram or a first fragment), recomputed with etherparse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
    pub proto: u8,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); 0 for UDP and SCTP.
    pub tcp_flags: u8,
    /// The IPv4 header checksum is valid (IPv6: always).
    pub ip_ok: bool,
    /// The TCP/UDP checksum is valid (a zero UDP checksum over IPv4 counts as valid);
    /// `None` for SCTP, whose CRC32c does not cover addresses, and for a first fragment,
    /// whose checksum covers bytes it does not hold (see `l4_sum`).
    pub l4_ok: Option<bool>,
    /// The one's-complement sum of the pseudo-header's addresses and protocol and the
    /// transport bytes present, which a correct incremental update keeps; `None` for SCTP
    /// and for a zero UDP checksum (none over IPv4, invalid over IPv6: it must stay zero).
    pub l4_sum: Option<u16>,
    pub hop_limit: u8,
    /// A whole datagram or a first fragment (`view` reads no later fragment).
    pub frag: FragPos,
}

pub fn view(f: &[u8]) -> Option<View> {
    let l = ip_layer(f).ok()?;
    if l.src.is_ipv6() || l.frag != FragPos::Whole {
        return view_raw(f, l);
    }
    let p = SlicedPacket::from_ethernet(f).ok()?;
    let (src, dst, hop_limit, ip_ok, proto, l4_bytes) = match &p.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            let ok = h.calc_header_checksum() == h.header_checksum;
            let (s, d) = (IpAddr::from(h.source), IpAddr::from(h.destination));
            (s, d, h.time_to_live, ok, h.protocol.0, ip.payload().payload)
        }
        _ => return None,
    };
    let csum = |tcp: Option<&etherparse::TcpSlice>, udp: Option<&etherparse::UdpSlice>| -> Option<bool> {
        Some(match (&p.net, tcp, udp) {
            (Some(etherparse::NetSlice::Ipv4(ip)), Some(t), _) => {
                let th = t.to_header();
                th.calc_checksum_ipv4(&ip.header().to_header(), t.payload()).ok()? == th.checksum
            }
            (Some(etherparse::NetSlice::Ipv4(ip)), _, Some(u)) => {
                let uh = u.to_header();
                uh.checksum == 0 || uh.calc_checksum_ipv4(&ip.header().to_header(), u.payload()).ok()? == uh.checksum
            }
            _ => return None,
        })
    };
    let (sp, dp, tcp_flags, l4_ok) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let th = t.to_header();
            let flags = u8::from(th.fin) | u8::from(th.syn) << 1 | u8::from(th.rst) << 2 | u8::from(th.ack) << 4;
            (th.source_port, th.destination_port, flags, Some(csum(Some(t), None)?))
        }
        Some(TransportSlice::Udp(u)) => {
            let uh = u.to_header();
            (uh.source_port, uh.destination_port, 0, Some(csum(None, Some(u))?))
        }
        None if proto == PROTO_SCTP && l4_bytes.len() >= 12 => {
            let port = |o: usize| u16::from_be_bytes([l4_bytes[o], l4_bytes[o + 1]]);
            (port(0), port(2), 0, None)
        }
        _ => return None,
    };
    let l4_sum = l4_sum(f, &l);
    Some(View {
        src: (src, sp),
        dst: (dst, dp),
        proto,
        tcp_flags,
        ip_ok,
        l4_ok,
        l4_sum,
        hop_limit,
        frag: FragPos::Whole,
    })
}

/// `View::l4_sum` of a frame whose IP layer is `l`.
fn l4_sum(f: &[u8], l: &IpLayer) -> Option<u16> {
    let l4 = &f[l.l4..l.end];
    // (Zero is "no checksum" over IPv4, and invalid over IPv6: an update leaves it alone.)
    let no_udp_csum = l.proto == PROTO_UDP && l4.get(6..8) == Some(&[0, 0][..]);
    (matches!(l.proto, PROTO_TCP | PROTO_UDP) && !no_udp_csum).then(|| partial_l4_sum(l.src, l.dst, l.proto, l4))
}

/// [`view`] for IPv6 and for first fragments, read from the independent reading of the
/// IP layer above: etherparse refuses some chains the datapath translates (a hop-by-hop
/// header after another one) and does not read the transport header of a fragment.
fn view_raw(f: &[u8], l: IpLayer) -> Option<View> {
    if malformed(f) != Some(false) {
        return None;
    }
    let l4 = &f[l.l4..l.end];
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let whole = l.frag == FragPos::Whole;
    let (tcp_flags, l4_ok) = match (l.proto, l.src, l.dst) {
        (PROTO_TCP, src, dst) => {
            // FIN, SYN, RST and ACK keep their bit positions from the TCP header.
            let flags = l4[13] & (0x01 | 0x02 | 0x04 | 0x10);
            let ok = match (whole, src, dst) {
                (true, IpAddr::V6(s), IpAddr::V6(d)) => {
                    let t = etherparse::TcpSlice::from_slice(l4).ok()?;
                    let th = t.to_header();
                    Some(th.calc_checksum_ipv6_raw(s.octets(), d.octets(), t.payload()).ok()? == th.checksum)
                }
                _ => None,
            };
            (flags, ok)
        }
        (PROTO_UDP, IpAddr::V6(s), IpAddr::V6(d)) if whole => {
            let u = etherparse::UdpSlice::from_slice(l4).ok()?;
            let uh = u.to_header();
            (0, Some(uh.calc_checksum_ipv6_raw(s.octets(), d.octets(), u.payload()).ok()? == uh.checksum))
        }
        _ => (0, None),
    };
    let hop_limit = if l.src.is_ipv6() { f[ETH_HLEN + 7] } else { f[ETH_HLEN + 8] };
    Some(View {
        src: (l.src, port(0)),
        dst: (l.dst, port(2)),
        proto: l.proto,
        tcp_flags,
        ip_ok: ip_csum_ok(f),
        l4_ok,
        l4_sum: l4_sum(f, &l),
        hop_limit,
        frag: l.frag,
    })
}

/// Checks an ICMP port unreachable (IPv4 type 3 code 3, ICMPv6 type 1 code 4) that answers
/// the UDP datagram `frame`: from its destination to its source, valid checksums (ICMPv6's
/// over the pseudo-header), quoting the datagram's IP and UDP headers. `Err` says what is
/// wrong; `Ok(false)` when `out` is no ICMP message at all.
pub fn check_port_unreachable(frame: &[u8], out: &[u8]) -> Result<bool, String> {
    let (Some((fs, fd, _)), Some((os, od, _))) = (ip_addrs(frame), ip_addrs(out)) else {
        return Ok(false);
    };
    match (fs, out.get(ETH_HLEN + 9), out.get(ETH_HLEN + 6)) {
        (IpAddr::V4(_), Some(1), _) => {
            if out.len() < ETH_HLEN + IP4_HLEN + 8 + 28 || frame.len() < ETH_HLEN + 28 {
                return Err(format!("short ICMP error {out:02x?}"));
            }
            let icmp = &out[ETH_HLEN + IP4_HLEN..];
            let ok = ip_csum_ok(out)
                && (os, od) == (fd, fs)
                && (icmp[0], icmp[1]) == (3, 3)
                && crate::harness::inet_csum(icmp) == 0
                && icmp[8..36] == frame[ETH_HLEN..ETH_HLEN + 28];
            if ok { Ok(true) } else { Err(format!("bad ICMP port unreachable {out:02x?} for {frame:02x?}")) }
        }
        (IpAddr::V6(s6), _, Some(58)) => {
            let IpAddr::V6(d6) = fd else { unreachable!() };
            if out.len() < ETH_HLEN + IP6_HLEN + 8 + 48 || frame.len() < ETH_HLEN + 48 {
                return Err(format!("short ICMPv6 error {out:02x?}"));
            }
            let icmp = &out[ETH_HLEN + IP6_HLEN..];
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&d6.octets());
            pseudo.extend_from_slice(&s6.octets());
            pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 58]);
            pseudo.extend_from_slice(icmp);
            let ok = (os, od) == (fd, fs)
                && (icmp[0], icmp[1]) == (1, 4)
                && crate::harness::inet_csum(&pseudo) == 0
                && icmp[8..56] == frame[ETH_HLEN..ETH_HLEN + 48];
            if ok { Ok(true) } else { Err(format!("bad ICMPv6 port unreachable {out:02x?} for {frame:02x?}")) }
        }
        _ => Ok(false),
    }
}

/// ICMP / ICMPv6 error types the fuzzers send about a flow's packet.
#[derive(Clone, Copy, Debug)]
pub enum IcmpError {
    /// Port unreachable (IPv4 3/3, ICMPv6 1/4).
    PortUnreachable,
    /// Fragmentation needed (IPv4 3/4) or packet too big (ICMPv6 2/0), with an MTU.
    TooBig(u16),
}

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

/// The ICMPv6 checksum of `icmp` (checksum field included) over the pseudo-header: 0 when
/// valid.
fn icmp6_csum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + icmp.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, PROTO_ICMPV6]);
    pseudo.extend_from_slice(icmp);
    crate::harness::inet_csum(&pseudo)
}

/// An Ethernet + IPv4/IPv6 frame carrying an ICMP / ICMPv6 error from `src` to `dst`
/// quoting `quote` (an IP packet: the header and as much of the rest as the sender kept),
/// with valid checksums.
pub fn icmp_error_any(src: IpAddr, dst: IpAddr, e: IcmpError, quote: &[u8]) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let (typ, code, rest) = match (v6, e) {
        (false, IcmpError::PortUnreachable) => (3, 3, [0u8; 4]),
        (false, IcmpError::TooBig(mtu)) => (3, 4, [0, 0, (mtu >> 8) as u8, mtu as u8]),
        (true, IcmpError::PortUnreachable) => (1, 4, [0u8; 4]),
        (true, IcmpError::TooBig(mtu)) => (2, 0, u32::from(mtu).to_be_bytes()),
    };
    icmp_message_any(src, dst, (typ, code), rest, quote)
}

/// An Ethernet + IPv4/IPv6 frame carrying any ICMP / ICMPv6 message (`typ`, `code`, the
/// 4 bytes after the checksum, then `body`) from `src` to `dst`, with valid checksums
/// (ICMPv6's over its pseudo-header, RFC 4443 2.3).
pub fn icmp_message_any(src: IpAddr, dst: IpAddr, (typ, code): (u8, u8), rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => crate::harness::icmp_error(s, d, (typ, code), rest, body),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut icmp = vec![typ, code, 0, 0];
            icmp.extend_from_slice(&rest);
            icmp.extend_from_slice(body);
            let c = icmp6_csum(s, d, &icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
            f.extend_from_slice(&[PROTO_ICMPV6, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            f.extend_from_slice(&icmp);
            f
        }
        _ => panic!("icmp_message_any: {src} and {dst} are of different families"),
    }
}

/// An ICMP / ICMPv6 error read independently: outer addresses, the quoted packet's
/// addresses and ports, and whether every checksum it carries is valid (outer IPv4
/// header, ICMP (ICMPv6 over its pseudo-header), quoted IPv4 header, quoted TCP/UDP when
/// the quote holds the whole segment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpView {
    pub outer_src: IpAddr,
    pub outer_dst: IpAddr,
    pub quote_src: (IpAddr, u16),
    pub quote_dst: (IpAddr, u16),
    pub quote_proto: u8,
    pub csums_ok: bool,
    /// The message's type and code.
    pub typ_code: (u8, u8),
}

/// `None` unless `f` is a plain (no IPv4 options, no IPv6 extension headers) ICMP error of
/// the types [`icmp_error_any`] builds, quoting a plain TCP/UDP packet.
pub fn icmp_view(f: &[u8]) -> Option<IcmpView> {
    let v = icmp_message_view(f)?;
    match (v.outer_src, v.typ_code) {
        (IpAddr::V4(_), (3, 3 | 4)) | (IpAddr::V6(_), (1, 4) | (2, 0)) => Some(v),
        _ => None,
    }
}

/// `None` unless `f` is a plain (no IPv4 options, no IPv6 extension headers) ICMP / ICMPv6
/// message of any type whose body quotes a plain TCP/UDP packet.
pub fn icmp_message_view(f: &[u8]) -> Option<IcmpView> {
    let (outer_src, outer_dst, false) = ip_addrs(f)? else { return None };
    let (icmp, mut ok) = match outer_src {
        IpAddr::V4(_) => {
            let ip = &f[ETH_HLEN..];
            if ip[0] != 0x45 || ip[9] != PROTO_ICMP {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            (ip.get(IP4_HLEN..total)?, ip_csum_ok(f))
        }
        IpAddr::V6(_) => {
            let ip = &f[ETH_HLEN..];
            if ip[6] != PROTO_ICMPV6 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            (ip.get(IP6_HLEN..IP6_HLEN + plen)?, true)
        }
    };
    if icmp.len() < 8 {
        return None;
    }
    match (outer_src, outer_dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => ok &= crate::harness::inet_csum(icmp) == 0,
        (IpAddr::V6(s), IpAddr::V6(d)) => ok &= icmp6_csum(s, d, icmp) == 0,
        _ => return None,
    }
    let quote = &icmp[8..];
    let (qs, qd, proto, l4) = if outer_src.is_ipv4() {
        if quote.len() < IP4_HLEN + 8 || quote[0] != 0x45 {
            return None;
        }
        ok &= crate::harness::inet_csum(&quote[..IP4_HLEN]) == 0;
        let a = |o: usize| IpAddr::V4(Ipv4Addr::new(quote[o], quote[o + 1], quote[o + 2], quote[o + 3]));
        (a(12), a(16), quote[9], &quote[IP4_HLEN..])
    } else {
        if quote.len() < IP6_HLEN + 8 {
            return None;
        }
        let a = |o: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&quote[o..o + 16]).unwrap()));
        (a(8), a(24), quote[6], &quote[IP6_HLEN..])
    };
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    // The whole quoted segment: checksum it as the quoted packet's own header says.
    let whole = match (qs, qd) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = usize::from(u16::from_be_bytes([quote[2], quote[3]]));
            (total == quote.len()).then(|| (s.octets().to_vec(), d.octets().to_vec()))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let plen = usize::from(u16::from_be_bytes([quote[4], quote[5]]));
            (IP6_HLEN + plen == quote.len()).then(|| (s.octets().to_vec(), d.octets().to_vec()))
        }
        _ => None,
    };
    match proto {
        PROTO_TCP | PROTO_UDP => {}
        _ => return None,
    }
    if let Some((s, d)) = whole {
        let mut pseudo = s;
        pseudo.extend_from_slice(&d);
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, proto]);
        pseudo.extend_from_slice(l4);
        let zero_udp4 = proto == PROTO_UDP && qs.is_ipv4() && l4.get(6..8) == Some(&[0, 0][..]);
        ok &= zero_udp4 || crate::harness::inet_csum(&pseudo) == 0;
    }
    Some(IcmpView {
        outer_src,
        outer_dst,
        quote_src: (qs, port(0)),
        quote_dst: (qd, port(2)),
        quote_proto: proto,
        csums_ok: ok,
        typ_code: (icmp[0], icmp[1]),
    })
}

/// Insert IPv6 extension headers of the given types (0 hop-by-hop, 43 routing, 60
/// destination options, 44 fragment; each 8 bytes) between the IPv6 header and the
/// transport header of `frame` (built without any), fixing the next-header chain and the
/// payload length. The L4 checksum stays valid: the pseudo-header counts the upper-layer
/// length, not the payload length, and there is no routing header with segments left.
pub fn with_ext_headers(frame: &[u8], types: &[u8]) -> Vec<u8> {
    const L4: usize = ETH_HLEN + IP6_HLEN;
    let l4_next = frame[ETH_HLEN + 6];
    let mut ext = Vec::new();
    for (i, t) in types.iter().enumerate() {
        let next = types.get(i + 1).copied().unwrap_or(l4_next);
        match *t {
            // Routing header, type 253 (RFC 4727 experiment), segments left 0.
            NEXT_ROUTING => ext.extend_from_slice(&[next, 0, 253, 0, 0, 0, 0, 0]),
            // Fragment header: offset 0, more fragments, identification 42.
            NEXT_FRAGMENT => ext.extend_from_slice(&[next, 0, 0, 1, 0, 0, 0, 42]),
            // Options header with one PadN option filling it.
            _ => ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
        }
    }
    let mut out = frame[..L4].to_vec();
    out.extend_from_slice(&ext);
    out.extend_from_slice(&frame[L4..]);
    out[ETH_HLEN + 6] = types[0];
    let plen = u16::from_be_bytes([out[ETH_HLEN + 4], out[ETH_HLEN + 5]]) + ext.len() as u16;
    out[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&plen.to_be_bytes());
    out
}
