//! Network-namespace topologies for tests and benchmarks. Everything lives in namespaces
//! created here and is deleted on drop (even when a test panics); nothing touches the root
//! namespace: veth pairs are created directly inside the node namespace.
//!
//! Pod wiring (Calico-like, routed): the pod has `eth0` with a /32 and a default route via
//! 169.254.1.1, an address every host-side veth carries; the node routes each pod's /32 to
//! that pod's host-side veth (`veth<i>`, matching the agent's default pattern).
use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, FromRawFd, OwnedFd},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::harness::unique;

pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Run `ip` with arguments; error with its stderr on failure.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Set a sysctl inside this namespace only.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec_ok(&["sysctl", "-qw", &format!("{key}={value}")])
    }

    pub fn exec_ok(&self, cmd: &[&str]) -> Result<()> {
        let out = Command::new("ip").args(["netns", "exec", &self.name]).args(cmd).output().context("ip netns exec")?;
        if !out.status.success() {
            bail!("{} in {}: {}", cmd.join(" "), self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Start a long-running process inside the namespace.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {program} in {}", self.name))
    }

    /// Run `f` on a thread that has entered this namespace: sockets it creates live here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).expect("open netns");
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            // The thread's own panic (an assertion's message), not a wrapper saying "Any".
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

pub struct Pod {
    pub ns: Netns,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, in dual-stack topologies.
    pub ip6: Option<Ipv6Addr>,
    /// Host-side interface in the node namespace.
    pub host_if: String,
}

/// A routed pod `name` with address `addr` behind host-side `veth<index>` of `node`.
fn wire_pod(node: &Netns, index: usize, name: &str, addr: Ipv4Addr) -> Result<Pod> {
    wire_pod_as(node, &format!("veth{index}"), name, addr)
}

/// [`wire_pod`] behind a host-side interface named `host_if`.
fn wire_pod_as(node: &Netns, host_if: &str, name: &str, addr: Ipv4Addr) -> Result<Pod> {
    let ns = Netns::new("epn-pod-")?;
    let host_if = host_if.to_string();
    let a = addr.to_string();
    node.ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
    node.ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", &host_if])?;
    node.ip(&["link", "set", &host_if, "up"])?;
    node.sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter"), "0")?;
    ns.ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", &GATEWAY.to_string(), "dev", "eth0", "scope", "link"])?;
    ns.ip(&["route", "add", "default", "via", &GATEWAY.to_string(), "dev", "eth0"])?;
    node.ip(&["route", "add", &format!("{a}/32"), "dev", &host_if, "src", &GATEWAY.to_string()])?;
    Ok(Pod { ns, name: name.to_string(), ip: addr, ip6: None, host_if })
}

/// The link-local gateway every dual-stack pod's IPv6 default route points at, on each
/// host-side veth (as Calico and Cilium do with their link-local gateways).
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Turn off duplicate address detection in `ns`, so addresses are usable at once.
fn no_dad(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
}

/// [`wire_pod`] plus an IPv6 /128 with a default route via [`GATEWAY6`]; the pod sets
/// `bindv6only` so its servers see IPv4 peers as IPv4.
fn wire_pod_dual(node: &Netns, index: usize, name: &str, addr: Ipv4Addr, addr6: Ipv6Addr) -> Result<Pod> {
    let mut pod = wire_pod(node, index, name, addr)?;
    let a6 = format!("{addr6}/128");
    no_dad(&pod.ns)?;
    pod.ns.sysctl("net.ipv6.bindv6only", "1")?;
    node.sysctl(&format!("net.ipv6.conf.{}.accept_dad", pod.host_if), "0")?;
    node.ip(&["-6", "addr", "add", &format!("{GATEWAY6}/64"), "dev", &pod.host_if, "nodad"])?;
    pod.ns.ip(&["-6", "addr", "add", &a6, "dev", "eth0", "nodad"])?;
    pod.ns.ip(&["-6", "route", "add", "default", "via", &GATEWAY6.to_string(), "dev", "eth0"])?;
    node.ip(&["-6", "route", "add", &a6, "dev", &pod.host_if])?;
    pod.ip6 = Some(addr6);
    Ok(pod)
}

/// One node namespace with `n` routed pods.
pub struct Topology {
    pub node: Netns,
    pub pods: Vec<Pod>,
    children: Vec<Child>,
}

impl Topology {
    /// Pods get 10.244.<subnet>.<10+i>.
    pub fn single_node(n: usize, subnet: u8) -> Result<Self> {
        let node = Netns::new("epn-node-")?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        let mut topo = Topology { node, pods: Vec::new(), children: Vec::new() };
        for i in 0..n {
            topo.add_pod(&format!("pod{i}"), Ipv4Addr::new(10, 244, subnet, 10 + i as u8))?;
        }
        Ok(topo)
    }

    /// Dual-stack pods: 10.244.<subnet>.<10+i> and fd00:10:244:<subnet>::<10+i>, the node
    /// forwarding both families.
    pub fn dual_stack(n: usize, subnet: u8) -> Result<Self> {
        let node = Netns::new("epn-node-")?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        no_dad(&node)?;
        let mut topo = Topology { node, pods: Vec::new(), children: Vec::new() };
        for i in 0..n {
            let host = 10 + i as u16;
            let v6 = Ipv6Addr::new(0xfd00, 0x10, 0x244, subnet.into(), 0, 0, 0, host);
            let pod = wire_pod_dual(&topo.node, i, &format!("pod{i}"), Ipv4Addr::new(10, 244, subnet, host as u8), v6)?;
            topo.pods.push(pod);
        }
        Ok(topo)
    }

    pub fn add_pod(&mut self, name: &str, addr: Ipv4Addr) -> Result<()> {
        let pod = wire_pod(&self.node, self.pods.len(), name, addr)?;
        self.pods.push(pod);
        Ok(())
    }

    /// [`Self::add_pod`] behind a host-side interface named `host_if` (as a CNI names it).
    pub fn add_pod_named(&mut self, name: &str, addr: Ipv4Addr, host_if: &str) -> Result<()> {
        let pod = wire_pod_as(&self.node, host_if, name, addr)?;
        self.pods.push(pod);
        Ok(())
    }

    /// Start `proxy-podserver` in pod `i`, answering with the pod's name on TCP and UDP.
    pub fn start_server(&mut self, server_bin: &str, i: usize, port: u16) -> Result<()> {
        let pod = &self.pods[i];
        let child = pod.ns.spawn(server_bin, &["--name", &pod.name, "--port", &port.to_string()])?;
        self.children.push(child);
        Ok(())
    }

    /// Keep a process (e.g. the agent) to be killed when the topology is dropped.
    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Poll `f` until it returns Some, or fail after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Set an ethtool feature flag (`ETHTOOL_S*` legacy command) on `iface` inside `ns`. No
/// ethtool binary needed: the ioctl on a socket created in the namespace.
fn ethtool_set(ns: &Netns, iface: &str, cmd: u32, on: bool) -> Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let iface = iface.to_string();
    ns.run(move || -> Result<()> {
        let mut value = EthtoolValue { cmd, data: on as u32 };
        let mut req = IfReq { name: [0; 16], data: &mut value, _pad: [0; 16] };
        let n = iface.len().min(15);
        req.name[..n].copy_from_slice(&iface.as_bytes()[..n]);
        // SAFETY: plain socket + ioctl with a correctly laid out ifreq pointing at a live
        // ethtool_value; the fd is closed before returning.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if rc != 0 {
                bail!("ethtool cmd {cmd:#x} on {iface}: {err}");
            }
        }
        Ok(())
    })
}

/// Attach a two-instruction XDP program (`return XDP_PASS`) in native mode to `iface` in
/// `ns`, through a bpf_link whose fd is returned (closing it detaches). Loaded with the raw
/// bpf syscall: it is test plumbing, not part of the datapath.
///
/// Why: native XDP on a veth flushes XDP_TX/redirected frames to its peer only when the peer
/// runs XDP itself; the underlay ends of the node veths get this no-op program so the node
/// side can run the real one natively.
fn attach_xdp_pass(ns: &Netns, iface: &str) -> Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    // r0 = XDP_PASS (2); exit
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 2, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = b"GPL\0";
    let iface = iface.to_string();
    ns.run(move || -> Result<OwnedFd> {
        let c = std::ffi::CString::new(iface.clone())?;
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        let sys = |cmd: libc::c_long, attr: &mut [u8; 128]| -> Result<OwnedFd> {
            // SAFETY: bpf(2) with a zero-padded attr buffer larger than the fields the
            // command reads; on success it returns a new fd we take ownership of.
            let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
            if fd < 0 {
                bail!("bpf cmd {cmd} for {iface}: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fd just returned by the kernel, owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
        };
        let mut load = [0u8; 128];
        load[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
        load[4..8].copy_from_slice(&2u32.to_ne_bytes());
        load[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        load[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        load[68..72].copy_from_slice(&BPF_XDP.to_ne_bytes());
        let prog = sys(BPF_PROG_LOAD, &mut load)?;
        let mut link = [0u8; 128];
        link[0..4].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&prog) as u32).to_ne_bytes());
        link[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        link[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
        link[12..16].copy_from_slice(&XDP_FLAGS_DRV_MODE.to_ne_bytes());
        sys(BPF_LINK_CREATE, &mut link)
    })
}

const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_SGRO: u32 = 0x2c;

/// Underlay addressing of a [`Cluster`].
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The external client's addresses (the first is its primary).
pub const CLIENT_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 168, 100, 100), Ipv4Addr::new(192, 168, 100, 101)];

/// Node `i` (0-based) of a [`Cluster`]: 192.168.100.<i+1>, pods in 10.244.<i+1>.0/24.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, i as u8 + 1)
}

pub fn pod_cidr(i: usize) -> String {
    format!("10.244.{}.0/24", i + 1)
}

/// IPv6 of a dual-stack [`Cluster`]: the underlay is fd00:100::/64, the client holds
/// ::100 and ::101, node `i` ::<i+1>, its pods fd00:10:244:<i+1>::<10+k>.
pub const CLIENT_IPS6: [Ipv6Addr; 2] =
    [Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x100), Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x101)];

pub fn node_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, i as u16 + 1)
}

pub fn pod_cidr6(i: usize) -> String {
    format!("fd00:10:244:{}::/64", i + 1)
}

pub struct ClusterNode {
    pub ns: Netns,
    /// Kubernetes node name: `node<i+1>`.
    pub name: String,
    pub ip: Ipv4Addr,
    /// The node's IPv6 address, in a dual-stack cluster.
    pub ip6: Option<Ipv6Addr>,
    /// Uplink interface in the node namespace (`eth0`).
    pub uplink: String,
    /// Pods `n<i+1>p<k>` at 10.244.<i+1>.<10+k>.
    pub pods: Vec<Pod>,
}

/// Several nodes on one L2 underlay, with an external client:
///
/// ```text
///   client ns: eth0 192.168.100.100 + .101 ──┐
///                                             │  underlay ns: bridge br0
///   node1 ns: eth0 192.168.100.1 ─────────────┤  (ports c0, n1, n2, ...)
///     veth0.. -> pods 10.244.1.10, .11 ...    │
///   node2 ns: eth0 192.168.100.2 ─────────────┘
///     veth0.. -> pods 10.244.2.10, .11 ...
/// ```
///
/// Each node routes the other nodes' pod CIDRs via their node address (like a host-gw /
/// direct-routing CNI). Every namespace is created here and deleted on drop.
///
/// Two settings make the veth underlay behave like a wire for XDP:
/// - TX checksum offload is off on the client's and the nodes' `eth0`, so what crosses the
///   underlay carries complete checksums (a physical NIC delivers those; a veth would pass
///   CHECKSUM_PARTIAL packets whose checksum field XDP cannot update meaningfully).
/// - The underlay ends of the node veths run a no-op native XDP program (and GRO): native
///   XDP on a veth hands XDP_TX/redirected frames to its peer only if the peer runs XDP
///   too. With that, the agents can use `--xdp-mode native`; in `auto` they choose generic
///   on a veth uplink.
pub struct Cluster {
    pub underlay: Netns,
    pub client: Netns,
    pub nodes: Vec<ClusterNode>,
    children: Vec<Child>,
    /// The no-op XDP links on the underlay ports (detached when closed).
    _peer_xdp: Vec<OwnedFd>,
}

impl Cluster {
    pub fn new(nodes: usize, pods_per_node: usize) -> Result<Self> {
        Self::build(nodes, pods_per_node, false, false)
    }

    /// The same layout with IPv6 as well: see [`CLIENT_IPS6`], [`node_ip6`], [`pod_cidr6`].
    pub fn dual_stack(nodes: usize, pods_per_node: usize) -> Result<Self> {
        Self::build(nodes, pods_per_node, true, false)
    }

    /// The same layout with the pod networks on a VXLAN overlay, as flannel's vxlan backend
    /// builds it: each node has `flannel.1` (VNI 1, UDP 8472 over `eth0`) holding
    /// 10.244.<i+1>.0/32, and reaches node `j`'s pod CIDR via 10.244.<j+1>.0 on it, with a
    /// permanent neighbour entry (the other VTEP's MAC) and a forwarding entry sending that
    /// MAC to node `j`'s underlay address. Only the overlay reaches the other nodes' pods.
    pub fn vxlan(nodes: usize, pods_per_node: usize) -> Result<Self> {
        Self::build(nodes, pods_per_node, false, true)
    }

    fn build(nodes: usize, pods_per_node: usize, dual: bool, vxlan: bool) -> Result<Self> {
        let underlay = Netns::new("epc-ul-")?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::new("epc-cl-")?;
        // `eth0` in `ns`, its peer `port` on the bridge.
        fn plug(underlay: &Netns, port: &str, ns: &Netns) -> Result<()> {
            underlay.ip(&["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
            underlay.ip(&["link", "set", port, "master", "br0"])?;
            underlay.ip(&["link", "set", port, "up"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ethtool_set(ns, "eth0", ETHTOOL_STXCSUM, false)
        }
        if dual {
            no_dad(&client)?;
        }
        plug(&underlay, "c0", &client)?;
        for ip in CLIENT_IPS {
            client.ip(&["addr", "add", &format!("{ip}/{UNDERLAY_PREFIX_LEN}"), "dev", "eth0"])?;
        }
        if dual {
            // The kernel prefers the newest of equal IPv6 candidates as a default source;
            // the extra ones are deprecated (preferred_lft 0) so CLIENT_IPS6[0] is the
            // source of an unbound connection, as the first IPv4 address is. Binding one
            // explicitly still works.
            for (i, ip) in CLIENT_IPS6.iter().enumerate() {
                let mut args = vec!["-6".to_string(), "addr".into(), "add".into(), format!("{ip}/64")];
                args.extend(["dev", "eth0", "nodad"].map(String::from));
                if i > 0 {
                    args.extend(["preferred_lft", "0"].map(String::from));
                }
                client.ip(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
            }
        }
        let mut cluster = Cluster { underlay, client, nodes: Vec::new(), children: Vec::new(), _peer_xdp: Vec::new() };
        for i in 0..nodes {
            let ns = Netns::new(&format!("epc-n{}-", i + 1))?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            if dual {
                ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
                no_dad(&ns)?;
            }
            let port = format!("n{}", i + 1);
            plug(&cluster.underlay, &port, &ns)?;
            ethtool_set(&cluster.underlay, &port, ETHTOOL_SGRO, true)?;
            let link = attach_xdp_pass(&cluster.underlay, &port)?;
            cluster._peer_xdp.push(link);
            let ip = node_ip(i);
            ns.ip(&["addr", "add", &format!("{ip}/{UNDERLAY_PREFIX_LEN}"), "dev", "eth0"])?;
            if vxlan {
                vxlan_overlay(&ns, i, nodes)?;
            } else {
                for j in (0..nodes).filter(|j| *j != i) {
                    ns.ip(&["route", "add", &pod_cidr(j), "via", &node_ip(j).to_string(), "dev", "eth0"])?;
                }
            }
            let ip6 = dual.then(|| node_ip6(i));
            if let Some(ip6) = ip6 {
                ns.ip(&["-6", "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
                for j in (0..nodes).filter(|j| *j != i) {
                    ns.ip(&["-6", "route", "add", &pod_cidr6(j), "via", &node_ip6(j).to_string(), "dev", "eth0"])?;
                }
            }
            let mut pods = Vec::new();
            for k in 0..pods_per_node {
                let name = format!("n{}p{k}", i + 1);
                let v4 = Ipv4Addr::new(10, 244, i as u8 + 1, 10 + k as u8);
                pods.push(if dual {
                    let v6 = Ipv6Addr::new(0xfd00, 0x10, 0x244, i as u16 + 1, 0, 0, 0, 10 + k as u16);
                    wire_pod_dual(&ns, k, &name, v4, v6)?
                } else {
                    wire_pod(&ns, k, &name, v4)?
                });
            }
            cluster.nodes.push(ClusterNode {
                ns,
                name: format!("node{}", i + 1),
                ip,
                ip6,
                uplink: "eth0".into(),
                pods,
            });
        }
        Ok(cluster)
    }

    /// Route `prefix` (LoadBalancer / external IPs) from the client via node `i`, as a
    /// router in front of the cluster would.
    pub fn client_route(&self, prefix: &str, i: usize) -> Result<()> {
        self.client.ip(&["route", "replace", prefix, "via", &node_ip(i).to_string(), "dev", "eth0"]).map(|_| ())
    }

    /// [`Self::client_route`] for an IPv6 prefix, via node `i`'s IPv6 address.
    pub fn client_route6(&self, prefix: &str, i: usize) -> Result<()> {
        self.client.ip(&["-6", "route", "replace", prefix, "via", &node_ip6(i).to_string(), "dev", "eth0"]).map(|_| ())
    }

    /// Start `proxy-podserver` in every pod on `port`, answering with the pod's name.
    pub fn start_servers(&mut self, server_bin: &str, port: u16) -> Result<()> {
        let mut started = Vec::new();
        for pod in self.nodes.iter().flat_map(|n| &n.pods) {
            started.push(pod.ns.spawn(server_bin, &["--name", &pod.name, "--port", &port.to_string()])?);
        }
        self.children.extend(started);
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.nodes.iter().flat_map(|n| &n.pods).find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Keep a process to be killed when the cluster is dropped.
    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }
}

/// The overlay device of a [`Cluster::vxlan`] node, as flannel names it.
pub const VXLAN_DEV: &str = "flannel.1";

/// MAC of node `i`'s VXLAN device (fixed, so the other nodes' entries can name it).
fn vtep_mac(i: usize) -> String {
    format!("02:66:6c:00:00:{:02x}", i + 1)
}

/// Node `i`'s side of the flannel-like overlay (see [`Cluster::vxlan`]).
fn vxlan_overlay(ns: &Netns, i: usize, nodes: usize) -> Result<()> {
    let local = node_ip(i).to_string();
    let mac = vtep_mac(i);
    ns.ip(&[
        "link",
        "add",
        VXLAN_DEV,
        "address",
        &mac,
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &local,
        "dstport",
        "8472",
        "dev",
        "eth0",
        "nolearning",
    ])?;
    ns.ip(&["addr", "add", &format!("10.244.{}.0/32", i + 1), "dev", VXLAN_DEV])?;
    ns.ip(&["link", "set", VXLAN_DEV, "up"])?;
    for j in (0..nodes).filter(|j| *j != i) {
        let gw = format!("10.244.{}.0", j + 1);
        let peer_mac = vtep_mac(j);
        ns.ip(&["neigh", "add", &gw, "lladdr", &peer_mac, "dev", VXLAN_DEV, "nud", "permanent"])?;
        let out = Command::new("bridge")
            .args(["-n", &ns.name, "fdb", "append", &peer_mac, "dev", VXLAN_DEV, "dst", &node_ip(j).to_string()])
            .output()
            .context("running bridge")?;
        if !out.status.success() {
            bail!("bridge fdb append in {}: {}", ns.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        ns.ip(&["route", "add", &pod_cidr(j), "via", &gw, "dev", VXLAN_DEV, "onlink"])?;
    }
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
