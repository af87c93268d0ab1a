//! The agent's start-up timed by phase, so that a slow start says where its time went:
//! `ebpf_proxy_startup_seconds{phase}` and one log line after the first sync.
//!
//! Phases, in order of wall time: `prepare` (kernel probe, pin lock, HTTP server), `load`
//! (programs verified, maps pinned or migrated; the object source starts first and its
//! lists are decoded and parsed into the translation meanwhile, `Intake::until`), `setup`
//! (socket hooks, attacher, maps read back), `objects` (until the first sync begins: what
//! is left of the initial lists, or of reading the manifests), `translate` and `apply` (the
//! first sync's translation and map writes); `total` is the whole, start to the first
//! sync's end.
use std::time::{Duration, Instant};

pub(super) struct Startup {
    started: Instant,
    /// When the last phase ended.
    last: Instant,
    phases: Vec<(&'static str, Duration)>,
}

impl Startup {
    pub(super) fn begin() -> Self {
        let now = Instant::now();
        Startup { started: now, last: now, phases: Vec::new() }
    }

    /// `phase` ended now.
    pub(super) fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.phases.push((phase, now.duration_since(self.last)));
        self.last = now;
    }

    /// The first sync began at `sync_start` and took `translate` then `apply`: every phase,
    /// and the total.
    pub(super) fn finish(
        mut self,
        sync_start: Instant,
        translate: Duration,
        apply: Duration,
    ) -> Vec<(&'static str, Duration)> {
        self.phases.push(("objects", sync_start.saturating_duration_since(self.last)));
        self.phases.push(("translate", translate));
        self.phases.push(("apply", apply));
        self.phases.push(("total", self.started.elapsed()));
        self.phases
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The phases come out in order, each the time since the previous one ended; the
    /// first sync's parts as measured; the total covers them all.
    #[test]
    fn phases_follow_each_other_and_add_up() {
        let mut s = Startup::begin();
        std::thread::sleep(Duration::from_millis(2));
        s.mark("prepare");
        s.mark("load");
        std::thread::sleep(Duration::from_millis(2));
        let sync_start = Instant::now();
        let phases = s.finish(sync_start, Duration::from_millis(3), Duration::from_millis(4));
        let names: Vec<&str> = phases.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["prepare", "load", "objects", "translate", "apply", "total"]);
        let get = |n: &str| phases.iter().find(|(p, _)| *p == n).unwrap().1;
        assert!(get("prepare") >= Duration::from_millis(2) && get("load") < Duration::from_millis(2));
        assert!(get("objects") >= Duration::from_millis(2));
        assert_eq!((get("translate"), get("apply")), (Duration::from_millis(3), Duration::from_millis(4)));
        assert!(get("total") >= get("prepare") + get("objects"));
    }
}
