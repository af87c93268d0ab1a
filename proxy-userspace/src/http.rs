//! The agent's HTTP endpoints: /healthz and /readyz on `--http-addr` (all addresses by
//! default, for the kubelet's probes), /metrics on `--metrics-addr` (loopback by default,
//! like kube-proxy's 127.0.0.1:10249). Handlers read atomics only (`Health`) or the
//! metrics registry, never anything the sync loop or the attacher hold while blocked.
use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, routing::get};

use crate::{health::Health, metrics::Metrics};

async fn healthz(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    answer(h.healthz(), "ok")
}

async fn livez(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    answer(h.live(), "ok")
}

fn answer(check: Result<(), String>, ok: &str) -> (StatusCode, String) {
    match check {
        Ok(()) => (StatusCode::OK, ok.into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    answer(h.ready(), "ready")
}

async fn metrics(State(m): State<Metrics>) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", "text/plain; version=0.0.4")], m.encode())
}

/// /healthz (kube-proxy's: live and the node eligible), /livez (live), /readyz.
pub fn health_app(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// /metrics.
pub fn metrics_app(metrics: Metrics) -> Router {
    Router::new().route("/metrics", get(self::metrics)).with_state(metrics)
}

/// Bind now (so a taken port fails the start with its address), serve later on any runtime.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

pub async fn serve(listener: std::net::TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(tokio::net::TcpListener::from_std(listener)?, app).await
}
