//! The kernel interfaces aya and rtnetlink do not cover: raw bpf(2) commands (`bpfsys`) and
//! the namespace's local addresses over rtnetlink (`local_addrs`).
pub mod bpfsys;
pub mod local_addrs;
