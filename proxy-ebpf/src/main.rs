//! eBPF programs of ebpf-proxy. Entry points are thin; the logic lives in the modules:
//! `parse` (headers), `lb` (service lookup, backend selection, conntrack), `tc`
//! (packet rewrite for pod traffic), `stats` (counters), `maps` (every map).
#![no_std]
#![no_main]

mod lb;
mod maps;
mod parse;
mod stats;
mod tc;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// TC ingress of a pod's host-side veth: traffic leaving the pod.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    tc::from_pod(&ctx)
}

/// TC egress of a pod's host-side veth: traffic entering the pod.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    tc::to_pod(&ctx)
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
