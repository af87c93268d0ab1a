//! New TCP connections per second through a node namespace: a client pod connects to the
//! ClusterIP of the service an iptables scan reaches last, reads the backend's one-line
//! answer and closes; repeated for a bounded time or count. Every datapath has a node
//! namespace of its own, set up once per size: direct to the pod IP, ours (TC programs on
//! the pod veths), ours at the socket level (the cgroup hooks on a child cgroup the bench
//! process joins for the measurement, with the TC programs in place as on a node),
//! kube-proxy's iptables layout (nft backend), kube-proxy's nftables layout, kube-proxy's
//! iptables layout (legacy backend). Netfilter state (nf_conntrack, the legacy nat table's
//! hooks) lives in its node namespace and never meets another datapath. Short rounds then
//! measure every datapath once each, in rotating order (see `one_size`); a last round of
//! ours with the BPF run-time statistics on says where a connection's time goes (`profile`).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use proxy_tests::{
    agent::TempDir,
    harness::TestCgroup,
    netns::{Netns, Topology, wait_for},
};
use proxy_userspace::dataplane::{
    attach::attach_pod_interface,
    sock::{self, SocketLbMode},
};

use crate::{
    CONN_CASES, Plan, check_interrupted,
    dp::Dataplane,
    interrupted, percentile,
    report::{PROFILED, Row, row_id},
    rules,
};

pub const SERVER_PORT: u16 = 8080;
pub const SINK_PORT: u16 = 5201;

/// Node with `pods` routed pods; pods 1.. run `bench-podserver` (name on 8080, sink on 5201).
pub fn topology(plan: &Plan, pods: usize, subnet: u8) -> Result<Topology> {
    let mut topo = Topology::single_node(pods, subnet)?;
    let client = &topo.pods[0].ns;
    // The client opens thousands of short connections: TIME_WAIT reuse and a wide
    // ephemeral range, in the client namespace only.
    client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    let server = plan.server_bin.to_str().context("server path")?.to_string();
    for i in 1..topo.pods.len() {
        let p = &topo.pods[i];
        let child = p.ns.spawn(
            &server,
            &["--name", &p.name, "--port", &SERVER_PORT.to_string(), "--sink-port", &SINK_PORT.to_string()],
        )?;
        // Adopted at once: killed when the topology is dropped, whatever fails next.
        topo.adopt(child);
    }
    let first: SocketAddr = (topo.pods[1].ip, SERVER_PORT).into();
    topo.pods[0]
        .ns
        .run(|| wait_for(Duration::from_secs(5), "the pod server", || one(first).ok()))
        .context("pod server did not answer")?;
    Ok(topo)
}

/// One connection: connect, read the one-line answer, close. Returns (connect time, name).
pub fn one(addr: SocketAddr) -> Result<(Duration, String)> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    let connect = t.elapsed();
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 64];
    let mut len = 0;
    while !buf[..len].contains(&b'\n') {
        let k = s.read(&mut buf[len..])?;
        if k == 0 || len + k == buf.len() {
            bail!("short answer from {addr}");
        }
        len += k;
    }
    Ok((connect, String::from_utf8_lossy(&buf[..len]).trim().to_string()))
}

pub struct ConnStats {
    pub ok: usize,
    pub failed: usize,
    pub elapsed: Duration,
    /// Connect latencies in µs, sorted.
    pub connect_us: Vec<f64>,
    pub names: BTreeSet<String>,
}

/// The client loop, on a thread inside the client namespace.
pub fn measure(client: &Netns, addr: SocketAddr, plan: &Plan) -> Result<ConnStats> {
    client.run(|| {
        for _ in 0..plan.conn_warmup {
            one(addr)?;
        }
        let mut lat = Vec::with_capacity(plan.conn_max);
        let mut names = BTreeSet::new();
        let mut failed = 0;
        let start = Instant::now();
        while lat.len() < plan.conn_max && start.elapsed() < plan.conn_time {
            if interrupted() {
                bail!("interrupted");
            }
            match one(addr) {
                Ok((d, name)) => {
                    lat.push(d.as_secs_f64() * 1e6);
                    names.insert(name);
                }
                Err(e) => {
                    failed += 1;
                    if failed > 20 {
                        return Err(e.context(format!("more than 20 failed connections to {addr}")));
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        lat.sort_by(|a, b| a.total_cmp(b));
        Ok(ConnStats { ok: lat.len(), failed, elapsed, connect_us: lat, names })
    })
}

/// How a bounded command ended.
pub enum Finished {
    Done(Duration),
    /// Killed when it reached the bound (the time is a lower bound).
    TimedOut(Duration),
}

/// Run `program args < stdin` inside `ns` (from a thread that entered it, so no `ip netns
/// exec` start-up in the timing), killed when it reaches `timeout`; its wall time.
pub fn run_in_bounded(
    ns: &Netns,
    program: &str,
    args: &[&str],
    stdin: Option<&Path>,
    timeout: Duration,
) -> Result<Finished> {
    ns.run(|| -> Result<Finished> {
        let input = match stdin {
            Some(p) => Stdio::from(File::open(p).with_context(|| format!("opening {}", p.display()))?),
            None => Stdio::null(),
        };
        let t = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(input)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {program}"))?;
        loop {
            if let Some(status) = child.try_wait()? {
                let took = t.elapsed();
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    let err: String = err.lines().take(5).collect::<Vec<_>>().join(" | ");
                    bail!("{program} {} in {}: {status}: {err}", args.join(" "), ns.name);
                }
                return Ok(Finished::Done(took));
            }
            if t.elapsed() > timeout || interrupted() {
                // Our own child: killed by its pid.
                let _ = child.kill();
                let _ = child.wait();
                check_interrupted()?;
                return Ok(Finished::TimedOut(t.elapsed()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    })
}

/// `run_in_bounded`, with reaching the bound an error.
pub fn run_in(ns: &Netns, program: &str, args: &[&str], stdin: Option<&Path>, timeout: Duration) -> Result<Duration> {
    match run_in_bounded(ns, program, args, stdin, timeout)? {
        Finished::Done(d) => Ok(d),
        Finished::TimedOut(_) => bail!("{program} {} took longer than {timeout:?}; killed", args.join(" ")),
    }
}

/// Remove the rules `case` loaded (inside `ns` only). Only the backend that was used is
/// touched: merely listing the legacy nat table would instantiate it, and its hooks (with
/// nf_conntrack) would then stay registered in the namespace for the cases after.
pub fn flush_netfilter(ns: &Netns, case: &str) -> Result<()> {
    let t = Duration::from_secs(60);
    match case {
        // iptables-nft's nat chains are flushed and deleted, then the tables go.
        "iptables" => {
            run_in(ns, "iptables", &["-w", "-t", "nat", "-F"], None, t)?;
            run_in(ns, "iptables", &["-w", "-t", "nat", "-X"], None, t)?;
            run_in(ns, "nft", &["flush", "ruleset"], None, t)?;
        }
        "nftables" => {
            run_in(ns, "nft", &["flush", "ruleset"], None, t)?;
        }
        "iptables_legacy" => {
            run_in(ns, "iptables-legacy", &["-w", "-t", "nat", "-F"], None, t)?;
            run_in(ns, "iptables-legacy", &["-w", "-t", "nat", "-X"], None, t)?;
        }
        other => bail!("unknown rule case {other}"),
    }
    Ok(())
}

/// Load a rule file for `case` ("iptables", "iptables_legacy", "nftables") into `ns`.
pub fn load_rules_bounded(ns: &Netns, case: &str, file: &Path, timeout: Duration) -> Result<Finished> {
    match case {
        "iptables" => run_in_bounded(ns, "iptables-restore", &["-w"], Some(file), timeout),
        "iptables_legacy" => run_in_bounded(ns, "iptables-legacy-restore", &["-w"], Some(file), timeout),
        "nftables" => run_in_bounded(ns, "nft", &["-f", file.to_str().context("path")?], None, timeout),
        other => bail!("unknown rule case {other}"),
    }
}

pub fn load_rules(ns: &Netns, case: &str, file: &Path, timeout: Duration) -> Result<Duration> {
    match load_rules_bounded(ns, case, file, timeout)? {
        Finished::Done(d) => Ok(d),
        Finished::TimedOut(_) => {
            bail!("loading the {case} rules took longer than {timeout:?}; killed")
        }
    }
}

/// Load `ip kube-proxy` in transactions of `per` services (see `rules::nft_ruleset_chunks`);
/// returns the summed wall time of the `nft -f` runs.
pub fn load_nft_chunked(
    ns: &Netns,
    dir: &Path,
    svcs: &[rules::Svc],
    per: usize,
    timeout: Duration,
) -> Result<Duration> {
    let mut total = Duration::ZERO;
    for (i, chunk) in rules::nft_ruleset_chunks(svcs, per).into_iter().enumerate() {
        check_interrupted()?;
        let f = dir.join(format!("kube-proxy-{i:04}.nft"));
        std::fs::write(&f, chunk)?;
        total += load_rules(ns, "nftables", &f, timeout)?;
        let _ = std::fs::remove_file(&f);
    }
    Ok(total)
}

/// Services per nft transaction when only the resulting ruleset matters.
pub const NFT_CHUNK: usize = 500;

/// Our datapath on every pod interface of the node, programmed with `svcs`.
pub fn install_ours(topo: &Topology, svcs: &[rules::Svc]) -> Result<Dataplane> {
    let mut dp = Dataplane::load(svcs.len(), svcs.first().map(|s| s.endpoints.len()).unwrap_or(1).max(2))?;
    let root = dp.pins.0.clone();
    let ifaces: Vec<String> = topo.pods.iter().map(|p| p.host_if.clone()).collect();
    topo.node.run(|| -> Result<()> {
        for i in &ifaces {
            attach_pod_interface(&mut dp.programs, &root, i).with_context(|| format!("attaching to {i}"))?;
        }
        Ok(())
    })?;
    let r = dp.syncer.apply(&rules::desired(svcs));
    ensure!(r.errors.is_empty(), "sync errors: {:?}", r.errors.first());
    Ok(dp)
}

/// [`install_ours`] plus the socket-level programs on `cg` (a child cgroup made for the
/// run, never the machine's root).
pub fn install_ours_sock(topo: &Topology, svcs: &[rules::Svc], cg: &TestCgroup) -> Result<Dataplane> {
    let mut dp = install_ours(topo, svcs)?;
    let root = dp.pins.0.clone();
    sock::attach(&mut dp.programs, &root, &cg.path, SocketLbMode::On).context("attaching the socket-level programs")?;
    Ok(dp)
}

/// `measure` with the bench process inside `cg`, so the client's sockets meet the hooks.
pub fn measure_in(client: &Netns, addr: SocketAddr, plan: &Plan, cg: &TestCgroup) -> Result<ConnStats> {
    let _joined = cg.join_self()?;
    reachable(client, addr)?;
    measure(client, addr, plan)
}

fn reachable(client: &Netns, addr: SocketAddr) -> Result<()> {
    client
        .run(|| wait_for(Duration::from_secs(5), "the service", || one(addr).ok()))
        .map(|_| ())
        .with_context(|| format!("{addr} not reachable"))
}

pub fn run(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    for (k, &n) in plan.conn_sizes.iter().enumerate() {
        check_interrupted()?;
        one_size(plan, n, 200 + k as u8, rows).with_context(|| format!("connection rate, {n} services"))?;
    }
    Ok(())
}

/// What a bed has installed; dropped with it (programs detached, cgroup removed; the rules
/// go with the node namespace).
enum Installed {
    Nothing,
    Ours(Dataplane),
    /// The datapath first: it is dropped before the cgroup it is attached to.
    OursSock(Dataplane, TestCgroup),
    Rules,
}

/// One datapath on a node of its own, installed once per size.
struct Bed {
    case: &'static str,
    installed: Installed,
    /// Last: the namespaces go after what is installed in them.
    topo: Topology,
    addr: SocketAddr,
    /// Attach + program, or rules load, in ms.
    setup_ms: f64,
    pods: usize,
}

impl Bed {
    fn new(plan: &Plan, case: &'static str, n: usize, subnet: u8, files: &Path) -> Result<Bed> {
        let topo = topology(plan, 3, subnet)?;
        let pods: Vec<(Ipv4Addr, u16)> = topo.pods[1..].iter().map(|p| (p.ip, SERVER_PORT)).collect();
        let svcs = rules::services(n, 2, Some(&pods));
        let target = svcs.last().expect("n >= 1");
        let vip: SocketAddr = (target.vip, target.port).into();
        let t = Instant::now();
        let (installed, addr) = match case {
            "direct" => (Installed::Nothing, (pods[0].0, SERVER_PORT).into()),
            "ours" => (Installed::Ours(install_ours(&topo, &svcs)?), vip),
            "ours_sock" => {
                let cg = TestCgroup::new()?;
                (Installed::OursSock(install_ours_sock(&topo, &svcs, &cg)?, cg), vip)
            }
            "nftables" => {
                load_nft_chunked(&topo.node, files, &svcs, NFT_CHUNK, Duration::from_secs(300))?;
                (Installed::Rules, vip)
            }
            rule_case => {
                let ipt = files.join(format!("{rule_case}.rules"));
                std::fs::write(&ipt, rules::iptables_restore(&svcs))?;
                load_rules(&topo.node, rule_case, &ipt, Duration::from_secs(300))?;
                let _ = std::fs::remove_file(&ipt);
                (Installed::Rules, vip)
            }
        };
        let setup_ms = t.elapsed().as_secs_f64() * 1e3;
        let bed = Bed { case, installed, topo, addr, setup_ms, pods: pods.len() };
        bed.in_cgroup(|| reachable(&bed.topo.pods[0].ns, bed.addr))?;
        Ok(bed)
    }

    /// Run `f` with the bench process inside the bed's cgroup when it has one (the socket-
    /// level hooks see only its members).
    fn in_cgroup<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        match &self.installed {
            Installed::OursSock(_, cg) => {
                let _joined = cg.join_self()?;
                f()
            }
            _ => f(),
        }
    }

    fn measure(&self, plan: &Plan) -> Result<ConnStats> {
        self.in_cgroup(|| measure(&self.topo.pods[0].ns, self.addr, plan))
    }

    fn dataplane(&self) -> Option<&Dataplane> {
        match &self.installed {
            Installed::Ours(dp) | Installed::OursSock(dp, _) => Some(dp),
            _ => None,
        }
    }
}

/// One case's rounds.
#[derive(Default)]
struct Acc {
    ok: usize,
    failed: usize,
    /// Connections per second, one per round.
    rates: Vec<f64>,
    connect_us: Vec<f64>,
    names: BTreeSet<String>,
}

/// Every datapath on a node of its own (built and programmed once: no teardown between
/// cases, and no netfilter state of one case can reach another), then `plan.conn_rounds`
/// short rounds, each measuring every datapath once in an order rotated by one each round
/// (so no case always runs first or after the same one). A case's rate is the median of
/// its per-round rates; a ratio is the median of the per-round ratios (paired: both sides
/// measured in the same round, seconds apart). Then the CPU profile of our two paths.
fn one_size(plan: &Plan, n: usize, subnet: u8, rows: &mut Vec<Row>) -> Result<()> {
    let rounds = plan.conn_rounds.max(1);
    let mut per_round = plan.clone();
    per_round.conn_max = plan.conn_max.div_ceil(rounds);
    per_round.conn_time = plan.conn_time / rounds as u32;
    // Every round re-warms what switching namespaces cooled (caches, the client's route).
    per_round.conn_warmup = plan.conn_warmup.div_ceil(rounds);
    let files = TempDir::new("ebpf-proxy-bench-rules-")?;
    let mut beds = Vec::new();
    for case in CONN_CASES {
        check_interrupted()?;
        beds.push(Bed::new(plan, case, n, subnet, &files.0).with_context(|| format!("setting up {case}"))?);
    }
    let mut acc: BTreeMap<&str, Acc> = CONN_CASES.iter().map(|c| (*c, Acc::default())).collect();
    for round in 0..rounds {
        for k in 0..beds.len() {
            check_interrupted()?;
            let bed = &beds[(k + round) % beds.len()];
            let stats = bed.measure(&per_round).with_context(|| format!("{}, round {round}", bed.case))?;
            ensure!(stats.ok > 0, "{}, round {round}: no connection completed", bed.case);
            let a = acc.get_mut(bed.case).expect("case");
            a.ok += stats.ok;
            a.failed += stats.failed;
            a.rates.push(stats.ok as f64 / stats.elapsed.as_secs_f64());
            a.connect_us.extend(stats.connect_us);
            a.names.extend(stats.names);
        }
    }
    for bed in &beds {
        let a = acc.get_mut(bed.case).expect("case");
        a.connect_us.sort_by(|x, y| x.total_cmp(y));
        let mut note = format!(
            "median of {rounds} rounds: {}; {} connections in all, {} failed; backends seen {:?}",
            a.rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join("/"),
            a.ok,
            a.failed,
            a.names
        );
        match bed.case {
            "ours" | "ours_sock" => {
                note.push_str(&format!("; attach + program {n} services took {:.0} ms", bed.setup_ms))
            }
            "direct" => {}
            "nftables" => note.push_str(&format!(
                "; rules loaded in {:.0} ms ({NFT_CHUNK} services per nft transaction)",
                bed.setup_ms
            )),
            _ => note.push_str(&format!("; rules loaded in {:.0} ms", bed.setup_ms)),
        }
        if bed.case != "direct" && a.names.len() < bed.pods {
            note.push_str(" (NOT every backend answered)");
        }
        let rate =
            Row::median_of("conn", &format!("{}.rate", bed.case), Some(n), &a.rates, "conn/s").context("no rounds")?;
        rows.push(rate.note(note));
        rows.push(Row::new("conn", &format!("{}.p50_us", bed.case), Some(n), percentile(&a.connect_us, 50.0), "µs"));
        rows.push(Row::new("conn", &format!("{}.p99_us", bed.case), Some(n), percentile(&a.connect_us, 99.0), "µs"));
    }
    for (ratio, ours, other) in [
        ("ours_vs_iptables", "ours", "iptables"),
        ("ours_vs_nftables", "ours", "nftables"),
        ("ours_vs_direct", "ours", "direct"),
        ("ours_vs_iptables_legacy", "ours", "iptables_legacy"),
        ("ours_sock_vs_direct", "ours_sock", "direct"),
        ("ours_sock_vs_nftables", "ours_sock", "nftables"),
    ] {
        let paired: Vec<f64> = acc[ours].rates.iter().zip(&acc[other].rates).map(|(a, b)| a / b).collect();
        let row = Row::median_of("conn", ratio, Some(n), &paired, "x").context("no rounds")?;
        let note = format!(
            "median of {} per-round ratios (min {:.2}, max {:.2})",
            paired.len(),
            row.spread.map(|s| s.min).unwrap_or(f64::NAN),
            row.spread.map(|s| s.max).unwrap_or(f64::NAN)
        );
        rows.push(row.note(note));
    }
    let direct_rate = rows
        .iter()
        .find(|r| r.id == row_id("conn", "direct.rate", Some(n)))
        .map(|r| r.value)
        .context("no direct rate")?;
    for bed in &beds {
        if bed.dataplane().is_some() {
            check_interrupted()?;
            let rate = rows
                .iter()
                .find(|r| r.id == row_id("conn", &format!("{}.rate", bed.case), Some(n)))
                .map(|r| r.value)
                .context("no rate")?;
            profile(bed, &per_round, n, rate, direct_rate, rows)
                .with_context(|| format!("CPU profile of {}", bed.case))?;
        }
    }
    Ok(())
}

/// The profile's rows a run must produce at size `n`, each positive.
pub fn profile_rows(n: usize) -> Vec<String> {
    let mut v = Vec::new();
    for (case, progs) in PROFILED {
        for p in progs {
            for m in ["ns_per_run", "runs_per_conn"] {
                v.push(row_id("conn", &format!("profile.{case}.{p}.{m}"), Some(n)));
            }
        }
        v.push(row_id("conn", &format!("profile.{case}.bpf_ns_per_conn"), Some(n)));
    }
    v
}

/// Every loaded program of `dp`: (name, accumulated run time in ns, runs), by name.
fn prog_stats(dp: &Dataplane) -> Vec<(String, u64, u64)> {
    let mut v: Vec<(String, u64, u64)> = dp
        .programs
        .ebpf
        .programs()
        // A program of the object the loader left out has no info: not loaded.
        .filter_map(|(name, p)| {
            p.info().ok().map(|i| (name.to_string(), i.run_time().as_nanos() as u64, i.run_count()))
        })
        .collect();
    v.sort();
    v
}

/// Where a connection's time goes in our programs: one more round of `bed`'s loop with the
/// kernel's BPF run-time statistics on (BPF_ENABLE_STATS: while its fd is held, every
/// program's run_time_ns and run_cnt accumulate; they cost a little per run, so the timed
/// rounds run without them). Per program: ns per run and runs per connection; their sum
/// per connection, beside the extra wall time per connection against direct (from the
/// rounds' median rates). The bed's programs see only its own client's traffic.
fn profile(bed: &Bed, plan: &Plan, n: usize, rate: f64, direct_rate: f64, rows: &mut Vec<Row>) -> Result<()> {
    let dp = bed.dataplane().context("no datapath")?;
    let mut plan = plan.clone();
    // Warm already (the rounds); warm-up connections would be counted by the kernel.
    plan.conn_warmup = 0;
    let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS (run time)")?;
    let before = prog_stats(dp);
    let s = bed.measure(&plan);
    let after = prog_stats(dp);
    drop(stats_fd);
    let s = s?;
    ensure!(s.ok > 0, "no connection completed");
    // Failed attempts ran the programs too: every attempt counts.
    let conns = (s.ok + s.failed) as f64;
    let case = bed.case;
    let mut total_ns = 0.0;
    let mut idle = Vec::new();
    for ((name, t0, c0), (_, t1, c1)) in before.iter().zip(&after) {
        let (ns, runs) = (t1.saturating_sub(*t0) as f64, c1.saturating_sub(*c0) as f64);
        if runs == 0.0 {
            idle.push(name.clone());
            continue;
        }
        total_ns += ns;
        rows.push(Row::new("conn", &format!("profile.{case}.{name}.ns_per_run"), Some(n), ns / runs, "ns"));
        rows.push(Row::new("conn", &format!("profile.{case}.{name}.runs_per_conn"), Some(n), runs / conns, "runs"));
    }
    let extra_us = 1e6 / rate - 1e6 / direct_rate;
    rows.push(Row::new("conn", &format!("profile.{case}.bpf_ns_per_conn"), Some(n), total_ns / conns, "ns").note(
        format!(
            "BPF run time of every program per connection, over {conns:.0} connections at {:.0} conn/s with the \
             statistics on; loaded but not run: {}; wall time per connection vs direct in the rounds: {extra_us:+.2} µs",
            s.ok as f64 / s.elapsed.as_secs_f64(),
            if idle.is_empty() { "none".into() } else { idle.join(", ") }
        ),
    ));
    rows.push(
        Row::new("conn", &format!("profile.{case}.extra_us_per_conn"), Some(n), extra_us, "µs").note(
            "1/rate - 1/direct rate, medians of the rounds: the extra wall time of a connection (may be negative)",
        ),
    );
    Ok(())
}
