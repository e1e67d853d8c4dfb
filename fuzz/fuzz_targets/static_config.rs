//! The static configuration file: parse, validate, and build the snapshot the data path uses
//! (listener selection, pickers) from whatever text is accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::{config::file::parse, state::State};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = parse(text, "fuzz") {
        let state = State::new(Default::default());
        state.apply(config);
        let snapshot = state.load();
        let _ = snapshot.select(
            "10.96.0.10:9090".parse().unwrap(),
            "10.0.0.1:1".parse().unwrap(),
            &Default::default(),
        );
        for cluster in snapshot.clusters.values() {
            let _ =
                cluster
                    .picker
                    .pick(&cluster.endpoints, Some(7), &[], std::time::Instant::now());
        }
    }
});
