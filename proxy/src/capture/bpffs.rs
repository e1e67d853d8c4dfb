//! bpffs: where tern pins its programs' links and maps so capture outlives the process.
//!
//! Layout: `<bpffs>/tern/cg-<cgroup id>/` holds one pin per map (by its name) and one per
//! link (`link_<program>`). Removing the directory detaches everything, because a pinned
//! link is the only reference that keeps a program attached once the loader has exited.
//!
//! An injected sidecar sees only its own Pod's directory of the node's bpffs,
//! `<bpffs>/tern-pods/<Pod UID>/`, mounted as its `/sys/fs/bpf` (a `subPathExpr`): its pins are
//! `<bpffs>/tern-pods/<Pod UID>/tern/cg-<cgroup id>/` on the node, where `tern capture status`
//! and `gc` find them too.
use std::{
    fs,
    path::{Path, PathBuf},
};

use nix::mount::{MsFlags, mount};

use super::CaptureError;

/// Where bpffs is mounted when the host has not mounted it elsewhere.
pub const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

/// Returns the bpffs mount point, mounting it at [`DEFAULT_MOUNT`] when absent.
pub fn ensure_mounted() -> Result<PathBuf, CaptureError> {
    if let Some(dir) = mount_point() {
        return Ok(dir);
    }
    let dir = Path::new(DEFAULT_MOUNT);
    fs::create_dir_all(dir).map_err(|e| CaptureError::io(format!("create {DEFAULT_MOUNT}"), e))?;
    mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| CaptureError::io(format!("mount bpffs at {DEFAULT_MOUNT}"), e.into()))?;
    tracing::info!(path = DEFAULT_MOUNT, "mounted bpffs");
    Ok(dir.to_owned())
}

/// The bpffs mount point, if one is mounted.
pub fn mount_point() -> Option<PathBuf> {
    super::mount_of_type("bpf")
}

/// The directory of tern's pins under a bpffs mount.
pub fn tern_root(bpffs: &Path) -> PathBuf {
    bpffs.join("tern")
}

/// The node's directory of per-Pod bpffs directories (one per Pod UID).
pub const PODS_DIR: &str = "tern-pods";

/// Every directory of tern's pins under a bpffs mount: its own, and each Pod's.
fn tern_roots(bpffs: &Path) -> Vec<PathBuf> {
    let mut roots = vec![tern_root(bpffs)];
    if let Ok(pods) = fs::read_dir(bpffs.join(PODS_DIR)) {
        roots.extend(pods.filter_map(Result::ok).map(|e| tern_root(&e.path())));
    }
    roots
}

/// The pin directory of the capture attached to the cgroup with this id.
pub fn pin_dir(bpffs: &Path, cgroup_id: u64) -> PathBuf {
    tern_root(bpffs).join(format!("cg-{cgroup_id}"))
}

/// The cgroup id a pin directory belongs to, from its name.
pub fn cgroup_id_of(pin_dir: &Path) -> Option<u64> {
    pin_dir
        .file_name()?
        .to_str()?
        .strip_prefix("cg-")?
        .parse()
        .ok()
}

/// Every capture's pin directory under a bpffs mount, the Pods' directories included.
pub fn capture_dirs(bpffs: &Path) -> Vec<PathBuf> {
    tern_roots(bpffs)
        .iter()
        .filter_map(|root| fs::read_dir(root).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir() && cgroup_id_of(p).is_some())
        .collect()
}

/// The pin directory of the capture of this cgroup: where it is pinned, or where this process
/// would pin it.
pub fn find_pin_dir(bpffs: &Path, cgroup_id: u64) -> PathBuf {
    capture_dirs(bpffs)
        .into_iter()
        .find(|d| cgroup_id_of(d) == Some(cgroup_id))
        .unwrap_or_else(|| pin_dir(bpffs, cgroup_id))
}

/// Removes tern's directories left empty once their last capture is gone: its own and each
/// Pod's (a Pod's fails while its sidecar still mounts it, or a capture remains).
pub fn remove_empty_roots(bpffs: &Path) {
    for root in tern_roots(bpffs) {
        if fs::remove_dir(&root).is_ok()
            && let Some(pod) = root
                .parent()
                .filter(|p| p.parent() == Some(&bpffs.join(PODS_DIR)))
        {
            let _ = fs::remove_dir(pod);
        }
    }
    // The kubelet makes it again for the next Pod (hostPath `DirectoryOrCreate`).
    let _ = fs::remove_dir(bpffs.join(PODS_DIR));
}

/// Pin path of a program's link.
pub fn link_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link_{program}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dir_names_round_trip() {
        let dir = pin_dir(Path::new("/sys/fs/bpf"), 4242);
        assert_eq!(dir, Path::new("/sys/fs/bpf/tern/cg-4242"));
        assert_eq!(cgroup_id_of(&dir), Some(4242));
        assert_eq!(cgroup_id_of(Path::new("/sys/fs/bpf/tern/other")), None);
    }

    /// Captures pinned by injected sidecars, each in its Pod's directory, are found from the
    /// node's bpffs; emptied Pod directories go (a tmpfs stands in for bpffs: only directories).
    #[test]
    fn pod_directories_are_walked_and_emptied() {
        let root = std::env::temp_dir().join(format!("tern-bpffs-{}", std::process::id()));
        let own = pin_dir(&root, 1);
        let pod = pin_dir(&root.join(PODS_DIR).join("uid-a"), 2);
        fs::create_dir_all(&own).unwrap();
        fs::create_dir_all(&pod).unwrap();
        fs::create_dir_all(root.join(PODS_DIR).join("uid-b")).unwrap();
        let mut found = capture_dirs(&root);
        found.sort();
        assert_eq!(found, [own.clone(), pod.clone()]);
        assert_eq!(find_pin_dir(&root, 2), pod);
        assert_eq!(find_pin_dir(&root, 3), pin_dir(&root, 3));
        fs::remove_dir(&pod).unwrap();
        remove_empty_roots(&root);
        assert!(!root.join(PODS_DIR).join("uid-a").exists());
        assert!(
            root.join(PODS_DIR).join("uid-b").exists(),
            "not tern's: kept"
        );
        assert!(own.exists());
        fs::remove_dir(root.join(PODS_DIR).join("uid-b")).unwrap();
        remove_empty_roots(&root);
        assert!(!root.join(PODS_DIR).exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
