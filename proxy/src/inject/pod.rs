//! Injecting one Pod (or a workload's Pod template): decide, then add tern once.
use serde_yaml::{Mapping, Value};

use super::{InjectError, Options, annotations, probes, sidecar};

/// What injection did to a Pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// tern was there already: nothing changed.
    AlreadyInjected,
    /// The Pod opted out (`sidecar.istio.io/inject` or `tern.io/inject` is `false`).
    OptedOut,
}

/// Injects tern into a Pod given its `metadata` and `spec` (a Pod's, or a template's).
/// `what` names the Pod in errors (`Deployment shop/cart`).
pub fn inject(
    metadata: &mut Value,
    spec: &mut Value,
    options: &Options,
    what: &str,
) -> Result<Outcome, InjectError> {
    let refuse = |why: &str| InjectError::Refused {
        what: what.to_owned(),
        why: why.to_owned(),
    };
    if !spec.is_mapping() {
        return Err(refuse("it has no Pod spec"));
    }
    let labels = metadata.get("labels").cloned().unwrap_or(Value::Null);
    let annotations_in = metadata.get("annotations").cloned().unwrap_or(Value::Null);
    // Injected means tern's container is there with injection's mark; either alone is a Pod
    // that would otherwise escape (a status annotation with no container is injected again,
    // as Istio's injector does; a container named tern that injection did not add is refused).
    let marked = annotations_in.get(annotations::STATUS).is_some();
    match (marked, has_container(spec, sidecar::CONTAINER)) {
        (true, true) => return Ok(Outcome::AlreadyInjected),
        (false, true) => {
            return Err(refuse(
                "it has a container named tern that injection did not add",
            ));
        }
        (true, false) | (false, false) => {}
    }
    let opted_out = [annotations::TERN_INJECT, annotations::ISTIO_INJECT]
        .iter()
        .any(|key| annotations::opt(&labels, &annotations_in, key) == Some(false));
    if opted_out {
        return Ok(Outcome::OptedOut);
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Err(InjectError::Skipped {
            what: what.to_owned(),
            why: "it uses the node's network namespace (hostNetwork: true), where capture \
                  would take the node's traffic"
                .to_owned(),
        });
    }
    if has_container(spec, "istio-proxy") {
        return Err(refuse(
            "it already has Istio's sidecar (istio-proxy); a Pod has one sidecar",
        ));
    }
    let existing_volumes: Vec<&str> = spec
        .get("volumes")
        .and_then(Value::as_sequence)
        .map(|v| v.iter().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default();
    if let Some(clash) = sidecar::VOLUMES
        .iter()
        .find(|v| existing_volumes.contains(v))
    {
        return Err(refuse(&format!(
            "it already has a volume named {clash}, which tern's container mounts"
        )));
    }
    let Some(first_app) = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .and_then(|c| c.first())
        .and_then(|c| c["name"].as_str())
        .map(str::to_owned)
    else {
        return Err(refuse("it has no containers"));
    };
    let mut env = annotations::environment(&annotations_in).map_err(|e| refuse(&e.to_string()))?;
    // Kubelet's probes go to tern, which forwards them (Istio's rewrite, on by default).
    let rewrite = match annotations::opt(&labels, &annotations_in, probes::REWRITE) {
        Some(false) => probes::Rewrite::default(),
        _ => probes::Rewrite::plan(spec).map_err(|e| refuse(&e))?,
    };
    env.extend(rewrite.env());

    let container = sidecar::container(options, &env);
    let list = sidecar::list(options);
    // Check every field written before writing any: a malformed Pod is refused whole.
    for key in [list, "volumes"] {
        if !matches!(spec.get(key), None | Some(Value::Null | Value::Sequence(_))) {
            return Err(refuse(&format!("its spec.{key} is not a list")));
        }
    }
    if !matches!(metadata, Value::Null | Value::Mapping(_))
        || !matches!(
            metadata.get("annotations"),
            None | Some(Value::Null | Value::Mapping(_))
        )
    {
        return Err(refuse("its metadata.annotations is not a map"));
    }
    // First, so that it starts before the application's containers (and, native, before
    // their init containers, whose traffic it captures too).
    rewrite.apply(spec);
    sequence_mut(spec, list).insert(0, container);
    sequence_mut(spec, "volumes").extend(sidecar::volumes());

    let annotations_out = mapping_mut(metadata, "annotations");
    annotations_out.insert(annotations::STATUS.into(), status(options).into());
    let default_container = (
        "kubectl.kubernetes.io/default-container",
        first_app.as_str(),
    );
    for (key, value) in std::iter::once(default_container).chain(DEFAULT_ANNOTATIONS) {
        if !annotations_out.contains_key(key) {
            annotations_out.insert(key.into(), value.into());
        }
    }
    Ok(Outcome::Injected)
}

/// Annotations injection adds when the Pod has none of its own: Prometheus scrapes tern's
/// merged metrics, as it scrapes Istio's agent.
pub const DEFAULT_ANNOTATIONS: [(&str, &str); 3] = [
    ("prometheus.io/scrape", "true"),
    ("prometheus.io/port", "15020"),
    ("prometheus.io/path", "/stats/prometheus"),
];

/// The `tern.io/status` annotation: what injection added.
pub fn status(options: &Options) -> String {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "containers": [sidecar::CONTAINER],
        "volumes": sidecar::VOLUMES,
        "native": options.native_sidecar,
    })
    .to_string()
}

fn has_container(spec: &Value, name: &str) -> bool {
    ["containers", "initContainers"].iter().any(|list| {
        spec.get(list)
            .and_then(Value::as_sequence)
            .is_some_and(|c| c.iter().any(|c| c["name"].as_str() == Some(name)))
    })
}

/// `value[key]` as a sequence, made (or replaced, when null) as needed; `value` is a mapping
/// whose `key` holds a sequence or null (checked by the caller).
fn sequence_mut<'a>(value: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    let map = value.as_mapping_mut().expect("checked to be a mapping");
    let slot = map
        .entry(key.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if !slot.is_sequence() {
        *slot = Value::Sequence(Vec::new());
    }
    slot.as_sequence_mut().expect("just made a sequence")
}

/// `value[key]` as a mapping, made as needed (a null metadata becomes a mapping); `key`
/// holds a mapping or null (checked by the caller).
fn mapping_mut<'a>(value: &'a mut Value, key: &str) -> &'a mut Mapping {
    if !value.is_mapping() {
        *value = Value::Mapping(Mapping::new());
    }
    let map = value.as_mapping_mut().expect("just made a mapping");
    let slot = map
        .entry(key.into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if !slot.is_mapping() {
        *slot = Value::Mapping(Mapping::new());
    }
    slot.as_mapping_mut().expect("just made a mapping")
}
