//! `tern discovery` as the control plane, with clients it did not write and clients it did:
//! gRPC's own xDS client (grpcio, dialing `xds:///…` with a bootstrap file) and tern
//! sidecars over both ADS protocols, the endpoints from the services file, changed while the
//! clients run.
use std::{path::Path, time::Duration};

use tern_tests::{
    Netns, Phased, Process, ThriftClient,
    discovery::{Bootstrap, Discovery},
    eventually, pods, python_peer, start_server, thrift_serve,
};

const CLA: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn echo_services(ports: &[u16]) -> String {
    let endpoints: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    format!(
        "services:\n  - {{ name: echo, port: 50051, protocol: grpc, endpoints: [{}] }}\n",
        endpoints.join(", ")
    )
}

fn grpc_server(ns: &Netns, port: u16, id: &str) -> Process {
    let script = python_peer("xds_grpc.py");
    let addr = format!("127.0.0.1:{port}");
    start_server(
        ns,
        None,
        Path::new("python3"),
        &[script.to_str().unwrap(), "serve", &addr, id],
    )
    .unwrap()
}

/// A gRPC client of grpcio's own, dialing `xds:///echo` with a bootstrap that points at tern
/// discovery, spreads its calls over the endpoints of the services file, and follows the file
/// when an endpoint is added and another removed; tern discovery lists the client with every
/// type ACKed.
#[test]
fn grpc_clients_dialing_xds_follow_the_services_file() {
    tern_tests::require_root();
    let ns = Netns::new("disc").unwrap();
    let _servers: Vec<Process> = [(50061, "s1"), (50062, "s2"), (50063, "s3")]
        .iter()
        .map(|(port, id)| grpc_server(&ns, *port, id))
        .collect();
    let d = Discovery::start(
        &ns,
        "127.0.0.1:15010",
        "127.0.0.1:15014",
        &echo_services(&[50061, 50062]),
        &[],
    )
    .unwrap();
    let bootstrap = Bootstrap::new("127.0.0.1:15010", "grpc-client-1").unwrap();
    let script = python_peer("xds_grpc.py");
    let mut cmd = ns.command(
        None,
        Path::new("python3"),
        &[
            script.to_str().unwrap(),
            "call",
            "xds:///echo",
            "40",
            "--phases",
            "2",
        ],
    );
    cmd.env("GRPC_XDS_BOOTSTRAP", bootstrap.path_str());
    let mut client = Phased::spawn(cmd).unwrap();
    let first: serde_json::Value = client.read().unwrap();
    assert_eq!(first["errors"], 0, "{first}\n{}", d.tern.log());
    // Round robin, once both subchannels are ready (the first calls may find one).
    assert_spread(&first, &["s1", "s2"]);

    let clients = d.json(&ns, "/debug/syncz");
    let grpc = &clients[0];
    assert_eq!(grpc["node_id"], "grpc-client-1");
    assert!(
        grpc["user_agent"].as_str().unwrap().starts_with("gRPC"),
        "{grpc}"
    );
    let types = grpc["types"].as_object().unwrap();
    assert_eq!(types.len(), 4, "LDS, RDS, CDS, EDS: {grpc}");
    assert!(d.all_in_sync(&ns), "{clients}");

    // s3 added, s1 removed: once the client ACKed the new endpoints, the calls follow.
    let before = d.served_version(&ns, "grpc", CLA, "outbound|50051||echo");
    d.write(&echo_services(&[50062, 50063])).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            d.served_version(&ns, "grpc", CLA, "outbound|50051||echo") != before
                && d.all_in_sync(&ns)
        }),
        "the client did not ACK the new endpoints: {}\n{}",
        d.json(&ns, "/debug/syncz"),
        d.tern.log()
    );
    client.next_phase();
    let second: serde_json::Value = client.read().unwrap();
    assert_eq!(second["errors"], 0, "{second}");
    assert_spread(&second, &["s2", "s3"]);
}

/// 40 calls spread over exactly these servers, each with at least 15.
fn assert_spread(calls: &serde_json::Value, servers: &[&str]) {
    let by = calls["by_server"].as_object().unwrap();
    let mut got: Vec<&str> = by.keys().map(String::as_str).collect();
    got.sort_unstable();
    assert_eq!(got, servers, "{calls}");
    assert!(by.values().all(|n| n.as_u64().unwrap() >= 15), "{calls}");
}

fn calc_services(ports: &[u16]) -> String {
    let endpoints: Vec<String> = ports.iter().map(|p| format!("\"10.66.1.2:{p}\"")).collect();
    format!(
        "services:\n  - {{ name: calc, port: 9090, protocol: thrift, vip: 10.96.0.20, endpoints: [{}] }}\n",
        endpoints.join(", ")
    )
}

/// tern sidecars driven by tern discovery, over state of the world and over delta, balance
/// Thrift per request over the endpoints of the services file, and an endpoint added to the
/// file takes its share on the same client connection.
fn sidecar_balances_thrift(delta: bool) {
    let p = pods();
    let _servers: Vec<Process> = [(9001, "calc-1"), (9002, "calc-2"), (9003, "calc-3")]
        .iter()
        .map(|(port, id)| thrift_serve(&p.srv, &format!("10.66.1.2:{port}"), id).unwrap())
        .collect();
    let d = Discovery::start(
        &p.app,
        "127.0.0.1:15010",
        "127.0.0.1:15014",
        &calc_services(&[9001, 9002]),
        &[],
    )
    .unwrap();
    let extra: &[&str] = if delta { &["--xds-delta"] } else { &[] };
    let tern = p.start_tern_xds(extra, "info").unwrap();
    let mut client = ThriftClient::start(
        &p.app,
        Some(&p.cgroup),
        "10.96.0.20:9090",
        &["--calls", "60", "--phases", "2"],
    )
    .unwrap();
    let first = client.result();
    assert_eq!(
        first.counts(),
        [("calc-1", 30), ("calc-2", 30)],
        "{first:?}\n{}",
        tern.log()
    );
    let sidecar = &d.json(&p.app, "/debug/syncz")[0];
    assert_eq!(sidecar["protocol"], if delta { "delta" } else { "sotw" });
    assert!(d.all_in_sync(&p.app), "{sidecar}");

    d.write(&calc_services(&[9001, 9002, 9003])).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || tern_tests::admin(
            &p.app,
            "GET",
            "/clusters"
        )
        .contains("10.66.1.2:9003")),
        "{}",
        tern.log()
    );
    client.next_phase();
    let second = client.result();
    assert_eq!(
        second.counts(),
        [("calc-1", 20), ("calc-2", 20), ("calc-3", 20)],
        "{second:?}"
    );
}

#[test]
fn tern_sidecars_balance_thrift_from_discovery_over_sotw() {
    sidecar_balances_thrift(false);
}

#[test]
fn tern_sidecars_balance_thrift_from_discovery_over_delta() {
    sidecar_balances_thrift(true);
}
