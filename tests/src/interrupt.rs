//! Ctrl-C and SIGTERM for the long-running tools (`tern-demo`, `tern-bench`): the signal only
//! sets a flag, and the tool checks it between steps and returns an error, so its guards'
//! `Drop` removes the namespaces, cgroups, eBPF links and processes it made.
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Catches Ctrl-C and SIGTERM from now on (once per process).
pub fn catch() -> Result<()> {
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))
        .context("install the Ctrl-C handler")
}

/// Whether Ctrl-C or SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Fails once Ctrl-C or SIGTERM arrived, so the caller unwinds and cleans up.
pub fn check() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}
