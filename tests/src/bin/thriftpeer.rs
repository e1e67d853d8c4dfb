//! A Thrift test peer built on the `thrift` crate, for tern's data-plane tests.
//!
//! `tern-thriftpeer serve ADDR ID` answers on ADDR, detecting each connection's transport
//! (framed, unframed) and protocol (binary, compact) from its first bytes, as any of:
//! - `whoami()` → string: the server's ID;
//! - `echo(1: binary data)` → binary: the data;
//! - `sleep(1: i32 ms)` → string: the ID, after sleeping;
//! - `fail()` → throws the declared exception `Oops { 1: string why }`;
//! - `misnamed()` → a reply named `whoami`, with the call's sequence id: a server that mixes
//!   up its replies;
//! - oneway `notify(1: string note)`, and `count()` → i64: notifications received;
//! - `served()` → i64: calls answered so far (other than `count` and `served`), to tell
//!   calls a server executed from calls its clients saw answered;
//! - anything else: a `TApplicationException` UNKNOWN_METHOD.
//!
//! Method names may carry a multiplexed `Service:` prefix; replies repeat the name as sent.
//!
//! `tern-thriftpeer call ADDR [options]` makes calls over one connection and prints one JSON
//! line per phase: `{"by_server": {ID: n}, "exceptions": n, "app_errors": [..], "seq_ok": bool}`.
//! Options: `--transport framed|unframed`, `--protocol binary|compact`, `--method M`,
//! `--calls N`, `--size BYTES` (echo payload), `--ms MS[,MS..]` (sleep; the calls take the
//! times in turn), `--pipeline` (send all,
//! then read), `--phases K` (K rounds of N calls on the same connection, waiting for a line
//! on stdin between rounds).
//!
//! `tern-thriftpeer retry ADDR` is a client that never gives up: it calls `whoami` every
//! 10 ms over one connection, and when a call or a connection fails it counts the failure and
//! connects again 50 ms later (500 ms connect timeout). Each line on stdin prints what happened
//! since the last one: `{"ok": n, "failed": n, "connects": n, "by_server": {..}, "last_error": ..}`;
//! it exits when stdin closes, or, on a line `stop`, once its call in flight is done, after
//! printing what happened since the last report.
use std::{
    collections::BTreeMap,
    io::{BufReader, BufWriter, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    thread,
    time::Duration,
};

use serde::Serialize;
use thrift::protocol::{
    TBinaryInputProtocol, TBinaryOutputProtocol, TCompactInputProtocol, TCompactOutputProtocol,
    TFieldIdentifier, TInputProtocol, TMessageIdentifier, TMessageType, TOutputProtocol,
    TStructIdentifier, TType,
};
use thrift::transport::{TFramedReadTransport, TFramedWriteTransport};

type In = Box<dyn TInputProtocol + Send>;
type Out = Box<dyn TOutputProtocol + Send>;

fn protocols(stream: &TcpStream, framed: bool, compact: bool) -> (In, Out) {
    let r = stream.try_clone().expect("clone stream");
    let w = stream.try_clone().expect("clone stream");
    match (framed, compact) {
        (true, false) => (
            Box::new(TBinaryInputProtocol::new(
                TFramedReadTransport::new(r),
                true,
            )),
            Box::new(TBinaryOutputProtocol::new(
                TFramedWriteTransport::new(w),
                true,
            )),
        ),
        (true, true) => (
            Box::new(TCompactInputProtocol::new(TFramedReadTransport::new(r))),
            Box::new(TCompactOutputProtocol::new(TFramedWriteTransport::new(w))),
        ),
        (false, false) => (
            Box::new(TBinaryInputProtocol::new(BufReader::new(r), true)),
            Box::new(TBinaryOutputProtocol::new(BufWriter::new(w), true)),
        ),
        (false, true) => (
            Box::new(TCompactInputProtocol::new(BufReader::new(r))),
            Box::new(TCompactOutputProtocol::new(BufWriter::new(w))),
        ),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1], &args[2]),
        Some("call") => call(&args[1..]),
        Some("retry") => retry(&args[1]),
        _ => {
            eprintln!("usage: tern-thriftpeer serve ADDR ID | call ADDR [options] | retry ADDR");
            std::process::exit(2);
        }
    }
}

fn serve(addr: &str, id: &str) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let notes = Arc::new(Counters::default());
    println!("ready");
    std::io::stdout().flush().expect("stdout");
    for stream in listener.incoming().flatten() {
        let (id, notes) = (id.to_owned(), notes.clone());
        thread::spawn(move || {
            let mut first = [0u8; 5];
            let Ok(n) = stream.peek(&mut first) else {
                return;
            };
            if n < 5 {
                // Wait for enough bytes to tell the format.
                let mut buf = [0u8; 5];
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut tries = 0;
                while stream.peek(&mut buf).map_or(0, |n| n) < 5 && tries < 500 {
                    thread::sleep(Duration::from_millis(2));
                    tries += 1;
                }
                first = buf;
            }
            let unframed = first[0] == 0x80 || first[0] == 0x82;
            let compact = if unframed {
                first[0] == 0x82
            } else {
                first[4] == 0x82
            };
            let _ = stream.set_nodelay(true);
            let (mut i, mut o) = protocols(&stream, !unframed, compact);
            while answer(&mut *i, &mut *o, &id, &notes).is_ok() {}
        });
    }
}

/// What a server counts for the tests to ask.
#[derive(Default)]
struct Counters {
    notes: AtomicI64,
    served: AtomicI64,
}

fn answer(
    i: &mut dyn TInputProtocol,
    o: &mut dyn TOutputProtocol,
    id: &str,
    counters: &Counters,
) -> thrift::Result<()> {
    let msg = i.read_message_begin()?;
    let method = msg.name.rsplit(':').next().unwrap_or("").to_owned();
    // Read the arguments struct: field 1 as binary (echo, notify) or i32 (sleep).
    let mut data = Vec::new();
    let mut ms = 0;
    i.read_struct_begin()?;
    loop {
        let f = i.read_field_begin()?;
        match (f.field_type, f.id) {
            (TType::Stop, _) => break,
            (TType::String, Some(1)) => data = i.read_bytes()?,
            (TType::I32, Some(1)) => ms = i.read_i32()?,
            (t, _) => i.skip(t)?,
        }
        i.read_field_end()?;
    }
    i.read_struct_end()?;
    i.read_message_end()?;
    if msg.message_type == TMessageType::OneWay {
        if method == "notify" {
            counters.notes.fetch_add(1, Ordering::SeqCst);
        }
        return Ok(());
    }
    let reply_named = |o: &mut dyn TOutputProtocol,
                       name: &str,
                       field: i16,
                       write: &dyn Fn(&mut dyn TOutputProtocol) -> thrift::Result<()>,
                       ty: TType| {
        o.write_message_begin(&TMessageIdentifier::new(
            name,
            TMessageType::Reply,
            msg.sequence_number,
        ))?;
        o.write_struct_begin(&TStructIdentifier::new("result"))?;
        o.write_field_begin(&TFieldIdentifier::new("f", ty, field))?;
        write(o)?;
        o.write_field_end()?;
        o.write_field_stop()?;
        o.write_struct_end()?;
        o.write_message_end()?;
        o.flush()
    };
    let reply = |o: &mut dyn TOutputProtocol,
                 field: i16,
                 write: &dyn Fn(&mut dyn TOutputProtocol) -> thrift::Result<()>,
                 ty: TType| reply_named(o, &msg.name, field, write, ty);
    if !matches!(method.as_str(), "count" | "served") {
        counters.served.fetch_add(1, Ordering::SeqCst);
    }
    match method.as_str() {
        "whoami" => reply(o, 0, &|o| o.write_string(id), TType::String),
        "misnamed" => {
            let name = msg.name.replace("misnamed", "whoami");
            reply_named(o, &name, 0, &|o| o.write_string(id), TType::String)
        }
        "echo" => reply(o, 0, &|o| o.write_bytes(&data), TType::String),
        "sleep" => {
            thread::sleep(Duration::from_millis(ms.max(0) as u64));
            reply(o, 0, &|o| o.write_string(id), TType::String)
        }
        "count" => reply(
            o,
            0,
            &|o| o.write_i64(counters.notes.load(Ordering::SeqCst)),
            TType::I64,
        ),
        "served" => reply(
            o,
            0,
            &|o| o.write_i64(counters.served.load(Ordering::SeqCst)),
            TType::I64,
        ),
        "fail" => reply(
            o,
            1,
            &|o| {
                o.write_struct_begin(&TStructIdentifier::new("Oops"))?;
                o.write_field_begin(&TFieldIdentifier::new("why", TType::String, 1))?;
                o.write_string("on purpose")?;
                o.write_field_end()?;
                o.write_field_stop()?;
                o.write_struct_end()
            },
            TType::Struct,
        ),
        _ => {
            o.write_message_begin(&TMessageIdentifier::new(
                &msg.name,
                TMessageType::Exception,
                msg.sequence_number,
            ))?;
            let e = thrift::ApplicationError::new(
                thrift::ApplicationErrorKind::UnknownMethod,
                format!("unknown method {}", msg.name),
            );
            thrift::Error::write_application_error_to_out_protocol(&e, o)?;
            o.write_message_end()?;
            o.flush()
        }
    }
}

#[derive(Default, Serialize)]
struct Phase {
    by_server: BTreeMap<String, u64>,
    /// Declared exceptions (`fail`).
    exceptions: u64,
    /// `TApplicationException` messages, by text.
    app_errors: Vec<String>,
    /// Replies to `count`, `echo` sizes.
    values: Vec<i64>,
    /// Every reply came back with the sequence id of its request, in order.
    seq_ok: bool,
    /// Set when the connection failed.
    io_error: Option<String>,
    /// The slowest call, in milliseconds (calls made one at a time).
    max_ms: u64,
}

struct Options {
    framed: bool,
    compact: bool,
    method: String,
    calls: usize,
    size: usize,
    /// How long each `sleep` call asks for, in turn.
    ms: Vec<i32>,
    pipeline: bool,
    phases: usize,
}

fn option<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn call(args: &[String]) {
    let addr = &args[0];
    let o = Options {
        framed: option(args, "--transport") != Some("unframed"),
        compact: option(args, "--protocol") == Some("compact"),
        method: option(args, "--method").unwrap_or("whoami").to_owned(),
        calls: option(args, "--calls").map_or(1, |n| n.parse().expect("--calls N")),
        size: option(args, "--size").map_or(0, |n| n.parse().expect("--size BYTES")),
        ms: option(args, "--ms").map_or(vec![0], |list| {
            list.split(',')
                .map(|n| n.parse().expect("--ms MS[,MS..]"))
                .collect()
        }),
        pipeline: args.iter().any(|a| a == "--pipeline"),
        phases: option(args, "--phases").map_or(1, |n| n.parse().expect("--phases K")),
    };
    let stream = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => {
            let phase = Phase {
                io_error: Some(e.to_string()),
                ..Phase::default()
            };
            println!("{}", serde_json::to_string(&phase).expect("json"));
            return;
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    let (mut i, mut out) = protocols(&stream, o.framed, o.compact);
    let mut seq = 0i32;
    for phase in 0..o.phases {
        if phase > 0 {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        let result = run_phase(&mut *i, &mut out, &o, &mut seq);
        println!("{}", serde_json::to_string(&result).expect("json"));
        std::io::stdout().flush().expect("stdout");
    }
}

fn write_call(o: &mut dyn TOutputProtocol, opts: &Options, seq: i32) -> thrift::Result<()> {
    let oneway = opts.method.ends_with("notify");
    let kind = if oneway {
        TMessageType::OneWay
    } else {
        TMessageType::Call
    };
    o.write_message_begin(&TMessageIdentifier::new(&opts.method, kind, seq))?;
    o.write_struct_begin(&TStructIdentifier::new("args"))?;
    let method = opts.method.rsplit(':').next().unwrap_or("");
    match method {
        "echo" | "notify" => {
            o.write_field_begin(&TFieldIdentifier::new("data", TType::String, 1))?;
            o.write_bytes(&vec![b'x'; opts.size])?;
            o.write_field_end()?;
        }
        "sleep" => {
            o.write_field_begin(&TFieldIdentifier::new("ms", TType::I32, 1))?;
            o.write_i32(opts.ms[seq.unsigned_abs() as usize % opts.ms.len()])?;
            o.write_field_end()?;
        }
        _ => {}
    }
    o.write_field_stop()?;
    o.write_struct_end()?;
    o.write_message_end()?;
    o.flush()
}

fn read_reply(i: &mut dyn TInputProtocol, phase: &mut Phase, want_seq: i32) -> thrift::Result<()> {
    let msg = i.read_message_begin()?;
    if msg.sequence_number != want_seq {
        phase.seq_ok = false;
    }
    if msg.message_type == TMessageType::Exception {
        let e = thrift::Error::read_application_error_from_in_protocol(i)?;
        i.read_message_end()?;
        phase.app_errors.push(e.message);
        return Ok(());
    }
    i.read_struct_begin()?;
    loop {
        let f = i.read_field_begin()?;
        match (f.field_type, f.id) {
            (TType::Stop, _) => break,
            (TType::String, Some(0)) => {
                let b = i.read_bytes()?;
                if b.first() == Some(&b'x') || b.is_empty() {
                    phase.values.push(b.len() as i64);
                } else {
                    *phase
                        .by_server
                        .entry(String::from_utf8_lossy(&b).into_owned())
                        .or_default() += 1;
                }
            }
            (TType::I64, Some(0)) => phase.values.push(i.read_i64()?),
            (t, Some(id)) if id >= 1 => {
                phase.exceptions += 1;
                i.skip(t)?;
            }
            (t, _) => i.skip(t)?,
        }
        i.read_field_end()?;
    }
    i.read_struct_end()?;
    i.read_message_end()
}

fn run_phase(i: &mut dyn TInputProtocol, out: &mut Out, o: &Options, seq: &mut i32) -> Phase {
    let mut phase = Phase {
        seq_ok: true,
        ..Phase::default()
    };
    let oneway = o.method.ends_with("notify");
    let first = *seq;
    let result = (|| -> thrift::Result<()> {
        if o.pipeline {
            for k in 0..o.calls {
                write_call(&mut **out, o, first + k as i32)?;
            }
            if !oneway {
                for k in 0..o.calls {
                    read_reply(i, &mut phase, first + k as i32)?;
                }
            }
        } else {
            for k in 0..o.calls {
                let started = std::time::Instant::now();
                write_call(&mut **out, o, first + k as i32)?;
                if !oneway {
                    read_reply(i, &mut phase, first + k as i32)?;
                }
                phase.max_ms = phase.max_ms.max(started.elapsed().as_millis() as u64);
            }
        }
        Ok(())
    })();
    *seq += o.calls as i32;
    if let Err(e) = result {
        phase.io_error = Some(e.to_string());
    }
    phase
}

/// What the retrying client saw since its last report.
#[derive(Default, Serialize)]
struct Retrying {
    ok: u64,
    failed: u64,
    connects: u64,
    by_server: BTreeMap<String, u64>,
    last_error: Option<String>,
}

fn retry(addr: &str) {
    let target: std::net::SocketAddr = addr.parse().expect("retry ADDR: an IP:port");
    let seen = Arc::new(std::sync::Mutex::new(Retrying::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reporter = seen.clone();
    let stopping = stop.clone();
    thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if line == "stop" {
                stopping.store(true, Ordering::SeqCst);
                return;
            }
            let report = std::mem::take(&mut *reporter.lock().expect("lock"));
            println!("{}", serde_json::to_string(&report).expect("json"));
            std::io::stdout().flush().expect("stdout");
        }
        std::process::exit(0);
    });
    let failed = |e: String| {
        let mut s = seen.lock().expect("lock");
        s.failed += 1;
        s.last_error = Some(e);
    };
    let opts = Options {
        framed: true,
        compact: false,
        method: "whoami".into(),
        calls: 1,
        size: 0,
        ms: vec![0],
        pipeline: false,
        phases: 1,
    };
    let stopped = || {
        if stop.load(Ordering::SeqCst) {
            let report = std::mem::take(&mut *seen.lock().expect("lock"));
            println!("{}", serde_json::to_string(&report).expect("json"));
            std::io::stdout().flush().expect("stdout");
            std::process::exit(0);
        }
    };
    loop {
        stopped();
        let stream = match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
            Ok(s) => s,
            Err(e) => {
                failed(format!("connect: {e}"));
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        seen.lock().expect("lock").connects += 1;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_nodelay(true);
        let (mut i, mut out) = protocols(&stream, opts.framed, opts.compact);
        let mut seq = 0;
        loop {
            let phase = run_phase(&mut *i, &mut out, &opts, &mut seq);
            if let Some(e) = phase.io_error {
                failed(e);
                break;
            }
            if let Some(e) = phase.app_errors.into_iter().next() {
                failed(format!("TApplicationException: {e}"));
            }
            let mut s = seen.lock().expect("lock");
            for (server, n) in phase.by_server {
                s.ok += n;
                *s.by_server.entry(server).or_default() += n;
            }
            drop(s);
            thread::sleep(Duration::from_millis(10));
            stopped();
        }
        thread::sleep(Duration::from_millis(50));
    }
}
