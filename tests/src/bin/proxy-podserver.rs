//! A tiny pod: answers with its name over TCP (one line per line received, plus one on
//! connect) and UDP (one datagram per datagram). A TCP line "who" is answered with
//! "<name> <peer-ip>": the address the pod sees the connection coming from (client IP
//! preserved, or SNATed). Runs until killed.
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
    let udp_name = name.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(udp_name.as_bytes(), from);
        }
    });
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
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
                let answer = if l.trim() == "who" { &who } else { &line };
                if conn.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}
