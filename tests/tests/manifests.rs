//! Deployment manifests (`manifests/`): every object parses strictly into its k8s-openapi
//! type, `kubectl kustomize` renders the base, the DaemonSet passes flags the agent accepts,
//! RBAC is exactly what the watchers use, the Helm chart renders the same objects as
//! Kustomize, and the kind cluster runs without kube-proxy.
//!
//! Needs no cluster. Tests that need `kubectl` (for Kustomize) or `helm` fail naming the
//! missing tool (`cargo xtask setup` installs both; `HELM=/path/to/helm` overrides the PATH
//! lookup).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser;
use k8s_openapi::{
    Resource,
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Namespace, Node, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        networking::v1::ServiceCIDR,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
};
use proxy_userspace::cli::{Cli, Command as CliCommand};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn manifests_dir() -> PathBuf {
    root().join("manifests")
}

fn chart_dir() -> PathBuf {
    manifests_dir().join("helm/ebpf-proxy")
}

// ---------------------------------------------------------------------------------------
// Parsing

/// A YAML stream -> one JSON value per non-empty document.
fn parse_stream(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, doc)| Value::deserialize(doc).unwrap_or_else(|e| panic!("{origin}: document {i}: not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Paths at which `a` and `b` differ, naming the sides `names`.
fn diff(a: &Value, b: &Value, path: &str, names: (&str, &str), out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let p = format!("{path}/{k}");
                match y.get(k) {
                    Some(vb) => diff(va, vb, &p, names, out),
                    None => out.push(format!("{p}: only in {}", names.0)),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{path}/{k}: only in {}", names.1));
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                diff(va, vb, &format!("{path}/{i}"), names, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {} has {a}, {} has {b}", names.0, names.1)),
        _ => {}
    }
}

/// Deserialize into `T`, then require that serializing gives back exactly the source:
/// k8s-openapi ignores unknown fields, so a misspelled one would otherwise pass silently.
fn strict<T: DeserializeOwned + Serialize>(v: &Value, origin: &str) -> Result<T, String> {
    let ty = std::any::type_name::<T>();
    let t: T = serde_json::from_value(v.clone()).map_err(|e| format!("{origin}: not a valid {ty}: {e}"))?;
    let back = serde_json::to_value(&t).map_err(|e| format!("{origin}: {e}"))?;
    if back != *v {
        let mut d = Vec::new();
        diff(v, &back, "", ("the source (unknown or misspelled field?)", "the round trip"), &mut d);
        return Err(format!("{origin}: does not round-trip through {ty}:\n  {}", d.join("\n  ")));
    }
    Ok(t)
}

fn object_id(v: &Value) -> String {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or("").to_string();
    let ns = s("/metadata/namespace");
    format!("{} {}{}", s("/kind"), if ns.is_empty() { String::new() } else { format!("{ns}/") }, s("/metadata/name"))
}

/// Strict check of one object by its apiVersion/kind.
fn check_object(v: &Value, origin: &str) -> Result<(), String> {
    let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    let origin = format!("{origin}: {}", object_id(v));
    match (api, kind) {
        ("v1", "Namespace") => strict::<Namespace>(v, &origin).map(drop),
        ("v1", "ServiceAccount") => strict::<ServiceAccount>(v, &origin).map(drop),
        ("v1", "ConfigMap") => strict::<ConfigMap>(v, &origin).map(drop),
        ("v1", "Service") => strict::<Service>(v, &origin).map(drop),
        ("v1", "Pod") => strict::<Pod>(v, &origin).map(drop),
        ("apps/v1", "DaemonSet") => strict::<DaemonSet>(v, &origin).map(drop),
        ("apps/v1", "Deployment") => strict::<Deployment>(v, &origin).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict::<ClusterRole>(v, &origin).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => strict::<ClusterRoleBinding>(v, &origin).map(drop),
        _ => Err(format!("{origin}: {api}/{kind} is not in the table of check_object (add it)")),
    }
}

fn check_all(objects: &[Value], origin: &str) {
    let errors: Vec<String> = objects.iter().filter_map(|v| check_object(v, origin).err()).collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// Kubernetes manifests under manifests/, outside the Helm chart (templates are not YAML),
/// the kind cluster config and kustomization files (their own tests check them).
fn manifest_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "helm") {
                    walk(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                let name = p.file_name().unwrap().to_string_lossy();
                if name != "kustomization.yaml" && !p.ends_with("kind/cluster.yaml") {
                    out.push(p);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&manifests_dir(), &mut out);
    out.sort();
    out
}

fn read_objects(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_stream(&text, &path.display().to_string())
}

/// The base's files, in kustomization.yaml order.
fn base_objects_from_files() -> Vec<Value> {
    kustomization().resources.iter().flat_map(|r| read_objects(&manifests_dir().join(r))).collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    resources: Vec<String>,
}

fn kustomization() -> Kustomization {
    let p = manifests_dir().join("kustomization.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------
// Tools

/// A tool the test needs is missing: fail with the reason, never pass unrun
/// (`cargo xtask setup` installs kubectl and helm).
fn missing_tool(test: &str, reason: &str) -> ! {
    panic!("{test} cannot run: {reason}");
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("{cmd:?}: {e}"))
}

/// `kubectl`, if `kubectl version --client` works.
fn kubectl() -> Result<(), String> {
    output(Command::new("kubectl").args(["version", "--client"])).map(drop).map_err(|e| {
        format!("kubectl is not usable ({}); install kubectl to render Kustomize", e.lines().next().unwrap_or(""))
    })
}

/// The helm binary: $HELM, else `helm` on PATH, if `helm version` works.
fn helm() -> Result<String, String> {
    let bin = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    output(Command::new(&bin).args(["version", "--short"])).map(|_| bin).map_err(|e| {
        format!(
            "helm is not usable ({}); install it (see docs/deploy.md) or set HELM=/path/to/helm",
            e.lines().next().unwrap_or("")
        )
    })
}

fn kustomize_render() -> Vec<Value> {
    let text =
        output(Command::new("kubectl").arg("kustomize").arg(manifests_dir())).expect("kubectl kustomize manifests/");
    parse_stream(&text, "kubectl kustomize manifests/")
}

/// The API server address every render of these tests sets (Helm requires one), and the
/// URL the agent gets for it; docs/deploy.md's overlay sets the same.
const API_SERVER_HOST: &str = "192.0.2.10";
const API_SERVER_URL: &str = "https://192.0.2.10:6443";

/// `helm template` of the chart with `sets` (after `apiServer.host`, which they may override).
fn helm_template(helm: &str, sets: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(helm);
    cmd.args(["template", "ebpf-proxy"]).arg(chart_dir()).args(["--namespace", "ebpf-proxy"]);
    cmd.args(["--set", &format!("apiServer.host={API_SERVER_HOST}")]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    output(&mut cmd)
}

fn helm_render(helm: &str, sets: &[&str]) -> Vec<Value> {
    let text = helm_template(helm, sets).expect("helm template");
    parse_stream(&text, &format!("helm template {sets:?}"))
}

/// docs/deploy.md's Kustomize overlay (the yaml block that starts with `# overlay/kustomization.yaml`),
/// rendered as a user would: `kubectl kustomize overlay/` beside `manifests/`.
fn docs_overlay_render() -> Vec<Value> {
    let docs = std::fs::read_to_string(root().join("docs/deploy.md")).unwrap();
    let start = docs.find("```yaml\n# overlay/kustomization.yaml").expect("docs/deploy.md: the overlay block");
    let block = &docs[start + "```yaml\n".len()..];
    let block = &block[..block.find("```").expect("end of the overlay block")];
    let dir = std::env::temp_dir().join(format!("epx-overlay-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("overlay")).unwrap();
    let _ = std::fs::remove_file(dir.join("manifests"));
    std::os::unix::fs::symlink(manifests_dir(), dir.join("manifests")).unwrap();
    std::fs::write(dir.join("overlay/kustomization.yaml"), block).unwrap();
    let text = output(Command::new("kubectl").arg("kustomize").arg(dir.join("overlay")));
    let _ = std::fs::remove_dir_all(&dir);
    parse_stream(&text.expect("kubectl kustomize of docs/deploy.md's overlay"), "docs/deploy.md's overlay")
}

/// The objects of the base: rendered by Kustomize when kubectl is here, else its files
/// (identical: `kustomize_renders_exactly_the_base_files` checks that where it can).
fn base_objects() -> Vec<Value> {
    match kubectl() {
        Ok(()) => kustomize_render(),
        Err(_) => base_objects_from_files(),
    }
}

fn by_kind<T: DeserializeOwned>(objects: &[Value], kind: &str) -> Vec<T> {
    objects
        .iter()
        .filter(|v| v.get("kind").and_then(Value::as_str) == Some(kind))
        .map(|v| serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{}: {e}", object_id(v))))
        .collect()
}

fn one<T: DeserializeOwned>(objects: &[Value], kind: &str) -> T {
    let mut all: Vec<T> = by_kind(objects, kind);
    assert_eq!(all.len(), 1, "expected exactly one {kind}");
    all.remove(0)
}

// ---------------------------------------------------------------------------------------
// The DaemonSet's arguments

/// The agent's argv as the kubelet would start it: `$(VAR)` expanded from the container's
/// env (values, ConfigMap keys of `objects`, the Downward API), `$$` -> `$`. A reference
/// that does not resolve is an error (the kubelet would pass it on literally).
fn expanded_agent_argv(objects: &[Value]) -> Result<Vec<String>, String> {
    let ds: DaemonSet = one(objects, "DaemonSet");
    let ns = ds.metadata.namespace.clone().unwrap_or_default();
    let pod = ds.spec.template.spec.as_ref().ok_or("DaemonSet without a pod spec")?;
    let [c] = pod.containers.as_slice() else { return Err("expected one container".into()) };
    let configmaps: Vec<ConfigMap> = by_kind(objects, "ConfigMap");
    let mut env = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            v.clone()
        } else if let Some(from) = &e.value_from {
            if let Some(r) = &from.config_map_key_ref {
                let cm = configmaps
                    .iter()
                    .find(|cm| {
                        cm.metadata.name.as_deref() == Some(r.name.as_str())
                            && cm.metadata.namespace.as_deref() == Some(&ns)
                    })
                    .ok_or_else(|| format!("env {}: no ConfigMap {ns}/{}", e.name, r.name))?;
                cm.data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .cloned()
                    .ok_or_else(|| format!("env {}: ConfigMap {} has no key {}", e.name, r.name, r.key))?
            } else if let Some(f) = &from.field_ref {
                match f.field_path.as_str() {
                    "spec.nodeName" => "kind-worker".into(),
                    other => return Err(format!("env {}: unexpected fieldRef {other}", e.name)),
                }
            } else {
                return Err(format!("env {}: unsupported valueFrom", e.name));
            }
        } else {
            String::new()
        };
        env.insert(e.name.clone(), value);
    }
    // The kubelet's $(VAR) expansion, as the pod-spec e2e runs it.
    let expand = |arg: &str| proxy_tests::podman::expand(arg, &env).map_err(|e| e.to_string());
    let mut argv = vec!["ebpf-proxy".to_string()];
    for a in c.command.iter().flatten().chain(c.args.iter().flatten()) {
        argv.push(expand(a)?);
    }
    Ok(argv)
}

/// The DaemonSet's arguments parse as `ebpf-proxy agent` flags and agree with the pod:
/// the HTTP port is the probed port, the bpffs root is on the bpffs mount.
fn check_agent_args(objects: &[Value], origin: &str) -> proxy_userspace::cli::AgentArgs {
    let argv = expanded_agent_argv(objects).unwrap_or_else(|e| panic!("{origin}: {e}"));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{origin}: the agent rejects {argv:?}:\n{e}"));
    let CliCommand::Agent(args) = cli.command else { panic!("{origin}: {argv:?} is not `ebpf-proxy agent`") };
    assert!(
        args.source.manifests.is_none() && args.source.kubeconfig.is_none(),
        "{origin}: the DaemonSet must use the in-cluster config"
    );
    if let Err(e) = proxy_userspace::source::apiserver::parse(args.source.api_server.as_deref().unwrap_or_default()) {
        panic!("{origin}: {e}");
    }
    assert!(
        !args.pod_iface_pattern.is_empty() && args.pod_iface_pattern.iter().all(|p| !p.is_empty()),
        "{origin}: {argv:?}"
    );
    if let Err(e) = proxy_userspace::agent::config::nodeport_addresses(&args.nodeport_addresses) {
        panic!("{origin}: {e}: {argv:?}");
    }

    let ds: DaemonSet = one(objects, "DaemonSet");
    let pod = ds.spec.template.spec.unwrap();
    let c = &pod.containers[0];
    let http = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("http")).expect("a port named http");
    assert_eq!(i32::from(args.http_addr.port()), http.container_port, "{origin}: --http-addr vs containerPort");
    for (probe, path) in [(&c.liveness_probe, "/livez"), (&c.readiness_probe, "/readyz")] {
        let get =
            probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("{origin}: no {path} probe"));
        assert_eq!(get.path.as_deref(), Some(path), "{origin}");
        let port = match &get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s == "http",
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p == http.container_port,
        };
        assert!(port, "{origin}: {path} probe is not on the agent's port");
    }
    let bpffs = c.volume_mounts.iter().flatten().find(|m| m.name == "bpffs").expect("bpffs mount");
    assert!(
        args.bpffs_root.starts_with(&bpffs.mount_path),
        "{origin}: --bpffs-root {} is not under the bpffs mount",
        args.bpffs_root.display()
    );
    let node_name = c.env.iter().flatten().find(|e| e.name == "NODE_NAME").expect("NODE_NAME env");
    assert_eq!(
        node_name.value_from.as_ref().and_then(|f| f.field_ref.as_ref()).map(|f| f.field_path.as_str()),
        Some("spec.nodeName"),
        "{origin}: NODE_NAME must come from the Downward API"
    );
    args
}

/// The issue's requirements on the pod, so an edit cannot quietly drop one.
fn check_daemonset_policy(objects: &[Value], origin: &str) {
    let ds: DaemonSet = one(objects, "DaemonSet");
    let spec = ds.spec;
    let ru = spec.update_strategy.as_ref().and_then(|u| u.rolling_update.as_ref()).expect("rolling update");
    assert_eq!(spec.update_strategy.as_ref().unwrap().type_.as_deref(), Some("RollingUpdate"), "{origin}");
    assert_eq!(ru.max_unavailable, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)), "{origin}");
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true), "{origin}: hostNetwork");
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"), "{origin}");
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "{origin}: must tolerate every taint"
    );
    let sas: Vec<ServiceAccount> = by_kind(objects, "ServiceAccount");
    assert!(sas.iter().any(|sa| sa.metadata.name == pod.service_account_name), "{origin}: serviceAccountName");
    let c = &pod.containers[0];
    assert!(
        c.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")),
        "{origin}: requests"
    );
    assert!(
        c.resources.as_ref().and_then(|r| r.limits.as_ref()).is_some_and(|r| r.contains_key("memory")),
        "{origin}: memory limit"
    );
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "{origin}: must not be privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{origin}");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.clone().unwrap_or_default(), vec!["ALL".to_string()], "{origin}: drop ALL");
    let added: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
    let want: BTreeSet<String> = ["BPF", "NET_ADMIN", "PERFMON"].map(String::from).into();
    assert_eq!(added, want, "{origin}: capabilities (document any addition in daemonset.yaml and docs/deploy.md)");
    let host_paths: BTreeSet<String> =
        pod.volumes.iter().flatten().filter_map(|v| v.host_path.as_ref()).map(|h| h.path.clone()).collect();
    assert_eq!(host_paths, ["/sys/fs/bpf", "/sys/fs/cgroup"].map(String::from).into(), "{origin}: hostPath volumes");
    // Every ConfigMap key feeds the agent: no dead settings.
    let cm: ConfigMap = one(objects, "ConfigMap");
    let used: BTreeSet<String> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value_from.as_ref()?.config_map_key_ref.as_ref().map(|r| r.key.clone()))
        .collect();
    let keys: BTreeSet<String> = cm.data.unwrap_or_default().into_keys().collect();
    assert_eq!(keys, used, "{origin}: ConfigMap keys vs the keys the DaemonSet reads");
}

// ---------------------------------------------------------------------------------------
// RBAC

/// (apiGroup, resource) of each `Api::<T>` in the agent's Kubernetes source.
fn watched_resources() -> BTreeSet<(String, String)> {
    let path = root().join("proxy-userspace/src/source/kube.rs");
    let src = std::fs::read_to_string(&path).unwrap();
    let known: BTreeMap<&str, (&str, &str)> = [
        ("Service", (Service::GROUP, Service::URL_PATH_SEGMENT)),
        ("EndpointSlice", (EndpointSlice::GROUP, EndpointSlice::URL_PATH_SEGMENT)),
        ("Node", (Node::GROUP, Node::URL_PATH_SEGMENT)),
        ("ServiceCIDR", (ServiceCIDR::GROUP, ServiceCIDR::URL_PATH_SEGMENT)),
        ("Pod", (Pod::GROUP, Pod::URL_PATH_SEGMENT)),
        ("Namespace", (Namespace::GROUP, Namespace::URL_PATH_SEGMENT)),
        ("ConfigMap", (ConfigMap::GROUP, ConfigMap::URL_PATH_SEGMENT)),
    ]
    .into();
    let mut out = BTreeSet::new();
    for (i, _) in src.match_indices("Api::<") {
        let ty: String = src[i + 6..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let (g, r) = known
            .get(ty.as_str())
            .unwrap_or_else(|| panic!("{}: Api::<{ty}>: add it to the ClusterRole and to this table", path.display()));
        out.insert((g.to_string(), r.to_string()));
    }
    assert!(!out.is_empty(), "{}: found no `Api::<T>` watchers; update watched_resources()", path.display());
    out
}

fn check_rbac(objects: &[Value], origin: &str) {
    let role: ClusterRole = one(objects, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{origin}: {rule:?}");
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let want: BTreeSet<(String, String, String)> = watched_resources()
        .into_iter()
        .flat_map(|(g, r)| ["get", "list", "watch"].map(move |v| (g.clone(), r.clone(), v.to_string())))
        .collect();
    assert_eq!(granted, want, "{origin}: the ClusterRole must grant exactly get/list/watch on what the agent watches");
    assert!(
        by_kind::<Value>(objects, "Role").is_empty() && by_kind::<Value>(objects, "RoleBinding").is_empty(),
        "{origin}"
    );

    let binding: ClusterRoleBinding = one(objects, "ClusterRoleBinding");
    assert_eq!(
        (binding.role_ref.kind.as_str(), Some(binding.role_ref.name.as_str())),
        ("ClusterRole", role.metadata.name.as_deref()),
        "{origin}"
    );
    let ds: DaemonSet = one(objects, "DaemonSet");
    let sa = ds.spec.template.spec.unwrap().service_account_name;
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{origin}: one subject");
    assert_eq!(
        (subjects[0].kind.as_str(), Some(subjects[0].name.clone()), subjects[0].namespace.clone()),
        ("ServiceAccount", sa, ds.metadata.namespace),
        "{origin}: the binding's subject must be the DaemonSet's ServiceAccount"
    );
}

// ---------------------------------------------------------------------------------------
// Helm vs Kustomize

/// Labels and annotations only Helm adds; everything else must match.
const HELM_ONLY_LABELS: [&str; 3] = ["helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version"];
const HELM_ONLY_ANNOTATIONS: [&str; 1] = ["checksum/config"];

fn strip_helm_metadata(mut v: Value) -> Value {
    for meta in ["/metadata", "/spec/template/metadata"] {
        let Some(Value::Object(m)) = v.pointer_mut(meta) else { continue };
        for (field, drop) in [("labels", &HELM_ONLY_LABELS[..]), ("annotations", &HELM_ONLY_ANNOTATIONS[..])] {
            if let Some(Value::Object(map)) = m.get_mut(field) {
                for k in drop {
                    map.remove(*k);
                }
                if map.is_empty() {
                    m.remove(field);
                }
            }
        }
    }
    v
}

fn keyed(objects: Vec<Value>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for v in objects {
        let id = object_id(&v);
        assert!(out.insert(id.clone(), v).is_none(), "{id} twice");
    }
    out
}

fn assert_same_objects(helm: Vec<Value>, kustomize: Vec<Value>, what: &str) {
    let h = keyed(helm.into_iter().map(strip_helm_metadata).collect());
    let k = keyed(kustomize);
    let hk: Vec<&String> = h.keys().collect();
    let kk: Vec<&String> = k.keys().collect();
    assert_eq!(hk, kk, "{what}: Helm and Kustomize render different objects");
    let mut errors = Vec::new();
    for (id, kv) in &k {
        let mut d = Vec::new();
        diff(kv, &h[id], "", ("Kustomize", "Helm"), &mut d);
        if !d.is_empty() {
            errors.push(format!("{id}:\n  {}", d.join("\n  ")));
        }
    }
    assert!(errors.is_empty(), "{what}:\n{}", errors.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn every_manifest_is_a_strict_kubernetes_object() {
    let files = manifest_files();
    let mut count = 0;
    let mut errors = Vec::new();
    for f in &files {
        let objects = read_objects(f);
        assert!(!objects.is_empty(), "{}: no objects", f.display());
        for v in &objects {
            count += 1;
            if let Err(e) = check_object(v, &f.strip_prefix(root()).unwrap().display().to_string()) {
                errors.push(e);
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    // 6 base objects + the kind e2e workloads.
    assert!(count >= 13, "only {count} objects in {files:?}");
}

#[test]
fn strict_parsing_catches_misspelled_and_mistyped_fields() {
    let ds = base_objects_from_files().into_iter().find(|v| v["kind"] == "DaemonSet").unwrap();
    check_object(&ds, "daemonset").unwrap();

    let mut typo = ds.clone();
    typo["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let e = check_object(&typo, "typo").unwrap_err();
    assert!(e.contains("/spec/template/spec/hostNetwrok"), "{e}");

    let mut nested = ds.clone();
    nested["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] =
        serde_json::json!({"add": ["SYS_ADMIN"]});
    assert!(check_object(&nested, "nested").unwrap_err().contains("capabilites"));

    let mut mistyped = ds.clone();
    mistyped["spec"]["template"]["spec"]["hostNetwork"] = Value::String("yes".into());
    assert!(check_object(&mistyped, "mistyped").is_err());

    // An unquoted number in a ConfigMap is a YAML int, not the string the API wants.
    let cm = parse_stream("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {sync-delay-ms: 50}\n", "cm");
    assert!(check_object(&cm[0], "cm").is_err());
}

#[test]
fn kustomization_lists_every_base_manifest() {
    let k = kustomization();
    assert_eq!((k.api_version.as_str(), k.kind.as_str()), ("kustomize.config.k8s.io/v1beta1", "Kustomization"));
    let mut on_disk: Vec<String> = std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    on_disk.sort();
    let mut listed = k.resources.clone();
    listed.sort();
    assert_eq!(listed, on_disk, "manifests/kustomization.yaml resources vs the YAML files beside it");
}

#[test]
fn kustomize_renders_exactly_the_base_files() {
    if let Err(why) = kubectl() {
        missing_tool("kustomize_renders_exactly_the_base_files", &why);
    }
    let rendered = kustomize_render();
    check_all(&rendered, "kubectl kustomize manifests/");
    let kinds: BTreeSet<String> = rendered.iter().map(|v| v["kind"].as_str().unwrap().to_string()).collect();
    let want: BTreeSet<String> =
        ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]
            .map(String::from)
            .into();
    assert_eq!(kinds, want);
    // No transformers: what the files say is what the cluster gets.
    assert_eq!(keyed(rendered), keyed(base_objects_from_files()));
}

#[test]
fn daemonset_args_are_flags_the_agent_accepts() {
    let objects = base_objects();
    let args = check_agent_args(&objects, "kustomize base");
    let defaults = proxy_userspace::cli::DEFAULT_POD_IFACE_PATTERNS.split(',').collect::<Vec<_>>();
    assert_eq!(args.pod_iface_pattern, defaults, "the ConfigMap carries the agent's default patterns");
    assert_eq!(args.http_addr.port(), 10256);
    // Health on every address (the kubelet probes it), metrics on loopback (kube-proxy's
    // 127.0.0.1:10249), so /metrics is not open to the network by default.
    assert!(args.http_addr.ip().is_unspecified(), "{}", args.http_addr);
    assert_eq!(args.metrics_addr, "127.0.0.1:10249".parse().unwrap());

    // A broken reference is caught, not passed on literally.
    let mut broken = objects.clone();
    let ds = broken.iter_mut().find(|v| v["kind"] == "DaemonSet").unwrap();
    ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array_mut()
        .unwrap()
        .push(Value::String("--log-format=$(NO_SUCH_VAR)".into()));
    assert!(expanded_agent_argv(&broken).unwrap_err().contains("NO_SUCH_VAR"));
    // And so is a flag the agent does not have.
    let mut unknown = objects;
    let ds = unknown.iter_mut().find(|v| v["kind"] == "DaemonSet").unwrap();
    ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array_mut()
        .unwrap()
        .push(Value::String("--no-such-flag".into()));
    let argv = expanded_agent_argv(&unknown).unwrap();
    assert!(Cli::try_parse_from(&argv).is_err());
}

#[test]
fn daemonset_meets_the_deployment_requirements() {
    check_daemonset_policy(&base_objects(), "kustomize base");
}

#[test]
fn clusterrole_grants_exactly_what_the_watchers_use() {
    let objects = base_objects();
    check_rbac(&objects, "kustomize base");
    let verbs: BTreeSet<String> =
        one::<ClusterRole>(&objects, "ClusterRole").rules.unwrap().into_iter().flat_map(|r| r.verbs).collect();
    assert_eq!(verbs, ["get", "list", "watch"].map(String::from).into(), "no create/patch (events are not used)");
}

#[test]
fn helm_chart_renders_the_same_objects_as_kustomize() {
    let helm = match helm() {
        Ok(h) => h,
        Err(why) => missing_tool("helm_chart_renders_the_same_objects_as_kustomize", &why),
    };
    // Kustomize with docs/deploy.md's overlay, which sets the API server address Helm is given.
    if let Err(why) = kubectl() {
        missing_tool("helm_chart_renders_the_same_objects_as_kustomize", &why);
    }
    let kustomize = docs_overlay_render();
    let defaults = helm_render(&helm, &[]);
    check_all(&defaults, "helm template (defaults)");
    check_agent_args(&defaults, "helm (defaults)");
    check_daemonset_policy(&defaults, "helm (defaults)");
    check_rbac(&defaults, "helm (defaults)");
    // Default values: everything but the Namespace, which Helm users create with
    // `--create-namespace` (a chart-owned Namespace would clash with it).
    let without_ns: Vec<Value> = kustomize.iter().filter(|v| v["kind"] != "Namespace").cloned().collect();
    assert_eq!(without_ns.len() + 1, kustomize.len());
    assert_same_objects(defaults, without_ns, "helm template (default values)");
    // With namespace.create=true: exactly the Kustomize base.
    let with_ns = helm_render(&helm, &["namespace.create=true"]);
    check_all(&with_ns, "helm template (namespace.create=true)");
    assert_same_objects(with_ns, kustomize, "helm template --set namespace.create=true");
}

#[test]
fn helm_values_reach_the_agent() {
    let helm = match helm() {
        Ok(h) => h,
        Err(why) => missing_tool("helm_values_reach_the_agent", &why),
    };
    let objects = helm_render(
        &helm,
        &[
            "image.repository=example.org/proxy",
            "image.tag=v9",
            "podIfacePatterns={eth*,lxc*}",
            "uplinks={eth0,eth1}",
            "nodePortAddresses={192.168.0.0/16}",
            "logFormat=text",
            "httpPort=10999",
            "metricsAddress=0.0.0.0:10249",
            "extraArgs={--max-conntrack=1048576}",
            "apiServer.host=172.18.0.2",
            "apiServer.port=443",
            "resources.limits.memory=1Gi",
        ],
    );
    check_all(&objects, "helm template (custom values)");
    let args = check_agent_args(&objects, "helm (custom values)");
    assert_eq!(args.pod_iface_pattern, vec!["eth*", "lxc*"]);
    assert_eq!(args.uplink, vec!["eth0", "eth1"]);
    assert_eq!(args.nodeport_addresses, vec!["192.168.0.0/16"]);
    // `primary` (kube-proxy >= 1.29) passes the schema and reaches the agent as its mode.
    let primary = check_agent_args(&helm_render(&helm, &["nodePortAddresses={primary}"]), "helm (primary)");
    assert_eq!(
        proxy_userspace::agent::config::nodeport_addresses(&primary.nodeport_addresses).unwrap(),
        proxy_userspace::model::node::NodePortAddresses::Primary
    );
    assert_eq!(args.log_format, proxy_userspace::cli::LogFormat::Text);
    assert_eq!(args.http_addr.port(), 10999);
    assert_eq!(args.metrics_addr, "0.0.0.0:10249".parse().unwrap());
    assert_eq!(args.max_conntrack, 1048576);
    assert_eq!(args.source.api_server.as_deref(), Some("https://172.18.0.2:443"));
    let ds: DaemonSet = one(&objects, "DaemonSet");
    let c = ds.spec.template.spec.unwrap().containers.remove(0);
    assert_eq!(c.image.as_deref(), Some("example.org/proxy:v9"));
    assert_eq!(c.resources.unwrap().limits.unwrap()["memory"].0, "1Gi");
    // The north-south values: the defaults are the agent's (no flag rendered, as kustomize),
    // others reach it as flags.
    use proxy_userspace::model::{LbAlgorithm, node::LbMode};
    assert_eq!((args.lb_mode, args.lb_algorithm, args.maglev_table_size), (LbMode::Snat, LbAlgorithm::Random, 16381));
    assert!(args.service_cidr.is_empty());
    let ns = check_agent_args(
        &helm_render(
            &helm,
            &[
                "lbMode=hybrid",
                "lbAlgorithm=maglev",
                "maglevTableSize=65521",
                "serviceCidrs={10.96.0.0/12,fd00:10:96::/112}",
            ],
        ),
        "helm (north-south)",
    );
    assert_eq!((ns.lb_mode, ns.lb_algorithm, ns.maglev_table_size), (LbMode::Hybrid, LbAlgorithm::Maglev, 65521));
    assert_eq!(ns.service_cidr, vec!["10.96.0.0/12", "fd00:10:96::/112"]);
}

/// `kubectl kustomize manifests/<dir>`.
fn kustomize_render_dir(dir: &str) -> Vec<Value> {
    let text = output(Command::new("kubectl").arg("kustomize").arg(manifests_dir().join(dir)))
        .unwrap_or_else(|e| panic!("kubectl kustomize manifests/{dir}: {e}"));
    parse_stream(&text, &format!("kubectl kustomize manifests/{dir}"))
}

/// The DaemonSets of `objects` whose component label is `component`.
fn daemonsets_of(objects: &[Value], component: &str) -> Vec<Value> {
    objects
        .iter()
        .filter(|v| v["kind"] == "DaemonSet" && v["metadata"]["labels"]["app.kubernetes.io/component"] == component)
        .cloned()
        .collect()
}

/// Bootstrap without kube-proxy: Helm refuses to render without the API server's address
/// (naming the value), `auto` without a cluster to read kube-public/cluster-info from says
/// so, and every explicit form reaches the agent as a URL it accepts.
#[test]
fn helm_requires_the_api_server_address_or_auto() {
    let helm = match helm() {
        Ok(h) => h,
        Err(why) => missing_tool("helm_requires_the_api_server_address_or_auto", &why),
    };
    let e = helm_template(&helm, &["apiServer.host="]).unwrap_err();
    assert!(e.contains("apiServer.host is required"), "{e}");
    let e = helm_template(&helm, &["apiServer.host=auto"]).unwrap_err();
    assert!(e.contains("kube-public/cluster-info") && e.contains("set apiServer.host"), "{e}");
    for (host, port, url) in [
        ("10.0.0.1", "6443", "https://10.0.0.1:6443"),
        ("10.0.0.1:8443", "6443", "https://10.0.0.1:8443"),
        ("api.example.com", "443", "https://api.example.com:443"),
        ("https://api.example.com:9443", "6443", "https://api.example.com:9443"),
        ("fd00::1", "6443", "https://[fd00::1]:6443"),
        ("[fd00::1]:443", "6443", "https://[fd00::1]:443"),
    ] {
        let objects = helm_render(&helm, &[&format!("apiServer.host={host}"), &format!("apiServer.port={port}")]);
        let args = check_agent_args(&objects, &format!("helm apiServer.host={host}"));
        assert_eq!(args.source.api_server.as_deref(), Some(url), "apiServer.host={host}");
        let parsed = proxy_userspace::source::apiserver::parse(url).unwrap().unwrap();
        assert_eq!(parsed.to_string().trim_end_matches('/'), url, "the agent reads apiServer.host={host} as given");
    }
}

/// A stand-in for the API server `helm install` talks to: discovery for the chart's kinds
/// (Helm maps each object to a resource before its dry run), 404 for the chart's own
/// objects (nothing installed yet), and kube-public/cluster-info holding a kubeadm-style
/// kubeconfig whose server is `server`. Serves until the test process ends.
fn cluster_info_server(server: &str) -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let kubeconfig =
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: \"\"\n  cluster:\n    server: {server}\n");
    let group = |name: &str| {
        let gv = format!("{name}/v1");
        serde_json::json!({"name": name, "versions": [{"groupVersion": gv, "version": "v1"}],
            "preferredVersion": {"groupVersion": gv, "version": "v1"}})
    };
    let resources = |gv: &str, list: &[(&str, &str, bool)]| {
        let r: Vec<Value> = list
            .iter()
            .map(|(name, kind, ns)| {
                serde_json::json!({"name": name, "singularName": kind.to_lowercase(),
                "namespaced": ns, "kind": kind, "verbs": ["get", "list"]})
            })
            .collect();
        serde_json::json!({"kind": "APIResourceList", "groupVersion": gv, "resources": r})
    };
    let routes: BTreeMap<&str, Value> = [
        (
            "/version",
            serde_json::json!({"major": "1", "minor": "31", "gitVersion": "v1.31.0", "platform": "linux/amd64"}),
        ),
        ("/api", serde_json::json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})),
        (
            "/apis",
            serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [group("apps"), group("rbac.authorization.k8s.io")]}),
        ),
        (
            "/api/v1",
            resources(
                "v1",
                &[
                    ("configmaps", "ConfigMap", true),
                    ("serviceaccounts", "ServiceAccount", true),
                    ("namespaces", "Namespace", false),
                ],
            ),
        ),
        ("/apis/apps/v1", resources("apps/v1", &[("daemonsets", "DaemonSet", true)])),
        (
            "/apis/rbac.authorization.k8s.io/v1",
            resources(
                "rbac.authorization.k8s.io/v1",
                &[("clusterroles", "ClusterRole", false), ("clusterrolebindings", "ClusterRoleBinding", false)],
            ),
        ),
        (
            "/api/v1/namespaces/kube-public/configmaps/cluster-info",
            serde_json::json!({"kind": "ConfigMap",
            "apiVersion": "v1", "metadata": {"name": "cluster-info", "namespace": "kube-public"},
            "data": {"kubeconfig": kubeconfig}}),
        ),
    ]
    .into_iter()
    .collect();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            // The headers: read and ignored (GETs only, no body).
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/");
            let (status, body) = match routes.get(path) {
                Some(v) => ("200 OK", v.to_string()),
                None => (
                    "404 Not Found",
                    r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#
                        .to_string(),
                ),
            };
            let _ = write!(
                &stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

/// `apiServer.host=auto` on a kubeadm cluster: `helm install` (here its server-side dry run,
/// which runs the chart's lookups against the cluster) reads the API server's address from
/// kube-public/cluster-info, as `kubeadm join` does, and the agent gets it.
#[test]
fn helm_auto_reads_the_api_server_from_cluster_info() {
    let helm = match helm() {
        Ok(h) => h,
        Err(why) => missing_tool("helm_auto_reads_the_api_server_from_cluster_info", &why),
    };
    let api = cluster_info_server("https://192.0.2.77:6443");
    let dir = std::env::temp_dir().join(format!("epx-helm-auto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'http://{api}'}}}}]\n\
             contexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\nusers: [{{name: u, user: {{}}}}]\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&helm);
    cmd.args(["template", "ebpf-proxy"]).arg(chart_dir()).args(["--namespace", "ebpf-proxy"]);
    cmd.args(["--set", "apiServer.host=auto", "--dry-run=server", "--disable-openapi-validation", "--kubeconfig"]);
    let text = output(cmd.arg(&kubeconfig));
    let _ = std::fs::remove_dir_all(&dir);
    let objects = parse_stream(&text.expect("helm template --dry-run=server"), "helm apiServer.host=auto");
    let args = check_agent_args(&objects, "helm apiServer.host=auto");
    assert_eq!(args.source.api_server.as_deref(), Some("https://192.0.2.77:6443"));
}

/// The chart's guard rails: `helm lint --strict` passes, and values.schema.json refuses
/// each bad value at install time naming it (before, each of these rendered: a bogus mode
/// or port crash-looped the pod, a non-numeric delay silently became 0).
#[test]
fn helm_schema_refuses_bad_values_and_lint_is_strict_clean() {
    let helm = match helm() {
        Ok(h) => h,
        Err(why) => missing_tool("helm_schema_refuses_bad_values_and_lint_is_strict_clean", &why),
    };
    let lint = Command::new(&helm)
        .args(["lint", "--strict"])
        .arg(chart_dir())
        .args(["--set", &format!("apiServer.host={API_SERVER_HOST}")])
        .output()
        .unwrap();
    assert!(lint.status.success(), "helm lint --strict:\n{}", String::from_utf8_lossy(&lint.stdout));
    for (set, names) in [
        ("socketLb=bogus", "/socketLb"),
        ("lbMode=direct", "/lbMode"),
        ("lbAlgorithm=hash", "/lbAlgorithm"),
        ("serviceCidrs={10.96.0.0}", "/serviceCidrs/0"),
        ("httpPort=abc", "/httpPort"),
        ("httpPort=70000", "/httpPort"),
        ("syncDelayMs=abc", "/syncDelayMs"),
        ("logFormat=xml", "/logFormat"),
        ("metricsAddress=localhost", "/metricsAddress"),
        ("nodePortAddresses={10.0.0.0}", "/nodePortAddresses/0"),
        ("nodePortAddresses={primary,10.0.0.0/8}", "/nodePortAddresses"),
        ("extraArgs={max-conntrack=5}", "/extraArgs/0"),
        ("apiServer.port=0", "/apiServer/port"),
        ("seccompProfile=none", "/seccompProfile"),
        ("podIfacePatterns=null", "podIfacePatterns"),
        ("sockeLb=on", "sockeLb"),
    ] {
        let e = helm_template(&helm, &[set]).expect_err(set);
        assert!(e.contains("schema") && e.contains(names), "--set {set}: {e}");
    }
}

/// extraArgs may replace any flag the chart sets (the agent refuses a flag given twice, so
/// before this the pod crash-looped), and the values an operator expects reach the pod.
#[test]
fn helm_extra_args_override_the_charts_flags_and_pod_values_apply() {
    let helm = match helm() {
        Ok(h) => h,
        Err(why) => missing_tool("helm_extra_args_override_the_charts_flags_and_pod_values_apply", &why),
    };
    let objects = helm_render(
        &helm,
        &[
            "extraArgs={--log-format=text,--socket-lb=off,--max-conntrack=1048576}",
            "cgroupRoot=/sys/fs/cgroup/unified",
            "updateStrategy.rollingUpdate.maxUnavailable=10%",
            "extraEnv[0].name=RUST_LOG",
            "extraEnv[0].value=debug",
            "podLabels.team=net",
            "imagePullSecrets[0].name=regcred",
            "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=ebpf",
            "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
        ],
    );
    check_all(&objects, "helm template (overrides)");
    let args = check_agent_args(&objects, "helm (overrides)");
    assert_eq!(args.log_format, proxy_userspace::cli::LogFormat::Text);
    assert_eq!(args.max_conntrack, 1048576);
    let argv = expanded_agent_argv(&objects).unwrap();
    assert_eq!(argv.iter().filter(|a| a.starts_with("--socket-lb")).collect::<Vec<_>>(), ["--socket-lb=off"]);
    let ds: DaemonSet = one(&objects, "DaemonSet");
    let ru = ds.spec.update_strategy.as_ref().unwrap().rolling_update.as_ref().unwrap();
    assert_eq!(
        ru.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("10%".into()))
    );
    let tpl = ds.spec.template;
    assert_eq!(tpl.metadata.unwrap().labels.unwrap()["team"], "net");
    let pod = tpl.spec.unwrap();
    assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "regcred");
    assert!(pod.affinity.unwrap().node_affinity.is_some());
    let cgroup = pod.volumes.unwrap().into_iter().find(|v| v.name == "cgroup").unwrap();
    assert_eq!(cgroup.host_path.unwrap().path, "/sys/fs/cgroup/unified");
    let env = pod.containers[0].env.clone().unwrap();
    assert!(env.iter().any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug")));
}

/// Kustomize: the base leaves `api-server` empty (the agent then names the setting when it
/// cannot reach the ClusterIP), and docs/deploy.md's overlay sets it without a patch of the
/// pod spec: the agent gets `--api-server` with the overlay's address.
#[test]
fn kustomize_overlay_in_the_docs_sets_the_api_server() {
    if let Err(why) = kubectl() {
        missing_tool("kustomize_overlay_in_the_docs_sets_the_api_server", &why);
    }
    let base = check_agent_args(&kustomize_render(), "kustomize base");
    assert_eq!(base.source.api_server.as_deref(), Some(""));
    let objects = docs_overlay_render();
    check_all(&objects, "docs/deploy.md's overlay");
    let args = check_agent_args(&objects, "docs/deploy.md's overlay");
    assert_eq!(args.source.api_server.as_deref(), Some(API_SERVER_URL));
    let cm: ConfigMap = one(&objects, "ConfigMap");
    assert_eq!(cm.metadata.name.as_deref(), Some("ebpf-proxy-config"), "the overlay merges, no renamed copy");
}

/// The uninstall step: a DaemonSet that runs `ebpf-proxy cleanup` on every node, on the
/// agent's bpffs root and with the agent's image (`agent`: the objects of the same render),
/// with what cleanup needs and nothing it does not; with `kube_proxy`, one more init
/// container runs `cleanup --kube-proxy` with the node's tools.
fn check_uninstall(objects: &[Value], agent: &[Value], origin: &str, kube_proxy: bool) {
    use proxy_userspace::cli::CleanupArgs;
    check_all(objects, origin);
    assert_eq!(objects.len(), 1, "{origin}: only the DaemonSet");
    let ds: DaemonSet = one(objects, "DaemonSet");
    // The agent's namespace may be deleted already.
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"), "{origin}");
    // The agent's objects of the same render (a Helm render holds both DaemonSets).
    let agent: Vec<Value> =
        agent.iter().filter(|v| daemonsets_of(&[(*v).clone()], "cleanup").is_empty()).cloned().collect();
    let agent_args = check_agent_args(&agent, origin);
    let agent_ds: DaemonSet = one(&agent, "DaemonSet");
    let agent_image = agent_ds.spec.template.spec.unwrap().containers[0].image.clone();
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true), "the programs are on the host's interfaces");
    assert_eq!(pod.automount_service_account_token, Some(false), "no API access needed");
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "must run on every node the agent ran on"
    );
    let parse = |c: &k8s_openapi::api::core::v1::Container| -> CleanupArgs {
        let mut argv = vec!["ebpf-proxy".to_string()];
        argv.extend(c.args.clone().unwrap_or_default());
        match Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}")).command {
            CliCommand::Cleanup(a) => a,
            other => panic!("{argv:?} is not `ebpf-proxy cleanup`: {other:?}"),
        }
    };
    let inits = pod.init_containers.clone().unwrap_or_default();
    let init = inits.first().expect("the cleanup init container");
    let first = parse(init);
    assert_eq!(first.bpffs_root, vec![agent_args.bpffs_root.clone()], "{origin}: cleans the agent's root");
    assert!(
        !first.force && !first.keep_running && !first.kube_proxy,
        "never pulls the datapath from under a live agent"
    );
    let [main] = pod.containers.as_slice() else { panic!("one container") };
    let again = parse(main);
    assert!(again.keep_running && again.bpffs_root == first.bpffs_root && !again.kube_proxy);
    for c in [init, main] {
        assert_eq!(c.image, agent_image, "{origin}: {} runs another image than the agent", c.name);
        let caps = c.security_context.as_ref().and_then(|s| s.capabilities.as_ref()).expect("capabilities");
        assert_eq!(caps.drop.clone().unwrap_or_default(), vec!["ALL".to_string()]);
        let added: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
        assert_eq!(added, ["BPF", "NET_ADMIN", "SYS_ADMIN"].map(String::from).into(), "{}", c.name);
        assert_ne!(c.security_context.as_ref().unwrap().privileged, Some(true));
        let m = c.volume_mounts.iter().flatten().find(|m| m.name == "bpffs").expect("bpffs mount");
        assert!(first.bpffs_root[0].starts_with(&m.mount_path));
    }
    let host_paths: BTreeSet<String> =
        pod.volumes.iter().flatten().filter_map(|v| v.host_path.as_ref()).map(|h| h.path.clone()).collect();
    if !kube_proxy {
        assert_eq!(inits.len(), 1, "{origin}: kube-proxy's leftovers are removed only when asked");
        assert_eq!(host_paths, ["/sys/fs/bpf".to_string()].into());
        return;
    }
    let [_, kp] = inits.as_slice() else { panic!("{origin}: the cleanup and kube-proxy init containers") };
    let a = parse(kp);
    assert!(a.kube_proxy && !a.keep_running, "{origin}: {:?}", kp.args);
    let host = a.host_root.expect("--host-root: the image has no iptables/nft, the node's run chrooted");
    assert_eq!(kp.image, agent_image);
    let sc = kp.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.clone().unwrap_or_default(), vec!["ALL".to_string()]);
    let added: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
    assert_eq!(added, ["NET_ADMIN", "NET_RAW", "SYS_CHROOT"].map(String::from).into(), "{origin}");
    let mounts: BTreeMap<String, (String, Option<bool>)> =
        kp.volume_mounts.iter().flatten().map(|m| (m.mount_path.clone(), (m.name.clone(), m.read_only))).collect();
    assert_eq!(mounts[host.to_str().unwrap()], ("host-root".to_string(), Some(true)), "the node's root, read-only");
    assert_eq!(mounts[&format!("{}/run/xtables.lock", host.display())].0, "xtables-lock");
    assert_eq!(host_paths, ["/sys/fs/bpf", "/", "/run/xtables.lock"].map(String::from).into());
}

#[test]
fn uninstall_cleanup_daemonset_cleans_every_node() {
    let files = read_objects(&manifests_dir().join("uninstall/cleanup-daemonset.yaml"));
    check_uninstall(&files, &base_objects(), "uninstall/cleanup-daemonset.yaml", false);
    if let Err(why) = kubectl() {
        missing_tool("uninstall_cleanup_daemonset_cleans_every_node (Kustomize part)", &why);
    }
    // `kubectl apply -k manifests/uninstall` applies exactly the file.
    let rendered = kustomize_render_dir("uninstall");
    assert_eq!(keyed(rendered), keyed(files));
    let with_kp = kustomize_render_dir("uninstall-kube-proxy");
    check_uninstall(&with_kp, &base_objects(), "kubectl kustomize manifests/uninstall-kube-proxy", true);
}

#[test]
fn helm_uninstall_renders_the_same_as_kustomize() {
    let helm = match helm() {
        Ok(h) => h,
        Err(why) => missing_tool("helm_uninstall_renders_the_same_as_kustomize", &why),
    };
    // Off by default.
    assert!(
        daemonsets_of(&helm_render(&helm, &[]), "cleanup").is_empty(),
        "the cleanup DaemonSet is rendered by default"
    );
    let (plain, with_kp) = match kubectl() {
        Ok(()) => (kustomize_render_dir("uninstall"), kustomize_render_dir("uninstall-kube-proxy")),
        Err(why) => missing_tool("helm_uninstall_renders_the_same_as_kustomize", &why),
    };
    for (sets, kustomize, kube_proxy) in [
        (&["uninstall.enabled=true"][..], plain, false),
        (&["uninstall.enabled=true", "uninstall.kubeProxy=true"][..], with_kp, true),
    ] {
        let objects = helm_render(&helm, sets);
        let cleanup = daemonsets_of(&objects, "cleanup");
        check_uninstall(&cleanup, &objects, &format!("helm {sets:?}"), kube_proxy);
        assert_same_objects(cleanup, kustomize, &format!("helm {sets:?} vs Kustomize"));
    }
    // The image and root follow the values, as the agent's do.
    let objects = helm_render(
        &helm,
        &["uninstall.enabled=true", "uninstall.kubeProxy=true", "image.repository=example.org/proxy", "image.tag=v9"],
    );
    let cleanup = daemonsets_of(&objects, "cleanup");
    check_uninstall(&cleanup, &objects, "helm (custom image)", true);
    let ds: DaemonSet = one(&cleanup, "DaemonSet");
    let pod = ds.spec.template.spec.unwrap();
    for c in pod.init_containers.unwrap().iter().chain(&pod.containers) {
        assert_eq!(c.image.as_deref(), Some("example.org/proxy:v9"), "{}", c.name);
    }
    let objects = helm_render(&helm, &["uninstall.enabled=true", "uninstall.bpffsRoot=/sys/fs/bpf/other"]);
    let ds: DaemonSet = one(&daemonsets_of(&objects, "cleanup"), "DaemonSet");
    let args = ds.spec.template.spec.unwrap().containers[0].args.clone().unwrap();
    assert!(args.contains(&"--bpffs-root=/sys/fs/bpf/other".to_string()), "{args:?}");
    // The schema refuses a root off the bpffs mount, and misspelled keys.
    for (set, names) in [("uninstall.bpffsRoot=/tmp/x", "/uninstall/bpffsRoot"), ("uninstall.enable=true", "enable")] {
        let e = helm_template(&helm, &[set]).expect_err(set);
        assert!(e.contains("schema") && e.contains(names), "--set {set}: {e}");
    }
}

/// manifests/kind/cluster.yaml, strictly (kind's own schema, the fields we use).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindCluster {
    kind: String,
    api_version: String,
    name: String,
    networking: KindNetworking,
    nodes: Vec<KindNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindNetworking {
    kube_proxy_mode: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KindNode {
    role: String,
}

#[test]
fn kind_cluster_has_no_kube_proxy_and_two_workers() {
    let p = manifests_dir().join("kind/cluster.yaml");
    let c: KindCluster =
        serde_yaml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!((c.kind.as_str(), c.api_version.as_str()), ("Cluster", "kind.x-k8s.io/v1alpha4"));
    assert!(!c.name.is_empty());
    assert_eq!(c.networking.kube_proxy_mode, "none");
    let roles: Vec<&str> = c.nodes.iter().map(|n| n.role.as_str()).collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);
}

#[test]
fn kind_workloads_match_the_e2e_plan() {
    let objects = read_objects(&manifests_dir().join("kind/workloads.yaml"));
    let deploy: Deployment = one(&objects, "Deployment");
    assert_eq!(deploy.spec.replicas, Some(3));
    let services: Vec<Service> = by_kind(&objects, "Service");
    let spec = |name: &str| {
        services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .and_then(|s| s.spec.clone())
            .unwrap_or_else(|| panic!("Service {name}"))
    };
    assert_eq!(spec("echo-affinity").session_affinity.as_deref(), Some("ClientIP"));
    assert_eq!(spec("echo-local").external_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(spec("echo-nodeport").type_.as_deref(), Some("NodePort"));
    let pods: Vec<Pod> = by_kind(&objects, "Pod");
    assert!(pods.iter().any(|p| p.metadata.name.as_deref() == Some("client")));
}
