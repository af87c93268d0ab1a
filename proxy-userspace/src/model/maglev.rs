//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, section 3.4): a table of `M` slots (M prime) filled from the
//! backends' permutations, so that every node given the same backends builds the same table,
//! each backend holds about M/N slots, and a backend leaving moves about 1/N of the others'
//! slots. Pure: no I/O, no clocks, no seeds.
//!
//! A backend's permutation comes from its stable identity, its address and port, never from
//! the id the sync gave it on this node: two nodes number their backends differently but
//! must build the same table. The hash is FNV-1a (64-bit) with two fixed offsets, one for
//! each of the paper's `offset` and `skip`.
use std::{hash::Hasher, net::IpAddr};

use fnv::FnvHasher;

/// Cilium's default table size (`--maglev-table-size`): a prime, enough for ~160 backends
/// at the paper's M >= 100 N.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;
/// The largest table the agent builds (`--maglev-table-size`): 131,071 slots (a prime) is
/// 512 KiB of backend ids per frontend, in userspace and in the kernel's array alike.
pub const MAX_TABLE_SIZE: u32 = 131_071;
/// Smaller tables spread badly: the paper wants M well above 100 N.
pub const MIN_TABLE_SIZE: u32 = 251;

/// FNV-1a offsets for the two hashes (fixed: nodes must agree). The first is FNV's own
/// offset basis; the second is another constant, so `offset` and `skip` are independent.
const OFFSET_KEY: u64 = 0xcbf2_9ce4_8422_2325;
const SKIP_KEY: u64 = 0x6c62_272e_07bb_0142;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("Maglev table size {0} is not a prime (try 16381 or 65521)")]
    NotPrime(u32),
    #[error("Maglev table size {size} is out of range ({MIN_TABLE_SIZE}..={MAX_TABLE_SIZE})")]
    OutOfRange { size: u32 },
}

/// Is `n` prime? (trial division: table sizes are at most `MAX_TABLE_SIZE`).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Check a `--maglev-table-size`: a prime in range.
pub fn check_table_size(size: u32) -> Result<u32, MaglevError> {
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&size) {
        return Err(MaglevError::OutOfRange { size });
    }
    if !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    Ok(size)
}

/// A backend as Maglev sees it: its identity (address and port, host order) and its weight
/// (endpoints behind it: slices that repeat an address give it that many shares).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
}

impl MaglevBackend {
    fn hash(&self, key: u64) -> u64 {
        let mut h = FnvHasher::with_key(key);
        match self.addr {
            IpAddr::V4(a) => h.write(&a.octets()),
            IpAddr::V6(a) => h.write(&a.octets()),
        }
        h.write(&self.port.to_be_bytes());
        h.finish()
    }

    /// The paper's `offset` and `skip` for a table of `m` slots.
    fn permutation(&self, m: u32) -> (u64, u64) {
        let m = u64::from(m);
        (self.hash(OFFSET_KEY) % m, self.hash(SKIP_KEY) % (m - 1) + 1)
    }
}

/// The table for `backends` with `m` slots (`check_table_size`): slot -> index into
/// `backends`. Empty without backends (or with zero weights only). The result does not
/// depend on the order of `backends` beyond the indices it returns: backends are visited in
/// the order of their identities.
pub fn build_table(backends: &[MaglevBackend], m: u32) -> Vec<u32> {
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].weight > 0).collect();
    if order.is_empty() || m < 2 {
        return Vec::new();
    }
    // Visiting order by identity, so that two nodes listing the backends differently fill
    // the table the same way (ties in the paper's round-robin go to the earlier backend).
    order.sort_by_key(|&i| (backends[i].addr, backends[i].port));
    order.dedup_by_key(|i| (backends[*i].addr, backends[*i].port));
    let perms: Vec<(u64, u64)> = order.iter().map(|&i| backends[i].permutation(m)).collect();
    let m_us = m as usize;
    let mut next = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; m_us];
    let mut filled = 0usize;
    // Weighted round-robin: in each round a backend claims as many slots as its weight,
    // each the next free one of its permutation (the paper's loop, weight times).
    loop {
        for (n, &i) in order.iter().enumerate() {
            let (offset, skip) = perms[n];
            for _ in 0..backends[i].weight {
                let slot = loop {
                    let c = ((offset + next[n] * skip) % u64::from(m)) as usize;
                    next[n] += 1;
                    if table[c] == u32::MAX {
                        break c;
                    }
                };
                table[slot] = i as u32;
                filled += 1;
                if filled == m_us {
                    return table;
                }
            }
        }
    }
}

/// Bytes a table of `m` slots takes of the kernel's Maglev array (`MAGLEV_SLOTS`,
/// preallocated to `--max-maglev-slots`): a run of one 4-byte backend id per slot.
pub const fn kernel_bytes(m: u32) -> u64 {
    const SLOT: u64 = 4;
    m as u64 * SLOT
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn backends(n: u8) -> Vec<MaglevBackend> {
        (1..=n).map(|i| MaglevBackend { addr: IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)), port: 8080, weight: 1 }).collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &b in table {
            c[b as usize] += 1;
        }
        c
    }

    #[test]
    fn table_sizes_must_be_prime_and_in_range() {
        assert_eq!(check_table_size(16_381), Ok(16_381));
        assert_eq!(check_table_size(65_521), Ok(65_521));
        assert_eq!(check_table_size(16_384), Err(MaglevError::NotPrime(16_384)));
        assert_eq!(check_table_size(7), Err(MaglevError::OutOfRange { size: 7 }));
        assert_eq!(check_table_size(1 << 20), Err(MaglevError::OutOfRange { size: 1 << 20 }));
        assert!(check_table_size(16_384).unwrap_err().to_string().contains("not a prime"));
        let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    }

    #[test]
    fn every_slot_is_filled_and_spread_within_one_percent() {
        for (n, m) in [(3u8, 16_381u32), (10, 16_381), (7, 65_521), (100, 16_381)] {
            let b = backends(n);
            let t = build_table(&b, m);
            assert_eq!(t.len(), m as usize);
            let fair = f64::from(m) / f64::from(n);
            for (i, c) in shares(&t, n as usize).into_iter().enumerate() {
                let off = (c as f64 - fair).abs() / fair;
                assert!(off <= 0.01, "backend {i} of {n} holds {c} of {m} slots, {:.2}% off uniform", off * 100.0);
            }
        }
    }

    #[test]
    fn same_table_whatever_the_order_of_the_backends() {
        let b = backends(10);
        let t = build_table(&b, 16_381);
        let mut rev = b.clone();
        rev.reverse();
        let t_rev = build_table(&rev, 16_381);
        // Same backend (by identity) in every slot.
        for (x, y) in t.iter().zip(&t_rev) {
            assert_eq!(b[*x as usize], rev[*y as usize]);
        }
    }

    #[test]
    fn removing_one_of_n_moves_at_most_one_nth_plus_one_percent_of_the_others() {
        for n in [3u8, 5, 10, 50] {
            let m = 16_381;
            let b = backends(n);
            let before = build_table(&b, m);
            for gone in [0usize, n as usize / 2, n as usize - 1] {
                let mut after_b = b.clone();
                after_b.remove(gone);
                let after = build_table(&after_b, m);
                let (mut others, mut moved) = (0usize, 0usize);
                for (x, y) in before.iter().zip(&after) {
                    if *x as usize == gone {
                        continue;
                    }
                    others += 1;
                    if b[*x as usize] != after_b[*y as usize] {
                        moved += 1;
                    }
                }
                let frac = moved as f64 / others as f64;
                let bound = 1.0 / f64::from(n) + 0.01;
                assert!(
                    frac <= bound,
                    "n={n}, removed {gone}: {:.2}% of the others moved (bound {bound})",
                    frac * 100.0
                );
            }
        }
    }

    #[test]
    fn weights_give_proportional_shares() {
        let mut b = backends(3);
        b[0].weight = 2;
        let t = build_table(&b, 16_381);
        let c = shares(&t, 3);
        let unit = 16_381.0 / 4.0;
        assert!((c[0] as f64 - 2.0 * unit).abs() / (2.0 * unit) < 0.01, "{c:?}");
        assert!((c[1] as f64 - unit).abs() / unit < 0.01, "{c:?}");
    }

    #[test]
    fn identity_is_address_and_port_and_ipv6_works() {
        let a = MaglevBackend { addr: "fd00::1".parse().unwrap(), port: 80, weight: 1 };
        let b = MaglevBackend { port: 81, ..a };
        assert_ne!(a.permutation(16_381), b.permutation(16_381));
        let t = build_table(&[a, b], 16_381);
        assert_eq!(shares(&t, 2), [8191, 8190]);
        assert!(build_table(&[], 16_381).is_empty());
    }

    /// The permutation must never change between releases: nodes running different
    /// versions during an upgrade must build the same table. Values computed independently
    /// (FNV-1a 64 of 10.0.1.1 then port 8080 big-endian, from each fixed key).
    #[test]
    fn permutation_is_pinned() {
        let b = backends(1)[0];
        assert_eq!(b.permutation(16_381), (7270, 8966));
    }
}
