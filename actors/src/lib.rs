//! ragd's actors and the domain code they drive.
//!
//! Ingest: SourceWatcher → Chunker pool → Embedder pool → Indexer →
//! VersionPruner, with failures going to the DLQ. Query: CacheGuard and
//! Reranker. Payloads between stages live in [`messages`].

pub mod bridge;
pub mod cache_guard;
pub mod chunker;
pub mod dlq;
pub mod embedder;
pub mod indexer;
mod jobs;
pub mod ledger;
pub mod messages;
pub mod model;
pub mod pool;
pub mod reranker;
pub mod source_watcher;
pub mod stats;
pub mod supervisor;
pub mod testkit;
pub mod version_pruner;

/// Lower-case hex of `bytes` (digests in names, versions and tags).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
