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
use proxy_common::{Verdict, PROTO_UDP};

use crate::{
    parse::{self, Packet, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF},
    pipeline::{self, Action, Decision, Hook, Nat},
    stats,
};

/// Headers we may need in the linear area: Ethernet + IPv4 with options + TCP.
const MAX_HDR: u32 = 14 + 60 + 20;
/// The Ethernet addresses (destination, source) at the start of the frame.
const MACS_LEN: usize = 12;

/// Parse, pulling non-linear header bytes into the linear area once if needed.
#[inline(always)]
fn parse_ctx(ctx: &TcContext) -> Result<Packet, Verdict> {
    let len = ctx.len() as usize;
    match parse::parse(ctx.data(), ctx.data_end(), len) {
        Err(Verdict::Malformed) if len > ctx.data_end() - ctx.data() => {
            let want = if ctx.len() < MAX_HDR { ctx.len() } else { MAX_HDR };
            ctx.pull_data(want).map_err(|_| Verdict::Malformed)?;
            parse::parse(ctx.data(), ctx.data_end(), len)
        }
        r => r,
    }
}

/// Rewrite one address (at `addr_off` in the IP header) and port (at `port_off` in the L4
/// header) with checksum fix-ups: the IP header checksum, and the L4 checksum through the
/// pseudo-header. The kernel's helpers handle CHECKSUM_PARTIAL skbs (offloaded TX
/// checksums) correctly, which a hand-rolled incremental update would not.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    p: &Packet,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    // UDP checksum 0 means "none": MARK_MANGLED_0 leaves it 0 and avoids producing 0.
    let mangled = if p.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let csum = p.l4_csum_field().map(|f| p.l4_off + f);
    if old_addr != new_addr {
        if let Some(csum) = csum {
            ctx.l4_csum_replace(csum, old_addr as u64, new_addr as u64, BPF_F_PSEUDO_HDR as u64 | mangled | 4)?;
        }
        ctx.l3_csum_replace(p.l3_off + IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)?;
        ctx.store(p.l3_off + addr_off, &new_addr, 0)?;
    }
    if old_port != new_port {
        if let Some(csum) = csum {
            ctx.l4_csum_replace(csum, old_port as u64, new_port as u64, mangled | 2)?;
        }
        ctx.store(p.l4_off + port_off, &new_port, 0)?;
    }
    Ok(())
}

/// Both halves of a translation (each only when it changes something).
#[inline(always)]
fn nat(ctx: &TcContext, p: &Packet, n: &Nat) -> Result<(), i64> {
    rewrite(ctx, p, IP_SRC_OFF, p.saddr, n.saddr, L4_SPORT_OFF, p.sport, n.sport)?;
    rewrite(ctx, p, IP_DST_OFF, p.daddr, n.daddr, L4_DPORT_OFF, p.dport, n.dport)
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
fn apply(ctx: &TcContext, p: &Packet, d: &Decision) -> (i32, Verdict) {
    let done = match &d.action {
        Action::Pass => Ok(TC_ACT_UNSPEC),
        // TC has no reject of its own yet: pod clients of a service without endpoints time
        // out (docs/datapath.md).
        Action::Drop | Action::Reject => Ok(TC_ACT_SHOT),
        Action::Rewrite(n) => nat(ctx, p, n).map(|()| TC_ACT_UNSPEC),
        Action::Bounce(n) => nat(ctx, p, n).and_then(|()| bounce(ctx)),
        // Only XDP forwards.
        Action::Forward(_) => Err(0),
    };
    match done {
        Ok(ret) => (ret, d.verdict),
        Err(_) => (TC_ACT_SHOT, Verdict::Error),
    }
}

/// Parse, decide, apply, count once.
#[inline(always)]
fn run(ctx: &TcContext, decide: impl FnOnce(&Packet) -> Decision) -> i32 {
    let len = ctx.len();
    let (ret, verdict, svc_id) = match parse_ctx(ctx) {
        Ok(p) => {
            let d = decide(&p);
            let (ret, verdict) = apply(ctx, &p, &d);
            (ret, verdict, d.svc_id)
        }
        Err(v) => (TC_ACT_UNSPEC, v, None),
    };
    stats::count(verdict, svc_id, len);
    ret
}

pub fn from_pod(ctx: &TcContext) -> i32 {
    run(ctx, |p| pipeline::decide(p, Hook::Pod))
}

pub fn reverse_nat(ctx: &TcContext) -> i32 {
    run(ctx, pipeline::decide_reply)
}
