//! Micro-benchmarks (criterion): the Thrift codec per transport, protocol and size (framed
//! messages are cut by length, unframed ones by skipping their fields), listener selection
//! among 1,000 listeners, and endpoint picking per policy.
use std::{collections::BTreeMap, hint::black_box, net::SocketAddr};

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tern::{
    balance::{Candidate, EndpointPicker},
    config::{self, Endpoint, LbPolicy},
    state::{Selection, State},
    thrift::{Decoder, DecoderLimits},
};
use thrift::protocol::{
    TBinaryOutputProtocol, TCompactOutputProtocol, TFieldIdentifier, TMessageIdentifier,
    TMessageType, TOutputProtocol, TStructIdentifier, TType,
};

/// `echo(1: data, 2: list<i32>)` with `size` bytes of data and a 16-element list, encoded.
fn message(framed: bool, compact: bool, size: usize) -> Vec<u8> {
    let mut body = Vec::new();
    {
        let mut o: Box<dyn TOutputProtocol + '_> = if compact {
            Box::new(TCompactOutputProtocol::new(&mut body))
        } else {
            Box::new(TBinaryOutputProtocol::new(&mut body, true))
        };
        o.write_message_begin(&TMessageIdentifier::new("Calc:echo", TMessageType::Call, 7))
            .and_then(|()| o.write_struct_begin(&TStructIdentifier::new("args")))
            .and_then(|()| o.write_field_begin(&TFieldIdentifier::new("data", TType::String, 1)))
            .and_then(|()| o.write_bytes(&vec![b'x'; size]))
            .and_then(|()| o.write_field_end())
            .and_then(|()| o.write_field_begin(&TFieldIdentifier::new("ids", TType::List, 2)))
            .and_then(|()| {
                o.write_list_begin(&thrift::protocol::TListIdentifier::new(TType::I32, 16))
            })
            .and_then(|()| (0..16).try_for_each(|i| o.write_i32(i)))
            .and_then(|()| o.write_list_end())
            .and_then(|()| o.write_field_end())
            .and_then(|()| o.write_field_stop())
            .and_then(|()| o.write_struct_end())
            .and_then(|()| o.write_message_end())
            .expect("encode");
    }
    if framed {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend(body);
        f
    } else {
        body
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for (name, framed, compact) in [
        ("framed-binary", true, false),
        ("framed-compact", true, true),
        ("unframed-binary", false, false),
        ("unframed-compact", false, true),
    ] {
        for size in [100usize, 64 * 1024] {
            let one = message(framed, compact, size);
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(BenchmarkId::new(name, size), &one, |b, one| {
                let mut decoder = Decoder::detecting(DecoderLimits::default());
                let mut buf = BytesMut::with_capacity(one.len() * 2);
                b.iter(|| {
                    buf.extend_from_slice(one);
                    let mut m = decoder.decode(&mut buf).expect("valid").expect("whole");
                    black_box(m.method());
                    m.set_seq_id(9).expect("fits");
                    black_box(m.into_bytes());
                    // Keep the buffer's storage for the next message (as a connection does).
                    buf.reserve(one.len());
                });
            });
        }
    }
    g.finish();
}

/// An unframed binary call whose body is one list of `n` i32s: its end is found only by
/// walking every element.
fn unframed_list(n: usize) -> Vec<u8> {
    let mut m = vec![0x80, 0x01, 0x00, 0x01, 0, 0, 0, 4];
    m.extend_from_slice(b"bulk");
    m.extend_from_slice(&1i32.to_be_bytes());
    m.extend_from_slice(&[15, 0, 1, 8]);
    m.extend_from_slice(&(n as i32).to_be_bytes());
    for i in 0..n {
        m.extend_from_slice(&(i as i32).to_be_bytes());
    }
    m.push(0);
    m
}

/// A 16 MiB unframed message, whole and as it arrives from a socket in 1,460-byte reads: the
/// walk goes on where the previous read stopped, so both cost about the same.
fn codec_unframed_in_pieces(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec-unframed-16MiB");
    g.sample_size(10);
    let limits = DecoderLimits {
        max_frame: 17 << 20,
        max_depth: 64,
    };
    let message = unframed_list((16 << 20) / 4 - 8);
    g.throughput(Throughput::Bytes(message.len() as u64));
    for piece in [message.len(), 1460] {
        let label = if piece == message.len() {
            "whole".to_owned()
        } else {
            format!("{piece}-byte reads")
        };
        g.bench_function(label, |b| {
            b.iter(|| {
                let mut decoder = Decoder::detecting(limits);
                let mut buf = BytesMut::with_capacity(message.len());
                let mut found = None;
                for chunk in message.chunks(piece) {
                    buf.extend_from_slice(chunk);
                    if let Some(m) = decoder.decode(&mut buf).expect("valid") {
                        found = Some(m);
                    }
                }
                black_box(found.expect("whole"))
            });
        });
    }
    g.finish();
}

fn router(c: &mut Criterion) {
    let mut yaml = String::from("listeners:\n");
    for i in 0..1000 {
        yaml += &format!(
            "  - address: 10.96.{}.{}:9090\n    filter_chains: [ {{ tcp_proxy: {{ cluster: c }} }} ]\n",
            i / 256,
            i % 256
        );
    }
    yaml += "clusters:\n  - name: c\n    endpoints: [ { address: 10.0.0.1:9090 } ]\n";
    let state = State::new(Default::default());
    state.apply(config::file::parse(&yaml, "bench").expect("configuration"));
    let snap = state.load();
    let dst: SocketAddr = "10.96.3.200:9090".parse().expect("address");
    let src: SocketAddr = "10.0.0.9:40000".parse().expect("address");
    c.bench_function("router/select among 1000 listeners", |b| {
        b.iter(|| {
            matches!(
                snap.select(black_box(dst), src, &Default::default()),
                Selection::Chain(..)
            )
        })
    });
}

/// An endpoint with a real latency average (least request weighs it at every pick).
struct Ep(Endpoint, tern::latency::PeakEwma);

impl Candidate for Ep {
    fn config(&self) -> &Endpoint {
        &self.0
    }
    fn active(&self) -> u64 {
        0
    }
    fn latency(&self, now: std::time::Instant) -> f64 {
        self.1.weigh(now, 0)
    }
    fn ejected(&self) -> bool {
        false
    }
}

fn balancer(c: &mut Criterion) {
    let mut g = c.benchmark_group("balancer");
    let endpoints: Vec<Ep> = (0..100u32)
        .map(|i| {
            Ep(
                Endpoint {
                    address: SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 9090)),
                    weight: 1 + i % 3,
                    priority: 0,
                    locality: "".into(),
                    health: Default::default(),
                    metadata: None,
                },
                Default::default(),
            )
        })
        .collect();
    let configs: Vec<Endpoint> = endpoints.iter().map(|e| e.0.clone()).collect();
    for (name, policy) in [
        ("round_robin", LbPolicy::RoundRobin),
        ("least_request", LbPolicy::LeastRequest),
        ("random", LbPolicy::Random),
        ("ring_hash", LbPolicy::RingHash),
        ("maglev", LbPolicy::Maglev),
    ] {
        let picker = EndpointPicker::new(policy, &configs, &BTreeMap::new(), &Default::default());
        let mut key = 0u64;
        g.bench_function(BenchmarkId::new(name, "100 endpoints"), |b| {
            b.iter(|| {
                key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                black_box(picker.pick(&endpoints, Some(key), &[], std::time::Instant::now()))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec, codec_unframed_in_pieces, router, balancer);
criterion_main!(benches);
