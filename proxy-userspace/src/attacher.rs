//! The attacher task: owns the loaded programs, attaches them to every matching interface
//! as the rtnetlink watcher reports it, replaces attachments of ours left by other agents
//! (another `--bpffs-root`, links whose pins are gone), and checks every
//! `--datapath-check-interval-ms` that the pins and attachments are still there, restoring
//! them when not.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc::UnboundedReceiver, watch};
use tracing::{error, info, warn};

use crate::{
    dataplane::{
        attach::ifaces::LinkEvent,
        attach::ownership::{self, Hook, Recognizer},
        attach::{
            AttachMode, TcAttachChoice, XdpModeChoice, attach_pod_interface_with, attach_uplink, pinned_link_ids,
            remove_stale_pins,
        },
        guard::{DatapathGuard, OurPrograms},
        maps::loader::Programs,
        sock::{self, SockSettings},
    },
    health::Health,
    metrics::Metrics,
};

/// The hooks where several programs run one after the other: a stale one of ours is
/// detached after ours is attached, with no instant without a program.
const TC_HOOKS: [Hook; 4] = [Hook::TcxIngress, Hook::TcxEgress, Hook::ClsactIngress, Hook::ClsactEgress];
const ALL_HOOKS: [Hook; 5] = [Hook::TcxIngress, Hook::TcxEgress, Hook::ClsactIngress, Hook::ClsactEgress, Hook::Xdp];

/// Which interfaces get which programs.
pub struct AttachPlan {
    /// Uplink names (exact): XDP + TC egress. Everything else the watcher reports is a pod
    /// interface.
    pub uplinks: HashSet<String>,
    pub xdp_mode: XdpModeChoice,
    /// `--tc-attach`.
    pub tc_attach: TcAttachChoice,
}

/// An interface we attached to.
struct Attached {
    name: String,
    /// Whether the datapath check can verify it (tcx and XDP, not clsact filters).
    checked: bool,
}

pub struct Attacher {
    pub programs: Programs,
    pub root: PathBuf,
    pub plan: AttachPlan,
    pub metrics: Metrics,
    /// Set once every interface present at start-up has been attached (readiness waits
    /// for it).
    pub attached_initial: watch::Sender<bool>,
    pub guard: DatapathGuard,
    pub ours: OurPrograms,
    pub health: Arc<Health>,
    pub check_interval: Duration,
    /// The cgroup and settings the socket-level programs were attached with (None: not
    /// attached), so the datapath check re-attaches them when their pins are removed.
    pub sock: Option<(PathBuf, SockSettings)>,
}

impl Attacher {
    /// Attach to one interface. `Some(checked)` when attached; `checked` is false for the
    /// clsact fallback (kernels without tcx), which the datapath check cannot see.
    fn attach(&mut self, index: u32, name: &str) -> Option<bool> {
        if self.plan.uplinks.contains(name) {
            return match attach_uplink(&mut self.programs, &self.root, name, self.plan.xdp_mode, self.plan.tc_attach) {
                Ok(a) => {
                    info!(
                        iface = %name,
                        ifindex = index,
                        xdp_mode = %a.xdp,
                        driver = crate::dataplane::attach::ifaces::driver(name).as_deref().unwrap_or("unknown"),
                        xdp_link = if a.xdp_replaced { "replaced" } else { "new" },
                        egress = ?a.egress,
                        "attached to uplink"
                    );
                    Some(a.egress != AttachMode::Netlink)
                }
                Err(e) => {
                    error!(iface = %name, error = %e, "cannot attach to uplink");
                    None
                }
            };
        }
        match attach_pod_interface_with(&mut self.programs, &self.root, name, self.plan.tc_attach) {
            Ok((mode, _)) => {
                info!(iface = %name, ifindex = index, mode = ?mode, "attached to pod interface");
                Some(mode != AttachMode::Netlink)
            }
            // The link may already be gone again (pod deleted): not fatal.
            Err(e) => {
                warn!(iface = %name, error = %e, "cannot attach");
                None
            }
        }
    }

    /// Detach programs of ours on `index` that this agent did not load (an agent on another
    /// root, or one whose pins were removed), on `hooks` only. Links pinned under our own
    /// root are never detached: they are ours to update in place (a restart).
    async fn detach_foreign(&self, recognizer: &mut Recognizer, index: u32, hooks: &[Hook]) {
        let iface = match ownership::interface(index).await {
            Ok(Some(i)) => i,
            Ok(None) => return,
            Err(e) => return warn!(ifindex = index, error = %e, "cannot look for stale attachments"),
        };
        let ours = self.ours.ids();
        let pinned = pinned_link_ids(&self.root);
        let mut found = recognizer.attachments_on(&iface);
        if hooks.iter().any(|h| matches!(h, Hook::ClsactIngress | Hook::ClsactEgress)) {
            // clsact filters of ours that this agent did not load: a previous agent's (each
            // restart on a kernel without tcx adds a filter in front of the old one).
            match recognizer.clsact_on(&iface).await {
                Ok(f) => found.extend(f),
                Err(e) => warn!(iface = %iface.name, error = %e, "cannot list clsact filters"),
            }
        }
        for a in found {
            if ours.contains(&a.prog_id) || !hooks.contains(&a.hook) || a.link_id.is_some_and(|l| pinned.contains(&l)) {
                continue;
            }
            match ownership::detach(&a).await {
                Ok(()) => warn!(
                    iface = %a.iface,
                    hook = %a.hook,
                    program = %a.program,
                    prog_id = a.prog_id,
                    link_id = ?a.link_id,
                    "detached a stale attachment of ours (another agent's, or one whose pins were removed)"
                ),
                Err(e) => error!(iface = %a.iface, error = %e, "cannot detach a stale attachment of ours"),
            }
        }
    }

    /// Every stale attachment of ours in the namespace, on interfaces we attach to or not.
    async fn detach_all_foreign(&self, recognizer: &mut Recognizer) {
        if !ownership::can_inspect(self.ours.from_pod) {
            warn!(
                "cannot inspect attached programs (the kernel wants CAP_SYS_ADMIN for that): programs of other agents \
                 (another --bpffs-root) stay attached, behind ours on tcx; remove them with `ebpf-proxy cleanup`"
            );
            return;
        }
        let all = match ownership::interfaces().await {
            Ok(i) => i,
            Err(e) => return warn!(error = %e, "cannot look for stale attachments"),
        };
        for iface in all {
            self.detach_foreign(recognizer, iface.index, &ALL_HOOKS).await;
        }
    }

    /// Verify pins and attachments; restore what is missing. The datapath is reported broken
    /// from the check that finds damage until a later check finds everything in place.
    async fn check(&mut self, attached: &HashMap<u32, Attached>) {
        let mut problems = self.guard.check_pins();
        let sock_missing = self.sock.as_ref().is_some_and(|(cg, _)| !sock::attached_on(&self.root, cg));
        if sock_missing {
            problems.push("socket-level cgroup link pins missing".to_string());
        }
        let ifaces: HashMap<u32, ownership::Iface> = match ownership::interfaces().await {
            Ok(all) => all.into_iter().map(|i| (i.index, i)).collect(),
            Err(e) => return warn!(error = %e, "datapath check: cannot list interfaces"),
        };
        let mut broken = Vec::new();
        for (index, Attached { name, checked }) in attached {
            if !checked {
                continue;
            }
            // Gone interfaces are the watcher's business (a Gone event follows).
            let Some(iface) = ifaces.get(index).filter(|i| &i.name == name) else { continue };
            if let Err(p) = self.ours.check_iface(iface, self.plan.uplinks.contains(name)) {
                problems.push(p);
                broken.push((*index, name.clone()));
            }
        }
        if problems.is_empty() {
            if self.health.set_datapath_broken(false) {
                info!(bpffs_root = %self.guard.root().display(), "datapath check: pins and attachments in place again");
            }
            return;
        }
        self.health.set_datapath_broken(true);
        self.metrics.datapath_repairs.inc();
        for p in &problems {
            warn!(problem = %p, "datapath check: damage found; restoring");
        }
        let (done, failed) = self.guard.restore_pins();
        for d in done {
            info!(action = %d, "datapath restore");
        }
        for f in failed {
            error!(error = %f, "datapath restore failed");
        }
        if let Some((cgroup, settings)) = self.sock.clone().filter(|_| sock_missing) {
            match sock::attach(&mut self.programs, &self.root, &cgroup, settings) {
                Ok(a) => info!(
                    created = a.created,
                    replaced = a.replaced,
                    "datapath restore: socket-level programs re-attached"
                ),
                Err(e) => error!(error = %e, "datapath restore: cannot re-attach the socket-level programs"),
            }
        }
        for (index, name) in broken {
            if self.attach(index, &name).is_some() {
                info!(iface = %name, ifindex = index, "datapath restore: re-attached");
            }
        }
    }

    pub async fn run(mut self, mut links: UnboundedReceiver<LinkEvent>) {
        let mut attached: HashMap<u32, Attached> = HashMap::new();
        let mut recognizer = Recognizer::default();
        let mut tick = tokio::time::interval(self.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The checks (and the root's lock, which the guard holds) must outlive the interface
        // watcher: if it stops, attachments are no longer added, but kept.
        let mut watching = true;
        loop {
            let ev = tokio::select! {
                ev = links.recv(), if watching => match ev {
                    Some(ev) => ev,
                    None => {
                        error!("interface watcher gone: new interfaces will not be attached until a restart");
                        watching = false;
                        continue;
                    }
                },
                _ = tick.tick() => {
                    // Only once the start-up attachments are made: before, nothing to check.
                    if *self.attached_initial.borrow() {
                        self.check(&attached).await;
                    }
                    continue;
                }
            };
            // A detected uplink joins the plan, then attaches like any present interface.
            if let LinkEvent::Uplink { name, .. } = &ev {
                self.plan.uplinks.insert(name.clone());
            }
            match ev {
                LinkEvent::Present { index, name } | LinkEvent::Uplink { index, name } => {
                    if attached.get(&index).is_some_and(|a| a.name == name) {
                        continue;
                    }
                    let uplink = self.plan.uplinks.contains(&name);
                    if uplink {
                        // One XDP program per device: a stale one must go before ours can
                        // attach (a short gap, logged).
                        self.detach_foreign(&mut recognizer, index, &[Hook::Xdp]).await;
                    }
                    if let Some(checked) = self.attach(index, &name) {
                        if !checked {
                            warn!(iface = %name, "attached as a clsact filter (no tcx): the datapath check does not cover it");
                        }
                        attached.insert(index, Attached { name, checked });
                        // tcx runs several programs: ours is attached, now the stale one
                        // goes, with no instant without a program.
                        self.detach_foreign(&mut recognizer, index, &TC_HOOKS).await;
                    }
                }
                LinkEvent::Gone { index, name } => {
                    attached.remove(&index);
                    let _ = remove_stale_pins(&self.root, |_, idx| idx != index);
                    let kind = if self.plan.uplinks.contains(&name) { "uplink" } else { "pod interface" };
                    info!(iface = %name, ifindex = index, kind, "interface gone");
                }
                LinkEvent::InitialDumpDone => {
                    // Interfaces we no longer match may still run an old agent's programs.
                    self.detach_all_foreign(&mut recognizer).await;
                    self.attached_initial.send_replace(true);
                }
            }
            self.metrics.attached_interfaces.set(attached.len() as i64);
        }
    }
}
