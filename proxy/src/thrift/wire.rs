//! Reading Thrift protocol bytes without building values: message headers and struct skipping.
//!
//! A [`Cursor`] walks a byte slice and reports running out of bytes as [`Short::Incomplete`]
//! when more may still arrive (unframed transport) or as an error when the slice is all
//! there is (a whole frame). Skipping checks everything a decoder would — type bytes,
//! negative sizes, sizes larger than the bytes that can follow, nesting depth — so a
//! malformed message is refused here, before any byte of it is forwarded.
use super::{MessageType, Protocol, ThriftError};

/// Why a read stopped early.
#[derive(Debug, PartialEq, Eq)]
pub enum Short {
    /// The bytes end before the message does; more may arrive.
    Incomplete,
    /// The bytes are not a valid message.
    Invalid(ThriftError),
}

impl From<ThriftError> for Short {
    fn from(e: ThriftError) -> Self {
        Short::Invalid(e)
    }
}

pub type Read<T> = Result<T, Short>;

/// A position in a byte slice. `complete` says whether the slice holds everything there is.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    complete: bool,
    /// Upper bound on the size of what may still arrive (the frame size limit).
    limit: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8], complete: bool, limit: usize) -> Self {
        Self {
            buf,
            pos: 0,
            complete,
            limit,
        }
    }

    pub fn at(buf: &'a [u8], pos: usize, complete: bool, limit: usize) -> Self {
        Self {
            buf,
            pos,
            complete,
            limit,
        }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    fn short(&self) -> Short {
        if self.complete {
            Short::Invalid(ThriftError::Truncated)
        } else {
            Short::Incomplete
        }
    }

    pub fn bytes(&mut self, n: usize) -> Read<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.short())?;
        let b = self.buf.get(self.pos..end).ok_or_else(|| self.short())?;
        self.pos = end;
        Ok(b)
    }

    pub fn skip(&mut self, n: usize) -> Read<()> {
        self.bytes(n).map(drop)
    }

    pub fn u8(&mut self) -> Read<u8> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u16(&mut self) -> Read<u16> {
        Ok(u16::from_be_bytes(
            self.bytes(2)?.try_into().expect("2 bytes"),
        ))
    }

    pub fn i32(&mut self) -> Read<i32> {
        Ok(i32::from_be_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }

    /// An unsigned LEB128 varint of at most `max_bytes` bytes.
    pub fn varint(&mut self, max_bytes: usize) -> Read<u64> {
        let mut value = 0u64;
        for i in 0..max_bytes {
            let b = self.u8()?;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ThriftError::BadVarint.into())
    }

    /// A size read from the wire, refused when negative or when more elements of at least
    /// `min_element` bytes are announced than can follow.
    fn size(&mut self, raw: i64, min_element: usize) -> Read<usize> {
        if raw < 0 {
            return Err(ThriftError::NegativeSize(raw).into());
        }
        let size = raw as usize;
        let room = if self.complete {
            self.buf.len() - self.pos
        } else {
            self.limit.saturating_sub(self.pos)
        };
        if size.saturating_mul(min_element) > room {
            return Err(ThriftError::SizeTooLarge(size).into());
        }
        Ok(size)
    }
}

/// The message header fields tern needs, with the offsets of the name and the sequence id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: MessageType,
    /// Offset and length of the name.
    pub name_at: usize,
    pub name_len: usize,
    pub seq_id: i32,
    /// Offset of the sequence id and its encoded length (4 for binary, 1–5 for compact).
    pub seq_at: usize,
    pub seq_len: usize,
    /// Offset of the body (the struct after the header).
    pub body_at: usize,
}

/// Reads a message header in `protocol`. `non_strict` accepts old binary headers without a
/// version word (they cannot be told apart from data by their first bytes).
pub fn read_header(c: &mut Cursor<'_>, protocol: Protocol, non_strict: bool) -> Read<Header> {
    match protocol {
        Protocol::Binary => {
            let word = c.i32()?;
            // Strict: version and type, then the name. Old non-strict: the name's length
            // first, the type after the name.
            let (kind, name_len) = if word < 0 {
                if (word as u32) & 0xffff_0000 != 0x8001_0000 {
                    return Err(ThriftError::BadVersion(word as u32).into());
                }
                (Some(MessageType::from_wire((word & 0xff) as u8)?), c.i32()?)
            } else if non_strict {
                (None, word)
            } else {
                return Err(ThriftError::BadVersion(word as u32).into());
            };
            let name_len = c.size(i64::from(name_len), 1)?;
            let name_at = c.pos();
            c.skip(name_len)?;
            let kind = match kind {
                Some(k) => k,
                None => MessageType::from_wire(c.u8()?)?,
            };
            let seq_at = c.pos();
            let seq_id = c.i32()?;
            Ok(Header {
                kind,
                name_at,
                name_len,
                seq_id,
                seq_at,
                seq_len: 4,
                body_at: c.pos(),
            })
        }
        Protocol::Compact => {
            let id = c.u8()?;
            if id != 0x82 {
                return Err(ThriftError::BadProtocolId(id).into());
            }
            let tv = c.u8()?;
            if tv & 0x1f != 1 {
                return Err(ThriftError::BadVersion(u32::from(tv & 0x1f)).into());
            }
            let kind = MessageType::from_wire(tv >> 5)?;
            let seq_at = c.pos();
            let seq_id = c.varint(5)? as u32 as i32;
            let seq_len = c.pos() - seq_at;
            let len = c.varint(5)?;
            let name_len = c.size(len as i64, 1)?;
            let name_at = c.pos();
            c.skip(name_len)?;
            Ok(Header {
                kind,
                name_at,
                name_len,
                seq_id,
                seq_at,
                seq_len,
                body_at: c.pos(),
            })
        }
    }
}

/// Skips one struct (the message body) without building it.
pub fn skip_struct(c: &mut Cursor<'_>, protocol: Protocol, max_depth: usize) -> Read<()> {
    match protocol {
        Protocol::Binary => binary::skip(c, binary::STRUCT, max_depth),
        Protocol::Compact => compact::skip(c, compact::STRUCT, max_depth),
    }
}

mod binary {
    use super::{Cursor, Read, ThriftError};

    pub const STRUCT: u8 = 12;

    /// Skips one value of wire type `ty`; `depth` is how many more levels may nest.
    pub fn skip(c: &mut Cursor<'_>, ty: u8, depth: usize) -> Read<()> {
        match ty {
            2 | 3 => c.skip(1),
            6 => c.skip(2),
            8 => c.skip(4),
            4 | 10 => c.skip(8),
            16 => c.skip(16),
            11 => {
                let len = c.i32()?;
                let len = c.size(i64::from(len), 1)?;
                c.skip(len)
            }
            12 => {
                let depth = depth.checked_sub(1).ok_or(ThriftError::TooDeep)?;
                loop {
                    let field = c.u8()?;
                    if field == 0 {
                        return Ok(());
                    }
                    c.skip(2)?;
                    skip(c, field, depth)?;
                }
            }
            13 => {
                let depth = depth.checked_sub(1).ok_or(ThriftError::TooDeep)?;
                let (k, v) = (c.u8()?, c.u8()?);
                let n = c.i32()?;
                let n = c.size(i64::from(n), 2)?;
                for _ in 0..n {
                    skip(c, k, depth)?;
                    skip(c, v, depth)?;
                }
                Ok(())
            }
            14 | 15 => {
                let depth = depth.checked_sub(1).ok_or(ThriftError::TooDeep)?;
                let e = c.u8()?;
                let n = c.i32()?;
                let n = c.size(i64::from(n), 1)?;
                for _ in 0..n {
                    skip(c, e, depth)?;
                }
                Ok(())
            }
            other => Err(ThriftError::BadType(other).into()),
        }
    }
}

mod compact {
    use super::{Cursor, Read, ThriftError};

    pub const STRUCT: u8 = 12;

    /// Skips one value of compact type `ty`. Inside containers booleans take a byte.
    pub fn skip(c: &mut Cursor<'_>, ty: u8, depth: usize) -> Read<()> {
        match ty {
            1..=3 => c.skip(1),
            4 => c.varint(3).map(drop),
            5 => c.varint(5).map(drop),
            6 => c.varint(10).map(drop),
            7 => c.skip(8),
            13 => c.skip(16),
            8 => {
                let len = c.varint(5)?;
                let len = c.size(len as i64, 1)?;
                c.skip(len)
            }
            12 => {
                let depth = depth.checked_sub(1).ok_or(ThriftError::TooDeep)?;
                loop {
                    let header = c.u8()?;
                    if header == 0 {
                        return Ok(());
                    }
                    if header >> 4 == 0 {
                        c.varint(3)?; // field id as a zigzag i16
                    }
                    match header & 0x0f {
                        // A field's boolean lives in its type nibble.
                        1 | 2 => {}
                        t => skip(c, t, depth)?,
                    }
                }
            }
            9 | 10 => {
                let depth = depth.checked_sub(1).ok_or(ThriftError::TooDeep)?;
                let header = c.u8()?;
                let n = match header >> 4 {
                    15 => c.varint(5)?,
                    short => u64::from(short),
                };
                let n = c.size(n as i64, 1)?;
                let e = header & 0x0f;
                for _ in 0..n {
                    skip(c, e, depth)?;
                }
                Ok(())
            }
            11 => {
                let depth = depth.checked_sub(1).ok_or(ThriftError::TooDeep)?;
                let n = c.varint(5)?;
                let n = c.size(n as i64, 2)?;
                if n == 0 {
                    return Ok(());
                }
                let kv = c.u8()?;
                for _ in 0..n {
                    skip(c, kv >> 4, depth)?;
                    skip(c, kv & 0x0f, depth)?;
                }
                Ok(())
            }
            other => Err(ThriftError::BadType(other).into()),
        }
    }
}

/// Number of bytes of the canonical varint encoding of `v`.
pub fn varint_len(v: u32) -> usize {
    match v {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0x0fff_ffff => 4,
        _ => 5,
    }
}

/// Writes `v` as a varint of exactly `len` bytes (padding with continuation bytes), which
/// every Thrift compact reader accepts. `v` must fit in `7 * len` bits.
pub fn write_varint_padded(out: &mut [u8], mut v: u32, len: usize) {
    for (i, b) in out[..len].iter_mut().enumerate() {
        let more = if i + 1 < len { 0x80 } else { 0 };
        *b = (v & 0x7f) as u8 | more;
        v >>= 7;
    }
}

pub fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        if v < 0x80 {
            out.push(v as u8);
            return;
        }
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_every_length() {
        for v in [
            0u32,
            1,
            127,
            128,
            16383,
            16384,
            0x1f_ffff,
            0x20_0000,
            u32::MAX,
        ] {
            let mut canonical = Vec::new();
            write_varint(&mut canonical, u64::from(v));
            assert_eq!(canonical.len(), varint_len(v), "{v}");
            let mut padded = [0u8; 5];
            write_varint_padded(&mut padded, v, 5);
            assert_eq!(
                Cursor::new(&padded, true, 5).varint(5).unwrap(),
                u64::from(v)
            );
        }
    }

    #[test]
    fn a_negative_string_length_is_refused() {
        let body = [11u8, 0, 1, 0xff, 0xff, 0xff, 0xff, 0];
        let err = skip_struct(&mut Cursor::new(&body, true, 100), Protocol::Binary, 8).unwrap_err();
        assert_eq!(err, Short::Invalid(ThriftError::NegativeSize(-1)));
    }

    #[test]
    fn nesting_past_the_limit_is_refused() {
        // struct { 1: struct { 1: struct { } } }
        let body = [12u8, 0, 1, 12, 0, 1, 0, 0, 0];
        assert!(skip_struct(&mut Cursor::new(&body, true, 100), Protocol::Binary, 3).is_ok());
        let err = skip_struct(&mut Cursor::new(&body, true, 100), Protocol::Binary, 2).unwrap_err();
        assert_eq!(err, Short::Invalid(ThriftError::TooDeep));
    }

    #[test]
    fn unknown_type_bytes_are_refused() {
        let body = [99u8, 0, 1, 0];
        let err = skip_struct(&mut Cursor::new(&body, true, 100), Protocol::Binary, 8).unwrap_err();
        assert_eq!(err, Short::Invalid(ThriftError::BadType(99)));
        let body = [0x1e_u8, 0];
        let err =
            skip_struct(&mut Cursor::new(&body, true, 100), Protocol::Compact, 8).unwrap_err();
        assert_eq!(err, Short::Invalid(ThriftError::BadType(14)));
    }

    #[test]
    fn a_list_longer_than_what_can_follow_is_refused() {
        // list<byte> announcing 1000 elements in a 10-byte frame
        let body = [15u8, 0, 1, 3, 0, 0, 0x03, 0xe8, 0, 0];
        let err = skip_struct(&mut Cursor::new(&body, true, 100), Protocol::Binary, 8).unwrap_err();
        assert_eq!(err, Short::Invalid(ThriftError::SizeTooLarge(1000)));
        // the same bytes, unframed: more may come, up to the limit
        let r = skip_struct(&mut Cursor::new(&body, false, 1 << 20), Protocol::Binary, 8);
        assert_eq!(r.unwrap_err(), Short::Incomplete);
    }
}
