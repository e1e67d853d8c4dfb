//! The `bpf(2)` commands aya 0.14 does not offer: pinning a `cgroup/getsockopt` link, and
//! reading what a pinned link is attached to.
//!
//! aya 0.14 attaches cgroup sockopt programs with `bpf_link_create` but offers no conversion
//! of that link to an `FdLink`, so it cannot be pinned and would detach when tern exits.
//! Its `LinkInfo` has no target (cgroup id, network namespace inode), which is how garbage
//! collection tells a dead capture from a live one. Nothing else uses raw syscalls.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use nix::libc;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_LINK_TYPE_CGROUP` and `BPF_LINK_TYPE_NETNS` in `enum bpf_link_type`.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_NETNS: u32 = 5;
/// `BPF_CGROUP_GETSOCKOPT` in `enum bpf_attach_type`.
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;

/// The leading fields of `union bpf_attr` for `BPF_LINK_CREATE`, zero-padded: the kernel
/// requires every byte past the fields a command reads to be zero.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 6],
}

/// The fields of `union bpf_attr` for `BPF_OBJ_PIN`, zero-padded.
#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
    _rest: [u64; 4],
}

/// The fields of `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`, zero-padded.
#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
    _rest: [u64; 4],
}

/// The fields of `union bpf_attr` for `BPF_PROG_GET_FD_BY_ID`, zero-padded.
#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
    _pad: u32,
    _rest: [u64; 4],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` prefix of `union bpf_attr` whose
    // size is passed with it; the kernel reads at most that many bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Attaches a loaded program to a cgroup with a new link and returns the link's fd.
pub fn create_cgroup_link(
    program: impl AsFd,
    cgroup: impl AsFd,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_fd().as_raw_fd() as u32,
        target_fd: cgroup.as_fd().as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Pins a link (or any bpf object) at `path` on bpffs.
pub fn pin(object: impl AsFd, path: &Path) -> io::Result<()> {
    let cpath = c_path(path)?;
    let mut attr = ObjPinAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: object.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens the bpf object (link, map or program) pinned at `path`.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let cpath = c_path(path)?;
    let mut attr = ObjPinAttr {
        pathname: cpath.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens a loaded program by its id.
pub fn program_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: BPF_PROG_GET_FD_BY_ID returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What a link is attached to, as the kernel reports it. A target of 0 means it is gone:
/// the kernel detaches a cgroup link when its cgroup is released and a netns link when its
/// network namespace is dismantled, but the link, its program and maps live on while pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// A cgroup link and the cgroup id it is attached to.
    Cgroup(u64),
    /// A network-namespace link and the namespace's inode.
    Netns(u32),
    Other,
}

/// A link's program id and target.
#[derive(Clone, Copy, Debug)]
pub struct LinkInfo {
    pub program_id: u32,
    pub target: LinkTarget,
}

/// The fields of `struct bpf_link_info` read here, then room for every variant of its union
/// (the kernel fills at most `info_len` bytes).
#[repr(C)]
#[derive(Default)]
struct LinkInfoPrefix {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    /// Start of the union: `cgroup.cgroup_id` (u64) or `netns.netns_ino` (u32).
    target: [u8; 8],
    _rest: [u64; 27],
}

/// Reads a link's kernel info (`struct bpf_link_info`).
pub fn link_info(link: impl AsFd) -> io::Result<LinkInfo> {
    let mut info = LinkInfoPrefix::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: link.as_fd().as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfoPrefix>() as u32,
        info: &mut info as *mut LinkInfoPrefix as u64,
        ..Default::default()
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let [a, b, c, d, ..] = info.target;
    let target = match info.link_type {
        BPF_LINK_TYPE_CGROUP => LinkTarget::Cgroup(u64::from_ne_bytes(info.target)),
        BPF_LINK_TYPE_NETNS => LinkTarget::Netns(u32::from_ne_bytes([a, b, c, d])),
        _ => LinkTarget::Other,
    };
    Ok(LinkInfo {
        program_id: info.prog_id,
        target,
    })
}

/// The kernel memory a bpf object holds (`memlock` in its `/proc/self/fdinfo` entry), in bytes.
pub fn memlock(object: impl AsFd) -> io::Result<u64> {
    let path = format!("/proc/self/fdinfo/{}", object.as_fd().as_raw_fd());
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no memlock in fdinfo"))
}
