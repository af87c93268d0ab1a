//! Charts of the comparison rows: one grouped bar chart (SVG) per comparison, written next
//! to docs/benchmarks.md (`docs/bench/`) with the report they were drawn from.
//!
//! Drawn with plotters' SVG backend (no fonts, no bitmaps: text stays `<text>` in a generic
//! `sans-serif`, a white background rectangle and explicit colours keep the charts readable
//! in GitHub's renderer in light and dark mode). A chart is data ([`BarChart`]: categories,
//! series, one optional value per pair) built from the rows by [`charts`]; [`render`] only
//! draws it, so the tests can check the drawing against the rows.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use plotters::{
    coord::Shift,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use crate::report::{Report, group, row_id};

/// Every chart this module can write, by file name: [`write`] removes a stale one whose
/// rows a report does not have, so a directory never mixes charts of two runs.
pub const FILES: [&str; 6] =
    ["conn_rate.svg", "per_packet.svg", "control_change.svg", "control_cold.svg", "memory.svg", "northsouth.svg"];

/// The copy of the report the charts in a directory were drawn from.
pub const REPORT_FILE: &str = "report.json";

const WIDTH: u32 = 960;
const HEIGHT: u32 = 560;
/// plotters' SVG backend writes `font-size` as the requested size / 1.24.
const FONT_SCALE: f64 = 1.24;
const FONT: &str = "sans-serif";
const TEXT: RGBColor = RGBColor(0x22, 0x22, 0x22);
const MUTED: RGBColor = RGBColor(0x55, 0x55, 0x55);
const GRID: RGBColor = RGBColor(0xF0, 0xF0, 0xF0);
const GRID_BOLD: RGBColor = RGBColor(0xCC, 0xCC, 0xCC);

// Okabe-Ito colours (distinguishable with the common colour-vision deficiencies); ours in
// blues, kube-proxy's layouts in warm colours, the ceiling in grey.
const DIRECT: RGBColor = RGBColor(0x80, 0x80, 0x80);
const OURS: RGBColor = RGBColor(0x00, 0x72, 0xB2);
const OURS_ALT: RGBColor = RGBColor(0x56, 0xB4, 0xE9);
const OURS_THIRD: RGBColor = RGBColor(0x00, 0x9E, 0x73);
const IPTABLES: RGBColor = RGBColor(0xD5, 0x5E, 0x00);
const NFTABLES: RGBColor = RGBColor(0xE6, 0x9F, 0x00);
const IPTABLES_LEGACY: RGBColor = RGBColor(0xCC, 0x79, 0xA7);
const NFT_CHUNKED: RGBColor = RGBColor(0xF0, 0xE4, 0x42);

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("drawing {file}: {message}")]
    Draw { file: &'static str, message: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a proxy-bench report: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
}

/// One series of bars: a label for the legend, its colour, one value per category
/// (`None`: not measured in this report, no bar).
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub colour: RGBColor,
    pub values: Vec<Option<f64>>,
}

/// A grouped bar chart: for each category, one bar per series.
#[derive(Clone, Debug)]
pub struct BarChart {
    pub file: &'static str,
    pub title: String,
    /// What the categories are (x axis).
    pub x_desc: String,
    /// Quantity and unit (y axis).
    pub y_desc: String,
    /// Log scale: for comparisons spanning decades (milliseconds against seconds).
    pub log: bool,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
}

impl BarChart {
    /// Bars drawn: one per measured value.
    pub fn bars(&self) -> usize {
        self.series.iter().map(|s| s.values.iter().flatten().count()).sum()
    }

    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.series.iter().flat_map(|s| s.values.iter().flatten().copied())
    }
}

/// Service counts that have at least one of `ids(n)` among the rows of `section`, ascending.
fn sizes(report: &Report, section: &str, has: impl Fn(usize) -> bool) -> Vec<usize> {
    let ns: BTreeSet<usize> = report.rows.iter().filter(|r| r.section == section).filter_map(|r| r.n).collect();
    ns.into_iter().filter(|n| has(*n)).collect()
}

fn services(n: usize) -> String {
    if n == 1 { "1 Service".into() } else { format!("{} Services", group(n)) }
}

/// A chart whose categories are Service counts: one series per `(case, label, colour)`,
/// values from rows `section/case/n=N`.
fn by_size(report: &Report, section: &str, cases: &[(&str, &str, RGBColor)], chart: BarChart) -> BarChart {
    let get = |case: &str, n: usize| report.get(&row_id(section, case, Some(n)));
    let ns = sizes(report, section, |n| cases.iter().any(|(c, _, _)| get(c, n).is_some()));
    BarChart {
        categories: ns.iter().map(|n| services(*n)).collect(),
        series: cases
            .iter()
            .map(|(case, label, colour)| Series {
                label: (*label).into(),
                colour: *colour,
                values: ns.iter().map(|n| get(case, *n)).collect(),
            })
            .collect(),
        ..chart
    }
}

fn empty(file: &'static str, title: &str, x_desc: &str, y_desc: &str, log: bool) -> BarChart {
    BarChart {
        file,
        title: title.into(),
        x_desc: x_desc.into(),
        y_desc: y_desc.into(),
        log,
        categories: vec![],
        series: vec![],
    }
}

/// The charts of a report, in [`FILES`] order; those without a single measured value are
/// left out.
pub fn charts(report: &Report) -> Vec<BarChart> {
    let mut out = Vec::new();

    // Every case of `CONN_CASES` (the tests check that each rate row gets a bar).
    out.push(by_size(
        report,
        "conn",
        &[
            ("direct.rate", "direct to the pod IP (ceiling)", DIRECT),
            ("ours.rate", "ours, TC", OURS),
            ("ours_sock.rate", "ours, socket-level", OURS_ALT),
            ("iptables.rate", "kube-proxy iptables (nft backend)", IPTABLES),
            ("nftables.rate", "kube-proxy nftables", NFTABLES),
            ("iptables_legacy.rate", "kube-proxy iptables (legacy backend)", IPTABLES_LEGACY),
        ],
        empty(
            "conn_rate.svg",
            "New TCP connections per second through a ClusterIP",
            "Services programmed (the client dials the last one)",
            "connections/s, one client thread (higher is better)",
            false,
        ),
    ));

    out.push(by_size(
        report,
        "per_packet",
        &[
            ("hit", "established flow (DNAT), IPv4", OURS),
            ("hit_v6", "established flow (DNAT), IPv6", OURS_ALT),
            ("reply", "reply (reverse NAT), IPv4", OURS_THIRD),
            ("reply_v6", "reply (reverse NAT), IPv6", RGBColor(0x7F, 0xD1, 0xB9)),
            ("miss", "not a Service, IPv4", DIRECT),
            ("miss_v6", "not a Service, IPv6", RGBColor(0xBB, 0xBB, 0xBB)),
        ],
        empty(
            "per_packet.svg",
            "Per-packet cost of the TC program by Service count and family",
            "Services programmed",
            "ns per packet, BPF_PROG_TEST_RUN (lower is better)",
            false,
        ),
    ));

    // One EndpointSlice change: categories are the implementations, series p50 / p99.
    let change_n =
        report.rows.iter().find(|r| r.section == "control" && r.case.starts_with("change.")).and_then(|r| r.n);
    let mut change = empty(
        "control_change.svg",
        &format!(
            "One EndpointSlice change at {}: time until the datapath has it",
            change_n.map(services).unwrap_or_else(|| "N Services".into())
        ),
        "",
        "milliseconds, log scale (lower is better)",
        true,
    );
    let cases: [(&str, &str, Option<usize>, &str); 6] = [
        ("control", "change.incremental", change_n, "ours: incremental sync"),
        ("scale", "change", report_scale_n(report), "ours: real agent, API event to maps"),
        ("control", "change.apply", change_n, "ours: full apply"),
        ("control", "change.translate_apply", change_n, "ours: translate all + apply (previous agent)"),
        ("control", "change.iptables_restore", change_n, "kube-proxy: iptables-restore --noflush"),
        ("control", "change.nft", change_n, "kube-proxy: nft -f transaction"),
    ];
    let cases: Vec<_> = cases
        .into_iter()
        .filter(|(s, c, n, _)| {
            ["p50_ms", "p99_ms"].iter().any(|q| report.get(&row_id(s, &format!("{c}.{q}"), *n)).is_some())
        })
        .collect();
    change.categories = cases.iter().map(|(_, _, _, label)| (*label).to_string()).collect();
    change.series = [("p50_ms", "median (p50)", OURS), ("p99_ms", "p99", IPTABLES)]
        .into_iter()
        .map(|(q, label, colour)| Series {
            label: label.into(),
            colour,
            values: cases.iter().map(|(s, c, n, _)| report.get(&row_id(s, &format!("{c}.{q}"), *n))).collect(),
        })
        .collect();
    out.push(change);

    out.push(by_size(
        report,
        "control",
        &[
            ("cold.total_ms", "ours: translate + apply (map writes)", OURS),
            ("cold.iptables_restore_ms", "iptables-restore (nft backend)", IPTABLES),
            ("cold.iptables_legacy_restore_ms", "iptables-legacy-restore", IPTABLES_LEGACY),
            ("cold.nft_ms", "nft -f, one transaction", NFTABLES),
            ("cold.nft_chunked_ms", "nft -f, 500-Service transactions", NFT_CHUNKED),
        ],
        empty(
            "control_cold.svg",
            "Programming every Service from scratch (10 endpoints each)",
            "Services",
            "milliseconds, log scale (lower is better)",
            true,
        ),
    ));

    // Memory: the agent at ready, by Service count, through either source.
    let mem = |case: &str, section: &str, n: usize| report.get(&row_id(section, case, Some(n)));
    let mem_cases = [
        ("scale", "vmhwm_mib", "peak RSS (VmHWM), Kubernetes API source", OURS),
        ("scale", "vmrss_mib", "RSS at ready, Kubernetes API source", OURS_ALT),
        ("rss", "agent_vmhwm_mib", "peak RSS (VmHWM), --manifests source", OURS_THIRD),
    ];
    let ns: BTreeSet<usize> = report
        .rows
        .iter()
        .filter(|r| mem_cases.iter().any(|(s, c, _, _)| r.section == *s && r.case == *c))
        .filter_map(|r| r.n)
        .collect();
    let mut memory = empty(
        "memory.svg",
        "Agent memory when ready, by Service count (10 endpoints each)",
        "Services",
        "MiB (lower is better)",
        false,
    );
    memory.categories = ns.iter().map(|n| services(*n)).collect();
    memory.series = mem_cases
        .iter()
        .map(|(s, c, label, colour)| Series {
            label: (*label).into(),
            colour: *colour,
            values: ns.iter().map(|n| mem(c, s, *n)).collect(),
        })
        .collect();
    out.push(memory);

    let mut ns = empty(
        "northsouth.svg",
        "North-south: UDP through a NodePort to a pod on another node",
        "address family",
        "packets/s, one sender thread (higher is better)",
        false,
    );
    let families = [("v4", "IPv4"), ("v6", "IPv6")];
    let ns_get = |f: &str, c: &str| report.get(&row_id("northsouth", &format!("{f}.{c}.pps"), None));
    let ns_cases = [
        ("direct", "none: straight to node 2 (ceiling)", DIRECT),
        ("ours_native", "ours, XDP native", OURS),
        ("ours_generic", "ours, XDP generic", OURS_ALT),
        ("ours_dsr", "ours, XDP native, DSR", OURS_THIRD),
        ("iptables", "kube-proxy iptables NodePort rules", IPTABLES),
    ];
    let fams: Vec<_> =
        families.iter().filter(|(f, _)| ns_cases.iter().any(|(c, _, _)| ns_get(f, c).is_some())).collect();
    ns.categories = fams.iter().map(|(_, label)| (*label).to_string()).collect();
    ns.series = ns_cases
        .iter()
        .map(|(c, label, colour)| Series {
            label: (*label).into(),
            colour: *colour,
            values: fams.iter().map(|(f, _)| ns_get(f, c)).collect(),
        })
        .collect();
    out.push(ns);

    out.retain(|c| c.bars() > 0);
    out
}

/// The Service count of the `scale` section's one-change rows.
fn report_scale_n(report: &Report) -> Option<usize> {
    report.rows.iter().find(|r| r.section == "scale" && r.case.starts_with("change.")).and_then(|r| r.n)
}

/// A value as printed on a bar or an axis: three significant digits, thousands as `k`.
pub fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        return format!("{}k", fmt_value(v / 1000.0));
    }
    if a == 0.0 || !a.is_finite() {
        return format!("{v}");
    }
    let decimals = (2 - a.log10().floor() as i32).clamp(0, 4) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

/// One line under the title: which run the chart is from.
pub fn subtitle(report: &Report) -> String {
    let m = &report.machine;
    let mut s = format!("proxy-bench, {} run", report.mode);
    if report.started_unix > 0 {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(report.started_unix);
        let date = humantime::format_rfc3339_seconds(t).to_string();
        s.push_str(&format!(" of {}", date.get(..10).unwrap_or(&date)));
    }
    if m.cpus > 0 {
        s.push_str(&format!(", {} CPUs", m.cpus));
    }
    if !m.kernel.is_empty() {
        s.push_str(&format!(", Linux {}", m.kernel));
    }
    if !m.loadavg_start.is_empty() {
        let first = m.loadavg_start.split_whitespace().next().unwrap_or_default();
        s.push_str(&format!(", load average {first} at the start"));
    }
    s
}

fn font(size: f64, colour: RGBColor) -> TextStyle<'static> {
    (FONT, size * FONT_SCALE).into_font().color(&colour)
}

/// Legend entries laid out in rows across the width: `(x, row)` of each entry.
fn legend_layout(labels: &[&str]) -> Vec<(i32, i32)> {
    let (mut x, mut row) = (0, 0);
    let max = WIDTH as i32 - 40;
    labels
        .iter()
        .map(|l| {
            // Swatch, gap, an estimate of the label at 12 px (0.6 em per character), spacing.
            let w = 22 + (l.chars().count() as f64 * 7.2) as i32 + 24;
            if x > 0 && x + w > max {
                x = 0;
                row += 1;
            }
            let at = (x, row);
            x += w;
            at
        })
        .collect()
}

const LEGEND_ROW: i32 = 22;

/// The chart as an SVG document.
pub fn render(chart: &BarChart, subtitle: &str) -> Result<String, ChartError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(chart, subtitle, &root)
            .and_then(|()| root.present())
            .map_err(|e| ChartError::Draw { file: chart.file, message: e.to_string() })?;
    }
    Ok(svg)
}

fn draw<DB: DrawingBackend>(
    chart: &BarChart,
    subtitle: &str,
    root: &DrawingArea<DB, Shift>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let centre = WIDTH as i32 / 2;
    root.draw(&Text::new(
        chart.title.clone(),
        (centre, 14),
        (FONT, 18.0 * FONT_SCALE)
            .into_font()
            .style(FontStyle::Bold)
            .color(&TEXT)
            .pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    root.draw(&Text::new(
        subtitle.to_string(),
        (centre, 40),
        font(12.0, MUTED).pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;

    let labels: Vec<&str> = chart.series.iter().map(|s| s.label.as_str()).collect();
    let layout = legend_layout(&labels);
    let legend_rows = layout.last().map(|(_, r)| r + 1).unwrap_or(0);
    let legend_h = legend_rows * LEGEND_ROW + 16;
    let (upper, lower) = root.split_vertically(HEIGHT as i32 - legend_h);

    let max = chart.values().fold(f64::MIN, f64::max);
    let min = chart.values().fold(f64::MAX, f64::min);
    let n = chart.categories.len().max(1) as f64;
    let mut builder = ChartBuilder::on(&upper);
    builder.margin_top(64).margin_left(16).margin_right(24).x_label_area_size(64).y_label_area_size(84);
    let value_font = font(11.0, TEXT);
    let axis_fmt = |v: &f64| fmt_value(*v);
    if chart.log {
        // Whole decades around the values, so every bar starts on a labelled line; the floor
        // under the smallest value, so that its bar has a height.
        let lo = 10f64.powf((min.max(1e-6) * 0.5).log10().floor());
        let hi = 10f64.powf((max * 3.0).log10().ceil());
        let mut c = builder.build_cartesian_2d(0f64..n, (lo..hi).log_scale())?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(12)
            .y_label_formatter(&axis_fmt)
            .y_desc(chart.y_desc.clone())
            .x_desc(chart.x_desc.clone())
            .label_style(font(12.0, TEXT))
            .axis_desc_style(font(13.0, TEXT))
            .light_line_style(GRID)
            .bold_line_style(GRID_BOLD)
            .axis_style(MUTED)
            .draw()?;
        bars(&mut c, chart, lo, &value_font)?;
        category_labels(root, chart, |x| c.backend_coord(&(x, lo)))?;
    } else {
        let mut c = builder.build_cartesian_2d(0f64..n, 0f64..(max * 1.12).max(f64::MIN_POSITIVE))?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(8)
            .y_label_formatter(&axis_fmt)
            .y_desc(chart.y_desc.clone())
            .x_desc(chart.x_desc.clone())
            .label_style(font(12.0, TEXT))
            .axis_desc_style(font(13.0, TEXT))
            .light_line_style(GRID)
            .bold_line_style(GRID_BOLD)
            .axis_style(MUTED)
            .draw()?;
        bars(&mut c, chart, 0.0, &value_font)?;
        category_labels(root, chart, |x| c.backend_coord(&(x, 0.0)))?;
    }

    for ((x, row), s) in layout.iter().zip(&chart.series) {
        let (x, y) = (20 + x, 8 + row * LEGEND_ROW);
        lower.draw(&Rectangle::new([(x, y), (x + 14, y + 14)], s.colour.filled()))?;
        lower.draw(&Text::new(
            s.label.clone(),
            (x + 20, y + 7),
            font(12.0, TEXT).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    Ok(())
}

/// Group `i` spans x in [i, i+1): bars fill its middle 80 %, each series a slot.
fn slot(chart: &BarChart, category: usize, series: usize) -> (f64, f64) {
    let w = 0.8 / chart.series.len().max(1) as f64;
    let x0 = category as f64 + 0.1 + series as f64 * w;
    (x0 + w * 0.06, x0 + w * 0.94)
}

fn bars<DB: DrawingBackend, Y>(
    c: &mut ChartContext<'_, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    chart: &BarChart,
    floor: f64,
    value_font: &TextStyle<'_>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    Y: Ranged<ValueType = f64>,
{
    for (j, s) in chart.series.iter().enumerate() {
        let measured: Vec<(usize, f64)> = s.values.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))).collect();
        c.draw_series(measured.iter().map(|(i, v)| {
            let (x0, x1) = slot(chart, *i, j);
            Rectangle::new([(x0, floor), (x1, *v)], s.colour.filled())
        }))?;
        c.draw_series(measured.iter().map(|(i, v)| {
            let (x0, x1) = slot(chart, *i, j);
            Text::new(fmt_value(*v), ((x0 + x1) / 2.0, *v), value_font.pos(Pos::new(HPos::Center, VPos::Bottom)))
        }))?;
    }
    Ok(())
}

/// Category names under their groups (the x axis itself has no numeric labels).
fn category_labels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &BarChart,
    to_px: impl Fn(f64) -> (i32, i32),
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let width = to_px(1.0).0 - to_px(0.0).0;
    // An estimate of a 12 px character, as for the legend.
    let per_line = ((f64::from(width) * 0.92 / 7.2) as usize).max(8);
    for (i, label) in chart.categories.iter().enumerate() {
        let (x, y) = to_px(i as f64 + 0.5);
        for (k, line) in wrap(label, per_line).into_iter().enumerate() {
            let y = y + 8 + k as i32 * 16;
            root.draw(&Text::new(line, (x, y), font(12.0, TEXT).pos(Pos::new(HPos::Center, VPos::Top))))?;
        }
    }
    Ok(())
}

/// Words of `text` in lines of at most `width` characters (a longer word gets a line).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 1 + word.chars().count() <= width => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// Write the report's charts and a copy of the report (`report.json`) into `dir`, and
/// remove any chart of [`FILES`] this report has no rows for. Returns the charts written.
pub fn write(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, ChartError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ChartError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let sub = subtitle(report);
    let mut written = Vec::new();
    for chart in charts(report) {
        let path = dir.join(chart.file);
        std::fs::write(&path, render(&chart, &sub)?).map_err(io(&path))?;
        written.push(path);
    }
    for file in FILES {
        let path = dir.join(file);
        if !written.contains(&path) && path.exists() {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    let path = dir.join(REPORT_FILE);
    let json =
        serde_json::to_string_pretty(report).map_err(|source| ChartError::Json { path: path.clone(), source })?;
    std::fs::write(&path, json + "\n").map_err(io(&path))?;
    Ok(written)
}

/// A report saved by a run (`target/bench/*.json`, or a charts directory's `report.json`).
pub fn read_report(path: &Path) -> Result<Report, ChartError> {
    let text = std::fs::read_to_string(path).map_err(|source| ChartError::Io { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|source| ChartError::Json { path: path.into(), source })
}
