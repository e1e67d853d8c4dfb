//! The benchmark report: medians over rounds per path (latency percentiles over their calls
//! pooled), ratios to the direct path and to HAProxy, the targets, written as JSON, Markdown
//! and an SVG chart.
use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::LoadResult;

pub const DIRECT: &str = "direct";
pub const HAPROXY: &str = "HAProxy (TCP)";
/// HAProxy with `option splice-request` and `splice-response` (large messages only).
pub const HAPROXY_SPLICE: &str = "HAProxy (TCP, splice)";

/// One round of one path.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// The throughput run (many calls in flight).
    pub load: LoadResult,
    /// The latency run (one call at a time), when the comparison has one.
    pub latency: Option<LoadResult>,
    /// CPU seconds the proxy used during the run.
    pub proxy_cpu_s: Option<f64>,
    /// Of those, the seconds in the kernel.
    pub proxy_kernel_cpu_s: Option<f64>,
    pub proxy_peak_rss_kib: Option<u64>,
    /// The p99 of each slice of the latency run, in the order they ran: slice `i` of every
    /// path of a group ran within seconds of the others', so they compare pair by pair.
    pub latency_slices_p99_us: Vec<f64>,
}

/// The median of some ratios, and their range.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub low: f64,
    pub high: f64,
}

impl Spread {
    /// `None` for no value.
    fn of(values: Vec<f64>) -> Option<Self> {
        let low = values.iter().copied().reduce(f64::min)?;
        let high = values.iter().copied().reduce(f64::max)?;
        Some(Self {
            median: median(values),
            low,
            high,
        })
    }
}

/// One path's medians over its rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub path: String,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub connect_p50_us: Option<f64>,
    pub connect_p99_us: Option<f64>,
    /// p99 over the direct path's p99.
    pub added_p99_us: Option<f64>,
    pub cpu_s_per_million: Option<f64>,
    /// Of it, the kernel's: system calls, and the network stack's work they do.
    pub kernel_cpu_s_per_million: Option<f64>,
    /// Requests per second of proxy CPU: throughput per proxy core.
    pub rps_per_core: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    pub vs_direct: Option<f64>,
    /// Throughput per proxy core relative to HAProxy's.
    pub per_core_vs_haproxy: Option<f64>,
    /// Added p99 relative to HAProxy's.
    pub added_p99_vs_haproxy: Option<f64>,
    /// The same, slice by slice of the latency runs (each slice's added p99 against
    /// HAProxy's slice taken beside it): what the host's slow phases, which fall on some
    /// slices and not others, move less than the pooled one.
    pub added_p99_vs_haproxy_by_slice: Option<Spread>,
    /// The proxy's system calls per request, from a run of their own (`perf stat`).
    pub syscalls_per_request: Option<f64>,
    /// In the same run, how often per request one of the proxy's threads woke another of
    /// its own (or itself).
    pub own_wakeups_per_request: Option<f64>,
    pub errors: u64,
    pub samples: Vec<Sample>,
}

/// The median (the mean of the middle two for an even count; NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A latency quantile of one path: from its rounds' calls pooled (a tail from 3 rounds of
/// a second each moves by a third between rounds on this VM, so the median of the rounds'
/// own p99 swung a comparison by ±1× from run to run), or, for results without their
/// histograms, the median of the rounds' own (`own`).
fn latency(samples: &[Sample], q: f64, own: fn(&LoadResult) -> f64) -> f64 {
    let runs: Vec<&LoadResult> = samples
        .iter()
        .map(|s| s.latency.as_ref().unwrap_or(&s.load))
        .collect();
    if !runs.is_empty() && runs.iter().all(|r| !r.calls_us.is_empty()) {
        crate::pooled_quantile(runs.iter().map(|r| &r.calls_us[..]), q)
    } else {
        median(runs.into_iter().map(own).collect())
    }
}

impl Row {
    pub fn from_samples(path: &str, mut samples: Vec<Sample>) -> Self {
        let (p50_us, p99_us, p999_us) = (
            latency(&samples, 0.5, |r| r.p50_us),
            latency(&samples, 0.99, |r| r.p99_us),
            latency(&samples, 0.999, |r| r.p999_us),
        );
        // The histograms are pooled; the JSON report keeps each round's own percentiles.
        for s in &mut samples {
            s.load.calls_us = Vec::new();
            if let Some(l) = &mut s.latency {
                l.calls_us = Vec::new();
            }
        }
        let m = |f: &dyn Fn(&Sample) -> Option<f64>| {
            let v: Vec<f64> = samples.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| median(v))
        };
        Self {
            path: path.to_owned(),
            rps: m(&|s| Some(s.load.rps)).unwrap_or(f64::NAN),
            p50_us,
            p99_us,
            p999_us,
            connect_p50_us: m(&|s| s.load.connect_p50_us),
            connect_p99_us: m(&|s| s.load.connect_p99_us),
            added_p99_us: None,
            cpu_s_per_million: m(&|s| s.proxy_cpu_s.map(|c| c / s.load.total.max(1) as f64 * 1e6)),
            kernel_cpu_s_per_million: m(&|s| {
                s.proxy_kernel_cpu_s
                    .map(|c| c / s.load.total.max(1) as f64 * 1e6)
            }),
            rps_per_core: m(&|s| s.proxy_cpu_s.map(|c| s.load.total as f64 / c.max(0.01))),
            peak_rss_mib: samples
                .iter()
                .filter_map(|s| s.proxy_peak_rss_kib)
                .max()
                .map(|k| k as f64 / 1024.0),
            vs_direct: None,
            per_core_vs_haproxy: None,
            added_p99_vs_haproxy: None,
            added_p99_vs_haproxy_by_slice: None,
            syscalls_per_request: None,
            own_wakeups_per_request: None,
            errors: samples.iter().map(|s| s.load.errors).sum(),
            samples,
        }
    }
}

/// A comparison: paths measured interleaved under the same load.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    pub name: String,
    pub rows: Vec<Row>,
}

impl Group {
    /// Fills in the ratios to the direct path and to HAProxy.
    pub fn new(name: &str, mut rows: Vec<Row>) -> Self {
        let find = |rows: &[Row], path: &str| rows.iter().find(|r| r.path == path).cloned();
        let direct = find(&rows, DIRECT);
        let haproxy = find(&rows, HAPROXY);
        for r in &mut rows {
            if let Some(d) = &direct {
                r.vs_direct = Some(r.rps / d.rps);
                r.added_p99_us = Some(r.p99_us - d.p99_us);
            }
            if let (Some(h), Some(per_core)) = (&haproxy, r.rps_per_core) {
                r.per_core_vs_haproxy = h.rps_per_core.map(|hp| per_core / hp);
            }
        }
        let haproxy_added = rows
            .iter()
            .find(|r| r.path == HAPROXY)
            .and_then(|r| r.added_p99_us);
        let slices = |r: &Row| -> Vec<f64> {
            r.samples
                .iter()
                .flat_map(|s| s.latency_slices_p99_us.iter().copied())
                .collect()
        };
        let (direct_slices, haproxy_slices) = (
            direct.as_ref().map(slices).unwrap_or_default(),
            haproxy.as_ref().map(slices).unwrap_or_default(),
        );
        for r in &mut rows {
            if let (Some(own), Some(h)) = (r.added_p99_us, haproxy_added)
                && h > 0.0
            {
                r.added_p99_vs_haproxy = Some(own / h);
            }
            let own = slices(r);
            if own.len() == direct_slices.len() && own.len() == haproxy_slices.len() {
                // A slice where HAProxy added nothing over the direct path has no ratio.
                let ratios = own
                    .iter()
                    .zip(&direct_slices)
                    .zip(&haproxy_slices)
                    .filter(|((_, d), h)| *h > *d)
                    .map(|((o, d), h)| (o - d) / (h - d))
                    .collect();
                r.added_p99_vs_haproxy_by_slice = Spread::of(ratios);
            }
        }
        Self {
            name: name.to_owned(),
            rows,
        }
    }

    fn row(&self, path: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.path == path)
    }
}

/// The machine the numbers come from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
}

impl Machine {
    fn this() -> Self {
        let sh = |cmd: &str, args: &[&str]| {
            Command::new(cmd)
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_default();
        Self {
            date: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            kernel: sh("uname", &["-r"]),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// A million calls with distinct method names, and the metrics page around them.
#[derive(Clone, Debug, Serialize)]
pub struct MethodNames {
    pub calls: u64,
    pub page_bytes_before: usize,
    pub page_bytes_after: usize,
}

/// Endpoint churn from the control plane while Thrift calls run (1,000 clusters / 10,000
/// endpoints, eBPF capture).
#[derive(Clone, Debug, Serialize)]
pub struct XdsUpdates {
    /// EDS responses applied while the churned calls ran.
    pub applies_during_calls: u64,
    pub apply_p50_ms: f64,
    pub apply_p99_ms: f64,
    /// Thrift calls' p99 with no pushes, with 100 a second going to another tern (from
    /// another control plane), and with 100 a second to the measured tern: each over the
    /// calls of all its interleaved rounds, pooled; and each round's own.
    pub quiet_p99_us: f64,
    pub baseline_p99_us: f64,
    pub churn_p99_us: f64,
    pub quiet_rounds_us: Vec<f64>,
    pub baseline_rounds_us: Vec<f64>,
    pub churn_rounds_us: Vec<f64>,
    pub churn_errors: u64,
    /// The measured tern's control-thread CPU per push (decoding, applying, freeing), beyond
    /// its quiet run's.
    pub tern_cpu_us_per_push: f64,
    /// The pushing control plane's CPU over the run, in cores.
    pub control_plane_cpu_share_baseline: f64,
    pub control_plane_cpu_share_churn: f64,
    pub peak_rss_mib_with_capture: f64,
    pub rss_mib_with_capture: f64,
}

/// Connection setup with mutual TLS, terminated by one proxy.
#[derive(Clone, Debug, Serialize)]
pub struct MtlsSetup {
    pub handshakes_per_s: f64,
    pub proxy_cpu_s: f64,
    /// Handshakes per CPU second of the proxy.
    pub handshakes_per_core: f64,
}

/// Thrift calls through two sidecars.
#[derive(Clone, Debug, Serialize)]
pub struct MtlsPath {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CPU seconds per million calls, client-side and server-side tern.
    pub client_cpu_s_per_m: f64,
    pub server_cpu_s_per_m: f64,
}

/// What mutual TLS costs (`bench/src/bin/bench/mtls.rs`).
#[derive(Clone, Debug, Serialize)]
pub struct MtlsBench {
    pub tern: MtlsSetup,
    pub haproxy: MtlsSetup,
    pub thrift_mtls: MtlsPath,
    pub thrift_plaintext: MtlsPath,
    /// mTLS handshakes the client-side tern made for all the calls (pooled connections).
    pub pooled_handshakes: f64,
}

/// What `tern discovery` costs at fleet size (`bench/src/bin/bench/discovery.rs`).
#[derive(Clone, Debug, Serialize)]
pub struct DiscoveryBench {
    pub services: usize,
    pub endpoints: usize,
    pub clients: usize,
    pub changes: usize,
    /// From a registry change to the last client's ACK of it.
    pub change_to_all_acked_p50_ms: f64,
    pub change_to_all_acked_p99_ms: f64,
    /// The server's CPU time per change (reading, generating, sending to every client).
    pub cpu_ms_per_change: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

/// Everything `cargo xtask bench` measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub groups: Vec<Group>,
    pub method_names: MethodNames,
    /// tern's resident memory, idle, with 1,000 clusters / 10,000 endpoints (MiB).
    pub idle_rss_mib_1000_clusters: f64,
    pub xds_updates: XdsUpdates,
    pub mtls: Option<MtlsBench>,
    pub discovery: Option<DiscoveryBench>,
    /// Micro-benchmarks: criterion means (ns) and allocations per proxied request.
    pub micro: BTreeMap<String, f64>,
    pub duration_secs: f64,
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), num)
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |r| format!("{r:.2}×"))
}

fn spread(v: Option<Spread>) -> String {
    v.map_or_else(
        || "–".into(),
        |s| format!("{:.2}× ({:.2}–{:.2})", s.median, s.low, s.high),
    )
}

/// One line of the targets table: what, what was measured, and whether it was met (`None`:
/// reported, no goal).
struct Target {
    what: String,
    measured: String,
    met: Option<bool>,
}

/// The targets table's lines, in order.
#[derive(Default)]
struct Targets(Vec<Target>);

impl Targets {
    fn line(&mut self, what: String, measured: String, met: Option<bool>) {
        self.0.push(Target {
            what,
            measured,
            met,
        });
    }
}

impl Report {
    pub fn new(
        groups: Vec<Group>,
        method_names: MethodNames,
        idle_rss_mib_1000_clusters: f64,
        xds_updates: XdsUpdates,
        mtls: Option<MtlsBench>,
        micro: BTreeMap<String, f64>,
        took: Duration,
    ) -> Self {
        Self {
            machine: Machine::this(),
            groups,
            method_names,
            idle_rss_mib_1000_clusters,
            xds_updates,
            mtls,
            discovery: None,
            micro,
            duration_secs: took.as_secs_f64(),
        }
    }

    /// With tern discovery's measurements.
    pub fn with_discovery(mut self, discovery: DiscoveryBench) -> Self {
        self.discovery = Some(discovery);
        self
    }

    /// Writes `report.json`, `report.md` and `report.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
        };
        write("report.json", serde_json::to_string_pretty(self)?)?;
        write("report.md", self.markdown())?;
        write("report.svg", self.svg())
    }

    /// The tables, the targets, and the machine.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = format!(
            "Measured by `cargo xtask bench` on {} — {} ({} cores), Linux {}; {} rounds per path, \
             interleaved, medians; the whole bench took {:.0} s. Throughput: 4 connections with \
             8 calls in flight each (2 for 64 KiB), or 32 synchronous clients with one call in \
             flight each where the group says so; latency: one call at a time on one connection, \
             in slices of 1 s that take turns across the paths, {} a round, percentiles over \
             every slice's calls pooled, and the added p99 also compared slice by slice with \
             HAProxy's slice beside it (median and range; the target counts as met when both \
             are); \
             CPU (user and kernel, and the kernel's part alone) and peak RSS: the proxy process's \
             own accounting (`/proc/PID/stat`, `VmHWM`); \
             system calls per request: `perf stat` on `raw_syscalls:sys_enter` over a run of \
             their own.\n\n",
            m.date,
            m.cpu,
            m.cores,
            m.kernel,
            self.groups
                .first()
                .and_then(|g| g.rows.first())
                .map_or(0, |r| r.samples.len()),
            self.duration_secs,
            self.groups
                .first()
                .and_then(|g| g.rows.first()?.samples.first())
                .map_or(0, |s| s.latency_slices_p99_us.len())
        );
        for g in &self.groups {
            let churn = g.rows.iter().any(|r| r.connect_p50_us.is_some());
            s += &format!("**{}**\n\n", g.name);
            if churn {
                s += "| path | conn/s | connect p50 µs | connect p99 µs | call p50 µs | call p99 µs | proxy CPU s per M conns | proxy peak RSS MiB | vs direct |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
                for r in &g.rows {
                    s += &format!(
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                        r.path,
                        num(r.rps),
                        opt(r.connect_p50_us),
                        opt(r.connect_p99_us),
                        num(r.p50_us),
                        num(r.p99_us),
                        opt(r.cpu_s_per_million),
                        opt(r.peak_rss_mib),
                        ratio(r.vs_direct)
                    );
                }
            } else {
                s += "| path | req/s | p50 µs | p99 µs | p99.9 µs | added p99 µs | proxy CPU s per M req | of it in the kernel | req/s per proxy core | system calls per req | proxy peak RSS MiB | vs direct | per core vs HAProxy | added p99 vs HAProxy | the same, slice by slice: median (range) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
                for r in &g.rows {
                    s += &format!(
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                        r.path,
                        num(r.rps),
                        num(r.p50_us),
                        num(r.p99_us),
                        num(r.p999_us),
                        opt(r.added_p99_us),
                        opt(r.cpu_s_per_million),
                        opt(r.kernel_cpu_s_per_million),
                        opt(r.rps_per_core),
                        opt(r.syscalls_per_request),
                        opt(r.peak_rss_mib),
                        ratio(r.vs_direct),
                        ratio(r.per_core_vs_haproxy),
                        ratio(r.added_p99_vs_haproxy),
                        spread(r.added_p99_vs_haproxy_by_slice)
                    );
                }
            }
            s += "\n";
        }
        if !self.micro.is_empty() {
            s += "**Micro-benchmarks** (criterion, mean; allocations counted per proxied request)\n\n| benchmark | value |\n|---|---:|\n";
            for (name, v) in &self.micro {
                let unit = if name.starts_with("allocations") || name.starts_with("xds/") {
                    ""
                } else {
                    " ns"
                };
                let value = if *v < 0.1 { format!("{v:.3}") } else { num(*v) };
                s += &format!("| {name} | {value}{unit} |\n");
            }
            s += "\n";
        }
        s += &self.targets();
        s
    }

    /// The issue's targets, with what was measured against each.
    fn targets(&self) -> String {
        let mut t = Targets::default();
        self.path_targets(&mut t);
        self.resource_targets(&mut t);
        self.control_targets(&mut t);
        let mut s =
            "**Targets** (reported, not enforced)\n\n| target | measured | met |\n|---|---|---|\n"
                .to_owned();
        for Target {
            what,
            measured,
            met,
        } in t.0
        {
            let mark = match met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "–",
            };
            s += &format!("| {what} | {measured} | {mark} |\n");
        }
        s + "\n"
    }

    /// The data paths': throughput per core, added latency, wakeups, relays, connection setup.
    fn path_targets(&self, out: &mut Targets) {
        let thrift_paths = [
            "tern Thrift, per request",
            "tern Thrift, per request, multiplexed",
        ];
        for (g, path) in self
            .groups
            .iter()
            .filter(|g| g.name.ends_with("100 B"))
            .flat_map(|g| thrift_paths.iter().map(move |p| (g, *p)))
        {
            if let Some(r) = g.row(path) {
                let mode = if path.ends_with("multiplexed") {
                    ", multiplexed"
                } else {
                    ""
                };
                // With synchronous clients every proxy makes a system call per request.
                let goal = if g.name.contains("sync clients") {
                    1.0
                } else {
                    0.8
                };
                // What is left when tern misses: its kernel time alone against all of HAProxy's.
                let kernel = g.row(HAPROXY).and_then(|h| {
                    Some(format!(
                        " (tern's kernel time {:.1} µs per request, HAProxy's user and kernel time {:.1})",
                        r.kernel_cpu_s_per_million?,
                        h.cpu_s_per_million?
                    ))
                });
                out.line(
                    format!(
                        "Thrift per request{mode} ≥ {:.0}% of HAProxy's req/s per proxy core ({})",
                        goal * 100.0,
                        g.name
                    ),
                    format!(
                        "{}{}",
                        ratio(r.per_core_vs_haproxy),
                        kernel.unwrap_or_default()
                    ),
                    r.per_core_vs_haproxy.map(|v| v >= goal),
                );
                // Met when both the pooled ratio and the median slice by slice are.
                let by_slice = r.added_p99_vs_haproxy_by_slice;
                out.line(
                    format!(
                        "Thrift per request{mode}: added p99 ≤ 1.5× HAProxy's ({})",
                        g.name
                    ),
                    match by_slice {
                        Some(_) => format!(
                            "{} pooled; slice by slice {}",
                            ratio(r.added_p99_vs_haproxy),
                            spread(by_slice)
                        ),
                        None => ratio(r.added_p99_vs_haproxy),
                    },
                    r.added_p99_vs_haproxy
                        .map(|v| v <= 1.5 && by_slice.is_none_or(|b| b.median <= 1.5)),
                );
            }
        }
        // A request is read, balanced, sent, answered and written on one worker thread: what
        // wakes another of tern's threads (or the same one) is off the request's path. Met at
        // no more than one such wakeup per 1,000 requests on every tern path.
        for g in self.groups.iter().filter(|g| g.name.ends_with("100 B")) {
            let per_1000 = |r: &Row| r.own_wakeups_per_request.map(|w| w * 1000.0);
            let tern: Vec<(&str, f64)> = g
                .rows
                .iter()
                .filter(|r| r.path.starts_with("tern"))
                .filter_map(|r| Some((r.path.as_str(), per_1000(r)?)))
                .collect();
            if tern.is_empty() {
                continue;
            }
            let mut measured: Vec<String> = tern
                .iter()
                .map(|(path, n)| format!("{path} {}", num(*n)))
                .collect();
            if let Some(h) = g.row(HAPROXY).and_then(per_1000) {
                measured.push(format!("(HAProxy's among its own threads: {})", num(h)));
            }
            out.line(
                format!(
                    "no wakeup of another tern thread on a request's path: wakeups among tern's \
                     own threads per 1,000 requests ≤ 1 ({})",
                    g.name
                ),
                measured.join(", "),
                Some(tern.iter().all(|(_, n)| *n <= 1.0)),
            );
        }
        if let Some(g) = self
            .groups
            .iter()
            .find(|g| g.name.starts_with("serial Thrift server"))
            && let (Some(d), Some(t)) = (g.row(DIRECT), g.row("tern Thrift, per request"))
        {
            out.line(
                "serial Thrift server: fast callers' p99 beside slow ones, tern vs direct".into(),
                format!(
                    "{} vs {} µs ({})",
                    num(t.p99_us),
                    num(d.p99_us),
                    ratio(Some(t.p99_us / d.p99_us))
                ),
                None,
            );
        }
        for g in self
            .groups
            .iter()
            .filter(|g| g.name.starts_with("connection setup"))
        {
            if let (Some(e), Some(i)) =
                (g.row("tern, eBPF capture"), g.row("tern, iptables capture"))
            {
                out.line(
                    format!(
                        "eBPF connection setup ≥ iptables REDIRECT ({})",
                        g.name.trim_start_matches("connection setup, ")
                    ),
                    format!(
                        "{} vs {} conn/s ({:.2}×); connect p50 {} vs {} µs",
                        num(e.rps),
                        num(i.rps),
                        e.rps / i.rps,
                        opt(e.connect_p50_us),
                        opt(i.connect_p50_us)
                    ),
                    Some(e.rps >= i.rps),
                );
            }
        }
        let large = self.groups.iter().find(|g| g.name == "netns, 64 KiB");
        if let Some(r) = large.and_then(|g| g.row("tern TCP proxy")) {
            // Against HAProxy splicing too (not its default), as tern does.
            let spliced = large
                .and_then(|g| g.row(HAPROXY_SPLICE))
                .and_then(|h| Some(r.rps_per_core? / h.rps_per_core?));
            out.line(
                "TCP relay at 64 KiB ≥ HAProxy's req/s per proxy core".into(),
                format!(
                    "{} (HAProxy splicing: {})",
                    ratio(r.per_core_vs_haproxy),
                    ratio(spliced)
                ),
                r.per_core_vs_haproxy.map(|v| v >= 1.0),
            );
        }
    }

    /// What tern costs at rest and per request: memory, allocations, decoding, metrics.
    fn resource_targets(&self, out: &mut Targets) {
        let pieces = |label: &str| {
            self.micro
                .get(&format!("codec-unframed-16MiB/{label}"))
                .copied()
        };
        if let (Some(whole), Some(reads)) = (pieces("whole"), pieces("1460-byte reads")) {
            out.line(
                "unframed 16 MiB in 1,460-byte reads costs about as much as in one piece".into(),
                format!(
                    "{:.1} ms vs {:.1} ms ({})",
                    reads / 1e6,
                    whole / 1e6,
                    ratio(Some(reads / whole))
                ),
                Some(reads / whole < 2.0),
            );
        }
        let n = &self.method_names;
        out.line(
            format!(
                "{} distinct method names leave the metrics page bounded",
                n.calls
            ),
            format!("{} → {} bytes", n.page_bytes_before, n.page_bytes_after),
            Some(n.page_bytes_after < n.page_bytes_before + 4096),
        );
        if let Some(a) = self.micro.get("allocations per proxied request") {
            out.line(
                "zero heap allocations per request (steady state)".into(),
                format!("{a:.3}"),
                Some(*a < 0.01),
            );
        }
        out.line(
            "idle RSS ≤ 20 MiB with 1,000 clusters / 10,000 endpoints".into(),
            format!("{:.1} MiB", self.idle_rss_mib_1000_clusters),
            Some(self.idle_rss_mib_1000_clusters <= 20.0),
        );
    }

    /// The control path's: xDS applies and churn, mTLS, tern discovery.
    fn control_targets(&self, out: &mut Targets) {
        let x = &self.xds_updates;
        out.line(
            "with eBPF capture and 1,000 clusters, after the churn: memory now / peak".into(),
            format!(
                "{:.1} / {:.1} MiB",
                x.rss_mib_with_capture, x.peak_rss_mib_with_capture
            ),
            None,
        );
        if let Some(ms) = self
            .micro
            .get("xds/one endpoint change, 10,000-endpoint cluster, median ms")
        {
            out.line(
                "one endpoint change in a 10,000-endpoint cluster (in-process apply)".into(),
                format!("{} ms", num(*ms)),
                None,
            );
        }
        let schedules: Vec<String> = [2000, 4000, 8000]
            .iter()
            .filter_map(|n| {
                self.micro
                    .get(&format!(
                        "xds/parse and two applies, {n} weighted round-robin endpoints, s"
                    ))
                    .map(|s| format!("{n}: {:.3} s", s))
            })
            .collect();
        if !schedules.is_empty() {
            out.line(
                "parse and two applies of one round-robin cluster, linear (was 0.63 / 2.06 / 7.58 s)"
                    .into(),
                schedules.join(", "),
                None,
            );
        }
        out.line(
            "one EDS change pushed 100×/s to 1,000 clusters: apply p50 / p99".into(),
            format!(
                "{} / {} ms over {} applies",
                num(x.apply_p50_ms),
                num(x.apply_p99_ms),
                x.applies_during_calls
            ),
            None,
        );
        let rounds = |v: &[f64]| v.iter().map(|&p| num(p)).collect::<Vec<_>>().join(" / ");
        out.line(
            "Thrift p99 during 100 EDS pushes/s ≤ 1.25× its p99 with no pushes (interleaved rounds, calls pooled)".into(),
            format!(
                "{} vs {} µs ({}), {} errors; rounds: {} vs {} µs",
                num(x.churn_p99_us),
                num(x.quiet_p99_us),
                ratio(Some(x.churn_p99_us / x.quiet_p99_us)),
                x.churn_errors,
                rounds(&x.churn_rounds_us),
                rounds(&x.quiet_rounds_us),
            ),
            Some(x.churn_p99_us <= 1.25 * x.quiet_p99_us),
        );
        out.line(
            "… and ≤ 1.25× its p99 while the same pushes go to another tern".into(),
            format!(
                "{} vs {} µs ({}); rounds: {} µs",
                num(x.churn_p99_us),
                num(x.baseline_p99_us),
                ratio(Some(x.churn_p99_us / x.baseline_p99_us)),
                rounds(&x.baseline_rounds_us),
            ),
            Some(x.churn_p99_us <= 1.25 * x.baseline_p99_us),
        );
        out.line(
            "what the pushes cost: tern's CPU per push; the control plane's CPU (pushing to the measured tern / to the other)".into(),
            format!(
                "{} µs; {} / {} cores",
                num(x.tern_cpu_us_per_push),
                num(x.control_plane_cpu_share_churn),
                num(x.control_plane_cpu_share_baseline)
            ),
            None,
        );
        if let Some(t) = &self.mtls {
            out.line(
                "mTLS connection setup (full handshakes, client certificate): tern vs HAProxy, per proxy core".into(),
                format!(
                    "{} vs {} handshakes per core ({}); {} vs {} per s",
                    num(t.tern.handshakes_per_core),
                    num(t.haproxy.handshakes_per_core),
                    ratio(Some(t.tern.handshakes_per_core / t.haproxy.handshakes_per_core)),
                    num(t.tern.handshakes_per_s),
                    num(t.haproxy.handshakes_per_s)
                ),
                None,
            );
            let (m, p) = (&t.thrift_mtls, &t.thrift_plaintext);
            out.line(
                "Thrift through two sidecars, pooled mTLS vs plaintext: req/s, p99, CPU s per M calls (client + server tern)".into(),
                format!(
                    "{} vs {} req/s; {} vs {} µs; {} + {} vs {} + {} s; {} handshakes for all calls",
                    num(m.rps),
                    num(p.rps),
                    num(m.p99_us),
                    num(p.p99_us),
                    num(m.client_cpu_s_per_m),
                    num(m.server_cpu_s_per_m),
                    num(p.client_cpu_s_per_m),
                    num(p.server_cpu_s_per_m),
                    num(t.pooled_handshakes)
                ),
                None,
            );
        }
        if let Some(d) = &self.discovery {
            out.line(
                format!(
                    "tern discovery, {} services / {} endpoints, {} delta clients: registry change to every client's ACK (goal p99 < 100 ms)",
                    d.services, d.endpoints, d.clients
                ),
                format!(
                    "p50 {} ms, p99 {} ms over {} changes; {} ms CPU per change",
                    num(d.change_to_all_acked_p50_ms),
                    num(d.change_to_all_acked_p99_ms),
                    d.changes,
                    num(d.cpu_ms_per_change)
                ),
                Some(d.change_to_all_acked_p99_ms < 100.0),
            );
            out.line(
                "tern discovery's resident memory, same load (goal < 64 MiB)".into(),
                format!("{} MiB (peak {})", num(d.rss_mib), num(d.peak_rss_mib)),
                Some(d.peak_rss_mib < 64.0),
            );
        }
    }

    /// Horizontal bars of throughput per path, one panel per comparison.
    pub fn svg(&self) -> String {
        const BAR_H: usize = 18;
        const LABEL_W: usize = 190;
        const BAR_W: usize = 460;
        let mut body = String::new();
        let mut y = 30;
        for g in &self.groups {
            body += &format!(
                "<text x=\"10\" y=\"{}\" font-weight=\"bold\">{}</text>\n",
                y + 14,
                escape(&g.name)
            );
            y += 22;
            let max = g.rows.iter().map(|r| r.rps).fold(1.0, f64::max);
            let unit = if g.rows.iter().any(|r| r.connect_p50_us.is_some()) {
                "conn/s"
            } else {
                "req/s"
            };
            for r in &g.rows {
                let w = (r.rps / max * BAR_W as f64).max(1.0) as usize;
                let color = if r.path.starts_with("tern") {
                    "#2b7bb9"
                } else {
                    "#9aa5b1"
                };
                body += &format!(
                    "<text x=\"10\" y=\"{}\">{}</text><rect x=\"{LABEL_W}\" y=\"{y}\" width=\"{w}\" height=\"{}\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{} {unit}, p99 {} µs</text>\n",
                    y + 13,
                    escape(&r.path),
                    BAR_H - 4,
                    LABEL_W + w + 6,
                    y + 13,
                    num(r.rps),
                    num(r.p99_us)
                );
                y += BAR_H;
            }
            y += 12;
        }
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"900\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"18\" font-size=\"14\" font-weight=\"bold\">tern benchmarks — {} ({} cores)</text>\n{body}</svg>\n",
            y + 10,
            escape(&self.machine.date),
            self.machine.cores
        )
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rps: f64, p99: f64, cpu: Option<f64>) -> Sample {
        Sample {
            load: LoadResult {
                requests: rps as u64 * 2,
                total: rps as u64 * 2,
                rps,
                p99_us: p99,
                ..LoadResult::default()
            },
            latency: None,
            proxy_cpu_s: cpu,
            proxy_kernel_cpu_s: cpu.map(|c| c * 0.8),
            proxy_peak_rss_kib: cpu.map(|_| 10 * 1024),
            latency_slices_p99_us: Vec::new(),
        }
    }

    #[test]
    fn latency_percentiles_pool_the_rounds_calls() {
        let round = |calls_us: Vec<(u64, u64)>| Sample {
            latency: Some(LoadResult {
                p99_us: 1.0,
                calls_us,
                ..LoadResult::default()
            }),
            ..sample(100.0, 1.0, None)
        };
        // 300 calls: 297 at 50 µs or less and 3 at 900 µs, all in one round. Each round's own
        // p99 (the median of 1, 1, 1) would miss them.
        let row = Row::from_samples(
            "tern",
            vec![
                round(vec![(40, 100)]),
                round(vec![(50, 97), (900, 3)]),
                round(vec![(45, 100)]),
            ],
        );
        assert_eq!((row.p50_us, row.p99_us, row.p999_us), (45.0, 50.0, 900.0));
        assert!(
            row.samples
                .iter()
                .all(|s| s.latency.as_ref().unwrap().calls_us.is_empty()),
            "the report keeps no histograms"
        );
        // Results without histograms: the median of the rounds' own.
        let row = Row::from_samples("tern", vec![sample(1.0, 7.0, None); 3]);
        assert_eq!(row.p99_us, 7.0);
    }

    /// A report of `groups`, with the other parts' numbers made up.
    fn report(groups: Vec<Group>) -> Report {
        let names = MethodNames {
            calls: 1_000_000,
            page_bytes_before: 5000,
            page_bytes_after: 5010,
        };
        let xds = XdsUpdates {
            applies_during_calls: 400,
            apply_p50_ms: 1.0,
            apply_p99_ms: 3.0,
            quiet_p99_us: 100.0,
            baseline_p99_us: 120.0,
            churn_p99_us: 150.0,
            quiet_rounds_us: vec![90.0, 100.0, 110.0],
            baseline_rounds_us: vec![120.0; 3],
            churn_rounds_us: vec![150.0; 3],
            churn_errors: 0,
            tern_cpu_us_per_push: 900.0,
            control_plane_cpu_share_baseline: 0.2,
            control_plane_cpu_share_churn: 0.2,
            peak_rss_mib_with_capture: 30.0,
            rss_mib_with_capture: 25.0,
        };
        Report::new(
            groups,
            names,
            12.0,
            xds,
            None,
            BTreeMap::new(),
            Duration::from_secs(1),
        )
    }

    #[test]
    fn ratios_compare_medians_with_direct_and_haproxy() {
        let rows = vec![
            Row::from_samples(DIRECT, vec![sample(1000.0, 100.0, None); 3]),
            Row::from_samples(HAPROXY, vec![sample(500.0, 300.0, Some(1.0)); 3]),
            Row::from_samples(
                "tern",
                vec![
                    sample(400.0, 400.0, Some(1.0)),
                    sample(450.0, 500.0, Some(1.0)),
                    sample(9000.0, 900.0, Some(1.0)),
                ],
            ),
        ];
        let g = Group::new("g", rows);
        let tern = g.row("tern").unwrap();
        assert_eq!(tern.rps, 450.0, "the median, not the mean");
        assert_eq!(tern.vs_direct, Some(0.45));
        assert_eq!(tern.added_p99_us, Some(400.0));
        // HAProxy adds 200 µs; tern 400 µs.
        assert_eq!(tern.added_p99_vs_haproxy, Some(2.0));
        // 900 requests per CPU second against HAProxy's 1000.
        assert_eq!(tern.rps_per_core, Some(900.0));
        assert_eq!(tern.per_core_vs_haproxy, Some(0.9));
        let md = report(vec![g]).markdown();
        assert!(md.contains("3 rounds per path"), "{md}");
        assert!(md.contains("the whole bench took 1 s"), "{md}");
        assert!(md.contains("| tern | 450 |"), "{md}");
        assert!(md.contains("150 vs 100 µs (1.50×)"), "{md}");
    }

    #[test]
    fn wakeups_among_terns_threads_are_a_target_per_group() {
        let row = |path: &str, wakeups: f64| Row {
            own_wakeups_per_request: Some(wakeups),
            ..Row::from_samples(path, vec![sample(100.0, 1.0, Some(1.0))])
        };
        let line = |tcp: f64| {
            let g = Group::new(
                "loopback, 100 B",
                vec![
                    Row::from_samples(DIRECT, vec![sample(100.0, 1.0, None)]),
                    row(HAPROXY, 0.02),
                    row("tern TCP proxy", tcp),
                    row("tern Thrift, per request", 0.0005),
                ],
            );
            let md = report(vec![g]).markdown();
            md.lines()
                .find(|l| l.starts_with("| no wakeup of another tern thread"))
                .map(str::to_owned)
                .unwrap_or_else(|| panic!("{md}"))
        };
        assert!(
            line(0.001).ends_with(
                "(loopback, 100 B) | tern TCP proxy 1.00, tern Thrift, per request 0.50, \
                 (HAProxy's among its own threads: 20.0) | yes |"
            ),
            "{}",
            line(0.001)
        );
        assert!(line(0.0011).ends_with("| no |"), "{}", line(0.0011));
    }

    #[test]
    fn added_p99_compares_slice_by_slice_too() {
        let sliced = |p99s: &[f64]| Sample {
            latency_slices_p99_us: p99s.to_vec(),
            ..sample(100.0, 1.0, Some(1.0))
        };
        let row = |path, rounds: [&[f64]; 2]| {
            Row::from_samples(path, rounds.iter().map(|r| sliced(r)).collect())
        };
        // A slow phase falls on HAProxy's third slice and tern's fifth (the two rounds'
        // slices run in turn: 1 2 3, then 4 5 6); elsewhere tern adds 1.2× what HAProxy adds.
        // In the fourth, HAProxy added nothing over the direct path: no ratio.
        let rows = vec![
            row(DIRECT, [&[100.0, 100.0, 100.0], &[100.0, 100.0, 100.0]]),
            row(HAPROXY, [&[200.0, 200.0, 900.0], &[100.0, 200.0, 200.0]]),
            row("tern", [&[220.0, 220.0, 220.0], &[150.0, 900.0, 220.0]]),
        ];
        let g = Group::new("g", rows);
        let tern = g.row("tern").unwrap();
        assert_eq!(
            tern.added_p99_vs_haproxy_by_slice,
            Some(Spread {
                median: 1.2,
                low: 0.15,
                high: 8.0
            })
        );
        let haproxy = g.row(HAPROXY).unwrap().added_p99_vs_haproxy_by_slice;
        assert_eq!(
            haproxy.map(|s| (s.median, s.low, s.high)),
            Some((1.0, 1.0, 1.0))
        );
        // Paths without slices (or a different number of them) get no ratio.
        let rows = vec![
            row(DIRECT, [&[100.0], &[100.0]]),
            row(HAPROXY, [&[200.0], &[200.0]]),
            row("tern", [&[220.0], &[]]),
        ];
        assert_eq!(
            Group::new("g", rows)
                .row("tern")
                .unwrap()
                .added_p99_vs_haproxy_by_slice,
            None
        );
    }
}
