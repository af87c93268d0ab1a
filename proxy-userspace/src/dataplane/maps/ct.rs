//! A family's two conntrack tables (the map holding each: `MapAddr::ct_map`), and how their
//! entries are read in chunks.
use std::{io, mem::size_of, os::fd::AsFd};

use aya::maps::MapData;
use proxy_common::{CtKey, CtValue};

use crate::dataplane::kernel::bpfsys;

/// One of a family's two conntrack tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `CONNTRACK` / `CONNTRACK6`: assured flows, never evicted.
    Assured,
    /// `CT_NEW` / `CT_NEW6`: unassured flows, an LRU.
    Unassured,
}

impl Table {
    /// In walk order: a lookup finds an established flow in the assured table first, and so
    /// does the collector.
    pub const ALL: [Table; 2] = [Table::Assured, Table::Unassured];

    /// Position in [`Table::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Table::Assured => 0,
            Table::Unassured => 1,
        }
    }
}

/// Entries read from a conntrack map.
pub type Entries<A> = Vec<(CtKey<A>, CtValue<A>)>;

/// Entries of a conntrack map: up to `count` from `cursor` (`None`: the beginning) with
/// `BPF_MAP_LOOKUP_BATCH` (aya 0.14 has no batch operations), a few hundred per syscall
/// instead of two per entry, and the next cursor (`None` once the walk reached the end).
pub fn lookup_batch<A: aya::Pod + Default>(
    map: &MapData,
    cursor: Option<u32>,
    count: usize,
) -> io::Result<(Entries<A>, Option<u32>)> {
    let mut keys = vec![CtKey::<A>::default(); count];
    let mut values = vec![CtValue::<A>::default(); count];
    // SAFETY: the byte views cover exactly the two vectors of plain `#[repr(C)]` integer
    // structs, whose every bit pattern is valid; the kernel writes at most `count` keys
    // and values of the map's sizes (checked by aya when the typed map was built).
    let (kb, vb) = unsafe {
        (
            std::slice::from_raw_parts_mut(keys.as_mut_ptr() as *mut u8, count * size_of::<CtKey<A>>()),
            std::slice::from_raw_parts_mut(values.as_mut_ptr() as *mut u8, count * size_of::<CtValue<A>>()),
        )
    };
    let (n, next) = bpfsys::map_lookup_batch(map.fd().as_fd(), cursor, kb, vb, count as u32)?;
    keys.truncate(n);
    values.truncate(n);
    Ok((keys.into_iter().zip(values).collect(), next))
}

/// `lookup_batch` of `want` entries, asking for more when one hash bucket holds more than
/// that (the kernel refuses with ENOSPC; buckets hold a handful, so this is rare).
pub fn read_chunk<A: aya::Pod + Default>(
    map: &MapData,
    cursor: Option<u32>,
    mut want: usize,
) -> io::Result<(Entries<A>, Option<u32>)> {
    loop {
        match lookup_batch(map, cursor, want) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && want < 1 << 16 => want *= 4,
            r => return r,
        }
    }
}
