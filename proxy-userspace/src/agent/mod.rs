//! The agent: load the datapath, attach it to pod interfaces and uplinks as they come and
//! go, keep the maps equal to what the Kubernetes objects say, serve health-check node
//! ports, and resolve the neighbours XDP forwarding is missing.
pub mod config;
mod log_once;
mod neighbours;
mod node_config;
mod reconcile;
mod socket_lb;
mod uplinks;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::sync::{mpsc::unbounded_channel, watch};
use tracing::{error, info, warn};

pub use self::config::{AgentConfig, ConfigError, ObjectSource};
use self::{
    neighbours::neighbour_resolver,
    node_config::NodeConfigs,
    reconcile::SyncLoop,
    socket_lb::{setup_socket_lb, sock_translation_metrics},
    uplinks::detect_uplinks,
};
use crate::{
    attacher::{AttachPlan, Attacher},
    conntrack::{GcConfig, kernel::KernelCtTable, task::GcTask},
    control,
    dataplane::{
        attach,
        attach::ifaces,
        features::KernelFeatures,
        guard::{DatapathGuard, OurPrograms},
        kernel::local_addrs,
        lock::RootLock,
        maps::GlobalStats,
        maps::loader,
        maps::node::{NodeMaps, PortRange},
        sock::SocketLbMode,
    },
    health::Health,
    healthcheck::HealthServers,
    metrics::Metrics,
    model::{NodeInfo, Translator},
    source::{Resource, Snapshots, Source, SourceEvent, apiserver, files},
    sync::Syncer,
};

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string())
}

/// `--node-name`, else this host's name (what the DaemonSet's Downward API gives is the
/// same), else "localhost". Shared by the agent and the operator commands.
pub fn node_name(flag: Option<&str>) -> String {
    flag.map(str::to_string).or_else(hostname).unwrap_or_else(|| "localhost".into())
}

/// The conntrack collector on its own thread, on its own handles to the pinned maps.
fn start_conntrack_gc(config: &AgentConfig, metrics: Metrics) -> Result<()> {
    let table = KernelCtTable::open_pinned(config.bpffs_root()).context("conntrack maps")?;
    let table6 = KernelCtTable::open_pinned(config.bpffs_root()).context("IPv6 conntrack maps")?;
    let stats = GlobalStats::open_pinned(config.bpffs_root()).context("stats map")?;
    let cfg = GcConfig { timeouts: config.ct_timeouts, ..GcConfig::default() };
    let task = GcTask::new((table, table6), stats, cfg, config.ct_gc_interval, metrics);
    info!(
        capacity = task.v4.capacity[0],
        capacity_unassured = task.v4.capacity[1],
        capacity6 = task.v6.capacity[0],
        capacity6_unassured = task.v6.capacity[1],
        interval = ?config.ct_gc_interval,
        timeouts = ?cfg.timeouts,
        "conntrack collector started"
    );
    task.spawn();
    Ok(())
}

/// How long the first sync waits for the interfaces present at start to be attached (see
/// `attached_before_adoption`).
const ADOPTION_ATTACH_WAIT: Duration = Duration::from_secs(10);

/// Ready = the first full sync done and every interface present at start-up attached,
/// in whichever order they happen.
async fn readiness(
    mut first_sync: watch::Receiver<bool>,
    mut attached_initial: watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
) {
    // A sender dropped before its signal: the agent is stopping or the attacher is gone;
    // never ready.
    if first_sync.wait_for(|done| *done).await.is_err() || attached_initial.wait_for(|done| *done).await.is_err() {
        return;
    }
    if !ready.swap(true, Ordering::Relaxed) {
        info!("first full sync done and pod interfaces attached; ready");
    }
}

/// Create the root (on bpffs) and lock it for this agent's lifetime.
fn lock_root(root: &std::path::Path) -> Result<RootLock> {
    loader::check_bpffs(root).context("--bpffs-root")?;
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    Ok(RootLock::acquire(root)?)
}

/// The kubeconfig files of a list as `KUBECONFIG` holds them (`a:b`; empty entries are
/// skipped), read and merged as kubectl merges them: the first file to set a value, or to
/// name a cluster, user or context, wins. `None` for an empty list.
pub fn read_kubeconfigs(list: &str) -> Result<Option<kube::config::Kubeconfig>> {
    let mut merged: Option<kube::config::Kubeconfig> = None;
    for path in std::env::split_paths(list).filter(|p| !p.as_os_str().is_empty()) {
        let kc = kube::config::Kubeconfig::read_from(&path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        merged = Some(match merged {
            None => kc,
            Some(m) => m.merge(kc).with_context(|| format!("merging kubeconfig {}", path.display()))?,
        });
    }
    Ok(merged)
}

/// The client configuration from `kubeconfig` (a file or a `:`-separated list, see
/// [`read_kubeconfigs`]) and its `context` (default: its current-context), or the
/// in-cluster / default config, talking to `api_server` when given.
pub async fn kube_config(
    kubeconfig: Option<&str>,
    context: Option<&str>,
    api_server: Option<&http::Uri>,
) -> Result<kube::Config> {
    let options = kube::config::KubeConfigOptions { context: context.map(str::to_string), ..Default::default() };
    let which = context.map(|c| format!(" (context {c})")).unwrap_or_default();
    let merged = kubeconfig.map(read_kubeconfigs).transpose()?.flatten();
    let mut config = match merged {
        Some(kc) => kube::Config::from_custom_kubeconfig(kc, &options)
            .await
            .with_context(|| format!("using kubeconfig {}{which}", kubeconfig.unwrap_or_default()))?,
        // A context names an entry of the default kubeconfig (~/.kube/config), as kubectl.
        None if context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .with_context(|| format!("using the default kubeconfig{which}"))?,
        // In a pod with --api-server, the service-account credentials are all that is
        // needed (the kubelet's KUBERNETES_SERVICE_* may even be missing).
        None if api_server.is_some() => match kube::Config::incluster_dns() {
            Ok(c) => c,
            Err(_) => kube::Config::infer().await.context("no kubeconfig and no in-cluster config")?,
        },
        None => kube::Config::infer().await.context("no kubeconfig and no in-cluster config")?,
    };
    if let Some(url) = api_server {
        config.cluster_url = url.clone();
    }
    Ok(config)
}

/// A client from [`kube_config`] (also used by the CLI's `explain` and `verify`). Also
/// returns the URL used.
pub async fn kube_client(
    kubeconfig: Option<&str>,
    context: Option<&str>,
    api_server: Option<&http::Uri>,
) -> Result<(kube::Client, http::Uri)> {
    let config = kube_config(kubeconfig, context, api_server).await?;
    let url = config.cluster_url.clone();
    Ok((kube::Client::try_from(config).context("building the Kubernetes client")?, url))
}

/// Run the agent until SIGTERM or the object source ends. `config` is checked already
/// ([`AgentConfig::from_args`]).
/// glibc keeps one heap arena per thread that ever allocated (up to 8 per core), each
/// holding on to what was freed in it; the agent allocates mostly on its sync task, so two
/// arenas are plenty and keep the resident size close to what is in use.
pub fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Give the pages freed after a full sync (the parsed list, its buffers) back to the
/// kernel; glibc otherwise keeps them resident for reuse.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub async fn run(config: AgentConfig) -> Result<()> {
    let node_name = config.node_name.clone();
    // No privileges: one clear line before anything is created.
    loader::check_privileges().context("loading the eBPF datapath")?;
    // What this kernel gives, in one line, and a configuration it cannot honour refused
    // before anything is created.
    let features = KernelFeatures::probe(&config.uplinks);
    info!(
        kernel = %features.release,
        xdp_multi_buffer = ?features.xdp_multi_buffer,
        redirect_neigh = ?features.redirect_neigh,
        sock_addr_set_retval = ?features.sock_addr_set_retval,
        tcx = features.tcx,
        attachments = if features.tcx { "tcx links" } else { "clsact filters (no tcx: kernel < 6.6)" },
        btf = features.btf,
        cgroup2 = ?features.cgroup2,
        uplink_drivers = ?features.uplink_drivers,
        "kernel features"
    );
    let socket_lb = match config.socket_lb {
        SocketLbMode::Off => None,
        SocketLbMode::On => Some("on"),
        SocketLbMode::HostOnly => Some("host-only"),
    };
    features.check(socket_lb, config.cgroup_root.is_some())?;
    // A start that fails from here on removes the pin directory if it created it (the
    // lock below already creates it).
    let created_root = loader::CreatedRoot::remember(config.bpffs_root());
    // One agent per root, decided before anything touches the pins.
    let lock = lock_root(config.bpffs_root())?;
    let metrics = Metrics::new();
    let health = Health::new(config.healthz_timeout);
    let ready = health.synced.clone();
    let mut shutdown = control::start(config.http_addr, config.metrics_addr, health.clone(), metrics.clone())?;

    let (mut programs, maps) = loader::load(&config.loader).context("loading the eBPF datapath")?;
    if !programs.migration.is_empty() {
        // Maps changed size or type: put the new programs into every pinned link now, in
        // one loop, then copy what the old programs wrote meanwhile and drop the old maps.
        let swapped = attach::swap_pinned_links(&mut programs, config.bpffs_root());
        info!(links = swapped, "new programs swapped into the pinned links");
        std::mem::take(&mut programs.migration).finish().context("finishing the map migration")?;
    }
    // Before the first sync: a node process dialling a Service during start-up gets the
    // backends the pinned maps hold (a restart swaps the programs into the same links).
    let sock_lb = setup_socket_lb(&config, &mut programs)?;
    metrics.sock_attached.set(i64::from(sock_lb.is_some()));
    if sock_lb.is_some() && config.metrics_per_frontend {
        metrics.register_per_frontend();
        tokio::spawn(sock_translation_metrics(config.bpffs_root().to_path_buf(), metrics.clone()));
    }
    metrics.register_datapath(GlobalStats::open_pinned(config.bpffs_root()).context("stats map")?);
    // Fill ratios use the sizes of the maps in use.
    let capacities = maps.capacities();
    start_conntrack_gc(&config, metrics.clone())?;
    let node_maps = NodeMaps::from_ebpf(&mut programs.ebpf).context("node maps")?;
    let ours = OurPrograms::of(&programs).context("our program ids")?;
    let guard =
        DatapathGuard::new(config.bpffs_root(), lock).context("opening the pinned maps for the datapath check")?;
    let mut syncer = Syncer::new(maps).context("reading back the pinned maps")?;
    // kube-proxy's connections become ours before any Service entry can balance them.
    syncer.before_first_services(crate::takeover::adoption_hook(config.bpffs_root()));
    if let Some(local) = PortRange::local_port_range().filter(|r| r.overlaps(&config.snat_port_range)) {
        warn!(
            snat_ports = %config.snat_port_range,
            ip_local_port_range = %local,
            "--snat-port-range overlaps net.ipv4.ip_local_port_range: SNATed flows can collide with the node's own connections"
        );
    }
    info!(
        node = %node_name,
        bpffs_root = %config.bpffs_root().display(),
        services = syncer.service_count(),
        backends = syncer.backend_count(),
        "datapath loaded; pinned state read back"
    );

    // One watcher for both kinds: uplinks by exact name, pods by pattern or by kind.
    let patterns = config.watched_ifaces.clone();
    let (ltx, lrx) = unbounded_channel();
    let detected_tx = ltx.clone();
    tokio::spawn(async move {
        if let Err(e) = ifaces::watch(patterns, ltx).await {
            error!(error = %e, "interface watcher stopped");
        }
    });
    let (attached_initial, attached_initial_rx) = watch::channel(false);
    let plan = AttachPlan {
        uplinks: config.uplinks.iter().cloned().collect(),
        xdp_mode: config.xdp_mode,
        tc_attach: config.tc_attach,
    };
    let (node_addrs, node_addrs_rx) = tokio::sync::watch::channel(Vec::new());
    if config.uplinks.is_empty() {
        info!(xdp_mode = ?config.xdp_mode, "north-south XDP on detected uplinks (no --uplink given)");
        let pods = config.pod_ifaces.clone();
        tokio::spawn(detect_uplinks(pods, node_addrs_rx, detected_tx));
    } else {
        info!(uplinks = ?config.uplinks, xdp_mode = ?config.xdp_mode, "north-south XDP on uplinks");
    }
    let misses = NodeMaps::open_pinned(config.bpffs_root()).context("node maps")?;
    tokio::spawn(neighbour_resolver(misses));
    let attacher = Attacher {
        programs,
        root: config.bpffs_root().to_path_buf(),
        plan,
        metrics: metrics.clone(),
        attached_initial,
        guard,
        ours,
        health: health.clone(),
        check_interval: config.datapath_check_interval,
        sock: sock_lb.as_ref().map(|s| (s.cgroup.clone(), socket_lb::sock_settings(&config))),
    };
    tokio::spawn(attacher.run(lrx));

    // NodePorts are served on local addresses: known before the first sync, then followed.
    let (local, mut local_rx) = local_addrs::follow().await.context("the node's local addresses")?;
    info!(
        nodeport_addresses = %config.nodeport_addresses,
        local_addresses = ?local,
        "NodePorts served on the local addresses --nodeport-addresses selects"
    );

    let (stx, mut srx) = unbounded_channel();
    let source = match &config.source {
        ObjectSource::Manifests(dir) => {
            info!(dir = %dir.display(), "reading objects from manifests");
            Source::Files(files::start(dir.clone(), node_name.clone(), stx).context("--manifests")?)
        }
        ObjectSource::Kube { kubeconfig, context, api_server } => {
            let (client, url) = kube_client(kubeconfig.as_deref(), context.as_deref(), api_server.as_ref()).await?;
            let service_host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
            let hint = apiserver::bootstrap_hint(&url, api_server.is_some(), service_host.as_deref(), |a| {
                syncer.serves_tcp(a)
            });
            info!(api_server = %url, "watching the Kubernetes API");
            crate::source::kube::start(client, &node_name, stx, hint.map(Into::into));
            Source::Kube
        }
    };

    let mut lp = SyncLoop {
        syncer,
        node_configs: NodeConfigs::new(node_maps, &config),
        health: HealthServers::new(ready.clone()),
        proxy_health: health.clone(),
        source,
        translator: Translator::new(NodeInfo { name: node_name.clone(), ..NodeInfo::default() }),
        snapshots: Snapshots::default(),
        node: None,
        full_sync: true,
        node_name,
        nodeport_addresses: config.nodeport_addresses.clone(),
        nodeport_localhost: config.nodeport_localhost,
        local_addrs: local,
        metrics,
        capacities,
        logged: Default::default(),
        node_addrs,
        sock: sock_lb,
        synced_once: false,
        bpffs_root: config.bpffs_root().to_path_buf(),
        started: std::time::SystemTime::now(),
        pending: Default::default(),
    };
    created_root.keep();
    // Periodic verify (the select branch below is disabled when the interval is 0).
    // Any period will do when it is off: the branch is never polled.
    let verify_every = config.verify_interval.unwrap_or(Duration::from_secs(1));
    let mut verify_tick = tokio::time::interval_at(tokio::time::Instant::now() + verify_every, verify_every);
    let delay = config.sync_delay;
    let mut synced: HashSet<Resource> = HashSet::new();
    let mut burst: Option<Instant> = None;
    let (first_sync, first_sync_rx) = watch::channel(false);
    // The first sync adopts kube-proxy's flows (`takeover`): from then on they are ours
    // only, so our programs must be on the interfaces first.
    let mut attached_before_adoption = Some(attached_initial_rx.clone());
    tokio::spawn(readiness(first_sync_rx, attached_initial_rx, ready.clone()));
    loop {
        tokio::select! {
            ev = srx.recv() => match ev {
                Some(SourceEvent::Synced(r)) => { synced.insert(r); burst.get_or_insert_with(Instant::now); }
                Some(SourceEvent::Changed) => { lp.metrics.queued_now(); burst.get_or_insert_with(Instant::now); }
                Some(SourceEvent::Update(u)) => { lp.update(u); lp.metrics.queued_now(); burst.get_or_insert_with(Instant::now); }
                None => break,
            },
            // A local address came or went: NodePort frontends follow at the next sync.
            Ok(()) = local_rx.changed() => {
                lp.local_addrs = local_rx.borrow_and_update().clone();
                burst.get_or_insert_with(Instant::now);
            }
            _ = &mut shutdown => break,
            // 0 turns the periodic verify off: the branch is never polled.
            _ = verify_tick.tick(), if config.verify_interval.is_some() => {
                lp.verify();
                continue;
            }
        }
        // Reconcile only against a complete picture: every resource fully listed.
        if synced.len() < 3 || burst.is_none() {
            continue;
        }
        // From here a sync is owed (/healthz fails if none completes in time); the initial
        // listing, however slow, is not a stall. A sync blocked for good cannot delay
        // SIGTERM: the control thread exits the process after its grace period.
        health.change_pending();
        // Coalesce the rest of the burst.
        // A zero delay does not sleep at all: tokio's timer rounds every sleep up to its
        // next millisecond tick, which would be most of an incremental sync's latency.
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        while let Ok(ev) = srx.try_recv() {
            match ev {
                SourceEvent::Synced(r) => {
                    synced.insert(r);
                }
                SourceEvent::Update(u) => {
                    lp.update(u);
                    lp.metrics.queued_now();
                }
                SourceEvent::Changed => lp.metrics.queued_now(),
            }
        }
        if let Some(mut attached) = attached_before_adoption.take() {
            let waited = Instant::now();
            match tokio::time::timeout(ADOPTION_ATTACH_WAIT, attached.wait_for(|done| *done)).await {
                Ok(Ok(_)) => {}
                _ => warn!(
                    waited = ?waited.elapsed(),
                    "interfaces not all attached yet: adopting kube-proxy's flows anyway"
                ),
            }
        }
        let full = lp.full_sync;
        lp.sync(burst.take());
        health.synced_now();
        first_sync.send_replace(true);
        if full {
            // A full sync (start-up, relist) frees the transient memory of a whole list.
            release_free_memory();
        }
    }
    // Maps, programs and links stay pinned: traffic keeps flowing while we are away.
    Ok(())
}

#[cfg(test)]
mod kubeconfig_tests {
    use super::kube_config;

    /// A kubeconfig with one cluster, user and context named `name`, at `server`.
    fn kubeconfig(name: &str, server: &str, current: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: {current}\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\nusers:\n- name: {name}\n  user:\n    token: t-{name}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n"
        )
    }

    fn server(list: &str, context: Option<&str>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(kube_config(Some(list), context, None)).map(|c| c.cluster_url.to_string()).unwrap()
    }

    /// `KUBECONFIG=a:b` merges both files as kubectl does (the first file's current-context
    /// wins), and `--context` picks a context defined in either file.
    #[test]
    fn a_kubeconfig_list_is_merged_and_context_picks_the_server() {
        let dir = std::env::temp_dir().join(format!("ebpf-proxy-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.yaml");
        let b = dir.join("b.yaml");
        std::fs::write(&a, kubeconfig("prod", "https://10.0.0.1:6443", "prod")).unwrap();
        std::fs::write(&b, kubeconfig("staging", "https://10.0.0.2:6443", "staging")).unwrap();
        let (a, b) = (a.display().to_string(), b.display().to_string());
        let ab = format!("{a}:{b}");
        let ba = format!("{b}::{a}"); // an empty entry is skipped, as kubectl
        assert_eq!(server(&ab, None), "https://10.0.0.1:6443/");
        assert_eq!(server(&ba, None), "https://10.0.0.2:6443/");
        assert_eq!(server(&ab, Some("staging")), "https://10.0.0.2:6443/");
        assert_eq!(server(&ba, Some("prod")), "https://10.0.0.1:6443/");
        // A context no file defines, or a missing file, is an error naming it.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let err = rt.block_on(kube_config(Some(&ab), Some("dev"), None)).unwrap_err();
        assert!(format!("{err:#}").contains("context dev"), "{err:#}");
        let missing = format!("{a}:{}", dir.join("nope.yaml").display());
        let err = rt.block_on(kube_config(Some(&missing), None, None)).unwrap_err();
        assert!(format!("{err:#}").contains("nope.yaml"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
