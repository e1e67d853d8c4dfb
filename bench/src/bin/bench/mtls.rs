//! What mutual TLS costs, in a mesh of two tern sidecars configured by istiod's stand-ins
//! with a test CA (Istio's shapes: auto-mTLS outbound, `virtualInbound` TLS chains):
//! - connection setup: full mTLS handshakes per second and per proxy core, terminated by the
//!   server-side tern and by HAProxy (OpenSSL) in front of the same echo server, driven by
//!   `openssl s_time -new` with a client certificate;
//! - per request: Thrift echo calls through both sidecars over pooled mTLS connections,
//!   against the same path in plaintext (PERMISSIVE server side, no `tlsMode` endpoints).
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use tern_bench::report::{MtlsBench, MtlsPath, MtlsSetup};
use tern_tests::{
    Istiod, Process, Tern, eventually,
    pki::{ISTIOD, MeshTrust},
    pods, unique,
};

use crate::{cpu_seconds, load_run};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
const APP_ID: &str = "spiffe://cluster.local/ns/bench/sa/app";
const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
/// The echo server in the server Pod (behind the server-side tern), and HAProxy's TLS port.
const ECHO: &str = "10.66.1.2:9000";
const HAPROXY_TLS: &str = "10.66.1.2:9443";
const MTLS_VIP: &str = "10.96.0.50:9000";
const PLAIN_VIP: &str = "10.96.0.51:9000";
const HANDSHAKE_SECS: &str = "4";

/// A temporary file, removed on drop.
struct Temp(std::path::PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn run() -> Result<MtlsBench> {
    eprintln!("tern-bench: mTLS (two sidecars, a test CA, HAProxy with OpenSSL)");
    let p = pods();
    let trust = MeshTrust::new()?;
    let ca = &trust.ca;
    let long = Duration::from_secs(3600);
    let client = ca.issue("client", &[CLIENT_ID], long)?;
    let server = ca.issue("haproxy", &[SERVER_ID], long)?;
    let ca_path = ca.ca_str();
    let load = tern_tests::bin_dir().join("tern-load");
    let _echo = tern_tests::start_server(&p.srv, None, &load, &["serve", ECHO])?;

    // One control plane per Pod, each also the CA for its Pod's identity.
    let _cp_server = Istiod::start(
        &p.srv,
        ISTIOD,
        "version: \"1\"\ninbound: permissive\ninbound_any_alpn: true\n",
        &trust.control_plane_args(SERVER_ID),
    )?;
    let _cp_app = Istiod::start(
        &p.app,
        ISTIOD,
        &format!(
            "version: \"1\"\nservices:\n  - {{ name: echo-mtls, vip: 10.96.0.50, port: 9000, filter: tcp, mtls: \"{SERVER_ID}\", endpoints: [\"{ECHO}\"] }}\n  - {{ name: echo-plain, vip: 10.96.0.51, port: 9000, filter: tcp, endpoints: [\"{ECHO}\"] }}\n"
        ),
        &trust.control_plane_args(APP_ID),
    )?;
    let identity = |sa: &str| {
        let mut args = trust.tern_args("bench", sa);
        args.extend(["--stats-address".into(), "off".into()]);
        args
    };
    // The server Pod's sidecar: inbound capture of the echo port only (HAProxy's is its own).
    let server_cgroup = tern_tests::Cgroup::new("bench-srv")?;
    let server_args = identity("server");
    let mut args = vec![
        "run",
        "--capture",
        "ebpf",
        "--cgroup",
        server_cgroup.path_str(),
        "--inbound-ports",
        "9000",
    ];
    args.extend(server_args.iter().map(String::as_str));
    let tern_server = Tern::start_logging(&p.srv, Some(&server_cgroup), &args, "info")?;
    let client_args = identity("app");
    let mut args = vec!["--inbound-ports", ""];
    args.extend(client_args.iter().map(String::as_str));
    let tern_client = p.start_tern_with(&args, "info")?;
    for (ns, who) in [(&p.app, "client"), (&p.srv, "server")] {
        ensure!(
            eventually(Duration::from_secs(10), || {
                tern_tests::admin(ns, "GET", "/config_dump").contains("\"not_after\"")
            }),
            "the {who} sidecar has no certificate"
        );
    }

    // HAProxy terminating the same mTLS (OpenSSL), in front of the same echo server.
    let crt = Temp(std::env::temp_dir().join(unique("haproxy-crt")));
    std::fs::write(
        &crt.0,
        std::fs::read_to_string(&server.cert)? + &std::fs::read_to_string(&server.key)?,
    )?;
    let cfg = Temp(std::env::temp_dir().join(unique("haproxy-tls")));
    std::fs::write(
        &cfg.0,
        format!(
            "global\n    maxconn 8000\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n\
             listen tls\n    bind {HAPROXY_TLS} ssl crt {} ca-file {ca_path} verify required\n    server echo {ECHO}\n",
            crt.0.display()
        ),
    )?;
    let mut cmd = p.srv.command(
        None,
        Path::new("haproxy"),
        &["-f", cfg.0.to_str().context("UTF-8 path")?, "-db"],
    );
    cmd.stdout(std::process::Stdio::null());
    let haproxy = Process::spawn(cmd)?;
    ensure!(
        eventually(Duration::from_secs(5), || {
            p.srv
                .output(None, Path::new("ss"), &["-Hltn", "sport = :9443"])
                .is_ok_and(|o| !o.trim().is_empty())
        }),
        "HAProxy did not start"
    );

    let handshakes = |target: &str, proxy: u32| -> Result<MtlsSetup> {
        let cpu = cpu_seconds(proxy)?;
        let began = Instant::now();
        let out = p.app.output(
            None,
            Path::new("openssl"),
            &[
                "s_time",
                "-connect",
                target,
                "-new",
                "-time",
                HANDSHAKE_SECS,
                "-cert",
                client.cert_str(),
                "-key",
                client.key_str(),
                "-CAfile",
                &ca_path,
            ],
        )?;
        let secs = began.elapsed().as_secs_f64();
        let cpu = cpu_seconds(proxy)? - cpu;
        let connections: f64 = out
            .lines()
            .find_map(|l| l.split_once(" connections in ").map(|(n, _)| n.trim()))
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("openssl s_time printed {out:?}"))?;
        ensure!(connections > 0.0, "no handshake completed with {target}");
        Ok(MtlsSetup {
            handshakes_per_s: connections / secs,
            proxy_cpu_s: cpu,
            handshakes_per_core: connections / cpu.max(1e-3),
        })
    };
    let tern_setup = handshakes(ECHO, tern_server.process.pid())?;
    let haproxy_setup = handshakes(HAPROXY_TLS, haproxy.pid())?;
    let ok_handshakes = tern_tests::metric(
        &p.srv,
        r#"tern_tls_handshakes_total{direction="inbound",result="ok"}"#,
    );
    ensure!(
        ok_handshakes > 0.0,
        "the server-side tern terminated no handshake"
    );

    let thrift = |vip: &str| -> Result<MtlsPath> {
        let (a, b) = (tern_client.process.pid(), tern_server.process.pid());
        let (ca0, cb0) = (cpu_seconds(a)?, cpu_seconds(b)?);
        let r = load_run(
            &p.app,
            Some(&p.cgroup),
            vip,
            &["--connections", "4", "--inflight", "8", "--size", "100"],
        )?;
        let per_m = |cpu: f64| cpu / r.total.max(1) as f64 * 1e6;
        Ok(MtlsPath {
            rps: r.rps,
            p50_us: r.p50_us,
            p99_us: r.p99_us,
            client_cpu_s_per_m: per_m(cpu_seconds(a)? - ca0),
            server_cpu_s_per_m: per_m(cpu_seconds(b)? - cb0),
        })
    };
    // Warm the pools, then measure each path.
    let _ = thrift(MTLS_VIP)?;
    let mtls = thrift(MTLS_VIP)?;
    let plain = thrift(PLAIN_VIP)?;
    let outbound_tls = tern_tests::metric(
        &p.app,
        r#"tern_tls_handshakes_total{direction="outbound",result="ok"}"#,
    );
    ensure!(
        outbound_tls > 0.0,
        "the client-side tern originated no mTLS"
    );
    drop(haproxy);
    Ok(MtlsBench {
        tern: tern_setup,
        haproxy: haproxy_setup,
        thrift_mtls: mtls,
        thrift_plaintext: plain,
        pooled_handshakes: outbound_tls,
    })
}
