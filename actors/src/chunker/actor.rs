//! The Chunker stage: reads a document version, parses and splits it.

use super::parse::ParseError;
use super::Chunker;
use crate::bridge::Port;
use crate::ledger::{Ledger, Outcome};
use crate::messages::{ChunkedDoc, DocMeta};
use crate::pool::Stage;
use crate::source_watcher::{content_version, read_at_most};
use std::sync::Arc;

enum Read {
    TooBig,
    Changed,
    Parsed(Result<Vec<crate::messages::Chunk>, ParseError>),
}

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
        // Read, check and parse in one trip to the blocking pool: each trip
        // wakes a thread, and during a burst on the model's cores.
        let chunker = self.chunker.clone();
        let (path, version, max) = (meta.path.clone(), meta.version.clone(), self.max_file_bytes);
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Read> {
            let Some(bytes) = read_at_most(&std::fs::File::open(&path)?, max)? else {
                return Ok(Read::TooBig);
            };
            if content_version(&bytes) != version {
                return Ok(Read::Changed);
            }
            Ok(Read::Parsed(chunker.chunk_file(&path, &bytes)))
        })
        .await
        .map_err(|e| anyhow::anyhow!("chunker task panicked: {e}"))?;
        let parsed = match read {
            Ok(Read::Parsed(parsed)) => parsed,
            Ok(Read::TooBig) => {
                return skip(format!(
                    "file grew over the {} byte limit",
                    self.max_file_bytes
                ))
            }
            // Changed after the watcher hashed it; the watcher's next event
            // carries the new version.
            Ok(Read::Changed) => return skip("changed while queued; newer version follows".into()),
            // Gone since the watcher saw it: its deletion event follows.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return skip("file removed before it was read".into())
            }
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", meta.path.display())),
        };
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
