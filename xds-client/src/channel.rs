//! The gRPC channel to the control plane (istiod's 15010 plaintext or 15012 TLS), shared by
//! the ADS stream and Istio's CA client: TLS from files, a bearer token from a file, HTTP/2
//! keepalive, and `SO_MARK` on the socket so the proxy's own capture leaves it alone. Files
//! are read again at every connection, so rotated credentials are picked up.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

/// HTTP/2 keepalive: a ping this often, and the connection is dead without an answer in
/// [`KEEPALIVE_TIMEOUT`].
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to reach the control plane.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// `http://host:port` (plaintext gRPC, istiod's 15010) or `https://host:port` (TLS, 15012).
    pub address: String,
    /// TLS settings for an `https` address.
    pub tls: Option<TlsFiles>,
    /// A file holding a bearer token sent as `authorization: Bearer …` (istiod's JWT).
    pub token_file: Option<PathBuf>,
    /// `SO_MARK` for the connection, so a proxy's own traffic capture leaves it alone.
    pub socket_mark: Option<u32>,
}

/// Files of the TLS settings.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// PEM roots the server's certificate must chain to (istiod's mesh root).
    pub ca: PathBuf,
    /// PEM certificate and key to present, when the server asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The name to verify the server's certificate against (default: the address's host).
    pub server_name: Option<String>,
}

/// Why a channel could not open.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("invalid control plane address {address}: {source}")]
    Address {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token in {0} is not a valid header value")]
    Token(PathBuf),
    #[error(
        "{address} is not https with a root to verify it: the token and certificate requests go only over verified TLS, and TLS settings only with https"
    )]
    NotVerifiedTls { address: String },
    #[error("TLS settings for {address}: {source}")]
    Tls {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("connect to {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
}

/// A connected channel and the `authorization` value its calls carry, if any.
pub struct Connected {
    pub channel: Channel,
    pub bearer: Option<MetadataValue<Ascii>>,
}

/// Connects to the control plane.
pub async fn open(config: &ChannelConfig) -> Result<Connected, ChannelError> {
    let address = || config.address.clone();
    // A token, or TLS settings, on a plaintext channel would be sent in the clear, or
    // silently unused.
    let https = config.address.starts_with("https://");
    if https != config.tls.is_some() || (config.token_file.is_some() && !https) {
        return Err(ChannelError::NotVerifiedTls { address: address() });
    }
    let mut endpoint = tonic::transport::Endpoint::from_shared(config.address.clone())
        .map_err(|source| ChannelError::Address {
            address: address(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(files) = &config.tls {
        endpoint = endpoint
            .tls_config(tls_config(files)?)
            .map_err(|source| ChannelError::Tls {
                address: address(),
                source,
            })?;
    }
    let mark = config.socket_mark;
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |uri| connect_marked(uri, mark)))
        .await
        .map_err(|source| ChannelError::Connect {
            address: address(),
            source,
        })?;
    let bearer = config.token_file.as_deref().map(bearer).transpose()?;
    Ok(Connected { channel, bearer })
}

/// Connects to the host and port of `uri`, with `SO_MARK` set when asked.
async fn connect_marked(
    uri: tonic::transport::Uri,
    mark: Option<u32>,
) -> std::io::Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>> {
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{host} resolves to no address"),
    );
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(mark) = mark {
            socket2::SockRef::from(&socket).set_mark(mark)?;
        }
        match socket.connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(hyper_util::rt::TokioIo::new(stream));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, ChannelError> {
    std::fs::read(path).map_err(|source| ChannelError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn tls_config(files: &TlsFiles) -> Result<ClientTlsConfig, ChannelError> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&files.ca, "control plane CA")?));
    if let Some((cert, key)) = &files.client_cert {
        tls = tls.identity(Identity::from_pem(
            read(cert, "control plane client certificate")?,
            read(key, "control plane client key")?,
        ));
    }
    if let Some(name) = &files.server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(tls)
}

/// The `authorization` header value from a token file (trailing whitespace trimmed).
fn bearer(path: &Path) -> Result<MetadataValue<Ascii>, ChannelError> {
    let token = String::from_utf8(read(path, "token file")?)
        .map_err(|_| ChannelError::Token(path.to_owned()))?;
    format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| ChannelError::Token(path.to_owned()))
}
