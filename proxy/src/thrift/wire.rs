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

/// Walks a message body (one struct) without building it, and can stop where the bytes run
/// out and go on later from there: the walk is iterative, with an explicit stack of the
/// structs and containers it is inside, and its position only moves past whole values. An
/// unframed message that arrives in many reads is therefore walked once in all, not once per
/// read from its first byte.
#[derive(Debug, Default)]
pub struct Walk {
    /// Where the walk goes on (a value boundary), relative to the slice it is given.
    pos: usize,
    stack: Vec<Level>,
    started: bool,
}

/// A struct or container the walk is inside.
#[derive(Clone, Copy, Debug)]
enum Level {
    /// Fields until STOP.
    Struct,
    /// `left` more elements of type `elem`.
    List { elem: u8, left: u64 },
    /// `left` more keys and values, alternating (a key when `left` is even).
    Map { key: u8, value: u8, left: u64 },
}

/// What one step of a walk found.
enum Step {
    /// A scalar (or a string) was skipped.
    Value,
    /// A struct or container starts: walk inside it.
    Enter(Level),
    /// The innermost struct or container is done.
    Leave,
}

impl Walk {
    /// A walk of the struct that starts at `at`.
    pub fn at(at: usize) -> Self {
        let mut walk = Self::default();
        walk.restart(at);
        walk
    }

    /// Starts over on the struct at `at`, keeping the stack's memory (a decoder walks every
    /// message with one `Walk`, so walking allocates nothing once the deepest nesting was seen).
    pub fn restart(&mut self, at: usize) {
        self.pos = at;
        self.stack.clear();
        self.started = false;
    }

    /// Goes on walking over `c`'s bytes from where the last call stopped; returns the end of
    /// the struct. `Short::Incomplete` keeps the progress made: call again with more bytes
    /// (the same bytes in front, more behind).
    pub fn resume(
        &mut self,
        c: &mut Cursor<'_>,
        protocol: Protocol,
        max_depth: usize,
    ) -> Read<usize> {
        c.pos = self.pos;
        if !self.started {
            self.enter(Level::Struct, max_depth)?;
            self.started = true;
        }
        while let Some(&top) = self.stack.last() {
            let step = step(c, top, protocol)?;
            // The step read whole: commit it.
            match step {
                Step::Value => self.count_one(),
                Step::Enter(level) => {
                    self.count_one();
                    self.enter(level, max_depth)?;
                }
                Step::Leave => {
                    self.stack.pop();
                }
            }
            self.pos = c.pos;
        }
        Ok(self.pos)
    }

    /// One element of the innermost container was read (fields are not counted).
    fn count_one(&mut self) {
        if let Some(Level::List { left, .. } | Level::Map { left, .. }) = self.stack.last_mut() {
            *left -= 1;
        }
    }

    fn enter(&mut self, level: Level, max_depth: usize) -> Read<()> {
        if self.stack.len() >= max_depth {
            return Err(ThriftError::TooDeep.into());
        }
        self.stack.push(level);
        Ok(())
    }
}

/// The next step inside `level`: a struct's next field, or a container's next element.
fn step(c: &mut Cursor<'_>, level: Level, protocol: Protocol) -> Read<Step> {
    let value = match protocol {
        Protocol::Binary => binary::value,
        Protocol::Compact => compact::value,
    };
    match level {
        Level::Struct => match protocol {
            Protocol::Binary => binary::field(c),
            Protocol::Compact => compact::field(c),
        },
        Level::List { left: 0, .. } | Level::Map { left: 0, .. } => Ok(Step::Leave),
        Level::List { elem, .. } => value(c, elem),
        Level::Map {
            key,
            value: v,
            left,
        } => value(c, if left % 2 == 0 { key } else { v }),
    }
}

/// Skips one struct (a message body) that is all in `c`'s bytes, or reports where it stops.
#[cfg(test)]
fn skip_struct(c: &mut Cursor<'_>, protocol: Protocol, max_depth: usize) -> Read<()> {
    Walk::at(c.pos()).resume(c, protocol, max_depth).map(drop)
}

mod binary {
    use super::{Cursor, Level, Read, Step, ThriftError};

    /// A struct's next field (type, id, then its value), or its end.
    pub(super) fn field(c: &mut Cursor<'_>) -> Read<Step> {
        let field = c.u8()?;
        if field == 0 {
            return Ok(Step::Leave);
        }
        c.skip(2)?;
        value(c, field)
    }

    /// Skips a value of wire type `ty`, or reads the header of the struct or container it is.
    pub(super) fn value(c: &mut Cursor<'_>, ty: u8) -> Read<Step> {
        match ty {
            2 | 3 => c.skip(1)?,
            6 => c.skip(2)?,
            8 => c.skip(4)?,
            4 | 10 => c.skip(8)?,
            16 => c.skip(16)?,
            11 => {
                let len = c.i32()?;
                let len = c.size(i64::from(len), 1)?;
                c.skip(len)?;
            }
            12 => return Ok(Step::Enter(Level::Struct)),
            13 => {
                let (key, value) = (c.u8()?, c.u8()?);
                let n = c.i32()?;
                let n = c.size(i64::from(n), 2)? as u64;
                return Ok(Step::Enter(Level::Map {
                    key,
                    value,
                    left: 2 * n,
                }));
            }
            14 | 15 => {
                let elem = c.u8()?;
                let n = c.i32()?;
                let left = c.size(i64::from(n), 1)? as u64;
                return Ok(Step::Enter(Level::List { elem, left }));
            }
            other => return Err(ThriftError::BadType(other).into()),
        }
        Ok(Step::Value)
    }
}

mod compact {
    use super::{Cursor, Level, Read, Step, ThriftError};

    /// A struct's next field (header, id when not a delta, then its value), or its end.
    pub(super) fn field(c: &mut Cursor<'_>) -> Read<Step> {
        let header = c.u8()?;
        if header == 0 {
            return Ok(Step::Leave);
        }
        if header >> 4 == 0 {
            c.varint(3)?; // field id as a zigzag i16
        }
        match header & 0x0f {
            // A field's boolean lives in its type nibble.
            1 | 2 => Ok(Step::Value),
            t => value(c, t),
        }
    }

    /// Skips a value of compact type `ty` (inside containers booleans take a byte), or reads
    /// the header of the struct or container it is.
    pub(super) fn value(c: &mut Cursor<'_>, ty: u8) -> Read<Step> {
        match ty {
            1..=3 => c.skip(1)?,
            4 => drop(c.varint(3)?),
            5 => drop(c.varint(5)?),
            6 => drop(c.varint(10)?),
            7 => c.skip(8)?,
            13 => c.skip(16)?,
            8 => {
                let len = c.varint(5)?;
                let len = c.size(len as i64, 1)?;
                c.skip(len)?;
            }
            12 => return Ok(Step::Enter(Level::Struct)),
            9 | 10 => {
                let header = c.u8()?;
                let n = match header >> 4 {
                    15 => c.varint(5)?,
                    short => u64::from(short),
                };
                let left = c.size(n as i64, 1)? as u64;
                return Ok(Step::Enter(Level::List {
                    elem: header & 0x0f,
                    left,
                }));
            }
            11 => {
                let n = c.varint(5)?;
                let n = c.size(n as i64, 2)? as u64;
                if n == 0 {
                    return Ok(Step::Enter(Level::Map {
                        key: 0,
                        value: 0,
                        left: 0,
                    }));
                }
                let kv = c.u8()?;
                return Ok(Step::Enter(Level::Map {
                    key: kv >> 4,
                    value: kv & 0x0f,
                    left: 2 * n,
                }));
            }
            other => return Err(ThriftError::BadType(other).into()),
        }
        Ok(Step::Value)
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
