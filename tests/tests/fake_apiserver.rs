//! The fake apiserver against real kube-rs clients, watchers and reflectors.
//! Everything runs on 127.0.0.1; no root needed. Every wait is bounded.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config, Resource, ResourceExt};
use proxy_tests::fake_apiserver::{FakeApiServer, ResourceKind, bind_in_netns, write_kubeconfig};
use proxy_tests::netns::Netns;
use serde::de::DeserializeOwned;

const WAIT: Duration = Duration::from_secs(10);

fn meta(ns: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        labels: (!labels.is_empty())
            .then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()),
        ..Default::default()
    }
}

fn service(name: &str, port: i32) -> Service {
    Service {
        metadata: meta(Some("default"), name, &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![ServicePort { port, protocol: Some("TCP".into()), ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(name: &str, service_name: &str, ip: &str) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(Some("default"), name, &[("kubernetes.io/service-name", service_name)]),
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint { addresses: vec![ip.into()], ..Default::default() }]),
        ports: None,
    }
}

fn node(name: &str, ip: &str) -> Node {
    Node {
        metadata: meta(None, name, &[]),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: ip.into() }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn start_server() -> FakeApiServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    FakeApiServer::start(listener).expect("start fake apiserver")
}

/// A kube client built the way the agent builds one: from a kubeconfig file.
async fn client(server: &FakeApiServer) -> Client {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fake-apiserver-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    write_kubeconfig(&path, &server.url()).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config from kubeconfig");
    let _ = std::fs::remove_dir_all(&dir);
    Client::try_from(config).expect("kube client")
}

/// Runs a reflector in the background and returns its store. Watcher errors
/// (410s, dropped connections) are expected in these tests; the watcher
/// recovers by itself on the next poll.
fn reflect<K>(api: Api<K>, config: watcher::Config) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config).reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if event.is_err() {
                // Avoid a hot loop if the server keeps failing.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    reader
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (name, resourceVersion) pairs, sorted, for comparing a store with the server.
fn versions<K: Resource>(objs: impl IntoIterator<Item = K>) -> Vec<(String, String)> {
    let mut v: Vec<_> = objs.into_iter().map(|o| (o.name_any(), o.resource_version().unwrap_or_default())).collect();
    v.sort();
    v
}

fn store_versions<K: Resource + Clone>(store: &Store<K>) -> Vec<(String, String)>
where
    K::DynamicType: Eq + Hash + Clone,
{
    versions(store.state().iter().map(|o| (**o).clone()))
}

fn port_of(store: &Store<Service>, name: &str) -> Option<i32> {
    store
        .state()
        .iter()
        .find(|s| s.name_any() == name)
        .and_then(|s| s.spec.as_ref()?.ports.as_ref()?.first().map(|p| p.port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_reflector_sees_add_modify_delete_and_bookmarks() {
    let server = start_server();
    server.apply_service(service("a", 80));
    let store = reflect(Api::<Service>::all(client(&server).await), watcher::Config::default());

    wait_until("initial list with service a", || port_of(&store, "a") == Some(80)).await;
    wait_until("watch to open", || server.open_watches(ResourceKind::Service) == 1).await;
    assert_eq!(server.list_requests(ResourceKind::Service), 1);

    let b = server.apply_service(service("b", 81));
    assert!(b.metadata.uid.is_some() && b.metadata.creation_timestamp.is_some());
    wait_until("service b added", || port_of(&store, "b") == Some(81)).await;

    server.apply_service(service("a", 8080));
    wait_until("service a modified", || port_of(&store, "a") == Some(8080)).await;

    // Re-applying identical content is a no-op: no new resourceVersion.
    let rv = server.resource_version();
    server.apply_service(service("a", 8080));
    assert_eq!(server.resource_version(), rv);

    assert!(server.delete_service("default", "b"));
    assert!(!server.delete_service("default", "b"));
    wait_until("service b deleted", || port_of(&store, "b").is_none()).await;

    server.send_bookmarks();
    server.apply_service(service("c", 82));
    wait_until("service c after a bookmark", || port_of(&store, "c") == Some(82)).await;
    wait_until("store equal to server", || store_versions(&store) == versions(server.services())).await;

    // A bookmark must not have caused a relist or a re-watch.
    assert_eq!(server.list_requests(ResourceKind::Service), 1);
    assert_eq!(server.watch_requests(ResourceKind::Service), 1);

    // What kube-rs's default watcher asked for.
    let requests = server.requests();
    let list = requests.iter().find(|r| !r.contains("watch=")).unwrap();
    assert!(list.starts_with("GET /api/v1/services?") && list.contains("limit=500"), "{list}");
    let watch = requests.iter().find(|r| r.contains("watch=true")).unwrap();
    for param in ["timeoutSeconds=290", "allowWatchBookmarks=true", "resourceVersion="] {
        assert!(watch.contains(param), "{watch} lacks {param}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_gone_makes_the_watcher_relist_and_converge() {
    let server = start_server();
    server.apply_service(service("a", 80));
    server.apply_service(service("b", 81));
    let api = Api::<Service>::all(client(&server).await);
    let store = reflect(api.clone(), watcher::Config::default());
    wait_until("initial list", || store.state().len() == 2).await;
    wait_until("watch to open", || server.open_watches(ResourceKind::Service) == 1).await;
    let old_rv = server.resource_version();

    // Changes right after the 410 race the client's relist; either way the
    // store must end up equal to the server.
    server.force_gone();
    server.apply_service(service("added-while-gone", 90));
    server.delete_service("default", "a");

    wait_until("relist", || server.list_requests(ResourceKind::Service) >= 2).await;
    wait_until("store equal to server after relist", || store_versions(&store) == versions(server.services())).await;
    assert!(port_of(&store, "added-while-gone").is_some() && port_of(&store, "a").is_none());

    // Any watch from a resourceVersion issued before force_gone gets 410.
    let mut stream = api.watch(&WatchParams::default(), &old_rv).await.unwrap().boxed();
    match tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }

    // And the resumed watch still delivers live changes.
    server.apply_service(service("later", 91));
    wait_until("change after relist", || port_of(&store, "later") == Some(91)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_limit_expires_watches_from_old_versions() {
    let server = start_server();
    server.set_history_limit(2);
    let api = Api::<Service>::all(client(&server).await);
    let rv = server.resource_version();
    for i in 0..4 {
        server.apply_service(service(&format!("s{i}"), 80 + i));
    }
    let mut stream = api.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    match tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        Some(Ok(WatchEvent::Error(status))) => assert_eq!(status.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_reconnect_and_resume_without_relist() {
    let server = start_server();
    server.apply_service(service("a", 80));
    let store = reflect(Api::<Service>::all(client(&server).await), watcher::Config::default());
    wait_until("initial list", || port_of(&store, "a") == Some(80)).await;
    wait_until("watch to open", || server.open_watches(ResourceKind::Service) == 1).await;
    let watches = server.watch_requests(ResourceKind::Service);

    server.drop_watches();
    // Most likely made while the client is reconnecting: must be replayed.
    server.apply_service(service("during-reconnect", 81));
    wait_until("re-watch", || server.watch_requests(ResourceKind::Service) > watches).await;
    wait_until("replayed change", || port_of(&store, "during-reconnect") == Some(81)).await;

    server.apply_service(service("after", 82));
    wait_until("live change after reconnect", || port_of(&store, "after") == Some(82)).await;
    // Resumed from its resourceVersion: no relist was needed.
    assert_eq!(server.list_requests(ResourceKind::Service), 1);

    // An outage: requests fail with 503 until the server is back.
    server.set_unavailable(true);
    server.apply_service(service("during-outage", 83));
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.set_unavailable(false);
    wait_until("change made during the outage", || port_of(&store, "during-outage") == Some(83)).await;
    wait_until("store equal to server", || store_versions(&store) == versions(server.services())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpointslice_label_selector() {
    let server = start_server();
    server.apply_endpointslice(slice("x-1", "x", "10.0.0.1"));
    server.apply_endpointslice(slice("y-1", "y", "10.0.0.2"));
    let api = Api::<EndpointSlice>::all(client(&server).await);
    let store = reflect(api.clone(), watcher::Config::default().labels("kubernetes.io/service-name=x"));
    let names = || {
        let mut n: Vec<String> = store.state().iter().map(|s| s.name_any()).collect();
        n.sort();
        n
    };
    wait_until("initial x slice", || names() == ["x-1"]).await;
    wait_until("watch to open", || server.open_watches(ResourceKind::EndpointSlice) == 1).await;

    server.apply_endpointslice(slice("y-2", "y", "10.0.0.3"));
    server.apply_endpointslice(slice("x-2", "x", "10.0.0.4"));
    wait_until("x-2 added, no y", || names() == ["x-1", "x-2"]).await;

    // Relabelling out of the selection looks like a deletion to the watcher...
    server.apply_endpointslice(slice("x-1", "y", "10.0.0.1"));
    wait_until("x-1 left the selection", || names() == ["x-2"]).await;
    // ...and relabelling into it like an addition.
    server.apply_endpointslice(slice("y-1", "x", "10.0.0.2"));
    wait_until("y-1 entered the selection", || names() == ["x-2", "y-1"]).await;

    server.delete_endpointslice("default", "x-2");
    wait_until("x-2 deleted", || names() == ["y-1"]).await;

    // Namespaced list path and the selector on a plain list.
    let ns_api = Api::<EndpointSlice>::namespaced(api.into_client(), "default");
    let listed = ns_api.list(&ListParams::default().labels("kubernetes.io/service-name=y")).await.unwrap();
    let mut listed: Vec<String> = listed.items.iter().map(|s| s.name_any()).collect();
    listed.sort();
    assert_eq!(listed, ["x-1", "y-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_field_selector_and_get() {
    let server = start_server();
    server.apply_node(node("node-1", "192.168.0.1"));
    server.apply_node(node("node-2", "192.168.0.2"));
    let api = Api::<Node>::all(client(&server).await);
    let store = reflect(api.clone(), watcher::Config::default().fields("metadata.name=node-1"));
    let address = || {
        let state = store.state();
        assert!(state.iter().all(|n| n.name_any() == "node-1"), "store has other nodes");
        state.first().map(|n| n.status.as_ref().unwrap().addresses.as_ref().unwrap()[0].address.clone())
    };
    wait_until("node-1 listed", || address().as_deref() == Some("192.168.0.1")).await;
    wait_until("watch to open", || server.open_watches(ResourceKind::Node) == 1).await;

    server.apply_node(node("node-2", "192.168.0.22"));
    server.apply_node(node("node-1", "192.168.0.11"));
    wait_until("node-1 modified", || address().as_deref() == Some("192.168.0.11")).await;

    let got = api.get("node-1").await.unwrap();
    assert_eq!(got.metadata.namespace, None);
    assert_eq!(server.get_requests(ResourceKind::Node), 1);
    match api.get("missing").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404),
        other => panic!("expected 404, got {other:?}"),
    }
    assert!(server.requests().iter().any(|r| r.contains("fieldSelector=metadata.name%3Dnode-1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_watcher() {
    let server = start_server();
    server.apply_service(service("a", 80));
    let store = reflect(Api::<Service>::all(client(&server).await), watcher::Config::default().streaming_lists());
    wait_until("initial events", || port_of(&store, "a") == Some(80)).await;
    server.apply_service(service("b", 81));
    wait_until("live event", || port_of(&store, "b") == Some(81)).await;
    assert_eq!(server.list_requests(ResourceKind::Service), 0);
    assert!(server.requests().iter().any(|r| r.contains("sendInitialEvents=true")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paginated_lists_are_consistent() {
    let server = start_server();
    for i in 0..7 {
        server.apply_service(service(&format!("s{i}"), 80 + i));
    }
    let api = Api::<Service>::all(client(&server).await);

    let first = api.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(first.items.len(), 3);
    let rv = first.metadata.resource_version.clone().unwrap();
    // A change between pages must not show up in later pages of the same list.
    server.apply_service(service("s99", 99));
    let mut names: Vec<String> = first.items.iter().map(|s| s.name_any()).collect();
    let mut token = first.metadata.continue_;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = api.list(&ListParams::default().limit(3).continue_token(&t)).await.unwrap();
        assert_eq!(page.metadata.resource_version.as_deref(), Some(rv.as_str()));
        names.extend(page.items.iter().map(|s| s.name_any()));
        token = page.metadata.continue_;
    }
    assert_eq!(names, (0..7).map(|i| format!("s{i}")).collect::<Vec<_>>());

    match api.list(&ListParams::default().limit(3).continue_token("bogus")).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 410),
        other => panic!("expected 410 for an unknown continue token, got {other:?}"),
    }

    let lists = server.list_requests(ResourceKind::Service);
    let store = reflect(api, watcher::Config::default().page_size(2));
    wait_until("paged initial list", || store.state().len() == 8).await;
    assert_eq!(server.list_requests(ResourceKind::Service) - lists, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_timeout_ends_the_stream_and_discovery_works() {
    let server = start_server();
    let client = client(&server).await;
    let api = Api::<Service>::all(client.clone());
    let mut stream = api.watch(&WatchParams::default().timeout(1), &server.resource_version()).await.unwrap().boxed();
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
    assert!(matches!(ended, Ok(None)), "watch did not end after timeoutSeconds: {ended:?}");

    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let core = client.list_core_api_versions().await.unwrap();
    assert_eq!(core.versions, ["v1"]);
    let groups = client.list_api_groups().await.unwrap();
    assert!(groups.groups.iter().any(|g| g.name == "discovery.k8s.io"));
    let resources = client.list_api_group_resources("discovery.k8s.io/v1").await.unwrap();
    assert_eq!(resources.resources[0].name, "endpointslices");
}

/// Raw HTTP/1.1 GET, returning (status line, body).
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut conn = std::net::TcpStream::connect_timeout(&addr, WAIT).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn usable_from_a_synchronous_test() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = FakeApiServer::start_background(listener).unwrap();
    server.apply_node(node("node-1", "192.168.0.1"));

    let (status, body) = http_get(server.addr(), "/version");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("gitVersion"), "{body}");

    let (status, body) = http_get(server.addr(), "/api/v1/pods");
    assert!(status.contains("404"), "{status}");
    assert!(body.contains(r#""kind":"Status""#) && body.contains(r#""code":404"#), "{body}");

    let (status, body) = http_get(server.addr(), "/api/v1/services?labelSelector=a%20in%20(b");
    assert!(status.contains("400"), "{status}: {body}");

    let (status, body) = http_get(server.addr(), "/api/v1/nodes");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains(r#""kind":"NodeList""#) && body.contains("node-1"), "{body}");

    // A kube client on a runtime of the test's own, with the server on another.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let nodes = Api::<Node>::all(client(&server).await).list(&ListParams::default()).await.unwrap();
        assert_eq!(nodes.items.len(), 1);
        assert_eq!(nodes.metadata.resource_version, Some(server.resource_version()));
    });
    drop(server);
}

/// Needs root (to create a namespace and `setns`).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn serves_from_inside_a_network_namespace() {
    proxy_tests::harness::require_root("serves_from_inside_a_network_namespace");
    let ns = Netns::new("fakeapi").expect("create netns");
    let listener = bind_in_netns(&ns.name, "127.0.0.1:0".parse().unwrap()).expect("bind in netns");
    let server = FakeApiServer::start_background(listener).unwrap();
    let addr = server.addr();

    // The server runs in the test's namespace but answers on the netns's loopback.
    let (status, body) = ns.run(move || http_get(addr, "/version"));
    assert!(status.contains("200") && body.contains("gitVersion"), "{status}: {body}");
    // The test's own loopback has no such listener.
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}

/// A kube client trusting `ca` (a PEM file, or none) with bearer `token` (or none), from a
/// kubeconfig as the agent's `--kubeconfig` reads one.
async fn client_with(server: &FakeApiServer, dir: &std::path::Path, ca: Option<&str>, token: Option<&str>) -> Client {
    let mut cluster = format!("    server: {}\n", server.url());
    if let Some(ca) = ca {
        cluster.push_str(&format!("    certificate-authority: {ca}\n"));
    }
    let user = token.map_or("{}".to_string(), |t| format!("{{token: {t}}}"));
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n{cluster}contexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {user}\n"
    );
    let path = dir.join("kubeconfig");
    std::fs::write(&path, yaml).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kube config");
    Client::try_from(config).expect("kube client")
}

/// HTTPS with a CA made at start and a bearer token, as a pod's in-cluster config meets a
/// real apiserver: a client trusting the CA with the token lists; a wrong token gets 401
/// (counted); a client that does not trust the CA fails the handshake; the service-account
/// directory holds what the in-cluster config reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_bearer_token() {
    use proxy_tests::fake_apiserver::{ServeOptions, ServerTls, write_service_account_dir};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let tls = ServerTls::self_signed(&["127.0.0.1".parse().unwrap()]).expect("certificates");
    let ca_pem = tls.ca_pem.clone();
    let options = ServeOptions { tls: Some(tls), token: Some("s3cret".into()) };
    let server = FakeApiServer::start_background_with(listener, options).expect("start fake apiserver");
    assert!(server.url().starts_with("https://127.0.0.1:"), "{}", server.url());
    server.apply_service(service("web", 80));

    let dir = std::env::temp_dir().join(format!("fake-apiserver-https-{}", std::process::id()));
    let sa = dir.join("serviceaccount");
    write_service_account_dir(&sa, "s3cret", &ca_pem, "ebpf-proxy").unwrap();
    assert_eq!(std::fs::read_to_string(sa.join("token")).unwrap(), "s3cret");
    assert_eq!(std::fs::read_to_string(sa.join("namespace")).unwrap(), "ebpf-proxy");
    let ca = sa.join("ca.crt");
    assert!(std::fs::read_to_string(&ca).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
    let ca = ca.to_str().unwrap();

    let good = client_with(&server, &dir, Some(ca), Some("s3cret")).await;
    let names: Vec<String> = Api::<Service>::all(good)
        .list(&ListParams::default())
        .await
        .expect("list over HTTPS")
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(names, ["web"]);
    assert_eq!(server.unauthorized_requests(), 0);

    let wrong = client_with(&server, &dir, Some(ca), Some("guess")).await;
    match Api::<Service>::all(wrong).list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 401, "{status:?}"),
        other => panic!("a wrong token must get 401, got {other:?}"),
    }
    let anonymous = client_with(&server, &dir, Some(ca), None).await;
    assert!(Api::<Service>::all(anonymous).list(&ListParams::default()).await.is_err());
    assert_eq!(server.unauthorized_requests(), 2);

    let untrusting = client_with(&server, &dir, None, Some("s3cret")).await;
    let err = Api::<Service>::all(untrusting).list(&ListParams::default()).await.expect_err("unknown CA");
    assert!(!matches!(err, kube::Error::Api(_)), "the handshake must fail, not the request: {err:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
