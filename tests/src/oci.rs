//! A Kubernetes Pod made as a container runtime makes it: a network namespace held by a pause
//! container, and containers started by a real OCI runtime (`runc`, installed by `cargo xtask
//! setup`) from a rootfs directory (no image pull). Every container has private pid, ipc,
//! uts, mount and cgroup namespaces; the Pod's cgroup is laid out as the kubelet lays it out,
//! with either driver's names. Everything is removed on drop, containers first.
//!
//! `crun` is not used: on hosts with a hybrid cgroup layout (v1 controllers plus a v2
//! hierarchy holding a controller, as here) it refuses to run ("cgroups in hybrid mode not
//! supported"); runc places the container in both hierarchies.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{Netns, bin_dir, cgroup2_mount, unique};

/// Where the test binaries (tern, tern-testpeer) are in every container.
pub const BIN: &str = "/opt/tern";

/// How the kubelet names a Pod's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods/burstable/pod<uid>/<container id>`.
    Cgroupfs,
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`.
    Systemd,
}

/// A bind mount into a container.
#[derive(Clone, Debug)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// One container of the Pod.
#[derive(Clone, Debug, Default)]
pub struct Container {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Capabilities without the `CAP_` prefix (as Kubernetes names them); `None` keeps runc's
    /// defaults.
    pub capabilities: Option<Vec<String>>,
    pub binds: Vec<Bind>,
}

/// A Pod of OCI containers.
pub struct OciPod {
    pub uid: String,
    pub ns: Netns,
    driver: CgroupDriver,
    /// runc's state directory (`--root`) and the bundles.
    dir: PathBuf,
    /// Container ids, in start order.
    containers: Vec<String>,
}

impl OciPod {
    /// Makes the Pod's network namespace, its cgroup and its pause container.
    pub fn new(driver: CgroupDriver) -> Result<Self> {
        let tag = unique("pod");
        let dir = std::env::temp_dir().join(&tag);
        fs::create_dir_all(dir.join("rootfs"))?;
        let rootfs = dir.join("rootfs");
        for (link, target) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("sbin", "usr/sbin"),
        ] {
            std::os::unix::fs::symlink(target, rootfs.join(link))?;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            std::process::id(),
            (nanos >> 48) as u16,
            (nanos >> 36) as u16 & 0xfff,
            (nanos >> 24) as u16 & 0xfff,
            nanos as u64 & 0xffff_ffff_ffff
        );
        let mut pod = Self {
            uid,
            ns: Netns::new("pod")?,
            driver,
            dir,
            containers: Vec::new(),
        };
        pod.run(&Container {
            name: "pause".into(),
            args: vec!["sleep".into(), "infinity".into()],
            ..Default::default()
        })?;
        Ok(pod)
    }

    /// The Pod's cgroup, relative to the cgroup v2 mount.
    pub fn cgroup_relative(&self) -> String {
        match self.driver {
            CgroupDriver::Cgroupfs => format!("kubepods/burstable/pod{}", self.uid),
            CgroupDriver::Systemd => format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                self.uid.replace('-', "_")
            ),
        }
    }

    /// The Pod's cgroup directory on the host.
    pub fn cgroup(&self) -> PathBuf {
        cgroup2_mount()
            .expect("a cgroup v2 mount")
            .join(self.cgroup_relative())
    }

    fn id(&self, name: &str) -> String {
        format!("{}-{name}", self.dir.file_name().unwrap().to_string_lossy())
    }

    fn runc(&self) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root").arg(self.dir.join("state"));
        cmd
    }

    /// Creates and starts a container (detached); its output goes to [`OciPod::log`].
    pub fn run(&mut self, c: &Container) -> Result<()> {
        let id = self.id(&c.name);
        let bundle = self.dir.join(&c.name);
        fs::create_dir_all(&bundle)?;
        let status = Command::new("runc")
            .args(["spec", "--bundle"])
            .arg(&bundle)
            .status()
            .context("runc (installed by `cargo xtask setup`)")?;
        if !status.success() {
            bail!("runc spec failed");
        }
        let path = bundle.join("config.json");
        let mut config: Value = serde_json::from_str(&fs::read_to_string(&path)?)?;
        config["root"] = json!({ "path": self.dir.join("rootfs"), "readonly": true });
        config["hostname"] = json!(c.name);
        let process = &mut config["process"];
        process["terminal"] = json!(false);
        process["args"] = json!(c.args);
        let mut env = vec!["PATH=/usr/bin:/bin:/usr/sbin:/sbin".to_owned()];
        env.extend(c.env.iter().map(|(k, v)| format!("{k}={v}")));
        process["env"] = json!(env);
        if let Some(caps) = &c.capabilities {
            let caps: Vec<String> = caps.iter().map(|c| format!("CAP_{c}")).collect();
            for set in ["bounding", "effective", "permitted"] {
                process["capabilities"][set] = json!(caps);
            }
            process["capabilities"]
                .as_object_mut()
                .map(|o| o.remove("inheritable"));
        }
        let mut mounts = config["mounts"].as_array().cloned().unwrap_or_default();
        let mut binds = vec![
            Bind {
                source: "/usr".into(),
                destination: "/usr".into(),
                read_only: true,
            },
            Bind {
                source: "/etc".into(),
                destination: "/etc".into(),
                read_only: true,
            },
            Bind {
                source: bin_dir(),
                destination: BIN.into(),
                read_only: true,
            },
        ];
        binds.extend(c.binds.iter().cloned());
        for b in binds {
            let mut options = vec!["rbind"];
            if b.read_only {
                options.push("ro");
            }
            mounts.push(json!({
                "destination": b.destination, "type": "bind", "source": b.source, "options": options
            }));
        }
        mounts.push(json!({
            "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]
        }));
        config["mounts"] = json!(mounts);
        config["linux"]["namespaces"] = json!([
            { "type": "pid" },
            { "type": "ipc" },
            { "type": "uts" },
            { "type": "mount" },
            { "type": "cgroup" },
            { "type": "network", "path": self.ns.path() },
        ]);
        let leaf = match self.driver {
            CgroupDriver::Cgroupfs => id.clone(),
            CgroupDriver::Systemd => format!("cri-containerd-{id}.scope"),
        };
        config["linux"]["cgroupsPath"] = json!(format!("/{}/{leaf}", self.cgroup_relative()));
        fs::write(&path, serde_json::to_vec_pretty(&config)?)?;

        let log = fs::File::create(self.dir.join(format!("{}.log", c.name)))?;
        let out = self
            .runc()
            .args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()?;
        if !out.success() {
            bail!("runc run {}: {}", c.name, self.log(&c.name));
        }
        self.containers.push(id);
        Ok(())
    }

    /// What a container printed.
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Runs a command in a running container.
    pub fn exec(&self, name: &str, args: &[&str]) -> Result<Output> {
        Ok(self
            .runc()
            .arg("exec")
            .arg(self.id(name))
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Sends a signal to a container's process (`KILL` is what a crash looks like).
    pub fn kill(&self, name: &str, signal: &str) -> Result<()> {
        let status = self
            .runc()
            .args(["kill", &self.id(name), signal])
            .status()?;
        if !status.success() {
            bail!("runc kill {name} {signal} failed");
        }
        Ok(())
    }

    /// A running container's process id, as this (the node's) pid namespace sees it.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.runc()
            .args(["state", &self.id(name)])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .and_then(|s| s["pid"].as_u64())
            .and_then(|p| u32::try_from(p).ok())
    }

    /// Whether a container's process still runs.
    pub fn running(&self, name: &str) -> bool {
        self.runc()
            .args(["state", &self.id(name)])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .is_some_and(|s| s["status"] == "running")
    }

    /// Removes every container (as the kubelet does when the Pod is deleted), the Pod's
    /// cgroup and its network namespace.
    pub fn delete(mut self) {
        self.remove();
    }

    fn remove(&mut self) {
        let ids: Vec<String> = self.containers.drain(..).rev().collect();
        for id in ids {
            let _ = self
                .runc()
                .args(["delete", "--force", &id])
                .stderr(Stdio::null())
                .status();
        }
        // The container cgroups go with runc; the Pod's and its parents (when empty) here,
        // in every hierarchy runc made them in (on hybrid hosts, v1 controllers too).
        for mount in cgroup_mounts() {
            let pod = mount.join(self.cgroup_relative());
            for _ in 0..100 {
                if !pod.exists() || remove_empty_tree(&pod) {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let mut parent = pod.parent().map(Path::to_path_buf);
            while let Some(dir) = parent {
                if dir == mount || fs::remove_dir(&dir).is_err() {
                    break;
                }
                parent = dir.parent().map(Path::to_path_buf);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Every cgroup hierarchy's mount point (v2, and v1 controllers on hybrid hosts).
fn cgroup_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            matches!(f.get(2), Some(&"cgroup" | &"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

/// Removes a cgroup directory and its (process-free) children, deepest first.
fn remove_empty_tree(dir: &Path) -> bool {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&entry.path());
            }
        }
    }
    fs::remove_dir(dir).is_ok()
}

impl Drop for OciPod {
    fn drop(&mut self) {
        self.remove();
    }
}
