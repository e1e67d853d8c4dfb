//! The xDS server's connections: accepted within limits (in all, and from one address, as
//! tern's other servers: `tern-http-server`), and each must send its first bytes within
//! [`FIRST_BYTES_WITHIN`] — an HTTP/2 server waits for a client's preface for good, so a
//! silent connection would hold its place forever. A TLS handshake must be done within
//! [`HANDSHAKE_WITHIN`].
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tern_http_server::{Accepted, Limits, Place, Places};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Sleep,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a new connection has to send its first bytes.
pub const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take once begun (tonic's acceptor waits for good unless
/// told): a ClientHello's first bytes clear [`FIRST_BYTES_WITHIN`].
pub const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// An accepted connection, holding its place until it closes.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    _place: Place,
    /// Until the first bytes arrive.
    deadline: Option<Pin<Box<Sleep>>>,
}

/// The connections `listener` accepts within `limits`, for tonic's server.
pub fn accepted(
    listener: TcpListener,
    limits: Limits,
) -> impl futures_core::Stream<Item = io::Result<Connection>> {
    let places = Places::new(limits);
    futures_util::stream::unfold((listener, places), |(listener, places)| async move {
        let Accepted { stream, place, .. } = tern_http_server::accept(&listener, &places).await;
        let connection = Connection {
            stream,
            _place: place,
            deadline: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_WITHIN))),
        };
        Some((Ok(connection), (listener, places)))
    })
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(deadline) = &mut this.deadline {
            match read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.deadline = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no bytes within {FIRST_BYTES_WITHIN:?} of connecting"),
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_at_the_deadline_and_a_talking_one_does_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            connections: 4,
            per_peer: 4,
        };
        let incoming = accepted(listener, limits);
        let mut incoming = std::pin::pin!(incoming);
        use futures_util::StreamExt;
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut silent = incoming.next().await.unwrap().unwrap();
        let mut talking = TcpStream::connect(addr).await.unwrap();
        let mut served = incoming.next().await.unwrap().unwrap();
        talking.write_all(b"PRI").await.unwrap();
        let mut b = [0u8; 3];
        served.read_exact(&mut b).await.unwrap();
        let mut one = [0u8; 1];
        let silent_read = silent.read(&mut one).await;
        assert_eq!(
            silent_read.unwrap_err().kind(),
            io::ErrorKind::TimedOut,
            "nothing came within the deadline"
        );
        // The talking one waits past the deadline without an error.
        let later = tokio::time::timeout(2 * FIRST_BYTES_WITHIN, served.read(&mut one)).await;
        assert!(later.is_err(), "still waiting, no error: {later:?}");
    }
}
