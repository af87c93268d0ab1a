//! ebpf-proxy: a kube-proxy replacement that load-balances Services in eBPF.
//!
//! - `model`: pure translation of Kubernetes objects into the desired map state.
//! - `source`: where objects come from (Kubernetes API watchers, or YAML files).
//! - `dataplane`: the kernel side: load and pin programs and maps, attach them to
//!   interfaces, typed access to the maps.
//! - `conntrack`: the conntrack garbage collector (expiry by state, pressure eviction).
//! - `sync`: diff desired state against the maps and apply minimal, ordered writes.
//! - `agent`: ties them together; `http` and `metrics` serve health and Prometheus;
//!   `healthcheck` serves the services' `healthCheckNodePort`s.
//! - `cli` (flags) and `show` (the operator CLI's output).
pub mod agent;
pub mod cli;
pub mod conntrack;
pub mod dataplane;
pub mod healthcheck;
pub mod http;
pub mod metrics;
pub mod model;
pub mod show;
pub mod source;
pub mod sync;
