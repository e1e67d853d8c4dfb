//! Where services come from. Each source runs as its own task and reports what it read (or
//! why it could not) as [`SourceEvent`]s; the catalog merges them.
pub mod file;

use crate::config::Parsed;

/// What a source read.
#[derive(Debug)]
pub struct SourceEvent {
    /// The source's name (`file:<path>`, `etcd:<prefix>`, …).
    pub source: String,
    /// Its services, or why it could not read them.
    pub result: Result<Parsed, String>,
}
