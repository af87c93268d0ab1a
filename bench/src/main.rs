//! `proxy-bench [--quick] [--out DIR] [--sections LIST]`: run the benchmark sections, print
//! markdown tables and write JSON (`<out>/bench-<mode>-<unix time>.json` and
//! `<out>/latest-<mode>.json`) and SVG charts of the comparisons (`charts`: docs/bench after
//! a complete full run). Needs root. Normally started by `cargo xtask bench`.
//! `proxy-bench --charts-from FILE` only draws the charts of a saved report.
use std::{
    path::PathBuf,
    process::{Command, ExitCode},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use clap::Parser;
use proxy_bench::{
    Plan, install_signal_handlers, interrupted,
    report::{Machine, Report},
};

const SECTIONS: [&str; 9] =
    ["per_packet", "conn", "control", "rss", "throughput", "conntrack", "northsouth", "scale", "maglev"];

#[derive(Parser)]
#[command(name = "proxy-bench", about = "ebpf-proxy benchmarks (needs root)")]
struct Args {
    /// CI smoke: tiny sizes and short bounds, every row still produced.
    #[arg(long)]
    quick: bool,
    /// Directory for the JSON results (default: <workspace>/target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The bench-podserver binary (default: next to this executable).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Only write the iptables-restore and nft -f files for `--rules-services` services x
    /// `--rules-endpoints` endpoints into this directory (to inspect or time them by hand).
    #[arg(long)]
    dump_rules: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    rules_services: usize,
    #[arg(long, default_value_t = 10)]
    rules_endpoints: usize,
    /// Override the per-packet service counts (comma-separated), for exploration.
    #[arg(long, value_delimiter = ',')]
    pp_sizes: Vec<usize>,
    /// Run only these sections (comma-separated): per_packet, conn, control, rss, throughput,
    /// conntrack, northsouth, scale.
    #[arg(long, value_delimiter = ',')]
    sections: Vec<String>,
    /// Only the scale section's start-up, at N Services x 10 endpoints (implies
    /// `--sections scale`): for start-ups of two agents alternated by hand, each given with
    /// `EBPF_PROXY_BIN`.
    #[arg(long, value_name = "N")]
    scale_startup_only: Option<usize>,
    /// Run nothing: draw the charts of a saved report (a run's JSON, or a charts
    /// directory's report.json) into --charts-dir (default: docs/bench). Needs no root.
    #[arg(long, value_name = "FILE")]
    charts_from: Option<PathBuf>,
    /// Where the charts go (default: docs/bench after a full run of every section, and for
    /// --charts-from; <out>/charts-<mode> after any other run).
    #[arg(long, value_name = "DIR")]
    charts_dir: Option<PathBuf>,
}

/// docs/bench: the charts next to docs/benchmarks.md.
fn docs_charts_dir() -> PathBuf {
    let bench_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    bench_dir.parent().unwrap_or(bench_dir).join("docs").join("bench")
}

fn write_charts(report: &Report, dir: &std::path::Path) -> bool {
    match proxy_bench::charts::write(report, dir) {
        Ok(files) => {
            eprintln!(
                "proxy-bench: {} chart(s) and {} in {}",
                files.len(),
                proxy_bench::charts::REPORT_FILE,
                dir.display()
            );
            true
        }
        Err(e) => {
            eprintln!("proxy-bench: cannot write the charts: {e}");
            false
        }
    }
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(dir) = &args.dump_rules {
        let svcs = proxy_bench::rules::services(args.rules_services, args.rules_endpoints, None);
        let r = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(dir.join("kube-proxy.iptables"), proxy_bench::rules::iptables_restore(&svcs)))
            .and_then(|_| std::fs::write(dir.join("kube-proxy.nft"), proxy_bench::rules::nft_ruleset(&svcs)));
        if let Err(e) = r {
            eprintln!("proxy-bench: writing rules: {e}");
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    if let Some(file) = &args.charts_from {
        let report = match proxy_bench::charts::read_report(file) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("proxy-bench: {e}");
                return ExitCode::FAILURE;
            }
        };
        let dir = args.charts_dir.clone().unwrap_or_else(docs_charts_dir);
        return if write_charts(&report, &dir) { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("proxy-bench: needs root (BPF programs, network namespaces); run it with sudo or as root");
        return ExitCode::from(2);
    }
    for s in &args.sections {
        if !SECTIONS.contains(&s.as_str()) {
            eprintln!("proxy-bench: unknown section {s:?} (known: {})", SECTIONS.join(", "));
            return ExitCode::from(2);
        }
    }
    if std::env::var_os("RUST_LOG").is_none() {
        // The agent started by the rss section logs at this level.
        // SAFETY: single-threaded at this point.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    install_signal_handlers();
    let server = args.server.clone().unwrap_or_else(|| {
        std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("bench-podserver"))).unwrap_or_default()
    });
    if !server.exists() {
        eprintln!(
            "proxy-bench: bench-podserver not found at {} (build the proxy-bench package's binaries)",
            server.display()
        );
        return ExitCode::from(2);
    }
    let mut plan = if args.quick { Plan::quick(server) } else { Plan::full(server) };
    if !args.pp_sizes.is_empty() {
        plan.pp_sizes = args.pp_sizes.clone();
    }
    if let Some(n) = args.scale_startup_only {
        plan.scale_startup_only = Some(n);
        args.sections = vec!["scale".into()];
    }
    let out = args.out.clone().unwrap_or_else(|| {
        let bench_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        bench_dir.parent().unwrap_or(bench_dir).join("target").join("bench")
    });
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let machine = Machine {
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        iptables: version("iptables", "-V"),
        iptables_legacy: version("iptables-legacy", "-V"),
        nft: version("nft", "-v"),
        loadavg_start: proxy_bench::loadavg(),
        loadavg_end: String::new(),
    };
    let mode = if plan.quick { "quick" } else { "full" };
    eprintln!(
        "proxy-bench: {mode} run on {} CPUs, kernel {}, load average {}",
        machine.cpus, machine.kernel, machine.loadavg_start
    );

    // A release build just wrote hundreds of MiB: get the writeback done before measuring.
    // SAFETY: no preconditions.
    unsafe { libc::sync() };
    let t = Instant::now();
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for section in SECTIONS {
        if !args.sections.is_empty() && !args.sections.iter().any(|s| s == section) {
            continue;
        }
        if interrupted() {
            errors.push(format!("{section}: skipped, interrupted"));
            continue;
        }
        let st = Instant::now();
        eprintln!("proxy-bench: {section} ...");
        let before = rows.len();
        let r = match section {
            "per_packet" => proxy_bench::per_packet::run(&plan, &mut rows),
            "conn" => proxy_bench::conn::run(&plan, &mut rows),
            "control" => proxy_bench::control::run(&plan, &mut rows),
            "rss" => proxy_bench::rss::run(&plan, &mut rows),
            "throughput" => proxy_bench::throughput::run(&plan, &mut rows),
            "conntrack" => proxy_bench::conntrack::run(&plan, &mut rows),
            "northsouth" => proxy_bench::northsouth::run(&plan, &mut rows),
            "scale" => proxy_bench::scale::run(&plan, &mut rows),
            "maglev" => proxy_bench::maglev::run(&plan, &mut rows),
            _ => unreachable!(),
        };
        for row in &rows[before..] {
            eprintln!("  {:<48} {:>12.2} {}", row.id, row.value, row.unit);
        }
        match r {
            Ok(()) => eprintln!("proxy-bench: {section} done in {:.1} s", st.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("proxy-bench: {section} FAILED: {e:#}");
                errors.push(format!("{section}: {e:#}"));
            }
        }
    }
    let mut machine = machine;
    machine.loadavg_end = proxy_bench::loadavg();
    let mut report = Report {
        mode: mode.into(),
        started_unix,
        duration_s: t.elapsed().as_secs_f64(),
        machine,
        rows,
        targets: vec![],
        errors,
    };
    report.judge(&plan);
    println!("{}", report.markdown(&plan));
    let write = || -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let json = serde_json::to_string_pretty(&report)?;
        let file = out.join(format!("bench-{mode}-{started_unix}.json"));
        std::fs::write(&file, &json)?;
        std::fs::write(out.join(format!("latest-{mode}.json")), &json)?;
        Ok(file)
    };
    match write() {
        Ok(f) => eprintln!("proxy-bench: {:.0} s; results in {}", report.duration_s, f.display()),
        Err(e) => {
            eprintln!("proxy-bench: cannot write results: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    // The docs' charts come from a complete full run, like the docs' tables; quick and
    // partial runs draw theirs beside their JSON.
    let charts_dir = args.charts_dir.clone().unwrap_or_else(|| {
        if !plan.quick && args.sections.is_empty() && report.errors.is_empty() {
            docs_charts_dir()
        } else {
            out.join(format!("charts-{mode}"))
        }
    });
    if !write_charts(&report, &charts_dir) {
        return ExitCode::FAILURE;
    }
    if report.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
