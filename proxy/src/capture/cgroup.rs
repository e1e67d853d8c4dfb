//! Cgroup v2 directories: finding the mount, validating a path, telling whether tern is inside.
//!
//! The connect, sock_ops and getsockopt hooks attach to a cgroup v2 directory and see the
//! sockets created by processes in it or below it. The mount point differs between hosts
//! (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones), so it is
//! read from `/proc/mounts`, never assumed.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::CaptureError;

/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// A validated cgroup v2 directory.
#[derive(Clone, Debug)]
pub struct CgroupDir {
    path: PathBuf,
    id: u64,
}

impl CgroupDir {
    /// Validates that `path` exists and is a directory of a cgroup v2 hierarchy.
    pub fn open(path: &Path) -> Result<Self, CaptureError> {
        let meta = fs::metadata(path).map_err(|source| CaptureError::CgroupMissing {
            path: path.to_owned(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(CaptureError::NotCgroup2 {
                path: path.to_owned(),
                why: "not a directory".into(),
            });
        }
        let fs = nix::sys::statfs::statfs(path).map_err(|e| CaptureError::CgroupMissing {
            path: path.to_owned(),
            source: e.into(),
        })?;
        let magic = fs.filesystem_type().0 as i64;
        if magic != CGROUP2_SUPER_MAGIC {
            return Err(CaptureError::NotCgroup2 {
                path: path.to_owned(),
                why: format!(
                    "its filesystem type is {magic:#x}, not cgroup2 ({CGROUP2_SUPER_MAGIC:#x}); \
                     the cgroup v2 mount here is {}",
                    cgroup2_mount()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "missing".into())
                ),
            });
        }
        let path = fs::canonicalize(path).map_err(|source| CaptureError::CgroupMissing {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path,
            id: meta.ino(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's cgroup id (the directory's inode number on cgroup v2).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether the calling process is in this cgroup or directly below it (a Pod's cgroup
    /// holds its containers' cgroups): its pid is listed in the `cgroup.procs` of this
    /// cgroup or of a child. That holds from inside a container too, where `/proc/self/cgroup`
    /// says `0::/` and pids are shown as this process's namespace sees them. An ancestor
    /// further up (a QoS slice, `kubepods`) would hold other Pods: it is not tern's to capture.
    pub fn contains_self(&self) -> bool {
        let pid = std::process::id().to_string();
        let lists_self = |dir: &Path| {
            fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.trim() == pid)
        };
        if lists_self(&self.path) {
            return true;
        }
        let Ok(entries) = fs::read_dir(&self.path) else {
            return false;
        };
        entries
            .filter_map(Result::ok)
            .take(10_000)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .any(|e| lists_self(&e.path()))
    }

    /// Refuses a cgroup tern is not inside (see [`CaptureError::NotInside`]).
    pub fn require_self_inside(&self) -> Result<(), CaptureError> {
        if self.contains_self() {
            Ok(())
        } else {
            Err(CaptureError::NotInside {
                cgroup: self.path.clone(),
            })
        }
    }
}

/// The cgroup v2 hierarchy at or below `root`: a node's `/sys/fs/cgroup` mounted into a
/// container is the v2 hierarchy itself on unified hosts, and a tmpfs of v1 controllers with
/// the v2 hierarchy at `unified/` on hybrid ones.
pub fn v2_root(root: &Path) -> PathBuf {
    let is_v2 = |p: &Path| {
        nix::sys::statfs::statfs(p).is_ok_and(|fs| fs.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
    };
    let unified = root.join("unified");
    if !is_v2(root) && is_v2(&unified) {
        unified
    } else {
        root.to_owned()
    }
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/mounts`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    super::mount_of_type("cgroup2")
}

/// Finds the directory of the cgroup with this id below the v2 mount (for status output).
pub fn find_by_id(id: u64) -> Option<PathBuf> {
    find_by_id_below(&cgroup2_mount()?, id)
}

/// Finds the directory of the cgroup with this id below `root` (at most 8 levels down).
pub fn find_by_id_below(root: &Path, id: u64) -> Option<PathBuf> {
    fn walk(dir: &Path, id: u64, depth: usize) -> Option<PathBuf> {
        if fs::metadata(dir).ok()?.ino() == id {
            return Some(dir.to_owned());
        }
        if depth == 0 {
            return None;
        }
        fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .find_map(|e| walk(&e.path(), id, depth - 1))
    }
    walk(root, id, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_cgroup2_mount_when_present() {
        // Every supported host has one; the test documents what the function reads.
        if let Some(m) = cgroup2_mount() {
            assert!(m.is_dir(), "{} should be a directory", m.display());
        }
    }

    #[test]
    fn rejects_a_missing_path() {
        let err = CgroupDir::open(Path::new("/nonexistent/tern-cgroup")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tern-cgroup"),
            "{err}"
        );
    }

    #[test]
    fn rejects_a_directory_that_is_not_cgroup2() {
        let err = CgroupDir::open(Path::new("/tmp")).unwrap_err();
        assert!(
            err.to_string().contains("not a cgroup v2 directory"),
            "{err}"
        );
    }
}
