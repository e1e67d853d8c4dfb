//! A workload as Istio's metrics name it.
use tern_proto::{
    Node,
    wkt::{Kind, Struct},
};

/// What Istio's labels say of a workload; `unknown` where nothing says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

pub const UNKNOWN: &str = "unknown";

impl Default for Workload {
    fn default() -> Self {
        Self {
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }
}

fn text<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match s.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(v) if !v.is_empty() => Some(v),
        _ => None,
    }
}

impl Workload {
    /// The local workload, from the metadata tern presents to the control plane (Istio's
    /// `WORKLOAD_NAME`, `NAMESPACE`, `CLUSTER_ID`, and the Pod's labels).
    pub fn from_node(node: &Node) -> Self {
        let mut w = Self::default();
        let Some(md) = &node.metadata else {
            return w;
        };
        let set = |field: &mut String, v: Option<&str>| {
            if let Some(v) = v {
                *field = v.to_owned();
            }
        };
        set(&mut w.name, text(md, "WORKLOAD_NAME"));
        set(&mut w.namespace, text(md, "NAMESPACE"));
        set(&mut w.cluster, text(md, "CLUSTER_ID"));
        if let Some(Kind::StructValue(labels)) =
            md.fields.get("LABELS").and_then(|v| v.kind.as_ref())
        {
            let app = text(labels, "app").or(text(labels, "app.kubernetes.io/name"));
            let version = text(labels, "version").or(text(labels, "app.kubernetes.io/version"));
            set(&mut w.app, app);
            set(&mut w.version, version);
            set(
                &mut w.canonical_service,
                text(labels, "service.istio.io/canonical-name").or(app),
            );
            set(
                &mut w.canonical_revision,
                text(labels, "service.istio.io/canonical-revision").or(version),
            );
        }
        if w.name == UNKNOWN
            && let Some(pod) = node.id.split('~').nth(2)
        {
            // The Pod's name (`<pod>.<namespace>` in the node id).
            w.name = pod.split('.').next().unwrap_or(pod).to_owned();
        }
        if w.canonical_service == UNKNOWN {
            w.canonical_service = w.name.clone();
        }
        w
    }

    /// A remote workload from istiod's endpoint metadata `istio.workload`:
    /// `name;namespace;canonical name;revision;cluster`.
    pub fn from_istio_workload(s: &str) -> Self {
        let mut parts = s.split(';').map(|p| {
            if p.is_empty() {
                UNKNOWN.to_owned()
            } else {
                p.to_owned()
            }
        });
        let mut next = || parts.next().unwrap_or_else(|| UNKNOWN.to_owned());
        let (name, namespace, canonical_service, canonical_revision, cluster) =
            (next(), next(), next(), next(), next());
        Self {
            app: canonical_service.clone(),
            version: canonical_revision.clone(),
            name,
            namespace,
            canonical_service,
            canonical_revision,
            cluster,
        }
    }

    /// A peer known only by its SPIFFE identity: its namespace.
    pub fn from_principal(principal: &str) -> Self {
        let mut w = Self::default();
        if let Ok(id) = crate::tls::SpiffeId::parse(principal) {
            w.namespace = id.namespace;
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istiods_workload_metadata() {
        let w = Workload::from_istio_workload("reviews-v3;default;reviews;v3;Kubernetes");
        assert_eq!(w.name, "reviews-v3");
        assert_eq!(w.namespace, "default");
        assert_eq!(w.canonical_service, "reviews");
        assert_eq!(w.version, "v3");
        assert_eq!(w.cluster, "Kubernetes");
        let w = Workload::from_istio_workload("odd");
        assert_eq!(w.namespace, UNKNOWN);
        let p = Workload::from_principal("spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(p.namespace, "shop");
    }
}
