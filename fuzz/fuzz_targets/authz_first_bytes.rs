//! The authorization path of a chain whose rules name Thrift methods (`deny echo`), on
//! arbitrary client bytes, decided as tern decides it: the first message must make detection
//! say Thrift (else the connection is refused and nothing is forwarded), then every message
//! must decode as a call in that format; each call the rules allow is forwarded. The
//! property: whatever is forwarded is, read again by a fresh decoder, one whole call or
//! one-way call of an allowed method — never a REPLY-typed message, a transform tern does not
//! decode, or a denied method.
#![no_main]

use std::sync::Arc;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tern::{
    config::{
        matcher::StringMatch,
        rbac::{Action, Attributes, Permission, Policy, Principal, Rbac, Rules},
    },
    thrift::{Decoder, DecoderLimits, MessageType, frame::sniff},
};

fn limits() -> DecoderLimits {
    DecoderLimits {
        max_frame: 1 << 20,
        max_depth: 16,
    }
}

fn deny_echo() -> Arc<Rbac> {
    Arc::new(Rbac {
        stat_prefix: "tcp.".into(),
        rules: Some(Rules {
            action: Action::Deny,
            policies: vec![Policy {
                name: "deny-echo".into(),
                permissions: vec![Permission::ThriftMethod {
                    service: None,
                    method: StringMatch::Exact("echo".into()),
                }],
                principals: vec![Principal::Any],
            }],
        }),
        shadow_rules: None,
    })
}

fn allowed(rbac: &Rbac, service: Option<&str>, method: &str) -> bool {
    let attrs = Attributes {
        source: "10.0.0.1:40000".parse().unwrap(),
        destination: "10.0.0.2:9090".parse().unwrap(),
        principal: None,
        server_name: None,
        thrift: Some((service, method)),
    };
    rbac.decide(&attrs).allowed
}

fuzz_target!(|data: &[u8]| {
    let rbac = deny_echo();
    // Without a method the rules cannot decide: only Thrift calls go on.
    let mut detecting = Decoder::detecting(limits());
    let Ok(Some((transport, protocol))) = sniff(&mut detecting, data) else {
        return;
    };
    let mut calls = Decoder::configured(limits(), transport, protocol, false);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(call)) = calls.decode_call(&mut buf) {
        let method = String::from_utf8_lossy(call.method()).into_owned();
        let service = call
            .service()
            .map(|s| String::from_utf8_lossy(s).into_owned());
        if !allowed(&rbac, service.as_deref(), &method) {
            continue;
        }
        // Forwarded: read it again, from nothing.
        let mut again = BytesMut::from(call.as_bytes());
        let fresh = Decoder::detecting(limits())
            .decode(&mut again)
            .expect("a forwarded message decodes")
            .expect("a forwarded message is whole");
        assert!(again.is_empty(), "one message, nothing after it");
        assert!(matches!(
            fresh.kind(),
            MessageType::Call | MessageType::Oneway
        ));
        assert_eq!(fresh.method(), call.method());
        assert_ne!(fresh.method(), b"echo", "a denied method was forwarded");
    }
});
