//! `ebpf-proxy`: the agent (`agent`) and the operator CLI (`services`, `backends`,
//! `conntrack`, `stats`, `cleanup`). Errors get their context here, at the binary's edge.
use std::process::ExitCode;

use anyhow::{Context, Result};
use proxy_userspace::{
    agent::{self, AgentConfig},
    cleanup,
    cli::{AgentArgs, CleanupArgs, Cli, Command, CompletionShell, ListArgs, LogFormat, OutputFormat, ShowArgs},
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

/// `value` as JSON or YAML, else `text` (table and wide alike).
fn print<T: Serialize>(format: OutputFormat, value: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
    let out = match format {
        OutputFormat::Json => serde_json::to_string_pretty(value)? + "\n",
        OutputFormat::Yaml => serde_yaml::to_string(value)?,
        OutputFormat::Table | OutputFormat::Wide => text(value),
    };
    print!("{out}");
    Ok(())
}

/// A listing to standard output, buffered: a conntrack dump can hold 262,144 rows.
fn print_rows<T: Serialize>(args: &ShowArgs, rows: &[T], columns: &show::Columns<T>) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    show::write_rows(&mut out, args.output, args.no_headers, rows, columns)?;
    std::io::Write::flush(&mut out)?;
    Ok(())
}

fn run_services(a: &ListArgs) -> Result<()> {
    let rows = show::read_services(&open(&a.show)?)?;
    print_rows(&a.show, &show::filter_services(rows, &a.filter), &show::SERVICE_COLUMNS)
}

fn run_backends(a: &ListArgs) -> Result<()> {
    let maps = open(&a.show)?;
    let services = show::read_services(&maps)?;
    let rows = show::read_backends(&maps, &services)?;
    print_rows(&a.show, &show::filter_backends(rows, &services, &a.filter), &show::BACKEND_COLUMNS)
}

fn run_conntrack(a: &ListArgs) -> Result<()> {
    let maps = open(&a.show)?;
    // Only a filter by Service needs the frontends.
    let ids = match show::selects_by_service(&a.filter) {
        true => show::selected_service_ids(&show::read_services(&maps)?, &a.filter),
        false => None,
    };
    let rows = show::read_conntrack_filtered(&maps, &a.filter, ids.as_ref())?;
    print_rows(&a.show, &rows, &show::CONNTRACK_COLUMNS)
}

/// The table also lists the uplinks and their XDP mode (from the link pins); JSON and YAML
/// stay the list of counters.
fn run_stats(a: &ShowArgs) -> Result<()> {
    let rows = show::read_stats(&open(a)?)?;
    print_rows(a, &rows, &show::STAT_COLUMNS)?;
    if matches!(a.output, OutputFormat::Table | OutputFormat::Wide) {
        let uplinks = proxy_userspace::dataplane::attach::pinned_uplinks(&a.bpffs_root);
        if !uplinks.is_empty() {
            let text = show::render_uplinks(&uplinks);
            let text = if a.no_headers { text.lines().skip(1).map(|l| format!("{l}\n")).collect() } else { text };
            print!("\n{text}");
        }
    }
    Ok(())
}

fn run_maps(a: &ShowArgs) -> Result<()> {
    let rows = proxy_userspace::dataplane::maps::pins::list(&a.bpffs_root)?;
    if rows.iter().all(|r| r.status == proxy_userspace::dataplane::maps::pins::PinStatus::Absent) {
        anyhow::bail!(proxy_userspace::dataplane::DataplaneError::NotPinned {
            path: proxy_userspace::dataplane::paths::maps_dir(&a.bpffs_root)
        });
    }
    print_rows(a, &rows, &show::MAP_COLUMNS)
}

/// `ebpf-proxy version`.
#[derive(Serialize)]
struct VersionInfo {
    version: &'static str,
    commit: &'static str,
    build_date: &'static str,
}

fn run_version(a: &proxy_userspace::cli::VersionArgs) -> Result<()> {
    let v = VersionInfo {
        version: env!("CARGO_PKG_VERSION"),
        commit: env!("EBPF_PROXY_GIT_COMMIT"),
        build_date: env!("EBPF_PROXY_BUILD_DATE"),
    };
    print(a.output, &v, |_| format!("ebpf-proxy {}\n", proxy_userspace::cli::LONG_VERSION))
}

fn run_completion(shell: CompletionShell) -> Result<()> {
    use clap::CommandFactory;
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    // Into memory first: clap_complete panics when its writer fails (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "ebpf-proxy", &mut script);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &script).context("writing the completion script")
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
        print(args.output, &report, |r| r.render())?;
        report.errors.len()
    } else {
        let report = rt.block_on(cleanup::cleanup(&args.bpffs_root, args.force))?;
        print(args.output, &report, |r| r.render())?;
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

/// The objects `verify` and `explain` judge, from the source their flags name (and, for
/// verify, the ServiceCIDRs).
fn load_objects(
    src: &proxy_userspace::cli::ObjectSourceArgs,
    node: &str,
    service_cidrs: bool,
) -> anyhow::Result<proxy_userspace::inspect::Inspected> {
    proxy_userspace::inspect::load_objects(
        src.manifests.as_deref(),
        src.kubeconfig.as_deref(),
        src.context.as_deref(),
        src.api_server.as_deref(),
        node,
        service_cidrs,
    )
}

/// `Ok(true)`: drift.
fn run_verify(a: &proxy_userspace::cli::VerifyArgs) -> anyhow::Result<bool> {
    use proxy_userspace::sync::{MapStore, Syncer, verify::verify};
    // Parsed as the agent parses its flag, before any I/O: a bad CIDR is an error, not a
    // different answer.
    let nodeport_addresses = agent::config::nodeport_addresses(&a.nodeport_addresses)?;
    let cidr_flag = agent::config::service_cidrs(&a.service_cidr)?;
    let node = proxy_userspace::agent::node_name(a.source.node_name.as_deref());
    let inspected = load_objects(&a.source, &node, true)?;
    let objects = inspected.objects;
    // The local addresses of this network namespace, which the agent serves NodePorts on:
    // run it where the agent runs (the pod's host network namespace).
    let local = proxy_userspace::dataplane::kernel::local_addrs::list_now()?;
    let mut info = proxy_userspace::model::node::node_info(&node, objects.node.as_ref(), &nodeport_addresses, &local);
    if a.nodeport_localhost {
        proxy_userspace::model::node::serve_localhost(&mut info);
    }
    // Every map verify reads, pinned with this binary's layout, before reading any.
    proxy_userspace::dataplane::maps::pins::check(&a.show.bpffs_root, |m| m.verify_reads)?;
    let syncer = Syncer::new(open(&a.show)?).context("reading the pinned maps back")?;
    // The addresses programmed now stay with their Services on a conflict, as in the agent.
    let (mut desired, _) =
        proxy_userspace::model::translate_with_claims(&objects.services, &objects.slices, &info, &syncer);
    // The ServiceCIDR objects, or where there are none to be had the flag, as in the agent.
    let mut cidrs = proxy_userspace::model::service_cidrs::ServiceCidrs::default();
    match &inspected.service_cidrs {
        Some(list) => list.iter().for_each(|c| cidrs.upsert(c)),
        None => cidrs.set_fallback(cidr_flag),
    }
    // A directory's ServiceCIDRs count beside the flag, as in the agent.
    objects.service_cidrs.iter().for_each(|c| cidrs.upsert(c));
    desired.service_cidrs = cidrs.ranges();
    let snap = syncer.store().snapshot().context("reading the pinned maps")?;
    let drift = verify(&desired, &snap);
    print(a.show.output, &drift, |drift| {
        if drift.is_empty() {
            format!("no drift: {} frontends as the API says\n", desired.frontends.len())
        } else {
            drift.iter().map(|d| format!("{d}\n")).collect()
        }
    })?;
    Ok(!drift.is_empty())
}

fn run_explain(a: &proxy_userspace::cli::ExplainArgs) -> anyhow::Result<()> {
    let (namespace, name) = a.service.split_once('/').context("the Service is namespace/name")?;
    let node = proxy_userspace::agent::node_name(a.source.node_name.as_deref());
    let objects = load_objects(&a.source, &node, false)?.objects;
    // Off the node (a laptop): the Node object's addresses stand in for its local ones.
    use proxy_userspace::model::node::{NodePortAddresses, node_info, node_ips};
    let info = node_info(&node, objects.node.as_ref(), &NodePortAddresses::All, &node_ips(objects.node.as_ref()));
    let e = proxy_userspace::model::explain(&objects.services, &objects.slices, &info, namespace, name)
        .map_err(anyhow::Error::msg)?;
    print(a.output, &e, show::render_explain)
}

fn run_trace(a: &proxy_userspace::cli::TraceArgs) -> anyhow::Result<()> {
    let req = proxy_userspace::trace::Request { from: a.from, to: a.to, proto: a.proto, syn: a.syn, at: a.at };
    let outcome = proxy_userspace::trace::trace(&a.show.bpffs_root, &req)
        .with_context(|| format!("tracing {} -> {}", a.from, a.to))?;
    print(a.show.output, &outcome, show::render_trace)
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
        Command::Services(a) => run_services(&a),
        Command::Backends(a) => run_backends(&a),
        Command::Conntrack(a) => run_conntrack(&a),
        Command::Stats(a) => run_stats(&a),
        Command::Maps(a) => run_maps(&a),
        Command::Version(a) => run_version(&a),
        Command::Completion(a) => run_completion(a.shell),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebpf-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
