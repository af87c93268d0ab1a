//! Addresses and CIDRs as they appear in Kubernetes objects and flags, parsed the way
//! kube-proxy parses them: with `netutils.ParseIPSloppy` / `ParseCIDRSloppy`
//! (k8s.io/utils/net), which accept IPv4 octets with leading zeros and read them as decimal
//! (`172.30.0.041` is 172.30.0.41). Objects stored before the API server validated that
//! still carry such addresses, and kube-proxy serves them; a strict parser would drop the
//! whole Service. One CIDR type (both families) serves `--nodeport-addresses` and
//! `loadBalancerSourceRanges`.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use super::types::{IpFamily, IpPrefix};

/// An IPv4 address whose octets may carry leading zeros (decimal, as Go's parser before
/// 1.17 and `ParseIPSloppy` read them), or any IPv6 address.
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    // Canonical text (nearly every address an API server hands out) in std's parser, which
    // takes any IPv6 address and every IPv4 address without leading zeros; the sloppy
    // reading only for what it refuses.
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Some(addr);
    }
    if s.contains(':') {
        return None;
    }
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        let part = parts.next()?;
        *o = decimal(part)?;
    }
    parts.next().is_none().then(|| IpAddr::V4(Ipv4Addr::from(octets)))
}

/// Digits only (no sign, no spaces), at least one; leading zeros are fine (the value
/// decides, not the width).
fn decimal<T: FromStr>(s: &str) -> Option<T> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

/// A CIDR that does not parse (the caller names the object and the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidCidr;

impl FromStr for IpPrefix {
    type Err = InvalidCidr;

    /// "a.b.c.d/len" or an IPv6 "addr/len", sloppy about IPv4 leading zeros like
    /// `ParseCIDRSloppy`; host bits are masked off, as Go's `net.ParseCIDR` does.
    fn from_str(s: &str) -> Result<Self, InvalidCidr> {
        let (addr, len) = s.trim().split_once('/').ok_or(InvalidCidr)?;
        let len: u8 = decimal(len).ok_or(InvalidCidr)?;
        match parse_ip_sloppy(addr).ok_or(InvalidCidr)? {
            IpAddr::V4(addr) if len <= 32 => {
                Ok(IpPrefix { addr: IpAddr::V4(Ipv4Addr::from(u32::from(addr) & mask_v4(len))), len })
            }
            IpAddr::V6(addr) if len <= 128 => {
                Ok(IpPrefix { addr: IpAddr::V6(Ipv6Addr::from(u128::from(addr) & mask_v6(len))), len })
            }
            _ => Err(InvalidCidr),
        }
    }
}

fn mask_v4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len.min(32))).unwrap_or(0)
}

fn mask_v6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len.min(128))).unwrap_or(0)
}

impl IpPrefix {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.addr)
    }

    /// Whether `ip` is in the prefix; an address of the other family never is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask_v4(self.len) == u32::from(net) & mask_v4(self.len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask_v6(self.len) == u128::from(net) & mask_v6(self.len)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Option<Ipv4Addr> {
        match parse_ip_sloppy(s)? {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }

    /// Rows follow k8s.io/utils/net ParseIPSloppy's behaviour (Go 1.16's parser).
    #[test]
    fn ipv4_with_leading_zeros_is_decimal() {
        let rows: &[(&str, Option<[u8; 4]>)] = &[
            ("172.30.0.041", Some([172, 30, 0, 41])),
            ("10.180.00.001", Some([10, 180, 0, 1])),
            ("010.010.010.010", Some([10, 10, 10, 10])),
            ("0000255.0.0.0", Some([255, 0, 0, 0])),
            ("10.96.0.10", Some([10, 96, 0, 10])),
            ("1.2.3.256", None),
            ("1.2.3", None),
            ("1.2.3.4.5", None),
            ("1..3.4", None),
            ("1.2.3.-4", None),
            ("1.2.3. 4", None),
            ("", None),
        ];
        for (s, want) in rows {
            assert_eq!(v4(s), want.map(Ipv4Addr::from), "{s:?}");
        }
        assert_eq!(parse_ip_sloppy("fd00::10"), Some(IpAddr::V6("fd00::10".parse().unwrap())));
    }

    #[test]
    fn cidrs_are_sloppy_and_masked() {
        let p: IpPrefix = "203.0.113.000/025".parse().unwrap();
        assert_eq!((p.addr, p.len), (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)), 25));
        let p: IpPrefix = "10.0.0.5/24".parse().unwrap();
        assert_eq!(p.addr, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)));
        assert!(p.contains("10.0.0.200".parse().unwrap()) && !p.contains("10.0.1.1".parse().unwrap()));
        let all: IpPrefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        // An IPv4 prefix never contains an IPv6 address, even ::/0 against IPv4-mapped ones.
        assert!(!all.contains("::ffff:1.2.3.4".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0.0", "10.0.0.0/", "10.0.0.0/x", "x/8", "fd00::/129", "fd00::/-1"] {
            assert_eq!(bad.parse::<IpPrefix>(), Err(InvalidCidr), "{bad}");
        }
    }

    /// IPv6 CIDRs (loadBalancerSourceRanges, `--nodeport-addresses`) parse like Go's
    /// `net.ParseCIDR`: host bits masked, the family kept apart.
    #[test]
    fn ipv6_cidrs() {
        let p: IpPrefix = "2001:db8:1::5/48".parse().unwrap();
        assert_eq!((p.addr, p.len, p.family()), ("2001:db8:1::".parse().unwrap(), 48, IpFamily::V6));
        assert_eq!(p.to_string(), "2001:db8:1::/48");
        assert!(p.contains("2001:db8:1:ffff::1".parse().unwrap()));
        assert!(!p.contains("2001:db8:2::1".parse().unwrap()));
        assert!(!p.contains("10.0.0.1".parse().unwrap()));
        let all: IpPrefix = "::/0".parse().unwrap();
        assert!(all.contains("fd00::1".parse().unwrap()) && !all.contains("1.2.3.4".parse().unwrap()));
        let host: IpPrefix = "fd00::1/128".parse().unwrap();
        assert!(host.contains("fd00::1".parse().unwrap()) && !host.contains("fd00::2".parse().unwrap()));
    }
}
