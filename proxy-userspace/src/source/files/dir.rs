//! The manifests directory as files of parsed objects: each file is re-read only when its
//! `stat` changed, applied only when its bytes changed, and keeps its last good content
//! while it does not parse or while it shrinks in place.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    hash::{DefaultHasher, Hasher},
    io::Read,
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use tracing::debug;

use super::{DocWarning, FilesError, is_manifest, parse_documents};
use crate::source::Objects;

/// After the last event of a burst, wait this long for more before rescanning (editors and
/// `cp` write in several steps).
pub(super) const QUIET: Duration = Duration::from_millis(50);
/// A file rewritten in place that lost objects or bytes must stay unchanged this long
/// before it is applied: long enough for a writer between two `write`s, short enough that
/// a deliberate deletion is followed quickly.
const SETTLE: Duration = Duration::from_millis(300);
/// File timestamps advance in kernel ticks (up to 10 ms): a file modified this recently
/// could change again with an identical `stat`, so it is read once more a little later
/// (git's "racy clean" problem).
const RACY: Duration = Duration::from_millis(20);

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

/// "Service ns/name", "EndpointSlice ns/name", "Node name", "ServiceCIDR name": what a file
/// defines.
fn identities(o: &Objects) -> BTreeSet<(&'static str, String, String)> {
    let id = |kind, m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (kind, m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
    };
    let mut ids: BTreeSet<_> = o.services.iter().map(|s| id("Service", &s.metadata)).collect();
    ids.extend(o.slices.iter().map(|s| id("EndpointSlice", &s.metadata)));
    ids.extend(o.node.iter().map(|n| id("Node", &n.metadata)));
    ids.extend(o.service_cidrs.iter().map(|c| id("ServiceCIDR", &c.metadata)));
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
pub(super) struct Refresh {
    pub(super) changed: bool,
    /// Look again at this time (a version waiting to settle, or read while changing).
    pub(super) retry: Option<Instant>,
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
pub(super) struct Manifests {
    pub(super) dir: PathBuf,
    node_name: String,
    files: BTreeMap<PathBuf, FileState>,
    /// Warnings logged and still true (each is logged once, when it appears).
    logged: BTreeSet<(PathBuf, Option<usize>, String)>,
    /// Files read so far (each read is of a file whose `stat` changed).
    reads: u64,
}

impl Manifests {
    pub(super) fn new(dir: PathBuf, node_name: String) -> Self {
        Manifests { dir, node_name, files: BTreeMap::new(), logged: BTreeSet::new(), reads: 0 }
    }

    /// Look at every entry again; read only those whose `stat` changed. `changed`: the
    /// objects in use are different now.
    pub(super) fn rescan(&mut self, now: Instant) -> Result<Refresh, FilesError> {
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
        *state = FileState {
            accepted: Some(stamp),
            hash,
            objects,
            doc_warnings: warnings,
            rejected: None,
            pending: None,
            racy,
        };
        Refresh { changed, retry: recheck }
    }

    /// Everything in use, in file-name order (shared with the files' own lists).
    pub(super) fn objects(&self) -> Objects {
        let mut out = Objects::default();
        for f in self.files.values() {
            out.services.extend(f.objects.services.iter().cloned());
            out.slices.extend(f.objects.slices.iter().cloned());
            out.service_cidrs.extend(f.objects.service_cidrs.iter().cloned());
            if f.objects.node.is_some() {
                out.node.clone_from(&f.objects.node);
            }
        }
        out
    }

    pub(super) fn warnings(&self) -> Vec<DocWarning> {
        self.files.iter().flat_map(|(path, f)| f.warnings(path)).collect()
    }

    /// Log the warnings that appeared since the last call.
    pub(super) fn log_new_warnings(&mut self) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
