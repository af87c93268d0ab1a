//! The one driver of every packet program: parse -> decide -> rewrite -> count -> return,
//! written once. What differs between the hooks is behind `Hook` (how to read the packet,
//! what the return codes are) and `Rewrite` (how to rewrite it, answer it and send it on),
//! which `tc.rs` and `xdp.rs` implement; where the packet was seen is the hook's `Seen`.
//!
//! Each family is handled in a BPF function of its own (`handle`), so their stack frames
//! never add up; IPv4 inlines its steps there, IPv6 runs each step as a function of its own
//! with its state in the per-CPU `Work` (see `Family::OUTLINE`). A frame of another L4
//! protocol goes to `icmp_error`, a sibling call of `handle`. Every packet is counted once,
//! at the exit of whichever of the three ends it.
use core::mem::MaybeUninit;

use proxy_common::{PROTO_TCP, StatsFamily, Verdict};

use crate::{
    ct::CtWork,
    family::{V4, V6},
    frag,
    icmp::{self, IcmpFamily},
    parse::{self, Frag, L3, Packet, Parse},
    pipeline::{self, Action, Decision, Nat, Seen, Staged},
    stats,
};

/// A program's hook, whatever the family: its context, return codes, and how it reads a
/// packet.
pub trait Hook {
    type Ctx;
    /// The program's return code (`TC_ACT_*`, `xdp_action`).
    type Ret: Copy + PartialEq;
    /// Where this hook's program sees its packets.
    const SEEN: Seen;
    /// Whether a packet no backend sent passes without the reply lookups (`Seen::ToClient`
    /// only).
    const FILTER_REPLIES: bool = false;
    /// Untouched: the stack (and any program after ours) sees it as if we were not there.
    const PASS: Self::Ret;
    const DROP: Self::Ret;
    /// A code no action returns: what `handle` returns for a frame of another L4 protocol,
    /// so that its caller runs `icmp_error` next, as a sibling call.
    const OTHER_L4: Self::Ret;
    /// The linear packet data, `start..end`.
    fn data(ctx: &Self::Ctx) -> (usize, usize);
    /// The bytes a packet is counted with.
    fn len(ctx: &Self::Ctx) -> u32;
    /// The interface the packet entered the node on, as conntrack records it (0: none to
    /// tell).
    fn ifindex(ctx: &Self::Ctx) -> u32;
    /// Parse a frame of family `F`.
    fn parse<F: Parse>(ctx: &Self::Ctx) -> Result<Packet<F::Addr>, Verdict>;
    /// Make an ICMP error's quote readable in the linear data; false: leave it alone.
    fn linearize(ctx: &Self::Ctx) -> bool;
}

/// How a hook changes a packet of family `F`.
pub trait Rewrite<F: IcmpFamily>: Hook {
    /// Rewrite the addresses and ports to `n`, with their checksums.
    fn rewrite(ctx: &Self::Ctx, p: &Packet<F::Addr>, n: &Nat<F::Addr>) -> Result<(), ()>;
    /// Send a rewritten packet (to `n`, of protocol `proto`) on the hook's own way
    /// (`Action::Redirect`); `Err`: the verdict it is dropped under.
    fn redirect(ctx: &Self::Ctx, proto: u8, n: &Nat<F::Addr>) -> Result<Self::Ret, Verdict>;
    /// Refuse a flow to a frontend without endpoints (a reset, an ICMP error), or drop it.
    fn reject(ctx: &Self::Ctx, p: &Packet<F::Addr>) -> Self::Ret;
    /// Direct server return: put the frontend `vip`:`vport` in an IP option of the
    /// (already rewritten) packet; `Err`: the verdict it is dropped under.
    fn dsr_option(ctx: &Self::Ctx, vip: F::Addr, vport: u16) -> Result<(), Verdict>;
    /// Direct server return: if the packet would exceed the MTU once the option is added,
    /// answer it (ICMP fragmentation needed with the MTU less the option) and say how the
    /// hook returns it; `None`: it fits.
    fn dsr_too_big(ctx: &Self::Ctx, p: &Packet<F::Addr>) -> Option<Self::Ret>;
}

/// The entry of every packet program.
#[inline(always)]
pub fn run<H: Rewrite<V4> + Rewrite<V6>>(ctx: &H::Ctx) -> H::Ret {
    let (start, end) = H::data(ctx);
    match parse::l3(start, end) {
        Ok(L3::V4) => match handle::<H, V4>(ctx) {
            ret if ret == H::OTHER_L4 => icmp_error::<H, V4>(ctx),
            ret => ret,
        },
        Ok(L3::V6) => match handle::<H, V6>(ctx) {
            ret if ret == H::OTHER_L4 => icmp_error::<H, V6>(ctx),
            ret => ret,
        },
        Err(v) => {
            stats::count(v, StatsFamily::Other, 0, H::len(ctx));
            H::PASS
        }
    }
}

/// Parse, decide, apply, count once (here, for every packet of the family but those of
/// another L4 protocol, counted by `icmp_error`). Not inlined: each family gets its own BPF
/// function and stack frame, and returning only the action keeps the caller's frame empty
/// (the verifier adds up the frames of a call chain, 512 bytes at most).
#[inline(never)]
fn handle<H: Rewrite<F>, F: Parse + Staged + IcmpFamily>(ctx: &H::Ctx) -> H::Ret {
    let len = H::len(ctx);
    let (ret, verdict, svc_id) = if F::OUTLINE { staged::<H, F>(ctx) } else { inlined::<H, F>(ctx) };
    if verdict == Verdict::OtherL4 {
        return H::OTHER_L4;
    }
    stats::count(verdict, F::STATS, svc_id, len);
    ret
}

/// IPv4: the steps inlined into one function, their state on its stack.
#[inline(always)]
fn inlined<H: Rewrite<F>, F: Parse + Staged + IcmpFamily>(ctx: &H::Ctx) -> (H::Ret, Verdict, u32) {
    let mut slot = MaybeUninit::uninit();
    match H::parse::<F>(ctx) {
        // Nothing of ours: no conntrack work at all.
        Ok(p) if pipeline::nothing_ours::<F>(&p, H::SEEN, H::FILTER_REPLIES) => (H::PASS, Verdict::Pass, 0),
        Ok(p) => {
            let ct = CtWork::zeroed_in(&mut slot);
            let mut d = pipeline::decide::<F>(&p, H::SEEN, H::ifindex(ctx), ct);
            if d.action == Action::Learn {
                d = pipeline::learn_dsr::<F>(&p, ct);
            }
            let (ret, verdict) = match dsr_too_big::<H, F>(ctx, &p, &d) {
                Some(ret) => (ret, Verdict::DsrTooBig),
                None => apply::<H, F>(ctx, &p, &d),
            };
            frag::remember::<F>(&p, &d);
            (ret, verdict, d.svc_id)
        }
        Err(v) => (H::PASS, v, 0),
    }
}

/// IPv6: each step a BPF function of its own, their state in the per-CPU `Work` (see
/// `Family::OUTLINE`), so only one step's frame is on the stack at a time.
#[inline(always)]
fn staged<H: Rewrite<F>, F: Parse + Staged + IcmpFamily>(ctx: &H::Ctx) -> (H::Ret, Verdict, u32) {
    let Some(w) = F::work() else {
        return (H::PASS, Verdict::Error, 0);
    };
    if let Err(v) = parse_step::<H, F>(ctx, &mut w.p) {
        return (H::PASS, v, 0);
    }
    decide_step::<H, F>(&w.p, H::ifindex(ctx), &mut w.ct, &mut w.d);
    if w.d.action == Action::Learn {
        learn_step::<F>(&w.p, &mut w.ct, &mut w.d);
    }
    // The MTU check is a sibling of `apply_step`: the ICMP answer it may build would not
    // fit on the stack below `apply_step`'s frame.
    let too_big = if w.d.action == Action::Dsr { too_big_step::<H, F>(ctx, &w.p, &w.d) } else { None };
    let (ret, verdict) = match too_big {
        Some(ret) => (ret, Verdict::DsrTooBig),
        None => apply_step::<H, F>(ctx, &w.p, &w.d),
    };
    if w.p.frag == Frag::First {
        remember_step::<F>(&w.p, &w.d);
    }
    (ret, verdict, w.d.svc_id)
}

/// Parse into `out`; `Err(Verdict::Pass)` also for a packet that is nothing of ours (the
/// fast exit, checked in this step's frame so the steps after it keep their stack).
#[inline(never)]
fn parse_step<H: Hook, F: Parse>(ctx: &H::Ctx, out: &mut Packet<F::Addr>) -> Result<(), Verdict> {
    *out = H::parse::<F>(ctx)?;
    if pipeline::nothing_ours::<F>(out, H::SEEN, H::FILTER_REPLIES) {
        return Err(Verdict::Pass);
    }
    Ok(())
}

#[inline(never)]
fn decide_step<H: Hook, F: Parse + Staged>(
    p: &Packet<F::Addr>,
    ifindex: u32,
    ct: &mut CtWork<F::Addr>,
    out: &mut Decision<F::Addr>,
) {
    *out = pipeline::decide::<F>(p, H::SEEN, ifindex, ct);
}

#[inline(never)]
fn learn_step<F: Staged>(p: &Packet<F::Addr>, ct: &mut CtWork<F::Addr>, out: &mut Decision<F::Addr>) {
    *out = pipeline::learn_dsr::<F>(p, ct);
}

#[inline(never)]
fn remember_step<F: Parse>(p: &Packet<F::Addr>, d: &Decision<F::Addr>) {
    frag::remember::<F>(p, d);
}

#[inline(never)]
fn too_big_step<H: Rewrite<F>, F: IcmpFamily>(
    ctx: &H::Ctx,
    p: &Packet<F::Addr>,
    d: &Decision<F::Addr>,
) -> Option<H::Ret> {
    dsr_too_big::<H, F>(ctx, p, d)
}

#[inline(never)]
fn apply_step<H: Rewrite<F>, F: IcmpFamily>(
    ctx: &H::Ctx,
    p: &Packet<F::Addr>,
    d: &Decision<F::Addr>,
) -> (H::Ret, Verdict) {
    apply::<H, F>(ctx, p, d)
}

/// Carry out a decision; a failed rewrite turns into a counted `error` drop, a failed
/// redirect into a drop counted as the hook says.
#[inline(always)]
fn apply<H: Rewrite<F>, F: IcmpFamily>(ctx: &H::Ctx, p: &Packet<F::Addr>, d: &Decision<F::Addr>) -> (H::Ret, Verdict) {
    match d.action {
        // `Learn` never gets here (the driver turns it into the backend node's decision).
        Action::Pass | Action::Learn => (H::PASS, d.verdict),
        Action::Drop => (H::DROP, d.verdict),
        // A later fragment has no header to answer about (RFC 1122 3.2.2: no ICMP error
        // for it either): dropped.
        Action::Reject if p.no_l4() => (H::DROP, d.verdict),
        Action::Reject => (H::reject(ctx, p), d.verdict),
        Action::Rewrite => match H::rewrite(ctx, p, &d.nat) {
            Ok(()) => (H::PASS, d.verdict),
            Err(()) => (H::DROP, Verdict::Error),
        },
        Action::Redirect | Action::Dsr => match H::rewrite(ctx, p, &d.nat) {
            Ok(()) => {
                // DSR: the option goes in after the rewrite (`dsr_too_big` checked it fits).
                if d.action == Action::Dsr
                    && carries_dsr_option(p)
                    && let Err(v) = H::dsr_option(ctx, p.daddr, p.dport)
                {
                    return (H::DROP, v);
                }
                match H::redirect(ctx, p.proto, &d.nat) {
                    Ok(ret) => (ret, d.verdict),
                    Err(v) => (H::DROP, v),
                }
            }
            Err(()) => (H::DROP, Verdict::Error),
        },
    }
}

/// Does this DSR packet carry the option? The backend's node learns the frontend from a
/// TCP flow's SYN (it keeps it in conntrack) and from every UDP datagram (each may be the
/// first it sees); a later fragment has no ports to learn from.
#[inline(always)]
fn carries_dsr_option<A>(p: &Packet<A>) -> bool {
    !p.no_l4() && (p.proto != PROTO_TCP || p.tcp_syn())
}

/// Direct server return: a packet that would exceed the MTU once the option is added is
/// answered instead (ICMP fragmentation needed / Packet Too Big): how the hook returns it.
/// `None`: not a DSR packet with the option, or it fits; `apply` goes on.
#[inline(always)]
fn dsr_too_big<H: Rewrite<F>, F: IcmpFamily>(
    ctx: &H::Ctx,
    p: &Packet<F::Addr>,
    d: &Decision<F::Addr>,
) -> Option<H::Ret> {
    if d.action != Action::Dsr || !carries_dsr_option(p) {
        return None;
    }
    H::dsr_too_big(ctx, p)
}

/// ICMP errors about translated flows (see `icmp`): rewritten, then handed to the stack,
/// or forwarded like the flow's packets (XDP, source-NATed flows). Anything else of another
/// L4 protocol passes untouched. A BPF function of its own: rare, and off the fast path's
/// stack.
#[inline(never)]
fn icmp_error<H: Rewrite<F>, F: IcmpFamily>(ctx: &H::Ctx) -> H::Ret {
    let len = H::len(ctx);
    let (ret, verdict, svc_id) = icmp_translate::<H, F>(ctx);
    stats::count(verdict, F::STATS, svc_id, len);
    ret
}

#[inline(always)]
fn icmp_translate<H: Rewrite<F>, F: IcmpFamily>(ctx: &H::Ctx) -> (H::Ret, Verdict, u32) {
    let untouched = (H::PASS, Verdict::OtherL4, 0);
    if !H::linearize(ctx) {
        return untouched;
    }
    let (start, end) = H::data(ctx);
    let Some(e) = icmp::parse::<F>(start, end) else {
        return untouched;
    };
    let Some((t, forward, svc_id)) = icmp::decide::<F>(&e, H::SEEN) else {
        return untouched;
    };
    let (start, end) = H::data(ctx);
    if !icmp::rewrite::<F>(start, end, &e, &t) {
        return (H::DROP, Verdict::Error, svc_id);
    }
    if !forward {
        return (H::PASS, Verdict::IcmpError, svc_id);
    }
    let to = Nat { saddr: t.outer_src, sport: 0, daddr: t.outer_dst, dport: 0 };
    match H::redirect(ctx, F::PROTO_ICMP, &to) {
        Ok(ret) => (ret, Verdict::IcmpError, svc_id),
        Err(v) => (H::DROP, v, svc_id),
    }
}
