//! In-process semantic cache: a bounded list scanned linearly. A few thousand
//! 384-d entries scan in well under a millisecond; a node that needs more
//! uses the Redis backend.

use super::{CachedAnswer, SemanticCache};
use crate::indexer::Scope;
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
        self.tombstones.lock().insert(
            doc_id.to_string(),
            (keep.map(str::to_string), Instant::now()),
        );
        let mut entries = self.entries.lock();
        let before = entries.len();
        entries.retain(|e| {
            !e.value
                .sources
                .iter()
                .any(|h| h.doc_id == doc_id && Some(h.version.as_str()) != keep)
        });
        Ok(before - entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache_guard::test_support::{hit, scope};
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
