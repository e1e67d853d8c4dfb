//! Transports: detection from the first bytes, and cutting whole messages out of a read buffer.
//!
//! The split mirrors mini-redis: a cheap check finds where a message ends (reading a frame
//! length, or walking an unframed body), then the message is split off the buffer as its
//! own `BytesMut` — the same memory, no copy. Detection (Envoy's `AUTO_TRANSPORT` /
//! `AUTO_PROTOCOL`): bytes 4–5 `80 01` framed binary, byte 4 `82` framed compact, bytes 4–5
//! `0F FF` THeader, bytes 0–1 `80 01` unframed binary, byte 0 `82` unframed compact. Old
//! non-strict binary cannot be told from data and is accepted only when configured.
use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::{
    MessageType, Protocol, ThriftError, Transport,
    wire::{self, Cursor, Header, Short, Walk},
};

/// Bounds on what one connection may make tern buffer or walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderLimits {
    /// Largest message (frame) accepted, in bytes.
    pub max_frame: usize,
    /// Deepest nesting of structs and containers accepted.
    pub max_depth: usize,
}

impl Default for DecoderLimits {
    fn default() -> Self {
        Self {
            max_frame: 16 << 20,
            max_depth: 64,
        }
    }
}

const THEADER_MAGIC: u16 = 0x0fff;
/// Offset of the THeader sequence id in the frame (after length, magic and flags).
const THEADER_SEQ_AT: usize = 8;

/// What a message is, with offsets into its bytes; `Copy`, so it can outlive the bytes' owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub transport: Transport,
    pub protocol: Protocol,
    pub header: Header,
    /// THeader info section (key/value blocks), when the transport is THeader.
    pub info: Option<(usize, usize)>,
}

impl Meta {
    pub fn name_range(&self) -> Range<usize> {
        self.header.name_at..self.header.name_at + self.header.name_len
    }
}

/// One whole message as it was on the wire.
#[derive(Debug)]
pub struct Message {
    bytes: BytesMut,
    meta: Meta,
}

impl Message {
    /// Rebuilds a message from bytes this codec cut out earlier, with their `Meta` (a retry
    /// of a request whose connection never opened).
    pub fn from_parts(bytes: BytesMut, meta: Meta) -> Self {
        Self { bytes, meta }
    }

    pub fn meta(&self) -> Meta {
        self.meta
    }

    pub fn kind(&self) -> MessageType {
        self.meta.header.kind
    }

    pub fn seq_id(&self) -> i32 {
        self.meta.header.seq_id
    }

    /// Encoded length of the sequence id (4 in binary; 1–5 in compact).
    pub fn seq_len(&self) -> usize {
        self.meta.header.seq_len
    }

    /// The full name (`Service:method` when multiplexed).
    pub fn name(&self) -> &[u8] {
        &self.bytes[self.meta.name_range()]
    }

    /// The multiplexed service name, when the name has one.
    pub fn service(&self) -> Option<&[u8]> {
        split_name(self.name()).0
    }

    /// The method name without the multiplexed service prefix.
    pub fn method(&self) -> &[u8] {
        split_name(self.name()).1
    }

    /// What a reply says: its result struct's field 0 is the return value (or none, for void),
    /// fields 1+ are exceptions the IDL declares; an EXCEPTION message is a
    /// `TApplicationException`.
    pub fn reply_result(&self) -> ReplyResult {
        if self.kind() == MessageType::Exception {
            return ReplyResult::ApplicationException;
        }
        let at = self.meta.header.body_at;
        let field_id = match (self.meta.protocol, self.bytes.get(at)) {
            (_, None | Some(0)) => 0,
            (Protocol::Binary, Some(_)) => self
                .bytes
                .get(at + 1..at + 3)
                .map_or(0, |b| i16::from_be_bytes([b[0], b[1]])),
            (Protocol::Compact, Some(&b)) if b >> 4 != 0 => i16::from(b >> 4),
            (Protocol::Compact, Some(_)) => {
                let mut c = Cursor::at(&self.bytes, at + 1, true, self.bytes.len());
                c.varint(3)
                    .map_or(0, |z| ((z >> 1) as i16) ^ -((z & 1) as i16))
            }
        };
        if field_id == 0 {
            ReplyResult::Success
        } else {
            ReplyResult::DeclaredException
        }
    }

    /// The value of a THeader info header.
    pub fn header(&self, key: &[u8]) -> Option<&[u8]> {
        let (start, end) = self.meta.info?;
        let mut found = None;
        let _ = walk_info(&self.bytes[..end], start, |k, v| {
            if found.is_none() && k == key {
                found = Some(v);
            }
        });
        found
    }

    /// The ids that may replace this message's sequence id (see [`seq_id_in_class`]): 0 in
    /// binary, the id's varint length in compact.
    pub fn seq_class(&self) -> usize {
        match self.meta.protocol {
            Protocol::Binary => 0,
            Protocol::Compact => self.seq_len(),
        }
    }

    /// Rewrites the sequence id in place (and the THeader's copy of it). In compact the new
    /// id must fit the bytes the old one took: `7 * seq_len` bits; callers pick ids of the
    /// same varint length (see [`seq_id_fits`]).
    pub fn set_seq_id(&mut self, id: i32) -> Result<(), SeqIdTooLong> {
        let h = &mut self.meta.header;
        match self.meta.protocol {
            Protocol::Binary => {
                self.bytes[h.seq_at..h.seq_at + 4].copy_from_slice(&id.to_be_bytes());
            }
            Protocol::Compact => {
                if !seq_id_fits(id, h.seq_len) {
                    return Err(SeqIdTooLong { id, len: h.seq_len });
                }
                wire::write_varint_padded(&mut self.bytes[h.seq_at..], id as u32, h.seq_len);
            }
        }
        if self.meta.transport == Transport::Header {
            self.bytes[THEADER_SEQ_AT..THEADER_SEQ_AT + 4].copy_from_slice(&id.to_be_bytes());
        }
        h.seq_id = id;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The wire bytes, ready to write.
    pub fn into_bytes(self) -> Bytes {
        self.bytes.freeze()
    }
}

/// What a reply carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyResult {
    Success,
    /// One of the exceptions the method declares.
    DeclaredException,
    /// A `TApplicationException` (EXCEPTION message).
    ApplicationException,
}

impl ReplyResult {
    /// Every result, in declaration order (`result as usize` indexes this array).
    pub const ALL: [ReplyResult; 3] = [
        ReplyResult::Success,
        ReplyResult::DeclaredException,
        ReplyResult::ApplicationException,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReplyResult::Success => "success",
            ReplyResult::DeclaredException => "exception",
            ReplyResult::ApplicationException => "error",
        }
    }
}

/// A sequence id that does not fit the bytes of the one it replaces.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("sequence id {id} does not fit in {len} varint bytes")]
pub struct SeqIdTooLong {
    pub id: i32,
    pub len: usize,
}

/// Whether `id` can be written as a varint of exactly `len` bytes.
pub fn seq_id_fits(id: i32, len: usize) -> bool {
    len >= 5 || (id as u32) < (1u32 << (7 * len))
}

/// The `n`-th id (counting round) of a class of ids that may stand in for a client's: class 0
/// (binary) is every non-negative i32; class 1–5 (compact) the ids whose varint takes exactly
/// that many bytes, so the server's reply, which writes the id as short as it goes, has room
/// for the client's id again.
pub fn seq_id_in_class(class: usize, n: u32) -> i32 {
    let (lo, size) = seq_class_range(class);
    (lo + u64::from(n) % size) as u32 as i32
}

/// How many ids a class holds (see [`seq_id_in_class`]).
pub fn seq_class_size(class: usize) -> u64 {
    seq_class_range(class).1
}

/// A class's first id (as a `u32`) and how many ids follow it.
fn seq_class_range(class: usize) -> (u64, u64) {
    match class {
        0 => (0, 1 << 31),
        1 => (0, 1 << 7),
        l => {
            let lo = 1u64 << (7 * (l.min(5) - 1));
            let hi = (1u64 << (7 * l.min(5))).min(1 << 32);
            (lo, hi - lo)
        }
    }
}

/// Splits `Service:method` at the first colon.
pub fn split_name(name: &[u8]) -> (Option<&[u8]>, &[u8]) {
    match name.iter().position(|&b| b == b':') {
        Some(i) => (Some(&name[..i]), &name[i + 1..]),
        None => (None, name),
    }
}

/// Transport and protocol that a connection's first bytes suggest; `Ok(None)` until enough
/// arrived. Two bytes are a hint, not proof: [`sniff`] is what decides that a connection
/// speaks Thrift.
pub fn detect(buf: &[u8]) -> Result<Option<(Transport, Protocol)>, ThriftError> {
    match buf {
        [0x80, 0x01, ..] => return Ok(Some((Transport::Unframed, Protocol::Binary))),
        [0x82, v, ..] if v & 0x1f == 1 => {
            return Ok(Some((Transport::Unframed, Protocol::Compact)));
        }
        [0x80] | [0x82] => return Ok(None),
        _ => {}
    }
    let Some(first) = buf.get(..6) else {
        return Ok(None);
    };
    match (first[4], first[5]) {
        (0x80, 0x01) => Ok(Some((Transport::Framed, Protocol::Binary))),
        (0x82, v) if v & 0x1f == 1 => Ok(Some((Transport::Framed, Protocol::Compact))),
        (0x0f, 0xff) => Ok(Some((Transport::Header, Protocol::Binary))),
        _ => Err(ThriftError::NotThrift(first.try_into().expect("6 bytes"))),
    }
}

/// Whether a client's first bytes are Thrift: `Ok(Some)` once a whole first message is there
/// and is a valid call or one-way call within the limits; `Ok(None)` while it may still be;
/// an error as soon as it cannot be (a TLS ClientHello, an HTTP request, a frame longer than
/// the limit, a header that does not decode). `decoder` keeps the progress between calls.
pub fn sniff(
    decoder: &mut Decoder,
    buf: &[u8],
) -> Result<Option<(Transport, Protocol)>, ThriftError> {
    let Some((_, meta)) = decoder.check(buf)? else {
        return Ok(None);
    };
    match meta.header.kind {
        MessageType::Call | MessageType::Oneway => Ok(Some((meta.transport, meta.protocol))),
        other => Err(ThriftError::BadMessageType(other as u8)),
    }
}

/// Cuts messages out of one connection's byte stream.
#[derive(Debug)]
pub struct Decoder {
    limits: DecoderLimits,
    /// Transport and protocol, detected from the first message or configured.
    format: Option<(Transport, Protocol)>,
    non_strict: bool,
    /// The header of an unframed message whose body is partly walked (by `walk`).
    unframed: Option<Header>,
    /// The walk of the message body being checked, reused from message to message.
    walk: Walk,
}

impl Decoder {
    /// A decoder that detects transport and protocol from the first bytes.
    pub fn detecting(limits: DecoderLimits) -> Self {
        Self {
            limits,
            format: None,
            non_strict: false,
            unframed: None,
            walk: Walk::default(),
        }
    }

    /// A decoder for a configured transport and protocol; `non_strict` also accepts old
    /// binary messages without a version word.
    pub fn configured(
        limits: DecoderLimits,
        transport: Transport,
        protocol: Protocol,
        non_strict: bool,
    ) -> Self {
        Self {
            limits,
            format: Some((transport, protocol)),
            non_strict,
            unframed: None,
            walk: Walk::default(),
        }
    }

    /// Transport and protocol in use, once known.
    pub fn format(&self) -> Option<(Transport, Protocol)> {
        self.format
    }

    /// Splits the next whole message off `buf`; `Ok(None)` when more bytes are needed (read
    /// them onto the end of `buf`: the decoder goes on from where it stopped).
    #[inline]
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ThriftError> {
        Ok(self.check(buf)?.map(|(end, meta)| Message {
            bytes: buf.split_to(end),
            meta,
        }))
    }

    /// [`Decoder::decode`] for a client whose messages must all be calls (or one-way calls):
    /// any other type is an error, never a message (processors dispatch on the name alone).
    pub fn decode_call(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ThriftError> {
        match self.decode(buf)? {
            Some(m) if !matches!(m.kind(), MessageType::Call | MessageType::Oneway) => {
                Err(ThriftError::BadMessageType(m.kind() as u8))
            }
            found => Ok(found),
        }
    }

    /// Where the message at the front of `buf` ends, and what it is, once it is all there;
    /// `Ok(None)` when more bytes are needed. Nothing is taken off `buf`; until the message
    /// is complete, each call must see the same bytes in front (and more behind).
    pub fn check(&mut self, buf: &[u8]) -> Result<Option<(usize, Meta)>, ThriftError> {
        let (transport, protocol) = match self.format {
            Some(f) => f,
            None => match detect(buf)? {
                Some(f) => {
                    self.format = Some(f);
                    f
                }
                None => return Ok(None),
            },
        };
        match transport {
            Transport::Framed => self.framed(buf, protocol),
            Transport::Unframed => self.unframed(buf, protocol),
            Transport::Header => self.theader(buf),
        }
    }

    /// The length of the frame at the front of `buf`, once its length word arrived and it is
    /// within bounds. Nothing is reserved for the rest: a declared length is a claim, and
    /// the read buffer grows with what actually arrives.
    fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, ThriftError> {
        let Some(word) = buf.get(..4) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes(word.try_into().expect("4 bytes"));
        if len < 0 {
            return Err(ThriftError::NegativeFrameLength(len));
        }
        let len = len as usize;
        if len > self.limits.max_frame {
            return Err(ThriftError::FrameTooLarge {
                size: len,
                limit: self.limits.max_frame,
            });
        }
        Ok((buf.len() >= 4 + len).then_some(len))
    }

    /// Reads the message at `at` inside a complete frame ending at `end`.
    fn message_in_frame(
        &mut self,
        frame: &[u8],
        at: usize,
        protocol: Protocol,
    ) -> Result<Header, ThriftError> {
        let mut c = Cursor::at(frame, at, true, frame.len());
        let header = wire::read_header(&mut c, protocol, self.non_strict).map_err(invalid)?;
        self.walk.restart(c.pos());
        self.walk
            .resume(&mut c, protocol, self.limits.max_depth)
            .map_err(invalid)?;
        if c.pos() != frame.len() {
            return Err(ThriftError::TrailingBytes(frame.len() - c.pos()));
        }
        Ok(header)
    }

    /// Refuses a frame still arriving whose message header is already wrong, so a garbage
    /// length does not make tern wait for (and buffer) a frame that can never be valid.
    fn check_partial_header(
        &self,
        buf: &[u8],
        at: usize,
        frame_end: usize,
        protocol: Protocol,
    ) -> Result<(), ThriftError> {
        let seen = &buf[..buf.len().min(frame_end)];
        let mut c = Cursor::at(seen, at, false, frame_end);
        match wire::read_header(&mut c, protocol, self.non_strict) {
            Ok(_) | Err(Short::Incomplete) => Ok(()),
            Err(Short::Invalid(e)) => Err(e),
        }
    }

    fn framed(
        &mut self,
        buf: &[u8],
        protocol: Protocol,
    ) -> Result<Option<(usize, Meta)>, ThriftError> {
        let Some(len) = self.frame_len(buf)? else {
            if let Some(word) = buf.get(..4) {
                let end = 4 + i32::from_be_bytes(word.try_into().expect("4 bytes")) as usize;
                self.check_partial_header(buf, 4, end, protocol)?;
            }
            return Ok(None);
        };
        let header = self.message_in_frame(&buf[..4 + len], 4, protocol)?;
        Ok(Some((
            4 + len,
            Meta {
                transport: Transport::Framed,
                protocol,
                header,
                info: None,
            },
        )))
    }

    fn unframed(
        &mut self,
        buf: &[u8],
        protocol: Protocol,
    ) -> Result<Option<(usize, Meta)>, ThriftError> {
        let max = self.limits.max_frame;
        let mut c = Cursor::new(buf, false, max);
        let header = match self.unframed {
            Some(header) => header,
            None => match wire::read_header(&mut c, protocol, self.non_strict) {
                Ok(header) => {
                    self.walk.restart(header.body_at);
                    *self.unframed.insert(header)
                }
                Err(Short::Incomplete) if buf.len() >= max => {
                    return Err(ThriftError::FrameTooLarge {
                        size: buf.len(),
                        limit: max,
                    });
                }
                Err(Short::Incomplete) => return Ok(None),
                Err(Short::Invalid(e)) => return Err(e),
            },
        };
        let walked = self.walk.resume(&mut c, protocol, self.limits.max_depth);
        let found = match walked {
            Ok(end) if end <= max => Ok(Some((
                end,
                Meta {
                    transport: Transport::Unframed,
                    protocol,
                    header,
                    info: None,
                },
            ))),
            Ok(end) => Err(ThriftError::FrameTooLarge {
                size: end,
                limit: max,
            }),
            Err(Short::Incomplete) if buf.len() >= max => Err(ThriftError::FrameTooLarge {
                size: buf.len(),
                limit: max,
            }),
            Err(Short::Incomplete) => return Ok(None),
            Err(Short::Invalid(e)) => Err(e),
        };
        self.unframed = None;
        found
    }

    fn theader(&mut self, buf: &[u8]) -> Result<Option<(usize, Meta)>, ThriftError> {
        let Some(len) = self.frame_len(buf)? else {
            if buf.len() >= 6 && buf[4..6] != THEADER_MAGIC.to_be_bytes() {
                return Err(ThriftError::BadHeader("magic is not 0x0fff"));
            }
            return Ok(None);
        };
        let frame = &buf[..4 + len];
        let mut c = Cursor::at(frame, 4, true, frame.len());
        let magic = c.u16().map_err(invalid)?;
        if magic != THEADER_MAGIC {
            return Err(ThriftError::BadHeader("magic is not 0x0fff"));
        }
        let _flags = c.u16().map_err(invalid)?;
        let _seq = c.i32().map_err(invalid)?;
        let words = c.u16().map_err(invalid)? as usize;
        let header_end = c.pos() + words * 4;
        if header_end > frame.len() {
            return Err(ThriftError::BadHeader("header is longer than its frame"));
        }
        let protocol = match c.varint(5).map_err(invalid)? {
            0 => Protocol::Binary,
            2 => Protocol::Compact,
            other => return Err(ThriftError::UnsupportedHeaderProtocol(other)),
        };
        let transforms = c.varint(5).map_err(invalid)?;
        if transforms > 0 {
            let id = c.varint(5).map_err(invalid)?;
            return Err(ThriftError::UnsupportedTransform(id));
        }
        let info_at = c.pos();
        if info_at > header_end {
            return Err(ThriftError::BadHeader("header fields run past its size"));
        }
        walk_info(&frame[..header_end], info_at, |_, _| {})?;
        let header = self.message_in_frame(frame, header_end, protocol)?;
        Ok(Some((
            4 + len,
            Meta {
                transport: Transport::Header,
                protocol,
                header,
                info: Some((info_at, header_end)),
            },
        )))
    }
}

fn invalid(s: Short) -> ThriftError {
    match s {
        Short::Incomplete => ThriftError::Truncated,
        Short::Invalid(e) => e,
    }
}

/// Walks THeader info blocks in `buf[at..]` (which ends at the header's end), calling `f`
/// with each key/value. Info type 0 is padding and ends the walk; key/value blocks are types
/// 1 (per-message) and 2 (persistent); any other type ends the walk (its layout is unknown).
fn walk_info<'a>(
    buf: &'a [u8],
    at: usize,
    mut f: impl FnMut(&'a [u8], &'a [u8]),
) -> Result<(), ThriftError> {
    let mut c = Cursor::at(buf, at, true, buf.len());
    while c.pos() < buf.len() {
        match c.varint(5).map_err(invalid)? {
            1 | 2 => {
                let count = c.varint(5).map_err(invalid)?;
                for _ in 0..count {
                    let klen = c.varint(5).map_err(invalid)? as usize;
                    let key = c.bytes(klen).map_err(invalid)?;
                    let vlen = c.varint(5).map_err(invalid)? as usize;
                    let value = c.bytes(vlen).map_err(invalid)?;
                    f(key, value);
                }
            }
            _ => break,
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A framed binary call `ping` with seq id 7 and an empty body.
    pub(crate) fn framed_ping() -> Vec<u8> {
        let mut msg = vec![0x80, 0x01, 0x00, 0x01, 0, 0, 0, 4];
        msg.extend_from_slice(b"ping");
        msg.extend_from_slice(&7i32.to_be_bytes());
        msg.push(0); // STOP
        let mut framed = (msg.len() as i32).to_be_bytes().to_vec();
        framed.extend(msg);
        framed
    }

    #[test]
    fn detects_every_transport_and_protocol() {
        assert_eq!(
            detect(&[0x80, 0x01]).unwrap(),
            Some((Transport::Unframed, Protocol::Binary))
        );
        assert_eq!(
            detect(&[0x82, 0x21]).unwrap(),
            Some((Transport::Unframed, Protocol::Compact))
        );
        assert_eq!(
            detect(&[0, 0, 0, 9, 0x80, 0x01]).unwrap(),
            Some((Transport::Framed, Protocol::Binary))
        );
        assert_eq!(
            detect(&[0, 0, 0, 9, 0x82, 0x21]).unwrap(),
            Some((Transport::Framed, Protocol::Compact))
        );
        assert_eq!(
            detect(&[0, 0, 0, 9, 0x0f, 0xff]).unwrap(),
            Some((Transport::Header, Protocol::Binary))
        );
        assert_eq!(detect(&[0, 0, 0]).unwrap(), None);
        assert!(matches!(
            detect(b"GET / HTTP/1.1"),
            Err(ThriftError::NotThrift(_))
        ));
    }

    #[test]
    fn cuts_a_framed_message_out_byte_for_byte() {
        let wire = framed_ping();
        let mut buf = BytesMut::from(&wire[..]);
        buf.extend_from_slice(&wire[..5]); // the start of the next message
        let mut d = Decoder::detecting(DecoderLimits::default());
        let m = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(m.name(), b"ping");
        assert_eq!(m.seq_id(), 7);
        assert_eq!(m.kind(), MessageType::Call);
        assert_eq!(m.as_bytes(), &wire[..]);
        assert_eq!(buf.len(), 5);
        assert!(d.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn rewrites_only_the_sequence_id() {
        let wire = framed_ping();
        let mut m = Decoder::detecting(DecoderLimits::default())
            .decode(&mut BytesMut::from(&wire[..]))
            .unwrap()
            .unwrap();
        m.set_seq_id(0x0102_0304).unwrap();
        let out = m.into_bytes();
        let changed: Vec<usize> = (0..wire.len()).filter(|&i| wire[i] != out[i]).collect();
        assert_eq!(changed, vec![16, 17, 18, 19]);
    }

    #[test]
    fn bounds_are_enforced() {
        let limits = DecoderLimits {
            max_frame: 64,
            max_depth: 4,
        };
        let mut d = Decoder::detecting(limits);
        let mut big = BytesMut::from(&[0u8, 0, 1, 0, 0x80, 0x01][..]);
        assert!(matches!(
            d.decode(&mut big),
            Err(ThriftError::FrameTooLarge { size: 256, .. })
        ));
        let mut d = Decoder::configured(limits, Transport::Framed, Protocol::Binary, false);
        let mut negative = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xfe][..]);
        assert_eq!(
            d.decode(&mut negative).unwrap_err(),
            ThriftError::NegativeFrameLength(-2)
        );

        // A frame whose length cuts the message short.
        let mut wire = framed_ping();
        wire[3] -= 1;
        wire.pop();
        let err = Decoder::detecting(limits)
            .decode(&mut BytesMut::from(&wire[..]))
            .unwrap_err();
        assert_eq!(err, ThriftError::Truncated);

        // Unframed bytes that never end are not buffered past the limit.
        let mut d = Decoder::detecting(limits);
        let mut endless =
            BytesMut::from(&[0x80u8, 0x01, 0x00, 0x01, 0, 0, 0, 1, b'x', 0, 0, 0, 1][..]);
        for _ in 0..7 {
            endless.extend_from_slice(&[8, 0, 1, 0, 0, 0, 0]); // i32 fields, no STOP yet
            assert!(
                d.decode(&mut endless).unwrap().is_none(),
                "{} bytes",
                endless.len()
            );
        }
        endless.extend_from_slice(&[8, 0, 1, 0, 0, 0, 0]);
        assert!(matches!(
            d.decode(&mut endless),
            Err(ThriftError::FrameTooLarge {
                size: 69,
                limit: 64
            })
        ));
    }

    #[test]
    fn a_declared_length_reserves_nothing() {
        // 6 bytes announcing a frame of 16 MiB minus one: a claim, not memory to set aside.
        let mut buf = BytesMut::from(&[0x00u8, 0xff, 0xff, 0xff, 0x80, 0x01][..]);
        let before = buf.capacity();
        assert!(
            Decoder::detecting(DecoderLimits::default())
                .decode(&mut buf)
                .unwrap()
                .is_none()
        );
        assert_eq!(buf.capacity(), before);
    }

    #[test]
    fn a_frame_whose_header_is_wrong_is_refused_before_it_is_whole() {
        // Framed binary by its first bytes, then a message type of 9, in a 1 MiB frame.
        let mut buf = BytesMut::from(&[0x00u8, 0x10, 0x00, 0x00, 0x80, 0x01, 0x00, 0x09][..]);
        assert_eq!(
            Decoder::detecting(DecoderLimits::default())
                .decode(&mut buf)
                .unwrap_err(),
            ThriftError::BadMessageType(9)
        );
    }

    #[test]
    fn sniffing_wants_a_whole_valid_call() {
        let limits = DecoderLimits::default();
        let ping = framed_ping();
        for end in 0..ping.len() {
            let mut d = Decoder::detecting(limits);
            assert_eq!(sniff(&mut d, &ping[..end]), Ok(None), "{end} bytes");
        }
        let mut d = Decoder::detecting(limits);
        assert_eq!(
            sniff(&mut d, &ping),
            Ok(Some((Transport::Framed, Protocol::Binary)))
        );
        // A reply is not what a client sends first.
        let mut reply = ping.clone();
        reply[7] = 2;
        assert!(sniff(&mut Decoder::detecting(limits), &reply).is_err());
        // TLS ClientHellos whose record length looks like framed Thrift at bytes 4-5.
        for low in [0x80u8, 0x82] {
            let hello = [
                0x16, 0x03, 0x01, 0x02, low, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ];
            assert!(
                sniff(&mut Decoder::detecting(limits), &hello).is_err(),
                "{hello:02x?}"
            );
        }
        for other in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(sniff(&mut Decoder::detecting(limits), other).is_err());
        }
    }

    #[test]
    fn multiplexed_names_split_at_the_first_colon() {
        assert_eq!(split_name(b"Calc:add"), (Some(&b"Calc"[..]), &b"add"[..]));
        assert_eq!(split_name(b"add"), (None, &b"add"[..]));
    }

    #[test]
    fn compact_ids_must_fit_their_varint_bytes() {
        assert!(seq_id_fits(127, 1));
        assert!(!seq_id_fits(128, 1));
        assert!(seq_id_fits(-1, 5));
    }

    #[test]
    fn ids_of_a_class_take_exactly_its_varint_length() {
        let varint_len = |id: i32| {
            let mut v = id as u32;
            let mut n = 1;
            while v >= 0x80 {
                v >>= 7;
                n += 1;
            }
            n
        };
        for class in 1..=5 {
            for n in [0, 1, 127, 128, 16_383, 16_384, u32::MAX] {
                let id = seq_id_in_class(class, n);
                assert_eq!(varint_len(id), class, "class {class}, n {n}: {id}");
            }
        }
        assert_ne!(seq_id_in_class(1, 0), seq_id_in_class(1, 1));
        assert_eq!(seq_id_in_class(1, 0), seq_id_in_class(1, 128));
        assert!((0..1000).all(|n| seq_id_in_class(0, n) == n as i32));
        assert!(seq_id_in_class(0, u32::MAX) >= 0);
    }
}
