//! Fragments of translated flows (RFC 791 for IPv4, RFC 8200's Fragment header for IPv6).
//!
//! Only a datagram's first fragment carries the transport header. When the first fragment
//! of a datagram has been translated, its ports are remembered under the datagram's name
//! (source, destination, protocol, identification) as it arrived, in a small LRU per family
//! (`FRAGS`, `FRAGS6`). A later fragment is parsed with those ports (`parse`), so conntrack
//! gives it the same translation; the rewriters then change only its addresses (and the
//! IPv4 header checksum): it has no ports, and the transport checksum lives in the first
//! fragment, whose incremental update already covered the address change for the whole
//! datagram (the pseudo-header is counted once, over the reassembled datagram).
//!
//! A later fragment whose first fragment was not translated here (not service traffic,
//! reordered ahead of it, or aged out) finds nothing and passes untouched, as it did before
//! fragments were translated.
use aya_ebpf::maps::LruHashMap;
use proxy_common::{FragKey, FragPorts, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::{
    family::Family,
    parse::Packet,
    pipeline::{Action, Decision},
};

/// Where a packet sits in its datagram.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub enum Frag {
    /// A whole datagram (IPv4 with MF clear and offset 0; IPv6 without a fragment header, or
    /// an atomic fragment, RFC 6946).
    #[default]
    Whole,
    /// Offset 0 with more fragments: the transport header is here, the rest follows.
    First,
    /// Offset > 0: no transport header; the ports come from `FRAGS`.
    Later,
}

/// Protocols whose fragments we translate: those with ports.
#[inline(always)]
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
}

/// The ports of the datagram a later fragment belongs to, if its first fragment was
/// translated here.
#[inline(always)]
pub fn ports<A: Copy>(
    map: &LruHashMap<FragKey<A>, FragPorts>,
    saddr: A,
    daddr: A,
    proto: u8,
    id: u32,
) -> Option<FragPorts> {
    let key = FragKey { src_addr: saddr, dst_addr: daddr, id, proto, _pad: [0; 3] };
    // SAFETY: the value is copied out at once; a concurrent update writes the same ports.
    unsafe { map.get(&key).copied() }
}

/// After a first fragment was handled: remember its ports if it was translated, so its later
/// fragments are translated the same way. A failed insert only means those fragments pass
/// untouched (as before), so it is not an error for this packet.
#[inline(always)]
pub fn remember<F: Family>(p: &Packet<F::Addr>, d: &Decision<F::Addr>) {
    if p.frag != Frag::First || !matches!(d.action, Action::Rewrite | Action::Bounce | Action::Forward) {
        return;
    }
    let key = FragKey { src_addr: p.saddr, dst_addr: p.daddr, id: p.frag_id, proto: p.proto, _pad: [0; 3] };
    let _ = F::frags().insert(&key, &FragPorts { sport: p.sport, dport: p.dport }, 0);
}
