//! ebpf-proxy: a kube-proxy replacement that load-balances Services in eBPF.
//!
//! - `model`: pure translation of Kubernetes objects into the desired map state.
//! - `dataplane`: the kernel side: load and pin the programs and maps, attach them to
//!   interfaces, typed access to the maps.
//! - `sync`: diff desired state against the maps and apply minimal, ordered writes.
pub mod cli;
pub mod dataplane;
pub mod model;
pub mod sync;
