//! The agent: load the datapath, attach it to pod interfaces and uplinks as they come and
//! go, keep the maps equal to what the Kubernetes objects say, serve health-check node
//! ports, and resolve the neighbours XDP forwarding is missing.
use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::sync::mpsc::unbounded_channel;
use tracing::{error, info, warn};

use crate::{
    attacher::{AttachPlan, Attacher},
    cli::AgentArgs,
    conntrack::{GcConfig, task::GcTask},
    control,
    dataplane::{
        attach,
        ct_table::KernelCtTable,
        guard::{DatapathGuard, OurPrograms},
        ifaces::{self, IfacePatterns},
        loader::{self, LoaderConfig},
        lock::RootLock,
        maps::{Capacities, GlobalStats, Maps},
        node::{NodeMaps, PortRange, node_config, node_config6, resolve_neighbour},
        sock::{self, SocketLbMode},
        uplinks,
    },
    health::Health,
    healthcheck::HealthServers,
    metrics::{FamilyLabel, MapLabel, Metrics, ServiceLabel},
    model::{
        self, IpFamily,
        node::{node_info, snat_address, snat_address6},
    },
    show::cstr,
    source::{Resource, Source, SourceEvent, files},
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

/// Ask the kernel to resolve the next hops XDP found no neighbour entry for. Polled: the
/// map is tiny and usually empty, and a miss costs the client one retransmission anyway.
async fn neighbour_resolver(mut maps: NodeMaps) {
    let (conn, handle, _) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "neighbour resolver: no rtnetlink socket; XDP forwarding relies on the kernel's own resolution");
            return;
        }
    };
    tokio::spawn(conn);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        for (ifindex, next_hop) in maps.take_neigh_misses() {
            match resolve_neighbour(&handle, ifindex, next_hop).await {
                Ok(()) => info!(ifindex, %next_hop, "XDP next hop had no neighbour entry; resolving"),
                Err(e) => warn!(ifindex, %next_hop, error = %e, "cannot trigger neighbour resolution"),
            }
        }
    }
}

struct SyncLoop {
    syncer: Syncer<Maps>,
    node_maps: NodeMaps,
    health: HealthServers,
    source: Source,
    node_name: String,
    nodeport_addresses: Vec<String>,
    hairpin_address: Ipv4Addr,
    hairpin_address6: Ipv6Addr,
    snat_port_range: PortRange,
    last_node_config: Option<proxy_common::NodeConfig>,
    last_node_config6: Option<proxy_common::NodeConfig6>,
    metrics: Metrics,
    capacities: Capacities,
    last_warnings: BTreeSet<String>,
    /// Frontends not programmed at the last sync, with why: logged when this set changes.
    last_errors: BTreeSet<String>,
    /// The Node's NodePort addresses, for uplink detection (when `--uplink` names none).
    node_addrs: tokio::sync::watch::Sender<Vec<IpAddr>>,
    /// What the last sync was asked for, and the drift the last verify found (logged when
    /// it changes).
    last_desired: Option<model::DesiredState>,
    last_drift: BTreeSet<String>,
    bpffs_root: std::path::PathBuf,
    /// Socket-level load balancing, when attached: stale UDP sockets to destroy.
    sock: Option<SockLb>,
}

/// Socket-level load balancing as attached: the cgroup and the reverse-translation map.
struct SockLb {
    cgroup: std::path::PathBuf,
    revnat: sock::RevNat,
}

impl SyncLoop {
    /// Translate the current snapshot and apply it.
    fn sync(&mut self, burst_start: Option<Instant>) {
        let t = Instant::now();
        let objects = match self.source.snapshot() {
            Ok(o) => o,
            Err(e) => {
                // Keep every frontend as it is: nothing here says the objects are gone.
                error!(error = %e, "cannot read the objects; the maps are left as they are");
                return;
            }
        };
        let (node, mut warnings) = node_info(&self.node_name, objects.node.as_ref(), &self.nodeport_addresses);
        self.node_addrs.send_if_modified(|a| {
            let changed = *a != node.nodeport_addrs;
            a.clone_from(&node.nodeport_addrs);
            changed
        });
        // The addresses programmed now stay with their Services on a conflict.
        let claims = self.syncer.claims();
        let (desired, w) = model::translate_with_claims(&objects.services, &objects.slices, &node, &claims);
        warnings.extend(w);
        // Each malformed object is logged once, not on every sync.
        let now: BTreeSet<String> = warnings.iter().map(|w| w.to_string()).collect();
        for w in &warnings {
            if !self.last_warnings.contains(&w.to_string()) {
                warn!(kind = w.kind, object = %w.object, "skipped: {}", w.message);
            }
        }
        self.metrics.object_warnings.set(now.len() as i64);
        self.last_warnings = now;

        // Node facts first: a flow to a new remote backend needs the SNAT address.
        let snat = snat_address(objects.node.as_ref());
        let cfg = node_config(snat, Some(self.hairpin_address), self.snat_port_range);
        if self.last_node_config != Some(cfg) {
            match self.node_maps.set_config(&cfg) {
                Ok(()) => {
                    info!(
                        snat_address = %snat.map(|a| a.to_string()).unwrap_or_else(|| "(address the client used)".into()),
                        hairpin_address = %self.hairpin_address,
                        snat_ports = %self.snat_port_range,
                        "node config written"
                    );
                    self.last_node_config = Some(cfg);
                }
                Err(e) => error!(error = %e, "cannot write the node config"),
            }
        }
        let snat6 = snat_address6(objects.node.as_ref());
        let cfg6 = node_config6(snat6, Some(self.hairpin_address6));
        if self.last_node_config6 != Some(cfg6) {
            match self.node_maps.set_config6(&cfg6) {
                Ok(()) => {
                    info!(
                        snat_address6 = %snat6.map(|a| a.to_string()).unwrap_or_else(|| "(address the client used)".into()),
                        hairpin_address6 = %self.hairpin_address6,
                        "IPv6 node config written"
                    );
                    self.last_node_config6 = Some(cfg6);
                }
                Err(e) => error!(error = %e, "cannot write the IPv6 node config"),
            }
        }
        self.health.update(&desired.health_checks);

        let report = self.syncer.apply(&desired);
        self.last_desired = Some(desired);
        let elapsed = t.elapsed();
        self.metrics.sync_duration.observe(elapsed.as_secs_f64());
        if let Some(start) = burst_start {
            self.metrics.event_to_map.observe(start.elapsed().as_secs_f64());
        }
        self.metrics.map_writes.inc_by(report.writes);
        self.metrics.sync_errors.inc_by(report.errors.len() as u64);
        self.metrics.services.set(report.services as i64);
        self.metrics.backends.set(report.backends as i64);
        let (services4, backends4) = (report.services - report.services6, report.backends - report.backends6);
        for (family, n) in [(IpFamily::V4, services4), (IpFamily::V6, report.services6)] {
            self.metrics.frontends.get_or_create(&FamilyLabel { family: family.name().into() }).set(n as i64);
        }
        let fill = |n: usize, max: u32| n as f64 / f64::from(max.max(1));
        let c = self.capacities;
        for (map, n, max) in [
            ("SERVICES", services4, c.services),
            ("BACKENDS", backends4, c.backends),
            ("BACKEND_SLOTS", report.slots, c.slots),
            ("SERVICES6", report.services6, c.services6),
            ("BACKENDS6", report.backends6, c.backends6),
        ] {
            self.metrics.map_fill.get_or_create(&MapLabel { map: map.into() }).set(fill(n, max));
        }
        // A map that stays full fails the same frontends on every sync: log each once.
        let errors: BTreeSet<String> = report.errors.iter().map(|(fk, e)| format!("{fk}: {e}")).collect();
        for (fk, e) in &report.errors {
            if !self.last_errors.contains(&format!("{fk}: {e}")) {
                error!(frontend = %fk, error = %e, "frontend not programmed");
            }
        }
        if errors.is_empty() && !self.last_errors.is_empty() {
            info!("every frontend programmed again");
        }
        self.last_errors = errors;
        if let Some(sl) = self.sock.as_ref().filter(|_| !report.removed_udp_backends.is_empty()) {
            let r = sock::destroy_udp_sockets(&sl.cgroup, &sl.revnat, &report.removed_udp_backends);
            self.metrics.sock_udp_destroyed.inc_by(r.destroyed as u64);
            self.metrics.sock_destroy_duration.observe(r.elapsed.as_secs_f64());
            info!(
                backends = report.removed_udp_backends.len(),
                namespaces = r.namespaces,
                destroyed = r.destroyed,
                failed = r.failed,
                duration_ms = r.elapsed.as_secs_f64() * 1e3,
                "destroyed connected UDP sockets of removed backends"
            );
        }
        info!(
            services = report.services,
            backends = report.backends,
            writes = report.writes,
            conntrack_purged = report.conntrack_purged,
            errors = report.errors.len(),
            duration_ms = elapsed.as_secs_f64() * 1e3,
            "synced"
        );
    }
}

impl SyncLoop {
    /// Re-read the maps from their pins (not the syncer's own record of what it wrote) and
    /// compare them with the last desired state, as `ebpf-proxy verify` does: whatever
    /// changed them behind our back shows up here.
    fn verify(&mut self) {
        let Some(desired) = &self.last_desired else { return };
        use crate::sync::MapStore;
        let snap = match crate::dataplane::maps::Maps::open_pinned(&self.bpffs_root).and_then(|m| m.snapshot()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "verify: cannot read the pinned maps");
                return;
            }
        };
        let drift = crate::sync::verify::verify(desired, &snap);
        self.metrics.verify_runs.inc();
        self.metrics.datapath_drift.set(drift.len() as i64);
        let now: BTreeSet<String> = drift.iter().map(|d| d.to_string()).collect();
        for d in now.difference(&self.last_drift) {
            warn!(drift = %d, "the maps differ from what the API says");
        }
        if now.is_empty() && !self.last_drift.is_empty() {
            info!("the maps agree with the API again");
        }
        self.last_drift = now;
    }
}

/// Uplinks when `--uplink` names none: the devices carrying the Node's addresses and the
/// default routes' devices, re-read every few seconds and whenever the Node's addresses
/// change. New ones are attached; ones that vanish are forgotten. A device that stops being
/// an uplink but stays keeps its programs until it goes or the agent restarts (they only
/// act on traffic to our frontends).
async fn detect_uplinks(
    pods: IfacePatterns,
    mut node_addrs: tokio::sync::watch::Receiver<Vec<IpAddr>>,
    tx: tokio::sync::mpsc::UnboundedSender<ifaces::LinkEvent>,
) {
    const EVERY: Duration = Duration::from_secs(2);
    let mut current: std::collections::BTreeMap<String, u32> = Default::default();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = node_addrs.changed() => if changed.is_err() { return },
        }
        let view = match tokio::task::block_in_place(uplinks::read_host) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "cannot read the interfaces to detect uplinks");
                continue;
            }
        };
        let addrs = node_addrs.borrow().clone();
        let want = uplinks::choose(&view, &addrs, |n| pods.matches(n));
        for (name, &index) in want.iter().filter(|(n, i)| current.get(*n) != Some(i)) {
            info!(iface = %name, ifindex = index, "detected uplink (carries a node address or the default route)");
            if tx.send(ifaces::LinkEvent::Uplink { index, name: name.clone() }).is_err() {
                return;
            }
        }
        for (name, &index) in current.iter().filter(|(n, _)| !view.links.contains_key(*n)) {
            let _ = tx.send(ifaces::LinkEvent::Gone { index, name: name.clone() });
        }
        current = want;
    }
}

/// The conntrack collector on its own thread, on its own handles to the pinned maps.
fn start_conntrack_gc(args: &AgentArgs, metrics: Metrics) -> Result<()> {
    let table = KernelCtTable::open_pinned(&args.bpffs_root).context("conntrack map")?;
    let table6 = KernelCtTable::open_pinned(&args.bpffs_root).context("IPv6 conntrack map")?;
    let stats = GlobalStats::open_pinned(&args.bpffs_root).context("stats map")?;
    let cfg = GcConfig { timeouts: args.conntrack.timeouts(), ..GcConfig::default() };
    let task = GcTask::new((table, table6), stats, cfg, args.conntrack.conntrack_gc_interval, metrics);
    info!(
        capacity = task.v4.capacity,
        capacity6 = task.v6.capacity,
        interval = ?args.conntrack.conntrack_gc_interval,
        timeouts = ?cfg.timeouts,
        "conntrack collector started"
    );
    task.spawn();
    Ok(())
}

/// `socket_lb_translations{service, frontend_id}` from the datapath's per-CPU counters,
/// every 2 s (the hooks count each translated connect()/sendmsg() per frontend).
async fn sock_translation_metrics(root: std::path::PathBuf, metrics: Metrics) {
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

/// Attach (or, with `--socket-lb=off`, detach) the socket-level programs. A kernel without
/// what they need, or a host without cgroup v2 when none was named, leaves the node on the
/// TC/XDP paths with an error in the log; a `--cgroup-root` that is not a cgroup v2
/// directory stops the agent.
fn setup_socket_lb(args: &AgentArgs, programs: &mut loader::Programs) -> Result<Option<SockLb>> {
    if args.socket_lb == SocketLbMode::Off {
        for pin in sock::detach_all(&args.bpffs_root) {
            info!(pin = %pin, "--socket-lb=off: detached socket-level program");
        }
        return Ok(None);
    }
    let cgroup = match &args.cgroup_root {
        Some(p) => p.clone(),
        None => match sock::detect_cgroup_root() {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e, "socket-level load balancing off: node processes cannot reach Services");
                return Ok(None);
            }
        },
    };
    let cgroup = match sock::resolve_cgroup2(&cgroup) {
        Ok(c) => c,
        Err(e) if args.cgroup_root.is_some() => return Err(e).context("--cgroup-root"),
        Err(e) => {
            error!(error = %e, "socket-level load balancing off: node processes cannot reach Services");
            return Ok(None);
        }
    };
    match sock::attach(programs, &args.bpffs_root, &cgroup, args.socket_lb) {
        Ok(a) => {
            info!(
                cgroup = %cgroup.display(),
                mode = ?args.socket_lb,
                links_replaced = a.replaced,
                links_created = a.created,
                links_detached = a.detached,
                "socket-level load balancing attached"
            );
            let revnat = sock::RevNat::open_pinned(&args.bpffs_root).context("socket-level reverse translations")?;
            Ok(Some(SockLb { cgroup, revnat }))
        }
        Err(e) => {
            // The whole chain: the syscall's errno is what tells the operator why.
            let e = anyhow::Error::from(e);
            error!(error = format!("{e:#}"), "socket-level load balancing off: node processes cannot reach Services");
            Ok(None)
        }
    }
}

/// Create the root (on bpffs) and lock it for this agent's lifetime.
fn lock_root(root: &std::path::Path) -> Result<RootLock> {
    loader::check_bpffs(root).context("--bpffs-root")?;
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    Ok(RootLock::acquire(root)?)
}

/// A client from `kubeconfig`, or the in-cluster / default config (also used by the CLI's
/// `explain` and `verify`).
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("no kubeconfig and no in-cluster config")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

pub async fn run(args: AgentArgs) -> Result<()> {
    let node_name = node_name(args.source.node_name.as_deref());
    // No privileges: one clear line before anything is created.
    loader::check_privileges().context("loading the eBPF datapath")?;
    // A start that fails from here on removes the pin directory if it created it (the
    // lock below already creates it).
    let created_root = loader::CreatedRoot::remember(&args.bpffs_root);
    // One agent per root, decided before anything touches the pins.
    let lock = lock_root(&args.bpffs_root)?;
    let metrics = Metrics::new();
    let health = Health::new(Duration::from_secs(args.healthz_timeout_secs));
    let ready = health.synced.clone();
    let mut shutdown = control::start(args.http_addr, args.metrics_addr, health.clone(), metrics.clone())?;

    let cfg = LoaderConfig {
        bpffs_root: args.bpffs_root.clone(),
        max_services: args.max_services,
        max_backends: args.max_backends,
        max_conntrack: args.max_conntrack,
    };
    let (mut programs, maps) = loader::load(&cfg).context("loading the eBPF datapath")?;
    if !programs.migration.is_empty() {
        // Maps changed size or type: put the new programs into every pinned link now, in
        // one loop, then copy what the old programs wrote meanwhile and drop the old maps.
        let swapped = attach::swap_pinned_links(&mut programs, &args.bpffs_root);
        info!(links = swapped, "new programs swapped into the pinned links");
        std::mem::take(&mut programs.migration).finish().context("finishing the map migration")?;
    }
    // Before the first sync: a node process dialling a Service during start-up gets the
    // backends the pinned maps hold (a restart swaps the programs into the same links).
    let sock_lb = setup_socket_lb(&args, &mut programs)?;
    metrics.sock_attached.set(i64::from(sock_lb.is_some()));
    if sock_lb.is_some() {
        tokio::spawn(sock_translation_metrics(args.bpffs_root.clone(), metrics.clone()));
    }
    // Fill ratios use the sizes of the maps in use.
    let capacities = maps.capacities();
    start_conntrack_gc(&args, metrics.clone())?;
    let node_maps = NodeMaps::from_ebpf(&mut programs.ebpf).context("node maps")?;
    let ours = OurPrograms::of(&programs).context("our program ids")?;
    let guard = DatapathGuard::new(&args.bpffs_root, lock).context("opening the pinned maps for the datapath check")?;
    let syncer = Syncer::new(maps).context("reading back the pinned maps")?;
    if let Some(local) = PortRange::local_port_range().filter(|r| r.overlaps(&args.snat_port_range)) {
        warn!(
            snat_ports = %args.snat_port_range,
            ip_local_port_range = %local,
            "--snat-port-range overlaps net.ipv4.ip_local_port_range: SNATed flows can collide with the node's own connections"
        );
    }
    info!(
        node = %node_name,
        bpffs_root = %args.bpffs_root.display(),
        services = syncer.service_count(),
        backends = syncer.backend_count(),
        "datapath loaded; pinned state read back"
    );

    // One watcher for both kinds: uplinks by exact name, pods by pattern.
    let mut watched = args.pod_iface_pattern.clone();
    watched.extend(args.uplink.iter().map(|u| glob::Pattern::escape(u)));
    let patterns = IfacePatterns::new(&watched).context("--pod-iface-pattern")?;
    let (ltx, lrx) = unbounded_channel();
    let detected_tx = ltx.clone();
    tokio::spawn(async move {
        if let Err(e) = ifaces::watch(patterns, ltx).await {
            error!(error = %e, "interface watcher stopped");
        }
    });
    let attached_initial = Arc::new(AtomicBool::new(false));
    let plan = AttachPlan { uplinks: args.uplink.iter().cloned().collect(), xdp_mode: args.xdp_mode };
    let (node_addrs, node_addrs_rx) = tokio::sync::watch::channel(Vec::new());
    if args.uplink.is_empty() {
        info!(xdp_mode = ?args.xdp_mode, "north-south XDP on detected uplinks (no --uplink given)");
        let pods = IfacePatterns::new(&args.pod_iface_pattern).context("--pod-iface-pattern")?;
        tokio::spawn(detect_uplinks(pods, node_addrs_rx, detected_tx));
    } else {
        info!(uplinks = ?args.uplink, xdp_mode = ?args.xdp_mode, "north-south XDP on uplinks");
    }
    let misses = NodeMaps::open_pinned(&args.bpffs_root).context("node maps")?;
    tokio::spawn(neighbour_resolver(misses));
    let attacher = Attacher {
        programs,
        root: args.bpffs_root.clone(),
        plan,
        metrics: metrics.clone(),
        attached_initial: attached_initial.clone(),
        guard,
        ours,
        health: health.clone(),
        check_interval: Duration::from_millis(args.datapath_check_interval_ms.max(10)),
        sock: sock_lb.as_ref().map(|s| (s.cgroup.clone(), args.socket_lb)),
    };
    tokio::spawn(attacher.run(lrx));

    let (stx, mut srx) = unbounded_channel();
    let source = match &args.source.manifests {
        Some(dir) => {
            info!(dir = %dir.display(), "reading objects from manifests");
            Source::Files(files::start(dir.clone(), node_name.clone(), stx).context("--manifests")?)
        }
        None => {
            let client = kube_client(args.source.kubeconfig.as_deref()).await?;
            Source::Kube(Arc::new(crate::source::kube::start(client, &node_name, stx)))
        }
    };

    let mut lp = SyncLoop {
        syncer,
        node_maps,
        health: HealthServers::new(ready.clone()),
        source,
        node_name,
        nodeport_addresses: args.nodeport_addresses.clone(),
        hairpin_address: args.hairpin_address,
        hairpin_address6: args.hairpin_address6,
        snat_port_range: args.snat_port_range,
        last_node_config: None,
        last_node_config6: None,
        metrics,
        capacities,
        last_warnings: BTreeSet::new(),
        last_errors: BTreeSet::new(),
        node_addrs,
        sock: sock_lb,
        last_desired: None,
        last_drift: BTreeSet::new(),
        bpffs_root: args.bpffs_root.clone(),
    };
    created_root.keep();
    // Periodic verify (the select branch below is disabled when the interval is 0).
    let verify_every = Duration::from_secs(args.verify_interval_secs.max(1));
    let mut verify_tick = tokio::time::interval_at(tokio::time::Instant::now() + verify_every, verify_every);
    let delay = Duration::from_millis(args.sync_delay_ms);
    let mut synced: HashSet<Resource> = HashSet::new();
    let mut burst: Option<Instant> = None;
    let mut readiness_spawned = false;
    loop {
        tokio::select! {
            ev = srx.recv() => match ev {
                Some(SourceEvent::Synced(r)) => { synced.insert(r); burst.get_or_insert_with(Instant::now); }
                Some(SourceEvent::Changed) => { burst.get_or_insert_with(Instant::now); }
                None => break,
            },
            _ = &mut shutdown => break,
            // 0 turns the periodic verify off: the branch is never polled.
            _ = verify_tick.tick(), if args.verify_interval_secs > 0 => {
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
        tokio::time::sleep(delay).await;
        while let Ok(ev) = srx.try_recv() {
            if let SourceEvent::Synced(r) = ev {
                synced.insert(r);
            }
        }
        lp.sync(burst.take());
        health.synced_now();
        if !readiness_spawned {
            readiness_spawned = true;
            // Ready = maps synced and every pod interface present at start-up attached.
            let attached = attached_initial.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                while !attached.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if !ready.swap(true, Ordering::Relaxed) {
                    info!("first full sync done and pod interfaces attached; ready");
                }
            });
        }
    }
    // Maps, programs and links stay pinned: traffic keeps flowing while we are away.
    Ok(())
}
