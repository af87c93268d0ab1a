//! The Service CIDR entries (`SERVICE_CIDRS`, `SERVICE_CIDRS6`): each Service CIDR, and a
//! host entry for every frontend address inside one, so that the datapath's longest-prefix
//! match tells an unallocated address (only a CIDR matches: new flows refused) from an
//! allocated one. Written after the frontends of a pass (a new frontend's `SERVICES` entry
//! exists before its host entry, and a removed one's is gone before its host entry goes, so
//! no moment refuses a live frontend); each entry only when it differs from the mirror.
//!
//! The wanted set is recomputed from the desired frontends on every pass that has CIDRs:
//! a walk of the frontend keys (no CIDRs: nothing walked).
use std::collections::BTreeMap;

use tracing::warn;

use super::store::{CidrEntry, MapStore, Snapshot};
use crate::model::{DesiredState, FrontendKind, IpFamily, IpPrefix};

/// What the maps hold (read back at start, then as written).
#[derive(Default)]
pub(super) struct CidrEntries {
    written: BTreeMap<IpPrefix, CidrEntry>,
}

/// The entries `desired` asks for.
pub(super) fn wanted(desired: &DesiredState) -> BTreeMap<IpPrefix, CidrEntry> {
    let mut out: BTreeMap<IpPrefix, CidrEntry> = desired.service_cidrs.iter().map(|p| (*p, CidrEntry::Cidr)).collect();
    if desired.service_cidrs.is_empty() {
        return out;
    }
    for (k, e) in &desired.frontends {
        if !desired.service_cidrs.iter().any(|c| c.contains(k.addr)) {
            continue;
        }
        let len = match IpFamily::of(k.addr) {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        };
        // A host-length Service CIDR that is itself a frontend address is allocated too. An
        // address with a ClusterIP frontend is a ClusterIP, whatever else it carries.
        let entry = if e.kind == FrontendKind::ClusterIP { CidrEntry::ClusterIp } else { CidrEntry::Allocated };
        let slot = out.entry(IpPrefix { addr: k.addr, len }).or_insert(entry);
        if *slot == CidrEntry::Cidr || entry == CidrEntry::ClusterIp {
            *slot = entry;
        }
    }
    out
}

impl CidrEntries {
    pub(super) fn read_back(snap: &Snapshot) -> Self {
        CidrEntries { written: snap.service_cidrs.iter().copied().collect() }
    }

    /// Write what differs; returns the writes issued. A failed write is logged and retried
    /// by the next pass (the mirror keeps what the map holds).
    pub(super) fn write(&mut self, store: &mut impl MapStore, desired: &DesiredState) -> u64 {
        let wanted = wanted(desired);
        let mut writes = 0;
        // Additions first (host entries and CIDRs), removals after.
        for (p, e) in &wanted {
            if self.written.get(p) == Some(e) {
                continue;
            }
            writes += 1;
            match store.put_service_cidr(*p, *e) {
                Ok(()) => {
                    self.written.insert(*p, *e);
                }
                Err(err) => warn!(prefix = %p, error = %err, "cannot write a Service CIDR entry; will retry"),
            }
        }
        let stale: Vec<IpPrefix> = self.written.keys().filter(|p| !wanted.contains_key(p)).copied().collect();
        for p in stale {
            writes += 1;
            match store.del_service_cidr(p) {
                Ok(()) => {
                    self.written.remove(&p);
                }
                Err(err) => warn!(prefix = %p, error = %err, "cannot delete a Service CIDR entry; will retry"),
            }
        }
        writes
    }
}
