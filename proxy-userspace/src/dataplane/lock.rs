//! One agent per bpffs root: an exclusive `flock` on the root directory itself, held for the
//! agent's lifetime. bpffs accepts no regular files, so there is no lock file; a directory
//! fd opened `O_RDONLY | O_DIRECTORY` takes `flock` like any other (checked on 6.x kernels).
//! The kernel drops the lock when the process dies, kill -9 included, so a crash leaves
//! nothing stale behind. The holder's PID comes from `/proc/locks` (flock records no owner
//! we could ask for otherwise).
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another ebpf-proxy agent{} holds the bpffs root {root}: one agent per --bpffs-root (stop it, or give this one another root)",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Held { root: PathBuf, pid: Option<u32> },
    #[error("locking {root}: {source}")]
    Io {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The exclusive lock on a bpffs root; released on drop (or process exit).
#[derive(Debug)]
pub struct RootLock {
    root: PathBuf,
    fd: OwnedFd,
}

fn open_dir(root: &Path) -> Result<OwnedFd, LockError> {
    let io_err = |source| LockError::Io { root: root.to_path_buf(), source };
    let c = CString::new(root.as_os_str().as_bytes()).map_err(|_| io_err(io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: NUL-terminated path we own; on success the fd is new and owned by nobody else.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn flock_nb(fd: &OwnedFd, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(fd.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(false) } else { Err(e) }
}

fn dev_ino_of_fd(fd: &OwnedFd) -> Option<(u64, u64)> {
    // SAFETY: `stat` is plain integers; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the struct we own; `fd` is open for as long as we borrow it.
    (unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

fn dev_ino_of_path(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// The PID holding a FLOCK on (dev, ino), from `/proc/locks`
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:22:5678 0 EOF`; device in hex major:minor).
fn holder_pid(dev: u64, ino: u64) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str())).then(|| f.get(4)?.parse().ok()).flatten()
        })
        // A holder in a PID namespace we cannot see (another container) shows as 0.
        .filter(|pid| *pid != 0)
}

impl RootLock {
    /// Lock `root` (which must exist) or say who holds it.
    pub fn acquire(root: &Path) -> Result<Self, LockError> {
        let fd = open_dir(root)?;
        if flock_nb(&fd, libc::LOCK_EX).map_err(|source| LockError::Io { root: root.to_path_buf(), source })? {
            return Ok(RootLock { root: root.to_path_buf(), fd });
        }
        let pid = dev_ino_of_fd(&fd).and_then(|(d, i)| holder_pid(d, i));
        Err(LockError::Held { root: root.to_path_buf(), pid })
    }

    /// Whether the locked directory is still the one at the root's path (not removed, or
    /// removed and re-created, which leaves the lock on a dead inode).
    pub fn still_held(&self) -> bool {
        dev_ino_of_fd(&self.fd).is_some() && dev_ino_of_fd(&self.fd) == dev_ino_of_path(&self.root)
    }

    /// Lock the directory now at the root's path (after it was re-created).
    pub fn relock(&mut self) -> Result<(), LockError> {
        *self = RootLock::acquire(&self.root)?;
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Whether some process holds the lock on `root` now (`Ok(None)` when nobody does, or the
/// root does not exist). Used by `cleanup`, which must not pull the datapath from under a
/// running agent.
pub fn holder(root: &Path) -> Result<Option<Option<u32>>, LockError> {
    if !root.exists() {
        return Ok(None);
    }
    match RootLock::acquire(root) {
        Ok(lock) => {
            drop(lock);
            Ok(None)
        }
        Err(LockError::Held { pid, .. }) => Ok(Some(pid)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_a_directory_is_refused_with_the_holder_pid() {
        let dir = std::env::temp_dir().join(format!("ebpf-proxy-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = RootLock::acquire(&dir).unwrap();
        assert!(first.still_held());
        // flock locks belong to the open file description: a second open in the same
        // process conflicts just like another process would.
        let e = RootLock::acquire(&dir).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(matches!(e, LockError::Held { pid: Some(p), .. } if p == std::process::id()), "{e:?}");
        assert_eq!(holder(&dir).unwrap(), Some(Some(std::process::id())));
        drop(first);
        assert_eq!(holder(&dir).unwrap(), None);
        let again = RootLock::acquire(&dir).unwrap();
        // Removing and re-creating the directory leaves the lock on the old inode.
        std::fs::remove_dir(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        assert!(!again.still_held());
        let mut again = again;
        again.relock().unwrap();
        assert!(again.still_held());
        drop(again);
        let _ = std::fs::remove_dir(&dir);
    }
}
