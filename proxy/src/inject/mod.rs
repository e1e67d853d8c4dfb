//! Injection: add tern to Kubernetes workloads, as `istioctl kube-inject` and Istio's
//! admission webhook add Envoy.
//!
//! [`manifests`] rewrites YAML (Pods, the Pod templates of Deployments, StatefulSets,
//! DaemonSets, ReplicaSets, Jobs and CronJobs, and Lists of them; other kinds pass through);
//! the webhook patches one Pod with the same [`pod::inject`]. tern runs as a native sidecar
//! (an init container with `restartPolicy: Always`) or, for clusters before 1.29, as the
//! first container. Injecting twice changes nothing; what cannot be injected is refused whole.
use serde::Deserialize;
use serde_yaml::Value;

pub mod annotations;
pub mod patch;
pub mod pod;
pub mod probes;
pub mod sidecar;

pub use pod::Outcome;

/// What every injected sidecar is given.
#[derive(Clone, Debug)]
pub struct Options {
    pub image: String,
    /// A native sidecar (Kubernetes ≥ 1.29), or a plain first container.
    pub native_sidecar: bool,
    /// istiod's xDS (and CA) address.
    pub xds_address: String,
    pub cluster_id: String,
    pub trust_domain: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            image: format!("ghcr.io/tern-proxy/tern:{}", env!("CARGO_PKG_VERSION")),
            native_sidecar: true,
            xds_address: "https://istiod.istio-system.svc:15012".into(),
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("cannot inject {what}: {why}")]
    Refused { what: String, why: String },
    /// A Pod injection does not apply to (it uses the node's network: Istio skips those too).
    #[error("not injecting {what}: {why}")]
    Skipped { what: String, why: String },
    #[error("annotation {annotation}: {why}")]
    Annotation { annotation: String, why: String },
    /// `index` counts from 1.
    #[error("document {index}: not YAML")]
    Yaml {
        index: usize,
        #[source]
        source: serde_yaml::Error,
    },
}

/// One workload of a manifest and what injection did to it.
#[derive(Debug)]
pub struct Injected {
    /// `Kind namespace/name`.
    pub what: String,
    pub outcome: Outcome,
}

/// Injects every workload of a (multi-document) YAML manifest; returns the YAML and what was
/// done to each workload.
pub fn manifests(text: &str, options: &Options) -> Result<(String, Vec<Injected>), InjectError> {
    let mut out = String::new();
    let mut report = Vec::new();
    for (index, document) in (1..).zip(serde_yaml::Deserializer::from_str(text)) {
        let mut value =
            Value::deserialize(document).map_err(|source| InjectError::Yaml { index, source })?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, options, &mut report)?;
        let yaml =
            serde_yaml::to_string(&value).map_err(|source| InjectError::Yaml { index, source })?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&yaml);
    }
    Ok((out, report))
}

/// Injects one Kubernetes object in place (a List's items each).
pub fn inject_object(
    object: &mut Value,
    options: &Options,
    report: &mut Vec<Injected>,
) -> Result<(), InjectError> {
    let kind = object["kind"].as_str().unwrap_or("").to_owned();
    if kind == "List" {
        if let Some(items) = object.get_mut("items").and_then(Value::as_sequence_mut) {
            for item in items {
                inject_object(item, options, report)?;
            }
        }
        return Ok(());
    }
    let what = format!(
        "{kind} {}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or("-"),
        object["metadata"]["name"].as_str().unwrap_or("-")
    );
    let template_path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(()),
    };
    let mut template = &mut *object;
    for key in template_path {
        template = template.get_mut(*key).ok_or_else(|| InjectError::Refused {
            what: what.clone(),
            why: format!("it has no {}", template_path.join(".")),
        })?;
    }
    let outcome = inject_pod(template, options, &what)?;
    report.push(Injected { what, outcome });
    Ok(())
}

/// Injects a Pod, or a workload's Pod template: a map with `metadata` and `spec`.
pub fn inject_pod(pod: &mut Value, options: &Options, what: &str) -> Result<Outcome, InjectError> {
    let Some(map) = pod.as_mapping_mut() else {
        return Err(InjectError::Refused {
            what: what.to_owned(),
            why: "it is not a map".into(),
        });
    };
    let mut metadata = map.get("metadata").cloned().unwrap_or(Value::Null);
    let outcome = match map.get_mut("spec") {
        Some(spec) => pod::inject(&mut metadata, spec, options, what)?,
        None => {
            return Err(InjectError::Refused {
                what: what.to_owned(),
                why: "it has no Pod spec".into(),
            });
        }
    };
    if outcome == Outcome::Injected {
        match map.get_mut("metadata") {
            Some(slot) => *slot = metadata,
            None => {
                map.insert("metadata".into(), metadata);
            }
        }
    }
    Ok(outcome)
}

/// An injection template for istiod (`sidecarInjectorWebhook.templates.tern` in its Helm
/// values), so a mesh that runs istiod's injector adds tern to the Pods annotated
/// `inject.istio.io/templates: tern`, in place of Envoy and istio-init. istiod merges the
/// template's Pod into the Pod (strategic merge: tern's init container goes after the Pod's
/// own), so Istio's traffic annotations are not read there: set tern's environment in the
/// template instead.
pub fn istio_template(options: &Options) -> String {
    let mut pod = serde_yaml::Mapping::new();
    let mut metadata = serde_yaml::Mapping::new();
    let mut annotations = serde_yaml::Mapping::new();
    annotations.insert(annotations::STATUS.into(), pod::status(options).into());
    for (key, value) in pod::DEFAULT_ANNOTATIONS {
        annotations.insert(key.into(), value.into());
    }
    metadata.insert("annotations".into(), Value::Mapping(annotations));
    let mut spec = serde_yaml::Mapping::new();
    spec.insert(
        sidecar::list(options).into(),
        Value::Sequence(vec![sidecar::container(options, &[])]),
    );
    spec.insert("volumes".into(), Value::Sequence(sidecar::volumes()));
    pod.insert("metadata".into(), Value::Mapping(metadata));
    pod.insert("spec".into(), Value::Mapping(spec));
    let template = serde_yaml::to_string(&pod).unwrap_or_default();
    let mut out = String::from(
        "# istiod's injection template for tern: Pods annotated `inject.istio.io/templates: tern`\n\
         # get tern in place of Envoy and istio-init. Install with istiod's Helm values, e.g.\n\
         #   helm upgrade istiod istio/istiod -n istio-system --reuse-values -f tern-template.yaml\n\
         # Written by `tern inject --istio-template`.\n\
         sidecarInjectorWebhook:\n  templates:\n    tern: |\n",
    );
    for line in template.lines() {
        out.push_str("      ");
        out.push_str(line);
        out.push('\n');
    }
    out
}
