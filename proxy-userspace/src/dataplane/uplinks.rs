//! Which interfaces are the node's uplinks when `--uplink` names none: the devices that
//! carry the Node's addresses (the ones NodePorts are served on) and the devices of the
//! default routes, as Cilium's device detection picks them, so a default install serves
//! NodePorts, ExternalIPs and LoadBalancer IPs from outside without configuration. The agent
//! re-reads them every few seconds and whenever the Node's addresses change.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::Ipv4Addr,
};

/// What the host's network looks like from the agent's namespace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostView {
    /// Interface name -> ifindex.
    pub links: BTreeMap<String, u32>,
    /// IPv4 addresses and the interface they sit on.
    pub addrs: Vec<(String, Ipv4Addr)>,
    /// Devices of IPv4 default routes.
    pub default_devs: BTreeSet<String>,
}

/// The uplinks in `view` (name -> ifindex): devices holding one of `node_addrs`, and the
/// default routes' devices; never loopback nor a pod interface.
pub fn choose(view: &HostView, node_addrs: &[Ipv4Addr], is_pod: impl Fn(&str) -> bool) -> BTreeMap<String, u32> {
    let carrying = view.addrs.iter().filter(|(_, a)| node_addrs.contains(a)).map(|(d, _)| d);
    carrying
        .chain(&view.default_devs)
        .filter(|d| d.as_str() != "lo" && !is_pod(d))
        .filter_map(|d| view.links.get(d).map(|i| (d.clone(), *i)))
        .collect()
}

/// Read the view of the calling thread's network namespace: interfaces and addresses
/// (`getifaddrs`), default routes (`/proc/net/route`, which is per namespace).
pub fn read_host() -> io::Result<HostView> {
    let mut view = HostView::default();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        if let Ok(index) = nix::net::if_::if_nametoindex(ifa.interface_name.as_str()) {
            view.links.insert(ifa.interface_name.clone(), index);
        }
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            view.addrs.push((ifa.interface_name.clone(), sin.ip()));
        }
    }
    view.default_devs = default_devices(&std::fs::read_to_string("/proc/net/route")?);
    Ok(view)
}

/// Devices of the default routes in `/proc/net/route` (destination and mask 0).
fn default_devices(table: &str) -> BTreeSet<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            (cols.len() >= 8 && cols[1] == "00000000" && cols[7] == "00000000").then(|| cols[0].to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> HostView {
        HostView {
            links: [("lo", 1), ("eth0", 2), ("eth1", 3), ("veth1a2b", 4), ("cali99", 5), ("bond0", 6)]
                .into_iter()
                .map(|(n, i)| (n.to_string(), i))
                .collect(),
            addrs: vec![
                ("lo".into(), Ipv4Addr::LOCALHOST),
                ("eth0".into(), Ipv4Addr::new(192, 168, 1, 10)),
                ("eth1".into(), Ipv4Addr::new(10, 0, 0, 5)),
                ("veth1a2b".into(), Ipv4Addr::new(169, 254, 1, 1)),
            ],
            default_devs: ["bond0".to_string()].into_iter().collect(),
        }
    }

    #[test]
    fn devices_carrying_node_addresses_and_default_routes() {
        let is_pod = |n: &str| n.starts_with("veth") || n.starts_with("cali");
        let got = choose(&view(), &[Ipv4Addr::new(192, 168, 1, 10)], is_pod);
        assert_eq!(got.into_iter().collect::<Vec<_>>(), vec![("bond0".to_string(), 6), ("eth0".to_string(), 2)]);
        // Without a Node (no addresses known yet): the default route's device.
        assert_eq!(choose(&view(), &[], is_pod).keys().collect::<Vec<_>>(), vec!["bond0"]);
        // A node address on a pod interface or on lo never makes it an uplink.
        let got = choose(&view(), &[Ipv4Addr::new(169, 254, 1, 1), Ipv4Addr::LOCALHOST], is_pod);
        assert_eq!(got.keys().collect::<Vec<_>>(), vec!["bond0"]);
    }

    #[test]
    fn default_routes_from_proc_net_route() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                     eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
                     eth1\t00000000\t0100000A\t0003\t0\t0\t200\t00000000\t0\t0\t0\n";
        assert_eq!(default_devices(table).into_iter().collect::<Vec<_>>(), vec!["eth0", "eth1"]);
    }
}
