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
}
