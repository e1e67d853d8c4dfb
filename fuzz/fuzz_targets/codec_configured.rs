//! The codec with a configured transport and protocol (first input byte), including old
//! non-strict binary — the upstream side reads replies this way.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tern::thrift::{Decoder, DecoderLimits, Protocol, Transport};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let transport = match selector % 3 {
        0 => Transport::Framed,
        1 => Transport::Unframed,
        _ => Transport::Header,
    };
    let protocol = if selector & 4 == 0 {
        Protocol::Binary
    } else {
        Protocol::Compact
    };
    let limits = DecoderLimits {
        max_frame: 1 << 20,
        max_depth: 16,
    };
    let mut d = Decoder::configured(limits, transport, protocol, selector & 8 != 0);
    let mut buf = BytesMut::from(input);
    while let Ok(Some(m)) = d.decode(&mut buf) {
        let _ = (m.name(), m.kind(), m.reply_result(), m.header(b"k"));
    }
});
