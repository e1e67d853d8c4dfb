//! Socket options and kernel calls of the data path, in one place.
//!
//! - [`original_dst`]: where a captured connection was going. `SO_ORIGINAL_DST` is answered
//!   by conntrack under iptables capture and by tern's getsockopt hook under eBPF capture;
//!   sk_lookup-steered inbound connections keep the original destination as local address.
//! - [`connect_upstream`]: the proxy's own connections carry `SO_MARK` so that neither
//!   capture mechanism sends them back to the proxy.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

/// Source address of the proxy's connections to the local application (Istio's convention).
/// Inbound capture never takes connections from it.
pub const INBOUND_PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// How the original destination of an accepted connection was learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginalDstSource {
    /// `SO_ORIGINAL_DST` (eBPF getsockopt hook or conntrack).
    SockOpt,
    /// The accepted socket's local address (sk_lookup steering).
    LocalAddr,
}

/// The destination a captured connection was sent to before capture.
pub fn original_dst(stream: &TcpStream) -> io::Result<(SocketAddr, OriginalDstSource)> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let answered = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    if let Ok(addr) = answered
        && let Some(addr) = addr.as_socket()
    {
        return Ok((unmap(addr), OriginalDstSource::SockOpt));
    }
    Ok((unmap(local), OriginalDstSource::LocalAddr))
}

/// `::ffff:a.b.c.d` as `a.b.c.d`, so IPv4 destinations look the same whichever family dialled.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// A listening socket on `addr` (IPv6 sockets are v6-only, so they sit beside an IPv4 one).
pub fn listen(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Connects to `dst` from a socket marked with `mark` (0: unmarked, when tern runs
/// unprivileged and capture skips its uid instead), optionally bound to `source`.
pub async fn connect_upstream(
    dst: SocketAddr,
    mark: u32,
    source: Option<IpAddr>,
) -> io::Result<TcpStream> {
    let socket = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if mark != 0 {
        SockRef::from(&socket).set_mark(mark)?;
    }
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(dst).await
}

/// Where and from which source the proxy reaches the local application an inbound
/// connection was sent to: the original address, so applications bound only to the Pod's
/// address are reached; from 127.0.0.6 over IPv4 (as Istio does), and over IPv6 from that
/// same address (no `::6` is assigned). Capture leaves both sources alone.
pub fn inbound_target(dst: SocketAddr) -> (SocketAddr, Option<IpAddr>) {
    match dst {
        SocketAddr::V4(_) => (dst, Some(IpAddr::V4(INBOUND_PASSTHROUGH_V4))),
        SocketAddr::V6(v6) => (dst, Some(IpAddr::V6(*v6.ip()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmaps_v4_mapped_addresses() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(unmap(mapped), "10.0.0.1:80".parse::<SocketAddr>().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(unmap(v6), v6);
    }

    #[tokio::test]
    async fn uncaptured_connections_fall_back_to_the_local_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let (dst, source) = original_dst(&accepted).unwrap();
        assert_eq!(dst, addr);
        assert_eq!(source, OriginalDstSource::LocalAddr);
    }
}
