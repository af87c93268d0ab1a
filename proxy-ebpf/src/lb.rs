//! Service lookup, backend selection (random, or session affinity) and conntrack entries.
//! Pure map logic: no packet access, so the TC and XDP entry points share it.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use proxy_common::{
    ct_flags, svc_flags, AffinityKey, AffinityValue, Backend, CtKey, CtValue, ServiceKey, ServiceValue,
    SlotKey, CT_DIR_FORWARD, CT_DIR_REPLY,
};

use crate::{
    maps::{AFFINITY, BACKENDS, BACKEND_SLOTS, CONNTRACK, SERVICES},
    parse::Packet,
};

/// Refresh `last_seen` at most this often, so established flows do not write the shared
/// conntrack cache line on every packet.
const CT_REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn forward_key(p: &Packet) -> CtKey {
    CtKey {
        src_addr: p.saddr,
        dst_addr: p.daddr,
        src_port: p.sport,
        dst_port: p.dport,
        proto: p.proto,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    }
}

/// Key under which a reply to this packet's flow is found: as it arrives, from the side
/// this packet was sent to.
#[inline(always)]
pub fn reply_key(p: &Packet) -> CtKey {
    CtKey {
        src_addr: p.saddr,
        dst_addr: p.daddr,
        src_port: p.sport,
        dst_port: p.dport,
        proto: p.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

/// Look up a tracked flow, refresh its timestamp when stale, and note a TCP FIN/RST.
/// Returns a copy of the entry as it was before this packet.
#[inline(always)]
pub fn ct_lookup(key: &CtKey, p: &Packet) -> Option<CtValue> {
    let ptr = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup; a concurrent delete can at worst
    // make us read a recycled entry of the same type (LRU map semantics).
    unsafe {
        let seen = *ptr;
        let now = bpf_ktime_get_ns();
        if now.wrapping_sub(seen.last_seen) > CT_REFRESH_NS {
            (*ptr).last_seen = now;
        }
        if p.tcp_closing() && seen.flags & ct_flags::CLOSING == 0 {
            (*ptr).flags |= ct_flags::CLOSING;
        }
        Some(seen)
    }
}

/// Mark the forward entry of the flow a reply belongs to as closing (the backend sent
/// FIN/RST first), so a new SYN on the same tuple selects a backend afresh.
#[inline(always)]
pub fn ct_mark_forward_closing(reply: &Packet, rev: &CtValue) {
    let key = CtKey {
        src_addr: reply.daddr,
        dst_addr: rev.nat_addr,
        src_port: reply.dport,
        dst_port: rev.nat_port,
        proto: reply.proto,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    if let Some(ptr) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup, see `ct_lookup`.
        unsafe { (*ptr).flags |= ct_flags::CLOSING };
    }
}

#[inline(always)]
pub fn service_lookup(p: &Packet, scope: u8) -> Option<ServiceValue> {
    let key = ServiceKey { addr: p.daddr, port: p.dport, proto: p.proto, scope };
    // SAFETY: plain-old-data copy out of the map value.
    unsafe { SERVICES.get(&key).copied() }
}

pub enum Selected {
    Backend(u32, Backend),
    /// Service has no backends.
    Empty,
    /// A slot or backend vanished under us (agent mid-update); treat as an error.
    Missing,
}

#[inline(always)]
fn backend_by_id(id: u32) -> Option<Backend> {
    // SAFETY: plain-old-data copy out of the map value.
    unsafe { BACKENDS.get(&id).copied() }
}

/// Pick a backend: the client's affinity backend if still valid, otherwise uniformly at
/// random among the active slot generation.
#[inline(always)]
pub fn select_backend(svc: &ServiceValue, client: u32, now: u64) -> Selected {
    if svc.count == 0 {
        return Selected::Empty;
    }
    let affinity = svc.flags & svc_flags::AFFINITY != 0;
    let akey = AffinityKey { client_addr: client, svc_id: svc.id };
    if affinity {
        // SAFETY: plain-old-data copy out of the map value.
        if let Some(a) = unsafe { AFFINITY.get(&akey).copied() } {
            let timeout_ns = svc.affinity_timeout as u64 * 1_000_000_000;
            if now.wrapping_sub(a.last_used) <= timeout_ns {
                if let Some(b) = backend_by_id(a.backend_id) {
                    let _ = AFFINITY.insert(
                        &akey,
                        &AffinityValue { backend_id: a.backend_id, _pad: 0, last_used: now },
                        0,
                    );
                    return Selected::Backend(a.backend_id, b);
                }
            }
        }
    }
    // SAFETY: helper without preconditions.
    let index = unsafe { bpf_get_prandom_u32() } % svc.count;
    let slot = SlotKey::new(svc.id, svc.generation, index);
    // SAFETY: plain-old-data copy out of the map value.
    let Some(id) = (unsafe { BACKEND_SLOTS.get(&slot).copied() }) else {
        return Selected::Missing;
    };
    let Some(b) = backend_by_id(id) else {
        return Selected::Missing;
    };
    if affinity {
        let _ = AFFINITY.insert(&akey, &AffinityValue { backend_id: id, _pad: 0, last_used: now }, 0);
    }
    Selected::Backend(id, b)
}

/// Record both directions of a new DNAT flow: client -> VIP becomes client -> backend, and
/// the backend's replies (backend -> client) get their source put back to VIP:port.
#[inline(always)]
pub fn ct_create(p: &Packet, svc_id: u32, backend_id: u32, b: &Backend, now: u64) -> Result<(), i32> {
    let fwd = CtValue {
        nat_addr: b.addr,
        nat_port: b.port,
        backend_id,
        svc_id,
        last_seen: now,
        ..CtValue::default()
    };
    CONNTRACK.insert(&forward_key(p), &fwd, 0)?;
    let rkey = CtKey {
        src_addr: b.addr,
        dst_addr: p.saddr,
        src_port: b.port,
        dst_port: p.sport,
        proto: p.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let rev = CtValue {
        nat_addr: p.daddr,
        nat_port: p.dport,
        backend_id,
        svc_id,
        last_seen: now,
        ..CtValue::default()
    };
    CONNTRACK.insert(&rkey, &rev, 0)
}
