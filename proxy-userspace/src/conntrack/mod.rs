//! Conntrack garbage collection: the agent's half of the conntrack lifecycle.
//!
//! Each family has two tables (`proxy_common::ct_flags::ASSURED`): `CONNTRACK`, which never
//! evicts, holds assured flows (a completed TCP handshake, a UDP stream); `CT_NEW`, an LRU,
//! holds the unassured ones until the datapath promotes them. The datapath records what it
//! sees in each flow's forward entry (reply seen, FIN per side, RST); this collector walks
//! both tables and removes flows whose idle time exceeds their state's timeout
//! (`proxy_common::ct::CtTimeouts`): the LRU evicts only when it needs room, so an
//! unreplied UDP flow must still go after its 30 s. When `CONNTRACK` is under pressure it
//! also removes closed flows there at once. Established and half-closed flows are only ever
//! removed when they expire. Unassured flows need nothing more under pressure: the LRU makes
//! its own room, and removing them early would only break handshakes in progress.
//!
//! A flow is a pair of entries, normally in the same table (a promotion moves the reply
//! entry first, so for a moment the pair straddles the two). The forward entry decides; its
//! reply entry goes with it, and only if it belongs to the flow (`CtKey::reply_belongs`: a
//! reply tuple may be another flow's). An expired forward entry whose reply entry is still
//! fresh is kept (one-way traffic from the backend refreshes only the reply side). Orphans
//! go too, after a grace period (never at once: the datapath writes a flow's two entries
//! one after the other): a reply entry whose forward entry is in neither table, and an
//! unassured forward entry whose reply entry is gone (the LRU evicted one half: the flow
//! cannot work, and removing the rest lets the client's next SYN start afresh).
//!
//! **Compare before delete.** A pass decides from a batch snapshot, and the datapath keeps
//! working meanwhile: a tuple can be reopened, refreshed or promoted between the read and
//! the delete. So right before deleting, the collector reads the entry again and deletes
//! it only if it is still the same flow ([`same_flow`]: same translation, ids and creation
//! time) and the decision, re-made on the fresh value, still stands (a `last_seen` that
//! moved on means "not idle"). The kernel has no compare-and-delete for hash maps, so a
//! window of one syscall remains (down from a whole pass).
//!
//! Each pass reads at most `budget` entries (continuing where the previous pass stopped,
//! `CONNTRACK` then `CT_NEW`), so a pass is bounded whatever the tables' size; the decisions
//! work on the [`CtTable`] trait, implemented by the kernel maps (`conntrack::kernel`) and
//! by an in-memory table in the unit tests.
//!
//! Both families are collected by the same code: the tables, the collector and the
//! decisions are generic over the address type ([`MapAddr`]: `u32` for `CONNTRACK` /
//! `CT_NEW`, `Ipv6Words` for `CONNTRACK6` / `CT_NEW6`), and the agent runs one collector per
//! family.
pub mod kernel;
pub mod task;

use std::collections::HashSet;

use proxy_common::{
    CT_DIR_REPLY, CtKey, CtValue,
    ct::{self, CtState, CtTimeouts},
    ct_flags,
};

use crate::dataplane::maps::{addr::MapAddr, ct::Table};

/// Where the collector reads and deletes entries: one family's two tables.
pub trait CtTable {
    type Addr: MapAddr;
    type Error: std::error::Error + Send + Sync + 'static;
    /// Up to `max` entries of `table` starting at `cursor` (`None`: the beginning), and the
    /// cursor of the next chunk (`None` when this chunk reached the end of the table).
    fn read_chunk(&mut self, table: Table, cursor: Option<u32>, max: usize) -> Result<Chunk<Self::Addr>, Self::Error>;
    fn get(&self, table: Table, key: &CtKey<Self::Addr>) -> Result<Option<CtValue<Self::Addr>>, Self::Error>;
    /// Whether the entry was there; deleting an entry that is already gone is not an error.
    fn delete(&mut self, table: Table, key: &CtKey<Self::Addr>) -> Result<bool, Self::Error>;

    /// The entry under `key` in whichever table holds it (the assured table first, as the
    /// datapath looks).
    #[allow(clippy::type_complexity)]
    fn find(&self, key: &CtKey<Self::Addr>) -> Result<Option<(Table, CtValue<Self::Addr>)>, Self::Error> {
        for t in Table::ALL {
            if let Some(v) = self.get(t, key)? {
                return Ok(Some((t, v)));
            }
        }
        Ok(None)
    }
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
    /// Closed (or unassured and stale, in the assured table) while that table was under
    /// pressure.
    Pressure,
    /// Half a flow: a reply entry whose forward entry is gone, or an unassured forward entry
    /// whose reply entry is gone.
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
    /// Under pressure, unassured flows younger than this are kept: a handshake in progress
    /// is not a flood. Also how long an unassured forward entry may miss its reply entry (the
    /// datapath writes the two one after the other).
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

/// What one pass did, and (when it finished a walk over both tables) what they held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub scanned: u64,
    /// Entries removed, by reason (indexed like [`Reason::ALL`]); a flow counts two entries.
    pub deleted: [u64; 3],
    /// Removals decided from the snapshot but called off on re-reading the entry: the
    /// datapath had replaced (reopened, promoted) or refreshed it in between.
    pub spared: u64,
    /// Set when this pass completed a walk over both tables: flows (forward entries) by
    /// state (indexed like `CtState::ALL`) and entries per table, as they were left.
    pub census: Option<Census>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub flows_by_state: [u64; CtState::ALL.len()],
    /// Entries per table (indexed like [`Table::ALL`]).
    pub entries_by_table: [u64; 2],
}

impl Census {
    /// Entries in both tables.
    pub fn entries(&self) -> u64 {
        self.entries_by_table.iter().sum()
    }
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

/// Whether `fresh` (re-read) is the entry `seen` (a snapshot) of the same flow: what the
/// datapath writes once at creation is unchanged. What it refreshes (`last_seen`, `flags`,
/// `seq_end`, a learnt `ifindex`) may differ: the decision is re-made on the fresh value.
/// A reopened tuple, or a reply tuple taken over by another flow, has another creation
/// time, backend or frontend.
pub fn same_flow<A: PartialEq>(seen: &CtValue<A>, fresh: &CtValue<A>) -> bool {
    seen.nat_addr == fresh.nat_addr
        && seen.nat_port == fresh.nat_port
        && seen.snat_addr == fresh.snat_addr
        && seen.snat_port == fresh.snat_port
        && seen.backend_id == fresh.backend_id
        && seen.svc_id == fresh.svc_id
        && seen.created == fresh.created
        && (seen.flags ^ fresh.flags) & (ct_flags::SNAT | ct_flags::SYN) == 0
}

/// A forward entry's reply entry, where it was found, as it was read.
type Partner<A> = (Table, CtValue<A>);

/// The collector: a cursor into the tables that persists across passes.
pub struct Gc<T> {
    table: T,
    cfg: GcConfig,
    /// The table being walked and the position in it.
    at: Table,
    cursor: Option<u32>,
    walk: Census,
}

impl<T: CtTable> Gc<T> {
    pub fn new(table: T, cfg: GcConfig) -> Self {
        Gc { table, cfg, at: Table::Assured, cursor: None, walk: Census::default() }
    }

    pub fn table(&self) -> &T {
        &self.table
    }

    pub fn table_mut(&mut self) -> &mut T {
        &mut self.table
    }

    /// One bounded pass. `now` is `CLOCK_MONOTONIC` in nanoseconds (what
    /// `bpf_ktime_get_ns` returns); `pressure` (the assured table is nearly full) lets
    /// closed flows there go early.
    pub fn pass(&mut self, now: u64, pressure: bool) -> Result<PassReport, T::Error> {
        let mut report = PassReport::default();
        let mut remaining = self.cfg.budget.max(1);
        // Partners deleted with their flow may still come up later in a chunk read earlier.
        let mut gone: HashSet<(Table, CtKey<T::Addr>)> = HashSet::new();
        loop {
            let at = self.at;
            let chunk = self.table.read_chunk(at, self.cursor, remaining)?;
            remaining = remaining.saturating_sub(chunk.entries.len());
            report.scanned += chunk.entries.len() as u64;
            for (k, v) in &chunk.entries {
                if !gone.contains(&(at, *k)) {
                    let p = pressure && at == Table::Assured;
                    self.judge(at, k, v, now, p, &mut report, &mut gone)?;
                }
            }
            self.cursor = chunk.next;
            if chunk.next.is_none() {
                self.cursor = None;
                match at {
                    Table::Assured => self.at = Table::Unassured,
                    Table::Unassured => {
                        self.at = Table::Assured;
                        report.census = Some(std::mem::take(&mut self.walk));
                        return Ok(report);
                    }
                }
            }
            if remaining == 0 {
                return Ok(report);
            }
        }
    }

    /// The reply entry of the forward entry `k` -> `v`, from either table, if it belongs to
    /// this flow.
    fn partner(&self, k: &CtKey<T::Addr>, v: &CtValue<T::Addr>) -> Result<Option<Partner<T::Addr>>, T::Error> {
        Ok(self.table.find(&k.reply_of_forward(v))?.filter(|(_, rv)| k.reply_belongs(rv)))
    }

    /// Whether the reply entry `k` -> `v` has its forward entry in either table (one whose
    /// reply it is).
    fn has_forward(&self, k: &CtKey<T::Addr>, v: &CtValue<T::Addr>) -> Result<bool, T::Error> {
        let fk = k.forward_of_reply(v);
        Ok(self.table.find(&fk)?.is_some_and(|(_, fv)| fk.reply_of_forward(&fv) == *k && fk.reply_belongs(v)))
    }

    /// A first look at a forward entry from the snapshot, without any syscall: could it be
    /// removed? Most entries are kept here.
    fn candidate(&self, at: Table, k: &CtKey<T::Addr>, v: &CtValue<T::Addr>, now: u64, pressure: bool) -> bool {
        let state = ct::state(k.proto, v.flags);
        let idle = now.saturating_sub(v.last_seen);
        idle > self.cfg.timeouts.idle_ns(k.proto, state)
            || (pressure && state == CtState::Closed)
            || (pressure && state.unassured() && idle > self.cfg.new_grace_ns)
            || (at == Table::Unassured && idle > self.cfg.new_grace_ns)
    }

    /// The full decision on the forward entry `k` -> `v` of table `at` (reads its reply
    /// entry): why it goes, and its reply entry, which goes with it.
    #[allow(clippy::type_complexity)]
    fn decide(
        &self,
        at: Table,
        k: &CtKey<T::Addr>,
        v: &CtValue<T::Addr>,
        now: u64,
        pressure: bool,
    ) -> Result<Option<(Reason, Option<Partner<T::Addr>>)>, T::Error> {
        let state = ct::state(k.proto, v.flags);
        let idle = now.saturating_sub(v.last_seen);
        let timeout = self.cfg.timeouts.idle_ns(k.proto, state);
        let partner = self.partner(k, v)?;
        if idle > timeout {
            // Alive through the other direction? Then it is not idle.
            let fresh = partner.is_some_and(|(_, r)| now.saturating_sub(r.last_seen) <= timeout);
            return Ok((!fresh).then_some((Reason::Expired, partner)));
        }
        if pressure && (state == CtState::Closed || (state.unassured() && idle > self.cfg.new_grace_ns)) {
            return Ok(Some((Reason::Pressure, partner)));
        }
        if at == Table::Unassured && partner.is_none() && idle > self.cfg.new_grace_ns {
            return Ok(Some((Reason::Orphan, None)));
        }
        Ok(None)
    }

    #[allow(clippy::too_many_arguments)]
    fn judge(
        &mut self,
        at: Table,
        k: &CtKey<T::Addr>,
        v: &CtValue<T::Addr>,
        now: u64,
        pressure: bool,
        report: &mut PassReport,
        gone: &mut HashSet<(Table, CtKey<T::Addr>)>,
    ) -> Result<(), T::Error> {
        let removed = if k.dir == CT_DIR_REPLY {
            self.judge_reply(at, k, v, now, pressure, report, gone)?
        } else if self.candidate(at, k, v, now, pressure) {
            self.remove_flow(at, k, v, now, pressure, report, gone)?
        } else {
            false
        };
        if !removed {
            self.walk.entries_by_table[at.index()] += 1;
            if k.dir != CT_DIR_REPLY {
                // A flow is counted through its forward entry.
                self.walk.flows_by_state[state_index(ct::state(k.proto, v.flags))] += 1;
            }
        }
        Ok(())
    }

    /// A reply entry goes when it has been idle past the grace and its forward entry is in
    /// neither table. Returns whether it was removed.
    #[allow(clippy::too_many_arguments)]
    fn judge_reply(
        &mut self,
        at: Table,
        k: &CtKey<T::Addr>,
        v: &CtValue<T::Addr>,
        now: u64,
        pressure: bool,
        report: &mut PassReport,
        gone: &mut HashSet<(Table, CtKey<T::Addr>)>,
    ) -> Result<bool, T::Error> {
        let grace = if pressure { self.cfg.new_grace_ns } else { self.cfg.orphan_grace_ns };
        if now.saturating_sub(v.last_seen) <= grace || self.has_forward(k, v)? {
            return Ok(false);
        }
        // Compare before deleting: still this entry, still idle, still without its flow.
        let Some(fresh) = self.table.get(at, k)? else { return Ok(true) };
        if !same_flow(v, &fresh) || now.saturating_sub(fresh.last_seen) <= grace || self.has_forward(k, &fresh)? {
            report.spared += 1;
            return Ok(false);
        }
        gone.insert((at, *k));
        if self.table.delete(at, k)? {
            report.deleted[reason_index(Reason::Orphan)] += 1;
        }
        Ok(true)
    }

    /// Remove the flow whose forward entry `k` was `seen` in the snapshot, if the decision
    /// still stands on a fresh read, with its reply entry if that is still the flow's.
    /// Returns whether the forward entry is gone.
    #[allow(clippy::too_many_arguments)]
    fn remove_flow(
        &mut self,
        at: Table,
        k: &CtKey<T::Addr>,
        seen: &CtValue<T::Addr>,
        now: u64,
        pressure: bool,
        report: &mut PassReport,
        gone: &mut HashSet<(Table, CtKey<T::Addr>)>,
    ) -> Result<bool, T::Error> {
        // Compare before deleting: the snapshot may be stale.
        let Some(fresh) = self.table.get(at, k)? else {
            // Promoted, evicted or deleted meanwhile: nothing left here to decide on.
            return Ok(true);
        };
        if !same_flow(seen, &fresh) {
            // The tuple was reopened: a new flow, not the one decided on.
            report.spared += 1;
            return Ok(false);
        }
        let Some((why, partner)) = self.decide(at, k, &fresh, now, pressure)? else {
            if seen != &fresh {
                // Refreshed meanwhile (`last_seen` moved on: not idle after all).
                report.spared += 1;
            }
            return Ok(false);
        };
        gone.insert((at, *k));
        if self.table.delete(at, k)? {
            report.deleted[reason_index(why)] += 1;
        }
        if let Some((rt, rv)) = partner {
            let rk = k.reply_of_forward(&fresh);
            // The reply entry too is re-read: deleted only if it is still this flow's.
            match self.table.get(rt, &rk)? {
                Some(now_rv) if k.reply_belongs(&now_rv) && same_flow(&rv, &now_rv) => {
                    gone.insert((rt, rk));
                    if self.table.delete(rt, &rk)? {
                        report.deleted[reason_index(why)] += 1;
                    }
                }
                Some(_) => report.spared += 1,
                None => {}
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, convert::Infallible};

    use proxy_common::{CT_DIR_FORWARD, Ipv6Words, PROTO_TCP, PROTO_UDP, ct_flags};

    use super::*;

    const S: u64 = 1_000_000_000;

    type Tables<A> = [BTreeMap<CtKey<A>, CtValue<A>>; 2];
    type Hook<A> = Box<dyn FnOnce(&mut Tables<A>)>;

    /// An in-memory pair of tables whose chunks follow key order, with the cursor as an
    /// index. `after_read` runs once, right after the first non-empty chunk was read: what the
    /// datapath does between the collector's snapshot and its deletes.
    struct MemTable<A = u32> {
        t: Tables<A>,
        after_read: Option<Hook<A>>,
    }

    impl<A> Default for MemTable<A> {
        fn default() -> Self {
            MemTable { t: [BTreeMap::new(), BTreeMap::new()], after_read: None }
        }
    }

    impl<A: MapAddr> MemTable<A> {
        fn contains(&self, k: &CtKey<A>) -> bool {
            self.t.iter().any(|t| t.contains_key(k))
        }
        fn len(&self) -> usize {
            self.t.iter().map(|t| t.len()).sum()
        }
        fn at(&mut self, table: Table) -> &mut BTreeMap<CtKey<A>, CtValue<A>> {
            &mut self.t[table.index()]
        }
    }

    impl<A: MapAddr> CtTable for MemTable<A> {
        type Addr = A;
        type Error = Infallible;
        fn read_chunk(&mut self, table: Table, cursor: Option<u32>, max: usize) -> Result<Chunk<A>, Infallible> {
            let t = &self.t[table.index()];
            let start = cursor.unwrap_or(0) as usize;
            let entries: Vec<_> = t.iter().skip(start).take(max).map(|(k, v)| (*k, *v)).collect();
            let end = start + entries.len();
            let next = (end < t.len()).then_some(end as u32);
            if let Some(f) = self.after_read.take_if(|_| !entries.is_empty()) {
                f(&mut self.t);
            }
            Ok(Chunk { next, entries })
        }
        fn get(&self, table: Table, key: &CtKey<A>) -> Result<Option<CtValue<A>>, Infallible> {
            Ok(self.t[table.index()].get(key).copied())
        }
        fn delete(&mut self, table: Table, key: &CtKey<A>) -> Result<bool, Infallible> {
            Ok(self.t[table.index()].remove(key).is_some())
        }
    }

    fn fwd_key(proto: u8, sport: u16) -> CtKey {
        CtKey { src_addr: 1, dst_addr: 2, src_port: sport, dst_port: 80, proto, dir: CT_DIR_FORWARD, _pad: 0 }
    }

    /// The two entries of a flow from client port `sport` to VIP 2:80 on backend 3:8080.
    fn entries(proto: u8, sport: u16, flags: u8, fwd_seen: u64, rev_seen: u64) -> [(CtKey, CtValue); 2] {
        let k = fwd_key(proto, sport);
        let v = CtValue { nat_addr: 3, nat_port: 8080, flags, last_seen: fwd_seen, ..Default::default() };
        let rv = CtValue { nat_addr: 2, nat_port: 80, flags, last_seen: rev_seen, ..Default::default() };
        [(k, v), (k.reply_of_forward(&v), rv)]
    }

    /// A flow with `flags` in the table its flags say (assured or not), its two entries last
    /// seen at `fwd_seen` / `rev_seen` (no reply entry for `None`).
    fn flow(t: &mut MemTable, proto: u8, sport: u16, flags: u8, fwd_seen: u64, rev_seen: Option<u64>) -> CtKey {
        let table = if flags & ct_flags::ASSURED != 0 { Table::Assured } else { Table::Unassured };
        let [(k, v), (rk, rv)] = entries(proto, sport, flags, fwd_seen, rev_seen.unwrap_or(0));
        if rev_seen.is_some() {
            t.at(table).insert(rk, rv);
        }
        t.at(table).insert(k, v);
        k
    }

    fn gc(t: MemTable) -> Gc<MemTable> {
        Gc::new(t, GcConfig::default())
    }

    const EST: u8 = ct_flags::SEEN_REPLY | ct_flags::ASSURED;
    const CLOSED: u8 = EST | ct_flags::CLOSING | ct_flags::FIN_FWD | ct_flags::FIN_REV;

    #[test]
    fn closed_flows_go_after_their_grace_period_with_their_reply_entry() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        let old = flow(&mut t, PROTO_TCP, 1, CLOSED, now - 11 * S, Some(now - 11 * S));
        let recent = flow(&mut t, PROTO_TCP, 2, CLOSED, now - 2 * S, Some(now - 2 * S));
        let mut g = gc(t);
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted, [2, 0, 0]);
        assert!(!g.table().contains(&old));
        assert!(g.table().contains(&recent));
        assert_eq!(g.table().len(), 2, "the recent flow keeps both entries");
    }

    #[test]
    fn pressure_removes_closed_flows_but_never_established_ones_nor_handshakes() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        // An established flow idle for an hour: far from its 24 h timeout.
        let idle = flow(&mut t, PROTO_TCP, 1, EST, now - 3_600 * S, Some(now - 3_600 * S));
        let closed = flow(&mut t, PROTO_TCP, 2, CLOSED, now - S / 2, Some(now - S / 2));
        // Unassured flows live in the LRU, which makes its own room: pressure on the assured
        // table leaves them be.
        let stale_syn = flow(&mut t, PROTO_TCP, 3, 0, now - 5 * S, Some(now - 5 * S));
        let syn_recv = flow(&mut t, PROTO_TCP, 4, ct_flags::SEEN_REPLY, now - 5 * S, Some(now - 5 * S));
        let half_closed =
            flow(&mut t, PROTO_TCP, 5, EST | ct_flags::CLOSING | ct_flags::FIN_FWD, now - 60 * S, Some(now - 60 * S));
        let mut g = gc(t);
        // Without pressure nothing here has expired.
        assert_eq!(g.pass(now, false).unwrap().deleted_total(), 0);
        let r = g.pass(now, true).unwrap();
        assert_eq!(r.deleted, [0, 2, 0]);
        assert!(!g.table().contains(&closed));
        for k in [idle, stale_syn, syn_recv, half_closed] {
            assert!(g.table().contains(&k));
        }
        let census = r.census.expect("one pass covers these small tables");
        // new, replied, established, closing, closed
        assert_eq!(census.flows_by_state, [1, 1, 1, 1, 0]);
        assert_eq!(census.entries_by_table, [4, 4]);
    }

    /// The LRU evicts only when it needs room: unassured flows must still expire by their
    /// state's timeout (a 30 s unreplied UDP flow goes after 30 s).
    #[test]
    fn unassured_flows_expire_by_their_state_timeout() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        let unreplied = flow(&mut t, PROTO_UDP, 1, 0, now - 31 * S, Some(now - 31 * S));
        let replied = flow(&mut t, PROTO_UDP, 2, ct_flags::SEEN_REPLY, now - 10 * S, Some(now - 10 * S));
        let syn_recv = flow(&mut t, PROTO_TCP, 3, ct_flags::SEEN_REPLY, now - 61 * S, Some(now - 61 * S));
        let syn_sent = flow(&mut t, PROTO_TCP, 4, 0, now - 30 * S, Some(now - 30 * S));
        let mut g = gc(t);
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted, [4, 0, 0], "two flows of two entries");
        assert!(!g.table().contains(&unreplied) && !g.table().contains(&syn_recv));
        assert!(g.table().contains(&replied) && g.table().contains(&syn_sent));
        assert_eq!(r.census.unwrap().flows_by_state, [1, 1, 0, 0, 0]);
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
        assert!(g.table().contains(&streaming));
        assert!(!g.table().contains(&dead));
        assert!(!g.table().contains(&unanswered));
    }

    #[test]
    fn orphan_reply_entries_go_after_their_grace() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        let k = flow(&mut t, PROTO_TCP, 1, EST, now - 40 * S, Some(now - 40 * S));
        let young = flow(&mut t, PROTO_TCP, 2, EST, now - 5 * S, Some(now - 5 * S));
        t.at(Table::Assured).remove(&k);
        t.at(Table::Assured).remove(&young);
        // A flow being promoted: its reply entry already in the assured table, its forward
        // entry still in the LRU. Not an orphan.
        let moving = flow(&mut t, PROTO_TCP, 3, EST, now - 40 * S, Some(now - 40 * S));
        let v = t.at(Table::Assured).remove(&moving).unwrap();
        t.at(Table::Unassured).insert(moving, v);
        let mut g = gc(t);
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted, [0, 0, 1]);
        assert_eq!(g.table().len(), 3, "the young orphan waits (its forward entry may be on its way)");
        assert!(g.table().contains(&moving));
    }

    /// The LRU evicted a handshake's reply entry: the flow cannot work (its replies would not
    /// be translated back), so what is left goes once it has been idle a moment, and the
    /// client's next SYN starts afresh.
    #[test]
    fn an_unassured_forward_entry_without_its_reply_entry_goes() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        let half = flow(&mut t, PROTO_TCP, 1, 0, now - 2 * S, None);
        let just_made = flow(&mut t, PROTO_TCP, 2, 0, now - S / 2, None);
        let whole = flow(&mut t, PROTO_TCP, 3, 0, now - 2 * S, Some(now - 2 * S));
        let mut g = gc(t);
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted, [0, 0, 1]);
        assert!(!g.table().contains(&half));
        assert!(g.table().contains(&just_made) && g.table().contains(&whole));
    }

    /// Issue 19 item 9: the collector decides from a snapshot; a tuple reopened between the
    /// read and the delete keeps its new entries.
    #[test]
    fn a_flow_reopened_after_the_snapshot_keeps_its_new_entries() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        // A handshake reset by the backend 11 s ago (closed, never assured).
        let reset = ct_flags::SEEN_REPLY | ct_flags::CLOSING | ct_flags::RST;
        let k = flow(&mut t, PROTO_TCP, 1, reset, now - 11 * S, Some(now - 11 * S));
        // After the snapshot the client reopens the tuple: the datapath deletes the old pair
        // and writes a new flow under the same keys (same backend), created now.
        let reopened = entries(PROTO_TCP, 1, ct_flags::SYN, now, now).map(|(k, mut v)| {
            v.created = ct::coarse_ms(now);
            (k, v)
        });
        t.after_read = Some(Box::new(move |tables| {
            tables[1].clear();
            tables[1].extend(reopened);
        }));
        let mut g = gc(t);
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted_total(), 0, "the entries under those keys are no longer the flow decided on");
        assert_eq!(r.spared, 1);
        for (rk, rv) in reopened {
            assert_eq!(g.table().t[1].get(&rk), Some(&rv));
        }
        assert!(g.table().contains(&k));
    }

    /// Same tuple, same flow, but a packet refreshed it after the snapshot: not idle.
    #[test]
    fn a_flow_refreshed_after_the_snapshot_is_not_idle() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        let k = flow(&mut t, PROTO_UDP, 1, 0, now - 31 * S, Some(now - 31 * S));
        t.after_read = Some(Box::new(move |tables| {
            if let Some(v) = tables[1].get_mut(&k) {
                v.last_seen = now;
            }
        }));
        let mut g = gc(t);
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted_total(), 0);
        assert_eq!(r.spared, 1);
        assert!(g.table().contains(&k));
    }

    /// A reply tuple held by another flow's entry (another frontend sharing the backend) is
    /// never deleted on this flow's behalf.
    #[test]
    fn a_partner_entry_of_another_flow_is_left_alone() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        let k = flow(&mut t, PROTO_TCP, 1, CLOSED, now - 11 * S, Some(now - 11 * S));
        let rk = k.reply_of_forward(&t.t[0][&k]);
        let other = CtValue { nat_addr: 2, nat_port: 81, flags: EST, last_seen: now, ..Default::default() };
        t.at(Table::Assured).insert(rk, other);
        let mut g = gc(t);
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted, [1, 0, 0]);
        assert_eq!(g.table().t[0].get(&rk), Some(&other));
    }

    /// The IPv6 tables go through the same collector: a closed IPv6 flow goes after its
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
            t.at(Table::Assured).insert(k.reply_of_forward(&v), rv);
            t.at(Table::Assured).insert(k, v);
            k
        };
        let closed = add(1, CLOSED, now - 11 * S);
        let live = add(2, EST, now - 60 * S);
        let mut g = Gc::new(t, GcConfig::default());
        let r = g.pass(now, false).unwrap();
        assert_eq!(r.deleted, [2, 0, 0]);
        assert!(!g.table().contains(&closed) && g.table().contains(&live));
        assert_eq!(g.table().len(), 2, "the live flow keeps both entries");
        assert_eq!(r.census.unwrap().flows_by_state, [0, 0, 1, 0, 0]);
    }

    #[test]
    fn passes_are_bounded_and_resume_where_they_stopped() {
        let mut t = MemTable::default();
        let now = 100_000 * S;
        for p in 0..10 {
            flow(&mut t, PROTO_TCP, p, CLOSED, now - 60 * S, Some(now - 60 * S));
            flow(&mut t, PROTO_UDP, p, 0, now - 60 * S, Some(now - 60 * S));
        }
        let mut g = Gc::new(t, GcConfig { budget: 6, ..GcConfig::default() });
        let mut scanned = 0;
        let mut passes = 0;
        loop {
            let r = g.pass(now, false).unwrap();
            assert!(r.scanned <= 6);
            scanned += r.scanned;
            passes += 1;
            if r.census.is_some() || passes > 20 {
                break;
            }
        }
        assert!(passes >= 2, "budget 6 cannot cover 40 entries in one pass");
        assert!(scanned >= 6);
        // Deleting partners shifts the in-memory cursor; whatever is left goes next walk.
        while g.table().len() > 0 && passes < 40 {
            g.pass(now, false).unwrap();
            passes += 1;
        }
        assert_eq!(g.table().len(), 0, "both tables emptied");
    }
}
