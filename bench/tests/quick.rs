//! CI smoke test of `cargo xtask bench`: the quick mode runs every section and produces
//! every row with a positive value. Speed is not asserted.
use std::{path::PathBuf, process::Command};

use proxy_bench::{Plan, expected_rows, report::Report};

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn quick_bench_produces_every_row() {
    proxy_tests::harness::require_root("quick_bench_produces_every_row");
    let server = PathBuf::from(env!("CARGO_BIN_EXE_bench-podserver"));
    let out = std::env::temp_dir().join(format!("ebpf-proxy-bench-quick-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_proxy-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(&out)
        .arg("--server")
        .arg(&server)
        .status()
        .expect("running proxy-bench");
    let json = std::fs::read_to_string(out.join("latest-quick.json"));
    // A quick run draws its charts beside its JSON, never into docs/.
    let charts: Vec<bool> =
        proxy_bench::charts::FILES.iter().map(|f| out.join("charts-quick").join(f).is_file()).collect();
    let _ = std::fs::remove_dir_all(&out);
    let report: Report = serde_json::from_str(&json.expect("results written")).expect("results parse");
    assert!(report.errors.is_empty(), "sections failed: {:#?}", report.errors);
    assert!(status.success(), "proxy-bench --quick: {status}");
    let mut missing = Vec::new();
    for id in expected_rows(&Plan::quick(server)) {
        match report.get(&id) {
            Some(v) if v.is_finite() && v > 0.0 => {}
            Some(v) => missing.push(format!("{id} = {v}")),
            None => missing.push(format!("{id} missing")),
        }
    }
    assert!(missing.is_empty(), "rows missing or not positive: {missing:#?}");
    // Rates and ratios measured in rounds carry their spread over every round, and the
    // connection-rate targets a verdict on the noise.
    let plan = Plan::quick(PathBuf::new());
    let mut spreads = Vec::new();
    for n in &plan.conn_sizes {
        let ids = proxy_bench::CONN_CASES
            .iter()
            .map(|c| format!("{c}.rate"))
            .chain(proxy_bench::CONN_RATIOS.iter().map(|r| r.to_string()))
            .map(|c| proxy_bench::report::row_id("conn", &c, Some(*n)));
        for id in ids {
            let rounds = report.rows.iter().find(|r| r.id == id).and_then(|r| r.spread).map(|s| s.rounds);
            if rounds != Some(plan.conn_rounds) {
                spreads.push(format!("{id}: {rounds:?} rounds"));
            }
        }
    }
    for id in proxy_bench::per_packet::xdp_rows() {
        if report.rows.iter().find(|r| r.id == id).and_then(|r| r.spread).map(|s| s.rounds) != Some(plan.pp_runs) {
            spreads.push(format!("{id}: no spread"));
        }
    }
    assert!(spreads.is_empty(), "rows without their rounds' spread: {spreads:#?}");
    let judged = report.targets.iter().filter(|t| t.name.starts_with("connection rate") && t.inside_noise.is_some());
    assert_eq!(
        judged.count(),
        2 * plan.conn_sizes.len() + 3,
        "conn targets judged on their spread: {:#?}",
        report.targets
    );
    assert!(!report.targets.is_empty(), "targets judged");
    assert!(charts.iter().all(|c| *c), "charts written to <out>/charts-quick: {charts:?}");
}
