//! `tern inject`, run as a user runs it: golden files of real manifests, idempotence,
//! opt-outs and refusals, and the results checked against Kubernetes' API schemas in strict
//! mode by an independent validator (`kubernetes-validate`, installed by `cargo xtask setup`).
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use tern_tests::tern_bin;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/inject")
        .join(name)
}

/// Runs `tern inject <args>` with `stdin`; returns (success, stdout, stderr).
fn inject(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(tern_bin())
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tern inject");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Validates YAML against the API schemas of `version` in strict mode (unknown fields fail).
fn validate(yaml: &str, version: &str) -> Result<(), String> {
    let file = std::env::temp_dir().join(format!("{}.yaml", tern_tests::unique("validate")));
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--no-warn", "-k", version])
        .arg(&file)
        .output()
        .expect("kubernetes-validate (installed by `cargo xtask setup`)");
    let _ = std::fs::remove_file(&file);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && !text.contains("ERROR") {
        Ok(())
    } else {
        Err(text)
    }
}

const FIXTURES: [&str; 3] = ["deployment", "statefulset", "job"];

#[test]
fn real_manifests_match_their_golden_files_and_validate() {
    tern_tests::require_root!();
    for name in FIXTURES {
        let (ok, out, err) = inject(&["-f", data(&format!("{name}.yaml")).to_str().unwrap()], "");
        assert!(ok, "{name}: {err}");
        let golden = data(&format!("{name}.injected.yaml"));
        if std::env::var_os("TERN_UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &out).unwrap();
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
            panic!("{}: {e} (TERN_UPDATE_GOLDEN=1 writes it)", golden.display())
        });
        assert_eq!(out, want, "{name}: differs from {}", golden.display());
        validate(&out, "1.30.0").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(err.contains("injected"), "{err}");
    }
}

#[test]
fn the_validator_catches_unknown_fields() {
    tern_tests::require_root!();
    // The check the golden test relies on can fail: a misspelt field is refused.
    let (_, out, _) = inject(&["-f", data("job.yaml").to_str().unwrap()], "");
    let misspelt = out.replace("readOnlyRootFilesystem", "readOnlyRootFilesytem");
    assert!(
        validate(&misspelt, "1.30.0")
            .unwrap_err()
            .contains("readOnlyRootFilesytem")
    );
    // A native sidecar needs Kubernetes 1.29; the plain-container form validates before it.
    assert!(
        validate(&out, "1.27.0")
            .unwrap_err()
            .contains("restartPolicy")
    );
    let (ok, plain, err) = inject(
        &[
            "-f",
            data("job.yaml").to_str().unwrap(),
            "--native-sidecar",
            "false",
        ],
        "",
    );
    assert!(ok, "{err}");
    validate(&plain, "1.27.0").unwrap();
    let containers = plain
        .find("      containers:\n      - name: tern")
        .is_some();
    assert!(containers, "tern is not the first container:\n{plain}");
}

#[test]
fn injecting_twice_changes_nothing() {
    tern_tests::require_root!();
    for name in FIXTURES {
        let (_, once, _) = inject(&["-f", data(&format!("{name}.yaml")).to_str().unwrap()], "");
        let (ok, twice, err) = inject(&[], &once);
        assert!(ok, "{err}");
        assert_eq!(twice, once, "{name}");
        assert!(err.contains("unchanged (already injected)"), "{err}");
    }
}

#[test]
fn opted_out_pods_and_other_kinds_pass_unchanged() {
    tern_tests::require_root!();
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: legacy\n  labels:\n    sidecar.istio.io/inject: \"false\"\nspec:\n  containers:\n  - name: app\n    image: app:1\n";
    let config = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: b\n";
    let (ok, out, err) = inject(&[], &format!("{pod}---\n{config}"));
    assert!(ok, "{err}");
    assert!(!out.contains("tern"), "{out}");
    assert!(out.contains("kind: ConfigMap"), "{out}");
    assert!(err.contains("Pod -/legacy unchanged (opted out)"), "{err}");

    // A List's items are injected one by one.
    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: a\n  spec:\n    containers:\n    - name: app\n      image: app:1\n";
    let (ok, out, err) = inject(&[], list);
    assert!(ok, "{err}");
    assert!(out.contains("name: tern"), "{out}");
    validate(&out, "1.30.0").unwrap();
}

#[test]
fn what_cannot_be_injected_is_refused_clearly() {
    tern_tests::require_root!();
    let pod = |extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: n\n{extra}spec:\n  containers:\n  - name: app\n    image: app:1\n"
        )
    };
    let host_network = pod("").replace("spec:\n", "spec:\n  hostNetwork: true\n");
    let istio = pod("").replace(
        "  containers:\n",
        "  containers:\n  - name: istio-proxy\n    image: istio/proxyv2:1.22.3\n",
    );
    let tern_named = pod("").replace(
        "  containers:\n",
        "  containers:\n  - name: tern\n    image: evil/tern:1\n",
    );
    let bad_port =
        pod("  annotations:\n    traffic.sidecar.istio.io/excludeOutboundPorts: \"22,ssh\"\n");
    let include = pod(
        "  annotations:\n    traffic.sidecar.istio.io/includeOutboundIPRanges: \"10.0.0.0/8\"\n",
    );
    for (input, says) in [
        (
            host_network.as_str(),
            "not injecting Pod n/p: it uses the node's network namespace",
        ),
        (istio.as_str(), "already has Istio's sidecar"),
        (
            tern_named.as_str(),
            "a container named tern that injection did not add",
        ),
        (
            bad_port.as_str(),
            "excludeOutboundPorts: invalid port \"ssh\"",
        ),
        (include.as_str(), "includeOutboundIPRanges"),
        (
            "kind: [unclosed",
            "document 2: not YAML: did not find expected",
        ),
    ] {
        // Refused whole: the good document before the bad one is not written either.
        let good = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: fine\nspec:\n  containers:\n  - name: a\n    image: a\n";
        let (ok, out, err) = inject(&[], &format!("{good}---\n{input}"));
        assert!(!ok, "accepted:\n{input}");
        assert!(
            out.is_empty(),
            "wrote output for a refused manifest:\n{out}"
        );
        assert!(err.contains(says), "{err}");
    }
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// istiod's injection template (deploy/istio/tern-template.yaml) is what `tern inject
/// --istio-template` writes, holds no Go template action, and makes a valid Pod once istiod
/// merges it into one.
#[test]
fn the_istio_template_matches_its_file_and_makes_a_valid_pod() {
    tern_tests::require_root!();
    let (ok, out, err) = inject(&["--istio-template"], "");
    assert!(ok, "{err}");
    let file = repo("deploy/istio/tern-template.yaml");
    if std::env::var_os("TERN_UPDATE_GOLDEN").is_some() {
        std::fs::write(&file, &out).unwrap();
    }
    assert_eq!(
        out,
        std::fs::read_to_string(&file).unwrap(),
        "regenerate with TERN_UPDATE_GOLDEN=1"
    );
    let values: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
    let template = values["sidecarInjectorWebhook"]["templates"]["tern"]
        .as_str()
        .unwrap();
    assert!(
        !template.contains("{{"),
        "istiod would read a Go template action"
    );
    let template: serde_yaml::Value = serde_yaml::from_str(template).unwrap();
    let mut pod: serde_yaml::Value = serde_yaml::from_str(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app\nspec:\n  containers:\n  - name: app\n    image: app:1\n",
    )
    .unwrap();
    pod["metadata"]["annotations"] = template["metadata"]["annotations"].clone();
    pod["spec"]["initContainers"] = template["spec"]["initContainers"].clone();
    pod["spec"]["volumes"] = template["spec"]["volumes"].clone();
    validate(&serde_yaml::to_string(&pod).unwrap(), "1.30.0").unwrap();
}

/// The webhook's install manifests validate, run the image `tern inject` gives sidecars,
/// and mount the Secret cert-manager.yaml makes where `tern webhook` reads it.
#[test]
fn the_webhook_install_validates_and_agrees_with_tern() {
    tern_tests::require_root!();
    let install = std::fs::read_to_string(repo("deploy/kubernetes/tern-webhook.yaml")).unwrap();
    validate(&install, "1.30.0").unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&install)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let (_, template, _) = inject(&["--istio-template"], "");
    let image = container["image"].as_str().unwrap();
    assert!(
        template.contains(&format!("image: {image}")),
        "{image} is not the sidecar image"
    );
    let env = |name: &str| {
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(env("TERN_IMAGE"), image);
    let secret = deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"]
        .as_str()
        .unwrap();
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert_eq!(env("TERN_WEBHOOK_CERT"), format!("{mount}/tls.crt"));
    assert_eq!(env("TERN_WEBHOOK_KEY"), format!("{mount}/tls.key"));

    let cert_manager =
        std::fs::read_to_string(repo("deploy/kubernetes/cert-manager.yaml")).unwrap();
    let certificate = serde_yaml::Deserializer::from_str(&cert_manager)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|d| d["kind"] == "Certificate")
        .unwrap();
    assert_eq!(certificate["spec"]["secretName"], secret);
    let webhook_config = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    assert_eq!(
        webhook_config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!(
            "{}/{}",
            certificate["metadata"]["namespace"].as_str().unwrap(),
            certificate["metadata"]["name"].as_str().unwrap()
        )
    );
    // A webhook that cannot answer must not let Pods be created without tern.
    for hook in webhook_config["webhooks"].as_sequence().unwrap() {
        assert_eq!(hook["failurePolicy"], "Fail");
        assert_eq!(hook["clientConfig"]["service"]["path"], "/inject");
    }
    // Only the webhook port is let in.
    let policy = docs
        .iter()
        .find(|d| d["kind"] == "NetworkPolicy")
        .expect("a NetworkPolicy for the webhook");
    let ingress = policy["spec"]["ingress"].as_sequence().unwrap();
    assert_eq!(ingress.len(), 1);
    assert_eq!(ingress[0]["ports"][0]["port"], 9443);
}
