//! Operator CLI: read the pinned maps and print what the kernel will do. Works whether or
//! not the agent runs. Rendering is separate from reading, so it is unit-tested.
//!
//! Both families are shown together: IPv4 frontends and backends from `SERVICES` /
//! `BACKENDS`, IPv6 ones from `SERVICES6` / `BACKENDS6` (ids are shared), conntrack from
//! `CONNTRACK` and `CONNTRACK6`. IPv6 addresses are printed in their standard form, with a
//! port as `[addr]:port`; JSON rows carry a `family` field.
use std::{
    collections::{HashMap, HashSet},
    io::{self, Write},
    net::{IpAddr, SocketAddr},
};

use proxy_common::{
    CtKey, CtValue, ServiceMeta, ServiceValue, SlotKey, StatsFamily, Verdict, backend_flags, ct_flags, port_from_map,
    svc_flags,
};
use serde::Serialize;

use crate::{
    cli::{FilterArgs, OutputFormat},
    dataplane::{DataplaneError, maps::Maps, maps::addr::MapAddr, maps::cstr},
    model::{FrontendKind, IpFamily, Protocol},
    sync::{AnyBackend, AnyServiceKey},
};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackendRow {
    pub id: u32,
    pub family: IpFamily,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub local: bool,
    pub terminating: bool,
    /// `backends`: the Services (`namespace/name`) whose frontends use it (empty, and left
    /// out, in a service row's own list).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceRow {
    pub id: u32,
    pub family: IpFamily,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub scope: &'static str,
    #[serde(rename = "type")]
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub flags: Vec<&'static str>,
    pub affinity_timeout: Option<u32>,
    /// How new flows pick a backend: `random` or `maglev` (`--lb-algorithm`, the
    /// `ebpf-proxy.io/lb-algorithm` annotation).
    pub algorithm: &'static str,
    /// Slots of the Maglev table (with `maglev`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maglev_table_size: Option<u32>,
    pub backends: Vec<BackendRow>,
}

fn proto_name(p: u8) -> String {
    Protocol::from_number(p).map(|p| p.to_string()).unwrap_or_else(|| p.to_string())
}

fn backend_row(id: u32, b: &AnyBackend) -> BackendRow {
    BackendRow {
        id,
        family: IpFamily::of(b.addr),
        address: b.addr,
        port: port_from_map(b.port),
        protocol: proto_name(b.proto),
        local: b.flags & backend_flags::LOCAL != 0,
        terminating: b.flags & backend_flags::TERMINATING != 0,
        services: Vec::new(),
    }
}

/// Build service rows from raw map contents (pure), both families.
pub fn service_rows(
    services: &[(AnyServiceKey, ServiceValue)],
    slots: &HashMap<SlotKey, u32>,
    backends: &HashMap<u32, AnyBackend>,
    meta: &HashMap<u32, ServiceMeta>,
) -> Vec<ServiceRow> {
    let mut rows: Vec<ServiceRow> = services
        .iter()
        .map(|(k, v)| {
            let m = meta.get(&v.id);
            let maglev = v.flags & svc_flags::MAGLEV != 0 && v.maglev_size != 0;
            let backends = (0..v.count)
                .filter_map(|i| slots.get(&SlotKey::new(v.id, v.generation, i)))
                .filter_map(|id| backends.get(id).map(|b| backend_row(*id, b)))
                .collect();
            ServiceRow {
                id: v.id,
                family: IpFamily::of(k.addr),
                address: k.addr,
                port: port_from_map(k.port),
                protocol: proto_name(k.proto),
                scope: if k.scope == proxy_common::SCOPE_EXTERNAL { "external" } else { "internal" },
                kind: m
                    .and_then(|m| FrontendKind::from_number(m.kind))
                    .map(|k| format!("{k:?}"))
                    .unwrap_or_else(|| "?".into()),
                namespace: m.map(|m| cstr(&m.namespace)).unwrap_or_default(),
                name: m.map(|m| cstr(&m.name)).unwrap_or_default(),
                port_name: m.map(|m| cstr(&m.port_name)).unwrap_or_default(),
                // The frontend kind is the TYPE column.
                flags: svc_flags::names(v.flags & svc_flags::POLICY).collect(),
                affinity_timeout: (v.flags & svc_flags::AFFINITY != 0).then_some(v.affinity_timeout),
                algorithm: if maglev { "maglev" } else { "random" },
                maglev_table_size: maglev.then_some(v.maglev_size),
                backends,
            }
        })
        .collect();
    rows.sort_by(|a, b| (a.address, a.port, &a.protocol, a.scope).cmp(&(b.address, b.port, &b.protocol, b.scope)));
    rows
}

/// Left-aligned columns, like `kubectl get`.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = write_table(&mut out, Some(header), rows, |r| r.clone());
    String::from_utf8_lossy(&out).into_owned()
}

/// Left-aligned columns (`header` first unless `None`), written row by row: the widths are
/// found in a first pass over the cells, which are made again for the second, so that a
/// dump of hundreds of thousands of rows never holds its whole text.
pub fn write_table<T>(
    w: &mut impl Write,
    header: Option<&[&str]>,
    rows: &[T],
    cells: impl Fn(&T) -> Vec<String>,
) -> io::Result<()> {
    let mut widths: Vec<usize> = header.map(|h| h.iter().map(|c| c.len()).collect()).unwrap_or_default();
    for r in rows {
        for (i, c) in cells(r).iter().enumerate() {
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(c.len()),
                None => widths.push(c.len()),
            }
        }
    }
    let mut line = |cells: &[&str]| -> io::Result<()> {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        writeln!(w, "{}", s.trim_end())
    };
    if let Some(h) = header {
        line(h)?;
    }
    for r in rows {
        let c = cells(r);
        line(&c.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(())
}

/// A listing's columns: `table` shows the first `narrow`, `wide` them all.
pub struct Columns<T> {
    pub header: &'static [&'static str],
    pub narrow: usize,
    pub cells: fn(&T) -> Vec<String>,
}

/// Write `rows` as `format`: JSON and YAML as lists of the rows' fields, table and wide as
/// columns (without the header line with `no_headers`). No row, no table: nothing is
/// written (as `kubectl get` with a selector that matches nothing).
pub fn write_rows<T: Serialize>(
    w: &mut impl Write,
    format: OutputFormat,
    no_headers: bool,
    rows: &[T],
    columns: &Columns<T>,
) -> io::Result<()> {
    match format {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *w, rows)?;
            writeln!(w)
        }
        OutputFormat::Yaml => serde_yaml::to_writer(&mut *w, rows).map_err(io::Error::other),
        OutputFormat::Table | OutputFormat::Wide if rows.is_empty() => Ok(()),
        OutputFormat::Table | OutputFormat::Wide => {
            let n = if format == OutputFormat::Wide { columns.header.len() } else { columns.narrow };
            let header = (!no_headers).then(|| &columns.header[..n]);
            write_table(w, header, rows, |r| {
                let mut c = (columns.cells)(r);
                c.truncate(n);
                c
            })
        }
    }
}

/// The columns as one string (tests, and the old `render_*` callers).
fn render<T: Serialize>(rows: &[T], columns: &Columns<T>, format: OutputFormat) -> String {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = write_rows(&mut out, format, false, rows, columns);
    String::from_utf8_lossy(&out).into_owned()
}

/// What `--namespace` and `--service` select: `namespace/name`, or `name` in any
/// namespace (or in `--namespace`).
fn service_selected(f: &FilterArgs, namespace: &str, name: &str) -> bool {
    if f.namespace.as_deref().is_some_and(|n| n != namespace) {
        return false;
    }
    match f.service.as_deref().map(|s| s.split_once('/')) {
        None => true,
        Some(Some((ns, n))) => ns == namespace && n == name,
        Some(None) => f.service.as_deref() == Some(name),
    }
}

/// Is there a filter by Service (`--namespace`, `--service`)?
pub fn selects_by_service(f: &FilterArgs) -> bool {
    f.namespace.is_some() || f.service.is_some()
}

fn proto_selected(f: &FilterArgs, proto: u8) -> bool {
    f.proto.is_none_or(|p| p.number() == proto)
}

/// `services` rows the filters select: by Service, and the frontend's address, port and
/// protocol.
pub fn filter_services(rows: Vec<ServiceRow>, f: &FilterArgs) -> Vec<ServiceRow> {
    rows.into_iter()
        .filter(|r| {
            service_selected(f, &r.namespace, &r.name)
                && f.address.is_none_or(|a| a == r.address)
                && f.port.is_none_or(|p| p == r.port)
                && f.proto.is_none_or(|p| p.to_string() == r.protocol)
        })
        .collect()
}

/// The ids of the frontends of the Services `--namespace` / `--service` select (`None`: no
/// such filter).
pub fn selected_service_ids(services: &[ServiceRow], f: &FilterArgs) -> Option<HashSet<u32>> {
    selects_by_service(f)
        .then(|| services.iter().filter(|r| service_selected(f, &r.namespace, &r.name)).map(|r| r.id).collect())
}

/// `backends` rows the filters select: the backends of the selected Services' frontends,
/// with this address, port and protocol.
pub fn filter_backends(rows: Vec<BackendRow>, services: &[ServiceRow], f: &FilterArgs) -> Vec<BackendRow> {
    let ids: Option<HashSet<u32>> = selects_by_service(f).then(|| {
        services
            .iter()
            .filter(|r| service_selected(f, &r.namespace, &r.name))
            .flat_map(|r| r.backends.iter().map(|b| b.id))
            .collect()
    });
    rows.into_iter()
        .filter(|b| {
            ids.as_ref().is_none_or(|ids| ids.contains(&b.id))
                && f.address.is_none_or(|a| a == b.address)
                && f.port.is_none_or(|p| p == b.port)
                && f.proto.is_none_or(|p| p.to_string() == b.protocol)
        })
        .collect()
}

pub const SERVICE_COLUMNS: Columns<ServiceRow> = Columns {
    header: &[
        "ID",
        "FRONTEND",
        "SCOPE",
        "TYPE",
        "SERVICE",
        "FLAGS",
        "BACKENDS",
        "FAMILY",
        "AFFINITY-TIMEOUT",
        "ALGORITHM",
        "BACKEND-IDS",
    ],
    narrow: 7,
    cells: service_cells,
};

fn service_cells(r: &ServiceRow) -> Vec<String> {
    let svc = if r.port_name.is_empty() {
        format!("{}/{}", r.namespace, r.name)
    } else {
        format!("{}/{}:{}", r.namespace, r.name, r.port_name)
    };
    let list = |f: &dyn Fn(&BackendRow) -> String| {
        if r.backends.is_empty() {
            "<none>".to_string()
        } else {
            r.backends.iter().map(f).collect::<Vec<_>>().join(",")
        }
    };
    vec![
        r.id.to_string(),
        format!("{}/{}", SocketAddr::new(r.address, r.port), r.protocol),
        r.scope.to_string(),
        r.kind.clone(),
        svc,
        if r.flags.is_empty() { "-".into() } else { r.flags.join(",") },
        list(&|b| SocketAddr::new(b.address, b.port).to_string()),
        r.family.to_string(),
        r.affinity_timeout.map_or_else(|| "-".into(), |t| format!("{t}s")),
        match r.maglev_table_size {
            Some(m) => format!("{}({m})", r.algorithm),
            None => r.algorithm.to_string(),
        },
        list(&|b| b.id.to_string()),
    ]
}

pub fn render_services(rows: &[ServiceRow]) -> String {
    render(rows, &SERVICE_COLUMNS, OutputFormat::Table)
}

/// Both families' frontends, read the way a restarting agent reads them back.
pub fn read_services(maps: &Maps) -> Result<Vec<ServiceRow>, DataplaneError> {
    let snap = maps.read_snapshot()?;
    // The rows show ids as the maps hold them.
    let slots: HashMap<_, _> = snap.slots.into_iter().map(|(k, id)| (k, id.get())).collect();
    let backends: HashMap<_, _> = snap.backends.into_iter().map(|(id, b)| (id.get(), b)).collect();
    let meta: HashMap<_, _> = snap.meta.into_iter().map(|(id, m)| (id.get(), m)).collect();
    Ok(service_rows(&snap.services, &slots, &backends, &meta))
}

/// Every backend, with the Services (from `services`, the frontends' rows) that use it.
pub fn read_backends(maps: &Maps, services: &[ServiceRow]) -> Result<Vec<BackendRow>, DataplaneError> {
    let mut users: HashMap<u32, Vec<String>> = HashMap::new();
    for s in services {
        for b in &s.backends {
            let name = format!("{}/{}", s.namespace, s.name);
            let list = users.entry(b.id).or_default();
            if !list.contains(&name) {
                list.push(name);
            }
        }
    }
    let mut rows: Vec<BackendRow> = maps
        .read_snapshot()?
        .backends
        .iter()
        .map(|(id, b)| BackendRow { services: users.remove(&id.get()).unwrap_or_default(), ..backend_row(id.get(), b) })
        .collect();
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

pub const BACKEND_COLUMNS: Columns<BackendRow> =
    Columns { header: &["ID", "BACKEND", "FLAGS", "FAMILY", "SERVICES"], narrow: 3, cells: backend_cells };

fn backend_cells(b: &BackendRow) -> Vec<String> {
    let mut flags = vec![];
    if b.local {
        flags.push("local");
    }
    if b.terminating {
        flags.push("terminating");
    }
    vec![
        b.id.to_string(),
        format!("{}/{}", SocketAddr::new(b.address, b.port), b.protocol),
        if flags.is_empty() { "-".into() } else { flags.join(",") },
        b.family.to_string(),
        if b.services.is_empty() { "<none>".into() } else { b.services.join(",") },
    ]
}

pub fn render_backends(rows: &[BackendRow]) -> String {
    render(rows, &BACKEND_COLUMNS, OutputFormat::Table)
}

#[derive(Debug, Serialize)]
pub struct ConntrackRow {
    pub family: &'static str,
    pub protocol: String,
    pub direction: &'static str,
    pub source: String,
    pub destination: String,
    /// Forward: the backend the destination is rewritten to; reply: the VIP the source is
    /// rewritten to.
    pub nat: String,
    pub service_id: u32,
    pub backend_id: u32,
    /// new, replied, established, closing (one FIN) or closed (both FINs, or a RST); the
    /// forward entry's state is the flow's (`proxy_common::ct::CtState::name`, as in the
    /// `conntrack_flows` metric).
    pub state: &'static str,
    /// The state as netfilter (`conntrack -L`) names it: SYN_SENT, SYN_RECV, ESTABLISHED,
    /// CLOSE_WAIT, CLOSE for TCP; UNREPLIED, REPLIED, ASSURED for UDP and others.
    pub label: &'static str,
    /// netfilter's assured (a completed handshake, a UDP stream): never evicted.
    pub assured: bool,
    /// The map the entry is in: the assured table (`CONNTRACK`, `CONNTRACK6`) or the
    /// unassured LRU (`CT_NEW`, `CT_NEW6`).
    pub table: &'static str,
    /// A FIN or RST was seen: a SYN on this tuple opens a new connection.
    pub closing: bool,
    pub snat: Option<String>,
    /// Seconds since the entry was last refreshed (at most once a second by the datapath).
    pub idle_seconds: u64,
}

fn conntrack_row<A: MapAddr>(
    table: crate::dataplane::maps::ct::Table,
    k: &CtKey<A>,
    v: &CtValue<A>,
    now_ns: u64,
) -> ConntrackRow {
    let ep = |a: A, p: u16| SocketAddr::new(a.to_ip(), port_from_map(p)).to_string();
    let state = proxy_common::ct::state(k.proto, v.flags);
    ConntrackRow {
        family: A::NAME,
        protocol: proto_name(k.proto),
        direction: if k.dir == proxy_common::CT_DIR_REPLY { "reply" } else { "forward" },
        source: ep(k.src_addr, k.src_port),
        destination: ep(k.dst_addr, k.dst_port),
        nat: ep(v.nat_addr, v.nat_port),
        service_id: v.svc_id,
        backend_id: v.backend_id,
        state: state.name(),
        label: state.label(k.proto),
        assured: v.flags & ct_flags::ASSURED != 0,
        table: A::ct_map(table),
        closing: v.flags & ct_flags::CLOSING != 0,
        snat: (v.flags & ct_flags::SNAT != 0).then(|| ep(v.snat_addr, v.snat_port)),
        idle_seconds: now_ns.saturating_sub(v.last_seen) / 1_000_000_000,
    }
}

/// Does this entry pass the filters? Addresses and ports match the source, the destination
/// or the NAT side; by Service, the entry's service id is one of `ids`.
fn conntrack_selected<A: MapAddr>(f: &FilterArgs, ids: Option<&HashSet<u32>>, k: &CtKey<A>, v: &CtValue<A>) -> bool {
    ids.is_none_or(|ids| ids.contains(&v.svc_id))
        && proto_selected(f, k.proto)
        && f.address.is_none_or(|a| [k.src_addr, k.dst_addr, v.nat_addr].iter().any(|x| x.to_ip() == a))
        && f.port.is_none_or(|p| [k.src_port, k.dst_port, v.nat_port].iter().any(|x| port_from_map(*x) == p))
}

/// Every entry of both families' assured and unassured tables.
pub fn read_conntrack(maps: &Maps) -> Result<Vec<ConntrackRow>, DataplaneError> {
    read_conntrack_filtered(maps, &FilterArgs::default(), None)
}

/// The entries of both families' assured and unassured tables that pass `filter` (`ids`:
/// the selected Services' frontend ids, see [`selected_service_ids`]). Entries are
/// filtered as the maps are walked, so a full table of which few match costs little.
pub fn read_conntrack_filtered(
    maps: &Maps,
    filter: &FilterArgs,
    ids: Option<&HashSet<u32>>,
) -> Result<Vec<ConntrackRow>, DataplaneError> {
    use crate::dataplane::maps::ct::Table::{Assured, Unassured};
    use proxy_common::map_names as n;
    let now = crate::conntrack::task::monotonic_ns();
    let mut rows: Vec<ConntrackRow> = Vec::new();
    for (table, map, name) in [(Assured, &maps.conntrack, n::CONNTRACK), (Unassured, &maps.ct_new, n::CT_NEW)] {
        for r in map.iter() {
            let (k, v) = r.map_err(|e| DataplaneError::from_map(name, e))?;
            if conntrack_selected(filter, ids, &k, &v) {
                rows.push(conntrack_row(table, &k, &v, now));
            }
        }
    }
    for (table, map, name) in [(Assured, &maps.conntrack6, n::CONNTRACK6), (Unassured, &maps.ct_new6, n::CT_NEW6)] {
        for r in map.iter() {
            let (k, v) = r.map_err(|e| DataplaneError::from_map(name, e))?;
            if conntrack_selected(filter, ids, &k, &v) {
                rows.push(conntrack_row(table, &k, &v, now));
            }
        }
    }
    // IPv4 first, then IPv6 (the family is the first key).
    rows.sort_by(|a, b| {
        (a.family, &a.source, &a.destination, a.direction).cmp(&(b.family, &b.source, &b.destination, b.direction))
    });
    Ok(rows)
}

pub const CONNTRACK_COLUMNS: Columns<ConntrackRow> = Columns {
    header: &[
        "PROTO",
        "DIR",
        "SOURCE",
        "DESTINATION",
        "NAT",
        "SVC",
        "BACKEND",
        "STATE",
        "ASSURED",
        "SNAT",
        "IDLE(s)",
        "FAMILY",
        "TABLE",
        "FLOW-STATE",
        "CLOSING",
    ],
    narrow: 11,
    cells: conntrack_cells,
};

fn conntrack_cells(r: &ConntrackRow) -> Vec<String> {
    vec![
        r.protocol.clone(),
        r.direction.to_string(),
        r.source.clone(),
        r.destination.clone(),
        r.nat.clone(),
        r.service_id.to_string(),
        r.backend_id.to_string(),
        r.label.to_string(),
        if r.assured { "[ASSURED]".into() } else { "-".into() },
        r.snat.clone().unwrap_or_else(|| "-".into()),
        r.idle_seconds.to_string(),
        r.family.to_string(),
        r.table.to_string(),
        r.state.to_string(),
        if r.closing { "yes".into() } else { "no".into() },
    ]
}

pub fn render_conntrack(rows: &[ConntrackRow]) -> String {
    render(rows, &CONNTRACK_COLUMNS, OutputFormat::Table)
}

#[derive(Debug, Serialize)]
pub struct StatRow {
    /// None for the node-wide counters.
    pub service_id: Option<u32>,
    /// The service id's frontend (`10.96.0.1:80/TCP`, `[fd00::1]:80/TCP`), when it is still
    /// programmed: ids are shared by both families.
    pub frontend: Option<String>,
    /// `IPv4`/`IPv6` (a node-wide block, or the frontend's family), `other` for node-wide
    /// counts of neither; None for a service whose frontend is gone.
    pub family: Option<&'static str>,
    pub verdict: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

pub fn read_stats(maps: &Maps) -> Result<Vec<StatRow>, DataplaneError> {
    use proxy_common::map_names as n;
    let mut rows = Vec::new();
    // Node-wide: every verdict of both families, and of neither (non-IP frames, counts
    // migrated from the flat layout) where it counted something.
    for v in Verdict::ALL {
        for family in StatsFamily::ALL {
            let c = crate::dataplane::maps::global_counters(&maps.global_stats, family, v as u32)?;
            if family == StatsFamily::Other && c.packets == 0 {
                continue;
            }
            rows.push(StatRow {
                service_id: None,
                frontend: None,
                family: Some(family.name()),
                verdict: v.name(),
                packets: c.packets,
                bytes: c.bytes,
            });
        }
    }
    let frontends: HashMap<u32, (String, &'static str)> = maps
        .read_snapshot()?
        .services
        .iter()
        .map(|(k, v)| {
            let at = SocketAddr::new(k.addr, port_from_map(k.port));
            let scope = if k.scope == proxy_common::SCOPE_EXTERNAL { " external" } else { "" };
            (v.id, (format!("{at}/{}{scope}", proto_name(k.proto)), IpFamily::of(k.addr).name()))
        })
        .collect();
    let mut per: Vec<StatRow> = Vec::new();
    for r in maps.service_stats.iter() {
        let (k, pc) = r.map_err(|e| DataplaneError::from_map(n::SERVICE_STATS, e))?;
        let (packets, bytes) = pc.iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
        let name = Verdict::from_index(k.verdict).map_or("unknown", Verdict::name);
        let (frontend, family) = frontends.get(&k.svc_id).cloned().unzip();
        per.push(StatRow { service_id: Some(k.svc_id), frontend, family, verdict: name, packets, bytes });
    }
    per.sort_by_key(|r| (r.service_id, r.verdict));
    rows.extend(per);
    Ok(rows)
}

pub const STAT_COLUMNS: Columns<StatRow> =
    // Every column in the table too: node rows are told apart by FAMILY, service rows by
    // FRONTEND.
    Columns {
        header: &["SERVICE", "VERDICT", "FAMILY", "PACKETS", "BYTES", "FRONTEND"],
        narrow: 6,
        cells: stat_cells,
    };

fn stat_cells(r: &StatRow) -> Vec<String> {
    vec![
        r.service_id.map(|i| i.to_string()).unwrap_or_else(|| "node".into()),
        r.verdict.to_string(),
        r.family.unwrap_or("-").to_string(),
        r.packets.to_string(),
        r.bytes.to_string(),
        r.frontend.clone().unwrap_or_else(|| "-".into()),
    ]
}

/// `ebpf-proxy maps`: every map of the catalogue and its pin. Wide adds the kernel's map
/// type and what sizes it.
pub const MAP_COLUMNS: Columns<crate::dataplane::maps::pins::PinnedMap> = Columns {
    header: &["MAP", "FAMILY", "ENTRIES", "MAX", "FILL", "STATUS", "TYPE", "SIZED-BY"],
    narrow: 6,
    cells: map_cells,
};

fn map_cells(r: &crate::dataplane::maps::pins::PinnedMap) -> Vec<String> {
    use crate::dataplane::maps::pins::PinStatus;
    let absent = r.status == PinStatus::Absent;
    let dash = |s: String| if absent { "-".to_string() } else { s };
    vec![
        r.name.to_string(),
        r.family.to_string(),
        dash(r.entries.to_string()),
        dash(r.max_entries.to_string()),
        dash(format!("{:.1}%", r.fill() * 100.0)),
        match &r.status {
            PinStatus::Ok => "ok".into(),
            PinStatus::Absent => "not pinned".into(),
            PinStatus::LayoutDiffers { pinned, wanted } => format!("layout differs: {pinned}, this binary: {wanted}"),
        },
        dash(r.map_type.clone()),
        if r.sized_by.is_empty() { "fixed".into() } else { format!("--{}", r.sized_by) },
    ]
}

pub fn render_stats(rows: &[StatRow]) -> String {
    render(rows, &STAT_COLUMNS, OutputFormat::Table)
}

/// Uplinks and their XDP mode (from the pinned links), for `ebpf-proxy stats`.
pub fn render_uplinks(rows: &[crate::dataplane::attach::PinnedUplink]) -> String {
    let cells: Vec<Vec<String>> =
        rows.iter().map(|u| vec![u.iface.clone(), u.ifindex.to_string(), u.xdp_mode.to_string()]).collect();
    table(&["UPLINK", "IFINDEX", "XDP-MODE"], &cells)
}

/// `ebpf-proxy trace` as text: one fact per line.
pub fn render_trace(o: &crate::trace::Outcome) -> String {
    let wire = |w: &crate::trace::Wire| {
        let flags = if w.tcp_flags.is_empty() { String::new() } else { format!(" [{}]", w.tcp_flags) };
        let sums = if w.checksums_valid { "checksums valid" } else { "CHECKSUMS INVALID" };
        format!("{} -> {} {}{flags}, {sums}", w.src, w.dst, w.protocol)
    };
    let mut out = format!(
        "program:   {}\nin:        {}\nverdict:   {} — {}\n",
        o.program,
        wire(&o.input),
        o.verdict,
        o.explanation
    );
    if let Some(f) = &o.frontend {
        out.push_str(&format!("frontend:  {} {} (id {})\n", f.service, f.address, f.id));
    }
    if let Some(b) = &o.backend {
        out.push_str(&format!("backend:   {b}\n"));
    }
    if let Some(sel) = &o.selection {
        out.push_str(&format!("chosen by: {sel}\n"));
    }
    match &o.output {
        Some(w) if o.untouched => out.push_str(&format!("out:       untouched ({})\n", wire(w))),
        Some(w) => out.push_str(&format!("out:       {}\n", wire(w))),
        None => out.push_str("out:       nothing (dropped)\n"),
    }
    out.push_str(&format!("action:    {}\n", o.action));
    out
}

/// `ebpf-proxy explain` as text: one block per frontend group, one line per endpoint.
pub fn render_explain(e: &crate::model::Explanation) -> String {
    let zone = e.zone.as_deref().map(|z| format!(", zone {z}")).unwrap_or_default();
    let mut out = format!("Service {} on node {}{zone}\n", e.service, e.node);
    for v in &e.frontends {
        let family = match v.family {
            crate::model::IpFamily::V4 => "IPv4",
            crate::model::IpFamily::V6 => "IPv6",
        };
        let proto = format!("{:?}", v.protocol).to_uppercase();
        out.push_str(&format!("\nport {} {proto} {family} | {} | {}\n", v.port, v.traffic, v.policy));
        out.push_str(&format!("  backend choice: {}\n", v.selection));
        let rows: Vec<Vec<String>> = v
            .endpoints
            .iter()
            .map(|x| {
                let addr = match x.port {
                    Some(p) => std::net::SocketAddr::new(x.address, p).to_string(),
                    None => x.address.to_string(),
                };
                let local = if x.local { "local" } else { "remote" };
                vec![addr, x.slice.clone(), local.to_string(), x.reason.describe().to_string()]
            })
            .collect();
        if rows.is_empty() {
            out.push_str("  (no endpoints)\n");
        } else {
            out.push_str(&table(&["ENDPOINT", "SLICE", "NODE", "WHY"], &rows));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::port_to_map;

    use crate::model::Protocol;

    use crate::sync::service_meta;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn meta(name: &str) -> ServiceMeta {
        service_meta(&crate::model::FrontendEntry {
            service: crate::model::ServicePortName::new("default", name, "http"),
            kind: FrontendKind::ClusterIP,
            backends: vec![],
            affinity_timeout: Some(30),
            local_only: false,
            source_ranges: vec![],
            lb_algorithm: None,
            weights: vec![],
        })
    }

    #[test]
    fn service_rows_follow_the_active_generation_and_render_like_kubectl() {
        let key = AnyServiceKey { addr: ip("10.96.0.10"), port: port_to_map(80), proto: 6, scope: 0 };
        let value = ServiceValue {
            id: 7,
            count: 1,
            flags: svc_flags::AFFINITY,
            generation: 1,
            affinity_timeout: 30,
            maglev_size: 0,
            maglev_base: 0,
        };
        let mut slots = HashMap::new();
        slots.insert(SlotKey::new(7, 0, 0), 1); // stale generation: not shown
        slots.insert(SlotKey::new(7, 1, 0), 2);
        let mut backends = HashMap::new();
        backends.insert(1, AnyBackend { addr: ip("10.244.0.1"), port: port_to_map(8080), proto: 6, flags: 0 });
        backends.insert(2, AnyBackend { addr: ip("10.244.0.2"), port: port_to_map(8080), proto: 6, flags: 1 });
        let mut metas = HashMap::new();
        metas.insert(7, meta("web"));
        let rows = service_rows(&[(key, value)], &slots, &backends, &metas);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].backends.len(), 1);
        assert_eq!(rows[0].backends[0].address, ip("10.244.0.2"));
        assert!(rows[0].backends[0].local);
        assert_eq!(rows[0].affinity_timeout, Some(30));
        let text = render_services(&rows);
        let mut lines = text.lines();
        assert!(lines.next().unwrap().starts_with("ID   FRONTEND"));
        let row = lines.next().unwrap();
        for part in ["10.96.0.10:80/TCP", "ClusterIP", "default/web:http", "affinity", "10.244.0.2:8080"] {
            assert!(row.contains(part), "{row}");
        }
    }

    /// A Maglev frontend says so: `maglev` in FLAGS, and `maglev(<table size>)` in the wide
    /// ALGORITHM column.
    #[test]
    fn maglev_frontends_show_their_algorithm() {
        let key = AnyServiceKey { addr: ip("203.0.113.7"), port: port_to_map(80), proto: 6, scope: 1 };
        let value = ServiceValue {
            id: 9,
            count: 0,
            flags: svc_flags::MAGLEV | svc_flags::LOADBALANCER,
            generation: 0,
            affinity_timeout: 0,
            maglev_size: 16_381,
            maglev_base: 1,
        };
        let rows = service_rows(&[(key, value)], &HashMap::new(), &HashMap::new(), &HashMap::new());
        assert_eq!((rows[0].algorithm, rows[0].maglev_table_size), ("maglev", Some(16_381)));
        assert_eq!(rows[0].flags, ["maglev"]);
        let wide = render(&rows, &SERVICE_COLUMNS, OutputFormat::Wide);
        assert!(wide.lines().nth(1).unwrap().contains(" maglev(16381) "), "{wide}");
    }

    /// IPv6 frontends and backends print as `[addr]:port`, in standard (compressed) form,
    /// and carry their family in JSON; both families sort IPv4 first.
    #[test]
    fn ipv6_rows_render_bracketed_and_say_their_family() {
        let v = |id| ServiceValue { id, count: 1, ..Default::default() };
        let services = [
            (AnyServiceKey { addr: ip("fd00:0:0::0:a"), port: port_to_map(80), proto: 6, scope: 0 }, v(8)),
            (AnyServiceKey { addr: ip("10.96.0.10"), port: port_to_map(80), proto: 6, scope: 0 }, v(7)),
        ];
        let slots: HashMap<_, _> = [(SlotKey::new(7, 0, 0), 1), (SlotKey::new(8, 0, 0), 2)].into_iter().collect();
        let backends: HashMap<_, _> = [
            (1, AnyBackend { addr: ip("10.244.0.1"), port: port_to_map(8080), proto: 6, flags: 0 }),
            (2, AnyBackend { addr: ip("fd00:10::1"), port: port_to_map(8080), proto: 6, flags: 0 }),
        ]
        .into_iter()
        .collect();
        let metas: HashMap<_, _> = [(7, meta("web")), (8, meta("web"))].into_iter().collect();
        let rows = service_rows(&services, &slots, &backends, &metas);
        assert_eq!(rows.iter().map(|r| r.family).collect::<Vec<_>>(), vec![IpFamily::V4, IpFamily::V6]);
        let text = render_services(&rows);
        let v6 = text.lines().find(|l| l.starts_with('8')).unwrap();
        assert!(v6.contains("[fd00::a]:80/TCP") && v6.contains("[fd00:10::1]:8080"), "{v6}");
        let json = serde_json::to_value(&rows[1]).unwrap();
        assert_eq!((json["family"].as_str(), json["address"].as_str()), (Some("IPv6"), Some("fd00::a")));
        assert_eq!(json["backends"][0]["family"], "IPv6");
        let b = render_backends(&[backend_row(2, &backends[&2])]);
        assert!(b.contains("[fd00:10::1]:8080/TCP"), "{b}");
    }

    #[test]
    fn stats_rows_name_the_frontend_of_their_id() {
        let rows = [
            StatRow { service_id: None, frontend: None, family: Some("IPv4"), verdict: "pass", packets: 3, bytes: 180 },
            StatRow {
                service_id: Some(8),
                frontend: Some("[fd00::a]:80/TCP".into()),
                family: Some(IpFamily::V6.name()),
                verdict: "new_flow",
                packets: 1,
                bytes: 80,
            },
        ];
        let text = render_stats(&rows);
        let mut lines = text.lines().skip(1);
        let node: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(node, ["node", "pass", "IPv4", "3", "180", "-"], "node rows say their family");
        assert!(lines.next().unwrap().ends_with("[fd00::a]:80/TCP"));
        assert_eq!(serde_json::to_value(&rows[1]).unwrap()["family"], "IPv6");
    }

    #[test]
    fn ipv6_conntrack_rows() {
        use crate::dataplane::maps::addr::ip6_to_map;
        let a = |s: &str| ip6_to_map(s.parse().unwrap());
        let k = CtKey {
            src_addr: a("fd00:20::5"),
            dst_addr: a("fd00::a"),
            src_port: port_to_map(40000),
            dst_port: port_to_map(80),
            proto: 6,
            dir: proxy_common::CT_DIR_FORWARD,
            _pad: 0,
        };
        let v = CtValue { nat_addr: a("fd00:10::1"), nat_port: port_to_map(8080), ..Default::default() };
        let row = conntrack_row(crate::dataplane::maps::ct::Table::Unassured, &k, &v, 0);
        assert_eq!((row.family, row.source.as_str()), ("IPv6", "[fd00:20::5]:40000"));
        assert_eq!((row.destination.as_str(), row.nat.as_str()), ("[fd00::a]:80", "[fd00:10::1]:8080"));
        assert_eq!((row.state, row.label, row.assured, row.table), ("new", "SYN_SENT", false, "CT_NEW6"));
    }

    /// netfilter's labels and the assured marker, in the table and in JSON.
    #[test]
    fn conntrack_rows_carry_netfilter_labels_and_the_assured_marker() {
        use crate::dataplane::maps::ct::Table;
        let k = CtKey {
            src_addr: u32::from_ne_bytes([10, 0, 0, 5]),
            dst_addr: u32::from_ne_bytes([10, 96, 0, 10]),
            src_port: port_to_map(40000),
            dst_port: port_to_map(53),
            proto: proxy_common::PROTO_UDP,
            dir: proxy_common::CT_DIR_FORWARD,
            _pad: 0,
        };
        let v =
            CtValue { nat_addr: u32::from_ne_bytes([10, 0, 1, 2]), nat_port: port_to_map(53), ..Default::default() };
        let replied = conntrack_row(Table::Unassured, &k, &CtValue { flags: ct_flags::SEEN_REPLY, ..v }, 0);
        let stream = ct_flags::SEEN_REPLY | ct_flags::ASSURED;
        let assured = conntrack_row(Table::Assured, &k, &CtValue { flags: stream, ..v }, 0);
        let tcp = CtKey { proto: proxy_common::PROTO_TCP, ..k };
        let syn_recv = conntrack_row(Table::Unassured, &tcp, &CtValue { flags: ct_flags::SEEN_REPLY, ..v }, 0);
        let established = conntrack_row(Table::Assured, &tcp, &CtValue { flags: stream, ..v }, 0);
        let rows = [replied, assured, syn_recv, established];
        let text = render_conntrack(&rows);
        let cols: Vec<Vec<&str>> = text.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
        let state_assured: Vec<(&str, &str)> = cols.iter().map(|c| (c[7], c[8])).collect();
        assert_eq!(
            state_assured,
            [("REPLIED", "-"), ("ASSURED", "[ASSURED]"), ("SYN_RECV", "-"), ("ESTABLISHED", "[ASSURED]")]
        );
        let json = serde_json::to_value(&rows[3]).unwrap();
        assert_eq!(json["state"], "established");
        assert_eq!(json["label"], "ESTABLISHED");
        assert_eq!(json["assured"], true);
        assert_eq!(json["table"], "CONNTRACK");
        assert_eq!(serde_json::to_value(&rows[2]).unwrap()["table"], "CT_NEW");
    }

    fn svc(
        id: u32,
        ns: &str,
        name: &str,
        addr: &str,
        port: u16,
        proto: &str,
        backends: &[(u32, &str, u16)],
    ) -> ServiceRow {
        ServiceRow {
            id,
            family: IpFamily::of(ip(addr)),
            address: ip(addr),
            port,
            protocol: proto.into(),
            scope: "internal",
            kind: "ClusterIP".into(),
            namespace: ns.into(),
            name: name.into(),
            port_name: "main".into(),
            flags: vec![],
            affinity_timeout: None,
            algorithm: "random",
            maglev_table_size: None,
            backends: backends
                .iter()
                .map(|(id, a, p)| BackendRow {
                    id: *id,
                    family: IpFamily::of(ip(a)),
                    address: ip(a),
                    port: *p,
                    protocol: proto.into(),
                    local: false,
                    terminating: false,
                    services: vec![],
                })
                .collect(),
        }
    }

    fn three_services() -> Vec<ServiceRow> {
        vec![
            svc(1, "default", "web", "10.96.0.10", 80, "TCP", &[(11, "10.244.0.1", 8080), (12, "10.244.0.2", 8080)]),
            svc(2, "default", "dns", "10.96.0.11", 53, "UDP", &[(13, "10.244.0.3", 53)]),
            svc(3, "kube-system", "dns", "fd00::b", 53, "UDP", &[(14, "fd00:10::4", 53)]),
        ]
    }

    fn ids<T>(rows: &[T], id: impl Fn(&T) -> u32) -> Vec<u32> {
        rows.iter().map(id).collect()
    }

    /// Each filter alone, and combined (ANDed); nothing matching gives no rows.
    #[test]
    fn service_filters_select_exactly_the_matching_frontends() {
        let f = |set: &dyn Fn(&mut FilterArgs)| {
            let mut f = FilterArgs::default();
            set(&mut f);
            ids(&filter_services(three_services(), &f), |r| r.id)
        };
        assert_eq!(f(&|_| {}), [1, 2, 3]);
        assert_eq!(f(&|f| f.namespace = Some("default".into())), [1, 2]);
        assert_eq!(f(&|f| f.service = Some("dns".into())), [2, 3]);
        assert_eq!(f(&|f| f.service = Some("kube-system/dns".into())), [3]);
        assert_eq!(
            f(&|f| {
                f.namespace = Some("default".into());
                f.service = Some("dns".into())
            }),
            [2]
        );
        assert_eq!(f(&|f| f.address = Some(ip("fd00::b"))), [3]);
        assert_eq!(f(&|f| f.port = Some(53)), [2, 3]);
        assert_eq!(f(&|f| f.proto = Some(Protocol::Tcp)), [1]);
        assert_eq!(f(&|f| f.namespace = Some("nope".into())), [] as [u32; 0]);
        assert_eq!(f(&|f| f.service = Some("default/web".into())), [1]);
        let mut by_ns = FilterArgs { namespace: Some("default".into()), ..Default::default() };
        let services = three_services();
        assert_eq!(selected_service_ids(&services, &by_ns), Some([1, 2].into_iter().collect()));
        by_ns.namespace = None;
        assert_eq!(selected_service_ids(&services, &by_ns), None);
    }

    #[test]
    fn backend_filters_follow_their_services() {
        let services = three_services();
        let all: Vec<BackendRow> = services.iter().flat_map(|s| s.backends.iter().cloned()).collect();
        let f = |filter: FilterArgs| ids(&filter_backends(all.clone(), &services, &filter), |b| b.id);
        assert_eq!(f(FilterArgs::default()), [11, 12, 13, 14]);
        assert_eq!(f(FilterArgs { service: Some("default/web".into()), ..Default::default() }), [11, 12]);
        assert_eq!(f(FilterArgs { namespace: Some("kube-system".into()), ..Default::default() }), [14]);
        assert_eq!(f(FilterArgs { address: Some(ip("10.244.0.2")), ..Default::default() }), [12]);
        assert_eq!(f(FilterArgs { port: Some(53), proto: Some(Protocol::Udp), ..Default::default() }), [13, 14]);
        assert_eq!(f(FilterArgs { service: Some("web".into()), port: Some(53), ..Default::default() }), [] as [u32; 0]);
    }

    #[test]
    fn conntrack_filters_match_either_side_and_the_service() {
        let k = CtKey {
            src_addr: u32::from_ne_bytes([10, 0, 0, 5]),
            dst_addr: u32::from_ne_bytes([10, 96, 0, 10]),
            src_port: port_to_map(40000),
            dst_port: port_to_map(80),
            proto: proxy_common::PROTO_TCP,
            dir: proxy_common::CT_DIR_FORWARD,
            _pad: 0,
        };
        let v = CtValue {
            nat_addr: u32::from_ne_bytes([10, 244, 0, 1]),
            nat_port: port_to_map(8080),
            svc_id: 1,
            ..Default::default()
        };
        let sel = |f: FilterArgs, ids: Option<HashSet<u32>>| conntrack_selected(&f, ids.as_ref(), &k, &v);
        assert!(sel(FilterArgs::default(), None));
        for a in ["10.0.0.5", "10.96.0.10", "10.244.0.1"] {
            assert!(sel(FilterArgs { address: Some(ip(a)), ..Default::default() }, None), "{a}");
        }
        assert!(!sel(FilterArgs { address: Some(ip("10.0.0.6")), ..Default::default() }, None));
        for p in [40000, 80, 8080] {
            assert!(sel(FilterArgs { port: Some(p), ..Default::default() }, None), "{p}");
        }
        assert!(!sel(FilterArgs { port: Some(443), ..Default::default() }, None));
        assert!(!sel(FilterArgs { proto: Some(Protocol::Udp), ..Default::default() }, None));
        assert!(sel(FilterArgs::default(), Some([1].into_iter().collect())));
        assert!(!sel(FilterArgs::default(), Some([2].into_iter().collect())));
    }

    fn out<T: Serialize>(rows: &[T], c: &Columns<T>, format: OutputFormat, no_headers: bool) -> String {
        let mut o = Vec::new();
        write_rows(&mut o, format, no_headers, rows, c).unwrap();
        String::from_utf8(o).unwrap()
    }

    /// table and wide have their column counts, --no-headers drops the header line only,
    /// JSON and YAML parse to the same rows, and no row prints nothing in a table.
    #[test]
    fn every_output_format() {
        let rows = three_services();
        let cols = |s: &str| s.lines().map(|l| l.split_whitespace().count()).collect::<Vec<_>>();
        let table = out(&rows, &SERVICE_COLUMNS, OutputFormat::Table, false);
        assert!(table.starts_with("ID "), "{table}");
        assert_eq!(cols(&table), [7, 7, 7, 7], "{table}");
        let wide = out(&rows, &SERVICE_COLUMNS, OutputFormat::Wide, false);
        assert!(
            wide.lines().next().unwrap().ends_with("FAMILY   AFFINITY-TIMEOUT   ALGORITHM   BACKEND-IDS"),
            "{wide}"
        );
        assert_eq!(cols(&wide), [11, 11, 11, 11], "{wide}");
        let first: Vec<&str> = wide.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(first[7..], ["IPv4", "-", "random", "11,12"], "{wide}");
        let bare = out(&rows, &SERVICE_COLUMNS, OutputFormat::Wide, true);
        fn words(s: &str) -> Vec<Vec<&str>> {
            s.lines().map(|l| l.split_whitespace().collect()).collect()
        }
        assert_eq!(words(&bare), words(&wide)[1..], "{bare}");
        let json: serde_json::Value =
            serde_json::from_str(&out(&rows, &SERVICE_COLUMNS, OutputFormat::Json, false)).unwrap();
        let yaml: serde_json::Value =
            serde_yaml::from_str(&out(&rows, &SERVICE_COLUMNS, OutputFormat::Yaml, false)).unwrap();
        assert_eq!(json, yaml);
        assert_eq!(json, serde_json::to_value(&rows).unwrap());
        assert_eq!(json[2]["backends"][0]["address"], "fd00:10::4");
        let none: Vec<ServiceRow> = vec![];
        assert_eq!(out(&none, &SERVICE_COLUMNS, OutputFormat::Table, false), "");
        assert_eq!(out(&none, &SERVICE_COLUMNS, OutputFormat::Json, false).trim(), "[]");
        assert_eq!(out(&none, &SERVICE_COLUMNS, OutputFormat::Yaml, false).trim(), "[]");
        // Backends list their Services in wide.
        let b = BackendRow { services: vec!["default/web".into()], ..rows[0].backends[0].clone() };
        let wide = out(std::slice::from_ref(&b), &BACKEND_COLUMNS, OutputFormat::Wide, false);
        assert_eq!(
            wide.lines().nth(1).unwrap().split_whitespace().collect::<Vec<_>>(),
            ["11", "10.244.0.1:8080/TCP", "-", "IPv4", "default/web"]
        );
    }
}
