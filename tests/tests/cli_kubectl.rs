//! The CLI is kubectl-like (issue 21 item 5): `-o table|wide|json|yaml`, `--no-headers`,
//! filters on `services`, `backends` and `conntrack` against the pinned maps of a real
//! agent; shell completion; `version` with the commit; KUBECONFIG lists and `--context`;
//! the `kubectl ebpf_proxy` plugin, run against a fake `kubectl` that records its arguments.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use proxy_tests::{
    agent::{Agent, TempDir, converge, ebpf_proxy_bin, service_yaml, slice_yaml},
    client::Held,
    fake_apiserver::{FakeApiServer, ResourceKind, write_kubeconfig},
    harness::{PinDir, require_root},
    netns::Topology,
};
use serde_json::Value;

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");

fn run(args: &[&str]) -> Output {
    Command::new(ebpf_proxy_bin().unwrap()).args(args).output().expect("running ebpf-proxy")
}

/// stdout of a run that must succeed.
fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "ebpf-proxy {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn completion_scripts_for_bash_zsh_and_fish() {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef ebpf-proxy"), ("fish", "complete -c ebpf-proxy")]
    {
        let script = ok(&["completion", shell]);
        assert!(script.contains(marker), "{shell}: {script}");
        // Subcommands and the new flags are offered.
        for word in ["conntrack", "no-headers", "namespace"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    // bash parses its script.
    let dir = TempDir::new("ebpf-proxy-completion-").unwrap();
    dir.write("ebpf-proxy.bash", &ok(&["completion", "bash"])).unwrap();
    let st = Command::new("bash").arg("-n").arg(dir.0.join("ebpf-proxy.bash")).status().unwrap();
    assert!(st.success());
    assert!(!run(&["completion", "powershell"]).status.success());
}

#[test]
fn version_prints_the_commit_and_build_date() {
    let text = ok(&["version"]);
    let flag = ok(&["--version"]);
    assert_eq!(text, flag);
    let v: Value = serde_json::from_str(&ok(&["version", "-o", "json"])).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let commit = v["commit"].as_str().unwrap();
    let date = v["build_date"].as_str().unwrap();
    assert_eq!(text.trim(), format!("ebpf-proxy {} (commit {commit}, built {date})", env!("CARGO_PKG_VERSION")));
    assert!(date.len() == 20 && date.ends_with('Z') && date.as_bytes()[10] == b'T', "{date}");
    // Built from a git checkout: the commit is one of this repository's.
    assert!(commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit()), "{commit}");
    let known = Command::new("git")
        .arg("-C")
        .arg(repo())
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .status()
        .unwrap();
    assert!(known.success(), "commit {commit} is not in this repository");
    let yaml: Value = serde_yaml::from_str(&ok(&["version", "-o", "yaml"])).unwrap();
    assert_eq!(yaml, v);
}

#[test]
fn help_shows_examples() {
    for cmd in [&["--help"][..], &["services", "--help"], &["conntrack", "--help"], &["completion", "--help"]] {
        let help = ok(cmd);
        let examples = help.split_once("\nExamples:\n").map(|(_, e)| e).unwrap_or_default();
        assert!(examples.lines().any(|l| l.starts_with("  ebpf-proxy ")), "{cmd:?}: {help}");
    }
}

/// `KUBECONFIG=a:b` is a list (as kubectl); `--context` picks a context of the second file.
/// On main the list was read as one file name, and there was no --context.
#[test]
fn kubeconfig_list_and_context_reach_the_right_api_server() {
    let server = FakeApiServer::start_background(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let svc: Value = serde_yaml::from_str(&service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    let slice: Value =
        serde_yaml::from_str(&slice_yaml("web", "web-1", &[("pod1", Ipv4Addr::new(10, 244, 1, 1))], 8080, "TCP"))
            .unwrap();
    server.apply_json(ResourceKind::Service, [svc]);
    server.apply_json(ResourceKind::EndpointSlice, [slice]);
    let dir = TempDir::new("ebpf-proxy-kubeconfigs-").unwrap();
    // The first file's context (current) is a server nobody listens on.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    write_kubeconfig(&dir.0.join("a.yaml"), &dead_url).unwrap();
    dir.write(
        "b.yaml",
        &format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: live\nclusters:\n- name: live\n  cluster:\n    server: {}\ncontexts:\n- name: live\n  context:\n    cluster: live\n    user: live\nusers:\n- name: live\n  user: {{}}\n",
            server.url()
        ),
    )
    .unwrap();
    let list = format!("{}:{}", dir.0.join("a.yaml").display(), dir.0.join("b.yaml").display());
    let explain = |context: Option<&str>| {
        let mut c = Command::new(ebpf_proxy_bin().unwrap());
        c.args(["explain", "default/web", "--node-name", "node-a", "-o", "json"]).env("KUBECONFIG", &list);
        c.env_remove("HTTPS_PROXY").env_remove("https_proxy").env_remove("HTTP_PROXY").env_remove("http_proxy");
        if let Some(ctx) = context {
            c.args(["--context", ctx]);
        }
        c.output().unwrap()
    };
    let out = explain(Some("live"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e: Value = serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(e["service"], "default/web");
    // Without --context: the first file's current-context, the dead server.
    let out = explain(None);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // An unknown context is named.
    let out = explain(Some("nope"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("context nope"), "{err}");
}

/// A fake `kubectl` on PATH that logs each call's arguments (one per line, then `--end--`)
/// and answers `get pods` with `$FAKE_PODS`.
struct Plugin {
    dir: TempDir,
}

impl Plugin {
    fn new() -> Self {
        let dir = TempDir::new("ebpf-proxy-plugin-").unwrap();
        dir.write(
            "kubectl",
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\" >> \"$FAKE_LOG\"; done\necho --end-- >> \"$FAKE_LOG\"\nif [ \"$1\" = get ] || [ \"$3\" = get ] || [ \"$5\" = get ]; then printf '%b' \"$FAKE_PODS\"; else echo \"ran in the pod\"; fi\n",
        )
        .unwrap();
        let st = Command::new("chmod").arg("+x").arg(dir.0.join("kubectl")).status().unwrap();
        assert!(st.success());
        Plugin { dir }
    }

    /// (exit code, stdout, stderr, kubectl calls).
    fn run(&self, pods: &str, args: &[&str]) -> (i32, String, String, Vec<Vec<String>>) {
        let log = self.dir.0.join("log");
        let _ = std::fs::remove_file(&log);
        let path = format!("{}:{}", self.dir.0.display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new("sh")
            .arg(repo().join("plugin/kubectl-ebpf_proxy"))
            .args(args)
            .env("PATH", path)
            .env("FAKE_LOG", &log)
            .env("FAKE_PODS", pods)
            .output()
            .unwrap();
        let calls = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .split("--end--\n")
            .filter(|c| !c.is_empty())
            .map(|c| c.lines().map(String::from).collect())
            .collect();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            calls,
        )
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn kubectl_plugin_execs_in_the_agent_pod_of_the_named_node() {
    let p = Plugin::new();
    let pods = "ebpf-proxy ebpf-proxy-x7k2p\\n";
    let (code, out, err, calls) = p.run(pods, &["--node", "worker-1", "services", "-n", "default", "-o", "wide"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "ran in the pod");
    let selector = "app.kubernetes.io/name=ebpf-proxy,app.kubernetes.io/component!=cleanup";
    let fields = "spec.nodeName=worker-1,status.phase=Running";
    let template = "jsonpath={range .items[*]}{.metadata.namespace}{\" \"}{.metadata.name}{\"\\n\"}{end}";
    assert_eq!(
        calls,
        vec![
            strings(&["get", "pods", "--all-namespaces", "-l", selector, "--field-selector", fields, "-o", template]),
            strings(&[
                "exec",
                "-n",
                "ebpf-proxy",
                "ebpf-proxy-x7k2p",
                "-c",
                "agent",
                "--",
                "ebpf-proxy",
                "services",
                "-n",
                "default",
                "-o",
                "wide"
            ]),
        ]
    );

    // kubectl's own flags and the agent's namespace go to both calls.
    let (code, _, err, calls) = p.run(
        pods,
        &[
            "--context",
            "prod",
            "--node=worker-2",
            "--agent-namespace",
            "kube-system",
            "conntrack",
            "--service",
            "default/web",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(calls[0][..6], strings(&["--context", "prod", "get", "pods", "-n", "kube-system"]));
    assert!(calls[0].contains(&"spec.nodeName=worker-2,status.phase=Running".to_string()), "{calls:?}");
    assert_eq!(calls[1][..4], strings(&["--context", "prod", "exec", "-n"]));
    assert_eq!(calls[1][calls[1].len() - 3..], strings(&["conntrack", "--service", "default/web"]));

    // Without --node: an error, and no kubectl call at all (never an arbitrary node).
    let (code, _, err, calls) = p.run(pods, &["services"]);
    assert_eq!(code, 2);
    assert!(err.contains("--node NODE is required"), "{err}");
    assert!(calls.is_empty(), "{calls:?}");

    // No agent on that node: said, and nothing is exec'd.
    let (code, _, err, calls) = p.run("", &["--node", "worker-9", "stats"]);
    assert_eq!(code, 1);
    assert!(err.contains("no running ebpf-proxy agent pod on node worker-9"), "{err}");
    assert_eq!(calls.len(), 1);
}

// ---- against the pinned maps of a real agent ----

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const API: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const OTHER_WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);

fn json(args: &[&str]) -> Vec<Value> {
    let text = ok(args);
    serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}")).as_array().unwrap().clone()
}

/// Whitespace-separated columns of each line.
fn columns(text: &str) -> Vec<usize> {
    text.lines().map(|l| l.split_whitespace().count()).collect()
}

fn ip_of(endpoint: &Value) -> IpAddr {
    endpoint.as_str().unwrap().parse::<SocketAddr>().unwrap().ip()
}

fn port_of(endpoint: &Value) -> u16 {
    endpoint.as_str().unwrap().parse::<SocketAddr>().unwrap().port()
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn output_formats_and_filters_against_a_real_agent() {
    require_root("output_formats_and_filters_against_a_real_agent");
    let mut topo = Topology::single_node(4, 77).expect("topology");
    for i in 1..4 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    let ep = |i: usize| (topo.pods[i].name.as_str(), topo.pods[i].ip);
    let dir = TempDir::new("ebpf-proxy-cli-kubectl-").unwrap();
    let other = |yaml: String| yaml.replace("namespace: default", "namespace: other");
    dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    dir.write("web-slice.yaml", &slice_yaml("web", "web-1", &[ep(1), ep(2)], 8080, "TCP")).unwrap();
    dir.write("api.yaml", &service_yaml("api", "10.96.0.11", 8081, 8080, "TCP")).unwrap();
    dir.write("api-slice.yaml", &slice_yaml("api", "api-1", &[ep(3)], 8080, "TCP")).unwrap();
    dir.write("other-web.yaml", &other(service_yaml("web", "10.96.0.12", 80, 8080, "TCP"))).unwrap();
    dir.write("other-web-slice.yaml", &other(slice_yaml("web", "web-o", &[ep(3)], 8080, "TCP"))).unwrap();
    let pins = PinDir::new();
    let manifests = dir.0.to_str().unwrap().to_string();
    // No entry may expire between two reads of the table.
    let agent = Agent::start(
        &topo.node,
        &pins.0,
        10777,
        &[
            "--manifests",
            &manifests,
            "--node-name",
            "node-a",
            "--conntrack-tcp-timeout-closed",
            "1h",
            "--conntrack-tcp-timeout-syn",
            "1h",
        ],
    )
    .expect("agent");
    agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("agent ready");
    let client = &topo.pods[0].ns;
    converge(client, (WEB, 80).into(), &["pod1", "pod2"]);
    converge(client, (API, 8081).into(), &["pod3"]);
    converge(client, (OTHER_WEB, 80).into(), &["pod3"]);
    let held: Vec<Held> = client
        .run(|| [(WEB, 80), (OTHER_WEB, 80)].into_iter().map(|a| Held::open(a.into())).collect::<anyhow::Result<_>>())
        .unwrap();

    let root = pins.0.to_str().unwrap();
    let with = |cmd: &str, extra: &[&str]| -> Vec<String> {
        let mut v = strings(&[cmd, "--bpffs-root", root]);
        v.extend(strings(extra));
        v
    };
    let run_with = |cmd: &str, extra: &[&str]| {
        let v = with(cmd, extra);
        ok(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let json_with = |cmd: &str, extra: &[&str]| {
        let v = with(cmd, extra);
        json(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // Every format of every listing parses, with its column counts.
    for (cmd, table_cols, wide_cols) in
        [("services", 7, 10), ("backends", 3, 5), ("conntrack", 11, 15), ("stats", 6, 6)]
    {
        let all = json_with(cmd, &["-o", "json"]);
        assert!(!all.is_empty(), "{cmd}");
        let yaml: Value = serde_yaml::from_str(&run_with(cmd, &["-o", "yaml"])).unwrap();
        assert_eq!(yaml.as_array().map(Vec::len), Some(all.len()), "{cmd} yaml");
        // stats: the uplink table (if any) follows a blank line.
        let rows_of = |t: String| t.split("\n\n").next().unwrap_or_default().to_string();
        let table = rows_of(run_with(cmd, &[]));
        let wide = rows_of(run_with(cmd, &["-o", "wide"]));
        let bare = rows_of(run_with(cmd, &["-o", "wide", "--no-headers"]));
        let bare_table = rows_of(run_with(cmd, &["--no-headers"]));
        assert_eq!(columns(&table), vec![table_cols; all.len() + 1], "{cmd}: {table}");
        assert_eq!(columns(&wide), vec![wide_cols; all.len() + 1], "{cmd}: {wide}");
        assert_eq!(columns(&bare), vec![wide_cols; all.len()], "{cmd}: {bare}");
        assert_eq!(columns(&bare_table), vec![table_cols; all.len()], "{cmd}: {bare_table}");
        let header = table.lines().next().unwrap().split_whitespace().next().unwrap().to_string();
        assert!(!bare.lines().chain(bare_table.lines()).any(|l| l.starts_with(&header)), "{cmd}: header in {bare}");
    }

    // services: each filter gives exactly the frontends it names.
    let services = |extra: &[&str]| -> BTreeSet<String> {
        json_with("services", &[&["-o", "json"], extra].concat())
            .iter()
            .map(|r| format!("{}/{}", r["namespace"].as_str().unwrap(), r["name"].as_str().unwrap()))
            .collect()
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(services(&[]), set(&["default/web", "default/api", "other/web"]));
    assert_eq!(services(&["-n", "default"]), set(&["default/web", "default/api"]));
    assert_eq!(services(&["--namespace", "other"]), set(&["other/web"]));
    assert_eq!(services(&["--service", "web"]), set(&["default/web", "other/web"]));
    assert_eq!(services(&["--service", "other/web"]), set(&["other/web"]));
    assert_eq!(services(&["-n", "default", "--service", "web"]), set(&["default/web"]));
    assert_eq!(services(&["--address", "10.96.0.11"]), set(&["default/api"]));
    assert_eq!(services(&["--port", "8081"]), set(&["default/api"]));
    assert_eq!(services(&["--port", "80", "--proto", "tcp"]), set(&["default/web", "other/web"]));
    // Nothing matches: nothing printed, exit 0 (kubectl's way), in every format.
    for extra in [&["--proto", "udp"][..], &["-n", "nope"], &["--address", "10.96.0.99"]] {
        assert_eq!(run_with("services", extra), "", "{extra:?}");
        assert_eq!(run_with("services", &[extra, &["-o", "wide"]].concat()), "", "{extra:?}");
        assert_eq!(json_with("services", &[extra, &["-o", "json"]].concat()), Vec::<Value>::new());
    }

    // backends: by Service, the backends of its frontends; by address and port, their own.
    let backends = |extra: &[&str]| -> BTreeSet<String> {
        json_with("backends", &[&["-o", "json"], extra].concat())
            .iter()
            .map(|r| format!("{}:{}", r["address"].as_str().unwrap(), r["port"]))
            .collect()
    };
    let at = |i: usize| format!("{}:8080", topo.pods[i].ip);
    assert_eq!(backends(&[]), [at(1), at(2), at(3)].into_iter().collect());
    assert_eq!(backends(&["--service", "default/web"]), [at(1), at(2)].into_iter().collect());
    assert_eq!(backends(&["-n", "other"]), [at(3)].into_iter().collect());
    assert_eq!(backends(&["--service", "api"]), [at(3)].into_iter().collect());
    let pod1 = topo.pods[1].ip.to_string();
    assert_eq!(backends(&["--address", &pod1]), [at(1)].into_iter().collect());
    assert_eq!(backends(&["--port", "8080", "--proto", "TCP"]).len(), 3);
    assert!(backends(&["--port", "80"]).is_empty());
    // wide names the Services a backend serves.
    let wide = run_with("backends", &["-o", "wide", "--address", &topo.pods[3].ip.to_string()]);
    let row: Vec<&str> = wide.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[4], "default/api,other/web", "{wide}");

    // conntrack: each filter returns exactly the entries of the unfiltered dump that match.
    let all = json_with("conntrack", &["-o", "json"]);
    let key = |r: &Value| format!("{} {} {} {}", r["direction"], r["source"], r["destination"], r["table"]);
    let conntrack = |extra: &[&str]| -> BTreeSet<String> {
        json_with("conntrack", &[&["-o", "json"], extra].concat()).iter().map(key).collect()
    };
    let expect =
        |pred: &dyn Fn(&Value) -> bool| -> BTreeSet<String> { all.iter().filter(|r| pred(r)).map(key).collect() };
    let svc_id = |ns: &str, name: &str| -> BTreeSet<u64> {
        json_with("services", &["-o", "json", "-n", ns, "--service", name])
            .iter()
            .map(|r| r["id"].as_u64().unwrap())
            .collect()
    };
    let other_ids = svc_id("other", "web");
    let by_other = conntrack(&["--service", "other/web"]);
    assert!(!by_other.is_empty());
    assert_eq!(by_other, expect(&|r| other_ids.contains(&r["service_id"].as_u64().unwrap())));
    assert_eq!(conntrack(&["-n", "other"]), by_other);
    let web_ids = svc_id("default", "web");
    let by_web = conntrack(&["--service", "web", "-n", "default"]);
    assert!(!by_web.is_empty());
    assert_eq!(by_web, expect(&|r| web_ids.contains(&r["service_id"].as_u64().unwrap())));
    let sides = ["source", "destination", "nat"];
    let vip: IpAddr = OTHER_WEB.into();
    let by_addr = conntrack(&["--address", "10.96.0.12"]);
    assert!(!by_addr.is_empty());
    assert_eq!(by_addr, expect(&|r| sides.iter().any(|s| ip_of(&r[*s]) == vip)));
    let by_port = conntrack(&["--port", "8081"]);
    assert!(!by_port.is_empty());
    assert_eq!(by_port, expect(&|r| sides.iter().any(|s| port_of(&r[*s]) == 8081)));
    assert_eq!(conntrack(&["--proto", "tcp"]).len(), all.len());
    assert_eq!(run_with("conntrack", &["--proto", "udp"]), "");
    assert_eq!(run_with("conntrack", &["--service", "nope/nope"]), "");
    drop(held);
    drop(agent);
}

/// A full assured table (262,144 entries, the default `--max-conntrack`): the dump lists
/// every entry, and a filter returns exactly the matching ones. Prints the time and peak
/// memory of each run (the rows are filtered as the map is walked and written line by line).
#[test]
#[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
fn conntrack_filters_a_full_table() {
    use proxy_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CtValue, PROTO_TCP, ct_flags, port_to_map};
    use proxy_tests::harness::{TestDataplane, ct_key};
    use proxy_userspace::dataplane::{maps::Maps, maps::addr::ip_to_map};
    require_root("conntrack_filters_a_full_table");
    let dp = TestDataplane::load();
    let mut maps = Maps::open_pinned(&dp.pins.0).expect("pinned maps");
    let capacity = maps.capacities().conntrack as usize;
    assert_eq!(capacity, 262_144);
    let flows = capacity / 2;
    let vips = 8;
    for i in 0..flows {
        let client = (Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8), 40_000 + (i / 65_536) as u16);
        let vip = (Ipv4Addr::new(10, 96, 0, 1 + (i % vips) as u8), 80);
        let backend = (Ipv4Addr::new(10, 244, 0, 1 + (i % vips) as u8), 8080);
        let v = |nat: (Ipv4Addr, u16)| CtValue {
            nat_addr: ip_to_map(nat.0),
            nat_port: port_to_map(nat.1),
            flags: ct_flags::SEEN_REPLY | ct_flags::ASSURED,
            svc_id: 1 + (i % vips) as u32,
            ..Default::default()
        };
        maps.conntrack.insert(ct_key(client, vip, PROTO_TCP, CT_DIR_FORWARD), v(backend), 0).unwrap();
        maps.conntrack.insert(ct_key(backend, client, PROTO_TCP, CT_DIR_REPLY), v(vip), 0).unwrap();
    }
    let root = dp.pins.0.to_str().unwrap();
    // (seconds, peak KiB, stdout) of `ebpf-proxy conntrack --bpffs-root ROOT <extra>`.
    let timed = |extra: &[&str]| {
        let out = Command::new("/usr/bin/time")
            .args(["-f", "%e %M"])
            .arg(ebpf_proxy_bin().unwrap())
            .args(["conntrack", "--bpffs-root", root])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        let err = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = err.lines().last().unwrap().split_whitespace().collect();
        let (secs, kib): (f64, u64) = (last[0].parse().unwrap(), last[1].parse().unwrap());
        eprintln!("conntrack {extra:?}: {secs:.2} s, {} MiB peak", kib / 1024);
        String::from_utf8(out.stdout).unwrap()
    };
    let table = timed(&[]);
    assert_eq!(table.lines().count(), capacity + 1);
    let json: Vec<Value> = serde_json::from_str(&timed(&["-o", "json"])).unwrap();
    assert_eq!(json.len(), capacity);
    // One VIP of eight: its forward entries (destination) and reply entries (NAT side).
    let vip: IpAddr = Ipv4Addr::new(10, 96, 0, 3).into();
    let filtered: Vec<Value> = serde_json::from_str(&timed(&["--address", "10.96.0.3", "-o", "json"])).unwrap();
    let want = json.iter().filter(|r| ip_of(&r["destination"]) == vip || ip_of(&r["nat"]) == vip).count();
    assert_eq!((filtered.len(), want), (capacity / vips, capacity / vips));
    assert!(filtered.iter().all(|r| ip_of(&r["destination"]) == vip || ip_of(&r["nat"]) == vip));
    let wide = timed(&["--address", "10.96.0.3", "--port", "8080", "-o", "wide", "--no-headers"]);
    assert_eq!(columns(&wide), vec![15; capacity / vips]);
    assert_eq!(timed(&["--address", "10.9.9.9"]), "");
}
