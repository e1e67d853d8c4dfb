//! What a connection's first bytes say, for filter chains that match on them: Envoy's
//! `tls_inspector` (a TLS ClientHello: transport `tls`, its SNI and ALPN) and
//! `http_inspector` (plaintext HTTP/1.x or HTTP/2 with prior knowledge: application
//! protocol `http/1.1`, `http/1.0` or `h2c`).
//!
//! The bytes are peeked, never consumed: whatever runs next reads them again. Only
//! connections to a listener with chains that ask (istiod's `transport_protocol` and
//! `application_protocols` matches) are inspected. A client that sends nothing within
//! [`INSPECT_TIMEOUT`] (a server-first protocol) counts as plaintext with no application
//! protocol, as Istio's `continue_on_listener_filters_timeout` has it.
use std::time::Duration;

use tokio::net::TcpStream;

use crate::state::Peeked;

/// How long inspection waits for the client's first bytes.
pub const INSPECT_TIMEOUT: Duration = Duration::from_secs(1);
/// At most this much is peeked (a ClientHello fits, with post-quantum key shares).
const PEEK_MAX: usize = 16 * 1024;

/// What inspecting found, owned (the peek buffer is gone by the time a chain is chosen).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inspected {
    pub tls: bool,
    pub server_name: Option<String>,
    /// ALPN for TLS; the detected HTTP version for plaintext.
    pub application_protocols: Vec<String>,
}

impl Inspected {
    /// The view chain selection takes.
    pub fn peeked(&self) -> Peeked<'_> {
        Peeked {
            tls: self.tls,
            application_protocols: &self.application_protocols,
            server_name: self.server_name.as_deref(),
        }
    }
}

/// The verdict on the bytes seen so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// More bytes could change the answer.
    NeedMore,
    Done(Inspected),
}

/// Peeks at a connection until its first bytes say what it is, or the timeout passes.
pub async fn inspect(stream: &TcpStream) -> Inspected {
    let mut buf = vec![0u8; PEEK_MAX];
    let deadline = tokio::time::Instant::now() + INSPECT_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                if let Verdict::Done(found) = examine(&buf[..n]) {
                    return found;
                }
                if n == buf.len() {
                    return Inspected::default();
                }
            }
            // Timed out, closed or failed: plaintext with nothing to go by.
            _ => return Inspected::default(),
        }
        // More is due. Peek returns at once while bytes wait, so look again shortly.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
            .await
            .is_err()
        {
            return Inspected::default();
        }
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The answer for `bytes`, final or not.
pub fn examine(bytes: &[u8]) -> Verdict {
    match bytes.first() {
        None => Verdict::NeedMore,
        Some(0x16) => client_hello(bytes),
        Some(_) => http(bytes),
    }
}

/// Reads big-endian integers and slices off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
    fn vec8(&mut self) -> Option<Reader<'a>> {
        let n = self.u8()?;
        self.take(n).map(Reader)
    }
    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = self.u16()?;
        self.take(n).map(Reader)
    }
}

/// A TLS record carrying a ClientHello: its SNI and ALPN. Anything that is not one is
/// plaintext, as Envoy's tls_inspector decides.
fn client_hello(bytes: &[u8]) -> Verdict {
    let plaintext = Verdict::Done(Inspected::default());
    let mut r = Reader(bytes);
    // Record header: handshake (22), version 3.x, length.
    let Some(header) = r.take(5) else {
        return if bytes.len() >= 2 && bytes[1] != 3 {
            plaintext
        } else {
            Verdict::NeedMore
        };
    };
    if header[1] != 3 {
        return plaintext;
    }
    let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    // The handshake header says how long the ClientHello is; it may span records, in which
    // case what the first record holds is all tern reads of it.
    let Some(record) = r.take(record_len) else {
        return if bytes.len() >= PEEK_MAX {
            plaintext
        } else {
            Verdict::NeedMore
        };
    };
    let mut h = Reader(record);
    if h.u8() != Some(1) {
        return plaintext;
    }
    let Some(_len) = h.u24() else {
        return plaintext;
    };
    Verdict::Done(hello_extensions(h).unwrap_or(Inspected {
        tls: true,
        ..Inspected::default()
    }))
}

fn hello_extensions(mut h: Reader<'_>) -> Option<Inspected> {
    let mut found = Inspected {
        tls: true,
        ..Inspected::default()
    };
    h.take(2 + 32)?; // legacy version, random
    h.vec8()?; // session id
    h.vec16()?; // cipher suites
    h.vec8()?; // compression methods
    let mut extensions = h.vec16()?;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut body = extensions.vec16()?;
        match kind {
            0 => {
                let mut names = body.vec16()?;
                while !names.0.is_empty() {
                    let name_type = names.u8()?;
                    let name = names.vec16()?;
                    if name_type == 0 {
                        found.server_name = std::str::from_utf8(name.0)
                            .ok()
                            .map(|n| n.to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let mut protocols = body.vec16()?;
                while !protocols.0.is_empty() {
                    let p = protocols.vec8()?;
                    if let Ok(p) = std::str::from_utf8(p.0)
                        && found.application_protocols.len() < 16
                    {
                        found.application_protocols.push(p.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    Some(found)
}

/// The methods Envoy's http_inspector recognises in a request line.
const METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is not looked at further (not HTTP, for tern).
const REQUEST_LINE_MAX: usize = 8 * 1024;

/// Plaintext HTTP: the HTTP/2 preface, or an HTTP/1.x request line.
fn http(bytes: &[u8]) -> Verdict {
    let done = |protocol: Option<&str>| {
        Verdict::Done(Inspected {
            application_protocols: protocol.into_iter().map(str::to_owned).collect(),
            ..Inspected::default()
        })
    };
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            done(Some("h2c"))
        } else {
            Verdict::NeedMore
        };
    }
    let token_end = bytes.iter().position(|&b| b == b' ');
    let token = &bytes[..token_end.unwrap_or(bytes.len())];
    let could_be_method = METHODS.iter().any(|m| match token_end {
        Some(_) => *m == token,
        None => m.starts_with(token),
    });
    if !could_be_method {
        return done(None);
    }
    let Some(line_end) = bytes.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() > REQUEST_LINE_MAX {
            done(None)
        } else {
            Verdict::NeedMore
        };
    };
    let line = &bytes[..line_end];
    if line.ends_with(b" HTTP/1.1") {
        done(Some("http/1.1"))
    } else if line.ends_with(b" HTTP/1.0") {
        done(Some("http/1.0"))
    } else {
        done(None)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A ClientHello as rustls writes it, for `server_name` offering `alpn`.
    fn client_hello_of(server_name: &str, alpn: &[&str]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_client_hello_gives_tls_its_server_name_and_alpn() {
        let hello = client_hello_of(
            "outbound_.9080_._.reviews.default.svc.cluster.local",
            &["istio-peer-exchange", "istio"],
        );
        let expected = Inspected {
            tls: true,
            server_name: Some("outbound_.9080_._.reviews.default.svc.cluster.local".into()),
            application_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
        };
        assert_eq!(examine(&hello), Verdict::Done(expected));
        // Cut anywhere, it waits for the rest.
        for cut in [1, 3, 5, 40, hello.len() - 1] {
            assert_eq!(examine(&hello[..cut]), Verdict::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn plaintext_http_and_other_bytes() {
        let proto = |bytes: &[u8]| match examine(bytes) {
            Verdict::Done(i) => (i.tls, i.application_protocols),
            Verdict::NeedMore => (false, vec!["need more".to_owned()]),
        };
        assert_eq!(
            proto(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            (false, vec!["http/1.1".into()])
        );
        assert_eq!(
            proto(b"POST /x HTTP/1.0\r\n"),
            (false, vec!["http/1.0".into()])
        );
        assert_eq!(proto(H2_PREFACE), (false, vec!["h2c".into()]));
        assert_eq!(proto(b"GE"), (false, vec!["need more".into()]));
        assert_eq!(proto(b"GET / HTT"), (false, vec!["need more".into()]));
        // A framed Thrift call, and a TLS-looking byte that is no TLS.
        assert_eq!(proto(&[0, 0, 0, 20, 0x80, 1, 0, 1]), (false, vec![]));
        assert_eq!(proto(&[0x16, 0x42, 0, 0, 0, 0]), (false, vec![]));
        assert_eq!(proto(b"GETX / HTTP/1.1\r\n"), (false, vec![]));
    }

    #[test]
    fn nothing_malformed_panics() {
        let hello = client_hello_of("a.example", &["h2"]);
        for i in 5..hello.len() {
            let mut bad = hello.clone();
            bad[i] = 0xff;
            let _ = examine(&bad);
            bad.truncate(i);
            let _ = examine(&bad);
        }
    }
}
