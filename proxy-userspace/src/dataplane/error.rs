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
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no map or program named {0}")]
    MissingObject(&'static str),
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
    /// Classify a map syscall failure: E2BIG on insert means the map is full.
    pub fn from_map(map: &'static str, source: aya::maps::MapError) -> Self {
        if let aya::maps::MapError::SyscallError(e) = &source
            && e.io_error.raw_os_error() == Some(libc::E2BIG)
        {
            let flag = crate::dataplane::maps::size_flag(map);
            return DataplaneError::MapFull { map, flag };
        }
        DataplaneError::Map { map, source }
    }
}
