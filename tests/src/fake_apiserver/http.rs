//! HTTP/1.1 front end: routing, list/get/watch handlers and the accept loop.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use super::selector::{FieldSelector, LabelSelector};
use super::store::{Filter, ListOutcome, WatchMsg, WatchStart, status};
use super::{ResourceKind, Shared};

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Serves connections from `listener` (over TLS when `tls` is given) until
/// `shutdown` turns true (or its sender is dropped). Open connections, including
/// watch streams, are cut at shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Transient accept failures (EMFILE, aborted handshakes):
                    // back off briefly instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let conn_shutdown = shutdown.clone();
        match &tls {
            None => {
                tokio::spawn(serve_connection(stream, shared, conn_shutdown));
            }
            Some(acceptor) => {
                let accept = acceptor.accept(stream);
                tokio::spawn(async move {
                    // A failed handshake (a client that does not trust the CA) just
                    // closes the connection, as a real apiserver's does.
                    if let Ok(stream) = accept.await {
                        serve_connection(stream, shared, conn_shutdown).await;
                    }
                });
            }
        }
    }
}

async fn serve_connection<IO>(stream: IO, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let resp = handle(&shared, req);
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        _ = conn => {}
        _ = stopped(&mut shutdown) => {}
    }
}

/// Resolves once shutdown is requested or the server handle is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The borrow guard that `wait_for` returns is not `Send`; drop it here.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    bytes_response(code, serde_json::to_vec(body).expect("serializing a JSON value cannot fail"))
}

fn bytes_response(code: StatusCode, bytes: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)).map_err(|never| match never {}).boxed_unsync())
        .expect("static response parts are valid")
}

fn error_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status(code.as_u16(), reason, message))
}

fn bad_request(message: &str) -> Response<Body> {
    error_response(StatusCode::BAD_REQUEST, "BadRequest", message)
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Version,
    Health,
    CoreVersions,
    GroupList,
    Group,
    ResourceList { core: bool },
    Collection { kind: ResourceKind, namespace: Option<String> },
    Object { kind: ResourceKind, namespace: Option<String>, name: String },
    NotFound,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segs.as_slice() {
        ["version"] => return Route::Version,
        ["healthz" | "readyz" | "livez"] => return Route::Health,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::GroupList,
        ["apis", "discovery.k8s.io"] => return Route::Group,
        ["api", "v1"] => return Route::ResourceList { core: true },
        ["apis", "discovery.k8s.io", "v1"] => return Route::ResourceList { core: false },
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io", rest),
        ["apis", "networking.k8s.io", "v1", rest @ ..] => ("networking.k8s.io", rest),
        _ => return Route::NotFound,
    };
    let kind_of = |plural: &str| match (group, plural) {
        ("", "services") => Some(ResourceKind::Service),
        ("", "nodes") => Some(ResourceKind::Node),
        ("discovery.k8s.io", "endpointslices") => Some(ResourceKind::EndpointSlice),
        ("networking.k8s.io", "servicecidrs") => Some(ResourceKind::ServiceCidr),
        _ => None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural, None),
        ["namespaces", ns, plural, name] => (Some(ns.to_string()), *plural, Some(name.to_string())),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(name.to_string())),
        _ => return Route::NotFound,
    };
    let Some(kind) = kind_of(plural) else {
        return Route::NotFound;
    };
    match (kind.namespaced(), &namespace, name) {
        // Cluster-scoped resources have no namespaced path.
        (false, Some(_), _) => Route::NotFound,
        // Namespaced objects are only addressable through their namespace.
        (true, None, Some(_)) => Route::NotFound,
        (_, _, None) => Route::Collection { kind, namespace },
        (_, _, Some(name)) => Route::Object { kind, namespace, name },
    }
}

fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> =
        req.uri().query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default();
    {
        let mut st = shared.lock();
        st.log_request(format!("{} {}", req.method(), req.uri()));
        if let Some(token) = &shared.token {
            let given = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            if given.and_then(|v| v.strip_prefix("Bearer ")) != Some(token.as_str()) {
                shared.unauthorized.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return error_response(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
            }
        }
        if st.unavailable {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "fake apiserver is unavailable",
            );
        }
    }
    if req.method() != Method::GET {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("the fake apiserver only serves GET, not {}", req.method()),
        );
    }
    match route(&path) {
        Route::Version => json_response(
            StatusCode::OK,
            &json!({
                "major": "1",
                "minor": "34",
                "gitVersion": "v1.34.0-fake",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.24.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            }),
        ),
        Route::Health => {
            Response::new(Full::new(Bytes::from_static(b"ok")).map_err(|never| match never {}).boxed_unsync())
        }
        Route::CoreVersions => json_response(
            StatusCode::OK,
            &json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.authority}],
            }),
        ),
        Route::GroupList => json_response(
            StatusCode::OK,
            &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [discovery_group()]}),
        ),
        Route::Group => {
            let mut group = discovery_group();
            group["kind"] = json!("APIGroup");
            group["apiVersion"] = json!("v1");
            json_response(StatusCode::OK, &group)
        }
        Route::ResourceList { core } => json_response(StatusCode::OK, &resource_list(core)),
        Route::Object { kind: ResourceKind::ServiceCidr, .. }
        | Route::Collection { kind: ResourceKind::ServiceCidr, .. }
            if shared.no_service_cidrs.load(std::sync::atomic::Ordering::Relaxed) =>
        {
            error_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            )
        }
        Route::Object { kind, namespace, name } => {
            let mut st = shared.lock();
            st.counters[kind.index()].gets += 1;
            match st.get(kind, namespace.as_deref().unwrap_or(""), &name) {
                Some(obj) => json_response(StatusCode::OK, &obj),
                None => error_response(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{name}\" not found", kind.plural()),
                ),
            }
        }
        Route::Collection { kind, namespace } => {
            let filter = match parse_filter(&query, namespace) {
                Ok(f) => f,
                Err(msg) => return bad_request(&msg),
            };
            let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
            if is_watch {
                handle_watch(shared, kind, filter, &query)
            } else {
                handle_list(shared, kind, &filter, &query)
            }
        }
        Route::NotFound => error_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        ),
    }
}

fn parse_filter(query: &HashMap<String, String>, namespace: Option<String>) -> Result<Filter, String> {
    Ok(Filter {
        namespace,
        labels: LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?,
        fields: FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))?,
    })
}

fn handle_list(
    shared: &Shared,
    kind: ResourceKind,
    filter: &Filter,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };
    let continue_token = query.get("continue").filter(|c| !c.is_empty());
    let mut st = shared.lock();
    st.counters[kind.index()].lists += 1;
    match st.list(kind, filter, limit, continue_token.map(String::as_str)) {
        ListOutcome::Expired => error_response(
            StatusCode::GONE,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter.",
        ),
        ListOutcome::Page { rv, items, continue_token, remaining } => {
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if let Some(token) = continue_token {
                metadata["continue"] = json!(token);
                metadata["remainingItemCount"] = json!(remaining);
            }
            // The envelope encoded, then the stored objects spliced in as they are.
            let mut body = serde_json::to_vec(&json!({
                "kind": kind.list_kind(),
                "apiVersion": kind.api_version(),
                "metadata": metadata,
            }))
            .expect("serializing a JSON value cannot fail");
            body.pop(); // the closing brace
            body.reserve(items.iter().map(|i| i.len() + 1).sum::<usize>() + 16);
            body.extend_from_slice(b",\"items\":[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(item);
            }
            body.extend_from_slice(b"]}");
            bytes_response(StatusCode::OK, body)
        }
    }
}

fn handle_watch(
    shared: &Shared,
    kind: ResourceKind,
    filter: Filter,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let flag = |name: &str| matches!(query.get(name).map(String::as_str), Some("true" | "1"));
    let timeout = match query.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None => None,
        Some(Ok(secs)) => Some(Duration::from_secs(secs)),
        Some(Err(_)) => return bad_request("timeoutSeconds must be a non-negative integer"),
    };
    let start = if flag("sendInitialEvents") {
        WatchStart::InitialEvents
    } else {
        match query.get("resourceVersion").map(String::as_str) {
            None | Some("" | "0") => WatchStart::CurrentState,
            Some(rv) => match rv.parse::<u64>() {
                Ok(rv) => WatchStart::After(rv),
                Err(_) => return bad_request(&format!("invalid resourceVersion {rv:?}")),
            },
        }
    };
    let rx = {
        let mut st = shared.lock();
        st.counters[kind.index()].watches += 1;
        st.watch(kind, filter, flag("allowWatchBookmarks"), start)
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(watch_body(rx, timeout))
        .expect("static response parts are valid")
}

/// Streams watch events as they arrive, ending cleanly at `timeout` (the
/// request's `timeoutSeconds`) or on `Close`, and with a connection reset on
/// `Abort`. Without a content length hyper sends it chunked.
fn watch_body(rx: mpsc::UnboundedReceiver<WatchMsg>, timeout: Option<Duration>) -> Body {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let frames = futures_util::stream::unfold((rx, false), move |(mut rx, aborted)| async move {
        if aborted {
            return None;
        }
        let msg = match deadline {
            Some(deadline) => tokio::select! {
                msg = rx.recv() => msg,
                _ = tokio::time::sleep_until(deadline) => None,
            },
            None => rx.recv().await,
        };
        match msg {
            Some(WatchMsg::Line(line)) => Some((Ok(Frame::data(line)), (rx, false))),
            // A body error makes hyper drop the connection without the final
            // chunk, which the client sees as a broken stream.
            Some(WatchMsg::Abort) => {
                Some((Err(io::Error::new(io::ErrorKind::ConnectionAborted, "watch dropped by test")), (rx, true)))
            }
            Some(WatchMsg::Close) | None => None,
        }
    });
    BodyExt::boxed_unsync(StreamBody::new(frames))
}

fn discovery_group() -> Value {
    json!({
        "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
    })
}

fn resource_list(core: bool) -> Value {
    let resources: Vec<Value> = ResourceKind::ALL
        .iter()
        .filter(|k| if core { k.api_version() == "v1" } else { k.api_version() == "discovery.k8s.io/v1" })
        .map(|k| {
            json!({
                "name": k.plural(),
                "singularName": k.kind().to_ascii_lowercase(),
                "namespaced": k.namespaced(),
                "kind": k.kind(),
                "verbs": ["get", "list", "watch"],
            })
        })
        .collect();
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": if core { "v1" } else { "discovery.k8s.io/v1" },
        "resources": resources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        use ResourceKind::*;
        assert_eq!(route("/api/v1/services"), Route::Collection { kind: Service, namespace: None });
        assert_eq!(
            route("/api/v1/namespaces/kube-system/services"),
            Route::Collection { kind: Service, namespace: Some("kube-system".into()) }
        );
        assert_eq!(
            route("/api/v1/namespaces/a/services/b"),
            Route::Object { kind: Service, namespace: Some("a".into()), name: "b".into() }
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/endpointslices"),
            Route::Collection { kind: EndpointSlice, namespace: None }
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/x/endpointslices"),
            Route::Collection { kind: EndpointSlice, namespace: Some("x".into()) }
        );
        assert_eq!(route("/api/v1/nodes"), Route::Collection { kind: Node, namespace: None });
        assert_eq!(route("/api/v1/nodes/n1"), Route::Object { kind: Node, namespace: None, name: "n1".into() });
        assert_eq!(route("/api/v1/namespaces/a/nodes"), Route::NotFound);
        assert_eq!(route("/api/v1/services/x"), Route::NotFound);
        assert_eq!(route("/api/v1/endpointslices"), Route::NotFound);
        assert_eq!(route("/api/v1/pods"), Route::NotFound);
        assert_eq!(
            route("/apis/networking.k8s.io/v1/servicecidrs"),
            Route::Collection { kind: ServiceCidr, namespace: None }
        );
        assert_eq!(route("/apis/networking.k8s.io/v1/namespaces/a/servicecidrs"), Route::NotFound);
        assert_eq!(route("/version"), Route::Version);
    }
}
