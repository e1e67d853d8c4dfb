//! istiod's stand-in for tern's tests (istiod cannot run here): a tonic ADS server that
//! serves what istiod sends a sidecar, built from a YAML snapshot file — Istio-shaped
//! listeners, clusters and endpoints (and a `thrift_proxy` where an EnvoyFilter would patch
//! one in), the inbound mTLS chains and `AuthorizationPolicy` RBAC, real istiod resources
//! from `/config_dump`s, istiod's EDS churn — and, like istiod, its CA and its token checks.
//! `tern discovery` is tern's own control plane; it does not generate Istio's security
//! resources, which are istiod's job. What no control plane should do (stalls, cut streams,
//! malformed resources) is `tern-controlplane`'s, in front of this one.
//!
//! `tern-istiod ADDR SNAPSHOT.yaml [--tls CERT KEY] [--token FILE] [--ca CERT KEY IDENTITY]`
//! serves both ADS protocols (state of the world and delta) and prints `ready`, then one
//! line per event: `STREAM` (or `STREAM delta`), `SUBSCRIBE <type> version=<v> names=<a,b>`
//! (delta: `held=<name@version,…>`), `ACK <type> <version>`, `NACK <type> <version>
//! <reason>`, `SENT <type> <n> bytes` (state of the world), `PUSH <version>`, `REJECT
//! <token>`. Rewriting the file pushes a new version to every stream; a file that does not
//! parse (unknown keys included) is said as `ERROR` and the last one keeps serving.
//! With `--ca`, it is also Istio's CA: `CreateCertificate` signs CSRs for IDENTITY with the
//! CA's files (`ISSUE <identity> ttl=<s> cluster=<id>` per certificate). The token file holds
//! one token per line; a token followed by a SPIFFE identity stands for that identity (as a
//! TokenReview tells istiod whose service account a token is), and the CA issues it instead of
//! IDENTITY to callers that present it.
//!
//! ```yaml
//! version: "1"
//! services:
//!   - { name: calc, vip: 10.96.0.10, port: 9090, filter: thrift, endpoints: ["10.66.1.2:9001"] }
//!   - { name: sticky, vip: 10.96.0.11, port: 7070, filter: tcp, lb: ring_hash, endpoints: [...] }
//!   - { name: secure, vip: 10.96.0.12, port: 7070, filter: tcp, mtls: "spiffe://cluster.local/ns/x/sa/y", endpoints: [...] }
//! inbound: strict           # Istio's virtualInbound with mTLS chains (strict or permissive)
//! inbound_rbac:             # its network RBAC (an AuthorizationPolicy's rules)
//!   - { name: p, action: allow, principals: ["spiffe://…"], ports: [8080], methods: ["get*"] }
//! bulk: 0                   # add this many generated services (10 endpoints each)
//! cluster_padding: 0        # bytes of metadata in every generated cluster (a large CDS)
//! churn_per_sec: 0          # push this many one-endpoint EDS changes a second (SotW)
//! # Real istiod resources (`tests/python/istio_dump.py` converts a /config_dump): listeners,
//! # clusters and endpoints served as they are. Clusters the listeners name that the dump
//! # lacks are made in istiod's EDS shape; EDS clusters without endpoints get
//! # `dump_endpoints`, except those listed in `endpoints`.
//! dumps: [/tmp/istio.bin]
//! dump_endpoints: ["10.66.1.2:9999"]
//! endpoints: { "outbound|443||kubernetes.default.svc.cluster.local": ["10.66.1.2:9443"] }
//! ```
mod ads;
mod ca;
mod dumps;
mod inbound;
mod resources;
mod snapshot;

use std::{collections::HashMap, sync::Arc};

use tern_proto::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::sync::watch;
use tonic::{Request, Status};

use ads::Ads;
use tern_tests::say;

/// A type URL's last part (`Cluster`, `Listener`, …).
fn short(t: &str) -> &str {
    t.rsplit('.').next().unwrap_or(t)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: std::net::SocketAddr = args[1].parse().expect("ADDR");
    let path = args[2].clone();
    let option = |name: &str, n: usize| -> Option<Vec<String>> {
        let i = args.iter().position(|a| a == name)?;
        Some(args[i + 1..i + 1 + n].to_vec())
    };
    let tls = option("--tls", 2);
    // Token → the identity it stands for (if the file names one).
    let tokens: Option<HashMap<String, Option<String>>> = option("--token", 1).map(|f| {
        std::fs::read_to_string(&f[0])
            .expect("token file")
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                Some((words.next()?.to_owned(), words.next().map(str::to_owned)))
            })
            .collect()
    });
    let (tx, rx) = watch::channel(Arc::new(
        snapshot::load(&path).expect("a valid snapshot file"),
    ));
    tokio::spawn(async move {
        tern_tests::on_change(&path, || {
            if let Some(s) = snapshot::load(&path) {
                say(format!("PUSH {}", s.version));
                tx.send_replace(Arc::new(s));
            }
        })
        .await;
    });
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let mut server = tonic::transport::Server::builder();
    if let Some(files) = tls {
        let cert = std::fs::read(&files[0]).expect("cert");
        let key = std::fs::read(&files[1]).expect("key");
        let identity = tonic::transport::Identity::from_pem(cert, key);
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .expect("TLS settings");
    }
    // With --token, streams must carry `authorization: Bearer <token>`, as istiod checks.
    let check = move |mut request: Request<()>| {
        let Some(tokens) = &tokens else {
            return Ok(request);
        };
        let got = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match got
            .as_deref()
            .and_then(|g| g.strip_prefix("Bearer "))
            .and_then(|t| tokens.get(t))
        {
            Some(identity) => {
                if let Some(id) = identity {
                    request
                        .extensions_mut()
                        .insert(ca::TokenIdentity(id.clone()));
                }
                Ok(request)
            }
            None => {
                say(format!("REJECT {}", got.as_deref().unwrap_or("no token")));
                Err(Status::unauthenticated("invalid bearer token"))
            }
        }
    };
    let ca = option("--ca", 3).map(|a| {
        let ca = tern_tests::pki::TestCa::load(a[0].as_ref(), a[1].as_ref()).expect("the CA files");
        tern_proto::istio_ca::istio_certificate_service_server::IstioCertificateServiceServer::with_interceptor(
            ca::Ca { ca, identity: a[2].clone() },
            check.clone(),
        )
    });
    say("ready");
    let service = AggregatedDiscoveryServiceServer::with_interceptor(Ads { snapshot: rx }, check);
    server
        .add_service(service)
        .add_optional_service(ca)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .expect("serve");
}
