//! eBPF capture: load tern's kernel programs, attach them to a cgroup and a network namespace,
//! pin them under bpffs, and read their state back.
//!
//! Attaching is all or nothing: every program is loaded and attached, held by this process,
//! and only then pinned; any failure drops what was made (the kernel detaches links whose last
//! reference goes away) and removes the pin directory, so no half-attached state is left.
//! Once pinned, the hooks outlive the process that attached them; a proxy that starts later
//! [`EbpfCapture::open`]s the pins and registers its inbound listener in the sockmap.
//!
//! Cgroup programs attach with `CgroupAttachMode::Single`: on kernels ≥ 5.7 aya attaches with
//! `bpf_link_create`, where links are multi-attach by nature (other agents' programs on the
//! same cgroup keep running and tern is not refused by them), and the kernel refuses the
//! `AllowMultiple` flag for links.
use std::{
    collections::BTreeMap,
    fs::{self, File},
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, SockMap, lpm_trie::Key},
    programs::{CgroupAttachMode, Program, links::FdLink},
};
use ipnet::IpNet;
use serde::Serialize;
use tern_ebpf_common::{
    CidrKey, Config, Counter, INBOUND_PORT_CAPTURE, INBOUND_PORT_EXCLUDE, LISTENER_INBOUND_V4,
    LISTENER_INBOUND_V6, flags, map_names, program_names,
};

use super::{
    CaptureError, CaptureSettings, InboundPorts, OUTBOUND_IP4, OUTBOUND_IP6, bpffs,
    cgroup::{self, CgroupDir},
    gc, sys,
};

/// The kernel object built by `cargo xtask build-ebpf`, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tern-ebpf.o"));

/// Capture attached to one cgroup, as seen through its pins. The hooks stay when this handle
/// goes away: they go with the Pod ([`super::gc`]) or by [`detach`].
pub struct EbpfCapture {
    dir: PathBuf,
}

impl EbpfCapture {
    /// Loads and attaches every hook to `cgroup` (and `sk_lookup` to the network namespace at
    /// `netns` when inbound capture is on), configures them from `settings` and pins them.
    pub fn attach(
        cgroup: &CgroupDir,
        netns: &Path,
        settings: &CaptureSettings,
    ) -> Result<Self, CaptureError> {
        let bpffs = bpffs::ensure_mounted()?;
        let dir = bpffs::pin_dir(&bpffs, cgroup.id());
        if dir.exists() {
            return Err(CaptureError::AlreadyAttached {
                cgroup: cgroup.path().to_owned(),
                pins: dir,
            });
        }
        let mut ebpf = load_object()?;
        configure(&mut ebpf, settings)?;

        let cgroup_fd = File::open(cgroup.path())
            .map_err(|e| CaptureError::io(format!("open cgroup {}", cgroup.path().display()), e))?;
        let netns_fd = match settings.inbound {
            InboundPorts::None => None,
            _ => Some(File::open(netns).map_err(|e| {
                CaptureError::io(format!("open network namespace {}", netns.display()), e)
            })?),
        };
        let mut links = Vec::new();
        for name in program_names::ALL {
            if name == program_names::INBOUND && netns_fd.is_none() {
                continue;
            }
            let what = |step: &str| format!("{step} program {name}");
            let program = ebpf.program_mut(name).ok_or_else(|| CaptureError::Ebpf {
                what: what("find"),
                source: "missing from the embedded object".into(),
            })?;
            let link = load_and_attach(program, &cgroup_fd, netns_fd.as_ref())
                .map_err(|e| CaptureError::ebpf(what("load and attach"), e))?;
            links.push((name, link));
        }

        fs::create_dir_all(&dir)
            .map_err(|e| CaptureError::io(format!("create pin directory {}", dir.display()), e))?;
        let pinned = (|| {
            for name in map_names::ALL {
                let map = ebpf.map(name).expect("every map name is in the object");
                map.pin(dir.join(name))
                    .map_err(|e| CaptureError::ebpf(format!("pin map {name}"), e))?;
            }
            for (name, link) in links {
                link.pin(&bpffs::link_pin(&dir, name))
                    .map_err(|e| CaptureError::ebpf(format!("pin link of {name}"), e))?;
            }
            Ok(())
        })();
        if let Err(e) = pinned {
            remove_pins(&dir);
            return Err(e);
        }
        tracing::info!(cgroup = %cgroup.path().display(), pins = %dir.display(), "eBPF capture attached");
        Ok(Self { dir })
    }

    /// Opens the capture pinned for `cgroup` by an earlier `attach` (an init container, or a
    /// proxy that crashed). The hooks stay when this handle goes away.
    pub fn open(cgroup: &CgroupDir) -> Result<Self, CaptureError> {
        let bpffs = bpffs::mount_point().unwrap_or_else(|| bpffs::DEFAULT_MOUNT.into());
        let dir = bpffs::find_pin_dir(&bpffs, cgroup.id());
        if !dir.is_dir() {
            return Err(CaptureError::NotAttached {
                cgroup: cgroup.path().to_owned(),
                pins: dir,
            });
        }
        Ok(Self { dir })
    }

    /// The pin directory (for metrics).
    pub fn pins(&self) -> &Path {
        &self.dir
    }

    /// The configuration the hooks run with.
    pub fn config(&self) -> Result<Config, CaptureError> {
        read_config(&self.dir)
    }

    /// Puts the proxy's inbound listening sockets where the sk_lookup program finds them.
    /// The kernel drops them from the map when the sockets close: while the proxy is down,
    /// the program finds none and refuses inbound connections.
    pub fn register_inbound(
        &self,
        v4: &impl AsRawFd,
        v6: Option<&impl AsRawFd>,
    ) -> Result<(), CaptureError> {
        let map = open_pinned(&self.dir, map_names::LISTENERS)?;
        let mut sockmap =
            SockMap::try_from(map).map_err(|e| CaptureError::ebpf("open map LISTENERS", e))?;
        sockmap
            .set(LISTENER_INBOUND_V4, v4, 0)
            .map_err(|e| CaptureError::ebpf("register the IPv4 inbound listener", e))?;
        if let Some(v6) = v6 {
            sockmap
                .set(LISTENER_INBOUND_V6, v6, 0)
                .map_err(|e| CaptureError::ebpf("register the IPv6 inbound listener", e))?;
        }
        Ok(())
    }
}

/// Detaches the capture pinned for `cgroup`: removing the pins drops the last references to
/// the links, and the kernel detaches the programs.
pub fn detach(cgroup: &CgroupDir) -> Result<(), CaptureError> {
    let capture = EbpfCapture::open(cgroup)?;
    remove_pins(&capture.dir);
    Ok(())
}

/// One attached capture as `tern capture status` reports it.
#[derive(Debug, Serialize)]
pub struct CaptureStatus {
    pub cgroup_id: u64,
    /// The cgroup directory, when this process can see it.
    pub cgroup: Option<PathBuf>,
    /// Whether its cgroup and network namespace still exist, as its links report.
    pub liveness: gc::Liveness,
    pub pins: PathBuf,
    /// Programs whose links are pinned.
    pub hooks: Vec<String>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub mark: String,
    pub outbound_fail_open: bool,
    /// Kernel memory held by its maps and programs, in bytes.
    pub kernel_memory: u64,
    /// `hook.decision` → count, summed over CPUs.
    pub counters: BTreeMap<String, u64>,
    /// Why its configuration or counters could not be read (a capture pinned by another
    /// tern version, whose maps differ).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Every capture pinned on this host (or only the one for `cgroup`).
pub fn status(cgroup: Option<&CgroupDir>) -> Result<Vec<CaptureStatus>, CaptureError> {
    let Some(bpffs) = bpffs::mount_point() else {
        return Ok(Vec::new());
    };
    let dirs: Vec<PathBuf> = match cgroup {
        Some(cg) => vec![bpffs::find_pin_dir(&bpffs, cg.id())],
        None => bpffs::capture_dirs(&bpffs),
    };
    let mut out = Vec::new();
    for dir in dirs.into_iter().filter(|d| d.is_dir()) {
        let Some(cgroup_id) = bpffs::cgroup_id_of(&dir) else {
            continue;
        };
        let (config, counters, problem) = match (read_config(&dir), read_counters(&dir)) {
            (Ok(config), Ok(counters)) => (config, counters, None),
            (Err(e), _) | (_, Err(e)) => (
                Config::default(),
                BTreeMap::new(),
                Some(format!("{e} (pinned by another tern version?)")),
            ),
        };
        let mut hooks: Vec<String> = program_names::ALL
            .iter()
            .filter(|p| bpffs::link_pin(&dir, p).exists())
            .map(|p| p.to_string())
            .collect();
        hooks.sort();
        out.push(CaptureStatus {
            cgroup_id,
            cgroup: cgroup::find_by_id(cgroup_id),
            liveness: gc::liveness(&dir),
            pins: dir.clone(),
            hooks,
            outbound_port: config.outbound_port as u16,
            inbound_port: config.inbound_port as u16,
            mark: format!("{:#x}", config.mark),
            outbound_fail_open: config.flags & flags::OUTBOUND_FAIL_OPEN != 0,
            kernel_memory: gc::kernel_memory(&dir),
            counters,
            problem,
        });
    }
    Ok(out)
}

fn read_config(dir: &Path) -> Result<Config, CaptureError> {
    let map = open_pinned(dir, map_names::CONFIG)?;
    let array: Array<_, Config> =
        Array::try_from(map).map_err(|e| CaptureError::ebpf("open map CONFIG", e))?;
    array
        .get(&0, 0)
        .map_err(|e| CaptureError::ebpf("read map CONFIG", e))
}

fn read_counters(dir: &Path) -> Result<BTreeMap<String, u64>, CaptureError> {
    Ok(counters(dir)?
        .into_iter()
        .map(|(hook, decision, value)| (format!("{hook}.{decision}"), value))
        .collect())
}

/// The capture counters pinned in `dir`, summed over CPUs: (hook, decision, count).
pub fn counters(dir: &Path) -> Result<Vec<(&'static str, &'static str, u64)>, CaptureError> {
    let map = open_pinned(dir, map_names::COUNTERS)?;
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(map).map_err(|e| CaptureError::ebpf("open map COUNTERS", e))?;
    Counter::ALL
        .iter()
        .map(|(c, hook, decision)| {
            let per_cpu = counters
                .get(&(*c as u32), 0)
                .map_err(|e| CaptureError::ebpf("read map COUNTERS", e))?;
            Ok((*hook, *decision, per_cpu.iter().sum()))
        })
        .collect()
}

fn open_pinned(dir: &Path, name: &str) -> Result<Map, CaptureError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .map_err(|e| CaptureError::ebpf(format!("open pinned map {}", path.display()), e))?;
    Map::from_map_data(data)
        .map_err(|e| CaptureError::ebpf(format!("open pinned map {}", path.display()), e))
}

fn remove_pins(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(pins = %dir.display(), error = %e, "could not remove pins");
    }
    // Leave nothing of tern's behind once the last capture is gone.
    if let Some(root) = dir.parent() {
        let _ = fs::remove_dir(root);
    }
}

/// A program's link to its cgroup or network namespace, not yet pinned.
enum HookLink {
    Aya(FdLink),
    /// See [`super::sys`]: aya 0.14 cannot turn a cgroup sockopt link into an `FdLink`.
    Raw(std::os::fd::OwnedFd),
}

impl HookLink {
    fn pin(self, path: &Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        match self {
            HookLink::Aya(link) => link.pin(path).map(drop).map_err(Into::into),
            HookLink::Raw(fd) => sys::pin(&fd, path).map_err(Into::into),
        }
    }
}

/// Loads one program and attaches it where its type belongs, returning its link.
fn load_and_attach(
    program: &mut Program,
    cgroup: &File,
    netns: Option<&File>,
) -> Result<HookLink, Box<dyn std::error::Error + Send + Sync>> {
    let mode = CgroupAttachMode::Single;
    Ok(HookLink::Aya(match program {
        Program::CgroupSockAddr(p) => {
            p.load()?;
            let id = p.attach(cgroup, mode)?;
            p.take_link(id)?.try_into()?
        }
        Program::SockOps(p) => {
            p.load()?;
            let id = p.attach(cgroup, mode)?;
            p.take_link(id)?.try_into()?
        }
        Program::CgroupSockopt(p) => {
            p.load()?;
            let fd = sys::create_cgroup_link(p.fd()?, cgroup, sys::BPF_CGROUP_GETSOCKOPT)?;
            return Ok(HookLink::Raw(fd));
        }
        Program::SkLookup(p) => {
            let netns = netns.ok_or("sk_lookup needs a network namespace")?;
            p.load()?;
            let id = p.attach(netns)?;
            p.take_link(id)?.into()
        }
        other => return Err(format!("unexpected program type {:?}", other.prog_type()).into()),
    }))
}

/// Loads the embedded object without the kernel's BTF: tern's programs read their context
/// through fixed offsets and need no CO-RE relocation, and parsing `/sys/kernel/btf/vmlinux`
/// (what `Ebpf::load` does) raised tern's peak memory from about 31 to 42 MiB.
fn load_object() -> Result<Ebpf, CaptureError> {
    EbpfLoader::new()
        .btf(None)
        .load(OBJECT)
        .map_err(|e| CaptureError::ebpf("load tern's eBPF object", e))
}

/// Whether one program loaded, with the verifier's or kernel's reason when not.
pub type ProbeResult = (&'static str, Result<(), String>);

/// Loads every program without attaching it: what `tern check` uses to probe the kernel.
pub fn probe_programs() -> Result<Vec<ProbeResult>, CaptureError> {
    let mut ebpf = load_object()?;
    Ok(program_names::ALL
        .iter()
        .map(|&name| {
            let result = match ebpf.program_mut(name) {
                None => Err("missing from the embedded object".to_string()),
                Some(Program::CgroupSockAddr(p)) => p.load().map_err(|e| chain(&e)),
                Some(Program::SockOps(p)) => p.load().map_err(|e| chain(&e)),
                Some(Program::CgroupSockopt(p)) => p.load().map_err(|e| chain(&e)),
                Some(Program::SkLookup(p)) => p.load().map_err(|e| chain(&e)),
                Some(other) => Err(format!("unexpected program type {:?}", other.prog_type())),
            };
            (name, result)
        })
        .collect())
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Writes the settings into the maps the programs read.
fn configure(ebpf: &mut Ebpf, s: &CaptureSettings) -> Result<(), CaptureError> {
    let map_err = |name: &str| {
        let name = name.to_owned();
        move |e: aya::maps::MapError| CaptureError::ebpf(format!("configure map {name}"), e)
    };
    let mut bits = 0;
    if s.outbound_fail_open {
        bits |= flags::OUTBOUND_FAIL_OPEN;
    }
    if s.skip_uid.is_some() {
        bits |= flags::SKIP_UID;
    }
    if s.inbound == InboundPorts::All {
        bits |= flags::INBOUND_ALL_PORTS;
    }
    let (mut node_ip4, mut node_ip6) = (0, [0; 4]);
    for ip in &s.node_ips {
        match ip {
            IpAddr::V4(v4) => {
                bits |= flags::NODE_IP4;
                node_ip4 = u32::from(*v4).to_be();
            }
            IpAddr::V6(v6) => {
                bits |= flags::NODE_IP6;
                node_ip6 = ip6_words(v6.octets());
            }
        }
    }
    let config = Config {
        outbound_ip4: u32::from(OUTBOUND_IP4).to_be(),
        outbound_ip6: ip6_words(OUTBOUND_IP6.octets()),
        outbound_port: s.outbound_port.into(),
        inbound_port: s.inbound_port.into(),
        mark: s.mark,
        skip_uid: s.skip_uid.unwrap_or(u32::MAX),
        flags: bits,
        node_ip4,
        node_ip6,
    };
    let mut array: Array<_, Config> =
        Array::try_from(map_mut(ebpf, map_names::CONFIG)).map_err(map_err(map_names::CONFIG))?;
    array
        .set(0, config, 0)
        .map_err(map_err(map_names::CONFIG))?;

    let mut ports: HashMap<_, u16, u8> =
        HashMap::try_from(map_mut(ebpf, map_names::EXCLUDED_PORTS))
            .map_err(map_err(map_names::EXCLUDED_PORTS))?;
    for &port in &s.exclude_ports {
        ports
            .insert(port, 1, 0)
            .map_err(map_err(map_names::EXCLUDED_PORTS))?;
    }

    let mut cidrs: LpmTrie<_, CidrKey, u8> =
        LpmTrie::try_from(map_mut(ebpf, map_names::EXCLUDED_CIDRS))
            .map_err(map_err(map_names::EXCLUDED_CIDRS))?;
    for net in &s.exclude_cidrs {
        let (prefix, bytes) = cidr_key(net);
        cidrs
            .insert(&Key::new(prefix, bytes), 1, 0)
            .map_err(map_err(map_names::EXCLUDED_CIDRS))?;
    }

    let mut inbound: HashMap<_, u16, u8> =
        HashMap::try_from(map_mut(ebpf, map_names::INBOUND_PORTS))
            .map_err(map_err(map_names::INBOUND_PORTS))?;
    let excluded = s.inbound_excluded();
    match &s.inbound {
        InboundPorts::None => {}
        InboundPorts::All => {
            for &port in &excluded {
                inbound
                    .insert(port, INBOUND_PORT_EXCLUDE, 0)
                    .map_err(map_err(map_names::INBOUND_PORTS))?;
            }
        }
        InboundPorts::Only(list) => {
            for &port in list {
                if excluded.contains(&port) {
                    tracing::warn!(port, "not capturing inbound traffic to an excluded port");
                    continue;
                }
                inbound
                    .insert(port, INBOUND_PORT_CAPTURE, 0)
                    .map_err(map_err(map_names::INBOUND_PORTS))?;
            }
        }
    }
    Ok(())
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut Map {
    ebpf.map_mut(name).expect("every map name is in the object")
}

/// The LPM key of a CIDR: IPv4 ranges as their v4-mapped IPv6 range.
fn cidr_key(net: &IpNet) -> (u32, CidrKey) {
    match net.network() {
        IpAddr::V4(ip) => (
            96 + u32::from(net.prefix_len()),
            ip.to_ipv6_mapped().octets(),
        ),
        IpAddr::V6(ip) => (u32::from(net.prefix_len()), ip.octets()),
    }
}

/// IPv6 octets as the four network-order words the programs use.
fn ip6_words(octets: [u8; 16]) -> [u32; 4] {
    let mut words = [0u32; 4];
    for (i, w) in words.iter_mut().enumerate() {
        *w = u32::from_ne_bytes(octets[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_ebpf_common::v4_mapped;

    #[test]
    fn cidr_keys_map_ipv4_into_ipv6() {
        let (prefix, bytes) = cidr_key(&"10.1.0.0/16".parse().unwrap());
        assert_eq!(prefix, 112);
        assert_eq!(&bytes[10..], &[0xff, 0xff, 10, 1, 0, 0]);
        let (prefix, _) = cidr_key(&"fd00::/8".parse().unwrap());
        assert_eq!(prefix, 8);
    }

    #[test]
    fn ip6_words_agree_with_the_kernel_side_mapping() {
        let ip = std::net::Ipv4Addr::new(10, 1, 2, 3);
        let words = ip6_words(ip.to_ipv6_mapped().octets());
        assert_eq!(words, v4_mapped(u32::from(ip).to_be()));
    }

    #[test]
    fn the_embedded_object_is_an_elf_file() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
    }
}
