//! The accept loop of tern's small HTTP/1 servers (admin, stats, the webhook, discovery's
//! admin), which anyone who reaches their port can use: at most so many connections open
//! (more are closed as they come), a time limit for each request's head, and a pause after a
//! failed accept (out of file descriptors: the listener stays readable, and retrying at once
//! would spin).
#![forbid(unsafe_code)]

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use hyper::server::conn::http1;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

/// How long a client has to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Runs `serve` on its own task for each connection `listener` accepts, with at most
/// `max_connections` of them running at once; until the task is dropped.
pub async fn accept_each<F, Fut>(listener: TcpListener, max_connections: usize, mut serve: F)
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let open = Arc::new(Semaphore::new(max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = max_connections, "too many connections: closing a new one");
            continue;
        };
        let connection = serve(stream, peer);
        tokio::spawn(async move {
            let _permit = permit;
            connection.await;
        });
    }
}

/// An HTTP/1 connection builder whose clients have [`HEADER_TIMEOUT`] for each request's
/// head (hyper sets no limit without a timer).
pub fn http1() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_a_closed_one_makes_room() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(accept_each(listener, 2, |mut stream, _| async move {
            // Answers one byte per byte until the client closes.
            let mut b = [0u8; 1];
            while stream.read_exact(&mut b).await.is_ok() {
                if stream.write_all(&b).await.is_err() {
                    return;
                }
            }
        }));
        let echo = |mut s: TcpStream| async move {
            s.write_all(b"x").await.ok()?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.ok()?;
            Some(s)
        };
        let first = echo(TcpStream::connect(addr).await.unwrap()).await;
        let second = echo(TcpStream::connect(addr).await.unwrap()).await;
        assert!(first.is_some() && second.is_some(), "two are served");
        let third = echo(TcpStream::connect(addr).await.unwrap()).await;
        assert!(third.is_none(), "the third is closed");
        drop(first);
        let mut again = None;
        for _ in 0..100 {
            again = echo(TcpStream::connect(addr).await.unwrap()).await;
            if again.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(again.is_some(), "a closed connection makes room");
    }
}
