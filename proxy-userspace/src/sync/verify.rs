//! Does the kernel hold what the API says? `verify` compares a desired state (the model's
//! translation of the objects) with what the pinned maps hold (a `Snapshot`), frontend by
//! frontend: missing, extra, or different (flags, affinity timeout, backends, source
//! ranges), one `Drift` each; then the Service CIDR entries (`SERVICE_CIDRS`, a prefix
//! each: the CIDR itself, or an allocated address inside it). Pure: the caller reads the maps and the objects. Used by
//! `ebpf-proxy verify` and by the agent's periodic check.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::SocketAddr,
};

use proxy_common::{ServiceValue, SlotKey, backend_flags, svc_flags};
use serde::Serialize;

use super::{
    BackendId, ServiceId, cidrs,
    plan::{backend_value, service_flags, service_key},
    store::{AnyBackend, AnyServiceKey, CidrEntry, Snapshot},
};
use crate::model::{DesiredState, IpPrefix};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DriftKind {
    /// Wanted, not in SERVICES.
    Missing,
    /// In SERVICES, not wanted.
    Extra,
    /// The flags differ (names of the flags on each side).
    Flags {
        want: Vec<&'static str>,
        have: Vec<&'static str>,
    },
    AffinityTimeout {
        want: u32,
        have: u32,
    },
    /// The backend sets differ (`addr:port` with `(local)` / `(terminating)` marks).
    Backends {
        missing: Vec<String>,
        extra: Vec<String>,
    },
    /// A slot of the active generation, or the backend it names, is not in the maps.
    BrokenSlot {
        index: u32,
        detail: String,
    },
    SourceRanges {
        missing: Vec<String>,
        extra: Vec<String>,
    },
    /// A `SERVICE_CIDRS` entry (the prefix is the drift's `frontend`) differs: what it
    /// should be and what it is (`CidrEntry::name`; `None`: absent).
    ServiceCidr {
        want: Option<&'static str>,
        have: Option<&'static str>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// `addr:port/PROTO scope`, as `ebpf-proxy services` prints it.
    pub frontend: String,
    /// `namespace/name:port` when known.
    pub service: String,
    #[serde(flatten)]
    pub kind: DriftKind,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            DriftKind::Missing => "missing from the maps".to_string(),
            DriftKind::Extra => "in the maps but not wanted".to_string(),
            DriftKind::Flags { want, have } => format!("flags {have:?}, want {want:?}"),
            DriftKind::AffinityTimeout { want, have } => format!("affinity timeout {have} s, want {want} s"),
            DriftKind::Backends { missing, extra } => format!("backends missing {missing:?}, extra {extra:?}"),
            DriftKind::BrokenSlot { index, detail } => format!("slot {index}: {detail}"),
            DriftKind::SourceRanges { missing, extra } => format!("source ranges missing {missing:?}, extra {extra:?}"),
            DriftKind::ServiceCidr { want, have } => {
                format!("Service CIDR entry {}, want {}", have.unwrap_or("absent"), want.unwrap_or("absent"))
            }
        };
        if self.service.is_empty() {
            write!(f, "{}: {what}", self.frontend)
        } else {
            write!(f, "{} ({}): {what}", self.frontend, self.service)
        }
    }
}

fn key_name(k: &AnyServiceKey) -> String {
    let proto = match k.proto {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        _ => "?",
    };
    let scope = if k.scope == proxy_common::SCOPE_EXTERNAL { "external" } else { "internal" };
    format!("{}/{proto} {scope}", SocketAddr::new(k.addr, u16::from_be(k.port)))
}

fn backend_name(b: &AnyBackend) -> String {
    let mut s = SocketAddr::new(b.addr, u16::from_be(b.port)).to_string();
    if b.flags & backend_flags::LOCAL != 0 {
        s.push_str(" (local)");
    }
    if b.flags & backend_flags::TERMINATING != 0 {
        s.push_str(" (terminating)");
    }
    s
}

fn diff<T: Ord + Clone>(want: &BTreeSet<T>, have: &BTreeSet<T>) -> (Vec<T>, Vec<T>) {
    (want.difference(have).cloned().collect(), have.difference(want).cloned().collect())
}

/// Every difference between `desired` and `snap`, in frontend order.
pub fn verify(desired: &DesiredState, snap: &Snapshot) -> Vec<Drift> {
    let services: HashMap<AnyServiceKey, ServiceValue> = snap.services.iter().copied().collect();
    let slots: HashMap<SlotKey, BackendId> = snap.slots.iter().copied().collect();
    let backends: HashMap<BackendId, AnyBackend> = snap.backends.iter().copied().collect();
    let mut ranges: HashMap<ServiceId, BTreeSet<IpPrefix>> = HashMap::new();
    for (id, p) in &snap.ranges {
        ranges.entry(*id).or_default().insert(*p);
    }
    let mut out = Vec::new();
    let mut wanted = BTreeSet::new();
    for (fk, entry) in &desired.frontends {
        let key = service_key(fk);
        wanted.insert(key);
        let drift = |kind| Drift { frontend: key_name(&key), service: entry.service.to_string(), kind };
        let Some(v) = services.get(&key) else {
            out.push(drift(DriftKind::Missing));
            continue;
        };
        let want_flags = service_flags(entry);
        if v.flags != want_flags {
            out.push(drift(DriftKind::Flags {
                want: svc_flags::names(want_flags).collect(),
                have: svc_flags::names(v.flags).collect(),
            }));
        }
        let want_timeout = entry.affinity_timeout.unwrap_or(0);
        if v.affinity_timeout != want_timeout {
            out.push(drift(DriftKind::AffinityTimeout { want: want_timeout, have: v.affinity_timeout }));
        }
        let want: BTreeSet<String> =
            entry.backends.iter().map(|b| backend_name(&backend_value(b, key.proto))).collect();
        let mut have = BTreeSet::new();
        for index in 0..v.count {
            let slot = SlotKey::new(v.id, v.generation, index);
            match slots.get(&slot).map(|id| (id, backends.get(id))) {
                Some((_, Some(b))) => {
                    have.insert(backend_name(b));
                }
                Some((id, None)) => out.push(drift(DriftKind::BrokenSlot {
                    index,
                    detail: format!("backend id {id} is not in the maps"),
                })),
                None => out.push(drift(DriftKind::BrokenSlot { index, detail: "no slot entry".into() })),
            }
        }
        let (missing, extra) = diff(&want, &have);
        if !missing.is_empty() || !extra.is_empty() {
            out.push(drift(DriftKind::Backends { missing, extra }));
        }
        let want_ranges: BTreeSet<IpPrefix> = entry.source_ranges.iter().copied().collect();
        let have_ranges = ranges.get(&ServiceId::new(v.id)).cloned().unwrap_or_default();
        let (missing, extra) = diff(&want_ranges, &have_ranges);
        if !missing.is_empty() || !extra.is_empty() {
            let s = |v: Vec<IpPrefix>| v.iter().map(|p| format!("{}/{}", p.addr, p.len)).collect();
            out.push(drift(DriftKind::SourceRanges { missing: s(missing), extra: s(extra) }));
        }
    }
    let mut extra: Vec<&AnyServiceKey> = services.keys().filter(|k| !wanted.contains(k)).collect();
    extra.sort();
    for k in extra {
        out.push(Drift { frontend: key_name(k), service: String::new(), kind: DriftKind::Extra });
    }
    out.extend(verify_cidrs(desired, snap));
    out
}

/// The Service CIDR entries that differ from what `desired` asks for, in prefix order.
fn verify_cidrs(desired: &DesiredState, snap: &Snapshot) -> Vec<Drift> {
    let want = cidrs::wanted(desired);
    let have: BTreeMap<IpPrefix, CidrEntry> = snap.service_cidrs.iter().copied().collect();
    let prefixes: BTreeSet<&IpPrefix> = want.keys().chain(have.keys()).collect();
    prefixes
        .into_iter()
        .filter_map(|p| {
            let (w, h) = (want.get(p).copied(), have.get(p).copied());
            (w != h).then(|| Drift {
                frontend: p.to_string(),
                service: String::new(),
                kind: DriftKind::ServiceCidr { want: w.map(CidrEntry::name), have: h.map(CidrEntry::name) },
            })
        })
        .collect()
}
