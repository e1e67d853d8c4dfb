//! The container and volumes injection adds to a Pod: the least privilege tern's capture
//! needs, the Pod's identity from the downward API, and istiod's token and root certificate.
use serde_yaml::{Mapping, Value};

use super::Options;

/// Names injection owns in a Pod.
pub const CONTAINER: &str = "tern";
pub const VOLUMES: [&str; 5] = [
    "tern-bpffs",
    "tern-host-cgroup",
    "istio-token",
    "istiod-ca-cert",
    "istio-podinfo",
];
/// Where the node's cgroup v2 hierarchy is mounted in tern's container.
pub const HOST_CGROUP: &str = "/host/sys/fs/cgroup";
/// The uid tern runs as once capture is set up (Istio's proxy uid).
pub const PROXY_UID: &str = "1337";
/// Data-plane workers of an injected tern unless the Pod's `ProxyConfig` says otherwise
/// (Istio's default `concurrency`).
pub const DEFAULT_CONCURRENCY: &str = "2";
/// tern's health and metrics port (Istio's merged-metrics port).
pub const STATS_PORT: u16 = 15020;

/// Capabilities tern needs, measured in the Pod test (runc, kernel 6.x):
/// - `BPF`: load the programs and create the maps;
/// - `NET_ADMIN`: attach cgroup and `sk_lookup` programs, `SO_MARK` its own sockets;
/// - `PERFMON`: without it the kernel refuses to load `tern_getsockopt` (`EPERM`).
///
/// - `SETUID`, `SETGID`: to become uid 1337 once capture is set up, which clears every
///   capability: the long-lived proxy runs with none (`crate::privileges`).
///
/// Not `SYS_ADMIN` (bpffs comes mounted from the node) and not `SYS_RESOURCE` (kernels since
/// 5.11 charge maps to the cgroup, not to `RLIMIT_MEMLOCK`).
pub const CAPABILITIES: [&str; 5] = ["BPF", "NET_ADMIN", "PERFMON", "SETUID", "SETGID"];

/// Where the container goes in the Pod spec: a native sidecar is an init container.
pub fn list(options: &Options) -> &'static str {
    if options.native_sidecar {
        "initContainers"
    } else {
        "containers"
    }
}

/// The sidecar container, as YAML values in Kubernetes' field order.
pub fn container(options: &Options, extra_env: &[(String, String)]) -> Value {
    let field = |name: &str, path: &str| {
        yaml(&format!(
            "{{name: {name}, valueFrom: {{fieldRef: {{fieldPath: {path}}}}}}}"
        ))
    };
    let plain = |name: &str, value: &str| {
        let mut m = Mapping::new();
        m.insert("name".into(), name.into());
        m.insert("value".into(), value.into());
        Value::Mapping(m)
    };
    let mut env = vec![
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("POD_UID", "metadata.uid"),
        field("INSTANCE_IP", "status.podIP"),
        field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        plain("TERN_CGROUP_ROOT", HOST_CGROUP),
        // Once capture is set up, tern runs as Istio's proxy uid with no capability; capture
        // knows its sockets by that uid.
        plain("PROXY_UID", PROXY_UID),
        plain("TERN_RUN_AS_UID", PROXY_UID),
        plain("XDS_ADDRESS", &options.xds_address),
        plain("XDS_ROOT_CA", "/var/run/secrets/istio/root-cert.pem"),
        plain("TERN_XDS_TOKEN_FILE", "/var/run/secrets/tokens/istio-token"),
        plain("ISTIO_META_CLUSTER_ID", &options.cluster_id),
        plain("TRUST_DOMAIN", &options.trust_domain),
        // Istio's default: two workers, whatever the node's size (the container has no CPU
        // limit to size them by); `proxy.istio.io/config`'s `concurrency` replaces it.
        plain("TERN_CONCURRENCY", DEFAULT_CONCURRENCY),
    ];
    // An annotation's value replaces the default of the same name, and the last of the same
    // name wins; in one pass each, so an annotation of 20,000 entries costs no more than linear.
    let mut seen = std::collections::HashSet::with_capacity(extra_env.len());
    let mut extra: Vec<&(String, String)> = extra_env
        .iter()
        .rev()
        .filter(|(name, _)| seen.insert(name.as_str()))
        .collect();
    extra.reverse();
    env.retain(|e| {
        e.get("name")
            .and_then(Value::as_str)
            .is_none_or(|n| !seen.contains(n))
    });
    env.extend(extra.into_iter().map(|(name, value)| plain(name, value)));

    let mut c = Mapping::new();
    c.insert("name".into(), CONTAINER.into());
    c.insert("image".into(), options.image.as_str().into());
    c.insert("args".into(), yaml("[run, --capture, ebpf]"));
    if options.native_sidecar {
        // A native sidecar: an init container that keeps running, started before the
        // application's containers and stopped after them.
        c.insert("restartPolicy".into(), "Always".into());
    }
    c.insert("env".into(), Value::Sequence(env));
    c.insert(
        "ports".into(),
        yaml(&format!(
            "[{{name: tern-stats, containerPort: {STATS_PORT}, protocol: TCP}}]"
        )),
    );
    // Ready once the first configuration from istiod is applied; as a startup probe it also
    // holds the application's containers back until then.
    let probe = format!(
        "{{httpGet: {{path: /healthz/ready, port: {STATS_PORT}}}, periodSeconds: 1, failureThreshold: 600}}"
    );
    c.insert("startupProbe".into(), yaml(&probe));
    c.insert(
        "readinessProbe".into(),
        yaml(&format!(
            "{{httpGet: {{path: /healthz/ready, port: {STATS_PORT}}}, periodSeconds: 5}}"
        )),
    );
    c.insert(
        "resources".into(),
        yaml("{requests: {cpu: 50m, memory: 32Mi}, limits: {memory: 256Mi}}"),
    );
    c.insert(
        "securityContext".into(),
        yaml(&format!(
            "{{privileged: false, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, \
             runAsUser: 0, runAsNonRoot: false, capabilities: {{drop: [ALL], add: [{}]}}}}",
            CAPABILITIES.join(", ")
        )),
    );
    c.insert(
        "volumeMounts".into(),
        yaml(&format!(
            "[{{name: tern-bpffs, mountPath: /sys/fs/bpf, subPathExpr: $(POD_UID)}},
              {{name: tern-host-cgroup, mountPath: {HOST_CGROUP}, readOnly: true}},
              {{name: istio-token, mountPath: /var/run/secrets/tokens, readOnly: true}},
              {{name: istiod-ca-cert, mountPath: /var/run/secrets/istio, readOnly: true}},
              {{name: istio-podinfo, mountPath: /etc/istio/pod, readOnly: true}}]"
        )),
    );
    Value::Mapping(c)
}

/// The volumes the container mounts.
pub fn volumes() -> Vec<Value> {
    let Value::Sequence(v) = yaml(
        "[{name: tern-bpffs, hostPath: {path: /sys/fs/bpf/tern-pods, type: DirectoryOrCreate}},
          {name: tern-host-cgroup, hostPath: {path: /sys/fs/cgroup, type: Directory}},
          {name: istio-token, projected: {sources: [{serviceAccountToken: {audience: istio-ca, expirationSeconds: 43200, path: istio-token}}]}},
          {name: istiod-ca-cert, configMap: {name: istio-ca-root-cert}},
          {name: istio-podinfo, downwardAPI: {items: [
            {path: labels, fieldRef: {fieldPath: metadata.labels}},
            {path: annotations, fieldRef: {fieldPath: metadata.annotations}}]}}]",
    ) else {
        unreachable!("a sequence literal")
    };
    v
}

/// Parses a YAML literal of this module (tested to parse).
fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("injection template {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_templates_parse_and_name_what_they_mount() {
        let options = Options::default();
        let c = container(
            &options,
            &[("XDS_ADDRESS".into(), "https://x:15012".into())],
        );
        assert_eq!(c["restartPolicy"], "Always");
        let env = c["env"].as_sequence().unwrap();
        let xds: Vec<_> = env.iter().filter(|e| e["name"] == "XDS_ADDRESS").collect();
        assert_eq!(xds.len(), 1);
        assert_eq!(xds[0]["value"], "https://x:15012");
        let workers = |c: &Value| -> Vec<String> {
            c["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter(|e| e["name"] == "TERN_CONCURRENCY")
                .map(|e| e["value"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(workers(&c), [DEFAULT_CONCURRENCY]);
        let four = container(&options, &[("TERN_CONCURRENCY".into(), "4".into())]);
        assert_eq!(workers(&four), ["4"]);
        let mounts: Vec<&str> = c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        let volumes: Vec<Value> = volumes();
        let names: Vec<&str> = volumes
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(mounts, names);
        assert_eq!(names, VOLUMES);
        let plain = Options {
            native_sidecar: false,
            ..Options::default()
        };
        assert!(container(&plain, &[]).get("restartPolicy").is_none());
    }
}
