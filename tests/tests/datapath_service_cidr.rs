//! Service CIDRs (issue 24 item 3, KEP-1880), as a table run for both families on the
//! programs' own test runs: a new flow to an address inside a Service CIDR that no frontend
//! holds is refused (TCP reset, ICMP port unreachable from pods; on the uplink a reset, UDP
//! dropped) and counted `unallocated_service_ip`; a pod's flow to a ClusterIP on a port it
//! does not serve is refused too (`cluster_ip_unknown_port`, kube-proxy's nftables
//! `cluster-ips-check`); allocated ClusterIPs are served; addresses outside every CIDR are
//! left alone. And the CIDRs follow the desired state: removed, nothing is refused.
use std::{cell::RefCell, net::IpAddr};

use proxy_common::verdict;
use proxy_tests::{
    family::*,
    frames::check_port_unreachable,
    harness::{TestDataplane, require_root, tcp},
};
use proxy_userspace::model::{DesiredState, FrontendKind, IpPrefix, Protocol, Scope};

/// Where a row's packet goes.
#[derive(Clone, Copy, Debug)]
enum Dest {
    /// Inside the Service CIDR, held by no frontend.
    Unallocated,
    /// The ClusterIP, on a port it serves (TCP 80, UDP 53).
    ClusterIp,
    /// The ClusterIP on port 81, which it does not serve.
    ClusterIpOtherPort,
    /// Outside every Service CIDR, no frontend.
    Outside,
}

#[derive(Clone, Copy, Debug)]
enum Answer {
    /// RST|ACK from the dialled address, ack = SYN's seq + 1.
    Reset,
    PortUnreachable,
    Drop,
    /// Destination translated to one of the ClusterIP's backends.
    Served,
    /// Passed as it came.
    Untouched,
}

#[derive(Clone, Copy, Debug)]
struct Row {
    name: &'static str,
    hook: Hook,
    proto: Protocol,
    dest: Dest,
    answer: Answer,
    /// The verdict it is counted under.
    verdict: u32,
}

const ROWS: &[Row] = &[
    Row {
        name: "pod SYN to an unallocated address in the CIDR: reset",
        hook: Hook::Pod,
        proto: Protocol::Tcp,
        dest: Dest::Unallocated,
        answer: Answer::Reset,
        verdict: verdict::UNALLOCATED_SERVICE_IP,
    },
    Row {
        name: "pod UDP to an unallocated address in the CIDR: port unreachable",
        hook: Hook::Pod,
        proto: Protocol::Udp,
        dest: Dest::Unallocated,
        answer: Answer::PortUnreachable,
        verdict: verdict::UNALLOCATED_SERVICE_IP,
    },
    Row {
        name: "uplink SYN to an unallocated address in the CIDR: reset",
        hook: Hook::Uplink,
        proto: Protocol::Tcp,
        dest: Dest::Unallocated,
        answer: Answer::Reset,
        verdict: verdict::UNALLOCATED_SERVICE_IP,
    },
    Row {
        name: "uplink UDP to an unallocated address in the CIDR: dropped",
        hook: Hook::Uplink,
        proto: Protocol::Udp,
        dest: Dest::Unallocated,
        answer: Answer::Drop,
        verdict: verdict::UNALLOCATED_SERVICE_IP,
    },
    Row {
        name: "pod SYN to the allocated ClusterIP: served",
        hook: Hook::Pod,
        proto: Protocol::Tcp,
        dest: Dest::ClusterIp,
        answer: Answer::Served,
        verdict: verdict::NEW_FLOW,
    },
    Row {
        name: "pod UDP to the allocated ClusterIP: served",
        hook: Hook::Pod,
        proto: Protocol::Udp,
        dest: Dest::ClusterIp,
        answer: Answer::Served,
        verdict: verdict::NEW_FLOW,
    },
    Row {
        name: "pod SYN to a port the ClusterIP does not serve: reset (kube-proxy's cluster-ips-check)",
        hook: Hook::Pod,
        proto: Protocol::Tcp,
        dest: Dest::ClusterIpOtherPort,
        answer: Answer::Reset,
        verdict: verdict::CLUSTER_IP_UNKNOWN_PORT,
    },
    Row {
        name: "uplink SYN to the ClusterIP (not served from outside): untouched",
        hook: Hook::Uplink,
        proto: Protocol::Tcp,
        dest: Dest::ClusterIp,
        answer: Answer::Untouched,
        verdict: verdict::PASS,
    },
    Row {
        name: "pod SYN outside every Service CIDR: untouched",
        hook: Hook::Pod,
        proto: Protocol::Tcp,
        dest: Dest::Outside,
        answer: Answer::Untouched,
        verdict: verdict::PASS,
    },
    Row {
        name: "pod UDP outside every Service CIDR: untouched",
        hook: Hook::Pod,
        proto: Protocol::Udp,
        dest: Dest::Outside,
        answer: Answer::Untouched,
        verdict: verdict::PASS,
    },
    Row {
        name: "uplink SYN outside every Service CIDR: untouched",
        hook: Hook::Uplink,
        proto: Protocol::Tcp,
        dest: Dest::Outside,
        answer: Answer::Untouched,
        verdict: verdict::PASS,
    },
];

/// The family's Service CIDR (the ClusterIP `a.vip` is inside it), an unallocated address
/// inside it and an address outside it.
fn cidr(fam: Family) -> (IpPrefix, IpAddr, IpAddr) {
    (
        prefix(fam.pick("10.96.0.0", "fd00:10:96::"), if fam == Family::V4 { 16 } else { 112 }),
        fam.pick("10.96.0.99", "fd00:10:96::99"),
        fam.pick("10.97.0.5", "fd00:10:97::5"),
    )
}

/// The ClusterIP (TCP 80 and UDP 53, three backends) and the family's Service CIDR.
fn desired(fam: Family, with_cidr: bool) -> DesiredState {
    let a = fam.addrs();
    let backends: Vec<(IpAddr, u16, bool)> = a.backends().iter().map(|b| (*b, 8080, true)).collect();
    let mut d = DesiredState::default();
    d.frontends.insert(
        fk(a.vip, 80, Protocol::Tcp, Scope::Internal),
        std::sync::Arc::new(svc(FrontendKind::ClusterIP, &backends)),
    );
    d.frontends.insert(
        fk(a.vip, 53, Protocol::Udp, Scope::Internal),
        std::sync::Arc::new(svc(FrontendKind::ClusterIP, &backends)),
    );
    if with_cidr {
        d.service_cidrs.insert(cidr(fam).0);
    }
    d
}

fn seed(fam: Family) -> TestDataplane {
    let mut dp = TestDataplane::load();
    let r = dp.syncer.apply(&desired(fam, true));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    dp
}

fn frame(fam: Family, proto: Protocol, src: (IpAddr, u16), dst: (IpAddr, u16)) -> Vec<u8> {
    match proto {
        Protocol::Tcp => fam.segment(src, dst, tcp::SYN, b""),
        _ => fam.udp(src, dst, b"query"),
    }
}

fn check(fam: Family, row: &Row, dst: (IpAddr, u16), src: (IpAddr, u16), f: &[u8], rc: i32, out: &[u8]) {
    let a = fam.addrs();
    match row.answer {
        Answer::Reset => {
            assert_eq!(rc, row.hook.answer(), "answered back where it came from");
            let d = decode_any(out);
            assert_eq!((d.src, d.dst), (dst, src), "from the dialled address to the client");
            assert_eq!(d.tcp_flags, tcp::RST | tcp::ACK, "RST|ACK");
            assert!(d.ip_csum_ok && d.l4_csum_ok, "{d:?}");
            let l4 = fam.l4();
            assert_eq!(u32::from_be_bytes(out[l4 + 8..l4 + 12].try_into().unwrap()), 1000 + 1, "ack");
        }
        Answer::PortUnreachable => {
            assert_eq!(rc, row.hook.answer(), "answered back where it came from");
            assert_eq!(check_port_unreachable(f, out), Ok(true), "port unreachable, checksums, quote");
        }
        Answer::Drop => assert_eq!((rc, out), (row.hook.drop(), f), "dropped untouched"),
        Answer::Served => {
            assert_eq!(rc, row.hook.pass(), "translated and let go");
            let d = decode_any(out);
            assert!(a.backends().contains(&d.dst.0) && d.dst.1 == 8080, "to a backend: {d:?}");
            assert!(d.ip_csum_ok && d.l4_csum_ok, "{d:?}");
        }
        Answer::Untouched => assert_eq!((rc, out), (row.hook.pass(), f), "passed untouched"),
    }
}

#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn unallocated_service_ips_are_refused_both_families() {
    require_root("unallocated_service_ips_are_refused_both_families");
    let dps = [RefCell::new(seed(Family::V4)), RefCell::new(seed(Family::V6))];
    let cases =
        Family::ALL.iter().flat_map(|f| ROWS.iter().map(move |r| (format!("{} {}", f.name(), r.name), (*f, r))));
    let port = std::sync::atomic::AtomicU16::new(40000);
    run_cases(cases, |(fam, row)| {
        let a = fam.addrs();
        let (_, unallocated, outside) = cidr(fam);
        let svc_port = if row.proto == Protocol::Tcp { 80 } else { 53 };
        let dst = match row.dest {
            Dest::Unallocated => (unallocated, svc_port),
            Dest::ClusterIp => (a.vip, svc_port),
            Dest::ClusterIpOtherPort => (a.vip, 81),
            Dest::Outside => (outside, svc_port),
        };
        let src = (row.hook.client(&a), port.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let f = frame(fam, row.proto, src, dst);
        let mut dp = dps[fam as usize].borrow_mut();
        let before = dp.global_in(fam.stats(), row.verdict);
        let ct_before = dp.maps().ct_len();
        let (rc, out) = dp.run(row.hook.forward(), &f);
        check(fam, row, dst, src, &f, rc, &out);
        assert_eq!(dp.global_in(fam.stats(), row.verdict), before + 1, "counted {}", vname(row.verdict));
        if !matches!(row.answer, Answer::Served) {
            assert_eq!(dp.maps().ct_len(), ct_before, "nothing tracked");
        }
    });
}

fn vname(v: u32) -> &'static str {
    proxy_common::Verdict::ALL[v as usize].name()
}

/// The CIDRs follow the desired state through the sync: removed, the same unallocated
/// address passes untouched; added back, it is refused again. Only the CIDR and the
/// ClusterIP's host entry are written.
#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn service_cidr_changes_take_effect() {
    require_root("service_cidr_changes_take_effect");
    for fam in Family::ALL {
        let a = fam.addrs();
        let (_, unallocated, _) = cidr(fam);
        let mut dp = seed(fam);
        let syn = fam.segment((a.client, 41000), (unallocated, 80), tcp::SYN, b"");
        assert_eq!(dp.run(FROM_POD, &syn).0, TC_ACT_REDIRECT, "{}: refused with the CIDR", fam.name());

        let r = dp.syncer.apply(&desired(fam, false));
        assert_eq!(r.writes, 2, "{}: the CIDR and the ClusterIP's host entry deleted", fam.name());
        let (rc, out) = dp.run(FROM_POD, &syn);
        assert_eq!((rc, &out), (TC_ACT_UNSPEC, &syn), "{}: untouched without it", fam.name());
        let r = dp.syncer.apply(&desired(fam, false));
        assert_eq!(r.writes, 0, "{}: nothing changed, nothing written", fam.name());

        dp.syncer.apply(&desired(fam, true));
        assert_eq!(dp.run(FROM_POD, &syn).0, TC_ACT_REDIRECT, "{}: refused again", fam.name());
    }
}
