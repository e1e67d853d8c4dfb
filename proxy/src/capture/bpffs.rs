//! bpffs: where tern pins its programs' links and maps so capture outlives the process.
//!
//! Layout: `<bpffs>/tern/cg-<cgroup id>/` holds one pin per map (by its name) and one per
//! link (`link_<program>`). Removing the directory detaches everything, because a pinned
//! link is the only reference that keeps a program attached once the loader has exited.
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

/// Every capture's pin directory under a bpffs mount.
pub fn capture_dirs(bpffs: &Path) -> Vec<PathBuf> {
    match fs::read_dir(tern_root(bpffs)) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir() && cgroup_id_of(p).is_some())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Removes tern's directory once the last capture is gone (it fails while one remains).
pub fn remove_root_if_empty(bpffs: &Path) {
    let _ = fs::remove_dir(tern_root(bpffs));
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
}
