//! What /healthz and /readyz answer, like kube-proxy's healthz: the agent is live while its
//! sync loop keeps up (no change pending for longer than `--healthz-timeout-secs` without a
//! completed sync) and its datapath is in place (pins present, programs attached); it is
//! ready once the first full sync is done and pod interfaces are attached, and while live.
//!
//! Atomics, and one mutex held only to swap a `&'static str` (the node's eligibility): the
//! HTTP server reads them without ever waiting on the sync loop or the attacher, whatever
//! those are blocked on.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    timeout: Duration,
    /// First full sync done and every pod interface present at start-up attached.
    pub synced: Arc<AtomicBool>,
    /// The datapath check found pins missing or programs detached, and has not yet verified
    /// the restoration.
    datapath_broken: AtomicBool,
    /// Milliseconds since `epoch` + 1 of the oldest change not yet synced; 0 = none.
    pending_since: AtomicU64,
    /// Why load balancers should stop sending here (the Node is being deleted), if so:
    /// /healthz fails then, /livez does not (`model::node::node_eligible`).
    not_eligible: std::sync::Mutex<Option<&'static str>>,
}

impl Health {
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Health {
            epoch: Instant::now(),
            timeout,
            synced: Arc::new(AtomicBool::new(false)),
            datapath_broken: AtomicBool::new(false),
            pending_since: AtomicU64::new(0),
            not_eligible: std::sync::Mutex::new(None),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// A change arrived (keeps the oldest).
    pub fn change_pending(&self) {
        let _ = self.pending_since.compare_exchange(0, self.now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A sync completed: nothing pending.
    pub fn synced_now(&self) {
        self.pending_since.store(0, Ordering::Relaxed);
    }

    pub fn set_datapath_broken(&self, broken: bool) -> bool {
        self.datapath_broken.swap(broken, Ordering::Relaxed)
    }

    /// Record whether the node should receive load-balanced traffic; returns whether that
    /// changed.
    pub fn set_node_eligible(&self, eligible: Result<(), &'static str>) -> bool {
        let mut cur = self.not_eligible.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let new = eligible.err();
        std::mem::replace(&mut *cur, new) != new
    }

    /// kube-proxy's /healthz: live, and the node not on its way out (cloud load balancers
    /// probe it to choose nodes for externalTrafficPolicy=Cluster Services).
    pub fn healthz(&self) -> Result<(), String> {
        self.live()?;
        match *self.not_eligible.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(why) => Err(format!("node not eligible for load-balanced traffic: {why}")),
            None => Ok(()),
        }
    }

    /// Ok, or why the agent is not live (/livez, and part of /healthz).
    pub fn live(&self) -> Result<(), String> {
        if self.datapath_broken.load(Ordering::Relaxed) {
            return Err("datapath damaged (pins missing or programs detached): restoring".into());
        }
        let since = self.pending_since.load(Ordering::Relaxed);
        if since != 0 {
            let waited = Duration::from_millis(self.now_ms().saturating_sub(since));
            if waited > self.timeout {
                return Err(format!(
                    "sync loop stuck: a change has waited {:.0?} (timeout {:?})",
                    waited, self.timeout
                ));
            }
        }
        Ok(())
    }

    /// Ok, or why the agent is not ready.
    pub fn ready(&self) -> Result<(), String> {
        if !self.synced.load(Ordering::Relaxed) {
            return Err("waiting for the first full sync".into());
        }
        self.live()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuck_sync_and_broken_datapath_fail_both_checks() {
        let h = Health::new(Duration::from_millis(50));
        assert!(h.live().is_ok());
        assert!(h.ready().unwrap_err().contains("first full sync"));
        h.synced.store(true, Ordering::Relaxed);
        assert!(h.ready().is_ok());

        h.change_pending();
        assert!(h.live().is_ok(), "a fresh change is not a stuck loop");
        std::thread::sleep(Duration::from_millis(80));
        assert!(h.live().unwrap_err().contains("stuck"));
        assert!(h.ready().is_err());
        h.synced_now();
        assert!(h.live().is_ok() && h.ready().is_ok());

        assert!(!h.set_datapath_broken(true));
        assert!(h.live().unwrap_err().contains("datapath"));
        assert!(h.ready().is_err());
        assert!(h.set_datapath_broken(false));
        assert!(h.ready().is_ok());
    }

    #[test]
    fn a_node_on_its_way_out_fails_healthz_only() {
        let h = Health::new(Duration::from_secs(1));
        h.synced.store(true, Ordering::Relaxed);
        assert!(h.healthz().is_ok());
        assert!(h.set_node_eligible(Err("the Node is being deleted")));
        assert!(!h.set_node_eligible(Err("the Node is being deleted")), "no change");
        assert!(h.healthz().unwrap_err().contains("being deleted"));
        assert!(h.live().is_ok() && h.ready().is_ok(), "livez and readyz do not follow the Node");
        assert!(h.set_node_eligible(Ok(())));
        assert!(h.healthz().is_ok());
    }
}
