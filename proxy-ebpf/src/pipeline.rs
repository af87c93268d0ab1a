//! The decision every program shares: what to do with a parsed packet. TC and XDP only
//! apply it (`tc.rs`, `xdp.rs` are rewriters); conntrack state, service lookup, backend
//! selection and which flows are also source-NATed are decided here, once, in the shape of
//! Cilium's `lb4_local` (a switch on the conntrack state) with Katran's single exit (the
//! verdict is counted once, by the caller, after the action was applied).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use proxy_common::{CtValue, SCOPE_EXTERNAL, SCOPE_INTERNAL, Verdict, backend_flags, ct_flags, svc_flags};

use crate::{
    ct::{self, Ct, CtWork},
    family::Family,
    lb::{self, Selected},
    parse::Packet,
};

/// Where the packet was seen.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress of a pod's host veth: pod traffic, internal scope, hairpin SNAT.
    Pod,
    /// XDP on an uplink: traffic from outside the node, external scope, source ranges,
    /// SNAT towards backends on other nodes, resets for frontends without endpoints.
    Uplink,
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
    /// Rewrite, then straight back into the interface it came from (TC: hairpin).
    Bounce,
    /// Rewrite, then forward with the FIB (XDP: remote backends and their replies).
    Forward,
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

/// A source-NATed flow leaves the node by the hook's own way: bounced back into the pod
/// (hairpin) or forwarded (north-south to another node).
#[inline(always)]
fn snat_delivery(hook: Hook) -> Action {
    match hook {
        Hook::Pod => Action::Bounce,
        Hook::Uplink => Action::Forward,
    }
}

/// A client-side packet of a tracked flow: same backend (and SNAT port) as its first
/// packet, even if the backend or the service has gone since (as with kube-proxy's use of
/// the kernel conntrack).
#[inline(always)]
fn established<A: Copy + Default>(p: &Packet<A>, hook: Hook, ct: &CtValue<A>) -> Decision<A> {
    let (action, nat) = if ct.flags & ct_flags::SNAT != 0 {
        (snat_delivery(hook), Nat { saddr: ct.snat_addr, sport: ct.snat_port, daddr: ct.nat_addr, dport: ct.nat_port })
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
}

/// The family's per-CPU `Work`; `None` only if the map cannot be read (it always can: one
/// entry, index 0) or the family keeps none.
#[inline(always)]
pub fn work<F: Family>() -> Option<&'static mut Work<F::Addr>> {
    // SAFETY: a per-CPU map value; only this CPU's running program uses it, and a program
    // runs to completion without preemption by another on the same CPU for these hooks.
    F::work().map(|p| unsafe { &mut *p })
}

/// Pod traffic (`Hook::Pod`, seen on the pod interface `ifindex`) and traffic from outside
/// the node (`Hook::Uplink`).
#[inline(always)]
pub fn decide<F: Family>(p: &Packet<F::Addr>, hook: Hook, ifindex: u32, w: &mut CtWork<F::Addr>) -> Decision<F::Addr> {
    let (node_snat, hairpin) = F::node_addrs();
    // Replies this hook translates itself: a pod answering a hairpin flow (addressed to the
    // hairpin address), a remote backend answering a flow we source-NATed (addressed to a
    // port of the SNAT range: the only uplink packets that can be one, so other uplink
    // traffic, NodePorts included, costs no reply lookup).
    let (replies, seen) = match hook {
        Hook::Pod => (!F::is_unset(hairpin) && p.daddr == hairpin, ifindex),
        Hook::Uplink => {
            let cfg = lb::node_config();
            let port = u16::from_be(p.dport);
            (port >= cfg.snat_port_min && port <= cfg.snat_port_max, proxy_common::ct::IFINDEX_UPLINK)
        }
    };
    match ct::lookup::<F>(p, replies, seen, w) {
        Ct::Reply if w.val.flags & ct_flags::SNAT != 0 => {
            let ct = &w.val;
            let nat = Nat { saddr: ct.nat_addr, sport: ct.nat_port, daddr: ct.snat_addr, dport: ct.snat_port };
            return Decision::rewrite(snat_delivery(hook), nat, Verdict::ReverseNat, ct.svc_id);
        }
        // The reply of a pod's own flow to a backend on another node: `to_pod` on that
        // pod's veth restores the VIP.
        Ct::Reply => return Decision::pass(Verdict::Pass),
        Ct::Established => return established(p, hook, &w.val),
        Ct::Invalid => return Decision::new(Action::Drop, Verdict::CtInvalid, w.val.svc_id),
        Ct::New => {}
    }

    let scope = match hook {
        Hook::Pod => SCOPE_INTERNAL,
        Hook::Uplink => SCOPE_EXTERNAL,
    };
    let Some(svc) = lb::service_lookup::<F>(p, scope) else {
        return Decision::pass(Verdict::Pass);
    };
    // loadBalancerSourceRanges hold for every source, pods included (the agent flags only
    // LoadBalancer frontends with them).
    if !lb::source_allowed::<F>(&svc, p.saddr) {
        return Decision::new(Action::Drop, Verdict::SourceRangeDrop, svc.id);
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (backend_id, b) = match lb::select_backend::<F>(&svc, p.saddr, now) {
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
    let snat_addr = match hook {
        Hook::Pod if !F::is_unset(hairpin) && b.addr == p.saddr => Some(hairpin),
        Hook::Uplink if b.flags & backend_flags::LOCAL == 0 && svc.flags & svc_flags::LOCAL_ONLY == 0 => {
            Some(if F::is_unset(node_snat) { p.daddr } else { node_snat })
        }
        _ => None,
    };
    // The backend's answers come back where a source-NATed flow leaves: the uplink, or the
    // pod itself (hairpin). Otherwise the first answer tells.
    let reply_ifindex = if snat_addr.is_some() { seen } else { 0 };
    let mut flow = ct::NewFlow {
        svc_id: svc.id,
        backend_id,
        backend: &b,
        snat_addr: F::Addr::default(),
        now,
        ifindex: seen,
        reply_ifindex,
    };
    match snat_addr {
        Some(addr) => {
            flow.snat_addr = addr;
            match ct::create_snat::<F>(p, &flow, &lb::node_config(), w) {
                Ok(port) => {
                    let nat = Nat { saddr: addr, sport: port, daddr: b.addr, dport: b.port };
                    Decision::rewrite(snat_delivery(hook), nat, Verdict::NewFlow, svc.id)
                }
                Err(e) => Decision::new(Action::Drop, e.verdict(), svc.id),
            }
        }
        None => match ct::create::<F>(p, &flow, w) {
            Ok(()) => {
                let nat = Nat { saddr: p.saddr, sport: p.sport, daddr: b.addr, dport: b.port };
                Decision::rewrite(Action::Rewrite, nat, Verdict::NewFlow, svc.id)
            }
            Err(e) => Decision::new(Action::Drop, e.verdict(), svc.id),
        },
    }
}

/// Replies leaving towards a client through the stack (`to_pod`, `to_uplink`; `ifindex`:
/// the interface the reply entered the node on, 0 for a local process): the source goes
/// back to the frontend the client used. Source-NATed flows are not ours to undo here:
/// `decide` translates those completely where they arrive.
#[inline(always)]
pub fn decide_reply<F: Family>(p: &Packet<F::Addr>, ifindex: u32, w: &mut CtWork<F::Addr>) -> Decision<F::Addr> {
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
