//! `ebpf-proxy trace`: what the loaded datapath does with one packet, without touching it.
//!
//! The packet is built from the command line (IPv4 or IPv6, TCP or UDP) and run with
//! BPF_PROG_TEST_RUN through the program of the hook it names. Running the live programs
//! would leave traces: a new flow writes conntrack (and affinity) entries, every packet
//! bumps counters. So the trace runs on a private instance instead: the same object loaded
//! again into a private bpffs directory with maps of its own, seeded with copies of exactly
//! the live entries this packet can read — its frontend, that frontend's slots and backends
//! (both generations), its source ranges, the node facts, the client's affinity entry, and
//! the conntrack entries of its tuple in both directions (and their partners). The live
//! maps are only read; the private directory is removed when the trace ends, on every path.
//! What the private run cannot show: a SNAT port claim never collides (the live claims
//! are not copied), and XDP forwarding resolves next hops in the caller's network
//! namespace (run it inside the node's).
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
    programs::{Program, TestRun, TestRunOptions},
};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use proxy_common::{
    Backend, CT_DIR_FORWARD, CT_DIR_REPLY, CtKey, CtValue, Ipv6Words, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, ServiceKey, ServiceMeta, ServiceValue, SlotKey, Verdict, flow_hash, map_names as n, svc_flags,
};
use serde::Serialize;

use crate::{
    dataplane::{
        DataplaneError,
        maps::addr::{MapAddr, ip_to_map, ip6_to_map},
        maps::loader::{self, LoaderConfig},
        paths,
    },
    model::IpFamily,
};

/// Where the packet is seen: the program that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum At {
    /// Leaving a pod (`from_pod`, TC ingress of its host-side veth).
    Pod,
    /// Entering a pod (`to_pod`): replies reverse-NATed for the client.
    PodEgress,
    /// Arriving from outside on an uplink (`from_uplink`, XDP).
    Uplink,
    /// Leaving through an uplink (`to_uplink`): replies of local backends to outside clients.
    UplinkEgress,
}

impl At {
    fn program(self) -> &'static str {
        match self {
            At::Pod => "from_pod",
            At::PodEgress => "to_pod",
            At::Uplink => "from_uplink",
            At::UplinkEgress => "to_uplink",
        }
    }

    fn scope(self) -> u8 {
        if self == At::Uplink { SCOPE_EXTERNAL } else { SCOPE_INTERNAL }
    }

    fn is_xdp(self) -> bool {
        self == At::Uplink
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// The packet to trace.
#[derive(Clone, Debug)]
pub struct Request {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub proto: Proto,
    /// TCP: a SYN (a new connection) instead of an ACK segment of an open one.
    pub syn: bool,
    pub at: At,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--from {from} and --to {to} are of different address families")]
    MixedFamilies { from: SocketAddr, to: SocketAddr },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("map {map}: {source}")]
    Map {
        map: String,
        #[source]
        source: MapError,
    },
    #[error("BPF_PROG_TEST_RUN of {program}: {source}")]
    Run {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("creating the private instance under {path}: {source}")]
    Private {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn map_err(map: &str) -> impl FnOnce(MapError) -> TraceError + '_ {
    move |source| TraceError::Map { map: map.to_string(), source }
}

/// One side of a packet as it came out.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Wire {
    pub src: String,
    pub dst: String,
    pub protocol: String,
    /// TCP flags (e.g. "SYN", "RST|ACK"); empty for UDP.
    pub tcp_flags: String,
    /// Every checksum of the frame is valid (IPv4 header and TCP/UDP/ICMP through the
    /// pseudo-header), recomputed here.
    pub checksums_valid: bool,
}

#[derive(Debug, Serialize)]
pub struct Frontend {
    pub id: u32,
    pub service: String,
    pub address: String,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub program: &'static str,
    pub verdict: &'static str,
    /// The program's return value, named (e.g. `TC_ACT_UNSPEC (continue)`, `XDP_TX`).
    pub action: String,
    pub frontend: Option<Frontend>,
    /// The backend the flow is (or was) assigned to.
    pub backend: Option<String>,
    /// How a new flow's backend was chosen: `maglev` (with the table slot, the same on every
    /// node) or `random`; `None` when no backend was chosen (conntrack decided, or none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selection: Option<String>,
    /// The packet that went in and what came out (`None` when nothing came out).
    pub input: Wire,
    pub output: Option<Wire>,
    pub untouched: bool,
    /// Why, in a few words.
    pub explanation: String,
}

/// The bpffs directory of the private instance, removed on drop.
struct PrivateRoot(PathBuf);

impl Drop for PrivateRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Trace `req` through the datapath pinned under `live_root`.
pub fn trace(live_root: &Path, req: &Request) -> Result<Outcome, TraceError> {
    if req.from.is_ipv4() != req.to.is_ipv4() {
        return Err(TraceError::MixedFamilies { from: req.from, to: req.to });
    }
    // Every live map it seeds from, pinned with this binary's layout, before anything runs.
    crate::dataplane::maps::pins::check(live_root, |m| m.trace_seeds)?;
    let frame = build_frame(req);
    let private = PrivateRoot(private_dir(live_root));
    std::fs::create_dir_all(&private.0).map_err(|source| TraceError::Private { path: private.0.clone(), source })?;
    // Small maps: only a handful of entries are copied in. The Maglev array is indexed as
    // the live one (the copied value names its run there), so it is as long.
    let live_maglev = open(&paths::maps_dir(live_root), n::MAGLEV)
        .ok()
        .and_then(|m| Array::<MapData, u32>::try_from(m).ok())
        .map_or(64, |a| a.len());
    let cfg = LoaderConfig {
        max_services: 64,
        max_backends: 4096,
        max_conntrack: 1024,
        max_maglev_slots: live_maglev,
        ..LoaderConfig::new(&private.0)
    };
    let (mut programs, _maps) = loader::load(&cfg)?;
    let seeds = Seeds { live: paths::maps_dir(live_root), private: paths::maps_dir(&private.0) };
    let svc = seeds.copy_for(req)?;

    let program = req.at.program();
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() };
    let r = match programs.ebpf.program_mut(program) {
        Some(Program::SchedClassifier(p)) => p.test_run(opts),
        Some(Program::Xdp(p)) => p.test_run(opts),
        _ => return Err(TraceError::Dataplane(DataplaneError::MissingObject(program))),
    }
    .map_err(|source| TraceError::Run { program, source })?;
    out.truncate(r.data_size_out as usize);
    let ret = r.return_value as i32;

    let verdict = seeds.verdict()?;
    let output = (!(req.at.is_xdp() && ret == XDP_DROP || !req.at.is_xdp() && ret == TC_ACT_SHOT))
        .then(|| decode(&out))
        .flatten();
    let backend = seeds.backend(req)?.or_else(|| {
        // A new flow's backend is where its destination went.
        matches!(verdict, Verdict::NewFlow | Verdict::Established).then(|| output.as_ref().map(|o| o.dst.clone()))?
    });
    let selection = match verdict {
        Verdict::NewFlow => seeds.selection(req)?,
        _ => None,
    };
    let frontend = svc.map(|(id, address)| Frontend { id, service: seeds.service_name(id), address });
    let untouched = out == frame;
    Ok(Outcome {
        program,
        verdict: verdict.name(),
        action: action_name(req.at.is_xdp(), ret),
        frontend,
        backend,
        selection,
        input: decode(&frame).expect("the frame we built decodes"),
        output,
        untouched,
        explanation: explain(verdict, untouched),
    })
}

/// The Maglev table slot the datapath reads for `req`'s flow on frontend `svc`, if it is a
/// Maglev frontend: `proxy_common::flow_hash` of the 5-tuple as the packet carries it.
fn maglev_slot(svc: &ServiceValue, req: &Request) -> Option<u32> {
    if svc.flags & svc_flags::MAGLEV == 0 || svc.maglev_size == 0 {
        return None;
    }
    let proto = match req.proto {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    };
    let (sport, dport) = (req.from.port().to_be(), req.to.port().to_be());
    let hash = match (req.from.ip(), req.to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => flow_hash::v4(ip_to_map(s), ip_to_map(d), sport, dport, proto),
        (IpAddr::V6(s), IpAddr::V6(d)) => flow_hash::v6(ip6_to_map(s), ip6_to_map(d), sport, dport, proto),
        _ => return None,
    };
    Some(hash % svc.maglev_size)
}

fn private_dir(live_root: &Path) -> PathBuf {
    // Beside the live root, on the same bpffs, never inside it (the agent owns that tree);
    // bpffs names may not contain dots.
    let name = format!("ebpf-proxy-trace-{}", std::process::id());
    live_root.parent().unwrap_or(Path::new("/sys/fs/bpf")).join(name)
}

const TC_ACT_SHOT: i32 = 2;
const XDP_DROP: i32 = 1;

fn action_name(xdp: bool, ret: i32) -> String {
    let name = if xdp {
        match ret {
            0 => "XDP_ABORTED",
            1 => "XDP_DROP",
            2 => "XDP_PASS (to the stack)",
            3 => "XDP_TX (back out of the uplink)",
            4 => "XDP_REDIRECT (out of another interface)",
            _ => "?",
        }
    } else {
        match ret {
            -1 => "TC_ACT_UNSPEC (continue)",
            0 => "TC_ACT_OK",
            2 => "TC_ACT_SHOT (dropped)",
            7 => "TC_ACT_REDIRECT (back into the pod)",
            _ => "?",
        }
    };
    format!("{name} [{ret}]")
}

fn explain(v: Verdict, untouched: bool) -> String {
    let s = match v {
        Verdict::NewFlow => "a new flow to a frontend: backend chosen, destination translated, conntrack created",
        Verdict::Established => "a packet of a tracked flow: translated like its first packet",
        Verdict::ReverseNat => "a reply of a tracked flow: translated back to the frontend",
        Verdict::NoBackend => "the frontend has no (ready, local where required) endpoints: refused",
        Verdict::Pass => "not service traffic (no frontend, no tracked flow): passed untouched",
        Verdict::NotIp => "not an IPv4/IPv6 frame",
        Verdict::Malformed => "malformed: passed untouched for the kernel to judge",
        Verdict::Fragment => {
            "a later fragment of a datagram not translated here, or a fragment without ports: passed untouched"
        }
        Verdict::SourceRangeDrop => "the source is outside the frontend's loadBalancerSourceRanges: dropped",
        Verdict::Error => "a map write or rewrite failed",
        Verdict::OtherL4 => "another L4 protocol: passed untouched",
        Verdict::NoRoute => "XDP could not forward (no route, TTL, or the next hop's neighbour is unresolved)",
        Verdict::CtFull => "the conntrack table is full of live flows: new flow dropped",
        Verdict::IcmpError => "an ICMP error about a tracked flow: translated with it",
        // Counted by the cgroup hooks, never by a packet program.
        Verdict::SockTranslate => "a connect()/sendmsg() given a backend by the socket-level hooks",
        Verdict::CtInvalid => {
            "conntrack refused it (a tracked flow's packet from the wrong interface, or a RST/FIN out of the window): dropped"
        }
        Verdict::CtClash => "the new flow's reply tuple belongs to another live flow: dropped",
        Verdict::SctpPortNat => {
            "an SCTP flow whose ports would be rewritten (its CRC32c covers them, and is not updated): dropped"
        }
        Verdict::DsrTooBig => {
            "direct server return: too big for the uplink with the DSR option, answered with ICMP fragmentation needed / ICMPv6 Packet Too Big (the MTU less the option)"
        }
        Verdict::Dsr => {
            "direct server return: the frontend in the packet's DSR option gave the flow its entry here, so the local backend's replies leave from it"
        }
        Verdict::UnallocatedServiceIp => {
            "the destination is inside a Service CIDR but no frontend holds it (an unallocated ClusterIP): refused"
        }
        Verdict::ClusterIpUnknownPort => "a ClusterIP on a port or protocol its Service does not serve: refused",
    };
    if untouched
        && !matches!(v, Verdict::Pass | Verdict::NotIp | Verdict::Malformed | Verdict::Fragment | Verdict::OtherL4)
    {
        format!("{s} (bytes unchanged)")
    } else {
        s.to_string()
    }
}

fn build_frame(req: &Request) -> Vec<u8> {
    const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
    let eth = PacketBuilder::ethernet2(SRC_MAC, DST_MAC);
    let ip = match (req.from.ip(), req.to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("families checked by the caller"),
    };
    let mut v = Vec::new();
    let payload = b"ebpf-proxy trace";
    let written = match req.proto {
        Proto::Tcp => {
            let t = ip.tcp(req.from.port(), req.to.port(), 1000, 65535);
            if req.syn { t.syn().write(&mut v, payload) } else { t.ack(1).write(&mut v, payload) }
        }
        Proto::Udp => ip.udp(req.from.port(), req.to.port()).write(&mut v, payload),
    };
    written.expect("writing into a Vec cannot fail");
    v
}

fn decode(frame: &[u8]) -> Option<Wire> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let (src, dst, ip_ok) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            (IpAddr::from(h.source), IpAddr::from(h.destination), h.calc_header_checksum() == h.header_checksum)
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header().to_header();
            (IpAddr::from(h.source), IpAddr::from(h.destination), true)
        }
        _ => return None,
    };
    let sock = |a: IpAddr, port: u16| SocketAddr::new(a, port).to_string();
    let (src, dst, protocol, tcp_flags, l4_ok) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h = t.to_header();
            let ok = match &p.net {
                Some(NetSlice::Ipv4(ip)) => h.calc_checksum_ipv4(&ip.header().to_header(), t.payload()).ok(),
                Some(NetSlice::Ipv6(ip)) => h.calc_checksum_ipv6(&ip.header().to_header(), t.payload()).ok(),
                _ => None,
            } == Some(h.checksum);
            let flags: Vec<&str> = [(h.syn, "SYN"), (h.rst, "RST"), (h.fin, "FIN"), (h.ack, "ACK")]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
            (sock(src, h.source_port), sock(dst, h.destination_port), "TCP", flags.join("|"), ok)
        }
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            let ok = h.checksum == 0
                || match &p.net {
                    Some(NetSlice::Ipv4(ip)) => h.calc_checksum_ipv4(&ip.header().to_header(), u.payload()).ok(),
                    Some(NetSlice::Ipv6(ip)) => h.calc_checksum_ipv6(&ip.header().to_header(), u.payload()).ok(),
                    _ => None,
                } == Some(h.checksum);
            (sock(src, h.source_port), sock(dst, h.destination_port), "UDP", String::new(), ok)
        }
        Some(TransportSlice::Icmpv4(_)) => (src.to_string(), dst.to_string(), "ICMP", String::new(), true),
        Some(TransportSlice::Icmpv6(_)) => (src.to_string(), dst.to_string(), "ICMPv6", String::new(), true),
        _ => (src.to_string(), dst.to_string(), "?", String::new(), true),
    };
    Some(Wire { src, dst, protocol: protocol.into(), tcp_flags, checksums_valid: ip_ok && l4_ok })
}

/// Copies from the live maps into the private instance's, and reads its results.
struct Seeds {
    live: PathBuf,
    private: PathBuf,
}

fn open(dir: &Path, name: &str) -> Result<Map, TraceError> {
    let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

fn hash<K: Pod, V: Pod>(dir: &Path, name: &str) -> Result<HashMap<MapData, K, V>, TraceError> {
    HashMap::try_from(open(dir, name)?).map_err(map_err(name))
}

impl Seeds {
    /// Copy what `req` can read; returns its frontend (id and address) if there is one.
    fn copy_for(&self, req: &Request) -> Result<Option<(u32, String)>, TraceError> {
        // Node facts: one entry each (index 0), copied whole.
        self.copy_array_entry::<proxy_common::NodeConfig>(n::NODE_CONFIG)?;
        self.copy_array_entry::<proxy_common::NodeConfig6>(n::NODE_CONFIG6)?;
        if req.to.is_ipv4() { self.copy_family::<u32>(req) } else { self.copy_family::<Ipv6Words>(req) }
    }

    fn copy_family<A: MapAddr>(&self, req: &Request) -> Result<Option<(u32, String)>, TraceError>
    where
        ServiceKey<A>: Pod,
        proxy_common::AffinityKey<A>: Pod,
        Backend<A>: Pod,
        CtKey<A>: Pod,
        CtValue<A>: Pod,
    {
        let proto = match req.proto {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        };
        let (saddr, daddr) =
            (A::from_ip(req.from.ip()).unwrap_or_default(), A::from_ip(req.to.ip()).unwrap_or_default());
        let (sport, dport) = (req.from.port().to_be(), req.to.port().to_be());

        // Conntrack: the tuple in both directions, and each entry's partner, each from the
        // table that holds it (assured or not) into the same private table: whether a flow
        // is assured changes what its next packet does.
        let names = [A::map_name(n::CONNTRACK), A::map_name(n::CT_NEW)];
        let live_ct: Vec<HashMap<MapData, CtKey<A>, CtValue<A>>> =
            names.iter().map(|name| hash(&self.live, name)).collect::<Result<_, _>>()?;
        let mut priv_ct: Vec<HashMap<MapData, CtKey<A>, CtValue<A>>> =
            names.iter().map(|name| hash(&self.private, name)).collect::<Result<_, _>>()?;
        let find = |key: &CtKey<A>| live_ct.iter().enumerate().find_map(|(i, m)| m.get(key, 0).ok().map(|v| (i, v)));
        let tuple =
            |dir| CtKey { src_addr: saddr, dst_addr: daddr, src_port: sport, dst_port: dport, proto, dir, _pad: 0 };
        let mut svc_ids = Vec::new();
        for key in [tuple(CT_DIR_FORWARD), tuple(CT_DIR_REPLY)] {
            if let Some((i, v)) = find(&key) {
                priv_ct[i].insert(key, v, 0).map_err(map_err(names[i]))?;
                svc_ids.push(v.svc_id);
                let partner =
                    if key.dir == CT_DIR_FORWARD { key.reply_of_forward(&v) } else { key.forward_of_reply(&v) };
                if let Some((j, pv)) = find(&partner) {
                    priv_ct[j].insert(partner, pv, 0).map_err(map_err(names[j]))?;
                }
            }
        }

        // The frontend this packet addresses in this hook's scope.
        let svc_name = A::map_name(n::SERVICES);
        let live_svcs: HashMap<MapData, ServiceKey<A>, ServiceValue> = hash(&self.live, svc_name)?;
        let mut priv_svcs: HashMap<MapData, ServiceKey<A>, ServiceValue> = hash(&self.private, svc_name)?;
        let key = ServiceKey { addr: daddr, port: dport, proto, scope: req.at.scope() };
        let frontend = match live_svcs.get(&key, 0) {
            Ok(v) => {
                priv_svcs.insert(key, v, 0).map_err(map_err(svc_name))?;
                self.copy_slots::<A>(&v)?;
                self.copy_maglev_slot::<A>(&v, req)?;
                self.copy_affinity::<A>(saddr, v.id)?;
                self.copy_source_ranges(A::FAMILY == IpFamily::V6, v.id)?;
                svc_ids.push(v.id);
                Some((v.id, format!("{} {}", SocketAddr::new(req.to.ip(), req.to.port()), scope_name(req.at.scope()))))
            }
            Err(_) => {
                self.copy_service_cidr::<A>(daddr)?;
                None
            }
        };
        // The tracked flows' backends, for the reply and established paths.
        for table in &priv_ct {
            self.copy_backends_of_ct::<A>(table)?;
        }
        Ok(frontend.or_else(|| svc_ids.first().map(|id| (*id, String::from("(of the tracked flow)")))))
    }

    /// No frontend: if the destination is inside a Service CIDR (unallocated, or a
    /// ClusterIP's unserved port), the private run must refuse it as the live datapath
    /// would. The longest match is copied as
    /// a host entry of the same value. Pins of an older agent have no such map: nothing to copy.
    fn copy_service_cidr<A: MapAddr>(&self, daddr: A) -> Result<(), TraceError> {
        let name = A::map_name(n::SERVICE_CIDRS);
        let Ok(map) = open(&self.live, name) else { return Ok(()) };
        let live: LpmTrie<MapData, A, u8> = LpmTrie::try_from(map).map_err(map_err(name))?;
        let bits = (size_of::<A>() * 8) as u32;
        let key = aya::maps::lpm_trie::Key::new(bits, daddr);
        if let Ok(v) = live.get(&key, 0) {
            let mut private: LpmTrie<MapData, A, u8> =
                LpmTrie::try_from(open(&self.private, name)?).map_err(map_err(name))?;
            private.insert(&key, v, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// A Maglev frontend's one table slot this flow reads, and the backend it names.
    fn copy_maglev_slot<A: MapAddr>(&self, svc: &ServiceValue, req: &Request) -> Result<(), TraceError>
    where
        Backend<A>: Pod,
    {
        let Some(slot) = maglev_slot(svc, req) else { return Ok(()) };
        if svc.maglev_base == 0 {
            return Ok(());
        }
        // The frontend's value, copied as it is, names the same run in the private array.
        let index = svc.maglev_base.wrapping_add(slot);
        let live: Array<MapData, u32> = Array::try_from(open(&self.live, n::MAGLEV)?).map_err(map_err(n::MAGLEV))?;
        let mut private: Array<MapData, u32> =
            Array::try_from(open(&self.private, n::MAGLEV)?).map_err(map_err(n::MAGLEV))?;
        let Ok(id) = live.get(&index, 0) else { return Ok(()) };
        private.set(index, id, 0).map_err(map_err(n::MAGLEV))?;
        let be_name = A::map_name(n::BACKENDS);
        let live_be: HashMap<MapData, u32, Backend<A>> = hash(&self.live, be_name)?;
        let mut priv_be: HashMap<MapData, u32, Backend<A>> = hash(&self.private, be_name)?;
        if let Ok(b) = live_be.get(&id, 0) {
            priv_be.insert(id, b, 0).map_err(map_err(be_name))?;
        }
        Ok(())
    }

    /// How the frontend `req` addresses chooses a new flow's backend (live maps).
    fn selection(&self, req: &Request) -> Result<Option<String>, TraceError> {
        let Some(svc) = self.live_service(req)? else { return Ok(None) };
        Ok(Some(match maglev_slot(&svc, req) {
            Some(slot) => format!("maglev: table slot {slot} of {} (every node picks the same)", svc.maglev_size),
            None => "random".to_string(),
        }))
    }

    fn live_service(&self, req: &Request) -> Result<Option<ServiceValue>, TraceError> {
        fn get<A: MapAddr>(dir: &Path, req: &Request) -> Result<Option<ServiceValue>, TraceError>
        where
            ServiceKey<A>: Pod,
        {
            let name = A::map_name(n::SERVICES);
            let svcs: HashMap<MapData, ServiceKey<A>, ServiceValue> = hash(dir, name)?;
            let proto = match req.proto {
                Proto::Tcp => PROTO_TCP,
                Proto::Udp => PROTO_UDP,
            };
            let key = ServiceKey {
                addr: A::from_ip(req.to.ip()).unwrap_or_default(),
                port: req.to.port().to_be(),
                proto,
                scope: req.at.scope(),
            };
            Ok(svcs.get(&key, 0).ok())
        }
        if req.to.is_ipv4() { get::<u32>(&self.live, req) } else { get::<Ipv6Words>(&self.live, req) }
    }

    fn copy_slots<A: MapAddr>(&self, svc: &ServiceValue) -> Result<(), TraceError>
    where
        Backend<A>: Pod,
    {
        let live_slots: HashMap<MapData, SlotKey, u32> = hash(&self.live, n::BACKEND_SLOTS)?;
        let mut priv_slots: HashMap<MapData, SlotKey, u32> = hash(&self.private, n::BACKEND_SLOTS)?;
        let be_name = A::map_name(n::BACKENDS);
        let live_be: HashMap<MapData, u32, Backend<A>> = hash(&self.live, be_name)?;
        let mut priv_be: HashMap<MapData, u32, Backend<A>> = hash(&self.private, be_name)?;
        for index in 0..svc.count.min(4096) {
            let k = SlotKey::new(svc.id, svc.generation, index);
            let Ok(id) = live_slots.get(&k, 0) else { continue };
            priv_slots.insert(k, id, 0).map_err(map_err(n::BACKEND_SLOTS))?;
            if let Ok(b) = live_be.get(&id, 0) {
                priv_be.insert(id, b, 0).map_err(map_err(be_name))?;
            }
        }
        Ok(())
    }

    fn copy_backends_of_ct<A: MapAddr>(
        &self,
        priv_ct: &HashMap<MapData, CtKey<A>, CtValue<A>>,
    ) -> Result<(), TraceError>
    where
        Backend<A>: Pod,
        CtKey<A>: Pod,
        CtValue<A>: Pod,
    {
        let be_name = A::map_name(n::BACKENDS);
        let live_be: HashMap<MapData, u32, Backend<A>> = hash(&self.live, be_name)?;
        let mut priv_be: HashMap<MapData, u32, Backend<A>> = hash(&self.private, be_name)?;
        for (_, v) in priv_ct.iter().filter_map(Result::ok) {
            if let Ok(b) = live_be.get(&v.backend_id, 0) {
                priv_be.insert(v.backend_id, b, 0).map_err(map_err(be_name))?;
            }
        }
        Ok(())
    }

    fn copy_affinity<A: MapAddr>(&self, client: A, svc_id: u32) -> Result<(), TraceError>
    where
        proxy_common::AffinityKey<A>: Pod,
    {
        let name = A::map_name(n::AFFINITY);
        let key = proxy_common::AffinityKey { client_addr: client, svc_id };
        let live: HashMap<MapData, proxy_common::AffinityKey<A>, proxy_common::AffinityValue> = hash(&self.live, name)?;
        let mut private: HashMap<MapData, proxy_common::AffinityKey<A>, proxy_common::AffinityValue> =
            hash(&self.private, name)?;
        if let Ok(v) = live.get(&key, 0) {
            private.insert(key, v, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    fn copy_source_ranges(&self, v6: bool, svc_id: u32) -> Result<(), TraceError> {
        if v6 {
            copy_ranges::<[u32; 5]>(&self.live, &self.private, n::SOURCE_RANGES6, svc_id)
        } else {
            copy_ranges::<[u32; 2]>(&self.live, &self.private, n::SOURCE_RANGES, svc_id)
        }
    }

    /// Index 0 of an array map, copied.
    fn copy_array_entry<V: Pod>(&self, name: &str) -> Result<(), TraceError> {
        let live: Array<MapData, V> = Array::try_from(open(&self.live, name)?).map_err(map_err(name))?;
        let mut private: Array<MapData, V> = Array::try_from(open(&self.private, name)?).map_err(map_err(name))?;
        let v = live.get(&0, 0).map_err(map_err(name))?;
        private.set(0, v, 0).map_err(map_err(name))
    }

    /// The verdict the private run counted (its counters start at zero), in whichever
    /// family's block the packet was counted.
    fn verdict(&self) -> Result<Verdict, TraceError> {
        let stats: PerCpuArray<MapData, proxy_common::Counters> =
            PerCpuArray::try_from(open(&self.private, n::GLOBAL_STATS)?).map_err(map_err(n::GLOBAL_STATS))?;
        for v in Verdict::ALL {
            let counted = crate::dataplane::maps::global_total(&stats, v as u32).map_or(0, |c| c.packets);
            if counted > 0 {
                return Ok(v);
            }
        }
        Ok(Verdict::Pass)
    }

    /// The backend of the flow the private run tracks for this tuple, if any.
    fn backend(&self, req: &Request) -> Result<Option<String>, TraceError> {
        if req.to.is_ipv4() { self.backend_of::<u32>(req) } else { self.backend_of::<Ipv6Words>(req) }
    }

    fn backend_of<A: MapAddr>(&self, req: &Request) -> Result<Option<String>, TraceError>
    where
        Backend<A>: Pod,
        CtKey<A>: Pod,
        CtValue<A>: Pod,
    {
        let proto = if req.proto == Proto::Tcp { PROTO_TCP } else { PROTO_UDP };
        let tables: Vec<HashMap<MapData, CtKey<A>, CtValue<A>>> = [n::CONNTRACK, n::CT_NEW]
            .into_iter()
            .map(|name| hash(&self.private, A::map_name(name)))
            .collect::<Result<_, _>>()?;
        let get = |k: &CtKey<A>| tables.iter().find_map(|t| t.get(k, 0).ok());
        let (s, d) = (A::from_ip(req.from.ip()).unwrap_or_default(), A::from_ip(req.to.ip()).unwrap_or_default());
        let (sp, dp) = (req.from.port().to_be(), req.to.port().to_be());
        let key = |dir, src, dst, sport, dport| CtKey {
            src_addr: src,
            dst_addr: dst,
            src_port: sport,
            dst_port: dport,
            proto,
            dir,
            _pad: 0,
        };
        let forward = get(&key(CT_DIR_FORWARD, s, d, sp, dp));
        let entry = forward.or_else(|| get(&key(CT_DIR_REPLY, s, d, sp, dp)));
        Ok(entry.map(|v| {
            // Forward entry: the backend is its NAT target; reply entry: the packet's source.
            let (addr, port) = if forward.is_some() { (v.nat_addr, v.nat_port) } else { (s, sp) };
            format!("{} (id {})", SocketAddr::new(addr.to_ip(), u16::from_be(port)), v.backend_id)
        }))
    }

    /// `namespace/name:port` of frontend `id` (live `SERVICE_META`).
    fn service_name(&self, id: u32) -> String {
        let meta = hash::<u32, ServiceMeta>(&self.live, n::SERVICE_META).ok().and_then(|m| m.get(&id, 0).ok());
        meta.map_or_else(
            || "?".to_string(),
            |m| {
                let s = |b: &[u8]| String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or(&[])).into_owned();
                let port = s(&m.port_name);
                if port.is_empty() {
                    format!("{}/{}", s(&m.namespace), s(&m.name))
                } else {
                    format!("{}/{}:{}", s(&m.namespace), s(&m.name), port)
                }
            },
        )
    }
}

fn scope_name(scope: u8) -> &'static str {
    if scope == SCOPE_EXTERNAL { "external" } else { "internal" }
}

/// Every range of service `svc_id` (the leading big-endian id of the key data).
fn copy_ranges<K: Pod + AsRef<[u32]>>(live: &Path, private: &Path, name: &str, svc_id: u32) -> Result<(), TraceError> {
    let live: LpmTrie<MapData, K, u8> = LpmTrie::try_from(open(live, name)?).map_err(map_err(name))?;
    let mut private: LpmTrie<MapData, K, u8> = LpmTrie::try_from(open(private, name)?).map_err(map_err(name))?;
    for key in live.keys().filter_map(Result::ok) {
        if key.data().as_ref().first() != Some(&svc_id.to_be()) {
            continue;
        }
        if let Ok(v) = live.get(&key, 0) {
            private.insert(&key, v, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}
