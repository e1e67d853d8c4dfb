//! tern's benchmarks: the Thrift wire format the load generator and the echo server speak,
//! and the result of one load run.
//!
//! Every call is `echo(1: binary data)` in framed strict binary Thrift, encoded once with the
//! `thrift` crate; per call only the sequence id changes. The echo server's reply is the call
//! with its message type set to REPLY and its field id set to 0 (the result), so a reply is
//! exactly as long as its call and both sides can check it without decoding.
#![forbid(unsafe_code)]
use serde::{Deserialize, Serialize};
use thrift::protocol::{
    TBinaryOutputProtocol, TFieldIdentifier, TMessageIdentifier, TMessageType, TOutputProtocol,
    TStructIdentifier, TType,
};

pub mod report;

/// Offset of the sequence id in a framed message: frame length, version word, name length,
/// the name `echo`.
pub const SEQ_OFFSET: usize = 4 + 4 + 4 + 4;
/// Offset of the message type byte (the version word's last byte).
pub const TYPE_OFFSET: usize = 4 + 3;
/// Offset of the first field's id (after the sequence id and the field type byte).
pub const FIELD_ID_OFFSET: usize = SEQ_OFFSET + 4 + 1;

const CALL: u8 = 1;
const REPLY: u8 = 2;

/// A framed `echo` call carrying `size` bytes, with sequence id 0.
pub fn echo_call(size: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size + 64);
    {
        let mut o = TBinaryOutputProtocol::new(&mut body, true);
        let data = vec![b'x'; size];
        o.write_message_begin(&TMessageIdentifier::new("echo", TMessageType::Call, 0))
            .and_then(|()| o.write_struct_begin(&TStructIdentifier::new("args")))
            .and_then(|()| o.write_field_begin(&TFieldIdentifier::new("data", TType::String, 1)))
            .and_then(|()| o.write_bytes(&data))
            .and_then(|()| o.write_field_end())
            .and_then(|()| o.write_field_stop())
            .and_then(|()| o.write_struct_end())
            .and_then(|()| o.write_message_end())
            .expect("encoding into memory cannot fail");
    }
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Writes `seq` into a framed call.
pub fn set_seq(frame: &mut [u8], seq: i32) {
    frame[SEQ_OFFSET..SEQ_OFFSET + 4].copy_from_slice(&seq.to_be_bytes());
}

/// The sequence id of a framed message.
pub fn seq(frame: &[u8]) -> i32 {
    i32::from_be_bytes(
        frame[SEQ_OFFSET..SEQ_OFFSET + 4]
            .try_into()
            .expect("4 bytes"),
    )
}

/// Whether a framed message is an `echo` call this server answers.
pub fn is_echo_call(frame: &[u8]) -> bool {
    frame.len() > FIELD_ID_OFFSET + 2
        && frame[4..8] == [0x80, 0x01, 0x00, CALL]
        && frame[8..16] == [0, 0, 0, 4, b'e', b'c', b'h', b'o']
}

/// Turns an `echo` call into its reply, in place.
pub fn into_reply(frame: &mut [u8]) {
    frame[TYPE_OFFSET] = REPLY;
    frame[FIELD_ID_OFFSET..FIELD_ID_OFFSET + 2].copy_from_slice(&[0, 0]);
}

/// Whether a framed message is the reply to the call with sequence id `seq`.
pub fn is_reply_to(frame: &[u8], seq_id: i32) -> bool {
    frame.len() > SEQ_OFFSET + 4 && frame[4..8] == [0x80, 0x01, 0x00, REPLY] && seq(frame) == seq_id
}

/// What one load run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Calls answered within the measured window.
    pub requests: u64,
    /// Calls answered in the whole run, warm-up included (what a proxy's CPU time covers).
    pub total: u64,
    /// Calls that failed (I/O error, a wrong reply).
    pub errors: u64,
    /// Length of the measured window, in seconds.
    pub secs: f64,
    pub rps: f64,
    /// Call latency percentiles, in microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Churn mode: `connect()` latency percentiles, in microseconds.
    pub connect_p50_us: Option<f64>,
    pub connect_p99_us: Option<f64>,
    /// Every call's latency in the measured window, as (µs, calls) ascending: the rounds of
    /// one path pool these, so their percentiles come from all of its calls.
    #[serde(default)]
    pub calls_us: Vec<(u64, u64)>,
}

impl LoadResult {
    /// One result from runs of the same load taken in slices: their calls and seconds added,
    /// percentiles over all their calls (connect percentiles, which have no histogram, are
    /// the slices' median). `None` for no slice.
    pub fn merged(slices: &[LoadResult]) -> Option<LoadResult> {
        if slices.is_empty() {
            return None;
        }
        let mut pooled = std::collections::BTreeMap::<u64, u64>::new();
        for &(us, n) in slices.iter().flat_map(|s| &s.calls_us) {
            *pooled.entry(us).or_default() += n;
        }
        let calls_us: Vec<(u64, u64)> = pooled.into_iter().collect();
        let quantile = |q| pooled_quantile([&calls_us[..]], q);
        let sum = |f: fn(&LoadResult) -> u64| slices.iter().map(f).sum::<u64>();
        let median = |f: fn(&LoadResult) -> Option<f64>| {
            let v: Vec<f64> = slices.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| report::median(v))
        };
        let secs: f64 = slices.iter().map(|s| s.secs).sum();
        let requests = sum(|s| s.requests);
        Some(LoadResult {
            requests,
            total: sum(|s| s.total),
            errors: sum(|s| s.errors),
            secs,
            rps: requests as f64 / secs.max(f64::MIN_POSITIVE),
            p50_us: quantile(0.5),
            p99_us: quantile(0.99),
            p999_us: quantile(0.999),
            connect_p50_us: median(|s| s.connect_p50_us),
            connect_p99_us: median(|s| s.connect_p99_us),
            calls_us,
        })
    }
}

/// The `q` quantile (0 to 1) of latency histograms pooled together, each (µs, calls); NaN
/// when they hold no call.
pub fn pooled_quantile<'a>(histograms: impl IntoIterator<Item = &'a [(u64, u64)]>, q: f64) -> f64 {
    let mut pooled = std::collections::BTreeMap::<u64, u64>::new();
    for h in histograms {
        for &(us, n) in h {
            *pooled.entry(us).or_default() += n;
        }
    }
    let total: u64 = pooled.values().sum();
    if total == 0 {
        return f64::NAN;
    }
    // The smallest value with at least `q` of the calls at or below it (as HdrHistogram's
    // `value_at_quantile` counts).
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (&us, &n) in &pooled {
        seen += n;
        if seen >= rank {
            return us as f64;
        }
    }
    f64::NAN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_quantiles_count_every_histograms_calls() {
        let quick: &[(u64, u64)] = &[(10, 98), (20, 2)];
        let slow: &[(u64, u64)] = &[(15, 50), (500, 50)];
        assert_eq!(pooled_quantile([quick], 0.5), 10.0);
        assert_eq!(pooled_quantile([quick], 0.99), 20.0);
        // 200 calls: 98 at 10, 50 at 15, 2 at 20, 50 at 500.
        assert_eq!(pooled_quantile([quick, slow], 0.5), 15.0);
        assert_eq!(pooled_quantile([quick, slow], 0.75), 20.0);
        assert_eq!(pooled_quantile([quick, slow], 0.99), 500.0);
        assert!(pooled_quantile([], 0.5).is_nan());
    }

    #[test]
    fn slices_merge_into_one_run_of_all_their_calls() {
        let slice = |calls_us: Vec<(u64, u64)>, secs: f64| {
            let requests = calls_us.iter().map(|c| c.1).sum();
            LoadResult {
                requests,
                total: requests + 10,
                errors: 1,
                secs,
                rps: requests as f64 / secs,
                calls_us,
                ..LoadResult::default()
            }
        };
        assert!(LoadResult::merged(&[]).is_none());
        // 200 calls in 2 s: the slow slice's tail is the merged run's p99, though it is
        // only one slice's.
        let merged = LoadResult::merged(&[
            slice(vec![(10, 99), (20, 1)], 1.0),
            slice(vec![(10, 97), (900, 3)], 1.0),
        ])
        .unwrap();
        assert_eq!(
            (merged.requests, merged.total, merged.errors),
            (200, 220, 2)
        );
        assert_eq!((merged.secs, merged.rps), (2.0, 100.0));
        assert_eq!(
            (merged.p50_us, merged.p99_us, merged.p999_us),
            (10.0, 900.0, 900.0)
        );
        assert_eq!(merged.calls_us, vec![(10, 196), (20, 1), (900, 3)]);
        assert_eq!(merged.connect_p99_us, None);
    }

    #[test]
    fn a_reply_is_the_call_with_type_and_field_id_changed() {
        let mut call = echo_call(100);
        set_seq(&mut call, 42);
        assert!(is_echo_call(&call));
        assert_eq!(seq(&call), 42);
        let mut reply = call.clone();
        into_reply(&mut reply);
        assert!(is_reply_to(&reply, 42));
        assert!(!is_reply_to(&reply, 41));
        assert!(!is_reply_to(&call, 42));
        // The call decodes with the thrift crate as `echo(1: data)`.
        use thrift::protocol::{TBinaryInputProtocol, TInputProtocol};
        let mut i = TBinaryInputProtocol::new(&call[4..], true);
        let m = i.read_message_begin().unwrap();
        assert_eq!((m.name.as_str(), m.sequence_number), ("echo", 42));
        i.read_struct_begin().unwrap();
        let f = i.read_field_begin().unwrap();
        assert_eq!(f.id, Some(1));
        assert_eq!(i.read_bytes().unwrap().len(), 100);
        // And the reply as the result field 0.
        let mut i = TBinaryInputProtocol::new(&reply[4..], true);
        let m = i.read_message_begin().unwrap();
        assert_eq!(m.message_type, TMessageType::Reply);
        i.read_struct_begin().unwrap();
        assert_eq!(i.read_field_begin().unwrap().id, Some(0));
    }
}
