//! tern as an xDS client, end to end: istiod's stand-in (`tern-istiod`, a tonic ADS server)
//! serves Istio-shaped listeners, clusters and endpoints, through the misbehaving
//! `tern-controlplane` where a test is about a control plane's faults (stalls, streams cut,
//! malformed resources); the real `tern` with eBPF capture takes its configuration from it,
//! and Thrift clients in the application Pod call the services' virtual IPs.
use std::time::{Duration, Instant};

use tern_tests::{
    Istiod, Pods, Process, Tern, ThriftClient, admin, connect, eventually, metric, pods, serve,
    thrift_call, thrift_serve, unique,
};

const CALC: &str = "10.96.0.20:9090";
const SNIFFED: &str = "10.96.0.21:9090";

fn snapshot(version: &str, endpoints: &[&str]) -> String {
    snapshot_with_bulk(version, endpoints, 0)
}

fn snapshot_with_bulk(version: &str, endpoints: &[&str], bulk: usize) -> String {
    snapshot_custom(version, endpoints, &format!("bulk: {bulk}\n"), "")
}

/// The two Thrift services with `endpoints`, more `services` (YAML list items) and
/// top-level `settings` (YAML lines) of istiod's snapshot.
fn snapshot_custom(version: &str, endpoints: &[&str], settings: &str, services: &str) -> String {
    let eps = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"version: "{version}"
{settings}
services:
  - {{ name: calc, vip: 10.96.0.20, port: 9090, filter: thrift, endpoints: [{eps}] }}
  - {{ name: thrift-plain, vip: 10.96.0.21, port: 9090, filter: tcp, endpoints: [{eps}] }}
{services}"#
    )
}

struct Mesh {
    p: Pods,
    /// istiod's stand-in (behind `tern-controlplane` when the test is about faults).
    cp: Istiod,
    tern: Tern,
    _servers: Vec<Process>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Sotw,
    Delta,
}

const THREE: [&str; 3] = ["10.66.1.2:9001", "10.66.1.2:9002", "10.66.1.2:9003"];

fn mesh(protocol: Protocol) -> Mesh {
    mesh_with(protocol, &snapshot("1", &THREE))
}

/// The mesh, with istiod serving `first` at start.
fn mesh_with(protocol: Protocol, first: &str) -> Mesh {
    mesh_from(protocol, |p| {
        Istiod::start(&p.app, "127.0.0.1:15010", first, &[])
    })
}

/// The mesh, with istiod serving `first` at start behind a control plane that misbehaves as
/// `faults` says (`tern-controlplane`'s file).
fn faulty_mesh(protocol: Protocol, first: &str, faults: &str) -> Mesh {
    mesh_from(protocol, |p| {
        Istiod::start_faulty(&p.app, "127.0.0.1:15010", first, faults)
    })
}

fn mesh_from(
    protocol: Protocol,
    control_plane: impl FnOnce(&Pods) -> anyhow::Result<Istiod>,
) -> Mesh {
    let p = pods();
    let servers = [
        ("10.66.1.2:9001", "s1"),
        ("10.66.1.2:9002", "s2"),
        ("10.66.1.2:9003", "s3"),
    ]
    .iter()
    .map(|(a, id)| thrift_serve(&p.srv, a, id).unwrap())
    .collect();
    let cp = control_plane(&p).unwrap();
    let extra: &[&str] = if protocol == Protocol::Delta {
        &["--xds-delta"]
    } else {
        &[]
    };
    let tern = p.start_tern_xds(extra, "info,tern=debug").unwrap();
    Mesh {
        p,
        cp,
        tern,
        _servers: servers,
    }
}

/// The first configuration arrives (every type ACKed with its version), `/ready` turns 200,
/// and calls are balanced per request — through a thrift_proxy listener and through istiod's
/// plain tcp_proxy, sniffed.
fn the_first_configuration_arrives_and_traffic_flows(protocol: Protocol) {
    let m = mesh(protocol);
    for t in ["Listener", "Cluster", "ClusterLoadAssignment"] {
        assert!(
            m.cp.wait_for(&format!("ACK {t} 1")),
            "{t} not ACKed:\n{}",
            m.cp.events()
        );
    }
    assert!(
        m.cp.events()
            .contains("names=outbound|9090||calc.default.svc.cluster.local"),
        "EDS follows CDS"
    );
    for vip in [CALC, SNIFFED] {
        let c = thrift_call(&m.p.app, Some(&m.p.cgroup), vip, &["--calls", "300"]);
        assert_eq!(
            c.counts(),
            [("s1", 100), ("s2", 100), ("s3", 100)],
            "{vip}: {c:?}"
        );
    }
    let dump: serde_json::Value =
        serde_json::from_str(&admin(&m.p.app, "GET", "/config_dump")).unwrap();
    let lds = &dump["xds"]["types"]["type.googleapis.com/envoy.config.listener.v3.Listener"];
    assert_eq!(lds["version"], "1", "{dump}");
    assert_eq!(dump["xds"]["connected"], true);

    let status =
        m.p.app
            .output(
                None,
                &tern_tests::tern_bin(),
                &["xds", "status", "--admin", "127.0.0.1:15000"],
            )
            .unwrap();
    assert!(status.contains("CONNECTED"), "{status}");
    let cds = status
        .lines()
        .find(|l| l.starts_with("Cluster "))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(cds.split_whitespace().nth(1) == Some("1"), "{status}");
    assert_eq!(metric(&m.p.app, "tern_xds_connected"), 1.0);
    assert!(
        metric(
            &m.p.app,
            "tern_config_updates_total{source=\"Cluster\",result=\"applied\"}"
        ) >= 1.0
    );
}

/// A large snapshot (1,000 more clusters, 10,000 endpoints) applies while a client's calls
/// keep flowing without a stall.
fn a_large_snapshot_applies_without_stalling_traffic(protocol: Protocol) {
    let m = mesh(protocol);
    let mut client = ThriftClient::start(
        &m.p.app,
        Some(&m.p.cgroup),
        CALC,
        &["--calls", "3000", "--phases", "1"],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let pushed = Instant::now();
    let eps = ["10.66.1.2:9001", "10.66.1.2:9002", "10.66.1.2:9003"];
    m.cp.push(&snapshot_with_bulk("2", &eps, 1000));
    assert!(
        m.cp.wait_for_within("ACK ClusterLoadAssignment 2", Duration::from_secs(30)),
        "{}",
        m.cp.events()
    );
    let applied = pushed.elapsed();
    let calls = client.result();
    assert_eq!(calls.replies(), 3000, "{calls:?}");
    assert!(
        calls.max_ms < 500,
        "a call stalled for {} ms while the snapshot applied",
        calls.max_ms
    );
    let dump: serde_json::Value =
        serde_json::from_str(&admin(&m.p.app, "GET", "/clusters")).unwrap();
    assert!(dump["clusters"].as_array().unwrap().len() > 1000);
    eprintln!(
        "{protocol:?}: 1,000 clusters and 10,000 endpoints applied in {applied:?}; slowest call {} ms",
        calls.max_ms
    );
}

/// An EDS update adds and removes endpoints; a client's open connection follows within a second.
fn endpoint_updates_move_traffic_within_a_second(protocol: Protocol) {
    let m = mesh(protocol);
    let mut client = ThriftClient::start(
        &m.p.app,
        Some(&m.p.cgroup),
        CALC,
        &["--calls", "300", "--phases", "3"],
    )
    .unwrap();
    assert_eq!(
        client.result().counts(),
        [("s1", 100), ("s2", 100), ("s3", 100)]
    );

    let pushed = Instant::now();
    m.cp.push(&snapshot("2", &["10.66.1.2:9001", "10.66.1.2:9002"]));
    assert!(
        m.cp.wait_for("ACK ClusterLoadAssignment 2"),
        "{}",
        m.cp.events()
    );
    let took = pushed.elapsed();
    client.next_phase();
    assert_eq!(client.result().counts(), [("s1", 150), ("s2", 150)]);
    assert!(took < Duration::from_secs(1), "the update took {took:?}");

    m.cp.push(&snapshot("3", &["10.66.1.2:9003"]));
    assert!(m.cp.wait_for("ACK ClusterLoadAssignment 3"));
    client.next_phase();
    assert_eq!(client.result().counts(), [("s3", 300)]);
}

/// A resource tern cannot use is NACKed by name with its reason (SotW: with the last
/// version accepted whole), the rest of its response applies, and traffic keeps flowing.
fn a_bad_resource_is_nacked_while_traffic_keeps_flowing(protocol: Protocol) {
    let m = faulty_mesh(protocol, &snapshot("1", &THREE), "");
    assert!(m.cp.wait_for("ACK Listener 1"));
    // A listener whose address is a hostname, beside the endpoints change.
    m.cp.faults("broken_listener: true");
    m.cp.push(&snapshot("2", &["10.66.1.2:9001"]));
    // SotW NACKs carry the last good version; the delta log names the refused response's.
    let nacked = match protocol {
        Protocol::Sotw => "NACK Listener 1 broken_9999: address:",
        Protocol::Delta => "NACK Listener 2 broken_9999: address:",
    };
    assert!(m.cp.wait_for(nacked), "{}", m.cp.events());
    assert!(m.cp.events().contains("is not an IP address"));
    // The NACKed update carried the endpoints change too; the Listener NACK keeps listeners,
    // while the accepted endpoints apply: traffic flows, to what is still configured.
    let c = thrift_call(&m.p.app, Some(&m.p.cgroup), CALC, &["--calls", "30"]);
    assert_eq!(c.replies(), 30, "{c:?}");
    let dump: serde_json::Value =
        serde_json::from_str(&admin(&m.p.app, "GET", "/config_dump")).unwrap();
    let lds = &dump["xds"]["types"]["type.googleapis.com/envoy.config.listener.v3.Listener"];
    assert!(
        lds["last_error"].as_str().unwrap().contains("broken_9999"),
        "{dump}"
    );
    assert_eq!(lds["version"], "1");
    assert!(
        lds["rejected"]["broken_9999"]
            .as_str()
            .is_some_and(|r| r.contains("not an IP address")),
        "{dump}"
    );
    assert!(
        metric(
            &m.p.app,
            "tern_config_updates_total{source=\"Listener\",result=\"rejected\"}"
        ) >= 1.0
    );
}

/// A control plane that goes away does not interrupt traffic; when it is back, tern
/// resubscribes with the versions it holds.
fn a_control_plane_restart_does_not_interrupt_traffic(protocol: Protocol) {
    let mut m = mesh(protocol);
    assert!(m.cp.wait_for("ACK ClusterLoadAssignment 1"));
    m.cp.stop();
    let c = thrift_call(&m.p.app, Some(&m.p.cgroup), CALC, &["--calls", "30"]);
    assert_eq!(c.replies(), 30, "traffic without a control plane: {c:?}");
    assert_eq!(admin(&m.p.app, "GET", "/ready").trim(), "LIVE");
    // An outage of over a second: attempts to reconnect fail meanwhile.
    std::thread::sleep(Duration::from_millis(1200));

    m.cp.restart(&m.p.app).unwrap();
    // tern retries with jittered exponential backoff (capped at 15 s).
    // SotW names the version held per type; delta every resource's (in any order).
    let resubscribed = |line: &str| match protocol {
        Protocol::Sotw => line.starts_with("SUBSCRIBE Cluster version=1"),
        Protocol::Delta => {
            line.starts_with("SUBSCRIBE Cluster held=") && line.contains("PassthroughCluster@1")
        }
    };
    assert!(
        eventually(Duration::from_secs(20), || m
            .cp
            .events()
            .lines()
            .any(resubscribed)),
        "resubscribed with the versions held:\n{}",
        m.cp.events()
    );
    let streams = if protocol == Protocol::Delta {
        "STREAM delta"
    } else {
        "STREAM\n"
    };
    assert!(eventually(Duration::from_secs(5), || m
        .cp
        .events()
        .matches("STREAM")
        .count()
        == 2));
    assert_eq!(
        m.cp.events().matches(streams).count(),
        2,
        "both streams spoke the protocol asked for"
    );
    let c = thrift_call(&m.p.app, Some(&m.p.cgroup), CALC, &["--calls", "30"]);
    assert_eq!(c.replies(), 30);
    let failures = m.tern.log().matches("ADS stream failed").count();
    assert!(
        failures >= 2,
        "the stream's end and failed attempts: {failures}"
    );
    // tern counts a stream as open once the control plane's response headers arrive, which
    // can come after the control plane has already read the resubscription.
    eventually(Duration::from_secs(5), || {
        metric(&m.p.app, "tern_xds_reconnects_total") >= 1.0
    });
    assert_eq!(
        metric(&m.p.app, "tern_xds_reconnects_total"),
        1.0,
        "one stream reopened, whatever failed before ({failures} failures)"
    );
}

/// A response that mixes a corrupt cluster with good ones: the good ones (and the listener
/// and endpoints that use them) serve, and the NACK names the corrupt one.
fn a_corrupt_cluster_is_refused_by_name_and_the_others_serve(protocol: Protocol) {
    let m = faulty_mesh(protocol, &snapshot("1", &THREE), "");
    let _echo = serve(&m.p.srv, &["10.66.1.2:7001"]).unwrap();
    assert!(m.cp.wait_for("ACK ClusterLoadAssignment 1"));
    m.cp.faults("corrupt_cluster: true");
    m.cp.push(&snapshot_custom(
        "2",
        &THREE,
        "",
        "  - { name: fresh, vip: 10.96.0.30, port: 7070, filter: tcp, endpoints: [\"10.66.1.2:7001\"] }\n",
    ));
    let nacked = match protocol {
        Protocol::Sotw => "NACK Cluster 1 outbound|7777||corrupt.default.svc.cluster.local: ",
        Protocol::Delta => "NACK Cluster 2 outbound|7777||corrupt.default.svc.cluster.local: ",
    };
    assert!(m.cp.wait_for(nacked), "{}", m.cp.events());
    assert!(m.cp.wait_for("ACK Listener 2"), "{}", m.cp.events());
    let c = connect(&m.p.app, Some(&m.p.cgroup), "10.96.0.30:7070");
    assert!(
        c.ok() && c.proxied(),
        "the cluster sent beside the corrupt one serves: {c:?}"
    );
    let calls = thrift_call(&m.p.app, Some(&m.p.cgroup), CALC, &["--calls", "30"]);
    assert_eq!(calls.replies(), 30, "{calls:?}");
    let dump: serde_json::Value =
        serde_json::from_str(&admin(&m.p.app, "GET", "/config_dump")).unwrap();
    let cds = &dump["xds"]["types"]["type.googleapis.com/envoy.config.cluster.v3.Cluster"];
    assert!(
        cds["rejected"]["outbound|7777||corrupt.default.svc.cluster.local"].is_string(),
        "{cds}"
    );
    assert_eq!(
        metric(&m.p.app, "tern_xds_rejected{resource=\"Cluster\"}"),
        1.0
    );
}

/// A CDS response of more than 5 MiB (tonic's default limit is 4 MiB) is accepted.
fn a_5_mib_cds_response_is_accepted(protocol: Protocol) {
    let m = mesh(protocol);
    assert!(m.cp.wait_for("ACK ClusterLoadAssignment 1"));
    m.cp.push(&snapshot_custom(
        "2",
        &THREE,
        "bulk: 500\ncluster_padding: 11000",
        "",
    ));
    assert!(
        m.cp.wait_for_within("ACK Cluster 2", Duration::from_secs(30)),
        "{}",
        m.cp.events()
    );
    if protocol == Protocol::Sotw {
        let sent: usize =
            m.cp.events()
                .lines()
                .filter_map(|l| l.strip_prefix("SENT Cluster "))
                .filter_map(|l| l.split(' ').next()?.parse().ok())
                .max()
                .unwrap();
        assert!(sent > 5 * 1024 * 1024, "the CDS response was {sent} bytes");
    }
    // The new clusters are in force once their endpoints arrive (warming per cluster).
    let clusters = || {
        let dump: serde_json::Value =
            serde_json::from_str(&admin(&m.p.app, "GET", "/config_dump")).unwrap();
        dump["config"]["clusters"]
            .as_object()
            .map_or(0, |c| c.len())
    };
    assert!(
        eventually(Duration::from_secs(10), || clusters() > 500),
        "{} clusters",
        clusters()
    );
    let calls = thrift_call(&m.p.app, Some(&m.p.cgroup), CALC, &["--calls", "30"]);
    assert_eq!(calls.replies(), 30, "{calls:?}");
}

/// A control plane that ends every stream after 1.5 s (istiod does at its maximum connection
/// age): tern reconnects at once, an update pushed meanwhile lands within a second, and no
/// call fails.
fn streams_closed_by_the_server_cost_no_traffic(protocol: Protocol) {
    let m = faulty_mesh(protocol, &snapshot("1", &THREE), "close_every_ms: 1500");
    assert!(m.cp.wait_for("ACK ClusterLoadAssignment 1"));
    let mut client = ThriftClient::retrying(&m.p.app, Some(&m.p.cgroup), CALC).unwrap();
    // Watch the event log: when each CLOSE appears, and when the next ACK follows it.
    let mut gaps = Vec::new();
    let started = Instant::now();
    let mut closes_seen = 0;
    let mut closed_at = None;
    let mut pushed = false;
    while started.elapsed() < Duration::from_secs(7) {
        let events = m.cp.events();
        let closes = events.matches("CLOSE").count();
        if closes > closes_seen {
            closes_seen = closes;
            closed_at = Some((Instant::now(), events.matches("ACK").count()));
        }
        if let Some((at, acks)) = closed_at
            && events.matches("ACK").count() > acks
        {
            gaps.push(at.elapsed());
            closed_at = None;
        }
        if !pushed && started.elapsed() > Duration::from_secs(3) {
            m.cp.push(&snapshot("2", &["10.66.1.2:9001"]));
            pushed = true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        gaps.len() >= 3,
        "streams closed and reopened: {gaps:?}\n{}",
        m.cp.events()
    );
    assert!(
        gaps.iter().all(|g| *g < Duration::from_secs(1)),
        "update gaps after a clean close: {gaps:?}"
    );
    let report = client.report();
    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["ok"].as_u64().unwrap() > 100, "{report}");
    assert!(m.cp.events().contains("ACK ClusterLoadAssignment 2"));
    let after = thrift_call(&m.p.app, Some(&m.p.cgroup), CALC, &["--calls", "10"]);
    assert_eq!(after.counts(), [("s1", 10)]);
    assert!(
        !m.tern.log().contains("ADS stream failed"),
        "a clean end is not a failure:\n{}",
        m.tern.log()
    );
}

/// A RING_HASH cluster from xDS (a DestinationRule `consistentHash: useSourceIp`) sends one
/// source's connections, and its Thrift calls, to one endpoint; the same endpoints under
/// round robin spread them.
fn ring_hash_keeps_a_source_on_one_endpoint(protocol: Protocol) {
    let m = mesh_with(
        protocol,
        &snapshot_custom(
            "1",
            &THREE,
            "",
            "  - { name: sticky, vip: 10.96.0.31, port: 7070, filter: tcp, lb: ring_hash, endpoints: [\"10.66.1.2:7001\", \"10.66.1.2:7002\", \"10.66.1.2:7003\"] }
  - { name: spread, vip: 10.96.0.32, port: 7070, filter: tcp, endpoints: [\"10.66.1.2:7001\", \"10.66.1.2:7002\", \"10.66.1.2:7003\"] }
  - { name: sticky-thrift, vip: 10.96.0.33, port: 9090, filter: tcp, lb: maglev, endpoints: [\"10.66.1.2:9001\", \"10.66.1.2:9002\", \"10.66.1.2:9003\"] }
",
        ),
    );
    let _echo = serve(
        &m.p.srv,
        &["10.66.1.2:7001", "10.66.1.2:7002", "10.66.1.2:7003"],
    )
    .unwrap();
    assert!(m.cp.wait_for("ACK ClusterLoadAssignment 1"));
    let endpoints = |vip: &str| -> std::collections::BTreeSet<String> {
        (0..12)
            .map(|_| {
                let c = connect(&m.p.app, Some(&m.p.cgroup), vip);
                assert!(c.ok(), "{c:?}");
                c.server_local.unwrap()
            })
            .collect()
    };
    assert_eq!(
        endpoints("10.96.0.31:7070").len(),
        1,
        "ring hash: one endpoint"
    );
    assert!(
        endpoints("10.96.0.32:7070").len() > 1,
        "round robin spreads"
    );
    let calls = thrift_call(
        &m.p.app,
        Some(&m.p.cgroup),
        "10.96.0.33:9090",
        &["--calls", "30"],
    );
    assert_eq!(calls.counts().len(), 1, "Maglev by source: {calls:?}");
    assert_eq!(calls.replies(), 30);
}

/// Runs each scenario under both protocols: `<scenario>::sotw` and `<scenario>::delta` —
/// the same results either way.
macro_rules! under_both_protocols {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            fn sotw() {
                tern_tests::require_root!();
                super::$scenario(super::Protocol::Sotw);
            }

            #[test]
            fn delta() {
                tern_tests::require_root!();
                super::$scenario(super::Protocol::Delta);
            }
        }
    )*};
}

under_both_protocols!(
    a_corrupt_cluster_is_refused_by_name_and_the_others_serve,
    a_5_mib_cds_response_is_accepted,
    streams_closed_by_the_server_cost_no_traffic,
    ring_hash_keeps_a_source_on_one_endpoint,
    the_first_configuration_arrives_and_traffic_flows,
    endpoint_updates_move_traffic_within_a_second,
    a_bad_resource_is_nacked_while_traffic_keeps_flowing,
    a_control_plane_restart_does_not_interrupt_traffic,
    a_large_snapshot_applies_without_stalling_traffic,
    a_slow_control_plane_does_not_hold_up_traffic,
);

/// xDS over TLS, as istiod serves it on 15012: the control plane's certificate is checked
/// against the given CA and name, and a bearer token from a file goes with every stream;
/// a token the control plane refuses keeps tern on its last configuration.
#[test]
fn xds_over_tls_with_a_bearer_token() {
    tern_tests::require_root!();
    let p = pods();
    let dir = std::env::temp_dir().join(unique("xds-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["istiod.istio-system.svc".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (ca_pem, cert_pem, key_pem) = (
        file("ca.pem", &ca.pem()),
        file("cert.pem", &cert.pem()),
        file("key.pem", &key.serialize_pem()),
    );
    let token = file("token", "service-account-jwt\n");
    let cp_token = file("cp-token", "service-account-jwt");

    let _servers: Vec<Process> = [("10.66.1.2:9001", "s1"), ("10.66.1.2:9002", "s2")]
        .iter()
        .map(|(a, id)| thrift_serve(&p.srv, a, id).unwrap())
        .collect();
    let mut cp = Istiod::start(
        &p.app,
        "127.0.0.1:15012",
        &snapshot("1", &["10.66.1.2:9001", "10.66.1.2:9002"]),
        &[
            "--tls".into(),
            cert_pem,
            key_pem,
            "--token".into(),
            cp_token,
        ],
    )
    .unwrap();
    let tern = Tern::start(
        &p.app,
        Some(&p.cgroup),
        &[
            "run",
            "--capture",
            "ebpf",
            "--cgroup",
            p.cgroup.path_str(),
            "--inbound-ports",
            "",
            "--xds-address",
            "https://127.0.0.1:15012",
            "--xds-ca",
            &ca_pem,
            "--xds-server-name",
            "istiod.istio-system.svc",
            "--xds-token-file",
            &token,
        ],
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || admin(&p.app, "GET", "/ready")
            .trim()
            == "LIVE"),
        "not ready over TLS:\n{}\n{}",
        tern.log(),
        cp.events()
    );
    let c = thrift_call(&p.app, Some(&p.cgroup), CALC, &["--calls", "20"]);
    assert_eq!(c.counts(), [("s1", 10), ("s2", 10)]);

    // A rotated token the control plane does not accept: refused, and traffic goes on.
    std::fs::write(&token, "stolen").unwrap();
    cp.stop();
    cp.restart(&p.app).unwrap();
    assert!(
        cp.wait_for_within("REJECT Bearer stolen", Duration::from_secs(20)),
        "{}",
        cp.events()
    );
    let c = thrift_call(&p.app, Some(&p.cgroup), CALC, &["--calls", "20"]);
    assert_eq!(c.replies(), 20);
    drop(cp);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A control plane that is down when tern starts does not stop the static configuration
/// serving outbound; inbound, whose policy is the control plane's, is refused until its
/// inbound listener arrives (a plaintext client never reaches the application), and tern is
/// not ready.
#[test]
fn a_control_plane_down_at_start_leaves_the_static_configuration_serving() {
    tern_tests::require_root!();
    let p = pods();
    let _server = thrift_serve(&p.srv, "10.66.1.2:9001", "s1").unwrap();
    let config = std::env::temp_dir().join(format!("{}.yaml", unique("static")));
    std::fs::write(
        &config,
        "listeners:\n  - address: 10.96.0.30:9090\n    filter_chains: [ { thrift_proxy: { default_cluster: local } } ]\n\
         clusters:\n  - { name: local, endpoints: [ { address: 10.66.1.2:9001 } ] }\n",
    )
    .unwrap();
    let tern = Tern::start(
        &p.app,
        Some(&p.cgroup),
        &[
            "run",
            "--capture",
            "ebpf",
            "--cgroup",
            p.cgroup.path_str(),
            "--inbound-ports",
            "8080",
            "--access-log",
            "--config",
            config.to_str().unwrap(),
            "--xds-address",
            "http://127.0.0.1:15010",
        ],
    )
    .unwrap();
    assert_ne!(admin(&p.app, "GET", "/ready").trim(), "LIVE");
    let c = thrift_call(
        &p.app,
        Some(&p.cgroup),
        "10.96.0.30:9090",
        &["--calls", "10"],
    );
    assert_eq!(c.counts(), [("s1", 10)], "{c:?}");
    assert!(
        eventually(Duration::from_secs(5), || tern
            .log()
            .contains("ADS stream failed")),
        "{}",
        tern.log()
    );
    assert!(eventually(Duration::from_secs(5), || metric(
        &p.app,
        "tern_xds_connected"
    ) == 0.0));
    let _app = tern_tests::serve(&p.app, &["10.66.1.1:8080"]).unwrap();
    let inbound = tern_tests::connect(&p.srv, None, "10.66.1.1:8080");
    assert!(!inbound.ok(), "{inbound:?}\n{}", tern.log());
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &p.app,
            r#"tern_connections_refused_total{direction="inbound",reason="awaiting_policy"}"#
        ) >= 1.0),
        "{}",
        tern.log()
    );
    assert_ne!(admin(&p.app, "GET", "/ready").trim(), "LIVE");
    let _ = std::fs::remove_file(&config);
}

/// A control plane that answers slowly holds up nothing: calls keep flowing on the
/// configuration in force until the update arrives, then follow it.
fn a_slow_control_plane_does_not_hold_up_traffic(protocol: Protocol) {
    let m = faulty_mesh(protocol, &snapshot("1", &THREE), "");
    assert!(m.cp.wait_for("ACK ClusterLoadAssignment 1"));
    m.cp.faults("delay_ms: 1500");
    m.cp.push(&snapshot("2", &["10.66.1.2:9001"]));
    let during = thrift_call(&m.p.app, Some(&m.p.cgroup), CALC, &["--calls", "300"]);
    assert_eq!(
        during.counts(),
        [("s1", 100), ("s2", 100), ("s3", 100)],
        "{during:?}"
    );
    assert!(
        during.max_ms < 500,
        "a call waited {} ms on the control plane",
        during.max_ms
    );
    assert!(
        m.cp.wait_for_within("ACK ClusterLoadAssignment 2", Duration::from_secs(10)),
        "{}",
        m.cp.events()
    );
    let after = thrift_call(&m.p.app, Some(&m.p.cgroup), CALC, &["--calls", "30"]);
    assert_eq!(after.counts(), [("s1", 30)]);
}
