//! Carrying conntrack entries over from the layout before the assured table (an agent
//! upgraded in place keeps its connections).
//!
//! That layout's value was today's [`CtValue`] up to `last_seen` (32 bytes for IPv4, 56 for
//! IPv6): `ifindex`, `seq_end` and `created` were added after it, so an old value is the
//! new one's prefix. Every flow was in the one table. A flow the backend answered
//! (`SEEN_REPLY`; for the older, stateless LRU table, any flow not closing, see
//! [`CtUpgrade`]) is taken as assured, closing or not: it goes to the assured table
//! with `ASSURED` set, where nothing evicts it. netfilter keeps a flow assured through its
//! close too. A flow still waiting for its answer goes to the unassured table (`CT_NEW`),
//! where the datapath promotes it when its handshake completes. A reply entry follows its
//! forward entry (read from the old map); without one it is an orphan, put with the
//! unassured flows for the collector to remove.
//!
//! What the old entries never recorded is marked unknown, for the datapath to learn from the
//! flow's next packets: `ifindex` 0 (either side's interface: its next packet sets it) and,
//! for TCP, `seq_flags` = `ct::SEQ_UNKNOWN` with `seq_end` 0 in both directions: the
//! direction's next segment sets its sequence position, and until then its RST or FIN is
//! believed as before the upgrade (an established connection carried over can still be
//! closed or reset by either end). The old layout's `_pad` byte, where `seq_flags` now
//! sits, was always 0: it is set here, not read.
use std::{
    mem::{offset_of, size_of},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData, MapError};
use proxy_common::{CT_DIR_REPLY, CtKey, CtValue, PROTO_TCP, ct, ct_flags};

use crate::dataplane::maps::copy::{self as map_copy, Copied, MapSpec, Upgrade};
use crate::dataplane::maps::ct::Table;

/// The older IPv4 value size: today's value up to `ifindex`.
pub const VALUE_SIZE: usize = offset_of!(CtValue<u32>, ifindex);
/// The older IPv6 value size.
pub const VALUE_SIZE6: usize = offset_of!(CtValue<proxy_common::Ipv6Words>, ifindex);

/// How CONNTRACK entries carried over from an older map are read (`dataplane::maps::migrate`).
///
/// A table made by an agent from before the conntrack lifecycle (an LRU without per-flow
/// state) has no `SEEN_REPLY`: its flows would all count as unanswered SYNs and the GC
/// would remove idle established connections after `tcp_syn` seconds. Every entry of such
/// a table that is not closing is taken as established (at worst an unanswered SYN of the
/// old table lives until the established timeout). Entries of a stateful table are kept
/// as they are.
pub struct CtUpgrade;

impl Upgrade<CtKey, CtValue> for CtUpgrade {
    fn upgrade(old: &MapSpec, _: &CtKey, mut v: CtValue) -> CtValue {
        let stateless = old.map_type == aya::maps::MapType::LruHash as u32;
        if stateless && v.flags & ct_flags::CLOSING == 0 {
            v.flags |= ct_flags::SEEN_REPLY;
        }
        v
    }
}

/// Today's value from the older `bytes` (its prefix), the new fields zero (unknown).
fn widen<A: Copy + Default>(bytes: &[u8]) -> CtValue<A> {
    let mut v = CtValue::<A>::default();
    let n = bytes.len().min(offset_of!(CtValue<A>, ifindex));
    // SAFETY: `CtValue` is `#[repr(C)]` plain integers (every bit pattern is valid); at most
    // the bytes before `ifindex` are written, which is where the older layout's fields sit
    // (same order, same offsets: the new fields were appended).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut CtValue<A>).cast::<u8>(), n) };
    v
}

/// Where a carried-over flow goes, from its forward entry's flags (older meaning).
fn assured(flags: u8) -> bool {
    flags & ct_flags::SEEN_REPLY != 0
}

/// The entry `k` -> `v` (widened) of a flow whose forward entry has `fwd_flags` (`None`: no
/// forward entry), as the new tables hold it, and the table it goes to.
pub fn convert<A: Copy + Default>(k: &CtKey<A>, mut v: CtValue<A>, fwd_flags: Option<u8>) -> (Table, CtValue<A>) {
    let table = if fwd_flags.is_some_and(assured) { Table::Assured } else { Table::Unassured };
    if table == Table::Assured {
        v.flags |= ct_flags::ASSURED | ct_flags::SEEN_REPLY;
    }
    // Neither direction's sequence position is known: its next segment sets it.
    v.seq_flags = if k.proto == PROTO_TCP { ct::SEQ_UNKNOWN } else { 0 };
    v.ifindex = 0;
    v.seq_end = 0;
    v.created = 0;
    (table, v)
}

/// Copy the old map of the older layout (`OLD`-byte values) into the new assured table
/// `new` and the family's unassured table (pinned at `unassured`), insert-if-absent
/// in each, and never into one table what the other already holds (the datapath may have
/// promoted a flow between two passes).
pub fn copy<A, const OLD: usize>(old: &Map, new: &mut Map, spec: &MapSpec, unassured: &Path) -> Result<Copied, MapError>
where
    A: Copy + Default,
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    if OLD != offset_of!(CtValue<A>, ifindex) || OLD >= size_of::<CtValue<A>>() {
        return Err(MapError::InvalidValueSize { size: OLD, expected: offset_of!(CtValue<A>, ifindex) });
    }
    let limit = map_copy::bound(old);
    let src = HashMap::<&MapData, CtKey<A>, [u8; OLD]>::try_from(old)?;
    let mut assured_map = HashMap::<&mut MapData, CtKey<A>, CtValue<A>>::try_from(new)?;
    let data = MapData::from_pin(unassured)?;
    let mut unassured_map = HashMap::<MapData, CtKey<A>, CtValue<A>>::try_from(Map::from_map_data(data)?)?;
    let stateless = spec.map_type == aya::maps::MapType::LruHash as u32;
    // The older meaning of the flags, with the stateless table's reading applied.
    let flags_of = |v: &CtValue<A>| {
        if stateless && v.flags & ct_flags::CLOSING == 0 { v.flags | ct_flags::SEEN_REPLY } else { v.flags }
    };
    map_copy::copy_entries(src.iter(), limit, |(k, bytes)| {
        let v = widen::<A>(&bytes);
        let fwd_flags = if k.dir == CT_DIR_REPLY {
            let fk = k.forward_of_reply(&v);
            src.get(&fk, 0).ok().map(|fb| flags_of(&widen::<A>(&fb)))
        } else {
            Some(flags_of(&v))
        };
        let v = CtValue { flags: flags_of(&v), ..v };
        let (table, v) = convert(&k, v, fwd_flags);
        let in_other = match table {
            Table::Assured => unassured_map.get(&k, 0).is_ok(),
            Table::Unassured => assured_map.get(&k, 0).is_ok(),
        };
        if in_other {
            return Err(exists());
        }
        match table {
            Table::Assured => assured_map.insert(k, v, map_copy::BPF_NOEXIST),
            Table::Unassured => unassured_map.insert(k, v, map_copy::BPF_NOEXIST),
        }
    })
}

/// What an insert-if-absent returns for a key that is there (counted as present).
fn exists() -> MapError {
    MapError::SyscallError(aya::sys::SyscallError {
        call: "bpf_map_update_elem",
        io_error: std::io::Error::from_raw_os_error(libc::EEXIST),
    })
}

#[cfg(test)]
mod tests {
    use proxy_common::{CT_DIR_FORWARD, PROTO_UDP};

    use super::*;

    fn key(dir: u8, proto: u8) -> CtKey {
        CtKey { src_addr: 1, dst_addr: 2, src_port: 3, dst_port: 4, proto, dir, _pad: 0 }
    }

    #[test]
    fn an_old_value_is_the_prefix_of_the_new_one() {
        let v = CtValue {
            nat_addr: 7,
            nat_port: 8,
            flags: 9,
            backend_id: 10,
            svc_id: 11,
            last_seen: 12,
            ..Default::default()
        };
        // SAFETY: reading the plain-integer value's bytes.
        let bytes: &[u8] =
            unsafe { std::slice::from_raw_parts((&v as *const CtValue).cast::<u8>(), size_of::<CtValue>()) };
        let widened = widen::<u32>(&bytes[..VALUE_SIZE]);
        assert_eq!(widened, v);
        let with_new = CtValue { ifindex: 5, seq_end: 6, created: 7, ..v };
        // SAFETY: as above.
        let bytes: &[u8] =
            unsafe { std::slice::from_raw_parts((&with_new as *const CtValue).cast::<u8>(), size_of::<CtValue>()) };
        assert_eq!(widen::<u32>(&bytes[..VALUE_SIZE]), v, "only the old fields are read");
    }

    #[test]
    fn answered_flows_become_assured_and_the_others_unassured() {
        let est = CtValue { flags: ct_flags::SEEN_REPLY, last_seen: 5, ..Default::default() };
        let (t, v) = convert(&key(CT_DIR_FORWARD, PROTO_TCP), est, Some(est.flags));
        assert_eq!(t, Table::Assured);
        assert_eq!(v.flags, ct_flags::SEEN_REPLY | ct_flags::ASSURED);
        assert_eq!((v.ifindex, v.seq_end, v.seq_flags, v.last_seen), (0, 0, ct::SEQ_UNKNOWN, 5));
        // Its TCP reply entry: assured, the backend's sequence position to be learnt too.
        let (t, v) = convert(&key(CT_DIR_REPLY, PROTO_TCP), est, Some(est.flags));
        let both = ct_flags::SEEN_REPLY | ct_flags::ASSURED;
        assert_eq!((t, v.flags, v.seq_flags), (Table::Assured, both, ct::SEQ_UNKNOWN));
        // UDP has no sequence numbers.
        let (_, v) = convert(&key(CT_DIR_REPLY, PROTO_UDP), est, Some(est.flags));
        assert_eq!((v.flags, v.seq_flags), (both, 0));
        // Half-closed: still assured.
        let closing = ct_flags::SEEN_REPLY | ct_flags::CLOSING | ct_flags::FIN_FWD;
        let (t, _) = convert(&key(CT_DIR_FORWARD, PROTO_TCP), CtValue { flags: closing, ..est }, Some(closing));
        assert_eq!(t, Table::Assured);
        // Unanswered, and an orphan reply entry: unassured.
        let syn = CtValue { flags: 0, ..est };
        assert_eq!(convert(&key(CT_DIR_FORWARD, PROTO_TCP), syn, Some(0)).0, Table::Unassured);
        assert_eq!(convert(&key(CT_DIR_REPLY, PROTO_TCP), est, None).0, Table::Unassured);
    }
}
