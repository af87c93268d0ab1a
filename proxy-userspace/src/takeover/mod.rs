//! Taking a node over from kube-proxy, and handing it back, without breaking a connection.
//!
//! **The way in** ([`adopt`]). Connections kube-proxy opened are netfilter's: their DNAT lives
//! in nf_conntrack. Our programs translate a packet before netfilter sees it, so once a
//! Service is in our maps, the next segment of such a connection would be balanced afresh
//! (2 in 3 to another backend: reset). So the agent reads nf_conntrack (ctnetlink) and seeds
//! our conntrack with every flow whose reply tuple shows a DNAT to an endpoint of a current
//! frontend, with its backend, as an established flow whose TCP sequence position is not
//! known yet (`ct::SEQ_UNKNOWN`, learnt from its next segments, as for carried-over
//! entries). It runs in the first sync, after backends and slots are written and before any
//! `SERVICES` entry ([`crate::sync::Syncer::before_first_services`]): until then our
//! attached programs pass every packet (no service, no conntrack entry), so no segment of a
//! kube-proxy flow is ever balanced by us before its entry is there. Always, not only when
//! kube-proxy's rules are seen: a dump of an empty table costs one syscall, and the flows
//! outlive the rules (an admin may have removed them first).
//!
//! A flow must not be known to both at once: our translated packet (client -> backend) is
//! a new flow to netfilter whose reply tuple (backend -> client) is the old DNAT entry's,
//! and netfilter's NAT then gives it another source port (the backend answers with a
//! reset). So the netfilter entry is deleted once ours is in. The step between is covered
//! by a *hold* entry: the forward entry first translates to 0.0.0.0:0, which the stack
//! drops as a martian before netfilter confirms anything, so a client segment in that
//! window of a few microseconds is lost (and retransmitted), never misrouted:
//! hold forward entry, reply entry, delete netfilter's entry, a plain netfilter entry for
//! what it will see of the flow from now on (client -> backend, no NAT), real forward entry.
//! Replies in the window are un-NATed by netfilter's entry while it exists and by ours
//! after. The plain entry matters for a client outside the cluster: a flow netfilter first
//! sees from the backend pod towards the outside is one a CNI masquerades. The agent runs
//! this once the interfaces present at start have our programs (it waits for that before
//! its first sync): an adopted flow's packets must meet them, or kube-proxy's rules, still
//! loaded, would balance them afresh.
//!
//! **The way out** ([`hand_back`], run by `ebpf-proxy cleanup` before it detaches
//! anything). First the `SERVICES` maps are emptied, so new connections pass to the rules
//! of kube-proxy (put back before). Then each live DNAT flow of ours is written into
//! nf_conntrack as `conntrack -I --dst-nat` would (`IPCTNL_MSG_CT_NEW` with `CTA_NAT_DST`),
//! established, so the restored rules' conntrack continues it. The entry netfilter made for
//! our translated packets (client -> backend, no NAT) holds the same reply tuple: it is
//! deleted first, with any entry a backend's packet opened the other way round (and again
//! if a packet re-created one before the insert). Again a hold
//! entry covers the switch; after it our forward entry translates to the service address
//! itself (no change), so the client's packets reach netfilter as netfilter expects them,
//! until the programs are detached. Source-NATed flows (north-south to another node's
//! backend through our SNAT ports) cannot be expressed as kube-proxy's masquerade and are
//! not handed back (counted).
//!
//! The agent does not hand back on SIGTERM: a restart or an upgrade keeps the pinned
//! datapath serving, and an agent cannot tell a restart from an uninstall.
pub mod ctnetlink;

use std::{collections::HashMap, net::IpAddr, path::Path};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use proxy_common::{
    CT_DIR_FORWARD, CtKey, CtValue, Ipv6Words, PROTO_TCP, PROTO_UDP, ServiceKey, ServiceValue, ct, ct_flags, map_names,
    port_from_map,
};
use tracing::{debug, info, warn};

use self::ctnetlink::{Ctnetlink, CtnetlinkError, NfFlow, NfTuple, tcp_state};
use crate::{
    conntrack::{CtTable, kernel::KernelCtTable, task::monotonic_ns},
    dataplane::{DataplaneError, maps::addr::MapAddr, maps::ct::Table, paths},
    sync::{BeforeServices, FrontendIds},
};

/// `IPS_DST_NAT`, `IPS_SRC_NAT`, `IPS_ASSURED`, `IPS_SEEN_REPLY`, `IPS_DYING`.
const IPS_SEEN_REPLY: u32 = 1 << 1;
const IPS_ASSURED: u32 = 1 << 2;
const IPS_SRC_NAT: u32 = 1 << 4;
const IPS_DST_NAT: u32 = 1 << 5;
const IPS_DYING: u32 = 1 << 9;

/// `BPF_ANY` / `BPF_NOEXIST` / `BPF_EXIST` (bpf_map_update_elem flags).
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// Timeouts of the flows handed back (netfilter restarts its own timer on their next
/// packet): kube-proxy's `--conntrack-tcp-timeout-established` default, and netfilter's
/// UDP stream timeout.
const HANDBACK_TCP_TIMEOUT_SECS: u32 = 86_400;
const HANDBACK_UDP_TIMEOUT_SECS: u32 = 120;

/// Tries per flow at replacing netfilter's plain entry by the DNAT one: a packet of the
/// flow can re-create the plain entry between the delete and the insert.
const HANDBACK_TRIES: usize = 4;

/// What adoption did with netfilter's flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AdoptCounts {
    /// Seeded into our conntrack with their backend.
    pub adopted: usize,
    /// DNAT flows whose address is no frontend of ours, or whose backend is not one of its
    /// endpoints now: left to netfilter.
    pub not_a_service: usize,
    /// Source-NATed too (kube-proxy's masquerade): our datapath cannot continue them.
    pub source_nat: usize,
    /// TCP flows already closing for good (TIME_WAIT, CLOSE).
    pub closed: usize,
    /// Ours already (a restart).
    pub already: usize,
    /// Could not be written (named in a warning each).
    pub failed: usize,
}

/// One flow to adopt: both our entries and netfilter's original tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adopt<A> {
    pub table: Table,
    pub fwd: CtKey<A>,
    pub fwd_val: CtValue<A>,
    pub rev: CtKey<A>,
    pub rev_val: CtValue<A>,
    pub orig: NfTuple,
}

type FrontendIndex = HashMap<(IpAddr, u16, u8), (u32, HashMap<(IpAddr, u16), u32>)>;

fn index(frontends: &[FrontendIds]) -> FrontendIndex {
    let mut idx = FrontendIndex::new();
    for f in frontends {
        // One address, port and protocol can be two frontends, one per scope (a NodePort
        // from pods and from outside, whose backends differ with externalTrafficPolicy:
        // Local): a flow to it is adopted if its backend is one of either's.
        let (_, backends) =
            idx.entry((f.key.addr, port_from_map(f.key.port), f.key.proto)).or_insert((f.svc_id, HashMap::new()));
        for (b, id) in &f.backends {
            backends.entry((b.addr, port_from_map(b.port))).or_insert(*id);
        }
    }
    idx
}

/// Which flows of `flows` (one family's and the other's) are adopted, as our entries made
/// at `now_ns` (`CLOCK_MONOTONIC`). Pure: counts what it skips and why.
pub fn plan<A: MapAddr>(
    flows: &[NfFlow],
    frontends: &[FrontendIds],
    now_ns: u64,
    counts: &mut AdoptCounts,
) -> Vec<Adopt<A>>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    let idx = index(frontends);
    let mut out = Vec::new();
    for f in flows {
        let o = &f.orig;
        let (Some(client), Some(vip), Some(backend)) = (A::from_ip(o.src), A::from_ip(o.dst), A::from_ip(f.reply.src))
        else {
            continue; // the other family
        };
        if f.status & IPS_DST_NAT == 0 || f.status & IPS_DYING != 0 || f.zone != 0 {
            continue; // not a Service flow: nothing of ours
        }
        if o.proto != PROTO_TCP && o.proto != PROTO_UDP {
            continue;
        }
        let snat = f.status & IPS_SRC_NAT != 0 || f.reply.dst != o.src || f.reply.dport != o.sport;
        if snat {
            counts.source_nat += 1;
            continue;
        }
        if o.proto == PROTO_TCP && matches!(f.tcp_state, None | Some(tcp_state::TIME_WAIT | tcp_state::CLOSE)) {
            counts.closed += 1;
            continue;
        }
        let Some((svc_id, backends)) = idx.get(&(o.dst, o.dport, o.proto)) else {
            counts.not_a_service += 1;
            continue;
        };
        let Some(backend_id) = backends.get(&(f.reply.src, f.reply.sport)) else {
            counts.not_a_service += 1;
            continue;
        };
        // TCP: every flow not closed is continued as established (its FINs, if any, are
        // seen again); UDP: as netfilter had it.
        let assured = o.proto == PROTO_TCP || f.status & IPS_ASSURED != 0;
        let seen_reply = assured || f.status & IPS_SEEN_REPLY != 0;
        let flags = if assured { ct_flags::ASSURED } else { 0 } | if seen_reply { ct_flags::SEEN_REPLY } else { 0 };
        let value = CtValue::<A> {
            flags,
            seq_flags: if o.proto == PROTO_TCP { ct::SEQ_UNKNOWN } else { 0 },
            backend_id: *backend_id,
            svc_id: *svc_id,
            last_seen: now_ns,
            created: ct::coarse_ms(now_ns),
            ..CtValue::default()
        };
        let fwd = CtKey {
            src_addr: client,
            dst_addr: vip,
            src_port: o.sport.to_be(),
            dst_port: o.dport.to_be(),
            proto: o.proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        let fwd_val = CtValue { nat_addr: backend, nat_port: f.reply.sport.to_be(), ..value };
        let rev = fwd.reply_of_forward(&fwd_val);
        let rev_val = CtValue { nat_addr: vip, nat_port: o.dport.to_be(), ..value };
        out.push(Adopt {
            table: if assured { Table::Assured } else { Table::Unassured },
            fwd,
            fwd_val,
            rev,
            rev_val,
            orig: *o,
        });
    }
    out
}

/// The forward entry that holds a flow while it changes hands: its packets are translated
/// to 0.0.0.0:0, which the stack drops before netfilter confirms a conntrack for them.
fn hold<A: Copy + Default>(v: &CtValue<A>) -> CtValue<A> {
    CtValue { nat_addr: A::default(), nat_port: 0, ..*v }
}

fn present<A: MapAddr>(t: &KernelCtTable<A>, key: &CtKey<A>) -> bool
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    matches!(t.find(key), Ok(Some(_)))
}

/// Seed `table` with `plan`'s flows, taking each from netfilter (see the module doc).
fn adopt_into<A: MapAddr>(
    table: &mut KernelCtTable<A>,
    nl: &mut Ctnetlink,
    plan: Vec<Adopt<A>>,
    counts: &mut AdoptCounts,
) where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    for a in plan {
        if present(table, &a.fwd) {
            counts.already += 1;
            continue;
        }
        if let Err(e) = table.insert(a.table, &a.fwd, &hold(&a.fwd_val), BPF_NOEXIST) {
            warn!(flow = ?a.orig, error = %e, "cannot adopt a kube-proxy flow: conntrack write failed");
            counts.failed += 1;
            continue;
        }
        let undo = |table: &mut KernelCtTable<A>| {
            let _ = table.delete(a.table, &a.fwd);
        };
        // A reply tuple held by another live flow of ours: leave this one to netfilter.
        if present(table, &a.rev) || table.insert(a.table, &a.rev, &a.rev_val, BPF_NOEXIST).is_err() {
            undo(table);
            warn!(flow = ?a.orig, "cannot adopt a kube-proxy flow: its reply tuple is another flow's");
            counts.failed += 1;
            continue;
        }
        if let Err(e) = nl.delete(&a.orig) {
            let _ = table.delete(a.table, &a.rev);
            undo(table);
            warn!(flow = ?a.orig, error = %e, "cannot adopt a kube-proxy flow: netfilter's entry stays");
            counts.failed += 1;
            continue;
        }
        // What netfilter will see of the flow from now on (client -> backend), tracked
        // before the backend's next packet could open it the other way round: a flow that
        // netfilter first sees from a pod towards the outside is one a CNI masquerades.
        let (client, backend) = (a.orig.src, a.fwd_val.nat_addr.to_ip());
        let plain = NfTuple { dst: backend, dport: u16::from_be(a.fwd_val.nat_port), ..a.orig };
        if let Err(e) = replace_plain(nl, &plain, timeout_of(plain.proto)) {
            debug!(flow = ?a.orig, %client, error = %e, "adopted flow left for netfilter to pick up");
        }
        if let Err(e) = table.insert(a.table, &a.fwd, &a.fwd_val, BPF_ANY) {
            // Held: its packets are dropped until the collector removes it; say so.
            warn!(flow = ?a.orig, error = %e, "adopted flow could not be given its backend");
            counts.failed += 1;
            continue;
        }
        counts.adopted += 1;
    }
}

fn timeout_of(proto: u8) -> u32 {
    if proto == PROTO_TCP { HANDBACK_TCP_TIMEOUT_SECS } else { HANDBACK_UDP_TIMEOUT_SECS }
}

/// `plain` reversed: the tuple of the flow's packets from the backend.
fn reversed(t: &NfTuple) -> NfTuple {
    NfTuple { src: t.dst, dst: t.src, sport: t.dport, dport: t.sport, proto: t.proto }
}

/// Delete whatever netfilter tracks for the flow `plain` (client -> backend) in either
/// direction, including an entry a backend's packet opened (and a CNI masqueraded), so its
/// tuples are free.
fn clear_flow(nl: &mut Ctnetlink, plain: &NfTuple) -> Result<(), CtnetlinkError> {
    nl.delete(plain)?;
    nl.delete(&reversed(plain))?;
    Ok(())
}

/// Make netfilter track `plain` as an established flow without NAT, replacing what a
/// packet may have opened meanwhile.
fn replace_plain(nl: &mut Ctnetlink, plain: &NfTuple, timeout: u32) -> Result<(), CtnetlinkError> {
    for _ in 0..HANDBACK_TRIES {
        if nl.create_plain(plain, timeout)? {
            return Ok(());
        }
        clear_flow(nl, plain)?;
    }
    Ok(())
}

/// Adopt netfilter's DNAT flows to `frontends` (built only if there are any) into the
/// conntrack maps pinned under `root`.
pub fn adopt(root: &Path, frontends: &dyn Fn() -> Vec<FrontendIds>) -> Result<AdoptCounts, TakeoverError> {
    let mut nl = Ctnetlink::open()?;
    let (flows, read) = nl.dump_where(|f| f.status & IPS_DST_NAT != 0)?;
    let mut counts = AdoptCounts::default();
    if flows.is_empty() {
        // No DNAT flow to adopt (a node kube-proxy never ran on): the frontends' ids are
        // not built at all.
        debug!(netfilter_flows = read, "nf_conntrack read: no DNAT flows");
        return Ok(counts);
    }
    let frontends = &frontends();
    let now = monotonic_ns();
    let plan4 = plan::<u32>(&flows, frontends, now, &mut counts);
    let plan6 = plan::<Ipv6Words>(&flows, frontends, now, &mut counts);
    if !plan4.is_empty() {
        let mut t = KernelCtTable::<u32>::open_pinned(root)?;
        adopt_into(&mut t, &mut nl, plan4, &mut counts);
    }
    if !plan6.is_empty() {
        let mut t = KernelCtTable::<Ipv6Words>::open_pinned(root)?;
        adopt_into(&mut t, &mut nl, plan6, &mut counts);
    }
    debug!(netfilter_flows = read, dnat_flows = flows.len(), "nf_conntrack read");
    Ok(counts)
}

/// The hook the agent gives its first sync: adopt, and log what was adopted. A node
/// without nf_conntrack (or without ctnetlink) has nothing to adopt.
pub fn adoption_hook(root: &Path) -> BeforeServices {
    let root = root.to_path_buf();
    Box::new(move |frontends: &dyn Fn() -> Vec<FrontendIds>| {
        let started = std::time::Instant::now();
        match adopt(&root, frontends) {
            Ok(c) => info!(
                adopted = c.adopted,
                not_a_service = c.not_a_service,
                source_nat = c.source_nat,
                closed = c.closed,
                already = c.already,
                failed = c.failed,
                took = ?started.elapsed(),
                "netfilter's Service flows adopted (kube-proxy takeover)"
            ),
            Err(TakeoverError::Ctnetlink(e @ CtnetlinkError::Socket(_))) => {
                info!(error = %e, "no netfilter conntrack to adopt flows from")
            }
            Err(e) => {
                warn!(error = %e, "adopting netfilter's Service flows failed: connections kube-proxy opened may be reset")
            }
        }
    })
}

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(transparent)]
    Ctnetlink(#[from] CtnetlinkError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("{map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// What `hand_back` did, for `cleanup`'s report.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HandBack {
    /// Frontends taken out of `SERVICES` / `SERVICES6` first.
    pub frontends_removed: usize,
    /// Flows written into nf_conntrack.
    pub handed_back: usize,
    /// Source-NATed flows, which netfilter's rules cannot continue.
    pub source_nat: usize,
    /// Flows netfilter refused (each named in `errors`).
    pub failed: usize,
    pub errors: Vec<String>,
}

/// Delete every key of the pinned map `name` (`SERVICES` or `SERVICES6`).
fn empty_services<A>(root: &Path, name: &'static str) -> Result<usize, TakeoverError>
where
    ServiceKey<A>: aya::Pod,
{
    let path = paths::maps_dir(root).join(name);
    if !path.exists() {
        return Ok(0);
    }
    let map_err = |source| TakeoverError::Map { map: name, source };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let mut m = BpfHashMap::<MapData, ServiceKey<A>, ServiceValue>::try_from(Map::HashMap(data)).map_err(map_err)?;
    let keys: Vec<ServiceKey<A>> = m.keys().filter_map(Result::ok).collect();
    let mut n = 0;
    for k in keys {
        if m.remove(&k).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// An entry of one of a family's two tables.
type Entry<A> = (Table, CtKey<A>, CtValue<A>);

fn all_entries<A: MapAddr>(t: &mut KernelCtTable<A>) -> Result<Vec<Entry<A>>, DataplaneError>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    let mut out = Vec::new();
    for table in Table::ALL {
        let mut cursor = None;
        loop {
            let chunk = t.read_chunk(table, cursor, 512)?;
            out.extend(chunk.entries.into_iter().map(|(k, v)| (table, k, v)));
            match chunk.next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
    }
    Ok(out)
}

/// Hand one family's live DNAT flows to netfilter (see the module doc).
fn hand_back_family<A: MapAddr>(root: &Path, nl: &mut Ctnetlink, out: &mut HandBack) -> Result<(), TakeoverError>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    if !paths::maps_dir(root).join(A::ct_map(Table::Assured)).exists() {
        return Ok(());
    }
    let mut t = KernelCtTable::<A>::open_pinned(root)?;
    for (table, k, v) in all_entries(&mut t)? {
        if k.dir != CT_DIR_FORWARD || (k.proto != PROTO_TCP && k.proto != PROTO_UDP) {
            continue;
        }
        if ct::state(k.proto, v.flags) == ct::CtState::Closed {
            continue;
        }
        // Held or already handed back (a cleanup run twice).
        if v.nat_addr == A::default() || (v.nat_addr == k.dst_addr && v.nat_port == k.dst_port) {
            continue;
        }
        if v.flags & ct_flags::SNAT != 0 {
            out.source_nat += 1;
            continue;
        }
        let orig = NfTuple {
            src: k.src_addr.to_ip(),
            dst: k.dst_addr.to_ip(),
            sport: u16::from_be(k.src_port),
            dport: u16::from_be(k.dst_port),
            proto: k.proto,
        };
        let backend = (v.nat_addr.to_ip(), u16::from_be(v.nat_port));
        // What netfilter tracks for our translated packets: client -> backend, no NAT.
        let plain = NfTuple { dst: backend.0, dport: backend.1, ..orig };
        let timeout = timeout_of(k.proto);
        if t.insert(table, &k, &hold(&v), BPF_EXIST).is_err() {
            continue; // gone meanwhile
        }
        let mut result = Ok(false);
        for _ in 0..HANDBACK_TRIES {
            result = clear_flow(nl, &plain).and_then(|_| nl.create_dnat(&orig, backend, timeout));
            if !matches!(result, Ok(false)) {
                break;
            }
        }
        match result {
            Ok(true) => {
                // From now on the client's packets reach netfilter untranslated, as its
                // new entry expects them.
                let through = CtValue { nat_addr: k.dst_addr, nat_port: k.dst_port, ..v };
                let _ = t.insert(table, &k, &through, BPF_EXIST);
                out.handed_back += 1;
            }
            other => {
                let _ = t.insert(table, &k, &v, BPF_EXIST);
                out.failed += 1;
                let why = match other {
                    Err(e) => e.to_string(),
                    _ => "its tuple stayed taken".to_string(),
                };
                out.errors.push(format!(
                    "flow {}:{} -> {}:{} (backend {}:{}): not handed back to netfilter: {why}",
                    orig.src, orig.sport, orig.dst, orig.dport, backend.0, backend.1
                ));
            }
        }
    }
    Ok(())
}

/// Stop our datapath taking new flows and hand its live DNAT flows to netfilter (for
/// `ebpf-proxy cleanup`, before anything is detached). Without nf_conntrack there is
/// nothing to hand back to: the services are still emptied, and the error says why.
pub fn hand_back(root: &Path) -> Result<HandBack, TakeoverError> {
    let mut out = HandBack {
        frontends_removed: empty_services::<u32>(root, map_names::SERVICES)?
            + empty_services::<Ipv6Words>(root, map_names::SERVICES6)?,
        ..HandBack::default()
    };
    let mut nl = Ctnetlink::open()?;
    hand_back_family::<u32>(root, &mut nl, &mut out)?;
    hand_back_family::<Ipv6Words>(root, &mut nl, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proxy_common::port_to_map;

    use proxy_common::CT_DIR_REPLY;

    use super::*;
    use crate::sync::store::{AnyBackend, AnyServiceKey};

    const IPS_CONFIRMED: u32 = 1 << 3;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn frontends() -> Vec<FrontendIds> {
        vec![FrontendIds {
            key: AnyServiceKey { addr: ip("10.96.0.10"), port: port_to_map(80), proto: PROTO_TCP, scope: 0 },
            svc_id: 7,
            backends: vec![
                (AnyBackend { addr: ip("10.244.0.11"), port: port_to_map(8080), proto: PROTO_TCP, flags: 0 }, 3),
                (AnyBackend { addr: ip("10.244.0.12"), port: port_to_map(8080), proto: PROTO_TCP, flags: 0 }, 4),
            ],
        }]
    }

    fn flow(client_port: u16, backend: &str, status: u32, state: u8) -> NfFlow {
        NfFlow {
            orig: NfTuple { src: ip("10.244.0.10"), dst: ip("10.96.0.10"), sport: client_port, dport: 80, proto: 6 },
            reply: NfTuple { src: ip(backend), dst: ip("10.244.0.10"), sport: 8080, dport: client_port, proto: 6 },
            status,
            tcp_state: Some(state),
            zone: 0,
        }
    }

    #[test]
    fn a_kube_proxy_flow_becomes_an_established_flow_to_its_backend() {
        let nat = IPS_CONFIRMED | IPS_ASSURED | IPS_SEEN_REPLY | IPS_DST_NAT;
        let flows = [flow(40000, "10.244.0.12", nat, tcp_state::ESTABLISHED)];
        let mut c = AdoptCounts::default();
        let p = plan::<u32>(&flows, &frontends(), 5_000_000_000, &mut c);
        assert_eq!(p.len(), 1);
        let a = p[0];
        assert_eq!(a.table, Table::Assured);
        assert_eq!(a.fwd.src_addr, u32::from_ne_bytes([10, 244, 0, 10]));
        assert_eq!(a.fwd.dst_addr, u32::from_ne_bytes([10, 96, 0, 10]));
        assert_eq!((a.fwd.src_port, a.fwd.dst_port), (40000u16.to_be(), 80u16.to_be()));
        assert_eq!(a.fwd_val.nat_addr, u32::from_ne_bytes([10, 244, 0, 12]), "keeps its backend");
        assert_eq!((a.fwd_val.nat_port, a.fwd_val.backend_id, a.fwd_val.svc_id), (8080u16.to_be(), 4, 7));
        assert_eq!(a.fwd_val.flags, ct_flags::ASSURED | ct_flags::SEEN_REPLY);
        assert_eq!(a.fwd_val.seq_flags, ct::SEQ_UNKNOWN);
        assert_eq!(a.fwd_val.last_seen, 5_000_000_000);
        // The reply entry: backend -> client, restoring the VIP.
        assert_eq!(a.rev.src_addr, u32::from_ne_bytes([10, 244, 0, 12]));
        assert_eq!((a.rev.src_port, a.rev.dst_port, a.rev.dir), (8080u16.to_be(), 40000u16.to_be(), CT_DIR_REPLY));
        assert_eq!((a.rev_val.nat_addr, a.rev_val.nat_port), (a.fwd.dst_addr, 80u16.to_be()));
        assert!(a.fwd.reply_belongs(&a.rev_val));
        assert!(plan::<Ipv6Words>(&flows, &frontends(), 0, &mut c).is_empty(), "an IPv4 flow is not IPv6's");
    }

    #[test]
    fn only_current_endpoints_of_current_frontends_without_masquerade_are_adopted() {
        let nat = IPS_CONFIRMED | IPS_ASSURED | IPS_SEEN_REPLY | IPS_DST_NAT;
        let mut masq = flow(40003, "10.244.0.11", nat | IPS_SRC_NAT, tcp_state::ESTABLISHED);
        masq.reply.dst = ip("192.168.0.1");
        let flows = [
            flow(40001, "10.244.0.99", nat, tcp_state::ESTABLISHED), // not an endpoint now
            flow(40002, "10.244.0.11", IPS_CONFIRMED | IPS_ASSURED, tcp_state::ESTABLISHED), // no DNAT
            masq,
            flow(40004, "10.244.0.11", nat, tcp_state::TIME_WAIT),
            flow(40005, "10.244.0.11", nat, tcp_state::SYN_RECV),
        ];
        let mut c = AdoptCounts::default();
        let p = plan::<u32>(&flows, &frontends(), 1, &mut c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].fwd.src_port, 40005u16.to_be());
        assert_eq!((c.not_a_service, c.source_nat, c.closed), (1, 1, 1));
    }

    #[test]
    fn ipv6_addresses_round_trip_in_network_order() {
        let a: IpAddr = ip("fd00:10:244::a");
        let w = Ipv6Words::from_ip(a).unwrap();
        assert_eq!(w.to_ip(), a);
        assert_eq!(w[0].to_ne_bytes(), [0xfd, 0, 0, 0x10]);
        assert_eq!(u32::from_ip(ip("10.0.0.1")).unwrap().to_ip(), ip("10.0.0.1"));
    }
}
