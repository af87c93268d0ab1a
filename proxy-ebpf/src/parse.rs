//! Header parsing over direct packet pointers, shared by the TC and XDP entry points.
//!
//! Verdicts for odd frames (documented in docs/datapath.md): anything that is not an
//! IPv4 frame we can read completely is *passed untouched* and counted; the kernel judges it
//! as if we were not there. Only frames that parse cleanly as IPv4 + TCP/UDP/SCTP are
//! candidates for translation.
use core::mem::size_of;

use proxy_common::{verdict, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// TCP flags (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Where the parsed fields live in the frame, and their values (addresses and ports in
/// network byte order, as on the wire).
#[derive(Clone, Copy)]
pub struct Packet {
    pub l3_off: usize,
    pub l4_off: usize,
    pub proto: u8,
    /// TCP flags; 0 for other protocols.
    pub tcp_flags: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl Packet {
    /// A SYN without ACK: a client opening a connection.
    #[inline(always)]
    pub fn tcp_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// Offset of the L4 checksum field, or `None` for SCTP (CRC32c over the payload, no
    /// pseudo-header: address rewrites do not touch it).
    #[inline(always)]
    pub fn l4_csum_off(&self) -> Option<usize> {
        match self.proto {
            PROTO_TCP => Some(self.l4_off + 16),
            PROTO_UDP => Some(self.l4_off + 6),
            _ => None,
        }
    }
}

#[inline(always)]
fn ptr_at<T>(start: usize, end: usize, off: usize) -> Result<*const T, u32> {
    if start + off + size_of::<T>() > end {
        return Err(verdict::MALFORMED);
    }
    Ok((start + off) as *const T)
}

/// Parse Ethernet + IPv4 + L4 ports. `Err(verdict)` says why the frame is not a candidate.
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
#[inline(always)]
pub fn parse(start: usize, end: usize, pkt_len: usize) -> Result<Packet, u32> {
    // SAFETY: every read is bounds-checked against `end` by `ptr_at`; reads are unaligned
    // because frames give no alignment guarantee.
    unsafe {
        let eth_proto = u16::from_be(ptr_at::<u16>(start, end, 12)?.read_unaligned());
        if eth_proto != ETH_P_IPV4 {
            return Err(verdict::NOT_IPV4);
        }
        let l3 = ETH_HLEN;
        let ip = ptr_at::<[u8; 20]>(start, end, l3)? as *const u8;
        let vihl = *ip;
        if vihl >> 4 != 4 {
            return Err(verdict::MALFORMED);
        }
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Err(verdict::MALFORMED);
        }
        let tot_len = u16::from_be((ip.add(2) as *const u16).read_unaligned()) as usize;
        if tot_len < ihl || l3 + tot_len > pkt_len {
            return Err(verdict::MALFORMED);
        }
        let frag = u16::from_be((ip.add(6) as *const u16).read_unaligned());
        if frag & (IP_MF | IP_OFFSET) != 0 {
            return Err(verdict::FRAGMENT);
        }
        let proto = *ip.add(9);
        let saddr = (ip.add(12) as *const u32).read_unaligned();
        let daddr = (ip.add(16) as *const u32).read_unaligned();
        let l4 = l3 + ihl;
        // Bytes of L4 header we need: through the checksum field for TCP (16..18), the
        // whole header for UDP, ports + verification tag + checksum for SCTP.
        let need = match proto {
            PROTO_TCP => 20,
            PROTO_UDP => 8,
            PROTO_SCTP => 12,
            _ => return Err(verdict::OTHER_L4),
        };
        let l4_len = tot_len - ihl;
        let l4p = start + l4;
        if l4_len < need || l4p + need > end {
            return Err(verdict::MALFORMED);
        }
        // `need` >= 8 covers the two ports read here.
        let ports = l4p as *const u16;
        let sport = ports.read_unaligned();
        let dport = ports.add(1).read_unaligned();
        let mut tcp_flags = 0;
        if proto == PROTO_TCP {
            let doff = ((*(l4p as *const u8).add(12) >> 4) as usize) * 4;
            if doff < 20 || doff > l4_len {
                return Err(verdict::MALFORMED);
            }
            tcp_flags = *(l4p as *const u8).add(13);
        } else if proto == PROTO_UDP {
            let ulen = u16::from_be(ports.add(2).read_unaligned()) as usize;
            if ulen < 8 || ulen > l4_len {
                return Err(verdict::MALFORMED);
            }
        }
        Ok(Packet { l3_off: l3, l4_off: l4, proto, tcp_flags, saddr, daddr, sport, dport })
    }
}
