//! Embedded vector store: qdrant-edge (Qdrant's own engine, in-process) on
//! local disk.
//!
//! qdrant-edge 0.7 has no background optimizer and does not replay its WAL on
//! load, and `flush` panics rather than waiting when a write is in progress.
//! So: writes and flushes are serialised by one lock; optimisation runs
//! beside the writes (Qdrant's optimizers wrap the segments they rebuild in
//! proxy segments, so updates go on, as in a Qdrant server) and only keeps
//! flushes out, through a second lock, so an HNSW build (minutes at 100k
//! points) no longer stops ingestion. While one runs, the background flush
//! skips its turns: writes made meanwhile become durable when it ends (a
//! crash before then loses them to the next start's scan, as below); a
//! background thread flushes within [`FLUSH_EVERY`] of a write (an fsync per
//! document would cap ingestion at the disk's fsync rate), and
//! [`VectorStore::flush`] makes everything written so far durable for callers
//! that must know (e.g. before committing a Kafka offset). A crash loses at
//! most the unflushed writes, which the next start's scan redoes, since the
//! store itself is what the scan compares the folders with.
//! [`VectorStore::optimize`] runs the optimizer that builds HNSW once a
//! segment grows past the indexing threshold.

use super::{
    all_found, check_search, check_upsert, hit_ids, point_id, removed_per_doc, Hit, HnswSettings,
    KeyedText, Removal, Scope, StoredText, StoredVersion, TextPage, VectorStore, Versions,
};
use crate::messages::{Chunk, DocMeta, EmbeddedDoc, Partition};
use anyhow::Context;
use async_trait::async_trait;
use parking_lot::Mutex;
use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::external::serde_json::{self as qjson, json};
use qdrant_edge::{
    Condition, ConditionalInsertOperation, CountRequest, CreateIndex, Distance, EdgeConfig,
    EdgeShard, EdgeVectorParams, FacetRequest, FacetValue, FieldCondition, FieldIndexOperations,
    Filter, HnswIndexConfig, IntegerIndexParams, JsonPath, KeywordIndexParams, Match, NamedQuery,
    PayloadFieldSchema, PayloadOps, PayloadSchemaParams, PointId, PointInsertOperations,
    PointOperations, PointStruct, PointStructPersisted, QueryEnum, QueryRequest, Range,
    ScoringQuery, ScrollRequest, SearchParams, SetPayloadOp, UpdateOperation, VectorInternal,
    VectorStructInternal, WithPayloadInterface, WithVector, DEFAULT_VECTOR_NAME,
};
use std::path::Path;
use std::sync::Arc;

/// Each flush writes and syncs the segment's files under the writers' lock;
/// at 250 ms they cost a burst ~4% of its rate (BENCHMARKS.md, "Ingest at
/// scale"). 1 s is still well inside Qdrant's own default (5 s), and what
/// a crash loses in between the next start's scan redoes.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(1000);

pub struct Inner {
    shard: EdgeShard,
    writer: Mutex<()>,
    /// Held by an optimisation; flushes wait for it or skip. Taken before
    /// `writer`, never while holding it: a flush waiting out an HNSW build
    /// must not hold up the writes.
    optimizing: Mutex<()>,
    dirty: std::sync::atomic::AtomicBool,
    dim: usize,
    /// `hnsw_ef` of a search; 0: the default ([`HnswSettings::search_ef`]).
    search_ef: std::sync::atomic::AtomicUsize,
    dir: std::path::PathBuf,
    /// Writes wait while the disk has less free (see
    /// [`EdgeStore::set_min_free`]); 0: never.
    min_free: std::sync::atomic::AtomicU64,
}

impl Inner {
    /// Makes the writes so far durable. `wait`: also when an optimisation
    /// runs (after it); otherwise that is a skipped turn.
    fn flush(&self, wait: bool) -> anyhow::Result<()> {
        let _o = if wait {
            self.optimizing.lock()
        } else {
            match self.optimizing.try_lock() {
                Some(guard) => guard,
                None => return Ok(()),
            }
        };
        let _w = self.writer.lock();
        if !self.dirty.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let shard = &self.shard;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.flush())).map_err(|_| {
            self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
            anyhow::anyhow!("vector store flush failed")
        })
    }
}

#[derive(Clone)]
pub struct EdgeStore {
    inner: Arc<Inner>,
}

impl std::ops::Deref for EdgeStore {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

fn key(field: &str) -> JsonPath {
    field
        .parse()
        .expect("static field names are valid JSON paths")
}

fn eq(field: &str, value: &str) -> Condition {
    Condition::Field(FieldCondition::new_match(
        key(field),
        Match::from(value.to_string()),
    ))
}

fn any_of(field: &str, values: &[String]) -> Condition {
    Condition::Field(FieldCondition::new_match(
        key(field),
        Match::from(values.to_vec()),
    ))
}

/// A point's vector as the engine returns it, for a store of one
/// unnamed dense vector (ragd's): the vector itself.
pub fn dense_vector(v: VectorStructInternal) -> Option<Vec<f32>> {
    match v {
        VectorStructInternal::Single(v) => Some(v),
        VectorStructInternal::Named(mut named) => match named.remove(DEFAULT_VECTOR_NAME)? {
            VectorInternal::Dense(v) => Some(v),
            _ => None,
        },
        VectorStructInternal::MultiDense(_) => None,
    }
}

/// The `partition` payload of a point: its division and access level as
/// one value (a JSON pair, unambiguous whatever the names hold). Searches
/// filter on it, and the HNSW index links each partition's points among
/// themselves too, so a search scoped to a few partitions walks a graph that
/// stays connected inside them.
pub fn partition_key(division: &str, access_level: &str) -> String {
    qjson::to_string(&[division, access_level]).expect("strings serialise")
}

/// The engine-side filter of a search: only these partitions are looked at.
pub fn scope_filter(scope: &Scope) -> Filter {
    let partitions: Vec<String> = scope
        .divisions
        .iter()
        .flat_map(|d| scope.access_levels.iter().map(move |a| partition_key(d, a)))
        .collect();
    Filter {
        must: Some(vec![any_of("partition", &partitions)]),
        ..Default::default()
    }
}

/// The points `removals` name.
fn removal_filter(removals: &[Removal]) -> Filter {
    let one = |r: &Removal| {
        let mut must = vec![eq("doc_id", &r.doc_id)];
        if let Some(seq) = r.seen_before {
            must.push(seq_within(Range {
                lt: Some(OrderedFloat(seq as f64)),
                ..Default::default()
            }));
        }
        Filter {
            must: Some(must),
            must_not: r.keep.as_deref().map(|k| vec![eq("version", k)]),
            ..Default::default()
        }
    };
    match removals {
        [r] => one(r),
        _ => Filter {
            should: Some(removals.iter().map(|r| Condition::Filter(one(r))).collect()),
            ..Default::default()
        },
    }
}

/// Points seen within `range` (by `seq`), and those that carry no seq
/// (written before ragd stored it), which count as seen before any.
fn seq_within(range: Range<OrderedFloat<f64>>) -> Condition {
    Condition::Filter(Filter {
        should: Some(vec![
            Condition::Field(FieldCondition::new_range(key("seq"), range)),
            Condition::IsEmpty(key("seq").into()),
        ]),
        ..Default::default()
    })
}

/// The stored points an upsert of the versions `docs` may overwrite: not
/// those stored with a later seq than the version now written (see
/// [`VectorStore::upsert`]). A version with no seq overwrites its points.
fn overwritable(docs: &[&DocMeta]) -> Filter {
    let clause = |d: &DocMeta| {
        let mut must = vec![eq("doc_id", &d.doc_id), eq("version", &d.version)];
        if d.seq > 0 {
            must.push(seq_within(Range {
                lte: Some(OrderedFloat(d.seq as f64)),
                ..Default::default()
            }));
        }
        Condition::Filter(Filter {
            must: Some(must),
            ..Default::default()
        })
    };
    Filter {
        should: Some(docs.iter().map(|d| clause(d)).collect()),
        ..Default::default()
    }
}

impl EdgeStore {
    /// Up to `limit` points `filter` matches, with their text key, text
    /// and vector (those without a key are left out, counted in `limit`).
    async fn keyed_where(&self, filter: Filter, limit: usize) -> anyhow::Result<Vec<KeyedText>> {
        let (records, _) = self
            .blocking(move |s| {
                s.shard
                    .scroll(ScrollRequest {
                        offset: None,
                        limit: Some(limit),
                        filter: Some(filter),
                        with_payload: Some(WithPayloadInterface::Fields(vec![
                            key("text_key"),
                            key("text"),
                        ])),
                        with_vector: WithVector::Bool(true),
                        order_by: None,
                    })
                    .map_err(|e| anyhow::anyhow!("vector store scroll: {e}"))
            })
            .await?;
        Ok(records
            .into_iter()
            .filter_map(|r| {
                let p = r.payload?.0;
                Some(KeyedText {
                    key: p.get("text_key")?.as_i64()?,
                    text: p.get("text")?.as_str()?.to_string(),
                    vector: dense_vector(r.vector?)?,
                })
            })
            .collect())
    }

    /// Opens the store in `dir`, creating it (and its payload indexes) on
    /// first use. Fails clearly when the folder holds vectors of another size.
    pub fn open(dir: &Path, dim: usize) -> anyhow::Result<Self> {
        Self::open_with(dir, dim, &HnswSettings::default())
    }

    /// [`EdgeStore::open`] with an index shape. A store built with another
    /// `m` or `ef_construct` is rebuilt to the new one by its next
    /// optimisation.
    pub fn open_with(dir: &Path, dim: usize, hnsw: &HnswSettings) -> anyhow::Result<Self> {
        hnsw.check().map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = EdgeConfig::builder()
            .vector(
                DEFAULT_VECTOR_NAME,
                EdgeVectorParams::builder(dim, Distance::Cosine).build(),
            )
            .on_disk_payload(true)
            .build();
        let shard = EdgeShard::load(dir, Some(config)).map_err(|e| {
            anyhow::anyhow!(
                "opening the vector store in {} for {dim}-dimensional vectors: {e} \
                 (a store built with another model must be moved away or re-indexed)",
                dir.display()
            )
        })?;
        let store = EdgeStore {
            inner: Arc::new(Inner {
                shard,
                writer: Mutex::new(()),
                optimizing: Mutex::new(()),
                dirty: false.into(),
                dim,
                search_ef: hnsw.ef.into(),
                dir: dir.to_path_buf(),
                min_free: 0.into(),
            }),
        };
        store
            .shard
            .set_hnsw_config(HnswIndexConfig {
                m: hnsw.m,
                ef_construct: hnsw.ef_construct,
                ..Default::default()
            })
            .map_err(|e| anyhow::anyhow!("setting the HNSW parameters: {e}"))?;
        let weak = Arc::downgrade(&store.inner);
        std::thread::Builder::new()
            .name("ragd-edge-flush".into())
            .spawn(move || loop {
                std::thread::sleep(FLUSH_EVERY);
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = inner.flush(false) {
                    tracing::error!("{e:#}");
                }
            })
            .context("starting the flush thread")?;
        // Qdrant builds extra HNSW links per value of an indexed field, so a
        // filter on it still finds a connected graph. Searches filter by
        // partition only; the other fields serve lookups (a document's
        // versions), and their links nearly doubled the HNSW build
        // (chunk_index alone: 50 graphs over the points) for no filtered
        // search (their extra links helped recall a little, which a wider
        // search breadth buys back cheaper: BENCHMARKS.md).
        let keyword = |enable_hnsw| {
            PayloadSchemaParams::Keyword(KeywordIndexParams {
                enable_hnsw: Some(enable_hnsw),
                ..Default::default()
            })
        };
        let lookup = || {
            PayloadSchemaParams::Integer(IntegerIndexParams {
                lookup: Some(true),
                range: Some(false),
                enable_hnsw: Some(false),
                ..Default::default()
            })
        };
        for (field, params) in [
            ("doc_id", keyword(false)),
            ("version", keyword(false)),
            ("division", keyword(false)),
            ("access_level", keyword(false)),
            ("partition", keyword(true)),
            ("chunk_index", lookup()),
            ("text_key", lookup()),
        ] {
            store.write(UpdateOperation::FieldIndexOperation(
                FieldIndexOperations::CreateIndex(CreateIndex {
                    field_name: key(field),
                    field_schema: Some(PayloadFieldSchema::FieldParams(params)),
                }),
            ))?;
        }
        store.add_partition_fields()?;
        Ok(store)
    }

    /// Stores written before searches filtered on `partition` lack that
    /// field, and their points would match no search. Sets it from each
    /// point's division and access level, one partition at a time (facets
    /// of the indexed fields say which exist). Nothing to do, and quick, on
    /// a current store.
    fn add_partition_fields(&self) -> anyhow::Result<()> {
        let missing = || Condition::IsEmpty(key("partition").into());
        let values = |field: &str, filter: Filter| -> anyhow::Result<Vec<String>> {
            let facets = self
                .shard
                .facet(FacetRequest {
                    key: key(field),
                    limit: usize::MAX,
                    filter: Some(filter),
                    exact: true,
                })
                .map_err(|e| anyhow::anyhow!("vector store facet: {e}"))?;
            Ok(facets
                .hits
                .into_iter()
                .filter_map(|h| match h.value {
                    FacetValue::Keyword(v) => Some(v),
                    _ => None,
                })
                .collect())
        };
        let divisions = values("division", Filter::new_must(missing()))?;
        let mut updated = 0;
        for d in &divisions {
            let in_division = || Filter {
                must: Some(vec![missing(), eq("division", d)]),
                ..Default::default()
            };
            for a in values("access_level", in_division())? {
                let mut filter = in_division();
                filter
                    .must
                    .get_or_insert_default()
                    .push(eq("access_level", &a));
                let mut payload = qjson::Map::new();
                payload.insert("partition".into(), partition_key(d, &a).into());
                self.write(UpdateOperation::PayloadOperation(PayloadOps::SetPayload(
                    SetPayloadOp {
                        payload: payload.into(),
                        points: None,
                        filter: Some(filter),
                        key: None,
                    },
                )))?;
                updated += 1;
            }
        }
        if updated > 0 {
            tracing::info!(
                partitions = updated,
                "vector store: added the partition field to points written by an older ragd"
            );
            self.inner.flush(true)?;
        }
        Ok(())
    }

    /// The breadth of the HNSW search (`hnsw_ef`, at least the limit):
    /// more finds more of the true nearest, slower. `None`: the default
    /// ([`HnswSettings::search_ef`]).
    pub fn set_search_ef(&self, ef: Option<usize>) {
        self.search_ef
            .store(ef.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes (and optimisations) wait while the disk holding the store
    /// has less than `bytes` free (`[index] min_free_mb`). The engine writes
    /// through memory maps: a write that finds the disk full does not fail,
    /// it kills the process (SIGBUS). Refused here instead, a write is an
    /// outage ([`crate::pool::Unavailable`]): the indexer pauses until
    /// there is room, and nothing is lost.
    pub fn set_min_free(&self, bytes: u64) {
        self.min_free
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// See [`EdgeStore::set_min_free`].
    fn check_room(&self) -> anyhow::Result<()> {
        let min = self.min_free.load(std::sync::atomic::Ordering::Relaxed);
        if min == 0 {
            return Ok(());
        }
        let free = match fs4::available_space(&self.dir) {
            Ok(free) => free,
            // Unknown: no reason to stop writing.
            Err(e) => {
                tracing::debug!("free space at {}: {e}", self.dir.display());
                return Ok(());
            }
        };
        if free < min {
            let e = anyhow::anyhow!(
                "the vector store's disk ({}) has {} MiB free, under index.min_free_mb ({} MiB): \
                 writes wait until there is room",
                self.dir.display(),
                free >> 20,
                min >> 20
            );
            return Err(crate::pool::unavailable(e));
        }
        Ok(())
    }

    fn write(&self, op: UpdateOperation) -> anyhow::Result<()> {
        self.check_room()?;
        self.write_anyway(op)
    }

    /// [`EdgeStore::write`] whatever the free space: for deletions (of a
    /// document, or a prune's old versions), each a small record. A disk
    /// low on room must not keep deleted or outdated text searchable until
    /// someone frees space (nor stop a node whose start removes it). (A
    /// hide is checked: it writes every payload it moves again, text
    /// included, and a hidden point is out of search by its partition.)
    fn write_anyway(&self, op: UpdateOperation) -> anyhow::Result<()> {
        let _w = self.writer.lock();
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        self.shard
            .update(op)
            .map_err(|e| anyhow::anyhow!("vector store write: {e}"))
    }

    fn versions_matching(&self, filter: Filter) -> anyhow::Result<Vec<StoredVersion>> {
        let mut out = Versions::default();
        let mut offset = None;
        loop {
            let (records, next) = self
                .shard
                .scroll(ScrollRequest {
                    offset,
                    limit: Some(1024),
                    filter: Some(filter.clone()),
                    // Not the text: a scroll over millions of points reads
                    // these three fields only.
                    with_payload: Some(WithPayloadInterface::Fields(vec![
                        key("doc_id"),
                        key("version"),
                        key("seq"),
                        key("division"),
                        key("access_level"),
                    ])),
                    with_vector: WithVector::Bool(false),
                    order_by: None,
                })
                .map_err(|e| anyhow::anyhow!("vector store scroll: {e}"))?;
            for r in records {
                if let Some(p) = r.payload {
                    let doc = p.0.get("doc_id").and_then(|v| v.as_str());
                    let ver = p.0.get("version").and_then(|v| v.as_str());
                    let seq = p.0.get("seq").and_then(|v| v.as_u64()).unwrap_or(0);
                    let field = |k: &str| p.0.get(k).and_then(|v| v.as_str()).map(str::to_string);
                    let partition = field("division").zip(field("access_level")).map(
                        |(division, access_level)| Partition {
                            division,
                            access_level,
                        },
                    );
                    if let (Some(d), Some(v)) = (doc, ver) {
                        out.add(d.to_string(), v.to_string(), seq, partition);
                    }
                }
            }
            match next {
                Some(n) => offset = Some(n),
                None => break,
            }
        }
        Ok(out.into_vec())
    }

    /// Every removal in one scroll and at most one delete: the points of
    /// any of the documents, outside the version each keeps.
    fn remove_now(&self, removals: &[Removal]) -> anyhow::Result<Vec<Vec<String>>> {
        if removals.is_empty() {
            return Ok(vec![]);
        }
        let filter = removal_filter(removals);
        let found = self.versions_matching(filter.clone())?;
        if !found.is_empty() {
            self.write_anyway(UpdateOperation::PointOperation(
                PointOperations::DeletePointsByFilter(filter),
            ))?;
        }
        Ok(removed_per_doc(removals, &found))
    }

    /// The points of one document version, checked.
    fn points(
        &self,
        doc: &DocMeta,
        chunks: &[Chunk],
        vectors: &[Vec<f32>],
        keys: &[i64],
    ) -> anyhow::Result<Vec<PointStructPersisted>> {
        check_upsert(chunks, vectors, keys, self.dim)?;
        let partition = partition_key(&doc.partition.division, &doc.partition.access_level);
        Ok(chunks
            .iter()
            .zip(vectors)
            .enumerate()
            .map(|(i, (c, v))| {
                let mut payload = json!({
                    "doc_id": doc.doc_id,
                    "uri": doc.uri,
                    "version": doc.version,
                    "division": doc.partition.division,
                    "access_level": doc.partition.access_level,
                    "partition": partition,
                    "chunk_index": c.index as i64,
                    "seq": doc.seq,
                    "text": c.text,
                });
                if let Some(k) = keys.get(i) {
                    payload["text_key"] = json!(k);
                }
                PointStruct::new(
                    point_id(&doc.doc_id, &doc.version, c.index),
                    v.clone(),
                    payload,
                )
                .into()
            })
            .collect())
    }

    /// Writes `points`, of the versions `docs`, in one operation (nothing
    /// for none), overwriting no point stored with a later seq.
    async fn upsert_points(
        &self,
        docs: &[&DocMeta],
        points: Vec<PointStructPersisted>,
    ) -> anyhow::Result<()> {
        if points.is_empty() {
            return Ok(());
        }
        let condition = overwritable(docs);
        self.blocking(move |s| {
            s.write(UpdateOperation::PointOperation(
                PointOperations::UpsertPointsConditional(ConditionalInsertOperation {
                    points_op: PointInsertOperations::PointsList(points),
                    condition,
                    update_mode: None,
                }),
            ))
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EdgeStore) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .context("vector store task panicked")?
    }

    /// The points `must` all hold for (every point with none).
    async fn count_where(&self, must: Vec<Condition>) -> anyhow::Result<u64> {
        let filter = (!must.is_empty()).then(|| Filter {
            must: Some(must),
            ..Default::default()
        });
        self.blocking(move |s| {
            s.shard
                .count(CountRequest {
                    filter,
                    exact: true,
                })
                .map(|n| n as u64)
                .map_err(|e| anyhow::anyhow!("vector store count: {e}"))
        })
        .await
    }
}

#[async_trait]
impl VectorStore for EdgeStore {
    fn backend(&self) -> &'static str {
        "qdrant-edge"
    }

    async fn upsert(
        &self,
        doc: &DocMeta,
        chunks: &[Chunk],
        vectors: &[Vec<f32>],
    ) -> anyhow::Result<()> {
        let points = self.points(doc, chunks, vectors, &[])?;
        self.upsert_points(&[doc], points).await
    }

    async fn upsert_docs(&self, docs: &[EmbeddedDoc]) -> anyhow::Result<()> {
        let mut points = Vec::new();
        for d in docs {
            points.extend(self.points(&d.meta, &d.chunks, &d.vectors, &d.keys)?);
        }
        let metas: Vec<&DocMeta> = docs.iter().map(|d| &d.meta).collect();
        self.upsert_points(&metas, points).await
    }

    async fn search(
        &self,
        vector: &[f32],
        scope: &Scope,
        limit: usize,
    ) -> anyhow::Result<Vec<Hit>> {
        if !check_search(vector, scope, limit, self.dim)? {
            return Ok(vec![]);
        }
        let filter = scope_filter(scope);
        let vector = vector.to_vec();
        let ef = HnswSettings {
            ef: self.search_ef.load(std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        }
        .search_ef(limit);
        self.blocking(move |s| {
            let points = s
                .shard
                .query(QueryRequest {
                    prefetches: vec![],
                    query: Some(ScoringQuery::Vector(QueryEnum::Nearest(
                        NamedQuery::default_dense(vector),
                    ))),
                    filter: Some(filter),
                    score_threshold: None,
                    limit,
                    offset: 0,
                    params: Some(SearchParams {
                        hnsw_ef: Some(ef),
                        ..Default::default()
                    }),
                    with_vector: WithVector::Bool(false),
                    with_payload: WithPayloadInterface::Bool(true),
                })
                .map_err(|e| anyhow::anyhow!("vector search: {e}"))?;
            Ok(points
                .into_iter()
                .filter_map(|p| {
                    let pl = p.payload?.0;
                    let s = |k: &str| pl.get(k).and_then(qjson::Value::as_str).map(str::to_string);
                    Some(Hit {
                        doc_id: s("doc_id")?,
                        uri: s("uri")?,
                        version: s("version")?,
                        division: s("division")?,
                        access_level: s("access_level")?,
                        chunk_index: pl.get("chunk_index")?.as_i64()? as u32,
                        text: s("text")?,
                        score: p.score,
                    })
                })
                .collect())
        })
        .await
    }

    async fn remove(&self, removals: &[Removal]) -> anyhow::Result<Vec<Vec<String>>> {
        let removals = removals.to_vec();
        self.blocking(move |s| s.remove_now(&removals)).await
    }

    async fn hide(&self, removals: &[Removal]) -> anyhow::Result<()> {
        if removals.is_empty() {
            return Ok(());
        }
        let filter = removal_filter(removals);
        let h = Partition::hidden();
        let mut payload = qjson::Map::new();
        payload.insert(
            "partition".into(),
            partition_key(&h.division, &h.access_level).into(),
        );
        payload.insert("division".into(), h.division.into());
        payload.insert("access_level".into(), h.access_level.into());
        self.blocking(move |s| {
            s.write(UpdateOperation::PayloadOperation(PayloadOps::SetPayload(
                SetPayloadOp {
                    payload: payload.into(),
                    points: None,
                    filter: Some(filter),
                    key: None,
                },
            )))
        })
        .await
    }

    async fn holds_all(&self, hits: &[Hit]) -> anyhow::Result<bool> {
        let ids: Vec<PointId> = hit_ids(hits).into_iter().map(PointId::NumId).collect();
        if ids.is_empty() {
            return Ok(true);
        }
        // The two fields the check reads, not the chunk's text.
        let fields = WithPayloadInterface::Fields(vec![key("division"), key("access_level")]);
        let found = self
            .blocking(move |s| {
                s.shard
                    .retrieve(&ids, Some(fields), Some(WithVector::Bool(false)))
                    .map_err(|e| anyhow::anyhow!("vector store retrieve: {e}"))
            })
            .await?;
        let found = found
            .into_iter()
            .filter_map(|r| {
                let PointId::NumId(id) = r.id else {
                    return None;
                };
                let pl = r.payload?.0;
                let s = |k: &str| pl.get(k).and_then(qjson::Value::as_str).map(str::to_string);
                Some((id, s("division")?, s("access_level")?))
            })
            .collect();
        Ok(all_found(hits, &found))
    }

    async fn indexed_versions(&self) -> anyhow::Result<Vec<StoredVersion>> {
        self.blocking(|s| {
            s.versions_matching(Filter {
                must: Some(vec![Condition::Field(FieldCondition::new_match(
                    key("chunk_index"),
                    Match::from(0i64),
                ))]),
                ..Default::default()
            })
        })
        .await
    }

    async fn versions_of(&self, doc_ids: &[String]) -> anyhow::Result<Vec<StoredVersion>> {
        if doc_ids.is_empty() {
            return Ok(vec![]);
        }
        let filter = Filter {
            must: Some(vec![
                any_of("doc_id", doc_ids),
                Condition::Field(FieldCondition::new_match(
                    key("chunk_index"),
                    Match::from(0i64),
                )),
            ]),
            ..Default::default()
        };
        self.blocking(move |s| s.versions_matching(filter)).await
    }

    async fn keyed_texts(&self, keys: &[i64], limit: usize) -> anyhow::Result<Vec<KeyedText>> {
        if keys.is_empty() || limit == 0 {
            return Ok(vec![]);
        }
        let filter = Filter::new_must(Condition::Field(FieldCondition::new_match(
            key("text_key"),
            Match::from(keys.to_vec()),
        )));
        self.keyed_where(filter, limit).await
    }

    async fn keyed_texts_of(
        &self,
        doc_ids: &[String],
        limit: usize,
    ) -> anyhow::Result<Vec<KeyedText>> {
        if doc_ids.is_empty() || limit == 0 {
            return Ok(vec![]);
        }
        let filter = Filter {
            must: Some(vec![any_of("doc_id", doc_ids)]),
            must_not: Some(vec![Condition::IsEmpty(key("text_key").into())]),
            ..Default::default()
        };
        self.keyed_where(filter, limit).await
    }

    async fn texts(&self, page: TextPage) -> anyhow::Result<(Vec<StoredText>, Option<u64>)> {
        let filter = page
            .unkeyed
            .then(|| Filter::new_must(Condition::IsEmpty(key("text_key").into())));
        let (records, next) = self
            .blocking(move |s| {
                s.shard
                    .scroll(ScrollRequest {
                        offset: page.from.map(PointId::NumId),
                        limit: Some(page.limit),
                        filter,
                        with_payload: Some(WithPayloadInterface::Fields(vec![
                            key("text_key"),
                            key("text"),
                        ])),
                        with_vector: WithVector::Bool(page.with_vectors),
                        order_by: None,
                    })
                    .map_err(|e| anyhow::anyhow!("vector store scroll: {e}"))
            })
            .await?;
        let texts = records
            .into_iter()
            .filter_map(|r| {
                let PointId::NumId(id) = r.id else {
                    return None;
                };
                let p = r.payload?.0;
                Some(StoredText {
                    id,
                    key: p.get("text_key").and_then(|k| k.as_i64()),
                    text: p.get("text")?.as_str()?.to_string(),
                    vector: r.vector.and_then(dense_vector),
                })
            })
            .collect();
        let next = match next {
            Some(PointId::NumId(n)) => Some(n),
            _ => None,
        };
        Ok((texts, next))
    }

    async fn set_text_keys(&self, keys: &[(u64, i64)]) -> anyhow::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let keys = keys.to_vec();
        self.blocking(move |s| {
            for (id, text_key) in keys {
                let mut payload = qjson::Map::new();
                payload.insert("text_key".into(), text_key.into());
                // By filter, not by id: an id the store no longer holds
                // (deleted since it was read) is then no error.
                let only = std::iter::once(PointId::NumId(id)).collect();
                s.write(UpdateOperation::PayloadOperation(PayloadOps::SetPayload(
                    SetPayloadOp {
                        payload: payload.into(),
                        points: None,
                        filter: Some(Filter::new_must(Condition::HasId(only))),
                        key: None,
                    },
                )))?;
            }
            Ok(())
        })
        .await
    }

    async fn count(&self, doc_id: Option<&str>) -> anyhow::Result<u64> {
        self.count_where(doc_id.map(|d| eq("doc_id", d)).into_iter().collect())
            .await
    }

    async fn count_hidden(&self) -> anyhow::Result<u64> {
        self.count_where(vec![eq("division", super::HIDDEN)]).await
    }

    async fn optimize(&self) -> anyhow::Result<()> {
        self.blocking(|s| {
            // An optimisation writes new segments: no room, no run.
            s.check_room()?;
            {
                let _o = s.optimizing.lock();
                s.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
                let started = std::time::Instant::now();
                let changed = (s.shard.optimize()).map_err(|e| anyhow::anyhow!("optimize: {e}"))?;
                if changed {
                    // (What an operator who changed hnsw_m waits for.)
                    let info = s.shard.info();
                    tracing::info!(
                        points = info.points_count,
                        in_graph = info.indexed_vectors_count,
                        segments = info.segments_count,
                        "vector store optimised (HNSW graph built) in {:.1?}",
                        started.elapsed()
                    );
                }
            }
            s.inner.flush(true)
        })
        .await
    }

    async fn flush(&self) -> anyhow::Result<()> {
        self.blocking(|s| s.inner.flush(true)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qdrant_edge::DeletePayloadOp;

    #[tokio::test]
    async fn edge_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = EdgeStore::open(dir.path(), super::super::conformance::DIM).unwrap();
        super::super::conformance::run_all(&store).await;
    }

    /// Removes payload field `name` from every point: what an older ragd,
    /// which did not write it, left behind.
    fn drop_field(store: &EdgeStore, name: &str) {
        store
            .write(UpdateOperation::PayloadOperation(
                PayloadOps::DeletePayload(DeletePayloadOp {
                    keys: vec![key(name)],
                    points: None,
                    filter: Some(Filter::default()),
                }),
            ))
            .unwrap();
    }

    #[tokio::test]
    async fn points_without_a_seq_count_as_seen_before_any_version() {
        use super::super::conformance::doc;
        let dir = tempfile::tempdir().unwrap();
        let store = EdgeStore::open(dir.path(), 8).unwrap();
        let (d, chunks, vecs) = doc("legacy", "v1", "hr", "public", 2, 0);
        store.upsert(&d, &chunks, &vecs).await.unwrap();
        // What an older ragd wrote: no seq field.
        drop_field(&store, "seq");
        let (d, chunks, vecs) = doc("legacy", "v2", "hr", "public", 1, 0);
        store.upsert(&d, &chunks, &vecs).await.unwrap();
        let prune = Removal::new("legacy", Some("v2")).seen_before(d.seq);
        assert_eq!(store.remove(&[prune]).await.unwrap(), [["v1"]]);
        assert_eq!(store.count(Some("legacy")).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn data_survives_reopen_and_a_wrong_dimension_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EdgeStore::open(dir.path(), 8).unwrap();
            let (doc, chunks, vecs) =
                super::super::conformance::doc("a", "v1", "hr", "public", 3, 0);
            store.upsert(&doc, &chunks, &vecs).await.unwrap();
            store.flush().await.unwrap();
        }
        // The flush thread lets go of the shard within one period.
        std::thread::sleep(FLUSH_EVERY * 2);
        let store = EdgeStore::open(dir.path(), 8).unwrap();
        assert_eq!(store.count(Some("a")).await.unwrap(), 3);
        drop(store);
        let err = EdgeStore::open(dir.path(), 16)
            .err()
            .expect("dimension mismatch must fail");
        assert!(format!("{err:#}").contains("16-dimensional"), "{err:#}");
    }

    #[tokio::test]
    async fn a_store_written_before_the_partition_field_is_searchable_after_reopen() {
        use super::super::conformance::doc;
        let dir = tempfile::tempdir().unwrap();
        let hnsw = HnswSettings {
            m: 8,
            ef_construct: 32,
            ef: 64,
        };
        let hr = Scope {
            divisions: vec!["hr".into()],
            access_levels: vec!["public".into()],
        };
        let finance = Scope {
            divisions: vec!["finance".into()],
            access_levels: vec!["confidential".into()],
        };
        {
            let store = EdgeStore::open_with(dir.path(), 8, &hnsw).unwrap();
            for (id, division, level, axis) in [
                ("a", "hr", "public", 0),
                ("b", "finance", "confidential", 1),
            ] {
                let (d, chunks, vecs) = doc(id, "v1", division, level, 3, axis);
                store.upsert(&d, &chunks, &vecs).await.unwrap();
            }
            assert_eq!(store.search(&[1.0; 8], &hr, 10).await.unwrap().len(), 3);
            // What an older ragd wrote: no partition field.
            drop_field(&store, "partition");
            assert!(
                store.search(&[1.0; 8], &hr, 10).await.unwrap().is_empty(),
                "searches filter on the partition field"
            );
            store.flush().await.unwrap();
        }
        std::thread::sleep(FLUSH_EVERY * 2);
        let store = EdgeStore::open_with(dir.path(), 8, &hnsw).unwrap();
        for (scope, id) in [(&hr, "a"), (&finance, "b")] {
            let hits = store.search(&[1.0; 8], scope, 10).await.unwrap();
            assert_eq!(hits.len(), 3, "{id}");
            assert!(hits.iter().all(|h| h.doc_id == id), "{hits:?}");
        }
    }

    /// Changed `[index] hnsw_m` or `hnsw_ef_construct` rebuild the graph
    /// at the store's next optimisation (the indexer runs one after every
    /// start), and unchanged ones rebuild nothing: at a million points a
    /// rebuild at every start would take the cores for minutes.
    #[tokio::test]
    async fn changed_hnsw_parameters_rebuild_the_graph_and_unchanged_ones_do_not() {
        use super::super::conformance::doc;
        use qdrant_edge::EdgeOptimizersConfig;
        let dir = tempfile::tempdir().unwrap();
        let hnsw = |m| HnswSettings {
            m,
            ef_construct: 32,
            ef: 64,
        };
        let scope = Scope {
            divisions: vec!["hr".into()],
            access_levels: vec!["public".into()],
        };
        // (A graph for a few hundred 8-d points: the default threshold is
        // 10 MB of vectors.)
        let small_threshold = EdgeOptimizersConfig {
            indexing_threshold: Some(1),
            ..Default::default()
        };
        let open = |m| {
            let store = EdgeStore::open_with(dir.path(), 8, &hnsw(m)).unwrap();
            store
                .shard
                .set_optimizers_config(small_threshold.clone())
                .unwrap();
            store
        };
        // Runs an optimisation: whether it rebuilt anything.
        let optimize = |store: &EdgeStore| store.shard.optimize().unwrap();
        let store = open(8);
        for i in 0..20 {
            let (d, chunks, vecs) = doc(&format!("d{i}"), "v1", "hr", "public", 20, i % 8);
            store.upsert(&d, &chunks, &vecs).await.unwrap();
        }
        assert!(optimize(&store), "the first optimisation builds the graph");
        assert_eq!(store.shard.info().indexed_vectors_count, 400);
        assert!(!optimize(&store), "nothing changed, nothing to rebuild");
        store.flush().await.unwrap();
        drop(store);
        std::thread::sleep(FLUSH_EVERY * 2);

        let store = open(8);
        assert!(
            !optimize(&store),
            "reopened as it was, the graph was rebuilt"
        );
        drop(store);
        std::thread::sleep(FLUSH_EVERY * 2);

        let store = open(16);
        assert!(optimize(&store), "a new hnsw_m left the old graph");
        assert_eq!(store.shard.info().indexed_vectors_count, 400);
        assert!(!optimize(&store), "rebuilt twice");
        assert_eq!(store.search(&[1.0; 8], &scope, 50).await.unwrap().len(), 50);
    }

    /// A disk that fills up pauses the writes instead of killing the
    /// daemon: the engine writes through memory maps, and without the check
    /// a write onto a full disk ends the process with SIGBUS. Once there is
    /// room again, the refused write goes through. (Needs a tmpfs: skipped
    /// where this process may not mount.)
    #[tokio::test]
    async fn a_full_disk_refuses_writes_as_an_outage_until_there_is_room() {
        use super::super::conformance::doc;
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("disk");
        std::fs::create_dir_all(&at).unwrap();
        let mount = |args: &[&str]| {
            let status = std::process::Command::new("mount")
                .args(args)
                .arg(&at)
                .stderr(std::process::Stdio::null())
                .status();
            status.is_ok_and(|s| s.success())
        };
        if !mount(&["-t", "tmpfs", "-o", "size=160m", "ragd-test"]) {
            eprintln!("skipped: cannot mount a tmpfs here");
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(self.0)
                    .status();
            }
        }
        let _unmount = Unmount(&at);
        let store = EdgeStore::open(&at.join("store"), 384).unwrap();
        store.set_min_free(96 << 20);
        // ~1 MiB of text and vectors a document.
        let big = |i: usize| {
            let (d, chunks, _) = doc(&format!("d{i}"), "v1", "hr", "public", 200, 0);
            let chunks: Vec<Chunk> = chunks
                .into_iter()
                .map(|c| Chunk {
                    text: "leave policy ".repeat(300),
                    ..c
                })
                .collect();
            let vectors = (0..chunks.len())
                .map(|j| (0..384).map(|k| ((i + j + k) % 7) as f32).collect())
                .collect::<Vec<Vec<f32>>>();
            (d, chunks, vectors)
        };
        let mut written = 0;
        let refused = loop {
            assert!(written < 200, "the disk never filled up");
            let (d, chunks, vectors) = big(written);
            match store.upsert(&d, &chunks, &vectors).await {
                Ok(()) => written += 1,
                Err(e) => break e,
            }
        };
        assert!(written > 0, "refused at once: {refused:#}");
        assert!(crate::pool::is_unavailable(&refused), "{refused:#}");
        assert!(format!("{refused:#}").contains("MiB free"), "{refused:#}");
        assert!(store.optimize().await.is_err(), "an optimisation ran");
        assert_eq!(store.count(None).await.unwrap(), 200 * written as u64);
        // A deletion still goes: a full disk keeps no deleted text
        // searchable.
        store.remove(&[Removal::new("d0", None)]).await.unwrap();
        assert_eq!(store.count(Some("d0")).await.unwrap(), 0);
        // More room: the refused document goes in, and the store is whole.
        assert!(mount(&["-o", "remount,size=512m"]));
        let (d, chunks, vectors) = big(written);
        store.upsert(&d, &chunks, &vectors).await.unwrap();
        store.optimize().await.unwrap();
        assert_eq!(store.count(None).await.unwrap(), 200 * written as u64);
    }
}
