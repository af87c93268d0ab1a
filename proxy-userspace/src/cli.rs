//! Command-line interface of the `ebpf-proxy` binary: the agent and the operator CLI.
//! Parsing lives in the library so tests (and the manifest checks) can validate flags
//! without running anything.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::dataplane::{
    attach::{TcAttachChoice, XdpModeChoice},
    maps::node::PortRange,
    sock::SocketLbMode,
};
use crate::model::node::LbMode;
use crate::trace::{At, Proto};

/// clap's side of the option enums that live with the code they configure (`dataplane`,
/// `trace`): their spelling on the command line and their help, so that clap stays here.
macro_rules! value_enum {
    ($ty:ident { $($variant:ident => $name:literal $(: $help:literal)?),+ $(,)? }) => {
        impl ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$($ty::$variant),+]
            }
            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(match self {
                    $($ty::$variant => clap::builder::PossibleValue::new($name)$(.help($help))?),+
                })
            }
        }
    };
}

value_enum!(SocketLbMode {
    On => "on": "Every socket in the cgroup is translated at connect()/sendmsg()",
    Off => "off": "No socket-level translation; the links of an earlier agent are removed",
    HostOnly => "host-only": "Only sockets of the host network namespace; pod sockets go through the TC path (for service meshes whose sidecars must see the ClusterIP)",
});
value_enum!(LbMode {
    Snat => "snat": "Source NAT to this node (kube-proxy's behaviour): replies come back through it",
    Dsr => "dsr": "Direct server return: the frontend travels in an IP option, the backend's node answers the client directly (an IPv4 option, an IPv6 destination-options header)",
    Hybrid => "hybrid": "DSR for TCP, SNAT for UDP",
});
value_enum!(XdpModeChoice {
    Auto => "auto": "Native (driver) mode where the driver supports it, generic otherwise",
    Native => "native",
    Generic => "generic",
});
value_enum!(TcAttachChoice {
    Auto => "auto": "tcx links where the kernel has them (>= 6.6), clsact filters otherwise",
    Clsact => "clsact": "clsact filters over netlink even where tcx exists: what kernels < 6.6 get (tests of that path run on newer kernels with it)",
});
value_enum!(At {
    Pod => "pod": "Leaving a pod (`from_pod`, TC ingress of its host-side veth)",
    PodEgress => "pod-egress": "Entering a pod (`to_pod`): replies reverse-NATed for the client",
    Uplink => "uplink": "Arriving from outside on an uplink (`from_uplink`, XDP)",
    UplinkEgress => "uplink-egress": "Leaving through an uplink (`to_uplink`): replies of local backends to outside clients",
});
value_enum!(Proto { Tcp => "tcp", Udp => "udp" });

pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/ebpf-proxy";
/// Host-side veth names of kind (kindnet `veth*`), Calico (`cali*`), Cilium (`lxc*`),
/// Flannel/bridge CNIs (`veth*`), Weave (`vethwe*`), VM runtimes (`tap*`), the Amazon VPC
/// CNI (`eni*`), GKE (`gke*`) and Azure CNI (`azv*`). OVN-Kubernetes (container-id names)
/// and Antrea (`<pod>-<hash>`; `antrea-gw0` is its gateway, not a pod) have no common
/// prefix: their pods are found by kind (`--pod-iface-detect`).
pub const DEFAULT_POD_IFACE_PATTERNS: &str = "veth*,cali*,lxc*,tap*,eni*,gke*,azv*";

/// `--version` and `ebpf-proxy version`: the crate's version, the git commit and the build
/// date (both embedded by build.rs; "unknown" when built without git).
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EBPF_PROXY_GIT_COMMIT"),
    ", built ",
    env!("EBPF_PROXY_BUILD_DATE"),
    ")"
);

const EXAMPLES: &str = "\
Examples:
  # What is programmed, kubectl-style
  ebpf-proxy services -o wide
  ebpf-proxy services -n kube-system --port 53
  ebpf-proxy backends --service default/web -o yaml
  ebpf-proxy conntrack --address 10.96.0.10 --proto tcp --no-headers
  # Why these backends, and does the kernel agree with the API
  ebpf-proxy explain default/web --context prod
  KUBECONFIG=~/.kube/a:~/.kube/b ebpf-proxy verify
  # Shell completion
  ebpf-proxy completion bash > /etc/bash_completion.d/ebpf-proxy";

#[derive(Debug, Parser)]
#[command(
    name = "ebpf-proxy",
    version = LONG_VERSION,
    about = "eBPF kube-proxy replacement: agent and CLI",
    after_help = EXAMPLES
)]
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
    #[command(after_help = "\
Examples:
  ebpf-proxy services
  ebpf-proxy services -o wide --no-headers
  ebpf-proxy services -n default --service web -o json
  ebpf-proxy services --address 10.96.0.10 --port 443 --proto tcp")]
    Services(ListArgs),
    /// List backends (filters by Service select the backends of its frontends).
    #[command(after_help = "\
Examples:
  ebpf-proxy backends -o wide
  ebpf-proxy backends --service kube-system/kube-dns -o yaml
  ebpf-proxy backends --address 10.244.1.7")]
    Backends(ListArgs),
    /// List conntrack entries (a filter on an address or port matches the source, the
    /// destination or the NAT side; by Service, the entries of its frontends).
    #[command(after_help = "\
Examples:
  ebpf-proxy conntrack --service default/web
  ebpf-proxy conntrack --address 10.96.0.10 --port 80 --proto tcp -o wide
  ebpf-proxy conntrack -o json > flows.json")]
    Conntrack(ListArgs),
    /// Show datapath counters.
    #[command(after_help = "\
Examples:
  ebpf-proxy stats
  ebpf-proxy stats -o yaml")]
    Stats(ShowArgs),
    /// Every map of the datapath (the map catalogue) with its pin: entries, size and fill,
    /// and whether it is pinned with the layout this binary reads.
    Maps(ShowArgs),
    /// What the datapath does with one packet: built from the flags, run through the loaded
    /// programs (BPF_PROG_TEST_RUN) on a private copy of the entries it can read, so the
    /// live maps are left exactly as they were.
    Trace(TraceArgs),
    /// Why these backends: for each frontend of a Service (`namespace/name`), every endpoint
    /// of its slices with the reason it is or is not a backend on this node, from the
    /// agent's own model.
    Explain(ExplainArgs),
    /// Does the kernel do what the API says? Translates the objects with the agent's model
    /// and compares the result with the pinned maps: missing, extra or different frontends,
    /// backends and flags, one line each. Exit 0 when they agree, 1 on drift, 2 on error.
    Verify(VerifyArgs),
    /// Remove the datapath from this node (like `kube-proxy --cleanup`): detach every
    /// program of ours from every interface of this network namespace, and remove the pins
    /// under the bpffs root(s). Refuses while an agent runs on a root (see --force).
    Cleanup(CleanupArgs),
    /// Print a shell completion script (bash, zsh or fish) to standard output.
    #[command(after_help = "\
Examples:
  ebpf-proxy completion bash > /etc/bash_completion.d/ebpf-proxy
  ebpf-proxy completion zsh > \"${fpath[1]}/_ebpf-proxy\"
  ebpf-proxy completion fish > ~/.config/fish/completions/ebpf-proxy.fish")]
    Completion(CompletionArgs),
    /// Print the version, git commit and build date.
    Version(VersionArgs),
}

#[derive(Debug, Args)]
pub struct CompletionArgs {
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// The shells `completion` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Output format (table: one line).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: OutputFormat,
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
    /// Remove what kube-proxy leaves on the node instead, as `kube-proxy --cleanup` does:
    /// its KUBE-* iptables chains and the jumps to them (legacy and nft, IPv4 and IPv6) and
    /// the nftables tables `ip kube-proxy` and `ip6 kube-proxy`. This datapath is left
    /// alone, so it can run while the agent serves (the last step of a migration).
    #[arg(long)]
    pub kube_proxy: bool,
    /// With --kube-proxy: where the node's root filesystem is mounted (in a pod); the node's
    /// own iptables and nft are run chrooted into it. Without it they come from PATH.
    #[arg(long, requires = "kube_proxy")]
    pub host_root: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    /// The table with the columns it leaves out.
    Wide,
    Json,
    Yaml,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Where the agent pinned its maps.
    #[arg(long, env = "EBPF_PROXY_BPFFS_ROOT", default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// table and wide: no header line.
    #[arg(long)]
    pub no_headers: bool,
}

/// `services`, `backends`, `conntrack`: where to read and which rows to print.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub show: ShowArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// Row filters, ANDed; a filter that matches nothing prints nothing (exit 0), as kubectl.
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    /// Only the Services of this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only this Service: `namespace/name`, or `name` (in --namespace, or any namespace).
    #[arg(long)]
    pub service: Option<String>,
    /// Only rows with this address (a frontend, a backend, or either side of a flow).
    #[arg(long)]
    pub address: Option<std::net::IpAddr>,
    /// Only rows with this port (as --address).
    #[arg(long)]
    pub port: Option<u16>,
    /// Only this protocol.
    #[arg(long, ignore_case = true, value_parser = protocol_parser())]
    pub proto: Option<crate::model::Protocol>,
}

/// Where Kubernetes objects come from: the agent's flags, shared by the operator commands
/// that judge the same objects (`explain`, `verify`).
#[derive(Debug, Args)]
pub struct ObjectSourceArgs {
    /// Read Service, EndpointSlice and Node YAML from this directory (the agent reloads it
    /// on change) instead of the Kubernetes API. The embedded default for one machine.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig file, or a list of them separated by ':' (as KUBECONFIG: merged as kubectl
    /// does, the first file to set a value wins); without it (and without --manifests) the
    /// in-cluster / default config is used. Ignored when --manifests is given.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<String>,
    /// The kubeconfig context to use (default: its current-context).
    #[arg(long)]
    pub context: Option<String>,
    /// The API server's own address (https://HOST:PORT, HOST:PORT or HOST; port 6443 when
    /// omitted), with the in-cluster service-account credentials (or the kubeconfig's). On
    /// a cluster without kube-proxy the in-cluster default, the `kubernetes` Service's
    /// ClusterIP, is served only once this agent runs: set this there. Empty: unset.
    #[arg(long, alias = "master")]
    pub api_server: Option<String>,
    /// This node's name (set from the Downward API in the DaemonSet): locality, zone and
    /// node addresses are judged for it. Default: the host name.
    #[arg(long, env = "NODE_NAME", alias = "hostname-override")]
    pub node_name: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The Service, `namespace/name`.
    pub service: String,
    #[command(flatten)]
    pub source: ObjectSourceArgs,
    /// Output format (wide: as table).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: ObjectSourceArgs,
    /// As the agent's flag of that name (unset, `primary` or CIDRs: which local addresses
    /// serve NodePorts); the local addresses are this network namespace's, so run verify
    /// where the agent runs. Inside the agent's pod the DaemonSet's
    /// EBPF_PROXY_NODEPORT_ADDRESSES (from the ConfigMap) is the default, so `kubectl exec
    /// ... verify` judges as the agent does.
    #[arg(long, value_delimiter = ',', env = "EBPF_PROXY_NODEPORT_ADDRESSES")]
    pub nodeport_addresses: Vec<String>,
    /// As the agent's `--nodeport-localhost`.
    #[arg(long, env = "EBPF_PROXY_NODEPORT_LOCALHOST", default_value_t = true, action = clap::ArgAction::Set)]
    pub nodeport_localhost: bool,
    /// As the agent's `--service-cidr`: the Service CIDRs where no ServiceCIDR objects can be
    /// had (manifests, or an API server without the resource).
    #[arg(long, value_delimiter = ',', env = "EBPF_PROXY_SERVICE_CIDR")]
    pub service_cidr: Vec<String>,
    #[command(flatten)]
    pub show: ShowArgs,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Source address and port (IPv4 `a.b.c.d:port` or IPv6 `[addr]:port`).
    #[arg(long)]
    pub from: SocketAddr,
    /// Destination address and port.
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long, value_enum, default_value = "tcp")]
    pub proto: Proto,
    /// TCP: a SYN (a new connection) rather than a segment of an open one.
    #[arg(long)]
    pub syn: bool,
    /// Where the packet is seen: leaving a pod, entering one, arriving on an uplink,
    /// leaving through one.
    #[arg(long, value_enum, default_value = "pod")]
    pub at: At,
    #[command(flatten)]
    pub show: ShowArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The agent's flags as given; `agent::AgentConfig::from_args` checks and types them once.
/// Strings that need checking (CIDRs, patterns) stay strings here so that an empty value
/// (e.g. an empty ConfigMap key) can mean "none", and the error names the flag.
#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub source: ObjectSourceArgs,
    /// bpffs directory for pinned maps, programs and links.
    #[arg(long, env = "EBPF_PROXY_BPFFS_ROOT", default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
    /// Glob patterns (comma-separated) of pod-facing host interfaces to attach TC to.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_POD_IFACE_PATTERNS)]
    pub pod_iface_pattern: Vec<String>,
    /// Also attach TC to every host-side veth or netkit device whose peer lives in another
    /// network namespace (how every CNI wires a pod), whatever its name; never to a device
    /// carrying a default route or a subnet address (a node's uplink can be a veth too),
    /// nor to an --uplink.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub pod_iface_detect: bool,
    /// External (uplink) interfaces for the north-south XDP program (NodePort, ExternalIP,
    /// LoadBalancer traffic from outside the node). Repeatable or comma-separated. Without
    /// it the uplinks are detected: the devices carrying the Node's addresses and the
    /// default routes' devices, followed as they change.
    #[arg(long, value_delimiter = ',')]
    pub uplink: Vec<String>,
    /// XDP mode on uplinks: native (in the driver) where supported, else generic.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: XdpModeChoice,
    /// TC attachment: tcx links where the kernel has them (auto), or the clsact filters of
    /// kernels without tcx (< 6.6) on any kernel (clsact: for testing that path).
    #[arg(long, value_enum, env = "EBPF_PROXY_TC_ATTACH", default_value = "auto", hide = true)]
    pub tc_attach: TcAttachChoice,
    /// Source ports for north-south SNAT (to backends on other nodes) and hairpin SNAT, per
    /// backend ip:port. Keep it outside net.ipv4.ip_local_port_range so it never collides
    /// with the node's own connections, and outside the NodePort range (uplink packets to
    /// ports in this range are first looked up as replies).
    #[arg(long, default_value_t = PortRange::default())]
    pub snat_port_range: PortRange,
    /// Source address a pod sees when it reaches itself through its own service (hairpin).
    /// 0.0.0.0 disables hairpin SNAT.
    #[arg(long, default_value_t = Ipv4Addr::from(proxy_common::nat_defaults::HAIRPIN_ADDR))]
    pub hairpin_address: Ipv4Addr,
    /// IPv6 hairpin source address (a unique-local address no cluster routes, so the pod
    /// answers it through its default route). :: disables IPv6 hairpin SNAT.
    #[arg(long, default_value_t = Ipv6Addr::from(proxy_common::nat_defaults::HAIRPIN_ADDR6))]
    pub hairpin_address6: Ipv6Addr,
    /// Which local addresses serve NodePorts, as kube-proxy's flag. Unset: every local
    /// address of the node's network namespace, followed as addresses come and go (secondary
    /// NICs, keepalived VIPs, bridge gateways), as kube-proxy's iptables mode. `primary`: only
    /// the node's primary IP of each family (its first InternalIP, else ExternalIP; the
    /// nftables mode's default). CIDRs (IPv4 and IPv6): the local addresses inside them; a
    /// family with no CIDR here is not restricted. Never loopback nor IPv6 link-local. A
    /// value that is neither stops the agent at start-up (an empty one is ignored).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// Serve NodePorts on 127.0.0.1 and ::1 too, for processes on the node (as kube-proxy's
    /// iptables mode does for IPv4 with `--iptables-localhost-nodeports`). Through the
    /// socket-level hooks only (needs `--socket-lb` on or host-only): unreachable from
    /// outside and from a pod's own loopback.
    #[arg(long, env = "EBPF_PROXY_NODEPORT_LOCALHOST", default_value_t = true, action = clap::ArgAction::Set)]
    pub nodeport_localhost: bool,
    /// Address for /healthz, /livez and /readyz (kube-proxy's healthz port).
    #[arg(long, alias = "healthz-bind-address", default_value = "0.0.0.0:10256")]
    pub http_addr: SocketAddr,
    /// Address for /metrics; loopback by default, like kube-proxy's 127.0.0.1:10249.
    #[arg(long, alias = "metrics-bind-address", default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,
    /// Also export `ebpf_proxy_socket_lb_translations{service,frontend_id}`: one series per
    /// Service frontend (10,000+ per node at 10,000 Services), off by default; the node-wide
    /// count is `ebpf_proxy_datapath_packets_total{verdict="sock_translate"}`.
    #[arg(long)]
    pub metrics_per_frontend: bool,
    /// /healthz (and /readyz) fail when a change has waited this long without a completed
    /// sync (kube-proxy: 503 when an update is not synced in time).
    #[arg(long, default_value_t = 60)]
    pub healthz_timeout_secs: u64,
    /// How often to check that the pins and attachments are in place (and restore them).
    #[arg(long, default_value_t = 1000)]
    pub datapath_check_interval_ms: u64,
    /// How often to re-read the maps and compare them with the API's objects, as
    /// `ebpf-proxy verify` does (drift goes to the log and the `datapath_drift` gauge);
    /// 0 turns it off.
    #[arg(long, default_value_t = 60)]
    pub verify_interval_secs: u64,
    /// Coalesce bursts of events for this long before syncing (milliseconds).
    #[arg(long, default_value_t = 50)]
    pub sync_delay_ms: u64,
    /// Size of the services map (frontends).
    #[arg(long, default_value_t = proxy_common::sizes::MAX_SERVICES)]
    pub max_services: u32,
    /// Size of the backends map.
    #[arg(long, default_value_t = proxy_common::sizes::MAX_BACKENDS)]
    pub max_backends: u32,
    /// Size of the conntrack map (two entries per flow). When it is full of live flows, new
    /// flows are dropped (counted `ct_full`); established flows are never evicted.
    #[arg(long, default_value_t = proxy_common::sizes::MAX_CONNTRACK)]
    pub max_conntrack: u32,
    /// Size of the loadBalancerSourceRanges maps (prefixes of all Services, per family; kube-proxy
    /// has no such limit). A LoadBalancer whose ranges do not fit is not served at all (fail
    /// closed) until they do.
    #[arg(long, default_value_t = proxy_common::sizes::MAX_SOURCE_RANGES)]
    pub max_source_ranges: u32,
    /// How new flows of NodePort, ExternalIP and LoadBalancer frontends pick a backend when
    /// their Service has no `ebpf-proxy.io/lb-algorithm` annotation: `random` (kube-proxy's
    /// behaviour) or `maglev` (every node picks the same backend for a flow, so a flow an
    /// upstream router moves to another node keeps its backend). ClusterIPs are random
    /// unless annotated.
    #[arg(long, default_value = "random")]
    pub lb_algorithm: crate::model::LbAlgorithm,
    /// Slots of each Maglev table: a prime, at least 100 times the backends of the largest
    /// Maglev Service (16381 as Cilium's default, or 65521); each costs ~64 bytes of kernel
    /// memory per frontend.
    #[arg(long, default_value_t = crate::model::maglev::DEFAULT_TABLE_SIZE, value_parser = parse_maglev_table_size)]
    pub maglev_table_size: u32,
    /// Size of the Maglev map: table slots of every Maglev frontend together (each Maglev
    /// frontend takes --maglev-table-size of them). A frontend whose table does not fit is
    /// not programmed, with `map MAGLEV is full: raise --max-maglev-slots`.
    #[arg(long, default_value_t = proxy_common::sizes::MAX_MAGLEV_SLOTS)]
    pub max_maglev_slots: u32,
    /// Service CIDRs (IPv4 and IPv6, repeatable or comma-separated): new flows from pods
    /// and the uplink to an address inside them that no Service holds are refused (TCP
    /// reset, ICMP unreachable), as kube-proxy filters unallocated ClusterIPs. Used with
    /// `--manifests`, and with the API when it has no `networking.k8s.io/v1` ServiceCIDR
    /// resource (before Kubernetes 1.33); otherwise the ServiceCIDR objects say.
    #[arg(long, value_delimiter = ',', env = "EBPF_PROXY_SERVICE_CIDR")]
    pub service_cidr: Vec<String>,
    #[command(flatten)]
    pub conntrack: ConntrackArgs,
    /// Socket-level load balancing (cgroup connect/sendmsg/recvmsg/getpeername hooks): node
    /// processes, hostNetwork pods and (with `on`) pods reach Services by a backend address
    /// chosen at connect(). `host-only` leaves pod sockets to the TC path (service meshes
    /// whose sidecars must see the ClusterIP). The TC and XDP paths stay in place either way.
    #[arg(long, value_enum, env = "EBPF_PROXY_SOCKET_LB", default_value = "on")]
    pub socket_lb: SocketLbMode,
    /// How NodePort, ExternalIP and LoadBalancer flows reach a backend on another node:
    /// `snat` (source NAT to this node, kube-proxy's behaviour), `dsr` (direct server
    /// return: the backend sees the client's address and its node answers the client
    /// directly; every node must run with DSR support, and the path must carry IPv4 options
    /// and IPv6 destination-options headers) or `hybrid` (DSR for TCP, SNAT for UDP).
    #[arg(long, value_enum, env = "EBPF_PROXY_LB_MODE", default_value = "snat")]
    pub lb_mode: LbMode,
    /// cgroup v2 directory the socket-level programs are attached to (they see the sockets
    /// of every process below it, whatever their network namespace). Default: the node's
    /// cgroup v2 root, detected (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Log format.
    #[arg(long, alias = "logging-format", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log level: error, warn, info, debug or trace (RUST_LOG's syntax for finer filters).
    /// Without it or -v: RUST_LOG, else info.
    #[arg(long, conflicts_with = "verbosity")]
    pub log_level: Option<String>,
    /// kube-proxy's verbosity: 0-3 info, 4 debug, 5 and more trace.
    #[arg(short = 'v', long = "v", id = "verbosity")]
    pub verbosity: Option<u32>,
    /// kube-proxy's configuration file (a KubeProxyConfiguration, as in its ConfigMap): the
    /// fields that apply set the matching flags (a flag given here wins); the others are
    /// logged as ignored.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl AgentArgs {
    /// The tracing filter the flags ask for: --log-level, else -v, else None (RUST_LOG or info).
    pub fn log_filter(&self) -> Option<String> {
        if let Some(l) = &self.log_level {
            return Some(l.clone());
        }
        self.verbosity.map(|v| {
            match v {
                0..=3 => "info",
                4 => "debug",
                _ => "trace",
            }
            .to_string()
        })
    }
}

/// tcp, udp or sctp (any case), with the names offered to shell completion.
fn protocol_parser() -> impl clap::builder::TypedValueParser<Value = crate::model::Protocol> {
    use crate::model::Protocol;
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["tcp", "udp", "sctp"]).map(|s| match s.to_ascii_lowercase().as_str() {
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => Protocol::Tcp,
    })
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 30s, 1h, 24h)"))
}

/// Conntrack timeouts (idle time per state) and the collector's interval. The names follow
/// kube-proxy's `--conntrack-*` flags where it has one.
#[derive(Debug, Clone, Args)]
pub struct ConntrackArgs {
    /// Idle timeout of established TCP flows (kube-proxy's default).
    #[arg(long, value_parser = duration, default_value = "24h")]
    pub conntrack_tcp_timeout_established: std::time::Duration,
    /// Idle timeout of half-closed TCP flows (one side sent FIN; kube-proxy's default).
    #[arg(long, value_parser = duration, default_value = "1h")]
    pub conntrack_tcp_timeout_close_wait: std::time::Duration,
    /// Idle timeout of TCP flows that saw no reply yet.
    #[arg(long, value_parser = duration, default_value = "60s")]
    pub conntrack_tcp_timeout_syn: std::time::Duration,
    /// How long closed TCP flows (both FINs, or a RST) are kept (removed at once when the
    /// table is under pressure).
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub conntrack_tcp_timeout_closed: std::time::Duration,
    /// Idle timeout of UDP/SCTP flows that saw no reply.
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub conntrack_udp_timeout: std::time::Duration,
    /// Idle timeout of UDP/SCTP flows with traffic both ways.
    #[arg(long, value_parser = duration, default_value = "120s")]
    pub conntrack_udp_timeout_stream: std::time::Duration,
    /// Interval between conntrack collector passes (every 100ms while the table is nearly
    /// full or dropping new flows).
    #[arg(long, value_parser = duration, default_value = "2s")]
    pub conntrack_gc_interval: std::time::Duration,
}

impl ConntrackArgs {
    pub fn timeouts(&self) -> proxy_common::ct::CtTimeouts {
        let s = |d: std::time::Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        proxy_common::ct::CtTimeouts {
            tcp_syn: s(self.conntrack_tcp_timeout_syn),
            tcp_established: s(self.conntrack_tcp_timeout_established),
            tcp_close_wait: s(self.conntrack_tcp_timeout_close_wait),
            tcp_closed: s(self.conntrack_tcp_timeout_closed),
            udp: s(self.conntrack_udp_timeout),
            udp_stream: s(self.conntrack_udp_timeout_stream),
        }
    }
}

/// `--maglev-table-size`: a prime in range, else the reason.
fn parse_maglev_table_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.trim().parse().map_err(|e| format!("{s:?} is not a number: {e}"))?;
    crate::model::maglev::check_table_size(n).map_err(|e| e.to_string())
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
        assert_eq!(a.pod_iface_pattern, vec!["veth*", "cali*", "lxc*", "tap*", "eni*", "gke*", "azv*"]);
        assert!(a.pod_iface_detect);
        assert_eq!(a.xdp_mode, XdpModeChoice::Auto);
        assert_eq!(a.snat_port_range, PortRange { min: 1024, max: 29999 });
        assert_eq!(a.hairpin_address, Ipv4Addr::new(169, 254, 42, 1));
        assert!(a.uplink.is_empty());
        assert_eq!(a.conntrack.timeouts(), proxy_common::ct::CtTimeouts::default());
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
        assert!(c.force && !c.kube_proxy);
        let cli = Cli::try_parse_from(["ebpf-proxy", "cleanup", "--kube-proxy", "--host-root=/host"]).unwrap();
        let Command::Cleanup(c) = cli.command else { panic!("not cleanup") };
        assert!(c.kube_proxy && c.host_root == Some(PathBuf::from("/host")));
        // The host root only means something for kube-proxy's tools.
        assert!(Cli::try_parse_from(["ebpf-proxy", "cleanup", "--host-root=/host"]).is_err());
    }

    #[test]
    fn tc_attach_is_auto_unless_asked() {
        let cli = Cli::try_parse_from(["ebpf-proxy", "agent", "--manifests", "/tmp/x"]).unwrap();
        let Command::Agent(a) = cli.command else { panic!("not agent") };
        assert_eq!(a.tc_attach, TcAttachChoice::Auto);
        let cli =
            Cli::try_parse_from(["ebpf-proxy", "agent", "--manifests", "/tmp/x", "--tc-attach", "clsact"]).unwrap();
        let Command::Agent(a) = cli.command else { panic!("not agent") };
        assert_eq!(a.tc_attach, TcAttachChoice::Clsact);
    }

    #[test]
    fn conntrack_timeouts_parse_durations() {
        let cli = Cli::try_parse_from([
            "ebpf-proxy",
            "agent",
            "--conntrack-tcp-timeout-established",
            "2h",
            "--conntrack-udp-timeout",
            "5s",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else { panic!("not agent") };
        let t = a.conntrack.timeouts();
        assert_eq!((t.tcp_established, t.udp, t.tcp_closed), (7200, 5, 10));
        assert!(Cli::try_parse_from(["ebpf-proxy", "agent", "--conntrack-udp-timeout", "soon"]).is_err());
    }

    #[test]
    fn uplink_flags() {
        let cli = Cli::try_parse_from([
            "ebpf-proxy",
            "agent",
            "--uplink",
            "eth0,eth1",
            "--xdp-mode",
            "generic",
            "--snat-port-range",
            "62000-62999",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else { panic!("not agent") };
        assert_eq!(a.uplink, vec!["eth0", "eth1"]);
        assert_eq!(a.xdp_mode, XdpModeChoice::Generic);
        assert_eq!(a.snat_port_range, PortRange { min: 62000, max: 62999 });
        assert!(Cli::try_parse_from(["ebpf-proxy", "agent", "--snat-port-range", "9-1"]).is_err());
    }

    /// The kubectl-like flags of the listings parse, and a bad value is refused by name.
    #[test]
    fn listing_formats_and_filters() {
        let cli = Cli::try_parse_from([
            "ebpf-proxy",
            "conntrack",
            "-o",
            "wide",
            "--no-headers",
            "-n",
            "kube-system",
            "--service",
            "kube-dns",
            "--address",
            "fd00::a",
            "--port",
            "53",
            "--proto",
            "UDP",
        ])
        .unwrap();
        let Command::Conntrack(a) = cli.command else { panic!("not conntrack") };
        assert_eq!((a.show.output, a.show.no_headers), (OutputFormat::Wide, true));
        assert_eq!(a.filter.namespace.as_deref(), Some("kube-system"));
        assert_eq!(a.filter.service.as_deref(), Some("kube-dns"));
        assert_eq!(a.filter.address, Some("fd00::a".parse().unwrap()));
        assert_eq!((a.filter.port, a.filter.proto), (Some(53), Some(crate::model::Protocol::Udp)));
        for bad in [["--port", "http"], ["--address", "10.0.0"], ["--proto", "icmp"], ["-o", "xml"]] {
            let err = Cli::try_parse_from(["ebpf-proxy", "services", bad[0], bad[1]]).unwrap_err().to_string();
            assert!(err.contains(bad[0]) && err.contains(bad[1]), "{err}");
        }
        let cli =
            Cli::try_parse_from(["ebpf-proxy", "explain", "default/web", "--context", "prod", "-o", "yaml"]).unwrap();
        let Command::Explain(e) = cli.command else { panic!("not explain") };
        assert_eq!((e.source.context.as_deref(), e.output), (Some("prod"), OutputFormat::Yaml));
    }

    #[test]
    fn version_names_the_commit() {
        assert!(LONG_VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(LONG_VERSION.contains("(commit ") && LONG_VERSION.contains(", built "), "{LONG_VERSION}");
    }

    #[test]
    fn unknown_flag_is_rejected() {
        assert!(Cli::try_parse_from(["ebpf-proxy", "agent", "--no-such-flag"]).is_err());
    }
}
