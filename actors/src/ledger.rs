//! The ingest ledger: every document the watcher saw, and where it ended.
//!
//! It is also the pipeline's admission control. A document version enters the
//! pipeline only with a permit from a fixed pool, and gives it back when it
//! reaches an end (indexed, deleted, skipped, dead-lettered or superseded). So
//! however large the burst, at most `max_in_flight` documents are queued
//! between the stages, and the watcher waits instead of buffering. Their
//! bytes are held to a budget the same way (`max_in_flight_mb`): a burst of
//! 20 MB logs would otherwise hold 256 of them, their text and chunks, at
//! once (some 10 GB).
//!
//! Its memory follows the documents the source has, not every name it ever
//! had: a deleted document is forgotten a while after its deletion ends
//! (`[pipeline] forget_deleted_after_secs`; see [`Ledger::with_memory`]).

use parking_lot::Mutex;
use serde::Serialize;
use std::collections::VecDeque;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum DocStatus {
    InFlight,
    Indexed,
    Deleted,
    Skipped(String),
    DeadLettered(String),
}

impl DocStatus {
    /// The name the admin API shows and filters by.
    pub fn name(&self) -> &'static str {
        match self {
            DocStatus::InFlight => "in_flight",
            DocStatus::Indexed => "indexed",
            DocStatus::Deleted => "deleted",
            DocStatus::Skipped(_) => "skipped",
            DocStatus::DeadLettered(_) => "dead_lettered",
        }
    }

    pub const NAMES: [&'static str; 5] = [
        "in_flight",
        "indexed",
        "deleted",
        "skipped",
        "dead_lettered",
    ];
}

/// Which documents [`Ledger::documents`] lists.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct DocQuery {
    /// A [`DocStatus::name`].
    pub status: Option<String>,
    /// Ids starting with this (`source:` or `source:folder/`).
    #[serde(default)]
    pub prefix: String,
    /// Ids after this one (the last of the previous page).
    pub after: Option<String>,
}

/// One document as the admin API lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DocReport {
    pub doc_id: String,
    #[serde(flatten)]
    pub status: DocStatus,
}

/// Why a version ends skipped when a newer one overtook it.
pub const SUPERSEDED: &str = "superseded by a newer version";

/// Why the chunker ends a version it could not read as the watcher saw it:
/// the file no longer hashed so (being rewritten), or was gone for the
/// moment. See [`Ledger::ended_unread`].
pub const CHANGED_WHILE_QUEUED: &str = "changed while queued; newer version follows";
pub const REMOVED_BEFORE_READ: &str = "file removed before it was read";
/// Why the chunker ends a version whose source did not answer its read (a
/// hard-mounted share whose server is gone): a watching node's watcher
/// reads it again once the source answers; a one-shot `ragd ingest` ends
/// with it skipped so (run it again).
pub const SOURCE_HUNG: &str = "its source did not answer the read (a share that hangs)";

/// Whether a skip's reason is one of those above.
fn ended_unread_for(why: &str) -> bool {
    why == CHANGED_WHILE_QUEUED || why == REMOVED_BEFORE_READ || why == SOURCE_HUNG
}

impl crate::messages::IndexedEvent {
    /// How the version this event reports ended, for a ledger.
    pub fn outcome(&self) -> Outcome {
        use crate::messages::IndexedEvent::*;
        match self {
            Indexed { .. } => Outcome::Indexed,
            Superseded { .. } => Outcome::Skipped(SUPERSEDED.into()),
            Skipped { reason, .. } => Outcome::Skipped(reason.clone()),
            Deleted { .. } => Outcome::Deleted,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Indexed,
    Deleted,
    Skipped(String),
    DeadLettered(String),
}

#[derive(Default, Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct LedgerCounts {
    pub seen: u64,
    pub indexed: u64,
    pub deleted: u64,
    pub skipped: u64,
    pub dead_lettered: u64,
    pub in_flight: u64,
    /// Of `deleted` (and `seen`), the documents no longer held in memory,
    /// forgotten a while after their deletion ended: a folder of files
    /// that come and go (build outputs, rotated names) does not grow the
    /// ledger for ever. The admin API no longer lists them.
    pub forgotten: u64,
}

/// Marker version for a deletion travelling through the pipeline.
pub const DELETE_VERSION: &str = "-";

/// The latest "version" of a document skipped as a whole (too big, or no
/// text in it): the source has it, but nothing of it is to be in the index.
const SKIPPED_VERSION: &str = "-";

/// What a version in flight holds: its place among `max_in_flight`, and
/// its bytes' share of the byte budget (given back when dropped).
struct Permits {
    _doc: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

struct DocEntry {
    /// The newest version the source has; `None` once the file is gone.
    latest: Option<String>,
    status: DocStatus,
    pending: HashMap<String, Permits>,
    /// The watcher's sequence of `latest` (see [`Ledger::observe`]).
    seq: u64,
    forget: Forget,
    /// What this node's watcher last said of the document. Unlike
    /// `latest`, the jobs an index stage observes do not change it: on a
    /// node with both roles, a version written after the deletion
    /// (delivered late, or from another ingest node) leaves the document
    /// gone here (see [`Ledger::gone_here`]).
    watched: Watched,
}

/// What a node's watcher last said of a document.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Watched {
    /// Nothing (yet): another ingest node's document, known from its
    /// jobs, or one the store held at start that the scan has not found.
    Never,
    /// A version of it (admitted, found indexed, or skipped).
    Present,
    /// Its deletion.
    Gone,
}

impl Watched {
    fn of(version: Option<&str>) -> Watched {
        match version {
            Some(_) => Watched::Present,
            None => Watched::Gone,
        }
    }
}

/// Where a deleted document is on its way out of the ledger.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Forget {
    /// Held: not deleted, or a deletion that a late job could still undo.
    No,
    /// A cluster's index node learnt that no job of it older than its
    /// deletion is still on its way (see [`Ledger::release`]).
    Released,
    /// Deleted and settled since then: forgotten once the horizon passed.
    Since(Instant),
}

impl DocEntry {
    /// [`DocEntry::shown`]'s name, without a copy of its reason.
    fn shown_name(&self) -> &'static str {
        if self.pending.is_empty() {
            self.status.name()
        } else {
            DocStatus::InFlight.name()
        }
    }

    /// The state to report: in flight while any job of it is (as counted).
    fn shown(&self) -> DocStatus {
        if self.pending.is_empty() {
            self.status.clone()
        } else {
            DocStatus::InFlight
        }
    }

    fn new() -> DocEntry {
        DocEntry {
            latest: None,
            status: DocStatus::InFlight,
            pending: HashMap::new(),
            seq: 0,
            forget: Forget::No,
            watched: Watched::Never,
        }
    }

    /// On a `held` ledger, whether its deletion waits for a release:
    /// one its own watcher never spoke of (see [`Docs::held`]).
    fn held(&self, held: bool) -> bool {
        held && self.watched == Watched::Never
    }

    /// Gone from the source, and no job of it pending here.
    fn tombstone(&self) -> bool {
        self.latest.is_none() && self.pending.is_empty()
    }

    /// The counter this entry is in: in flight while any job of it is.
    fn count<'c>(&self, c: &'c mut LedgerCounts) -> &'c mut u64 {
        if !self.pending.is_empty() {
            return &mut c.in_flight;
        }
        match self.status {
            DocStatus::InFlight => &mut c.in_flight,
            DocStatus::Indexed => &mut c.indexed,
            DocStatus::Deleted => &mut c.deleted,
            DocStatus::Skipped(_) => &mut c.skipped,
            DocStatus::DeadLettered(_) => &mut c.dead_lettered,
        }
    }
}

/// The entries and their counts, kept in step on every change: the admin
/// API, /ready and /metrics read the counts often, and a recount would
/// walk millions of entries under the lock the pipeline needs.
///
/// Entries are sorted by id, so the documents under a folder (`kb:site/`)
/// are a range, not a search through every document; and the ids in each
/// state but indexed have a sorted set of their own, so listing the few
/// skipped among millions indexed reads only those. (Indexed is most of a
/// ledger: a set of it would cost memory to save a filter over a range
/// that is mostly indexed anyway.)
struct Docs {
    map: BTreeMap<Arc<str>, DocEntry>,
    counts: LedgerCounts,
    /// By [`DocEntry::shown_name`], except "indexed".
    by_state: HashMap<&'static str, BTreeSet<Arc<str>>>,
    /// Deleted documents in the order they became forgettable, each with
    /// that moment ([`Forget::Since`]): the oldest are forgotten first.
    forgettable: VecDeque<(Instant, Arc<str>)>,
    /// How long a settled deletion is remembered (listed by the admin API,
    /// and a guard against a job redelivered late).
    forget_after: Duration,
    /// A cluster's node with the index role: the deletions it only sees
    /// as jobs (of documents its own watcher never spoke of, which is
    /// every one on a node without the ingest role) wait for
    /// [`Ledger::release`] before the horizon starts.
    held: bool,
    /// Told each deletion that settled here (an ingest node: the index
    /// nodes are then told that they may forget it too).
    settled_out: Option<mpsc::Sender<(String, u64)>>,
    /// Told each document whose latest version ended unread (see
    /// [`Ledger::unread_versions`]).
    unread_out: Option<mpsc::Sender<String>>,
}

impl Docs {
    /// Applies `f` to `doc_id`'s entry, created first if `create`, and
    /// moves it between the counters if its state changed.
    fn update<R>(
        &mut self,
        doc_id: &str,
        create: bool,
        f: impl FnOnce(&mut DocEntry) -> R,
    ) -> Option<R> {
        if !self.map.contains_key(doc_id) {
            if !create {
                return None;
            }
            let entry = DocEntry::new();
            self.counts.seen += 1;
            *entry.count(&mut self.counts) += 1;
            let id: Arc<str> = Arc::from(doc_id);
            self.file(entry.shown_name(), &id, true);
            self.map.insert(id, entry);
        }
        let now = Instant::now();
        let entry = self.map.get_mut(doc_id)?;
        let before = entry.shown_name();
        *entry.count(&mut self.counts) -= 1;
        let r = f(entry);
        *entry.count(&mut self.counts) += 1;
        let held = entry.held(self.held);
        let (after, seq) = (entry.shown_name(), entry.seq);
        // A deletion settles when nothing of the document is pending here
        // any more (and, on an index node, once released): its horizon
        // starts. Anything else that happens to it takes it back.
        let settles = if !entry.tombstone() {
            entry.forget = Forget::No;
            false
        } else if after == DocStatus::Deleted.name()
            && (entry.forget == Forget::Released || (entry.forget == Forget::No && !held))
        {
            entry.forget = Forget::Since(now);
            true
        } else {
            false
        };
        if before != after || settles {
            let id = self.map.get_key_value(doc_id)?.0.clone();
            if before != after {
                self.file(before, &id, false);
                self.file(after, &id, true);
            }
            if settles {
                if let Some(out) = self.settled_out.as_ref().filter(|_| !held) {
                    // Full (a broker away for long): that index node keeps
                    // its tombstone, as it would without being told.
                    let _ = out.try_send((id.to_string(), seq));
                }
                self.forgettable.push_back((now, id));
            }
        }
        self.forget_old(now);
        Some(r)
    }

    /// Forgets the deletions settled longer than the horizon ago. Each is
    /// checked again: one revived since, deleted anew, or ended otherwise
    /// (a deletion dead-lettered) stays.
    fn forget_old(&mut self, now: Instant) {
        while let Some((at, _)) = self.forgettable.front() {
            if now.saturating_duration_since(*at) < self.forget_after {
                return;
            }
            let (at, id) = self.forgettable.pop_front().expect("a front");
            let Some(entry) = self.map.get_mut(&id) else {
                continue;
            };
            if entry.forget != Forget::Since(at) {
                continue; // revived (then deleted again: a later turn)
            }
            if !entry.tombstone() || entry.shown_name() != DocStatus::Deleted.name() {
                // Settled again later, when it is deleted again.
                entry.forget = if entry.held(self.held) {
                    Forget::Released
                } else {
                    Forget::No
                };
                continue;
            }
            self.map.remove(&id);
            self.file(DocStatus::Deleted.name(), &id, false);
            // Still counted as seen and deleted.
            self.counts.forgotten += 1;
        }
    }

    /// Adds `id` to (or takes it from) the set of its state's ids.
    fn file(&mut self, state: &'static str, id: &Arc<str>, add: bool) {
        if state == DocStatus::Indexed.name() {
            return;
        }
        let set = self.by_state.entry(state).or_default();
        if add {
            set.insert(id.clone());
        } else {
            set.remove(id);
        }
    }

    /// The ids from `start` on (excluded or not), in order, that start
    /// with `prefix`: of every entry, or of those in `state`.
    fn ids_from<'a>(
        &'a self,
        state: Option<&'a str>,
        prefix: &'a str,
        start: Bound<&'a str>,
    ) -> Box<dyn Iterator<Item = &'a Arc<str>> + 'a> {
        let range = (start, Bound::Unbounded);
        let within = move |id: &&Arc<str>| id.starts_with(prefix);
        if let Some(s) = state.filter(|s| *s != DocStatus::Indexed.name()) {
            return match self.by_state.get(s) {
                Some(set) => Box::new(set.range::<str, _>(range).take_while(within)),
                None => Box::new(std::iter::empty()),
            };
        }
        // Every entry under the prefix, or the indexed ones among them
        // (the range ends first: past it the filter could scan the rest).
        Box::new(
            self.map
                .range::<str, _>(range)
                .take_while(move |(id, _)| id.starts_with(prefix))
                .filter(move |(_, e)| state.is_none_or(|s| e.shown_name() == s))
                .map(|(id, _)| id),
        )
    }
}

pub struct Ledger {
    docs: Mutex<Docs>,
    permits: Arc<Semaphore>,
    /// The byte budget, in KiB (see [`Ledger::admit_at`]).
    kib: Arc<Semaphore>,
    kib_total: u32,
    settled: Notify,
}

/// How long a deleted document is remembered by default.
pub const FORGET_DELETED_AFTER: Duration = Duration::from_secs(3600);

/// The bytes of the versions in flight, by default (`[pipeline]
/// max_in_flight_mb`).
pub const MAX_IN_FLIGHT_BYTES: u64 = 256 << 20;

impl Ledger {
    pub fn new(max_in_flight: usize) -> Arc<Self> {
        Self::with_memory(max_in_flight, FORGET_DELETED_AFTER, false)
    }

    /// A ledger that forgets a deleted document `forget_after` once its
    /// deletion settled: nothing of it pending, and (`held`, a node with
    /// the index role on a bus, for the documents whose jobs come from
    /// another node's ledger) once released by that node. Until then a
    /// version seen before the deletion and delivered late is refused. A
    /// tombstone lives in memory: one that an index node lost (a restart,
    /// a partition moved) before such a version arrived lets it be
    /// written, and the ingest node deletes it again when it hears of it
    /// (see [`Ledger::gone_here`]).
    pub fn with_memory(max_in_flight: usize, forget_after: Duration, held: bool) -> Arc<Self> {
        Self::with_limits(max_in_flight, MAX_IN_FLIGHT_BYTES, forget_after, held)
    }

    /// [`Ledger::with_memory`], with a byte budget for the versions in
    /// flight (see [`Ledger::admit_at`]).
    pub fn with_limits(
        max_in_flight: usize,
        max_in_flight_bytes: u64,
        forget_after: Duration,
        held: bool,
    ) -> Arc<Self> {
        let kib_total = u32::try_from(max_in_flight_bytes / 1024)
            .unwrap_or(u32::MAX)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize) as u32);
        Arc::new(Ledger {
            docs: Mutex::new(Docs {
                map: BTreeMap::new(),
                counts: LedgerCounts::default(),
                by_state: HashMap::new(),
                forgettable: VecDeque::new(),
                forget_after,
                held,
                settled_out: None,
                unread_out: None,
            }),
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
            kib: Arc::new(Semaphore::new(kib_total as usize)),
            kib_total,
            settled: Notify::new(),
        })
    }

    /// The documents whose deletion settled here from now on, each once,
    /// with the deletion's seq (see [`Ledger::admit_deletion`]): an ingest
    /// node tells the index nodes (see [`Ledger::release`]). At most
    /// `capacity` wait to be taken; past that the rest are not told.
    pub fn settled_deletions(&self, capacity: usize) -> mpsc::Receiver<(String, u64)> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.docs.lock().settled_out = Some(tx);
        rx
    }

    /// The documents whose latest version ended unread from now on
    /// ([`Ledger::ended_unread`]), each time one does: the watcher looks at
    /// their files again. Its event for the rewrite that made the chunker
    /// skip may have come, and found the version in flight, before the
    /// skip (a batch slow to read, a skip told by another node), and a
    /// polled source raises none for a file saved over with the same bytes.
    /// At most `capacity` wait to be taken; past that the rest are not told.
    pub fn unread_versions(&self, capacity: usize) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.docs.lock().unread_out = Some(tx);
        rx
    }

    /// The ingest node that admitted `doc_id`'s versions has closed every
    /// one of them seen before its deletion: no job older than the deletion
    /// is on its way any more, so a held ledger may forget it (after the
    /// horizon). `seq` is that deletion's: a release may arrive after a
    /// later deletion (the document re-created and deleted again meanwhile,
    /// a version of it maybe still on its way), and releases only its own.
    pub fn release(&self, doc_id: &str, seq: u64) {
        let mut docs = self.docs.lock();
        if !docs.held {
            return; // (its own pending jobs tell it)
        }
        docs.update(doc_id, false, |entry| {
            let theirs = entry.watched == Watched::Never;
            if theirs && entry.tombstone() && entry.forget == Forget::No && entry.seq <= seq {
                entry.forget = Forget::Released;
            }
        });
    }

    /// Records a document already in its final state (found indexed at start,
    /// or skipped before it needed any pipeline work).
    pub fn record(&self, doc_id: &str, version: Option<&str>, outcome: Outcome) {
        self.docs.lock().update(doc_id, true, |entry| {
            entry.latest = version.map(str::to_string);
            entry.watched = Watched::of(version);
            entry.status = status_of(outcome);
        });
        self.settled.notify_waiters();
    }

    /// Waits for a permit, then admits `version` of `doc_id` (or its deletion,
    /// with `None`) into the pipeline. Returns false when that exact version is
    /// already in flight and still the latest, so a re-scan does not queue it
    /// twice.
    ///
    /// A version in flight but overtaken since comes back as a new job: an
    /// edit reverted (v1, v2, v1 again: `git checkout` and back), or a
    /// document deleted, re-created and deleted again before the first
    /// deletion finished. The overtaken job may already have been dropped
    /// as superseded, so counting on it would lose the revert.
    pub async fn admit(&self, doc_id: &str, version: Option<&str>) -> bool {
        self.admit_sized(doc_id, version, 0).await
    }

    /// [`Ledger::admit`] for a version of `bytes` bytes (see
    /// [`Ledger::admit_at`]).
    async fn admit_sized(&self, doc_id: &str, version: Option<&str>, bytes: u64) -> bool {
        let key = version.unwrap_or(DELETE_VERSION).to_string();
        // None: not pending. Some(true): pending and still the latest, a
        // duplicate. Some(false): pending but overtaken, and back: a new
        // job under the permit the first one holds (a second permit would
        // be given back twice by the stages that end a version on two
        // paths, e.g. a cluster node's own ledger and its follower).
        let back = |entry: &mut DocEntry| {
            let pending = entry.pending.contains_key(&key);
            let latest = entry.latest.as_deref() == version;
            if pending && !latest {
                entry.latest = version.map(str::to_string);
                entry.status = DocStatus::InFlight;
            }
            if pending {
                entry.watched = Watched::of(version);
            }
            pending.then_some(latest)
        };
        if let Some(duplicate) = self.docs.lock().update(doc_id, false, back).flatten() {
            return !duplicate;
        }
        let doc = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the ledger never closes its semaphore");
        // (One bigger than the whole budget takes all of it: it goes alone.)
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.kib_total);
        let bytes = self
            .kib
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the ledger never closes its semaphore");
        let permit = Permits {
            _doc: doc,
            _bytes: bytes,
        };
        self.docs
            .lock()
            .update(doc_id, true, |entry| {
                if let Some(duplicate) = back(entry) {
                    return !duplicate;
                }
                entry.latest = version.map(str::to_string);
                entry.watched = Watched::of(version);
                entry.status = DocStatus::InFlight;
                entry.pending.insert(key.clone(), permit);
                true
            })
            .unwrap_or(false)
    }

    /// A cluster's node with the index role learns each document's
    /// current version from the jobs that reach it (a node without the
    /// ingest role has no watcher of its own), which may
    /// arrive out of order (two embed workers, a redelivery). `seq` is the
    /// watcher's observation order; returns false for a job older than one
    /// already seen, which is then superseded. `None` is a deletion.
    pub fn observe(&self, doc_id: &str, version: Option<&str>, seq: u64) -> bool {
        let mut docs = self.docs.lock();
        let held = docs.held;
        docs.update(doc_id, true, |entry| {
            if entry.held(held) {
                // Whatever was released, this job was not. (A refused one
                // too: a job older than the deletion, after its release,
                // comes from another ingest node, whose own release is
                // still to come; with one ingest node only a redelivery
                // does that, and it costs one remembered name.)
                entry.forget = Forget::No;
            }
            if seq < entry.seq {
                return false;
            }
            entry.seq = seq;
            // A node with both the ingest and the index role shares
            // this ledger with its watcher and chunker: the deletion
            // of a version they skipped as a whole (no text, too big)
            // leaves the document skipped, as on an ingest-only node,
            // rather than counted as deleted.
            let skipped = entry.latest.as_deref() == Some(SKIPPED_VERSION);
            if version.is_some() || !skipped {
                entry.latest = version.map(str::to_string);
            }
            true
        })
        .unwrap_or(false)
    }

    /// Starts an index node's view from the versions its store holds (see
    /// `StoredVersion::seq`): indexed, as far as it knows.
    pub fn seed(&self, stored: &[crate::indexer::StoredVersion]) {
        for v in stored {
            self.observe(&v.doc_id, Some(&v.version), v.seq);
            self.docs.lock().update(&v.doc_id, false, |entry| {
                if entry.latest.as_deref() == Some(v.version.as_str()) {
                    entry.status = DocStatus::Indexed;
                }
            });
        }
    }

    /// [`Ledger::admit`] for the deletion the watcher saw at `seq`: the seq
    /// goes with its release to the index nodes (see
    /// [`Ledger::settled_deletions`]).
    pub async fn admit_deletion(&self, doc_id: &str, seq: u64) -> bool {
        self.admit_at(doc_id, None, seq, 0).await
    }

    /// [`Ledger::admit`] for the version (or deletion) the watcher saw at
    /// `seq`. On a node with the index role too, a job older than it,
    /// delivered late, is then refused as [`Ledger::observe`] refuses one
    /// older than a job it saw (the watcher's own job may come after it).
    ///
    /// `bytes`, the file's size, is held against the byte budget until the
    /// version ends: the watcher waits while the versions in flight hold
    /// it all, as it waits for a permit.
    pub async fn admit_at(
        &self,
        doc_id: &str,
        version: Option<&str>,
        seq: u64,
        bytes: u64,
    ) -> bool {
        if !self.admit_sized(doc_id, version, bytes).await {
            return false;
        }
        self.docs.lock().update(doc_id, false, |entry| {
            entry.seq = entry.seq.max(seq);
        });
        true
    }

    /// The watcher found `doc_id` in the source at the version the ledger
    /// or the store has (unchanged): the watcher has it, whatever else
    /// told the ledger of it first (the store, at a node's start, or a
    /// job from another ingest node). False when the ledger has no entry.
    pub fn watch(&self, doc_id: &str) -> bool {
        let present = |entry: &mut DocEntry| entry.watched = Watched::Present;
        self.docs.lock().update(doc_id, false, present).is_some()
    }

    /// Whether `doc_id` is gone from the source as far as this ledger's
    /// watcher knows, with its deletion ended (or forgotten, or never
    /// seen): on an ingest node, an `Indexed` event for it then reports a
    /// version written after its deletion removed it (see
    /// `WatchMsg::CheckGone`). While the deletion is still on its way, it
    /// removes that version itself. On a node with the index role too,
    /// the version its own index stage observed does not count: that is
    /// the version in question.
    pub fn gone_here(&self, doc_id: &str) -> bool {
        self.docs.lock().map.get(doc_id).is_none_or(|e| {
            e.watched != Watched::Present && !e.pending.contains_key(DELETE_VERSION)
        })
    }

    /// Is `version` still the one the source has? A version overtaken by a
    /// newer one (or by a deletion) must not be written to the index.
    pub fn is_current(&self, doc_id: &str, version: &str) -> bool {
        self.docs
            .lock()
            .map
            .get(doc_id)
            .is_some_and(|e| e.latest.as_deref() == Some(version))
    }

    /// Whether `version`, the document's latest, ended unread
    /// ([`CHANGED_WHILE_QUEUED`], [`REMOVED_BEFORE_READ`]). The newer
    /// version the chunker expected may turn out to be this one again: a
    /// file saved over with the same bytes (truncated, then written) or by
    /// an editor that removes it first, read in between. Found so by the
    /// watcher, it is read again rather than taken as done: its text is
    /// not in the index, and the version before it may be.
    pub fn ended_unread(&self, doc_id: &str, version: &str) -> bool {
        self.docs.lock().map.get(doc_id).is_some_and(|e| {
            e.latest.as_deref() == Some(version)
                && !e.pending.contains_key(version)
                && matches!(&e.status, DocStatus::Skipped(why) if ended_unread_for(why))
        })
    }

    pub fn latest_version(&self, doc_id: &str) -> Option<String> {
        self.docs
            .lock()
            .map
            .get(doc_id)
            .and_then(|e| e.latest.clone())
    }

    /// Records a document skipped before any pipeline work (an unsupported
    /// type, too big): nothing of it is to be in the index.
    pub fn record_skipped(&self, doc_id: &str, reason: String) {
        self.record(doc_id, Some(SKIPPED_VERSION), Outcome::Skipped(reason));
    }

    /// Whether nothing of the document is to be in the index: it is gone,
    /// or its latest version was skipped as a whole.
    pub fn wants_nothing_indexed(&self, doc_id: &str) -> bool {
        self.latest_version(doc_id)
            .is_none_or(|v| v == SKIPPED_VERSION)
    }

    /// `version` turned out to hold nothing to index (the chunker found no
    /// text in it): it ends skipped, and if it is still the document's
    /// latest, the document is marked as having nothing in the index
    /// ([`SKIPPED_VERSION`]), so the pruner removes what earlier versions
    /// left. Returns whether it was the latest.
    ///
    /// `seq` is the version's: the deletion the chunker sends for it
    /// carries the same, and on a node that also runs the index role that
    /// deletion may be observed here first. It then still leaves `version`
    /// the latest, not a deletion of the document.
    pub fn finish_unindexable(
        &self,
        doc_id: &str,
        version: &str,
        seq: u64,
        reason: String,
    ) -> bool {
        self.docs.lock().update(doc_id, false, |entry| {
            // (Not when the watcher has since admitted a real deletion:
            // that one stands.)
            let deleting = entry.pending.contains_key(DELETE_VERSION);
            if entry.latest.is_none() && entry.seq == seq && !deleting {
                entry.latest = Some(version.to_string());
            }
        });
        self.finish(doc_id, Some(version), Outcome::Skipped(reason));
        self.docs
            .lock()
            .update(doc_id, false, |entry| {
                let latest = entry.latest.as_deref() == Some(version);
                if latest {
                    entry.latest = Some(SKIPPED_VERSION.to_string());
                }
                latest
            })
            .unwrap_or(false)
    }

    /// A pipeline job for `version` (None: the deletion) reached its end. If
    /// a newer version is still in flight the document stays in flight; a
    /// superseded version's outcome is not the document's.
    pub fn finish(&self, doc_id: &str, version: Option<&str>, outcome: Outcome) {
        let key = version.unwrap_or(DELETE_VERSION);
        let unread = matches!(&outcome, Outcome::Skipped(why) if ended_unread_for(why));
        let mut docs = self.docs.lock();
        let current = docs.update(doc_id, false, |entry| {
            entry.pending.remove(key);
            let current = entry.latest.as_deref() == version;
            if current {
                entry.status = status_of(outcome);
            } else if entry.pending.is_empty() && entry.status == DocStatus::InFlight {
                // The version that superseded this one already finished
                // before it (or never needed the pipeline). A deletion the
                // document outran says nothing of the document.
                entry.status = match (&entry.latest, outcome) {
                    (None, _) => DocStatus::Deleted,
                    (Some(_), Outcome::Deleted) => entry.status.clone(),
                    (Some(_), o) => status_of(o),
                };
            }
            current
        });
        if unread && current == Some(true) {
            if let Some(out) = &docs.unread_out {
                // (Full: the file is looked at on its next event or scan.)
                let _ = out.try_send(doc_id.to_string());
            }
        }
        drop(docs);
        self.settled.notify_waiters();
    }

    /// Up to `limit` documents in id order, after `query.after`, whose
    /// id starts with `query.prefix` and whose state is `query.status`
    /// (a [`DocStatus`] name: "indexed", "skipped", …), for the admin API:
    /// which documents were skipped, and why. A range of the sorted ids
    /// (of that state's, but for "indexed"), so a page reads about
    /// `limit` entries wherever it starts.
    pub fn documents(&self, query: &DocQuery, limit: usize) -> Vec<DocReport> {
        let docs = self.docs.lock();
        let prefix = query.prefix.as_str();
        let start = match query.after.as_deref() {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        docs.ids_from(query.status.as_deref(), prefix, start)
            .take(limit)
            .map(|id| DocReport {
                doc_id: id.to_string(),
                status: docs.map[id].shown(),
            })
            .collect()
    }

    /// The documents under `prefix` (`kb:site/`) that the source still
    /// has, as far as the ledger knows, in id order.
    pub fn current_under(&self, prefix: &str) -> Vec<String> {
        let docs = self.docs.lock();
        docs.ids_from(None, prefix, Bound::Included(prefix))
            .filter(|id| docs.map[*id].latest.is_some())
            .map(|id| id.to_string())
            .collect()
    }

    pub fn status(&self, doc_id: &str) -> Option<DocStatus> {
        self.docs.lock().map.get(doc_id).map(|e| e.status.clone())
    }

    /// The versions on their way through the pipeline (admitted, not
    /// ended), each with the documents it is a version of: the watcher
    /// keeps a moved file's old document until its new one, of the same
    /// version, is through.
    pub fn versions_in_flight(&self) -> HashMap<String, Vec<Arc<str>>> {
        let docs = self.docs.lock();
        let mut versions: HashMap<String, Vec<Arc<str>>> = HashMap::new();
        let Some(ids) = docs.by_state.get(DocStatus::InFlight.name()) else {
            return versions;
        };
        for (id, e) in ids.iter().filter_map(|id| Some((id, docs.map.get(id)?))) {
            for v in e.pending.keys().filter(|v| *v != DELETE_VERSION) {
                versions.entry(v.clone()).or_default().push(id.clone());
            }
        }
        versions
    }

    pub fn known_docs(&self) -> Vec<(String, Option<String>)> {
        self.docs
            .lock()
            .map
            .iter()
            .map(|(k, e)| (k.to_string(), e.latest.clone()))
            .collect()
    }

    pub fn counts(&self) -> LedgerCounts {
        let mut docs = self.docs.lock();
        // (Read often, by /metrics: an idle ledger forgets too.)
        docs.forget_old(Instant::now());
        docs.counts
    }

    /// Resolves once no document is in flight.
    pub async fn wait_settled(&self) {
        loop {
            let notified = self.settled.notified();
            if self.counts().in_flight == 0 {
                return;
            }
            notified.await;
        }
    }
}

fn status_of(outcome: Outcome) -> DocStatus {
    match outcome {
        Outcome::Indexed => DocStatus::Indexed,
        Outcome::Deleted => DocStatus::Deleted,
        Outcome::Skipped(r) => DocStatus::Skipped(r),
        Outcome::DeadLettered(r) => DocStatus::DeadLettered(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn documents_list_by_state_prefix_and_page() {
        let ledger = Ledger::new(8);
        for i in 0..5 {
            let reason = format!("empty {i}");
            ledger.record(&format!("kb:s/{i}.md"), Some("v"), Outcome::Skipped(reason));
        }
        ledger.record("kb:a.md", Some("v"), Outcome::Indexed);
        ledger.record("wiki:b.md", Some("v"), Outcome::Skipped("too big".into()));
        assert!(ledger.admit("kb:c.md", Some("v")).await);
        let ids = |query: DocQuery, limit| -> Vec<String> {
            ledger
                .documents(&query, limit)
                .into_iter()
                .map(|d| d.doc_id)
                .collect()
        };
        let skipped = |after: Option<&str>| DocQuery {
            status: Some("skipped".into()),
            prefix: "kb:".into(),
            after: after.map(str::to_string),
        };
        assert_eq!(ids(skipped(None), 2), ["kb:s/0.md", "kb:s/1.md"]);
        assert_eq!(
            ids(skipped(Some("kb:s/1.md")), 10),
            ["kb:s/2.md", "kb:s/3.md", "kb:s/4.md"]
        );
        // A page that starts before the prefix starts at the prefix.
        let early = DocQuery {
            after: Some("kb:a.md".into()),
            ..skipped(None)
        };
        assert_eq!(ids(early, 1), ["kb:s/0.md"]);
        let all = ledger.documents(&DocQuery::default(), 100);
        assert_eq!(all.len(), 8);
        // What a folder holds: not its deleted files, nor a sibling whose
        // name only starts like it.
        ledger.record("kb:s/gone.md", None, Outcome::Deleted);
        ledger.record("kb:s2.md", Some("v"), Outcome::Indexed);
        let under = ledger.current_under("kb:s/");
        assert_eq!(
            under,
            (0..5).map(|i| format!("kb:s/{i}.md")).collect::<Vec<_>>()
        );
        ledger.record("kb:s/gone.md", Some("v"), Outcome::Indexed);
        ledger.record("kb:s2.md", None, Outcome::Deleted);
        let c = all.iter().find(|d| d.doc_id == "kb:c.md").unwrap();
        assert_eq!(c.status, DocStatus::InFlight);
        let json = serde_json::to_value(&all[all.len() - 1]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"doc_id": "wiki:b.md", "status": "skipped", "reason": "too big"})
        );
        // Every name filters, and only what bears it.
        for name in DocStatus::NAMES {
            let query = DocQuery {
                status: Some(name.into()),
                ..DocQuery::default()
            };
            assert!(ledger
                .documents(&query, 100)
                .iter()
                .all(|d| d.status.name() == name));
        }
    }

    #[test]
    fn observe_orders_versions_by_the_watchers_sequence() {
        let ledger = Ledger::new(4);
        assert!(ledger.observe("d", Some("v2"), 20));
        // v1 was seen before v2 but arrives after it: superseded.
        assert!(!ledger.observe("d", Some("v1"), 10));
        assert!(ledger.is_current("d", "v2"));
        // A deletion seen later wins; the document has no current version.
        assert!(ledger.observe("d", None, 30));
        assert!(!ledger.is_current("d", "v2"));
        assert_eq!(ledger.latest_version("d"), None);
    }

    /// A cluster node with the ingest and the index role: its chunker
    /// finds a version without text and sends the deletion of what earlier
    /// versions left; the indexer observes that deletion on the same
    /// ledger. The document stays skipped, nothing of it indexed.
    #[tokio::test]
    async fn a_shared_ledger_keeps_an_unindexable_version_skipped() {
        // The chunker's step first, or the indexer's: the same end.
        for chunker_first in [true, false] {
            let ledger = Ledger::new(4);
            assert!(ledger.admit("d", Some("v1")).await);
            if chunker_first {
                assert!(ledger.finish_unindexable("d", "v1", 5, "no text".into()));
                assert!(ledger.observe("d", None, 5));
            } else {
                assert!(ledger.observe("d", None, 5));
                assert!(ledger.finish_unindexable("d", "v1", 5, "no text".into()));
            }
            ledger.finish("d", None, Outcome::Deleted);
            assert_eq!(
                ledger.status("d"),
                Some(DocStatus::Skipped("no text".into())),
                "chunker first: {chunker_first}"
            );
            let c = ledger.counts();
            assert_eq!((c.skipped, c.deleted, c.in_flight), (1, 0, 0));
            assert!(ledger.wants_nothing_indexed("d"));
            // A later version is observed and indexed as usual.
            assert!(ledger.observe("d", Some("v2"), 6));
            assert!(ledger.is_current("d", "v2"));
        }
        // The file deleted for real after the version was read (a later
        // seq): the deletion stands.
        let ledger = Ledger::new(4);
        assert!(ledger.admit("d", Some("v1")).await);
        assert!(ledger.observe("d", None, 9));
        assert!(!ledger.finish_unindexable("d", "v1", 5, "no text".into()));
        assert_eq!(ledger.latest_version("d"), None);
        // Deleted for real after the chunker's deletion was observed, and
        // before the chunker ended the version: the deletion stands too.
        let ledger = Ledger::new(4);
        assert!(ledger.admit("d", Some("v1")).await);
        assert!(ledger.observe("d", None, 5));
        assert!(ledger.admit("d", None).await);
        assert!(!ledger.finish_unindexable("d", "v1", 5, "no text".into()));
        assert_eq!(ledger.latest_version("d"), None);
        ledger.finish("d", None, Outcome::Deleted);
        assert_eq!(ledger.status("d"), Some(DocStatus::Deleted));
    }

    #[tokio::test]
    async fn admission_is_bounded_and_released_at_the_end() {
        let ledger = Ledger::new(2);
        assert!(ledger.admit("a", Some("v1")).await);
        assert!(ledger.admit("b", Some("v1")).await);
        // The third waits for a permit.
        let l2 = ledger.clone();
        let third = tokio::spawn(async move { l2.admit("c", Some("v1")).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished());
        ledger.finish("a", Some("v1"), Outcome::Indexed);
        assert!(third.await.unwrap());
        let c = ledger.counts();
        assert_eq!((c.seen, c.indexed, c.in_flight), (3, 1, 2));
    }

    /// The counts kept in step agree with a count of the entries after
    /// every step of a long mixed sequence (admissions, supersessions,
    /// deletions, every outcome, index-node observations and releases),
    /// with deletions remembered, forgotten at once, and forgotten once
    /// released (an index node).
    #[tokio::test]
    async fn counts_stay_in_step_with_the_entries() {
        for (forget_after, held) in [
            (FORGET_DELETED_AFTER, false),
            (Duration::ZERO, false),
            (Duration::ZERO, true),
        ] {
            let ledger = Ledger::with_memory(10_000, forget_after, held);
            random_steps(&ledger).await;
            let c = ledger.counts();
            assert_eq!(
                c.forgotten > 0,
                forget_after.is_zero(),
                "{forget_after:?} held {held}: {c:?}"
            );
        }
    }

    async fn random_steps(ledger: &Ledger) {
        fn recount(ledger: &Ledger) -> LedgerCounts {
            let docs = ledger.docs.lock();
            // The forgotten are still counted as seen and deleted.
            let forgotten = docs.counts.forgotten;
            let mut c = LedgerCounts {
                seen: docs.map.len() as u64 + forgotten,
                deleted: forgotten,
                forgotten,
                ..Default::default()
            };
            for e in docs.map.values() {
                *e.count(&mut c) += 1;
            }
            c
        }
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for step in 0..5_000 {
            let doc = format!("d{}", next(40));
            let version = format!("v{}", next(3));
            let outcome = match next(4) {
                0 => Outcome::Indexed,
                1 => Outcome::Deleted,
                2 => Outcome::Skipped("empty".into()),
                _ => Outcome::DeadLettered("bad".into()),
            };
            match next(6) {
                0 | 1 => {
                    ledger.admit(&doc, Some(&version)).await;
                }
                2 => {
                    ledger.admit(&doc, None).await;
                }
                3 => ledger.finish(&doc, Some(&version), outcome),
                4 => ledger.finish(&doc, None, Outcome::Deleted),
                _ => match next(4) {
                    0 => ledger.record(&doc, Some(&version), outcome),
                    1 => ledger.release(&doc, next(100)),
                    2 => {
                        ledger.observe(&doc, None, next(100));
                    }
                    _ => {
                        ledger.observe(&doc, Some(&version), next(100));
                    }
                },
            }
            assert_eq!(ledger.counts(), recount(ledger), "after step {step}");
            // The per-state sets hold exactly the ids in their state, so a
            // listing by state through them matches a filter of all ids.
            let all = ledger.documents(&DocQuery::default(), usize::MAX);
            for name in DocStatus::NAMES {
                let query = DocQuery {
                    status: Some(name.into()),
                    ..DocQuery::default()
                };
                let listed = ledger.documents(&query, usize::MAX);
                let expected: Vec<_> = all
                    .iter()
                    .filter(|d| d.status.name() == name)
                    .cloned()
                    .collect();
                assert_eq!(listed, expected, "{name} after step {step}");
            }
        }
    }

    /// Versions in flight hold their bytes against the budget: past it the
    /// next admission waits until one ends, and one bigger than the whole
    /// budget goes alone. Every byte comes back.
    #[tokio::test]
    async fn the_bytes_in_flight_are_held_to_a_budget() {
        let ledger = Ledger::with_limits(100, 10 << 20, Duration::ZERO, false);
        let admit = |id: &'static str, bytes: u64| {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.admit_at(id, Some("v1"), 1, bytes).await })
        };
        let waits = |task: &tokio::task::JoinHandle<bool>| !task.is_finished();
        assert!(admit("a", 6 << 20).await.unwrap());
        assert!(admit("b", 4 << 20).await.unwrap());
        let c = admit("c", 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(waits(&c), "admitted past the budget");
        ledger.finish("a", Some("v1"), Outcome::Indexed);
        assert!(c.await.unwrap());
        let huge = admit("d", 1 << 40);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(waits(&huge));
        ledger.finish("b", Some("v1"), Outcome::Indexed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(waits(&huge), "went beside another version");
        ledger.finish("c", Some("v1"), Outcome::Skipped("x".into()));
        assert!(huge.await.unwrap());
        assert_eq!(ledger.kib.available_permits(), 0);
        ledger.finish("d", Some("v1"), Outcome::Indexed);
        assert_eq!(ledger.kib.available_permits(), 10 << 10);
        assert_eq!(ledger.permits.available_permits(), 100);
    }

    /// An overtaken version that comes back while its first job is still
    /// in flight is admitted again (the first job may already be dropped as
    /// superseded), under the permit it holds; every permit comes back.
    #[tokio::test]
    async fn a_reverted_edit_and_a_second_deletion_are_admitted_again() {
        let ledger = Ledger::new(8);
        assert!(ledger.admit("a", Some("v1")).await);
        assert!(
            !ledger.admit("a", Some("v1")).await,
            "a re-scan, not a new version"
        );
        assert!(ledger.admit("a", Some("v2")).await);
        assert!(
            ledger.admit("a", Some("v1")).await,
            "the revert to v1 was lost"
        );
        assert!(ledger.is_current("a", "v1"));
        assert_eq!(ledger.permits.available_permits(), 6);
        // The first v1 job was dropped as superseded, v2's found the file
        // changed; the second v1 job indexes. A version ended twice (a
        // cluster node's own ledger, then its follower) gives back nothing
        // twice.
        ledger.finish("a", Some("v1"), Outcome::Skipped("superseded".into()));
        ledger.finish("a", Some("v1"), Outcome::Skipped("superseded".into()));
        ledger.finish("a", Some("v2"), Outcome::Skipped("changed".into()));
        assert_eq!(ledger.permits.available_permits(), 8);
        ledger.finish("a", Some("v1"), Outcome::Indexed);
        assert_eq!(ledger.status("a"), Some(DocStatus::Indexed));
        assert_eq!(ledger.permits.available_permits(), 8);

        // Deleted, re-created, deleted again before the first deletion ends.
        assert!(ledger.admit("b", Some("v1")).await);
        ledger.finish("b", Some("v1"), Outcome::Indexed);
        assert!(ledger.admit("b", None).await);
        assert!(ledger.admit("b", Some("v2")).await);
        assert!(
            ledger.admit("b", None).await,
            "the second deletion was lost"
        );
        assert_eq!(ledger.latest_version("b"), None);
        for (v, o) in [
            (None, Outcome::Deleted),
            (Some("v2"), Outcome::Skipped("superseded".into())),
            (None, Outcome::Deleted),
        ] {
            ledger.finish("b", v, o);
        }
        assert_eq!(ledger.status("b"), Some(DocStatus::Deleted));
        assert_eq!(ledger.permits.available_permits(), 8);
        ledger.wait_settled().await;
    }

    #[tokio::test]
    async fn a_superseded_version_does_not_decide_the_status() {
        let ledger = Ledger::new(8);
        ledger.admit("a", Some("v1")).await;
        ledger.admit("a", Some("v2")).await;
        assert!(!ledger.is_current("a", "v1"));
        ledger.finish("a", Some("v1"), Outcome::Indexed);
        assert_eq!(ledger.counts().in_flight, 1);
        ledger.finish("a", Some("v2"), Outcome::Skipped("empty".into()));
        assert_eq!(ledger.status("a"), Some(DocStatus::Skipped("empty".into())));
        // Deleting while nothing is pending.
        ledger.admit("a", None).await;
        ledger.finish("a", None, Outcome::Deleted);
        assert_eq!(ledger.counts().deleted, 1);
        ledger.wait_settled().await;
    }

    /// A deleted document is forgotten once its deletion settled and the
    /// horizon passed: the memory follows what the source has. Until then
    /// it is listed; a deletion that ended otherwise (dead-lettered) stays.
    #[tokio::test]
    async fn a_settled_deletion_is_forgotten_after_the_horizon() {
        let horizon = Duration::from_millis(200);
        let ledger = Ledger::with_memory(8, horizon, false);
        let mut settled = ledger.settled_deletions(8);
        for doc in ["a", "b"] {
            assert!(ledger.admit(doc, Some("v1")).await);
            ledger.finish(doc, Some("v1"), Outcome::Indexed);
            assert!(ledger.admit_deletion(doc, 10).await);
        }
        // Re-created and deleted again before the first deletion ended: it
        // settles only when nothing of it is pending, with the seq of the
        // last deletion (an index node's release names it).
        assert!(ledger.admit("a", Some("v2")).await);
        assert!(ledger.admit_deletion("a", 20).await);
        ledger.finish("a", None, Outcome::Deleted);
        assert!(settled.try_recv().is_err(), "v2 is still pending");
        ledger.finish("a", Some("v2"), Outcome::Skipped(SUPERSEDED.into()));
        assert_eq!(settled.try_recv().unwrap(), ("a".to_string(), 20));
        ledger.finish("b", None, Outcome::DeadLettered("prune failed".into()));
        assert!(settled.try_recv().is_err(), "b did not settle deleted");

        // Within the horizon: listed, counted, not forgotten.
        let deleted = DocQuery {
            status: Some("deleted".into()),
            ..DocQuery::default()
        };
        assert_eq!(ledger.documents(&deleted, 10).len(), 1);
        let c = ledger.counts();
        assert_eq!((c.seen, c.deleted, c.forgotten), (2, 1, 0), "{c:?}");

        tokio::time::sleep(horizon + Duration::from_millis(50)).await;
        let c = ledger.counts();
        assert_eq!((c.seen, c.deleted, c.forgotten), (2, 1, 1), "{c:?}");
        assert_eq!(ledger.status("a"), None);
        assert!(ledger.documents(&deleted, 10).is_empty());
        assert!(ledger.wants_nothing_indexed("a"));
        assert!(!ledger.is_current("a", "v2"));
        // The dead-lettered deletion stays, to be replayed.
        assert!(matches!(
            ledger.status("b"),
            Some(DocStatus::DeadLettered(_))
        ));
        assert_eq!(ledger.docs.lock().map.len(), 1);

        // Back in the source: a document like any new one.
        assert!(ledger.admit("a", Some("v3")).await);
        ledger.finish("a", Some("v3"), Outcome::Indexed);
        let c = ledger.counts();
        assert_eq!((c.seen, c.indexed, c.deleted, c.forgotten), (3, 1, 1, 1));
        assert_eq!(ledger.permits.available_permits(), 8);
    }

    /// On an ingest node, an `Indexed` event is a version written after
    /// its document's deletion only once that deletion has ended here
    /// (while it is on its way it removes the version itself), or when
    /// the document is forgotten.
    #[tokio::test]
    async fn gone_here_once_the_deletion_has_ended() {
        let horizon = Duration::from_millis(100);
        let ledger = Ledger::with_memory(8, horizon, false);
        let doc = "kb:a.md";
        assert!(ledger.gone_here(doc), "never seen");
        assert!(ledger.admit(doc, Some("v1")).await);
        assert!(!ledger.gone_here(doc), "in the source");
        assert!(ledger.admit_deletion(doc, 5).await);
        ledger.finish(doc, Some("v1"), Outcome::Indexed);
        assert!(!ledger.gone_here(doc), "its deletion is on its way");
        ledger.finish(doc, None, Outcome::Deleted);
        assert_eq!(ledger.status(doc), Some(DocStatus::Deleted));
        assert!(ledger.gone_here(doc));
        tokio::time::sleep(horizon + Duration::from_millis(50)).await;
        assert_eq!(ledger.counts().forgotten, 1);
        assert!(ledger.gone_here(doc), "forgotten");
        assert!(ledger.admit(doc, Some("v2")).await);
        assert!(!ledger.gone_here(doc), "back in the source");
        // A deletion dead-lettered: the document is still gone.
        assert!(ledger.admit_deletion(doc, 9).await);
        ledger.finish(doc, None, Outcome::DeadLettered("prune failed".into()));
        ledger.finish(doc, Some("v2"), Outcome::Indexed);
        assert!(ledger.gone_here(doc));

        // A node with the index role too: the late version its index
        // stage observes and writes does not bring the document back.
        let other = "kb:b.md";
        assert!(ledger.observe(other, Some("0ld"), 1));
        ledger.finish(other, Some("0ld"), Outcome::Indexed);
        assert!(ledger.gone_here(other), "only observed");
        assert!(ledger.admit(other, Some("v1")).await);
        assert!(ledger.observe(other, Some("v1"), 2));
        ledger.finish(other, Some("v1"), Outcome::Indexed);
        assert!(!ledger.gone_here(other), "the watcher admitted it");
        assert!(ledger.admit_deletion(other, 3).await);
        assert!(ledger.observe(other, None, 3));
        ledger.finish(other, None, Outcome::Deleted);
        assert!(ledger.observe(other, Some("late"), 4));
        assert!(ledger.gone_here(other), "written after its deletion");
        ledger.record(other, Some("v2"), Outcome::Indexed);
        assert!(!ledger.gone_here(other), "found at a scan");
    }

    /// A cluster's index node learns of a deletion from the jobs alone: a
    /// version seen before it may still be on its way (through the chunker
    /// and the embedder, while the deletion went straight to the indexer),
    /// so it forgets the deletion only once the ingest node released it.
    #[tokio::test]
    async fn an_index_node_forgets_a_deletion_only_once_released() {
        let ledger = Ledger::with_memory(8, Duration::ZERO, true);
        assert!(ledger.observe("d", Some("v1"), 10));
        ledger.finish("d", Some("v1"), Outcome::Indexed);
        assert!(ledger.observe("d", None, 30));
        ledger.finish("d", None, Outcome::Deleted);
        assert_eq!(ledger.status("d"), Some(DocStatus::Deleted));
        assert_eq!(ledger.counts().forgotten, 0, "forgotten unreleased");
        // v2, seen before the deletion, arrives late: refused.
        assert!(!ledger.observe("d", Some("v2"), 20));
        ledger.finish("d", Some("v2"), Outcome::Skipped(SUPERSEDED.into()));

        ledger.release("d", 30);
        assert_eq!(ledger.counts().forgotten, 1);
        assert_eq!(ledger.status("d"), None);

        // Released, but deleted anew (re-created and deleted again) within
        // the horizon: the new deletion waits for its own release.
        let horizon = Duration::from_millis(100);
        let slow = Ledger::with_memory(8, horizon, true);
        assert!(slow.observe("g", None, 50));
        slow.finish("g", None, Outcome::Deleted);
        slow.release("g", 50);
        assert!(slow.observe("g", None, 70));
        slow.finish("g", None, Outcome::Deleted);
        tokio::time::sleep(horizon * 2).await;
        assert_eq!(
            slow.counts().forgotten,
            0,
            "the second deletion was not released"
        );
        assert!(!slow.observe("g", Some("v4"), 60));
        // The first deletion's release, arriving after the second deletion
        // (two producers, no order between them), releases nothing.
        slow.release("g", 50);
        tokio::time::sleep(horizon * 2).await;
        assert_eq!(
            slow.counts().forgotten,
            0,
            "released by the first deletion's release"
        );
        slow.release("g", 70);
        tokio::time::sleep(horizon * 2).await;
        assert_eq!(slow.counts().forgotten, 1);

        // Released before its pruner ended the deletion here: forgotten
        // once it has.
        assert!(ledger.observe("e", None, 60));
        ledger.release("e", 60);
        assert_eq!(ledger.counts().forgotten, 1);
        ledger.finish("e", None, Outcome::Deleted);
        assert_eq!(ledger.counts().forgotten, 2);
        // An ingest node's release of a document that is not deleted here
        // does nothing.
        assert!(ledger.observe("f", Some("v1"), 70));
        ledger.release("f", 70);
        ledger.finish("f", Some("v1"), Outcome::Indexed);
        assert_eq!(ledger.status("f"), Some(DocStatus::Indexed));
    }

    /// A node with the ingest and index roles on a bus: the deletions its
    /// own watcher admitted end here, and it tells the other index nodes;
    /// those it only sees as jobs (another ingest node's documents, or
    /// one its watcher has not reached yet) wait for that node's release.
    /// And the versions seeded from its store keep their seq, which a
    /// scan that finds the file unchanged does not know.
    #[tokio::test]
    async fn a_node_with_both_roles_holds_only_the_deletions_it_did_not_admit() {
        let ledger = Ledger::with_memory(8, Duration::ZERO, true);
        let mut told = ledger.settled_deletions(8);
        assert!(ledger.admit("kb:own.md", Some("v1")).await);
        assert!(ledger.observe("kb:own.md", Some("v1"), 10));
        ledger.finish("kb:own.md", Some("v1"), Outcome::Indexed);
        assert!(ledger.admit_deletion("kb:own.md", 20).await);
        assert!(ledger.observe("kb:own.md", None, 20));
        ledger.finish("kb:own.md", None, Outcome::Deleted);
        assert_eq!(ledger.counts().forgotten, 1, "its own deletion held");
        assert_eq!(told.try_recv().ok(), Some(("kb:own.md".into(), 20)));

        assert!(ledger.observe("kb:theirs.md", None, 30));
        ledger.finish("kb:theirs.md", None, Outcome::Deleted);
        assert_eq!(ledger.counts().forgotten, 1, "forgotten unreleased");
        assert!(told.try_recv().is_err(), "told of another node's deletion");
        ledger.release("kb:theirs.md", 30);
        assert_eq!(ledger.counts().forgotten, 2);

        ledger.seed(&[crate::indexer::StoredVersion {
            doc_id: "kb:kept.md".into(),
            version: "v2".into(),
            seq: 50,
            partition: None,
        }]);
        assert!(ledger.gone_here("kb:kept.md"), "only the store has it");
        // The scan finds it unchanged.
        assert!(ledger.watch("kb:kept.md"));
        assert!(!ledger.gone_here("kb:kept.md"));
        assert!(!ledger.observe("kb:kept.md", Some("v1"), 40), "a late v1");
        assert!(ledger.is_current("kb:kept.md", "v2"));
        assert_eq!(ledger.status("kb:kept.md"), Some(DocStatus::Indexed));
        // Changed since: a version seen between the stored one and the
        // watcher's new one, delivered late, is refused as well.
        assert!(ledger.admit_at("kb:kept.md", Some("v4"), 80, 0).await);
        assert!(!ledger.observe("kb:kept.md", Some("v3"), 60), "a late v3");
        assert!(ledger.is_current("kb:kept.md", "v4"));
        assert!(!ledger.watch("kb:never.md"), "no entry");
    }
}
