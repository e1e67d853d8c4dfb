//! The node tern presents to the control plane, from flags or the environment Istio's
//! injector sets (`POD_NAME`, `POD_NAMESPACE`, `INSTANCE_IP`, `ISTIO_META_*`, …).
use std::collections::BTreeMap;

use tern_proto::{
    Node,
    wkt::{Kind, Struct, Value},
};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn text(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// Where Istio's injector mounts the Pod's labels (downward API).
const POD_LABELS_FILE: &str = "/etc/istio/pod/labels";

fn structure(fields: impl IntoIterator<Item = (String, Value)>) -> Value {
    Value {
        kind: Some(Kind::StructValue(Struct {
            fields: fields.into_iter().collect(),
        })),
    }
}

/// Parses the downward API's `key="value"` lines.
fn parse_labels(file: &str) -> Vec<(String, Value)> {
    file.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), text(v.trim().trim_matches('"'))))
        .collect()
}

/// istiod's sidecar node id: `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
pub fn istio_node_id(ip: &str, pod: &str, namespace: &str) -> String {
    format!("sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local")
}

/// The node: `id` when given, else built from the Pod environment; metadata as istiod reads it.
pub fn node(id: Option<&str>, interception: &str) -> Node {
    let namespace = env("POD_NAMESPACE").unwrap_or_else(|| "default".into());
    let pod = env("POD_NAME").unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "tern".into())
    });
    let ip = env("INSTANCE_IP").unwrap_or_else(|| "127.0.0.1".into());
    let mut metadata: BTreeMap<String, Value> = std::env::vars()
        .filter_map(|(k, v)| {
            k.strip_prefix("ISTIO_META_")
                .map(|k| (k.to_owned(), text(v)))
        })
        .collect();
    // Structured values: ISTIO_METAJSON_<NAME> holds a JSON object of strings (e.g. LABELS).
    for (k, v) in std::env::vars() {
        if let Some(name) = k.strip_prefix("ISTIO_METAJSON_")
            && let Ok(serde_json::Value::Object(map)) =
                serde_json::from_str::<serde_json::Value>(&v)
        {
            let fields = map.into_iter().map(|(k, v)| {
                (
                    k,
                    text(v.as_str().map_or_else(|| v.to_string(), str::to_owned)),
                )
            });
            metadata.insert(name.to_owned(), structure(fields));
        }
    }
    // The Pod's labels from the downward API, as istio-agent reads them.
    if !metadata.contains_key("LABELS")
        && let Ok(labels) = std::fs::read_to_string(POD_LABELS_FILE)
    {
        metadata.insert("LABELS".into(), structure(parse_labels(&labels)));
    }
    metadata.insert("NAMESPACE".into(), text(namespace.clone()));
    metadata.insert("INTERCEPTION_MODE".into(), text(interception));
    metadata.insert("INSTANCE_IPS".into(), text(ip.clone()));
    metadata
        .entry("CLUSTER_ID".into())
        .or_insert_with(|| text("Kubernetes"));
    metadata
        .entry("ISTIO_VERSION".into())
        .or_insert_with(|| text(format!("tern-{}", env!("CARGO_PKG_VERSION"))));
    if let Some(sa) = env("SERVICE_ACCOUNT") {
        metadata.insert("SERVICE_ACCOUNT".into(), text(sa));
    }
    let cluster = env("ISTIO_META_WORKLOAD_NAME").map_or_else(
        || format!("{pod}.{namespace}"),
        |w| format!("{w}.{namespace}"),
    );
    Node {
        id: id.map_or_else(|| istio_node_id(&ip, &pod, &namespace), str::to_owned),
        cluster,
        metadata: Some(Struct {
            fields: metadata.into_iter().collect(),
        }),
        user_agent_name: "tern".into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_have_istiods_shape() {
        assert_eq!(
            istio_node_id("10.1.2.3", "calc-7f9c", "shop"),
            "sidecar~10.1.2.3~calc-7f9c.shop~shop.svc.cluster.local"
        );
        let n = node(Some("given"), "REDIRECT");
        assert_eq!(n.id, "given");
        let md = n.metadata.unwrap();
        assert_eq!(
            md.fields["INTERCEPTION_MODE"].kind,
            Some(Kind::StringValue("REDIRECT".into()))
        );
    }

    #[test]
    fn downward_api_labels_parse() {
        let labels = parse_labels("app=\"calc\"\nversion=\"v2\"\n");
        assert_eq!(labels[0].0, "app");
        assert_eq!(labels[1].1.kind, Some(Kind::StringValue("v2".into())));
    }
}
