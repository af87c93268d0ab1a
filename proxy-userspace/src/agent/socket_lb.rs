//! Socket-level load balancing: attached (or detached) once at start-up, before the first
//! sync; its translation counters exported as metrics.
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::AgentConfig;
use crate::{
    dataplane::{
        maps::{Maps, cstr, loader},
        sock::{self, SocketLbMode},
    },
    metrics::{Metrics, ServiceLabel},
};

/// Socket-level load balancing as attached: the cgroup whose sockets it translates.
pub(super) struct SockLb {
    pub(super) cgroup: std::path::PathBuf,
}

/// Attach (or, with `--socket-lb=off`, detach) the socket-level programs. Socket-level load
/// balancing the node cannot give (no cgroup v2 hierarchy, a `--cgroup-root` that is not
/// one, programs the kernel refuses to attach) stops the agent with an error naming
/// `--socket-lb`: run without it rather than leave node processes unable to reach Services
/// unnoticed. (`KernelFeatures::check` refused the missing hierarchy and hooks already,
/// before anything was loaded.)
pub(super) fn setup_socket_lb(config: &AgentConfig, programs: &mut loader::Programs) -> Result<Option<SockLb>> {
    let flag = match config.socket_lb {
        SocketLbMode::Off => {
            for pin in sock::detach_all(config.bpffs_root()) {
                info!(pin = %pin, "--socket-lb=off: detached socket-level program");
            }
            if config.nodeport_localhost {
                warn!("--socket-lb=off: NodePorts on 127.0.0.1 and ::1 (--nodeport-localhost) are not served");
            }
            return Ok(None);
        }
        SocketLbMode::On => "--socket-lb=on",
        SocketLbMode::HostOnly => "--socket-lb=host-only",
    };
    let cgroup = match &config.cgroup_root {
        Some(p) => p.clone(),
        None => sock::detect_cgroup_root().context(flag)?,
    };
    let cgroup =
        sock::resolve_cgroup2(&cgroup).context(if config.cgroup_root.is_some() { "--cgroup-root" } else { flag })?;
    let a = sock::attach(programs, config.bpffs_root(), &cgroup, sock_settings(config)).with_context(|| {
        format!("{flag}: attaching the socket-level programs to {} (or run with --socket-lb=off)", cgroup.display())
    })?;
    info!(
        cgroup = %cgroup.display(),
        mode = ?config.socket_lb,
        links_replaced = a.replaced,
        links_created = a.created,
        links_detached = a.detached,
        foreign_links_detached = a.foreign_detached,
        "socket-level load balancing attached"
    );
    Ok(Some(SockLb { cgroup }))
}

/// The hooks' settings from the agent's flags: unconnected UDP sockets keep their backend
/// as long as conntrack keeps a UDP stream (`--conntrack-udp-timeout-stream`).
pub(super) fn sock_settings(config: &AgentConfig) -> sock::SockSettings {
    sock::SockSettings {
        mode: config.socket_lb,
        udp_timeout: std::time::Duration::from_secs(u64::from(config.ct_timeouts.udp_stream)),
    }
}

/// `socket_lb_translations{service, frontend_id}` from the datapath's per-CPU counters,
/// every 2 s (the hooks count each translated connect()/sendmsg() per frontend).
pub(super) async fn sock_translation_metrics(root: std::path::PathBuf, metrics: Metrics) {
    let maps = match Maps::open_pinned(&root) {
        Ok(m) => m,
        Err(e) => return warn!(error = %e, "socket-level translation metrics unavailable"),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        for entry in maps.service_stats.iter() {
            let Ok((k, per_cpu)) = entry else { continue };
            if k.verdict != proxy_common::verdict::SOCK_TRANSLATE {
                continue;
            }
            let calls: u64 = per_cpu.iter().map(|c| c.packets).sum();
            let service = maps
                .meta
                .get(&k.svc_id, 0)
                .map(|m| format!("{}/{}:{}", cstr(&m.namespace), cstr(&m.name), cstr(&m.port_name)))
                .unwrap_or_default();
            let label = ServiceLabel { service, frontend_id: k.svc_id.to_string() };
            metrics.sock_translations.get_or_create(&label).set(i64::try_from(calls).unwrap_or(i64::MAX));
        }
    }
}
