//! The Thrift codec: finds message boundaries and reads what routing needs, zero-copy.
//!
//! tern never builds Thrift values. A [`Decoder`] reads a connection's bytes into a
//! `BytesMut`, detects transport and protocol from the first bytes, and cuts each message
//! out as a [`Message`] that owns exactly its wire bytes (split off the read buffer, no
//! copy). The method name and THeader headers are read as slices of those bytes; the only
//! bytes tern ever rewrites are the sequence id, in place. Every message body is walked
//! ([`wire`]) so a malformed message closes its connection before any of it is forwarded.
//!
//! - [`frame`]: transports (framed, unframed, THeader), detection, the [`Decoder`].
//! - [`wire`]: protocol bytes (binary strict/non-strict, compact): headers, struct skipping.
//! - [`reply`]: local replies — a `TApplicationException` in the caller's own encoding.
pub mod frame;
pub mod reply;
pub mod wire;

pub use frame::{Decoder, DecoderLimits, Message};

/// How messages are delimited on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// A 4-byte big-endian length, then the message.
    Framed,
    /// The message alone; its end is found by walking its body.
    Unframed,
    /// fbthrift/Finagle THeader: a framed header with info key/values, then the message.
    Header,
}

/// How a message is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Binary,
    Compact,
}

/// Thrift message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageType {
    Call = 1,
    Reply = 2,
    Exception = 3,
    Oneway = 4,
}

impl MessageType {
    pub fn from_wire(b: u8) -> Result<Self, ThriftError> {
        Ok(match b {
            1 => Self::Call,
            2 => Self::Reply,
            3 => Self::Exception,
            4 => Self::Oneway,
            other => return Err(ThriftError::BadMessageType(other)),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Call => "call",
            Self::Reply => "reply",
            Self::Exception => "exception",
            Self::Oneway => "oneway",
        }
    }
}

/// Why bytes were refused as Thrift. Each closes the connection it arrived on and is
/// counted by [`ThriftError::cause`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ThriftError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { size: usize, limit: usize },
    #[error("negative frame length {0}")]
    NegativeFrameLength(i32),
    #[error("message is truncated: its frame ends inside it")]
    Truncated,
    #[error("{0} bytes left after the message inside its frame")]
    TrailingBytes(usize),
    #[error("invalid type byte {0}")]
    BadType(u8),
    #[error("invalid message type {0}")]
    BadMessageType(u8),
    #[error("invalid protocol version {0:#x}")]
    BadVersion(u32),
    #[error("invalid protocol id {0:#x}")]
    BadProtocolId(u8),
    #[error("negative size {0}")]
    NegativeSize(i64),
    #[error("size {0} is larger than what can follow")]
    SizeTooLarge(usize),
    #[error("nesting deeper than the limit")]
    TooDeep,
    #[error("malformed varint")]
    BadVarint,
    #[error("not Thrift: first bytes {0:02x?}")]
    NotThrift([u8; 6]),
    #[error("THeader transform {0} is not supported (only uncompressed payloads are)")]
    UnsupportedTransform(u64),
    #[error("THeader protocol id {0} is not supported (binary 0 and compact 2 are)")]
    UnsupportedHeaderProtocol(u64),
    #[error("malformed THeader: {0}")]
    BadHeader(&'static str),
}

impl ThriftError {
    /// A short label for metrics (`tern_thrift_frames_rejected_total{cause}`).
    pub fn cause(&self) -> &'static str {
        match self {
            Self::FrameTooLarge { .. } => "frame_too_large",
            Self::NegativeFrameLength(_) => "negative_length",
            Self::Truncated | Self::TrailingBytes(_) => "truncated",
            Self::BadType(_) | Self::BadMessageType(_) => "invalid_type",
            Self::BadVersion(_) | Self::BadProtocolId(_) | Self::NotThrift(_) => "invalid_protocol",
            Self::NegativeSize(_) => "negative_size",
            Self::SizeTooLarge(_) => "size_too_large",
            Self::TooDeep => "too_deep",
            Self::BadVarint => "invalid_varint",
            Self::UnsupportedTransform(_) | Self::UnsupportedHeaderProtocol(_) => {
                "unsupported_header"
            }
            Self::BadHeader(_) => "invalid_header",
        }
    }
}
