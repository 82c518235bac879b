//! Qdrant server backend (`[index] backend = "qdrant"`), over gRPC with
//! qdrant-client.
//!
//! One collection with custom sharding: one shard key per division, created
//! on demand when the first document of a division is indexed (replication
//! factor and shards per key from the config). The access level is an
//! indexed payload field filtered inside the engine, and a search addresses
//! only the shard keys of the caller's divisions, so it never even looks at
//! partitions the caller may not see.
//!
//! Every call has a timeout and is retried with exponential backoff (jitter,
//! `retry-after` honoured) when the server is unavailable, overloaded or the
//! call timed out; other errors fail at once with the server's message.
//! One still unavailable after the retries is marked so
//! ([`crate::pool::Unavailable`]): the indexer and pruner pause for it.

use super::{
    all_found, check_search, check_upsert, hit_ids, point_id, removed_per_doc, Hit, HnswSettings,
    KeyedText, Removal, Scope, StoredText, StoredVersion, TextPage, VectorStore, Versions,
};
use crate::messages::{Chunk, DocMeta, EmbeddedDoc, Partition};
use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use parking_lot::Mutex;
use qdrant_client::qdrant::{
    point_id, points_update_operation, read_consistency, shard_key, vector_output, Condition,
    CountPointsBuilder, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder,
    CreateShardKeyBuilder, CreateShardKeyRequestBuilder, DeletePointsBuilder, Distance, FieldType,
    Filter, GetPoints, GetPointsBuilder, HnswConfigDiffBuilder, PayloadIncludeSelector, PointId,
    PointStruct, PointsUpdateOperation, QueryPoints, QueryPointsBuilder, Range,
    ReadConsistencyType, ScrollPointsBuilder, SearchParamsBuilder, ShardKey, ShardKeySelector,
    ShardingMethod, UpdateBatchPointsBuilder, UpsertPointsBuilder, Value, VectorParamsBuilder,
    VectorsOutput,
};
use qdrant_client::{Qdrant, QdrantError};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct QdrantSettings {
    /// gRPC URL, e.g. `http://qdrant:6334`.
    pub url: String,
    pub collection: String,
    pub api_key: Option<String>,
    pub dim: usize,
    /// Shards per shard key (division).
    pub shard_number: u32,
    pub replication_factor: u32,
    /// Per call.
    pub timeout: Duration,
    pub max_retries: usize,
    /// `m` and `ef_construct` apply to a collection ragd creates; `ef` to
    /// every search.
    pub hnsw: HnswSettings,
}

pub struct QdrantStore {
    s: QdrantSettings,
    client: Qdrant,
    /// Shard keys known to exist, and when the list was last read.
    keys: Mutex<(HashSet<String>, Option<Instant>)>,
}

/// How often a search re-reads the shard keys when the caller has a
/// division this node has not seen (another indexer may have created it).
const KEYS_REFRESH: Duration = Duration::from_secs(5);

const FIELDS: &[(&str, FieldType)] = &[
    ("doc_id", FieldType::Keyword),
    ("version", FieldType::Keyword),
    ("division", FieldType::Keyword),
    ("access_level", FieldType::Keyword),
    ("chunk_index", FieldType::Integer),
    ("text_key", FieldType::Integer),
];

/// Worth another try: the server (or the way to it) is down, overloaded or
/// slow. Internal too: qdrant-client reports a refused connection so, and
/// the server its service errors, which a cluster in a rolling restart
/// gives ("not enough active replicas" while a node of a shard is down).
/// A request the server refuses is InvalidArgument, NotFound or
/// FailedPrecondition. (Past the retries such an error pauses the stage
/// rather than dead-letter documents; a document whose own write keeps
/// failing so while others succeed is still found out: see
/// [`crate::pool`].)
/// The most a server's `retry-after` makes a call wait before its next
/// try. A larger one (an hour; a buggy proxy's u64::MAX, which would
/// overflow the clock) is not waited out in one sleep: the call tries
/// again after this, and a server still overloaded says so again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// How long to wait before the next try: the backoff planned, or longer
/// when an overloaded server says so, up to [`MAX_RETRY_AFTER`].
pub fn next_wait(e: &QdrantError, planned: Duration) -> Duration {
    match e {
        QdrantError::ResourceExhaustedError {
            retry_after_seconds,
            ..
        } => Duration::from_secs(*retry_after_seconds)
            .min(MAX_RETRY_AFTER)
            .max(planned),
        _ => planned,
    }
}

pub fn retryable(e: &QdrantError) -> bool {
    use tonic::Code::*;
    match e {
        QdrantError::ResourceExhaustedError { .. } => true,
        QdrantError::ResponseError { status } => matches!(
            status.code(),
            Unavailable | ResourceExhausted | DeadlineExceeded | Cancelled | Unknown | Internal
        ),
        _ => false,
    }
}

fn keyword(field: &str, value: &str) -> Condition {
    Condition::matches(field, value.to_string())
}

/// The engine-side filter of a search: division and access level inside
/// the caller's scope.
pub fn scope_filter(scope: &Scope) -> Filter {
    Filter::must([
        Condition::matches("division", scope.divisions.clone()),
        Condition::matches("access_level", scope.access_levels.clone()),
    ])
}

/// The request a search sends: only the shard keys of the caller's
/// divisions that exist, and the scope filter inside the engine.
pub fn search_request(
    collection: &str,
    vector: &[f32],
    scope: &Scope,
    keys: &[String],
    limit: usize,
    ef: usize,
) -> QueryPoints {
    QueryPointsBuilder::new(collection)
        .query(vector.to_vec())
        .filter(scope_filter(scope))
        .limit(limit as u64)
        .with_payload(true)
        .params(SearchParamsBuilder::default().hnsw_ef(ef as u64))
        .shard_key_selector(ShardKeySelector {
            shard_keys: keys.iter().map(|k| ShardKey::from(k.clone())).collect(),
            fallback: None,
        })
        .read_consistency(majority())
        .build()
}

/// What a majority of a shard's replicas hold, as writes are acknowledged
/// (see `write_ordering`): Qdrant's default read asks one replica, and
/// one that lags a prune still returns the pruned chunks, to a search and
/// to the cache's check that a hit's sources stand ([`VectorStore::holds_all`]).
/// With one replica it is that replica, at no cost.
fn majority() -> read_consistency::Value {
    read_consistency::Value::Type(ReadConsistencyType::Majority as i32)
}

/// The request of [`VectorStore::holds_all`]: the points, with the two
/// fields the check reads, not the chunk's text. No shard key selector:
/// every shard is looked in, and a division emptied since (its key gone)
/// is no error, just points not found.
pub fn holds_request(collection: &str, ids: Vec<PointId>) -> GetPoints {
    use qdrant_client::qdrant::with_payload_selector::SelectorOptions;
    GetPointsBuilder::new(collection, ids)
        .with_payload(SelectorOptions::Include(PayloadIncludeSelector {
            fields: vec!["division".into(), "access_level".into()],
        }))
        .with_vectors(false)
        .read_consistency(majority())
        .build()
}

/// Points seen within `range` (by `seq`), and those that carry no seq
/// (written before ragd stored it), which count as seen before any.
fn seq_within(range: Range) -> Condition {
    Condition::from(Filter::should([
        Condition::range("seq", range),
        Condition::is_empty("seq"),
    ]))
}

/// The points `removals` name.
fn removal_filter(removals: &[Removal]) -> Filter {
    let one = |r: &Removal| {
        let mut f = Filter::must([keyword("doc_id", &r.doc_id)]);
        if let Some(seq) = r.seen_before {
            f.must.push(seq_within(Range {
                lt: Some(seq as f64),
                ..Default::default()
            }));
        }
        if let Some(keep) = &r.keep {
            f.must_not.push(keyword("version", keep));
        }
        f
    };
    match removals {
        [r] => one(r),
        _ => Filter::should(removals.iter().map(|r| Condition::from(one(r)))),
    }
}

/// The stored points an upsert of the versions `docs` may overwrite: not
/// those stored with a later seq than the version now written (see
/// [`VectorStore::upsert`]). A version with no seq overwrites its points.
fn overwritable(docs: &[&DocMeta]) -> Filter {
    Filter::should(docs.iter().map(|d| {
        let mut f = Filter::must([keyword("doc_id", &d.doc_id), keyword("version", &d.version)]);
        if d.seq > 0 {
            f.must.push(seq_within(Range {
                lte: Some(d.seq as f64),
                ..Default::default()
            }));
        }
        Condition::from(f)
    }))
}

fn payload_str(p: &HashMap<String, Value>, k: &str) -> Option<String> {
    p.get(k).and_then(|v| v.as_str()).map(|s| s.to_string())
}

/// Points with vectors per scroll of [`QdrantStore::keyed_where`]: about
/// a megabyte a reply (a 384-d vector and its chunk are ~2 KB).
const KEYED_PAGE: usize = 512;

impl QdrantStore {
    /// Connects, creates the collection (custom sharding, payload indexes)
    /// when it does not exist, and checks its vector size otherwise.
    pub async fn open(s: QdrantSettings) -> anyhow::Result<QdrantStore> {
        let mut b = Qdrant::from_url(&s.url)
            .timeout(s.timeout)
            .connect_timeout(s.timeout.min(Duration::from_secs(5)))
            // The check prints to stdout on a mismatch; we check what we
            // need (the collection) ourselves.
            .skip_compatibility_check();
        if let Some(k) = &s.api_key {
            b = b.api_key(k.clone());
        }
        let client = b.build().context("index.qdrant_url")?;
        let store = QdrantStore {
            s,
            client,
            keys: Mutex::new((HashSet::new(), None)),
        };
        store.ensure_collection().await?;
        store.refresh_keys().await?;
        Ok(store)
    }

    /// One call, retried with backoff while the server is unavailable
    /// (see [`next_wait`]).
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, QdrantError>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(self.s.max_retries)
            .with_jitter();
        f.retry(backoff)
            .when(retryable)
            .adjust(|e, planned| {
                let planned = planned?;
                metrics::counter!("ragd_qdrant_retries_total").increment(1);
                tracing::debug!("qdrant {what}: {e}; retrying");
                Some(next_wait(e, planned))
            })
            .await
            .map_err(|e| {
                let down = retryable(&e);
                let e = anyhow!("qdrant {what} ({}): {e}", self.s.url);
                // Past the retries, still down: a stage pauses for it
                // rather than dead-letter its documents.
                if down {
                    crate::pool::unavailable(e)
                } else {
                    e
                }
            })
    }

    async fn ensure_collection(&self) -> anyhow::Result<()> {
        let name = self.s.collection.clone();
        let exists = self
            .call("collection_exists", || self.client.collection_exists(&name))
            .await?;
        if exists {
            let info = self
                .call("collection_info", || self.client.collection_info(&name))
                .await?;
            let size = info
                .result
                .and_then(|i| i.config)
                .and_then(|c| c.params)
                .and_then(|p| p.vectors_config)
                .and_then(|v| v.config)
                .and_then(|c| match c {
                    qdrant_client::qdrant::vectors_config::Config::Params(p) => Some(p.size),
                    _ => None,
                });
            match size {
                Some(size) if size as usize == self.s.dim => {
                    // Made by an older ragd, it lacks this one (Qdrant
                    // answers a second creation of an index with success).
                    self.call("create_field_index", || {
                        self.client.create_field_index(
                            CreateFieldIndexCollectionBuilder::new(
                                &name,
                                "text_key",
                                FieldType::Integer,
                            )
                            .wait(true),
                        )
                    })
                    .await?;
                    return Ok(());
                }
                Some(size) => bail!(
                    "the Qdrant collection {name:?} holds {size}-dimensional vectors but the \
                     embedding model makes {}: set index.qdrant_collection to another name or \
                     re-index into a new collection",
                    self.s.dim
                ),
                None => bail!(
                    "the Qdrant collection {name:?} has no single unnamed dense vector; \
                     it was not made by ragd"
                ),
            }
        }
        let created = self
            .call("create_collection", || {
                self.client.create_collection(
                    CreateCollectionBuilder::new(&name)
                        .vectors_config(VectorParamsBuilder::new(
                            self.s.dim as u64,
                            Distance::Cosine,
                        ))
                        .hnsw_config(
                            HnswConfigDiffBuilder::default()
                                .m(self.s.hnsw.m as u64)
                                .ef_construct(self.s.hnsw.ef_construct as u64),
                        )
                        .sharding_method(ShardingMethod::Custom.into())
                        .shard_number(self.s.shard_number)
                        .replication_factor(self.s.replication_factor)
                        // A write acknowledged by a majority of replicas,
                        // so a read of a majority sees it (see `overtaken`).
                        .write_consistency_factor(self.s.replication_factor / 2 + 1),
                )
            })
            .await;
        match created {
            Ok(_) => {}
            // Another node created it meanwhile.
            Err(e) if e.to_string().contains("already exists") => {}
            Err(e) => return Err(e),
        }
        for (field, ty) in FIELDS {
            self.call("create_field_index", || {
                self.client.create_field_index(
                    CreateFieldIndexCollectionBuilder::new(&name, *field, *ty).wait(true),
                )
            })
            .await?;
        }
        tracing::info!(collection = %name, dim = self.s.dim, "created the Qdrant collection");
        Ok(())
    }

    async fn refresh_keys(&self) -> anyhow::Result<()> {
        let name = self.s.collection.clone();
        let listed = self
            .call("list_shard_keys", || {
                self.client.list_shard_keys(name.as_str())
            })
            .await?;
        let keys: HashSet<String> = listed
            .shard_keys
            .into_iter()
            .filter_map(|d| match d.key?.key? {
                shard_key::Key::Keyword(k) => Some(k),
                shard_key::Key::Number(n) => Some(n.to_string()),
            })
            .collect();
        *self.keys.lock() = (keys, Some(Instant::now()));
        Ok(())
    }

    async fn ensure_key(&self, division: &str) -> anyhow::Result<()> {
        if self.keys.lock().0.contains(division) {
            return Ok(());
        }
        let name = self.s.collection.clone();
        let created = self
            .call("create_shard_key", || {
                self.client.create_shard_key(
                    CreateShardKeyRequestBuilder::new(&name).request(
                        CreateShardKeyBuilder::default()
                            .shard_key(shard_key::Key::Keyword(division.to_string()))
                            .shards_number(self.s.shard_number)
                            .replication_factor(self.s.replication_factor),
                    ),
                )
            })
            .await;
        match created {
            Ok(_) => tracing::info!(division, "created a Qdrant shard key"),
            Err(e) if e.to_string().contains("already exists") => {}
            Err(e) => return Err(e),
        }
        self.keys.lock().0.insert(division.to_string());
        Ok(())
    }

    /// The caller's divisions that have a shard key (asking a key that does
    /// not exist is an error in Qdrant).
    async fn keys_for(&self, scope: &Scope) -> anyhow::Result<Vec<String>> {
        let (missing, stale) = {
            let k = self.keys.lock();
            (
                scope.divisions.iter().any(|d| !k.0.contains(d)),
                k.1.is_none_or(|t| t.elapsed() > KEYS_REFRESH),
            )
        };
        if missing && stale {
            self.refresh_keys().await?;
        }
        let k = self.keys.lock();
        let mut keys: Vec<String> = scope
            .divisions
            .iter()
            .filter(|d| k.0.contains(*d))
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// The document versions of the points matching `filter`, across all keys.
    async fn versions_matching(&self, filter: Filter) -> anyhow::Result<Vec<StoredVersion>> {
        let mut out = Versions::default();
        let mut offset: Option<PointId> = None;
        loop {
            // What a majority of a shard's replicas hold: an index node
            // reading back its write must see another node's acknowledged
            // one (see `overtaken`), and a prune every version written.
            let mut b = ScrollPointsBuilder::new(&self.s.collection)
                .filter(filter.clone())
                .limit(1024)
                .with_payload(true)
                .with_vectors(false)
                .read_consistency(majority());
            if let Some(o) = offset.take() {
                b = b.offset(o);
            }
            let req = b.build();
            let page = self
                .call("scroll", || self.client.scroll(req.clone()))
                .await?;
            for p in page.result {
                if let (Some(doc_id), Some(version)) = (
                    payload_str(&p.payload, "doc_id"),
                    payload_str(&p.payload, "version"),
                ) {
                    let seq = p.payload.get("seq").and_then(|v| v.as_integer());
                    let partition = payload_str(&p.payload, "division")
                        .zip(payload_str(&p.payload, "access_level"))
                        .map(|(division, access_level)| Partition {
                            division,
                            access_level,
                        });
                    out.add(doc_id, version, seq.unwrap_or(0).max(0) as u64, partition);
                }
            }
            match page.next_page_offset {
                Some(o) if o.point_id_options.is_some() => offset = Some(o),
                _ => break,
            }
        }
        Ok(out.into_vec())
    }

    /// The points of one document version, checked.
    fn points(
        &self,
        doc: &DocMeta,
        chunks: &[Chunk],
        vectors: &[Vec<f32>],
        keys: &[i64],
    ) -> anyhow::Result<Vec<PointStruct>> {
        check_upsert(chunks, vectors, keys, self.s.dim)?;
        Ok(chunks
            .iter()
            .zip(vectors)
            .enumerate()
            .map(|(i, (c, v))| {
                let mut payload: HashMap<String, Value> = [
                    ("doc_id", Value::from(doc.doc_id.clone())),
                    ("uri", Value::from(doc.uri.clone())),
                    ("version", Value::from(doc.version.clone())),
                    ("division", Value::from(doc.partition.division.clone())),
                    (
                        "access_level",
                        Value::from(doc.partition.access_level.clone()),
                    ),
                    ("chunk_index", Value::from(c.index as i64)),
                    ("seq", Value::from(doc.seq as i64)),
                    ("text", Value::from(c.text.clone())),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                if let Some(k) = keys.get(i) {
                    payload.insert("text_key".into(), Value::from(*k));
                }
                PointStruct::new(
                    point_id(&doc.doc_id, &doc.version, c.index),
                    v.clone(),
                    payload,
                )
            })
            .collect())
    }

    /// Writes `points`, of the versions `docs`, into the shard key of
    /// `division`, in one request, overwriting no point stored with a
    /// later seq. (A server too old to know `update_filter` ignores it:
    /// it overwrites them.)
    async fn upsert_points(
        &self,
        division: &str,
        docs: &[&DocMeta],
        points: Vec<PointStruct>,
    ) -> anyhow::Result<()> {
        if points.is_empty() {
            return Ok(());
        }
        self.ensure_key(division).await?;
        let req = UpsertPointsBuilder::new(&self.s.collection, points)
            .wait(true)
            .update_filter(overwritable(docs))
            .shard_key_selector(ShardKeySelector {
                shard_keys: vec![ShardKey::from(division.to_string())],
                fallback: None,
            })
            .build();
        self.call("upsert", || self.client.upsert_points(req.clone()))
            .await?;
        Ok(())
    }
}

#[async_trait]
impl VectorStore for QdrantStore {
    fn backend(&self) -> &'static str {
        "qdrant"
    }

    async fn upsert(
        &self,
        doc: &DocMeta,
        chunks: &[Chunk],
        vectors: &[Vec<f32>],
    ) -> anyhow::Result<()> {
        let points = self.points(doc, chunks, vectors, &[])?;
        self.upsert_points(&doc.partition.division, &[doc], points)
            .await
    }

    /// One request per division (a division is a shard key), in the order
    /// the divisions first appear.
    async fn upsert_docs(&self, docs: &[EmbeddedDoc]) -> anyhow::Result<()> {
        let mut by_division: Vec<(&str, Vec<&DocMeta>, Vec<PointStruct>)> = Vec::new();
        for d in docs {
            let points = self.points(&d.meta, &d.chunks, &d.vectors, &d.keys)?;
            let division = d.meta.partition.division.as_str();
            match by_division.iter_mut().find(|(k, _, _)| *k == division) {
                Some((_, metas, all)) => {
                    metas.push(&d.meta);
                    all.extend(points);
                }
                None => by_division.push((division, vec![&d.meta], points)),
            }
        }
        for (division, metas, points) in by_division {
            self.upsert_points(division, &metas, points).await?;
        }
        Ok(())
    }

    async fn search(
        &self,
        vector: &[f32],
        scope: &Scope,
        limit: usize,
    ) -> anyhow::Result<Vec<Hit>> {
        if !check_search(vector, scope, limit, self.s.dim)? {
            return Ok(vec![]);
        }
        let keys = self.keys_for(scope).await?;
        if keys.is_empty() {
            return Ok(vec![]); // none of the caller's divisions holds anything
        }
        let req = search_request(
            &self.s.collection,
            vector,
            scope,
            &keys,
            limit,
            self.s.hnsw.search_ef(limit),
        );
        let res = self
            .call("query", || self.client.query(req.clone()))
            .await?;
        Ok(res
            .result
            .into_iter()
            .filter_map(|p| {
                let pl = &p.payload;
                Some(Hit {
                    doc_id: payload_str(pl, "doc_id")?,
                    uri: payload_str(pl, "uri")?,
                    version: payload_str(pl, "version")?,
                    division: payload_str(pl, "division")?,
                    access_level: payload_str(pl, "access_level")?,
                    chunk_index: pl.get("chunk_index")?.as_integer()? as u32,
                    text: payload_str(pl, "text")?,
                    score: p.score,
                })
            })
            .collect())
    }

    /// Every removal in one scroll and at most one delete: the points of
    /// any of the documents, outside the version each keeps.
    async fn remove(&self, removals: &[Removal]) -> anyhow::Result<Vec<Vec<String>>> {
        if removals.is_empty() {
            return Ok(vec![]);
        }
        let filter = removal_filter(removals);
        let found = self.versions_matching(filter.clone()).await?;
        if !found.is_empty() {
            // No shard key: the delete reaches every key, so a document
            // that moved between divisions leaves nothing behind.
            let req = DeletePointsBuilder::new(&self.s.collection)
                .points(filter)
                .wait(true)
                .build();
            self.call("delete", || self.client.delete_points(req.clone()))
                .await?;
        }
        Ok(removed_per_doc(removals, &found))
    }

    async fn hide(&self, removals: &[Removal]) -> anyhow::Result<()> {
        if removals.is_empty() {
            return Ok(());
        }
        let h = Partition::hidden();
        // The points stay in their division's shard, where the scope
        // filter no longer matches them.
        let payload = HashMap::from([
            ("division".to_string(), Value::from(h.division)),
            ("access_level".to_string(), Value::from(h.access_level)),
        ]);
        self.set_payloads(vec![(payload, removal_filter(removals))])
            .await
    }

    async fn indexed_versions(&self) -> anyhow::Result<Vec<StoredVersion>> {
        self.versions_matching(Filter::must([Condition::matches("chunk_index", 0i64)]))
            .await
    }

    async fn versions_of(&self, doc_ids: &[String]) -> anyhow::Result<Vec<StoredVersion>> {
        if doc_ids.is_empty() {
            return Ok(vec![]);
        }
        self.versions_matching(Filter::must([
            Condition::matches("doc_id", doc_ids.to_vec()),
            Condition::matches("chunk_index", 0i64),
        ]))
        .await
    }

    async fn holds_all(&self, hits: &[Hit]) -> anyhow::Result<bool> {
        let ids: Vec<PointId> = hit_ids(hits).into_iter().map(PointId::from).collect();
        if ids.is_empty() {
            return Ok(true);
        }
        let req = holds_request(&self.s.collection, ids);
        let found = self
            .call("get", || self.client.get_points(req.clone()))
            .await?
            .result
            .into_iter()
            .filter_map(|p| {
                use qdrant_client::qdrant::point_id::PointIdOptions;
                let Some(PointIdOptions::Num(id)) = p.id?.point_id_options else {
                    return None;
                };
                let division = payload_str(&p.payload, "division")?;
                Some((id, division, payload_str(&p.payload, "access_level")?))
            })
            .collect();
        Ok(all_found(hits, &found))
    }

    async fn count(&self, doc_id: Option<&str>) -> anyhow::Result<u64> {
        self.count_where(doc_id.map(|d| Filter::must([keyword("doc_id", d)])))
            .await
    }

    /// (Over every shard key: a hidden point stays in its old one.)
    async fn count_hidden(&self) -> anyhow::Result<u64> {
        let hidden = Filter::must([keyword("division", super::HIDDEN)]);
        self.count_where(Some(hidden)).await
    }

    async fn flush(&self) -> anyhow::Result<()> {
        // Writes use wait=true: acknowledged writes are in Qdrant's WAL.
        Ok(())
    }

    async fn optimize(&self) -> anyhow::Result<()> {
        // Qdrant's own optimizer builds indexes in the background.
        Ok(())
    }

    /// One scroll over every shard key.
    async fn keyed_texts(&self, keys: &[i64], limit: usize) -> anyhow::Result<Vec<KeyedText>> {
        if keys.is_empty() || limit == 0 {
            return Ok(vec![]);
        }
        let filter = Filter::must([Condition::matches("text_key", keys.to_vec())]);
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
        let mut filter = Filter::must([Condition::matches("doc_id", doc_ids.to_vec())]);
        filter.must_not.push(Condition::is_empty("text_key"));
        self.keyed_where(filter, limit).await
    }

    async fn texts(&self, page: TextPage) -> anyhow::Result<(Vec<StoredText>, Option<u64>)> {
        let mut req = ScrollPointsBuilder::new(&self.s.collection)
            .limit(page.limit as u32)
            .with_payload(PayloadIncludeSelector {
                fields: vec!["text_key".into(), "text".into()],
            })
            .with_vectors(page.with_vectors);
        if let Some(from) = page.from {
            req = req.offset(PointId::from(from));
        }
        if page.unkeyed {
            req = req.filter(Filter::must([Condition::is_empty("text_key")]));
        }
        let req = req.build();
        let reply = self
            .call("scroll", || self.client.scroll(req.clone()))
            .await?;
        let texts = reply
            .result
            .into_iter()
            .filter_map(|p| {
                Some(StoredText {
                    id: num_id(p.id?)?,
                    key: p.payload.get("text_key").and_then(|k| k.as_integer()),
                    text: payload_str(&p.payload, "text")?,
                    vector: dense(p.vectors),
                })
            })
            .collect();
        Ok((texts, reply.next_page_offset.and_then(num_id)))
    }

    async fn set_text_keys(&self, keys: &[(u64, i64)]) -> anyhow::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        // By filter, not by id: an id deleted since it was read is then no
        // error.
        let sets = keys
            .iter()
            .map(|&(id, key)| {
                let payload = HashMap::from([("text_key".to_string(), Value::from(key))]);
                (
                    payload,
                    Filter::must([Condition::has_id([PointId::from(id)])]),
                )
            })
            .collect();
        self.set_payloads(sets).await
    }
}

impl QdrantStore {
    /// Up to `limit` points `filter` matches, with their text key, text
    /// and vector (those without a key are left out, counted in `limit`),
    /// a page of [`KEYED_PAGE`] at a time: a server's replies are limited
    /// in size.
    async fn keyed_where(&self, filter: Filter, limit: usize) -> anyhow::Result<Vec<KeyedText>> {
        let mut texts = Vec::new();
        let (mut seen, mut from) = (0, None);
        while seen < limit {
            let mut req = ScrollPointsBuilder::new(&self.s.collection)
                .filter(filter.clone())
                .limit((limit - seen).min(KEYED_PAGE) as u32)
                .with_payload(PayloadIncludeSelector {
                    fields: vec!["text_key".into(), "text".into()],
                })
                .with_vectors(true);
            if let Some(from) = from.take() {
                req = req.offset(from);
            }
            let req = req.build();
            let page = self
                .call("scroll", || self.client.scroll(req.clone()))
                .await?;
            if page.result.is_empty() {
                break;
            }
            seen += page.result.len();
            texts.extend(page.result.into_iter().filter_map(|p| {
                let key = p.payload.get("text_key")?.as_integer()?;
                let text = payload_str(&p.payload, "text")?;
                Some(KeyedText {
                    key,
                    text,
                    vector: dense(p.vectors)?,
                })
            }));
            match page.next_page_offset {
                Some(next) => from = Some(next),
                None => break,
            }
        }
        Ok(texts)
    }

    /// The points `filter` matches (every point with none), over every
    /// shard key.
    async fn count_where(&self, filter: Option<Filter>) -> anyhow::Result<u64> {
        let mut b = CountPointsBuilder::new(&self.s.collection).exact(true);
        if let Some(f) = filter {
            b = b.filter(f);
        }
        let req = b.build();
        let res = self
            .call("count", || self.client.count(req.clone()))
            .await?;
        Ok(res.result.map(|r| r.count).unwrap_or(0))
    }

    /// Sets each payload on the points its filter matches, in one request.
    /// No shard key, so that it reaches a point whatever its division (as a
    /// deletion does).
    async fn set_payloads(
        &self,
        sets: Vec<(HashMap<String, Value>, Filter)>,
    ) -> anyhow::Result<()> {
        let operations: Vec<PointsUpdateOperation> = sets
            .into_iter()
            .map(|(payload, filter)| PointsUpdateOperation {
                operation: Some(points_update_operation::Operation::SetPayload(
                    points_update_operation::SetPayload {
                        payload,
                        points_selector: Some(filter.into()),
                        shard_key_selector: None,
                        key: None,
                    },
                )),
            })
            .collect();
        let req = UpdateBatchPointsBuilder::new(&self.s.collection, operations)
            .wait(true)
            .build();
        self.call("update_batch", || {
            self.client.update_points_batch(req.clone())
        })
        .await?;
        Ok(())
    }
}

/// A point's dense vector, as a scroll returns it.
fn dense(v: Option<VectorsOutput>) -> Option<Vec<f32>> {
    match v?.get_vector()? {
        vector_output::Vector::Dense(v) => Some(v.data),
        _ => None,
    }
}

fn num_id(id: PointId) -> Option<u64> {
    match id.point_id_options? {
        point_id::PointIdOptions::Num(n) => Some(n),
        point_id::PointIdOptions::Uuid(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::indexer::conformance;
    use crate::testkit::qdrant::QdrantTestServer;

    fn settings(url: &str, dim: usize) -> QdrantSettings {
        QdrantSettings {
            url: url.to_string(),
            collection: "ragd-test".into(),
            api_key: None,
            dim,
            shard_number: 2,
            replication_factor: 1,
            timeout: Duration::from_secs(5),
            max_retries: 3,
            hnsw: HnswSettings::default(),
        }
    }

    #[tokio::test]
    async fn qdrant_store_passes_the_conformance_suite_through_the_grpc_test_server() {
        let server = QdrantTestServer::start();
        let store = QdrantStore::open(settings(&server.url, conformance::DIM))
            .await
            .unwrap();
        conformance::run_all(&store).await;
        // The collection was made with the configured sharding, and every
        // division became a shard key of its own.
        assert_eq!(server.sharding("ragd-test"), Some((2, 1)));
        assert!(server.shard_keys("ragd-test").len() >= 2);
    }

    /// Against a real Qdrant when QDRANT_URL is set (gRPC, e.g.
    /// http://localhost:6334); a fresh collection per run.
    #[tokio::test]
    async fn qdrant_store_passes_the_conformance_suite_on_a_real_qdrant_if_configured() {
        let Ok(url) = std::env::var("QDRANT_URL") else {
            eprintln!("QDRANT_URL not set: the suite ran against the test server only");
            return;
        };
        let mut s = settings(&url, conformance::DIM);
        s.collection = format!("ragd-conformance-{}", std::process::id());
        s.api_key = std::env::var("QDRANT_API_KEY").ok();
        let store = QdrantStore::open(s).await.unwrap();
        conformance::run_all(&store).await;
    }

    #[test]
    fn a_search_over_several_partitions_sends_their_shard_keys_and_the_scope_filter() {
        let scope = Scope {
            divisions: vec!["eng".into(), "hr".into()],
            access_levels: vec!["internal".into(), "public".into()],
        };
        let keys = vec!["eng".to_string(), "hr".to_string()];
        let q = search_request("docs", &[0.5, 0.5], &scope, &keys, 50, 128);
        assert_eq!(q.collection_name, "docs");
        assert_eq!(q.limit, Some(50));
        let sel = q.shard_key_selector.expect("a shard key selector");
        assert_eq!(
            sel.shard_keys,
            vec![
                ShardKey::from("eng".to_string()),
                ShardKey::from("hr".to_string())
            ]
        );
        assert_eq!(
            q.filter,
            Some(Filter::must([
                Condition::matches("division", vec!["eng".to_string(), "hr".to_string()]),
                Condition::matches(
                    "access_level",
                    vec!["internal".to_string(), "public".to_string()]
                ),
            ]))
        );
        assert!(q.query.is_some());
        // Read as writes are acknowledged: a replica that lags a prune
        // must not answer alone, for a search or a cached hit's check.
        let majority = Some(qdrant_client::qdrant::ReadConsistency {
            value: Some(majority()),
        });
        assert_eq!(q.read_consistency, majority);
        let holds = holds_request("docs", vec![PointId::from(7)]);
        assert_eq!(holds.read_consistency, majority);
    }

    #[tokio::test]
    async fn a_search_only_addresses_the_shard_keys_of_the_callers_divisions() {
        let server = QdrantTestServer::start();
        let store = QdrantStore::open(settings(&server.url, conformance::DIM))
            .await
            .unwrap();
        for (id, div, axis) in [("h", "hr", 0), ("e", "eng", 1), ("f", "finance", 2)] {
            let (m, c, v) = conformance::doc(id, "v1", div, "internal", 2, axis);
            store.upsert(&m, &c, &v).await.unwrap();
        }
        assert_eq!(server.points_in("ragd-test", "hr"), 2);
        assert_eq!(server.points_in("ragd-test", "finance"), 2);
        let scope = Scope {
            divisions: vec!["hr".into(), "eng".into(), "legal".into()],
            access_levels: vec!["internal".into()],
        };
        let hits = store
            .search(&conformance::vector(2, 0), &scope, 10)
            .await
            .unwrap();
        assert_eq!(hits.len(), 4);
        assert!(hits.iter().all(|h| h.division != "finance"));
        let last = server
            .calls()
            .into_iter()
            .rfind(|c| c.method == "query")
            .unwrap();
        // "legal" has no key yet, so it is not asked for.
        assert_eq!(last.shard_keys, vec!["eng".to_string(), "hr".to_string()]);
    }

    /// A server's retry-after lengthens the wait up to a cap (an hour, or
    /// u64::MAX seconds, would hold the call, or overflow the clock);
    /// never shortens the backoff.
    #[test]
    fn a_retry_after_is_honoured_up_to_a_cap() {
        let exhausted = |secs: u64| QdrantError::ResourceExhaustedError {
            status: tonic::Status::resource_exhausted("busy"),
            retry_after_seconds: secs,
        };
        let planned = Duration::from_millis(400);
        assert_eq!(next_wait(&exhausted(3), planned), Duration::from_secs(3));
        assert_eq!(next_wait(&exhausted(0), planned), planned);
        for secs in [3600, u64::MAX] {
            assert_eq!(next_wait(&exhausted(secs), planned), MAX_RETRY_AFTER);
        }
        let other = QdrantError::ConversionError("x".into());
        assert_eq!(next_wait(&other, planned), planned);
    }

    #[tokio::test]
    async fn unavailable_and_overloaded_servers_are_retried_with_backoff() {
        let server = QdrantTestServer::start();
        let store = QdrantStore::open(settings(&server.url, conformance::DIM))
            .await
            .unwrap();
        // (qdrant-client itself retries some codes once on a new channel;
        // ragd's backoff covers the rest.)
        server.fail_next([
            tonic::Code::Unavailable,
            tonic::Code::ResourceExhausted,
            tonic::Code::Unavailable,
        ]);
        let before = server.calls().len();
        let t = Instant::now();
        assert_eq!(store.count(None).await.unwrap(), 0);
        assert_eq!(server.calls().len(), before + 4);
        assert!(
            t.elapsed() >= Duration::from_millis(95),
            "{:?}",
            t.elapsed()
        );
        // Past the retries: a clear error naming the call and the server,
        // marked as the backend's, not the job's.
        server.fail_next([tonic::Code::Unavailable; 20]);
        let e = store.count(None).await.unwrap_err();
        assert!(crate::pool::is_unavailable(&e), "{e:#}");
        let e = e.to_string();
        assert!(e.contains("qdrant count") && e.contains(&server.url), "{e}");
        server.clear_faults();
        // A service error (a shard's replicas down in a rolling restart)
        // is the server's too.
        server.fail_next([tonic::Code::Internal; 20]);
        let e = store.count(None).await.unwrap_err();
        assert!(crate::pool::is_unavailable(&e), "{e:#}");
        server.clear_faults();
        // Errors that another try cannot fix are not retried, nor marked.
        let before = server.calls().len();
        server.fail_next([tonic::Code::InvalidArgument]);
        let e = store.count(None).await.unwrap_err();
        assert!(!crate::pool::is_unavailable(&e), "{e:#}");
        assert_eq!(server.calls().len(), before + 1);
        assert_eq!(store.count(None).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_collection_of_another_vector_size_is_a_clear_error() {
        let server = QdrantTestServer::start();
        QdrantStore::open(settings(&server.url, 8)).await.unwrap();
        let e = QdrantStore::open(settings(&server.url, 16))
            .await
            .err()
            .expect("must refuse");
        let text = format!("{e:#}");
        assert!(
            text.contains("8-dimensional") && text.contains("makes 16"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_clear_error_not_a_hang() {
        let port = crate::testkit::free_port();
        let mut s = settings(&format!("http://127.0.0.1:{port}"), 8);
        s.max_retries = 1;
        s.timeout = Duration::from_secs(1);
        let t = Instant::now();
        let e = QdrantStore::open(s)
            .await
            .err()
            .expect("nothing listens there");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(
            format!("{e:#}").contains(&format!("127.0.0.1:{port}")),
            "{e:#}"
        );
    }
}
