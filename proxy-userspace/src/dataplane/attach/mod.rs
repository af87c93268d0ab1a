//! Attach the TC programs to pod-facing interfaces, and XDP + TC egress to uplinks, so that
//! they survive agent restarts.
//!
//! With tcx (kernel >= 6.6) each attachment is a bpf_link pinned under
//! `<root>/links/<ifindex>-<dir>-<ifname>` (bpffs refuses names with dots, so dots in
//! interface names become `_`). A restarted agent finds the pin and atomically
//! swaps its freshly loaded program into the existing link (BPF_LINK_UPDATE): there is no
//! instant at which the interface runs without a program. Older kernels get a clsact
//! filter over netlink, which stays in place when the agent exits (`ebpf-proxy cleanup`
//! removes it; `--tc-attach clsact` takes that path on any kernel, for tests).
//!
//! XDP on an uplink is a bpf_link too, pinned as `<ifindex>-xdp_native-<ifname>` or
//! `<ifindex>-xdp_generic-<ifname>`: the pin name records the mode, which the CLI shows and
//! a restarted agent keeps (BPF_LINK_UPDATE into the same link) unless `--xdp-mode` asks for
//! another one.
pub mod clsact;
pub mod ifaces;
pub mod ownership;
pub mod uplinks;

use std::{fmt, io, path::Path};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, TcAttachOptions},
    xdp::XdpLink,
};
use tracing::{debug, info};

use crate::dataplane::{
    DataplaneError,
    kernel::bpfsys,
    maps::loader::{PROG_FROM_POD, PROG_FROM_UPLINK, PROG_TO_POD, PROG_TO_UPLINK, PROG_UPLINK_HANDOFF, Programs},
    paths,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Packets leaving the pod (TC ingress of the host-side veth).
    FromPod,
    /// Packets entering the pod (TC egress of the host-side veth).
    ToPod,
    /// Packets leaving the node through an uplink (TC egress of the uplink).
    ToUplink,
    /// Packets XDP handed to the uplink's TC ingress (`uplink_handoff`).
    UplinkHandoff,
}

impl Direction {
    fn tc(self) -> TcAttachType {
        match self {
            Direction::FromPod | Direction::UplinkHandoff => TcAttachType::Ingress,
            Direction::ToPod | Direction::ToUplink => TcAttachType::Egress,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Direction::FromPod => "ingress",
            Direction::ToPod => "egress",
            Direction::ToUplink => "uplink_egress",
            Direction::UplinkHandoff => "uplink_handoff",
        }
    }
}

/// Which XDP mode the operator asks for (`--xdp-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpModeChoice {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    #[default]
    Auto,
    Native,
    Generic,
}

/// The XDP mode actually in use on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpActive {
    /// In the driver, before an skb exists.
    Native,
    /// Generic (SKB) mode: after the skb is built; works on every device.
    Generic,
}

impl XdpActive {
    fn aya(self) -> XdpMode {
        match self {
            XdpActive::Native => XdpMode::Driver,
            XdpActive::Generic => XdpMode::Skb,
        }
    }
    fn pin_dir(self) -> &'static str {
        match self {
            XdpActive::Native => "xdp_native",
            XdpActive::Generic => "xdp_generic",
        }
    }
    /// The mode a link pin name records, if it is an XDP pin.
    pub fn from_pin_name(name: &str) -> Option<Self> {
        match name.split('-').nth(1)? {
            "xdp_native" => Some(XdpActive::Native),
            "xdp_generic" => Some(XdpActive::Generic),
            _ => None,
        }
    }
}

impl fmt::Display for XdpActive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpActive::Native => "native",
            XdpActive::Generic => "generic",
        })
    }
}

impl XdpModeChoice {
    fn allows(self, m: XdpActive) -> bool {
        matches!(
            (self, m),
            (XdpModeChoice::Auto, _)
                | (XdpModeChoice::Native, XdpActive::Native)
                | (XdpModeChoice::Generic, XdpActive::Generic)
        )
    }
    /// Modes to try, best first.
    fn candidates(self) -> &'static [XdpActive] {
        match self {
            XdpModeChoice::Auto => &[XdpActive::Native, XdpActive::Generic],
            XdpModeChoice::Native => &[XdpActive::Native],
            XdpModeChoice::Generic => &[XdpActive::Generic],
        }
    }
}

/// How TC programs are attached (`--tc-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttachChoice {
    /// tcx links where the kernel has them (>= 6.6), clsact filters otherwise.
    #[default]
    Auto,
    /// clsact filters over netlink even where tcx exists: what kernels < 6.6 get (tests of
    /// that path run on newer kernels with it).
    Clsact,
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
    link_pin_name(iface, ifindex, dir.suffix())
}

fn link_pin_name(iface: &str, ifindex: u32, kind: &str) -> String {
    format!("{ifindex}-{kind}-{}", iface.replace('.', "_"))
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
    how: TcAttachChoice,
) -> Result<AttachMode, DataplaneError> {
    if how == TcAttachChoice::Clsact {
        return attach_clsact(prog, iface, dir);
    }
    let pin = paths::links_dir(root).join(pin_name(iface, ifindex, dir));
    if let Ok(old) = PinnedLink::from_pin(&pin) {
        let link = FdLink::from(old).try_into().map_err(|e| attach_err(iface, "pinned link is not a tc link", e))?;
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
    // First in the tcx chain: a stale program of ours that we cannot detach (an agent on
    // another --bpffs-root, seen without CAP_SYS_ADMIN) then runs after ours, on packets
    // ours already translated, instead of translating them with its stale maps first.
    match prog.attach_with_options(iface, dir.tc(), TcAttachOptions::TcxOrder(LinkOrder::first())) {
        Ok(id) => {
            let link = prog.take_link(id).map_err(|e| attach_err(iface, "take link", e))?;
            let fd: FdLink = link.try_into().map_err(|e| attach_err(iface, "tcx link", e))?;
            fd.pin(&pin).map_err(|e| attach_err(iface, "pin link", e))?;
            Ok(AttachMode::TcxNew)
        }
        Err(tcx_err) => {
            info!(iface, error = %tcx_err, "tcx attach failed, falling back to a clsact filter");
            attach_clsact(prog, iface, dir)
        }
    }
}

/// A clsact filter over netlink (`ebpf-proxy cleanup` recognises it by its program).
fn attach_clsact(prog: &mut SchedClassifier, iface: &str, dir: Direction) -> Result<AttachMode, DataplaneError> {
    // An existing clsact qdisc is fine (ours from the other direction, or another tool's).
    // Recognised by errno: the kernel's message for it ("Exclusivity flag on, cannot
    // modify") says nothing about existing, and matching on text let every second
    // attachment to a device fail.
    if let Err(e) = tc::qdisc_add_clsact(iface)
        && !clsact_exists(&e)
    {
        return Err(attach_err(iface, "adding clsact qdisc", e));
    }
    // Explicitly netlink: aya's plain `attach` picks tcx wherever the kernel has it. The
    // default options let the kernel choose priority and handle (in front of the filters
    // already there), as on kernels without tcx.
    let id = prog
        .attach_with_options(iface, dir.tc(), TcAttachOptions::Netlink(NlOptions::default()))
        .map_err(|e| attach_err(iface, "netlink attach", e))?;
    let link = prog.take_link(id).map_err(|e| attach_err(iface, "take link", e))?;
    // A netlink filter lives in the kernel without any fd; dropping the link object
    // would remove it, so it is deliberately leaked to outlive the agent.
    std::mem::forget(link);
    Ok(AttachMode::Netlink)
}

/// Attach both TC programs to a pod-facing interface (by name, in the caller's netns).
pub fn attach_pod_interface(
    progs: &mut Programs,
    root: &Path,
    iface: &str,
) -> Result<(AttachMode, AttachMode), DataplaneError> {
    attach_pod_interface_with(progs, root, iface, TcAttachChoice::Auto)
}

/// [`attach_pod_interface`] with the TC attachment chosen (`--tc-attach`).
pub fn attach_pod_interface_with(
    progs: &mut Programs,
    root: &Path,
    iface: &str,
    how: TcAttachChoice,
) -> Result<(AttachMode, AttachMode), DataplaneError> {
    let ifindex = ifindex_of(iface)?;
    let from = attach(progs.classifier(PROG_FROM_POD)?, root, iface, ifindex, Direction::FromPod, how)?;
    let to = attach(progs.classifier(PROG_TO_POD)?, root, iface, ifindex, Direction::ToPod, how)?;
    Ok((from, to))
}

/// How an uplink ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UplinkAttach {
    pub xdp: XdpActive,
    /// The XDP program was swapped into an existing pinned link (agent restart).
    pub xdp_replaced: bool,
    pub egress: AttachMode,
}

/// Attach the XDP program to `iface` in the best mode `want` allows, replacing the program
/// in a pinned link of an earlier agent when its mode is allowed (atomically: no instant
/// without a program). A pinned link in a mode no longer wanted is detached first.
pub fn attach_xdp(
    prog: &mut Xdp,
    root: &Path,
    iface: &str,
    ifindex: u32,
    want: XdpModeChoice,
) -> Result<(XdpActive, bool), DataplaneError> {
    let links = paths::links_dir(root);
    for mode in [XdpActive::Native, XdpActive::Generic] {
        let pin = links.join(link_pin_name(iface, ifindex, mode.pin_dir()));
        let Ok(old) = PinnedLink::from_pin(&pin) else { continue };
        if !want.allows(mode) {
            // Unpinning drops the last reference to the link: the old program detaches.
            drop(old);
            let _ = std::fs::remove_file(&pin);
            info!(iface, old_mode = %mode, wanted = ?want, "detached XDP in a mode no longer wanted");
            continue;
        }
        let replaced = XdpLink::try_from(FdLink::from(old))
            .map_err(|e| attach_err(iface, "pinned link is not an XDP link", e))
            .and_then(|link| prog.attach_to_link(link).map_err(|e| attach_err(iface, "XDP link update", e)));
        match replaced {
            Ok(id) => {
                // The pin keeps the link alive; the program must not detach it on drop.
                let _ = prog.take_link(id);
                debug!(iface, mode = %mode, "replaced program in pinned XDP link");
                return Ok((mode, true));
            }
            Err(e) => {
                // Defunct (the device was re-created) or foreign: start afresh.
                debug!(iface, error = %e, "pinned XDP link unusable, re-attaching");
                let _ = std::fs::remove_file(&pin);
            }
        }
    }
    let mut errors = Vec::new();
    let mut candidates = want.candidates();
    if want == XdpModeChoice::Auto && ifaces::driver(iface).as_deref() == Some("veth") {
        // veth runs native XDP, but flushes XDP_TX/redirected frames to its peer only when
        // the peer runs an XDP program too, which we cannot arrange for a peer in another
        // namespace: forwarded packets would stall. Generic XDP transmits through the
        // normal path. `--xdp-mode native` overrides this.
        info!(iface, "uplink is a veth: generic XDP (native XDP_TX needs XDP on the peer; --xdp-mode native to force)");
        candidates = &[XdpActive::Generic];
    }
    for &mode in candidates {
        match prog.attach_to_if_index(ifindex, mode.aya()) {
            Ok(id) => {
                let link = prog.take_link(id).map_err(|e| attach_err(iface, "take XDP link", e))?;
                match FdLink::try_from(link) {
                    Ok(fd) => {
                        let pin = links.join(link_pin_name(iface, ifindex, mode.pin_dir()));
                        fd.pin(&pin).map_err(|e| attach_err(iface, "pin XDP link", e))?;
                    }
                    // Kernels without XDP links (< 5.9) got a netlink attachment: no fd to
                    // pin, but it stays on the device when we exit (the conversion took the
                    // handle out of its detach-on-drop wrapper).
                    Err(_) => info!(iface, "XDP attached over netlink (no bpf_link on this kernel)"),
                }
                return Ok((mode, false));
            }
            Err(e) => {
                info!(iface, mode = %mode, error = %e, "XDP attach failed in this mode");
                errors.push(format!("{mode}: {e}"));
            }
        }
    }
    Err(attach_err(iface, "XDP attach", errors.join("; ")))
}

/// Attach the uplink programs to `iface`: XDP (north-south services) and TC egress
/// (`to_uplink`: reverse NAT of replies from local backends).
pub fn attach_uplink(
    progs: &mut Programs,
    root: &Path,
    iface: &str,
    want: XdpModeChoice,
    how: TcAttachChoice,
) -> Result<UplinkAttach, DataplaneError> {
    let ifindex = ifindex_of(iface)?;
    // Before XDP: from its first packet on, XDP may hand packets to it.
    attach(progs.classifier(PROG_UPLINK_HANDOFF)?, root, iface, ifindex, Direction::UplinkHandoff, how)?;
    let (xdp, xdp_replaced) = attach_xdp(progs.xdp(PROG_FROM_UPLINK)?, root, iface, ifindex, want)?;
    let egress = attach(progs.classifier(PROG_TO_UPLINK)?, root, iface, ifindex, Direction::ToUplink, how)?;
    Ok(UplinkAttach { xdp, xdp_replaced, egress })
}

/// Swap the freshly loaded programs into every pinned link at once (BPF_LINK_UPDATE),
/// without waiting for the interface watcher. Used when maps are being migrated: the old
/// programs run on the old maps, so the fewer microseconds between the first interface and
/// the last one running the new programs, the fewer flows can straddle the two. Links that
/// cannot be updated (their interface is gone) are left to the watcher. Returns how many
/// links were updated.
pub fn swap_pinned_links(progs: &mut Programs, root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(paths::links_dir(root)) else { return 0 };
    let mut swapped = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let program = match name.split('-').nth(1) {
            Some("ingress") => PROG_FROM_POD,
            Some("egress") => PROG_TO_POD,
            Some("uplink_egress") => PROG_TO_UPLINK,
            Some("uplink_handoff") => PROG_UPLINK_HANDOFF,
            Some("xdp_native" | "xdp_generic") => PROG_FROM_UPLINK,
            _ => continue,
        };
        let Ok(pinned) = PinnedLink::from_pin(e.path()) else { continue };
        let fd = FdLink::from(pinned);
        let done = if program == PROG_FROM_UPLINK {
            progs.xdp(program).ok().and_then(|p| {
                let id = p.attach_to_link(XdpLink::try_from(fd).ok()?).ok()?;
                // The pin keeps the link alive; the program must not detach it on drop.
                let _ = p.take_link(id);
                Some(())
            })
        } else {
            progs.classifier(program).ok().and_then(|p| {
                let id = p.attach_to_link(fd.try_into().ok()?).ok()?;
                let _ = p.take_link(id);
                Some(())
            })
        };
        match done {
            Some(()) => swapped += 1,
            None => debug!(pin = %name, "pinned link not updated; left to the interface watcher"),
        }
    }
    swapped
}

/// An uplink as the pins record it (for the CLI).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PinnedUplink {
    pub iface: String,
    pub ifindex: u32,
    pub xdp_mode: XdpActive,
}

/// Uplinks with a pinned XDP link under `root`, sorted by ifindex.
pub fn pinned_uplinks(root: &Path) -> Vec<PinnedUplink> {
    let mut out: Vec<PinnedUplink> = std::fs::read_dir(paths::links_dir(root))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mode = XdpActive::from_pin_name(&name)?;
            let (iface, ifindex) = parse_pin_name(&name)?;
            Some(PinnedUplink { iface: iface.to_string(), ifindex, xdp_mode: mode })
        })
        .collect();
    out.sort_by_key(|u| u.ifindex);
    out
}

/// Kernel ids of the links pinned under `root` (the ones a restarted agent updates in
/// place).
pub fn pinned_link_ids(root: &Path) -> std::collections::HashSet<u32> {
    std::fs::read_dir(paths::links_dir(root))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| bpfsys::obj_get(&e.path()).and_then(|fd| bpfsys::link_info(&fd)).ok())
        .map(|i| i.id)
        .collect()
}

/// Whether adding the clsact qdisc failed only because the device already has one.
fn clsact_exists(e: &tc::TcError) -> bool {
    match e {
        tc::TcError::AlreadyAttached => true,
        tc::TcError::IoError(io) => io.kind() == io::ErrorKind::AlreadyExists,
        tc::TcError::NetlinkError(nl) => nl.raw_os_error() == Some(libc::EEXIST),
        _ => false,
    }
}

fn ifindex_of(iface: &str) -> Result<u32, DataplaneError> {
    let c = std::ffi::CString::new(iface).map_err(|_| attach_err(iface, "name", "contains NUL"))?;
    // SAFETY: NUL-terminated string we own.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Err(attach_err(iface, "lookup", io::Error::last_os_error()));
    }
    Ok(ifindex)
}

/// Remove the pins of links whose interface is gone (or every pin when `keep` says so).
/// Returns the pin names removed.
pub fn remove_stale_pins(root: &Path, keep: impl Fn(&str, u32) -> bool) -> Result<Vec<String>, DataplaneError> {
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
        let x = link_pin_name("eth0", 2, XdpActive::Native.pin_dir());
        assert_eq!(x, "2-xdp_native-eth0");
        assert_eq!(parse_pin_name(&x), Some(("eth0", 2)));
        assert_eq!(XdpActive::from_pin_name(&x), Some(XdpActive::Native));
        assert_eq!(XdpActive::from_pin_name("2-xdp_generic-eth0"), Some(XdpActive::Generic));
        assert_eq!(XdpActive::from_pin_name("2-egress-eth0"), None);
        assert_eq!(pin_name("eth0", 2, Direction::ToUplink), "2-uplink_egress-eth0");
    }

    #[test]
    fn xdp_mode_choice() {
        assert!(XdpModeChoice::Auto.allows(XdpActive::Generic));
        assert!(!XdpModeChoice::Native.allows(XdpActive::Generic));
        assert_eq!(XdpModeChoice::Auto.candidates(), &[XdpActive::Native, XdpActive::Generic]);
    }
}
