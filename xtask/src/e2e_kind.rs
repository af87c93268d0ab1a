//! `cargo xtask e2e-kind`: the agent on a real cluster without kube-proxy.
//!
//! Creates a kind cluster (`manifests/kind/cluster.yaml`: kubeProxyMode none, one
//! control-plane and two workers), builds the image from the `Dockerfile` and `kind load`s
//! it, renders `manifests/` with Kustomize, points it at the local image and the API server
//! (nothing serves the `kubernetes` ClusterIP before the agent runs), applies it, waits for
//! the DaemonSet, deploys `manifests/kind/workloads.yaml`, and runs the connectivity
//! matrix. Prints a pass/fail table, saves agent logs and `ebpf-proxy services` output
//! under `target/e2e-kind/` when a check fails, and deletes the cluster
//! (`E2E_KIND_KEEP=1` keeps it for debugging).
//!
//! Without docker, kind or kubectl on PATH, or without a reachable Docker engine, it prints
//! `e2e-kind: SKIP: <reason>` and exits 0. The decisions and formatting are pure functions
//! below, unit-tested by `cargo test -p xtask`.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_yaml::{Mapping, Value};

use crate::{run, workspace_root};

pub const CLUSTER: &str = "ebpf-proxy-e2e";
/// Built locally and `kind load`ed: never pulled.
pub const IMAGE: &str = "ebpf-proxy:e2e";
const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.52";
const AGENT_NS: &str = "ebpf-proxy";
const AGENT_SELECTOR: &str = "app.kubernetes.io/name=ebpf-proxy";
const TEST_NS: &str = "e2e";
const REQUIRED_TOOLS: [&str; 3] = ["docker", "kind", "kubectl"];
/// The kind docker network, where "outside the cluster" clients run.
const KIND_NETWORK: &str = "kind";
const NODEPORT: u16 = 30080;
const NODEPORT_LOCAL: u16 = 30081;

// ---------------------------------------------------------------------------------------
// Preflight

/// What the host has. A trait so the skip decisions are tested without the host's tools.
pub trait Host {
    fn has(&self, tool: &str) -> bool;
    /// Ok when a Docker engine answers (`docker info`).
    fn docker_engine(&self) -> Result<(), String>;
}

/// The real host, looking tools up in `path` (a PATH-style list).
pub struct RealHost {
    pub path: OsString,
}

impl RealHost {
    pub fn from_env() -> Self {
        Self { path: std::env::var_os("PATH").unwrap_or_default() }
    }

    fn find(&self, tool: &str) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        std::env::split_paths(&self.path)
            .map(|d| d.join(tool))
            .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
    }
}

impl Host for RealHost {
    fn has(&self, tool: &str) -> bool {
        self.find(tool).is_some()
    }

    fn docker_engine(&self) -> Result<(), String> {
        let docker = self.find("docker").ok_or("docker not found")?;
        let out = Command::new(docker)
            .args(["info", "--format", "{{.ServerVersion}}"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() && !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err.lines().find(|l| !l.trim().is_empty()).unwrap_or("docker info failed").trim().to_string())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Preflight {
    Ready,
    Skip(String),
}

pub fn preflight(host: &impl Host) -> Preflight {
    let missing: Vec<&str> = REQUIRED_TOOLS.iter().copied().filter(|t| !host.has(t)).collect();
    if !missing.is_empty() {
        return Preflight::Skip(format!(
            "{} not found on PATH; the kind e2e needs docker (with a running engine), kind and kubectl (see docs/deploy.md)",
            missing.join(", ")
        ));
    }
    if let Err(e) = host.docker_engine() {
        return Preflight::Skip(format!("`docker info` failed, no Docker engine to run kind on: {e}"));
    }
    Preflight::Ready
}

// ---------------------------------------------------------------------------------------
// Manifest patching

/// What the kind run changes in the rendered base.
#[derive(Debug, Clone)]
pub struct KindPatch {
    pub image: String,
    pub image_pull_policy: String,
    /// The API server's real address, for the agent's in-cluster config: without kube-proxy
    /// the `kubernetes` ClusterIP works only once the agent runs.
    pub api_server: Option<(String, u16)>,
}

fn key(s: &str) -> Value {
    Value::String(s.to_string())
}

/// Set `name` in a container's env list, replacing an existing entry.
fn upsert_env(container: &mut Mapping, name: &str, value: &str) {
    let env = container.entry(key("env")).or_insert_with(|| Value::Sequence(Vec::new()));
    if !env.is_sequence() {
        *env = Value::Sequence(Vec::new());
    }
    let list = env.as_sequence_mut().expect("a sequence");
    let mut entry = Mapping::new();
    entry.insert(key("name"), key(name));
    entry.insert(key("value"), key(value));
    match list.iter_mut().find(|e| e.get("name").and_then(Value::as_str) == Some(name)) {
        Some(e) => *e = Value::Mapping(entry),
        None => list.push(Value::Mapping(entry)),
    }
}

/// Apply `patch` to the agent container of the DaemonSet in a multi-document YAML stream
/// (`kubectl kustomize` output); other documents pass through unchanged.
pub fn patch_rendered(yaml: &str, patch: &KindPatch) -> Result<String> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    let mut patched = 0;
    for d in serde_yaml::Deserializer::from_str(yaml) {
        let mut v = Value::deserialize(d).context("parsing the rendered manifests")?;
        if v.is_null() {
            continue;
        }
        if v.get("kind").and_then(Value::as_str) == Some("DaemonSet") {
            let containers = v
                .get_mut("spec")
                .and_then(|s| s.get_mut("template"))
                .and_then(|t| t.get_mut("spec"))
                .and_then(|s| s.get_mut("containers"))
                .and_then(Value::as_sequence_mut)
                .ok_or_else(|| anyhow!("DaemonSet without spec.template.spec.containers"))?;
            let agent = containers
                .iter_mut()
                .find(|c| c.get("name").and_then(Value::as_str) == Some("agent"))
                .and_then(Value::as_mapping_mut)
                .ok_or_else(|| anyhow!("DaemonSet without an `agent` container"))?;
            agent.insert(key("image"), key(&patch.image));
            agent.insert(key("imagePullPolicy"), key(&patch.image_pull_policy));
            if let Some((host, port)) = &patch.api_server {
                upsert_env(agent, "KUBERNETES_SERVICE_HOST", host);
                upsert_env(agent, "KUBERNETES_SERVICE_PORT", &port.to_string());
            }
            patched += 1;
        }
        docs.push(serde_yaml::to_string(&v)?);
    }
    if patched != 1 {
        bail!("expected one DaemonSet in the rendered manifests, found {patched}");
    }
    Ok(docs.join("---\n"))
}

// ---------------------------------------------------------------------------------------
// Requests and their verdicts

/// One request's outcome: the answering pod's name, or a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Pod(String),
    Failed,
}

const FAIL_MARK: &str = "!FAIL";

fn one_request(url: &str, timeout_s: u32) -> String {
    format!("r=$(curl -fsS --max-time {timeout_s} {url} 2>/dev/null) && echo \"$r\" || echo '{FAIL_MARK}'")
}

/// A shell loop (busybox sh + curl, as in agnhost) doing `n` requests, one line each.
pub fn counted_loop(url: &str, n: u32, timeout_s: u32) -> String {
    format!("for i in $(seq 1 {n}); do {}; done", one_request(url, timeout_s))
}

/// The same for `secs` seconds, back to back.
pub fn timed_loop(url: &str, secs: u32, timeout_s: u32) -> String {
    format!(
        "end=$(($(date +%s)+{secs})); while [ \"$(date +%s)\" -lt \"$end\" ]; do {}; done",
        one_request(url, timeout_s)
    )
}

pub fn parse_replies(out: &str) -> Vec<Reply> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| if l == FAIL_MARK { Reply::Failed } else { Reply::Pod(l.to_string()) })
        .collect()
}

fn tally(replies: &[Reply]) -> (usize, BTreeMap<&str, usize>) {
    let mut failed = 0;
    let mut by_pod = BTreeMap::new();
    for r in replies {
        match r {
            Reply::Failed => failed += 1,
            Reply::Pod(p) => *by_pod.entry(p.as_str()).or_insert(0) += 1,
        }
    }
    (failed, by_pod)
}

fn all_answered(replies: &[Reply], allowed: &BTreeSet<String>) -> Result<BTreeMap<String, usize>, String> {
    if replies.is_empty() {
        return Err("no requests made".into());
    }
    let (failed, by_pod) = tally(replies);
    if failed > 0 {
        return Err(format!("{failed}/{} requests failed", replies.len()));
    }
    let strangers: Vec<&str> = by_pod.keys().copied().filter(|p| !allowed.contains(*p)).collect();
    if !strangers.is_empty() {
        return Err(format!("answered by unexpected pods {strangers:?} (expected {allowed:?})"));
    }
    Ok(by_pod.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// Every request answered by one of `pods`, spread over more than one when there are.
pub fn eval_balanced(replies: &[Reply], pods: &BTreeSet<String>) -> Result<String, String> {
    let by_pod = all_answered(replies, pods)?;
    if pods.len() > 1 && by_pod.len() < 2 {
        return Err(format!("all {} requests went to {:?}: not load-balanced", replies.len(), by_pod.keys()));
    }
    Ok(format!("{}/{} answered by {} of {} pods", replies.len(), replies.len(), by_pod.len(), pods.len()))
}

/// Every request answered, and by exactly the set `pods` (scaling reflected).
pub fn eval_exact_set(replies: &[Reply], pods: &BTreeSet<String>) -> Result<String, String> {
    let by_pod = all_answered(replies, pods)?;
    let seen: BTreeSet<String> = by_pod.into_keys().collect();
    if &seen != pods {
        let missing: Vec<&String> = pods.difference(&seen).collect();
        return Err(format!("pods never answering: {missing:?}"));
    }
    Ok(format!("{} requests answered by all {} pods", replies.len(), pods.len()))
}

/// Every request answered by the same pod.
pub fn eval_affinity(replies: &[Reply], pods: &BTreeSet<String>) -> Result<String, String> {
    let by_pod = all_answered(replies, pods)?;
    if by_pod.len() != 1 {
        return Err(format!("one client reached {} pods: {by_pod:?}", by_pod.len()));
    }
    Ok(format!("{} requests, all to {}", replies.len(), by_pod.keys().next().unwrap()))
}

/// Every request failed (the Service is gone, or no local endpoint).
pub fn eval_all_fail(replies: &[Reply]) -> Result<String, String> {
    let (failed, by_pod) = tally(replies);
    if replies.is_empty() {
        return Err("no requests made".into());
    }
    if failed != replies.len() {
        return Err(format!("{} requests still answered, by {:?}", replies.len() - failed, by_pod.keys()));
    }
    Ok(format!("{failed}/{failed} refused or timed out"))
}

/// No request failed (while agents were restarting).
pub fn eval_no_failures(replies: &[Reply], pods: &BTreeSet<String>) -> Result<String, String> {
    let by_pod = all_answered(replies, pods)?;
    Ok(format!("{} requests, 0 failed, {} pods answered", replies.len(), by_pod.len()))
}

// ---------------------------------------------------------------------------------------
// Cluster state

/// Running, not terminating pods of `kubectl get pods -o json`: name -> node.
pub fn parse_running_pods(json: &str) -> Result<BTreeMap<String, String>> {
    let v: serde_json::Value = serde_json::from_str(json).context("kubectl get pods -o json")?;
    let mut out = BTreeMap::new();
    for p in v["items"].as_array().into_iter().flatten() {
        let running = p["status"]["phase"] == "Running";
        let ready = p["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        if running && ready && p["metadata"]["deletionTimestamp"].is_null() {
            let name = p["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let node = p["spec"]["nodeName"].as_str().unwrap_or_default().to_string();
            out.insert(name, node);
        }
    }
    Ok(out)
}

/// `kubectl get nodes -o json`: name -> InternalIP.
pub fn parse_node_ips(json: &str) -> Result<BTreeMap<String, String>> {
    let v: serde_json::Value = serde_json::from_str(json).context("kubectl get nodes -o json")?;
    let mut out = BTreeMap::new();
    for n in v["items"].as_array().into_iter().flatten() {
        let ip = n["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| {
                a["type"] == "InternalIP"
                    && a["address"].as_str().is_some_and(|s| s.parse::<std::net::Ipv4Addr>().is_ok())
            })
            .and_then(|a| a["address"].as_str());
        if let (Some(name), Some(ip)) = (n["metadata"]["name"].as_str(), ip) {
            out.insert(name.to_string(), ip.to_string());
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Results

#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
    pub elapsed: Duration,
}

/// The pass/fail table, with a closing count.
pub fn format_table(results: &[CheckResult]) -> String {
    let w = results.iter().map(|r| r.name.chars().count()).max().unwrap_or(0).max("CHECK".len());
    let mut s = String::new();
    let _ = writeln!(s, "{:<w$}  {:<6}  {:>7}  DETAIL", "CHECK", "RESULT", "TIME");
    for r in results {
        let detail = r.detail.lines().next().unwrap_or("");
        let result = if r.passed { "PASS" } else { "FAIL" };
        let _ = writeln!(s, "{:<w$}  {:<6}  {:>6.1}s  {detail}", r.name, result, r.elapsed.as_secs_f64());
    }
    let passed = results.iter().filter(|r| r.passed).count();
    let _ = writeln!(s, "e2e-kind: {passed} passed, {} failed", results.len() - passed);
    s
}

// ---------------------------------------------------------------------------------------
// Driving the tools

fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(format!("after {timeout:?}: {e}")),
            Err(_) => thread::sleep(Duration::from_secs(2)),
        }
    }
}

/// The kind cluster; deleted on drop unless E2E_KIND_KEEP=1.
struct Cluster {
    kubeconfig: PathBuf,
    keep: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("e2e-kind: keeping cluster {CLUSTER} (KUBECONFIG={})", self.kubeconfig.display());
            return;
        }
        eprintln!("e2e-kind: deleting cluster {CLUSTER}");
        let _ = Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]).status();
    }
}

impl Cluster {
    fn create(root: &Path, out: &Path) -> Result<Self> {
        let kubeconfig = out.join("kubeconfig");
        // A cluster left over from an interrupted run.
        let _ = Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]).status();
        let keep = std::env::var_os("E2E_KIND_KEEP").is_some_and(|v| v == "1");
        run(Command::new("kind")
            .args(["create", "cluster", "--name", CLUSTER, "--config"])
            .arg(root.join("manifests/kind/cluster.yaml"))
            .arg("--kubeconfig")
            .arg(&kubeconfig))?;
        Ok(Self { kubeconfig, keep })
    }

    fn kubectl(&self) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }

    fn get(&self, args: &[&str]) -> Result<String> {
        capture(self.kubectl().args(args))
    }

    fn run(&self, args: &[&str]) -> Result<()> {
        run(self.kubectl().args(args))
    }

    fn echo_pods(&self) -> Result<BTreeMap<String, String>> {
        parse_running_pods(&self.get(&["-n", TEST_NS, "get", "pods", "-l", "app=echo", "-o", "json"])?)
    }

    fn pod_names(&self) -> Result<BTreeSet<String>, String> {
        self.echo_pods().map(|p| p.into_keys().collect()).map_err(|e| format!("{e:#}"))
    }

    fn cluster_ip(&self, svc: &str) -> Result<String> {
        Ok(self.get(&["-n", TEST_NS, "get", "svc", svc, "-o", "jsonpath={.spec.clusterIP}"])?.trim().to_string())
    }

    fn node_ips(&self) -> Result<BTreeMap<String, String>> {
        parse_node_ips(&self.get(&["get", "nodes", "-o", "json"])?)
    }

    /// Run `script` in the client pod (a ClusterIP client inside the cluster).
    fn requests_from_client(&self, script: &str) -> Result<Vec<Reply>, String> {
        self.get(&["-n", TEST_NS, "exec", "client", "--", "sh", "-c", script])
            .map(|o| parse_replies(&o))
            .map_err(|e| format!("{e:#}"))
    }

    fn spawn_from_client(&self, script: &str) -> Result<Child> {
        self.kubectl()
            .args(["-n", TEST_NS, "exec", "client", "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("kubectl exec")
    }

    fn scale(&self, replicas: u32) -> Result<(), String> {
        self.run(&["-n", TEST_NS, "scale", "deploy/echo", &format!("--replicas={replicas}")])
            .and_then(|()| self.run(&["-n", TEST_NS, "rollout", "status", "deploy/echo", "--timeout=180s"]))
            .map_err(|e| format!("{e:#}"))?;
        // Wait until terminating pods are gone from the list too.
        poll(Duration::from_secs(60), || {
            let n = self.pod_names()?.len();
            if n == replicas as usize { Ok(()) } else { Err(format!("{n} pods, want {replicas}")) }
        })
    }

    /// Agent logs, CLI views of the maps and the pods, saved under `out`.
    fn collect_diagnostics(&self, out: &Path) {
        let save = |name: &str, args: &[&str]| {
            let text = match capture(self.kubectl().args(args)) {
                Ok(t) => t,
                Err(e) => format!("{e:#}"),
            };
            let path = out.join(name);
            let _ = std::fs::write(&path, &text);
            eprintln!("e2e-kind: saved {}", path.display());
            text
        };
        let logs = save(
            "agent-logs.txt",
            &[
                "-n",
                AGENT_NS,
                "logs",
                "-l",
                AGENT_SELECTOR,
                "--all-containers",
                "--prefix",
                "--tail=-1",
                "--max-log-requests=10",
            ],
        );
        save(
            "agent-logs-previous.txt",
            &["-n", AGENT_NS, "logs", "-l", AGENT_SELECTOR, "--prefix", "--previous", "--tail=-1"],
        );
        save("pods.txt", &["get", "pods", "-A", "-o", "wide"]);
        save("services.txt", &["get", "svc,endpointslices", "-A", "-o", "wide"]);
        let agents = self
            .get(&["-n", AGENT_NS, "get", "pods", "-l", AGENT_SELECTOR, "-o", "jsonpath={.items[*].metadata.name}"])
            .unwrap_or_default();
        for pod in agents.split_whitespace() {
            save(&format!("{pod}-services.txt"), &["-n", AGENT_NS, "exec", pod, "--", "ebpf-proxy", "services"]);
        }
        let tail: Vec<&str> = logs.lines().rev().take(40).collect();
        eprintln!("e2e-kind: last agent log lines:");
        for l in tail.into_iter().rev() {
            eprintln!("  {l}");
        }
    }
}

fn check(results: &mut Vec<CheckResult>, name: &str, f: impl FnOnce() -> Result<String, String>) {
    let t = Instant::now();
    eprintln!("e2e-kind: check: {name}");
    let r = f();
    let (passed, detail) = match r {
        Ok(d) => (true, d),
        Err(e) => (false, e),
    };
    eprintln!("e2e-kind:   {} {detail}", if passed { "PASS" } else { "FAIL" });
    results.push(CheckResult { name: name.to_string(), passed, detail, elapsed: t.elapsed() });
}

/// Requests from a throw-away container on the kind docker network (outside the cluster).
fn from_docker_network(script: &str) -> Result<Vec<Reply>, String> {
    capture(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        KIND_NETWORK,
        "--entrypoint",
        "sh",
        AGNHOST,
        "-c",
        script,
    ]))
    .map(|o| parse_replies(&o))
    .map_err(|e| format!("{e:#}"))
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let t = Instant::now();
    eprintln!("e2e-kind: {name}...");
    f().with_context(|| format!("e2e-kind step '{name}'"))?;
    eprintln!("e2e-kind: {name}: done ({:.0?})", t.elapsed());
    Ok(())
}

fn setup_cluster(root: &Path, out: &Path) -> Result<Cluster> {
    // Build first: a broken build costs no cluster.
    step("docker build", || {
        run(Command::new("docker").args(["build", "-t", IMAGE, "-f"]).arg(root.join("Dockerfile")).arg(root))
    })?;
    step("docker pull agnhost", || run(Command::new("docker").args(["pull", "-q", AGNHOST])))?;
    let cluster = Cluster::create(root, out)?;
    step("kind load", || {
        for image in [IMAGE, AGNHOST] {
            run(Command::new("kind").args(["load", "docker-image", image, "--name", CLUSTER]))?;
        }
        Ok(())
    })?;
    step("install ebpf-proxy (kustomize)", || {
        let rendered = capture(cluster.kubectl().arg("kustomize").arg(root.join("manifests")))?;
        let cp = format!("{CLUSTER}-control-plane");
        let ips = cluster.node_ips()?;
        let api = ips.get(&cp).with_context(|| format!("no InternalIP for {cp} in {ips:?}"))?;
        let patched = patch_rendered(
            &rendered,
            &KindPatch {
                image: IMAGE.into(),
                image_pull_policy: "Never".into(),
                api_server: Some((api.clone(), 6443)),
            },
        )?;
        std::fs::write(out.join("ebpf-proxy.yaml"), &patched)?;
        let mut child = cluster.kubectl().args(["apply", "-f", "-"]).stdin(Stdio::piped()).spawn()?;
        child.stdin.take().expect("stdin").write_all(patched.as_bytes())?;
        let status = child.wait()?;
        if !status.success() {
            bail!("kubectl apply: {status}");
        }
        Ok(())
    })?;
    step("wait for the agents, the nodes and CoreDNS", || {
        cluster.run(&["-n", AGENT_NS, "rollout", "status", "ds/ebpf-proxy", "--timeout=300s"])?;
        cluster.run(&["wait", "--for=condition=Ready", "nodes", "--all", "--timeout=300s"])?;
        cluster.run(&["-n", "kube-system", "rollout", "status", "deploy/coredns", "--timeout=300s"])
    })?;
    step("deploy test workloads", || {
        cluster.run(&["apply", "-f", &root.join("manifests/kind/workloads.yaml").to_string_lossy()])?;
        cluster.run(&["-n", TEST_NS, "rollout", "status", "deploy/echo", "--timeout=300s"])?;
        cluster.run(&["-n", TEST_NS, "wait", "--for=condition=Ready", "pod/client", "--timeout=300s"])
    })?;
    Ok(cluster)
}

fn matrix(c: &Cluster) -> Vec<CheckResult> {
    let mut results = Vec::new();
    let url = |ip: &str, port: u16| format!("http://{ip}:{port}/hostname");
    let ip_of = |svc: &str| c.cluster_ip(svc).map_err(|e| format!("{e:#}"));

    check(&mut results, "ClusterIP from a pod", || {
        let ip = ip_of("echo")?;
        let pods = c.pod_names()?;
        poll(Duration::from_secs(30), || {
            eval_balanced(&c.requests_from_client(&counted_loop(&url(&ip, 80), 30, 2))?, &pods)
        })
    });

    check(&mut results, "NodePort from the docker network", || {
        let pods = c.pod_names()?;
        let nodes = c.node_ips().map_err(|e| format!("{e:#}"))?;
        let mut details = Vec::new();
        for (node, ip) in &nodes {
            let d = poll(Duration::from_secs(30), || {
                eval_balanced(&from_docker_network(&counted_loop(&url(ip, NODEPORT), 20, 2))?, &pods)
            })
            .map_err(|e| format!("{node}: {e}"))?;
            details.push(format!("{node}: {d}"));
        }
        Ok(details.join("; "))
    });

    check(&mut results, "sessionAffinity ClientIP", || {
        let ip = ip_of("echo-affinity")?;
        let pods = c.pod_names()?;
        poll(Duration::from_secs(30), || {
            eval_affinity(&c.requests_from_client(&counted_loop(&url(&ip, 80), 20, 2))?, &pods)
        })
    });

    check(&mut results, "externalTrafficPolicy Local", || {
        let pods = c.echo_pods().map_err(|e| format!("{e:#}"))?;
        let nodes = c.node_ips().map_err(|e| format!("{e:#}"))?;
        let mut details = Vec::new();
        for (node, ip) in &nodes {
            let local: BTreeSet<String> = pods.iter().filter(|(_, n)| *n == node).map(|(p, _)| p.clone()).collect();
            let script = counted_loop(&url(ip, NODEPORT_LOCAL), 10, 2);
            let d = if local.is_empty() {
                poll(Duration::from_secs(30), || eval_all_fail(&from_docker_network(&script)?))
            } else {
                poll(Duration::from_secs(30), || {
                    all_answered(&from_docker_network(&script)?, &local).map(|_| "only local pods".into())
                })
            };
            details.push(format!("{node} ({} local): {}", local.len(), d.map_err(|e| format!("{node}: {e}"))?));
        }
        Ok(details.join("; "))
    });

    check(&mut results, "scale 3 -> 5 -> 1 reflected", || {
        let ip = ip_of("echo")?;
        let mut details = Vec::new();
        for (replicas, requests) in [(5, 80), (1, 20)] {
            c.scale(replicas)?;
            let pods = c.pod_names()?;
            let d = poll(Duration::from_secs(60), || {
                eval_exact_set(&c.requests_from_client(&counted_loop(&url(&ip, 80), requests, 2))?, &pods)
            })
            .map_err(|e| format!("at {replicas} replicas: {e}"))?;
            details.push(format!("{replicas}: {d}"));
        }
        c.scale(3)?;
        Ok(details.join("; "))
    });

    check(&mut results, "agent restart without failed requests", || {
        let ip = ip_of("echo")?;
        let pods = c.pod_names()?;
        let t = Instant::now();
        let load = c.spawn_from_client(&timed_loop(&url(&ip, 80), 60, 2)).map_err(|e| format!("{e:#}"))?;
        thread::sleep(Duration::from_secs(5));
        let restart = c
            .run(&["-n", AGENT_NS, "delete", "pod", "-l", AGENT_SELECTOR, "--wait=true"])
            .and_then(|()| c.run(&["-n", AGENT_NS, "rollout", "status", "ds/ebpf-proxy", "--timeout=120s"]))
            .map_err(|e| format!("{e:#}"));
        let restarted_after = t.elapsed();
        let out = load.wait_with_output().map_err(|e| e.to_string())?;
        restart?;
        if restarted_after > Duration::from_secs(60) {
            return Err(format!("agents took {restarted_after:?}, longer than the 60 s of load"));
        }
        let replies = parse_replies(&String::from_utf8_lossy(&out.stdout));
        eval_no_failures(&replies, &pods).map(|d| format!("{d}; all agents replaced in {restarted_after:.0?}"))
    });

    check(&mut results, "Service deletion", || {
        let ip = ip_of("echo")?;
        c.run(&["-n", TEST_NS, "delete", "svc", "echo", "--wait=true"]).map_err(|e| format!("{e:#}"))?;
        poll(Duration::from_secs(30), || eval_all_fail(&c.requests_from_client(&counted_loop(&url(&ip, 80), 5, 1))?))
    });
    results
}

pub enum Outcome {
    Skipped(String),
    Ran(Vec<CheckResult>),
}

pub fn run_e2e(host: &impl Host) -> Result<Outcome> {
    if let Preflight::Skip(reason) = preflight(host) {
        return Ok(Outcome::Skipped(reason));
    }
    let root = workspace_root();
    let out = root.join("target/e2e-kind");
    std::fs::create_dir_all(&out)?;
    let cluster = setup_cluster(&root, &out)?;
    let results = matrix(&cluster);
    if results.iter().any(|r| !r.passed) {
        cluster.collect_diagnostics(&out);
    }
    drop(cluster);
    Ok(Outcome::Ran(results))
}

/// `cargo xtask e2e-kind`.
pub fn main() -> Result<()> {
    let t = Instant::now();
    match run_e2e(&RealHost::from_env())? {
        Outcome::Skipped(reason) => {
            println!("e2e-kind: SKIP: {reason}");
            Ok(())
        }
        Outcome::Ran(results) => {
            print!("{}", format_table(&results));
            eprintln!("e2e-kind: finished in {:.0?}", t.elapsed());
            let failed = results.iter().filter(|r| !r.passed).count();
            if failed > 0 {
                bail!("{failed} check(s) failed; diagnostics in target/e2e-kind/");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHost {
        tools: &'static [&'static str],
        engine: Result<(), &'static str>,
    }

    impl Host for FakeHost {
        fn has(&self, tool: &str) -> bool {
            self.tools.contains(&tool)
        }
        fn docker_engine(&self) -> Result<(), String> {
            self.engine.map_err(String::from)
        }
    }

    #[test]
    fn skips_when_a_tool_is_missing() {
        let Preflight::Skip(why) = preflight(&FakeHost { tools: &["docker", "kubectl"], engine: Ok(()) }) else {
            panic!("should skip");
        };
        assert!(why.starts_with("kind not found on PATH"), "{why}");
        let Preflight::Skip(why) = preflight(&FakeHost { tools: &[], engine: Ok(()) }) else { panic!() };
        assert!(why.starts_with("docker, kind, kubectl not found"), "{why}");
    }

    #[test]
    fn skips_without_a_docker_engine() {
        let host = FakeHost {
            tools: &["docker", "kind", "kubectl"],
            engine: Err("Cannot connect to the Docker daemon at unix:///var/run/docker.sock"),
        };
        let Preflight::Skip(why) = preflight(&host) else { panic!("should skip") };
        assert!(why.contains("no Docker engine") && why.contains("Cannot connect"), "{why}");
        assert_eq!(preflight(&FakeHost { tools: &["docker", "kind", "kubectl"], engine: Ok(()) }), Preflight::Ready);
    }

    /// The real entry point on a host with nothing on PATH: a skip, not an error, and no
    /// cluster work.
    #[test]
    fn e2e_on_a_bare_host_skips_cleanly() {
        let empty = std::env::temp_dir().join(format!("xtask-e2e-empty-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let host = RealHost { path: empty.clone().into_os_string() };
        assert!(!host.has("docker"));
        match run_e2e(&host).unwrap() {
            Outcome::Skipped(why) => assert!(why.contains("docker, kind, kubectl not found"), "{why}"),
            Outcome::Ran(_) => panic!("ran without tools"),
        }
        assert!(host.docker_engine().is_err());
        let _ = std::fs::remove_dir(empty);
    }

    #[test]
    fn real_host_finds_executables_only() {
        let dir = std::env::temp_dir().join(format!("xtask-e2e-path-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kind"), "#!/bin/sh\n").unwrap();
        std::fs::write(dir.join("kubectl"), "not executable").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("kind"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.join("kubectl"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let host = RealHost { path: std::env::join_paths([Path::new("/nonexistent"), &dir]).unwrap() };
        assert!(host.has("kind"));
        assert!(!host.has("kubectl"));
        assert!(!host.has("docker"));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn base_rendered() -> String {
        // What `kubectl kustomize manifests/` renders: the base's files in order (the
        // manifests test checks the two are equal).
        let dir = workspace_root().join("manifests");
        ["namespace", "serviceaccount", "clusterrole", "clusterrolebinding", "configmap", "daemonset"]
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(format!("{f}.yaml"))).unwrap())
            .collect::<Vec<_>>()
            .join("---\n")
    }

    fn docs(yaml: &str) -> Vec<Value> {
        use serde::Deserialize;
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| Value::deserialize(d).unwrap())
            .filter(|v| !v.is_null())
            .collect()
    }

    fn agent(docs: &[Value]) -> &Value {
        let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
        ds["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "agent")
            .unwrap()
    }

    fn env(container: &Value) -> BTreeMap<String, Value> {
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_string(), e.get("value").cloned().unwrap_or(Value::Null)))
            .collect()
    }

    #[test]
    fn patch_sets_image_pull_policy_and_api_server() {
        let base = base_rendered();
        let before = docs(&base);
        let patch = KindPatch {
            image: IMAGE.into(),
            image_pull_policy: "Never".into(),
            api_server: Some(("172.18.0.3".into(), 6443)),
        };
        let after = docs(&patch_rendered(&base, &patch).unwrap());
        assert_eq!(before.len(), after.len());
        let a = agent(&after);
        assert_eq!(a["image"], "ebpf-proxy:e2e");
        assert_eq!(a["imagePullPolicy"], "Never");
        let e = env(a);
        assert_eq!(e["KUBERNETES_SERVICE_HOST"], "172.18.0.3");
        assert_eq!(e["KUBERNETES_SERVICE_PORT"], "6443");
        // The rest of the env (NODE_NAME, ConfigMap flags) is kept.
        assert_eq!(e.len(), env(agent(&before)).len() + 2);
        assert!(e.contains_key("NODE_NAME"));
        // Only the agent container changed: every other document is identical.
        for (b, a) in before.iter().zip(&after) {
            if b["kind"] != "DaemonSet" {
                assert_eq!(b, a);
            }
        }
        let mut b_ds = before.iter().find(|d| d["kind"] == "DaemonSet").unwrap().clone();
        let a_ds = after.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
        let c = &mut b_ds["spec"]["template"]["spec"]["containers"][0];
        c["image"] = "ebpf-proxy:e2e".into();
        c["imagePullPolicy"] = "Never".into();
        c["env"] = a_ds["spec"]["template"]["spec"]["containers"][0]["env"].clone();
        assert_eq!(&b_ds, a_ds);
    }

    #[test]
    fn patch_replaces_existing_env_and_is_idempotent() {
        let patch = KindPatch {
            image: "x:1".into(),
            image_pull_policy: "IfNotPresent".into(),
            api_server: Some(("10.0.0.1".into(), 443)),
        };
        let once = patch_rendered(&base_rendered(), &patch).unwrap();
        let twice = patch_rendered(&once, &patch).unwrap();
        assert_eq!(once, twice);
        let moved = KindPatch { api_server: Some(("10.0.0.2".into(), 6443)), ..patch };
        let e = env(agent(&docs(&patch_rendered(&once, &moved).unwrap())));
        assert_eq!(e["KUBERNETES_SERVICE_HOST"], "10.0.0.2");
        assert_eq!(e["KUBERNETES_SERVICE_PORT"], "6443");
        // Without an API server only the image changes.
        let plain = KindPatch { image: "y:2".into(), image_pull_policy: "Never".into(), api_server: None };
        let e = env(agent(&docs(&patch_rendered(&base_rendered(), &plain).unwrap())));
        assert!(!e.contains_key("KUBERNETES_SERVICE_HOST"));
    }

    #[test]
    fn patch_requires_one_daemonset_with_an_agent() {
        let p = KindPatch { image: "x".into(), image_pull_policy: "Never".into(), api_server: None };
        let no_ds = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n";
        assert!(patch_rendered(no_ds, &p).unwrap_err().to_string().contains("found 0"));
        let wrong = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: a}\nspec:\n  template:\n    spec:\n      containers: [{name: other, image: x}]\n";
        assert!(patch_rendered(wrong, &p).unwrap_err().to_string().contains("agent"));
    }

    fn replies(s: &[&str]) -> Vec<Reply> {
        s.iter().map(|r| if *r == "!" { Reply::Failed } else { Reply::Pod(r.to_string()) }).collect()
    }

    fn set(s: &[&str]) -> BTreeSet<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn replies_parse_from_the_request_loop_output() {
        assert_eq!(parse_replies("echo-a\n\n!FAIL\n echo-b \n"), replies(&["echo-a", "!", "echo-b"]));
        let script = counted_loop("http://10.96.0.10:80/hostname", 30, 2);
        assert!(
            script.starts_with("for i in $(seq 1 30); do r=$(curl -fsS --max-time 2 http://10.96.0.10:80/hostname"),
            "{script}"
        );
        assert!(script.contains(FAIL_MARK));
        assert!(timed_loop("http://x/", 60, 2).contains("+60"));
    }

    #[test]
    fn verdicts() {
        let pods = set(&["a", "b", "c"]);
        assert!(eval_balanced(&replies(&["a", "b", "a", "c"]), &pods).unwrap().contains("3 of 3"));
        assert!(eval_balanced(&replies(&["a", "a", "a"]), &pods).unwrap_err().contains("not load-balanced"));
        assert!(eval_balanced(&replies(&["a", "!", "b"]), &pods).unwrap_err().contains("1/3 requests failed"));
        assert!(eval_balanced(&replies(&["a", "zombie"]), &pods).unwrap_err().contains("zombie"));
        assert!(eval_balanced(&[], &pods).is_err());
        assert!(eval_balanced(&replies(&["a", "a"]), &set(&["a"])).is_ok());

        assert!(eval_exact_set(&replies(&["a", "b", "c", "a"]), &pods).is_ok());
        assert!(eval_exact_set(&replies(&["a", "b"]), &pods).unwrap_err().contains("\"c\""));

        assert!(eval_affinity(&replies(&["b", "b", "b"]), &pods).unwrap().contains("all to b"));
        assert!(eval_affinity(&replies(&["b", "c"]), &pods).is_err());

        assert!(eval_all_fail(&replies(&["!", "!"])).is_ok());
        assert!(eval_all_fail(&replies(&["!", "a"])).unwrap_err().contains("1 requests still answered"));
        assert!(eval_all_fail(&[]).is_err());

        assert!(eval_no_failures(&replies(&["a", "b"]), &pods).is_ok());
        assert!(eval_no_failures(&replies(&["a", "!"]), &pods).is_err());
    }

    #[test]
    fn pods_and_nodes_parse_from_kubectl_json() {
        let pods = serde_json::json!({"items": [
            {"metadata": {"name": "echo-1"}, "spec": {"nodeName": "w1"},
             "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "echo-2", "deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"nodeName": "w2"},
             "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "echo-3"}, "spec": {"nodeName": "w2"},
             "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}},
            {"metadata": {"name": "echo-4"}, "spec": {"nodeName": "w2"}, "status": {"phase": "Pending"}}
        ]});
        let p = parse_running_pods(&pods.to_string()).unwrap();
        assert_eq!(p, BTreeMap::from([("echo-1".to_string(), "w1".to_string())]));

        let nodes = serde_json::json!({"items": [
            {"metadata": {"name": "cp"}, "status": {"addresses": [
                {"type": "InternalIP", "address": "fc00::2"}, {"type": "InternalIP", "address": "172.18.0.2"},
                {"type": "Hostname", "address": "cp"}]}},
            {"metadata": {"name": "w1"}, "status": {"addresses": [{"type": "Hostname", "address": "w1"}]}}
        ]});
        let n = parse_node_ips(&nodes.to_string()).unwrap();
        assert_eq!(n, BTreeMap::from([("cp".to_string(), "172.18.0.2".to_string())]));
        assert!(parse_node_ips("not json").is_err());
    }

    #[test]
    fn table_lists_every_check_and_counts() {
        let results = vec![
            CheckResult {
                name: "ClusterIP from a pod".into(),
                passed: true,
                detail: "30/30 answered by 3 of 3 pods".into(),
                elapsed: Duration::from_millis(1234),
            },
            CheckResult {
                name: "Service deletion".into(),
                passed: false,
                detail: "after 30s: 5 requests still answered\nmore".into(),
                elapsed: Duration::from_secs(30),
            },
        ];
        let t = format_table(&results);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert_eq!(lines[0], "CHECK                 RESULT     TIME  DETAIL");
        assert_eq!(lines[1], "ClusterIP from a pod  PASS       1.2s  30/30 answered by 3 of 3 pods");
        assert_eq!(lines[2], "Service deletion      FAIL      30.0s  after 30s: 5 requests still answered");
        assert_eq!(lines[3], "e2e-kind: 1 passed, 1 failed");
        // Columns line up whatever the name lengths.
        let col = lines[0].find("RESULT").unwrap();
        assert!(lines[1..3].iter().all(|l| &l[col..col + 4] == "PASS" || &l[col..col + 4] == "FAIL"));
        assert_eq!(format_table(&[]).lines().last(), Some("e2e-kind: 0 passed, 0 failed"));
    }
}
