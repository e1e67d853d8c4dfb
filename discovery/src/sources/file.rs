//! The services file as a source: read when it changes (checked every `interval`), refused
//! whole when it does not parse (the last good one stays).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::mpsc;

use super::SourceEvent;
use crate::config;

/// Reads the file once.
pub fn read(path: &Path) -> Result<config::Parsed, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    parse(path, &bytes)
}

/// Parses what was read from `path`.
fn parse(path: &Path, bytes: &[u8]) -> Result<config::Parsed, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    config::parse(text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The source's name.
pub fn name(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// Watches `path`, sending an event whenever its contents change (parsed from the bytes that
/// showed the change; the catalog logs a file it refuses).
pub async fn watch(path: PathBuf, interval: Duration, events: mpsc::Sender<SourceEvent>) {
    let mut last = std::fs::read(&path);
    loop {
        tokio::time::sleep(interval).await;
        let now = std::fs::read(&path);
        let unchanged = match (&now, &last) {
            (Ok(a), Ok(b)) => a == b,
            (Err(a), Err(b)) => a.kind() == b.kind(),
            _ => false,
        };
        if unchanged {
            continue;
        }
        let started = std::time::Instant::now();
        let result = match &now {
            Ok(bytes) => parse(&path, bytes),
            Err(e) => Err(format!("read {}: {e}", path.display())),
        };
        tracing::debug!(took = ?started.elapsed(), "services file read");
        last = now;
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
