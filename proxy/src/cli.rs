//! The command line: flags with environment fallbacks (Istio's names where Istio has one).
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::capture::{
    self, CaptureSettings, InboundPorts, cgroup::CgroupDir, ebpf, parse_cidrs, parse_ports,
};

#[derive(Debug, Parser)]
#[command(
    name = "tern",
    version,
    about = "A Thrift-aware layer-4 sidecar with eBPF traffic capture"
)]
pub struct Cli {
    /// Log filter (`info`, `debug`, `tern=debug,…`).
    #[arg(long, env = "TERN_LOG", default_value = "info", global = true)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy, optionally attaching capture for the time it runs.
    Run(Box<RunArgs>),
    /// Attach, detach or inspect capture on its own (e.g. from an init container).
    #[command(subcommand)]
    Capture(CaptureCommand),
    /// Tell whether this kernel can run tern's eBPF capture (loads and probes every program),
    /// and, given a Pod, which cgroup capture would attach to and why.
    Check(PodCgroupArgs),
    /// Add tern to Kubernetes workloads in YAML (as `istioctl kube-inject`).
    Inject(InjectArgs),
    /// Serve Kubernetes' mutating admission webhook that adds tern to Pods (HTTPS).
    Webhook(WebhookArgs),
    /// Show the xDS client's view of a running tern: per type, version, nonce, resources, last NACK.
    #[command(subcommand)]
    Xds(XdsCommand),
    /// Serve xDS to tern sidecars, Envoy and proxyless gRPC from a services file (an xDS
    /// control plane for fleets without istiod).
    Discovery(Box<tern_discovery::DiscoveryArgs>),
}

#[derive(Debug, Subcommand)]
pub enum XdsCommand {
    /// What the running tern holds from its control plane (read from its admin server).
    Status {
        /// The admin server of the tern to ask.
        #[arg(long, env = "TERN_ADMIN", default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaptureCommand {
    /// Attach the eBPF hooks to a cgroup and pin them under bpffs; they stay after tern exits.
    Attach(CaptureArgs),
    /// Detach the hooks pinned for a cgroup.
    Detach(PodCgroupArgs),
    /// Show the attached hooks, their configuration and their counters.
    Status {
        /// Only the capture attached to this cgroup.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove the captures of Pods that are gone (their cgroup or network namespace was
    /// deleted while the hooks stayed pinned); `tern run` does it at every start.
    Gc {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

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
    /// Bytes all downstream connections' read buffers may hold together (partial messages
    /// included); a connection that would take more is closed. Keep it well under the
    /// container's memory limit.
    #[arg(long, env = "TERN_MAX_BUFFERED_BYTES", default_value_t = 64 << 20)]
    pub max_buffered_bytes: usize,
    /// Bytes the ring hash and Maglev tables of all clusters may hold together; a cluster
    /// whose table would not fit balances by round robin instead (with a warning).
    #[arg(long, env = "TERN_MAX_HASH_TABLE_BYTES", default_value_t = crate::state::DEFAULT_TABLE_BUDGET)]
    pub max_hash_table_bytes: usize,
    /// Downstream connections open at once (both listeners); more are refused and counted.
    #[arg(long, env = "TERN_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Seconds a client has from a message's first byte to its last (its first message too,
    /// while tern finds out whether it speaks Thrift); slower ones are closed.
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

/// A Go duration as Istio's environment writes it: `24h`, `1h30m`, `90s`, `500ms`.
pub fn parse_go_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {s:?}: expected e.g. 24h, 1h30m, 90s");
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return Err(bad()),
        };
        total += value * seconds;
        rest = &rest[unit..];
    }
    std::time::Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// What `tern inject` reads and what it gives every sidecar.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// Kubernetes YAML to inject (`-` for standard input); several documents are fine.
    #[arg(short = 'f', long = "filename", default_value = "-")]
    pub input: PathBuf,
    /// Where to write the result (default: standard output).
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// Write istiod's injection template for tern (Helm values) instead of injecting.
    #[arg(long, conflicts_with = "input")]
    pub istio_template: bool,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

/// Where `tern webhook` serves, with which certificate.
#[derive(Debug, Args)]
pub struct WebhookArgs {
    /// HTTPS address.
    #[arg(long, env = "TERN_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    pub listen: std::net::SocketAddr,
    /// PEM certificate chain (re-read when it changes).
    #[arg(
        long,
        env = "TERN_WEBHOOK_CERT",
        default_value = "/etc/tern-webhook/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "TERN_WEBHOOK_KEY",
        default_value = "/etc/tern-webhook/tls.key"
    )]
    pub tls_key: PathBuf,
    /// Seconds it keeps answering, reported unready, after SIGTERM (while its Service stops
    /// sending it reviews: one that fails would admit a Pod without tern).
    #[arg(long, env = "TERN_WEBHOOK_SHUTDOWN_GRACE_SECS", default_value_t = 5)]
    pub shutdown_grace_secs: u64,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

/// The sidecar injection adds; shared by `tern inject` and `tern webhook`.
#[derive(Debug, Args)]
pub struct SidecarArgs {
    /// tern's image.
    #[arg(long, env = "TERN_IMAGE", default_value_t = crate::inject::Options::default().image)]
    pub image: String,
    /// Run tern as a native sidecar (Kubernetes ≥ 1.29); `false` makes it the first container.
    #[arg(long, env = "TERN_NATIVE_SIDECAR", default_value_t = true, action = clap::ArgAction::Set)]
    pub native_sidecar: bool,
    /// istiod's xDS and CA address, given to every sidecar.
    #[arg(long, default_value_t = crate::inject::Options::default().xds_address)]
    pub xds_address: String,
    /// The mesh's cluster id (`ISTIO_META_CLUSTER_ID`).
    #[arg(long, default_value_t = crate::inject::Options::default().cluster_id)]
    pub cluster_id: String,
    /// The mesh's trust domain.
    #[arg(long, default_value_t = crate::inject::Options::default().trust_domain)]
    pub trust_domain: String,
}

impl SidecarArgs {
    pub fn options(&self) -> crate::inject::Options {
        crate::inject::Options {
            image: self.image.clone(),
            native_sidecar: self.native_sidecar,
            xds_address: self.xds_address.clone(),
            cluster_id: self.cluster_id.clone(),
            trust_domain: self.trust_domain.clone(),
        }
    }
}

/// Which cgroup is the Pod's: a directory, or the Pod's UID to find it by.
#[derive(Debug, Args)]
pub struct PodCgroupArgs {
    /// cgroup v2 directory whose processes are captured (eBPF capture).
    #[arg(long, env = "TERN_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// The Pod's UID (`metadata.uid`): capture the cgroup the kubelet made for it, found below
    /// `--cgroup-root` (cgroupfs and systemd drivers).
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// The Pod's cgroup by its id (the directory's inode, as `bpftool cgroup` and CRI
    /// runtimes show it), found below `--cgroup-root`. Takes precedence over `--pod-uid`;
    /// `--cgroup` over both.
    #[arg(long, env = "TERN_CGROUP_ID")]
    pub cgroup_id: Option<u64>,
    /// The node's cgroup v2 hierarchy as mounted for tern (in a container, a read-only mount of
    /// the node's /sys/fs/cgroup); default: the cgroup2 mount in /proc/mounts.
    #[arg(long, env = "TERN_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
}

impl PodCgroupArgs {
    /// Whether any of the ways to name the Pod's cgroup was given.
    pub fn given(&self) -> bool {
        self.cgroup.is_some() || self.cgroup_id.is_some() || self.pod_uid.is_some()
    }

    /// The validated cgroup, with how it was found.
    pub fn resolve(&self) -> anyhow::Result<(CgroupDir, String)> {
        if let Some(path) = &self.cgroup {
            return Ok((CgroupDir::open(path)?, "given by --cgroup".to_owned()));
        }
        if !self.given() {
            anyhow::bail!(
                "eBPF capture needs the Pod's cgroup: --pod-uid <metadata.uid> (POD_UID), \
                 --cgroup-id <id> (TERN_CGROUP_ID) or --cgroup <cgroup v2 directory> (TERN_CGROUP)"
            );
        }
        let root = match &self.cgroup_root {
            Some(root) => capture::cgroup::v2_root(root),
            None => capture::cgroup::cgroup2_mount()
                .context("no cgroup2 filesystem in /proc/mounts; pass --cgroup-root")?,
        };
        if let Some(id) = self.cgroup_id {
            let path = capture::cgroup::find_by_id_below(&root, id).with_context(|| {
                format!(
                    "no cgroup with id {id} within 8 levels below {}",
                    root.display()
                )
            })?;
            return Ok((CgroupDir::open(&path)?, format!("cgroup id {id}")));
        }
        let uid = self.pod_uid.as_deref().unwrap_or_default();
        let found = capture::pod::find(&root, uid)?;
        let how = format!(
            "Pod {uid}: {:?} driver, {} QoS, below {}",
            found.driver,
            found.qos,
            root.display()
        );
        Ok((CgroupDir::open(&found.path)?, how))
    }
}

/// What to capture; shared by `tern run` and `tern capture attach`.
#[derive(Debug, Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub pod: PodCgroupArgs,
    /// Network namespace whose inbound connections are captured (eBPF capture).
    #[arg(long, env = "TERN_NETNS", default_value = "/proc/self/ns/net")]
    pub netns: PathBuf,
    /// Port of the outbound listener (on 127.0.0.1 and ::1).
    #[arg(long, env = "ENVOY_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port of the inbound listener.
    #[arg(long, env = "INBOUND_CAPTURE_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// Inbound ports to capture: a list, `*` for all but the proxy's own, empty for none.
    #[arg(long, env = "INBOUND_PORTS_INCLUDE", default_value = "*")]
    pub inbound_ports: InboundPorts,
    /// Inbound ports never captured, whatever --inbound-ports says.
    #[arg(long, env = "INBOUND_PORTS_EXCLUDE", default_value = "", value_parser = parse_ports)]
    pub exclude_inbound_ports: std::vec::Vec<u16>,
    /// Outbound destination ports that bypass the proxy.
    #[arg(long, env = "OUTBOUND_PORTS_EXCLUDE", default_value = "", value_parser = parse_ports)]
    pub exclude_ports: std::vec::Vec<u16>,
    /// Outbound destination CIDRs that bypass the proxy.
    #[arg(long, env = "OUTBOUND_IP_RANGES_EXCLUDE", default_value = "", value_parser = parse_cidrs)]
    pub exclude_cidrs: std::vec::Vec<ipnet::IpNet>,
    /// `SO_MARK` of the proxy's own sockets; capture skips marked sockets.
    #[arg(long, env = "TERN_MARK", default_value = "0x539", value_parser = parse_mark)]
    pub mark: u32,
    /// uid whose sockets are never captured (Istio runs its proxy as 1337).
    #[arg(long, env = "PROXY_UID")]
    pub proxy_uid: Option<u32>,
    /// Let outbound connections through while the proxy is not listening (eBPF), instead of
    /// refusing them. Inbound is refused while the proxy is down, whatever this says.
    #[arg(long, env = "TERN_OUTBOUND_FAIL_OPEN")]
    pub outbound_fail_open: bool,
    /// UNSAFE: addresses (one per family, comma-separated) whose inbound connections skip
    /// the proxy — meant for the node's, for kubelet probes, but every host-network Pod and
    /// every NodePort client SNATed to the node then skips mTLS and authorization. Off.
    #[arg(long, env = "TERN_UNSAFE_NODE_BYPASS", default_value = "", value_parser = parse_node_ips)]
    pub unsafe_node_bypass: NodeIps,
}

/// Every environment variable some `tern` command reads (its flags' fallbacks).
pub fn env_names() -> std::collections::BTreeSet<String> {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, out: &mut std::collections::BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(&Cli::command(), &mut out);
    out
}

/// At most one address per family.
#[derive(Clone, Debug, Default)]
pub struct NodeIps(pub Vec<std::net::IpAddr>);

fn parse_node_ips(s: &str) -> Result<NodeIps, String> {
    let mut ips: Vec<std::net::IpAddr> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ip: std::net::IpAddr = part
            .parse()
            .map_err(|_| format!("invalid node address {part:?} in {s:?}"))?;
        if ips.iter().any(|i| i.is_ipv4() == ip.is_ipv4()) {
            return Err(format!("{s:?}: at most one IPv4 and one IPv6 node address"));
        }
        ips.push(ip);
    }
    Ok(NodeIps(ips))
}

/// Ports the proxy itself serves (admin, Istio's agent and telemetry ports): never captured inbound.
const PROXY_PORTS: [u16; 4] = [15000, 15020, 15021, 15090];

impl CaptureArgs {
    pub fn settings(&self) -> CaptureSettings {
        CaptureSettings {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_ports: PROXY_PORTS.to_vec(),
            mark: self.mark,
            skip_uid: self.proxy_uid,
            exclude_ports: self.exclude_ports.clone(),
            exclude_cidrs: self.exclude_cidrs.clone(),
            inbound: self.inbound_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            outbound_fail_open: self.outbound_fail_open,
            node_ips: self.unsafe_node_bypass.0.clone(),
        }
    }

    /// The Pod's validated cgroup, which eBPF capture requires.
    pub fn cgroup(&self) -> anyhow::Result<CgroupDir> {
        let (cgroup, how) = self.pod.resolve()?;
        tracing::info!(cgroup = %cgroup.path().display(), how, "the Pod's cgroup");
        Ok(cgroup)
    }
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

fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("invalid mark {s:?}: expected a number such as 0x539 or 1337"))
}

/// Runs a parsed command line; errors are printed with their causes.
pub fn main(cli: Cli) -> ExitCode {
    crate::logging::init(&cli.log_level);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start the tokio runtime")?;
            runtime.block_on(crate::run::run(*args))?;
        }
        Command::Capture(CaptureCommand::Attach(args)) => {
            let cgroup = args.cgroup()?;
            // Only tern's own Pod: never a sibling's, never an ancestor holding other Pods.
            cgroup.require_self_inside()?;
            let capture = ebpf::EbpfCapture::attach(&cgroup, &args.netns, &args.settings())?;
            println!(
                "attached tern capture to cgroup {} (pinned; detach with `tern capture detach --cgroup {}`)",
                cgroup.path().display(),
                cgroup.path().display()
            );
            drop(capture);
        }
        Command::Capture(CaptureCommand::Detach(pod)) => {
            let (cgroup, _) = pod.resolve()?;
            // Another Pod's capture is its protection: not for this Pod to remove (captures
            // of deleted Pods go with `tern capture gc`).
            cgroup.require_self_inside()?;
            ebpf::detach(&cgroup)?;
            println!(
                "detached tern capture from cgroup {}",
                cgroup.path().display()
            );
        }
        Command::Capture(CaptureCommand::Status { cgroup, json }) => {
            let cgroup = cgroup.as_deref().map(CgroupDir::open).transpose()?;
            let all = ebpf::status(cgroup.as_ref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print_status(&all);
            }
        }
        Command::Discovery(args) => tern_discovery::main(*args)?,
        Command::Webhook(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start the tokio runtime")?;
            runtime.block_on(crate::webhook::serve(crate::webhook::WebhookConfig {
                listen: args.listen,
                cert: args.tls_cert,
                key: args.tls_key,
                options: args.sidecar.options(),
                shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace_secs),
            }))?;
        }
        Command::Inject(args) if args.istio_template => {
            let template = crate::inject::istio_template(&args.sidecar.options());
            write_output(args.output.as_deref(), &template)?;
        }
        Command::Inject(args) => {
            let text = if args.input.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("read standard input")?
            } else {
                std::fs::read_to_string(&args.input)
                    .with_context(|| format!("read {}", args.input.display()))?
            };
            let (yaml, report) = crate::inject::manifests(&text, &args.sidecar.options())?;
            write_output(args.output.as_deref(), &yaml)?;
            for item in report {
                let done = match item.outcome {
                    crate::inject::Outcome::Injected => "injected",
                    crate::inject::Outcome::AlreadyInjected => "unchanged (already injected)",
                    crate::inject::Outcome::OptedOut => "unchanged (opted out)",
                };
                eprintln!("tern inject: {} {done}", item.what);
            }
        }
        Command::Capture(CaptureCommand::Gc { json }) => {
            let removed = capture::gc::collect()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&removed)?);
            } else {
                if removed.is_empty() {
                    println!("no capture of a deleted Pod is pinned");
                }
                for c in &removed {
                    println!(
                        "removed {} ({}; {} of kernel memory)",
                        c.pins.display(),
                        c.why.describe(),
                        format_bytes(c.kernel_memory)
                    );
                }
            }
        }
        Command::Xds(XdsCommand::Status { admin }) => {
            let dump = fetch_config_dump(admin)?;
            print!("{}", format_xds_status(&dump));
        }
        Command::Check(pod) => {
            let kernel = capture::check::run();
            let pod_findings = if pod.given() {
                capture::check::pod(pod.resolve().map_err(|e| format!("{e:#}")))
            } else {
                Vec::new()
            };
            for f in kernel.iter().chain(&pod_findings) {
                let mark = if f.ok { "ok  " } else { "FAIL" };
                println!("{mark} {:<28} {}", f.what, f.detail);
            }
            let kernel_ok = kernel.iter().all(|f| f.ok);
            println!(
                "{}",
                if kernel_ok {
                    "this kernel can run tern's eBPF capture"
                } else {
                    "this kernel cannot run tern's eBPF capture; --capture iptables may still work"
                }
            );
            if !pod_findings.is_empty() {
                println!(
                    "{}",
                    if pod_findings.iter().all(|f| f.ok) {
                        "tern can capture this Pod from where it runs"
                    } else {
                        "tern cannot capture this Pod from where it runs"
                    }
                );
            }
            if !kernel_ok || pod_findings.iter().any(|f| !f.ok) {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// GETs `/config_dump` from a tern admin server (a one-request HTTP/1.0 exchange).
fn fetch_config_dump(admin: std::net::SocketAddr) -> anyhow::Result<serde_json::Value> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(3))
            .with_context(|| format!("connect to the admin server at {admin}"))?;
    stream.write_all(b"GET /config_dump HTTP/1.0\r\nHost: tern\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("read /config_dump from {admin}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .with_context(|| format!("malformed HTTP response from {admin}"))?;
    serde_json::from_str(body).with_context(|| format!("/config_dump from {admin} is not JSON"))
}

/// The xDS part of a `/config_dump`, as a table.
fn format_xds_status(dump: &serde_json::Value) -> String {
    let xds = &dump["xds"];
    if xds.is_null() {
        return format!(
            "no control plane: configuration {} from a file\n",
            dump["version"]
        );
    }
    let mut out = format!(
        "control plane {}  {}  reconnects {}\nconfiguration in force: {}\n",
        xds["address"].as_str().unwrap_or("?"),
        if xds["connected"] == true {
            "CONNECTED"
        } else {
            "DISCONNECTED"
        },
        xds["reconnects"],
        dump["version"].as_str().unwrap_or("?"),
    );
    out += &format!(
        "{:<24} {:<10} {:<8} {:>9} {:>6} {:>6}  last error\n",
        "type", "version", "nonce", "resources", "acks", "nacks"
    );
    if let Some(types) = xds["types"].as_object() {
        for (t, s) in types {
            out += &format!(
                "{:<24} {:<10} {:<8} {:>9} {:>6} {:>6}  {}\n",
                t.rsplit('.').next().unwrap_or(t),
                s["version"].as_str().unwrap_or(""),
                s["nonce"].as_str().unwrap_or(""),
                s["resources"].as_array().map_or(0, Vec::len),
                s["acks"],
                s["nacks"],
                s["last_error"].as_str().unwrap_or("-"),
            );
        }
    }
    out
}

/// Writes `text` to `path`, or to standard output without one.
fn write_output(path: Option<&std::path::Path>, text: &str) -> anyhow::Result<()> {
    match path {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
        }
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

/// Bytes in KiB or MiB, for people.
fn format_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

fn print_status(all: &[ebpf::CaptureStatus]) {
    if all.is_empty() {
        println!("no tern capture is attached");
        return;
    }
    for s in all {
        let cgroup = s
            .cgroup
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("(cgroup id {}, directory gone)", s.cgroup_id));
        println!("cgroup {cgroup}");
        println!("  state       {}", s.liveness.describe());
        if let Some(problem) = &s.problem {
            println!("  problem     {problem}");
        }
        println!("  pins        {}", s.pins.display());
        println!("  kernel mem  {}", format_bytes(s.kernel_memory));
        println!("  hooks       {}", s.hooks.join(", "));
        println!(
            "  outbound    127.0.0.1:{}   inbound :{}   mark {}   {}",
            s.outbound_port,
            s.inbound_port,
            s.mark,
            if s.outbound_fail_open {
                "outbound fails open"
            } else {
                "fails closed"
            }
        );
        for (name, value) in &s.counters {
            println!("  {name:<28} {value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_in_hex_and_decimal() {
        assert_eq!(parse_mark("0x539").unwrap(), 1337);
        assert_eq!(parse_mark("1337").unwrap(), 1337);
        assert!(parse_mark("0xzz").unwrap_err().contains("0xzz"));
    }

    #[test]
    fn xds_status_is_a_table_of_types() {
        let dump = serde_json::json!({
            "version": "xds-3",
            "xds": {
                "address": "http://127.0.0.1:15010", "connected": true, "reconnects": 1,
                "types": { "type.googleapis.com/envoy.config.cluster.v3.Cluster": {
                    "version": "7", "nonce": "12", "resources": ["a", "b"], "acks": 3, "nacks": 1,
                    "last_error": "cluster b: lb_policy 7 is not supported" } }
            }
        });
        let table = format_xds_status(&dump);
        assert!(
            table.contains("CONNECTED") && table.contains("xds-3"),
            "{table}"
        );
        let row = table.lines().find(|l| l.starts_with("Cluster")).unwrap();
        assert!(
            row.contains(" 7 ") && row.contains(" 2 ") && row.contains("lb_policy 7"),
            "{row}"
        );
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn go_durations_as_istio_writes_them() {
        assert_eq!(
            parse_go_duration("24h"),
            Ok(std::time::Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_go_duration("24h0m0s"),
            Ok(std::time::Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_go_duration("1h30m"),
            Ok(std::time::Duration::from_secs(5_400))
        );
        assert_eq!(
            parse_go_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        for bad in ["", "24", "h", "1d", "-1h"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }
}
