//! Internet checksum arithmetic for XDP, which has no checksum helpers (TC uses the
//! kernel's `bpf_l3/l4_csum_replace`, which also handle CHECKSUM_PARTIAL skbs).
use crate::family::Family;

/// Fold a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), for a 16-bit field. Values are as stored in
/// the packet (read natively); the one's-complement sum does not care about byte order as
/// long as every word is read the same way.
#[inline(always)]
pub fn replace2(csum: u16, old: u16, new: u16) -> u16 {
    !fold(!csum as u32 + !old as u32 + new as u32)
}

/// RFC 1624 eqn. 3 for a 32-bit field (two 16-bit words).
#[inline(always)]
pub fn replace4(csum: u16, old: u32, new: u32) -> u16 {
    let s = !csum as u32 + (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16);
    !fold(s)
}

/// `csum` after the address `old` became `new` in the data it covers.
#[inline(always)]
pub fn replace_addr<F: Family>(mut csum: u16, old: F::Addr, new: F::Addr) -> u16 {
    let (o, n) = (F::words(old), F::words(new));
    let mut i = 0;
    while i < F::WORDS {
        csum = replace4(csum, o[i], n[i]);
        i += 1;
    }
    csum
}

/// The one's-complement difference an address change makes to a sum that covers it, as a
/// 32-bit partial sum (what `bpf_csum_diff` returns, for `bpf_l4_csum_replace` with size 0):
/// every old word taken away, every new word added.
#[inline(always)]
pub fn addr_diff<F: Family>(old: F::Addr, new: F::Addr) -> u64 {
    let (o, n) = (F::words(old), F::words(new));
    let mut s = 0u64;
    let mut i = 0;
    while i < F::WORDS {
        s += (!o[i]) as u64 + n[i] as u64;
        i += 1;
    }
    s
}

/// The same for a 16-bit field (a port): its value zero-extended to 32 bits, as the
/// kernel's `inet_proto_csum_replace2` takes it.
#[inline(always)]
pub fn port_diff(old: u16, new: u16) -> u64 {
    (!(old as u32)) as u64 + new as u64
}

/// Fold a 64-bit accumulator of 32-bit words to a 32-bit one's-complement sum.
#[inline(always)]
pub fn fold_wide(mut s: u64) -> u32 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s as u32
}

/// Sum of a header's 16-bit words as big-endian numbers (for a checksum built from scratch).
#[inline(always)]
pub fn sum_words<const N: usize>(b: &[u8; N]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < N {
        s += ((b[i] as u32) << 8) | b[i + 1] as u32;
        i += 2;
    }
    s
}
