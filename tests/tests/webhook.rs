//! `tern webhook` over HTTPS, as the API server calls it: `AdmissionReview`s for a selected
//! Pod (its JSONPatch gives exactly what `tern inject` writes), an opted-out one, an
//! injected one, one tern cannot inject (admitted with a warning, never denied), requests
//! that are not reviews, and a serving certificate rotated on disk.
use std::{path::Path, time::Duration};

use base64::Engine;
use serde_json::{Value, json};
use tern_tests::{Netns, Process, eventually, pki::TestCa, tern_bin};

const HOST: &str = "tern-webhook.tern-system.svc";

struct Webhook {
    ns: Netns,
    process: Process,
    dir: std::path::PathBuf,
    /// What requests with a body say they carry.
    content_type: std::cell::Cell<&'static str>,
}

impl Webhook {
    fn start(ca: &TestCa) -> Self {
        Self::start_with(ca, &[])
    }

    fn start_with(ca: &TestCa, extra: &[&str]) -> Self {
        let ns = Netns::new("webhook").unwrap();
        let dir = std::env::temp_dir().join(tern_tests::unique("webhook-tls"));
        std::fs::create_dir_all(&dir).unwrap();
        install_cert(ca, &dir, "first");
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let mut args = vec![
            "webhook",
            "--listen",
            "127.0.0.1:9443",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ];
        args.extend(extra);
        let mut cmd = ns.command(None, &tern_bin(), &args);
        cmd.stdout(std::process::Stdio::null());
        let webhook = Self {
            process: Process::spawn(cmd).unwrap(),
            ns,
            dir,
            content_type: std::cell::Cell::new("application/json"),
        };
        assert!(
            eventually(Duration::from_secs(10), || webhook
                .curl(ca, "GET", "/healthz/ready", None)
                .0
                == 200),
            "the webhook never became ready"
        );
        webhook
    }

    /// (HTTP status, body); status 0 when the TLS connection failed.
    fn curl(&self, ca: &TestCa, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let file = self.dir.join("body.json");
        std::fs::write(&file, body.unwrap_or("")).unwrap();
        let url = format!("https://{HOST}:9443{path}");
        let resolve = format!("{HOST}:9443:127.0.0.1");
        let data = format!("@{}", file.display());
        let ca_file = ca.ca_str();
        let mut args = vec![
            "-s",
            "-m",
            "5",
            "-w",
            "\n%{http_code}",
            "--cacert",
            &ca_file,
            "--resolve",
            &resolve,
            "-X",
            method,
            &url,
        ];
        let content_type = format!("Content-Type: {}", self.content_type.get());
        if body.is_some() {
            args.extend(["-H", &content_type, "--data-binary", &data]);
        }
        let out = self
            .ns
            .output(None, Path::new("curl"), &args)
            .unwrap_or_default();
        let (body, status) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (status.trim().parse().unwrap_or(0), body.to_owned())
    }
}

impl Webhook {
    /// A POST to /inject with another content type.
    fn curl_typed(&self, ca: &TestCa, content_type: &'static str, body: &str) -> (u16, String) {
        self.content_type.set(content_type);
        let answer = self.curl(ca, "POST", "/inject", Some(body));
        self.content_type.set("application/json");
        answer
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes a certificate for the webhook's Service name into `dir` as tls.crt / tls.key.
fn install_cert(ca: &TestCa, dir: &Path, name: &str) {
    let issued = ca.issue(name, &[HOST], Duration::from_secs(3600)).unwrap();
    // Written aside and renamed, as a Secret volume update does.
    for (from, to) in [(&issued.cert, "tls.crt"), (&issued.key, "tls.key")] {
        let tmp = dir.join(format!(".{to}"));
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(to)).unwrap();
    }
}

fn pod(labels: Value, extra_spec: Value) -> Value {
    let mut spec = json!({"containers": [{"name": "app", "image": "registry.example.com/app:1"}]});
    spec.as_object_mut()
        .unwrap()
        .extend(extra_spec.as_object().unwrap().clone());
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "app-7d9f-", "namespace": "shop", "labels": labels},
        "spec": spec,
    })
}

fn review(uid: &str, operation: &str, object: &Value) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "object": object,
        }
    })
    .to_string()
}

/// The response of a review that must succeed, and its decoded patch (if any).
fn answer(webhook: &Webhook, ca: &TestCa, body: &str) -> (Value, Option<json_patch::Patch>) {
    let (status, text) = webhook.curl(ca, "POST", "/inject", Some(body));
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    let response = answer["response"].clone();
    assert_eq!(response["allowed"], true, "{response}");
    let patch = response["patch"].as_str().map(|p| {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    });
    (response, patch)
}

/// What `tern inject` writes for the same Pod, as JSON.
fn injected_by_the_cli(pod: &Value) -> Value {
    let file = std::env::temp_dir().join(tern_tests::unique("pod.json"));
    std::fs::write(&file, pod.to_string()).unwrap();
    let out = std::process::Command::new(tern_bin())
        .args(["inject", "-f", file.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    serde_json::to_value(yaml).unwrap()
}

#[test]
fn reviews_are_answered_as_the_api_server_expects() {
    tern_tests::require_root!();
    let ca = TestCa::new().unwrap();
    let webhook = Webhook::start(&ca);

    // Selected: the patch makes exactly what `tern inject` makes.
    let selected = pod(json!({"app": "cart"}), json!({}));
    let (response, patch) = answer(&webhook, &ca, &review("u-1", "CREATE", &selected));
    assert_eq!(response["uid"], "u-1");
    let mut patched = selected.clone();
    json_patch::patch(&mut patched, &patch.expect("a patch")).unwrap();
    assert_eq!(patched, injected_by_the_cli(&selected));
    assert_eq!(patched["spec"]["initContainers"][0]["name"], "tern");

    // Already injected: no second sidecar.
    let (_, patch) = answer(&webhook, &ca, &review("u-2", "CREATE", &patched));
    assert!(patch.is_none(), "patched twice");
    // Opted out by label (tern's or Istio's): unchanged.
    for label in ["tern.io/inject", "sidecar.istio.io/inject"] {
        let opted_out = pod(json!({"app": "cart", label: "false"}), json!({}));
        let (_, patch) = answer(&webhook, &ca, &review("u-3", "CREATE", &opted_out));
        assert!(patch.is_none(), "{label}=false was injected");
    }
    // Not a creation: unchanged.
    let (_, patch) = answer(&webhook, &ca, &review("u-4", "UPDATE", &selected));
    assert!(patch.is_none());
    // A selected Pod tern cannot inject is denied, with the reason: a name or an annotation
    // does not opt it out of the mesh's protection.
    let clash = pod(
        json!({"app": "cart"}),
        json!({"volumes": [{"name": "istio-token", "emptyDir": {}}]}),
    );
    let mut impostor = pod(json!({"app": "cart"}), json!({}));
    impostor["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "tern", "image": "evil/tern:1"}));
    for (uid, denied, says) in [
        ("u-6", &clash, "istio-token"),
        ("u-7", &impostor, "a container named tern"),
    ] {
        let (status, text) =
            webhook.curl(&ca, "POST", "/inject", Some(&review(uid, "CREATE", denied)));
        assert_eq!(status, 200, "{text}");
        let response = &serde_json::from_str::<Value>(&text).unwrap()["response"];
        assert_eq!(response["allowed"], false, "{response}");
        assert!(
            response["status"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(says),
            "{response}"
        );
    }
    // A status annotation without tern's container is injected (as Istio's injector does).
    let mut stale = pod(json!({"app": "cart"}), json!({}));
    stale["metadata"]["annotations"] = json!({"tern.io/status": "{}"});
    let (_, patch) = answer(&webhook, &ca, &review("u-8", "CREATE", &stale));
    assert!(patch.is_some(), "a status annotation opted the Pod out");
    // Not JSON: refused.
    let (status, _) = webhook.curl_typed(&ca, "text/plain", &review("u-9", "CREATE", &selected));
    assert_eq!(status, 415);
    // A host-network Pod, which injection does not apply to, is admitted as it is, with a
    // warning (Istio skips them too).
    let host = pod(json!({"app": "node-agent"}), json!({"hostNetwork": true}));
    let (response, patch) = answer(&webhook, &ca, &review("u-5", "CREATE", &host));
    assert!(patch.is_none());
    let warning = response["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.contains("tern was not injected") && warning.contains("hostNetwork"),
        "{response}"
    );

    // Not reviews: 400 with the reason.
    for (body, says) in [
        ("{not json", "not JSON"),
        (
            r#"{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}"#,
            "not an admission.k8s.io/v1 AdmissionReview",
        ),
        (
            r#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}"#,
            "no request.uid",
        ),
    ] {
        let (status, text) = webhook.curl(&ca, "POST", "/inject", Some(body));
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(says), "{text}");
    }
    let (_, metrics) = webhook.curl(&ca, "GET", "/metrics", None);
    for line in [
        "tern_webhook_reviews_total{result=\"injected\"} 2",
        "tern_webhook_reviews_total{result=\"denied\"} 2",
        "tern_webhook_reviews_total{result=\"unchanged\"} 4",
        "tern_webhook_reviews_total{result=\"not_injected\"} 1",
        "tern_webhook_reviews_total{result=\"malformed\"} 3",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[test]
fn a_rotated_certificate_is_served_without_a_restart() {
    tern_tests::require_root!();
    let first = TestCa::new().unwrap();
    let webhook = Webhook::start(&first);
    let second = TestCa::new().unwrap();
    assert_eq!(
        webhook.curl(&second, "GET", "/healthz/ready", None).0,
        0,
        "trusted the wrong CA"
    );
    install_cert(&second, &webhook.dir, "second");
    assert!(
        eventually(Duration::from_secs(15), || webhook
            .curl(&second, "GET", "/healthz/ready", None)
            .0
            == 200),
        "the rotated certificate was never served"
    );
    assert_eq!(webhook.curl(&first, "GET", "/healthz/ready", None).0, 0);
}

/// On SIGTERM the webhook reports itself unready but keeps answering reviews for its grace
/// period (its Service stops sending them meanwhile), then exits.
#[test]
fn it_stops_gracefully() {
    tern_tests::require_root!();
    let ca = TestCa::new().unwrap();
    let mut webhook = Webhook::start_with(&ca, &["--shutdown-grace-secs", "2"]);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &webhook.process.pid().to_string()])
        .status();
    assert!(
        eventually(Duration::from_secs(2), || webhook
            .curl(&ca, "GET", "/healthz/ready", None)
            .0
            == 503),
        "still ready after SIGTERM"
    );
    let selected = pod(json!({"app": "cart"}), json!({}));
    let (_, patch) = answer(&webhook, &ca, &review("u-9", "CREATE", &selected));
    assert!(
        patch.is_some(),
        "a review during the grace period was not answered"
    );
    webhook.process.terminate().unwrap();
}

/// The webhook holds under the largest reviews: a Pod of 1.5 MB (etcd's limit) is answered
/// with the webhook's peak memory under its 192 Mi limit, 20,000 `proxyMetadata` entries
/// (209 kB, under Kubernetes' annotation limit) take well under the API server's 10 s, and a
/// body past 3 MiB is refused unread.
#[test]
fn the_largest_reviews_stay_within_bounds() {
    tern_tests::require_root!();
    let ca = TestCa::new().unwrap();
    let webhook = Webhook::start(&ca);
    let env: Vec<Value> = (0..7000)
        .map(|i| json!({"name": format!("VAR_{i:05}"), "value": "x".repeat(40)}))
        .collect();
    let big = pod(
        json!({"app": "big"}),
        json!({"containers": (0..3).map(|i| json!({
            "name": format!("c{i}"), "image": "img", "env": env,
            "readinessProbe": {"tcpSocket": {"port": 8080}},
        })).collect::<Vec<_>>()}),
    );
    let body = review("u-big", "CREATE", &big);
    assert!(body.len() > 1_400_000, "{} bytes", body.len());
    let (_, patch) = answer(&webhook, &ca, &body);
    assert!(patch.is_some());
    let peak_kib = tern_tests::proc_kib(webhook.process.pid(), "VmHWM");
    eprintln!(
        "webhook peak RSS after a {} byte review: {} KiB",
        body.len(),
        peak_kib
    );
    assert!(peak_kib < 192 * 1024, "peak RSS {peak_kib} KiB");

    let metadata: String = (0..20_000)
        .map(|i| format!("  ISTIO_META_K{i:05}: \"v\"\n"))
        .collect();
    let mut annotated = pod(json!({"app": "md"}), json!({}));
    annotated["metadata"]["annotations"] =
        json!({"proxy.istio.io/config": format!("proxyMetadata:\n{metadata}")});
    let started = std::time::Instant::now();
    let (_, patch) = answer(&webhook, &ca, &review("u-md", "CREATE", &annotated));
    assert!(patch.is_some());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let oversized = format!("{{\"pad\": \"{}\"}}", "x".repeat(3 << 20));
    let (status, _) = webhook.curl(&ca, "POST", "/inject", Some(&oversized));
    assert_eq!(status, 413);
}

/// Many clients at once, each with a body just under the bound (what anyone who reaches the
/// webhook's port can send): the bodies it holds together are bounded, so its memory stays
/// under its 192 Mi limit (64 bodies of 3 MB took it to 262 MiB before), and it answers
/// reviews again afterwards.
#[test]
fn many_large_bodies_at_once_stay_within_bounds() {
    tern_tests::require_root!();
    let ca = TestCa::new().unwrap();
    let webhook = Webhook::start(&ca);
    let file = webhook.dir.join("large.json");
    std::fs::write(&file, format!("{{\"pad\": \"{}\"}}", "x".repeat(3_000_000))).unwrap();
    let (url, resolve, data, ca_file) = (
        format!("https://{HOST}:9443/inject"),
        format!("{HOST}:9443:127.0.0.1"),
        format!("@{}", file.display()),
        ca.ca_str(),
    );
    let statuses: Vec<String> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..64)
            .map(|_| {
                scope.spawn(|| {
                    let args = [
                        "-s",
                        "-o",
                        "/dev/null",
                        "-m",
                        "30",
                        "-w",
                        "%{http_code}",
                        "--cacert",
                        &ca_file,
                        "--resolve",
                        &resolve,
                        "-H",
                        "Content-Type: application/json",
                        "--data-binary",
                        &data,
                        &url,
                    ];
                    webhook
                        .ns
                        .output(None, Path::new("curl"), &args)
                        .unwrap_or_default()
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let peak_kib = tern_tests::proc_kib(webhook.process.pid(), "VmHWM");
    eprintln!(
        "webhook peak RSS with 64 bodies of 3 MB at once: {peak_kib} KiB; answers {statuses:?}"
    );
    assert!(peak_kib < 192 * 1024, "peak RSS {peak_kib} KiB");
    assert!(
        statuses.iter().all(|s| s == "400" || s == "503"),
        "each is refused with an answer (not a review, or busy): {statuses:?}"
    );
    let review = review("u-after", "CREATE", &pod(json!({"app": "a"}), json!({})));
    let (_, patch) = answer(&webhook, &ca, &review);
    assert!(patch.is_some(), "no review answered after the flood");
}
