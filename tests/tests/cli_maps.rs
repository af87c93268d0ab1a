//! `ebpf-proxy maps` lists every map of the catalogue with its pin (entries, size, fill,
//! layout), and `verify` and `trace` check the maps their catalogue column names before
//! reading: a missing pin is named, not met half-way through a read (issue 22 item 1).
use std::{net::Ipv4Addr, process::Command};

use proxy_tests::{
    agent::{TempDir, cli, ebpf_proxy_bin, service_yaml, slice_yaml},
    harness::{TestDataplane, entry, frontend, require_root, state},
};
use proxy_userspace::{dataplane::maps::catalogue::MAPS, model::Protocol};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 71);
const B1: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 1);
const B2: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 2);

fn maps_json(dp: &TestDataplane) -> Vec<Value> {
    let out = cli(&["maps", "--bpffs-root", dp.pins.0.to_str().unwrap(), "-o", "json"]).expect("ebpf-proxy maps");
    serde_json::from_str::<Vec<Value>>(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no row {name} in {rows:?}"))
}

/// (exit code, stderr) of the CLI.
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(ebpf_proxy_bin().unwrap()).args(args).output().expect("run ebpf-proxy");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn maps_lists_every_catalogue_map_with_its_entries() {
    require_root("maps_lists_every_catalogue_map_with_its_entries");
    let mut dp = TestDataplane::load();
    let r = dp.syncer.apply(&state(vec![(frontend(VIP, 80, Protocol::Tcp), entry("web", &[(B1, 8080), (B2, 8080)]))]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);

    let rows = maps_json(&dp);
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    let catalogue: Vec<&str> = MAPS.iter().map(|m| m.name).collect();
    assert_eq!(names, catalogue, "one row per catalogue map, in catalogue order");
    for r in &rows {
        assert_eq!(r["status"], "ok", "{r}");
    }
    // One frontend, its two backends and their slots; nothing in conntrack yet.
    assert_eq!(row(&rows, "SERVICES")["entries"], 1);
    assert_eq!(row(&rows, "SERVICES")["family"], "IPv4");
    assert_eq!(row(&rows, "SERVICES")["type"], "hash");
    assert_eq!(row(&rows, "SERVICES")["sized_by"], "max-services");
    assert_eq!(row(&rows, "BACKENDS")["entries"], 2);
    assert_eq!(row(&rows, "SERVICES6")["entries"], 0);
    assert_eq!(row(&rows, "CONNTRACK")["entries"], 0);
    // Arrays hold every index.
    let node = row(&rows, "NODE_CONFIG");
    assert_eq!(
        (node["entries"].clone(), node["max_entries"].clone(), node["family"].clone()),
        (1.into(), 1.into(), "IPv4".into())
    );
    assert!(row(&rows, "BACKEND_SLOTS")["entries"].as_u64().unwrap() >= 2);

    // The table: a header and one line per map, FILL of SERVICES as a percentage.
    let table = cli(&["maps", "--bpffs-root", dp.pins.0.to_str().unwrap()]).expect("table");
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("MAP"), "{table}");
    assert_eq!(lines.count(), MAPS.len(), "{table}");
    let services = table.lines().find(|l| l.starts_with("SERVICES ")).expect("SERVICES line");
    assert!(services.contains(" ok"), "{services}");
}

#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn verify_and_trace_name_a_map_that_is_not_pinned() {
    require_root("verify_and_trace_name_a_map_that_is_not_pinned");
    let mut dp = TestDataplane::load();
    let r = dp.syncer.apply(&state(vec![(frontend(VIP, 80, Protocol::Tcp), entry("web", &[(B1, 8080)]))]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let root = dp.pins.0.to_str().unwrap().to_string();
    // SERVICES: a map both verify and trace read (the catalogue says so).
    let meta = MAPS.iter().find(|m| m.name == "SERVICES").unwrap();
    assert!(meta.verify_reads && meta.trace_seeds);
    std::fs::remove_file(dp.pins.0.join("maps").join("SERVICES")).expect("unpin SERVICES");

    let rows = maps_json(&dp);
    assert_eq!(row(&rows, "SERVICES")["status"], "absent");
    assert_eq!(row(&rows, "BACKENDS")["status"], "ok");

    let dir = TempDir::new("ebpf-proxy-maps-").unwrap();
    dir.write("web.yaml", &service_yaml("web", &VIP.to_string(), 80, 8080, "TCP")).unwrap();
    dir.write("web-slice.yaml", &slice_yaml("web", "web-1", &[("pod1", B1)], 8080, "TCP")).unwrap();
    let (code, err) =
        run(&["verify", "--manifests", dir.0.to_str().unwrap(), "--node-name", "node-a", "--bpffs-root", &root]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("map SERVICES is not pinned"), "{err}");

    let (code, err) = run(&["trace", "--bpffs-root", &root, "--from", "10.244.0.5:40000", "--to", "10.96.0.71:80"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("map SERVICES is not pinned"), "{err}");
}
