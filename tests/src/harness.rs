//! Shared test helpers: a loaded dataplane pinned under a per-test bpffs directory (removed
//! on drop, even when the test fails), frame builders and independent checksum checks.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use proxy_userspace::{
    dataplane::{
        loader::{self, LoaderConfig, Programs},
        maps::Maps,
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

    pub fn maps(&self) -> &Maps {
        self.syncer.store()
    }

    /// Run `prog` once on `frame`; returns (verdict, output frame).
    pub fn run(&mut self, prog: &'static str, frame: &[u8]) -> (i32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let p = self.programs.classifier(prog).expect("program");
        let mut opts = TestRunOptions::default();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value as i32, out)
    }

    /// Run `prog` `repeat` times in the kernel; returns the mean ns per run.
    pub fn time(&mut self, prog: &'static str, frame: &[u8], repeat: u32) -> f64 {
        let mut out = vec![0u8; frame.len() + 256];
        let p = self.programs.classifier(prog).expect("program");
        let mut opts = TestRunOptions::default();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
        // The kernel reports the mean duration per repetition.
        r.duration.as_nanos() as f64
    }
}

pub fn frontend(vip: Ipv4Addr, port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey { addr: vip, port, proto, scope: Scope::Internal }
}

pub fn entry(name: &str, backends: &[(Ipv4Addr, u16)]) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName { namespace: "default".into(), name: name.into(), port_name: String::new() },
        kind: FrontendKind::ClusterIP,
        backends: backends
            .iter()
            .map(|(a, p)| BackendAddr { addr: *a, port: *p, local: true, terminating: false })
            .collect(),
        affinity_timeout: None,
        local_only: false,
        source_ranges: vec![],
    }
}

pub fn state(entries: Vec<(FrontendKey, FrontendEntry)>) -> DesiredState {
    DesiredState { frontends: entries.into_iter().collect() }
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
            let ok = h.checksum == 0
                || h.calc_checksum_ipv4(&iph, u.payload()).expect("udp csum") == h.checksum;
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
