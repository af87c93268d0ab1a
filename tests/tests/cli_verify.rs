//! `ebpf-proxy verify` against a running agent's maps (issue 14): the maps agree with the
//! manifests (exit 0), then entries are altered behind the agent's back — a frontend
//! deleted, a backend changed — and each drift is reported (exit 1, in text and JSON), and
//! the agent's own periodic check exports it in `datapath_drift`. The Service CIDR entries
//! are compared too: verify judges by the same `--service-cidr` as the agent.
use std::{net::Ipv4Addr, process::Command, time::Duration};

use aya::maps::{HashMap, Map, MapData};
use proxy_common::port_to_map;
use proxy_common::{Backend, PROTO_TCP, SCOPE_INTERNAL, ServiceKey, ServiceValue};
use proxy_tests::{
    agent::{Agent, TempDir, ebpf_proxy_bin, service_yaml, slice_yaml},
    harness::{PinDir, require_root},
    netns::{Topology, wait_for},
};
use proxy_userspace::dataplane::maps::addr::ip_to_map;
use serde_json::Value;

fn open<K: aya::Pod, V: aya::Pod>(pins: &PinDir, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(pins.0.join("maps").join(name)).expect("pinned map");
    HashMap::try_from(Map::from_map_data(data).expect("map")).expect("hash map")
}

/// The agent's `--service-cidr`.
const CIDR: &str = "10.96.0.0/16";

/// (exit code, stdout) of `ebpf-proxy verify ...`.
fn verify(dir: &TempDir, pins: &PinDir, extra: &[&str]) -> (i32, String) {
    let out = Command::new(ebpf_proxy_bin().unwrap())
        .args(["verify", "--manifests", dir.0.to_str().unwrap(), "--node-name", "node-a", "--bpffs-root"])
        .arg(&pins.0)
        .args(extra)
        .output()
        .expect("run ebpf-proxy verify");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn verify_reports_drift_made_behind_the_agents_back() {
    require_root("verify_reports_drift_made_behind_the_agents_back");
    let topo = Topology::single_node(3, 63).expect("topology");
    let dir = TempDir::new("ebpf-proxy-verify-").expect("dir");
    let pins = PinDir::new();
    for (name, vip) in [("web", "10.96.0.63"), ("api", "10.96.0.64")] {
        dir.write(&format!("{name}.yaml"), &service_yaml(name, vip, 80, 8080, "TCP")).unwrap();
        let eps: Vec<(&str, Ipv4Addr)> = topo.pods[1..].iter().map(|p| (p.name.as_str(), p.ip)).collect();
        dir.write(&format!("{name}-slice.yaml"), &slice_yaml(name, &format!("{name}-1"), &eps, 8080, "TCP")).unwrap();
    }
    let d = dir.0.to_str().unwrap().to_string();
    let args =
        ["--manifests", d.as_str(), "--node-name", "node-a", "--verify-interval-secs", "1", "--service-cidr", CIDR];
    let agent = Agent::start(&topo.node, &pins.0, 10294, &args).expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready");

    let (code, out) = verify(&dir, &pins, &["--service-cidr", CIDR]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no drift"), "{out}");
    // Judged without the Service CIDR, the maps hold its entries for nothing: the CIDR and
    // the two ClusterIPs' host entries.
    let (code, out) = verify(&dir, &pins, &[]);
    assert_eq!(code, 1, "{out}");
    for line in [
        "10.96.0.0/16: Service CIDR entry service-cidr, want absent",
        "10.96.0.63/32: Service CIDR entry cluster-ip, want absent",
        "10.96.0.64/32: Service CIDR entry cluster-ip, want absent",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} in {out}");
    }

    // Behind the agent's back: delete web's frontend, move one of api's backends.
    let mut services: HashMap<MapData, ServiceKey, ServiceValue> = open(&pins, "SERVICES");
    let key = |vip: [u8; 4]| ServiceKey {
        addr: ip_to_map(Ipv4Addr::from(vip)),
        port: port_to_map(80),
        proto: PROTO_TCP,
        scope: SCOPE_INTERNAL,
    };
    services.remove(&key([10, 96, 0, 63])).expect("delete web's frontend");
    let mut backends: HashMap<MapData, u32, Backend> = open(&pins, "BACKENDS");
    let pod2 = ip_to_map(topo.pods[2].ip);
    let (id, mut b) = backends.iter().filter_map(Result::ok).find(|(_, b)| b.addr == pod2).expect("pod2's backend");
    b.port = port_to_map(9999);
    backends.insert(id, b, 0).expect("change a backend");

    let (code, out) = verify(&dir, &pins, &["--service-cidr", CIDR]);
    assert_eq!(code, 1, "{out}");
    assert!(!out.contains("Service CIDR"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("10.96.0.63:80/TCP internal") && l.contains("missing")), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("10.96.0.64:80/TCP internal")
            && l.contains(&format!("{}:8080", topo.pods[2].ip))
            && l.contains(&format!("{}:9999", topo.pods[2].ip))),
        "{out}"
    );
    let (code, json) = verify(&dir, &pins, &["-o", "json", "--service-cidr", CIDR]);
    assert_eq!(code, 1);
    let drift: Value = serde_json::from_str(&json).expect("JSON");
    let kinds: Vec<&str> = drift.as_array().unwrap().iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"missing") && kinds.contains(&"backends"), "{json}");

    // The agent's periodic check sees the same.
    let drift = topo
        .node
        .run(|| {
            wait_for(Duration::from_secs(5), "datapath_drift > 0", || {
                agent.metric(&topo.node, "ebpf_proxy_datapath_drift").ok().filter(|v| *v > 0.0)
            })
        })
        .expect("drift gauge");
    assert!(drift >= 2.0, "datapath_drift {drift}");

    // An unreadable root is an error (exit 2), not "no drift".
    let missing = PinDir::new();
    let (code, _) = verify(&dir, &missing, &[]);
    assert_eq!(code, 2);
}
