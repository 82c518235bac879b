//! The SourceWatcher: turns a folder into document events.
//!
//! An initial scan, then notify events (debounced). Every document gets a
//! stable id (`source:uri`) and a hash of its content and partition as version, so a touch
//! without a change re-indexes nothing. When the kernel's event queue
//! overflows (inotify drops events in a burst) notify says "rescan", and we
//! do: the rescan compares the folder with what we know, so no file is ever
//! missed. A restart does the same scan against the vector store's contents.

use crate::bridge::Port;
use crate::dlq::{DeadLetters, DlqEntry, Settled};
use crate::indexer::actor::IndexJob;
use crate::ledger::{DocStatus, Ledger, Outcome};
use crate::messages::{DocMeta, Partition};
use crate::pool::Job;
use crate::stats::ActorStats;
use notify::RecursiveMode;
use notify_debouncer_full::{
    new_debouncer_opt, DebounceEventResult, Debouncer, NoCache, RecommendedCache,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Version of a document: 32 hex digits of a sha256 over its content, the
/// partition it is filed in and how it is chunked
/// ([`crate::chunker::Chunker::fingerprint`]). A changed partition rule
/// thus makes every file it moves a new version: indexed in its new
/// partition, while the pruner removes the old one. With the content
/// alone, an unchanged file would keep its old partition, and whoever
/// could see that partition its text, until its next edit. Likewise a
/// changed chunk size makes every file a new version, chunked the new way
/// (the old chunks stay searchable until the new ones are in).
pub fn doc_version(bytes: &[u8], partition: &Partition, chunking: &str) -> String {
    version_of(&Sha256::digest(bytes).into(), partition, chunking)
}

fn version_of(content: &[u8; 32], partition: &Partition, chunking: &str) -> String {
    let mut h = Sha256::new();
    h.update(content);
    let fields = [
        partition.division.as_str(),
        partition.access_level.as_str(),
        chunking,
    ];
    for field in fields {
        // Length-prefixed, so no two partitions hash alike.
        h.update((field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    crate::hex(&h.finalize()[..16])
}

#[derive(Clone, Debug)]
pub struct PartitionRule {
    /// A sub-path of the source root (`/`-separated, relative).
    pub prefix: String,
    pub partition: Partition,
}

#[derive(Clone, Debug)]
pub struct SourceSpec {
    pub name: String,
    pub root: PathBuf,
    pub partition: Partition,
    /// The rule with the longest matching prefix wins, whatever the order
    /// (a general `hr` rule listed before `hr/confidential` must not file
    /// confidential files as merely internal); the source's partition
    /// where none matches.
    pub rules: Vec<PartitionRule>,
    /// Poll the tree at this interval instead of taking the kernel's file
    /// events: for network file systems (NFS, SMB), whose changes made on
    /// other machines raise no events here.
    pub poll: Option<Duration>,
    /// The root is where a file system is mounted (a network share).
    /// Unmounted, it is an empty folder, and would read as every document
    /// deleted; with this set it counts as missing instead (see
    /// [`SourceSpec::root_present`]).
    pub mount_point: bool,
}

/// How often a tree is polled when the kernel's events cannot cover it.
pub const FALLBACK_POLL: Duration = Duration::from_secs(30);

/// How a source is watched: by the kernel's events (`None`), or by
/// polling at an interval, with the reason when it is not the configured
/// way. `watch_native` tries to set up the kernel's watch of its tree; when
/// it fails (inotify's watch limit, a folder the daemon may not read), the
/// tree is polled instead, and the node runs rather than failing to start.
fn plan_watch(
    s: &SourceSpec,
    watch_native: impl FnOnce(&SourceSpec) -> notify::Result<()>,
) -> (Option<Duration>, Option<String>) {
    let Err(e) = s.poll.map_or_else(|| watch_native(s), |_| Ok(())) else {
        return (s.poll, None);
    };
    let hint = match &e.kind {
        notify::ErrorKind::MaxFilesWatch => {
            " (the kernel's limit on watched folders: raise fs.inotify.max_user_watches)"
        }
        // (Each source takes an inotify instance of its own.)
        notify::ErrorKind::Io(io)
            if io.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) =>
        {
            " (the kernel's limit on inotify instances: raise fs.inotify.max_user_instances)"
        }
        _ => "",
    };
    let why = format!(
        "{}: no file events ({e}{hint}); polling every {} s instead",
        s.root.display(),
        FALLBACK_POLL.as_secs()
    );
    (Some(FALLBACK_POLL), Some(why))
}

impl SourceSpec {
    /// Whether the root is there to be read: a folder, and for a
    /// [`SourceSpec::mount_point`], one with a file system mounted on it.
    /// A source whose root is not is left alone: its documents stay
    /// indexed until it is back.
    pub fn root_present(&self) -> bool {
        self.root.is_dir() && (!self.mount_point || is_mount_point(&self.root))
    }

    /// [`SourceSpec::root_present`], looked at off the runtime's threads
    /// and given up on after [`ROOT_LOOK_TIMEOUT`] (see [`look_at_root`]).
    pub async fn present(&self) -> bool {
        let source = self.clone();
        look_at_root(&self.root, ROOT_LOOK_TIMEOUT, move || {
            #[cfg(test)]
            tests::wait_while_held(&source.root);
            source.root_present()
        })
        .await
    }

    pub fn partition_for(&self, uri: &str) -> Partition {
        self.rules
            .iter()
            .map(|r| r.prefix.trim_matches('/'))
            .zip(&self.rules)
            .filter(|(p, _)| uri == *p || uri.strip_prefix(p).is_some_and(|r| r.starts_with('/')))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, r)| r.partition.clone())
            .unwrap_or_else(|| self.partition.clone())
    }
}

/// How long a look at a source root may take before the root counts as
/// missing (see [`look_at_root`]).
pub const ROOT_LOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `look` (a stat of `root`) on the blocking pool, and takes a root
/// that does not answer within `timeout` as missing: a hard-mounted share
/// whose server is gone blocks every stat of it, for as long as it is gone,
/// and a runtime thread blocked there would stall whatever else runs on it.
/// While one look at a root hangs, no other starts (each would take a
/// blocking thread for good): the root counts as missing until it returns.
async fn look_at_root(
    root: &Path,
    timeout: Duration,
    look: impl FnOnce() -> bool + Send + 'static,
) -> bool {
    static HANGING: std::sync::LazyLock<parking_lot::Mutex<HashSet<PathBuf>>> =
        std::sync::LazyLock::new(Default::default);
    if !HANGING.lock().insert(root.to_path_buf()) {
        return false;
    }
    let path = root.to_path_buf();
    let task = tokio::task::spawn_blocking(move || {
        let present = look();
        HANGING.lock().remove(&path);
        present
    });
    match tokio::time::timeout(timeout, task).await {
        Ok(present) => present.unwrap_or(false),
        Err(_) => {
            tracing::warn!(
                "source root {} did not answer within {timeout:?}: missing until it does",
                root.display()
            );
            false
        }
    }
}

/// A file system call [`on_source`] gave up on: its source hangs.
#[derive(Debug)]
struct Hung;

impl std::fmt::Display for Hung {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("its source does not answer (a share that hangs)")
    }
}

impl std::error::Error for Hung {}

fn hung() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, Hung)
}

fn is_hung(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Hung>())
}

/// Source roots with a call that [`on_source`] gave up on and that has
/// not returned yet.
static STUCK: std::sync::LazyLock<parking_lot::Mutex<HashSet<PathBuf>>> =
    std::sync::LazyLock::new(Default::default);

/// Runs `work` (file system calls under the source root `root`) on the
/// blocking pool, and gives up on it once it has gone `hang_after`
/// without progress (`work` counts its steps on the counter it is given:
/// a batch of reads that keeps going is not hung). A hard-mounted share
/// whose server is gone blocks every call under it for as long as it is
/// gone; the watcher, which waits for the call, would stop with it, and
/// every other source with it. (The chunker's reads go through here too,
/// so a root either finds hanging is left alone by both.)
///
/// `None` when given up on, and at once while a call under `root` that
/// was given up on has not returned: each would hold a blocking thread
/// for good. (A `work` that panics fails the watcher, as it would on
/// the watcher's own thread.)
pub(crate) async fn on_source<T: Send + 'static>(
    root: &Path,
    hang_after: Duration,
    work: impl FnOnce(&AtomicU64) -> T + Send + 'static,
) -> Option<T> {
    if stuck(root) {
        return None;
    }
    // (Both flags change under STUCK's lock: a call that returns just as
    // it is given up on either finds itself given up on, and unsticks
    // its root, or has returned first, and is not given up on.)
    let progress = Arc::new(AtomicU64::new(0));
    let (done, abandoned) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (p, d, a, r) = (
        progress.clone(),
        done.clone(),
        abandoned.clone(),
        root.to_path_buf(),
    );
    let mut task = tokio::task::spawn_blocking(move || {
        // (On drop: a `work` that panics returns too.)
        let _returned = Returned {
            done: d,
            abandoned: a,
            root: r,
        };
        work(&p)
    });
    let mut seen = 0;
    let out = loop {
        match tokio::time::timeout(hang_after, &mut task).await {
            Ok(out) => break out,
            Err(_) if progress.load(Ordering::SeqCst) != seen => {
                seen = progress.load(Ordering::SeqCst);
            }
            Err(_) => {
                let mut stuck = STUCK.lock();
                if done.load(Ordering::SeqCst) {
                    drop(stuck);
                    break task.await;
                }
                abandoned.store(true, Ordering::SeqCst);
                stuck.insert(root.to_path_buf());
                drop(stuck);
                tracing::warn!(
                    "a file system call under source root {} made no progress in \
                     {hang_after:?}: the source hangs, and what changed under it waits \
                     until it answers",
                    root.display()
                );
                metrics::counter!("ragd_watcher_source_hangs_total").increment(1);
                return None;
            }
        }
    };
    match out {
        Ok(out) => Some(out),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None, // cancelled: the runtime is shutting down
    }
}

/// `symlink_metadata(path)` under the source root `root`, through
/// [`on_source`]: a source that hangs is an error [`is_hung`] tells.
async fn look_at(
    root: &Path,
    hang_after: Duration,
    path: &Path,
) -> std::io::Result<std::fs::Metadata> {
    let p = path.to_path_buf();
    let looked = on_source(root, hang_after, move |_| std::fs::symlink_metadata(p));
    looked.await.unwrap_or_else(|| Err(hung()))
}

/// See [`on_source`]: marks its call returned, and unsticks its root if
/// the call was given up on.
struct Returned {
    done: Arc<AtomicBool>,
    abandoned: Arc<AtomicBool>,
    root: PathBuf,
}

impl Drop for Returned {
    fn drop(&mut self) {
        let mut stuck = STUCK.lock();
        self.done.store(true, Ordering::SeqCst);
        if self.abandoned.load(Ordering::SeqCst) {
            stuck.remove(&self.root);
            tracing::info!("source root {} answers again", self.root.display());
        }
    }
}

/// Whether a call under `root` was given up on and has not returned.
fn stuck(root: &Path) -> bool {
    STUCK.lock().contains(root)
}

/// Whether a file system is mounted at `path`, as the kernel says (statx's
/// mount-root attribute, Linux 5.8 on: a bind mount of a folder of the
/// same file system too). On an older kernel: whether it lies on another
/// device than its parent folder, or is its own parent (`/`), which misses
/// bind mounts.
pub fn is_mount_point(path: &Path) -> bool {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    use std::os::unix::fs::MetadataExt;
    if let Ok(r) = statx(CWD, path, AtFlags::empty(), StatxFlags::empty()) {
        if r.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) {
            return r.stx_attributes.contains(StatxAttributes::MOUNT_ROOT);
        }
    }
    match (std::fs::metadata(path), std::fs::metadata(path.join(".."))) {
        (Ok(here), Ok(above)) => here.dev() != above.dev() || here.ino() == above.ino(),
        _ => false,
    }
}

/// The content of an open file when it holds at most `max` bytes; `None`
/// when it holds more, having read no further than one byte past `max`.
/// Counts each MiB read on `progress`: a large file read slowly is not a
/// share that hangs (see [`on_source`]). The watcher and the chunker both
/// read documents this way.
pub(crate) fn read_counting(
    file: &std::fs::File,
    max: u64,
    progress: &AtomicU64,
) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let (mut bytes, mut rest) = (Vec::new(), file.take(max + 1));
    while (&mut rest).take(1 << 20).read_to_end(&mut bytes)? > 0 {
        progress.fetch_add(1, Ordering::SeqCst);
    }
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}

/// Editor swap files, partial downloads and hidden files are not documents.
pub fn ignored(rel: &Path) -> bool {
    rel.components().any(|c| {
        let s = c.as_os_str().to_string_lossy();
        s.starts_with('.')
            || s.starts_with('~')
            || s.starts_with('#')
            || s.ends_with('~')
            || [".tmp", ".swp", ".swx", ".part", ".crdownload", ".partial"]
                .iter()
                .any(|ext| s.ends_with(ext))
    })
}

pub enum WatchMsg {
    /// Compare every source folder with what we know (but those whose
    /// watch is being set up: each is scanned once set up).
    Rescan,
    /// Scan the sources waiting for a scan (see
    /// [`WatcherState::request_rescan`]).
    Scan,
    /// Events from the watch of the source at this index (of
    /// [`WatcherArgs::sources`]).
    Fs(usize, DebounceEventResult),
    /// Errors of a polled tree's walk (a folder it may not read).
    PollErrors(usize, Vec<notify::Error>),
    /// The watch of the source at this index is set up, or could not be.
    Watched(usize, WatchSetUp),
    /// Has a watch been setting up for longer than
    /// [`WatcherArgs::hang_after`]?
    SetupCheck,
    /// Index this document again although its version was dead-lettered
    /// (after `ragd dlq replay`).
    Replay(String, PathBuf),
    /// An index node wrote a version of this document after this node's
    /// ledger saw it go (or after it forgot it): a job of it delivered
    /// again after the index node lost the deletion's tombstone (it
    /// restarted, or another node took its partition over). If the source
    /// no longer has the file, it is deleted again.
    CheckGone(String),
    /// Delete the documents whose grace ran out, if their files are still
    /// gone (see [`WatcherArgs::delete_grace`]).
    Doomed,
    /// Is a source root that was missing at start back?
    RootCheck,
    /// Try the files of [`WatcherArgs::retry`] again.
    Retry,
    /// Look again at the files of [`WatcherArgs::being_written`] whose
    /// writer may be done.
    Written,
    /// The chunker could not read this document's latest version as it
    /// was seen (see [`Ledger::unread_versions`]): its file is looked at
    /// again, as one being written.
    Unread(String),
}

pub struct SourceWatcher;

pub struct WatcherArgs {
    pub sources: Vec<SourceSpec>,
    /// How the chunker chunks ([`crate::chunker::Chunker::fingerprint`]),
    /// in every version ([`doc_version`]).
    pub chunking: Arc<str>,
    pub ledger: Arc<Ledger>,
    pub dlq: Arc<dyn DeadLetters>,
    /// To this node's Chunker (a local queue on a cluster too: the chunker
    /// reads the file where this watcher saw it).
    pub chunk_q: Port<DocMeta>,
    /// Deletions, to the Indexer (local queue, or the `embedded` topic).
    pub index_q: Port<IndexJob>,
    /// Versions already in the vector store, by doc id.
    pub known: Arc<parking_lot::Mutex<BTreeMap<String, String>>>,
    pub max_file_bytes: u64,
    /// Watch for changes after the first scan (false for one-shot ingest).
    pub watch: bool,
    pub debounce: Duration,
    pub stats: Arc<ActorStats>,
    /// Set once the first scan has admitted everything it found: of
    /// every source, but those missing and those whose watch took longer
    /// than [`WatcherArgs::hang_after`] to set up (each is scanned once
    /// watched).
    pub scanned: Arc<AtomicBool>,
    /// Restrict scans to these paths (inside the sources); empty: everything.
    pub only: Vec<PathBuf>,
    /// Files (and folders, see [`walk_again_later`]) that could not be
    /// read for a reason that may pass (too many open files in a burst, an
    /// I/O error), with the tries so far and whether a replay forced them:
    /// looked at again every [`RETRY_AFTER`], since no event may ever come
    /// for them, up to [`READ_TRIES`] times. One entry per path, however often it is found.
    pub retry: Arc<parking_lot::Mutex<HashMap<PathBuf, (u32, bool)>>>,
    /// A file seen gone is deleted only once it has stayed gone this long
    /// (`[pipeline] delete_grace_ms`): a folder rebuilt more slowly than
    /// the debounce (`rm -rf site && build site`, a branch checked out, an
    /// rsync that replaces) would otherwise have every file deleted and
    /// then embedded again, and missing from search in between. A file
    /// back unchanged within it costs nothing; one back changed is an
    /// update. Zero: deleted at once.
    pub delete_grace: Duration,
    /// How long a file system call under a source may go without
    /// progress before the source counts as hanging ([`HANG_AFTER`]; see
    /// [`on_source`]).
    pub hang_after: Duration,
    /// How each source stands, kept here for the admin API and the
    /// one-shot summary.
    pub health: SourceHealth,
    /// A file whose event comes while it is still being written (modified
    /// within [`WatcherArgs::debounce`]) is read once it has been left
    /// alone that long, rather than at every event: a file copied in
    /// slowly (a large one, a network share) is chunked and embedded once,
    /// not once per debounce of its copy. One written to without such a
    /// pause (a log) is read anyway once this long has passed since the
    /// first event that found it being written (`[pipeline]
    /// max_write_wait_ms`): it is indexed at least that often. Zero: read
    /// at every event.
    pub max_write_wait: Duration,
    /// The files waiting for their writer to pause (see
    /// [`WatcherArgs::max_write_wait`]), by path. Only events wait: a scan
    /// reads what it finds (its first one admits everything, and a file
    /// still being written then has its events to come).
    pub being_written: Arc<parking_lot::Mutex<HashMap<PathBuf, BeingWritten>>>,
    /// Whether a document of a source not configured here is another
    /// ingest node's (a cluster, whose ingest nodes may each watch an
    /// office of their own), rather than one of a source removed from the
    /// config: then it is never taken as deleted for it.
    pub others_sources: bool,
}

/// A file waiting for its writer to pause (see
/// [`WatcherArgs::max_write_wait`]).
#[derive(Clone, Copy, Debug)]
pub struct BeingWritten {
    /// When an event first found it being written.
    since: tokio::time::Instant,
    /// When it is looked at again: a debounce after its last write.
    due: tokio::time::Instant,
}

/// How each source stands, by name (see [`SourceView`]).
pub type SourceHealth = Arc<parking_lot::Mutex<BTreeMap<String, SourceView>>>;

/// How a source stands: how it is watched, and what of it is not seen.
#[derive(Clone, Debug)]
pub struct SourceView {
    pub root: PathBuf,
    /// "setting up", "watching", "polling", "missing", or "off" (a one-shot
    /// ingest watches nothing).
    pub watch: &'static str,
    /// Why what is under it is not all seen right now (not scanned yet,
    /// its root missing or unreadable, a share that hangs); `None` once a
    /// scan has seen it whole.
    pub unseen: Option<String>,
}

/// See [`WatcherArgs::hang_after`]: far longer than a read of the largest
/// file on a slow share takes, since a call given up on is redone later.
pub const HANG_AFTER: Duration = Duration::from_secs(30);

/// See [`WatcherArgs::retry`]: past this many tries the file is skipped
/// with the error, and what the index had of it goes.
pub const READ_TRIES: u32 = 5;

/// See [`WatcherArgs::retry`]; also how often a missing source root is
/// looked for.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// How often a one-time scan looks whether the files that moved are
/// through under their new names (see [`WatcherState::doom`]).
const MOVED_CHECK: Duration = Duration::from_millis(100);

/// See [`WatcherArgs::delete_grace`]: the documents due within this much
/// of each other are deleted together.
const DOOM_GATHER: Duration = Duration::from_millis(250);

pub struct WatcherState {
    args: WatcherArgs,
    /// The sources (by index) waiting for a scan: a request for one that
    /// already waits is served by that scan (a burst overflows the kernel
    /// queue many times over, and each scan reads every file).
    queued: BTreeSet<usize>,
    /// A [`WatchMsg::Scan`] is on its way.
    scan_scheduled: bool,
    rescans: u64,
    /// The sources not scanned since the start: until none is, the first
    /// scan is not done (see [`WatcherArgs::scanned`]). One whose watch
    /// is not set up within [`WatcherArgs::hang_after`] no longer counts.
    unscanned: HashSet<usize>,
    /// A [`WatchMsg::Retry`] is on its way.
    retry_scheduled: bool,
    /// A [`WatchMsg::Written`] is on its way, due then.
    written_at: Option<tokio::time::Instant>,
    /// A [`WatchMsg::RootCheck`] is on its way.
    root_check_scheduled: bool,
    /// Source roots that did not answer an event (see [`on_source`]):
    /// what it said (a file written, or deleted) is unknown, so each is
    /// scanned once it answers again (looked for with the missing roots).
    missed: HashSet<PathBuf>,
    /// Documents seen gone, by when they are deleted if still gone (see
    /// [`WatcherArgs::delete_grace`]).
    doomed: HashMap<String, tokio::time::Instant>,
    /// A [`WatchMsg::Doomed`] is on its way.
    doom_scheduled: bool,
    /// How each source is watched, by index.
    watches: Vec<SourceWatch>,
    /// What the documents of sources no longer configured wait for.
    orphans: OrphanWait,
}

/// How a source is watched.
enum SourceWatch {
    /// Not at all: a one-shot ingest (or, for a moment, one watched
    /// anew).
    Off,
    /// Its root was not there to watch (or did not answer): unwatched
    /// until it is back, which watches it anew. Its documents stay indexed
    /// meanwhile: a root that is gone for a moment, a deploy swapping
    /// folders or an unmounted share, is not a deletion of everything in
    /// it.
    Missing,
    /// Being set up on the blocking pool since `since`: setting up walks
    /// the tree (inotify adds a watch per folder; a poller hashes every
    /// file), which takes a while on a large tree, and hangs on a share
    /// that hangs. No other setup of the source starts meanwhile (each
    /// would hold a thread for good); `again`: it is set up anew once
    /// this one ends (asked for meanwhile). `late`: it took longer than
    /// [`WatcherArgs::hang_after`], and was said to.
    SettingUp {
        since: tokio::time::Instant,
        again: bool,
        late: bool,
    },
    Watching(#[expect(dead_code, reason = "held for its drop, which stops it")] Watch),
}

/// A source's watch: each its own, so that one whose tree hangs (inotify
/// walks a folder made in it to watch it, on the watcher's one thread)
/// holds up no other source's events.
#[expect(dead_code, reason = "held for their drop, which stops them")]
enum Watch {
    Native(Debouncer<notify::RecommendedWatcher, RecommendedCache>),
    Polled(Debouncer<notify::PollWatcher, NoCache>),
}

/// What setting up a source's watch came to (see [`WatchMsg::Watched`]):
/// the watch, or why its root could not be watched ("is missing").
pub struct WatchSetUp(Result<Watch, String>);

impl Actor for SourceWatcher {
    type Msg = WatchMsg;
    type State = WatcherState;
    type Arguments = WatcherArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WatchMsg>,
        args: WatcherArgs,
    ) -> Result<WatcherState, ActorProcessingErr> {
        args.stats.set_status("scanning");
        *args.health.lock() = args
            .sources
            .iter()
            .map(|s| {
                let view = SourceView {
                    root: s.root.clone(),
                    watch: if args.watch { "setting up" } else { "off" },
                    unseen: Some("not scanned yet".into()),
                };
                (s.name.clone(), view)
            })
            .collect();
        let present = presence(&args.sources).await;
        let mut st = WatcherState {
            watches: args.sources.iter().map(|_| SourceWatch::Off).collect(),
            args,
            queued: BTreeSet::new(),
            scan_scheduled: false,
            rescans: 0,
            unscanned: HashSet::new(),
            retry_scheduled: false,
            written_at: None,
            root_check_scheduled: false,
            missed: HashSet::new(),
            doomed: HashMap::new(),
            doom_scheduled: false,
            orphans: OrphanWait::default(),
        };
        // Each source is scanned once watched (set up on its own, and in
        // the background: one that hangs holds up no other), so that
        // whatever changes after its scan started, an event tells. A
        // one-shot ingest watches nothing and scans them all at once.
        for (i, absent) in present.into_iter().enumerate() {
            match absent {
                Some(what) => st.missing(&myself, i, what),
                None if st.args.watch => {
                    st.unscanned.insert(i);
                    st.set_up(&myself, i);
                }
                None => {
                    st.queued.insert(i);
                }
            }
        }
        // (With nothing to scan, the first scan is done at once.)
        st.schedule_scan(&myself);
        // (A restarted watcher takes the ledger's news over: the old
        // forwarder ends with the channel it held.)
        let mut unread = st.args.ledger.unread_versions(4096);
        let me = myself.clone();
        tokio::spawn(async move {
            while let Some(id) = unread.recv().await {
                if me.cast(WatchMsg::Unread(id)).is_err() {
                    break;
                }
            }
        });
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<WatchMsg>,
        msg: WatchMsg,
        st: &mut WatcherState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(i) = st.unmounted().await {
            // Before anything reads the empty folder as every file deleted.
            // Watched anew, it is missing, and waited for.
            let root = st.args.sources[i].root.display();
            let why = format!("source root {root} is no longer mounted");
            st.rewatch(&myself, i, &why).await?;
        }
        self.handle_msg(&myself, msg, st).await?;
        // One timer for all the files waiting to be tried again.
        if !st.retry_scheduled && !st.args.retry.lock().is_empty() {
            st.retry_scheduled = true;
            cast_later(&myself, WatchMsg::Retry);
        }
        // And one for the files being written, when the first is due (a
        // file found being written since is due sooner only by less than
        // a debounce: that timer then goes too).
        let first = st.args.being_written.lock().values().map(|w| w.due).min();
        if let Some(due) = first {
            if st.written_at.is_none_or(|at| due < at) {
                st.written_at = Some(due);
                cast_at(&myself, WatchMsg::Written, due);
            }
        }
        // And one for the documents waiting out their grace, a little
        // after the first is due: those of a burst's next event batches
        // are due by then too, and are looked at in the same trip.
        if !st.doom_scheduled {
            if let Some(first) = st.doomed.values().min() {
                st.doom_scheduled = true;
                cast_at(&myself, WatchMsg::Doomed, *first + DOOM_GATHER);
            }
        }
        Ok(())
    }
}

/// What [`watch_source`] needs of [`WatcherArgs`], to take to the
/// blocking pool.
struct WatchSetup {
    source: SourceSpec,
    index: usize,
    debounce: Duration,
    stats: Arc<ActorStats>,
}

/// Whether each source's root is there (see [`SourceSpec::present`]).
/// `None` where it is; where not, what the root is like.
async fn presence(sources: &[SourceSpec]) -> Vec<Option<&'static str>> {
    futures::future::join_all(sources.iter().map(|s| async move {
        if s.present().await {
            return None;
        }
        // (A root that hangs is not looked at again: missing.)
        let root = s.root.clone();
        let folder =
            s.mount_point && look_at_root(&s.root, ROOT_LOOK_TIMEOUT, move || root.is_dir()).await;
        Some(if folder {
            "has nothing mounted on it"
        } else {
            "is missing"
        })
    }))
    .await
}

/// Watches one source: with the kernel's watcher, or by polling where it
/// cannot (see [`plan_watch`]). Its events come to `myself` under its
/// index. (On the blocking pool: it walks the tree, see
/// [`SourceWatch::SettingUp`].)
fn watch_source(setup: &WatchSetup, myself: &ActorRef<WatchMsg>) -> WatchSetUp {
    let (s, index) = (&setup.source, setup.index);
    #[cfg(test)]
    tests::wait_while_held(&tests::setup_of(&s.root));
    let handler = |polled: bool| {
        let me = myself.clone();
        move |res: DebounceEventResult| {
            let msg = match res {
                // A poll walks the whole tree each time: a folder it could
                // not read is no lost event, and a rescan per poll would
                // re-read every file each interval.
                Err(errors) if polled => WatchMsg::PollErrors(index, errors),
                res => WatchMsg::Fs(index, res),
            };
            let _ = me.cast(msg);
        }
    };
    // Links are not followed, as in our own walks: notify keeps one path
    // per watched folder, so a folder reached through a link too would
    // have its events reported under whichever path came last, and a link
    // out of the tree would watch, and file under this source's
    // partition, what lies outside it.
    let config = notify::Config::default().with_follow_symlinks(false);
    let mut native = None;
    let (poll, why) = plan_watch(s, |s| {
        // (Without an inotify instance to spare, its instance limit, the
        // tree is polled. One that fails part-way closes, with it, what
        // it did watch.)
        let mut d = new_debouncer_opt::<_, notify::RecommendedWatcher, _>(
            setup.debounce,
            None,
            handler(false),
            RecommendedCache::new(),
            config,
        )?;
        d.watch(&s.root, RecursiveMode::Recursive)?;
        native = Some(d);
        Ok(())
    });
    let Some(every) = poll else {
        return WatchSetUp(
            native
                .map(Watch::Native)
                .ok_or_else(|| "is not watched".into()),
        );
    };
    if why.is_some() && !s.root_present() {
        // Its kernel watch failed because it vanished meanwhile; notify's
        // poller would watch nothing for it.
        return WatchSetUp(Err("is missing".into()));
    }
    if let Some(why) = why {
        tracing::warn!("{why}");
        setup.stats.set_error(why);
    }
    let polled = new_debouncer_opt::<_, notify::PollWatcher, _>(
        setup.debounce,
        None,
        handler(true),
        NoCache::new(),
        // notify's poller compares modification times in whole seconds:
        // a second save within the second of a poll would go unseen for
        // good without a content hash.
        config.with_poll_interval(every).with_compare_contents(true),
    )
    .and_then(|mut p| p.watch(&s.root, RecursiveMode::Recursive).map(|()| p));
    WatchSetUp(
        polled
            .map(Watch::Polled)
            .map_err(|e| format!("cannot be polled ({e})")),
    )
}

impl SourceWatcher {
    async fn handle_msg(
        &self,
        myself: &ActorRef<WatchMsg>,
        msg: WatchMsg,
        st: &mut WatcherState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WatchMsg::Retry => {
                st.retry_scheduled = false;
                let hung = retry(&st.args).await;
                for root in hung {
                    st.missed(myself, root);
                }
            }
            WatchMsg::Unread(id) => {
                if let Some((_, _, path)) = place_of(&st.args.sources, &id) {
                    // A debounce on, as after an event: the writer that
                    // made the chunker skip may not be done.
                    let now = tokio::time::Instant::now();
                    let due = now + st.args.debounce;
                    (st.args.being_written.lock())
                        .entry(path)
                        .or_insert(BeingWritten { since: now, due });
                }
            }
            WatchMsg::Written => {
                st.written_at = None;
                let now = tokio::time::Instant::now();
                let due: Vec<PathBuf> = (st.args.being_written.lock().iter())
                    .filter(|(_, w)| w.due <= now)
                    .map(|(p, _)| p.clone())
                    .collect();
                // (Probed together: a folder copied in has many due at once.)
                let files = (due.iter().cloned())
                    .filter_map(|path| Candidate::at(&st.args.sources, path, Look::Event))
                    .collect();
                let hung = consider_all(&st.args, files).await;
                // One that was not looked at after all (a source that hung
                // keeps it on the retry list; its type no longer read)
                // waits no more: it would be due again at once, forever.
                let mut waiting = st.args.being_written.lock();
                for path in &due {
                    if waiting.get(path).is_some_and(|w| w.due <= now) {
                        waiting.remove(path);
                    }
                }
                drop(waiting);
                for root in hung {
                    st.missed(myself, root);
                }
            }
            WatchMsg::RootCheck => {
                st.root_check_scheduled = false;
                // The missing roots that are back are watched anew; all
                // are looked at at once (each look may take its timeout;
                // a missing root costs a stat a round).
                let missing: Vec<usize> = (0..st.watches.len())
                    .filter(|i| matches!(st.watches[*i], SourceWatch::Missing))
                    .collect();
                let looks = missing.iter().map(|i| st.args.sources[*i].present());
                let looks = futures::future::join_all(looks).await;
                for (i, back) in missing.into_iter().zip(looks) {
                    if back {
                        let root = st.args.sources[i].root.display();
                        let why = format!("source root {root} is back");
                        st.rewatch(myself, i, &why).await?;
                    }
                }
                let sources = &st.args.sources;
                // Not there, or a look at it that does not answer: still
                // missed.
                let missed: Vec<PathBuf> = st.missed.drain().collect();
                let looks = missed.iter().map(|root| async move {
                    let i = sources.iter().position(|s| &s.root == root)?;
                    Some((i, !stuck(root) && sources[i].present().await))
                });
                let looks = futures::future::join_all(looks).await;
                let mut answered = Vec::new();
                for (root, there) in missed.into_iter().zip(looks) {
                    match there {
                        Some((i, true)) => answered.push(i),
                        Some((_, false)) => {
                            st.missed.insert(root);
                        }
                        None => {} // no longer a source's root
                    }
                }
                if let Some(i) = answered.first() {
                    let root = st.args.sources[*i].root.display();
                    let why = format!("source root {root} answers again");
                    st.request_rescan(myself, answered, &why)?;
                }
                st.check_roots_later(myself);
            }
            WatchMsg::Rescan => {
                st.queued.extend(0..st.args.sources.len());
                st.scan(myself).await;
            }
            WatchMsg::Scan => {
                st.scan_scheduled = false;
                st.scan(myself).await;
            }
            WatchMsg::Watched(i, WatchSetUp(set_up)) => {
                let SourceWatch::SettingUp { again, late, .. } = st.watches[i] else {
                    return Ok(()); // (not asked for: dropped)
                };
                let root = st.args.sources[i].root.clone();
                match set_up {
                    // Asked for anew meanwhile (the root moved, say): what
                    // this one watches may no longer be the root. (Dropped
                    // first: see `rewatch`.)
                    _ if again => {
                        drop(set_up);
                        st.watches[i] = SourceWatch::Off;
                        st.start_watch(myself, i).await;
                    }
                    Ok(watch) => {
                        let how = match watch {
                            Watch::Native(_) => "watching",
                            Watch::Polled(_) => "polling",
                        };
                        st.show(i, |v| v.watch = how);
                        st.watches[i] = SourceWatch::Watching(watch);
                        if late {
                            tracing::info!("source root {} is watched after all", root.display());
                        }
                        if st.unscanned.contains(&i) {
                            st.queued.insert(i);
                            st.schedule_scan(myself);
                        } else {
                            let why = format!("source root {} is watched", root.display());
                            st.request_rescan(myself, [i], &why)?;
                        }
                    }
                    Err(what) => st.missing(myself, i, &what),
                }
                // (A source found missing no longer holds up the first
                // scan.)
                st.settle();
            }
            WatchMsg::SetupCheck => {
                let now = tokio::time::Instant::now();
                let hang_after = st.args.hang_after;
                let mut late_now = Vec::new();
                for (i, watch) in st.watches.iter_mut().enumerate() {
                    let SourceWatch::SettingUp { since, late, .. } = watch else {
                        continue;
                    };
                    if !*late && now.duration_since(*since) >= hang_after {
                        *late = true;
                        late_now.push(i);
                    }
                }
                for i in late_now {
                    // (The first scan is done without it: a node whose one
                    // share hangs serves the others.)
                    st.unscanned.remove(&i);
                    let why = format!(
                        "source root {} is not watched yet: setting up its watch has taken \
                         {hang_after:?} so far (a share that hangs, or a very large tree); \
                         it is scanned once watched",
                        st.args.sources[i].root.display()
                    );
                    st.report_unseen(i, why);
                    metrics::counter!("ragd_watcher_source_hangs_total").increment(1);
                }
                st.settle();
            }
            WatchMsg::Replay(id, path) => {
                if let Some((source, uri)) = source_of(&st.args.sources, &path) {
                    if id == doc_id(source, &uri) {
                        // (A source that hangs: the probe below keeps it
                        // for later.)
                        let hung = match look_at(&source.root, st.args.hang_after, &path).await {
                            // Gone (from a source that is there): what
                            // failed was its deletion (or the prune after
                            // it), which runs again.
                            Err(e) if gone(&e) && source.present().await => {
                                remove(&st.args, &id).await;
                                vec![]
                            }
                            // There, or unreadable for now (which the
                            // probe tells, and tries again).
                            _ => consider(&st.args, source, &path, &uri, Look::Forced).await,
                        };
                        for root in hung {
                            st.missed(myself, root);
                        }
                    }
                }
            }
            WatchMsg::CheckGone(id) => {
                // Not another ingest node's document, nor a name this node
                // does not watch; and one waiting out its grace goes then.
                // (When the file is there, the watcher sees to it.)
                let ours = place_of(&st.args.sources, &id).is_some();
                if !ours || st.doomed.contains_key(&id) {
                    return Ok(());
                }
                for id in look_again(&st.args, vec![id]).await.gone {
                    tracing::warn!(
                        doc = %id,
                        "an index node wrote a version of a document the source no \
                         longer has (delivered again after its deletion); deleting it again"
                    );
                    metrics::counter!("ragd_watcher_deleted_again_total").increment(1);
                    remove(&st.args, &id).await;
                }
            }
            WatchMsg::Doomed => {
                st.doom_scheduled = false;
                let now = tokio::time::Instant::now();
                let mut due = Vec::new();
                st.doomed.retain(|id, at| {
                    let wait = *at > now;
                    if !wait {
                        due.push(id.clone());
                    }
                    wait
                });
                // Not one deleted meanwhile (a replay, a check).
                due.retain(|id| has_version(&st.args, id));
                let mut looked = look_again(&st.args, due).await;
                let again = tokio::time::Instant::now() + st.args.delete_grace;
                // A document whose version (its text, in its partition) is
                // on its way in under another name was moved or renamed:
                // it stays until that one is through. Until then a search
                // finds the text under its old name rather than not at
                // all, and the embedder reuses its vectors rather than
                // embedding the text again (a large folder moved is
                // admitted long before its last file reaches the model).
                // Nothing shows to anyone who could not see it: the same
                // version is in the same partition. (A document of a source
                // no longer configured, out of every search, waits for
                // what was on its way: see `waits_for_moves`.)
                let moving = st.args.ledger.versions_in_flight();
                let (args, orphans) = (&st.args, &mut st.orphans);
                let (wait, gone) = std::mem::take(&mut looked.gone)
                    .into_iter()
                    .partition(|id| waits_for_moves(args, orphans, &moving, id));
                looked.gone = gone;
                for id in wait {
                    tracing::debug!(
                        doc = %id,
                        "deletion waits: the document moved (or its source was renamed), \
                         and its new name is not indexed yet"
                    );
                    st.doomed.insert(id, again);
                }
                for id in &looked.gone {
                    remove(&st.args, id).await;
                }
                let mut hung = Vec::new();
                for id in &looked.back {
                    // Back unchanged, a version counts as handled. One that
                    // ended skipped because the chunker found it gone (or
                    // changed) when it came to read it was never indexed:
                    // it is read again.
                    if matches!(st.args.ledger.status(id), Some(DocStatus::Skipped(_))) {
                        if let Some((source, uri, path)) = place_of(&st.args.sources, id) {
                            hung.extend(consider(&st.args, source, &path, uri, Look::Forced).await);
                        }
                    }
                }
                for root in hung {
                    st.missed(myself, root);
                }
                for id in looked.unknown {
                    st.doomed.insert(id, again);
                }
            }
            WatchMsg::Fs(i, Err(errors)) => {
                if errors
                    .iter()
                    .any(|e| matches!(e.kind, notify::ErrorKind::MaxFilesWatch))
                {
                    // Folders made since the start took the kernel's last
                    // watches: the ones after them are not watched, and
                    // notify adds no more. Watched anew, the tree is too
                    // big to watch and is polled.
                    let why = "inotify's watch limit (fs.inotify.max_user_watches) was reached";
                    return st.rewatch(myself, i, why).await;
                }
                for e in &errors {
                    tracing::warn!("watch error: {e}; rescanning");
                    st.args.stats.set_error(e.to_string());
                }
                st.request_rescan(myself, [i], "a watch error")?;
            }
            WatchMsg::PollErrors(_, errors) => {
                for e in &errors {
                    tracing::debug!("poll error: {e}");
                }
                if let Some(e) = errors.first() {
                    st.args.stats.set_error(format!("polling: {e}"));
                }
            }
            WatchMsg::Fs(i, Ok(events)) => {
                for e in &events {
                    tracing::trace!(source = i, kind = ?e.kind, paths = ?e.paths, "file event");
                }
                if events.iter().any(|e| e.need_rescan()) {
                    tracing::warn!("the kernel dropped file events (queue overflow); rescanning");
                    st.request_rescan(myself, [i], "the kernel's event queue overflowed")?;
                    return Ok(());
                }
                // Folders an event removed or renamed: one made anew since
                // (its removal folded with those under it) loses what it
                // no longer holds. Other folder events (created, moved in)
                // only add.
                let removed: HashSet<&Path> = removed_paths(&events).collect();
                // Each path once, with whether its events only changed
                // its metadata (see `handle_path`).
                let mut paths: BTreeMap<PathBuf, bool> = BTreeMap::new();
                for e in events.iter().filter(|e| may_change_content(&e.kind)) {
                    let metadata = matches!(
                        e.kind,
                        notify::EventKind::Modify(notify::event::ModifyKind::Metadata(_))
                    );
                    for p in &e.paths {
                        *paths.entry(p.clone()).or_insert(true) &= metadata;
                    }
                }
                if let Some(i) = moved_root(&st.args.sources, &events) {
                    // The kernel's watches follow the folder, not its path:
                    // they would go on reporting the moved tree's events
                    // under the root's path, and a new folder there would
                    // go unwatched. The path is watched anew, and the scan
                    // of it once watched deletes what is gone.
                    let why = format!(
                        "source root {} was moved, removed or replaced",
                        st.args.sources[i].root.display()
                    );
                    return st.rewatch(myself, i, &why).await;
                }
                let mut gone = Vec::new();
                for (path, metadata) in paths {
                    let was_removed = removed.contains(path.as_path());
                    match handle_path(&st.args, &path, was_removed, metadata).await {
                        Ok(g) => gone.extend(g),
                        Err(root) => st.missed(myself, root),
                    }
                }
                st.doom(gone).await;
            }
        }
        Ok(())
    }
}

impl WatcherState {
    /// Deletes `gone` once each has stayed gone for the grace (at once
    /// without one). Seen gone again meanwhile (a folder rebuilt twice),
    /// a document's grace starts over.
    async fn doom(&mut self, mut gone: Vec<String>) {
        // (One event batch may name a document twice: its folder's removal
        // and its own.)
        gone.sort();
        gone.dedup();
        // (A one-time scan ends when what it admitted has: its deletions
        // go at once, but after the new names of the files that moved
        // since the last run, whose embedding reuses the old names'
        // vectors. Nothing else waits on the watcher then.)
        if self.args.delete_grace.is_zero() || !self.args.watch {
            if !self.args.watch {
                loop {
                    let moving = self.args.ledger.versions_in_flight();
                    let (args, orphans) = (&self.args, &mut self.orphans);
                    if !gone
                        .iter()
                        .any(|id| waits_for_moves(args, orphans, &moving, id))
                    {
                        break;
                    }
                    tokio::time::sleep(MOVED_CHECK).await;
                }
            }
            for id in gone {
                if has_version(&self.args, &id) {
                    remove(&self.args, &id).await;
                }
            }
            return;
        }
        let at = tokio::time::Instant::now() + self.args.delete_grace;
        for id in gone {
            self.doomed.insert(id, at);
        }
    }

    /// Scans the sources waiting for a scan, but those whose watch is
    /// being set up: that scans them once set up (what changed between
    /// a scan and the watch would go unseen).
    async fn scan(&mut self, myself: &ActorRef<WatchMsg>) {
        let watches = &self.watches;
        let which: Vec<usize> = std::mem::take(&mut self.queued)
            .into_iter()
            .filter(|i| !matches!(watches[*i], SourceWatch::SettingUp { .. }))
            .collect();
        if !which.is_empty() {
            // From here on a lost event may be behind the walk: the next
            // request queues another scan.
            self.args.stats.set_status("scanning");
            let scanned = rescan(&self.args, &which).await;
            self.doom(scanned.gone).await;
            if self.args.only.is_empty() {
                // Seen whole, but for those it hands back below.
                for i in &which {
                    self.missed.remove(&self.args.sources[*i].root);
                }
            }
            for i in &which {
                self.unscanned.remove(i);
                self.show(*i, |v| v.unseen = None);
            }
            for root in scanned.unreadable {
                let why = format!(
                    "source root {} could not be read at its last scan (a permission, an \
                     I/O error): nothing under it was seen, and what is indexed of it stays",
                    root.display()
                );
                if let Some(i) = self.source_at(&root) {
                    self.show(i, |v| v.unseen = Some(why));
                }
            }
            for root in scanned.unseen {
                if self.args.watch {
                    self.missed(myself, root);
                } else {
                    let why = format!(
                        "source root {} was not read whole: it does not answer (a share \
                         that hangs), or went; run the ingest again once it answers",
                        root.display()
                    );
                    if let Some(i) = self.source_at(&root) {
                        self.report_unseen(i, why);
                    }
                }
            }
        }
        self.settle();
    }

    /// Once every source has had its first scan, and no scan waits: the
    /// first scan is done, and the watcher watches (or, one-shot, is
    /// done). Meanwhile it is scanning.
    fn settle(&mut self) {
        if !self.unscanned.is_empty() || self.scan_scheduled {
            self.args.stats.set_status("scanning");
            return;
        }
        self.args.scanned.store(true, Ordering::SeqCst);
        let status = if self.args.watch {
            "watching"
        } else {
            "scanned"
        };
        self.args.stats.set_status(status);
    }

    /// Sends a [`WatchMsg::Scan`] unless one is on its way.
    fn schedule_scan(&mut self, myself: &ActorRef<WatchMsg>) {
        if !self.scan_scheduled {
            self.scan_scheduled = true;
            let _ = myself.cast(WatchMsg::Scan);
        }
    }

    /// Sets up the watch of source `i` on the blocking pool; it comes back
    /// as a [`WatchMsg::Watched`] (see [`SourceWatch::SettingUp`]).
    fn set_up(&mut self, myself: &ActorRef<WatchMsg>, i: usize) {
        let since = tokio::time::Instant::now();
        self.show(i, |v| v.watch = "setting up");
        self.watches[i] = SourceWatch::SettingUp {
            since,
            again: false,
            late: false,
        };
        let setup = WatchSetup {
            source: self.args.sources[i].clone(),
            index: i,
            debounce: self.args.debounce,
            stats: self.args.stats.clone(),
        };
        let me = myself.clone();
        tokio::task::spawn_blocking(move || {
            // (One that panics would leave the source setting up for good:
            // it counts as missing, and is tried again.)
            let set_up = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                watch_source(&setup, &me)
            }))
            .unwrap_or_else(|_| WatchSetUp(Err("could not be watched (a panic)".into())));
            // (A watcher stopped meanwhile: dropped, it stops.)
            let _ = me.cast(WatchMsg::Watched(i, set_up));
        });
        cast_at(myself, WatchMsg::SetupCheck, since + self.args.hang_after);
    }

    /// Watches source `i` if its root is there; otherwise it is missing.
    async fn start_watch(&mut self, myself: &ActorRef<WatchMsg>, i: usize) {
        let source = std::slice::from_ref(&self.args.sources[i]);
        match presence(source).await[0] {
            None => self.set_up(myself, i),
            Some(what) => self.missing(myself, i, what),
        }
    }

    /// Source `i`'s root is not there to watch (`what`: what it is like):
    /// says so, and looks for it again in a while.
    fn missing(&mut self, myself: &ActorRef<WatchMsg>, i: usize, what: &str) {
        // (Nor does it hold up the first scan.)
        self.unscanned.remove(&i);
        let then = if self.args.watch {
            self.watches[i] = SourceWatch::Missing;
            self.check_roots_later(myself);
            "it is watched again once it is back"
        } else {
            "run the ingest again once it is back"
        };
        let why = format!(
            "source root {} {what}; its documents stay indexed; {then}",
            self.args.sources[i].root.display()
        );
        let watch = if self.args.watch { "missing" } else { "off" };
        self.show(i, |v| v.watch = watch);
        self.report_unseen(i, why);
    }

    /// Says `why` source `i` is not all seen: in the log, as the watcher's
    /// last error, and in what [`WatcherArgs::health`] shows of it.
    fn report_unseen(&self, i: usize, why: String) {
        tracing::warn!("{why}");
        self.args.stats.set_error(why.clone());
        self.show(i, |v| v.unseen = Some(why));
    }

    /// The index of the source whose root is `root`.
    fn source_at(&self, root: &Path) -> Option<usize> {
        self.args.sources.iter().position(|s| s.root == root)
    }

    /// Changes what [`WatcherArgs::health`] shows of source `i`.
    fn show(&self, i: usize, change: impl FnOnce(&mut SourceView)) {
        if let Some(v) = self.args.health.lock().get_mut(&self.args.sources[i].name) {
            change(v);
        }
    }

    /// Watches source `i` anew, in place: a root that came back, went
    /// away (a share unmounted), was moved, or a tree that outgrew the
    /// kernel's watches. Once watched, a scan of it finds what changed
    /// meanwhile. (A restart by the supervisor would do the same, but a
    /// share that comes and goes would soon use up its restarts and stop
    /// ingestion.)
    async fn rewatch(
        &mut self,
        myself: &ActorRef<WatchMsg>,
        i: usize,
        why: &str,
    ) -> Result<(), ActorProcessingErr> {
        tracing::warn!("{why}; watching it anew");
        self.args.stats.set_error(format!("{why}; watched anew"));
        metrics::counter!("ragd_watcher_rewatches_total").increment(1);
        if let SourceWatch::SettingUp { again, .. } = &mut self.watches[i] {
            *again = true;
            return Ok(());
        }
        // The old watch goes first, so that what it held of the kernel's
        // watch limit is freed for the new one: dropped, it closes its
        // inotify instance once its thread sees the drop. (Not waited for:
        // a thread stuck on a share that hangs would never let it end.)
        self.watches[i] = SourceWatch::Off;
        self.start_watch(myself, i).await;
        Ok(())
    }

    /// Looks for the missing roots (and those that did not answer) again
    /// in a while, if any is.
    fn check_roots_later(&mut self, myself: &ActorRef<WatchMsg>) {
        let missing = self
            .watches
            .iter()
            .any(|w| matches!(w, SourceWatch::Missing));
        let any = missing || !self.missed.is_empty();
        if self.args.watch && !self.root_check_scheduled && any {
            self.root_check_scheduled = true;
            cast_later(myself, WatchMsg::RootCheck);
        }
    }

    /// An event under `root` went unread: the source did not answer.
    fn missed(&mut self, myself: &ActorRef<WatchMsg>, root: PathBuf) {
        if let Some(i) = self.source_at(&root) {
            let why = format!(
                "source root {} does not answer (a share that hangs, or it went): what \
                 changed under it is read once it answers",
                root.display()
            );
            self.show(i, |v| v.unseen = Some(why));
        }
        self.missed.insert(root);
        self.check_roots_later(myself);
    }

    /// A watched mount-point source whose file system is gone, by index.
    async fn unmounted(&self) -> Option<usize> {
        for (i, s) in self.args.sources.iter().enumerate() {
            let watched = match self.watches[i] {
                SourceWatch::Watching(_) => true,
                // (Once it is set up, it is watched anew.)
                SourceWatch::SettingUp { again, .. } => !again,
                SourceWatch::Off | SourceWatch::Missing => false,
            };
            if s.mount_point && watched && !s.present().await {
                return Some(i);
            }
        }
        None
    }

    /// Queues a scan of the sources `which`, unless each already waits
    /// for one.
    fn request_rescan(
        &mut self,
        myself: &ActorRef<WatchMsg>,
        which: impl IntoIterator<Item = usize>,
        why: &str,
    ) -> Result<(), ActorProcessingErr> {
        let before = self.queued.len();
        self.queued.extend(which);
        if self.queued.len() == before {
            return Ok(());
        }
        self.rescans += 1;
        metrics::counter!("ragd_watcher_rescans_total").increment(1);
        self.args.stats.set_note(format!(
            "rescans since start: {} (last: {why})",
            self.rescans
        ));
        self.schedule_scan(myself);
        Ok(())
    }
}

/// The paths that events removed or renamed (both ends of a rename).
fn removed_paths(events: &[notify_debouncer_full::DebouncedEvent]) -> impl Iterator<Item = &Path> {
    use notify::event::ModifyKind;
    use notify::EventKind;
    events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
            )
        })
        .flat_map(|e| e.paths.iter().map(PathBuf::as_path))
}

/// The source whose root an event removed or renamed (or a folder above
/// it), by index.
fn moved_root(
    sources: &[SourceSpec],
    events: &[notify_debouncer_full::DebouncedEvent],
) -> Option<usize> {
    removed_paths(events).find_map(|p| sources.iter().position(|s| s.root.starts_with(p)))
}

/// Sends `msg` to the watcher after [`RETRY_AFTER`].
fn cast_later(me: &ActorRef<WatchMsg>, msg: WatchMsg) {
    cast_at(me, msg, tokio::time::Instant::now() + RETRY_AFTER);
}

/// Sends `msg` to the watcher at `at`.
fn cast_at(me: &ActorRef<WatchMsg>, msg: WatchMsg, at: tokio::time::Instant) {
    let me = me.clone();
    tokio::spawn(async move {
        tokio::time::sleep_until(at).await;
        let _ = me.cast(msg);
    });
}

/// Whether an event can mean a file's content or presence changed. notify
/// watches opens too (inotify's IN_OPEN), and every read, ours included,
/// is one: reacting to them made each hash of a file schedule the next,
/// so the watcher re-read every file it had seen, forever (BENCHMARKS.md,
/// "Ingest at scale"). A close after writing stays: it ends a write.
fn may_change_content(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        notify::EventKind::Access(_) => false,
        _ => true,
    }
}

fn source_of<'a>(sources: &'a [SourceSpec], path: &Path) -> Option<(&'a SourceSpec, String)> {
    sources.iter().find_map(|s| {
        let rel = path.strip_prefix(&s.root).ok()?;
        if rel.as_os_str().is_empty() || ignored(rel) {
            return None;
        }
        let uri = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        Some((s, uri))
    })
}

/// The source a document id (`source:uri`) names, and its uri, if that
/// source is configured.
pub fn source_of_doc<'a, 'd>(
    sources: &'a [SourceSpec],
    doc_id: &'d str,
) -> Option<(&'a SourceSpec, &'d str)> {
    let (name, uri) = doc_id.split_once(':')?;
    Some((sources.iter().find(|s| s.name == name)?, uri))
}

/// The id of the document at `path`, if a source holds it there (and the
/// name is not one the watcher ignores).
pub fn doc_id_at(sources: &[SourceSpec], path: &Path) -> Option<String> {
    source_of(sources, path).map(|(s, uri)| doc_id(s, &uri))
}

fn doc_id(source: &SourceSpec, uri: &str) -> String {
    format!("{}:{uri}", source.name)
}

/// Acts on what an event says of `path`; returns the documents it found
/// gone, for [`WatcherState::doom`], or the root of its source if that
/// does not answer (see [`WatcherState::missed`]).
async fn handle_path(
    args: &WatcherArgs,
    path: &Path,
    was_removed: bool,
    metadata_only: bool,
) -> Result<Vec<String>, PathBuf> {
    let Some((source, uri)) = source_of(&args.sources, path) else {
        return Ok(vec![]);
    };
    let id = doc_id(source, &uri);
    match look_at(&source.root, args.hang_after, path).await {
        // A folder's new modification time (a poll sees it move when a
        // file comes or goes) changes no document: the file's own event
        // follows, and walking the folder for it would re-read every file
        // in it. (A folder renamed in is Modify(Name) and is walked.)
        Ok(m) if m.is_dir() && metadata_only => {}
        Ok(m) if m.is_dir() => {
            // A folder moved in, or one removed and made anew (`rm -rf
            // site && build site`: the debouncer folds the removals under
            // it into the folder's own event). What it holds now is
            // considered; what it held before and holds no longer is gone.
            // (A source that hangs: the scan once it answers sees to
            // what the folder holds, and what it no longer does.)
            let (mut files, unreadable) = walk_sources(args, path.to_path_buf()).await?;
            // (A folder copied in: its files may still be being written.)
            for file in &mut files {
                file.look = Look::Event;
            }
            let present: HashSet<String> = files.iter().map(Candidate::doc_id).collect();
            if let Some(root) = consider_all(args, files).await.pop() {
                return Err(root);
            }
            // (Only then: the search below goes through every document.)
            if was_removed {
                let mut gone = indexed_under(args, &id);
                gone.retain(|d| !present.contains(d) && !unreadable.covers(d));
                return Ok(gone);
            }
        }
        // A file, or something else where a file was (a link, a FIFO):
        // the probe tells which.
        Ok(_) => {
            if let Some(root) = consider(args, source, path, &uri, Look::Event).await.pop() {
                return Err(root);
            }
        }
        Err(e) if is_hung(&e) => return Err(source.root.clone()),
        Err(e) if !gone(&e) => {
            // Unreadable is not gone (a folder made unreadable, a stale
            // network handle): what the index has of it stays.
            tracing::warn!(
                "cannot look at {}: {e}; keeping what is indexed of it",
                path.display()
            );
        }
        Err(_) => {
            // Gone: the file itself, or a folder and everything under it.
            // The store's documents count too: during the first scan one
            // deleted before it was probed is not in the ledger yet, and
            // the scan, finding it vanished, leaves it to this event.
            return Ok(indexed_under(args, &id));
        }
    }
    Ok(vec![])
}

/// Whether `id`'s deletion waits for what is on its way into the index,
/// by `moving` ([`Ledger::versions_in_flight`]):
/// * its version (its text, in its partition) under another name: the
///   file moved. (Its own version on its way ends skipped: the chunker
///   finds the file gone.)
/// * for a document of a source no longer configured (hidden at start,
///   its points out of every search): on a daemon, every source's first
///   scan, then what was on its way when it came due (see [`OrphanWait`]).
fn waits_for_moves(
    args: &WatcherArgs,
    orphans: &mut OrphanWait,
    moving: &HashMap<String, Vec<Arc<str>>>,
    id: &str,
) -> bool {
    if source_of_doc(&args.sources, id).is_none() {
        // (A daemon scans each source once its watch is set up: until
        // every one has had its first scan, a renamed one may not have.)
        let first_scan_done = !args.watch || args.scanned.load(Ordering::SeqCst);
        return !first_scan_done || orphans.waits(moving);
    }
    let version = args
        .ledger
        .latest_version(id)
        .or_else(|| args.known.lock().get(id).cloned());
    version
        .and_then(|v| moving.get(&v))
        .is_some_and(|ids| ids.iter().any(|other| **other != *id))
}

/// What the documents of sources no longer configured wait for before
/// they are deleted. A source renamed and given other partitions in the
/// same edit gives its files other versions but the same texts: until the
/// new names are through, the old names' points are what their embedding
/// reuses. The new names are admitted by the first scan of every source
/// (each ends once all it found is admitted), so what the old ones wait
/// for, once that is done, is what was on its way when the first of them
/// came due, and not what comes in later: on a daemon that is never idle
/// they would otherwise wait, out of every search, for ever.
#[derive(Default)]
struct OrphanWait(Option<HashSet<(String, Arc<str>)>>);

impl OrphanWait {
    /// Whether anything of what was on its way at the first call is still
    /// on its way, by `moving` ([`Ledger::versions_in_flight`]). By
    /// version and document: a version seen through is no longer waited
    /// for, and a file written again and again (a log) is not waited for
    /// for ever, its later versions not being in the set. The wait only
    /// shrinks.
    fn waits(&mut self, moving: &HashMap<String, Vec<Arc<str>>>) -> bool {
        let first = self.0.get_or_insert_with(|| {
            let pairs = moving
                .iter()
                .flat_map(|(v, ids)| ids.iter().map(move |id| (v, id)));
            pairs.map(|(v, id)| (v.clone(), Arc::clone(id))).collect()
        });
        first.retain(|(version, id)| moving.get(version).is_some_and(|ids| ids.contains(id)));
        !first.is_empty()
    }
}

/// Whether the ledger or the store has a version of `id`: it is not
/// deleted yet.
fn has_version(args: &WatcherArgs, id: &str) -> bool {
    args.ledger.latest_version(id).is_some() || args.known.lock().contains_key(id)
}

/// Where the document `id` would be: its source, uri and path, unless no
/// source of this node holds it there (another node's source, or a name
/// the watcher ignores).
fn place_of<'s, 'i>(
    sources: &'s [SourceSpec],
    id: &'i str,
) -> Option<(&'s SourceSpec, &'i str, PathBuf)> {
    let (source, uri) = source_of_doc(sources, id)?;
    let path = source.root.join(uri);
    (doc_id_at(sources, &path).as_deref() == Some(id)).then_some((source, uri, path))
}

/// What [`look_again`] found of the documents it was given.
#[derive(Default)]
struct Looked {
    /// Gone, from a source that is there: to be deleted.
    gone: Vec<String>,
    /// There again (what the watcher saw of it stands).
    back: Vec<String>,
    /// Not to be told now: the source away, or not answering.
    unknown: Vec<String>,
}

/// Looks again at where each of `ids` was, as a scan would: a document is
/// there only if its folder lists exactly its name, and not as a folder
/// (a case-insensitive share still opens `A.md` renamed to `a.md`).
/// Sources are looked at first, each once ([`SourceSpec::present`]), then
/// each source's folders in one trip through [`on_source`]: a share that
/// hangs does not hang the watcher, and while a listing of it hangs no
/// other starts (each would hold a blocking thread for good, one per
/// grace while a deletion waits on it).
async fn look_again(args: &WatcherArgs, ids: Vec<String>) -> Looked {
    let sources = &args.sources;
    let mut looked = Looked::default();
    let mut present: HashMap<&str, bool> = HashMap::new();
    // By source, then by folder: one listing serves every document in it.
    let mut by_source: BTreeMap<&Path, Folders> = BTreeMap::new();
    for id in ids {
        let Some((source, _)) = source_of_doc(sources, &id) else {
            match args.others_sources {
                true => looked.unknown.push(id), // another ingest node's
                false => looked.gone.push(id),   // its source is no longer configured
            }
            continue;
        };
        let there = match present.get(source.name.as_str()) {
            Some(&there) => there,
            None => {
                let there = source.present().await;
                present.insert(&source.name, there);
                there
            }
        };
        if !there {
            looked.unknown.push(id);
            continue;
        }
        let path = place_of(sources, &id).map(|(_, _, path)| path);
        match path
            .as_deref()
            .and_then(|p| Some((p.parent()?, p.file_name()?)))
        {
            Some((folder, name)) => by_source
                .entry(&source.root)
                .or_default()
                .entry(folder.to_path_buf())
                .or_default()
                .push((id, name.to_os_string())),
            // A name the watcher ignores now: no scan finds it either.
            None => looked.gone.push(id),
        }
    }
    for (root, folders) in by_source {
        // (For a look given up on: all of them are looked at again later.)
        let all: Vec<String> = folders
            .values()
            .flatten()
            .map(|(id, _)| id.clone())
            .collect();
        let listed = on_source(root, args.hang_after, move |progress| {
            list(folders, progress)
        });
        match listed.await {
            Some(found) => {
                looked.gone.extend(found.gone);
                looked.back.extend(found.back);
                looked.unknown.extend(found.unknown);
            }
            None => looked.unknown.extend(all),
        }
    }
    looked
}

/// Documents by folder, each with its name there (see [`look_again`]).
type Folders = BTreeMap<PathBuf, Vec<(String, std::ffi::OsString)>>;

/// [`look_again`]'s listings, on the blocking pool: each folder and each
/// name in it counts on `progress`.
fn list(folders: Folders, progress: &AtomicU64) -> Looked {
    let mut found = Looked::default();
    for (folder, docs) in folders {
        #[cfg(test)]
        tests::wait_while_held(&folder);
        progress.fetch_add(1, Ordering::Relaxed);
        let files: HashSet<std::ffi::OsString> = match std::fs::read_dir(&folder) {
            Ok(entries) => entries
                .flatten()
                .inspect(|_| {
                    progress.fetch_add(1, Ordering::Relaxed);
                })
                .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
                .map(|e| e.file_name())
                .collect(),
            Err(e) if gone(&e) => HashSet::new(),
            Err(_) => {
                found.unknown.extend(docs.into_iter().map(|(id, _)| id));
                continue;
            }
        };
        for (id, name) in docs {
            if files.contains(&name) {
                found.back.push(id);
            } else {
                found.gone.push(id);
            }
        }
    }
    found
}

/// The documents at `id` or under it (`id/…`) that the ledger or the store
/// has a version of. A file has nothing under it, and a burst of removals
/// is mostly files: those are looked up, not searched for among every
/// document (a search per removal made a mass deletion quadratic).
fn indexed_under(args: &WatcherArgs, id: &str) -> Vec<String> {
    if has_version(args, id) {
        return vec![id.to_string()];
    }
    // Both are sorted by id: what is under the folder is a range of each.
    let prefix = format!("{id}/");
    let mut found = args.ledger.current_under(&prefix);
    found.extend(
        args.known
            .lock()
            .range(prefix.clone()..)
            .map(|(d, _)| d)
            .take_while(|d| d.starts_with(&prefix))
            .cloned(),
    );
    found.sort();
    found.dedup();
    found
}

/// Whether an error reading a path means it is not there (any more).
fn gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// Everything under `root` but folders (links and other non-files are
/// recorded as skipped when probed), and the folders that could not be
/// read, each with whether the reason may pass (too many open files in a
/// burst, an I/O error; not a permission). A folder that vanished during
/// the walk is simply gone. Each entry counts on `progress` (see
/// [`on_source`]: a large tree that keeps listing is not hung).
fn walk(root: &Path, progress: &AtomicU64) -> (Vec<PathBuf>, Vec<(PathBuf, bool)>) {
    let (mut files, mut unreadable) = (Vec::new(), Vec::new());
    let mut entries = walkdir::WalkDir::new(root).follow_links(false).into_iter();
    // (Not a `for`: the tests' injected fault skips a folder through it.)
    #[allow(clippy::while_let_on_iterator)]
    while let Some(entry) = entries.next() {
        progress.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        if let Ok(e) = &entry {
            tests::wait_while_held(e.path());
            if e.file_type().is_dir() && tests::fails_to_open(e.path()) {
                unreadable.push((e.path().to_path_buf(), true));
                entries.skip_current_dir();
                continue;
            }
        }
        match entry {
            Ok(e) if e.file_type().is_dir() => {}
            Ok(e) => files.push(e.into_path()),
            Err(e) => {
                // A folder that vanished under the walk is gone; the root
                // itself missing is not a deletion of the whole source (see
                // `SourceWatch::Missing`).
                let vanished = e.io_error().is_some_and(gone) && e.path() != Some(root);
                if let (false, Some(p)) = (vanished, e.path()) {
                    tracing::warn!(
                        "cannot read {}: {e}; keeping what it held indexed",
                        p.display()
                    );
                    let passing = e
                        .io_error()
                        .is_some_and(|io| io.kind() != std::io::ErrorKind::PermissionDenied);
                    unreadable.push((p.to_path_buf(), passing));
                }
            }
        }
    }
    (files, unreadable)
}

/// Folders a walk could not read (permissions, an I/O error, a stale
/// network mount), as document-id prefixes. What the index has under them
/// is not deleted for being unseen: unseen is not gone.
#[derive(Default)]
struct Unreadable(Vec<String>);

impl Unreadable {
    fn covers(&self, doc_id: &str) -> bool {
        self.0.iter().any(|p| doc_id.starts_with(p.as_str()))
    }
}

/// Why a file is looked at, which says how [`decide`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Look {
    /// A scan (or the retry list): what is found is taken as it is.
    Scan,
    /// An event: a file still being written waits for its writer to pause
    /// (see [`WatcherArgs::max_write_wait`]).
    Event,
    /// A replay (or a deletion found wrong): read even if unchanged.
    Forced,
}

/// A file to look at: its source, path and uri, and why.
struct Candidate<'s> {
    source: &'s SourceSpec,
    path: PathBuf,
    uri: String,
    look: Look,
}

impl<'s> Candidate<'s> {
    /// The file at `path`, unless no source holds it there (or its name
    /// is one the watcher ignores).
    fn at(sources: &'s [SourceSpec], path: PathBuf, look: Look) -> Option<Candidate<'s>> {
        let (source, uri) = source_of(sources, &path)?;
        Some(Candidate {
            source,
            path,
            uri,
            look,
        })
    }

    fn doc_id(&self) -> String {
        doc_id(self.source, &self.uri)
    }
}

/// The documents under `root` (a source's root or a folder in it): each
/// file, and the folders that could not be read; or, if the walk hangs
/// (see [`on_source`]), the root of its source. (A walk of a large tree
/// takes a while: not on a runtime thread.)
async fn walk_sources(
    args: &WatcherArgs,
    root: PathBuf,
) -> Result<(Vec<Candidate<'_>>, Unreadable), PathBuf> {
    let Some(source) = args.sources.iter().find(|s| root.starts_with(&s.root)) else {
        return Ok((Vec::new(), Unreadable::default()));
    };
    let walked = root.clone();
    let (files, unreadable) = on_source(&source.root, args.hang_after, move |progress| {
        walk(&walked, progress)
    })
    .await
    .ok_or_else(|| source.root.clone())?;
    if args.watch {
        walk_again_later(args, &root, &unreadable);
    }
    let unreadable: Vec<PathBuf> = unreadable.into_iter().map(|(p, _)| p).collect();
    let files = files
        .into_iter()
        .filter_map(|path| Candidate::at(&args.sources, path, Look::Scan))
        .collect();
    let prefixes = unreadable
        .iter()
        .flat_map(|p| {
            let roots = args
                .sources
                .iter()
                .filter(move |s| &s.root == p)
                .map(|s| format!("{}:", s.name));
            let below = source_of(&args.sources, p).map(|(s, uri)| format!("{}/", doc_id(s, &uri)));
            roots.chain(below)
        })
        .collect();
    Ok((files, Unreadable(prefixes)))
}

/// Folders a walk could not open for a reason that may pass are walked
/// again (see [`WatcherArgs::retry`]), up to [`READ_TRIES`] times: no event
/// may ever come for what they hold (a folder moved in during a burst that
/// used up the open files). `root`, read this time, needs no other walk.
fn walk_again_later(args: &WatcherArgs, root: &Path, unreadable: &[(PathBuf, bool)]) {
    let mut retry = args.retry.lock();
    // Read this time, or unreadable for good (a permission): no retry.
    if !unreadable.iter().any(|(p, passing)| p == root && *passing) {
        retry.remove(root);
    }
    for (folder, _) in unreadable.iter().filter(|(_, passing)| *passing) {
        folder_try(&mut retry, folder);
    }
}

/// Counts a try of `folder` on the retry list (see [`walk_again_later`]);
/// past [`READ_TRIES`] it leaves the list.
fn folder_try(retry: &mut HashMap<PathBuf, (u32, bool)>, folder: &Path) {
    let tries = &mut retry.entry(folder.to_path_buf()).or_insert((0, false)).0;
    *tries += 1;
    if *tries >= READ_TRIES {
        tracing::warn!(
            "{} still cannot be read; what it holds waits for an event or a rescan",
            folder.display()
        );
        retry.remove(folder);
    }
}

/// Looks again at what waits on [`WatcherArgs::retry`]: files, and
/// folders (or source roots) a walk could not open. Each source's paths
/// are looked at in one trip, and its files probed in batches (after a
/// hang, a large share may have many waiting). Returns the roots of the
/// sources that hung while their files were read (see [`consider_all`]):
/// for their scan once they answer.
async fn retry(args: &WatcherArgs) -> Vec<PathBuf> {
    let due: Vec<(PathBuf, bool)> = args
        .retry
        .lock()
        .iter()
        .map(|(p, (_, force))| (p.clone(), *force))
        .collect();
    let mut by_source: BTreeMap<usize, Vec<(PathBuf, bool)>> = BTreeMap::new();
    for (path, force) in due {
        // (A source's root may be here too: a walk of it failed.)
        match args.sources.iter().position(|s| path.starts_with(&s.root)) {
            Some(i) => by_source.entry(i).or_default().push((path, force)),
            None => {
                args.retry.lock().remove(&path);
            }
        }
    }
    let mut hung = Vec::new();
    for (i, mut due) in by_source {
        let source = &args.sources[i];
        due.sort();
        let paths: Vec<PathBuf> = due.iter().map(|(p, _)| p.clone()).collect();
        let looks = on_source(&source.root, args.hang_after, move |done| {
            let each = |p: &PathBuf| {
                let looked = std::fs::symlink_metadata(p).map(|m| m.is_dir());
                done.fetch_add(1, Ordering::SeqCst);
                looked
            };
            paths.iter().map(each).collect::<Vec<_>>()
        });
        let Some(looks) = looks.await else {
            continue; // its source still hangs
        };
        let mut files = Vec::new();
        for ((path, force), looked) in due.into_iter().zip(looks) {
            let is_root = path == source.root;
            if looked.as_ref().is_err_and(gone) && !is_root {
                // Gone meanwhile (a folder too, which the probe would not
                // tell from a file): nothing to read; its removal is an
                // event's, or a scan's. (A root: see `walk_again_later`.)
                // A replay waits a while (see `replay_waits`).
                let mut retry = args.retry.lock();
                let tries = retry.get(&path).map_or(0, |(t, _)| *t);
                if force {
                    replay_waits(&mut retry, &path, tries);
                } else {
                    retry.remove(&path);
                }
                continue;
            }
            let unknown = looked.as_ref().is_err() && !is_root;
            if unknown && crate::chunker::parse::Format::from_path(&path).is_none() {
                // Not looked at (a stale handle, an I/O error), and not a
                // file ragd reads: a folder a walk could not open, most
                // likely, which a probe would take for a file of its name.
                // It waits, a try counted, as `walk_again_later` counts.
                folder_try(&mut args.retry.lock(), &path);
                continue;
            }
            // (Not a link to a folder: walked, it would file what lies
            // outside the source under it.)
            if looked.is_ok_and(|folder| folder) || is_root {
                // A folder a walk could not open: what it holds now is
                // considered (nothing is deleted: a rescan does). One
                // whose walk hangs stays on the list.
                if let Ok((found, _)) = walk_sources(args, path).await {
                    hung.extend(consider_all(args, found).await);
                }
                continue;
            }
            // (A file of a type not read, or a name not watched, never
            // will be: off the list, recorded as skipped once.)
            let look = if force { Look::Forced } else { Look::Scan };
            match Candidate::at(&args.sources, path.clone(), look) {
                Some(c) if supported(args, c.source, &c.path, &c.uri) => files.push(c),
                _ => {
                    args.retry.lock().remove(&path);
                }
            }
        }
        // (Those not looked at for a hang stay on the list.)
        hung.extend(consider_all(args, files).await);
    }
    hung.sort();
    hung.dedup();
    hung
}

/// What [`rescan`] found.
#[derive(Default)]
struct Scanned {
    /// The documents gone, for [`WatcherState::doom`].
    gone: Vec<String>,
    /// The roots of the sources not seen whole: they hung (see
    /// [`on_source`]), or were not there or did not answer. A watching
    /// node scans each again once it answers; a one-shot ingest says so.
    unseen: Vec<PathBuf>,
    /// The roots of the sources whose own folder could not be read (a
    /// permission, an I/O error): nothing under them was seen.
    unreadable: Vec<PathBuf>,
}

/// Walks the sources `which` (by index; or the paths of
/// [`WatcherArgs::only`]) and admits what changed.
async fn rescan(args: &WatcherArgs, which: &[usize]) -> Scanned {
    let mut present = HashSet::new();
    let mut hung = Vec::new();
    let roots: Vec<PathBuf> = if args.only.is_empty() {
        which
            .iter()
            .map(|i| args.sources[*i].root.clone())
            .collect()
    } else {
        args.only.clone()
    };
    let mut unreadable = Unreadable::default();
    let mut unreadable_roots = Vec::new();
    for root in roots {
        let source = args.sources.iter().find(|s| s.root == root);
        if let Some(s) = source {
            if !s.present().await {
                // Missing, a share not mounted, or one that does not
                // answer: unseen, not gone. (A root that does not answer
                // within the look's timeout need not hang: what changed
                // under it meanwhile would be seen by no scan.)
                unreadable.0.push(format!("{}:", s.name));
                hung.push(root);
                continue;
            }
        }
        match walk_sources(args, root.clone()).await {
            Ok((files, u)) => {
                if source.is_some_and(|s| u.0.contains(&format!("{}:", s.name))) {
                    unreadable_roots.push(root);
                }
                present.extend(files.iter().map(Candidate::doc_id));
                unreadable.0.extend(u.0);
                // (Files not read for a hang are present all the same.)
                hung.extend(consider_all(args, files).await);
            }
            Err(source_root) => {
                // Unseen, not gone.
                if let Some(s) = args.sources.iter().find(|s| s.root == source_root) {
                    unreadable.0.push(format!("{}:", s.name));
                }
                hung.push(source_root);
            }
        }
    }
    let mut gone_elsewhere = Vec::new();
    if !args.only.is_empty() {
        // A partition rule changed since the store was written hid at
        // start every document it moved (see `indexer::HIDDEN`), under
        // these paths or not: each is out of every search until indexed
        // anew in its new partition, so the ingest takes those elsewhere
        // too, or deletes them, gone (looked at as a deletion is: a share
        // that does not answer is no deletion).
        let looked = look_again(args, hidden_elsewhere(args, &present)).await;
        let mut moved: Vec<Candidate> = (looked.back.into_iter())
            .filter_map(|id| {
                let (_, _, path) = place_of(&args.sources, &id)?;
                Candidate::at(&args.sources, path, Look::Scan)
            })
            .collect();
        // (`consider_all` takes a source's files together.)
        moved.sort_by(|a, b| a.source.root.cmp(&b.source.root));
        if !moved.is_empty() {
            tracing::info!(
                documents = moved.len(),
                "also indexing the documents a changed partition rule moved, outside the paths given"
            );
            hung.extend(consider_all(args, moved).await);
        }
        gone_elsewhere = looked.gone;
        // Those of a source no longer configured, hidden at start, are
        // gone wherever the paths are (once the files that moved under
        // them have reused their vectors: see `doom`).
        let known = args.known.lock();
        let unconfigured = known
            .keys()
            .filter(|d| source_of_doc(&args.sources, d).is_none());
        gone_elsewhere.extend(unconfigured.cloned());
    }
    hung.sort();
    hung.dedup();
    if !args.only.is_empty() {
        // A partial scan cannot tell what else was deleted.
        return Scanned {
            gone: gone_elsewhere,
            unseen: hung,
            unreadable: unreadable_roots,
        };
    }
    // Known to the index or the ledger but no longer on disk: deleted while
    // we were not looking. Of the sources scanned, and of those no longer
    // configured (which no scan sees).
    let names: HashSet<&str> = which
        .iter()
        .map(|i| args.sources[*i].name.as_str())
        .collect();
    let configured: HashSet<&str> = args.sources.iter().map(|s| s.name.as_str()).collect();
    let scanned = |d: &str| {
        let source = d.split_once(':').map_or(d, |(name, _)| name);
        let removed = !configured.contains(source) && !args.others_sources;
        !present.contains(d) && (names.contains(source) || removed)
    };
    let mut gone: Vec<String> = args
        .known
        .lock()
        .keys()
        .filter(|d| scanned(d))
        .cloned()
        .collect();
    gone.extend(
        args.ledger
            .known_docs()
            .into_iter()
            .filter(|(d, v)| v.is_some() && scanned(d))
            .map(|(d, _)| d),
    );
    gone.retain(|d| !unreadable.covers(d));
    gone.sort();
    gone.dedup();
    // A dead-lettered document whose file went (or whose source is no
    // longer configured) while no ragd looked: neither the store nor the
    // ledger knows it, so no deletion would ever settle its entries, and
    // they would wait for a replay of nothing for good.
    for d in args.dlq.waiting_docs() {
        if scanned(&d) && !unreadable.covers(&d) && !has_version(args, &d) {
            settle_dead_letters(args, &d, None, Settled::Deleted);
        }
    }
    Scanned {
        gone,
        unseen: hung,
        unreadable: unreadable_roots,
    }
}

/// The documents hidden at start for a changed partition rule (their
/// known version is [`crate::indexer::HIDDEN`]) that a partial scan did
/// not see.
fn hidden_elsewhere(args: &WatcherArgs, seen: &HashSet<String>) -> Vec<String> {
    (args.known.lock().iter())
        .filter(|(id, v)| v.as_str() == crate::indexer::HIDDEN && !seen.contains(*id))
        .map(|(id, _)| id.clone())
        .collect()
}

/// Sends an admitted job on. A port only fails for good (a bus that waits
/// out outages refused the message itself); the job then goes to the DLQ so
/// it is not silently lost.
async fn hand_on<T: Job + serde::Serialize>(args: &WatcherArgs, port: &Port<T>, job: T) {
    // The failure path needs the job back; a clone of a DocMeta or a
    // deletion is cheaper than building its DLQ payload for every document.
    if let Err(e) = port.send(job.clone()).await {
        let error = format!("{e:#}");
        let (id, version) = (job.doc_id(), job.version());
        tracing::error!(doc = %id, "could not hand the document on: {error}");
        let entry = DlqEntry::for_job("source_watcher", &error, 1, &job);
        if let Err(e) = args.dlq.push(entry) {
            tracing::error!(doc = %id, "DLQ write failed too: {e:#}");
        }
        args.ledger.finish(
            id,
            version,
            Outcome::DeadLettered(format!("source_watcher: {error}")),
        );
    }
}

async fn remove(args: &WatcherArgs, doc_id: &str) {
    // Whatever saw it gone, a share unmounted meanwhile is no deletion.
    // (The watcher then waits for it: see `WatcherState::unmounted`.)
    let unmounted = match source_of_doc(&args.sources, doc_id) {
        Some((s, _)) => s.mount_point && !s.present().await,
        None => false,
    };
    if unmounted {
        tracing::debug!(doc = %doc_id, "not deleted: its source is not mounted");
        return;
    }
    let seq = crate::messages::next_seq();
    if args.ledger.admit_deletion(doc_id, seq).await {
        args.known.lock().remove(doc_id);
        let job = IndexJob::Delete {
            doc_id: doc_id.to_string(),
            seq,
        };
        // (Settled first: a hand-on that fails dead-letters the deletion,
        // and that entry must wait.)
        settle_dead_letters(args, doc_id, None, Settled::Deleted);
        hand_on(args, &args.index_q, job).await;
    }
}

/// Files probed per trip to the blocking pool when a walk finds many (a
/// scan, a folder moved in): each trip wakes a thread, and during a burst
/// those wake-ups land on the model's cores.
const PROBE_BATCH: usize = 32;

/// [`consider`] for many files (a walk's, or those waiting on the retry
/// list), probed [`PROBE_BATCH`] at a time. Returns the roots of the
/// sources that hung: in a watching node, their files after the batch
/// given up on are not looked at (that batch waits on the retry list):
/// the caller has the source scanned once it answers, rather than every
/// file of a large share waiting on the retry list meanwhile. (A one-shot
/// ingest records each as not read.)
async fn consider_all(args: &WatcherArgs, files: Vec<Candidate<'_>>) -> Vec<PathBuf> {
    let mut hanging: Vec<PathBuf> = Vec::new();
    let mut files = files.into_iter().peekable();
    while files.peek().is_some() {
        let mut batch: Vec<Candidate> = Vec::with_capacity(PROBE_BATCH);
        // (One source per batch: a hang is told per source.)
        while let Some(c) = files.next_if(|c| {
            batch
                .first()
                .is_none_or(|first| first.source.root == c.source.root)
        }) {
            if args.watch && hanging.contains(&c.source.root) {
                continue;
            }
            if supported(args, c.source, &c.path, &c.uri) {
                batch.push(c);
                if batch.len() == PROBE_BATCH {
                    break;
                }
            }
        }
        if batch.is_empty() {
            continue; // unsupported types, or a source that hung
        }
        let paths: Vec<PathBuf> = batch.iter().map(|c| c.path.clone()).collect();
        let max = args.max_file_bytes;
        let probes = on_source(&batch[0].source.root, args.hang_after, move |done| {
            // (Each file counts: one too big or not a file reads nothing.)
            let each = |p: &PathBuf| {
                let probed = probe(p, max, done);
                done.fetch_add(1, Ordering::SeqCst);
                probed
            };
            paths.iter().map(each).collect::<Vec<_>>()
        })
        .await;
        if probes.is_none() && !hanging.contains(&batch[0].source.root) {
            hanging.push(batch[0].source.root.clone());
        }
        let mut probes = probes.map(Vec::into_iter);
        for c in batch {
            let probed = probes.as_mut().and_then(Iterator::next);
            let probed = probed.unwrap_or_else(|| Err(hung()));
            decide(args, c.source, &c.path, &c.uri, c.look, probed).await;
        }
    }
    hanging
}

/// Whether ragd parses this kind of file; an unsupported one is recorded
/// as skipped.
fn supported(args: &WatcherArgs, source: &SourceSpec, path: &Path, uri: &str) -> bool {
    if path.to_str().is_none() {
        // Its id would be a lossy rendering of the name, which another
        // file's name can share: the two would replace each other.
        args.ledger.record_skipped(
            &doc_id(source, uri),
            "the file's name is not valid UTF-8".into(),
        );
        return false;
    }
    if crate::chunker::parse::Format::from_path(path).is_some() {
        return true;
    }
    let reason = format!(
        "unsupported file type {:?}",
        path.extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    args.ledger.record_skipped(&doc_id(source, uri), reason);
    false
}

/// [`consider_all`] of one file: the root of its source if that hangs.
async fn consider(
    args: &WatcherArgs,
    source: &SourceSpec,
    path: &Path,
    uri: &str,
    look: Look,
) -> Vec<PathBuf> {
    let file = Candidate {
        source,
        path: path.to_path_buf(),
        uri: uri.to_string(),
        look,
    };
    // (A hang leaves it on the retry list: see `decide`.)
    consider_all(args, vec![file]).await
}

/// What to do with a probed file: nothing (unchanged, in flight, or in the
/// DLQ), wait for its writer to pause, skip it (too big), or admit its
/// version and hand it on.
async fn decide(
    args: &WatcherArgs,
    source: &SourceSpec,
    path: &Path,
    uri: &str,
    look: Look,
    probed: std::io::Result<Probe>,
) {
    let id = doc_id(source, uri);
    // (Whatever this look decides, it is the file's latest.)
    let written_since = args.being_written.lock().remove(path).map(|w| w.since);
    let skip = |reason: String| skip_whole(args, &id, reason);
    let passing =
        matches!(&probed, Err(e) if !gone(e) && e.kind() != std::io::ErrorKind::PermissionDenied);
    let waiting = if passing {
        None
    } else {
        args.retry.lock().remove(path)
    };
    if waiting.is_some() {
        tracing::info!("{} reads again", path.display());
    }
    // (One waiting forced, a replay, is read as such whoever reads it:
    // a scan would find it unchanged, and the replay would be lost.)
    let force = look == Look::Forced || waiting.is_some_and(|(_, forced)| forced);
    let partition = source.partition_for(uri);
    let (size, version, modified) = match probed {
        Ok(Probe::Read {
            size,
            content,
            modified,
        }) => {
            let version = version_of(&content, &partition, &args.chunking);
            (size, version, modified)
        }
        Ok(Probe::TooBig(size)) => {
            // Never read a huge file just to hash it.
            let limit = args.max_file_bytes;
            return skip(format!(
                "file of {size} bytes is over the {limit} byte limit"
            ))
            .await;
        }
        // What the source can no longer read, or holds as something other
        // than a file, cannot stay in the index as it was: its old text
        // would be served with no way to update or delete it.
        Ok(Probe::NotAFile) => {
            let why = "not a regular file (a symbolic link, FIFO, socket or device): not followed";
            return skip(why.into()).await;
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return skip(format!("cannot read the file: {e}")).await;
        }
        Err(e) if is_hung(&e) => {
            // Unread is not unreadable: what the index has of it stays,
            // and it is read once its source answers, however long that
            // takes (no try counts). A one-shot ingest leaves it out.
            if args.watch {
                keep_for_later(args, path, force);
            } else {
                // (Recorded, so that the ingest's summary counts it; the
                // index keeps what it had of it.)
                let why = format!("not read: {e}; run the ingest again once it answers");
                tracing::warn!("{}: {why}", path.display());
                args.ledger.record_skipped(&id, why);
            }
            return;
        }
        Err(e) if !gone(&e) => {
            // Too many open files in a burst, an I/O error: it may read
            // next time, and no event may ever come for it. (A one-shot
            // ingest does not wait for that.)
            let tries = {
                let mut retry = args.retry.lock();
                let entry = retry.entry(path.to_path_buf()).or_insert((0, force));
                entry.0 += 1;
                entry.1 |= force;
                entry.0
            };
            if args.watch && tries < READ_TRIES {
                tracing::warn!("cannot read {}: {e}; trying again", path.display());
                return;
            }
            args.retry.lock().remove(path);
            return skip(format!("cannot read the file: {e}")).await;
        }
        Err(_) => {
            // Vanished; its removal event follows. (A replay waits a while.)
            if force {
                let tries = waiting.map_or(0, |(t, _)| t);
                replay_waits(&mut args.retry.lock(), path, tries);
            }
            return;
        }
    };
    // A version the chunker could not read as it was seen, found as it
    // was, is read again (see `Ledger::ended_unread`).
    let unread = args.ledger.ended_unread(&id, &version);
    // (Either way the watcher has it now: on a node with the index role
    // too, the ledger may have it from the store or from a job alone.)
    if !force && !unread && args.known.lock().get(&id) == Some(&version) {
        if !args.ledger.watch(&id) {
            args.ledger.record(&id, Some(&version), Outcome::Indexed);
        }
        // Indexed as it is: entries of its other versions need no replay
        // (left waiting by a ragd from before entries were settled, or by
        // a settle that could not be written).
        settle_dead_letters(args, &id, Some(&version), Settled::Superseded);
        return;
    }
    if !force && !unread && args.ledger.latest_version(&id).as_deref() == Some(version.as_str()) {
        // This version is in flight or already ended (e.g. skipped).
        args.ledger.watch(&id);
        return;
    }
    // A version that already went to the DLQ stays there until replayed.
    // (A replay is read whatever other entry of the version waits: two
    // ingest nodes on one share each dead-letter what fails.)
    if let Some(e) = args.dlq.pending(&id, &version).filter(|_| !force) {
        args.ledger.record(
            &id,
            Some(&version),
            Outcome::DeadLettered(format!("{}: {}", e.stage, e.error)),
        );
        return;
    }
    if look == Look::Event && !force && args.watch && !args.max_write_wait.is_zero() {
        if let Some(quiet_in) = being_written(modified, args.debounce) {
            let now = tokio::time::Instant::now();
            let since = written_since.unwrap_or(now);
            if now.duration_since(since) < args.max_write_wait {
                let due = now + quiet_in;
                let waiting = BeingWritten { since, due };
                args.being_written
                    .lock()
                    .insert(path.to_path_buf(), waiting);
                tracing::debug!("{} is being written: read once it pauses", path.display());
                return;
            }
            tracing::debug!(
                "{} has been written to for {:?} without a pause: read as it is now",
                path.display(),
                args.max_write_wait
            );
        }
    }
    let doc = DocMeta {
        doc_id: id.clone(),
        source: source.name.clone(),
        uri: uri.to_string(),
        path: path.to_path_buf(),
        version: version.clone(),
        partition,
        size,
        seq: crate::messages::next_seq(),
    };
    if !force && dead_lettered_elsewhere(args, &doc) {
        return;
    }
    if args
        .ledger
        .admit_at(&id, Some(&version), doc.seq, size)
        .await
    {
        args.known.lock().insert(id.clone(), version.clone());
        args.stats.processed();
        hand_on(args, &args.chunk_q, doc).await;
        settle_dead_letters(args, &id, Some(&version), Settled::Superseded);
    }
}

/// Whether `doc`'s version (its content, in its partition) waits in the
/// DLQ under another name, a copy of a dead-lettered file or the file
/// moved: `doc` then goes to the DLQ too, with an entry of its own that a
/// replay tries again, rather than failing every attempt once more (a PDF
/// past its time budget takes minutes of a chunker's time to do so).
fn dead_lettered_elsewhere(args: &WatcherArgs, doc: &DocMeta) -> bool {
    const NOT_TRIED: &str = " [not tried: ";
    let Some(first) = args.dlq.pending_version(&doc.version) else {
        return false;
    };
    if first.doc_id == doc.doc_id {
        return false; // (its own entry: `pending` answered for that)
    }
    // (`first` may be such an entry itself, its original since settled.)
    let cause = first.error.split(NOT_TRIED).next().unwrap_or_default();
    let error = format!(
        "{cause}{NOT_TRIED}the same content failed every attempt as {} (DLQ entry {})]",
        first.doc_id, first.id
    );
    let entry = DlqEntry::for_job(&first.stage, &error, 0, doc);
    match args.dlq.push(entry) {
        Ok(n) => {
            tracing::warn!(
                doc = %doc.doc_id,
                "dead-lettered as DLQ entry {n}: the same content failed every attempt as {} \
                 (DLQ entry {}); `ragd dlq replay {n}` tries it again",
                first.doc_id,
                first.id
            );
            let why = format!("{}: {error}", first.stage);
            (args.ledger).record(&doc.doc_id, Some(&doc.version), Outcome::DeadLettered(why));
            settle_dead_letters(args, &doc.doc_id, Some(&doc.version), Settled::Superseded);
            true
        }
        Err(e) => {
            // Tried, then: it goes to the DLQ by itself should it fail.
            tracing::warn!(doc = %doc.doc_id, "could not dead-letter it with its copy: {e:#}");
            false
        }
    }
}

/// The document's DLQ entries of other versions than `current` need no
/// replay now (see [`Settled`]): marked so, they leave the list of what
/// waits for an operator. (The usual document has none: answered from
/// memory.)
fn settle_dead_letters(args: &WatcherArgs, id: &str, current: Option<&str>, how: Settled) {
    match args.dlq.settle(id, current, how) {
        Ok(ids) if !ids.is_empty() => {
            tracing::info!(doc = %id, ?ids, "its dead-lettered versions need no replay now: {how:?}");
        }
        Ok(_) => {}
        // They go on waiting: an operator's replay finds the file as it is.
        Err(e) => tracing::warn!(doc = %id, "could not mark its DLQ entries settled: {e:#}"),
    }
}

/// A replay of the file at `path` found it gone, after `tries` tries: it
/// waits on [`WatcherArgs::retry`], forced, a try counted, up to
/// [`READ_TRIES`]. A save that deletes and writes has it back in a moment,
/// and the read then, from its event, would find the dead-lettered
/// version unchanged, and the replay would be lost.
fn replay_waits(retry: &mut HashMap<PathBuf, (u32, bool)>, path: &Path, tries: u32) {
    if tries + 1 < READ_TRIES {
        retry.insert(path.to_path_buf(), (tries + 1, true));
    } else {
        tracing::warn!(
            "{} stayed gone: its replay is dropped (its deletion goes as any other)",
            path.display()
        );
        retry.remove(path);
    }
}

/// Puts `path` on [`WatcherArgs::retry`] without counting a try: its
/// source hangs (see [`on_source`]).
fn keep_for_later(args: &WatcherArgs, path: &Path, force: bool) {
    let mut retry = args.retry.lock();
    retry.entry(path.to_path_buf()).or_insert((0, force)).1 |= force;
}

/// Records `id` skipped as a whole: nothing of it may stay in the index
/// either (its old text would be served with no way to update or delete
/// it).
async fn skip_whole(args: &WatcherArgs, id: &str, reason: String) {
    if args.known.lock().contains_key(id) {
        remove(args, id).await;
    }
    args.ledger.record_skipped(id, reason);
}

enum Probe {
    /// `content`: the sha256 of the file's bytes; `modified`: its
    /// modification time, where the file system keeps one.
    Read {
        size: u64,
        content: [u8; 32],
        modified: Option<std::time::SystemTime>,
    },
    TooBig(u64),
    /// A link, a FIFO, a socket or a device: never opened.
    NotAFile,
}

/// A file's size and content version, or only its size when it is over
/// `max` bytes (checked on the open file, so one that grows meanwhile is
/// still never read past the limit).
fn probe(path: &Path, max: u64, progress: &AtomicU64) -> std::io::Result<Probe> {
    // Opening a link would read its target, which may lie outside the
    // source (and its partition); opening a FIFO would block.
    if !std::fs::symlink_metadata(path)?.is_file() {
        return Ok(Probe::NotAFile);
    }
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            // Unreadable (permissions): its size still says whether it is
            // to be skipped, and taken out of the index if it was in.
            return match std::fs::metadata(path) {
                Ok(m) if m.len() > max => Ok(Probe::TooBig(m.len())),
                _ => Err(e),
            };
        }
    };
    let metadata = file.metadata()?;
    let size = metadata.len();
    if size > max {
        return Ok(Probe::TooBig(size));
    }
    let Some(bytes) = read_counting(&file, max, progress)? else {
        // It grew while being read: its size now.
        let now = file.metadata().map_or(max + 1, |m| m.len());
        return Ok(Probe::TooBig(now));
    };
    metrics::counter!("ragd_watcher_files_read_total").increment(1);
    Ok(Probe::Read {
        size: bytes.len() as u64,
        content: Sha256::digest(&bytes).into(),
        modified: metadata.modified().ok(),
    })
}

/// How long until a file last modified at `modified` has been left alone
/// for `quiet`, or `None` if it has been. The debouncer hands an event on
/// a debounce after it came, so a file written once is never waited for;
/// only one written again since is. A modification time ahead of this
/// clock (another machine's, on a share) says nothing: not waited for.
fn being_written(modified: Option<std::time::SystemTime>, quiet: Duration) -> Option<Duration> {
    let age = std::time::SystemTime::now()
        .duration_since(modified?)
        .ok()?;
    quiet.checked_sub(age).filter(|left| !left.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::DocStatus;

    /// The chunking every version of these tests is made with.
    const CHUNKING: &str = "test chunking";

    #[test]
    fn hidden_and_temporary_files_are_ignored() {
        for p in [
            ".git/config",
            "a/.hidden.md",
            "x.md~",
            "doc.md.swp",
            "f.part",
            "~$doc.txt",
            "#a.md#",
        ] {
            assert!(ignored(Path::new(p)), "{p}");
        }
        for p in ["a/b.md", "notes.txt", "x.pdf"] {
            assert!(!ignored(Path::new(p)), "{p}");
        }
    }

    /// A tree the kernel cannot watch is polled, with the reason and what
    /// to do about it; the others keep their events or configured polling.
    #[test]
    fn a_tree_without_file_events_is_polled() {
        let source = |name: &str, poll: Option<Duration>| SourceSpec {
            name: name.into(),
            root: PathBuf::from("/srv").join(name),
            partition: Partition {
                division: "eng".into(),
                access_level: "internal".into(),
            },
            rules: vec![],
            poll,
            mount_point: false,
        };
        let minute = Duration::from_secs(60);
        let sources = [
            source("kb", None),
            source("big", None),
            source("nfs", Some(minute)),
            source("many", None),
        ];
        let mut tried = vec![];
        let plan: Vec<_> = sources
            .iter()
            .map(|s| {
                plan_watch(s, |s| {
                    tried.push(s.name.clone());
                    match s.name.as_str() {
                        "big" => Err(notify::Error::new(notify::ErrorKind::MaxFilesWatch)),
                        // No inotify instance to spare.
                        "many" => Err(notify::Error::io(std::io::Error::from_raw_os_error(
                            rustix::io::Errno::MFILE.raw_os_error(),
                        ))),
                        _ => Ok(()),
                    }
                })
            })
            .collect();
        assert_eq!(
            tried,
            ["kb", "big", "many"],
            "a polled source needs no kernel watch"
        );
        assert_eq!(plan[0], (None, None));
        assert_eq!(plan[2], (Some(minute), None));
        let (poll, why) = &plan[1];
        assert_eq!(*poll, Some(FALLBACK_POLL));
        let why = why.as_deref().unwrap();
        assert!(
            why.contains("/srv/big") && why.contains("fs.inotify.max_user_watches"),
            "{why}"
        );
        let (poll, why) = &plan[3];
        assert_eq!(*poll, Some(FALLBACK_POLL));
        let why = why.as_deref().unwrap();
        assert!(why.contains("fs.inotify.max_user_instances"), "{why}");
    }

    #[test]
    fn rules_map_sub_paths_to_partitions() {
        let part = |d: &str, a: &str| Partition {
            division: d.into(),
            access_level: a.into(),
        };
        let s = SourceSpec {
            name: "kb".into(),
            root: "/kb".into(),
            partition: part("eng", "internal"),
            // The general rule first: the specific one still wins.
            rules: vec![
                PartitionRule {
                    prefix: "hr".into(),
                    partition: part("hr", "internal"),
                },
                PartitionRule {
                    prefix: "/hr/confidential/".into(),
                    partition: part("hr", "confidential"),
                },
            ],
            poll: None,
            mount_point: false,
        };
        assert_eq!(
            s.partition_for("hr/confidential/pay.md"),
            part("hr", "confidential")
        );
        assert_eq!(
            s.partition_for("hr/confidential"),
            part("hr", "confidential")
        );
        assert_eq!(s.partition_for("hr/leave.md"), part("hr", "internal"));
        assert_eq!(
            s.partition_for("hr/confidentiality.md"),
            part("hr", "internal")
        );
        assert_eq!(s.partition_for("hrx/a.md"), part("eng", "internal"));
        assert_eq!(s.partition_for("readme.md"), part("eng", "internal"));
    }

    #[test]
    fn reads_are_not_changes() {
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
        use notify::EventKind;
        for (kind, change) in [
            (EventKind::Access(AccessKind::Open(AccessMode::Any)), false),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                false,
            ),
            (EventKind::Access(AccessKind::Read), false),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                true,
            ),
            (EventKind::Create(CreateKind::File), true),
            (EventKind::Modify(ModifyKind::Any), true),
            (EventKind::Remove(notify::event::RemoveKind::File), true),
        ] {
            assert_eq!(may_change_content(&kind), change, "{kind:?}");
        }
    }

    #[test]
    fn probe_reads_within_the_limit_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "hello").unwrap();
        let progress = AtomicU64::new(0);
        match probe(&p, 5, &progress).unwrap() {
            Probe::Read { size, content, .. } => {
                assert_eq!(size, 5);
                assert_eq!(content, <[u8; 32]>::from(Sha256::digest(b"hello")));
            }
            _ => panic!("5 bytes fit a 5-byte limit"),
        }
        assert!(matches!(probe(&p, 4, &progress).unwrap(), Probe::TooBig(5)));
        assert!(probe(&dir.path().join("gone.txt"), 5, &progress).is_err());
        // A large file's read counts its progress as it goes (each MiB):
        // read slowly from a share, it is not taken for a hang.
        let big = dir.path().join("big.txt");
        std::fs::write(&big, vec![b'x'; 3 << 20]).unwrap();
        let progress = AtomicU64::new(0);
        assert!(
            matches!(probe(&big, 4 << 20, &progress).unwrap(), Probe::Read { size, .. } if size == 3 << 20)
        );
        assert_eq!(progress.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn versions_follow_content_and_partition() {
        let part = |d: &str, l: &str| Partition {
            division: d.into(),
            access_level: l.into(),
        };
        let hr = part("hr", "internal");
        assert_eq!(
            doc_version(b"a", &hr, CHUNKING),
            doc_version(b"a", &hr, CHUNKING)
        );
        assert_ne!(
            doc_version(b"a", &hr, CHUNKING),
            doc_version(b"b", &hr, CHUNKING)
        );
        assert_ne!(
            doc_version(b"a", &hr, CHUNKING),
            doc_version(b"a", &part("hr", "confidential"), CHUNKING)
        );
        assert_ne!(
            doc_version(b"a", &hr, CHUNKING),
            doc_version(b"a", &part("eng", "internal"), CHUNKING)
        );
        // The fields are delimited: moving a letter across them is a change.
        assert_ne!(
            doc_version(b"a", &part("ab", "c"), CHUNKING),
            doc_version(b"a", &part("a", "bc"), CHUNKING)
        );
        assert_eq!(doc_version(b"a", &hr, CHUNKING).len(), 32);
        // Chunked another way, the same file is another version.
        assert_ne!(
            doc_version(b"a", &hr, CHUNKING),
            doc_version(b"a", &hr, "chunked another way")
        );
    }

    /// A watcher's surroundings: a source `kb` in a temporary folder, and
    /// the queues it hands documents and deletions to.
    struct Rig {
        dir: tempfile::TempDir,
        root: PathBuf,
        ledger: Arc<Ledger>,
        known: Arc<parking_lot::Mutex<BTreeMap<String, String>>>,
        chunk_q: Arc<crate::pool::PoolQueue<DocMeta>>,
        index_q: Arc<crate::pool::PoolQueue<IndexJob>>,
        stats: Arc<ActorStats>,
        /// [`SourceSpec::mount_point`].
        mount_point: bool,
    }

    impl Rig {
        fn new() -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("kb");
            std::fs::create_dir_all(&root).unwrap();
            let root = root.canonicalize().unwrap();
            Rig {
                dir,
                root,
                ledger: Ledger::new(1024),
                known: Default::default(),
                chunk_q: crate::pool::PoolQueue::new(Arc::new(ActorStats::default())),
                index_q: crate::pool::PoolQueue::new(Arc::new(ActorStats::default())),
                stats: Arc::new(ActorStats::default()),
                mount_point: false,
            }
        }

        fn source(&self) -> SourceSpec {
            SourceSpec {
                name: "kb".into(),
                root: self.root.clone(),
                partition: Partition {
                    division: "eng".into(),
                    access_level: "internal".into(),
                },
                rules: vec![],
                poll: None,
                mount_point: self.mount_point,
            }
        }

        /// Another source beside the rig's, its root made.
        fn other_source(&self, name: &str) -> SourceSpec {
            let root = self.dir.path().join(name);
            std::fs::create_dir_all(&root).unwrap();
            SourceSpec {
                name: name.into(),
                root: root.canonicalize().unwrap(),
                ..self.source()
            }
        }

        fn args(&self, watch: bool) -> WatcherArgs {
            WatcherArgs {
                sources: vec![self.source()],
                chunking: CHUNKING.into(),
                ledger: self.ledger.clone(),
                dlq: Arc::new(
                    crate::dlq::FileDlq::open(self.dir.path().join("dlq.jsonl")).unwrap(),
                ),
                chunk_q: Port::Local(self.chunk_q.clone()),
                index_q: Port::Local(self.index_q.clone()),
                known: self.known.clone(),
                max_file_bytes: 1 << 20,
                watch,
                debounce: Duration::from_millis(50),
                stats: self.stats.clone(),
                scanned: Default::default(),
                only: vec![],
                retry: Default::default(),
                delete_grace: Duration::ZERO,
                hang_after: HANG_AFTER,
                health: Default::default(),
                max_write_wait: Duration::from_secs(30),
                being_written: Default::default(),
                others_sources: false,
            }
        }

        fn write(&self, rel: &str, text: &str) {
            let p = self.root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }

        /// Starts a watcher and waits for its first scan; returns it with
        /// the documents that scan handed on.
        async fn start(&self, watch: bool) -> (ActorRef<WatchMsg>, Vec<String>) {
            self.start_with(self.args(watch)).await
        }

        /// [`Rig::start`] with `args` (from [`Rig::args`], changed).
        async fn start_with(&self, args: WatcherArgs) -> (ActorRef<WatchMsg>, Vec<String>) {
            let watch = args.watch;
            let (watcher, _) = Actor::spawn(None, SourceWatcher, args).await.unwrap();
            let want = if watch { "watching" } else { "scanned" };
            wait_for(|| self.stats.status() == want).await;
            (watcher, self.handed())
        }

        /// As the pipeline does when `id` goes to the DLQ: the version the
        /// watcher handed on ends dead-lettered.
        fn dead_letter(&self, id: &str) {
            let version = self.known.lock()[id].clone();
            let failed = Outcome::DeadLettered("chunker: boom".into());
            self.ledger.finish(id, Some(&version), failed);
        }

        /// The documents handed on to be chunked since the last call.
        fn handed(&self) -> Vec<String> {
            let mut docs: Vec<String> =
                self.chunk_q.drain().into_iter().map(|d| d.doc_id).collect();
            docs.sort();
            docs
        }

        /// The documents whose deletion was handed on since the last call.
        fn deleted(&self) -> Vec<String> {
            let mut ids: Vec<String> = self
                .index_q
                .drain()
                .into_iter()
                .filter_map(|j| match j {
                    IndexJob::Delete { doc_id, .. } => Some(doc_id),
                    _ => None,
                })
                .collect();
            ids.sort();
            ids
        }
    }

    async fn wait_for(mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The watcher kept running, and watches the tree anew: once it says
    /// why (`why`) and its scan is done, a file written at `rel` is handed
    /// on (by the new watch: nothing else looks).
    async fn still_watching(rig: &Rig, watcher: &ActorRef<WatchMsg>, why: &str, rel: &str) {
        wait_for(|| {
            let error = rig.stats.last_error().unwrap_or_default();
            error.contains(why)
                && error.contains("watched anew")
                && rig.stats.status() == "watching"
        })
        .await;
        // (Its status may still say watching before that scan starts: a
        // scan of this small tree is done well within this.)
        tokio::time::sleep(Duration::from_millis(500)).await;
        rig.write(rel, "# New\n\nwritten after the tree was watched anew");
        let id = format!("kb:{rel}");
        wait_for(|| rig.chunk_q.drain().iter().any(|d| d.doc_id == id)).await;
        assert!(matches!(watcher.get_status(), ractor::ActorStatus::Running));
    }

    /// An event as the debouncer hands it on.
    fn event(kind: notify::EventKind, path: &Path) -> WatchMsg {
        event_of(0, notify::Event::new(kind).add_path(path.to_path_buf()))
    }

    /// `e` as the watch of source `i` hands it on.
    fn event_of(i: usize, e: notify::Event) -> WatchMsg {
        let e = notify_debouncer_full::DebouncedEvent::new(e, std::time::Instant::now());
        WatchMsg::Fs(i, Ok(vec![e]))
    }

    /// The kernel's queue overflowed: events of the kb source were lost.
    fn overflow() -> WatchMsg {
        let e = notify::Event::new(notify::EventKind::Other).set_flag(notify::event::Flag::Rescan);
        event_of(0, e)
    }

    /// A file saved over by a rename (as editors and sync tools save), then
    /// deleted, within one debounce window. notify-debouncer-full 0.6 took
    /// the rename for a file created in the window and dropped it with the
    /// removal: no event came at all, and the document stayed indexed.
    #[tokio::test]
    async fn a_file_saved_over_then_deleted_at_once_is_deleted() {
        let rig = Rig::new();
        let files = ["hr/a.md", "hr/b.md", "eng/c.md", "eng/d.md"];
        // (Each its own text: a deleted file whose text is on its way in
        // under another name waits for it, see
        // `a_moved_file_keeps_its_old_name_until_the_new_one_is_through`.)
        for f in files {
            rig.write(f, &format!("# A\n\nold {f}"));
        }
        let mut args = rig.args(true);
        args.debounce = Duration::from_millis(300);
        args.delete_grace = Duration::from_secs(2);
        let (watcher, scanned) = rig.start_with(args).await;
        assert_eq!(scanned.len(), 4);
        // (The scan's reads are events too: once they are handed on, the
        // debouncer holds nothing of these paths.)
        tokio::time::sleep(Duration::from_secs(1)).await;
        for f in files {
            let file = rig.root.join(f);
            let tmp = file.with_file_name(format!(
                ".{}.tmp",
                file.file_name().unwrap().to_string_lossy()
            ));
            std::fs::write(&tmp, format!("# A\n\nnew {f}")).unwrap();
            std::fs::rename(&tmp, &file).unwrap();
        }
        std::fs::remove_file(rig.root.join("hr/a.md")).unwrap();
        std::fs::remove_file(rig.root.join("eng/c.md")).unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(rig.handed(), ["kb:eng/d.md", "kb:hr/b.md"]);
        assert_eq!(rig.deleted(), ["kb:eng/c.md", "kb:hr/a.md"]);
        watcher.stop(None);
    }

    /// A file renamed or moved keeps its old document until the new one,
    /// of the same version, is through the pipeline: no gap in search, and
    /// the old points are there for the embedder to reuse. One moved into
    /// another partition is a new version, and its old document goes after
    /// the grace as any (its readers may not see the new place).
    #[tokio::test]
    async fn a_moved_file_keeps_its_old_name_until_the_new_one_is_through() {
        let rig = Rig::new();
        rig.write("a.md", "# A\n\nthe text of a");
        rig.write("c.md", "# C\n\nthe text of c");
        let mut args = rig.args(true);
        args.delete_grace = Duration::from_millis(300);
        args.sources[0].rules.push(PartitionRule {
            prefix: "secret".into(),
            partition: Partition {
                division: "eng".into(),
                access_level: "secret".into(),
            },
        });
        let (watcher, scanned) = rig.start_with(args).await;
        assert_eq!(scanned, ["kb:a.md", "kb:c.md"]);
        let indexed = |id: &str| {
            let version = rig.known.lock()[id].clone();
            rig.ledger.finish(id, Some(&version), Outcome::Indexed);
        };
        indexed("kb:a.md");
        indexed("kb:c.md");
        // (The scan's reads are events too.)
        tokio::time::sleep(Duration::from_millis(300)).await;
        for folder in ["moved", "secret"] {
            std::fs::create_dir(rig.root.join(folder)).unwrap();
        }
        std::fs::rename(rig.root.join("a.md"), rig.root.join("moved/a.md")).unwrap();
        std::fs::rename(rig.root.join("c.md"), rig.root.join("secret/c.md")).unwrap();
        let mut handed = Vec::new();
        wait_for(|| {
            handed.extend(rig.handed());
            handed.len() == 2
        })
        .await;
        handed.sort();
        assert_eq!(handed, ["kb:moved/a.md", "kb:secret/c.md"]);

        // Several graces on, with both new names still on their way.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            rig.deleted(),
            ["kb:c.md"],
            "only the one that changed partition"
        );
        indexed("kb:moved/a.md");
        let mut deleted = Vec::new();
        wait_for(|| {
            deleted.extend(rig.deleted());
            !deleted.is_empty()
        })
        .await;
        assert_eq!(deleted, ["kb:a.md"]);
        watcher.stop(None);
    }

    /// A partial scan (`ragd ingest PATH`) also takes the documents a
    /// changed partition rule hid at start outside PATH: they are out of
    /// every search until indexed anew, or deleted, gone. So go those of a
    /// source no longer configured. Nothing else outside PATH is looked at.
    #[tokio::test]
    async fn a_partial_scan_also_indexes_what_a_rule_change_hid_elsewhere() {
        let rig = Rig::new();
        for (rel, text) in [
            ("given/a.md", "# A\n\nthe text of a"),
            ("moved/b.md", "# B\n\nthe text of b"),
            ("changed/c.md", "# C\n\nthe text of c"),
        ] {
            rig.write(rel, text);
        }
        let hidden = crate::indexer::HIDDEN.to_string();
        for (id, version) in [
            ("kb:moved/b.md", hidden.clone()),
            ("kb:gone/d.md", hidden),
            ("wiki:e.md", "v0".into()),
            // Changed, not hidden: for a scan of its own folder.
            ("kb:changed/c.md", "v0".into()),
            // Gone, not hidden: a partial scan cannot tell.
            ("kb:f.md", "v0".into()),
        ] {
            rig.known.lock().insert(id.into(), version);
        }
        let mut args = rig.args(false);
        args.only = vec![rig.root.join("given")];
        let (watcher, _) = Actor::spawn(None, SourceWatcher, args).await.unwrap();
        let mut handed = Vec::new();
        wait_for(|| {
            handed.extend(rig.handed());
            handed.len() == 2
        })
        .await;
        handed.sort();
        assert_eq!(handed, ["kb:given/a.md", "kb:moved/b.md"]);
        // (The deletions wait until those are through: `waits_for_moves`.)
        for id in handed {
            let version = rig.known.lock()[&id].clone();
            rig.ledger.finish(&id, Some(&version), Outcome::Indexed);
        }
        wait_for(|| rig.stats.status() == "scanned").await;
        assert_eq!(rig.deleted(), ["kb:gone/d.md", "wiki:e.md"]);
        watcher.stop(None);
    }

    /// A one-time scan (`ragd ingest`) after a file moved: the old name is
    /// deleted once the new one is through (its embedding reuses the old
    /// name's vectors), and the scan is done only then. Other deletions
    /// wait with it: the run ends no sooner either way.
    #[tokio::test]
    async fn a_one_shot_scan_deletes_a_moved_file_s_old_name_after_its_new_one() {
        let rig = Rig::new();
        let (a, b) = ("# A\n\nthe text of a", "# B\n\nthe text of b");
        rig.write("moved/a.md", a);
        rig.write("b.md", b);
        // What the store held after the last run.
        for (id, version) in [
            ("kb:a.md", version_in_rig(&rig, a)),
            ("kb:b.md", version_in_rig(&rig, b)),
            ("kb:gone.md", "v0".into()),
        ] {
            rig.known.lock().insert(id.into(), version);
        }
        let (watcher, _) = Actor::spawn(None, SourceWatcher, rig.args(false))
            .await
            .unwrap();
        let mut handed = Vec::new();
        wait_for(|| {
            handed.extend(rig.handed());
            !handed.is_empty()
        })
        .await;
        assert_eq!(handed, ["kb:moved/a.md"], "b.md is indexed as it is");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            rig.deleted(),
            Vec::<String>::new(),
            "before the new name was through"
        );
        assert_eq!(rig.stats.status(), "scanning");
        let version = rig.known.lock()["kb:moved/a.md"].clone();
        rig.ledger
            .finish("kb:moved/a.md", Some(&version), Outcome::Indexed);
        wait_for(|| rig.stats.status() == "scanned").await;
        assert_eq!(rig.deleted(), ["kb:a.md", "kb:gone.md"]);
        watcher.stop(None);
    }

    /// The versions of `id` handed on to be chunked since the last look.
    fn versions_handed(rig: &Rig, id: &str) -> Vec<String> {
        let handed = rig.chunk_q.drain().into_iter();
        handed
            .filter(|d| d.doc_id == id)
            .map(|d| d.version)
            .collect()
    }

    /// The version the watcher gives `text` in the rig's source.
    fn version_in_rig(rig: &Rig, text: &str) -> String {
        doc_version(text.as_bytes(), &rig.source().partition, CHUNKING)
    }

    /// A file copied in slowly: written to every 30 ms for over a second,
    /// well within the debounce each time. Each event finds it still being
    /// written, so it is read once, whole, after the last write (before,
    /// every debounce handed on a version, each chunked and embedded).
    #[tokio::test]
    async fn a_file_copied_in_slowly_is_read_once_it_is_whole() {
        let rig = Rig::new();
        let mut args = rig.args(true);
        args.debounce = Duration::from_millis(300);
        let waiting = args.being_written.clone();
        let (watcher, _) = rig.start_with(args).await;
        let path = rig.root.join("copy.md");
        let mut text = String::from("# Copied\n\n");
        let mut file = std::fs::File::create(&path).unwrap();
        std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
        for i in 0..40 {
            let line = format!("Line {i} of a file that arrives a little at a time.\n");
            std::io::Write::write_all(&mut file, line.as_bytes()).unwrap();
            text.push_str(&line);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        drop(file);
        let mut handed = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            handed.extend(versions_handed(&rig, "kb:copy.md"));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(handed, [version_in_rig(&rig, &text)], "read once, whole");
        assert!(waiting.lock().is_empty());
        watcher.stop(None);
    }

    /// A file written to without a pause (a log) is still read, once each
    /// max_write_wait, and as it is once the writes stop.
    #[tokio::test]
    async fn a_file_written_without_a_pause_is_read_every_max_write_wait() {
        let rig = Rig::new();
        let mut args = rig.args(true);
        args.debounce = Duration::from_millis(200);
        args.max_write_wait = Duration::from_secs(1);
        let waiting = args.being_written.clone();
        let (watcher, _) = rig.start_with(args).await;
        let path = rig.root.join("app.log.txt");
        let mut text = String::new();
        let mut during = Vec::new();
        let started = std::time::Instant::now();
        let mut i = 0;
        while started.elapsed() < Duration::from_millis(3500) {
            text.push_str(&format!("line {i}: the service answered\n"));
            std::fs::write(&path, &text).unwrap();
            during.extend(versions_handed(&rig, "kb:app.log.txt"));
            i += 1;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        // One a second (at most one more: the first may come from the
        // create, before the file was seen being written).
        assert!(
            (2..=5).contains(&during.len()),
            "read {} times in 3.5 s of writes",
            during.len()
        );
        wait_for(|| waiting.lock().is_empty()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = versions_handed(&rig, "kb:app.log.txt");
        assert_eq!(after, [version_in_rig(&rig, &text)], "then as it ends");
        watcher.stop(None);
    }

    #[test]
    fn a_file_is_being_written_until_left_alone_for_the_quiet_time() {
        let quiet = Duration::from_millis(300);
        let now = std::time::SystemTime::now();
        let left = being_written(Some(now), quiet).unwrap();
        assert!(left > Duration::from_millis(250) && left <= quiet);
        let earlier = now - Duration::from_millis(200);
        assert!(being_written(Some(earlier), quiet).unwrap() <= Duration::from_millis(100));
        assert_eq!(being_written(Some(now - quiet), quiet), None);
        // A clock ahead (another machine's), or none: not waited for.
        assert_eq!(being_written(Some(now + quiet), quiet), None);
        assert_eq!(being_written(None, quiet), None);
    }

    /// The DLQ entry of `version` of `doc_id` that the chunker gave up on.
    fn chunker_failed(doc_id: &str, version: &str) -> DlqEntry {
        DlqEntry {
            id: 0,
            at: 0,
            stage: "chunker".into(),
            error: "boom".into(),
            attempts: 3,
            doc_id: doc_id.into(),
            version: Some(version.into()),
            payload: serde_json::json!({}),
            replayed: false,
            settled: None,
        }
    }

    /// A dead-lettered document that is then changed (fixed) or deleted
    /// leaves its entry settled: nothing is left to replay, and it no
    /// longer counts as waiting for an operator.
    #[tokio::test]
    async fn a_dead_lettered_document_changed_or_deleted_needs_no_replay() {
        let rig = Rig::new();
        rig.write("fixed.md", "# Broken");
        rig.write("gone.md", "# Broken too");
        let args = rig.args(true);
        let dlq = args.dlq.clone();
        let (watcher, scanned) = rig.start_with(args).await;
        assert_eq!(scanned.len(), 2);
        for id in ["kb:fixed.md", "kb:gone.md"] {
            let version = rig.known.lock()[id].clone();
            dlq.push(chunker_failed(id, &version)).unwrap();
            rig.dead_letter(id);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        rig.write("fixed.md", "# Fixed\n\nNow it parses.");
        std::fs::remove_file(rig.root.join("gone.md")).unwrap();
        wait_for(|| dlq.list().unwrap().iter().all(|e| e.settled.is_some())).await;
        let statuses: Vec<_> = dlq.list().unwrap().iter().map(|e| e.status()).collect();
        assert_eq!(statuses, ["superseded", "deleted"]);
        assert_eq!(rig.handed(), ["kb:fixed.md"]);
        assert_eq!(rig.deleted(), ["kb:gone.md"]);
        watcher.stop(None);
    }

    /// A copy of a dead-lettered file, or the file moved, is dead-lettered
    /// at once, with an entry of its own, rather than failing every
    /// attempt once more; a replay of that entry tries it again, and the
    /// moved file's old entry settles once its name is gone. Other content
    /// is taken in as usual.
    #[tokio::test]
    async fn the_content_of_a_dead_lettered_file_under_another_name_waits_in_the_dlq_too() {
        let rig = Rig::new();
        rig.write("broken.md", "# Broken");
        let mut args = rig.args(true);
        // (As the daemon's: the old name goes after its new one is seen.)
        args.delete_grace = Duration::from_millis(500);
        let dlq = args.dlq.clone();
        let (watcher, scanned) = rig.start_with(args).await;
        assert_eq!(scanned, ["kb:broken.md"]);
        let version = rig.known.lock()["kb:broken.md"].clone();
        dlq.push(chunker_failed("kb:broken.md", &version)).unwrap();
        rig.dead_letter("kb:broken.md");
        let broken = rig.root.join("broken.md");
        std::fs::copy(&broken, rig.root.join("copy.md")).unwrap();
        std::fs::create_dir_all(rig.root.join("moved")).unwrap();
        std::fs::rename(&broken, rig.root.join("moved/broken.md")).unwrap();
        rig.write("other.md", "# Other\n\nThis one parses.");
        let entries = || -> Vec<(String, &'static str, u32)> {
            let entries = dlq.list().unwrap().into_iter();
            entries
                .map(|e| (e.doc_id.clone(), e.status(), e.attempts))
                .collect()
        };
        wait_for(|| entries().len() == 3 && entries()[0].1 == "deleted").await;
        let mut got = entries();
        got[1..].sort();
        let want = [
            ("kb:broken.md", "deleted", 3),
            ("kb:copy.md", "pending", 0),
            ("kb:moved/broken.md", "pending", 0),
        ];
        assert_eq!(got, want.map(|(d, s, a)| (d.to_string(), s, a)));
        let copy = dlq
            .pending("kb:copy.md", &version)
            .expect("an entry of its own");
        assert!(copy.error.contains("kb:broken.md"), "{}", copy.error);
        assert_eq!(
            copy.payload["path"],
            rig.root.join("copy.md").to_str().unwrap()
        );
        for id in ["kb:copy.md", "kb:moved/broken.md"] {
            let status = rig.ledger.status(id);
            assert!(
                matches!(status, Some(DocStatus::DeadLettered(_))),
                "{id}: {status:?}"
            );
        }
        assert_eq!(
            rig.handed(),
            ["kb:other.md"],
            "tried again under a new name"
        );

        dlq.mark_replayed(copy.id).unwrap();
        let path = rig.root.join("copy.md");
        watcher
            .cast(WatchMsg::Replay("kb:copy.md".into(), path))
            .unwrap();
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["kb:copy.md"], "a replay tries it");
        watcher.stop(None);
    }

    /// An entry left waiting for a version the index no longer holds (by
    /// a ragd from before entries were settled) is settled by the scan
    /// that finds the document indexed as it is.
    #[tokio::test]
    async fn a_scan_settles_the_entries_of_an_indexed_document_s_old_versions() {
        let rig = Rig::new();
        rig.write("a.md", "# Fixed long ago");
        let args = rig.args(true);
        let version = doc_version(b"# Fixed long ago", &rig.source().partition, CHUNKING);
        rig.known.lock().insert("kb:a.md".into(), version.clone());
        let entry = |version: &str| chunker_failed("kb:a.md", version);
        // Its broken version, and one of the version now indexed (a stage
        // after the write failed on it: the pruner, say), which a replay
        // still has to finish.
        args.dlq.push(entry("v0")).unwrap();
        args.dlq.push(entry(&version)).unwrap();
        let dlq = args.dlq.clone();
        let (watcher, scanned) = rig.start_with(args).await;
        assert!(scanned.is_empty(), "indexed as it is: nothing to do");
        let statuses: Vec<_> = dlq.list().unwrap().iter().map(|e| e.status()).collect();
        assert_eq!(statuses, ["superseded", "pending"]);
        watcher.stop(None);
    }

    /// The entries of a dead-lettered document whose file went while no
    /// ragd looked (or whose source is no longer configured) are settled
    /// by the first scan: neither the store nor the ledger knows it, so no
    /// deletion would. Those of a file still there, or under a folder the
    /// scan could not read, or of a partial scan, wait on.
    #[tokio::test]
    async fn a_scan_settles_the_entries_of_dead_lettered_files_gone_meanwhile() {
        let rig = Rig::new();
        rig.write("here.md", "# Still broken");
        std::fs::create_dir_all(rig.root.join("locked")).unwrap();
        let args = rig.args(false);
        let version = doc_version(b"# Still broken", &rig.source().partition, CHUNKING);
        for (id, version) in [
            ("kb:gone.md", "v0"),
            ("wiki:x.md", "v0"),
            ("kb:here.md", version.as_str()),
            ("kb:locked/y.md", "v0"),
        ] {
            args.dlq.push(chunker_failed(id, version)).unwrap();
        }
        let dlq = args.dlq.clone();
        let statuses = || -> Vec<(String, &'static str)> {
            let entries = dlq.list().unwrap().into_iter();
            entries.map(|e| (e.doc_id.clone(), e.status())).collect()
        };
        let mut partial = rig.args(false);
        partial.dlq = dlq.clone();
        partial.only = vec![rig.root.join("locked")];
        let (watcher, _) = rig.start_with(partial).await;
        watcher.stop(None);
        assert!(
            statuses().iter().all(|(_, s)| *s == "pending"),
            "{:?}",
            statuses()
        );
        rig.stats.set_status("stopped");

        FAIL_TO_OPEN.lock().insert(rig.root.join("locked"), 1);
        let (watcher, _) = rig.start_with(args).await;
        let want = [
            ("kb:gone.md", "deleted"),
            ("wiki:x.md", "deleted"),
            ("kb:here.md", "pending"),
            ("kb:locked/y.md", "pending"),
        ];
        assert_eq!(statuses(), want.map(|(d, s)| (d.to_string(), s)));
        watcher.stop(None);
    }

    /// A document of a source no longer configured (a source renamed,
    /// maybe with other partitions too: other versions, same texts) is
    /// deleted only once what was on its way in when it came due is
    /// through, since the new names' embedding reuses its vectors; what
    /// came in after (a daemon is never idle for long) does not hold it.
    /// Another gone document goes after the grace as usual.
    #[tokio::test]
    async fn a_document_of_a_source_no_longer_configured_goes_once_what_was_on_its_way_is_through()
    {
        let rig = Rig::new();
        rig.write("a.md", "# A\n\nThe text the renamed source kept.");
        let mut args = rig.args(true);
        args.delete_grace = Duration::from_millis(200);
        for id in ["wiki:a.md", "kb:gone.md"] {
            rig.known.lock().insert(id.into(), "v0".into());
        }
        let (watcher, scanned) = rig.start_with(args).await;
        assert_eq!(scanned, ["kb:a.md"], "in flight from here on");
        wait_for(|| !rig.index_q.is_empty()).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            rig.deleted(),
            ["kb:gone.md"],
            "only the configured source's"
        );
        // A file written since, and a new version of the one on its way:
        // on their way in, they hold nothing up.
        let version = rig.known.lock()["kb:a.md"].clone();
        rig.write("b.md", "# B\n\nWritten after the scan.");
        rig.write("a.md", "# A\n\nEdited while on its way.");
        let kind = notify::EventKind::Create(notify::event::CreateKind::File);
        for name in ["b.md", "a.md"] {
            watcher.cast(event(kind, &rig.root.join(name))).unwrap();
        }
        wait_for(|| rig.chunk_q.len() == 2).await;
        assert_eq!(rig.handed(), ["kb:a.md", "kb:b.md"]);
        rig.ledger
            .finish("kb:a.md", Some(&version), Outcome::Indexed);
        wait_for(|| !rig.index_q.is_empty()).await;
        assert_eq!(rig.deleted(), ["wiki:a.md"]);
        for id in ["kb:a.md", "kb:b.md"] {
            assert_eq!(rig.ledger.status(id), Some(DocStatus::InFlight), "{id}");
        }
        watcher.stop(None);
    }

    /// On a daemon with several sources, a document of a source no longer
    /// configured waits for every source's first scan, not only the first
    /// one's: the renamed source may be the last whose watch is set up,
    /// and its new names' embedding reuses the document's vectors. Then it
    /// waits for them to be through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_document_of_a_source_no_longer_configured_waits_for_every_first_scan() {
        let rig = Rig::new();
        let wiki = rig.other_source("wiki");
        std::fs::write(
            wiki.root.join("a.md"),
            "# A\n\nThe text the renamed source kept.",
        )
        .unwrap();
        let setup = setup_of(&wiki.root);
        hold(&setup);
        let mut args = rig.args(true);
        args.sources.push(wiki.clone());
        args.delete_grace = Duration::from_millis(200);
        args.hang_after = Duration::from_secs(5);
        rig.known.lock().insert("old:a.md".into(), "v0".into());
        let (watcher, _) = Actor::spawn(None, SourceWatcher, args).await.unwrap();
        // kb (empty) is scanned, which finds old:a.md gone; wiki's watch
        // is still being set up, well past the grace.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rig.stats.status(), "scanning");
        assert!(rig.deleted().is_empty(), "gone before wiki was scanned");
        assert_eq!(let_go(&setup), 1);
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["wiki:a.md"]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            rig.deleted().is_empty(),
            "gone while wiki:a.md was on its way"
        );
        let version = rig.known.lock()["wiki:a.md"].clone();
        rig.ledger
            .finish("wiki:a.md", Some(&version), Outcome::Indexed);
        wait_for(|| !rig.index_q.is_empty()).await;
        assert_eq!(rig.deleted(), ["old:a.md"]);
        watcher.stop(None);
    }

    /// `rm -rf site && build site`: the debouncer folds the removals under
    /// the folder into one event for the folder, which by then exists
    /// again. What it no longer holds is deleted; what it holds is
    /// considered.
    #[tokio::test]
    async fn a_folder_made_anew_loses_what_it_no_longer_holds() {
        let rig = Rig::new();
        rig.write("site/a.md", "# A\n\nold");
        rig.write("site/b.md", "# B\n\nold");
        rig.write("other.md", "# Other");
        let (watcher, scanned) = rig.start(false).await;
        assert_eq!(scanned.len(), 3);
        std::fs::remove_dir_all(rig.root.join("site")).unwrap();
        rig.write("site/a.md", "# A\n\nnew");
        // Seen only as created (a folder moved in): what it holds is
        // considered, nothing is taken away.
        let created = notify::EventKind::Create(notify::event::CreateKind::Folder);
        watcher
            .cast(event(created, &rig.root.join("site")))
            .unwrap();
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["kb:site/a.md"], "its new version");
        assert!(rig.deleted().is_empty());
        // Seen as removed (its removal folded into its event): b.md goes.
        let kind = notify::EventKind::Remove(notify::event::RemoveKind::Folder);
        watcher.cast(event(kind, &rig.root.join("site"))).unwrap();
        wait_for(|| !rig.index_q.is_empty()).await;
        assert_eq!(rig.deleted(), ["kb:site/b.md"]);
        assert!(rig.handed().is_empty(), "a.md is unchanged since");
        watcher.stop(None);
    }

    /// A document replaced by a link (or a FIFO) leaves the index, and the
    /// ledger says why; the link's target is never read as the document.
    #[tokio::test]
    async fn a_file_replaced_by_a_link_leaves_the_index_and_is_skipped() {
        let rig = Rig::new();
        rig.write("a.md", "# A");
        let outside = rig.dir.path().join("outside.md");
        std::fs::write(&outside, "# Outside the source").unwrap();
        let (watcher, scanned) = rig.start(false).await;
        assert_eq!(scanned, ["kb:a.md"]);
        let a = rig.root.join("a.md");
        std::fs::remove_file(&a).unwrap();
        std::os::unix::fs::symlink(&outside, &a).unwrap();
        let kind = notify::EventKind::Create(notify::event::CreateKind::File);
        watcher.cast(event(kind, &a)).unwrap();
        wait_for(|| !rig.index_q.is_empty()).await;
        assert_eq!(rig.deleted(), ["kb:a.md"]);
        assert!(rig.chunk_q.is_empty(), "the target was read");
        wait_for(|| matches!(rig.ledger.status("kb:a.md"), Some(DocStatus::Skipped(_)))).await;
        let Some(DocStatus::Skipped(why)) = rig.ledger.status("kb:a.md") else {
            unreachable!()
        };
        assert!(why.contains("not a regular file"), "{why}");
        watcher.stop(None);
    }

    /// A source whose files do not answer (a hard-mounted share whose
    /// server is gone) stops neither the scan nor the watcher: what is
    /// under it waits, nothing is deleted for it, and once it answers what
    /// was not read is, and what went meanwhile is deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_source_that_hangs_does_not_hang_the_watcher() {
        let rig = Rig::new();
        for name in ["a.md", "b.md", "old.md"] {
            std::fs::write(rig.root.join(name), format!("# {name}\n\ntext\n")).unwrap();
        }
        // Indexed before, at another version: the scan reads it again.
        rig.known.lock().insert("kb:old.md".into(), "v0".into());
        let lease = crate::testkit::Lease::hold(&rig.root.join("a.md"));
        let mut args = rig.args(true);
        args.hang_after = Duration::from_millis(300);
        let retry = args.retry.clone();
        let (_watcher, handed) = rig.start_with(args).await;
        // Read in one batch, given up on together.
        assert!(handed.is_empty(), "{handed:?}");
        assert_eq!(retry.lock().len(), 3);
        // Events under it go unread (its source is not asked again while
        // the first call hangs), and the watcher goes on.
        std::fs::write(rig.root.join("c.md"), "# c\n\ntext\n").unwrap();
        std::fs::remove_file(rig.root.join("old.md")).unwrap();
        tokio::time::sleep(RETRY_AFTER + Duration::from_secs(1)).await;
        assert!(rig.handed().is_empty());
        assert!(rig.deleted().is_empty());
        drop(lease);
        let (mut read, mut deleted) = (Vec::new(), Vec::new());
        wait_for(|| {
            read.extend(rig.handed());
            deleted.extend(rig.deleted());
            read.len() == 3 && !deleted.is_empty()
        })
        .await;
        read.sort();
        assert_eq!(read, ["kb:a.md", "kb:b.md", "kb:c.md"]);
        assert_eq!(deleted, ["kb:old.md"]);
        assert!(retry.lock().is_empty(), "{:?}", retry.lock());
    }

    /// A source that hangs while a scan reads it leaves one batch of its
    /// files waiting on the retry list, not every file it holds (a large
    /// share would hold one entry per file for as long as it hangs): the
    /// scan once it answers reads the rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hang_during_a_scan_keeps_one_batch_waiting() {
        let rig = Rig::new();
        let names: Vec<String> = (0..PROBE_BATCH + 8).map(|i| format!("{i:02}.md")).collect();
        for name in &names {
            rig.write(name, &format!("# {name}\n\ntext\n"));
        }
        // (Whichever file the scan reads first hangs.)
        let leases: Vec<crate::testkit::Lease> = names
            .iter()
            .map(|n| crate::testkit::Lease::hold(&rig.root.join(n)))
            .collect();
        let mut args = rig.args(true);
        args.hang_after = Duration::from_secs(1);
        let retry = args.retry.clone();
        let (watcher, handed) = rig.start_with(args).await;
        assert!(handed.is_empty(), "{handed:?}");
        assert_eq!(retry.lock().len(), PROBE_BATCH);
        drop(leases);
        let mut read = HashSet::new();
        wait_for(|| {
            read.extend(rig.handed());
            read.len() == names.len()
        })
        .await;
        wait_for(|| retry.lock().is_empty()).await;
        assert!(rig.deleted().is_empty());
        watcher.stop(None);
    }

    /// A share that hangs after the watcher read its files, before the
    /// chunker did: the chunker gives up on its read and chunks what it
    /// read and the other sources' files; the rest end skipped, and while
    /// the read given up on hangs the source is not read again. Once it
    /// answers, the watcher reads those again and hands them on: nothing is
    /// lost, and nothing waits in the DLQ for a replay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_the_chunker_gave_up_on_is_read_again_once_its_source_answers() {
        use crate::chunker::actor::ChunkerStage;
        use crate::pool::Stage;
        let rig = Rig::new();
        let chunker = Arc::new(crate::chunker::tests::chunker(64));
        for name in ["a.md", "b.md", "c.md"] {
            rig.write(name, &format!("# {name}\n\nThe text of {name}.\n"));
        }
        let wiki = rig.other_source("wiki");
        std::fs::write(wiki.root.join("w.md"), "# W\n\nThe wiki's text.\n").unwrap();
        let mut args = rig.args(true);
        args.sources.push(wiki);
        args.chunking = chunker.fingerprint().into();
        let (watcher, _) = Actor::spawn(None, SourceWatcher, args).await.unwrap();
        wait_for(|| rig.stats.status() == "watching").await;
        let by_id = |mut metas: Vec<DocMeta>| {
            metas.sort_by(|a, b| a.doc_id.cmp(&b.doc_id));
            metas
        };
        let metas = by_id(rig.chunk_q.drain());
        let ids: Vec<&str> = metas.iter().map(|m| m.doc_id.as_str()).collect();
        assert_eq!(ids, ["kb:a.md", "kb:b.md", "kb:c.md", "wiki:w.md"]);
        let lease = crate::testkit::Lease::hold(&rig.root.join("b.md"));
        let out = crate::pool::PoolQueue::new(rig.stats.clone());
        let hang_after = Duration::from_secs(2);
        let stage = ChunkerStage {
            chunker,
            ledger: rig.ledger.clone(),
            out: Port::Local(out.clone()),
            deletes: Port::Local(rig.index_q.clone()),
            max_file_bytes: 1 << 20,
            hang_after,
        };
        let chunked = |out: &crate::pool::PoolQueue<crate::messages::ChunkedDoc>| {
            let mut ids: Vec<String> = out.drain().into_iter().map(|d| d.meta.doc_id).collect();
            ids.sort();
            ids
        };
        let errors = stage.process_batch(metas.clone()).await.unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(chunked(&out), ["kb:a.md", "wiki:w.md"]);
        let hung = DocStatus::Skipped(crate::ledger::SOURCE_HUNG.into());
        for id in ["kb:b.md", "kb:c.md"] {
            assert_eq!(rig.ledger.status(id), Some(hung.clone()), "{id}");
        }
        // Not read while the read given up on hangs: no thread is taken,
        // and no wait for the hang.
        let t = std::time::Instant::now();
        let errors = stage.process_batch(vec![metas[2].clone()]).await.unwrap();
        assert!(errors.is_empty() && t.elapsed() < hang_after, "{errors:?}");
        assert!(out.is_empty());
        // The watcher looks at the skipped ones again, and finds the
        // source hanging too: they wait, and nothing is deleted.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(rig.handed().is_empty());
        assert!(rig.deleted().is_empty());
        drop(lease);
        let mut again = Vec::new();
        wait_for(|| {
            again.extend(rig.chunk_q.drain());
            again.len() == 2
        })
        .await;
        let again = by_id(again);
        let versions = |m: &[DocMeta]| -> Vec<(String, String)> {
            m.iter()
                .map(|m| (m.doc_id.clone(), m.version.clone()))
                .collect()
        };
        assert_eq!(versions(&again), versions(&metas[1..3]), "read again");
        stage.process_batch(again).await.unwrap();
        assert_eq!(chunked(&out), ["kb:b.md", "kb:c.md"]);
        assert!(rig.deleted().is_empty());
        watcher.stop(None);
    }

    /// Folders whose walks and listings wait while they are here (a share
    /// whose server is gone holds every listing of it), with how many
    /// calls came to wait: the injected fault of the listing-hang tests.
    /// (No kernel call blocks on a local folder's listing as a lease
    /// blocks an open.)
    static HELD: std::sync::LazyLock<parking_lot::Mutex<HashMap<PathBuf, usize>>> =
        std::sync::LazyLock::new(Default::default);

    /// (Let go after 30 s all the same: a test that fails while it
    /// holds a folder would otherwise hang, its runtime waiting for the
    /// held thread.)
    pub(super) fn wait_while_held(path: &Path) {
        if let Some(calls) = HELD.lock().get_mut(path) {
            *calls += 1;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while HELD.lock().contains_key(path) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The key under which [`HELD`] holds the setting up of the watch of
    /// the source root `root`. (A name no walk or listing waits on: the
    /// watcher ignores names starting with a dot.)
    pub(super) fn setup_of(root: &Path) -> PathBuf {
        root.join(".watch-setup")
    }

    /// Holds every walk and listing of `folder` (see [`HELD`]).
    fn hold(folder: &Path) {
        HELD.lock().insert(folder.to_path_buf(), 0);
    }

    /// Lets `folder` go; how many calls waited on it.
    fn let_go(folder: &Path) -> usize {
        HELD.lock().remove(folder).unwrap_or_default()
    }

    /// A walk that hangs mid-tree stops neither the scan nor the watcher,
    /// and deletes nothing for what it did not see; once the source
    /// answers, it is scanned: what was not read is, and what went
    /// meanwhile is deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_walk_that_hangs_does_not_hang_the_watcher() {
        let rig = Rig::new();
        rig.write("a.md", "# a\n\ntext\n");
        rig.write("sub/b.md", "# b\n\ntext\n");
        // Indexed before; its file went while ragd was down.
        rig.known.lock().insert("kb:gone.md".into(), "v0".into());
        let sub = rig.root.join("sub");
        hold(&sub);
        let mut args = rig.args(true);
        args.hang_after = Duration::from_secs(1);
        let (watcher, handed) = rig.start_with(args).await;
        assert!(handed.is_empty(), "{handed:?}");
        tokio::time::sleep(RETRY_AFTER + Duration::from_secs(1)).await;
        assert!(rig.handed().is_empty());
        assert!(rig.deleted().is_empty(), "deleted for being unseen");
        let_go(&sub);
        let (mut read, mut deleted) = (Vec::new(), Vec::new());
        wait_for(|| {
            read.extend(rig.handed());
            deleted.extend(rig.deleted());
            read.len() == 2 && !deleted.is_empty()
        })
        .await;
        read.sort();
        assert_eq!(read, ["kb:a.md", "kb:sub/b.md"]);
        assert_eq!(deleted, ["kb:gone.md"]);
        // A folder moved in whose walk hangs: the event goes unread, and
        // the watcher goes on; once the source answers, it is scanned.
        let staging = rig.dir.path().join("staging");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("d.md"), "# d\n\ntext\n").unwrap();
        let site = rig.root.join("site");
        hold(&site);
        std::fs::rename(&staging, &site).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(rig.handed().is_empty());
        let_go(&site);
        wait_for(|| rig.chunk_q.len() == 1).await;
        assert_eq!(rig.handed(), ["kb:site/d.md"]);
        watcher.stop(None);
    }

    /// A source whose watch does not get set up (a share that hangs while
    /// its tree is walked to watch it) holds up no other: the first scan
    /// is done without it, and says why; the others' events come. Once
    /// set up, it is scanned, and its events come too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_source_whose_watch_does_not_set_up_holds_up_no_other() {
        let rig = Rig::new();
        rig.write("a.md", "# a\n\ntext\n");
        let wiki = rig.other_source("wiki");
        std::fs::write(wiki.root.join("w.md"), "# w\n\ntext\n").unwrap();
        let setup = setup_of(&wiki.root);
        hold(&setup);
        let mut args = rig.args(true);
        args.sources.push(wiki.clone());
        args.hang_after = Duration::from_secs(3);
        let health = args.health.clone();
        let (watcher, handed) = rig.start_with(args).await;
        assert_eq!(handed, ["kb:a.md"]);
        let error = rig.stats.last_error().unwrap_or_default();
        assert!(
            error.contains("is not watched yet") && error.contains("wiki"),
            "{error}"
        );
        let view = |name: &str| {
            let v = health.lock()[name].clone();
            (v.watch, v.unseen.unwrap_or_default())
        };
        assert_eq!(view("kb"), ("watching", String::new()));
        let (watch, unseen) = view("wiki");
        assert_eq!(watch, "setting up");
        assert!(unseen.contains("is not watched yet"), "{unseen}");
        rig.write("b.md", "# b\n\ntext\n");
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["kb:b.md"]);
        assert_eq!(let_go(&setup), 1);
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["wiki:w.md"]);
        wait_for(|| view("wiki") == ("watching", String::new())).await;
        // (Written after its scan: an event tells.)
        std::fs::write(wiki.root.join("x.md"), "# x\n\ntext\n").unwrap();
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["wiki:x.md"]);
        watcher.stop(None);
    }

    /// A source whose root goes while its watch is set up is watched
    /// anew once that setup ends, found missing, and holds up the first
    /// scan no longer.
    #[tokio::test]
    async fn a_root_that_goes_while_its_watch_is_set_up_is_missing() {
        let rig = Rig::new();
        let wiki = rig.other_source("wiki");
        let setup = setup_of(&wiki.root);
        hold(&setup);
        let mut args = rig.args(true);
        args.sources.push(wiki.clone());
        let (watcher, _) = Actor::spawn(None, SourceWatcher, args).await.unwrap();
        std::fs::remove_dir(&wiki.root).unwrap();
        let moved =
            notify::Event::new(notify::EventKind::Remove(notify::event::RemoveKind::Folder))
                .add_path(wiki.root.clone());
        watcher.cast(event_of(1, moved)).unwrap();
        wait_for(|| {
            let error = rig.stats.last_error().unwrap_or_default();
            error.contains("was moved")
        })
        .await;
        assert_eq!(rig.stats.status(), "scanning");
        assert_eq!(let_go(&setup), 1);
        wait_for(|| rig.stats.status() == "watching").await;
        let error = rig.stats.last_error().unwrap_or_default();
        assert!(
            error.contains("wiki") && error.contains("is missing"),
            "{error}"
        );
        watcher.stop(None);
    }

    /// Events lost from one source's watch (its queue overflowed) have it
    /// scanned, not every source: a scan reads every file. A full rescan
    /// scans them all.
    #[tokio::test]
    async fn a_source_that_lost_events_is_scanned_alone() {
        let rig = Rig::new();
        let wiki = rig.other_source("wiki");
        let mut args = rig.args(true);
        args.sources.push(wiki);
        let (watcher, _) = rig.start_with(args).await;
        // Indexed before; both files went while nothing was watching.
        for id in ["kb:gone.md", "wiki:gone.md"] {
            rig.known.lock().insert(id.into(), "v0".into());
        }
        watcher.cast(overflow()).unwrap();
        wait_for(|| !rig.index_q.is_empty()).await;
        // (Time for the other's deletion to show, were it scanned too.)
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rig.deleted(), ["kb:gone.md"]);
        watcher.cast(WatchMsg::Rescan).unwrap();
        wait_for(|| !rig.index_q.is_empty()).await;
        assert_eq!(rig.deleted(), ["wiki:gone.md"]);
        watcher.stop(None);
    }

    /// A deletion waiting out its grace on a source whose listing hangs
    /// waits on: nothing is deleted unseen, and while the look hangs no
    /// other starts (each would hold a blocking thread for good, one per
    /// grace). Once it answers, the deletion goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deletion_waits_while_its_folder_does_not_answer() {
        let rig = Rig::new();
        rig.write("docs/a.md", "# a\n\ntext\n");
        let mut args = rig.args(true);
        args.hang_after = Duration::from_secs(1);
        args.delete_grace = Duration::from_millis(200);
        let (watcher, handed) = rig.start_with(args).await;
        assert_eq!(handed, ["kb:docs/a.md"]);
        let docs = rig.root.join("docs");
        hold(&docs);
        std::fs::remove_file(docs.join("a.md")).unwrap();
        // Past the grace, the hang and the old code's 5 s listing timeout.
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert!(rig.deleted().is_empty(), "deleted unseen");
        assert_eq!(let_go(&docs), 1, "a look started while one hung");
        wait_for(|| rig.index_q.len() == 1).await;
        assert_eq!(rig.deleted(), ["kb:docs/a.md"]);
        watcher.stop(None);
    }

    /// A replay asked for while its file does not answer waits, forced,
    /// and is read as a replay whoever reads it first once the source
    /// answers: a scan would find it unchanged, and the replay would be
    /// lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_asked_for_while_its_source_hangs_is_not_lost() {
        let rig = Rig::new();
        rig.write("a.md", "# A\n\ntext\n");
        let mut args = rig.args(true);
        args.hang_after = Duration::from_secs(1);
        let retry = args.retry.clone();
        let health = args.health.clone();
        let (watcher, scanned) = rig.start_with(args).await;
        assert_eq!(scanned, ["kb:a.md"]);
        rig.dead_letter("kb:a.md");
        let a = rig.root.join("a.md");
        let lease = crate::testkit::Lease::hold(&a);
        watcher
            .cast(WatchMsg::Replay("kb:a.md".into(), a.clone()))
            .unwrap();
        wait_for(|| retry.lock().get(&a).is_some_and(|(_, forced)| *forced)).await;
        // Shown as not answering (the read that hung was its only call).
        let unseen = || health.lock()["kb"].unseen.clone().unwrap_or_default();
        wait_for(|| unseen().contains("does not answer")).await;
        drop(lease);
        // A scan reads it first (the retry list's round comes later).
        wait_for(|| !stuck(&rig.root)).await;
        watcher.cast(WatchMsg::Rescan).unwrap();
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["kb:a.md"], "read again, though unchanged");
        assert!(retry.lock().is_empty());
        watcher.stop(None);
    }

    /// A source that hung while an event came is scanned once it answers
    /// and its root is there: a root whose look does not answer in time
    /// then is waited for, not taken as scanned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missed_source_is_scanned_once_its_root_answers() {
        let rig = Rig::new();
        rig.write("a.md", "# A\n\ntext\n");
        let mut args = rig.args(true);
        args.hang_after = Duration::from_secs(1);
        let (watcher, scanned) = rig.start_with(args).await;
        assert_eq!(scanned, ["kb:a.md"]);
        let a = rig.root.join("a.md");
        let lease = crate::testkit::Lease::hold(&a);
        // A replay makes the source hang; an event meanwhile goes unread.
        watcher.cast(WatchMsg::Replay("kb:a.md".into(), a)).unwrap();
        wait_for(|| stuck(&rig.root)).await;
        rig.write("b.md", "# B\n\ntext\n");
        // (Its event is handled well within this: the lease would hold
        // for 45 s.)
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Its files answer again, but a look at its root does not, for
        // longer than a look may take.
        hold(&rig.root);
        drop(lease);
        tokio::time::sleep(RETRY_AFTER + ROOT_LOOK_TIMEOUT + Duration::from_secs(1)).await;
        assert!(!rig.handed().contains(&"kb:b.md".to_string()));
        let_go(&rig.root);
        wait_for(|| rig.handed().contains(&"kb:b.md".to_string())).await;
        watcher.stop(None);
    }

    /// A source root the scan cannot open (a permission, an I/O error) is
    /// shown as unseen, not as seen whole: nothing under it was read, and
    /// nothing is deleted.
    #[tokio::test]
    async fn a_root_that_cannot_be_read_is_shown_unseen() {
        let rig = Rig::new();
        rig.write("a.md", "# A");
        rig.known.lock().insert("kb:a.md".into(), "v0".into());
        FAIL_TO_OPEN.lock().insert(rig.root.clone(), 1);
        let args = rig.args(false);
        let health = args.health.clone();
        let (watcher, handed) = rig.start_with(args).await;
        assert!(handed.is_empty() && rig.deleted().is_empty());
        let unseen = health.lock()["kb"].unseen.clone().unwrap_or_default();
        assert!(unseen.contains("could not be read"), "{unseen}");
        watcher.stop(None);
    }

    /// A one-shot ingest whose walk hangs ends, deletes nothing for what
    /// it did not see, and says why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_one_shot_scan_whose_walk_hangs_ends_and_says_why() {
        let rig = Rig::new();
        rig.write("sub/b.md", "# b\n\ntext\n");
        rig.known.lock().insert("kb:gone.md".into(), "v0".into());
        let sub = rig.root.join("sub");
        hold(&sub);
        let mut args = rig.args(false);
        args.hang_after = Duration::from_secs(1);
        let (watcher, handed) = rig.start_with(args).await;
        let_go(&sub);
        assert!(handed.is_empty(), "{handed:?}");
        assert!(rig.deleted().is_empty(), "deleted for being unseen");
        let error = rig.stats.last_error().unwrap_or_default();
        assert!(error.contains("does not answer"), "{error}");
        watcher.stop(None);
    }

    /// On a node with the index role too, the ledger starts from the
    /// store (or hears of a version from a job) before the scan: a file
    /// the scan finds unchanged is the watcher's all the same, so an
    /// `Indexed` event for it asks for no check of the source.
    #[tokio::test]
    async fn a_file_found_as_the_ledger_has_it_is_the_watchers() {
        let rig = Rig::new();
        let partition = rig.source().partition;
        let (a, b) = (b"# A\n\nalpha\n", b"# B\n\nbeta\n");
        std::fs::write(rig.root.join("a.md"), a).unwrap();
        std::fs::write(rig.root.join("b.md"), b).unwrap();
        let (va, vb) = (
            doc_version(a, &partition, CHUNKING),
            doc_version(b, &partition, CHUNKING),
        );
        rig.ledger.seed(&[crate::indexer::StoredVersion {
            doc_id: "kb:a.md".into(),
            version: va.clone(),
            seq: 5,
            partition: None,
        }]);
        rig.known.lock().insert("kb:a.md".into(), va);
        assert!(rig.ledger.observe("kb:b.md", Some(&vb), 7));
        assert!(rig.ledger.gone_here("kb:a.md") && rig.ledger.gone_here("kb:b.md"));
        let (_watcher, handed) = rig.start(false).await;
        assert!(handed.is_empty(), "{handed:?}");
        assert!(
            !rig.ledger.gone_here("kb:a.md"),
            "found as the store has it"
        );
        assert!(!rig.ledger.gone_here("kb:b.md"), "found as a job had it");
    }

    /// A file the daemon may no longer read (its permissions changed)
    /// leaves the index, skipped with the reason; one that vanished waits
    /// for its removal event.
    #[tokio::test]
    async fn an_unreadable_file_leaves_the_index_and_says_why() {
        let rig = Rig::new();
        let args = rig.args(true);
        let source = rig.source();
        let path = rig.root.join("a.md");
        rig.known.lock().insert("kb:a.md".into(), "v1".into());
        let vanished = Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        decide(&args, &source, &path, "a.md", Look::Scan, vanished).await;
        assert!(rig.index_q.is_empty());
        // Too many open files (a burst): kept, and tried again, once per
        // path however often it is found, up to READ_TRIES times.
        let emfile = || Err(std::io::Error::from_raw_os_error(24));
        for tries in 1..READ_TRIES {
            decide(&args, &source, &path, "a.md", Look::Scan, emfile()).await;
            assert!(rig.index_q.is_empty());
            assert_eq!(args.retry.lock().get(&path), Some(&(tries, false)));
        }
        decide(&args, &source, &path, "a.md", Look::Scan, emfile()).await;
        assert!(args.retry.lock().is_empty());
        assert_eq!(rig.deleted(), ["kb:a.md"], "given up: skipped");
        // A one-shot ingest does not wait for a retry.
        let once = rig.args(false);
        decide(&once, &source, &path, "a.md", Look::Scan, emfile()).await;
        assert!(once.retry.lock().is_empty());
        assert!(matches!(
            rig.ledger.status("kb:a.md"),
            Some(DocStatus::Skipped(_))
        ));
        rig.known.lock().insert("kb:a.md".into(), "v1".into());
        let denied = Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        decide(&args, &source, &path, "a.md", Look::Scan, denied).await;
        assert_eq!(rig.deleted(), ["kb:a.md"]);
        let Some(DocStatus::Skipped(why)) = rig.ledger.status("kb:a.md") else {
            panic!("{:?}", rig.ledger.status("kb:a.md"))
        };
        assert!(why.contains("cannot read the file"), "{why}");
    }

    /// Two names that differ only in bytes that are not UTF-8 would share
    /// one lossy id: such files are skipped, saying so.
    #[tokio::test]
    async fn a_name_that_is_not_utf8_is_skipped() {
        use std::os::unix::ffi::OsStrExt;
        let rig = Rig::new();
        let name = std::ffi::OsStr::from_bytes(b"caf\xe9.md");
        std::fs::write(rig.root.join(name), "# Menu").unwrap();
        rig.write("ok.md", "# Fine");
        let (watcher, scanned) = rig.start(false).await;
        assert_eq!(scanned, ["kb:ok.md"]);
        let Some(DocStatus::Skipped(why)) = rig.ledger.status("kb:caf\u{fffd}.md") else {
            panic!("{:?}", rig.ledger.known_docs())
        };
        assert!(why.contains("not valid UTF-8"), "{why}");
        watcher.stop(None);
    }

    /// The source's folder itself moved away (or removed, or replaced):
    /// the kernel's watches would follow the old folder, so the watcher
    /// watches the path anew, in place (no restart: a root that comes and
    /// goes would use up the supervisor's), and a scan deletes what went.
    #[tokio::test]
    async fn a_moved_source_root_is_watched_anew() {
        let rig = Rig::new();
        rig.write("a.md", "# A");
        let (watcher, scanned) = rig.start(true).await;
        assert_eq!(scanned, ["kb:a.md"]);
        std::fs::rename(&rig.root, rig.dir.path().join("kb-old")).unwrap();
        std::fs::create_dir(&rig.root).unwrap();
        // (What the kernel reports of it varies: the watcher's own reading.)
        let kind = notify::EventKind::Modify(notify::event::ModifyKind::Name(
            notify::event::RenameMode::From,
        ));
        watcher.cast(event(kind, &rig.root)).unwrap();
        wait_for(|| rig.deleted() == ["kb:a.md"]).await;
        still_watching(&rig, &watcher, "was moved", "b.md").await;
        watcher.stop(None);
    }

    /// The kernel's watch limit reached by folders made after the start:
    /// the watcher watches anew (polling what the kernel cannot watch)
    /// rather than leave the new folders unwatched.
    #[tokio::test]
    async fn the_watch_limit_reached_later_watches_anew() {
        let rig = Rig::new();
        let (watcher, _) = rig.start(true).await;
        let limit = notify::Error::new(notify::ErrorKind::MaxFilesWatch);
        watcher.cast(WatchMsg::Fs(0, Err(vec![limit]))).unwrap();
        still_watching(&rig, &watcher, "watch limit", "new/a.md").await;
        // Another watch error only asks for a rescan.
        let other = notify::Error::generic("a passing error");
        watcher.cast(WatchMsg::Fs(0, Err(vec![other]))).unwrap();
        wait_for(|| {
            rig.stats
                .last_error()
                .unwrap_or_default()
                .contains("a passing error")
        })
        .await;
        assert!(matches!(watcher.get_status(), ractor::ActorStatus::Running));
        watcher.stop(None);
    }

    /// A source root missing at start (a deploy swapping folders, a share
    /// not mounted yet): its documents stay indexed, the watcher says so,
    /// and it watches the root once it is back.
    #[tokio::test]
    async fn a_missing_root_keeps_its_documents_until_it_is_back() {
        let rig = Rig::new();
        rig.known.lock().insert("kb:a.md".into(), "v1".into());
        std::fs::remove_dir(&rig.root).unwrap();
        let args = rig.args(true);
        let health = args.health.clone();
        let (watcher, _) = Actor::spawn(None, SourceWatcher, args).await.unwrap();
        wait_for(|| rig.stats.status() == "watching").await;
        assert!(rig.handed().is_empty() && rig.deleted().is_empty());
        let view = health.lock()["kb"].clone();
        assert_eq!(view.watch, "missing");
        assert!(view.unseen.unwrap().contains("is missing"));
        std::fs::create_dir(&rig.root).unwrap();
        still_watching(&rig, &watcher, "is back", "b.md").await;
        // Back empty: now a.md is gone for real.
        assert_eq!(rig.deleted(), ["kb:a.md"]);
        let view = health.lock()["kb"].clone();
        assert_eq!((view.watch, view.unseen), ("watching", None));
        watcher.stop(None);
    }

    /// Folders whose next walks fail to open them, as if the process had
    /// run out of file handles: path, and how many walks fail. The injected
    /// fault of the folder-retry test.
    static FAIL_TO_OPEN: std::sync::LazyLock<parking_lot::Mutex<HashMap<PathBuf, u32>>> =
        std::sync::LazyLock::new(Default::default);

    pub(super) fn fails_to_open(folder: &Path) -> bool {
        let mut failing = FAIL_TO_OPEN.lock();
        match failing.get_mut(folder) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// A folder moved in while the walk cannot open it (too many open
    /// files in a burst): no event will come for the files it holds, so it
    /// is walked again until it opens, and they are indexed.
    #[tokio::test]
    async fn a_folder_that_could_not_be_opened_is_walked_again() {
        let rig = Rig::new();
        let (watcher, _) = rig.start(true).await;
        let staging = rig.dir.path().join("staging");
        for f in ["a.md", "sub/b.md"] {
            let p = staging.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("# {f}")).unwrap();
        }
        let site = rig.root.join("site");
        FAIL_TO_OPEN.lock().insert(site.clone(), 1);
        std::fs::rename(&staging, &site).unwrap();
        wait_for(|| FAIL_TO_OPEN.lock()[&site] == 0).await;
        assert!(rig.handed().is_empty(), "the folder was read");
        wait_for(|| rig.chunk_q.len() == 2).await;
        assert_eq!(rig.handed(), ["kb:site/a.md", "kb:site/sub/b.md"]);
        watcher.stop(None);
    }

    /// A folder waiting to be walked again that is removed meanwhile
    /// leaves the retry list, and is not taken for a file of its name.
    #[tokio::test]
    async fn a_folder_waiting_to_be_walked_again_that_goes_leaves_the_list() {
        let rig = Rig::new();
        let args = rig.args(true);
        let retry = args.retry.clone();
        let (watcher, _) = rig.start_with(args).await;
        let site = rig.root.join("site");
        FAIL_TO_OPEN.lock().insert(site.clone(), 1);
        rig.write("site/a.md", "# a");
        wait_for(|| retry.lock().contains_key(&site)).await;
        std::fs::remove_dir_all(&site).unwrap();
        wait_for(|| retry.lock().is_empty()).await;
        assert!(rig.ledger.status("kb:site").is_none());
        watcher.stop(None);
    }

    /// A root whose every stat blocks (a hard-mounted share whose server
    /// is gone; here a look that waits to be let go) counts as missing
    /// after the timeout, without a runtime thread stuck on it; while that
    /// look hangs no other starts; once it returns, the root is looked at
    /// again. Other roots are not held up.
    #[tokio::test]
    async fn a_root_that_does_not_answer_counts_as_missing() {
        use std::sync::atomic::AtomicUsize;
        let root = Path::new("/ragd-test/hung-share");
        let looks = Arc::new(AtomicUsize::new(0));
        let look = |answer: bool| {
            let looks = looks.clone();
            move || {
                looks.fetch_add(1, Ordering::SeqCst);
                answer
            }
        };
        let (let_go, hung) = std::sync::mpsc::channel::<()>();
        let first = look(true);
        let t = std::time::Instant::now();
        let present = look_at_root(root, Duration::from_millis(200), move || {
            let answer = first();
            hung.recv().ok();
            answer
        })
        .await;
        assert!(!present);
        assert!(t.elapsed() >= Duration::from_millis(200));

        let t = std::time::Instant::now();
        assert!(!look_at_root(root, Duration::from_secs(5), look(true)).await);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "waited on a hung root"
        );
        assert_eq!(looks.load(Ordering::SeqCst), 1, "a second look started");
        assert!(
            look_at_root(
                Path::new("/ragd-test/other"),
                Duration::from_secs(5),
                look(true)
            )
            .await
        );

        let_go.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !look_at_root(root, Duration::from_secs(5), look(true)).await {
            assert!(
                std::time::Instant::now() < deadline,
                "never looked at again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn mount_points_are_told_from_folders() {
        assert!(is_mount_point(Path::new("/")));
        assert!(is_mount_point(Path::new("/proc")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()));
        assert!(!is_mount_point(&dir.path().join("missing")));
        // A bind mount of a folder of the same file system: same device
        // as its parent, a mount all the same.
        let (from, at) = (dir.path().join("from"), dir.path().join("at"));
        std::fs::create_dir(&from).unwrap();
        std::fs::create_dir(&at).unwrap();
        let Some(bound) = Mount::bind(&from, &at) else {
            eprintln!("skipped the bind mount: this process may not mount");
            return;
        };
        assert!(is_mount_point(&at));
        assert!(!is_mount_point(&from));
        bound.unmount();
        assert!(!is_mount_point(&at));
    }

    /// A file system mounted for a test, unmounted on drop; `None` where
    /// this process may not mount.
    struct Mount(PathBuf);

    impl Mount {
        fn run(args: &[&std::ffi::OsStr], at: &Path) -> Option<Mount> {
            let ok = std::process::Command::new("mount")
                .args(args)
                .arg(at)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| Mount(at.to_path_buf()))
        }

        /// A new, empty tmpfs at `at`.
        fn tmpfs(at: &Path) -> Option<Mount> {
            Self::run(&["-t".as_ref(), "tmpfs".as_ref(), "ragd-test".as_ref()], at)
        }

        /// The folder `from` mounted again at `at`.
        fn bind(from: &Path, at: &Path) -> Option<Mount> {
            Self::run(&["--bind".as_ref(), from.as_os_str()], at)
        }

        fn unmount(self) {
            let status = std::process::Command::new("umount").arg(&self.0).status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "umount {}",
                self.0.display()
            );
            // (Its drop would unmount whatever is mounted there next.)
            std::mem::forget(self);
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            if is_mount_point(&self.0) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.0)
                    .status();
            }
        }
    }

    /// A share as the source root (`mount_point = true`): unmounted, the
    /// root is an empty folder, not a missing one. Its documents stay; the
    /// watcher watches anew, finds it missing, and watches it again once
    /// the share is mounted again, all without a restart (a share that
    /// comes and goes would soon use up the supervisor's).
    #[tokio::test]
    async fn an_unmounted_share_keeps_its_documents_until_it_is_back() {
        let rig = Rig {
            mount_point: true,
            ..Rig::new()
        };
        let Some(mut share) = Mount::tmpfs(&rig.root) else {
            eprintln!("skipped: this process may not mount a tmpfs");
            return;
        };
        let mut files = vec!["a.md".to_string(), "sub/b.md".to_string()];
        let write_all = |files: &[String]| {
            for f in files {
                rig.write(f, &format!("# {f}"));
            }
        };
        write_all(&files);
        let (watcher, scanned) = rig.start(true).await;
        assert_eq!(scanned, ["kb:a.md", "kb:sub/b.md"]);

        for round in 0..2 {
            share.unmount();
            watcher.cast(WatchMsg::Rescan).unwrap();
            wait_for(|| {
                let error = rig.stats.last_error().unwrap_or_default();
                error.contains("has nothing mounted on it")
            })
            .await;
            // (The scan asked for, and the one after watching anew.)
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                rig.deleted().is_empty(),
                "an unmounted share deleted its documents (round {round})"
            );
            assert!(matches!(watcher.get_status(), ractor::ActorStatus::Running));
            // Mounted again with the same files (a new tmpfs is empty).
            share = Mount::tmpfs(&rig.root).expect("mounting it again");
            write_all(&files);
            let new = format!("c{round}.md");
            still_watching(&rig, &watcher, "is back", &new).await;
            files.push(new);
        }
        assert!(rig.deleted().is_empty());
        watcher.stop(None);
    }

    /// Links to a folder of the tree: events of that folder keep their
    /// own paths (with links followed, notify reported them under the path
    /// it walked last, and a deleted file's document stayed in the index).
    #[tokio::test]
    async fn events_under_a_linked_folder_keep_their_own_paths() {
        let rig = Rig::new();
        rig.write("guides/a.md", "# A");
        // Several, so that the folder's own path is unlikely to be walked
        // last (the walk follows the directory's order).
        for link in ["latest", "current", "v2", "stable", "0"] {
            std::os::unix::fs::symlink(rig.root.join("guides"), rig.root.join(link)).unwrap();
        }
        let (watcher, scanned) = rig.start(true).await;
        assert_eq!(scanned, ["kb:guides/a.md"]);
        std::fs::remove_file(rig.root.join("guides/a.md")).unwrap();
        wait_for(|| !rig.index_q.is_empty()).await;
        assert_eq!(rig.deleted(), ["kb:guides/a.md"]);
        watcher.stop(None);
    }

    /// A dead-lettered deletion (or prune) replayed: its file is gone, so
    /// the deletion runs again; a document that is there is read again.
    #[tokio::test]
    async fn a_replay_deletes_what_is_gone_and_reads_what_is_there() {
        let rig = Rig::new();
        rig.write("a.md", "# A");
        let (watcher, scanned) = rig.start(false).await;
        assert_eq!(scanned, ["kb:a.md"]);
        let gone = rig.root.join("gone.md");
        watcher
            .cast(WatchMsg::Replay("kb:gone.md".into(), gone))
            .unwrap();
        wait_for(|| !rig.index_q.is_empty()).await;
        assert_eq!(rig.deleted(), ["kb:gone.md"]);
        rig.dead_letter("kb:a.md");
        let a = rig.root.join("a.md");
        watcher.cast(WatchMsg::Replay("kb:a.md".into(), a)).unwrap();
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["kb:a.md"], "read again, though unchanged");
        watcher.stop(None);
    }

    /// The watcher holds each version's size against the ledger's byte
    /// budget: with the budget full it waits, and reads on once a version
    /// ends.
    #[tokio::test]
    async fn the_watcher_waits_while_the_bytes_in_flight_fill_the_budget() {
        let mut rig = Rig::new();
        rig.ledger = Ledger::with_limits(100, 3 << 10, Duration::ZERO, false);
        rig.write("a.md", &format!("# A\n\n{}", "alpha ".repeat(400)));
        rig.write("b.md", &format!("# B\n\n{}", "beta ".repeat(400)));
        let (watcher, _) = Actor::spawn(None, SourceWatcher, rig.args(false))
            .await
            .unwrap();
        wait_for(|| !rig.chunk_q.is_empty()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let first = rig.handed();
        assert_eq!(first.len(), 1, "both in flight: {first:?}");
        let version = rig.known.lock()[&first[0]].clone();
        rig.ledger
            .finish(&first[0], Some(&version), Outcome::Indexed);
        wait_for(|| !rig.chunk_q.is_empty()).await;
        let second = rig.handed();
        assert_eq!(second.len(), 1);
        assert_ne!(first, second);
        watcher.stop(None);
    }

    /// A version dead-lettered twice (two ingest nodes on one share each
    /// failed it) is read again when one of its entries is replayed: the
    /// entry still waiting does not swallow the replay.
    #[tokio::test]
    async fn a_replay_is_read_though_another_entry_of_its_version_waits() {
        let rig = Rig::new();
        rig.write("a.md", "# A");
        let args = rig.args(false);
        let dlq = args.dlq.clone();
        let (watcher, scanned) = rig.start_with(args).await;
        assert_eq!(scanned, ["kb:a.md"]);
        let version = rig.known.lock()["kb:a.md"].clone();
        let first = dlq.push(chunker_failed("kb:a.md", &version)).unwrap();
        dlq.push(chunker_failed("kb:a.md", &version)).unwrap();
        rig.dead_letter("kb:a.md");
        dlq.mark_replayed(first).unwrap();
        let a = rig.root.join("a.md");
        watcher.cast(WatchMsg::Replay("kb:a.md".into(), a)).unwrap();
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["kb:a.md"]);
        watcher.stop(None);
    }

    /// A replay waiting on the retry list whose file is gone for a moment
    /// (a save that deletes and writes) stays owed: the read once it is
    /// back is forced, though the version is the dead-lettered one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_whose_file_is_gone_for_a_moment_is_not_lost() {
        let rig = Rig::new();
        rig.write("a.md", "# A\n\ntext\n");
        let mut args = rig.args(true);
        // (Back within the grace: no deletion meanwhile.)
        args.delete_grace = Duration::from_secs(20);
        let retry = args.retry.clone();
        let (watcher, scanned) = rig.start_with(args).await;
        assert_eq!(scanned, ["kb:a.md"]);
        rig.dead_letter("kb:a.md");
        // A replay waiting on the retry list (its read would not open).
        let a = rig.root.join("a.md");
        retry.lock().insert(a.clone(), (1, true));
        std::fs::remove_file(&a).unwrap();
        // A retry round finds it gone.
        tokio::time::sleep(RETRY_AFTER + Duration::from_secs(1)).await;
        assert_eq!(retry.lock().get(&a), Some(&(2, true)));
        rig.write("a.md", "# A\n\ntext\n");
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["kb:a.md"], "read again, though unchanged");
        assert!(retry.lock().is_empty());
        watcher.stop(None);
    }

    /// A folder rebuilt more slowly than the debounce (removed, then
    /// written again file by file): what comes back within the grace
    /// unchanged stays as it is, what comes back changed is an update, and
    /// only what stays gone is deleted, once the grace is over (as is what
    /// a scan finds gone).
    #[tokio::test]
    async fn a_folder_rebuilt_within_the_grace_deletes_only_what_stays_gone() {
        let rig = Rig::new();
        for f in ["site/a.md", "site/b.md", "site/c.md", "d.md"] {
            rig.write(f, &format!("# {f}\n\nWhat {f} says."));
        }
        // And one the store has that went while the watcher was away: the
        // first scan finds it gone, and it waits out the grace too.
        rig.known.lock().insert("kb:old.md".into(), "v0".into());
        let grace = Duration::from_secs(3);
        let mut args = rig.args(true);
        args.delete_grace = grace;
        let (watcher, scanned) = rig.start_with(args).await;
        assert_eq!(scanned.len(), 4);
        // (The scan's reads are events too: once they are handed on, the
        // debouncer holds nothing of these paths.)
        tokio::time::sleep(Duration::from_secs(1)).await;

        let removed = std::time::Instant::now();
        std::fs::remove_dir_all(rig.root.join("site")).unwrap();
        std::fs::remove_file(rig.root.join("d.md")).unwrap();
        // Longer than the debounce: the removals are acted on first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        rig.write("site/a.md", "# site/a.md\n\nWhat site/a.md says.");
        rig.write("site/b.md", "# site/b.md\n\nWhat it says now.");
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["kb:site/b.md"], "a.md came back unchanged");
        assert!(rig.deleted().is_empty(), "nothing deleted within the grace");

        wait_for(|| rig.index_q.len() == 3).await;
        assert!(removed.elapsed() >= grace);
        assert_eq!(rig.deleted(), ["kb:d.md", "kb:old.md", "kb:site/c.md"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(rig.index_q.is_empty(), "each deleted once");
        watcher.stop(None);
    }

    /// When the grace is over, a document counts as there only as a file
    /// of exactly its name: one whose name is now a folder's goes. One back
    /// unchanged but never indexed (the chunker found it gone when it came
    /// to read it) is read again, at once: its event does not wait for the
    /// grace, and the grace's end does not read it a second time.
    #[tokio::test]
    async fn what_the_grace_finds_back_is_judged_as_a_scan_would() {
        let rig = Rig::new();
        rig.write("a.md", "# A\n\nAlpha.");
        rig.write("b.md", "# B\n\nBeta.");
        let mut args = rig.args(true);
        args.delete_grace = Duration::from_secs(1);
        let (watcher, scanned) = rig.start_with(args).await;
        assert_eq!(scanned, ["kb:a.md", "kb:b.md"]);

        std::fs::remove_file(rig.root.join("a.md")).unwrap();
        std::fs::remove_file(rig.root.join("b.md")).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // As the chunker ends a version whose file it found gone.
        let version = rig.known.lock()["kb:a.md"].clone();
        let skipped = Outcome::Skipped(crate::ledger::REMOVED_BEFORE_READ.into());
        rig.ledger.finish("kb:a.md", Some(&version), skipped);
        rig.write("a.md", "# A\n\nAlpha.");
        rig.write("b.md/c.md", "# C\n\nGamma.");
        let mut handed = Vec::new();
        wait_for(|| {
            handed.extend(rig.handed());
            handed.len() >= 2
        })
        .await;
        handed.sort();
        assert_eq!(handed, ["kb:a.md", "kb:b.md/c.md"], "a.md read again");

        wait_for(|| !rig.index_q.is_empty()).await;
        assert_eq!(rig.deleted(), ["kb:b.md"], "a folder now");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rig.handed().is_empty(), "a.md read twice");
        watcher.stop(None);
    }

    /// A version the chunker read mid-write (so not as the watcher hashed
    /// it) is read again when the watcher finds the file as it was: saved
    /// over with the same bytes, truncated first. Before, the watcher took
    /// that version as handled, and the one before it stayed in the index.
    /// One that ended otherwise, found as it is, is not read again.
    #[tokio::test]
    async fn a_version_the_chunker_found_changed_is_read_again_when_found_as_it_was() {
        let rig = Rig::new();
        rig.write("a.md", "# A\n\nAlpha.");
        let (watcher, scanned) = rig.start(true).await;
        assert_eq!(scanned, ["kb:a.md"]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let version = rig.known.lock()["kb:a.md"].clone();
        let changed = Outcome::Skipped(crate::ledger::CHANGED_WHILE_QUEUED.into());
        rig.ledger.finish("kb:a.md", Some(&version), changed);
        rig.write("a.md", "# A\n\nAlpha.");
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["kb:a.md"]);
        assert_eq!(rig.known.lock()["kb:a.md"], version);

        rig.ledger
            .finish("kb:a.md", Some(&version), Outcome::Indexed);
        rig.write("a.md", "# A\n\nAlpha.");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(rig.handed().is_empty(), "read again though indexed");
        watcher.stop(None);
    }

    /// A skip for a read race that lands after the watcher looked at the
    /// file again (a batch slow to read ahead of it, a skip told by
    /// another node), or with no event at all, has the file looked at
    /// once more; a skip of another kind does not.
    #[tokio::test]
    async fn a_version_skipped_unread_is_looked_at_again_when_the_skip_lands() {
        let rig = Rig::new();
        rig.write("a.md", "# A\n\nAlpha.");
        let (watcher, scanned) = rig.start(true).await;
        assert_eq!(scanned, ["kb:a.md"]);
        let version = rig.known.lock()["kb:a.md"].clone();
        let gone = Outcome::Skipped(crate::ledger::REMOVED_BEFORE_READ.into());
        rig.ledger.finish("kb:a.md", Some(&version), gone);
        wait_for(|| !rig.chunk_q.is_empty()).await;
        assert_eq!(rig.handed(), ["kb:a.md"]);
        let binary = Outcome::Skipped("binary content (NUL bytes)".into());
        rig.ledger.finish("kb:a.md", Some(&version), binary);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(rig.handed().is_empty(), "looked at again after a real skip");
        watcher.stop(None);
    }

    /// An index node wrote a version of a document after this node saw
    /// it deleted: it is deleted again if its file is gone, and left alone
    /// if it is there, ignored, or another ingest node's.
    #[tokio::test]
    async fn a_document_indexed_after_its_deletion_is_deleted_again() {
        let rig = Rig::new();
        rig.write("a.md", "# A");
        let (watcher, scanned) = rig.start(false).await;
        assert_eq!(scanned, ["kb:a.md"]);
        // Handled in order: once the last one's deletion is out, the
        // others were looked at.
        for id in ["kb:a.md", "wiki:gone.md", "kb:.git/gone.md", "kb:gone.md"] {
            watcher.cast(WatchMsg::CheckGone(id.into())).unwrap();
        }
        wait_for(|| !rig.index_q.is_empty()).await;
        assert_eq!(rig.deleted(), ["kb:gone.md"]);
        assert_eq!(rig.ledger.status("kb:gone.md"), Some(DocStatus::InFlight));
        assert!(rig.handed().is_empty(), "a.md is not read again");
        watcher.stop(None);
    }

    /// A burst overflows the kernel's queue many times over; each overflow
    /// that finds a rescan already waiting is served by it, so the files
    /// are walked and read once more, not once per overflow.
    #[tokio::test]
    async fn overflows_waiting_for_one_rescan_share_it() {
        use std::time::Instant;
        let rig = Rig::new();
        rig.write("a.md", "# A\n\nSome text.");
        let (stats, chunk_q) = (rig.stats.clone(), rig.chunk_q.clone());
        let (watcher, handle) = Actor::spawn(None, SourceWatcher, rig.args(false))
            .await
            .unwrap();
        // On this single-threaded runtime all five are in the mailbox,
        // behind the first scan, before the watcher handles any of them.
        for _ in 0..5 {
            watcher.cast(overflow()).unwrap();
        }
        let rescans = || {
            stats
                .note()
                .and_then(|n| n.split(' ').nth(3).map(str::to_string))
                .and_then(|n| n.parse::<u64>().ok())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while rescans().is_none() || stats.status() != "scanned" {
            assert!(Instant::now() < deadline, "{:?}", stats.note());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Time for any further rescan to show.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rescans(), Some(1), "{:?}", stats.note());
        assert!(stats.note().unwrap().contains("queue overflowed"));
        // The file was admitted once, by the first scan.
        assert_eq!(chunk_q.len(), 1);
        watcher.stop(None);
        handle.await.unwrap();
    }
}
