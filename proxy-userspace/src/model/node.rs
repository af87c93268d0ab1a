//! The agent's own Node -> the node facts the translation needs.
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Node;

use super::{
    addr::parse_ip_sloppy,
    types::{Ipv4Prefix, NodeInfo, Warning},
};

/// The Node label topology-aware routing matches zone hints against.
const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// A node address from the Node object, IPv4 only, sloppy like kube-proxy.
fn node_ipv4(s: &str) -> Option<Ipv4Addr> {
    match parse_ip_sloppy(s)? {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

/// NodeInfo for `name`: NodePort addresses are the node's InternalIP/ExternalIP IPv4
/// addresses, restricted to `nodeport_cidrs` when any are given (kube-proxy's
/// `--nodeport-addresses`). Bad CIDRs are reported, not fatal.
pub fn node_info(name: &str, node: Option<&Node>, nodeport_cidrs: &[String]) -> (NodeInfo, Vec<Warning>) {
    let mut warnings = Vec::new();
    let mut prefixes = Vec::new();
    // An empty value (e.g. an empty ConfigMap key) means "no restriction".
    for c in nodeport_cidrs.iter().filter(|c| !c.trim().is_empty()) {
        match c.parse::<Ipv4Prefix>() {
            Ok(p) => prefixes.push(p),
            Err(_) => warnings.push(Warning {
                object: "--nodeport-addresses".into(),
                kind: "Flag",
                message: format!("ignoring invalid IPv4 CIDR {c:?}"),
            }),
        }
    }
    let mut addrs: Vec<Ipv4Addr> = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| node_ipv4(&a.address))
        .filter(|ip| prefixes.is_empty() || prefixes.iter().any(|p| p.contains(*ip)))
        .collect();
    addrs.sort();
    addrs.dedup();
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
        .filter(|z| !z.is_empty())
        .cloned();
    (NodeInfo { name: name.to_string(), nodeport_addrs: addrs, zone }, warnings)
}

/// The address north-south flows to a backend on another node are source-NATed to, so
/// that the backend's replies come back here: the node's first IPv4 InternalIP (what other
/// nodes reach it by), else its first IPv4 ExternalIP. `None` without a Node object; the
/// datapath then uses the address the client connected to.
pub fn snat_address(node: Option<&Node>) -> Option<Ipv4Addr> {
    let addrs = node.and_then(|n| n.status.as_ref()).and_then(|s| s.addresses.as_ref())?;
    let first = |kind: &str| addrs.iter().filter(|a| a.type_ == kind).find_map(|a| node_ipv4(&a.address));
    first("InternalIP").or_else(|| first("ExternalIP"))
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
    fn nodeport_addresses_default_to_all_node_ipv4s() {
        let n = node(&[
            ("InternalIP", "192.168.1.10"),
            ("Hostname", "n1"),
            ("ExternalIP", "203.0.113.5"),
            ("InternalIP", "fd00::1"),
        ]);
        let (info, w) = node_info("n1", Some(&n), &[]);
        assert!(w.is_empty());
        assert_eq!(info.nodeport_addrs, vec![Ipv4Addr::new(192, 168, 1, 10), Ipv4Addr::new(203, 0, 113, 5)]);
    }

    #[test]
    fn nodeport_addresses_filtered_by_cidr_and_bad_cidr_warned() {
        let n = node(&[("InternalIP", "192.168.1.10"), ("ExternalIP", "203.0.113.5")]);
        let (info, w) = node_info("n1", Some(&n), &["192.168.0.0/16".into(), "nonsense".into()]);
        assert_eq!(info.nodeport_addrs, vec![Ipv4Addr::new(192, 168, 1, 10)]);
        assert_eq!(w.len(), 1);
        assert!(w[0].message.contains("nonsense"));
    }

    #[test]
    fn no_node_object_means_no_nodeport_addresses() {
        let (info, _) = node_info("n1", None, &[]);
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
        let (info, warnings) = node_info("n", Some(&n), &["192.168.001.000/24".into()]);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(info.nodeport_addrs, vec![Ipv4Addr::new(192, 168, 1, 10)]);
    }
}
