//! TC, the hook of the programs on the host side of pod veths (and `to_uplink` on
//! uplinks): how the driver reads, rewrites and sends on packets here, with the kernel's
//! checksum helpers.
//!
//! - `FromPod` runs as `from_pod` on the veth's *ingress* (packets leaving the pod).
//! - `ToPod` runs as `to_pod` on the veth's *egress* (packets entering the pod), `ToUplink`
//!   as `to_uplink` on the uplink's egress (replies of north-south flows XDP delivered to a
//!   local backend); both towards a client (`Seen::ToClient`).
//! - Hairpin (a pod reaching itself through its own service) is bounced straight back into
//!   the pod with the MACs swapped: the kernel would not accept a packet from its own address
//!   arriving on eth0, and routing it would depend on rp_filter accepting the link-local
//!   hairpin source on a pod veth.
//!
//! Pass-through returns `TC_ACT_UNSPEC`, so the packet continues exactly as if no program
//! were attached (and a CNI's own program after ours still runs).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_redirect,
    programs::TcContext,
};
use proxy_common::{Ipv6Words, PROTO_UDP, Verdict};

use crate::{
    driver::{Hook, Rewrite},
    family::{V4, V6},
    hdr::{ETH_HLEN, IP_CSUM_OFF, IP6_HLEN, L4_DPORT_OFF, L4_SPORT_OFF, MACS_LEN, TCP_HLEN},
    icmp::IcmpFamily,
    parse::{Packet, Parse},
    pipeline::{Nat, Seen},
    reject,
};

/// Headers we may need in the linear area: Ethernet + IPv6 with a few extension headers
/// (or IPv4 with options) + TCP.
const MAX_HDR: u32 = (ETH_HLEN + IP6_HLEN + 64 + TCP_HLEN) as u32;

/// The TC hook, seen towards a client (`TO_CLIENT`) or leaving a pod; on an uplink
/// (`UPLINK`) or a pod's veth.
pub struct Tc<const TO_CLIENT: bool, const UPLINK: bool>;
/// `from_pod`.
pub type FromPod = Tc<false, false>;
/// `to_pod`.
pub type ToPod = Tc<true, false>;
/// `to_uplink`.
pub type ToUplink = Tc<true, true>;

impl<const TO_CLIENT: bool, const UPLINK: bool> Hook for Tc<TO_CLIENT, UPLINK> {
    type Ctx = TcContext;
    type Ret = i32;
    const SEEN: Seen = if TO_CLIENT { Seen::ToClient } else { Seen::FromPod };
    /// Not `to_uplink`: the replies of flows a DSR option taught this node leave there,
    /// from a pod the agent may not have written as a backend yet.
    const FILTER_REPLIES: bool = TO_CLIENT && !UPLINK;
    const PASS: i32 = TC_ACT_UNSPEC;
    const DROP: i32 = TC_ACT_SHOT;
    const OTHER_L4: i32 = i32::MIN;

    #[inline(always)]
    fn data(ctx: &TcContext) -> (usize, usize) {
        (ctx.data(), ctx.data_end())
    }

    #[inline(always)]
    fn len(ctx: &TcContext) -> u32 {
        ctx.len()
    }

    /// The pod's veth for `from_pod` (TC ingress), where a reply came from for the egress
    /// programs (0: a local process).
    #[inline(always)]
    fn ifindex(ctx: &TcContext) -> u32 {
        // SAFETY: reading a field of the context the kernel passed in.
        unsafe { (*ctx.skb.skb).ingress_ifindex }
    }

    /// Parse, pulling non-linear header bytes into the linear area once if needed.
    #[inline(always)]
    fn parse<F: Parse>(ctx: &TcContext) -> Result<Packet<F::Addr>, Verdict> {
        let len = ctx.len() as usize;
        match F::parse(ctx.data(), ctx.data_end(), len) {
            Err(Verdict::Malformed) if len > ctx.data_end() - ctx.data() => {
                let want = if ctx.len() < MAX_HDR { ctx.len() } else { MAX_HDR };
                ctx.pull_data(want).map_err(|_| Verdict::Malformed)?;
                F::parse(ctx.data(), ctx.data_end(), len)
            }
            r => r,
        }
    }

    /// Errors are small; their quote must be in the linear area to be rewritten in place.
    #[inline(always)]
    fn linearize(ctx: &TcContext) -> bool {
        let want = if ctx.len() < MAX_HDR { ctx.len() } else { MAX_HDR };
        ctx.pull_data(want).is_ok()
    }
}

impl<const TO_CLIENT: bool, const UPLINK: bool, F: TcFamily> Rewrite<F> for Tc<TO_CLIENT, UPLINK> {
    /// Both halves of a translation (each only when it changes something).
    #[inline(always)]
    fn rewrite(ctx: &TcContext, p: &Packet<F::Addr>, n: &Nat<F::Addr>) -> Result<(), ()> {
        rewrite::<F>(ctx, p, (F::SRC_OFF, L4_SPORT_OFF), (p.saddr, n.saddr), (p.sport, n.sport)).map_err(|_| ())?;
        rewrite::<F>(ctx, p, (F::DST_OFF, L4_DPORT_OFF), (p.daddr, n.daddr), (p.dport, n.dport)).map_err(|_| ())
    }

    /// Hairpin: back into the pod.
    #[inline(always)]
    fn redirect(ctx: &TcContext, _proto: u8, _n: &Nat<F::Addr>) -> Result<i32, Verdict> {
        bounce(ctx).map_err(|_| Verdict::Error)
    }

    /// What cannot be answered (a RST, IP options, SCTP) is dropped.
    #[inline(always)]
    fn reject(ctx: &TcContext, p: &Packet<F::Addr>) -> i32 {
        F::reject(ctx, p).unwrap_or(TC_ACT_SHOT)
    }

    /// Never asked: DSR is decided for uplink traffic only, which XDP handles.
    #[inline(always)]
    fn dsr_option(_ctx: &TcContext, _vip: F::Addr, _vport: u16) -> Result<(), Verdict> {
        Err(Verdict::Error)
    }

    #[inline(always)]
    fn dsr_too_big(_ctx: &TcContext, _p: &Packet<F::Addr>) -> Option<i32> {
        None
    }
}

/// How an address is rewritten in each family: where it sits in the IP header, and which
/// checksums cover it (IPv4: the header checksum and the L4 pseudo-header; IPv6: only the
/// L4 pseudo-header, one 32-bit word at a time).
/// (The addresses' offsets come from `IcmpFamily`.)
trait TcFamily: IcmpFamily {
    fn rewrite_addr(
        ctx: &TcContext,
        p: &Packet<Self::Addr>,
        off: usize,
        old: Self::Addr,
        new: Self::Addr,
        csum: Option<usize>,
        mangled: u64,
    ) -> Result<(), i64>;
    /// Answer a flow to a frontend without endpoints back into the pod (TCP reset, ICMP
    /// port unreachable); `Err` when it cannot be answered.
    fn reject(ctx: &TcContext, p: &Packet<Self::Addr>) -> Result<i32, i64>;
}

impl TcFamily for V4 {
    #[inline(always)]
    fn reject(ctx: &TcContext, p: &Packet<u32>) -> Result<i32, i64> {
        reject::tc_reject(ctx, p)
    }
    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        p: &Packet<u32>,
        off: usize,
        old: u32,
        new: u32,
        csum: Option<usize>,
        mangled: u64,
    ) -> Result<(), i64> {
        if let Some(csum) = csum {
            ctx.l4_csum_replace(csum, old as u64, new as u64, BPF_F_PSEUDO_HDR as u64 | mangled | 4)?;
        }
        ctx.l3_csum_replace(p.l3_off + IP_CSUM_OFF, old as u64, new as u64, 4)?;
        ctx.store(p.l3_off + off, &new, 0)
    }
}

impl TcFamily for V6 {
    #[inline(always)]
    fn reject(ctx: &TcContext, p: &Packet<Ipv6Words>) -> Result<i32, i64> {
        reject::tc_reject6(ctx, p)
    }
    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        p: &Packet<Ipv6Words>,
        off: usize,
        old: Ipv6Words,
        new: Ipv6Words,
        csum: Option<usize>,
        mangled: u64,
    ) -> Result<(), i64> {
        if let Some(csum) = csum {
            let mut i = 0;
            while i < 4 {
                if old[i] != new[i] {
                    ctx.l4_csum_replace(csum, old[i] as u64, new[i] as u64, BPF_F_PSEUDO_HDR as u64 | mangled | 4)?;
                }
                i += 1;
            }
        }
        ctx.store(p.l3_off + off, &new, 0)
    }
}

/// Rewrite one address (at `off.0` in the IP header) and port (at `off.1` in the L4
/// header) from `.0` to `.1`, with checksum fix-ups. The kernel's helpers handle
/// CHECKSUM_PARTIAL skbs (offloaded TX checksums) correctly, which a hand-rolled incremental
/// update would not. A later fragment has no L4 header: only its address changes (its
/// datagram's L4 checksum is in the first fragment, updated there for the whole datagram).
#[inline(always)]
fn rewrite<F: TcFamily>(
    ctx: &TcContext,
    p: &Packet<F::Addr>,
    (addr_off, port_off): (usize, usize),
    (old_addr, new_addr): (F::Addr, F::Addr),
    (old_port, new_port): (u16, u16),
) -> Result<(), i64> {
    // UDP checksum 0 means "none": MARK_MANGLED_0 leaves it 0 and avoids producing 0.
    let mangled = if p.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let csum = if p.no_l4() { None } else { p.l4_csum_field().map(|f| p.l4_off + f) };
    if old_addr != new_addr {
        F::rewrite_addr(ctx, p, addr_off, old_addr, new_addr, csum, mangled)?;
    }
    if old_port != new_port && !p.no_l4() {
        if let Some(csum) = csum {
            ctx.l4_csum_replace(csum, old_port as u64, new_port as u64, mangled | 2)?;
        }
        ctx.store(p.l4_off + port_off, &new_port, 0)?;
    }
    Ok(())
}

/// Send a packet straight back into the pod it came from (egress of the same veth), with
/// the MACs swapped as the gateway would have done.
#[inline(always)]
fn bounce(ctx: &TcContext) -> Result<i32, i64> {
    let macs = ctx.load::<[u8; MACS_LEN]>(0)?;
    let mut swapped = [0u8; MACS_LEN];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0)?;
    // SAFETY: reading the context field and calling a helper without preconditions.
    Ok(unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 })
}
