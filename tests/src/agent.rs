//! Running the real `ebpf-proxy` binary inside a node namespace.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, wait_for};

/// Path of the `ebpf-proxy` binary next to the test executable (built by `cargo test
/// --workspace`; built here if missing).
pub fn ebpf_proxy_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("EBPF_PROXY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().context("exe dir")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("ebpf-proxy");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "proxy-userspace", "--bin", "ebpf-proxy"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().context("building ebpf-proxy")?;
        if !st.success() || !bin.exists() {
            bail!("cannot build {}", bin.display());
        }
    }
    Ok(bin)
}

/// Environment variable of `--socket-lb`; tests set it to `off` for every agent they start
/// unless they pass the flag (see `tests/tests/socket_lb.rs`).
pub const SOCKET_LB_ENV: &str = "EBPF_PROXY_SOCKET_LB";

/// The agent process, killed on drop.
pub struct Agent {
    pub child: Child,
    /// /healthz and /readyz.
    pub http: SocketAddr,
    /// /metrics.
    pub metrics: SocketAddr,
}

/// Where an agent started with health port `http_port` serves /metrics.
pub fn metrics_port(http_port: u16) -> u16 {
    http_port + 1000
}

/// Run a command inside `node`'s network namespace only (nsenter, not `ip netns exec`,
/// which would also remount /sys and hide bpffs).
pub fn in_netns(node: &Netns, program: &Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", node.name)).arg(program);
    cmd
}

impl Agent {
    /// `ebpf-proxy agent <args>` in `node`'s network namespace, with /healthz and /readyz
    /// on 127.0.0.1:`http_port` there and /metrics on [`metrics_port`].
    pub fn command(node: &Netns, root: &Path, http_port: u16, args: &[&str]) -> Result<Command> {
        Self::command_via(node, &[], root, http_port, args)
    }

    /// [`Agent::command`] with the binary run through `wrapper` (e.g. `setpriv ...`).
    pub fn command_via(node: &Netns, wrapper: &[&str], root: &Path, http_port: u16, args: &[&str]) -> Result<Command> {
        let bin = ebpf_proxy_bin()?;
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = in_netns(node, Path::new(first));
                c.args(rest).arg(&bin);
                c
            }
            None => in_netns(node, &bin),
        };
        cmd.arg("agent")
            .arg("--bpffs-root")
            .arg(root)
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", metrics_port(http_port)));
        // Tests' default coalescing delay, unless the caller sets its own (clap refuses a
        // flag given twice).
        if !args.contains(&"--sync-delay-ms") {
            cmd.arg("--sync-delay-ms").arg("10");
        }
        cmd.args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            // Socket-level load balancing attaches to a cgroup: never the machine's own root
            // from a test. Tests that exercise it pass `--socket-lb` and a test cgroup.
            .env(SOCKET_LB_ENV, "off")
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// Start `ebpf-proxy agent <args>` in `node`'s network namespace (see [`Agent::command`]).
    pub fn start(node: &Netns, root: &Path, http_port: u16, args: &[&str]) -> Result<Agent> {
        Self::start_via(node, &[], root, http_port, args)
    }

    /// [`Agent::start`] through `wrapper` (see [`Agent::command_via`]).
    pub fn start_via(node: &Netns, wrapper: &[&str], root: &Path, http_port: u16, args: &[&str]) -> Result<Agent> {
        let child = Self::command_via(node, wrapper, root, http_port, args)?.spawn().context("starting the agent")?;
        Ok(Agent {
            child,
            http: ([127, 0, 0, 1], http_port).into(),
            metrics: ([127, 0, 0, 1], metrics_port(http_port)).into(),
        })
    }

    /// The agent's PID (nsenter execs it: same process).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for /readyz = 200.
    pub fn wait_ready(&self, node: &Netns, timeout: Duration) -> Result<()> {
        let http = self.http;
        node.run(|| wait_for(timeout, "agent /readyz", || http_get(http, "/readyz").ok().filter(|(c, _)| *c == 200)))
            .map(|_| ())
    }

    /// A counter or gauge from /metrics (first sample whose name matches exactly).
    pub fn metric(&self, node: &Netns, name: &str) -> Result<f64> {
        let addr = self.metrics;
        let (_, body) = node.run(|| http_get(addr, "/metrics"))?;
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == name).then(|| v.parse().ok()).flatten()
            })
            .with_context(|| format!("metric {name} not in /metrics"))
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Minimal HTTP/1.0 GET (call from inside the namespace): (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("status line")?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// Run the CLI (`ebpf-proxy <args>`) and return stdout.
/// A node-wide verdict counter from `ebpf-proxy stats` (table output); 0 when absent.
/// A node-wide counter in `ebpf-proxy stats`' table, summed over its family rows (the
/// PACKETS column found by its header, so a reordered table cannot be misread).
pub fn node_counter(stats: &str, verdict: &str) -> u64 {
    let Some(packets) = stats.lines().next().and_then(|h| h.split_whitespace().position(|c| c == "PACKETS")) else {
        return 0;
    };
    stats
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() > packets && cols[0] == "node" && cols[1] == verdict)
                .then(|| cols[packets].parse::<u64>().ok())?
        })
        .sum()
}

pub fn cli(args: &[&str]) -> Result<String> {
    let out = Command::new(ebpf_proxy_bin()?).args(args).output().context("running the CLI")?;
    if !out.status.success() {
        bail!("ebpf-proxy {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// YAML for a ClusterIP Service and its EndpointSlice.
pub fn service_yaml(name: &str, vip: &str, port: u16, target_port: u16, protocol: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n  ports:\n  - name: main\n    port: {port}\n    targetPort: {target_port}\n    protocol: {protocol}\n"
    )
}

pub fn slice_yaml(
    service: &str,
    slice: &str,
    endpoints: &[(&str, std::net::Ipv4Addr)],
    port: u16,
    protocol: &str,
) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n- name: main\n  port: {port}\n  protocol: {protocol}\nendpoints:\n"
    );
    for (pod, ip) in endpoints {
        s.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: node-a\n  targetRef: {{kind: Pod, name: {pod}, namespace: default}}\n"
        ));
    }
    s
}

/// YAML for a Node with one InternalIP (what the agent derives NodePort and SNAT
/// addresses from).
pub fn node_yaml(name: &str, internal_ip: std::net::Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {internal_ip}\n  - type: Hostname\n    address: {name}\n"
    )
}

/// A Node with an InternalIP of each family.
pub fn node_yaml_dual(name: &str, v4: std::net::Ipv4Addr, v6: std::net::Ipv6Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n  - type: InternalIP\n    \
         address: {v4}\n  - type: InternalIP\n    address: \"{v6}\"\n  - type: Hostname\n    address: {name}\n"
    )
}

/// An EndpointSlice whose endpoints carry their node (`nodeName`), for multi-node tests.
/// `ports`: (name, port, protocol).
/// The slice's address type is the first endpoint's family.
pub fn slice_yaml_on_nodes<A: Into<std::net::IpAddr> + Copy + std::fmt::Display>(
    service: &str,
    slice: &str,
    endpoints: &[(&str, A, &str)],
    ports: &[(&str, u16, &str)],
) -> String {
    let family = match endpoints.first().map(|e| e.1.into()) {
        Some(std::net::IpAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    };
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {family}\nports:\n"
    );
    for (name, port, protocol) in ports {
        s.push_str(&format!("- name: {name}\n  port: {port}\n  protocol: {protocol}\n"));
    }
    s.push_str("endpoints:\n");
    for (pod, ip, node) in endpoints {
        s.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: {node}\n  targetRef: {{kind: Pod, name: {pod}, namespace: default}}\n"
        ));
    }
    s
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(crate::harness::unique(prefix));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    /// Write atomically (rename), so the agent never reads a half-written file.
    pub fn write(&self, name: &str, content: &str) -> Result<()> {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, self.0.join(name))?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.0.join(name))?;
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Names answering through `vip` over `n` connections from `client`.
pub fn names(client: &Netns, vip: SocketAddr, n: usize) -> std::collections::BTreeSet<String> {
    client.run(|| (0..n).filter_map(|_| crate::client::tcp_name(vip).ok()).collect())
}

/// Wait until 30 connections see exactly `want`; returns how long that took.
pub fn converge(client: &Netns, vip: SocketAddr, want: &[&str]) -> Duration {
    let want: std::collections::BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let t = std::time::Instant::now();
    if let Err(e) = wait_for(Duration::from_secs(5), "backend set", || (names(client, vip, 30) == want).then_some(())) {
        panic!("{e}: want {want:?}, see {:?}", names(client, vip, 30));
    }
    t.elapsed()
}

/// Run `action` while a bounded client loop (at most 20 s) connects through `vip`;
/// returns (succeeded, failed) connections.
pub fn under_load(client: &Netns, vip: SocketAddr, action: impl FnOnce()) -> (u32, u32) {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicU32::new(0), AtomicU32::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            client.run(|| {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                    match crate::client::tcp_name(vip) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        action();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
    });
    (ok.into_inner(), failed.into_inner())
}
