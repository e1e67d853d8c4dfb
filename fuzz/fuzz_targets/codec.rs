//! The Thrift codec on a client's bytes, as tern reads them: transport and protocol detected,
//! messages cut out, names and THeader headers read, sequence ids rewritten. The same bytes
//! arriving in pieces (sizes from the input) must give exactly what they give in one piece,
//! which checks the resumable walk of unframed bodies against itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tern::thrift::{Decoder, DecoderLimits, frame::sniff};

fn limits() -> DecoderLimits {
    DecoderLimits {
        max_frame: 1 << 20,
        max_depth: 16,
    }
}

/// Every message the bytes hold, in order, and how decoding ended.
fn decode_all(input: &[u8], piece: usize) -> (Vec<Vec<u8>>, bool) {
    let mut d = Decoder::detecting(limits());
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in input.chunks(piece.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(mut m)) => {
                    let _ = (m.name(), m.service(), m.method(), m.reply_result());
                    let _ = m.header(b"x-cluster");
                    let (seq, len) = (m.seq_id(), m.seq_len());
                    let other = if len >= 4 { seq ^ 0x5a5a } else { seq ^ 1 };
                    if m.set_seq_id(other).is_ok() {
                        assert_eq!(m.seq_id(), other);
                        m.set_seq_id(seq).expect("the original id fits");
                    }
                    out.push(m.into_bytes().to_vec());
                }
                Ok(None) => break,
                Err(_) => return (out, false),
            }
        }
    }
    (out, true)
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, input)) = data.split_first() else {
        return;
    };
    let _ = sniff(&mut Decoder::detecting(limits()), input);
    let whole = decode_all(input, input.len());
    let pieces = decode_all(input, usize::from(piece % 64) + 1);
    // An error may be found earlier in pieces only if the messages before it are the same.
    if whole.1 && pieces.1 {
        assert_eq!(whole.0, pieces.0, "pieces of {} bytes", piece % 64 + 1);
    } else {
        let n = whole.0.len().min(pieces.0.len());
        assert_eq!(whole.0[..n], pieces.0[..n]);
    }
});
