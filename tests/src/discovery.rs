//! `tern discovery` run as its own process in a namespace, with its services file (rewritten
//! to change what it serves) and its admin server; and a proxyless gRPC client's bootstrap.
use std::{path::Path, time::Duration};

use anyhow::{Result, ensure};

use crate::{ConfigFile, Netns, Tern, eventually};

/// A running `tern discovery`.
pub struct Discovery {
    pub tern: Tern,
    services: ConfigFile,
    admin: String,
}

impl Discovery {
    /// Starts `tern discovery` in `ns`, serving xDS on `address` and its admin server on
    /// `admin`, from `services` (the services file's YAML), with `extra` arguments; returns
    /// once it is ready.
    pub fn start(
        ns: &Netns,
        address: &str,
        admin: &str,
        services: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let file = ConfigFile::new(services)?;
        let mut args = vec![
            "discovery",
            "--services",
            file.path_str(),
            "--address",
            address,
            "--admin-address",
            admin,
            "--file-interval-ms",
            "100",
        ];
        args.extend(extra);
        let tern = Tern::spawn(ns, None, &args, "info,tern_xds_server=debug")?;
        let d = Self {
            tern,
            services: file,
            admin: admin.to_owned(),
        };
        ensure!(
            eventually(Duration::from_secs(10), || d.get(ns, "/ready").trim()
                == "LIVE"),
            "tern discovery never became ready:\n{}",
            d.tern.log()
        );
        Ok(d)
    }

    /// Replaces the services file.
    pub fn write(&self, services: &str) -> Result<()> {
        self.services.write(services)
    }

    /// GETs a path of the admin server.
    pub fn get(&self, ns: &Netns, path: &str) -> String {
        let url = format!("http://{}{path}", self.admin);
        ns.output(None, Path::new("curl"), &["-s", "-m", "5", &url])
            .unwrap_or_default()
    }

    /// A JSON document of the admin server (`/debug/syncz`, `/debug/sources`, …).
    pub fn json(&self, ns: &Netns, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(ns, path)).unwrap_or(serde_json::Value::Null)
    }

    /// The version served to `view` (`sidecar` or `grpc`) for `type_url`'s resource `name`.
    pub fn served_version(&self, ns: &Netns, view: &str, type_url: &str, name: &str) -> String {
        self.json(ns, "/debug/config_dump")[view][type_url]["resources"][name]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The health checks' verdict on an endpoint (`healthy`, `unhealthy`, `pending`; empty
    /// when it is not checked).
    pub fn verdict(&self, ns: &Netns, address: &str) -> String {
        self.json(ns, "/debug/health")
            .as_array()
            .and_then(|all| all.iter().find(|e| e["address"] == address))
            .map(|e| e["verdict"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    }

    /// Whether every connected client ACKed the latest version it was sent of every type.
    pub fn all_in_sync(&self, ns: &Netns) -> bool {
        let clients = self.json(ns, "/debug/syncz");
        clients.as_array().is_some_and(|all| {
            !all.is_empty()
                && all.iter().all(|c| {
                    c["types"].as_object().is_some_and(|types| {
                        types.values().all(|t| {
                            t["sent_version"].is_null() || t["sent_version"] == t["acked_version"]
                        })
                    })
                })
        })
    }
}

/// A gRPC xDS bootstrap file (`GRPC_XDS_BOOTSTRAP`) pointing at `server` (`host:port`) with
/// insecure credentials, for the node `node_id`; removed on drop.
pub struct Bootstrap(ConfigFile);

impl Bootstrap {
    pub fn new(server: &str, node_id: &str) -> Result<Self> {
        Self::with_creds(server, node_id, serde_json::json!({"type": "insecure"}))
    }

    /// Over TLS (gRFC A65): the server checked against `ca`, and this client certificate.
    pub fn tls(server: &str, node_id: &str, ca: &str, cert: &str, key: &str) -> Result<Self> {
        let config = serde_json::json!({
            "ca_certificate_file": ca,
            "certificate_file": cert,
            "private_key_file": key,
        });
        Self::with_creds(
            server,
            node_id,
            serde_json::json!({"type": "tls", "config": config}),
        )
    }

    fn with_creds(server: &str, node_id: &str, creds: serde_json::Value) -> Result<Self> {
        let json = serde_json::json!({
            "xds_servers": [{
                "server_uri": server,
                "channel_creds": [creds],
                "server_features": ["xds_v3"],
            }],
            "node": {"id": node_id, "cluster": "tern-tests", "locality": {}},
        });
        Ok(Self(ConfigFile::new(&json.to_string())?))
    }

    pub fn path_str(&self) -> &str {
        self.0.path_str()
    }
}
