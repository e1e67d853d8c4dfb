//! `tern-load`: the benchmark's Thrift echo server and load generator.
//!
//! - `tern-load serve ADDR`: answers framed binary `echo` calls (single-threaded, no
//!   allocation per call); prints `ready` once it listens.
//! - `tern-load run --addr A[,B…] --connections N --inflight M --size BYTES --secs S`: N
//!   connections (spread over the addresses), each with M calls in flight; prints one JSON
//!   [`LoadResult`]. `--churn` makes every call on a new connection (N at a time) and also
//!   reports `connect()` latency.
use std::{
    collections::VecDeque,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tern_bench::{LoadResult, echo_call, into_reply, is_echo_call, is_reply_to, set_seq};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer `echo` calls on ADDR.
    Serve { addr: SocketAddr },
    /// Drive load and print the result as JSON.
    Run(RunArgs),
}

#[derive(Parser, Clone)]
#[command(args_override_self = true)]
struct RunArgs {
    /// Addresses to connect to; connections are spread over them in turn.
    #[arg(long, value_delimiter = ',', required = true)]
    addr: Vec<SocketAddr>,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    /// Payload bytes per call.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    /// A new connection for every call.
    #[arg(long)]
    churn: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    match cli.command {
        Command::Serve { addr } => local.block_on(&rt, serve(addr)),
        Command::Run(args) => {
            let result = local.block_on(&rt, run(args))?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
    }
}

async fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    println!("ready");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::task::spawn_local(async move {
            let _ = answer(stream).await;
        });
    }
}

/// Answers one connection's calls until it closes; a frame that is not an `echo` call closes it.
async fn answer(stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let mut frame = Vec::with_capacity(128 * 1024);
    loop {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await?;
        let n = u32::from_be_bytes(len) as usize;
        if n > 16 << 20 {
            bail!("frame of {n} bytes");
        }
        frame.clear();
        frame.extend_from_slice(&len);
        frame.resize(4 + n, 0);
        r.read_exact(&mut frame[4..]).await?;
        if !is_echo_call(&frame) {
            bail!("not an echo call");
        }
        into_reply(&mut frame);
        w.write_all(&frame).await?;
    }
}

/// Latency histograms shared by the connection tasks (one thread: `Rc<RefCell>`).
struct Recorder {
    start: Instant,
    warmup: Duration,
    end: Instant,
    calls: Histogram<u64>,
    connects: Histogram<u64>,
    requests: u64,
    total: u64,
    errors: u64,
}

impl Recorder {
    fn measuring(&self, now: Instant) -> bool {
        now >= self.start + self.warmup && now < self.end
    }
}

type Shared = Rc<std::cell::RefCell<Recorder>>;

async fn run(args: RunArgs) -> Result<LoadResult> {
    let start = Instant::now();
    let warmup = Duration::from_secs_f64(args.warmup);
    let rec: Shared = Rc::new(std::cell::RefCell::new(Recorder {
        start,
        warmup,
        end: start + warmup + Duration::from_secs_f64(args.secs),
        calls: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        connects: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        requests: 0,
        total: 0,
        errors: 0,
    }));
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        let addr = args.addr[i % args.addr.len()];
        let (rec, args) = (rec.clone(), args.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let result = if args.churn {
                churn(addr, &args, &rec).await
            } else {
                pipeline(addr, &args, &rec).await
            };
            if let Err(e) = result {
                rec.borrow_mut().errors += 1;
                eprintln!("tern-load: {addr}: {e:#}");
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let r = rec.borrow();
    let pct = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64;
    Ok(LoadResult {
        requests: r.requests,
        total: r.total,
        errors: r.errors,
        secs: args.secs,
        rps: r.requests as f64 / args.secs,
        p50_us: pct(&r.calls, 0.5),
        p99_us: pct(&r.calls, 0.99),
        p999_us: pct(&r.calls, 0.999),
        connect_p50_us: args.churn.then(|| pct(&r.connects, 0.5)),
        connect_p99_us: args.churn.then(|| pct(&r.connects, 0.99)),
        calls_us: r
            .calls
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_since_last_iteration()))
            .collect(),
    })
}

/// One connection with `inflight` calls outstanding until the window ends.
async fn pipeline(addr: SocketAddr, args: &RunArgs, rec: &Shared) -> Result<()> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let mut call = echo_call(args.size);
    let mut reply = vec![0u8; call.len()];
    let mut sent: VecDeque<(i32, Instant)> = VecDeque::with_capacity(args.inflight);
    let mut next = 0i32;
    let end = rec.borrow().end;
    loop {
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        while sent.len() < args.inflight {
            set_seq(&mut call, next);
            w.write_all(&call).await?;
            sent.push_back((next, Instant::now()));
            next = next.wrapping_add(1);
        }
        r.read_exact(&mut reply).await?;
        let (seq, at) = sent.pop_front().expect("a call is in flight");
        let done = Instant::now();
        let mut rec = rec.borrow_mut();
        if !is_reply_to(&reply, seq) {
            rec.errors += 1;
            bail!("a wrong reply to call {seq}");
        }
        rec.total += 1;
        if rec.measuring(done) {
            rec.requests += 1;
            let us = (done - at).as_micros().max(1) as u64;
            rec.calls.saturating_record(us);
        }
    }
}

/// A new connection per call until the window ends.
async fn churn(addr: SocketAddr, args: &RunArgs, rec: &Shared) -> Result<()> {
    let mut call = echo_call(args.size);
    let mut reply = vec![0u8; call.len()];
    let end = rec.borrow().end;
    let mut seq = 0;
    while Instant::now() < end {
        let at = Instant::now();
        let result = async {
            let mut stream = TcpStream::connect(addr).await?;
            let connected = Instant::now();
            stream.set_nodelay(true)?;
            set_seq(&mut call, seq);
            stream.write_all(&call).await?;
            stream.read_exact(&mut reply).await?;
            anyhow::Ok(connected)
        }
        .await;
        let done = Instant::now();
        let mut rec = rec.borrow_mut();
        match result {
            Ok(connected) if is_reply_to(&reply, seq) => {
                rec.total += 1;
                if rec.measuring(done) {
                    rec.requests += 1;
                    rec.calls
                        .saturating_record((done - at).as_micros().max(1) as u64);
                    rec.connects
                        .saturating_record((connected - at).as_micros().max(1) as u64);
                }
            }
            _ => rec.errors += 1,
        }
        seq = seq.wrapping_add(1);
    }
    Ok(())
}
