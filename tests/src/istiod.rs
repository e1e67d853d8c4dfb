//! istiod's stand-in (`tern-istiod`) run as its own process in a namespace, with its snapshot
//! file and its event log, and, for tests of what no control plane should do, the misbehaving
//! `tern-controlplane` in front of it; the files are removed on drop.
use std::{fs, net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, Result, ensure};

use crate::{Netns, Process, bin_dir, eventually, unique};

/// A running `tern-istiod ADDR SNAPSHOT [extra…]`, maybe behind `tern-controlplane`.
pub struct Istiod {
    pub process: Option<Process>,
    snapshot: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    faulty: Option<Faulty>,
}

/// `tern-controlplane` in front of the stand-in, and its faults file.
struct Faulty {
    process: Option<Process>,
    faults: PathBuf,
    args: Vec<String>,
}

impl Istiod {
    /// Starts the stand-in in `ns` on `addr` serving `snapshot` (the YAML the binary's
    /// documentation describes), with extra arguments (`--tls CERT KEY`, `--token FILE`).
    pub fn start(ns: &Netns, addr: &str, snapshot: &str, extra: &[String]) -> Result<Self> {
        let file = temp_file("snapshot", snapshot)?;
        let mut args = vec![addr.to_owned(), file.to_str().context("UTF-8 path")?.into()];
        args.extend_from_slice(extra);
        let mut istiod = Self {
            process: None,
            snapshot: file,
            log: std::env::temp_dir().join(format!("{}.log", unique("istiod"))),
            args,
            faulty: None,
        };
        istiod.restart(ns)?;
        Ok(istiod)
    }

    /// [`Istiod::start`], with `tern-controlplane` on `addr` in front of the stand-in (on the
    /// next port), misbehaving as `faults` says; both log to [`Istiod::events`].
    pub fn start_faulty(ns: &Netns, addr: &str, snapshot: &str, faults: &str) -> Result<Self> {
        let front: SocketAddr = addr.parse().context("an IP address and port")?;
        let behind = SocketAddr::new(front.ip(), front.port() + 1);
        let mut istiod = Self::start(ns, &behind.to_string(), snapshot, &[])?;
        let file = temp_file("faults", faults)?;
        istiod.faulty = Some(Faulty {
            args: vec![
                addr.to_owned(),
                format!("http://{behind}"),
                file.to_str().context("UTF-8 path")?.into(),
            ],
            faults: file,
            process: None,
        });
        istiod.restart(ns)?;
        Ok(istiod)
    }

    /// Starts what is not running (after [`Istiod::stop`]), in `ns`.
    pub fn restart(&mut self, ns: &Netns) -> Result<()> {
        if self.process.is_none() {
            self.process = Some(self.spawn(ns, "tern-istiod", &self.args)?);
        }
        if let Some(f) = &self.faulty
            && f.process.is_none()
        {
            let process = self.spawn(ns, "tern-controlplane", &f.args)?;
            if let Some(f) = &mut self.faulty {
                f.process = Some(process);
            }
        }
        Ok(())
    }

    fn spawn(&self, ns: &Netns, bin: &str, args: &[String]) -> Result<Process> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = ns.command(None, &bin_dir().join(bin), &args);
        cmd.stdout(log).stderr(Stdio::inherit());
        let before = self.events().matches("ready").count();
        let process = Process::spawn(cmd)?;
        ensure!(
            eventually(Duration::from_secs(5), || self
                .events()
                .matches("ready")
                .count()
                > before),
            "{bin} did not start on {}: {}",
            args[0],
            self.events()
        );
        Ok(process)
    }

    /// Kills the stand-in (and what is in front of it), as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
        if let Some(mut p) = self.faulty.as_mut().and_then(|f| f.process.take()) {
            p.kill();
        }
    }

    /// Everything logged: `STREAM`, `SUBSCRIBE`, `ACK`, `NACK`, `REJECT`, `PUSH` lines (and
    /// `CLOSE` from `tern-controlplane`).
    pub fn events(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to 5 s for a line starting with `event`.
    pub fn wait_for(&self, event: &str) -> bool {
        self.wait_for_within(event, Duration::from_secs(5))
    }

    pub fn wait_for_within(&self, event: &str, timeout: Duration) -> bool {
        eventually(timeout, || {
            self.events().lines().any(|l| l.starts_with(event))
        })
    }

    /// Replaces the snapshot; the stand-in pushes it to every stream.
    pub fn push(&self, snapshot: &str) {
        fs::write(&self.snapshot, snapshot).expect("write the snapshot");
    }

    /// Replaces the faults of `tern-controlplane` (started by [`Istiod::start_faulty`]) and
    /// waits until it has read them.
    pub fn faults(&self, faults: &str) {
        let f = self.faulty.as_ref().expect("started with faults");
        let before = self.events().matches("FAULTS").count();
        fs::write(&f.faults, faults).expect("write the faults");
        assert!(
            eventually(Duration::from_secs(5), || self
                .events()
                .matches("FAULTS")
                .count()
                > before),
            "tern-controlplane did not read its faults: {}",
            self.events()
        );
    }
}

/// A file of `text` in the temporary directory, named after `what`.
fn temp_file(what: &str, text: &str) -> Result<PathBuf> {
    let file = std::env::temp_dir().join(format!("{}.yaml", unique(what)));
    fs::write(&file, text).with_context(|| format!("write {}", file.display()))?;
    Ok(file)
}

impl Drop for Istiod {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- control plane events ---\n{}", self.events());
        }
        let _ = fs::remove_file(&self.snapshot);
        let _ = fs::remove_file(&self.log);
        if let Some(f) = &self.faulty {
            let _ = fs::remove_file(&f.faults);
        }
    }
}
