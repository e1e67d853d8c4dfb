//! xDS translation: resources as a control plane sends them (encoded protobuf, any of the
//! four types tern reads), handed to the xDS handler as updates (decoded, translated one by
//! one, refused or applied, published as a snapshot). Nothing may panic, whatever the bytes.
//! Input: records of (type selector byte, name length byte, name, 2-byte length, bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::{
    config::Config,
    state::State,
    xds::{handler::XdsHandler, metrics::ConfigMetrics},
};
use tern_proto::{Any, type_url};
use tern_xds_client::{Handler, Update};

const TYPES: [&str; 4] = [
    type_url::LISTENER,
    type_url::CLUSTER,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
    type_url::THRIFT_ROUTE_CONFIGURATION,
];

fuzz_target!(|data: &[u8]| {
    let mut handler = XdsHandler::new(
        State::new(Default::default()),
        Config::default(),
        ConfigMetrics::default(),
    );
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
        // A high bit in the selector removes the resource instead.
        let update = if selector & 0x80 != 0 {
            Update {
                changed: Vec::new(),
                removed: vec![name],
            }
        } else {
            Update {
                changed: vec![(
                    name,
                    Any {
                        type_url: url.to_owned(),
                        value,
                    },
                )],
                removed: Vec::new(),
            }
        };
        let _ = handler.apply(url, update);
        handler.tick();
    }
});
