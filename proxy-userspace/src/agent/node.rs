//! This node as the reconciler follows it at every sync: whether its Node object lets it
//! take load-balanced traffic (`/healthz`), the addresses its NodePorts are served on
//! (into the translation), its Node's addresses (for uplink detection), and its facts for
//! the datapath (`NODE_CONFIG`, `NODE_CONFIG6`: the SNAT addresses from the Node object,
//! the hairpin addresses and SNAT ports from the flags), which the sync writes through the
//! store when they change.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Node;
use tokio::sync::watch;
use tracing::{info, warn};

use super::config::AgentConfig;
use crate::{
    dataplane::maps::node::PortRange,
    health::Health,
    model::{
        Translator,
        node::{
            LbMode, NodePortAddresses, node_eligible, node_info, node_ips, serve_localhost, snat_address, snat_address6,
        },
    },
    sync::NodeFacts,
};

pub(super) struct ThisNode {
    pub(super) name: String,
    /// Its Node object, when known.
    pub(super) object: Option<Arc<Node>>,
    nodeport_addresses: NodePortAddresses,
    /// `--nodeport-localhost`.
    nodeport_localhost: bool,
    /// The network namespace's addresses (`dataplane::kernel::local_addrs`), which NodePorts are
    /// served on as `nodeport_addresses` selects.
    pub(super) local_addrs: Vec<IpAddr>,
    /// /healthz, /livez, /readyz: told when the Node is on its way out.
    health: Arc<Health>,
    /// The Node's InternalIP/ExternalIP addresses, for uplink detection (when `--uplink`
    /// names none). Not every NodePort address: that would put XDP on bridges and overlay
    /// devices holding a local address.
    addrs: watch::Sender<Vec<IpAddr>>,
    hairpin_address: Ipv4Addr,
    hairpin_address6: Ipv6Addr,
    snat_port_range: PortRange,
    /// `--lb-mode`.
    lb_mode: LbMode,
}

impl ThisNode {
    pub(super) fn new(
        config: &AgentConfig,
        local_addrs: Vec<IpAddr>,
        health: Arc<Health>,
        addrs: watch::Sender<Vec<IpAddr>>,
    ) -> Self {
        ThisNode {
            name: config.node_name.clone(),
            object: None,
            nodeport_addresses: config.nodeport_addresses.clone(),
            nodeport_localhost: config.nodeport_localhost,
            local_addrs,
            health,
            addrs,
            hairpin_address: config.hairpin_address,
            hairpin_address6: config.hairpin_address6,
            snat_port_range: config.snat_port_range,
            lb_mode: config.lb_mode,
        }
    }

    /// The Node object's eligibility into `/healthz`, the NodePort addresses into
    /// `translator`, the Node's addresses to the uplink detection; each logged when it
    /// changes.
    pub(super) fn follow(&self, translator: &mut Translator) {
        let node = self.object.as_deref();
        let eligible = node_eligible(node);
        if self.health.set_node_eligible(eligible) {
            match eligible {
                Err(why) => {
                    warn!(node = %self.name, reason = why, "/healthz now fails: load balancers drain this node")
                }
                Ok(()) => {
                    info!(node = %self.name, "/healthz passes again: the node is eligible for load-balanced traffic")
                }
            }
        }
        let mut info = node_info(&self.name, node, &self.nodeport_addresses, &self.local_addrs);
        if self.nodeport_localhost {
            serve_localhost(&mut info);
        }
        if info.nodeport_addrs != translator.node().nodeport_addrs {
            info!(addresses = ?info.nodeport_addrs, nodeport_addresses = %self.nodeport_addresses, "NodePort addresses");
        }
        let ips = node_ips(node);
        self.addrs.send_if_modified(|a| {
            let changed = *a != ips;
            a.clone_from(&ips);
            changed
        });
        translator.set_node(info);
    }

    /// The node's facts for the datapath, both families.
    pub(super) fn facts(&self) -> [NodeFacts; 2] {
        let node = self.object.as_deref();
        let ports = (self.snat_port_range.min, self.snat_port_range.max);
        [
            NodeFacts::V4 {
                snat: snat_address(node),
                hairpin: self.hairpin_address,
                snat_ports: ports,
                lb_mode: self.lb_mode,
            },
            NodeFacts::V6 { snat: snat_address6(node), hairpin: self.hairpin_address6 },
        ]
    }
}
