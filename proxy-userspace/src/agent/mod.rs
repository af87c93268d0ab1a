//! The agent: load the datapath, attach it to pod interfaces and uplinks as they come and
//! go, keep the maps equal to what the Kubernetes objects say, serve health-check node
//! ports, and resolve the neighbours XDP forwarding is missing.
pub mod config;
mod intake;
mod log_once;
mod neighbours;
mod node;
mod reconcile;
mod socket_lb;
mod startup;
mod store;
mod sync_metrics;
mod uplinks;

use std::{net::IpAddr, sync::Arc};

use anyhow::{Context, Result};
use tokio::sync::{
    mpsc::{Receiver, channel, unbounded_channel},
    oneshot, watch,
};
use tracing::{error, info, warn};

pub use self::config::{AgentConfig, ConfigError, ObjectSource};
use self::{
    intake::Intake,
    neighbours::neighbour_resolver,
    node::ThisNode,
    reconcile::{Events, SyncLoop},
    socket_lb::{SockLb, setup_socket_lb, sock_translation_metrics},
    store::AgentStore,
    sync_metrics::SyncMetrics,
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
        maps::loader::{self, LoaderConfig},
        maps::node::{NodeMaps, PortRange},
        maps::{GlobalStats, Maps},
        sock::SocketLbMode,
    },
    health::Health,
    metrics::Metrics,
    source::{Source, SourceEvent, apiserver, apiserver::HintCell, files},
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

/// Run the agent until SIGTERM or the object source ends. `config` is checked already
/// ([`AgentConfig::from_args`]). The start-up steps, in their order, then the event loop.
pub async fn run(config: AgentConfig) -> Result<()> {
    let mut startup = startup::Startup::begin();
    check_kernel(&config)?;
    // A start that fails from here on removes the pin directory if it created it (the
    // lock below already creates it).
    let created_root = loader::CreatedRoot::remember(config.bpffs_root());
    // One agent per root, decided before anything touches the pins.
    let lock = lock_root(config.bpffs_root())?;
    let control = start_control(&config)?;
    startup.mark("prepare");
    // The kernel verifies the programs (on threads of their own) while the source lists the
    // objects and they are parsed into the translation: neither needs the other.
    let loading = {
        let loader = config.loader.clone();
        tokio::task::spawn_blocking(move || load_dataplane(&loader))
    };
    let (node_addrs, node_addrs_rx) = watch::channel(Vec::new());
    let hint = HintCell::default();
    let started = async {
        let (local, local_changes) = follow_local_addrs(&config).await?;
        let (source, source_events, api_url) = start_source(&config, &hint).await?;
        anyhow::Ok((local, local_changes, source, source_events, api_url))
    };
    let (local, local_changes, source, mut source_events, api_url) = match started.await {
        Ok(started) => started,
        Err(e) => {
            // The load finishes first, so that the pin directory this start created is
            // removed whole (`created_root`), not while maps are being pinned into it.
            let _ = loading.await;
            return Err(e);
        }
    };
    let node = ThisNode::new(&config, local, control.health.clone(), node_addrs);
    let mut intake = Intake::new(source, node, SyncMetrics::new(control.metrics.clone()), &config);
    let (mut programs, maps) = intake.until(&mut source_events, loading).await?;
    startup.mark("load");
    // Before the first sync: a node process dialling a Service during start-up gets the
    // backends the pinned maps hold (a restart swaps the programs into the same links).
    let sock_lb = start_socket_lb(&config, &mut programs, &control.metrics)?;
    // Fill ratios use the sizes of the maps in use.
    intake.metrics.set_capacities(maps.capacities());
    start_counters(&config, &control.metrics)?;
    let node_maps = NodeMaps::from_ebpf(&mut programs.ebpf).context("node maps")?;
    let (attacher, attached_initial) = prepare_attacher(&config, programs, lock, &sock_lb, &control)?;
    let syncer = read_back(&config, AgentStore::new(maps, node_maps, sock_lb))?;
    if let Some(url) = api_url {
        fill_bootstrap_hint(&config, &url, &syncer, &hint);
    }
    start_attaching(&config, attacher, node_addrs_rx)?;
    startup.mark("setup");
    let lp = SyncLoop::new(syncer, intake, &control.health, &config, startup);
    created_root.keep();
    let events = Events { source: source_events, local_addrs: local_changes, shutdown: control.shutdown };
    lp.run(events, control.health, attached_initial, &config).await;
    // Maps, programs and links stay pinned: traffic keeps flowing while we are away.
    Ok(())
}

/// No privileges, or a configuration this kernel cannot honour: one clear error before
/// anything is created. What the kernel gives, in one line.
fn check_kernel(config: &AgentConfig) -> Result<()> {
    loader::check_privileges().context("loading the eBPF datapath")?;
    let features = KernelFeatures::probe(&config.uplinks);
    info!(
        kernel = %features.release,
        xdp_multi_buffer = ?features.xdp_multi_buffer,
        redirect_neigh = ?features.redirect_neigh,
        xdp_metadata = features.xdp_metadata,
        sock_addr_set_retval = ?features.sock_addr_set_retval,
        tcx = features.tcx,
        attachments = if features.tcx { "tcx links" } else { "clsact filters (no tcx: kernel < 6.6)" },
        btf = features.btf,
        cgroup2 = ?features.cgroup2,
        uplink_drivers = ?features.uplink_drivers,
        "kernel features"
    );
    if !features.xdp_metadata {
        warn!(
            kernel = %features.release,
            "kernel refuses bpf_xdp_adjust_meta to XDP: north-south packets XDP forwards to a remote backend \
             behind a tunnel device (VXLAN/IPIP overlay) are redirected there directly, which works in \
             generic XDP mode only (--xdp-mode generic); native XDP drops them"
        );
    }
    let socket_lb = match config.socket_lb {
        SocketLbMode::Off => None,
        SocketLbMode::On => Some("on"),
        SocketLbMode::HostOnly => Some("host-only"),
    };
    features.check(socket_lb, config.cgroup_root.is_some())?;
    Ok(())
}

/// The control thread's handles: what it serves, and when it says stop.
struct Control {
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: oneshot::Receiver<&'static str>,
}

/// The health and metrics endpoints and the signal handlers, on the control thread.
fn start_control(config: &AgentConfig) -> Result<Control> {
    let metrics = Metrics::new();
    let health = Health::new(config.healthz_timeout);
    let shutdown = control::start(config.http_addr, config.metrics_addr, health.clone(), metrics.clone())?;
    Ok(Control { metrics, health, shutdown })
}

/// Load the programs and create or re-use the pinned maps; maps that changed size or type
/// are migrated.
fn load_dataplane(config: &LoaderConfig) -> Result<(loader::Programs, Maps)> {
    let (mut programs, maps) = loader::load(config).context("loading the eBPF datapath")?;
    if !programs.migration.is_empty() {
        // Maps changed size or type: put the new programs into every pinned link now, in
        // one loop, then copy what the old programs wrote meanwhile and drop the old maps.
        let swapped = attach::swap_pinned_links(&mut programs, &config.bpffs_root);
        info!(links = swapped, "new programs swapped into the pinned links");
        std::mem::take(&mut programs.migration).finish().context("finishing the map migration")?;
    }
    Ok((programs, maps))
}

/// Socket-level load balancing attached (or detached), and its metrics.
fn start_socket_lb(config: &AgentConfig, programs: &mut loader::Programs, metrics: &Metrics) -> Result<Option<SockLb>> {
    let sock_lb = setup_socket_lb(config, programs)?;
    metrics.sock_attached.set(i64::from(sock_lb.is_some()));
    if sock_lb.is_some() && config.metrics_per_frontend {
        metrics.register_per_frontend();
        tokio::spawn(sock_translation_metrics(config.bpffs_root().to_path_buf(), metrics.clone()));
    }
    Ok(sock_lb)
}

/// The datapath's counters as metrics, and the conntrack collector.
fn start_counters(config: &AgentConfig, metrics: &Metrics) -> Result<()> {
    metrics.register_datapath(GlobalStats::open_pinned(config.bpffs_root()).context("stats map")?);
    start_conntrack_gc(config, metrics.clone())
}

/// The attacher, not started yet: it owns the programs and the root's lock (through the
/// datapath check). The receiver says when every interface present at start is attached.
fn prepare_attacher(
    config: &AgentConfig,
    programs: loader::Programs,
    lock: RootLock,
    sock_lb: &Option<SockLb>,
    control: &Control,
) -> Result<(Attacher, watch::Receiver<bool>)> {
    let ours = OurPrograms::of(&programs).context("our program ids")?;
    let guard =
        DatapathGuard::new(config.bpffs_root(), lock).context("opening the pinned maps for the datapath check")?;
    let (attached_initial, attached_initial_rx) = watch::channel(false);
    let attacher = Attacher {
        programs,
        root: config.bpffs_root().to_path_buf(),
        plan: AttachPlan {
            uplinks: config.uplinks.iter().cloned().collect(),
            xdp_mode: config.xdp_mode,
            tc_attach: config.tc_attach,
        },
        metrics: control.metrics.clone(),
        attached_initial,
        guard,
        ours,
        health: control.health.clone(),
        check_interval: config.datapath_check_interval,
        sock: sock_lb.as_ref().map(|s| (s.cgroup.clone(), socket_lb::sock_settings(config))),
    };
    Ok((attacher, attached_initial_rx))
}

/// The sync over the pinned maps, with what they hold read back.
fn read_back(config: &AgentConfig, store: AgentStore) -> Result<Syncer<AgentStore>> {
    let mut syncer = Syncer::new(store).context("reading back the pinned maps")?;
    syncer.set_maglev(config.maglev);
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
        node = %config.node_name,
        bpffs_root = %config.bpffs_root().display(),
        services = syncer.service_count(),
        backends = syncer.backend_count(),
        "datapath loaded; pinned state read back"
    );
    Ok(syncer)
}

/// Attach the programs to pod interfaces and uplinks as they come and go (one watcher for
/// both kinds: uplinks by exact name, pods by pattern or by kind), detect the uplinks when
/// `--uplink` names none (from the Node's addresses, `node_addrs_rx`), and resolve the
/// neighbours XDP misses.
fn start_attaching(
    config: &AgentConfig,
    attacher: Attacher,
    node_addrs_rx: watch::Receiver<Vec<IpAddr>>,
) -> Result<()> {
    let patterns = config.watched_ifaces.clone();
    let (ltx, lrx) = unbounded_channel();
    let detected_tx = ltx.clone();
    tokio::spawn(async move {
        if let Err(e) = ifaces::watch(patterns, ltx).await {
            error!(error = %e, "interface watcher stopped");
        }
    });
    if config.uplinks.is_empty() {
        info!(xdp_mode = ?config.xdp_mode, "north-south XDP on detected uplinks (no --uplink given)");
        let pods = config.pod_ifaces.clone();
        tokio::spawn(detect_uplinks(pods, node_addrs_rx, detected_tx));
    } else {
        info!(uplinks = ?config.uplinks, xdp_mode = ?config.xdp_mode, "north-south XDP on uplinks");
    }
    let misses = NodeMaps::open_pinned(config.bpffs_root()).context("node maps")?;
    tokio::spawn(neighbour_resolver(misses));
    tokio::spawn(attacher.run(lrx));
    Ok(())
}

/// NodePorts are served on local addresses: known before the first sync, then followed.
async fn follow_local_addrs(config: &AgentConfig) -> Result<(Vec<IpAddr>, watch::Receiver<Vec<IpAddr>>)> {
    let (local, changes) = local_addrs::follow().await.context("the node's local addresses")?;
    info!(
        nodeport_addresses = %config.nodeport_addresses,
        local_addresses = ?local,
        "NodePorts served on the local addresses --nodeport-addresses selects"
    );
    Ok((local, changes))
}

/// Start reading the objects: from the manifests directory, or watching the API (also
/// returns its URL, for the bootstrap hint).
async fn start_source(
    config: &AgentConfig,
    hint: &HintCell,
) -> Result<(Source, Receiver<SourceEvent>, Option<http::Uri>)> {
    let (stx, srx) = channel(crate::source::QUEUE);
    let node_name = &config.node_name;
    let (source, url) = match &config.source {
        ObjectSource::Manifests(dir) => {
            info!(dir = %dir.display(), "reading objects from manifests");
            files::start(dir.clone(), node_name.clone(), stx).context("--manifests")?;
            (Source::Files, None)
        }
        ObjectSource::Kube { kubeconfig, context, api_server } => {
            let (client, url) = kube_client(kubeconfig.as_deref(), context.as_deref(), api_server.as_ref()).await?;
            info!(api_server = %url, "watching the Kubernetes API");
            crate::source::kube::start(client, node_name, stx, hint.clone());
            (Source::Kube, Some(url))
        }
    };
    Ok((source, srx, url))
}

/// Once the pinned state is read back: whether the API server's address is the
/// `kubernetes` ClusterIP nothing serves yet (see `apiserver::bootstrap_hint`), for the
/// watchers' errors.
fn fill_bootstrap_hint(config: &AgentConfig, url: &http::Uri, syncer: &Syncer<AgentStore>, hint: &HintCell) {
    let api_server_given = matches!(&config.source, ObjectSource::Kube { api_server: Some(_), .. });
    let service_host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    if let Some(h) = apiserver::bootstrap_hint(url, api_server_given, service_host.as_deref(), |a| syncer.serves_tcp(a))
    {
        let _ = hint.set(h.into());
    }
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
