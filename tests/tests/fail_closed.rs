//! tern's protection tried as an attacker would, with configuration shaped as istiod writes
//! it: each test is a way around mTLS or authorization that once worked, and must not.
//! The peers are real: Apache Thrift's Python servers (whose processors dispatch on the
//! method name and ignore the message type), Python `ssl`, istiod's stand-in.
use std::{path::Path, time::Duration};

use tern_tests::{
    Istiod, Netns, Pods, Process, Tern, eventually, metric, pods, python_json, python_peer,
    start_server, unique,
};

/// A file the test's servers write; removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(what: &str) -> Self {
        Self(std::env::temp_dir().join(unique(what)))
    }

    fn read(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }

    fn str(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A Python Thrift server in the application Pod that logs every method it runs.
fn method_logging_server(p: &Pods, addr: &str, log: &TempFile, extra: &[&str]) -> Process {
    let script = python_peer("bypass_peer.py");
    let args = [
        &[script.to_str().unwrap(), "serve", addr, log.str()][..],
        extra,
    ]
    .concat();
    start_server(&p.app, None, Path::new("python3"), &args).unwrap()
}

fn send(ns: &Netns, addr: &str, mode: &str, method: &str) -> serde_json::Value {
    python_json(ns, None, "bypass_peer.py", &["send", addr, mode, method])
}

struct Mesh {
    p: Pods,
    cp: Istiod,
    tern: Tern,
}

/// The control plane serving `snapshot`, and tern in the application Pod capturing inbound
/// `ports`.
fn mesh(snapshot: &str, ports: &str) -> Mesh {
    mesh_with(snapshot, ports, &[])
}

/// [`mesh`], with more arguments for tern.
fn mesh_with(snapshot: &str, ports: &str, extra: &[&str]) -> Mesh {
    let p = pods();
    let cp = Istiod::start(&p.app, "127.0.0.1:15010", snapshot, &[]).unwrap();
    let args = [&["--inbound-ports", ports, "--access-log"][..], extra].concat();
    let tern = p
        .start_tern_xds(&args, "info,tern=debug")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cp.events()));
    Mesh { p, cp, tern }
}

/// How many pipe ends tern holds beyond its standard streams (a relay that splices holds a
/// pipe per direction).
fn pipes(tern: &Tern) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", tern.process.pid()))
        .map(|fds| {
            fds.filter_map(|fd| fd.ok())
                .filter(|fd| fd.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) > Some(2))
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("pipe:"))
                .count()
        })
        .unwrap_or(0)
}

/// tern's peak resident memory, in MiB.
fn peak_rss_mib(tern: &Tern) -> f64 {
    tern_tests::proc_kib(tern.process.pid(), "VmHWM") as f64 / 1024.0
}

fn refused(m: &Mesh, reason: &str) -> f64 {
    metric(
        &m.p.app,
        &format!(r#"tern_connections_refused_total{{direction="inbound",reason="{reason}"}}"#),
    )
}

/// `deny echo` is in force on a chain: no way of framing `echo` reaches the application.
/// A message typed REPLY or EXCEPTION (processors dispatch on the name), old non-strict
/// binary (Java's and Python's `TBinaryProtocol` read it by default) and THeader with the
/// zlib transform (tern does not decode it) are refused at the first message; a proper
/// call is answered with `RBAC: access denied`; `whoami` still runs.
#[test]
fn thrift_method_rules_cannot_be_bypassed() {
    tern_tests::require_root!();
    let snapshot = r#"version: "1"
inbound_rbac:
  - { name: "ns[default]-policy[deny-echo]-rule[0]", action: deny, ports: [9090, 9091], methods: ["echo"] }
"#;
    let m = mesh(snapshot, "9090,9091");
    let (header_log, strict_log) = (TempFile::new("ran-header"), TempFile::new("ran-nonstrict"));
    let _header = method_logging_server(&m.p, "10.66.1.1:9090", &header_log, &[]);
    let _loose = method_logging_server(&m.p, "10.66.1.1:9091", &strict_log, &["--non-strict"]);
    for mode in ["reply", "exception", "zlib"] {
        let out = send(&m.p.srv, "10.66.1.1:9090", mode, "echo");
        assert_eq!(out["answered"], 0, "{mode}: {out}");
    }
    let out = send(&m.p.srv, "10.66.1.1:9091", "non-strict", "echo");
    assert_eq!(out["answered"], 0, "non-strict: {out}");
    // A proper call is refused with an exception; an allowed one runs.
    let out = send(&m.p.srv, "10.66.1.1:9090", "call", "echo");
    assert!(out["answered"].as_u64().unwrap() > 0, "{out}");
    let out = send(&m.p.srv, "10.66.1.1:9090", "call", "whoami");
    assert!(out["answered"].as_u64().unwrap() > 0, "{out}");
    assert!(
        eventually(Duration::from_secs(5), || header_log
            .read()
            .contains("whoami")),
        "{}",
        m.tern.log()
    );
    let ran = format!("{}{}", header_log.read(), strict_log.read());
    assert!(!ran.contains("echo"), "echo ran: {ran}\n{}", m.tern.log());
    assert!(refused(&m, "not_a_thrift_call") >= 4.0, "{}", m.tern.log());
    drop(m.cp);
}

/// A policy pushed while connections are open reaches them: the next call on an open
/// Thrift connection is decided by the new rule, a relayed connection the new rule denies is
/// closed (a bulk transfer spliced inside the kernel too), and a new connection is refused — nothing keeps the policy of the moment it
/// opened.
#[test]
fn a_policy_pushed_mid_connection_reaches_open_connections() {
    tern_tests::require_root!();
    let m = mesh("version: \"1\"\n", "9090,8080");
    let idle_pipes = pipes(&m.tern);
    let log = TempFile::new("ran-session");
    let _thrift = method_logging_server(&m.p, "10.66.1.1:9090", &log, &[]);
    let _echo = tern_tests::serve(&m.p.app, &["10.66.1.1:8080"]).unwrap();
    let srv = &m.p.srv;
    let (outcomes, held, ran_by_then) = std::thread::scope(|scope| {
        let session = scope.spawn(|| {
            python_json(
                srv,
                None,
                "bypass_peer.py",
                &["session", "10.66.1.1:9090", "30", "100", "whoami"],
            )
        });
        let held = scope.spawn(|| {
            python_json(
                srv,
                None,
                "bypass_peer.py",
                &["hold", "10.66.1.1:8080", "4"],
            )
        });
        let bulk = scope.spawn(|| {
            python_json(
                srv,
                None,
                "bypass_peer.py",
                &["bulk", "10.66.1.1:8080", "4"],
            )
        });
        // Every connection is served (the relays once tern connected to the application),
        // and the bulk one is spliced: tern holds pipes.
        assert!(
            eventually(Duration::from_secs(5), || log.read().contains("whoami")
                && m.tern
                    .log()
                    .matches("relaying original_dst=10.66.1.1:8080")
                    .count()
                    >= 2
                && pipes(&m.tern) > idle_pipes),
            "pipes: {} (idle: {idle_pipes})\n{}",
            pipes(&m.tern),
            m.tern.log()
        );
        std::thread::sleep(Duration::from_millis(300));
        m.cp.push(
            r#"version: "2"
inbound_rbac:
  - { name: "ns[default]-policy[deny-whoami]-rule[0]", action: deny, ports: [9090], methods: ["whoami"] }
  - { name: "ns[default]-policy[deny-8080]-rule[0]", action: deny, ports: [8080] }
"#,
        );
        assert!(m.cp.wait_for("ACK Listener 2"), "{}", m.cp.events());
        // What ran until the new policy is in force (a call already on its way when the push
        // landed may still complete at the application: the relay is then closed under it).
        std::thread::sleep(Duration::from_millis(200));
        let ran_by_then = log.read().matches("whoami").count();
        // The spliced relay is closed too, and its pipes given back.
        assert!(
            eventually(Duration::from_secs(2), || pipes(&m.tern) == idle_pipes),
            "pipes: {} (idle: {idle_pipes})",
            pipes(&m.tern)
        );
        let bulk = bulk.join().unwrap();
        assert_eq!(bulk["closed"], true, "{bulk}\n{}", m.tern.log());
        assert!(bulk["received"].as_u64().unwrap() > 1 << 20, "{bulk}");
        (session.join().unwrap(), held.join().unwrap(), ran_by_then)
    });
    let outcomes: Vec<&str> = outcomes["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    // Calls before the push ran; from the first that did not, none ran: the connection
    // was relayed, so it is closed (a relay cannot be held to method rules).
    let first_stopped = outcomes.iter().position(|o| *o != "ran");
    assert!(
        first_stopped.is_some_and(|i| i > 0 && !outcomes[i..].contains(&"ran")),
        "{outcomes:?}\n{}",
        m.tern.log()
    );
    // A new connection is held to the new rule call by call.
    let out = send(&m.p.srv, "10.66.1.1:9090", "call", "whoami");
    assert!(out["answered"].as_u64().unwrap() > 0, "{out}");
    let ran = log.read().matches("whoami").count();
    assert_eq!(ran, ran_by_then, "whoami ran after the push: {outcomes:?}");
    assert!(
        ran <= first_stopped.unwrap() + 1,
        "{ran} calls ran, {outcomes:?}"
    );
    assert_eq!(held["closed"], true, "{held}\n{}", m.tern.log());
    assert!(held["echoes"].as_u64().unwrap() > 0, "{held}");
    assert!(refused(&m, "rbac") >= 1.0, "{}", m.tern.log());
    let again = tern_tests::connect(&m.p.srv, None, "10.66.1.1:8080");
    assert!(!again.ok(), "{again:?}");
}

/// No secret goes over plaintext: a plaintext control plane never receives the token (it
/// sees streams without one), and a plaintext CA address is refused at start, before any
/// certificate is requested.
#[test]
fn no_secret_over_plaintext() {
    tern_tests::require_root!();
    let p = pods();
    let token = TempFile::new("istio-token");
    std::fs::write(&token.0, "secret-istio-token").unwrap();
    let cp = Istiod::start(
        &p.app,
        "127.0.0.1:15010",
        "version: \"1\"\n",
        &["--token".to_owned(), token.str().to_owned()],
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let args = [
            &[
                "run",
                "--capture",
                "ebpf",
                "--cgroup",
                p.cgroup.path_str(),
                "--inbound-ports",
                "",
                "--xds-address",
                "http://127.0.0.1:15010",
                "--xds-token-file",
                token.str(),
            ][..],
            extra,
        ]
        .concat();
        Tern::start(&p.app, Some(&p.cgroup), &args)
    };
    let tern = run(&[]).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || cp
            .events()
            .contains("REJECT no token")),
        "{}\n{}",
        cp.events(),
        tern.log()
    );
    assert!(
        !cp.events().contains("secret-istio-token"),
        "{}",
        cp.events()
    );
    assert!(
        tern.log().contains("never sent in cleartext"),
        "{}",
        tern.log()
    );
    drop(tern);
    let refused = run(&["--ca-address", "http://127.0.0.1:15010"])
        .err()
        .unwrap();
    assert!(refused.to_string().contains("is plaintext"), "{refused:#}");
}

/// 40 clients each hold an 8 MiB Thrift frame without its last byte (on a chain whose rules
/// need the method, so tern buffers it): the read buffers' budget (64 MiB by default) closes
/// the ones past it, tern stays far under the injected 256 Mi limit, and it keeps serving.
/// A client that starts a message and stalls is closed when its time is up.
#[test]
fn a_flood_of_half_sent_frames_leaves_tern_bounded_and_serving() {
    tern_tests::require_root!();
    let snapshot = r#"version: "1"
inbound_rbac:
  - { name: "ns[default]-policy[deny-echo]-rule[0]", action: deny, methods: ["echo"] }
"#;
    let m = mesh_with(snapshot, "9090", &["--message-timeout-secs", "3"]);
    let log = TempFile::new("ran-flood");
    let _server = method_logging_server(&m.p, "10.66.1.1:9090", &log, &[]);
    let before = peak_rss_mib(&m.tern);
    let srv = &m.p.srv;
    let flood = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            python_json(
                srv,
                None,
                "bypass_peer.py",
                &["flood", "10.66.1.1:9090", "40", &(8 << 20).to_string(), "5"],
            )
        });
        // Serving meanwhile.
        std::thread::sleep(Duration::from_millis(500));
        let out = send(srv, "10.66.1.1:9090", "call", "whoami");
        assert!(
            out["answered"].as_u64().unwrap() > 0,
            "{out}\n{}",
            m.tern.log()
        );
        flood.join().unwrap()
    });
    let peak = peak_rss_mib(&m.tern);
    eprintln!("tern peak RSS under the flood: {peak:.1} MiB (before: {before:.1} MiB)");
    assert!(
        flood["closed"].as_u64().unwrap() >= 30,
        "{flood}: the budget closed the connections past it"
    );
    assert!(refused(&m, "overloaded") >= 30.0, "{}", m.tern.log());
    assert!(peak < 160.0, "peak RSS {peak:.1} MiB (before: {before:.1})");
    assert!(log.read().contains("whoami"));
    assert!(!log.read().contains("echo"));
    // The half-sent frames within the budget were closed when their time (3 s) was up,
    // while their clients still held them.
    assert!(
        refused(&m, "first_bytes_timeout") >= 1.0,
        "{}",
        m.tern.log()
    );
    assert_eq!(
        refused(&m, "first_bytes_timeout") + refused(&m, "overloaded"),
        40.0,
        "{}",
        m.tern.log()
    );
    let out = send(srv, "10.66.1.1:9090", "call", "whoami");
    assert!(out["answered"].as_u64().unwrap() > 0, "{out}");
}

/// `/quitquitquit` (any process in the Pod can POST it) and a crash stop tern, not the
/// protection: the capture stays, so inbound is refused until tern is back; the restarted
/// tern serves again (once its inbound policy is in force).
#[test]
fn quitquitquit_and_a_crash_leave_inbound_closed() {
    tern_tests::require_root!();
    let mut m = mesh("version: \"1\"\n", "8080");
    let _app = tern_tests::serve(&m.p.app, &["10.66.1.1:8080"]).unwrap();
    assert!(tern_tests::connect(&m.p.srv, None, "10.66.1.1:8080").ok());
    // A GET does not stop it.
    tern_tests::admin(&m.p.app, "GET", "/quitquitquit");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!m.tern.process.exited());
    tern_tests::admin(&m.p.app, "POST", "/quitquitquit");
    assert!(
        eventually(Duration::from_secs(10), || m.tern.process.exited()),
        "{}",
        m.tern.log()
    );
    let down = tern_tests::connect(&m.p.srv, None, "10.66.1.1:8080");
    assert_eq!(
        down.kind.as_deref(),
        Some("ConnectionRefused"),
        "inbound after /quitquitquit: {down:?}"
    );
    m.tern =
        m.p.start_tern_xds(
            &["--inbound-ports", "8080", "--access-log"],
            "info,tern=debug",
        )
        .unwrap();
    assert!(tern_tests::connect(&m.p.srv, None, "10.66.1.1:8080").ok());
    // A crash: the same.
    m.tern.process.kill();
    let down = tern_tests::connect(&m.p.srv, None, "10.66.1.1:8080");
    assert_eq!(down.kind.as_deref(), Some("ConnectionRefused"), "{down:?}");
}

/// Kubelet's probes without a bypass: under STRICT mTLS the node's plaintext connection to
/// the application is refused like anyone's, while the probes injection rewrote to tern's
/// stats port (`/app-health/…`, Istio's `ISTIO_KUBE_APP_PROBERS`) reach the application —
/// TCP, HTTP and gRPC (gRPC's own health service, in Python) — and fail when it does not
/// answer or is not serving.
#[test]
fn rewritten_probes_reach_the_app_under_strict_without_a_bypass() {
    tern_tests::require_root!();
    let probers = r#"{"/app-health/app/readyz":{"tcpSocket":{"port":8080}},"/app-health/app/livez":{"httpGet":{"path":"/healthz","port":8081}},
        "/app-health/grpc/readyz":{"grpc":{"port":8082,"service":""}},"/app-health/grpc/livez":{"grpc":{"port":8082,"service":"draining"}}}"#;
    let m = mesh_with(
        "version: \"1\"\ninbound: strict\n",
        "8080,8081,8082",
        &[
            "--app-probers",
            probers,
            "--instance-ip",
            "10.66.1.1",
            "--stats-address",
            "0.0.0.0:15020",
        ],
    );
    let mut echo = tern_tests::serve(&m.p.app, &["10.66.1.1:8080"]).unwrap();
    let http = "import http.server\n\
        class H(http.server.BaseHTTPRequestHandler):\n\
        \x20   def do_GET(self):\n\
        \x20       self.send_response(200 if self.path == '/healthz' else 500)\n\
        \x20       self.end_headers()\n\
        s = http.server.HTTPServer(('10.66.1.1', 8081), H)\n\
        print('ready', flush=True)\n\
        s.serve_forever()\n";
    let _http = start_server(&m.p.app, None, Path::new("python3"), &["-c", http]).unwrap();
    let grpc = "from concurrent import futures\n\
        import grpc\n\
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc\n\
        s = grpc.server(futures.ThreadPoolExecutor(2))\n\
        h = health.HealthServicer()\n\
        h.set('', health_pb2.HealthCheckResponse.SERVING)\n\
        h.set('draining', health_pb2.HealthCheckResponse.NOT_SERVING)\n\
        health_pb2_grpc.add_HealthServicer_to_server(h, s)\n\
        s.add_insecure_port('10.66.1.1:8082')\n\
        s.start()\n\
        print('ready', flush=True)\n\
        s.wait_for_termination()\n";
    let _grpc = start_server(&m.p.app, None, Path::new("python3"), &["-c", grpc]).unwrap();
    // The node (here: the other namespace) in plaintext: refused, as anyone.
    let direct = tern_tests::connect(&m.p.srv, None, "10.66.1.1:8080");
    assert!(!direct.ok(), "{direct:?}");
    let probe = |path: &str| {
        m.p.srv
            .output(
                None,
                Path::new("curl"),
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-m",
                    "3",
                    &format!("http://10.66.1.1:15020{path}"),
                ],
            )
            .unwrap()
    };
    assert_eq!(probe("/app-health/app/readyz"), "200", "{}", m.tern.log());
    assert_eq!(probe("/app-health/app/livez"), "200", "{}", m.tern.log());
    assert_eq!(probe("/app-health/grpc/readyz"), "200", "{}", m.tern.log());
    assert_eq!(probe("/app-health/grpc/livez"), "503", "NOT_SERVING fails");
    assert_eq!(probe("/app-health/other/readyz"), "404");
    echo.kill();
    assert!(
        eventually(Duration::from_secs(3), || probe("/app-health/app/readyz")
            == "503"),
        "{}",
        m.tern.log()
    );
}

/// An application in the Pod, under tern's own uid (root here, as many containers run),
/// cannot join tern's listening sockets with `SO_REUSEPORT` and take captured connections:
/// tern's listeners are not in a reuseport group, so the bind fails.
#[test]
fn the_application_cannot_share_terns_listening_ports() {
    tern_tests::require_root!();
    let m = mesh("version: \"1\"\n", "8080");
    let script = "import socket, sys
for addr in [('0.0.0.0', 15006), ('127.0.0.1', 15001)]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind(addr)
        s.listen(1)
        print(addr[1], 'bound')
    except OSError as e:
        print(addr[1], e.strerror)
";
    let out =
        m.p.app
            .output(
                Some(&m.p.cgroup),
                std::path::Path::new("python3"),
                &["-c", script],
            )
            .unwrap();
    assert_eq!(
        out.trim(),
        "15006 Address already in use\n15001 Address already in use",
        "{}",
        m.tern.log()
    );
}
