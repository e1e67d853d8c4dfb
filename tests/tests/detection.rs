//! Thrift detection on istiod's plain `tcp_proxy` chains, end to end: the real `tern` with
//! eBPF capture, a client Pod and a server namespace, configured the way istiod configures a
//! sidecar (listeners `<vip>_<port>`, clusters `outbound|<port>||<host>`, no name that says
//! Thrift, no option set). Thrift is balanced per request; everything else — a server that
//! speaks first, TLS, HTTP/1 and HTTP/2 — is relayed untouched and without delay.
use std::path::PathBuf;

use tern_tests::{
    ConfigFile, Pods, Process, Tern, pods, python_json, python_peer, start_server, thrift_call,
    unique,
};

const ECHO_VIP: &str = "10.96.0.30";
const MAIL: &str = "10.96.0.31:25";
const WEB: &str = "10.96.0.32:443";
const RAW: &str = "10.96.0.33:80";
const SERVERS: [(&str, &str); 3] = [
    ("10.66.1.2:9001", "s1"),
    ("10.66.1.2:9002", "s2"),
    ("10.66.1.2:9003", "s3"),
];

/// What istiod sends for these services, as a static file: one `tcp_proxy` per service port.
fn istiod_shaped() -> String {
    let listener = |addr: &str, host: &str| {
        let (ip, port) = addr.rsplit_once(':').unwrap();
        format!(
            "  - name: {ip}_{port}\n    address: {addr}\n    filter_chains:\n      - tcp_proxy: {{ cluster: 'outbound|{port}||{host}.default.svc.cluster.local' }}\n"
        )
    };
    let cluster = |port: u16, host: &str, endpoints: &[&str]| {
        let eps: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{{ address: {e} }}"))
            .collect();
        format!(
            "  - name: 'outbound|{port}||{host}.default.svc.cluster.local'\n    endpoints: [ {} ]\n",
            eps.join(", ")
        )
    };
    let thrift: Vec<&str> = SERVERS.iter().map(|(a, _)| *a).collect();
    format!(
        "listeners:\n{}{}{}{}clusters:\n{}{}{}{}",
        listener(&format!("{ECHO_VIP}:9090"), "echo"),
        listener(MAIL, "mail"),
        listener(WEB, "web"),
        listener(RAW, "raw"),
        cluster(9090, "echo", &thrift),
        cluster(25, "mail", &["10.66.1.2:2525"]),
        cluster(443, "web", &["10.66.1.2:8443"]),
        cluster(80, "raw", &["10.66.1.2:8080"]),
    )
}

struct Setup {
    p: Pods,
    _tern: Tern,
    _servers: Vec<Process>,
    _config: ConfigFile,
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(extra_args: &[&str]) -> Setup {
    let p = pods();
    let dir = std::env::temp_dir().join(unique("detection"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=web.default.svc.cluster.local",
        ])
        .args([
            "-addext",
            "subjectAltName=DNS:web.default.svc.cluster.local",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl: {made:?}");
    let peer = python_peer("protocols_peer.py");
    let python = |args: &[&str]| {
        start_server(
            &p.srv,
            None,
            std::path::Path::new("python3"),
            &[&[peer.to_str().unwrap(), "serve"], args].concat(),
        )
        .unwrap()
    };
    let mut servers: Vec<Process> = SERVERS
        .iter()
        .map(|(addr, id)| tern_tests::thrift_serve(&p.srv, addr, id).unwrap())
        .collect();
    servers.push(python(&["10.66.1.2:2525", "greeter"]));
    servers.push(python(&["10.66.1.2:8080", "echo"]));
    servers.push(python(&[
        "10.66.1.2:8443",
        "tls",
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    ]));
    let config = ConfigFile::new(&istiod_shaped()).unwrap();
    let tern = p.start_tern(&config, extra_args).unwrap();
    Setup {
        p,
        _tern: tern,
        _servers: servers,
        _config: config,
        dir,
    }
}

/// A Thrift service named `echo`, served as istiod serves it, is balanced per request.
#[test]
fn a_plain_tcp_proxy_to_a_thrift_service_is_balanced_per_request() {
    tern_tests::require_root!();
    let s = setup(&[]);
    for format in [
        ["--transport", "framed", "--protocol", "binary"],
        ["--transport", "unframed", "--protocol", "compact"],
    ] {
        let c = thrift_call(
            &s.p.app,
            Some(&s.p.cgroup),
            &format!("{ECHO_VIP}:9090"),
            &[&["--calls", "300"], &format[..]].concat(),
        );
        assert_eq!(
            c.counts(),
            [("s1", 100), ("s2", 100), ("s3", 100)],
            "{format:?}: {c:?}"
        );
        assert!(c.seq_ok && c.io_error.is_none(), "{c:?}");
    }
}

/// A server-first protocol is not delayed, and TLS, HTTP/1 and HTTP/2 prefaces, and every
/// TLS record length are relayed byte for byte.
#[test]
fn other_protocols_are_relayed_untouched_and_undelayed() {
    tern_tests::require_root!();
    let s = setup(&[]);
    let peer = |args: &[&str]| python_json(&s.p.app, Some(&s.p.cgroup), "protocols_peer.py", args);

    let mut fastest = f64::MAX;
    for _ in 0..5 {
        let greeting = peer(&["greet", MAIL]);
        assert_eq!(greeting["echoed"], true, "{greeting}");
        assert!(
            greeting["greeting"].as_str().unwrap().starts_with("220 "),
            "{greeting}"
        );
        fastest = fastest.min(greeting["ms"].as_f64().unwrap());
    }
    // The slowest of the five includes the first upstream connection; every one is fast.
    assert!(fastest < 10.0, "the server's greeting took {fastest} ms");

    let hellos = peer(&["hellos", RAW]);
    assert_eq!(hellos["failed"], serde_json::json!([]), "{hellos}");

    let h1 = hex(b"GET / HTTP/1.1\r\nHost: raw\r\n\r\n");
    let h2 = hex(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00");
    for bytes in [h1, h2] {
        let echoed = peer(&["echo", RAW, &bytes]);
        assert_eq!(echoed["same"], true, "{echoed}");
    }

    let ca = s.dir.join("cert.pem");
    let tls = peer(&[
        "tls",
        WEB,
        ca.to_str().unwrap(),
        "web.default.svc.cluster.local",
    ]);
    assert_eq!(
        tls["echoed"], true,
        "a real TLS handshake through tern: {tls}"
    );
}

/// `--thrift-detect-exclude-ports` relays a port as bytes: a Thrift client's calls there all
/// go to the one endpoint its connection reached.
#[test]
fn detection_can_be_turned_off_per_port() {
    tern_tests::require_root!();
    let s = setup(&["--thrift-detect-exclude-ports", "9090"]);
    let c = thrift_call(
        &s.p.app,
        Some(&s.p.cgroup),
        &format!("{ECHO_VIP}:9090"),
        &["--calls", "30"],
    );
    assert_eq!(c.replies(), 30, "{c:?}");
    assert_eq!(c.counts().len(), 1, "one connection, one endpoint: {c:?}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
