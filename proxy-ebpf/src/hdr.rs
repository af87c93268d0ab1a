//! The wire: header lengths, field offsets, protocol numbers and flag bits, in one place.
//! Offsets are `offset_of!` on the header layouts of `network-types`, never bare numbers;
//! what those layouts lack is named here with its RFC.
use core::mem::offset_of;

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

// Ethernet.

pub const ETH_HLEN: usize = EthHdr::LEN;
/// The Ethernet addresses (destination, source) at the start of the frame.
pub const MACS_LEN: usize = 12;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

// IPv4 (RFC 791).

/// IPv4 without options.
pub const IP_HLEN: usize = Ipv4Hdr::LEN;
/// Version 4, header length 5 words: an IPv4 header without options.
pub const IPV4_VIHL: u8 = 0x45;
pub const IP_TOT_LEN_OFF: usize = offset_of!(Ipv4Hdr, tot_len);
pub const IP_FRAGS_OFF: usize = offset_of!(Ipv4Hdr, frags);
pub const IP_ID_OFF: usize = offset_of!(Ipv4Hdr, id);
pub const IP_PROTO_OFF: usize = offset_of!(Ipv4Hdr, proto);
pub const IP_TOS_OFF: usize = offset_of!(Ipv4Hdr, tos);
pub const IP_TTL_OFF: usize = offset_of!(Ipv4Hdr, ttl);
pub const IP_CSUM_OFF: usize = offset_of!(Ipv4Hdr, check);
pub const IP_SRC_OFF: usize = offset_of!(Ipv4Hdr, src_addr);
pub const IP_DST_OFF: usize = offset_of!(Ipv4Hdr, dst_addr);
/// Don't Fragment, in the high byte of the flags / fragment offset field.
pub const IP_DF: u8 = 0x40;
/// More Fragments, and the fragment offset, of the flags / fragment offset field.
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

// IPv6 (RFC 8200).

pub const IP6_HLEN: usize = Ipv6Hdr::LEN;
/// Version 6 in the high nibble of the first byte (traffic class and flow label zero).
pub const IPV6_VERSION: u8 = 0x60;
pub const IP6_PLEN_OFF: usize = offset_of!(Ipv6Hdr, payload_len);
pub const IP6_NEXT_OFF: usize = offset_of!(Ipv6Hdr, next_hdr);
pub const IP6_HOP_OFF: usize = offset_of!(Ipv6Hdr, hop_limit);
pub const IP6_SRC_OFF: usize = offset_of!(Ipv6Hdr, src_addr);
pub const IP6_DST_OFF: usize = offset_of!(Ipv6Hdr, dst_addr);
/// Extension headers a real stack sends before the transport header.
pub const NEXT_HOP_BY_HOP: u8 = 0;
pub const NEXT_ROUTING: u8 = 43;
pub const NEXT_FRAGMENT: u8 = 44;
pub const NEXT_DEST_OPTS: u8 = 60;
/// Fragment header (4.5): next header, reserved, offset (13 bits) | 2 reserved bits | M,
/// identification (32 bits).
pub const FRAG6_HLEN: usize = 8;
pub const FRAG6_OFFSET: u16 = 0xfff8;
pub const FRAG6_M: u16 = 0x0001;

// Transport.

/// TCP, UDP and SCTP all start with the source and destination ports.
pub const L4_SPORT_OFF: usize = offset_of!(UdpHdr, src);
pub const L4_DPORT_OFF: usize = offset_of!(UdpHdr, dst);
/// The two ports: all we touch of an SCTP header (its CRC32c does not cover addresses).
pub const L4_PORTS_LEN: usize = 4;
pub const TCP_HLEN: usize = TcpHdr::LEN;
/// The byte holding the TCP data offset (high nibble), and the flags byte after it.
pub const TCP_DOFF_OFF: usize = offset_of!(TcpHdr, _bitfield_1);
pub const TCP_FLAGS_OFF: usize = TCP_DOFF_OFF + 1;
pub const TCP_SEQ_OFF: usize = offset_of!(TcpHdr, seq);
pub const TCP_ACK_OFF: usize = offset_of!(TcpHdr, ack_seq);
pub const TCP_CSUM_OFF: usize = offset_of!(TcpHdr, check);
/// TCP flags (the byte at `TCP_FLAGS_OFF`).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
pub const UDP_HLEN: usize = UdpHdr::LEN;
pub const UDP_LEN_OFF: usize = offset_of!(UdpHdr, len);
pub const UDP_CSUM_OFF: usize = offset_of!(UdpHdr, check);
/// SCTP common header: ports, verification tag, checksum.
pub const SCTP_HLEN: usize = 12;

// ICMP (RFC 792) and ICMPv6 (RFC 4443).

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMP6: u8 = 58;
/// The header of an error: type, code, checksum, 4 bytes of type-specific data.
pub const ICMP_HLEN: usize = 8;
pub const ICMP_CSUM_OFF: usize = 2;
/// Error types (the ones a flow's packets can cause), and port unreachable's code.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROB: u8 = 12;
pub const ICMP_PORT_UNREACH: u8 = 3;
/// Destination unreachable's "fragmentation needed and DF set" (RFC 792, RFC 1191).
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 error types are 1 to 4 (destination unreachable, packet too big, time exceeded,
/// parameter problem); informational types (echo, neighbour discovery, ...) start at 128.
pub const ICMP6_DEST_UNREACH: u8 = 1;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
pub const ICMP6_PARAM_PROB: u8 = 4;
pub const ICMP6_PORT_UNREACH: u8 = 4;
