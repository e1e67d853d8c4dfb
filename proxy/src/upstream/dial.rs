//! Opening a connection to an endpoint: TCP from a marked socket, then the TLS handshake
//! when the endpoint is reached over TLS (Istio's auto-mTLS picks that per endpoint). The
//! whole of it is bounded by the connect timeout; handshakes are counted by result.
use std::{io, time::Duration};

use crate::{
    socket,
    state::{ClusterRuntime, EndpointRuntime},
    stream::Stream,
};

/// Connects to `endpoint` of `cluster`, with TLS if the endpoint takes it.
pub async fn dial(
    endpoint: &EndpointRuntime,
    cluster: &ClusterRuntime,
    mark: u32,
    timeout: Duration,
) -> io::Result<Stream> {
    // The TLS client is resolved before connecting: a context that cannot be built (a
    // missing file) fails the attempt without opening a socket.
    let tls = match &endpoint.tls {
        Some(t) => Some(cluster.client_tls(t).map_err(|e| {
            tracing::warn!(cluster = %cluster.name(), error = %e, "TLS context unusable");
            io::Error::other(e)
        })?),
        None => None,
    };
    let open = async {
        let tcp = socket::connect_upstream(endpoint.address, mark, None).await?;
        let Some(tls) = tls else {
            return Ok(Stream::Plain(tcp));
        };
        let handshake = tls.connect(tcp, endpoint.address.ip()).await;
        cluster
            .registry()
            .handshake("outbound", handshake.as_ref().map(|_| ()));
        let stream = Stream::Tls(Box::new(handshake?.into()));
        let identity = stream.peer_identity();
        tracing::debug!(
            endpoint = %endpoint.address,
            server_identity = identity.as_deref().unwrap_or("-"),
            "TLS to the endpoint"
        );
        if let Some(id) = identity {
            let _ = endpoint.server_identity.set(id);
        }
        Ok(stream)
    };
    tokio::time::timeout(timeout, open)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}
