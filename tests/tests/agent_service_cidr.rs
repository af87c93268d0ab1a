//! Service CIDRs through the real agent (issue 24 item 3): it watches `networking.k8s.io/v1`
//! ServiceCIDRs on a fake API server, so one added at run time starts refusing a pod's
//! connect() to an unallocated address inside it (ECONNREFUSED) without a restart, and one
//! deleted stops; an API server without the resource (404) leaves `--service-cidr` in force.
//! With `--manifests`, ServiceCIDR objects in the directory's files do the same.
use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_tests::{
    agent::{Agent, TempDir, converge, service_yaml, slice_yaml},
    fake_apiserver::{FakeApiServer, bind_in_netns, write_kubeconfig},
    harness::{PinDir, require_root},
    netns::{Netns, Topology, wait_for},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const UNALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);

/// Whether a connect() from `client` to the unallocated address is refused.
fn refused(client: &Netns) -> bool {
    let to: SocketAddr = (UNALLOCATED, 80).into();
    client.run(|| {
        TcpStream::connect_timeout(&to, Duration::from_millis(500))
            .err()
            .is_some_and(|e| e.kind() == ErrorKind::ConnectionRefused)
    })
}

/// Wait (5 s at most) until a connect() to the unallocated address is refused (`want`) or
/// no longer is; `what` names the awaited change in the failure.
fn wait_refused(client: &Netns, want: bool, what: &str) {
    wait_for(Duration::from_secs(5), what, || (refused(client) == want).then_some(()))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// A node with a client pod and a backend pod, a fake API server holding a node, the
/// Service `api` (10.96.0.20:80 -> pod1:8080) and its slice; the agent watching it.
fn cluster(
    http_port: u16,
    serve_service_cidrs: bool,
    agent_args: &[&str],
) -> (Topology, FakeApiServer, PinDir, Agent, TempDir) {
    let mut topo = Topology::single_node(2, 21).expect("topology");
    topo.start_server(SERVER, 1, 8080).expect("server");
    let listener = bind_in_netns(&topo.node.name, "127.0.0.1:6443".parse().unwrap()).expect("bind in netns");
    let api = FakeApiServer::start_background(listener).expect("fake apiserver");
    api.set_service_cidr_api(serve_service_cidrs);
    let dir = TempDir::new("ebpf-proxy-kubeconfig-").unwrap();
    let kubeconfig = dir.0.join("kubeconfig");
    write_kubeconfig(&kubeconfig, "http://127.0.0.1:6443").unwrap();
    api.apply_node(
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.51.1"}]}
        }))
        .unwrap(),
    );
    let svc: Service = serde_yaml::from_str(&service_yaml("api", "10.96.0.20", 80, 8080, "TCP")).unwrap();
    api.apply_service(svc);
    let eps = [(topo.pods[1].name.as_str(), topo.pods[1].ip)];
    let slice: EndpointSlice = serde_yaml::from_str(&slice_yaml("api", "api-1", &eps, 8080, "TCP")).unwrap();
    api.apply_endpointslice(slice);
    let pins = PinDir::new();
    let mut args = vec!["--kubeconfig", kubeconfig.to_str().unwrap(), "--node-name", "node-a"];
    args.extend_from_slice(agent_args);
    let agent = Agent::start(&topo.node, &pins.0, http_port, &args).expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready");
    converge(&topo.pods[0].ns, (VIP, 80).into(), &["pod1"]);
    (topo, api, pins, agent, dir)
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn service_cidr_added_at_run_time_is_honoured() {
    require_root("service_cidr_added_at_run_time_is_honoured");
    // The flag is ignored where the API serves ServiceCIDRs: the objects say.
    let (topo, api, _pins, agent, _dir) = cluster(10261, true, &["--service-cidr", "10.96.0.0/16"]);
    let client = &topo.pods[0].ns;
    assert!(!refused(client), "no ServiceCIDR object yet: not refused");

    api.apply_service_cidr("kubernetes", &["10.96.0.0/16", "fd00:10:96::/112"]);
    wait_refused(client, true, "the new ServiceCIDR to refuse");
    converge(client, (VIP, 80).into(), &["pod1"]);

    api.delete_service_cidr("kubernetes");
    wait_refused(client, false, "the deleted ServiceCIDR to stop refusing");
    drop(agent);
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn without_the_service_cidr_api_the_flag_stands_in() {
    require_root("without_the_service_cidr_api_the_flag_stands_in");
    let (topo, _api, _pins, agent, _dir) = cluster(10262, false, &["--service-cidr", "10.96.0.0/16"]);
    let client = &topo.pods[0].ns;
    wait_refused(client, true, "--service-cidr to refuse");
    converge(client, (VIP, 80).into(), &["pod1"]);
    drop(agent);
}

/// `--manifests`: a ServiceCIDR in a file of the directory is honoured like the API's: a
/// file renamed into place at run time starts refusing the unallocated address (the
/// allocated ClusterIP still served), and its removal stops it.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn manifests_service_cidr_objects_are_honoured() {
    require_root("manifests_service_cidr_objects_are_honoured");
    let mut topo = Topology::single_node(2, 24).expect("topology");
    topo.start_server(SERVER, 1, 8080).expect("server");
    let dir = TempDir::new("ebpf-proxy-cidr-manifests-").unwrap();
    dir.write("api.yaml", &service_yaml("api", "10.96.0.20", 80, 8080, "TCP")).unwrap();
    let eps = [(topo.pods[1].name.as_str(), topo.pods[1].ip)];
    dir.write("api-slice.yaml", &slice_yaml("api", "api-1", &eps, 8080, "TCP")).unwrap();
    let pins = PinDir::new();
    let d = dir.0.to_str().unwrap().to_string();
    let agent = Agent::start(&topo.node, &pins.0, 10263, &["--manifests", &d, "--node-name", "node-a"]).expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready");
    let client = &topo.pods[0].ns;
    converge(client, (VIP, 80).into(), &["pod1"]);
    assert!(!refused(client), "no ServiceCIDR yet: not refused");

    let cidr = "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\nspec:\n  \
                cidrs: [\"10.96.0.0/16\"]\n";
    dir.write("service-cidr.yaml", cidr).unwrap();
    wait_refused(client, true, "the file's ServiceCIDR to refuse");
    converge(client, (VIP, 80).into(), &["pod1"]);

    dir.remove("service-cidr.yaml").unwrap();
    wait_refused(client, false, "the removed ServiceCIDR to stop refusing");
    drop(agent);
}
