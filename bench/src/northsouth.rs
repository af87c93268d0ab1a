//! North-south forwarding rate: UDP packets per second from the external client namespace
//! through a NodePort on node 1 to its only backend, a pod on node 2, so node 1 translates
//! destination and source (DNAT + SNAT to its own address) and sends the packet back out of
//! its uplink. One `netns::Cluster` (client, node 1, node 2 on an underlay bridge) serves,
//! in turn:
//!
//! - `ours_native`: the real agent on node 1 (`--uplink eth0 --xdp-mode native`); the
//!   underlay ports run a no-op XDP program, so frames XDP_TX'd on a veth reach the bridge;
//! - `ours_generic`: the same agent with `--xdp-mode generic`;
//! - `iptables`: kube-proxy's NodePort chains (nat DNAT + masquerade, filter KUBE-FORWARD,
//!   nft backend) loaded into node 1's namespace with `ip_forward=1` there, no XDP on it.
//!
//! Netfilter runs last in a round: its hooks and conntrack stay registered in node 1's
//! namespace once loaded. Node 2 runs no proxy; it only routes to its pod.
//!
//! The sender runs in the client namespace: one connected UDP socket per flow (distinct
//! source ports, so both datapaths track distinct flows), `sendmmsg` batches of minimum-size
//! frames for a fixed time at up to `plan.ns_rate` packets/s. A receiver thread in the
//! backend pod counts datagrams (`recvmmsg`); the rate is what arrived over the send time.
use std::{
    fmt::Write as _,
    fs::File,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsFd, AsRawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use proxy_tests::{
    agent::{Agent, TempDir, cli, node_yaml, slice_yaml_on_nodes},
    harness::PinDir,
    netns::{CLIENT_IPS, Cluster, Netns, wait_for},
};

use crate::{Plan, check_interrupted, conn, interrupted, report::Row};

const SECTION: &str = "northsouth";
/// Address families measured (case prefix).
pub const NS_FAMILIES: [&str; 1] = ["v4"];
/// Datapaths, in the order they run on one topology.
pub const NS_CASES: [&str; 3] = ["ours_native", "ours_generic", "iptables"];
const NODE_PORT: u16 = 30080;
const TARGET_PORT: u16 = 8080;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// 14 + 20 + 8 + 18 = 60 bytes: a minimum-size Ethernet frame.
const PAYLOAD: usize = 18;
const BATCH: usize = 32;

/// The rows `run` produces and that must be positive (loss may be zero: not listed).
pub fn expected_rows(_plan: &Plan) -> Vec<String> {
    let mut v = Vec::new();
    for f in NS_FAMILIES {
        for c in NS_CASES {
            for m in ["pps", "offered_pps"] {
                v.push(crate::report::row_id(SECTION, &format!("{f}.{c}.{m}"), None));
            }
        }
        for c in ["ours_native", "ours_generic"] {
            v.push(crate::report::row_id(SECTION, &format!("{f}.{c}_vs_iptables"), None));
        }
    }
    v
}

/// A thread inside the backend pod's namespace counting UDP datagrams on `port`; stopped
/// and joined on drop (before the namespaces go).
struct Receiver {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Receiver {
    fn start(ns: &Netns, port: u16) -> Result<Self> {
        let path = format!("/var/run/netns/{}", ns.name);
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (c, s) = (count.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("ns-receiver".into())
            .spawn(move || -> Result<()> {
                let open = || -> Result<UdpSocket> {
                    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
                    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
                    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).context("receiver bind")?;
                    // Room for bursts while this thread waits for a CPU (2 CPUs, shared).
                    let size: libc::c_int = 32 << 20;
                    // SAFETY: setsockopt on a live socket with a correctly sized int.
                    let rc = unsafe {
                        libc::setsockopt(
                            sock.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_RCVBUFFORCE,
                            &size as *const _ as *const libc::c_void,
                            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                        )
                    };
                    ensure!(rc == 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
                    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
                    Ok(sock)
                };
                let sock = match open() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return Ok(());
                    }
                };
                let _ = ready_tx.send(Ok(()));
                receive(&sock, &c, &s)
            })
            .context("spawning the receiver thread")?;
        // On failure the drop stops and joins the thread.
        let rx = Receiver { count, stop, thread: Some(thread) };
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(rx),
            Ok(Err(e)) => Err(e.context("receiver in the backend pod")),
            Err(_) => bail!("receiver thread did not start"),
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Wait until nothing more arrives for 100 ms (bounded): the sender's last packets may
    /// still sit in a backlog or socket buffer.
    fn settle(&self) -> u64 {
        let t = Instant::now();
        let mut last = self.count();
        let mut quiet = Instant::now();
        while t.elapsed() < Duration::from_secs(3) && quiet.elapsed() < Duration::from_millis(100) {
            std::thread::sleep(Duration::from_millis(10));
            let now = self.count();
            if now != last {
                last = now;
                quiet = Instant::now();
            }
        }
        last
    }

    fn alive(&self) -> Result<()> {
        ensure!(self.thread.as_ref().is_some_and(|t| !t.is_finished()), "the receiver thread stopped");
        Ok(())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Count datagrams until `stop` (the read timeout bounds each wait; the loop also ends on
/// interruption and after ten minutes whatever happens).
fn receive(sock: &UdpSocket, count: &AtomicU64, stop: &AtomicBool) -> Result<()> {
    let mut bufs = [[0u8; 64]; 64];
    // SAFETY: iovec and mmsghdr are plain C structs; all-zero is a valid value.
    let mut iov: [libc::iovec; 64] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; 64] = unsafe { std::mem::zeroed() };
    for (i, b) in bufs.iter_mut().enumerate() {
        iov[i] = libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: b.len() };
    }
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let t = Instant::now();
    while !stop.load(Ordering::Relaxed) && !interrupted() && t.elapsed() < Duration::from_secs(600) {
        // SAFETY: msgs points at 64 initialised headers whose iovecs point into `bufs`, all
        // alive for the call.
        let n = unsafe {
            libc::recvmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), 64, libc::MSG_WAITFORONE, std::ptr::null_mut())
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted => continue,
                _ => return Err(e).context("recvmmsg"),
            }
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(())
}

struct Sent {
    sent: u64,
    /// sendmmsg calls that failed (ENOBUFS, EAGAIN, ECONNREFUSED from an ICMP error).
    errors: u64,
    secs: f64,
}

/// Send from `flows` connected sockets in turn, `BATCH` datagrams per `sendmmsg`, for
/// `time`, never ahead of `rate` packets/s. Runs in the client namespace.
fn blast(client: &Netns, dst: SocketAddr, flows: usize, time: Duration, rate: u64) -> Result<Sent> {
    client.run(|| -> Result<Sent> {
        let socks = (0..flows.max(1))
            .map(|_| -> Result<UdpSocket> {
                let s = UdpSocket::bind((CLIENT_IPS[0], 0)).context("sender bind")?;
                s.connect(dst).with_context(|| format!("connect {dst}"))?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()?;
        let payload = [0x5au8; PAYLOAD];
        let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: PAYLOAD };
        // SAFETY: plain C struct; all-zero is valid (no address: the sockets are connected).
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for m in msgs.iter_mut() {
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let (mut sent, mut errors, mut i) = (0u64, 0u64, 0usize);
        let t = Instant::now();
        loop {
            let elapsed = t.elapsed();
            if elapsed >= time || interrupted() {
                break;
            }
            if sent >= (rate as f64 * elapsed.as_secs_f64()) as u64 + BATCH as u64 {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            let fd = socks[i % socks.len()].as_raw_fd();
            i += 1;
            // SAFETY: msgs holds BATCH headers pointing at `iov`/`payload`, alive here.
            let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, libc::MSG_DONTWAIT) };
            if n < 0 {
                errors += 1;
                std::thread::yield_now();
            } else {
                sent += n as u64;
            }
        }
        check_interrupted()?;
        Ok(Sent { sent, errors, secs: t.elapsed().as_secs_f64() })
    })
}

/// Probe until the receiver sees a packet (the agent's first packets to node 2 wait for the
/// neighbour entry it resolves; iptables needs its rules in place).
fn warm_up(client: &Netns, dst: SocketAddr, rx: &Receiver, what: &str) -> Result<()> {
    client
        .run(|| -> Result<()> {
            let s = UdpSocket::bind((CLIENT_IPS[0], 0))?;
            s.connect(dst)?;
            let before = rx.count();
            wait_for(Duration::from_secs(10), &format!("{what}: first packet at the backend"), || {
                // ECONNREFUSED (an earlier ICMP error) is expected while nothing forwards yet.
                let _ = s.send(b"warm-up");
                std::thread::sleep(Duration::from_millis(20));
                (rx.count() > before).then_some(())
            })
        })
        .with_context(|| format!("{dst} does not reach the backend"))
}

/// Per-netns counters, read from a thread inside `ns` (`/proc/thread-self/net`): the pod's
/// UDP receive-buffer drops and its eth0 received packets.
fn pod_counters(ns: &Netns) -> Result<(u64, u64)> {
    ns.run(|| -> Result<(u64, u64)> {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").context("net/snmp")?;
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (udp.next().context("Udp header")?, udp.next().context("Udp values")?);
        let col = names.split_whitespace().position(|c| c == "RcvbufErrors").context("RcvbufErrors")?;
        let rcvbuf = values.split_whitespace().nth(col).context("RcvbufErrors value")?.parse()?;
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev").context("net/dev")?;
        let line = dev.lines().find(|l| l.trim_start().starts_with("eth0:")).context("eth0 in net/dev")?;
        let rx_packets = line.split(':').nth(1).and_then(|r| r.split_whitespace().nth(1)).context("rx packets")?;
        Ok((rcvbuf, rx_packets.parse()?))
    })
}

#[derive(Default, Clone)]
struct Measured {
    sent: u64,
    received: u64,
    secs: f64,
    send_errors: u64,
    rcvbuf_drops: u64,
    pod_rx: u64,
}

fn measure(cluster: &Cluster, rx: &Receiver, dst: SocketAddr, plan: &Plan, time: Duration) -> Result<Measured> {
    let pod = &cluster.nodes[1].pods[0].ns;
    rx.alive()?;
    let before = rx.settle();
    let (rcvbuf0, pod_rx0) = pod_counters(pod)?;
    let s = blast(&cluster.client, dst, plan.ns_flows, time, plan.ns_rate)?;
    let after = rx.settle();
    let (rcvbuf1, pod_rx1) = pod_counters(pod)?;
    rx.alive()?;
    Ok(Measured {
        sent: s.sent,
        received: after - before,
        secs: s.secs,
        send_errors: s.errors,
        rcvbuf_drops: rcvbuf1.saturating_sub(rcvbuf0),
        pod_rx: pod_rx1.saturating_sub(pod_rx0),
    })
}

/// The Service (UDP NodePort, one endpoint: node 2's pod) and node 1's Node object.
fn manifests(cluster: &Cluster) -> Result<TempDir> {
    let dir = TempDir::new("ebpf-proxy-bench-northsouth-")?;
    let backend = &cluster.nodes[1].pods[0];
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: ns\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [{CLUSTER_IP}]\n  ports:\n  - name: udp\n    port: 80\n    targetPort: {TARGET_PORT}\n    protocol: UDP\n    nodePort: {NODE_PORT}\n"
    );
    let slice = slice_yaml_on_nodes(
        "ns",
        "ns-1",
        &[(backend.name.as_str(), backend.ip, cluster.nodes[1].name.as_str())],
        &[("udp", TARGET_PORT, "UDP")],
    );
    dir.write("services.yaml", &format!("---\n{svc}---\n{slice}"))?;
    let n1 = &cluster.nodes[0];
    dir.write("node.yaml", &node_yaml(&n1.name, n1.ip))?;
    Ok(dir)
}

/// kube-proxy's iptables layout for this one NodePort (as `iptables-save` shows it for a
/// Cluster-policy NodePort with one endpoint): PREROUTING -> KUBE-SERVICES -> KUBE-NODEPORTS
/// -> KUBE-EXT (mark for masquerade) -> KUBE-SVC -> KUBE-SEP (DNAT); POSTROUTING masquerades
/// marked packets; filter FORWARD -> KUBE-FORWARD.
fn iptables_rules(backend: Ipv4Addr) -> String {
    let pn = "default/ns:udp";
    let (svc, ext, sep) = ("KUBE-SVC-BENCHNSUDP000000", "KUBE-EXT-BENCHNSUDP000000", "KUBE-SEP-BENCHNSUDP000000");
    let mut s = String::new();
    s.push_str("*filter\n:KUBE-FORWARD - [0:0]\n");
    s.push_str("-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n");
    s.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    s.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
    );
    s.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    s.push_str("COMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    s.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let _ = writeln!(s, ":{svc} - [0:0]\n:{ext} - [0:0]\n:{sep} - [0:0]");
    s.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    s.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    s.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    s.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    s.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    s.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    s.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let _ = writeln!(
        s,
        "-A KUBE-SERVICES -d {CLUSTER_IP}/32 -p udp -m comment --comment \"{pn} cluster IP\" -m udp --dport 80 -j {svc}"
    );
    s.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    let _ = writeln!(s, "-A KUBE-NODEPORTS -p udp -m comment --comment \"{pn}\" -m udp --dport {NODE_PORT} -j {ext}");
    let _ = writeln!(
        s,
        "-A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ"
    );
    let _ = writeln!(s, "-A {ext} -j {svc}");
    let _ = writeln!(
        s,
        "-A {svc} ! -s {} -d {CLUSTER_IP}/32 -p udp -m comment --comment \"{pn} cluster IP\" -m udp --dport 80 -j KUBE-MARK-MASQ",
        crate::rules::CLUSTER_CIDR
    );
    let _ = writeln!(s, "-A {svc} -m comment --comment \"{pn} -> {backend}:{TARGET_PORT}\" -j {sep}");
    let _ = writeln!(s, "-A {sep} -s {backend}/32 -m comment --comment \"{pn}\" -j KUBE-MARK-MASQ");
    let _ = writeln!(
        s,
        "-A {sep} -p udp -m comment --comment \"{pn}\" -m udp -j DNAT --to-destination {backend}:{TARGET_PORT}"
    );
    s.push_str("COMMIT\n");
    s
}

/// Whether `iface` in `ns` has an XDP program attached (`ip link` shows `xdp`/`xdpgeneric`).
fn has_xdp(ns: &Netns, iface: &str) -> Result<bool> {
    let out = ns.ip(&["link", "show", "dev", iface])?;
    Ok(out.split_whitespace().any(|w| w.starts_with("xdp")))
}

/// A node-wide verdict counter from `ebpf-proxy stats` (table output).
fn node_counter(stats: &str, verdict: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 3 && cols[0] == "node" && cols[1] == verdict).then(|| cols[2].parse().ok()).flatten()
        })
        .unwrap_or(0)
}

/// Our agent on node 1 in `mode`, warmed up and measured; the agent is killed and its pins
/// removed (XDP detached) before returning, also on failure.
fn run_ours(
    cluster: &Cluster,
    rx: &Receiver,
    dir: &TempDir,
    mode: &str,
    plan: &Plan,
    time: Duration,
) -> Result<(Measured, String)> {
    let node = &cluster.nodes[0];
    let dst: SocketAddr = (node.ip, NODE_PORT).into();
    let pins = PinDir::new();
    let root = pins.0.to_str().context("pin path")?.to_string();
    let manifests = dir.0.to_str().context("manifest dir")?.to_string();
    let r = (|| -> Result<(Measured, String)> {
        // Declared after `pins`: killed before the pins go.
        let mut agent = Agent::start(
            &node.ns,
            &pins.0,
            10256,
            &["--manifests", &manifests, "--node-name", &node.name, "--uplink", &node.uplink, "--xdp-mode", mode],
        )?;
        if let Err(e) = agent.wait_ready(&node.ns, Duration::from_secs(30)) {
            if let Ok(Some(status)) = agent.child.try_wait() {
                bail!("the agent exited ({status}) before it was ready: {e}");
            }
            return Err(e.context("agent not ready"));
        }
        let stats = cli(&["stats", "--bpffs-root", &root])?;
        let row = stats.lines().find(|l| l.starts_with(&node.uplink)).unwrap_or_default().to_string();
        ensure!(row.contains(mode), "XDP on {} is not in {mode} mode: {row:?}", node.uplink);
        warm_up(&cluster.client, dst, rx, &format!("ours ({mode})"))?;
        let before = cli(&["stats", "--bpffs-root", &root])?;
        let m = measure(cluster, rx, dst, plan, time)?;
        let after = cli(&["stats", "--bpffs-root", &root])?;
        let d = |v: &str| node_counter(&after, v).saturating_sub(node_counter(&before, v));
        let note = format!(
            "XDP verdicts during the run: established {}, new_flow {}, no_route {}, pass {}",
            d("established"),
            d("new_flow"),
            d("no_route"),
            d("pass")
        );
        agent.kill();
        Ok((m, note))
    })();
    drop(pins);
    // Releasing an unpinned bpf_link is asynchronous: wait until XDP is off the uplink, so
    // the next case runs on a clean interface.
    let gone = wait_for(Duration::from_secs(5), "XDP detached from node 1's uplink", || {
        has_xdp(&node.ns, &node.uplink).ok().filter(|x| !x).map(|_| ())
    });
    let r = r?;
    gone?;
    Ok(r)
}

fn run_iptables(
    cluster: &Cluster,
    rx: &Receiver,
    dir: &TempDir,
    plan: &Plan,
    time: Duration,
) -> Result<(Measured, String)> {
    let node = &cluster.nodes[0];
    ensure!(!has_xdp(&node.ns, &node.uplink)?, "XDP still attached to node 1's uplink");
    let dst: SocketAddr = (node.ip, NODE_PORT).into();
    node.ns.sysctl("net.ipv4.ip_forward", "1")?;
    let file = dir.0.join("kube-proxy-nodeport.iptables");
    std::fs::write(&file, iptables_rules(cluster.nodes[1].pods[0].ip))
        .with_context(|| format!("writing {}", file.display()))?;
    let took = conn::load_rules(&node.ns, "iptables", &file, Duration::from_secs(60))?;
    warm_up(&cluster.client, dst, rx, "iptables")?;
    let m = measure(cluster, rx, dst, plan, time)?;
    Ok((m, format!("kube-proxy NodePort chains loaded in {:.0} ms", took.as_secs_f64() * 1e3)))
}

/// One round: a fresh two-node cluster, every case in turn.
fn round(plan: &Plan, time: Duration) -> Result<Vec<(&'static str, Measured, String)>> {
    let cluster = Cluster::new(2, 1)?;
    // Dropped before the cluster: the thread leaves the pod's namespace first.
    let rx = Receiver::start(&cluster.nodes[1].pods[0].ns, TARGET_PORT)?;
    let dir = manifests(&cluster)?;
    let mut out = Vec::new();
    for case in NS_CASES {
        check_interrupted()?;
        let (m, note) = match case {
            "ours_native" => run_ours(&cluster, &rx, &dir, "native", plan, time),
            "ours_generic" => run_ours(&cluster, &rx, &dir, "generic", plan, time),
            _ => run_iptables(&cluster, &rx, &dir, plan, time),
        }
        .with_context(|| format!("north-south {case}"))?;
        ensure!(m.received > 0, "{case}: nothing reached the backend");
        out.push((case, m, note));
    }
    Ok(out)
}

pub fn run(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    let rounds = plan.ns_rounds.max(1);
    let time = plan.ns_time / rounds as u32;
    let mut total: std::collections::BTreeMap<&str, (Measured, Vec<f64>, Vec<String>)> = Default::default();
    for _ in 0..rounds {
        check_interrupted()?;
        for (case, m, note) in round(plan, time)? {
            let t = total.entry(case).or_default();
            t.0.sent += m.sent;
            t.0.received += m.received;
            t.0.secs += m.secs;
            t.0.send_errors += m.send_errors;
            t.0.rcvbuf_drops += m.rcvbuf_drops;
            t.0.pod_rx += m.pod_rx;
            t.1.push(m.received as f64 / m.secs);
            t.2.push(note);
        }
    }
    let f = NS_FAMILIES[0];
    let mut pps = std::collections::BTreeMap::new();
    for case in NS_CASES {
        let (m, per_round, notes) = total.get(case).context("case measured")?;
        let rate = m.received as f64 / m.secs;
        let offered = m.sent as f64 / m.secs;
        let loss = if m.sent > 0 { (m.sent - m.received.min(m.sent)) as f64 * 100.0 / m.sent as f64 } else { 0.0 };
        let note = format!(
            "{} of {} packets received in {:.2} s over {rounds} round(s) (per round {:?} pkt/s); {} flows, \
             {PAYLOAD}-byte UDP payload, cap {} pkt/s; backend pod eth0 received {}, socket buffer drops {}, \
             failed sendmmsg calls {}; {}",
            m.received,
            m.sent,
            m.secs,
            per_round.iter().map(|v| v.round() as u64).collect::<Vec<_>>(),
            plan.ns_flows,
            plan.ns_rate,
            m.pod_rx,
            m.rcvbuf_drops,
            m.send_errors,
            notes.join(" / ")
        );
        rows.push(Row::new(SECTION, &format!("{f}.{case}.pps"), None, rate, "pkt/s").note(note));
        rows.push(Row::new(SECTION, &format!("{f}.{case}.offered_pps"), None, offered, "pkt/s"));
        rows.push(Row::new(SECTION, &format!("{f}.{case}.loss_pct"), None, loss, "%"));
        pps.insert(case, rate);
    }
    for c in ["ours_native", "ours_generic"] {
        rows.push(Row::new(SECTION, &format!("{f}.{c}_vs_iptables"), None, pps[c] / pps["iptables"], "x"));
    }
    Ok(())
}
