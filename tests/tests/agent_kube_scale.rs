//! The real agent against the fake Kubernetes API server at 2,000 Services: everything is
//! programmed at start, then a stream of EndpointSlice updates (to many Services and many
//! times to one) all lands in the pinned maps, those to one Service in order, and the
//! agent's event-to-map histogram counts them. Only external behaviour is checked (flags,
//! /metrics, pinned maps), so it holds whether the sync is full or incremental.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, TempDir},
    fake_apiserver::{FakeApiServer, ResourceKind, bind_in_netns, write_kubeconfig},
    harness::{PinDir, require_root},
    netns::{Netns, wait_for},
    scale::{self, PinnedServices},
};

const SERVICES: usize = 2_000;
const PER: usize = 3;
const UPDATES: usize = 50;
/// Every other update goes to this Service; the rest each to a different one.
const HOT: usize = 1_000;

/// Service and new address list of update `k`: its first endpoint replaced by a new address.
fn update(k: usize) -> (usize, Vec<Ipv4Addr>) {
    let svc = if k.is_multiple_of(2) { HOT } else { (k * 37) % SERVICES };
    let mut addrs = scale::endpoints(svc, PER);
    addrs[0] = scale::replacement(k);
    addrs.sort();
    (svc, addrs)
}

/// Which update a backend set of the hot Service comes from (`None`: the initial slice).
fn update_index(addrs: &[Ipv4Addr]) -> Option<usize> {
    let base = u32::from(scale::replacement(0));
    addrs.iter().find_map(|a| u32::from(*a).checked_sub(base).map(|k| k as usize))
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn kube_2000_services_and_a_slice_update_stream() {
    require_root("kube_2000_services_and_a_slice_update_stream");
    let started = Instant::now();
    let node = Netns::new("epk-scale-").expect("netns");
    let listener = bind_in_netns(&node.name, "127.0.0.1:6443".parse().unwrap()).expect("bind in netns");
    let api = FakeApiServer::start_background(listener).expect("fake apiserver");
    scale::load(&api, SERVICES, PER);
    let dir = TempDir::new("ebpf-proxy-kubeconfig-").unwrap();
    let kubeconfig = dir.0.join("kubeconfig");
    write_kubeconfig(&kubeconfig, "http://127.0.0.1:6443").unwrap();
    let pins = PinDir::new();
    let agent = Agent::start(
        &node,
        &pins.0,
        10259,
        &["--kubeconfig", kubeconfig.to_str().unwrap(), "--node-name", scale::NODE_NAME, "--sync-delay-ms", "0"],
    )
    .expect("agent");
    agent.wait_ready(&node, Duration::from_secs(30)).expect("ready");
    eprintln!("kube scale: {SERVICES} services ready {:?} after start", started.elapsed());

    // Every Service is programmed with exactly its slice's endpoints.
    assert_eq!(agent.metric(&node, "ebpf_proxy_services_programmed").unwrap(), SERVICES as f64);
    let maps = PinnedServices::open(&pins.0).expect("pinned maps");
    let mut expected: BTreeMap<usize, Vec<Ipv4Addr>> = BTreeMap::new();
    for i in 0..SERVICES {
        let mut want = scale::endpoints(i, PER);
        want.sort();
        assert_eq!(maps.backends(scale::vip(i), scale::PORT), Some(want.clone()), "service {i} at start");
        expected.insert(i, want);
    }
    let count = |what: &str| agent.metric(&node, "ebpf_proxy_event_to_map_seconds_count").expect(what);
    let before = count("event_to_map count after start");
    assert!(before > 0.0, "the initial sync is an event burst too: count {before}");

    // The stream; the hot Service is sampled after each update: what the maps show of it
    // never goes back to an older update.
    let mut seen_hot = Vec::new();
    for k in 0..UPDATES {
        let (svc, addrs) = update(k);
        api.apply_json(ResourceKind::EndpointSlice, [scale::slice(svc, &addrs)]);
        expected.insert(svc, addrs);
        std::thread::sleep(Duration::from_millis(10));
        if let Some(b) = maps.backends(scale::vip(HOT), scale::PORT) {
            seen_hot.push(update_index(&b));
        }
    }
    assert!(seen_hot.windows(2).all(|w| w[0] <= w[1]), "hot service went back to an older update: {seen_hot:?}");
    let mut steps = seen_hot.clone();
    steps.dedup();
    eprintln!("kube scale: hot service seen at {} distinct updates while streaming", steps.len());

    // Every change ends up in the maps, the last update of each Service winning, and no
    // other Service is touched.
    let changed: Vec<usize> = (0..UPDATES).map(|k| update(k).0).collect();
    let t = Instant::now();
    wait_for(Duration::from_secs(10), "every update in the maps", || {
        changed.iter().all(|i| maps.backends(scale::vip(*i), scale::PORT).as_ref() == expected.get(i)).then_some(())
    })
    .unwrap_or_else(|e| {
        let wrong: Vec<_> = changed
            .iter()
            .filter(|i| maps.backends(scale::vip(**i), scale::PORT).as_ref() != expected.get(i))
            .map(|i| (*i, maps.backends(scale::vip(*i), scale::PORT), expected[i].clone()))
            .collect();
        panic!("{e}: services not as their last slice says (service, maps, slice): {wrong:?}")
    });
    eprintln!("kube scale: {UPDATES} updates streamed, all visible {:?} after the last", t.elapsed());
    let (_, last_hot) = update(UPDATES - 2);
    assert_eq!(maps.backends(scale::vip(HOT), scale::PORT), Some(last_hot), "hot service ends at its last update");
    for (i, want) in &expected {
        assert_eq!(maps.backends(scale::vip(*i), scale::PORT).as_ref(), Some(want), "service {i} after the stream");
    }

    // The agent's own latency histogram counted the stream's bursts.
    let after = wait_for(Duration::from_secs(5), "event_to_map count to grow", || {
        Some(count("event_to_map count after the stream")).filter(|c| *c > before)
    })
    .unwrap();
    eprintln!("kube scale: event_to_map count {before} -> {after}; whole test {:?}", started.elapsed());
    drop(agent);
}
