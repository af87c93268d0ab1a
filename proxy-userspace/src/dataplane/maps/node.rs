//! Node-level datapath state: `NODE_CONFIG` / `NODE_CONFIG6` (SNAT address, hairpin
//! address, SNAT port range) and `NEIGH_MISSES` / `NEIGH_MISSES6`, the next hops XDP could
//! not forward to because the kernel had no neighbour (ARP / NDP) entry for them. XDP
//! cannot resolve neighbours itself; the agent asks the kernel to (`NTF_USE`, as
//! `ip neigh ... use` does) and forgets the miss.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    str::FromStr,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData},
};
use netlink_packet_route::neighbour::{NeighbourFlags, NeighbourState};
use proxy_common::{NeighKey, NeighKey6, NodeConfig, NodeConfig6, map_names as n, nat_defaults};

use crate::dataplane::{
    DataplaneError,
    maps::addr::{MapAddr, ip_to_map, ip6_to_map},
    paths,
};

/// An inclusive source-port range for SNAT (`--snat-port-range 1024-29999`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange { min: nat_defaults::SNAT_PORT_MIN, max: nat_defaults::SNAT_PORT_MAX }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected MIN-MAX"))?;
        let parse = |v: &str| v.trim().parse::<u16>().map_err(|e| format!("{s:?}: {v:?}: {e}"));
        let (min, max) = (parse(a)?, parse(b)?);
        if min == 0 || min > max {
            return Err(format!("{s:?}: need 1 <= MIN <= MAX"));
        }
        Ok(PortRange { min, max })
    }
}

impl PortRange {
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.min <= other.max && other.min <= self.max
    }

    /// The kernel's `net.ipv4.ip_local_port_range` in the current network namespace.
    pub fn local_port_range() -> Option<PortRange> {
        let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let mut it = s.split_whitespace().filter_map(|v| v.parse().ok());
        Some(PortRange { min: it.next()?, max: it.next()? })
    }
}

/// The value the datapath reads from `NODE_CONFIG`.
pub fn node_config(snat_addr: Option<Ipv4Addr>, hairpin: Option<Ipv4Addr>, ports: PortRange) -> NodeConfig {
    NodeConfig {
        snat_addr: snat_addr.map(ip_to_map).unwrap_or(0),
        hairpin_addr: hairpin.filter(|a| !a.is_unspecified()).map(ip_to_map).unwrap_or(0),
        snat_port_min: ports.min,
        snat_port_max: ports.max,
        lb_mode: crate::model::node::LbMode::default().to_map(),
        _reserved: [0; 3],
    }
}

/// The value the datapath reads from `NODE_CONFIG6`: the node's IPv6 SNAT address (none:
/// the address the client used) and the IPv6 hairpin source (unspecified: disabled).
pub fn node_config6(snat_addr: Option<Ipv6Addr>, hairpin: Option<Ipv6Addr>) -> NodeConfig6 {
    NodeConfig6 {
        snat_addr: snat_addr.map(ip6_to_map).unwrap_or_default(),
        hairpin_addr: hairpin.filter(|a| !a.is_unspecified()).map(ip6_to_map).unwrap_or_default(),
    }
}

pub struct NodeMaps {
    pub config: Array<MapData, NodeConfig>,
    pub neigh_misses: HashMap<MapData, NeighKey, u64>,
    pub config6: Array<MapData, NodeConfig6>,
    pub neigh_misses6: HashMap<MapData, NeighKey6, u64>,
}

fn typed<T>(name: &'static str, map: Map) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(|e| DataplaneError::from_map(name, e))
}

impl NodeMaps {
    /// Take the node maps out of a freshly loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(DataplaneError::MissingObject(name));
        Ok(NodeMaps {
            config: typed(n::NODE_CONFIG, take(n::NODE_CONFIG)?)?,
            neigh_misses: typed(n::NEIGH_MISSES, take(n::NEIGH_MISSES)?)?,
            config6: typed(n::NODE_CONFIG6, take(n::NODE_CONFIG6)?)?,
            neigh_misses6: typed(n::NEIGH_MISSES6, take(n::NEIGH_MISSES6)?)?,
        })
    }

    /// Open the node maps an agent pinned under `root`.
    pub fn open_pinned(root: &Path) -> Result<Self, DataplaneError> {
        let dir = paths::maps_dir(root);
        let open = |name: &'static str| -> Result<Map, DataplaneError> {
            let data = MapData::from_pin(dir.join(name)).map_err(|e| DataplaneError::from_map(name, e))?;
            Map::from_map_data(data).map_err(|e| DataplaneError::from_map(name, e))
        };
        Ok(NodeMaps {
            config: typed(n::NODE_CONFIG, open(n::NODE_CONFIG)?)?,
            neigh_misses: typed(n::NEIGH_MISSES, open(n::NEIGH_MISSES)?)?,
            config6: typed(n::NODE_CONFIG6, open(n::NODE_CONFIG6)?)?,
            neigh_misses6: typed(n::NEIGH_MISSES6, open(n::NEIGH_MISSES6)?)?,
        })
    }

    pub fn config(&self) -> Result<NodeConfig, DataplaneError> {
        self.config.get(&0, 0).map_err(|e| DataplaneError::from_map(n::NODE_CONFIG, e))
    }

    pub fn set_config(&mut self, c: &NodeConfig) -> Result<(), DataplaneError> {
        self.config.set(0, c, 0).map_err(|e| DataplaneError::from_map(n::NODE_CONFIG, e))
    }

    pub fn config6(&self) -> Result<NodeConfig6, DataplaneError> {
        self.config6.get(&0, 0).map_err(|e| DataplaneError::from_map(n::NODE_CONFIG6, e))
    }

    pub fn set_config6(&mut self, c: &NodeConfig6) -> Result<(), DataplaneError> {
        self.config6.set(0, c, 0).map_err(|e| DataplaneError::from_map(n::NODE_CONFIG6, e))
    }

    /// Every queued neighbour miss of both families, removed from the maps: (ifindex,
    /// next hop).
    pub fn take_neigh_misses(&mut self) -> Vec<(u32, IpAddr)> {
        let mut out = take_misses(&mut self.neigh_misses);
        out.extend(take_misses(&mut self.neigh_misses6));
        out
    }
}

fn take_misses<A: MapAddr + aya::Pod>(map: &mut HashMap<MapData, NeighKey<A>, u64>) -> Vec<(u32, IpAddr)>
where
    NeighKey<A>: aya::Pod,
{
    // Collect first: deleting while iterating a BPF hash map restarts the walk.
    let keys: Vec<NeighKey<A>> = map.keys().filter_map(Result::ok).collect();
    for k in &keys {
        let _ = map.remove(k);
    }
    keys.iter().map(|k| (k.ifindex, k.addr.to_ip())).collect()
}

/// Ask the kernel to resolve `addr` on `ifindex` (creating the entry if needed), like
/// `ip neigh replace ADDR dev DEV use`. Returns at once; resolution (ARP, or neighbour
/// solicitation for IPv6) is asynchronous.
pub async fn resolve_neighbour(handle: &rtnetlink::Handle, ifindex: u32, addr: IpAddr) -> Result<(), DataplaneError> {
    handle
        .neighbours()
        .add(ifindex, addr)
        .state(NeighbourState::None)
        .flags(NeighbourFlags::Use)
        .replace()
        .execute()
        .await
        .map_err(|e| DataplaneError::Attach {
            iface: format!("ifindex {ifindex}"),
            message: format!("resolving neighbour {addr}: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_parses_and_rejects_nonsense() {
        assert_eq!("61000-65535".parse::<PortRange>(), Ok(PortRange { min: 61000, max: 65535 }));
        assert_eq!(PortRange::default().to_string(), "1024-29999");
        for bad in ["", "1", "0-10", "10-5", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        let kernel = PortRange { min: 32768, max: 60999 };
        assert!(!PortRange::default().overlaps(&kernel));
        assert!(!PortRange::default().overlaps(&PortRange { min: 30000, max: 32767 }), "clear of NodePorts");
        assert!(PortRange { min: 60000, max: 61000 }.overlaps(&kernel));
    }

    #[test]
    fn node_config_in_map_byte_order() {
        let c = node_config(Some(Ipv4Addr::new(192, 168, 1, 10)), Some(Ipv4Addr::UNSPECIFIED), PortRange::default());
        assert_eq!(c.snat_addr.to_ne_bytes(), [192, 168, 1, 10]);
        assert_eq!(c.hairpin_addr, 0, "0.0.0.0 disables hairpin SNAT");
        assert_eq!((c.snat_port_min, c.snat_port_max), (1024, 29999));
    }

    #[test]
    fn node_config6_in_map_byte_order() {
        let hairpin = Ipv6Addr::from(nat_defaults::HAIRPIN_ADDR6);
        let c = node_config6(Some("fd00::10".parse().unwrap()), Some(hairpin));
        let bytes = |w: [u32; 4]| w.iter().flat_map(|w| w.to_ne_bytes()).collect::<Vec<u8>>();
        assert_eq!(bytes(c.snat_addr), "fd00::10".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(bytes(c.hairpin_addr), nat_defaults::HAIRPIN_ADDR6);
        let off = node_config6(None, Some(Ipv6Addr::UNSPECIFIED));
        assert_eq!(off, NodeConfig6::default(), "no SNAT address, :: disables hairpin SNAT");
    }
}
