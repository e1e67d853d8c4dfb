//! Local replies: when tern cannot get an answer from upstream (no healthy endpoint, connect
//! failure, timeout, overflow), the client gets a `TApplicationException` in its own
//! transport, protocol, method name and sequence id — an answer its generated code raises
//! as an exception, instead of a reset connection.
use bytes::Bytes;

use super::{Protocol, Transport, frame::Meta, wire::write_varint};

/// `TApplicationException` types (Apache Thrift's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppExceptionType {
    Unknown = 0,
    UnknownMethod = 1,
    InternalError = 6,
    ProtocolError = 7,
}

/// Encodes an EXCEPTION message answering the request described by `meta`, `name`, `seq_id`.
pub fn application_exception(
    meta: &Meta,
    name: &[u8],
    seq_id: i32,
    kind: AppExceptionType,
    message: &str,
) -> Bytes {
    let mut payload = Vec::with_capacity(32 + name.len() + message.len());
    match meta.protocol {
        Protocol::Binary => {
            payload.extend_from_slice(&0x8001_0003u32.to_be_bytes());
            payload.extend_from_slice(&(name.len() as i32).to_be_bytes());
            payload.extend_from_slice(name);
            payload.extend_from_slice(&seq_id.to_be_bytes());
            // 1: string message
            payload.extend_from_slice(&[11, 0, 1]);
            payload.extend_from_slice(&(message.len() as i32).to_be_bytes());
            payload.extend_from_slice(message.as_bytes());
            // 2: i32 type
            payload.extend_from_slice(&[8, 0, 2]);
            payload.extend_from_slice(&(kind as i32).to_be_bytes());
            payload.push(0);
        }
        Protocol::Compact => {
            payload.extend_from_slice(&[0x82, (3 << 5) | 1]);
            write_varint(&mut payload, u64::from(seq_id as u32));
            write_varint(&mut payload, name.len() as u64);
            payload.extend_from_slice(name);
            payload.push(0x18); // field 1 (delta 1), binary
            write_varint(&mut payload, message.len() as u64);
            payload.extend_from_slice(message.as_bytes());
            payload.push(0x15); // field 2 (delta 1), i32 as zigzag varint
            let t = kind as i32;
            write_varint(&mut payload, u64::from(((t << 1) ^ (t >> 31)) as u32));
            payload.push(0);
        }
    }
    let mut out = Vec::with_capacity(payload.len() + 20);
    match meta.transport {
        Transport::Unframed => return Bytes::from(payload),
        Transport::Framed => {
            out.extend_from_slice(&(payload.len() as i32).to_be_bytes());
        }
        Transport::Header => {
            let protocol_id = match meta.protocol {
                Protocol::Binary => 0,
                Protocol::Compact => 2,
            };
            // header: protocol id, no transforms, padding to one 4-byte word
            let header = [protocol_id, 0, 0, 0];
            let len = 2 + 2 + 4 + 2 + header.len() + payload.len();
            out.extend_from_slice(&(len as i32).to_be_bytes());
            out.extend_from_slice(&[0x0f, 0xff, 0, 0]);
            out.extend_from_slice(&seq_id.to_be_bytes());
            out.extend_from_slice(&1u16.to_be_bytes());
            out.extend_from_slice(&header);
        }
    }
    out.extend_from_slice(&payload);
    Bytes::from(out)
}
