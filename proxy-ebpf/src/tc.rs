//! TC programs on the host side of pod veths.
//!
//! - `from_pod` runs on the veth's *ingress* (packets leaving the pod): tracked flows are
//!   DNATed to their backend, new flows to a service VIP get a backend and conntrack entries.
//! - `to_pod` runs on the veth's *egress* (packets entering the pod): replies of tracked
//!   flows get their source rewritten back to the VIP:port the client used.
//!
//! Everything else returns `TC_ACT_UNSPEC`, so the packet continues exactly as if no
//! program were attached (and a CNI's own program after ours still runs).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
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
    match parse::parse(ctx.data(), ctx.data_end()) {
        Err(verdict::MALFORMED) if ctx.len() as usize > ctx.data_end() - ctx.data() => {
            let want = if ctx.len() < MAX_HDR { ctx.len() } else { MAX_HDR };
            ctx.pull_data(want).map_err(|_| verdict::MALFORMED)?;
            parse::parse(ctx.data(), ctx.data_end())
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

pub fn from_pod(ctx: &TcContext) -> i32 {
    let len = ctx.len();
    let p = match parse_ctx(ctx) {
        Ok(p) => p,
        Err(v) => {
            count_global(v, len);
            return TC_ACT_UNSPEC;
        }
    };
    // Tracked flow first: established connections keep their backend even after the
    // backend or the whole service is removed, as with kube-proxy's conntrack. A fresh SYN
    // on the tuple of a connection that already closed is a new connection (the client
    // reused its port), so it gets a new backend, like Linux conntrack re-opening TIME_WAIT.
    if let Some(ct) = lb::ct_lookup(&lb::forward_key(&p), &p) {
        let reopened = p.tcp_syn() && ct.flags & ct_flags::CLOSING != 0;
        if !reopened {
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
    if lb::ct_create(&p, svc.id, backend_id, &backend, now).is_err()
        || dnat(ctx, &p, backend.addr, backend.port).is_err()
    {
        count_service(svc.id, verdict::ERROR, len);
        return TC_ACT_SHOT;
    }
    count_service(svc.id, verdict::NEW_FLOW, len);
    TC_ACT_UNSPEC
}

pub fn to_pod(ctx: &TcContext) -> i32 {
    let len = ctx.len();
    let p = match parse_ctx(ctx) {
        Ok(p) => p,
        Err(v) => {
            count_global(v, len);
            return TC_ACT_UNSPEC;
        }
    };
    let Some(ct) = lb::ct_lookup(&lb::reply_key(&p), &p) else {
        count_global(verdict::PASS, len);
        return TC_ACT_UNSPEC;
    };
    if p.tcp_closing() {
        lb::ct_mark_forward_closing(&p, &ct);
    }
    if snat(ctx, &p, ct.nat_addr, ct.nat_port).is_err() {
        count_global(verdict::ERROR, len);
        return TC_ACT_SHOT;
    }
    count_service(ct.svc_id, verdict::REVERSE_NAT, len);
    TC_ACT_UNSPEC
}
