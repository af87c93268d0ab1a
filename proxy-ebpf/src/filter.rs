//! The fast exit of `balance` (`proxy_common::frontend_filter`): a packet whose
//! destination has no frontend bit and lies in no Service CIDR's prefix is nothing of ours,
//! and passes after two array reads (which the verifier inlines) instead of two conntrack
//! lookups, a service lookup and a Service CIDR match.
use proxy_common::frontend_filter::{IN_FORCE, place};

use crate::{family::Family, maps::FRONTEND_FILTER, parse::Packet};

/// Is bit `bit` set? A block that cannot be read counts as set (the full path).
#[inline(always)]
fn set(bit: u32) -> bool {
    let (index, word, mask) = place(bit);
    FRONTEND_FILTER.get(index).is_none_or(|b| b.words[word] & mask != 0)
}

/// Is the filter in force, and for this family's destinations (`wide`: false for a
/// reply's source, which no Service CIDR concerns)?
#[inline(always)]
fn in_force<F: Family>(wide: bool) -> bool {
    FRONTEND_FILTER.get(0).is_some_and(|h| h.words[0] == IN_FORCE && (!wide || h.words[1] & F::WIDE == 0))
}

/// Can `p`'s source be no backend of ours (so that it is no reply we translate)?
#[inline(always)]
pub fn no_reply<F: Family>(p: &Packet<F::Addr>) -> bool {
    in_force::<F>(false) && !set(F::reply_bit(p.saddr, p.sport, p.proto))
}

/// Can `p`'s destination be nothing of ours? Only while the agent keeps the filter in
/// force, and for this family only if its Service CIDRs were listed.
#[inline(always)]
pub fn nothing_ours<F: Family>(p: &Packet<F::Addr>) -> bool {
    in_force::<F>(true) && !set(F::frontend_bit(p.daddr, p.dport, p.proto)) && !set(F::prefix_bit(p.daddr))
}
