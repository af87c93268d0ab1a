//! Conntrack: the state of a flow as its packets see it, and the creation of both entries
//! of a new flow (with the SNAT port claim for source-NATed ones). The lifecycle's states
//! and timeouts are defined in `proxy_common::ct`; the agent's collector expires entries.
//! Generic over the address family: IPv4 and IPv6 each have their own table.
use core::mem::size_of;

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

/// What conntrack knows about a packet. For `Established` and `Reply` the entry (as it was
/// before this packet) is in `CtWork::val`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ct {
    /// No entry, or a SYN reopening a closed tuple (whose old reply entry and SNAT port have
    /// just been given back): balance afresh.
    New,
    /// A packet from the client side of a tracked flow.
    Established,
    /// A packet from the backend side of a tracked flow.
    Reply,
}

/// Working memory for one conntrack step: the key being looked up or inserted and the
/// entry read or written. The caller provides it (IPv4: on its stack; IPv6: in a per-CPU
/// map, because two 40-byte keys and 56-byte values per step do not fit the verifier's
/// 512-byte stack next to everything else), and map helpers take pointers into it.
#[derive(Clone, Copy, Default)]
pub struct CtWork<A> {
    pub key: CtKey<A>,
    pub val: CtValue<A>,
}

impl<A> CtWork<A> {
    /// Zero `slot` in place and hand it out. Not `Default`: LLVM turns a zeroed struct into
    /// a `memset` call, which the BPF backend cannot inline — a byte-by-byte loop that cost
    /// IPv4 about 25 ns on every packet. Volatile 64-bit stores, so they are not merged back
    /// into one, written where the value lives, so no copy follows.
    #[inline(always)]
    pub fn zeroed_in(slot: &mut core::mem::MaybeUninit<Self>) -> &mut Self {
        const { assert!(size_of::<Self>() % 8 == 0) };
        let words = slot.as_mut_ptr() as *mut u64;
        let mut i = 0;
        while i < size_of::<Self>() / 8 {
            // SAFETY: within the value (size checked above), 8-byte aligned (it holds a u64).
            unsafe { words.add(i).write_volatile(0) };
            i += 1;
        }
        // SAFETY: every byte was written; the type is plain integers.
        unsafe { slot.assume_init_mut() }
    }
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

/// Insert `w.val` under `w.key`.
#[inline(always)]
fn insert<F: Family>(w: &CtWork<F::Addr>, flags: u64) -> Result<(), CtError> {
    F::conntrack()
        .insert(&w.key, &w.val, flags)
        .map_err(|e| if i64::from(e) == -E2BIG { CtError::Full } else { CtError::Other })
}

/// Refresh the entry under `w.key` (timestamp when stale) and add `new_flags`; copies the
/// entry as it was before this packet to `w.val`. Writes only when something changes, so
/// established flows do not dirty the entry's cache line on every packet.
#[inline(always)]
fn touch<F: Family>(w: &mut CtWork<F::Addr>, new_flags: u8) -> bool {
    let Some(ptr) = F::conntrack().get_ptr_mut(&w.key) else {
        return false;
    };
    // SAFETY: the pointer comes from a successful lookup; a concurrent delete (the agent's
    // GC) can at worst make us read or update an entry that is being freed, of this type.
    unsafe {
        // A typed copy here becomes a `memmove` call (not inlined on BPF); this is a `memcpy`,
        // which the BPF backend expands into loads and stores.
        core::ptr::copy_nonoverlapping(ptr, &mut w.val, 1);
        let now = bpf_ktime_get_ns();
        if now.wrapping_sub(w.val.last_seen) > CT_REFRESH_NS {
            (*ptr).last_seen = now;
        }
        if w.val.flags & new_flags != new_flags {
            (*ptr).flags |= new_flags;
        }
    }
    true
}

/// Look the packet up: as a reply first when `replies` (the hook sees backends' answers to
/// flows it must translate back), then as the client side of a flow, whose FIN/RST moves
/// it towards closed. The reopen rule lives here, once: a SYN on a tuple whose connection
/// saw a FIN or RST is a new connection (the client reused its port), like Linux conntrack
/// re-opening TIME_WAIT; it first gives back the old connection's reply entry, which for a
/// source-NATed flow is also its SNAT port claim.
#[inline(always)]
fn lookup_body<F: Family>(p: &Packet<F::Addr>, replies: bool, w: &mut CtWork<F::Addr>) -> Ct {
    if replies && reply::<F>(p, w) {
        return Ct::Reply;
    }
    w.key = flow_key(p, CT_DIR_FORWARD);
    if !touch::<F>(w, ct::tcp_flags_to_ct(p.tcp_flags, false)) {
        return Ct::New;
    }
    if p.tcp_syn() && w.val.flags & ct_flags::CLOSING != 0 {
        w.key = w.key.reply_of_forward(&w.val);
        let _ = F::conntrack().remove(&w.key);
        return Ct::New;
    }
    Ct::Established
}

/// A packet from the backend side of a tracked flow (backend -> client). The first reply
/// makes the flow established, a FIN/RST moves it towards closed; both are recorded in the
/// forward entry too, which is the authority on the flow's state (the GC reads it there,
/// and the reopen rule checks it there).
/// The reply entry is left in `w.val`.
#[inline(always)]
pub fn reply<F: Family>(p: &Packet<F::Addr>, w: &mut CtWork<F::Addr>) -> bool {
    let add = ct_flags::SEEN_REPLY | ct::tcp_flags_to_ct(p.tcp_flags, true);
    w.key = flow_key(p, CT_DIR_REPLY);
    if !touch::<F>(w, add) {
        return false;
    }
    if w.val.flags & add != add {
        w.key = w.key.forward_of_reply(&w.val);
        if let Some(ptr) = F::conntrack().get_ptr_mut(&w.key) {
            // SAFETY: pointer from a successful lookup, see `touch`.
            unsafe { (*ptr).flags |= add };
        }
    }
    true
}

/// Record both directions of a new DNAT flow: client -> VIP becomes client -> backend, and
/// the backend's replies (backend -> client) get their source put back to VIP:port. The
/// table is never left with half a flow: a failed reply insert takes the forward one back.
#[inline(always)]
fn create_body<F: Family>(p: &Packet<F::Addr>, f: &NewFlow<F::Addr>, w: &mut CtWork<F::Addr>) -> Result<(), CtError> {
    let b = f.backend;
    let (backend_id, svc_id, last_seen) = (f.backend_id, f.svc_id, f.now);
    w.val = CtValue { nat_addr: b.addr, nat_port: b.port, backend_id, svc_id, last_seen, ..CtValue::default() };
    w.key = flow_key(p, CT_DIR_FORWARD);
    insert::<F>(w, 0)?;
    w.key = CtKey {
        src_addr: b.addr,
        dst_addr: p.saddr,
        src_port: b.port,
        dst_port: p.sport,
        proto: p.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    w.val.nat_addr = p.daddr;
    w.val.nat_port = p.dport;
    insert::<F>(w, 0).inspect_err(|_| {
        w.key = flow_key(p, CT_DIR_FORWARD);
        let _ = F::conntrack().remove(&w.key);
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
fn create_snat_body<F: Family>(
    p: &Packet<F::Addr>,
    a: &NewFlow<F::Addr>,
    cfg: &NodeConfig,
    w: &mut CtWork<F::Addr>,
) -> Result<u16, CtError> {
    let (b, now) = (a.backend, a.now);
    let range = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    w.val = CtValue {
        nat_addr: p.daddr,
        nat_port: p.dport,
        flags: ct_flags::SNAT,
        snat_addr: p.saddr,
        snat_port: p.sport,
        backend_id: a.backend_id,
        svc_id: a.svc_id,
        last_seen: now,
        ..CtValue::default()
    };
    w.key = CtKey {
        src_addr: b.addr,
        dst_addr: a.snat_addr,
        src_port: b.port,
        dst_port: 0,
        proto: p.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let h = mix(F::fold(p.saddr), ((p.sport as u32) << 16) | p.dport as u32, F::fold(b.addr) ^ b.port as u32);
    let mut claimed: Option<u16> = None;
    let mut i = 0u32;
    while i < SNAT_TRIES {
        // Stride by an odd multiplier of the attempt so retries do not probe neighbours of
        // an already crowded candidate.
        let candidate = cfg.snat_port_min + (h.wrapping_add(i.wrapping_mul(0x9e37_79b9)) % range) as u16;
        w.key.dst_port = candidate.to_be();
        match insert::<F>(w, BPF_NOEXIST as u64) {
            Ok(()) => {
                claimed = Some(candidate.to_be());
                break;
            }
            // No free element: another candidate will not find one either.
            Err(CtError::Full) => return Err(CtError::Full),
            // EEXIST: the port is in use towards this backend; try the next candidate.
            Err(CtError::Other) => {}
        }
        i += 1;
    }
    let Some(port_be) = claimed else {
        return Err(CtError::Other);
    };
    // `w.key` is the claimed reply key until the forward insert is done.
    let rkey_port = w.key.dst_port;
    w.val = CtValue {
        nat_addr: b.addr,
        nat_port: b.port,
        flags: ct_flags::SNAT,
        snat_addr: a.snat_addr,
        snat_port: port_be,
        backend_id: a.backend_id,
        svc_id: a.svc_id,
        last_seen: now,
        ..CtValue::default()
    };
    w.key = flow_key(p, CT_DIR_FORWARD);
    insert::<F>(w, 0).inspect_err(|_| {
        w.key = CtKey {
            src_addr: b.addr,
            dst_addr: a.snat_addr,
            src_port: b.port,
            dst_port: rkey_port,
            proto: p.proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        let _ = F::conntrack().remove(&w.key);
    })?;
    Ok(port_be)
}

/// A new flow's facts, travelling together (a BPF function takes at most five arguments).
pub struct NewFlow<'a, A> {
    pub svc_id: u32,
    pub backend_id: u32,
    pub backend: &'a Backend<A>,
    /// The source address of a source-NATed flow (`create_snat`; unused by `create`).
    pub snat_addr: A,
    pub now: u64,
}

// The entry points: inlined for IPv4, BPF functions of their own for IPv6 (see
// `Family::OUTLINE`); the constant condition leaves only one of the two in each
// instantiation.

#[inline(never)]
fn lookup_outlined<F: Family>(p: &Packet<F::Addr>, replies: bool, w: &mut CtWork<F::Addr>) -> Ct {
    lookup_body::<F>(p, replies, w)
}

#[inline(always)]
pub fn lookup<F: Family>(p: &Packet<F::Addr>, replies: bool, w: &mut CtWork<F::Addr>) -> Ct {
    if F::OUTLINE { lookup_outlined::<F>(p, replies, w) } else { lookup_body::<F>(p, replies, w) }
}

#[inline(never)]
fn create_outlined<F: Family>(
    p: &Packet<F::Addr>,
    f: &NewFlow<F::Addr>,
    w: &mut CtWork<F::Addr>,
) -> Result<(), CtError> {
    create_body::<F>(p, f, w)
}

#[inline(always)]
pub fn create<F: Family>(p: &Packet<F::Addr>, f: &NewFlow<F::Addr>, w: &mut CtWork<F::Addr>) -> Result<(), CtError> {
    if F::OUTLINE { create_outlined::<F>(p, f, w) } else { create_body::<F>(p, f, w) }
}

#[inline(never)]
fn create_snat_outlined<F: Family>(
    p: &Packet<F::Addr>,
    f: &NewFlow<F::Addr>,
    cfg: &NodeConfig,
    w: &mut CtWork<F::Addr>,
) -> Result<u16, CtError> {
    create_snat_body::<F>(p, f, cfg, w)
}

#[inline(always)]
pub fn create_snat<F: Family>(
    p: &Packet<F::Addr>,
    f: &NewFlow<F::Addr>,
    cfg: &NodeConfig,
    w: &mut CtWork<F::Addr>,
) -> Result<u16, CtError> {
    if F::OUTLINE { create_snat_outlined::<F>(p, f, cfg, w) } else { create_snat_body::<F>(p, f, cfg, w) }
}
