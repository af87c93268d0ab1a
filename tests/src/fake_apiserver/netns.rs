//! Binding a listener inside a named network namespace.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use nix::sched::{CloneFlags, setns};

/// Binds a TCP listener inside the network namespace `netns_name`
/// (`/var/run/netns/<name>`, as made by `ip netns add`; an absolute path to
/// any netns file also works).
///
/// A socket belongs to the network namespace it was created in for its whole
/// life, whatever thread later uses it. So a short-lived helper thread enters
/// the namespace (`setns` only moves that one thread), binds, and hands the
/// listener back; the fake apiserver can then run on the caller's runtime, in
/// the caller's namespace, while accepting connections that arrive on
/// `addr` inside `netns_name` (e.g. from an agent started with `ip netns exec`).
///
/// Needs CAP_SYS_ADMIN (root) for `setns`.
pub fn bind_in_netns(netns_name: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let path = if netns_name.starts_with('/') {
        PathBuf::from(netns_name)
    } else {
        PathBuf::from("/var/run/netns").join(netns_name)
    };
    let ns = File::open(&path)?;
    std::thread::Builder::new()
        .name(format!("bind-in-{netns_name}"))
        .spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            TcpListener::bind(addr)
        })?
        .join()
        .map_err(|_| std::io::Error::other("netns bind thread panicked"))?
}
