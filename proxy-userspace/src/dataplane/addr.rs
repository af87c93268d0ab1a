//! Conversions between std types and the network-byte-order integers the maps hold.
use std::net::Ipv4Addr;

/// IPv4 address as stored in maps: the four octets in wire order, read as a native u32.
pub fn ip_to_map(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ip_from_map(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// Port as stored in maps: network byte order.
pub fn port_to_map(p: u16) -> u16 {
    p.to_be()
}

pub fn port_from_map(v: u16) -> u16 {
    u16::from_be(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_wire_order() {
        let ip = Ipv4Addr::new(10, 96, 0, 1);
        assert_eq!(ip_from_map(ip_to_map(ip)), ip);
        assert_eq!(ip_to_map(ip).to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(port_to_map(80).to_ne_bytes(), [0, 80]);
        assert_eq!(port_from_map(port_to_map(8080)), 8080);
    }
}
