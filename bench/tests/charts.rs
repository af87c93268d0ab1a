//! The chart writer, given rows: well-formed SVG, one bar per charted row (with its value
//! printed), the labels and units, bar heights that follow the values; `write` keeps a
//! directory to one report; docs/bench is exactly the drawing of docs/bench/report.json.
//! No root, nothing measured.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use proxy_bench::{
    Plan,
    charts::{self, BarChart, FILES, REPORT_FILE},
    expected_rows,
    report::{Machine, Report, Row},
};

/// A row from its id (`section/case/n=N` or `section/case`), as the bench writes them.
fn row(id: &str, value: f64) -> Row {
    let mut parts = id.splitn(3, '/');
    let section = parts.next().unwrap();
    let case = parts.next().unwrap();
    let n = parts.next().map(|n| n.trim_start_matches("n=").parse().unwrap());
    let r = Row::new(section, case, n, value, "unit");
    assert_eq!(r.id, id);
    r
}

fn report(rows: Vec<Row>) -> Report {
    Report {
        mode: "full".into(),
        started_unix: 1_796_601_600, // 2026-12-07
        duration_s: 1.0,
        machine: Machine {
            cpus: 2,
            kernel: "6.18.44".into(),
            loadavg_start: "0.42 0.3 0.2".into(),
            ..Machine::default()
        },
        rows,
        targets: vec![],
        errors: vec![],
    }
}

/// Every row a full run produces, each with a value of its own (so each bar's printed value
/// names its row).
fn full_report() -> Report {
    let ids = expected_rows(&Plan::full(PathBuf::new()));
    report(ids.iter().enumerate().map(|(i, id)| row(id, 100.0 + i as f64 * 3.0)).collect())
}

/// Which rows each chart draws: written out here, independently of the writer.
fn charted(file: &str, r: &Row) -> bool {
    let c = r.case.as_str();
    match file {
        "conn_rate.svg" => r.section == "conn" && c.ends_with(".rate"),
        "per_packet.svg" => {
            r.section == "per_packet" && ["hit", "hit_v6", "reply", "reply_v6", "miss", "miss_v6"].contains(&c)
        }
        "control_change.svg" => {
            (r.section == "control" && c.starts_with("change.") && (c.ends_with(".p50_ms") || c.ends_with(".p99_ms")))
                || (r.section == "scale" && (c == "change.p50_ms" || c == "change.p99_ms"))
        }
        "control_cold.svg" => {
            r.section == "control"
                && [
                    "cold.total_ms",
                    "cold.iptables_restore_ms",
                    "cold.iptables_legacy_restore_ms",
                    "cold.nft_ms",
                    "cold.nft_chunked_ms",
                ]
                .contains(&c)
        }
        "memory.svg" => {
            (r.section == "scale" && (c == "vmhwm_mib" || c == "vmrss_mib"))
                || (r.section == "rss" && c == "agent_vmhwm_mib")
        }
        "northsouth.svg" => r.section == "northsouth" && c.ends_with(".pps"),
        _ => panic!("no such chart {file}"),
    }
}

fn hex(c: plotters::style::RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

/// The `<rect>`s filled with `colour`, as (y, height).
fn rects(doc: &roxmltree::Document, colour: &str) -> Vec<(f64, f64)> {
    doc.descendants()
        .filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some(colour))
        .map(|n| {
            let num = |a| n.attribute(a).unwrap().parse::<f64>().unwrap();
            (num("y"), num("height"))
        })
        .collect()
}

fn texts(doc: &roxmltree::Document) -> Vec<String> {
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(|t| t.trim().to_string())
        .collect()
}

fn parse(svg: &str) -> roxmltree::Document<'_> {
    roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not well-formed XML: {e}\n{svg}"))
}

/// Drawn as GitHub shows it: a viewBox, a white background first, text as `<text>` with
/// explicit colours, nothing external.
fn assert_renderable(doc: &roxmltree::Document, file: &str) {
    let svg = doc.root_element();
    assert!(svg.has_tag_name("svg"), "{file}");
    assert_eq!(svg.attribute("viewBox"), Some("0 0 960 560"), "{file}");
    let first = svg.children().find(|n| n.is_element()).unwrap();
    assert!(first.has_tag_name("rect") && first.attribute("fill") == Some("#FFFFFF"), "{file}: white background first");
    assert_eq!(first.attribute("width"), Some("960"), "{file}");
    for n in doc.descendants().filter(|n| n.is_element()) {
        assert!(!["script", "image", "foreignObject"].contains(&n.tag_name().name()), "{file}: {:?}", n.tag_name());
        if n.has_tag_name("text") {
            assert!(n.attribute("fill").is_some(), "{file}: text without a colour: {:?}", n.text());
            assert_eq!(n.attribute("font-family"), Some("sans-serif"), "{file}");
        }
    }
}

#[test]
fn every_chart_has_one_bar_per_row_with_its_value_labels_and_units() {
    let report = full_report();
    let drawn = charts::charts(&report);
    assert_eq!(drawn.iter().map(|c| c.file).collect::<Vec<_>>(), FILES, "every chart, in order");
    let subtitle = charts::subtitle(&report);
    assert_eq!(subtitle, "proxy-bench, full run of 2026-12-07, 2 CPUs, Linux 6.18.44, load average 0.42 at the start");
    for chart in &drawn {
        let rows: Vec<&Row> = report.rows.iter().filter(|r| charted(chart.file, r)).collect();
        assert!(!rows.is_empty(), "{}", chart.file);
        assert_eq!(chart.bars(), rows.len(), "{}: one bar per row", chart.file);
        let svg = charts::render(chart, &subtitle).unwrap();
        let doc = parse(&svg);
        assert_renderable(&doc, chart.file);
        let texts = texts(&doc);
        // One filled rectangle per measured value and series, plus the legend's swatch.
        for s in &chart.series {
            let measured = s.values.iter().flatten().count();
            assert_eq!(rects(&doc, &hex(s.colour)).len(), measured + 1, "{}: {}", chart.file, s.label);
            assert!(texts.contains(&s.label), "{}: legend {}", chart.file, s.label);
        }
        for r in &rows {
            let label = charts::fmt_value(r.value);
            assert!(texts.contains(&label), "{}: row {} printed as {label}", chart.file, r.id);
        }
        for label in [&chart.title, &chart.y_desc, &subtitle] {
            assert!(texts.contains(label), "{}: {label:?} missing", chart.file);
        }
        for category in &chart.categories {
            let words: Vec<&str> = category.split_whitespace().collect();
            let shown: Vec<String> = texts.iter().flat_map(|t| t.split_whitespace().map(str::to_string)).collect();
            assert!(words.iter().all(|w| shown.iter().any(|s| s == w)), "{}: category {category}", chart.file);
        }
    }
    // Units are on the axes.
    let by_file: BTreeMap<&str, &BarChart> = drawn.iter().map(|c| (c.file, c)).collect();
    assert!(by_file["conn_rate.svg"].y_desc.contains("connections/s"));
    assert!(by_file["per_packet.svg"].y_desc.contains("ns per packet"));
    assert!(by_file["control_change.svg"].y_desc.contains("milliseconds, log scale"));
    assert!(by_file["control_cold.svg"].y_desc.contains("milliseconds, log scale"));
    assert!(by_file["memory.svg"].y_desc.contains("MiB"));
    assert!(by_file["northsouth.svg"].y_desc.contains("packets/s"));
    assert_eq!(by_file["conn_rate.svg"].categories, ["1 Service", "1,000 Services", "10,000 Services"]);
}

#[test]
fn bar_heights_follow_the_values() {
    // Linear: from a shared baseline, twice the value is twice the height.
    let rows = vec![
        row("conn/ours.rate/n=1", 4000.0),
        row("conn/ours.rate/n=1000", 8000.0),
        row("conn/iptables.rate/n=1", 2000.0),
        // Not measured at 1,000: no bar, and the others keep their slots.
    ];
    let report = report(rows);
    let chart = charts::charts(&report).into_iter().next().unwrap();
    assert_eq!(chart.file, "conn_rate.svg");
    assert_eq!(chart.bars(), 3);
    let svg = charts::render(&chart, "").unwrap();
    let doc = parse(&svg);
    let colour = |case: &str| hex(chart.series.iter().find(|s| s.label.contains(case)).unwrap().colour);
    let mut ours = rects(&doc, &colour("ours, TC"));
    ours.sort_by(|a, b| a.1.total_cmp(&b.1));
    let ipt = rects(&doc, &colour("iptables (nft"));
    // The legend swatch is the 14-pixel one.
    let (ours_4k, ours_8k) = (ours[1], ours[2]);
    let ipt_2k = ipt.iter().copied().find(|r| r.1 != 14.0).unwrap();
    let ratio = ours_8k.1 / ours_4k.1;
    assert!((ratio - 2.0).abs() < 0.02, "8000 vs 4000: heights {ours_8k:?} {ours_4k:?}");
    assert!((ours_4k.1 / ipt_2k.1 - 2.0).abs() < 0.03, "4000 vs 2000: {ours_4k:?} {ipt_2k:?}");
    // Same baseline.
    assert!(((ours_4k.0 + ours_4k.1) - (ipt_2k.0 + ipt_2k.1)).abs() < 1.0);

    // Log scale: each decade the same height.
    let rows = vec![
        row("control/change.incremental.p50_ms/n=10000", 0.1),
        row("control/change.apply.p50_ms/n=10000", 10.0),
        row("control/change.nft.p50_ms/n=10000", 1000.0),
    ];
    let report = self::report(rows);
    let chart = charts::charts(&report).into_iter().find(|c| c.file == "control_change.svg").unwrap();
    assert!(chart.log);
    let svg = charts::render(&chart, "").unwrap();
    let doc = parse(&svg);
    let mut h: Vec<f64> =
        rects(&doc, &hex(chart.series[0].colour)).iter().map(|r| r.1).filter(|h| *h != 14.0).collect();
    h.sort_by(f64::total_cmp);
    assert_eq!(h.len(), 3);
    let decade = (h[2] - h[1]) / 2.0;
    assert!(decade > 20.0 && ((h[1] - h[0]) / 2.0 - decade).abs() < 1.5, "log heights {h:?}");
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("proxy-bench-charts-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn svgs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".svg"))
        .collect();
    v.sort();
    v
}

#[test]
fn write_keeps_a_directory_to_one_report_and_redraws_it_identically() {
    let dir = scratch("write");
    let full = full_report();
    let written = charts::write(&full, &dir).unwrap();
    assert_eq!(written.len(), FILES.len());
    let mut all: Vec<String> = FILES.iter().map(|f| f.to_string()).collect();
    all.sort();
    assert_eq!(svgs(&dir), all);
    // The copy of the report redraws the same bytes (what --charts-from does).
    let copy = charts::read_report(&dir.join(REPORT_FILE)).unwrap();
    let again = scratch("again");
    charts::write(&copy, &again).unwrap();
    for f in FILES {
        assert_eq!(std::fs::read(dir.join(f)).unwrap(), std::fs::read(again.join(f)).unwrap(), "{f}");
    }
    assert_eq!(std::fs::read(dir.join(REPORT_FILE)).unwrap(), std::fs::read(again.join(REPORT_FILE)).unwrap());

    // A partial run (only `conn`) leaves no chart of the earlier run beside its own.
    let partial = report(full.rows.iter().filter(|r| r.section == "conn").cloned().collect());
    charts::write(&partial, &dir).unwrap();
    assert_eq!(svgs(&dir), ["conn_rate.svg"]);
    // A report that is not one is an error naming the file.
    std::fs::write(dir.join("bad.json"), "{\"rows\": 3}").unwrap();
    let err = charts::read_report(&dir.join("bad.json")).unwrap_err().to_string();
    assert!(err.contains("bad.json") && err.contains("not a proxy-bench report"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&again).unwrap();
}

/// The charts in the docs are the drawing of the report beside them: none edited by hand,
/// none left from an earlier run, none missing.
#[test]
fn docs_bench_is_the_drawing_of_its_report() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench");
    let report = charts::read_report(&docs.join(REPORT_FILE)).unwrap();
    let subtitle = charts::subtitle(&report);
    let drawn = charts::charts(&report);
    let mut expected: Vec<String> = drawn.iter().map(|c| c.file.to_string()).collect();
    expected.sort();
    assert_eq!(svgs(&docs), expected, "docs/bench holds exactly the charts of its report.json");
    for chart in &drawn {
        let svg = charts::render(chart, &subtitle).unwrap();
        let on_disk = std::fs::read_to_string(docs.join(chart.file)).unwrap();
        assert!(
            svg == on_disk,
            "docs/bench/{} is not the drawing of docs/bench/report.json: cargo xtask bench --charts-from docs/bench/report.json",
            chart.file
        );
    }
}

/// `proxy-bench --charts-from FILE --charts-dir DIR` (what `cargo xtask bench --charts-from`
/// runs): no root, nothing measured, the same charts as the docs'.
#[test]
fn charts_from_a_saved_report_need_no_run() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench");
    let dir = scratch("cli");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_proxy-bench"))
        .arg("--charts-from")
        .arg(docs.join(REPORT_FILE))
        .arg("--charts-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("in {}", dir.display())));
    assert_eq!(svgs(&dir), svgs(&docs));
    for f in svgs(&docs) {
        assert_eq!(std::fs::read(dir.join(&f)).unwrap(), std::fs::read(docs.join(&f)).unwrap(), "{f}");
    }
    // A file that is not a report: an error naming it, nothing written.
    let bad = dir.join("nope.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_proxy-bench"))
        .arg("--charts-from")
        .arg(&bad)
        .arg("--charts-dir")
        .arg(dir.join("unused"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.json"));
    assert!(!dir.join("unused").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
