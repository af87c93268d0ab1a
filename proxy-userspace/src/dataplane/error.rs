use std::{io, path::PathBuf};

/// Errors of the kernel side, each naming what failed so an operator can act on it.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("no pinned maps under {path}: is the agent running with this --bpffs-root?")]
    NotPinned { path: PathBuf },
    #[error("permission denied opening {path}: run as root (or with CAP_BPF, CAP_NET_ADMIN)")]
    Permission { path: PathBuf },
    #[error("{path} is not on a bpf filesystem: mount it with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },
    #[error("map {map} is full: raise --{flag}")]
    MapFull { map: &'static str, flag: &'static str },
    /// Not enough privilege to load the datapath (checked up front, so the operator sees
    /// one actionable line instead of the first failing syscall's EPERM).
    #[error("missing {missing} (uid {uid}): run as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")]
    NotPrivileged { missing: String, uid: u32 },
    /// bpf() refused although the capabilities are there: a seccomp filter (a container
    /// runtime's default profile) is the cause, and no capability will fix it.
    #[error(
        "bpf() is refused with EPERM although this process has CAP_BPF (uid {uid}): a seccomp filter blocks it \
         (Seccomp: {mode} in /proc/self/status). Older runtimes' default profiles (podman 4.3, containerd < 1.7) \
         allow bpf() only with CAP_SYS_ADMIN: run the pod with seccompProfile Unconfined (Helm: \
         --set seccompProfile=Unconfined) or a profile that allows bpf and perf_event_open, or upgrade the runtime"
    )]
    SeccompBlocksBpf { uid: u32, mode: String },
    /// A pinned map whose key or value size differs from this version's: its entries
    /// cannot be carried over, and re-using it would corrupt the datapath.
    #[error(
        "pinned map {map} ({path}) is incompatible with this version: it has {pinned}, this \
         version needs {wanted}. Its entries cannot be migrated; run `ebpf-proxy cleanup \
         --bpffs-root {root}` (or remove {path}) and start again (connections tracked in it \
         will be reset)", path = path.display(), root = root.display()
    )]
    IncompatiblePin { map: String, path: PathBuf, pinned: String, wanted: String, root: PathBuf },
    /// A map a tool reads is not pinned (an agent of another version, or a partial root).
    #[error("map {map} is not pinned ({path}): is an agent of this version running with this --bpffs-root? `ebpf-proxy maps` lists what is pinned", path = path.display())]
    MapNotPinned { map: &'static str, path: PathBuf },
    /// A map a tool reads is pinned with another layout than this binary reads.
    #[error(
        "pinned map {map} has {pinned}, this binary reads {wanted}: the agent is of another version; use the ebpf-proxy binary of the running agent"
    )]
    StalePin { map: &'static str, pinned: String, wanted: String },
    /// A pinned map the agent writes holds more entries than the configured size allows.
    #[error("map {map} holds {entries} entries but its new size is {max_entries}: raise --{flag}")]
    MapTooSmall { map: &'static str, entries: usize, max_entries: u32, flag: &'static str },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no map or program named {0}")]
    MissingObject(&'static str),
    #[error("a thread verifying a program panicked")]
    VerifierThread,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("interface {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl DataplaneError {
    /// Classify a map syscall failure: E2BIG on insert means a hash map is full, ENOSPC an
    /// LPM trie (`SOURCE_RANGES`).
    pub fn from_map(map: &'static str, source: aya::maps::MapError) -> Self {
        if let aya::maps::MapError::SyscallError(e) = &source
            && matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
        {
            let flag = crate::dataplane::maps::catalogue::size_flag(map);
            return DataplaneError::MapFull { map, flag };
        }
        DataplaneError::Map { map, source }
    }
}

/// What the sync sees of a kernel map failure: a full map stays recognisable (the sync
/// retries it after removals), everything else keeps this error's message and cause.
impl From<DataplaneError> for crate::sync::StoreError {
    fn from(e: DataplaneError) -> Self {
        match e {
            DataplaneError::MapFull { map, flag } => Self::MapFull { map, flag },
            e => Self::Other(Box::new(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::StoreError;

    #[test]
    fn store_errors_keep_map_full_apart_and_every_message() {
        let full = DataplaneError::MapFull { map: "BACKEND_SLOTS", flag: "max-backends" };
        let text = full.to_string();
        let converted = StoreError::from(full);
        assert!(matches!(converted, StoreError::MapFull { map: "BACKEND_SLOTS", flag: "max-backends" }));
        assert_eq!(converted.to_string(), text);

        let other = DataplaneError::MissingObject("SERVICES");
        let text = other.to_string();
        let converted = StoreError::from(other);
        assert!(matches!(converted, StoreError::Other(_)));
        assert_eq!(converted.to_string(), text);
    }
}
