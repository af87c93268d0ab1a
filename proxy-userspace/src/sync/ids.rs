//! Service and backend ids as types of their own, so the sync cannot hand a backend id
//! where a service id belongs (both are `u32` in the maps).
//!
//! The maps' key and value structs (proxy-common) keep their `u32` fields: their layout is
//! shared with the eBPF programs. Ids become raw numbers only where they are written to or
//! read from a map (`get`, `From`).
use std::fmt;

/// A service frontend's id: the `ServiceValue::id` its `SERVICES` entry carries, and the
/// key of its slots, metadata, source ranges and counters.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(u32);

/// A backend's id: the key of its `BACKENDS` / `BACKENDS6` entry, what slots point at.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(u32);

impl ServiceId {
    pub const fn new(raw: u32) -> Self {
        ServiceId(raw)
    }

    /// The number the maps hold.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl BackendId {
    pub const fn new(raw: u32) -> Self {
        BackendId(raw)
    }

    /// The number the maps hold.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl From<u32> for ServiceId {
    fn from(raw: u32) -> Self {
        ServiceId(raw)
    }
}

impl From<ServiceId> for u32 {
    fn from(id: ServiceId) -> Self {
        id.0
    }
}

impl From<u32> for BackendId {
    fn from(raw: u32) -> Self {
        BackendId(raw)
    }
}

impl From<BackendId> for u32 {
    fn from(id: BackendId) -> Self {
        id.0
    }
}

/// The bare number, as logs and `ebpf-proxy show` have always printed ids.
impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
