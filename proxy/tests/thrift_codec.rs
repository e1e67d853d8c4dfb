//! Property tests of tern's Thrift codec against the `thrift` crate, an independent encoder:
//! every message it encodes — any field types, nested structs, lists, sets and maps, empty
//! and large — is cut out by tern byte-for-byte, rewritten in its sequence id only, and still
//! read by the `thrift` crate afterwards.
use std::{cell::RefCell, io::Write, rc::Rc};

use bytes::BytesMut;
use proptest::prelude::*;
use tern::thrift::{Decoder, DecoderLimits, Protocol, Transport, frame::seq_id_fits};
use thrift::protocol::{
    TBinaryInputProtocol, TBinaryOutputProtocol, TCompactInputProtocol, TCompactOutputProtocol,
    TFieldIdentifier, TInputProtocol, TListIdentifier, TMapIdentifier, TMessageIdentifier,
    TMessageType, TOutputProtocol, TSetIdentifier, TStructIdentifier, TType,
};
use thrift::transport::TFramedWriteTransport;

/// A Thrift type, so containers can be homogeneous.
#[derive(Clone, Debug)]
enum Ty {
    Bool,
    Byte,
    I16,
    I32,
    I64,
    Double,
    Str,
    Struct(Vec<(i16, Ty)>),
    List(Box<Ty>),
    Set(Box<Ty>),
    Map(Box<Ty>, Box<Ty>),
}

#[derive(Clone, Debug)]
enum V {
    Bool(bool),
    Byte(i8),
    I16(i16),
    I32(i32),
    I64(i64),
    Double(f64),
    Str(Vec<u8>),
    Struct(Vec<(i16, V)>),
    List(Ty, Vec<V>),
    Set(Ty, Vec<V>),
    Map(Ty, Ty, Vec<(V, V)>),
}

fn ttype(ty: &Ty) -> TType {
    match ty {
        Ty::Bool => TType::Bool,
        Ty::Byte => TType::I08,
        Ty::I16 => TType::I16,
        Ty::I32 => TType::I32,
        Ty::I64 => TType::I64,
        Ty::Double => TType::Double,
        Ty::Str => TType::String,
        Ty::Struct(_) => TType::Struct,
        Ty::List(_) => TType::List,
        Ty::Set(_) => TType::Set,
        Ty::Map(..) => TType::Map,
    }
}

fn ty_strategy() -> impl Strategy<Value = Ty> {
    let leaf = prop_oneof![
        Just(Ty::Bool),
        Just(Ty::Byte),
        Just(Ty::I16),
        Just(Ty::I32),
        Just(Ty::I64),
        Just(Ty::Double),
        Just(Ty::Str),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            (prop::collection::vec(inner.clone(), 0..5), 1i16..40).prop_map(|(fields, gap)| {
                Ty::Struct(
                    fields
                        .into_iter()
                        .enumerate()
                        .map(|(i, t)| (1 + i as i16 * gap, t))
                        .collect(),
                )
            }),
            inner.clone().prop_map(|t| Ty::List(Box::new(t))),
            inner.clone().prop_map(|t| Ty::Set(Box::new(t))),
            (inner.clone(), inner).prop_map(|(k, v)| Ty::Map(Box::new(k), Box::new(v))),
        ]
    })
}

fn value(ty: &Ty) -> BoxedStrategy<V> {
    match ty {
        Ty::Bool => any::<bool>().prop_map(V::Bool).boxed(),
        Ty::Byte => any::<i8>().prop_map(V::Byte).boxed(),
        Ty::I16 => any::<i16>().prop_map(V::I16).boxed(),
        Ty::I32 => any::<i32>().prop_map(V::I32).boxed(),
        Ty::I64 => any::<i64>().prop_map(V::I64).boxed(),
        Ty::Double => any::<f64>().prop_map(V::Double).boxed(),
        Ty::Str => prop::collection::vec(any::<u8>(), 0..40)
            .prop_map(V::Str)
            .boxed(),
        Ty::Struct(fields) => {
            let ids: Vec<i16> = fields.iter().map(|(id, _)| *id).collect();
            fields
                .iter()
                .map(|(_, t)| value(t))
                .collect::<Vec<_>>()
                .prop_map(move |vs| V::Struct(ids.iter().copied().zip(vs).collect()))
                .boxed()
        }
        Ty::List(e) | Ty::Set(e) => {
            let is_list = matches!(ty, Ty::List(_));
            let e2 = (**e).clone();
            prop::collection::vec(value(e), 0..4)
                .prop_map(move |items| {
                    if is_list {
                        V::List(e2.clone(), items)
                    } else {
                        V::Set(e2.clone(), items)
                    }
                })
                .boxed()
        }
        Ty::Map(k, v) => {
            let (k2, v2) = ((**k).clone(), (**v).clone());
            prop::collection::vec((value(k), value(v)), 0..4)
                .prop_map(move |pairs| V::Map(k2.clone(), v2.clone(), pairs))
                .boxed()
        }
    }
}

fn ty_of(v: &V) -> TType {
    match v {
        V::Bool(_) => TType::Bool,
        V::Byte(_) => TType::I08,
        V::I16(_) => TType::I16,
        V::I32(_) => TType::I32,
        V::I64(_) => TType::I64,
        V::Double(_) => TType::Double,
        V::Str(_) => TType::String,
        V::Struct(_) => TType::Struct,
        V::List(..) => TType::List,
        V::Set(..) => TType::Set,
        V::Map(..) => TType::Map,
    }
}

fn write(p: &mut dyn TOutputProtocol, v: &V) -> thrift::Result<()> {
    match v {
        V::Bool(b) => p.write_bool(*b),
        V::Byte(x) => p.write_i8(*x),
        V::I16(x) => p.write_i16(*x),
        V::I32(x) => p.write_i32(*x),
        V::I64(x) => p.write_i64(*x),
        V::Double(x) => p.write_double(*x),
        V::Str(s) => p.write_bytes(s),
        V::Struct(fields) => {
            p.write_struct_begin(&TStructIdentifier::new("S"))?;
            for (id, f) in fields {
                p.write_field_begin(&TFieldIdentifier::new("f", ty_of(f), *id))?;
                write(p, f)?;
                p.write_field_end()?;
            }
            p.write_field_stop()?;
            p.write_struct_end()
        }
        V::List(t, items) => {
            p.write_list_begin(&TListIdentifier::new(ttype(t), items.len() as i32))?;
            for i in items {
                write(p, i)?;
            }
            p.write_list_end()
        }
        V::Set(t, items) => {
            p.write_set_begin(&TSetIdentifier::new(ttype(t), items.len() as i32))?;
            for i in items {
                write(p, i)?;
            }
            p.write_set_end()
        }
        V::Map(k, vt, pairs) => {
            p.write_map_begin(&TMapIdentifier::new(
                ttype(k),
                ttype(vt),
                pairs.len() as i32,
            ))?;
            for (a, b) in pairs {
                write(p, a)?;
                write(p, b)?;
            }
            p.write_map_end()
        }
    }
}

/// A `Write` whose bytes stay readable after the transport that wrote them is dropped.
#[derive(Clone, Default)]
struct Sink(Rc<RefCell<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
enum Format {
    Framed(Protocol),
    Unframed(Protocol),
    Header(Protocol),
    /// Old binary without the version word, framed; only accepted when configured.
    NonStrictFramed,
}

const FORMATS: [Format; 7] = [
    Format::Framed(Protocol::Binary),
    Format::Framed(Protocol::Compact),
    Format::Unframed(Protocol::Binary),
    Format::Unframed(Protocol::Compact),
    Format::Header(Protocol::Binary),
    Format::Header(Protocol::Compact),
    Format::NonStrictFramed,
];

fn message_type(kind: u8) -> TMessageType {
    match kind % 4 {
        0 => TMessageType::Call,
        1 => TMessageType::Reply,
        2 => TMessageType::Exception,
        _ => TMessageType::OneWay,
    }
}

/// Encodes one message with the `thrift` crate in `format`.
fn encode(format: Format, name: &str, kind: TMessageType, seq: i32, body: &V) -> Vec<u8> {
    let sink = Sink::default();
    let ident = TMessageIdentifier::new(name, kind, seq);
    let write_msg = |p: &mut dyn TOutputProtocol| {
        p.write_message_begin(&ident).unwrap();
        write(p, body).unwrap();
        p.write_message_end().unwrap();
        p.flush().unwrap();
    };
    match format {
        Format::NonStrictFramed => write_msg(&mut TBinaryOutputProtocol::new(
            TFramedWriteTransport::new(sink.clone()),
            false,
        )),
        Format::Framed(Protocol::Binary) => write_msg(&mut TBinaryOutputProtocol::new(
            TFramedWriteTransport::new(sink.clone()),
            true,
        )),
        Format::Framed(Protocol::Compact) => write_msg(&mut TCompactOutputProtocol::new(
            TFramedWriteTransport::new(sink.clone()),
        )),
        Format::Unframed(Protocol::Binary) | Format::Header(Protocol::Binary) => {
            write_msg(&mut TBinaryOutputProtocol::new(sink.clone(), true))
        }
        Format::Unframed(Protocol::Compact) | Format::Header(Protocol::Compact) => {
            write_msg(&mut TCompactOutputProtocol::new(sink.clone()))
        }
    }
    let payload = sink.0.borrow().clone();
    match format {
        Format::Header(proto) => theader(
            proto,
            seq,
            &payload,
            &[("trace-id", "abc"), ("route", "v2")],
        ),
        _ => payload,
    }
}

/// Wraps a payload in a THeader frame with info headers (the `thrift` crate has no THeader).
fn theader(proto: Protocol, seq: i32, payload: &[u8], headers: &[(&str, &str)]) -> Vec<u8> {
    let mut h = vec![
        if proto == Protocol::Binary { 0 } else { 2 },
        0,
        1,
        headers.len() as u8,
    ];
    for (k, v) in headers {
        h.push(k.len() as u8);
        h.extend_from_slice(k.as_bytes());
        h.push(v.len() as u8);
        h.extend_from_slice(v.as_bytes());
    }
    while h.len() % 4 != 0 {
        h.push(0);
    }
    let mut out = ((10 + h.len() + payload.len()) as i32)
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(&[0x0f, 0xff, 0, 0]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&((h.len() / 4) as u16).to_be_bytes());
    out.extend(h);
    out.extend_from_slice(payload);
    out
}

/// Reads (and drops) one value with the `thrift` crate; strings as bytes, since the `thrift`
/// crate's own `skip` insists on UTF-8.
fn read_value(p: &mut dyn TInputProtocol, t: TType) -> thrift::Result<()> {
    match t {
        TType::Bool => p.read_bool().map(drop),
        TType::I08 => p.read_i8().map(drop),
        TType::I16 => p.read_i16().map(drop),
        TType::I32 => p.read_i32().map(drop),
        TType::I64 => p.read_i64().map(drop),
        TType::Double => p.read_double().map(drop),
        TType::String => p.read_bytes().map(drop),
        TType::Struct => {
            p.read_struct_begin()?;
            loop {
                let f = p.read_field_begin()?;
                if f.field_type == TType::Stop {
                    break;
                }
                read_value(p, f.field_type)?;
                p.read_field_end()?;
            }
            p.read_struct_end()
        }
        TType::List => {
            let l = p.read_list_begin()?;
            for _ in 0..l.size {
                read_value(p, l.element_type)?;
            }
            p.read_list_end()
        }
        TType::Set => {
            let l = p.read_set_begin()?;
            for _ in 0..l.size {
                read_value(p, l.element_type)?;
            }
            p.read_set_end()
        }
        TType::Map => {
            let m = p.read_map_begin()?;
            for _ in 0..m.size {
                read_value(p, m.key_type.expect("a map with entries has a key type"))?;
                read_value(
                    p,
                    m.value_type.expect("a map with entries has a value type"),
                )?;
            }
            p.read_map_end()
        }
        other => panic!("unexpected type {other:?}"),
    }
}

fn decoder(format: Format) -> Decoder {
    match format {
        Format::NonStrictFramed => Decoder::configured(
            DecoderLimits::default(),
            Transport::Framed,
            Protocol::Binary,
            true,
        ),
        _ => Decoder::detecting(DecoderLimits::default()),
    }
}

/// Reads a message back with the `thrift` crate and returns its identifier.
fn read_back(format: Format, bytes: &[u8]) -> TMessageIdentifier {
    let (proto, payload): (Protocol, &[u8]) = match format {
        Format::Framed(p) => (p, &bytes[4..]),
        Format::NonStrictFramed => (Protocol::Binary, &bytes[4..]),
        Format::Unframed(p) => (p, bytes),
        Format::Header(p) => {
            let words = u16::from_be_bytes([bytes[12], bytes[13]]) as usize;
            (p, &bytes[14 + words * 4..])
        }
    };
    let strict = !matches!(format, Format::NonStrictFramed);
    let mut input: Box<dyn TInputProtocol> = match proto {
        Protocol::Binary => Box::new(TBinaryInputProtocol::new(payload, strict)),
        Protocol::Compact => Box::new(TCompactInputProtocol::new(payload)),
    };
    let ident = input
        .read_message_begin()
        .expect("thrift reads tern's bytes");
    read_value(&mut *input, TType::Struct).expect("thrift reads the body");
    input.read_message_end().unwrap();
    ident
}

fn check(format: Format, name: &str, kind: u8, seq: i32, body: &V, split: usize, new_seq: i32) {
    let kind = message_type(kind);
    let wire = encode(format, name, kind, seq, body);

    // Arriving in two pieces: nothing until the message is whole.
    let mut d = decoder(format);
    let split = split % wire.len();
    let mut buf = BytesMut::from(&wire[..split]);
    if let Some(m) = d.decode(&mut buf).unwrap() {
        panic!(
            "{format:?}: a message from {split} of {} bytes: {m:?}",
            wire.len()
        );
    }
    buf.extend_from_slice(&wire[split..]);
    buf.extend_from_slice(&wire); // a second, pipelined copy
    let mut m = d.decode(&mut buf).unwrap().expect("a whole message");
    assert_eq!(m.as_bytes(), &wire[..], "{format:?}: bytes differ");
    assert_eq!(m.name(), name.as_bytes());
    assert_eq!(m.seq_id(), seq);
    assert_eq!(m.kind() as u8, u8::from(kind));
    if let Format::Header(_) = format {
        assert_eq!(m.header(b"route"), Some(&b"v2"[..]));
        assert_eq!(m.header(b"trace-id"), Some(&b"abc"[..]));
    }
    let second = d.decode(&mut buf).unwrap().expect("the pipelined copy");
    assert_eq!(second.as_bytes(), &wire[..]);
    assert!(buf.is_empty());

    // Arriving in small pieces (the walk goes on where it stopped): the same message, once.
    let mut d = decoder(format);
    let mut buf = BytesMut::new();
    let piece = 1 + split % 7;
    let mut whole = None;
    for (i, chunk) in wire.chunks(piece).enumerate() {
        buf.extend_from_slice(chunk);
        if let Some(m) = d.decode(&mut buf).unwrap() {
            assert!((i + 1) * piece >= wire.len(), "{format:?}: cut early");
            whole = Some(m);
        }
    }
    assert_eq!(whole.expect("a whole message").as_bytes(), &wire[..]);

    // Rewriting the sequence id changes only it, and the thrift crate reads the new one.
    let new_seq = if seq_id_fits(new_seq, m.seq_len()) {
        new_seq
    } else {
        new_seq & 0x7f
    };
    m.set_seq_id(new_seq).unwrap();
    let rewritten = m.as_bytes().to_vec();
    let ident = read_back(format, &rewritten);
    assert_eq!(ident.sequence_number, new_seq);
    assert_eq!(ident.name, name);
    m.set_seq_id(seq).unwrap();
    assert_eq!(
        m.into_bytes(),
        wire,
        "{format:?}: restoring the id restores the bytes"
    );
}

fn name_strategy() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z_]{0,12}", "[A-Z][a-z]{1,8}:[a-z]{1,10}"]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_thrift_message_round_trips(
        (body_ty, body) in ty_strategy()
            .prop_map(|t| Ty::Struct(vec![(1, t)]))
            .prop_flat_map(|t| (Just(t.clone()), value(&t))),
        name in name_strategy(),
        kind in 0u8..4,
        seq in any::<i32>(),
        new_seq in any::<i32>(),
        split in any::<usize>(),
    ) {
        let _ = body_ty;
        for format in FORMATS {
            check(format, &name, kind, seq, &body, split, new_seq);
        }
    }
}

#[test]
fn empty_and_large_messages_round_trip() {
    let empty = V::Struct(vec![]);
    let large = V::Struct(vec![(1, V::Str(vec![0xab; 1 << 20]))]);
    for format in FORMATS {
        check(format, "", 1, 0, &empty, 3, 5);
        check(format, "Store:put", 1, 1 << 20, &large, 1 << 19, 99);
    }
}

/// A local reply is a `TApplicationException` the `thrift` crate reads in the request's own
/// transport, protocol, name and sequence id.
#[test]
fn local_replies_are_application_exceptions_in_the_callers_encoding() {
    use tern::thrift::{
        MessageType,
        reply::{AppExceptionType, application_exception},
    };
    for format in FORMATS {
        if matches!(format, Format::NonStrictFramed) {
            continue; // tern answers non-strict callers in strict binary, which they also read
        }
        let request = encode(
            format,
            "Calc:add",
            TMessageType::Call,
            4242,
            &V::Struct(vec![]),
        );
        let m = decoder(format)
            .decode(&mut BytesMut::from(&request[..]))
            .unwrap()
            .unwrap();
        let reply = application_exception(
            &m.meta(),
            m.name(),
            m.seq_id(),
            AppExceptionType::InternalError,
            "no healthy upstream",
        );
        let r = decoder(format)
            .decode(&mut BytesMut::from(&reply[..]))
            .unwrap()
            .expect("a whole reply");
        assert_eq!(r.kind(), MessageType::Exception);
        assert_eq!((r.name(), r.seq_id()), (&b"Calc:add"[..], 4242));

        let (proto, payload): (Protocol, &[u8]) = match format {
            Format::Framed(p) => (p, &reply[4..]),
            Format::Unframed(p) => (p, &reply[..]),
            Format::Header(p) => (p, &reply[18..]),
            Format::NonStrictFramed => unreachable!(),
        };
        let mut input: Box<dyn TInputProtocol> = match proto {
            Protocol::Binary => Box::new(TBinaryInputProtocol::new(payload, true)),
            Protocol::Compact => Box::new(TCompactInputProtocol::new(payload)),
        };
        let ident = input.read_message_begin().unwrap();
        assert_eq!(ident.message_type, TMessageType::Exception);
        let e = thrift::Error::read_application_error_from_in_protocol(&mut *input).unwrap();
        assert_eq!(e.message, "no healthy upstream");
        assert_eq!(e.kind, thrift::ApplicationErrorKind::InternalError);
    }
}
