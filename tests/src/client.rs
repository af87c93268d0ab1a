//! Client side of the netns tests: run inside a pod namespace via `Netns::run`.
use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::FromRawFd,
    time::Duration,
};

use anyhow::{Context, Result, bail};

const TIMEOUT: Duration = Duration::from_secs(2);

/// Connect over TCP and return the first line (the backend's name). A connection that
/// establishes at all proves the SYN-ACK came back from `addr` (the VIP).
pub fn tcp_name(addr: SocketAddr) -> Result<String> {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).context("read name")?;
    Ok(line.trim().to_string())
}

/// A held-open TCP connection that can be asked again later.
pub struct Held {
    reader: BufReader<TcpStream>,
    pub first: String,
}

impl Held {
    pub fn open(addr: SocketAddr) -> Result<Self> {
        let s = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connect {addr}"))?;
        Self::from_stream(s)
    }

    /// Open from a specific local source address (the client namespace has several).
    pub fn open_from(src: Ipv4Addr, addr: SocketAddrV4, timeout: Duration) -> Result<Self> {
        Self::from_stream(connect_from(src, addr, timeout)?)
    }

    fn from_stream(s: TcpStream) -> Result<Self> {
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut reader = BufReader::new(s);
        let mut first = String::new();
        reader.read_line(&mut first)?;
        Ok(Held { reader, first: first.trim().to_string() })
    }

    /// Send a line on the open connection and read the answer.
    pub fn ask(&mut self) -> Result<String> {
        self.reader.get_mut().write_all(b"again\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        Ok(line.trim().to_string())
    }

    /// Ask the server who it is and where it sees the connection coming from.
    pub fn who(&mut self) -> Result<(String, Ipv4Addr)> {
        self.reader.get_mut().write_all(b"who\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        let (name, peer) = line.trim().split_once(' ').with_context(|| format!("bad answer {line:?}"))?;
        Ok((name.to_string(), peer.parse().with_context(|| format!("bad peer in {line:?}"))?))
    }

    /// The connection's remote address (what the client believes it is talking to).
    pub fn peer(&self) -> Result<SocketAddr> {
        Ok(self.reader.get_ref().peer_addr()?)
    }
}

/// TCP connect from `src` (bound, any port) to `addr`, failing after `timeout`. std cannot
/// bind before connecting; Linux's connect() honours SO_SNDTIMEO.
pub fn connect_from(src: Ipv4Addr, addr: SocketAddrV4, timeout: Duration) -> Result<TcpStream> {
    fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
            sin_zero: [0; 8],
        }
    }
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on an fd we own; on success the fd moves into TcpStream,
    // on failure it is closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let fail = |what: &str| -> anyhow::Error {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            anyhow::anyhow!("{what} {src} -> {addr}: {e}")
        };
        let tv = libc::timeval { tv_sec: timeout.as_secs() as _, tv_usec: timeout.subsec_micros() as _ };
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of_val(&tv) as _,
        ) != 0
        {
            return Err(fail("SO_SNDTIMEO"));
        }
        let local = sockaddr(SocketAddrV4::new(src, 0));
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(fail("bind"));
        }
        let remote = sockaddr(addr);
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(fail("connect"));
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

/// Like [`tcp_name`], from a given source address.
pub fn tcp_name_from(src: Ipv4Addr, addr: SocketAddrV4, timeout: Duration) -> Result<String> {
    Ok(Held::open_from(src, addr, timeout)?.first)
}

/// Send one UDP datagram from a fresh socket; returns (answer, source address of the reply).
pub fn udp_name(addr: SocketAddr) -> Result<(String, SocketAddr)> {
    let s = UdpSocket::bind(if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.send_to(b"who", addr)?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf).context("udp reply")?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}
