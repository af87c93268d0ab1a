//! `ebpf-proxy cleanup` (kube-proxy's `--cleanup`): take the datapath out of the node.
//!
//! 1. Refuse a root that is not a directory on bpffs, or that is the bpffs mount itself
//!    (everything under a root is removed). Refuse while an agent holds a root's lock
//!    (unless `force`), and hold the lock ourselves meanwhile so no agent starts on it
//!    half-way.
//! 2. Detach the links pinned under each root (`BPF_LINK_DETACH`, wherever they are
//!    attached).
//! 3. Detach every program of ours attached to an interface of this network namespace
//!    (`ownership`): also those of agents on other roots, or whose pins are gone, and the
//!    clsact filters of kernels without tcx (only filters running a program of ours; other
//!    tools' filters on the same device stay). A clsact qdisc left with no filter at all
//!    is removed; one that still holds another's filter stays.
//! 4. Remove each root's pins (maps, links) and the root itself.
//!
//! Before step 2, our live Service flows are handed to netfilter's conntrack
//! (`takeover::hand_back`), after the frontends are taken out so new connections go to
//! kube-proxy's rules if they are back: a rollback to kube-proxy keeps its connections.
//!
//! Idempotent: a second run finds nothing and says so.
use std::{
    io,
    path::{Path, PathBuf},
};

use crate::dataplane::{
    attach::clsact,
    attach::ownership::{self, Attachment},
    kernel::bpfsys,
    lock::{LockError, RootLock},
    maps::loader::check_bpffs,
    paths,
};

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(
        "an agent{} is running on {root}: stop it first (delete the DaemonSet), or pass --force to pull the datapath from under it",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    AgentRunning { root: PathBuf, pid: Option<u32> },
    #[error(
        "{root} is a mount point: cleanup removes everything under the root it is given, and there that would be every pin on the node; give the agent's root (e.g. /sys/fs/bpf/ebpf-proxy)"
    )]
    MountPoint { root: PathBuf },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::DataplaneError),
}

/// A pinned link detached through its pin.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PinnedLinkDetached {
    pub pin: PathBuf,
    pub link_id: u32,
    pub ifindex: u32,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CleanupReport {
    pub pinned_links_detached: Vec<PinnedLinkDetached>,
    pub detached: Vec<Attachment>,
    /// Interfaces whose clsact qdisc was removed (it held nothing but our filters).
    pub clsact_qdiscs_removed: Vec<String>,
    pub pins_removed: Vec<PathBuf>,
    /// Things that could not be undone (each names what and why).
    pub errors: Vec<String>,
    /// Flows handed to netfilter's conntrack, per root (see `takeover::hand_back`).
    pub handed_back: Vec<(PathBuf, crate::takeover::HandBack)>,
    /// Why flows could not be handed back (not an error of the cleanup: the datapath is
    /// still taken out).
    pub warnings: Vec<String>,
}

impl CleanupReport {
    pub fn is_empty(&self) -> bool {
        self.pinned_links_detached.is_empty()
            && self.detached.is_empty()
            && self.clsact_qdiscs_removed.is_empty()
            && self.pins_removed.is_empty()
    }

    /// Human-readable lines for the CLI.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in &self.pinned_links_detached {
            out.push_str(&format!(
                "detached pinned link {} (link id {}, ifindex {})\n",
                l.pin.display(),
                l.link_id,
                l.ifindex
            ));
        }
        for a in &self.detached {
            out.push_str(&format!("detached {a}\n"));
        }
        for i in &self.clsact_qdiscs_removed {
            out.push_str(&format!("removed the clsact qdisc of {i} (nothing else in it)\n"));
        }
        for p in &self.pins_removed {
            out.push_str(&format!("removed {}\n", p.display()));
        }
        for (root, h) in &self.handed_back {
            out.push_str(&format!(
                "handed {} flow(s) back to netfilter's conntrack ({} frontend(s) of {} taken out first; {} source-NATed flow(s) cannot be, {} refused)\n",
                h.handed_back,
                h.frontends_removed,
                root.display(),
                h.source_nat,
                h.failed
            ));
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        for e in &self.errors {
            out.push_str(&format!("error: {e}\n"));
        }
        if self.is_empty() && self.errors.is_empty() {
            out.push_str("nothing to clean up: no program of ours attached in this network namespace, no pins\n");
        }
        out
    }
}

fn is_mount_point(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    match p.canonicalize().ok().as_deref().and_then(Path::parent) {
        Some(parent) => dev(p) != dev(parent),
        None => true,
    }
}

/// Every file under `dir` (depth first, files before their directory), then `dir`.
fn remove_tree(dir: &Path, removed: &mut Vec<PathBuf>, errors: &mut Vec<String>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => return errors.push(format!("reading {}: {e}", dir.display())),
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            remove_tree(&p, removed, errors);
        } else {
            match std::fs::remove_file(&p) {
                Ok(()) => removed.push(p),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("removing {}: {e}", p.display())),
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => removed.push(dir.to_path_buf()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("removing {}: {e}", dir.display())),
    }
}

fn detach_pinned_links(root: &Path, report: &mut CleanupReport) {
    let Ok(entries) = std::fs::read_dir(paths::links_dir(root)) else { return };
    for e in entries.flatten() {
        let pin = e.path();
        let Ok(fd) = bpfsys::obj_get(&pin) else { continue };
        match bpfsys::link_info(&fd) {
            // Already defunct: only the pin is left, removed below.
            Ok(info) if info.ifindex == 0 => {}
            Ok(info) => match bpfsys::link_detach(&fd) {
                Ok(()) => report.pinned_links_detached.push(PinnedLinkDetached {
                    pin,
                    link_id: info.id,
                    ifindex: info.ifindex,
                }),
                Err(err) => report.errors.push(format!("detaching the link pinned at {}: {err}", pin.display())),
            },
            Err(err) => report.errors.push(format!("{}: {err}", pin.display())),
        }
    }
}

/// The socket-level programs' cgroup links: detached explicitly (not only unpinned), so a
/// process still holding a link fd cannot keep translating after a cleanup.
fn detach_cgroup_links(root: &Path, report: &mut CleanupReport) {
    let Ok(entries) = std::fs::read_dir(paths::cgroup_links_dir(root)) else { return };
    for e in entries.flatten() {
        let pin = e.path();
        let Ok(fd) = bpfsys::obj_get(&pin) else { continue };
        let link_id = bpfsys::link_info(&fd).map(|i| i.id).unwrap_or(0);
        match bpfsys::link_detach(&fd) {
            Ok(()) => report.pinned_links_detached.push(PinnedLinkDetached { pin, link_id, ifindex: 0 }),
            Err(err) => report.errors.push(format!("detaching the cgroup link pinned at {}: {err}", pin.display())),
        }
    }
}

/// The clsact qdiscs of the devices we removed filters from, when nothing else is in them.
/// Devices we took nothing from keep theirs: an empty clsact qdisc there is not ours to judge.
async fn remove_emptied_qdiscs(report: &mut CleanupReport) {
    let mut devices: Vec<(u32, String)> =
        report.detached.iter().filter(|a| a.filter.is_some()).map(|a| (a.ifindex, a.iface.clone())).collect();
    devices.sort();
    devices.dedup();
    if devices.is_empty() {
        return;
    }
    let (conn, handle, _) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(e) => return report.errors.push(format!("rtnetlink: {e}")),
    };
    let task = tokio::spawn(conn);
    for (ifindex, iface) in devices {
        match clsact::remove_qdisc_if_empty(&handle, ifindex).await {
            Ok(true) => report.clsact_qdiscs_removed.push(iface),
            Ok(false) => {}
            Err(e) => report.errors.push(format!("{iface}: {e}")),
        }
    }
    task.abort();
}

/// Run the cleanup for `roots` in the caller's network namespace.
pub async fn cleanup(roots: &[PathBuf], force: bool) -> Result<CleanupReport, CleanupError> {
    let mut locks = Vec::new();
    for root in roots {
        if !root.exists() {
            continue;
        }
        // Everything under the root is removed: it must be a directory of pins, never
        // another filesystem, nor the bpffs mount itself (other tools' pins).
        check_bpffs(root)?;
        if is_mount_point(root) {
            return Err(CleanupError::MountPoint { root: root.clone() });
        }
        match RootLock::acquire(root) {
            Ok(l) => locks.push(l),
            Err(LockError::Held { pid, .. }) if !force => {
                return Err(CleanupError::AgentRunning { root: root.clone(), pid });
            }
            // --force: go on without the lock.
            Err(LockError::Held { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut report = CleanupReport::default();
    // Before anything is detached: our flows must be netfilter's when our programs go.
    for root in roots.iter().filter(|r| paths::maps_dir(r).exists()) {
        match crate::takeover::hand_back(root) {
            Ok(h) => {
                report.warnings.extend(h.errors.iter().cloned());
                report.handed_back.push((root.clone(), h));
            }
            Err(e) => report.warnings.push(format!("{}: flows not handed back to netfilter: {e}", root.display())),
        }
    }
    for root in roots {
        detach_pinned_links(root, &mut report);
        detach_cgroup_links(root, &mut report);
    }
    for a in ownership::scan().await? {
        match ownership::detach(&a).await {
            Ok(()) => report.detached.push(a),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    remove_emptied_qdiscs(&mut report).await;
    for root in roots {
        remove_tree(root, &mut report.pins_removed, &mut report.errors);
    }
    // The locks were on directories now removed; dropping them releases nothing anyone
    // could still wait on.
    drop(locks);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_recognised() {
        assert!(is_mount_point(Path::new("/")));
        assert!(is_mount_point(Path::new("/proc")));
        let dir = std::env::temp_dir().join(format!("ebpf-proxy-cleanup-mp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!is_mount_point(&dir));
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn a_root_off_bpffs_is_refused_and_left_alone() {
        let dir = std::env::temp_dir().join(format!("ebpf-proxy-cleanup-nobpf-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("maps")).unwrap();
        std::fs::write(dir.join("maps/keep"), b"x").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = rt.block_on(cleanup(std::slice::from_ref(&dir), true)).unwrap_err();
        assert!(e.to_string().contains("not on a bpf filesystem"), "{e}");
        assert!(dir.join("maps/keep").exists(), "cleanup removed files off bpffs");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
