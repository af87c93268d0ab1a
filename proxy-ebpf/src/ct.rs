//! Conntrack: the state of a flow as its packets see it, and the creation of both entries
//! of a new flow (with the SNAT port claim for source-NATed ones). The lifecycle's states
//! and timeouts are defined in `proxy_common::ct`; the agent's collector expires entries.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use proxy_common::{
    ct, ct_flags, Backend, CtKey, CtValue, NodeConfig, Verdict, CT_DIR_FORWARD, CT_DIR_REPLY,
};

use crate::{maps::CONNTRACK, parse::Packet};

/// What conntrack knows about a packet.
pub enum Ct {
    /// No entry, or a SYN reopening a closed tuple (whose old reply entry and SNAT port have
    /// just been given back): balance afresh.
    New,
    /// A packet from the client side of a tracked flow.
    Established(CtValue),
    /// A packet from the backend side of a tracked flow.
    Reply(CtValue),
}

/// Look the packet up: as a reply first when `replies` (the hook sees backends' answers to
/// flows it must translate back), then as the client side of a flow. The reopen rule lives
/// here, once: a SYN on a tuple whose connection saw a FIN or RST is a new connection (the
/// client reused its port), like Linux conntrack re-opening TIME_WAIT.
#[inline(always)]
pub fn lookup(p: &Packet, replies: bool) -> Ct {
    if replies {
        if let Some(v) = reply(p) {
            return Ct::Reply(v);
        }
    }
    match ct_forward(p) {
        Some(v) if p.tcp_syn() && v.flags & ct_flags::CLOSING != 0 => {
            ct_release_reply(p, &v);
            Ct::New
        }
        Some(v) => Ct::Established(v),
        None => Ct::New,
    }
}

/// SNAT source-port candidates tried per new flow before giving up (bounded for the
/// verifier; with a 4536-port range and a sane number of flows per backend, the first one
/// nearly always wins).
const SNAT_TRIES: u32 = 8;

/// Refresh `last_seen` at most this often, so established flows do not write the shared
/// conntrack cache line on every packet.
const CT_REFRESH_NS: u64 = 1_000_000_000;

/// The packet's own 5-tuple in direction `dir`.
#[inline(always)]
fn flow_key(p: &Packet, dir: u8) -> CtKey {
    CtKey {
        src_addr: p.saddr,
        dst_addr: p.daddr,
        src_port: p.sport,
        dst_port: p.dport,
        proto: p.proto,
        dir,
        _pad: 0,
    }
}

/// Key of the flow this packet opens or continues (client -> VIP).
#[inline(always)]
fn forward_key(p: &Packet) -> CtKey {
    flow_key(p, CT_DIR_FORWARD)
}

/// Key under which a reply to this packet's flow is found: as it arrives, from the side
/// this packet was sent to.
#[inline(always)]
fn reply_key(p: &Packet) -> CtKey {
    flow_key(p, CT_DIR_REPLY)
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

/// `bpf_map_update_elem` on a hash map with no free element left.
const E2BIG: i64 = 7;

#[inline(always)]
fn ct_insert(key: &CtKey, value: &CtValue, flags: u64) -> Result<(), CtError> {
    CONNTRACK.insert(key, value, flags).map_err(|e| if i64::from(e) == -E2BIG { CtError::Full } else { CtError::Other })
}

/// Refresh a tracked entry's timestamp when stale and add `new_flags`. Returns a copy of the
/// entry as it was before this packet. Writes only when something changes, so established
/// flows do not dirty the entry's cache line on every packet.
#[inline(always)]
fn ct_touch(key: &CtKey, new_flags: u8) -> Option<CtValue> {
    let ptr = CONNTRACK.get_ptr_mut(key)?;
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

/// A packet from the client side of a tracked flow (client -> VIP): its FIN/RST moves the
/// flow towards closed.
#[inline(always)]
fn ct_forward(p: &Packet) -> Option<CtValue> {
    ct_touch(&forward_key(p), ct::tcp_flags_to_ct(p.tcp_flags, false))
}

/// A packet from the backend side of a tracked flow (backend -> client). The first reply
/// makes the flow established, a FIN/RST moves it towards closed; both are recorded in the
/// forward entry too, which is the authority on the flow's state (the GC reads it there,
/// and the reopen rule checks it there).
#[inline(always)]
pub fn reply(p: &Packet) -> Option<CtValue> {
    let add = ct_flags::SEEN_REPLY | ct::tcp_flags_to_ct(p.tcp_flags, true);
    let key = reply_key(p);
    let rev = ct_touch(&key, add)?;
    if rev.flags & add != add {
        if let Some(ptr) = CONNTRACK.get_ptr_mut(&key.forward_of_reply(&rev)) {
            // SAFETY: pointer from a successful lookup, see `ct_touch`.
            unsafe { (*ptr).flags |= add };
        }
    }
    Some(rev)
}

/// A reopened flow (a SYN on a tuple whose connection closed) gives back what its previous
/// connection held before it is balanced afresh: the reply entry, which for a source-NATed
/// flow is also the claim on its SNAT port. Without this, every reopen of one tuple leaked
/// a claim on one of the tuple's few SNAT port candidates until none was left.
#[inline(always)]
fn ct_release_reply(p: &Packet, old: &CtValue) {
    let _ = CONNTRACK.remove(&forward_key(p).reply_of_forward(old));
}

/// Record both directions of a new DNAT flow: client -> VIP becomes client -> backend, and
/// the backend's replies (backend -> client) get their source put back to VIP:port. The
/// table is never left with half a flow: a failed reply insert takes the forward one back.
#[inline(always)]
pub fn create(p: &Packet, svc_id: u32, backend_id: u32, b: &Backend, now: u64) -> Result<(), CtError> {
    let fwd = CtValue {
        nat_addr: b.addr,
        nat_port: b.port,
        backend_id,
        svc_id,
        last_seen: now,
        ..CtValue::default()
    };
    let fkey = forward_key(p);
    ct_insert(&fkey, &fwd, 0)?;
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
    ct_insert(&rkey, &rev, 0).inspect_err(|_| {
        let _ = CONNTRACK.remove(&fkey);
    })
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
pub fn create_snat(
    p: &Packet,
    svc_id: u32,
    backend_id: u32,
    b: &Backend,
    snat_addr: u32,
    cfg: &NodeConfig,
    now: u64,
) -> Result<u16, CtError> {
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
    let h = mix(p.saddr, ((p.sport as u32) << 16) | p.dport as u32, b.addr ^ b.port as u32);
    let mut claimed: Option<(CtKey, u16)> = None;
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
        match ct_insert(&key, &rev, BPF_NOEXIST as u64) {
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
    ct_insert(&forward_key(p), &fwd, 0).inspect_err(|_| {
        let _ = CONNTRACK.remove(&rkey);
    })?;
    Ok(port_be)
}
