//! What `tern discovery` costs at fleet size: 1,000 services with 10 endpoints each, served to
//! 100 delta clients subscribed like sidecars (every listener and cluster by wildcard, every
//! cluster's endpoints by name). A registry change is one endpoint's weight changed in the
//! services file, written in place (checked every 10 ms, taken once it held still for one
//! check); it is measured from the write to the moment the last
//! of the 100 clients ACKs the changed endpoints, 100 times. Reported: p50 and p99 of that
//! time, the server's CPU per change, its resident memory.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use tern_bench::report::DiscoveryBench;
use tern_proto::{
    DeltaDiscoveryRequest, Node,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, type_url,
};
use tern_tests::{ConfigFile, Netns, Tern, eventually, proc_kib};
use tokio::sync::mpsc;

use crate::cpu_seconds;

const SERVICES: usize = 1_000;
const ENDPOINTS: usize = 10;
const CLIENTS: usize = 100;
const CHANGES: usize = 100;
const ADDRESS: &str = "127.0.0.1:15010";

/// The services file, with service `changed`'s first endpoint at weight `weight`.
fn services(changed: usize, weight: u32) -> String {
    let mut s = String::with_capacity(SERVICES * ENDPOINTS * 40);
    s.push_str("services:\n");
    for i in 0..SERVICES {
        s.push_str(&format!(
            "  - name: svc-{i}\n    port: 9090\n    endpoints:\n"
        ));
        for e in 0..ENDPOINTS {
            let w = if i == changed && e == 0 { weight } else { 1 };
            s.push_str(&format!(
                "      - {{ address: \"10.{}.{}.{}:9090\", weight: {w} }}\n",
                i / 250,
                i % 250,
                e + 1
            ));
        }
    }
    s
}

fn cluster(i: usize) -> String {
    format!("outbound|9090||svc-{i}")
}

/// When each client last ACKed each cluster's endpoints (by the version it was sent).
type Acks = Arc<Mutex<HashMap<(usize, String), (String, Instant)>>>;

/// One delta client: subscribes as a sidecar does and ACKs every response at once,
/// recording when it ACKed each endpoints resource.
async fn client(id: usize, acks: Acks) -> Result<()> {
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{ADDRESS}")).await?;
    let (tx, rx) = mpsc::channel(16);
    let node = Node {
        id: format!("sidecar~10.0.0.{id}~bench-{id}.default~default.svc.cluster.local"),
        ..Default::default()
    };
    for (t, names) in [
        (type_url::CLUSTER, vec!["*".to_owned()]),
        (type_url::LISTENER, vec!["*".to_owned()]),
        (
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            (0..SERVICES).map(cluster).collect(),
        ),
    ] {
        tx.send(DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: t.to_owned(),
            resource_names_subscribe: names,
            ..Default::default()
        })
        .await?;
    }
    let mut stream = ads
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(response) = stream.message().await? {
        tx.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await?;
        if response.type_url == type_url::CLUSTER_LOAD_ASSIGNMENT {
            let now = Instant::now();
            let mut acks = acks.lock().expect("not poisoned");
            for r in response.resources {
                acks.insert((id, r.name), (r.version, now));
            }
        }
    }
    Ok(())
}

pub fn run() -> Result<DiscoveryBench> {
    tern_tests::assert_root();
    let ns = Netns::new("disc")?;
    let file = ConfigFile::new(&services(0, 1))?;
    let args = [
        "discovery",
        "--services",
        file.path_str(),
        "--address",
        ADDRESS,
        "--admin-address",
        "127.0.0.1:15014",
        "--file-interval-ms",
        "10",
    ];
    let tern = Tern::spawn(
        &ns,
        None,
        &args,
        &std::env::var("TERN_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
    )?;
    let admin = |path: &str| {
        ns.output(
            None,
            std::path::Path::new("curl"),
            &["-s", "-m", "5", &format!("http://127.0.0.1:15014{path}")],
        )
        .unwrap_or_default()
    };
    ensure!(
        eventually(Duration::from_secs(30), || admin("/ready").trim() == "LIVE"),
        "tern discovery did not start:\n{}",
        tern.log()
    );
    let pid = tern.process.pid();
    let stage = |what: &str| {
        if std::env::var_os("TERN_BENCH_LOG").is_some() {
            eprintln!(
                "{what}: RSS {} MiB, peak {} MiB",
                proc_kib(pid, "VmRSS") / 1024,
                proc_kib(pid, "VmHWM") / 1024
            );
        }
    };
    stage("started, no client");

    // The clients run in this process, in the namespace's network (setns on a thread of their
    // own, so the rest of the bench keeps its namespace).
    let acks: Acks = Arc::default();
    let ns_path = ns.path();
    let runner_acks = acks.clone();
    let runtime = std::thread::spawn(move || -> Result<()> {
        let file = std::fs::File::open(&ns_path)?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let tasks: Vec<_> = (0..CLIENTS)
                .map(|i| tokio::spawn(client(i, runner_acks.clone())))
                .collect();
            for t in tasks {
                t.await??;
            }
            Ok(())
        })
    });
    // Each client's version of a cluster's endpoints; all alike and not `old`: the change
    // reached every client.
    let versions = |changed: usize| -> Vec<Option<String>> {
        let acks = acks.lock().expect("not poisoned");
        (0..CLIENTS)
            .map(|id| acks.get(&(id, cluster(changed))).map(|(v, _)| v.clone()))
            .collect()
    };
    let everywhere = |changed: usize, old: &Option<String>| {
        let v = versions(changed);
        v[0].is_some() && v[0] != *old && v.iter().all(|x| *x == v[0])
    };
    ensure!(
        eventually(Duration::from_secs(60), || everywhere(SERVICES - 1, &None)),
        "the clients never got every endpoint: {} ACKs",
        acks.lock().map(|a| a.len()).unwrap_or(0)
    );
    stage("100 clients hold every resource");
    let connected = admin("/debug/syncz").matches("\"node_id\"").count();
    ensure!(connected == CLIENTS, "{connected} clients connected");

    let cpu_before = cpu_seconds(pid)?;
    let mut latencies = Vec::with_capacity(CHANGES);
    for k in 1..=CHANGES {
        let changed = k * 7 % SERVICES;
        let old = versions(changed)[0].clone();
        let written = Instant::now();
        file.write(&services(changed, 1 + k as u32))?;
        ensure!(
            eventually(Duration::from_secs(10), || everywhere(changed, &old)),
            "change {k} never reached every client"
        );
        let last = {
            let acks = acks.lock().expect("not poisoned");
            (0..CLIENTS)
                .filter_map(|id| acks.get(&(id, cluster(changed))).map(|(_, at)| *at))
                .max()
                .context("no ACK")?
        };
        latencies.push(last.saturating_duration_since(written));
    }
    let cpu = cpu_seconds(pid)? - cpu_before;
    let rss = proc_kib(pid, "VmRSS") as f64 / 1024.0;
    let peak = proc_kib(pid, "VmHWM") as f64 / 1024.0;
    if std::env::var_os("TERN_BENCH_LOG").is_some() {
        eprintln!(
            "change to every ACK, in order (ms): {:?}",
            latencies.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
        );
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p =
        |q: f64| ms(latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)]);
    if std::env::var_os("TERN_BENCH_LOG").is_some() {
        eprintln!(
            "{}",
            tern.log()
                .lines()
                .rev()
                .take(12)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    drop(tern);
    let _ = runtime.join();
    Ok(DiscoveryBench {
        services: SERVICES,
        endpoints: SERVICES * ENDPOINTS,
        clients: CLIENTS,
        changes: CHANGES,
        change_to_all_acked_p50_ms: p(0.50),
        change_to_all_acked_p99_ms: p(0.99),
        cpu_ms_per_change: cpu * 1000.0 / CHANGES as f64,
        rss_mib: rss,
        peak_rss_mib: peak,
    })
}
