//! New TCP connections per second through a node namespace: a client pod connects to the
//! ClusterIP of the service an iptables scan reaches last, reads the backend's one-line
//! answer and closes; repeated for a bounded time or count. Each round builds a fresh
//! topology that serves every datapath in turn (only one installed at a time): direct to
//! the pod IP, ours (TC programs on the pod veths), ours at the socket level (the cgroup
//! hooks on a child cgroup the bench process joins for the measurement, with the TC programs
//! in place as on a node), kube-proxy's iptables layout (nft backend), kube-proxy's nftables
//! layout, kube-proxy's iptables layout (legacy backend).
//! Netfilter state (nf_conntrack) lives in the node namespace.
use std::{
    collections::BTreeSet,
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

use crate::{CONN_CASES, Plan, check_interrupted, dp::Dataplane, interrupted, percentile, report::Row, rules};

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

/// After a teardown the VIP must stop answering (the node has no route for it). Releasing a
/// bpf_link whose pin is removed happens asynchronously in the kernel: allow a moment.
fn unreachable(client: &Netns, addr: SocketAddr, after: &str) -> Result<()> {
    let t = Instant::now();
    client
        .run(|| {
            wait_for(Duration::from_secs(3), "the VIP to stop answering", || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err().then_some(())
            })
        })
        .with_context(|| format!("{addr} still answers after removing {after}: teardown failed"))?;
    let took = t.elapsed();
    if took > Duration::from_millis(100) {
        eprintln!("  ({after}: VIP stopped answering after {took:?})");
    }
    Ok(())
}

pub fn run(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    for (k, &n) in plan.conn_sizes.iter().enumerate() {
        check_interrupted()?;
        one_size(plan, n, 200 + k as u8, rows).with_context(|| format!("connection rate, {n} services"))?;
    }
    Ok(())
}

/// Accumulated over rounds.
#[derive(Default)]
struct Acc {
    ok: usize,
    failed: usize,
    secs: f64,
    connect_us: Vec<f64>,
    names: BTreeSet<String>,
    notes: Vec<String>,
}

/// `plan.conn_rounds` rounds, each on a fresh topology (so that netfilter state one case
/// leaves behind, e.g. the legacy nat table's hooks, never reaches the next round), each
/// running every case in turn with its share of the count and time bounds.
fn one_size(plan: &Plan, n: usize, subnet: u8, rows: &mut Vec<Row>) -> Result<()> {
    let rounds = plan.conn_rounds.max(1);
    let mut per_round = plan.clone();
    per_round.conn_max = plan.conn_max.div_ceil(rounds);
    per_round.conn_time = plan.conn_time / rounds as u32;
    let mut acc: std::collections::BTreeMap<&str, Acc> = CONN_CASES.iter().map(|c| (*c, Acc::default())).collect();
    let mut pods_n = 0;
    for round in 0..rounds {
        check_interrupted()?;
        let topo = topology(plan, 3, subnet)?;
        let client = &topo.pods[0].ns;
        let pods: Vec<(Ipv4Addr, u16)> = topo.pods[1..].iter().map(|p| (p.ip, SERVER_PORT)).collect();
        pods_n = pods.len();
        let svcs = rules::services(n, 2, Some(&pods));
        let target = svcs.last().expect("n >= 1");
        let vip: SocketAddr = (target.vip, target.port).into();
        let files = TempDir::new("ebpf-proxy-bench-rules-")?;
        let ipt = files.0.join("iptables.rules");
        std::fs::write(&ipt, rules::iptables_restore(&svcs))?;
        for case in CONN_CASES {
            check_interrupted()?;
            let addr = if case == "direct" { (pods[0].0, SERVER_PORT).into() } else { vip };
            let a = acc.get_mut(case).expect("case");
            let stats = match case {
                "direct" => measure(client, addr, &per_round)?,
                "ours_sock" => {
                    let cg = TestCgroup::new()?;
                    let t = Instant::now();
                    let dp = install_ours_sock(&topo, &svcs, &cg)?;
                    a.notes.push(format!("{:.0}", t.elapsed().as_secs_f64() * 1e3));
                    let s = measure_in(client, addr, &per_round, &cg);
                    drop(dp);
                    drop(cg); // removing the cgroup detaches what is left on it
                    unreachable(client, addr, "our socket-level programs")?;
                    s?
                }
                "ours" => {
                    let t = Instant::now();
                    let dp = install_ours(&topo, &svcs)?;
                    a.notes.push(format!("{:.0}", t.elapsed().as_secs_f64() * 1e3));
                    reachable(client, addr)?;
                    let s = measure(client, addr, &per_round);
                    drop(dp); // unpins the links: the programs come off the interfaces
                    unreachable(client, addr, "our programs")?;
                    s?
                }
                rule_case => {
                    let limit = Duration::from_secs(300);
                    let took = if rule_case == "nftables" {
                        load_nft_chunked(&topo.node, &files.0, &svcs, NFT_CHUNK, limit)?
                    } else {
                        load_rules(&topo.node, rule_case, &ipt, limit)?
                    };
                    a.notes.push(format!("{:.0}", took.as_secs_f64() * 1e3));
                    reachable(client, addr)?;
                    let s = measure(client, addr, &per_round);
                    flush_netfilter(&topo.node, rule_case)?;
                    unreachable(client, addr, rule_case)?;
                    s?
                }
            };
            ensure!(stats.ok > 0, "{case}, round {round}: no connection completed");
            a.ok += stats.ok;
            a.failed += stats.failed;
            a.secs += stats.elapsed.as_secs_f64();
            a.connect_us.extend(stats.connect_us);
            a.names.extend(stats.names);
        }
    }
    let mut rates = std::collections::BTreeMap::new();
    for case in CONN_CASES {
        let a = acc.get_mut(case).expect("case");
        a.connect_us.sort_by(|x, y| x.total_cmp(y));
        let rate = a.ok as f64 / a.secs;
        let mut note = format!(
            "{} connections in {:.2} s over {rounds} round(s), {} failed; backends seen {:?}",
            a.ok, a.secs, a.failed, a.names
        );
        match case {
            "ours" | "ours_sock" => {
                note.push_str(&format!("; attach + program {n} services took {} ms", a.notes.join("/")))
            }
            "direct" => {}
            "nftables" => note.push_str(&format!(
                "; rules loaded in {} ms ({NFT_CHUNK} services per nft transaction)",
                a.notes.join("/")
            )),
            _ => note.push_str(&format!("; rules loaded in {} ms", a.notes.join("/"))),
        }
        if case != "direct" && a.names.len() < pods_n {
            note.push_str(" (NOT every backend answered)");
        }
        rows.push(Row::new("conn", &format!("{case}.rate"), Some(n), rate, "conn/s").note(note));
        rows.push(Row::new("conn", &format!("{case}.p50_us"), Some(n), percentile(&a.connect_us, 50.0), "µs"));
        rows.push(Row::new("conn", &format!("{case}.p99_us"), Some(n), percentile(&a.connect_us, 99.0), "µs"));
        rates.insert(case, rate);
    }
    for (ratio, other) in [
        ("ours_vs_iptables", "iptables"),
        ("ours_vs_nftables", "nftables"),
        ("ours_vs_direct", "direct"),
        ("ours_vs_iptables_legacy", "iptables_legacy"),
    ] {
        rows.push(Row::new("conn", ratio, Some(n), rates["ours"] / rates[other], "x"));
    }
    for (ratio, other) in [("ours_sock_vs_direct", "direct"), ("ours_sock_vs_nftables", "nftables")] {
        rows.push(Row::new("conn", ratio, Some(n), rates["ours_sock"] / rates[other], "x"));
    }
    Ok(())
}
