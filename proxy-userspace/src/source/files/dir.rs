//! The manifests directory as files of object keys: each file is re-read only when its
//! `stat` changed and applied only when its bytes changed; of a changed file, only the
//! objects whose content changed are handed on. A file keeps its last good content (its
//! objects stay in use) while it does not parse or while it shrinks in place.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs,
    hash::{DefaultHasher, Hasher},
    io::Read,
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tracing::debug;

use super::{Doc, DocWarning, FilesError, Id, Parsed, delete, is_manifest, parse_documents};
use crate::source::Update;

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
/// The content hash kept for an object whose definition in use is another file's: when
/// this file's comes back into use, it differs from any content and is applied.
const NOT_IN_USE: u64 = 0;

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

/// What is known about one manifest file.
#[derive(Default)]
struct FileState {
    /// The version whose objects are in use (None: no version accepted yet).
    accepted: Option<Stamp>,
    /// Hash of the accepted bytes: a `touch` or a rewrite with the same bytes changes nothing.
    hash: u64,
    /// The objects of the accepted version, in document order, each with a hash of its
    /// content (`NOT_IN_USE` while another file's definition of it is in use). The parsed
    /// objects themselves are handed on, not kept.
    objects: Vec<(Id, u64)>,
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
    /// Changes were handed on.
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

/// Where a rescan hands its changes: one file's at a time, so that only one file's parsed
/// objects exist at once.
pub(super) type Sink<'a> = &'a mut dyn FnMut(Vec<Update>);

/// Every manifest of a directory: which objects each file defines.
pub(super) struct Manifests {
    pub(super) dir: PathBuf,
    node_name: String,
    files: BTreeMap<Arc<Path>, FileState>,
    /// The files defining each object, in file-name order: the last one's definition is in
    /// use (one object per name, as in the API).
    owners: HashMap<Id, Vec<Arc<Path>>>,
    /// Files to read again whatever their `stat` says: an object they define came back
    /// into use, and only its file has it.
    reread: BTreeSet<Arc<Path>>,
    /// Warnings logged and still true (each is logged once, when it appears).
    logged: BTreeSet<(PathBuf, Option<usize>, String)>,
    /// Files read so far (each read is of a file whose `stat` changed).
    reads: u64,
}

impl Manifests {
    pub(super) fn new(dir: PathBuf, node_name: String) -> Self {
        Manifests {
            dir,
            node_name,
            files: BTreeMap::new(),
            owners: HashMap::new(),
            reread: BTreeSet::new(),
            logged: BTreeSet::new(),
            reads: 0,
        }
    }

    /// Look at every entry again; read only those whose `stat` changed, and hand what
    /// changed to `sink`, file by file in file-name order.
    pub(super) fn rescan(&mut self, now: Instant, sink: Sink<'_>) -> Result<Refresh, FilesError> {
        let rd = fs::read_dir(&self.dir).map_err(|source| FilesError::ReadDir { path: self.dir.clone(), source })?;
        let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| is_manifest(p)).collect();
        entries.sort();
        let mut out = Refresh::default();
        let mut present = BTreeSet::new();
        for path in entries {
            // `stat` follows symlinks (ConfigMap volumes are symlinks into `..data`) and
            // never opens the file, so it cannot block on a FIFO. A file gone between
            // listing and `stat` is simply gone.
            let meta = match fs::metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                meta => meta,
            };
            let path = match self.files.get_key_value(path.as_path()) {
                Some((known, _)) => known.clone(),
                None => Arc::from(path),
            };
            let mut updates = Vec::new();
            out.merge(self.refresh_file(&path, meta, now, &mut updates));
            hand_on(updates, &mut out, sink);
            present.insert(path);
        }
        let mut updates = Vec::new();
        let removed: Vec<Arc<Path>> = self.files.keys().filter(|p| !present.contains(*p)).cloned().collect();
        for p in removed {
            if let Some(f) = self.files.remove(&p) {
                for (id, _) in f.objects {
                    self.disown(&p, id, &mut updates);
                }
            }
        }
        // Objects whose later definition went: the earlier one comes back into use.
        while let Some(p) = self.reread.first().cloned() {
            match fs::metadata(&p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.reread.remove(&p);
                }
                meta => out.merge(self.refresh_file(&p, meta, now, &mut updates)),
            }
        }
        hand_on(updates, &mut out, sink);
        Ok(out)
    }

    /// Look at one file; its changes, if any, into `updates`.
    fn refresh_file(
        &mut self,
        path: &Arc<Path>,
        meta: std::io::Result<fs::Metadata>,
        now: Instant,
        updates: &mut Vec<Update>,
    ) -> Refresh {
        let force = self.reread.remove(path);
        let mut state = self.files.remove(path).unwrap_or_default();
        let (r, docs) = state.refresh(path, meta, now, force, &self.node_name, &mut self.reads);
        if let Some(docs) = docs {
            self.accept(path, &mut state, docs, updates);
        }
        self.files.insert(path.clone(), state);
        r
    }

    /// `docs` are now `path`'s objects: hand on those in use whose content changed, and
    /// what the file no longer defines.
    fn accept(&mut self, path: &Arc<Path>, state: &mut FileState, docs: Vec<Doc>, updates: &mut Vec<Update>) {
        let old: HashMap<Id, u64> = std::mem::take(&mut state.objects).into_iter().collect();
        let defined: HashSet<&Id> = docs.iter().map(|d| &d.id).collect();
        let gone: Vec<Id> = old.keys().filter(|id| !defined.contains(id)).cloned().collect();
        for id in gone {
            self.disown(path, id, updates);
        }
        state.objects.reserve(docs.len());
        for Doc { id, hash, object } in docs {
            let owners = self.owners.entry(id.clone()).or_default();
            if let Err(at) = owners.binary_search(path) {
                owners.insert(at, path.clone());
            }
            let hash = if owners.last() == Some(path) {
                if old.get(&id) != Some(&hash) {
                    updates.push(object.apply());
                }
                hash
            } else {
                // A later file's definition is in use.
                NOT_IN_USE
            };
            state.objects.push((id, hash));
        }
    }

    /// `path` no longer defines `id`: deleted when no file does; when its definition was
    /// the one in use, the next file's comes back (that file is read again).
    fn disown(&mut self, path: &Arc<Path>, id: Id, updates: &mut Vec<Update>) {
        let Some(owners) = self.owners.get_mut(&id) else { return };
        let was_in_use = owners.last() == Some(path);
        owners.retain(|p| p != path);
        match owners.last() {
            None => {
                self.owners.remove(&id);
                updates.push(delete(id));
            }
            Some(next) if was_in_use => {
                let next = next.clone();
                if let Some(f) = self.files.get_mut(&next) {
                    for (i, h) in &mut f.objects {
                        if *i == id {
                            *h = NOT_IN_USE;
                        }
                    }
                }
                self.reread.insert(next);
            }
            Some(_) => {}
        }
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

fn hand_on(updates: Vec<Update>, out: &mut Refresh, sink: Sink<'_>) {
    if !updates.is_empty() {
        out.changed = true;
        sink(updates);
    }
}

impl FileState {
    /// Look at this file's `stat` and, when it changed (or `force`), read and parse it:
    /// the objects to accept, when this version is to be used.
    fn refresh(
        &mut self,
        path: &Path,
        meta: std::io::Result<fs::Metadata>,
        now: Instant,
        force: bool,
        node_name: &str,
        reads: &mut u64,
    ) -> (Refresh, Option<Vec<Doc>>) {
        let meta = match meta {
            Ok(m) if m.file_type().is_file() => m,
            Ok(m) => {
                return (self.reject(None, path, format!("{}, not a regular file: skipped", file_type_name(&m))), None);
            }
            Err(e) => {
                return (self.reject(None, path, format!("cannot stat: {e}; keeping its previous content")), None);
            }
        };
        let stamp = Stamp::of(&meta);
        if let Some((p, since)) = self.pending {
            if p != stamp {
                self.pending = None;
            } else if now < since + SETTLE {
                return (Refresh::retry(since + SETTLE), None);
            }
        }
        let rejected = self.rejected.as_ref().and_then(|(s, _)| *s);
        if !force && self.pending.is_none() && !self.racy && (self.accepted == Some(stamp) || rejected == Some(stamp)) {
            return (Refresh::default(), None);
        }
        let modified = meta.modified().ok();
        self.racy = modified.and_then(|m| SystemTime::now().duration_since(m).ok()).is_none_or(|age| age < RACY);
        // Look once more when the timestamp tick is surely over.
        let recheck = Refresh { changed: false, retry: if self.racy { Some(now + RACY) } else { None } };
        *reads += 1;
        let bytes = match read_regular(path) {
            Ok(Content::Bytes(b, after)) if after == stamp => b,
            // Written to while we read it: look again when the writer is quiet.
            Ok(Content::Bytes(..)) => return (Refresh::retry(now + QUIET), None),
            Ok(Content::NotRegular(m)) => {
                let message = format!("{}, not a regular file: skipped", file_type_name(&m));
                return (self.reject(Some(stamp), path, message), None);
            }
            Err(e) => {
                let message = format!("unreadable: {e}; keeping its previous content");
                return (self.reject(Some(stamp), path, message), None);
            }
        };
        let mut h = DefaultHasher::new();
        h.write(&bytes);
        let hash = h.finish();
        if !force && self.accepted.is_some() && self.hash == hash {
            // Same bytes: a `touch`, or the file back to the content in use.
            self.accepted = Some(stamp);
            self.rejected = None;
            self.pending = None;
            return (recheck, None);
        }
        let mut parsed = Parsed::default();
        match String::from_utf8(bytes) {
            Ok(text) => parse_documents(path, &text, node_name, &mut parsed),
            Err(e) => parsed.errors.push(DocWarning::file(path, format!("not UTF-8: {e}"))),
        }
        let Parsed { docs, errors, nameless } = parsed;
        if let Some(accepted) = self.accepted {
            if let Some(first) = errors.first() {
                // It was good before: keep that until the file parses again.
                let doc = first.doc.map(|d| format!("document {d}: ")).unwrap_or_default();
                let message = format!(
                    "does not parse ({doc}{}); keeping its previous content until it does (update files by atomic rename)",
                    first.message
                );
                self.reject(Some(stamp), path, message);
                return (recheck, None);
            }
            // Rewritten in place and lost something: a writer may be half-way. Apply only
            // once the file has stayed unchanged for SETTLE. A new inode (renamed into
            // place) is complete, and applies at once.
            let defined: HashSet<&Id> = docs.iter().map(|d| &d.id).collect();
            let lost = stamp.len < accepted.len || self.objects.iter().any(|(id, _)| !defined.contains(id));
            if lost && stamp.same_file(&accepted) {
                match self.pending {
                    Some((p, since)) if p == stamp && now >= since + SETTLE => {}
                    _ => {
                        debug!(file = %path.display(), "file shrank in place; waiting for it to settle");
                        self.pending = Some((stamp, now));
                        return (Refresh::retry(now + SETTLE), None);
                    }
                }
            }
        }
        // First sight uses whatever parses (each bad document has its warning).
        self.accepted = Some(stamp);
        self.hash = hash;
        self.doc_warnings = errors.into_iter().chain(nameless).collect();
        self.doc_warnings.sort_by_key(|w| w.doc);
        self.rejected = None;
        self.pending = None;
        (recheck, Some(docs))
    }

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
    use k8s_openapi::api::core::v1::Service;

    use super::{
        super::{Kind, Object},
        *,
    };

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

    /// What the agent makes of the changes handed on: every object in use, by kind and
    /// key, and how many changes came.
    #[derive(Default)]
    struct Agent {
        objects: BTreeMap<Id, Object>,
        applied: usize,
    }

    impl Agent {
        fn take(&mut self, updates: Vec<Update>) {
            use crate::source::Delta::{Apply, Delete};
            for u in updates {
                let (id, object) = match u {
                    Update::Services(Apply(s)) => (svc_id(&s), Some(Object::Service(s))),
                    Update::Services(Delete(k)) => ((Kind::Service, k), None),
                    Update::ServiceCidrs(Apply(c)) => (
                        (Kind::ServiceCidr, (String::new(), c.metadata.name.clone().unwrap())),
                        Some(Object::ServiceCidr(c)),
                    ),
                    Update::ServiceCidrs(Delete(k)) => ((Kind::ServiceCidr, k), None),
                    other => panic!("not expected here: {other:?}"),
                };
                match object {
                    Some(o) => {
                        self.applied += 1;
                        self.objects.insert(id, o);
                    }
                    None => assert!(self.objects.remove(&id).is_some(), "{id:?} deleted but not in use"),
                }
            }
        }

        fn names(&self) -> Vec<String> {
            self.objects.keys().filter(|(k, _)| *k == Kind::Service).map(|(_, (_, name))| name.clone()).collect()
        }

        fn service(&self, name: &str) -> &Service {
            match &self.objects[&(Kind::Service, ("default".to_string(), name.to_string()))] {
                Object::Service(s) => s,
                _ => unreachable!(),
            }
        }
    }

    fn svc_id(s: &Service) -> Id {
        (Kind::Service, crate::model::object_key(&s.metadata).unwrap())
    }

    fn rescan(m: &mut Manifests, agent: &mut Agent, now: Instant) -> Refresh {
        m.rescan(now, &mut |u| agent.take(u)).unwrap()
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
        let mut a = Agent::default();
        let t = Instant::now();
        assert!(rescan(&mut m, &mut a, t).changed);
        assert_eq!(m.reads, 5);
        // Nothing changed: no reads, no change.
        assert!(!rescan(&mut m, &mut a, t).changed);
        assert_eq!(m.reads, 5);
        // One file changes: only it is read.
        d.rename_in("s3.yaml", &svc("s3", &[80, 81]));
        tick();
        assert!(rescan(&mut m, &mut a, t).changed);
        assert_eq!(m.reads, 6);
        // Same bytes again (a touch, a rewrite): read, but nothing to apply.
        d.rename_in("s3.yaml", &svc("s3", &[80, 81]));
        tick();
        assert!(!rescan(&mut m, &mut a, t).changed);
        assert_eq!(m.reads, 7);
        // A removed file is a change.
        fs::remove_file(d.path("s0.yaml")).unwrap();
        assert!(rescan(&mut m, &mut a, t).changed);
        assert_eq!(a.names(), ["s1", "s2", "s3", "s4"]);
    }

    #[test]
    fn a_file_read_within_a_timestamp_tick_is_read_again() {
        let d = Dir::new("racy");
        d.write_in_place("web.yaml", &svc("web", &[80]));
        let mut m = Manifests::new(d.0.clone(), "n".into());
        let mut a = Agent::default();
        let t = Instant::now();
        let r = rescan(&mut m, &mut a, t);
        assert_eq!(r.retry, Some(t + RACY), "just written: look again");
        tick();
        rescan(&mut m, &mut a, t + RACY);
        assert_eq!(m.reads, 2);
        rescan(&mut m, &mut a, t + RACY);
        assert_eq!(m.reads, 2, "settled: not read again");
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_content() {
        let d = Dir::new("parse");
        d.write_in_place("web.yaml", &svc("web", &[80]));
        let mut m = Manifests::new(d.0.clone(), "n".into());
        let mut a = Agent::default();
        let t = Instant::now();
        rescan(&mut m, &mut a, t);
        // Half-written: cut inside a flow sequence.
        let full = svc("web", &[80, 81]);
        d.write_in_place("web.yaml", &full[..full.find("ports: [").unwrap() + 10]);
        assert!(!rescan(&mut m, &mut a, t).changed);
        assert_eq!(a.names(), ["web"]);
        let w = m.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].message.contains("keeping its previous content"), "{w:?}");
        // Completed: applied, warning gone.
        d.write_in_place("web.yaml", &full);
        assert!(rescan(&mut m, &mut a, t).changed);
        assert_eq!(a.service("web").spec.as_ref().unwrap().ports.as_ref().unwrap().len(), 2);
        assert!(m.warnings().is_empty());
    }

    #[test]
    fn objects_lost_in_place_apply_only_once_the_file_settles() {
        let d = Dir::new("settle");
        d.write_in_place("all.yaml", &format!("{}---\n{}", svc("a", &[80]), svc("b", &[80])));
        let mut m = Manifests::new(d.0.clone(), "n".into());
        let mut a = Agent::default();
        let t = Instant::now();
        rescan(&mut m, &mut a, t);
        // Truncated mid-write (valid YAML, one object short).
        d.write_in_place("all.yaml", &svc("a", &[80]));
        let r = rescan(&mut m, &mut a, t);
        assert!(!r.changed);
        assert_eq!(r.retry, Some(t + SETTLE));
        assert_eq!(a.names(), ["a", "b"]);
        let w = m.warnings();
        assert!(w.len() == 1 && w[0].message.contains("keeping its previous content"), "{w:?}");
        // Still the same after SETTLE: a deliberate removal.
        let r = rescan(&mut m, &mut a, t + SETTLE);
        assert!(r.changed);
        assert_eq!(a.names(), ["a"]);
        assert!(m.warnings().is_empty());
        // A renamed-in file is complete: applied at once even though it lost an object.
        d.rename_in("all.yaml", &format!("{}---\n{}", svc("a", &[80]), svc("b", &[80])));
        rescan(&mut m, &mut a, t + SETTLE);
        d.rename_in("all.yaml", &svc("b", &[80]));
        assert!(rescan(&mut m, &mut a, t + SETTLE).changed);
        assert_eq!(a.names(), ["b"]);
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
        let mut a = Agent::default();
        // Runs on this thread: a blocking open of the FIFO would hang the test.
        rescan(&mut m, &mut a, Instant::now());
        assert_eq!(a.names(), ["web"]);
        let w: Vec<String> = m.warnings().into_iter().map(|w| format!("{}: {}", w.file.display(), w.message)).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("pipe.yaml: a FIFO, not a regular file"), "{w:?}");
        assert!(w[1].contains("sub.yaml: a directory"), "{w:?}");
    }

    fn ports(a: &Agent, name: &str) -> Vec<i32> {
        a.service(name).spec.as_ref().unwrap().ports.as_ref().unwrap().iter().map(|p| p.port).collect()
    }

    /// Of a changed file, only the objects whose content changed are handed on: a comment
    /// or a reordering hands on nothing, one edited Service hands on that one.
    #[test]
    fn only_changed_objects_of_a_changed_file_are_handed_on() {
        let d = Dir::new("objects");
        let (x, y) = (svc("x", &[80]), svc("y", &[80]));
        d.rename_in("all.yaml", &format!("{x}---\n{y}"));
        let mut m = Manifests::new(d.0.clone(), "n".into());
        let mut a = Agent::default();
        let t = Instant::now();
        rescan(&mut m, &mut a, t);
        assert_eq!(a.applied, 2);
        d.rename_in("all.yaml", &format!("# reordered\n{y}---\n{x}"));
        assert!(!rescan(&mut m, &mut a, t).changed, "the same objects: nothing to hand on");
        assert_eq!(m.reads, 2, "read, since its bytes changed");
        d.rename_in("all.yaml", &format!("{x}---\n{}", svc("y", &[80, 443])));
        assert!(rescan(&mut m, &mut a, t).changed);
        assert_eq!(a.applied, 3, "only y");
        assert_eq!(ports(&a, "y"), [80, 443]);
    }

    /// The same Service in two files: the later file's is in use; while shadowed, the
    /// earlier one's edits are not handed on; when the later file drops it, the earlier
    /// one's comes back (its file read again, though unchanged); when no file has it, it
    /// is deleted.
    #[test]
    fn the_later_file_wins_and_the_earlier_comes_back() {
        let d = Dir::new("owners");
        d.rename_in("1.yaml", &svc("web", &[80]));
        d.rename_in("2.yaml", &svc("web", &[81]));
        tick();
        let mut m = Manifests::new(d.0.clone(), "n".into());
        let mut a = Agent::default();
        let t = Instant::now();
        rescan(&mut m, &mut a, t);
        assert_eq!(ports(&a, "web"), [81]);
        d.rename_in("1.yaml", &svc("web", &[82]));
        tick();
        assert!(!rescan(&mut m, &mut a, t).changed, "shadowed: nothing to hand on");
        assert_eq!(ports(&a, "web"), [81]);
        let reads = m.reads;
        d.rename_in("2.yaml", &svc("other", &[80]));
        tick();
        assert!(rescan(&mut m, &mut a, t).changed);
        assert_eq!(ports(&a, "web"), [82], "the earlier file's definition is back");
        assert_eq!(m.reads, reads + 2, "2.yaml changed, 1.yaml read again to bring web back");
        assert_eq!(a.names(), ["other", "web"]);
        // The later file gone entirely: its objects go, the earlier file's stay.
        d.rename_in("2.yaml", &svc("web", &[83]));
        tick();
        rescan(&mut m, &mut a, t);
        assert_eq!(ports(&a, "web"), [83]);
        fs::remove_file(d.path("2.yaml")).unwrap();
        rescan(&mut m, &mut a, t);
        assert_eq!(ports(&a, "web"), [82]);
        fs::remove_file(d.path("1.yaml")).unwrap();
        rescan(&mut m, &mut a, t);
        assert!(a.objects.is_empty(), "no file defines it: deleted");
        assert!(m.owners.is_empty());
    }

    /// ServiceCIDRs (cluster-scoped: no namespace) are handed on like the other kinds:
    /// applied once, not again while unchanged, deleted as ("", name) when they go.
    #[test]
    fn service_cidrs_are_applied_once_and_deleted_by_name() {
        let d = Dir::new("cidrs");
        let cidr = "kind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [10.96.0.0/16]}\n";
        d.rename_in("cidr.yaml", cidr);
        let mut m = Manifests::new(d.0.clone(), "n".into());
        let mut a = Agent::default();
        let t = Instant::now();
        rescan(&mut m, &mut a, t);
        let id = (Kind::ServiceCidr, (String::new(), "kubernetes".to_string()));
        assert!(a.objects.contains_key(&id));
        d.rename_in("cidr.yaml", &format!("# same object\n{cidr}"));
        assert!(!rescan(&mut m, &mut a, t).changed);
        assert_eq!(a.applied, 1);
        fs::remove_file(d.path("cidr.yaml")).unwrap();
        assert!(rescan(&mut m, &mut a, t).changed);
        assert!(a.objects.is_empty());
    }

    /// An object without a namespace is said and skipped; it does not keep its file from
    /// being used, nor does it count as the file no longer parsing.
    #[test]
    fn nameless_objects_are_skipped_with_a_warning() {
        let d = Dir::new("nameless");
        let nameless = "kind: Service\nmetadata: {name: lost}\nspec: {ports: [{port: 80}]}\n";
        d.rename_in("web.yaml", &svc("web", &[80]));
        let mut m = Manifests::new(d.0.clone(), "n".into());
        let mut a = Agent::default();
        let t = Instant::now();
        rescan(&mut m, &mut a, t);
        d.rename_in("web.yaml", &format!("{}---\n{nameless}", svc("web", &[81])));
        assert!(rescan(&mut m, &mut a, t).changed);
        assert_eq!(a.names(), ["web"]);
        assert_eq!(ports(&a, "web"), [81]);
        let w = m.warnings();
        assert!(w.len() == 1 && w[0].doc == Some(1) && w[0].message.contains("is missing, skipped"), "{w:?}");
    }
}
