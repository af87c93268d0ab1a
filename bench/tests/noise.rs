//! Figures measured in rounds: a value is the median of its rounds with their spread
//! (interquartile range), a ratio is the median of per-round ratios, and a goal whose
//! limit lies inside the spread is judged "inside noise" in the targets, the markdown and
//! the JSON. No root, nothing measured.
use std::path::PathBuf;

use proxy_bench::{
    Plan,
    report::{Machine, Report, Row, Spread},
};

fn report(rows: Vec<Row>) -> Report {
    Report {
        mode: "full".into(),
        started_unix: 1_796_601_600,
        duration_s: 1.0,
        machine: Machine::default(),
        rows,
        targets: vec![],
        errors: vec![],
    }
}

#[test]
fn a_value_in_rounds_is_their_median_with_the_interquartile_range() {
    // Nine rounds, given out of order.
    let v = [0.97, 0.91, 0.99, 0.88, 0.93, 1.02, 0.95, 0.90, 0.94];
    let (median, s) = Spread::of(&v).unwrap();
    assert_eq!(median, 0.94);
    assert_eq!(s, Spread { rounds: 9, p25: 0.91, p75: 0.97, min: 0.88, max: 1.02 });
    assert!(s.contains(0.95) && s.contains(0.91) && !s.contains(0.98));
    assert!(Spread::of(&[]).is_none());
    let row = Row::median_of("conn", "ours_vs_direct", Some(1), &v, "x").unwrap();
    assert_eq!((row.value, row.spread), (0.94, Some(s)));
    assert_eq!(row.show(2), "0.94x [0.91..0.97]");
}

/// The connection-rate goals are judged at every size, with the ratio's spread: a median
/// below the goal with the goal inside its interquartile range is a miss inside the noise.
#[test]
fn goals_inside_the_spread_are_judged_inside_noise() {
    let plan = Plan::full(PathBuf::new());
    let n_small = plan.conn_sizes[0];
    let n_big = *plan.conn_sizes.last().unwrap();
    let rows = vec![
        // 0.93x [0.88..0.99] against >= 0.95: missed, inside the noise.
        Row::median_of("conn", "ours_vs_direct", Some(n_small), &[0.88, 0.93, 0.99, 0.90, 0.97], "x").unwrap(),
        // 1.01x [1.00..1.02] against >= 0.95: met, clear of the noise.
        Row::median_of("conn", "ours_vs_direct", Some(n_big), &[1.0, 1.01, 1.02, 1.0, 1.02], "x").unwrap(),
        // A single round has no spread to judge by.
        Row::median_of("conn", "ours_sock_vs_direct", Some(n_big), &[0.97], "x").unwrap(),
    ];
    let mut r = report(rows);
    r.judge(&plan);
    let target = |name: &str| {
        r.targets.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no target {name}: {:#?}", r.targets))
    };
    let small = target(&format!("connection rate at {n_small} services, ours vs direct"));
    assert_eq!((small.goal.as_str(), small.measured.as_str()), (">= 0.95x", "0.93x [0.90..0.97]"));
    assert_eq!((small.met, small.inside_noise), (Some(false), Some(true)));
    let big = target(&format!("connection rate at {n_big} services, ours vs direct"));
    assert_eq!((big.met, big.inside_noise), (Some(true), Some(false)));
    let sock = target(&format!("connection rate at {n_big} services, ours sock vs direct"));
    assert_eq!((sock.met, sock.inside_noise), (Some(false), None));
    let missing = target(&format!("connection rate at {n_small} services, ours sock vs direct"));
    assert_eq!((missing.met, missing.inside_noise, missing.measured.as_str()), (None, None, "not measured"));

    let md = r.markdown(&plan);
    let line = md.lines().find(|l| l.contains(&small.name)).unwrap();
    assert!(line.ends_with("| 0.93x [0.90..0.97] | **no**: inside noise |"), "{line}");
    let line = md.lines().find(|l| l.contains(&big.name)).unwrap();
    assert!(line.ends_with("| yes |"), "{line}");
    // The ratio tables print the spread too.
    assert!(md.contains("| 0.93x [0.90..0.97] |"), "{md}");

    // The JSON (report.json beside the charts) carries the spread and the verdict; a report
    // written before either existed still reads.
    let json = serde_json::to_string(&r).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back.rows[0].spread, r.rows[0].spread);
    assert_eq!(back.targets.iter().filter(|t| t.inside_noise == Some(true)).count(), 1);
    let old = r#"{"mode":"full","started_unix":1,"duration_s":1.0,"machine":{"cpus":2,"kernel":"k","iptables":"","iptables_legacy":"","nft":"","loadavg_start":"","loadavg_end":""},
        "rows":[{"id":"conn/ours_vs_direct/n=1","section":"conn","case":"ours_vs_direct","n":1,"value":0.9,"unit":"x"}],
        "targets":[{"name":"t","goal":"g","measured":"m","met":true}],"errors":[]}"#;
    let old: Report = serde_json::from_str(old).unwrap();
    assert_eq!((old.rows[0].spread, old.targets[0].inside_noise), (None, None));
}

/// The XDP floor rows are judged against issue 23's goals.
#[test]
fn xdp_floor_ratios_are_judged() {
    let plan = Plan::quick(PathBuf::new());
    let rows = vec![
        Row::median_of("per_packet", "xdp_miss_vs_pass_floor", None, &[1.2, 1.25, 1.28], "x").unwrap(),
        Row::median_of("per_packet", "xdp_remote_vs_fib_floor", None, &[1.4, 1.6, 1.9], "x").unwrap(),
    ];
    let mut r = report(rows);
    r.judge(&plan);
    let miss = r.targets.iter().find(|t| t.name.contains("non-service frame / XDP_PASS floor")).unwrap();
    assert_eq!((miss.goal.as_str(), miss.met, miss.inside_noise), ("<= 1.30x", Some(true), Some(false)));
    let fwd = r.targets.iter().find(|t| t.name.contains("remote hit / bare forwarder")).unwrap();
    assert_eq!((fwd.goal.as_str(), fwd.met, fwd.inside_noise), ("<= 1.50x", Some(false), Some(true)));
}
