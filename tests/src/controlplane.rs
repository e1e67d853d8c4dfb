//! The test control plane (`tern-controlplane`) run as its own process in a namespace, with
//! its snapshot file and its event log; both files are removed on drop.
use std::{fs, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, Result, ensure};

use crate::{Netns, Process, bin_dir, eventually, unique};

/// A running `tern-controlplane ADDR SNAPSHOT [extra…]`.
pub struct ControlPlane {
    pub process: Option<Process>,
    snapshot: PathBuf,
    log: PathBuf,
    args: Vec<String>,
}

impl ControlPlane {
    /// Starts a control plane in `ns` on `addr` serving `snapshot` (the YAML the binary's
    /// documentation describes), with extra arguments (`--tls CERT KEY`, `--token FILE`).
    pub fn start(ns: &Netns, addr: &str, snapshot: &str, extra: &[String]) -> Result<Self> {
        let file = std::env::temp_dir().join(format!("{}.yaml", unique("snapshot")));
        fs::write(&file, snapshot).with_context(|| format!("write {}", file.display()))?;
        let mut args = vec![addr.to_owned(), file.to_str().context("UTF-8 path")?.into()];
        args.extend_from_slice(extra);
        let mut cp = Self {
            process: None,
            snapshot: file,
            log: std::env::temp_dir().join(format!("{}.log", unique("cp"))),
            args,
        };
        cp.restart(ns)?;
        Ok(cp)
    }

    /// Starts the control plane again (after [`ControlPlane::stop`]), in `ns`.
    pub fn restart(&mut self, ns: &Netns) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut cmd = ns.command(None, &bin_dir().join("tern-controlplane"), &args);
        cmd.stdout(log).stderr(Stdio::inherit());
        let before = self.events().matches("ready").count();
        self.process = Some(Process::spawn(cmd)?);
        ensure!(
            eventually(Duration::from_secs(5), || self
                .events()
                .matches("ready")
                .count()
                > before),
            "the control plane did not start on {}: {}",
            self.args[0],
            self.events()
        );
        Ok(())
    }

    /// Kills the control plane, as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Everything it logged: `STREAM`, `SUBSCRIBE`, `ACK`, `NACK`, `REJECT`, `PUSH` lines.
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

    /// Replaces the snapshot; the control plane pushes it to every stream.
    pub fn push(&self, snapshot: &str) {
        fs::write(&self.snapshot, snapshot).expect("write the snapshot");
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- control plane events ---\n{}", self.events());
        }
        let _ = fs::remove_file(&self.snapshot);
        let _ = fs::remove_file(&self.log);
    }
}
