//! The Embedder stage and its batcher.
//!
//! Pool workers are concurrency slots: each hands the chunks of the
//! documents it took from the queue (up to `batch_docs`) to the [`Batcher`]
//! as one request and waits. The batcher runs the model on its own thread
//! and, like TEI's queue, takes every request waiting when it starts a pass,
//! up to the token budget, so small documents share forward passes instead
//! of running one tiny batch each. The encoder sorts and pads each pass by
//! length (see [`crate::model::BatchPolicy`]).

use crate::bridge::Port;
use crate::indexer::actor::IndexJob;
use crate::messages::{ChunkedDoc, EmbeddedDoc};
use crate::model::AnyEncoder;
use crate::pool::{JobErrors, Stage};
use std::sync::mpsc;
use std::sync::Arc;
use tokio::sync::oneshot;

struct Request {
    texts: Vec<String>,
    reply: oneshot::Sender<anyhow::Result<Vec<Vec<f32>>>>,
}

/// Owns the model thread. Dropping every handle stops the thread.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::SyncSender<Request>,
}

impl Batcher {
    /// `max_texts` bounds one pass; the encoder cuts it further by tokens.
    /// `name` names the model thread (ingestion and queries have one each,
    /// so a question never waits behind a 128-chunk ingestion pass).
    pub fn start(name: &str, encoder: Arc<AnyEncoder>, max_texts: usize) -> Batcher {
        // Bounded: a full batcher makes callers wait, which keeps the pool's
        // queue (and so the watcher) waiting too.
        let (tx, rx) = mpsc::sync_channel::<Request>(256);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(encoder, rx, max_texts.max(1)))
            .expect("spawning the embedder thread");
        Batcher { tx }
    }

    pub async fn embed(&self, texts: Vec<String>) -> anyhow::Result<Vec<Vec<f32>>> {
        let (reply, rx) = oneshot::channel();
        let stopped = || anyhow::anyhow!("the embedder thread has stopped");
        // Straight in when there is room (nearly always: the pool has fewer
        // workers than the channel has slots). Only a full channel costs a
        // trip to the blocking pool, whose send waits for room.
        match self.tx.try_send(Request { texts, reply }) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(request)) => {
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(request))
                    .await?
                    .map_err(|_| stopped())?;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(stopped()),
        }
        rx.await
            .map_err(|_| anyhow::anyhow!("the embedder thread dropped the request"))?
    }
}

fn run(encoder: Arc<AnyEncoder>, rx: mpsc::Receiver<Request>, max_texts: usize) {
    loop {
        // How long the model waited for work: during a burst, time the
        // pipeline failed to keep it fed (benches/ingest.rs sums it).
        let waiting = std::time::Instant::now();
        let Ok(first) = rx.recv() else { return };
        let waited = waiting.elapsed();
        let mut batch = vec![first];
        let mut n = batch[0].texts.len();
        while n < max_texts {
            match rx.try_recv() {
                Ok(r) => {
                    n += r.texts.len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let texts: Vec<&str> = batch
            .iter()
            .flat_map(|r| r.texts.iter().map(String::as_str))
            .collect();
        // Pass sizes tell whether the pipeline keeps the model fed
        // (benches/ingest.rs reads them).
        tracing::debug!(
            texts = texts.len(),
            requests = batch.len(),
            waited_us = waited.as_micros() as u64,
            "embedding pass"
        );
        // A model panic fails this pass's requests (they are retried by
        // their pools), not the thread.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| encoder.embed(&texts)));
        match result {
            Ok(Ok(mut vectors)) => {
                for r in batch.into_iter().rev() {
                    let mine = vectors.split_off(vectors.len() - r.texts.len());
                    let _ = r.reply.send(Ok(mine));
                }
            }
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                for r in batch {
                    let _ = r
                        .reply
                        .send(Err(anyhow::anyhow!("embedding failed: {msg}")));
                }
            }
            Err(_) => {
                for r in batch {
                    let _ = r
                        .reply
                        .send(Err(anyhow::anyhow!("the embedding model panicked")));
                }
            }
        }
    }
}

pub struct EmbedderStage {
    pub batcher: Batcher,
    pub out: Port<IndexJob>,
    /// The most queued documents one worker hands the model in one request
    /// (`[model] batch_max_size`): during a burst a few requests fill a pass
    /// where one per document would cost a wake-up each.
    pub batch_docs: usize,
}

impl Stage for EmbedderStage {
    type In = ChunkedDoc;

    async fn process(&self, doc: ChunkedDoc) -> anyhow::Result<()> {
        self.embed(vec![doc]).await
    }

    fn max_batch(&self) -> usize {
        self.batch_docs
    }

    /// A worker holds at most this much chunk text (a few large documents
    /// go alone), so 64 workers stay within a few hundred MiB.
    fn max_batch_bytes(&self) -> u64 {
        4 << 20
    }

    async fn process_batch(&self, docs: Vec<ChunkedDoc>) -> anyhow::Result<JobErrors> {
        self.embed(docs).await.map(|()| vec![])
    }
}

impl EmbedderStage {
    async fn embed(&self, docs: Vec<ChunkedDoc>) -> anyhow::Result<()> {
        let texts: Vec<String> = docs
            .iter()
            .flat_map(|d| d.chunks.iter().map(|c| c.text.clone()))
            .collect();
        let n = texts.len();
        let vectors = self.batcher.embed(texts).await?;
        anyhow::ensure!(vectors.len() == n, "one vector per chunk");
        let mut vectors = vectors.into_iter();
        let jobs = docs
            .into_iter()
            .map(|doc| {
                let vectors = vectors.by_ref().take(doc.chunks.len()).collect();
                IndexJob::Upsert(EmbeddedDoc {
                    meta: doc.meta,
                    chunks: doc.chunks,
                    vectors,
                })
            })
            .collect();
        self.out.send_all(jobs).await
    }
}
