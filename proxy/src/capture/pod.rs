//! Finding a Pod's cgroup from its UID, where the kubelet puts it, from inside a container.
//!
//! With `cgroupns=private` a container sees `0::/` in `/proc/self/cgroup` and its own cgroup at
//! `/sys/fs/cgroup`, so tern cannot learn the Pod's cgroup from itself. It finds it by name in
//! the node's hierarchy (mounted read-only into tern's container), as the kubelet names it:
//! - cgroupfs driver: `kubepods[/burstable|/besteffort]/pod<uid>`;
//! - systemd driver: `kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_>.slice`,
//!   with the UID's dashes turned into underscores.
//!
//! Those paths are tried first under the root; then the hierarchy is searched (bounded) for a
//! directory of either name, which covers kubelets run with a cgroup root (kind, `--cgroup-root`).
use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::CaptureError;

/// How the kubelet named the Pod's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    Cgroupfs,
    Systemd,
}

/// A Pod's cgroup found by [`find`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodCgroup {
    pub path: PathBuf,
    pub driver: Driver,
    /// `guaranteed`, `burstable` or `besteffort`, from the parent's name.
    pub qos: &'static str,
}

/// Directories searched at most, so a huge or looping hierarchy cannot stall startup.
const SEARCH_LIMIT: usize = 20_000;
const SEARCH_DEPTH: usize = 6;

/// Finds the cgroup of the Pod with this UID below `root` (the node's cgroup v2 mount).
pub fn find(root: &Path, uid: &str) -> Result<PodCgroup, CaptureError> {
    let uid = validate_uid(uid)?;
    let names = Names::new(&uid);
    for (relative, driver, qos) in names.known_paths() {
        let path = root.join(&relative);
        if path.is_dir() {
            return Ok(PodCgroup { path, driver, qos });
        }
    }
    let mut budget = SEARCH_LIMIT;
    search(root, &names, SEARCH_DEPTH, &mut budget).ok_or_else(|| CaptureError::PodCgroup {
        uid,
        root: root.to_owned(),
        why: format!(
            "no directory named {} (cgroupfs driver) or {} (systemd driver) within {SEARCH_DEPTH} \
             levels; is the node's cgroup v2 hierarchy mounted there?",
            names.cgroupfs, names.systemd_suffix
        ),
    })
}

/// Accepts the UID forms Kubernetes produces (hex digits and dashes); nothing that could
/// make a path leave the root.
fn validate_uid(uid: &str) -> Result<String, CaptureError> {
    let uid = uid.trim();
    let valid = !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if valid {
        Ok(uid.to_ascii_lowercase())
    } else {
        Err(CaptureError::PodCgroup {
            uid: uid.to_owned(),
            root: PathBuf::new(),
            why: "not a Pod UID (expected hex digits and dashes, as metadata.uid)".into(),
        })
    }
}

struct Names {
    /// `pod<uid>`.
    cgroupfs: String,
    /// `-pod<uid_with_underscores>.slice`.
    systemd_suffix: String,
    uid_: String,
}

impl Names {
    fn new(uid: &str) -> Self {
        let uid_ = uid.replace('-', "_");
        Self {
            cgroupfs: format!("pod{uid}"),
            systemd_suffix: format!("-pod{uid_}.slice"),
            uid_,
        }
    }

    fn known_paths(&self) -> Vec<(String, Driver, &'static str)> {
        let u = &self.uid_;
        let pod = &self.cgroupfs;
        vec![
            (format!("kubepods/{pod}"), Driver::Cgroupfs, "guaranteed"),
            (
                format!("kubepods/burstable/{pod}"),
                Driver::Cgroupfs,
                "burstable",
            ),
            (
                format!("kubepods/besteffort/{pod}"),
                Driver::Cgroupfs,
                "besteffort",
            ),
            (
                format!("kubepods.slice/kubepods-pod{u}.slice"),
                Driver::Systemd,
                "guaranteed",
            ),
            (
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
                Driver::Systemd,
                "burstable",
            ),
            (
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
                ),
                Driver::Systemd,
                "besteffort",
            ),
        ]
    }

    fn classify(&self, name: &str, parent: &str) -> Option<(Driver, &'static str)> {
        let qos = if parent.contains("burstable") {
            "burstable"
        } else if parent.contains("besteffort") {
            "besteffort"
        } else {
            "guaranteed"
        };
        if name == self.cgroupfs {
            Some((Driver::Cgroupfs, qos))
        } else if name.ends_with(&self.systemd_suffix) {
            Some((Driver::Systemd, qos))
        } else {
            None
        }
    }
}

fn search(dir: &Path, names: &Names, depth: usize, budget: &mut usize) -> Option<PodCgroup> {
    let entries = fs::read_dir(dir).ok()?;
    let parent = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut children = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        if *budget == 0 {
            return None;
        }
        *budget -= 1;
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((driver, qos)) = names.classify(name, parent) {
            return Some(PodCgroup {
                path: entry.path(),
                driver,
                qos,
            });
        }
        children.push(entry.path());
    }
    if depth == 0 {
        return None;
    }
    children
        .iter()
        .find_map(|child| search(child, names, depth - 1, budget))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn tree(dirs: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for d in dirs {
            fs::create_dir_all(root.path().join(d)).unwrap();
        }
        root
    }

    #[test]
    fn finds_both_drivers_and_every_qos_class() {
        let u = UID.replace('-', "_");
        for (dir, driver, qos) in [
            (format!("kubepods/pod{UID}"), Driver::Cgroupfs, "guaranteed"),
            (
                format!("kubepods/burstable/pod{UID}"),
                Driver::Cgroupfs,
                "burstable",
            ),
            (
                format!("kubepods/besteffort/pod{UID}"),
                Driver::Cgroupfs,
                "besteffort",
            ),
            (
                format!("kubepods.slice/kubepods-pod{u}.slice"),
                Driver::Systemd,
                "guaranteed",
            ),
            (
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
                Driver::Systemd,
                "burstable",
            ),
        ] {
            let root = tree(&[&dir, "kubepods/burstable/podother"]);
            let found = find(root.path(), UID).unwrap();
            assert_eq!(found.path, root.path().join(&dir));
            assert_eq!((found.driver, found.qos), (driver, qos), "{dir}");
        }
    }

    #[test]
    fn finds_pods_below_a_kubelet_cgroup_root() {
        let u = UID.replace('-', "_");
        let dir = format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice"
        );
        let root = tree(&[&dir]);
        let found = find(root.path(), &UID.to_uppercase()).unwrap();
        assert_eq!(found.path, root.path().join(&dir));
        assert_eq!((found.driver, found.qos), (Driver::Systemd, "besteffort"));
    }

    #[test]
    fn says_what_it_looked_for() {
        let root = tree(&["kubepods/burstable/podsomeoneelse"]);
        let err = find(root.path(), UID).unwrap_err().to_string();
        assert!(err.contains(&format!("pod{UID}")), "{err}");
        assert!(err.contains("-pod0f1e2d3c_4b5a"), "{err}");
        for bad in ["../../etc", "", "pod/x"] {
            let err = find(root.path(), bad).unwrap_err().to_string();
            assert!(err.contains("not a Pod UID"), "{bad}: {err}");
        }
    }
}
