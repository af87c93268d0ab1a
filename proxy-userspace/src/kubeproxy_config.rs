//! `--config FILE`: kube-proxy's own configuration file (`KubeProxyConfiguration`,
//! kubeproxy.config.k8s.io/v1alpha1), so a cluster's existing kube-proxy ConfigMap can be
//! mounted as is. Each field that has a meaning here becomes the agent flag of the same
//! meaning; the others are listed as ignored (logged at start), never silently dropped.
//!
//! Precedence: a flag given on the command line wins over the file. kube-proxy instead
//! ignores most flags when `--config` is set; here nothing given explicitly is ignored.
//!
//! The file is turned into flags and the command line parsed again with them appended, so
//! a value from the file is checked by exactly the parser of its flag, and an error names
//! the flag.
use std::{collections::BTreeMap, ffi::OsString, path::Path};

use clap::{CommandFactory, FromArgMatches, parser::ValueSource};
use serde::Deserialize;

use crate::cli::Cli;

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("--config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--config {path}: not a KubeProxyConfiguration: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error(
        "--config {path}: kind {kind:?}, apiVersion {api_version:?}: expected KubeProxyConfiguration, kubeproxy.config.k8s.io/v1alpha1"
    )]
    Kind { path: String, kind: String, api_version: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientConnection {
    kubeconfig: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Conntrack {
    max_per_core: Option<u64>,
    min: Option<u64>,
    tcp_established_timeout: Option<String>,
    tcp_close_wait_timeout: Option<String>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Logging {
    format: Option<String>,
    verbosity: Option<u32>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Linux {
    conntrack: Option<Conntrack>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Iptables {
    localhost_node_ports: Option<bool>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

/// The fields of `KubeProxyConfiguration` that apply; everything else lands in `other`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    kind: Option<String>,
    api_version: Option<String>,
    client_connection: Option<ClientConnection>,
    hostname_override: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    mode: Option<String>,
    iptables: Option<Iptables>,
    conntrack: Option<Conntrack>,
    linux: Option<Linux>,
    logging: Option<Logging>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

/// What a configuration file says, as agent flags, and what it says that does not apply.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Translated {
    /// (clap argument id, `--flag=value`).
    pub flags: Vec<(&'static str, String)>,
    /// Dotted field names the agent ignores (the proxy mode, iptables/IPVS tuning...).
    pub ignored: Vec<String>,
}

/// A kube-proxy bind address: `IP:PORT`, or a bare IP with kube-proxy's default port.
fn bind_address(v: &str, default_port: u16) -> String {
    match v.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, default_port).to_string(),
        Err(_) => v.to_string(),
    }
}

/// Non-empty, non-zero settings only: kube-proxy treats "" and 0 as "leave as is".
fn set(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty() && *s != "0s" && *s != "0")
}

impl KubeProxyConfiguration {
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read { path: p.clone(), source })?;
        let c: KubeProxyConfiguration =
            serde_yaml::from_str(&text).map_err(|source| ConfigFileError::Parse { path: p.clone(), source })?;
        let (kind, api_version) = (c.kind.clone().unwrap_or_default(), c.api_version.clone().unwrap_or_default());
        if kind != "KubeProxyConfiguration" || !api_version.starts_with("kubeproxy.config.k8s.io/") {
            return Err(ConfigFileError::Kind { path: p, kind, api_version });
        }
        Ok(c)
    }

    /// The flags this configuration stands for on a node with `cpus` CPUs.
    pub fn translate(&self, cpus: u64) -> Translated {
        let mut t = Translated::default();
        let mut flag = |id: &'static str, name: &str, value: &str| t.flags.push((id, format!("--{name}={value}")));
        if let Some(k) = self.client_connection.as_ref().and_then(|c| c.kubeconfig.as_deref()).filter(|k| !k.is_empty())
        {
            flag("kubeconfig", "kubeconfig", k);
        }
        if let Some(h) = set(&self.hostname_override) {
            flag("node_name", "node-name", h);
        }
        if let Some(a) = set(&self.healthz_bind_address) {
            flag("http_addr", "http-addr", &bind_address(a, 10256));
        }
        if let Some(a) = set(&self.metrics_bind_address) {
            flag("metrics_addr", "metrics-addr", &bind_address(a, 10249));
        }
        if let Some(n) = self.node_port_addresses.as_ref().filter(|n| !n.is_empty()) {
            flag("nodeport_addresses", "nodeport-addresses", &n.join(","));
        }
        // NodePorts on 127.0.0.1: the iptables mode (the default mode) serves them unless
        // `iptables.localhostNodePorts: false`; the nftables mode never does. The agent's
        // default is the iptables mode's, so only a node that did not serve them says so.
        let iptables = self.iptables.as_ref();
        let localhost = match self.mode.as_deref().map(str::trim) {
            Some("nftables") => Some(false),
            Some("" | "iptables") | None => iptables.and_then(|i| i.localhost_node_ports),
            Some(_) => None,
        };
        if let Some(on) = localhost {
            flag("nodeport_localhost", "nodeport-localhost", &on.to_string());
        }
        if let Some(i) = iptables {
            t.ignored.extend(i.other.keys().map(|k| format!("iptables.{k}")));
        }
        // The mode itself is not carried over (this agent is no proxy mode); only what it
        // says of localhost NodePorts, above.
        if self.mode.is_some() {
            t.ignored.push("mode".into());
        }
        // v1alpha1 has `conntrack` at the top; newer files nest it under `linux`.
        let ct = self.linux.as_ref().and_then(|l| l.conntrack.as_ref()).or(self.conntrack.as_ref());
        if let Some(ct) = ct {
            // netfilter's limit counts flows; the map holds two entries per flow.
            let per_core = ct.max_per_core.unwrap_or(0);
            if per_core > 0 {
                let flows = (per_core * cpus).max(ct.min.unwrap_or(0));
                flag("max_conntrack", "max-conntrack", &(flows.saturating_mul(2).min(u64::from(u32::MAX))).to_string());
            }
            for (id, name, v) in [
                ("conntrack_tcp_timeout_established", "conntrack-tcp-timeout-established", &ct.tcp_established_timeout),
                ("conntrack_tcp_timeout_close_wait", "conntrack-tcp-timeout-close-wait", &ct.tcp_close_wait_timeout),
                ("conntrack_udp_timeout", "conntrack-udp-timeout", &ct.udp_timeout),
                ("conntrack_udp_timeout_stream", "conntrack-udp-timeout-stream", &ct.udp_stream_timeout),
            ] {
                if let Some(v) = set(v) {
                    flag(id, name, v);
                }
            }
            t.ignored.extend(ct.other.keys().map(|k| format!("conntrack.{k}")));
        }
        if let Some(l) = &self.logging {
            if let Some(f) = l.format.as_deref().filter(|f| !f.is_empty()) {
                flag("log_format", "log-format", f);
            }
            if let Some(v) = l.verbosity {
                flag("verbosity", "v", &v.to_string());
            }
            t.ignored.extend(l.other.keys().map(|k| format!("logging.{k}")));
        }
        if let Some(c) = &self.client_connection {
            t.ignored.extend(c.other.keys().map(|k| format!("clientConnection.{k}")));
        }
        if let Some(l) = &self.linux {
            t.ignored.extend(l.other.keys().map(|k| format!("linux.{k}")));
        }
        t.ignored.extend(self.other.keys().cloned());
        t
    }
}

/// Parse the command line; with `agent --config FILE`, the file's settings fill in every
/// flag the command line did not give. Returns the CLI and the fields the file sets that
/// do not apply (the agent logs them once logging is up).
pub fn parse_args(argv: Vec<OsString>) -> Result<(Cli, Vec<String>), anyhow::Error> {
    let matches = Cli::command().try_get_matches_from(&argv).unwrap_or_else(|e| e.exit());
    let Some(("agent", sub)) = matches.subcommand() else {
        return Ok((Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()), Vec::new()));
    };
    let Some(path) = sub.get_one::<std::path::PathBuf>("config").cloned() else {
        return Ok((Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()), Vec::new()));
    };
    let file = KubeProxyConfiguration::load(&path)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let t = file.translate(cpus);
    let mut full = argv;
    for (id, f) in t.flags {
        if sub.value_source(id) != Some(ValueSource::CommandLine) {
            full.push(f.into());
        }
    }
    let cli = Cli::try_parse_from_config(full, &path)?;
    Ok((cli, t.ignored))
}

impl Cli {
    fn try_parse_from_config(argv: Vec<OsString>, path: &Path) -> Result<Cli, anyhow::Error> {
        use clap::Parser;
        Cli::try_parse_from(argv).map_err(|e| anyhow::anyhow!("--config {}: {}", path.display(), e.render()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
clusterCIDR: 10.244.0.0/16
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpTimeout: 0s
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
metricsBindAddress: 0.0.0.0
mode: iptables
nodePortAddresses: ["10.0.0.0/8"]
iptables:
  masqueradeAll: false
logging:
  format: json
  verbosity: 4
"#;

    #[test]
    fn a_kubeadm_config_becomes_the_agents_flags_and_names_what_it_ignores() {
        let c: KubeProxyConfiguration = serde_yaml::from_str(KUBEADM).unwrap();
        let t = c.translate(2);
        let flags: Vec<&str> = t.flags.iter().map(|(_, f)| f.as_str()).collect();
        assert_eq!(
            flags,
            [
                "--kubeconfig=/var/lib/kube-proxy/kubeconfig.conf",
                "--http-addr=0.0.0.0:10256",
                "--metrics-addr=0.0.0.0:10249",
                "--nodeport-addresses=10.0.0.0/8",
                // max(32768 x 2 cores, 131072) flows, two entries each.
                "--max-conntrack=262144",
                "--conntrack-tcp-timeout-established=24h0m0s",
                "--conntrack-tcp-timeout-close-wait=1h0m0s",
                "--log-format=json",
                "--v=4",
            ]
        );
        assert_eq!(t.ignored, ["iptables.masqueradeAll", "mode", "clientConnection.qps", "bindAddress", "clusterCIDR"]);
    }

    /// NodePorts on localhost as the node served them: the iptables mode's
    /// `localhostNodePorts` (default true, the agent's default too), never in nftables mode.
    #[test]
    fn localhost_node_ports_follow_the_mode() {
        let flags = |body: &str| {
            let text = format!("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{body}");
            let c: KubeProxyConfiguration = serde_yaml::from_str(&text).unwrap();
            c.translate(1).flags.into_iter().map(|(_, f)| f).collect::<Vec<_>>()
        };
        let off = ["--nodeport-localhost=false".to_string()];
        assert_eq!(flags("mode: iptables\niptables:\n  localhostNodePorts: false\n"), off);
        assert_eq!(flags("iptables:\n  localhostNodePorts: false\n"), off, "iptables is the default mode");
        assert_eq!(flags("mode: nftables\n"), off);
        assert_eq!(flags("mode: iptables\niptables:\n  localhostNodePorts: true\n"), ["--nodeport-localhost=true"]);
        assert!(flags("mode: iptables\n").is_empty(), "the default stays the agent's");
        assert!(flags("mode: ipvs\niptables:\n  localhostNodePorts: false\n").is_empty(), "not the iptables mode");
    }

    /// kube-proxy's flag names are accepted for the same settings.
    #[test]
    fn kube_proxy_flag_names_are_aliases() {
        let argv = [
            "ebpf-proxy",
            "agent",
            "--metrics-bind-address=0.0.0.0:10249",
            "--healthz-bind-address=127.0.0.1:10256",
            "--hostname-override=node-a",
            "--master=https://10.0.0.1:6443",
            "--logging-format=json",
            "--v=4",
            "--conntrack-tcp-timeout-close-wait=30m",
        ]
        .map(OsString::from);
        let (cli, _) = parse_args(argv.into()).unwrap();
        let crate::cli::Command::Agent(a) = cli.command else { panic!("not agent") };
        assert_eq!(a.metrics_addr, "0.0.0.0:10249".parse().unwrap());
        assert_eq!(a.http_addr, "127.0.0.1:10256".parse().unwrap());
        assert_eq!(a.source.node_name.as_deref(), Some("node-a"));
        assert_eq!(a.source.api_server.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(a.log_format, crate::cli::LogFormat::Json);
        assert_eq!(a.log_filter().as_deref(), Some("debug"));
        assert_eq!(a.conntrack.conntrack_tcp_timeout_close_wait, std::time::Duration::from_secs(1800));
    }

    /// `nodePortAddresses: [primary]` (kube-proxy >= 1.29) means what the flag's `primary`
    /// means; beside a CIDR it is refused naming the flag, as upstream's validation does.
    #[test]
    fn node_port_addresses_primary_from_the_file() {
        let file = |v: &str| {
            format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nnodePortAddresses: {v}\n"
            )
        };
        let c: KubeProxyConfiguration = serde_yaml::from_str(&file("[primary]")).unwrap();
        let flags: Vec<String> = c.translate(1).flags.into_iter().map(|(_, f)| f).collect();
        assert_eq!(flags, ["--nodeport-addresses=primary"]);
        let dir = std::env::temp_dir().join(format!("epx-kpc-primary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.conf");
        let parse = |content: &str| {
            std::fs::write(&path, content).unwrap();
            let argv: Vec<OsString> =
                ["ebpf-proxy", "agent", "--node-name", "n1", "--config"].map(OsString::from).into();
            let (cli, _) = parse_args(argv.into_iter().chain([path.clone().into()]).collect())?;
            let crate::cli::Command::Agent(a) = cli.command else { panic!("not agent") };
            Ok::<_, anyhow::Error>(crate::agent::config::AgentConfig::from_args(&a)?.nodeport_addresses)
        };
        use crate::model::node::NodePortAddresses;
        assert_eq!(parse(&file("[primary]")).unwrap(), NodePortAddresses::Primary);
        assert_eq!(parse(&file("[]")).unwrap(), NodePortAddresses::All);
        let e = parse(&file("[primary, 10.0.0.0/8]")).unwrap_err().to_string();
        assert!(e.contains("--nodeport-addresses") && e.contains("primary"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_file_fills_in_what_the_command_line_does_not_give() {
        let dir = std::env::temp_dir().join(format!("epx-kpc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.conf");
        std::fs::write(&path, KUBEADM).unwrap();
        let argv = |extra: &[&str]| {
            let mut v: Vec<OsString> = ["ebpf-proxy", "agent", "--config"].map(OsString::from).into();
            v.push(path.clone().into());
            v.extend(extra.iter().map(OsString::from));
            v
        };
        let (cli, ignored) = parse_args(argv(&["--log-format", "text"])).unwrap();
        let crate::cli::Command::Agent(a) = cli.command else { panic!("not agent") };
        assert_eq!(a.log_format, crate::cli::LogFormat::Text, "the command line wins");
        assert_eq!(a.metrics_addr, "0.0.0.0:10249".parse().unwrap(), "the file fills in");
        assert_eq!(a.max_conntrack, 262144);
        assert_eq!(a.conntrack.conntrack_tcp_timeout_close_wait, std::time::Duration::from_secs(3600));
        assert_eq!(a.verbosity, Some(4));
        assert!(ignored.contains(&"mode".to_string()));

        std::fs::write(&path, "apiVersion: v1\nkind: ConfigMap\n").unwrap();
        let e = parse_args(argv(&[])).unwrap_err().to_string();
        assert!(e.contains("expected KubeProxyConfiguration"), "{e}");
        std::fs::write(&path, KUBEADM.replace("0.0.0.0:10256", "not-an-address")).unwrap();
        let e = parse_args(argv(&[])).unwrap_err().to_string();
        assert!(e.contains("--config") && e.contains("--http-addr"), "names the file and the flag: {e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
