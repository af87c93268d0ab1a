//! SCTP through the datapath (issue 24 item 5): SCTP's CRC32c covers its ports and the
//! datapath does not update it, so a new flow whose ports would be rewritten (a targetPort
//! other than the port; a source-NATed NodePort flow) is refused and counted
//! `sctp_port_nat`, with no conntrack entry, instead of forwarded with a checksum the
//! receiver drops. A frontend whose backends listen on its own port keeps working (only
//! addresses change, which the CRC does not cover). Both families.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proxy_common::{StatsFamily, verdict};
use proxy_tests::{
    frames::sctp_any,
    harness::{TestDataplane, entry, require_root, state},
};
use proxy_userspace::model::{BackendAddr, FrontendKey, Protocol, Scope};

const TC_ACT_SHOT: i32 = 2;
const ETH: usize = 14;

fn key(addr: IpAddr, port: u16) -> FrontendKey {
    FrontendKey { addr, port, proto: Protocol::Sctp, scope: Scope::Internal }
}

/// The destination address and the two ports of an SCTP frame.
fn dst_and_ports(f: &[u8]) -> (IpAddr, u16, u16) {
    let (dst, l4): (IpAddr, usize) = match f[ETH] >> 4 {
        4 => (Ipv4Addr::from(<[u8; 4]>::try_from(&f[ETH + 16..ETH + 20]).unwrap()).into(), ETH + 20),
        _ => (Ipv6Addr::from(<[u8; 16]>::try_from(&f[ETH + 24..ETH + 40]).unwrap()).into(), ETH + 40),
    };
    let port = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    (dst, port(l4), port(l4 + 2))
}

#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn sctp_port_rewrites_are_refused_and_counted_both_families() {
    require_root("sctp_port_rewrites_are_refused_and_counted_both_families");
    let mut dp = TestDataplane::load();
    let cases: [(IpAddr, IpAddr, IpAddr, StatsFamily); 2] = [
        (
            Ipv4Addr::new(10, 96, 0, 132).into(),
            Ipv4Addr::new(10, 244, 13, 2).into(),
            Ipv4Addr::new(10, 244, 13, 9).into(),
            StatsFamily::Ipv4,
        ),
        (
            "fd00:96::132".parse::<Ipv6Addr>().unwrap().into(),
            "fd00:244:13::2".parse::<Ipv6Addr>().unwrap().into(),
            "fd00:244:13::9".parse::<Ipv6Addr>().unwrap().into(),
            StatsFamily::Ipv6,
        ),
    ];
    let mut frontends = Vec::new();
    for (vip, backend, _, _) in cases {
        let be = |port| BackendAddr { addr: backend, port, local: true, terminating: false };
        // port 80 -> targetPort 8080: refused; port 9000 -> 9000: served.
        let mut remapped = entry("sctp", &[]);
        remapped.backends = vec![be(8080)];
        let mut same = entry("sctp-same", &[]);
        same.backends = vec![be(9000)];
        frontends.push((key(vip, 80), remapped));
        frontends.push((key(vip, 9000), same));
    }
    let r = dp.syncer.apply(&state(frontends));
    assert!(r.errors.is_empty(), "{:?}", r.errors);

    for (vip, backend, client, family) in cases {
        let refused = sctp_any((client, 40000), (vip, 80), &[0u8; 16]);
        let (rc, out) = dp.run("from_pod", &refused);
        assert_eq!(rc, TC_ACT_SHOT, "{family:?}: SCTP to {vip}:80 -> :8080 is dropped");
        assert_eq!(out, refused, "{family:?}: left as it was");
        assert_eq!(dp.global_in(family, verdict::SCTP_PORT_NAT), 1, "{family:?}: counted sctp_port_nat");
        assert_eq!(dp.global_in(family, verdict::NEW_FLOW), 0, "{family:?}: no flow created");

        let served = sctp_any((client, 40001), (vip, 9000), &[0u8; 16]);
        let (rc, out) = dp.run("from_pod", &served);
        assert_ne!(rc, TC_ACT_SHOT, "{family:?}: SCTP to {vip}:9000 -> :9000 is served");
        assert_eq!(dst_and_ports(&out), (backend, 40001, 9000), "{family:?}: only the address translated");
        assert_eq!(dp.global_in(family, verdict::NEW_FLOW), 1, "{family:?}");
    }
    // Nothing of the refused flows in conntrack: one forward and one reply entry per served
    // flow, in the new-flow table of each family.
    let maps = dp.maps();
    assert_eq!(maps.ct_new.keys().count() + maps.conntrack.keys().count(), 2, "IPv4 conntrack");
    assert_eq!(maps.ct_new6.keys().count() + maps.conntrack6.keys().count(), 2, "IPv6 conntrack");
}
