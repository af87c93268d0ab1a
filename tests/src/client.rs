//! Client side of the netns tests: run inside a pod namespace via `Netns::run`.
use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
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

/// The pod names behind `n` fresh connections to `addr` from inside `ns`; panics naming the
/// address on a failed one.
pub fn tcp_names_from(ns: &crate::netns::Netns, addr: SocketAddr, n: usize) -> std::collections::BTreeSet<String> {
    ns.run(|| (0..n).map(|_| tcp_name(addr).unwrap_or_else(|e| panic!("connection to {addr}: {e:#}"))).collect())
}

/// A set of names, to compare with what `tcp_names_from` saw.
pub fn name_set(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
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
    pub fn who(&mut self) -> Result<(String, IpAddr)> {
        self.reader.get_mut().write_all(b"who\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        let (name, peer) = line.trim().split_once(' ').with_context(|| format!("bad answer {line:?}"))?;
        Ok((name.to_string(), peer.parse().with_context(|| format!("bad peer in {line:?}"))?))
    }

    /// Download: ask the server for `n` bytes (`bulk N`) and read them all.
    pub fn download(&mut self, n: usize) -> Result<()> {
        self.reader.get_mut().write_all(format!("bulk {n}\n").as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        anyhow::ensure!(line.trim_end().len() == n, "downloaded {} of {n} bytes", line.trim_end().len());
        Ok(())
    }

    /// Upload: send `n` bytes as one line; the server answers it with its name.
    pub fn upload(&mut self, n: usize) -> Result<String> {
        let mut data = vec![b'y'; n];
        data.push(b'\n');
        self.reader.get_mut().write_all(&data)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        Ok(line.trim().to_string())
    }

    /// The connection's local address (the client's side of its conntrack tuple).
    pub fn local(&self) -> Result<SocketAddr> {
        Ok(self.reader.get_ref().local_addr()?)
    }

    /// The connection's remote address (what the client believes it is talking to).
    pub fn peer(&self) -> Result<SocketAddr> {
        Ok(self.reader.get_ref().peer_addr()?)
    }
}

/// TCP connect from `src` (bound, any port) to `addr`, failing after `timeout`.
pub fn connect_from(src: Ipv4Addr, addr: SocketAddrV4, timeout: Duration) -> Result<TcpStream> {
    connect_from_any(src.into(), addr.into(), timeout)
}

/// [`connect_from`] for either family.
pub fn connect_from_any(src: IpAddr, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).context("socket")?;
    s.bind(&SocketAddr::new(src, 0).into()).with_context(|| format!("bind {src}"))?;
    s.connect_timeout(&addr.into(), timeout).with_context(|| format!("connect {src} -> {addr}"))?;
    Ok(s.into())
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

/// The backends that answer `tries` UDP queries to `addr` (a failed try is skipped), each
/// reply asserted to come from `addr` itself: the frontend, never the backend.
pub fn udp_names_from(addr: SocketAddr, tries: usize) -> std::collections::BTreeSet<String> {
    (0..tries)
        .filter_map(|_| {
            let (name, from) = udp_name(addr).ok()?;
            assert_eq!(from, addr, "UDP reply source");
            Some(name)
        })
        .collect()
}
