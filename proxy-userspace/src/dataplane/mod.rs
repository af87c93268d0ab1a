//! Kernel side, by what each part is:
//! - `maps`: the map catalogue, loading the embedded object with its pinned maps, typed
//!   handles on them, and migrating maps whose definition changed.
//! - `attach`: the TC and XDP programs on interfaces (which ones, the uplinks, which
//!   attachments are ours, legacy clsact filters).
//! - `sock`: the cgroup socket hooks, and destroying UDP sockets of removed backends.
//! - `kernel`: raw bpf(2) commands and rtnetlink address reads.
//! - `features` (what the kernel offers), `lock` (one agent per bpffs root), `guard` (the
//!   running datapath's check).
pub mod attach;
pub mod error;
pub mod features;
pub mod guard;
pub mod kernel;
pub mod lock;
pub mod maps;
pub mod sock;

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
