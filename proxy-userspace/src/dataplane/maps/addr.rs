//! Conversions between std types and the network-byte-order integers the maps hold.
use std::{
    fmt::Debug,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use proxy_common::{Ipv6Words, map_names};

use crate::dataplane::maps::{catalogue, ct::Table};
use crate::model::IpFamily;

/// IPv4 address as stored in maps: the four octets in wire order, read as a native u32.
pub fn ip_to_map(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ip_from_map(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// IPv6 address as stored in maps: the 16 octets in wire order, read as four native u32.
pub fn ip6_to_map(ip: Ipv6Addr) -> Ipv6Words {
    let o = ip.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

pub fn ip6_from_map(v: Ipv6Words) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (chunk, w) in o.chunks_exact_mut(4).zip(v) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// The address family as userspace sees the maps, mirroring the datapath's `Family`
/// (`proxy-ebpf/src/family.rs`): the address type the family's maps store (`u32` for IPv4,
/// `Ipv6Words` for IPv6), its conversions with std addresses, and which maps are the
/// family's (the catalogue's twins). Readers and writers of both families' maps (CLI,
/// `trace`, the conntrack collector, takeover) are written once, generic over it.
pub trait MapAddr: aya::Pod + Copy + Default + Eq + Hash + Ord + Debug + Send + Sync + 'static {
    const FAMILY: IpFamily;
    /// The family's name, for metric labels and CLI columns ("IPv4", "IPv6").
    const NAME: &'static str;
    /// The address as the maps store it; `None` for an address of the other family.
    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;
    /// This family's map in the role of `name` (`SERVICES` -> `SERVICES6` for IPv6; a map
    /// both families share is itself).
    fn map_name(name: &'static str) -> &'static str {
        catalogue::of_family(name, Self::FAMILY)
    }
    /// The map holding this family's conntrack `table`.
    fn ct_map(table: Table) -> &'static str {
        match table {
            Table::Assured => Self::map_name(map_names::CONNTRACK),
            Table::Unassured => Self::map_name(map_names::CT_NEW),
        }
    }
}

impl MapAddr for u32 {
    const FAMILY: IpFamily = IpFamily::V4;
    const NAME: &'static str = "IPv4";
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(ip_to_map(a)),
            IpAddr::V6(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(ip_from_map(self))
    }
}

impl MapAddr for Ipv6Words {
    const FAMILY: IpFamily = IpFamily::V6;
    const NAME: &'static str = "IPv6";
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(ip6_to_map(a)),
            IpAddr::V4(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V6(ip6_from_map(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_wire_order() {
        let ip = Ipv4Addr::new(10, 96, 0, 1);
        assert_eq!(ip_from_map(ip_to_map(ip)), ip);
        assert_eq!(ip_to_map(ip).to_ne_bytes(), [10, 96, 0, 1]);
    }

    #[test]
    fn ipv6_round_trips_in_wire_order() {
        let ip: Ipv6Addr = "2001:db8::1:2".parse().unwrap();
        let words = ip6_to_map(ip);
        assert_eq!(ip6_from_map(words), ip);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, ip.octets());
        assert_eq!(words.to_ip(), IpAddr::V6(ip));
    }

    #[test]
    fn each_family_converts_only_its_addresses_and_names_its_maps() {
        use proxy_common::map_names as n;
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(u32::from_ip(v4).map(MapAddr::to_ip), Some(v4));
        assert_eq!(Ipv6Words::from_ip(v6).map(MapAddr::to_ip), Some(v6));
        assert_eq!((u32::from_ip(v6), Ipv6Words::from_ip(v4)), (None, None));
        assert_eq!(
            (<u32 as MapAddr>::map_name(n::CT_NEW), <Ipv6Words as MapAddr>::map_name(n::CT_NEW)),
            (n::CT_NEW, n::CT_NEW6)
        );
        assert_eq!(<Ipv6Words as MapAddr>::map_name(n::SERVICE_META), n::SERVICE_META, "shared by both families");
        assert_eq!((u32::NAME, Ipv6Words::NAME), (IpFamily::V4.name(), IpFamily::V6.name()));
    }
}
