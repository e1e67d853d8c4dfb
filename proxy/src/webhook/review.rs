//! One `AdmissionReview` (`admission.k8s.io/v1`) in, its answer out: a Pod selected for
//! injection gets a JSONPatch; anything else is allowed unchanged. A selected Pod tern cannot
//! inject is denied with the reason (as Istio's injector does): admitting it without tern would
//! let an annotation, a volume name or a container name opt it out of the mesh's protection.
//! Only a host-network Pod, which injection does not apply to, is admitted as it is, with a
//! warning.
use base64::Engine;
use serde_json::{Value, json};

use crate::inject::{self, Options, Outcome, patch};

/// Why a request is not an `AdmissionReview` the webhook can answer (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not an admission.k8s.io/v1 AdmissionReview (apiVersion {0:?})")]
    NotAdmissionReview(String),
    #[error("the AdmissionReview has no request.uid")]
    NoUid,
}

/// What happened to one review (for metrics and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Injected,
    /// Already injected, opted out, or not a Pod creation.
    Unchanged,
    /// Admitted without tern, with a warning (host-network Pods).
    NotInjected,
    /// Denied: selected, and tern cannot inject it.
    Denied,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Unchanged => "unchanged",
            Self::NotInjected => "not_injected",
            Self::Denied => "denied",
        }
    }
}

/// Answers one review.
///
/// Memory: the review is parsed once, the Pod taken out of it (no copy) and read into the
/// injector's form straight from the parsed JSON; the rest of the review is dropped before
/// injecting, the injected Pod before the patch is made.
pub fn review(body: &[u8], options: &Options) -> Result<(Value, Verdict), ReviewError> {
    let mut review: Value = serde_json::from_slice(body)?;
    let api_version = review["apiVersion"].as_str().unwrap_or_default();
    if api_version != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return Err(ReviewError::NotAdmissionReview(api_version.to_owned()));
    }
    let request = &mut review["request"];
    let uid = request["uid"]
        .as_str()
        .ok_or(ReviewError::NoUid)?
        .to_owned();
    let uid = uid.as_str();
    let answer = |response: Value| {
        let mut response = response;
        response["uid"] = json!(uid);
        if response.get("allowed").is_none() {
            response["allowed"] = json!(true);
        }
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
    };

    let is_pod_creation = request["kind"]["kind"] == "Pod"
        && request["operation"] == "CREATE"
        && request["object"].is_object();
    if !is_pod_creation {
        return Ok((answer(json!({})), Verdict::Unchanged));
    }
    let before = request["object"].take();
    let namespace = request["namespace"]
        .as_str()
        .or_else(|| before["metadata"]["namespace"].as_str())
        .unwrap_or("-");
    let name = before["metadata"]["name"]
        .as_str()
        .or_else(|| before["metadata"]["generateName"].as_str())
        .unwrap_or("-");
    let what = format!("Pod {namespace}/{name}");
    drop(review);

    use serde::Deserialize;
    let injected = serde_yaml::Value::deserialize(&before)
        .map_err(|e| (e.to_string(), false))
        .and_then(|mut pod| {
            let outcome = inject::inject_pod(&mut pod, options, &what).map_err(|e| {
                (
                    e.to_string(),
                    matches!(e, inject::InjectError::Skipped { .. }),
                )
            })?;
            Ok((pod, outcome))
        });
    match injected {
        Ok((pod, Outcome::Injected)) => {
            let after = serde_json::to_value(&pod).map_err(ReviewError::Json)?;
            drop(pod);
            let ops = patch::json_patch(&before, &after);
            drop((before, after));
            let patch =
                base64::engine::general_purpose::STANDARD.encode(Value::Array(ops).to_string());
            tracing::info!(pod = %what, "injected");
            Ok((
                answer(json!({"patchType": "JSONPatch", "patch": patch})),
                Verdict::Injected,
            ))
        }
        Ok((_, outcome)) => {
            tracing::debug!(pod = %what, ?outcome, "left unchanged");
            Ok((answer(json!({})), Verdict::Unchanged))
        }
        Err((why, true)) => {
            tracing::warn!(pod = %what, %why, "admitted without tern");
            let warning = format!("tern was not injected: {why}");
            Ok((answer(json!({"warnings": [warning]})), Verdict::NotInjected))
        }
        Err((why, false)) => {
            tracing::warn!(pod = %what, %why, "denied: selected for tern, which cannot inject it");
            let message = format!("tern cannot inject this Pod, which is selected for it: {why}");
            Ok((
                answer(json!({
                    "allowed": false,
                    "status": {"code": 400, "reason": "BadRequest", "message": message},
                })),
                Verdict::Denied,
            ))
        }
    }
}
