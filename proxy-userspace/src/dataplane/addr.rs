//! Conversions between std types and the network-byte-order integers the maps hold.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proxy_common::Ipv6Words;

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

/// An address type a map stores (`u32` for IPv4, `Ipv6Words` for IPv6), so readers of
/// both families' maps (CLI, collector) are written once.
pub trait MapAddr: Copy {
    fn to_ip(self) -> IpAddr;
}

impl MapAddr for u32 {
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(ip_from_map(self))
    }
}

impl MapAddr for Ipv6Words {
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
}
