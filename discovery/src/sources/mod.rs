//! Where services come from. Each source runs as its own task and reports what it read (or
//! why it could not) as [`SourceEvent`]s; the catalog merges them.
pub mod etcd;
pub mod file;
pub mod zookeeper;

use tokio::sync::mpsc;

use crate::{catalog::SourceKind, config::Parsed};

/// What a source read.
#[derive(Debug)]
pub struct SourceEvent {
    /// The source's name (`file:<path>`, `etcd:<prefix>`, …).
    pub source: String,
    pub kind: SourceKind,
    /// Its services, or why it could not read them.
    pub result: Result<Parsed, String>,
}

/// A registry read over sessions: each reads and watches until it fails.
pub trait Registry: Send + Sync + 'static {
    /// The source's name, as events and the admin port show it.
    fn name(&self) -> String;

    /// One session: reads the registry, sends what it read, keeps watching; returns why it
    /// ended. Resets `backoff` once it got through.
    fn session(
        &self,
        events: &mpsc::Sender<SourceEvent>,
        backoff: &mut Backoff,
    ) -> impl std::future::Future<Output = String> + Send;
}

/// Runs `registry`'s sessions until `events` closes: each failure is reported (the source's
/// last endpoints stay) and the next session starts after a backoff.
pub async fn keep_watching(registry: impl Registry, events: mpsc::Sender<SourceEvent>) {
    let mut backoff = Backoff::default();
    loop {
        let error = registry.session(&events, &mut backoff).await;
        let event = SourceEvent {
            source: registry.name(),
            kind: SourceKind::Registry,
            result: Err(error),
        };
        if events.send(event).await.is_err() {
            return;
        }
        backoff.wait().await;
    }
}

/// Waits between a source's attempts to reach its registry: 100 ms, doubling to 5 s, back to
/// 100 ms once it got through.
#[derive(Debug)]
pub struct Backoff(std::time::Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Self::FIRST)
    }
}

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Self::MAX);
    }

    pub fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}
