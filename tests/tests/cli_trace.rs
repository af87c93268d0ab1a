//! `ebpf-proxy trace` against a programmed datapath (issue 14): a service hit, a miss, a
//! tracked reply and a source-range drop, each with what the command printed checked, and
//! every live map byte-identical before and after the traces.
use std::net::{Ipv4Addr, Ipv6Addr};

use proxy_tests::{agent::cli, harness::*};
use proxy_userspace::model::{BackendAddr, FrontendKey, FrontendKind, IpPrefix, Protocol, Scope};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 1);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 244, 1, 1), Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3)];

fn trace(dp: &TestDataplane, args: &[&str]) -> Value {
    let root = dp.pins.0.to_str().unwrap();
    let mut full = vec!["trace", "--bpffs-root", root, "-o", "json"];
    full.extend_from_slice(args);
    let out = cli(&full).expect("ebpf-proxy trace");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn trace_reports_and_leaves_the_live_maps_alone() {
    require_root("trace_reports_and_leaves_the_live_maps_alone");
    let mut dp = TestDataplane::load();
    let backends: Vec<(Ipv4Addr, u16)> = BACKENDS.iter().map(|b| (*b, 8080)).collect();
    let mut lb = entry("lb", &backends);
    lb.kind = FrontendKind::LoadBalancer;
    lb.source_ranges = vec![IpPrefix { addr: Ipv4Addr::new(198, 51, 100, 0).into(), len: 24 }];
    // An IPv6 ClusterIP too, with an IPv6 backend.
    let mut web6 = entry("web6", &[]);
    web6.backends = vec![BackendAddr { addr: BACKEND6.into(), port: 8080, local: true, terminating: false }];
    let s = state(vec![
        (frontend(VIP, 80, Protocol::Tcp), entry("web", &backends)),
        (FrontendKey { addr: LB_IP.into(), port: 80, proto: Protocol::Tcp, scope: Scope::External }, lb),
        (FrontendKey { addr: VIP6.into(), port: 80, proto: Protocol::Tcp, scope: Scope::Internal }, web6),
    ]);
    let r = dp.syncer.apply(&s);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // A tracked flow through the live programs, for the reply trace.
    let (_, out) = dp.run("from_pod", &tcp_frame((CLIENT, 40000), (VIP, 80), b"hi"));
    let tracked_backend = decode(&out).dst;

    let before = dump_pinned_maps(&dp.pins.0.join("maps"));

    // A new connection to the ClusterIP: a backend of the service, destination rewritten.
    let hit = trace(&dp, &["--from", "10.244.0.5:41000", "--to", "10.96.0.10:80", "--syn"]);
    assert_eq!(hit["verdict"], "new_flow", "{hit:#}");
    assert_eq!(hit["program"], "from_pod");
    assert!(hit["frontend"]["address"].as_str().unwrap().starts_with("10.96.0.10:80"), "{hit:#}");
    assert_eq!(hit["frontend"]["service"], "default/web");
    let out_dst = hit["output"]["dst"].as_str().unwrap();
    assert!(BACKENDS.iter().any(|b| out_dst == format!("{b}:8080")), "rewritten to a backend: {hit:#}");
    assert_eq!(hit["output"]["src"], "10.244.0.5:41000");
    assert_eq!(hit["output"]["checksums_valid"], true);
    assert!(hit["backend"].as_str().unwrap().starts_with(out_dst), "{hit:#}");

    // Not a service: passed untouched.
    let miss = trace(&dp, &["--from", "10.244.0.5:41000", "--to", "10.96.0.99:80", "--syn"]);
    assert_eq!(miss["verdict"], "pass", "{miss:#}");
    assert_eq!(miss["untouched"], true);
    assert!(miss["frontend"].is_null());

    // The tracked flow's reply entering the client pod: the frontend back as source.
    let from = format!("{}:{}", tracked_backend.0, tracked_backend.1);
    let reply = trace(&dp, &["--from", &from, "--to", "10.244.0.5:40000", "--at", "pod-egress"]);
    assert_eq!(reply["verdict"], "reverse_nat", "{reply:#}");
    assert_eq!(reply["output"]["src"], "10.96.0.10:80");
    assert_eq!(reply["output"]["checksums_valid"], true);

    // An outside client not in the LB's source ranges: dropped on the uplink.
    let drop =
        trace(&dp, &["--from", &format!("{OUTSIDER}:5000"), "--to", "203.0.113.20:80", "--syn", "--at", "uplink"]);
    assert_eq!(drop["verdict"], "source_range_drop", "{drop:#}");
    assert!(drop["output"].is_null(), "nothing comes out of a drop: {drop:#}");
    assert!(drop["action"].as_str().unwrap().starts_with("XDP_DROP"));
    let allowed = trace(&dp, &["--from", "198.51.100.7:5000", "--to", "203.0.113.20:80", "--syn", "--at", "uplink"]);
    assert_eq!(allowed["verdict"], "new_flow", "{allowed:#}");

    // IPv6: a frame built with [addr]:port, through the IPv6 maps, live maps still untouched.
    let hit6 = trace(&dp, &["--from", "[fd00:10:244::5]:41000", "--to", "[fd00:96::10]:80", "--syn"]);
    assert_eq!(hit6["verdict"], "new_flow", "{hit6:#}");
    assert_eq!(hit6["frontend"]["service"], "default/web6");
    assert_eq!(hit6["output"]["dst"], "[fd00:244:1::1]:8080", "{hit6:#}");
    assert_eq!(hit6["output"]["checksums_valid"], true);
    let miss6 = trace(&dp, &["--from", "[fd00:10:244::5]:41000", "--to", "[fd00:96::11]:80", "--syn"]);
    assert_eq!((miss6["verdict"].as_str(), miss6["untouched"].as_bool()), (Some("pass"), Some(true)), "{miss6:#}");

    // Text output names the same facts.
    let root = dp.pins.0.to_str().unwrap();
    let text = cli(&["trace", "--bpffs-root", root, "--from", "10.244.0.5:41000", "--to", "10.96.0.10:80", "--syn"])
        .expect("text trace");
    assert!(text.contains("verdict:   new_flow") && text.contains("default/web"), "{text}");

    let after = dump_pinned_maps(&dp.pins.0.join("maps"));
    for (name, entries) in &before {
        assert_eq!(Some(entries), after.get(name), "live map {name} changed");
    }
    assert_eq!(before.len(), after.len());
    let leftovers: Vec<_> = std::fs::read_dir(dp.pins.0.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("ebpf-proxy-trace-"))
        .collect();
    assert!(leftovers.is_empty(), "private trace instances left behind: {leftovers:?}");
}
