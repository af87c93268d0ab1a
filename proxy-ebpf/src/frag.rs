//! Fragments of translated flows (RFC 791 for IPv4, RFC 8200's Fragment header for IPv6).
//!
//! Only a datagram's first fragment carries the transport header. When the first fragment
//! of a datagram has been translated, its ports are remembered under the datagram's name
//! (source, destination, protocol, identification) as it arrived, in a small LRU per family
//! (`FRAGS`, `FRAGS6`). A later fragment is parsed with those ports (`parse`, which reads
//! them back and knows where a packet sits in its datagram, `Frag`), so conntrack
//! gives it the same translation; the rewriters then change only its addresses (and the
//! IPv4 header checksum): it has no ports, and the transport checksum lives in the first
//! fragment, whose incremental update already covered the address change for the whole
//! datagram (the pseudo-header is counted once, over the reassembled datagram).
//!
//! A later fragment whose first fragment was not translated here (not service traffic,
//! reordered ahead of it, or aged out) finds nothing and passes untouched, as it did before
//! fragments were translated.
use proxy_common::{FragKey, FragPorts};

use crate::{
    family::Family,
    parse::{Frag, Packet},
    pipeline::{Action, Decision},
};

/// After a first fragment was handled: remember its ports if it was translated, so its later
/// fragments are translated the same way. A failed insert only means those fragments pass
/// untouched (as before), so it is not an error for this packet.
#[inline(always)]
pub fn remember<F: Family>(p: &Packet<F::Addr>, d: &Decision<F::Addr>) {
    if p.frag != Frag::First || !matches!(d.action, Action::Rewrite | Action::Redirect | Action::Dsr) {
        return;
    }
    let key = FragKey { src_addr: p.saddr, dst_addr: p.daddr, id: p.frag_id, proto: p.proto, _pad: [0; 3] };
    let _ = F::frags().insert(&key, &FragPorts { sport: p.sport, dport: p.dport }, 0);
}
