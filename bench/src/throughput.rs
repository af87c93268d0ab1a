//! One long TCP stream from the client pod to a sink pod: through the ClusterIP (our
//! datapath on the pod veths; and at the socket level, the bench process in a child cgroup
//! with the hooks) and straight to the pod IP. The sink answers with the byte
//! count once the sender shuts down its side, so the time covers delivery of every byte.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use proxy_tests::{harness::TestCgroup, netns::Netns};

use crate::{
    Plan, check_interrupted,
    conn::{SINK_PORT, install_ours, install_ours_sock, topology},
    median,
    report::Row,
    rules,
};

/// Send for `time` or `bytes`, whichever first; returns (bytes, seconds).
fn stream(client: &Netns, addr: SocketAddr, time: Duration, bytes: u64) -> Result<(u64, f64)> {
    client.run(|| -> Result<(u64, f64)> {
        let buf = vec![0x5au8; 1 << 20];
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < bytes && t.elapsed() < time {
            let k = (bytes - sent).min(buf.len() as u64) as usize;
            s.write_all(&buf[..k])?;
            sent += k as u64;
        }
        s.shutdown(Shutdown::Write)?;
        let mut got = [0u8; 8];
        s.read_exact(&mut got).context("sink's byte count")?;
        let secs = t.elapsed().as_secs_f64();
        let received = u64::from_le_bytes(got);
        ensure!(received == sent, "sink received {received} of {sent} bytes");
        Ok((sent, secs))
    })
}

pub fn run(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    let topo = topology(plan, 2, 230)?;
    let client = &topo.pods[0].ns;
    let sink: SocketAddr = (topo.pods[1].ip, SINK_PORT).into();
    let svc = rules::Svc {
        name: "sink".into(),
        vip: rules::vip(0),
        port: SINK_PORT,
        endpoints: vec![(topo.pods[1].ip, SINK_PORT)],
    };
    let vip: SocketAddr = (svc.vip, svc.port).into();
    // Alternating rounds, each with its share of the bounds: less sensitive to whatever
    // else the machine does at one moment. The median round is reported.
    let rounds = plan.tput_rounds.max(1);
    let (time, bytes) = (plan.tput_time / rounds as u32, plan.tput_bytes / rounds as u64);
    let mut direct = Vec::new();
    let mut ours = Vec::new();
    let mut ours_sock = Vec::new();
    let mut totals = [(0u64, 0f64); 3];
    let gbps = |b: u64, s: f64| b as f64 * 8.0 / s / 1e9;
    for _ in 0..rounds {
        check_interrupted()?;
        let (b, s) = stream(client, sink, time, bytes)?;
        direct.push(gbps(b, s));
        totals[0] = (totals[0].0 + b, totals[0].1 + s);
        let dp = install_ours(&topo, std::slice::from_ref(&svc))?;
        let r = stream(client, vip, time, bytes);
        drop(dp);
        let (b, s) = r?;
        ours.push(gbps(b, s));
        totals[1] = (totals[1].0 + b, totals[1].1 + s);
        let cg = TestCgroup::new()?;
        let dp = install_ours_sock(&topo, std::slice::from_ref(&svc), &cg)?;
        let r = cg.join_self().and_then(|_joined| stream(client, vip, time, bytes));
        drop(dp);
        drop(cg);
        let (b, s) = r?;
        ours_sock.push(gbps(b, s));
        totals[2] = (totals[2].0 + b, totals[2].1 + s);
    }
    let note = |v: &[f64], (b, s): (u64, f64)| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        format!(
            "median of {rounds} rounds (min {min:.2}, max {max:.2}); {:.2} GiB in {s:.2} s in all",
            b as f64 / (1u64 << 30) as f64
        )
    };
    let (d, o) = (median(direct.clone()), median(ours.clone()));
    rows.push(Row::new("throughput", "direct_gbps", None, d, "Gbit/s").note(note(&direct, totals[0])));
    rows.push(Row::new("throughput", "ours_gbps", None, o, "Gbit/s").note(note(&ours, totals[1])));
    // Ratios paired by round: each round streams direct, then ours, back to back.
    let paired = |v: &[f64]| -> Vec<f64> { v.iter().zip(&direct).map(|(a, b)| a / b).collect() };
    let ratio = |case: &str, v: &[f64]| -> Result<Row> {
        let r = Row::median_of("throughput", case, None, &paired(v), "x").context("no rounds")?;
        Ok(r.note(format!("median of {rounds} per-round ratios")))
    };
    rows.push(ratio("ours_vs_direct", &ours)?);
    let os = median(ours_sock.clone());
    rows.push(Row::new("throughput", "ours_sock_gbps", None, os, "Gbit/s").note(note(&ours_sock, totals[2])));
    rows.push(ratio("ours_sock_vs_direct", &ours_sock)?);
    Ok(())
}
