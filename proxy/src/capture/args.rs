//! What to capture, as flags with environment fallbacks (istio-iptables' names): shared by
//! `tern run`, `tern capture` and `tern check`.
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{CaptureSettings, InboundPorts, cgroup::CgroupDir, parse_cidrs, parse_ports};

/// Which cgroup is the Pod's: a directory, or the Pod's UID to find it by.
#[derive(Debug, Args)]
pub struct PodCgroupArgs {
    /// cgroup v2 directory whose processes are captured (eBPF capture).
    #[arg(long, env = "TERN_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// The Pod's UID (`metadata.uid`): capture the cgroup the kubelet made for it, found below
    /// `--cgroup-root` (cgroupfs and systemd drivers).
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// The Pod's cgroup by its id (the directory's inode, as `bpftool cgroup` and CRI
    /// runtimes show it), found below `--cgroup-root`. Takes precedence over `--pod-uid`;
    /// `--cgroup` over both.
    #[arg(long, env = "TERN_CGROUP_ID")]
    pub cgroup_id: Option<u64>,
    /// The node's cgroup v2 hierarchy as mounted for tern (in a container, a read-only mount of
    /// the node's /sys/fs/cgroup); default: the cgroup2 mount in /proc/mounts.
    #[arg(long, env = "TERN_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
}

impl PodCgroupArgs {
    /// Whether any of the ways to name the Pod's cgroup was given.
    pub fn given(&self) -> bool {
        self.cgroup.is_some() || self.cgroup_id.is_some() || self.pod_uid.is_some()
    }

    /// The validated cgroup, with how it was found.
    pub fn resolve(&self) -> anyhow::Result<(CgroupDir, String)> {
        if let Some(path) = &self.cgroup {
            return Ok((CgroupDir::open(path)?, "given by --cgroup".to_owned()));
        }
        if !self.given() {
            anyhow::bail!(
                "eBPF capture needs the Pod's cgroup: --pod-uid <metadata.uid> (POD_UID), \
                 --cgroup-id <id> (TERN_CGROUP_ID) or --cgroup <cgroup v2 directory> (TERN_CGROUP)"
            );
        }
        let root = match &self.cgroup_root {
            Some(root) => super::cgroup::v2_root(root),
            None => super::cgroup::cgroup2_mount()
                .context("no cgroup2 filesystem in /proc/mounts; pass --cgroup-root")?,
        };
        if let Some(id) = self.cgroup_id {
            let path = super::cgroup::find_by_id_below(&root, id).with_context(|| {
                format!(
                    "no cgroup with id {id} within 8 levels below {}",
                    root.display()
                )
            })?;
            return Ok((CgroupDir::open(&path)?, format!("cgroup id {id}")));
        }
        let uid = self.pod_uid.as_deref().unwrap_or_default();
        let found = super::pod::find(&root, uid)?;
        let how = format!(
            "Pod {uid}: {:?} driver, {} QoS, below {}",
            found.driver,
            found.qos,
            root.display()
        );
        Ok((CgroupDir::open(&found.path)?, how))
    }
}

/// What to capture; shared by `tern run` and `tern capture attach`.
#[derive(Debug, Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub pod: PodCgroupArgs,
    /// Network namespace whose inbound connections are captured (eBPF capture).
    #[arg(long, env = "TERN_NETNS", default_value = "/proc/self/ns/net")]
    pub netns: PathBuf,
    /// Port of the outbound listener (on 127.0.0.1 and ::1).
    #[arg(long, env = "ENVOY_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port of the inbound listener.
    #[arg(long, env = "INBOUND_CAPTURE_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// Inbound ports to capture: a list, `*` for all but the proxy's own, empty for none.
    #[arg(long, env = "INBOUND_PORTS_INCLUDE", default_value = "*")]
    pub inbound_ports: InboundPorts,
    /// Inbound ports never captured, whatever --inbound-ports says.
    #[arg(long, env = "INBOUND_PORTS_EXCLUDE", default_value = "", value_parser = parse_ports)]
    pub exclude_inbound_ports: std::vec::Vec<u16>,
    /// Outbound destination ports that bypass the proxy.
    #[arg(long, env = "OUTBOUND_PORTS_EXCLUDE", default_value = "", value_parser = parse_ports)]
    pub exclude_ports: std::vec::Vec<u16>,
    /// Outbound destination CIDRs that bypass the proxy.
    #[arg(long, env = "OUTBOUND_IP_RANGES_EXCLUDE", default_value = "", value_parser = parse_cidrs)]
    pub exclude_cidrs: std::vec::Vec<ipnet::IpNet>,
    /// `SO_MARK` of the proxy's own sockets; capture skips marked sockets.
    #[arg(long, env = "TERN_MARK", default_value = "0x539", value_parser = parse_mark)]
    pub mark: u32,
    /// uid whose sockets are never captured (Istio runs its proxy as 1337).
    #[arg(long, env = "PROXY_UID")]
    pub proxy_uid: Option<u32>,
    /// Let outbound connections through while the proxy is not listening (eBPF), instead of
    /// refusing them. Inbound is refused while the proxy is down, whatever this says.
    #[arg(long, env = "TERN_OUTBOUND_FAIL_OPEN")]
    pub outbound_fail_open: bool,
    /// UNSAFE: addresses (one per family, comma-separated) whose inbound connections skip
    /// the proxy — meant for the node's, for kubelet probes, but every host-network Pod and
    /// every NodePort client SNATed to the node then skips mTLS and authorization. Off.
    #[arg(long, env = "TERN_UNSAFE_NODE_BYPASS", default_value = "", value_parser = parse_node_ips)]
    pub unsafe_node_bypass: NodeIps,
}

/// At most one address per family.
#[derive(Clone, Debug, Default)]
pub struct NodeIps(pub Vec<std::net::IpAddr>);

fn parse_node_ips(s: &str) -> Result<NodeIps, String> {
    let mut ips: Vec<std::net::IpAddr> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ip: std::net::IpAddr = part
            .parse()
            .map_err(|_| format!("invalid node address {part:?} in {s:?}"))?;
        if ips.iter().any(|i| i.is_ipv4() == ip.is_ipv4()) {
            return Err(format!("{s:?}: at most one IPv4 and one IPv6 node address"));
        }
        ips.push(ip);
    }
    Ok(NodeIps(ips))
}

/// Ports the proxy itself serves (admin, Istio's agent and telemetry ports): never captured inbound.
const PROXY_PORTS: [u16; 4] = [15000, 15020, 15021, 15090];

impl CaptureArgs {
    pub fn settings(&self) -> CaptureSettings {
        CaptureSettings {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_ports: PROXY_PORTS.to_vec(),
            mark: self.mark,
            skip_uid: self.proxy_uid,
            exclude_ports: self.exclude_ports.clone(),
            exclude_cidrs: self.exclude_cidrs.clone(),
            inbound: self.inbound_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            outbound_fail_open: self.outbound_fail_open,
            node_ips: self.unsafe_node_bypass.0.clone(),
        }
    }

    /// The Pod's validated cgroup, which eBPF capture requires.
    pub fn cgroup(&self) -> anyhow::Result<CgroupDir> {
        let (cgroup, how) = self.pod.resolve()?;
        tracing::info!(cgroup = %cgroup.path().display(), how, "the Pod's cgroup");
        Ok(cgroup)
    }
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("invalid mark {s:?}: expected a number such as 0x539 or 1337"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_in_hex_and_decimal() {
        assert_eq!(parse_mark("0x539").unwrap(), 1337);
        assert_eq!(parse_mark("1337").unwrap(), 1337);
        assert!(parse_mark("0xzz").unwrap_err().contains("0xzz"));
    }
}
