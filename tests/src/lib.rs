//! Test support: BPF_PROG_TEST_RUN harness, netns topologies, clients, the real agent in a
//! namespace, and a fake Kubernetes API server.
pub mod agent;
pub mod client;
pub mod fake_apiserver;
pub mod frames;
pub mod harness;
pub mod netns;
pub mod scale;
