//! Heap allocations per proxied Thrift request, in steady state: tern's Thrift proxy runs
//! in-process on a current-thread runtime of its own thread, as on one of tern's workers,
//! which counts its allocations; a client thread sends framed `echo` calls (8 in flight)
//! through it to an echo server thread, neither of which counts. Prints the number and, with
//! `TERN_BENCH_OUT=FILE`, writes it as JSON.
//!
//! It is also the rig for the request path's instructions: `TERN_BENCH_REQUESTS` (100,000)
//! and `TERN_BENCH_IN_FLIGHT` (8) set the load, so two runs under
//! `valgrind --tool=callgrind` that differ only in requests give, by difference, each
//! function's instructions per request (a multi-thread runtime would add its scheduler's
//! statistics, which tern's workers never run).
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tern::{
    config,
    filters::{self, Ctx, Direction},
    metrics::Metrics,
    state::State,
    thrift::DecoderLimits,
};
use tern_bench::{echo_call, into_reply, is_echo_call, is_reply_to, set_seq};

#[path = "../tests/support/counting_alloc.rs"]
#[allow(unsafe_code)] // a GlobalAlloc (an unsafe trait) forwarding to the system's
mod counting_alloc;
use counting_alloc::{ALLOCATIONS, COUNTING};

const WARMUP: usize = 20_000;

/// A count from the environment, or `default`.
fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A blocking echo server: one thread per connection, one reused buffer.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the echo server");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let (mut r, mut w) = (&stream, &stream);
                let mut frame = vec![0u8; 1 << 20];
                loop {
                    if r.read_exact(&mut frame[..4]).is_err() {
                        return;
                    }
                    let n = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
                    if r.read_exact(&mut frame[4..4 + n]).is_err() || !is_echo_call(&frame[..4 + n])
                    {
                        return;
                    }
                    into_reply(&mut frame[..4 + n]);
                    if w.write_all(&frame[..4 + n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// tern's Thrift proxy for `vip`, balancing over `echo`, on the current runtime: its address.
async fn start_proxy(vip: SocketAddr, echo: SocketAddr) -> SocketAddr {
    let metrics = Metrics::new(None);
    let state = State::new(metrics.upstream.clone());
    let yaml = format!(
        "listeners:\n  - address: {vip}\n    filter_chains: [ {{ thrift_proxy: {{ default_cluster: echo }} }} ]\n\
         clusters:\n  - name: echo\n    endpoints: [ {{ address: {echo} }} ]\n"
    );
    state.apply(config::file::parse(&yaml, "bench").expect("configuration"));
    let ctx = Arc::new(Ctx {
        state,
        metrics: metrics.filters.clone(),
        mark: 0,
        limits: DecoderLimits::default(),
        closing: Default::default(),
        connect_timeout: Duration::from_secs(1),
        access_log: false,
        thrift_ports: Default::default(),
        budget: tern::budget::BufferBudget::new(64 << 20),
        message_timeout: Duration::from_secs(15),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            // As if the capture had sent a connection for the virtual IP here.
            tokio::spawn(filters::handle(
                stream,
                Direction::Outbound,
                vip,
                peer,
                ctx.clone(),
            ));
        }
    });
    addr
}

fn main() {
    let echo = echo_server();
    let vip: SocketAddr = "10.96.0.2:9090".parse().expect("address");
    let measured = setting("TERN_BENCH_REQUESTS", 100_000);
    let in_flight = setting("TERN_BENCH_IN_FLIGHT", 8).max(1) as i32;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (proxy_tx, proxy_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        COUNTING.with(|c| c.set(true));
        runtime.block_on(async {
            let addr = start_proxy(vip, echo).await;
            proxy_tx.send(addr).expect("the bench waits for the proxy");
            std::future::pending::<()>().await
        })
    });
    let proxy = proxy_rx.recv().expect("the proxy's address");

    let mut stream = TcpStream::connect(proxy).expect("connect to the proxy");
    stream.set_nodelay(true).expect("nodelay");
    let mut call = echo_call(100);
    let mut reply = vec![0u8; call.len()];
    let mut seq = 0i32;
    let mut oldest = 0i32;
    let mut calls = |n: usize, stream: &mut TcpStream| {
        for _ in 0..n {
            while seq - oldest < in_flight {
                set_seq(&mut call, seq);
                stream.write_all(&call).expect("send a call");
                seq += 1;
            }
            stream.read_exact(&mut reply).expect("read a reply");
            assert!(is_reply_to(&reply, oldest), "reply {oldest} out of order");
            oldest += 1;
        }
    };
    calls(WARMUP, &mut stream);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    calls(measured, &mut stream);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let per_request = allocations as f64 / measured.max(1) as f64;
    println!(
        "allocations per proxied request: {per_request:.3} ({allocations} over {measured} requests)"
    );
    if let Some(out) = std::env::var_os("TERN_BENCH_OUT") {
        let json = format!("{{\"allocations per proxied request\": {per_request}}}\n");
        std::fs::write(&out, json).expect("write the result");
    }
}
