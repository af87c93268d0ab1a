//! Conntrack: the state of a flow as its packets see it, and the creation of both entries
//! of a new flow (with the SNAT port claim for source-NATed ones). The lifecycle's states
//! and timeouts are defined in `proxy_common::ct`; the agent's collector expires entries.
//! Generic over the address family: IPv4 and IPv6 each have their own tables.
//!
//! Two tables per family, netfilter's early drop in BPF terms: every flow starts unassured
//! in `CT_NEW` (an LRU) and moves to `CONNTRACK` (never evicts) once it is assured: the TCP
//! handshake completed with the right acknowledgement number, or a UDP flow became a
//! stream. A flood of half-open or one-shot flows can only push other unassured flows out
//! of the LRU; established connections are out of its reach.
//!
//! Anti-spoofing: each entry remembers where its direction's packets come from (`ifindex`)
//! and, for TCP, how far its sequence numbers went (`seq_end`). A packet of a tracked flow
//! arriving on another interface, or a RST/FIN outside the window, is `Ct::Invalid`: it
//! changes nothing and gets no translation (the pipeline drops it, as kube-proxy drops
//! netfilter's INVALID).
use core::mem::size_of;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use proxy_common::{
    Backend, CT_DIR_FORWARD, CT_DIR_REPLY, CtKey, CtValue, NodeConfig, PROTO_TCP, Verdict,
    ct::{self, seq_near},
    ct_flags,
};

use crate::{
    family::Family,
    hdr::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    parse::Packet,
};

/// SNAT source-port candidates tried per new flow before giving up (bounded for the
/// verifier). Each is checked against both tables, so a port is unique per backend
/// ip:port/proto; with 28,976 ports (the default range) 32 hashed tries still find a free
/// port when the range towards one backend is 70% used (0.7^32 = 1e-5).
const SNAT_TRIES: u32 = 32;

/// Refresh `last_seen` at most this often, so established flows do not write the shared
/// conntrack cache line on every packet.
const CT_REFRESH_NS: u64 = 1_000_000_000;

/// `bpf_map_update_elem` on a hash map with no free element left.
const E2BIG: i64 = 7;

/// What conntrack knows about a packet. For `Established` and `Reply` the entry (as it was
/// before this packet) is in `CtWork::val`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ct {
    /// No entry, or a SYN reopening a closed tuple (whose old entries, and SNAT port, have
    /// just been given back): balance afresh.
    New,
    /// A packet from the client side of a tracked flow.
    Established,
    /// A packet from the backend side of a tracked flow.
    Reply,
    /// A packet of a tracked flow from the wrong side, or a RST/FIN out of the window:
    /// dropped, the flow untouched.
    Invalid,
}

/// Working memory for one conntrack step: the key being looked up or inserted, its
/// partner's key, and the entry read or written. The caller provides it (IPv4: on its
/// stack; IPv6: in a per-CPU map, because 40-byte keys and 72-byte values do not fit the
/// verifier's 512-byte stack next to everything else), and map helpers take pointers into
/// it.
#[derive(Clone, Copy, Default)]
pub struct CtWork<A> {
    pub key: CtKey<A>,
    pub key2: CtKey<A>,
    pub val: CtValue<A>,
}

impl<A> CtWork<A> {
    /// Zero `slot` in place and hand it out. Not `Default`: LLVM turns a zeroed struct into
    /// a `memset` call, which the BPF backend cannot inline — a byte-by-byte loop that cost
    /// IPv4 about 25 ns on every packet. Volatile 64-bit stores, so they are not merged back
    /// into one, written where the value lives, so no copy follows.
    #[inline(always)]
    pub fn zeroed_in(slot: &mut core::mem::MaybeUninit<Self>) -> &mut Self {
        const { assert!(size_of::<Self>().is_multiple_of(8)) };
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
    /// The flow's reply tuple is another live flow's: counted `ct_clash`.
    Clash,
    /// Any other map failure (or every SNAT port candidate taken): counted `error`.
    Other,
}

impl CtError {
    /// The verdict a packet that could not be tracked is counted under.
    #[inline(always)]
    pub fn verdict(&self) -> Verdict {
        match self {
            CtError::Full => Verdict::CtFull,
            CtError::Clash => Verdict::CtClash,
            CtError::Other => Verdict::Error,
        }
    }
}

/// The datapath's clock: CLOCK_MONOTONIC at tick resolution (1-4 ms), the clock the
/// agent's collector reads (`CLOCK_MONOTONIC`; the coarse reading lags it by under a tick).
/// Every timestamp it feeds is kept in milliseconds or judged against timeouts of seconds,
/// where the precise reading costs a read of the clock source (a TSC read, more in a VM)
/// on every packet of a flow. Kernel 5.11+.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The packet's own 5-tuple in direction `dir`.
#[inline(always)]
fn flow_key<A: Copy>(p: &Packet<A>, dir: u8) -> CtKey<A> {
    CtKey { src_addr: p.saddr, dst_addr: p.daddr, src_port: p.sport, dst_port: p.dport, proto: p.proto, dir, _pad: 0 }
}

#[inline(always)]
fn map_err(e: i32) -> CtError {
    if i64::from(e) == -E2BIG { CtError::Full } else { CtError::Other }
}

/// An entry found in one of the two tables: a pointer into the map, and whether it is the
/// assured table.
type Entry<A> = (*mut CtValue<A>, bool);

/// The entry under `key` in either table: a pointer into the map and whether it is the
/// assured table. The assured table first: that is where an established flow's packets
/// find their entry with one lookup.
#[inline(always)]
fn find<F: Family>(key: &CtKey<F::Addr>) -> Option<Entry<F::Addr>> {
    if let Some(ptr) = F::conntrack().get_ptr_mut(key) {
        return Some((ptr, true));
    }
    F::ct_new().get_ptr_mut(key).map(|ptr| (ptr, false))
}

/// A copy of the entry under `key` in either table (ICMP errors read their flow with it).
#[inline(always)]
pub fn get<F: Family>(key: &CtKey<F::Addr>) -> Option<CtValue<F::Addr>> {
    // SAFETY: a pointer from a successful lookup, read at once (see `refresh`).
    find::<F>(key).map(|(ptr, _)| unsafe { *ptr })
}

/// Remove `key` from whichever table holds it.
#[inline(always)]
fn remove<F: Family>(key: &CtKey<F::Addr>, assured: bool) {
    let _ = if assured { F::conntrack().remove(key) } else { F::ct_new().remove(key) };
}

/// Remove the reply entry under `w.key2` if it is the partner of the forward entry
/// `w.key` (a reply tuple may be another flow's: never deleted on this flow's behalf).
#[inline(always)]
fn remove_partner<F: Family>(w: &CtWork<F::Addr>) {
    if let Some((ptr, assured)) = find::<F>(&w.key2) {
        // SAFETY: a pointer from a successful lookup (see `refresh`).
        if w.key.reply_belongs(unsafe { &*ptr }) {
            remove::<F>(&w.key2, assured);
        }
    }
}

/// Is a packet seen at `ifindex` on the side the entry's direction comes from? 0 (either
/// side) means unknown: a reply entry before the first answer, a packet whose interface
/// the hook cannot tell (a local process's reply at TC egress).
#[inline(always)]
fn side_ok(stored: u32, ifindex: u32) -> bool {
    stored == 0 || ifindex == 0 || stored == ifindex
}

/// The packet's own entry in direction `dir`: its key left in `w.key`, a copy in `w.val`,
/// and a pointer into whichever table holds it (`Ok(None)`: no entry; `Err(())`: there is
/// one, but the packet was seen on another side than the direction's, see `side_ok`).
#[inline(always)]
fn own_entry<F: Family>(
    p: &Packet<F::Addr>,
    dir: u8,
    ifindex: u32,
    w: &mut CtWork<F::Addr>,
) -> Result<Option<Entry<F::Addr>>, ()> {
    w.key = flow_key(p, dir);
    let Some((ptr, assured)) = find::<F>(&w.key) else {
        return Ok(None);
    };
    // SAFETY: pointer from a successful lookup (see `refresh`). A typed copy here becomes a
    // `memmove` call (not inlined on BPF); this is a `memcpy`, which the BPF backend
    // expands into loads and stores.
    unsafe { core::ptr::copy_nonoverlapping(ptr, &mut w.val, 1) };
    if side_ok(w.val.ifindex, ifindex) { Ok(Some((ptr, assured))) } else { Err(()) }
}

/// Where the direction's sequence numbers stand after this packet: moved forward only by a
/// segment that starts no more than `SEQ_ADVANCE` ahead of the current end, so a spoofed
/// segment far away cannot move the window to where a spoofed RST would land.
#[inline(always)]
fn seq_after<A>(p: &Packet<A>, end: u32, known: bool) -> u32 {
    let new_end = p.seq.wrapping_add(p.seg_len);
    if !known {
        return new_end;
    }
    let starts_within = (p.seq.wrapping_sub(end) as i32) <= ct::SEQ_ADVANCE as i32;
    if starts_within && (new_end.wrapping_sub(end) as i32) > 0 { new_end } else { end }
}

/// Write what this packet changes into the entry at `ptr` (`old` is the entry as read):
/// the flags, the sequence end, the interface when learnt, the timestamp when stale. Only
/// the fields that change are written, so established flows do not dirty the entry's
/// cache line on every packet.
#[inline(always)]
fn refresh<A>(ptr: *mut CtValue<A>, old: &CtValue<A>, flags: u8, seq_end: u32, ifindex: u32, now: u64) {
    // SAFETY: the pointer comes from a successful lookup; a concurrent delete (the agent's
    // GC, an LRU eviction) can at worst make us update an entry that is being freed, of
    // this type.
    unsafe {
        if now.wrapping_sub(old.last_seen) > CT_REFRESH_NS {
            (*ptr).last_seen = now;
        }
        if old.flags != flags {
            (*ptr).flags = flags;
        }
        if old.seq_end != seq_end || old.seq_flags != 0 {
            (*ptr).seq_end = seq_end;
            (*ptr).seq_flags = 0;
        }
        if old.ifindex == 0 && ifindex != 0 {
            (*ptr).ifindex = ifindex;
        }
    }
}

/// Move the flow whose forward key is `fwd` and reply key `rev` (both in `CT_NEW`) to the
/// assured table: reply entry first, then the forward one (a lookup in between finds the
/// flow in one table or the other, whole), then out of the LRU. If the assured table has no
/// room, or the reply tuple is already an assured flow's, the flow stays where it is with
/// `ASSURED` set, and the next packet tries again.
#[inline(always)]
fn promote<F: Family>(fwd: &CtKey<F::Addr>, rev: &CtKey<F::Addr>) {
    let (Some(fptr), Some(rptr)) = (F::ct_new().get_ptr_mut(fwd), F::ct_new().get_ptr_mut(rev)) else {
        return;
    };
    // SAFETY: pointers from successful lookups (see `refresh`); the map helpers read the
    // values they point to.
    unsafe {
        if !fwd.reply_belongs(&*rptr) {
            return;
        }
        (*fptr).flags |= ct_flags::ASSURED;
        (*rptr).flags |= ct_flags::ASSURED;
        if F::conntrack().insert(rev, &*rptr, BPF_NOEXIST as u64).is_err() {
            return;
        }
        if F::conntrack().insert(fwd, &*fptr, BPF_NOEXIST as u64).is_err() {
            let _ = F::conntrack().remove(rev);
            return;
        }
    }
    let _ = F::ct_new().remove(fwd);
    let _ = F::ct_new().remove(rev);
}

/// Does this forward TCP segment complete the handshake (or, for a flow picked up
/// mid-stream, show data flowing both ways)? A plain ACK after the backend answered whose
/// acknowledgement number the backend's side has actually sent: a blind ACK from a spoofed
/// source cannot know it.
#[inline(always)]
fn tcp_assures<A>(p: &Packet<A>, flags: u8, rev_end: u32, rev_known: bool) -> bool {
    let plain_ack = p.tcp_flags & (TCP_ACK | TCP_SYN | TCP_RST) == TCP_ACK;
    let d = rev_end.wrapping_sub(p.ack) as i32;
    plain_ack && flags & ct_flags::SEEN_REPLY != 0 && rev_known && d >= 0 && d <= ct::SEQ_SLACK as i32
}

/// A UDP (or SCTP) flow is a stream once traffic follows a reply, 2 s or more after its
/// first packet (netfilter's rule: two queries and two answers in a row stay unassured).
#[inline(always)]
fn udp_assures<A>(v: &CtValue<A>, now: u64) -> bool {
    v.flags & ct_flags::SEEN_REPLY != 0 && ct::coarse_ms(now).wrapping_sub(v.created) >= ct::UDP_STREAM_AFTER
}

/// A packet from the client side of a flow: `Established`, `Invalid`, or `New` (no entry,
/// or the reopen rule: a SYN on a tuple whose connection saw a FIN or RST is a new
/// connection, like Linux conntrack re-opening TIME_WAIT; the old entries are given back
/// first, which for a source-NATed flow is also its SNAT port claim).
#[inline(always)]
fn forward<F: Family>(p: &Packet<F::Addr>, ifindex: u32, w: &mut CtWork<F::Addr>) -> Ct {
    let (ptr, assured) = match own_entry::<F>(p, CT_DIR_FORWARD, ifindex, w) {
        Ok(Some(found)) => found,
        Ok(None) => return Ct::New,
        Err(()) => return Ct::Invalid,
    };
    let tcp = p.proto == PROTO_TCP;
    if tcp && p.tcp_syn() && w.val.flags & ct_flags::CLOSING != 0 {
        w.key2 = w.key.reply_of_forward(&w.val);
        remove_partner::<F>(w);
        remove::<F>(&w.key, assured);
        return Ct::New;
    }
    let known = w.val.seq_flags & ct::SEQ_UNKNOWN == 0;
    if tcp && known && p.tcp_flags & (TCP_RST | TCP_FIN) != 0 && !seq_near(p.seq, w.val.seq_end) {
        return Ct::Invalid;
    }
    let flags = w.val.flags | ct::tcp_flags_to_ct(p.tcp_flags, false);
    let seq_end = if tcp { seq_after(p, w.val.seq_end, known) } else { 0 };
    let now = now();
    refresh(ptr, &w.val, flags, seq_end, ifindex, now);
    if !assured {
        w.key2 = w.key.reply_of_forward(&w.val);
        let ready = if flags & ct_flags::ASSURED != 0 {
            // Assured already, not moved yet (the assured table was full): try again.
            true
        } else if tcp {
            // SAFETY: pointer from a successful lookup, read at once (see `refresh`).
            let rev = F::ct_new().get_ptr_mut(&w.key2).map(|r| unsafe { ((*r).seq_end, (*r).flags) });
            rev.is_some_and(|(end, rflags)| tcp_assures(p, flags, end, rflags & ct_flags::SEEN_REPLY != 0))
        } else {
            udp_assures(&w.val, now)
        };
        if ready {
            promote::<F>(&w.key, &w.key2);
        }
    }
    Ct::Established
}

/// A packet from the backend side of a tracked flow (backend -> client): `Reply`,
/// `Invalid`, or `New` when it is none. The first reply records where the backend answers
/// from and its sequence numbers; the flow's state changes (reply seen, FIN, RST) are
/// recorded in the forward entry too, which is the authority on the flow's state (the GC
/// reads it there, and the reopen rule checks it there). The reply entry is left in `w.val`.
#[inline(always)]
fn reply_body<F: Family>(p: &Packet<F::Addr>, ifindex: u32, w: &mut CtWork<F::Addr>) -> Ct {
    let (ptr, assured) = match own_entry::<F>(p, CT_DIR_REPLY, ifindex, w) {
        Ok(Some(found)) => found,
        Ok(None) => return Ct::New,
        Err(()) => return Ct::Invalid,
    };
    let tcp = p.proto == PROTO_TCP;
    let known = w.val.flags & ct_flags::SEEN_REPLY != 0 && w.val.seq_flags & ct::SEQ_UNKNOWN == 0;
    w.key2 = w.key.forward_of_reply(&w.val);
    if tcp && p.tcp_flags & (TCP_RST | TCP_FIN) != 0 {
        let ok = if w.val.seq_flags & ct::SEQ_UNKNOWN != 0 {
            true
        } else if known {
            seq_near(p.seq, w.val.seq_end)
        } else {
            // The backend's first word is a RST (nothing listens) or FIN: it must
            // acknowledge what the client sent, as a reset of a SYN does.
            // SAFETY: pointer from a successful lookup, read at once.
            let fwd_end = find::<F>(&w.key2).map(|(f, _)| unsafe { (*f).seq_end });
            p.tcp_flags & TCP_ACK != 0 && fwd_end == Some(p.ack)
        };
        if !ok {
            return Ct::Invalid;
        }
    }
    let add = ct_flags::SEEN_REPLY | ct::tcp_flags_to_ct(p.tcp_flags, true);
    let seq_end = if tcp { seq_after(p, w.val.seq_end, known) } else { 0 };
    let now = now();
    refresh(ptr, &w.val, w.val.flags | add, seq_end, ifindex, now);
    if w.val.flags & add != add
        && let Some((fptr, _)) = find::<F>(&w.key2)
    {
        // SAFETY: pointer from a successful lookup, see `refresh`.
        unsafe { (*fptr).flags |= add };
    }
    if !assured && !tcp && w.val.flags & ct_flags::ASSURED == 0 && udp_assures(&w.val, now) {
        promote::<F>(&w.key2, &w.key);
    }
    Ct::Reply
}

/// Look the packet up: as a reply first when `replies` (the hook sees backends' answers to
/// flows it must translate back), then as the client side of a flow. `ifindex` is where
/// the packet was seen (`IFINDEX_UPLINK` on an uplink).
#[inline(always)]
fn lookup_body<F: Family>(p: &Packet<F::Addr>, replies: bool, ifindex: u32, w: &mut CtWork<F::Addr>) -> Ct {
    if replies {
        match reply_body::<F>(p, ifindex, w) {
            Ct::New => {}
            r => return r,
        }
    }
    forward::<F>(p, ifindex, w)
}

/// Insert the reply entry `w.key` -> `w.val` of the new flow of packet `p`, never over
/// another flow's: a reply tuple held by a live flow (in either table) is a clash. One whose
/// forward entry is gone (an LRU eviction took it), or that was this very tuple's (its
/// forward entry was evicted and is being re-created now), is stale and replaced. So is a
/// closed TCP flow's (FIN both ways, or a RST: netfilter's TIME_WAIT and CLOSE): like
/// netfilter's NAT, which evicts such a conntrack when a new connection needs its tuple,
/// since a client reuses its source port towards another service on the same backend.
#[inline(always)]
fn insert_reply<F: Family>(p: &Packet<F::Addr>, w: &mut CtWork<F::Addr>) -> Result<(), CtError> {
    if let Some((ptr, held_assured)) = find::<F>(&w.key) {
        // SAFETY: pointer from a successful lookup, read at once (see `refresh`).
        let held = unsafe { *ptr };
        w.key2 = w.key.forward_of_reply(&held);
        let k = &w.key2;
        let ours = k.src_addr == p.saddr && k.src_port == p.sport && k.dst_addr == p.daddr && k.dst_port == p.dport;
        if !ours && let Some((fptr, fwd_assured)) = find::<F>(&w.key2) {
            // SAFETY: as above.
            let flags = unsafe { (*fptr).flags };
            if ct::state(p.proto, flags) != ct::CtState::Closed {
                return Err(CtError::Clash);
            }
            remove::<F>(&w.key2, fwd_assured);
        }
        // A stale entry left in the assured table would shadow the new one (lookups read
        // that table first).
        if held_assured {
            remove::<F>(&w.key, true);
        }
    }
    F::ct_new().insert(&w.key, &w.val, 0).map_err(map_err)
}

/// Record both directions of a new DNAT flow: client -> VIP becomes client -> backend, and
/// the backend's replies (backend -> client) get their source put back to VIP:port. The
/// table is never left with half a flow: a failed reply insert takes the forward one back.
#[inline(always)]
fn create_body<F: Family>(p: &Packet<F::Addr>, f: &NewFlow<F::Addr>, w: &mut CtWork<F::Addr>) -> Result<(), CtError> {
    let b = f.backend;
    w.val = new_value(p, f, b.addr, b.port, 0);
    w.key = flow_key(p, CT_DIR_FORWARD);
    F::ct_new().insert(&w.key, &w.val, 0).map_err(map_err)?;
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
    w.val.ifindex = f.reply_ifindex;
    w.val.seq_end = 0;
    insert_reply::<F>(p, w).inspect_err(|_| {
        w.key = flow_key(p, CT_DIR_FORWARD);
        let _ = F::ct_new().remove(&w.key);
    })
}

/// A new flow's forward entry value (the reply entry is derived from it by its creator).
#[inline(always)]
fn new_value<A: Copy + Default>(p: &Packet<A>, f: &NewFlow<A>, nat_addr: A, nat_port: u16, flags: u8) -> CtValue<A> {
    let syn = if p.tcp_syn() { ct_flags::SYN } else { 0 };
    CtValue {
        nat_addr,
        nat_port,
        flags: flags | syn,
        backend_id: f.backend_id,
        svc_id: f.svc_id,
        last_seen: f.now,
        ifindex: f.ifindex,
        seq_end: if p.proto == PROTO_TCP { p.seq.wrapping_add(p.seg_len) } else { 0 },
        created: ct::coarse_ms(f.now),
        dsr: f.dsr,
        ..CtValue::default()
    }
}

/// A cheap, well-mixed 32-bit hash of a flow (murmur3's finaliser over a few words): picks
/// SNAT port candidates so different flows spread over the range.
#[inline(always)]
fn mix(a: u32, b: u32, c: u32) -> u32 {
    proxy_common::flow_hash::fmix32(a ^ b.rotate_left(16) ^ c.wrapping_mul(0x9e37_79b1))
}

/// Record both directions of a new flow that is DNATed to `b` *and* source-NATed to
/// `snat_addr` (remote backend from outside, or hairpin), allocating the source port.
///
/// The port is claimed by inserting the reply entry (backend -> snat_addr:port) with
/// `BPF_NOEXIST` after checking the assured table does not hold it: a port is only "in
/// use" for one backend ip:port/proto, which is exactly the key's uniqueness, so no
/// separate port table is needed. Returns the port (network byte order); `CtError::Full`
/// when the table is full, `Other` when every candidate was taken or a write failed.
#[inline(always)]
fn create_snat_body<F: Family>(
    p: &Packet<F::Addr>,
    a: &NewFlow<F::Addr>,
    cfg: &NodeConfig,
    w: &mut CtWork<F::Addr>,
) -> Result<u16, CtError> {
    let b = a.backend;
    let range = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    w.val = new_value(p, a, p.daddr, p.dport, ct_flags::SNAT);
    w.val.snat_addr = p.saddr;
    w.val.snat_port = p.sport;
    w.val.ifindex = a.reply_ifindex;
    w.val.seq_end = 0;
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
        if F::conntrack().get_ptr(&w.key).is_none() {
            match F::ct_new().insert(&w.key, &w.val, BPF_NOEXIST as u64).map_err(map_err) {
                Ok(()) => {
                    claimed = Some(candidate.to_be());
                    break;
                }
                // No free element: another candidate will not find one either.
                Err(CtError::Full) => return Err(CtError::Full),
                // EEXIST: the port is in use towards this backend; try the next candidate.
                Err(_) => {}
            }
        }
        i += 1;
    }
    let Some(port_be) = claimed else {
        return Err(CtError::Other);
    };
    // `w.key` is the claimed reply key until the forward insert is done.
    let rkey_port = w.key.dst_port;
    w.val = new_value(p, a, b.addr, b.port, ct_flags::SNAT);
    w.val.snat_addr = a.snat_addr;
    w.val.snat_port = port_be;
    w.key = flow_key(p, CT_DIR_FORWARD);
    F::ct_new().insert(&w.key, &w.val, 0).map_err(map_err).inspect_err(|_| {
        w.key = CtKey {
            src_addr: b.addr,
            dst_addr: a.snat_addr,
            src_port: b.port,
            dst_port: rkey_port,
            proto: p.proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        let _ = F::ct_new().remove(&w.key);
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
    /// Where the client's packets come from (see `CtValue::ifindex`).
    pub ifindex: u32,
    /// Where the backend's answers will come from, when the hook knows it (an uplink for
    /// a source-NATed flow to another node, the pod's own interface for hairpin); 0 =
    /// learnt from the first answer.
    pub reply_ifindex: u32,
    /// `proxy_common::dsr::FLOW` for a direct-server-return flow (`create` only), else 0.
    pub dsr: u8,
}

// The entry points: inlined for IPv4, BPF functions of their own for IPv6 (see
// `Family::OUTLINE`); the constant condition leaves only one of the two in each
// instantiation.

#[inline(never)]
fn lookup_outlined<F: Family>(p: &Packet<F::Addr>, replies: bool, ifindex: u32, w: &mut CtWork<F::Addr>) -> Ct {
    lookup_body::<F>(p, replies, ifindex, w)
}

#[inline(always)]
pub fn lookup<F: Family>(p: &Packet<F::Addr>, replies: bool, ifindex: u32, w: &mut CtWork<F::Addr>) -> Ct {
    if F::OUTLINE { lookup_outlined::<F>(p, replies, ifindex, w) } else { lookup_body::<F>(p, replies, ifindex, w) }
}

#[inline(never)]
fn reply_outlined<F: Family>(p: &Packet<F::Addr>, ifindex: u32, w: &mut CtWork<F::Addr>) -> Ct {
    reply_body::<F>(p, ifindex, w)
}

/// A packet looked up as a reply only (`to_pod`, `to_uplink`).
#[inline(always)]
pub fn reply<F: Family>(p: &Packet<F::Addr>, ifindex: u32, w: &mut CtWork<F::Addr>) -> Ct {
    if F::OUTLINE { reply_outlined::<F>(p, ifindex, w) } else { reply_body::<F>(p, ifindex, w) }
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
