//! eBPF programs of ebpf-proxy. Entry points are thin; the logic lives in the modules:
//! `parse` (headers), `pipeline` (the one decision every program shares), `ct`
//! (conntrack state and entries, SNAT ports), `lb` (service lookup, backend selection), `tc`
//! and `xdp` (rewriters applying a decision; XDP also forwards), `csum` (checksum
//! arithmetic), `reject` (TCP resets), `icmp` (ICMP errors about translated flows), `stats` (counters, once per packet), `maps`.
#![no_std]
#![no_main]

mod csum;
mod ct;
mod family;
mod icmp;
mod lb;
mod maps;
mod parse;
mod pipeline;
mod reject;
mod stats;
mod tc;
mod xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// TC ingress of a pod's host-side veth: traffic leaving the pod.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    tc::from_pod(&ctx)
}

/// TC egress of a pod's host-side veth: traffic entering the pod.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    tc::reverse_nat(&ctx)
}

/// XDP on the node's uplink: NodePort / ExternalIP / LoadBalancer traffic from outside.
#[xdp]
pub fn from_uplink(ctx: XdpContext) -> u32 {
    xdp::from_uplink(&ctx)
}

/// TC egress of the uplink: replies of north-south flows XDP delivered to a local backend
/// leave with the frontend (node address:nodePort, external or LB IP:port) as source.
#[classifier]
pub fn to_uplink(ctx: TcContext) -> i32 {
    tc::reverse_nat(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves panics unreachable; this only satisfies the compiler.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
