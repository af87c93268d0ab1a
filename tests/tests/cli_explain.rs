//! `ebpf-proxy explain namespace/name` on manifests (issue 14): every endpoint of the
//! Service's slices with the reason the model gave it, in text and JSON. Needs no root:
//! it only reads YAML.
use proxy_tests::agent::{TempDir, cli};
use serde_json::Value;

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}
";

const SLICES: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.1], nodeName: node-a, conditions: {ready: true}}
- {addresses: [10.244.1.2], nodeName: node-a, conditions: {ready: false, serving: false}}
- {addresses: [10.244.2.1], nodeName: node-b, conditions: {ready: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: metrics, port: 9090, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.9], nodeName: node-a}
";

const NODE: &str = "apiVersion: v1
kind: Node
metadata: {name: node-a}
status:
  addresses: [{type: InternalIP, address: 192.168.1.10}]
";

fn reasons(views: &Value, traffic: &str) -> Vec<(String, String)> {
    let view = views["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["traffic"].as_str().unwrap().starts_with(traffic))
        .unwrap_or_else(|| panic!("no {traffic} view: {views:#}"));
    view["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["address"].as_str().unwrap().to_string(), e["reason"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn explain_names_the_reason_for_every_endpoint() {
    let dir = TempDir::new("ebpf-proxy-explain-").expect("dir");
    dir.write("web.yaml", SERVICE).unwrap();
    dir.write("slices.yaml", SLICES).unwrap();
    dir.write("node.yaml", NODE).unwrap();
    let d = dir.0.to_str().unwrap();
    let args = ["explain", "default/web", "--manifests", d, "--node-name", "node-a"];

    let json: Value = serde_json::from_str(&cli(&[&args[..], &["-o", "json"]].concat()).expect("explain -o json"))
        .expect("JSON output");
    assert_eq!(json["service"], "default/web");
    let want = |pairs: &[(&str, &str)]| pairs.iter().map(|(a, r)| (a.to_string(), r.to_string())).collect::<Vec<_>>();
    assert_eq!(
        reasons(&json, "cluster"),
        want(&[
            ("10.244.1.1", "backend"),
            ("10.244.1.2", "not_ready"),
            ("10.244.2.1", "backend"),
            ("10.244.1.9", "port_name_not_matched"),
        ])
    );
    assert_eq!(
        reasons(&json, "external"),
        want(&[
            ("10.244.1.1", "backend"),
            ("10.244.1.2", "not_ready"),
            ("10.244.2.1", "not_local"),
            ("10.244.1.9", "port_name_not_matched"),
        ])
    );

    let text = cli(&args).expect("explain");
    assert!(text.contains("Service default/web on node node-a"), "{text}");
    assert!(text.contains("externalTrafficPolicy: Local"), "{text}");
    assert!(
        text.lines().any(|l| l.contains("10.244.2.1:8080") && l.contains("not local, and the traffic policy is Local")),
        "{text}"
    );

    let err = cli(&["explain", "default/nope", "--manifests", d, "--node-name", "node-a"]).unwrap_err();
    assert!(format!("{err:#}").contains("no Service default/nope"), "{err:#}");
}
