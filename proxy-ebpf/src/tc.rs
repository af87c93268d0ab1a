//! TC programs on the host side of pod veths (and `to_uplink` on uplinks): rewriters that
//! apply what `pipeline` decided, with the kernel's checksum helpers.
//!
//! - `from_pod` runs on the veth's *ingress* (packets leaving the pod).
//! - `reverse_nat` runs as `to_pod` on the veth's *egress* (packets entering the pod) and as
//!   `to_uplink` on the uplink's egress (replies of north-south flows XDP delivered to a
//!   local backend).
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
use proxy_common::{Ipv6Words, PROTO_UDP, StatsFamily, Verdict};

use crate::{
    ct::CtWork,
    family::{Family, V4, V6},
    frag,
    icmp::{self, IcmpFamily, Side},
    parse::{self, IP_CSUM_OFF, L3, L4_DPORT_OFF, L4_SPORT_OFF, Packet},
    pipeline::{self, Action, Decision, Hook, Nat},
    reject, stats,
};

/// Headers we may need in the linear area: Ethernet + IPv6 with a few extension headers
/// (or IPv4 with options) + TCP.
const MAX_HDR: u32 = 14 + 40 + 64 + 20;
/// The Ethernet addresses (destination, source) at the start of the frame.
const MACS_LEN: usize = 12;

/// Parse, pulling non-linear header bytes into the linear area once if needed.
#[inline(always)]
fn parse_ctx<F: Family>(ctx: &TcContext) -> Result<Packet<F::Addr>, Verdict> {
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

/// Rewrite one address (at `addr_off` in the IP header) and port (at `port_off` in the L4
/// header) with checksum fix-ups. The kernel's helpers handle CHECKSUM_PARTIAL skbs
/// (offloaded TX checksums) correctly, which a hand-rolled incremental update would not.
/// A later fragment has no L4 header: only its address changes (its datagram's L4
/// checksum is in the first fragment, updated there for the whole datagram).
#[inline(always)]
fn rewrite<F: TcFamily>(
    ctx: &TcContext,
    p: &Packet<F::Addr>,
    addr_off: usize,
    old_addr: F::Addr,
    new_addr: F::Addr,
    port_off: usize,
    old_port: u16,
    new_port: u16,
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

/// Both halves of a translation (each only when it changes something).
#[inline(always)]
fn nat<F: TcFamily>(ctx: &TcContext, p: &Packet<F::Addr>, n: &Nat<F::Addr>) -> Result<(), i64> {
    rewrite::<F>(ctx, p, F::SRC_OFF, p.saddr, n.saddr, L4_SPORT_OFF, p.sport, n.sport)?;
    rewrite::<F>(ctx, p, F::DST_OFF, p.daddr, n.daddr, L4_DPORT_OFF, p.dport, n.dport)
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

/// Carry out a decision; a failed rewrite turns into a counted `error` drop.
#[inline(always)]
fn apply<F: TcFamily>(ctx: &TcContext, p: &Packet<F::Addr>, d: &Decision<F::Addr>) -> (i32, Verdict) {
    let done = match d.action {
        Action::Pass => Ok(TC_ACT_UNSPEC),
        Action::Drop => Ok(TC_ACT_SHOT),
        // What cannot be answered (a RST, IP options, SCTP) is dropped, as before; so is a
        // later fragment (no header to answer about; RFC 1122 3.2.2: no ICMP error for it).
        Action::Reject if p.no_l4() => Ok(TC_ACT_SHOT),
        Action::Reject => Ok(F::reject(ctx, p).unwrap_or(TC_ACT_SHOT)),
        Action::Rewrite => nat::<F>(ctx, p, &d.nat).map(|()| TC_ACT_UNSPEC),
        Action::Bounce => nat::<F>(ctx, p, &d.nat).and_then(|()| bounce(ctx)),
        // Only XDP forwards.
        Action::Forward => Err(0),
    };
    match done {
        Ok(ret) => (ret, d.verdict),
        Err(_) => (TC_ACT_SHOT, Verdict::Error),
    }
}

/// Parse, decide, apply, count once (here, for every packet of the family; a frame of
/// neither family is counted by `run`). Returning only the action keeps the caller's frame
/// empty: the verifier adds up the frames of a call chain.
#[inline(never)]
fn handle<F: TcFamily>(ctx: &TcContext, reply: bool) -> i32 {
    let len = ctx.len();
    let (ret, verdict, svc_id) = if F::OUTLINE { staged::<F>(ctx, reply) } else { inlined::<F>(ctx, reply) };
    if verdict == Verdict::OtherL4 {
        return OTHER_L4;
    }
    stats::count(verdict, F::STATS, svc_id, len);
    ret
}

/// What `handle` returns for a frame of another L4 protocol: its caller then runs
/// `icmp_error`, as a sibling call so the two frames never add up on the stack.
const OTHER_L4: i32 = i32::MIN;

/// The interface a packet entered the node on: the pod's veth for `from_pod` (TC ingress),
/// where a reply came from for the egress programs (0: a local process).
#[inline(always)]
fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a context field.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

#[inline(always)]
fn decide<F: Family>(p: &Packet<F::Addr>, reply: bool, ifindex: u32, ct: &mut CtWork<F::Addr>) -> Decision<F::Addr> {
    if reply { pipeline::decide_reply::<F>(p, ifindex, ct) } else { pipeline::decide::<F>(p, Hook::Pod, ifindex, ct) }
}

/// IPv4: the steps inlined into one function, their state on its stack.
#[inline(always)]
fn inlined<F: TcFamily>(ctx: &TcContext, reply: bool) -> (i32, Verdict, u32) {
    let mut slot = core::mem::MaybeUninit::uninit();
    let ct = CtWork::zeroed_in(&mut slot);
    match parse_ctx::<F>(ctx) {
        Ok(p) => {
            let d = decide::<F>(&p, reply, ingress_ifindex(ctx), ct);
            let (ret, verdict) = apply::<F>(ctx, &p, &d);
            frag::remember::<F>(&p, &d);
            (ret, verdict, d.svc_id)
        }
        Err(v) => (TC_ACT_UNSPEC, v, 0),
    }
}

/// ICMP errors about translated flows (see `icmp`); anything else of another L4 protocol
/// passes untouched. A BPF function of its own: rare, and off the fast path's stack.
#[inline(never)]
fn icmp_error<F: TcFamily>(ctx: &TcContext, reply: bool) -> i32 {
    let len = ctx.len();
    let (ret, verdict, svc_id) = icmp_translate::<F>(ctx, reply);
    stats::count(verdict, F::STATS, svc_id, len);
    ret
}

#[inline(always)]
fn icmp_translate<F: TcFamily>(ctx: &TcContext, reply: bool) -> (i32, Verdict, u32) {
    let untouched = (TC_ACT_UNSPEC, Verdict::OtherL4, 0);
    // Errors are small; their quote must be in the linear area to be rewritten in place.
    let want = if ctx.len() < MAX_HDR { ctx.len() } else { MAX_HDR };
    if ctx.pull_data(want).is_err() {
        return untouched;
    }
    let Some(e) = icmp::parse::<F>(ctx.data(), ctx.data_end()) else {
        return untouched;
    };
    let side = if reply { Side::ToClient } else { Side::PodOut };
    let Some((t, _, svc_id)) = icmp::decide::<F>(&e, side) else {
        return untouched;
    };
    if icmp::rewrite::<F>(ctx.data(), ctx.data_end(), &e, &t) {
        (TC_ACT_UNSPEC, Verdict::IcmpError, svc_id)
    } else {
        (TC_ACT_SHOT, Verdict::Error, svc_id)
    }
}

/// IPv6: each step a BPF function of its own, their state in the per-CPU `Work` (see
/// `Family::OUTLINE`), so only one step's frame is on the stack at a time.
#[inline(always)]
fn staged<F: TcFamily>(ctx: &TcContext, reply: bool) -> (i32, Verdict, u32) {
    let Some(w) = pipeline::work::<F>() else {
        return (TC_ACT_UNSPEC, Verdict::Error, 0);
    };
    if let Err(v) = parse_step::<F>(ctx, &mut w.p) {
        return (TC_ACT_UNSPEC, v, 0);
    }
    decide_step::<F>(&w.p, reply, ingress_ifindex(ctx), &mut w.ct, &mut w.d);
    let (ret, verdict) = apply_step::<F>(ctx, &w.p, &w.d);
    if w.p.frag == frag::Frag::First {
        remember_step::<F>(&w.p, &w.d);
    }
    (ret, verdict, w.d.svc_id)
}

#[inline(never)]
fn parse_step<F: TcFamily>(ctx: &TcContext, out: &mut Packet<F::Addr>) -> Result<(), Verdict> {
    *out = parse_ctx::<F>(ctx)?;
    Ok(())
}

#[inline(never)]
fn decide_step<F: TcFamily>(
    p: &Packet<F::Addr>,
    reply: bool,
    ifindex: u32,
    ct: &mut CtWork<F::Addr>,
    out: &mut Decision<F::Addr>,
) {
    *out = decide::<F>(p, reply, ifindex, ct);
}

#[inline(never)]
fn remember_step<F: TcFamily>(p: &Packet<F::Addr>, d: &Decision<F::Addr>) {
    frag::remember::<F>(p, d);
}

#[inline(never)]
fn apply_step<F: TcFamily>(ctx: &TcContext, p: &Packet<F::Addr>, d: &Decision<F::Addr>) -> (i32, Verdict) {
    apply::<F>(ctx, p, d)
}

#[inline(always)]
fn run(ctx: &TcContext, reply: bool) -> i32 {
    match parse::l3(ctx.data(), ctx.data_end()) {
        Ok(L3::V4) => match handle::<V4>(ctx, reply) {
            OTHER_L4 => icmp_error::<V4>(ctx, reply),
            ret => ret,
        },
        Ok(L3::V6) => match handle::<V6>(ctx, reply) {
            OTHER_L4 => icmp_error::<V6>(ctx, reply),
            ret => ret,
        },
        Err(v) => {
            stats::count(v, StatsFamily::Other, 0, ctx.len());
            TC_ACT_UNSPEC
        }
    }
}

pub fn from_pod(ctx: &TcContext) -> i32 {
    run(ctx, false)
}

pub fn reverse_nat(ctx: &TcContext) -> i32 {
    run(ctx, true)
}
