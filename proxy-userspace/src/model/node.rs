//! The agent's own Node -> the node facts the translation needs.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::core::v1::Node;

use super::{
    addr::parse_ip_sloppy,
    types::{IpPrefix, NodeInfo},
};

/// `--lb-mode`: how north-south flows to a backend on another node travel
/// (`NodeConfig::lb_mode`, see `proxy_common::lb_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LbMode {
    /// Source NAT to this node: replies come back through it (kube-proxy's behaviour).
    #[default]
    Snat,
    /// Direct server return: the backend's node answers the client directly.
    Dsr,
    /// DSR for TCP, SNAT for UDP.
    Hybrid,
}

impl LbMode {
    /// The value `NodeConfig::lb_mode` holds.
    pub fn to_map(self) -> u8 {
        match self {
            LbMode::Snat => proxy_common::lb_mode::SNAT,
            LbMode::Dsr => proxy_common::lb_mode::DSR,
            LbMode::Hybrid => proxy_common::lb_mode::HYBRID,
        }
    }
}

impl fmt::Display for LbMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LbMode::Snat => "snat",
            LbMode::Dsr => "dsr",
            LbMode::Hybrid => "hybrid",
        })
    }
}

/// The Node label topology-aware routing matches zone hints against.
const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// `--nodeport-addresses`, parsed once at start-up (`agent::config::nodeport_addresses`):
/// which of the node's local addresses serve NodePorts. Upstream's modes, per family as
/// upstream's `NodePortAddresses` (one per proxier, i.e. per family).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Unset: every local address (kube-proxy's iptables mode, `--dst-type LOCAL`):
    /// secondary NICs, keepalived VIPs, bridge gateways.
    #[default]
    All,
    /// `primary`: the node's primary IP of each family (kube-proxy's node IPs, the first
    /// InternalIP of the family, else its first ExternalIP), when it is a local address. A
    /// family without a primary IP falls back to all its local addresses, as upstream, which
    /// turns `primary` into a /32 and a /128 CIDR and then filters per family. kube-proxy's
    /// nftables mode defaults to this.
    Primary,
    /// CIDRs filtering the local addresses, per family: a family with no CIDR here is not
    /// restricted (upstream falls back to 0.0.0.0/0 or ::/0 for it).
    Cidrs(Vec<IpPrefix>),
}

impl fmt::Display for NodePortAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodePortAddresses::All => f.write_str("every local address"),
            NodePortAddresses::Primary => f.write_str("primary"),
            NodePortAddresses::Cidrs(c) => {
                let c: Vec<String> = c.iter().map(ToString::to_string).collect();
                f.write_str(&c.join(","))
            }
        }
    }
}

/// Whether a local address can serve NodePorts at all. Loopback is left out (NodePorts on
/// localhost are `--nodeport-localhost`'s, see [`serve_localhost`]), and so are IPv6
/// link-local addresses (ambiguous without a zone: every link has fe80::/64), the
/// unspecified and multicast addresses.
pub fn can_serve_nodeports(ip: IpAddr) -> bool {
    let link_local6 = matches!(ip, IpAddr::V6(a) if a.is_unicast_link_local());
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || link_local6)
}

/// The loopback addresses `--nodeport-localhost` serves NodePorts on.
pub const LOCALHOST: [IpAddr; 2] =
    [IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)];

/// `--nodeport-localhost`: NodePorts also on 127.0.0.1 and ::1, for processes on the node.
/// Their frontends have the internal scope only (no uplink packet can reach them) and the
/// socket hooks translate them for sockets of the host network namespace only, so neither
/// the outside nor a pod's own loopback reaches them (kube-proxy's iptables mode reaches
/// the same end through `route_localnet`, for IPv4 only).
pub fn serve_localhost(info: &mut NodeInfo) {
    for ip in LOCALHOST {
        if !info.nodeport_addrs.contains(&ip) {
            info.nodeport_addrs.push(ip);
        }
    }
}

/// NodeInfo for `name`: NodePorts are served on the node's `local` addresses (its network
/// namespace's, both families: upstream runs a proxier per family) that `mode` selects,
/// loopback and IPv6 link-local excluded ([`can_serve_nodeports`]). The addresses come in
/// as data (the agent follows them over rtnetlink), so this stays pure.
pub fn node_info(name: &str, node: Option<&Node>, mode: &NodePortAddresses, local: &[IpAddr]) -> NodeInfo {
    let primary = [snat_address(node).map(IpAddr::V4), snat_address6(node).map(IpAddr::V6)];
    let selected = |ip: IpAddr| match mode {
        NodePortAddresses::All => true,
        NodePortAddresses::Primary => {
            primary.iter().flatten().find(|p| p.is_ipv4() == ip.is_ipv4()).is_none_or(|p| *p == ip)
        }
        NodePortAddresses::Cidrs(cidrs) => {
            let mut of_family = cidrs.iter().filter(|p| p.addr.is_ipv4() == ip.is_ipv4()).peekable();
            of_family.peek().is_none() || of_family.any(|p| p.contains(ip))
        }
    };
    let mut addrs: Vec<IpAddr> = local.iter().copied().filter(|ip| can_serve_nodeports(*ip) && selected(*ip)).collect();
    addrs.sort();
    addrs.dedup();
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
        .filter(|z| !z.is_empty())
        .cloned();
    NodeInfo { name: name.to_string(), nodeport_addrs: addrs, zone }
}

/// The Node object's InternalIP and ExternalIP addresses (those that parse), in order:
/// what uplink detection looks for, and what `explain` (run off the node) takes for the
/// node's local addresses.
pub fn node_ips(node: Option<&Node>) -> Vec<IpAddr> {
    node_addresses(node).filter(|(kind, _)| *kind == "InternalIP" || *kind == "ExternalIP").map(|(_, ip)| ip).collect()
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// Should load balancers keep sending traffic to this node? Not once its Node is being
/// deleted or tainted for deletion by the cluster autoscaler: kube-proxy (>= 1.31, KEP-3836)
/// then fails /healthz, which cloud load balancers probe for externalTrafficPolicy=Cluster
/// Services, so they drain the node first. An unknown Node is eligible (as at start-up).
pub fn node_eligible(node: Option<&Node>) -> Result<(), &'static str> {
    let Some(node) = node else { return Ok(()) };
    if node.metadata.deletion_timestamp.is_some() {
        return Err("the Node is being deleted");
    }
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_ref());
    if taints.into_iter().flatten().any(|t| t.key == TAINT_TO_BE_DELETED) {
        return Err("the Node is tainted ToBeDeletedByClusterAutoscaler");
    }
    Ok(())
}

/// The Node's addresses that parse (sloppy like kube-proxy), with their type.
fn node_addresses(node: Option<&Node>) -> impl Iterator<Item = (&str, IpAddr)> {
    node.and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a.type_.as_str(), parse_ip_sloppy(&a.address)?)))
}

/// The first address of `pick`'s family: InternalIP first (what other nodes reach it by),
/// else ExternalIP.
fn first_of<T>(node: Option<&Node>, pick: impl Fn(IpAddr) -> Option<T>) -> Option<T> {
    let first = |kind: &str| node_addresses(node).filter(|(k, _)| *k == kind).find_map(|(_, ip)| pick(ip));
    first("InternalIP").or_else(|| first("ExternalIP"))
}

/// The address IPv4 north-south flows to a backend on another node are source-NATed to,
/// so that the backend's replies come back here: the node's first IPv4 InternalIP, else its
/// first IPv4 ExternalIP. `None` without one; the datapath then uses the address the
/// client connected to.
pub fn snat_address(node: Option<&Node>) -> Option<Ipv4Addr> {
    first_of(node, |ip| match ip {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    })
}

/// The IPv6 SNAT address (`NODE_CONFIG6`): the node's first IPv6 InternalIP, else its
/// first IPv6 ExternalIP.
pub fn snat_address6(node: Option<&Node>) -> Option<Ipv6Addr> {
    first_of(node, |ip| match ip {
        IpAddr::V6(ip) => Some(ip),
        IpAddr::V4(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(addrs: &[(&str, &str)]) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": addrs.iter().map(|(t, a)| serde_json::json!({"type": t, "address": a})).collect::<Vec<_>>()}
        }))
        .unwrap()
    }

    #[test]
    fn a_node_being_deleted_or_tainted_for_deletion_is_not_eligible() {
        let with = |v: serde_json::Value| serde_json::from_value::<Node>(v).unwrap();
        assert_eq!(node_eligible(None), Ok(()));
        assert_eq!(node_eligible(Some(&node(&[]))), Ok(()));
        let tainted = with(serde_json::json!({"metadata": {"name": "n1"}, "spec": {"taints": [
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
            {"key": "ToBeDeletedByClusterAutoscaler", "value": "1733500000", "effect": "NoSchedule"}]}}));
        assert!(node_eligible(Some(&tainted)).unwrap_err().contains("ToBeDeletedByClusterAutoscaler"));
        // Cordoned (kubectl drain) or a deletion candidate: still eligible, as upstream.
        let cordoned = with(serde_json::json!({"metadata": {"name": "n1"}, "spec": {"unschedulable": true, "taints": [
            {"key": "DeletionCandidateOfClusterAutoscaler", "effect": "PreferNoSchedule"}]}}));
        assert_eq!(node_eligible(Some(&cordoned)), Ok(()));
        let deleting =
            with(serde_json::json!({"metadata": {"name": "n1", "deletionTimestamp": "2026-12-06T10:00:00Z"}}));
        assert!(node_eligible(Some(&deleting)).unwrap_err().contains("deleted"));
    }

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn cidrs(s: &[&str]) -> Vec<IpPrefix> {
        s.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn cidr_mode(s: &[&str]) -> NodePortAddresses {
        NodePortAddresses::Cidrs(cidrs(s))
    }

    /// A dual-stack node's namespace: its primary addresses on eth0, a secondary address
    /// and a keepalived-style VIP, a second NIC, a bridge gateway, and what never serves.
    const LOCAL: &[&str] = &[
        "192.168.1.10",
        "192.168.1.200",
        "10.1.0.5",
        "10.244.1.1",
        "127.0.0.1",
        "127.0.0.53",
        "fd00::1",
        "fd00::200",
        "fe80::1",
        "::1",
    ];

    fn dual_node() -> Node {
        node(&[("InternalIP", "192.168.1.10"), ("Hostname", "n1"), ("InternalIP", "fd00::1")])
    }

    /// kube-proxy's iptables default (`--dst-type LOCAL`): NodePorts on every local address
    /// of both families, whatever the Node object lists; never loopback nor IPv6 link-local.
    #[test]
    fn default_mode_serves_every_local_address_of_both_families() {
        let info = node_info("n1", Some(&dual_node()), &NodePortAddresses::All, &ips(LOCAL));
        let want = ["10.1.0.5", "10.244.1.1", "192.168.1.10", "192.168.1.200", "fd00::1", "fd00::200"];
        assert_eq!(info.nodeport_addrs, ips(&want));
        // An address the Node object lists but the node does not hold (a cloud's NATed
        // ExternalIP) serves nothing here, as upstream.
        let n = node(&[("InternalIP", "192.168.1.10"), ("ExternalIP", "203.0.113.5")]);
        let info = node_info("n1", Some(&n), &NodePortAddresses::All, &ips(&["192.168.1.10"]));
        assert_eq!(info.nodeport_addrs, ips(&["192.168.1.10"]));
        // No Node object (yet): the local addresses still serve.
        assert_eq!(
            node_info("n1", None, &NodePortAddresses::All, &ips(&["10.1.0.5"])).nodeport_addrs,
            ips(&["10.1.0.5"])
        );
    }

    /// `primary`: only the node IP of each family (first InternalIP, else first ExternalIP).
    #[test]
    fn primary_mode_serves_the_node_ip_of_each_family() {
        let info = node_info("n1", Some(&dual_node()), &NodePortAddresses::Primary, &ips(LOCAL));
        assert_eq!(info.nodeport_addrs, ips(&["192.168.1.10", "fd00::1"]));
        // InternalIP before ExternalIP, the first of each family.
        let n = node(&[
            ("ExternalIP", "10.1.0.5"),
            ("InternalIP", "192.168.1.200"),
            ("InternalIP", "192.168.1.10"),
            ("ExternalIP", "fd00::200"),
        ]);
        let info = node_info("n1", Some(&n), &NodePortAddresses::Primary, &ips(LOCAL));
        assert_eq!(info.nodeport_addrs, ips(&["192.168.1.200", "fd00::200"]));
        // A primary IP the node does not hold serves nothing (upstream filters the local
        // addresses by the node IP's /32).
        let n = node(&[("InternalIP", "192.168.9.9"), ("InternalIP", "fd00::1")]);
        let info = node_info("n1", Some(&n), &NodePortAddresses::Primary, &ips(LOCAL));
        assert_eq!(info.nodeport_addrs, ips(&["fd00::1"]));
    }

    /// Upstream's `primary` becomes a CIDR per family the node has an IP of; a family
    /// without one has no CIDR and so falls back to all its local addresses.
    #[test]
    fn primary_mode_without_a_node_ip_of_a_family_serves_all_of_that_family() {
        let n = node(&[("InternalIP", "192.168.1.10")]);
        let info = node_info("n1", Some(&n), &NodePortAddresses::Primary, &ips(LOCAL));
        assert_eq!(info.nodeport_addrs, ips(&["192.168.1.10", "fd00::1", "fd00::200"]));
        let n = node(&[("InternalIP", "fd00::200")]);
        let info = node_info("n1", Some(&n), &NodePortAddresses::Primary, &ips(LOCAL));
        assert_eq!(info.nodeport_addrs, ips(&["10.1.0.5", "10.244.1.1", "192.168.1.10", "192.168.1.200", "fd00::200"]));
    }

    /// CIDRs filter the local addresses (not the Node object's), per family like upstream's
    /// `NodePortAddresses`: a family the flag names no CIDR of is not restricted.
    #[test]
    fn cidr_mode_filters_the_local_addresses_per_family() {
        let local = ips(LOCAL);
        let info = node_info("n1", Some(&dual_node()), &cidr_mode(&["192.168.1.200/32"]), &local);
        assert_eq!(info.nodeport_addrs, ips(&["192.168.1.200", "fd00::1", "fd00::200"]));
        let info = node_info("n1", Some(&dual_node()), &cidr_mode(&["fd00::200/128"]), &local);
        let want = ["10.1.0.5", "10.244.1.1", "192.168.1.10", "192.168.1.200", "fd00::200"];
        assert_eq!(info.nodeport_addrs, ips(&want));
        let info = node_info("n1", Some(&dual_node()), &cidr_mode(&["10.0.0.0/8", "fd00::/64"]), &local);
        assert_eq!(info.nodeport_addrs, ips(&["10.1.0.5", "10.244.1.1", "fd00::1", "fd00::200"]));
        // A CIDR matching no local address: nothing of that family; 0.0.0.0/0 is every IPv4.
        let info = node_info("n1", None, &cidr_mode(&["172.16.0.0/12", "::/0"]), &local);
        assert_eq!(info.nodeport_addrs, ips(&["fd00::1", "fd00::200"]));
        // Loopback stays out even when a CIDR covers it.
        let info = node_info("n1", None, &cidr_mode(&["127.0.0.0/8", "::1/128"]), &local);
        assert!(info.nodeport_addrs.is_empty(), "{:?}", info.nodeport_addrs);
    }

    #[test]
    fn only_routable_local_addresses_serve_nodeports() {
        for a in ["127.0.0.1", "127.1.2.3", "::1", "fe80::1", "0.0.0.0", "::", "224.0.0.1", "ff02::1"] {
            assert!(!can_serve_nodeports(a.parse().unwrap()), "{a}");
        }
        for a in ["192.168.1.10", "169.254.20.10", "fd00::1", "2001:db8::1"] {
            assert!(can_serve_nodeports(a.parse().unwrap()), "{a}");
        }
    }

    /// An IPv6-only node: an IPv6 SNAT address, no IPv4; `node_ips` lists its addresses.
    #[test]
    fn ipv6_only_node() {
        let n = node(&[("InternalIP", "fd00::10"), ("ExternalIP", "2001:db8::10"), ("Hostname", "n1")]);
        assert_eq!(node_ips(Some(&n)), ips(&["fd00::10", "2001:db8::10"]));
        assert_eq!(snat_address(Some(&n)), None);
        assert_eq!(snat_address6(Some(&n)), Some("fd00::10".parse().unwrap()));
        let ext_only = node(&[("ExternalIP", "2001:db8::10"), ("InternalIP", "192.168.1.10")]);
        assert_eq!(snat_address6(Some(&ext_only)), Some("2001:db8::10".parse().unwrap()));
    }

    #[test]
    fn no_node_object_means_no_node_ips() {
        assert!(node_ips(None).is_empty());
        assert_eq!(node_info("n1", None, &NodePortAddresses::Primary, &[]).name, "n1");
    }

    #[test]
    fn snat_address_prefers_the_first_ipv4_internal_ip() {
        let n = node(&[
            ("ExternalIP", "203.0.113.5"),
            ("InternalIP", "fd00::1"),
            ("InternalIP", "192.168.1.10"),
            ("InternalIP", "192.168.1.11"),
        ]);
        assert_eq!(snat_address(Some(&n)), Some(Ipv4Addr::new(192, 168, 1, 10)));
        let ext_only = node(&[("Hostname", "n1"), ("ExternalIP", "203.0.113.5")]);
        assert_eq!(snat_address(Some(&ext_only)), Some(Ipv4Addr::new(203, 0, 113, 5)));
        assert_eq!(snat_address(Some(&node(&[("Hostname", "n1")]))), None);
        assert_eq!(snat_address(None), None);
    }

    /// Node addresses are sloppy like kube-proxy's (`ParseIPSloppy`): leading zeros are
    /// decimal, so `primary` finds 192.168.001.010 among the local addresses.
    #[test]
    fn node_addresses_with_leading_zeros() {
        let n = node(&[("InternalIP", "192.168.001.010")]);
        assert_eq!(snat_address(Some(&n)), Some(Ipv4Addr::new(192, 168, 1, 10)));
        let info = node_info("n", Some(&n), &NodePortAddresses::Primary, &ips(&["192.168.1.10", "10.0.0.1"]));
        assert_eq!(info.nodeport_addrs, ips(&["192.168.1.10"]));
    }
}
