//! ebpf-proxy: a kube-proxy replacement that load-balances Services in eBPF.
//!
//! - `model`: pure translation of Kubernetes objects into the desired map state.
//! - `source`: where objects come from (Kubernetes API watchers, or YAML files).
//! - `dataplane`: the kernel side: load and pin programs and maps, attach them to
//!   interfaces, typed access to the maps.
//! - `conntrack`: the conntrack garbage collector (expiry by state, pressure eviction).
//! - `sync`: diff desired state against the maps and apply minimal, ordered writes.
//! - `agent`: ties them together; `attacher` attaches (and re-attaches) the programs;
//!   `health` is what /healthz and /readyz say, served with `metrics` by `http` on the
//!   `control` thread (which also handles signals); `healthcheck` serves the services'
//!   `healthCheckNodePort`s.
//! - `cleanup`: `ebpf-proxy cleanup`, taking the datapath out of the node; `kube_proxy`:
//!   `cleanup --kube-proxy`, taking kube-proxy's rules out.
//! - `takeover`: adopting kube-proxy's flows from nf_conntrack at start, handing ours back
//!   on `cleanup`.
//! - `cli` (flags; `kubeproxy_config` reads kube-proxy's own config file into them) and
//!   `show` (the operator CLI's output); `trace` runs one packet through a
//!   private copy of the datapath; `inspect` reads the objects `explain` and `verify` judge.
pub mod agent;
pub mod attacher;
pub mod cleanup;
pub mod cli;
pub mod conntrack;
pub mod control;
pub mod dataplane;
pub mod hashing;
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod inspect;
pub mod kube_proxy;
pub mod kubeproxy_config;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod show;
pub mod source;
pub mod sync;
pub mod takeover;
pub mod trace;
