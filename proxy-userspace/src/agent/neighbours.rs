//! The neighbour resolver: XDP forwarding needs a neighbour entry for the next hop; when
//! it finds none it records the miss, and this asks the kernel to resolve it.
use std::time::Duration;

use tracing::{error, info, warn};

use crate::dataplane::maps::node::{NodeMaps, resolve_neighbour};

/// Ask the kernel to resolve the next hops XDP found no neighbour entry for. Polled: the
/// map is tiny and usually empty, and a miss costs the client one retransmission anyway.
pub(super) async fn neighbour_resolver(mut maps: NodeMaps) {
    let (conn, handle, _) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "neighbour resolver: no rtnetlink socket; XDP forwarding relies on the kernel's own resolution");
            return;
        }
    };
    tokio::spawn(conn);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        for (ifindex, next_hop) in maps.take_neigh_misses() {
            match resolve_neighbour(&handle, ifindex, next_hop).await {
                Ok(()) => info!(ifindex, %next_hop, "XDP next hop had no neighbour entry; resolving"),
                Err(e) => warn!(ifindex, %next_hop, error = %e, "cannot trigger neighbour resolution"),
            }
        }
    }
}
