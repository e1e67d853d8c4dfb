//! xDS translation: resources as a control plane sends them (encoded protobuf, any of the
//! four types tern reads), decoded and translated into tern's configuration, and applied.
//! Input: records of (type selector byte, name length byte, name, 2-byte length, bytes).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use tern::{
    metrics::Metrics,
    state::State,
    xds::translate::{Resources, to_config},
};
use tern_proto::{Any, type_url};

const TYPES: [&str; 4] = [
    type_url::LISTENER,
    type_url::CLUSTER,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
    type_url::THRIFT_ROUTE_CONFIGURATION,
];

fuzz_target!(|data: &[u8]| {
    let mut raw: BTreeMap<String, BTreeMap<String, Any>> = BTreeMap::new();
    let mut rest = data;
    while let [selector, name_len, tail @ ..] = rest {
        let name_len = usize::from(*name_len);
        if tail.len() < name_len + 2 {
            break;
        }
        let name = String::from_utf8_lossy(&tail[..name_len]).into_owned();
        let len = usize::from(u16::from_be_bytes([tail[name_len], tail[name_len + 1]]));
        let body = &tail[name_len + 2..];
        let value = body[..len.min(body.len())].to_vec();
        rest = &body[len.min(body.len())..];
        let url = TYPES[usize::from(*selector) % TYPES.len()];
        raw.entry(url.to_owned()).or_default().insert(
            name,
            Any {
                type_url: url.to_owned(),
                value,
            },
        );
    }
    let Ok(resources) = Resources::decode(&raw) else {
        return;
    };
    if let Ok(config) = to_config(&resources, "fuzz".into()) {
        State::new(Metrics::new(None)).apply(config);
    }
});
