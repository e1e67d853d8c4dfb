//! A TCP test peer for tern's integration tests, run inside network namespaces and cgroups.
//!
//! - `tern-testpeer serve ADDR…`: listens on every address, prints `ready`, and answers each
//!   connection with one line `peer=<its peer> local=<its local address>`, then echoes lines.
//! - `tern-testpeer connect ADDR`: connects, reads that line, checks an echo, and prints one
//!   JSON object: its own local address, what `getpeername()` said, what the server saw —
//!   or `{"error": …, "kind": …}` when the connection failed.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use serde::Serialize;

#[derive(Serialize)]
struct Outcome {
    local: String,
    peer: String,
    server_saw: String,
    server_local: String,
    echoed: bool,
}

#[derive(Serialize)]
struct Failure {
    error: String,
    kind: String,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("raw") => raw(&args[1], &args[2]),
        Some("connect") => {
            let addr: SocketAddr = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .expect("usage: tern-testpeer connect ADDR");
            let line = match connect(addr) {
                Ok(outcome) => serde_json::to_string(&outcome),
                Err(e) => serde_json::to_string(&Failure {
                    kind: format!("{:?}", e.kind()),
                    error: e.to_string(),
                }),
            };
            println!("{}", line.expect("serialisable"));
        }
        _ => {
            eprintln!("usage: tern-testpeer serve ADDR… | connect ADDR");
            std::process::exit(2);
        }
    }
}

/// Sends hex-encoded bytes, half-closes, and reports how the peer ended the connection.
fn raw(addr: &str, hex: &str) {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let sent = stream.write_all(&bytes).is_ok();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut received = Vec::new();
    let outcome = match std::io::Read::read_to_end(&mut stream, &mut received) {
        Ok(_) => "closed",
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            "open"
        }
        Err(_) => "reset",
    };
    println!(
        "{}",
        serde_json::json!({ "sent": sent, "outcome": outcome, "received": received.len() })
    );
}

fn serve(addrs: &[String]) {
    let listeners: Vec<TcpListener> = addrs
        .iter()
        .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}")))
        .collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            thread::spawn(move || {
                for stream in l.incoming().flatten() {
                    thread::spawn(move || answer(stream));
                }
            })
        })
        .collect();
    println!("ready");
    std::io::stdout().flush().expect("stdout");
    for h in handles {
        let _ = h.join();
    }
}

fn answer(mut stream: TcpStream) {
    let greeting = format!(
        "peer={} local={}\n",
        stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        stream
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    if stream.write_all(greeting.as_bytes()).is_err() {
        return;
    }
    let reader = BufReader::new(stream.try_clone().expect("clone the stream"));
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if writeln!(stream, "{line}").is_err() {
            return;
        }
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<Outcome> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let local = stream.local_addr()?.to_string();
    let peer = stream.peer_addr()?.to_string();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut greeting = String::new();
    reader.read_line(&mut greeting)?;
    let field = |name: &str| {
        greeting
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_default()
            .to_owned()
    };
    if greeting.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the connection closed before the server's greeting",
        ));
    }
    writeln!(stream, "ping")?;
    let mut echo = String::new();
    reader.read_line(&mut echo)?;
    Ok(Outcome {
        local,
        peer,
        server_saw: field("peer="),
        server_local: field("local="),
        echoed: echo.trim() == "ping",
    })
}
