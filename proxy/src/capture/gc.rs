//! Captures whose Pod is gone: tell them from live ones by what their links report, and
//! remove their pins.
//!
//! Fail-open deliberately leaves the hooks pinned when tern dies. When the Pod is deleted
//! afterwards, the kernel detaches its cgroup links (the cgroup is released) and its
//! `sk_lookup` link (the network namespace is dismantled), but the pins keep the links, the
//! programs and the maps until someone removes them. A capture is dead when one of its links
//! reports its target gone (cgroup id 0, namespace inode 0). Nothing else counts as dead: a
//! directory without links may be an attach in progress, and a cgroup this process cannot see
//! (tern in a container with its own cgroup namespace) is not a deleted one.
use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::Serialize;
use tern_ebpf_common::program_names;

use super::{
    CaptureError, bpffs,
    sys::{self, LinkTarget},
};

/// Whether the Pod a capture was attached for still exists, from its links.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// Every link is attached to a live cgroup or network namespace.
    Live,
    /// The cgroup the hooks were attached to has been removed.
    CgroupGone,
    /// The network namespace of the inbound hook has been dismantled.
    NetnsGone,
}

impl Liveness {
    pub fn is_dead(self) -> bool {
        self != Self::Live
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::CgroupGone => "cgroup gone",
            Self::NetnsGone => "network namespace gone",
        }
    }
}

/// What the links pinned in `dir` report about their targets.
pub fn liveness(dir: &Path) -> Liveness {
    for program in program_names::ALL {
        let Ok(link) = sys::open_pinned(&bpffs::link_pin(dir, program)) else {
            continue;
        };
        match sys::link_info(&link).map(|i| i.target) {
            Ok(LinkTarget::Cgroup(0)) => return Liveness::CgroupGone,
            Ok(LinkTarget::Netns(0)) => return Liveness::NetnsGone,
            _ => {}
        }
    }
    Liveness::Live
}

/// The kernel memory a pinned capture holds: its maps and the programs of its links, in bytes.
pub fn kernel_memory(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.filter_map(Result::ok) {
        let Ok(object) = sys::open_pinned(&entry.path()) else {
            continue;
        };
        let is_link = entry.file_name().to_string_lossy().starts_with("link_");
        total += if is_link {
            sys::link_info(&object)
                .and_then(|info| sys::program_by_id(info.program_id))
                .and_then(sys::memlock)
                .unwrap_or(0)
        } else {
            sys::memlock(&object).unwrap_or(0)
        };
    }
    total
}

/// One capture removed by [`collect`].
#[derive(Debug, Serialize)]
pub struct Collected {
    pub cgroup_id: u64,
    pub pins: PathBuf,
    pub why: Liveness,
    /// Kernel memory it held, in bytes.
    pub kernel_memory: u64,
}

/// Removes every pinned capture whose cgroup or network namespace is gone; the first failure
/// (after trying every capture) is the error.
pub fn collect() -> Result<Vec<Collected>, CaptureError> {
    let Some(mount) = bpffs::mount_point() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut failed = None;
    for dir in bpffs::capture_dirs(&mount) {
        let Some(cgroup_id) = bpffs::cgroup_id_of(&dir) else {
            continue;
        };
        let why = liveness(&dir);
        if !why.is_dead() {
            continue;
        }
        let kernel_memory = kernel_memory(&dir);
        if let Err(e) = fs::remove_dir_all(&dir) {
            // One capture that cannot be removed does not keep the others.
            let e = CaptureError::io(format!("remove the pins at {}", dir.display()), e);
            tracing::warn!(error = %e, "could not remove a dead capture");
            failed.get_or_insert(e);
            continue;
        }
        tracing::info!(
            pins = %dir.display(),
            why = why.describe(),
            kernel_memory,
            "removed the capture of a Pod that is gone"
        );
        out.push(Collected {
            cgroup_id,
            pins: dir,
            why,
            kernel_memory,
        });
    }
    bpffs::remove_empty_roots(&mount);
    match failed {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
