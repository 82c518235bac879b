//! How each stage's job presents itself to the DLQ.

use crate::indexer::actor::IndexJob;
use crate::messages::{ChunkedDoc, DocMeta, IndexedEvent};
use crate::pool::Job;

impl Job for DocMeta {
    fn doc_id(&self) -> &str {
        &self.doc_id
    }
    fn version(&self) -> Option<&str> {
        Some(&self.version)
    }
    fn payload(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
    fn bytes(&self) -> u64 {
        self.size
    }
}

impl Job for ChunkedDoc {
    fn doc_id(&self) -> &str {
        &self.meta.doc_id
    }
    fn version(&self) -> Option<&str> {
        Some(&self.meta.version)
    }
    // The source document is what an operator replays; the chunks are
    // recomputed from it.
    fn payload(&self) -> serde_json::Value {
        serde_json::to_value(&self.meta).unwrap_or_default()
    }
    fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.text.len() as u64).sum()
    }
}

impl Job for IndexJob {
    fn doc_id(&self) -> &str {
        match self {
            IndexJob::Upsert(d) => &d.meta.doc_id,
            IndexJob::Delete { doc_id, .. } | IndexJob::Forget { doc_id, .. } => doc_id,
        }
    }
    fn version(&self) -> Option<&str> {
        match self {
            IndexJob::Upsert(d) => Some(&d.meta.version),
            IndexJob::Delete { .. } | IndexJob::Forget { .. } => None,
        }
    }
    fn payload(&self) -> serde_json::Value {
        match self {
            IndexJob::Upsert(d) => serde_json::to_value(&d.meta).unwrap_or_default(),
            IndexJob::Delete { doc_id, .. } => serde_json::json!({ "delete": doc_id }),
            IndexJob::Forget { doc_id, .. } => serde_json::json!({ "forget": doc_id }),
        }
    }
    fn bytes(&self) -> u64 {
        match self {
            IndexJob::Upsert(d) => {
                let text: usize = d.chunks.iter().map(|c| c.text.len()).sum();
                let vectors: usize = d.vectors.iter().map(|v| v.len() * 4).sum();
                (text + vectors) as u64
            }
            IndexJob::Delete { .. } | IndexJob::Forget { .. } => 0,
        }
    }
}

impl Job for IndexedEvent {
    fn doc_id(&self) -> &str {
        match self {
            IndexedEvent::Indexed { doc_id, .. }
            | IndexedEvent::Superseded { doc_id, .. }
            | IndexedEvent::Skipped { doc_id, .. }
            | IndexedEvent::Deleted { doc_id, .. } => doc_id,
        }
    }
    fn version(&self) -> Option<&str> {
        match self {
            IndexedEvent::Indexed { version, .. }
            | IndexedEvent::Superseded { version, .. }
            | IndexedEvent::Skipped { version, .. } => Some(version),
            IndexedEvent::Deleted { .. } => None,
        }
    }
    fn payload(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
