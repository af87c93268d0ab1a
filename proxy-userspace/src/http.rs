//! The agent's HTTP endpoints: /healthz and /readyz on `--http-addr` (all addresses by
//! default, for the kubelet's probes), /metrics on `--metrics-addr` (loopback by default,
//! like kube-proxy's 127.0.0.1:10249). Handlers read atomics only (`Health`) or the
//! metrics registry, never anything the sync loop or the attacher hold while blocked.
use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, routing::get};

use crate::{health::Health, metrics::Metrics};

/// What the health handlers read (atomics) and count their answers in.
#[derive(Clone)]
struct HealthState {
    health: Arc<Health>,
    metrics: Metrics,
}

async fn healthz(State(s): State<HealthState>) -> (StatusCode, String) {
    let a = answer(s.health.healthz(), "ok");
    Metrics::count_answer(&s.metrics.healthz, a.0.as_u16());
    a
}

async fn livez(State(s): State<HealthState>) -> (StatusCode, String) {
    let a = answer(s.health.live(), "ok");
    Metrics::count_answer(&s.metrics.livez, a.0.as_u16());
    a
}

fn answer(check: Result<(), String>, ok: &str) -> (StatusCode, String) {
    match check {
        Ok(()) => (StatusCode::OK, ok.into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn readyz(State(s): State<HealthState>) -> (StatusCode, String) {
    answer(s.health.ready(), "ready")
}

async fn metrics(State(m): State<Metrics>) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", crate::metrics::CONTENT_TYPE)], m.encode())
}

/// /healthz (kube-proxy's: live and the node eligible), /livez (live), /readyz; the
/// answers of the first two are counted as kube-proxy counts them.
pub fn health_app(health: Arc<Health>, metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(HealthState { health, metrics })
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
