//! The reconciler: object changes go into the translation as they arrive (`Intake`, see
//! `intake.rs`); apply what they changed to the maps (`sync`), and compare the pinned maps with the
//! desired state (`verify`); its event loop (`run`) decides when.
//!
//! A sync re-translates only the Services the changes touched and writes only the frontends
//! whose desired entry changed (`Translator::commit`, `Syncer::apply_changes`). The first
//! sync, and the first after a relist, look at every frontend (`Syncer::apply`): what the
//! pinned maps hold from before may include Services deleted while the agent was away.
use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc::Receiver, oneshot, watch};
use tracing::{error, info, warn};

use super::{
    config::AgentConfig, intake::Intake, log_once::LogOnce, startup::Startup, store::AgentStore,
    sync_metrics::PassSummary,
};
use crate::{
    health::Health,
    healthcheck::HealthServers,
    source::SourceEvent,
    sync::{SyncReport, Syncer},
};

pub(super) struct SyncLoop {
    syncer: Syncer<AgentStore>,
    /// The objects and this node, as the source has told them so far.
    intake: Intake,
    /// The health-check node ports of `externalTrafficPolicy: Local` Services.
    health: HealthServers,
    /// Malformed objects, frontends not programmed and drift: logged when they appear.
    logged: Logged,
    /// Whether a sync has run (verify compares against its desired state).
    synced_once: bool,
    /// Where `verify` opens the pinned maps.
    bpffs_root: PathBuf,
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
    /// Before the first sync, which looks at every frontend; `intake` holds what the
    /// source said while the programs loaded.
    pub(super) fn new(
        syncer: Syncer<AgentStore>,
        intake: Intake,
        health: &Health,
        config: &AgentConfig,
        startup: Startup,
    ) -> Self {
        SyncLoop {
            syncer,
            intake,
            health: HealthServers::new(health.synced.clone()),
            logged: Logged::default(),
            synced_once: false,
            bpffs_root: config.bpffs_root().to_path_buf(),
            startup: Some(startup),
        }
    }

    /// Apply what changed since the last sync: this node's state into the translation
    /// (which holds the objects' changes already, `Intake`), then the translation and the
    /// node's facts into the maps; then what that did into the metrics and the log.
    pub(super) fn sync(&mut self, burst_start: Option<Instant>) {
        let t = Instant::now();
        let intake = &mut self.intake;
        intake.node.follow(&mut intake.translator);
        // The addresses programmed now stay with their Services on a conflict.
        let changed = intake.translator.commit(&self.syncer);
        let translated = t.elapsed();
        let object_warnings = self.log_warnings();

        let desired = self.intake.translator.desired();
        self.health.update(&desired.health_checks);
        // Written before any frontend: a flow to a new remote backend needs the SNAT address.
        self.syncer.set_node_facts(self.intake.node.facts());
        let full = std::mem::take(&mut self.intake.full_sync);
        let report = if full { self.syncer.apply(desired) } else { self.syncer.apply_changes(desired, &changed) };
        self.synced_once = true;
        // Every frontend now has its filter bit (the takeover's adopted flows' included:
        // this pass wrote their frontends).
        self.syncer.store_mut().filter_in_force();
        if let Some(startup) = self.startup.take() {
            let phases = startup.finish(t, translated, t.elapsed().saturating_sub(translated));
            self.intake.metrics.started(&phases);
        }
        // Destroying the sockets of removed backends follows the map writes and has a
        // histogram of its own: not the sync's time.
        let sockets = report.udp_sockets.map_or(Duration::ZERO, |s| s.elapsed);
        let duration = t.elapsed().saturating_sub(sockets);
        let event_to_map = burst_start.map(|start| start.elapsed().saturating_sub(sockets));
        let trigger_times = self.trigger_times();
        self.intake.metrics.record(&PassSummary {
            duration,
            event_to_map,
            object_warnings,
            trigger_times,
            report: &report,
        });
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
        let warnings = self.intake.translator.warnings();
        self.logged.warnings.round(warnings.iter().map(|w| (w.to_string(), w)), |w| {
            warn!(kind = w.kind, object = %w.object, "skipped: {}", w.message);
        });
        self.logged.warnings.len()
    }

    /// The trigger times of the slice changes this sync applies (kube-proxy's network
    /// programming latency), each malformed one logged.
    fn trigger_times(&mut self) -> Vec<std::time::SystemTime> {
        let triggers = self.intake.translator.take_trigger_times();
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
        let desired = self.intake.translator.desired();
        let snap = match crate::dataplane::maps::Maps::open_pinned(&self.bpffs_root).and_then(|m| m.read_snapshot()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "verify: cannot read the pinned maps");
                return;
            }
        };
        let drift = crate::sync::verify::verify(desired, &snap);
        self.intake.metrics.verified(drift.len());
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
    pub(super) source: Receiver<SourceEvent>,
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
        let (first_sync, first_sync_rx) = watch::channel(false);
        // The first sync adopts kube-proxy's flows (`takeover`): from then on they are ours
        // only, so our programs must be on the interfaces first.
        let mut attached_before_adoption = Some(attached_initial.clone());
        tokio::spawn(readiness(first_sync_rx, attached_initial, health.synced.clone()));
        // What came while the programs loaded is looked at before waiting for more.
        let mut wait = false;
        loop {
            if std::mem::replace(&mut wait, true) {
                tokio::select! {
                    ev = events.source.recv() => match ev {
                        Some(ev) => self.intake.receive(ev),
                        None => break,
                    },
                    // A local address came or went: NodePort frontends follow at the next sync.
                    Ok(()) = events.local_addrs.changed() => {
                        self.intake.node.local_addrs = events.local_addrs.borrow_and_update().clone();
                        self.intake.coalesce = true;
                        self.intake.burst.get_or_insert_with(Instant::now);
                    }
                    _ = &mut events.shutdown => break,
                    // 0 turns the periodic verify off: the branch is never polled.
                    _ = verify_tick.tick(), if config.verify_interval.is_some() => {
                        self.verify();
                        continue;
                    }
                }
            }
            // Reconcile only against a complete picture: every resource fully listed.
            if !self.intake.listed() || self.intake.burst.is_none() {
                continue;
            }
            // From here a sync is owed (/healthz fails if none completes in time); the
            // initial listing, however slow, is not a stall. A sync blocked for good cannot
            // delay SIGTERM: the control thread exits the process after its grace period.
            health.change_pending();
            // Coalesce the rest of the burst.
            // A zero delay does not sleep at all: tokio's timer rounds every sleep up to its
            // next millisecond tick, which would be most of an incremental sync's latency.
            if !delay.is_zero() && std::mem::take(&mut self.intake.coalesce) {
                tokio::time::sleep(delay).await;
            }
            while let Ok(ev) = events.source.try_recv() {
                self.intake.receive(ev);
            }
            if let Some(attached) = attached_before_adoption.take() {
                wait_attached(attached).await;
            }
            let full = self.intake.full_sync;
            if full {
                // What parsing the lists freed (kept by the parsing threads' malloc arena,
                // which the sync on this thread does not reuse) goes before the sync
                // allocates: at start-up it was the peak's margin over what stays.
                release_free_memory();
            }
            let burst = self.intake.burst.take();
            self.intake.coalesce = false;
            self.sync(burst);
            health.synced_now();
            first_sync.send_replace(true);
            if full {
                // A full sync (start-up, relist) frees the transient memory of a whole list.
                release_free_memory();
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
