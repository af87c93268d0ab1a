//! Addresses and CIDRs as they appear in Kubernetes objects and flags, parsed the way
//! kube-proxy parses them: with `netutils.ParseIPSloppy` / `ParseCIDRSloppy`
//! (k8s.io/utils/net), which accept IPv4 octets with leading zeros and read them as decimal
//! (`172.30.0.041` is 172.30.0.41). Objects stored before the API server validated that
//! still carry such addresses, and kube-proxy serves them; a strict parser would drop the
//! whole Service. One CIDR type serves `--nodeport-addresses` and
//! `loadBalancerSourceRanges`.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use super::types::Ipv4Prefix;

/// An IPv4 address whose octets may carry leading zeros (decimal, as Go's parser before
/// 1.17 and `ParseIPSloppy` read them), or any IPv6 address.
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    if s.contains(':') {
        return s.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
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

/// Why a CIDR was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CidrError {
    /// A valid IPv6 CIDR: the IPv4 datapath does not use it (yet).
    Ipv6,
    Invalid,
}

impl FromStr for Ipv4Prefix {
    type Err = CidrError;

    /// "a.b.c.d/len", sloppy about leading zeros like `ParseCIDRSloppy`; host bits are
    /// masked off, as Go's `net.ParseCIDR` does.
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (addr, len) = s.trim().split_once('/').ok_or(CidrError::Invalid)?;
        let len: u8 = decimal(len).ok_or(CidrError::Invalid)?;
        match parse_ip_sloppy(addr).ok_or(CidrError::Invalid)? {
            IpAddr::V4(addr) if len <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                Ok(Ipv4Prefix { addr: Ipv4Addr::from(u32::from(addr) & mask), len })
            }
            IpAddr::V6(_) if len <= 128 => Err(CidrError::Ipv6),
            _ => Err(CidrError::Invalid),
        }
    }
}

impl Ipv4Prefix {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len.min(32))).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
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
        let p: Ipv4Prefix = "203.0.113.000/025".parse().unwrap();
        assert_eq!((p.addr, p.len), (Ipv4Addr::new(203, 0, 113, 0), 25));
        let p: Ipv4Prefix = "10.0.0.5/24".parse().unwrap();
        assert_eq!(p.addr, Ipv4Addr::new(10, 0, 0, 0));
        assert!(p.contains(Ipv4Addr::new(10, 0, 0, 200)) && !p.contains(Ipv4Addr::new(10, 0, 1, 1)));
        let all: Ipv4Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!("fd00::/64".parse::<Ipv4Prefix>(), Err(CidrError::Ipv6));
        for bad in ["10.0.0.0/33", "10.0.0.0", "10.0.0.0/", "10.0.0.0/x", "x/8", "fd00::/129"] {
            assert_eq!(bad.parse::<Ipv4Prefix>(), Err(CidrError::Invalid), "{bad}");
        }
    }
}
