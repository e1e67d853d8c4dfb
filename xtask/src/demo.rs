//! `cargo xtask demo`: tern's eBPF capture, for real, on two network namespaces.
//!
//! An application Pod (a namespace and a cgroup, with tern as its sidecar) dials a server in
//! another namespace by its address. The demo shows the hooks tern attached, that no iptables
//! rule exists, what the application and the server each saw, then stops tern and shows that
//! nothing is left. Everything is removed on exit, also on failure (the guards' `Drop`).
use anyhow::{Result, ensure};
use tern_tests::{Cgroup, Netns, Tern, connect, link, serve};

/// Runs the demo with the `tern` built beside xtask in `target/debug`.
pub fn run() -> Result<()> {
    let app = Netns::new("demo-app")?;
    let srv = Netns::new("demo-srv")?;
    link(&app, "10.77.0.1/24", &srv, "10.77.0.2/24")?;
    let cgroup = Cgroup::new("demo")?;
    println!(
        "topology   app Pod {} (10.77.0.1, cgroup {})",
        app.name(),
        cgroup.path().display()
    );
    println!("           server  {} (10.77.0.2:8080)", srv.name());

    let _server = serve(&srv, &["10.77.0.2:8080"])?;
    let mut tern = Tern::start(
        &app,
        Some(&cgroup),
        &[
            "run",
            "--capture",
            "ebpf",
            "--cgroup",
            cgroup.path_str(),
            "--inbound-ports",
            "",
        ],
    )?;

    let (_, status, _) = tern_tests::tern(&["capture", "status", "--cgroup", cgroup.path_str()]);
    println!("\n$ tern capture status\n{status}");
    let rules = app.iptables_rules()?;
    println!("iptables rules in the app Pod: {}", rules.len());
    ensure!(rules.is_empty(), "the demo found iptables rules: {rules:?}");

    println!("\nthe application connects to 10.77.0.2:8080 …");
    let c = connect(&app, Some(&cgroup), "10.77.0.2:8080");
    ensure!(c.ok(), "the connection failed: {c:?}");
    println!(
        "  application's own address   {}",
        c.local.as_deref().unwrap_or("?")
    );
    println!(
        "  application's getpeername() {}   (the address it dialled)",
        c.peer.as_deref().unwrap_or("?")
    );
    println!(
        "  server saw the client as    {}   (tern's upstream connection)",
        c.server_saw.as_deref().unwrap_or("?")
    );
    println!(
        "  relayed through tern: {}",
        if c.proxied() { "yes" } else { "NO" }
    );
    ensure!(c.proxied(), "the connection bypassed tern");

    let (_, status, _) = tern_tests::tern(&["capture", "status", "--cgroup", cgroup.path_str()]);
    let counters: Vec<&str> = status
        .lines()
        .filter(|l| {
            l.contains("connect.redirected")
                || l.contains("getsockopt.answered")
                || l.contains("getpeername.rewritten")
        })
        .collect();
    println!("\ncounters after the call:\n{}", counters.join("\n"));

    tern.process.terminate()?;
    let (_, after, _) = tern_tests::tern(&["capture", "status"]);
    println!("\nafter tern stopped: {}", after.trim());
    println!("cleaning up namespaces and the cgroup");
    Ok(())
}
