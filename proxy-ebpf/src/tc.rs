//! TC programs on the host side of pod veths.
//!
//! - `from_pod` runs on the veth's *ingress* (packets leaving the pod): tracked flows are
//!   DNATed to their backend, new flows to a service VIP get a backend and conntrack entries.
//! - `to_pod` runs on the veth's *egress* (packets entering the pod): replies of tracked
//!   flows get their source rewritten back to the VIP:port the client used. The same logic
//!   runs as `to_uplink` on the uplink's egress, for replies of north-south flows that XDP
//!   delivered to a local backend.
//! - Hairpin (a pod reaching itself through its own service): the kernel would not accept a
//!   packet from its own address arriving on eth0, so such flows are also source-NATed to
//!   the hairpin address (`NodeConfig::hairpin_addr`) and bounced straight back into the
//!   pod; the pod's answers to the hairpin address are translated back the same way.
//!
//! Everything else returns `TC_ACT_UNSPEC`, so the packet continues exactly as if no
//! program were attached (and a CNI's own program after ours still runs).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    programs::TcContext,
};
use proxy_common::{ct_flags, verdict, PROTO_UDP, SCOPE_INTERNAL};

use crate::{
    lb::{self, Selected},
    parse::{self, Packet},
    stats::{count_global, count_service},
};

const IP_CSUM_OFF: usize = 10;
const IP_SRC_OFF: usize = 12;
const IP_DST_OFF: usize = 16;

/// Headers we may need in the linear area: Ethernet + IPv4 with options + TCP.
const MAX_HDR: u32 = 14 + 60 + 20;

/// Parse, pulling non-linear header bytes into the linear area once if needed.
#[inline(always)]
fn parse_ctx(ctx: &TcContext) -> Result<Packet, u32> {
    let len = ctx.len() as usize;
    match parse::parse(ctx.data(), ctx.data_end(), len) {
        Err(verdict::MALFORMED) if len > ctx.data_end() - ctx.data() => {
            let want = if ctx.len() < MAX_HDR { ctx.len() } else { MAX_HDR };
            ctx.pull_data(want).map_err(|_| verdict::MALFORMED)?;
            parse::parse(ctx.data(), ctx.data_end(), len)
        }
        r => r,
    }
}

/// Rewrite one address (at `addr_off`) and port (at `port_off`) with checksum fix-ups:
/// the IP header checksum, and the L4 checksum through the pseudo-header. The kernel's
/// helpers handle CHECKSUM_PARTIAL skbs (offloaded TX checksums) correctly, which a
/// hand-rolled incremental update would not.
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
    if old_addr != new_addr {
        if let Some(csum) = p.l4_csum_off() {
            ctx.l4_csum_replace(
                csum,
                old_addr as u64,
                new_addr as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled | 4,
            )?;
        }
        ctx.l3_csum_replace(p.l3_off + IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)?;
        ctx.store(p.l3_off + addr_off, &new_addr, 0)?;
    }
    if old_port != new_port {
        if let Some(csum) = p.l4_csum_off() {
            ctx.l4_csum_replace(csum, old_port as u64, new_port as u64, mangled | 2)?;
        }
        ctx.store(p.l4_off + port_off, &new_port, 0)?;
    }
    Ok(())
}

#[inline(always)]
fn dnat(ctx: &TcContext, p: &Packet, addr: u32, port: u16) -> Result<(), i64> {
    rewrite(ctx, p, IP_DST_OFF, p.daddr, addr, 2, p.dport, port)
}

#[inline(always)]
fn snat(ctx: &TcContext, p: &Packet, addr: u32, port: u16) -> Result<(), i64> {
    rewrite(ctx, p, IP_SRC_OFF, p.saddr, addr, 0, p.sport, port)
}

/// Send a hairpin packet straight back into the pod it came from (egress of the same
/// veth), with the MACs swapped as the gateway would have done. Routing it instead would
/// depend on the node's rp_filter accepting the link-local hairpin source on a pod veth.
#[inline(always)]
fn bounce(ctx: &TcContext) -> i32 {
    let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
        return TC_ACT_SHOT;
    };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    if ctx.store(0, &swapped, 0).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: reading the context field and calling a helper without preconditions.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

/// Both halves of a hairpin (or any source-NATed) translation.
#[inline(always)]
fn full_nat(ctx: &TcContext, p: &Packet, saddr: u32, sport: u16, daddr: u32, dport: u16) -> Result<(), i64> {
    snat(ctx, p, saddr, sport)?;
    dnat(ctx, p, daddr, dport)
}

pub fn from_pod(ctx: &TcContext) -> i32 {
    let len = ctx.len();
    let p = match parse_ctx(ctx) {
        Ok(p) => p,
        Err(v) => {
            count_global(v, len);
            return TC_ACT_UNSPEC;
        }
    };
    let cfg = lb::node_config();
    // The pod answering a hairpin flow: back to VIP:port -> pod:port, into the pod.
    if cfg.hairpin_addr != 0 && p.daddr == cfg.hairpin_addr {
        if let Some(ct) = lb::ct_reply(&p).filter(|ct| ct.flags & ct_flags::SNAT != 0) {
            if full_nat(ctx, &p, ct.nat_addr, ct.nat_port, ct.snat_addr, ct.snat_port).is_err() {
                count_global(verdict::ERROR, len);
                return TC_ACT_SHOT;
            }
            count_service(ct.svc_id, verdict::REVERSE_NAT, len);
            return bounce(ctx);
        }
        count_global(verdict::PASS, len);
        return TC_ACT_UNSPEC;
    }
    // Tracked flow first: established connections keep their backend even after the
    // backend or the whole service is removed, as with kube-proxy's conntrack. A fresh SYN
    // on the tuple of a connection that already closed is a new connection (the client
    // reused its port), so it gets a new backend, like Linux conntrack re-opening TIME_WAIT;
    // the old connection's reply entry (and SNAT port) is given back first.
    if let Some(ct) = lb::ct_forward(&p) {
        if p.tcp_syn() && ct.flags & ct_flags::CLOSING != 0 {
            lb::ct_release_reply(&p, &ct);
        } else {
            if ct.flags & ct_flags::SNAT != 0 {
                if full_nat(ctx, &p, ct.snat_addr, ct.snat_port, ct.nat_addr, ct.nat_port).is_err() {
                    count_global(verdict::ERROR, len);
                    return TC_ACT_SHOT;
                }
                count_service(ct.svc_id, verdict::ESTABLISHED, len);
                return bounce(ctx);
            }
            if dnat(ctx, &p, ct.nat_addr, ct.nat_port).is_err() {
                count_global(verdict::ERROR, len);
                return TC_ACT_SHOT;
            }
            count_service(ct.svc_id, verdict::ESTABLISHED, len);
            return TC_ACT_UNSPEC;
        }
    }
    let Some(svc) = lb::service_lookup(&p, SCOPE_INTERNAL) else {
        count_global(verdict::PASS, len);
        return TC_ACT_UNSPEC;
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (backend_id, backend) = match lb::select_backend(&svc, p.saddr, now) {
        Selected::Backend(id, b) => (id, b),
        Selected::Empty => {
            count_service(svc.id, verdict::NO_BACKEND, len);
            return TC_ACT_SHOT;
        }
        Selected::Missing => {
            count_service(svc.id, verdict::ERROR, len);
            return TC_ACT_SHOT;
        }
    };
    if backend.addr == p.saddr && cfg.hairpin_addr != 0 {
        let port = match lb::ct_create_snat(&p, svc.id, backend_id, &backend, cfg.hairpin_addr, &cfg, now) {
            Ok(port) => port,
            Err(e) => {
                count_service(svc.id, e.verdict(), len);
                return TC_ACT_SHOT;
            }
        };
        if full_nat(ctx, &p, cfg.hairpin_addr, port, backend.addr, backend.port).is_err() {
            count_service(svc.id, verdict::ERROR, len);
            return TC_ACT_SHOT;
        }
        count_service(svc.id, verdict::NEW_FLOW, len);
        return bounce(ctx);
    }
    if let Err(e) = lb::ct_create(&p, svc.id, backend_id, &backend, now) {
        count_service(svc.id, e.verdict(), len);
        return TC_ACT_SHOT;
    }
    if dnat(ctx, &p, backend.addr, backend.port).is_err() {
        count_service(svc.id, verdict::ERROR, len);
        return TC_ACT_SHOT;
    }
    count_service(svc.id, verdict::NEW_FLOW, len);
    TC_ACT_UNSPEC
}

/// Replies of tracked flows get their source put back to the frontend the client used.
/// Entries of source-NATed flows are not ours to undo here: XDP (north-south) and
/// `from_pod` (hairpin) translate those completely.
pub fn reverse_nat(ctx: &TcContext) -> i32 {
    let len = ctx.len();
    let p = match parse_ctx(ctx) {
        Ok(p) => p,
        Err(v) => {
            count_global(v, len);
            return TC_ACT_UNSPEC;
        }
    };
    let Some(ct) = lb::ct_reply(&p).filter(|ct| ct.flags & ct_flags::SNAT == 0) else {
        count_global(verdict::PASS, len);
        return TC_ACT_UNSPEC;
    };
    if snat(ctx, &p, ct.nat_addr, ct.nat_port).is_err() {
        count_global(verdict::ERROR, len);
        return TC_ACT_SHOT;
    }
    count_service(ct.svc_id, verdict::REVERSE_NAT, len);
    TC_ACT_UNSPEC
}
