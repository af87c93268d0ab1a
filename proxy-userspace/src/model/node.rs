//! The agent's own Node -> the node facts the translation needs.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::Node;

use super::{
    addr::parse_ip_sloppy,
    types::{IpPrefix, NodeInfo},
};

/// The Node label topology-aware routing matches zone hints against.
const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// NodeInfo for `name`: NodePort addresses are the node's InternalIP/ExternalIP addresses
/// of both families (upstream runs a proxier per family, each serving NodePorts on its
/// family's node addresses), restricted to `nodeport_cidrs` when any are given
/// (kube-proxy's `--nodeport-addresses`, IPv4 and IPv6 CIDRs, parsed once at start-up).
///
/// Upstream applies `--nodeport-addresses` per family: when the flag names CIDRs of one
/// family only, the other family's proxier serves NodePorts on all its node addresses
/// (`NodePortAddresses` falls back to "all" for a family with no CIDR).
pub fn node_info(name: &str, node: Option<&Node>, nodeport_cidrs: &[IpPrefix]) -> NodeInfo {
    let allowed = |ip: IpAddr| {
        let mut of_family = nodeport_cidrs.iter().filter(|p| p.addr.is_ipv4() == ip.is_ipv4()).peekable();
        of_family.peek().is_none() || of_family.any(|p| p.contains(ip))
    };
    let mut addrs: Vec<IpAddr> = node_addresses(node)
        .filter(|(kind, _)| *kind == "InternalIP" || *kind == "ExternalIP")
        .map(|(_, ip)| ip)
        .filter(|ip| allowed(*ip))
        .collect();
    addrs.sort();
    addrs.dedup();
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
        .filter(|z| !z.is_empty())
        .cloned();
    NodeInfo { name: name.to_string(), nodeport_addrs: addrs, zone }
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

    /// Upstream serves NodePorts on the node addresses of each family its proxiers run
    /// (MetaProxier: one per family), so a dual-stack node serves them on both.
    #[test]
    fn nodeport_addresses_default_to_all_node_addresses_of_both_families() {
        let n = node(&[
            ("InternalIP", "192.168.1.10"),
            ("Hostname", "n1"),
            ("ExternalIP", "203.0.113.5"),
            ("InternalIP", "fd00::1"),
            ("InternalIP", "not-an-ip"),
        ]);
        let info = node_info("n1", Some(&n), &[]);
        assert_eq!(info.nodeport_addrs, ips(&["192.168.1.10", "203.0.113.5", "fd00::1"]));
    }

    /// `--nodeport-addresses` takes IPv6 CIDRs too, and applies per family like upstream's
    /// `NodePortAddresses`: a family the flag names no CIDR of is not restricted.
    #[test]
    fn nodeport_addresses_with_ipv6_cidrs() {
        let n = node(&[("InternalIP", "192.168.1.10"), ("InternalIP", "fd00::1"), ("ExternalIP", "2001:db8::5")]);
        let info = node_info("n1", Some(&n), &cidrs(&["fd00::/64"]));
        assert_eq!(info.nodeport_addrs, ips(&["192.168.1.10", "fd00::1"]));
        let info = node_info("n1", Some(&n), &cidrs(&["10.0.0.0/8", "2001:db8::/32"]));
        assert_eq!(info.nodeport_addrs, ips(&["2001:db8::5"]));
    }

    /// An IPv6-only node: NodePorts on its IPv6 addresses, an IPv6 SNAT address, no IPv4.
    #[test]
    fn ipv6_only_node() {
        let n = node(&[("InternalIP", "fd00::10"), ("ExternalIP", "2001:db8::10")]);
        let info = node_info("n1", Some(&n), &[]);
        assert_eq!(info.nodeport_addrs, ips(&["2001:db8::10", "fd00::10"]));
        assert_eq!(snat_address(Some(&n)), None);
        assert_eq!(snat_address6(Some(&n)), Some("fd00::10".parse().unwrap()));
        let ext_only = node(&[("ExternalIP", "2001:db8::10"), ("InternalIP", "192.168.1.10")]);
        assert_eq!(snat_address6(Some(&ext_only)), Some("2001:db8::10".parse().unwrap()));
    }

    #[test]
    fn nodeport_addresses_filtered_by_cidr() {
        let n = node(&[("InternalIP", "192.168.1.10"), ("ExternalIP", "203.0.113.5")]);
        let info = node_info("n1", Some(&n), &cidrs(&["192.168.0.0/16"]));
        assert_eq!(info.nodeport_addrs, ips(&["192.168.1.10"]));
    }

    #[test]
    fn no_node_object_means_no_nodeport_addresses() {
        let info = node_info("n1", None, &[]);
        assert_eq!(info.name, "n1");
        assert!(info.nodeport_addrs.is_empty());
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

    /// Node addresses and --nodeport-addresses are sloppy like kube-proxy's
    /// (`ParseIPSloppy` / `ParseCIDRSloppy`): leading zeros are decimal.
    #[test]
    fn node_addresses_with_leading_zeros() {
        let n = node(&[("InternalIP", "192.168.001.010")]);
        assert_eq!(snat_address(Some(&n)), Some(Ipv4Addr::new(192, 168, 1, 10)));
        let info = node_info("n", Some(&n), &cidrs(&["192.168.001.000/24"]));
        assert_eq!(info.nodeport_addrs, ips(&["192.168.1.10"]));
    }
}
