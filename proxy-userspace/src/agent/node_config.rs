//! The node's facts for the datapath (`NODE_CONFIG`, `NODE_CONFIG6`): the SNAT addresses
//! from the Node object, the hairpin addresses and SNAT ports from the flags. Each is
//! written when it changes, and retried by the next sync when its write failed.
use std::net::{Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::Node;
use proxy_common::{NodeConfig, NodeConfig6};
use tracing::{error, info};

use super::config::AgentConfig;
use crate::{
    dataplane::maps::node::{NodeMaps, PortRange, node_config, node_config6},
    model::node::{snat_address, snat_address6},
};

pub(super) struct NodeConfigs {
    maps: NodeMaps,
    hairpin_address: Ipv4Addr,
    hairpin_address6: Ipv6Addr,
    snat_port_range: PortRange,
    /// What is in the maps (`None`: nothing written yet, or the last write failed).
    written: Option<NodeConfig>,
    written6: Option<NodeConfig6>,
}

impl NodeConfigs {
    pub(super) fn new(maps: NodeMaps, config: &AgentConfig) -> Self {
        NodeConfigs {
            maps,
            hairpin_address: config.hairpin_address,
            hairpin_address6: config.hairpin_address6,
            snat_port_range: config.snat_port_range,
            written: None,
            written6: None,
        }
    }

    /// Write what `node` (this node's Node object, when known) implies, where it changed.
    pub(super) fn write(&mut self, node: Option<&Node>) {
        let snat = snat_address(node);
        let cfg = node_config(snat, Some(self.hairpin_address), self.snat_port_range);
        if self.written != Some(cfg) {
            match self.maps.set_config(&cfg) {
                Ok(()) => {
                    info!(
                        snat_address = %snat.map(|a| a.to_string()).unwrap_or_else(|| "(address the client used)".into()),
                        hairpin_address = %self.hairpin_address,
                        snat_ports = %self.snat_port_range,
                        "node config written"
                    );
                    self.written = Some(cfg);
                }
                Err(e) => error!(error = %e, "cannot write the node config"),
            }
        }
        let snat6 = snat_address6(node);
        let cfg6 = node_config6(snat6, Some(self.hairpin_address6));
        if self.written6 != Some(cfg6) {
            match self.maps.set_config6(&cfg6) {
                Ok(()) => {
                    info!(
                        snat_address6 = %snat6.map(|a| a.to_string()).unwrap_or_else(|| "(address the client used)".into()),
                        hairpin_address6 = %self.hairpin_address6,
                        "IPv6 node config written"
                    );
                    self.written6 = Some(cfg6);
                }
                Err(e) => error!(error = %e, "cannot write the IPv6 node config"),
            }
        }
    }
}
