//! Bench-only XDP programs: the floor our uplink program is measured against (`cargo xtask
//! bench`, per-packet section). The agent never loads or attaches them: the loader loads
//! the programs it names (`dataplane::maps::loader`), and these names are in no list of it.
//!
//! - `floor_xdp_pass`: returns XDP_PASS, nothing else (the cost of running any XDP program).
//! - `floor_xdp_fib_forward`: a bare IPv4 forwarder, the least a remote NodePort hit must
//!   do: bounds check, `bpf_fib_lookup` of the destination, the MACs it returns written,
//!   `bpf_redirect` to its egress interface. No parsing beyond that, no TTL, no maps.
use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect},
    macros::xdp,
    programs::XdpContext,
};

use crate::{
    hdr::{ETH_HLEN, IP_DST_OFF, IP_HLEN, IP_SRC_OFF, IP_TOT_LEN_OFF, MACS_LEN},
    wire,
};

/// `AF_INET`, as `bpf_fib_lookup` takes the family.
const FIB_AF_INET: u8 = 2;

#[xdp]
pub fn floor_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn floor_xdp_fib_forward(ctx: XdpContext) -> u32 {
    fib_forward(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn fib_forward(ctx: &XdpContext) -> Option<u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + IP_HLEN > end {
        return None;
    }
    let ip = (start + ETH_HLEN) as *const u8;
    // Zeroed as `from_uplink` zeroes its own (word stores, not the linker's byte loop).
    let mut slot = core::mem::MaybeUninit::uninit();
    let fib = crate::xdp::fib_zeroed(&mut slot);
    fib.family = FIB_AF_INET;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: a complete IPv4 header is at `ip` (bounds checked above); writing union
    // members. Read as `from_uplink` reads its headers (`wire`).
    unsafe {
        fib.__bindgen_anon_1.tot_len = u16::from_be(wire::u16_at::<{ IP_TOT_LEN_OFF as i16 }>(ip));
        fib.__bindgen_anon_3.ipv4_src = wire::u32_at::<{ IP_SRC_OFF as i16 }>(ip);
        fib.__bindgen_anon_4.ipv4_dst = wire::u32_at::<{ IP_DST_OFF as i16 }>(ip);
    }
    // SAFETY: `fib` is a properly sized, initialised parameter block on our stack.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), fib, size_of::<FibParams>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    // Fresh bounds after the helper call.
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + MACS_LEN > end {
        return None;
    }
    // SAFETY: the Ethernet addresses are within bounds (checked just above).
    unsafe {
        let eth = &mut *(start as *mut [u8; MACS_LEN]);
        eth[..6].copy_from_slice(&fib.dmac);
        eth[6..].copy_from_slice(&fib.smac);
    }
    // SAFETY: helper without preconditions; returns XDP_REDIRECT (or XDP_ABORTED).
    Some(unsafe { bpf_redirect(fib.ifindex, 0) } as u32)
}
