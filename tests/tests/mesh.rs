//! End to end: the mesh of `tern_tests::mesh` — a node bridge, a control plane serving
//! Istio-shaped resources, a client Pod and three server Pods, every Pod with the real `tern`
//! as its sidecar (eBPF capture, xDS) — and ordinary clients that know only the service's
//! virtual IP. This is the path `cargo xtask demo` shows.
use std::time::Duration;

use tern_tests::{
    ThriftClient, connect, eventually,
    mesh::{CLIENT_ID, CONTROL_PLANE, Control, Mesh, Pod, SERVER_ID, TCP_PORT, THRIFT_PORT, vip},
    serve,
};

fn mesh() -> Mesh {
    Mesh::start(3, &mut |_| {}).expect("the mesh starts")
}

/// The sidecar's access-log lines for connections from `peer_ip` to `dst`.
fn access_lines(pod: &Pod, peer_ip: &str, dst: &str) -> Vec<String> {
    let peer = format!("peer={peer_ip}:");
    pod.access_log(dst)
        .into_iter()
        .filter(|l| l.contains(&peer))
        .collect()
}

/// A client's calls on one connection to the virtual IP spread evenly over the three server
/// Pods, with the client Pod captured by eBPF hooks and no iptables rule; an EDS update that
/// removes a server moves the same connection's calls to the other two.
#[test]
fn thrift_calls_are_balanced_per_request_and_follow_eds() {
    tern_tests::require_root!();
    let m = mesh();
    let (programs, links) = m.client.hooks().unwrap();
    assert_eq!(programs.len(), 6, "cgroup programs: {programs:?}");
    assert_eq!(links, 1, "the sk_lookup link on the client's namespace");
    assert!(m.client.ns.iptables_rules().unwrap().is_empty());
    assert!(
        !m.client
            .sidecar_log()
            .contains(&format!("dst={CONTROL_PLANE}")),
        "the sidecar's own xDS connection went through its capture"
    );

    let mut client = ThriftClient::start(
        &m.client.ns,
        Some(&m.client.cgroup),
        &vip(THRIFT_PORT),
        &["--calls", "300", "--phases", "2"],
    )
    .unwrap();
    let first = client.result();
    assert_eq!(
        first.counts(),
        [("calc-1", 100), ("calc-2", 100), ("calc-3", 100)],
        "{first:?}"
    );
    assert!(first.seq_ok && first.io_error.is_none(), "{first:?}");

    // The client sidecar's pooled connections to calc-2 (from the client Pod's address).
    let calc2 = m.servers.iter().find(|p| p.name == "calc-2").unwrap();
    let from_client = || {
        let filter = format!("( sport = :{THRIFT_PORT} and dst {} )", m.client.ip);
        calc2
            .ns
            .output(
                None,
                std::path::Path::new("ss"),
                &["-Htn", "state", "established", &filter],
            )
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    };
    assert!(from_client() >= 1, "an idle pooled connection to calc-2");

    m.set_endpoints(2, &["calc-1", "calc-3"]).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || from_client() == 0),
        "EDS removed calc-2, and the client sidecar's connections to it stay open"
    );
    client.next_phase();
    let second = client.result();
    assert_eq!(
        second.counts(),
        [("calc-1", 150), ("calc-3", 150)],
        "{second:?}"
    );
    assert!(second.seq_ok && second.io_error.is_none(), "{second:?}");
}

/// Inbound capture on the server side: the server Pod's sidecar receives the connection with
/// the client Pod's own address as its peer (no NAT in between), and hands it to the
/// application from 127.0.0.6, at the address the client's sidecar dialled.
#[test]
fn the_server_sidecar_sees_the_client_pod_address() {
    tern_tests::require_root!();
    let m = mesh();
    let c = connect(&m.client.ns, Some(&m.client.cgroup), &vip(TCP_PORT));
    assert!(c.ok() && c.proxied(), "{c:?}");
    let server_local = c.server_local.clone().unwrap();
    let server = m
        .server_at(&server_local)
        .unwrap_or_else(|| panic!("the connection reached {server_local}, not a server Pod"));
    assert!(
        c.via_inbound_proxy(),
        "the application sees the inbound sidecar's passthrough source: {c:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || !access_lines(
            server,
            &m.client.ip,
            &server_local
        )
        .is_empty()),
        "{}'s sidecar logged no inbound connection from {}:\n{}",
        server.name,
        m.client.ip,
        server.sidecar_log()
    );
    let line = &access_lines(server, &m.client.ip, &server_local)[0];
    assert!(line.contains("inbound"), "{line}");
}

/// One service, two ports: the Thrift port is balanced per request on one connection, the
/// plain TCP port per connection (each connection stays on one server for its lifetime).
#[test]
fn a_thrift_port_and_a_tcp_port_of_one_service_behave_differently() {
    tern_tests::require_root!();
    let m = mesh();
    let thrift = tern_tests::thrift_call(
        &m.client.ns,
        Some(&m.client.cgroup),
        &vip(THRIFT_PORT),
        &["--calls", "30"],
    );
    assert_eq!(
        thrift.counts(),
        [("calc-1", 10), ("calc-2", 10), ("calc-3", 10)],
        "{thrift:?}"
    );

    let mut servers = Vec::new();
    for _ in 0..6 {
        let c = connect(&m.client.ns, Some(&m.client.cgroup), &vip(TCP_PORT));
        assert!(c.ok() && c.proxied(), "{c:?}");
        let local = c.server_local.unwrap();
        servers.push(m.server_at(&local).unwrap().name.clone());
    }
    servers.sort();
    servers.dedup();
    assert_eq!(
        servers,
        ["calc-1", "calc-2", "calc-3"],
        "connections are balanced"
    );

    // Seven connections closed: one Thrift, six TCP; the access log says what handled each.
    assert!(
        eventually(Duration::from_secs(5), || m
            .client
            .sidecar_log()
            .matches("connection closed")
            .count()
            >= 7),
        "{}",
        m.client.sidecar_log()
    );
    let log = m.client.sidecar_log();
    let handled = |port: u16| -> Vec<String> {
        m.client
            .access_log(&vip(port))
            .iter()
            .filter_map(|l| {
                let value = l.split("handled=").nth(1)?.split_whitespace().next()?;
                Some(value.trim_matches('"').to_owned())
            })
            .collect()
    };
    assert_eq!(handled(THRIFT_PORT), ["thrift"], "{log}");
    assert_eq!(handled(TCP_PORT), ["tcp"; 6], "{log}");
}

/// A connection inside the Pod to localhost is the Pod's own business: not captured, in either
/// direction, and the sidecar never sees it.
#[test]
fn pod_local_connections_are_not_captured() {
    tern_tests::require_root!();
    let m = mesh();
    let _local = serve(&m.client.ns, &["127.0.0.1:7070"]).unwrap();
    let c = connect(&m.client.ns, Some(&m.client.cgroup), "127.0.0.1:7070");
    assert!(c.ok(), "{c:?}");
    assert!(
        !c.proxied(),
        "a localhost connection went through the proxy: {c:?}"
    );
    assert_eq!(c.peer.as_deref(), Some("127.0.0.1:7070"));
    assert!(
        tern_tests::capture_counter(&m.client.cgroup, "connect.skipped_loopback") >= 1,
        "the connect hook counted no loopback skip"
    );
    assert!(!m.client.sidecar_log().contains("dst=127.0.0.1:7070"));
}

/// The client's sidecar restarts (SIGTERM, as Kubernetes stops a container, then a new
/// process) while the client keeps calling: the capture stays while it is down, so the
/// client's calls fail (refused, never sent around the sidecar) instead of hanging, and the
/// restarted sidecar takes the same hooks over, once, and the calls succeed again.
#[test]
fn a_client_sidecar_restart_keeps_the_capture_and_traffic_resumes() {
    tern_tests::require_root!();
    let mut m = mesh();
    let before = m.client.hooks().unwrap();
    let mut retrying =
        ThriftClient::retrying(&m.client.ns, Some(&m.client.cgroup), &vip(THRIFT_PORT)).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || retrying.report()["ok"]
            .as_u64()
            .unwrap()
            > 0),
        "the client made no call through the sidecar"
    );

    m.client.stop_sidecar().unwrap();
    let mut stopped = m.client.hooks().unwrap();
    let mut expected = before.clone();
    stopped.0.sort();
    expected.0.sort();
    assert_eq!(
        stopped, expected,
        "the capture stays while the sidecar is down"
    );
    let (_, status, _) = tern_tests::tern(&["capture", "status"]);
    assert!(
        status.contains(m.client.cgroup.path_str()),
        "the client's capture is pinned:\n{status}"
    );
    retrying.report();
    let mut down = serde_json::Value::Null;
    assert!(
        eventually(Duration::from_secs(5), || {
            down = retrying.report();
            down["failed"].as_u64().unwrap() > 0
        }),
        "the client saw no failure while the sidecar was down"
    );
    assert_eq!(
        down["ok"], 0,
        "while the sidecar is down the virtual IP does not answer: {down}"
    );

    m.client.start_sidecar().unwrap();
    let mut after = m.client.hooks().unwrap();
    after.0.sort();
    assert_eq!(
        after, expected,
        "the restarted sidecar attached the same hooks, once"
    );
    let mut seen = serde_json::Map::new();
    let resumed = eventually(Duration::from_secs(10), || {
        let r = retrying.report();
        if let Some(by) = r["by_server"].as_object() {
            seen.extend(by.clone());
        }
        seen.len() == 3
    });
    assert!(
        resumed,
        "calls did not resume over all three servers: {seen:?}\n{}",
        m.client.sidecar_log()
    );
}

/// A DENY for a Thrift method pushed while the client's sidecar holds pooled connections to
/// the server sidecars: no call after the push runs the method, not on a new client
/// connection either (the client's sidecar reusing a pooled connection opened before the push
/// gains nothing: the server sidecar holds it to the policy in force).
#[test]
fn a_method_deny_reaches_pooled_sidecar_connections() {
    tern_tests::require_root!();
    let m = mesh();
    let before = tern_tests::thrift_call(
        &m.client.ns,
        Some(&m.client.cgroup),
        &vip(THRIFT_PORT),
        &["--calls", "30"],
    );
    assert_eq!(before.replies(), 30, "{before:?}");
    m.push_with(
        2,
        r#"inbound_rbac:
  - { name: "ns[default]-policy[deny-whoami]-rule[0]", action: deny, ports: [9090], methods: ["whoami"] }"#,
    )
    .unwrap();
    // A new client connection: none of its calls reaches a server.
    let after = tern_tests::thrift_call(
        &m.client.ns,
        Some(&m.client.cgroup),
        &vip(THRIFT_PORT),
        &["--calls", "30"],
    );
    assert_eq!(after.replies(), 0, "whoami ran after the DENY: {after:?}");
    assert!(
        after
            .app_errors
            .iter()
            .any(|e| e.contains("RBAC: access denied")),
        "{after:?}"
    );
}

/// The mesh in STRICT mutual TLS, the control plane being the CA (what `cargo xtask demo`
/// shows): every sidecar holds the certificate of its own service account; the server
/// sidecars see the client Pod's SPIFFE identity; an AuthorizationPolicy-shaped DENY for one
/// Thrift method refuses that method while the others go through on the same connection; a
/// plaintext client cannot reach a server Pod; Istio's standard series count the calls with
/// both identities.
#[test]
fn an_mtls_mesh_carries_identities_and_enforces_a_method_policy() {
    tern_tests::require_root!();
    let m = Mesh::start_mtls(2, &mut |_| {}).expect("the mesh starts");
    for (pod, id) in [(&m.client, CLIENT_ID), (&m.servers[0], SERVER_ID)] {
        let sans = || {
            let dump: serde_json::Value =
                serde_json::from_str(&pod.admin("GET", "/config_dump")).unwrap();
            dump["certificate"]["info"]["sans"][0].clone()
        };
        assert!(
            eventually(Duration::from_secs(5), || sans() == id),
            "{}: {}",
            pod.name,
            sans()
        );
    }
    let calls = tern_tests::thrift_call(
        &m.client.ns,
        Some(&m.client.cgroup),
        &vip(THRIFT_PORT),
        &["--calls", "40"],
    );
    assert_eq!(
        calls.counts(),
        [("calc-1", 20), ("calc-2", 20)],
        "{calls:?}"
    );
    // What the server sidecar reports: a mutual-TLS connection from the client's identity.
    let server = &m.servers[0];
    let inbound = tern_tests::series_sum(
        &server.admin("GET", "/stats/prometheus"),
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", CLIENT_ID),
            ("destination_principal", SERVER_ID),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(
        inbound >= 1.0,
        "{}",
        server.admin("GET", "/stats/prometheus")
    );
    let dst = format!("{}:{THRIFT_PORT}", server.ip);

    // Plaintext straight to a server Pod (from the client's namespace, not captured).
    let direct = tern_tests::thrift_call(&m.client.ns, None, &dst, &["--calls", "1"]);
    assert_eq!(
        direct.replies(),
        0,
        "plaintext reached a STRICT Pod: {direct:?}"
    );

    m.push_with(
        2,
        r#"inbound_rbac:
  - { name: "ns[default]-policy[deny-echo]-rule[0]", action: deny, ports: [9090], methods: ["echo"] }"#,
    )
    .unwrap();
    let denied = tern_tests::thrift_call(
        &m.client.ns,
        Some(&m.client.cgroup),
        &vip(THRIFT_PORT),
        &["--calls", "4", "--method", "echo"],
    );
    assert_eq!(denied.replies(), 0, "echo ran under the DENY: {denied:?}");
    assert!(
        denied
            .app_errors
            .iter()
            .any(|e| e.contains("RBAC: access denied")),
        "{denied:?}"
    );
    let allowed = tern_tests::thrift_call(
        &m.client.ns,
        Some(&m.client.cgroup),
        &vip(THRIFT_PORT),
        &["--calls", "10"],
    );
    assert_eq!(allowed.replies(), 10, "{allowed:?}");

    let stats = m.client.admin("GET", "/stats/prometheus");
    let series = |code: &str| {
        tern_tests::series_sum(
            &stats,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_principal", CLIENT_ID),
                ("destination_principal", SERVER_ID),
                ("request_protocol", "thrift"),
                ("response_code", code),
            ],
        )
    };
    assert_eq!(series("success"), 50.0, "{stats}");
}

/// The mesh without istiod (what `cargo xtask demo` shows first): `tern discovery` serves the
/// services file; a server Pod's Thrift server stops, tern discovery's health check serves it
/// UNHEALTHY and the client's calls on the same connection avoid it, then return to it.
#[test]
fn a_tern_discovery_mesh_moves_calls_off_a_stopped_server_and_back() {
    tern_tests::require_root!();
    let mut m = Mesh::start_discovery(3, &mut |_| {}).expect("the mesh starts");
    let Control::Discovery(d) = &m.cp else {
        panic!("tern discovery expected");
    };
    assert!(
        eventually(Duration::from_secs(5), || m.discovery_in_sync()),
        "{}",
        d.get(&m.istiod, "/debug/syncz")
    );
    let mut client = ThriftClient::start(
        &m.client.ns,
        Some(&m.client.cgroup),
        &vip(THRIFT_PORT),
        &["--calls", "90", "--phases", "3"],
    )
    .unwrap();
    let first = client.result();
    assert_eq!(
        first.counts(),
        [("calc-1", 30), ("calc-2", 30), ("calc-3", 30)],
        "{first:?}"
    );
    let endpoint = format!("{}:{THRIFT_PORT}", m.servers[1].ip);
    for (running, wanted, expected) in [
        (false, "unhealthy", vec![("calc-1", 45), ("calc-3", 45)]),
        (
            true,
            "healthy",
            vec![("calc-1", 30), ("calc-2", 30), ("calc-3", 30)],
        ),
    ] {
        m.servers[1].set_thrift_server(running).unwrap();
        assert!(eventually(Duration::from_secs(10), || m.verdict(&endpoint) == wanted));
        assert!(eventually(Duration::from_secs(10), || m.discovery_in_sync()));
        client.next_phase();
        let calls = client.result();
        assert_eq!(calls.counts(), expected, "{calls:?}");
        assert!(
            calls.io_error.is_none() && calls.exceptions == 0,
            "{calls:?}"
        );
    }
}
