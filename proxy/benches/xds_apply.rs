//! What applying xDS updates costs, in-process: the handler decodes and translates what
//! changed and swaps in a snapshot, as it does on tern's control thread.
//!
//! - one endpoint change in a cluster of 10,000 endpoints (round robin, weighted);
//! - parsing plus two applies of one round-robin cluster of 2,000, 4,000 and 8,000 weighted
//!   endpoints (the measurement that found the quadratic schedule: 0.63, 2.06 and 7.58 s);
//! - one endpoint change at a time in a snapshot of 1,000 and of 10,000 clusters (10
//!   endpoints each): p50 and p99 of 1,000 applies.
//!
//! Prints JSON; with `TERN_BENCH_OUT=FILE` also writes it there.
use std::{collections::BTreeMap, time::Instant};

use tern::{
    config::Config,
    state::State,
    xds::{handler::XdsHandler, metrics::ConfigMetrics},
};
use tern_proto::{ClusterLoadAssignment, build, encode, type_url};
use tern_xds_client::{Handler, Update};

/// `n` endpoints, weights 1 to 3; `variant` moves the first one to another port.
fn load_assignment(name: &str, n: u32, variant: u32) -> ClusterLoadAssignment {
    let endpoints = (0..n)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            let port = if i == 0 { 9000 + variant } else { 9000 };
            build::endpoint(&ip, port, 1 + i % 3)
        })
        .collect();
    build::load_assignment(name, endpoints)
}

fn handler() -> XdsHandler {
    XdsHandler::new(
        State::new(Default::default()),
        Config::default(),
        ConfigMetrics::default(),
    )
}

fn apply(h: &mut XdsHandler, url: &'static str, items: Vec<(String, tern_proto::Any)>) {
    h.apply(
        url,
        Update {
            changed: items,
            removed: Vec::new(),
        },
    )
    .expect("accepted");
}

fn clusters(h: &mut XdsHandler, names: &[String]) {
    let items = names
        .iter()
        .map(|n| (n.clone(), encode(&build::eds_cluster(n), type_url::CLUSTER)))
        .collect();
    apply(h, type_url::CLUSTER, items);
}

fn endpoints(h: &mut XdsHandler, name: &str, n: u32, variant: u32) {
    let any = encode(
        &load_assignment(name, n, variant),
        type_url::CLUSTER_LOAD_ASSIGNMENT,
    );
    apply(
        h,
        type_url::CLUSTER_LOAD_ASSIGNMENT,
        vec![(name.to_owned(), any)],
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();

    // One endpoint change in a 10,000-endpoint cluster.
    let mut h = handler();
    let name = "outbound|9090||big.default.svc.cluster.local".to_string();
    clusters(&mut h, std::slice::from_ref(&name));
    endpoints(&mut h, &name, 10_000, 0);
    let mut times: Vec<f64> = (1..=21)
        .map(|v| {
            let started = Instant::now();
            endpoints(&mut h, &name, 10_000, v);
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    out.insert(
        "xds/one endpoint change, 10,000-endpoint cluster, median ms".into(),
        percentile(&times, 0.5),
    );

    // Parsing plus two applies of one round-robin cluster.
    for n in [2_000u32, 4_000, 8_000] {
        let bytes = encode(
            &load_assignment(&name, n, 0),
            type_url::CLUSTER_LOAD_ASSIGNMENT,
        );
        let started = Instant::now();
        let mut h = handler();
        clusters(&mut h, std::slice::from_ref(&name));
        apply(
            &mut h,
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            vec![(name.clone(), bytes.clone())],
        );
        endpoints(&mut h, &name, n, 1);
        out.insert(
            format!("xds/parse and two applies, {n} weighted round-robin endpoints, s"),
            started.elapsed().as_secs_f64(),
        );
    }

    // One endpoint change at a time in a snapshot of 1,000 and of 10,000 clusters: what a
    // push costs should follow what it changes, not the snapshot's size.
    for (size, label) in [(1_000usize, "1,000"), (10_000, "10,000")] {
        let mut h = handler();
        let names: Vec<String> = (0..size)
            .map(|i| format!("outbound|9090||svc-{i}.default.svc.cluster.local"))
            .collect();
        clusters(&mut h, &names);
        for n in &names {
            endpoints(&mut h, n, 10, 0);
        }
        let mut times: Vec<f64> = (0..1_000u32)
            .map(|k| {
                let started = Instant::now();
                endpoints(&mut h, &names[(k as usize * 7) % names.len()], 10, 1 + k);
                started.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        out.insert(
            format!("xds/one endpoint change, {label}-cluster snapshot, p50 ms"),
            percentile(&times, 0.5),
        );
        out.insert(
            format!("xds/one endpoint change, {label}-cluster snapshot, p99 ms"),
            percentile(&times, 0.99),
        );
    }

    let json = serde_json::to_string_pretty(&out).expect("JSON");
    println!("{json}");
    if let Ok(path) = std::env::var("TERN_BENCH_OUT") {
        std::fs::write(&path, &json).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
}
