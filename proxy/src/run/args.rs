//! `tern run`'s flags, with environment fallbacks (Istio's names where Istio has one).
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::{
    capture::{args::CaptureArgs, parse_ports},
    duration::parse_go_duration,
};

/// How traffic reaches the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CaptureMode {
    /// No capture: only connections sent to the listeners reach the proxy.
    None,
    /// eBPF hooks on a cgroup and the network namespace.
    Ebpf,
    /// Istio-style iptables REDIRECT rules in the network namespace.
    Iptables,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Capture mechanism.
    #[arg(long, env = "TERN_CAPTURE", value_enum, default_value = "none")]
    pub capture: CaptureMode,
    #[command(flatten)]
    pub capture_args: CaptureArgs,
    /// Static configuration (listeners, routes, clusters, endpoints), YAML or JSON; re-read
    /// when it changes. Without it, every destination is relayed as it is (passthrough).
    #[arg(long, env = "TERN_CONFIG")]
    pub config: Option<PathBuf>,
    /// The control plane's ADS address (`http://istiod.istio-system:15010`); without it, tern
    /// runs on the static configuration alone.
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// PEM CA the control plane's certificate must chain to (for an `https` xDS address).
    #[arg(long, env = "XDS_ROOT_CA")]
    pub xds_ca: Option<PathBuf>,
    /// PEM certificate to present to the control plane (with --xds-client-key).
    #[arg(long, env = "TERN_XDS_CLIENT_CERT", requires = "xds_client_key")]
    pub xds_client_cert: Option<PathBuf>,
    /// PEM key of --xds-client-cert.
    #[arg(long, env = "TERN_XDS_CLIENT_KEY", requires = "xds_client_cert")]
    pub xds_client_key: Option<PathBuf>,
    /// Name to verify the control plane's certificate against (default: the address's host).
    #[arg(long, env = "TERN_XDS_SERVER_NAME")]
    pub xds_server_name: Option<String>,
    /// File with a bearer token for the control plane (istiod expects the Pod's service
    /// account token); read again at every connection.
    #[arg(long, env = "TERN_XDS_TOKEN_FILE")]
    pub xds_token_file: Option<PathBuf>,
    /// Use the incremental xDS protocol (`DeltaAggregatedResources`) instead of state of the world.
    #[arg(long, env = "TERN_XDS_DELTA")]
    pub xds_delta: bool,
    /// Node id sent to the control plane; by default istiod's form, from the Pod environment.
    #[arg(long, env = "TERN_NODE_ID")]
    pub node_id: Option<String>,
    /// Admin server address (Envoy's 15000).
    #[arg(long, env = "TERN_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: std::net::SocketAddr,
    /// Where Prometheus scrapes `/stats/prometheus` (tern's and Istio's metrics) and kubelet
    /// reads `/healthz/ready`: istio-agent's 15020. `off` serves neither.
    #[arg(long, env = "TERN_STATS_ADDRESS", default_value = "0.0.0.0:15020", value_parser = parse_stats_address)]
    pub stats_address: StatsAddress,
    /// Seconds to wait for a passthrough upstream connection.
    #[arg(long, env = "TERN_CONNECT_TIMEOUT", default_value_t = 10)]
    pub connect_timeout_secs: u64,
    /// Seconds tern serves on after SIGTERM or /quitquitquit while connections are open;
    /// then no new requests, and replies in flight get up to 5 s.
    #[arg(long, env = "TERMINATION_DRAIN_DURATION_SECONDS", default_value_t = 5)]
    pub drain_timeout_secs: u64,
    /// Largest Thrift message accepted, in bytes.
    #[arg(long, env = "TERN_MAX_FRAME_SIZE", default_value_t = 16 << 20)]
    pub max_frame_size: usize,
    /// Deepest nesting of Thrift structs and containers accepted.
    #[arg(long, env = "TERN_MAX_DEPTH", default_value_t = 64)]
    pub max_depth: usize,
    /// Once capture is set up, give up root and every capability and run as this uid (and
    /// gid), as Istio's proxy runs as 1337. Capture must skip this uid's sockets
    /// (`--proxy-uid`): tern's own then carry no mark.
    #[arg(long, env = "TERN_RUN_AS_UID")]
    pub run_as_uid: Option<u32>,
    /// The application's probes, rewritten by injection to `/app-health/…` on the stats
    /// port: Istio's JSON map of Kubernetes `httpGet`/`tcpSocket` actions by path.
    #[arg(long, env = "ISTIO_KUBE_APP_PROBERS", default_value = "")]
    pub app_probers: String,
    /// The Pod's address, where forwarded probes reach the application.
    #[arg(long, env = "INSTANCE_IP", default_value = "127.0.0.1")]
    pub instance_ip: std::net::IpAddr,
    /// Bytes tern may hold for messages, all connections together: read buffers (partial
    /// messages included), requests in flight, requests waiting to be written on a
    /// multiplexed connection (beyond 64 KiB each), and large replies until they are written.
    /// A client with requests in flight is not read until one is done; one with none, that
    /// would take more, is closed; a request that would wait on a multiplexed connection, or
    /// a large reply, that would take more fails its request.
    /// Keep it well under the container's memory limit.
    #[arg(long, env = "TERN_MAX_BUFFERED_BYTES", default_value_t = 64 << 20)]
    pub max_buffered_bytes: usize,
    /// Bytes the ring hash and Maglev tables of all clusters may hold together; a cluster
    /// whose table would not fit balances at random by weight instead (with a warning).
    #[arg(long, env = "TERN_MAX_HASH_TABLE_BYTES", default_value_t = crate::state::DEFAULT_TABLE_BUDGET)]
    pub max_hash_table_bytes: usize,
    /// Data-plane worker threads, each serving its own connections (0: one per core available
    /// to tern); Istio's `concurrency`.
    #[arg(long, env = "TERN_CONCURRENCY", default_value_t = 0)]
    pub concurrency: usize,
    /// Downstream connections open at once (both listeners); more are refused and counted.
    #[arg(long, env = "TERN_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Seconds a client has from a message's first byte to its last (its first message too,
    /// while tern finds out whether it speaks Thrift); slower ones are closed, and so is a
    /// client that reads nothing of its replies for as long. A multiplexed upstream
    /// connection that cannot write what it queued within it closes too.
    #[arg(long, env = "TERN_MESSAGE_TIMEOUT", default_value_t = 15)]
    pub message_timeout_secs: u64,
    /// Log one line per connection when it closes: direction, peer, original destination,
    /// what handled it, duration (at info, target `tern::access`).
    #[arg(long, env = "TERN_ACCESS_LOG")]
    pub access_log: bool,
    /// Destination ports where TCP proxy chains never look for Thrift and only relay bytes
    /// (comma-separated).
    #[arg(long, env = "TERN_THRIFT_DETECT_EXCLUDE_PORTS", default_value = "", value_parser = parse_ports)]
    pub thrift_detect_exclude_ports: std::vec::Vec<u16>,
    /// Destination ports whose TCP proxy chains are Thrift without detection: balanced per
    /// request from the first byte (comma-separated).
    #[arg(long, env = "TERN_THRIFT_PORTS", default_value = "", value_parser = parse_ports)]
    pub thrift_ports: std::vec::Vec<u16>,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

/// Where the workload certificate comes from (istio-agent's names where it has them).
#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// Istio's CA (`https://istiod.istio-system.svc:15012`). Defaults to the xDS address when
    /// that is `https`, as istio-agent does.
    #[arg(long, env = "CA_ADDR")]
    pub ca_address: Option<String>,
    /// PEM roots the CA's certificate must chain to (default: --xds-ca). They are also
    /// trusted as mesh roots.
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root: Option<PathBuf>,
    /// Read the certificate from `cert-chain.pem`, `key.pem` and `root-cert.pem` in this
    /// directory (re-read when they change) instead of asking a CA.
    #[arg(long, env = "TERN_CERT_DIR", conflicts_with = "ca_address")]
    pub cert_dir: Option<PathBuf>,
    /// Also write the CA's certificates there, as istio-agent does.
    #[arg(long, env = "OUTPUT_CERTS")]
    pub output_certs: Option<PathBuf>,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// Sent to the CA as `ClusterID`.
    #[arg(long, env = "ISTIO_META_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Requested certificate lifetime (Go duration: `24h`, `90m`, `30s`).
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = parse_go_duration)]
    pub secret_ttl: std::time::Duration,
    /// Renew once this share of the certificate's lifetime has passed.
    #[arg(long, env = "SECRET_GRACE_PERIOD_RATIO", default_value_t = 0.5)]
    pub secret_grace_period_ratio: f64,
}

/// An address, or `off`.
#[derive(Clone, Copy, Debug)]
pub struct StatsAddress(pub Option<std::net::SocketAddr>);

fn parse_stats_address(s: &str) -> Result<StatsAddress, String> {
    match s {
        "off" | "" => Ok(StatsAddress(None)),
        _ => s
            .parse()
            .map(|a| StatsAddress(Some(a)))
            .map_err(|_| format!("invalid address {s:?}: expected ip:port or off")),
    }
}

/// Every environment variable `tern run` reads (its flags' fallbacks): what a Pod's
/// `proxyMetadata` may not set unless it is meant to.
pub fn env_names() -> std::collections::BTreeSet<String> {
    let cmd = <RunArgs as clap::Args>::augment_args(clap::Command::new("run"));
    cmd.get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect()
}
