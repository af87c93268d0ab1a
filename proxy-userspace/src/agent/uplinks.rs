//! Uplink detection when `--uplink` names none.
use std::{net::IpAddr, time::Duration};

use tracing::{info, warn};

use crate::dataplane::{
    attach::ifaces::{self, IfacePatterns},
    attach::uplinks,
};

/// Uplinks when `--uplink` names none: the devices carrying the Node's addresses and the
/// default routes' devices, re-read every few seconds and whenever the Node's addresses
/// change. New ones are attached; ones that vanish are forgotten. A device that stops being
/// an uplink but stays keeps its programs until it goes or the agent restarts (they only
/// act on traffic to our frontends).
pub(super) async fn detect_uplinks(
    pods: IfacePatterns,
    mut node_addrs: tokio::sync::watch::Receiver<Vec<IpAddr>>,
    tx: tokio::sync::mpsc::UnboundedSender<ifaces::LinkEvent>,
) {
    const EVERY: Duration = Duration::from_secs(2);
    let mut current: std::collections::BTreeMap<String, u32> = Default::default();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = node_addrs.changed() => if changed.is_err() { return },
        }
        let view = match tokio::task::block_in_place(uplinks::read_host) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "cannot read the interfaces to detect uplinks");
                continue;
            }
        };
        let addrs = node_addrs.borrow().clone();
        let want = uplinks::choose(&view, &addrs, |n| pods.matches(n));
        for (name, &index) in want.iter().filter(|(n, i)| current.get(*n) != Some(i)) {
            info!(iface = %name, ifindex = index, "detected uplink (carries a node address or the default route)");
            if tx.send(ifaces::LinkEvent::Uplink { index, name: name.clone() }).is_err() {
                return;
            }
        }
        for (name, &index) in current.iter().filter(|(n, _)| !view.links.contains_key(*n)) {
            let _ = tx.send(ifaces::LinkEvent::Gone { index, name: name.clone() });
        }
        current = want;
    }
}
