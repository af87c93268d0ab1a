//! The Service CIDR entries (`SERVICE_CIDRS`, `SERVICE_CIDRS6`): each Service CIDR, and a
//! host entry for every frontend address inside one, so that the datapath's longest-prefix
//! match tells an unallocated address (only a CIDR matches: new flows refused) from an
//! allocated one. Written after the frontends of a pass (a new frontend's `SERVICES` entry
//! exists before its host entry, and a removed one's is gone before its host entry goes, so
//! no moment refuses a live frontend); each entry only when it differs from the mirror.
//!
//! A full pass (start-up, relist) and a pass whose Service CIDRs changed recompute the whole
//! wanted set from the desired frontends: a walk of the frontend keys (no CIDRs: nothing
//! walked). An incremental pass looks only at the addresses of the frontends it changed:
//! the host entry of an address depends on the frontends at that address alone, so its
//! cost follows the change, as the frontends' own writes do.
use std::collections::{BTreeMap, BTreeSet};

use tracing::warn;

use super::store::{CidrEntry, MapStore, Snapshot};
use crate::model::{DesiredState, FrontendKey, FrontendKind, IpFamily, IpPrefix, Protocol, Scope};

/// What the maps hold (read back at start, then as written).
#[derive(Default)]
pub(super) struct CidrEntries {
    written: BTreeMap<IpPrefix, CidrEntry>,
    /// The Service CIDRs the last whole recompute wrote; `None`: none yet, or a write failed
    /// since (the next pass recomputes everything, which retries it).
    cidrs: Option<BTreeSet<IpPrefix>>,
}

/// The host prefix of a frontend address.
fn host(addr: std::net::IpAddr) -> IpPrefix {
    let len = match IpFamily::of(addr) {
        IpFamily::V4 => 32,
        IpFamily::V6 => 128,
    };
    IpPrefix { addr, len }
}

/// The entry a frontend of `kind` asks for at its address: an address with a ClusterIP
/// frontend is a ClusterIP, whatever else it carries.
fn entry_of(kind: FrontendKind) -> CidrEntry {
    if kind == FrontendKind::ClusterIP { CidrEntry::ClusterIp } else { CidrEntry::Allocated }
}

/// `a` and `b` asked of one address: ClusterIP over allocated over a bare CIDR.
fn stronger(a: CidrEntry, b: CidrEntry) -> CidrEntry {
    if a == CidrEntry::ClusterIp || b == CidrEntry::Cidr { a } else { b }
}

/// What `wanted` holds for the host prefix of `addr` (inside a Service CIDR), from the
/// frontends at that address only (the keys sort by address first).
fn wanted_at(desired: &DesiredState, addr: std::net::IpAddr) -> Option<CidrEntry> {
    let first = FrontendKey { addr, port: 0, proto: Protocol::Tcp, scope: Scope::Internal };
    let bare = desired.service_cidrs.contains(&host(addr)).then_some(CidrEntry::Cidr);
    desired
        .frontends
        .range(first..)
        .take_while(|(k, _)| k.addr == addr)
        .map(|(_, e)| entry_of(e.kind))
        .fold(bare, |acc, e| Some(acc.map_or(e, |a| stronger(e, a))))
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
        // A host-length Service CIDR that is itself a frontend address is allocated too.
        let entry = entry_of(e.kind);
        let slot = out.entry(host(k.addr)).or_insert(entry);
        *slot = stronger(entry, *slot);
    }
    out
}

impl CidrEntries {
    pub(super) fn read_back(snap: &Snapshot) -> Self {
        CidrEntries { written: snap.service_cidrs.iter().copied().collect(), cidrs: None }
    }

    /// Write what differs; returns the writes issued. `changed`: the frontends an
    /// incremental pass changed (`None`: a full pass). A failed write is logged and retried
    /// by the next pass (the mirror keeps what the map holds).
    pub(super) fn write(
        &mut self,
        store: &mut impl MapStore,
        desired: &DesiredState,
        changed: Option<&BTreeSet<FrontendKey>>,
    ) -> u64 {
        match changed {
            Some(keys) if self.cidrs.as_ref() == Some(&desired.service_cidrs) => {
                self.write_addresses(store, desired, keys)
            }
            _ => {
                let writes = self.write_all(store, desired);
                self.cidrs = Some(desired.service_cidrs.clone());
                writes
            }
        }
    }

    /// The host entries of the changed frontends' addresses (inside a Service CIDR).
    fn write_addresses(
        &mut self,
        store: &mut impl MapStore,
        desired: &DesiredState,
        changed: &BTreeSet<FrontendKey>,
    ) -> u64 {
        let addrs: BTreeSet<std::net::IpAddr> =
            changed.iter().map(|k| k.addr).filter(|a| desired.service_cidrs.iter().any(|c| c.contains(*a))).collect();
        let mut writes = 0;
        for addr in addrs {
            let p = host(addr);
            match wanted_at(desired, addr) {
                Some(e) if self.written.get(&p) != Some(&e) => writes += self.put(store, p, e),
                None if self.written.contains_key(&p) => writes += self.del(store, p),
                _ => {}
            }
        }
        writes
    }

    fn write_all(&mut self, store: &mut impl MapStore, desired: &DesiredState) -> u64 {
        let wanted = wanted(desired);
        let mut writes = 0;
        // Additions first (host entries and CIDRs), removals after.
        for (p, e) in &wanted {
            if self.written.get(p) != Some(e) {
                writes += self.put(store, *p, *e);
            }
        }
        let stale: Vec<IpPrefix> = self.written.keys().filter(|p| !wanted.contains_key(p)).copied().collect();
        for p in stale {
            writes += self.del(store, p);
        }
        writes
    }

    /// One write; a failure leaves the mirror as the map is and makes the next pass a whole
    /// recompute, which retries it.
    fn put(&mut self, store: &mut impl MapStore, p: IpPrefix, e: CidrEntry) -> u64 {
        match store.put_service_cidr(p, e) {
            Ok(()) => {
                self.written.insert(p, e);
            }
            Err(err) => {
                warn!(prefix = %p, error = %err, "cannot write a Service CIDR entry; will retry");
                self.cidrs = None;
            }
        }
        1
    }

    fn del(&mut self, store: &mut impl MapStore, p: IpPrefix) -> u64 {
        match store.del_service_cidr(p) {
            Ok(()) => {
                self.written.remove(&p);
            }
            Err(err) => {
                warn!(prefix = %p, error = %err, "cannot delete a Service CIDR entry; will retry");
                self.cidrs = None;
            }
        }
        1
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::super::{
        MemStore, Syncer,
        tests::{desired, fe, fk},
    };
    use super::*;
    use crate::model::Protocol;

    fn p(s: &str) -> IpPrefix {
        s.parse().expect("prefix")
    }

    fn with_cidrs(mut d: DesiredState, cidrs: &[&str]) -> DesiredState {
        d.service_cidrs = cidrs.iter().map(|c| p(c)).collect::<BTreeSet<_>>();
        d
    }

    /// The CIDRs of both families, a host entry for each frontend address inside them
    /// (ClusterIP or not), none for one outside; written after the frontends; a restart
    /// writes nothing; a CIDR removed takes the host entries inside it along.
    #[test]
    fn cidrs_and_allocated_addresses_follow_the_desired_state() {
        let mut outside = fe("out", &[1]);
        outside.kind = FrontendKind::ExternalIP;
        let mut lb = fe("lb", &[1]);
        lb.kind = FrontendKind::LoadBalancer;
        let mut lb_key = fk(30, 80, Protocol::Tcp);
        lb_key.addr = "10.96.7.7".parse().unwrap();
        let mut out_key = fk(40, 80, Protocol::Tcp);
        out_key.addr = "192.0.2.40".parse().unwrap();
        let d = with_cidrs(
            desired(vec![
                (fk(1, 80, Protocol::Tcp), fe("a", &[1])),
                (fk(1, 53, Protocol::Udp), fe("a", &[1])),
                (lb_key, lb),
                (out_key, outside),
            ]),
            &["10.96.0.0/16", "fd00:10:96::/112"],
        );
        let mut s = Syncer::new(MemStore::default()).unwrap();
        let r = s.apply(&d);
        let want: BTreeMap<IpPrefix, CidrEntry> = [
            (p("10.96.0.0/16"), CidrEntry::Cidr),
            (p("fd00:10:96::/112"), CidrEntry::Cidr),
            (p("10.96.0.1/32"), CidrEntry::ClusterIp),
            (p("10.96.7.7/32"), CidrEntry::Allocated),
        ]
        .into();
        assert_eq!(s.store().service_cidrs, want);
        let log = &s.store().log;
        let last_service = log.iter().rposition(|l| l.starts_with("put_service ")).unwrap();
        let first_cidr = log.iter().position(|l| l.starts_with("put_service_cidr")).unwrap();
        assert!(last_service < first_cidr, "frontends first: {log:?}");
        assert_eq!(r.writes as usize, log.len());

        // Restarted on the same maps: nothing to write.
        let mut again = Syncer::new(s.store().clone()).unwrap();
        assert_eq!(again.apply(&d).writes, 0);

        // The IPv4 CIDR removed: it and its host entries go; the IPv6 one stays.
        let d2 = with_cidrs(d.clone(), &["fd00:10:96::/112"]);
        let r = again.apply(&d2);
        assert_eq!(r.writes, 3);
        assert_eq!(again.store().service_cidrs.keys().copied().collect::<Vec<_>>(), vec![p("fd00:10:96::/112")]);
    }

    /// A Service removed takes its host entry with it (its address becomes unallocated),
    /// after its SERVICES entry is gone; no CIDRs at all cost no walk and no write.
    #[test]
    fn a_removed_clusterip_becomes_unallocated() {
        let d = with_cidrs(desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1]))]), &["10.96.0.0/16"]);
        let mut s = Syncer::new(MemStore::default()).unwrap();
        s.apply(&d);
        s.store_mut().log.clear();
        s.apply(&with_cidrs(desired(vec![]), &["10.96.0.0/16"]));
        let log = &s.store().log;
        let del_svc = log.iter().position(|l| l.starts_with("del_service ")).unwrap();
        let del_host = log.iter().position(|l| l == "del_service_cidr 10.96.0.1/32").unwrap();
        assert!(del_svc < del_host, "{log:?}");
        assert_eq!(s.store().service_cidrs.len(), 1);
        assert!(wanted(&desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1]))])).is_empty());
    }

    /// Incremental passes (`apply_changes`) touch only the host entries of the changed
    /// frontends' addresses and leave the maps as a full pass would: an address gaining an
    /// ExternalIP beside its ClusterIP stays a ClusterIP, loses the ClusterIP (allocated),
    /// loses everything (gone; a host-length CIDR on it goes back to a bare CIDR entry);
    /// an unrelated frontend's entry is never written again.
    #[test]
    fn incremental_passes_write_only_the_changed_addresses() {
        let cidrs = ["10.96.0.0/16", "10.96.0.3/32"];
        let mut ext = fe("x", &[1]);
        ext.kind = FrontendKind::ExternalIP;
        let (a, other) = ((fk(3, 80, Protocol::Tcp), fe("a", &[1])), (fk(9, 80, Protocol::Tcp), fe("b", &[1])));
        let ext_key = fk(3, 443, Protocol::Tcp);
        let mut s = Syncer::new(MemStore::default()).unwrap();
        let d0 = with_cidrs(desired(vec![other.clone()]), &cidrs);
        s.apply(&d0);
        let steps: Vec<(DesiredState, Vec<FrontendKey>, Option<CidrEntry>)> = vec![
            (with_cidrs(desired(vec![other.clone(), a.clone()]), &cidrs), vec![a.0], Some(CidrEntry::ClusterIp)),
            (
                with_cidrs(desired(vec![other.clone(), a.clone(), (ext_key, ext.clone())]), &cidrs),
                vec![ext_key],
                Some(CidrEntry::ClusterIp),
            ),
            (
                with_cidrs(desired(vec![other.clone(), (ext_key, ext.clone())]), &cidrs),
                vec![a.0],
                Some(CidrEntry::Allocated),
            ),
            (with_cidrs(desired(vec![other.clone()]), &cidrs), vec![ext_key], Some(CidrEntry::Cidr)),
        ];
        for (i, (d, keys, at_3)) in steps.into_iter().enumerate() {
            s.store_mut().log.clear();
            s.apply_changes(&d, &keys.into_iter().collect());
            assert_eq!(s.store().service_cidrs, wanted(&d), "step {i}: as a full pass would leave them");
            assert_eq!(s.store().service_cidrs.get(&p("10.96.0.3/32")), at_3.as_ref(), "step {i}");
            let cidr_writes: Vec<&String> = s.store().log.iter().filter(|l| l.contains("service_cidr")).collect();
            assert!(
                cidr_writes.iter().all(|l| l.split(' ').nth(1) == Some("10.96.0.3/32")),
                "step {i}: {cidr_writes:?}"
            );
        }
    }

    /// `verify` reads the Service CIDR entries too: none after a sync, and each tampering
    /// named by its prefix (an entry gone, one changed, one extra).
    #[test]
    fn verify_names_each_service_cidr_entry_that_differs() {
        use crate::sync::verify::{DriftKind, verify};
        let d = with_cidrs(desired(vec![(fk(1, 80, Protocol::Tcp), fe("a", &[1]))]), &["10.96.0.0/16"]);
        let mut s = Syncer::new(MemStore::default()).unwrap();
        s.apply(&d);
        assert_eq!(verify(&d, &s.store().snapshot().unwrap()), vec![]);
        let cidrs = &mut s.store_mut().service_cidrs;
        cidrs.remove(&p("10.96.0.0/16"));
        cidrs.insert(p("10.96.0.1/32"), CidrEntry::Allocated);
        cidrs.insert(p("10.96.9.9/32"), CidrEntry::ClusterIp);
        let drift = verify(&d, &s.store().snapshot().unwrap());
        let got: Vec<(String, &DriftKind)> = drift.iter().map(|d| (d.frontend.clone(), &d.kind)).collect();
        let k = |want, have| DriftKind::ServiceCidr { want, have };
        assert_eq!(
            got,
            vec![
                ("10.96.0.0/16".into(), &k(Some("service-cidr"), None)),
                ("10.96.0.1/32".into(), &k(Some("cluster-ip"), Some("allocated"))),
                ("10.96.9.9/32".into(), &k(None, Some("cluster-ip"))),
            ]
        );
        assert_eq!(drift[0].to_string(), "10.96.0.0/16: Service CIDR entry absent, want service-cidr");
    }
}
