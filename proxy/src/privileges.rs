//! Giving up privileges once capture is set up: the long-lived proxy runs as an unprivileged
//! uid with no capabilities (Istio's proxy runs as 1337 with none), so a compromised or
//! misdirected tern cannot load programs, detach hooks or touch other Pods' captures.
//!
//! What needs privileges is done before: attaching (or taking over) the capture, registering
//! the inbound socket in its sockmap, collecting dead captures, binding the listeners. After
//! it, tern's own sockets carry no `SO_MARK` (setting one needs `CAP_NET_ADMIN`): the capture
//! skips them by their uid instead (`--proxy-uid`, which must be this uid).
use std::io;

use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

/// Why privileges could not be given up (tern then refuses to serve).
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("give up privileges: {what}")]
    Call {
        what: &'static str,
        source: io::Error,
    },
    #[error("capabilities remain after switching to uid {uid}: CapEff {effective}")]
    Remaining { uid: u32, effective: String },
}

/// Switches every thread of the process to `uid` (and the same gid, no supplementary
/// groups), which clears its capabilities, and forbids gaining new ones; then checks that
/// none is left.
pub fn drop_to(uid: u32) -> Result<(), PrivilegeError> {
    let call = |what, e: nix::Error| PrivilegeError::Call {
        what,
        source: io::Error::from(e),
    };
    setgroups(&[]).map_err(|e| call("setgroups", e))?;
    let gid = Gid::from_raw(uid);
    setresgid(gid, gid, gid).map_err(|e| call("setresgid", e))?;
    let id = Uid::from_raw(uid);
    // From uid 0 to another, the kernel clears the permitted and effective capabilities
    // (no PR_SET_KEEPCAPS); glibc and musl apply it to every thread.
    setresuid(id, id, id).map_err(|e| call("setresuid", e))?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes no pointers and only affects this
    // process; its result is checked.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(PrivilegeError::Call {
            what: "prctl(PR_SET_NO_NEW_PRIVS)",
            source: io::Error::last_os_error(),
        });
    }
    let effective = capabilities("CapEff");
    if effective.as_deref() != Some("0000000000000000") {
        return Err(PrivilegeError::Remaining {
            uid,
            effective: effective.unwrap_or_default(),
        });
    }
    Ok(())
}

/// A capability set of this process as `/proc/self/status` shows it (`CapEff`, `CapPrm`, …).
fn capabilities(field: &str) -> Option<String> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}
