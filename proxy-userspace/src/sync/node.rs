//! The node's own entries (`NODE_CONFIG`, `NODE_CONFIG6`: SNAT and hairpin addresses, SNAT
//! ports), step 1 of a pass: before any frontend is written, so a flow to a new remote
//! backend finds the SNAT address it needs. Each family's entry is written when it differs
//! from what this syncer wrote last (once per start, then on a change); a failed write is
//! logged and retried by the next pass. They are no Service state, so they are not counted
//! as map writes: a restart that writes them again still "writes nothing" for the Services.
use std::collections::BTreeMap;

use tracing::error;

use super::store::{MapStore, NodeFacts};
use crate::model::IpFamily;

/// The node's facts: wanted, and as written.
#[derive(Default)]
pub(super) struct NodeEntries {
    wanted: BTreeMap<IpFamily, NodeFacts>,
    written: BTreeMap<IpFamily, NodeFacts>,
}

impl NodeEntries {
    /// Keep `facts` from the next pass on (a family never given is left as it is).
    pub(super) fn set(&mut self, facts: impl IntoIterator<Item = NodeFacts>) {
        self.wanted.extend(facts.into_iter().map(|f| (f.family(), f)));
    }

    /// Step 1: write the entries that changed.
    pub(super) fn write(&mut self, store: &mut impl MapStore) {
        for (family, facts) in &self.wanted {
            if self.written.get(family) == Some(facts) {
                continue;
            }
            match store.put_node_config(facts) {
                Ok(()) => {
                    self.written.insert(*family, *facts);
                }
                Err(e) => match family {
                    IpFamily::V4 => error!(error = %e, "cannot write the node config"),
                    IpFamily::V6 => error!(error = %e, "cannot write the IPv6 node config"),
                },
            }
        }
    }
}
