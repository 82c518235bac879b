//! The vectors of documents deleted a moment ago, held in memory so that a
//! file deleted and written back later than the delete grace (a site
//! rebuilt in minutes, a branch checked out and back, a folder restored
//! from a backup) costs no embedding: the store no longer holds its texts,
//! this does. Filled by the VersionPruner before it removes a document
//! whole, read by the embedder after the stores; both on one node.

use crate::indexer::KeyedText;
use quick_cache::sync::Cache;
use std::collections::HashMap;
use std::sync::Arc;

/// The most chunks kept of one batch of removals (the pruner's): a 20 MB
/// file has 25,000, which would push out every other document's, and
/// reading them would hold up the removal.
pub const PER_BATCH: usize = 4096;

/// A text and its vector, under the text's key.
type Entry = Arc<(String, Vec<f32>)>;

/// An entry's weight: its bytes, roughly (the text, the vector, and the
/// cache's own keeping).
#[derive(Clone)]
struct Bytes;

impl quick_cache::Weighter<i64, Entry> for Bytes {
    fn weight(&self, _: &i64, e: &Entry) -> u64 {
        (e.0.len() + e.1.len() * std::mem::size_of::<f32>() + 64) as u64
    }
}

/// See the module. Past its bytes, the entries used least go first
/// (quick_cache's CLOCK-Pro).
pub struct DeletedVectors {
    cache: Cache<i64, Entry, Bytes>,
}

impl DeletedVectors {
    /// Holding up to `bytes` (a 384-d vector and its chunk weigh ~2 KB).
    pub fn new(bytes: u64) -> DeletedVectors {
        let items = (bytes / 2048).clamp(16, 1 << 20) as usize;
        DeletedVectors {
            cache: Cache::with_weighter(items, bytes, Bytes),
        }
    }

    /// Keeps the texts of a document being deleted.
    pub fn keep(&self, texts: Vec<KeyedText>) {
        for t in texts {
            self.cache.insert(t.key, Arc::new((t.text, t.vector)));
        }
        metrics::gauge!("ragd_embedder_deleted_vectors_bytes").set(self.cache.weight() as f64);
    }

    /// The vectors held of `wanted` (key and text), by key: only where the
    /// text is the one held under its key too.
    pub fn find(&self, wanted: &[(i64, &str)]) -> HashMap<i64, Vec<f32>> {
        wanted
            .iter()
            .filter_map(|(k, text)| {
                let e = self.cache.get(k)?;
                (e.0 == *text).then(|| (*k, e.1.clone()))
            })
            .collect()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.cache.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(key: i64, text: &str) -> KeyedText {
        KeyedText {
            key,
            text: text.into(),
            vector: vec![key as f32; 384],
        }
    }

    /// What is found is the vector kept under the key, for that text only;
    /// what it holds stays within its bytes.
    #[test]
    fn holds_the_vectors_of_its_texts_within_its_bytes() {
        let one = 384 * 4 + 64 + 6; // a vector, the keeping, "text-N"
        let deleted = DeletedVectors::new(3 * one as u64);
        deleted.keep(vec![text(1, "text-1"), text(2, "text-2")]);
        let found = deleted.find(&[(1, "text-1"), (2, "another"), (9, "text-9")]);
        assert_eq!(found.keys().collect::<Vec<_>>(), [&1]);
        assert_eq!(found[&1], vec![1.0; 384]);
        assert!(deleted.bytes() <= 3 * one as u64);
        deleted.keep(vec![text(3, "text-3"), text(4, "text-4")]);
        assert!(deleted.bytes() <= 3 * one as u64, "{}", deleted.bytes());
        let all = [(1, "text-1"), (2, "text-2"), (3, "text-3"), (4, "text-4")];
        let held = deleted.find(&all);
        assert!((1..4).contains(&held.len()), "{:?}", held.keys());
    }
}
