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
