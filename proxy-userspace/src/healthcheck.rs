//! Service health checks, as kube-proxy serves them: for every LoadBalancer service with
//! `externalTrafficPolicy: Local`, an HTTP server on its `healthCheckNodePort` (all node
//! addresses) answering 200 when this node has a ready local endpoint and 503 otherwise,
//! so the cloud load balancer only sends traffic to nodes that can serve it locally.
//!
//! Body and headers follow kube-proxy's (pkg/proxy/healthcheck): a JSON object with the
//! service's namespace/name, `localEndpoints` and `serviceProxyHealthy`, plus
//! `X-Load-Balancing-Endpoint-Weight`.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    http::{StatusCode, header},
    response::IntoResponse,
};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::model::HealthCheck;

type Checks = Arc<RwLock<BTreeMap<u16, HealthCheck>>>;

/// Status and JSON body for one health check, as kube-proxy renders them.
pub fn render(check: &HealthCheck, proxy_healthy: bool) -> (StatusCode, String) {
    let ok = check.local_endpoints > 0 && proxy_healthy;
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, serde_json::to_string_pretty(&body).unwrap_or_default())
}

/// The set of health-check listeners, kept equal to the desired state by [`Self::update`].
pub struct HealthServers {
    checks: Checks,
    listeners: HashMap<u16, JoinHandle<()>>,
    /// `serviceProxyHealthy`: the agent has programmed the datapath.
    healthy: Arc<AtomicBool>,
}

impl HealthServers {
    pub fn new(healthy: Arc<AtomicBool>) -> Self {
        HealthServers { checks: Checks::default(), listeners: HashMap::new(), healthy }
    }

    /// Ports currently listened on.
    pub fn ports(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self.listeners.keys().copied().collect();
        p.sort();
        p
    }

    /// Serve exactly `wanted`: new ports get a listener, gone ones are closed, counts are
    /// updated in place (open listeners answer with the new count at once). Ports that
    /// cannot be bound (in use) are reported and retried on the next call. Must run inside
    /// a tokio runtime.
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> Vec<(u16, io::Error)> {
        *self.checks.write().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
        self.listeners.retain(|port, task| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "health check port closed");
            }
            keep
        });
        let mut errors = Vec::new();
        for (&port, check) in wanted {
            if self.listeners.contains_key(&port) {
                continue;
            }
            match self.listen(port) {
                Ok(task) => {
                    info!(port, service = %format!("{}/{}", check.namespace, check.name), "serving health check");
                    self.listeners.insert(port, task);
                }
                Err(e) => {
                    warn!(port, service = %format!("{}/{}", check.namespace, check.name), error = %e, "cannot serve health check");
                    errors.push((port, e));
                }
            }
        }
        errors
    }

    fn listen(&self, port: u16) -> io::Result<JoinHandle<()>> {
        // std binds with SO_REUSEADDR, so a restarted agent gets the port back at once.
        let std_listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
        std_listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        // Load balancers of IPv6 (or dual-stack) Services probe the node's IPv6 addresses:
        // a second, IPv6-only socket on the same port (a node without IPv6 has none).
        let listener6 = match listen_v6_only(port) {
            Ok(l) => Some(l),
            Err(e) => {
                debug!(port, error = %e, "no IPv6 health check listener");
                None
            }
        };
        let (checks, healthy) = (self.checks.clone(), self.healthy.clone());
        // kube-proxy answers on any path.
        let app = Router::new().fallback(move || {
            let (checks, healthy) = (checks.clone(), healthy.clone());
            async move {
                let check = checks.read().unwrap_or_else(|e| e.into_inner()).get(&port).cloned();
                match check {
                    Some(check) => {
                        let (status, body) = render(&check, healthy.load(Ordering::Relaxed));
                        (
                            status,
                            [
                                (header::CONTENT_TYPE, "application/json".to_string()),
                                (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
                                (
                                    header::HeaderName::from_static("x-load-balancing-endpoint-weight"),
                                    check.local_endpoints.to_string(),
                                ),
                            ],
                            body,
                        )
                            .into_response()
                    }
                    // Closed between accept and answer.
                    None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                }
            }
        });
        Ok(tokio::spawn(async move {
            let v4 = axum::serve(listener, app.clone());
            let result = match listener6 {
                Some(l6) => tokio::try_join!(v4, axum::serve(l6, app)).map(|_| ()),
                None => v4.await,
            };
            if let Err(e) = result {
                warn!(port, error = %e, "health check server stopped");
            }
        }))
    }
}

/// `[::]:port` with IPV6_V6ONLY, beside the IPv4 listener (whatever `net.ipv6.bindv6only`
/// says, the two never fight over IPv4), with SO_REUSEADDR like std's.
fn listen_v6_only(port: u16) -> io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(128)?;
    tokio::net::TcpListener::from_std(socket.into())
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(n: usize) -> HealthCheck {
        HealthCheck { namespace: "shop".into(), name: "web".into(), local_endpoints: n }
    }

    #[test]
    fn renders_like_kube_proxy() {
        let (status, body) = render(&check(2), true);
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        assert_eq!(render(&check(0), true).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(render(&check(3), false).0, StatusCode::SERVICE_UNAVAILABLE, "proxy not healthy");
    }

    /// Blocking HTTP/1.0 GET on a blocking thread (tokio's io-util is not enabled).
    async fn get(port: u16) -> (u16, String) {
        get_at("127.0.0.1", port).await
    }

    async fn get_at(host: &'static str, port: u16) -> (u16, String) {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect((host, port)).unwrap();
            s.write_all(b"GET /anything HTTP/1.0\r\n\r\n").unwrap();
            let mut resp = String::new();
            s.read_to_string(&mut resp).unwrap();
            let code = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
            (code, resp.split_once("\r\n\r\n").unwrap().1.to_string())
        })
        .await
        .unwrap()
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listeners_follow_the_desired_state() {
        let healthy = Arc::new(AtomicBool::new(true));
        let mut hs = HealthServers::new(healthy);
        let port = free_port();
        assert!(hs.update(&BTreeMap::from([(port, check(1))])).is_empty());
        let (code, body) = get(port).await;
        assert_eq!(code, 200);
        assert!(body.contains("\"localEndpoints\": 1"), "{body}");
        // Over IPv6 too, where the host has it (an IPv6-only node's load balancer probes).
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            assert_eq!(get_at("::1", port).await.0, 200);
        }
        // Count changes without re-binding.
        hs.update(&BTreeMap::from([(port, check(0))]));
        assert_eq!(get(port).await.0, 503);
        // Removed: the port closes.
        hs.update(&BTreeMap::new());
        assert!(hs.ports().is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err());
    }
}
