//! Real istiod configuration: the `/config_dump`s of real Istio sidecars in
//! `../shared/istio-dumps/`, turned back into the resources istiod sent
//! (`tests/python/istio_dump.py`) and served over ADS by istiod's stand-in (`tern-istiod`), state of the
//! world and delta. Every listener and cluster ends up applied, set aside with a counted
//! reason, or (only where tern cannot enforce a policy) refused; and a service of the dump,
//! with endpoints the test supplies, answers Thrift calls balanced per request through tern.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use tern_tests::{
    Istiod, Pods, Process, Tern, admin, eventually, pods, python_peer, thrift_call, thrift_serve,
    unique,
};

/// Copies of `../shared/istio-dumps/` (see its `SOURCES.md`), so a clean clone has them.
const DUMPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/istio-dumps");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Sotw,
    Delta,
}

/// A dump converted to the control plane's resource file; removed on drop.
struct Converted(PathBuf);

impl Converted {
    fn new(dump: &str) -> Self {
        let out = std::env::temp_dir().join(format!("{}.bin", unique("istio-dump")));
        let status = Command::new("python3")
            .arg(python_peer("istio_dump.py"))
            .arg(Path::new(DUMPS).join(dump))
            .arg(&out)
            .status()
            .expect("run istio_dump.py");
        assert!(status.success(), "converting {dump}");
        Self(out)
    }
}

impl Drop for Converted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct DumpMesh {
    p: Pods,
    cp: Istiod,
    tern: Tern,
    _servers: Vec<Process>,
    _files: Vec<Converted>,
}

/// Serves `dumps` with `cluster`'s endpoints at two Thrift servers (every other EDS cluster
/// gets an address nothing listens on), and starts tern with eBPF capture against it.
fn serve(dumps: &[&str], cluster: &str, protocol: Protocol) -> DumpMesh {
    serve_with(dumps, cluster, protocol, &[])
}

/// [`serve`], with more arguments for tern.
fn serve_with(dumps: &[&str], cluster: &str, protocol: Protocol, args: &[&str]) -> DumpMesh {
    let p = pods();
    let servers = [("10.66.1.2:9001", "s1"), ("10.66.1.2:9002", "s2")]
        .iter()
        .map(|(a, id)| thrift_serve(&p.srv, a, id).unwrap())
        .collect();
    let files: Vec<Converted> = dumps.iter().map(|d| Converted::new(d)).collect();
    let paths: Vec<String> = files
        .iter()
        .map(|f| format!("{:?}", f.0.display().to_string()))
        .collect();
    let snapshot = format!(
        r#"version: "1"
dumps: [{}]
dump_endpoints: ["10.66.1.2:9999"]
endpoints: {{ "{cluster}": ["10.66.1.2:9001", "10.66.1.2:9002"] }}
"#,
        paths.join(", ")
    );
    let cp = Istiod::start(&p.app, "127.0.0.1:15010", &snapshot, &[]).unwrap();
    let mut extra = vec!["--access-log"];
    extra.extend(args);
    if protocol == Protocol::Delta {
        extra.push("--xds-delta");
    }
    let tern = p
        .start_tern_xds(&extra, "info,tern=debug")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cp.events()));
    DumpMesh {
        p,
        cp,
        tern,
        _servers: servers,
        _files: files,
    }
}

/// The names of the resources of a type in a dump file.
fn dump_names(dump: &str, section: &str, key: &str, inner: &str, field: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(DUMPS).join(dump)).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["@type"].as_str().unwrap().ends_with(section))
        .flat_map(|c| c[key].as_array().cloned().unwrap_or_default())
        .map(|r| {
            let r = if r["active_state"].is_object() {
                r["active_state"][inner].clone()
            } else {
                r[inner].clone()
            };
            r[field].as_str().unwrap().to_owned()
        })
        .collect()
}

/// What tern made of every resource: listeners and clusters are each in force, set aside
/// with a reason, or refused; `refused` lists what may be refused, and why.
fn check_every_resource(m: &DumpMesh, dump: &str, refused: &[(&str, &str)]) {
    let dump_json: Value = serde_json::from_str(&admin(&m.p.app, "GET", "/config_dump")).unwrap();
    let config = &dump_json["config"];
    let types = &dump_json["xds"]["types"];
    let lds = &types["type.googleapis.com/envoy.config.listener.v3.Listener"];
    let cds = &types["type.googleapis.com/envoy.config.cluster.v3.Cluster"];
    let names = |v: &Value| -> BTreeSet<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|n| n.as_str().unwrap().to_owned())
            .collect()
    };
    let set_aside: BTreeSet<(String, String)> = config["set_aside"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["kind"].as_str().unwrap().to_owned(),
                s["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let in_force: BTreeSet<String> = config["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_owned())
        .chain(config["inbound"]["name"].as_str().map(str::to_owned))
        .collect();
    let listeners = dump_names(
        dump,
        "ListenersConfigDump",
        "dynamic_listeners",
        "listener",
        "name",
    );
    let rejected: BTreeSet<String> = lds["rejected"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(n, _)| n.clone())
        .collect();
    let expected_refusals: BTreeSet<String> = refused.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(rejected, expected_refusals, "refused listeners: {lds}");
    for (name, why) in refused {
        let reason = lds["rejected"][name].as_str().unwrap();
        assert!(reason.contains(why), "{name}: {reason}");
    }
    for l in &listeners {
        let accounted = names(&lds["resources"]).contains(l) || rejected.contains(l);
        assert!(accounted, "listener {l} neither held nor refused: {lds}");
        let placed = in_force.contains(l)
            || l == "virtualOutbound"
            || rejected.contains(l)
            || set_aside.contains(&("listener".into(), l.clone()));
        assert!(placed, "listener {l} neither in force nor set aside");
        // Every per-service listener (`<vip>_<port>`, `0.0.0.0_<port>`) runs.
        let per_service = l.split_once('_').is_some_and(|(ip, port)| {
            ip.parse::<std::net::IpAddr>().is_ok() && port.parse::<u16>().is_ok()
        });
        if per_service {
            assert!(in_force.contains(l), "listener {l} is not in force");
        }
    }
    // Clusters: every one the dump has (if it has them) is in force, none refused.
    let clusters = dump_names(
        dump,
        "ClustersConfigDump",
        "dynamic_active_clusters",
        "cluster",
        "name",
    );
    assert!(
        cds["rejected"].as_object().is_none_or(|r| r.is_empty()),
        "{cds}"
    );
    let configured: BTreeSet<String> = config["clusters"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for c in &clusters {
        assert!(configured.contains(c), "cluster {c} not in force");
    }
    // Set-aside counts are exported.
    let counted: f64 = set_aside
        .iter()
        .map(|(kind, _)| kind.clone())
        .collect::<BTreeSet<_>>()
        .iter()
        .map(|kind| {
            config["set_aside"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["kind"] == kind.as_str())
                .count() as f64
        })
        .sum();
    let metrics = admin(&m.p.app, "GET", "/stats/prometheus");
    let exported: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tern_xds_set_aside{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(exported, counted, "{metrics}");
}

/// Calls a service of the dump through tern: answered, and balanced per request.
fn call_through(m: &DumpMesh, vip: &str) {
    let c = thrift_call(&m.p.app, Some(&m.p.cgroup), vip, &["--calls", "40"]);
    assert_eq!(c.replies(), 40, "{c:?}\n{}", m.tern.log());
    let counts = c.counts();
    assert_eq!(counts.len(), 2, "both endpoints serve: {counts:?}");
}

fn istio_1_22(protocol: Protocol) {
    let dump = "istio-1.22.3-sidecar-app1.config_dump.json";
    let m = serve(
        &[dump],
        "outbound|443||kubernetes.default.svc.cluster.local",
        protocol,
    );
    assert!(m.cp.wait_for("ACK Listener"), "{}", m.cp.events());
    assert!(!m.cp.events().contains("NACK"), "{}", m.cp.events());
    check_every_resource(&m, dump, &[]);
    call_through(&m, "10.96.0.1:443");
    // Auto-mTLS is in force: every EDS cluster picks TLS for `tlsMode: istio` endpoints,
    // verifying the SAN istiod names, and plaintext for the others.
    let dump_json: Value = serde_json::from_str(&admin(&m.p.app, "GET", "/config_dump")).unwrap();
    let clusters = dump_json["config"]["clusters"].as_object().unwrap();
    let auto_mtls = clusters
        .values()
        .filter(|c| {
            let matches = &c["transport"]["matches"];
            matches[0]["name"] == "tlsMode-istio"
                && matches[0]["tls"]["alpn"][0] == "istio"
                && !matches[0]["tls"]["alpn"]
                    .as_array()
                    .is_some_and(|a| a.contains(&"istio-peer-exchange".into()))
                && matches[0]["tls"]["validation"]["roots"] == "mesh"
                && matches[1]["name"] == "tlsMode-disabled"
                && matches[1]["tls"].is_null()
        })
        .count();
    assert!(auto_mtls >= 45, "{auto_mtls} clusters with auto-mTLS");
    // virtualInbound's TLS chains terminate TLS (ALPN `istio`, never `istio-peer-exchange`).
    let inbound = &dump_json["config"]["inbound"]["filter_chains"];
    let tls_chains: Vec<&Value> = inbound
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["tls"].is_null())
        .collect();
    assert!(!tls_chains.is_empty(), "{inbound}");
    for c in tls_chains {
        let alpn = c["tls"]["alpn"].as_array().unwrap();
        assert!(!alpn.contains(&"istio-peer-exchange".into()), "{c}");
        assert_eq!(c["tls"]["require_client_certificate"], true, "{c}");
    }
}

fn istio_1_9_with_2022_endpoints(protocol: Protocol) {
    let dump = "istio-1.9.1-sidecar-productpage.config_dump.json";
    let m = serve(
        &[
            dump,
            "istio-2022-07-sidecar-endpoints-only.config_dump.json",
        ],
        "outbound|443||istiod.istio-system.svc.cluster.local",
        protocol,
    );
    assert!(
        m.cp.wait_for("ACK ClusterLoadAssignment"),
        "{}",
        m.cp.events()
    );
    assert!(!m.cp.events().contains("NACK"), "{}", m.cp.events());
    check_every_resource(&m, dump, &[]);
    call_through(&m, "10.105.109.31:443");
    // The real endpoint shapes of the 2022 dump are in force where names match.
    let dump_json: Value = serde_json::from_str(&admin(&m.p.app, "GET", "/config_dump")).unwrap();
    let reviews =
        &dump_json["config"]["clusters"]["outbound|9080||reviews.default.svc.cluster.local"];
    assert_eq!(
        reviews["endpoints"].as_array().map(Vec::len),
        Some(3),
        "{reviews}"
    );
}

fn istio_2023_listeners(protocol: Protocol) {
    let dump = "istio-2023-06-sidecar-listeners-only.config_dump.json";
    let m = serve_with(
        &[dump],
        "outbound|443||kubernetes.default.svc.cluster.local",
        protocol,
        &["--inbound-ports", "8080"],
    );
    // virtualInbound carries network RBAC, HTTP RBAC and HTTP ext_authz: accepted, with
    // its policy enforced as istiod would on TCP, and the chains that need ext_authz
    // refusing their connections.
    assert!(m.cp.wait_for("ACK Listener"), "{}", m.cp.events());
    assert!(!m.cp.events().contains("NACK"), "{}", m.cp.events());
    check_every_resource(&m, dump, &[]);
    let dump_json: Value = serde_json::from_str(&admin(&m.p.app, "GET", "/config_dump")).unwrap();
    let set_aside = &dump_json["config"]["set_aside"];
    let refusing: Vec<&Value> = set_aside
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("virtualInbound/"))
                && s["reason"] == "unenforceable"
                && s["filter"] == "envoy.filters.http.ext_authz"
        })
        .collect();
    // Its catch-all HTTP chains and port 80's, TLS and plaintext.
    assert_eq!(refusing.len(), 4, "the HTTP chains: {set_aside}");
    // The internal listener that once NACKed all 27 is set aside; the rest serve.
    let set_aside = set_aside.to_string();
    assert!(
        set_aside.contains("connect_originate") && set_aside.contains("internal_listener"),
        "{set_aside}"
    );
    call_through(&m, "10.96.0.1:443");
    // Its TCP policy (`rules: {}`, istiod's ALLOW with no rule left: nothing is allowed)
    // holds: plaintext to the Pod never reaches the application, and the refusal says why.
    let _app = tern_tests::serve(&m.p.app, &["10.66.1.1:8080"]).unwrap();
    let plain = tern_tests::connect(&m.p.srv, None, "10.66.1.1:8080");
    assert!(!plain.ok(), "{plain:?}\n{}", m.tern.log());
    assert!(
        refused_in_log(&m, "10.66.1.1:8080", "rbac"),
        "{}",
        m.tern.log()
    );
    // HTTP to it is refused too (the HTTP chains need ext_authz).
    let request: String = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let http = tern_tests::send_raw(&m.p.srv, None, "10.66.1.1:8080", &request);
    assert_eq!(http["received"], 0, "{http}");
    assert!(
        refused_in_log(&m, "10.66.1.1:8080", "chain_not_enforceable"),
        "{}",
        m.tern.log()
    );
}

/// Whether tern's access log says (within 5 s) it refused a connection to `dst` for `reason`.
fn refused_in_log(m: &DumpMesh, dst: &str, reason: &str) -> bool {
    let (dst, reason) = (format!("dst={dst}"), format!("refused=\"{reason}\""));
    eventually(Duration::from_secs(5), || {
        m.tern
            .log()
            .lines()
            .any(|l| l.contains("tern::access") && l.contains(&dst) && l.contains(&reason))
    })
}

/// A Python `ssl` ClientHello for `server_name` offering `alpn`, as hex.
fn client_hello(server_name: &str, alpn: &str) -> String {
    let script = format!(
        "import ssl\nctx = ssl.create_default_context()\nctx.set_alpn_protocols({alpn:?}.split(','))\n\
         i, o = ssl.MemoryBIO(), ssl.MemoryBIO()\ns = ctx.wrap_bio(i, o, server_hostname={server_name:?})\n\
         try:\n    s.do_handshake()\nexcept ssl.SSLWantReadError:\n    pass\nprint(o.read().hex())"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// istiod's `0.0.0.0_9411` listener has an HTTP chain (`raw_buffer` with `http/1.1`/`h2c`)
/// and a default chain to `PassthroughCluster`: HTTP takes the first — which this Pod's
/// WasmPlugin (an ECDS filter tern cannot run) makes refuse its connections — TLS and other
/// bytes the default one, decided from the first bytes as Envoy's inspectors do.
fn istio_1_22_chains_by_first_bytes(protocol: Protocol) {
    let dump = "istio-1.22.3-sidecar-app1.config_dump.json";
    let m = serve(
        &[dump],
        "outbound|443||kubernetes.default.svc.cluster.local",
        protocol,
    );
    let _echo = tern_tests::serve(&m.p.srv, &["10.66.1.2:9411"]).unwrap();
    assert!(m.cp.wait_for("ACK Listener"), "{}", m.cp.events());
    let handled = |n: usize| -> Vec<String> {
        assert!(
            eventually(Duration::from_secs(5), || m
                .tern
                .log()
                .lines()
                .filter(|l| l.contains("tern::access") && l.contains("dst=10.66.1.2:9411"))
                .count()
                >= n),
            "{}",
            m.tern.log()
        );
        m.tern
            .log()
            .lines()
            .filter(|l| l.contains("tern::access") && l.contains("dst=10.66.1.2:9411"))
            .map(|l| {
                l.split("handled=")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .trim_matches('"')
                    .to_owned()
            })
            .collect()
    };
    let http = "GET / HTTP/1.1\r\nHost: zipkin\r\n\r\n"
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    tern_tests::send_raw(&m.p.app, Some(&m.p.cgroup), "10.66.1.2:9411", &http);
    assert_eq!(handled(1), ["denied"], "HTTP takes the HTTP chain");
    assert!(
        m.tern
            .log()
            .lines()
            .any(|l| l.contains("dst=10.66.1.2:9411")
                && l.contains("refused=\"chain_not_enforceable\"")),
        "{}",
        m.tern.log()
    );
    let hello = client_hello(
        "zipkin.istio-system.svc.cluster.local",
        "istio-peer-exchange,istio",
    );
    assert!(hello.starts_with("16"), "{hello}");
    tern_tests::send_raw(&m.p.app, Some(&m.p.cgroup), "10.66.1.2:9411", &hello);
    assert_eq!(handled(2)[1], "tcp", "TLS takes the default chain");
    let c = tern_tests::connect(&m.p.app, Some(&m.p.cgroup), "10.66.1.2:9411");
    assert!(
        c.ok(),
        "a server-first protocol waits out the inspection: {c:?}"
    );
    assert_eq!(handled(3)[2], "tcp");
}

macro_rules! both_protocols {
    ($($name:ident),*) => {
        mod sotw {
            $(#[test] fn $name() { tern_tests::require_root!(); super::$name(super::Protocol::Sotw) })*
        }
        mod delta {
            $(#[test] fn $name() { tern_tests::require_root!(); super::$name(super::Protocol::Delta) })*
        }
    };
}

both_protocols!(
    istio_1_22,
    istio_1_22_chains_by_first_bytes,
    istio_1_9_with_2022_endpoints,
    istio_2023_listeners
);
