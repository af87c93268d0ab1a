//! Refusing a TCP connection to a frontend without endpoints, like kube-proxy's REJECT: the
//! client fails fast instead of retrying SYNs into a drop. XDP builds the reset in place.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    programs::XdpContext,
};
use proxy_common::PROTO_TCP;

use crate::{
    csum,
    parse::{
        Packet, ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_FRAGS_OFF, IP_HLEN, IP_PROTO_OFF, IP_SRC_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF, L4_DPORT_OFF,
        L4_SPORT_OFF, TCP_ACK, TCP_ACK_OFF, TCP_CSUM_OFF, TCP_DOFF_OFF, TCP_FIN, TCP_FLAGS_OFF, TCP_HLEN, TCP_RST,
        TCP_SEQ_OFF, TCP_SYN,
    },
};

/// Ethernet + IPv4 without options + TCP without options: the size of a reset we send.
const RST_LEN: usize = ETH_HLEN + IP_HLEN + TCP_HLEN;
const IPV4_VIHL: u8 = 0x45;
const IP_DF: u8 = 0x40;
const RST_TTL: u8 = 64;

#[inline(always)]
fn frame<const N: usize>(ctx: &XdpContext) -> Option<*mut [u8; N]> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + N > end {
        return None;
    }
    Some(start as *mut [u8; N])
}

/// What the reset answers with, from the segment it answers: RFC 9293 3.10.7.1 — to a
/// segment with ACK, seq = its ack; otherwise seq 0 and ack = its seq + segment length (SYN
/// and FIN count one each). `l4_len` is the IP payload length (the TCP segment).
struct Answer {
    macs: [u8; 12],
    seq: u32,
    ack: u32,
    flags: u8,
}

#[inline(always)]
fn answer<const N: usize>(h: &[u8; N], t: usize, l4_len: u32, tcp_flags: u8) -> Answer {
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let mut macs = [0u8; 12];
    macs.copy_from_slice(&h[..12]);
    let (seq, ack, doff) = (be32(t + TCP_SEQ_OFF), be32(t + TCP_ACK_OFF), ((h[t + TCP_DOFF_OFF] >> 4) as u32) * 4);
    if tcp_flags & TCP_ACK != 0 {
        Answer { macs, seq: ack, ack: 0, flags: TCP_RST }
    } else {
        let payload = l4_len.saturating_sub(doff);
        let ctl = (tcp_flags & TCP_SYN != 0) as u32 + (tcp_flags & TCP_FIN != 0) as u32;
        Answer { macs, seq: 0, ack: seq.wrapping_add(payload + ctl), flags: TCP_RST | TCP_ACK }
    }
}

/// Shrink the frame (fragments included: shrinking by only the linear part would leave the
/// original's trailing bytes behind the reset) to `n` bytes.
#[inline(always)]
fn shrink(ctx: &XdpContext, n: usize) -> bool {
    // SAFETY: helpers on our own context; pointers are re-derived by the caller afterwards.
    unsafe {
        let len = bpf_xdp_get_buff_len(ctx.ctx) as i32;
        len <= n as i32 || bpf_xdp_adjust_tail(ctx.ctx, n as i32 - len) == 0
    }
}

/// The reset's TCP header; `pseudo` is the pseudo-header's sum for its checksum.
#[inline(always)]
fn tcp_header(sport: u16, dport: u16, a: &Answer, pseudo: u32) -> [u8; TCP_HLEN] {
    let mut tcp = [0u8; TCP_HLEN];
    tcp[L4_SPORT_OFF..L4_SPORT_OFF + 2].copy_from_slice(&sport.to_ne_bytes());
    tcp[L4_DPORT_OFF..L4_DPORT_OFF + 2].copy_from_slice(&dport.to_ne_bytes());
    tcp[TCP_SEQ_OFF..TCP_SEQ_OFF + 4].copy_from_slice(&a.seq.to_be_bytes());
    tcp[TCP_ACK_OFF..TCP_ACK_OFF + 4].copy_from_slice(&a.ack.to_be_bytes());
    tcp[TCP_DOFF_OFF] = ((TCP_HLEN / 4) as u8) << 4;
    tcp[TCP_FLAGS_OFF] = a.flags;
    let c = !csum::fold(pseudo + csum::sum_words(&tcp));
    tcp[TCP_CSUM_OFF..TCP_CSUM_OFF + 2].copy_from_slice(&c.to_be_bytes());
    tcp
}

#[inline(always)]
fn swap_macs(h: &mut [u8], macs: &[u8; 12]) {
    h[..6].copy_from_slice(&macs[6..]);
    h[6..12].copy_from_slice(&macs[..6]);
}

/// Answer an IPv4 TCP segment with a reset, in place (`XDP_TX`). Anything else (UDP, a
/// RST, IP options) is dropped; building an ICMP error would need to grow the frame and
/// quote the original, which this does not do yet.
#[inline(always)]
pub fn tcp_reset(ctx: &XdpContext, p: &Packet) -> u32 {
    if p.proto != PROTO_TCP || p.tcp_flags & TCP_RST != 0 || p.l4_off != ETH_HLEN + IP_HLEN {
        return xdp_action::XDP_DROP;
    }
    let Some(hdr) = frame::<RST_LEN>(ctx) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: the whole Ethernet + IPv4 + TCP header block is within bounds.
    let a = unsafe {
        let h = &*hdr;
        let ip_len = u16::from_be_bytes([h[ETH_HLEN + IP_TOT_LEN_OFF], h[ETH_HLEN + IP_TOT_LEN_OFF + 1]]) as u32;
        answer(h, ETH_HLEN + IP_HLEN, ip_len.saturating_sub(IP_HLEN as u32), p.tcp_flags)
    };
    if !shrink(ctx, RST_LEN) {
        return xdp_action::XDP_DROP;
    }
    let Some(hdr) = frame::<RST_LEN>(ctx) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked just above.
    let h = unsafe { &mut *hdr };
    swap_macs(h, &a.macs);
    let (s, d) = (p.daddr.to_ne_bytes(), p.saddr.to_ne_bytes());
    let mut ip = [0u8; IP_HLEN];
    ip[0] = IPV4_VIHL;
    ip[IP_TOT_LEN_OFF..IP_TOT_LEN_OFF + 2].copy_from_slice(&((IP_HLEN + TCP_HLEN) as u16).to_be_bytes());
    ip[IP_FRAGS_OFF] = IP_DF;
    ip[IP_TTL_OFF] = RST_TTL;
    ip[IP_PROTO_OFF] = PROTO_TCP;
    ip[IP_SRC_OFF..IP_SRC_OFF + 4].copy_from_slice(&s);
    ip[IP_DST_OFF..IP_DST_OFF + 4].copy_from_slice(&d);
    let c = !csum::fold(csum::sum_words(&ip));
    ip[IP_CSUM_OFF..IP_CSUM_OFF + 2].copy_from_slice(&c.to_be_bytes());
    // Pseudo-header: addresses, protocol, TCP length.
    let pseudo = csum::sum_words(&s) + csum::sum_words(&d) + PROTO_TCP as u32 + TCP_HLEN as u32;
    h[ETH_HLEN..ETH_HLEN + IP_HLEN].copy_from_slice(&ip);
    h[ETH_HLEN + IP_HLEN..].copy_from_slice(&tcp_header(p.dport, p.sport, &a, pseudo));
    xdp_action::XDP_TX
}
