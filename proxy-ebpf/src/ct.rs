//! Conntrack: the state of a flow as its packets see it, and the creation of both entries
//! of a new flow (with the SNAT port claim for source-NATed ones). The lifecycle's states
//! and timeouts are defined in `proxy_common::ct`; the agent's collector expires entries.
//! Generic over the address family: each family has its own table.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use proxy_common::{Backend, CT_DIR_FORWARD, CT_DIR_REPLY, CtKey, CtValue, NodeConfig, Verdict, ct, ct_flags};

use crate::{family::Family, parse::Packet};

/// SNAT source-port candidates tried per new flow before giving up (bounded for the
/// verifier; with a 4536-port range and a sane number of flows per backend, the first one
/// nearly always wins).
const SNAT_TRIES: u32 = 8;

/// Refresh `last_seen` at most this often, so established flows do not write the shared
/// conntrack cache line on every packet.
const CT_REFRESH_NS: u64 = 1_000_000_000;

/// `bpf_map_update_elem` on a hash map with no free element left.
const E2BIG: i64 = 7;

/// What conntrack knows about a packet.
pub enum Ct<A> {
    /// No entry, or a SYN reopening a closed tuple (whose old reply entry and SNAT port have
    /// just been given back): balance afresh.
    New,
    /// A packet from the client side of a tracked flow.
    Established(CtValue<A>),
    /// A packet from the backend side of a tracked flow.
    Reply(CtValue<A>),
}

/// Errors of conntrack creation.
pub enum CtError {
    /// The table is full of live entries (insert returned E2BIG): counted `ct_full`.
    Full,
    /// Any other map failure (or every SNAT port candidate taken): counted `error`.
    Other,
}

impl CtError {
    /// The verdict a packet that could not be tracked is counted under.
    #[inline(always)]
    pub fn verdict(&self) -> Verdict {
        match self {
            CtError::Full => Verdict::CtFull,
            CtError::Other => Verdict::Error,
        }
    }
}

/// The packet's own 5-tuple in direction `dir`.
#[inline(always)]
fn flow_key<A: Copy>(p: &Packet<A>, dir: u8) -> CtKey<A> {
    CtKey { src_addr: p.saddr, dst_addr: p.daddr, src_port: p.sport, dst_port: p.dport, proto: p.proto, dir, _pad: 0 }
}

#[inline(always)]
fn insert<F: Family>(key: &CtKey<F::Addr>, value: &CtValue<F::Addr>, flags: u64) -> Result<(), CtError> {
    F::conntrack()
        .insert(key, value, flags)
        .map_err(|e| if i64::from(e) == -E2BIG { CtError::Full } else { CtError::Other })
}

/// Refresh a tracked entry's timestamp when stale and add `new_flags`. Returns a copy of the
/// entry as it was before this packet. Writes only when something changes, so established
/// flows do not dirty the entry's cache line on every packet.
#[inline(always)]
fn touch<F: Family>(key: &CtKey<F::Addr>, new_flags: u8) -> Option<CtValue<F::Addr>> {
    let ptr = F::conntrack().get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup; a concurrent delete (the agent's
    // GC) can at worst make us read or update an entry that is being freed, of this type.
    unsafe {
        let seen = *ptr;
        let now = bpf_ktime_get_ns();
        if now.wrapping_sub(seen.last_seen) > CT_REFRESH_NS {
            (*ptr).last_seen = now;
        }
        if seen.flags & new_flags != new_flags {
            (*ptr).flags |= new_flags;
        }
        Some(seen)
    }
}

/// Look the packet up: as a reply first when `replies` (the hook sees backends' answers to
/// flows it must translate back), then as the client side of a flow, whose FIN/RST moves
/// it towards closed. The reopen rule lives here, once: a SYN on a tuple whose connection
/// saw a FIN or RST is a new connection (the client reused its port), like Linux conntrack
/// re-opening TIME_WAIT; it first gives back the old connection's reply entry, which for a
/// source-NATed flow is also its SNAT port claim.
#[inline(always)]
pub fn lookup<F: Family>(p: &Packet<F::Addr>, replies: bool) -> Ct<F::Addr> {
    if replies {
        if let Some(v) = reply::<F>(p) {
            return Ct::Reply(v);
        }
    }
    let key = flow_key(p, CT_DIR_FORWARD);
    match touch::<F>(&key, ct::tcp_flags_to_ct(p.tcp_flags, false)) {
        Some(v) if p.tcp_syn() && v.flags & ct_flags::CLOSING != 0 => {
            let _ = F::conntrack().remove(&key.reply_of_forward(&v));
            Ct::New
        }
        Some(v) => Ct::Established(v),
        None => Ct::New,
    }
}

/// A packet from the backend side of a tracked flow (backend -> client). The first reply
/// makes the flow established, a FIN/RST moves it towards closed; both are recorded in the
/// forward entry too, which is the authority on the flow's state (the GC reads it there,
/// and the reopen rule checks it there).
#[inline(always)]
pub fn reply<F: Family>(p: &Packet<F::Addr>) -> Option<CtValue<F::Addr>> {
    let add = ct_flags::SEEN_REPLY | ct::tcp_flags_to_ct(p.tcp_flags, true);
    let key = flow_key(p, CT_DIR_REPLY);
    let rev = touch::<F>(&key, add)?;
    if rev.flags & add != add {
        if let Some(ptr) = F::conntrack().get_ptr_mut(&key.forward_of_reply(&rev)) {
            // SAFETY: pointer from a successful lookup, see `touch`.
            unsafe { (*ptr).flags |= add };
        }
    }
    Some(rev)
}

/// Record both directions of a new DNAT flow: client -> VIP becomes client -> backend, and
/// the backend's replies (backend -> client) get their source put back to VIP:port. The
/// table is never left with half a flow: a failed reply insert takes the forward one back.
#[inline(always)]
pub fn create<F: Family>(
    p: &Packet<F::Addr>,
    svc_id: u32,
    backend_id: u32,
    b: &Backend<F::Addr>,
    now: u64,
) -> Result<(), CtError> {
    let fwd = CtValue { nat_addr: b.addr, nat_port: b.port, backend_id, svc_id, last_seen: now, ..CtValue::default() };
    let fkey = flow_key(p, CT_DIR_FORWARD);
    insert::<F>(&fkey, &fwd, 0)?;
    let rkey = CtKey {
        src_addr: b.addr,
        dst_addr: p.saddr,
        src_port: b.port,
        dst_port: p.sport,
        proto: p.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let rev =
        CtValue { nat_addr: p.daddr, nat_port: p.dport, backend_id, svc_id, last_seen: now, ..CtValue::default() };
    insert::<F>(&rkey, &rev, 0).inspect_err(|_| {
        let _ = F::conntrack().remove(&fkey);
    })
}

/// What a source-NATed flow is created with, besides the packet.
pub struct SnatArgs<'a, A> {
    pub svc_id: u32,
    pub backend_id: u32,
    pub backend: &'a Backend<A>,
    pub snat_addr: A,
}

/// A cheap, well-mixed 32-bit hash of a flow (murmur3's finaliser over a few words): picks
/// SNAT port candidates so different flows spread over the range.
#[inline(always)]
fn mix(a: u32, b: u32, c: u32) -> u32 {
    let mut h = a ^ b.rotate_left(16) ^ c.wrapping_mul(0x9e37_79b1);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Record both directions of a new flow that is DNATed to `b` *and* source-NATed to
/// `snat_addr` (remote backend from outside, or hairpin), allocating the source port.
///
/// The port is claimed by inserting the reply entry (backend -> snat_addr:port) with
/// `BPF_NOEXIST`: a port is only "in use" for one backend ip:port/proto, which is exactly
/// the key's uniqueness, so no separate port table is needed. Returns the port (network
/// byte order); `CtError::Full` when the table is full, `Other` when every candidate was
/// taken or a write failed.
#[inline(always)]
pub fn create_snat<F: Family>(
    p: &Packet<F::Addr>,
    a: &SnatArgs<F::Addr>,
    cfg: &NodeConfig,
    now: u64,
) -> Result<u16, CtError> {
    let (svc_id, backend_id, b, snat_addr) = (a.svc_id, a.backend_id, a.backend, a.snat_addr);
    let range = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    let rev = CtValue {
        nat_addr: p.daddr,
        nat_port: p.dport,
        flags: ct_flags::SNAT,
        snat_addr: p.saddr,
        snat_port: p.sport,
        backend_id,
        svc_id,
        last_seen: now,
        ..CtValue::default()
    };
    let h = mix(F::fold(p.saddr), ((p.sport as u32) << 16) | p.dport as u32, F::fold(b.addr) ^ b.port as u32);
    let mut claimed: Option<(CtKey<F::Addr>, u16)> = None;
    let mut i = 0u32;
    while i < SNAT_TRIES {
        // Stride by an odd multiplier of the attempt so retries do not probe neighbours of
        // an already crowded candidate.
        let candidate = cfg.snat_port_min + (h.wrapping_add(i.wrapping_mul(0x9e37_79b9)) % range) as u16;
        let key = CtKey {
            src_addr: b.addr,
            dst_addr: snat_addr,
            src_port: b.port,
            dst_port: candidate.to_be(),
            proto: p.proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        match insert::<F>(&key, &rev, BPF_NOEXIST as u64) {
            Ok(()) => {
                claimed = Some((key, candidate.to_be()));
                break;
            }
            // No free element: another candidate will not find one either.
            Err(CtError::Full) => return Err(CtError::Full),
            // EEXIST: the port is in use towards this backend; try the next candidate.
            Err(CtError::Other) => {}
        }
        i += 1;
    }
    let Some((rkey, port_be)) = claimed else {
        return Err(CtError::Other);
    };
    let fwd = CtValue {
        nat_addr: b.addr,
        nat_port: b.port,
        flags: ct_flags::SNAT,
        snat_addr,
        snat_port: port_be,
        backend_id,
        svc_id,
        last_seen: now,
        ..CtValue::default()
    };
    insert::<F>(&flow_key(p, CT_DIR_FORWARD), &fwd, 0).inspect_err(|_| {
        let _ = F::conntrack().remove(&rkey);
    })?;
    Ok(port_be)
}
