//! `tern check`: can this kernel run tern's capture? Load and probe, never guess by version.
use std::path::Path;

use super::{
    bpffs,
    cgroup::{self, CgroupDir},
    ebpf,
};

/// One line of the report.
#[derive(Debug)]
pub struct Finding {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

/// Probes everything eBPF capture needs: the cgroup v2 mount, BTF, bpffs, and every program
/// loaded through the verifier (which checks each program type and helper it uses).
pub fn run() -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |what: &str, result: Result<String, String>| {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        out.push(Finding {
            what: what.to_owned(),
            ok,
            detail,
        });
    };

    add(
        "cgroup v2 mount",
        cgroup::cgroup2_mount()
            .map(|p| p.display().to_string())
            .ok_or_else(|| "no cgroup2 filesystem in /proc/mounts".to_owned()),
    );
    add(
        "kernel BTF",
        Path::new("/sys/kernel/btf/vmlinux")
            .is_file()
            .then(|| "/sys/kernel/btf/vmlinux".to_owned())
            .ok_or_else(|| "/sys/kernel/btf/vmlinux is missing (CONFIG_DEBUG_INFO_BTF)".to_owned()),
    );
    add(
        "bpffs",
        bpffs::ensure_mounted()
            .map(|p| p.display().to_string())
            .map_err(|e| e.to_string()),
    );
    match ebpf::probe_programs() {
        Ok(programs) => {
            for (name, result) in programs {
                add(
                    &format!("program {name}"),
                    result.map(|()| "loads (verifier accepted)".to_owned()),
                );
            }
        }
        Err(e) => add("eBPF object", Err(e.to_string())),
    }
    out
}

/// What `tern check` says of the Pod's cgroup: which one, how it was found, and whether tern
/// runs inside it (the getsockopt hook answers only there).
pub fn pod(resolved: Result<(CgroupDir, String), String>) -> Vec<Finding> {
    match resolved {
        Ok((cgroup, how)) => {
            let inside = cgroup.contains_self();
            vec![
                Finding {
                    what: "Pod cgroup".into(),
                    ok: true,
                    detail: format!("{} (id {}; {how})", cgroup.path().display(), cgroup.id()),
                },
                Finding {
                    what: "tern inside the Pod cgroup".into(),
                    ok: inside,
                    detail: if inside {
                        "yes: its pid is listed in the subtree's cgroup.procs".into()
                    } else {
                        "no: tern must run as a container of the Pod".into()
                    },
                },
            ]
        }
        Err(why) => vec![Finding {
            what: "Pod cgroup".into(),
            ok: false,
            detail: why,
        }],
    }
}
