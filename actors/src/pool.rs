//! A supervised worker pool: the shape shared by the Chunker, Embedder,
//! Indexer and VersionPruner stages.
//!
//! The pool's queue lives in [`PoolQueue`], outside the actor, so upstream can
//! submit while the pool restarts and a restart loses nothing. Workers are
//! actors linked to the pool. A job that fails (its stage returns an error,
//! alone or inside a batch: [`JobErrors`]) waits out a retry delay that
//! doubles with each attempt ([`PoolSettings::retry_delay`]) while the other
//! jobs go on, and is dead-lettered after `max_attempts`; its worker is fine
//! and takes the next job. A worker that panics fails as an actor: the pool
//! counts the attempt the same way and restarts the worker with capped
//! exponential backoff ([`crate::supervisor`] has the delay table), and
//! gives up (escalates) when that happens too often. So a trickle of bad
//! documents costs each its own retries, not the stage's pace.
//!
//! The pool grows by one worker while jobs wait and all workers are busy, up
//! to `max`, and retires a worker that has been idle for `idle_retire`, down
//! to `min`.
//!
//! A stage whose work is cheaper in bulk (a store write, a network round
//! trip) says how many queued jobs one call may take ([`Stage::max_batch`],
//! [`Stage::max_batch_bytes`]): a worker then gets what is waiting, up to
//! that, so a burst is written in a few calls while a lone job still goes at
//! once. A batch that fails as a whole costs its jobs no attempt: they go
//! back to the front of the queue to run one at a time, so one bad job
//! cannot take its batch-mates to the DLQ, and from there on its failures
//! are its own. (The embedder's model thread merges requests from
//! different workers into one call; a call that fails is made again for
//! each request alone, so there too a failure is its own.)
//!
//! A stage whose backend stops answering (a vector store that is down past
//! its own retries, a network mount that went away) says so by marking the
//! error [`Unavailable`]. That is nobody's job's fault, so it spends no
//! job's attempts: the pool pauses the stage instead (status "paused"; the
//! jobs stay queued, so a Kafka input stops consuming), then tries one job
//! alone after `retry_base`, then after twice that, up to `retry_cap`,
//! until one gets an answer. An outage of an hour dead-letters nothing. A
//! job whose own failures merely look like an outage is found out: once
//! other jobs have succeeded since its last such failure, its next one
//! counts as an attempt.

use crate::dlq::{DeadLetters, DlqEntry};
use crate::ledger::{Ledger, Outcome};
use crate::stats::ActorStats;
use crate::supervisor::{Backoff, RestartPolicy};
use parking_lot::Mutex;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the DLQ needs to know about a job.
pub trait Job: Clone + Send + Sync + 'static {
    fn doc_id(&self) -> &str;
    fn version(&self) -> Option<&str>;
    fn payload(&self) -> serde_json::Value;
    /// Roughly how many bytes processing it holds at once (a file's size),
    /// for [`Stage::max_batch_bytes`].
    fn bytes(&self) -> u64 {
        0
    }
}

/// Marks an error as the stage's backend not answering rather than the job
/// being bad (see the module's notes): made by [`unavailable`], found by
/// [`is_unavailable`] under any context added on top. Its text is the
/// wrapped error's, whole.
#[derive(Debug)]
pub struct Unavailable(anyhow::Error);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Unavailable {}

/// `e`, marked [`Unavailable`].
pub fn unavailable(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Unavailable(e))
}

/// Whether `e`, or an error it wraps, is marked [`Unavailable`].
pub fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unavailable>())
}

/// Why a job or a batch failed, as its worker tells the pool.
#[derive(Debug)]
pub struct Failure {
    pub error: String,
    /// Marked [`Unavailable`].
    pub unavailable: bool,
}

impl Failure {
    fn of(e: &anyhow::Error) -> Failure {
        Failure {
            error: format!("{e:#}"),
            unavailable: is_unavailable(e),
        }
    }

    /// A panic: the worker's, whatever the backend's state.
    fn panic(error: String) -> Failure {
        Failure {
            error,
            unavailable: false,
        }
    }
}

/// The jobs of a batch that failed on their own, by position in the batch,
/// with their errors: each is retried or dead-lettered on its own, and the
/// rest of the batch counts as done.
pub type JobErrors = Vec<(usize, anyhow::Error)>;

/// One stage's work. `process` does the work and hands its output on.
pub trait Stage: Send + Sync + 'static {
    type In: Job;
    fn process(&self, job: Self::In) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// The most queued jobs one [`Stage::process_batch`] call may take.
    fn max_batch(&self) -> usize {
        1
    }

    /// A batch grows only while its jobs' [`Job::bytes`] stay within this
    /// (its first job goes whatever its size).
    fn max_batch_bytes(&self) -> u64 {
        u64::MAX
    }

    /// Processes `jobs` (in queue order; more than one). `Ok` names the
    /// jobs that failed on their own ([`JobErrors`]). `Err` fails the whole
    /// batch: all of its jobs go back to run alone, so whatever this did for
    /// some of them before failing must be safe to do again.
    fn process_batch(
        &self,
        jobs: Vec<Self::In>,
    ) -> impl Future<Output = anyhow::Result<JobErrors>> + Send {
        async move {
            let mut errors = JobErrors::new();
            for (i, job) in jobs.into_iter().enumerate() {
                if let Err(e) = self.process(job).await {
                    errors.push((i, e));
                }
            }
            Ok(errors)
        }
    }
}

#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub min: usize,
    pub max: usize,
    pub max_attempts: u32,
    pub idle_retire: Duration,
    /// A failed job waits `retry_base` before its second attempt, twice
    /// that before its third, and so on up to `retry_cap`; the other jobs
    /// go on meanwhile. A stage paused by an outage ([`Unavailable`]) tries
    /// again after the same delays.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// Worker restarts: for panics only (an error fails its job, not its
    /// worker).
    pub restart: RestartPolicy,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            min: 1,
            max: 1,
            max_attempts: 3,
            idle_retire: Duration::from_secs(5),
            retry_base: Duration::from_millis(200),
            retry_cap: Duration::from_secs(10),
            restart: RestartPolicy::default(),
        }
    }
}

impl PoolSettings {
    /// How long a job that has failed `attempts` times waits before the
    /// next attempt.
    pub fn retry_delay(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(16);
        self.retry_base.saturating_mul(factor).min(self.retry_cap)
    }
}

/// Called once when a job has reached its end in this stage: processed, or
/// durably dead-lettered. A Kafka input commits the job's offset then, so a
/// job that a crash interrupts is delivered again.
///
/// A job from a Kafka partition is also this node's to do only while the
/// node holds the partition ([`AckHook::held`]). One whose partition was
/// revoked is let go unprocessed when its turn comes: the new owner has it
/// again from the last commit, and doing it here too, late, could write an
/// old version after the new owner wrote and pruned against a newer one.
#[derive(Clone)]
pub struct Ack(Arc<dyn AckHook>);

/// What an [`Ack`] does; see there.
pub trait AckHook: Send + Sync {
    /// The job reached its end here.
    fn done(&self);
    /// Whether the job is still this node's to do.
    fn held(&self) -> bool {
        true
    }
    /// The job is let go unprocessed: it is no longer held.
    fn let_go(&self) {}
}

struct FnHook<F>(F);

impl<F: Fn() + Send + Sync> AckHook for FnHook<F> {
    fn done(&self) {
        (self.0)()
    }
}

impl Ack {
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Ack {
        Ack(Arc::new(FnHook(f)))
    }

    pub fn with_hook(hook: impl AckHook + 'static) -> Ack {
        Ack(Arc::new(hook))
    }

    pub fn fire(&self) {
        self.0.done()
    }
}

impl<J> Attempt<J> {
    /// Lets the job go if it is no longer this node's (see [`Ack`]); true
    /// then.
    fn let_go_unheld(&self) -> bool {
        match &self.ack {
            Some(ack) if !ack.0.held() => {
                ack.0.let_go();
                true
            }
            _ => false,
        }
    }
}

#[derive(Clone)]
struct Attempt<J> {
    job: J,
    attempt: u32,
    ack: Option<Ack>,
    /// Back from a failed batch: runs alone, so its next failure is its own.
    solo: bool,
    /// When it last failed as [`Unavailable`]: the queue's count of jobs
    /// done then. Its next such failure counts as an attempt if jobs were
    /// done since (the backend answers them, so maybe not this one).
    outage_at: Option<u64>,
}

/// The queue in front of a stage. Cloneable handle used by upstream stages.
pub struct PoolQueue<J: Job> {
    jobs: Mutex<Jobs<J>>,
    pool: Mutex<Option<ActorRef<PoolMsg<J>>>>,
    stats: Arc<ActorStats>,
    /// Jobs done so far (see `Attempt::outage_at`): here, not in the pool,
    /// so that the count goes on across the pool's restarts as the
    /// attempts it is compared with do.
    done: std::sync::atomic::AtomicU64,
}

/// The jobs ready to run, in order, and the failed ones waiting out their
/// retry delay (by when they are due, then by when they failed).
struct Jobs<J> {
    ready: VecDeque<Attempt<J>>,
    waiting: BTreeMap<(Instant, u64), Attempt<J>>,
    failures: u64,
}

impl<J> Jobs<J> {
    fn len(&self) -> usize {
        self.ready.len() + self.waiting.len()
    }

    /// Moves the waiting jobs that are due to the back of the ready ones;
    /// true if there were any.
    fn promote_due(&mut self) -> bool {
        let now = Instant::now();
        let mut moved = false;
        while let Some(entry) = self.waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
            moved = true;
        }
        moved
    }
}

impl<J: Job> PoolQueue<J> {
    pub fn new(stats: Arc<ActorStats>) -> Arc<Self> {
        Arc::new(PoolQueue {
            jobs: Mutex::new(Jobs {
                ready: VecDeque::new(),
                waiting: BTreeMap::new(),
                failures: 0,
            }),
            pool: Mutex::new(None),
            stats,
            done: Default::default(),
        })
    }

    pub fn submit(&self, job: J) {
        self.push(
            Attempt {
                job,
                attempt: 0,
                ack: None,
                solo: false,
                outage_at: None,
            },
            false,
        );
    }

    /// Like `submit`; `ack` runs when the job has reached its end here.
    pub fn submit_with_ack(&self, job: J, ack: Ack) {
        self.push(
            Attempt {
                job,
                attempt: 0,
                ack: Some(ack),
                solo: false,
                outage_at: None,
            },
            false,
        );
    }

    /// Submits `jobs` in order, with one wake-up of the pool for all.
    pub fn submit_all(&self, jobs: impl IntoIterator<Item = J>) {
        let mut queue = self.jobs.lock();
        let before = queue.len();
        queue.ready.extend(jobs.into_iter().map(|job| Attempt {
            job,
            attempt: 0,
            ack: None,
            solo: false,
            outage_at: None,
        }));
        if queue.len() > before {
            self.queued(queue);
        }
    }

    /// The queue now holds `len` jobs (waiting ones included: they are
    /// work to do, and a Kafka input's backpressure counts them): the depth
    /// gauge, and a wake-up for the pool.
    /// (Stored under the queue's lock: a depth stored after it could be
    /// one a later change already replaced, and stay so after a burst.)
    fn queued(&self, jobs: parking_lot::MutexGuard<'_, Jobs<J>>) {
        self.stats
            .queue_depth
            .store(jobs.len() as u64, Ordering::Relaxed);
        drop(jobs);
        if let Some(pool) = self.pool.lock().as_ref() {
            // A pool that is restarting picks the queue up when it starts.
            let _ = pool.cast(PoolMsg::Kick);
        }
    }

    fn push(&self, a: Attempt<J>, front: bool) {
        let mut jobs = self.jobs.lock();
        if front {
            jobs.ready.push_front(a);
        } else {
            jobs.ready.push_back(a);
        }
        self.queued(jobs);
    }

    /// Puts a failed job aside until `delay` has passed, then at the back
    /// of the queue. A timer wakes whichever pool runs the queue then.
    fn retry_after(self: &Arc<Self>, a: Attempt<J>, delay: Duration) {
        let due = Instant::now() + delay;
        let mut jobs = self.jobs.lock();
        jobs.failures += 1;
        let key = (due, jobs.failures);
        jobs.waiting.insert(key, a);
        self.stats
            .queue_depth
            .store(jobs.len() as u64, Ordering::Relaxed);
        drop(jobs);
        // Weak: a queue dropped meanwhile has no pool left to wake.
        let queue = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            if let Some(queue) = queue.upgrade() {
                let mut jobs = queue.jobs.lock();
                if jobs.promote_due() {
                    queue.queued(jobs);
                }
            }
        });
    }

    /// The next job, and up to `max - 1` more behind it, within
    /// `max_bytes` in all, while none of them is a retry (a retried job runs
    /// alone).
    fn pop_batch(&self, max: usize, max_bytes: u64) -> Vec<Attempt<J>> {
        let mut jobs = self.jobs.lock();
        // The timer does this too; here it costs one comparison, and a job
        // is never left waiting past its time by a lost wake-up.
        jobs.promote_due();
        let mut batch = Vec::new();
        // Dropped after the lock: the last ack of a Kafka consumer closes
        // it, and its revoke comes back to this queue.
        let mut gone = Vec::new();
        let mut bytes = 0u64;
        let alone = |a: &Attempt<J>| a.solo || a.attempt > 0;
        while batch.len() < max.max(1) {
            let Some(next) = jobs.ready.front() else {
                break;
            };
            if next.let_go_unheld() {
                gone.extend(jobs.ready.pop_front());
                continue;
            }
            let fits = bytes.saturating_add(next.job.bytes()) <= max_bytes;
            if !batch.is_empty() && (alone(next) || !fits) {
                break;
            }
            let a = jobs.ready.pop_front().expect("a front job");
            bytes = bytes.saturating_add(a.job.bytes());
            let stop = alone(&a);
            batch.push(a);
            if stop {
                break;
            }
        }
        self.stats
            .queue_depth
            .store(jobs.len() as u64, Ordering::Relaxed);
        drop(jobs);
        drop(gone);
        batch
    }

    /// Puts `batch` back at the front of the queue, in its order.
    fn push_all_front(&self, batch: Vec<Attempt<J>>) {
        for a in batch.into_iter().rev() {
            self.push(a, true);
        }
    }

    /// Lets go every queued job that is no longer this node's (its Kafka
    /// partition was revoked); returns how many.
    pub fn let_go_unheld(&self) -> usize {
        let mut jobs = self.jobs.lock();
        let (mut gone, kept): (Vec<_>, Vec<_>) =
            jobs.ready.drain(..).partition(|a| a.let_go_unheld());
        jobs.ready.extend(kept);
        let waiting = std::mem::take(&mut jobs.waiting);
        for (key, a) in waiting {
            if a.let_go_unheld() {
                gone.push(a);
            } else {
                jobs.waiting.insert(key, a);
            }
        }
        self.stats
            .queue_depth
            .store(jobs.len() as u64, Ordering::Relaxed);
        // Dropped after the lock (see `pop_batch`).
        drop(jobs);
        gone.len()
    }

    /// Jobs queued, those waiting out a retry delay included.
    pub fn len(&self) -> usize {
        self.jobs.lock().len()
    }

    /// Whether a job is ready to run now.
    fn has_ready(&self) -> bool {
        let mut jobs = self.jobs.lock();
        jobs.promote_due();
        !jobs.ready.is_empty()
    }

    /// Takes every job queued (tests read what a stage was handed).
    #[cfg(test)]
    pub(crate) fn drain(&self) -> Vec<J> {
        let mut jobs = self.jobs.lock();
        let waiting = std::mem::take(&mut jobs.waiting);
        let ready = jobs.ready.drain(..);
        ready.chain(waiting.into_values()).map(|a| a.job).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub enum PoolMsg<J> {
    Kick,
    /// A worker finished its batch: `Ok` with the jobs of it (by position)
    /// that failed on their own, or `Err` when the batch failed as a whole.
    Done(ActorId, Result<Vec<(usize, Failure)>, Failure>),
    Tick,
    Respawn,
    #[doc(hidden)]
    _Phantom(std::marker::PhantomData<J>),
}

pub struct Pool<S: Stage>(std::marker::PhantomData<S>);

impl<S: Stage> Default for Pool<S> {
    fn default() -> Self {
        Pool(std::marker::PhantomData)
    }
}

pub struct PoolArgs<S: Stage> {
    pub name: String,
    pub stage: Arc<S>,
    pub queue: Arc<PoolQueue<S::In>>,
    pub settings: PoolSettings,
    pub ledger: Arc<Ledger>,
    pub dlq: Arc<dyn DeadLetters>,
}

struct WorkerSlot<J> {
    actor: ActorRef<Vec<Attempt<J>>>,
    /// The jobs it holds; empty when idle.
    busy: Vec<Attempt<J>>,
    idle_since: Instant,
}

pub struct PoolState<S: Stage> {
    args: PoolArgs<S>,
    workers: HashMap<ActorId, WorkerSlot<S::In>>,
    backoff: Backoff,
    respawn_pending: bool,
    next_worker: u64,
    /// Set while the stage's backend does not answer.
    outage: Option<Outage>,
}

/// The stage is paused: its backend did not answer ([`Unavailable`]).
struct Outage {
    since: Instant,
    /// Nothing is dispatched before this; then one job alone, the probe.
    until: Instant,
    /// The wait before this probe; doubled after each probe that fails.
    pause: Duration,
    /// The worker running the probe.
    probe: Option<ActorId>,
}

/// A pool killed (its supervisor gave up, and ractor kills the group's
/// other actors with it) or whose own handler panicked is dropped without
/// `post_stop`: the jobs its workers held go back to the queue here, or
/// each would be lost and hold its ledger permit for good. (Otherwise
/// `let_go` ran already, and there is nothing left to hand back.)
impl<S: Stage> Drop for PoolState<S> {
    fn drop(&mut self) {
        Pool::let_go(self);
    }
}

impl<S: Stage> PoolState<S> {
    fn stats(&self) -> &ActorStats {
        &self.args.queue.stats
    }
}

struct Worker<S: Stage> {
    stage: Arc<S>,
    pool: ActorRef<PoolMsg<S::In>>,
}

impl<S: Stage> Actor for Worker<S> {
    type Msg = Vec<Attempt<S::In>>;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        mut batch: Vec<Attempt<S::In>>,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        // An error is the job's (or the batch's), not the worker's: the
        // pool decides the jobs' fate and the worker goes on. Only a panic
        // fails the worker as an actor, for the pool to restart it: what
        // panicked may have left it broken.
        let errors = if batch.len() == 1 {
            self.stage
                .process(batch.remove(0).job)
                .await
                .map(|()| vec![])
        } else {
            let jobs = batch.into_iter().map(|a| a.job).collect();
            self.stage.process_batch(jobs).await
        };
        let errors = errors
            .map(|errors| {
                let errors = errors.into_iter();
                errors.map(|(i, e)| (i, Failure::of(&e))).collect()
            })
            .map_err(|e| Failure::of(&e));
        let _ = self.pool.cast(PoolMsg::Done(myself.get_id(), errors));
        Ok(())
    }
}

impl<S: Stage> Pool<S> {
    async fn spawn_worker(
        myself: &ActorRef<PoolMsg<S::In>>,
        state: &mut PoolState<S>,
    ) -> Result<(), ActorProcessingErr> {
        state.next_worker += 1;
        let worker = Worker::<S> {
            stage: state.args.stage.clone(),
            pool: myself.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, worker, (), myself.get_cell()).await?;
        state.workers.insert(
            actor.get_id(),
            WorkerSlot {
                actor,
                busy: Vec::new(),
                idle_since: Instant::now(),
            },
        );
        state
            .stats()
            .workers
            .store(state.workers.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn dispatch(
        myself: &ActorRef<PoolMsg<S::In>>,
        state: &mut PoolState<S>,
    ) -> Result<(), ActorProcessingErr> {
        loop {
            if !state.args.queue.has_ready() {
                return Ok(());
            }
            // Paused: nothing until the pause is over, then one probe.
            let probe = match &state.outage {
                None => false,
                Some(o) if o.probe.is_some() || Instant::now() < o.until => return Ok(()),
                Some(_) => true,
            };
            let idle = state.workers.values_mut().find(|w| w.busy.is_empty());
            let slot = match idle {
                Some(slot) => slot,
                None => {
                    if state.workers.len() < state.args.settings.max && !state.respawn_pending {
                        Self::spawn_worker(myself, state).await?;
                        continue;
                    }
                    return Ok(());
                }
            };
            let stage = &state.args.stage;
            let (max, max_bytes) = match probe {
                true => (1, u64::MAX),
                false => (stage.max_batch(), stage.max_batch_bytes()),
            };
            let batch = state.args.queue.pop_batch(max, max_bytes);
            if batch.is_empty() {
                return Ok(());
            }
            slot.busy = batch.clone();
            if let Err(e) = slot.actor.cast(batch) {
                // The worker is going away; its failure event will follow.
                tracing::debug!("worker mailbox closed: {e}");
                if let ractor::MessagingErr::SendErr(batch) = e {
                    slot.busy.clear();
                    state.args.queue.push_all_front(batch);
                }
                return Ok(());
            }
            if let (true, Some(o)) = (probe, &mut state.outage) {
                o.probe = Some(slot.actor.get_id());
            }
        }
    }

    /// The backend did not answer `probe` (or, with none, a job that ran
    /// when it was answering): the stage pauses, or pauses longer.
    fn backend_down(
        myself: &ActorRef<PoolMsg<S::In>>,
        state: &mut PoolState<S>,
        probe: bool,
        error: &str,
    ) {
        let settings = &state.args.settings;
        let now = Instant::now();
        let pause = match &state.outage {
            None => {
                tracing::warn!(stage = %state.args.name, "pausing: the backend does not answer: {error}");
                settings.retry_base
            }
            Some(o) if probe => (o.pause * 2).min(settings.retry_cap),
            // A job that ran when the outage began: already paused.
            Some(_) => return,
        };
        let since = state.outage.as_ref().map_or(now, |o| o.since);
        state.outage = Some(Outage {
            since,
            until: now + pause,
            pause,
            probe: None,
        });
        state.stats().set_status("paused");
        myself.send_after(pause, || PoolMsg::Kick);
    }

    /// The backend answered: a paused stage goes on.
    fn backend_up(state: &mut PoolState<S>) {
        if let Some(o) = state.outage.take() {
            tracing::info!(stage = %state.args.name, "resuming: the backend answers again after {:?}", o.since.elapsed());
            state.stats().set_status("running");
        }
    }

    /// `a` failed because the backend did not answer. That costs it no
    /// attempt, unless jobs were done since its last such failure: then the
    /// backend answers others, and it may be the job after all.
    fn job_unanswered(state: &mut PoolState<S>, mut a: Attempt<S::In>, error: String) {
        let done = state.args.queue.done.load(Ordering::Relaxed);
        let forgiven = a.outage_at.is_none_or(|at| at == done);
        a.outage_at = Some(done);
        if !forgiven {
            return Self::job_failed(state, a, error);
        }
        if Self::failure_counted(state, &a, &error) {
            return;
        }
        // At the back: the next probe is another job, so one that only
        // looks like an outage cannot keep the stage paused.
        state.args.queue.push(a, false);
    }

    /// A worker failed holding `batch`. One job: that job failed. More: no
    /// job is to blame yet; each goes back to run alone (in queue order, at
    /// the front), attempts unchanged.
    fn batch_failed(state: &mut PoolState<S>, mut batch: Vec<Attempt<S::In>>, failure: Failure) {
        let error = failure.error;
        if batch.len() == 1 {
            let a = batch.remove(0);
            return match failure.unavailable {
                true => Self::job_unanswered(state, a, error),
                false => Self::job_failed(state, a, error),
            };
        }
        let stats = state.stats();
        stats.failed.fetch_add(1, Ordering::Relaxed);
        stats.set_error(format!("a batch of {}: {error}", batch.len()));
        tracing::warn!(stage = %state.args.name, jobs = batch.len(), "a batch failed; retrying its jobs one at a time: {error}");
        for a in &mut batch {
            a.solo = true;
        }
        state.args.queue.push_all_front(batch);
    }

    /// The pool is going: jobs still held by workers go back to the front
    /// of the queue, for the pool the supervisor starts next (or the next
    /// start), and the queue stops kicking this one.
    fn let_go(state: &mut PoolState<S>) {
        for (_, w) in state.workers.drain() {
            state.args.queue.push_all_front(w.busy);
        }
        *state.args.queue.pool.lock() = None;
    }

    /// Counts `a`'s failure in the stage's stats; lets it go if it is no
    /// longer this node's (true then): its partition's new owner tries it
    /// again, and dead-letters it if it must.
    fn failure_counted(state: &PoolState<S>, a: &Attempt<S::In>, error: &str) -> bool {
        let stats = state.stats();
        stats.failed.fetch_add(1, Ordering::Relaxed);
        stats.set_error(format!("{}: {error}", a.job.doc_id()));
        if !a.let_go_unheld() {
            return false;
        }
        tracing::debug!(stage = %state.args.name, doc = %a.job.doc_id(), "a failed job whose partition was revoked is let go: {error}");
        true
    }

    fn job_failed(state: &mut PoolState<S>, mut a: Attempt<S::In>, error: String) {
        a.attempt += 1;
        if Self::failure_counted(state, &a, &error) {
            return;
        }
        let delay = state.args.settings.retry_delay(a.attempt);
        if a.attempt < state.args.settings.max_attempts {
            tracing::warn!(stage = %state.args.name, doc = %a.job.doc_id(), attempt = a.attempt, "retrying in {delay:?}: {error}");
            state.args.queue.retry_after(a, delay);
            return;
        }
        tracing::error!(stage = %state.args.name, doc = %a.job.doc_id(), "dead-lettered after {} attempts: {error}", a.attempt);
        let entry = DlqEntry::for_job(&state.args.name, &error, a.attempt, &a.job);
        match state.args.dlq.push(entry) {
            Ok(_) => {
                state.args.ledger.finish(
                    a.job.doc_id(),
                    a.job.version(),
                    Outcome::DeadLettered(format!("{}: {error}", state.args.name)),
                );
                if let Some(ack) = &a.ack {
                    ack.fire();
                }
            }
            Err(e) => {
                // Losing the job is worse than retrying it forever; the
                // delay keeps that from spinning.
                tracing::error!("DLQ write failed ({e:#}); keeping the job queued");
                state.args.queue.retry_after(a, delay);
            }
        }
    }
}

impl<S: Stage> Actor for Pool<S> {
    type Msg = PoolMsg<S::In>;
    type State = PoolState<S>;
    type Arguments = PoolArgs<S>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PoolArgs<S>,
    ) -> Result<PoolState<S>, ActorProcessingErr> {
        *args.queue.pool.lock() = Some(myself.clone());
        let mut state = PoolState {
            args,
            workers: HashMap::new(),
            backoff: Backoff::default(),
            respawn_pending: false,
            next_worker: 0,
            outage: None,
        };
        for _ in 0..state.args.settings.min.max(1) {
            Self::spawn_worker(&myself, &mut state).await?;
        }
        let me = myself.clone();
        let tick = (state.args.settings.idle_retire / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                if me.cast(PoolMsg::Tick).is_err() {
                    return;
                }
            }
        });
        state.stats().set_status("running");
        Ok(state)
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut PoolState<S>,
    ) -> Result<(), ActorProcessingErr> {
        Self::dispatch(&myself, state).await
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: PoolMsg<S::In>,
        state: &mut PoolState<S>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PoolMsg::Kick | PoolMsg::_Phantom(_) => {}
            PoolMsg::Done(id, result) => {
                let batch = match state.workers.get_mut(&id) {
                    Some(slot) => {
                        slot.idle_since = Instant::now();
                        std::mem::take(&mut slot.busy)
                    }
                    None => vec![],
                };
                let probe = state.outage.as_ref().is_some_and(|o| o.probe == Some(id));
                let errors = match result {
                    Ok(errors) => errors,
                    Err(failure) => {
                        match failure.unavailable {
                            true => Self::backend_down(&myself, state, probe, &failure.error),
                            false => Self::backend_up(state),
                        }
                        if !batch.is_empty() {
                            Self::batch_failed(state, batch, failure);
                        }
                        return Self::dispatch(&myself, state).await;
                    }
                };
                let mut failed: HashMap<usize, Failure> = errors.into_iter().collect();
                // Whether the backend answered: a job done, or an error
                // of the job's own. Settled before the failures below, so
                // that they are judged against this batch's successes.
                let answered =
                    failed.len() < batch.len() || failed.values().any(|f| !f.unavailable);
                let down = failed
                    .values()
                    .find(|f| f.unavailable)
                    .map(|f| f.error.clone());
                let done = batch.len() - failed.len();
                state
                    .args
                    .queue
                    .done
                    .fetch_add(done as u64, Ordering::Relaxed);
                match (answered, down) {
                    (true, _) => Self::backend_up(state),
                    (false, Some(error)) => Self::backend_down(&myself, state, probe, &error),
                    // Nothing held (cannot happen): a probe still ended.
                    (false, None) => {
                        if let Some(o) = state.outage.as_mut().filter(|_| probe) {
                            o.probe = None;
                        }
                    }
                }
                for (i, a) in batch.into_iter().enumerate() {
                    match failed.remove(&i) {
                        Some(f) if f.unavailable => Self::job_unanswered(state, a, f.error),
                        Some(f) => Self::job_failed(state, a, f.error),
                        None => {
                            if let Some(ack) = &a.ack {
                                ack.fire();
                            }
                        }
                    }
                }
                state.stats().processed_n(done as u64);
            }
            PoolMsg::Tick => {
                let min = state.args.settings.min.max(1);
                let retire = state.args.settings.idle_retire;
                if state.workers.len() > min && !state.args.queue.has_ready() {
                    let idle = state
                        .workers
                        .iter()
                        .find(|(_, w)| w.busy.is_empty() && w.idle_since.elapsed() >= retire)
                        .map(|(id, _)| *id);
                    if let Some(id) = idle {
                        if let Some(w) = state.workers.remove(&id) {
                            w.actor.stop(Some("idle".into()));
                        }
                        state
                            .stats()
                            .workers
                            .store(state.workers.len() as u64, Ordering::Relaxed);
                    }
                }
            }
            PoolMsg::Respawn => {
                state.respawn_pending = false;
                if state.workers.len() < state.args.settings.min.max(1) {
                    Self::spawn_worker(&myself, state).await?;
                }
                let status = if state.outage.is_some() {
                    "paused"
                } else {
                    "running"
                };
                state.stats().set_status(status);
            }
        }
        Self::dispatch(&myself, state).await
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut PoolState<S>,
    ) -> Result<(), ActorProcessingErr> {
        let (id, error) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell.get_id(), Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell.get_id(), None),
            _ => return Ok(()),
        };
        let Some(slot) = state.workers.remove(&id) else {
            return Ok(());
        };
        state
            .stats()
            .workers
            .store(state.workers.len() as u64, Ordering::Relaxed);
        let Some(error) = error else {
            // A retired worker; if it still held jobs, give them back.
            state.args.queue.push_all_front(slot.busy);
            return Self::dispatch(&myself, state).await;
        };
        if let Some(o) = state.outage.as_mut().filter(|o| o.probe == Some(id)) {
            // The probe panicked: that says nothing of the backend; the
            // next job probes after the same pause.
            o.probe = None;
            o.until = Instant::now() + o.pause;
            myself.send_after(o.pause, || PoolMsg::Kick);
        }
        if !slot.busy.is_empty() {
            Self::batch_failed(state, slot.busy, Failure::panic(error.clone()));
        }
        match state.backoff.next_delay(&state.args.settings.restart) {
            Some(delay) => {
                state.stats().restarts.fetch_add(1, Ordering::Relaxed);
                if state.workers.is_empty() {
                    state.stats().set_status("restarting");
                }
                if !state.respawn_pending {
                    state.respawn_pending = true;
                    myself.send_after(delay, || PoolMsg::Respawn);
                }
                Self::dispatch(&myself, state).await
            }
            None => {
                state.stats().set_status("failed");
                // ractor skips post_stop when an actor fails: the jobs the
                // other workers hold go back to the queue here.
                Self::let_go(state);
                state.stats().workers.store(0, Ordering::Relaxed);
                Err(format!(
                    "{}: workers failed more than {} times in {:?}; escalating (last: {error})",
                    state.args.name,
                    state.args.settings.restart.max_restarts,
                    state.args.settings.restart.window
                )
                .into())
            }
        }
    }

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut PoolState<S>,
    ) -> Result<(), ActorProcessingErr> {
        Self::let_go(state);
        state.stats().set_status("stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::FileDlq;
    use std::sync::atomic::AtomicUsize;

    #[derive(Clone)]
    struct Doc(&'static str);

    impl Job for Doc {
        fn doc_id(&self) -> &str {
            self.0
        }
        fn version(&self) -> Option<&str> {
            None
        }
        fn payload(&self) -> serde_json::Value {
            serde_json::json!(self.0)
        }
    }

    /// What became of a run: how often each job was acked, the DLQ, and
    /// the pool's stats.
    struct Run {
        acks: HashMap<&'static str, usize>,
        dlq: Vec<DlqEntry>,
        stats: Arc<ActorStats>,
    }

    /// Queues `ids` (before the pool starts, so its first dispatch sees
    /// them all), runs `stage` over them with 3 attempts per job until every
    /// job is acked, then waits a little for stray second acks.
    async fn run<S: Stage<In = Doc>>(stage: Arc<S>, ids: &[&'static str]) -> Run {
        let mut settings = PoolSettings {
            max_attempts: 3,
            retry_base: Duration::from_millis(1),
            ..Default::default()
        };
        settings.restart.base = Duration::from_millis(1);
        run_with(stage, ids, settings).await
    }

    async fn run_with<S: Stage<In = Doc>>(
        stage: Arc<S>,
        ids: &[&'static str],
        settings: PoolSettings,
    ) -> Run {
        let rig = Rig::start(stage, settings, ids).await;
        rig.wait_acked(ids, Duration::from_secs(20)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        rig.finish()
    }

    /// A running pool over jobs that count their acks.
    struct Rig {
        pool: ActorRef<PoolMsg<Doc>>,
        queue: Arc<PoolQueue<Doc>>,
        acks: Mutex<HashMap<&'static str, Arc<AtomicUsize>>>,
        dlq: Arc<dyn DeadLetters>,
        stats: Arc<ActorStats>,
        _dir: tempfile::TempDir,
    }

    /// Queues `id` with an ack that counts in `acks`.
    fn submit_counted(
        queue: &PoolQueue<Doc>,
        acks: &Mutex<HashMap<&'static str, Arc<AtomicUsize>>>,
        id: &'static str,
    ) {
        let n = Arc::new(AtomicUsize::new(0));
        acks.lock().insert(id, n.clone());
        let ack = Ack::new(move || {
            n.fetch_add(1, Ordering::SeqCst);
        });
        queue.submit_with_ack(Doc(id), ack);
    }

    impl Rig {
        /// Queues `ids` before the pool starts, so its first dispatch sees
        /// them all, and starts it.
        async fn start<S: Stage<In = Doc>>(
            stage: Arc<S>,
            settings: PoolSettings,
            ids: &[&'static str],
        ) -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let dlq: Arc<dyn DeadLetters> =
                Arc::new(FileDlq::open(dir.path().join("dlq.jsonl")).unwrap());
            let stats = Arc::new(ActorStats::default());
            let queue = PoolQueue::new(stats.clone());
            let acks = Mutex::new(HashMap::new());
            for id in ids {
                submit_counted(&queue, &acks, id);
            }
            let (pool, _) = Actor::spawn(
                None,
                Pool::<S>::default(),
                PoolArgs {
                    name: "test".into(),
                    stage,
                    queue: queue.clone(),
                    settings,
                    ledger: Ledger::new(8),
                    dlq: dlq.clone(),
                },
            )
            .await
            .unwrap();
            Rig {
                pool,
                queue,
                acks,
                dlq,
                stats,
                _dir: dir,
            }
        }

        fn submit(&self, id: &'static str) {
            submit_counted(&self.queue, &self.acks, id);
        }

        fn acked(&self, id: &str) -> usize {
            self.acks.lock()[id].load(Ordering::SeqCst)
        }

        async fn wait_acked(&self, ids: &[&'static str], timeout: Duration) {
            let deadline = Instant::now() + timeout;
            while ids.iter().any(|id| self.acked(id) == 0) {
                assert!(Instant::now() < deadline, "not every job was acked");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// Stops the pool; what became of the jobs.
        fn finish(self) -> Run {
            self.pool.stop(None);
            let acks = self.acks.lock();
            Run {
                acks: acks
                    .iter()
                    .map(|(d, n)| (*d, n.load(Ordering::SeqCst)))
                    .collect(),
                dlq: self.dlq.list().unwrap(),
                stats: self.stats.clone(),
            }
        }
    }

    /// Blocks on "slow" until stopped; panics on "bad" at once.
    struct SlowAndBad;

    impl Stage for SlowAndBad {
        type In = Doc;
        async fn process(&self, job: Doc) -> anyhow::Result<()> {
            assert!(job.0 != "bad", "cannot process bad");
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
    }

    /// A pool of [`SlowAndBad`] over `queue`, its DLQ in `dir`.
    async fn slow_and_bad(
        queue: &Arc<PoolQueue<Doc>>,
        settings: PoolSettings,
        dir: &std::path::Path,
    ) -> (ActorRef<PoolMsg<Doc>>, ractor::concurrency::JoinHandle<()>) {
        Actor::spawn(
            None,
            Pool::<SlowAndBad>::default(),
            PoolArgs {
                name: "test".into(),
                stage: Arc::new(SlowAndBad),
                queue: queue.clone(),
                settings,
                ledger: Ledger::new(8),
                dlq: Arc::new(FileDlq::open(dir.join("dlq.jsonl")).unwrap()),
            },
        )
        .await
        .unwrap()
    }

    /// A pool killed from outside (its group's supervisor gave up on a
    /// sibling) hands back the job its worker held: it is not lost.
    #[tokio::test]
    async fn a_killed_pool_leaves_the_jobs_it_held_in_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let queue = PoolQueue::new(Arc::new(ActorStats::default()));
        queue.submit_all([Doc("slow")]);
        let (pool, handle) = slow_and_bad(&queue, PoolSettings::default(), dir.path()).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !queue.is_empty() {
            assert!(Instant::now() < deadline, "the job was never taken");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pool.kill();
        handle.await.unwrap();
        assert_eq!(queue.len(), 1, "the job the worker held was lost");
        assert_eq!(queue.stats.queue_depth.load(Ordering::SeqCst), 1);
    }

    /// A pool that gives up (more worker failures than its restart policy
    /// allows) leaves every job it held in the queue: the one that failed
    /// and the ones its other workers were busy with.
    #[tokio::test]
    async fn a_pool_that_gives_up_leaves_every_job_it_held_in_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(ActorStats::default());
        let queue = PoolQueue::new(stats.clone());
        queue.submit_all([Doc("slow"), Doc("bad")]);
        let mut settings = PoolSettings {
            min: 2,
            max: 2,
            max_attempts: 100,
            retry_base: Duration::ZERO,
            ..Default::default()
        };
        settings.restart.max_restarts = 0; // the first panic escalates
        let (_pool, handle) = slow_and_bad(&queue, settings, dir.path()).await;
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("the pool gave up")
            .unwrap();
        assert_eq!(stats.workers.load(Ordering::SeqCst), 0);
        // A retried job comes off the queue alone.
        let mut left = vec![];
        while !queue.is_empty() {
            left.extend(queue.pop_batch(10, u64::MAX).iter().map(|a| a.job.0));
        }
        left.sort();
        assert_eq!(left, ["bad", "slow"], "a job held by a worker was lost");
    }

    /// An ack that counts how its job ended; held while `gone` is unset.
    struct Leased {
        gone: Arc<std::sync::atomic::AtomicBool>,
        done: Arc<AtomicUsize>,
        let_go: Arc<AtomicUsize>,
    }

    impl AckHook for Leased {
        fn done(&self) {
            self.done.fetch_add(1, Ordering::SeqCst);
        }
        fn held(&self) -> bool {
            !self.gone.load(Ordering::SeqCst)
        }
        fn let_go(&self) {
            self.let_go.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Revokes the lease and fails on "bad"; processes the rest.
    struct RevokedMidway {
        gone: Arc<std::sync::atomic::AtomicBool>,
        processed: Mutex<Vec<&'static str>>,
    }

    impl Stage for RevokedMidway {
        type In = Doc;
        async fn process(&self, job: Doc) -> anyhow::Result<()> {
            if job.0 == "bad" {
                self.gone.store(true, Ordering::SeqCst);
                anyhow::bail!("failed as its partition was revoked");
            }
            self.processed.lock().push(job.0);
            Ok(())
        }
    }

    /// A job no longer this node's (its Kafka partition was revoked) is let
    /// go when its turn comes, and a failed one is let go instead of being
    /// retried or dead-lettered: never processed, never acked.
    #[tokio::test]
    async fn jobs_no_longer_held_are_let_go_unprocessed() {
        let dir = tempfile::tempdir().unwrap();
        let dlq: Arc<dyn DeadLetters> =
            Arc::new(FileDlq::open(dir.path().join("dlq.jsonl")).unwrap());
        let queue = PoolQueue::new(Arc::new(ActorStats::default()));
        let revoked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let kept = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut ends = HashMap::new();
        for (id, lease) in [("a", &kept), ("bad", &revoked), ("c", &revoked)] {
            let (done, let_go) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let hook = Leased {
                gone: lease.clone(),
                done: done.clone(),
                let_go: let_go.clone(),
            };
            queue.submit_with_ack(Doc(id), Ack::with_hook(hook));
            ends.insert(id, (done, let_go));
        }
        let stage = Arc::new(RevokedMidway {
            gone: revoked.clone(),
            processed: Mutex::new(vec![]),
        });
        let (pool, _) = Actor::spawn(
            None,
            Pool::<RevokedMidway>::default(),
            PoolArgs {
                name: "test".into(),
                stage: stage.clone(),
                queue: queue.clone(),
                // A failure is the last attempt: it would be dead-lettered.
                settings: PoolSettings {
                    max_attempts: 1,
                    ..Default::default()
                },
                ledger: Ledger::new(8),
                dlq: dlq.clone(),
            },
        )
        .await
        .unwrap();
        let ended = |id: &str| {
            let (d, l) = &ends[id];
            (d.load(Ordering::SeqCst), l.load(Ordering::SeqCst))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while ended("c") == (0, 0) {
            assert!(Instant::now() < deadline, "c never came up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        pool.stop(None);
        assert_eq!(*stage.processed.lock(), ["a"]);
        assert_eq!(ended("a"), (1, 0));
        assert_eq!(ended("bad"), (0, 1), "the failed job was not let go");
        assert_eq!(ended("c"), (0, 1));
        assert!(queue.is_empty());
        assert!(
            dlq.list().unwrap().is_empty(),
            "a revoked job was dead-lettered"
        );

        // The queue lets go of what is no longer held, at once (a revoke).
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let let_go = Arc::new(AtomicUsize::new(0));
        for lease in [&gone, &kept] {
            let hook = Leased {
                gone: lease.clone(),
                done: Arc::new(AtomicUsize::new(0)),
                let_go: let_go.clone(),
            };
            queue.submit_with_ack(Doc("x"), Ack::with_hook(hook));
        }
        assert_eq!(queue.let_go_unheld(), 1);
        assert_eq!((queue.len(), let_go.load(Ordering::SeqCst)), (1, 1));
    }

    /// The DLQ's entries: document and attempts.
    fn dead_lettered(run: &Run) -> Vec<(&str, u32)> {
        let entries = run.dlq.iter();
        entries.map(|e| (e.doc_id.as_str(), e.attempts)).collect()
    }

    /// The DLQ holds exactly "bad", after its three attempts.
    fn only_bad_dead_lettered(run: &Run) {
        assert_eq!(dead_lettered(run), [("bad", 3)]);
    }

    /// Fails every attempt at "bad", succeeds at anything else.
    struct Picky;

    impl Stage for Picky {
        type In = Doc;
        async fn process(&self, job: Doc) -> anyhow::Result<()> {
            anyhow::ensure!(job.0 != "bad", "cannot process {}", job.0);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_job_is_acked_once_when_processed_or_when_dead_lettered_never_on_a_retry() {
        let run = run(Arc::new(Picky), &["good", "bad"]).await;
        // "bad" is acked only after its third attempt, once in the DLQ.
        assert_eq!(run.acks, HashMap::from([("good", 1), ("bad", 1)]));
        only_bad_dead_lettered(&run);
    }

    /// Takes up to four jobs at once and fails any batch holding "bad".
    #[derive(Default)]
    struct Batchy {
        batches: Mutex<Vec<Vec<&'static str>>>,
    }

    impl Stage for Batchy {
        type In = Doc;
        async fn process(&self, job: Doc) -> anyhow::Result<()> {
            self.process_batch(vec![job]).await.map(|_| ())
        }
        fn max_batch(&self) -> usize {
            4
        }
        async fn process_batch(&self, jobs: Vec<Doc>) -> anyhow::Result<JobErrors> {
            let ids: Vec<&'static str> = jobs.iter().map(|d| d.0).collect();
            let bad = ids.contains(&"bad");
            self.batches.lock().push(ids);
            anyhow::ensure!(!bad, "cannot process bad");
            Ok(vec![])
        }
    }

    #[tokio::test]
    async fn a_failed_batch_retries_its_jobs_alone_so_only_the_bad_one_is_dead_lettered() {
        let stage = Arc::new(Batchy::default());
        let ids = ["0", "1", "2", "3", "4", "bad", "6", "7", "8", "9"];
        let run = run(stage.clone(), &ids).await;
        assert!(run.acks.values().all(|n| *n == 1), "{:?}", run.acks);
        // The failed batch cost "bad" no attempt: three of its own.
        only_bad_dead_lettered(&run);
        let batches = stage.batches.lock().clone();
        assert_eq!(
            batches[0],
            vec!["0", "1", "2", "3"],
            "a drain, up to the limit"
        );
        assert!(batches.iter().all(|b| b.len() <= 4));
        assert_eq!(
            batches
                .iter()
                .filter(|b| b.len() > 1 && b.contains(&"bad"))
                .count(),
            1,
            "after its batch failed, the bad job only ran alone: {batches:?}"
        );
        // Each good job succeeded once, in queue order.
        let succeeded: Vec<&str> = batches
            .iter()
            .filter(|b| !b.contains(&"bad"))
            .flatten()
            .copied()
            .collect();
        assert_eq!(succeeded, ["0", "1", "2", "3", "4", "6", "7", "8", "9"]);
        assert!(
            batches.contains(&vec!["8", "9"]),
            "new jobs are batched again after the retries: {batches:?}"
        );
    }

    /// Picky's rule, four jobs at a time, each job's failure its own (the
    /// default `process_batch`).
    struct PickyBatches;

    impl Stage for PickyBatches {
        type In = Doc;
        async fn process(&self, job: Doc) -> anyhow::Result<()> {
            Picky.process(job).await
        }
        fn max_batch(&self) -> usize {
            4
        }
    }

    #[tokio::test]
    async fn a_job_that_fails_inside_a_batch_fails_alone() {
        // [0, 1, bad, 3] first; then 4, and bad's retries, one at a time.
        let run = run(Arc::new(PickyBatches), &["0", "1", "bad", "3", "4"]).await;
        assert_eq!(
            run.stats.restarts.load(Ordering::SeqCst),
            0,
            "a job's error restarts no worker, inside a batch or alone"
        );
        assert!(run.acks.values().all(|n| *n == 1), "{:?}", run.acks);
        only_bad_dead_lettered(&run);
        assert_eq!(
            run.stats.processed.load(Ordering::SeqCst),
            4,
            "the good four"
        );
        assert_eq!(
            run.stats.failed.load(Ordering::SeqCst),
            3,
            "bad's three attempts"
        );
    }

    /// A stream of bad jobs among good ones: no worker restarts, so even a
    /// pool that escalates at its first restart keeps going; each bad job
    /// takes its own attempts to the DLQ and each good one is done once.
    #[tokio::test]
    async fn job_errors_restart_no_worker_however_many() {
        let ids: Vec<&'static str> = (0..60)
            .map(|i| if i % 2 == 0 { "bad" } else { "good" })
            .enumerate()
            .map(|(i, kind)| &*Box::leak(format!("{kind}-{i}").into_boxed_str()))
            .collect();
        let mut settings = PoolSettings {
            min: 2,
            max: 2,
            max_attempts: 3,
            retry_base: Duration::from_millis(1),
            ..Default::default()
        };
        settings.restart.max_restarts = 0;
        let run = run_with(Arc::new(BadPrefix), &ids, settings).await;
        assert_eq!(run.stats.restarts.load(Ordering::SeqCst), 0);
        assert_ne!(run.stats.status(), "failed", "the pool gave up");
        assert!(run.acks.values().all(|n| *n == 1), "{:?}", run.acks);
        assert_eq!(run.stats.processed.load(Ordering::SeqCst), 30);
        assert_eq!(run.stats.failed.load(Ordering::SeqCst), 90);
        assert_eq!(run.dlq.len(), 30);
        assert!(run
            .dlq
            .iter()
            .all(|e| e.doc_id.starts_with("bad") && e.attempts == 3));
    }

    /// Fails any job whose id starts with "bad".
    struct BadPrefix;

    impl Stage for BadPrefix {
        type In = Doc;
        async fn process(&self, job: Doc) -> anyhow::Result<()> {
            anyhow::ensure!(!job.0.starts_with("bad"), "cannot process {}", job.0);
            Ok(())
        }
    }

    /// Records when each job was tried; fails "bad".
    #[derive(Default)]
    struct Timed {
        tries: Mutex<Vec<(&'static str, Instant)>>,
    }

    impl Stage for Timed {
        type In = Doc;
        async fn process(&self, job: Doc) -> anyhow::Result<()> {
            self.tries.lock().push((job.0, Instant::now()));
            anyhow::ensure!(job.0 != "bad", "cannot process bad");
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(())
        }
    }

    /// A failed job waits out its retry delay, doubled at each attempt,
    /// while the jobs behind it run; then it is dead-lettered.
    #[tokio::test]
    async fn a_failed_job_waits_its_retry_delay_while_the_others_go_on() {
        let stage = Arc::new(Timed::default());
        let settings = PoolSettings {
            max_attempts: 3,
            retry_base: Duration::from_millis(300),
            ..Default::default()
        };
        let run = run_with(stage.clone(), &["bad", "a", "b", "c"], settings).await;
        only_bad_dead_lettered(&run);
        assert_eq!(run.stats.restarts.load(Ordering::SeqCst), 0);
        let tries = stage.tries.lock().clone();
        let order: Vec<&str> = tries.iter().map(|(id, _)| *id).collect();
        assert_eq!(order, ["bad", "a", "b", "c", "bad", "bad"]);
        let bad: Vec<Instant> = tries
            .iter()
            .filter(|(id, _)| *id == "bad")
            .map(|(_, t)| *t)
            .collect();
        let (first, second) = (bad[1] - bad[0], bad[2] - bad[1]);
        assert!(first >= Duration::from_millis(300), "{first:?}");
        assert!(first < Duration::from_millis(550), "{first:?}");
        assert!(second >= Duration::from_millis(600), "{second:?}");
        assert_eq!(
            PoolSettings::default().retry_delay(30),
            Duration::from_secs(10),
            "capped"
        );
    }

    /// Panics on "boom"; anything else is fine.
    struct Panicky;

    impl Stage for Panicky {
        type In = Doc;
        async fn process(&self, job: Doc) -> anyhow::Result<()> {
            assert!(job.0 != "boom", "the stage broke on boom");
            Ok(())
        }
    }

    /// A panic may leave its worker broken: the worker is restarted, and
    /// the job's attempt counted as for an error.
    #[tokio::test]
    async fn a_panicking_job_restarts_its_worker_and_is_dead_lettered() {
        let run = run(Arc::new(Panicky), &["boom", "fine"]).await;
        assert_eq!(run.stats.restarts.load(Ordering::SeqCst), 3);
        assert_eq!(run.acks, HashMap::from([("boom", 1), ("fine", 1)]));
        assert_eq!(dead_lettered(&run), [("boom", 3)]);
        assert!(
            run.dlq[0].error.contains("the stage broke on boom"),
            "{:?}",
            run.dlq[0].error
        );
    }

    #[test]
    fn an_outage_is_found_under_any_context_and_keeps_its_text() {
        let e = unavailable(anyhow::anyhow!("connection refused").context("qdrant upsert"));
        let e = e.context("writing 3 documents");
        assert!(is_unavailable(&e));
        assert_eq!(
            format!("{e:#}"),
            "writing 3 documents: qdrant upsert: connection refused"
        );
        assert!(!is_unavailable(&anyhow::anyhow!("not a PDF")));
        // Only the mark counts, not the words.
        assert!(!is_unavailable(&anyhow::anyhow!("backend unavailable")));
    }

    /// Four jobs at a time; while the backend is down (until `up_at`),
    /// every batch fails as [`Unavailable`]. Records when it was called.
    struct Backend {
        up_at: Instant,
        calls: Mutex<Vec<(usize, Instant)>>,
    }

    impl Stage for Backend {
        type In = Doc;
        async fn process(&self, job: Doc) -> anyhow::Result<()> {
            self.process_batch(vec![job]).await.map(|_| ())
        }
        fn max_batch(&self) -> usize {
            4
        }
        async fn process_batch(&self, jobs: Vec<Doc>) -> anyhow::Result<JobErrors> {
            let now = Instant::now();
            self.calls.lock().push((jobs.len(), now));
            if now < self.up_at {
                return Err(unavailable(anyhow::anyhow!("connection refused")));
            }
            Ok(vec![])
        }
    }

    /// While the backend does not answer, the stage is paused: it tries one
    /// job alone after each pause, the pause doubling up to `retry_cap`, and
    /// no job spends an attempt. When the backend is back, every job is done
    /// once and none was dead-lettered.
    #[tokio::test]
    async fn a_backend_outage_pauses_the_stage_and_dead_letters_nothing() {
        let outage = Duration::from_millis(1500);
        let stage = Arc::new(Backend {
            up_at: Instant::now() + outage,
            calls: Mutex::new(vec![]),
        });
        let settings = PoolSettings {
            min: 2,
            max: 2,
            max_attempts: 2,
            retry_base: Duration::from_millis(20),
            retry_cap: Duration::from_millis(160),
            ..Default::default()
        };
        let ids: Vec<&'static str> = (0..20)
            .map(|i| &*Box::leak(format!("doc-{i}").into_boxed_str()))
            .collect();
        let rig = Rig::start(stage.clone(), settings, &ids).await;
        tokio::time::sleep(outage / 2).await;
        assert_eq!(rig.stats.status(), "paused");
        assert_eq!(rig.queue.len(), 20, "a job left the queue");
        let error = rig.stats.last_error().unwrap_or_default();
        assert!(error.contains("connection refused"), "{error}");
        rig.wait_acked(&ids, Duration::from_secs(20)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(rig.stats.status(), "running");
        let run = rig.finish();
        assert!(
            run.dlq.is_empty(),
            "dead-lettered: {:?}",
            dead_lettered(&run)
        );
        assert!(run.acks.values().all(|n| *n == 1), "{:?}", run.acks);
        assert_eq!(run.stats.processed.load(Ordering::SeqCst), 20);

        let calls = stage.calls.lock().clone();
        let down: Vec<_> = calls.iter().filter(|(_, t)| *t < stage.up_at).collect();
        // The two workers' first batches, then probes of one job each:
        // the first after 20 ms, then twice the pause before, up to 160.
        let probes: Vec<Instant> = down.iter().skip(2).map(|(_, t)| *t).collect();
        assert!(down.iter().skip(2).all(|(n, _)| *n == 1), "{down:?}");
        assert!(probes[0] - down[0].1 >= Duration::from_millis(20));
        let gaps: Vec<Duration> = probes.windows(2).map(|w| w[1] - w[0]).collect();
        for (gap, least) in gaps.iter().zip([40, 80, 160, 160, 160]) {
            assert!(*gap >= Duration::from_millis(least), "{gaps:?}");
        }
        assert!(
            gaps.iter().all(|g| *g < Duration::from_millis(600)),
            "a pause past the cap: {gaps:?}"
        );
        // About 1.5 s of 20 + 40 + 80 + 160… ms pauses: a dozen probes, not
        // a retry storm.
        assert!((6..=16).contains(&down.len()), "{} calls", down.len());
    }

    /// "poison" always fails as if the backend were down; the rest is fine.
    struct Poison;

    impl Stage for Poison {
        type In = Doc;
        async fn process(&self, job: Doc) -> anyhow::Result<()> {
            if job.0 == "poison" {
                return Err(unavailable(anyhow::anyhow!("timed out")));
            }
            Ok(())
        }
    }

    /// A job whose own failures look like an outage holds the stage only
    /// while nothing else gets through: once other jobs succeed between its
    /// failures, those count as its attempts and it is dead-lettered.
    #[tokio::test]
    async fn a_job_that_only_looks_like_an_outage_is_dead_lettered_once_others_succeed() {
        let settings = PoolSettings {
            max_attempts: 3,
            retry_base: Duration::from_millis(5),
            retry_cap: Duration::from_millis(40),
            ..Default::default()
        };
        let rig = Rig::start(Arc::new(Poison), settings, &["poison", "a", "b"]).await;
        rig.wait_acked(&["a", "b"], Duration::from_secs(10)).await;
        // Alone in the queue, it cannot be told from an outage: it is kept.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rig.acked("poison"), 0);
        assert_eq!(rig.queue.len(), 1);
        assert_eq!(rig.stats.status(), "paused");
        // Other jobs keep coming and are done: it is found out.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut i = 0;
        while rig.acked("poison") == 0 {
            assert!(Instant::now() < deadline, "poison was never dead-lettered");
            rig.submit(Box::leak(format!("more-{i}").into_boxed_str()));
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let run = rig.finish();
        assert_eq!(dead_lettered(&run), [("poison", 3)]);
        assert!(run.acks.values().all(|n| *n == 1), "{:?}", run.acks);
    }
}
