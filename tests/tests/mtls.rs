//! tern in an Istio mesh's mutual TLS, against peers with an independent TLS stack
//! (Python's `ssl`): the workload certificate from Istio's CA API (istiod's stand-in's
//! `CreateCertificate`, over TLS with a bearer token, as istio-agent calls istiod on 15012),
//! renewed with no gap; outbound auto-mTLS chosen per endpoint by `tlsMode`, with the
//! server's SAN checked; inbound TLS terminated in STRICT and PERMISSIVE mode.
use std::{path::Path, time::Duration};

use tern_tests::{
    Istiod, Pods, Process, Tern, admin, eventually, metric,
    pki::{ISTIOD, MeshTrust, TestCa},
    pods, python_peer, start_server, unique,
};

const APP_ID: &str = "spiffe://cluster.local/ns/default/sa/app";
const SERVER_ID: &str = "spiffe://cluster.local/ns/backend/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/backend/sa/client";
/// The mTLS echo server in the server Pod.
const ECHO: &str = "10.66.1.2:9443";
/// Its service, with the right SAN and with a SAN it does not have.
const SECURE: &str = "10.96.0.30:9443";
const WRONG_SAN: &str = "10.96.0.31:9443";
/// The mTLS Thrift server in the server Pod, and its service.
const THRIFT: &str = "10.66.1.2:9444";
const SECURE_THRIFT: &str = "10.96.0.32:9444";

fn snapshot(version: &str, inbound: &str) -> String {
    snapshot_with(version, inbound, "")
}

/// The snapshot with these YAML lines (`inbound_rbac:` …) added.
fn snapshot_with(version: &str, inbound: &str, extra: &str) -> String {
    format!(
        r#"version: "{version}"
inbound: {inbound}
{extra}
services:
  - {{ name: secure, vip: 10.96.0.30, port: 9443, filter: tcp, mtls: "{SERVER_ID}", endpoints: ["{ECHO}"] }}
  - {{ name: wrong-san, vip: 10.96.0.31, port: 9443, filter: tcp, mtls: "spiffe://cluster.local/ns/backend/sa/other", endpoints: ["{ECHO}"] }}
  - {{ name: secure-thrift, vip: 10.96.0.32, port: 9444, filter: tcp, mtls: "{SERVER_ID}", endpoints: ["{THRIFT}"] }}
"#
    )
}

/// The mesh: the CA, the control plane (xDS and CA over TLS on 15012, with a token), the
/// mTLS servers in the server Pod, and tern in the application Pod.
struct Mesh {
    p: Pods,
    trust: MeshTrust,
    cp: Istiod,
    tern: Tern,
    server_log: std::path::PathBuf,
    _servers: Vec<Process>,
}

/// A temporary file or directory, removed on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mesh(inbound: &str, ttl: &str) -> Mesh {
    mesh_with(&snapshot("1", inbound), ttl)
}

fn mesh_with(first: &str, ttl: &str) -> Mesh {
    mesh_full(first, &["--secret-ttl", ttl], |_| {})
}

/// The mesh with `extra` arguments for tern, and `prepare` run with the CA before tern
/// starts.
fn mesh_full(first: &str, extra: &[&str], prepare: impl FnOnce(&TestCa)) -> Mesh {
    let p = pods();
    let trust = MeshTrust::new().unwrap();
    prepare(&trust.ca);
    let (servers, server_log) = mtls_servers(&p, &trust);
    let cp = Istiod::start(&p.app, ISTIOD, first, &trust.control_plane_args(APP_ID)).unwrap();
    let mut args = trust.tern_args("default", "app");
    args.push("--access-log".into());
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tern = p.start_tern_with(&args, "info,tern=debug").unwrap();
    Mesh {
        p,
        trust,
        cp,
        tern,
        server_log,
        _servers: servers,
    }
}

/// The mTLS servers in the server Pod (Python `ssl`, presenting `SERVER_ID` from the mesh
/// CA): an echo server on `ECHO` and a Thrift one on `THRIFT`; and the file they log to.
fn mtls_servers(p: &Pods, trust: &MeshTrust) -> (Vec<Process>, std::path::PathBuf) {
    let server = trust
        .ca
        .issue("server", &[SERVER_ID], Duration::from_secs(3600))
        .unwrap();
    let server_log = std::env::temp_dir().join(unique("tls-server-log"));
    let script = python_peer("tls_peer.py");
    let ca_path = trust.ca.ca_str();
    let log = server_log.to_str().unwrap();
    let python = |mode: &str, addr: &str, more: &[&str]| {
        let args = [
            &[
                script.to_str().unwrap(),
                mode,
                addr,
                server.cert_str(),
                server.key_str(),
                &ca_path,
                log,
            ][..],
            more,
        ]
        .concat();
        start_server(&p.srv, None, Path::new("python3"), &args).unwrap()
    };
    let servers = vec![
        python("server", ECHO, &[]),
        python("thrift", THRIFT, &["secure-1"]),
    ];
    (servers, server_log)
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.server_log);
    }
}

impl Mesh {
    fn python(&self, ns: &tern_tests::Netns, args: &[&str]) -> serde_json::Value {
        let cgroup = std::ptr::eq(ns, &self.p.app).then_some(&self.p.cgroup);
        tern_tests::python_json(ns, cgroup, "tls_peer.py", args)
    }

    fn config_dump(&self) -> serde_json::Value {
        serde_json::from_str(&tern_tests::admin(&self.p.app, "GET", "/config_dump")).unwrap()
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(&self.server_log).unwrap_or_default()
    }

    /// What Prometheus scrapes on 15020.
    fn stats(&self) -> String {
        self.p
            .app
            .output(
                None,
                Path::new("curl"),
                &["-s", "http://127.0.0.1:15020/stats/prometheus"],
            )
            .unwrap()
    }

    fn handshakes(&self, direction: &str, result: &str) -> f64 {
        metric(
            &self.p.app,
            &format!(r#"tern_tls_handshakes_total{{direction="{direction}",result="{result}"}}"#),
        )
    }
}

/// tern gets its certificate from Istio's CA API, and calls an mTLS server (Python `ssl`)
/// with it: the server sees tern's SPIFFE identity, tern checks the server's, a server
/// whose SAN is not the expected one is refused and counted, Thrift calls go over pooled
/// mTLS connections, and a renewal breaks no open connection.
#[test]
fn workload_certificate_from_istios_ca_and_outbound_mtls() {
    tern_tests::require_root!();
    let m = mesh("null", "6s");
    // Issued through CreateCertificate, with the token and the cluster id.
    assert!(
        m.cp.wait_for(&format!("ISSUE {APP_ID} ttl=6s cluster=Kubernetes")),
        "{}",
        m.cp.events()
    );
    assert!(eventually(Duration::from_secs(5), || {
        m.config_dump()["certificate"]["info"]["sans"][0] == APP_ID
    }));
    let serial = m.config_dump()["certificate"]["info"]["serial"].clone();
    assert!(
        metric(
            &m.p.app,
            r#"tern_tls_certificate_updates_total{source="istio_ca",result="installed"}"#
        ) >= 1.0
    );

    // Outbound: the application speaks plaintext to the service; tern originates mTLS.
    let out = m.python(&m.p.app, &["plain", SECURE]);
    assert_eq!(out["reply"], format!("{APP_ID} hello"), "{out}");
    assert!(
        m.server_log()
            .contains(&format!("PEER {APP_ID} ALPN istio")),
        "the server saw tern's identity over ALPN istio (never istio-peer-exchange):\n{}",
        m.server_log()
    );
    assert!(
        m.tern.log().contains(SERVER_ID),
        "tern logs the server's identity"
    );
    assert!(m.handshakes("outbound", "ok") >= 1.0);

    // A server whose SAN is not the one the cluster expects is refused, with its reason.
    let out = m.python(&m.p.app, &["plain", WRONG_SAN]);
    assert!(out.get("reply").is_none(), "{out}");
    assert!(m.handshakes("outbound", "san_mismatch") >= 1.0);

    // Thrift per request over pooled mTLS connections to a real TThreadedServer.
    let calls = tern_tests::thrift_call(
        &m.p.app,
        Some(&m.p.cgroup),
        SECURE_THRIFT,
        &["--calls", "50"],
    );
    assert_eq!(calls.by_server.get("secure-1"), Some(&50), "{calls:?}");
    let thrift_handshakes = m
        .server_log()
        .lines()
        .filter(|l| *l == format!("PEER {APP_ID}"))
        .count();
    assert!(
        (1..=4).contains(&thrift_handshakes),
        "50 calls reuse pooled connections: {thrift_handshakes} handshakes"
    );

    // Istio's standard metrics on 15020, as Kiali reads them: Thrift calls and TCP
    // connections reported by the source, with both workloads and both identities.
    let stats = m.stats();
    let series = |name: &str, labels: &[(&str, &str)]| tern_tests::series_sum(&stats, name, labels);
    let thrift = [
        ("reporter", "source"),
        ("source_workload", "app-0"),
        ("source_principal", APP_ID),
        ("destination_workload", "secure-thrift-v1"),
        (
            "destination_service",
            "secure-thrift.default.svc.cluster.local",
        ),
        ("destination_principal", SERVER_ID),
        ("request_protocol", "thrift"),
        ("response_code", "success"),
    ];
    assert_eq!(series("istio_requests_total", &thrift), 50.0, "{stats}");
    assert_eq!(
        series("istio_request_duration_milliseconds_count", &thrift),
        50.0
    );
    assert!(series("istio_response_bytes_sum", &thrift) > 0.0);
    let tcp = [
        ("reporter", "source"),
        ("destination_workload", "secure-v1"),
        ("destination_service_name", "secure"),
        ("destination_principal", SERVER_ID),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "unknown"),
    ];
    assert!(
        series("istio_tcp_connections_opened_total", &tcp) >= 1.0,
        "{stats}"
    );
    assert!(
        series("istio_tcp_received_bytes_total", &tcp) >= 6.0,
        "{stats}"
    );

    // Renewal at half of the 6 s lifetime: a connection opened before it keeps working,
    // and the certificate in force is a new one.
    let script = python_peer("tls_peer.py");
    let held =
        m.p.app
            .command(
                Some(&m.p.cgroup),
                Path::new("python3"),
                &[
                    script.to_str().unwrap(),
                    "plain",
                    SECURE,
                    "--again-after",
                    "5",
                ],
            )
            .output();
    assert!(
        m.cp.events().matches(&format!("ISSUE {APP_ID}")).count() >= 2,
        "renewed:\n{}",
        m.cp.events()
    );
    let held: serde_json::Value =
        serde_json::from_slice(&held.unwrap().stdout).expect("JSON from the held connection");
    assert_eq!(held["reply"], format!("{APP_ID} hello"), "{held}");
    assert_eq!(held["again"], format!("{APP_ID} hello"), "{held}");
    assert_ne!(m.config_dump()["certificate"]["info"]["serial"], serial);
    let out = m.python(&m.p.app, &["plain", SECURE]);
    assert_eq!(out["reply"], format!("{APP_ID} hello"), "{out}");
}

/// Inbound: an mTLS client (Python `ssl`, its certificate from the mesh CA) reaches the
/// application through tern in STRICT mode, and tern records its identity; a plaintext
/// client is refused in STRICT and let through in PERMISSIVE.
#[test]
fn inbound_mtls_strict_and_permissive() {
    tern_tests::require_root!();
    let m = mesh("strict", "1h");
    let client = m
        .trust
        .ca
        .issue("client", &[CLIENT_ID], Duration::from_secs(3600))
        .unwrap();
    let app = tern_tests::serve(&m.p.app, &["10.66.1.1:8080"]).unwrap();
    assert!(m.cp.wait_for(&format!("ISSUE {APP_ID}")));
    assert!(eventually(Duration::from_secs(5), || {
        m.config_dump()["certificate"]["info"]["sans"][0] == APP_ID
    }));
    let ca = m.trust.ca.ca_str();
    let mtls = || {
        m.python(
            &m.p.srv,
            &[
                "client",
                "10.66.1.1:8080",
                client.cert_str(),
                client.key_str(),
                &ca,
                "--alpn",
                "istio-peer-exchange,istio",
            ],
        )
    };
    let out = mtls();
    assert!(
        out["reply"].as_str().unwrap_or("").starts_with("peer="),
        "{out}\n{}",
        m.tern.log()
    );
    assert_eq!(
        out["server"], APP_ID,
        "tern presented its workload certificate"
    );
    assert_eq!(out["alpn"], "istio", "never istio-peer-exchange");
    let log = m.tern.log();
    assert!(
        log.lines()
            .any(|l| l.contains("tern::access") && l.contains(CLIENT_ID)),
        "the access log names the client:\n{log}"
    );

    // The destination reports the client's identity and mutual TLS.
    let stats = m.stats();
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains(r#"reporter="destination""#)
                && l.contains(&format!(r#"source_principal="{CLIENT_ID}""#))
                && l.contains(r#"source_workload_namespace="backend""#)
                && l.contains(r#"connection_security_policy="mutual_tls""#)),
        "{stats}"
    );

    // STRICT: plaintext is refused.
    let plain = m.python(&m.p.srv, &["plain", "10.66.1.1:8080"]);
    assert!(plain.get("reply").is_none(), "{plain}");

    // A mesh client without a certificate is refused too, and counted.
    let before = m.handshakes("inbound", "no_peer_certificate");
    let out = m.python(
        &m.p.srv,
        &["client", "10.66.1.1:8080", "-", "-", &ca, "--alpn", "istio"],
    );
    assert!(out.get("reply").is_none(), "{out}");
    assert!(m.handshakes("inbound", "no_peer_certificate") > before);

    // PERMISSIVE: both.
    m.cp.push(&snapshot("2", "permissive"));
    assert!(m.cp.wait_for("ACK Listener 2"), "{}", m.cp.events());
    let plain = m.python(&m.p.srv, &["plain", "10.66.1.1:8080"]);
    assert!(
        plain["reply"].as_str().unwrap_or("").starts_with("peer="),
        "{plain}"
    );
    assert!(mtls()["reply"].as_str().unwrap_or("").starts_with("peer="));
    drop(app);
}

/// Authorization as istiod writes a TCP `AuthorizationPolicy` (network RBAC), enforced on
/// inbound connections before a byte reaches the application: ALLOW by principal, DENY by
/// port, with the deciding policy in the access log; Thrift methods per call; and a rule
/// tern cannot decide refuses the listener instead of being skipped.
#[test]
fn inbound_authorization_policies() {
    tern_tests::require_root!();
    const OTHER_ID: &str = "spiffe://cluster.local/ns/backend/sa/other";
    const BANNED_ID: &str = "spiffe://cluster.local/ns/backend/sa/banned";
    let rules = format!(
        r#"inbound_rbac:
  - {{ name: "ns[default]-policy[deny-admin]-rule[0]", action: deny, ports: [8081] }}
  - {{ name: "ns[default]-policy[deny-banned]-rule[0]", action: deny, principals: ["{BANNED_ID}"] }}
  - {{ name: "ns[default]-policy[allow-client]-rule[0]", action: allow, principals: ["{CLIENT_ID}", "{BANNED_ID}"], ports: [8080, 8081] }}"#
    );
    let m = mesh_with(&snapshot_with("1", "strict", &rules), "1h");
    let long = Duration::from_secs(3600);
    let issue = |name, id| m.trust.ca.issue(name, &[id], long).unwrap();
    let (client, other, banned) = (
        issue("client", CLIENT_ID),
        issue("other", OTHER_ID),
        issue("banned", BANNED_ID),
    );
    let _app = tern_tests::serve(&m.p.app, &["10.66.1.1:8080", "10.66.1.1:8081"]).unwrap();
    let _thrift = tern_tests::thrift_serve(&m.p.app, "10.66.1.1:9090", "app").unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        m.config_dump()["certificate"]["info"]["sans"][0] == APP_ID
    }));
    let ca = m.trust.ca.ca_str();
    let call = |who: &tern_tests::pki::Issued, addr: &str| {
        m.python(
            &m.p.srv,
            &[
                "client",
                addr,
                who.cert_str(),
                who.key_str(),
                &ca,
                "--alpn",
                "istio",
            ],
        )
    };
    // Whether the access log says a connection to `port` was denied by `policy`.
    let denied_by = |port: &str, policy: &str| {
        m.tern.log().lines().any(|l| {
            l.contains("tern::access")
                && l.contains(&format!("dst=10.66.1.1:{port}"))
                && l.contains("handled=\"denied\"")
                && l.contains(&format!("denied_by=\"{policy}\""))
        })
    };
    // ALLOW by principal and port.
    let ok = call(&client, "10.66.1.1:8080");
    assert!(
        ok["reply"].as_str().unwrap_or("").starts_with("peer="),
        "{ok}"
    );
    // Not an allowed principal; not an allowed port.
    let denied = call(&other, "10.66.1.1:8080");
    assert!(denied.get("reply").is_none(), "{denied}");
    assert!(denied_by("8080", "none"), "{}", m.tern.log());
    let denied = call(&client, "10.66.1.1:8082");
    assert!(denied.get("reply").is_none(), "{denied}");
    assert!(denied_by("8082", "none"), "{}", m.tern.log());
    // DENY by principal (even though an ALLOW names it), and by port (whoever asks).
    let denied = call(&banned, "10.66.1.1:8080");
    assert!(denied.get("reply").is_none(), "{denied}");
    assert!(denied_by("8080", "ns[default]-policy[deny-banned]-rule[0]"));
    let denied = call(&client, "10.66.1.1:8081");
    assert!(denied.get("reply").is_none(), "{denied}");
    assert!(denied_by("8081", "ns[default]-policy[deny-admin]-rule[0]"));
    assert!(metric(&m.p.app, r#"tern_rbac_decisions_total{result="denied"}"#) >= 4.0);

    // Thrift methods, per call (PERMISSIVE, so a plaintext Thrift client can call).
    let rules = r#"inbound_rbac:
  - { name: "ns[default]-policy[thrift-reads]-rule[0]", action: allow, ports: [9090], methods: ["who*"] }"#;
    m.cp.push(&snapshot_with("2", "permissive", rules));
    assert!(m.cp.wait_for("ACK Listener 2"), "{}", m.cp.events());
    let allowed = tern_tests::thrift_call(&m.p.srv, None, "10.66.1.1:9090", &["--calls", "5"]);
    assert_eq!(
        allowed.by_server.get("app"),
        Some(&5),
        "{allowed:?}\n{}",
        m.tern.log()
    );
    let refused = tern_tests::thrift_call(
        &m.p.srv,
        None,
        "10.66.1.1:9090",
        &["--calls", "3", "--method", "echo"],
    );
    assert_eq!(refused.app_errors.len(), 3, "{refused:?}");
    assert!(
        refused.app_errors[0].contains("RBAC: access denied"),
        "{refused:?}"
    );

    // A rule tern cannot decide on a connection: the listener is refused, with the reason,
    // and inbound is closed — never left to the previous policy, which lacks the new rule —
    // and tern is no longer ready.
    let rules = r#"inbound_rbac:
  - { name: "ns[default]-policy[http]-rule[0]", action: deny, header: true }"#;
    m.cp.push(&snapshot_with("3", "permissive", rules));
    assert!(m.cp.wait_for("NACK Listener"), "{}", m.cp.events());
    assert!(
        m.cp.events().contains("header permission"),
        "{}",
        m.cp.events()
    );
    let closed = tern_tests::thrift_call(
        &m.p.srv,
        None,
        "10.66.1.1:9090",
        &["--calls", "1", "--method", "whoami"],
    );
    assert_eq!(closed.replies(), 0, "{closed:?}");
    assert!(closed.app_errors.is_empty(), "{closed:?}");
    assert!(
        metric(
            &m.p.app,
            r#"tern_connections_refused_total{direction="inbound",reason="inbound_listener_refused"}"#
        ) >= 1.0,
        "{}",
        m.tern.log()
    );
    assert_ne!(admin(&m.p.app, "GET", "/ready").trim(), "LIVE");
}

/// A DestinationRule's SIMPLE TLS to a host outside the mesh (`openssl s_server`): tern
/// originates TLS with the rule's SNI, checks the server against the rule's CA file and
/// SAN, presents no certificate; a SAN the server does not have is refused.
#[test]
fn destination_rule_simple_tls_to_an_openssl_server() {
    tern_tests::require_root!();
    let m = mesh("null", "1h");
    let external = m
        .trust
        .ca
        .issue(
            "external",
            &["api.external.test"],
            Duration::from_secs(3600),
        )
        .unwrap();
    let mut server = m.p.srv.command(
        None,
        Path::new("openssl"),
        &[
            "s_server",
            "-accept",
            "10.66.1.2:8443",
            "-cert",
            external.cert_str(),
            "-key",
            external.key_str(),
            "-rev",
            "-quiet",
        ],
    );
    server.stdin(std::process::Stdio::null());
    server.stdout(std::process::Stdio::null());
    let _server = Process::spawn(server).unwrap();
    let ca = m.trust.ca.ca_str();
    m.cp.push(&snapshot_with(
        "2",
        "null",
        "",
    ).replace(
        "services:\n",
        &format!(
            "services:\n  - {{ name: external, vip: 10.96.0.40, port: 8443, filter: tcp, simple_tls: {{ ca: \"{ca}\", sni: api.external.test, san: api.external.test }}, endpoints: [\"10.66.1.2:8443\"] }}\n  - {{ name: external-wrong, vip: 10.96.0.41, port: 8443, filter: tcp, simple_tls: {{ ca: \"{ca}\", sni: api.external.test, san: api.other.test }}, endpoints: [\"10.66.1.2:8443\"] }}\n"
        ),
    ));
    assert!(m.cp.wait_for("ACK Cluster 2"), "{}", m.cp.events());
    let out = eventually_reply(&m, "10.96.0.40:8443");
    assert_eq!(out["reply"], "olleh", "{out}\n{}", m.tern.log());
    let wrong = m.python(&m.p.app, &["plain", "10.96.0.41:8443"]);
    assert!(wrong.get("reply").is_none(), "{wrong}");
    assert!(m.handshakes("outbound", "san_mismatch") >= 1.0);
}

/// A reply through `addr`, once the server is up.
fn eventually_reply(m: &Mesh, addr: &str) -> serde_json::Value {
    let mut out = serde_json::Value::Null;
    eventually(Duration::from_secs(5), || {
        out = m.python(&m.p.app, &["plain", addr]);
        out.get("reply").is_some()
    });
    out
}

/// Certificates from files, as Istio's `OUTPUT_CERTS` or istio-csr write them: tern reads
/// `cert-chain.pem`, `key.pem` and `root-cert.pem`, calls the mTLS server with them, and
/// reads them again when they change; a broken set is refused and the last one serves.
#[test]
fn workload_certificate_from_files_read_again_when_they_change() {
    tern_tests::require_root!();
    let temp = TempFile(std::env::temp_dir().join(unique("certs")));
    let dir = temp.0.clone();
    std::fs::create_dir_all(&dir).unwrap();
    let write = |ca: &TestCa, name: &str| {
        let issued = ca
            .issue(name, &[APP_ID], Duration::from_secs(3600))
            .unwrap();
        std::fs::copy(&issued.cert, dir.join("cert-chain.pem")).unwrap();
        std::fs::copy(&issued.key, dir.join("key.pem")).unwrap();
        std::fs::copy(ca.cert_path(), dir.join("root-cert.pem")).unwrap();
    };
    let dir_str = dir.to_str().unwrap().to_owned();
    let m = mesh_full(&snapshot("1", "null"), &["--cert-dir", &dir_str], |ca| {
        write(ca, "files-1")
    });
    let serial = || m.config_dump()["certificate"]["info"]["serial"].clone();
    assert!(eventually(Duration::from_secs(5), || !serial().is_null()));
    assert!(!m.cp.events().contains("ISSUE"), "no CA call with files");
    let first = serial();
    let out = m.python(&m.p.app, &["plain", SECURE]);
    assert_eq!(out["reply"], format!("{APP_ID} hello"), "{out}");

    write(&m.trust.ca, "files-2");
    assert!(eventually(Duration::from_secs(5), || serial() != first));
    let out = m.python(&m.p.app, &["plain", SECURE]);
    assert_eq!(out["reply"], format!("{APP_ID} hello"), "{out}");

    let second = serial();
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    assert!(eventually(Duration::from_secs(5), || metric(
        &m.p.app,
        r#"tern_tls_certificate_updates_total{source="files",result="failed"}"#
    ) >= 1.0));
    assert_eq!(serial(), second, "the last good certificate keeps serving");
}

/// Identity only from verified peers, and `tls_params` honoured: a chain with no validation
/// context asks for no client certificate, so a self-signed `spiffe://…/sa/admin` is no
/// principal and an ALLOW for it does not let it in; one that requires a certificate it
/// cannot verify refuses its connections; MeshConfig's `minProtocolVersion: TLSV1_3`
/// refuses a TLS 1.2 client.
#[test]
fn identity_only_from_verified_peers_and_tls_params_hold() {
    tern_tests::require_root!();
    const ADMIN_ID: &str = "spiffe://cluster.local/ns/default/sa/admin";
    let allow_admin = format!(
        r#"inbound_rbac:
  - {{ name: "ns[default]-policy[admin]-rule[0]", action: allow, principals: ["{ADMIN_ID}"] }}"#
    );
    let tls = |settings: &str| format!("inbound_tls: {{ {settings} }}\n{allow_admin}");
    let m = mesh_with(
        &snapshot_with(
            "1",
            "strict",
            &tls("unverified: true, require_client_certificate: false"),
        ),
        "1h",
    );
    let _app = tern_tests::serve(&m.p.app, &["10.66.1.1:8080"]).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        m.config_dump()["certificate"]["info"]["sans"][0] == APP_ID
    }));
    let forger = TestCa::new().unwrap();
    let forged = forger
        .issue("admin", &[ADMIN_ID], Duration::from_secs(3600))
        .unwrap();
    let ca = m.trust.ca.ca_str();
    let call = |who: &tern_tests::pki::Issued, extra: &[&str]| {
        let args = [
            &[
                "client",
                "10.66.1.1:8080",
                who.cert_str(),
                who.key_str(),
                &ca,
                "--alpn",
                "istio",
            ][..],
            extra,
        ]
        .concat();
        m.python(&m.p.srv, &args)
    };
    let out = call(&forged, &[]);
    assert!(out.get("reply").is_none(), "{out}\n{}", m.tern.log());
    assert!(
        eventually(Duration::from_secs(5), || m.tern.log().lines().any(|l| l
            .contains("tern::access")
            && l.contains("dst=10.66.1.1:8080")
            && l.contains("peer_identity=\"-\"")
            && l.contains("refused=\"rbac\""))),
        "the forged certificate gave no identity:\n{}",
        m.tern.log()
    );
    // Requiring a certificate nobody can verify: the chain refuses its connections.
    m.cp.push(&snapshot_with(
        "2",
        "strict",
        &tls("unverified: true, require_client_certificate: true"),
    ));
    assert!(m.cp.wait_for("ACK Listener 2"), "{}", m.cp.events());
    let out = call(&forged, &[]);
    assert!(out.get("reply").is_none(), "{out}");
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &m.p.app,
            r#"tern_connections_refused_total{direction="inbound",reason="tls_unusable"}"#
        ) >= 1.0),
        "{}",
        m.tern.log()
    );
    // TLS 1.3 at least: a TLS 1.2 client is refused, a TLS 1.3 one served.
    let admin = m
        .trust
        .ca
        .issue("admin", &[ADMIN_ID], Duration::from_secs(3600))
        .unwrap();
    m.cp.push(&snapshot_with("3", "strict", &tls("min_version: TLSv1_3")));
    assert!(m.cp.wait_for("ACK Listener 3"), "{}", m.cp.events());
    let old = call(&admin, &["--tls12"]);
    assert!(old.get("reply").is_none(), "{old}");
    let new = call(&admin, &[]);
    assert!(
        new["reply"].as_str().unwrap_or("").starts_with("peer="),
        "{new}\n{}",
        m.tern.log()
    );
}

/// Until its workload certificate is in, a tern whose configuration presents one (Istio's
/// auto-mTLS clusters) is not ready: every mTLS connection would fail, so kubelet must not
/// start the application or send it traffic yet. With Istio's CA not answering, the
/// configuration is applied and tern stays unready, saying why; once the CA answers, tern is
/// ready and its mTLS calls go through.
#[test]
fn not_ready_until_the_workload_certificate_is_in() {
    tern_tests::require_root!();
    let p = pods();
    let trust = MeshTrust::new().unwrap();
    let (_servers, log) = mtls_servers(&p, &trust);
    // istiod without its CA: CreateCertificate is not served.
    let with_ca = trust.control_plane_args(APP_ID);
    let without_ca: Vec<String> = with_ca[..with_ca.len() - 4].to_vec();
    assert_eq!(with_ca[with_ca.len() - 4], "--ca");
    let mut cp = Istiod::start(&p.app, ISTIOD, &snapshot("1", "null"), &without_ca).unwrap();
    let args = trust.tern_args("default", "app");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tern = p.spawn_tern_with(&args, "info").unwrap();
    let ready = || tern_tests::admin(&p.app, "GET", "/ready");
    assert!(
        eventually(Duration::from_secs(10), || cp
            .events()
            .contains("ACK Listener 1")
            && tern.log().contains("no certificate from the CA")),
        "{}\n{}",
        cp.events(),
        tern.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        ready().contains("waiting for the workload certificate"),
        "{}",
        ready()
    );
    cp.stop();
    drop(cp);
    let _cp = Istiod::start(&p.app, ISTIOD, &snapshot("1", "null"), &with_ca).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || ready().trim() == "LIVE"),
        "{}\n{}",
        ready(),
        tern.log()
    );
    // The application speaks plaintext to the service; tern originates mTLS with its
    // certificate.
    let out = tern_tests::python_json(&p.app, Some(&p.cgroup), "tls_peer.py", &["plain", SECURE]);
    assert_eq!(out["reply"], format!("{APP_ID} hello"), "{out}");
    let _ = std::fs::remove_file(&log);
}
