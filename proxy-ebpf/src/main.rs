//! eBPF programs of ebpf-proxy. Entry points are thin; the logic lives in the modules:
//! `driver` (the one sequence every packet program runs: parse, decide, rewrite, count,
//! return), `tc` and `xdp` (the hooks: how each reads, rewrites and sends on a packet; XDP
//! also forwards), `hdr` (header layouts and protocol numbers), `parse` (headers),
//! `pipeline` (the one decision every packet program shares), `ct` (conntrack state and
//! entries, SNAT ports), `lb` (service lookup, backend selection), `frag` (later fragments
//! of translated flows), `csum` (checksum arithmetic), `reject` (TCP resets), `icmp` (ICMP
//! errors about translated flows), `stats` (counters, once per packet), `maps`; `sock`
//! (socket-level load balancing: cgroup sock_addr hooks sharing `lb`); `handoff` (XDP's
//! forwarding through tunnels, finished on the uplink's TC ingress).
#![no_std]
#![no_main]
// Packet loads as single BPF instructions (`wire`).
#![feature(asm_experimental_arch)]
// The map helpers take keys and values by reference or by value (`impl Borrow`); by
// reference they stay where they are (IPv6's in the per-CPU `Work`) instead of being copied
// onto the verifier's 512-byte stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

mod csum;
mod ct;
mod driver;
mod family;
mod filter;
// Bench-only programs the agent never loads (see the module).
mod floor;
mod frag;
mod handoff;
mod hdr;
mod icmp;
mod lb;
mod maps;
mod parse;
mod pipeline;
mod reject;
mod sock;
mod stats;
mod tc;
mod wire;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

/// TC ingress of a pod's host-side veth: traffic leaving the pod.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    driver::run::<tc::FromPod>(&ctx)
}

/// TC egress of a pod's host-side veth: traffic entering the pod.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    driver::run::<tc::ToPod>(&ctx)
}

/// XDP on the node's uplink: NodePort / ExternalIP / LoadBalancer traffic from outside.
#[xdp]
pub fn from_uplink(ctx: XdpContext) -> u32 {
    driver::run::<xdp::Xdp>(&ctx)
}

/// TC egress of the uplink: replies of north-south flows XDP delivered to a local backend
/// leave with the frontend (node address:nodePort, external or LB IP:port) as source.
#[classifier]
pub fn to_uplink(ctx: TcContext) -> i32 {
    driver::run::<tc::ToUplink>(&ctx)
}

/// TC ingress of an uplink: sends on the packets XDP translated for a device it cannot
/// transmit on (a tunnel), see `handoff`.
#[classifier]
pub fn uplink_handoff(ctx: TcContext) -> i32 {
    handoff::redirect(&ctx)
}

/// cgroup connect4: TCP and connected UDP sockets dialling a frontend connect to a backend.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward4(&ctx, sock::Call::Connect)
}

/// cgroup sendmsg4: unconnected UDP datagrams to a frontend go to a backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward4(&ctx, sock::Call::Send)
}

/// cgroup recvmsg4: datagrams from a backend the socket was sent to appear to come from
/// the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// cgroup getpeername4: a socket connected through a frontend reports the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_peername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// cgroup connect6: as `sock_connect4`, for IPv6 sockets (IPv4-mapped destinations
/// through the IPv4 maps).
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::forward6(&ctx, sock::Call::Connect)
}

/// cgroup sendmsg6: unconnected UDP over IPv6.
#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::forward6(&ctx, sock::Call::Send)
}

/// cgroup recvmsg6.
#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

/// cgroup getpeername6.
#[cgroup_sock_addr(getpeername6)]
pub fn sock_peername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
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
