//! `--manifests DIR`: Services, EndpointSlices (and optionally this node's Node) from YAML
//! or JSON files, multi-document files included; followed as the directory changes.
//!
//! - Only real changes count: reads (`cat`, our own reads) are not events, and a file is
//!   re-read only when its `stat` (device, inode, size, mtime, ctime) changed, and applied
//!   only when its bytes changed. An idle directory costs no reads and no syncs.
//! - Only changed files are re-read and re-parsed; every file keeps its parsed objects.
//! - A document that does not parse is skipped with a warning naming file and document. A
//!   file that was good before and no longer parses keeps its last good content (with a
//!   warning) until it parses again: a half-written file never deletes a Service.
//! - A file rewritten in place that loses objects or bytes is applied only once it has
//!   stayed unchanged for `SETTLE` (a writer may be half-way). A file renamed into place
//!   (a new inode) is complete by construction and applies at once: atomic rename is the
//!   way to update.
//! - Entries that are not regular files (FIFOs, sockets, devices, directories) or cannot be
//!   read are skipped with a warning: nothing is opened that could block.
//! - The directory is followed by name: when it is replaced (`mv`, rm + mkdir) the watch is
//!   re-armed on the new one. While it is missing, the last state is kept.
//!
//! The watching and reading run on a thread of their own, so slow file systems never hold
//! up the async runtime (health endpoints, shutdown).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    hash::{DefaultHasher, Hasher},
    io::Read,
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};
use serde::Deserialize;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info, warn};

use super::{Objects, Resource, SourceEvent};

/// After the last event of a burst, wait this long for more before rescanning (editors and
/// `cp` write in several steps).
const QUIET: Duration = Duration::from_millis(50);
/// ...but rescan at most this long after the first event, even if events keep coming.
const MAX_DELAY: Duration = Duration::from_millis(500);
/// A file rewritten in place that lost objects or bytes must stay unchanged this long
/// before it is applied: long enough for a writer between two `write`s, short enough that
/// a deliberate deletion is followed quickly.
const SETTLE: Duration = Duration::from_millis(300);
/// How often the directory's identity is checked, in case its replacement was missed.
const DIR_CHECK: Duration = Duration::from_secs(1);
/// File timestamps advance in kernel ticks (up to 10 ms): a file modified this recently
/// could change again with an identical `stat`, so it is read once more a little later
/// (git's "racy clean" problem).
const RACY: Duration = Duration::from_millis(20);

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

/// A file's identity and version as `stat` reports it: any write or replacement changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Self {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    fn same_file(&self, other: &Stamp) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// "Service ns/name", "EndpointSlice ns/name", "Node name": what a file defines.
fn identities(o: &Objects) -> BTreeSet<(&'static str, String, String)> {
    let id = |kind, m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (kind, m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
    };
    let mut ids: BTreeSet<_> = o.services.iter().map(|s| id("Service", &s.metadata)).collect();
    ids.extend(o.slices.iter().map(|s| id("EndpointSlice", &s.metadata)));
    ids.extend(o.node.iter().map(|n| id("Node", &n.metadata)));
    ids
}

/// What is known about one manifest file.
#[derive(Default)]
struct FileState {
    /// The version whose objects are in use (None: no version accepted yet).
    accepted: Option<Stamp>,
    /// Hash of the accepted bytes: a `touch` or a rewrite with the same bytes changes nothing.
    hash: u64,
    /// The objects in use: the last good content.
    objects: Objects,
    /// Warnings about documents of the accepted content.
    doc_warnings: Vec<DocWarning>,
    /// The version last looked at, when it could not be used (does not parse, cannot be
    /// read, not a regular file), and why: not looked at again until it changes.
    rejected: Option<(Option<Stamp>, DocWarning)>,
    /// A version that lost objects or bytes in place, and since when it is unchanged.
    pending: Option<(Stamp, Instant)>,
    /// Read within `RACY` of its mtime: its `stat` cannot be trusted to show the next
    /// write, read it again at the next rescan.
    racy: bool,
}

impl FileState {
    fn warnings(&self, path: &Path) -> Vec<DocWarning> {
        match (&self.rejected, &self.pending) {
            (Some((_, w)), _) => vec![w.clone()],
            (None, Some(_)) => vec![DocWarning::file(
                path,
                format!(
                    "rewritten in place and lost objects or bytes (being written?): keeping its previous content \
                     until it stays unchanged for {} ms (update files by atomic rename)",
                    SETTLE.as_millis()
                ),
            )],
            (None, None) => self.doc_warnings.clone(),
        }
    }
}

/// What a refresh found.
#[derive(Default)]
struct Refresh {
    changed: bool,
    /// Look again at this time (a version waiting to settle, or read while changing).
    retry: Option<Instant>,
}

impl Refresh {
    fn retry(at: Instant) -> Self {
        Refresh { changed: false, retry: Some(at) }
    }

    fn merge(&mut self, other: Refresh) {
        self.changed |= other.changed;
        self.retry = match (self.retry, other.retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Every manifest of a directory, parsed per file.
struct Manifests {
    dir: PathBuf,
    node_name: String,
    files: BTreeMap<PathBuf, FileState>,
    /// Warnings logged and still true (each is logged once, when it appears).
    logged: BTreeSet<(PathBuf, Option<usize>, String)>,
    /// Files read so far (each read is of a file whose `stat` changed).
    reads: u64,
}

impl Manifests {
    fn new(dir: PathBuf, node_name: String) -> Self {
        Manifests { dir, node_name, files: BTreeMap::new(), logged: BTreeSet::new(), reads: 0 }
    }

    /// Look at every entry again; read only those whose `stat` changed. `changed`: the
    /// objects in use are different now.
    fn rescan(&mut self, now: Instant) -> Result<Refresh, FilesError> {
        let rd = fs::read_dir(&self.dir).map_err(|source| FilesError::ReadDir { path: self.dir.clone(), source })?;
        let mut out = Refresh::default();
        let mut present = BTreeSet::new();
        for entry in rd.flatten() {
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            // `stat` follows symlinks (ConfigMap volumes are symlinks into `..data`) and
            // never opens the file, so it cannot block on a FIFO. A file gone between
            // listing and `stat` is simply gone.
            match fs::metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                meta => out.merge(self.refresh_file(&path, meta, now)),
            }
            present.insert(path);
        }
        let removed: Vec<PathBuf> = self.files.keys().filter(|p| !present.contains(*p)).cloned().collect();
        for p in removed {
            if let Some(f) = self.files.remove(&p) {
                out.changed |= f.objects != Objects::default();
            }
        }
        Ok(out)
    }

    fn refresh_file(&mut self, path: &Path, meta: std::io::Result<fs::Metadata>, now: Instant) -> Refresh {
        let state = self.files.entry(path.to_path_buf()).or_default();
        let meta = match meta {
            Ok(m) if m.file_type().is_file() => m,
            Ok(m) => return state.reject(None, path, format!("{}, not a regular file: skipped", file_type_name(&m))),
            Err(e) => return state.reject(None, path, format!("cannot stat: {e}; keeping its previous content")),
        };
        let stamp = Stamp::of(&meta);
        if let Some((p, since)) = state.pending {
            if p != stamp {
                state.pending = None;
            } else if now < since + SETTLE {
                return Refresh::retry(since + SETTLE);
            }
        }
        let rejected = state.rejected.as_ref().and_then(|(s, _)| *s);
        if state.pending.is_none() && !state.racy && (state.accepted == Some(stamp) || rejected == Some(stamp)) {
            return Refresh::default();
        }
        let modified = meta.modified().ok();
        state.racy = modified.and_then(|m| SystemTime::now().duration_since(m).ok()).is_none_or(|age| age < RACY);
        // Look once more when the timestamp tick is surely over.
        let recheck = if state.racy { Some(now + RACY) } else { None };
        self.reads += 1;
        let bytes = match read_regular(path) {
            Ok(Content::Bytes(b, after)) if after == stamp => b,
            // Written to while we read it: look again when the writer is quiet.
            Ok(Content::Bytes(..)) => return Refresh::retry(now + QUIET),
            Ok(Content::NotRegular(m)) => {
                return state.reject(Some(stamp), path, format!("{}, not a regular file: skipped", file_type_name(&m)));
            }
            Err(e) => return state.reject(Some(stamp), path, format!("unreadable: {e}; keeping its previous content")),
        };
        let mut h = DefaultHasher::new();
        h.write(&bytes);
        let hash = h.finish();
        if state.accepted.is_some() && state.hash == hash {
            // Same bytes: a `touch`, or the file back to the content in use.
            state.accepted = Some(stamp);
            state.rejected = None;
            state.pending = None;
            return Refresh { changed: false, retry: recheck };
        }
        let mut objects = Objects::default();
        let mut warnings = Vec::new();
        match String::from_utf8(bytes) {
            Ok(text) => parse_documents(path, &text, &self.node_name, &mut objects, &mut warnings),
            Err(e) => warnings.push(DocWarning::file(path, format!("not UTF-8: {e}"))),
        }
        if let Some(accepted) = state.accepted {
            if let Some(first) = warnings.first() {
                // It was good before: keep that until the file parses again.
                let doc = first.doc.map(|d| format!("document {d}: ")).unwrap_or_default();
                let message = format!(
                    "does not parse ({doc}{}); keeping its previous content until it does (update files by atomic rename)",
                    first.message
                );
                state.reject(Some(stamp), path, message);
                return Refresh { changed: false, retry: recheck };
            }
            // Rewritten in place and lost something: a writer may be half-way. Apply only
            // once the file has stayed unchanged for SETTLE. A new inode (renamed into
            // place) is complete, and applies at once.
            let lost = stamp.len < accepted.len || !identities(&state.objects).is_subset(&identities(&objects));
            if lost && stamp.same_file(&accepted) {
                match state.pending {
                    Some((p, since)) if p == stamp && now >= since + SETTLE => {}
                    _ => {
                        debug!(file = %path.display(), "file shrank in place; waiting for it to settle");
                        state.pending = Some((stamp, now));
                        return Refresh::retry(now + SETTLE);
                    }
                }
            }
        }
        // First sight uses whatever parses (each bad document has its warning).
        let changed = state.objects != objects;
        let racy = state.racy;
        *state = FileState { accepted: Some(stamp), hash, objects, doc_warnings: warnings, rejected: None, pending: None, racy };
        Refresh { changed, retry: recheck }
    }

    /// Everything in use, in file-name order (shared with the files' own lists).
    fn objects(&self) -> Objects {
        let mut out = Objects::default();
        for f in self.files.values() {
            out.services.extend(f.objects.services.iter().cloned());
            out.slices.extend(f.objects.slices.iter().cloned());
            if f.objects.node.is_some() {
                out.node.clone_from(&f.objects.node);
            }
        }
        out
    }

    fn warnings(&self) -> Vec<DocWarning> {
        self.files.iter().flat_map(|(path, f)| f.warnings(path)).collect()
    }

    /// Log the warnings that appeared since the last call.
    fn log_new_warnings(&mut self) {
        let now: BTreeSet<_> = self.warnings().into_iter().map(|w| (w.file, w.doc, w.message)).collect();
        for (file, doc, message) in now.difference(&self.logged) {
            DocWarning { file: file.clone(), doc: *doc, message: message.clone() }.log();
        }
        self.logged = now;
    }
}

impl FileState {
    /// This version of the file cannot be used: keep what it had, with a warning.
    fn reject(&mut self, stamp: Option<Stamp>, path: &Path, message: String) -> Refresh {
        self.rejected = Some((stamp, DocWarning::file(path, message)));
        self.pending = None;
        Refresh::default()
    }
}

/// The result of reading an entry that `stat` called a regular file.
enum Content {
    /// Its bytes, and its `stat` after reading (compare to before: written meanwhile?).
    Bytes(Vec<u8>, Stamp),
    /// Replaced by something else between `stat` and `open`.
    NotRegular(fs::Metadata),
}

/// Read a regular file without ever blocking: opened non-blocking (a FIFO swapped in after
/// the `stat` does not wait for a writer) and checked again on the open descriptor.
fn read_regular(path: &Path) -> std::io::Result<Content> {
    let mut f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    let m = f.metadata()?;
    if !m.file_type().is_file() {
        return Ok(Content::NotRegular(m));
    }
    let mut buf = Vec::with_capacity(usize::try_from(m.len()).unwrap_or(0));
    f.read_to_end(&mut buf)?;
    Ok(Content::Bytes(buf, Stamp::of(&f.metadata()?)))
}

fn file_type_name(m: &fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Load every manifest in `dir` (not recursive), in file-name order.
pub fn load_dir(dir: &Path, node_name: &str) -> Result<(Objects, Vec<DocWarning>), FilesError> {
    let mut m = Manifests::new(dir.to_path_buf(), node_name.to_string());
    m.rescan(Instant::now())?;
    Ok((m.objects(), m.warnings()))
}

/// The directory's identity, to notice it was replaced.
fn dir_id(dir: &Path) -> Option<(u64, u64)> {
    fs::metadata(dir).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino()))
}

/// Which events matter. Reads (open, close without writing, access) never do: they are
/// what `cat` does, and what our own reload does.
enum Relevance {
    None,
    /// Something in the directory changed.
    Files,
    /// The directory itself was created, removed, moved or replaced.
    Dir,
}

fn relevance(ev: &notify::Event, dir: &Path) -> Relevance {
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return Relevance::None,
        _ => {}
    }
    let mut r = Relevance::None;
    for p in &ev.paths {
        if p == dir {
            return Relevance::Dir;
        }
        if p.parent() == Some(dir) {
            r = Relevance::Files;
        }
    }
    r
}

/// The watching thread: debounce events, rescan, publish what changed.
struct Follower {
    manifests: Manifests,
    watcher: notify::RecommendedWatcher,
    events: mpsc::Receiver<notify::Result<notify::Event>>,
    shared: Arc<Mutex<Objects>>,
    tx: UnboundedSender<SourceEvent>,
    /// Identity of the directory the watch is on (None: missing, not watched).
    armed: Option<(u64, u64)>,
    /// The directory could not be read at the last rescan (warned once).
    dir_missing: bool,
}

impl Follower {
    /// Put the watch on whatever directory has the name now. Always redone on a directory
    /// event: rm + mkdir may hand out the same inode number again.
    fn rearm(&mut self) {
        let dir = self.manifests.dir.clone();
        // The old watch may already be gone with its directory.
        let _ = self.watcher.unwatch(&dir);
        let before = self.armed.take();
        match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                self.armed = dir_id(&dir);
                if self.armed != before {
                    info!(dir = %dir.display(), "manifests directory replaced; following the new one");
                }
            }
            Err(e) => debug!(dir = %dir.display(), error = %e, "manifests directory not there; waiting for it"),
        }
    }

    /// Rescan, publish if anything changed; returns when to look again, if needed.
    /// `Err`: the agent is gone.
    fn reload(&mut self) -> Result<Option<Instant>, ()> {
        let r = match self.manifests.rescan(Instant::now()) {
            Ok(r) => {
                self.dir_missing = false;
                r
            }
            Err(e) => {
                // A vanished directory is not "delete everything": keep the last state.
                if !std::mem::replace(&mut self.dir_missing, true) {
                    warn!(error = %e, "cannot read the manifests directory; keeping the previous state");
                }
                return Ok(None);
            }
        };
        self.manifests.log_new_warnings();
        if r.changed {
            let objects = self.manifests.objects();
            if let Ok(mut g) = self.shared.lock() {
                *g = objects;
            }
            self.tx.send(SourceEvent::Changed).map_err(|_| ())?;
        }
        Ok(r.retry)
    }

    fn run(mut self, mut retry_at: Option<Instant>) {
        let dir = self.manifests.dir.clone();
        // Debounce: rescan QUIET after the last event of a burst, at most MAX_DELAY after
        // its first.
        let mut burst: Option<(Instant, Instant)> = None;
        let mut rearm = false;
        let mut next_dir_check = Instant::now() + DIR_CHECK;
        loop {
            let wake = [burst.map(|(_, at)| at), retry_at].into_iter().flatten().fold(next_dir_check, Instant::min);
            let relevant = match self.events.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(Ok(ev)) => relevance(&ev, &dir),
                // Overflowed queue and the like: look at everything again.
                Ok(Err(e)) => {
                    debug!(error = %e, "watch error; rescanning");
                    Relevance::Dir
                }
                Err(mpsc::RecvTimeoutError::Timeout) => Relevance::None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let now = Instant::now();
            match relevant {
                Relevance::None => {}
                Relevance::Files | Relevance::Dir => {
                    rearm |= matches!(relevant, Relevance::Dir);
                    let first = burst.map_or(now, |(first, _)| first);
                    burst = Some((first, (now + QUIET).min(first + MAX_DELAY)));
                }
            }
            if now >= next_dir_check {
                next_dir_check = now + DIR_CHECK;
                // A replacement whose events were missed (or a watch that failed to arm).
                if dir_id(&dir) != self.armed {
                    rearm = true;
                    burst.get_or_insert((now, now));
                }
            }
            let due = burst.is_some_and(|(_, at)| at <= now) || retry_at.is_some_and(|at| at <= now);
            if due {
                if std::mem::take(&mut rearm) {
                    self.rearm();
                }
                burst = None;
                retry_at = match self.reload() {
                    Ok(retry) => retry,
                    Err(()) => return,
                };
            }
        }
    }
}

/// Load once, then follow `dir` (bursts coalesced), reporting on `tx`.
pub fn start(
    dir: PathBuf,
    node_name: String,
    tx: UnboundedSender<SourceEvent>,
) -> Result<Arc<Mutex<Objects>>, FilesError> {
    // Followed by name, so relative to where we started, not to a later cwd.
    let dir = std::path::absolute(&dir).map_err(|source| FilesError::ReadDir { path: dir.clone(), source })?;
    let meta = fs::metadata(&dir).map_err(|source| FilesError::ReadDir { path: dir.clone(), source })?;
    if !meta.is_dir() {
        return Err(FilesError::NotADirectory(dir));
    }
    let (etx, events) = mpsc::channel();
    let mut watcher =
        notify::recommended_watcher(etx).map_err(|source| FilesError::Watch { path: dir.clone(), source })?;
    // The parent tells us when the directory is replaced (its name created or moved).
    if let Some(parent) = dir.parent() {
        watcher
            .watch(parent, RecursiveMode::NonRecursive)
            .map_err(|source| FilesError::Watch { path: parent.to_path_buf(), source })?;
    }
    watcher.watch(&dir, RecursiveMode::NonRecursive).map_err(|source| FilesError::Watch { path: dir.clone(), source })?;
    let armed = dir_id(&dir);
    let shared = Arc::new(Mutex::new(Objects::default()));
    let mut follower = Follower {
        manifests: Manifests::new(dir, node_name),
        watcher,
        events,
        shared,
        tx,
        armed,
        dir_missing: false,
    };
    let shared = follower.shared.clone();
    std::thread::Builder::new()
        .name("manifests".into())
        .spawn(move || {
            // The first load completes before the source reports synced, so the first sync
            // sees the whole directory.
            let retry = match follower.reload() {
                Ok(retry) => retry,
                Err(()) => return,
            };
            for r in [Resource::Services, Resource::EndpointSlices, Resource::Node] {
                if follower.tx.send(SourceEvent::Synced(r)).is_err() {
                    return;
                }
            }
            follower.run(retry);
        })
        .map_err(FilesError::Thread)?;
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

    // --- following a directory ---------------------------------------------------------

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("ebpf-proxy-files-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
        /// Rewrite in place (same inode), as `>` or an editor without backup does.
        fn write_in_place(&self, name: &str, text: &str) {
            use std::io::Write;
            let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).open(self.path(name)).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }
        fn rename_in(&self, name: &str, text: &str) {
            let tmp = self.path(&format!(".{name}.tmp"));
            fs::write(&tmp, text).unwrap();
            fs::rename(tmp, self.path(name)).unwrap();
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn svc(name: &str, ports: &[u16]) -> String {
        let ports: Vec<String> = ports.iter().map(|p| format!("{{port: {p}}}")).collect();
        format!(
            "kind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: 10.96.0.10, ports: [{}]}}\n",
            ports.join(", ")
        )
    }

    fn names(m: &Manifests) -> Vec<String> {
        m.objects().services.iter().filter_map(|s| s.metadata.name.clone()).collect()
    }

    /// Let the timestamp tick pass, so a file just written is not "racy".
    fn tick() {
        std::thread::sleep(RACY * 2);
    }

    #[test]
    fn only_changed_files_are_read_and_same_bytes_change_nothing() {
        let d = Dir::new("reads");
        for i in 0..5 {
            d.rename_in(&format!("s{i}.yaml"), &svc(&format!("s{i}"), &[80]));
        }
        tick();
        let mut m = Manifests::new(d.0.clone(), "n".into());
        let t = Instant::now();
        assert!(m.rescan(t).unwrap().changed);
        assert_eq!(m.reads, 5);
        // Nothing changed: no reads, no change.
        assert!(!m.rescan(t).unwrap().changed);
        assert_eq!(m.reads, 5);
        // One file changes: only it is read.
        d.rename_in("s3.yaml", &svc("s3", &[80, 81]));
        tick();
        assert!(m.rescan(t).unwrap().changed);
        assert_eq!(m.reads, 6);
        // Same bytes again (a touch, a rewrite): read, but nothing to apply.
        d.rename_in("s3.yaml", &svc("s3", &[80, 81]));
        tick();
        assert!(!m.rescan(t).unwrap().changed);
        assert_eq!(m.reads, 7);
        // A removed file is a change.
        fs::remove_file(d.path("s0.yaml")).unwrap();
        assert!(m.rescan(t).unwrap().changed);
        assert_eq!(names(&m), ["s1", "s2", "s3", "s4"]);
    }

    #[test]
    fn a_file_read_within_a_timestamp_tick_is_read_again() {
        let d = Dir::new("racy");
        d.write_in_place("web.yaml", &svc("web", &[80]));
        let mut m = Manifests::new(d.0.clone(), "n".into());
        let t = Instant::now();
        let r = m.rescan(t).unwrap();
        assert_eq!(r.retry, Some(t + RACY), "just written: look again");
        tick();
        m.rescan(t + RACY).unwrap();
        assert_eq!(m.reads, 2);
        m.rescan(t + RACY).unwrap();
        assert_eq!(m.reads, 2, "settled: not read again");
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_content() {
        let d = Dir::new("parse");
        d.write_in_place("web.yaml", &svc("web", &[80]));
        let mut m = Manifests::new(d.0.clone(), "n".into());
        let t = Instant::now();
        m.rescan(t).unwrap();
        // Half-written: cut inside a flow sequence.
        let full = svc("web", &[80, 81]);
        d.write_in_place("web.yaml", &full[..full.find("ports: [").unwrap() + 10]);
        assert!(!m.rescan(t).unwrap().changed);
        assert_eq!(names(&m), ["web"]);
        let w = m.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].message.contains("keeping its previous content"), "{w:?}");
        // Completed: applied, warning gone.
        d.write_in_place("web.yaml", &full);
        assert!(m.rescan(t).unwrap().changed);
        assert_eq!(m.objects().services[0].spec.as_ref().unwrap().ports.as_ref().unwrap().len(), 2);
        assert!(m.warnings().is_empty());
    }

    #[test]
    fn objects_lost_in_place_apply_only_once_the_file_settles() {
        let d = Dir::new("settle");
        d.write_in_place("all.yaml", &format!("{}---\n{}", svc("a", &[80]), svc("b", &[80])));
        let mut m = Manifests::new(d.0.clone(), "n".into());
        let t = Instant::now();
        m.rescan(t).unwrap();
        // Truncated mid-write (valid YAML, one object short).
        d.write_in_place("all.yaml", &svc("a", &[80]));
        let r = m.rescan(t).unwrap();
        assert!(!r.changed);
        assert_eq!(r.retry, Some(t + SETTLE));
        assert_eq!(names(&m), ["a", "b"]);
        let w = m.warnings();
        assert!(w.len() == 1 && w[0].message.contains("keeping its previous content"), "{w:?}");
        // Still the same after SETTLE: a deliberate removal.
        let r = m.rescan(t + SETTLE).unwrap();
        assert!(r.changed);
        assert_eq!(names(&m), ["a"]);
        assert!(m.warnings().is_empty());
        // A renamed-in file is complete: applied at once even though it lost an object.
        d.rename_in("all.yaml", &format!("{}---\n{}", svc("a", &[80]), svc("b", &[80])));
        m.rescan(t + SETTLE).unwrap();
        d.rename_in("all.yaml", &svc("b", &[80]));
        assert!(m.rescan(t + SETTLE).unwrap().changed);
        assert_eq!(names(&m), ["b"]);
    }

    #[test]
    fn fifos_and_unreadable_entries_are_skipped_without_blocking() {
        let d = Dir::new("fifo");
        d.write_in_place("web.yaml", &svc("web", &[80]));
        let fifo = d.path("pipe.yaml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a directory entry.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        std::os::unix::fs::symlink("/nonexistent/x.yaml", d.path("dangling.yaml")).unwrap();
        fs::create_dir(d.path("sub.yaml")).unwrap();
        let mut m = Manifests::new(d.0.clone(), "n".into());
        // Runs on this thread: a blocking open of the FIFO would hang the test.
        m.rescan(Instant::now()).unwrap();
        assert_eq!(names(&m), ["web"]);
        let w: Vec<String> = m.warnings().into_iter().map(|w| format!("{}: {}", w.file.display(), w.message)).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("pipe.yaml: a FIFO, not a regular file"), "{w:?}");
        assert!(w[1].contains("sub.yaml: a directory"), "{w:?}");
    }

    #[test]
    fn reads_and_our_own_reloads_are_not_events() {
        let dir = Path::new("/m");
        let ev = |kind, path: &str| notify::Event::new(kind).add_path(PathBuf::from(path));
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let close_read = EventKind::Access(AccessKind::Close(AccessMode::Read));
        let close_write = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let modify = EventKind::Modify(notify::event::ModifyKind::Any);
        assert!(matches!(relevance(&ev(open, "/m/a.yaml"), dir), Relevance::None));
        assert!(matches!(relevance(&ev(close_read, "/m/a.yaml"), dir), Relevance::None));
        assert!(matches!(relevance(&ev(close_write, "/m/a.yaml"), dir), Relevance::Files));
        assert!(matches!(relevance(&ev(modify, "/m/a.yaml"), dir), Relevance::Files));
        // The parent's other entries are not ours; the directory's own name is.
        assert!(matches!(relevance(&ev(modify, "/other"), dir), Relevance::None));
        assert!(matches!(relevance(&ev(EventKind::Create(notify::event::CreateKind::Folder), "/m"), dir), Relevance::Dir));
    }
}
