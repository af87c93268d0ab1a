//! Client side of the netns tests: run inside a pod namespace via `Netns::run`.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
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
}

/// Send one UDP datagram from a fresh socket; returns (answer, source address of the reply).
pub fn udp_name(addr: SocketAddr) -> Result<(String, SocketAddr)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.send_to(b"who", addr)?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf).context("udp reply")?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}
