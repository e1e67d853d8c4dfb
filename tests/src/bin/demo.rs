//! `tern-demo` (run by `cargo xtask demo`): a Thrift service in a mesh of network namespaces, with tern as every
//! Pod's sidecar (the topology of `tern_tests::mesh`), shown step by step, in two parts.
//!
//! Without istiod, `tern discovery` is the control plane, serving a services file. The client
//! knows only the service's virtual IP and makes its calls over one connection; the demo shows
//! the hooks in the client Pod and that no iptables rule exists, how the calls spread over the
//! three server Pods, one server stopped and tern discovery's health check moving the traffic
//! away (and back once it returns), and a plain TCP port of the same service.
//!
//! With istiod (the tests' stand-in, which speaks istiod's xDS and CA API): every sidecar's
//! certificate from the CA, STRICT mutual TLS between the Pods with the client's SPIFFE
//! identity seen by the servers, a Thrift method refused by an AuthorizationPolicy-shaped rule
//! while the others go through, and Istio's `istio_requests_total` for the calls. Everything is
//! removed when it ends — on failure and on Ctrl-C too (the guards' `Drop` runs as the demo
//! returns).
use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    path::Path,
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use tern_tests::{
    connect, interrupt,
    mesh::{
        CLIENT_ID, CONTROL_PLANE, CONTROL_PLANE_TLS, Mesh, SERVER_ID, TCP_PORT, THRIFT_PORT, VIP,
        vip,
    },
};

fn bold(s: &str) -> String {
    format!("\x1b[1m{s}\x1b[0m")
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) if interrupt::interrupted() => {
            eprintln!("tern-demo: interrupted; everything it made is removed");
            std::process::ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("tern-demo: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the demo with the binaries built beside this one.
fn run() -> Result<()> {
    interrupt::catch()?;
    let started = Instant::now();
    println!(
        "{}\n",
        bold("tern demo: a Thrift service in a mesh of network namespaces")
    );
    let start = |mtls: bool| {
        let tty = std::io::stderr().is_terminal();
        let mut progress = |what: &str| {
            if tty {
                eprint!("\r\x1b[2Kstarting the mesh: {what} …");
            } else {
                eprintln!("starting the mesh: {what}");
            }
        };
        let mesh = if mtls {
            Mesh::start_mtls(3, &mut progress)
        } else {
            Mesh::start_discovery(3, &mut progress)
        };
        if tty {
            eprint!("\r\x1b[2K");
        }
        mesh
    };
    let (result, leftovers) = {
        println!(
            "{}",
            bold("Part A. Without istiod: tern discovery is the control plane")
        );
        let mesh = start(false)?;
        let names = Names::of(&mesh);
        let mut mesh = mesh;
        let mut result = show(&mut mesh, started);
        drop(mesh);
        if result.is_ok() {
            interrupt::check()?;
            println!(
                "\n{}",
                bold("Part B. With istiod: mutual TLS and an AuthorizationPolicy")
            );
            let mesh = start(true)?;
            result = security(&mesh);
            println!(
                "\n{}",
                bold("6. stopping: the sidecars drain and detach their hooks")
            );
            drop(mesh);
        }
        (result, names.left())
    };
    let (_, status, _) = tern_tests::tern(&["capture", "status"]);
    println!("  $ tern capture status\n  {}", status.trim());
    match leftovers {
        Ok(()) => println!("  removed every namespace, cgroup, pin and process the demo made"),
        Err(e) => println!("  {e}"),
    }
    result?;
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn show(m: &mut Mesh, started: Instant) -> Result<()> {
    println!("mesh ready in {:.1} s", started.elapsed().as_secs_f64());
    println!("  node       bridge br0 10.77.0.1/24; nothing routes 10.96.0.0/12 (no kube-proxy)");
    println!(
        "  control    {CONTROL_PLANE}  tern discovery: the services file, health-checked, served as istiod would"
    );
    println!(
        "  service    calc.default.svc.cluster.local  VIP {VIP}  :{THRIFT_PORT} Thrift  :{TCP_PORT} plain TCP"
    );
    println!(
        "  {:<10} {:<11} tern sidecar, eBPF capture",
        m.client.name, m.client.ip
    );
    for s in &m.servers {
        println!(
            "  {:<10} {:<11} Thrift server :{THRIFT_PORT}, TCP echo :{TCP_PORT}, tern sidecar (inbound by sk_lookup)",
            s.name, s.ip
        );
    }
    interrupt::check()?;

    println!(
        "\n{}",
        bold("1. capture in client-0: eBPF hooks, no iptables")
    );
    let cg = m.client.cgroup.path_str();
    let (_, status, _) = tern_tests::tern(&["capture", "status", "--cgroup", cg]);
    println!("  $ tern capture status --cgroup {cg}");
    // Counters still at zero are left out.
    for line in status.lines().filter(|l| !l.trim_end().ends_with(" 0")) {
        println!("  {line}");
    }
    let (programs, links) = m.client.hooks()?;
    println!(
        "  the kernel (bpftool): {} programs on the cgroup ({}), {links} sk_lookup link on the namespace",
        programs.len(),
        programs.join(", ")
    );
    let rules = m.client.ns.iptables_rules()?;
    println!(
        "  iptables rules in client-0: {}",
        if rules.is_empty() {
            "none".to_owned()
        } else {
            rules.len().to_string()
        }
    );
    ensure!(rules.is_empty(), "the demo found iptables rules: {rules:?}");
    interrupt::check()?;

    println!(
        "\n{}",
        bold(&format!(
            "2. client-0 makes 300 calls to {} over one connection",
            vip(THRIFT_PORT)
        ))
    );
    let mut client = tern_tests::ThriftClient::start(
        &m.client.ns,
        Some(&m.client.cgroup),
        &vip(THRIFT_PORT),
        &["--calls", "300", "--phases", "3"],
    )?;
    let first = client.try_result()?;
    ensure!(first.io_error.is_none(), "the calls failed: {first:?}");
    chart(m, &first.by_server);
    println!("  (a connection-level proxy would have sent all 300 to one server)");
    let counter = |name: &str| tern_tests::capture_counter(&m.client.cgroup, name);
    println!(
        "  client-0's hooks: connect.redirected {}, getsockopt.answered {}, getpeername.rewritten {}",
        counter("connect.redirected"),
        counter("getsockopt.answered"),
        counter("getpeername.rewritten")
    );
    interrupt::check()?;

    println!(
        "\n{}",
        bold("3. calc-2's Thrift server stops; tern discovery's health check moves the traffic")
    );
    health_moves_traffic(m, &mut client)?;
    interrupt::check()?;

    println!(
        "\n{}",
        bold(&format!(
            "4. plain TCP to the same service ({}): balanced per connection",
            vip(TCP_PORT)
        ))
    );
    let mut last = None;
    for i in 1..=4 {
        let c = connect(&m.client.ns, Some(&m.client.cgroup), &vip(TCP_PORT));
        ensure!(c.ok(), "the TCP connection failed: {c:?}");
        let local = c.server_local.clone().unwrap_or_default();
        println!(
            "  connection {i} → {}; the application there saw it come from {}",
            m.server_at(&local).map_or("?", |p| p.name.as_str()),
            c.server_saw.as_deref().unwrap_or("?")
        );
        last = Some(local);
    }
    if let Some(dst) = last
        && let Some(server) = m.server_at(&dst)
    {
        // The client's connections, not the health checks of tern discovery.
        let from_client = || {
            let peer = format!("peer={}:", m.client.ip);
            server
                .access_log(&dst)
                .into_iter()
                .filter(move |l| l.contains(&peer))
        };
        tern_tests::eventually(std::time::Duration::from_secs(2), || {
            from_client().next().is_some()
        });
        if let Some(line) = from_client().next_back() {
            let fields = line.split("connection closed").nth(1).unwrap_or(&line);
            println!("  {}'s sidecar access log:{fields}", server.name);
            println!(
                "  (the server sidecar sees the client Pod's address {}: no NAT on either side)",
                m.client.ip
            );
        }
    }
    Ok(())
}

/// Step 3: a server stops, its health check fails, tern discovery serves it UNHEALTHY and the
/// client's sidecar stops sending it calls; it returns and gets them again.
fn health_moves_traffic(m: &mut Mesh, client: &mut tern_tests::ThriftClient) -> Result<()> {
    let endpoint = format!("{}:{THRIFT_PORT}", m.servers[1].ip);
    for (running, wanted, what) in [(false, "unhealthy", "stopped"), (true, "healthy", "back")] {
        let at = Instant::now();
        m.servers[1].set_thrift_server(running)?;
        ensure!(
            tern_tests::eventually(std::time::Duration::from_secs(10), || m.verdict(&endpoint)
                == wanted),
            "calc-2 never became {wanted}"
        );
        let seen = at.elapsed();
        ensure!(
            tern_tests::eventually(std::time::Duration::from_secs(10), || m.discovery_in_sync()),
            "the sidecars did not apply calc-2 {wanted}"
        );
        println!(
            "  calc-2's server {what}: its health check (Thrift whoami every 0.5 s) says {wanted} after {:.1} s; EDS serves it {}",
            seen.as_secs_f64(),
            wanted.to_uppercase()
        );
        client.next_phase();
        let calls = client.try_result()?;
        ensure!(
            calls.io_error.is_none() && calls.exceptions == 0,
            "the calls failed: {calls:?}"
        );
        chart(m, &calls.by_server);
        interrupt::check()?;
    }
    Ok(())
}

/// Step 5: identities, STRICT mTLS, a method denied by policy, Istio's request series.
fn security(m: &Mesh) -> Result<()> {
    println!(
        "  istiod     {CONTROL_PLANE_TLS}  the tests' istiod stand-in: Istio-shaped xDS over TLS, and Istio's CA API"
    );
    println!("  security   STRICT mutual TLS; client-0 is {CLIENT_ID}, the calc Pods {SERVER_ID}");
    println!("\n{}", bold("5. mutual TLS and an AuthorizationPolicy"));
    let calls = tern_tests::thrift_call(
        &m.client.ns,
        Some(&m.client.cgroup),
        &vip(THRIFT_PORT),
        &["--calls", "30"],
    );
    ensure!(
        calls.io_error.is_none() && calls.replies() == 30,
        "the calls failed: {calls:?}"
    );
    println!(
        "  client-0 makes 30 calls to {} over mutual TLS:",
        vip(THRIFT_PORT)
    );
    chart(m, &calls.by_server);
    for pod in std::iter::once(&m.client).chain(&m.servers) {
        let dump: serde_json::Value = serde_json::from_str(&pod.admin("GET", "/config_dump"))
            .context("the sidecar's /config_dump")?;
        let cert = &dump["certificate"];
        println!(
            "  {:<8} certificate from the control plane's CA: {}, expires in {} h",
            pod.name,
            cert["info"]["sans"][0].as_str().unwrap_or("none"),
            cert["expires_in_seconds"].as_i64().unwrap_or(0) / 3600
        );
    }
    let server = &m.servers[0];
    let opened = tern_tests::series_sum(
        &server.admin("GET", "/stats/prometheus"),
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", CLIENT_ID),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    println!(
        "  {}'s sidecar: {opened} mutual-TLS connections from {CLIENT_ID}",
        server.name
    );
    ensure!(
        opened >= 1.0,
        "{} saw no mTLS connection from the client",
        server.name
    );
    let direct = format!("{}:{THRIFT_PORT}", server.ip);
    let plain = tern_tests::thrift_call(&m.client.ns, None, &direct, &["--calls", "1"]);
    println!(
        "  plaintext straight to {direct} (from client-0, not through its sidecar): {}",
        if plain.replies() == 0 {
            "closed by calc-1's sidecar, no reply"
        } else {
            "answered"
        }
    );
    ensure!(
        plain.replies() == 0,
        "plaintext reached a STRICT Pod: {plain:?}"
    );
    interrupt::check()?;

    let rule = r#"{ name: "ns[default]-policy[deny-echo]-rule[0]", action: deny, ports: [9090], methods: ["echo"] }"#;
    println!(
        "  the control plane pushes version 3 (all three endpoints) with the server Pods' RBAC:"
    );
    println!("    {rule}");
    m.push_with(3, &format!("inbound_rbac:\n  - {rule}"))?;
    let call = |method: &str| {
        tern_tests::thrift_call(
            &m.client.ns,
            Some(&m.client.cgroup),
            &vip(THRIFT_PORT),
            &["--calls", "10", "--method", method],
        )
    };
    for method in ["echo", "whoami"] {
        let c = call(method);
        println!(
            "  client-0 calls {method:<6} ×10: {} replies{}",
            c.replies(),
            c.app_errors
                .first()
                .map(|e| format!(", {} × {e}", c.app_errors.len()))
                .unwrap_or_default()
        );
        let want = if method == "echo" { 0 } else { 10 };
        ensure!(c.replies() == want, "{method}: {c:?}");
    }
    let stats = m.client.admin("GET", "/stats/prometheus");
    println!("  istio_requests_total reported by client-0's sidecar (source {CLIENT_ID}):");
    let shown = [
        "destination_workload",
        "destination_principal",
        "response_code",
    ];
    for line in stats.lines().filter(|l| {
        l.starts_with("istio_requests_total{")
            && l.contains(r#"reporter="source""#)
            && l.contains(r#"request_protocol="thrift""#)
    }) {
        let labels: Vec<&str> = line
            .split(['{', '}', ','])
            .filter(|kv| shown.iter().any(|k| kv.starts_with(&format!("{k}="))))
            .collect();
        let value = line.rsplit(' ').next().unwrap_or("0");
        if value == "0" {
            continue;
        }
        println!("    {{{}}} {value}", labels.join(", "));
    }
    Ok(())
}

/// The calls each server answered, as a bar chart (the full width is every call).
fn chart(m: &Mesh, by_server: &BTreeMap<String, u64>) {
    let total = by_server.values().sum::<u64>().max(1);
    for s in &m.servers {
        let n = by_server.get(&s.name).copied().unwrap_or(0);
        let width = (n * 60 / total) as usize;
        println!(
            "  {:<7} {:<60} {n:>4} ({}%)",
            s.name,
            "█".repeat(width),
            n * 100 / total
        );
    }
    let _ = std::io::stdout().flush();
}

/// The demo's namespaces and cgroups, to check that none is left.
struct Names {
    namespaces: Vec<String>,
    cgroups: Vec<std::path::PathBuf>,
}

impl Names {
    fn of(m: &Mesh) -> Self {
        let pods = std::iter::once(&m.client).chain(&m.servers);
        Self {
            namespaces: pods
                .clone()
                .map(|p| p.ns.name().to_owned())
                .chain([m.istiod.name().to_owned(), m.node.name().to_owned()])
                .collect(),
            cgroups: pods.map(|p| p.cgroup.path().to_owned()).collect(),
        }
    }

    fn left(&self) -> Result<()> {
        let netns = std::fs::read_dir("/var/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let ns_left: Vec<&String> = self
            .namespaces
            .iter()
            .filter(|n| netns.contains(n))
            .collect();
        let cg_left: Vec<&Path> = self
            .cgroups
            .iter()
            .map(|c| c.as_path())
            .filter(|c| c.exists())
            .collect();
        ensure!(
            ns_left.is_empty() && cg_left.is_empty(),
            "left behind: namespaces {ns_left:?}, cgroups {cg_left:?}"
        );
        Ok(())
    }
}
