//! Command-line interface of the `ebpf-proxy` binary: the agent and the operator CLI.
//! Parsing lives in the library so tests (and the manifest checks) can validate flags
//! without running anything.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::dataplane::{attach::XdpModeChoice, node::PortRange};

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

// Parsed once at start-up: the size of the agent's variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
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
    /// Remove the datapath from this node (like `kube-proxy --cleanup`): detach every
    /// program of ours from every interface of this network namespace, and remove the pins
    /// under the bpffs root(s). Refuses while an agent runs on a root (see --force).
    Cleanup(CleanupArgs),
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// bpffs directories whose pins (maps, links) to remove; repeatable.
    #[arg(long, env = "EBPF_PROXY_BPFFS_ROOT", value_delimiter = ',', default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: Vec<PathBuf>,
    /// Clean up even while an agent holds a root's lock (it would re-attach on its next
    /// datapath check: stop it first).
    #[arg(long)]
    pub force: bool,
    /// After cleaning up, keep running until SIGTERM (for a DaemonSet whose pods report
    /// "done" by being ready; see docs/deploy.md).
    #[arg(long)]
    pub keep_running: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: OutputFormat,
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
    /// External (uplink) interfaces for the north-south XDP program (NodePort, ExternalIP,
    /// LoadBalancer traffic from outside the node). Repeatable or comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub uplink: Vec<String>,
    /// XDP mode on uplinks: native (in the driver) where supported, else generic.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: XdpModeChoice,
    /// Source ports for north-south SNAT (to backends on other nodes) and hairpin SNAT.
    /// Keep it outside net.ipv4.ip_local_port_range so it never collides with the node's own
    /// connections.
    #[arg(long, default_value_t = PortRange::default())]
    pub snat_port_range: PortRange,
    /// Source address a pod sees when it reaches itself through its own service (hairpin).
    /// 0.0.0.0 disables hairpin SNAT.
    #[arg(long, default_value_t = Ipv4Addr::from(proxy_common::nat_defaults::HAIRPIN_ADDR))]
    pub hairpin_address: Ipv4Addr,
    /// CIDRs selecting which node addresses serve NodePorts (default: all node IPs).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// Address for /healthz and /readyz (kube-proxy's healthz port).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub http_addr: SocketAddr,
    /// Address for /metrics; loopback by default, like kube-proxy's 127.0.0.1:10249.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,
    /// /healthz (and /readyz) fail when a change has waited this long without a completed
    /// sync (kube-proxy: 503 when an update is not synced in time).
    #[arg(long, default_value_t = 60)]
    pub healthz_timeout_secs: u64,
    /// How often to check that the pins and attachments are in place (and restore them).
    #[arg(long, default_value_t = 1000)]
    pub datapath_check_interval_ms: u64,
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
        assert_eq!(a.xdp_mode, XdpModeChoice::Auto);
        assert_eq!(a.snat_port_range, PortRange { min: 61000, max: 65535 });
        assert_eq!(a.hairpin_address, Ipv4Addr::new(169, 254, 42, 1));
        assert!(a.uplink.is_empty());
        assert_eq!(a.http_addr, "0.0.0.0:10256".parse().unwrap());
        assert_eq!(a.metrics_addr, "127.0.0.1:10249".parse().unwrap());
    }

    #[test]
    fn cleanup_flags() {
        let cli = Cli::try_parse_from(["ebpf-proxy", "cleanup"]).unwrap();
        let Command::Cleanup(c) = cli.command else { panic!("not cleanup") };
        assert_eq!(c.bpffs_root, vec![PathBuf::from(DEFAULT_BPFFS_ROOT)]);
        assert!(!c.force && !c.keep_running);
        let cli = Cli::try_parse_from(["ebpf-proxy", "cleanup", "--bpffs-root", "/a,/b", "--force"]).unwrap();
        let Command::Cleanup(c) = cli.command else { panic!("not cleanup") };
        assert_eq!(c.bpffs_root, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert!(c.force);
    }

    #[test]
    fn uplink_flags() {
        let cli = Cli::try_parse_from([
            "ebpf-proxy", "agent", "--uplink", "eth0,eth1", "--xdp-mode", "generic", "--snat-port-range", "62000-62999",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else { panic!("not agent") };
        assert_eq!(a.uplink, vec!["eth0", "eth1"]);
        assert_eq!(a.xdp_mode, XdpModeChoice::Generic);
        assert_eq!(a.snat_port_range, PortRange { min: 62000, max: 62999 });
        assert!(Cli::try_parse_from(["ebpf-proxy", "agent", "--snat-port-range", "9-1"]).is_err());
    }

    #[test]
    fn unknown_flag_is_rejected() {
        assert!(Cli::try_parse_from(["ebpf-proxy", "agent", "--no-such-flag"]).is_err());
    }
}
