//! `ebpf-proxy cleanup` on a node whose programs hang in clsact filters, as on every kernel
//! without tcx (< 6.6: Debian 12, Amazon Linux 2023, Ubuntu 22.04). The agent is forced
//! into that path with `--tc-attach clsact`. Other tools' filters on the same devices (a
//! classic-BPF `bpf` filter, a `u32` filter) must survive, and their clsact qdisc with them;
//! a device left with nothing gets its qdisc removed. Everything happens in the test's own
//! namespaces and bpffs directory.
use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use proxy_tests::{
    agent::{Agent, TempDir, converge, ebpf_proxy_bin, in_netns, names, service_yaml, slice_yaml},
    client,
    harness::{PinDir, require_root},
    netns::{Netns, Topology},
};
use proxy_userspace::dataplane::{
    attach::clsact::{self, Filter},
    attach::ownership::{self, Attachment, Hook},
};

const SERVER: &str = env!("CARGO_BIN_EXE_proxy-podserver");
const UPLINK: &str = "up0";
const HTTP_PORT: u16 = 10900;
/// Another tool's filters: a classic-BPF program that never matches (`ret 0`) and a u32
/// filter on a protocol nobody sends, so they change no packet of the test.
const FOREIGN_BPF: [&str; 6] = ["pref", "7", "handle", "7", "bpf", "bytecode"];
const FOREIGN_U32: [&str; 11] =
    ["pref", "5", "handle", "800::1", "u32", "match", "ip", "protocol", "253", "0xff", "classid"];

fn tc(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", ns.name))
        .arg("tc")
        .args(args)
        .output()
        .expect("running tc");
    assert!(out.status.success(), "tc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every filter on `iface`'s clsact qdisc, read over rtnetlink inside the node namespace.
fn filters(ns: &Netns, iface: &str) -> Vec<Filter> {
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let ifindex = ownership::interfaces().await.unwrap().into_iter().find(|i| i.name == iface).unwrap().index;
            clsact::list(ifindex).await.unwrap()
        })
    })
}

fn attached(ns: &Netns) -> Vec<Attachment> {
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(ownership::scan()).expect("scan attachments")
    })
}

fn cleanup(ns: &Netns, root: &str) -> (bool, String) {
    let out = in_netns(ns, &ebpf_proxy_bin().unwrap())
        .args(["cleanup", "--bpffs-root", root])
        .output()
        .expect("running cleanup");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn has_clsact(ns: &Netns, iface: &str) -> bool {
    tc(ns, &["qdisc", "show", "dev", iface]).contains("qdisc clsact")
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn cleanup_removes_our_clsact_filters_and_only_ours() {
    require_root("cleanup_removes_our_clsact_filters_and_only_ours");
    let mut topo = Topology::single_node(4, 90).expect("topology");
    for i in 1..4 {
        topo.start_server(SERVER, i, 8080).expect("server");
    }
    let node = &topo.node;
    node.ip(&["link", "add", UPLINK, "type", "veth", "peer", "name", "up0peer"]).unwrap();
    node.ip(&["link", "set", UPLINK, "up"]).unwrap();
    node.ip(&["link", "set", "up0peer", "up"]).unwrap();
    // Another tool got to veth1 first: its clsact qdisc, a bpf filter on ingress, a u32 one
    // on egress.
    tc(node, &["qdisc", "add", "dev", "veth1", "clsact"]);
    let mut bpf = vec!["filter", "add", "dev", "veth1", "ingress"];
    bpf.extend(FOREIGN_BPF);
    bpf.push("1,6 0 0 0,");
    tc(node, &bpf);
    let mut u32f = vec!["filter", "add", "dev", "veth1", "egress"];
    u32f.extend(FOREIGN_U32);
    u32f.push("1:1");
    tc(node, &u32f);
    let foreign = filters(node, "veth1");
    assert_eq!(foreign.len(), 3, "bpf, u32 hash table, u32 filter: {foreign:#?}");

    let dir = TempDir::new("ebpf-proxy-clsact-").unwrap();
    let pods = [(topo.pods[1].name.as_str(), topo.pods[1].ip), (topo.pods[2].name.as_str(), topo.pods[2].ip)];
    dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP")).unwrap();
    dir.write("web-slice.yaml", &slice_yaml("web", "web-abc", &pods, 8080, "TCP")).unwrap();
    let pins = PinDir::new();
    let root = pins.0.to_str().unwrap().to_string();
    let d = dir.0.to_str().unwrap().to_string();
    let args = ["--manifests", &d, "--node-name", "node-a", "--uplink", UPLINK, "--tc-attach", "clsact"];
    let vip: SocketAddr = (Ipv4Addr::new(10, 96, 0, 10), 80).into();
    let client_ns = &topo.pods[0].ns;

    let start = || {
        let a = Agent::start(node, &pins.0, HTTP_PORT, &args).expect("agent");
        a.wait_ready(node, Duration::from_secs(20)).expect("agent ready");
        a
    };
    let mut agent = start();
    converge(client_ns, vip, &["pod1", "pod2"]);
    let ours = |a: &[Attachment]| {
        let mut v: Vec<(String, Hook)> =
            a.iter().filter(|a| a.hook != Hook::Xdp).map(|a| (a.iface.clone(), a.hook)).collect();
        v.sort();
        v
    };
    let before = attached(node);
    // Four pod veths (clsact ingress + egress), the uplink's egress and ingress (the
    // overlay hand-off, uplink_handoff), and XDP on the uplink.
    assert_eq!(before.len(), 4 * 2 + 3, "{before:#?}");
    assert!(before.iter().filter(|a| a.hook != Hook::Xdp).all(|a| a.filter.is_some() && a.link_id.is_none()));
    assert!(tc(node, &["filter", "show", "dev", "veth1", "ingress"]).contains("from_pod"));

    // A restart adds its filters in front and takes the previous agent's away: still one
    // filter of ours per hook, not two.
    agent.kill();
    agent = start();
    converge(client_ns, vip, &["pod1", "pod2"]);
    let restarted = attached(node);
    assert_eq!(ours(&restarted), ours(&before), "{restarted:#?}");
    assert!(
        restarted.iter().filter(|a| a.hook != Hook::Xdp).all(|a| !before.iter().any(|b| b.prog_id == a.prog_id)),
        "the first agent's programs are still attached: {restarted:#?}"
    );

    agent.kill();
    assert_eq!(names(client_ns, vip, 10).len(), 2, "the datapath outlives the agent");

    let (ok, out) = cleanup(node, &root);
    eprintln!("cleanup said:\n{out}");
    assert!(ok, "{out}");
    assert!(out.contains("veth2 clsact ingress (from_pod") && out.contains("up0 clsact egress (to_uplink"), "{out}");
    assert_eq!(attached(node), vec![], "programs of ours still attached after cleanup");
    // The other tool's filters are exactly as they were, in their qdisc.
    assert_eq!(filters(node, "veth1"), foreign, "the foreign filters changed");
    assert!(has_clsact(node, "veth1"), "veth1's clsact qdisc (still holding the foreign filters) went");
    // Devices that held nothing but ours: no filter and no qdisc left.
    for i in ["veth0", "veth2", "veth3", UPLINK] {
        assert_eq!(filters(node, i), vec![], "{i}");
        assert!(!has_clsact(node, i), "{i} keeps an empty clsact qdisc");
        assert!(out.contains(&format!("removed the clsact qdisc of {i}")), "{out}");
    }
    assert!(!out.contains("clsact qdisc of veth1"), "{out}");
    assert!(tc(node, &["filter", "show", "dev", "veth1", "ingress"]).contains("bytecode"));
    assert!(!pins.0.exists(), "pins left under {root}");
    let answered = client_ns.run(|| (0..5).filter(|_| client::tcp_name(vip).is_ok()).count());
    assert_eq!(answered, 0, "the VIP still answers after cleanup");
    // Pods still reach each other directly: nothing of the node's own networking went.
    let direct: SocketAddr = (topo.pods[1].ip, 8080).into();
    assert_eq!(client_ns.run(|| client::tcp_name(direct)).unwrap(), "pod1");

    // Idempotent.
    let (ok, out) = cleanup(node, &root);
    assert!(ok && out.contains("nothing to clean up"), "{out}");
    assert_eq!(filters(node, "veth1"), foreign);
}
