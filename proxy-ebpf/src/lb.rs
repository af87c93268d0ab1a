//! Service lookup and backend selection (random, Maglev, or session affinity), and the node facts
//! the agent wrote. Pure map logic, generic over the address family.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    AffinityKey, AffinityValue, Backend, NodeConfig, ServiceKey, ServiceValue, SlotKey, nat_defaults, svc_flags,
};

use crate::{
    family::Family,
    maps::{BACKEND_SLOTS, MAGLEV_SLOTS, NODE_CONFIG},
    parse::Packet,
};

/// The node facts the agent wrote (IPv4 addresses and the SNAT port range both families
/// use), with the documented defaults for what it left 0.
#[inline(always)]
pub fn node_config() -> NodeConfig {
    let mut c = NODE_CONFIG.get(0).copied().unwrap_or_default();
    if c.snat_port_min == 0 || c.snat_port_max < c.snat_port_min {
        c.snat_port_min = nat_defaults::SNAT_PORT_MIN;
        c.snat_port_max = nat_defaults::SNAT_PORT_MAX;
    }
    c
}

/// loadBalancerSourceRanges: may `saddr` use this frontend? Only frontends flagged
/// `SOURCE_RANGES` are restricted; their allowed prefixes live in the family's LPM trie
/// under the service id.
#[inline(always)]
pub fn source_allowed<F: Family>(svc: &ServiceValue, saddr: F::Addr) -> bool {
    svc.flags & svc_flags::SOURCE_RANGES == 0 || F::source_allowed(svc.id, saddr)
}

#[inline(always)]
pub fn service_lookup<F: Family>(p: &Packet<F::Addr>, scope: u8) -> Option<ServiceValue> {
    let key = ServiceKey { addr: p.daddr, port: p.dport, proto: p.proto, scope };
    // SAFETY: plain-old-data copy out of the map value.
    unsafe { F::services().get(&key).copied() }
}

pub enum Selected<A> {
    Backend(u32, Backend<A>),
    /// Service has no backends.
    Empty,
    /// A slot or backend vanished under us (agent mid-update); treat as an error.
    Missing,
}

#[inline(always)]
fn backend_by_id<F: Family>(id: u32) -> Option<Backend<F::Addr>> {
    // SAFETY: plain-old-data copy out of the map value.
    unsafe { F::backends().get(&id).copied() }
}

/// The flow hash Maglev frontends index their table with (0 for the others: not computed).
#[inline(always)]
pub fn flow_hash<F: Family>(svc: &ServiceValue, p: &Packet<F::Addr>) -> u32 {
    if svc.flags & svc_flags::MAGLEV == 0 {
        return 0;
    }
    F::flow_hash(p.saddr, p.daddr, p.sport, p.dport, p.proto)
}

/// Pick a backend: the client's affinity backend if still valid; otherwise, for a Maglev
/// frontend, the one its table holds at slot `flow % maglev_size` (`flow`: `flow_hash`, so
/// every node picks the same one); otherwise uniformly at random among the active slot
/// generation. Only new flows come here: established ones follow conntrack.
#[inline(always)]
pub fn select_backend<F: Family>(svc: &ServiceValue, client: F::Addr, flow: u32, now: u64) -> Selected<F::Addr> {
    if F::OUTLINE { select_outlined::<F>(svc, &client, flow, now) } else { select_body::<F>(svc, client, flow, now) }
}

/// IPv6: a BPF function of its own (see `Family::OUTLINE`).
#[inline(never)]
fn select_outlined<F: Family>(svc: &ServiceValue, client: &F::Addr, flow: u32, now: u64) -> Selected<F::Addr> {
    select_body::<F>(svc, *client, flow, now)
}

/// The backend id in the Maglev table of `svc` for `flow`; `None` if the frontend has no
/// table (or an empty slot, 0: never a backend id; random then). The table is the run of
/// `MAGLEV_SLOTS` the value names: one array read.
#[inline(always)]
fn maglev_slot(svc: &ServiceValue, flow: u32) -> Option<u32> {
    if svc.flags & svc_flags::MAGLEV == 0 || svc.maglev_size == 0 || svc.maglev_base == 0 {
        return None;
    }
    let index = svc.maglev_base.wrapping_add(flow % svc.maglev_size);
    // The array's bounds check rejects an index past its end.
    MAGLEV_SLOTS.get(index).copied().filter(|&id| id != 0)
}

#[inline(always)]
fn select_body<F: Family>(svc: &ServiceValue, client: F::Addr, flow: u32, now: u64) -> Selected<F::Addr> {
    if svc.count == 0 {
        return Selected::Empty;
    }
    let affinity = svc.flags & svc_flags::AFFINITY != 0;
    let akey = AffinityKey { client_addr: client, svc_id: svc.id };
    if affinity {
        // SAFETY: plain-old-data copy out of the map value.
        if let Some(a) = unsafe { F::affinity().get(&akey).copied() } {
            let timeout_ns = svc.affinity_timeout as u64 * 1_000_000_000;
            if now.wrapping_sub(a.last_used) <= timeout_ns
                && let Some(b) = backend_by_id::<F>(a.backend_id)
            {
                let _ = F::affinity().insert(
                    &akey,
                    &AffinityValue { backend_id: a.backend_id, _pad: 0, last_used: now },
                    0,
                );
                return Selected::Backend(a.backend_id, b);
            }
        }
    }
    let id = match maglev_slot(svc, flow) {
        Some(id) => id,
        None => {
            // SAFETY: helper without preconditions.
            let index = unsafe { bpf_get_prandom_u32() } % svc.count;
            let slot = SlotKey::new(svc.id, svc.generation, index);
            // SAFETY: plain-old-data copy out of the map value.
            let Some(id) = (unsafe { BACKEND_SLOTS.get(&slot).copied() }) else {
                return Selected::Missing;
            };
            id
        }
    };
    let Some(b) = backend_by_id::<F>(id) else {
        return Selected::Missing;
    };
    if affinity {
        let _ = F::affinity().insert(&akey, &AffinityValue { backend_id: id, _pad: 0, last_used: now }, 0);
    }
    Selected::Backend(id, b)
}
