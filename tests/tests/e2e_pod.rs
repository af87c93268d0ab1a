//! The DaemonSet's own pod spec, run end to end under podman (issue 20 item 2): what the
//! kind e2e checks on a cluster, on a machine that has no kubelet, no Docker and no
//! registry.
//!
//! The image is built with `cargo xtask image`'s code (`xtask::image::assemble`, on the
//! debug binary the tests already built). The install is rendered with Kustomize (an
//! overlay as a user writes one: the image retagged, the API server's address) and with
//! Helm (`helm template` with `--set apiServer.host=...`), and the agent container is taken exactly as
//! rendered (`proxy_tests::podman::RunSpec`) and run with podman in a node network
//! namespace the test builds, against the fake API server over HTTPS with a service-account
//! token and CA mounted where the in-cluster config reads them. What cannot be 1:1:
//! - hostPath `/sys/fs/bpf` is the test's own bpffs directory, and the cgroup v2 root the
//!   test's own child cgroup, mounted at the paths the spec names (the flags stay as
//!   rendered: `--cgroup-root` points at the mount): the container's agent never pins in
//!   the machine's bpffs root nor attaches socket programs at the machine's cgroup root;
//! - seccomp RuntimeDefault is podman's default profile with bpf()/perf_event_open()
//!   allowed under CAP_BPF/CAP_PERFMON, as containerd >= 1.7 and Docker >= 20.10 do
//!   (podman 4.3's own ties them to CAP_SYS_ADMIN);
//! - the env has the kubelet's `KUBERNETES_SERVICE_HOST/PORT` (the `kubernetes`
//!   ClusterIP, which nothing serves before the agent runs), as on a node: the install's
//!   API-server setting must take the agent past them.
//!
//! Checked: readiness and liveness through the spec's probe paths and ports from the node;
//! a ClusterIP from a pod and from a hostNetwork process (socket-level LB, in the test's
//! cgroup); a NodePort from an outside namespace; the API requests carried the token;
//! `podman stop` with the spec's grace period ends the agent cleanly (exit 0) while traffic
//! keeps flowing on the pinned datapath; then the uninstall DaemonSet's containers, run the
//! same way, leave nothing attached (netns, cgroup) and nothing pinned. A second test
//! removes one capability from the rendered spec and checks the pod then fails.
//!
//! Containers, the image, namespaces, pins and the cgroup are removed by guards, also when
//! the test fails. Skips (saying why) where podman, buildah, runc, kubectl or helm are
//! unusable.
use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{TempDir, converge, http_get, under_load},
    client,
    fake_apiserver::{FakeApiServer, ServeOptions, ServerTls, bind_in_netns, write_service_account_dir},
    harness::{PinDir, TestCgroup, require_root, unique},
    netns::{Cluster, Netns, node_ip, wait_for},
    podman::{self, Host, PodmanContainer, PodmanImage, RunSpec},
};
use serde::Deserialize;
use serde_json::{Value, json};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const SOCKCLIENT: &str = env!("CARGO_BIN_EXE_proxy-sockclient");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
const NODE_PORT: u16 = 30080;
/// The API server listens on the node's own address, as a control-plane node's does.
const API_PORT: u16 = 6443;
/// What the kubelet puts in every container's env: the `kubernetes` Service's ClusterIP.
const KUBERNETES_CLUSTER_IP: &str = "10.96.0.1";
const NAMESPACE: &str = "ebpf-proxy";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The machine cannot run the test (`cargo xtask setup` installs podman, kubectl and helm):
/// fail with the reason, never pass unrun.
fn missing_tool(test: &str, reason: &str) -> ! {
    panic!("{test} cannot run: {reason}");
}

/// Why this machine cannot run the test, if it cannot.
fn unusable() -> Option<String> {
    if let Some(why) = podman::unusable() {
        return Some(why);
    }
    for (tool, args) in [("kubectl", &["version", "--client"][..]), ("helm", &["version", "--short"][..])] {
        if let Err(e) = podman::output(Command::new(tool).args(args)) {
            return Some(format!("{tool} is not usable: {e}"));
        }
    }
    None
}

/// A YAML stream -> its documents.
fn parse_stream(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `to` relative to directory `from` (Kustomize refuses absolute resource paths).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let up = from.components().count() - 1;
    let mut p = PathBuf::new();
    for _ in 0..up {
        p.push("..");
    }
    p.join(to.strip_prefix("/").expect("absolute path"))
}

fn image_parts(image: &str) -> (&str, &str) {
    image.rsplit_once(':').expect("image with a tag")
}

/// The install, rendered the way a user renders it.
#[derive(Clone, Copy, Debug)]
enum Renderer {
    /// `kubectl kustomize` of an overlay: `resources: [manifests/]`, the image retagged,
    /// the API server's address in the ConfigMap (`api-server`).
    Kustomize,
    /// `helm template` of the chart with `--set`.
    Helm,
}

/// The name of the DaemonSet labelled `app.kubernetes.io/component: <component>`.
fn daemonset_of(objects: &[Value], component: &str) -> Option<String> {
    objects
        .iter()
        .filter(|v| v.get("kind").and_then(Value::as_str) == Some("DaemonSet"))
        .find(|v| v.pointer("/metadata/labels/app.kubernetes.io~1component").and_then(Value::as_str) == Some(component))
        .and_then(|v| v.pointer("/metadata/name").and_then(Value::as_str).map(String::from))
}

/// The agent's objects, and the uninstall DaemonSet's: the chart's own when it renders
/// one, else `manifests/uninstall/` retagged by an overlay.
fn render(renderer: Renderer, dir: &Path, image: &str, api: SocketAddr) -> (Vec<Value>, Vec<Value>) {
    let (repo, tag) = image_parts(image);
    let kubectl_kustomize = |overlay: &Path| {
        parse_stream(&podman::output(Command::new("kubectl").arg("kustomize").arg(overlay)).expect("kubectl kustomize"))
    };
    let images = format!("images:\n  - name: {}\n    newName: {repo}\n    newTag: {tag}\n", xtask::image::REPOSITORY);
    let uninstall_file = || {
        let d = dir.join("uninstall");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(workspace().join("manifests/uninstall/cleanup-daemonset.yaml"), d.join("cleanup-daemonset.yaml"))
            .unwrap();
        std::fs::write(d.join("kustomization.yaml"), format!("resources: [cleanup-daemonset.yaml]\n{images}")).unwrap();
        kubectl_kustomize(&d)
    };
    let install = match renderer {
        Renderer::Kustomize => {
            let d = dir.join("overlay");
            std::fs::create_dir_all(&d).unwrap();
            // The API server's own address, set as docs/deploy.md tells a user to: one key
            // of the base's ConfigMap.
            let overlay = format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [{}]\n{images}\
                 configMapGenerator:\n  - name: ebpf-proxy-config\n    namespace: {NAMESPACE}\n\
                 \x20   behavior: merge\n    literals:\n      - api-server=https://{api}\n",
                relative(&d, &workspace().join("manifests")).display(),
            );
            std::fs::write(d.join("kustomization.yaml"), overlay).unwrap();
            kubectl_kustomize(&d)
        }
        Renderer::Helm => {
            let mut cmd = Command::new("helm");
            cmd.args(["template", "ebpf-proxy"]).arg(workspace().join("manifests/helm/ebpf-proxy"));
            cmd.args(["--namespace", NAMESPACE]);
            for set in [
                format!("image.repository={repo}"),
                format!("image.tag={tag}"),
                format!("apiServer.host={}", api.ip()),
                format!("apiServer.port={}", api.port()),
                // The chart's own uninstall DaemonSet (rendered beside the agent here; a
                // user renders it alone after `helm uninstall`).
                "uninstall.enabled=true".to_string(),
            ] {
                cmd.args(["--set", &set]);
            }
            parse_stream(&podman::output(&mut cmd).expect("helm template"))
        }
    };
    let uninstall = match renderer {
        Renderer::Helm if daemonset_of(&install, "cleanup").is_some() => install.clone(),
        _ => uninstall_file(),
    };
    (install, uninstall)
}

/// Programs attached to `cgroup` at the socket-level hooks the agent uses (BPF_PROG_QUERY).
fn cgroup_programs(cgroup: &Path) -> u32 {
    /// `union bpf_attr` as BPF_PROG_QUERY reads it (the tail zeroed).
    #[repr(C)]
    #[derive(Default)]
    struct ProgQuery {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        _tail: [u64; 4],
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    /// BPF_CGROUP_INET{4,6}_CONNECT, UDP{4,6}_SENDMSG, UDP{4,6}_RECVMSG, INET{4,6}_GETPEERNAME.
    const HOOKS: [u32; 8] = [10, 11, 14, 15, 19, 20, 29, 30];
    let dir = std::fs::File::open(cgroup).expect("open cgroup");
    HOOKS
        .iter()
        .map(|hook| {
            let mut q = ProgQuery { target_fd: dir.as_raw_fd() as u32, attach_type: *hook, ..Default::default() };
            // SAFETY: BPF_PROG_QUERY reads and writes only the struct we own, whose size we pass;
            // with no prog_ids buffer the kernel only writes the count.
            let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &mut q, std::mem::size_of::<ProgQuery>()) };
            assert_eq!(r, 0, "BPF_PROG_QUERY {hook} on {}: {}", cgroup.display(), std::io::Error::last_os_error());
            q.prog_cnt
        })
        .sum()
}

/// `ebpf-proxy`'s attachments (tcx, XDP, clsact) in `ns`, as the kernel reports them.
fn netns_attachments(ns: &Netns) -> Vec<String> {
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(proxy_userspace::dataplane::attach::ownership::scan()).expect("scan attachments")
    })
    .iter()
    .map(|a| format!("{a:?}"))
    .collect()
}

/// One HTTP probe as the kubelet makes it against a hostNetwork pod: from the node, to the
/// pod's IP (the node's), within the probe's timeout. 200..=399 is success.
fn probe_ok(node: &Netns, ip: Ipv4Addr, probe: &podman::HttpProbe) -> bool {
    let addr = SocketAddr::from((ip, probe.port));
    let t = Instant::now();
    node.run(|| http_get(addr, &probe.path)).is_ok_and(|(code, _)| (200..400).contains(&code))
        && t.elapsed() <= probe.timeout.max(Duration::from_secs(1))
}

/// `tcp VIP:PORT` from a process on the node (hostNetwork) inside `cgroup`.
fn host_process_connect(node: &Netns, cgroup: &Path, to: SocketAddr) -> String {
    let mut child = Command::new(SOCKCLIENT)
        .args(["--cgroup", cgroup.to_str().unwrap(), "--netns", &node.name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("proxy-sockclient");
    child.stdin.take().unwrap().write_all(format!("tcp {to}\nquit\n").as_bytes()).unwrap();
    let out = child.wait_with_output().expect("proxy-sockclient output");
    String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap_or("").to_string()
}

/// A node (with three pods, the first two serving) behind an underlay with an outside
/// client, the fake API server on the node's address over HTTPS with a token, and the
/// test's own bpffs directory, cgroup, service-account files and seccomp profile.
struct Env {
    cluster: Cluster,
    api: FakeApiServer,
    pins: PinDir,
    cgroup: TestCgroup,
    files: TempDir,
    image: PodmanImage,
    image_build: Duration,
}

impl Env {
    fn new() -> Env {
        let mut cluster = Cluster::new(1, 3).expect("cluster");
        cluster.start_servers(SERVER, TARGET_PORT).expect("servers");
        let node = &cluster.nodes[0];
        let api_addr = SocketAddr::from((node.ip, API_PORT));
        let tls = ServerTls::self_signed(&[node.ip.into()]).expect("certificates");
        let ca_pem = tls.ca_pem.clone();
        let token = unique("e2e-pod-token-");
        let listener = bind_in_netns(&node.ns.name, api_addr).expect("bind the API server in the node");
        let api =
            FakeApiServer::start_background_with(listener, ServeOptions { tls: Some(tls), token: Some(token.clone()) })
                .expect("fake apiserver");
        let objects = [
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name},
                   "status": {"addresses": [{"type": "InternalIP", "address": node.ip.to_string()}]}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                   "spec": {"type": "NodePort", "clusterIP": VIP.to_string(), "clusterIPs": [VIP.to_string()],
                            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": TARGET_PORT,
                                       "nodePort": NODE_PORT, "protocol": "TCP"}]}}),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "web-1", "namespace": "default",
                                "labels": {"kubernetes.io/service-name": "web"}},
                   "addressType": "IPv4",
                   "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
                   "endpoints": node.pods[..2].iter().map(|p| json!({
                       "addresses": [p.ip.to_string()], "nodeName": node.name,
                       "conditions": {"ready": true, "serving": true, "terminating": false}})).collect::<Vec<_>>()}),
        ];
        api.apply_node(serde_json::from_value(objects[0].clone()).unwrap());
        api.apply_service(serde_json::from_value(objects[1].clone()).unwrap());
        api.apply_endpointslice(serde_json::from_value(objects[2].clone()).unwrap());

        let pins = PinDir::new();
        std::fs::create_dir_all(&pins.0).expect("bpffs directory");
        let cgroup = TestCgroup::new().expect("test cgroup");
        let files = TempDir::new("ebpf-proxy-e2e-pod-").expect("temp dir");
        write_service_account_dir(&files.0.join("serviceaccount"), &token, &ca_pem, NAMESPACE).unwrap();
        podman::runtime_default_seccomp(&files.0.join("seccomp.json")).expect("seccomp profile");

        // `cargo xtask image`'s own code, on the binary the tests run.
        let bin = proxy_tests::agent::ebpf_proxy_bin().expect("ebpf-proxy binary");
        let image = PodmanImage { tag: format!("{}:{}", xtask::image::REPOSITORY, unique("e2e-")) };
        let t = Instant::now();
        xtask::image::assemble(&bin, &image.tag).expect("image build");
        let image_build = t.elapsed();
        Env { cluster, api, pins, cgroup, files, image, image_build }
    }

    fn node(&self) -> &proxy_tests::netns::ClusterNode {
        &self.cluster.nodes[0]
    }

    fn api_addr(&self) -> SocketAddr {
        (node_ip(0), API_PORT).into()
    }

    fn host(&self) -> Host {
        Host {
            netns: self.node().ns.name.clone(),
            host_paths: BTreeMap::from([
                ("/sys/fs/bpf".to_string(), self.pins.0.clone()),
                ("/sys/fs/cgroup".to_string(), self.cgroup.path.clone()),
            ]),
            service_account_dir: self.files.0.join("serviceaccount"),
            kubelet_env: vec![
                ("KUBERNETES_SERVICE_HOST".into(), KUBERNETES_CLUSTER_IP.into()),
                ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
            ],
            runtime_default_seccomp: self.files.0.join("seccomp.json"),
        }
    }

    /// What the agent left pinned in the test's bpffs directory.
    fn pinned(&self) -> Vec<String> {
        fn walk(p: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                out.push(e.path().display().to_string());
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.pins.0, &mut out);
        out
    }
}

fn pod_spec_runs_under_podman(test: &str, renderer: Renderer) {
    require_root(test);
    if let Some(why) = unusable() {
        missing_tool(test, &why);
    }
    let env = Env::new();
    let node = env.node();
    let size = xtask::image::image_size(&env.image.tag).expect("image size");
    eprintln!("{test}: image {} built in {:.1?}, {:.1} MB", env.image.tag, env.image_build, size as f64 / 1e6);
    let (install, uninstall) = render(renderer, &env.files.0, &env.image.tag, env.api_addr());
    let mut spec = RunSpec::from_rendered(&install, "ebpf-proxy", "agent", &node.name).expect("agent container");
    assert_eq!(spec.image, env.image.tag, "the rendered image is the one built");
    // To find out whether a capability is needed: EBPF_PROXY_E2E_DROP_CAPS=PERFMON,... runs
    // the rendered spec without them.
    if let Ok(drop) = std::env::var("EBPF_PROXY_E2E_DROP_CAPS") {
        spec.cap_add.retain(|c| !drop.split(',').any(|d| d.trim() == c));
        eprintln!("{test}: EBPF_PROXY_E2E_DROP_CAPS: running with capabilities {:?}", spec.cap_add);
    }
    let args = spec.podman_args(&env.host()).expect("podman args");
    eprintln!("{test}: podman run {}", args.join(" "));

    let started = Instant::now();
    let agent = PodmanContainer::start(&unique("e2e-agent-"), &args).expect("podman run");
    let readiness = spec.readiness.clone().expect("the agent has a readiness probe");
    let liveness = spec.liveness.clone().expect("the agent has a liveness probe");
    // Until ready, or the container exits (a bad flag, a missing capability or library).
    let outcome = wait_for(Duration::from_secs(60), "readiness probe", || {
        if probe_ok(&node.ns, node.ip, &readiness) {
            Some(true)
        } else {
            (!agent.running().unwrap_or(false)).then_some(false)
        }
    });
    if !outcome.as_ref().is_ok_and(|ready| *ready) {
        panic!("agent not ready ({outcome:?}), exit code {:?}:\n{}", agent.exit_code(), agent.logs());
    }
    let ready = started.elapsed();
    eprintln!("{test}: ready (readiness probe {}:{}) {ready:.2?} after podman run", readiness.path, readiness.port);
    // The kubelet starts liveness probes after initialDelaySeconds; one failing
    // failureThreshold times in a row gets the container killed.
    std::thread::sleep(liveness.initial_delay.saturating_sub(started.elapsed()));
    assert!(probe_ok(&node.ns, node.ip, &liveness), "liveness probe failed:\n{}", agent.logs());

    // The agent read the API over HTTPS with the mounted token, and never without it.
    assert!(env.api.requests().iter().any(|r| r.contains("watch=true")), "{:?}", env.api.requests());
    assert_eq!(env.api.unauthorized_requests(), 0, "requests without the service account's token");

    // A ClusterIP from a pod (TC path), from a hostNetwork process (socket-level LB at the
    // cgroup the spec mounts), a NodePort from outside (XDP on the detected uplink).
    let vip = SocketAddr::from((VIP, SERVICE_PORT));
    let client_pod = &node.pods[2].ns;
    converge(client_pod, vip, &["n1p0", "n1p1"]);
    assert!(cgroup_programs(&env.cgroup.path) > 0, "no socket program on the mounted cgroup:\n{}", agent.logs());
    let answer = host_process_connect(&node.ns, &env.cgroup.path, vip);
    assert!(answer.starts_with("ok n1p"), "hostNetwork process to {vip}: {answer:?}");
    let nodeport = SocketAddr::from((node.ip, NODE_PORT));
    converge(&env.cluster.client, nodeport, &["n1p0", "n1p1"]);
    assert!(agent.running().unwrap() && agent.restarts().unwrap() == 0, "{}", agent.logs());

    // SIGTERM with the spec's grace period: the agent ends cleanly and in time, and the
    // pinned datapath keeps serving while no agent runs.
    let mut stopped = Duration::ZERO;
    let (ok, failed) = under_load(client_pod, vip, || {
        std::thread::sleep(Duration::from_millis(300));
        stopped = agent.stop(spec.grace_period).expect("podman stop");
        std::thread::sleep(Duration::from_millis(300));
    });
    eprintln!(
        "{test}: podman stop -t {} took {stopped:.2?}; {ok} ok, {failed} failed meanwhile",
        spec.grace_period.as_secs()
    );
    let logs = agent.logs();
    assert_eq!(agent.exit_code().unwrap(), 0, "the agent did not exit cleanly on SIGTERM:\n{logs}");
    assert!(stopped < spec.grace_period, "the agent needed SIGKILL after {stopped:?}");
    assert!(ok > 10 && failed == 0, "{ok} ok, {failed} failed across the agent's stop");
    assert_eq!(client::tcp_names_from(&env.cluster.client, nodeport, 10), client::name_set(&["n1p0", "n1p1"]));
    assert!(!env.pinned().is_empty() && !netns_attachments(&node.ns).is_empty());

    // Uninstall: the cleanup DaemonSet's init container, then its idling one, as rendered.
    let cleanup_ds = daemonset_of(&uninstall, "cleanup").expect("the uninstall DaemonSet");
    let cleanup = RunSpec::from_rendered(&uninstall, &cleanup_ds, "cleanup", &node.name).expect("cleanup");
    let (code, out) = PodmanContainer::run_to_completion(
        &unique("e2e-cleanup-"),
        &cleanup.podman_args(&env.host()).expect("podman args"),
        Duration::from_secs(60),
    )
    .expect("cleanup container");
    eprintln!("{test}: cleanup said:\n{out}");
    assert_eq!(code, 0, "cleanup failed:\n{out}");
    let done = RunSpec::from_rendered(&uninstall, &cleanup_ds, "done", &node.name).expect("done container");
    let idle = PodmanContainer::start(&unique("e2e-cleanup-done-"), &done.podman_args(&env.host()).unwrap()).unwrap();
    wait_for(Duration::from_secs(20), "the second cleanup's report", || {
        idle.logs().contains("nothing to clean up").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", idle.logs()));
    assert!(idle.running().unwrap(), "the uninstall pod must keep running:\n{}", idle.logs());
    let t = idle.stop(done.grace_period).unwrap();
    assert!(t < done.grace_period, "--keep-running ignored SIGTERM");

    assert_eq!(netns_attachments(&node.ns), Vec::<String>::new(), "attached after uninstall");
    assert_eq!(cgroup_programs(&env.cgroup.path), 0, "socket programs on the cgroup after uninstall");
    assert_eq!(env.pinned(), Vec::<String>::new(), "pinned after uninstall");
    assert!(client_pod.run(|| client::tcp_name(vip)).is_err(), "the ClusterIP still answers after uninstall");
}

#[test]
#[ignore = "needs root (podman, BPF, network namespaces): run by `cargo xtask test` as root"]
fn kustomize_pod_spec_runs_under_podman() {
    pod_spec_runs_under_podman("kustomize_pod_spec_runs_under_podman", Renderer::Kustomize);
}

#[test]
#[ignore = "needs root (podman, BPF, network namespaces): run by `cargo xtask test` as root"]
fn helm_pod_spec_runs_under_podman() {
    pod_spec_runs_under_podman("helm_pod_spec_runs_under_podman", Renderer::Helm);
}

/// The same run catches a spec that lacks a capability the agent needs: without BPF the
/// pod never becomes ready and the agent says why.
#[test]
#[ignore = "needs root (podman, BPF, network namespaces): run by `cargo xtask test` as root"]
fn pod_spec_without_cap_bpf_never_becomes_ready() {
    let test = "pod_spec_without_cap_bpf_never_becomes_ready";
    require_root(test);
    if let Some(why) = unusable() {
        missing_tool(test, &why);
    }
    let env = Env::new();
    let node = env.node();
    let (install, _) = render(Renderer::Kustomize, &env.files.0, &env.image.tag, env.api_addr());
    let mut spec = RunSpec::from_rendered(&install, "ebpf-proxy", "agent", &node.name).expect("agent container");
    let before = spec.cap_add.len();
    spec.cap_add.retain(|c| c != "BPF");
    assert_eq!(spec.cap_add.len(), before - 1, "the rendered spec adds BPF: {:?}", spec.cap_add);
    let agent = PodmanContainer::start(&unique("e2e-agent-nobpf-"), &spec.podman_args(&env.host()).unwrap()).unwrap();
    let readiness = spec.readiness.clone().unwrap();
    let exited = wait_for(Duration::from_secs(30), "the agent to give up", || (!agent.running().ok()?).then_some(()));
    assert!(!probe_ok(&node.ns, node.ip, &readiness), "ready without CAP_BPF:\n{}", agent.logs());
    let logs = agent.logs();
    assert!(exited.is_ok() && agent.exit_code().unwrap() != 0, "the agent kept running without CAP_BPF:\n{logs}");
    assert!(logs.contains("CAP_BPF") || logs.to_lowercase().contains("permission"), "{logs}");
    let pinned = env.pinned();
    assert!(pinned.iter().all(|p| !p.contains("/maps/") && !p.contains("/links/")), "{pinned:?}");
}
