//! The services file as a source: read when it changes (checked every `interval`), refused
//! whole when it does not parse (the last good one stays).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::mpsc;
use tracing::warn;

use super::SourceEvent;
use crate::config;

/// Reads the file once.
pub fn read(path: &Path) -> Result<config::Parsed, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The source's name.
pub fn name(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// Watches `path`, sending an event whenever its contents change.
pub async fn watch(path: PathBuf, interval: Duration, events: mpsc::Sender<SourceEvent>) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(interval).await;
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        let started = std::time::Instant::now();
        let result = read(&path);
        tracing::debug!(took = ?started.elapsed(), "services file read");
        if let Err(e) = &result {
            warn!(error = %e, "the services file is refused; the last good one stays");
        }
        let event = SourceEvent {
            source: name(&path),
            kind: crate::catalog::SourceKind::Definitions,
            result,
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}
