//! `--manifests DIR`: Services, EndpointSlices (and optionally this node's Node and
//! ServiceCIDRs, whose ranges count beside `--service-cidr`'s) from YAML or JSON files,
//! multi-document files included; followed as the directory changes.
//!
//! - Only real changes count: reads (`cat`, our own reads) are not events, and a file is
//!   re-read only when its `stat` (device, inode, size, mtime, ctime) changed, and applied
//!   only when its bytes changed. An idle directory costs no reads and no syncs.
//! - Only changed files are re-read and re-parsed, and only the objects whose content
//!   changed are handed on, as per-object changes (`Update`s, as the API source's). The
//!   source keeps no parsed object: per file, only which objects it defines and a hash of
//!   each. The same object in two files: the later file (by name) wins, and the earlier
//!   one's definition comes back (re-read) when the later one drops it.
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
//! Modules: `dir` (the directory as files of object keys, each re-read only when it
//! changed, its changes handed on as deltas) and `follow` (the watching thread).
mod dir;
mod follow;

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;
use tracing::{debug, warn};

pub use follow::start;

use super::{Delta, Objects, Update};
use crate::model::{MISSING_METADATA, ObjectKey, object_key};

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

/// The kinds a manifest can define.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Kind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
}

impl Kind {
    /// The kind a document's `kind` names; `None` for the others, which are ignored.
    fn named(kind: &str) -> Option<Kind> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "ServiceCIDR" => Some(Kind::ServiceCidr),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }
}

/// What a document defines: its kind and (namespace, name); cluster-scoped kinds have an
/// empty namespace.
pub(super) type Id = (Kind, ObjectKey);

/// One parsed object.
#[derive(Clone, Debug)]
pub(super) enum Object {
    Service(Arc<Service>),
    Slice(Arc<EndpointSlice>),
    Node(Arc<Node>),
    ServiceCidr(Arc<ServiceCIDR>),
}

impl Object {
    /// The change that puts this object in use.
    pub(super) fn apply(self) -> Update {
        match self {
            Object::Service(s) => Update::Services(Delta::Apply(s)),
            Object::Slice(s) => Update::Slices(Delta::Apply(s)),
            Object::Node(n) => Update::Nodes(Delta::Apply(n)),
            Object::ServiceCidr(c) => Update::ServiceCidrs(Delta::Apply(c)),
        }
    }
}

/// The change that removes `id` from use.
pub(super) fn delete((kind, key): Id) -> Update {
    match kind {
        Kind::Service => Update::Services(Delta::Delete(key)),
        Kind::EndpointSlice => Update::Slices(Delta::Delete(key)),
        Kind::Node => Update::Nodes(Delta::Delete(key)),
        Kind::ServiceCidr => Update::ServiceCidrs(Delta::Delete(key)),
    }
}

/// One document of a file: the object, who it is, and a hash of its content (an object
/// whose content did not change is not applied again).
pub(super) struct Doc {
    pub(super) id: Id,
    pub(super) hash: u64,
    pub(super) object: Object,
}

/// A file's documents, parsed.
#[derive(Default)]
pub(super) struct Parsed {
    pub(super) docs: Vec<Doc>,
    /// Documents that do not parse: a file that was good before is not used in this state.
    pub(super) errors: Vec<DocWarning>,
    /// Objects without namespace or name (name, for the cluster-scoped kinds): they cannot
    /// be told apart, and are skipped.
    pub(super) nameless: Vec<DocWarning>,
}

/// Parse one file's documents into `out`.
pub(super) fn parse_documents(file: &Path, text: &str, node_name: &str, out: &mut Parsed) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let warn = |message: String| DocWarning { file: file.to_path_buf(), doc: Some(i), message };
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                // A syntax error ends the stream: the parser cannot resynchronise (and
                // serde_yaml would keep yielding the same error).
                out.errors.push(warn(format!("not YAML: {e}")));
                break;
            }
        };
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
        if matches!(kind.as_str(), "List" | "ServiceList" | "EndpointSliceList") {
            // kubectl get -o yaml output: recurse into items.
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items {
                    if let Ok(t) = serde_yaml::to_string(item) {
                        parse_documents(file, &t, node_name, out);
                    }
                }
            }
            continue;
        }
        let Some(known) = Kind::named(&kind) else {
            debug!(file = %file.display(), doc = i, kind = %kind, "ignoring document");
            continue;
        };
        let mut h = DefaultHasher::new();
        value.hash(&mut h);
        let hash = h.finish();
        let parsed = match known {
            Kind::Service => serde_yaml::from_value::<Service>(value)
                .map(|s| object_key(&s.metadata).map(|k| ((known, k), Object::Service(Arc::new(s))))),
            Kind::EndpointSlice => serde_yaml::from_value::<EndpointSlice>(value)
                .map(|s| object_key(&s.metadata).map(|k| ((known, k), Object::Slice(Arc::new(s))))),
            Kind::ServiceCidr => serde_yaml::from_value::<ServiceCIDR>(value)
                .map(|c| cluster_scoped_key(&c.metadata).map(|k| ((known, k), Object::ServiceCidr(Arc::new(c))))),
            Kind::Node => match serde_yaml::from_value::<Node>(value) {
                // Other nodes' Nodes are none of ours.
                Ok(n) if n.metadata.name.as_deref() != Some(node_name) => continue,
                r => r.map(|n| cluster_scoped_key(&n.metadata).map(|k| ((known, k), Object::Node(Arc::new(n))))),
            },
        };
        match parsed {
            Ok(Some((id, object))) => out.docs.push(Doc { id, hash, object }),
            Ok(None) => out.nameless.push(warn(format!("{kind}: {MISSING_METADATA}"))),
            Err(e) => out.errors.push(warn(format!("invalid {kind}: {e}"))),
        }
    }
}

/// A cluster-scoped object's key: no namespace, its name.
fn cluster_scoped_key(meta: &ObjectMeta) -> Option<ObjectKey> {
    Some((String::new(), meta.name.clone().filter(|n| !n.is_empty())?))
}

/// Load every manifest in `dir` (not recursive) once, as the agent would use it.
pub fn load_dir(dir: &Path, node_name: &str) -> Result<(Objects, Vec<DocWarning>), FilesError> {
    let mut m = dir::Manifests::new(dir.to_path_buf(), node_name.to_string());
    let mut objects = Objects::default();
    m.rescan(std::time::Instant::now(), &mut |updates| {
        for u in updates {
            match u {
                Update::Services(Delta::Apply(s)) => objects.services.push(s),
                Update::Slices(Delta::Apply(s)) => objects.slices.push(s),
                Update::ServiceCidrs(Delta::Apply(c)) => objects.service_cidrs.push(c),
                Update::Nodes(Delta::Apply(n)) => objects.node = Some(Arc::unwrap_or_clone(n)),
                // A first scan only applies.
                _ => {}
            }
        }
    })?;
    Ok((objects, m.warnings()))
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
---
kind: Service
metadata: {name: nowhere}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
"#;
        let mut out = Parsed::default();
        parse_documents(Path::new("x.yaml"), text, "node-a", &mut out);
        let ids: Vec<String> = out.docs.iter().map(|d| format!("{:?} {}/{}", d.id.0, d.id.1.0, d.id.1.1)).collect();
        assert_eq!(
            ids,
            ["Service default/web", "EndpointSlice default/web-1", "Node /node-a", "ServiceCidr /kubernetes"]
        );
        let Object::ServiceCidr(c) = &out.docs[3].object else { panic!("not a ServiceCIDR") };
        assert_eq!(c.spec.clone().unwrap_or_default().cidrs.unwrap_or_default(), ["10.96.0.0/16", "fd00:10:96::/112"]);
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        assert_eq!(out.errors[0].doc, Some(2));
        assert!(out.errors[0].message.contains("invalid Service"));
        // No namespace: it cannot be told apart, so it is skipped, said, and not an error.
        assert_eq!(out.nameless.len(), 1, "{:?}", out.nameless);
        assert_eq!(out.nameless[0].doc, Some(6));
        assert!(out.nameless[0].message.contains("Service: metadata.namespace or metadata.name is missing"));
    }

    /// The content hash tells a changed object from an unchanged one, whatever else the
    /// file holds.
    #[test]
    fn an_objects_hash_follows_its_content_only() {
        let hash = |text: &str| {
            let mut out = Parsed::default();
            parse_documents(Path::new("h.yaml"), text, "n", &mut out);
            out.docs.iter().map(|d| d.hash).collect::<Vec<_>>()
        };
        let a = "kind: Service\nmetadata: {name: a, namespace: d}\nspec: {ports: [{port: 80}]}\n";
        let a81 = "kind: Service\nmetadata: {name: a, namespace: d}\nspec: {ports: [{port: 81}]}\n";
        let b = "kind: Service\nmetadata: {name: b, namespace: d}\n";
        assert_eq!(hash(a), hash(&format!("# a comment\n{a}")));
        assert_eq!(hash(a)[0], hash(&format!("{b}---\n{a}"))[1]);
        assert_ne!(hash(a), hash(a81));
    }

    #[test]
    fn syntax_error_is_one_warning_and_ends_the_file() {
        let mut out = Parsed::default();
        let text = "kind: Service\nmetadata: {name: a}\n---\nkind: Service\nspec: [\n";
        parse_documents(Path::new("bad.yaml"), text, "n", &mut out);
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        assert!(out.errors[0].message.contains("not YAML"));
        let mut out = Parsed::default();
        parse_documents(Path::new("bad.yaml"), "kind: Service\nspec: [\n", "n", &mut out);
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    }

    #[test]
    fn other_nodes_are_ignored() {
        let mut out = Parsed::default();
        parse_documents(Path::new("n.yaml"), "kind: Node\nmetadata: {name: other}\n", "me", &mut out);
        assert!(out.docs.is_empty() && out.errors.is_empty() && out.nameless.is_empty());
    }

    #[test]
    fn missing_directory_is_an_error_naming_it() {
        let e = load_dir(Path::new("/nonexistent/ebpf-proxy"), "n").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ebpf-proxy"));
    }
}
