//! The command line: flags with environment fallbacks (Istio's names where Istio has one).
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::{
    capture::{
        self,
        args::{CaptureArgs, PodCgroupArgs},
        cgroup::CgroupDir,
        ebpf,
    },
    run::args::RunArgs,
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
        // The listeners, signals and drain; the data plane runs on workers of its own. (A
        // current-thread runtime here measured 0.3-0.5 MiB more idle RSS.)
        Command::Run(args) => runtime()?.block_on(crate::run::run(*args))?,
        Command::Capture(c) => capture_command(c)?,
        Command::Check(pod) => return Ok(check(&pod)),
        Command::Discovery(args) => tern_discovery::main(*args)?,
        Command::Webhook(args) => {
            runtime()?.block_on(crate::webhook::serve(crate::webhook::WebhookConfig {
                listen: args.listen,
                cert: args.tls_cert,
                key: args.tls_key,
                options: args.sidecar.options(),
                shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace_secs),
            }))?;
        }
        Command::Inject(args) => inject(&args)?,
        Command::Xds(XdsCommand::Status { admin }) => {
            let dump = fetch_config_dump(admin)?;
            print!("{}", format_xds_status(&dump));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The multi-threaded runtime of the long-running commands.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")
}

/// `tern capture attach|detach|status|gc`.
fn capture_command(command: CaptureCommand) -> anyhow::Result<()> {
    match command {
        CaptureCommand::Attach(args) => {
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
        CaptureCommand::Detach(pod) => {
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
        CaptureCommand::Status { cgroup, json } => {
            let cgroup = cgroup.as_deref().map(CgroupDir::open).transpose()?;
            let all = ebpf::status(cgroup.as_ref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print_status(&all);
            }
        }
        CaptureCommand::Gc { json } => {
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
    }
    Ok(())
}

/// `tern inject`: the manifests with tern added (or istiod's template), and a line per
/// workload on standard error.
fn inject(args: &InjectArgs) -> anyhow::Result<()> {
    if args.istio_template {
        let template = crate::inject::istio_template(&args.sidecar.options());
        return write_output(args.output.as_deref(), &template);
    }
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
    Ok(())
}

/// `tern check`: whether this kernel can run the eBPF capture, and, given a Pod, whether tern
/// can capture it from where it runs; fails when not.
fn check(pod: &PodCgroupArgs) -> ExitCode {
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
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
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
}
