//! Refusing a flow to a frontend without endpoints, like kube-proxy's REJECT: the client
//! fails fast instead of retrying into a drop. TCP gets a reset; on the pod side UDP gets an
//! ICMP port unreachable quoting the datagram, as the kernel's own reply would. The answers
//! are built in a buffer from the original's headers (`rst_frame`, `port_unreachable_frame`)
//! and written over the frame by each hook: XDP sends it back out (`XDP_TX`), TC back into
//! the pod it came from.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    programs::{TcContext, XdpContext},
};
use proxy_common::{PROTO_TCP, PROTO_UDP};

use crate::{
    csum,
    parse::{
        ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_FRAGS_OFF, IP_HLEN, IP_PROTO_OFF, IP_SRC_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF,
        L4_DPORT_OFF, L4_SPORT_OFF, Packet, TCP_ACK, TCP_ACK_OFF, TCP_CSUM_OFF, TCP_DOFF_OFF, TCP_FIN, TCP_FLAGS_OFF,
        TCP_HLEN, TCP_RST, TCP_SEQ_OFF, TCP_SYN,
    },
};

/// Ethernet + IPv4 without options + TCP without options: the size of a reset we send.
const RST_LEN: usize = ETH_HLEN + IP_HLEN + TCP_HLEN;
/// What an ICMP error quotes of a UDP datagram: its IPv4 header and the UDP header.
const UDP_QUOTE_LEN: usize = ETH_HLEN + IP_HLEN + 8;
/// ICMP header: type, code, checksum, 4 unused bytes.
const ICMP_HLEN: usize = 8;
/// Ethernet + IPv4 + ICMP + the quoted IPv4 and UDP headers.
const UNREACH_LEN: usize = ETH_HLEN + IP_HLEN + ICMP_HLEN + IP_HLEN + 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const PROTO_ICMP: u8 = 1;
const IPV4_VIHL: u8 = 0x45;
const IP_DF: u8 = 0x40;
const REPLY_TTL: u8 = 64;
/// The Ethernet addresses (destination, source) at the start of the frame.
const MACS_LEN: usize = 12;

/// Only IPv4 without options: what the answers are laid out for.
#[inline(always)]
fn plain(p: &Packet) -> bool {
    p.l4_off == ETH_HLEN + IP_HLEN
}

/// The MACs of the original, swapped: the answer goes back where the original came from.
#[inline(always)]
fn swapped_macs<const N: usize>(h: &[u8; N], out: &mut [u8]) {
    out[..6].copy_from_slice(&h[6..MACS_LEN]);
    out[6..MACS_LEN].copy_from_slice(&h[..6]);
}

/// An IPv4 header from the original's destination back to its source.
#[inline(always)]
fn ip_header(p: &Packet, proto: u8, tot_len: usize) -> [u8; IP_HLEN] {
    let mut ip = [0u8; IP_HLEN];
    ip[0] = IPV4_VIHL;
    ip[IP_TOT_LEN_OFF..IP_TOT_LEN_OFF + 2].copy_from_slice(&(tot_len as u16).to_be_bytes());
    ip[IP_FRAGS_OFF] = IP_DF;
    ip[IP_TTL_OFF] = REPLY_TTL;
    ip[IP_PROTO_OFF] = proto;
    ip[IP_SRC_OFF..IP_SRC_OFF + 4].copy_from_slice(&p.daddr.to_ne_bytes());
    ip[IP_DST_OFF..IP_DST_OFF + 4].copy_from_slice(&p.saddr.to_ne_bytes());
    let c = !csum::fold(csum::sum_words(&ip));
    ip[IP_CSUM_OFF..IP_CSUM_OFF + 2].copy_from_slice(&c.to_be_bytes());
    ip
}

/// The reset answering the TCP segment whose headers are `h`: RFC 9293 3.10.7.1 — to a
/// segment with ACK, seq = its ack; otherwise seq 0 and ack = its seq + segment length (SYN
/// and FIN count one each).
#[inline(always)]
fn rst_frame(h: &[u8; RST_LEN], p: &Packet) -> [u8; RST_LEN] {
    let t = ETH_HLEN + IP_HLEN;
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let ip_len = u16::from_be_bytes([h[ETH_HLEN + IP_TOT_LEN_OFF], h[ETH_HLEN + IP_TOT_LEN_OFF + 1]]) as u32;
    let doff = ((h[t + TCP_DOFF_OFF] >> 4) as u32) * 4;
    let (seq, ack, flags) = if p.tcp_flags & TCP_ACK != 0 {
        (be32(t + TCP_ACK_OFF), 0, TCP_RST)
    } else {
        let payload = ip_len.saturating_sub(IP_HLEN as u32 + doff);
        let ctl = (p.tcp_flags & TCP_SYN != 0) as u32 + (p.tcp_flags & TCP_FIN != 0) as u32;
        (0, be32(t + TCP_SEQ_OFF).wrapping_add(payload + ctl), TCP_RST | TCP_ACK)
    };
    let mut out = [0u8; RST_LEN];
    swapped_macs(h, &mut out);
    out[12..ETH_HLEN].copy_from_slice(&h[12..ETH_HLEN]);
    out[ETH_HLEN..t].copy_from_slice(&ip_header(p, PROTO_TCP, IP_HLEN + TCP_HLEN));
    let mut tcp = [0u8; TCP_HLEN];
    tcp[L4_SPORT_OFF..L4_SPORT_OFF + 2].copy_from_slice(&p.dport.to_ne_bytes());
    tcp[L4_DPORT_OFF..L4_DPORT_OFF + 2].copy_from_slice(&p.sport.to_ne_bytes());
    tcp[TCP_SEQ_OFF..TCP_SEQ_OFF + 4].copy_from_slice(&seq.to_be_bytes());
    tcp[TCP_ACK_OFF..TCP_ACK_OFF + 4].copy_from_slice(&ack.to_be_bytes());
    tcp[TCP_DOFF_OFF] = ((TCP_HLEN / 4) as u8) << 4;
    tcp[TCP_FLAGS_OFF] = flags;
    // Pseudo-header: addresses, protocol, TCP length.
    let (s, d) = (p.daddr.to_ne_bytes(), p.saddr.to_ne_bytes());
    let pseudo = csum::sum_words(&s) + csum::sum_words(&d) + PROTO_TCP as u32 + TCP_HLEN as u32;
    let c = !csum::fold(pseudo + csum::sum_words(&tcp));
    tcp[TCP_CSUM_OFF..TCP_CSUM_OFF + 2].copy_from_slice(&c.to_be_bytes());
    out[t..].copy_from_slice(&tcp);
    out
}

/// ICMP port unreachable (RFC 792) answering the UDP datagram whose headers are `h`,
/// quoting its IPv4 header and UDP header, from the frontend the client addressed.
#[inline(always)]
fn port_unreachable_frame(h: &[u8; UDP_QUOTE_LEN], p: &Packet) -> [u8; UNREACH_LEN] {
    let mut out = [0u8; UNREACH_LEN];
    swapped_macs(h, &mut out);
    out[12..ETH_HLEN].copy_from_slice(&h[12..ETH_HLEN]);
    let icmp_off = ETH_HLEN + IP_HLEN;
    out[ETH_HLEN..icmp_off].copy_from_slice(&ip_header(p, PROTO_ICMP, UNREACH_LEN - ETH_HLEN));
    let mut icmp = [0u8; ICMP_HLEN + IP_HLEN + 8];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_PORT_UNREACH;
    icmp[ICMP_HLEN..].copy_from_slice(&h[ETH_HLEN..]);
    let c = !csum::fold(csum::sum_words(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    out[icmp_off..].copy_from_slice(&icmp);
    out
}

#[inline(always)]
fn xdp_frame<const N: usize>(ctx: &XdpContext) -> Option<*mut [u8; N]> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + N > end {
        return None;
    }
    Some(start as *mut [u8; N])
}

/// XDP: answer a TCP segment with a reset, in place (`XDP_TX`). Anything else (UDP, a RST,
/// IP options) is dropped: an ICMP error would need the frame to grow, which generic XDP on
/// a veth does not reliably allow.
#[inline(always)]
pub fn tcp_reset(ctx: &XdpContext, p: &Packet) -> u32 {
    if p.proto != PROTO_TCP || p.tcp_flags & TCP_RST != 0 || !plain(p) {
        return xdp_action::XDP_DROP;
    }
    let Some(hdr) = xdp_frame::<RST_LEN>(ctx) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: the whole Ethernet + IPv4 + TCP header block is within bounds.
    let rst = rst_frame(unsafe { &*hdr }, p);
    // Shrink the whole frame, fragments included: shrinking by only the linear part would
    // leave the original's trailing bytes behind the reset.
    // SAFETY: helpers on our own context; the pointer is re-derived below.
    let shrunk = unsafe {
        let len = bpf_xdp_get_buff_len(ctx.ctx) as i32;
        len <= RST_LEN as i32 || bpf_xdp_adjust_tail(ctx.ctx, RST_LEN as i32 - len) == 0
    };
    let Some(hdr) = xdp_frame::<RST_LEN>(ctx).filter(|_| shrunk) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked just above.
    unsafe { *hdr = rst };
    xdp_action::XDP_TX
}

/// Resize the skb to exactly `N` bytes and write `frame` over it.
#[inline(always)]
fn tc_write<const N: usize>(ctx: &TcContext, frame: &[u8; N]) -> Result<(), i64> {
    // SAFETY: helper on our own context; later accesses go through ctx helpers.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, N as u32, 0) };
    if rc != 0 {
        return Err(rc);
    }
    ctx.store(0, frame, 0)
}

/// TC (pod side): answer a pod's TCP segment with a reset, or its UDP datagram with an ICMP
/// port unreachable, and send the answer straight back into the pod (egress of the veth it
/// came from), so `connect()` fails at once with ECONNREFUSED like against kube-proxy's
/// REJECT. A RST, other protocols and IP options are dropped (`Err`).
#[inline(always)]
pub fn tc_reject(ctx: &TcContext, p: &Packet) -> Result<i32, i64> {
    if !plain(p) {
        return Err(0);
    }
    match p.proto {
        PROTO_TCP if p.tcp_flags & TCP_RST == 0 => {
            let h = ctx.load::<[u8; RST_LEN]>(0)?;
            tc_write(ctx, &rst_frame(&h, p))?;
        }
        PROTO_UDP => {
            let h = ctx.load::<[u8; UDP_QUOTE_LEN]>(0)?;
            tc_write(ctx, &port_unreachable_frame(&h, p))?;
        }
        _ => return Err(0),
    }
    // SAFETY: reading the context field and calling a helper without preconditions.
    Ok(unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 })
}
