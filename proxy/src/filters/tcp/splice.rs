//! The relay between two plain TCP sockets without copying: `splice(2)` moves each
//! direction's bytes through a pipe inside the kernel, never through tern's memory.
use std::{
    io,
    net::Shutdown,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicUsize, Ordering},
};

use nix::{
    fcntl::{OFlag, SpliceFFlags, splice},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

/// How much one `splice` moves at most: a pipe's default capacity (16 pages).
const CHUNK: usize = 64 * 1024;

/// At most this many relays splice at once. Each holds two pipes (four file descriptors,
/// and up to [`CHUNK`] bytes of pages in flight per direction); relays beyond it copy
/// through buffers of their own.
pub const MAX_SPLICING: usize = 4096;

static SPLICING: Places = Places::new(MAX_SPLICING);

/// A count of holders with a limit.
struct Places {
    used: AtomicUsize,
    limit: usize,
}

impl Places {
    const fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    fn take(&self) -> bool {
        let taken = self.used.fetch_add(1, Ordering::Relaxed);
        if taken >= self.limit {
            self.give_back();
            return false;
        }
        true
    }

    fn give_back(&self) {
        self.used.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One relay's two pipes, and its place among the [`MAX_SPLICING`] (given back on drop).
pub struct Pipes {
    to_up: Pipe,
    to_down: Pipe,
    places: &'static Places,
}

/// The two ends of a pipe.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Self { read, write })
    }
}

impl Pipes {
    /// Pipes for one more relay; `None` when [`MAX_SPLICING`] relays splice already or the
    /// process is out of file descriptors.
    pub fn take() -> Option<Self> {
        Self::take_from(&SPLICING)
    }

    fn take_from(places: &'static Places) -> Option<Self> {
        if !places.take() {
            return None;
        }
        match (Pipe::new(), Pipe::new()) {
            (Ok(to_up), Ok(to_down)) => Some(Self {
                to_up,
                to_down,
                places,
            }),
            _ => {
                places.give_back();
                None
            }
        }
    }
}

impl Drop for Pipes {
    fn drop(&mut self) {
        self.places.give_back();
    }
}

/// Relays both ways until both sides have ended (each side's end of stream passed on as a
/// half-close) or one fails; returns the bytes moved (to `up`, to `down`). `moved` is called
/// whenever bytes moved.
pub async fn relay(
    down: &TcpStream,
    up: &TcpStream,
    pipes: &Pipes,
    moved: &(impl Fn() + Sync),
) -> io::Result<(u64, u64)> {
    tokio::try_join!(
        one_way(down, up, &pipes.to_up, moved),
        one_way(up, down, &pipes.to_down, moved)
    )
}

/// Moves `from`'s bytes to `to` through `pipe` until `from` ends, then shuts `to` for
/// writing. The pipe is empty whenever `from` is read, so a read that would block means
/// `from` has nothing, never that the pipe is full.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    moved: &impl Fn(),
) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let n = move_when_ready(from, Interest::READABLE, from, &pipe.write, CHUNK).await?;
        if n == 0 {
            // The peer may be gone already; the relay ends with the other direction.
            let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
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
    use std::sync::atomic::AtomicU64;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_whole_and_each_end_is_passed_on() {
        let (mut client, down) = pair().await;
        let (up, mut server) = pair().await;
        let pipes = Pipes::take().unwrap();
        let moves = AtomicU64::new(0);
        let moved = || {
            moves.fetch_add(1, Ordering::Relaxed);
        };
        let request: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let reply: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let client_side = async {
            client.write_all(&request).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        let server_side = async {
            let mut got = Vec::new();
            // Reads to the client's end of stream: the half-close crossed.
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&reply).await.unwrap();
            server.shutdown().await.unwrap();
            got
        };
        let (copied, to_client, to_server) =
            tokio::join!(relay(&down, &up, &pipes, &moved), client_side, server_side);
        assert_eq!(copied.unwrap(), (request.len() as u64, reply.len() as u64));
        assert!(
            to_server == request,
            "the request arrived whole and in order"
        );
        assert!(to_client == reply, "the reply arrived whole and in order");
        assert!(moves.load(Ordering::Relaxed) >= 2);
    }

    #[tokio::test]
    async fn a_reset_peer_ends_the_relay_with_an_error() {
        let (client, down) = pair().await;
        let (up, server) = pair().await;
        let pipes = Pipes::take().unwrap();
        // The server resets its connection; the client keeps writing.
        socket2::SockRef::from(&server)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(server);
        // The relay owns its sockets, as in tern: they close when it ends.
        let relay = tokio::spawn(async move { relay(&down, &up, &pipes, &|| {}).await });
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
    fn no_more_than_the_bound_splice_at_once() {
        let places: &'static Places = Box::leak(Box::new(Places::new(2)));
        let first = Pipes::take_from(places).unwrap();
        let _second = Pipes::take_from(places).unwrap();
        assert!(Pipes::take_from(places).is_none(), "the bound holds");
        drop(first);
        assert!(
            Pipes::take_from(places).is_some(),
            "a place given back is taken again"
        );
        assert_eq!(places.used.load(Ordering::Relaxed), 1);
    }
}
