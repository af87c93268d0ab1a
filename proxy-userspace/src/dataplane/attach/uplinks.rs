//! Which interfaces are the node's uplinks when `--uplink` names none: the devices that
//! carry the Node's addresses of both families (the ones NodePorts are served on) and the
//! devices of the IPv4 and IPv6 default routes, as Cilium's device detection picks them, so
//! a default install (dual-stack or IPv6-only included) serves
//! NodePorts, ExternalIPs and LoadBalancer IPs from outside without configuration. The agent
//! re-reads them every few seconds and whenever the Node's addresses change.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
};

/// What the host's network looks like from the agent's namespace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostView {
    /// Interface name -> ifindex.
    pub links: BTreeMap<String, u32>,
    /// IPv4 and IPv6 addresses and the interface they sit on.
    pub addrs: Vec<(String, IpAddr)>,
    /// Devices of IPv4 and IPv6 default routes.
    pub default_devs: BTreeSet<String>,
}

/// The uplinks in `view` (name -> ifindex): devices holding one of `node_addrs`, and the
/// default routes' devices; never loopback nor a pod interface.
pub fn choose(view: &HostView, node_addrs: &[IpAddr], is_pod: impl Fn(&str) -> bool) -> BTreeMap<String, u32> {
    let carrying = view.addrs.iter().filter(|(_, a)| node_addrs.contains(a)).map(|(d, _)| d);
    carrying
        .chain(&view.default_devs)
        .filter(|d| d.as_str() != "lo" && !is_pod(d))
        .filter_map(|d| view.links.get(d).map(|i| (d.clone(), *i)))
        .collect()
}

/// Read the view of the calling thread's network namespace: interfaces and addresses
/// (`getifaddrs`), default routes (`/proc/net/route` and `/proc/net/ipv6_route`, which are
/// per namespace; the IPv6 one is absent when IPv6 is disabled).
pub fn read_host() -> io::Result<HostView> {
    let mut view = HostView::default();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        if let Ok(index) = nix::net::if_::if_nametoindex(ifa.interface_name.as_str()) {
            view.links.insert(ifa.interface_name.clone(), index);
        }
        let Some(addr) = ifa.address.as_ref() else { continue };
        if let Some(sin) = addr.as_sockaddr_in() {
            view.addrs.push((ifa.interface_name.clone(), IpAddr::V4(sin.ip())));
        } else if let Some(sin6) = addr.as_sockaddr_in6() {
            view.addrs.push((ifa.interface_name.clone(), IpAddr::V6(sin6.ip())));
        }
    }
    view.default_devs = default_devices(&std::fs::read_to_string("/proc/net/route")?);
    match std::fs::read_to_string("/proc/net/ipv6_route") {
        Ok(table) => view.default_devs.extend(default_devices6(&table)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(view)
}

/// `RTF_REJECT`: an unreachable/prohibit route (the kernel lists an IPv6 "default" on `lo`
/// of this kind), not a way out.
const RTF_REJECT: u32 = 0x0200;

/// Devices of the IPv6 default routes in `/proc/net/ipv6_route` (destination ::/0).
fn default_devices6(table: &str) -> BTreeSet<String> {
    const ANY: &str = "00000000000000000000000000000000";
    table
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // dest dest_len src src_len next_hop metric refcnt use flags iface
            let flags = u32::from_str_radix(cols.get(8)?, 16).ok()?;
            (cols.len() >= 10 && cols[0] == ANY && cols[1] == "00" && flags & RTF_REJECT == 0)
                .then(|| cols[9].to_string())
        })
        .collect()
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

    use std::net::Ipv4Addr;

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    fn view() -> HostView {
        HostView {
            links: [("lo", 1), ("eth0", 2), ("eth1", 3), ("veth1a2b", 4), ("cali99", 5), ("bond0", 6)]
                .into_iter()
                .map(|(n, i)| (n.to_string(), i))
                .collect(),
            addrs: vec![
                ("lo".into(), v4([127, 0, 0, 1])),
                ("eth0".into(), v4([192, 168, 1, 10])),
                ("eth1".into(), v4([10, 0, 0, 5])),
                ("eth1".into(), "fd00:1::10".parse().unwrap()),
                ("veth1a2b".into(), v4([169, 254, 1, 1])),
            ],
            default_devs: ["bond0".to_string()].into_iter().collect(),
        }
    }

    #[test]
    fn devices_carrying_node_addresses_and_default_routes() {
        let is_pod = |n: &str| n.starts_with("veth") || n.starts_with("cali");
        let got = choose(&view(), &[v4([192, 168, 1, 10])], is_pod);
        assert_eq!(got.into_iter().collect::<Vec<_>>(), vec![("bond0".to_string(), 6), ("eth0".to_string(), 2)]);
        // Without a Node (no addresses known yet): the default route's device.
        assert_eq!(choose(&view(), &[], is_pod).keys().collect::<Vec<_>>(), vec!["bond0"]);
        // A node address on a pod interface or on lo never makes it an uplink.
        let got = choose(&view(), &[v4([169, 254, 1, 1]), v4([127, 0, 0, 1])], is_pod);
        assert_eq!(got.keys().collect::<Vec<_>>(), vec!["bond0"]);
        // A device carrying the Node's IPv6 address is an uplink too (IPv6-only nodes).
        let got = choose(&view(), &["fd00:1::10".parse().unwrap()], is_pod);
        assert_eq!(got.keys().collect::<Vec<_>>(), vec!["bond0", "eth1"]);
    }

    #[test]
    fn ipv6_default_routes_from_proc_net_ipv6_route() {
        let any = "00000000000000000000000000000000";
        let table = format!(
            "{any} 00 {any} 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n\
             fd000001000000000000000000000000 40 {any} 00 {any} 00000100 00000001 00000000 00000001 eth1\n\
             {any} 00 {any} 00 {any} ffffffff 00000001 00000000 00200200 lo\n"
        );
        assert_eq!(default_devices6(&table).into_iter().collect::<Vec<_>>(), vec!["eth0"]);
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
