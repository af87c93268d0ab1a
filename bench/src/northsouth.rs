//! North-south forwarding rate: UDP packets per second from the external client namespace
//! through a NodePort on node 1 to its only backend, a pod on node 2, so node 1 translates
//! destination and source (DNAT + SNAT to its own address) and sends the packet back out of
//! its uplink. One dual-stack `netns::Cluster` (client, node 1, node 2 on an underlay
//! bridge) serves, in turn:
//!
//! - `direct`: to the pod's own address, routed by node 2 (node 1 not on the path): the
//!   cost of the rest of the path, to estimate what node 1 adds per packet (`node1_ns`);
//! - `ours_native`: the real agent on node 1 (`--uplink eth0 --xdp-mode native`); the
//!   underlay ports run a no-op XDP program, so frames XDP_TX'd on a veth reach the bridge;
//! - `ours_generic`: the same agent with `--xdp-mode generic`;
//! - `ours_dsr`: the native agent with `--lb-mode dsr`: no source NAT, the NodePort carried
//!   to node 2 in an 8-byte IPv4 option (IPv6: a 24-byte Destination Options header) added
//!   to every datagram (node 2 needs no agent to receive them: the kernel ignores the
//!   option, and the pod skips the header's unknown option);
//! - `iptables`: kube-proxy's NodePort chains (nat DNAT + masquerade, filter KUBE-FORWARD,
//!   nft backend; `iptables-restore` and `ip6tables-restore`) loaded into node 1's
//!   namespace with forwarding on there, no XDP on it.
//!
//! Each case is measured for every family in `NS_FAMILIES`, IPv4 first (one Service,
//! RequireDualStack when IPv6 is measured). Rounds run on fresh clusters. Netfilter
//! runs last in a round: its hooks and conntrack stay registered in node 1's namespace once
//! loaded. Node 2 runs no proxy; it only routes to its pod.
//!
//! The sender runs in the client namespace: one connected UDP socket per flow (distinct
//! source ports, so both datapaths track distinct flows), `sendmmsg` batches of small
//! datagrams for a fixed time at up to `plan.ns_rate` packets/s. A receiver thread per
//! family in the backend pod counts datagrams (`recvmmsg`); the rate is what arrived over
//! the send time. A veth transmit runs the receiving side's softirq on the sending CPU, so
//! the sender carries each packet through the whole path: the offered rate follows the
//! path's per-packet cost, and the rate measures that cost (client stack, bridge, node 1,
//! node 2, pod), of which node 1's datapath is the part that differs. Other sessions on
//! the machine take the CPU away at times: `cpu_pps` divides by the sending thread's CPU
//! time instead of the wall clock (softirq time is charged to the task it interrupts here),
//! and `node1_ns` subtracts the `direct` path's cost per packet from each case's.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::File,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
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
    agent::{Agent, TempDir, cli, node_counter},
    harness::PinDir,
    netns::{CLIENT_IPS, CLIENT_IPS6, Cluster, Netns, pod_cidr, pod_cidr6, wait_for},
};

use crate::{Plan, check_interrupted, conn, interrupted, report::Row};

const SECTION: &str = "northsouth";
/// Datapaths, in the order they run on one topology; `direct` sends to the pod IP via node 2
/// (node 1 not on the path): the cost of everything but node 1.
pub const NS_CASES: [&str; 5] = ["direct", "ours_native", "ours_generic", "ours_dsr", "iptables"];
/// Our cases, each compared with iptables.
const OURS: [&str; 3] = ["ours_native", "ours_generic", "ours_dsr"];
/// Families measured (IPv6 through the dual-stack control plane: one RequireDualStack
/// Service, node 1's InternalIPs of both families).
pub const NS_FAMILIES: &[Family] = &[Family::V4, Family::V6];
const NODE_PORT: u16 = 30080;
const TARGET_PORT: u16 = 8080;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
const CLUSTER_CIDR6: &str = "fd00:10:244::/48";
/// IPv4: 14 + 20 + 8 + 18 = 60 bytes, a minimum-size Ethernet frame (IPv6: 80 bytes).
const PAYLOAD: usize = 18;
const BATCH: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// Prefix of the row cases.
    pub fn tag(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }

    fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    fn client(self) -> IpAddr {
        match self {
            Family::V4 => CLIENT_IPS[0].into(),
            Family::V6 => CLIENT_IPS6[0].into(),
        }
    }
}

/// The rows `run` produces and that must be positive (loss may be zero: not listed).
pub fn expected_rows(_plan: &Plan) -> Vec<String> {
    let mut v = Vec::new();
    for f in NS_FAMILIES {
        let f = f.tag();
        for c in NS_CASES {
            for m in ["pps", "offered_pps", "cpu_pps"] {
                v.push(crate::report::row_id(SECTION, &format!("{f}.{c}.{m}"), None));
            }
        }
        for c in OURS {
            for r in ["vs_iptables", "vs_iptables_cpu"] {
                v.push(crate::report::row_id(SECTION, &format!("{f}.{c}_{r}"), None));
            }
        }
        v.push(crate::report::row_id(SECTION, &format!("{f}.ours_dsr_vs_snat"), None));
    }
    v
}

/// A thread inside the backend pod's namespace counting UDP datagrams sent to `bind`; stopped
/// and joined on drop (before the namespaces go).
struct Receiver {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Receiver {
    fn start(ns: &Netns, bind: SocketAddr) -> Result<Self> {
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
                    let sock = UdpSocket::bind(bind).with_context(|| format!("receiver bind {bind}"))?;
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
    // SAFETY: as above (null pointers and zero lengths until filled in below).
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
    /// CPU time of the sending thread: with softirq time charged to the running task
    /// (kernels without CONFIG_IRQ_TIME_ACCOUNTING) it includes the receive path that the
    /// veth transmit runs inline, and not the time other sessions take the CPU away.
    cpu_secs: f64,
}

/// CPU time of the calling thread.
fn thread_cpu() -> f64 {
    // SAFETY: clock_gettime writes the timespec we pass.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Send from `flows` connected sockets in turn, `BATCH` datagrams per `sendmmsg`, for
/// `time`, never ahead of `rate` packets/s. Runs in the client namespace.
fn blast(client: &Netns, src: IpAddr, dst: SocketAddr, flows: usize, time: Duration, rate: u64) -> Result<Sent> {
    client.run(|| -> Result<Sent> {
        let socks = (0..flows.max(1))
            .map(|_| -> Result<UdpSocket> {
                let s = UdpSocket::bind((src, 0)).with_context(|| format!("sender bind {src}"))?;
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
        let (t, cpu) = (Instant::now(), thread_cpu());
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
        Ok(Sent { sent, errors, secs: t.elapsed().as_secs_f64(), cpu_secs: thread_cpu() - cpu })
    })
}

/// Probe until the receiver sees a packet (the agent's first packets to node 2 wait for the
/// neighbour entry it resolves; iptables needs its rules in place).
fn warm_up(client: &Netns, src: IpAddr, dst: SocketAddr, rx: &Receiver, what: &str) -> Result<()> {
    client
        .run(|| -> Result<()> {
            let s = UdpSocket::bind((src, 0))?;
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
/// UDP receive-buffer drops (both families) and its eth0 received packets.
fn pod_counters(ns: &Netns) -> Result<(u64, u64)> {
    ns.run(|| -> Result<(u64, u64)> {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").context("net/snmp")?;
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (udp.next().context("Udp header")?, udp.next().context("Udp values")?);
        let col = names.split_whitespace().position(|c| c == "RcvbufErrors").context("RcvbufErrors")?;
        let mut rcvbuf: u64 = values.split_whitespace().nth(col).context("RcvbufErrors value")?.parse()?;
        // Absent when IPv6 is off in the namespace.
        if let Ok(snmp6) = std::fs::read_to_string("/proc/thread-self/net/snmp6") {
            let v6 = snmp6.lines().find_map(|l| l.strip_prefix("Udp6RcvbufErrors")).map(str::trim);
            rcvbuf += v6.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
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
    cpu_secs: f64,
    send_errors: u64,
    rcvbuf_drops: u64,
    pod_rx: u64,
    /// CPU time of the ksoftirqd threads meanwhile: receive work deferred there is not in
    /// `cpu_secs` (it also holds other sessions' softirq work).
    ksoftirqd_secs: f64,
}

/// Summed CPU time (user + system) of the kernel's ksoftirqd threads, from /proc.
fn ksoftirqd_secs() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    let mut ticks = 0u64;
    for e in dir.flatten() {
        let p = e.path();
        if !std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.starts_with("ksoftirqd/")) {
            continue;
        }
        // Fields after the parenthesised name: state is the 1st, utime the 12th, stime the 13th.
        if let Ok(stat) = std::fs::read_to_string(p.join("stat"))
            && let Some((_, rest)) = stat.rsplit_once(')')
        {
            let f: Vec<&str> = rest.split_whitespace().collect();
            ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ticks as f64 / hz
}

/// What one family needs: the client's source, node 1's NodePort, the backend pod's own
/// address and the receiver.
struct Target<'a> {
    family: Family,
    src: IpAddr,
    dst: SocketAddr,
    pod: SocketAddr,
    rx: &'a Receiver,
}

fn measure(cluster: &Cluster, t: &Target, dst: SocketAddr, plan: &Plan, time: Duration) -> Result<Measured> {
    let pod = &cluster.nodes[1].pods[0].ns;
    t.rx.alive()?;
    let before = t.rx.settle();
    let (rcvbuf0, pod_rx0) = pod_counters(pod)?;
    let soft = ksoftirqd_secs();
    let s = blast(&cluster.client, t.src, dst, plan.ns_flows, time, plan.ns_rate)?;
    let after = t.rx.settle();
    let soft = ksoftirqd_secs() - soft;
    let (rcvbuf1, pod_rx1) = pod_counters(pod)?;
    t.rx.alive()?;
    Ok(Measured {
        sent: s.sent,
        received: after - before,
        secs: s.secs,
        cpu_secs: s.cpu_secs,
        send_errors: s.errors,
        rcvbuf_drops: rcvbuf1.saturating_sub(rcvbuf0),
        pod_rx: pod_rx1.saturating_sub(pod_rx0),
        ksoftirqd_secs: soft,
    })
}

/// The Service (RequireDualStack UDP NodePort; one endpoint per family: node 2's pod), its
/// two EndpointSlices and node 1's Node object with both InternalIPs.
fn manifests(cluster: &Cluster) -> Result<TempDir> {
    let dir = TempDir::new("ebpf-proxy-bench-northsouth-")?;
    let backend = &cluster.nodes[1].pods[0];
    let ip6 = backend.ip6.context("the backend pod has no IPv6 address")?;
    // IPv4 only while IPv6 is not measured (an agent without the dual-stack control plane
    // warns about the IPv6 half).
    let dual = NS_FAMILIES.contains(&Family::V6);
    let (policy, families, ips) = if dual {
        ("RequireDualStack", "IPv4, IPv6", format!("\"{CLUSTER_IP}\", \"{CLUSTER_IP6}\""))
    } else {
        ("SingleStack", "IPv4", format!("\"{CLUSTER_IP}\""))
    };
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: ns\n  namespace: default\nspec:\n  type: NodePort\n  \
         ipFamilyPolicy: {policy}\n  ipFamilies: [{families}]\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [{ips}]\n  \
         ports:\n  - name: udp\n    port: 80\n    targetPort: {TARGET_PORT}\n    protocol: UDP\n    nodePort: {NODE_PORT}\n"
    );
    let slice = |family: &str, addr: IpAddr| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: ns-{}\n  namespace: default\n  \
             labels:\n    kubernetes.io/service-name: ns\naddressType: {family}\nports:\n\
             - {{name: udp, port: {TARGET_PORT}, protocol: UDP}}\nendpoints:\n- addresses: [\"{addr}\"]\n  \
             conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: {}\n  \
             targetRef: {{kind: Pod, name: {}, namespace: default}}\n",
            family.to_lowercase(),
            cluster.nodes[1].name,
            backend.name
        )
    };
    let mut objects = format!("---\n{svc}{}", slice("IPv4", backend.ip.into()));
    if dual {
        objects.push_str(&slice("IPv6", ip6.into()));
    }
    dir.write("services.yaml", &objects)?;
    let n1 = &cluster.nodes[0];
    let n1_ip6 = n1.ip6.context("node 1 has no IPv6 address")?;
    let v6_address = if dual { format!("  - type: InternalIP\n    address: \"{n1_ip6}\"\n") } else { String::new() };
    dir.write(
        "node.yaml",
        &format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n  - type: InternalIP\n    \
             address: {}\n{v6_address}  - type: Hostname\n    address: {name}\n",
            n1.ip,
            name = n1.name
        ),
    )?;
    Ok(dir)
}

/// kube-proxy's iptables layout for this one NodePort in `family` (as `iptables-save` shows
/// it for a Cluster-policy NodePort with one endpoint): PREROUTING -> KUBE-SERVICES ->
/// KUBE-NODEPORTS -> KUBE-EXT (mark for masquerade) -> KUBE-SVC -> KUBE-SEP (DNAT);
/// POSTROUTING masquerades marked packets; filter FORWARD -> KUBE-FORWARD.
fn iptables_rules(family: Family, backend: IpAddr) -> String {
    let pn = "default/ns:udp";
    let (svc, ext, sep) = ("KUBE-SVC-BENCHNSUDP000000", "KUBE-EXT-BENCHNSUDP000000", "KUBE-SEP-BENCHNSUDP000000");
    let (vip, host, cidr, to) = match family {
        Family::V4 => (
            format!("{CLUSTER_IP}/32"),
            format!("{backend}/32"),
            crate::rules::CLUSTER_CIDR.to_string(),
            format!("{backend}:{TARGET_PORT}"),
        ),
        Family::V6 => (
            format!("{CLUSTER_IP6}/128"),
            format!("{backend}/128"),
            CLUSTER_CIDR6.to_string(),
            format!("[{backend}]:{TARGET_PORT}"),
        ),
    };
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
        "-A KUBE-SERVICES -d {vip} -p udp -m comment --comment \"{pn} cluster IP\" -m udp --dport 80 -j {svc}"
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
        "-A {svc} ! -s {cidr} -d {vip} -p udp -m comment --comment \"{pn} cluster IP\" -m udp --dport 80 -j KUBE-MARK-MASQ"
    );
    let _ = writeln!(s, "-A {svc} -m comment --comment \"{pn} -> {to}\" -j {sep}");
    let _ = writeln!(s, "-A {sep} -s {host} -m comment --comment \"{pn}\" -j KUBE-MARK-MASQ");
    let _ = writeln!(s, "-A {sep} -p udp -m comment --comment \"{pn}\" -m udp -j DNAT --to-destination {to}");
    s.push_str("COMMIT\n");
    s
}

/// Whether `iface` in `ns` has an XDP program attached (`ip link` shows `xdp`/`xdpgeneric`).
fn has_xdp(ns: &Netns, iface: &str) -> Result<bool> {
    let out = ns.ip(&["link", "show", "dev", iface])?;
    Ok(out.split_whitespace().any(|w| w.starts_with("xdp")))
}

/// Per family: its measurement and a note, or why it failed (the case itself ran).
type Outcomes = Vec<(Family, Result<(Measured, String)>)>;

/// Our agent on node 1 in XDP `mode` and `--lb-mode` `lb_mode`, warmed up and measured per
/// family; the agent is killed and its pins removed (XDP detached) before returning, also
/// on failure.
fn run_ours(
    cluster: &Cluster,
    targets: &[Target],
    dir: &TempDir,
    (mode, lb_mode): (&str, &str),
    plan: &Plan,
    time: Duration,
) -> Result<Outcomes> {
    let node = &cluster.nodes[0];
    let pins = PinDir::new();
    let root = pins.0.to_str().context("pin path")?.to_string();
    let manifests = dir.0.to_str().context("manifest dir")?.to_string();
    let r = (|| -> Result<Outcomes> {
        // Declared after `pins`: killed before the pins go.
        let mut agent = Agent::start(
            &node.ns,
            &pins.0,
            10256,
            &[
                "--manifests",
                &manifests,
                "--node-name",
                &node.name,
                "--uplink",
                &node.uplink,
                "--xdp-mode",
                mode,
                "--lb-mode",
                lb_mode,
            ],
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
        let mut out = Vec::new();
        for t in targets {
            check_interrupted()?;
            let one = || -> Result<(Measured, String)> {
                warm_up(&cluster.client, t.src, t.dst, t.rx, &format!("ours ({mode})"))?;
                let before = cli(&["stats", "--bpffs-root", &root])?;
                let m = measure(cluster, t, t.dst, plan, time)?;
                let after = cli(&["stats", "--bpffs-root", &root])?;
                let d = |v: &str| node_counter(&after, v).saturating_sub(node_counter(&before, v));
                let note = format!(
                    "--lb-mode {lb_mode}; datapath verdicts during the run: established {}, new_flow {}, no_route {}, \
                     pass {}",
                    d("established"),
                    d("new_flow"),
                    d("no_route"),
                    d("pass")
                );
                Ok((m, note))
            };
            out.push((t.family, one()));
        }
        agent.kill();
        Ok(out)
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

/// Straight to the backend pod's address, routed by node 2 (no service, no node 1).
fn run_direct(cluster: &Cluster, targets: &[Target], plan: &Plan, time: Duration) -> Result<Outcomes> {
    let mut out = Vec::new();
    for t in targets {
        check_interrupted()?;
        let one = || -> Result<(Measured, String)> {
            warm_up(&cluster.client, t.src, t.pod, t.rx, "direct")?;
            Ok((measure(cluster, t, t.pod, plan, time)?, format!("to {} via node 2", t.pod)))
        };
        out.push((t.family, one()));
    }
    Ok(out)
}

fn run_iptables(cluster: &Cluster, targets: &[Target], dir: &TempDir, plan: &Plan, time: Duration) -> Result<Outcomes> {
    let node = &cluster.nodes[0];
    ensure!(!has_xdp(&node.ns, &node.uplink)?, "XDP still attached to node 1's uplink");
    node.ns.sysctl("net.ipv4.ip_forward", "1")?;
    node.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    let backend = &cluster.nodes[1].pods[0];
    let mut out = Vec::new();
    for t in targets {
        check_interrupted()?;
        let one = || -> Result<(Measured, String)> {
            let (addr, restore): (IpAddr, &str) = match t.family {
                Family::V4 => (backend.ip.into(), "iptables-restore"),
                Family::V6 => (backend.ip6.context("backend without IPv6")?.into(), "ip6tables-restore"),
            };
            let file = dir.0.join(format!("kube-proxy-nodeport-{}.rules", t.family.tag()));
            std::fs::write(&file, iptables_rules(t.family, addr))
                .with_context(|| format!("writing {}", file.display()))?;
            let took = conn::run_in(&node.ns, restore, &["-w"], Some(&file), Duration::from_secs(60))?;
            warm_up(&cluster.client, t.src, t.dst, t.rx, "iptables")?;
            let m = measure(cluster, t, t.dst, plan, time)?;
            Ok((m, format!("kube-proxy NodePort chains loaded by {restore} in {:.0} ms", took.as_secs_f64() * 1e3)))
        };
        out.push((t.family, one()));
    }
    Ok(out)
}

/// One round: a fresh dual-stack two-node cluster, every case in turn, each for both
/// families.
fn round(plan: &Plan, time: Duration, index: usize) -> Result<Vec<(&'static str, Outcomes)>> {
    let cluster = Cluster::dual_stack(2, 1)?;
    let backend = &cluster.nodes[1].pods[0];
    // Dropped before the cluster: the threads leave the pod's namespace first. One socket
    // per family (the pod sets bindv6only).
    let mut receivers = Vec::new();
    for &f in NS_FAMILIES {
        receivers.push((f, Receiver::start(&backend.ns, (f.unspecified(), TARGET_PORT).into())?));
    }
    let n1 = &cluster.nodes[0];
    let targets: Vec<Target> = receivers
        .iter()
        .map(|(f, rx)| -> Result<Target> {
            let (node, pod): (IpAddr, IpAddr) = match f {
                Family::V4 => (n1.ip.into(), backend.ip.into()),
                Family::V6 => {
                    (n1.ip6.context("node 1 without IPv6")?.into(), backend.ip6.context("pod without IPv6")?.into())
                }
            };
            let pod = (pod, TARGET_PORT).into();
            Ok(Target { family: *f, src: f.client(), dst: (node, NODE_PORT).into(), pod, rx })
        })
        .collect::<Result<_>>()?;
    // For `direct`: the client reaches node 2's pods through node 2 (its own namespace).
    cluster.client_route(&pod_cidr(1), 1)?;
    cluster.client_route6(&pod_cidr6(1), 1)?;
    let dir = manifests(&cluster)?;
    let mut out = Vec::new();
    // The two XDP modes swap places every other round (netfilter stays last).
    let mut order = NS_CASES;
    if index % 2 == 1 {
        order.swap(1, 2);
    }
    for case in order {
        check_interrupted()?;
        let r = match case {
            "direct" => run_direct(&cluster, &targets, plan, time),
            "ours_native" => run_ours(&cluster, &targets, &dir, ("native", "snat"), plan, time),
            "ours_generic" => run_ours(&cluster, &targets, &dir, ("generic", "snat"), plan, time),
            "ours_dsr" => run_ours(&cluster, &targets, &dir, ("native", "dsr"), plan, time),
            _ => run_iptables(&cluster, &targets, &dir, plan, time),
        }
        .with_context(|| format!("north-south {case}"))?;
        out.push((case, r));
    }
    Ok(out)
}

pub fn run(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    let rounds = plan.ns_rounds.max(1);
    let time = plan.ns_time / rounds as u32;
    type Acc = (Measured, Vec<f64>, Vec<String>);
    let mut total: BTreeMap<(Family, &str), Acc> = BTreeMap::new();
    let mut failed: BTreeMap<Family, String> = BTreeMap::new();
    for index in 0..rounds {
        check_interrupted()?;
        for (case, outcomes) in round(plan, time, index)? {
            for (family, r) in outcomes {
                let (m, note) = match r.and_then(|(m, n)| {
                    ensure!(m.received > 0, "nothing reached the backend");
                    Ok((m, n))
                }) {
                    Ok(v) => v,
                    Err(e) => {
                        failed.entry(family).or_insert_with(|| format!("{} {case}: {e:#}", family.tag()));
                        continue;
                    }
                };
                let t = total.entry((family, case)).or_default();
                t.0.sent += m.sent;
                t.0.received += m.received;
                t.0.secs += m.secs;
                t.0.cpu_secs += m.cpu_secs;
                t.0.send_errors += m.send_errors;
                t.0.rcvbuf_drops += m.rcvbuf_drops;
                t.0.pod_rx += m.pod_rx;
                t.0.ksoftirqd_secs += m.ksoftirqd_secs;
                t.1.push(m.received as f64 / m.secs);
                t.2.push(note);
            }
        }
    }
    for &family in NS_FAMILIES {
        if failed.contains_key(&family) {
            continue;
        }
        let f = family.tag();
        let (mut pps, mut cpu_pps) = (BTreeMap::new(), BTreeMap::new());
        for case in NS_CASES {
            let (m, per_round, notes) = total.get(&(family, case)).context("case measured")?;
            let mut notes = notes.clone();
            notes.dedup();
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
            let per_cpu = m.received as f64 / m.cpu_secs;
            rows.push(Row::new(SECTION, &format!("{f}.{case}.cpu_pps"), None, per_cpu, "pkt/CPU-s").note(format!(
                "packets received per CPU-second of the sending thread ({:.2} CPU-s in {:.2} s), which carries \
                 each packet through the path (softirq in its context): steadier than pps on a shared machine; \
                 ksoftirqd meanwhile {:.3} CPU-s (deferred work, not counted; includes other sessions')",
                m.cpu_secs, m.secs, m.ksoftirqd_secs
            )));
            pps.insert(case, rate);
            cpu_pps.insert(case, per_cpu);
        }
        for c in OURS {
            // Paired by round (each round runs every case on one fresh cluster).
            let per_round = |case| total.get(&(family, case)).map(|t| t.1.clone()).unwrap_or_default();
            let paired: Vec<f64> = per_round(c).iter().zip(&per_round("iptables")).map(|(a, b)| a / b).collect();
            let row =
                Row::median_of(SECTION, &format!("{f}.{c}_vs_iptables"), None, &paired, "x").unwrap_or_else(|| {
                    Row::new(SECTION, &format!("{f}.{c}_vs_iptables"), None, pps[c] / pps["iptables"], "x")
                });
            let pooled = pps[c] / pps["iptables"];
            rows.push(row.note(format!(
                "median of {} per-round ratios of pkt/s; pooled over rounds: {pooled:.2}x",
                paired.len()
            )));
            rows.push(
                Row::new(SECTION, &format!("{f}.{c}_vs_iptables_cpu"), None, cpu_pps[c] / cpu_pps["iptables"], "x")
                    .note("the same ratio of cpu_pps (whole path per CPU-second, not wall clock)"),
            );
        }
        // What node 1 adds per packet over the path without it (its own hop included): the
        // part of the cost that differs between the datapaths. A difference of two rates, so
        // it may still come out <= 0 on a busy machine.
        let extra = |c: &str| 1e9 / cpu_pps[c] - 1e9 / cpu_pps["direct"];
        // DSR against SNAT, both native and paired by round: what forwarding without source NAT
        // (and with the option added) costs or saves on node 1.
        let per_round = |case| total.get(&(family, case)).map(|t| t.1.clone()).unwrap_or_default();
        let paired: Vec<f64> =
            per_round("ours_dsr").iter().zip(&per_round("ours_native")).map(|(a, b)| a / b).collect();
        let row = Row::median_of(SECTION, &format!("{f}.ours_dsr_vs_snat"), None, &paired, "x").unwrap_or_else(|| {
            Row::new(SECTION, &format!("{f}.ours_dsr_vs_snat"), None, pps["ours_dsr"] / pps["ours_native"], "x")
        });
        rows.push(row.note(format!("median of {} per-round ratios of pkt/s, ours_dsr / ours_native", paired.len())));
        for c in ["ours_native", "ours_generic", "ours_dsr", "iptables"] {
            rows.push(
                Row::new(SECTION, &format!("{f}.{c}.node1_ns"), None, extra(c), "ns/pkt")
                    .note("1e9 / cpu_pps - 1e9 / direct cpu_pps: CPU time node 1 adds per packet"),
            );
        }
        for c in OURS {
            let (ours, ipt) = (extra(c), extra("iptables"));
            if ours > 0.0 && ipt > 0.0 {
                rows.push(Row::new(SECTION, &format!("{f}.{c}_vs_iptables_node1"), None, ipt / ours, "x").note(
                    "iptables node1_ns / ours node1_ns: how many times cheaper node 1's forwarding is (estimate)",
                ));
            }
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.into_values().collect::<Vec<_>>().join("; "));
    }
    Ok(())
}
