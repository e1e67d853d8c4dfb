//! iptables capture: Istio-style `nat` REDIRECT rules, for kernels without tern's eBPF hooks
//! and for side-by-side benchmarks.
//!
//! Outbound TCP from the network namespace goes to the outbound listener (skipping the
//! proxy's mark, the proxy uid, loopback and the excluded ports and ranges); inbound TCP to
//! the captured ports goes to the inbound listener. The kernel's conntrack then answers
//! `SO_ORIGINAL_DST` on the accepted socket, which is the call the proxy makes under eBPF too.
//!
//! Rules are installed and removed with `iptables-restore --noflush`, one transaction per
//! family, so a failure never leaves half a ruleset. Unlike eBPF capture, these rules cannot
//! fail open: while they are installed and the proxy is down, captured connections are refused.
use std::{
    io::Write,
    net::IpAddr,
    process::{Command, Stdio},
};

use super::{CaptureError, CaptureSettings, InboundPorts};

const CHAINS: [&str; 4] = [
    "TERN_OUTPUT",
    "TERN_REDIRECT",
    "TERN_INBOUND",
    "TERN_IN_REDIRECT",
];
/// Source address the proxy uses to reach the local application (as Istio does).
const INBOUND_PASSTHROUGH_SRC: &str = "127.0.0.6";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

/// Installed REDIRECT rules in the current network namespace. They stay when tern exits:
/// while it is down, redirected connections find nothing listening and are refused, never let
/// through; they go with the Pod's network namespace, and a restarted tern takes them over.
pub struct IptablesCapture {
    families: Vec<Family>,
}

impl IptablesCapture {
    /// Installs the rules for both families, or none.
    pub fn install(settings: &CaptureSettings) -> Result<Self, CaptureError> {
        let mut installed = Self {
            families: Vec::new(),
        };
        for family in [Family::V4, Family::V6] {
            // A tern that ran here before left its rules. No tern runs here now (this one
            // holds the listeners' ports): take them over, with this start's settings.
            if chain_exists(family, CHAINS[0]) {
                tracing::info!(
                    family = family.iptables(),
                    "taking over the capture rules a previous tern left"
                );
                restore(family, &remove_rules())?;
            }
            if let Err(e) = restore(family, &install_rules(family, settings)) {
                installed.remove();
                return Err(e);
            }
            installed.families.push(family);
        }
        tracing::info!("iptables capture installed");
        Ok(installed)
    }

    /// Removes the rules this handle installed (a half-done install).
    fn remove(&mut self) {
        for family in self.families.drain(..) {
            if let Err(e) = restore(family, &remove_rules()) {
                tracing::warn!(error = %e, "could not remove iptables capture rules");
            }
        }
    }
}

fn chain_exists(family: Family, chain: &str) -> bool {
    Command::new(family.iptables())
        .args(["-w", "-t", "nat", "-S", chain])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn restore(family: Family, rules: &str) -> Result<(), CaptureError> {
    let what = format!("{} --noflush", family.restore());
    let mut child = Command::new(family.restore())
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CaptureError::io(format!("run {what} (is iptables installed?)"), e))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(rules.as_bytes())
        .map_err(|e| CaptureError::io(format!("write rules to {what}"), e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| CaptureError::io(format!("wait for {what}"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CaptureError::Command {
            what,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The `iptables-restore` input that installs capture for one family.
fn install_rules(family: Family, s: &CaptureSettings) -> String {
    let mut r = String::from("*nat\n");
    for chain in CHAINS {
        r += &format!(":{chain} - [0:0]\n");
    }
    r += &format!(
        "-A TERN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
        s.outbound_port
    );
    r += &format!(
        "-A TERN_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
        s.inbound_port
    );

    r += &format!("-A TERN_OUTPUT -m mark --mark {:#x} -j RETURN\n", s.mark);
    if let Some(uid) = s.skip_uid {
        r += &format!("-A TERN_OUTPUT -m owner --uid-owner {uid} -j RETURN\n");
    }
    r += &format!("-A TERN_OUTPUT -d {} -j RETURN\n", family.loopback());
    for port in &s.exclude_ports {
        r += &format!("-A TERN_OUTPUT -p tcp --dport {port} -j RETURN\n");
    }
    for net in &s.exclude_cidrs {
        let same_family = matches!(
            (family, net.network()),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        );
        if same_family {
            r += &format!("-A TERN_OUTPUT -d {net} -j RETURN\n");
        }
    }
    r += "-A TERN_OUTPUT -j TERN_REDIRECT\n";

    if family == Family::V4 {
        r += &format!("-A TERN_INBOUND -s {INBOUND_PASSTHROUGH_SRC} -j RETURN\n");
    }
    for ip in &s.node_ips {
        if matches!(
            (family, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        ) {
            r += &format!("-A TERN_INBOUND -s {ip} -j RETURN\n");
        }
    }
    match &s.inbound {
        InboundPorts::None => {}
        InboundPorts::All => {
            for port in s.inbound_excluded() {
                r += &format!("-A TERN_INBOUND -p tcp --dport {port} -j RETURN\n");
            }
            r += "-A TERN_INBOUND -p tcp -j TERN_IN_REDIRECT\n";
        }
        InboundPorts::Only(ports) => {
            let excluded = s.inbound_excluded();
            for port in ports.iter().filter(|p| !excluded.contains(p)) {
                r += &format!("-A TERN_INBOUND -p tcp --dport {port} -j TERN_IN_REDIRECT\n");
            }
        }
    }
    r += "-A OUTPUT -p tcp -j TERN_OUTPUT\n";
    r += "-A PREROUTING -p tcp -j TERN_INBOUND\n";
    r += "COMMIT\n";
    r
}

/// The `iptables-restore --noflush` input that removes what [`install_rules`] added.
fn remove_rules() -> String {
    let mut r = String::from("*nat\n");
    // Declaring a chain in a --noflush transaction flushes it, so the -X below succeeds.
    for chain in CHAINS {
        r += &format!(":{chain} - [0:0]\n");
    }
    r += "-D OUTPUT -p tcp -j TERN_OUTPUT\n";
    r += "-D PREROUTING -p tcp -j TERN_INBOUND\n";
    for chain in CHAINS {
        r += &format!("-X {chain}\n");
    }
    r += "COMMIT\n";
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{parse_cidrs, parse_ports};

    fn settings(inbound: InboundPorts) -> CaptureSettings {
        CaptureSettings {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_ports: vec![15000],
            mark: 0x539,
            skip_uid: Some(1337),
            exclude_ports: parse_ports("22").unwrap(),
            exclude_cidrs: parse_cidrs("10.9.0.0/16,fd00::/8").unwrap(),
            inbound,
            exclude_inbound_ports: vec![8081],
            outbound_fail_open: false,
            node_ips: vec!["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        }
    }

    #[test]
    fn node_addresses_bypass_inbound_capture_in_their_family() {
        let v4 = install_rules(Family::V4, &settings(InboundPorts::All));
        assert!(v4.contains("-A TERN_INBOUND -s 10.0.0.7 -j RETURN"), "{v4}");
        assert!(!v4.contains("fd00::7"), "{v4}");
        let v6 = install_rules(Family::V6, &settings(InboundPorts::All));
        assert!(v6.contains("-A TERN_INBOUND -s fd00::7 -j RETURN"), "{v6}");
        let before =
            |r: &str| r.find("-s fd00::7").unwrap() < r.find("TERN_IN_REDIRECT\n").unwrap();
        assert!(before(&v6), "{v6}");
    }

    #[test]
    fn ipv4_rules_skip_mark_uid_loopback_and_exclusions() {
        let r = install_rules(Family::V4, &settings(InboundPorts::Only(vec![8080])));
        assert!(r.contains("-A TERN_OUTPUT -m mark --mark 0x539 -j RETURN"));
        assert!(r.contains("--uid-owner 1337 -j RETURN"));
        assert!(r.contains("-A TERN_OUTPUT -d 127.0.0.0/8 -j RETURN"));
        assert!(r.contains("--dport 22 -j RETURN"));
        assert!(r.contains("-d 10.9.0.0/16 -j RETURN"));
        assert!(!r.contains("fd00::/8"), "an IPv6 range in IPv4 rules:\n{r}");
        assert!(r.contains("-A TERN_INBOUND -p tcp --dport 8080 -j TERN_IN_REDIRECT"));
        assert!(r.contains("REDIRECT --to-ports 15001"));
        assert!(r.ends_with("COMMIT\n"));
    }

    #[test]
    fn all_inbound_ports_leave_the_proxy_ports_alone() {
        let r = install_rules(Family::V6, &settings(InboundPorts::All));
        for port in [15000, 15001, 15006] {
            assert!(
                r.contains(&format!("--dport {port} -j RETURN")),
                "{port} in\n{r}"
            );
        }
        assert!(r.contains("-d fd00::/8 -j RETURN"));
        assert!(r.contains("-d ::1/128 -j RETURN"));
    }

    #[test]
    fn removal_undoes_every_chain() {
        let r = remove_rules();
        for chain in CHAINS {
            assert!(r.contains(&format!("-X {chain}")));
        }
    }
}
