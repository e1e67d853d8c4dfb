//! The codec's steady state allocates nothing: cutting messages out of the read buffer,
//! reading their names and headers and rewriting sequence ids reuse the buffer's memory.
//! A counting global allocator (this test binary's own) measures it.
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tern::thrift::{Decoder, DecoderLimits};

#[path = "support/counting_alloc.rs"]
#[allow(unsafe_code)] // a GlobalAlloc (an unsafe trait) forwarding to the system's
mod counting_alloc;
use counting_alloc::{ALLOCATIONS, COUNTING};

/// A framed binary call `Calc:add` with one i32 argument.
fn framed_call(seq: i32) -> Vec<u8> {
    let mut msg = vec![0x80, 0x01, 0x00, 0x01, 0, 0, 0, 8];
    msg.extend_from_slice(b"Calc:add");
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(&[8, 0, 1, 0, 0, 0, 42, 0]);
    let mut framed = (msg.len() as i32).to_be_bytes().to_vec();
    framed.extend(msg);
    framed
}

#[test]
fn decoding_and_rewriting_allocate_nothing_per_message() {
    const N: usize = 10_000;
    let one = framed_call(1);
    let mut buf = BytesMut::with_capacity(one.len() * (N + 1));
    for _ in 0..=N {
        buf.extend_from_slice(&one);
    }
    let mut decoder = Decoder::detecting(DecoderLimits::default());
    // The first split turns the buffer into shared storage: a one-time allocation.
    drop(decoder.decode(&mut buf).unwrap().unwrap());

    COUNTING.with(|c| c.set(true));
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut total = 0usize;
    for i in 0..N {
        let mut m = decoder.decode(&mut buf).unwrap().expect("a message");
        total += m.method().len() + usize::from(m.service().is_some());
        m.set_seq_id(i as i32).unwrap();
        let wire = m.into_bytes();
        total += wire.len();
        drop(wire);
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    COUNTING.with(|c| c.set(false));
    assert!(total > 0);
    assert_eq!(allocations, 0, "{allocations} allocations for {N} messages");
}
