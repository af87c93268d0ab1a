//! Conntrack garbage collection: the agent's half of the conntrack lifecycle.
//!
//! The datapath records what it sees in each flow's forward entry (reply seen, FIN per
//! side, RST: `proxy_common::ct_flags`) and never evicts anything; this collector removes
//! flows whose idle time exceeds their state's timeout (`proxy_common::ct::CtTimeouts`), and
//! when the table is under pressure it also removes closed flows and unanswered new ones
//! early, in that order. Established and half-closed flows are only ever removed when they
//! expire: that is the guarantee an LRU could not give.
//!
//! A flow is a pair of entries. The forward entry decides; its reply entry goes with it.
//! An expired forward entry whose reply entry is still fresh is kept (one-way traffic from
//! the backend refreshes only the reply side). A reply entry whose forward entry is gone is
//! an orphan and is removed once it has been idle for the orphan grace period (never at
//! once: the datapath creates a source-NATed flow's reply entry first).
//!
//! Each pass reads at most `budget` entries (continuing where the previous pass stopped),
//! so a pass is bounded whatever the table's size; the decisions are pure and work on the
//! [`CtTable`] trait, implemented by the kernel map (`dataplane::ct_table`) and by an
//! in-memory table in the unit tests.
//!
//! Both families are collected by the same code: the table, the collector and the decisions
//! are generic over the address type ([`CtAddr`]: `u32` for `CONNTRACK`, `Ipv6Words` for
//! `CONNTRACK6`), and the agent runs one collector per family.
pub mod task;

use std::{collections::HashSet, fmt::Debug, hash::Hash};

use proxy_common::{
    CT_DIR_REPLY, CtKey, CtValue, Ipv6Words,
    ct::{self, CtState, CtTimeouts},
    map_names,
};

/// The address type of a conntrack table, and the map that holds that family's entries.
pub trait CtAddr: Copy + Default + Eq + Hash + Ord + Debug + Send + Sync + 'static {
    const MAP: &'static str;
    /// The family's name, for metric labels ("IPv4", "IPv6").
    const FAMILY: &'static str;
}

impl CtAddr for u32 {
    const MAP: &'static str = map_names::CONNTRACK;
    const FAMILY: &'static str = "IPv4";
}

impl CtAddr for Ipv6Words {
    const MAP: &'static str = map_names::CONNTRACK6;
    const FAMILY: &'static str = "IPv6";
}

/// How CONNTRACK entries carried over from an older map are read (`dataplane::migrate`).
///
/// A table made by an agent from before the conntrack lifecycle (an LRU without per-flow
/// state) has no `SEEN_REPLY`: its flows would all count as unanswered SYNs and the GC
/// would remove idle established connections after `tcp_syn` seconds. Every entry of such
/// a table that is not closing is taken as established (at worst an unanswered SYN of the
/// old table lives until the established timeout). Entries of a stateful table are kept
/// as they are.
pub struct CtUpgrade;

impl crate::dataplane::migrate::Upgrade<CtKey, CtValue> for CtUpgrade {
    fn upgrade(old: &crate::dataplane::migrate::MapSpec, _: &CtKey, mut v: CtValue) -> CtValue {
        let stateless = old.map_type == aya::maps::MapType::LruHash as u32;
        if stateless && v.flags & proxy_common::ct_flags::CLOSING == 0 {
            v.flags |= proxy_common::ct_flags::SEEN_REPLY;
        }
        v
    }
}

/// Where the collector reads and deletes entries (one family's table).
pub trait CtTable {
    type Addr: CtAddr;
    type Error: std::error::Error + Send + Sync + 'static;
    /// Up to `max` entries starting at `cursor` (`None`: the beginning), and the cursor of
    /// the next chunk (`None` when this chunk reached the end of the table).
    fn read_chunk(&mut self, cursor: Option<u32>, max: usize) -> Result<Chunk<Self::Addr>, Self::Error>;
    fn get(&self, key: &CtKey<Self::Addr>) -> Result<Option<CtValue<Self::Addr>>, Self::Error>;
    /// Whether the entry was there; deleting an entry that is already gone is not an error.
    fn delete(&mut self, key: &CtKey<Self::Addr>) -> Result<bool, Self::Error>;
}

pub struct Chunk<A = u32> {
    pub entries: Vec<(CtKey<A>, CtValue<A>)>,
    pub next: Option<u32>,
}

/// Why an entry was removed (metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Idle longer than its state's timeout.
    Expired,
    /// Closed, or new and unanswered, while the table was under pressure.
    Pressure,
    /// A reply entry whose forward entry is gone.
    Orphan,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::Expired, Reason::Pressure, Reason::Orphan];
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::Pressure => "pressure",
            Reason::Orphan => "orphan",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct GcConfig {
    pub timeouts: CtTimeouts,
    /// Entries read per pass at most.
    pub budget: usize,
    /// Under pressure, new (unanswered) flows younger than this are kept: a handshake in
    /// progress is not a flood.
    pub new_grace_ns: u64,
    /// Reply entries without a forward entry are removed after this much idle time.
    pub orphan_grace_ns: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            timeouts: CtTimeouts::default(),
            budget: 65_536,
            new_grace_ns: 1_000_000_000,
            orphan_grace_ns: 30_000_000_000,
        }
    }
}

/// What one pass did, and (when it finished a walk over the whole table) what the table
/// held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub scanned: u64,
    /// Entries removed, by reason (indexed like [`Reason::ALL`]); a flow counts two entries.
    pub deleted: [u64; 3],
    /// Set when this pass completed a walk over the whole table: flows (forward entries) by
    /// state (indexed like `CtState::ALL`) and entries in total, as they were left.
    pub census: Option<Census>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub flows_by_state: [u64; 4],
    pub entries: u64,
}

impl PassReport {
    pub fn deleted_total(&self) -> u64 {
        self.deleted.iter().sum()
    }
}

fn state_index(s: CtState) -> usize {
    CtState::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

fn reason_index(r: Reason) -> usize {
    Reason::ALL.iter().position(|x| *x == r).unwrap_or(0)
}

/// What to do with one forward entry, before looking at its reply entry.
fn judge_forward<A>(k: &CtKey<A>, v: &CtValue<A>, now: u64, cfg: &GcConfig, pressure: bool) -> Option<Reason> {
    let state = ct::state(k.proto, v.flags);
    let idle = now.saturating_sub(v.last_seen);
    if idle > cfg.timeouts.idle_ns(k.proto, state) {
        return Some(Reason::Expired);
    }
    if pressure {
        match state {
            CtState::Closed => return Some(Reason::Pressure),
            CtState::New if idle > cfg.new_grace_ns => return Some(Reason::Pressure),
            _ => {}
        }
    }
    None
}

/// The collector: a cursor into the table that persists across passes.
pub struct Gc<T> {
    table: T,
    cfg: GcConfig,
    cursor: Option<u32>,
    walk: Census,
}

impl<T: CtTable> Gc<T> {
    pub fn new(table: T, cfg: GcConfig) -> Self {
        Gc { table, cfg, cursor: None, walk: Census::default() }
    }

    pub fn table(&self) -> &T {
        &self.table
    }

    /// One bounded pass. `now` is `CLOCK_MONOTONIC` in nanoseconds (what
    /// `bpf_ktime_get_ns` returns); `pressure` lets closed and stale new flows go early.
    pub fn pass(&mut self, now: u64, pressure: bool) -> Result<PassReport, T::Error> {
        let mut report = PassReport::default();
        let mut remaining = self.cfg.budget.max(1);
        // Partners deleted with their flow may still come up later in a chunk read earlier.
        let mut gone: HashSet<CtKey<T::Addr>> = HashSet::new();
        loop {
            let chunk = self.table.read_chunk(self.cursor, remaining)?;
            remaining = remaining.saturating_sub(chunk.entries.len());
            report.scanned += chunk.entries.len() as u64;
            for (k, v) in &chunk.entries {
                if !gone.contains(k) {
                    self.judge(k, v, now, pressure, &mut report, &mut gone)?;
                }
            }
            self.cursor = chunk.next;
            if chunk.next.is_none() {
                report.census = Some(std::mem::take(&mut self.walk));
                return Ok(report);
            }
            if remaining == 0 {
                return Ok(report);
            }
        }
    }

    fn judge(
        &mut self,
        k: &CtKey<T::Addr>,
        v: &CtValue<T::Addr>,
        now: u64,
        pressure: bool,
        report: &mut PassReport,
        gone: &mut HashSet<CtKey<T::Addr>>,
    ) -> Result<(), T::Error> {
        let mut remove = |table: &mut T, keys: &[CtKey<T::Addr>], why: Reason| -> Result<(), T::Error> {
            for key in keys {
                gone.insert(*key);
                if table.delete(key)? {
                    report.deleted[reason_index(why)] += 1;
                }
            }
            Ok(())
        };
        if k.dir == CT_DIR_REPLY {
            let idle = now.saturating_sub(v.last_seen);
            let grace = if pressure { self.cfg.new_grace_ns } else { self.cfg.orphan_grace_ns };
            if idle > grace && self.table.get(&k.forward_of_reply(v))?.is_none() {
                return remove(&mut self.table, &[*k], Reason::Orphan);
            }
            // Kept; its flow is counted through the forward entry.
            self.walk.entries += 1;
            return Ok(());
        }
        let reply = k.reply_of_forward(v);
        match judge_forward(k, v, now, &self.cfg, pressure) {
            Some(Reason::Expired) => {
                // Alive through the other direction? Then it is not idle.
                let state = ct::state(k.proto, v.flags);
                let fresh = self
                    .table
                    .get(&reply)?
                    .is_some_and(|r| now.saturating_sub(r.last_seen) <= self.cfg.timeouts.idle_ns(k.proto, state));
                if !fresh {
                    return remove(&mut self.table, &[*k, reply], Reason::Expired);
                }
            }
            Some(why) => return remove(&mut self.table, &[*k, reply], why),
            None => {}
        }
        self.walk.entries += 1;
        self.walk.flows_by_state[state_index(ct::state(k.proto, v.flags))] += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, convert::Infallible};

    use proxy_common::{CT_DIR_FORWARD, PROTO_TCP, PROTO_UDP, ct_flags};

    use super::*;

    const S: u64 = 1_000_000_000;

    /// An in-memory table whose chunks follow key order, with the cursor as an index.
    struct MemTable<A = u32>(BTreeMap<CtKey<A>, CtValue<A>>);

    impl<A> Default for MemTable<A> {
        fn default() -> Self {
            MemTable(BTreeMap::new())
        }
    }

    impl<A: CtAddr> CtTable for MemTable<A> {
        type Addr = A;
        type Error = Infallible;
        fn read_chunk(&mut self, cursor: Option<u32>, max: usize) -> Result<Chunk<A>, Infallible> {
            let start = cursor.unwrap_or(0) as usize;
            let entries: Vec<_> = self.0.iter().skip(start).take(max).map(|(k, v)| (*k, *v)).collect();
            let end = start + entries.len();
            Ok(Chunk { next: (end < self.0.len()).then_some(end as u32), entries })
        }
        fn get(&self, key: &CtKey<A>) -> Result<Option<CtValue<A>>, Infallible> {
            Ok(self.0.get(key).copied())
        }
        fn delete(&mut self, key: &CtKey<A>) -> Result<bool, Infallible> {
            Ok(self.0.remove(key).is_some())
        }
    }

    /// A flow from client port `sport` to VIP 2:80 on backend 3:8080, with `flags` and the
    /// two entries last seen at `fwd_seen` / `rev_seen`.
    fn flow(t: &mut MemTable, proto: u8, sport: u16, flags: u8, fwd_seen: u64, rev_seen: Option<u64>) -> CtKey {
        let k = CtKey { src_addr: 1, dst_addr: 2, src_port: sport, dst_port: 80, proto, dir: CT_DIR_FORWARD, _pad: 0 };
        let v = CtValue { nat_addr: 3, nat_port: 8080, flags, last_seen: fwd_seen, ..Default::default() };
        if let Some(seen) = rev_seen {
            let rk = k.reply_of_forward(&v);
            let rv = CtValue { nat_addr: 2, nat_port: 80, flags, last_seen: seen, ..Default::default() };
            t.0.insert(rk, rv);
        }
        t.0.insert(k, v);
        k
    }

    fn gc(t: MemTable) -> Gc<MemTable> {
        Gc::new(t, GcConfig::default())
    }

    const EST: u8 = ct_flags::SEEN_REPLY;
    const CLOSED: u8 = ct_flags::SEEN_REPLY | ct_flags::CLOSING | ct_flags::FIN_FWD | ct_flags::FIN_REV;

    #[test]
    fn closed_flows_go_after_their_grace_period_with_their_reply_entry() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        let old = flow(&mut t, PROTO_TCP, 1, CLOSED, now - 11 * S, Some(now - 11 * S));
        let recent = flow(&mut t, PROTO_TCP, 2, CLOSED, now - 2 * S, Some(now - 2 * S));
        let mut g = gc(t);
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted, [2, 0, 0]);
        assert!(!g.table().0.contains_key(&old));
        assert!(g.table().0.contains_key(&recent));
        assert_eq!(g.table().0.len(), 2, "the recent flow keeps both entries");
    }

    #[test]
    fn pressure_removes_closed_then_stale_new_but_never_established() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        // An established flow idle for an hour: far from its 24 h timeout.
        let idle = flow(&mut t, PROTO_TCP, 1, EST, now - 3_600 * S, Some(now - 3_600 * S));
        let closed = flow(&mut t, PROTO_TCP, 2, CLOSED, now - S / 2, Some(now - S / 2));
        let stale_syn = flow(&mut t, PROTO_TCP, 3, 0, now - 5 * S, Some(now - 5 * S));
        let fresh_syn = flow(&mut t, PROTO_TCP, 4, 0, now - S / 10, Some(now - S / 10));
        let half_closed =
            flow(&mut t, PROTO_TCP, 5, EST | ct_flags::CLOSING | ct_flags::FIN_FWD, now - 60 * S, Some(now - 60 * S));
        let mut g = gc(t);
        // Without pressure nothing here has expired.
        assert_eq!(g.pass(now, false).unwrap().deleted_total(), 0);
        let r = g.pass(now, true).unwrap();
        assert_eq!(r.deleted, [0, 4, 0]);
        for k in [closed, stale_syn] {
            assert!(!g.table().0.contains_key(&k));
        }
        for k in [idle, fresh_syn, half_closed] {
            assert!(g.table().0.contains_key(&k));
        }
        let census = r.census.expect("one pass covers this small table");
        assert_eq!(census.flows_by_state, [1, 1, 1, 0]);
        assert_eq!(census.entries, 6);
    }

    #[test]
    fn an_expired_forward_entry_lives_on_while_its_reply_side_is_active() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        // UDP, the backend streams to the client: only the reply entry is refreshed.
        let streaming = flow(&mut t, PROTO_UDP, 1, EST, now - 500 * S, Some(now - S));
        let dead = flow(&mut t, PROTO_UDP, 2, EST, now - 500 * S, Some(now - 500 * S));
        let unanswered = flow(&mut t, PROTO_UDP, 3, 0, now - 31 * S, None);
        let mut g = gc(t);
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted[0], 2 + 1, "the dead flow's pair, the unanswered flow's forward entry");
        assert!(g.table().0.contains_key(&streaming));
        assert!(!g.table().0.contains_key(&dead));
        assert!(!g.table().0.contains_key(&unanswered));
    }

    #[test]
    fn orphan_reply_entries_go_after_their_grace() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        let k = flow(&mut t, PROTO_TCP, 1, EST, now - 40 * S, Some(now - 40 * S));
        let young = flow(&mut t, PROTO_TCP, 2, EST, now - 5 * S, Some(now - 5 * S));
        t.0.remove(&k);
        t.0.remove(&young);
        let mut g = gc(t);
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted, [0, 0, 1]);
        assert_eq!(g.table().0.len(), 1, "the young orphan waits (its forward entry may be on its way)");
    }

    /// The IPv6 table goes through the same collector: a closed IPv6 flow goes after its
    /// grace with its reply entry, an established one stays and is counted.
    #[test]
    fn ipv6_flows_are_collected_like_ipv4_ones() {
        let mut t: MemTable<Ipv6Words> = MemTable::default();
        let now = 100_000 * S;
        let (client, vip, backend) = ([0xfd00, 0, 0, 1u32.to_be()], [0xfd00, 0, 0, 2u32.to_be()], [0xfd00, 0, 0, 3]);
        let mut add = |sport: u16, flags: u8, seen: u64| {
            let k = CtKey {
                src_addr: client,
                dst_addr: vip,
                src_port: sport,
                dst_port: 80,
                proto: PROTO_TCP,
                dir: CT_DIR_FORWARD,
                _pad: 0,
            };
            let v = CtValue { nat_addr: backend, nat_port: 8080, flags, last_seen: seen, ..Default::default() };
            let rv = CtValue { nat_addr: vip, nat_port: 80, flags, last_seen: seen, ..Default::default() };
            t.0.insert(k.reply_of_forward(&v), rv);
            t.0.insert(k, v);
            k
        };
        let closed = add(1, CLOSED, now - 11 * S);
        let live = add(2, EST, now - 60 * S);
        let mut g = Gc::new(t, GcConfig::default());
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted, [2, 0, 0]);
        assert!(!g.table().0.contains_key(&closed) && g.table().0.contains_key(&live));
        assert_eq!(g.table().0.len(), 2, "the live flow keeps both entries");
        assert_eq!(r.census.unwrap().flows_by_state, [0, 1, 0, 0]);
    }

    #[test]
    fn passes_are_bounded_and_resume_where_they_stopped() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        for p in 0..10 {
            flow(&mut t, PROTO_TCP, p, CLOSED, now - 60 * S, Some(now - 60 * S));
        }
        let mut g = Gc::new(t, GcConfig { budget: 6, ..GcConfig::default() });
        let mut scanned = 0;
        let mut passes = 0;
        loop {
            let r = g.pass(now, false).unwrap();
            assert!(r.scanned <= 6);
            scanned += r.scanned;
            passes += 1;
            if r.census.is_some() || passes > 10 {
                break;
            }
        }
        assert!(passes >= 2, "budget 6 cannot cover 20 entries in one pass");
        assert!(scanned >= 6);
        // Deleting partners shifts the in-memory cursor; whatever is left goes next walk.
        while !g.table().0.is_empty() && passes < 20 {
            g.pass(now, false).unwrap();
            passes += 1;
        }
        assert!(g.table().0.is_empty());
    }
}
