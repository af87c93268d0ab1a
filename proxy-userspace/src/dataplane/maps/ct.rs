//! A family's two conntrack tables (the map holding each: `MapAddr::ct_map`).
/// One of a family's two conntrack tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `CONNTRACK` / `CONNTRACK6`: assured flows, never evicted.
    Assured,
    /// `CT_NEW` / `CT_NEW6`: unassured flows, an LRU.
    Unassured,
}

impl Table {
    /// In walk order: a lookup finds an established flow in the assured table first, and so
    /// does the collector.
    pub const ALL: [Table; 2] = [Table::Assured, Table::Unassured];

    /// Position in [`Table::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Table::Assured => 0,
            Table::Unassured => 1,
        }
    }
}
