//! Following the directory: a thread that debounces inotify events, rescans, and
//! publishes what changed; it follows the directory by name when it is replaced.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode, ModifyKind, RenameMode},
};
use tokio::sync::mpsc::Sender;
use tracing::{debug, info, warn};

use super::{
    FilesError,
    dir::{Manifests, QUIET},
    is_manifest,
};
use crate::source::{Resource, SourceEvent};

/// ...but rescan at most this long after the first event, even if events keep coming.
const MAX_DELAY: Duration = Duration::from_millis(500);
/// How often the directory's identity is checked, in case its replacement was missed.
const DIR_CHECK: Duration = Duration::from_secs(1);

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
    /// A manifest was renamed into place: complete by construction (the atomic way to
    /// update), so nothing is worth waiting for.
    RenamedIn,
}

fn relevance(ev: &notify::Event, dir: &Path) -> Relevance {
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return Relevance::None,
        // inotify's "moved from" and "moved to" also arrive as events of their own: the
        // pair adds nothing (and would start a second burst).
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => return Relevance::None,
        EventKind::Modify(ModifyKind::Name(RenameMode::To))
            if ev.paths.iter().any(|p| p.parent() == Some(dir) && is_manifest(p)) =>
        {
            return Relevance::RenamedIn;
        }
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
    tx: Sender<SourceEvent>,
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

    /// Rescan, hand on what changed (each file's changes as they are found, then
    /// `Changed`); returns when to look again, if needed. `Err`: the agent is gone.
    fn reload(&mut self) -> Result<Option<Instant>, ()> {
        let tx = &self.tx;
        let mut gone = false;
        // Blocks while the agent's queue is full: a directory read at start is parsed no
        // faster than the translation takes it in.
        let mut sink = |updates| gone |= tx.blocking_send(SourceEvent::Files(updates)).is_err();
        let r = match self.manifests.rescan(Instant::now(), &mut sink) {
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
        if gone || (r.changed && self.tx.blocking_send(SourceEvent::Changed).is_err()) {
            return Err(());
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
            rearm |= matches!(relevant, Relevance::Dir);
            burst = schedule(burst, &relevant, now);
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

/// The burst (its first event, when it is due) after an event: in-place writes wait QUIET
/// after the last event (at most MAX_DELAY after the first); a rename into place is due at
/// once, and takes whatever else the burst holds with it (a half-written file in place is
/// kept at its previous content by the rescan's own rules, so going early is safe).
fn schedule(burst: Option<(Instant, Instant)>, relevant: &Relevance, now: Instant) -> Option<(Instant, Instant)> {
    let first = burst.map_or(now, |(first, _)| first);
    match relevant {
        Relevance::None => burst,
        Relevance::Files | Relevance::Dir => Some((first, (now + QUIET).min(first + MAX_DELAY))),
        Relevance::RenamedIn => Some((first, now)),
    }
}

/// Load once, then follow `dir` (bursts coalesced), reporting on `tx`.
pub fn start(dir: PathBuf, node_name: String, tx: Sender<SourceEvent>) -> Result<(), FilesError> {
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
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| FilesError::Watch { path: dir.clone(), source })?;
    let armed = dir_id(&dir);
    let mut follower =
        Follower { manifests: Manifests::new(dir, node_name), watcher, events, tx, armed, dir_missing: false };
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
                if follower.tx.blocking_send(SourceEvent::Synced(r)).is_err() {
                    return;
                }
            }
            follower.run(retry);
        })
        .map_err(FilesError::Thread)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(matches!(
            relevance(&ev(EventKind::Create(notify::event::CreateKind::Folder), "/m"), dir),
            Relevance::Dir
        ));
    }

    /// A rename into place (the atomic update) is rescanned at once; writes in place still
    /// wait for the writer to be quiet.
    #[test]
    fn a_rename_into_place_is_due_at_once_in_place_writes_wait() {
        let dir = Path::new("/m");
        let ev =
            |kind, paths: &[&str]| paths.iter().fold(notify::Event::new(kind), |e, p| e.add_path(PathBuf::from(p)));
        let moved_to = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        let moved_from = EventKind::Modify(ModifyKind::Name(RenameMode::From));
        let both = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let write = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(matches!(relevance(&ev(moved_to, &["/m/a.yaml"]), dir), Relevance::RenamedIn));
        // A temporary name that is not a manifest, the pair event, the directory itself.
        assert!(matches!(relevance(&ev(moved_to, &["/m/a.yaml.tmp"]), dir), Relevance::Files));
        assert!(matches!(relevance(&ev(both, &["/m/.a.tmp", "/m/a.yaml"]), dir), Relevance::None));
        assert!(matches!(relevance(&ev(moved_from, &["/m/a.yaml"]), dir), Relevance::Files));
        assert!(matches!(relevance(&ev(moved_to, &["/m"]), dir), Relevance::Dir));

        let t = Instant::now();
        // Writing the temporary file starts a burst that waits QUIET...
        let b = schedule(None, &relevance(&ev(write, &["/m/a.yaml.tmp"]), dir), t);
        assert_eq!(b, Some((t, t + QUIET)));
        // ...its rename into place makes it due now.
        let later = t + Duration::from_millis(1);
        assert_eq!(schedule(b, &relevance(&ev(moved_to, &["/m/a.yaml"]), dir), later), Some((t, later)));
        // Alone, too.
        assert_eq!(schedule(None, &Relevance::RenamedIn, t), Some((t, t)));
        // An in-place write still waits, within MAX_DELAY of the burst's first event.
        let late = t + MAX_DELAY - Duration::from_millis(10);
        assert_eq!(schedule(b, &Relevance::Files, late), Some((t, t + MAX_DELAY)));
        assert_eq!(schedule(b, &Relevance::None, late), b);
    }
}
