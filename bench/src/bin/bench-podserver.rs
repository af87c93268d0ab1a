//! A pod for the benchmark topologies. Runs until killed.
//!
//! `--port P`: answers every TCP connection with its name and a newline on connect, then one
//! line per line received (the semantics of `proxy-podserver`, which the bench cannot run
//! because a binary of another package has no stable path), from a fixed pool of threads.
//! `--sink-port S`: reads a TCP stream to its end and answers with the number of bytes
//! received (8 bytes, little endian), so the sender knows everything arrived.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    thread,
};

fn serve_name(mut conn: TcpStream, name: &str) {
    let line = format!("{name}\n");
    let _ = conn.set_nodelay(true);
    if conn.write_all(line.as_bytes()).is_err() {
        return;
    }
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    for l in BufReader::new(read_half).lines() {
        if l.is_err() || conn.write_all(line.as_bytes()).is_err() {
            return;
        }
    }
}

fn serve_sink(mut conn: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
    let _ = conn.write_all(&total.to_le_bytes());
}

fn main() -> std::io::Result<()> {
    let mut name = String::from("pod");
    let mut port = 8080u16;
    let mut sink_port: Option<u16> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match a.as_str() {
            "--name" => name = value(),
            "--port" => port = value().parse().unwrap_or(port),
            "--sink-port" => sink_port = value().parse().ok(),
            other => {
                eprintln!("bench-podserver: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    if let Some(sp) = sink_port {
        let sink = TcpListener::bind(("0.0.0.0", sp))?;
        thread::spawn(move || {
            for conn in sink.incoming().flatten() {
                thread::spawn(move || serve_sink(conn));
            }
        });
    }
    // A fixed pool of workers blocked in accept(): no thread creation per connection, so
    // the server adds as little as possible to what the datapath under test costs. Each
    // worker serves one connection at a time (up to WORKERS held open at once).
    const WORKERS: usize = 8;
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let l = tcp.try_clone()?;
        let name = name.clone();
        workers.push(thread::spawn(move || {
            loop {
                if let Ok((conn, _)) = l.accept() {
                    serve_name(conn, &name);
                }
            }
        }));
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}
