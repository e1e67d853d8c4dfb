//! Behind real Thrift servers, which answer one request per connection at a time (Apache
//! Thrift's Python `TThreadedServer`, `tests/python/serial_peer.py`): slow callers do not stall
//! fast ones, and a reply that arrives after its request timed out never reaches another
//! request — with exclusive connections (the default) and multiplexed ones (opt-in), in
//! binary and compact.
use std::time::Duration;

use tern_tests::{
    ConfigFile, Pods, Process, Tern, ThriftClient, endpoint_requests, eventually, hung_server,
    pods, python_peer, start_server,
};

/// Exclusive (default) and multiplexed clusters over the binary server (9201) and the
/// compact one (9202), and least request over 9201, a second binary server (9203) and a
/// server that never answers (9204), as istiod sends most clusters. Every cluster times
/// requests out after 300 ms, except the least-request one (1 s) and `whoami` calls on the
/// multiplexed listeners (2 s), which queue behind a sleeping call on the one shared
/// connection of a serial server.
const CONFIG: &str = r#"
listeners:
  - address: 10.96.0.40:9090
    filter_chains: [ { tcp_proxy: { cluster: 'outbound|9090||serial.default.svc.cluster.local' } } ]
  - address: 10.96.0.41:9090
    filter_chains: [ { tcp_proxy: { cluster: 'outbound|9090||serial-compact.default.svc.cluster.local' } } ]
  - address: 10.96.0.44:9090
    filter_chains: [ { tcp_proxy: { cluster: 'outbound|9090||serial-lr.default.svc.cluster.local' } } ]
  - address: 10.96.0.42:9090
    filter_chains:
      - thrift_proxy:
          routes: [ { match: { method: whoami }, route: { cluster: mux }, timeout_ms: 2000 } ]
          default_cluster: mux
  - address: 10.96.0.43:9090
    filter_chains:
      - thrift_proxy:
          routes: [ { match: { method: whoami }, route: { cluster: mux-compact }, timeout_ms: 2000 } ]
          default_cluster: mux-compact
clusters:
  - name: 'outbound|9090||serial.default.svc.cluster.local'
    timeout_ms: 300
    endpoints: [ { address: 10.66.1.2:9201 } ]
  - name: 'outbound|9090||serial-compact.default.svc.cluster.local'
    timeout_ms: 300
    endpoints: [ { address: 10.66.1.2:9202 } ]
  - name: 'outbound|9090||serial-lr.default.svc.cluster.local'
    lb_policy: least_request
    timeout_ms: 1000
    endpoints: [ { address: 10.66.1.2:9201 }, { address: 10.66.1.2:9203 }, { address: 10.66.1.2:9204 } ]
  - name: mux
    thrift_upstream: multiplexed
    connections_per_endpoint: 1
    timeout_ms: 300
    endpoints: [ { address: 10.66.1.2:9201 } ]
  - name: mux-compact
    thrift_upstream: multiplexed
    connections_per_endpoint: 1
    timeout_ms: 300
    endpoints: [ { address: 10.66.1.2:9202 } ]
"#;

const EXCLUSIVE: [&str; 2] = ["10.96.0.40:9090", "10.96.0.41:9090"];
const MULTIPLEXED: [&str; 2] = ["10.96.0.42:9090", "10.96.0.43:9090"];

struct Setup {
    p: Pods,
    _tern: Tern,
    _servers: Vec<Process>,
    _config: ConfigFile,
}

fn setup() -> Setup {
    let p = pods();
    let peer = python_peer("serial_peer.py");
    let servers = [
        ("10.66.1.2:9201", "b", false),
        ("10.66.1.2:9202", "c", true),
    ]
    .iter()
    .map(|(addr, id, compact)| {
        let mut args = vec![peer.to_str().unwrap(), "serve", addr, id];
        if *compact {
            args.push("--compact");
        }
        start_server(&p.srv, None, std::path::Path::new("python3"), &args).unwrap()
    })
    .collect();
    let config = ConfigFile::new(CONFIG).unwrap();
    let tern = p.start_tern(&config, &[]).unwrap();
    Setup {
        p,
        _tern: tern,
        _servers: servers,
        _config: config,
    }
}

fn protocol(addr: &str) -> &'static str {
    if addr.starts_with("10.96.0.41") || addr.starts_with("10.96.0.43") {
        "compact"
    } else {
        "binary"
    }
}

fn client(s: &Setup, addr: &str, args: &[&str]) -> ThriftClient {
    let args = [
        args,
        &["--transport", "framed", "--protocol", protocol(addr)][..],
    ]
    .concat();
    ThriftClient::start(&s.p.app, Some(&s.p.cgroup), addr, &args).unwrap()
}

/// Four clients call a method that takes 1.5 s (five times the timeout) while six others
/// make fast calls: with a connection per request, every fast call succeeds.
#[test]
fn slow_callers_do_not_stall_fast_callers() {
    tern_tests::require_root!();
    let s = setup();
    for addr in EXCLUSIVE {
        let mut slow: Vec<ThriftClient> = (0..4)
            .map(|_| {
                client(
                    &s,
                    addr,
                    &["--method", "sleep", "--ms", "1500", "--calls", "3"],
                )
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut fast: Vec<ThriftClient> = (0..6)
            .map(|_| client(&s, addr, &["--calls", "200"]))
            .collect();
        for f in &mut fast {
            let calls = f.result();
            assert_eq!(calls.app_errors, Vec::<String>::new(), "{addr}: {calls:?}");
            assert_eq!(
                calls.counts(),
                [(
                    if protocol(addr) == "compact" {
                        "c"
                    } else {
                        "b"
                    },
                    200
                )],
                "{addr}: {calls:?}"
            );
        }
        for s in &mut slow {
            let calls = s.result();
            assert_eq!(calls.app_errors.len(), 3, "{addr}: {calls:?}");
            assert!(
                calls.app_errors.iter().all(|e| e.contains("timeout")),
                "{calls:?}"
            );
        }
    }
}

/// A call that the server answers after its timeout; then another caller's calls: each gets
/// its own reply, never the late one (`late:…`), in both modes and both protocols.
#[test]
fn a_late_reply_never_reaches_another_request() {
    tern_tests::require_root!();
    let s = setup();
    for addr in EXCLUSIVE.into_iter().chain(MULTIPLEXED) {
        let mut slow = client(&s, addr, &["--method", "sleep", "--ms", "700"]);
        std::thread::sleep(Duration::from_millis(400));
        // The slow call timed out; its reply comes at 700 ms, while these are in flight.
        let mut next = client(&s, addr, &["--calls", "100", "--pipeline"]);
        let timed_out = slow.result();
        assert_eq!(timed_out.app_errors.len(), 1, "{addr}: {timed_out:?}");
        assert!(
            timed_out.app_errors[0].contains("timeout"),
            "{addr}: {timed_out:?}"
        );
        let calls = next.result();
        let id = if protocol(addr) == "compact" {
            "c"
        } else {
            "b"
        };
        assert_eq!(calls.counts(), [(id, 100)], "{addr}: {calls:?}");
        assert!(
            calls.seq_ok && calls.app_errors.is_empty(),
            "{addr}: {calls:?}"
        );
    }
}

/// The least-request cluster's listener, its name, and its endpoint that never answers.
const LEAST_REQUEST: &str = "10.96.0.44:9090";
const LEAST_REQUEST_CLUSTER: &str = "outbound|9090||serial-lr.default.svc.cluster.local";
const HOLE: &str = "10.66.1.2:9204";

/// On istiod's shape (a `tcp_proxy` chain, Thrift found by detection, `LEAST_REQUEST`) over
/// Apache Thrift's serial servers, one endpoint of three accepts and never answers: once a
/// call waited on it past the timeout, four closed-loop callers lose no call and send it
/// nothing while its slowness is remembered. (With random choice instead, each caller's 300
/// calls met the timeout about 100 times.)
#[test]
fn least_request_keeps_serial_callers_away_from_a_server_that_never_answers() {
    tern_tests::require_root!();
    let s = setup();
    let _second = tern_tests::serial_thrift_serve(&s.p.srv, "10.66.1.2:9203", "b2").unwrap();
    let _hole = hung_server(&s.p.srv, HOLE).unwrap();
    let callers = |calls: &str| -> Vec<tern_tests::Calls> {
        let mut running: Vec<ThriftClient> = (0..4)
            .map(|_| client(&s, LEAST_REQUEST, &["--calls", calls]))
            .collect();
        running.iter_mut().map(ThriftClient::result).collect()
    };
    let hole_requests = || endpoint_requests(&s.p.app, LEAST_REQUEST_CLUSTER, HOLE);
    // An endpoint nothing is known of is tried: the hole gets a call, which times out.
    assert!(
        eventually(Duration::from_secs(30), || {
            callers("50");
            hole_requests() >= 1
        }),
        "the hole was never tried"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let tried = hole_requests();
    let measured = callers("300");
    let failed: Vec<usize> = measured.iter().map(|c| c.app_errors.len()).collect();
    assert_eq!(
        hole_requests(),
        tried,
        "calls failed per caller: {failed:?}"
    );
    for c in &measured {
        assert!(c.app_errors.is_empty(), "a call hung on the hole: {c:?}");
        assert_eq!(c.replies(), 300, "{c:?}");
        assert!(
            c.counts().iter().all(|(id, _)| ["b", "b2"].contains(id)),
            "{c:?}"
        );
    }
    let answered: std::collections::BTreeSet<&str> = measured
        .iter()
        .flat_map(|c| c.counts().into_iter().map(|(id, _)| id))
        .collect();
    assert_eq!(answered.len(), 2, "both live servers answer: {measured:?}");
}
