//! `--manifests DIR`: Services, EndpointSlices (and optionally this node's Node) from YAML
//! or JSON files, multi-document files included; reloaded when the directory changes.
//! A document that does not parse is skipped with a warning naming file and document;
//! everything else is still loaded.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use super::{Objects, Resource, SourceEvent};

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("reading manifests directory {path}: {source}")]
    ReadDir { path: PathBuf, source: std::io::Error },
    #[error("watching {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
}

/// Problems with individual documents, reported as warnings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocWarning {
    pub file: PathBuf,
    pub doc: usize,
    pub message: String,
}

fn is_manifest(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// Parse one file's documents into `out`.
pub fn parse_documents(file: &Path, text: &str, node_name: &str, out: &mut Objects, warnings: &mut Vec<DocWarning>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let warn = |message: String| DocWarning { file: file.to_path_buf(), doc: i, message };
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                // A syntax error ends the stream: the parser cannot resynchronise (and
                // serde_yaml would keep yielding the same error).
                warnings.push(warn(format!("not YAML: {e}")));
                break;
            }
        };
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
        let r = match kind.as_str() {
            "Service" => serde_yaml::from_value::<Service>(value).map(|s| out.services.push(s)),
            "EndpointSlice" => serde_yaml::from_value::<EndpointSlice>(value).map(|s| out.slices.push(s)),
            "Node" => serde_yaml::from_value::<Node>(value).map(|n| {
                if n.metadata.name.as_deref() == Some(node_name) {
                    out.node = Some(n);
                }
            }),
            "List" | "ServiceList" | "EndpointSliceList" => {
                // kubectl get -o yaml output: recurse into items.
                if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                    for item in items {
                        if let Ok(t) = serde_yaml::to_string(item) {
                            parse_documents(file, &t, node_name, out, warnings);
                        }
                    }
                }
                Ok(())
            }
            other => {
                debug!(file = %file.display(), doc = i, kind = other, "ignoring document");
                Ok(())
            }
        };
        if let Err(e) = r {
            warnings.push(warn(format!("invalid {kind}: {e}")));
        }
    }
}

/// Load every manifest in `dir` (not recursive), in file-name order.
pub fn load_dir(dir: &Path, node_name: &str) -> Result<(Objects, Vec<DocWarning>), FilesError> {
    let rd = std::fs::read_dir(dir).map_err(|source| FilesError::ReadDir { path: dir.into(), source })?;
    let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| is_manifest(p)).collect();
    files.sort();
    let mut out = Objects::default();
    let mut warnings = Vec::new();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(text) => parse_documents(&f, &text, node_name, &mut out, &mut warnings),
            // A file removed between listing and reading is simply gone.
            Err(e) => warnings.push(DocWarning { file: f, doc: 0, message: format!("unreadable: {e}") }),
        }
    }
    Ok((out, warnings))
}

fn log_warnings(ws: &[DocWarning]) {
    for w in ws {
        warn!(file = %w.file.display(), document = w.doc, "{}", w.message);
    }
}

/// Load once, then reload on every change in `dir` (bursts coalesced), reporting on `tx`.
pub fn start(
    dir: PathBuf,
    node_name: String,
    tx: UnboundedSender<SourceEvent>,
) -> Result<Arc<Mutex<Objects>>, FilesError> {
    let (objects, warnings) = load_dir(&dir, &node_name)?;
    log_warnings(&warnings);
    let shared = Arc::new(Mutex::new(objects));
    for r in [Resource::Services, Resource::EndpointSlices, Resource::Node] {
        let _ = tx.send(SourceEvent::Synced(r));
    }
    let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = ntx.send(());
        }
    })
    .map_err(|source| FilesError::Watch { path: dir.clone(), source })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| FilesError::Watch { path: dir.clone(), source })?;
    let store = shared.clone();
    tokio::spawn(async move {
        let _keep = watcher;
        let mut last_warnings = warnings;
        while nrx.recv().await.is_some() {
            // Editors and `cp` write in several steps: settle, then reload once.
            tokio::time::sleep(Duration::from_millis(20)).await;
            while nrx.try_recv().is_ok() {}
            match load_dir(&dir, &node_name) {
                Ok((objects, warnings)) => {
                    if warnings != last_warnings {
                        log_warnings(&warnings);
                        last_warnings = warnings;
                    }
                    if let Ok(mut g) = store.lock() {
                        *g = objects;
                    }
                    if tx.send(SourceEvent::Changed).is_err() {
                        return;
                    }
                }
                // Keep the last good state: a vanished directory is not "delete everything".
                Err(e) => warn!(error = %e, "cannot reload manifests; keeping the previous state"),
            }
        }
    });
    Ok(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_files_and_bad_documents() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.5]}]
---
apiVersion: v1
kind: Service
metadata: {name: broken}
spec: {ports: "not a list"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
"#;
        let mut out = Objects::default();
        let mut w = Vec::new();
        parse_documents(Path::new("x.yaml"), text, "node-a", &mut out, &mut w);
        assert_eq!(out.services.len(), 1);
        assert_eq!(out.slices.len(), 1);
        assert!(out.node.is_some());
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].doc, 2);
        assert!(w[0].message.contains("invalid Service"));
    }

    #[test]
    fn syntax_error_is_one_warning_and_ends_the_file() {
        let mut out = Objects::default();
        let mut w = Vec::new();
        let text = "kind: Service\nmetadata: {name: a}\n---\nkind: Service\nspec: [\n";
        parse_documents(Path::new("bad.yaml"), text, "n", &mut out, &mut w);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].message.contains("not YAML"));
        let mut w = Vec::new();
        parse_documents(Path::new("bad.yaml"), "kind: Service\nspec: [\n", "n", &mut out, &mut w);
        assert_eq!(w.len(), 1, "{w:?}");
    }

    #[test]
    fn other_nodes_are_ignored() {
        let mut out = Objects::default();
        let mut w = Vec::new();
        parse_documents(Path::new("n.yaml"), "kind: Node\nmetadata: {name: other}\n", "me", &mut out, &mut w);
        assert!(out.node.is_none());
    }

    #[test]
    fn missing_directory_is_an_error_naming_it() {
        let e = load_dir(Path::new("/nonexistent/ebpf-proxy"), "n").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ebpf-proxy"));
    }
}
