//! The services file as a source: read when it changes (its metadata checked every
//! `interval`), refused whole when it does not parse (the last good one stays).
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

/// What tells a file changed without reading it: its size, modification time and inode (a
/// rename over it is a new inode).
fn stamp(path: &Path) -> Option<(u64, std::time::SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

/// How long after its last modification a file is trusted to be unchanged while its stamp
/// is.
const SETTLED: Duration = Duration::from_secs(2);

/// Watches `path`, sending an event whenever its contents change, once they held still for
/// one interval (a file written in place is read half-written at times, and half a file may
/// well parse: it would take services away from every client for a moment). The event is
/// parsed from the bytes that showed the change; the catalog logs a file it refuses. A file
/// modified more than two seconds (`SETTLED`) ago is read again only when its size,
/// modification time or inode changed.
pub async fn watch(path: PathBuf, interval: Duration, events: mpsc::Sender<SourceEvent>) {
    let mut seen = stamp(&path);
    let mut contents = Settling::new(std::fs::read(&path));
    loop {
        tokio::time::sleep(interval).await;
        let now_seen = stamp(&path);
        // Modification times move in clock ticks: two writes of the same size within one
        // tick look alike, so a file modified lately is compared by its bytes.
        let settled = now_seen
            .is_some_and(|(_, modified, _)| modified.elapsed().is_ok_and(|age| age > SETTLED));
        if settled && now_seen == seen && !contents.changing() {
            continue;
        }
        seen = now_seen;
        let Some(now) = contents.check(std::fs::read(&path)) else {
            continue;
        };
        let started = std::time::Instant::now();
        let result = match now {
            Ok(bytes) => parse(&path, bytes),
            Err(e) => Err(format!("read {}: {e}", path.display())),
        };
        tracing::debug!(took = ?started.elapsed(), "services file read");
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

type Read = std::io::Result<Vec<u8>>;

/// A file's contents as checked over time: new contents count once two checks in a row
/// found them.
struct Settling {
    /// What was last taken.
    taken: Read,
    /// Contents that differ from `taken`, found by the previous check.
    changing: Option<Read>,
}

impl Settling {
    fn new(first: Read) -> Self {
        Self {
            taken: first,
            changing: None,
        }
    }

    /// Whether the last check found new contents that are not taken yet.
    fn changing(&self) -> bool {
        self.changing.is_some()
    }

    /// One check's read: the contents to take, when they are new and the previous check
    /// found them too.
    fn check(&mut self, now: Read) -> Option<&Read> {
        if same(&now, &self.taken) {
            self.changing = None;
            return None;
        }
        if !self.changing.as_ref().is_some_and(|c| same(c, &now)) {
            self.changing = Some(now);
            return None;
        }
        self.changing = None;
        self.taken = now;
        Some(&self.taken)
    }
}

/// Whether two reads found the same (the same bytes, or the same failure).
fn same(a: &Read, b: &Read) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => a.kind() == b.kind(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Read {
        Ok(text.as_bytes().to_vec())
    }

    #[test]
    fn contents_count_once_they_held_still_for_a_check() {
        let mut file = Settling::new(read("a"));
        assert!(file.check(read("a")).is_none(), "unchanged");
        // Half written, then whole: the half is never taken.
        assert!(file.check(read("services:\n  - half")).is_none());
        assert!(file.check(read("services:\n  - whole")).is_none());
        assert_eq!(
            file.check(read("services:\n  - whole"))
                .unwrap()
                .as_ref()
                .unwrap(),
            b"services:\n  - whole"
        );
        assert!(
            file.check(read("services:\n  - whole")).is_none(),
            "taken once"
        );
        // Changed and changed back between checks: nothing.
        assert!(file.check(read("other")).is_none());
        assert!(file.check(read("services:\n  - whole")).is_none());
        assert!(!file.changing());
        // A file that goes away is a change too, once it stays away.
        let gone = || Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(file.check(gone()).is_none());
        assert!(file.check(gone()).unwrap().is_err());
    }
}
