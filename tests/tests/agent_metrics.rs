//! /metrics of the real agent (in a node namespace, watching the fake API server): the
//! names and types operators' kube-proxy dashboards use, the OpenMetrics content type,
//! kube-proxy's network programming latency moving with an EndpointSlice change that
//! carries `endpoints.kubernetes.io/last-change-trigger-time`, and every metric the chart's
//! Grafana dashboard and PrometheusRule query present in a real scrape.
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use k8s_openapi::api::{core::v1::Node, discovery::v1::EndpointSlice};
use proxy_tests::{
    agent::{Agent, TempDir, converge, service_yaml, slice_yaml},
    fake_apiserver::{FakeApiServer, bind_in_netns, write_kubeconfig},
    harness::{PinDir, require_root},
    netns::{Topology, wait_for},
};
use serde_json::Value;

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// One node with `pods` pods (pod1.. serve), the fake API server holding Service `api`
/// with pod1 behind it, and the agent watching it.
struct Env {
    topo: Topology,
    api: FakeApiServer,
    agent: Agent,
    _pins: PinDir,
    _dir: TempDir,
}

impl Env {
    fn new(pods: usize, subnet: u8, http_port: u16, initial: impl FnOnce(&Topology) -> EndpointSlice) -> Env {
        let mut topo = Topology::single_node(pods, subnet).expect("topology");
        for i in 1..pods {
            topo.start_server(SERVER, i, 8080).expect("server");
        }
        let listener = bind_in_netns(&topo.node.name, "127.0.0.1:6443".parse().unwrap()).expect("bind in netns");
        let api = FakeApiServer::start_background(listener).expect("fake apiserver");
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"}]}
        }))
        .unwrap();
        api.apply_node(node);
        api.apply_service(serde_yaml::from_str(&service_yaml("api", "10.96.0.20", 80, 8080, "TCP")).unwrap());
        api.apply_endpointslice(initial(&topo));
        let dir = TempDir::new("ebpf-proxy-kubeconfig-").unwrap();
        let kubeconfig = dir.0.join("kubeconfig");
        write_kubeconfig(&kubeconfig, "http://127.0.0.1:6443").unwrap();
        let pins = PinDir::new();
        let args = ["--kubeconfig", kubeconfig.to_str().unwrap(), "--node-name", "node-a"];
        let agent = Agent::start(&topo.node, &pins.0, http_port, &args).expect("agent");
        agent.wait_ready(&topo.node, Duration::from_secs(20)).expect("ready");
        Env { topo, api, agent, _pins: pins, _dir: dir }
    }

    /// GET /metrics: (content type, body).
    fn scrape(&self) -> (String, String) {
        let addr = self.agent.metrics;
        self.topo.node.run(|| get_with_type(addr, "/metrics")).expect("scrape /metrics")
    }

    /// The value of the first sample named exactly `series` (name and labels as printed).
    fn sample(&self, series: &str) -> Option<f64> {
        sample(&self.scrape().1, series)
    }
}

/// The slice of Service `api` with `pods` behind it, and a trigger time if given.
fn slice(topo: &Topology, pods: &[usize], trigger: Option<&str>) -> EndpointSlice {
    let eps: Vec<(&str, Ipv4Addr)> = pods.iter().map(|i| (topo.pods[*i].name.as_str(), topo.pods[*i].ip)).collect();
    let mut s: EndpointSlice = serde_yaml::from_str(&slice_yaml("api", "api-1", &eps, 8080, "TCP")).unwrap();
    if let Some(t) = trigger {
        s.metadata.annotations = Some([(TRIGGER.to_string(), t.to_string())].into());
    }
    s
}

/// Minimal HTTP/1.0 GET returning the content type too (call inside the namespace).
fn get_with_type(addr: SocketAddr, path: &str) -> Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no header end")?;
    let ctype = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    Ok((ctype, body.to_string()))
}

fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok()).flatten()
    })
}

/// Names of the samples in a scrape (`x_bucket`, `x_total`... as written).
fn sample_names(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// kube-proxy's names and types, ours, the process and build metrics, the OpenMetrics
/// content type; the verdict counters follow real traffic; the network programming
/// histogram counts an EndpointSlice change carrying the trigger-time annotation (and not
/// the slice's older change from before the agent started), with the change's age.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn metrics_names_types_and_network_programming_latency() {
    require_root("metrics_names_types_and_network_programming_latency");
    // Trigger time of the slice as listed at start-up: before the agent ran, not timed.
    let env = Env::new(3, 23, 10265, |topo| slice(topo, &[1], Some("2020-01-01T00:00:00Z")));
    let ready = std::time::Instant::now();
    converge(&env.topo.pods[0].ns, (VIP, 80).into(), &["pod1"]);

    let (ctype, body) = env.scrape();
    assert_eq!(ctype, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(body.ends_with("# EOF\n"), "{body}");
    for (name, kind) in [
        ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
        ("kubeproxy_network_programming_duration_seconds", "histogram"),
        ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
        ("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "gauge"),
        ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "gauge"),
        ("kubeproxy_sync_proxy_rules_endpoint_changes", "counter"),
        ("kubeproxy_sync_proxy_rules_service_changes_pending", "gauge"),
        ("kubeproxy_sync_proxy_rules_service_changes", "counter"),
        ("kubeproxy_healthz", "counter"),
        ("kubeproxy_livez", "counter"),
        ("ebpf_proxy_datapath_packets", "counter"),
        ("ebpf_proxy_datapath_bytes", "counter"),
        ("ebpf_proxy_build_info", "gauge"),
        ("ebpf_proxy_map_fill_ratio", "gauge"),
        ("ebpf_proxy_datapath_drift", "gauge"),
        ("ebpf_proxy_sync_errors", "counter"),
        ("ebpf_proxy_event_to_map_seconds", "histogram"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
    ] {
        assert!(body.contains(&format!("\n# TYPE {name} {kind}\n")), "# TYPE {name} {kind} missing:\n{body}");
    }
    // Renamed to kube-proxy's, and the per-frontend series are opt-in.
    assert!(!body.contains("ebpf_proxy_sync_duration_seconds"), "{body}");
    assert!(!body.contains("ebpf_proxy_socket_lb_translations"), "{body}");
    assert!(body.contains("ebpf_proxy_build_info{version=\""), "{body}");
    let rss = sample(&body, "process_resident_memory_bytes").expect("rss");
    assert!(rss > 1e6, "rss {rss}");
    // The node-wide verdict counters are the datapath's, by family: the connections above
    // were IPv4 new flows, and no IPv6 flow was created.
    let dp = |verdict: &str, family: &str| {
        sample(&body, &format!("ebpf_proxy_datapath_packets_total{{verdict=\"{verdict}\",family=\"{family}\"}}"))
    };
    assert!(dp("new_flow", "IPv4").expect("new_flow IPv4") >= 1.0, "{body}");
    assert_eq!(dp("new_flow", "IPv6"), Some(0.0), "{body}");
    for family in ["IPv4", "IPv6", "other"] {
        assert_eq!(dp("ct_full", family), Some(0.0), "{body}");
    }
    let programming = "kubeproxy_network_programming_duration_seconds_count";
    assert_eq!(sample(&body, programming), Some(0.0), "a change from before the start is not timed: {body}");
    let changes0 = sample(&body, "kubeproxy_sync_proxy_rules_endpoint_changes_total").expect("changes");
    let last_sync0 = sample(&body, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").expect("last sync");
    assert!(last_sync0 > 1.7e9, "{last_sync0}");

    // A scale-up, stamped 1.5 s ago by the (simulated) EndpointSlice controller: after the
    // agent's start (trigger times before it are not timed).
    std::thread::sleep(Duration::from_millis(1600).saturating_sub(ready.elapsed()));
    let at = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_millis(1500);
    env.api.apply_endpointslice(slice(&env.topo, &[1, 2], Some(&at.to_string())));
    let count = wait_for(Duration::from_secs(10), "programming latency observed", || {
        env.sample(programming).filter(|c| *c >= 1.0)
    })
    .unwrap();
    assert_eq!(count, 1.0);
    let (_, body) = env.scrape();
    let sum = sample(&body, "kubeproxy_network_programming_duration_seconds_sum").unwrap();
    assert!((1.5..10.0).contains(&sum), "latency is the change's age at the map write: {sum}");
    // Under 0.25 s would be the agent's own latency, not the trigger time's.
    assert_eq!(sample(&body, "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\"}"), Some(0.0));
    assert_eq!(sample(&body, "kubeproxy_network_programming_duration_seconds_bucket{le=\"10.0\"}"), Some(1.0));
    assert!(sample(&body, "kubeproxy_sync_proxy_rules_endpoint_changes_total").unwrap() > changes0);
    assert_eq!(sample(&body, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"), Some(0.0));
    assert!(sample(&body, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap() > last_sync0);
    converge(&env.topo.pods[0].ns, (VIP, 80).into(), &["pod1", "pod2"]);

    // The same trigger time again (a status-only update, a relist) is no new change; a
    // change without the annotation is not timed either.
    let mut again = slice(&env.topo, &[1, 2], Some(&at.to_string()));
    again.metadata.labels.get_or_insert_default().insert("touched".into(), "yes".into());
    env.api.apply_endpointslice(again);
    env.api.apply_endpointslice(slice(&env.topo, &[2], None));
    converge(&env.topo.pods[0].ns, (VIP, 80).into(), &["pod2"]);
    assert_eq!(env.sample(programming), Some(1.0));
    // And a second stamped change is counted.
    env.api.apply_endpointslice(slice(&env.topo, &[1], Some(&now_rfc3339())));
    wait_for(Duration::from_secs(10), "second observation", || env.sample(programming).filter(|c| *c >= 2.0)).unwrap();
}

/// The metric names a PromQL expression reads: label matchers, ranges, strings and the
/// label lists of by/without/on/ignoring/group_* removed, functions (an identifier before
/// `(`), aggregation operators (`sum by (le) (...)`) and keywords skipped; what is left is
/// metric names.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 17] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skip from an opening bracket to its match.
    let skip_to = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        while i < chars.len() {
            if chars[i] == open {
                depth += 1;
            } else if chars[i] == close {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' {
            i = skip_to(i, '{', '}');
        } else if c == '[' {
            i = skip_to(i, '[', ']');
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let call = j < chars.len() && chars[j] == '(';
            if LABEL_LISTS.contains(&word.as_str()) && call {
                i = skip_to(j, '(', ')');
            } else if !call && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number (1e3, 0.9): not an identifier.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_scan_finds_metric_names_only() {
    let names = promql_metric_names(
        "histogram_quantile(0.99, sum by (le, node) (rate(kubeproxy_x_bucket{node=~\"$node\",a=\"b{c}\"}[5m]))) \
         > 1e3 and on(node) time() - y_total offset 5m > bool 0.9 or absent(up{job=\"j\"})",
    );
    assert_eq!(names, ["kubeproxy_x_bucket", "up", "y_total"].map(String::from).into());
}

fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/helm/ebpf-proxy")
}

/// (where, PromQL) of every alert of the PrometheusRule and every target of the
/// dashboard's panels, as the chart renders them with the monitoring values on.
fn chart_queries() -> Vec<(String, String)> {
    let helm = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    let out = Command::new(&helm)
        .args(["template", "ebpf-proxy"])
        .arg(chart_dir())
        .args(["--namespace", "ebpf-proxy", "--set", "apiServer.host=192.0.2.10"])
        .args(["--set", "metricsAddress=0.0.0.0:10249"])
        .args(["--set", "monitoring.podMonitor.enabled=true"])
        .args(["--set", "monitoring.prometheusRule.enabled=true"])
        .args(["--set", "monitoring.grafanaDashboard.enabled=true"])
        .output()
        .unwrap_or_else(|e| panic!("{helm}: {e} (install helm, see docs/deploy.md, or set HELM)"));
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut queries = Vec::new();
    let mut kinds = BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "PrometheusRule" => {
                for group in v["spec"]["groups"].as_array().unwrap() {
                    for rule in group["rules"].as_array().unwrap() {
                        let expr = rule["expr"].as_str().unwrap().to_string();
                        queries.push((format!("alert {}", rule["alert"].as_str().unwrap()), expr));
                    }
                }
            }
            "ConfigMap" if v["metadata"]["labels"]["grafana_dashboard"].is_string() => {
                let json = v["data"]["ebpf-proxy.json"].as_str().expect("dashboard JSON");
                let dash: Value = serde_json::from_str(json).expect("dashboard is JSON");
                for panel in dash["panels"].as_array().unwrap() {
                    for t in panel["targets"].as_array().into_iter().flatten() {
                        let where_ = format!("panel {:?}", panel["title"].as_str().unwrap_or_default());
                        queries.push((where_, t["expr"].as_str().unwrap().to_string()));
                    }
                }
            }
            _ => {}
        }
        kinds.insert(kind);
    }
    for k in ["PodMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(kinds.contains(k), "no {k} rendered: {kinds:?}");
    }
    queries
}

/// Metrics `queries` read that the scrape (plus Prometheus' own `up`) does not have.
fn missing(queries: &[(String, String)], scraped: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for (where_, expr) in queries {
        for name in promql_metric_names(expr) {
            if name != "up" && !scraped.contains(&name) {
                out.push(format!("{where_}: {name} (in {expr})"));
            }
        }
    }
    out
}

/// Every metric each Grafana panel and each alert of the chart queries exists in a real
/// scrape of a running agent (a misspelled or renamed metric would leave a panel empty or
/// an alert silent for ever).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn dashboard_and_alerts_query_metrics_the_agent_exports() {
    require_root("dashboard_and_alerts_query_metrics_the_agent_exports");
    let queries = chart_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    let env = Env::new(2, 24, 10266, |topo| slice(topo, &[1], Some(&now_rfc3339())));
    converge(&env.topo.pods[0].ns, (VIP, 80).into(), &["pod1"]);
    // The collector's census (conntrack entries) follows its first pass.
    wait_for(Duration::from_secs(10), "conntrack census", || {
        sample_names(&env.scrape().1).contains("ebpf_proxy_conntrack_entries").then_some(())
    })
    .unwrap();
    let scraped = sample_names(&env.scrape().1);
    let used: BTreeSet<String> = queries.iter().flat_map(|(_, e)| promql_metric_names(e)).collect();
    assert!(used.len() >= 20, "the scan found too few names: {used:?}");
    let gaps = missing(&queries, &scraped);
    assert!(gaps.is_empty(), "queried but not exported:\n{}\nscraped: {scraped:?}", gaps.join("\n"));

    // The check bites: one misspelled name in an alert is reported.
    let mut typo = queries.clone();
    let (_, expr) = typo.iter_mut().find(|(w, _)| w == "alert EbpfProxyDatapathDrift").expect("drift alert");
    *expr = expr.replace("ebpf_proxy_datapath_drift", "ebpf_proxy_datapath_drfit");
    assert_eq!(missing(&typo, &scraped).len(), 1, "{:?}", missing(&typo, &scraped));
}
