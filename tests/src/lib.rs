//! tern's integration test harness: network namespaces, veth links, cgroups, processes and
//! test peers, each a guard that removes what it made when dropped — also when a test fails.
//!
//! Processes run inside a namespace through `nsenter --net`, not `ip netns exec`: the latter
//! remounts `/sys`, which would hide the cgroup v2 mount and bpffs from tern. A process joins
//! its cgroup in a shell before `exec`, so every socket it creates belongs to that cgroup.
#![forbid(unsafe_code)]
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

pub mod discovery;
pub mod interrupt;
mod istiod;
pub mod mesh;
pub mod oci;
pub mod pki;
pub mod registry;
pub use istiod::Istiod;

/// The first statement of every test here: these tests need namespaces, cgroups and eBPF.
/// Not root, the test fails loudly, or, with `TERN_SKIP_ROOT_TESTS` set, says SKIPPED and
/// returns from the test (a function could only return from itself).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::may_run_as_root() {
            return;
        }
    };
}

/// Whether a test needing root may run: true as root; false (after saying SKIPPED) when not
/// root and `TERN_SKIP_ROOT_TESTS` is set; otherwise a panic that says what to do.
pub fn may_run_as_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("TERN_SKIP_ROOT_TESTS").is_some() {
        eprintln!("SKIPPED: tern's integration tests need root (TERN_SKIP_ROOT_TESTS is set)");
        return false;
    }
    panic!(
        "tern's integration tests need root (network namespaces, cgroups, eBPF); \
         run them as root (`cargo xtask test`), or set TERN_SKIP_ROOT_TESTS=1 to skip them"
    );
}

/// For helpers that make namespaces, and the bench: without root they cannot work, whatever
/// `TERN_SKIP_ROOT_TESTS` says (a test reaching one without root forgot [`require_root!`]).
pub fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this needs root (network namespaces, cgroups, eBPF); tests start with \
         `tern_tests::require_root!()`"
    );
}

/// Prints one event line and flushes it at once (the test control planes' event logs, which
/// tests read while the process runs).
pub fn say(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.as_ref());
    let _ = out.flush();
}

/// Calls `changed` each time the file at `path` changes (looked at every 100 ms), forever; for
/// the test control planes, whose tests rewrite their files.
pub async fn on_change(path: &str, mut changed: impl FnMut()) {
    let mut last = std::fs::read(path).ok();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = std::fs::read(path).ok();
        if now != last {
            last = now;
            changed();
        }
    }
}

/// A short name unique to this process and call, for namespaces and cgroups of parallel runs.
pub fn unique(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "tern-{}-{}{}",
        tag,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The directory holding the built binaries (`target/debug`), from the running executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let mut dir = exe.parent().expect("executable directory").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The `tern` binary under test: `TERN_BIN`, else the one built beside this executable.
pub fn tern_bin() -> PathBuf {
    let bin = std::env::var_os("TERN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("tern"));
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo xtask build` (or run `cargo xtask test`)",
        bin.display()
    );
    bin
}

pub fn testpeer_bin() -> PathBuf {
    bin_dir().join("tern-testpeer")
}

fn run(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("run {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// `bpftool -j ARGS…`, parsed (empty output is `null`).
pub fn bpftool(args: &[&str]) -> Result<serde_json::Value> {
    let out = run(Command::new("bpftool").arg("-j").args(args))
        .context("bpftool (installed by `cargo xtask setup`)")?;
    Ok(serde_json::from_slice(&out.stdout).unwrap_or_default())
}

/// BPF links bpftool sees attached to the network namespace with this inode (one that may be
/// gone already).
pub fn bpf_links_on_netns(ino: u64) -> Result<usize> {
    let links = bpftool(&["link", "show"])?;
    Ok(links
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|l| l["netns_ino"].as_u64() == Some(ino))
                .count()
        })
        .unwrap_or_default())
}

/// A network namespace with loopback up, deleted (with every process in it) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = unique(tag);
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, for `nsenter` and for `tern --netns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// A command that runs `program` in this namespace, in `cgroup` when given.
    pub fn command(&self, cgroup: Option<&Cgroup>, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"cg=$1; ns=$2; shift 2; if [ -n "$cg" ]; then echo $$ > "$cg/cgroup.procs" || exit 97; fi; exec nsenter --net="$ns" "$@""#)
            .arg("sh")
            .arg(cgroup.map(|c| c.path().as_os_str()).unwrap_or_default())
            .arg(self.path())
            .arg(program)
            .args(args);
        cmd
    }

    /// Runs a command in this namespace and returns its standard output.
    pub fn output(&self, cgroup: Option<&Cgroup>, program: &Path, args: &[&str]) -> Result<String> {
        let out = run(&mut self.command(cgroup, program, args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// BPF links bpftool sees attached to this namespace (where `sk_lookup` attaches).
    pub fn bpf_links(&self) -> Result<usize> {
        bpf_links_on_netns(fs::metadata(self.path())?.ino())
    }

    /// The nat and filter rules iptables shows in this namespace (fails if iptables is missing).
    pub fn iptables_rules(&self) -> Result<Vec<String>> {
        let out = self.output(None, Path::new("iptables-save"), &[])?;
        Ok(out
            .lines()
            .filter(|l| l.starts_with("-A"))
            .map(str::to_owned)
            .collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A veth pair: `a_name` in `a`, `b_name` in `b`.
fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    ip(&[
        "-n",
        a.name(),
        "link",
        "add",
        a_name,
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ])
}

/// Connects two namespaces with a veth pair named `eth0` on both sides, with these addresses.
pub fn link(a: &Netns, a_cidr: &str, b: &Netns, b_cidr: &str) -> Result<()> {
    link_via(a, "eth0", a_cidr, b, "eth0", b_cidr)
}

/// Connects two namespaces with a veth pair of these names and addresses.
pub fn link_via(
    a: &Netns,
    a_if: &str,
    a_cidr: &str,
    b: &Netns,
    b_if: &str,
    b_cidr: &str,
) -> Result<()> {
    veth(a, a_if, b, b_if)?;
    for (ns, dev, cidr) in [(a, a_if, a_cidr), (b, b_if, b_cidr)] {
        ip(&["-n", ns.name(), "addr", "add", cidr, "dev", dev])?;
        ip(&["-n", ns.name(), "link", "set", dev, "up"])?;
    }
    Ok(())
}

/// Adds another address to a namespace's `eth0` (IPv6 ones without duplicate address detection).
pub fn add_address(ns: &Netns, cidr: &str) -> Result<()> {
    let mut args = vec!["-n", ns.name(), "addr", "add", cidr, "dev", "eth0"];
    if cidr.contains(':') {
        args.push("nodad");
    }
    ip(&args)
}

/// The topology most tests use: an application Pod `app` (10.66.1.1, fd66::1, and the
/// cgroup `cgroup`) linked to a server namespace `srv` (10.66.1.2, 10.66.2.2, fd66::2).
pub struct Pods {
    pub app: Netns,
    pub srv: Netns,
    pub cgroup: Cgroup,
}

impl Pods {
    /// `tern run` with eBPF capture of the Pod's cgroup and no inbound capture.
    fn captured(&self) -> Vec<&str> {
        vec![
            "run",
            "--capture",
            "ebpf",
            "--cgroup",
            self.cgroup.path_str(),
            "--inbound-ports",
            "",
        ]
    }

    /// `tern run` in the application Pod: eBPF capture of its cgroup, no inbound capture, the
    /// static configuration `config`, and `extra` arguments.
    pub fn start_tern(&self, config: &ConfigFile, extra: &[&str]) -> Result<Tern> {
        let mut args = self.captured();
        args.extend(["--config", config.path_str()]);
        args.extend(extra);
        Tern::start(&self.app, Some(&self.cgroup), &args)
    }

    /// `tern run` in the application Pod with eBPF capture (no inbound), configured by the
    /// control plane at 127.0.0.1:15010 in the Pod's namespace, and `extra` arguments;
    /// returns once tern is ready, with `log_level` logs.
    pub fn start_tern_xds(&self, extra: &[&str], log_level: &str) -> Result<Tern> {
        let mut args = vec!["--xds-address", "http://127.0.0.1:15010"];
        // No inbound capture unless `extra` asks for some.
        if !extra.contains(&"--inbound-ports") {
            args.extend(["--inbound-ports", ""]);
        }
        args.extend(extra);
        self.start_tern_with(&args, log_level)
    }

    /// `tern run` in the application Pod with eBPF capture of its cgroup (and, unless `args`
    /// say otherwise, of every inbound port), the node id of `app-0`, and `args`; waits
    /// until it is ready.
    pub fn start_tern_with(&self, args: &[&str], log_level: &str) -> Result<Tern> {
        let tern = self.spawn_tern_with(args, log_level)?;
        ensure!(
            eventually(Duration::from_secs(30), || admin(
                &self.app, "GET", "/ready"
            )
            .trim()
                == "LIVE"),
            "tern never became ready:\n{}",
            tern.log()
        );
        Ok(tern)
    }

    /// [`Pods::start_tern_with`], without waiting for tern to be ready.
    pub fn spawn_tern_with(&self, args: &[&str], log_level: &str) -> Result<Tern> {
        let mut all = vec![
            "run",
            "--capture",
            "ebpf",
            "--cgroup",
            self.cgroup.path_str(),
            "--node-id",
            "sidecar~10.66.1.1~app-0.default~default.svc.cluster.local",
        ];
        all.extend(args);
        Tern::start_logging(&self.app, Some(&self.cgroup), &all, log_level)
    }
}

/// A test's static configuration file (`tern run --config`); removed on drop.
pub struct ConfigFile(PathBuf);

impl ConfigFile {
    pub fn new(text: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{}.yaml", unique("config")));
        fs::write(&path, text)?;
        Ok(Self(path))
    }

    /// Replaces the configuration (a running tern re-reads it).
    pub fn write(&self, text: &str) -> Result<()> {
        Ok(fs::write(&self.0, text)?)
    }

    pub fn path_str(&self) -> &str {
        self.0.to_str().expect("temporary paths are UTF-8")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Builds [`Pods`] (needs root).
pub fn pods() -> Pods {
    assert_root();
    let app = Netns::new("app").expect("app namespace");
    let srv = Netns::new("srv").expect("server namespace");
    link(&app, "10.66.1.1/24", &srv, "10.66.1.2/24").expect("veth link");
    for (ns, cidr) in [
        (&srv, "10.66.2.2/24"),
        (&app, "fd66::1/64"),
        (&srv, "fd66::2/64"),
    ] {
        add_address(ns, cidr).expect("address");
    }
    ip(&[
        "-n",
        app.name(),
        "route",
        "add",
        "10.66.2.0/24",
        "dev",
        "eth0",
    ])
    .expect("route");
    let cgroup = Cgroup::new("pod").expect("cgroup");
    Pods { app, srv, cgroup }
}

/// A cgroup v2 directory made for a test; on drop its processes are killed, tern's pins for
/// it removed and the directory deleted.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Result<Self> {
        let mount = cgroup2_mount().context("no cgroup v2 mount in /proc/mounts")?;
        let path = mount.join(unique(tag));
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("cgroup paths are UTF-8")
    }

    /// Where tern pins capture attached to this cgroup.
    pub fn pin_dir(&self) -> PathBuf {
        let id = fs::metadata(&self.path)
            .map(|m| m.ino())
            .unwrap_or_default();
        Path::new("/sys/fs/bpf/tern").join(format!("cg-{id}"))
    }

    /// Programs bpftool sees attached to this cgroup (an independent view of the kernel's).
    pub fn attached_programs(&self) -> Result<Vec<String>> {
        let programs = bpftool(&["cgroup", "show", self.path_str()])?;
        Ok(programs
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn kill_all(&self) {
        for _ in 0..50 {
            let procs = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                return;
            }
            for pid in procs.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        let _ = fs::remove_dir_all(self.pin_dir());
        let _ = fs::remove_dir("/sys/fs/bpf/tern");
        // A cgroup whose killed processes have not fully exited yet refuses removal (EBUSY).
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove cgroup {}", self.path.display());
    }
}

pub fn cgroup2_mount() -> Option<PathBuf> {
    fs::read_to_string("/proc/mounts")
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
}

/// A child process killed on drop.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|s| s.is_some())
    }

    /// Sends SIGTERM, without waiting.
    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> Result<()> {
        self.sigterm();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!("process {} did not exit within 10 s of SIGTERM", self.pid())
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `tern` with its log.
pub struct Tern {
    pub process: Process,
    log: PathBuf,
}

impl Tern {
    /// Starts `tern <args>` in `ns` (and `cgroup`), and waits until it says it is running.
    pub fn start(ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> Result<Self> {
        Self::start_logging(ns, cgroup, args, "info,tern=debug")
    }

    /// [`Tern::start`] with this log filter (`TERN_LOG`).
    pub fn start_logging(
        ns: &Netns,
        cgroup: Option<&Cgroup>,
        args: &[&str],
        filter: &str,
    ) -> Result<Self> {
        let mut tern = Self::spawn(ns, cgroup, args, filter)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if tern.log().contains("tern is running") {
                return Ok(tern);
            }
            if let Some(status) = tern.process.child.try_wait()? {
                bail!("tern exited ({status}) before running:\n{}", tern.log());
            }
            if Instant::now() > deadline {
                bail!("tern did not start within 15 s:\n{}", tern.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `tern ARGS…` with this log filter, without waiting for anything.
    pub fn spawn(ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str], filter: &str) -> Result<Self> {
        let log = std::env::temp_dir().join(format!("{}.log", unique("tern-log")));
        let file = fs::File::create(&log)?;
        let mut cmd = ns.command(cgroup, &tern_bin(), args);
        cmd.env("TERN_LOG", filter)
            .stdout(Stdio::null())
            .stderr(file);
        Ok(Self {
            process: Process::spawn(cmd)?,
            log,
        })
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes `text` to the configuration file this tern runs with, and waits until it
    /// applied it.
    pub fn reconfigure(&self, config: &ConfigFile, text: &str) {
        let applied = self.log().matches("configuration applied").count();
        config.write(text).unwrap();
        assert!(
            eventually(Duration::from_secs(5), || self
                .log()
                .matches("configuration applied")
                .count()
                > applied),
            "tern did not apply the new configuration:\n{}",
            self.log()
        );
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        self.process.kill();
        if thread::panicking() {
            eprintln!("--- tern log ---\n{}", self.log());
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// Runs `tern <args>` from the host and returns (success, stdout, stderr).
pub fn tern(args: &[&str]) -> (bool, String, String) {
    outcome(Command::new(tern_bin()).args(args))
}

/// Whether a command succeeded, and its standard output and error.
fn outcome(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run tern");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tern <args>` run inside the cgroup at `cgroup` (as a container of that Pod would run it).
pub fn tern_in(cgroup: &Path, args: &[&str]) -> (bool, String, String) {
    outcome(
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" || exit 97; shift; exec "$@""#)
            .arg("sh")
            .arg(cgroup)
            .arg(tern_bin())
            .args(args),
    )
}

/// A field of `/proc/<pid>/status`, split at white space (`Uid`: four ids; `VmHWM`: the
/// number and `kB`); empty when absent.
pub fn proc_status(pid: u32, field: &str) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A process's memory figure from `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    proc_status(pid, field)
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} for process {pid}"))
}

/// Counters of the capture attached to `cgroup`, by `hook.decision`, from `tern capture status`.
pub fn capture_counter(cgroup: &Cgroup, name: &str) -> u64 {
    let (ok, out, err) = tern(&["capture", "status", "--cgroup", cgroup.path_str(), "--json"]);
    assert!(ok, "tern capture status failed: {err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    status[0]["counters"][name].as_u64().unwrap_or(0)
}

/// An echo server (`tern-testpeer serve`) in a namespace, listening on every address given.
pub fn serve(ns: &Netns, addrs: &[&str]) -> Result<Process> {
    start_server(ns, None, &testpeer_bin(), &[&["serve"], addrs].concat())
}

/// Apache Thrift's Python `TThreadedServer` (`tests/python/serial_peer.py serve ADDR ID`),
/// which reads a connection's next request only after answering the one before, in a
/// namespace; it answers `tern-thriftpeer call`'s methods.
pub fn serial_thrift_serve(ns: &Netns, addr: &str, id: &str) -> Result<Process> {
    let peer = python_peer("serial_peer.py");
    let peer = peer.to_str().context("UTF-8 path")?;
    start_server(ns, None, Path::new("python3"), &[peer, "serve", addr, id])
}

/// A Thrift server (`tern-thriftpeer serve ADDR ID`) in a namespace.
pub fn thrift_serve(ns: &Netns, addr: &str, id: &str) -> Result<Process> {
    start_server(
        ns,
        None,
        &bin_dir().join("tern-thriftpeer"),
        &["serve", addr, id],
    )
}

/// The Python THeader peer (`tests/python/theader_peer.py`).
pub fn theader_peer() -> PathBuf {
    python_peer("theader_peer.py")
}

/// A Python peer script in `tests/python/`.
pub fn python_peer(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script)
}

/// Runs a Python peer's client command in `ns` (and `cgroup`) and parses the JSON line it prints.
pub fn python_json(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    script: &str,
    args: &[&str],
) -> serde_json::Value {
    let script = python_peer(script);
    let out = ns
        .output(
            cgroup,
            Path::new("python3"),
            &[&[script.to_str().expect("UTF-8 path")], args].concat(),
        )
        .expect("run a Python peer");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{script:?} printed {out:?}: {e}"))
}

/// A THeader Thrift server of Apache Thrift's Python library in a namespace.
pub fn python_serve(ns: &Netns, addr: &str, id: &str) -> Result<Process> {
    let script = theader_peer();
    start_server(
        ns,
        None,
        Path::new("python3"),
        &[script.to_str().expect("UTF-8 path"), "serve", addr, id],
    )
}

/// A server that accepts connections and never answers (a hung process), in `ns` at `addr`.
pub fn hung_server(ns: &Netns, addr: &str) -> Result<Process> {
    let (host, port) = addr.rsplit_once(':').context("HOST:PORT")?;
    let script = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{host}', {port}))\n\
         s.listen(128)\n\
         print('ready', flush=True)\n\
         held = []\n\
         while True:\n\
         \x20   held.append(s.accept())\n"
    );
    start_server(ns, None, Path::new("python3"), &["-c", &script])
}

/// The requests tern sent to endpoint `addr` of `cluster` (its admin `/clusters` page).
pub fn endpoint_requests(ns: &Netns, cluster: &str, addr: &str) -> u64 {
    let clusters: serde_json::Value =
        serde_json::from_str(&admin(ns, "GET", "/clusters")).unwrap_or_default();
    clusters["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == cluster)
        .flat_map(|c| c["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["address"] == addr)
        .map(|e| e["requests"].as_u64().unwrap_or(0))
        .sum()
}

/// Starts a server that prints `ready` once it listens, in `ns` (and `cgroup`).
pub fn start_server(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    program: &Path,
    args: &[&str],
) -> Result<Process> {
    let mut cmd = ns.command(cgroup, program, args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut process = Process::spawn(cmd)?;
    let stdout = process.child.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "ready" {
        let addrs = Command::new("ip")
            .args(["-n", ns.name(), "addr"])
            .output()?;
        bail!(
            "test server on {addrs:?} did not start: {line:?}; the namespace has\n{}",
            String::from_utf8_lossy(&addrs.stdout)
        );
    }
    Ok(process)
}

/// What one phase of `tern-thriftpeer call` saw.
#[derive(Debug, Deserialize)]
pub struct Calls {
    pub by_server: std::collections::BTreeMap<String, u64>,
    pub exceptions: u64,
    pub app_errors: Vec<String>,
    pub values: Vec<i64>,
    pub seq_ok: bool,
    pub io_error: Option<String>,
    /// The slowest call, in milliseconds.
    pub max_ms: u64,
}

impl Calls {
    pub fn replies(&self) -> u64 {
        self.by_server.values().sum()
    }

    /// Replies by server, in server order: what tests compare with their expected split.
    pub fn counts(&self) -> Vec<(&str, u64)> {
        self.by_server
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect()
    }
}

/// Runs `tern-thriftpeer call ADDR ARGS…` from `ns` (in `cgroup`) and returns its one phase.
pub fn thrift_call(ns: &Netns, cgroup: Option<&Cgroup>, addr: &str, args: &[&str]) -> Calls {
    let peer = bin_dir().join("tern-thriftpeer");
    let out = ns
        .output(cgroup, &peer, &[&["call", addr], args].concat())
        .expect("run the Thrift client");
    serde_json::from_str(out.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("client output {out:?}: {e}"))
}

/// A client process that prints one JSON line per phase and starts its next phase on a line
/// of stdin.
pub struct Phased {
    process: Process,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Phased {
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut process = Process::spawn(cmd)?;
        let stdout = BufReader::new(process.child.stdout.take().expect("piped"));
        Ok(Self { process, stdout })
    }

    /// The next line the client prints, parsed.
    pub fn read<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        let mut line = String::new();
        self.stdout.read_line(&mut line).context("client output")?;
        serde_json::from_str(&line).with_context(|| format!("client output {line:?}"))
    }

    /// Lets the client start its next phase.
    pub fn next_phase(&mut self) {
        self.send("go");
    }

    /// Writes one line to the client's standard input.
    fn send(&mut self, line: &str) {
        let stdin = self.process.child.stdin.as_mut().expect("piped");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("client stdin");
    }
}

/// A Thrift client making several phases of calls over one connection; each phase starts
/// when [`ThriftClient::next_phase`] is called.
pub struct ThriftClient(Phased);

impl ThriftClient {
    pub fn start(ns: &Netns, cgroup: Option<&Cgroup>, addr: &str, args: &[&str]) -> Result<Self> {
        Self::spawn(ns, cgroup, &[&["call", addr], args].concat())
    }

    /// `tern-thriftpeer retry ADDR`: a client that keeps calling, and connecting again after
    /// every failure; [`ThriftClient::report`] says what it saw.
    pub fn retrying(ns: &Netns, cgroup: Option<&Cgroup>, addr: &str) -> Result<Self> {
        Self::spawn(ns, cgroup, &["retry", addr])
    }

    fn spawn(ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> Result<Self> {
        let peer = bin_dir().join("tern-thriftpeer");
        Ok(Self(Phased::spawn(ns.command(cgroup, &peer, args))?))
    }

    /// Reads the result of the phase that is running.
    pub fn result(&mut self) -> Calls {
        self.try_result().unwrap()
    }

    /// [`ThriftClient::result`], with an error when the client is gone.
    pub fn try_result(&mut self) -> Result<Calls> {
        self.0.read()
    }

    /// A retrying client's calls since its last report: `ok`, `failed`, `connects`,
    /// `by_server`, `last_error`.
    pub fn report(&mut self) -> serde_json::Value {
        self.next_phase();
        self.0.read().expect("client report")
    }

    /// Lets the client start its next phase.
    pub fn next_phase(&mut self) {
        self.0.next_phase();
    }

    /// Stops a retrying client once its call in flight is done, and returns its last
    /// [`ThriftClient::report`].
    pub fn stop(&mut self) -> serde_json::Value {
        self.0.send("stop");
        self.0.read().expect("client's last report")
    }
}

/// GETs (or POSTs) a path of tern's admin server in `ns`.
pub fn admin(ns: &Netns, method: &str, path: &str) -> String {
    let url = format!("http://127.0.0.1:15000{path}");
    ns.output(None, Path::new("curl"), &["-s", "-X", method, &url])
        .expect("curl the admin server")
}

/// The value of one sample of tern's Prometheus metrics (0 when absent).
pub fn metric(ns: &Netns, sample: &str) -> f64 {
    admin(ns, "GET", "/stats/prometheus")
        .lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The sum of the samples of metric `name` in a Prometheus text `exposition` whose labels
/// include all of `labels`.
pub fn series_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Writes raw bytes to `addr` from `ns` and reports whether tern closed the connection.
pub fn send_raw(ns: &Netns, cgroup: Option<&Cgroup>, addr: &str, hex: &str) -> serde_json::Value {
    let out = ns
        .output(cgroup, &testpeer_bin(), &["raw", addr, hex])
        .expect("run the raw client");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("raw client output {out:?}: {e}"))
}

/// What a test client saw (`tern-testpeer connect`).
#[derive(Debug, Deserialize)]
pub struct Connection {
    /// The client's own address (`getsockname`).
    pub local: Option<String>,
    /// What `getpeername` told the client.
    pub peer: Option<String>,
    /// The client's address as the server saw it.
    pub server_saw: Option<String>,
    /// The server's local address for the connection.
    pub server_local: Option<String>,
    pub echoed: Option<bool>,
    /// Set when the connection failed.
    pub error: Option<String>,
    pub kind: Option<String>,
}

impl Connection {
    /// Whether the server saw the connection come from another socket than the client's own:
    /// the sign that it went through a proxy.
    pub fn proxied(&self) -> bool {
        self.error.is_none() && self.local != self.server_saw
    }

    pub fn ok(&self) -> bool {
        self.error.is_none() && self.echoed == Some(true)
    }

    /// Whether the server saw the connection come from tern's inbound passthrough source
    /// (127.0.0.6): it went through the inbound proxy.
    pub fn via_inbound_proxy(&self) -> bool {
        self.error.is_none()
            && self
                .server_saw
                .as_deref()
                .is_some_and(|s| s.starts_with("127.0.0.6:"))
    }
}

/// Connects from `ns` (inside `cgroup` when given) to `addr` with `tern-testpeer connect`.
pub fn connect(ns: &Netns, cgroup: Option<&Cgroup>, addr: &str) -> Connection {
    let out = ns
        .output(cgroup, &testpeer_bin(), &["connect", addr])
        .expect("run the test client");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("client output {out:?}: {e}"))
}

/// Retries `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(25));
    }
    f()
}
