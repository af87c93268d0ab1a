//! Pod-facing interfaces over rtnetlink: the ones present at start-up, then every link that
//! appears or disappears (RTMGRP_LINK multicast), filtered by name patterns.
use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use rtnetlink::{
    constants::RTMGRP_LINK,
    packet_core::NetlinkPayload,
    sys::{AsyncSocket, SocketAddr},
};
use tokio::sync::mpsc::UnboundedSender;

use super::DataplaneError;

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

fn netlink_err(e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Attach { iface: String::new(), message: format!("rtnetlink: {e}") }
}

/// Report matching links on `tx`: first all present ones, then changes, until `tx` closes.
/// Subscribes before dumping so no link can slip between the two.
pub async fn watch(patterns: IfacePatterns, tx: UnboundedSender<LinkEvent>) -> Result<(), DataplaneError> {
    let (mut conn, _, mut messages) = rtnetlink::new_connection().map_err(netlink_err)?;
    conn.socket_mut().socket_mut().bind(&SocketAddr::new(0, RTMGRP_LINK)).map_err(netlink_err)?;
    tokio::spawn(conn);
    let (dump_conn, handle, _) = rtnetlink::new_connection().map_err(netlink_err)?;
    tokio::spawn(dump_conn);
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(netlink_err)? {
        if let Some(name) = name_of(&msg).filter(|n| patterns.matches(n))
            && tx.send(LinkEvent::Present { index: msg.header.index, name }).is_err()
        {
            return Ok(());
        }
    }
    if tx.send(LinkEvent::InitialDumpDone).is_err() {
        return Ok(());
    }
    while let Some((msg, _)) = messages.next().await {
        let ev = match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => name_of(&l)
                .filter(|n| patterns.matches(n))
                .map(|name| LinkEvent::Present { index: l.header.index, name }),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                name_of(&l).filter(|n| patterns.matches(n)).map(|name| LinkEvent::Gone { index: l.header.index, name })
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
        for n in ["veth1234abcd", "cali0ab12cd34", "lxc9f8e7d"] {
            assert!(p.matches(n), "{n}");
        }
        for n in ["eth0", "lo", "cni0", "lxc_health2"] {
            assert_eq!(p.matches(n), n.starts_with("lxc"), "{n}");
        }
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
