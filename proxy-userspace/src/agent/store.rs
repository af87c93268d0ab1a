//! The agent's store: the pinned Service maps, plus what a sync pass carries out beyond
//! them, the node's entries (`NODE_CONFIG`, `NODE_CONFIG6`) and, with socket-level load
//! balancing, the destruction of connected UDP sockets pointed at deleted backends. One
//! store for all of it lets the sync order it with the map writes (the `sync` module doc,
//! steps 1 and 10); each effect is logged here, where it is carried out.
use std::net::IpAddr;

use proxy_common::{IdMarks, MaglevKey, NodeConfig, ServiceMeta, ServiceValue, SlotKey};
use tracing::info;

use super::socket_lb::SockLb;
use crate::{
    dataplane::{
        maps::Maps,
        maps::node::{NodeMaps, PortRange, node_config, node_config6},
        sock,
    },
    model::{IpFamily, IpPrefix},
    sync::{
        AnyBackend, AnyServiceKey, BackendId, CidrEntry, CtFacts, MapStore, NodeFacts, ServiceId, Snapshot,
        SocketsDestroyed, store::StoreResult,
    },
};

pub(super) struct AgentStore {
    maps: Maps,
    node: NodeMaps,
    /// Socket-level load balancing, when attached: whose UDP sockets are destroyed.
    sock: Option<SockLb>,
}

impl AgentStore {
    pub(super) fn new(maps: Maps, node: NodeMaps, sock: Option<SockLb>) -> Self {
        AgentStore { maps, node, sock }
    }

    /// The frontend filter in force (after a sync: every frontend has its bit); logged, with
    /// its fill, when it comes into force (the bits are counted only then, not every sync).
    pub(super) fn filter_in_force(&mut self) {
        match self.maps.put_filter_in_force() {
            Ok(true) => {
                if let Some((bits, _)) = self.maps.filter_state() {
                    info!(bits_set = bits, bits = proxy_common::frontend_filter::BITS, "frontend filter in force");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "frontend filter not in force: every packet takes the full path"),
        }
    }
}

/// A SNAT address as the log shows it.
fn snat_shown(a: Option<impl ToString>) -> String {
    a.map(|a| a.to_string()).unwrap_or_else(|| "(address the client used)".into())
}

impl MapStore for AgentStore {
    fn put_node_config(&mut self, facts: &NodeFacts) -> StoreResult {
        match *facts {
            NodeFacts::V4 { snat, hairpin, snat_ports: (min, max), lb_mode } => {
                let ports = PortRange { min, max };
                let config = NodeConfig { lb_mode: lb_mode.to_map(), ..node_config(snat, Some(hairpin), ports) };
                self.node.set_config(&config)?;
                info!(
                    snat_address = %snat_shown(snat),
                    hairpin_address = %hairpin,
                    snat_ports = %ports,
                    %lb_mode,
                    "node config written"
                );
            }
            NodeFacts::V6 { snat, hairpin } => {
                self.node.set_config6(&node_config6(snat, Some(hairpin)))?;
                info!(snat_address6 = %snat_shown(snat), hairpin_address6 = %hairpin, "IPv6 node config written");
            }
        }
        Ok(())
    }

    fn destroy_udp_sockets(&mut self, backends: &[(IpAddr, u16)]) -> Option<SocketsDestroyed> {
        let sl = self.sock.as_ref()?;
        let r = sock::destroy::destroy_udp_sockets(&sl.cgroup, backends);
        info!(
            backends = backends.len(),
            namespaces = r.namespaces,
            destroyed = r.destroyed,
            failed = r.failed,
            duration_ms = r.elapsed.as_secs_f64() * 1e3,
            "destroyed connected UDP sockets of removed backends"
        );
        Some(SocketsDestroyed { destroyed: r.destroyed, elapsed: r.elapsed })
    }

    // The Service maps: the pinned maps' own (batched writes included).
    fn snapshot(&self) -> StoreResult<Snapshot> {
        self.maps.snapshot()
    }
    fn adopt(&mut self, snap: &Snapshot) -> StoreResult {
        self.maps.adopt(snap)
    }
    fn put_service(&mut self, k: &AnyServiceKey, v: &ServiceValue) -> StoreResult {
        self.maps.put_service(k, v)
    }
    fn del_service(&mut self, k: &AnyServiceKey) -> StoreResult {
        self.maps.del_service(k)
    }
    fn put_slot(&mut self, k: &SlotKey, backend_id: BackendId) -> StoreResult {
        self.maps.put_slot(k, backend_id)
    }
    fn del_slot(&mut self, k: &SlotKey) -> StoreResult {
        self.maps.del_slot(k)
    }
    fn put_maglev(&mut self, k: &MaglevKey, backend_id: BackendId) -> StoreResult {
        self.maps.put_maglev(k, backend_id)
    }
    fn del_maglev(&mut self, k: &MaglevKey) -> StoreResult {
        self.maps.del_maglev(k)
    }
    fn put_service_cidr(&mut self, p: IpPrefix, e: CidrEntry) -> StoreResult {
        self.maps.put_service_cidr(p, e)
    }
    fn del_service_cidr(&mut self, p: IpPrefix) -> StoreResult {
        self.maps.del_service_cidr(p)
    }
    fn put_maglevs(&mut self, items: &[(MaglevKey, BackendId)]) -> StoreResult {
        self.maps.put_maglevs(items)
    }
    fn set_maglev_table_size(&mut self, m: u32) {
        self.maps.set_maglev_table_size(m);
    }
    fn put_backend(&mut self, id: BackendId, b: &AnyBackend) -> StoreResult {
        self.maps.put_backend(id, b)
    }
    fn del_backend(&mut self, id: BackendId, family: IpFamily) -> StoreResult {
        self.maps.del_backend(id, family)
    }
    fn put_meta(&mut self, id: ServiceId, m: &ServiceMeta) -> StoreResult {
        self.maps.put_meta(id, m)
    }
    fn del_meta(&mut self, id: ServiceId) -> StoreResult {
        self.maps.del_meta(id)
    }
    fn del_stats(&mut self, id: ServiceId) -> StoreResult {
        self.maps.del_stats(id)
    }
    fn put_range(&mut self, svc_id: ServiceId, p: IpPrefix) -> StoreResult {
        self.maps.put_range(svc_id, p)
    }
    fn del_range(&mut self, svc_id: ServiceId, p: IpPrefix) -> StoreResult {
        self.maps.del_range(svc_id, p)
    }
    fn purge_conntrack(&mut self, pred: &dyn Fn(CtFacts) -> bool) -> StoreResult<usize> {
        self.maps.purge_conntrack(pred)
    }
    fn purge_affinity(&mut self, pred: &dyn Fn(ServiceId, BackendId) -> bool) -> StoreResult<usize> {
        self.maps.purge_affinity(pred)
    }
    fn put_id_marks(&mut self, marks: &IdMarks) -> StoreResult {
        self.maps.put_id_marks(marks)
    }
    fn put_backends_and_slots(
        &mut self,
        backends: &[(BackendId, AnyBackend)],
        slots: &[(SlotKey, BackendId)],
    ) -> StoreResult {
        self.maps.put_backends_and_slots(backends, slots)
    }
    fn put_metas(&mut self, items: &[(ServiceId, ServiceMeta)]) -> StoreResult {
        self.maps.put_metas(items)
    }
    fn put_services(&mut self, items: &[(AnyServiceKey, ServiceValue)]) -> StoreResult {
        self.maps.put_services(items)
    }
}
