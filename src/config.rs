//! Configuration: raw TOML (serde, unknown fields rejected) with `RAGD_…`
//! environment overrides, validated into [`Config`] with every problem
//! reported at once.
//!
//! Relative paths are relative to the config file's folder, so a config works
//! from any working directory.
//!
//! Environment overrides: `RAGD_<KEY>` for top-level keys and
//! `RAGD_<SECTION>__<KEY>` inside a section (double underscore), e.g.
//! `RAGD_DATA_DIR=/var/lib/ragd`, `RAGD_QUERY__BIND=0.0.0.0:8080`,
//! `RAGD_ADMIN__TOKEN=…`. Values are read as TOML scalars when they parse as
//! one (numbers, booleans), as strings otherwise.

use ragd_actors::messages::Partition;
use ragd_actors::model::Device;
use ragd_actors::source_watcher::{PartitionRule, SourceSpec};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

const SECTIONS: &[&str] = &[
    "data_dir", "model", "reranker", "chunker", "embedder", "pipeline", "index", "cache", "query",
    "admin", "llm", "node", "bus",
];

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    #[serde(default)]
    model: RawModel,
    #[serde(default)]
    reranker: RawReranker,
    #[serde(default)]
    chunker: RawChunker,
    #[serde(default)]
    embedder: RawEmbedder,
    #[serde(default)]
    pipeline: RawPipeline,
    #[serde(default)]
    index: RawIndex,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    query: RawQuery,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    llm: RawLlm,
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    bus: RawBus,
    #[serde(default)]
    sources: Vec<RawSource>,
    #[serde(default)]
    principals: Vec<RawPrincipal>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawModel {
    embedder: Option<PathBuf>,
    device: Option<Device>,
    batch_max_tokens: Option<usize>,
    batch_max_size: Option<usize>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawReranker {
    model: Option<PathBuf>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawChunker {
    max_tokens: Option<usize>,
    overlap_tokens: Option<usize>,
    max_file_bytes: Option<u64>,
    /// A fixed pool: min_workers = max_workers = workers (the key of
    /// configs written before the pool grew on its own).
    workers: Option<usize>,
    min_workers: Option<usize>,
    max_workers: Option<usize>,
    pdf_memory_mb: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawEmbedder {
    min_workers: Option<usize>,
    max_workers: Option<usize>,
    deleted_vectors_mb: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    max_in_flight: Option<usize>,
    max_in_flight_mb: Option<u64>,
    max_attempts: Option<u32>,
    retry_base_ms: Option<u64>,
    retry_cap_ms: Option<u64>,
    debounce_ms: Option<u64>,
    delete_grace_ms: Option<u64>,
    max_write_wait_ms: Option<u64>,
    forget_deleted_after_secs: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawIndex {
    backend: Option<String>,
    optimize_every: Option<u64>,
    optimize_idle_ms: Option<u64>,
    hnsw_m: Option<usize>,
    hnsw_ef_construct: Option<usize>,
    hnsw_ef: Option<usize>,
    min_free_mb: Option<u64>,
    qdrant_url: Option<String>,
    qdrant_collection: Option<String>,
    qdrant_api_key_env: Option<String>,
    shard_number: Option<u32>,
    replication_factor: Option<u32>,
    timeout_ms: Option<u64>,
    max_retries: Option<usize>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    backend: Option<String>,
    threshold: Option<f32>,
    capacity: Option<usize>,
    ttl_secs: Option<u64>,
    redis_url: Option<String>,
    redis_index: Option<String>,
    redis_prefix: Option<String>,
    redis_timeout_ms: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawLlm {
    base_url: Option<String>,
    model: Option<String>,
    api_key_env: Option<String>,
    timeout_secs: Option<f64>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    max_retries: Option<usize>,
    retry_budget_secs: Option<f64>,
    min_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<String>,
    roles: Option<Vec<String>>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawBus {
    backend: Option<String>,
    brokers: Option<String>,
    topic_prefix: Option<String>,
    group_prefix: Option<String>,
    partitions: Option<i32>,
    replication: Option<i32>,
    create_topics: Option<bool>,
    max_queued: Option<usize>,
    produce_timeout_ms: Option<u64>,
    max_message_bytes: Option<usize>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    bind: Option<String>,
    candidates: Option<usize>,
    max_top_k: Option<usize>,
    latency_budget_ms: Option<u64>,
    max_concurrent: Option<usize>,
    timeout_secs: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    bind: Option<String>,
    token: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Option<String>,
    path: PathBuf,
    division: String,
    access_level: String,
    #[serde(default)]
    rules: Vec<RawRule>,
    /// Poll the tree every this many seconds instead of taking file events.
    poll_secs: Option<f64>,
    /// The root is a mount point: unmounted, it counts as missing.
    #[serde(default)]
    mount_point: bool,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawRule {
    prefix: String,
    division: String,
    access_level: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    name: String,
    token: String,
    divisions: Vec<String>,
    access_levels: Vec<String>,
}

impl fmt::Debug for RawPrincipal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A secret that never shows up in logs or Debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Clone, Debug)]
pub struct Principal {
    pub name: String,
    pub token: Secret,
    pub divisions: Vec<String>,
    pub access_levels: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub data_dir: PathBuf,
    pub embedder_model: PathBuf,
    pub device: Device,
    pub batch_max_tokens: usize,
    pub batch_max_size: usize,
    pub reranker_model: Option<PathBuf>,
    pub chunk_max_tokens: usize,
    pub chunk_overlap_tokens: usize,
    pub max_file_bytes: u64,
    /// The chunker pool's size: it grows from min to max while files wait
    /// to be parsed (see [`default_chunker_workers`]).
    pub chunker_min_workers: usize,
    pub chunker_max_workers: usize,
    /// The memory a PDF's parser child may take (see chunker::pdf).
    pub pdf_memory_bytes: u64,
    pub embedder_min_workers: usize,
    pub embedder_max_workers: usize,
    /// The memory for the vectors of documents just deleted (see
    /// `ragd_actors::embedder::deleted`); 0: none kept.
    pub deleted_vectors_bytes: u64,
    pub max_in_flight: usize,
    /// The bytes of the documents in flight at once (see
    /// `ragd_actors::ledger`).
    pub max_in_flight_bytes: u64,
    pub max_attempts: u32,
    /// A failed attempt's wait before the next: `retry_base`, doubled per
    /// attempt, at most `retry_cap` (see `PoolSettings::retry_delay`).
    pub retry_base: std::time::Duration,
    pub retry_cap: std::time::Duration,
    pub debounce_ms: u64,
    /// How long a file must stay gone before it is deleted (see
    /// `WatcherArgs::delete_grace`).
    pub delete_grace: std::time::Duration,
    /// How long a file written to without a pause waits before it is read
    /// anyway (see `WatcherArgs::max_write_wait`).
    pub max_write_wait: std::time::Duration,
    /// How long the ledger remembers a deleted document once its deletion
    /// settled (see `Ledger::with_memory`).
    pub forget_deleted_after: std::time::Duration,
    pub optimize_every: u64,
    pub optimize_idle: std::time::Duration,
    pub hnsw: ragd_actors::indexer::HnswSettings,
    /// The embedded store's writes wait while its disk has less free (see
    /// `EdgeStore::set_min_free`); 0: never.
    pub min_free_bytes: u64,
    pub cache_threshold: f32,
    pub cache_capacity: usize,
    pub cache_ttl_secs: u64,
    pub cache_backend: CacheBackend,
    pub index_backend: IndexBackend,
    /// None: no LLM configured, `answer` stays null.
    pub llm: Option<crate::llm::LlmConfig>,
    pub query_bind: SocketAddr,
    pub candidates: usize,
    pub max_top_k: usize,
    /// Target for embed + cache + search + rerank of one query; the
    /// reranker scores fewer candidates to meet it. None: no budget.
    pub latency_budget: Option<std::time::Duration>,
    /// The most one query may take, LLM included: past it the caller gets
    /// 504 naming the step it was at, and its slot is free again.
    pub query_timeout: std::time::Duration,
    /// Queries a node answers at once; past it, 503 with Retry-After.
    pub max_concurrent_queries: usize,
    pub admin_bind: SocketAddr,
    pub admin_token: Option<Secret>,
    /// Unsafe but allowed settings, logged at start and printed by `check`.
    pub warnings: Vec<String>,
    /// Settings a serving node refuses (see [`Config::servable`]); client
    /// commands that only read the config (`ask`, `status`) still work.
    pub refusals: Vec<String>,
    pub sources: Vec<SourceSpec>,
    pub principals: Vec<Principal>,
    /// This node's name: its ledger follows the cluster under it.
    pub node_name: String,
    pub roles: Roles,
    pub bus: Bus,
}

/// Which stages this node runs (`[node] roles`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    pub ingest: bool,
    pub embed: bool,
    pub index: bool,
    pub query: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        ingest: true,
        embed: true,
        index: true,
        query: true,
    };

    pub fn names(&self) -> Vec<&'static str> {
        [
            ("ingest", self.ingest),
            ("embed", self.embed),
            ("index", self.index),
            ("query", self.query),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| n)
        .collect()
    }
}

#[derive(Clone, Debug)]
pub enum Bus {
    /// Stages talk through actor mailboxes (one node).
    Local,
    Kafka(ragd_actors::bridge::kafka::KafkaSettings),
}

#[derive(Clone, Debug, PartialEq)]
pub enum IndexBackend {
    Embedded,
    Qdrant {
        url: String,
        collection: String,
        api_key: Option<Secret>,
        shard_number: u32,
        replication_factor: u32,
        timeout: std::time::Duration,
        max_retries: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum CacheBackend {
    Embedded,
    Redis {
        /// May carry a password: redacted in Debug.
        url: Secret,
        index: String,
        prefix: String,
        /// Per command; past it the query bypasses the cache.
        timeout: std::time::Duration,
    },
}

/// Every problem found in a config, reported together.
#[derive(Debug)]
pub struct ConfigErrors {
    pub path: PathBuf,
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid config {}:", self.path.display())?;
        for e in &self.errors {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

fn env_overrides(
    doc: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
    errors: &mut Vec<String>,
) -> Vec<String> {
    let mut applied = Vec::new();
    // Variables the config names for its secrets (api_key_env and the
    // like) are not overrides, whatever they look like.
    let named: Vec<String> = doc
        .values()
        .filter_map(toml::Value::as_table)
        .flat_map(|t| t.iter())
        .filter(|(k, _)| k.ends_with("_env"))
        .filter_map(|(_, v)| v.as_str().map(str::to_string))
        .collect();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("RAGD_") else {
            continue;
        };
        if named.contains(&name) {
            continue;
        }
        let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        // A whole section is no one variable's (RAGD_CACHE and RAGD_MODEL
        // are folders for ragd's scripts and tests, not [cache] or [model]).
        if parts.len() == 1 && parts[0] != "data_dir" && SECTIONS.contains(&parts[0].as_str()) {
            continue;
        }
        if !SECTIONS.contains(&parts[0].as_str()) {
            // RAGD_INDEX_BACKEND for RAGD_INDEX__BACKEND would otherwise be
            // ignored, and the node run quietly on the defaults.
            // (RAGD_ADMIN_TOKEN is the CLI's: `ragd status --token`.)
            if let Some(section) = SECTIONS[1..].iter().find(|s| {
                parts.len() == 1
                    && parts[0].starts_with(&format!("{s}_"))
                    && name != "RAGD_ADMIN_TOKEN"
            }) {
                let key = &parts[0][section.len() + 1..];
                errors.push(format!(
                    "{name}: not a setting; for [{section}] {key}, write RAGD_{}__{} (a double underscore joins section and key)",
                    section.to_ascii_uppercase(),
                    key.to_ascii_uppercase()
                ));
            }
            continue; // RAGD_LOG and friends are not config
        }
        applied.push(name.clone());
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let mut table = &mut *doc;
        for (i, p) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                table.insert(p.clone(), parsed.clone());
            } else {
                let entry = table
                    .entry(p.clone())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
                match entry {
                    toml::Value::Table(t) => table = t,
                    _ => {
                        errors.push(format!("{name}: {p} is not a section"));
                        break;
                    }
                }
            }
        }
    }
    applied
}

impl Config {
    /// The config as a node that serves (`ragd up`, `ragd check`) may
    /// use it: without settings that expose it to other machines.
    pub fn servable(self) -> Result<Config, ConfigErrors> {
        if self.refusals.is_empty() {
            Ok(self)
        } else {
            Err(ConfigErrors {
                path: self.path.clone(),
                errors: self.refusals,
            })
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        // (vars_os: one variable that is not UTF-8, ragd's or not, must
        // not panic the load; ragd's own are refused by name.)
        let mut env = Vec::new();
        let mut errors = Vec::new();
        for (k, v) in std::env::vars_os() {
            match (k.into_string(), v.into_string()) {
                (Ok(k), Ok(v)) => env.push((k, v)),
                (Ok(k), Err(_)) if k.starts_with("RAGD_") => {
                    errors.push(format!("environment variable {k}: its value is not UTF-8"))
                }
                _ => {}
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors {
                path: path.to_path_buf(),
                errors,
            });
        }
        Self::load_with_env(path, env.into_iter())
    }

    pub fn load_with_env(
        path: &Path,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let fail = |errors: Vec<String>| ConfigErrors {
            path: path.to_path_buf(),
            errors,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(vec![format!("cannot read it: {e}")]))?;
        Self::parse(path, &text, env)
    }

    pub fn parse(
        path: &Path,
        text: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let fail = |errors: Vec<String>| ConfigErrors {
            path: path.to_path_buf(),
            errors,
        };
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| fail(vec![e.to_string()]))?;
        let mut errors = Vec::new();
        let env: Vec<(String, String)> = env.collect();
        let overrides = env_overrides(&mut doc, env.iter().cloned(), &mut errors);
        let raw: RawConfig = RawConfig::deserialize(doc).map_err(|e| {
            // The key may have come from the environment, not the file.
            let from = match overrides.is_empty() {
                true => String::new(),
                false => format!(" (set from the environment: {})", overrides.join(", ")),
            };
            errors.push(format!("{e}{from}"));
            fail(std::mem::take(&mut errors))
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let cfg = validate(path, &base, raw, &env, &mut errors);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            // Every problem at once: what `up` would refuse next, too.
            errors.extend(cfg.refusals);
            Err(fail(errors))
        }
    }

    pub fn dlq_path(&self) -> PathBuf {
        self.data_dir.join("dlq.jsonl")
    }

    pub fn index_dir(&self) -> PathBuf {
        self.data_dir.join("index")
    }

    /// Where a GPU node keeps its compiled kernels and autotune picks
    /// (`model::use_kernel_cache`).
    pub fn kernel_cache_dir(&self) -> PathBuf {
        self.data_dir.join("kernels")
    }

    /// What, besides the embedding model and the question, makes a query's
    /// answer: the reranker's weights (`reranker`: their
    /// `model::fingerprint`), how many candidates it scores, and the LLM
    /// asked (endpoint, model, prompt, limits). Query nodes that differ in
    /// any keep their entries apart in a shared cache, as nodes on
    /// different embedding models do: during a rolling change of the LLM,
    /// an answer from the old one is not served as the new one's, and a
    /// node without an LLM does not serve sources-only answers to nodes
    /// with one.
    pub fn answers_id(&self, reranker: Option<&str>) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!("candidates {}\n", self.candidates));
        h.update(format!("reranker {}\n", reranker.unwrap_or("none")));
        match &self.llm {
            None => h.update("llm none\n"),
            Some(llm) => {
                // Length-prefixed: free text must not run into the next field.
                for field in [&llm.base_url, &llm.model, crate::llm::SYSTEM_PROMPT] {
                    h.update(format!("{}:", field.len()));
                    h.update(field);
                }
                h.update(format!(
                    "max_tokens {} temperature {}\n",
                    llm.max_tokens,
                    llm.temperature.to_bits()
                ));
            }
        }
        ragd_actors::hex(&h.finalize()[..8])
    }

    pub fn principal_for(&self, token: &str) -> Option<&Principal> {
        // Compare every token in full: no early exit that times the prefix.
        let mut found = None;
        for p in &self.principals {
            if constant_time_eq(p.token.0.as_bytes(), token.as_bytes()) {
                found = Some(p);
            }
        }
        found
    }
}

/// Compares two secrets in time that depends on neither: their digests,
/// of one length whatever the secrets', compared without an early exit
/// (`subtle`, which keeps the compiler from adding one). A plain length
/// check first would tell an attacker the token's length.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

/// A division or access level name may not hold control characters: the
/// index files the points it hides under such a name
/// (`ragd_actors::indexer::HIDDEN`), which no principal may then hold.
fn partition_name(at: &str, field: &str, name: &str, errors: &mut Vec<String>) {
    if name.chars().any(char::is_control) {
        errors.push(format!("{at}: {field} {name:?} holds a control character"));
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The chunker pool's default most workers on a machine of `cores` cores:
/// every core on a node that only parses (an ingest node feeding embed
/// nodes), one fewer where the embedder runs too, whose model thread (and,
/// on CPU, its GEMM threads) needs the rest. So a 2-core CPU node keeps one
/// parser, which outpaces its CPU model tenfold even on PDFs, while a GPU
/// node's parsers keep up with the GPU: one core parses PDFs at about
/// 70,000 tokens a second, a GPU embeds several hundred thousand
/// (BENCHMARKS.md, "Parsing on many cores").
pub fn default_chunker_workers(cores: usize, embeds_here: bool) -> usize {
    cores.saturating_sub(usize::from(embeds_here)).max(1)
}

/// The cores this process may use (its CPU quota included).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn validate_cluster(
    node: &RawNode,
    bus: &RawBus,
    err: &mut dyn FnMut(String),
) -> (String, Roles, Bus) {
    let name = node.name.clone().unwrap_or_else(|| "ragd".into());
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        err(format!(
            "node.name: {name:?} may hold only letters, digits, '-', '_' and '.'"
        ));
    }
    let mut roles = Roles {
        ingest: false,
        embed: false,
        index: false,
        query: false,
    };
    let given = node.roles.clone().unwrap_or_else(|| vec!["all".into()]);
    if given.is_empty() {
        err("node.roles is empty (use [\"all\"] for a single node)".into());
    }
    for r in &given {
        match r.as_str() {
            "all" => roles = Roles::ALL,
            "ingest" => roles.ingest = true,
            "embed" => roles.embed = true,
            "index" => roles.index = true,
            "query" => roles.query = true,
            other => err(format!(
                "node.roles: {other:?} is not a role (ingest, embed, index, query, all)"
            )),
        }
    }
    let bus = match bus.backend.as_deref().unwrap_or("local") {
        "local" => {
            if roles != Roles::ALL && !given.is_empty() {
                err(format!(
                    "node.roles = {given:?} needs bus.backend = \"kafka\": on the local bus one node runs every stage"
                ));
            }
            Bus::Local
        }
        "kafka" => {
            let brokers = bus.brokers.clone().unwrap_or_default();
            if brokers.trim().is_empty() {
                err(
                    "bus.brokers is required with bus.backend = \"kafka\" (host:port[,host:port])"
                        .into(),
                );
            }
            let partitions = bus.partitions.unwrap_or(6);
            let replication = bus.replication.unwrap_or(1);
            if partitions < 1 || replication < 1 {
                err("bus.partitions and bus.replication must be at least 1".into());
            }
            let max_queued = bus.max_queued.unwrap_or(64);
            if max_queued == 0 {
                err("bus.max_queued must be at least 1".into());
            }
            let produce_timeout_ms = bus.produce_timeout_ms.unwrap_or(30_000);
            if produce_timeout_ms == 0 {
                err("bus.produce_timeout_ms must be at least 1".into());
            }
            let max_message_bytes = bus.max_message_bytes.unwrap_or(64 << 20);
            let ceiling = ragd_actors::bridge::kafka::MAX_MESSAGE_BYTES;
            if !(1 << 20..=ceiling).contains(&max_message_bytes) {
                err(format!(
                    "bus.max_message_bytes ({max_message_bytes}) must be between 1 MiB and {ceiling}"
                ));
            }
            Bus::Kafka(ragd_actors::bridge::kafka::KafkaSettings {
                brokers,
                topic_prefix: bus.topic_prefix.clone().unwrap_or_else(|| "ragd.".into()),
                group_prefix: bus.group_prefix.clone().unwrap_or_else(|| "ragd".into()),
                partitions,
                replication,
                create_topics: bus.create_topics.unwrap_or(true),
                max_queued,
                produce_timeout: std::time::Duration::from_millis(produce_timeout_ms),
                max_message_bytes,
            })
        }
        other => {
            err(format!(
                "bus.backend: {other:?} is not available (supported: \"local\", \"kafka\")"
            ));
            Bus::Local
        }
    };
    (name, roles, bus)
}

fn validate(
    path: &Path,
    base: &Path,
    raw: RawConfig,
    env: &[(String, String)],
    errors: &mut Vec<String>,
) -> Config {
    let mut err = |e: String| errors.push(e);
    let data_dir = resolve(base, raw.data_dir.as_deref().unwrap_or(Path::new("data")));
    let embedder_model = resolve(
        base,
        raw.model
            .embedder
            .as_deref()
            .unwrap_or(Path::new("models/all-MiniLM-L6-v2")),
    );
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !embedder_model.join(f).is_file() {
            err(format!(
                "model.embedder: {} has no {f} (ops/fetch-models.sh installs the default model)",
                embedder_model.display()
            ));
            break;
        }
    }
    let reranker_model = raw
        .reranker
        .model
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| resolve(base, &p));
    if let Some(dir) = &reranker_model {
        if !dir.join("model.safetensors").is_file() {
            err(format!(
                "reranker.model: {} has no model.safetensors",
                dir.display()
            ));
        }
    }
    let chunk_max_tokens = raw.chunker.max_tokens.unwrap_or(200);
    let chunk_overlap_tokens = raw.chunker.overlap_tokens.unwrap_or(32);
    if !(16..=512).contains(&chunk_max_tokens) {
        err(format!(
            "chunker.max_tokens: {chunk_max_tokens} is outside 16..=512"
        ));
    }
    if chunk_overlap_tokens >= chunk_max_tokens {
        err(format!("chunker.overlap_tokens ({chunk_overlap_tokens}) must be smaller than chunker.max_tokens ({chunk_max_tokens})"));
    }
    let positive = |name: &str, v: usize, errors: &mut dyn FnMut(String)| {
        if v == 0 {
            errors(format!("{name} must be at least 1"));
        }
    };
    let pdf_memory_mb = raw.chunker.pdf_memory_mb.unwrap_or(1024);
    if !(64..=1 << 20).contains(&pdf_memory_mb) {
        err(format!(
            "chunker.pdf_memory_mb ({pdf_memory_mb}) must be between 64 and 1048576"
        ));
    }
    let pdf_memory_bytes = pdf_memory_mb << 20;
    let embedder_min_workers = raw.embedder.min_workers.unwrap_or(1);
    let embedder_max_workers = raw.embedder.max_workers.unwrap_or(64);
    positive("embedder.min_workers", embedder_min_workers, &mut err);
    if embedder_max_workers < embedder_min_workers {
        err(format!("embedder.max_workers ({embedder_max_workers}) is below embedder.min_workers ({embedder_min_workers})"));
    }
    let deleted_vectors_mb = raw.embedder.deleted_vectors_mb.unwrap_or(64);
    if deleted_vectors_mb > 65_536 {
        err(format!(
            "embedder.deleted_vectors_mb ({deleted_vectors_mb}) must be between 0 and 65536"
        ));
    }
    let max_in_flight = raw.pipeline.max_in_flight.unwrap_or(256);
    positive("pipeline.max_in_flight", max_in_flight, &mut err);
    let max_file_bytes = raw.chunker.max_file_bytes.unwrap_or(20 << 20);
    // The budget holds the biggest file there may be: one bigger would
    // wait for everything in flight to end, and the watcher (deletions,
    // replays) with it. Unset, it grows to hold one.
    let max_file_mb = max_file_bytes.div_ceil(1 << 20);
    let max_in_flight_mb = (raw.pipeline.max_in_flight_mb).unwrap_or(max_file_mb.max(256));
    if !(1..=1_048_576).contains(&max_in_flight_mb) {
        err(format!(
            "pipeline.max_in_flight_mb ({max_in_flight_mb}) must be between 1 and 1048576"
        ));
    } else if max_in_flight_mb < max_file_mb {
        err(format!(
            "pipeline.max_in_flight_mb ({max_in_flight_mb}) must hold the biggest file, chunker.max_file_bytes ({max_file_bytes})"
        ));
    }
    // Zero skips every file as too big; nothing to index, and no error.
    positive("chunker.max_file_bytes", max_file_bytes as usize, &mut err);
    let max_attempts = raw.pipeline.max_attempts.unwrap_or(3);
    // Past a hundred, a document that fails for good never reaches the
    // DLQ in practice: it is retried for days at the retry cap.
    if !(1..=100).contains(&max_attempts) {
        err(format!(
            "pipeline.max_attempts ({max_attempts}) must be between 1 and 100"
        ));
    }
    // Zero makes the file watcher's thread spin on a core per source; an
    // hour or more, and changes are in practice never seen.
    let debounce_ms = raw.pipeline.debounce_ms.unwrap_or(300);
    if !(10..=60_000).contains(&debounce_ms) {
        err(format!(
            "pipeline.debounce_ms ({debounce_ms}) must be between 10 and 60000"
        ));
    }
    let retry_base_ms = raw.pipeline.retry_base_ms.unwrap_or(200);
    let retry_cap_ms = raw.pipeline.retry_cap_ms.unwrap_or(10_000);
    if !(1..=60_000).contains(&retry_base_ms) {
        err(format!(
            "pipeline.retry_base_ms ({retry_base_ms}) must be between 1 and 60000"
        ));
    }
    if !(retry_base_ms..=600_000).contains(&retry_cap_ms) {
        err(format!(
            "pipeline.retry_cap_ms ({retry_cap_ms}) must be between retry_base_ms ({retry_base_ms}) and 600000"
        ));
    }
    let delete_grace_ms = raw.pipeline.delete_grace_ms.unwrap_or(2000);
    if delete_grace_ms > 3_600_000 {
        err(format!(
            "pipeline.delete_grace_ms ({delete_grace_ms}) must be at most 3600000 (an hour)"
        ));
    }
    let max_write_wait_ms = raw.pipeline.max_write_wait_ms.unwrap_or(30_000);
    if max_write_wait_ms > 3_600_000 {
        err(format!(
            "pipeline.max_write_wait_ms ({max_write_wait_ms}) must be at most 3600000 (an hour)"
        ));
    }
    let device = raw.model.device.unwrap_or(Device::Cpu);
    if device != Device::Cpu && !cfg!(feature = "cuda") {
        err(format!(
            "model.device = {} needs a ragd built with --features cuda (this one has only the CPU backend)",
            serde_json::to_string(&device).unwrap_or_default()
        ));
    }
    let batch_max_tokens = raw.model.batch_max_tokens.unwrap_or(8192);
    let batch_max_size = raw.model.batch_max_size.unwrap_or(64);
    positive("model.batch_max_tokens", batch_max_tokens, &mut err);
    positive("model.batch_max_size", batch_max_size, &mut err);
    // 0 would rebuild the index after every document.
    let optimize_every = raw.index.optimize_every.unwrap_or(100_000);
    let optimize_idle_ms = raw.index.optimize_idle_ms.unwrap_or(2_000);
    positive("index.optimize_every", optimize_every as usize, &mut err);
    positive(
        "index.optimize_idle_ms",
        optimize_idle_ms as usize,
        &mut err,
    );
    let hnsw_defaults = ragd_actors::indexer::HnswSettings::default();
    let hnsw = ragd_actors::indexer::HnswSettings {
        m: raw.index.hnsw_m.unwrap_or(hnsw_defaults.m),
        ef_construct: raw
            .index
            .hnsw_ef_construct
            .unwrap_or(hnsw_defaults.ef_construct),
        ef: raw.index.hnsw_ef.unwrap_or(hnsw_defaults.ef),
    };
    if let Err(e) = hnsw.check() {
        err(e);
    }
    let index_backend = match raw.index.backend.as_deref().unwrap_or("embedded") {
        "embedded" => IndexBackend::Embedded,
        "qdrant" => {
            let url = raw
                .index
                .qdrant_url
                .clone()
                .unwrap_or_else(|| "http://127.0.0.1:6334".into());
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                err(format!(
                    "index.qdrant_url: {url:?} is not an http(s) URL (Qdrant's gRPC port, usually 6334)"
                ));
            }
            let api_key = secret_from_env(
                env,
                raw.index.qdrant_api_key_env.as_deref(),
                "QDRANT_API_KEY",
            );
            let shard_number = raw.index.shard_number.unwrap_or(1);
            let replication_factor = raw.index.replication_factor.unwrap_or(1);
            if shard_number == 0 || replication_factor == 0 {
                err("index.shard_number and index.replication_factor must be at least 1".into());
            }
            let timeout_ms = raw.index.timeout_ms.unwrap_or(5000);
            if timeout_ms == 0 {
                err("index.timeout_ms must be at least 1".into());
            }
            IndexBackend::Qdrant {
                url,
                collection: raw
                    .index
                    .qdrant_collection
                    .clone()
                    .unwrap_or_else(|| "ragd".into()),
                api_key,
                shard_number,
                replication_factor,
                timeout: std::time::Duration::from_millis(timeout_ms),
                max_retries: raw.index.max_retries.unwrap_or(5),
            }
        }
        other => {
            err(format!(
                "index.backend: {other:?} is not available (supported: \"embedded\", \"qdrant\")"
            ));
            IndexBackend::Embedded
        }
    };
    let cache_backend = match raw.cache.backend.as_deref().unwrap_or("embedded") {
        "embedded" => CacheBackend::Embedded,
        "redis" => {
            let url = raw
                .cache
                .redis_url
                .clone()
                .unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
            {
                err("cache.redis_url must start with redis://, rediss:// or unix://".into());
            }
            let index = raw
                .cache
                .redis_index
                .clone()
                .unwrap_or_else(|| "ragd-cache".into());
            if index.is_empty() || index.contains(char::is_whitespace) {
                err(format!(
                    "cache.redis_index: {index:?} is not a valid index name"
                ));
            }
            let timeout_ms = raw.cache.redis_timeout_ms.unwrap_or(250);
            if timeout_ms == 0 {
                err("cache.redis_timeout_ms must be at least 1".into());
            }
            CacheBackend::Redis {
                url: Secret(url),
                index,
                prefix: raw
                    .cache
                    .redis_prefix
                    .clone()
                    .unwrap_or_else(|| "ragd:cache:".into()),
                timeout: std::time::Duration::from_millis(timeout_ms),
            }
        }
        other => {
            err(format!(
                "cache.backend: {other:?} is not available (supported: \"embedded\", \"redis\")"
            ));
            CacheBackend::Embedded
        }
    };
    let llm = validate_llm(&raw.llm, env, &mut err);
    // Beyond what Redis's EXPIRE takes, its store would fail after the
    // hash is written, leaving an entry that never expires.
    // Zero: the embedded cache kept nothing, and Redis kept a second.
    if let Some(ttl) = raw
        .cache
        .ttl_secs
        .filter(|t| *t == 0 || *t > 366 * 24 * 3600)
    {
        err(format!(
            "cache.ttl_secs ({ttl}) must be between 1 and a year (31622400)"
        ));
    }
    if raw.cache.capacity == Some(0) {
        err("cache.capacity must be at least 1".into());
    }
    let cache_threshold = raw.cache.threshold.unwrap_or(0.98);
    if !(cache_threshold > 0.0 && cache_threshold <= 1.0) {
        err(format!(
            "cache.threshold: {cache_threshold} is outside (0, 1]"
        ));
    }
    let (node_name, roles, bus) = validate_cluster(&raw.node, &raw.bus, &mut err);
    let (chunker_min_workers, chunker_max_workers) = {
        let c = &raw.chunker;
        if c.workers.is_some() && (c.min_workers.is_some() || c.max_workers.is_some()) {
            err("chunker.workers (a fixed pool) cannot be combined with chunker.min_workers or chunker.max_workers".into());
        }
        let min = c.workers.or(c.min_workers).unwrap_or(1);
        let max = c
            .workers
            .or(c.max_workers)
            .unwrap_or_else(|| default_chunker_workers(cores(), roles.embed).max(min));
        let name = if c.workers.is_some() {
            "chunker.workers"
        } else {
            "chunker.min_workers"
        };
        positive(name, min, &mut err);
        if max < min {
            err(format!(
                "chunker.max_workers ({max}) is below chunker.min_workers ({min})"
            ));
        }
        (min, max)
    };
    if let Bus::Kafka(_) = bus {
        if (roles.ingest || roles.index || roles.query) && index_backend == IndexBackend::Embedded {
            err("bus.backend = \"kafka\" needs index.backend = \"qdrant\": the embedded store is for a single node, a cluster's nodes share Qdrant".into());
        }
        if (roles.index || roles.query) && cache_backend == CacheBackend::Embedded {
            err("bus.backend = \"kafka\" needs cache.backend = \"redis\": the index node's VersionPruner must reach the cache the query nodes share".into());
        }
    }
    let mut addr = |name: &str, v: Option<String>, default: &str| -> SocketAddr {
        let v = v.unwrap_or_else(|| default.to_string());
        v.parse().unwrap_or_else(|_| {
            err(format!(
                "{name}: {v:?} is not an address like 127.0.0.1:8080"
            ));
            default.parse().expect("default address")
        })
    };
    let query_bind = addr("query.bind", raw.query.bind, "127.0.0.1:8080");
    let admin_bind = addr("admin.bind", raw.admin.bind, "127.0.0.1:8081");
    let candidates = raw.query.candidates.unwrap_or(50);
    // A query gets at most the candidates the search hands on: by default
    // 50, or all of them when fewer are configured.
    let max_top_k = raw.query.max_top_k.unwrap_or(candidates.clamp(1, 50));
    // Each is searched for (the store's ef is 4x that), fetched and may be
    // reranked, per query.
    if !(1..=10_000).contains(&candidates) {
        errors.push(format!(
            "query.candidates ({candidates}) must be between 1 and 10000"
        ));
    }
    if max_top_k == 0 || max_top_k > candidates.max(1) {
        errors.push(format!(
            "query.max_top_k ({max_top_k}) must be between 1 and query.candidates ({candidates})"
        ));
    }
    let latency_budget = match raw.query.latency_budget_ms {
        Some(0) => {
            errors.push(
                "query.latency_budget_ms must be at least 1 (leave it out for no budget)".into(),
            );
            None
        }
        Some(ms) if ms > 60_000 => {
            errors.push(format!("query.latency_budget_ms: {ms} is over a minute"));
            None
        }
        ms => ms.map(std::time::Duration::from_millis),
    };
    let query_timeout = raw.query.timeout_secs.unwrap_or(120);
    if !(1..=3600).contains(&query_timeout) {
        errors.push(format!(
            "query.timeout_secs ({query_timeout}) must be between 1 and 3600"
        ));
    }
    let query_timeout = std::time::Duration::from_secs(query_timeout.clamp(1, 3600));
    let max_concurrent_queries = raw.query.max_concurrent.unwrap_or(256);
    // (An upper bound too: a semaphore of more permits than tokio allows
    // would panic at start.)
    if !(1..=1_000_000).contains(&max_concurrent_queries) {
        errors.push(format!(
            "query.max_concurrent ({max_concurrent_queries}) must be between 1 and 1000000"
        ));
    }
    if query_bind == admin_bind {
        errors.push(format!("query.bind and admin.bind are both {query_bind}"));
    }
    let admin_token = raw.admin.token.filter(|t| !t.is_empty()).map(Secret);
    // A client's token is taken without the spaces around it (see
    // http::bearer): one configured with them could never match, and a
    // short one is guessed.
    for (at, token) in (admin_token
        .iter()
        .map(|t| ("admin.token".to_string(), &t.0)))
    .chain(
        raw.principals
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("principals[{i}] ({})", p.name), &p.token)),
    ) {
        if token.trim() != token {
            errors.push(format!(
                "{at}: the token starts or ends with white space, which no client can send"
            ));
        }
    }
    if admin_token.as_ref().is_some_and(|t| t.0.trim().len() < 8) {
        errors.push("admin.token must have at least 8 characters".into());
    }

    if raw.sources.is_empty() && roles.ingest {
        errors.push("no [[sources]]: nothing to index".into());
    }
    let mut names = HashSet::new();
    let mut sources = Vec::new();
    for (i, s) in raw.sources.into_iter().enumerate() {
        let root = resolve(base, &s.path);
        let name = s.name.unwrap_or_else(|| {
            root.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("source{i}"))
        });
        let at = format!("sources[{i}] ({name})");
        if !root.is_dir() && roles.ingest {
            errors.push(format!("{at}: path {} is not a folder", root.display()));
        }
        if !names.insert(name.clone()) {
            errors.push(format!("{at}: the name {name:?} is used twice"));
        }
        if name.contains(':') {
            errors.push(format!("{at}: a source name may not contain ':'"));
        }
        for (field, v) in [("division", &s.division), ("access_level", &s.access_level)] {
            if v.trim().is_empty() {
                errors.push(format!("{at}: {field} is empty"));
            }
            partition_name(&at, field, v, errors);
        }
        let mut rules = Vec::new();
        let mut prefixes = HashMap::new();
        for (j, r) in s.rules.into_iter().enumerate() {
            let prefix = r.prefix.trim_matches('/');
            if prefix.is_empty() || r.division.is_empty() || r.access_level.is_empty() {
                errors.push(format!(
                    "{at}: rules[{j}] needs a prefix, a division and an access_level"
                ));
            }
            let rule = format!("{at}: rules[{j}]");
            // A prefix is compared with the document's path under the root,
            // which has none of these: such a rule would never match, and
            // its files would fall into the source's (wider) partition.
            if !prefix.is_empty()
                && prefix
                    .split('/')
                    .any(|part| matches!(part, "" | "." | "..") || part.contains('\\'))
            {
                errors.push(format!(
                    "{rule}: prefix {:?} must be a plain sub-path of the source \
                     (like \"hr/confidential\": no \"//\", \".\", \"..\" or \"\\\\\")",
                    r.prefix
                ));
            }
            if let Some(k) = prefixes
                .insert(prefix.to_string(), j)
                .filter(|_| !prefix.is_empty())
            {
                errors.push(format!(
                    "{rule}: prefix {prefix:?} is rules[{k}]'s too; which partition \
                     is meant?"
                ));
            }
            partition_name(&rule, "division", &r.division, errors);
            partition_name(&rule, "access_level", &r.access_level, errors);
            rules.push(PartitionRule {
                prefix: r.prefix,
                partition: Partition {
                    division: r.division,
                    access_level: r.access_level,
                },
            });
        }
        let poll = s.poll_secs.and_then(|secs| {
            use std::time::Duration;
            let d = Duration::try_from_secs_f64(secs).ok();
            let ok =
                d.filter(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(86_400));
            if ok.is_none() {
                errors.push(format!(
                    "{at}: poll_secs ({secs}) must be between 0.1 and 86400 seconds"
                ));
            }
            ok
        });
        // Canonical root, so event paths (which notify reports canonical)
        // strip cleanly.
        let root = root.canonicalize().unwrap_or(root);
        sources.push(SourceSpec {
            name,
            root,
            partition: Partition {
                division: s.division,
                access_level: s.access_level,
            },
            rules,
            poll,
            mount_point: s.mount_point,
        });
    }
    // A file under two roots would be filed under whichever source comes
    // first, in its partition: an `hr` source inside a `kb` one would put
    // HR's confidential files in kb's partition for all of kb's readers.
    for (i, a) in sources.iter().enumerate() {
        for b in &sources[i + 1..] {
            if a.root.starts_with(&b.root) || b.root.starts_with(&a.root) {
                errors.push(format!(
                    "sources {:?} ({}) and {:?} ({}) overlap: a folder may belong to one \
                     source only (map a sub-folder to its partition with [[sources.rules]])",
                    a.name,
                    a.root.display(),
                    b.name,
                    b.root.display()
                ));
            }
        }
    }
    let mut pnames = HashSet::new();
    let mut tokens = HashSet::new();
    let mut principals = Vec::new();
    for (i, p) in raw.principals.into_iter().enumerate() {
        let at = format!("principals[{i}] ({})", p.name);
        if !pnames.insert(p.name.clone()) {
            errors.push(format!("{at}: the name is used twice"));
        }
        if p.token.len() < 8 {
            errors.push(format!("{at}: the token must have at least 8 characters"));
        }
        if !tokens.insert(p.token.clone()) {
            errors.push(format!("{at}: the token is used by another principal"));
        }
        if admin_token.as_ref().is_some_and(|a| a.0 == p.token) {
            // Whoever asks with it would hold the admin API too.
            errors.push(format!("{at}: the token is also admin.token"));
        }
        if p.divisions.is_empty() || p.access_levels.is_empty() {
            errors.push(format!(
                "{at}: needs at least one division and one access level"
            ));
        }
        for d in &p.divisions {
            partition_name(&at, "divisions", d, errors);
        }
        for a in &p.access_levels {
            partition_name(&at, "access_levels", a, errors);
        }
        principals.push(Principal {
            name: p.name,
            token: Secret(p.token),
            divisions: p.divisions,
            access_levels: p.access_levels,
        });
    }
    let (mut warnings, refusals) = exposure(
        &roles,
        query_bind,
        admin_bind,
        admin_token.as_ref(),
        &principals,
    );
    if let Some(llm) = llm.as_ref().filter(|_| roles.query) {
        // Allowed (a caller may want an answer or an error quickly), but
        // said: the LLM's own timeout and retries then never play out.
        let llm_may_take = llm.timeout + llm.retry_budget;
        if llm_may_take >= query_timeout {
            warnings.push(format!(
                "query.timeout_secs ({}) is shorter than llm.timeout_secs + \
                 llm.retry_budget_secs ({}): a slow or rate-limited LLM's retries are cut \
                 off by the query's deadline (a 504)",
                query_timeout.as_secs(),
                llm_may_take.as_secs_f64()
            ));
        }
    }
    Config {
        path: path.to_path_buf(),
        data_dir,
        embedder_model,
        device,
        batch_max_tokens,
        batch_max_size,
        reranker_model,
        chunk_max_tokens,
        chunk_overlap_tokens,
        max_file_bytes,
        chunker_min_workers,
        chunker_max_workers,
        pdf_memory_bytes,
        embedder_min_workers,
        embedder_max_workers,
        deleted_vectors_bytes: deleted_vectors_mb << 20,
        max_in_flight,
        max_in_flight_bytes: max_in_flight_mb.clamp(1, 1_048_576) << 20,
        max_attempts,
        retry_base: std::time::Duration::from_millis(retry_base_ms),
        retry_cap: std::time::Duration::from_millis(retry_cap_ms),
        debounce_ms,
        delete_grace: std::time::Duration::from_millis(delete_grace_ms),
        max_write_wait: std::time::Duration::from_millis(max_write_wait_ms),
        forget_deleted_after: raw.pipeline.forget_deleted_after_secs.map_or(
            ragd_actors::ledger::FORGET_DELETED_AFTER,
            std::time::Duration::from_secs,
        ),
        optimize_every,
        optimize_idle: std::time::Duration::from_millis(optimize_idle_ms),
        hnsw,
        min_free_bytes: raw.index.min_free_mb.unwrap_or(512).saturating_mul(1 << 20),
        cache_threshold,
        cache_capacity: raw.cache.capacity.unwrap_or(10_000),
        cache_ttl_secs: raw.cache.ttl_secs.unwrap_or(3600),
        cache_backend,
        node_name,
        roles,
        bus,
        index_backend,
        llm,
        query_bind,
        candidates,
        max_top_k,
        latency_budget,
        query_timeout,
        max_concurrent_queries,
        admin_bind,
        admin_token,
        warnings,
        refusals,
        sources,
        principals,
    }
}

/// Tokens printed in ragd's own config files and README: whoever has read
/// them can use them.
const EXAMPLE_TOKENS: [&str; 6] = [
    "change-me-admin-token",
    "alice-hr-token",
    "bob-eng-token",
    "guest-public-token",
    "hr-reader-token",
    "engineer-token",
];

/// Example tokens and a tokenless admin API: refused on an address other
/// machines can reach, a warning on loopback (where they serve trying ragd
/// out). Returns the warnings and the refusals.
fn exposure(
    roles: &Roles,
    query_bind: SocketAddr,
    admin_bind: SocketAddr,
    admin_token: Option<&Secret>,
    principals: &[Principal],
) -> (Vec<String>, Vec<String>) {
    let (mut warnings, mut refusals) = (Vec::new(), Vec::new());
    let example = |t: &Secret| EXAMPLE_TOKENS.contains(&t.0.as_str());
    let mut judge = |bind: SocketAddr, what: String| {
        if bind.ip().is_loopback() {
            warnings.push(format!(
                "{what}: fine on loopback ({bind}), but set a secret one before serving other machines"
            ));
        } else {
            refusals.push(format!(
                "{what}, and {bind} is reachable from other machines: set a secret token"
            ));
        }
    };
    if roles.query {
        for p in principals.iter().filter(|p| example(&p.token)) {
            judge(
                query_bind,
                format!(
                    "principal {:?} has an example token from ragd's documentation",
                    p.name
                ),
            );
        }
    }
    match admin_token {
        Some(t) if example(t) => judge(
            admin_bind,
            "admin.token is the example token from ragd's documentation (RAGD_ADMIN__TOKEN sets it)"
                .into(),
        ),
        // (/dlq shows the payloads: document text of every partition.)
        None if !admin_bind.ip().is_loopback() => refusals.push(format!(
            "admin.token is empty, and {admin_bind} is reachable from other machines: anyone \
             there could read the DLQ (document text of every partition), start ingests and \
             replay entries; set a secret token (RAGD_ADMIN__TOKEN)"
        )),
        _ => {}
    }
    (warnings, refusals)
}

/// The value of the environment variable named `var` (or `default`), if set
/// and not empty. Keys live in the environment, never in the config file.
fn secret_from_env(env: &[(String, String)], var: Option<&str>, default: &str) -> Option<Secret> {
    let var = var.unwrap_or(default);
    env.iter()
        .find(|(k, _)| k == var)
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
        .map(Secret)
}

fn validate_llm(
    raw: &RawLlm,
    env: &[(String, String)],
    err: &mut dyn FnMut(String),
) -> Option<crate::llm::LlmConfig> {
    use std::num::NonZeroU32;
    use std::time::Duration;
    let Some(base_url) = raw.base_url.clone().filter(|u| !u.trim().is_empty()) else {
        // Half an LLM setup is a slip, not a choice to answer without one.
        if raw.model.as_deref().is_some_and(|m| !m.trim().is_empty()) {
            err("llm.model is set but llm.base_url is not: set both to answer with an LLM, or neither".into());
        }
        return None;
    };
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        err(format!("llm.base_url: {base_url:?} is not an http(s) URL"));
    }
    let model = raw.model.clone().unwrap_or_default();
    if model.is_empty() {
        err("llm.model is required when llm.base_url is set".into());
    }
    let api_key = secret_from_env(env, raw.api_key_env.as_deref(), "OPENAI_API_KEY");
    let secs = |name: &str, v: Option<f64>, default: f64, err: &mut dyn FnMut(String)| {
        let v = v.unwrap_or(default);
        match Duration::try_from_secs_f64(v) {
            Ok(d) if v > 0.0 && d < Duration::from_secs(365 * 24 * 3600) => d,
            _ => {
                err(format!(
                    "llm.{name}: {v} must be a positive number of seconds, under a year"
                ));
                Duration::from_secs_f64(default)
            }
        }
    };
    let timeout = secs("timeout_secs", raw.timeout_secs, 60.0, err);
    let retry_budget = secs("retry_budget_secs", raw.retry_budget_secs, 30.0, err);
    let nz = |name: &str, v: Option<u32>, default: u32, err: &mut dyn FnMut(String)| {
        NonZeroU32::new(v.unwrap_or(default)).unwrap_or_else(|| {
            err(format!("llm.{name} must be at least 1"));
            NonZeroU32::new(default).expect("non-zero default")
        })
    };
    let requests_per_minute = nz("requests_per_minute", raw.requests_per_minute, 60, err);
    let tokens_per_minute = nz("tokens_per_minute", raw.tokens_per_minute, 200_000, err);
    let max_tokens = raw.max_tokens.unwrap_or(512);
    if !(1..=1_000_000).contains(&max_tokens) {
        err(format!(
            "llm.max_tokens ({max_tokens}) must be between 1 and 1000000"
        ));
    }
    // NaN would go out as null, which every provider refuses.
    let temperature = raw.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        err(format!(
            "llm.temperature ({temperature}) must be between 0 and 2"
        ));
    }
    // A 429 without Retry-After holds the whole node for min_backoff.
    let ms = |name: &str, v: Option<u64>, default: u64, err: &mut dyn FnMut(String)| {
        let v = v.unwrap_or(default);
        if v > 3_600_000 {
            err(format!(
                "llm.{name} ({v}) must be at most 3600000 (an hour)"
            ));
        }
        Duration::from_millis(v.min(3_600_000))
    };
    let min_backoff = ms("min_backoff_ms", raw.min_backoff_ms, 500, err);
    let max_backoff = ms("max_backoff_ms", raw.max_backoff_ms, 20_000, err);
    if max_backoff < min_backoff {
        err("llm.max_backoff_ms is below llm.min_backoff_ms".into());
    }
    Some(crate::llm::LlmConfig {
        base_url,
        model,
        api_key,
        timeout,
        max_tokens,
        temperature,
        requests_per_minute,
        tokens_per_minute,
        max_retries: raw.max_retries.unwrap_or(4),
        retry_budget,
        min_backoff,
        max_backoff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kb")).unwrap();
        let model = dir.path().join("m");
        std::fs::create_dir_all(&model).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::write(model.join(f), "{}").unwrap();
        }
        let path = dir.path().join("ragd.toml");
        (dir, path)
    }

    const GOOD: &str = r#"
        [model]
        embedder = "m"
        [admin]
        token = "admin-secret"
        [[sources]]
        path = "kb"
        division = "eng"
        access_level = "internal"
        [[principals]]
        name = "alice"
        token = "alice-token-1"
        divisions = ["eng"]
        access_levels = ["internal"]
    "#;

    /// A query deadline shorter than the LLM's timeout and retries is
    /// allowed, and said; the defaults leave room for them.
    #[test]
    fn a_query_deadline_that_cuts_the_llms_retries_short_is_warned_about() {
        let (_dir, path) = setup();
        let llm = "[llm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"small\"\n";
        let warnings = |extra: &str| {
            let text = format!("{GOOD}\n{extra}");
            Config::parse(&path, &text, std::iter::empty())
                .unwrap()
                .warnings
        };
        assert_eq!(warnings(llm), Vec::<String>::new());
        let short = warnings(&format!("[query]\ntimeout_secs = 60\n{llm}"));
        assert_eq!(short.len(), 1, "{short:?}");
        assert!(
            short[0].contains("query.timeout_secs (60)") && short[0].contains("(90)"),
            "{short:?}"
        );
        let slow_llm = warnings(&format!("{llm}timeout_secs = 100\n"));
        assert_eq!(slow_llm.len(), 1, "{slow_llm:?}");
        // No LLM, nothing to cut short.
        assert!(warnings("[query]\ntimeout_secs = 5\n").is_empty());
    }

    /// What changes an answer changes the id; what only changes how it is
    /// obtained (rate limits, timeouts) or kept (the cache) does not.
    #[test]
    fn the_answers_id_follows_what_makes_an_answer() {
        let (_dir, path) = setup();
        let with = |extra: &str| {
            let text = format!("{GOOD}\n{extra}");
            Config::parse(&path, &text, std::iter::empty()).unwrap()
        };
        let llm = "[llm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"small\"\n";
        let base = with(llm).answers_id(Some("r1"));
        assert_eq!(base, with(llm).answers_id(Some("r1")), "not stable");
        let differs = [
            with(llm).answers_id(Some("r2")),
            with(llm).answers_id(None),
            with("").answers_id(Some("r1")),
            with(&llm.replace("small", "large")).answers_id(Some("r1")),
            with(&format!("{llm}temperature = 0.7\n")).answers_id(Some("r1")),
            with(&format!("{llm}max_tokens = 64\n")).answers_id(Some("r1")),
            with(&format!("[query]\ncandidates = 20\n{llm}")).answers_id(Some("r1")),
        ];
        for (i, id) in differs.iter().enumerate() {
            assert_ne!(*id, base, "change {i} kept the id");
        }
        let same = [
            with(&format!(
                "{llm}requests_per_minute = 7\ntimeout_secs = 99\n"
            )),
            with(&format!("[cache]\nttl_secs = 60\n{llm}")),
        ];
        for cfg in same {
            assert_eq!(cfg.answers_id(Some("r1")), base);
        }
    }

    #[test]
    fn a_good_config_loads_with_defaults_and_relative_paths() {
        let (dir, path) = setup();
        let cfg = Config::parse(&path, GOOD, std::iter::empty()).unwrap();
        assert_eq!(cfg.data_dir, dir.path().join("data"));
        assert_eq!(cfg.sources[0].name, "kb");
        assert!(
            !cfg.sources[0].mount_point,
            "a folder unless said otherwise"
        );
        let share = GOOD.replace(
            "access_level = \"internal\"\n",
            "access_level = \"internal\"\nmount_point = true\n",
        );
        let on_share = Config::parse(&path, &share, std::iter::empty()).unwrap();
        assert!(on_share.sources[0].mount_point);
        assert_eq!((cfg.candidates, cfg.max_top_k), (50, 50));
        // Fewer candidates than the default top k: top k follows them.
        let fewer = format!("{GOOD}\n[query]\ncandidates = 20\n");
        let cfg20 = Config::parse(&path, &fewer, std::iter::empty()).unwrap();
        assert_eq!(cfg20.max_top_k, 20);
        assert_eq!(cfg.latency_budget, None, "no budget unless configured");
        assert_eq!(cfg.cache_threshold, 0.98);
        assert_eq!(cfg.hnsw, ragd_actors::indexer::HnswSettings::default());
        assert_eq!(
            (cfg.optimize_idle.as_millis(), cfg.optimize_every),
            (2_000, 100_000)
        );
        assert_eq!(
            (cfg.retry_base.as_millis(), cfg.retry_cap.as_millis()),
            (200, 10_000)
        );
        assert_eq!(cfg.min_free_bytes, 512 << 20);
        assert_eq!(cfg.pdf_memory_bytes, 1 << 30);
        let roomy = format!("{GOOD}\n[index]\nmin_free_mb = 0\n");
        let roomy = Config::parse(&path, &roomy, std::iter::empty()).unwrap();
        assert_eq!(roomy.min_free_bytes, 0);
        let slower = format!("{GOOD}\n[pipeline]\nretry_base_ms = 1000\nretry_cap_ms = 60000\n");
        let slow = Config::parse(&path, &slower, std::iter::empty()).unwrap();
        assert_eq!(
            (slow.retry_base.as_millis(), slow.retry_cap.as_millis()),
            (1_000, 60_000)
        );
        assert_eq!(cfg.principal_for("alice-token-1").unwrap().name, "alice");
        assert!(cfg.principal_for("alice-token-2").is_none());
        // Secrets stay out of Debug output.
        let debug = format!("{cfg:?}");
        assert!(
            !debug.contains("alice-token-1") && !debug.contains("admin-secret"),
            "{debug}"
        );
    }

    /// A sub-folder rule the matcher could never apply (a path that is no
    /// plain sub-path, or a second rule for one prefix) is refused: its
    /// files would quietly land in the source's wider partition. Order does
    /// not matter: the longest prefix wins.
    #[test]
    fn partition_rules_that_could_never_apply_are_refused() {
        let (_dir, path) = setup();
        let with_rules = |rules: &[(&str, &str)]| {
            let rules: String = rules
                .iter()
                .map(|(prefix, level)| {
                    format!(
                        "[[sources.rules]]\nprefix = {prefix:?}\ndivision = \"hr\"\n\
                         access_level = {level:?}\n"
                    )
                })
                .collect();
            let toml = GOOD.replace("[[principals]]", &format!("{rules}[[principals]]"));
            Config::parse(&path, &toml, std::iter::empty())
        };
        let cfg = with_rules(&[("hr", "internal"), ("hr/confidential/", "confidential")]).unwrap();
        let s = &cfg.sources[0];
        assert_eq!(
            s.partition_for("hr/confidential/pay.md").access_level,
            "confidential"
        );
        assert_eq!(s.partition_for("hr/leave.md").access_level, "internal");
        for (rules, says) in [
            (&[("./hr", "internal")][..], "plain sub-path"),
            (&[("hr//confidential", "confidential")], "plain sub-path"),
            (&[("hr/../finance", "internal")], "plain sub-path"),
            (&[("hr\\confidential", "confidential")], "plain sub-path"),
            (
                &[("hr", "internal"), ("/hr/", "confidential")],
                "rules[0]'s too",
            ),
        ] {
            let e = with_rules(rules).unwrap_err().to_string();
            assert!(
                e.contains(says) && e.contains("sources[0] (kb): rules["),
                "{rules:?}: {e}"
            );
        }
    }

    /// A token no client can send (spaces around it: clients' are taken
    /// trimmed) or a short admin token is refused by name.
    #[test]
    fn tokens_that_cannot_match_or_are_short_are_refused() {
        let (_dir, path) = setup();
        let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())].into_iter();
        let spaced = GOOD.replace("\"alice-token-1\"", "\"alice-token-1 \"");
        let e = Config::parse(&path, &spaced, std::iter::empty())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("principals[0] (alice): the token starts or ends with white space"),
            "{e}"
        );
        let e = Config::parse(&path, GOOD, env("RAGD_ADMIN__TOKEN", "abc"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("admin.token must have at least 8 characters"),
            "{e}"
        );
        let e = Config::parse(&path, GOOD, env("RAGD_ADMIN__TOKEN", "  padded-admin  "))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("admin.token: the token starts or ends with white space"),
            "{e}"
        );
        assert!(Config::parse(&path, GOOD, env("RAGD_ADMIN__TOKEN", "long-enough")).is_ok());
    }

    /// The tokens ragd's own docs print serve trying it out on loopback,
    /// with a warning; on an address other machines reach they are refused.
    #[test]
    fn example_tokens_are_refused_where_other_machines_reach_them() {
        let (_dir, path) = setup();
        let parse = |toml: String, env: &[(&str, &str)]| {
            let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            Config::parse(&path, &toml, env)
        };
        let good = parse(GOOD.into(), &[]).unwrap();
        assert!(good.warnings.is_empty(), "{:?}", good.warnings);
        let example = GOOD
            .replace("alice-token-1", "alice-hr-token")
            .replace("admin-secret", "change-me-admin-token");
        let local = parse(example.clone(), &[]).unwrap();
        assert_eq!(local.warnings.len(), 2, "{:?}", local.warnings);
        assert!(local.warnings[0].contains("principal \"alice\""));
        assert!(local.warnings[1].contains("admin.token"));
        let open = [
            ("RAGD_QUERY__BIND", "0.0.0.0:8080"),
            ("RAGD_ADMIN__BIND", "0.0.0.0:8081"),
        ];
        let errors = parse(example.clone(), &open).unwrap().refusals;
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].contains("principal \"alice\"") && errors[0].contains("0.0.0.0:8080"),
            "{errors:?}"
        );
        assert!(errors[1].contains("admin.token"), "{errors:?}");
        // Reported with the other errors when there are some.
        let also_bad = format!("{example}\n[query]\ncandidates = 0\n");
        let errors = parse(also_bad, &open).unwrap_err().errors;
        assert_eq!(errors.len(), 3, "{errors:?}");
        // A secret set by the environment, as the cluster configs say.
        let mut with_secret = open.to_vec();
        with_secret.push(("RAGD_ADMIN__TOKEN", "a-real-secret-token"));
        let errors = parse(example.clone(), &with_secret).unwrap().refusals;
        assert_eq!(errors.len(), 1, "{errors:?}");
        // Only a query node serves principals.
        let kafka = "[node]\nroles = [\"ingest\"]\n[bus]\nbackend = \"kafka\"\nbrokers = \"k:9092\"\n[index]\nbackend = \"qdrant\"\n";
        let ingest_only = parse(format!("{kafka}{example}"), &with_secret).unwrap();
        assert!(
            ingest_only.warnings.is_empty(),
            "{:?}",
            ingest_only.warnings
        );
        // No admin token on an open address: refused (its /dlq shows
        // document text of every partition).
        let open_admin = parse(GOOD.replace("admin-secret", ""), &open[1..]).unwrap();
        assert!(
            open_admin.refusals[0].contains("admin.token is empty"),
            "{:?}",
            open_admin.refusals
        );
    }

    /// The chunker pool grows to the machine's cores by default, leaving
    /// one to the model where this node embeds too; `workers`, the key of
    /// older configs, still fixes its size.
    #[test]
    fn the_chunker_pool_follows_the_cores_unless_sized() {
        assert_eq!(default_chunker_workers(16, true), 15);
        assert_eq!(default_chunker_workers(16, false), 16);
        assert_eq!(default_chunker_workers(2, true), 1);
        assert_eq!(default_chunker_workers(1, true), 1);
        let (_dir, path) = setup();
        let parse =
            |extra: &str| Config::parse(&path, &format!("{GOOD}\n{extra}"), std::iter::empty());
        let cfg = parse("").unwrap();
        assert_eq!(
            (cfg.chunker_min_workers, cfg.chunker_max_workers),
            (1, default_chunker_workers(cores(), true)),
            "a single node embeds"
        );
        let fixed = parse("[chunker]\nworkers = 3\n").unwrap();
        assert_eq!(
            (fixed.chunker_min_workers, fixed.chunker_max_workers),
            (3, 3)
        );
        let sized = parse("[chunker]\nmin_workers = 2\nmax_workers = 6\n").unwrap();
        assert_eq!(
            (sized.chunker_min_workers, sized.chunker_max_workers),
            (2, 6)
        );
        // A min above the default max raises the max with it.
        let many = parse("[chunker]\nmin_workers = 1000\n").unwrap();
        assert_eq!(
            (many.chunker_min_workers, many.chunker_max_workers),
            (1000, 1000)
        );
        for (extra, needle) in [
            (
                "[chunker]\nworkers = 2\nmax_workers = 4\n",
                "cannot be combined",
            ),
            (
                "[chunker]\nworkers = 0\n",
                "chunker.workers must be at least 1",
            ),
            (
                "[chunker]\nmin_workers = 0\n",
                "chunker.min_workers must be at least 1",
            ),
            (
                "[chunker]\nmin_workers = 4\nmax_workers = 2\n",
                "chunker.max_workers (2) is below chunker.min_workers (4)",
            ),
        ] {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.contains(needle), "{extra:?}: missing {needle:?} in:\n{e}");
        }
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let (_dir, path) = setup();
        let bad = r#"
            [model]
            embedder = "nope"
            device = "cuda-f16"
            [chunker]
            max_tokens = 100
            overlap_tokens = 100
            pdf_memory_mb = 8
            [embedder]
            deleted_vectors_mb = 70000
            [query]
            bind = "not an address"
            latency_budget_ms = 0
            timeout_secs = 0
            max_top_k = 60
            max_concurrent = 9223372036854775807
            [index]
            hnsw_m = 2
            [pipeline]
            delete_grace_ms = 86400000
            max_write_wait_ms = 86400000
            retry_base_ms = 0
            retry_cap_ms = 1000000
            [llm]
            base_url = "http://127.0.0.1:1/v1"
            model = "m"
            timeout_secs = 1e20
            retry_budget_secs = -1
            [[sources]]
            path = "missing"
            division = ""
            access_level = "x\u0001"
            poll_secs = 0
            [[principals]]
            name = "a"
            token = "short"
            divisions = []
            access_levels = ["x", "\u0001hidden"]
        "#;
        let e = Config::parse(&path, bad, std::iter::empty()).unwrap_err();
        let text = e.to_string();
        for needle in [
            "model.embedder",
            "overlap_tokens",
            "query.bind",
            "not a folder",
            "division is empty",
            "8 characters",
            "at least one division",
            "index.hnsw_m (2)",
            "query.max_top_k (60)",
            "query.timeout_secs (0) must be between 1 and 3600",
            "poll_secs (0) must be between 0.1 and 86400",
            "pipeline.delete_grace_ms (86400000) must be at most 3600000",
            "pipeline.max_write_wait_ms (86400000) must be at most 3600000",
            "pipeline.retry_base_ms (0) must be between 1 and 60000",
            "pipeline.retry_cap_ms (1000000) must be between retry_base_ms (0) and 600000",
            "llm.timeout_secs: 100000000000000000000",
            "llm.retry_budget_secs: -1",
            "query.max_concurrent (9223372036854775807) must be between 1 and 1000000",
            "chunker.pdf_memory_mb (8) must be between 64 and 1048576",
            "embedder.deleted_vectors_mb (70000) must be between 0 and 65536",
            "access_level \"x\\u{1}\" holds a control character",
            "principals[0] (a): access_levels \"\\u{1}hidden\" holds a control character",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(e.errors.len() >= 8);
    }

    /// Values that would fail later (a panic, a refused request, a cache
    /// entry that never expires) are refused at load.
    #[test]
    fn out_of_range_llm_query_and_cache_values_are_refused() {
        let (_dir, path) = setup();
        let parse =
            |extra: &str| Config::parse(&path, &format!("{GOOD}\n{extra}"), std::iter::empty());
        let llm = "[llm]\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\n";
        assert!(parse(llm).unwrap().llm.is_some());
        for (extra, needle) in [
            (
                "[llm]\nmodel = \"gpt-4o-mini\"\n".to_string(),
                "llm.model is set but llm.base_url is not",
            ),
            (
                format!("{llm}max_tokens = 4294967295\n"),
                "llm.max_tokens (4294967295) must be between 1 and 1000000",
            ),
            (
                format!("{llm}temperature = nan\n"),
                "llm.temperature (NaN) must be between 0 and 2",
            ),
            (
                format!("{llm}temperature = -0.5\n"),
                "llm.temperature (-0.5) must be between 0 and 2",
            ),
            (
                format!("{llm}min_backoff_ms = 86400000\nmax_backoff_ms = 86400000\n"),
                "llm.min_backoff_ms (86400000) must be at most 3600000",
            ),
            (
                "[query]\ncandidates = 100000\nmax_top_k = 5\n".to_string(),
                "query.candidates (100000) must be between 1 and 10000",
            ),
            (
                "[cache]\nttl_secs = 10000000000000000\n".to_string(),
                "cache.ttl_secs (10000000000000000) must be between 1 and a year",
            ),
            (
                "[cache]\nttl_secs = 0\n".to_string(),
                "cache.ttl_secs (0) must be between 1 and a year",
            ),
            (
                "[cache]\ncapacity = 0\n".to_string(),
                "cache.capacity must be at least 1",
            ),
            (
                "[chunker]\nmax_file_bytes = 0\n".to_string(),
                "chunker.max_file_bytes",
            ),
            (
                "[pipeline]\nmax_attempts = 1000000\n".to_string(),
                "pipeline.max_attempts (1000000) must be between 1 and 100",
            ),
            (
                "[pipeline]\ndebounce_ms = 0\n".to_string(),
                "pipeline.debounce_ms (0) must be between 10 and 60000",
            ),
            (
                "[pipeline]\nmax_in_flight_mb = 0\n".to_string(),
                "pipeline.max_in_flight_mb (0) must be between 1 and 1048576",
            ),
            (
                "[pipeline]\nmax_in_flight_mb = 100\n[chunker]\nmax_file_bytes = 200000000\n"
                    .to_string(),
                "pipeline.max_in_flight_mb (100) must hold the biggest file, chunker.max_file_bytes (200000000)",
            ),
        ] {
            let e = parse(&extra).unwrap_err().to_string();
            assert!(e.contains(needle), "{extra:?}: missing {needle:?} in:\n{e}");
        }
        let edge = "[query]\ncandidates = 10000\n[cache]\nttl_secs = 31622400\n[pipeline]\nmax_in_flight_mb = 1\n[chunker]\nmax_file_bytes = 1048576\n";
        let cfg = parse(&format!("{llm}temperature = 2.0\n{edge}")).unwrap();
        assert_eq!(cfg.max_in_flight_bytes, 1 << 20);
        assert_eq!(parse("").unwrap().max_in_flight_bytes, 256 << 20);
        // Unset, the budget grows to hold the biggest file.
        let big = parse("[chunker]\nmax_file_bytes = 1000000000\n").unwrap();
        assert_eq!(big.max_in_flight_bytes, 954 << 20);
    }

    #[test]
    fn overlapping_sources_and_a_shared_admin_token_are_refused() {
        let (dir, path) = setup();
        std::fs::create_dir_all(dir.path().join("kb/hr")).unwrap();
        std::fs::create_dir_all(dir.path().join("kb2")).unwrap();
        let cfg = GOOD.replace("admin-secret", "alice-token-1")
            + r#"
            [[sources]]
            name = "hr"
            path = "kb/hr"
            division = "hr"
            access_level = "confidential"
            [[sources]]
            name = "kb2"
            path = "kb2"
            division = "eng"
            access_level = "internal"
        "#;
        let text = Config::parse(&path, &cfg, std::iter::empty())
            .unwrap_err()
            .to_string();
        assert!(
            text.contains(r#"sources "kb" ("#) && text.contains(r#"and "hr" ("#),
            "{text}"
        );
        assert!(text.contains("overlap"), "{text}");
        // A sibling whose name merely starts the same is no overlap.
        assert!(!text.contains(r#""kb2""#), "{text}");
        assert!(
            text.contains("principals[0] (alice): the token is also admin.token"),
            "{text}"
        );
    }

    #[test]
    fn tokens_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"alice-token-1", b"alice-token-1"));
        assert!(!constant_time_eq(b"alice-token-1", b"alice-token-2"));
        assert!(!constant_time_eq(b"alice-token-1", b"alice-token-10"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let (_dir, path) = setup();
        let e = Config::parse(
            &path,
            &format!("{GOOD}\n[query]\nbnd = \"x\"\n"),
            std::iter::empty(),
        );
        assert!(e.is_err());
        let e = Config::parse(&path, "colour = 1", std::iter::empty()).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn env_overrides_win_and_are_validated() {
        let (_dir, path) = setup();
        let env = vec![
            ("RAGD_QUERY__BIND".to_string(), "127.0.0.1:9999".to_string()),
            ("RAGD_CACHE__THRESHOLD".to_string(), "0.9".to_string()),
            ("RAGD_LOG".to_string(), "debug".to_string()),
        ];
        let cfg = Config::parse(&path, GOOD, env.into_iter()).unwrap();
        assert_eq!(cfg.query_bind.port(), 9999);
        assert_eq!(cfg.cache_threshold, 0.9);
        let env = vec![("RAGD_CACHE__THRESHOLD".to_string(), "2".to_string())];
        let e = Config::parse(&path, GOOD, env.into_iter()).unwrap_err();
        assert!(e.to_string().contains("cache.threshold"));
        let env = vec![("RAGD_QUERY__NOPE".to_string(), "1".to_string())];
        assert!(Config::parse(&path, GOOD, env.into_iter()).is_err());
        // A single underscore after a section's name is a slip, not silence.
        let env = vec![("RAGD_INDEX_BACKEND".to_string(), "qdrant".to_string())];
        let e = Config::parse(&path, GOOD, env.into_iter()).unwrap_err();
        assert!(e.to_string().contains("write RAGD_INDEX__BACKEND"), "{e}");
        // A secret's variable that the config names is not an override.
        let with_llm = format!(
            "{GOOD}\n[llm]\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\napi_key_env = \"RAGD_LLM_KEY\"\n"
        );
        let env = vec![("RAGD_LLM_KEY".to_string(), "sk-test".to_string())];
        assert!(Config::parse(&path, &with_llm, env.into_iter()).is_ok());
        // Variables of other tools and of ragd's scripts stay ignored.
        let env = [
            "RAGD_BLAS",
            "RAGD_TEST_BLAS",
            "RAGD_KAFKA_DEBUG",
            "RAGD_GPU_ATTENTION",
            "RAGD_ADMIN_TOKEN",
            "RAGD_CACHE",
            "RAGD_MODEL",
        ]
        .map(|k| (k.to_string(), "x".to_string()));
        assert!(Config::parse(&path, GOOD, env.into_iter()).is_ok());
        // A value of the wrong type names the variable it came from.
        let env = [("RAGD_QUERY__CANDIDATES", "many"), ("RAGD_LOG", "debug")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let e = Config::parse(&path, GOOD, env.into_iter()).unwrap_err();
        assert!(
            e.to_string()
                .contains("set from the environment: RAGD_QUERY__CANDIDATES"),
            "{e}"
        );
    }
}
