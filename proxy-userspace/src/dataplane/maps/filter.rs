//! `FRONTEND_FILTER` (`proxy_common::frontend_filter`): the bits that let the programs pass
//! a packet that is nothing of ours without looking it up. Only the agent writes it, always
//! before what the bits stand for: a frontend's bit before its `SERVICES` entry, a
//! backend's reply bit before its `BACKENDS` entry, a Service CIDR's prefix bits before its
//! `SERVICE_CIDRS` entry. Bits are never cleared while the
//! agent runs (a flow may outlive its frontend); each start clears nothing either, but
//! takes the filter out of force, sets the bits of everything the maps hold (frontends,
//! backends, Service CIDRs, every conntrack flow's destination and reply's source) and puts it back in force once the
//! first sync is done (`Maps::adopt_filter`, `Maps::filter_in_force`).
//!
//! `FilterBits` is the in-memory copy and its bit arithmetic, with no I/O; `FrontendFilter`
//! writes what changed to the map.
use std::net::IpAddr;

use aya::maps::{Array, MapData};
use proxy_common::frontend_filter::{
    self as ff, BLOCKS, Block, ENTRIES, IN_FORCE, MIN_PREFIX_V4, MIN_PREFIX_V6, WIDE_V4, WIDE_V6, place,
};

use super::addr::{ip_to_map, ip6_to_map};
use crate::{
    dataplane::DataplaneError,
    model::IpPrefix,
    sync::store::{StoreError, StoreResult},
};

/// The filter's elements as the agent last wrote (or read) them, and which differ from
/// the map.
#[derive(Clone, Debug)]
pub struct FilterBits {
    /// Element 0 (the header), then the `BLOCKS` bit blocks.
    elements: Vec<Block>,
    /// Elements changed since the last write, one flag each (a start marks a few hundred
    /// thousand bits: a flag is cheaper to set than a set's entry).
    dirty: Vec<bool>,
}

impl Default for FilterBits {
    fn default() -> Self {
        FilterBits { elements: vec![Block::default(); ENTRIES as usize], dirty: vec![false; ENTRIES as usize] }
    }
}

impl FilterBits {
    /// From the elements a map holds (missing ones read as zero).
    pub fn from_elements(mut elements: Vec<Block>) -> Self {
        elements.resize(ENTRIES as usize, Block::default());
        FilterBits { elements, dirty: vec![false; ENTRIES as usize] }
    }

    fn set_bit(&mut self, bit: u32) {
        let (index, word, mask) = place(bit);
        let w = &mut self.elements[index as usize].words[word];
        if *w & mask == 0 {
            *w |= mask;
            self.dirty[index as usize] = true;
        }
    }

    /// Is bit `bit` set?
    pub fn is_set(&self, bit: u32) -> bool {
        let (index, word, mask) = place(bit);
        self.elements[index as usize].words[word] & mask != 0
    }

    fn set_header(&mut self, word: usize, value: u64) {
        if self.elements[0].words[word] != value {
            self.elements[0].words[word] = value;
            self.dirty[0] = true;
        }
    }

    /// A bit of `addr`, by its family's hash of the map form of it.
    fn of(addr: IpAddr, v4: impl FnOnce(u32) -> u32, v6: impl FnOnce([u32; 4]) -> u32) -> u32 {
        match addr {
            IpAddr::V4(a) => v4(ip_to_map(a)),
            IpAddr::V6(a) => v6(ip6_to_map(a)),
        }
    }

    /// The bit of a frontend (port in network order, as the maps hold it).
    pub fn frontend_bit(addr: IpAddr, port: u16, proto: u8) -> u32 {
        Self::of(addr, |a| ff::frontend_v4(a, port, proto), |a| ff::frontend_v6(a, port, proto))
    }

    /// Mark a frontend (or a flow's destination): port in network order.
    pub fn frontend(&mut self, addr: IpAddr, port: u16, proto: u8) {
        self.set_bit(Self::frontend_bit(addr, port, proto));
    }

    /// The bit of a backend as a reply's source (port in network order).
    pub fn reply_bit(addr: IpAddr, port: u16, proto: u8) -> u32 {
        Self::of(addr, |a| ff::reply_v4(a, port, proto), |a| ff::reply_v6(a, port, proto))
    }

    /// Mark a backend (or a reply's source): port in network order.
    pub fn backend(&mut self, addr: IpAddr, port: u16, proto: u8) {
        self.set_bit(Self::reply_bit(addr, port, proto));
    }

    /// Would `to_pod` let a packet from `addr`:`port` pass without the reply lookups?
    pub fn passes_reply(&self, addr: IpAddr, port: u16, proto: u8) -> bool {
        self.in_force() && !self.is_set(Self::reply_bit(addr, port, proto))
    }

    /// The prefix bits a Service CIDR sets; `None`: too wide to list (its family is then
    /// not filtered).
    pub fn cidr_bits(p: IpPrefix) -> Option<Vec<u32>> {
        match p.addr {
            IpAddr::V4(a) => {
                if p.len < MIN_PREFIX_V4 {
                    return None;
                }
                let top = u32::from(a) >> 16;
                let spread = 1u32 << 16u8.saturating_sub(p.len);
                let base = top & !(spread - 1);
                Some((0..spread).map(|i| ff::prefix16(base | i)).collect())
            }
            IpAddr::V6(a) => {
                if p.len < MIN_PREFIX_V6 {
                    return None;
                }
                let top = (u128::from(a) >> 64) as u64;
                let spread = 1u64 << 64u8.saturating_sub(p.len);
                let base = top & !(spread - 1);
                Some((0..spread).map(|i| ff::prefix64(base | i)).collect())
            }
        }
    }

    /// Mark a Service CIDR: its prefix bits, or its family's `WIDE_*` flag.
    pub fn cidr(&mut self, p: IpPrefix) {
        match Self::cidr_bits(p) {
            Some(bits) => bits.into_iter().for_each(|b| self.set_bit(b)),
            None => {
                let flag = if p.addr.is_ipv4() { WIDE_V4 } else { WIDE_V6 };
                let flags = self.elements[0].words[1] | flag;
                self.set_header(1, flags);
            }
        }
    }

    /// Put the filter in force, or take it out.
    pub fn set_in_force(&mut self, on: bool) {
        self.set_header(0, if on { IN_FORCE } else { 0 });
    }

    pub fn in_force(&self) -> bool {
        self.elements[0].words[0] == IN_FORCE
    }

    /// Is `family`'s traffic filtered at all (no Service CIDR too wide)?
    pub fn filters(&self, addr: IpAddr) -> bool {
        let flag = if addr.is_ipv4() { WIDE_V4 } else { WIDE_V6 };
        self.in_force() && self.elements[0].words[1] & flag == 0
    }

    /// Would the datapath let a packet to `addr`:`port` pass without a lookup?
    pub fn passes(&self, addr: IpAddr, port: u16, proto: u8) -> bool {
        let prefix = Self::of(addr, ff::prefix_v4, ff::prefix_v6);
        self.filters(addr) && !self.is_set(Self::frontend_bit(addr, port, proto)) && !self.is_set(prefix)
    }

    /// Bits set, of `BITS`.
    pub fn count(&self) -> u32 {
        self.elements[1..].iter().flat_map(|b| b.words.iter()).map(|w| w.count_ones()).sum()
    }

    /// The elements to write, in the order to write them: the bit blocks, then the header
    /// (so the filter never comes into force before its bits).
    fn pending(&self) -> Vec<u32> {
        let mut out: Vec<u32> = (1..ENTRIES).filter(|&i| self.dirty[i as usize]).collect();
        if self.dirty[0] {
            out.push(0);
        }
        out
    }
}

/// The map and its copy. Held only by the agent's own `Maps` (the CLI and the datapath
/// tests open the pins without it: they never write it).
pub struct FrontendFilter {
    map: Array<MapData, Block>,
    pub bits: FilterBits,
}

impl FrontendFilter {
    /// Read the map's elements.
    pub fn open(map: Array<MapData, Block>) -> Result<Self, DataplaneError> {
        let elements = (0..ENTRIES)
            .map(|i| map.get(&i, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DataplaneError::from_map(proxy_common::map_names::FRONTEND_FILTER, e))?;
        debug_assert_eq!(elements.len(), BLOCKS as usize + 1);
        Ok(FrontendFilter { map, bits: FilterBits::from_elements(elements) })
    }

    /// Write every element that changed, the header last. An element that could not be
    /// written stays pending, so the next flush retries it (and whatever needed it is not
    /// written meanwhile: the caller returns the error).
    pub fn flush(&mut self) -> StoreResult {
        for index in self.bits.pending() {
            let element = self.bits.elements[index as usize];
            self.map.set(index, element, 0).map_err(|e| -> StoreError {
                DataplaneError::from_map(proxy_common::map_names::FRONTEND_FILTER, e).into()
            })?;
            self.bits.dirty[index as usize] = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proxy_common::{PROTO_TCP, PROTO_UDP};

    fn prefix(addr: &str, len: u8) -> IpPrefix {
        IpPrefix { addr: addr.parse().unwrap(), len }
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
    }
    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
    }

    #[test]
    fn nothing_passes_until_in_force() {
        let mut f = FilterBits::default();
        assert!(!f.passes(v4("10.0.0.1"), 80u16.to_be(), PROTO_TCP));
        f.set_in_force(true);
        assert!(f.passes(v4("10.0.0.1"), 80u16.to_be(), PROTO_TCP));
        assert_eq!(f.pending(), vec![0], "only the header changed");
    }

    #[test]
    fn a_marked_frontend_never_passes_and_others_mostly_do() {
        let mut f = FilterBits::default();
        f.set_in_force(true);
        let port = 8080u16.to_be();
        for i in 0..20_000u32 {
            let a = v4(&format!("10.{}.{}.{}", 96 + (i >> 16), (i >> 8) & 255, i & 255));
            f.frontend(a, port, PROTO_TCP);
            assert!(!f.passes(a, port, PROTO_TCP), "{a} marked");
        }
        let a = v6("fd00::1");
        f.frontend(a, port, PROTO_UDP);
        assert!(!f.passes(a, port, PROTO_UDP));
        // Another protocol or port of a marked address is another bit.
        let passed = (0..10_000u16).filter(|p| f.passes(v4("10.96.0.1"), (20_000 + p).to_be(), PROTO_TCP)).count();
        assert!(passed > 9_700, "about 1% of the bits are set: {passed} of 10,000 passed");
        assert!(f.passes(a, port, PROTO_TCP));
        assert!(f.count() <= 20_001);
    }

    #[test]
    fn a_service_cidr_keeps_every_address_in_it_from_passing() {
        let mut f = FilterBits::default();
        f.set_in_force(true);
        f.cidr(prefix("10.96.0.0", 12));
        f.cidr(prefix("fd00:10:96::", 112));
        for a in ["10.96.0.1", "10.100.3.4", "10.111.255.255"] {
            assert!(!f.passes(v4(a), 443u16.to_be(), PROTO_TCP), "{a} is in 10.96.0.0/12");
        }
        assert!(!f.passes(v6("fd00:10:96::abcd"), 53u16.to_be(), PROTO_UDP));
        assert_eq!(FilterBits::cidr_bits(prefix("10.96.0.0", 12)).unwrap().len(), 16);
        assert_eq!(FilterBits::cidr_bits(prefix("10.96.7.0", 24)).unwrap().len(), 1);
        assert!(f.passes(v4("10.112.0.1"), 443u16.to_be(), PROTO_TCP) || f.count() > 16);
        // Too wide to list: the family is not filtered, the other still is.
        f.cidr(prefix("10.0.0.0", 7));
        assert!(!f.filters(v4("192.168.1.1")));
        assert!(f.filters(v6("2001:db8::1")));
        f.cidr(prefix("fd00::", 48));
        assert!(!f.filters(v6("2001:db8::1")));
    }

    #[test]
    fn a_marked_backend_never_passes_as_a_reply_nor_makes_a_frontend() {
        let mut f = FilterBits::default();
        f.set_in_force(true);
        let (b, port) = (v4("10.244.1.1"), 8080u16.to_be());
        assert!(f.passes_reply(b, port, PROTO_TCP));
        f.backend(b, port, PROTO_TCP);
        assert!(!f.passes_reply(b, port, PROTO_TCP));
        assert!(f.passes(b, port, PROTO_TCP), "a reply bit is not a frontend bit");
        assert!(f.passes_reply(b, 8081u16.to_be(), PROTO_TCP));
    }

    /// Backends' bits never share the half new flows are filtered by, however many.
    #[test]
    fn replies_and_destinations_are_apart() {
        let region = proxy_common::frontend_filter::REGION_BITS;
        for i in 0..50_000u32 {
            let a = v4(&format!("10.{}.{}.{}", 128 + (i >> 16), (i >> 8) & 255, i & 255));
            assert!(FilterBits::reply_bit(a, 8080u16.to_be(), PROTO_TCP) >= region);
            assert!(FilterBits::frontend_bit(a, 8080u16.to_be(), PROTO_TCP) < region);
        }
        for p in FilterBits::cidr_bits(prefix("fd00::", 56)).unwrap() {
            assert!(p < region);
        }
    }

    #[test]
    fn blocks_are_written_before_the_header_and_only_once() {
        let mut f = FilterBits::default();
        f.frontend(v4("10.96.0.10"), 53u16.to_be(), PROTO_UDP);
        f.set_in_force(true);
        let pending = f.pending();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending.last(), Some(&0), "header last: {pending:?}");
        f.dirty.fill(false);
        f.frontend(v4("10.96.0.10"), 53u16.to_be(), PROTO_UDP);
        assert!(f.pending().is_empty(), "a bit already set writes nothing");
    }
}
