//! `tern discovery` as the control plane, with clients it did not write and clients it did:
//! gRPC's own xDS client (grpcio, dialing `xds:///…` with a bootstrap file) and tern
//! sidecars over both ADS protocols, the endpoints from the services file, changed while the
//! clients run.
use std::{path::Path, time::Duration};

use tern_tests::{
    Netns, Phased, Process, ThriftClient,
    discovery::{Bootstrap, Discovery},
    eventually, pods, python_json, python_peer, serial_thrift_serve, start_server, thrift_serve,
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
    tern_tests::require_root!();
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

/// Thrift servers `calc-1`… at 10.66.1.2:9001… in the server namespace.
fn calc_servers(p: &tern_tests::Pods, n: u16) -> Vec<Process> {
    (1..=n)
        .map(|i| {
            thrift_serve(
                &p.srv,
                &format!("10.66.1.2:{}", 9000 + i),
                &format!("calc-{i}"),
            )
            .unwrap()
        })
        .collect()
}

/// A client in the application Pod making `phases` rounds of 60 calls to `calc`'s virtual IP.
fn calc_client(p: &tern_tests::Pods, phases: u32) -> ThriftClient {
    let phases = phases.to_string();
    ThriftClient::start(
        &p.app,
        Some(&p.cgroup),
        "10.96.0.20:9090",
        &["--calls", "60", "--phases", &phases],
    )
    .unwrap()
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
    let _servers: Vec<Process> = calc_servers(&p, 3);
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
    let mut client = calc_client(&p, 2);
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
    tern_tests::require_root!();
    sidecar_balances_thrift(false);
}

#[test]
fn tern_sidecars_balance_thrift_from_discovery_over_delta() {
    tern_tests::require_root!();
    sidecar_balances_thrift(true);
}

/// A Thrift service the services file opts in to multiplexed connections, 2 per endpoint: tern
/// sidecars share that many connections per endpoint for its calls, where the same calls to a
/// service without the opt-in take a connection each.
#[test]
fn a_service_can_opt_in_to_multiplexed_connections() {
    tern_tests::require_root!();
    let p = pods();
    let _servers: Vec<Process> = calc_servers(&p, 3);
    let endpoints = "[10.66.1.2:9001, 10.66.1.2:9002, 10.66.1.2:9003]";
    let services = format!(
        "services:\n  - {{ name: calc, port: 9090, protocol: thrift, vip: 10.96.0.20, endpoints: \
         {endpoints} }}\n  - {{ name: calc-mux, port: 9090, protocol: thrift, vip: 10.96.0.21, \
         thrift_upstream: multiplexed, connections_per_endpoint: 2, endpoints: {endpoints} }}\n"
    );
    let _d =
        Discovery::start(&p.app, "127.0.0.1:15010", "127.0.0.1:15014", &services, &[]).unwrap();
    let tern = p.start_tern_xds(&[], "info").unwrap();
    let mut opened = Vec::new();
    for (vip, name, mode, per_endpoint) in [
        ("10.96.0.20:9090", "calc", "exclusive", 4),
        ("10.96.0.21:9090", "calc-mux", "multiplexed", 2),
    ] {
        let cluster = format!("outbound|9090||{name}");
        let served = || {
            let clusters: serde_json::Value =
                serde_json::from_str(&tern_tests::admin(&p.app, "GET", "/clusters")).unwrap();
            clusters["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == cluster.as_str())
                .map(|c| {
                    (
                        c["thrift_upstream"].clone(),
                        c["connections_per_endpoint"].clone(),
                        c["endpoints"].as_array().unwrap().len(),
                    )
                })
        };
        assert!(
            eventually(Duration::from_secs(5), || served()
                == Some((mode.into(), per_endpoint.into(), 3))),
            "{cluster}: {:?}\n{}",
            served(),
            tern.log()
        );
        // 300 calls pipelined on one connection, each answered (the servers know no such
        // method: a TApplicationException each).
        let calls = python_json(
            &p.app,
            Some(&p.cgroup),
            "protocols_peer.py",
            &["names", vip, "300"],
        );
        assert_eq!(calls["replies"], 300, "{name}: {calls}\n{}", tern.log());
        let exposition = tern_tests::admin(&p.app, "GET", "/stats/prometheus");
        opened.push(tern_tests::series_sum(
            &exposition,
            "tern_upstream_connections_total",
            &[("cluster", &cluster)],
        ));
    }
    eprintln!("connections opened: {opened:?} (exclusive, multiplexed)");
    // One client connection is served by one worker: at most 2 connections per endpoint.
    assert!(opened[1] >= 3.0 && opened[1] <= 6.0, "{opened:?}");
    assert!(opened[0] > 2.0 * opened[1], "{opened:?}");
}

fn checked_services() -> String {
    "services:
  - name: calc
    port: 9090
    protocol: thrift
    vip: 10.96.0.20
    endpoints: [\"10.66.1.2:9001\", \"10.66.1.2:9002\", \"10.66.1.2:9003\"]
    health_check:
      interval: 0.2s
      timeout: 0.2s
      interval_jitter: 0.05s
      healthy_threshold: 1
      unhealthy_threshold: 2
      thrift_health_check: { method_name: whoami, transport: FRAMED, protocol: BINARY }
"
    .to_owned()
}

/// A Thrift server (Apache Thrift's serial `TThreadedServer`) that hangs (accepts, never
/// answers) is marked unhealthy by tern discovery's Thrift health check within its thresholds, the tern sidecar stops sending it
/// requests (none of the client's calls is lost to it), and it takes its share again once a
/// working server is back at its address.
#[test]
fn a_hung_thrift_server_is_checked_out_and_back_in() {
    tern_tests::require_root!();
    let p = pods();
    // calc-3 is Apache Thrift's serial `TThreadedServer`, as most production servers are.
    let mut calc3 = Some(serial_thrift_serve(&p.srv, "10.66.1.2:9003", "calc-3").unwrap());
    let _servers: Vec<Process> = calc_servers(&p, 2);
    let d = Discovery::start(
        &p.app,
        "127.0.0.1:15010",
        "127.0.0.1:15014",
        &checked_services(),
        &[],
    )
    .unwrap();
    let tern = p.start_tern_xds(&[], "info").unwrap();
    let all_healthy = || {
        ["10.66.1.2:9001", "10.66.1.2:9002", "10.66.1.2:9003"]
            .iter()
            .all(|a| d.verdict(&p.app, a) == "healthy")
    };
    assert!(
        eventually(Duration::from_secs(5), all_healthy),
        "{}",
        d.get(&p.app, "/debug/health")
    );
    assert!(eventually(Duration::from_secs(5), || d.all_in_sync(&p.app)));
    let mut client = calc_client(&p, 3);
    let first = client.result();
    assert_eq!(
        first.counts(),
        [("calc-1", 20), ("calc-2", 20), ("calc-3", 20)],
        "{first:?}"
    );

    // calc-3 hangs.
    let eds = || d.served_version(&p.app, "sidecar", CLA, "outbound|9090||calc");
    let before = eds();
    drop(calc3.take());
    let hung = tern_tests::hung_server(&p.srv, "10.66.1.2:9003").unwrap();
    let hung_at = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || d
            .verdict(&p.app, "10.66.1.2:9003")
            == "unhealthy"),
        "{}",
        d.get(&p.app, "/debug/health")
    );
    let detected = hung_at.elapsed();
    eprintln!("the hung server was marked unhealthy after {detected:?}");
    // Two failed checks: within two intervals, two timeouts and the jitter (and a margin).
    assert!(
        detected < Duration::from_millis(1500),
        "marked unhealthy after {detected:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || eds() != before
            && d.all_in_sync(&p.app)),
        "{}",
        d.get(&p.app, "/debug/syncz")
    );
    client.next_phase();
    let second = client.result();
    assert_eq!(
        second.counts(),
        [("calc-1", 30), ("calc-2", 30)],
        "{second:?}\n{}",
        tern.log()
    );
    assert!(
        second.io_error.is_none() && second.exceptions == 0,
        "{second:?}"
    );

    // A working calc-3 is back.
    let unhealthy = eds();
    drop(hung);
    let _calc3 = serial_thrift_serve(&p.srv, "10.66.1.2:9003", "calc-3").unwrap();
    assert!(
        eventually(Duration::from_secs(5), all_healthy),
        "{}",
        d.get(&p.app, "/debug/health")
    );
    assert!(eventually(Duration::from_secs(5), || eds() != unhealthy
        && d.all_in_sync(&p.app)));
    client.next_phase();
    let third = client.result();
    assert_eq!(
        third.counts(),
        [("calc-1", 20), ("calc-2", 20), ("calc-3", 20)],
        "{third:?}"
    );
}

/// The services file defines `calc` (its virtual IP and health check); etcd lists its
/// instances as Kitex registers them.
fn kitex_calc() -> String {
    "services:
  - name: calc
    port: 9090
    protocol: thrift
    vip: 10.96.0.20
    health_check:
      interval: 0.2s
      timeout: 0.2s
      healthy_threshold: 1
      unhealthy_threshold: 2
      thrift_health_check: { method_name: whoami }
"
    .to_owned()
}

/// tern sidecars balance Thrift per request over instances registered in a real etcd in
/// CloudWeGo Kitex's layout (keys held by leases); a new instance takes its share; a dead one
/// is checked out by the health check at once and leaves the registry when its lease expires;
/// malformed entries are skipped and counted; and when etcd goes away the last endpoints stay
/// served, the source marked stale.
#[test]
fn tern_sidecars_balance_over_instances_registered_in_etcd() {
    tern_tests::require_root!();
    let p = pods();
    let mut etcd = tern_tests::registry::Etcd::start(&p.app, 23790).unwrap();
    let mut servers: Vec<Process> = calc_servers(&p, 3);
    let _calc1 = etcd.register_kitex("calc", "10.66.1.2:9001", 2).unwrap();
    let _calc2 = etcd.register_kitex("calc", "10.66.1.2:9002", 2).unwrap();
    let d = Discovery::start(
        &p.app,
        "127.0.0.1:15010",
        "127.0.0.1:15014",
        &kitex_calc(),
        &["--etcd", &etcd.url],
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || d
            .verdict(&p.app, "10.66.1.2:9002")
            == "healthy"),
        "{}\n{}",
        d.get(&p.app, "/debug/health"),
        d.tern.log()
    );
    let tern = p.start_tern_xds(&[], "info").unwrap();
    let mut client = calc_client(&p, 4);
    let first = client.result();
    assert_eq!(
        first.counts(),
        [("calc-1", 30), ("calc-2", 30)],
        "{first:?}\n{}",
        tern.log()
    );

    // A third instance registers.
    let calc3 = etcd.register_kitex("calc", "10.66.1.2:9003", 2).unwrap();
    let in_sidecar = |addr: &str| tern_tests::admin(&p.app, "GET", "/clusters").contains(addr);
    assert!(
        eventually(Duration::from_secs(5), || d
            .verdict(&p.app, "10.66.1.2:9003")
            == "healthy"
            && in_sidecar("10.66.1.2:9003")
            && d.all_in_sync(&p.app)),
        "{}",
        d.get(&p.app, "/debug/health")
    );
    client.next_phase();
    let second = client.result();
    assert_eq!(
        second.counts(),
        [("calc-1", 20), ("calc-2", 20), ("calc-3", 20)],
        "{second:?}"
    );

    // calc-3 dies: its process, and with it the lease's renewals. The health check sees it
    // first; the registry forgets it when the lease expires (2 s).
    let died = std::time::Instant::now();
    drop(servers.remove(2));
    drop(calc3);
    assert!(eventually(Duration::from_secs(3), || d
        .verdict(&p.app, "10.66.1.2:9003")
        == "unhealthy"));
    let checked_out = died.elapsed();
    assert!(
        eventually(Duration::from_secs(6), || !d
            .get(&p.app, "/debug/health")
            .contains("9003")),
        "the lease never expired: {}",
        d.get(&p.app, "/debug/health")
    );
    let lease_gone = died.elapsed();
    eprintln!(
        "a dead instance: checked out after {checked_out:?}, out of the registry after {lease_gone:?}"
    );
    assert!(checked_out < lease_gone, "{checked_out:?} {lease_gone:?}");
    assert!(eventually(Duration::from_secs(5), || !in_sidecar(
        "10.66.1.2:9003"
    ) && d
        .all_in_sync(&p.app)));
    client.next_phase();
    let third = client.result();
    assert_eq!(
        third.counts(),
        [("calc-1", 30), ("calc-2", 30)],
        "{third:?}"
    );

    // Malformed entries: skipped and counted, the service untouched.
    etcd.put("kitex/registry-etcd/calc/10.66.1.2:9999", "{not json", None)
        .unwrap();
    etcd.put(
        "kitex/registry-etcd/calc/db.example:9090",
        r#"{"network":"tcp","address":"db.example:9090","weight":1}"#,
        None,
    )
    .unwrap();
    let etcd_source = || {
        d.json(&p.app, "/debug/sources")
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|s| s["name"] == "etcd:kitex/registry-etcd")
                    .cloned()
            })
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(5), || etcd_source()["skipped_total"]
            .as_u64()
            >= Some(2)),
        "{}",
        etcd_source()
    );
    assert_eq!(etcd_source()["endpoints"], 2, "{}", etcd_source());

    // etcd goes away: stale, the last endpoints still served.
    etcd.stop();
    assert!(
        eventually(Duration::from_secs(10), || etcd_source()["state"]
            == "stale"),
        "{}",
        etcd_source()
    );
    client.next_phase();
    let fourth = client.result();
    assert_eq!(
        fourth.counts(),
        [("calc-1", 30), ("calc-2", 30)],
        "{fourth:?}"
    );
    assert!(
        d.get(&p.app, "/metrics")
            .contains("tern_discovery_source_stale{source=\"etcd:kitex/registry-etcd\"} 1"),
        "{}",
        d.get(&p.app, "/metrics")
    );
}

/// A serverset member joined with kazoo, holding its ZooKeeper session until dropped.
fn join_serverset(ns: &Netns, zk: &str, path: &str, addr: &str, status: &str) -> Process {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = python_peer("serverset.py");
    start_server(
        ns,
        None,
        Path::new("python3"),
        &[
            script.to_str().unwrap(),
            "join",
            zk,
            path,
            host,
            port,
            status,
            "2",
        ],
    )
    .unwrap()
}

/// tern sidecars driven by tern discovery over delta balance Thrift per request over
/// Finagle/Aurora serverset members in a real ZooKeeper (joined by kazoo, Python's client):
/// only ALIVE members, a host name resolved, a malformed member skipped and counted; a new
/// member takes its share; a member whose process dies leaves when its session expires; when
/// ZooKeeper goes away the last endpoints stay served, the source marked stale.
#[test]
fn tern_sidecars_balance_over_serverset_members_in_zookeeper() {
    tern_tests::require_root!();
    let p = pods();
    let mut zk = tern_tests::registry::Zookeeper::start(&p.app, 21810).unwrap();
    let _servers: Vec<Process> = calc_servers(&p, 3);
    let path = "/aurora/www-data/prod/calc";
    let _m1 = join_serverset(&p.app, &zk.hosts, path, "10.66.1.2:9001", "ALIVE");
    let _m2 = join_serverset(&p.app, &zk.hosts, path, "10.66.1.2:9002", "ALIVE");
    let _stopping = join_serverset(&p.app, &zk.hosts, path, "10.66.1.2:9003", "STOPPING");
    let serverset = format!("calc={path}");
    let d = Discovery::start(
        &p.app,
        "127.0.0.1:15010",
        "127.0.0.1:15014",
        "services:\n  - { name: calc, port: 9090, protocol: thrift, vip: 10.96.0.20 }\n",
        &[
            "--zookeeper",
            &zk.hosts,
            "--serverset",
            &serverset,
            "--zookeeper-session-ms",
            "2000",
        ],
    )
    .unwrap();
    let source = || {
        d.json(&p.app, "/debug/sources")
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|s| {
                        s["name"]
                            .as_str()
                            .is_some_and(|n| n.starts_with("zookeeper:"))
                    })
                    .cloned()
            })
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(5), || source()["endpoints"] == 2),
        "{}\n{}",
        source(),
        d.tern.log()
    );
    assert!(
        source()["skipped_total"].as_u64() >= Some(1),
        "the STOPPING member: {}",
        source()
    );
    let tern = p.start_tern_xds(&["--xds-delta"], "info").unwrap();
    let mut client = calc_client(&p, 4);
    let first = client.result();
    assert_eq!(
        first.counts(),
        [("calc-1", 30), ("calc-2", 30)],
        "{first:?}\n{}",
        tern.log()
    );

    // A member announcing a host name (as Aurora does), and a malformed one.
    let named = join_serverset(&p.app, &zk.hosts, path, "localhost:9003", "ALIVE");
    let script = python_peer("serverset.py");
    p.app
        .output(
            None,
            Path::new("python3"),
            &[
                script.to_str().unwrap(),
                "put",
                &zk.hosts,
                &format!("{path}/member_0000009999"),
                "{not json",
            ],
        )
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || source()["endpoints"] == 3
            && source()["skipped_total"].as_u64() >= Some(2)),
        "{}",
        source()
    );
    assert!(
        d.get(&p.app, "/debug/config_dump")
            .contains("outbound|9090||calc"),
        "the service is served"
    );
    drop(named);

    // calc-2's process dies: its member leaves when its session (2 s) expires.
    let in_sidecar = |addr: &str| tern_tests::admin(&p.app, "GET", "/clusters").contains(addr);
    assert!(eventually(Duration::from_secs(8), || source()["endpoints"] == 2));
    let died = std::time::Instant::now();
    drop(_m2);
    assert!(
        eventually(Duration::from_secs(10), || source()["endpoints"] == 1),
        "{}",
        source()
    );
    eprintln!(
        "a dead member left the serverset after {:?}",
        died.elapsed()
    );
    assert!(eventually(Duration::from_secs(5), || !in_sidecar(
        "10.66.1.2:9002"
    ) && d
        .all_in_sync(&p.app)));
    client.next_phase();
    let second = client.result();
    assert_eq!(second.counts(), [("calc-1", 60)], "{second:?}");

    // A new member joins.
    let _m3 = join_serverset(&p.app, &zk.hosts, path, "10.66.1.2:9002", "ALIVE");
    assert!(eventually(Duration::from_secs(5), || in_sidecar(
        "10.66.1.2:9002"
    ) && d
        .all_in_sync(&p.app)));
    client.next_phase();
    let third = client.result();
    assert_eq!(
        third.counts(),
        [("calc-1", 30), ("calc-2", 30)],
        "{third:?}"
    );

    // ZooKeeper goes away: stale, the last endpoints still served.
    zk.stop();
    assert!(
        eventually(Duration::from_secs(10), || source()["state"] == "stale"),
        "{}",
        source()
    );
    client.next_phase();
    let fourth = client.result();
    assert_eq!(
        fourth.counts(),
        [("calc-1", 30), ("calc-2", 30)],
        "{fourth:?}"
    );
}

/// One run of `xds_raw.py ARGS…` in `ns` that prints one JSON line: that line.
fn raw_once(ns: &Netns, args: &[&str]) -> serde_json::Value {
    let script = python_peer("xds_raw.py");
    let out = ns
        .output(
            None,
            Path::new("python3"),
            &[&[script.to_str().unwrap()][..], args].concat(),
        )
        .unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"))
}

/// A client of the test's own making (Envoy's protos and grpcio, not tern's code).
fn raw_client(ns: &Netns, mode: &str) -> Phased {
    let script = python_peer("xds_raw.py");
    Phased::spawn(ns.command(
        None,
        Path::new("python3"),
        &[script.to_str().unwrap(), mode, "127.0.0.1:15010"],
    ))
    .unwrap()
}

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// A client that NACKs is recorded with its error, its last ACKed version stays the one it
/// applied, and the refused resources are not sent to it again until they change (no NACK
/// loop, as go-control-plane's SotW cache has).
#[test]
fn a_nack_is_recorded_and_never_counted_as_applied() {
    tern_tests::require_root!();
    let ns = Netns::new("disc").unwrap();
    let d = Discovery::start(
        &ns,
        "127.0.0.1:15010",
        "127.0.0.1:15014",
        &echo_services(&[50061]),
        &[],
    )
    .unwrap();
    let mut client = raw_client(&ns, "nack");
    let first: serde_json::Value = client.read().unwrap();
    let good = first["version"].as_str().unwrap().to_owned();
    let cds = || d.json(&ns, "/debug/syncz")[0]["types"][CDS].clone();
    assert!(
        eventually(Duration::from_secs(3), || cds()["acked_version"]
            == good.as_str()),
        "{}",
        cds()
    );

    d.write(&echo_services(&[50061, 50062]).replace("echo", "echo2"))
        .unwrap();
    client.next_phase();
    let nacked: serde_json::Value = client.read().unwrap();
    let refused = nacked["version"].as_str().unwrap().to_owned();
    assert_ne!(refused, good);
    assert!(
        eventually(Duration::from_secs(3), || cds()["last_nack"]["version"]
            == refused.as_str()),
        "{}",
        cds()
    );
    let status = cds();
    assert_eq!(
        status["acked_version"],
        good.as_str(),
        "a NACKed version never counts: {status}"
    );
    assert_eq!(status["sent_version"], refused.as_str());
    assert_eq!(status["last_nack"]["message"], "refused by the test client");
    // The same, as Envoy's CSDS stubs read it.
    let csds = raw_once(&ns, &["csds", "127.0.0.1:15010"]);
    let cds_status = &csds["raw-client"][CDS];
    assert_eq!(cds_status["config_status"], "ERROR", "{csds}");
    assert_eq!(cds_status["client_status"], "NACKED", "{csds}");
    assert_eq!(cds_status["error"], "refused by the test client", "{csds}");
    assert_eq!(
        cds_status["version"],
        good.as_str(),
        "the version it still runs: {csds}"
    );
    client.next_phase();
    let after: serde_json::Value = client.read().unwrap();
    assert_eq!(
        after["resent"], false,
        "the refused clusters were sent again: {after}"
    );
    assert!(
        d.get(&ns, "/metrics")
            .contains("tern_discovery_nacks_total 1"),
        "{}",
        d.get(&ns, "/metrics")
    );
}

/// A delta client that reconnects with `initial_resource_versions` is sent only what changed
/// while it was away: the changed cluster, and the removed one in `removed_resources`.
#[test]
fn a_reconnecting_delta_client_gets_only_what_changed() {
    tern_tests::require_root!();
    let ns = Netns::new("disc").unwrap();
    let three = "services:
  - { name: a, port: 1, endpoints: [\"127.0.0.1:1\"] }
  - { name: b, port: 2, endpoints: [\"127.0.0.1:2\"] }
  - { name: c, port: 3, endpoints: [\"127.0.0.1:3\"] }
";
    let d = Discovery::start(&ns, "127.0.0.1:15010", "127.0.0.1:15014", three, &[]).unwrap();
    let mut client = raw_client(&ns, "delta");
    let first: serde_json::Value = client.read().unwrap();
    assert!(
        first["resources"]
            .as_object()
            .unwrap()
            .contains_key("outbound|2||b"),
        "{first}"
    );
    // While it is away: b's policy changes, c goes.
    let before = d.served_version(&ns, "sidecar", CDS, "outbound|2||b");
    d.write(
        "services:
  - { name: a, port: 1, endpoints: [\"127.0.0.1:1\"] }
  - { name: b, port: 2, lb: random, endpoints: [\"127.0.0.1:2\"] }
",
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(3), || d.served_version(
        &ns,
        "sidecar",
        CDS,
        "outbound|2||b"
    ) != before));
    client.next_phase();
    let second: serde_json::Value = client.read().unwrap();
    assert_eq!(
        second["resources"],
        serde_json::json!(["outbound|2||b"]),
        "{second}"
    );
    assert_eq!(
        second["removed"],
        serde_json::json!(["outbound|3||c"]),
        "{second}"
    );
}

/// A grpcio client dialing `xds:///<service>`, making 40 calls per phase.
fn grpc_client(ns: &Netns, bootstrap: &Bootstrap, target: &str) -> Phased {
    let script = python_peer("xds_grpc.py");
    let mut cmd = ns.command(
        None,
        Path::new("python3"),
        &[
            script.to_str().unwrap(),
            "call",
            target,
            "40",
            "--phases",
            "2",
        ],
    );
    cmd.env("GRPC_XDS_BOOTSTRAP", bootstrap.path_str());
    Phased::spawn(cmd).unwrap()
}

/// The endpoints tern discovery serves for `service`, by address.
fn served(d: &Discovery, ns: &Netns, service: &str) -> Vec<String> {
    let all = d.json(ns, "/debug/endpoints");
    let mut out: Vec<String> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["address"].as_str().map(str::to_owned))
        .collect();
    out.sort();
    out
}

/// Calls `xds:///<service>` over two phases: first over s1 and s2; between them `change`
/// makes the registry hold s1 and s3, and once every client ACKed that, the calls follow.
fn follow(d: &Discovery, ns: &Netns, bootstrap: &Bootstrap, service: &str, change: impl FnOnce()) {
    let mut client = grpc_client(ns, bootstrap, &format!("xds:///{service}"));
    let first: serde_json::Value = client.read().unwrap();
    assert_eq!(first["errors"], 0, "{service}: {first}");
    assert_spread(&first, &["s1", "s2"]);
    change();
    assert!(
        eventually(Duration::from_secs(8), || served(d, ns, service)
            == ["127.0.0.1:50061", "127.0.0.1:50063"]
            && d.all_in_sync(ns)),
        "{service}: {:?}\n{}",
        served(d, ns, service),
        d.get(ns, "/debug/sources")
    );
    client.next_phase();
    let second: serde_json::Value = client.read().unwrap();
    assert_eq!(second["errors"], 0, "{service}: {second}");
    assert_spread(&second, &["s1", "s3"]);
}

/// gRPC's own xDS client calls services whose endpoints come from each registry in turn —
/// etcd (Kitex's layout, leases) and ZooKeeper (serversets) — and follows an instance that
/// joins and one that leaves (when its lease or its session expires, 2 s).
#[test]
fn grpc_clients_follow_etcd_and_zookeeper() {
    tern_tests::require_root!();
    let ns = Netns::new("disc").unwrap();
    let etcd = tern_tests::registry::Etcd::start(&ns, 23790).unwrap();
    let zk = tern_tests::registry::Zookeeper::start(&ns, 21810).unwrap();
    let _servers: Vec<Process> = [(50061, "s1"), (50062, "s2"), (50063, "s3")]
        .iter()
        .map(|(port, id)| grpc_server(&ns, *port, id))
        .collect();
    let _k1 = etcd.register_kitex("kecho", "127.0.0.1:50061", 2).unwrap();
    let k2 = etcd.register_kitex("kecho", "127.0.0.1:50062", 2).unwrap();
    let path = "/aurora/grpc/prod/zecho";
    let _z1 = join_serverset(&ns, &zk.hosts, path, "127.0.0.1:50061", "ALIVE");
    let z2 = join_serverset(&ns, &zk.hosts, path, "127.0.0.1:50062", "ALIVE");
    let serverset = format!("zecho={path}");
    let d = Discovery::start(
        &ns,
        "127.0.0.1:15010",
        "127.0.0.1:15014",
        "",
        &[
            "--etcd",
            &etcd.url,
            "--zookeeper",
            &zk.hosts,
            "--serverset",
            &serverset,
        ],
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || served(&d, &ns, "kecho").len()
            == 2
            && served(&d, &ns, "zecho").len() == 2),
        "{}",
        d.get(&ns, "/debug/endpoints")
    );
    let bootstrap = Bootstrap::new("127.0.0.1:15010", "grpc-client-2").unwrap();
    let mut k3 = None;
    follow(&d, &ns, &bootstrap, "kecho", || {
        k3 = Some(etcd.register_kitex("kecho", "127.0.0.1:50063", 2).unwrap());
        drop(k2);
    });
    let mut z3 = None;
    follow(&d, &ns, &bootstrap, "zecho", || {
        z3 = Some(join_serverset(
            &ns,
            &zk.hosts,
            path,
            "127.0.0.1:50063",
            "ALIVE",
        ));
        drop(z2);
    });
}

/// xDS over TLS with client certificates verified against a root: gRPC's client (bootstrap
/// `tls` credentials) and a tern sidecar (`https`, its client certificate) are served; a
/// client without a certificate, or trusting another root, is refused.
#[test]
fn xds_over_tls_requires_client_certificates() {
    tern_tests::require_root!();
    let p = pods();
    let ca = tern_tests::pki::TestCa::new().unwrap();
    let hour = Duration::from_secs(3600);
    let server = ca
        .issue("xds", &["xds.tern.local", "127.0.0.1"], hour)
        .unwrap();
    let client = ca
        .issue(
            "client",
            &["spiffe://cluster.local/ns/default/sa/grpc"],
            hour,
        )
        .unwrap();
    let _s1 = grpc_server(&p.app, 50061, "s1");
    let ca_path = ca.ca_str();
    let d = Discovery::start(
        &p.app,
        "127.0.0.1:15012",
        "127.0.0.1:15014",
        &echo_services(&[50061]),
        &[
            "--tls-cert",
            server.cert_str(),
            "--tls-key",
            server.key_str(),
            "--client-ca",
            &ca_path,
        ],
    )
    .unwrap();

    let bootstrap = Bootstrap::tls(
        "127.0.0.1:15012",
        "grpc-tls",
        &ca_path,
        client.cert_str(),
        client.key_str(),
    )
    .unwrap();
    let mut calls = grpc_client(&p.app, &bootstrap, "xds:///echo");
    let first: serde_json::Value = calls.read().unwrap();
    assert_eq!(first["by_server"]["s1"], 40, "{first}\n{}", d.tern.log());

    let probe =
        |args: &[&str]| raw_once(&p.app, &[&["probe", "127.0.0.1:15012"][..], args].concat());
    assert_eq!(
        probe(&[&ca_path, client.cert_str(), client.key_str()])["ok"],
        true
    );
    let anonymous = probe(&[&ca_path]);
    assert_eq!(
        anonymous["ok"], false,
        "served without a client certificate: {anonymous}"
    );
    let other = tern_tests::pki::TestCa::new().unwrap();
    let stranger = other
        .issue("stranger", &["spiffe://elsewhere/sa/x"], hour)
        .unwrap();
    let refused = probe(&[&ca_path, stranger.cert_str(), stranger.key_str()]);
    assert_eq!(
        refused["ok"], false,
        "served a certificate of another root: {refused}"
    );

    let tern = p
        .start_tern_with(
            &[
                "--xds-address",
                "https://127.0.0.1:15012",
                "--xds-ca",
                &ca_path,
                "--xds-server-name",
                "xds.tern.local",
                "--xds-client-cert",
                client.cert_str(),
                "--xds-client-key",
                client.key_str(),
                "--inbound-ports",
                "",
            ],
            "info",
        )
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || d
            .json(&p.app, "/debug/syncz")
            .as_array()
            .is_some_and(|all| all.iter().any(|c| c["node_id"]
                .as_str()
                .is_some_and(|n| n.starts_with("sidecar~"))))),
        "{}\n{}",
        d.get(&p.app, "/debug/syncz"),
        tern.log()
    );
}

/// A restarted tern discovery serves the same names and versions for the same input, so a
/// sidecar that reconnects to it rebuilds nothing: its wildcard types are not even resent,
/// and the endpoints it is resent are the ones it holds.
#[test]
fn a_restarted_discovery_makes_no_client_rebuild() {
    tern_tests::require_root!();
    let p = pods();
    let _servers: Vec<Process> = calc_servers(&p, 2);
    let services = calc_services(&[9001, 9002]);
    let d = Discovery::start(&p.app, "127.0.0.1:15010", "127.0.0.1:15014", &services, &[]).unwrap();
    let tern = p.start_tern_xds(&[], "info").unwrap();
    let dump = d.json(&p.app, "/debug/config_dump");
    let metric = |name: &str| tern_tests::metric(&p.app, name);
    assert!(eventually(Duration::from_secs(5), || d.all_in_sync(&p.app)));
    let applies = metric("tern_xds_apply_seconds_count");
    let reconnects = metric("tern_xds_reconnects_total");
    drop(d);

    let d = Discovery::start(&p.app, "127.0.0.1:15010", "127.0.0.1:15014", &services, &[]).unwrap();
    assert_eq!(
        d.json(&p.app, "/debug/config_dump"),
        dump,
        "names and versions differ after a restart"
    );
    assert!(
        eventually(Duration::from_secs(10), || metric(
            "tern_xds_reconnects_total"
        ) > reconnects
            && d.all_in_sync(&p.app)),
        "{}",
        tern.log()
    );
    let sidecar = d.json(&p.app, "/debug/syncz")[0].clone();
    let sent = |t: &str| sidecar["types"][t]["responses"].as_u64().unwrap_or(0);
    assert_eq!(
        sent(CDS),
        0,
        "clusters resent to a client holding them: {sidecar}"
    );
    assert_eq!(
        sent("type.googleapis.com/envoy.config.listener.v3.Listener"),
        0,
        "{sidecar}"
    );
    assert_eq!(
        metric("tern_xds_apply_seconds_count"),
        applies,
        "the sidecar rebuilt its configuration"
    );
    let calls = tern_tests::thrift_call(
        &p.app,
        Some(&p.cgroup),
        "10.96.0.20:9090",
        &["--calls", "20"],
    );
    assert_eq!(
        calls.counts(),
        [("calc-1", 10), ("calc-2", 10)],
        "{calls:?}"
    );
}

/// CDS, EDS, LDS and RDS are also served as their own services (for bootstraps that name them
/// instead of ADS): a CDS stream, an EDS fetch, and a type asked of the wrong service refused.
#[test]
fn the_per_type_services_serve_their_type() {
    tern_tests::require_root!();
    let ns = Netns::new("disc").unwrap();
    let d = Discovery::start(
        &ns,
        "127.0.0.1:15010",
        "127.0.0.1:15014",
        &echo_services(&[50061, 50062]),
        &[],
    )
    .unwrap();
    let r = raw_once(
        &ns,
        &["per-type", "127.0.0.1:15010", "outbound|50051||echo"],
    );
    assert_eq!(
        r["clusters"],
        3,
        "echo, and the two passthrough clusters: {r}\n{}",
        d.tern.log()
    );
    assert_eq!(r["endpoints"], 1, "{r}");
    assert!(
        r["wrong_type"]
            .as_str()
            .unwrap_or_default()
            .contains("INVALID_ARGUMENT"),
        "{r}"
    );
}

/// A flood is refused visibly and costs nothing it should not: streams past `--max-clients`
/// end with RESOURCE_EXHAUSTED at once, and so does a stream asking for too many types or
/// names; the clients already served are served on.
#[test]
fn streams_past_the_limits_are_refused_and_the_server_serves_on() {
    tern_tests::require_root!();
    let ns = Netns::new("disc").unwrap();
    let d = Discovery::start(
        &ns,
        "127.0.0.1:15010",
        "127.0.0.1:15014",
        &echo_services(&[50061]),
        &["--max-clients", "4"],
    )
    .unwrap();
    let r = raw_once(&ns, &["flood", "127.0.0.1:15010", "7"]);
    assert_eq!(r["kept"], 4, "{r}\n{}", d.tern.log());
    let refused = r["refused"].as_array().cloned().unwrap_or_default();
    assert_eq!(refused.len(), 3, "{r}");
    assert!(
        refused
            .iter()
            .all(|e| e.as_str() == Some("RESOURCE_EXHAUSTED: too many xDS clients")),
        "{r}"
    );
    let refusal = |what: &str, says: &str| {
        let e = r[what].as_str().unwrap_or_default();
        assert!(
            e.starts_with("RESOURCE_EXHAUSTED") && e.contains(says),
            "{what}: {r}\n{}",
            d.tern.log()
        );
    };
    refusal("types", "more than 16 resource types");
    refusal("names", "more than 100000 names");
    // The flood is gone with its process; the server serves a new client.
    assert!(
        eventually(Duration::from_secs(5), || d
            .json(&ns, "/debug/syncz")
            .as_array()
            .is_some_and(|c| c.is_empty())),
        "{}",
        d.get(&ns, "/debug/syncz")
    );
    let r = raw_once(
        &ns,
        &["per-type", "127.0.0.1:15010", "outbound|50051||echo"],
    );
    assert_eq!(r["endpoints"], 1, "{r}");
}

/// `n` services `svc-0`…, 10 endpoints each of weight `weight`; `svc-0`'s endpoints are
/// `first`.
fn many_services(n: usize, first: &[u16], weight: u32) -> String {
    let mut s = String::from("services:\n");
    for i in 0..n {
        let endpoints: Vec<String> = if i == 0 {
            first.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect()
        } else {
            (1..=10)
                .map(|e| {
                    format!(
                        "{{ address: \"10.9.{}.{e}:9090\", weight: {weight} }}",
                        i % 250
                    )
                })
                .collect()
        };
        s.push_str(&format!(
            "  - {{ name: svc-{i}, port: 9090, protocol: grpc, endpoints: [{}] }}\n",
            endpoints.join(", ")
        ));
    }
    s
}

/// A client that stops reading holds up nobody: while it never reads, twenty changes of every
/// service's endpoints reach a gRPC client, and the stalled client is not sent a backlog (once
/// its connection's window and its bounded queue are full, later states replace each other).
#[test]
fn a_client_that_stops_reading_holds_up_nobody() {
    tern_tests::require_root!();
    let ns = Netns::new("disc").unwrap();
    let _servers: Vec<Process> = [(50061, "s1"), (50062, "s2")]
        .iter()
        .map(|(port, id)| grpc_server(&ns, *port, id))
        .collect();
    let d = Discovery::start(
        &ns,
        "127.0.0.1:15010",
        "127.0.0.1:15014",
        &many_services(500, &[50061], 1),
        &[],
    )
    .unwrap();
    let script = python_peer("xds_raw.py");
    let stalled = start_server(
        &ns,
        None,
        Path::new("python3"),
        &[script.to_str().unwrap(), "stall", "127.0.0.1:15010", "500"],
    )
    .unwrap();
    // Frozen: not even its transport reads, so its flow-control window stays as it is.
    std::thread::sleep(Duration::from_millis(300));
    std::process::Command::new("kill")
        .args(["-STOP", &stalled.pid().to_string()])
        .status()
        .unwrap();
    let bootstrap = Bootstrap::new("127.0.0.1:15010", "grpc-client-3").unwrap();
    let mut client = grpc_client(&ns, &bootstrap, "xds:///svc-0");
    let first: serde_json::Value = client.read().unwrap();
    assert_eq!(first["by_server"]["s1"], 40, "{first}");

    for k in 0..20 {
        let last = if k % 2 == 0 { 50062 } else { 50061 };
        // Every service changes: each change is a response of every endpoints resource.
        d.write(&many_services(500, &[last], 2 + k)).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let grpc_in_sync = || {
        d.json(&ns, "/debug/syncz").as_array().is_some_and(|all| {
            all.iter().any(|c| {
                c["node_id"] == "grpc-client-3"
                    && c["types"].as_object().is_some_and(|t| {
                        t.values().all(|s| s["sent_version"] == s["acked_version"])
                    })
            })
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || served(&d, &ns, "svc-0")
            == ["127.0.0.1:50061"]
            && grpc_in_sync()),
        "{}",
        d.get(&ns, "/debug/syncz")
    );
    // gRPC's round robin keeps its previous picker until a new endpoint's connection is ready.
    std::thread::sleep(Duration::from_millis(500));
    client.next_phase();
    let second: serde_json::Value = client.read().unwrap();
    assert_eq!(
        second["by_server"]["s1"], 40,
        "the last change (s1) reached the client: {second}"
    );
    let status = d
        .json(&ns, "/debug/syncz")
        .as_array()
        .and_then(|all| all.iter().find(|c| c["node_id"] == "raw-client").cloned())
        .unwrap_or_default();
    let eds = status["types"]["type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"]
        ["responses"]
        .as_u64()
        .unwrap_or(99);
    eprintln!("the stalled client was sent {eds} endpoint responses for 20 changes");
    assert!(
        eds < 20,
        "the stalled client was sent {eds} responses for 20 changes (one each: a backlog): {status}"
    );
    std::process::Command::new("kill")
        .args(["-CONT", &stalled.pid().to_string()])
        .status()
        .unwrap();
}

/// Anyone who reaches the xDS port: connections past the bound from one address are closed as
/// they come, and one that never speaks is closed after 10 s (an HTTP/2 server waits for the
/// preface for good: each held its place, a task and buffers for as long as its client
/// liked); a real client is served afterwards.
#[test]
fn silent_connections_to_the_xds_port_are_bounded_in_number_and_time() {
    tern_tests::require_root!();
    let ns = Netns::new("disc").unwrap();
    let d = Discovery::start(
        &ns,
        "127.0.0.1:15010",
        "127.0.0.1:15014",
        &echo_services(&[50061]),
        &["--max-connections-per-address", "32"],
    )
    .unwrap();
    let idle = tern_tests::python_json(
        &ns,
        None,
        "protocols_peer.py",
        &["idle", "127.0.0.1:15010", "40", "14"],
    );
    eprintln!("40 silent xDS connections: {idle}");
    assert_eq!(
        idle["closed_within_1s"], 8,
        "past the 32 from one address: {idle}"
    );
    assert_eq!(idle["closed"], 40, "{idle}");
    let last = idle["last_closed_after"].as_f64().unwrap();
    assert!((9.5..15.0).contains(&last), "{idle}");
    let r = raw_once(
        &ns,
        &["per-type", "127.0.0.1:15010", "outbound|50051||echo"],
    );
    assert_eq!(r["endpoints"], 1, "a client is served afterwards: {r}");
    drop(d);
}

/// A TLS handshake that stops half way is closed after 10 s: the start of a ClientHello counts
/// as the connection's first bytes, and tonic's acceptor waits for the rest of a handshake
/// for good unless told otherwise (each such connection held its place for as long as its
/// client liked, so a few hundred from as many addresses took the xDS port).
#[test]
fn a_tls_handshake_that_stalls_is_closed_after_10_s() {
    tern_tests::require_root!();
    let ns = Netns::new("disc").unwrap();
    let ca = tern_tests::pki::TestCa::new().unwrap();
    let server = ca
        .issue("xds", &["127.0.0.1"], Duration::from_secs(3600))
        .unwrap();
    let d = Discovery::start(
        &ns,
        "127.0.0.1:15012",
        "127.0.0.1:15014",
        &echo_services(&[50061]),
        &[
            "--tls-cert",
            server.cert_str(),
            "--tls-key",
            server.key_str(),
        ],
    )
    .unwrap();
    // A TLS handshake record's header, and nothing after it.
    let stalled = tern_tests::python_json(
        &ns,
        None,
        "protocols_peer.py",
        &["idle", "127.0.0.1:15012", "4", "14", "160301"],
    );
    eprintln!("4 stalled TLS handshakes: {stalled}");
    assert_eq!(stalled["closed"], 4, "{stalled}\n{}", d.tern.log());
    let last = stalled["last_closed_after"].as_f64().unwrap();
    assert!((9.5..15.0).contains(&last), "{stalled}");
    drop(d);
}
