//! Capture, end to end: the real `tern` binary with real kernel hooks (or iptables rules) in
//! network namespaces made by each test, real sockets, and a cgroup per application Pod.
//!
//! Topology of every test: an application Pod `app` (10.66.1.1, plus the test cgroup) linked
//! to a server namespace `srv` (10.66.1.2 and 10.66.2.2). A connection went through the proxy
//! when the server saw it come from another socket than the client's own.
use std::{os::unix::fs::MetadataExt, path::Path, process::Command, time::Duration};

use tern_tests::{
    Cgroup, Netns, Tern, bpftool, capture_counter, connect, eventually, pods, serve, tern, tern_in,
};

/// Entries bpftool sees in one of tern's pinned maps.
fn map_entries(cgroup: &Cgroup, map: &str) -> usize {
    let path = cgroup.pin_dir().join(map);
    let entries = bpftool(&["map", "dump", "pinned", path.to_str().unwrap()]).unwrap();
    entries.as_array().map_or(0, Vec::len)
}

fn run_args<'a>(mode: &'a str, cgroup: &'a Cgroup, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--capture", mode];
    if mode == "ebpf" {
        args.extend(["--cgroup", cgroup.path_str()]);
    }
    args.extend(extra);
    args
}

/// Outbound capture: the application's connect reaches the server through tern, the
/// application still sees the address it dialled, and the proxy's own upstream connection
/// (from the same cgroup) is not captured again.
fn outbound_goes_through_the_proxy(mode: &str) {
    let p = pods();
    let _server = serve(&p.srv, &["10.66.1.2:8080"]).unwrap();
    let mut tern_proc = Tern::start(
        &p.app,
        Some(&p.cgroup),
        &run_args(mode, &p.cgroup, &["--inbound-ports", ""]),
    )
    .unwrap();

    let c = connect(&p.app, Some(&p.cgroup), "10.66.1.2:8080");
    assert!(c.ok(), "{c:?}");
    assert!(c.proxied(), "the connection bypassed tern: {c:?}");
    assert_eq!(
        c.peer.as_deref(),
        Some("10.66.1.2:8080"),
        "getpeername: {c:?}"
    );
    assert!(
        c.server_saw.as_deref().unwrap().starts_with("10.66.1.1:"),
        "{c:?}"
    );
    assert!(
        tern_proc.log().contains("original_dst=10.66.1.2:8080"),
        "{}",
        tern_proc.log()
    );

    let rules = p.app.iptables_rules().unwrap();
    if mode == "ebpf" {
        assert!(
            rules.is_empty(),
            "eBPF capture must not need iptables rules: {rules:?}"
        );
        for counter in [
            "connect.redirected",
            "sockops.recorded",
            "sockops.handed_over",
            "getsockopt.answered",
            "getpeername.rewritten",
            "connect.skipped_mark",
        ] {
            assert!(
                capture_counter(&p.cgroup, counter) >= 1,
                "{counter} stayed 0"
            );
        }
        // Every hand-over was taken by the proxy's socket: the 4-tuple map is empty (the
        // per-socket records go with their sockets).
        assert_eq!(
            map_entries(&p.cgroup, "ORIG_BY_TUPLE"),
            0,
            "hand-overs left in ORIG_BY_TUPLE"
        );
    } else {
        assert!(
            rules
                .iter()
                .any(|r| r.contains("REDIRECT --to-ports 15001")),
            "{rules:?}"
        );
    }

    // A process outside the captured cgroup is left alone (eBPF scopes capture to the Pod's
    // cgroup; iptables captures the whole namespace).
    let outside = connect(&p.app, None, "10.66.1.2:8080");
    assert!(outside.ok(), "{outside:?}");
    assert_eq!(outside.proxied(), mode == "iptables", "{outside:?}");

    // Capture stays while the Pod lives: without tern, connections are refused (a restarted
    // tern takes the capture over).
    tern_proc.process.terminate().unwrap();
    let after = connect(&p.app, Some(&p.cgroup), "10.66.1.2:8080");
    if mode == "ebpf" {
        assert!(p.cgroup.pin_dir().exists(), "the capture outlives tern");
        assert_eq!(after.kind.as_deref(), Some("PermissionDenied"), "{after:?}");
    } else {
        assert!(
            !p.app.iptables_rules().unwrap().is_empty(),
            "rules outlive tern"
        );
        assert_eq!(
            after.kind.as_deref(),
            Some("ConnectionRefused"),
            "{after:?}"
        );
    }
    let restarted = Tern::start(
        &p.app,
        Some(&p.cgroup),
        &run_args(mode, &p.cgroup, &["--inbound-ports", ""]),
    )
    .unwrap();
    assert!(connect(&p.app, Some(&p.cgroup), "10.66.1.2:8080").proxied());
    drop(restarted);
    if mode == "ebpf" {
        let (ok, _, err) = tern_in(
            p.cgroup.path(),
            &["capture", "detach", "--cgroup", p.cgroup.path_str()],
        );
        assert!(ok, "{err}");
        assert!(!p.cgroup.pin_dir().exists(), "pins left after detach");
        let after = connect(&p.app, Some(&p.cgroup), "10.66.1.2:8080");
        assert!(after.ok() && !after.proxied(), "{after:?}");
    }
}

/// Excluded ports and CIDRs, and loopback, bypass the proxy.
fn exclusions_bypass_the_proxy(mode: &str) {
    let p = pods();
    let _server = serve(
        &p.srv,
        &["10.66.1.2:8080", "10.66.1.2:9090", "10.66.2.2:8080"],
    )
    .unwrap();
    let _local = serve(&p.app, &["127.0.0.1:7070"]).unwrap();
    let _tern = Tern::start(
        &p.app,
        Some(&p.cgroup),
        &run_args(
            mode,
            &p.cgroup,
            &[
                "--inbound-ports",
                "",
                "--exclude-ports",
                "9090",
                "--exclude-cidrs",
                "10.66.2.0/24",
            ],
        ),
    )
    .unwrap();

    let captured = connect(&p.app, Some(&p.cgroup), "10.66.1.2:8080");
    assert!(captured.ok() && captured.proxied(), "{captured:?}");
    for addr in ["10.66.1.2:9090", "10.66.2.2:8080", "127.0.0.1:7070"] {
        let c = connect(&p.app, Some(&p.cgroup), addr);
        assert!(c.ok(), "{addr}: {c:?}");
        assert!(!c.proxied(), "{addr} should bypass tern: {c:?}");
        assert_eq!(c.peer.as_deref(), Some(addr));
    }
    if mode == "ebpf" {
        for counter in [
            "connect.skipped_port",
            "connect.skipped_cidr",
            "connect.skipped_loopback",
        ] {
            assert!(
                capture_counter(&p.cgroup, counter) >= 1,
                "{counter} stayed 0"
            );
        }
    }
}

/// IPv6: a native IPv6 destination (answered through `SOL_IPV6`) and a v4-mapped one dialled
/// from an IPv6 socket (Java's habit) both reach the server through tern.
fn ipv6_goes_through_the_proxy(mode: &str) {
    let p = pods();
    let _server = serve(&p.srv, &["[fd66::2]:8080", "10.66.1.2:8080"]).unwrap();
    let _tern = Tern::start(
        &p.app,
        Some(&p.cgroup),
        &run_args(mode, &p.cgroup, &["--inbound-ports", ""]),
    )
    .unwrap();
    // Duplicate address detection keeps a fresh IPv6 address unusable for a moment.
    assert!(
        eventually(Duration::from_secs(5), || connect(
            &p.app,
            None,
            "[fd66::2]:8080"
        )
        .ok()),
        "IPv6 between the namespaces never came up"
    );
    for (addr, seen_from) in [
        ("[fd66::2]:8080", "[fd66::1]:"),
        ("[::ffff:10.66.1.2]:8080", "10.66.1.1:"),
    ] {
        let c = connect(&p.app, Some(&p.cgroup), addr);
        assert!(c.ok(), "{addr}: {c:?}");
        assert!(c.proxied(), "{addr} bypassed tern: {c:?}");
        assert_eq!(c.peer.as_deref(), Some(addr), "getpeername");
        assert!(
            c.server_saw.as_deref().unwrap().starts_with(seen_from),
            "{addr}: {c:?}"
        );
    }
}

/// Sockets of the proxy's uid (`--proxy-uid`, Istio's 1337) are never captured.
fn proxy_uid_bypasses(mode: &str) {
    let p = pods();
    let _server = serve(&p.srv, &["10.66.1.2:8080"]).unwrap();
    let _tern = Tern::start(
        &p.app,
        Some(&p.cgroup),
        &run_args(
            mode,
            &p.cgroup,
            &["--inbound-ports", "", "--proxy-uid", "65534"],
        ),
    )
    .unwrap();
    let as_uid = |uid: &str| {
        let setpriv = Path::new("/usr/bin/setpriv");
        let peer = tern_tests::testpeer_bin();
        let args = [
            &format!("--reuid={uid}"),
            "--regid=65534",
            "--clear-groups",
            peer.to_str().unwrap(),
            "connect",
            "10.66.1.2:8080",
        ];
        let out = p.app.output(Some(&p.cgroup), setpriv, &args).unwrap();
        serde_json::from_str::<tern_tests::Connection>(out.trim()).unwrap()
    };
    let skipped = as_uid("65534");
    assert!(
        skipped.ok() && !skipped.proxied(),
        "uid 65534 must bypass: {skipped:?}"
    );
    let captured = as_uid("65533");
    assert!(
        captured.ok() && captured.proxied(),
        "other uids are captured: {captured:?}"
    );
    if mode == "ebpf" {
        assert!(capture_counter(&p.cgroup, "connect.skipped_uid") >= 1);
    }
}

/// `tern check` loads every program on this kernel and says so.
#[test]
fn check_reports_every_program_loadable() {
    tern_tests::require_root!();
    let (ok, out, err) = tern(&["check"]);
    assert!(ok, "{out}{err}");
    for program in tern_ebpf_common::program_names::ALL {
        assert!(
            out.contains(&format!("program {program}")),
            "{program} missing from\n{out}"
        );
    }
    assert!(!out.contains("FAIL"), "{out}");
}

/// Inbound capture: a connection to a captured port of the server Pod arrives through the
/// inbound listener, and the application answers it, seeing the proxy's 127.0.0.6.
fn inbound_arrives_through_the_proxy(mode: &str) {
    let p = pods();
    let _server = serve(&p.srv, &["0.0.0.0:8080", "0.0.0.0:9090"]).unwrap();
    let netns = p.srv.path();
    let mut args = run_args(mode, &p.cgroup, &["--inbound-ports", "8080"]);
    args.extend(["--netns", netns.to_str().unwrap()]);
    let _tern = Tern::start(&p.srv, Some(&p.cgroup), &args).unwrap();

    let c = connect(&p.app, None, "10.66.1.2:8080");
    assert!(c.ok(), "{c:?}");
    assert!(c.via_inbound_proxy(), "{c:?}");
    assert_eq!(c.server_local.as_deref(), Some("10.66.1.2:8080"));
    let other = connect(&p.app, None, "10.66.1.2:9090");
    assert!(
        other.ok() && !other.proxied(),
        "port 9090 is not captured: {other:?}"
    );
    if mode == "ebpf" {
        assert!(capture_counter(&p.cgroup, "sk_lookup.redirected") >= 1);
        assert!(p.srv.iptables_rules().unwrap().is_empty());
    }
}

/// Inbound over IPv6 reaches an application bound only to the Pod's IPv6 address (tern
/// connects from that address, which capture leaves alone), and connections from the node's
/// address (`--unsafe-node-bypass`, off by default) reach the application without tern.
fn inbound_ipv6_and_node_probes(mode: &str) {
    let p = pods();
    assert!(
        eventually(Duration::from_secs(5), || !p
            .srv
            .output(None, Path::new("ip"), &["-6", "addr", "show", "tentative"])
            .unwrap()
            .contains("fd66::2")),
        "fd66::2 stayed tentative"
    );
    let _server = serve(&p.srv, &["[fd66::2]:8080", "10.66.1.2:8080"]).unwrap();
    let netns = p.srv.path();
    let mut args = run_args(mode, &p.cgroup, &["--inbound-ports", "*"]);
    args.extend([
        "--netns",
        netns.to_str().unwrap(),
        "--unsafe-node-bypass",
        "10.66.1.1",
    ]);
    let _tern = Tern::start(&p.srv, Some(&p.cgroup), &args).unwrap();

    let v6 = connect(&p.app, None, "[fd66::2]:8080");
    assert!(v6.ok(), "{v6:?}");
    assert!(v6.proxied(), "IPv6 inbound bypassed tern: {v6:?}");
    assert!(
        v6.server_saw.as_deref().unwrap().starts_with("[fd66::2]:"),
        "{v6:?}"
    );
    assert_eq!(v6.server_local.as_deref(), Some("[fd66::2]:8080"));

    let probe = connect(&p.app, None, "10.66.1.2:8080");
    assert!(probe.ok(), "{probe:?}");
    assert!(
        !probe.proxied(),
        "a connection from the node went through tern: {probe:?}"
    );
    if mode == "ebpf" {
        assert!(capture_counter(&p.cgroup, "sk_lookup.skipped_node") >= 1);
        assert!(capture_counter(&p.cgroup, "sk_lookup.skipped") >= 1);
    }
}

/// While tern drains (SIGTERM), the application's new outbound connections still go through
/// it, until it exits; then capture refuses them (it stays while the Pod lives).
#[test]
fn ebpf_outbound_goes_through_the_proxy_while_draining() {
    tern_tests::require_root!();
    let p = pods();
    let _server = serve(&p.srv, &["10.66.1.2:8080"]).unwrap();
    let mut tern_proc = Tern::start(
        &p.app,
        Some(&p.cgroup),
        &run_args(
            "ebpf",
            &p.cgroup,
            &["--inbound-ports", "", "--drain-timeout-secs", "4"],
        ),
    )
    .unwrap();
    // A connection that stays open keeps tern draining for the whole drain timeout.
    let held =
        "import socket, time\ns = socket.create_connection(('10.66.1.2', 8080))\ntime.sleep(10)\n";
    let _held = tern_tests::Process::spawn(p.app.command(
        Some(&p.cgroup),
        Path::new("python3"),
        &["-c", held],
    ))
    .unwrap();
    assert!(eventually(Duration::from_secs(5), || capture_counter(
        &p.cgroup,
        "sockops.handed_over"
    ) >= 1));
    let _ = Command::new("kill")
        .args(["-TERM", &tern_proc.process.pid().to_string()])
        .status();
    assert!(
        eventually(Duration::from_secs(3), || tern_proc
            .log()
            .contains("draining")),
        "{}",
        tern_proc.log()
    );
    let during = connect(&p.app, Some(&p.cgroup), "10.66.1.2:8080");
    assert!(
        during.ok() && during.proxied(),
        "bypassed tern while it drained: {during:?}"
    );
    tern_proc.process.terminate().unwrap();
    let after = connect(&p.app, Some(&p.cgroup), "10.66.1.2:8080");
    assert_eq!(after.kind.as_deref(), Some("PermissionDenied"), "{after:?}");
}

/// Runs a scenario once per capture mechanism: `<scenario>::ebpf` and `<scenario>::iptables`.
macro_rules! under_both_captures {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            fn ebpf() {
                tern_tests::require_root!();
                super::$scenario("ebpf");
            }

            #[test]
            fn iptables() {
                tern_tests::require_root!();
                super::$scenario("iptables");
            }
        }
    )*};
}

under_both_captures!(
    outbound_goes_through_the_proxy,
    ipv6_goes_through_the_proxy,
    proxy_uid_bypasses,
    exclusions_bypass_the_proxy,
    inbound_arrives_through_the_proxy,
    inbound_ipv6_and_node_probes,
    the_proxy_runs_unprivileged
);

/// Hooks attached by `tern capture attach` outlive the proxy, and fail closed while it is
/// down: inbound is refused (never let through to the application unchecked), outbound is
/// refused too unless `--outbound-fail-open`; a restarted proxy takes over again.
#[test]
fn ebpf_fails_closed_when_the_proxy_dies() {
    tern_tests::require_root!();
    for outbound_fail_open in [false, true] {
        let p = pods();
        let _server = serve(&p.srv, &["10.66.1.2:8080"]).unwrap();
        let _app_server = serve(&p.app, &["0.0.0.0:8081"]).unwrap();
        let netns = p.app.path();
        let cg = p.cgroup.path_str();
        let mut attach = vec![
            "capture",
            "attach",
            "--cgroup",
            cg,
            "--netns",
            netns.to_str().unwrap(),
            "--inbound-ports",
            "8081",
        ];
        if outbound_fail_open {
            attach.push("--outbound-fail-open");
        }
        let (ok, _, err) = tern_in(p.cgroup.path(), &attach);
        assert!(ok, "{err}");

        let mut proxy = Tern::start(
            &p.app,
            Some(&p.cgroup),
            &["run", "--capture", "ebpf", "--cgroup", cg],
        )
        .unwrap();
        assert!(connect(&p.app, Some(&p.cgroup), "10.66.1.2:8080").proxied());
        let inbound = connect(&p.srv, None, "10.66.1.1:8081");
        assert!(inbound.ok() && inbound.via_inbound_proxy(), "{inbound:?}");

        proxy.process.kill();
        assert!(
            p.cgroup.pin_dir().exists(),
            "the pinned hooks must outlive the proxy"
        );
        let c = connect(&p.app, Some(&p.cgroup), "10.66.1.2:8080");
        if outbound_fail_open {
            assert!(c.ok() && !c.proxied(), "outbound fails open: {c:?}");
            assert!(capture_counter(&p.cgroup, "connect.failed_open") >= 1);
        } else {
            assert_eq!(c.kind.as_deref(), Some("PermissionDenied"), "{c:?}");
            assert!(capture_counter(&p.cgroup, "connect.refused") >= 1);
        }
        let inbound = connect(&p.srv, None, "10.66.1.1:8081");
        assert_eq!(
            inbound.kind.as_deref(),
            Some("ConnectionRefused"),
            "inbound never fails open: {inbound:?}"
        );
        assert!(capture_counter(&p.cgroup, "sk_lookup.refused") >= 1);

        let _restarted = Tern::start(
            &p.app,
            Some(&p.cgroup),
            &["run", "--capture", "ebpf", "--cgroup", cg],
        )
        .unwrap();
        assert!(
            connect(&p.app, Some(&p.cgroup), "10.66.1.2:8080").proxied(),
            "a restarted proxy takes over"
        );
        assert!(connect(&p.srv, None, "10.66.1.1:8081").ok());
        let (ok, _, err) = tern_in(p.cgroup.path(), &["capture", "detach", "--cgroup", cg]);
        assert!(ok, "{err}");
    }
}

/// A capture is its Pod's alone: tern refuses to attach to a cgroup above its own (which
/// would hold other Pods) or to detach another Pod's capture.
#[test]
fn captures_belong_to_their_pod() {
    tern_tests::require_root!();
    let p = pods();
    let other = pods();
    let cg = p.cgroup.path_str();
    // tern in its container's cgroup, below the Pod's (kubelet's layout).
    let container = p.cgroup.path().join("tern");
    std::fs::create_dir(&container).unwrap();
    let parent = p
        .cgroup
        .path()
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let (ok, _, err) = tern_in(&container, &["capture", "attach", "--cgroup", &parent]);
    assert!(!ok && err.contains("directly below it"), "{err}");
    assert!(other.cgroup.attached_programs().unwrap().is_empty());
    let (ok, _, err) = tern_in(&container, &["capture", "attach", "--cgroup", cg]);
    assert!(ok, "{err}");
    let _ = std::fs::remove_dir(&container);
    // From another Pod's cgroup: refused, and the capture stays.
    let (ok, _, err) = tern_in(other.cgroup.path(), &["capture", "detach", "--cgroup", cg]);
    assert!(!ok && err.contains("not in cgroup"), "{err}");
    assert!(p.cgroup.pin_dir().exists());
    let (ok, _, err) = tern_in(other.cgroup.path(), &["capture", "attach", "--cgroup", cg]);
    assert!(!ok, "{err}");
    let (ok, _, err) = tern_in(p.cgroup.path(), &["capture", "detach", "--cgroup", cg]);
    assert!(ok, "{err}");
}

/// attach → status → detach, seen by tern and by bpftool: nothing is left behind.
#[test]
fn ebpf_attach_and_detach_leave_nothing_behind() {
    tern_tests::require_root!();
    let p = pods();
    let cg = p.cgroup.path_str();
    let netns = p.app.path();
    let (ok, _, err) = tern_in(
        p.cgroup.path(),
        &[
            "capture",
            "attach",
            "--cgroup",
            cg,
            "--netns",
            netns.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(
        p.app.bpf_links().unwrap(),
        1,
        "sk_lookup is linked to the namespace"
    );
    let mut attached = p.cgroup.attached_programs().unwrap();
    attached.sort();
    assert_eq!(
        attached,
        [
            "tern_connect4",
            "tern_connect6",
            "tern_getsockopt",
            "tern_peername4",
            "tern_peername6",
            "tern_sockops"
        ]
    );
    let (ok, status, _) = tern(&["capture", "status", "--cgroup", cg]);
    assert!(
        ok && status.contains("tern_inbound") && status.contains("connect.redirected"),
        "{status}"
    );

    // A second attach on the same cgroup is refused, and changes nothing.
    let (ok, _, err) = tern_in(p.cgroup.path(), &["capture", "attach", "--cgroup", cg]);
    assert!(!ok && err.contains("already attached"), "{err}");
    assert_eq!(p.cgroup.attached_programs().unwrap().len(), 6);

    let (ok, _, err) = tern_in(p.cgroup.path(), &["capture", "detach", "--cgroup", cg]);
    assert!(ok, "{err}");
    assert!(
        p.cgroup.attached_programs().unwrap().is_empty(),
        "programs left attached"
    );
    assert_eq!(
        p.app.bpf_links().unwrap(),
        0,
        "sk_lookup link left on the namespace"
    );
    assert!(!p.cgroup.pin_dir().exists(), "pins left behind");
    let (ok, _, err) = tern_in(p.cgroup.path(), &["capture", "detach", "--cgroup", cg]);
    assert!(!ok && err.contains("not attached"), "{err}");
}

/// Another agent's socket load balancer on the same cgroup (`service-lb`, a stand-in for
/// Cilium's socket LB: `connect4` translates 10.96.0.10:80 to the backend 10.66.1.2:8080, and
/// `getpeername4` shows the service again).
/// Holds the loaded programs and their links (dropping it detaches them).
struct ServiceLb(#[allow(dead_code)] aya::Ebpf);

const SERVICE_VIP: &str = "10.96.0.10:80";

impl ServiceLb {
    /// Loads it and links it to the cgroup (after whatever is linked already: cgroup
    /// programs of one hook run in the order they were attached).
    fn attach(cgroup: &Cgroup) -> Self {
        let object = tern_tests::bin_dir().join("../ebpf/bpfel-unknown-none/release/service-lb");
        let mut lb = aya::Ebpf::load_file(&object).expect("load service-lb");
        let mut services: aya::maps::HashMap<_, u64, u64> =
            aya::maps::HashMap::try_from(lb.map_mut("SERVICES").unwrap()).unwrap();
        let pack = |addr: &str| {
            let addr: std::net::SocketAddrV4 = addr.parse().unwrap();
            let ip = u32::from_ne_bytes(addr.ip().octets());
            (u64::from(ip) << 32) | u64::from(addr.port().to_be())
        };
        services
            .insert(pack(SERVICE_VIP), pack("10.66.1.2:8080"), 0)
            .unwrap();
        let cgroup_fd = std::fs::File::open(cgroup.path()).unwrap();
        for name in ["lb_connect4", "lb_peername4"] {
            let program: &mut aya::programs::CgroupSockAddr =
                lb.program_mut(name).unwrap().try_into().unwrap();
            program.load().unwrap();
            program
                .attach(&cgroup_fd, aya::programs::CgroupAttachMode::Single)
                .unwrap();
        }
        Self(lb)
    }
}

/// An address-rewriting agent on the same cgroup: neither evicts the other, and what each
/// sees depends on the order they were attached, as documented in the README:
/// - tern first: tern sees the service address (and routes by it), its own upstream connect
///   is translated by the load balancer, and the application sees the service address;
/// - the load balancer first: tern sees the backend it chose, and so does the application.
///
/// Detaching tern leaves the other agent's programs in place.
#[test]
fn ebpf_coexists_with_an_address_rewriting_load_balancer() {
    tern_tests::require_root!();
    for lb_first in [false, true] {
        let p = pods();
        let _server = serve(&p.srv, &["10.66.1.2:8080"]).unwrap();
        let run = run_args("ebpf", &p.cgroup, &["--inbound-ports", ""]);
        let (_lb, tern_proc) = if lb_first {
            let lb = ServiceLb::attach(&p.cgroup);
            (lb, Tern::start(&p.app, Some(&p.cgroup), &run).unwrap())
        } else {
            let t = Tern::start(&p.app, Some(&p.cgroup), &run).unwrap();
            (ServiceLb::attach(&p.cgroup), t)
        };
        assert_eq!(p.cgroup.attached_programs().unwrap().len(), 8);

        let c = connect(&p.app, Some(&p.cgroup), SERVICE_VIP);
        assert!(c.ok() && c.proxied(), "lb first: {lb_first}: {c:?}");
        let (tern_saw, app_saw) = if lb_first {
            ("10.66.1.2:8080", "10.66.1.2:8080")
        } else {
            (SERVICE_VIP, SERVICE_VIP)
        };
        assert!(
            tern_proc
                .log()
                .contains(&format!("original_dst={tern_saw}")),
            "lb first: {lb_first}: tern should have seen {tern_saw}:\n{}",
            tern_proc.log()
        );
        assert_eq!(c.peer.as_deref(), Some(app_saw), "lb first: {lb_first}");

        let (ok, _, err) = tern_in(
            p.cgroup.path(),
            &["capture", "detach", "--cgroup", p.cgroup.path_str()],
        );
        assert!(ok, "{err}");
        let mut left = p.cgroup.attached_programs().unwrap();
        left.sort();
        assert_eq!(
            left,
            ["lb_connect4", "lb_peername4"],
            "the other agent's programs stay"
        );
    }
}

/// Bad input gets a clear error and never a half-attached state.
#[test]
fn bad_input_is_refused_clearly() {
    tern_tests::require_root!();
    let p = pods();
    let (ok, _, err) = tern(&["capture", "attach", "--cgroup", "/nonexistent/tern"]);
    assert!(!ok && err.contains("/nonexistent/tern"), "{err}");

    let (ok, _, err) = tern(&["capture", "attach", "--cgroup", "/tmp"]);
    assert!(!ok && err.contains("not a cgroup v2 directory"), "{err}");

    let (ok, _, err) = tern_in(
        p.cgroup.path(),
        &[
            "capture",
            "attach",
            "--cgroup",
            p.cgroup.path_str(),
            "--exclude-cidrs",
            "10.0.0.0/40",
        ],
    );
    assert!(!ok && err.contains("10.0.0.0/40"), "{err}");

    let (ok, _, err) = tern(&["run", "--capture", "ebpf"]);
    assert!(!ok && err.contains("--cgroup"), "{err}");

    // Without privileges (inside the Pod's cgroup): refused with the reason, and nothing
    // attached.
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" || exit 97; shift; exec "$@""#)
        .arg("sh")
        .arg(p.cgroup.path())
        .arg("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(tern_tests::tern_bin())
        .args(["capture", "attach", "--cgroup", p.cgroup.path_str()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("permission denied"),
        "{err}"
    );
    assert!(!p.cgroup.pin_dir().exists());
    assert!(p.cgroup.attached_programs().unwrap().is_empty());
    assert!(Path::new(p.cgroup.path_str()).is_dir());
}

/// bpf objects bpftool shows, by kind: the ids of links, programs and maps.
fn bpf_ids(kind: &str) -> Vec<u64> {
    bpftool(&[kind, "show"])
        .unwrap()
        .as_array()
        .map(|a| a.iter().filter_map(|o| o["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// What one pinned capture holds in the kernel, by bpftool: its link, program and map ids.
fn capture_objects(pins: &Path) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    let (mut links, mut programs, mut maps) = (Vec::new(), Vec::new(), Vec::new());
    for entry in std::fs::read_dir(pins).unwrap().flatten() {
        let path = entry.path();
        let path = path.to_str().unwrap();
        if entry.file_name().to_string_lossy().starts_with("link_") {
            let link = bpftool(&["link", "show", "pinned", path]).unwrap();
            links.push(link["id"].as_u64().unwrap());
            programs.push(link["prog_id"].as_u64().unwrap());
        } else {
            maps.push(
                bpftool(&["map", "show", "pinned", path]).unwrap()["id"]
                    .as_u64()
                    .unwrap(),
            );
        }
    }
    (links, programs, maps)
}

/// A Pod deleted while its tern was dead (SIGKILL leaves the hooks pinned, by design): the
/// next tern that starts on the node removes everything the dead capture held in the kernel,
/// and `tern capture gc` does the same on demand, leaving live captures alone.
#[test]
fn ebpf_captures_of_deleted_pods_are_collected() {
    tern_tests::require_root!();
    let ns = Netns::new("gc").unwrap();
    let cgroup = Cgroup::new("gc").unwrap();
    let run = ["run", "--capture", "ebpf", "--cgroup", cgroup.path_str()];
    let mut dead = Tern::start(&ns, Some(&cgroup), &run).unwrap();
    let pins = cgroup.pin_dir();
    let (links, programs, maps) = capture_objects(&pins);
    assert_eq!((links.len(), programs.len()), (7, 7), "{pins:?}");
    let netns_ino = std::fs::metadata(ns.path()).unwrap().ino();
    let (ok, status, err) = tern(&["capture", "status", "--cgroup", cgroup.path_str(), "--json"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status[0]["liveness"], "live", "{status}");
    let held = status[0]["kernel_memory"].as_u64().unwrap();
    assert!(
        held > 0 && held < 1 << 20,
        "kernel memory per capture: {held} bytes"
    );
    dead.process.kill();
    assert!(
        pins.is_dir(),
        "SIGKILL must leave the capture pinned (fail-open)"
    );

    // The Pod is deleted: its cgroup and its network namespace.
    std::fs::remove_dir(cgroup.path()).expect("remove the dead Pod's cgroup");
    assert!(
        Command::new("ip")
            .args(["netns", "del", ns.name()])
            .status()
            .unwrap()
            .success()
    );
    // The kernel releases a removed cgroup, and detaches its links, asynchronously; then
    // status says so, unless another tern starting meanwhile (a parallel test) collected it.
    let state = || {
        let (ok, status, err) = tern(&["capture", "status", "--json"]);
        assert!(ok, "{err}");
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        status
            .as_array()
            .unwrap()
            .iter()
            .find(|s| Path::new(s["pins"].as_str().unwrap()) == pins)
            .map(|s| s["liveness"].as_str().unwrap_or_default().to_owned())
    };
    assert!(
        eventually(Duration::from_secs(10), || state()
            .is_none_or(|l| l == "cgroup_gone")),
        "still {:?}",
        state()
    );

    // Another Pod's tern starts: the dead capture is collected.
    let p = pods();
    let _live = p
        .start_tern(&tern_tests::ConfigFile::new("").unwrap(), &[])
        .unwrap();
    assert!(!pins.exists(), "the dead capture's pins are still there");
    let (live_links, live_programs, live_maps) = (bpf_ids("link"), bpf_ids("prog"), bpf_ids("map"));
    for (kind, dead_ids, live_ids) in [
        ("link", &links, &live_links),
        ("program", &programs, &live_programs),
        ("map", &maps, &live_maps),
    ] {
        let left: Vec<_> = dead_ids.iter().filter(|id| live_ids.contains(id)).collect();
        assert!(
            left.is_empty(),
            "{kind}s of the dead capture remain: {left:?}"
        );
    }
    let on_dead_netns = tern_tests::bpf_links_on_netns(netns_ino).unwrap();
    assert_eq!(on_dead_netns, 0, "a link still holds the deleted namespace");

    // `tern capture gc` leaves the live capture alone.
    let (ok, out, err) = tern(&["capture", "gc"]);
    assert!(ok, "{err}");
    assert!(
        !out.contains(&p.cgroup.pin_dir().display().to_string()),
        "{out}"
    );
    assert!(p.cgroup.pin_dir().is_dir(), "a live capture was collected");
}

/// Original destinations live in the sockets' own storage: a churn of connections, half of
/// them reset, neither evicts the record of a connection opened before it nor leaves
/// hand-over entries behind.
#[test]
fn ebpf_original_destinations_survive_churn() {
    tern_tests::require_root!();
    let p = pods();
    let _server = serve(&p.srv, &["10.66.1.2:8080"]).unwrap();
    let _tern = Tern::start(
        &p.app,
        Some(&p.cgroup),
        &run_args("ebpf", &p.cgroup, &["--inbound-ports", ""]),
    )
    .unwrap();
    let script = r#"
import json, socket, struct
dst = ("10.66.1.2", 8080)
held = socket.create_connection(dst)
held_greeting = held.recv(200).decode()
for i in range(2000):
    s = socket.create_connection(dst)
    if i % 2:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
held.sendall(b"still here\n")
echo = held.recv(200).decode()
print(json.dumps({"peer": "%s:%d" % held.getpeername(), "greeting": held_greeting, "echo": echo}))
"#;
    let out = p
        .app
        .output(Some(&p.cgroup), Path::new("python3"), &["-c", script])
        .unwrap();
    let out: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    assert_eq!(out["peer"], "10.66.1.2:8080", "{out}");
    assert!(
        out["greeting"]
            .as_str()
            .unwrap()
            .starts_with("peer=10.66.1.1:"),
        "{out}"
    );
    assert_eq!(out["echo"], "still here\n", "{out}");
    assert!(capture_counter(&p.cgroup, "sockops.handed_over") >= 2001);
    assert!(
        eventually(Duration::from_secs(5), || map_entries(
            &p.cgroup,
            "ORIG_BY_TUPLE"
        ) == 0),
        "ORIG_BY_TUPLE holds {} entries after the churn",
        map_entries(&p.cgroup, "ORIG_BY_TUPLE")
    );
}

/// Once capture is set up tern gives up root and every capability (`--run-as-uid`, with
/// capture skipping that uid's sockets instead of a mark), as Istio's proxy runs as 1337:
/// `/proc` shows uid 1337 and no inherited, permitted, effective or ambient capability, and
/// outbound and inbound still go through it.
fn the_proxy_runs_unprivileged(mode: &str) {
    let p = pods();
    let _server = serve(&p.srv, &["10.66.1.2:8080"]).unwrap();
    let _app = serve(&p.app, &["0.0.0.0:8081"]).unwrap();
    let mut args = run_args(
        mode,
        &p.cgroup,
        &[
            "--inbound-ports",
            "8081",
            "--proxy-uid",
            "1337",
            "--run-as-uid",
            "1337",
        ],
    );
    let netns = p.app.path();
    if mode == "ebpf" {
        args.extend(["--netns", netns.to_str().unwrap()]);
    }
    let tern_proc = Tern::start(&p.app, Some(&p.cgroup), &args).unwrap();
    let field = |name: &str| tern_tests::proc_status(tern_proc.process.pid(), name);
    assert_eq!(field("Uid"), ["1337"; 4]);
    assert_eq!(field("Gid"), ["1337"; 4]);
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(field(caps), ["0000000000000000"], "{caps}");
    }
    assert_eq!(field("NoNewPrivs"), ["1"]);
    let out = connect(&p.app, Some(&p.cgroup), "10.66.1.2:8080");
    assert!(out.ok() && out.proxied(), "{out:?}\n{}", tern_proc.log());
    let inbound = connect(&p.srv, None, "10.66.1.1:8081");
    assert!(
        inbound.ok() && inbound.via_inbound_proxy(),
        "{inbound:?}\n{}",
        tern_proc.log()
    );
    let metrics = tern_tests::admin(&p.app, "GET", "/stats/prometheus");
    assert!(
        metrics.contains("tern_downstream_connections_total"),
        "{metrics}"
    );
}
