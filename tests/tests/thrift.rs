//! The Thrift data plane, end to end: a Thrift client in the application Pod (captured with
//! eBPF) calls a service's virtual IP; the real `tern` routes and balances every request over
//! Thrift servers in another namespace. Peers are written with the `thrift` crate.
//!
//! Virtual IPs: 10.96.0.10:9090 is a `thrift_proxy` listener; 10.96.0.11:9090 a plain
//! `tcp_proxy` listener that sniffs Thrift (what istiod sends for a Thrift service).
use std::time::Duration;

use tern_tests::{
    Calls, ConfigFile, Pods, Process, Tern, ThriftClient, admin, eventually, metric, pods,
    send_raw, thrift_call, thrift_serve,
};

const SERVICE: &str = "10.96.0.10:9090";
const SNIFFED: &str = "10.96.0.11:9090";
const PYTHON: &str = "10.96.0.12:9090";
const TIGHT: &str = "10.96.0.13:9090";
const SERVERS: [(&str, &str); 3] = [
    ("10.66.1.2:9001", "s1"),
    ("10.66.1.2:9002", "s2"),
    ("10.66.1.2:9003", "s3"),
];

/// The configuration with these endpoints in cluster `calc`; `notify`/`count` go to `single`.
fn config(endpoints: &[&str], extra_cluster: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| format!("      - {{ address: {e} }}"))
        .collect();
    format!(
        r#"listeners:
  - address: {SERVICE}
    filter_chains:
      - thrift_proxy:
          routes:
            - match: {{ method: notify }}
              route: {{ cluster: single }}
            - match: {{ method: count }}
              route: {{ cluster: single }}
          default_cluster: calc
  - address: {SNIFFED}
    filter_chains:
      - tcp_proxy: {{ cluster: calc, sniff_thrift: true }}
  - address: {PYTHON}
    filter_chains:
      - thrift_proxy:
          routes:
            - match: {{ headers: {{ x-version: v2 }} }}
              route: {{ cluster: py-v2 }}
            - match: {{ headers: {{ x-pick: yes }} }}
              route: {{ cluster_header: x-cluster }}
          default_cluster: py
  - address: {TIGHT}
    filter_chains:
      - thrift_proxy: {{ default_cluster: tight }}
clusters:
  - name: tight
    circuit_breakers: {{ max_requests: 1 }}
    endpoints: [ {{ address: 10.66.1.2:9002 }} ]
  - name: py
    endpoints: [ {{ address: 10.66.1.2:9101 }}, {{ address: 10.66.1.2:9102 }} ]
  - name: py-v2
    endpoints: [ {{ address: 10.66.1.2:9103 }} ]
  - name: calc
    timeout_ms: 1000
    outlier_detection: {{ consecutive_errors: 3, base_ejection_ms: 200 }}
    endpoints:
{}
  - name: single
    endpoints: [ {{ address: 10.66.1.2:9001 }} ]
{extra_cluster}"#,
        eps.join("\n")
    )
}

/// A running data plane: servers, tern with a config file, and the Pods.
struct Mesh {
    p: Pods,
    tern: Tern,
    config: ConfigFile,
    _servers: Vec<Process>,
}

impl Mesh {
    fn start(config_text: &str, extra_args: &[&str]) -> Self {
        let p = pods();
        let servers = SERVERS
            .iter()
            .map(|(addr, id)| thrift_serve(&p.srv, addr, id).unwrap())
            .collect();
        let config = ConfigFile::new(config_text).unwrap();
        let tern = p.start_tern(&config, extra_args).unwrap();
        Mesh {
            p,
            tern,
            config,
            _servers: servers,
        }
    }

    fn call(&self, addr: &str, args: &[&str]) -> Calls {
        thrift_call(&self.p.app, Some(&self.p.cgroup), addr, args)
    }

    fn reconfigure(&self, text: &str) {
        self.tern.reconfigure(&self.config, text);
    }
}

const FORMATS: [[&str; 4]; 4] = [
    ["--transport", "framed", "--protocol", "binary"],
    ["--transport", "framed", "--protocol", "compact"],
    ["--transport", "unframed", "--protocol", "binary"],
    ["--transport", "unframed", "--protocol", "compact"],
];

/// One client connection, 300 calls, 3 endpoints: round robin gives each 100, in every
/// transport and protocol, and through a sniffed plain TCP listener too.
#[test]
fn one_connection_is_balanced_per_request() {
    tern_tests::require_root!();
    let all: Vec<&str> = SERVERS.iter().map(|(a, _)| *a).collect();
    let m = Mesh::start(&config(&all, ""), &[]);
    for format in FORMATS {
        let c = m.call(SERVICE, &[&["--calls", "300"], &format[..]].concat());
        assert_eq!(c.io_error, None, "{format:?}");
        assert_eq!(
            c.counts(),
            [("s1", 100), ("s2", 100), ("s3", 100)],
            "{format:?}: {c:?}"
        );
        assert!(c.seq_ok && c.app_errors.is_empty(), "{format:?}: {c:?}");
    }
    let sniffed = m.call(SNIFFED, &["--calls", "300"]);
    assert_eq!(
        sniffed.counts(),
        [("s1", 100), ("s2", 100), ("s3", 100)],
        "{sniffed:?}"
    );

    // What the admin server shows.
    assert_eq!(admin(&m.p.app, "GET", "/ready").trim(), "LIVE");
    let clusters: serde_json::Value =
        serde_json::from_str(&admin(&m.p.app, "GET", "/clusters")).unwrap();
    let calc = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "calc")
        .unwrap();
    for e in calc["endpoints"].as_array().unwrap() {
        assert_eq!(e["requests"], 500, "{e}");
        // Five client connections, one sequential client at a time: one upstream connection
        // per transport and protocol carries them all.
        assert_eq!(e["connections"], 4, "{e}");
    }
    let requests = metric(
        &m.p.app,
        "tern_thrift_requests_total{cluster=\"calc\",method=\"whoami\"}",
    );
    assert_eq!(requests, 1500.0);
    let success = metric(
        &m.p.app,
        "tern_thrift_replies_total{cluster=\"calc\",result=\"success\"}",
    );
    assert_eq!(success, 1500.0);
    let dump: serde_json::Value =
        serde_json::from_str(&admin(&m.p.app, "GET", "/config_dump")).unwrap();
    assert!(
        dump["version"].as_str().unwrap().starts_with("file-"),
        "{dump}"
    );
    assert!(admin(&m.p.app, "POST", "/logging?level=debug").contains("now debug"));
}

/// Multiplexed names, one-way calls, declared and application exceptions, 1 MiB and empty
/// payloads, in every transport and protocol.
#[test]
fn every_kind_of_call_arrives() {
    tern_tests::require_root!();
    let all: Vec<&str> = SERVERS.iter().map(|(a, _)| *a).collect();
    let m = Mesh::start(&config(&all, ""), &[]);
    let mut notified = 0;
    for format in FORMATS {
        let f = &format[..];
        let mux = m.call(
            SERVICE,
            &[&["--method", "Calc:whoami", "--calls", "3"], f].concat(),
        );
        assert_eq!(mux.replies(), 3, "{format:?}: {mux:?}");
        let fail = m.call(SERVICE, &[&["--method", "fail"], f].concat());
        assert_eq!(
            (fail.exceptions, fail.app_errors.len()),
            (1, 0),
            "{format:?}: {fail:?}"
        );
        let unknown = m.call(SERVICE, &[&["--method", "nosuch"], f].concat());
        assert!(
            unknown.app_errors[0].contains("unknown method nosuch"),
            "{format:?}: {unknown:?}"
        );
        let large = m.call(
            SERVICE,
            &[&["--method", "echo", "--size", "1048576"], f].concat(),
        );
        assert_eq!(large.values, [1 << 20], "{format:?}: {large:?}");
        let empty = m.call(SERVICE, &[&["--method", "echo", "--size", "0"], f].concat());
        assert_eq!(empty.values, [0], "{format:?}: {empty:?}");
        let oneway = m.call(
            SERVICE,
            &[&["--method", "notify", "--calls", "5"], f].concat(),
        );
        assert_eq!(oneway.io_error, None, "{format:?}");
        notified += 5;
        let count_seen = |n: i64| {
            m.call(SERVICE, &[&["--method", "count"], f].concat())
                .values
                == [n]
        };
        assert!(
            eventually(Duration::from_secs(3), || count_seen(notified)),
            "{format:?}: one-way calls lost"
        );
    }
    assert_eq!(
        metric(
            &m.p.app,
            "tern_thrift_replies_total{cluster=\"calc\",result=\"exception\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(
            &m.p.app,
            "tern_thrift_replies_total{cluster=\"calc\",result=\"error\"}"
        ),
        4.0
    );
}

/// Removing an endpoint from the configuration moves the traffic of a connection that stays
/// open; a broken configuration is refused while the last good one keeps serving.
#[test]
fn configuration_changes_move_traffic_without_breaking_connections() {
    tern_tests::require_root!();
    let all: Vec<&str> = SERVERS.iter().map(|(a, _)| *a).collect();
    let m = Mesh::start(&config(&all, ""), &[]);
    let mut client = ThriftClient::start(
        &m.p.app,
        Some(&m.p.cgroup),
        SERVICE,
        &["--calls", "300", "--phases", "3"],
    )
    .unwrap();
    assert_eq!(
        client.result().counts(),
        [("s1", 100), ("s2", 100), ("s3", 100)]
    );

    m.reconfigure(&config(&all[..2], ""));
    client.next_phase();
    let after = client.result();
    assert_eq!(after.counts(), [("s1", 150), ("s2", 150)], "{after:?}");
    assert!(after.io_error.is_none() && after.seq_ok);

    m.config
        .write("clusters: [ { name: calc, lb_policy: sideways } ]")
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || m
        .tern
        .log()
        .contains("configuration refused")));
    client.next_phase();
    assert_eq!(
        client.result().counts(),
        [("s1", 150), ("s2", 150)],
        "the last good configuration serves"
    );
    assert_eq!(
        metric(
            &m.p.app,
            "tern_config_updates_total{source=\"file\",result=\"rejected\"}"
        ),
        1.0
    );
}

/// A dead endpoint costs retries, not failures; with every endpoint dead, calls get
/// `TApplicationException`s at once instead of hanging.
#[test]
fn dead_endpoints_never_hang_the_client() {
    tern_tests::require_root!();
    let m = Mesh::start(&config(&["10.66.1.2:9001", "10.66.1.2:9009"], ""), &[]);
    let c = m.call(SERVICE, &["--calls", "100"]);
    assert_eq!(c.counts(), [("s1", 100)], "{c:?}");
    assert!(
        c.app_errors.is_empty(),
        "connect failures are retried: {c:?}"
    );

    m.reconfigure(&config(&["10.66.1.2:9008", "10.66.1.2:9009"], ""));
    let started = std::time::Instant::now();
    let c = m.call(SERVICE, &["--calls", "20"]);
    assert_eq!(c.app_errors.len(), 20, "{c:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        metric(
            &m.p.app,
            "tern_thrift_local_replies_total{cluster=\"calc\",cause=\"no_healthy_upstream\"}"
        ) + metric(
            &m.p.app,
            "tern_thrift_local_replies_total{cluster=\"calc\",cause=\"connect_failure\"}"
        ) >= 20.0
    );
}

/// A slow endpoint hits the request timeout, and the client gets an exception in time.
#[test]
fn a_slow_endpoint_hits_the_timeout() {
    tern_tests::require_root!();
    let m = Mesh::start(&config(&["10.66.1.2:9001"], ""), &[]);
    let started = std::time::Instant::now();
    let c = m.call(SERVICE, &["--method", "sleep", "--ms", "3000"]);
    assert_eq!(c.app_errors.len(), 1, "{c:?}");
    assert!(c.app_errors[0].contains("timeout"), "{c:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        started.elapsed()
    );
    let quick = m.call(SERVICE, &["--method", "sleep", "--ms", "10"]);
    assert_eq!(quick.counts(), [("s1", 1)]);

    // A connection's requests share one timer, which is not moved when a request finishes
    // before its deadline: a slow call after a quick one on the same connection still times
    // out on time, once the timer, set for the quick one, has found nothing due.
    let started = std::time::Instant::now();
    let c = m.call(
        SERVICE,
        &["--method", "sleep", "--calls", "3", "--ms", "10,400,3000"],
    );
    assert_eq!(c.counts(), [("s1", 2)], "{c:?}");
    assert_eq!(c.app_errors.len(), 1, "{c:?}");
    assert!(c.app_errors[0].contains("timeout"), "{c:?}");
    // The slow call had its own full second: not cut short when the timer first fired.
    assert!((950..2000).contains(&c.max_ms), "{c:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        started.elapsed()
    );
}

/// A 10,000-message pipelined burst on one connection arrives complete and in order.
#[test]
fn a_pipelined_burst_arrives_complete_and_in_order() {
    tern_tests::require_root!();
    let all: Vec<&str> = SERVERS.iter().map(|(a, _)| *a).collect();
    let m = Mesh::start(&config(&all, ""), &[]);
    for format in [FORMATS[0], FORMATS[3]] {
        let c = m.call(
            SERVICE,
            &[&["--calls", "10000", "--pipeline"], &format[..]].concat(),
        );
        assert_eq!(c.io_error, None, "{format:?}");
        assert_eq!(c.replies(), 10_000, "{format:?}: {c:?}");
        assert!(c.seq_ok, "{format:?}: replies out of order");
    }
}

/// Each bound closes only the offending connection, with a counted cause.
#[test]
fn malformed_input_closes_only_its_connection() {
    tern_tests::require_root!();
    let m = Mesh::start(
        &config(&["10.66.1.2:9001"], ""),
        &["--max-frame-size", "4096", "--max-depth", "4"],
    );
    // A binary call header: framed length, version CALL, name "x", seq 1; then a body.
    let frame = |body: &str| {
        let msg = format!("80010001000000017800000001{body}");
        format!("{:08x}{msg}", msg.len() / 2)
    };
    let cases = [
        ("frame_too_large", "0000200080010001".to_owned()),
        ("negative_length", "ffffff0080010001".to_owned()),
        ("invalid_type", frame("630001" /* type 99 */)),
        ("too_deep", frame(&"0c0001".repeat(6))),
        ("truncated", frame("0b000100000010")[..40].to_owned()),
    ];
    let mut client = ThriftClient::start(
        &m.p.app,
        Some(&m.p.cgroup),
        SERVICE,
        &["--calls", "5", "--phases", "2"],
    )
    .unwrap();
    assert_eq!(client.result().replies(), 5);
    for (cause, hex) in cases {
        let r = send_raw(&m.p.app, Some(&m.p.cgroup), SERVICE, &hex);
        assert_eq!(r["outcome"], "closed", "{cause}: {r}");
        let sample = format!("tern_thrift_frames_rejected_total{{cause=\"{cause}\"}}");
        assert!(
            eventually(Duration::from_secs(2), || metric(&m.p.app, &sample) >= 1.0),
            "{cause} not counted"
        );
    }
    client.next_phase();
    let after = client.result();
    assert_eq!(
        after.replies(),
        5,
        "the well-behaved connection kept working: {after:?}"
    );
}

/// `POST /quitquitquit` drains: the request in flight finishes, and tern exits once its
/// connection closes.
#[test]
fn drain_lets_requests_in_flight_finish() {
    tern_tests::require_root!();
    let mut m = Mesh::start(&config(&["10.66.1.2:9001"], ""), &[]);
    let mut slow = ThriftClient::start(
        &m.p.app,
        Some(&m.p.cgroup),
        SERVICE,
        &["--method", "sleep", "--ms", "700"],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(admin(&m.p.app, "POST", "/quitquitquit").contains("OK"));
    let finished = slow.result();
    assert_eq!(
        finished.counts(),
        [("s1", 1)],
        "the request in flight was answered: {finished:?}"
    );
    m.tern.process.terminate().unwrap();
    assert!(m.tern.log().contains("tern stopped"), "{}", m.tern.log());
}

/// Calls the servers executed (their `served` counters), asked directly, not through tern.
fn executed(m: &Mesh) -> i64 {
    SERVERS
        .iter()
        .map(|(addr, _)| thrift_call(&m.p.srv, None, addr, &["--method", "served"]).values[0])
        .sum()
}

/// Four clients that keep calling through tern; returns them once each had a call answered,
/// and adds what they saw meanwhile to `seen` (`ok`, `failed`).
fn callers(m: &Mesh, seen: &mut [u64; 2]) -> Vec<ThriftClient> {
    let mut clients: Vec<ThriftClient> = (0..4)
        .map(|_| ThriftClient::retrying(&m.p.app, Some(&m.p.cgroup), SERVICE).unwrap())
        .collect();
    for c in &mut clients {
        assert!(
            eventually(Duration::from_secs(5), || add(seen, &c.report()) > 0),
            "a client's calls got no answer"
        );
    }
    clients
}

/// Adds a retrying client's report to `seen`; returns its `ok`.
fn add(seen: &mut [u64; 2], report: &serde_json::Value) -> u64 {
    let ok = report["ok"].as_u64().unwrap();
    seen[0] += ok;
    seen[1] += report["failed"].as_u64().unwrap();
    ok
}

/// SIGTERM while four clients keep calling, as a Pod stops: the application goes on calling
/// for a moment, then closes its connections. No call fails, and tern exits as soon as the
/// connections are closed, long before its drain timeout. Then a drain whose time runs out
/// under load: calls fail once tern is gone (the capture refuses them), but never a call a
/// server executed — the requests in flight are answered before the connections close.
#[test]
fn a_drain_under_load_fails_no_call_and_cuts_no_executed_one() {
    tern_tests::require_root!();
    drain_under_load(&config(&SERVERS.map(|(a, _)| a), ""));
}

/// [`a_drain_under_load_fails_no_call_and_cuts_no_executed_one`] with the calls' cluster on
/// multiplexed connections, which many client connections share.
#[test]
fn a_drain_under_load_over_multiplexed_connections_fails_no_call() {
    tern_tests::require_root!();
    let text = config(&SERVERS.map(|(a, _)| a), "").replace(
        "  - name: calc\n",
        "  - name: calc\n    thrift_upstream: multiplexed\n",
    );
    assert!(text.contains("multiplexed"));
    drain_under_load(&text);
}

fn drain_under_load(config: &str) {
    let mut m = Mesh::start(config, &["--drain-timeout-secs", "20"]);
    let before = executed(&m);
    let mut seen = [0, 0];
    let mut clients = callers(&m, &mut seen);
    m.tern.process.sigterm();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !m.tern.process.exited(),
        "tern exited with connections open"
    );
    for c in &mut clients {
        add(&mut seen, &c.stop());
    }
    assert!(
        eventually(Duration::from_secs(3), || m.tern.process.exited()),
        "tern did not exit once its connections were closed"
    );
    let [ok, failed] = seen;
    eprintln!("drained under load: {ok} calls answered, {failed} failed");
    assert_eq!(failed, 0, "calls failed while tern drained ({ok} answered)");
    assert!(
        ok > 100,
        "the clients kept calling while tern drained: {ok}"
    );
    assert_eq!(
        executed(&m) - before,
        ok as i64,
        "calls executed vs answered"
    );
    assert!(!m.tern.log().contains("drain timeout"), "{}", m.tern.log());

    m.tern =
        m.p.start_tern(&m.config, &["--drain-timeout-secs", "1"])
            .unwrap();
    let before = executed(&m);
    let mut seen = [0, 0];
    let mut clients = callers(&m, &mut seen);
    m.tern.process.sigterm();
    assert!(
        eventually(Duration::from_secs(8), || m.tern.process.exited()),
        "tern did not exit after its drain timeout"
    );
    std::thread::sleep(Duration::from_millis(300));
    for c in &mut clients {
        add(&mut seen, &c.stop());
    }
    let [ok, failed] = seen;
    eprintln!("drain timeout under load: {ok} calls answered, {failed} failed");
    assert!(
        failed > 0,
        "the clients kept calling until tern was gone ({ok} answered)"
    );
    assert_eq!(
        executed(&m) - before,
        ok as i64,
        "every call a server executed was answered ({failed} failed)"
    );
    assert!(
        m.tern.log().contains("drain timeout: no new requests"),
        "{}",
        m.tern.log()
    );
}

/// THeader, spoken by a second, independent implementation (Apache Thrift's Python library):
/// info headers route, both sequence ids are rewritten, binary and compact payloads.
#[test]
fn theader_clients_of_another_implementation_are_routed_by_header() {
    tern_tests::require_root!();
    let all: Vec<&str> = SERVERS.iter().map(|(a, _)| *a).collect();
    let m = Mesh::start(&config(&all, ""), &[]);
    let _py: Vec<Process> = [
        ("10.66.1.2:9101", "p1"),
        ("10.66.1.2:9102", "p2"),
        ("10.66.1.2:9103", "p3"),
    ]
    .iter()
    .map(|(addr, id)| tern_tests::python_serve(&m.p.srv, addr, id).unwrap())
    .collect();
    let script = tern_tests::theader_peer();
    let call = |args: &[&str]| -> serde_json::Value {
        let out =
            m.p.app
                .output(
                    Some(&m.p.cgroup),
                    std::path::Path::new("python3"),
                    &[&[script.to_str().unwrap(), "call", PYTHON], args].concat(),
                )
                .unwrap();
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"))
    };
    for compact in [&[][..], &["--compact"][..]] {
        let plain = call(&[&["100"], compact].concat());
        assert_eq!(
            plain["by_server"],
            serde_json::json!({"p1": 50, "p2": 50}),
            "{plain}"
        );
        assert_eq!(plain["seq_ok"], true);
        let v2 = call(&[&["10", "--header", "x-version=v2"], compact].concat());
        assert_eq!(v2["by_server"], serde_json::json!({"p3@v2": 10}), "{v2}");
        let picked = call(
            &[
                &["4", "--header", "x-pick=yes", "--header", "x-cluster=py-v2"],
                compact,
            ]
            .concat(),
        );
        assert_eq!(
            picked["by_server"],
            serde_json::json!({"p3": 4}),
            "cluster from a header: {picked}"
        );
    }
}

/// A cluster's circuit breaker answers the requests over its limit at once, in Thrift.
#[test]
fn circuit_breaker_overflow_answers_in_thrift() {
    tern_tests::require_root!();
    let m = Mesh::start(&config(&["10.66.1.2:9001"], ""), &[]);
    let c = m.call(
        TIGHT,
        &[
            "--method",
            "sleep",
            "--ms",
            "300",
            "--calls",
            "3",
            "--pipeline",
        ],
    );
    assert_eq!(c.counts(), [("s2", 1)], "{c:?}");
    assert_eq!(c.app_errors.len(), 2, "{c:?}");
    assert!(
        c.app_errors.iter().all(|e| e.contains("max_requests")),
        "{c:?}"
    );
    assert!(
        c.seq_ok,
        "local replies keep their request's place and sequence id"
    );
    assert_eq!(
        metric(
            &m.p.app,
            "tern_thrift_local_replies_total{cluster=\"tight\",cause=\"overflow\"}"
        ),
        2.0
    );
}

/// A server that accepts connections and never answers.
const HOLE: &str = "10.66.1.2:9004";
/// Least request keeps away from a server that accepts and never answers (istiod sends
/// LEAST_REQUEST for most clusters): once one call waited on it past the timeout, four
/// closed-loop callers lose no call while its slowness is remembered. Weighing in-flight
/// counts alone sent it a call whenever both choices fell on it or its count was the lower:
/// every few calls, one hung for the whole timeout.
#[test]
fn least_request_keeps_away_from_a_server_that_never_answers() {
    tern_tests::require_root!();
    least_request_past_a_hole("");
}

/// [`least_request_keeps_away_from_a_server_that_never_answers`] over multiplexed
/// connections, where the hole's one connection takes many calls before any times out.
#[test]
fn least_request_over_multiplexed_connections_keeps_away_from_a_server_that_never_answers() {
    tern_tests::require_root!();
    least_request_past_a_hole("    thrift_upstream: multiplexed\n");
}

fn least_request_past_a_hole(upstream: &str) {
    let config = one_cluster(
        "lr",
        &format!(
            "    lb_policy: least_request\n    timeout_ms: 1000\n{upstream}    endpoints: \
             [ {{ address: 10.66.1.2:9001 }}, {{ address: 10.66.1.2:9002 }}, {{ address: {HOLE} }} ]\n"
        ),
    );
    let m = Mesh::start(&config, &[]);
    let _hole = tern_tests::hung_server(&m.p.srv, HOLE).unwrap();
    let callers = |calls: &str| -> Vec<Calls> {
        std::thread::scope(|s| {
            let running: Vec<_> = (0..4)
                .map(|_| s.spawn(|| m.call(SERVICE, &["--calls", calls])))
                .collect();
            running.into_iter().map(|c| c.join().unwrap()).collect()
        })
    };
    let hole_requests = || tern_tests::endpoint_requests(&m.p.app, "lr", HOLE);
    // An endpoint nothing is known of is tried: the hole gets a call, which times out.
    assert!(
        eventually(Duration::from_secs(30), || {
            callers("50");
            hole_requests() >= 1
        }),
        "the hole was never tried: {}",
        admin(&m.p.app, "GET", "/clusters")
    );
    std::thread::sleep(Duration::from_millis(1200));
    let tried = hole_requests();
    let started = std::time::Instant::now();
    let measured = callers("500");
    let elapsed = started.elapsed();
    let outcome: Vec<(u64, usize)> = measured
        .iter()
        .map(|c| (c.replies(), c.app_errors.len()))
        .collect();
    assert_eq!(
        hole_requests(),
        tried,
        "(replies, failures) of each caller: {outcome:?}\n{}",
        admin(&m.p.app, "GET", "/clusters")
    );
    for c in &measured {
        assert_eq!(c.replies(), 500, "{c:?}");
        assert!(c.app_errors.is_empty(), "a call hung on the hole: {c:?}");
    }
    eprintln!(
        "4 callers past the hole: {:.0} calls/s",
        2000.0 / elapsed.as_secs_f64()
    );
}

/// A listener whose calls go to cluster `mux`: multiplexed, one connection to `endpoint`.
fn multiplexed_config(endpoint: &str, timeout_ms: u64) -> String {
    one_cluster(
        "mux",
        &format!(
            "    thrift_upstream: multiplexed\n    connections_per_endpoint: 1\n    \
             timeout_ms: {timeout_ms}\n    endpoints: [ {{ address: {endpoint} }} ]\n"
        ),
    )
}

/// A Thrift listener whose calls all go to the cluster `name`, its settings `cluster` (YAML
/// lines, indented under it).
fn one_cluster(name: &str, cluster: &str) -> String {
    format!(
        "listeners:\n  - address: {SERVICE}\n    filter_chains:\n      \
         - thrift_proxy: {{ default_cluster: {name} }}\nclusters:\n  - name: {name}\n{cluster}"
    )
}

/// A multiplexed connection to an endpoint that left the configuration closes once no live
/// request waits on it — also when the request it still held gave up at its timeout instead
/// of being answered (a server that accepts and never answers, removed while a call waited).
#[test]
fn a_removed_endpoints_multiplexed_connection_closes_after_its_last_request_times_out() {
    tern_tests::require_root!();
    let m = Mesh::start(&multiplexed_config(HOLE, 2000), &[]);
    let _hole = tern_tests::hung_server(&m.p.srv, HOLE).unwrap();
    let open = || {
        metric(
            &m.p.app,
            "tern_upstream_connections_active{cluster=\"mux\"}",
        )
    };
    let mut waiting = ThriftClient::start(&m.p.app, Some(&m.p.cgroup), SERVICE, &[]).unwrap();
    assert!(
        eventually(Duration::from_secs(2), || open() == 1.0),
        "no connection to the hole: {}",
        admin(&m.p.app, "GET", "/stats/prometheus")
    );
    // The hole leaves while the call waits on it.
    m.reconfigure(&multiplexed_config("10.66.1.2:9001", 2000));
    let c = waiting.result();
    assert_eq!(c.app_errors.len(), 1, "{c:?}");
    assert!(c.app_errors[0].contains("timeout"), "{c:?}");
    assert!(
        eventually(Duration::from_secs(5), || open() == 0.0),
        "the removed endpoint's connection is still open ({}) after its only request timed out",
        open()
    );
    // The endpoint that replaced it serves.
    assert_eq!(m.call(SERVICE, &[]).counts(), [("s1", 1)]);
}

/// A server that writes every reply twice: the second copy goes out ahead of the reply to
/// the next call on that connection. Two callers take turns, with their calls numbered 0 as
/// Apache Thrift's Python and C++ clients number every call, over the one worker's pool of
/// exclusive connections (so the copy of one caller's reply waits on a connection the other
/// caller's call takes next). Each call gets its own reply or an exception, never the reply
/// written for the other caller: tern numbers the calls it sends on a connection itself.
#[test]
fn a_reply_written_twice_never_answers_another_callers_call() {
    tern_tests::require_root!();
    reply_written_twice("");
}

/// [`a_reply_written_twice_never_answers_another_callers_call`] over a multiplexed
/// connection, where the two callers' calls share one connection.
#[test]
fn a_reply_written_twice_never_answers_another_callers_call_over_a_multiplexed_connection() {
    tern_tests::require_root!();
    reply_written_twice("    thrift_upstream: multiplexed\n    connections_per_endpoint: 1\n");
}

/// On istiod's shape: a plain `tcp_proxy` to a cluster whose name does not say Thrift (tern
/// finds it by its first bytes).
fn reply_written_twice(upstream: &str) {
    let cluster = "outbound|9090||echo.default.svc.cluster.local";
    let config = format!(
        "listeners:\n  - address: {SERVICE}\n    filter_chains: [ {{ tcp_proxy: {{ cluster: \
         '{cluster}' }} }} ]\nclusters:\n  - name: '{cluster}'\n{upstream}    endpoints: \
         [ {{ address: {TWICE} }} ]\n"
    );
    let m = Mesh::start(&config, &["--concurrency", "1"]);
    let peer = tern_tests::python_peer("protocols_peer.py");
    let _twice = tern_tests::start_server(
        &m.p.srv,
        None,
        std::path::Path::new("python3"),
        &[peer.to_str().unwrap(), "serve", TWICE, "twice"],
    )
    .unwrap();
    let seen = tern_tests::python_json(
        &m.p.app,
        Some(&m.p.cgroup),
        "protocols_peer.py",
        &["tags", SERVICE, "2", "50"],
    );
    eprintln!("two callers, a server that writes every reply twice ({upstream:?}): {seen}");
    assert_eq!(
        seen["foreign"], 0,
        "replies to the other caller's calls: {seen}"
    );
    assert!(
        seen["own"].as_u64() >= Some(40) && seen["failed"].as_u64() > Some(0),
        "{seen}"
    );
}

/// A server that writes every reply twice.
const TWICE: &str = "10.66.1.2:9005";

/// A reply under another method's name answers no call: over a multiplexed connection,
/// where tern maps the sequence ids itself and keeps only the method's name of each request
/// it waits on, the caller gets an error instead, the connection closes, and the next call
/// is served on a new one.
#[test]
fn a_multiplexed_reply_under_another_methods_name_answers_no_call() {
    tern_tests::require_root!();
    let m = Mesh::start(&multiplexed_config("10.66.1.2:9001", 2000), &[]);
    let c = m.call(SERVICE, &["--method", "misnamed"]);
    assert!(
        c.by_server.is_empty(),
        "the misnamed reply reached the call: {c:?}"
    );
    assert_eq!(c.app_errors.len(), 1, "{c:?}");
    let opened = || metric(&m.p.app, "tern_upstream_connections_total{cluster=\"mux\"}");
    assert_eq!(opened(), 1.0);
    assert_eq!(m.call(SERVICE, &[]).counts(), [("s1", 1)]);
    assert_eq!(opened(), 2.0, "the connection that sent it was closed");
}

/// A multiplexed connection to a server that never answers keeps the id of every request
/// sent on it, so that a late reply cannot reach another request: it holds a bounded number
/// (1,024), then takes no more and closes once they all gave up, while a new connection
/// takes the calls. Without the bound, one connection held them all for good.
#[test]
fn a_multiplexed_connection_to_a_hung_server_holds_a_bounded_number_of_requests() {
    tern_tests::require_root!();
    let m = Mesh::start(&multiplexed_config(HOLE, 100), &[]);
    let _hole = tern_tests::hung_server(&m.p.srv, HOLE).unwrap();
    let c = m.call(SERVICE, &["--calls", "1100", "--pipeline"]);
    assert_eq!(c.app_errors.len(), 1100, "{}", c.app_errors.len());
    assert!(c.app_errors.iter().all(|e| e.contains("timeout")), "{c:?}");
    let opened = metric(&m.p.app, "tern_upstream_connections_total{cluster=\"mux\"}");
    assert_eq!(
        opened, 2.0,
        "1,100 requests to a hung server took {opened} connections"
    );
    // The first connection, whose requests all gave up, closes; the second holds 76.
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &m.p.app,
            "tern_upstream_connections_active{cluster=\"mux\"}"
        ) == 1.0),
        "{}",
        admin(&m.p.app, "GET", "/stats/prometheus")
    );
}

/// Requests share a multiplexed connection until 8 wait on it: they go out in one write and
/// their replies come back in one read. Only then does another open, up to
/// `connections_per_endpoint` (4 by default). Before, a request that found every connection
/// with one waiting opened another: 8 calls at once took 4 connections, and each request
/// cost a write and a read of its own.
#[test]
fn multiplexed_requests_fill_a_connection_before_another_opens() {
    tern_tests::require_root!();
    let config = multiplexed_config(HOLE, 500).replace("    connections_per_endpoint: 1\n", "");
    let m = Mesh::start(&config, &[]);
    // Nothing is answered, so every request stays on its connection: the count is exact.
    let _hole = tern_tests::hung_server(&m.p.srv, HOLE).unwrap();
    let opened = || metric(&m.p.app, "tern_upstream_connections_total{cluster=\"mux\"}");
    let c = m.call(SERVICE, &["--calls", "8", "--pipeline"]);
    assert_eq!(c.app_errors.len(), 8, "{c:?}");
    assert_eq!(
        opened(),
        1.0,
        "8 calls at once opened more than one connection"
    );
    // The first connection still holds the ids of its 8 (a late reply must find them): 40
    // more fill three more connections, and the last 16 share the four.
    let c = m.call(SERVICE, &["--calls", "40", "--pipeline"]);
    assert_eq!(c.app_errors.len(), 40, "{c:?}");
    assert_eq!(opened(), 4.0, "{}", admin(&m.p.app, "GET", "/clusters"));
}
