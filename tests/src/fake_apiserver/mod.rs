//! An in-process fake kube-apiserver for end-to-end tests.
//!
//! It serves just enough of the Kubernetes API over plain HTTP/1.1 for kube-rs
//! watchers and reflectors on Services, EndpointSlices and Nodes: LIST (with
//! label/field selectors and `limit`/`continue` pagination), GET of single
//! objects, and WATCH (replay from a resourceVersion, BOOKMARKs, 410 Expired,
//! `timeoutSeconds`, `sendInitialEvents` streaming lists), plus `/version` and
//! the discovery documents.
//!
//! The test drives the object store directly (`apply_*`, `delete_*`) and can
//! inject failures: `force_gone` (410 on every watch, clients must relist),
//! `drop_watches` (connections cut, clients must re-watch) and
//! `set_unavailable` (every request answers 503).
//!
//! ```no_run
//! # use proxy_tests::fake_apiserver::{FakeApiServer, write_kubeconfig};
//! let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
//! let server = FakeApiServer::start_background(listener).unwrap();
//! write_kubeconfig("/tmp/kubeconfig".as_ref(), &server.url()).unwrap();
//! ```
//!
//! [`FakeApiServer::start_background_with`] serves HTTPS instead (a CA and a server
//! certificate made at start, [`ServerTls`]) and requires a bearer token, as a real
//! apiserver does for a pod's service account; [`write_service_account_dir`] writes the
//! `token`, `ca.crt` and `namespace` files the in-cluster config reads.
//!
//! Limitations: read-only API (only GET; no create/update/patch/delete from
//! clients, no status subresources), one bearer token at most, `resourceVersion` on
//! LIST is ignored (lists always serve the latest state), watches from a
//! resourceVersion newer than the server's are accepted and simply wait.

mod http;
mod netns;
mod selector;
mod store;
mod tls;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;

pub use netns::bind_in_netns;
pub use selector::{FieldSelector, LabelSelector};
pub use tls::{SERVICE_ACCOUNT_DIR, ServerTls, TlsError, write_service_account_dir};

use store::State;

/// The resources the fake apiserver knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    Service,
    EndpointSlice,
    Node,
    /// `networking.k8s.io/v1` ServiceCIDRs (cluster-scoped); `set_service_cidr_api(false)`
    /// makes the server answer 404 for them, as one older than Kubernetes 1.33.
    ServiceCidr,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 4] =
        [ResourceKind::Service, ResourceKind::EndpointSlice, ResourceKind::Node, ResourceKind::ServiceCidr];

    pub fn kind(self) -> &'static str {
        match self {
            ResourceKind::Service => "Service",
            ResourceKind::EndpointSlice => "EndpointSlice",
            ResourceKind::Node => "Node",
            ResourceKind::ServiceCidr => "ServiceCIDR",
        }
    }

    pub fn list_kind(self) -> &'static str {
        match self {
            ResourceKind::Service => "ServiceList",
            ResourceKind::EndpointSlice => "EndpointSliceList",
            ResourceKind::Node => "NodeList",
            ResourceKind::ServiceCidr => "ServiceCIDRList",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            ResourceKind::Service | ResourceKind::Node => "v1",
            ResourceKind::EndpointSlice => "discovery.k8s.io/v1",
            ResourceKind::ServiceCidr => "networking.k8s.io/v1",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            ResourceKind::Service => "services",
            ResourceKind::EndpointSlice => "endpointslices",
            ResourceKind::Node => "nodes",
            ResourceKind::ServiceCidr => "servicecidrs",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, ResourceKind::Node | ResourceKind::ServiceCidr)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// State shared between the test-side handle and the HTTP tasks.
struct Shared {
    state: Mutex<State>,
    /// host:port clients reach us on, for the `/api` discovery document.
    authority: String,
    /// The bearer token every request must carry, when set (401 otherwise).
    token: Option<String>,
    /// Requests refused for a missing or wrong token.
    unauthorized: AtomicUsize,
    /// Answer 404 for ServiceCIDRs (an API server before Kubernetes 1.33).
    no_service_cidrs: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take the server down with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake apiserver. Dropping it stops the server and cuts all of its
/// connections.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    https: bool,
    shutdown: watch::Sender<bool>,
    /// The runtime thread of `start_background`.
    background: Option<JoinHandle<()>>,
}

fn to_value<T: Serialize>(obj: &T) -> Value {
    serde_json::to_value(obj).expect("k8s objects serialize to JSON")
}

fn from_value<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("stored object deserializes to its k8s type")
}

/// How [`FakeApiServer::start_background_with`] serves: plain HTTP without
/// authentication by default.
#[derive(Default)]
pub struct ServeOptions {
    /// Serve HTTPS with this certificate.
    pub tls: Option<ServerTls>,
    /// Require `Authorization: Bearer <token>` on every request.
    pub token: Option<String>,
}

impl FakeApiServer {
    fn new_shared(listener: &TcpListener, token: Option<String>) -> std::io::Result<(Arc<Shared>, SocketAddr)> {
        let mut addr = listener.local_addr()?;
        // A wildcard bind is reachable on loopback; give callers an address they can dial.
        match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
            IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
            _ => {}
        }
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            authority: addr.to_string(),
            token,
            unauthorized: AtomicUsize::new(0),
            no_service_cidrs: std::sync::atomic::AtomicBool::new(false),
        });
        Ok((shared, addr))
    }

    /// Starts serving `listener` on the current tokio runtime.
    ///
    /// Panics when called outside a tokio runtime.
    pub fn start(listener: TcpListener) -> std::io::Result<FakeApiServer> {
        let (shared, addr) = Self::new_shared(&listener, None)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(http::serve(listener, None, shared.clone(), shutdown_rx));
        Ok(FakeApiServer { shared, addr, https: false, shutdown, background: None })
    }

    /// Starts serving `listener` on a runtime of its own in a background
    /// thread, for synchronous tests (or to keep the server independent of the
    /// test's runtime). Drop joins that thread.
    pub fn start_background(listener: TcpListener) -> std::io::Result<FakeApiServer> {
        Self::start_background_with(listener, ServeOptions::default())
    }

    /// [`start_background`](Self::start_background), serving HTTPS and checking a bearer
    /// token as `options` say.
    pub fn start_background_with(listener: TcpListener, options: ServeOptions) -> std::io::Result<FakeApiServer> {
        let (shared, addr) = Self::new_shared(&listener, options.token)?;
        let https = options.tls.is_some();
        let acceptor = options.tls.map(|t| t.acceptor);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let serve_shared = shared.clone();
        let background = std::thread::Builder::new().name("fake-apiserver".into()).spawn(move || {
            runtime.block_on(http::serve(listener, acceptor, serve_shared, shutdown_rx));
            // Dropping the runtime cancels the remaining connection tasks.
        })?;
        Ok(FakeApiServer { shared, addr, https, shutdown, background: Some(background) })
    }

    /// `http://host:port` (or `https://`) of the server.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        match self.addr {
            SocketAddr::V4(a) => format!("{scheme}://{a}"),
            SocketAddr::V6(a) => format!("{scheme}://[{}]:{}", a.ip(), a.port()),
        }
    }

    /// Requests refused with 401 (no or a wrong bearer token).
    pub fn unauthorized_requests(&self) -> usize {
        self.shared.unauthorized.load(Ordering::Relaxed)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn apply<T: Serialize + DeserializeOwned>(&self, kind: ResourceKind, obj: &T) -> T {
        from_value(self.shared.lock().apply(kind, to_value(obj)))
    }

    /// Creates or replaces objects of `kind` given as JSON, under one lock and
    /// without the round trip through their typed form that `apply_*` makes
    /// (for loading 100,000 objects in seconds). Same semantics as
    /// [`apply_service`](Self::apply_service); returns the resourceVersion
    /// after the last one.
    pub fn apply_json(&self, kind: ResourceKind, objects: impl IntoIterator<Item = Value>) -> u64 {
        let mut st = self.shared.lock();
        for obj in objects {
            st.apply(kind, obj);
        }
        st.current_rv()
    }

    /// Creates (ADDED) or replaces (MODIFIED) a Service; an empty namespace
    /// becomes "default". Returns the stored object with its resourceVersion
    /// and uid. Replacing with identical content is a no-op.
    pub fn apply_service(&self, svc: Service) -> Service {
        self.apply(ResourceKind::Service, &svc)
    }

    /// Like [`apply_service`](Self::apply_service), for an EndpointSlice.
    pub fn apply_endpointslice(&self, slice: EndpointSlice) -> EndpointSlice {
        self.apply(ResourceKind::EndpointSlice, &slice)
    }

    /// Like [`apply_service`](Self::apply_service), for a (cluster-scoped) Node.
    pub fn apply_node(&self, node: Node) -> Node {
        self.apply(ResourceKind::Node, &node)
    }

    /// Deletes a Service (DELETED event); returns whether it existed.
    pub fn delete_service(&self, namespace: &str, name: &str) -> bool {
        self.shared.lock().delete(ResourceKind::Service, namespace, name)
    }

    /// Deletes an EndpointSlice; returns whether it existed.
    pub fn delete_endpointslice(&self, namespace: &str, name: &str) -> bool {
        self.shared.lock().delete(ResourceKind::EndpointSlice, namespace, name)
    }

    /// Deletes a Node; returns whether it existed.
    pub fn delete_node(&self, name: &str) -> bool {
        self.shared.lock().delete(ResourceKind::Node, "", name)
    }

    /// Current Services, sorted by namespace/name.
    pub fn services(&self) -> Vec<Service> {
        self.shared.lock().objects(ResourceKind::Service).into_iter().map(from_value).collect()
    }

    /// Current EndpointSlices, sorted by namespace/name.
    pub fn endpointslices(&self) -> Vec<EndpointSlice> {
        self.shared.lock().objects(ResourceKind::EndpointSlice).into_iter().map(from_value).collect()
    }

    /// Current Nodes, sorted by name.
    pub fn nodes(&self) -> Vec<Node> {
        self.shared.lock().objects(ResourceKind::Node).into_iter().map(from_value).collect()
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> String {
        self.shared.lock().current_rv().to_string()
    }

    /// Every open watch gets an ERROR event with a 410 Expired Status and is
    /// closed; the change history is discarded, so any later watch from a
    /// resourceVersion issued before this call also gets 410. Clients must
    /// relist.
    pub fn force_gone(&self) {
        self.shared.lock().force_gone();
    }

    /// Cuts every open watch connection without a final event or chunk, as a
    /// crashed apiserver or broken network would. The history is kept, so
    /// clients can resume from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.lock().end_watches(true);
    }

    /// Sends a BOOKMARK at the current resourceVersion on every open watch that
    /// asked for bookmarks (`allowWatchBookmarks=true`).
    pub fn send_bookmarks(&self) {
        self.shared.lock().send_bookmarks();
    }

    /// While true, every request is answered with 503 ServiceUnavailable;
    /// turning it on also cuts the open watches.
    pub fn set_unavailable(&self, unavailable: bool) {
        let mut st = self.shared.lock();
        st.unavailable = unavailable;
        if unavailable {
            st.end_watches(true);
        }
    }

    /// false: the server has no ServiceCIDR resource (404 for its paths), as an API server
    /// before Kubernetes 1.33.
    pub fn set_service_cidr_api(&self, served: bool) {
        self.shared.no_service_cidrs.store(!served, Ordering::Relaxed);
    }

    /// Apply a ServiceCIDR.
    pub fn apply_service_cidr(&self, name: &str, cidrs: &[&str]) -> u64 {
        let obj = serde_json::json!({"metadata": {"name": name}, "spec": {"cidrs": cidrs}});
        self.apply_json(ResourceKind::ServiceCidr, [obj])
    }

    pub fn delete_service_cidr(&self, name: &str) -> bool {
        self.shared.lock().delete(ResourceKind::ServiceCidr, "", name)
    }

    /// How many change events are kept for watch replay (default 10000).
    /// Watches from a resourceVersion older than the retained history get 410.
    pub fn set_history_limit(&self, events: usize) {
        self.shared.lock().history_limit = events;
    }

    /// Number of LIST requests served for `kind` (each page counts).
    pub fn list_requests(&self, kind: ResourceKind) -> usize {
        self.shared.lock().counters[kind.index()].lists
    }

    /// Number of WATCH requests received for `kind`.
    pub fn watch_requests(&self, kind: ResourceKind) -> usize {
        self.shared.lock().counters[kind.index()].watches
    }

    /// Number of GETs of single objects of `kind`.
    pub fn get_requests(&self, kind: ResourceKind) -> usize {
        self.shared.lock().counters[kind.index()].gets
    }

    /// Watch streams of `kind` currently open.
    pub fn open_watches(&self, kind: ResourceKind) -> usize {
        self.shared.lock().open_watches(kind)
    }

    /// The last (up to 10000) requests as "METHOD /path?query".
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().request_log.iter().cloned().collect()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        // End the watch bodies too, so a client does not wait on a stream that
        // will never produce anything again.
        self.shared.lock().end_watches(true);
        if let Some(thread) = self.background.take() {
            let _ = thread.join();
        }
    }
}

/// Writes a kubeconfig for `server_url` (plain http, no credentials) with a
/// single context `fake` whose namespace is `default`. kube-rs accepts it via
/// `Kubeconfig::read_from` + `Config::from_custom_kubeconfig`, or `KUBECONFIG`.
///
/// kube-rs honours `HTTPS_PROXY`/`https_proxy` (minus `NO_PROXY`) from the
/// environment; make sure the process that uses this kubeconfig has no proxy
/// for the server's address.
pub fn write_kubeconfig(path: &Path, server_url: &str) -> std::io::Result<()> {
    let yaml = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {server_url}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
users:
- name: fake
  user: {{}}
preferences: {{}}
"
    );
    std::fs::write(path, yaml)
}
