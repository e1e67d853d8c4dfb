//! Kubelet's probes of the application, rewritten to tern's stats port as Istio's injector
//! rewrites them (`pkg/kube/inject/app_probe.go`): each `httpGet`, `tcpSocket` or `grpc` readiness,
//! liveness and startup probe becomes an `httpGet` of `/app-health/<container>/<kind>` on
//! 15020, and tern gets the original in `ISTIO_KUBE_APP_PROBERS` (see `crate::probe`). So
//! probes pass under STRICT mTLS and authorization without the node's address skipping
//! either. `sidecar.istio.io/rewriteAppHTTPProbers: "false"` keeps them as they are; exec and
//! HTTPS probes are kept as they are (exec runs in the application's container; tern does not
//! forward HTTPS).
use serde_json::json;
use serde_yaml::{Mapping, Value};

use super::sidecar::STATS_PORT;

/// The annotation that turns the rewrite off (Istio's).
pub const REWRITE: &str = "sidecar.istio.io/rewriteAppHTTPProbers";
/// The environment variable tern reads the original probes from (Istio's).
pub const ENV: &str = "ISTIO_KUBE_APP_PROBERS";

const KINDS: [(&str, &str); 3] = [
    ("readinessProbe", "readyz"),
    ("livenessProbe", "livez"),
    ("startupProbe", "startupz"),
];

/// The rewrite of a Pod's probes, planned before anything is written.
#[derive(Debug, Default)]
pub struct Rewrite {
    /// (container index, probe field, the probe as rewritten).
    changes: Vec<(usize, &'static str, Value)>,
    probers: serde_json::Map<String, serde_json::Value>,
}

impl Rewrite {
    /// Plans the rewrite of every container's probes; an error names a probe that cannot be
    /// rewritten (a port name no container port has).
    pub fn plan(spec: &Value) -> Result<Self, String> {
        let mut out = Self::default();
        let containers = spec
            .get("containers")
            .and_then(Value::as_sequence)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (i, c) in containers.iter().enumerate() {
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
            for (field, kind) in KINDS {
                let Some(probe) = c.get(field) else {
                    continue;
                };
                let port =
                    |p: &Value| {
                        resolve_port(c, p).ok_or_else(|| {
                    format!("container {name}'s {field} names port {p:?}, which it does not have")
                })
                    };
                let original = if let Some(h) = probe.get("httpGet") {
                    let scheme = h.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
                    if !scheme.eq_ignore_ascii_case("HTTP") {
                        continue;
                    }
                    let headers: Vec<serde_json::Value> = h
                        .get("httpHeaders")
                        .and_then(Value::as_sequence)
                        .into_iter()
                        .flatten()
                        .map(|x| {
                            json!({
                                "name": x.get("name").and_then(Value::as_str).unwrap_or_default(),
                                "value": x.get("value").and_then(Value::as_str).unwrap_or_default(),
                            })
                        })
                        .collect();
                    json!({"httpGet": {
                        "path": h.get("path").and_then(Value::as_str).unwrap_or("/"),
                        "port": port(h.get("port").unwrap_or(&Value::Null))?,
                        "scheme": "HTTP",
                        "httpHeaders": headers,
                    }})
                } else if let Some(t) = probe.get("tcpSocket") {
                    json!({"tcpSocket": {"port": port(t.get("port").unwrap_or(&Value::Null))?}})
                } else if let Some(g) = probe.get("grpc") {
                    // Kubernetes' gRPC probe takes a number only.
                    let Some(number) = g.get("port").and_then(Value::as_u64) else {
                        return Err(format!(
                            "container {name}'s {field} has a gRPC probe without a port number"
                        ));
                    };
                    let service = g.get("service").and_then(Value::as_str).unwrap_or_default();
                    json!({"grpc": {"port": number, "service": service}})
                } else {
                    continue;
                };
                let mut original = original;
                if let Some(t) = probe.get("timeoutSeconds").and_then(Value::as_u64) {
                    original["timeoutSeconds"] = t.into();
                }
                let path = format!("{}{name}/{kind}", crate::probe::PREFIX);
                out.probers.insert(path.clone(), original);
                let mut rewritten = probe.as_mapping().cloned().unwrap_or_default();
                rewritten.remove("httpGet");
                rewritten.remove("tcpSocket");
                rewritten.remove("grpc");
                let mut get = Mapping::new();
                get.insert("path".into(), path.into());
                get.insert("port".into(), u64::from(STATS_PORT).into());
                get.insert("scheme".into(), "HTTP".into());
                rewritten.insert("httpGet".into(), Value::Mapping(get));
                out.changes.push((i, field, Value::Mapping(rewritten)));
            }
        }
        Ok(out)
    }

    /// The environment tern reads the original probes from, when there are any.
    pub fn env(&self) -> Option<(String, String)> {
        (!self.probers.is_empty()).then(|| {
            (
                ENV.to_owned(),
                serde_json::Value::Object(self.probers.clone()).to_string(),
            )
        })
    }

    /// Writes the rewritten probes into `spec` (the one planned from).
    pub fn apply(self, spec: &mut Value) {
        let Some(containers) = spec.get_mut("containers").and_then(Value::as_sequence_mut) else {
            return;
        };
        for (i, field, probe) in self.changes {
            if let Some(Value::Mapping(c)) = containers.get_mut(i) {
                c.insert(field.into(), probe);
            }
        }
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
fn resolve_port(container: &Value, port: &Value) -> Option<u64> {
    match port {
        Value::Number(n) => n.as_u64().filter(|p| (1..=65535).contains(p)),
        Value::String(s) => match s.parse::<u64>() {
            Ok(n) => Some(n).filter(|p| (1..=65535).contains(p)),
            Err(_) => container
                .get("ports")
                .and_then(Value::as_sequence)?
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(s))?
                .get("containerPort")?
                .as_u64(),
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_tcp_and_grpc_probes_go_to_terns_port_and_the_rest_stay() {
        let mut spec: Value = serde_yaml::from_str(
            "containers:
  - name: app
    ports: [ { name: http, containerPort: 8080 } ]
    readinessProbe: { httpGet: { path: /ready, port: http }, periodSeconds: 5, timeoutSeconds: 2 }
    livenessProbe: { tcpSocket: { port: 8080 } }
    startupProbe: { grpc: { port: 9090 } }
  - name: tls
    readinessProbe: { httpGet: { path: /, port: 8443, scheme: HTTPS } }
",
        )
        .unwrap();
        let rewrite = Rewrite::plan(&spec).unwrap();
        let (name, probers) = rewrite.env().unwrap();
        assert_eq!(name, ENV);
        let probers: serde_json::Value = serde_json::from_str(&probers).unwrap();
        assert_eq!(
            probers["/app-health/app/readyz"],
            json!({"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP", "httpHeaders": []}, "timeoutSeconds": 2})
        );
        assert_eq!(
            probers["/app-health/app/livez"],
            json!({"tcpSocket": {"port": 8080}})
        );
        assert_eq!(
            probers["/app-health/app/startupz"],
            json!({"grpc": {"port": 9090, "service": ""}})
        );
        // tern reads what injection writes.
        crate::probe::AppProbers::parse(&probers.to_string()).unwrap();
        rewrite.apply(&mut spec);
        let app = &spec["containers"][0];
        assert_eq!(
            app["readinessProbe"]["httpGet"]["path"].as_str(),
            Some("/app-health/app/readyz")
        );
        assert_eq!(
            app["readinessProbe"]["httpGet"]["port"].as_u64(),
            Some(15020)
        );
        assert_eq!(app["readinessProbe"]["periodSeconds"].as_u64(), Some(5));
        assert!(app["livenessProbe"].get("tcpSocket").is_none());
        assert!(app["startupProbe"].get("grpc").is_none());
        assert_eq!(
            app["startupProbe"]["httpGet"]["path"].as_str(),
            Some("/app-health/app/startupz")
        );
        assert_eq!(
            spec["containers"][1]["readinessProbe"]["httpGet"]["scheme"].as_str(),
            Some("HTTPS"),
            "HTTPS kept"
        );
        let bad: Value = serde_yaml::from_str(
            "containers: [ { name: app, readinessProbe: { tcpSocket: { port: nope } } } ]",
        )
        .unwrap();
        assert!(Rewrite::plan(&bad).unwrap_err().contains("nope"));
    }
}
