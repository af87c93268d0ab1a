//! TC, the hook of the programs on the host side of pod veths (and `to_uplink` on
//! uplinks): how the driver reads, rewrites and sends on packets here: headers written in
//! place, the L4 checksum through the kernel's helper.
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
    csum,
    driver::{Hook, Rewrite},
    family::{V4, V6},
    hdr::{ETH_HLEN, IP6_HLEN, L4_DPORT_OFF, L4_PORTS_LEN, L4_SPORT_OFF, MACS_LEN, TCP_HLEN},
    icmp::IcmpFamily,
    parse::{MAX_L4_OFF, Packet, Parse},
    pipeline::{Nat, Seen},
    reject, wire,
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
        rewrite::<F>(ctx, p, n).map_err(|_| ())
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

/// What differs between the families here: how a flow to a frontend without endpoints is
/// answered (the address rewrite is `IcmpFamily::nat_addrs`, shared with XDP).
trait TcFamily: IcmpFamily {
    /// Answer a flow to a frontend without endpoints back into the pod (TCP reset, ICMP
    /// port unreachable); `Err` when it cannot be answered.
    fn reject(ctx: &TcContext, p: &Packet<Self::Addr>) -> Result<i32, i64>;
}

impl TcFamily for V4 {
    #[inline(always)]
    fn reject(ctx: &TcContext, p: &Packet<u32>) -> Result<i32, i64> {
        reject::tc_reject(ctx, p)
    }
}

impl TcFamily for V6 {
    #[inline(always)]
    fn reject(ctx: &TcContext, p: &Packet<Ipv6Words>) -> Result<i32, i64> {
        reject::tc_reject6(ctx, p)
    }
}

/// Rewrite the addresses and ports from `p`'s to `n`'s. The headers are written in place
/// (the verifier's TC prologue makes a cloned skb's data private first); the L4 checksum
/// goes through `bpf_l4_csum_replace`, at most twice, with the whole difference at once
/// (size 0): once for the addresses, as a pseudo-header change, and once for the ports.
/// The helper handles CHECKSUM_PARTIAL skbs (offloaded TX checksums, where only the
/// pseudo-header part belongs in the field) and CHECKSUM_COMPLETE ones, which a hand-rolled
/// update could not tell apart. A later fragment has no L4 header: only its addresses
/// change (its datagram's L4 checksum is in the first fragment, updated there for the whole
/// datagram).
#[inline(always)]
fn rewrite<F: TcFamily>(ctx: &TcContext, p: &Packet<F::Addr>, n: &Nat<F::Addr>) -> Result<(), i64> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + F::HLEN > end {
        return Err(-1);
    }
    // SAFETY: a complete IP header of this family follows the Ethernet header (checked
    // just above); parsing put it in the linear area.
    let addr_diff = unsafe { F::nat_addrs((start + ETH_HLEN) as *mut u8, p, n) };
    let ports_change = (n.sport != p.sport || n.dport != p.dport) && !p.no_l4();
    let mut port_diff = 0;
    if ports_change {
        // Masked so the verifier sees a bounded offset.
        let l4_off = p.l4_off & MAX_L4_OFF;
        if start + l4_off + L4_PORTS_LEN > end {
            return Err(-1);
        }
        let l4 = (start + l4_off) as *mut u8;
        // SAFETY: both ports are within the bounds checked just above.
        unsafe {
            if n.sport != p.sport {
                port_diff += csum::port_diff(p.sport, n.sport);
                wire::set_u16::<{ L4_SPORT_OFF as i16 }>(l4, n.sport);
            }
            if n.dport != p.dport {
                port_diff += csum::port_diff(p.dport, n.dport);
                wire::set_u16::<{ L4_DPORT_OFF as i16 }>(l4, n.dport);
            }
        }
    }
    if p.no_l4() {
        return Ok(());
    }
    let Some(field) = p.l4_csum_field() else {
        return Ok(());
    };
    let csum = p.l4_off + field;
    // UDP checksum 0 means "none": MARK_MANGLED_0 leaves it 0 and avoids producing 0.
    let mangled = if p.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    if n.saddr != p.saddr || n.daddr != p.daddr {
        ctx.l4_csum_replace(csum, 0, csum::fold_wide(addr_diff) as u64, BPF_F_PSEUDO_HDR as u64 | mangled)?;
    }
    if ports_change {
        ctx.l4_csum_replace(csum, 0, csum::fold_wide(port_diff) as u64, mangled)?;
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
