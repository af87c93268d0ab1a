//! Shared test helpers: a loaded dataplane pinned under a per-test bpffs directory (removed
//! on drop, even when the test fails), frame builders and independent checksum checks.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{Program, TestRun, TestRunOptions, TestRunResult};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use proxy_userspace::{
    dataplane::{
        maps::Maps,
        maps::loader::{self, LoaderConfig, Programs},
        maps::node::NodeMaps,
    },
    model::{BackendAddr, DesiredState, FrontendEntry, FrontendKey, FrontendKind, Protocol, Scope, ServicePortName},
    sync::Syncer,
};

/// Privileged tests need root (BPF, netns); they are `#[ignore]`d for that reason and run
/// by `cargo xtask test` as root. Run anyway without root, they fail here, saying why.
pub fn require_root(test: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{test} needs root (CAP_BPF, CAP_NET_ADMIN, network namespaces): it is #[ignore]d for that reason; `cargo xtask test` runs it as root"
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique name for this process and call, for pins and namespaces.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// A bpffs directory removed (recursively) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new() -> Self {
        PinDir(Path::new("/sys/fs/bpf").join(unique("ebpf-proxy-test-")))
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct TestDataplane {
    pub programs: Programs,
    pub syncer: Syncer<Maps>,
    pub pins: PinDir,
}

impl TestDataplane {
    pub fn load() -> Self {
        let mut dp = Self::load_unfiltered();
        // As the agent after its first sync: every frontend written from here on has its bit,
        // so every datapath test runs with the fast exit in force.
        dp.syncer.store_mut().put_filter_in_force().expect("frontend filter in force");
        dp
    }

    /// The datapath with the frontend filter out of force, as before the agent's first
    /// sync: every packet takes the full path. For tests that write the service maps by
    /// hand (the datapath on its own, whatever the sync would write), whose entries have no
    /// filter bits.
    pub fn load_unfiltered() -> Self {
        let pins = PinDir::new();
        let (programs, maps) = loader::load(&LoaderConfig::new(&pins.0)).expect("load dataplane");
        let syncer = Syncer::new(maps).expect("read back maps");
        TestDataplane { programs, syncer, pins }
    }

    /// Restart as the agent does on the same pins: a fresh object whose programs replace
    /// these, the maps read back (`MapStore::adopt`: the frontend filter out of force and
    /// its bits set from what the maps hold), then the filter in force again.
    pub fn restart(&mut self) {
        let (programs, maps) = loader::load(&LoaderConfig::new(&self.pins.0)).expect("reload dataplane");
        let mut syncer = Syncer::new(maps).expect("read back maps");
        syncer.store_mut().put_filter_in_force().expect("frontend filter in force");
        self.programs = programs;
        self.syncer = syncer;
    }

    /// NODE_CONFIG and NEIGH_MISSES, opened from their pins (the same maps the programs use).
    pub fn node(&self) -> NodeMaps {
        NodeMaps::open_pinned(&self.pins.0).expect("node maps")
    }

    /// Packets counted node-wide under verdict `v` (GLOBAL_STATS), every family together.
    pub fn global(&self, v: u32) -> u64 {
        proxy_userspace::dataplane::maps::global_total(&self.maps().global_stats, v).expect("GLOBAL_STATS").packets
    }

    /// Packets counted node-wide under verdict `v` in `family`'s block only.
    pub fn global_in(&self, family: proxy_common::StatsFamily, v: u32) -> u64 {
        proxy_userspace::dataplane::maps::global_counters(&self.maps().global_stats, family, v)
            .expect("GLOBAL_STATS")
            .packets
    }

    pub fn maps(&self) -> &Maps {
        self.syncer.store()
    }

    /// BPF_PROG_TEST_RUN on a TC or XDP program of the object, in the calling thread's
    /// network namespace (which is where XDP's `bpf_fib_lookup` looks routes up).
    fn test_run(&mut self, prog: &'static str, opts: TestRunOptions<'_>) -> TestRunResult {
        let len = opts.data_in.map(|d| d.len());
        let r = match self.programs.ebpf.program_mut(prog).unwrap_or_else(|| panic!("no program {prog}")) {
            Program::SchedClassifier(p) => p.test_run(opts),
            Program::Xdp(p) => p.test_run(opts),
            _ => panic!("{prog}: not a TC or XDP program"),
        };
        r.unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN {prog} on a {len:?}-byte frame: {e:?}"))
    }

    /// Run `prog` (TC or XDP) once on `frame`; returns (verdict, output frame). For XDP the
    /// verdict is the `xdp_action` (XDP_DROP 1, XDP_PASS 2, XDP_TX 3, XDP_REDIRECT 4).
    pub fn run(&mut self, prog: &'static str, frame: &[u8]) -> (i32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
        let r = self.test_run(prog, opts);
        out.truncate(r.data_size_out as usize);
        (r.return_value as i32, out)
    }

    /// Run a TC program on `frame` as if it had entered the node on interface
    /// `ingress_ifindex` (`__sk_buff.ingress_ifindex`; any number: it need not exist), as a
    /// packet from a pod's veth (`from_pod`) or a reply routed in from elsewhere (`to_pod`)
    /// does.
    pub fn run_tc_from(&mut self, prog: &'static str, frame: &[u8], ingress_ifindex: u32) -> (i32, Vec<u8>) {
        // struct __sk_buff up to `ifindex`: len, pkt_type, mark, queue_mapping, protocol,
        // vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex, ifindex; the kernel
        // accepts only mark, priority, ingress_ifindex and ifindex (0: loopback) set.
        const INGRESS_IFINDEX: usize = 9;
        let mut skb = [0u32; 11];
        skb[INGRESS_IFINDEX] = ingress_ifindex;
        let ctx: Vec<u8> = skb.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let opts =
            TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(&ctx), ..Default::default() };
        let r = self.test_run(prog, opts);
        out.truncate(r.data_size_out as usize);
        (r.return_value as i32, out)
    }

    /// Run an XDP program as if `frame` arrived on interface `ingress_ifindex` (which must
    /// exist in the calling thread's namespace).
    pub fn run_xdp_on(&mut self, prog: &'static str, frame: &[u8], ingress_ifindex: u32) -> (i32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex }: as offsets into data_in, data = 0 (no metadata) and data_end =
        // its length.
        let mut md = [0u32; 6];
        md[1] = frame.len() as u32;
        md[3] = ingress_ifindex;
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let opts =
            TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(&ctx), ..Default::default() };
        let r = self.test_run(prog, opts);
        out.truncate(r.data_size_out as usize);
        (r.return_value as i32, out)
    }

    /// Run a TC program as if `frame` went through interface `ifindex` (which must exist in
    /// the calling thread's namespace) having arrived on `ingress_ifindex` (0: none).
    pub fn run_tc_on(
        &mut self,
        prog: &'static str,
        frame: &[u8],
        ifindex: u32,
        ingress_ifindex: u32,
    ) -> (i32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        // struct __sk_buff up to `ifindex`: len, pkt_type, mark, queue_mapping, protocol,
        // vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex (word 9), ifindex
        // (word 10). The kernel takes a prefix of the struct and refuses fields other than
        // these two (and a few more) set.
        let mut skb = [0u32; 11];
        skb[9] = ingress_ifindex;
        skb[10] = ifindex;
        let ctx: Vec<u8> = skb.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let opts =
            TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(&ctx), ..Default::default() };
        let r = self.test_run(prog, opts);
        out.truncate(r.data_size_out as usize);
        (r.return_value as i32, out)
    }

    /// Mean in-kernel run time (ns) of `n` separate single runs, each on a fresh copy of
    /// `frame` (optionally as if received on `ingress_ifindex`). Unlike [`Self::time`], every
    /// run sees the original frame: with `repeat` the kernel reruns the program on the
    /// buffer the previous run already rewrote, so a translating path is measured once and
    /// the already-translated frame the rest of the time.
    pub fn time_fresh(&mut self, prog: &'static str, frame: &[u8], n: u32, ingress_ifindex: Option<u32>) -> f64 {
        let mut total = 0u128;
        let mut md = [0u32; 6];
        md[1] = frame.len() as u32;
        md[3] = ingress_ifindex.unwrap_or(0);
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        for _ in 0..n {
            let mut out = vec![0u8; frame.len() + 256];
            let opts = TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ingress_ifindex.map(|_| ctx.as_slice()),
                ..Default::default()
            };
            total += self.test_run(prog, opts).duration.as_nanos();
        }
        total as f64 / f64::from(n.max(1))
    }

    /// Run `prog` `repeat` times in the kernel; returns the mean ns per run.
    pub fn time(&mut self, prog: &'static str, frame: &[u8], repeat: u32) -> f64 {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() };
        let r = self.test_run(prog, opts);
        // The kernel reports the mean duration per repetition.
        r.duration.as_nanos() as f64
    }
}

/// A frontend in the external scope (NodePort, ExternalIP, LoadBalancer: what XDP serves).
pub fn ext(addr: Ipv4Addr, port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey { addr: addr.into(), port, proto, scope: Scope::External }
}

/// An external frontend of `kind` with `backends` (address, port, on this node).
pub fn ext_entry(kind: FrontendKind, backends: &[(Ipv4Addr, u16, bool)]) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName::new("default", "np", ""),
        kind,
        backends: backends
            .iter()
            .map(|(a, p, local)| BackendAddr { addr: (*a).into(), port: *p, local: *local, terminating: false })
            .collect(),
        affinity_timeout: None,
        local_only: false,
        source_ranges: vec![],
        lb_algorithm: None,
        weights: vec![],
    }
}

/// The conntrack key builder, for either family (one version, in `family`).
pub use crate::family::ct_key;

pub fn frontend(vip: Ipv4Addr, port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey { addr: vip.into(), port, proto, scope: Scope::Internal }
}

pub fn entry(name: &str, backends: &[(Ipv4Addr, u16)]) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName::new("default", name, ""),
        kind: FrontendKind::ClusterIP,
        backends: backends
            .iter()
            .map(|(a, p)| BackendAddr { addr: (*a).into(), port: *p, local: true, terminating: false })
            .collect(),
        affinity_timeout: None,
        local_only: false,
        source_ranges: vec![],
        lb_algorithm: None,
        weights: vec![],
    }
}

pub fn state(entries: Vec<(FrontendKey, FrontendEntry)>) -> DesiredState {
    entries.into_iter().collect()
}

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

pub fn tcp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 65535)
        .syn();
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build frame");
    v
}

/// TCP flag bits for [`tcp_segment`].
pub mod tcp {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// A TCP segment with exactly the flags `flags` (bits of [`tcp`]) and valid checksums.
pub fn tcp_segment(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    tcp_any((src.0.into(), src.1), (dst.0.into(), dst.1), flags, payload)
}

/// An Ethernet + IPv4/IPv6 (TTL / hop limit 64) + TCP segment with exactly the flags
/// `flags` (bits of [`tcp`]), sequence number 1000 (acknowledgement 1 with ACK) and valid
/// checksums. Both addresses must be of one family.
pub fn tcp_any(src: (IpAddr, u16), dst: (IpAddr, u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    tcp_seq(src, dst, flags, 1000, 1, payload)
}

/// [`tcp_any`] with the sequence number `seq` and, when `flags` has ACK, the
/// acknowledgement number `ack`: segments of a real handshake and of a spoofer who does
/// (or does not) know the window.
pub fn tcp_seq(src: (IpAddr, u16), dst: (IpAddr, u16), flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let ip = match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("tcp_any: {src:?} and {dst:?} are of different families"),
    };
    let mut b = ip.tcp(src.1, dst.1, seq, 65535);
    if flags & tcp::SYN != 0 {
        b = b.syn();
    }
    if flags & tcp::FIN != 0 {
        b = b.fin();
    }
    if flags & tcp::RST != 0 {
        b = b.rst();
    }
    if flags & tcp::ACK != 0 {
        b = b.ack(ack);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build frame");
    v
}

pub fn udp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src.0.octets(), dst.0.octets(), 64).udp(src.1, dst.1);
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build frame");
    v
}

/// What a frame says, with its checksums recomputed independently of the datapath.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub ip_csum_ok: bool,
    pub l4_csum_ok: bool,
    pub payload: Vec<u8>,
}

pub fn decode(frame: &[u8]) -> Decoded {
    let p = SlicedPacket::from_ethernet(frame).expect("parse frame");
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!("not IPv4") };
    let iph = ip.header().to_header();
    let ip_csum_ok = iph.calc_header_checksum() == iph.header_checksum;
    let (sport, dport, l4_csum_ok, payload) = match p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h = t.to_header();
            let ok = h.calc_checksum_ipv4(&iph, t.payload()).expect("tcp csum") == h.checksum;
            (h.source_port, h.destination_port, ok, t.payload().to_vec())
        }
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            let ok = h.checksum == 0 || h.calc_checksum_ipv4(&iph, u.payload()).expect("udp csum") == h.checksum;
            (h.source_port, h.destination_port, ok, u.payload().to_vec())
        }
        other => panic!("unexpected transport {other:?}"),
    };
    Decoded {
        src: (Ipv4Addr::from(iph.source), sport),
        dst: (Ipv4Addr::from(iph.destination), dport),
        ip_csum_ok,
        l4_csum_ok,
        payload,
    }
}

/// A child cgroup of the machine's cgroup v2 hierarchy for one test
/// (`<cgroup2 mount>/ebpf-proxy-test-<pid>-<n>`), removed on drop even when the test fails:
/// the processes still in it (only the test's own clients are ever moved there) are killed
/// by PID, then the directory is removed, which also detaches whatever is attached to it.
/// Socket-level programs are attached here, never to the machine's own root.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> anyhow::Result<Self> {
        let mount = proxy_userspace::dataplane::sock::detect_cgroup_root()?;
        let path = mount.join(unique("ebpf-proxy-test-"));
        std::fs::create_dir(&path)?;
        Ok(TestCgroup { path })
    }

    /// Move the calling process itself into the cgroup until the guard drops (then back to
    /// the cgroup it came from): for benchmarks whose client loop runs on a thread of their
    /// own process. Sockets created meanwhile belong to this cgroup for their lifetime.
    pub fn join_self(&self) -> anyhow::Result<Joined> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| anyhow::anyhow!("no cgroup v2 entry in /proc/self/cgroup"))?;
        let mount = proxy_userspace::dataplane::sock::detect_cgroup_root()?;
        let back = mount.join(rel.trim_start_matches('/'));
        std::fs::write(self.path.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(Joined { back })
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// The process's membership of a [`TestCgroup`]; moves it back on drop.
pub struct Joined {
    back: PathBuf,
}

impl Drop for Joined {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(self.back.join("cgroup.procs"), std::process::id().to_string()) {
            eprintln!("warning: could not move back to {}: {e}", self.back.display());
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let me = std::process::id() as i32;
        // Bounded: at most 50 tries, 20 ms apart.
        for _ in 0..50 {
            // Never ourselves (a `Joined` guard not dropped yet): only our clients.
            for pid in self.pids().into_iter().filter(|p| *p != me) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("warning: could not remove test cgroup {}", self.path.display());
    }
}

// IPv6 frames and their independent decoding (issue 10). Addresses as the maps store them:
// the 16 bytes as on the wire, read as four native-endian words.

/// An IPv6 address as the maps store it (`Ipv6Words`).
pub fn ip6_to_map(a: std::net::Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]))
}

pub fn ip6_from_map(w: [u32; 4]) -> std::net::Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    std::net::Ipv6Addr::from(o)
}

/// An Ethernet + IPv6 + TCP segment (see [`tcp_any`]).
pub fn tcp6_segment(
    src: (std::net::Ipv6Addr, u16),
    dst: (std::net::Ipv6Addr, u16),
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    tcp_any((src.0.into(), src.1), (dst.0.into(), dst.1), flags, payload)
}

/// A TCP SYN over IPv6 (see [`tcp6_segment`]).
pub fn tcp6_frame(src: (std::net::Ipv6Addr, u16), dst: (std::net::Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    tcp6_segment(src, dst, tcp::SYN, payload)
}

pub fn udp6_frame(src: (std::net::Ipv6Addr, u16), dst: (std::net::Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(src.0.octets(), dst.0.octets(), 64).udp(src.1, dst.1);
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build frame");
    v
}

/// What an IPv6 frame says, with its L4 checksum recomputed independently of the datapath
/// (TCP/UDP over the IPv6 pseudo-header; extension headers are skipped by etherparse).
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded6 {
    pub src: (std::net::Ipv6Addr, u16),
    pub dst: (std::net::Ipv6Addr, u16),
    pub hop_limit: u8,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    pub l4_csum_ok: bool,
    pub payload: Vec<u8>,
}

pub fn decode6(frame: &[u8]) -> Decoded6 {
    let p = SlicedPacket::from_ethernet(frame).expect("parse frame");
    let Some(etherparse::NetSlice::Ipv6(ip)) = p.net else { panic!("not IPv6: {frame:02x?}") };
    let h = ip.header();
    let (s, d) = (h.source(), h.destination());
    let (sport, dport, tcp_flags, l4_csum_ok, payload) = match p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let th = t.to_header();
            let ok = th.calc_checksum_ipv6_raw(s, d, t.payload()).expect("tcp csum") == th.checksum;
            let flags = u8::from(th.fin)
                | u8::from(th.syn) << 1
                | u8::from(th.rst) << 2
                | u8::from(th.psh) << 3
                | u8::from(th.ack) << 4
                | u8::from(th.urg) << 5;
            (th.source_port, th.destination_port, flags, ok, t.payload().to_vec())
        }
        Some(TransportSlice::Udp(u)) => {
            let uh = u.to_header();
            // A zero UDP checksum is not allowed over IPv6 (RFC 8200 8.1): not "ok".
            let ok = uh.calc_checksum_ipv6_raw(s, d, u.payload()).expect("udp csum") == uh.checksum;
            (uh.source_port, uh.destination_port, 0, ok, u.payload().to_vec())
        }
        other => panic!("unexpected transport {other:?}"),
    };
    Decoded6 {
        src: (h.source_addr(), sport),
        dst: (h.destination_addr(), dport),
        hop_limit: h.hop_limit(),
        tcp_flags,
        l4_csum_ok,
        payload,
    }
}

/// A map entry as raw bytes: (key, value).
pub type RawEntry = (Vec<u8>, Vec<u8>);

/// Every entry of every map pinned in `dir` (`<root>/maps`), as raw bytes: for asserting
/// that something left the maps exactly as they were. Per-CPU values include every CPU's
/// copy.
pub fn dump_pinned_maps(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<RawEntry>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // Map types whose values are per CPU: percpu hash, percpu array, LRU percpu hash.
    const PER_CPU: [u32; 3] = [5, 6, 10];
    fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> i64 {
        // SAFETY: `attr` is a 128-byte bpf_attr laid out for `cmd` by the caller.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) }
    }
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    let cpus = possible.trim().rsplit(['-', ',']).next().and_then(|n| n.parse::<usize>().ok()).expect("cpu count") + 1;
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("pinned maps") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let mut a = [0u8; 128];
        a[..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
        let fd = bpf(BPF_OBJ_GET, &mut a);
        assert!(fd >= 0, "BPF_OBJ_GET {name}: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd the kernel just returned.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = [0u8; 96];
        let mut a = [0u8; 128];
        a[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
        a[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
        a[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        assert_eq!(bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a), 0, "map info {name}");
        let word = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
        let (map_type, key_size, value_size) = (word(0), word(8) as usize, word(12) as usize);
        let value_len = if PER_CPU.contains(&map_type) { value_size.div_ceil(8) * 8 * cpus } else { value_size };
        let mut entries = Vec::new();
        let mut key: Option<Vec<u8>> = None;
        loop {
            let mut next = vec![0u8; key_size];
            let mut a = [0u8; 128];
            a[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
            let cur = key.as_ref().map_or(0, |k| k.as_ptr() as u64);
            a[8..16].copy_from_slice(&cur.to_ne_bytes());
            a[16..24].copy_from_slice(&(next.as_mut_ptr() as u64).to_ne_bytes());
            if bpf(BPF_MAP_GET_NEXT_KEY, &mut a) != 0 {
                break;
            }
            let mut value = vec![0u8; value_len];
            let mut a = [0u8; 128];
            a[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
            a[8..16].copy_from_slice(&(next.as_ptr() as u64).to_ne_bytes());
            a[16..24].copy_from_slice(&(value.as_mut_ptr() as u64).to_ne_bytes());
            if bpf(BPF_MAP_LOOKUP_ELEM, &mut a) == 0 {
                entries.push((next.clone(), value));
            }
            key = Some(next);
        }
        entries.sort();
        out.insert(name, entries);
    }
    out
}

// ICMP errors (datapath_icmp, datapath_xdp).

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;

/// RFC 1071 over `data`: 0 when `data` includes a correct checksum.
pub fn inet_csum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + ICMP error frame from `src` to `dst` quoting `quote` (an IP packet).
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, (typ, code): (u8, u8), rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let mut icmp = vec![typ, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quote);
    let c = inet_csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip =
        etherparse::Ipv4Header::new(icmp.len() as u16, 64, etherparse::IpNumber::ICMP, src.octets(), dst.octets())
            .expect("header");
    ip.header_checksum = ip.calc_header_checksum();
    let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    ip.write(&mut frame).expect("write header");
    frame.extend_from_slice(&icmp);
    frame
}

/// What came out: the outer addresses, and the quote's addresses and ports, after checking
/// the outer header checksum, the ICMP checksum, the quoted IPv4 header checksum and (when
/// the quote holds the whole segment) the quoted TCP/UDP checksum.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub outer: (Ipv4Addr, Ipv4Addr),
    pub inner_src: (Ipv4Addr, u16),
    pub inner_dst: (Ipv4Addr, u16),
}

pub fn check_icmp_error(frame: &[u8], whole_quote: bool) -> Seen {
    let outer = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..]).expect("outer header").to_header();
    assert_eq!(outer.calc_header_checksum(), outer.header_checksum, "outer IPv4 checksum");
    let icmp = &frame[14 + 20..];
    assert_eq!(inet_csum(icmp), 0, "ICMP checksum");
    let quote = &icmp[8..];
    let inner = etherparse::Ipv4HeaderSlice::from_slice(quote).expect("quoted header").to_header();
    assert_eq!(inner.calc_header_checksum(), inner.header_checksum, "quoted IPv4 checksum");
    let l4 = &quote[20..];
    let ports = (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]));
    if whole_quote {
        if inner.protocol == etherparse::IpNumber::TCP {
            let t = etherparse::TcpHeaderSlice::from_slice(l4).expect("quoted TCP").to_header();
            let payload = &l4[t.header_len()..];
            assert_eq!(t.calc_checksum_ipv4(&inner, payload).unwrap(), t.checksum, "quoted TCP checksum");
        } else {
            let u = etherparse::UdpHeaderSlice::from_slice(l4).expect("quoted UDP").to_header();
            assert_eq!(u.calc_checksum_ipv4(&inner, &l4[8..]).unwrap(), u.checksum, "quoted UDP checksum");
        }
    }
    Seen {
        outer: (Ipv4Addr::from(outer.source), Ipv4Addr::from(outer.destination)),
        inner_src: (Ipv4Addr::from(inner.source), ports.0),
        inner_dst: (Ipv4Addr::from(inner.destination), ports.1),
    }
}

/// A namespace standing in for the node's network in the XDP forwarding tests: the uplink
/// veth `up0` (with MAC `uplink_mac`, up) whose peer `up0p` stays in the namespace. The
/// test adds its family's addresses, routes and neighbours.
pub struct UplinkNs {
    pub ns: crate::netns::Netns,
}

impl UplinkNs {
    pub fn new(prefix: &str, uplink_mac: [u8; 6]) -> Self {
        let ns = crate::netns::Netns::new(prefix).expect("netns");
        ns.ip(&["link", "add", "up0", "address", &mac_str(uplink_mac), "type", "veth", "peer", "name", "up0p"])
            .unwrap();
        ns.ip(&["link", "set", "up0", "up"]).unwrap();
        ns.ip(&["link", "set", "up0p", "up"]).unwrap();
        UplinkNs { ns }
    }

    pub fn uplink_ifindex(&self) -> u32 {
        self.ns.run(|| {
            let c = std::ffi::CString::new("up0").unwrap();
            // SAFETY: NUL-terminated name.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        })
    }
}

/// `aa:bb:cc:dd:ee:ff`, as `ip` takes a MAC address.
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
