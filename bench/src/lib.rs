//! `cargo xtask bench`: what the datapath costs, measured on this machine.
//!
//! Sections (each a module): `per_packet` (BPF_PROG_TEST_RUN), `conn` (new TCP connections
//! through a netns topology: our datapath vs kube-proxy's iptables and nftables layouts vs
//! direct), `control` (programming time vs iptables-restore / nft -f, one-change latency),
//! `rss` (the real agent's peak RSS), `throughput` (one TCP stream, ClusterIP vs direct),
//! `northsouth` (UDP packets/s through a NodePort to another node: XDP vs iptables).
//! `charts` draws the comparisons of a run's rows as SVG (docs/bench/).
//!
//! Everything privileged happens in network namespaces created here and in a per-run bpffs
//! directory, both removed afterwards (also on panic, through `Drop`).
pub mod charts;
pub mod conn;
pub mod conntrack;
pub mod control;
pub mod dp;
pub mod maglev;
pub mod northsouth;
pub mod objects;
pub mod per_packet;
pub mod report;
pub mod rss;
pub mod rules;
pub mod scale;
pub mod throughput;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// Sizes, counts and time bounds of one run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    /// Services loaded for the per-packet rows.
    pub pp_sizes: Vec<usize>,
    /// `repeat` of one BPF_PROG_TEST_RUN call.
    pub pp_repeat: u32,
    /// Calls per measurement; the median is reported.
    pub pp_runs: usize,
    /// Distinct new flows timed one by one.
    pub pp_new_flows: usize,
    /// Services installed for the connection-rate rows.
    pub conn_sizes: Vec<usize>,
    pub conn_max: usize,
    pub conn_time: Duration,
    pub conn_warmup: usize,
    /// Interleaved rounds per size (each measures every datapath once); the bounds above
    /// are split over them.
    pub conn_rounds: usize,
    /// Services (x `cp_endpoints`) for the cold-sync rows.
    pub cp_sizes: Vec<usize>,
    pub cp_endpoints: usize,
    /// Services loaded when one EndpointSlice changes.
    pub cp_change_n: usize,
    pub cp_change_reps: usize,
    /// Repetitions of the iptables / nft one-change loads (bounded by `cp_rule_budget`).
    pub cp_rule_change_reps: usize,
    pub cp_rule_budget: Duration,
    /// Bound of one cold `iptables-restore` / `nft -f` (reported as a lower bound if hit).
    pub cp_rule_timeout: Duration,
    /// Services x `cp_endpoints` given to the agent whose peak RSS is read.
    pub rss_n: usize,
    pub tput_time: Duration,
    pub tput_bytes: u64,
    /// Alternating rounds per case; the bounds above are split over them.
    pub tput_rounds: usize,
    /// North-south send time per case (split over the rounds), rounds (each on a fresh
    /// cluster), sender rate cap (packets/s) and UDP flows (source ports).
    pub ns_time: Duration,
    pub ns_rounds: usize,
    pub ns_rate: u64,
    pub ns_flows: usize,
    /// The `scale` section (real agent watching the fake API server): Services x endpoints
    /// for start-up, one-change latency and churn; repetitions of the one change; churn
    /// rate (updates/s) and duration; the large start-up case; bound of one start-up.
    pub scale_n: usize,
    pub scale_endpoints: usize,
    pub scale_change_reps: usize,
    pub scale_churn_rate: usize,
    pub scale_churn_time: Duration,
    pub scale_big_n: usize,
    pub scale_ready_timeout: Duration,
    /// Only the scale section's start-up, at this many Services (`--scale-startup-only`):
    /// no change, churn or second size, for A/B start-ups of two agents
    /// (`EBPF_PROXY_BIN`) alternated by hand.
    pub scale_startup_only: Option<usize>,
    /// `bench-podserver` binary.
    pub server_bin: PathBuf,
}

impl Plan {
    pub fn full(server_bin: PathBuf) -> Self {
        Plan {
            quick: false,
            pp_sizes: vec![1, 1_000, 10_000, 100_000],
            pp_repeat: 1_000_000,
            pp_runs: 5,
            pp_new_flows: 5_000,
            conn_sizes: vec![1, 1_000, 10_000],
            conn_max: 15_000,
            conn_time: Duration::from_secs(2),
            conn_warmup: 100,
            // Short interleaved rounds (2 s / 9 per datapath each): a median and a spread.
            conn_rounds: 9,
            cp_sizes: vec![1_000, 10_000],
            cp_endpoints: 10,
            cp_change_n: 10_000,
            cp_change_reps: 50,
            cp_rule_change_reps: 10,
            cp_rule_budget: Duration::from_secs(30),
            cp_rule_timeout: Duration::from_secs(240),
            rss_n: 10_000,
            tput_time: Duration::from_secs(3),
            tput_bytes: 8 << 30,
            tput_rounds: 6,
            ns_time: Duration::from_secs(4),
            ns_rounds: 4,
            ns_rate: 2_000_000,
            ns_flows: 16,
            scale_n: 10_000,
            scale_endpoints: 10,
            scale_change_reps: 200,
            scale_churn_rate: 500,
            scale_churn_time: Duration::from_secs(30),
            scale_big_n: 100_000,
            scale_ready_timeout: Duration::from_secs(300),
            scale_startup_only: None,
            server_bin,
        }
    }

    /// CI smoke: every row, tiny sizes, short bounds (well under a minute).
    pub fn quick(server_bin: PathBuf) -> Self {
        Plan {
            quick: true,
            pp_sizes: vec![1, 100],
            pp_repeat: 20_000,
            pp_runs: 1,
            pp_new_flows: 100,
            conn_sizes: vec![1, 100],
            conn_max: 200,
            conn_time: Duration::from_millis(300),
            conn_warmup: 10,
            conn_rounds: 3,
            cp_sizes: vec![10, 100],
            cp_endpoints: 10,
            cp_change_n: 100,
            cp_change_reps: 5,
            cp_rule_change_reps: 2,
            cp_rule_budget: Duration::from_secs(5),
            cp_rule_timeout: Duration::from_secs(30),
            rss_n: 100,
            tput_time: Duration::from_millis(300),
            tput_bytes: 64 << 20,
            tput_rounds: 2,
            ns_time: Duration::from_secs(1),
            ns_rounds: 1,
            ns_rate: 2_000_000,
            ns_flows: 16,
            scale_n: 500,
            scale_endpoints: 10,
            scale_change_reps: 20,
            scale_churn_rate: 100,
            scale_churn_time: Duration::from_secs(3),
            scale_big_n: 2_000,
            scale_ready_timeout: Duration::from_secs(60),
            scale_startup_only: None,
            server_bin,
        }
    }
}

/// The datapath cases of the connection-rate comparison, in the order they run on one
/// topology (nothing netfilter-based runs before the cases that must not see it).
pub const CONN_CASES: [&str; 6] = ["direct", "ours", "ours_sock", "iptables", "nftables", "iptables_legacy"];
/// Ratios (ours / other) of new connections per second.
pub const CONN_RATIOS: [&str; 6] = [
    "ours_vs_iptables",
    "ours_vs_nftables",
    "ours_vs_direct",
    "ours_vs_iptables_legacy",
    "ours_sock_vs_direct",
    "ours_sock_vs_nftables",
];
pub const PP_CASES: [&str; 11] = [
    "hit",
    "miss",
    "reply",
    "new_flow",
    "miss_single",
    "hit_v6",
    "miss_v6",
    "reply_v6",
    "new_flow_v6",
    "miss_single_v6",
    "hit_v6_over_v4",
];
pub const CP_COLD: [&str; 6] =
    ["translate_ms", "apply_ms", "total_ms", "iptables_restore_ms", "iptables_legacy_restore_ms", "nft_ms"];
pub const CP_CHANGE: [&str; 4] = ["apply", "translate_apply", "iptables_restore", "nft"];

/// Every row id a run with `plan` must produce, each with a positive value.
pub fn expected_rows(plan: &Plan) -> Vec<String> {
    let mut v = Vec::new();
    for n in &plan.pp_sizes {
        for c in PP_CASES {
            v.push(report::row_id("per_packet", c, Some(*n)));
        }
    }
    v.extend(per_packet::xdp_rows());
    for n in &plan.conn_sizes {
        for c in CONN_CASES {
            for m in ["rate", "p50_us", "p99_us"] {
                v.push(report::row_id("conn", &format!("{c}.{m}"), Some(*n)));
            }
        }
        for r in CONN_RATIOS {
            v.push(report::row_id("conn", r, Some(*n)));
        }
        v.extend(conn::profile_rows(*n));
    }
    for n in &plan.cp_sizes {
        for c in CP_COLD {
            v.push(report::row_id("control", &format!("cold.{c}"), Some(*n)));
        }
    }
    for c in CP_CHANGE {
        for q in ["p50_ms", "p99_ms"] {
            v.push(report::row_id("control", &format!("change.{c}.{q}"), Some(plan.cp_change_n)));
        }
    }
    v.push(report::row_id("rss", "agent_vmhwm_mib", Some(plan.rss_n)));
    v.push(report::row_id("rss", "agent_ready_s", Some(plan.rss_n)));
    for q in ["p50_ms", "p99_ms"] {
        v.push(report::row_id("rss", &format!("manifests_rename_to_map.{q}"), Some(plan.rss_n)));
    }
    for per in ["per_service", "per_endpoint"] {
        v.push(report::row_id("rss", &format!("bytes.total.{per}"), Some(plan.rss_n)));
    }
    for c in ["direct_gbps", "ours_gbps", "ours_vs_direct", "ours_sock_gbps", "ours_sock_vs_direct"] {
        v.push(report::row_id("throughput", c, None));
    }
    v.extend(conntrack::expected_rows(plan));
    v.extend(northsouth::expected_rows(plan));
    v.extend(scale::expected_rows(plan));
    v
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// SIGINT / SIGTERM stop the measurement loops, so the run unwinds through the `Drop`s
/// that delete namespaces, pins and child processes instead of dying with them in place.
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Fail fast when interrupted.
pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

/// Percentile (0..=100) of an already sorted slice, nearest-rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 50.0)
}

/// /proc/loadavg (1, 5 and 15 minute load averages, running/total tasks).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(4)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Peak and current RSS (KiB) of a process, from /proc/<pid>/status.
pub fn vm_hwm_rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Option<u64> {
        s.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()
    };
    Ok((
        field("VmHWM:").ok_or_else(|| anyhow::anyhow!("no VmHWM for pid {pid}"))?,
        field("VmRSS:").ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))?,
    ))
}
