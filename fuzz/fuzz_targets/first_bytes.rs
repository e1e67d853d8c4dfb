//! A connection's first bytes, as the filter-chain inspection reads them (TLS ClientHello,
//! plaintext HTTP): any bytes, whole or cut anywhere, never panic, and a verdict on a prefix
//! that is final stays final.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::filters::inspect::{Verdict, examine};

fuzz_target!(|data: &[u8]| {
    let whole = examine(data);
    for cut in 0..data.len().min(64) {
        if let Verdict::Done(early) = examine(&data[..cut]) {
            // An answer given early cannot change with more bytes.
            assert_eq!(Verdict::Done(early), whole, "cut at {cut}");
            break;
        }
    }
});
