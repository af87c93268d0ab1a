//! Operating the agent: `ebpf-proxy cleanup`, an agent on a new `--bpffs-root` replacing
//! the old one's attachments, pins deleted under a running agent, one agent per root,
//! signals, and the metrics address. Everything runs in the test's own namespaces, with
//! per-test bpffs roots; `cleanup` runs inside the node namespace (nsenter) on those roots
//! only.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, TempDir, converge, ebpf_proxy_bin, http_get, in_netns, names, service_yaml, slice_yaml},
    client,
    harness::{PinDir, require_root},
    netns::{Netns, Topology, wait_for},
};
use proxy_userspace::dataplane::attach::ownership::{self, Attachment, Hook};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// An interface of the node that only serves as an `--uplink` (XDP + TC egress), so that
/// cleanup has XDP to remove too.
const UPLINK: &str = "up0";

struct Env {
    topo: Topology,
    dir: TempDir,
    pins: PinDir,
}

/// A node with a client pod (pod0) and three servers, a Service with `pods` as endpoints,
/// and an extra veth pair whose node end is the uplink.
fn setup(subnet: u8, pods: &[usize]) -> Env {
    let mut topo = Topology::single_node(4, subnet).expect("topology");
    for i in 1..4 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    topo.node.ip(&["link", "add", UPLINK, "type", "veth", "peer", "name", "up0peer"]).expect("uplink veth");
    topo.node.ip(&["link", "set", UPLINK, "up"]).expect("uplink up");
    topo.node.ip(&["link", "set", "up0peer", "up"]).expect("uplink peer up");
    let env = Env { topo, dir: TempDir::new("ebpf-proxy-ops-").expect("dir"), pins: PinDir::new() };
    env.write(&env.dir, pods);
    env
}

impl Env {
    fn write(&self, dir: &TempDir, pods: &[usize]) {
        let eps: Vec<(&str, Ipv4Addr)> =
            pods.iter().map(|i| (self.topo.pods[*i].name.as_str(), self.topo.pods[*i].ip)).collect();
        dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
        dir.write("web-slice.yaml", &slice_yaml("web", "web-abc", &eps, 8080, "TCP")).unwrap();
    }

    fn start_on(&self, root: &Path, dir: &TempDir, port: u16, extra: &[&str]) -> Agent {
        self.start_via(&[], root, dir, port, extra)
    }

    fn start_via(&self, wrapper: &[&str], root: &Path, dir: &TempDir, port: u16, extra: &[&str]) -> Agent {
        let d = dir.0.to_str().unwrap().to_string();
        let mut args = vec!["--manifests", &d, "--node-name", "node-a", "--uplink", UPLINK];
        args.extend_from_slice(extra);
        let a = Agent::start_via(&self.topo.node, wrapper, root, port, &args).expect("agent");
        a.wait_ready(&self.topo.node, Duration::from_secs(20)).expect("agent ready");
        a
    }

    fn vip(&self) -> SocketAddr {
        (VIP, 80).into()
    }

    fn converge(&self, want: &[&str]) -> Duration {
        converge(&self.topo.pods[0].ns, self.vip(), want)
    }

    /// Our programs attached in the node namespace, as the kernel reports them.
    fn attached(&self) -> Vec<Attachment> {
        in_ns_scan(&self.topo.node)
    }

    /// `ebpf-proxy cleanup <args>` inside the node namespace: (success, stdout + stderr).
    fn cleanup(&self, args: &[&str]) -> (bool, String) {
        let out = in_netns(&self.topo.node, &ebpf_proxy_bin().unwrap())
            .arg("cleanup")
            .args(args)
            .output()
            .expect("running cleanup");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }
}

fn in_ns_scan(ns: &Netns) -> Vec<Attachment> {
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(ownership::scan()).expect("scan attachments")
    })
}

fn status(ns: &Netns, addr: SocketAddr, path: &str) -> Option<u16> {
    ns.run(|| http_get(addr, path).ok().map(|(c, _)| c))
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn cleanup_detaches_everything_and_removes_the_pins() {
    require_root("cleanup_detaches_everything_and_removes_the_pins");
    let env = setup(30, &[1, 2]);
    let root = env.pins.0.to_str().unwrap().to_string();
    let mut agent = env.start_on(&env.pins.0, &env.dir, 10300, &[]);
    env.converge(&["pod1", "pod2"]);
    let before = env.attached();
    // Four pod veths (tcx ingress + egress) and the uplink (XDP, tcx egress, and tcx ingress
    // for the overlay hand-off).
    assert_eq!(before.len(), 4 * 2 + 3, "{before:#?}");
    assert!(before.iter().any(|a| a.hook == Hook::Xdp && a.iface == UPLINK), "{before:#?}");

    // Refused while the agent holds the root, naming it and the agent.
    let (ok, out) = env.cleanup(&["--bpffs-root", &root]);
    assert!(!ok, "cleanup ran under a live agent: {out}");
    assert!(out.contains(&root) && out.contains(&format!("pid {}", agent.pid())), "{out}");
    assert_eq!(env.attached().len(), before.len(), "a refused cleanup changed nothing");

    agent.kill();
    // The datapath outlives the agent (by design)...
    assert_eq!(names(&env.topo.pods[0].ns, env.vip(), 10).len(), 2, "still served after the agent exits");
    // ...until cleanup.
    let (ok, out) = env.cleanup(&["--bpffs-root", &root]);
    assert!(ok, "{out}");
    eprintln!("cleanup said:\n{out}");
    assert!(out.contains("detached pinned link") && out.contains("removed") && out.contains(&root), "{out}");
    assert_eq!(env.attached(), vec![], "programs of ours still attached after cleanup");
    assert!(!env.pins.0.exists(), "pins left under {root}");
    let vip = env.vip();
    let answered = env.topo.pods[0].ns.run(|| (0..5).filter(|_| client::tcp_name(vip).is_ok()).count());
    assert_eq!(answered, 0, "the VIP still answers after cleanup");

    // Idempotent.
    let (ok, out) = env.cleanup(&["--bpffs-root", &root]);
    assert!(ok && out.contains("nothing to clean up"), "{out}");
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn cleanup_removes_attachments_whose_pins_are_gone() {
    require_root("cleanup_removes_attachments_whose_pins_are_gone");
    let env = setup(31, &[1]);
    let mut agent = env.start_on(&env.pins.0, &env.dir, 10310, &[]);
    env.converge(&["pod1"]);
    agent.kill();
    // Another root than the one the agent used: only the kernel knows what is attached.
    let other = PinDir::new();
    let (ok, out) = env.cleanup(&["--bpffs-root", other.0.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("detached veth1 tcx ingress (from_pod") && out.contains("up0 xdp (from_uplink"), "{out}");
    assert_eq!(env.attached(), vec![]);
    assert!(env.pins.0.exists(), "cleanup touched a root it was not given");
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn agent_on_a_new_root_replaces_the_stale_attachments() {
    require_root("agent_on_a_new_root_replaces_the_stale_attachments");
    let env = setup(32, &[1]);
    let mut old = env.start_on(&env.pins.0, &env.dir, 10320, &[]);
    env.converge(&["pod1"]);
    old.kill();

    // A new agent on another root, whose objects say pod2: traffic must follow it, not the
    // old agent's maps.
    let new_root = PinDir::new();
    let new_dir = TempDir::new("ebpf-proxy-ops-new-").unwrap();
    env.write(&new_dir, &[2]);
    let t = Instant::now();
    let new = env.start_on(&new_root.0, &new_dir, 10321, &[]);
    let took = env.converge(&["pod2"]);
    eprintln!("new agent ready in {:?}, traffic on its maps {took:?} later", t.elapsed() - took);
    let attached = env.attached();
    assert_eq!(attached.len(), 4 * 2 + 3, "exactly one set of programs: {attached:#?}");
    let ids: std::collections::BTreeSet<u32> = attached.iter().map(|a| a.prog_id).collect();
    assert_eq!(ids.len(), 5, "all attachments run the new agent's five programs: {attached:#?}");
    // It keeps following changes.
    env.write(&new_dir, &[3]);
    env.converge(&["pod3"]);
    drop(new);
}

/// A restart on the same root is not a stale agent: every link, XDP included, is updated in
/// place (same link ids, new programs), never detached and re-created.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn restart_on_the_same_root_updates_links_in_place() {
    require_root("restart_on_the_same_root_updates_links_in_place");
    let env = setup(37, &[1, 2]);
    let mut agent = env.start_on(&env.pins.0, &env.dir, 10370, &[]);
    env.converge(&["pod1", "pod2"]);
    let links = |att: &[Attachment]| -> std::collections::BTreeMap<(String, Hook), Option<u32>> {
        att.iter().map(|a| ((a.iface.clone(), a.hook), a.link_id)).collect()
    };
    let before = env.attached();
    agent.kill();
    let agent = env.start_on(&env.pins.0, &env.dir, 10370, &[]);
    let after = env.attached();
    assert_eq!(links(&after), links(&before), "links re-created instead of updated");
    let old: std::collections::BTreeSet<u32> = before.iter().map(|a| a.prog_id).collect();
    assert!(after.iter().all(|a| !old.contains(&a.prog_id)), "old programs still attached: {after:#?}");
    env.converge(&["pod1", "pod2"]);
    drop(agent);
}

/// As the DaemonSet runs it, without CAP_SYS_ADMIN: the kernel then refuses to show other
/// agents' programs, so the stale ones stay attached, but behind ours (tcx order), and
/// traffic still follows the new agent. `cleanup` removes them.
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn agent_without_sys_admin_on_a_new_root_still_wins() {
    require_root("agent_without_sys_admin_on_a_new_root_still_wins");
    let env = setup(36, &[1]);
    let mut old = env.start_on(&env.pins.0, &env.dir, 10360, &[]);
    env.converge(&["pod1"]);
    old.kill();
    let stale = env.attached().len();
    let new_root = PinDir::new();
    let new_dir = TempDir::new("ebpf-proxy-ops-nocap-").unwrap();
    env.write(&new_dir, &[2]);
    // Root without CAP_SYS_ADMIN in any set (dropped from the bounding set before exec).
    let wrapper = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--"];
    let new = env.start_via(&wrapper, &new_root.0, &new_dir, 10361, &[]);
    env.converge(&["pod2"]);
    env.write(&new_dir, &[3]);
    env.converge(&["pod3"]);
    let attached = env.attached();
    assert!(attached.len() > stale, "the new agent attached next to the stale programs: {attached:#?}");
    drop(new);
    let (ok, out) =
        env.cleanup(&["--bpffs-root", new_root.0.to_str().unwrap(), "--bpffs-root", env.pins.0.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert_eq!(env.attached(), vec![]);
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn deleted_pins_and_detached_links_are_restored() {
    require_root("deleted_pins_and_detached_links_are_restored");
    let env = setup(33, &[1, 2]);
    let agent = env.start_on(&env.pins.0, &env.dir, 10330, &[]);
    env.converge(&["pod1", "pod2"]);
    let node = &env.topo.node;
    let root = env.pins.0.clone();
    let links = root.join("links");
    let count = || std::fs::read_dir(&links).map(|d| d.count()).unwrap_or(0);
    let pins_before = count();

    for damage in ["pins removed", "links detached"] {
        let t = Instant::now();
        match damage {
            "pins removed" => std::fs::remove_dir_all(&root).unwrap(),
            _ => {
                let att = env.attached();
                node.run(|| {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    for a in &att {
                        rt.block_on(ownership::detach(a)).unwrap();
                    }
                });
            }
        }
        // The outage shows on both endpoints...
        let (mut saw_ready_503, mut saw_health_503) = (false, false);
        wait_for(Duration::from_secs(5), "readyz and healthz to report the outage", || {
            saw_ready_503 |= status(node, agent.http, "/readyz") == Some(503);
            saw_health_503 |= status(node, agent.http, "/healthz") == Some(503);
            (saw_ready_503 && saw_health_503).then_some(())
        })
        .unwrap_or_else(|e| panic!("{damage}: {e}"));
        // ...then traffic and readiness recover.
        let vip = env.vip();
        let client = &env.topo.pods[0].ns;
        wait_for(Duration::from_secs(5), "traffic back", || {
            client.run(|| (0..5).all(|_| client::tcp_name(vip).is_ok())).then_some(())
        })
        .unwrap_or_else(|e| panic!("{damage}: {e}"));
        let traffic = t.elapsed();
        wait_for(Duration::from_secs(5), "/readyz and /healthz back", || {
            (status(node, agent.http, "/readyz") == Some(200) && status(node, agent.http, "/healthz") == Some(200))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{damage}: {e}"));
        let recovered = t.elapsed();
        eprintln!("{damage}: traffic back {traffic:?} and /readyz {recovered:?} after the damage");
        assert!(recovered < Duration::from_secs(5), "{damage}: {recovered:?}");
        env.converge(&["pod1", "pod2"]);
        assert_eq!(count(), pins_before, "{damage}: link pins restored");
        assert!(root.join("maps/SERVICES").exists(), "{damage}: map pins restored");
        assert_eq!(env.attached().len(), 4 * 2 + 3, "{damage}");
        // The CLI reads the same maps again.
        let out = proxy_tests::agent::cli(&["services", "--bpffs-root", root.to_str().unwrap()]).unwrap();
        assert!(out.contains("10.96.0.10:80/TCP"), "{out}");
    }
    assert!(agent.metric(node, "ebpf_proxy_datapath_repairs_total").unwrap() >= 2.0);
    // Still following changes with the restored pins.
    env.write(&env.dir, &[3]);
    env.converge(&["pod3"]);
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn second_agent_on_the_same_root_exits_and_the_first_keeps_serving() {
    require_root("second_agent_on_the_same_root_exits_and_the_first_keeps_serving");
    let env = setup(34, &[1, 2]);
    let first = env.start_on(&env.pins.0, &env.dir, 10340, &[]);
    env.converge(&["pod1", "pod2"]);

    let other_dir = TempDir::new("ebpf-proxy-ops-second-").unwrap();
    env.write(&other_dir, &[3]);
    let d = other_dir.0.to_str().unwrap().to_string();
    let mut cmd =
        Agent::command(&env.topo.node, &env.pins.0, 10341, &["--manifests", &d, "--node-name", "node-a"]).unwrap();
    let t = Instant::now();
    // Killed on drop if it does not exit by itself.
    let mut second = Agent {
        child: cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap(),
        http: ([127, 0, 0, 1], 10341).into(),
        metrics: ([127, 0, 0, 1], 11341).into(),
    };
    let exited = wait_for(Duration::from_secs(10), "the second agent to exit", || second.child.try_wait().unwrap());
    let mut stderr = String::new();
    if let Some(mut e) = second.child.stderr.take() {
        if exited.is_err() {
            second.kill();
        }
        std::io::Read::read_to_string(&mut e, &mut stderr).unwrap();
    }
    eprintln!("second agent exited in {:?}: {stderr}", t.elapsed());
    let code = exited.unwrap_or_else(|e| panic!("{e}: a second agent kept running on a locked root: {stderr}"));
    assert!(!code.success(), "the second agent must fail");
    assert!(
        stderr.contains(env.pins.0.to_str().unwrap()) && stderr.contains(&format!("pid {}", first.pid())),
        "message names the root and the holder: {stderr}"
    );
    // The first agent is untouched.
    assert_eq!(status(&env.topo.node, first.http, "/readyz"), Some(200));
    env.converge(&["pod1", "pod2"]);
    env.write(&env.dir, &[2]);
    env.converge(&["pod2"]);
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn signals_and_the_metrics_address() {
    require_root("signals_and_the_metrics_address");
    let env = setup(35, &[1]);
    let mut agent = env.start_on(&env.pins.0, &env.dir, 10350, &[]);
    let node = &env.topo.node;
    // /metrics only on the metrics address; health only on the health address.
    let (code, body) = node.run(|| http_get(agent.metrics, "/metrics")).unwrap();
    assert!(code == 200 && body.contains("ebpf_proxy_services_programmed"), "{code} {body}");
    assert_eq!(status(node, agent.http, "/metrics"), Some(404));
    assert_eq!(status(node, agent.metrics, "/healthz"), Some(404));
    assert_eq!(status(node, agent.http, "/healthz"), Some(200));

    let pid = agent.pid() as i32;
    for sig in [libc::SIGHUP, libc::SIGUSR1, libc::SIGHUP] {
        // SAFETY: signalling a child we started and still own.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        std::thread::sleep(Duration::from_millis(300));
        assert!(agent.child.try_wait().unwrap().is_none(), "signal {sig} killed the agent");
    }
    assert_eq!(status(node, agent.http, "/readyz"), Some(200));
    env.converge(&["pod1"]);

    // A FIFO in the manifests directory blocks the file source's reload (until the source
    // learns to skip it): health must still answer and SIGTERM still end the agent.
    let fifo = env.dir.0.join("blocked.yaml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    // Some thread of the agent is now stuck opening the FIFO (no writer ever comes).
    let blocked = wait_for(Duration::from_secs(5), "a thread of the agent blocked on the FIFO", || {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("wchan")).ok())
            .find(|w| w.contains("fifo") || w.contains("partner") || w.contains("pipe"))
    });
    // Informational: once the file source skips FIFOs, nothing blocks here, and the rest
    // of the test still holds.
    eprintln!("blocked reload: {blocked:?}");
    assert_eq!(status(node, agent.http, "/healthz"), Some(200), "health answers while a reload is blocked");
    let t = Instant::now();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_for(Duration::from_secs(5), "the agent to exit on SIGTERM", || agent.child.try_wait().unwrap()).unwrap();
    let took = t.elapsed();
    eprintln!("SIGTERM with a blocked reload: exited in {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    // Unblock any reader left (the process is gone; this only tidies the FIFO).
    let _ = std::fs::remove_file(&fifo);
    // The datapath stays after a SIGTERM.
    assert_eq!(names(&env.topo.pods[0].ns, env.vip(), 5).len(), 1);
}

/// A start that fails early (the kubeconfig cannot be read while the programs are being
/// verified on their own threads) exits with an error naming the file and leaves no pin
/// directory behind (the agent waits for the load before it removes the directory this
/// start created).
#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn a_start_that_fails_during_the_load_leaves_no_pins() {
    require_root("a_start_that_fails_during_the_load_leaves_no_pins");
    let node = Netns::new("epn-node-").expect("namespace");
    let pins = PinDir::new();
    let kubeconfig = "/nonexistent/ebpf-proxy-test/kubeconfig";
    let out = Agent::command(&node, &pins.0, 10350, &["--kubeconfig", kubeconfig, "--node-name", "node-a"])
        .unwrap()
        .stdout(Stdio::null())
        .output()
        .expect("agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent must fail: {stderr}");
    assert!(stderr.contains(kubeconfig), "names the kubeconfig: {stderr}");
    assert!(!pins.0.exists(), "pins left behind: {:?}", std::fs::read_dir(&pins.0).map(|d| d.count()));
}
