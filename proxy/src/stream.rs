//! A connection's bytes: plain TCP, or TLS over TCP (terminated or originated by tern).
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tokio_rustls::TlsStream;

/// Plain TCP or TLS.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Plain(s)
    }
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp().set_nodelay(on)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The peer's identity, when the stream is TLS and the peer presented a certificate.
    pub fn peer_identity(&self) -> Option<String> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => crate::tls::peer_identity(s.get_ref().1.peer_certificates()),
        }
    }

    /// Whether an idle connection can take a request: the peer has neither closed it nor
    /// sent application bytes. Costs no system call while the socket has not become
    /// readable (tokio caches readiness); TLS records that carry no data (a TLS 1.3 session
    /// ticket) are consumed and do not count.
    pub fn idle_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        matches!(Pin::new(self).poll_read(&mut cx, &mut buf), Poll::Pending)
    }

    /// Read and write halves that can be used from two tasks (plain TCP splits without a
    /// lock).
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

pub enum ReadHalf {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<Box<TlsStream<TcpStream>>>),
}

pub enum WriteHalf {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<Box<TlsStream<TcpStream>>>),
}

/// Forwards an I/O call to whichever variant `$self` is.
macro_rules! forward {
    ($self:ident, $s:ident => $call:expr) => {
        match $self.get_mut() {
            Self::Plain($s) => $call,
            Self::Tls($s) => $call,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

/// `AsyncWrite` by forwarding every method, vectored writes included.
macro_rules! forward_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                forward!(self, s => Pin::new(s).poll_write(cx, buf))
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                forward!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Plain(s) => s.is_write_vectored(),
                    Self::Tls(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                forward!(self, s => Pin::new(s).poll_flush(cx))
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                forward!(self, s => Pin::new(s).poll_shutdown(cx))
            }
        }
    };
}

forward_write!(Stream);
forward_write!(WriteHalf);

/// [`write_all_vectored`] within `timeout`: at once, as usual (no timer then), or while the
/// peer reads on; a peer that stops reading for longer fails it (`TimedOut`), so what waits
/// for it is not held for good.
pub async fn write_all_vectored_within(
    wr: &mut (impl AsyncWrite + Unpin),
    bufs: &[Bytes],
    timeout: std::time::Duration,
) -> io::Result<()> {
    let mut write = std::pin::pin!(write_all_vectored(wr, bufs));
    if let Some(done) = futures_util::FutureExt::now_or_never(write.as_mut()) {
        return done;
    }
    tokio::time::timeout(timeout, write)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing for {timeout:?}"),
            ))
        })
}

/// Buffers one vectored write takes, at most.
const WRITE_SLICES: usize = 64;

/// Writes every buffer, in order, with as few (vectored) writes as the socket takes: a
/// connection's replies done together, or the requests queued for a multiplexed connection.
pub async fn write_all_vectored(
    wr: &mut (impl AsyncWrite + Unpin),
    bufs: &[Bytes],
) -> io::Result<()> {
    let (mut i, mut offset) = (0, 0);
    while i < bufs.len() {
        // The slices are made on each poll's stack, not kept in this future across the
        // wait (64 of them are 1 KiB), and one buffer left goes with a plain write, which
        // costs the kernel less than writev.
        let mut written = std::future::poll_fn(|cx| {
            let rest = &bufs[i..];
            if let [one] = rest {
                return Pin::new(&mut *wr).poll_write(cx, &one[offset..]);
            }
            let n = rest.len().min(WRITE_SLICES);
            let mut slices = [io::IoSlice::new(&[]); WRITE_SLICES];
            for (k, b) in rest[..n].iter().enumerate() {
                slices[k] = io::IoSlice::new(if k == 0 { &b[offset..] } else { b });
            }
            Pin::new(&mut *wr).poll_write_vectored(cx, &slices[..n])
        })
        .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while i < bufs.len() && written >= bufs[i].len() - offset {
            written -= bufs[i].len() - offset;
            i += 1;
            offset = 0;
        }
        offset += written;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_written_together_arrive_whole_and_in_order_through_short_writes() {
        use tokio::io::AsyncReadExt;
        let bufs: Vec<Bytes> = (0..70u8)
            .map(|i| Bytes::from(vec![i; 1 + usize::from(i % 13)]))
            .collect();
        let expected: Vec<u8> = bufs.iter().flat_map(|b| b.to_vec()).collect();
        // A pipe that takes 7 bytes at a time: every write is short.
        let (mut a, mut b) = tokio::io::duplex(7);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        // More buffers than one vectored write takes, then a single one.
        write_all_vectored(&mut a, &bufs).await.unwrap();
        write_all_vectored(&mut a, &bufs[..1]).await.unwrap();
        drop(a);
        let expected = [&expected[..], &bufs[0][..]].concat();
        assert_eq!(reader.await.unwrap(), expected);
    }
}
