//! The conntrack lifecycle with the real agent: under a flood of short connections that
//! overfills a small table, held connections keep their backend (nothing established is
//! evicted), and closed flows are reclaimed so new ones keep getting through: by the
//! collector in the assured table (under pressure), by the LRU in the unassured one (a flow
//! that completes its handshake while the assured table is full stays there).
use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, TempDir, service_yaml, slice_yaml},
    client::{self, Held},
    harness::{PinDir, require_root},
    netns::Topology,
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const HELD: usize = 2_000;
const NEW_FLOWS: u32 = 20_000;
const THREADS: u32 = 4;

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn held_connections_survive_a_flood_that_overfills_conntrack() {
    require_root("held_connections_survive_a_flood_that_overfills_conntrack");
    let mut topo = Topology::single_node(4, 40).expect("topology");
    for i in 1..4 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    let dir = TempDir::new("ebpf-proxy-ct-").expect("dir");
    let pins = PinDir::new();
    dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    let eps: Vec<(&str, Ipv4Addr)> = (1..4).map(|i| (topo.pods[i].name.as_str(), topo.pods[i].ip)).collect();
    dir.write("web-slice.yaml", &slice_yaml("web", "web-abc", &eps, 8080, "TCP")).unwrap();
    let d = dir.0.to_str().unwrap().to_string();
    let agent = Agent::start(
        &topo.node,
        &pins.0,
        10270,
        &["--manifests", &d, "--node-name", "node-a", "--max-conntrack", "8192"],
    )
    .expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready");
    let vip: SocketAddr = (VIP, 80).into();
    let client_ns = &topo.pods[0].ns;

    // 2,000 held connections: 4,000 of the 8,192 entries.
    let mut held: Vec<Held> =
        client_ns.run(|| (0..HELD).map(|i| Held::open(vip).unwrap_or_else(|e| panic!("held #{i}: {e}"))).collect());

    // 20,000 new short connections from four threads: ten times what the rest of the
    // table holds, so it only works if closed flows are reclaimed.
    let (ok, failed) = (AtomicU32::new(0), AtomicU32::new(0));
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                client_ns.run(|| {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    for _ in 0..NEW_FLOWS / THREADS {
                        if Instant::now() > deadline {
                            break;
                        }
                        match client::tcp_name(vip) {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            });
        }
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    let flood = t.elapsed();

    // Every held connection still reaches the backend it started on.
    let mut lost = Vec::new();
    client_ns.run(|| {
        for (i, h) in held.iter_mut().enumerate() {
            match h.ask() {
                Ok(name) if name == h.first => {}
                other => lost.push((i, h.first.clone(), format!("{other:?}"))),
            }
        }
    });
    let removed = |r: &str| {
        agent.metric(&topo.node, &format!("ebpf_proxy_conntrack_gc_deleted_total{{reason=\"{r}\"}}")).unwrap_or(0.0)
    };
    let pressure = removed("pressure");
    let deleted: f64 = pressure + removed("expired") + removed("orphan");
    let full = agent.metric(&topo.node, "ebpf_proxy_conntrack_full_drops_total").unwrap_or(0.0);
    eprintln!(
        "flood of {NEW_FLOWS} in {flood:?}: {ok} ok, {failed} failed; {} of {HELD} held lost; GC removed {deleted} entries; {full} new flows dropped while full",
        lost.len()
    );
    assert!(lost.is_empty(), "held connections lost: {:?}", &lost[..lost.len().min(5)]);
    // 2,000 held flows fill half the assured table: the flood's closed flows push it over 90 %,
    // and the collector removes them there (the rest of the flood never left the LRU).
    assert!(pressure > 0.0, "the collector reclaimed closed flows under pressure ({deleted} entries in all)");
    assert!(ok >= NEW_FLOWS * 9 / 10, "new flows kept getting through: {ok} ok, {failed} failed");
    drop(agent);
}
