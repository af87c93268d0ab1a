//! Attach the TC programs to pod-facing interfaces so that they survive agent restarts.
//!
//! With tcx (kernel >= 6.6) each attachment is a bpf_link pinned under
//! `<root>/links/<ifindex>-<dir>-<ifname>` (bpffs refuses names with dots, so dots in
//! interface names become `_`). A restarted agent finds the pin and atomically
//! swaps its freshly loaded program into the existing link (BPF_LINK_UPDATE): there is no
//! instant at which the interface runs without a program. Older kernels get a clsact
//! filter over netlink, which stays in place when the agent exits.
use std::{io, path::Path};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, TcAttachOptions},
};
use tracing::{debug, info};

use super::{
    DataplaneError,
    loader::{PROG_FROM_POD, PROG_TO_POD, Programs},
    paths,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Packets leaving the pod (TC ingress of the host-side veth).
    FromPod,
    /// Packets entering the pod (TC egress of the host-side veth).
    ToPod,
}

impl Direction {
    fn tc(self) -> TcAttachType {
        match self {
            Direction::FromPod => TcAttachType::Ingress,
            Direction::ToPod => TcAttachType::Egress,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Direction::FromPod => "ingress",
            Direction::ToPod => "egress",
        }
    }
}

/// How a program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A new tcx link was created and pinned.
    TcxNew,
    /// An existing pinned tcx link now runs the new program.
    TcxReplaced,
    /// Legacy clsact filter (no tcx on this kernel).
    Netlink,
}

fn pin_name(iface: &str, ifindex: u32, dir: Direction) -> String {
    format!("{ifindex}-{}-{}", dir.suffix(), iface.replace('.', "_"))
}

/// Parse a pin name back into (ifname with dots as `_`, ifindex).
pub fn parse_pin_name(name: &str) -> Option<(&str, u32)> {
    let mut parts = name.splitn(3, '-');
    let idx = parts.next()?.parse().ok()?;
    let _dir = parts.next()?;
    Some((parts.next()?, idx))
}

fn attach_err(iface: &str, what: &str, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Attach { iface: iface.to_string(), message: format!("{what}: {e}") }
}

/// Attach `prog` to `iface` in direction `dir`, replacing what an earlier agent attached.
pub fn attach(
    prog: &mut SchedClassifier,
    root: &Path,
    iface: &str,
    ifindex: u32,
    dir: Direction,
) -> Result<AttachMode, DataplaneError> {
    let pin = paths::links_dir(root).join(pin_name(iface, ifindex, dir));
    if let Ok(old) = PinnedLink::from_pin(&pin) {
        let link = FdLink::from(old)
            .try_into()
            .map_err(|e| attach_err(iface, "pinned link is not a tc link", e))?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                // Taken out of the program so dropping the program does not detach it;
                // the pin keeps the link alive.
                let _ = prog.take_link(id);
                debug!(iface, dir = dir.suffix(), "replaced program in pinned tcx link");
                return Ok(AttachMode::TcxReplaced);
            }
            Err(e) => {
                // The link is defunct (e.g. the old device went away): start afresh.
                debug!(iface, error = %e, "pinned link unusable, re-attaching");
                let _ = std::fs::remove_file(&pin);
            }
        }
    }
    match prog.attach_with_options(iface, dir.tc(), TcAttachOptions::TcxOrder(LinkOrder::default()))
    {
        Ok(id) => {
            let link = prog.take_link(id).map_err(|e| attach_err(iface, "take link", e))?;
            let fd: FdLink = link.try_into().map_err(|e| attach_err(iface, "tcx link", e))?;
            fd.pin(&pin).map_err(|e| attach_err(iface, "pin link", e))?;
            Ok(AttachMode::TcxNew)
        }
        Err(tcx_err) => {
            info!(iface, error = %tcx_err, "tcx attach failed, falling back to a clsact filter");
            if let Err(e) = tc::qdisc_add_clsact(iface) {
                if !matches!(&e, tc::TcError::IoError(io) if io.kind() == io::ErrorKind::AlreadyExists)
                    && !e.to_string().contains("exists")
                {
                    return Err(attach_err(iface, "adding clsact qdisc", e));
                }
            }
            let id = prog
                .attach(iface, dir.tc())
                .map_err(|e| attach_err(iface, "netlink attach", e))?;
            let link = prog.take_link(id).map_err(|e| attach_err(iface, "take link", e))?;
            // A netlink filter lives in the kernel without any fd; dropping the link object
            // would remove it, so it is deliberately leaked to outlive the agent.
            std::mem::forget(link);
            Ok(AttachMode::Netlink)
        }
    }
}

/// Attach both TC programs to a pod-facing interface (by name, in the caller's netns).
pub fn attach_pod_interface(
    progs: &mut Programs,
    root: &Path,
    iface: &str,
) -> Result<(AttachMode, AttachMode), DataplaneError> {
    let c = std::ffi::CString::new(iface).map_err(|_| attach_err(iface, "name", "contains NUL"))?;
    // SAFETY: NUL-terminated string we own.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Err(attach_err(iface, "lookup", io::Error::last_os_error()));
    }
    let from = attach(progs.classifier(PROG_FROM_POD)?, root, iface, ifindex, Direction::FromPod)?;
    let to = attach(progs.classifier(PROG_TO_POD)?, root, iface, ifindex, Direction::ToPod)?;
    Ok((from, to))
}

/// Remove the pins of links whose interface is gone (or every pin when `keep` says so).
/// Returns the pin names removed.
pub fn remove_stale_pins(
    root: &Path,
    keep: impl Fn(&str, u32) -> bool,
) -> Result<Vec<String>, DataplaneError> {
    let dir = paths::links_dir(root);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DataplaneError::Io { context: format!("reading {}", dir.display()), source });
        }
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = match parse_pin_name(&name) {
            Some((iface, idx)) => !keep(iface, idx),
            None => false,
        };
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        let n = pin_name("veth1a2b", 42, Direction::FromPod);
        assert_eq!(n, "42-ingress-veth1a2b");
        assert_eq!(parse_pin_name(&n), Some(("veth1a2b", 42)));
        assert_eq!(pin_name("eth0.100", 7, Direction::ToPod), "7-egress-eth0_100");
        assert_eq!(parse_pin_name("7-egress-my-if"), Some(("my-if", 7)));
        assert_eq!(parse_pin_name("junk"), None);
    }
}
