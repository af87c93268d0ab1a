//! `--nodeport-addresses` end to end (issue 21 item 3): which of the node's local addresses
//! serve NodePorts, with the real agent in a node namespace of a one-node [`Cluster`] and a
//! client on the underlay. A secondary address is added to (and removed from) the node's
//! uplink while the agent runs, as keepalived moves a VIP: the agent follows its
//! namespace's addresses over rtnetlink, no restart.
//!
//! - unset (kube-proxy's iptables default): every local address serves, the secondary one
//!   as soon as it appears and no longer once it is gone; `verify` in the node's namespace
//!   computes the same set (no drift).
//! - `primary`: the Node's InternalIP serves, the secondary address does not.
//! - a CIDR matching only the secondary address: it serves, the InternalIP does not.
use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use proxy_tests::{
    agent::{Agent, TempDir, cli, ebpf_proxy_bin, in_netns, node_yaml, slice_yaml_on_nodes},
    client,
    harness::{PinDir, require_root},
    netns::{Cluster, node_ip, wait_for},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const NODE_PORT: u16 = 30080;
/// The secondary address the tests put on the node's uplink (the underlay's subnet, so the
/// client reaches it directly, as a VIP on the node's network).
const SECONDARY: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 50);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Field order is drop order: the agent stops before the namespaces go.
struct Env {
    agent: Agent,
    cluster: Cluster,
    pins: PinDir,
    dir: TempDir,
}

impl Env {
    /// One node with one pod (`n1p0`) behind NodePort `NODE_PORT`, the agent started with
    /// `extra` flags and ready.
    fn start(extra: &[&str]) -> Env {
        let mut cluster = Cluster::new(1, 1).expect("cluster topology");
        cluster.start_servers(SERVER, 8080).expect("pod server");
        let dir = TempDir::new("ebpf-proxy-npaddr-").expect("dir");
        let svc = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: np\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.70\n  clusterIPs: [10.96.0.70]\n  ports:\n  - name: main\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n    nodePort: {NODE_PORT}\n"
        );
        dir.write("svc.yaml", &svc).unwrap();
        let pod = cluster.pod("n1p0");
        let slice =
            slice_yaml_on_nodes("np", "np-1", &[(pod.name.as_str(), pod.ip, "node1")], &[("main", 8080, "TCP")]);
        dir.write("slice.yaml", &slice).unwrap();
        let node = &cluster.nodes[0];
        dir.write("node.yaml", &node_yaml(&node.name, node.ip)).unwrap();
        let pins = PinDir::new();
        let d = dir.0.to_str().unwrap().to_string();
        let mut args = vec!["--manifests", d.as_str(), "--node-name", "node1", "--uplink", "eth0"];
        args.extend(extra);
        let agent = Agent::start(&node.ns, &pins.0, 10256, &args).expect("agent");
        agent.wait_ready(&node.ns, Duration::from_secs(20)).expect("agent ready");
        Env { agent, cluster, pins, dir }
    }

    fn secondary(&self, op: &str) {
        self.cluster.nodes[0].ns.ip(&["addr", op, &format!("{SECONDARY}/24"), "dev", "eth0"]).expect("ip addr");
    }

    fn services(&self) -> String {
        cli(&["services", "--bpffs-root", self.pins.0.to_str().unwrap()]).expect("ebpf-proxy services")
    }

    /// Whether `ebpf-proxy services` lists `addr`'s NodePort frontend.
    fn listed(&self, addr: Ipv4Addr) -> bool {
        self.services().contains(&format!("{addr}:{NODE_PORT}"))
    }

    /// Wait until the client reaches the backend through `addr`'s NodePort.
    fn wait_served(&self, addr: Ipv4Addr) {
        let to: SocketAddr = (addr, NODE_PORT).into();
        let name = self
            .cluster
            .client
            .run(|| wait_for(Duration::from_secs(10), &format!("{to} to answer"), || client::tcp_name(to).ok()))
            .unwrap_or_else(|e| panic!("{e}\nservices:\n{}", self.services()));
        assert_eq!(name, "n1p0", "the backend answers through {to}");
    }

    /// `addr`'s NodePort is not a frontend: not in the maps, and a connection is refused by
    /// the node (nothing listens there), not answered by the backend.
    fn not_served(&self, addr: Ipv4Addr) {
        assert!(!self.listed(addr), "{addr}:{NODE_PORT} is a frontend:\n{}", self.services());
        let to: SocketAddr = (addr, NODE_PORT).into();
        let r = self.cluster.client.run(|| client::tcp_name(to));
        assert!(r.is_err(), "{to} answered {r:?}");
    }

    /// `ebpf-proxy verify` run in the node's namespace: (exit code, stdout).
    fn verify(&self, extra: &[&str]) -> (i32, String) {
        let mut cmd: Command = in_netns(&self.cluster.nodes[0].ns, &ebpf_proxy_bin().unwrap());
        cmd.args(["verify", "--manifests", self.dir.0.to_str().unwrap(), "--node-name", "node1", "--bpffs-root"])
            .arg(&self.pins.0)
            .args(extra)
            .env_remove("EBPF_PROXY_NODEPORT_ADDRESSES");
        let out = cmd.output().expect("run ebpf-proxy verify");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Default: every local address serves NodePorts, one added while the agent runs included,
/// and one removed stops serving; verify agrees with the agent on the set.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn default_serves_every_local_address_as_it_comes_and_goes() {
    require_root("default_serves_every_local_address_as_it_comes_and_goes");
    let _serial = serial();
    let env = Env::start(&[]);
    env.wait_served(node_ip(0));
    assert!(!env.listed(SECONDARY));
    let pid = env.agent.pid();

    env.secondary("add");
    env.wait_served(SECONDARY);
    assert!(env.listed(SECONDARY), "{}", env.services());
    assert_eq!(env.agent.pid(), pid, "same agent, no restart");
    let (code, out) = env.verify(&[]);
    assert_eq!(code, 0, "verify in the node's namespace agrees with the agent: {out}");
    // Told another mode, verify sees the secondary frontend as one too many.
    let (code, out) = env.verify(&["--nodeport-addresses", "primary"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("{SECONDARY}:{NODE_PORT}")), "{out}");

    env.secondary("del");
    wait_for(Duration::from_secs(5), "the secondary address's frontend to go", || {
        (!env.listed(SECONDARY)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", env.services()));
    env.wait_served(node_ip(0));
    assert_eq!(env.verify(&[]).0, 0);
}

/// `--nodeport-addresses primary`: the Node's InternalIP only, not a secondary address.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn primary_serves_only_the_node_ip() {
    require_root("primary_serves_only_the_node_ip");
    let _serial = serial();
    let env = Env::start(&["--nodeport-addresses", "primary"]);
    env.secondary("add");
    env.wait_served(node_ip(0));
    // Give the agent time to see the address (it would within its debounce and sync delay).
    std::thread::sleep(Duration::from_millis(500));
    env.not_served(SECONDARY);
    assert!(env.listed(node_ip(0)));
    let (code, out) = env.verify(&["--nodeport-addresses", "primary"]);
    assert_eq!(code, 0, "{out}");
}

/// A CIDR matching only the secondary address: it serves (once added), the InternalIP not.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn a_cidr_serves_only_the_local_addresses_inside_it() {
    require_root("a_cidr_serves_only_the_local_addresses_inside_it");
    let _serial = serial();
    let cidr = format!("{SECONDARY}/32");
    let env = Env::start(&["--nodeport-addresses", &cidr]);
    assert!(!env.listed(node_ip(0)) && !env.listed(SECONDARY), "{}", env.services());
    env.secondary("add");
    env.wait_served(SECONDARY);
    env.not_served(node_ip(0));
    let (code, out) = env.verify(&["--nodeport-addresses", &cidr]);
    assert_eq!(code, 0, "{out}");
}
