//! Opening a connection upstream: TCP from a marked socket, then the TLS handshake when the
//! destination is reached over TLS (Istio's auto-mTLS picks that per endpoint; a
//! DestinationRule can ask it of an original-destination cluster). The whole of it is
//! bounded by the connect timeout; handshakes are counted by result.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpStream;

use super::{ClusterRuntime, EndpointRuntime};
use crate::{config::UpstreamTls, socket, stream::Stream};

/// Connects to `endpoint` of `cluster`, with TLS if the endpoint takes it.
pub async fn dial(
    endpoint: &EndpointRuntime,
    cluster: &ClusterRuntime,
    mark: u32,
    timeout: Duration,
) -> io::Result<Stream> {
    // Boxed: a handshake's state is large, and a request that finds an idle connection
    // (most do) would otherwise carry room for it in its own future, moved on every step.
    let open = Box::pin(async {
        let tcp = socket::connect_upstream(endpoint.address, mark, None).await?;
        let stream = secure(tcp, endpoint.address, endpoint.tls.as_ref(), cluster).await?;
        if let Some(id) = stream.peer_identity() {
            let _ = endpoint.traffic().server_identity.set(id.into());
        }
        Ok(stream)
    });
    tokio::time::timeout(timeout, open)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// TLS over a socket connected to `addr`, when `tls` asks for it.
pub async fn secure(
    tcp: TcpStream,
    addr: SocketAddr,
    tls: Option<&Arc<UpstreamTls>>,
    cluster: &ClusterRuntime,
) -> io::Result<Stream> {
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let client = cluster.client_tls(tls).map_err(|e| {
        tracing::warn!(cluster = %cluster.name(), error = %e, "TLS context unusable");
        io::Error::other(e)
    })?;
    let handshake = client.connect(tcp, addr.ip()).await;
    cluster
        .handshakes()
        .count("outbound", handshake.as_ref().map(|_| ()));
    let stream = Stream::Tls(Box::new(handshake?.into()));
    tracing::debug!(
        %addr,
        server_identity = stream.peer_identity().as_deref().unwrap_or("-"),
        "TLS upstream"
    );
    Ok(stream)
}
