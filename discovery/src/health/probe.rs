//! One health check over the network: a TCP connect, or a Thrift call as Envoy's Thrift
//! health checker makes it (`CALL <method>`, sequence id 0, an empty argument struct, in the
//! configured transport and protocol), judged by the first field of the reply. The
//! connection is closed after every check; the whole check is bounded by the timeout.
use std::net::SocketAddr;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{Check, HealthCheck, ThriftProtocol, ThriftTransport};

/// Thrift message types.
const CALL: u8 = 1;
const REPLY: u8 = 2;
const EXCEPTION: u8 = 3;
/// The longest method name a reply may carry.
const MAX_NAME: usize = 64 * 1024;

/// Runs `check` against `address`: `Ok` when it passes, the reason when not.
pub async fn run(check: &HealthCheck, address: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        match &check.check {
            Check::Tcp => Ok(()),
            Check::Thrift {
                method,
                transport,
                protocol,
                exception_is_healthy,
            } => thrift(stream, method, *transport, *protocol, *exception_is_healthy).await,
        }
    };
    tokio::time::timeout(check.timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {:?}", check.timeout))?
}

/// The CALL Envoy's Thrift health checker sends.
pub fn call(method: &str, transport: ThriftTransport, protocol: ThriftProtocol) -> Vec<u8> {
    let mut message = Vec::with_capacity(method.len() + 16);
    match protocol {
        ThriftProtocol::Binary => {
            message.extend_from_slice(&(0x8001_0000u32 | u32::from(CALL)).to_be_bytes());
            message.extend_from_slice(&(method.len() as u32).to_be_bytes());
            message.extend_from_slice(method.as_bytes());
            message.extend_from_slice(&0i32.to_be_bytes());
        }
        ThriftProtocol::Compact => {
            message.extend_from_slice(&[0x82, (CALL << 5) | 1, 0]);
            varint(&mut message, method.len() as u64);
            message.extend_from_slice(method.as_bytes());
        }
    }
    message.push(0); // STOP: no arguments.
    match transport {
        ThriftTransport::Unframed => message,
        ThriftTransport::Framed => {
            let mut framed = (message.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(&message);
            framed
        }
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

async fn read_varint(r: &mut (impl AsyncRead + Unpin)) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = r.read_u8().await.map_err(|e| format!("read: {e}"))?;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a varint longer than 64 bits".into())
}

async fn skip(r: &mut (impl AsyncRead + Unpin), n: usize) -> Result<(), String> {
    if n > MAX_NAME {
        return Err(format!("a method name of {n} bytes"));
    }
    let mut name = vec![0u8; n];
    r.read_exact(&mut name)
        .await
        .map_err(|e| format!("read: {e}"))?;
    Ok(())
}

async fn thrift(
    mut stream: TcpStream,
    method: &str,
    transport: ThriftTransport,
    protocol: ThriftProtocol,
    exception_is_healthy: bool,
) -> Result<(), String> {
    stream
        .write_all(&call(method, transport, protocol))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let closed = |e: std::io::Error| format!("the reply ended early: {e}");
    if transport == ThriftTransport::Framed {
        stream.read_u32().await.map_err(closed)?;
    }
    // The message header, then the first field of the result struct: 0 is the success value,
    // STOP a void success, anything else a declared exception.
    let (kind, field) = match protocol {
        ThriftProtocol::Binary => {
            let word = stream.read_u32().await.map_err(closed)?;
            if word & 0xffff_0000 != 0x8001_0000 {
                return Err(format!(
                    "not a strict binary message (first word {word:#010x})"
                ));
            }
            let len = stream.read_u32().await.map_err(closed)? as usize;
            skip(&mut stream, len).await?;
            stream.read_i32().await.map_err(closed)?;
            let kind = (word & 0xff) as u8;
            let field = if kind == REPLY {
                match stream.read_u8().await.map_err(closed)? {
                    0 => None,
                    _ => Some(stream.read_i16().await.map_err(closed)?),
                }
            } else {
                None
            };
            (kind, field)
        }
        ThriftProtocol::Compact => {
            if stream.read_u8().await.map_err(closed)? != 0x82 {
                return Err("not a compact protocol message".into());
            }
            let kind = stream.read_u8().await.map_err(closed)? >> 5;
            read_varint(&mut stream).await?;
            let len = read_varint(&mut stream).await? as usize;
            skip(&mut stream, len).await?;
            let field = if kind == REPLY {
                match stream.read_u8().await.map_err(closed)? {
                    0 => None,
                    b if b >> 4 != 0 => Some(i16::from(b >> 4)),
                    _ => {
                        let z = read_varint(&mut stream).await?;
                        Some(((z >> 1) as i16) ^ -((z & 1) as i16))
                    }
                }
            } else {
                None
            };
            (kind, field)
        }
    };
    match (kind, field) {
        (REPLY, None | Some(0)) => Ok(()),
        (REPLY, Some(id)) => Err(format!("{method} answered its declared exception {id}")),
        (EXCEPTION, _) if exception_is_healthy => Ok(()),
        (EXCEPTION, _) => Err(format!("{method} answered a TApplicationException")),
        (other, _) => Err(format!("a message of type {other} instead of a reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_what_envoys_thrift_checker_sends() {
        assert_eq!(
            call("ping", ThriftTransport::Framed, ThriftProtocol::Binary),
            [
                0, 0, 0, 17, 0x80, 0x01, 0, 1, 0, 0, 0, 4, b'p', b'i', b'n', b'g', 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(
            call("ping", ThriftTransport::Unframed, ThriftProtocol::Compact),
            [0x82, 0x21, 0, 4, b'p', b'i', b'n', b'g', 0]
        );
    }

    /// A server that answers one message with `reply`, for the probe to judge.
    async fn answered(
        reply: Vec<u8>,
        protocol: ThriftProtocol,
        exception_ok: bool,
    ) -> Result<(), String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&reply).await;
        });
        let check = HealthCheck {
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(2),
            interval_jitter: std::time::Duration::ZERO,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            panic_threshold: 50,
            check: Check::Thrift {
                method: "ping".into(),
                transport: ThriftTransport::Unframed,
                protocol,
                exception_is_healthy: exception_ok,
            },
        };
        run(&check, address).await
    }

    fn binary(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![0x80, 0x01, 0, kind, 0, 0, 0, 4];
        m.extend_from_slice(b"ping");
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(body);
        m
    }

    #[tokio::test]
    async fn replies_are_judged_by_their_first_field() {
        use ThriftProtocol::{Binary, Compact};
        // A string success (field 0), a void success, a declared exception (field 1).
        assert!(
            answered(
                binary(REPLY, &[11, 0, 0, 0, 0, 0, 1, b'x', 0]),
                Binary,
                false
            )
            .await
            .is_ok()
        );
        assert!(answered(binary(REPLY, &[0]), Binary, false).await.is_ok());
        let e = answered(binary(REPLY, &[12, 0, 1, 0, 0]), Binary, false)
            .await
            .unwrap_err();
        assert!(e.contains("declared exception 1"), "{e}");
        // A TApplicationException: unhealthy unless the service counts it as alive.
        assert!(
            answered(binary(EXCEPTION, &[0]), Binary, false)
                .await
                .is_err()
        );
        assert!(
            answered(binary(EXCEPTION, &[0]), Binary, true)
                .await
                .is_ok()
        );
        // Compact: field 0 by its long form (delta 0, zigzag 0), and field 1 by delta.
        let compact = |field: &[u8]| {
            let mut m = vec![0x82, (REPLY << 5) | 1, 0, 4];
            m.extend_from_slice(b"ping");
            m.extend_from_slice(field);
            m
        };
        assert!(
            answered(compact(&[0x08, 0x00, 0x00]), Compact, false)
                .await
                .is_ok()
        );
        assert!(
            answered(compact(&[0x1c, 0x00, 0x00]), Compact, false)
                .await
                .is_err()
        );
        // Garbage and silence.
        assert!(
            answered(b"HTTP/1.1 400\r\n".to_vec(), Binary, false)
                .await
                .is_err()
        );
        assert!(answered(Vec::new(), Binary, false).await.is_err());
    }
}
