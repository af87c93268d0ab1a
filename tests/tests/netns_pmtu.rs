//! Path MTU discovery through a Service (issue 12): the backend sits behind a link with MTU
//! 1280 (its host-side veth), the client behind 1500, and both advertise an MSS for 1500.
//! The client's full-sized segments are too big for the last hop, so the node answers with
//! ICMP fragmentation needed quoting the *translated* segment (client -> backend). Only if
//! the datapath translates that error back (client -> VIP / NodePort) does the client's
//! socket learn the smaller MTU; otherwise the upload stalls retransmitting (Linux has TCP
//! MTU probing off by default). Checked through a ClusterIP from a pod and through a
//! NodePort from outside, each with a 256 KiB upload that must complete.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, TempDir, cli, node_yaml, service_yaml, slice_yaml, slice_yaml_on_nodes},
    harness::{PinDir, require_root},
    netns::{Cluster, Netns, Topology, node_ip, wait_for},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const UPLOAD: usize = 256 * 1024;
const SMALL_MTU: &str = "1280";

/// How many ICMP errors the datapath translated (`ebpf-proxy stats`, node row): proves the
/// upload went through the translation and not around it.
fn icmp_errors(pins: &PinDir) -> u64 {
    let stats = cli(&["stats", "--bpffs-root", pins.0.to_str().unwrap()]).expect("ebpf-proxy stats");
    proxy_tests::agent::node_counter(&stats, "icmp_error")
}

/// Connect to `addr`, send `UPLOAD` bytes as one line and wait for the backend's answer
/// (it answers each line with its name). Returns the backend's name and how long it took.
fn upload(client: &Netns, addr: SocketAddr) -> (String, Duration) {
    client
        .run(|| -> anyhow::Result<(String, Duration)> {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(15)))?;
            // Without path MTU discovery the upload stalls: fail, never hang.
            s.set_write_timeout(Some(Duration::from_secs(15)))?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut greeting = String::new();
            r.read_line(&mut greeting)?;
            let mut w = s;
            let mut line = vec![b'x'; UPLOAD];
            line.push(b'\n');
            w.write_all(&line)?;
            let mut answer = String::new();
            r.read_line(&mut answer)?;
            anyhow::ensure!(answer.trim() == greeting.trim(), "answer {answer:?} after greeting {greeting:?}");
            Ok((answer.trim().to_string(), t.elapsed()))
        })
        .unwrap_or_else(|e| panic!("{UPLOAD}-byte upload through {addr}: {e:#}"))
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn large_upload_through_a_cluster_ip_to_a_small_mtu_backend() {
    require_root("large_upload_through_a_cluster_ip_to_a_small_mtu_backend");
    let mut topo = Topology::single_node(2, 62).expect("topology");
    topo.start_server(SERVER, 1, 8080).expect("server");
    topo.node.ip(&["link", "set", &topo.pods[1].host_if, "mtu", SMALL_MTU]).expect("small MTU");
    let dir = TempDir::new("ebpf-proxy-pmtu-").expect("dir");
    let pins = PinDir::new();
    dir.write("web.yaml", &service_yaml("web", "10.96.0.62", 80, 8080, "TCP")).unwrap();
    dir.write("web-slice.yaml", &slice_yaml("web", "web-1", &[("pod1", topo.pods[1].ip)], 8080, "TCP")).unwrap();
    let d = dir.0.to_str().unwrap().to_string();
    let agent = Agent::start(&topo.node, &pins.0, 10292, &["--manifests", &d, "--node-name", "node-a"]).expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready");
    let vip: SocketAddr = "10.96.0.62:80".parse().unwrap();
    topo.pods[0]
        .ns
        .run(|| wait_for(Duration::from_secs(5), "ClusterIP answers", || TcpStream::connect(vip).ok()))
        .expect("service up");
    let (name, took) = upload(&topo.pods[0].ns, vip);
    assert_eq!(name, "pod1");
    assert!(took < Duration::from_secs(10), "upload took {took:?}");
    assert!(icmp_errors(&pins) > 0, "no ICMP error was translated: the path MTU was never discovered");
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn large_upload_through_a_node_port_to_a_small_mtu_backend() {
    require_root("large_upload_through_a_node_port_to_a_small_mtu_backend");
    let mut cluster = Cluster::new(1, 1).expect("cluster");
    cluster.start_servers(SERVER, 8080).expect("server");
    let node = &cluster.nodes[0];
    node.ns.ip(&["link", "set", &node.pods[0].host_if, "mtu", SMALL_MTU]).expect("small MTU");
    let dir = TempDir::new("ebpf-proxy-pmtu-").expect("dir");
    let pins = PinDir::new();
    let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: np\n  namespace: default\nspec:\n  type: NodePort\n  \
               clusterIP: 10.96.0.63\n  ports:\n  - name: main\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n    \
               nodePort: 30063\n";
    dir.write("np.yaml", svc).unwrap();
    let pod = &node.pods[0];
    let slice =
        slice_yaml_on_nodes("np", "np-1", &[(pod.name.as_str(), pod.ip, node.name.as_str())], &[("main", 8080, "TCP")]);
    dir.write("np-slice.yaml", &slice).unwrap();
    dir.write("node.yaml", &node_yaml(&node.name, node.ip)).unwrap();
    let d = dir.0.to_str().unwrap().to_string();
    let args = ["--manifests", &d, "--node-name", &node.name, "--uplink", "eth0"];
    let agent = Agent::start(&node.ns, &pins.0, 10293, &args).expect("agent");
    agent.wait_ready(&node.ns, Duration::from_secs(20)).expect("ready");
    let np: SocketAddr = (node_ip(0), 30063).into();
    cluster
        .client
        .run(|| wait_for(Duration::from_secs(10), "NodePort answers", || TcpStream::connect(np).ok()))
        .expect("service up");
    let (name, took) = upload(&cluster.client, np);
    assert_eq!(name, pod.name);
    assert!(took < Duration::from_secs(10), "upload took {took:?}");
    assert!(icmp_errors(&pins) > 0, "no ICMP error was translated: the path MTU was never discovered");
}
