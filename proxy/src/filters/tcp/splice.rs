//! The relay between two plain TCP sockets. Each direction copies through a small buffer
//! while its reads come back short (requests and replies: one read and one write each), and
//! once a read fills the buffer (a bulk transfer) it moves its bytes with `splice(2)` through
//! a pipe inside the kernel, never through tern's memory.
use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, LazyLock},
};

use nix::{
    fcntl::{OFlag, SpliceFFlags, splice},
    unistd::pipe2,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use crate::budget::{BufferBudget, Held};

/// A direction's copy buffer; a read that fills it switches the direction to splicing.
const COPY_BUFFER: usize = 8 * 1024;

/// How much one `splice` moves at most: a pipe's default capacity (16 pages).
const CHUNK: usize = 64 * 1024;

/// At most this many pipes exist at once (two file descriptors each, and up to [`CHUNK`]
/// bytes of pages in flight); a direction that finds none keeps copying.
pub const MAX_PIPES: usize = 8192;

/// The pipes that exist, among the [`MAX_PIPES`].
static PIPES: LazyLock<Arc<BufferBudget>> = LazyLock::new(|| BufferBudget::new(MAX_PIPES));

/// A pipe's two ends, and its place among the [`MAX_PIPES`] (given back on drop).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    _place: Held,
}

impl Pipe {
    /// A pipe; `None` when [`MAX_PIPES`] exist already or the process is out of file
    /// descriptors.
    fn take() -> Option<Self> {
        Self::take_from(&PIPES)
    }

    fn take_from(places: &Arc<BufferBudget>) -> Option<Self> {
        let mut place = places.hold();
        place.grow(1).ok()?;
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).ok()?;
        Some(Self {
            read,
            write,
            _place: place,
        })
    }
}

/// Relays both ways until both sides have ended (each side's end of stream passed on as a
/// half-close) or one fails; returns the bytes moved (to `up`, to `down`). `moved` is called
/// whenever bytes moved.
pub async fn relay(
    down: &mut TcpStream,
    up: &mut TcpStream,
    moved: &(impl Fn() + Sync),
) -> io::Result<(u64, u64)> {
    let (down_read, down_write) = down.split();
    let (up_read, up_write) = up.split();
    tokio::try_join!(
        one_way(down_read, up_write, moved),
        one_way(up_read, down_write, moved)
    )
}

/// Moves `from`'s bytes to `to` until `from` ends, then shuts `to` for writing: copied while
/// reads are short, spliced from the first read that fills the buffer on.
async fn one_way(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    moved: &impl Fn(),
) -> io::Result<u64> {
    let mut total = 0;
    let mut buf = vec![0u8; COPY_BUFFER];
    let pipe = loop {
        // tokio takes a short read as "drained": no read that would block follows it.
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        moved();
        to.write_all(&buf[..n]).await?;
        total += n as u64;
        moved();
        if n == buf.len()
            && let Some(pipe) = Pipe::take()
        {
            break pipe;
        }
    };
    drop(buf);
    let (from, to) = (from.as_ref(), to.as_ref());
    loop {
        // The pipe is empty whenever `from` is read, so a read that would block means `from`
        // has nothing, never that the pipe is full.
        let n = move_when_ready(from, Interest::READABLE, from, &pipe.write, CHUNK).await?;
        if n == 0 {
            socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
            return Ok(total);
        }
        moved();
        let mut left = n;
        while left > 0 {
            let sent = move_when_ready(to, Interest::WRITABLE, &pipe.read, to, left).await?;
            left -= sent;
            total += sent as u64;
            moved();
        }
    }
}

/// Splices up to `len` bytes from `source` to `sink` once `socket` (one of the two) is
/// ready for `interest`; waits again each time the kernel says it would block.
async fn move_when_ready(
    socket: &TcpStream,
    interest: Interest,
    source: impl AsFd,
    sink: impl AsFd,
    len: usize,
) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        socket.ready(interest).await?;
        match socket.try_io(interest, || {
            splice(source.as_fd(), None, sink.as_fd(), None, len, flags).map_err(io::Error::from)
        }) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// `len` bytes of a pattern that shows any byte lost, repeated or out of order.
    fn pattern(len: u32, modulo: u32) -> Vec<u8> {
        (0..len).map(|i| (i % modulo) as u8).collect()
    }

    #[tokio::test]
    async fn small_and_bulk_bytes_cross_both_ways_whole_and_each_end_is_passed_on() {
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let moves = AtomicU64::new(0);
        let moved = || {
            moves.fetch_add(1, Ordering::Relaxed);
        };
        // A small request first (copied), then bulk (spliced once a read fills the buffer).
        let request = [&b"hello"[..], &pattern(3_000_000, 251)].concat();
        let reply = pattern(1_000_000, 241);
        // The client ends its stream once the server saw it all (the pipe is still held).
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let client_side = async {
            client.write_all(&request[..5]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            client.write_all(&request[5..]).await.unwrap();
            seen_rx.await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        let server_side = async {
            let mut got = vec![0u8; request.len()];
            server.read_exact(&mut got).await.unwrap();
            let spliced = PIPES.used();
            seen_tx.send(()).unwrap();
            // Reads to the client's end of stream: the half-close crossed.
            assert_eq!(server.read(&mut [0u8; 1]).await.unwrap(), 0);
            server.write_all(&reply).await.unwrap();
            server.shutdown().await.unwrap();
            (got, spliced)
        };
        let (copied, to_client, to_server) =
            tokio::join!(relay(&mut down, &mut up, &moved), client_side, server_side);
        assert_eq!(copied.unwrap(), (request.len() as u64, reply.len() as u64));
        let (to_server, spliced) = to_server;
        assert!(spliced >= 1, "the bulk was spliced");
        assert!(
            to_server == request,
            "the request arrived whole and in order"
        );
        assert!(to_client == reply, "the reply arrived whole and in order");
        assert!(moves.load(Ordering::Relaxed) >= 4);
    }

    #[tokio::test]
    async fn a_reset_peer_ends_the_relay_with_an_error() {
        let (client, mut down) = pair().await;
        let (mut up, server) = pair().await;
        // The server resets its connection; the client keeps writing.
        socket2::SockRef::from(&server)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(server);
        // The relay owns its sockets, as in tern: they close when it ends.
        let relay = tokio::spawn(async move { relay(&mut down, &mut up, &|| {}).await });
        let writes = async {
            let mut client = client;
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..64 {
                if client.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        };
        // A relay that missed the reset would leave the client blocked on a full window.
        let ended = std::time::Duration::from_secs(10);
        tokio::time::timeout(ended, writes).await.unwrap();
        let copied = relay.await.unwrap();
        assert!(copied.is_err(), "{copied:?}");
    }

    #[test]
    fn no_more_pipes_than_the_bound() {
        let places = BufferBudget::new(2);
        let first = Pipe::take_from(&places).unwrap();
        let _second = Pipe::take_from(&places).unwrap();
        assert!(Pipe::take_from(&places).is_none(), "the bound holds");
        drop(first);
        let third = Pipe::take_from(&places);
        assert!(third.is_some(), "a place given back is taken again");
        drop(third);
        assert_eq!(places.used(), 1);
    }
}
