//! Network-namespace topologies for tests and benchmarks. Everything lives in namespaces
//! created here and is deleted on drop (even when a test panics); nothing touches the root
//! namespace: veth pairs are created directly inside the node namespace.
//!
//! Pod wiring (Calico-like, routed): the pod has `eth0` with a /32 and a default route via
//! 169.254.1.1, an address every host-side veth carries; the node routes each pod's /32 to
//! that pod's host-side veth (`veth<i>`, matching the agent's default pattern).
use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsFd,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::harness::unique;

pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Run `ip` with arguments; error with its stderr on failure.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Set a sysctl inside this namespace only.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec_ok(&["sysctl", "-qw", &format!("{key}={value}")])
    }

    pub fn exec_ok(&self, cmd: &[&str]) -> Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .context("ip netns exec")?;
        if !out.status.success() {
            bail!("{} in {}: {}", cmd.join(" "), self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Start a long-running process inside the namespace.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {program} in {}", self.name))
    }

    /// Run `f` on a thread that has entered this namespace: sockets it creates live here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).expect("open netns");
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

pub struct Pod {
    pub ns: Netns,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Host-side interface in the node namespace.
    pub host_if: String,
}

/// One node namespace with `n` routed pods.
pub struct Topology {
    pub node: Netns,
    pub pods: Vec<Pod>,
    children: Vec<Child>,
}

impl Topology {
    /// Pods get 10.244.<subnet>.<10+i>.
    pub fn single_node(n: usize, subnet: u8) -> Result<Self> {
        let node = Netns::new("epn-node-")?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        let mut topo = Topology { node, pods: Vec::new(), children: Vec::new() };
        for i in 0..n {
            topo.add_pod(&format!("pod{i}"), Ipv4Addr::new(10, 244, subnet, 10 + i as u8))?;
        }
        Ok(topo)
    }

    pub fn add_pod(&mut self, name: &str, addr: Ipv4Addr) -> Result<()> {
        let ns = Netns::new("epn-pod-")?;
        let host_if = format!("veth{}", self.pods.len());
        let a = addr.to_string();
        self.node.ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
        self.node.ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", &host_if])?;
        self.node.ip(&["link", "set", &host_if, "up"])?;
        self.node.sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter"), "0")?;
        ns.ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", &GATEWAY.to_string(), "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", &GATEWAY.to_string(), "dev", "eth0"])?;
        self.node.ip(&["route", "add", &format!("{a}/32"), "dev", &host_if, "src", &GATEWAY.to_string()])?;
        self.pods.push(Pod { ns, name: name.to_string(), ip: addr, host_if });
        Ok(())
    }

    /// Start `proxy-podserver` in pod `i`, answering with the pod's name on TCP and UDP.
    pub fn start_server(&mut self, server_bin: &str, i: usize, port: u16) -> Result<()> {
        let pod = &self.pods[i];
        let child = pod.ns.spawn(server_bin, &["--name", &pod.name, "--port", &port.to_string()])?;
        self.children.push(child);
        Ok(())
    }

    /// Keep a process (e.g. the agent) to be killed when the topology is dropped.
    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Poll `f` until it returns Some, or fail after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}
