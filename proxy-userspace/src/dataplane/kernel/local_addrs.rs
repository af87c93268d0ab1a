//! The local addresses of the calling network namespace over rtnetlink: what kube-proxy's
//! iptables mode matches with `--dst-type LOCAL` and filters `--nodeport-addresses` CIDRs
//! against (`model::node::node_info` selects from them). The agent lists them at start,
//! then follows `RTNLGRP_IPV4_IFADDR` / `RTNLGRP_IPV6_IFADDR`, so an address added or
//! removed later (a keepalived VIP moving in, a second NIC configured) re-translates the
//! NodePort frontends without a restart. `verify` lists them with the same code.
use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
};
use rtnetlink::{
    Handle,
    constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR},
    packet_core::NetlinkPayload,
    sys::{AsyncSocket, SocketAddr},
};
use tokio::sync::watch;
use tracing::{info, warn};

/// Reading the addresses failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalAddrsError {
    #[error("rtnetlink socket for the local addresses: {0}")]
    Socket(#[source] std::io::Error),
    #[error("listing the local addresses over rtnetlink: {0}")]
    Dump(#[source] rtnetlink::Error),
}

/// After an address notification, wait this long for the rest of its burst (an interface
/// coming up with several addresses, IPv6 autoconfiguration, a VIP set moving) and read
/// the addresses once.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Read everything again this often even without a notification: multicast notifications
/// are lost when the socket's buffer overflows (ENOBUFS), a dump never is.
const RESYNC: Duration = Duration::from_secs(60);

/// The address of one `RTM_NEWADDR`: `IFA_LOCAL` where present (on a point-to-point link
/// `IFA_ADDRESS` is the peer's), else `IFA_ADDRESS` (IPv6 has only that).
fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    let find = |local: bool| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

/// Every address of every interface of the namespace, both families, sorted, without
/// duplicates (loopback included: which ones serve NodePorts is the model's decision).
pub async fn list(handle: &Handle) -> Result<Vec<IpAddr>, LocalAddrsError> {
    let mut out = BTreeSet::new();
    let mut dump = handle.address().get().execute();
    while let Some(msg) = dump.try_next().await.map_err(LocalAddrsError::Dump)? {
        out.extend(address_of(&msg));
    }
    Ok(out.into_iter().collect())
}

/// [`list`] from synchronous code (`ebpf-proxy verify`), on a runtime of its own.
pub fn list_now() -> Result<Vec<IpAddr>, LocalAddrsError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(LocalAddrsError::Socket)?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LocalAddrsError::Socket)?;
        tokio::spawn(conn);
        list(&handle).await
    })
}

/// List the addresses now and follow them: returns the current list and a receiver that
/// sees every later change (debounced, see [`DEBOUNCE`]). Subscribes before listing, so
/// no change can slip between the two. The follower runs until the receiver is dropped.
pub async fn follow() -> Result<(Vec<IpAddr>, watch::Receiver<Vec<IpAddr>>), LocalAddrsError> {
    let (mut conn, _, mut messages) = rtnetlink::new_connection().map_err(LocalAddrsError::Socket)?;
    let groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
    conn.socket_mut().socket_mut().bind(&SocketAddr::new(0, groups)).map_err(LocalAddrsError::Socket)?;
    tokio::spawn(conn);
    let (dump_conn, handle, _) = rtnetlink::new_connection().map_err(LocalAddrsError::Socket)?;
    tokio::spawn(dump_conn);
    let now = list(&handle).await?;
    let (tx, rx) = watch::channel(now.clone());
    tokio::spawn(async move {
        let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
        loop {
            tokio::select! {
                msg = messages.next() => match msg.map(|(m, _)| m.payload) {
                    Some(NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_),
                    )) => {}
                    Some(_) => continue,
                    None => {
                        warn!("the local address notifications ended: NodePort addresses follow a full read every {RESYNC:?}");
                        resync.tick().await;
                    }
                },
                _ = resync.tick() => {}
                _ = tx.closed() => return,
            }
            tokio::time::sleep(DEBOUNCE).await;
            // The burst's other notifications: this read covers them.
            while messages.try_recv().is_ok() {}
            match list(&handle).await {
                Ok(addrs) => {
                    let before: BTreeSet<IpAddr> = tx.borrow().iter().copied().collect();
                    let after: BTreeSet<IpAddr> = addrs.iter().copied().collect();
                    if before != after {
                        let added: Vec<&IpAddr> = after.difference(&before).collect();
                        let removed: Vec<&IpAddr> = before.difference(&after).collect();
                        info!(?added, ?removed, "local addresses changed");
                        tx.send_replace(addrs);
                    }
                }
                Err(e) => warn!(error = %e, "cannot read the local addresses: NodePort addresses kept as they were"),
            }
        }
    });
    Ok((now, rx))
}
