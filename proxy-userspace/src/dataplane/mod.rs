//! Kernel side: load the embedded eBPF object with pinned maps (`loader`), typed access to
//! those maps (`maps`, and `node` for the node-level config and neighbour misses), and
//! attaching programs to interfaces (`attach`), which attachments are ours (`ownership`,
//! over `bpfsys`), the bpffs root's lock (`lock`) and the running datapath's check
//! (`guard`).
pub mod addr;
pub mod attach;
pub mod bpfsys;
pub mod catalogue;
pub mod clsact;
pub mod copy;
pub mod ct_table;
pub mod error;
pub mod features;
pub mod guard;
pub mod ifaces;
pub mod loader;
pub mod local_addrs;
pub mod lock;
pub mod maps;
pub mod migrate;
pub mod node;
pub mod ownership;
pub mod sock;
pub mod uplinks;

pub use error::DataplaneError;

/// The eBPF object built by build.rs (aya-build) from `proxy-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Layout of the agent's bpffs directory.
pub mod paths {
    use std::path::{Path, PathBuf};

    pub fn maps_dir(root: &Path) -> PathBuf {
        root.join("maps")
    }
    pub fn links_dir(root: &Path) -> PathBuf {
        root.join("links")
    }
    /// The socket-level programs' cgroup links (apart from the per-interface links, whose
    /// pin names are parsed as `<ifindex>-<kind>-<ifname>`).
    pub fn cgroup_links_dir(root: &Path) -> PathBuf {
        root.join("cgroup-links")
    }
    /// Old maps pinned aside while their entries move to maps of a new size or type.
    pub fn migrating_dir(root: &Path) -> PathBuf {
        root.join("migrating")
    }
}
