//! `tern-bench` (run by `cargo xtask bench`, release binaries, root): tern against the direct
//! path, HAProxy and iptables capture, interleaved in rounds on this machine; writes
//! `target/bench/report.{json,md,svg}` and prints the Markdown.
//!
//! Topology (network namespaces on a bridge, as in `tern_tests::mesh`):
//! - `srv` (10.77.0.2): three echo servers on :9001–9003 — the "netns" endpoints;
//! - `cli` (10.77.0.10): the load generator, HAProxy (127.0.0.1:19000 → netns endpoints,
//!   :19001 → loopback endpoints, :19002 → netns endpoints spliced), three echo servers on 127.0.0.1:9101–9103 (the "loopback"
//!   endpoints) and tern with eBPF capture of the cgroup the load generator runs in;
//! - `cli-ipt` (10.77.0.11): tern with iptables REDIRECT capture, and the load generator.
//!
//! tern serves four virtual IPs: 10.96.0.1 (TCP proxy) and 10.96.0.2 (Thrift proxy) to the
//! netns endpoints, 10.96.0.3 and 10.96.0.4 the same to the loopback endpoints.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use tern_bench::{
    LoadResult, pooled_quantile,
    report::{
        DIRECT, Group, HAPROXY, HAPROXY_SPLICE, MethodNames, Report, Row, Sample, XdsUpdates,
    },
};
use tern_tests::{Cgroup, Istiod, Netns, Process, Tern, bin_dir, eventually, interrupt, mesh};

#[path = "bench/discovery.rs"]
mod discovery;
#[path = "bench/mtls.rs"]
mod mtls;

/// Throughput runs per path, interleaved (medians over them: a slow phase of the host that
/// falls on one path's run in a round or two moves nothing).
const ROUNDS: usize = 5;
/// Latency runs per path in each round, of a second each, taking turns across the paths.
const LATENCY_SLICES: usize = 2;
const SECS: &str = "1.5";
const NETNS_ENDPOINTS: &str = "10.77.0.2:9001,10.77.0.2:9002,10.77.0.2:9003";
const LOOPBACK_ENDPOINTS: &str = "127.0.0.1:9101,127.0.0.1:9102,127.0.0.1:9103";
/// Apache Thrift's Python `TThreadedServer` (one request per connection at a time), and the
/// virtual IP tern serves it on, as istiod would (a plain `tcp_proxy`).
const SERIAL_SERVER: &str = "10.77.0.2:9401";
/// The Thrift path with a multiplexed cluster (opt-in; the echo server answers pipelined calls).
const MULTIPLEXED: &str = "tern Thrift, per request, multiplexed";
const SERIAL_VIP: &str = "10.96.0.5:9090";
/// The synchronous-client groups: 32 connections, one call in flight each.
const SYNC_NETNS: &str = "netns, 32 sync clients × 1 in flight, 100 B";
const SYNC_LOOPBACK: &str = "loopback, 32 sync clients × 1 in flight, 100 B";

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) if interrupt::interrupted() => {
            eprintln!("tern-bench: interrupted; everything it made is removed");
            std::process::ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("tern-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tern_tests::assert_root();
    // Ctrl-C or SIGTERM ends the bench at its next step, through its guards' `Drop`.
    interrupt::catch()?;
    let out_dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: tern-bench OUT_DIR [CRITERION_DIR]")?;
    let criterion_dir = std::env::args().nth(2).map(PathBuf::from);
    std::fs::create_dir_all(&out_dir)?;
    // `TERN_BENCH_ONLY=…`: one part of the measurements alone, printed (for working on it).
    if std::env::var("TERN_BENCH_ONLY").as_deref() == Ok("discovery") {
        println!("{:#?}", discovery::run()?);
        return Ok(());
    }
    if std::env::var("TERN_BENCH_ONLY").as_deref() == Ok("mtls") {
        println!("{:#?}", mtls::run()?);
        return Ok(());
    }
    // `=xds`: the xDS measurements; `=rss`: the idle RSS alone.
    let only = std::env::var("TERN_BENCH_ONLY").ok();
    if matches!(only.as_deref(), Some("xds" | "rss")) {
        let bench = Bench::start()?;
        let idle = bench.idle_rss_with_1000_clusters()?;
        drop(bench);
        println!("idle RSS, 1,000 clusters: {idle:.1} MiB");
        if only.as_deref() == Some("xds") {
            println!("{:#?}", xds_updates()?);
        }
        return Ok(());
    }
    let started = Instant::now();
    let mut bench = Bench::start()?;
    let mut groups = Vec::new();

    // The namespace path twice: the second time with two low-priority processes keeping both
    // cores busy, as on a shared node. Pipelined load (4 connections, several calls in flight
    // each), then 32 synchronous clients (one call in flight each: every proxy makes a system
    // call per request).
    for (name, vip_tcp, vip_thrift, vip_mux, direct, haproxy, size, connections, inflight, busy) in [
        (
            "loopback, 100 B",
            "10.96.0.3:9090",
            "10.96.0.4:9090",
            "10.96.0.7:9090",
            LOOPBACK_ENDPOINTS,
            "127.0.0.1:19001",
            "100",
            "4",
            "8",
            false,
        ),
        (
            "netns, 100 B",
            "10.96.0.1:9090",
            "10.96.0.2:9090",
            "10.96.0.6:9090",
            NETNS_ENDPOINTS,
            "127.0.0.1:19000",
            "100",
            "4",
            "8",
            false,
        ),
        (
            "netns, two busy low-priority processes, 100 B",
            "10.96.0.1:9090",
            "10.96.0.2:9090",
            "10.96.0.6:9090",
            NETNS_ENDPOINTS,
            "127.0.0.1:19000",
            "100",
            "4",
            "8",
            true,
        ),
        (
            SYNC_NETNS,
            "10.96.0.1:9090",
            "10.96.0.2:9090",
            "10.96.0.6:9090",
            NETNS_ENDPOINTS,
            "127.0.0.1:19000",
            "100",
            "32",
            "1",
            false,
        ),
        (
            SYNC_LOOPBACK,
            "10.96.0.3:9090",
            "10.96.0.4:9090",
            "10.96.0.7:9090",
            LOOPBACK_ENDPOINTS,
            "127.0.0.1:19001",
            "100",
            "32",
            "1",
            false,
        ),
        (
            "netns, 64 KiB",
            "10.96.0.1:9090",
            "10.96.0.2:9090",
            "10.96.0.6:9090",
            NETNS_ENDPOINTS,
            "127.0.0.1:19000",
            LARGE,
            "4",
            "2",
            false,
        ),
    ] {
        // `TERN_BENCH_PATHS=64`: only the data-path groups whose name holds it, printed (for
        // profiling a path).
        let only = std::env::var("TERN_BENCH_PATHS").ok();
        if only
            .as_ref()
            .is_some_and(|only| !name.contains(only.as_str()))
        {
            continue;
        }
        let load = [
            "--connections",
            connections,
            "--inflight",
            inflight,
            "--size",
            size,
        ];
        // A second a slice, `LATENCY_SLICES` slices a round (10 s in all): the calls of all are
        // pooled, and a tail needs many calls to hold still (a second a round left p99
        // comparisons moving by ±1× between runs).
        let latency = [
            "--connections",
            "1",
            "--inflight",
            "1",
            "--size",
            size,
            "--secs",
            "1",
            "--warmup",
            "0.2",
        ];
        let mut paths = vec![
            LoadPath::new(DIRECT, direct, None, false),
            LoadPath::new(HAPROXY, haproxy, Some(bench.haproxy.pid()), false),
            LoadPath::new("tern TCP proxy", vip_tcp, bench.tern_pid(), true),
            LoadPath::new(
                "tern Thrift, per request",
                vip_thrift,
                bench.tern_pid(),
                true,
            ),
            LoadPath::new(MULTIPLEXED, vip_mux, bench.tern_pid(), true),
        ];
        if size == LARGE {
            // HAProxy at its best for large relays: splicing (not its default), as tern does.
            let spliced = LoadPath::new(
                HAPROXY_SPLICE,
                HAPROXY_SPLICE_ADDR,
                Some(bench.haproxy.pid()),
                false,
            );
            paths.insert(2, spliced);
        }
        let busy: Vec<Process> = (0..if busy { 2 } else { 0 })
            .map(|_| {
                let mut cmd = std::process::Command::new("nice");
                cmd.args(["-n", "19", "sh", "-c", "while :; do :; done"]);
                Process::spawn(cmd)
            })
            .collect::<Result<_>>()?;
        let group = bench.compare(name, &paths, &load, Some(&latency), &bench.cli)?;
        groups.push(bench.count_syscalls_and_wakeups(group, &paths, &load)?);
        drop(busy);
    }
    if std::env::var_os("TERN_BENCH_PATHS").is_some() {
        for group in &groups {
            println!("{}", group.name);
            for r in &group.rows {
                println!(
                    "  {:<28} {:>9.0} req/s  per core vs HAProxy {:>5.2?}  added p99 vs HAProxy {:>5.2?} (by slice {:.2?})  syscalls/req {:>5.2?}  own wakeups/req {:>6.4?}  CPU s/M {:>7.1?} (kernel {:>7.1?})  p50 {:>5.0} p99 {:>5.0} µs",
                    r.path,
                    r.rps,
                    r.per_core_vs_haproxy,
                    r.added_p99_vs_haproxy,
                    r.added_p99_vs_haproxy_by_slice
                        .map(|s| (s.median, s.low, s.high)),
                    r.syscalls_per_request,
                    r.own_wakeups_per_request,
                    r.cpu_s_per_million,
                    r.kernel_cpu_s_per_million,
                    r.p50_us,
                    r.p99_us,
                );
            }
        }
        return Ok(());
    }

    groups.push(bench.serial_server_with_slow_callers()?);
    let method_names = bench.million_method_names()?;

    // Connection setup: a new connection per call.
    let churn = ["--churn", "--connections", "4", "--size", "100"];
    let mut setup = None;
    for exclusions in [0usize, 100, 1000] {
        let (mut ebpf, mut ipt) = bench.capture_terns(exclusions)?;
        let name = format!("connection setup, {exclusions} excluded CIDRs and ports");
        let mut paths = vec![
            LoadPath::new(
                "tern, eBPF capture",
                "10.96.0.1:9090",
                Some(ebpf.process.pid()),
                true,
            ),
            LoadPath::new(
                "tern, iptables capture",
                "10.96.0.1:9090",
                Some(ipt.process.pid()),
                false,
            )
            .in_ns(&bench.cli_ipt),
        ];
        if exclusions == 0 {
            paths.insert(0, LoadPath::new(DIRECT, NETNS_ENDPOINTS, None, false));
            paths.insert(
                1,
                LoadPath::new(HAPROXY, "127.0.0.1:19000", Some(bench.haproxy.pid()), false),
            );
        }
        let group = bench.compare(&name, &paths, &churn, None, &bench.cli)?;
        // SIGTERM, so the next ones start from no hooks and no rules.
        ebpf.process.terminate()?;
        ipt.process.terminate()?;
        if exclusions == 0 {
            setup = Some(group);
        } else {
            groups.push(group);
        }
    }
    groups.insert(5, setup.expect("measured"));

    interrupt::check()?;
    let idle_rss = bench.idle_rss_with_1000_clusters()?;
    drop(bench);
    interrupt::check()?;
    let xds = xds_updates()?;
    interrupt::check()?;
    let mtls = mtls::run()?;
    interrupt::check()?;
    let discovery = discovery::run()?;

    let report = Report::new(
        groups,
        method_names,
        idle_rss,
        xds,
        Some(mtls),
        read_micro(&out_dir, criterion_dir.as_deref()),
        started.elapsed(),
    )
    .with_discovery(discovery);
    report.write(&out_dir)?;
    println!("{}", report.markdown());
    Ok(())
}

/// One way from the load generator to the echo servers.
struct LoadPath<'a> {
    name: &'static str,
    addr: &'a str,
    /// The proxy on the path, for its CPU time and peak memory.
    proxy: Option<u32>,
    /// Whether the load generator runs in the eBPF-captured cgroup.
    captured: bool,
    /// The namespace the load generator runs in, when not the bench's client namespace.
    ns: Option<&'a Netns>,
}

impl<'a> LoadPath<'a> {
    fn new(name: &'static str, addr: &'a str, proxy: Option<u32>, captured: bool) -> Self {
        Self {
            name,
            addr,
            proxy,
            captured,
            ns: None,
        }
    }

    fn in_ns(mut self, ns: &'a Netns) -> Self {
        self.ns = Some(ns);
        self
    }
}

/// Everything the bench runs; dropping it stops every process and removes the namespaces.
struct Bench {
    tern_ebpf: Option<Tern>,
    haproxy: Process,
    _servers: Vec<Process>,
    config: PathBuf,
    cgroup: Cgroup,
    cli_ipt: Netns,
    cli: Netns,
    _srv: Netns,
    _node: Netns,
}

impl Bench {
    fn start() -> Result<Self> {
        eprintln!("tern-bench: starting servers, HAProxy and tern");
        let node = mesh::node()?;
        let srv = Netns::new("bench-srv")?;
        let cli = Netns::new("bench-cli")?;
        let cli_ipt = Netns::new("bench-ipt")?;
        mesh::bridge_port(&node, &srv, "10.77.0.2", 2)?;
        mesh::bridge_port(&node, &cli, "10.77.0.10", 10)?;
        mesh::bridge_port(&node, &cli_ipt, "10.77.0.11", 11)?;
        for ns in [&cli, &cli_ipt, &srv] {
            // Connection churn leaves many sockets in TIME_WAIT.
            for setting in [
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=10000 65000",
            ] {
                ns.output(None, Path::new("sysctl"), &["-qw", setting])?;
            }
        }
        let load = bin_dir().join("tern-load");
        let mut servers = Vec::new();
        for (ns, addrs) in [(&srv, NETNS_ENDPOINTS), (&cli, LOOPBACK_ENDPOINTS)] {
            for addr in addrs.split(',') {
                servers.push(tern_tests::start_server(ns, None, &load, &["serve", addr])?);
            }
        }
        let serial = tern_tests::python_peer("serial_peer.py");
        servers.push(tern_tests::start_server(
            &srv,
            None,
            Path::new("python3"),
            &[
                serial.to_str().context("UTF-8 path")?,
                "serve",
                SERIAL_SERVER,
                "serial",
            ],
        )?);
        let config = std::env::temp_dir().join(format!("{}.yaml", tern_tests::unique("bench")));
        std::fs::write(&config, tern_config())?;
        let haproxy_cfg =
            std::env::temp_dir().join(format!("{}.cfg", tern_tests::unique("haproxy")));
        std::fs::write(&haproxy_cfg, haproxy_config())?;
        let mut cmd = cli.command(
            None,
            Path::new("haproxy"),
            &["-f", haproxy_cfg.to_str().unwrap(), "-db"],
        );
        cmd.stdout(std::process::Stdio::null());
        let haproxy = Process::spawn(cmd)?;
        ensure!(
            eventually(Duration::from_secs(5), || {
                cli.output(None, Path::new("ss"), &["-Hltn", "sport = :19000"])
                    .is_ok_and(|o| !o.trim().is_empty())
            }),
            "HAProxy did not start (is it installed? `cargo xtask setup` installs it)"
        );
        let _ = std::fs::remove_file(&haproxy_cfg);
        let cgroup = Cgroup::new("bench")?;
        let tern_ebpf = start_tern(&cli, Some(&cgroup), &config, "ebpf", 0)?;
        Ok(Self {
            tern_ebpf: Some(tern_ebpf),
            haproxy,
            _servers: servers,
            config,
            cgroup,
            cli_ipt,
            cli,
            _srv: srv,
            _node: node,
        })
    }

    /// tern with eBPF capture (in `cli`) and with iptables capture (in `cli-ipt`), both with
    /// `exclusions` excluded CIDRs and ports. Only one tern may capture the cgroup, so the
    /// bench's own eBPF tern stops first (SIGTERM: its hooks go with it).
    fn capture_terns(&mut self, exclusions: usize) -> Result<(Tern, Tern)> {
        if let Some(mut tern) = self.tern_ebpf.take() {
            tern.process.terminate()?;
        }
        let ebpf = start_tern(
            &self.cli,
            Some(&self.cgroup),
            &self.config,
            "ebpf",
            exclusions,
        )?;
        let ipt = start_tern(&self.cli_ipt, None, &self.config, "iptables", exclusions)?;
        Ok((ebpf, ipt))
    }

    fn tern_pid(&self) -> Option<u32> {
        self.tern_ebpf.as_ref().map(|t| t.process.pid())
    }

    /// Runs every path `ROUNDS` times, interleaved, and summarises the group: throughput
    /// under `load`, and latency under `latency` when given.
    fn compare(
        &self,
        name: &str,
        paths: &[LoadPath],
        load: &[&str],
        latency: Option<&[&str]>,
        ns: &Netns,
    ) -> Result<Group> {
        eprintln!("tern-bench: {name}");
        let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
        let cgroup = |p: &LoadPath| p.captured.then_some(&self.cgroup);
        for round in 0..ROUNDS {
            let mut loads = Vec::with_capacity(paths.len());
            for p in paths {
                let cpu_before = p.proxy.map(cpu_times).transpose()?;
                let result = load_run(p.ns.unwrap_or(ns), cgroup(p), p.addr, load)?;
                let cpu = match (p.proxy, cpu_before) {
                    (Some(pid), Some(before)) => Some(cpu_times(pid)?.since(before)),
                    _ => None,
                };
                loads.push((result, cpu));
            }
            // Latency one call at a time (a saturated run measures its own queue), in short
            // slices that take turns across the paths: a slow phase of the host (they last
            // seconds on this VM) then falls on every path alike, not on the one measured
            // while it lasted.
            let mut slices: Vec<Vec<LoadResult>> = vec![Vec::new(); paths.len()];
            if let Some(args) = latency {
                for _ in 0..LATENCY_SLICES {
                    for (p, slices) in paths.iter().zip(&mut slices) {
                        slices.push(load_run(p.ns.unwrap_or(ns), cgroup(p), p.addr, args)?);
                    }
                }
            }
            for ((p, (result, cpu)), slices) in paths.iter().zip(loads).zip(slices) {
                let latency = LoadResult::merged(&slices);
                let latency_slices_p99_us = slices.iter().map(|s| s.p99_us).collect();
                let peak_rss = p.proxy.map(peak_rss_kib).transpose()?;
                let p99 = latency.as_ref().unwrap_or(&result).p99_us;
                eprintln!(
                    "  round {} {:<26} {:>9.0} req/s  p99 {:>7.0} µs{}",
                    round + 1,
                    p.name,
                    result.rps,
                    p99,
                    if result.errors > 0 {
                        format!("  ({} errors)", result.errors)
                    } else {
                        String::new()
                    }
                );
                samples.entry(p.name).or_default().push(Sample {
                    load: result,
                    latency,
                    proxy_cpu_s: cpu.map(CpuTimes::total),
                    proxy_kernel_cpu_s: cpu.map(|c| c.kernel),
                    proxy_peak_rss_kib: peak_rss,
                    latency_slices_p99_us,
                });
            }
        }
        let rows = paths
            .iter()
            .map(|p| Row::from_samples(p.name, samples.remove(p.name).unwrap_or_default()))
            .collect();
        Ok(Group::new(name, rows))
    }

    /// Adds each proxy's system calls per request to `group`, and how often one of its
    /// threads woke another of its own: one more run per proxied path, counted by `perf
    /// stat` on the `raw_syscalls:sys_enter` and `sched:sched_waking` tracepoints (a run of
    /// its own, so the counting costs the measured rounds nothing). `sched_waking` fires in
    /// the waker's context, which `-p` selects; a filter keeps the wakees that are the
    /// proxy's threads (those it has when the run starts; tern's are all up by then).
    fn count_syscalls_and_wakeups(
        &self,
        mut group: Group,
        paths: &[LoadPath],
        load: &[&str],
    ) -> Result<Group> {
        let load = [load, &["--secs", "1", "--warmup", "0"]].concat();
        for p in paths {
            let Some(pid) = p.proxy else { continue };
            let own = threads(pid)?
                .iter()
                .map(|tid| format!("pid == {tid}"))
                .collect::<Vec<_>>()
                .join(" || ");
            let perf = std::process::Command::new("perf")
                .args(["stat", "-x,", "-e", "raw_syscalls:sys_enter"])
                .args(["-e", "sched:sched_waking", "--filter", &own, "-p"])
                .arg(pid.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("run perf (`cargo xtask setup` installs it)")?;
            // perf stat reports once interrupted; give it a moment to attach first.
            std::thread::sleep(Duration::from_millis(200));
            let cgroup = p.captured.then_some(&self.cgroup);
            let result = load_run(p.ns.unwrap_or(&self.cli), cgroup, p.addr, &load);
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(perf.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )?;
            let out = perf.wait_with_output()?;
            let result = result?;
            let text = String::from_utf8_lossy(&out.stderr);
            let counted = |event: &str| -> Result<f64> {
                text.lines()
                    .find(|l| l.contains(event))
                    .and_then(|l| l.split(',').next())
                    .and_then(|n| n.trim().parse().ok())
                    .with_context(|| format!("{event} in perf stat output {text:?}"))
            };
            let per_request = |n: f64| n / result.total.max(1) as f64;
            let calls = per_request(counted("raw_syscalls:sys_enter")?);
            let wakeups = per_request(counted("sched:sched_waking")?);
            if let Some(row) = group.rows.iter_mut().find(|r| r.path == p.name) {
                row.syscalls_per_request = Some(calls);
                row.own_wakeups_per_request = Some(wakeups);
            }
        }
        Ok(group)
    }

    /// Apache Thrift's serial Python server, with two callers of a method that takes 300 ms
    /// on it all along: the fast callers' latency (4 connections, one call at a time each),
    /// direct and through tern (detected on a plain `tcp_proxy`, exclusive connections).
    fn serial_server_with_slow_callers(&self) -> Result<Group> {
        let name = "serial Thrift server (TThreadedServer), fast callers beside 2 slow ones";
        eprintln!("tern-bench: {name}");
        let thriftpeer = bin_dir().join("tern-thriftpeer");
        let paths = [
            (DIRECT, SERIAL_SERVER, false),
            ("tern Thrift, per request", SERIAL_VIP, true),
        ];
        let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
        for _ in 0..ROUNDS {
            for (path, addr, captured) in paths {
                let cgroup = captured.then_some(&self.cgroup);
                let slow: Vec<Process> = (0..2)
                    .map(|_| {
                        let mut cmd = self.cli.command(
                            cgroup,
                            &thriftpeer,
                            &[
                                "call", addr, "--method", "sleep", "--ms", "300", "--calls", "1000",
                            ],
                        );
                        cmd.stdout(std::process::Stdio::null());
                        Process::spawn(cmd)
                    })
                    .collect::<Result<_>>()?;
                std::thread::sleep(Duration::from_millis(200));
                let fast = load_run(
                    &self.cli,
                    cgroup,
                    addr,
                    &[
                        "--connections",
                        "4",
                        "--inflight",
                        "1",
                        "--size",
                        "100",
                        "--secs",
                        "2",
                    ],
                )?;
                drop(slow);
                eprintln!(
                    "  {path:<26} {:>9.0} req/s  p99 {:>7.0} µs",
                    fast.rps, fast.p99_us
                );
                samples.entry(path).or_default().push(Sample {
                    load: fast,
                    latency: None,
                    proxy_cpu_s: None,
                    proxy_kernel_cpu_s: None,
                    proxy_peak_rss_kib: None,
                    latency_slices_p99_us: Vec::new(),
                });
            }
        }
        let rows = paths
            .iter()
            .map(|(p, _, _)| Row::from_samples(p, samples.remove(p).unwrap_or_default()))
            .collect();
        Ok(Group::new(name, rows))
    }

    /// A client sends a million calls with distinct method names through tern's Thrift path;
    /// the metrics page must not grow with them.
    fn million_method_names(&self) -> Result<MethodNames> {
        eprintln!("tern-bench: a million distinct method names");
        let page = || tern_tests::admin(&self.cli, "GET", "/stats/prometheus").len();
        let before = page();
        let names = tern_tests::python_json(
            &self.cli,
            Some(&self.cgroup),
            "protocols_peer.py",
            &["names", SERIAL_VIP, "1000000"],
        );
        let calls = names["replies"]
            .as_u64()
            .context("the names client failed")?;
        Ok(MethodNames {
            calls,
            page_bytes_before: before,
            page_bytes_after: page(),
        })
    }

    /// tern's resident memory once 1,000 clusters with 10,000 endpoints are loaded over xDS
    /// and it is idle (no capture, its own namespace).
    fn idle_rss_with_1000_clusters(&self) -> Result<f64> {
        eprintln!("tern-bench: idle memory with 1,000 clusters / 10,000 endpoints");
        let ns = Netns::new("bench-rss")?;
        let cp = Istiod::start(&ns, "127.0.0.1:15010", "version: \"1\"\nbulk: 1000\n", &[])?;
        let tern = Tern::start_logging(
            &ns,
            None,
            &[
                "run",
                "--inbound-ports",
                "",
                "--xds-address",
                "http://127.0.0.1:15010",
            ],
            "info",
        )?;
        ensure!(
            eventually(Duration::from_secs(30), || tern_tests::admin(
                &ns, "GET", "/ready"
            )
            .trim()
                == "LIVE"),
            "tern did not load the 1,000 clusters:\n{}",
            tern.log()
        );
        ensure!(
            cp.wait_for("ACK ClusterLoadAssignment 1"),
            "no EDS ACK: {}",
            cp.events()
        );
        // Idle: the last update's memory given back (tern trims at most every 2 s).
        std::thread::sleep(Duration::from_secs(3));
        let status = std::fs::read_to_string(format!("/proc/{}/status", tern.process.pid()))?;
        let rss = field_kib(&status, "VmRSS:").context("VmRSS")?;
        Ok(rss as f64 / 1024.0)
    }
}

/// Rounds of the churn measurement (each: no pushes, pushes to another tern, pushes to the
/// measured one).
const CHURN_ROUNDS: usize = 5;

/// Endpoint churn from the control plane while Thrift calls run: tern with eBPF capture and
/// 1,000 clusters / 10,000 endpoints over xDS; the p99 of calls with no pushes, then with one
/// endpoint change pushed 100 times a second, and what each apply took (tern's
/// `tern_xds_apply_seconds`). Also tern's peak memory with capture.
/// Thrift p99 through a tern with 1,000 clusters while one EDS change is pushed 100 times a
/// second, against two references: no pushes anywhere, and the same pushes going to another
/// tern (so the control plane and the other tern compete for the cores as much, while the
/// measured tern receives nothing). Also what each costs: the control plane's CPU, and the
/// measured tern's CPU per push beyond its quiet run's.
fn xds_updates() -> Result<XdsUpdates> {
    eprintln!("tern-bench: xDS endpoint churn, 100 changes a second, 1,000 clusters");
    let p = tern_tests::pods();
    let servers = ["10.66.1.2:9201", "10.66.1.2:9202"]
        .iter()
        .map(|a| {
            tern_tests::start_server(&p.srv, None, &bin_dir().join("tern-load"), &["serve", a])
        })
        .collect::<Result<Vec<_>>>()?;
    let snapshot = |churn: u64| {
        format!(
            "version: \"{}\"\nbulk: 999\nchurn_per_sec: {churn}\nservices:\n  - {{ name: calc, vip: 10.96.0.20, port: 9090, filter: tcp, endpoints: [\"10.66.1.2:9201\", \"10.66.1.2:9202\"] }}\n",
            1 + churn
        )
    };
    let cp = Istiod::start(&p.app, "127.0.0.1:15010", &snapshot(0), &[])?;
    let tern = p.start_tern_xds(&[], "info")?;
    ensure!(cp.wait_for("ACK ClusterLoadAssignment 1"), "no EDS ACK");
    let latency = [
        "--connections",
        "1",
        "--inflight",
        "1",
        "--size",
        "100",
        "--secs",
        "4",
        "--warmup",
        "0.5",
    ];
    let pid = |c: &Istiod| c.process.as_ref().map(Process::pid).context("running");
    // What the pushes cost tern: its control thread's CPU (decoding, applying, freeing; the
    // data path's CPU follows the calls, which the pushes slow down).
    let tern_control = || thread_cpu_seconds(tern.process.pid(), "tern-control");
    // A run of the latency load, with the CPU seconds of `cpu` meanwhile.
    let measured = |cpu: &[&dyn Fn() -> Result<f64>]| -> Result<(LoadResult, Vec<f64>)> {
        let before = cpu.iter().map(|f| f()).collect::<Result<Vec<_>>>()?;
        let run = load_run(&p.app, Some(&p.cgroup), "10.96.0.20:9090", &latency)?;
        let after = cpu.iter().map(|f| f()).collect::<Result<Vec<_>>>()?;
        Ok((run, after.iter().zip(before).map(|(a, b)| a - b).collect()))
    };
    // The baseline's pushes go to another tern, from another control plane.
    let other = tern_tests::pods();
    let other_cp = Istiod::start(&other.app, "127.0.0.1:15010", &snapshot(0), &[])?;
    let other_tern = other.start_tern_xds(&[], "info")?;
    ensure!(
        other_cp.wait_for("ACK ClusterLoadAssignment 1"),
        "no EDS ACK"
    );
    let (cp_pid, other_pid) = (pid(&cp)?, pid(&other_cp)?);
    let applies = |text: &str| apply_buckets(text, "ClusterLoadAssignment");
    // Pushes at 100 a second from `to` while `run` runs; what it measured.
    let pushing = |to: &Istiod, run: &dyn Fn() -> Result<(LoadResult, Vec<f64>)>| {
        to.push(&snapshot(100));
        std::thread::sleep(Duration::from_millis(500));
        let measured = run();
        to.push(&snapshot(0));
        // The last push applied before the next run.
        std::thread::sleep(Duration::from_millis(500));
        measured
    };
    // A p99 of one 4-second run moves by tens of µs from run to run: the three cases are
    // interleaved over rounds, and each case's p99 is over all its rounds' calls pooled.
    let (mut quiet, mut baseline, mut churned) = (Vec::new(), Vec::new(), Vec::new());
    let (mut quiet_cpu, mut churn_cpu, mut cp_cpu, mut other_cp_cpu) = (0.0, 0.0, 0.0, 0.0);
    let mut window: Vec<(f64, f64)> = Vec::new();
    for _ in 0..CHURN_ROUNDS {
        let (run, cpu) = measured(&[&tern_control])?;
        quiet_cpu += cpu[0];
        quiet.push(run);

        let (run, cpu) = pushing(&other_cp, &|| measured(&[&|| cpu_seconds(other_pid)]))?;
        other_cp_cpu += cpu[0];
        baseline.push(run);

        let before = applies(&tern_tests::admin(&p.app, "GET", "/stats/prometheus"));
        let (run, cpu) = pushing(&cp, &|| measured(&[&tern_control, &|| cpu_seconds(cp_pid)]))?;
        let after = applies(&tern_tests::admin(&p.app, "GET", "/stats/prometheus"));
        churn_cpu += cpu[0];
        cp_cpu += cpu[1];
        churned.push(run);
        // The applies during this run, added to the other rounds'.
        let counted = after
            .iter()
            .zip(&before)
            .map(|((le, a), (_, b))| (*le, a - b));
        if window.is_empty() {
            window = counted.collect();
        } else {
            for (sum, (_, n)) in window.iter_mut().zip(counted) {
                sum.1 += n;
            }
        }
    }
    drop((other_tern, other_cp, other));
    let count = window.last().map_or(0.0, |(_, n)| *n);
    let status = std::fs::read_to_string(format!("/proc/{}/status", tern.process.pid()))?;
    drop(servers);
    let p99s = |runs: &[LoadResult]| runs.iter().map(|r| r.p99_us).collect::<Vec<f64>>();
    let pooled_p99 =
        |runs: &[LoadResult]| pooled_quantile(runs.iter().map(|r| &r.calls_us[..]), 0.99);
    let secs = |runs: &[LoadResult]| runs.iter().map(|r| r.secs).sum::<f64>().max(0.1);
    Ok(XdsUpdates {
        applies_during_calls: count as u64,
        apply_p50_ms: quantile(&window, 0.5) * 1e3,
        apply_p99_ms: quantile(&window, 0.99) * 1e3,
        quiet_p99_us: pooled_p99(&quiet),
        baseline_p99_us: pooled_p99(&baseline),
        churn_p99_us: pooled_p99(&churned),
        quiet_rounds_us: p99s(&quiet),
        baseline_rounds_us: p99s(&baseline),
        churn_rounds_us: p99s(&churned),
        churn_errors: churned.iter().map(|r| r.errors).sum(),
        tern_cpu_us_per_push: (churn_cpu - quiet_cpu).max(0.0) / count.max(1.0) * 1e6,
        control_plane_cpu_share_baseline: other_cp_cpu / secs(&baseline),
        control_plane_cpu_share_churn: cp_cpu / secs(&churned),
        peak_rss_mib_with_capture: field_kib(&status, "VmHWM:").context("VmHWM")? as f64 / 1024.0,
        rss_mib_with_capture: field_kib(&status, "VmRSS:").context("VmRSS")? as f64 / 1024.0,
    })
}

/// The cumulative buckets (upper bound, count) of `tern_xds_apply_seconds` for a type.
fn apply_buckets(metrics: &str, resource: &str) -> Vec<(f64, f64)> {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("tern_xds_apply_seconds_bucket{")
                && l.contains(&format!("resource=\"{resource}\""))
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// A quantile from cumulative buckets, interpolated linearly within its bucket.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |(_, n)| *n);
    if total == 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= rank {
            if !le.is_finite() {
                return lower.0;
            }
            let share = if n > lower.1 {
                (rank - lower.1) / (n - lower.1)
            } else {
                1.0
            };
            return lower.0 + (le - lower.0) * share;
        }
        lower = (le, n);
    }
    lower.0
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

fn start_tern(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    config: &Path,
    capture: &str,
    exclusions: usize,
) -> Result<Tern> {
    let cidrs: Vec<String> = (0..exclusions)
        .map(|i| format!("172.16.{}.{}/32", i / 256, i % 256))
        .collect();
    let ports: Vec<String> = (0..exclusions).map(|i| (20000 + i).to_string()).collect();
    let (cidrs, ports) = (cidrs.join(","), ports.join(","));
    let mut args = vec![
        "run",
        "--capture",
        capture,
        "--inbound-ports",
        "",
        "--config",
        config.to_str().context("UTF-8 path")?,
        "--exclude-cidrs",
        &cidrs,
        "--exclude-ports",
        &ports,
    ];
    if let Some(cg) = cgroup {
        args.extend(["--cgroup", cg.path_str()]);
    }
    Tern::start_logging(ns, cgroup, &args, "info")
}

fn load_run(ns: &Netns, cgroup: Option<&Cgroup>, addr: &str, load: &[&str]) -> Result<LoadResult> {
    interrupt::check()?;
    let bin = bin_dir().join("tern-load");
    let args = [&["run", "--addr", addr, "--secs", SECS][..], load].concat();
    // A later `--secs` wins (clap keeps the last occurrence).
    let out = ns.output(cgroup, &bin, &args)?;
    let result: LoadResult =
        serde_json::from_str(out.trim()).with_context(|| format!("tern-load output {out:?}"))?;
    if result.requests == 0 {
        bail!("no call succeeded on {addr} ({} errors)", result.errors);
    }
    Ok(result)
}

/// The thread ids of a process.
fn threads(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/task");
    std::fs::read_dir(&dir)
        .with_context(|| format!("list {dir}"))?
        .map(|entry| {
            let name = entry?.file_name();
            name.to_str()
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("a thread id in {dir}: {name:?}"))
        })
        .collect()
}

/// User and system CPU seconds a process used so far (`/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> Result<f64> {
    cpu_times(pid).map(CpuTimes::total)
}

/// A process's CPU seconds in user space and in the kernel (its system calls, with the
/// network stack's work they do, which on loopback includes the receiving side's).
#[derive(Clone, Copy, Debug)]
struct CpuTimes {
    user: f64,
    kernel: f64,
}

impl CpuTimes {
    fn total(self) -> f64 {
        self.user + self.kernel
    }

    fn since(self, before: Self) -> Self {
        Self {
            user: self.user - before.user,
            kernel: self.kernel - before.kernel,
        }
    }
}

fn cpu_times(pid: u32) -> Result<CpuTimes> {
    stat_cpu_times(&format!("/proc/{pid}/stat"))
}

/// The CPU seconds of a process's thread named `name` (tern's `tern-control`).
fn thread_cpu_seconds(pid: u32, name: &str) -> Result<f64> {
    for tid in threads(pid)? {
        let dir = format!("/proc/{pid}/task/{tid}");
        if std::fs::read_to_string(format!("{dir}/comm")).is_ok_and(|c| c.trim() == name) {
            return stat_cpu_times(&format!("{dir}/stat")).map(CpuTimes::total);
        }
    }
    bail!("process {pid} has no thread {name}")
}

/// User and system CPU seconds from a `stat` file of `/proc`.
fn stat_cpu_times(path: &str) -> Result<CpuTimes> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, s)| s)
        .context("stat format")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; after the name they are the 12th and 13th.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(CpuTimes {
        user: fields[11].parse::<u64>()? as f64 / hz,
        kernel: fields[12].parse::<u64>()? as f64 / hz,
    })
}

/// The process's peak resident memory (`VmHWM`).
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    field_kib(&status, "VmHWM:").context("VmHWM")
}

fn field_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn tern_config() -> String {
    let endpoints = |list: &str| {
        list.split(',')
            .map(|a| format!("      - {{ address: {a} }}\n"))
            .collect::<String>()
    };
    format!(
        r#"passthrough: allow
listeners:
  - address: 10.96.0.1:9090
    filter_chains: [ {{ tcp_proxy: {{ cluster: echo-netns, sniff_thrift: false }} }} ]
  - address: 10.96.0.2:9090
    filter_chains: [ {{ thrift_proxy: {{ transport: framed, protocol: binary, default_cluster: echo-netns }} }} ]
  - address: 10.96.0.3:9090
    filter_chains: [ {{ tcp_proxy: {{ cluster: echo-lo, sniff_thrift: false }} }} ]
  - address: 10.96.0.4:9090
    filter_chains: [ {{ thrift_proxy: {{ transport: framed, protocol: binary, default_cluster: echo-lo }} }} ]
  - address: 10.96.0.6:9090
    filter_chains: [ {{ thrift_proxy: {{ transport: framed, protocol: binary, default_cluster: echo-netns-mux }} }} ]
  - address: 10.96.0.7:9090
    filter_chains: [ {{ thrift_proxy: {{ transport: framed, protocol: binary, default_cluster: echo-lo-mux }} }} ]
  - address: {SERIAL_VIP}
    filter_chains: [ {{ tcp_proxy: {{ cluster: 'outbound|9090||serial.bench.svc.cluster.local' }} }} ]
clusters:
  - name: echo-netns-mux
    thrift_upstream: multiplexed
    endpoints:
{}  - name: echo-lo-mux
    thrift_upstream: multiplexed
    endpoints:
{}  - name: 'outbound|9090||serial.bench.svc.cluster.local'
    timeout_ms: 10000
    endpoints: [ {{ address: {SERIAL_SERVER} }} ]
  - name: echo-netns
    endpoints:
{}  - name: echo-lo
    endpoints:
{}"#,
        endpoints(NETNS_ENDPOINTS),
        endpoints(LOOPBACK_ENDPOINTS),
        endpoints(NETNS_ENDPOINTS),
        endpoints(LOOPBACK_ENDPOINTS)
    )
}

/// The large message size, which HAProxy also relays spliced.
const LARGE: &str = "65536";
/// HAProxy to the netns endpoints with `option splice-request` and `splice-response`.
const HAPROXY_SPLICE_ADDR: &str = "127.0.0.1:19002";

fn haproxy_config() -> String {
    let servers = |list: &str| {
        list.split(',')
            .enumerate()
            .map(|(i, a)| format!("    server s{i} {a}\n"))
            .collect::<String>()
    };
    format!(
        "global\n    maxconn 8000\n    maxpipes 256\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n\
         listen netns\n    bind 127.0.0.1:19000\n    balance roundrobin\n{}\n\
         listen loopback\n    bind 127.0.0.1:19001\n    balance roundrobin\n{}\n\
         listen netns_splice\n    bind {HAPROXY_SPLICE_ADDR}\n    balance roundrobin\n    option splice-request\n    option splice-response\n{}",
        servers(NETNS_ENDPOINTS),
        servers(LOOPBACK_ENDPOINTS),
        servers(NETNS_ENDPOINTS),
    )
}

/// The micro-benchmarks `cargo xtask bench` ran before: criterion's mean estimates (ns) under
/// `criterion_dir`, and the allocations per proxied request in `OUT_DIR/alloc.json`.
fn read_micro(out_dir: &Path, criterion_dir: Option<&Path>) -> BTreeMap<String, f64> {
    let mut micro: BTreeMap<String, f64> = BTreeMap::new();
    for file in ["alloc.json", "xds_apply.json"] {
        let values: BTreeMap<String, f64> = std::fs::read_to_string(out_dir.join(file))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        micro.extend(values);
    }
    let mut dirs: Vec<PathBuf> = criterion_dir.into_iter().map(Path::to_owned).collect();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                let estimates = path.join("new/estimates.json");
                if let Ok(text) = std::fs::read_to_string(&estimates)
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                    && let Some(mean) = v["mean"]["point_estimate"].as_f64()
                    && let Some(base) = criterion_dir
                    && let Ok(name) = path.strip_prefix(base)
                {
                    micro.insert(name.display().to_string(), mean);
                }
                dirs.push(path);
            }
        }
    }
    micro
}
