//! The control thread: the HTTP endpoints and signal handling on their own OS thread and
//! single-threaded runtime, so that nothing the agent's main runtime runs — a source reload
//! stuck on a FIFO, a blocked sync — can take /healthz down or keep SIGTERM from ending the
//! process.
//!
//! Signals: SIGTERM and SIGINT end the agent (the datapath stays pinned and keeps
//! forwarding); if the main runtime has not returned within [`SHUTDOWN_GRACE`], the process
//! exits anyway. SIGHUP and SIGUSR1, whose default action would kill the process (a
//! terminal closing, a stray `kill -USR1`), are logged and ignored: the agent follows its
//! sources continuously and has nothing to reload.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};
use tracing::{error, info, warn};

use crate::{health::Health, http, metrics::Metrics};

/// How long a SIGTERM waits for the agent to return before the process exits regardless.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("binding {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the control thread: {0}")]
    Start(std::io::Error),
}

/// Bind both addresses, install the signal handlers, and start serving. Returns once the
/// handlers are installed; the receiver fires on SIGTERM/SIGINT.
pub fn start(
    health_addr: SocketAddr,
    metrics_addr: SocketAddr,
    health: Arc<Health>,
    metrics: Metrics,
) -> Result<oneshot::Receiver<&'static str>, ControlError> {
    let hl = http::bind(health_addr).map_err(|source| ControlError::Bind {
        what: "--http-addr",
        addr: health_addr,
        source,
    })?;
    let ml = http::bind(metrics_addr).map_err(|source| ControlError::Bind {
        what: "--metrics-addr",
        addr: metrics_addr,
        source,
    })?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let signals = (|| {
                    Ok::<_, std::io::Error>((
                        signal(SignalKind::terminate())?,
                        signal(SignalKind::interrupt())?,
                        signal(SignalKind::hangup())?,
                        signal(SignalKind::user_defined1())?,
                    ))
                })();
                let (mut term, mut int, mut hup, mut usr1) = match signals {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for (what, listener, app) in
                    [("health", hl, http::health_app(health, metrics.clone())), ("metrics", ml, http::metrics_app(metrics))]
                {
                    tokio::spawn(async move {
                        if let Err(e) = http::serve(listener, app).await {
                            error!(server = what, error = %e, "HTTP server stopped");
                        }
                    });
                }
                let _ = ready_tx.send(Ok(()));
                let name = loop {
                    tokio::select! {
                        _ = term.recv() => break "SIGTERM",
                        _ = int.recv() => break "SIGINT",
                        _ = hup.recv() => info!(signal = "SIGHUP", "signal ignored: nothing to reload (sources are followed continuously)"),
                        _ = usr1.recv() => info!(signal = "SIGUSR1", "signal ignored"),
                    }
                };
                info!(signal = name, "shutting down; datapath left in place");
                let _ = stop_tx.send(name);
                tokio::time::sleep(SHUTDOWN_GRACE).await;
                warn!(grace = ?SHUTDOWN_GRACE, "the agent did not stop in time (blocked sync or source); exiting anyway");
                std::process::exit(0);
            });
        })
        .map_err(ControlError::Start)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(stop_rx),
        Ok(Err(e)) => Err(ControlError::Start(e)),
        Err(_) => Err(ControlError::Start(std::io::Error::other("control thread ended early"))),
    }
}
