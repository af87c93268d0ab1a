//! The plan of a pass: the desired state in map terms (keys, backend values, flags,
//! metadata; a frontend's `Target`), and which frontends a pass writes and which it
//! removes (`plan`). Pure: nothing here reads or writes a map.
use std::collections::{BTreeSet, HashSet};

use proxy_common::{ServiceMeta, ServiceValue, backend_flags, port_from_map, port_to_map, svc_flags};

use super::{
    ids::{BackendId, ServiceId},
    mirror::Mirror,
    store::{AnyBackend, AnyServiceKey},
};
use crate::model::{
    BackendAddr, DesiredState, FrontendEntry, FrontendKey, FrontendKind, IpPrefix, LbAlgorithm, Protocol, Scope, maglev,
};

/// Which frontends a pass looks at.
pub(super) enum SyncScope<'a> {
    /// Every desired frontend and every programmed one.
    All,
    /// Only these (plus the ones that failed last time).
    Keys(&'a BTreeSet<FrontendKey>),
}

/// What a pass writes and what it removes.
pub(super) struct Plan<'a> {
    /// Desired frontends to write, in key order, so ids are handed out in the same order
    /// whatever the scope.
    pub(super) wanted: Vec<(&'a FrontendKey, &'a FrontendEntry)>,
    /// Programmed frontends no longer desired.
    pub(super) stale: Vec<AnyServiceKey>,
}

/// The frontends of `scope` (and those in `retry`, which failed last time) against what
/// `mirror` holds.
pub(super) fn plan<'a>(
    desired: &'a DesiredState,
    scope: SyncScope,
    retry: &BTreeSet<FrontendKey>,
    mirror: &Mirror,
) -> Plan<'a> {
    match scope {
        SyncScope::All => {
            let keys: HashSet<AnyServiceKey> = desired.frontends.keys().map(service_key).collect();
            let stale = mirror.frontends.keys().filter(|k| !keys.contains(k)).copied().collect();
            Plan { wanted: desired.frontends.iter().map(|(k, e)| (k, &**e)).collect(), stale }
        }
        SyncScope::Keys(changed) => {
            let mut wanted = Vec::new();
            let mut stale = Vec::new();
            for fk in changed.iter().chain(retry.iter().filter(|k| !changed.contains(k))) {
                match desired.frontends.get_key_value(fk) {
                    Some((k, e)) => wanted.push((k, &**e)),
                    None if mirror.frontends.contains_key(&service_key(fk)) => stale.push(service_key(fk)),
                    None => {}
                }
            }
            wanted.sort_by_key(|(k, _)| **k);
            Plan { wanted, stale }
        }
    }
}

/// What one frontend should hold in the maps (what `Syncer::write_frontend` writes).
#[derive(Clone, Debug)]
pub(super) struct Target {
    /// Its backends' ids, in slot order.
    pub(super) backends: Vec<BackendId>,
    /// Its Maglev table (slot -> backend id); empty for random selection (or no backends).
    pub(super) maglev: Vec<BackendId>,
    pub(super) flags: u32,
    pub(super) affinity_timeout: u32,
    pub(super) meta: ServiceMeta,
    pub(super) ranges: BTreeSet<IpPrefix>,
}

impl Target {
    /// `entry` in `scope` with its backends under `backends` (their ids, in its order);
    /// a Maglev one (`LbAlgorithm::for_frontend`) gets its table of `cfg.table_size` slots,
    /// built here.
    pub(super) fn new(entry: &FrontendEntry, scope: Scope, backends: Vec<BackendId>, cfg: &MaglevConfig) -> Self {
        let algorithm = LbAlgorithm::for_frontend(entry.lb_algorithm, entry.kind, scope, cfg.north_south);
        let mut flags = service_flags(entry);
        let mut maglev = Vec::new();
        if algorithm == LbAlgorithm::Maglev {
            flags |= svc_flags::MAGLEV;
            maglev = maglev_table(entry, &backends, cfg.table_size);
        }
        Target {
            backends,
            maglev,
            flags,
            affinity_timeout: entry.affinity_timeout.unwrap_or(0),
            meta: service_meta(entry),
            ranges: entry.source_ranges.iter().copied().collect(),
        }
    }

    /// The `SERVICES` value that publishes it under `id`, from slot generation `generation`.
    pub(super) fn value(&self, id: ServiceId, generation: u32) -> ServiceValue {
        ServiceValue {
            id: id.get(),
            count: self.backends.len() as u32,
            flags: self.flags,
            generation,
            affinity_timeout: self.affinity_timeout,
            maglev_size: self.maglev.len() as u32,
            // Where the table lives is the store's business: the kernel maps fill it in
            // (`dataplane::maps::maglev`).
            maglev_base: 0,
        }
    }
}

/// How the sync builds Maglev tables, and which frontends get one without an annotation
/// (`--maglev-table-size`, `--lb-algorithm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevConfig {
    /// A prime (`model::maglev::check_table_size`).
    pub table_size: u32,
    /// The algorithm of north-south frontends whose Service has no annotation.
    pub north_south: LbAlgorithm,
}

impl Default for MaglevConfig {
    fn default() -> Self {
        MaglevConfig { table_size: maglev::DEFAULT_TABLE_SIZE, north_south: LbAlgorithm::Random }
    }
}

/// The Maglev table of `entry` whose backends got `ids` (same order): slot -> backend id.
/// Built from the backends' addresses, ports and weights (endpoints each stands for), so
/// every node builds the same one whatever ids it gave them.
pub(super) fn maglev_table(entry: &FrontendEntry, ids: &[BackendId], size: u32) -> Vec<BackendId> {
    let backends: Vec<maglev::MaglevBackend> = entry
        .backends
        .iter()
        .map(|b| maglev::MaglevBackend { addr: b.addr, port: b.port, weight: entry.weight_of(b) })
        .collect();
    maglev::build_table(&backends, size).into_iter().map(|i| ids[i as usize]).collect()
}

pub(super) fn service_key(k: &FrontendKey) -> AnyServiceKey {
    AnyServiceKey { addr: k.addr, port: port_to_map(k.port), proto: k.proto.number(), scope: k.scope.number() }
}

pub(super) fn frontend_key(k: &AnyServiceKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        addr: k.addr,
        port: port_from_map(k.port),
        proto: Protocol::from_number(k.proto)?,
        scope: Scope::from_number(k.scope)?,
    })
}

pub(super) fn backend_value(b: &BackendAddr, proto: u8) -> AnyBackend {
    let mut flags = 0;
    if b.local {
        flags |= backend_flags::LOCAL;
    }
    if b.terminating {
        flags |= backend_flags::TERMINATING;
    }
    AnyBackend { addr: b.addr, port: port_to_map(b.port), proto, flags }
}

fn copy_str(dst: &mut [u8], s: &str) {
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

pub fn service_meta(e: &FrontendEntry) -> ServiceMeta {
    let mut m = ServiceMeta {
        namespace: [0; proxy_common::META_NAMESPACE_LEN],
        name: [0; proxy_common::META_NAME_LEN],
        port_name: [0; proxy_common::META_PORT_NAME_LEN],
        kind: e.kind.number(),
        _pad: [0; 7],
    };
    copy_str(&mut m.namespace, e.service.namespace());
    copy_str(&mut m.name, e.service.name());
    copy_str(&mut m.port_name, &e.service.port_name);
    m
}

pub(super) fn service_flags(e: &FrontendEntry) -> u32 {
    let mut f = 0;
    if e.affinity_timeout.is_some() {
        f |= svc_flags::AFFINITY;
    }
    if !e.source_ranges.is_empty() {
        f |= svc_flags::SOURCE_RANGES;
    }
    if e.local_only {
        f |= svc_flags::LOCAL_ONLY;
    }
    f |= match e.kind {
        FrontendKind::ClusterIP => 0,
        FrontendKind::NodePort => svc_flags::NODEPORT,
        FrontendKind::ExternalIP => svc_flags::EXTERNAL_IP,
        FrontendKind::LoadBalancer => svc_flags::LOADBALANCER,
    };
    f
}
