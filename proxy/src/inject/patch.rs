//! The JSONPatch (RFC 6902) that turns a Pod into its injected form, for the webhook: only
//! the fields injection writes (containers, volumes, annotations), as additions.
use serde_json::{Value, json};

/// The fields [`super::pod::inject`] may change, as JSON pointers.
const LISTS_PREPENDED: [&str; 2] = ["/spec/initContainers", "/spec/containers"];
const LIST_APPENDED: &str = "/spec/volumes";
const MAP_EXTENDED: &str = "/metadata/annotations";

/// Operations that make `before` into `after`, given that they differ only where injection
/// writes.
pub fn json_patch(before: &Value, after: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    let absent = |v: Option<&Value>| v.is_none_or(Value::is_null);
    for path in LISTS_PREPENDED {
        let (b, a) = (before.pointer(path), after.pointer(path));
        if b == a {
            continue;
        }
        let (Some(Value::Array(b_items)), Some(Value::Array(a_items))) = (b, a) else {
            ops.push(whole(absent(b), path, a));
            continue;
        };
        let added = a_items.len().saturating_sub(b_items.len());
        if a_items[added..] == b_items[..] {
            for (i, item) in a_items[..added].iter().enumerate() {
                ops.push(json!({"op": "add", "path": format!("{path}/{i}"), "value": item}));
            }
        } else {
            ops.push(whole(false, path, a));
        }
    }
    let (b, a) = (before.pointer(LIST_APPENDED), after.pointer(LIST_APPENDED));
    if b != a {
        match (b, a) {
            (Some(Value::Array(b_items)), Some(Value::Array(a_items)))
                if a_items.starts_with(b_items) =>
            {
                for item in &a_items[b_items.len()..] {
                    ops.push(
                        json!({"op": "add", "path": format!("{LIST_APPENDED}/-"), "value": item}),
                    );
                }
            }
            _ => ops.push(whole(absent(b), LIST_APPENDED, a)),
        }
    }
    let (b, a) = (before.pointer(MAP_EXTENDED), after.pointer(MAP_EXTENDED));
    if b != a {
        match (b, a) {
            (Some(Value::Object(b_map)), Some(Value::Object(a_map))) => {
                for (key, value) in a_map {
                    if b_map.get(key) != Some(value) {
                        let path = format!("{MAP_EXTENDED}/{}", escape(key));
                        ops.push(json!({"op": "add", "path": path, "value": value}));
                    }
                }
            }
            _ => {
                if before.pointer("/metadata").is_none_or(Value::is_null) {
                    ops.push(json!({"op": "add", "path": "/metadata", "value": {}}));
                }
                ops.push(whole(absent(b), MAP_EXTENDED, a));
            }
        }
    }
    ops
}

fn whole(absent: bool, path: &str, value: Option<&Value>) -> Value {
    let op = if absent { "add" } else { "replace" };
    json!({"op": op, "path": path, "value": value.cloned().unwrap_or(Value::Null)})
}

/// A key as one JSON pointer token (RFC 6901): `~` is `~0`, `/` is `~1`.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_escaped_as_json_pointer_tokens() {
        assert_eq!(escape("tern.io/status"), "tern.io~1status");
        assert_eq!(escape("a~b/c"), "a~0b~1c");
    }

    #[test]
    fn additions_are_added_and_nothing_else_is_touched() {
        let before = json!({
            "metadata": {"annotations": {"a": "1"}},
            "spec": {"containers": [{"name": "app"}], "volumes": [{"name": "v"}]}
        });
        let after = json!({
            "metadata": {"annotations": {"a": "1", "tern.io/status": "{}"}},
            "spec": {
                "initContainers": [{"name": "tern"}],
                "containers": [{"name": "app"}],
                "volumes": [{"name": "v"}, {"name": "w"}]
            }
        });
        assert_eq!(
            json_patch(&before, &after),
            vec![
                json!({"op": "add", "path": "/spec/initContainers", "value": [{"name": "tern"}]}),
                json!({"op": "add", "path": "/spec/volumes/-", "value": {"name": "w"}}),
                json!({"op": "add", "path": "/metadata/annotations/tern.io~1status", "value": "{}"}),
            ]
        );
        assert!(json_patch(&before, &before).is_empty());
    }
}
