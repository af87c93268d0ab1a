//! The node's own entries (`NODE_CONFIG`, `NODE_CONFIG6`: SNAT and hairpin addresses, SNAT
//! ports), step 1 of a pass: before any frontend is written, so a flow to a new remote
//! backend finds the SNAT address it needs. Each family's entry is written when it differs
//! from what this syncer wrote last (once per start, then on a change); a failed write is
//! logged and retried by the next pass. They are no Service state, so they are not counted
//! as map writes: a restart that writes them again still "writes nothing" for the Services.
use std::collections::BTreeMap;

use tracing::error;

use super::{
    Syncer,
    store::{MapStore, NodeFacts},
};
use crate::model::IpFamily;

/// The node's facts: wanted, and as written.
#[derive(Default)]
pub(super) struct NodeEntries {
    wanted: BTreeMap<IpFamily, NodeFacts>,
    written: BTreeMap<IpFamily, NodeFacts>,
}

impl<S: MapStore> Syncer<S> {
    /// Keep `facts` in the node's entries from the next pass on (one per family; a family
    /// never given has its entry left as it is).
    pub fn set_node_facts(&mut self, facts: impl IntoIterator<Item = NodeFacts>) {
        self.node.wanted.extend(facts.into_iter().map(|f| (f.family(), f)));
    }

    /// Step 1: the node's entries that changed.
    pub(super) fn write_node_entries(&mut self) {
        let NodeEntries { wanted, written } = &mut self.node;
        for (family, facts) in wanted.iter() {
            if written.get(family) == Some(facts) {
                continue;
            }
            match self.store.put_node_config(facts) {
                Ok(()) => {
                    written.insert(*family, *facts);
                }
                Err(e) => match family {
                    IpFamily::V4 => error!(error = %e, "cannot write the node config"),
                    IpFamily::V6 => error!(error = %e, "cannot write the IPv6 node config"),
                },
            }
        }
    }
}
