//! `ebpf-proxy`: the agent (`agent`) and the operator CLI (`services`, `backends`,
//! `conntrack`, `stats`, `cleanup`). Errors get their context here, at the binary's edge.
use std::process::ExitCode;

use anyhow::{Context, Result};
use proxy_userspace::{
    agent::{self, AgentConfig},
    cleanup,
    cli::{AgentArgs, CleanupArgs, Command, LogFormat, OutputFormat, ShowArgs},
    dataplane::maps::Maps,
    kube_proxy, show,
};
use serde::Serialize;
use tracing_subscriber::EnvFilter;

/// `level`: --log-level / -v when given; else RUST_LOG; else info.
fn init_logging(format: LogFormat, level: Option<String>) {
    let filter = match level {
        Some(l) => EnvFilter::try_new(&l).unwrap_or_else(|_| EnvFilter::new("info")),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn print<T: Serialize>(args: &ShowArgs, rows: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
    let out = match args.output {
        OutputFormat::Json => serde_json::to_string_pretty(rows)? + "\n",
        OutputFormat::Table => table(rows),
    };
    print!("{out}");
    Ok(())
}

fn open(args: &ShowArgs) -> Result<Maps> {
    Maps::open_pinned(&args.bpffs_root).context("opening the pinned maps")
}

/// `ebpf-proxy cleanup`: prints what it removed (or that nothing was there).
fn run_cleanup(args: &CleanupArgs) -> Result<()> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")?;
    let errors = if args.kube_proxy {
        let report = kube_proxy::cleanup(&kube_proxy::Tools { host_root: args.host_root.clone() });
        match args.output {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            OutputFormat::Table => print!("{}", report.render()),
        }
        report.errors.len()
    } else {
        let report = rt.block_on(cleanup::cleanup(&args.bpffs_root, args.force))?;
        match args.output {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            OutputFormat::Table => print!("{}", report.render()),
        }
        report.errors.len()
    };
    if errors > 0 {
        anyhow::bail!("{errors} thing(s) could not be cleaned up (listed above)");
    }
    if args.keep_running {
        // A DaemonSet pod must keep running to count as done; SIGTERM ends it.
        rt.block_on(async {
            if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                term.recv().await;
            }
        });
    }
    Ok(())
}

/// `ebpf-proxy agent`. The flags are checked before anything is loaded or listened on.
fn run_agent(args: &AgentArgs) -> Result<()> {
    let config = AgentConfig::from_args(args).context("invalid flag")?;
    agent::limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    let r = rt.block_on(agent::run(config));
    // Do not wait for tasks stuck in blocking calls (a source reading a FIFO): the datapath
    // stays pinned, there is nothing left to flush.
    rt.shutdown_background();
    r
}

/// `Ok(true)`: drift.
fn run_verify(a: &proxy_userspace::cli::VerifyArgs) -> anyhow::Result<bool> {
    use proxy_userspace::sync::{MapStore, Syncer, verify::verify};
    // Parsed as the agent parses its flag, before any I/O: a bad CIDR is an error, not a
    // different answer.
    let nodeport_addresses = agent::config::nodeport_addresses(&a.nodeport_addresses)?;
    let node = proxy_userspace::agent::node_name(a.source.node_name.as_deref());
    let objects = proxy_userspace::inspect::load_objects(
        a.source.manifests.as_deref(),
        a.source.kubeconfig.as_deref(),
        a.source.api_server.as_deref(),
        &node,
    )?;
    let info = proxy_userspace::model::node::node_info(&node, objects.node.as_ref(), &nodeport_addresses);
    let syncer = Syncer::new(open(&a.show)?).context("reading the pinned maps back")?;
    // The addresses programmed now stay with their Services on a conflict, as in the agent.
    let (desired, _) =
        proxy_userspace::model::translate_with_claims(&objects.services, &objects.slices, &info, &syncer);
    let snap = syncer.store().snapshot().context("reading the pinned maps")?;
    let drift = verify(&desired, &snap);
    let out = match a.show.output {
        OutputFormat::Json => serde_json::to_string_pretty(&drift)? + "\n",
        OutputFormat::Table if drift.is_empty() => {
            format!("no drift: {} frontends as the API says\n", desired.frontends.len())
        }
        OutputFormat::Table => drift.iter().map(|d| format!("{d}\n")).collect(),
    };
    print!("{out}");
    Ok(!drift.is_empty())
}

fn run_explain(a: &proxy_userspace::cli::ExplainArgs) -> anyhow::Result<()> {
    let (namespace, name) = a.service.split_once('/').context("the Service is namespace/name")?;
    let node = proxy_userspace::agent::node_name(a.source.node_name.as_deref());
    let objects = proxy_userspace::inspect::load_objects(
        a.source.manifests.as_deref(),
        a.source.kubeconfig.as_deref(),
        a.source.api_server.as_deref(),
        &node,
    )?;
    let info = proxy_userspace::model::node::node_info(&node, objects.node.as_ref(), &[]);
    let e = proxy_userspace::model::explain(&objects.services, &objects.slices, &info, namespace, name)
        .map_err(anyhow::Error::msg)?;
    let out = match a.output {
        OutputFormat::Json => serde_json::to_string_pretty(&e)? + "\n",
        OutputFormat::Table => show::render_explain(&e),
    };
    print!("{out}");
    Ok(())
}

fn run_trace(a: &proxy_userspace::cli::TraceArgs) -> anyhow::Result<()> {
    let req = proxy_userspace::trace::Request { from: a.from, to: a.to, proto: a.proto, syn: a.syn, at: a.at };
    let outcome = proxy_userspace::trace::trace(&a.show.bpffs_root, &req)
        .with_context(|| format!("tracing {} -> {}", a.from, a.to))?;
    print(&a.show, &outcome, show::render_trace)
}

fn main() -> ExitCode {
    let (cli, ignored) = match proxy_userspace::kubeproxy_config::parse_args(std::env::args_os().collect()) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("ebpf-proxy: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Command::Verify(a) = &cli.command {
        return match run_verify(a) {
            Ok(false) => ExitCode::SUCCESS,
            Ok(true) => ExitCode::from(1),
            Err(e) => {
                eprintln!("ebpf-proxy: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let result = match cli.command {
        Command::Agent(args) => {
            init_logging(args.log_format, args.log_filter());
            if !ignored.is_empty() {
                tracing::warn!(fields = ?ignored, "--config: fields that do not apply to this agent are ignored");
            }
            run_agent(&args)
        }
        Command::Cleanup(a) => run_cleanup(&a),
        Command::Trace(a) => run_trace(&a),
        Command::Explain(a) => run_explain(&a),
        Command::Verify(_) => unreachable!("handled above"),
        Command::Services(a) => open(&a)
            .and_then(|m| Ok(show::read_services(&m)?))
            .and_then(|r| print(&a, &r, |r| show::render_services(r))),
        Command::Backends(a) => open(&a)
            .and_then(|m| Ok(show::read_backends(&m)?))
            .and_then(|r| print(&a, &r, |r| show::render_backends(r))),
        Command::Conntrack(a) => open(&a)
            .and_then(|m| Ok(show::read_conntrack(&m)?))
            .and_then(|r| print(&a, &r, |r| show::render_conntrack(r))),
        // The table also lists the uplinks and their XDP mode (from the link pins); the
        // JSON output stays the list of counters.
        Command::Stats(a) => open(&a).and_then(|m| Ok(show::read_stats(&m)?)).and_then(|r| {
            let uplinks = proxy_userspace::dataplane::attach::pinned_uplinks(&a.bpffs_root);
            print(&a, &r, |r| {
                let mut out = show::render_stats(r);
                if !uplinks.is_empty() {
                    out.push('\n');
                    out.push_str(&show::render_uplinks(&uplinks));
                }
                out
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebpf-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
