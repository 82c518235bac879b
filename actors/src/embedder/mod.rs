//! The Embedder stage and its batcher.
//!
//! Pool workers are concurrency slots: each hands the chunks of the
//! documents it took from the queue (up to `batch_docs`) to the [`Batcher`]
//! as one request and waits. The batcher runs the model on its own thread
//! and, like TEI's queue, takes every request waiting when it starts a pass,
//! up to the token budget, so small documents share forward passes instead
//! of running one tiny batch each; a long document's chunks go a call at a
//! time, in turn with the requests that arrive meanwhile. The encoder sorts
//! and pads each pass by length (see [`crate::model::BatchPolicy`]).

pub mod deleted;

use crate::bridge::Port;
use crate::indexer::actor::IndexJob;
use crate::indexer::VectorStore;
use crate::ledger::{Ledger, Outcome, SUPERSEDED};
use crate::messages::{ChunkedDoc, EmbeddedDoc};
use crate::model::AnyEncoder;
use crate::pool::{JobErrors, Stage};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
        Self::start_with(name, move |texts| encoder.embed(texts), max_texts)
    }

    /// [`Batcher::start`] with any encoding function (a test's, to fail
    /// on purpose).
    fn start_with(name: &str, embed: impl Embed, max_texts: usize) -> Batcher {
        // Bounded: a full batcher makes callers wait, which keeps the pool's
        // queue (and so the watcher) waiting too.
        let (tx, rx) = mpsc::sync_channel::<Request>(256);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(embed, rx, max_texts.max(1)))
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

/// The most texts one model call takes, for passes of at most
/// `batch_max_size` texts on `device`. A call's replies come only when the
/// whole call is done, so a document sent during a long one waits for the
/// call under way: the smaller the call, the shorter that wait. On CPU a
/// pass does its work when launched, so a call of one pass loses nothing.
/// On a GPU the device runs a call's next pass while the host reads one
/// and pads the next (see `model::batched`), which a call of one pass
/// would give up: a call there is four passes.
pub fn call_texts(device: crate::model::Device, batch_max_size: usize) -> usize {
    use crate::model::Device;
    match device {
        Device::Cpu => batch_max_size,
        Device::Cuda | Device::CudaF16 => batch_max_size * 4,
    }
}

/// What the model thread runs: texts in, one vector each out.
trait Embed: Fn(&[&str]) -> anyhow::Result<Vec<Vec<f32>>> + Send + 'static {}
impl<F: Fn(&[&str]) -> anyhow::Result<Vec<Vec<f32>>> + Send + 'static> Embed for F {}

/// One model call: its vectors, or why it failed. A model panic fails
/// the call (its requests are retried by their pools), not the thread.
fn call(embed: &impl Embed, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| embed(texts))) {
        Ok(Ok(vectors)) if vectors.len() == texts.len() => Ok(vectors),
        Ok(Ok(vectors)) => Err(format!(
            "embedding failed: {} vectors for {} texts",
            vectors.len(),
            texts.len()
        )),
        Ok(Err(e)) => Err(format!("embedding failed: {e:#}")),
        Err(_) => Err("the embedding model panicked".to_string()),
    }
}

/// A request being worked through: its texts' vectors so far.
struct Pending {
    request: Request,
    done: Vec<Vec<f32>>,
}

/// Serves requests in turn, at most `max_texts` texts a model call. A
/// request larger than that (a long document's chunks: a 20 MB file has
/// 25,000) is taken a call's worth at a time, a quarter while others
/// wait, and goes back in line behind the requests that came in
/// meanwhile, so one large document does not hold every other document
/// back until it is done (minutes, on CPU). benches/turns.rs measures it.
///
/// A call that fails with several requests in it is made again for each
/// of them alone: one document's texts (a tokenizer error, a panic) must
/// not fail the documents it happened to share a call with, which the
/// pool split from it to run alone, into the DLQ beside it.
fn run(embed: impl Embed, rx: mpsc::Receiver<Request>, max_texts: usize) {
    // Requests waiting, in turn. Every caller waits for its reply, so this
    // holds at most one request per caller (the pool's workers).
    let mut line: std::collections::VecDeque<Pending> = Default::default();
    // Requests cut short by the last call's limit, back in line after the
    // ones that arrived during that call.
    let mut unfinished: Vec<Pending> = Vec::new();
    loop {
        // How long the model waited for work: during a burst, time the
        // pipeline failed to keep it fed (benches/ingest.rs sums it).
        let waiting = std::time::Instant::now();
        if line.is_empty() && unfinished.is_empty() {
            let Ok(first) = rx.recv() else { return };
            line.push_back(Pending::new(first));
        }
        let waited = waiting.elapsed();
        line.extend(rx.try_iter().map(Pending::new));
        line.extend(unfinished.drain(..));
        // A caller that is gone (a pool killed, a query past its deadline)
        // would have its texts embedded for nothing, a long document's for
        // minutes.
        line.retain(|p| !p.request.reply.is_closed());
        if line.is_empty() {
            continue;
        }

        // This call: requests from the front of the line, the last one
        // perhaps only in part. While others wait, a request already under
        // way takes at most a quarter of the call: the others' replies
        // come when the whole call is done.
        let contended = line.len() > 1;
        let mut taken: Vec<(Pending, std::ops::Range<usize>)> = Vec::new();
        let mut n = 0;
        while n < max_texts {
            let Some(p) = line.pop_front() else { break };
            let start = p.done.len();
            let share = if contended && start > 0 {
                (max_texts / 4).max(1)
            } else {
                max_texts
            };
            let end = p.request.texts.len().min(start + share.min(max_texts - n));
            n += end - start;
            taken.push((p, start..end));
        }
        let texts: Vec<&str> = taken
            .iter()
            .flat_map(|(p, range)| p.request.texts[range.clone()].iter().map(String::as_str))
            .collect();
        // Pass sizes tell whether the pipeline keeps the model fed
        // (benches/ingest.rs reads them).
        tracing::debug!(
            texts = texts.len(),
            requests = taken.len(),
            waited_us = waited.as_micros() as u64,
            "embedding pass"
        );
        let result = call(&embed, &texts);
        drop(texts);
        match result {
            Ok(vectors) => {
                let mut vectors = vectors.into_iter();
                for (p, range) in taken {
                    let n = range.len();
                    p.take(vectors.by_ref().take(n), &mut unfinished);
                }
            }
            Err(failure) if taken.len() > 1 => {
                tracing::warn!(
                    requests = taken.len(),
                    "{failure}; trying each request of the call alone"
                );
                for (p, range) in taken {
                    let texts: Vec<&str> =
                        p.request.texts[range].iter().map(String::as_str).collect();
                    match call(&embed, &texts) {
                        Ok(vectors) => p.take(vectors, &mut unfinished),
                        Err(failure) => p.fail(&failure),
                    }
                }
            }
            Err(failure) => {
                for (p, _) in taken {
                    p.fail(&failure);
                }
            }
        }
    }
}

impl Pending {
    fn new(request: Request) -> Pending {
        Pending {
            done: Vec::with_capacity(request.texts.len()),
            request,
        }
    }

    /// Takes the vectors of its next texts: replies once it has them all,
    /// else goes to `unfinished`, back in line.
    fn take(mut self, vectors: impl IntoIterator<Item = Vec<f32>>, unfinished: &mut Vec<Pending>) {
        self.done.extend(vectors);
        if self.done.len() < self.request.texts.len() {
            unfinished.push(self);
        } else {
            let _ = self.request.reply.send(Ok(self.done));
        }
    }

    /// A request fails whole, the parts of it done before included.
    fn fail(self, failure: &str) {
        let _ = self.request.reply.send(Err(anyhow::anyhow!("{failure}")));
    }
}

pub struct EmbedderStage {
    pub batcher: Batcher,
    pub out: Port<IndexJob>,
    /// The most queued documents one worker hands the model in one request
    /// (`[model] batch_max_size`): during a burst a few requests fill a pass
    /// where one per document would cost a wake-up each.
    pub batch_docs: usize,
    /// The model's [`crate::model::fingerprint`], in every text key (see
    /// [`text_key`]).
    pub model_id: String,
    /// Where the vectors of texts embedded before are looked for (see
    /// [`crate::indexer::stored_vectors`]), in this order: the store the
    /// index is written to, then any the node holds from before (the
    /// embedded store left by a switch to Qdrant). Empty: every chunk is
    /// embedded (a cluster's embed node that does not share the index
    /// nodes' store).
    pub reuse: Vec<Arc<dyn VectorStore>>,
    /// Chunks embedded, and chunks whose vector was found stored (the
    /// one-shot ingest's summary reads it).
    pub tally: Arc<Tally>,
    /// On one node, the ledger that admitted the documents: a version
    /// overtaken while it waited here (saved again, deleted) ends skipped
    /// unembedded, as the Indexer would end it after its embedding. On a
    /// cluster an embed node's ledger does not know the ingest nodes'
    /// documents: `None`.
    pub ledger: Option<Arc<Ledger>>,
    /// `Some` while the text keys of a store written before them (or
    /// under another name for this model) are being set in the background
    /// (`model_check::rekey`): it turns true once they are. Until then a
    /// lookup misses every text not yet keyed and embeds it again (after
    /// an upgrade that re-chunks every document, the whole store), so
    /// each lookup waits for it. `None`: nothing to wait for.
    pub keys_ready: Option<tokio::sync::watch::Receiver<bool>>,
    /// The texts of documents this node deleted a moment ago, looked up
    /// after the stores (see [`deleted`]); `None`: none are kept.
    pub deleted: Option<Arc<deleted::DeletedVectors>>,
}

/// See [`EmbedderStage::tally`].
#[derive(Default, Debug)]
pub struct Tally {
    pub embedded: AtomicU64,
    pub reused: AtomicU64,
}

impl Tally {
    /// Chunks embedded and chunks reused so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.embedded.load(Ordering::Relaxed),
            self.reused.load(Ordering::Relaxed),
        )
    }
}

/// A chunk text's key for the model `model_id`: stored with the chunk's
/// point, it finds that vector again for the same text (see
/// [`crate::indexer::stored_vectors`]). The model is part of it, so that a
/// store written with another model offers nothing.
pub fn text_key(model_id: &str, text: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(model_id.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    let digest = h.finalize();
    i64::from_le_bytes(digest[..8].try_into().expect("a sha256 has 8 bytes"))
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
    /// Embeds each distinct text of `docs` once, but those whose vector
    /// the store already holds (a file copied or moved, the unchanged
    /// chunks of an edited one), and hands the documents on.
    async fn embed(&self, mut docs: Vec<ChunkedDoc>) -> anyhow::Result<()> {
        if let (Some(ready), false) = (&self.keys_ready, self.reuse.is_empty()) {
            // (An error: the rekey ended without a word, stopped at
            // shutdown. What it set is found; the rest is embedded.)
            let _ = ready.clone().wait_for(|ready| *ready).await;
        }
        if let Some(ledger) = &self.ledger {
            docs.retain(|d| {
                let (id, version) = (&d.meta.doc_id, &d.meta.version);
                let current = ledger.is_current(id, version);
                if !current {
                    ledger.finish(id, Some(version), Outcome::Skipped(SUPERSEDED.into()));
                }
                current
            });
            if docs.is_empty() {
                return Ok(());
            }
        }
        let keys: Vec<Vec<i64>> = docs
            .iter()
            .map(|d| {
                d.chunks
                    .iter()
                    .map(|c| text_key(&self.model_id, &c.text))
                    .collect()
            })
            .collect();
        // Each text once, and each key looked up for one text only (two
        // texts of one key, however unlikely, must not swap vectors).
        let mut texts: HashMap<&str, i64> = HashMap::new();
        let mut owner: HashMap<i64, &str> = HashMap::new();
        for (d, keys) in docs.iter().zip(&keys) {
            for (c, &k) in d.chunks.iter().zip(keys) {
                texts.entry(c.text.as_str()).or_insert_with(|| {
                    owner.entry(k).or_insert(c.text.as_str());
                    k
                });
            }
        }
        let mut stored = HashMap::new();
        let mut wanted: Vec<(i64, &str)> = owner.iter().map(|(k, t)| (*k, *t)).collect();
        for store in &self.reuse {
            if wanted.is_empty() {
                break;
            }
            match crate::indexer::stored_vectors(store.as_ref(), &wanted).await {
                Ok(found) => {
                    wanted.retain(|(k, _)| !found.contains_key(k));
                    stored.extend(found);
                }
                // Only a saving lost: the texts are embedded.
                Err(e) => tracing::warn!("looking up stored vectors failed: {e:#}"),
            }
        }
        if let Some(deleted) = self.deleted.as_ref().filter(|_| !wanted.is_empty()) {
            stored.extend(deleted.find(&wanted));
        }
        let mut vectors: HashMap<&str, Vec<f32>> = HashMap::with_capacity(texts.len());
        let mut fresh: Vec<&str> = Vec::new();
        for (&text, k) in &texts {
            match stored.remove(k) {
                Some(v) if owner.get(k) == Some(&text) => {
                    vectors.insert(text, v);
                }
                _ => fresh.push(text),
            }
        }
        let reused = vectors.len();
        if !fresh.is_empty() {
            // The model failing is the stage's outage, not the document's
            // fault (a GPU lost or out of memory fails every call): the
            // stage pauses rather than dead-letter whatever comes. A
            // document that fails it on its own is still found out, once
            // others are embedded since (see crate::pool), since the
            // batcher tries each request of a failed call alone.
            let made = self
                .batcher
                .embed(fresh.iter().map(|t| t.to_string()).collect())
                .await
                .map_err(crate::pool::unavailable)?;
            anyhow::ensure!(made.len() == fresh.len(), "one vector per chunk");
            vectors.extend(fresh.iter().copied().zip(made));
        }
        self.tally
            .embedded
            .fetch_add(fresh.len() as u64, Ordering::Relaxed);
        self.tally
            .reused
            .fetch_add(reused as u64, Ordering::Relaxed);
        metrics::counter!("ragd_embedder_chunks_total", "vector" => "embedded")
            .increment(fresh.len() as u64);
        metrics::counter!("ragd_embedder_chunks_total", "vector" => "reused")
            .increment(reused as u64);
        let per_doc: Vec<Vec<Vec<f32>>> = docs
            .iter()
            .map(|d| {
                d.chunks
                    .iter()
                    .map(|c| vectors[c.text.as_str()].clone())
                    .collect()
            })
            .collect();
        drop(vectors);
        let jobs = docs
            .into_iter()
            .zip(per_doc)
            .zip(keys)
            .map(|((doc, vectors), keys)| {
                IndexJob::Upsert(EmbeddedDoc {
                    meta: doc.meta,
                    chunks: doc.chunks,
                    vectors,
                    keys,
                })
            })
            .collect();
        self.out.send_all(jobs).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{BatchPolicy, Device};
    use std::time::{Duration, Instant};

    /// The real model, as `ops/fetch-models.sh` installs it.
    pub(crate) fn minilm() -> Arc<AnyEncoder> {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2");
        Arc::new(AnyEncoder::load(&dir, BatchPolicy::default(), Device::Cpu).unwrap())
    }

    fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            let diff = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-4, "{diff}");
        }
    }

    fn chunked(id: &str, texts: &[&str]) -> ChunkedDoc {
        let (meta, _, _) = crate::indexer::conformance::doc(id, "v1", "hr", "public", 0, 0);
        ChunkedDoc {
            meta,
            chunks: texts
                .iter()
                .enumerate()
                .map(|(i, t)| crate::messages::Chunk {
                    index: i as u32,
                    text: t.to_string(),
                })
                .collect(),
        }
    }

    /// A model that fails on "poison" (an error) or "panic" (a panic),
    /// takes 300 ms over "slow", and records every text it is given.
    fn faulty(seen: Arc<parking_lot::Mutex<Vec<String>>>) -> impl Embed {
        move |texts: &[&str]| {
            seen.lock().extend(texts.iter().map(|t| t.to_string()));
            if texts.contains(&"slow") {
                std::thread::sleep(Duration::from_millis(300));
            }
            assert!(!texts.contains(&"panic"), "the model panicked");
            anyhow::ensure!(!texts.contains(&"poison"), "cannot tokenize");
            Ok(texts.iter().map(|t| vec![t.len() as f32]).collect())
        }
    }

    /// One request's texts failing a call (an error or a panic) fail that
    /// request alone: the requests it shared the call with get their
    /// vectors, rather than going to the DLQ with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_fails_a_shared_call_fails_alone() {
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let batcher = Batcher::start_with("test-embedder", faulty(seen.clone()), 8);
        for bad in ["poison", "panic"] {
            // The model busy, so the three below share its next call.
            let busy = tokio::spawn({
                let b = batcher.clone();
                async move { b.embed(vec!["slow".into()]).await }
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (fine, failed, also) = tokio::join!(
                batcher.embed(vec!["fine".into()]),
                batcher.embed(vec!["other".into(), bad.into()]),
                batcher.embed(vec!["also fine".into()]),
            );
            assert!(busy.await.unwrap().is_ok());
            assert_eq!(fine.unwrap(), [vec![4.0]], "{bad}");
            assert_eq!(also.unwrap(), [vec![9.0]], "{bad}");
            let e = failed.unwrap_err().to_string();
            assert!(
                e.contains("cannot tokenize") || e.contains("panicked"),
                "{e}"
            );
        }
        let seen = seen.lock();
        assert!(
            seen.iter().filter(|t| *t == "fine").count() == 4,
            "each shared call, then alone: {seen:?}"
        );
    }

    /// A request whose caller is gone is not embedded: a long document's
    /// chunks would hold the model for nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_whose_caller_is_gone_is_not_embedded() {
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let batcher = Batcher::start_with("test-embedder", faulty(seen.clone()), 8);
        let busy = tokio::spawn({
            let b = batcher.clone();
            async move { b.embed(vec!["slow".into()]).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let given_up = tokio::time::timeout(
            Duration::from_millis(50),
            batcher.embed(vec!["abandoned".into()]),
        );
        assert!(given_up.await.is_err());
        assert!(busy.await.unwrap().is_ok());
        assert_eq!(
            batcher.embed(vec!["next".into()]).await.unwrap(),
            [vec![4.0]]
        );
        assert_eq!(*seen.lock(), ["slow", "next"]);
    }

    /// A model that fails every call (a GPU lost) is the stage's outage:
    /// the error is marked unavailable, so the pool pauses the stage
    /// instead of dead-lettering every document that comes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_model_is_an_outage_of_the_stage() {
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let out = crate::pool::PoolQueue::new(Arc::new(crate::stats::ActorStats::default()));
        let stage = EmbedderStage {
            batcher: Batcher::start_with("test-embedder", faulty(seen), 8),
            out: Port::Local(out.clone()),
            batch_docs: 8,
            model_id: "m".into(),
            reuse: vec![],
            tally: Default::default(),
            ledger: None,
            keys_ready: None,
            deleted: None,
        };
        let e = stage
            .process(chunked("kb:a.md", &["poison"]))
            .await
            .unwrap_err();
        assert!(crate::pool::is_unavailable(&e), "{e:#}");
        stage.process(chunked("kb:b.md", &["fine"])).await.unwrap();
        assert_eq!(out.len(), 1);
    }

    /// A document whose texts the store already holds (a file copied or
    /// moved, an edit that kept most chunks) is embedded for its new
    /// texts only, each once, and its chunks get the vectors the model
    /// gives them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_texts_the_store_does_not_hold_are_embedded() {
        use crate::indexer::edge::EdgeStore;
        let encoder = minilm();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 384).unwrap());
        let out = crate::pool::PoolQueue::new(Arc::new(crate::stats::ActorStats::default()));
        let stage = |reuse: Vec<Arc<dyn VectorStore>>, model_id: &str| EmbedderStage {
            batcher: Batcher::start("test-embedder", encoder.clone(), 8),
            out: Port::Local(out.clone()),
            batch_docs: 8,
            model_id: model_id.into(),
            reuse,
            tally: Default::default(),
            ledger: None,
            keys_ready: None,
            deleted: None,
        };
        let counts = |s: &EmbedderStage| s.tally.counts();
        let written = |docs: Vec<IndexJob>| -> Vec<EmbeddedDoc> {
            docs.into_iter()
                .map(|j| match j {
                    IndexJob::Upsert(d) => d,
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let policy = "Badge exceptions are signed off by the site security lead.";
        let visitors = "Every office keeps its own visitor log.";
        let new = "Lost badges are reported to the front desk within a day.";

        let first = stage(vec![store.clone()], "minilm");
        first
            .embed(vec![chunked("kb:a.md", &[policy, visitors])])
            .await
            .unwrap();
        assert_eq!(counts(&first), (2, 0), "nothing stored yet");
        let a = written(out.drain());
        store.upsert_docs(&a).await.unwrap();

        // The same texts under another name, one new text twice.
        let second = stage(vec![store.clone()], "minilm");
        second
            .embed(vec![chunked("kb:b.md", &[visitors, new, policy, new])])
            .await
            .unwrap();
        assert_eq!(counts(&second), (1, 2), "only the new text, once");
        let b = written(out.drain()).pop().unwrap();
        let alone = |t: &str| encoder.embed(&[t]).unwrap().pop().unwrap();
        assert_close(
            &b.vectors,
            &[alone(visitors), alone(new), alone(policy), alone(new)],
        );
        assert_eq!(b.keys.len(), 4, "a text key for every chunk");
        assert_eq!(
            b.keys[0], a[0].keys[1],
            "a text's key is the same everywhere"
        );

        // A store written with another model, or none to look in: every
        // text is embedded.
        for s in [
            stage(vec![store.clone()], "another model"),
            stage(vec![], "minilm"),
        ] {
            s.embed(vec![chunked("kb:c.md", &[policy])]).await.unwrap();
            assert_eq!(counts(&s), (1, 0));
            out.drain();
        }

        // After the store written now (empty), one from before (left by a
        // switch of backend): what it holds is found there.
        let dir = tempfile::tempdir().unwrap();
        let empty: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 384).unwrap());
        let s = stage(vec![empty, store.clone()], "minilm");
        let doc = chunked("kb:d.md", &[policy, "A text in neither store."]);
        s.embed(vec![doc]).await.unwrap();
        assert_eq!(counts(&s), (1, 1));
        let d = written(out.drain()).pop().unwrap();
        assert_close(&d.vectors[..1], &[alone(policy)]);

        // In no store, but kept from a document deleted a moment ago: found
        // there, for the same text only.
        let deleted = Arc::new(deleted::DeletedVectors::new(1 << 20));
        let gone = "A text whose file was deleted and written back.";
        deleted.keep(vec![crate::indexer::KeyedText {
            key: text_key("minilm", gone),
            text: gone.into(),
            vector: alone(gone),
        }]);
        let s = EmbedderStage {
            deleted: Some(deleted),
            ..stage(vec![store.clone()], "minilm")
        };
        s.embed(vec![chunked("kb:e.md", &[gone, policy, visitors])])
            .await
            .unwrap();
        assert_eq!(counts(&s), (0, 3), "one kept, two stored");
        let e = written(out.drain()).pop().unwrap();
        assert_close(&e.vectors[..1], &[alone(gone)]);
        let s = stage(vec![store.clone()], "minilm");
        s.embed(vec![chunked("kb:f.md", &[gone])]).await.unwrap();
        assert_eq!(counts(&s), (1, 0), "kept by none");
        out.drain();
    }

    /// While the stored chunks' text keys are being set (a store written
    /// before them, or under another name for this model), a lookup waits
    /// for them: otherwise every text not yet keyed is embedded again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lookup_waits_for_the_store_s_text_keys() {
        use crate::indexer::edge::EdgeStore;
        use crate::indexer::model_check::{rekey, Rekey};
        let encoder = minilm();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 384).unwrap());
        let out = crate::pool::PoolQueue::new(Arc::new(crate::stats::ActorStats::default()));
        let (ready, keys_ready) = tokio::sync::watch::channel(false);
        let stage = |model_id: &str, keys_ready| {
            Arc::new(EmbedderStage {
                batcher: Batcher::start("test-embedder", encoder.clone(), 8),
                out: Port::Local(out.clone()),
                batch_docs: 8,
                model_id: model_id.into(),
                reuse: vec![store.clone()],
                tally: Default::default(),
                ledger: None,
                keys_ready,
                deleted: None,
            })
        };
        let text = "Every office keeps its own visitor log.";
        // Stored with keys made under the model's old name.
        stage("minilm, old files", None)
            .embed(vec![chunked("kb:a.md", &[text])])
            .await
            .unwrap();
        let IndexJob::Upsert(a) = out.drain().pop().unwrap() else {
            panic!("an upsert")
        };
        store.upsert_docs(&[a]).await.unwrap();

        let waiting = stage("minilm", Some(keys_ready));
        let run = {
            let s = waiting.clone();
            tokio::spawn(async move { s.embed(vec![chunked("kb:b.md", &[text])]).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!run.is_finished(), "looked up before the keys were set");
        assert_eq!(waiting.tally.counts(), (0, 0));
        assert_eq!(
            rekey(store.as_ref(), "minilm", Rekey::All).await.unwrap(),
            1
        );
        ready.send(true).unwrap();
        run.await.unwrap().unwrap();
        assert_eq!(waiting.tally.counts(), (0, 1), "its vector reused");

        // A rekey stopped without a word (at shutdown) holds nothing up.
        let (stopped, keys_ready) = tokio::sync::watch::channel(false);
        drop(stopped);
        let s = stage("minilm", Some(keys_ready));
        let run = s.embed(vec![chunked("kb:c.md", &[text])]);
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("held up by a rekey that stopped")
            .unwrap();
        assert_eq!(s.tally.counts(), (0, 1));
    }

    /// On one node, a version saved over (or deleted) while it waited at
    /// the embedder is not embedded: it ends skipped, and the current
    /// version goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_overtaken_while_it_waited_is_not_embedded() {
        let ledger = Ledger::new(8);
        let out = crate::pool::PoolQueue::new(Arc::new(crate::stats::ActorStats::default()));
        let stage = EmbedderStage {
            batcher: Batcher::start("test-embedder", minilm(), 8),
            out: Port::Local(out.clone()),
            batch_docs: 8,
            model_id: "minilm".into(),
            reuse: vec![],
            tally: Default::default(),
            ledger: Some(ledger.clone()),
            keys_ready: None,
            deleted: None,
        };
        let version = |v: &str, text: &str| {
            let mut d = chunked("kb:a.md", &[text]);
            d.meta.version = v.into();
            d
        };
        assert!(ledger.admit("kb:a.md", Some("v1")).await);
        assert!(ledger.admit("kb:a.md", Some("v2")).await);
        stage
            .embed(vec![version("v1", "Old text."), version("v2", "New text.")])
            .await
            .unwrap();
        assert_eq!(stage.tally.counts(), (1, 0), "only the current version");
        let sent: Vec<String> = out
            .drain()
            .into_iter()
            .map(|j| match j {
                IndexJob::Upsert(d) => d.meta.version,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sent, ["v2"]);
        assert!(ledger.is_current("kb:a.md", "v2"));

        // Deleted while it waited: nothing embedded, nothing sent.
        assert!(ledger.admit("kb:a.md", None).await);
        stage.embed(vec![version("v2", "New text.")]).await.unwrap();
        assert_eq!(stage.tally.counts(), (1, 0));
        assert!(out.drain().is_empty());
    }

    /// A large request (a long document's chunks) is served a call's worth
    /// at a time: a small one sent while it runs is answered before it
    /// ends, and every text gets the vector it gets embedded on its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_request_does_not_hold_back_the_ones_sent_after_it() {
        let encoder = minilm();
        let batcher = Batcher::start("test-embedder", encoder.clone(), 4);
        let large: Vec<String> = (0..600)
            .map(|i| format!("Visitor log entry {i} of the Lyon office"))
            .collect();
        let small = vec!["Who signs off a badge exception?".to_string()];
        let timed = |texts: Vec<String>| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                let vectors = batcher.embed(texts).await.unwrap();
                (vectors, Instant::now())
            })
        };
        let large_run = timed(large.clone());
        // 150 calls of 4 texts: well under way, far from done.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (small_vectors, small_done) = timed(small.clone()).await.unwrap();
        let (large_vectors, large_done) = large_run.await.unwrap();
        assert!(
            small_done < large_done,
            "the small request waited for the large one"
        );

        let alone = |texts: &[String]| {
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            encoder.embed(&texts).unwrap()
        };
        assert_close(&large_vectors, &alone(&large));
        assert_close(&small_vectors, &alone(&small));
    }
}
