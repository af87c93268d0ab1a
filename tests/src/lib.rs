//! Test support: BPF_PROG_TEST_RUN harness, netns topologies, clients, the real agent in a
//! namespace, a fake Kubernetes API server, and a DaemonSet's container run under podman.
pub mod agent;
pub mod client;
pub mod fake_apiserver;
pub mod family;
pub mod frames;
pub mod harness;
pub mod netns;
pub mod podman;
pub mod scale;
