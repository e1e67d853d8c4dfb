//! The one link aya 0.14 cannot pin: `cgroup/getsockopt`.
//!
//! aya 0.14 attaches cgroup sockopt programs with `bpf_link_create` but offers no conversion
//! of that link to an `FdLink`, so it cannot be pinned and would detach when tern exits.
//! This module makes the link and pins it with the two `bpf(2)` commands aya uses for the
//! other program types (`BPF_LINK_CREATE`, `BPF_OBJ_PIN`). Nothing else uses raw syscalls.
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
const BPF_LINK_CREATE: libc::c_long = 28;
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

/// Pins a link (or any bpf object) at `path` on bpffs.
pub fn pin(object: impl AsFd, path: &Path) -> io::Result<()> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjPinAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: object.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}
