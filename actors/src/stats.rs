//! Observable state of every actor, readable without messaging the actor (so
//! a wedged actor still shows up, with its last error, in `/actors`).

use parking_lot::Mutex;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Default)]
pub struct ActorStats {
    status: Mutex<String>,
    last_error: Mutex<Option<String>>,
    pub restarts: AtomicU64,
    pub processed: AtomicU64,
    pub failed: AtomicU64,
    pub queue_depth: AtomicU64,
    pub workers: AtomicU64,
    note: Mutex<Option<String>>,
}

impl ActorStats {
    pub fn set_status(&self, status: &str) {
        *self.status.lock() = status.to_string();
    }
    pub fn status(&self) -> String {
        self.status.lock().clone()
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }
    pub fn set_error(&self, error: impl Into<String>) {
        *self.last_error.lock() = Some(error.into());
    }
    /// A fact an operator needs to see, e.g. "reranker off: no model configured".
    pub fn set_note(&self, note: impl Into<String>) {
        *self.note.lock() = Some(note.into());
    }
    pub fn note(&self) -> Option<String> {
        self.note.lock().clone()
    }
    pub fn processed(&self) {
        self.processed_n(1);
    }
    pub fn processed_n(&self, n: u64) {
        self.processed.fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct ActorView {
    pub name: String,
    pub status: String,
    pub restarts: u64,
    pub queue_depth: u64,
    pub processed: u64,
    pub failed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<u64>,
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub children: Vec<ActorView>,
}

/// Every actor's stats by its path in the supervision tree
/// ("root/embed/embedder"). Actors register once; a restarted actor keeps its
/// entry, so restarts accumulate.
#[derive(Default, Clone)]
pub struct StatsRegistry {
    inner: Arc<Mutex<BTreeMap<String, Arc<ActorStats>>>>,
}

impl StatsRegistry {
    pub fn entry(&self, path: &str) -> Arc<ActorStats> {
        self.inner
            .lock()
            .entry(path.to_string())
            .or_insert_with(|| {
                let s = ActorStats::default();
                s.set_status("starting");
                Arc::new(s)
            })
            .clone()
    }

    pub fn remove(&self, path: &str) {
        self.inner.lock().remove(path);
    }

    pub fn get(&self, path: &str) -> Option<Arc<ActorStats>> {
        self.inner.lock().get(path).cloned()
    }

    pub fn flat(&self) -> Vec<(String, ActorView)> {
        self.inner
            .lock()
            .iter()
            .map(|(path, s)| (path.clone(), view(path, s)))
            .collect()
    }

    /// The supervision tree as nested views, built from the paths.
    pub fn tree(&self) -> Vec<ActorView> {
        fn insert(nodes: &mut Vec<ActorView>, parts: &[&str], leaf: ActorView) {
            let name = parts[0];
            let pos = match nodes.iter().position(|n| n.name == name) {
                Some(p) => p,
                None => {
                    nodes.push(ActorView {
                        name: name.to_string(),
                        status: "group".into(),
                        restarts: 0,
                        queue_depth: 0,
                        processed: 0,
                        failed: 0,
                        workers: None,
                        last_error: None,
                        note: None,
                        children: vec![],
                    });
                    nodes.len() - 1
                }
            };
            if parts.len() == 1 {
                let children = std::mem::take(&mut nodes[pos].children);
                nodes[pos] = ActorView { children, ..leaf };
            } else {
                insert(&mut nodes[pos].children, &parts[1..], leaf);
            }
        }
        let mut roots = Vec::new();
        for (path, v) in self.flat() {
            let parts: Vec<&str> = path.split('/').collect();
            insert(&mut roots, &parts, v);
        }
        roots
    }
}

fn view(path: &str, s: &ActorStats) -> ActorView {
    let workers = s.workers.load(Ordering::Relaxed);
    ActorView {
        name: path.rsplit('/').next().unwrap_or(path).to_string(),
        status: s.status(),
        restarts: s.restarts.load(Ordering::Relaxed),
        queue_depth: s.queue_depth.load(Ordering::Relaxed),
        processed: s.processed.load(Ordering::Relaxed),
        failed: s.failed.load(Ordering::Relaxed),
        workers: (workers > 0).then_some(workers),
        last_error: s.last_error.lock().clone(),
        note: s.note.lock().clone(),
        children: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_become_a_tree() {
        let reg = StatsRegistry::default();
        reg.entry("root").set_status("running");
        reg.entry("root/embed/embedder")
            .restarts
            .store(2, Ordering::Relaxed);
        reg.entry("root/index/indexer");
        let tree = reg.tree();
        assert_eq!(tree.len(), 1);
        assert_eq!(tree[0].status, "running");
        let names: Vec<_> = tree[0].children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["embed", "index"]);
        assert_eq!(tree[0].children[0].children[0].restarts, 2);
    }
}
