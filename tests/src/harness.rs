//! Shared test helpers: a loaded dataplane pinned under a per-test bpffs directory (removed
//! on drop, even when the test fails), frame builders and independent checksum checks.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{Program, TestRun, TestRunOptions, TestRunResult};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use proxy_userspace::{
    dataplane::{
        loader::{self, LoaderConfig, Programs},
        maps::Maps,
        node::NodeMaps,
    },
    model::{BackendAddr, DesiredState, FrontendEntry, FrontendKey, FrontendKind, Protocol, Scope, ServicePortName},
    sync::Syncer,
};

/// Privileged tests need root (BPF, netns). Returns false, after saying why, otherwise.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("SKIP {test}: needs root (CAP_BPF, CAP_NET_ADMIN) to load programs");
    false
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
        let pins = PinDir::new();
        let (programs, maps) = loader::load(&LoaderConfig::new(&pins.0)).expect("load dataplane");
        let syncer = Syncer::new(maps).expect("read back maps");
        TestDataplane { programs, syncer, pins }
    }

    /// NODE_CONFIG and NEIGH_MISSES, opened from their pins (the same maps the programs use).
    pub fn node(&self) -> NodeMaps {
        NodeMaps::open_pinned(&self.pins.0).expect("node maps")
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

pub fn frontend(vip: Ipv4Addr, port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey { addr: vip.into(), port, proto, scope: Scope::Internal }
}

pub fn entry(name: &str, backends: &[(Ipv4Addr, u16)]) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName { namespace: "default".into(), name: name.into(), port_name: String::new() },
        kind: FrontendKind::ClusterIP,
        backends: backends
            .iter()
            .map(|(a, p)| BackendAddr { addr: (*a).into(), port: *p, local: true, terminating: false })
            .collect(),
        affinity_timeout: None,
        local_only: false,
        source_ranges: vec![],
    }
}

pub fn state(entries: Vec<(FrontendKey, FrontendEntry)>) -> DesiredState {
    DesiredState { frontends: entries.into_iter().collect(), ..DesiredState::default() }
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
    let mut b =
        PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src.0.octets(), dst.0.octets(), 64).tcp(src.1, dst.1, 1000, 65535);
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
        b = b.ack(1);
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
