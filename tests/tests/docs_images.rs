//! The pictures in the docs: every SVG under docs/ is well-formed and drawn so that GitHub
//! shows it in light and dark mode (a viewBox, a white background first, every text with
//! its own colour and a generic font, nothing external), every one is shown by some page,
//! every image a page shows exists, and each page that explains a path, a hop or the
//! start-up shows a picture of it. No root, no build of anything.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Files under `dir` ending in `ext`, skipping build output and VCS directories.
fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !["target", ".git", "node_modules"].contains(&name.as_str()) {
                files(&path, ext, out);
            }
        } else if name.ends_with(ext) {
            out.push(path);
        }
    }
}

/// Image references of a markdown page: `![alt](target)` and `<img src="target">`, local
/// ones only, resolved against the page's directory (not canonicalised: they may not exist).
fn images(page: &Path) -> Vec<(String, PathBuf)> {
    let text = std::fs::read_to_string(page).unwrap();
    let mut refs = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("![") {
        rest = &rest[i + 2..];
        let Some(close) = rest.find("](") else { break };
        let after = &rest[close + 2..];
        let Some(end) = after.find(')') else { break };
        refs.push(after[..end].split_whitespace().next().unwrap_or_default().to_string());
        rest = &after[end..];
    }
    let mut rest = text.as_str();
    while let Some(i) = rest.find("<img ") {
        rest = &rest[i..];
        if let Some(s) = rest.find("src=\"") {
            let after = &rest[s + 5..];
            refs.push(after[..after.find('"').unwrap_or(0)].to_string());
        }
        rest = &rest[5..];
    }
    let dir = page.parent().unwrap();
    refs.into_iter()
        .filter(|r| !r.starts_with("http://") && !r.starts_with("https://"))
        .map(|r| {
            let path = dir.join(&r);
            (r, path)
        })
        .collect()
}

/// `a/./b/../c` -> `a/c`, without touching the file system.
fn normal(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn pages() -> Vec<PathBuf> {
    let mut v = Vec::new();
    files(&root(), ".md", &mut v);
    v.sort();
    v
}

fn svgs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    files(&root().join("docs"), ".svg", &mut v);
    v.sort();
    v
}

/// An attribute of the element or of its nearest ancestor that has it.
fn inherited<'a>(n: roxmltree::Node<'a, 'a>, name: &str) -> Option<&'a str> {
    n.ancestors().filter(|a| a.is_element()).find_map(|a| a.attribute(name))
}

/// What GitHub's renderer needs to show the picture the same in light and dark mode.
fn check_svg(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let doc = roxmltree::Document::parse(&text).map_err(|e| format!("not well-formed: {e}"))?;
    let svg = doc.root_element();
    if !svg.has_tag_name("svg") {
        return Err(format!("root element is <{}>", svg.tag_name().name()));
    }
    let view: Vec<f64> = svg
        .attribute("viewBox")
        .ok_or("no viewBox")?
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<f64>().map_err(|_| format!("viewBox {s:?}")))
        .collect::<Result<_, _>>()?;
    if view.len() != 4 || view[2] <= 0.0 || view[3] <= 0.0 {
        return Err(format!("viewBox {view:?}"));
    }
    // The first thing drawn: a white rectangle over the whole picture.
    let first = svg
        .children()
        .filter(|n| n.is_element())
        .find(|n| !["title", "desc", "defs", "metadata", "style"].contains(&n.tag_name().name()))
        .ok_or("nothing drawn")?;
    let num = |a: &str| first.attribute(a).map(|v| v.trim_end_matches("px").parse::<f64>().unwrap_or(f64::NAN));
    let white = first
        .attribute("fill")
        .is_some_and(|f| ["#fff", "#ffffff", "white"].contains(&f.to_ascii_lowercase().as_str()));
    let covers = num("x").unwrap_or(0.0) <= view[0]
        && num("y").unwrap_or(0.0) <= view[1]
        && num("width").is_some_and(|w| w >= view[2])
        && num("height").is_some_and(|h| h >= view[3]);
    if !first.has_tag_name("rect") || !white || !covers {
        return Err("the first element drawn is not a white rectangle over the whole viewBox".into());
    }
    let mut texts = 0;
    for n in doc.descendants().filter(|n| n.is_element()) {
        let tag = n.tag_name().name();
        if ["script", "foreignObject", "image", "iframe"].contains(&tag) {
            return Err(format!("<{tag}>: nothing scripted or embedded"));
        }
        for a in n.attributes() {
            let v = a.value();
            if a.name() == "href" && !v.starts_with('#') {
                return Err(format!("external reference {v:?}"));
            }
            if a.name().starts_with("on") {
                return Err(format!("event handler {}", a.name()));
            }
            if v.contains("url(") && !v.contains("url(#") {
                return Err(format!("external url in {}={v:?}", a.name()));
            }
            if a.name() == "font-family" {
                let generic = v.rsplit(',').next().unwrap_or_default().trim().trim_matches(['"', '\'']);
                if !["sans-serif", "serif", "monospace"].contains(&generic) {
                    return Err(format!("font-family {v:?} does not end in a generic family"));
                }
            }
        }
        if tag == "style" && n.text().is_some_and(|t| t.contains("@import") || t.contains("url(http")) {
            return Err("a stylesheet that loads something".into());
        }
        if tag == "text" {
            texts += 1;
            let what = n.text().unwrap_or_default().trim().to_string();
            if inherited(n, "fill").is_none() {
                return Err(format!("text {what:?} has no fill of its own or from a group"));
            }
            if inherited(n, "font-family").is_none() {
                return Err(format!("text {what:?} has no font-family"));
            }
        }
    }
    if texts == 0 {
        return Err("no <text>: labels must be text, not outlines".into());
    }
    Ok(())
}

#[test]
fn every_svg_under_docs_is_well_formed_and_renders_in_light_and_dark_mode() {
    let all = svgs();
    assert!(!all.is_empty(), "no SVG under docs/");
    let bad: Vec<String> =
        all.iter().filter_map(|p| check_svg(p).err().map(|e| format!("{}: {e}", p.display()))).collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn every_svg_under_docs_is_shown_by_a_page_and_every_image_shown_exists() {
    let mut shown = BTreeSet::new();
    let mut missing = Vec::new();
    for page in pages() {
        for (r, path) in images(&page) {
            if !path.is_file() {
                missing.push(format!("{}: {r}", page.display()));
            }
            shown.insert(normal(&path));
        }
    }
    assert!(missing.is_empty(), "images shown but missing:\n{}", missing.join("\n"));
    let unshown: Vec<String> =
        svgs().iter().filter(|p| !shown.contains(&normal(p))).map(|p| p.display().to_string()).collect();
    assert!(unshown.is_empty(), "SVGs no page shows:\n{}", unshown.join("\n"));
}

/// The pictures issue 21 asks for, where the text explains them.
#[test]
fn the_pages_that_explain_the_paths_show_their_pictures() {
    let root = root();
    for (page, pictures) in [
        ("README.md", &["docs/img/architecture.svg", "docs/img/paths.svg"][..]),
        ("docs/architecture.md", &["docs/img/architecture.svg", "docs/img/bootstrap.svg"][..]),
        ("docs/datapath.md", &["docs/img/paths.svg", "docs/img/nodeport-snat.svg"][..]),
        ("docs/deploy.md", &["docs/img/bootstrap.svg"][..]),
        (
            "docs/benchmarks.md",
            &[
                "docs/bench/conn_rate.svg",
                "docs/bench/per_packet.svg",
                "docs/bench/control_change.svg",
                "docs/bench/memory.svg",
            ][..],
        ),
    ] {
        let shown: BTreeSet<PathBuf> = images(&root.join(page)).into_iter().map(|(_, p)| normal(&p)).collect();
        for picture in pictures {
            assert!(shown.contains(&normal(&root.join(picture))), "{page} does not show {picture}");
        }
    }
    // The ASCII sketch the architecture picture replaces is gone.
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(!readme.contains('▼') && !readme.contains('◄'), "README.md still holds an ASCII sketch");
}

#[test]
fn the_checks_catch_what_they_are_for() {
    let dir = std::env::temp_dir().join(format!("docs-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10" font-family="sans-serif"><title>t</title><rect width="10" height="10" fill="#FFFFFF"/><text fill="#222">a</text></svg>"##;
    for (name, svg, expect) in [
        ("good", good.to_string(), None),
        ("unclosed", good.replace("</svg>", ""), Some("not well-formed")),
        ("noviewbox", good.replace(r#" viewBox="0 0 10 10""#, ""), Some("no viewBox")),
        (
            "transparent",
            good.replace(r##"<rect width="10" height="10" fill="#FFFFFF"/>"##, ""),
            Some("white rectangle"),
        ),
        ("nofill", good.replace(r##"<text fill="#222">"##, "<text>"), Some("no fill")),
        ("script", good.replace("<text", "<script>x</script><text"), Some("nothing scripted")),
        ("href", good.replace("<text", r#"<a href="https://example.com"/><text"#), Some("external reference")),
        ("font", good.replace(r#"font-family="sans-serif""#, r#"font-family="Inter""#), Some("generic family")),
    ] {
        let path = dir.join(format!("{name}.svg"));
        std::fs::write(&path, svg).unwrap();
        match (check_svg(&path), expect) {
            (Ok(()), None) => {}
            (Err(e), Some(want)) if e.contains(want) => {}
            (got, want) => panic!("{name}: {got:?}, expected {want:?}"),
        }
    }
    std::fs::write(dir.join("page.md"), "![a](img/a.svg) and <img src=\"b.png\"> ![web](https://example.com/c.svg)")
        .unwrap();
    let refs: Vec<String> = images(&dir.join("page.md")).into_iter().map(|(r, _)| r).collect();
    assert_eq!(refs, ["img/a.svg", "b.png"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
