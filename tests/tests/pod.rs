//! tern in a real Pod: containers started by a real OCI runtime (runc) with private cgroup,
//! mount and pid namespaces, the Pod's cgroup laid out as the kubelet lays it out (both
//! drivers), and tern started from the command, environment, capabilities and mounts that
//! `tern inject` wrote. From inside its container, tern finds the Pod's cgroup by the Pod's
//! UID and captures the application's outbound and inbound traffic, while a kubelet-like
//! probe from the node keeps reaching the application. A Pod deleted after its tern was
//! killed leaves nothing in the kernel once `tern capture gc` runs.
use std::{path::PathBuf, time::Duration};

use serde_yaml::Value;
use tern_tests::{
    Netns, connect, eventually, link_via,
    oci::{BIN, Bind, CgroupDriver, Container, OciPod},
    serve, tern, tern_bin,
};

const NODE_IP: &str = "10.77.0.1";
const POD_IP: &str = "10.77.0.2";

/// The application's Pod manifest, as a user writes it.
const MANIFEST: &str = "apiVersion: v1
kind: Pod
metadata:
  name: app
  namespace: default
spec:
  containers:
  - name: app
    image: registry.example.com/app:1
    readinessProbe:
      tcpSocket:
        port: 8080
";

/// tern's container as `tern inject` writes it, turned into what the kubelet would start:
/// the downward API resolved, the volumes bound from the host. istiod is not here, so the
/// environment that points at it is left out (tern runs on passthrough).
fn injected_tern(pod: &OciPod) -> Container {
    let out = std::process::Command::new(tern_bin())
        .arg("inject")
        .stdin({
            let file = std::env::temp_dir().join(tern_tests::unique("manifest"));
            std::fs::write(&file, MANIFEST).unwrap();
            std::fs::File::open(&file).unwrap()
        })
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let spec = &manifest["spec"]["initContainers"][0];
    assert_eq!(spec["name"], "tern");
    assert_eq!(spec["securityContext"]["privileged"], false);

    let mut args = vec![format!("{BIN}/tern")];
    args.extend(
        spec["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned()),
    );
    let field = |path: &str| -> String {
        match path {
            "metadata.name" => "app".into(),
            "metadata.namespace" => "default".into(),
            "metadata.uid" => pod.uid.clone(),
            "status.podIP" => POD_IP.into(),
            "status.hostIP" => NODE_IP.into(),
            "spec.serviceAccountName" => "default".into(),
            other => panic!("unexpected downward API field {other}"),
        }
    };
    let env: Vec<(String, String)> = spec["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = match e["value"].as_str() {
                Some(v) => v.to_owned(),
                None => field(e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap()),
            };
            (name, value)
        })
        .filter(|(name, _)| {
            !matches!(
                name.as_str(),
                "XDS_ADDRESS" | "XDS_ROOT_CA" | "TERN_XDS_TOKEN_FILE"
            )
        })
        .collect();
    let capabilities = spec["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    // The node's directories the injected volumes name (hostPath): bpffs, and the node's
    // whole /sys/fs/cgroup (on this hybrid host, v1 controllers with v2 at `unified/`).
    let host_path = |volume: &str| -> Option<PathBuf> {
        manifest["spec"]["volumes"]
            .as_sequence()?
            .iter()
            .find(|v| v["name"] == volume)?["hostPath"]["path"]
            .as_str()
            .map(PathBuf::from)
    };
    // A `subPathExpr` names a directory below the hostPath, which the kubelet creates.
    let expand = |expr: &str| -> String {
        env.iter()
            .fold(expr.to_owned(), |e, (name, value): &(String, String)| {
                e.replace(&format!("$({name})"), value)
            })
    };
    let binds = spec["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|m| {
            let mut source = host_path(m["name"].as_str()?)?;
            if let Some(sub) = m["subPathExpr"].as_str() {
                source = source.join(expand(sub));
                std::fs::create_dir_all(&source).unwrap();
            }
            Some(Bind {
                source,
                destination: m["mountPath"].as_str()?.to_owned(),
                read_only: m["readOnly"].as_bool().unwrap_or(false),
            })
        })
        .collect();
    Container {
        name: "tern".into(),
        args,
        env,
        capabilities: Some(capabilities),
        binds,
    }
}

fn pod_is_captured_from_inside(driver: CgroupDriver) {
    let node = Netns::new("node").unwrap();
    let peer = Netns::new("peer").unwrap();
    let mut pod = OciPod::new(driver).unwrap();
    link_via(
        &node,
        "eth0",
        &format!("{NODE_IP}/24"),
        &pod.ns,
        "eth0",
        &format!("{POD_IP}/24"),
    )
    .unwrap();
    link_via(
        &peer,
        "eth0",
        "10.78.0.1/24",
        &pod.ns,
        "eth1",
        "10.78.0.2/24",
    )
    .unwrap();
    let _outside = serve(&node, &[&format!("{NODE_IP}:9090")]).unwrap();

    pod.run(&Container {
        name: "app".into(),
        args: vec![
            format!("{BIN}/tern-testpeer"),
            "serve".into(),
            "0.0.0.0:8080".into(),
        ],
        ..Default::default()
    })
    .unwrap();
    let tern_container = injected_tern(&pod);
    pod.run(&tern_container).unwrap();
    // kubelet's startup probe, from the node.
    let ready = || {
        node.output(
            None,
            std::path::Path::new("curl"),
            &[
                "-s",
                "-m",
                "1",
                &format!("http://{POD_IP}:15020/healthz/ready"),
            ],
        )
        .unwrap_or_default()
        .trim()
            == "LIVE"
    };
    assert!(
        eventually(Duration::from_secs(20), ready),
        "tern never became ready:\n{}",
        pod.log("tern")
    );
    let log = pod.log("tern");
    assert!(
        log.contains(&pod.cgroup_relative()),
        "tern did not find the Pod's cgroup:\n{log}"
    );
    // Istio's default number of workers, not one per core of the node.
    assert!(
        log.contains("data-plane workers started workers=2"),
        "{log}"
    );

    // tern's view from inside: a private cgroup namespace, and the Pod's cgroup found by UID.
    let own = pod.exec("tern", &["cat", "/proc/self/cgroup"]).unwrap();
    assert!(
        String::from_utf8_lossy(&own.stdout).contains("0::/\n"),
        "{own:?}"
    );
    let check = pod
        .exec("tern", &[&format!("{BIN}/tern"), "check"])
        .unwrap();
    let check = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.contains("tern inside the Pod cgroup   yes"),
        "{check}"
    );
    let driver_name = match driver {
        CgroupDriver::Cgroupfs => "Cgroupfs driver",
        CgroupDriver::Systemd => "Systemd driver",
    };
    assert!(check.contains(driver_name), "{check}");
    // The same cgroup by its id, as `bpftool cgroup` or a CRI runtime shows it.
    let id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(pod.cgroup()).unwrap());
    let by_id = pod
        .exec(
            "tern",
            &[
                &format!("{BIN}/tern"),
                "check",
                "--cgroup-id",
                &id.to_string(),
            ],
        )
        .unwrap();
    let by_id = String::from_utf8_lossy(&by_id.stdout).into_owned();
    assert!(
        by_id.contains(&format!("(id {id}; cgroup id {id})")),
        "{by_id}"
    );
    assert!(
        by_id.contains("tern inside the Pod cgroup   yes"),
        "{by_id}"
    );

    // Outbound: the application's connect goes through tern and it still sees its destination.
    let out = pod
        .exec(
            "app",
            &[
                &format!("{BIN}/tern-testpeer"),
                "connect",
                &format!("{NODE_IP}:9090"),
            ],
        )
        .unwrap();
    let c: tern_tests::Connection =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert!(c.ok() && c.proxied(), "{c:?}\n{}", pod.log("tern"));
    assert_eq!(c.peer.as_deref(), Some(&*format!("{NODE_IP}:9090")));

    // The long-lived proxy runs as uid 1337 with no capability left (the container starts
    // it as root with BPF, NET_ADMIN and PERFMON to set capture up).
    let pid = pod.pid("tern").expect("tern's pid");
    let field = |name: &str| tern_tests::proc_status(pid, name);
    assert_eq!(field("Uid"), ["1337"; 4]);
    for caps in ["CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(field(caps), ["0000000000000000"], "{caps}");
    }
    // Inbound from another Pod: through tern (the application sees 127.0.0.6).
    let c = connect(&peer, None, "10.78.0.2:8080");
    assert!(c.ok(), "{c:?}");
    assert!(c.via_inbound_proxy(), "{c:?}");
    // A kubelet-like TCP probe from the node goes through tern like any other client (the
    // node's address skips nothing: host-network Pods and SNATed NodePort clients share it).
    let probe = connect(&node, None, &format!("{POD_IP}:8080"));
    assert!(probe.ok(), "{probe:?}");
    assert!(probe.via_inbound_proxy(), "{probe:?}");

    // tern is killed, then the Pod deleted: its capture stays pinned until collected.
    let (ok, status, err) = tern(&["capture", "status", "--json"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let pins = status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["cgroup"]
                .as_str()
                .is_some_and(|c| c.ends_with(&pod.cgroup_relative()))
        })
        .unwrap_or_else(|| panic!("no capture for the Pod's cgroup: {status}"))["pins"]
        .as_str()
        .unwrap()
        .to_owned();
    // Pinned in the Pod's own directory of the node's bpffs, the only one tern's container
    // sees: the node's other captures are not in its view.
    let pod_dir = PathBuf::from(format!("/sys/fs/bpf/tern-pods/{}", pod.uid));
    assert!(
        PathBuf::from(&pins).starts_with(&pod_dir),
        "{pins} is not in {}",
        pod_dir.display()
    );
    let seen = pod
        .exec("tern", &["ls", "/sys/fs/bpf", "/sys/fs/bpf/tern"])
        .unwrap();
    let seen = String::from_utf8_lossy(&seen.stdout).into_owned();
    let own = PathBuf::from(&pins);
    let own = own.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        seen.split_whitespace()
            .filter(|w| !w.ends_with(':'))
            .collect::<Vec<_>>(),
        ["tern", own],
        "tern's container sees more than its own capture:\n{seen}"
    );
    pod.kill("tern", "KILL").unwrap();
    assert!(eventually(Duration::from_secs(5), || !pod.running("tern")));
    assert!(
        PathBuf::from(&pins).is_dir(),
        "killing tern removed its pins (capture must fail open)"
    );
    let netns_ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(pod.ns.path()).unwrap());
    pod.delete();
    assert!(
        eventually(Duration::from_secs(10), || {
            let (ok, _, _) = tern(&["capture", "gc"]);
            ok && !PathBuf::from(&pins).exists()
        }),
        "the deleted Pod's capture was never collected"
    );
    assert!(
        !pod_dir.exists(),
        "the deleted Pod's bpffs directory is left"
    );
    let left = tern_tests::bpf_links_on_netns(netns_ino).unwrap();
    assert_eq!(left, 0, "a link still holds the deleted Pod's namespace");
}

#[test]
fn pod_with_cgroupfs_driver_is_captured_from_inside() {
    tern_tests::require_root!();
    pod_is_captured_from_inside(CgroupDriver::Cgroupfs);
}

#[test]
fn pod_with_systemd_driver_is_captured_from_inside() {
    tern_tests::require_root!();
    pod_is_captured_from_inside(CgroupDriver::Systemd);
}
