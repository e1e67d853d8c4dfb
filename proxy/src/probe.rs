//! Kubelet's probes of the application, rewritten by injection to tern's health port
//! (`/app-health/<container>/<readyz|livez|startupz>` on 15020, as Istio does) and forwarded
//! by tern to the application: so probes work under STRICT mTLS and authorization without
//! letting the node's address (which host-network Pods and SNATed NodePort clients share)
//! skip either.
//!
//! The probes come from `ISTIO_KUBE_APP_PROBERS`, Istio's JSON map from those paths to a
//! Kubernetes `httpGet`, `tcpSocket` or `grpc` action (numeric ports; injection resolved names)
//! with `timeoutSeconds`. A gRPC probe calls `grpc.health.v1.Health/Check` over h2c, as the
//! kubelet does, and passes when the application answers `SERVING`. tern reaches the application at the Pod's address from 127.0.0.6, which
//! capture leaves alone, with its own socket mark.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The probes, by path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppProbers(BTreeMap<String, Prober>);

/// One probe: what to check and how long it may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prober {
    pub action: Action,
    pub timeout: Duration,
}

/// What a probe checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// An HTTP GET of `path` on `port`, with these headers; 2xx and 3xx pass.
    Http {
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    /// A TCP connection to `port`.
    Tcp { port: u16 },
    /// `grpc.health.v1.Health/Check` of `service` (empty: the server as a whole) on `port`.
    Grpc { port: u16, service: String },
}

/// Why `ISTIO_KUBE_APP_PROBERS` was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("ISTIO_KUBE_APP_PROBERS is not the JSON map of probes it should be: {0}")]
    Json(#[from] serde_json::Error),
    #[error("probe path {0:?} is not /app-health/<container>/<readyz|livez|startupz>")]
    Path(String),
    #[error("probe {0:?} must have exactly one of httpGet, tcpSocket and grpc")]
    Kind(String),
    #[error("probe {0:?}: HTTPS probes are not forwarded")]
    Https(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProberJson {
    http_get: Option<HttpGetJson>,
    tcp_socket: Option<TcpSocketJson>,
    grpc: Option<GrpcJson>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

#[derive(Deserialize)]
struct GrpcJson {
    port: u16,
    #[serde(default)]
    service: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpGetJson {
    #[serde(default)]
    path: String,
    port: u16,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<HeaderJson>,
}

#[derive(Deserialize)]
struct HeaderJson {
    name: String,
    value: String,
}

#[derive(Deserialize)]
struct TcpSocketJson {
    port: u16,
}

/// The prefix of every rewritten probe's path.
pub const PREFIX: &str = "/app-health/";

impl AppProbers {
    /// Parses Istio's `ISTIO_KUBE_APP_PROBERS` (empty: none).
    pub fn parse(json: &str) -> Result<Self, ProbeError> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        let raw: BTreeMap<String, ProberJson> = serde_json::from_str(json)?;
        let mut out = BTreeMap::new();
        for (path, p) in raw {
            let valid = path.strip_prefix(PREFIX).is_some_and(|rest| {
                rest.split_once('/').is_some_and(|(container, kind)| {
                    !container.is_empty() && matches!(kind, "readyz" | "livez" | "startupz")
                })
            });
            if !valid {
                return Err(ProbeError::Path(path));
            }
            let action = match (p.http_get, p.tcp_socket, p.grpc) {
                (Some(h), None, None) => {
                    if h.scheme
                        .as_deref()
                        .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
                    {
                        return Err(ProbeError::Https(path));
                    }
                    Action::Http {
                        port: h.port,
                        path: if h.path.starts_with('/') {
                            h.path
                        } else {
                            format!("/{}", h.path)
                        },
                        headers: h
                            .http_headers
                            .into_iter()
                            .map(|h| (h.name, h.value))
                            .collect(),
                    }
                }
                (None, Some(t), None) => Action::Tcp { port: t.port },
                (None, None, Some(g)) => Action::Grpc {
                    port: g.port,
                    service: g.service.unwrap_or_default(),
                },
                _ => return Err(ProbeError::Kind(path)),
            };
            // Kubernetes' default is 1 s.
            let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).clamp(1, 60));
            out.insert(path, Prober { action, timeout });
        }
        Ok(Self(out))
    }

    pub fn get(&self, path: &str) -> Option<&Prober> {
        self.0.get(path)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Prober {
    /// Runs the probe against the application at `pod_ip`; whether it passed, or why not.
    pub async fn run(&self, pod_ip: IpAddr, mark: u32) -> Result<(), String> {
        let port = match &self.action {
            Action::Http { port, .. } | Action::Tcp { port } | Action::Grpc { port, .. } => *port,
        };
        let (target, source) = crate::socket::inbound_target(SocketAddr::new(pod_ip, port));
        let check = async {
            let mut stream = crate::socket::connect_upstream(target, mark, source)
                .await
                .map_err(|e| format!("connect to {target}: {e}"))?;
            let (path, headers) = match &self.action {
                Action::Tcp { .. } => return Ok(()),
                Action::Grpc { service, .. } => return grpc_health(stream, target, service).await,
                Action::Http { path, headers, .. } => (path, headers),
            };
            let mut request = format!(
                "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: kube-probe/tern\r\nConnection: close\r\n"
            );
            for (name, value) in headers {
                // A header that would split the request is not sent.
                if !(name.contains(['\r', '\n', ':']) || value.contains(['\r', '\n'])) {
                    request.push_str(&format!("{name}: {value}\r\n"));
                }
            }
            request.push_str("\r\n");
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("send the request: {e}"))?;
            let mut head = Vec::with_capacity(64);
            let mut byte = [0u8; 1];
            while head.len() < 256 && !head.ends_with(b"\r\n") {
                match stream.read(&mut byte).await {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let line = String::from_utf8_lossy(&head);
            let status: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("no HTTP status in {line:?}"))?;
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(format!("the application answered {status}"))
            }
        };
        tokio::time::timeout(self.timeout, check)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }
}

/// `grpc.health.v1.Health/Check` of `service` over the connected `stream` (h2c).
async fn grpc_health(
    stream: tokio::net::TcpStream,
    target: SocketAddr,
    service: &str,
) -> Result<(), String> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    // The connection is already made (from 127.0.0.6, with tern's mark): the channel takes it
    // once, and a reconnect finds nothing.
    let stream = std::sync::Mutex::new(Some(stream));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| format!("the gRPC address {target}: {e}"))?
        .connect_with_connector(tower::service_fn(move |_| {
            let taken = stream.lock().ok().and_then(|mut s| s.take());
            async move {
                taken
                    .map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the probe's connection is used"))
            }
        }))
        .await
        .map_err(|e| format!("gRPC connection to {target}: {e}"))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|e| format!("gRPC health check: {}", e.message()))?;
    match reply.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("the application is {}", other.as_str_name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istios_probers_parse_and_bad_ones_are_refused() {
        let p = AppProbers::parse(
            r#"{"/app-health/app/readyz":{"httpGet":{"path":"ready","port":8080,"scheme":"HTTP","httpHeaders":[{"name":"X-A","value":"1"}]},"timeoutSeconds":3},
                "/app-health/app/livez":{"tcpSocket":{"port":8080}}}"#,
        )
        .unwrap();
        assert_eq!(
            p.get("/app-health/app/readyz"),
            Some(&Prober {
                action: Action::Http {
                    port: 8080,
                    path: "/ready".into(),
                    headers: vec![("X-A".into(), "1".into())],
                },
                timeout: Duration::from_secs(3),
            })
        );
        assert_eq!(
            p.get("/app-health/app/livez").unwrap().action,
            Action::Tcp { port: 8080 }
        );
        let g = AppProbers::parse(
            r#"{"/app-health/app/startupz":{"grpc":{"port":9000,"service":"calc"}}}"#,
        )
        .unwrap();
        assert_eq!(
            g.get("/app-health/app/startupz").unwrap().action,
            Action::Grpc {
                port: 9000,
                service: "calc".into()
            }
        );
        for bad in [
            r#"{"/other":{"tcpSocket":{"port":1}}}"#,
            r#"{"/app-health/app/readyz":{}}"#,
            r#"{"/app-health/app/readyz":{"tcpSocket":{"port":"http"}}}"#,
            r#"{"/app-health/app/readyz":{"httpGet":{"port":1,"scheme":"HTTPS"}}}"#,
            r#"{"/app-health/app/readyz":{"grpc":{"port":1},"tcpSocket":{"port":1}}}"#,
        ] {
            assert!(AppProbers::parse(bad).is_err(), "{bad}");
        }
        assert!(AppProbers::parse("").unwrap().is_empty());
    }
}
