//! `cargo xtask demo`: one node namespace with three pods, the agent fed by --manifests, a
//! look at what it programmed and a few requests through the ClusterIP. Everything lives
//! in namespaces created here and is removed at the end (also on error).
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use proxy_tests::{
    agent::{Agent, TempDir, cli, service_yaml, slice_yaml},
    client,
    harness::PinDir,
    netns::{Topology, wait_for},
};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    if let Some(bin) = args.next() {
        // SAFETY: single-threaded at this point; read by `ebpf_proxy_bin`.
        unsafe { std::env::set_var("EBPF_PROXY_BIN", bin) };
    }
    let server = std::env::current_exe()?.with_file_name("proxy-podserver");
    let mut topo = Topology::single_node(4, 0).context("creating the sandbox (needs root)")?;
    for i in 1..4 {
        topo.start_server(server.to_str().context("path")?, i, 8080)?;
    }
    let dir = TempDir::new("ebpf-proxy-demo-")?;
    dir.write("web.yaml", &service_yaml("web", "10.96.0.10", 80, 8080, "TCP"))?;
    let eps: Vec<(&str, std::net::Ipv4Addr)> = topo.pods[1..].iter().map(|p| (p.name.as_str(), p.ip)).collect();
    dir.write("web-slice.yaml", &slice_yaml("web", "web-1", &eps, 8080, "TCP"))?;
    let pins = PinDir::new();
    println!("== sandbox: node namespace {} with client pod0 and backends pod1..pod3", topo.node.name);
    println!("== manifests in {}:\n{}", dir.0.display(), std::fs::read_to_string(dir.0.join("web.yaml"))?);
    let agent = Agent::start(
        &topo.node,
        &pins.0,
        10256,
        &["--manifests", dir.0.to_str().context("path")?, "--node-name", "node-a"],
    )?;
    agent.wait_ready(&topo.node, Duration::from_secs(30))?;
    let root = pins.0.to_str().context("path")?;
    println!("\n$ ebpf-proxy services\n{}", cli(&["services", "--bpffs-root", root])?);
    let vip: SocketAddr = ([10, 96, 0, 10], 80).into();
    let client_ns = &topo.pods[0].ns;
    client_ns.run(|| wait_for(Duration::from_secs(5), "the service", || client::tcp_name(vip).ok()))?;
    println!("$ for i in 1..6: connect {vip} from pod0");
    for _ in 0..6 {
        let name = client_ns.run(|| client::tcp_name(vip))?;
        println!("  answered by {name}");
    }
    println!(
        "\n$ ebpf-proxy conntrack | head\n{}",
        cli(&["conntrack", "--bpffs-root", root])?.lines().take(7).collect::<Vec<_>>().join("\n")
    );
    println!("\n$ ebpf-proxy stats\n{}", cli(&["stats", "--bpffs-root", root])?);
    drop(agent);
    println!("== cleaning up the sandbox");
    Ok(())
}
