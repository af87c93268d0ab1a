//! Command-line interface of the `ebpf-proxy` binary: the agent and the operator CLI.
//! Parsing lives in the library so tests (and the manifest checks) can validate flags
//! without running anything.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/ebpf-proxy";
/// Host-side veth names of kind (kindnet `veth*`), Calico (`cali*`), Cilium (`lxc*`),
/// Flannel/bridge CNIs (`veth*`), Weave (`vethwe*`) and Antrea (`antrea-*` is the gw; pods
/// use `*-<hash>`, configure explicitly).
pub const DEFAULT_POD_IFACE_PATTERNS: &str = "veth*,cali*,lxc*,tap*";

#[derive(Debug, Parser)]
#[command(name = "ebpf-proxy", version, about = "eBPF kube-proxy replacement: agent and CLI")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: watch Services/EndpointSlices/Node and program the datapath.
    Agent(AgentArgs),
    /// List programmed service frontends.
    Services(ShowArgs),
    /// List backends.
    Backends(ShowArgs),
    /// List conntrack entries.
    Conntrack(ShowArgs),
    /// Show datapath counters.
    Stats(ShowArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Where the agent pinned its maps.
    #[arg(long, env = "EBPF_PROXY_BPFFS_ROOT", default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Read Service and EndpointSlice YAML from this directory (reloaded on change) instead
    /// of the Kubernetes API. The embedded default for running on one machine.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig file; without it (and without --manifests) the in-cluster config is used.
    /// Ignored when --manifests is given.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (set from the Downward API in the DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// bpffs directory for pinned maps, programs and links.
    #[arg(long, env = "EBPF_PROXY_BPFFS_ROOT", default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
    /// Glob patterns (comma-separated) of pod-facing host interfaces to attach TC to.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_POD_IFACE_PATTERNS)]
    pub pod_iface_pattern: Vec<String>,
    /// External (uplink) interfaces for the north-south XDP program. Repeatable.
    #[arg(long, value_delimiter = ',')]
    pub uplink: Vec<String>,
    /// CIDRs selecting which node addresses serve NodePorts (default: all node IPs).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub http_addr: SocketAddr,
    /// Coalesce bursts of events for this long before syncing (milliseconds).
    #[arg(long, default_value_t = 50)]
    pub sync_delay_ms: u64,
    /// Size of the services map (frontends).
    #[arg(long, default_value_t = proxy_common::sizes::MAX_SERVICES)]
    pub max_services: u32,
    /// Size of the backends map.
    #[arg(long, default_value_t = proxy_common::sizes::MAX_BACKENDS)]
    pub max_backends: u32,
    /// Size of the conntrack map (LRU).
    #[arg(long, default_value_t = proxy_common::sizes::MAX_CONNTRACK)]
    pub max_conntrack: u32,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn agent_defaults() {
        let cli = Cli::try_parse_from(["ebpf-proxy", "agent", "--manifests", "/tmp/x"]).unwrap();
        let Command::Agent(a) = cli.command else { panic!("not agent") };
        assert_eq!(a.bpffs_root, PathBuf::from(DEFAULT_BPFFS_ROOT));
        assert_eq!(a.pod_iface_pattern, vec!["veth*", "cali*", "lxc*", "tap*"]);
    }

    #[test]
    fn unknown_flag_is_rejected() {
        assert!(Cli::try_parse_from(["ebpf-proxy", "agent", "--no-such-flag"]).is_err());
    }
}
