//! The real agent in a node namespace, watching a fake Kubernetes API server (list/watch
//! protocol, 410 Gone, dropped watches) through a kubeconfig: the same kube-rs code path as
//! on a real cluster.
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use proxy_tests::{
    agent::{Agent, TempDir, cli, converge, service_yaml, slice_yaml, under_load},
    client,
    fake_apiserver::{FakeApiServer, bind_in_netns, write_kubeconfig},
    harness::{PinDir, require_root},
    netns::{Topology, wait_for},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

fn slice(topo: &Topology, pods: &[usize]) -> EndpointSlice {
    let eps: Vec<(&str, Ipv4Addr)> = pods.iter().map(|i| (topo.pods[*i].name.as_str(), topo.pods[*i].ip)).collect();
    serde_yaml::from_str(&slice_yaml("api", "api-1", &eps, 8080, "TCP")).unwrap()
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn kube_watch_scale_gone_and_delete() {
    require_root("kube_watch_scale_gone_and_delete");
    let mut topo = Topology::single_node(4, 20).expect("topology");
    for i in 1..4 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    let listener = bind_in_netns(&topo.node.name, "127.0.0.1:6443".parse().unwrap()).expect("bind in netns");
    let api = FakeApiServer::start_background(listener).expect("fake apiserver");
    let dir = TempDir::new("ebpf-proxy-kubeconfig-").unwrap();
    let kubeconfig = dir.0.join("kubeconfig");
    write_kubeconfig(&kubeconfig, "http://127.0.0.1:6443").unwrap();

    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"}]}
    }))
    .unwrap();
    api.apply_node(node);
    let svc: Service = serde_yaml::from_str(&service_yaml("api", "10.96.0.20", 80, 8080, "TCP")).unwrap();
    api.apply_service(svc);
    api.apply_endpointslice(slice(&topo, &[1, 2]));

    let pins = PinDir::new();
    let agent = Agent::start(
        &topo.node,
        &pins.0,
        10259,
        &["--kubeconfig", kubeconfig.to_str().unwrap(), "--node-name", "node-a"],
    )
    .expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready");
    let client_ns = &topo.pods[0].ns;
    let vip: SocketAddr = (VIP, 80).into();
    converge(client_ns, vip, &["pod1", "pod2"]);

    // Scaling the slice is reflected within 1 s.
    api.apply_endpointslice(slice(&topo, &[1, 2, 3]));
    let up = converge(client_ns, vip, &["pod1", "pod2", "pod3"]);
    api.apply_endpointslice(slice(&topo, &[3]));
    let down = converge(client_ns, vip, &["pod3"]);
    eprintln!("kube: scale up reflected in {up:?}, down in {down:?}");
    assert!(up < Duration::from_secs(1) && down < Duration::from_secs(1));

    // The CLI shows exactly what was programmed.
    let root = pins.0.to_str().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&cli(&["services", "--bpffs-root", root, "-o", "json"]).unwrap()).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v}");
    assert_eq!((rows[0]["name"].as_str(), rows[0]["address"].as_str()), (Some("api"), Some("10.96.0.20")));
    assert_eq!(rows[0]["backends"][0]["address"].as_str(), Some(topo.pods[3].ip.to_string().as_str()));

    // A forced 410 and a dropped watch do not disturb traffic, and watching resumes.
    let lists_before = api.list_requests(proxy_tests::fake_apiserver::ResourceKind::EndpointSlice);
    let (ok, failed) = under_load(client_ns, vip, || {
        api.force_gone();
        std::thread::sleep(Duration::from_millis(500));
        api.drop_watches();
    });
    eprintln!("kube: during 410 + dropped watch: {ok} ok, {failed} failed");
    assert!(ok > 20 && failed == 0, "{ok} ok, {failed} failed");
    wait_for(Duration::from_secs(10), "relist after 410", || {
        (api.list_requests(proxy_tests::fake_apiserver::ResourceKind::EndpointSlice) > lists_before).then_some(())
    })
    .unwrap();
    api.apply_endpointslice(slice(&topo, &[1]));
    converge(client_ns, vip, &["pod1"]);

    // Deleting the Service stops it.
    api.delete_service("default", "api");
    client_ns
        .run(|| wait_for(Duration::from_secs(1), "service removal", || client::tcp_name(vip).is_err().then_some(())))
        .expect("service deleted within 1 s");
    drop(agent);
}

/// Bootstrap without kube-proxy (issue 20 item 3). An agent whose API server address is the
/// `kubernetes` Service's ClusterIP (here through a kubeconfig naming it, with the kubelet's
/// `KUBERNETES_SERVICE_HOST` saying it is that Service), which nothing serves yet, logs an
/// error naming the setting to fill in, and stays unready. Given `--api-server` with the
/// server's own address, the same agent with the same credentials comes up and serves.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn an_unserved_kubernetes_clusterip_names_the_api_server_setting() {
    require_root("an_unserved_kubernetes_clusterip_names_the_api_server_setting");
    let mut topo = Topology::single_node(2, 21).expect("topology");
    topo.start_server(SERVER, 1, 8080).expect("server");
    let listener = bind_in_netns(&topo.node.name, "127.0.0.1:6443".parse().unwrap()).expect("bind in netns");
    let api = FakeApiServer::start_background(listener).expect("fake apiserver");
    let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "node-a"}})).unwrap();
    api.apply_node(node);
    api.apply_service(serde_yaml::from_str(&service_yaml("api", "10.96.0.20", 80, 8080, "TCP")).unwrap());
    api.apply_endpointslice(slice(&topo, &[1]));
    let dir = TempDir::new("ebpf-proxy-bootstrap-").unwrap();
    let kubeconfig = dir.0.join("kubeconfig");
    write_kubeconfig(&kubeconfig, "https://10.96.0.1:443").unwrap();
    let pins = PinDir::new();
    let start = |port: u16, extra: &[&str], log: &std::path::Path| {
        let mut args = vec!["--kubeconfig", kubeconfig.to_str().unwrap(), "--node-name", "node-a"];
        args.extend_from_slice(extra);
        let child = Agent::command(&topo.node, &pins.0, port, &args)
            .unwrap()
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443")
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("agent");
        Agent {
            child,
            http: ([127, 0, 0, 1], port).into(),
            metrics: ([127, 0, 0, 1], proxy_tests::agent::metrics_port(port)).into(),
        }
    };

    let stuck_log = dir.0.join("stuck.log");
    let stuck = start(10262, &[], &stuck_log);
    let line = wait_for(Duration::from_secs(20), "the bootstrap error", || {
        std::fs::read_to_string(&stuck_log).ok()?.lines().find(|l| l.contains("ClusterIP")).map(String::from)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", std::fs::read_to_string(&stuck_log).unwrap_or_default()));
    eprintln!("bootstrap: {line}");
    assert!(line.contains("ERROR") && line.contains("10.96.0.1:443"), "{line}");
    assert!(line.contains("api-server") && line.contains("apiServer.host"), "names the setting: {line}");
    assert!(stuck.wait_ready(&topo.node, Duration::from_millis(500)).is_err(), "ready without the API?");
    drop(stuck);

    let log = dir.0.join("ok.log");
    let agent = start(10263, &["--api-server", "http://127.0.0.1:6443"], &log);
    if let Err(e) = agent.wait_ready(&topo.node, Duration::from_secs(20)) {
        panic!("{e}: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    converge(&topo.pods[0].ns, (VIP, 80).into(), &["pod1"]);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("ClusterIP"), "no bootstrap error once the address is given: {text}");
}

/// kube-proxy's health semantics (>= 1.31, KEP-3836): once the cluster autoscaler taints
/// the Node ToBeDeletedByClusterAutoscaler, /healthz (what cloud load balancers probe)
/// fails so traffic drains away from the node, while /livez (the kubelet's liveness probe)
/// and /readyz stay 200 and Services keep working; without the taint /healthz passes again.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn healthz_fails_on_a_node_tainted_for_deletion_livez_does_not() {
    require_root("healthz_fails_on_a_node_tainted_for_deletion_livez_does_not");
    let mut topo = Topology::single_node(2, 22).expect("topology");
    topo.start_server(SERVER, 1, 8080).expect("server");
    let listener = bind_in_netns(&topo.node.name, "127.0.0.1:6443".parse().unwrap()).expect("bind in netns");
    let api = FakeApiServer::start_background(listener).expect("fake apiserver");
    let node = |taints: serde_json::Value| -> Node {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "node-a"}, "spec": {"taints": taints}})).unwrap()
    };
    api.apply_node(node(serde_json::json!([])));
    api.apply_service(serde_yaml::from_str(&service_yaml("api", "10.96.0.20", 80, 8080, "TCP")).unwrap());
    api.apply_endpointslice(slice(&topo, &[1]));
    let dir = TempDir::new("ebpf-proxy-kubeconfig-").unwrap();
    let kubeconfig = dir.0.join("kubeconfig");
    write_kubeconfig(&kubeconfig, "http://127.0.0.1:6443").unwrap();
    let pins = PinDir::new();
    let args = ["--kubeconfig", kubeconfig.to_str().unwrap(), "--node-name", "node-a"];
    let agent = Agent::start(&topo.node, &pins.0, 10264, &args).expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready");
    let status = |path: &str| topo.node.run(|| proxy_tests::agent::http_get(agent.http, path).ok());
    let codes = || ["/healthz", "/livez", "/readyz"].map(|p| status(p).map(|(c, _)| c));
    assert_eq!(codes(), [Some(200); 3]);

    api.apply_node(node(
        serde_json::json!([{"key": "ToBeDeletedByClusterAutoscaler", "value": "1765000000", "effect": "NoSchedule"}]),
    ));
    wait_for(Duration::from_secs(5), "/healthz 503", || (codes()[0] == Some(503)).then_some(())).unwrap();
    assert_eq!(codes(), [Some(503), Some(200), Some(200)]);
    let (_, body) = status("/healthz").unwrap();
    assert!(body.contains("ToBeDeletedByClusterAutoscaler"), "{body}");
    converge(&topo.pods[0].ns, (VIP, 80).into(), &["pod1"]);

    api.apply_node(node(serde_json::json!([])));
    wait_for(Duration::from_secs(5), "/healthz 200", || (codes()[0] == Some(200)).then_some(())).unwrap();
    assert_eq!(codes(), [Some(200); 3]);
}
