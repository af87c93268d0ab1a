//! A DaemonSet's container run under podman as the kubelet would run it, for the pod-spec
//! e2e (`tests/tests/e2e_pod.rs`).
//!
//! [`RunSpec::from_rendered`] takes one container of a rendered DaemonSet exactly as
//! written: image, command/args with `$(VAR)` expanded from the container's env (values,
//! ConfigMap keys, the downward API) and `envFrom`, capabilities, user, read-only root,
//! privilege escalation, seccomp, hostPath volumes and their mounts, hostNetwork, probes,
//! memory limit and the termination grace period. Anything of the spec this mapping does
//! not know is an error naming it, so a new field in the manifests is mapped deliberately
//! (or its absence explained) rather than silently dropped.
//!
//! [`RunSpec::podman_args`] turns it into `podman run` flags. What cannot be 1:1 is mapped
//! explicitly, each with its reason next to it (host paths, seccomp's RuntimeDefault, rlimits).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, PodSpec, Probe},
};
use serde_json::Value;

use crate::fake_apiserver::SERVICE_ACCOUNT_DIR;

/// podman as it runs here: crun (podman's default) refuses this hybrid-cgroup host, and
/// there is no systemd to manage cgroups.
pub fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

/// Run to completion; stdout, or an error with stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why podman, buildah and runc cannot run a container here, if they cannot.
pub fn unusable() -> Option<String> {
    for (tool, arg) in [("podman", "--version"), ("buildah", "--version"), ("runc", "--version")] {
        if let Err(e) = output(Command::new(tool).arg(arg)) {
            return Some(format!("{tool} is not usable ({e}); `cargo xtask setup` installs it as root"));
        }
    }
    None
}

/// An HTTP probe of the spec, its port resolved (a named port through the container's
/// `ports`).
#[derive(Debug, Clone)]
pub struct HttpProbe {
    pub path: String,
    pub port: u16,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
}

/// A hostPath volume mounted into the container.
#[derive(Debug, Clone)]
pub struct HostMount {
    pub host_path: String,
    pub container_path: String,
    pub read_only: bool,
    /// `mountPropagation`: None, HostToContainer or Bidirectional.
    pub propagation: Option<String>,
}

/// One container of a DaemonSet's pod, as the kubelet would start it.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub container: String,
    pub image: String,
    /// `imagePullPolicy` (None: the kubelet's default for the tag).
    pub image_pull_policy: Option<String>,
    /// `command` (replaces the image's ENTRYPOINT) and `args` (its CMD), expanded.
    pub command: Option<Vec<String>>,
    pub args: Vec<String>,
    /// The container's env in order (later entries win), after `envFrom`.
    pub env: Vec<(String, String)>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub privileged: bool,
    pub read_only_root: bool,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub allow_privilege_escalation: bool,
    /// Container's seccompProfile type, else the pod's; None: the runtime's choice.
    pub seccomp: Option<String>,
    pub host_network: bool,
    pub mounts: Vec<HostMount>,
    pub readiness: Option<HttpProbe>,
    pub liveness: Option<HttpProbe>,
    pub memory_limit: Option<String>,
    pub grace_period: Duration,
    pub automount_service_account_token: bool,
}

/// The value of `$(NAME)` references in `arg`, as the kubelet expands them: `$$` is a
/// literal `$`; a reference to an unknown variable is an error here (the kubelet would
/// pass it on literally, which the agent would then reject or, worse, accept).
pub fn expand(arg: &str, env: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("$(") {
            let end = t.find(')').ok_or_else(|| anyhow!("unterminated $( in {arg:?}"))?;
            let name = &t[..end];
            out.push_str(env.get(name).ok_or_else(|| anyhow!("{arg:?}: $({name}) is not in the container's env"))?);
            rest = &t[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn configmap<'a>(objects: &'a [Value], namespace: &str, name: &str) -> Result<&'a Value> {
    objects
        .iter()
        .find(|v| {
            v.get("kind").and_then(Value::as_str) == Some("ConfigMap")
                && v.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
                && v.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default") == namespace
        })
        .ok_or_else(|| anyhow!("no ConfigMap {namespace}/{name} in the rendered objects"))
}

fn probe(p: &Probe, ports: &BTreeMap<String, i32>, what: &str) -> Result<HttpProbe> {
    if p.exec.is_some() || p.tcp_socket.is_some() || p.grpc.is_some() {
        bail!("{what}: only httpGet probes are mapped");
    }
    let get = p.http_get.as_ref().ok_or_else(|| anyhow!("{what}: no httpGet"))?;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let port = match &get.port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            *ports.get(name).ok_or_else(|| anyhow!("{what}: port {name:?} is not one of the container's ports"))?
        }
    };
    let secs = |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    Ok(HttpProbe {
        path: get.path.clone().unwrap_or_else(|| "/".into()),
        port: u16::try_from(port).with_context(|| format!("{what}: port {port}"))?,
        // The kubelet's defaults for fields left out.
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10),
        timeout: secs(p.timeout_seconds, 1),
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
    })
}

impl RunSpec {
    /// Container `container` (an init container or a regular one) of the one DaemonSet in
    /// `objects` whose name is `daemonset`, on node `node_name`.
    pub fn from_rendered(objects: &[Value], daemonset: &str, container: &str, node_name: &str) -> Result<RunSpec> {
        let ds_value = objects
            .iter()
            .find(|v| {
                v.get("kind").and_then(Value::as_str) == Some("DaemonSet")
                    && v.pointer("/metadata/name").and_then(Value::as_str) == Some(daemonset)
            })
            .ok_or_else(|| anyhow!("no DaemonSet {daemonset} in the rendered objects"))?;
        let ds: DaemonSet = serde_json::from_value(ds_value.clone()).context("DaemonSet")?;
        let namespace = ds.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let pod: &PodSpec = ds.spec.template.spec.as_ref().context("no pod spec")?;
        let c: &Container = pod
            .init_containers
            .iter()
            .flatten()
            .chain(&pod.containers)
            .find(|c| c.name == container)
            .ok_or_else(|| anyhow!("DaemonSet {daemonset} has no container {container}"))?;
        let what = format!("DaemonSet {daemonset} container {container}");

        // Fields this mapping does not carry over: refuse rather than drop them.
        for (set, field) in [
            (pod.host_pid == Some(true), "hostPID"),
            (pod.host_ipc == Some(true), "hostIPC"),
            (pod.share_process_namespace == Some(true), "shareProcessNamespace"),
            (c.startup_probe.is_some(), "startupProbe"),
            (c.lifecycle.is_some(), "lifecycle"),
            (c.volume_devices.is_some(), "volumeDevices"),
            (c.working_dir.is_some(), "workingDir"),
        ] {
            if set {
                bail!("{what}: {field} is not mapped to podman yet");
            }
        }

        // The env as the kubelet builds it: envFrom first, then env (which wins).
        let mut env: Vec<(String, String)> = Vec::new();
        for from in c.env_from.iter().flatten() {
            let Some(r) = &from.config_map_ref else { bail!("{what}: envFrom other than configMapRef") };
            let cm: ConfigMap = serde_json::from_value(configmap(objects, &namespace, &r.name)?.clone())?;
            let prefix = from.prefix.clone().unwrap_or_default();
            for (k, v) in cm.data.iter().flatten() {
                env.push((format!("{prefix}{k}"), v.clone()));
            }
        }
        for e in c.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                v.clone()
            } else if let Some(from) = &e.value_from {
                if let Some(r) = &from.config_map_key_ref {
                    let cm = configmap(objects, &namespace, &r.name)?;
                    cm.pointer(&format!("/data/{}", r.key.replace('~', "~0").replace('/', "~1")))
                        .and_then(Value::as_str)
                        .ok_or_else(|| anyhow!("env {}: ConfigMap {} has no key {}", e.name, r.name, r.key))?
                        .to_string()
                } else if let Some(f) = &from.field_ref {
                    match f.field_path.as_str() {
                        "spec.nodeName" => node_name.to_string(),
                        "metadata.namespace" => namespace.clone(),
                        other => bail!("env {}: downward API field {other} is not mapped", e.name),
                    }
                } else {
                    bail!("env {}: valueFrom other than configMapKeyRef/fieldRef", e.name);
                }
            } else {
                String::new()
            };
            env.retain(|(k, _)| k != &e.name);
            env.push((e.name.clone(), value));
        }
        let lookup: BTreeMap<String, String> = env.iter().cloned().collect();
        let command = c
            .command
            .as_ref()
            .map(|cmd| cmd.iter().map(|a| expand(a, &lookup)).collect::<Result<Vec<_>>>())
            .transpose()?;
        let args = c.args.iter().flatten().map(|a| expand(a, &lookup)).collect::<Result<Vec<_>>>()?;

        let sc = c.security_context.clone().unwrap_or_default();
        let caps = sc.capabilities.clone().unwrap_or_default();
        let pod_sc = pod.security_context.clone().unwrap_or_default();
        let seccomp = sc.seccomp_profile.as_ref().or(pod_sc.seccomp_profile.as_ref()).map(|p| p.type_.clone());

        let volumes: BTreeMap<String, String> = pod
            .volumes
            .iter()
            .flatten()
            .map(|v| match &v.host_path {
                Some(hp) => Ok((v.name.clone(), hp.path.clone())),
                None => Err(anyhow!("{what}: volume {} is not a hostPath (not mapped)", v.name)),
            })
            .collect::<Result<_>>()?;
        let mounts = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| {
                let host = volumes.get(&m.name).ok_or_else(|| anyhow!("{what}: mount of unknown volume {}", m.name))?;
                if m.sub_path.is_some() || m.sub_path_expr.is_some() {
                    bail!("{what}: subPath mounts are not mapped");
                }
                Ok(HostMount {
                    host_path: host.clone(),
                    container_path: m.mount_path.clone(),
                    read_only: m.read_only == Some(true),
                    propagation: m.mount_propagation.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let ports: BTreeMap<String, i32> =
            c.ports.iter().flatten().filter_map(|p| p.name.clone().map(|n| (n, p.container_port))).collect();
        let readiness = c.readiness_probe.as_ref().map(|p| probe(p, &ports, "readinessProbe")).transpose()?;
        let liveness = c.liveness_probe.as_ref().map(|p| probe(p, &ports, "livenessProbe")).transpose()?;
        let memory_limit =
            c.resources.as_ref().and_then(|r| r.limits.as_ref()).and_then(|l| l.get("memory")).map(|q| q.0.clone());
        // The kubelet mounts the service account token unless the pod (or its service
        // account, not modelled here: ours does not opt out) says not to.
        let automount = pod.automount_service_account_token != Some(false);

        Ok(RunSpec {
            container: container.to_string(),
            image: c.image.clone().ok_or_else(|| anyhow!("{what}: no image"))?,
            image_pull_policy: c.image_pull_policy.clone(),
            command,
            args,
            env,
            cap_add: caps.add.unwrap_or_default(),
            cap_drop: caps.drop.unwrap_or_default(),
            privileged: sc.privileged == Some(true),
            read_only_root: sc.read_only_root_filesystem == Some(true),
            run_as_user: sc.run_as_user.or(pod_sc.run_as_user),
            run_as_group: sc.run_as_group.or(pod_sc.run_as_group),
            // Kubernetes' default is true (no no_new_privs).
            allow_privilege_escalation: sc.allow_privilege_escalation != Some(false),
            seccomp,
            host_network: pod.host_network == Some(true),
            mounts,
            readiness,
            liveness,
            memory_limit,
            grace_period: Duration::from_secs(pod.termination_grace_period_seconds.unwrap_or(30).max(0) as u64),
            automount_service_account_token: automount,
        })
    }
}

/// What the test puts where the spec names the host: the node's network namespace, its
/// own directories for hostPath volumes, the service account's files, and the seccomp
/// profile standing for RuntimeDefault.
pub struct Host {
    pub netns: String,
    /// hostPath -> the test's directory used instead. A hostPath not listed here is an
    /// error: the container never gets a real host directory the test did not choose.
    pub host_paths: BTreeMap<String, PathBuf>,
    pub service_account_dir: PathBuf,
    /// The kubelet's own env for every container (`KUBERNETES_SERVICE_HOST/PORT` of the
    /// `kubernetes` Service); the container's env overrides it.
    pub kubelet_env: Vec<(String, String)>,
    /// Profile file for `seccompProfile: RuntimeDefault` ([`runtime_default_seccomp`]).
    pub runtime_default_seccomp: PathBuf,
}

/// Kubernetes quantities podman takes: `512Mi` -> `512m`, `1Gi` -> `1g`; plain bytes as is.
fn podman_memory(q: &str) -> Result<String> {
    for (k8s, podman) in [("Ki", "k"), ("Mi", "m"), ("Gi", "g")] {
        if let Some(n) = q.strip_suffix(k8s) {
            return Ok(format!("{n}{podman}"));
        }
    }
    if q.chars().all(|c| c.is_ascii_digit()) {
        return Ok(q.to_string());
    }
    bail!("memory limit {q:?}: unit not mapped")
}

impl RunSpec {
    /// `podman run` flags (after `run`, before the image) for this container on `host`.
    pub fn podman_args(&self, host: &Host) -> Result<Vec<String>> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
        if !self.host_network {
            bail!("{}: only hostNetwork pods are mapped (the agent's and the cleanup's are)", self.container);
        }
        // hostNetwork: the node's network namespace, which here is the test's node netns.
        push(&["--network", &format!("ns:/var/run/netns/{}", host.netns)]);
        if self.privileged {
            push(&["--privileged"]);
        }
        for c in &self.cap_drop {
            push(&["--cap-drop", &cap_name(c)]);
        }
        for c in &self.cap_add {
            push(&["--cap-add", &cap_name(c)]);
        }
        if !self.allow_privilege_escalation {
            push(&["--security-opt", "no-new-privileges"]);
        }
        match self.seccomp.as_deref() {
            // What RuntimeDefault means on the runtimes the manifests target (containerd >=
            // 1.7, Docker >= 20.10): podman's own default profile with bpf() allowed under
            // CAP_BPF and perf_event_open() under CAP_PERFMON. podman 4.3's profile ties
            // both to CAP_SYS_ADMIN, which the spec rightly does not grant.
            Some("RuntimeDefault") | None => {
                push(&["--security-opt", &format!("seccomp={}", host.runtime_default_seccomp.display())])
            }
            Some("Unconfined") => push(&["--security-opt", "seccomp=unconfined"]),
            Some(other) => bail!("{}: seccompProfile {other} is not mapped", self.container),
        }
        if self.read_only_root {
            // The kubelet adds no tmpfs on a read-only root; podman would mount /tmp, /run
            // and /var/tmp writable unless told not to.
            push(&["--read-only", "--read-only-tmpfs=false"]);
        }
        match (self.run_as_user, self.run_as_group) {
            (Some(u), Some(g)) => push(&["--user", &format!("{u}:{g}")]),
            (Some(u), None) => push(&["--user", &u.to_string()]),
            (None, _) => {}
        }
        for m in &self.mounts {
            let src = host.host_paths.get(&m.host_path).ok_or_else(|| {
                anyhow!("{}: hostPath {} has no test directory standing for it", self.container, m.host_path)
            })?;
            let propagation = match m.propagation.as_deref() {
                None | Some("None") => "rprivate",
                Some("HostToContainer") => "rslave",
                Some("Bidirectional") => "rshared",
                Some(other) => bail!("{}: mountPropagation {other}", self.container),
            };
            let ro = if m.read_only { ",ro=true" } else { "" };
            push(&[
                "--mount",
                &format!("type=bind,src={},dst={},bind-propagation={propagation}{ro}", src.display(), m.container_path),
            ]);
        }
        if self.automount_service_account_token {
            push(&[
                "--mount",
                &format!("type=bind,src={},dst={SERVICE_ACCOUNT_DIR},ro=true", host.service_account_dir.display()),
            ]);
        }
        for (k, v) in host.kubelet_env.iter().filter(|(k, _)| !self.env.iter().any(|(n, _)| n == k)) {
            push(&["--env", &format!("{k}={v}")]);
        }
        for (k, v) in &self.env {
            push(&["--env", &format!("{k}={v}")]);
        }
        // Nothing can be pulled here: IfNotPresent and Never find the image the test built;
        // Always would fail, as it would on a node without access to the registry.
        let pull = match self.image_pull_policy.as_deref() {
            Some("Always") => "always",
            Some("Never") => "never",
            Some("IfNotPresent") => "missing",
            None if self.image.ends_with(":latest") || !self.image.contains(':') => "always",
            None => "missing",
            Some(other) => bail!("{}: imagePullPolicy {other}", self.container),
        };
        push(&["--pull", pull]);
        if let Some(m) = &self.memory_limit {
            push(&["--memory", &podman_memory(m)?]);
        }
        // Not part of the pod spec: the runtime's rlimits. podman asks for 1048576 open
        // files and more processes than root may raise to here (no CAP_SYS_RESOURCE):
        // keep this process's own hard limits, as containerd passes on its own (podman
        // lowers its own process limit to 32768 first, so no more than that).
        let hard = |resource| {
            let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: getrlimit writes into the struct we own.
            (unsafe { libc::getrlimit(resource, &mut l) } == 0).then_some(l.rlim_max)
        };
        if let Some(n) = hard(libc::RLIMIT_NOFILE) {
            push(&["--ulimit", &format!("nofile={n}:{n}")]);
        }
        if let Some(n) = hard(libc::RLIMIT_NPROC) {
            let n = n.min(32768);
            push(&["--ulimit", &format!("nproc={n}:{n}")]);
        }
        if let Some(cmd) = &self.command {
            let (first, _) = cmd.split_first().ok_or_else(|| anyhow!("{}: empty command", self.container))?;
            push(&["--entrypoint", first]);
        }
        a.push(self.image.clone());
        if let Some(cmd) = &self.command {
            a.extend(cmd.iter().skip(1).cloned());
        }
        a.extend(self.args.iter().cloned());
        Ok(a)
    }
}

/// `NET_ADMIN` -> `CAP_NET_ADMIN` (Kubernetes names capabilities without the prefix).
fn cap_name(c: &str) -> String {
    if c.eq_ignore_ascii_case("ALL") || c.starts_with("CAP_") { c.to_string() } else { format!("CAP_{c}") }
}

/// Writes podman's default seccomp profile (`/usr/share/containers/seccomp.json`) with
/// `bpf` allowed for CAP_BPF and `perf_event_open` for CAP_PERFMON (each still allowed for
/// CAP_SYS_ADMIN, and EPERM without), which is what current runtimes' RuntimeDefault does.
pub fn runtime_default_seccomp(path: &Path) -> Result<()> {
    let source = Path::new("/usr/share/containers/seccomp.json");
    let text = std::fs::read_to_string(source).with_context(|| format!("reading {}", source.display()))?;
    let mut profile: Value = serde_json::from_str(&text).context("podman's seccomp profile")?;
    let syscalls = profile.get_mut("syscalls").and_then(Value::as_array_mut).context("no syscalls list")?;
    const OURS: [(&str, &str); 2] = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];
    // Take both out of the rule that answers EPERM to every caller without CAP_SYS_ADMIN.
    for rule in syscalls.iter_mut() {
        let denies = rule.get("action").and_then(Value::as_str) == Some("SCMP_ACT_ERRNO");
        if let (true, Some(names)) = (denies, rule.get_mut("names").and_then(Value::as_array_mut)) {
            names.retain(|n| !OURS.iter().any(|(s, _)| n.as_str() == Some(s)));
        }
    }
    for (syscall, cap) in OURS {
        syscalls.push(serde_json::json!({
            "names": [syscall], "action": "SCMP_ACT_ALLOW", "args": [],
            "includes": {"caps": [cap]}, "excludes": {},
        }));
        syscalls.push(serde_json::json!({
            "names": [syscall], "action": "SCMP_ACT_ERRNO", "errnoRet": 1, "args": [],
            "includes": {}, "excludes": {"caps": ["CAP_SYS_ADMIN", cap]},
        }));
    }
    std::fs::write(path, serde_json::to_vec_pretty(&profile)?)?;
    Ok(())
}

/// A container podman runs, removed (with `podman rm -f`) on drop, also when the test fails.
pub struct PodmanContainer {
    pub name: String,
}

impl PodmanContainer {
    /// `podman run -d --name <name> <args>`.
    pub fn start(name: &str, args: &[String]) -> Result<PodmanContainer> {
        let c = PodmanContainer { name: name.to_string() };
        output(podman().args(["run", "-d", "--name", name]).args(args))?;
        Ok(c)
    }

    /// `podman run --name <name> <args>` to completion within `timeout`: (exit code, logs).
    pub fn run_to_completion(name: &str, args: &[String], timeout: Duration) -> Result<(i32, String)> {
        let c = PodmanContainer::start(name, args)?;
        let deadline = Instant::now() + timeout;
        loop {
            if !c.running()? {
                return Ok((c.exit_code()?, c.logs()));
            }
            if Instant::now() > deadline {
                bail!("container {name} still running after {timeout:?}:\n{}", c.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn inspect(&self, format: &str) -> Result<String> {
        Ok(output(podman().args(["inspect", "--format", format, &self.name]))?.trim().to_string())
    }

    pub fn running(&self) -> Result<bool> {
        Ok(self.inspect("{{.State.Running}}")? == "true")
    }

    pub fn exit_code(&self) -> Result<i32> {
        let s = self.inspect("{{.State.ExitCode}}")?;
        s.parse().with_context(|| format!("exit code {s:?}"))
    }

    /// How often the container was restarted (the kubelet would count a liveness kill).
    pub fn restarts(&self) -> Result<u32> {
        let s = self.inspect("{{.RestartCount}}")?;
        s.parse().with_context(|| format!("restart count {s:?}"))
    }

    /// stdout and stderr so far (best effort: for failure messages).
    pub fn logs(&self) -> String {
        podman()
            .args(["logs", &self.name])
            .output()
            .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
            .unwrap_or_else(|e| format!("(podman logs failed: {e})"))
    }

    /// `podman stop -t <grace>`: SIGTERM, then SIGKILL after the grace period, as the kubelet
    /// does with terminationGracePeriodSeconds. Returns how long the container took to stop.
    pub fn stop(&self, grace: Duration) -> Result<Duration> {
        let t = Instant::now();
        output(podman().args(["stop", "-t", &grace.as_secs().to_string(), &self.name]))?;
        Ok(t.elapsed())
    }
}

impl Drop for PodmanContainer {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "0", &self.name]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// An image in the local storage, removed on drop.
pub struct PodmanImage {
    pub tag: String,
}

impl Drop for PodmanImage {
    fn drop(&mut self) {
        let _ = podman().args(["rmi", "-f", &self.tag]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let env: BTreeMap<String, String> = [("A".to_string(), "x".to_string())].into();
        assert_eq!(expand("--a=$(A)", &env).unwrap(), "--a=x");
        assert_eq!(expand("$$(A) $ $(A)", &env).unwrap(), "$(A) $ x");
        assert!(expand("--b=$(B)", &env).is_err());
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(podman_memory("512Mi").unwrap(), "512m");
        assert_eq!(podman_memory("1Gi").unwrap(), "1g");
        assert!(podman_memory("1.5G").is_err());
    }
}
