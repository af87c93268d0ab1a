//! The eBPF crate's shape, read from its sources (issue 22, "one eBPF driver"): its modules
//! import each other in layers (no circle: a scratch map is declared beside its type, not
//! in `maps.rs` above it), and a constant is defined in one module only (`hdr.rs` holds the
//! wire's). The datapath tests prove the programs' behaviour; these keep the layout from
//! drifting back.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::PathBuf,
};

/// Every module of proxy-ebpf (file stem -> source).
fn modules() -> BTreeMap<String, String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proxy-ebpf/src");
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_stem().and_then(|s| s.to_str()).expect("UTF-8 file name").to_string();
            let src = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            out.insert(name, src);
        }
    }
    assert!(out.len() > 10, "proxy-ebpf/src holds {} modules: not the tree this test expects", out.len());
    out
}

/// The crate modules `src` names: `crate::x` anywhere, and each item of a `use crate::{..}`.
fn imports(src: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = BTreeSet::new();
    let mut rest = src;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The items at the group's top level: `a::b`, `c`, `d::{e, f}`.
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        out.insert(ident(&group[j..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| known.contains_key(m));
    out
}

/// A circle in `graph`, as the modules along it, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut c = path[at..].to_vec();
            c.push(m.to_string());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

#[test]
fn ebpf_modules_import_each_other_in_layers() {
    let mods = modules();
    let graph: BTreeMap<String, BTreeSet<String>> = mods
        .iter()
        .map(|(name, src)| {
            let mut deps = imports(src, &mods);
            deps.remove(name);
            (name.clone(), deps)
        })
        .collect();
    if let Some(c) = circle(&graph) {
        panic!("proxy-ebpf modules import each other in a circle: {}", c.join(" -> "));
    }
    // The reader works: the decision sits on conntrack, which sits on the family, ...
    for (from, to) in [("pipeline", "ct"), ("ct", "family"), ("family", "maps"), ("tc", "pipeline")] {
        assert!(graph[from].contains(to), "{from}.rs should import {to}: imports read {:?}", graph[from]);
    }
}

#[test]
fn ebpf_constants_are_defined_once() {
    let mut defined: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, src) in modules() {
        for line in src.lines() {
            // Module-level items only (an impl's associated constants are its own).
            let item = line.strip_prefix("pub ").unwrap_or(line);
            let Some(rest) = item.strip_prefix("const ") else { continue };
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            defined.entry(name).or_default().insert(module.clone());
        }
    }
    assert!(defined.contains_key("ETH_HLEN"), "no module-level constants read: {defined:?}");
    let twice: Vec<String> = defined
        .iter()
        .filter(|(_, modules)| modules.len() > 1)
        .map(|(name, modules)| format!("{name} in {modules:?}"))
        .collect();
    assert!(twice.is_empty(), "constants defined in more than one module: {}", twice.join("; "));
}
