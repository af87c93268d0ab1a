//! The agent's configuration, typed and checked once at start-up from the clap flags
//! (`cli::AgentArgs`): a flag that cannot be used stops the agent before anything is
//! loaded, instead of being warned about at every sync.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    cli::AgentArgs,
    dataplane::{
        DataplaneError,
        attach::ifaces::{Discovery, IfacePatterns},
        attach::{TcAttachChoice, XdpModeChoice},
        maps::loader::LoaderConfig,
        maps::node::PortRange,
        sock::SocketLbMode,
    },
    model::node::{LbMode, NodePortAddresses},
};

/// The datapath check runs at most this often: a smaller interval would only spin.
const MIN_DATAPATH_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// A flag the agent cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--nodeport-addresses: {value:?} is not a CIDR (e.g. 10.0.0.0/8 or fd00::/64) nor `primary`")]
    NodePortAddress { value: String },
    #[error("--nodeport-addresses: `primary` cannot be combined with CIDRs (got {values:?})")]
    NodePortPrimaryWithCidrs { values: Vec<String> },
    #[error("--service-cidr: {value:?} is not a CIDR (e.g. 10.96.0.0/16 or fd00:10:96::/112)")]
    ServiceCidr { value: String },
    #[error(transparent)]
    ApiServer(#[from] crate::source::apiserver::ApiServerError),
    #[error("{flag}: {source}")]
    IfacePattern {
        flag: &'static str,
        // Boxed: the error type is large and this is the rare path.
        #[source]
        source: Box<DataplaneError>,
    },
}

/// Where the objects come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectSource {
    /// `--manifests`: YAML files in this directory, reloaded on change.
    Manifests(PathBuf),
    /// The Kubernetes API, through this kubeconfig or the in-cluster / default config,
    /// at `api_server` when given (`--api-server`).
    /// `kubeconfig` may be a `:`-separated list (as KUBECONFIG); `context` picks one of its
    /// contexts.
    Kube { kubeconfig: Option<String>, context: Option<String>, api_server: Option<http::Uri> },
}

/// Everything `agent::run` needs, built once by [`AgentConfig::from_args`].
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `--node-name`, else the host name.
    pub node_name: String,
    pub source: ObjectSource,
    /// Pin directory, and the map sizes (`--max-services`, `--max-backends`,
    /// `--max-conntrack`).
    pub loader: LoaderConfig,
    /// `--pod-iface-pattern`.
    pub pod_ifaces: IfacePatterns,
    /// What the interface watcher follows: the pod patterns and the `--uplink` names
    /// exactly, and with `--pod-iface-detect` pod interfaces by their kind.
    pub watched_ifaces: Discovery,
    /// `--uplink`; empty: detect them.
    pub uplinks: Vec<String>,
    pub xdp_mode: XdpModeChoice,
    /// `--tc-attach`.
    pub tc_attach: TcAttachChoice,
    pub snat_port_range: PortRange,
    /// `--lb-mode`.
    pub lb_mode: LbMode,
    pub hairpin_address: Ipv4Addr,
    pub hairpin_address6: Ipv6Addr,
    /// `--nodeport-addresses`: which local addresses serve NodePorts.
    pub nodeport_addresses: NodePortAddresses,
    /// `--nodeport-localhost`.
    pub nodeport_localhost: bool,
    pub http_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// `--metrics-per-frontend`: the per-frontend socket-LB series.
    pub metrics_per_frontend: bool,
    pub healthz_timeout: Duration,
    pub datapath_check_interval: Duration,
    /// `--verify-interval-secs`; `None` when 0 (off).
    pub verify_interval: Option<Duration>,
    pub sync_delay: Duration,
    pub ct_timeouts: proxy_common::ct::CtTimeouts,
    pub ct_gc_interval: Duration,
    pub socket_lb: SocketLbMode,
    /// `--cgroup-root`; `None`: detected at start-up.
    pub cgroup_root: Option<PathBuf>,
    /// `--lb-algorithm` (north-south default) and `--maglev-table-size`.
    pub maglev: crate::sync::MaglevConfig,
    /// `--service-cidr`: the Service CIDRs where no ServiceCIDR objects can be had.
    pub service_cidrs: Vec<crate::model::IpPrefix>,
}

impl AgentConfig {
    /// Check and convert the flags. Reads the host name when `--node-name` is not given.
    pub fn from_args(args: &AgentArgs) -> Result<Self, ConfigError> {
        let pattern_error = |e| ConfigError::IfacePattern { flag: "--pod-iface-pattern", source: Box::new(e) };
        let pod_ifaces = IfacePatterns::new(&args.pod_iface_pattern).map_err(pattern_error)?;
        // Uplinks are exact names: escaped so that a `[` in one is not a glob.
        let mut watched = args.pod_iface_pattern.clone();
        watched.extend(args.uplink.iter().map(|u| glob::Pattern::escape(u)));
        let watched_ifaces =
            Discovery { names: IfacePatterns::new(&watched).map_err(pattern_error)?, by_kind: args.pod_iface_detect };
        let source = match &args.source.manifests {
            Some(dir) => ObjectSource::Manifests(dir.clone()),
            None => ObjectSource::Kube {
                kubeconfig: args.source.kubeconfig.clone(),
                context: args.source.context.clone(),
                api_server: crate::source::apiserver::parse(args.source.api_server.as_deref().unwrap_or_default())?,
            },
        };
        Ok(AgentConfig {
            node_name: super::node_name(args.source.node_name.as_deref()),
            source,
            loader: LoaderConfig {
                bpffs_root: args.bpffs_root.clone(),
                max_services: args.max_services,
                max_backends: args.max_backends,
                max_conntrack: args.max_conntrack,
                max_source_ranges: args.max_source_ranges,
                max_maglev_slots: args.max_maglev_slots,
            },
            pod_ifaces,
            watched_ifaces,
            uplinks: args.uplink.clone(),
            xdp_mode: args.xdp_mode,
            tc_attach: args.tc_attach,
            snat_port_range: args.snat_port_range,
            lb_mode: args.lb_mode,
            hairpin_address: args.hairpin_address,
            hairpin_address6: args.hairpin_address6,
            nodeport_addresses: nodeport_addresses(&args.nodeport_addresses)?,
            nodeport_localhost: args.nodeport_localhost,
            http_addr: args.http_addr,
            metrics_addr: args.metrics_addr,
            metrics_per_frontend: args.metrics_per_frontend,
            healthz_timeout: Duration::from_secs(args.healthz_timeout_secs),
            datapath_check_interval: Duration::from_millis(args.datapath_check_interval_ms)
                .max(MIN_DATAPATH_CHECK_INTERVAL),
            verify_interval: (args.verify_interval_secs > 0).then(|| Duration::from_secs(args.verify_interval_secs)),
            sync_delay: Duration::from_millis(args.sync_delay_ms),
            ct_timeouts: args.conntrack.timeouts(),
            ct_gc_interval: args.conntrack.conntrack_gc_interval,
            socket_lb: args.socket_lb,
            cgroup_root: args.cgroup_root.clone(),
            maglev: crate::sync::MaglevConfig { table_size: args.maglev_table_size, north_south: args.lb_algorithm },
            service_cidrs: service_cidrs(&args.service_cidr)?,
        })
    }

    pub fn bpffs_root(&self) -> &std::path::Path {
        &self.loader.bpffs_root
    }
}

/// `--nodeport-addresses` (the agent's, and `verify`'s of the same name): nothing (or only
/// empty values, e.g. an empty ConfigMap key) is every local address; `primary` alone is
/// the node's primary IPs (upstream refuses it beside CIDRs: "can't use both 'primary' and
/// CIDRs"); otherwise CIDRs, and anything that is not one is an error.
pub fn nodeport_addresses(values: &[String]) -> Result<NodePortAddresses, ConfigError> {
    let values: Vec<&str> = values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()).collect();
    if values.contains(&PRIMARY) {
        return match values.as_slice() {
            [_] => Ok(NodePortAddresses::Primary),
            _ => Err(ConfigError::NodePortPrimaryWithCidrs { values: values.iter().map(|v| v.to_string()).collect() }),
        };
    }
    if values.is_empty() {
        return Ok(NodePortAddresses::All);
    }
    cidrs(values, |value| ConfigError::NodePortAddress { value }).map(NodePortAddresses::Cidrs)
}

/// `--service-cidr`: CIDRs of either family (empty values ignored, e.g. an empty ConfigMap
/// key); anything else is an error naming it.
pub fn service_cidrs(values: &[String]) -> Result<Vec<crate::model::IpPrefix>, ConfigError> {
    cidrs(values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()), |value| ConfigError::ServiceCidr { value })
}

/// A list flag's CIDRs; the first that is not one is the error `bad` names.
fn cidrs<'a>(
    values: impl IntoIterator<Item = &'a str>,
    bad: fn(String) -> ConfigError,
) -> Result<Vec<crate::model::IpPrefix>, ConfigError> {
    values.into_iter().map(|v| v.parse().map_err(|_| bad(v.to_string()))).collect()
}

/// kube-proxy's special `--nodeport-addresses` value (`NodePortAddressesPrimary`).
const PRIMARY: &str = "primary";

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn config(flags: &[&str]) -> Result<AgentConfig, ConfigError> {
        let argv = ["ebpf-proxy", "agent", "--manifests", "/tmp/x", "--node-name", "n1"];
        let cli = Cli::try_parse_from(argv.iter().chain(flags)).unwrap();
        let Command::Agent(a) = cli.command else { panic!("not agent") };
        AgentConfig::from_args(&a)
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.source, ObjectSource::Manifests("/tmp/x".into()));
        assert_eq!(c.nodeport_addresses, NodePortAddresses::All);
        assert!(c.uplinks.is_empty());
        assert!(c.pod_ifaces.matches("veth1234") && !c.pod_ifaces.matches("eth0"));
        assert!(c.watched_ifaces.by_kind);
        assert!(!config(&["--pod-iface-detect=false"]).unwrap().watched_ifaces.by_kind);
        assert_eq!(c.verify_interval, Some(Duration::from_secs(60)));
        assert_eq!(c.datapath_check_interval, Duration::from_secs(1));
        assert_eq!(c.ct_timeouts, proxy_common::ct::CtTimeouts::default());
    }

    /// `--service-cidr`: both families, comma lists and repeats; a bad one names itself.
    #[test]
    fn service_cidrs_are_parsed() {
        let c = config(&["--service-cidr", "10.96.0.0/16,fd00:10:96::/112", "--service-cidr", "172.30.0.0/16"])
            .expect("valid");
        let want: Vec<crate::model::IpPrefix> =
            ["10.96.0.0/16", "fd00:10:96::/112", "172.30.0.0/16"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(c.service_cidrs, want);
        assert!(config(&[]).expect("defaults").service_cidrs.is_empty());
        let Err(err) = config(&["--service-cidr", "10.96.0.0/16,10.96.0.0"]) else { panic!("accepted a bad CIDR") };
        let err = err.to_string();
        assert!(err.contains("--service-cidr") && err.contains("\"10.96.0.0\""), "{err}");
    }

    #[test]
    fn nodeport_addresses_are_parsed_once() {
        let c = config(&["--nodeport-addresses", "192.168.001.000/24,fd00::/64,"]).unwrap();
        let want = vec!["192.168.1.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()];
        assert_eq!(c.nodeport_addresses, NodePortAddresses::Cidrs(want));
        // An empty value (an empty ConfigMap key) is the default: every local address.
        assert_eq!(config(&["--nodeport-addresses="]).unwrap().nodeport_addresses, NodePortAddresses::All);
    }

    /// `primary` alone, as upstream; beside a CIDR it is an error naming both.
    #[test]
    fn nodeport_addresses_primary() {
        let c = config(&["--nodeport-addresses", "primary"]).unwrap();
        assert_eq!(c.nodeport_addresses, NodePortAddresses::Primary);
        let msg = config(&["--nodeport-addresses", "primary,10.0.0.0/8"]).unwrap_err().to_string();
        assert!(msg.contains("--nodeport-addresses") && msg.contains("primary") && msg.contains("10.0.0.0/8"), "{msg}");
        assert!(nodeport_addresses(&["Primary".into()]).is_err(), "upstream's value is lower case");
    }

    /// A bad CIDR stops the agent, and the error names the flag and the value.
    #[test]
    fn bad_nodeport_address_is_an_error_naming_flag_and_value() {
        let e = config(&["--nodeport-addresses", "10.0.0.0/8,nonsense"]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("--nodeport-addresses") && msg.contains("\"nonsense\""), "{msg}");
        assert!(nodeport_addresses(&["10.0.0.0/33".into()]).is_err());
    }

    #[test]
    fn bad_interface_pattern_is_an_error_naming_the_flag() {
        let msg = config(&["--pod-iface-pattern", "veth[*"]).unwrap_err().to_string();
        assert!(msg.starts_with("--pod-iface-pattern"), "{msg}");
    }

    /// An uplink name is matched exactly, not as a pattern.
    #[test]
    fn uplinks_are_watched_by_exact_name() {
        let c = config(&["--uplink", "eth[0]"]).unwrap();
        assert!(c.watched_ifaces.names.matches("eth[0]") && !c.watched_ifaces.names.matches("eth0"));
        assert!(c.watched_ifaces.names.matches("veth1"));
    }

    #[test]
    fn intervals() {
        let c = config(&["--verify-interval-secs", "0", "--datapath-check-interval-ms", "1"]).unwrap();
        assert_eq!(c.verify_interval, None);
        assert_eq!(c.datapath_check_interval, MIN_DATAPATH_CHECK_INTERVAL);
    }
}
