//! `ebpf-proxy`: the agent (`agent`) and the operator CLI (`services`, `backends`,
//! `conntrack`, `stats`). Errors get their context here, at the binary's edge.
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use proxy_userspace::{
    agent,
    cli::{Cli, Command, LogFormat, OutputFormat, ShowArgs},
    dataplane::maps::Maps,
    show,
};
use serde::Serialize;
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => {
            init_logging(args.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")
                .and_then(|rt| rt.block_on(agent::run(args)))
        }
        Command::Services(a) => {
            open(&a).and_then(|m| Ok(show::read_services(&m)?)).and_then(|r| print(&a, &r, |r| show::render_services(r)))
        }
        Command::Backends(a) => {
            open(&a).and_then(|m| Ok(show::read_backends(&m)?)).and_then(|r| print(&a, &r, |r| show::render_backends(r)))
        }
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
