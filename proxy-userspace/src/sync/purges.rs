//! The purges at the end of a pass: the entries the datapath wrote itself (conntrack,
//! session affinity) that name a backend or a service the pass took away.
//!
//! UDP conntrack entries pointing at a removed backend or service go (kube-proxy does the
//! same, kube-proxy #48370: a UDP "flow" would otherwise stick to a dead pod forever); TCP
//! entries are left, so open connections finish. Session-affinity entries of a backend
//! that left its frontend go, or a pinned client's new connections would keep going to it
//! (kube-proxy's per-endpoint `recent` lists go with the endpoint's chain); so do all of a
//! frontend's entries when it is removed or its affinity turned off. Each purge is one
//! walk of its tables, and only when the pass has something for it.
use std::collections::HashSet;

use proxy_common::PROTO_UDP;
use tracing::warn;

use super::{
    ids::{BackendId, ServiceId},
    store::{CtFacts, MapStore, StoreResult},
};

/// (service id, backend id) pairs.
type PairSet = HashSet<(ServiceId, BackendId)>;

/// What the steps of a pass leave for the purges at its end.
#[derive(Debug, Default)]
pub(super) struct Purges {
    /// UDP (service, backend) pairs whose conntrack entries go.
    ct_pairs: PairSet,
    /// Removed UDP frontends: every conntrack entry of theirs goes.
    udp_services: HashSet<ServiceId>,
    /// Deleted UDP backends: every conntrack entry naming them goes.
    udp_backends: HashSet<BackendId>,
    /// (service, backend) pairs a frontend with session affinity dropped.
    affinity_pairs: PairSet,
    /// Services whose every affinity entry goes: removed, or their affinity turned off. An
    /// entry left behind names a backend by id under a service id; nothing may find it again.
    affinity_services: HashSet<ServiceId>,
}

/// How many entries the purges deleted.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Purged {
    pub(super) conntrack: usize,
    pub(super) affinity: usize,
}

impl Purges {
    /// Frontend `svc` no longer points at `backend` (of protocol `proto`; `affinity`: it
    /// had or has session affinity).
    pub(super) fn backend_dropped(&mut self, svc: ServiceId, backend: BackendId, proto: u8, affinity: bool) {
        if proto == PROTO_UDP {
            self.ct_pairs.insert((svc, backend));
        }
        if affinity {
            self.affinity_pairs.insert((svc, backend));
        }
    }

    /// Frontend `svc` is removed.
    pub(super) fn frontend_removed(&mut self, svc: ServiceId, proto: u8, affinity: bool) {
        if proto == PROTO_UDP {
            self.udp_services.insert(svc);
        }
        if affinity {
            self.affinity_services.insert(svc);
        }
    }

    /// Frontend `svc` turned its session affinity off.
    pub(super) fn affinity_off(&mut self, svc: ServiceId) {
        self.affinity_services.insert(svc);
    }

    /// Backend `id` (of protocol `proto`) is deleted. Only UDP entries are purged (TCP flows
    /// finish on their own), and the purge walks the whole conntrack table: a TCP backend
    /// leaving costs none.
    pub(super) fn backend_deleted(&mut self, id: BackendId, proto: u8) {
        if proto == PROTO_UDP {
            self.udp_backends.insert(id);
        }
    }

    /// Purge what was left for it. A failure is logged: the entries stay until they
    /// expire (or, for affinity, until the sweep of the next start).
    pub(super) fn run(&self, store: &mut impl MapStore) -> Purged {
        let mut purged = Purged::default();
        if !self.ct_pairs.is_empty() || !self.udp_services.is_empty() || !self.udp_backends.is_empty() {
            let pred = |f: CtFacts| {
                f.proto == PROTO_UDP
                    && (self.udp_services.contains(&f.svc_id)
                        || self.ct_pairs.contains(&(f.svc_id, f.backend_id))
                        || self.udp_backends.contains(&f.backend_id))
            };
            match store.purge_conntrack(&pred) {
                Ok(n) => purged.conntrack = n,
                Err(e) => warn!(error = %e, "cannot purge UDP conntrack entries"),
            }
        }
        if !self.affinity_pairs.is_empty() || !self.affinity_services.is_empty() {
            let pred =
                |svc, backend| self.affinity_services.contains(&svc) || self.affinity_pairs.contains(&(svc, backend));
            match store.purge_affinity(&pred) {
                Ok(n) => purged.affinity = n,
                Err(e) => warn!(error = %e, "cannot purge session-affinity entries"),
            }
        }
        purged
    }
}

/// Delete the affinity entries of service ids not in `live` (the frontends with session
/// affinity): what a frontend removed while no agent ran, an agent that did not purge yet,
/// or a packet that raced a removal left. With the persisted id marks no new frontend takes
/// their id; this takes them out of the LRU at once.
pub(super) fn sweep_affinity(store: &mut impl MapStore, live: &HashSet<ServiceId>) -> StoreResult<usize> {
    store.purge_affinity(&|svc, _| !live.contains(&svc))
}
