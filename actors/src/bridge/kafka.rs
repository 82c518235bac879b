//! The Kafka bus: topics between the stages, producers for output ports,
//! consumer tasks for stage inputs, and the `dlq` topic as dead-letter queue.
//!
//! Delivery is at-least-once. A consumer stores a message's offset only when
//! the stage it feeds has finished with it (its effect durable: the next
//! topic acked, or the index written), in order per partition, and
//! librdkafka commits stored offsets in the background. A node that dies
//! leaves its uncommitted messages to the consumers that inherit its
//! partitions; effects are idempotent (deterministic point ids, version
//! checks), so doing them twice is harmless.
//!
//! A node that gives partitions up in a rebalance lets go of their queued
//! jobs and waits for their running ones before the group hands them on
//! (see [`ConsumerState::revoke`]): done late, an old owner's job could
//! write an old version after the new owner wrote and pruned a newer one.
//! (A node the group dropped for not answering can still do so: the
//! indexer reads the store back after each write and undoes it, see
//! [`crate::indexer::overtaken`].)

use crate::dlq::{now_secs, DeadLetters, DlqEntry, Record};
use crate::messages::{Envelope, ENVELOPE_VERSION};
use crate::pool::{Ack, AckHook, Job, PoolQueue};
use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use parking_lot::{Condvar, Mutex};
use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigEntry, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The topics between the stages, without the configured prefix. (None
/// between the watcher and the chunker: a node chunks what its own watcher
/// saw, reading the file where it is mounted on that node.)
pub const CHUNKS: &str = "chunks";
pub const EMBEDDED: &str = "embedded";
pub const INDEXED: &str = "indexed";
pub const DLQ: &str = "dlq";
pub const TOPICS: [&str; 4] = [CHUNKS, EMBEDDED, INDEXED, DLQ];

#[derive(Clone, Debug)]
pub struct KafkaSettings {
    /// `host:port,host:port`
    pub brokers: String,
    pub topic_prefix: String,
    /// Consumer groups are `<group_prefix>-<role>`.
    pub group_prefix: String,
    pub partitions: i32,
    pub replication: i32,
    /// Create missing topics at start-up; otherwise a missing one is an error.
    pub create_topics: bool,
    /// A consumer pauses its partitions while its stage's queue holds this
    /// many jobs, and resumes at half of it.
    pub max_queued: usize,
    /// How long a produce may wait for the broker before it is retried.
    pub produce_timeout: Duration,
    /// The largest message ragd produces (and sets on the topics it
    /// creates): one document's embedded chunks travel as one message, at
    /// about 5 KB a chunk.
    pub max_message_bytes: usize,
}

/// librdkafka's ceiling for `message.max.bytes`.
pub const MAX_MESSAGE_BYTES: usize = 1_000_000_000;

pub struct Kafka {
    pub settings: KafkaSettings,
    producer: FutureProducer,
    consumers: Mutex<Vec<Arc<ConsumerState>>>,
}

/// What `/actors` and `/metrics` show of one consumer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConsumerView {
    pub topic: String,
    pub group: String,
    pub assigned: Vec<i32>,
    pub paused: bool,
    /// Messages behind the high watermark, per partition (librdkafka's
    /// statistics; absent until the first report).
    pub lag: BTreeMap<i32, i64>,
    pub received: u64,
    pub rejected: u64,
    /// Queued jobs let go unprocessed because their partition was revoked
    /// (their next owner runs them).
    pub let_go: u64,
}

pub struct ConsumerState {
    view: Mutex<ConsumerView>,
    /// The partitions this consumer holds, each with the offsets handed to
    /// the stage and not yet acked.
    held: Mutex<HashMap<i32, Held>>,
    /// Signalled when an offset ends (a revoke waits for the running ones).
    ended: Condvar,
    /// The last lease handed out: each holding of a partition gets its own,
    /// so an ack from an earlier holding is told apart.
    leases: AtomicU64,
    /// The node is stopping ([`Kafka::close`]): a revoke then (the
    /// consumer's close) waits for nothing, since the stages are stopping
    /// too and their running jobs may never end.
    closing: AtomicBool,
    /// Set by [`Kafka::drain`]: the consumer loop stops taking messages and
    /// drains, waiting this long for the running jobs.
    stopping: Mutex<Option<Duration>>,
    /// Told when the loop has drained.
    drained: tokio::sync::Notify,
}

/// One partition this consumer holds.
struct Held {
    lease: u64,
    /// Being revoked: its jobs are no longer this node's to start.
    revoking: bool,
    open: BTreeMap<i64, Slot>,
}

/// Where a message handed to the stage stands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    /// Queued or running.
    Open,
    /// Being dead-lettered (no stage reads it): committed once written,
    /// but not waited for at a revoke, since it touches no store.
    Rejected,
    Done,
    /// Let go unprocessed (its partition was revoked): it is never
    /// committed past.
    LetGo,
}

/// How long a revoke waits for the revoked partitions' running jobs (under
/// `max.poll.interval.ms`, past which the group would drop this member).
const REVOKE_WAIT: Duration = Duration::from_secs(20);

impl ConsumerState {
    fn new(topic: &str, group: &str) -> ConsumerState {
        ConsumerState {
            view: Mutex::new(ConsumerView {
                topic: topic.to_string(),
                group: group.to_string(),
                ..Default::default()
            }),
            held: Mutex::new(HashMap::new()),
            ended: Condvar::new(),
            leases: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            stopping: Mutex::new(None),
            drained: tokio::sync::Notify::new(),
        }
    }

    pub fn view(&self) -> ConsumerView {
        self.view.lock().clone()
    }

    /// `offset` of `partition` goes to the stage: returns its lease.
    fn open(&self, partition: i32, offset: i64) -> u64 {
        let mut held = self.held.lock();
        let h = held.entry(partition).or_insert_with(|| Held {
            lease: self.leases.fetch_add(1, Ordering::Relaxed) + 1,
            revoking: false,
            open: BTreeMap::new(),
        });
        h.open.insert(offset, Slot::Open);
        h.lease
    }

    /// `offset` is not for the stage: it is being dead-lettered.
    fn reject(&self, partition: i32, offset: i64, lease: u64) {
        let mut held = self.held.lock();
        if let Some(h) = held.get_mut(&partition).filter(|h| h.lease == lease) {
            if let Some(slot) = h.open.get_mut(&offset) {
                *slot = Slot::Rejected;
            }
        }
    }

    /// Whether a job of `partition` under `lease` is still this node's.
    fn holds(&self, partition: i32, lease: u64) -> bool {
        let held = self.held.lock();
        held.get(&partition)
            .is_some_and(|h| h.lease == lease && !h.revoking)
    }

    /// Marks `offset` as `slot`; when that moves the highest offset below
    /// which every message of the partition is done, hands it to `store`
    /// (still under the lock: a revoke that sees no job running finds
    /// their offsets stored, for the commit at the unassign) and returns
    /// it. An offset of an earlier holding of the partition (a late ack
    /// after a revoke) stores nothing.
    fn end(
        &self,
        partition: i32,
        offset: i64,
        lease: u64,
        slot: Slot,
        store: impl FnOnce(i64),
    ) -> Option<i64> {
        let mut held = self.held.lock();
        let h = held.get_mut(&partition).filter(|h| h.lease == lease)?;
        *h.open.get_mut(&offset)? = slot;
        let mut last = None;
        while let Some((&o, &Slot::Done)) = h.open.first_key_value() {
            h.open.pop_first();
            last = Some(o);
        }
        if let Some(last) = last {
            store(last);
        }
        self.ended.notify_all();
        last
    }

    /// `gone` is being revoked: no job of it starts from now on (`let_go`
    /// drops the queued ones), and the running ones are waited for, so that
    /// the partitions' next owner, which gets them only once this returns
    /// (the group's eager rebalance), never runs a job beside or after one
    /// still running here. Returns how many were let go, and how many were
    /// still running when the wait (at most `wait`) ended. `lost`: the
    /// group gave the partitions away already (this node stopped
    /// answering), and nothing is waited for.
    fn revoke(
        &self,
        gone: &[i32],
        lost: bool,
        let_go: &dyn Fn() -> usize,
        wait: Duration,
    ) -> (usize, usize) {
        for p in gone {
            if let Some(h) = self.held.lock().get_mut(p) {
                h.revoking = true;
            }
        }
        // Not under `held`: letting go takes it, for each job.
        let dropped = let_go();
        let running = |held: &HashMap<i32, Held>| -> usize {
            gone.iter()
                .filter_map(|p| held.get(p))
                .map(|h| h.open.values().filter(|s| **s == Slot::Open).count())
                .sum()
        };
        let wait = || {
            let deadline = std::time::Instant::now() + wait;
            let mut held = self.held.lock();
            while running(&held) > 0 && !self.ended.wait_until(&mut held, deadline).timed_out() {}
            running(&held)
        };
        let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        let left = match flavor {
            _ if lost || self.closing.load(Ordering::SeqCst) => running(&self.held.lock()),
            // The running jobs may need this very thread: they cannot end
            // while it waits (only tests run a consumer so).
            Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => running(&self.held.lock()),
            // The rebalance callback runs inside the consumer task's poll.
            Ok(_) => tokio::task::block_in_place(wait),
            Err(_) => wait(),
        };
        let mut held = self.held.lock();
        for p in gone {
            held.remove(p);
        }
        (dropped, left)
    }
}

impl ConsumerState {
    /// Counts `dropped` jobs let go (in `/actors` and the metric); returns
    /// the topic.
    fn count_let_go(&self, dropped: usize) -> String {
        let topic = {
            let mut v = self.view.lock();
            v.let_go += dropped as u64;
            v.topic.clone()
        };
        metrics::counter!("ragd_kafka_jobs_let_go_total", "topic" => topic.clone())
            .increment(dropped as u64);
        topic
    }

    /// [`Kafka::drain`], in the consumer's loop (which takes no message
    /// after it).
    fn drain(&self, consumer: &StreamConsumer<Ctx>, let_go: &dyn Fn() -> usize, wait: Duration) {
        let started = std::time::Instant::now();
        if let Ok(a) = consumer.assignment() {
            let _ = consumer.pause(&a);
        }
        let parts: Vec<i32> = self.held.lock().keys().copied().collect();
        let (dropped, left) = self.revoke(&parts, false, let_go, wait);
        // The stored offsets (librdkafka's commit of none commits those,
        // not the positions): what finished is not redone by the next
        // owner, even if this process ends before the consumer closes.
        let commit = || consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
        let committed = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(commit),
            _ => commit(),
        };
        let topic = self.count_let_go(dropped);
        match committed {
            // (Nothing stored since the last commit.)
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(%topic, "committing at the drain: {e}"),
        }
        if left > 0 {
            tracing::warn!(%topic, running = left, "stopping with jobs still running: they are done again by their partitions' next owner");
        } else {
            tracing::info!(%topic, queued_let_go = dropped, waited = ?started.elapsed(), "drained: running jobs finished");
        }
        self.drained.notify_one();
    }
}

/// The ack of one message: stores its offset once the stage is done with
/// it, and says whether its partition is still this consumer's.
struct OffsetAck {
    consumer: Arc<StreamConsumer<Ctx>>,
    state: Arc<ConsumerState>,
    topic: String,
    partition: i32,
    offset: i64,
    lease: u64,
}

impl AckHook for OffsetAck {
    fn done(&self) {
        let (p, o) = (self.partition, self.offset);
        self.state.end(p, o, self.lease, Slot::Done, |last| {
            // librdkafka commits last + 1, in the background. (Only marks
            // it: nothing here waits or calls back.)
            if let Err(e) = self.consumer.store_offset(&self.topic, p, last) {
                tracing::debug!(topic = %self.topic, p, "offset not stored: {e}");
            }
        });
    }

    fn held(&self) -> bool {
        self.state.holds(self.partition, self.lease)
    }

    fn let_go(&self) {
        let (p, o) = (self.partition, self.offset);
        self.state.end(p, o, self.lease, Slot::LetGo, |_| {});
    }
}

/// A client context that drops librdkafka's periodic statistics (the
/// default logs all of them at info).
struct Quiet;

impl ClientContext for Quiet {
    fn stats(&self, _: Statistics) {}
}

impl ConsumerContext for Quiet {}

struct Ctx {
    state: Arc<ConsumerState>,
    /// Lets go the stage's queued jobs that are no longer held; returns how
    /// many.
    let_go: Arc<dyn Fn() -> usize + Send + Sync>,
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        let mut view = self.state.view.lock();
        let topic = view.topic.clone();
        if let Some(t) = stats.topics.get(&topic) {
            for (p, s) in &t.partitions {
                if *p >= 0 && s.consumer_lag >= 0 {
                    view.lag.insert(*p, s.consumer_lag);
                    metrics::gauge!("ragd_kafka_consumer_lag", "topic" => topic.clone(), "partition" => p.to_string(), "group" => view.group.clone())
                        .set(s.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let gone: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            let started = std::time::Instant::now();
            let lost = consumer.assignment_lost();
            let (dropped, left) = self.state.revoke(&gone, lost, &*self.let_go, REVOKE_WAIT);
            let topic = self.state.count_let_go(dropped);
            if left > 0 {
                tracing::warn!(%topic, partitions = ?gone, running = left, "revoked with jobs still running: their partitions' next owner may run them alongside");
            } else {
                tracing::info!(%topic, partitions = ?gone, queued_let_go = dropped, waited = ?started.elapsed(), "revoking: running jobs finished");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let parts = |tpl: &TopicPartitionList| -> Vec<i32> {
            tpl.elements().iter().map(|e| e.partition()).collect()
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                // librdkafka keeps a partition the application paused paused
                // through a revoke and a new assignment, and the consumer
                // loop resumes only what it knows it paused: a partition
                // paused before a revoke (a full stage) and assigned again
                // after the stage drained was never fetched again. Resumed
                // here; the loop pauses it again if the stage is still full.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!("could not resume assigned partitions: {e}");
                }
                let mut v = self.state.view.lock();
                v.paused = false;
                v.assigned.extend(parts(tpl));
                v.assigned.sort();
                v.assigned.dedup();
                tracing::info!(topic = %v.topic, partitions = ?parts(tpl), "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                let gone = parts(tpl);
                let mut v = self.state.view.lock();
                v.assigned.retain(|p| !gone.contains(p));
                for p in &gone {
                    v.lag.remove(p);
                }
                tracing::info!(topic = %v.topic, partitions = ?gone, "partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!("rebalance failed: {e}"),
        }
    }
}

#[derive(Deserialize)]
struct Head {
    v: u32,
}

/// Decodes an envelope, rejecting any wire version but ours.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let head: Head =
        serde_json::from_slice(bytes).map_err(|e| format!("not a ragd envelope: {e}"))?;
    if head.v != ENVELOPE_VERSION {
        return Err(format!(
            "unknown envelope version {} (this node reads version {ENVELOPE_VERSION})",
            head.v
        ));
    }
    serde_json::from_slice::<Envelope<T>>(bytes)
        .map(|e| e.payload)
        .map_err(|e| format!("malformed payload: {e}"))
}

/// The document version a message this node cannot read still names (the
/// first `"version"` string in it), if it is JSON at all: its DLQ entry
/// then closes that version in the ingest ledgers. (Recorded as no version,
/// it closed the document's deletion instead, and the version's permit
/// stayed taken: a rolling upgrade that changes the envelope would stall
/// ingestion after `max_in_flight` of them.)
fn version_in(bytes: &[u8]) -> Option<String> {
    fn find(v: &serde_json::Value) -> Option<String> {
        match v {
            serde_json::Value::Object(m) => match m.get("version") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                _ => m.values().find_map(find),
            },
            serde_json::Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    find(&serde_json::from_slice(bytes).ok()?)
}

fn transient(e: &KafkaError) -> bool {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::TopicAuthorizationFailed,
        ) => false,
        // Unknown topic included: a restarting broker reports it for a moment.
        _ => true,
    }
}

impl Kafka {
    /// Connects, then makes sure every topic in `topics` exists (creating
    /// the missing ones when allowed), so a misconfigured cluster fails at
    /// start-up with the names of what is missing.
    pub async fn connect(settings: KafkaSettings) -> anyhow::Result<Arc<Kafka>> {
        let producer: FutureProducer = base_config(&settings.brokers)
            .set(
                "message.timeout.ms",
                settings.produce_timeout.as_millis().to_string(),
            )
            .set("enable.idempotence", "false")
            .set("linger.ms", "5")
            // librdkafka's default, 1 MB, is a document of ~180 chunks.
            .set("message.max.bytes", settings.max_message_bytes.to_string())
            .create()
            .context("creating the Kafka producer")?;
        let kafka = Arc::new(Kafka {
            settings,
            producer,
            consumers: Mutex::new(Vec::new()),
        });
        kafka.ensure_topics().await?;
        match kafka.dlq_expiry().await {
            Ok(Some(why)) => {
                tracing::warn!("{why}");
                metrics::gauge!("ragd_kafka_dlq_expires").set(1.0);
            }
            Ok(None) => metrics::gauge!("ragd_kafka_dlq_expires").set(0.0),
            // A broker that does not say is no reason not to start.
            Err(e) => tracing::debug!("the DLQ topic's settings are unknown: {e:#}"),
        }
        Ok(kafka)
    }

    /// What makes the DLQ topic drop entries, if anything (see
    /// [`dlq_expiry`]), as the broker describes the topic.
    pub async fn dlq_expiry(&self) -> anyhow::Result<Option<String>> {
        let admin: AdminClient<DefaultClientContext> =
            base_config(&self.settings.brokers).create()?;
        let topic = self.topic(DLQ);
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let described = admin
            .describe_configs(&[ResourceSpecifier::Topic(&topic)], &opts)
            .await
            .with_context(|| format!("describing the DLQ topic {topic}"))?;
        match described.into_iter().next() {
            Some(Ok(resource)) => Ok(dlq_expiry(&topic, &resource.entries)),
            Some(Err(code)) => anyhow::bail!("describing the DLQ topic {topic}: {code}"),
            None => Ok(None),
        }
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.settings.topic_prefix)
    }

    pub fn group(&self, role: &str) -> String {
        format!("{}-{role}", self.settings.group_prefix)
    }

    async fn existing_topics(&self) -> anyhow::Result<Vec<String>> {
        let brokers = self.settings.brokers.clone();
        let probe: BaseConsumer = base_config(&brokers).create()?;
        tokio::task::spawn_blocking(move || {
            let md = probe
                .fetch_metadata(None, Duration::from_secs(10))
                .with_context(|| format!("no Kafka broker answered at {brokers}"))?;
            Ok(md.topics().iter().map(|t| t.name().to_string()).collect())
        })
        .await?
    }

    async fn ensure_topics(&self) -> anyhow::Result<()> {
        let existing = self.existing_topics().await?;
        let missing: Vec<String> = TOPICS
            .iter()
            .map(|t| self.topic(t))
            .filter(|t| !existing.contains(t))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if !self.settings.create_topics {
            anyhow::bail!(
                "Kafka topics missing at {}: {} (create them, or set bus.create_topics = true)",
                self.settings.brokers,
                missing.join(", ")
            );
        }
        let admin: AdminClient<DefaultClientContext> =
            base_config(&self.settings.brokers).create()?;
        let dlq = self.topic(DLQ);
        let max_message = self.settings.max_message_bytes.to_string();
        let new: Vec<NewTopic> = missing
            .iter()
            .map(|t| {
                // One partition for the DLQ: its offsets are the entry ids.
                // Kept for good: an entry that expired would let the
                // watcher readmit a poison document, and could not be
                // replayed.
                let topic = |n| {
                    NewTopic::new(t, n, TopicReplication::Fixed(self.settings.replication))
                        .set("max.message.bytes", &max_message)
                };
                if *t == dlq {
                    topic(1).set("retention.ms", "-1")
                } else {
                    topic(self.settings.partitions)
                }
            })
            .collect();
        let results = admin
            .create_topics(
                &new,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .context("creating Kafka topics")?;
        let mut failed = Vec::new();
        for r in results {
            match r {
                Ok(name) => tracing::info!(topic = %name, "created Kafka topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => failed.push(format!("{name}: {code}")),
            }
        }
        anyhow::ensure!(
            failed.is_empty(),
            "could not create Kafka topics: {}",
            failed.join(", ")
        );
        Ok(())
    }

    /// Produces `payload` in an envelope keyed by `key`, and waits for the
    /// broker's ack. Transient failures (broker down, queue full, timeout)
    /// are retried with capped backoff for as long as they last.
    pub async fn publish<T: Serialize>(
        &self,
        topic: &str,
        key: &str,
        payload: &T,
    ) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(&Envelope::new(key, payload))?;
        let max = self.settings.max_message_bytes;
        if bytes.len() > max {
            // Not worth a trip to the broker, and the reason is plain.
            anyhow::bail!(
                "{key}: {} bytes on Kafka topic {topic}, over bus.max_message_bytes ({max}); raise it (and max.message.bytes of topics created before)",
                bytes.len()
            );
        }
        self.produce(topic, key, &bytes).await.map(|_| ())
    }

    async fn produce(&self, topic: &str, key: &str, bytes: &[u8]) -> anyhow::Result<i64> {
        let mut wait = Duration::from_millis(100);
        loop {
            let record = FutureRecord::to(topic).key(key).payload(bytes);
            match self.producer.send(record, Duration::from_secs(1)).await {
                Ok(d) => {
                    // Where each message landed, to trace a lost one.
                    tracing::trace!(%topic, %key, partition = d.partition, offset = d.offset, "produced");
                    return Ok(d.offset);
                }
                Err((e, _)) if transient(&e) => {
                    tracing::warn!(%topic, "produce failed, retrying in {wait:?}: {e}");
                    metrics::counter!("ragd_kafka_produce_retries_total", "topic" => topic.to_string()).increment(1);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err((e, _)) => {
                    return Err(e).with_context(|| format!("producing to Kafka topic {topic}"))
                }
            }
        }
    }

    /// Feeds `queue` from `topic` as consumer group `group`. A message that
    /// is not a readable envelope of this version goes to `dlq` (and its
    /// offset is committed: it can never succeed here).
    pub fn consume<J>(
        self: &Arc<Self>,
        topic: &str,
        group: &str,
        queue: Arc<PoolQueue<J>>,
        dlq: Arc<dyn DeadLetters>,
    ) -> anyhow::Result<Arc<ConsumerState>>
    where
        J: Job + DeserializeOwned,
    {
        let state = Arc::new(ConsumerState::new(topic, group));
        let weak = Arc::downgrade(&queue);
        // Weak: the queue holds acks, which hold the consumer.
        let let_go: Arc<dyn Fn() -> usize + Send + Sync> =
            Arc::new(move || weak.upgrade().map_or(0, |q| q.let_go_unheld()));
        let consumer: StreamConsumer<Ctx> = consumer_config(&self.settings, group)
            .set("enable.auto.offset.store", "false")
            .create_with_context(Ctx {
                state: state.clone(),
                let_go: let_go.clone(),
            })
            .with_context(|| format!("creating a Kafka consumer for {topic}"))?;
        consumer.subscribe(&[topic])?;
        self.consumers.lock().push(state.clone());
        let consumer = Arc::new(consumer);
        let (topic, high) = (topic.to_string(), self.settings.max_queued.max(1));
        let st = state.clone();
        // Rejected messages not yet dead-lettered: each holds its entry
        // and a task, so they count against the stage's room too (a run of
        // unreadable messages, say from a newer release's producers, with
        // a slow DLQ would otherwise be read at the broker's full speed).
        let rejecting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let stopping = *st.stopping.lock();
                if let Some(wait) = stopping {
                    st.drain(&consumer, &*let_go, wait);
                    return;
                }
                // Backpressure: no more from the broker while the stage is
                // full. Paused again every turn, because a rebalance hands
                // out partitions resumed (see `post_rebalance`).
                let queued = queue.len() + rejecting.load(std::sync::atomic::Ordering::SeqCst);
                let paused = st.view.lock().paused;
                if queued >= high || (paused && queued > high / 2) {
                    if let Ok(a) = consumer.assignment() {
                        let _ = consumer.pause(&a);
                    }
                    st.view.lock().paused = true;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    // recv() must still run for rebalances and heartbeats.
                } else if paused {
                    if let Ok(a) = consumer.assignment() {
                        let _ = consumer.resume(&a);
                    }
                    st.view.lock().paused = false;
                }
                let msg =
                    match tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
                        Err(_) => continue,
                        Ok(Err(e)) => {
                            tracing::warn!(%topic, "Kafka consumer: {e}");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                        Ok(Ok(m)) => m,
                    };
                let (p, o) = (msg.partition(), msg.offset());
                tracing::trace!(%topic, partition = p, offset = o, "consumed");
                let lease = st.open(p, o);
                st.view.lock().received += 1;
                let ack = Ack::with_hook(OffsetAck {
                    consumer: consumer.clone(),
                    state: st.clone(),
                    topic: topic.clone(),
                    partition: p,
                    offset: o,
                    lease,
                });
                let bytes = msg.payload().unwrap_or_default();
                match decode::<J>(bytes) {
                    Ok(job) => queue.submit_with_ack(job, ack),
                    Err(error) => {
                        st.reject(p, o, lease);
                        st.view.lock().rejected += 1;
                        let key = msg
                            .key()
                            .map(|k| String::from_utf8_lossy(k).into_owned())
                            .unwrap_or_default();
                        tracing::error!(%topic, partition = p, offset = o, "rejected message: {error}");
                        let entry = DlqEntry {
                            id: 0,
                            at: now_secs(),
                            stage: format!("bridge:{topic}"),
                            error,
                            attempts: 1,
                            doc_id: key,
                            version: version_in(bytes),
                            payload: serde_json::Value::String(
                                String::from_utf8_lossy(&bytes[..bytes.len().min(64 << 10)])
                                    .into_owned(),
                            ),
                            replayed: false,
                            settled: None,
                        };
                        // Tried again, off this loop (which must keep
                        // polling): while it is not written, this partition
                        // commits nothing past it. (Given up on at once, it
                        // stalled the partition's commits until a restart.)
                        // The DLQ's own writes wait out a broker outage, so
                        // what fails here fails for good (say, not allowed
                        // to write the topic): after about 10 minutes the
                        // message is logged (its first 64 KiB; the rest
                        // stays in the topic for its retention) and let go.
                        // (A revoke meanwhile may dead-letter it twice: at
                        // least once.)
                        let (dlq, t) = (dlq.clone(), topic.clone());
                        let rejecting = rejecting.clone();
                        rejecting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::spawn(async move {
                            let backoff = ExponentialBuilder::default()
                                .with_min_delay(Duration::from_millis(200))
                                .with_max_delay(Duration::from_secs(30))
                                .with_max_times(25);
                            let push = || {
                                let (dlq, entry) = (dlq.clone(), entry.clone());
                                async move {
                                    tokio::task::spawn_blocking(move || dlq.push(entry)).await?
                                }
                            };
                            let pushed = push
                                .retry(backoff)
                                .notify(|e, after| {
                                    tracing::error!(
                                        topic = %t, partition = p, offset = o,
                                        "could not dead-letter a rejected message: {e:#}; \
                                         again in {after:?}"
                                    )
                                })
                                .await;
                            if let Err(e) = pushed {
                                metrics::counter!("ragd_dlq_write_failures_total").increment(1);
                                tracing::error!(
                                    topic = %t, partition = p, offset = o,
                                    payload = %entry.payload,
                                    "a rejected message could not be dead-lettered, and is let \
                                     go: {e:#}"
                                );
                            }
                            ack.fire();
                            rejecting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        });
                    }
                }
            }
        });
        Ok(state)
    }

    /// Calls `f` with every event of `topic`, as group `group`, committing
    /// as it goes (for a node's own bookkeeping, e.g. the ingest ledger).
    pub fn follow<T, F>(&self, topic: &str, group: &str, f: F) -> anyhow::Result<()>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(T) + Send + 'static,
    {
        let consumer: StreamConsumer<Quiet> =
            consumer_config(&self.settings, group).create_with_context(Quiet)?;
        consumer.subscribe(&[topic])?;
        let topic = topic.to_string();
        tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(m) => match decode::<T>(m.payload().unwrap_or_default()) {
                        Ok(ev) => f(ev),
                        Err(e) => tracing::warn!(%topic, "skipping an unreadable event: {e}"),
                    },
                    Err(e) => {
                        tracing::warn!(%topic, "Kafka consumer: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(())
    }

    pub fn consumers(&self) -> Vec<ConsumerView> {
        self.consumers.lock().iter().map(|c| c.view()).collect()
    }

    /// The node is stopping, its stages still running: each consumer
    /// stops taking messages, lets its queued jobs go (the partitions' next
    /// owner gets them from the last commit) and waits up to `wait` (at
    /// most [`REVOKE_WAIT`]) for its running ones, then commits. So a
    /// rolling restart redoes no job that was running when it began, and
    /// none runs on two nodes at once. Their last revoke, when the
    /// consumers close, then waits for nothing: the stages stop next.
    pub async fn drain(&self, wait: Duration) {
        let wait = wait.min(REVOKE_WAIT);
        let consumers: Vec<Arc<ConsumerState>> = self.consumers.lock().clone();
        for c in &consumers {
            *c.stopping.lock() = Some(wait);
        }
        // (Each loop sees it within a turn, 200 ms at most.)
        let deadline = tokio::time::Instant::now() + wait + Duration::from_secs(2);
        for c in &consumers {
            if tokio::time::timeout_at(deadline, c.drained.notified())
                .await
                .is_err()
            {
                tracing::warn!(topic = %c.view.lock().topic, "the consumer did not drain in time");
            }
        }
        for c in &consumers {
            c.closing.store(true, Ordering::SeqCst);
        }
    }
}

fn base_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("socket.keepalive.enable", "true")
        .set("reconnect.backoff.max.ms", "2000");
    // librdkafka's own debug contexts (e.g. "cgrp,fetch"), into the log.
    if let Ok(debug) = std::env::var("RAGD_KAFKA_DEBUG") {
        c.set("debug", debug);
    }
    c
}

fn consumer_config(settings: &KafkaSettings, group: &str) -> ClientConfig {
    let mut c = base_config(&settings.brokers);
    // A fetch response carries at least one whole message; librdkafka
    // refuses responses over this (default 100 MB).
    let receive = (settings.max_message_bytes + (1 << 20)).max(100_000_000);
    c.set("group.id", group)
        .set("receive.message.max.bytes", receive.to_string())
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "5000")
        // recv() runs all the time (a full stage pauses partitions instead
        // of not polling), so this can stay short. It is also the rebalance
        // timeout the broker gets, i.e. how long a rebalance may wait for a
        // member that stopped answering.
        .set("max.poll.interval.ms", "30000");
    c
}

/// The DLQ on the `dlq` topic (one partition; an entry's id is its offset
/// plus one). A background reader tails the topic so `list` is a memory
/// read: the watcher asks it about every document it sees.
pub struct KafkaDlq {
    kafka: Arc<Kafka>,
    topic: String,
    entries: Arc<Mutex<crate::dlq::Held>>,
}

impl KafkaDlq {
    /// `on_entry` sees every new entry (the ingest ledger uses it to close
    /// the documents that other nodes dead-lettered).
    pub fn open(
        kafka: Arc<Kafka>,
        on_entry: impl Fn(&DlqEntry) + Send + 'static,
    ) -> anyhow::Result<Arc<KafkaDlq>> {
        let topic = kafka.topic(DLQ);
        let t = topic.clone();
        let entries = Arc::new(Mutex::new(crate::dlq::Held::new(move |id| {
            format!("the DLQ topic {t} at offset {}", id - 1)
        })));
        // (A topic made by hand with more partitions: the reader reads one,
        // and the entries in the others would be lost to it.)
        // (Just created, a broker may not have its leader yet: asked again
        // for a while.)
        let probe: BaseConsumer = base_config(&kafka.settings.brokers).create()?;
        let settled = std::time::Instant::now() + Duration::from_secs(15);
        let partitions = loop {
            let md = probe
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .with_context(|| format!("reading the DLQ topic {topic}"))?;
            let t = md.topics().first();
            let known = t.is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
            if known || std::time::Instant::now() > settled {
                break t.map_or(0, |t| t.partitions().len());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        anyhow::ensure!(
            partitions == 1,
            "the DLQ topic {topic} has {partitions} partitions; ragd needs exactly 1 (an \
             entry's id is its offset): recreate it with one"
        );
        let reader: BaseConsumer<Quiet> = consumer_config(&kafka.settings, "ragd-dlq-reader")
            .set("enable.auto.commit", "false")
            .create_with_context(Quiet)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
        reader.assign(&tpl)?;
        let (_, high) = reader
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .with_context(|| format!("reading the DLQ topic {topic}"))?;
        let next = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let (all, t, n) = (entries.clone(), topic.clone(), next.clone());
        std::thread::Builder::new()
            .name("ragd-dlq-reader".into())
            .spawn(move || loop {
                match reader.poll(Duration::from_millis(500)) {
                    Some(Ok(m)) => {
                        let id = m.offset() as u64 + 1;
                        match decode::<Record>(m.payload().unwrap_or_default()) {
                            Ok(Record::Entry(mut e)) => {
                                e.id = id;
                                on_entry(&e);
                                all.lock().insert(e);
                            }
                            Ok(Record::Replayed { id }) => {
                                all.lock().set_replayed(id, true);
                            }
                            Ok(Record::Settled { id, how }) => {
                                all.lock().set_settled(id, Some(how));
                            }
                            Err(e) => tracing::warn!(topic = %t, "unreadable DLQ record: {e}"),
                        }
                        // Only once the record is in the list: `open` returns
                        // when this reaches the end, and a listing right after
                        // must hold it.
                        n.store(m.offset() + 1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Some(Err(e)) => {
                        tracing::debug!(topic = %t, "DLQ reader: {e}");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    None => {}
                }
            })?;
        // Blocks until the entries written before this start are read, so
        // the watcher does not readmit a document that is dead-lettered.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while next.load(std::sync::atomic::Ordering::SeqCst) < high {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the DLQ topic {topic} could not be read to its end ({high} records) in 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Arc::new(KafkaDlq {
            kafka,
            topic,
            entries,
        }))
    }

    fn append(&self, record: &Record, key: &str) -> anyhow::Result<i64> {
        let bytes = serde_json::to_vec(&Envelope::new(key, record))?;
        // DeadLetters is synchronous (the pool calls it from its actor), so
        // this blocks the calling thread, with the runtime told about it.
        let handle = tokio::runtime::Handle::try_current()
            .context("the Kafka DLQ needs the tokio runtime")?;
        anyhow::ensure!(
            handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread,
            "the Kafka DLQ needs tokio's multi-thread runtime"
        );
        tokio::task::block_in_place(|| {
            handle.block_on(self.kafka.produce(&self.topic, key, &bytes))
        })
    }

    /// Waits until the reader has caught up with entry `id`.
    fn wait_for(&self, id: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if self.entries.lock().last_id() >= id {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl DeadLetters for KafkaDlq {
    fn push(&self, entry: DlqEntry) -> anyhow::Result<u64> {
        let key = entry.doc_id.clone();
        let offset = self.append(&Record::Entry(entry), &key)?;
        let id = offset as u64 + 1;
        self.wait_for(id);
        Ok(id)
    }

    fn list(&self) -> anyhow::Result<Vec<DlqEntry>> {
        Ok(self.entries.lock().list())
    }

    fn page(&self, q: &crate::dlq::PageQuery) -> anyhow::Result<crate::dlq::Page> {
        Ok(self.entries.lock().page(q))
    }

    fn get(&self, id: u64) -> anyhow::Result<Option<DlqEntry>> {
        Ok(self.entries.lock().get(id).cloned())
    }

    fn pending(&self, doc_id: &str, version: &str) -> Option<DlqEntry> {
        self.entries.lock().pending(doc_id, version)
    }

    fn pending_version(&self, version: &str) -> Option<DlqEntry> {
        self.entries.lock().pending_version(version)
    }

    fn waiting_docs(&self) -> Vec<String> {
        self.entries.lock().waiting_docs()
    }

    fn mark_replayed(&self, id: u64) -> anyhow::Result<DlqEntry> {
        // Claimed under the lock, then written: of two replays of one
        // entry at once, the second finds it claimed. (The lock is not
        // held over the write, which waits on the broker.)
        let entry = {
            let mut entries = self.entries.lock();
            let no_entry = || anyhow::anyhow!("no DLQ entry {id}");
            if entries.get(id).ok_or_else(no_entry)?.replayed {
                return Err(crate::dlq::AlreadyReplayed(id).into());
            }
            entries.set_replayed(id, true).ok_or_else(no_entry)?
        };
        if let Err(err) = self.append(&Record::Replayed { id }, &entry.doc_id) {
            // Not written: it waits for a replay again.
            self.entries.lock().set_replayed(id, false);
            return Err(err);
        }
        Ok(entry)
    }

    fn settle(
        &self,
        doc_id: &str,
        current: Option<&str>,
        how: crate::dlq::Settled,
    ) -> anyhow::Result<Vec<u64>> {
        // Claimed under the lock and written after, as a replay is.
        let ids = {
            let mut entries = self.entries.lock();
            let ids = entries.waiting_of(doc_id, current);
            for &id in &ids {
                entries.set_settled(id, Some(how));
            }
            ids
        };
        for (i, &id) in ids.iter().enumerate() {
            if let Err(err) = self.append(&Record::Settled { id, how }, doc_id) {
                // Not written: these wait again.
                let mut entries = self.entries.lock();
                for &id in &ids[i..] {
                    entries.set_settled(id, None);
                }
                return Err(err);
            }
        }
        Ok(ids)
    }
}

/// What makes a DLQ topic with these settings drop entries: a finite
/// retention (by time or size) or compaction (by document key). ragd
/// creates the topic with `retention.ms = -1`; one made by hand, or with a
/// broker's defaults (Kafka's: seven days), loses its dead letters, which
/// then can no longer be listed or replayed, and their documents are
/// admitted again at the next scan.
fn dlq_expiry(topic: &str, entries: &[ConfigEntry]) -> Option<String> {
    let value = |name: &str| {
        let entry = entries.iter().find(|e| e.name == name)?;
        entry.value.as_deref().map(str::trim)
    };
    let mut why = Vec::new();
    for key in ["retention.ms", "retention.bytes"] {
        if let Some(v) = value(key).filter(|v| *v != "-1") {
            why.push(format!("{key}={v}"));
        }
    }
    if let Some(p) = value("cleanup.policy").filter(|p| p.contains("compact")) {
        why.push(format!("cleanup.policy={p}"));
    }
    (!why.is_empty()).then(|| {
        format!(
            "the DLQ topic {topic} drops entries ({}): a dead letter it drops can no longer be \
             listed or replayed; set retention.ms=-1, retention.bytes=-1 and \
             cleanup.policy=delete on it",
            why.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::IndexedEvent;

    #[test]
    fn offsets_are_stored_only_up_to_the_first_unfinished_message() {
        let s = ConsumerState::new("t", "g");
        let lease = (10..14).map(|o| s.open(0, o)).last().unwrap();
        let one = s.open(1, 5);
        let stored = Mutex::new(Vec::new());
        let done = |p, o, lease| s.end(p, o, lease, Slot::Done, |last| stored.lock().push(last));
        // 11 and 12 finish before 10: nothing may be committed yet.
        assert_eq!(done(0, 11, lease), None);
        assert_eq!(done(0, 12, lease), None);
        // 10 finishes: everything through 12 is done.
        assert_eq!(done(0, 10, lease), Some(12));
        assert_eq!(done(0, 13, lease), Some(13));
        // Partitions are independent; unknown offsets and partitions store
        // nothing.
        assert_eq!(done(1, 5, one), Some(5));
        assert_eq!(done(1, 6, one), None);
        assert_eq!(done(7, 0, lease), None);
        assert_eq!(*stored.lock(), [12, 13, 5]);
        // A job let go is never committed past; one being dead-lettered is
        // once it is written.
        for o in 6..=10 {
            s.open(1, o);
        }
        s.reject(1, 7, one);
        assert_eq!(done(1, 6, one), Some(6));
        assert_eq!(done(1, 8, one), None, "7 is still being dead-lettered");
        assert_eq!(done(1, 7, one), Some(8));
        assert_eq!(s.end(1, 9, one, Slot::LetGo, |_| {}), None);
        assert_eq!(done(1, 10, one), None);
        assert_eq!(*stored.lock(), [12, 13, 5, 6, 8]);
    }

    /// A revoke stops the partition's queued jobs from starting, waits for
    /// the running one (not for one being dead-lettered), and from then on
    /// an ack of that holding stores nothing, even once the partition is
    /// held again.
    #[test]
    fn a_revoke_lets_queued_jobs_go_and_waits_for_the_running_ones() {
        let s = Arc::new(ConsumerState::new("t", "g"));
        let lease = s.open(0, 1);
        s.open(0, 2);
        s.open(0, 3);
        s.open(0, 4);
        s.reject(0, 4, lease);
        let other = s.open(1, 9);
        // Offset 1 is running, and ends 300 ms after the revoke began; 2
        // and 3 are queued.
        let (began, begin) = std::sync::mpsc::channel();
        let running = {
            let s = s.clone();
            std::thread::spawn(move || {
                begin.recv().unwrap();
                std::thread::sleep(Duration::from_millis(300));
                let ended = std::time::Instant::now();
                s.end(0, 1, lease, Slot::Done, |_| {});
                ended
            })
        };
        let queue = Mutex::new(vec![2, 3]);
        let let_go = || {
            let queued = std::mem::take(&mut *queue.lock());
            for &o in &queued {
                assert!(!s.holds(0, lease), "a revoked job still held");
                s.end(0, o, lease, Slot::LetGo, |_| {});
            }
            began.send(()).unwrap();
            queued.len()
        };
        assert_eq!(s.revoke(&[0], false, &let_go, REVOKE_WAIT), (2, 0));
        let returned = std::time::Instant::now();
        assert!(
            returned >= running.join().unwrap(),
            "returned before the running job ended"
        );
        assert!(s.holds(1, other), "a partition not revoked is still held");
        // Held again: the old holding's late ack stores nothing.
        let again = s.open(0, 2);
        assert!(again != lease && !s.holds(0, lease) && s.holds(0, again));
        assert_eq!(s.end(0, 2, lease, Slot::Done, |_| {}), None);
        assert_eq!(s.end(0, 2, again, Slot::Done, |_| {}), Some(2));

        // Partitions the group gave away already: nothing is waited for.
        let lease = s.open(3, 1);
        let started = std::time::Instant::now();
        assert_eq!(s.revoke(&[3], true, &|| 0, REVOKE_WAIT), (0, 1));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!s.holds(3, lease));
    }

    /// A DLQ that cannot write its first `fail` entries (the fault), then
    /// keeps them in memory.
    struct Flaky {
        fail: std::sync::atomic::AtomicU32,
        entries: Mutex<Vec<DlqEntry>>,
    }

    impl DeadLetters for Flaky {
        fn push(&self, entry: DlqEntry) -> anyhow::Result<u64> {
            use std::sync::atomic::Ordering::SeqCst;
            // (One step: a test's store of 0 is never undone by a push.)
            if (self.fail)
                .fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1))
                .is_ok()
            {
                anyhow::bail!("the DLQ is not writable now");
            }
            let mut entries = self.entries.lock();
            entries.push(entry);
            Ok(entries.len() as u64)
        }
        fn list(&self) -> anyhow::Result<Vec<DlqEntry>> {
            Ok(self.entries.lock().clone())
        }
        fn mark_replayed(&self, id: u64) -> anyhow::Result<DlqEntry> {
            anyhow::bail!("no replays here ({id})")
        }
        fn settle(
            &self,
            _: &str,
            _: Option<&str>,
            _: crate::dlq::Settled,
        ) -> anyhow::Result<Vec<u64>> {
            Ok(vec![])
        }
        fn pending(&self, _: &str, _: &str) -> Option<DlqEntry> {
            None
        }
    }

    /// A message no stage can read is dead-lettered; while the DLQ cannot
    /// take it, it is tried again (it used to be given up on, and its
    /// partition committed nothing past it until a restart), and once
    /// written, its offset is done.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_rejected_message_is_dead_lettered_once_the_dlq_takes_it() {
        let broker = crate::testkit::Tansu::start_persistent();
        let kafka = Kafka::connect(broker.settings("rejects.")).await.unwrap();
        let topic = kafka.topic(CHUNKS);
        kafka
            .produce(&topic, "kb:hr/x.md", b"\x00\x01binary")
            .await
            .unwrap();
        let dlq = Arc::new(Flaky {
            fail: 2.into(),
            entries: Mutex::new(Vec::new()),
        });
        let queue: Arc<PoolQueue<crate::messages::ChunkedDoc>> =
            PoolQueue::new(Arc::new(crate::stats::ActorStats::default()));
        let state = kafka
            .consume(&topic, "rejects-embed", queue.clone(), dlq.clone())
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let done = dlq.entries.lock().len() == 1
                && state.held.lock().values().all(|h| h.open.is_empty());
            if done {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not dead-lettered: {} entries, {} failures left, open {:?}",
                dlq.entries.lock().len(),
                dlq.fail.load(std::sync::atomic::Ordering::SeqCst),
                state
                    .held
                    .lock()
                    .values()
                    .map(|h| h.open.clone())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let e = &dlq.entries.lock()[0];
        assert_eq!(
            (e.doc_id.as_str(), e.stage.as_str()),
            ("kb:hr/x.md", "bridge:rejects.chunks")
        );
        assert!(e.error.contains("not a ragd envelope"), "{}", e.error);
        assert_eq!(queue.len(), 0);
        assert_eq!(state.view().rejected, 1);
    }

    /// A run of unreadable messages while the DLQ cannot take them: the
    /// ones waiting to be dead-lettered count against `max_queued`, so the
    /// consumer pauses rather than read (and hold) the whole run; once
    /// the DLQ takes them, every one is dead-lettered.
    #[tokio::test(flavor = "multi_thread")]
    async fn rejected_messages_waiting_for_the_dlq_hold_the_consumer_back() {
        use std::sync::atomic::Ordering::SeqCst;
        let broker = crate::testkit::Tansu::start_persistent();
        let mut settings = broker.settings("rejects-burst.");
        settings.max_queued = 4;
        let kafka = Kafka::connect(settings).await.unwrap();
        let topic = kafka.topic(CHUNKS);
        let n = 40;
        for i in 0..n {
            let key = format!("kb:hr/x{i}.md");
            kafka
                .produce(&topic, &key, b"\x00\x01binary")
                .await
                .unwrap();
        }
        let dlq = Arc::new(Flaky {
            fail: u32::MAX.into(),
            entries: Mutex::new(Vec::new()),
        });
        let queue: Arc<PoolQueue<crate::messages::ChunkedDoc>> =
            PoolQueue::new(Arc::new(crate::stats::ActorStats::default()));
        let state = kafka
            .consume(&topic, "rejects-burst-embed", queue.clone(), dlq.clone())
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while state.view().rejected < 4 {
            assert!(std::time::Instant::now() < deadline, "{:?}", state.view());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let view = state.view();
        assert!(view.rejected <= 6 && view.paused, "{view:?}");
        dlq.fail.store(0, SeqCst);
        while dlq.entries.lock().len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {n} dead-lettered; {:?}",
                dlq.entries.lock().len(),
                state.view()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(state.view().rejected, n as u64);
    }

    /// One run of a job: which node, which message (the deletion's seq),
    /// when.
    #[derive(Clone, Debug)]
    struct Ran {
        node: &'static str,
        seq: u64,
        start: std::time::Instant,
        end: std::time::Instant,
    }

    /// A stage that takes `delay` over each job and writes down its run.
    struct Recorder {
        node: &'static str,
        delay: Duration,
        runs: Arc<Mutex<Vec<Ran>>>,
        running: Arc<std::sync::atomic::AtomicUsize>,
        /// While set, a job does not end.
        hold: Arc<std::sync::atomic::AtomicBool>,
    }

    impl crate::pool::Stage for Recorder {
        type In = crate::indexer::actor::IndexJob;
        async fn process(&self, job: Self::In) -> anyhow::Result<()> {
            use std::sync::atomic::Ordering::SeqCst;
            let crate::indexer::actor::IndexJob::Delete { seq, .. } = job else {
                anyhow::bail!("not a test job");
            };
            self.running.fetch_add(1, SeqCst);
            let start = std::time::Instant::now();
            while self.hold.load(SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(self.delay).await;
            self.runs.lock().push(Ran {
                node: self.node,
                seq,
                start,
                end: std::time::Instant::now(),
            });
            self.running.fetch_sub(1, SeqCst);
            Ok(())
        }
    }

    /// A node of the `index` group on `topic`, whose stage takes `delay`
    /// per job, and holds each while `hold` is set.
    async fn index_node(
        settings: KafkaSettings,
        node: &'static str,
        (delay, hold): (Duration, bool),
        runs: Arc<Mutex<Vec<Ran>>>,
        dlq: Arc<dyn DeadLetters>,
    ) -> (
        Arc<PoolQueue<crate::indexer::actor::IndexJob>>,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicBool>,
        Arc<Kafka>,
    ) {
        let kafka = Kafka::connect(settings).await.unwrap();
        let queue = PoolQueue::new(Arc::new(crate::stats::ActorStats::default()));
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(hold));
        let stage = Recorder {
            node,
            delay,
            runs,
            running: running.clone(),
            hold: hold.clone(),
        };
        ractor::Actor::spawn(
            None,
            crate::pool::Pool::<Recorder>::default(),
            crate::pool::PoolArgs {
                name: format!("index-{node}"),
                stage: Arc::new(stage),
                queue: queue.clone(),
                settings: Default::default(),
                ledger: crate::ledger::Ledger::new(8),
                dlq: dlq.clone(),
            },
        )
        .await
        .unwrap();
        let topic = kafka.topic(EMBEDDED);
        kafka
            .consume(&topic, &kafka.group("index"), queue.clone(), dlq)
            .unwrap();
        (queue, running, hold, kafka)
    }

    /// How many test jobs [`node_a_busy`] publishes.
    const N: u64 = 16;

    /// A broker (topics prefixed `prefix`) with `N` test jobs on the index
    /// nodes' topic, and node a of the index group running the first of
    /// them (held until the test lets it end) with at least four queued.
    struct NodeABusy {
        _broker: crate::testkit::Tansu,
        _dir: tempfile::TempDir,
        settings: KafkaSettings,
        dlq: Arc<dyn DeadLetters>,
        runs: Arc<Mutex<Vec<Ran>>>,
        a: Arc<PoolQueue<crate::indexer::actor::IndexJob>>,
        a_running: Arc<std::sync::atomic::AtomicUsize>,
        a_hold: Arc<std::sync::atomic::AtomicBool>,
        a_kafka: Arc<Kafka>,
    }

    async fn node_a_busy(prefix: &str) -> NodeABusy {
        use std::sync::atomic::Ordering::SeqCst;
        let broker = crate::testkit::Tansu::start();
        let settings = broker.settings(prefix);
        let kafka = Kafka::connect(settings.clone()).await.unwrap();
        let topic = kafka.topic(EMBEDDED);
        for seq in 0..N {
            let job = crate::indexer::actor::IndexJob::Delete {
                doc_id: format!("kb:{seq}.md"),
                seq,
            };
            let key = format!("kb:{seq}.md");
            kafka.publish(&topic, &key, &job).await.unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let dlq: Arc<dyn DeadLetters> =
            Arc::new(crate::dlq::FileDlq::open(dir.path().join("dlq.jsonl")).unwrap());
        let runs = Arc::new(Mutex::new(Vec::new()));
        let slow = (Duration::from_millis(300), true);
        let (a, a_running, a_hold, a_kafka) =
            index_node(settings.clone(), "a", slow, runs.clone(), dlq.clone()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while a_running.load(SeqCst) == 0 || a.len() < 4 {
            assert!(std::time::Instant::now() < deadline, "node a took no jobs");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        NodeABusy {
            _broker: broker,
            _dir: dir,
            settings,
            dlq,
            runs,
            a,
            a_running,
            a_hold,
            a_kafka,
        }
    }

    /// When a second index node joins, the first lets go of the jobs it
    /// had queued, and the rebalance waits for the job it is running: a
    /// message is never run by two nodes at once, nor by its old owner
    /// after its new one (which could write an old version over a newer
    /// one, or back after a deletion). Nothing is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_node_that_loses_a_partition_runs_none_of_its_jobs_after_the_new_owner() {
        use std::sync::atomic::Ordering::SeqCst;
        let NodeABusy {
            settings,
            dlq,
            runs,
            a,
            a_running,
            a_hold,
            a_kafka,
            // (Bound, so they live to the test's end.)
            _broker,
            _dir,
        } = node_a_busy("revoke.").await;
        let fast = (Duration::from_millis(20), false);
        let (b, b_running, _, b_kafka) =
            index_node(settings, "b", fast, runs.clone(), dlq.clone()).await;
        // b's joining revokes a's partitions; while a's job runs, b gets
        // none of them. (Unwaited for, b had them within about 2 s.)
        tokio::time::sleep(Duration::from_secs(5)).await;
        let b_view = &b_kafka.consumers()[0];
        assert!(
            b_view.assigned.is_empty() && b_view.received == 0,
            "b was handed partitions while a still ran one of their jobs: {b_view:?}"
        );
        a_hold.store(false, SeqCst);

        // Until every message ran and both nodes are idle.
        let idle = || {
            a.is_empty()
                && b.is_empty()
                && a_running.load(SeqCst) == 0
                && b_running.load(SeqCst) == 0
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let ran: std::collections::BTreeSet<u64> = runs.lock().iter().map(|r| r.seq).collect();
            if ran.len() as u64 == N && idle() {
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                if idle() {
                    break;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not every message ran: {ran:?}; a: {:?} ({} queued); b: {:?} ({} queued)",
                a_kafka.consumers(),
                a.len(),
                b_kafka.consumers(),
                b.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let runs = runs.lock().clone();
        assert!(
            runs.iter().any(|r| r.node == "b"),
            "the new node took no partition: {runs:?}"
        );
        for seq in 0..N {
            let mut of: Vec<&Ran> = runs.iter().filter(|r| r.seq == seq).collect();
            of.sort_by_key(|r| r.start);
            for w in of.windows(2) {
                assert!(
                    w[1].start >= w[0].end,
                    "message {seq} ran on {} and {} at once: {of:?}",
                    w[0].node,
                    w[1].node
                );
            }
            if let Some(first_b) = of.iter().position(|r| r.node == "b") {
                assert!(
                    of[first_b..].iter().all(|r| r.node == "b"),
                    "message {seq} ran on its old node after its new one: {of:?}"
                );
            }
        }
        assert!(
            a_kafka.consumers()[0].let_go > 0,
            "a let no queued job go: {:?}",
            a_kafka.consumers()
        );
        assert!(dlq.list().unwrap().is_empty());
    }

    /// A node that stops (rolling restart) takes no more messages, lets its
    /// queued jobs go and finishes its running one before it leaves: the
    /// next owner of its partitions runs every other message, and none of
    /// those the stopping node finished again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_stopping_node_finishes_its_running_jobs_and_leaves_the_rest_to_the_next() {
        use std::sync::atomic::Ordering::SeqCst;
        let NodeABusy {
            settings,
            dlq,
            runs,
            a,
            a_running,
            a_hold,
            a_kafka,
            // (Bound, so they live to the test's end.)
            _broker,
            _dir,
        } = node_a_busy("drain.").await;
        let running = a_running.load(SeqCst);
        let k = a_kafka.clone();
        let drain = tokio::spawn(async move { k.drain(Duration::from_secs(20)).await });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !drain.is_finished(),
            "the drain did not wait for the running job"
        );
        a_hold.store(false, SeqCst);
        drain.await.unwrap();
        assert_eq!(a_running.load(SeqCst), 0, "the drain ended before its jobs");
        let on_a = runs.lock().len();
        assert_eq!(
            on_a,
            running,
            "a ran only what was running: {:?}",
            runs.lock()
        );
        assert!(a.is_empty(), "a kept {} jobs queued", a.len());
        assert!(
            a_kafka.consumers()[0].let_go > 0,
            "{:?}",
            a_kafka.consumers()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.lock().len(), on_a, "a ran jobs after its drain");

        let fast = (Duration::from_millis(20), false);
        let (b, b_running, _, b_kafka) = index_node(settings, "b", fast, runs.clone(), dlq).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let ran: std::collections::BTreeSet<u64> = runs.lock().iter().map(|r| r.seq).collect();
            if ran.len() as u64 == N && b.is_empty() && b_running.load(SeqCst) == 0 {
                // (Anything run twice would show by now.)
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not every message ran: {ran:?}; b: {:?}",
                b_kafka.consumers()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let runs = runs.lock().clone();
        let mut seqs: Vec<u64> = runs.iter().map(|r| r.seq).collect();
        seqs.sort();
        assert_eq!(
            seqs,
            (0..N).collect::<Vec<_>>(),
            "each message once: {runs:?}"
        );
    }

    /// A DLQ topic made by hand with more than one partition is refused
    /// with the reason: the reader reads one, and entries in the others
    /// would never be seen.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_dlq_topic_of_several_partitions_is_refused() {
        let broker = crate::testkit::Tansu::start_persistent();
        let admin: AdminClient<DefaultClientContext> =
            base_config(&broker.brokers()).create().unwrap();
        let made = admin
            .create_topics(
                &[NewTopic::new("two.dlq", 2, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .unwrap();
        assert!(made.iter().all(|r| r.is_ok()), "{made:?}");
        let kafka = Kafka::connect(broker.settings("two.")).await.unwrap();
        let err = tokio::task::spawn_blocking(move || KafkaDlq::open(kafka, |_| {}).map(|_| ()))
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("two.dlq has 2 partitions"),
            "{err:#}"
        );
    }

    /// A DLQ topic that would drop its entries is reported with what does
    /// it; the one ragd creates keeps them for good.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_dlq_topic_that_drops_entries_is_reported() {
        let broker = crate::testkit::Tansu::start_persistent();
        let admin: AdminClient<DefaultClientContext> =
            base_config(&broker.brokers()).create().unwrap();
        let week = NewTopic::new("week.dlq", 1, TopicReplication::Fixed(1))
            .set("retention.ms", "604800000");
        let made = admin
            .create_topics(&[week], &AdminOptions::new())
            .await
            .unwrap();
        assert!(made.iter().all(|r| r.is_ok()), "{made:?}");
        let kafka = Kafka::connect(broker.settings("week.")).await.unwrap();
        let why = kafka.dlq_expiry().await.unwrap().expect("reported");
        assert!(
            why.contains("week.dlq") && why.contains("retention.ms=604800000"),
            "{why}"
        );
        let kafka = Kafka::connect(broker.settings("kept.")).await.unwrap();
        assert_eq!(kafka.dlq_expiry().await.unwrap(), None);
    }

    /// As Kafka describes a topic: every setting, defaults included.
    #[test]
    fn a_finite_retention_or_compaction_drops_dead_letters() {
        let entry = |name: &str, value: &str| ConfigEntry {
            name: name.into(),
            value: Some(value.into()),
            source: rdkafka::admin::ConfigSource::Default,
            is_read_only: false,
            is_default: true,
            is_sensitive: false,
        };
        let topic = |ms, bytes, policy| {
            let entries = [
                entry("retention.ms", ms),
                entry("retention.bytes", bytes),
                entry("cleanup.policy", policy),
                entry("max.message.bytes", "1048588"),
            ];
            dlq_expiry("ragd.dlq", &entries)
        };
        assert_eq!(topic("-1", "-1", "delete"), None);
        let why = topic("604800000", "-1", "delete").unwrap();
        assert!(why.contains("(retention.ms=604800000)"), "{why}");
        let why = topic("-1", "1073741824", "compact,delete").unwrap();
        assert!(
            why.contains("retention.bytes=1073741824, cleanup.policy=compact,delete"),
            "{why}"
        );
        assert_eq!(dlq_expiry("ragd.dlq", &[]), None, "nothing said");
    }

    #[test]
    fn a_rejected_message_keeps_the_version_it_names() {
        let future = br#"{"v":9,"key":"kb:a","payload":{"Upsert":{"meta":{"doc_id":"kb:a","version":"abc"},"chunks":[]}}}"#;
        assert_eq!(version_in(future).as_deref(), Some("abc"));
        let delete = br#"{"v":9,"key":"kb:a","payload":{"Delete":{"doc_id":"kb:a","seq":3}}}"#;
        assert_eq!(version_in(delete), None);
        assert_eq!(version_in(b"\x00\x01binary"), None);
    }

    #[test]
    fn envelopes_of_another_version_or_shape_are_rejected_with_the_reason() {
        let ev = IndexedEvent::Deleted {
            doc_id: "d".into(),
            seq: 7,
        };
        let wire = serde_json::to_vec(&Envelope::new("d", &ev)).unwrap();
        assert!(matches!(
            decode::<IndexedEvent>(&wire),
            Ok(IndexedEvent::Deleted { doc_id, seq: 7 }) if doc_id == "d"
        ));
        let future = br#"{"v":2,"key":"d","payload":{"Deleted":{"doc_id":"d"}}}"#;
        let e = decode::<IndexedEvent>(future).unwrap_err();
        assert!(e.contains("unknown envelope version 2"), "{e}");
        let e = decode::<IndexedEvent>(b"\x00\x01binary").unwrap_err();
        assert!(e.contains("not a ragd envelope"), "{e}");
        let e = decode::<IndexedEvent>(br#"{"v":1,"key":"d","payload":{"Nope":1}}"#).unwrap_err();
        assert!(e.contains("malformed payload"), "{e}");
    }
}
