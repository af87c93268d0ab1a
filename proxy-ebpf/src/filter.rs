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

/// Can `p`'s destination be nothing of ours? Only while the agent keeps the filter in
/// force, and for this family only if its Service CIDRs were listed.
#[inline(always)]
pub fn nothing_ours<F: Family>(p: &Packet<F::Addr>) -> bool {
    let Some(h) = FRONTEND_FILTER.get(0) else {
        return false;
    };
    h.words[0] == IN_FORCE
        && h.words[1] & F::WIDE == 0
        && !set(F::frontend_bit(p.daddr, p.dport, p.proto))
        && !set(F::prefix_bit(p.daddr))
}
