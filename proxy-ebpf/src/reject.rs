//! Refusing a flow to a frontend without endpoints, like kube-proxy's REJECT: the client
//! fails fast instead of retrying into a drop. TCP gets a reset; on the pod side UDP gets an
//! ICMP (ICMPv6) port unreachable quoting the datagram, as the kernel's own reply would. The
//! answers are built in a buffer from the original's headers and written over the frame by
//! each hook: XDP sends it back out (`XDP_TX`), TC back into the pod it came from. The TCP
//! and ICMP bodies are shared; only the IP header and pseudo-header differ per family. The
//! buffers live in a per-CPU map (`ANSWER`), not on the stack: an IPv6 answer and its copy
//! of the original would take a third of the verifier's 512 bytes.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    macros::map,
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use proxy_common::{Ipv6Words, PROTO_TCP, PROTO_UDP};

use crate::{
    csum,
    hdr::{
        ETH_HLEN, ICMP_CSUM_OFF, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HLEN, ICMP_PORT_UNREACH, ICMP6_DEST_UNREACH,
        ICMP6_PACKET_TOO_BIG, ICMP6_PORT_UNREACH, IP_CSUM_OFF, IP_DF, IP_DST_OFF, IP_FRAGS_OFF, IP_HLEN, IP_PROTO_OFF,
        IP_SRC_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF, IP6_DST_OFF, IP6_HLEN, IP6_HOP_OFF, IP6_NEXT_OFF, IP6_PLEN_OFF,
        IP6_SRC_OFF, IPV4_VIHL, IPV6_VERSION, L4_DPORT_OFF, L4_SPORT_OFF, MACS_LEN, PROTO_ICMP, PROTO_ICMP6, TCP_ACK,
        TCP_ACK_OFF, TCP_CSUM_OFF, TCP_DOFF_OFF, TCP_FIN, TCP_FLAGS_OFF, TCP_HLEN, TCP_RST, TCP_SEQ_OFF, TCP_SYN,
        UDP_HLEN,
    },
    parse::Packet,
};

/// Ethernet + IPv4 without options + TCP without options: the size of a reset we send.
const RST_LEN: usize = ETH_HLEN + IP_HLEN + TCP_HLEN;
/// Ethernet + IPv6 without extension headers + TCP without options.
const RST6_LEN: usize = ETH_HLEN + IP6_HLEN + TCP_HLEN;
/// What an ICMP error quotes of a UDP datagram: its IP header and the UDP header.
const UDP_QUOTE_LEN: usize = ETH_HLEN + IP_HLEN + UDP_HLEN;
const UDP_QUOTE6_LEN: usize = ETH_HLEN + IP6_HLEN + UDP_HLEN;
/// Ethernet + IP + ICMP + the quoted IP and UDP headers.
const UNREACH_LEN: usize = ETH_HLEN + IP_HLEN + ICMP_HLEN + IP_HLEN + UDP_HLEN;
const UNREACH6_LEN: usize = ETH_HLEN + IP6_HLEN + ICMP_HLEN + IP6_HLEN + UDP_HLEN;

/// What an ICMPv6 Packet Too Big quotes: the fixed header and the 16 bytes after it (the
/// transport header's ports and sequence number, or a fragment header and those), enough
/// for the client's kernel to find its socket (Linux reads 8 bytes past the extension
/// headers it can skip in the quote).
const PTB6_QUOTE: usize = IP6_HLEN + 16;
/// Ethernet + IPv6 + ICMPv6 + the quote (within `ANSWER_MAX`).
const PTB6_LEN: usize = ETH_HLEN + IP6_HLEN + ICMP_HLEN + PTB6_QUOTE;

/// The hop limit of the answers we make (Linux's default TTL).
const REPLY_TTL: u8 = 64;

/// Per-CPU buffers of `ANSWER`: the answer being built, and (TC) a copy of the original's
/// headers.
struct AnswerBuf {
    out: [u8; ANSWER_MAX],
    orig: [u8; ANSWER_MAX],
}

/// The largest answer (`UNREACH6_LEN`) and original header block, rounded up.
const ANSWER_MAX: usize = 128;

/// Per-CPU buffers where resets and ICMP errors are built. Not pinned: they hold nothing
/// between packets.
#[map]
static ANSWER: PerCpuArray<AnswerBuf> = PerCpuArray::with_max_entries(1, 0);

/// `LEN` bytes of `a` from `OFF` on, as an array (checked at compile time).
#[inline(always)]
fn at<const OFF: usize, const LEN: usize, const N: usize>(a: &mut [u8; N]) -> &mut [u8; LEN] {
    const { assert!(OFF + LEN <= N) };
    // SAFETY: in bounds (asserted above); `[u8; LEN]` has alignment 1.
    unsafe { &mut *(a.as_mut_ptr().add(OFF) as *mut [u8; LEN]) }
}

/// The Ethernet header of the answer: the original's MACs swapped (it goes back where the
/// original came from), same EtherType.
#[inline(always)]
fn eth_back(h: &[u8], out: &mut [u8]) {
    out[..6].copy_from_slice(&h[6..MACS_LEN]);
    out[6..MACS_LEN].copy_from_slice(&h[..6]);
    out[MACS_LEN..ETH_HLEN].copy_from_slice(&h[MACS_LEN..ETH_HLEN]);
}

/// Put the Internet checksum of `pseudo` + `body` at `body[off..off + 2]`.
#[inline(always)]
fn seal<const N: usize>(body: &mut [u8; N], pseudo: u32, off: usize) {
    let c = !csum::fold(pseudo + csum::sum_words(body));
    body[off..off + 2].copy_from_slice(&c.to_be_bytes());
}

/// The reset answering the TCP segment whose header is `tcp_in` (`payload` data bytes
/// after it), checksummed with `pseudo`: RFC 9293 3.10.7.1 — to a segment with ACK, seq =
/// its ack; otherwise seq 0 and ack = its seq + segment length (SYN and FIN count one each).
#[inline(always)]
fn rst_tcp(tcp_in: &[u8], p_flags: u8, payload: u32, ports: (u16, u16), pseudo: u32, tcp: &mut [u8; TCP_HLEN]) {
    let be32 = |o: usize| u32::from_be_bytes([tcp_in[o], tcp_in[o + 1], tcp_in[o + 2], tcp_in[o + 3]]);
    let (seq, ack, flags) = if p_flags & TCP_ACK != 0 {
        (be32(TCP_ACK_OFF), 0, TCP_RST)
    } else {
        let ctl = (p_flags & TCP_SYN != 0) as u32 + (p_flags & TCP_FIN != 0) as u32;
        (0, be32(TCP_SEQ_OFF).wrapping_add(payload + ctl), TCP_RST | TCP_ACK)
    };
    *tcp = [0u8; TCP_HLEN];
    tcp[L4_SPORT_OFF..L4_SPORT_OFF + 2].copy_from_slice(&ports.0.to_ne_bytes());
    tcp[L4_DPORT_OFF..L4_DPORT_OFF + 2].copy_from_slice(&ports.1.to_ne_bytes());
    tcp[TCP_SEQ_OFF..TCP_SEQ_OFF + 4].copy_from_slice(&seq.to_be_bytes());
    tcp[TCP_ACK_OFF..TCP_ACK_OFF + 4].copy_from_slice(&ack.to_be_bytes());
    tcp[TCP_DOFF_OFF] = ((TCP_HLEN / 4) as u8) << 4;
    tcp[TCP_FLAGS_OFF] = flags;
    seal(tcp, pseudo + PROTO_TCP as u32 + TCP_HLEN as u32, TCP_CSUM_OFF);
}

/// The TCP data offset of the header at `tcp_in`, in bytes.
#[inline(always)]
fn tcp_doff(tcp_in: &[u8]) -> u32 {
    ((tcp_in[TCP_DOFF_OFF] >> 4) as u32) * 4
}

// IPv4.

/// An IPv4 header from the original's destination back to its source.
#[inline(always)]
fn ip_header(p: &Packet, proto: u8, tot_len: usize, ip: &mut [u8; IP_HLEN]) {
    *ip = [0u8; IP_HLEN];
    ip[0] = IPV4_VIHL;
    ip[IP_TOT_LEN_OFF..IP_TOT_LEN_OFF + 2].copy_from_slice(&(tot_len as u16).to_be_bytes());
    ip[IP_FRAGS_OFF] = IP_DF;
    ip[IP_TTL_OFF] = REPLY_TTL;
    ip[IP_PROTO_OFF] = proto;
    ip[IP_SRC_OFF..IP_SRC_OFF + 4].copy_from_slice(&p.daddr.to_ne_bytes());
    ip[IP_DST_OFF..IP_DST_OFF + 4].copy_from_slice(&p.saddr.to_ne_bytes());
    seal(ip, 0, IP_CSUM_OFF);
}

#[inline(always)]
fn rst_frame(h: &[u8; RST_LEN], p: &Packet, out: &mut [u8; RST_LEN]) {
    const T: usize = ETH_HLEN + IP_HLEN;
    let ip_len = u16::from_be_bytes([h[ETH_HLEN + IP_TOT_LEN_OFF], h[ETH_HLEN + IP_TOT_LEN_OFF + 1]]) as u32;
    let payload = ip_len.saturating_sub(IP_HLEN as u32 + tcp_doff(&h[T..]));
    // Pseudo-header addresses (swapped: the answer's source is the original's destination).
    let pseudo = csum::sum_words(&p.daddr.to_ne_bytes()) + csum::sum_words(&p.saddr.to_ne_bytes());
    eth_back(h, out);
    ip_header(p, PROTO_TCP, IP_HLEN + TCP_HLEN, at::<ETH_HLEN, IP_HLEN, RST_LEN>(out));
    rst_tcp(&h[T..], p.tcp_flags, payload, (p.dport, p.sport), pseudo, at::<T, TCP_HLEN, RST_LEN>(out));
}

/// ICMP port unreachable (RFC 792) answering the UDP datagram whose headers are `h`,
/// quoting its IPv4 header and UDP header, from the frontend the client addressed.
#[inline(always)]
fn port_unreachable_frame(h: &[u8; UDP_QUOTE_LEN], p: &Packet, out: &mut [u8; UNREACH_LEN]) {
    const ICMP_OFF: usize = ETH_HLEN + IP_HLEN;
    const BODY: usize = ICMP_HLEN + IP_HLEN + UDP_HLEN;
    eth_back(h, out);
    ip_header(p, PROTO_ICMP, UNREACH_LEN - ETH_HLEN, at::<ETH_HLEN, IP_HLEN, UNREACH_LEN>(out));
    let icmp = at::<ICMP_OFF, BODY, UNREACH_LEN>(out);
    *icmp = [0u8; BODY];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_PORT_UNREACH;
    icmp[ICMP_HLEN..].copy_from_slice(&h[ETH_HLEN..]);
    // ICMP (v4) has no pseudo-header.
    seal(icmp, 0, ICMP_CSUM_OFF);
}

/// ICMP fragmentation needed (see `xdp_frag_needed`) answering the packet whose first
/// bytes are `h`; laid out as the port unreachable above (both quote 28 bytes).
#[inline(always)]
fn frag_needed_frame(h: &[u8; UNREACH_LEN], p: &Packet, mtu: u16, out: &mut [u8; UNREACH_LEN]) {
    const ICMP_OFF: usize = ETH_HLEN + IP_HLEN;
    const BODY: usize = ICMP_HLEN + IP_HLEN + UDP_HLEN;
    /// The next-hop MTU's place in the ICMP header (RFC 1191 section 4).
    const MTU_OFF: usize = 6;
    eth_back(h, out);
    ip_header(p, PROTO_ICMP, UNREACH_LEN - ETH_HLEN, at::<ETH_HLEN, IP_HLEN, UNREACH_LEN>(out));
    let icmp = at::<ICMP_OFF, BODY, UNREACH_LEN>(out);
    *icmp = [0u8; BODY];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_FRAG_NEEDED;
    icmp[MTU_OFF..MTU_OFF + 2].copy_from_slice(&mtu.to_be_bytes());
    icmp[ICMP_HLEN..].copy_from_slice(&h[ETH_HLEN..ETH_HLEN + IP_HLEN + UDP_HLEN]);
    seal(icmp, 0, ICMP_CSUM_OFF);
}

// IPv6.

#[inline(always)]
fn put_addr6(w: Ipv6Words, out: &mut [u8]) {
    let mut i = 0;
    while i < 4 {
        out[i * 4..i * 4 + 4].copy_from_slice(&w[i].to_ne_bytes());
        i += 1;
    }
}

/// An IPv6 header from the original's destination back to its source; returns the sum of
/// its addresses for the upper-layer pseudo-header (RFC 8200 8.1).
#[inline(always)]
fn ip6_header(p: &Packet<Ipv6Words>, next: u8, plen: usize, ip: &mut [u8; IP6_HLEN]) -> u32 {
    *ip = [0u8; IP6_HLEN];
    ip[0] = IPV6_VERSION;
    ip[IP6_PLEN_OFF..IP6_PLEN_OFF + 2].copy_from_slice(&(plen as u16).to_be_bytes());
    ip[IP6_NEXT_OFF] = next;
    ip[IP6_HOP_OFF] = REPLY_TTL;
    put_addr6(p.daddr, &mut ip[IP6_SRC_OFF..IP6_SRC_OFF + 16]);
    put_addr6(p.saddr, &mut ip[IP6_DST_OFF..IP6_DST_OFF + 16]);
    let mut sum = 0;
    let mut i = 0;
    while i < 4 {
        sum += csum::sum_words(&p.saddr[i].to_ne_bytes()) + csum::sum_words(&p.daddr[i].to_ne_bytes());
        i += 1;
    }
    sum
}

#[inline(always)]
fn rst_frame6(h: &[u8; RST6_LEN], p: &Packet<Ipv6Words>, out: &mut [u8; RST6_LEN]) {
    const T: usize = ETH_HLEN + IP6_HLEN;
    let plen = u16::from_be_bytes([h[ETH_HLEN + IP6_PLEN_OFF], h[ETH_HLEN + IP6_PLEN_OFF + 1]]) as u32;
    let payload = plen.saturating_sub(tcp_doff(&h[T..]));
    eth_back(h, out);
    let pseudo = ip6_header(p, PROTO_TCP, TCP_HLEN, at::<ETH_HLEN, IP6_HLEN, RST6_LEN>(out));
    rst_tcp(&h[T..], p.tcp_flags, payload, (p.dport, p.sport), pseudo, at::<T, TCP_HLEN, RST6_LEN>(out));
}

/// ICMPv6 port unreachable (RFC 4443 3.1) quoting the IPv6 and UDP headers of the datagram.
#[inline(always)]
fn port_unreachable_frame6(h: &[u8; UDP_QUOTE6_LEN], p: &Packet<Ipv6Words>, out: &mut [u8; UNREACH6_LEN]) {
    const ICMP_OFF: usize = ETH_HLEN + IP6_HLEN;
    const BODY: usize = ICMP_HLEN + IP6_HLEN + UDP_HLEN;
    eth_back(h, out);
    let pseudo = ip6_header(p, PROTO_ICMP6, BODY, at::<ETH_HLEN, IP6_HLEN, UNREACH6_LEN>(out));
    let icmp = at::<ICMP_OFF, BODY, UNREACH6_LEN>(out);
    *icmp = [0u8; BODY];
    icmp[0] = ICMP6_DEST_UNREACH;
    icmp[1] = ICMP6_PORT_UNREACH;
    icmp[ICMP_HLEN..].copy_from_slice(&h[ETH_HLEN..]);
    seal(icmp, pseudo + BODY as u32 + PROTO_ICMP6 as u32, ICMP_CSUM_OFF);
}

/// ICMPv6 Packet Too Big (RFC 4443 3.2: type 2, code 0, the MTU in the 32 bits after the
/// checksum) answering the packet whose first bytes are `h`, quoting `PTB6_QUOTE` bytes of
/// it as the client sent it, from the frontend it addressed.
#[inline(always)]
fn packet_too_big_frame6(h: &[u8; PTB6_LEN], p: &Packet<Ipv6Words>, mtu: u32, out: &mut [u8; PTB6_LEN]) {
    const ICMP_OFF: usize = ETH_HLEN + IP6_HLEN;
    const BODY: usize = ICMP_HLEN + PTB6_QUOTE;
    const MTU_OFF: usize = 4;
    eth_back(h, out);
    let pseudo = ip6_header(p, PROTO_ICMP6, BODY, at::<ETH_HLEN, IP6_HLEN, PTB6_LEN>(out));
    let icmp = at::<ICMP_OFF, BODY, PTB6_LEN>(out);
    // Field by field, without a zeroed copy of the body: the stack of the call chain that
    // gets here (IPv6, XDP, DSR) has no room for one.
    icmp[..MTU_OFF].copy_from_slice(&[ICMP6_PACKET_TOO_BIG, 0, 0, 0]);
    icmp[MTU_OFF..ICMP_HLEN].copy_from_slice(&mtu.to_be_bytes());
    icmp[ICMP_HLEN..].copy_from_slice(&h[ETH_HLEN..ETH_HLEN + PTB6_QUOTE]);
    seal(icmp, pseudo + BODY as u32 + PROTO_ICMP6 as u32, ICMP_CSUM_OFF);
}

// Delivery.

#[inline(always)]
fn answer_buf() -> Option<&'static mut AnswerBuf> {
    // SAFETY: a per-CPU map value; only this CPU's running program uses it, and it runs to
    // completion.
    ANSWER.get_ptr_mut(0).map(|b| unsafe { &mut *b })
}

#[inline(always)]
fn xdp_frame<const N: usize>(ctx: &XdpContext) -> Option<*mut [u8; N]> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + N > end {
        return None;
    }
    Some(start as *mut [u8; N])
}

/// XDP: replace the frame with the `N`-byte answer `build` makes of its first `N` bytes,
/// and send it back out (`XDP_TX`).
#[inline(always)]
fn xdp_answer<const N: usize>(ctx: &XdpContext, build: impl FnOnce(&[u8; N], &mut [u8; N])) -> u32 {
    let (Some(hdr), Some(buf)) = (xdp_frame::<N>(ctx), answer_buf()) else {
        return xdp_action::XDP_DROP;
    };
    let out = at::<0, N, ANSWER_MAX>(&mut buf.out);
    // SAFETY: the whole header block is within bounds.
    build(unsafe { &*hdr }, out);
    // Shrink the whole frame, fragments included: shrinking by only the linear part would
    // leave the original's trailing bytes behind the answer.
    // SAFETY: helpers on our own context; the pointer is re-derived below.
    let shrunk = unsafe {
        let len = bpf_xdp_get_buff_len(ctx.ctx) as i32;
        len <= N as i32 || bpf_xdp_adjust_tail(ctx.ctx, N as i32 - len) == 0
    };
    let Some(hdr) = xdp_frame::<N>(ctx).filter(|_| shrunk) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked just above.
    unsafe { *hdr = *out };
    xdp_action::XDP_TX
}

/// XDP: answer a TCP segment with a reset, in place. Anything else (UDP, a RST, IP options
/// or IPv6 extension headers) is dropped: an ICMP error would need the frame to grow, which
/// generic XDP on a veth does not reliably allow.
#[inline(always)]
pub fn xdp_reset(ctx: &XdpContext, p: &Packet) -> u32 {
    if p.proto != PROTO_TCP || p.tcp_flags & TCP_RST != 0 || p.l4_off != ETH_HLEN + IP_HLEN {
        return xdp_action::XDP_DROP;
    }
    xdp_answer::<RST_LEN>(ctx, |h, out| rst_frame(h, p, out))
}

/// XDP: ICMP fragmentation needed (RFC 1191: destination unreachable, code 4, the next-hop
/// MTU in the low 16 bits of the unused word) for a datagram that cannot be forwarded
/// whole, quoting its IPv4 header (no options) and first 8 bytes as the client sent them,
/// from the frontend it addressed. The frame shrinks to the answer, so nothing has to grow.
#[inline(never)]
pub fn xdp_frag_needed(ctx: &XdpContext, p: &Packet, mtu: u16) -> u32 {
    if p.l4_off != ETH_HLEN + IP_HLEN {
        return xdp_action::XDP_DROP;
    }
    xdp_answer::<UNREACH_LEN>(ctx, |h, out| frag_needed_frame(h, p, mtu, out))
}

/// XDP: ICMPv6 Packet Too Big advertising `mtu` (IPv6's `xdp_frag_needed`), for a packet
/// that would not fit the uplink with the DSR extension header. Any packet of a flow can be
/// answered: the quote reaches past a fragment header.
#[inline(never)]
pub fn xdp_packet_too_big6(ctx: &XdpContext, p: &Packet<Ipv6Words>, mtu: u32) -> u32 {
    xdp_answer::<PTB6_LEN>(ctx, |h, out| packet_too_big_frame6(h, p, mtu, out))
}

/// `xdp_reset` for IPv6; a function of its own so it does not add to the caller's frame.
#[inline(never)]
pub fn xdp_reset6(ctx: &XdpContext, p: &Packet<Ipv6Words>) -> u32 {
    if p.proto != PROTO_TCP || p.tcp_flags & TCP_RST != 0 || p.l4_off != ETH_HLEN + IP6_HLEN {
        return xdp_action::XDP_DROP;
    }
    xdp_answer::<RST6_LEN>(ctx, |h, out| rst_frame6(h, p, out))
}

/// TC: resize the skb to the answer `build` makes of its first `N` bytes and send it
/// straight back into the pod (egress of the veth it came from), so `connect()` fails at
/// once with ECONNREFUSED like against kube-proxy's REJECT.
#[inline(always)]
fn tc_answer<const N: usize, const M: usize>(
    ctx: &TcContext,
    build: impl FnOnce(&[u8; N], &mut [u8; M]),
) -> Result<i32, i64> {
    let buf = answer_buf().ok_or(0)?;
    let orig = at::<0, N, ANSWER_MAX>(&mut buf.orig);
    // SAFETY: helper on our own context, writing `N` bytes into the buffer it points at.
    let rc = unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, 0, orig.as_mut_ptr() as *mut _, N as u32) };
    if rc != 0 {
        return Err(rc);
    }
    let out = at::<0, M, ANSWER_MAX>(&mut buf.out);
    build(orig, out);
    // SAFETY: helper on our own context; later accesses go through ctx helpers.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, M as u32, 0) };
    if rc != 0 {
        return Err(rc);
    }
    ctx.store(0, out, 0)?;
    // SAFETY: reading the context field and calling a helper without preconditions.
    Ok(unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 })
}

/// TC (pod side): a reset for TCP, an ICMP port unreachable for UDP. A RST, other protocols
/// and IP options are not answered (`Err`, the caller drops).
#[inline(always)]
pub fn tc_reject(ctx: &TcContext, p: &Packet) -> Result<i32, i64> {
    if p.l4_off != ETH_HLEN + IP_HLEN {
        return Err(0);
    }
    match p.proto {
        PROTO_TCP if p.tcp_flags & TCP_RST == 0 => tc_answer::<RST_LEN, RST_LEN>(ctx, |h, o| rst_frame(h, p, o)),
        PROTO_UDP => tc_answer::<UDP_QUOTE_LEN, UNREACH_LEN>(ctx, |h, o| port_unreachable_frame(h, p, o)),
        _ => Err(0),
    }
}

/// `tc_reject` for IPv6 (segments without extension headers); a function of its own, see
/// `xdp_reset6`.
#[inline(never)]
pub fn tc_reject6(ctx: &TcContext, p: &Packet<Ipv6Words>) -> Result<i32, i64> {
    if p.l4_off != ETH_HLEN + IP6_HLEN {
        return Err(0);
    }
    match p.proto {
        PROTO_TCP if p.tcp_flags & TCP_RST == 0 => tc_answer::<RST6_LEN, RST6_LEN>(ctx, |h, o| rst_frame6(h, p, o)),
        PROTO_UDP => tc_answer::<UDP_QUOTE6_LEN, UNREACH6_LEN>(ctx, |h, o| port_unreachable_frame6(h, p, o)),
        _ => Err(0),
    }
}
