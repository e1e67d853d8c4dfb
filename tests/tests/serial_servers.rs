//! Behind real Thrift servers, which answer one request per connection at a time (Apache
//! Thrift's Python `TThreadedServer`, `tests/python/serial_peer.py`): slow callers do not stall
//! fast ones, and a reply that arrives after its request timed out never reaches another
//! request — with exclusive connections (the default) and multiplexed ones (opt-in), in
//! binary and compact.
use std::time::Duration;

use tern_tests::{ConfigFile, Pods, Process, Tern, ThriftClient, pods, python_peer, start_server};

/// Exclusive (default) and multiplexed clusters over the binary server (9201) and the
/// compact one (9202); every cluster times requests out after 300 ms, except `whoami` calls
/// on the multiplexed listeners (2 s), which queue behind a sleeping call on the one shared
/// connection of a serial server.
const CONFIG: &str = r#"
listeners:
  - address: 10.96.0.40:9090
    filter_chains: [ { tcp_proxy: { cluster: 'outbound|9090||serial.default.svc.cluster.local' } } ]
  - address: 10.96.0.41:9090
    filter_chains: [ { tcp_proxy: { cluster: 'outbound|9090||serial-compact.default.svc.cluster.local' } } ]
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
