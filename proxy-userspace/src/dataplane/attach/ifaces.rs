//! Pod-facing interfaces over rtnetlink: the ones present at start-up, then every link that
//! appears or disappears (RTMGRP_LINK multicast). A link is reported when its name matches
//! the patterns (`--pod-iface-pattern`, the `--uplink` names), or, with `--pod-iface-detect`,
//! by what it is: the host side of a veth or netkit pair whose peer lives in another network
//! namespace (rtnetlink's `IFLA_LINK_NETNSID`), as every CNI wires a pod, whatever it names
//! the device (OVN-Kubernetes and Antrea use container ids and pod names). A node's own
//! uplink can be such a veth too (a kind node's eth0, whose peer is in the machine's
//! namespace): a device carrying a default route or a subnet address is never taken for a
//! pod interface by its kind.
use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
};

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkInfo, LinkMessage},
};
use rtnetlink::{
    constants::RTMGRP_LINK,
    packet_core::NetlinkPayload,
    sys::{AsyncSocket, SocketAddr},
};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use crate::dataplane::DataplaneError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    Present {
        index: u32,
        name: String,
    },
    /// An interface detected as an uplink (no `--uplink` given): attach XDP and TC egress.
    Uplink {
        index: u32,
        name: String,
    },
    Gone {
        index: u32,
        name: String,
    },
    /// Every link present at start-up has been reported.
    InitialDumpDone,
}

/// Interface name patterns (`veth*`, `cali*`, ...).
#[derive(Clone, Debug)]
pub struct IfacePatterns(Vec<glob::Pattern>);

impl IfacePatterns {
    pub fn new(patterns: &[String]) -> Result<Self, DataplaneError> {
        patterns
            .iter()
            .map(|p| {
                glob::Pattern::new(p).map_err(|e| DataplaneError::Attach {
                    iface: p.clone(),
                    message: format!("invalid interface pattern: {e}"),
                })
            })
            .collect::<Result<_, _>>()
            .map(IfacePatterns)
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name))
    }
}

fn name_of(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// What rtnetlink says about a link, as far as pod-interface discovery cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub name: String,
    /// `IFLA_INFO_KIND` (`veth`, `netkit`, `vxlan`, ...); `None` for devices without one
    /// (loopback, most physical NICs).
    pub kind: Option<String>,
    /// `IFLA_LINK_NETNSID` is present: the device's peer (a veth's other end, a netkit's
    /// primary) lives in another network namespace.
    pub peer_in_other_netns: bool,
}

impl LinkFacts {
    pub fn of(msg: &LinkMessage) -> Option<Self> {
        let name = name_of(msg)?;
        let mut kind = None;
        let mut peer_in_other_netns = false;
        for a in &msg.attributes {
            match a {
                LinkAttribute::LinkNetNsId(_) => peer_in_other_netns = true,
                LinkAttribute::LinkInfo(infos) => {
                    kind = infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(k) => Some(k.to_string()),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        Some(LinkFacts { name, kind, peer_in_other_netns })
    }

    /// The host side of a pod's veth (or netkit) pair, judged by the device alone.
    fn is_pod_pair(&self) -> bool {
        matches!(self.kind.as_deref(), Some("veth" | "netkit")) && self.peer_in_other_netns
    }
}

/// How the watcher recognises the interfaces it reports.
#[derive(Clone, Debug)]
pub struct Discovery {
    /// Reported whatever they are: the pod patterns and the exact `--uplink` names.
    pub names: IfacePatterns,
    /// Also report the host sides of veth/netkit pairs whose peer is in another namespace
    /// (`--pod-iface-detect`).
    pub by_kind: bool,
}

/// Why a link is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoundBy {
    Name,
    Kind,
}

impl Discovery {
    /// Whether (and why) to report `link`; `uplink_like` names the devices that carry a
    /// default route or a subnet address (see [`uplink_like_devices`]; `None`: unknown, so
    /// none is taken by its kind), asked only for a link that would be taken by its kind.
    pub fn classify(
        &self,
        link: &LinkFacts,
        uplink_like: impl FnOnce() -> Option<BTreeSet<String>>,
    ) -> Option<FoundBy> {
        if self.names.matches(&link.name) {
            return Some(FoundBy::Name);
        }
        let not_uplink = || uplink_like().is_some_and(|u| !u.contains(&link.name));
        (self.by_kind && link.is_pod_pair() && not_uplink()).then_some(FoundBy::Kind)
    }
}

/// Whether `addr/prefix_len` is an address of a subnet (not a host route, not link-local,
/// not loopback): what a node's uplink holds and a pod's host-side veth does not (it has
/// none, a /32 or /128 gateway address, or an IPv6 link-local one).
fn is_subnet_address(addr: IpAddr, prefix_len: u32) -> bool {
    match addr {
        IpAddr::V4(a) => prefix_len < 32 && !a.is_link_local() && !a.is_loopback(),
        IpAddr::V6(a) => prefix_len < 128 && !a.is_unicast_link_local() && !a.is_loopback(),
    }
}

/// The devices of the calling thread's namespace that look like a node's uplink: they carry
/// a default route (IPv4 or IPv6) or a subnet address. `None` when they cannot be read:
/// then no link is taken by its kind (an uplink must never get the pod programs), logged.
pub fn uplink_like_devices() -> Option<BTreeSet<String>> {
    let read = || -> Result<BTreeSet<String>, String> {
        let mut out = super::uplinks::read_host().map_err(|e| format!("default routes: {e}"))?.default_devs;
        for ifa in nix::ifaddrs::getifaddrs().map_err(|e| format!("addresses: {e}"))? {
            let (Some(addr), Some(mask)) = (ifa.address.as_ref(), ifa.netmask.as_ref()) else { continue };
            let (ip, prefix_len) = if let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
                (IpAddr::V4(a.ip()), m.ip().to_bits().count_ones())
            } else if let (Some(a), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
                (IpAddr::V6(a.ip()), m.ip().to_bits().count_ones())
            } else {
                continue;
            };
            if is_subnet_address(ip, prefix_len) {
                out.insert(ifa.interface_name);
            }
        }
        Ok(out)
    };
    read().map_err(|e| warn!(error = %e, "cannot tell uplinks from pod interfaces: none is taken by its kind now")).ok()
}

fn netlink_err(e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Attach { iface: String::new(), message: format!("rtnetlink: {e}") }
}

/// The event for a new or changed link, if it is one to report; remembers what it reported
/// so that its removal is reported too (a deleted veth may no longer say where its peer was).
fn present(discovery: &Discovery, reported: &mut HashSet<u32>, msg: &LinkMessage) -> Option<LinkEvent> {
    let facts = LinkFacts::of(msg)?;
    let found = discovery.classify(&facts, uplink_like_devices)?;
    let index = msg.header.index;
    if found == FoundBy::Kind && !reported.contains(&index) {
        info!(
            iface = %facts.name,
            ifindex = index,
            kind = facts.kind.as_deref().unwrap_or(""),
            "pod interface found by its kind: the host side of a pair whose peer is in another network namespace"
        );
    }
    reported.insert(index);
    Some(LinkEvent::Present { index, name: facts.name })
}

/// Report pod interfaces and the named links on `tx` (see [`Discovery`]): first all present
/// ones, then changes, until `tx` closes. Subscribes before dumping so no link can slip
/// between the two.
pub async fn watch(discovery: Discovery, tx: UnboundedSender<LinkEvent>) -> Result<(), DataplaneError> {
    let (mut conn, _, mut messages) = rtnetlink::new_connection().map_err(netlink_err)?;
    conn.socket_mut().socket_mut().bind(&SocketAddr::new(0, RTMGRP_LINK)).map_err(netlink_err)?;
    tokio::spawn(conn);
    let (dump_conn, handle, _) = rtnetlink::new_connection().map_err(netlink_err)?;
    tokio::spawn(dump_conn);
    let mut reported = HashSet::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(netlink_err)? {
        if let Some(ev) = present(&discovery, &mut reported, &msg)
            && tx.send(ev).is_err()
        {
            return Ok(());
        }
    }
    if tx.send(LinkEvent::InitialDumpDone).is_err() {
        return Ok(());
    }
    while let Some((msg, _)) = messages.next().await {
        let ev = match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => present(&discovery, &mut reported, &l),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                let index = l.header.index;
                let name = name_of(&l).unwrap_or_default();
                (reported.remove(&index) || discovery.names.matches(&name)).then_some(LinkEvent::Gone { index, name })
            }
            _ => None,
        };
        if let Some(ev) = ev
            && tx.send(ev).is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

/// The kernel driver behind `iface` (`ETHTOOL_GDRVINFO`, as `ethtool -i` shows it), in
/// the caller's network namespace; `None` if it cannot be asked.
pub fn driver(iface: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 4 * 5],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    if iface.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 32 * 4 + 12 + 4 * 5] };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: &mut info, _pad: [0; 16] };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a socket we close again, and SIOCETHTOOL with an ifreq whose data points at a
    // live, correctly sized ethtool_drvinfo.
    let rc = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        libc::close(fd);
        rc
    };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_patterns_match_common_cni_veths() {
        let p = IfacePatterns::new(&["veth*".into(), "cali*".into(), "lxc*".into()]).unwrap();
        assert!(!discovery(true).names.matches("antrea-gw0"));
        for n in ["veth1234abcd", "cali0ab12cd34", "lxc9f8e7d"] {
            assert!(p.matches(n), "{n}");
        }
        for n in ["eth0", "lo", "cni0", "lxc_health2"] {
            assert_eq!(p.matches(n), n.starts_with("lxc"), "{n}");
        }
    }

    fn link(name: &str, kind: Option<&str>, peer_in_other_netns: bool) -> LinkFacts {
        LinkFacts { name: name.into(), kind: kind.map(str::to_string), peer_in_other_netns }
    }

    fn discovery(by_kind: bool) -> Discovery {
        let names = crate::cli::DEFAULT_POD_IFACE_PATTERNS.split(',').map(str::to_string).collect::<Vec<_>>();
        Discovery { names: IfacePatterns::new(&names).unwrap(), by_kind }
    }

    /// The host sides of pod veths as each common CNI names them are found: by name where
    /// the CNI has a prefix, by kind (veth/netkit, peer in another namespace) where not.
    #[test]
    fn pod_interfaces_of_common_cnis() {
        let d = discovery(true);
        let none = || Some(BTreeSet::new());
        for (name, by) in [
            ("veth3f2a1b0c", FoundBy::Name),    // kindnet, flannel, bridge
            ("cali1a2b3c4d5e6", FoundBy::Name), // Calico
            ("lxc8e7f6a5b4c3", FoundBy::Name),  // Cilium
            ("eni5d4c3b2a190", FoundBy::Name),  // Amazon VPC CNI
            ("gke0123abcd456", FoundBy::Name),  // GKE
            ("azv7f6e5d4c3b2", FoundBy::Name),  // Azure CNI
            ("3f8c2d1e0a9b7c6", FoundBy::Kind), // OVN-Kubernetes: container id
            ("coredns--4f2b3c", FoundBy::Kind), // Antrea: pod name and hash
        ] {
            assert_eq!(d.classify(&link(name, Some("veth"), true), none), Some(by), "{name}");
        }
        assert_eq!(d.classify(&link("nk0a1b2c", Some("netkit"), true), none), Some(FoundBy::Kind));
    }

    /// Not pods: a veth whose peer is in this namespace, other kinds of device (Antrea's
    /// gateway is an OVS internal port, flannel's vxlan, a bridge), and a veth to another
    /// namespace that is the node's uplink (kind's eth0): it carries a default route or a
    /// subnet address. Without detection only names count.
    #[test]
    fn non_pod_interfaces_are_left_alone() {
        let d = discovery(true);
        let none = || Some(BTreeSet::new());
        assert_eq!(d.classify(&link("link0", Some("veth"), false), none), None);
        assert_eq!(d.classify(&link("antrea-gw0", Some("openvswitch"), false), none), None);
        assert_eq!(d.classify(&link("flannel.1", Some("vxlan"), false), none), None);
        assert_eq!(d.classify(&link("cni0", Some("bridge"), false), none), None);
        assert_eq!(d.classify(&link("eth0", None, false), none), None);
        let uplinks = || Some(["eth0".to_string()].into_iter().collect::<BTreeSet<_>>());
        assert_eq!(d.classify(&link("eth0", Some("veth"), true), uplinks), None);
        assert_eq!(d.classify(&link("3f8c2d1e0a9b7c6", Some("veth"), true), uplinks), Some(FoundBy::Kind));
        // The uplink check is only made for a link that would be taken by its kind.
        let never = || -> Option<BTreeSet<String>> { panic!("asked for the uplinks") };
        assert_eq!(d.classify(&link("veth1", Some("veth"), true), never), Some(FoundBy::Name));
        assert_eq!(discovery(false).classify(&link("3f8c2d1e0a9b7c6", Some("veth"), true), never), None);
        // Uplinks unknown (the host could not be read): nothing is taken by its kind.
        assert_eq!(d.classify(&link("3f8c2d1e0a9b7c6", Some("veth"), true), || None), None);
    }

    #[test]
    fn subnet_addresses_mark_uplinks_gateway_and_link_local_ones_do_not() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(is_subnet_address(ip("172.18.0.2"), 16));
        assert!(is_subnet_address(ip("fc00:f853:ccd:e793::2"), 64));
        assert!(!is_subnet_address(ip("10.244.0.1"), 32)); // ptp gateway on a pod veth
        assert!(!is_subnet_address(ip("169.254.1.1"), 16));
        assert!(!is_subnet_address(ip("fe80::1"), 64));
        assert!(!is_subnet_address(ip("127.0.0.1"), 8));
    }

    #[test]
    fn driver_of_loopback_and_missing_interface() {
        // lo has no ethtool driver info; a missing interface has none either. Neither may
        // panic or return garbage.
        assert_eq!(driver("no-such-if0"), None);
        let _ = driver("lo");
        assert_eq!(driver("an-interface-name-too-long"), None);
    }

    #[test]
    fn invalid_pattern_is_an_error_naming_it() {
        let e = IfacePatterns::new(&["[".into()]).unwrap_err();
        assert!(e.to_string().contains('['));
    }
}
