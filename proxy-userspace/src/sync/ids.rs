//! Service and backend ids as types of their own, so the sync cannot hand a backend id
//! where a service id belongs (both are `u32` in the maps).
//!
//! The maps' key and value structs (proxy-common) keep their `u32` fields: their layout is
//! shared with the eBPF programs. Ids become raw numbers only where they are written to or
//! read from a map (`get`, `From`).
use std::fmt;

/// One id type: a `u32` newtype with the conversions the map boundary needs, printed as
/// the bare number (as logs and `ebpf-proxy show` always printed ids).
macro_rules! map_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u32);

        impl $name {
            pub const fn new(raw: u32) -> Self {
                $name(raw)
            }

            /// The number the maps hold.
            pub const fn get(self) -> u32 {
                self.0
            }
        }

        impl From<u32> for $name {
            fn from(raw: u32) -> Self {
                $name(raw)
            }
        }

        impl From<$name> for u32 {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

map_id!(
    /// A service frontend's id: the `ServiceValue::id` its `SERVICES` entry carries, and the
    /// key of its slots, metadata, source ranges and counters.
    ServiceId
);

map_id!(
    /// A backend's id: the key of its `BACKENDS` / `BACKENDS6` entry, what slots point at.
    BackendId
);
