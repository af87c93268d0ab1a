//! Forwarding through devices XDP cannot transmit on. XDP forwards a translated packet to a
//! remote backend itself (`xdp::fib_forward`), but only out of a device that takes XDP
//! frames: a tunnel (flannel's or Calico's VXLAN device, an IPIP device) has no XDP transmit,
//! so native XDP drops what it redirects there, and an L3 tunnel wants no Ethernet header.
//! Handing the packet to the stack (`XDP_PASS`) is no way out either: its source is now this
//! node's address, a martian on input. So XDP tags the packet in its metadata with the
//! egress device the FIB lookup chose and passes it; `uplink_handoff`, on the uplink's TC
//! ingress (before IP input), sends it there with `bpf_redirect_neigh`, which resolves the
//! next hop and builds the link-layer header as the device needs it (the kernel's own
//! output path: vxlan encapsulates). Only XDP writes metadata, so a frame from the wire
//! cannot ask for this.
use core::mem::size_of;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_redirect_neigh, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};

/// Whether this kernel lets XDP grow its metadata (`bpf_xdp_adjust_meta`). The loader
/// sets it from a probe: some kernels refuse the helper to XDP outright, and the verifier
/// rejects a call it walks. Read from the frozen `.rodata`, so that with 0 the verifier
/// prunes the call as dead code and the packet takes the plain redirect.
#[unsafe(no_mangle)]
static XDP_METADATA: u8 = 1;

/// "epHO": marks our metadata (another XDP program could leave its own).
const MAGIC: u32 = 0x6570_484f;

/// What XDP leaves in front of the packet for `uplink_handoff`.
#[repr(C)]
struct Handoff {
    magic: u32,
    /// Egress device of the FIB lookup.
    ifindex: u32,
}

/// Tag the packet for `uplink_handoff` to send out of `ifindex`. False when the kernel or
/// the driver has no XDP metadata (the caller then redirects as before). Invalidates every packet pointer
/// the caller holds (the helper moves `data_meta`).
#[inline(always)]
pub fn tag(ctx: &XdpContext, ifindex: u32) -> bool {
    // SAFETY: a read of our own static; volatile so that the compiler keeps the load of
    // the value the loader patched in instead of folding the initialiser.
    if unsafe { core::ptr::read_volatile(&raw const XDP_METADATA) } == 0 {
        return false;
    }
    // SAFETY: helper on our own context; a negative delta grows the metadata area.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(size_of::<Handoff>() as i32)) } != 0 {
        return false;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + size_of::<Handoff>() > data {
        return false;
    }
    // SAFETY: `size_of::<Handoff>()` bytes of metadata lie at `meta` (checked above).
    unsafe { (meta as *mut Handoff).write_unaligned(Handoff { magic: MAGIC, ifindex }) };
    true
}

/// TC ingress of an uplink: a packet XDP tagged leaves through the device it named; every
/// other packet goes on untouched.
#[inline(always)]
pub fn redirect(ctx: &TcContext) -> i32 {
    // SAFETY: reads of two fields of the context the kernel passed in.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).data as usize) };
    if meta + size_of::<Handoff>() > data {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: `size_of::<Handoff>()` bytes of metadata lie at `meta` (checked above).
    let h = unsafe { (meta as *const Handoff).read_unaligned() };
    if h.magic != MAGIC {
        return TC_ACT_UNSPEC;
    }
    // The node configuration the agent writes before it attaches anything: also what makes
    // this map-less program recognisable as ours to `cleanup` (a program is ours by name
    // and by the maps it uses), so that a clsact filter of it is found and removed.
    if crate::maps::NODE_CONFIG.get(0).is_none() {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: helper without preconditions (no neighbour parameters: the kernel looks the
    // next hop up); returns TC_ACT_REDIRECT, or TC_ACT_SHOT on a bad ifindex.
    unsafe { bpf_redirect_neigh(h.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
