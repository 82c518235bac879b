//! In-process semantic cache: a bounded list scanned linearly. A few thousand
//! 384-d entries scan in well under a millisecond; a node that needs more
//! uses the Redis backend.

use super::{CachedAnswer, SemanticCache};
use crate::indexer::{Removal, Removed, Scope};
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

struct Entry {
    vector: Vec<f32>,
    scope: Scope,
    top_k: usize,
    value: CachedAnswer,
    created: Instant,
}

pub struct EmbeddedCache {
    entries: Mutex<VecDeque<Entry>>,
    /// Recent invalidations (doc id → version kept), so an answer computed
    /// from a version that was pruned while the query ran is not stored
    /// after its invalidation went by.
    tombstones: Mutex<std::collections::HashMap<String, (Option<String>, Instant)>>,
    threshold: f32,
    capacity: usize,
    ttl: Duration,
}

impl EmbeddedCache {
    pub fn new(threshold: f32, capacity: usize, ttl: Duration) -> Self {
        EmbeddedCache {
            entries: Mutex::new(VecDeque::new()),
            tombstones: Mutex::new(Default::default()),
            threshold,
            capacity: capacity.max(1),
            ttl,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    dot / (na.sqrt() * nb.sqrt()).max(1e-12)
}

#[async_trait]
impl SemanticCache for EmbeddedCache {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn lookup(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
    ) -> anyhow::Result<Option<CachedAnswer>> {
        let scope = scope.clone().canonical();
        let mut entries = self.entries.lock();
        let ttl = self.ttl;
        entries.retain(|e| e.created.elapsed() < ttl);
        let best = entries
            .iter()
            .filter(|e| e.top_k == top_k && e.scope == scope && e.vector.len() == vector.len())
            .map(|e| (cosine(&e.vector, vector), e))
            .filter(|(c, _)| *c >= self.threshold)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        Ok(best.map(|(_, e)| e.value.clone()))
    }

    async fn store(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
        value: CachedAnswer,
    ) -> anyhow::Result<()> {
        {
            let mut tombstones = self.tombstones.lock();
            let ttl = self.ttl;
            tombstones.retain(|_, (_, at)| at.elapsed() < ttl);
            let stale = value.sources.iter().any(|h| {
                tombstones
                    .get(&h.doc_id)
                    .is_some_and(|(keep, _)| keep.as_deref() != Some(h.version.as_str()))
            });
            if stale {
                return Ok(());
            }
        }
        let mut entries = self.entries.lock();
        while entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back(Entry {
            vector: vector.to_vec(),
            scope: scope.clone().canonical(),
            top_k,
            value,
            created: Instant::now(),
        });
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
        for r in removals {
            tombstones.insert(r.doc_id.clone(), (r.keep.clone(), now));
        }
        drop(tombstones);
        let removed = Removed::by(removals);
        let mut entries = self.entries.lock();
        let before = entries.len();
        entries.retain(|e| {
            !e.value
                .sources
                .iter()
                .any(|h| removed.contains(&h.doc_id, &h.version))
        });
        Ok(before - entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache_guard::test_support::{a_batch, hit, one_document_twice, scope};
    use crate::cache_guard::visible;

    #[tokio::test]
    async fn hits_near_questions_in_the_same_scope_only() {
        let cache = EmbeddedCache::new(0.98, 100, Duration::from_secs(60));
        let v = vec![1.0, 0.0, 0.0];
        let value = CachedAnswer {
            answer: None,
            sources: vec![hit("a", "v1", "hr")],
        };
        cache
            .store(&v, &scope(&["hr"]), 5, value.clone())
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
            cache.store(&v, &s, 5, value).await.unwrap();
        }
        assert_eq!(cache.invalidate_all(&a_batch()).await.unwrap(), 2);
        let cited = |cache: &EmbeddedCache| -> Vec<String> {
            let entries = cache.entries.lock();
            let mut docs: Vec<String> = entries
                .iter()
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
                )
                .await
                .unwrap();
        }
        assert_eq!(cache.len(), 2);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(cache.lookup(&[1.0, 0.0], &s, 5).await.unwrap(), None);
        assert!(cache.is_empty());
    }
}
