//! The reconciler: feed object changes into the translation as they arrive (`update`),
//! apply what they changed to the maps (`sync`), and compare the pinned maps with the
//! desired state (`verify`); its event loop (`run`) decides when.
//!
//! A sync re-translates only the Services the changes touched and writes only the frontends
//! whose desired entry changed (`Translator::commit`, `Syncer::apply_changes`). The first
//! sync, and the first after a relist, look at every frontend (`Syncer::apply`): what the
//! pinned maps hold from before may include Services deleted while the agent was away.
use std::{
    collections::HashSet,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc::UnboundedReceiver, oneshot, watch};
use tracing::{error, info, warn};

use super::{
    config::AgentConfig,
    log_once::LogOnce,
    node::ThisNode,
    startup::Startup,
    store::AgentStore,
    sync_metrics::{PassSummary, SyncMetrics},
};
use crate::{
    health::Health,
    healthcheck::HealthServers,
    model::{IpPrefix, NodeInfo, Translator},
    source::{self, Delta, Resource, Snapshots, Source, SourceEvent, Update},
    sync::{SyncReport, Syncer},
};

pub(super) struct SyncLoop {
    syncer: Syncer<AgentStore>,
    /// Every object's parsed form and the desired state, kept up to date by `update`.
    translator: Translator,
    source: Source,
    /// The files source's previous snapshot, to turn the next one into changes.
    snapshots: Snapshots,
    /// The next sync looks at every frontend (start-up, relist).
    full_sync: bool,
    node: ThisNode,
    /// The health-check node ports of `externalTrafficPolicy: Local` Services.
    health: HealthServers,
    metrics: SyncMetrics,
    /// Malformed objects, frontends not programmed and drift: logged when they appear.
    logged: Logged,
    /// Whether a sync has run (verify compares against its desired state).
    synced_once: bool,
    /// Where `verify` opens the pinned maps.
    bpffs_root: PathBuf,
    /// `--service-cidr`: in force for the files source, and for an API without ServiceCIDRs.
    service_cidr_flag: Vec<IpPrefix>,
    /// The start-up's phases, reported after the first sync.
    startup: Option<Startup>,
}

/// What was logged as lasting, so it is not logged again on every sync while it lasts.
#[derive(Default)]
struct Logged {
    /// Malformed objects skipped by the translation.
    warnings: LogOnce,
    /// Frontends not programmed, with why.
    errors: LogOnce,
    /// Where the maps differ from the API (`verify`).
    drift: LogOnce,
}

impl SyncLoop {
    /// Before the first sync, which looks at every frontend.
    pub(super) fn new(
        syncer: Syncer<AgentStore>,
        source: Source,
        node: ThisNode,
        metrics: SyncMetrics,
        health: &Health,
        config: &AgentConfig,
        startup: Startup,
    ) -> Self {
        let mut translator = Translator::new(NodeInfo { name: node.name.clone(), ..NodeInfo::default() });
        // The files source has no API to lack ServiceCIDRs: the flag always counts, beside
        // the ServiceCIDR objects its files may hold.
        if matches!(source, Source::Files(_)) {
            translator.set_service_cidr_fallback(config.service_cidrs.iter().copied());
        }
        SyncLoop {
            syncer,
            translator,
            source,
            snapshots: Snapshots::default(),
            full_sync: true,
            node,
            health: HealthServers::new(health.synced.clone()),
            metrics,
            logged: Logged::default(),
            synced_once: false,
            bpffs_root: config.bpffs_root().to_path_buf(),
            service_cidr_flag: config.service_cidrs.clone(),
            startup: Some(startup),
        }
    }

    /// One change from the API source: parsed into the translation now, applied at the
    /// next `sync`.
    pub(super) fn update(&mut self, u: Update) {
        self.metrics.changed(&u);
        let t = &mut self.translator;
        match u {
            Update::Services(Delta::Apply(s)) => t.upsert_service(&s),
            Update::Services(Delta::Delete((ns, name))) => t.delete_service(&ns, &name),
            Update::Services(Delta::Relisted(seen)) => {
                t.retain_services(&seen);
                self.full_sync = true;
            }
            Update::Slices(Delta::Apply(s)) => t.upsert_slice(&s),
            Update::Slices(Delta::Delete((ns, name))) => t.delete_slice(&ns, &name),
            Update::Slices(Delta::Relisted(seen)) => {
                t.retain_slices(&seen);
                self.full_sync = true;
            }
            Update::Nodes(Delta::Apply(n)) => self.node.object = Some(n),
            Update::Nodes(Delta::Delete(_)) => self.node.object = None,
            Update::Nodes(Delta::Relisted(seen)) => {
                if seen.is_empty() {
                    self.node.object = None;
                }
            }
            Update::ServiceCidrs(Delta::Apply(c)) => t.upsert_service_cidr(&c),
            Update::ServiceCidrs(Delta::Delete((_, name))) => t.delete_service_cidr(&name),
            Update::ServiceCidrs(Delta::Relisted(seen)) => t.retain_service_cidrs(&seen),
            Update::NoServiceCidrApi => t.set_service_cidr_fallback(self.service_cidr_flag.iter().copied()),
        }
    }

    /// Apply what changed since the last sync: the objects' changes (`read_objects`) and
    /// this node's state into the translation, then the translation and the node's facts
    /// into the maps; then what that did into the metrics and the log.
    pub(super) fn sync(&mut self, burst_start: Option<Instant>) {
        let t = Instant::now();
        if !self.read_objects() {
            return;
        }
        self.node.follow(&mut self.translator);
        // The addresses programmed now stay with their Services on a conflict.
        let changed = self.translator.commit(&self.syncer);
        let translated = t.elapsed();
        let object_warnings = self.log_warnings();

        let desired = self.translator.desired();
        self.health.update(&desired.health_checks);
        // Written before any frontend: a flow to a new remote backend needs the SNAT address.
        self.syncer.set_node_facts(self.node.facts());
        let full = std::mem::take(&mut self.full_sync);
        let report = if full { self.syncer.apply(desired) } else { self.syncer.apply_changes(desired, &changed) };
        self.synced_once = true;
        if let Some(startup) = self.startup.take() {
            let phases = startup.finish(t, translated, t.elapsed().saturating_sub(translated));
            self.metrics.started(&phases);
        }
        // Destroying the sockets of removed backends follows the map writes and has a
        // histogram of its own: not the sync's time.
        let sockets = report.udp_sockets.map_or(Duration::ZERO, |s| s.elapsed);
        let duration = t.elapsed().saturating_sub(sockets);
        let event_to_map = burst_start.map(|start| start.elapsed().saturating_sub(sockets));
        let trigger_times = self.trigger_times();
        self.metrics.record(&PassSummary { duration, event_to_map, object_warnings, trigger_times, report: &report });
        self.log_errors(&report);
        info!(
            services = report.services,
            backends = report.backends,
            changed = changed.len(),
            full,
            translate_ms = translated.as_secs_f64() * 1e3,
            writes = report.writes,
            conntrack_purged = report.conntrack_purged,
            errors = report.errors.len(),
            duration_ms = duration.as_secs_f64() * 1e3,
            "synced"
        );
    }
}

impl SyncLoop {
    /// A files source's changes since the last sync, into the translation (an API source
    /// delivers its changes through `update` as they come). False: the objects cannot be
    /// read, and the maps stay as they are.
    fn read_objects(&mut self) -> bool {
        match self.source.snapshot() {
            None => true,
            Some(Ok(objects)) => {
                self.translator.clear_unnamed();
                for u in self.snapshots.diff(objects) {
                    self.update(u);
                }
                true
            }
            Some(Err(e)) => {
                // Keep every frontend as it is: nothing here says the objects are gone.
                error!(error = %e, "cannot read the objects; the maps are left as they are");
                false
            }
        }
    }

    /// A map that stays full fails the same frontends on every sync: each is logged when it
    /// starts to fail, and the end once.
    fn log_errors(&mut self, report: &SyncReport) {
        let errors = report.errors.iter().map(|(fk, e)| (format!("{fk}: {e}"), (fk, e)));
        let cleared =
            self.logged.errors.round(errors, |(fk, e)| match report.unserved_ranges.iter().find(|(k, _)| k == fk) {
                Some((_, service)) => warn!(
                    service = %service,
                    frontend = %fk,
                    error = %e,
                    "loadBalancerSourceRanges do not fit: frontend not served (fail closed) until they do"
                ),
                None => error!(frontend = %fk, error = %e, "frontend not programmed"),
            });
        if cleared {
            info!("every frontend programmed again");
        }
    }

    /// The translation's malformed objects, each logged when it appears; how many there are.
    fn log_warnings(&mut self) -> usize {
        let warnings = self.translator.warnings();
        self.logged.warnings.round(warnings.iter().map(|w| (w.to_string(), w)), |w| {
            warn!(kind = w.kind, object = %w.object, "skipped: {}", w.message);
        });
        self.logged.warnings.len()
    }

    /// The trigger times of the slice changes this sync applies (kube-proxy's network
    /// programming latency), each malformed one logged.
    fn trigger_times(&mut self) -> Vec<std::time::SystemTime> {
        let triggers = self.translator.take_trigger_times();
        for (slice, value) in &triggers.malformed {
            warn!(
                endpointslice = %slice,
                value = %value,
                "endpoints.kubernetes.io/last-change-trigger-time is not an RFC 3339 time: change not timed"
            );
        }
        triggers.times
    }

    /// Re-read the maps from their pins (not the syncer's own record of what it wrote) and
    /// compare them with the last desired state, as `ebpf-proxy verify` does: whatever
    /// changed them behind our back shows up here.
    pub(super) fn verify(&mut self) {
        if !self.synced_once {
            return;
        }
        let desired = self.translator.desired();
        let snap = match crate::dataplane::maps::Maps::open_pinned(&self.bpffs_root).and_then(|m| m.read_snapshot()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "verify: cannot read the pinned maps");
                return;
            }
        };
        let drift = crate::sync::verify::verify(desired, &snap);
        self.metrics.verified(drift.len());
        let cleared = self.logged.drift.round(drift.iter().map(|d| (d.to_string(), d)), |d| {
            warn!(drift = %d, "the maps differ from what the API says");
        });
        if cleared {
            info!("the maps agree with the API again");
        }
    }
}

/// What the event loop waits on.
pub(super) struct Events {
    pub(super) source: UnboundedReceiver<SourceEvent>,
    /// The node's local addresses, as they change.
    pub(super) local_addrs: watch::Receiver<Vec<IpAddr>>,
    pub(super) shutdown: oneshot::Receiver<&'static str>,
}

/// How long the first sync waits for the interfaces present at start to be attached (see
/// `attached_before_adoption`).
const ADOPTION_ATTACH_WAIT: Duration = Duration::from_secs(10);

impl SyncLoop {
    /// Sync on every burst of changes once every resource has been listed, verify now and
    /// then, until SIGTERM or the source ends. The first sync waits for the interfaces
    /// present at start to be attached; ready once both are done.
    pub(super) async fn run(
        mut self,
        mut events: Events,
        health: Arc<Health>,
        attached_initial: watch::Receiver<bool>,
        config: &AgentConfig,
    ) {
        // Periodic verify (the select branch below is disabled when the interval is 0).
        // Any period will do when it is off: the branch is never polled.
        let verify_every = config.verify_interval.unwrap_or(Duration::from_secs(1));
        let mut verify_tick = tokio::time::interval_at(tokio::time::Instant::now() + verify_every, verify_every);
        let delay = config.sync_delay;
        let mut synced: HashSet<Resource> = HashSet::new();
        let mut burst: Option<Instant> = None;
        // Whether the burst holds an event worth coalescing (an API update, an address).
        // The files source's `Changed` is coalesced already (its quiet period for writes
        // in place, none for a rename into place), so it syncs at once.
        let mut coalesce = false;
        let (first_sync, first_sync_rx) = watch::channel(false);
        // The first sync adopts kube-proxy's flows (`takeover`): from then on they are ours
        // only, so our programs must be on the interfaces first.
        let mut attached_before_adoption = Some(attached_initial.clone());
        tokio::spawn(readiness(first_sync_rx, attached_initial, health.synced.clone()));
        loop {
            tokio::select! {
                ev = events.source.recv() => match ev {
                    Some(ev) => {
                        coalesce |= matches!(ev, SourceEvent::Update(_));
                        self.receive(ev, &mut synced);
                        burst.get_or_insert_with(Instant::now);
                    }
                    None => break,
                },
                // A local address came or went: NodePort frontends follow at the next sync.
                Ok(()) = events.local_addrs.changed() => {
                    self.node.local_addrs = events.local_addrs.borrow_and_update().clone();
                    coalesce = true;
                    burst.get_or_insert_with(Instant::now);
                }
                _ = &mut events.shutdown => break,
                // 0 turns the periodic verify off: the branch is never polled.
                _ = verify_tick.tick(), if config.verify_interval.is_some() => {
                    self.verify();
                    continue;
                }
            }
            // Reconcile only against a complete picture: every resource fully listed.
            if !source::REQUIRED.iter().all(|r| synced.contains(r)) || burst.is_none() {
                continue;
            }
            // From here a sync is owed (/healthz fails if none completes in time); the
            // initial listing, however slow, is not a stall. A sync blocked for good cannot
            // delay SIGTERM: the control thread exits the process after its grace period.
            health.change_pending();
            // Coalesce the rest of the burst.
            // A zero delay does not sleep at all: tokio's timer rounds every sleep up to its
            // next millisecond tick, which would be most of an incremental sync's latency.
            if !delay.is_zero() && std::mem::take(&mut coalesce) {
                tokio::time::sleep(delay).await;
            }
            while let Ok(ev) = events.source.try_recv() {
                self.receive(ev, &mut synced);
            }
            if let Some(attached) = attached_before_adoption.take() {
                wait_attached(attached).await;
            }
            let full = self.full_sync;
            self.sync(burst.take());
            health.synced_now();
            first_sync.send_replace(true);
            if full {
                // A full sync (start-up, relist) frees the transient memory of a whole list.
                release_free_memory();
            }
        }
    }

    /// One event of the source: a resource fully listed (into `synced`), or a change.
    fn receive(&mut self, ev: SourceEvent, synced: &mut HashSet<Resource>) {
        match ev {
            SourceEvent::Synced(r) => {
                synced.insert(r);
            }
            SourceEvent::Changed => self.metrics.queued(),
            SourceEvent::Update(u) => {
                self.update(u);
                self.metrics.queued();
            }
        }
    }
}

/// Wait (a bounded time) for the interfaces present at start to be attached.
async fn wait_attached(mut attached: watch::Receiver<bool>) {
    let waited = Instant::now();
    match tokio::time::timeout(ADOPTION_ATTACH_WAIT, attached.wait_for(|done| *done)).await {
        Ok(Ok(_)) => {}
        _ => warn!(
            waited = ?waited.elapsed(),
            "interfaces not all attached yet: adopting kube-proxy's flows anyway"
        ),
    }
}

/// Ready = the first full sync done and every interface present at start-up attached,
/// in whichever order they happen.
async fn readiness(
    mut first_sync: watch::Receiver<bool>,
    mut attached_initial: watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
) {
    // A sender dropped before its signal: the agent is stopping or the attacher is gone;
    // never ready.
    if first_sync.wait_for(|done| *done).await.is_err() || attached_initial.wait_for(|done| *done).await.is_err() {
        return;
    }
    if !ready.swap(true, Ordering::Relaxed) {
        info!("first full sync done and pod interfaces attached; ready");
    }
}

/// Give the pages freed after a full sync (the parsed list, its buffers) back to the
/// kernel; glibc otherwise keeps them resident for reuse.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
