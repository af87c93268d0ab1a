//! Taking a node over from kube-proxy and handing it back, with connections running
//! throughout (issue 20, item 4).
//!
//! A node namespace with a client pod, three backend pods and an outside client behind the
//! node's uplink; kube-proxy's iptables rules for a Service's ClusterIP (bench's generator of
//! its `nat` layout) and NodePort with `externalTrafficPolicy: Local` (its `KUBE-NODEPORTS`,
//! `KUBE-EXT-*` and `KUBE-SVL-*` chains, written here), plus its `KUBE-FORWARD` filter chain
//! with the `ctstate INVALID` drop; and a CNI's own rules beside them (a conntrack match in
//! `FORWARD`, a masquerade in `POSTROUTING`), which keep netfilter's conntrack and NAT hooks
//! registered when kube-proxy's rules go, as on a real node. Loops of short connections (pod
//! -> ClusterIP, outside -> NodePort) and sets of long-lived connections (each asked every
//! 100 ms which backend it is on) run throughout:
//!
//! 1. kube-proxy serves; long-lived sets A (pod -> ClusterIP) and C (outside -> NodePort)
//!    are opened.
//! 2. The agent starts (`--manifests`), then kube-proxy's rules are removed (`ebpf-proxy
//!    cleanup --kube-proxy`, as `kube-proxy --cleanup` does); sets B and D are opened under
//!    the agent.
//! 3. Rollback: kube-proxy's rules are restored, the agent is stopped (SIGTERM: the pinned
//!    datapath keeps serving), then `ebpf-proxy cleanup`.
//!
//! Asserted: no short connection failed, no long-lived one saw an error or a reset, and
//! every one answered from its original backend to the end; the flows kube-proxy opened are
//! in our conntrack with their backend once the agent is ready. The figures printed
//! (`takeover:` lines) are those of docs/benchmarks.md. `TAKEOVER_DEBUG=1` prints
//! netfilter's conntrack table, the rules with their counters and the node's counters after
//! the cleanup.
use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use proxy_bench::rules;
use proxy_tests::{
    agent::*,
    client::{self, Held},
    harness::{PinDir, require_root},
    netns::{Netns, Topology, wait_for},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const UPLINK: &str = "up0";
/// The node's address on the uplink, where the NodePort is served to the outside client.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const NODE_PORT: u16 = 30080;
/// Long-lived connections per set.
const HELD: usize = 12;
/// Long-lived connections per set from outside (NodePort).
const HELD_OUTSIDE: usize = 6;
/// How often each long-lived connection is asked for its backend.
const ASK_EVERY: Duration = Duration::from_millis(100);
/// How long each phase runs with the loops going before the next step.
const SETTLE: Duration = Duration::from_millis(1500);
/// Hard bound of the client loops, whatever happens to the test.
const LOOP_BOUND: Duration = Duration::from_secs(120);

/// A CNI's own rules (flannel- or Calico-like): conntrack and NAT stay in use in the node's
/// namespace whether or not kube-proxy's rules are there.
const CNI_RULES: &str = "*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CNI-FORWARD - [0:0]
-A FORWARD -m comment --comment \"CNI forwarding rules\" -j CNI-FORWARD
-A CNI-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CNI-FORWARD -s 10.244.0.0/16 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-POSTROUTING - [0:0]
-A POSTROUTING -m comment --comment \"CNI masquerade\" -j CNI-POSTROUTING
-A CNI-POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN
-A CNI-POSTROUTING -s 10.244.0.0/16 -j MASQUERADE
COMMIT
";

/// kube-proxy's filter rules on the forwarding path (pkg/proxy/iptables: KUBE-FORWARD,
/// inserted first in FORWARD).
const KUBE_FILTER: &str = "*filter
:KUBE-FORWARD - [0:0]
-I FORWARD 1 -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
";

/// kube-proxy's rules for the Service's NodePort with `externalTrafficPolicy: Local`
/// (pkg/proxy/iptables: `KUBE-NODEPORTS` -> `KUBE-EXT-*`, whose outside traffic goes to the
/// local endpoints' `KUBE-SVL-*` chain without masquerade), appended to what bench's
/// generator writes for the ClusterIP (its `KUBE-SVC-*` and `KUBE-SEP-*` chains).
fn nodeport_rules(svc: &rules::Svc) -> String {
    let (svc_chain, ext, svl) = (rules::svc_chain(svc), "KUBE-EXT-WEBTAKEOVER0001", "KUBE-SVL-WEBTAKEOVER0001");
    let c = "bench/web:http";
    let mut out = format!(
        "*nat\n:{ext} - [0:0]\n:{svl} - [0:0]\n\
         -A KUBE-NODEPORTS -p tcp -m comment --comment \"{c}\" -m tcp --dport {NODE_PORT} -j {ext}\n\
         -A {ext} -s {} -m comment --comment \"pod traffic for {c} external destinations\" -j {svc_chain}\n\
         -A {ext} -m comment --comment \"masquerade LOCAL traffic for {c} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ\n\
         -A {ext} -m comment --comment \"route LOCAL traffic for {c} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}\n\
         -A {ext} -j {svl}\n",
        rules::CLUSTER_CIDR
    );
    let n = svc.endpoints.len();
    for (j, ep) in svc.endpoints.iter().enumerate() {
        let sep = rules::sep_chain(svc, *ep);
        if j + 1 < n {
            let p = 1.0 / (n - j) as f64;
            out.push_str(&format!(
                "-A {svl} -m comment --comment \"{c} -> {}:{}\" -m statistic --mode random --probability {p:.11} -j {sep}\n",
                ep.0, ep.1
            ));
        } else {
            out.push_str(&format!("-A {svl} -m comment --comment \"{c} -> {}:{}\" -j {sep}\n", ep.0, ep.1));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// `cmd` in `node`'s network namespace with `input` on its stdin; panics with its stderr.
fn run_in(node: &Netns, cmd: &[&str], input: &str) {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", node.name))
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("writing stdin");
    let out = child.wait_with_output().expect("waiting");
    assert!(out.status.success(), "{cmd:?} in {}: {}", node.name, String::from_utf8_lossy(&out.stderr));
}

/// kube-proxy's rules for the Service `web` (VIP:80 -> `endpoints`:8080).
fn install_kube_proxy(node: &Netns, endpoints: &[Ipv4Addr]) {
    let svc = rules::Svc {
        name: "web".into(),
        vip: VIP,
        port: 80,
        endpoints: endpoints.iter().map(|ip| (*ip, 8080)).collect(),
    };
    run_in(node, &["iptables-restore", "--noflush"], &rules::iptables_restore(std::slice::from_ref(&svc)));
    run_in(node, &["iptables-restore", "--noflush"], &nodeport_rules(&svc));
    run_in(node, &["iptables-restore", "--noflush"], KUBE_FILTER);
}

/// `ebpf-proxy cleanup --kube-proxy` in the node: kube-proxy's rules out, as
/// `kube-proxy --cleanup` does (its jumps, then its `KUBE-*` chains).
fn remove_kube_proxy(node: &Netns) {
    let out = in_netns(node, &ebpf_proxy_bin().unwrap()).args(["cleanup", "--kube-proxy"]).output().expect("cleanup");
    assert!(out.status.success(), "cleanup --kube-proxy: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", node.name))
        .arg("iptables-save")
        .output()
        .expect("iptables-save");
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(!rules.contains("KUBE-"), "kube-proxy's rules are still there:\n{rules}");
    assert!(rules.contains("CNI-POSTROUTING"), "the CNI's rules went too:\n{rules}");
}

/// A long-lived connection and what happened to it.
struct Conn {
    set: char,
    held: Held,
    /// The backend it was opened on.
    backend: String,
    local: SocketAddr,
    asked: u32,
    /// The first failure (error, reset, or another backend answering), with when.
    failed: Option<String>,
}

/// Open `n` long-lived connections to `vip` from `client`.
fn open_set(client: &Netns, vip: SocketAddr, set: char, n: usize) -> Vec<Conn> {
    client.run(|| {
        (0..n)
            .map(|_| {
                let held = Held::open(vip).unwrap_or_else(|e| panic!("opening a long-lived connection: {e:#}"));
                let local = held.local().expect("local address");
                Conn { set, backend: held.first.clone(), held, local, asked: 0, failed: None }
            })
            .collect()
    })
}

/// Sets the flag when dropped (also when a step panics), ending the client loops.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Short {
    ok: AtomicU32,
    failed: AtomicU32,
    errors: Mutex<Vec<String>>,
}

/// Whether our conntrack holds the forward entry of `c` with its backend (`pods`: name ->
/// address).
fn adopted(rows: &[serde_json::Value], c: &Conn, pods: &BTreeMap<String, Ipv4Addr>) -> bool {
    let want_nat = format!("{}:8080", pods[&c.backend]);
    rows.iter().any(|r| {
        r["direction"] == "forward"
            && r["source"] == c.local.to_string().as_str()
            && r["nat"] == want_nat.as_str()
            && r["state"] == "established"
    })
}

#[test]
#[ignore = "needs root (BPF, network namespaces, iptables in them): run by `cargo xtask test` as root"]
fn takeover_from_kube_proxy_and_back_keeps_every_connection() {
    require_root("takeover_from_kube_proxy_and_back_keeps_every_connection");
    let mut topo = Topology::single_node(4, 0).expect("topology");
    for i in 1..4 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    // The outside client, behind the node's uplink.
    let outside = Netns::new("epn-out-").expect("outside namespace");
    topo.node
        .ip(&["link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns", &outside.name])
        .expect("uplink");
    topo.node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", UPLINK]).expect("node address");
    topo.node.ip(&["link", "set", UPLINK, "up"]).expect("uplink up");
    outside.ip(&["addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "eth0"]).expect("outside address");
    outside.ip(&["link", "set", "eth0", "up"]).expect("outside up");
    let backends: Vec<Ipv4Addr> = topo.pods[1..].iter().map(|p| p.ip).collect();
    let pods: BTreeMap<String, Ipv4Addr> = topo.pods.iter().map(|p| (p.name.clone(), p.ip)).collect();
    let node = &topo.node;
    let client = &topo.pods[0].ns;
    let vip: SocketAddr = (VIP, 80).into();
    let nodeport: SocketAddr = (NODE_IP, NODE_PORT).into();

    // 1. kube-proxy serves the ClusterIP and the NodePort.
    run_in(node, &["iptables-restore"], CNI_RULES);
    install_kube_proxy(node, &backends);
    client
        .run(|| wait_for(Duration::from_secs(5), "kube-proxy to serve the VIP", || client::tcp_name(vip).ok()))
        .expect("kube-proxy serves");
    outside
        .run(|| {
            wait_for(Duration::from_secs(5), "kube-proxy to serve the NodePort", || client::tcp_name(nodeport).ok())
        })
        .expect("kube-proxy serves the NodePort");
    let dir = TempDir::new("ebpf-proxy-takeover-").expect("dir");
    let eps: Vec<(&str, Ipv4Addr)> = topo.pods[1..].iter().map(|p| (p.name.as_str(), p.ip)).collect();
    dir.write("web.yaml", &format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: {VIP}\n  clusterIPs: [{VIP}]\n  externalTrafficPolicy: Local\n  ports:\n  - name: main\n    port: 80\n    targetPort: 8080\n    nodePort: {NODE_PORT}\n    protocol: TCP\n"
    ))
    .unwrap();
    dir.write("node.yaml", &node_yaml("node-a", NODE_IP)).unwrap();
    dir.write("web-slice.yaml", &slice_yaml("web", "web-abc", &eps, 8080, "TCP")).unwrap();

    // Long-lived sets: A from the pod to the ClusterIP, C from outside to the NodePort.
    let mut first = open_set(client, vip, 'A', HELD);
    first.extend(open_set(&outside, nodeport, 'C', HELD_OUTSIDE));
    let conns: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(first));
    let mut on: BTreeMap<String, usize> = BTreeMap::new();
    for c in conns.lock().unwrap().iter() {
        *on.entry(c.backend.clone()).or_default() += 1;
    }
    eprintln!(
        "takeover: sets A ({HELD}, pod -> ClusterIP) and C ({HELD_OUTSIDE}, outside -> NodePort) opened under kube-proxy, on {on:?}"
    );

    let stop = AtomicBool::new(false);
    let short = Short::default();
    let short_out = Short::default();
    let pins = PinDir::new();
    let root = pins.0.to_str().unwrap().to_string();
    let mut timeline: Vec<(String, Duration)> = Vec::new();
    let started = Instant::now();
    // Short connections, one after another, for the whole test: from the pod to the
    // ClusterIP, and from outside to the NodePort.
    let short_loop = |ns: &Netns, addr: SocketAddr, short: &Short| {
        ns.run(|| {
            while !stop.load(Ordering::Relaxed) && started.elapsed() < LOOP_BOUND {
                match client::tcp_name(addr) {
                    Ok(name) if pods.contains_key(&name) => short.ok.fetch_add(1, Ordering::Relaxed),
                    Ok(other) => {
                        short.errors.lock().unwrap().push(format!("{:?}: answered {other:?}", started.elapsed()));
                        short.failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        short.errors.lock().unwrap().push(format!("{:?}: {e:#}", started.elapsed()));
                        short.failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let not_adopted = thread::scope(|s| {
        s.spawn(|| short_loop(client, vip, &short));
        s.spawn(|| short_loop(&outside, nodeport, &short_out));
        // Every long-lived connection, asked in turn.
        let conns_ask = Arc::clone(&conns);
        let stop_ref = &stop;
        s.spawn(move || {
            while !stop_ref.load(Ordering::Relaxed) && started.elapsed() < LOOP_BOUND {
                for c in conns_ask.lock().unwrap().iter_mut().filter(|c| c.failed.is_none()) {
                    c.asked += 1;
                    match c.held.ask() {
                        Ok(name) if name == c.backend => {}
                        Ok(name) => c.failed = Some(format!("{:?}: answered by {name}", started.elapsed())),
                        Err(e) => c.failed = Some(format!("{:?}: {e:#}", started.elapsed())),
                    }
                }
                thread::sleep(ASK_EVERY);
            }
        });

        // A failed step below must not leave the loops running to their bound.
        let _stop = StopOnDrop(&stop);
        thread::sleep(SETTLE);
        // 2. The agent takes over, then kube-proxy's rules go.
        let t = Instant::now();
        let d = dir.0.to_str().unwrap().to_string();
        let mut agent = Agent::start(
            node,
            pins.0.as_path(),
            19_700,
            &["--manifests", &d, "--node-name", "node-a", "--uplink", UPLINK],
        )
        .expect("agent");
        agent.wait_ready(node, Duration::from_secs(30)).expect("agent ready");
        timeline.push(("agent start to ready".into(), t.elapsed()));
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&cli(&["conntrack", "--bpffs-root", &root, "-o", "json"]).expect("conntrack"))
                .expect("conntrack json");
        let not_adopted: Vec<String> = conns
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !adopted(&rows, c, &pods))
            .map(|c| format!("{} on {}", c.local, c.backend))
            .collect();
        thread::sleep(SETTLE);
        let t = Instant::now();
        remove_kube_proxy(node);
        timeline.push(("kube-proxy's rules removed".into(), t.elapsed()));
        thread::sleep(SETTLE);
        let mut b = open_set(client, vip, 'B', HELD);
        b.extend(open_set(&outside, nodeport, 'D', HELD_OUTSIDE));
        conns.lock().unwrap().extend(b);
        eprintln!("takeover: sets B ({HELD}, ClusterIP) and D ({HELD_OUTSIDE}, NodePort) opened under the agent");
        thread::sleep(SETTLE);

        // 3. Rollback: kube-proxy's rules back, the agent stopped, then cleanup.
        let t = Instant::now();
        install_kube_proxy(node, &backends);
        timeline.push(("kube-proxy's rules restored".into(), t.elapsed()));
        thread::sleep(SETTLE);
        let t = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid() as i32), nix::sys::signal::Signal::SIGTERM)
            .expect("SIGTERM");
        let _ = agent.child.wait();
        timeline.push(("agent stopped (SIGTERM)".into(), t.elapsed()));
        thread::sleep(SETTLE);
        let t = Instant::now();
        let out = in_netns(node, &ebpf_proxy_bin().unwrap())
            .args(["cleanup", "--bpffs-root", &root])
            .output()
            .expect("running cleanup");
        timeline.push(("cleanup".into(), t.elapsed()));
        eprintln!(
            "takeover: cleanup said:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "cleanup failed");
        thread::sleep(SETTLE * 2);
        if std::env::var("TAKEOVER_DEBUG").is_ok() {
            for cmd in [&["conntrack", "-L"][..], &["iptables-save", "-c"][..], &["nstat", "-az"][..]] {
                let o = Command::new("nsenter")
                    .arg(format!("--net=/var/run/netns/{}", node.name))
                    .args(cmd)
                    .output()
                    .unwrap();
                eprintln!(
                    "DEBUG {cmd:?}:\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        not_adopted
    });

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    for (what, took) in &timeline {
        eprintln!("takeover: {what}: {took:?}");
    }
    let mut conns = conns.lock().unwrap();
    let (ok, failed) = (short.ok.load(Ordering::Relaxed), short.failed.load(Ordering::Relaxed));
    let (ok_out, failed_out) = (short_out.ok.load(Ordering::Relaxed), short_out.failed.load(Ordering::Relaxed));
    let asked: u32 = conns.iter().map(|c| c.asked).sum();
    let broken: Vec<String> = conns
        .iter()
        .filter_map(|c| c.failed.as_ref().map(|f| format!("set {} {} (on {}): {f}", c.set, c.local, c.backend)))
        .collect();
    eprintln!(
        "takeover: {:.1} s; short connections to the ClusterIP {ok} ok, {failed} failed, to the NodePort from outside {ok_out} ok, {failed_out} failed; long-lived {} ({} asks), {} broken; load {}",
        started.elapsed().as_secs_f64(),
        conns.len(),
        asked,
        broken.len(),
        load.trim()
    );
    assert!(ok > 100, "too few short connections ran: {ok}");
    assert!(ok_out > 100, "too few short connections from outside ran: {ok_out}");
    assert_eq!(failed, 0, "short connections failed: {:?}", short.errors.lock().unwrap());
    assert_eq!(failed_out, 0, "short connections from outside failed: {:?}", short_out.errors.lock().unwrap());
    assert!(broken.is_empty(), "long-lived connections broken:\n{}", broken.join("\n"));
    assert!(not_adopted.is_empty(), "kube-proxy's flows not in our conntrack with their backend: {not_adopted:?}");
    // Every connection is still on its backend, after all of it: under kube-proxy again.
    for c in conns.iter_mut() {
        assert_eq!(c.held.ask().expect("a last ask"), c.backend, "set {} {}", c.set, c.local);
    }
}
