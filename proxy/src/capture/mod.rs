//! Traffic capture: how a Pod's TCP connections reach the proxy.
//!
//! Two mechanisms give the proxy the same thing — the outbound listener receives every
//! captured connect and reads its original destination with `SO_ORIGINAL_DST`; the inbound
//! listener receives inbound connections with the original destination as local address or
//! `SO_ORIGINAL_DST`:
//! - [`ebpf`]: cgroup and sk_lookup programs, no NAT, pinned under bpffs;
//! - [`iptables`]: Istio-style `nat` REDIRECT rules, for kernels without those hooks.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use ipnet::IpNet;

pub mod args;
pub mod bpffs;
pub mod cgroup;
pub mod check;
pub mod ebpf;
pub mod gc;
pub mod iptables;
pub mod metrics;
pub mod pod;
#[allow(unsafe_code)] // bpf(2), perf_event_open(2) and their file descriptors (FFI)
mod sys;

/// What to capture and where to send it; shared by both mechanisms.
#[derive(Clone, Debug)]
pub struct CaptureSettings {
    /// Outbound listener port (on 127.0.0.1 and ::1).
    pub outbound_port: u16,
    /// Inbound listener port.
    pub inbound_port: u16,
    /// Ports of the proxy itself (admin, …) that inbound capture never takes.
    pub proxy_ports: Vec<u16>,
    /// `SO_MARK` on the proxy's own sockets; marked sockets are never captured.
    pub mark: u32,
    /// Sockets of this uid are never captured (Istio's 1337), when set.
    pub skip_uid: Option<u32>,
    /// Outbound destination ports that bypass the proxy.
    pub exclude_ports: Vec<u16>,
    /// Outbound destination ranges that bypass the proxy.
    pub exclude_cidrs: Vec<IpNet>,
    /// Inbound ports to capture.
    pub inbound: InboundPorts,
    /// Inbound ports never captured (Istio's `excludeInboundPorts`), whatever `inbound` says.
    pub exclude_inbound_ports: Vec<u16>,
    /// Let outbound connections through while the proxy is down (eBPF; inbound is always
    /// refused then).
    pub outbound_fail_open: bool,
    /// Addresses (at most one per family) whose inbound connections skip the proxy: an
    /// unsafe opt-in (every host-network Pod and SNATed NodePort client of the node would
    /// skip mTLS and authorization too).
    pub node_ips: Vec<IpAddr>,
}

/// Which inbound destination ports are captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundPorts {
    /// None: no inbound capture.
    None,
    /// Every port but the proxy's own (Istio's `*`).
    All,
    /// These ports.
    Only(Vec<u16>),
}

impl std::str::FromStr for InboundPorts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" => Ok(Self::None),
            "*" => Ok(Self::All),
            list => parse_ports(list).map(Self::Only),
        }
    }
}

impl CaptureSettings {
    /// Ports inbound capture never takes: the proxy's own, and the excluded ones.
    pub fn inbound_excluded(&self) -> Vec<u16> {
        [self.outbound_port, self.inbound_port]
            .into_iter()
            .chain(self.proxy_ports.iter().copied())
            .chain(self.exclude_inbound_ports.iter().copied())
            .collect()
    }
}

/// Parses a comma-separated port list such as `22,9090`.
pub fn parse_ports(list: &str) -> Result<Vec<u16>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| format!("invalid port {p:?} in {list:?}: expected 1-65535"))
        })
        .collect()
}

/// Parses a comma-separated CIDR list such as `10.0.0.0/8,fd00::/8`; a bare address is a /32 or /128.
pub fn parse_cidrs(list: &str) -> Result<Vec<IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<IpNet>()
                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("invalid CIDR {c:?} in {list:?}"))
        })
        .collect()
}

/// Where a filesystem of this type is mounted, from `/proc/mounts` (the first such mount).
pub fn mount_of_type(fstype: &str) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, ty) = (fields.next()?, fields.next()?, fields.next()?);
        (ty == fstype).then(|| PathBuf::from(dir))
    })
}

/// Loopback addresses the outbound listener binds; the connect hooks send captured connects here.
pub const OUTBOUND_IP4: Ipv4Addr = Ipv4Addr::LOCALHOST;
pub const OUTBOUND_IP6: Ipv6Addr = Ipv6Addr::LOCALHOST;

/// Errors of attaching, detaching and inspecting capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cgroup {path}: {source}")]
    CgroupMissing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a cgroup v2 directory: {why}")]
    NotCgroup2 { path: PathBuf, why: String },
    #[error(
        "tern capture is already attached to cgroup {cgroup} (pinned at {pins}); \
         run `tern capture detach --cgroup {cgroup}` first"
    )]
    AlreadyAttached { cgroup: PathBuf, pins: PathBuf },
    #[error("the cgroup of Pod {uid} below {root}: {why}")]
    PodCgroup {
        uid: String,
        root: PathBuf,
        why: String,
    },
    #[error(
        "tern is not in cgroup {cgroup} or directly below it: it captures only its own Pod's \
         cgroup (one further up holds other Pods), the getsockopt hook answers only on sockets \
         made inside it, and tern moves into no cgroup (under cgroup v2 a Pod's cgroup has \
         children and refuses processes). Run tern as a container of the Pod, or start it \
         inside {cgroup}"
    )]
    NotInside { cgroup: PathBuf },
    #[error("tern capture is not attached to cgroup {cgroup} (no pins at {pins})")]
    NotAttached { cgroup: PathBuf, pins: PathBuf },
    #[error(
        "{what}: permission denied; capture needs root or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
         (and CAP_SYS_ADMIN to mount bpffs when it is not mounted)"
    )]
    Privileges { what: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Ebpf {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
}

impl CaptureError {
    /// Wraps an aya error, turning `EPERM`/`EACCES` anywhere in its chain into [`Self::Privileges`].
    pub(crate) fn ebpf(
        what: impl Into<String>,
        err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        let what = what.into();
        let err = err.into();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && is_permission_error(io)
            {
                return Self::Privileges { what };
            }
            cur = e.source();
        }
        Self::Ebpf { what, source: err }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        let what = what.into();
        if is_permission_error(&source) {
            return Self::Privileges { what };
        }
        Self::Io { what, source }
    }
}

fn is_permission_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == nix::libc::EPERM || code == nix::libc::EACCES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_lists() {
        assert_eq!(parse_ports("22, 9090,").unwrap(), vec![22, 9090]);
        assert!(parse_ports("22,x").unwrap_err().contains("\"x\""));
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("70000").is_err());
    }

    #[test]
    fn parses_cidr_lists() {
        let v = parse_cidrs("10.0.0.0/8, fd00::/8,192.168.1.1").unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[2].prefix_len(), 32);
        assert!(
            parse_cidrs("10.0.0.0/33")
                .unwrap_err()
                .contains("10.0.0.0/33")
        );
    }

    #[test]
    fn parses_inbound_ports() {
        assert_eq!("*".parse::<InboundPorts>().unwrap(), InboundPorts::All);
        assert_eq!("".parse::<InboundPorts>().unwrap(), InboundPorts::None);
        assert_eq!(
            "8080,9090".parse::<InboundPorts>().unwrap(),
            InboundPorts::Only(vec![8080, 9090])
        );
    }
}
