//! A small mesh in network namespaces, as the demo and the end-to-end tests use it: a node
//! with a bridge, a control plane, a client Pod and server Pods — each Pod a namespace and a
//! cgroup with tern as its sidecar (eBPF capture, configuration over xDS).
//!
//! Addresses, on the bridge `br0` of the node's namespace (10.77.0.0/24):
//! - the node, every Pod's gateway: 10.77.0.1. It answers "no route to host" for the service
//!   range 10.96.0.0/12 (there is no kube-proxy): a virtual IP works only through a sidecar;
//! - the control plane (istiod's stand-in `tern-istiod`, Istio-shaped resources): 10.77.0.2:15010, or
//!   with mutual TLS 10.77.0.2:15012 (xDS and Istio's CA over TLS, a token per Pod);
//! - `client-0`: 10.77.0.10; `calc-1`, `calc-2`, …: 10.77.0.11, 10.77.0.12, …
//!
//! The service `calc.default.svc.cluster.local` has the virtual IP 10.96.0.50 with a Thrift
//! port (9090) and a plain TCP port (8080). The control plane sends both as istiod does: a
//! plain `tcp_proxy` to `outbound|<port>||calc.default.svc.cluster.local`, no name or option
//! that says Thrift (the sidecar finds out from the bytes). Every server Pod runs a Thrift
//! server on 9090 and a TCP echo server on 8080.
//!
//! [`Mesh::start_discovery`] builds it without istiod: `tern discovery` is the control plane,
//! serving a services file in which both ports of `calc` have a health check.
//!
//! [`Mesh::start_mtls`] builds the same mesh in STRICT mutual TLS, as istiod configures it:
//! every sidecar gets its certificate from the control plane's CA (`client-0` is
//! [`CLIENT_ID`], the server Pods [`SERVER_ID`]), originates Istio mTLS to the endpoints and
//! takes only mTLS inbound.
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::{
    Cgroup, Istiod, Netns, Process, Tern, admin, bin_dir, discovery::Discovery, eventually, ip,
    pki::MeshTrust, start_server, testpeer_bin,
};

/// The service's virtual IP.
pub const VIP: &str = "10.96.0.50";
/// The service's Thrift port and plain TCP port.
pub const THRIFT_PORT: u16 = 9090;
pub const TCP_PORT: u16 = 8080;
/// Where the control plane serves ADS.
pub const CONTROL_PLANE: &str = "10.77.0.2:15010";
/// Where it serves xDS and Istio's CA over TLS, in a mesh with mutual TLS (istiod's 15012).
pub const CONTROL_PLANE_TLS: &str = "10.77.0.2:15012";
/// The identities of the client Pod and the server Pods, in a mesh with mutual TLS.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/calc";
const GATEWAY: &str = "10.77.0.1";
const SERVICE_RANGE: &str = "10.96.0.0/12";

/// `VIP:port`.
pub fn vip(port: u16) -> String {
    format!("{VIP}:{port}")
}

/// A Pod: a namespace linked to the node's bridge, a cgroup, its applications and its sidecar.
/// Fields drop in order: the sidecar, the applications, the cgroup, the namespace.
pub struct Pod {
    sidecar: Option<Tern>,
    apps: Vec<Process>,
    /// How the sidecar reaches the control plane (`--xds-address` …).
    control: Vec<String>,
    pub name: String,
    pub ip: String,
    pub cgroup: Cgroup,
    pub ns: Netns,
}

impl Pod {
    /// A namespace `name` with address `ip` on port `port` of the node's bridge, and a cgroup;
    /// its sidecar reaches the control plane with the arguments `control`.
    fn new(
        node: &Netns,
        name: &str,
        ip_addr: &str,
        port: u32,
        control: Vec<String>,
    ) -> Result<Self> {
        let ns = Netns::new(name)?;
        bridge_port(node, &ns, ip_addr, port)?;
        Ok(Self {
            sidecar: None,
            apps: Vec::new(),
            control,
            name: name.to_owned(),
            ip: ip_addr.to_owned(),
            cgroup: Cgroup::new(name)?,
            ns,
        })
    }

    /// Starts tern as this Pod's sidecar: eBPF capture of the Pod's cgroup (outbound) and
    /// namespace (inbound), configuration from the control plane, an access log; then waits
    /// until its first configuration is applied (`/ready`).
    pub fn start_sidecar(&mut self) -> Result<()> {
        let node_id = format!(
            "sidecar~{}~{}.default~default.svc.cluster.local",
            self.ip, self.name
        );
        let netns = self.ns.path();
        let mut args = vec![
            "run",
            "--capture",
            "ebpf",
            "--cgroup",
            self.cgroup.path_str(),
            "--netns",
            netns.to_str().context("UTF-8 path")?,
            "--node-id",
            &node_id,
            "--access-log",
        ];
        args.extend(self.control.iter().map(String::as_str));
        let tern = Tern::start(&self.ns, Some(&self.cgroup), &args)?;
        ensure!(
            eventually(Duration::from_secs(10), || self
                .admin("GET", "/ready")
                .trim()
                == "LIVE"),
            "{}'s sidecar never became ready:\n{}",
            self.name,
            tern.log()
        );
        self.sidecar = Some(tern);
        Ok(())
    }

    /// Stops the sidecar with SIGTERM (it drains and detaches its hooks), as Kubernetes does.
    pub fn stop_sidecar(&mut self) -> Result<()> {
        if let Some(mut tern) = self.sidecar.take() {
            tern.process.terminate()?;
        }
        Ok(())
    }

    /// The sidecar's log (empty when it is not running).
    pub fn sidecar_log(&self) -> String {
        self.sidecar.as_ref().map(Tern::log).unwrap_or_default()
    }

    /// The sidecar's access-log lines (`--access-log`) for connections to `dst` (`ip:port`).
    pub fn access_log(&self, dst: &str) -> Vec<String> {
        let dst = format!("dst={dst} ");
        self.sidecar_log()
            .lines()
            .filter(|l| l.contains("tern::access") && l.contains(&dst))
            .map(str::to_owned)
            .collect()
    }

    /// A request to the sidecar's admin server.
    pub fn admin(&self, method: &str, path: &str) -> String {
        admin(&self.ns, method, path)
    }

    /// The hooks the kernel holds for this Pod: programs on its cgroup, and BPF links on its
    /// namespace (`sk_lookup`), as bpftool sees them.
    pub fn hooks(&self) -> Result<(Vec<String>, usize)> {
        Ok((self.cgroup.attached_programs()?, self.ns.bpf_links()?))
    }

    /// Stops the Pod's Thrift server (a crash, or a hung deploy), or starts it again.
    pub fn set_thrift_server(&mut self, running: bool) -> Result<()> {
        if !running {
            self.apps.remove(0);
            return Ok(());
        }
        let thrift = format!("0.0.0.0:{THRIFT_PORT}");
        let server = start_server(
            &self.ns,
            Some(&self.cgroup),
            &bin_dir().join("tern-thriftpeer"),
            &["serve", &thrift, &self.name],
        )?;
        self.apps.insert(0, server);
        Ok(())
    }

    /// The Thrift server (`tern-thriftpeer`, answering `whoami` with the Pod's name) and the
    /// TCP echo server (`tern-testpeer`) of a server Pod, inside the Pod's cgroup.
    fn start_servers(&mut self) -> Result<()> {
        let thrift = format!("0.0.0.0:{THRIFT_PORT}");
        let tcp = format!("0.0.0.0:{TCP_PORT}");
        self.apps.push(start_server(
            &self.ns,
            Some(&self.cgroup),
            &bin_dir().join("tern-thriftpeer"),
            &["serve", &thrift, &self.name],
        )?);
        self.apps.push(start_server(
            &self.ns,
            Some(&self.cgroup),
            &testpeer_bin(),
            &["serve", &tcp],
        )?);
        Ok(())
    }
}

/// The node: a namespace with the bridge `br0` (10.77.0.1/24, every Pod's gateway) that answers
/// "no route to host" for the service range 10.96.0.0/12.
pub fn node() -> Result<Netns> {
    let node = Netns::new("node")?;
    ip(&["-n", node.name(), "link", "add", "br0", "type", "bridge"])?;
    ip(&[
        "-n",
        node.name(),
        "addr",
        "add",
        &format!("{GATEWAY}/24"),
        "dev",
        "br0",
    ])?;
    ip(&["-n", node.name(), "link", "set", "br0", "up"])?;
    node.output(
        None,
        std::path::Path::new("sysctl"),
        &["-qw", "net.ipv4.ip_forward=1"],
    )?;
    ip(&[
        "-n",
        node.name(),
        "route",
        "add",
        "unreachable",
        SERVICE_RANGE,
    ])?;
    Ok(node)
}

/// Links `ns` to the node's bridge through a veth pair (`v<port>` on the node, `eth0` in
/// `ns`), with address `ip_addr` and a default route through the node.
pub fn bridge_port(node: &Netns, ns: &Netns, ip_addr: &str, port: u32) -> Result<()> {
    let veth = format!("v{port}");
    crate::veth(node, &veth, ns, "eth0")?;
    ip(&["-n", node.name(), "link", "set", &veth, "master", "br0"])?;
    ip(&["-n", node.name(), "link", "set", &veth, "up"])?;
    let cidr = format!("{ip_addr}/24");
    ip(&["-n", ns.name(), "addr", "add", &cidr, "dev", "eth0"])?;
    ip(&["-n", ns.name(), "link", "set", "eth0", "up"])?;
    ip(&["-n", ns.name(), "route", "add", "default", "via", GATEWAY])
}

/// The mesh's control plane: the test's istiod stand-in, or `tern discovery`.
pub enum Control {
    Istiod(Istiod),
    Discovery(Discovery),
}

impl Control {
    /// What happened at the control plane, for messages.
    pub fn events(&self) -> String {
        match self {
            Self::Istiod(cp) => cp.events(),
            Self::Discovery(d) => d.tern.log(),
        }
    }
}

/// The whole mesh. Dropping it removes every namespace, cgroup, pin and process it made.
pub struct Mesh {
    pub client: Pod,
    pub servers: Vec<Pod>,
    pub cp: Control,
    pub istiod: Netns,
    pub node: Netns,
    /// The CA and tokens of a mesh with mutual TLS (their files go last).
    trust: Option<MeshTrust>,
}

impl Mesh {
    /// Builds the mesh with `servers` server Pods, every Pod with its sidecar running.
    /// `progress` hears what is being started.
    pub fn start(servers: usize, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        Self::build(servers, None, false, progress)
    }

    /// The same mesh in STRICT mutual TLS, the control plane being the mesh's CA.
    pub fn start_mtls(servers: usize, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        Self::build(servers, Some(MeshTrust::new()?), false, progress)
    }

    /// The same mesh without istiod: `tern discovery` serves the services file. Returns once
    /// every endpoint passed its first health check and every sidecar holds that (before,
    /// the verdicts arriving would change the endpoints under the first calls).
    pub fn start_discovery(servers: usize, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        let mesh = Self::build(servers, None, true, progress)?;
        progress("health checks");
        let checked = |m: &Self| {
            m.servers.iter().all(|p| {
                [THRIFT_PORT, TCP_PORT]
                    .iter()
                    .all(|port| m.verdict(&format!("{}:{port}", p.ip)) == "healthy")
            }) && m.discovery_in_sync()
        };
        ensure!(
            eventually(Duration::from_secs(10), || checked(&mesh)),
            "the endpoints never passed their health checks:\n{}",
            mesh.cp.events()
        );
        Ok(mesh)
    }

    fn build(
        servers: usize,
        trust: Option<MeshTrust>,
        discovery: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        crate::assert_root();
        progress("node: bridge br0");
        let node = node()?;

        progress("control plane");
        let istiod = Netns::new("istiod")?;
        bridge_port(&node, &istiod, "10.77.0.2", 2)?;
        let endpoints: Vec<String> = (1..=servers)
            .map(|i| format!("10.77.0.{}", 10 + i))
            .collect();
        let all: Vec<&str> = endpoints.iter().map(String::as_str).collect();
        // How the sidecars of the server Pods and of the client reach the control plane.
        let (cp, control) = match &trust {
            None => {
                let plain = vec![
                    "--xds-address".to_owned(),
                    format!("http://{CONTROL_PLANE}"),
                ];
                let cp = if discovery {
                    Control::Discovery(Discovery::start(
                        &istiod,
                        CONTROL_PLANE,
                        "127.0.0.1:15014",
                        &services_file(&all),
                        &[],
                    )?)
                } else {
                    let snapshot = snapshot(1, &all, true);
                    Control::Istiod(Istiod::start(&istiod, CONTROL_PLANE, &snapshot, &[])?)
                };
                (cp, [plain.clone(), plain])
            }
            Some(t) => {
                let control = ["calc", "client"].map(|sa| {
                    let token = t.workload_token("default", sa)?;
                    Ok::<_, anyhow::Error>(t.tern_args_at(CONTROL_PLANE_TLS, &token, "default", sa))
                });
                let [calc, client] = control;
                let control = [calc?, client?];
                let snapshot = snapshot(1, &all, false);
                let args = t.control_plane_args("-");
                let cp = Istiod::start(&istiod, CONTROL_PLANE_TLS, &snapshot, &args)?;
                (Control::Istiod(cp), control)
            }
        };
        let [server_control, client_control] = control;

        let mut server_pods = Vec::with_capacity(servers);
        for (i, addr) in endpoints.iter().enumerate() {
            let name = format!("calc-{}", i + 1);
            progress(&format!("{name}: servers and sidecar"));
            let mut pod = Pod::new(&node, &name, addr, 11 + i as u32, server_control.clone())?;
            pod.start_servers()?;
            pod.start_sidecar()?;
            server_pods.push(pod);
        }
        progress("client-0: sidecar");
        let mut client = Pod::new(&node, "client-0", "10.77.0.10", 10, client_control)?;
        client.start_sidecar()?;
        Ok(Self {
            client,
            servers: server_pods,
            cp,
            istiod,
            node,
            trust,
        })
    }

    /// Whether the sidecars speak mutual TLS.
    fn plaintext(&self) -> bool {
        self.trust.is_none()
    }

    /// Pushes a new version whose endpoints are the server Pods named.
    pub fn set_endpoints(&self, version: u32, pods: &[&str]) -> Result<()> {
        let ips: Vec<&str> = pods
            .iter()
            .map(|name| {
                self.servers
                    .iter()
                    .find(|p| p.name == *name)
                    .map(|p| p.ip.as_str())
                    .with_context(|| format!("no server Pod {name}"))
            })
            .collect::<Result<_>>()?;
        match &self.cp {
            Control::Istiod(cp) => cp.push(&snapshot(version, &ips, self.plaintext())),
            Control::Discovery(d) => d.write(&services_file(&ips))?,
        }
        // Every sidecar ACKs the push; wait for the client's own view (`/clusters`) to hold
        // exactly these endpoints.
        let thrift_endpoint = |ip: &str| format!("{ip}:{THRIFT_PORT}");
        let applied = eventually(Duration::from_secs(5), || {
            let clusters = self.client.admin("GET", "/clusters");
            self.servers
                .iter()
                .all(|p| clusters.contains(&thrift_endpoint(&p.ip)) == ips.contains(&p.ip.as_str()))
        });
        ensure!(
            applied,
            "the client's sidecar did not apply endpoints version {version}:\n{}\n{}",
            self.client.admin("GET", "/clusters"),
            self.cp.events()
        );
        Ok(())
    }

    /// Pushes a new version with every server Pod as an endpoint and these YAML lines
    /// (`inbound_rbac:` …) added; waits until the control plane saw every sidecar ACK it.
    pub fn push_with(&self, version: u32, extra: &str) -> Result<()> {
        let Control::Istiod(cp) = &self.cp else {
            anyhow::bail!("tern discovery serves no inbound policy");
        };
        let ips: Vec<&str> = self.servers.iter().map(|p| p.ip.as_str()).collect();
        cp.push(&format!(
            "{}{extra}\n",
            snapshot(version, &ips, self.plaintext())
        ));
        let acks = || {
            cp.events()
                .lines()
                .filter(|l| l.starts_with(&format!("ACK Listener {version}")))
                .count()
        };
        ensure!(
            eventually(Duration::from_secs(10), || acks() > self.servers.len()),
            "not every sidecar ACKed version {version}:\n{}",
            cp.events()
        );
        Ok(())
    }

    /// With tern discovery as the control plane: its verdict on an endpoint, and whether every
    /// sidecar ACKed what it was last sent (empty and false with the istiod stand-in).
    pub fn verdict(&self, address: &str) -> String {
        match &self.cp {
            Control::Discovery(d) => d.verdict(&self.istiod, address),
            Control::Istiod(_) => String::new(),
        }
    }

    pub fn discovery_in_sync(&self) -> bool {
        match &self.cp {
            Control::Discovery(d) => d.all_in_sync(&self.istiod),
            Control::Istiod(_) => false,
        }
    }

    /// The server Pod a socket address (`ip:port`, as a connection reports it) belongs to.
    pub fn server_at(&self, addr: &str) -> Option<&Pod> {
        let ip = addr.rsplit_once(':').map_or(addr, |(ip, _)| ip);
        self.servers.iter().find(|p| p.ip == ip)
    }
}

/// `tern discovery`'s services file: `calc` on both ports, its endpoints at `ips`, each port
/// with a health check (a Thrift call of `whoami`, and a TCP connect).
fn services_file(ips: &[&str]) -> String {
    let endpoints = |port: u16| {
        ips.iter()
            .map(|ip| format!("\"{ip}:{port}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let check = "interval: 0.5s, timeout: 0.5s, healthy_threshold: 1, unhealthy_threshold: 2";
    format!(
        r#"services:
  - name: calc.default.svc.cluster.local
    port: {THRIFT_PORT}
    protocol: thrift
    vip: {VIP}
    endpoints: [{}]
    health_check: {{ {check}, thrift_health_check: {{ method_name: whoami }} }}
  - name: calc.default.svc.cluster.local
    port: {TCP_PORT}
    vip: {VIP}
    endpoints: [{}]
    health_check: {{ {check}, tcp_health_check: {{}} }}
"#,
        endpoints(THRIFT_PORT),
        endpoints(TCP_PORT)
    )
}

/// The control plane's snapshot: the service `calc` on both ports, its endpoints at `ips`;
/// without `plaintext`, Istio mTLS to the endpoints (SAN [`SERVER_ID`]) and STRICT inbound.
fn snapshot(version: u32, ips: &[&str], plaintext: bool) -> String {
    let endpoints = |port: u16| {
        ips.iter()
            .map(|ip| format!("\"{ip}:{port}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (inbound, mtls) = if plaintext {
        ("plaintext", String::new())
    } else {
        ("strict", format!(r#", mtls: "{SERVER_ID}""#))
    };
    format!(
        r#"version: "{version}"
inbound: {inbound}
services:
  - {{ name: calc, vip: {VIP}, port: {THRIFT_PORT}, filter: tcp{mtls}, endpoints: [{}] }}
  - {{ name: calc, vip: {VIP}, port: {TCP_PORT}, filter: tcp{mtls}, endpoints: [{}] }}
"#,
        endpoints(THRIFT_PORT),
        endpoints(TCP_PORT)
    )
}
