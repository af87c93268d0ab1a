//! The real agent (`ebpf-proxy agent --kubeconfig`, `--sync-delay-ms 0`) watching the fake
//! Kubernetes API server at scale: start to /readyz and memory at N Services x E endpoints,
//! the latency of one EndpointSlice change (timed from the call that stores it in the fake
//! server, which queues the watch event under the same lock, to the moment the new backend
//! set is read back from the pinned maps by this process), sustained churn, and start-up at
//! 10x N. The agent and the fake server live in a namespace of their own with their own
//! bpffs pin directory; all of it is removed on the way out, failure or not.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use proxy_tests::{
    agent::{Agent, TempDir, http_get},
    fake_apiserver::{FakeApiServer, ResourceKind, bind_in_netns, write_kubeconfig},
    harness::PinDir,
    netns::Netns,
    scale::{self, PinnedServices},
};

use crate::{Plan, check_interrupted, percentile, report::Row, vm_hwm_rss_kib};

const SECTION: &str = "scale";
/// The agent's start-up phases (`ebpf_proxy_startup_seconds{phase}`), in order.
const STARTUP_PHASES: [&str; 7] = ["prepare", "load", "setup", "objects", "translate", "apply", "total"];
/// How long one change may take to show before the run fails.
const CHANGE_BOUND: Duration = Duration::from_secs(10);

pub fn expected_rows(plan: &Plan) -> Vec<String> {
    let id = |case: &str, n| crate::report::row_id(SECTION, case, Some(n));
    let mut v = Vec::new();
    for n in [plan.scale_n, plan.scale_big_n] {
        for c in ["ready_s", "vmhwm_mib", "vmrss_mib", "cpu_s"] {
            v.push(id(c, n));
        }
        for phase in STARTUP_PHASES {
            v.push(id(&format!("startup.{phase}_ms"), n));
        }
    }
    for c in [
        "change.p50_ms",
        "change.p99_ms",
        "change.agent_mean_ms",
        "change.agent_sync_mean_ms",
        "change.agent_p99_bucket_ms",
        "churn.lag_p50_ms",
        "churn.lag_p99_ms",
        "churn.agent_cpu_cores",
        "churn.rate",
    ] {
        v.push(id(c, plan.scale_n));
    }
    v
}

/// The agent, the fake API server it watches and its namespace; field order is drop order
/// (the agent is killed before its server and namespace go).
struct Setup {
    agent: Agent,
    maps: PinnedServices,
    api: FakeApiServer,
    _kubeconfig: TempDir,
    _pins: PinDir,
    node: Netns,
    /// Agent start to /readyz 200.
    ready: Duration,
    /// Storing the objects in the fake server.
    load: Duration,
}

impl Setup {
    fn start(plan: &Plan, n: usize, per: usize) -> Result<Setup> {
        let node = Netns::new("epb-scale-")?;
        let pins = PinDir::new();
        let listener = bind_in_netns(&node.name, "127.0.0.1:6443".parse()?).context("binding the fake apiserver")?;
        let api = FakeApiServer::start_background(listener).context("fake apiserver")?;
        let t = Instant::now();
        scale::load(&api, n, per);
        let load = t.elapsed();
        let kubeconfig = TempDir::new("ebpf-proxy-bench-kubeconfig-")?;
        let kc = kubeconfig.0.join("kubeconfig");
        write_kubeconfig(&kc, "http://127.0.0.1:6443")?;
        // Room for the churn's replacement backends next to the initial ones.
        let max_services = n.max(65_536).to_string();
        let max_backends = (n * per + n * per / 4).max(262_144).to_string();
        let t = Instant::now();
        let mut agent = Agent::start(
            &node,
            &pins.0,
            10257,
            &[
                "--kubeconfig",
                kc.to_str().context("kubeconfig path")?,
                "--node-name",
                scale::NODE_NAME,
                "--sync-delay-ms",
                "0",
                // The periodic full re-read of the maps would land inside the measured windows.
                "--verify-interval-secs",
                "0",
                "--max-services",
                &max_services,
                "--max-backends",
                &max_backends,
            ],
        )?;
        if let Err(err) = agent.wait_ready(&node, plan.scale_ready_timeout) {
            if let Ok(Some(status)) = agent.child.try_wait() {
                bail!("the agent exited ({status}) before it was ready: {err}");
            }
            return Err(err.context(format!(
                "agent not ready at {n} services ({} fake-server LISTs and {} WATCHes of Services so far)",
                api.list_requests(ResourceKind::Service),
                api.watch_requests(ResourceKind::Service)
            )));
        }
        let ready = t.elapsed();
        let pid = agent.pid();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        ensure!(comm.trim() == "ebpf-proxy", "pid {pid} is {comm:?}, not the agent");
        let maps = PinnedServices::open(&pins.0)?;
        let s = Setup { agent, maps, api, _kubeconfig: kubeconfig, _pins: pins, node, ready, load };
        let programmed = s.agent.metric(&s.node, "ebpf_proxy_services_programmed")?;
        ensure!(programmed as usize == n, "agent programmed {programmed} services, wanted {n}");
        Ok(s)
    }

    /// Start-up rows: ready time, memory and CPU time at ready.
    fn startup_rows(&self, n: usize, per: usize, rows: &mut Vec<Row>) -> Result<()> {
        let pid = self.agent.pid();
        let (hwm, rss) = vm_hwm_rss_kib(pid)?;
        let cpu = cpu_seconds(pid)?;
        let what = format!("{n} services x {per} endpoints through the kube watchers");
        rows.push(Row::new(SECTION, "ready_s", Some(n), self.ready.as_secs_f64(), "s").note(format!(
            "agent start to /readyz 200, {what}; storing them in the fake apiserver took {:.1} s before",
            self.load.as_secs_f64()
        )));
        rows.push(
            Row::new(SECTION, "vmhwm_mib", Some(n), hwm as f64 / 1024.0, "MiB").note(format!("at ready, {what}")),
        );
        rows.push(Row::new(SECTION, "vmrss_mib", Some(n), rss as f64 / 1024.0, "MiB").note("at ready"));
        rows.push(
            Row::new(SECTION, "cpu_s", Some(n), cpu, "s")
                .note("agent utime+stime from start to ready (includes loading the programs)"),
        );
        // Where the start went: the agent's own split of it.
        let (code, body) = self.node.run(|| http_get(self.agent.metrics, "/metrics"))?;
        ensure!(code == 200, "/metrics answered {code}");
        for phase in STARTUP_PHASES {
            let prefix = format!("ebpf_proxy_startup_seconds{{phase=\"{phase}\"}} ");
            let secs: f64 = body
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .with_context(|| format!("no {prefix}in /metrics"))?
                .trim()
                .parse()
                .with_context(|| format!("{prefix}is not a number"))?;
            rows.push(
                Row::new(SECTION, &format!("startup.{phase}_ms"), Some(n), secs * 1e3, "ms")
                    .note(format!("the agent's ebpf_proxy_startup_seconds{{phase=\"{phase}\"}} ({what})")),
            );
        }
        Ok(())
    }

    /// The agent's event_to_map and sync_duration histograms.
    fn metrics(&self) -> Result<(Histogram, Histogram)> {
        let addr = self.agent.metrics;
        let (code, body) = self.node.run(|| http_get(addr, "/metrics"))?;
        ensure!(code == 200, "/metrics answered {code}");
        Ok((
            Histogram::parse(&body, "ebpf_proxy_event_to_map_seconds")?,
            Histogram::parse(&body, "kubeproxy_sync_proxy_rules_duration_seconds")?,
        ))
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')').context("/proc/pid/stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(ticks as f64 / hz as f64)
}

/// A Prometheus histogram read from /metrics: cumulative bucket counts by upper bound.
#[derive(Clone, Debug, Default)]
struct Histogram {
    buckets: BTreeMap<u64, (f64, f64)>,
    sum: f64,
    count: f64,
}

impl Histogram {
    fn parse(body: &str, name: &str) -> Result<Histogram> {
        let mut h = Histogram::default();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            if key == format!("{name}_sum") {
                h.sum = value;
            } else if key == format!("{name}_count") {
                h.count = value;
            } else if let Some(le) =
                key.strip_prefix(&format!("{name}_bucket{{le=\"")).and_then(|r| r.strip_suffix("\"}"))
            {
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse()? };
                // Keyed by the bound's bits: positive floats order like their bits.
                h.buckets.insert(bound.to_bits(), (bound, value));
            }
        }
        ensure!(!h.buckets.is_empty(), "no {name} histogram in /metrics");
        Ok(h)
    }

    /// What was observed between `before` and `self`.
    fn since(&self, before: &Histogram) -> Histogram {
        let mut d = self.clone();
        for (k, (_, c)) in d.buckets.iter_mut() {
            *c -= before.buckets.get(k).map_or(0.0, |b| b.1);
        }
        d.sum -= before.sum;
        d.count -= before.count;
        d
    }

    /// Upper bound of the bucket holding the p-th percentile (nearest rank).
    fn bucket_of(&self, p: f64) -> f64 {
        let rank = (p / 100.0 * self.count).ceil().max(1.0);
        self.buckets.values().find(|(_, c)| *c >= rank).map_or(f64::INFINITY, |(b, _)| *b)
    }
}

pub fn run(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    let (n, per) = (plan.scale_n, plan.scale_endpoints);
    if let Some(only) = plan.scale_startup_only {
        let s = Setup::start(plan, only, per).with_context(|| format!("agent at {only} services"))?;
        return s.startup_rows(only, per, rows);
    }
    {
        let s = Setup::start(plan, n, per).with_context(|| format!("agent at {n} services"))?;
        s.startup_rows(n, per, rows)?;
        check_interrupted()?;
        one_change(plan, &s, n, per, rows).context("one EndpointSlice change")?;
        check_interrupted()?;
        churn(plan, &s, n, per, rows).context("churn")?;
    }
    check_interrupted()?;
    let big = plan.scale_big_n;
    let s = Setup::start(plan, big, per).with_context(|| format!("agent at {big} services"))?;
    s.startup_rows(big, per, rows)?;
    Ok(())
}

/// Whether `vip` shows exactly `want` as backends, reading the slots only when its
/// `SERVICES` entry changed since `last` (or every 10th poll, in case a sync rewrote slots
/// in place): most polls are one lookup, so the poller takes little CPU from the agent.
struct Watch {
    vip: Ipv4Addr,
    want: Vec<Ipv4Addr>,
    last: Option<proxy_common::ServiceValue>,
    polls: u32,
}

impl Watch {
    fn new(vip: Ipv4Addr, want: Vec<Ipv4Addr>) -> Self {
        Watch { vip, want, last: None, polls: 0 }
    }

    fn visible(&mut self, maps: &PinnedServices) -> bool {
        self.polls += 1;
        let now = maps.frontend(self.vip, scale::PORT);
        if now.is_some() && now == self.last && !self.polls.is_multiple_of(10) {
            return false;
        }
        self.last = now;
        maps.backends(self.vip, scale::PORT).as_deref() == Some(self.want.as_slice())
    }
}

/// Poll the pinned maps until `vip` has exactly `want` as backends; the time it took.
fn wait_visible(maps: &PinnedServices, vip: Ipv4Addr, want: &[Ipv4Addr], since: Instant) -> Result<Duration> {
    let mut w = Watch::new(vip, want.to_vec());
    loop {
        if w.visible(maps) {
            return Ok(since.elapsed());
        }
        if since.elapsed() > CHANGE_BOUND {
            bail!("{vip}: backends {:?} after {CHANGE_BOUND:?}, want {want:?}", maps.backends(vip, scale::PORT));
        }
        // Short, so the resolution stays ~0.1 ms, but not a spin that would take a CPU
        // from the agent on a small machine.
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// Service `i`'s endpoints with the first one replaced by replacement address `k`, sorted
/// as the reader returns them.
fn replaced(i: usize, per: usize, k: Option<usize>) -> Vec<Ipv4Addr> {
    let mut addrs = scale::endpoints(i, per);
    if let Some(k) = k {
        addrs[0] = scale::replacement(k % 65_536);
    }
    addrs.sort();
    addrs
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn one_change(plan: &Plan, s: &Setup, n: usize, per: usize, rows: &mut Vec<Row>) -> Result<()> {
    let j = n / 2;
    let vip = scale::vip(j);
    let before = s.metrics()?;
    let mut lat = Vec::with_capacity(plan.scale_change_reps);
    for rep in 0..plan.scale_change_reps {
        check_interrupted()?;
        // Alternate between a new first endpoint and the original one.
        let want = replaced(j, per, rep.is_multiple_of(2).then_some(0));
        let t = Instant::now();
        s.api.apply_json(ResourceKind::EndpointSlice, [scale::slice(j, &want)]);
        lat.push(ms(wait_visible(&s.maps, vip, &want, t).with_context(|| format!("change {rep}"))?));
        // Each change on its own, not coalesced with the next.
        std::thread::sleep(Duration::from_millis(20));
    }
    // The last sync's metric update follows its map writes: give it a moment.
    std::thread::sleep(Duration::from_millis(100));
    let after = s.metrics()?;
    let (agent, sync) = (after.0.since(&before.0), after.1.since(&before.1));
    lat.sort_by(|a, b| a.total_cmp(b));
    let reps = lat.len();
    rows.push(Row::new(SECTION, "change.p50_ms", Some(n), percentile(&lat, 50.0), "ms").note(format!(
        "{reps} changes of one slice's first endpoint at {n} services x {per}: fake-server store call to new \
         backend set read from the pinned maps (polls every 20 us)"
    )));
    rows.push(Row::new(SECTION, "change.p99_ms", Some(n), percentile(&lat, 99.0), "ms"));
    ensure!(agent.count > 0.0, "the agent observed no event_to_map during {reps} changes");
    rows.push(
        Row::new(SECTION, "change.agent_mean_ms", Some(n), agent.sum / agent.count * 1e3, "ms")
            .note(format!("agent's own event_to_map_seconds over these changes: sum/count ({} bursts)", agent.count)),
    );
    rows.push(
        Row::new(SECTION, "change.agent_sync_mean_ms", Some(n), sync.sum / sync.count.max(1.0) * 1e3, "ms")
            .note(format!("agent's sync_duration_seconds over these changes: sum/count ({} syncs)", sync.count)),
    );
    rows.push(
        Row::new(SECTION, "change.agent_p99_bucket_ms", Some(n), agent.bucket_of(99.0) * 1e3, "ms")
            .note("upper bound of the event_to_map_seconds bucket holding the p99 (bucket resolution only)"),
    );
    Ok(())
}

/// One sampled churn update waiting to show in the maps.
struct Sample {
    watch: Watch,
    issued: Instant,
}

fn churn(plan: &Plan, s: &Setup, n: usize, per: usize, rows: &mut Vec<Row>) -> Result<()> {
    let rate = plan.scale_churn_rate.max(1);
    let total = (rate as f64 * plan.scale_churn_time.as_secs_f64()) as usize;
    // Services hit in a spread order; one Service comes round again only after n updates.
    let svc = |k: usize| (k * 7_919) % n;
    let pid = s.agent.pid();
    let (tx, rx) = mpsc::channel::<Sample>();
    let maps = &s.maps;
    let (issued, window, cpu, lags) = std::thread::scope(|scope| -> Result<_> {
        // Poller: records how long each sampled update took to show.
        let poller = scope.spawn(move || -> Result<Vec<f64>> {
            let mut pending: Vec<Sample> = Vec::new();
            let mut lags = Vec::new();
            let mut open = true;
            while open || !pending.is_empty() {
                loop {
                    match rx.try_recv() {
                        Ok(smp) => pending.push(smp),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                let mut i = 0;
                while i < pending.len() {
                    let p = &mut pending[i];
                    if p.watch.visible(maps) {
                        lags.push(ms(p.issued.elapsed()));
                        pending.swap_remove(i);
                    } else if p.issued.elapsed() > CHANGE_BOUND {
                        bail!("churn: {} not as updated after {CHANGE_BOUND:?}", p.watch.vip);
                    } else {
                        i += 1;
                    }
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            Ok(lags)
        });
        let cpu0 = cpu_seconds(pid)?;
        let start = Instant::now();
        let mut issued = 0;
        for k in 0..total {
            if k.is_multiple_of(1000) {
                check_interrupted()?;
            }
            // Paced: update k goes out at k / rate seconds (catching up if behind).
            let due = start + Duration::from_secs_f64(k as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let i = svc(k);
            // k + 1: replacement 0 belongs to the one-change case.
            let want = replaced(i, per, Some(k + 1));
            let t = Instant::now();
            s.api.apply_json(ResourceKind::EndpointSlice, [scale::slice(i, &want)]);
            issued += 1;
            if k.is_multiple_of(10) {
                let _ = tx.send(Sample { watch: Watch::new(scale::vip(i), want), issued: t });
            }
        }
        let window = start.elapsed();
        let cpu = cpu_seconds(pid)? - cpu0;
        drop(tx);
        let lags = poller.join().map_err(|_| anyhow::anyhow!("poller panicked"))??;
        Ok((issued, window, cpu, lags))
    })?;
    let mut lags = lags;
    lags.sort_by(|a, b| a.total_cmp(b));
    let achieved = issued as f64 / window.as_secs_f64();
    rows.push(Row::new(SECTION, "churn.lag_p50_ms", Some(n), percentile(&lags, 50.0), "ms").note(format!(
        "{issued} slice updates at {rate}/s for {:.1} s over {n} services x {per}; every 10th ({} samples) timed \
         from the store call to visible in the pinned maps (0.1 ms polls)",
        window.as_secs_f64(),
        lags.len()
    )));
    rows.push(Row::new(SECTION, "churn.lag_p99_ms", Some(n), percentile(&lags, 99.0), "ms"));
    rows.push(
        Row::new(SECTION, "churn.agent_cpu_cores", Some(n), cpu / window.as_secs_f64(), "cores")
            .note("agent utime+stime over the update window, as a fraction of one core"),
    );
    rows.push(
        Row::new(SECTION, "churn.rate", Some(n), achieved, "updates/s").note(format!("achieved (asked {rate}/s)")),
    );
    Ok(())
}
