//! The registries Thrift fleets use, run for real on a namespace's loopback: etcd (Debian's
//! `etcd-server`), driven over its JSON gateway as Kitex servers would register, and
//! ZooKeeper (Debian's `zookeeperd`), whose serverset members kazoo joins as Finagle's would.
//! Data directories are removed on drop.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use base64::Engine;

use crate::{Netns, Process, eventually, unique};

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// An etcd member on `127.0.0.1:<port>` of a namespace.
pub struct Etcd {
    process: Option<Process>,
    ns_path: PathBuf,
    ns_name: String,
    pub url: String,
    dir: PathBuf,
}

impl Etcd {
    /// Starts etcd in `ns`, serving clients on 127.0.0.1:`port` (peers on `port + 10`).
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("etcd"));
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("data");
        let client = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{}", port + 10);
        let cluster = format!("t1={peer}");
        let args = [
            "--name",
            "t1",
            "--data-dir",
            data.to_str().context("UTF-8 path")?,
            "--logger=zap",
            "--log-level=error",
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &cluster,
        ];
        let mut cmd = ns.command(None, Path::new("etcd"), &args);
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        cmd.stdout(std::process::Stdio::null()).stderr(log);
        let etcd = Self {
            process: Some(Process::spawn(cmd)?),
            ns_path: ns.path(),
            ns_name: ns.name().to_owned(),
            url: client,
            dir,
        };
        ensure!(
            eventually(Duration::from_secs(10), || etcd
                .post("/health", "")
                .is_ok_and(|h| h.contains("true"))),
            "etcd did not become healthy on {}: {}",
            etcd.url,
            std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default()
        );
        Ok(etcd)
    }

    /// A request to the JSON gateway (`/v3/...`), GET when `body` is empty.
    fn post(&self, path: &str, body: &str) -> Result<String> {
        let url = format!("{}{path}", self.url);
        let net = format!("--net={}", self.ns_path.display());
        let mut args = vec![net.as_str(), "curl", "-sf", "-m", "3"];
        if !body.is_empty() {
            args.extend(["-X", "POST", "-d", body]);
        }
        args.push(&url);
        let out = std::process::Command::new("nsenter").args(&args).output()?;
        ensure!(
            out.status.success(),
            "etcd {path} in {}: {out:?}",
            self.ns_name
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Grants a lease of `ttl` seconds; its id.
    pub fn grant(&self, ttl: u64) -> Result<String> {
        let out = self.post("/v3/lease/grant", &format!(r#"{{"TTL": {ttl}}}"#))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["ID"].as_str().map(str::to_owned).context("a lease id")
    }

    /// Puts `key` = `value`, held by `lease` (none: kept).
    pub fn put(&self, key: &str, value: &str, lease: Option<&str>) -> Result<()> {
        let lease = lease
            .map(|l| format!(r#", "lease": "{l}""#))
            .unwrap_or_default();
        self.post(
            "/v3/kv/put",
            &format!(
                r#"{{"key": "{}", "value": "{}"{lease}}}"#,
                b64(key),
                b64(value)
            ),
        )?;
        Ok(())
    }

    /// Registers a Kitex instance of `service` at `address` as kitex-contrib/registry-etcd
    /// does: its key held by a lease of `ttl` seconds, kept alive until the returned guard is
    /// dropped (as a process that dies stops renewing it).
    pub fn register_kitex(&self, service: &str, address: &str, ttl: u64) -> Result<KeepAlive> {
        let lease = self.grant(ttl)?;
        let value = format!(r#"{{"network":"tcp","address":"{address}","weight":10,"tags":{{}}}}"#);
        self.put(
            &format!("kitex/registry-etcd/{service}/{address}"),
            &value,
            Some(&lease),
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let (url, ns, flag) = (self.url.clone(), self.ns_path.clone(), stop.clone());
        let thread = thread::spawn(move || {
            // etcd's client renews every TTL/3.
            let body = format!(r#"{{"ID": "{lease}"}}"#);
            while !flag.load(Ordering::Relaxed) {
                let _ = std::process::Command::new("nsenter")
                    .arg(format!("--net={}", ns.display()))
                    .args(["curl", "-sf", "-m", "1", "-X", "POST", "-d", &body])
                    .arg(format!("{url}/v3/lease/keepalive"))
                    .output();
                thread::sleep(Duration::from_millis(ttl * 1000 / 3));
            }
        });
        Ok(KeepAlive {
            stop,
            thread: Some(thread),
        })
    }

    /// Kills etcd, as a crash or a partition would make it unreachable.
    pub fn stop(&mut self) {
        self.process.take();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.process.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Keeps a lease alive until dropped.
pub struct KeepAlive {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A ZooKeeper server on `127.0.0.1:<port>` of a namespace.
pub struct Zookeeper {
    process: Option<Process>,
    ns_path: PathBuf,
    pub hosts: String,
    dir: PathBuf,
}

impl Zookeeper {
    /// Starts ZooKeeper (standalone) in `ns` on 127.0.0.1:`port`; returns once it serves.
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("zookeeper"));
        std::fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("zoo.cfg");
        std::fs::write(
            &config,
            format!(
                "dataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\ntickTime=500\nminSessionTimeout=1000\nadmin.enableServer=false\n4lw.commands.whitelist=srvr,ruok\n",
                dir.join("data").display()
            ),
        )?;
        // The jar's manifest names its dependencies.
        let cp = "/usr/share/java/zookeeper.jar";
        let mut cmd = ns.command(
            None,
            Path::new("java"),
            &[
                "-Xmx128m",
                "-cp",
                cp,
                "org.apache.zookeeper.server.ZooKeeperServerMain",
                config.to_str().context("UTF-8 path")?,
            ],
        );
        let log = std::fs::File::create(dir.join("zookeeper.log"))?;
        cmd.stdout(log.try_clone()?).stderr(log);
        let zk = Self {
            process: Some(Process::spawn(cmd)?),
            ns_path: ns.path(),
            hosts: format!("127.0.0.1:{port}"),
            dir,
        };
        ensure!(
            eventually(Duration::from_secs(20), || zk
                .four_letters("srvr")
                .contains("Zookeeper version")),
            "ZooKeeper did not start on {}: {}",
            zk.hosts,
            std::fs::read_to_string(zk.dir.join("zookeeper.log")).unwrap_or_default()
        );
        Ok(zk)
    }

    /// A four-letter command's answer (empty when it does not answer).
    fn four_letters(&self, command: &str) -> String {
        let Some((_, port)) = self.hosts.rsplit_once(':') else {
            return String::new();
        };
        let script = format!(
            "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'{command}')\nprint(s.makefile().read())"
        );
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path.display()))
            .args(["python3", "-c", &script])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Kills ZooKeeper.
    pub fn stop(&mut self) {
        self.process.take();
    }
}

impl Drop for Zookeeper {
    fn drop(&mut self) {
        self.process.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
