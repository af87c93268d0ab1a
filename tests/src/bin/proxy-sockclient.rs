//! Test client for socket-level load balancing: a process of its own that first moves
//! itself into a cgroup (`--cgroup`, the test's child cgroup: the cgroup hooks see only
//! sockets created by processes inside it) and into a network namespace (`--netns`), then
//! answers commands on stdin, one line each, with one line on stdout:
//!
//! - `tcp A:P`   connect, read the server's name: `ok NAME PEER` (PEER from getpeername)
//! - `udp A:P`   unconnected socket, send_to + recv_from: `ok NAME FROM`
//! - `uconn A:P` open a connected UDP socket (kept) and ask once: `ok NAME PEER`
//! - `uask`      ask again on the kept connected UDP socket: `ok NAME PEER`
//! - `usend A:P N` one unconnected socket that was never bound (the kernel binds it on
//!   the first send), N times send_to + recv_from: `ok NAME,NAME,... FROM` (the last
//!   reply's source)
//! - `ukeep A:P N` the same on one unconnected socket kept across commands (made, never
//!   bound, on the first `ukeep`)
//! - `loop A:P MS` TCP connections for MS milliseconds (at most 30 s): `ok SUCCEEDED FAILED`
//!
//! Failures answer `err ERRNO MESSAGE` (ERRNO 0 when there is none).
use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsFd,
    time::{Duration, Instant},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn err(e: &std::io::Error) -> String {
    format!("err {} {e}", e.raw_os_error().unwrap_or(0))
}

fn tcp(addr: SocketAddr) -> Result<String, std::io::Error> {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let peer = s.peer_addr()?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok(format!("ok {} {peer}", line.trim()))
}

/// The unspecified address of `addr`'s family, port 0.
fn any(addr: SocketAddr) -> &'static str {
    if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
}

fn udp(addr: SocketAddr) -> Result<String, std::io::Error> {
    let s = UdpSocket::bind(any(addr))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.send_to(b"who", addr)?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok(format!("ok {} {from}", String::from_utf8_lossy(&buf[..n])))
}

/// A UDP socket of `addr`'s family that is not bound (the kernel binds it on the first send).
fn unbound(addr: SocketAddr) -> Result<UdpSocket, std::io::Error> {
    let domain = socket2::Domain::for_address(addr);
    let s: UdpSocket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?.into();
    s.set_read_timeout(Some(TIMEOUT))?;
    Ok(s)
}

/// `usend`/`ukeep`: N datagrams from `s` to `addr`, each answered before the next.
fn usend(s: &UdpSocket, addr: SocketAddr, n: usize) -> Result<String, std::io::Error> {
    let mut names = Vec::with_capacity(n);
    let mut last = addr;
    let mut buf = [0u8; 256];
    for _ in 0..n {
        s.send_to(b"who", addr)?;
        let (len, from) = s.recv_from(&mut buf)?;
        names.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        last = from;
    }
    Ok(format!("ok {} {last}", names.join(",")))
}

fn ask(s: &UdpSocket) -> Result<String, std::io::Error> {
    s.send(b"who")?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf)?;
    Ok(format!("ok {} {}", String::from_utf8_lossy(&buf[..n]), s.peer_addr()?))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    if let Some(cg) = flag("--cgroup") {
        // "0" moves the writing process itself; done before any socket exists, so every
        // socket this process creates belongs to the test cgroup.
        std::fs::write(format!("{cg}/cgroup.procs"), "0")?;
    }
    if let Some(ns) = flag("--netns") {
        let f = File::open(format!("/var/run/netns/{ns}"))?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut kept: Option<UdpSocket> = None;
    let mut kept_unconnected: Option<UdpSocket> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let addr: Option<SocketAddr> = words.next().and_then(|a| a.parse().ok());
        let answer = match (cmd, addr) {
            ("tcp", Some(a)) => tcp(a).unwrap_or_else(|e| err(&e)),
            ("udp", Some(a)) => udp(a).unwrap_or_else(|e| err(&e)),
            ("uconn", Some(a)) => {
                let opened = UdpSocket::bind(any(a)).and_then(|s| {
                    s.set_read_timeout(Some(TIMEOUT))?;
                    s.connect(a)?;
                    Ok(s)
                });
                match opened {
                    Ok(s) => {
                        let r = ask(&s).unwrap_or_else(|e| err(&e));
                        kept = Some(s);
                        r
                    }
                    Err(e) => err(&e),
                }
            }
            ("usend", Some(a)) => {
                let n: usize = words.next().and_then(|m| m.parse().ok()).unwrap_or(1).min(10_000);
                unbound(a).and_then(|s| usend(&s, a, n)).unwrap_or_else(|e| err(&e))
            }
            ("ukeep", Some(a)) => {
                let n: usize = words.next().and_then(|m| m.parse().ok()).unwrap_or(1).min(10_000);
                if kept_unconnected.is_none() {
                    kept_unconnected = unbound(a).ok();
                }
                match &kept_unconnected {
                    Some(s) => usend(s, a, n).unwrap_or_else(|e| err(&e)),
                    None => "err 0 cannot open a UDP socket".into(),
                }
            }
            ("uask", _) => match &kept {
                Some(s) => ask(s).unwrap_or_else(|e| err(&e)),
                None => "err 0 no connected UDP socket".into(),
            },
            ("loop", Some(a)) => {
                let ms: u64 = words.next().and_then(|m| m.parse().ok()).unwrap_or(1000).min(30_000);
                let end = Instant::now() + Duration::from_millis(ms);
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < end {
                    match tcp(a) {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                format!("ok {ok} {failed}")
            }
            ("quit", _) => break,
            _ => format!("err 0 bad command {line:?}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}
