//! `--manifests DIR`: Services, EndpointSlices (and optionally this node's Node and
//! ServiceCIDRs, whose ranges count beside `--service-cidr`'s) from YAML or JSON files,
//! multi-document files included; followed as the directory changes.
//!
//! - Only real changes count: reads (`cat`, our own reads) are not events, and a file is
//!   re-read only when its `stat` (device, inode, size, mtime, ctime) changed, and applied
//!   only when its bytes changed. An idle directory costs no reads and no syncs.
//! - Only changed files are re-read and re-parsed; every file keeps its parsed objects.
//! - A document that does not parse is skipped with a warning naming file and document. A
//!   file that was good before and no longer parses keeps its last good content (with a
//!   warning) until it parses again: a half-written file never deletes a Service.
//! - A file rewritten in place that loses objects or bytes is applied only once it has
//!   stayed unchanged for 300 ms (a writer may be half-way). A file renamed into place
//!   (a new inode) is complete by construction and applies at once: atomic rename is the
//!   way to update.
//! - Entries that are not regular files (FIFOs, sockets, devices, directories) or cannot be
//!   read are skipped with a warning: nothing is opened that could block.
//! - The directory is followed by name: when it is replaced (`mv`, rm + mkdir) the watch is
//!   re-armed on the new one. While it is missing, the last state is kept.
//!
//! The watching and reading run on a thread of their own, so slow file systems never hold
//! up the async runtime (health endpoints, shutdown).
//!
//! Modules: `dir` (the directory as files of parsed objects, each re-read only when it
//! changed) and `follow` (the watching thread).
mod dir;
mod follow;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use serde::Deserialize;
use tracing::{debug, warn};

pub use follow::start;

use super::Objects;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("reading manifests directory {path}: {source}")]
    ReadDir { path: PathBuf, source: std::io::Error },
    #[error("manifests path {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("watching {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
    #[error("starting the manifests thread: {0}")]
    Thread(std::io::Error),
}

/// Problems with individual files or documents, reported as warnings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocWarning {
    pub file: PathBuf,
    /// The document in the file, when the problem is one document's.
    pub doc: Option<usize>,
    pub message: String,
}

impl DocWarning {
    fn file(file: &Path, message: String) -> Self {
        DocWarning { file: file.to_path_buf(), doc: None, message }
    }

    fn log(&self) {
        match self.doc {
            Some(doc) => warn!(file = %self.file.display(), document = doc, "{}", self.message),
            None => warn!(file = %self.file.display(), "{}", self.message),
        }
    }
}

fn is_manifest(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// Parse one file's documents into `out`.
pub fn parse_documents(file: &Path, text: &str, node_name: &str, out: &mut Objects, warnings: &mut Vec<DocWarning>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let warn = |message: String| DocWarning { file: file.to_path_buf(), doc: Some(i), message };
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
            "Service" => serde_yaml::from_value::<Service>(value).map(|s| out.services.push(Arc::new(s))),
            "EndpointSlice" => serde_yaml::from_value::<EndpointSlice>(value).map(|s| out.slices.push(Arc::new(s))),
            "ServiceCIDR" => serde_yaml::from_value::<ServiceCIDR>(value).map(|c| out.service_cidrs.push(Arc::new(c))),
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
    let mut m = dir::Manifests::new(dir.to_path_buf(), node_name.to_string());
    m.rescan(std::time::Instant::now())?;
    Ok((m.objects(), m.warnings()))
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
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: [10.96.0.0/16, "fd00:10:96::/112"]}
"#;
        let mut out = Objects::default();
        let mut w = Vec::new();
        parse_documents(Path::new("x.yaml"), text, "node-a", &mut out, &mut w);
        assert_eq!(out.services.len(), 1);
        assert_eq!(out.slices.len(), 1);
        assert!(out.node.is_some());
        let cidrs: Vec<_> = out.service_cidrs.iter().flat_map(|c| c.spec.clone().unwrap_or_default().cidrs).collect();
        assert_eq!(cidrs, [vec!["10.96.0.0/16".to_string(), "fd00:10:96::/112".to_string()]]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].doc, Some(2));
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
