//! The accept loop of tern's servers that anyone who reaches their port can use (admin,
//! stats, the webhook, discovery's admin and xDS): at most so many connections open, and so
//! many from one address (more are closed as they come: one client cannot take every place),
//! a time limit for each HTTP/1 request's head, and a pause after a failed accept (out of
//! file descriptors the listener stays readable, and retrying at once would spin).
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::server::conn::http1;
use tokio::net::{TcpListener, TcpStream};

/// How long a client has to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How many connections a server holds at once.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// In all.
    pub connections: usize,
    /// From one address.
    pub per_peer: usize,
}

/// The connections a server holds now, by address.
#[derive(Debug)]
pub struct Places {
    limits: Limits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A connection's place; given back when dropped.
#[derive(Debug)]
pub struct Place {
    places: Arc<Places>,
    peer: IpAddr,
}

impl Places {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: Mutex::default(),
        })
    }

    /// A place for a connection from `peer`, if the limits leave one.
    pub fn take(self: &Arc<Self>, peer: IpAddr) -> Option<Place> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_peer) = &mut *open;
        let from_peer = by_peer.get(&peer).copied().unwrap_or(0);
        if *total >= self.limits.connections || from_peer >= self.limits.per_peer {
            return None;
        }
        *total += 1;
        by_peer.insert(peer, from_peer + 1);
        Some(Place {
            places: self.clone(),
            peer,
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.places.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_peer) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(n) = by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                by_peer.remove(&self.peer);
            }
        }
    }
}

/// A connection accepted within the limits, with its place.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub place: Place,
}

/// The next connection `listener` accepts that `places` has room for; the others are closed
/// as they come, and a failed accept is retried after a pause.
pub async fn accept(listener: &TcpListener, places: &Arc<Places>) -> Accepted {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match places.take(peer.ip().to_canonical()) {
            Some(place) => {
                return Accepted {
                    stream,
                    peer,
                    place,
                };
            }
            None => tracing::warn!(
                %peer,
                limits = ?places.limits,
                "too many connections, or too many from this address: closing a new one"
            ),
        }
    }
}

/// Runs `serve` on its own task for each connection `listener` accepts within `limits`;
/// until the task is dropped.
pub async fn accept_each<F, Fut>(listener: TcpListener, limits: Limits, mut serve: F)
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let places = Places::new(limits);
    loop {
        let Accepted {
            stream,
            peer,
            place,
        } = accept(&listener, &places).await;
        let connection = serve(stream, peer);
        tokio::spawn(async move {
            let _place = place;
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
        let limits = Limits {
            connections: 2,
            per_peer: 2,
        };
        tokio::spawn(accept_each(listener, limits, |mut stream, _| async move {
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

    #[test]
    fn one_address_takes_at_most_its_share() {
        let places = Places::new(Limits {
            connections: 3,
            per_peer: 2,
        });
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = places.take(a).unwrap();
        let _second = places.take(a).unwrap();
        assert!(places.take(a).is_none(), "a third from one address");
        let _other = places.take(b).unwrap();
        assert!(places.take(b).is_none(), "past the total");
        drop(first);
        assert!(
            places.take(a).is_some(),
            "a place given back is taken again"
        );
    }
}
