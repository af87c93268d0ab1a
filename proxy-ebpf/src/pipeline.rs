//! The decision every program shares: what to do with a parsed packet. The driver
//! (`driver.rs`) runs it and has the hook (TC or XDP) apply it; conntrack state, service
//! lookup, backend selection and which flows are also source-NATed are decided here, once,
//! in the shape of Cilium's `lb4_local` (a switch on the conntrack state) with Katran's
//! single exit (the verdict is counted once, by the driver, after the action was applied).
use aya_ebpf::{macros::map, maps::PerCpuArray};
use proxy_common::{
    Backend, CtValue, Ipv6Words, PROTO_SCTP, SCOPE_EXTERNAL, SCOPE_INTERNAL, Verdict, backend_flags, ct_flags, dsr,
    lb_mode, service_cidr, svc_flags,
};

use crate::{
    ct::{self, Ct, CtWork},
    family::{Family, V4, V6},
    filter,
    lb::{self, Selected},
    parse::{Frag, Packet},
};

/// Where a packet was seen: which program runs, and so which traffic it is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// TC ingress of a pod's host veth (`from_pod`): traffic leaving a pod, internal scope,
    /// hairpin SNAT.
    FromPod,
    /// TC egress towards a client (`to_pod` on a pod's veth, `to_uplink` on an uplink):
    /// backends' replies, whose source goes back to the frontend the client used.
    ToClient,
    /// XDP on an uplink (`from_uplink`): traffic from outside the node, external scope,
    /// source ranges, SNAT towards backends on other nodes, resets for frontends without
    /// endpoints.
    FromUplink,
}

/// The addresses and ports a packet leaves with (network byte order).
#[derive(Clone, Copy, Default)]
pub struct Nat<A> {
    pub saddr: A,
    pub sport: u16,
    pub daddr: A,
    pub dport: u16,
}

/// What to do with the packet. A plain enum, and `Decision` a plain struct whose fields are
/// always initialised: an enum payload left undefined for some variants can end up copied
/// through a register the verifier considers unreadable.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Untouched: the stack (and any program after ours) sees it as if we were not there.
    Pass,
    Drop,
    /// Refuse a flow to a frontend without endpoints: TCP reset (both hooks), ICMP port
    /// unreachable for UDP (TC; XDP drops UDP).
    Reject,
    /// Rewrite to `Decision::nat`, then on through the stack.
    Rewrite,
    /// Rewrite, then send it on the hook's own way, as a source-NATed flow leaves the node:
    /// TC bounces it straight back into the pod it came from (hairpin), XDP forwards it with
    /// the FIB (north-south to a backend on another node, and its replies).
    Redirect,
    /// Direct server return (XDP only): rewrite the destination to the remote backend,
    /// keep the client's source, put the frontend (the packet's destination before the
    /// rewrite) in an IP option when the backend's node needs it (a TCP SYN, every UDP
    /// datagram), then forward like `Redirect`. The backend's node answers the client.
    Dsr,
    /// Not for `apply`: the packet carries a DSR frontend and is for no frontend of ours,
    /// so this is the backend's node, whose conntrack learns the flow next (`learn_dsr`, a
    /// step of its own after `decide`, so its frame does not add to the decision's). It
    /// then passes.
    Learn,
}

pub struct Decision<A> {
    pub action: Action,
    /// Where the packet goes, for the rewriting actions (zero otherwise).
    pub nat: Nat<A>,
    pub verdict: Verdict,
    /// The service the packet belonged to, for the per-service counters; 0 = none (the
    /// agent never allocates id 0).
    pub svc_id: u32,
}

impl<A: Default> Decision<A> {
    #[inline(always)]
    fn new(action: Action, verdict: Verdict, svc_id: u32) -> Self {
        Decision { action, nat: Nat::default(), verdict, svc_id }
    }

    #[inline(always)]
    fn rewrite(action: Action, nat: Nat<A>, verdict: Verdict, svc_id: u32) -> Self {
        Decision { action, nat, verdict, svc_id }
    }

    #[inline(always)]
    pub fn pass(verdict: Verdict) -> Self {
        Self::new(Action::Pass, verdict, 0)
    }
}

/// A client-side packet of a tracked flow: same backend (and SNAT port) as its first
/// packet, even if the backend or the service has gone since (as with kube-proxy's use of
/// the kernel conntrack).
#[inline(always)]
fn established<A: Copy + Default>(p: &Packet<A>, ct: &CtValue<A>) -> Decision<A> {
    let (action, nat) = if ct.flags & ct_flags::SNAT != 0 {
        (Action::Redirect, Nat { saddr: ct.snat_addr, sport: ct.snat_port, daddr: ct.nat_addr, dport: ct.nat_port })
    } else if ct.dsr == dsr::FLOW {
        (Action::Dsr, Nat { saddr: p.saddr, sport: p.sport, daddr: ct.nat_addr, dport: ct.nat_port })
    } else {
        (Action::Rewrite, Nat { saddr: p.saddr, sport: p.sport, daddr: ct.nat_addr, dport: ct.nat_port })
    };
    Decision::rewrite(action, nat, Verdict::Established, ct.svc_id)
}

impl<A: Default> Default for Decision<A> {
    fn default() -> Self {
        Self::pass(Verdict::Pass)
    }
}

/// What the steps of handling one IPv6 packet share: the parsed packet, the decision,
/// conntrack's working memory. It lives in a per-CPU map (`Family::work`): with 16-byte
/// addresses these plus the call chain's frames would not fit the verifier's 512 bytes.
/// IPv4 keeps the same values on its stack.
#[derive(Default)]
pub struct Work<A> {
    pub p: Packet<A>,
    pub d: Decision<A>,
    pub ct: CtWork<A>,
    /// The packet as addressed to the frontend its DSR header names (`Staged::dsr_frontend`).
    pub dsr: Packet<A>,
}

/// Per-CPU working memory of one IPv6 packet (see `Work`). Not pinned: it holds nothing
/// between packets.
#[map]
pub static WORK6: PerCpuArray<Work<Ipv6Words>> = PerCpuArray::with_max_entries(1, 0);

/// Where a family keeps a packet's `Work` when it runs the steps outlined
/// (`Family::OUTLINE`): IPv6 in `WORK6`, IPv4 on the stack.
pub trait Staged: Family {
    /// The family's per-CPU `Work`; `None` only if the map cannot be read (it always can:
    /// one entry, index 0) or the family keeps none.
    fn work() -> Option<&'static mut Work<Self::Addr>>;
    /// Run `f` on `p` addressed to the frontend its DSR option or header names (the flow as
    /// the node the client reached saw it): a copy on the stack for IPv4, in `WORK6` for
    /// IPv6, whose call chain has no room for another packet on the stack.
    fn dsr_frontend<R>(p: &Packet<Self::Addr>, f: impl FnOnce(&Packet<Self::Addr>) -> R) -> Option<R>;
}

impl Staged for V4 {
    #[inline(always)]
    fn work() -> Option<&'static mut Work<u32>> {
        None
    }
    #[inline(always)]
    fn dsr_frontend<R>(p: &Packet<u32>, f: impl FnOnce(&Packet<u32>) -> R) -> Option<R> {
        Some(f(&Packet { daddr: p.dsr_addr, dport: p.dsr_port, ..*p }))
    }
}

impl Staged for V6 {
    #[inline(always)]
    fn work() -> Option<&'static mut Work<Ipv6Words>> {
        // SAFETY: a per-CPU map value; only this CPU's running program uses it, and a
        // program runs to completion without preemption by another on the same CPU for these
        // hooks.
        WORK6.get_ptr_mut(0).map(|p| unsafe { &mut *p })
    }
    #[inline(always)]
    fn dsr_frontend<R>(p: &Packet<Ipv6Words>, f: impl FnOnce(&Packet<Ipv6Words>) -> R) -> Option<R> {
        let w = WORK6.get_ptr_mut(0)?;
        // SAFETY: only the `dsr` field is touched, which nothing else refers to while the
        // program holds `p` (`Work::p`) and the conntrack work (`Work::ct`); per-CPU, as in
        // `work`.
        let q = unsafe { &mut *core::ptr::addr_of_mut!((*w).dsr) };
        *q = *p;
        q.daddr = p.dsr_addr;
        q.dport = p.dsr_port;
        Some(f(q))
    }
}

/// What to do with a packet seen at `seen` (on interface `ifindex` for the TC hooks): the
/// client side of flows, balanced (`FromPod`, `FromUplink`), or replies restored
/// (`ToClient`).
#[inline(always)]
pub fn decide<F: Staged>(p: &Packet<F::Addr>, seen: Seen, ifindex: u32, w: &mut CtWork<F::Addr>) -> Decision<F::Addr> {
    if seen == Seen::ToClient { decide_reply::<F>(p, ifindex, w) } else { balance::<F>(p, seen, ifindex, w) }
}

/// Replies `balance` translates itself, and the side conntrack records (`ifindex`, or the
/// uplinks' for `FromUplink`): a pod answering a hairpin flow (addressed to the hairpin
/// address), a remote backend answering a flow we source-NATed (addressed to a port of the
/// SNAT range: the only uplink packets that can be one, so other uplink traffic, NodePorts
/// included, costs no reply lookup).
#[inline(always)]
fn replies_here<F: Family>(p: &Packet<F::Addr>, seen: Seen, ifindex: u32) -> (bool, u32) {
    if seen == Seen::FromUplink {
        let cfg = lb::node_config();
        let port = u16::from_be(p.dport);
        (port >= cfg.snat_port_min && port <= cfg.snat_port_max, proxy_common::ct::IFINDEX_UPLINK)
    } else {
        let (_, hairpin) = F::node_addrs();
        (!F::is_unset(hairpin) && p.daddr == hairpin, ifindex)
    }
}

/// The fast exit, before any conntrack work (`filter`): a packet `balance` would pass
/// untouched as nothing of ours, or (`ToClient`, where the hook allows: `replies`) one
/// `decide_reply` would pass as no reply of ours, told by the filter alone. Not for the
/// replies `balance` translates (the hairpin address, the SNAT ports), DSR options or
/// fragments: those take the full path.
#[inline(always)]
pub fn nothing_ours<F: Family>(p: &Packet<F::Addr>, seen: Seen, replies: bool) -> bool {
    if p.dsr_port != 0 || p.frag != Frag::Whole {
        return false;
    }
    if seen == Seen::ToClient {
        return replies && filter::no_reply::<F>(p);
    }
    // The filter first: a packet of ours (a hit) stops at its set bit.
    filter::nothing_ours::<F>(p) && !replies_here::<F>(p, seen, 0).0
}

/// Pod traffic (`FromPod`, seen on the pod interface `ifindex`) and traffic from outside
/// the node (`FromUplink`).
#[inline(always)]
fn balance<F: Staged>(p: &Packet<F::Addr>, seen: Seen, ifindex: u32, w: &mut CtWork<F::Addr>) -> Decision<F::Addr> {
    let (node_snat, hairpin) = F::node_addrs();
    let (replies, side) = replies_here::<F>(p, seen, ifindex);
    match ct::lookup::<F>(p, replies, side, w) {
        Ct::Reply if w.val.flags & ct_flags::SNAT != 0 => {
            let ct = &w.val;
            let nat = Nat { saddr: ct.nat_addr, sport: ct.nat_port, daddr: ct.snat_addr, dport: ct.snat_port };
            return Decision::rewrite(Action::Redirect, nat, Verdict::ReverseNat, ct.svc_id);
        }
        // The reply of a pod's own flow to a backend on another node: `to_pod` on that
        // pod's veth restores the VIP.
        Ct::Reply => return Decision::pass(Verdict::Pass),
        Ct::Established => return established(p, &w.val),
        Ct::Invalid => return Decision::new(Action::Drop, Verdict::CtInvalid, w.val.svc_id),
        Ct::New => {}
    }

    let scope = if seen == Seen::FromUplink { SCOPE_EXTERNAL } else { SCOPE_INTERNAL };
    let Some(svc) = lb::service_lookup::<F>(p, scope) else {
        if seen == Seen::FromUplink && p.dsr_port != 0 {
            return Decision::new(Action::Learn, Verdict::Dsr, 0);
        }
        // KEP-1880: an address inside a Service CIDR that no frontend holds (any port) is
        // refused rather than leaked to the default route; a pod's flow to a ClusterIP on
        // a port it does not serve too (kube-proxy's nftables `cluster-ips-check`). Only
        // new flows get here (after the conntrack switch).
        return match F::service_cidr(p.daddr) {
            service_cidr::CIDR => Decision::new(Action::Reject, Verdict::UnallocatedServiceIp, 0),
            service_cidr::CLUSTER_IP if seen == Seen::FromPod => {
                Decision::new(Action::Reject, Verdict::ClusterIpUnknownPort, 0)
            }
            _ => Decision::pass(Verdict::Pass),
        };
    };
    // loadBalancerSourceRanges hold for every source, pods included (the agent flags only
    // LoadBalancer frontends with them).
    if !lb::source_allowed::<F>(&svc, p.saddr) {
        return Decision::new(Action::Drop, Verdict::SourceRangeDrop, svc.id);
    }
    let now = crate::ct::now();
    let flow = lb::flow_hash::<F>(&svc, p);
    let (backend_id, b) = match lb::select_backend::<F>(&svc, p.saddr, flow, now) {
        Selected::Backend(id, b) => (id, b),
        Selected::Empty => {
            return Decision::new(Action::Reject, Verdict::NoBackend, svc.id);
        }
        Selected::Missing => return Decision::new(Action::Drop, Verdict::Error, svc.id),
    };

    // Flows that are also source-NATed. Hairpin: a pod balanced to itself would get a
    // packet from its own address. North-south to a backend on another node: its replies
    // must come back through this node to be un-NATed, so the source becomes this node's
    // address (the one the client used if the agent set none). With a local backend, or
    // externalTrafficPolicy: Local, the client address is preserved.
    let remote_ns =
        seen == Seen::FromUplink && b.flags & backend_flags::LOCAL == 0 && svc.flags & svc_flags::LOCAL_ONLY == 0;
    // Direct server return (`--lb-mode`): no source NAT, the frontend travels to the
    // backend's node in an IP option (not for a later fragment: it has no ports to go by).
    // Only a header without options (IPv4) or extension headers (IPv6) of its own gets one.
    let dsr = remote_ns
        && !p.no_l4()
        && p.l4_off == p.l3_off + F::HDR_LEN
        && lb_mode::dsr_for(lb::node_config().lb_mode, p.proto);
    let snat_addr = match seen {
        Seen::FromPod if !F::is_unset(hairpin) && b.addr == p.saddr => Some(hairpin),
        _ if remote_ns && !dsr => Some(if F::is_unset(node_snat) { p.daddr } else { node_snat }),
        _ => None,
    };
    // SCTP's CRC32c covers its ports and is not updated here: a flow whose ports would be
    // rewritten (another targetPort, or a source-NATed source port) is refused and counted,
    // never forwarded broken. Checked before conntrack, so nothing is created for it.
    if p.proto == PROTO_SCTP && (b.port != p.dport || snat_addr.is_some()) {
        return Decision::new(Action::Drop, Verdict::SctpPortNat, svc.id);
    }
    // The backend's answers come back where a source-NATed flow leaves: the uplink, or the
    // pod itself (hairpin). Otherwise the first answer tells.
    let reply_ifindex = if snat_addr.is_some() { side } else { 0 };
    let mut flow = ct::NewFlow {
        svc_id: svc.id,
        backend_id,
        backend: &b,
        snat_addr: F::Addr::default(),
        now,
        ifindex: side,
        reply_ifindex,
        dsr: if dsr { dsr::FLOW } else { 0 },
    };
    match snat_addr {
        Some(addr) => {
            flow.snat_addr = addr;
            match ct::create_snat::<F>(p, &flow, &lb::node_config(), w) {
                Ok(port) => {
                    let nat = Nat { saddr: addr, sport: port, daddr: b.addr, dport: b.port };
                    Decision::rewrite(Action::Redirect, nat, Verdict::NewFlow, svc.id)
                }
                Err(e) => Decision::new(Action::Drop, e.verdict(), svc.id),
            }
        }
        None => match ct::create::<F>(p, &flow, w) {
            Ok(()) => {
                let nat = Nat { saddr: p.saddr, sport: p.sport, daddr: b.addr, dport: b.port };
                let action = if dsr { Action::Dsr } else { Action::Rewrite };
                Decision::rewrite(action, nat, Verdict::NewFlow, svc.id)
            }
            Err(e) => Decision::new(Action::Drop, e.verdict(), svc.id),
        },
    }
}

/// Direct server return, on the backend's node: an uplink packet for a local pod that
/// carries the frontend its client used (`Packet::dsr_addr`/`dsr_port`, put there by the
/// node the client reached). Conntrack records the flow as if this node had balanced it
/// (client -> frontend, DNATed to the pod), so the pod's replies leave the uplink
/// (`to_uplink`) rewritten from the frontend, straight to the client. The packet itself
/// passes unchanged: the kernel ignores the option (an unknown type on a received packet),
/// and does not echo it in its answers.
///
/// The frontend cannot always be checked here: a NodePort's address is the receiving
/// node's, which this node does not serve. An ExternalIP or LoadBalancer IP this node
/// serves gets its service's id (per-service counters); anything else is believed as the
/// option says, as Cilium does. A forged option can only make a pod answer the packet's
/// own source from another address, which that source could have spoofed itself.
#[inline(always)]
pub fn learn_dsr<F: Staged>(p: &Packet<F::Addr>, w: &mut CtWork<F::Addr>) -> Decision<F::Addr> {
    F::dsr_frontend(p, |q| learn_as_frontend::<F>(p, q, w)).unwrap_or_else(|| Decision::pass(Verdict::Error))
}

/// `learn_dsr` for `q`, the packet `p` as addressed to its frontend.
#[inline(always)]
fn learn_as_frontend<F: Family>(
    p: &Packet<F::Addr>,
    q: &Packet<F::Addr>,
    w: &mut CtWork<F::Addr>,
) -> Decision<F::Addr> {
    let svc_id = lb::service_lookup::<F>(q, SCOPE_EXTERNAL).map(|s| s.id).unwrap_or(0);
    match ct::lookup::<F>(q, false, proxy_common::ct::IFINDEX_UPLINK, w) {
        // A later datagram of the flow (UDP carries the option on every packet), or a
        // retransmitted SYN: the entry stands (refreshed by the lookup).
        Ct::Established => return Decision::new(Action::Pass, Verdict::Dsr, svc_id),
        Ct::Invalid => return Decision::new(Action::Drop, Verdict::CtInvalid, svc_id),
        Ct::New | Ct::Reply => {}
    }
    let backend = Backend { addr: p.daddr, port: p.dport, ..Backend::default() };
    let now = crate::ct::now();
    let flow = ct::NewFlow {
        svc_id,
        backend_id: 0,
        backend: &backend,
        snat_addr: F::Addr::default(),
        now,
        ifindex: proxy_common::ct::IFINDEX_UPLINK,
        reply_ifindex: 0,
        dsr: 0,
    };
    match ct::create::<F>(q, &flow, w) {
        Ok(()) => Decision::new(Action::Pass, Verdict::Dsr, svc_id),
        Err(e) => Decision::new(Action::Drop, e.verdict(), svc_id),
    }
}

/// Replies leaving towards a client through the stack (`ToClient`; `ifindex`: the interface
/// the reply entered the node on, 0 for a local process): the source goes back to the
/// frontend the client used. Source-NATed flows are not ours to undo here: `balance`
/// translates those completely where they arrive.
#[inline(always)]
fn decide_reply<F: Family>(p: &Packet<F::Addr>, ifindex: u32, w: &mut CtWork<F::Addr>) -> Decision<F::Addr> {
    match ct::reply::<F>(p, ifindex, w) {
        Ct::Reply if w.val.flags & ct_flags::SNAT == 0 => {
            let ct = &w.val;
            let nat = Nat { saddr: ct.nat_addr, sport: ct.nat_port, daddr: p.daddr, dport: p.dport };
            Decision::rewrite(Action::Rewrite, nat, Verdict::ReverseNat, ct.svc_id)
        }
        Ct::Invalid => Decision::new(Action::Drop, Verdict::CtInvalid, w.val.svc_id),
        _ => Decision::pass(Verdict::Pass),
    }
}
