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
        Packet, ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_FRAGS_OFF, IP_HLEN, IP_PROTO_OFF, IP_SRC_OFF, IP_TOT_LEN_OFF,
        IP_TTL_OFF, L4_DPORT_OFF,
        L4_SPORT_OFF, TCP_ACK, TCP_ACK_OFF, TCP_CSUM_OFF, TCP_DOFF_OFF, TCP_FIN, TCP_FLAGS_OFF, TCP_HLEN, TCP_RST,
        TCP_SEQ_OFF, TCP_SYN,
    },
};

/// Ethernet + IPv4 without options + TCP without options: the size of a reset we send.
const RST_FRAME_LEN: usize = ETH_HLEN + IP_HLEN + TCP_HLEN;
const IPV4_VIHL: u8 = 0x45;
const IP_DF: u8 = 0x40;
const RST_TTL: u8 = 64;

#[inline(always)]
fn frame(ctx: &XdpContext) -> Option<*mut [u8; RST_FRAME_LEN]> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + RST_FRAME_LEN > end {
        return None;
    }
    Some(start as *mut [u8; RST_FRAME_LEN])
}

/// Answer a TCP segment with a reset, in place (`XDP_TX`). Anything else (UDP, a RST, IP
/// options) is dropped; building an ICMP error would need to grow the frame and quote the
/// original, which this does not do yet.
#[inline(always)]
pub fn tcp_reset(ctx: &XdpContext, p: &Packet) -> u32 {
    if p.proto != PROTO_TCP || p.tcp_flags & TCP_RST != 0 || p.l4_off != ETH_HLEN + IP_HLEN {
        return xdp_action::XDP_DROP;
    }
    let Some(hdr) = frame(ctx) else {
        return xdp_action::XDP_DROP;
    };
    let t = ETH_HLEN + IP_HLEN;
    let be16 = |h: &[u8; RST_FRAME_LEN], o: usize| u16::from_be_bytes([h[o], h[o + 1]]) as u32;
    let be32 = |h: &[u8; RST_FRAME_LEN], o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    // SAFETY: the whole Ethernet + IPv4 + TCP header block is within bounds.
    let (macs, ip_len, seq, ack, doff) = unsafe {
        let h = &*hdr;
        let mut macs = [0u8; 12];
        macs.copy_from_slice(&h[..12]);
        (macs, be16(h, ETH_HLEN + IP_TOT_LEN_OFF), be32(h, t + TCP_SEQ_OFF), be32(h, t + TCP_ACK_OFF), ((h[t + TCP_DOFF_OFF] >> 4) as u32) * 4)
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
    let Some(hdr) = frame(ctx) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked just above.
    let h = unsafe { &mut *hdr };
    h[..6].copy_from_slice(&macs[6..]);
    h[6..12].copy_from_slice(&macs[..6]);
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
    let mut tcp = [0u8; TCP_HLEN];
    tcp[L4_SPORT_OFF..L4_SPORT_OFF + 2].copy_from_slice(&p.dport.to_ne_bytes());
    tcp[L4_DPORT_OFF..L4_DPORT_OFF + 2].copy_from_slice(&p.sport.to_ne_bytes());
    tcp[TCP_SEQ_OFF..TCP_SEQ_OFF + 4].copy_from_slice(&rst_seq.to_be_bytes());
    tcp[TCP_ACK_OFF..TCP_ACK_OFF + 4].copy_from_slice(&rst_ack.to_be_bytes());
    tcp[TCP_DOFF_OFF] = ((TCP_HLEN / 4) as u8) << 4;
    tcp[TCP_FLAGS_OFF] = flags;
    // Pseudo-header: addresses, protocol, TCP length.
    let pseudo = csum::sum_words(&s) + csum::sum_words(&d) + PROTO_TCP as u32 + TCP_HLEN as u32;
    let c = !csum::fold(pseudo + csum::sum_words(&tcp));
    tcp[TCP_CSUM_OFF..TCP_CSUM_OFF + 2].copy_from_slice(&c.to_be_bytes());
    h[ETH_HLEN..ETH_HLEN + IP_HLEN].copy_from_slice(&ip);
    h[ETH_HLEN + IP_HLEN..].copy_from_slice(&tcp);
    xdp_action::XDP_TX
}
