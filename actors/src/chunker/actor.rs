//! The Chunker stage: reads a document version, parses and splits it.

use super::parse::ParseError;
use super::Chunker;
use crate::bridge::Port;
use crate::ledger::{Ledger, Outcome};
use crate::messages::{ChunkedDoc, DocMeta};
use crate::pool::Stage;
use crate::source_watcher::content_version;
use std::sync::Arc;

pub struct ChunkerStage {
    pub chunker: Arc<Chunker>,
    pub ledger: Arc<Ledger>,
    pub out: Port<ChunkedDoc>,
    pub max_file_bytes: u64,
}

impl Stage for ChunkerStage {
    type In = DocMeta;

    async fn process(&self, meta: DocMeta) -> anyhow::Result<()> {
        let skip = |reason: String| {
            self.ledger
                .finish(&meta.doc_id, Some(&meta.version), Outcome::Skipped(reason));
            Ok(())
        };
        if !self.ledger.is_current(&meta.doc_id, &meta.version) {
            return skip("superseded by a newer version".into());
        }
        let bytes = match tokio::fs::read(&meta.path).await {
            Ok(b) => b,
            // Gone since the watcher saw it: its deletion event follows.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return skip("file removed before it was read".into())
            }
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", meta.path.display())),
        };
        if bytes.len() as u64 > self.max_file_bytes {
            return skip(format!(
                "file of {} bytes is over the {} byte limit",
                bytes.len(),
                self.max_file_bytes
            ));
        }
        if content_version(&bytes) != meta.version {
            // Changed after the watcher hashed it; the watcher's next event
            // carries the new version.
            return skip("changed while queued; newer version follows".into());
        }
        let chunker = self.chunker.clone();
        let path = meta.path.clone();
        let parsed = tokio::task::spawn_blocking(move || chunker.chunk_file(&path, &bytes))
            .await
            .map_err(|e| anyhow::anyhow!("chunker task panicked: {e}"))?;
        match parsed {
            Ok(chunks) => {
                self.out.send(ChunkedDoc { meta, chunks }).await?;
                Ok(())
            }
            Err(ParseError::Unsupported(reason)) => skip(reason),
            Err(e @ ParseError::Malformed { .. }) => Err(e.into()),
        }
    }
}
