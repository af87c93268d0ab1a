//! A tiny pod: answers with its name over TCP (one line per line received, plus one on
//! connect) and UDP (one datagram per datagram). A TCP line "who" is answered with
//! "<name> <peer-ip>": the address the pod sees the connection coming from (client IP
//! preserved, or SNATed). A line "bulk N" is answered with N bytes of 'x' and a newline
//! (a download, for transfer tests). Serves IPv4, and IPv6 too where the pod has it (separate sockets:
//! dual-stack test pods set `net.ipv6.bindv6only`, so v4 peers are seen as plain IPv4).
//! Runs until killed.
use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, UdpSocket},
    thread,
};

fn main() -> std::io::Result<()> {
    let mut name = String::from("pod");
    let mut port = 8080u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--name" => name = args.next().unwrap_or(name),
            "--port" => port = args.next().and_then(|p| p.parse().ok()).unwrap_or(port),
            other => {
                eprintln!("proxy-podserver: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let udp = UdpSocket::bind(("0.0.0.0", port))?;
    // IPv6 where the pod has it: failing here (no IPv6, or a v4-only pod whose [::] socket
    // would also claim IPv4) just means IPv4 only.
    let udp6 = UdpSocket::bind(("::", port)).ok();
    for sock in std::iter::once(udp).chain(udp6) {
        let udp_name = name.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(udp_name.as_bytes(), from);
            }
        });
    }
    // IPv4 bound first, so an [::] socket can never take IPv4's place.
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
    if let Ok(tcp6) = TcpListener::bind(("::", port)) {
        let name = name.clone();
        thread::spawn(move || serve_tcp(tcp6, name));
    }
    serve_tcp(tcp, name);
    Ok(())
}

fn serve_tcp(tcp: TcpListener, name: String) {
    for conn in tcp.incoming() {
        let Ok(mut conn) = conn else { continue };
        let name = name.clone();
        thread::spawn(move || {
            let line = format!("{name}\n");
            let who = match conn.peer_addr() {
                Ok(peer) => format!("{name} {}\n", peer.ip()),
                Err(_) => format!("{name} ?\n"),
            };
            if conn.write_all(line.as_bytes()).is_err() {
                return;
            }
            let Ok(read_half) = conn.try_clone() else { return };
            for l in BufReader::new(read_half).lines() {
                let Ok(l) = l else { return };
                let bulk;
                let answer = match l.trim().strip_prefix("bulk ").and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) => {
                        bulk = format!("{}\n", "x".repeat(n));
                        &bulk
                    }
                    None if l.trim() == "who" => &who,
                    None => &line,
                };
                if conn.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
}
