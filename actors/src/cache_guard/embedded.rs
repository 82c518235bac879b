//! In-process semantic cache. Entries are kept apart by what a hit must
//! match exactly (scope, top_k, dimension), as unit vectors in one
//! contiguous block per key, so a lookup scans only its own scope's
//! questions with a plain dot product, under a read lock that lets
//! lookups run side by side. At the default 10,000 entries one company-wide
//! scope scans in a fraction of a millisecond (BENCHMARKS.md, "Semantic
//! cache at capacity"); a node that needs far more uses the Redis backend.

use super::{scope_partitions, AsOf, CachedAnswer, Probe, SemanticCache};
use crate::indexer::{Removal, Removed, Scope};
use crate::messages::Partition;
use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a hit must match exactly: canonical scope, top_k, dimension.
type Key = (Scope, usize, usize);

struct Entry {
    value: CachedAnswer,
    created: Instant,
}

/// The entries of one key. Row `i` of `vectors` (unit length) belongs to
/// `ids[i]` and `entries[i]`.
struct Bucket {
    dim: usize,
    vectors: Vec<f32>,
    ids: Vec<u64>,
    entries: Vec<Entry>,
}

impl Bucket {
    fn position(&self, id: u64) -> Option<usize> {
        self.ids.iter().position(|&i| i == id)
    }

    /// Removes row `i` by moving the last row into its place.
    fn swap_remove(&mut self, i: usize) {
        let (dim, last) = (self.dim, self.ids.len() - 1);
        if i != last {
            self.vectors
                .copy_within(last * dim..(last + 1) * dim, i * dim);
        }
        self.vectors.truncate(last * dim);
        self.ids.swap_remove(i);
        self.entries.swap_remove(i);
    }
}

#[derive(Default)]
struct Entries {
    buckets: HashMap<Arc<Key>, Bucket>,
    /// Every stored entry's key, id and creation, oldest first: eviction
    /// order, and expiry order (one TTL for all). Entries invalidated since
    /// stay here until they reach the front or the queue is compacted.
    order: VecDeque<(Arc<Key>, u64, Instant)>,
    len: usize,
    next_id: u64,
    /// Each partition's generation (see the module's notes in
    /// `cache_guard`): here, under the entries' lock, so that a store's
    /// check of its `AsOf` and its insert are one step against a write's
    /// move and the drop of what it made stale.
    generations: HashMap<Partition, u64>,
}

impl Entries {
    /// Drops the oldest entry still stored; false when there is none.
    fn pop_oldest(&mut self) -> bool {
        while let Some((key, id, _)) = self.order.pop_front() {
            let Some(bucket) = self.buckets.get_mut(&key) else {
                continue; // invalidated since
            };
            let Some(i) = bucket.position(id) else {
                continue;
            };
            bucket.swap_remove(i);
            if bucket.ids.is_empty() {
                self.buckets.remove(&key);
            }
            self.len -= 1;
            return true;
        }
        false
    }

    /// Drops every entry `drop_it` picks, in one pass over the entries;
    /// returns how many.
    fn remove_where(&mut self, drop_it: impl Fn(&Entry) -> bool) -> usize {
        let mut dropped = 0;
        self.buckets.retain(|_, bucket| {
            let mut i = 0;
            while i < bucket.ids.len() {
                if drop_it(&bucket.entries[i]) {
                    bucket.swap_remove(i);
                    dropped += 1;
                } else {
                    i += 1;
                }
            }
            !bucket.ids.is_empty()
        });
        self.len -= dropped;
        self.compact_order();
        dropped
    }

    /// Drops the expired entries. When the oldest has expired, many
    /// usually have (a burst of questions an hour ago): one pass, not one
    /// search per entry.
    fn expire(&mut self, ttl: Duration) {
        // One clock reading for both steps: an entry that expired between
        // them would leave the queue but stay stored, holding a slot.
        let now = Instant::now();
        let expired = |at: &Instant| now.saturating_duration_since(*at) >= ttl;
        if self.order.front().is_some_and(|(_, _, at)| expired(at)) {
            self.remove_where(|e| expired(&e.created));
            while self.order.front().is_some_and(|(_, _, at)| expired(at)) {
                self.order.pop_front();
            }
        }
    }

    fn as_of(&self, scope: &Scope) -> AsOf {
        AsOf::from_generations(
            scope_partitions(scope)
                .iter()
                .map(|p| self.generations.get(p)),
        )
    }

    /// Forgets the order of entries invalidated since they were stored, once
    /// they outnumber the live ones (the queue stays within twice the
    /// capacity however much is invalidated).
    fn compact_order(&mut self) {
        if self.order.len() <= 2 * self.len.max(16) {
            return;
        }
        let live: HashSet<u64> = self
            .buckets
            .values()
            .flat_map(|b| b.ids.iter().copied())
            .collect();
        self.order.retain(|(_, id, _)| live.contains(id));
    }
}

/// Recent invalidations (doc id → version kept, and when), so an answer
/// computed from a version that was pruned while the query ran is not
/// stored after its invalidation went by. Kept for the entries' TTL, and
/// expired from the front of `order`: a store looks at its own documents
/// only, not at every invalidation of the last TTL (a re-ingest of a
/// whole tree writes one per document).
#[derive(Default)]
struct Tombstones {
    by_doc: HashMap<String, (Option<String>, Instant)>,
    /// (when, doc id), oldest first; a doc invalidated again is in it
    /// again, and only its latest time counts.
    order: VecDeque<(Instant, String)>,
}

impl Tombstones {
    fn insert(&mut self, doc_id: &str, keep: Option<String>, now: Instant) {
        self.by_doc.insert(doc_id.to_string(), (keep, now));
        self.order.push_back((now, doc_id.to_string()));
    }

    fn expire(&mut self, ttl: Duration) {
        while let Some((at, _)) = self.order.front() {
            if at.elapsed() < ttl {
                break;
            }
            let (at, doc) = self.order.pop_front().expect("a front tombstone");
            if self.by_doc.get(&doc).is_some_and(|(_, t)| *t == at) {
                self.by_doc.remove(&doc);
            }
        }
    }

    /// Whether a version of `doc_id` other than `version` was kept.
    fn refuses(&self, doc_id: &str, version: &str) -> bool {
        self.by_doc
            .get(doc_id)
            .is_some_and(|(keep, _)| keep.as_deref() != Some(version))
    }
}

pub struct EmbeddedCache {
    entries: RwLock<Entries>,
    tombstones: Mutex<Tombstones>,
    threshold: f32,
    capacity: usize,
    ttl: Duration,
    /// Tests widen the window between a store's tombstone check and its
    /// insert with this pause.
    #[cfg(test)]
    pause_in_store: Duration,
}

impl EmbeddedCache {
    pub fn new(threshold: f32, capacity: usize, ttl: Duration) -> Self {
        EmbeddedCache {
            entries: RwLock::new(Entries::default()),
            tombstones: Mutex::new(Default::default()),
            threshold,
            capacity: capacity.max(1),
            ttl,
            #[cfg(test)]
            pause_in_store: Duration::ZERO,
        }
    }

    /// Entries that can still be served (expired ones are dropped by the
    /// next store).
    pub fn len(&self) -> usize {
        let entries = self.entries.read();
        entries
            .buckets
            .values()
            .flat_map(|b| &b.entries)
            .filter(|e| e.created.elapsed() < self.ttl)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `v` scaled to unit length; None for a zero (or not finite) vector, which
/// is near nothing.
fn unit(v: &[f32]) -> Option<Vec<f32>> {
    let norm = dot(v, v).sqrt();
    (norm.is_normal()).then(|| v.iter().map(|x| x / norm).collect())
}

/// In sixteen independent sums, so the compiler can keep them in vector
/// registers (one running sum is a chain of dependent adds it may not
/// reorder).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0f32; LANES];
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[async_trait]
impl SemanticCache for EmbeddedCache {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn probe(&self, vector: &[f32], scope: &Scope, top_k: usize) -> anyhow::Result<Probe> {
        let entries = self.entries.read();
        let as_of = entries.as_of(scope);
        let Some(q) = unit(vector) else {
            return Ok(Probe {
                found: None,
                as_of: Some(as_of),
            });
        };
        let key: Key = (scope.clone().canonical(), top_k, q.len());
        let Some(bucket) = entries.buckets.get(&key) else {
            return Ok(Probe {
                found: None,
                as_of: Some(as_of),
            });
        };
        // Every entry here is as of now: a write drops those it makes stale.
        let mut best: Option<(f32, usize)> = None;
        for (i, row) in bucket.vectors.chunks_exact(bucket.dim).enumerate() {
            let c = dot(row, &q);
            if c >= self.threshold
                && best.is_none_or(|(b, _)| c > b)
                && bucket.entries[i].created.elapsed() < self.ttl
            {
                best = Some((c, i));
            }
        }
        let found = best.map(|(_, i)| bucket.entries[i].value.clone());
        Ok(Probe {
            found,
            as_of: Some(as_of),
        })
    }

    async fn as_of(&self, scope: &Scope) -> anyhow::Result<AsOf> {
        Ok(self.entries.read().as_of(scope))
    }

    async fn store(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
        value: CachedAnswer,
        as_of: &AsOf,
    ) -> anyhow::Result<()> {
        let Some(v) = unit(vector) else {
            return Ok(()); // no question is near it
        };
        let key = Arc::new((scope.clone().canonical(), top_k, v.len()));
        // The checks and the insert happen under the entries' lock, as one
        // step: an invalidation writes its tombstones first, then takes
        // this lock to drop what cites them, so it either sees this entry
        // or this store sees its tombstones; a write moves the generations
        // and drops what they made stale under this lock too. (Checked,
        // unlocked, then inserted, an invalidation or a write in between
        // would miss the entry, which would then be served until its TTL.)
        let mut entries = self.entries.write();
        if entries.as_of(scope) != *as_of {
            return Ok(()); // computed before a write to its partitions
        }
        let ttl = self.ttl;
        {
            let mut tombstones = self.tombstones.lock();
            tombstones.expire(ttl);
            let stale = (value.sources.iter()).any(|h| tombstones.refuses(&h.doc_id, &h.version));
            if stale {
                return Ok(());
            }
        }
        #[cfg(test)]
        std::thread::sleep(self.pause_in_store);
        entries.expire(ttl);
        while entries.len >= self.capacity && entries.pop_oldest() {}
        entries.compact_order();
        let id = entries.next_id;
        entries.next_id += 1;
        entries.len += 1;
        let now = Instant::now();
        entries.order.push_back((key.clone(), id, now));
        let bucket = entries.buckets.entry(key).or_insert_with(|| Bucket {
            dim: v.len(),
            vectors: Vec::new(),
            ids: Vec::new(),
            entries: Vec::new(),
        });
        bucket.vectors.extend_from_slice(&v);
        bucket.ids.push(id);
        bucket.entries.push(Entry {
            value,
            created: now,
        });
        Ok(())
    }

    /// Moves the generations and drops every entry of a scope that sees
    /// one of the partitions, in one step under the entries' lock.
    async fn indexed(&self, partitions: &[Partition]) -> anyhow::Result<()> {
        if partitions.is_empty() {
            return Ok(());
        }
        let mut entries = self.entries.write();
        for p in partitions {
            *entries.generations.entry(p.clone()).or_default() += 1;
        }
        let sees =
            |key: &Key| (partitions.iter()).any(|p| key.0.allows(&p.division, &p.access_level));
        let mut dropped = 0;
        entries.buckets.retain(|key, bucket| {
            let stale = sees(key);
            if stale {
                dropped += bucket.ids.len();
            }
            !stale
        });
        entries.len -= dropped;
        entries.compact_order();
        Ok(())
    }

    async fn invalidate(&self, doc_id: &str, keep: Option<&str>) -> anyhow::Result<usize> {
        let removal = Removal::new(doc_id, keep);
        self.invalidate_all(&[removal]).await
    }

    /// One pass over the entries for the whole batch, not one per document.
    async fn invalidate_all(&self, removals: &[Removal]) -> anyhow::Result<usize> {
        if removals.is_empty() {
            return Ok(0);
        }
        let now = Instant::now();
        let mut tombstones = self.tombstones.lock();
        // Here too, not only in `store`: a node that indexes and answers
        // nothing (no queries, or none stored) would keep a tombstone per
        // version it ever indexed, and its first store would then drain
        // them all under the entries' lock.
        tombstones.expire(self.ttl);
        for r in removals {
            tombstones.insert(&r.doc_id, r.keep.clone(), now);
        }
        drop(tombstones);
        let removed = Removed::by(removals);
        let cites_removed = |e: &Entry| {
            e.value
                .sources
                .iter()
                .any(|h| removed.contains(&h.doc_id, &h.version))
        };
        let dropped = self.entries.write().remove_where(cites_removed);
        Ok(dropped)
    }

    async fn drop_citing(&self, cited: &[(String, String)]) -> anyhow::Result<usize> {
        let cites = |e: &Entry| {
            let mut sources = e.value.sources.iter();
            sources.any(|h| cited.iter().any(|(d, v)| *d == h.doc_id && *v == h.version))
        };
        Ok(self.entries.write().remove_where(cites))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache_guard::test_support::{a_batch, hit, one_document_twice, scope};
    use crate::cache_guard::visible;

    /// An invalidation that comes while a store is between its tombstone
    /// check and its insert (held there for 200 ms): once both are done, no
    /// entry cites the removed version.
    #[test]
    fn an_invalidation_during_a_store_leaves_nothing_stale() {
        use futures::executor::block_on;
        let mut cache = EmbeddedCache::new(0.98, 100, Duration::from_secs(60));
        cache.pause_in_store = Duration::from_millis(200);
        let v = [1.0, 0.0, 0.0];
        let value = CachedAnswer {
            answer: None,
            sources: vec![hit("a", "v1", "hr")],
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                block_on(cache.store(&v, &scope(&["hr"]), 5, value, &AsOf::default())).unwrap()
            });
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                block_on(cache.invalidate_all(&[Removal::new("a", Some("v2"))])).unwrap();
            });
        });
        assert_eq!(
            block_on(cache.lookup(&v, &scope(&["hr"]), 5)).unwrap(),
            None
        );
    }

    /// A write to a partition: every answer for a scope that sees it stops
    /// being served (the scopes that do not see it keep theirs), and an
    /// answer whose lookup came before the write is not stored after it.
    #[tokio::test]
    async fn a_write_makes_the_answers_of_every_scope_that_sees_its_partition_stale() {
        let cache = EmbeddedCache::new(0.98, 100, Duration::from_secs(60));
        let (hr, eng, both) = (scope(&["hr"]), scope(&["eng"]), scope(&["hr", "eng"]));
        let value = |doc: &str| CachedAnswer {
            answer: Some(doc.into()),
            sources: vec![hit(doc, "v1", "hr")],
        };
        let q = [1.0, 0.0, 0.0];
        for s in [&hr, &eng, &both] {
            let as_of = cache.as_of(s).await.unwrap();
            cache.store(&q, s, 5, value("a"), &as_of).await.unwrap();
        }
        // A query for hr, under way while the write lands.
        let before = cache.probe(&q, &hr, 3).await.unwrap().as_of.unwrap();
        let partition = |d: &str, a: &str| Partition {
            division: d.into(),
            access_level: a.into(),
        };
        cache.indexed(&[partition("hr", "internal")]).await.unwrap();
        assert_eq!(cache.lookup(&q, &hr, 5).await.unwrap(), None);
        assert_eq!(cache.lookup(&q, &both, 5).await.unwrap(), None);
        assert!(cache.lookup(&q, &eng, 5).await.unwrap().is_some());
        assert_eq!(cache.len(), 1, "the stale entries were kept");
        cache.store(&q, &hr, 3, value("a"), &before).await.unwrap();
        assert_eq!(cache.lookup(&q, &hr, 3).await.unwrap(), None);
        // Asked again after the write: stored, and served.
        let after = cache.probe(&q, &hr, 3).await.unwrap().as_of.unwrap();
        assert_ne!(after, before);
        cache.store(&q, &hr, 3, value("b"), &after).await.unwrap();
        assert_eq!(cache.lookup(&q, &hr, 3).await.unwrap(), Some(value("b")));
        // A partition hr's principals do not see moves nothing of theirs.
        cache
            .indexed(&[partition("hr", "confidential")])
            .await
            .unwrap();
        assert_eq!(cache.as_of(&hr).await.unwrap(), after);
        assert!(cache.lookup(&q, &hr, 3).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn hits_near_questions_in_the_same_scope_only() {
        let cache = EmbeddedCache::new(0.98, 100, Duration::from_secs(60));
        let v = vec![1.0, 0.0, 0.0];
        let value = CachedAnswer {
            answer: None,
            sources: vec![hit("a", "v1", "hr")],
        };
        cache
            .store(&v, &scope(&["hr"]), 5, value.clone(), &AsOf::default())
            .await
            .unwrap();
        // 0.99 cosine: a hit.
        let near = vec![0.99, 0.141, 0.0];
        assert_eq!(
            cache.lookup(&near, &scope(&["hr"]), 5).await.unwrap(),
            Some(value.clone())
        );
        // 0.95 cosine: a miss.
        let far = vec![0.95, 0.312, 0.0];
        assert_eq!(cache.lookup(&far, &scope(&["hr"]), 5).await.unwrap(), None);
        // Another scope or top_k: a miss.
        assert_eq!(
            cache.lookup(&v, &scope(&["hr", "eng"]), 5).await.unwrap(),
            None
        );
        assert_eq!(cache.lookup(&v, &scope(&["hr"]), 3).await.unwrap(), None);
        // A principal who cannot see the cited chunk never gets it.
        assert!(!visible(&value, &scope(&["eng"])));
    }

    /// A tombstone lives for the TTL: a re-invalidated document's counts
    /// from its latest invalidation, and the expired ones are gone from
    /// memory.
    #[test]
    fn tombstones_expire_after_the_ttl_of_their_latest_invalidation() {
        let ttl = Duration::from_millis(1000);
        let mut t = Tombstones::default();
        t.insert("a", Some("v2".into()), Instant::now());
        t.insert("b", None, Instant::now());
        std::thread::sleep(Duration::from_millis(600));
        t.insert("a", Some("v3".into()), Instant::now());
        t.expire(ttl);
        assert!(t.refuses("a", "v2") && !t.refuses("a", "v3"));
        assert!(t.refuses("b", "v1"));
        std::thread::sleep(Duration::from_millis(500));
        t.expire(ttl);
        // b's went; a's first went too, but its second stands.
        assert!(!t.refuses("b", "v1"));
        assert!(t.refuses("a", "v2"));
        assert_eq!((t.by_doc.len(), t.order.len()), (1, 1));
        std::thread::sleep(Duration::from_millis(600));
        t.expire(ttl);
        assert!(!t.refuses("a", "v2"));
        assert_eq!((t.by_doc.len(), t.order.len()), (0, 0));
    }

    /// A node that indexes without storing answers keeps no more than a
    /// TTL's worth of tombstones.
    #[tokio::test]
    async fn invalidations_alone_expire_old_tombstones() {
        let cache = EmbeddedCache::new(0.98, 10, Duration::from_millis(20));
        let removals: Vec<Removal> = (0..1000)
            .map(|i| Removal::new(&format!("kb:{i}.md"), Some("v1")))
            .collect();
        cache.invalidate_all(&removals).await.unwrap();
        assert_eq!(cache.tombstones.lock().order.len(), 1000);
        tokio::time::sleep(Duration::from_millis(50)).await;
        cache.invalidate("kb:new.md", Some("v1")).await.unwrap();
        let t = cache.tombstones.lock();
        assert_eq!((t.by_doc.len(), t.order.len()), (1, 1));
    }

    #[tokio::test]
    async fn pruned_versions_invalidate_their_entries() {
        let cache = EmbeddedCache::new(0.98, 100, Duration::from_secs(60));
        let s = scope(&["hr"]);
        cache
            .store(
                &[1.0, 0.0],
                &s,
                5,
                CachedAnswer {
                    answer: None,
                    sources: vec![hit("a", "v1", "hr")],
                },
                &AsOf::default(),
            )
            .await
            .unwrap();
        cache
            .store(
                &[0.0, 1.0],
                &s,
                5,
                CachedAnswer {
                    answer: None,
                    sources: vec![hit("b", "v1", "hr")],
                },
                &AsOf::default(),
            )
            .await
            .unwrap();
        assert_eq!(cache.invalidate("a", Some("v1")).await.unwrap(), 0);
        assert_eq!(cache.invalidate("a", Some("v2")).await.unwrap(), 1);
        assert_eq!(cache.invalidate("b", None).await.unwrap(), 1);
        assert!(cache.is_empty());
        // An answer built from the pruned version, stored after the
        // invalidation (a query that raced the prune), is refused.
        cache
            .store(
                &[1.0, 0.0],
                &s,
                5,
                CachedAnswer {
                    answer: None,
                    sources: vec![hit("a", "v1", "hr")],
                },
                &AsOf::default(),
            )
            .await
            .unwrap();
        assert!(cache.is_empty());
        cache
            .store(
                &[1.0, 0.0],
                &s,
                5,
                CachedAnswer {
                    answer: None,
                    sources: vec![hit("a", "v2", "hr")],
                },
                &AsOf::default(),
            )
            .await
            .unwrap();
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn a_batch_of_removals_drops_what_each_would_in_turn() {
        let cache = EmbeddedCache::new(0.98, 100, Duration::from_secs(60));
        let s = scope(&["hr"]);
        let answers = [
            vec![hit("a", "v1", "hr")],
            vec![hit("b", "v1", "hr")],
            vec![hit("c", "v1", "hr")],
            vec![hit("a", "v2", "hr"), hit("d", "v1", "hr")],
        ];
        for (i, sources) in answers.into_iter().enumerate() {
            let mut v = vec![0.0; 4];
            v[i] = 1.0;
            let value = CachedAnswer {
                answer: None,
                sources,
            };
            cache
                .store(&v, &s, 5, value, &AsOf::default())
                .await
                .unwrap();
        }
        assert_eq!(cache.invalidate_all(&a_batch()).await.unwrap(), 2);
        let cited = |cache: &EmbeddedCache| -> Vec<String> {
            let entries = cache.entries.read();
            let mut docs: Vec<String> = entries
                .buckets
                .values()
                .flat_map(|b| &b.entries)
                .map(|e| {
                    let s: Vec<String> = e
                        .value
                        .sources
                        .iter()
                        .map(|h| format!("{}@{}", h.doc_id, h.version))
                        .collect();
                    s.join("+")
                })
                .collect();
            docs.sort();
            docs
        };
        assert_eq!(cited(&cache), vec!["a@v2+d@v1", "c@v1"]);
        // One document twice: what either removal removes goes.
        assert_eq!(
            cache.invalidate_all(&one_document_twice()).await.unwrap(),
            1
        );
        assert_eq!(cited(&cache), vec!["c@v1"]);
        assert_eq!(cache.invalidate_all(&[]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn capacity_and_ttl_bound_the_cache() {
        let cache = EmbeddedCache::new(0.98, 2, Duration::from_millis(50));
        let s = scope(&["hr"]);
        for i in 0..3 {
            cache
                .store(
                    &[1.0, i as f32],
                    &s,
                    5,
                    CachedAnswer {
                        answer: None,
                        sources: vec![],
                    },
                    &AsOf::default(),
                )
                .await
                .unwrap();
        }
        assert_eq!(cache.len(), 2);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(cache.lookup(&[1.0, 0.0], &s, 5).await.unwrap(), None);
        assert!(cache.is_empty());
        // The next store drops every expired entry, and their order.
        let fresh = CachedAnswer {
            answer: None,
            sources: vec![],
        };
        cache
            .store(&[0.0, 1.0], &s, 5, fresh.clone(), &AsOf::default())
            .await
            .unwrap();
        assert_eq!(cache.lookup(&[0.0, 1.0], &s, 5).await.unwrap(), Some(fresh));
        let entries = cache.entries.read();
        assert_eq!((entries.len, entries.order.len()), (1, 1));
        assert_eq!(
            entries.buckets.values().map(|b| b.ids.len()).sum::<usize>(),
            1
        );
    }

    /// Eviction takes the oldest entry of any scope; a lookup gets the
    /// nearest of its own scope's entries; invalidated entries do not pile
    /// up in the eviction queue.
    #[tokio::test]
    async fn oldest_goes_first_across_scopes_and_the_nearest_hits() {
        let cache = EmbeddedCache::new(0.98, 3, Duration::from_secs(60));
        let (hr, eng) = (scope(&["hr"]), scope(&["eng"]));
        let answer = |doc: &str| CachedAnswer {
            answer: Some(doc.into()),
            sources: vec![hit(doc, "v1", "hr")],
        };
        let e = |i: usize| {
            let mut v = vec![0.0f32; 20];
            v[i] = 1.0;
            v
        };
        cache
            .store(&e(0), &hr, 5, answer("hr-0"), &AsOf::default())
            .await
            .unwrap();
        cache
            .store(&e(1), &eng, 5, answer("eng-1"), &AsOf::default())
            .await
            .unwrap();
        cache
            .store(&e(2), &hr, 5, answer("hr-2"), &AsOf::default())
            .await
            .unwrap();
        // Full: the fourth pushes out hr-0, the oldest, from another scope.
        cache
            .store(&e(3), &eng, 5, answer("eng-3"), &AsOf::default())
            .await
            .unwrap();
        let got = |v: Vec<f32>, s: &Scope| {
            let cache = &cache;
            let s = s.clone();
            async move {
                cache
                    .lookup(&v, &s, 5)
                    .await
                    .unwrap()
                    .and_then(|a| a.answer)
            }
        };
        assert_eq!(got(e(0), &hr).await, None);
        assert_eq!(got(e(1), &eng).await.as_deref(), Some("eng-1"));
        assert_eq!(got(e(2), &hr).await.as_deref(), Some("hr-2"));
        assert_eq!(got(e(3), &eng).await.as_deref(), Some("eng-3"));
        // Unnormalised questions and entries: cosine, not dot product,
        // decides (a tenth of the length is a dot product of 0.1).
        let short: Vec<f32> = e(2).iter().map(|x| x * 0.1).collect();
        assert_eq!(got(short, &hr).await.as_deref(), Some("hr-2"));
        let long: Vec<f32> = e(7).iter().map(|x| x * 40.0).collect();
        cache
            .store(&long, &eng, 5, answer("eng-7"), &AsOf::default())
            .await
            .unwrap();
        assert_eq!(got(e(7), &eng).await.as_deref(), Some("eng-7"));
        // Two entries above the threshold: the nearer one answers.
        let mut a = e(5);
        a[6] = 0.1; // cosine 0.995 to e(5)
        let mut b = e(5);
        b[6] = 0.2; // cosine 0.981 to e(5)
        cache
            .store(&b, &hr, 5, answer("far"), &AsOf::default())
            .await
            .unwrap();
        cache
            .store(&a, &hr, 5, answer("near"), &AsOf::default())
            .await
            .unwrap();
        assert_eq!(got(e(5), &hr).await.as_deref(), Some("near"));
        // A zero vector is near nothing and is not stored.
        assert_eq!(got(vec![0.0; 20], &hr).await, None);
        cache
            .store(&[0.0; 20], &hr, 5, answer("zero"), &AsOf::default())
            .await
            .unwrap();
        assert_eq!(cache.len(), 3);
        // Store and invalidate many times: the queue stays bounded.
        for i in 0..1000 {
            let doc = format!("d{i}");
            cache
                .store(&e(i % 20), &eng, 5, answer(&doc), &AsOf::default())
                .await
                .unwrap();
            assert_eq!(cache.invalidate(&doc, None).await.unwrap(), 1);
        }
        let entries = cache.entries.read();
        assert!(entries.order.len() <= 2 * 16 + 1, "{}", entries.order.len());
        assert_eq!(entries.len, 2);
    }
}
