//! tern's developer tasks.
//!
//! - `setup`: install what the build and the tests need on a fresh Debian machine, saying
//!   what it does: LLVM 22 and `bpf-linker` (for the eBPF object), nightly's `rust-src`
//!   (for `-Z build-std=core`), iproute2 and iptables (for the tests).
//! - `build-ebpf`: build the kernel programs; the `tern` crate embeds the object.
//! - `test`: setup, the eBPF build, fmt, the import-cycle check (`cycles`), clippy, and every
//!   test (unit and integration).
//! - `cycles`: fail on an import cycle between the `tern` crate's top-level modules.
//! - `bench`: release builds, criterion micro-benchmarks and tern against the direct path,
//!   HAProxy and iptables capture (`tern-bench`); writes `target/bench/report.{md,json,svg}`.
//! - `fuzz`: cargo-fuzz targets for the codec, the static configuration and xDS translation,
//!   each for a given time from the committed seed corpus (`test` runs each briefly).
//! - `dist`: the static `tern` binary (musl) that the `Containerfile` puts on an empty base.
//! - `demo`: a Thrift service in a mesh of network namespaces, tern as every Pod's sidecar
//!   (`tern-demo`, built with the test harness it uses).
#![forbid(unsafe_code)]
use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod cycles;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (idempotent).
    Setup,
    /// Build the eBPF object (nightly, bpfel-unknown-none, bpf-linker).
    BuildEbpf,
    /// Build the eBPF object and the `tern` binary.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run setup, the builds, fmt, clippy and every test.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Fail on an import cycle between the `tern` crate's top-level modules.
    Cycles,
    /// A Thrift service in a mesh of network namespaces with tern as every sidecar, then clean up.
    Demo,
    /// The static tern binary for the container image: target/dist/tern (x86_64 musl).
    Dist,
    /// Release builds, micro-benchmarks, then tern against the direct path, HAProxy and
    /// iptables capture; the report goes to target/bench/.
    Bench,
    /// Fuzz the codec and the configuration entry points (cargo-fuzz, libFuzzer, nightly),
    /// starting from the seed corpus in fuzz/corpus/; a crash fails with its input saved.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (authz_first_bytes, codec, codec_configured, first_bytes,
        /// static_config, xds_translate).
        targets: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup(),
        Task::BuildEbpf => build_ebpf(),
        Task::Build { release } => {
            setup()?;
            build_ebpf()?;
            build_tern(release)
        }
        Task::Test { args } => test(&args),
        Task::Bench => bench(),
        Task::Cycles => no_cycles(),
        Task::Dist => {
            setup()?;
            build_ebpf()?;
            dist()
        }
        Task::Fuzz { seconds, targets } => {
            setup()?;
            build_ebpf()?;
            fuzz(seconds, &targets)
        }
        Task::Demo => {
            setup()?;
            build_ebpf()?;
            build_tern(false)?;
            step("demo: target/debug/tern-demo");
            // Replaced by the demo, so Ctrl-C reaches it alone and it cleans up before the
            // shell prompt returns.
            use std::os::unix::process::CommandExt;
            let e = Command::new(root().join("target/debug/tern-demo")).exec();
            Err(e).context("run target/debug/tern-demo")
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_owned()
}

fn cargo_home_bin() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with cargo's bin directory in it (where `bpf-linker` is installed).
fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths = vec![cargo_home_bin()];
    if let Some(p) = env::var_os("PATH") {
        paths.extend(env::split_paths(&p));
    }
    env::join_paths(paths).expect("PATH entries are valid")
}

fn step(what: &str) {
    eprintln!("\x1b[1mxtask:\x1b[0m {what}");
}

fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("run {shown}"))?;
    if !st.success() {
        bail!("{shown} failed with {st}");
    }
    Ok(())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .env("PATH", path_with_cargo_bin())
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages the build or the tests need, by the program (or, with a `/`, the file)
/// that shows they are present.
const PACKAGES: [(&str, &str); 11] = [
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("haproxy", "haproxy"),
    // The bench counts system calls per request with `perf stat`.
    ("perf", "linux-perf"),
    ("runc", "runc"),
    ("musl-gcc", "musl-tools"),
    ("/usr/lib/llvm-22/bin/llvm-config", "llvm-22-dev"),
    // The registries tern discovery reads, run by its tests on loopback.
    ("etcd", "etcd-server"),
    ("/usr/share/java/zookeeper.jar", "zookeeperd"),
];

/// Runs `cmd` with its output kept, shown only when it fails.
fn quietly(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("run {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(shown_by, _)| {
            let present = if shown_by.starts_with('/') {
                Path::new(shown_by).is_file()
            } else {
                have(shown_by)
            };
            !present
        })
        .map(|(_, package)| *package)
        .collect();
    let all: Vec<&str> = PACKAGES.iter().map(|(_, p)| *p).collect();
    if missing.is_empty() {
        step(&format!(
            "setup: system packages present ({})",
            all.join(", ")
        ));
    } else {
        step(&format!(
            "setup: installing {} with apt-get",
            missing.join(" ")
        ));
        quietly(Command::new("apt-get").args(["update", "-qq"]))?;
        quietly(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        step(&format!("setup: installed {}", missing.join(" ")));
    }

    let rust_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("run rustup (is the Rust toolchain installed with rustup?)")?;
    if String::from_utf8_lossy(&rust_src.stdout).contains("rust-src") {
        step("setup: nightly rust-src present");
    } else {
        step("setup: adding the rust-src component to the nightly toolchain");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    for (module, package, why) in [
        (
            "thrift.transport.THeaderTransport",
            "thrift",
            "Python thrift (a second Thrift implementation, with THeader: the tests' peer)",
        ),
        (
            "envoy.config.listener.v3.listener_pb2",
            "xds-protos",
            "Python xds-protos (Envoy's protos: the tests turn Istio /config_dumps back into resources)",
        ),
        (
            "kubernetes_validate",
            "kubernetes-validate",
            "kubernetes-validate (Kubernetes' API schemas: the tests validate injected manifests)",
        ),
        (
            "kazoo.client",
            "kazoo",
            "Python kazoo (a ZooKeeper client: the tests' serverset members)",
        ),
        (
            "grpc_health.v1.health",
            "grpcio-health-checking",
            "Python grpcio-health-checking (gRPC's health service: the tests' gRPC-probed application)",
        ),
    ] {
        // A missing module is what this finds out: its traceback is not shown.
        let present = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if present {
            step(&format!("setup: {why} present"));
        } else {
            step(&format!("setup: installing {why} from PyPI"));
            quietly(Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--root-user-action=ignore",
                package,
            ]))?;
        }
    }

    if have("bpf-linker") {
        step("setup: bpf-linker present");
    } else {
        step("setup: building bpf-linker against LLVM 22 (about 3 minutes)");
        status(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
    }
    Ok(())
}

/// A cargo command free of the settings the outer `cargo run` put in the environment. Build
/// scripts rerun when variables such as `CARGO_MANIFEST_DIR` or `CARGO_PKG_NAME` change (ring's
/// do), so leaving xtask's values in place would rebuild them at every call.
fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    for (var, _) in env::vars_os() {
        let name = var.to_string_lossy();
        let inherited = name.starts_with("CARGO_") && name != "CARGO_HOME";
        if inherited
            || [
                "RUSTUP_TOOLCHAIN",
                "RUSTC",
                "RUSTDOC",
                "RUSTC_WRAPPER",
                "RUSTC_WORKSPACE_WRAPPER",
            ]
            .contains(&name.as_ref())
        {
            cmd.env_remove(&var);
        }
    }
    cmd.env("PATH", path_with_cargo_bin());
    cmd.current_dir(root());
    cmd
}

fn build_ebpf() -> Result<()> {
    step("build-ebpf: cargo +nightly build --release (bpfel-unknown-none, -Z build-std=core)");
    let root = root();
    status(
        cargo()
            .current_dir(root.join("ebpf/programs"))
            .args(["+nightly", "build", "--release", "--target-dir"])
            .arg(root.join("target/ebpf")),
    )
}

fn bench() -> Result<()> {
    setup()?;
    build_ebpf()?;
    // Binaries and benchmarks in one release build, so dependencies compile once (`cargo
    // bench` would build them again under its own profile).
    step("build: release binaries and the benchmarks (micro, alloc_per_request, xds_apply)");
    let built = cargo()
        .args(["build", "--release", "--workspace", "--bins"])
        .args([
            "--bench",
            "micro",
            "--bench",
            "alloc_per_request",
            "--bench",
            "xds_apply",
        ])
        .arg("--message-format=json-render-diagnostics")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run cargo build")?;
    if !built.status.success() {
        bail!("the release build failed");
    }
    let benches: Vec<PathBuf> = String::from_utf8_lossy(&built.stdout)
        .lines()
        .filter(|l| l.contains(r#""kind":["bench"]"#))
        .filter_map(|l| l.split(r#""executable":""#).nth(1)?.split('"').next())
        .map(PathBuf::from)
        .collect();
    let bench_named = |name: &str| {
        benches
            .iter()
            .find(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(&format!("{name}-")))
            })
            .cloned()
            .with_context(|| format!("cargo built no `{name}` benchmark"))
    };
    let out = root().join("target/bench");
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    step("bench: allocations per proxied request");
    status(
        Command::new(bench_named("alloc_per_request")?)
            .env("TERN_BENCH_OUT", out.join("alloc.json")),
    )?;
    step("bench: applying xDS updates (in-process)");
    status(
        Command::new(bench_named("xds_apply")?).env("TERN_BENCH_OUT", out.join("xds_apply.json")),
    )?;
    step("bench: micro-benchmarks (criterion: codec, router, balancer)");
    let criterion = root().join("target/criterion");
    status(
        Command::new(bench_named("micro")?)
            .args([
                "--bench",
                "--warm-up-time",
                "0.5",
                "--measurement-time",
                "1",
            ])
            .env("CRITERION_HOME", &criterion),
    )?;
    step("bench: direct, HAProxy, tern (TCP, Thrift), iptables and eBPF capture");
    status(
        Command::new(root().join("target/release/tern-bench"))
            .arg(&out)
            .arg(&criterion),
    )?;
    step(&format!(
        "bench: report in {}/report.{{md,json,svg}}",
        out.display()
    ));
    Ok(())
}

fn build_tern(release: bool) -> Result<()> {
    step("build: the tern binary and the test peers");
    // The whole workspace, so features unify as in `cargo test --workspace` and nothing
    // builds twice.
    let mut cmd = cargo();
    cmd.args(["build", "--workspace", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)
}

/// The musl target the image's static binary is built for.
const DIST_TARGET: &str = "x86_64-unknown-linux-musl";

fn dist() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("run rustup")?;
    if !String::from_utf8_lossy(&installed.stdout).contains(DIST_TARGET) {
        step(&format!("dist: adding the {DIST_TARGET} target"));
        status(Command::new("rustup").args(["target", "add", DIST_TARGET]))?;
    }
    step(&format!(
        "dist: cargo build --release --target {DIST_TARGET} -p tern"
    ));
    status(
        cargo()
            .args([
                "build",
                "--release",
                "--target",
                DIST_TARGET,
                "-p",
                "tern",
                "--bin",
                "tern",
            ])
            // ring's C and assembly, for musl.
            .env("CC_x86_64_unknown_linux_musl", "musl-gcc"),
    )?;
    let built = root().join("target").join(DIST_TARGET).join("release/tern");
    let out = root().join("target/dist");
    std::fs::create_dir_all(&out)?;
    let dest = out.join("tern");
    std::fs::copy(&built, &dest).with_context(|| format!("copy {}", built.display()))?;
    status(Command::new("strip").arg(&dest))?;
    // Static: no interpreter, so it runs on an empty base image.
    let elf = std::fs::read(&dest)?;
    if elf.windows(b"ld-linux".len()).any(|w| w == b"ld-linux") {
        bail!(
            "{} links against glibc's loader; it would not run on an empty base",
            dest.display()
        );
    }
    let size = std::fs::metadata(&dest)?.len();
    step(&format!(
        "dist: {} ({:.1} MiB, static); build the image with `docker build -f Containerfile .`",
        dest.display(),
        size as f64 / f64::from(1 << 20)
    ));
    Ok(())
}

/// The fuzz targets (`fuzz/fuzz_targets/*.rs`).
const FUZZ_TARGETS: [&str; 6] = [
    "authz_first_bytes",
    "codec",
    "codec_configured",
    "first_bytes",
    "static_config",
    "xds_translate",
];
/// cargo-fuzz flags: optimised, with debug assertions (overflow checks), no sanitizer (tern's
/// fuzzed code has no `unsafe`; ASan would only slow the runs).
const FUZZ_FLAGS: [&str; 4] = ["-O", "-a", "-s", "none"];

fn fuzz(seconds: u64, only: &[String]) -> Result<()> {
    if have("cargo-fuzz") {
        step("fuzz: cargo-fuzz present");
    } else {
        step("fuzz: installing cargo-fuzz from crates.io (about a minute)");
        status(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let dir = root().join("fuzz");
    step("fuzz: cargo +nightly fuzz build (the first build takes about 6 minutes)");
    status(
        cargo()
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "build"])
            .args(FUZZ_FLAGS),
    )?;
    let targets: Vec<&str> = FUZZ_TARGETS
        .into_iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == t))
        .collect();
    if targets.is_empty() {
        bail!("no fuzz target named {only:?}; there are {FUZZ_TARGETS:?}");
    }
    let mut summary = Vec::new();
    for target in targets {
        step(&format!("fuzz: {target} for {seconds} s"));
        // New inputs go to a working corpus under target/; the committed seeds stay as they are.
        let work = root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&work)?;
        let out = cargo()
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "run"])
            .args(FUZZ_FLAGS)
            .arg(target)
            .arg(&work)
            .arg(dir.join("corpus").join(target))
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-print_final_stats=1",
            ])
            .args(["-timeout=10", "-rss_limit_mb=4096", "-close_fd_mask=3"])
            .output()
            .with_context(|| format!("run the fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .map_or("?".to_owned(), |v| v.trim().to_owned())
        };
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {target} failed ({}); its input is under fuzz/artifacts/{target}/\n{}",
                out.status,
                tail.join("\n")
            );
        }
        summary.push(format!(
            "{target}: {} executions in {seconds} s, no crash (peak RSS {} MB)",
            stat("number_of_executed_units"),
            stat("peak_rss_mb")
        ));
    }
    for line in summary {
        step(&format!("fuzz: {line}"));
    }
    Ok(())
}

/// No top-level module of the `tern` crate reaches back to itself through its imports.
fn no_cycles() -> Result<()> {
    let edges = cycles::uses(&root().join("proxy/src"))?;
    let groups = cycles::cycles(&edges);
    if !groups.is_empty() {
        bail!(
            "import cycles between the tern crate's modules:\n{}",
            cycles::report(&edges, &groups)
        );
    }
    step(&format!(
        "test: no import cycle between the tern crate's modules ({} edges)",
        edges.len()
    ));
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    setup()?;
    build_ebpf()?;
    build_tern(false)?;
    step("test: cargo fmt --check (workspace and kernel programs)");
    status(cargo().args(["fmt", "--all", "--check"]))?;
    status(
        cargo()
            .current_dir(root().join("ebpf/programs"))
            .args(["+nightly", "fmt", "--check"]),
    )?;
    no_cycles()?;
    step("test: cargo clippy --all-targets -- -D warnings");
    status(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("test: cargo test --workspace (unit tests, then integration tests in network namespaces)");
    status(
        cargo()
            .args(["test", "--workspace"])
            .args(extra)
            .env("TERN_BIN", root().join("target/debug/tern")),
    )?;
    if extra.is_empty() {
        fuzz(15, &[])?;
    }
    Ok(())
}
