//! The query HTTP API and the admin HTTP API.

use crate::config::constant_time_eq;
use crate::node::Node;
use anyhow::Context;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ragd_actors::cache_guard::CachedAnswer;
use ragd_actors::dlq::{DeadLetters, PageQuery, Settled};
use ragd_actors::indexer::{Hit, Scope};
use ragd_actors::reranker::{RerankMsg, RerankRequest};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MAX_QUESTION_CHARS: usize = 4096;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryBody {
    pub question: String,
    pub top_k: Option<usize>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct QueryResponse {
    pub answer: Option<String>,
    /// Why `answer` is null although an LLM is configured (rate limited past
    /// the retry budget, endpoint down, …). The sources are still returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_error: Option<String>,
    /// True when the LLM cut `answer` off (at `[llm] max_tokens`, by a
    /// content filter): returned as it came, and not cached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub answer_incomplete: bool,
    pub cached: bool,
    pub sources: Vec<Hit>,
    pub timings_ms: serde_json::Map<String, serde_json::Value>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .split_once(' ')
        // The scheme is case-insensitive (RFC 9110).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

pub fn query_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/query", post(query))
        .with_state(node)
}

/// The most bytes of a query's body: a question of
/// [`MAX_QUESTION_CHARS`] characters, four bytes each, escaped, and room
/// for the rest.
const MAX_QUERY_BODY: usize = 64 << 10;

async fn query(State(node): State<Arc<Node>>, request: axum::extract::Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    // Who asks before the body is read: a caller without a token costs
    // no more than its headers.
    let Some(token) = bearer(&parts.headers) else {
        return unauthorized("missing Authorization: Bearer <token>");
    };
    let Some(principal) = node.config.principal_for(token) else {
        return unauthorized("unknown token");
    };
    let body = match query_body(&parts.headers, body).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let question = body.question.trim().to_string();
    if question.is_empty() {
        return error(StatusCode::BAD_REQUEST, "question is empty");
    }
    if question.chars().count() > MAX_QUESTION_CHARS {
        return error(
            StatusCode::BAD_REQUEST,
            format!("question is longer than {MAX_QUESTION_CHARS} characters"),
        );
    }
    if !node.encoder.reads_a_word(&question) {
        return error(
            StatusCode::BAD_REQUEST,
            "the question has no word the embedding model knows (its vocabulary has none \
             of these characters): ask in words",
        );
    }
    let top_k = body.top_k.unwrap_or(5);
    if top_k == 0 || top_k > node.config.max_top_k {
        return error(
            StatusCode::BAD_REQUEST,
            format!("top_k must be between 1 and {}", node.config.max_top_k),
        );
    }
    // Shed, not queued: under a burst past what the node answers in time,
    // a queue only makes every query late and holds its memory.
    let Ok(_slot) = node.query_slots.try_acquire() else {
        metrics::counter!("ragd_queries_shed_total").increment(1);
        let limit = node.config.max_concurrent_queries;
        let body = json!({
            "error": format!(
                "the node is answering {limit} queries, its limit ([query] max_concurrent); \
                 try again shortly"
            )
        });
        let retry = [(axum::http::header::RETRY_AFTER, "1")];
        return (StatusCode::SERVICE_UNAVAILABLE, retry, Json(body)).into_response();
    };
    let scope = Scope {
        divisions: principal.divisions.clone(),
        access_levels: principal.access_levels.clone(),
    }
    .canonical();
    // The step the query is at, for the 504 when it runs out of time.
    let step = parking_lot::Mutex::new("embedding the question");
    let timeout = node.config.query_timeout;
    let answered = tokio::time::timeout(
        timeout,
        answer(&node, &question, top_k, &scope, started, &step),
    )
    .await
    .unwrap_or_else(|_| {
        Err(failed(StatusCode::GATEWAY_TIMEOUT)(anyhow::anyhow!(
            "it did not finish within {}s ([query] timeout_secs); it was at {}",
            timeout.as_secs(),
            *step.lock()
        )))
    });
    match answered {
        Ok(resp) => {
            metrics::counter!("ragd_queries_total", "cached" => resp.cached.to_string())
                .increment(1);
            metrics::histogram!("ragd_query_seconds").record(started.elapsed().as_secs_f64());
            Json(resp).into_response()
        }
        Err(QueryFailed { status, error: e }) => {
            tracing::error!(principal = %principal.name, %status, "query failed: {e:#}");
            metrics::counter!("ragd_query_errors_total", "status" => status.as_str().to_string())
                .increment(1);
            failure_response(status, &e)
        }
    }
}

/// Why a query failed, with the status that tells the client what to make
/// of it:
/// * 503, with Retry-After, when a part of the node is restarting or the
///   vector store does not answer: the same question may work shortly;
/// * 504 when the reranker did not answer in time, or the whole query
///   took longer than `[query] timeout_secs`;
/// * 500 when a part failed on this question (the model, or a vector store
///   that answered with an error): asking again will not help, and the
///   node's log says why.
struct QueryFailed {
    status: StatusCode,
    error: anyhow::Error,
}

/// The `map_err` that gives an error its status.
fn failed(status: StatusCode) -> impl FnOnce(anyhow::Error) -> QueryFailed {
    move |error| QueryFailed { status, error }
}

/// The reranker's error (its whole chain, as text: model paths and
/// all) under a reason fit for the caller; the chain goes to the log.
fn rerank_failed(chain: String) -> anyhow::Error {
    anyhow::anyhow!(chain).context("reranking failed")
}

/// A 401 that names the scheme to use (RFC 9110).
fn unauthorized(why: &str) -> Response {
    let challenge = [(axum::http::header::WWW_AUTHENTICATE, "Bearer")];
    (challenge, error(StatusCode::UNAUTHORIZED, why)).into_response()
}

/// The query's body, read up to [`MAX_QUERY_BODY`] bytes: 415 for a body
/// that says it is not JSON, 413 for one too large, 400 for bad JSON.
async fn query_body(headers: &HeaderMap, body: axum::body::Body) -> Result<QueryBody, Response> {
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|m| {
            m == "application/json" || m.starts_with("application/") && m.ends_with("+json")
        });
    if !json {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_QUERY_BODY} bytes"),
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_QUERY_BODY as u64) {
        return Err(too_large());
    }
    // (Past the length said, or a chunked body past the limit: too large.
    // Any other failure is a client gone, who reads no answer.)
    let bytes = axum::body::to_bytes(body, MAX_QUERY_BODY)
        .await
        .map_err(|_| too_large())?;
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

fn failure_response(status: StatusCode, e: &anyhow::Error) -> Response {
    // Only the outermost reason: the causes below it name backend
    // addresses and internals, which are for the node's log, not for
    // every principal.
    let body = error(
        status,
        format!("query failed: {e}; the details are in the node's log"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        let retry = [(axum::http::header::RETRY_AFTER, "1")];
        return (retry, body).into_response();
    }
    body
}

fn ms(d: Duration) -> serde_json::Value {
    json!((d.as_secs_f64() * 1e5).round() / 100.0)
}

async fn answer(
    node: &Node,
    question: &str,
    top_k: usize,
    scope: &Scope,
    started: Instant,
    step: &parking_lot::Mutex<&'static str>,
) -> Result<QueryResponse, QueryFailed> {
    use StatusCode as S;
    let at = |what: &'static str| *step.lock() = what;
    let mut timings = serde_json::Map::new();
    let t = Instant::now();
    let vector = node
        .query_embedder
        .embed(vec![question.to_string()])
        .await
        .context("embedding the question")
        .map_err(failed(S::INTERNAL_SERVER_ERROR))?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("the encoder returned no vector"))
        .map_err(failed(S::INTERNAL_SERVER_ERROR))?;
    timings.insert("embed".into(), ms(t.elapsed()));

    let t = Instant::now();
    at("the semantic cache");
    // Before the search: an answer found from here on is stored as of
    // this, and refused if anything was indexed in its scope meanwhile.
    let probe = node.cache.probe(&vector, scope, top_k).await;
    if let Some(hit) = probe.found {
        timings.insert("cache".into(), ms(t.elapsed()));
        timings.insert("total".into(), ms(started.elapsed()));
        return Ok(QueryResponse {
            answer: hit.answer,
            answer_error: None,
            answer_incomplete: false,
            cached: true,
            sources: hit.sources,
            timings_ms: timings,
        });
    }
    timings.insert("cache".into(), ms(t.elapsed()));

    let t = Instant::now();
    at("the vector search");
    let mut hits = match node
        .store
        .search(&vector, scope, node.config.candidates)
        .await
    {
        Ok(hits) => hits,
        // Down or overloaded past its retries (pool::Unavailable).
        Err(e) if ragd_actors::pool::is_unavailable(&e) => {
            let e = e.context("the vector store did not answer");
            return Err(failed(S::SERVICE_UNAVAILABLE)(e));
        }
        Err(e) => {
            let e = e.context("the vector store failed the search");
            return Err(failed(S::INTERNAL_SERVER_ERROR)(e));
        }
    };
    // The engine filtered already; this is the second lock on the door.
    hits.retain(|h| scope.allows(&h.division, &h.access_level));
    timings.insert("search".into(), ms(t.elapsed()));
    timings.insert("candidates".into(), json!(hits.len()));

    let t = Instant::now();
    at("reranking");
    let reranker = node
        .reranker()
        .ok_or_else(|| anyhow::anyhow!("the reranker is restarting"))
        .map_err(failed(S::SERVICE_UNAVAILABLE))?;
    // The budget covers the whole path up to the answer; the reranker gets
    // what embedding, cache and search left of it, less a little for what
    // follows it.
    let deadline = node
        .config
        .latency_budget
        .map(|budget| started + budget.mul_f64(0.95));
    let req = RerankRequest {
        question: question.to_string(),
        hits,
        top_k,
        deadline,
    };
    let result = reranker
        .call(
            |reply| RerankMsg::Rerank(req, reply),
            Some(Duration::from_secs(30)),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}").context("the reranker is unavailable"))
        .map_err(failed(S::SERVICE_UNAVAILABLE))?;
    let result = match result {
        ractor::rpc::CallResult::Success(r) => r
            .map_err(rerank_failed)
            .map_err(failed(S::INTERNAL_SERVER_ERROR))?,
        ractor::rpc::CallResult::Timeout => {
            return Err(failed(S::GATEWAY_TIMEOUT)(anyhow::anyhow!(
                "reranker timed out"
            )))
        }
        // It failed while on this question.
        ractor::rpc::CallResult::SenderError => {
            return Err(failed(S::INTERNAL_SERVER_ERROR)(anyhow::anyhow!(
                "reranker failed"
            )))
        }
    };
    timings.insert("rerank".into(), ms(t.elapsed()));
    timings.insert("rerank_depth".into(), json!(result.scored));
    let cut_short = result.cut_short();

    let (answer, answer_error, answer_complete) = match &node.llm {
        None => (None, None, true),
        Some(llm) => {
            let t = Instant::now();
            at("the LLM");
            let r = llm.answer(question, &result.hits).await;
            timings.insert("llm".into(), ms(t.elapsed()));
            match r {
                Ok(a) => {
                    timings.insert("llm_attempts".into(), json!(a.attempts));
                    (Some(a.text), None, a.complete)
                }
                Err(e) => {
                    tracing::warn!("no LLM answer: {e}");
                    timings.insert("llm_attempts".into(), json!(e.attempts));
                    (None, Some(e.public()), true)
                }
            }
        }
    };
    let value = CachedAnswer {
        answer,
        sources: result.hits,
    };
    // Only complete responses are cached: a failed LLM call is retried by
    // the next asker, not served to them, and so is an answer the LLM cut
    // short (at llm.max_tokens, by a content filter); a rerank the latency
    // budget cut short is redone fully once the load allows. Nor are answers
    // without sources, or any before this node's first scan is done (an
    // ingest node's; a query-only node has none): the documents may just
    // not be indexed yet. (Their indexing moves the scope's generations,
    // which drops such an answer, but a generation the cache could not
    // take yet is owed, and meanwhile it would be served.) Nor when the
    // lookup could not say as of when (the cache was unavailable).
    // Counted by reason: a latency budget that cuts every rerank short
    // keeps the cache empty, which shows here and nowhere else.
    let uncached = if answer_error.is_some() {
        Some("answer_error")
    } else if !answer_complete {
        Some("answer_incomplete")
    } else if cut_short {
        Some("rerank_cut_short")
    } else if value.sources.is_empty() {
        Some("no_sources")
    } else if !node.scanned.load(std::sync::atomic::Ordering::SeqCst) {
        Some("first_scan")
    } else if probe.as_of.is_none() {
        Some("cache_unavailable")
    } else {
        None
    };
    if let Some(reason) = uncached {
        metrics::counter!("ragd_answers_not_cached_total", "reason" => reason).increment(1);
    } else if let Some(as_of) = probe.as_of {
        node.cache
            .store(&vector, scope, top_k, value.clone(), as_of);
    }
    timings.insert("total".into(), ms(started.elapsed()));
    Ok(QueryResponse {
        answer: value.answer,
        answer_error,
        answer_incomplete: !answer_complete,
        cached: false,
        sources: value.sources,
        timings_ms: timings,
    })
}

pub fn admin_router(
    node: Arc<Node>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/actors", get(actors))
        .route("/ingest", get(ingest))
        .route("/ingest/documents", get(documents))
        .route("/ingest/sources", get(sources))
        .route("/index", get(index_info))
        .route("/dlq", get(dlq_list))
        .route("/dlq/{id}/replay", post(dlq_replay))
        .route("/metrics", get(move |s| prometheus(s, metrics.clone())))
        .with_state(node)
}

/// The 401 to send, if the caller is not the admin.
fn admin_auth(node: &Node, headers: &HeaderMap) -> Option<Response> {
    let expected = node.config.admin_token.as_ref()?;
    match bearer(headers) {
        Some(t) if constant_time_eq(t.as_bytes(), expected.0.as_bytes()) => None,
        _ => Some(error(
            StatusCode::UNAUTHORIZED,
            "admin endpoints need Authorization: Bearer <admin token>",
        )),
    }
}

async fn ready(State(node): State<Arc<Node>>) -> Response {
    if node.scanned.load(std::sync::atomic::Ordering::SeqCst) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "initial scan in progress").into_response()
    }
}

async fn actors(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    if let Some(r) = admin_auth(&node, &headers) {
        return r;
    }
    let kafka = node.kafka.as_ref().map(|k| k.consumers());
    Json(json!({
        "node": node.config.node_name,
        "roles": node.roles.names(),
        "reranker": if node.reranker_on { "on" } else { "off" },
        "actors": node.registry.tree(),
        "kafka": kafka,
    }))
    .into_response()
}

async fn ingest(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    if let Some(r) = admin_auth(&node, &headers) {
        return r;
    }
    if let Some(r) = ingest_only(&node) {
        return r;
    }
    Json(node.ledger.counts()).into_response()
}

/// How each source stands: how it is watched, and why what is under it
/// is not all seen right now (a root missing, a share that hangs), if so.
async fn sources(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    if let Some(r) = admin_auth(&node, &headers) {
        return r;
    }
    if let Some(r) = ingest_only(&node) {
        return r;
    }
    let sources: Vec<serde_json::Value> = node
        .sources
        .lock()
        .iter()
        .map(|(name, v)| {
            serde_json::json!({
                "name": name,
                "root": v.root,
                "watch": v.watch,
                "unseen": v.unseen,
            })
        })
        .collect();
    Json(serde_json::json!({ "sources": sources })).into_response()
}

/// The 409 for a ledger request to a node without the ingest role: an
/// index node keeps only a version map; the per-document ledger (seen,
/// indexed, failed, and why) is the ingest node's.
fn ingest_only(node: &Node) -> Option<Response> {
    (!node.roles.ingest).then(|| {
        error(
            StatusCode::CONFLICT,
            "this node has no ingest role: the ingest ledger is on the ingest nodes",
        )
    })
}

#[derive(serde::Deserialize)]
struct DocumentsParams {
    status: Option<String>,
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

/// Pages through the ledger's documents: `?status=skipped` says which
/// documents were skipped and why, `?prefix=kb:hr/` narrows to a folder,
/// `?after=<next>` turns the page.
async fn documents(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    params: Result<axum::extract::Query<DocumentsParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    use ragd_actors::ledger::{DocQuery, DocStatus};
    const MAX: usize = 1000;
    if let Some(r) = admin_auth(&node, &headers) {
        return r;
    }
    if let Some(r) = ingest_only(&node) {
        return r;
    }
    let params = match params {
        Ok(p) => p.0,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if let Some(s) = params.status.as_deref() {
        if !DocStatus::NAMES.contains(&s) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("status must be one of {}", DocStatus::NAMES.join(", ")),
            );
        }
    }
    let limit = match page_limit(params.limit, 100, MAX) {
        Ok(limit) => limit,
        Err(r) => return *r,
    };
    let query = DocQuery {
        status: params.status,
        prefix: params.prefix,
        after: params.after,
    };
    let docs = node.ledger.documents(&query, limit);
    let next = (docs.len() == limit).then(|| docs[limit - 1].doc_id.clone());
    Json(json!({ "documents": docs, "next": next })).into_response()
}

async fn index_info(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    if let Some(r) = admin_auth(&node, &headers) {
        return r;
    }
    let (optimizing, optimizations) = node.optimizer.state();
    let counts = async {
        Ok::<_, anyhow::Error>((
            node.store.count(None).await?,
            node.store.count_hidden().await?,
        ))
    };
    match counts.await {
        Ok((points, hidden)) => Json(json!({
            "backend": node.store.backend(),
            "points": points,
            // Of them, out of every search until indexed anew in their
            // new partition, or deleted (a changed partition rule, a
            // source no longer configured).
            "hidden": hidden,
            // The HNSW build (embedded store): running now, runs finished.
            "optimizing": optimizing,
            "optimizations": optimizations,
        }))
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

/// A page of `GET /dlq`: `?after=ID` (the last id of the page before),
/// `limit`, `pending=true` for the entries still waiting (not replayed,
/// nor settled by a newer version or a deletion).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DlqParams {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    #[serde(default)]
    pending: bool,
}

/// A listing's `limit` parameter: `default` when absent; outside
/// 1..=`max`, the 400 to send.
fn page_limit(limit: Option<usize>, default: usize, max: usize) -> Result<usize, Box<Response>> {
    let n = limit.unwrap_or(default);
    if (1..=max).contains(&n) {
        return Ok(n);
    }
    let why = format!("limit must be between 1 and {max}");
    Err(Box::new(error(StatusCode::BAD_REQUEST, why)))
}

/// Entries per `GET /dlq` page unless `limit` says otherwise, and the most
/// `limit` may ask for: a queue of many thousands is read in pages.
const DLQ_PAGE: usize = 1000;
const DLQ_PAGE_MAX: usize = 10_000;

/// `{"entries": [...], "next": ID}`: the entries in id order, one page at a
/// time; `next` (null on the last page) is the `after` of the next page, as
/// `GET /ingest/documents` pages.
async fn dlq_list(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    params: Result<Query<DlqParams>, QueryRejection>,
) -> Response {
    if let Some(r) = admin_auth(&node, &headers) {
        return r;
    }
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let limit = match page_limit(params.limit, DLQ_PAGE, DLQ_PAGE_MAX) {
        Ok(limit) => limit,
        Err(r) => return *r,
    };
    let q = PageQuery {
        after: params.after,
        limit,
        pending_only: params.pending,
    };
    match node.dlq.page(&q) {
        Ok(page) => {
            let next = page.entries.last().filter(|_| page.more).map(|e| e.id);
            Json(json!({ "entries": page.entries, "next": next })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn dlq_replay(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<u64>,
) -> Response {
    if let Some(r) = admin_auth(&node, &headers) {
        return r;
    }
    if !node.roles.ingest {
        // Replay re-reads the source file: only an ingest node has it.
        return error(
            StatusCode::CONFLICT,
            "this node has no ingest role: replay on an ingest node",
        );
    }
    // Checked before the entry is marked: a replay that cannot start must
    // leave it waiting, not marked done with nothing done.
    let entry = match node.dlq.get(id) {
        Ok(entry) => entry,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    let Some(entry) = entry else {
        return error(StatusCode::NOT_FOUND, format!("no DLQ entry {id}"));
    };
    if entry.replayed {
        let already = ragd_actors::dlq::AlreadyReplayed(id);
        return error(StatusCode::CONFLICT, already.to_string());
    }
    if let Some(how) = entry.settled {
        let why = match how {
            Settled::Deleted => "the document was deleted since",
            Settled::Superseded => "a newer version of the document was taken in since",
        };
        return error(
            StatusCode::CONFLICT,
            format!("DLQ entry {id} needs no replay: {why}"),
        );
    }
    let Some(path) = replay_path(&node.config.sources, &entry) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{}: no configured source holds this document any more",
                entry.doc_id
            ),
        );
    };
    let Some(watcher) = node.watcher() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the source watcher is restarting; try again",
        );
    };
    if let Err(e) = node.dlq.mark_replayed(id) {
        // Another replay of it got there first (a second click, two
        // operators): that one goes on.
        let status = if e.is::<ragd_actors::dlq::AlreadyReplayed>() {
            StatusCode::CONFLICT
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        return error(status, format!("{e:#}"));
    }
    if let Some(version) = entry.version.as_deref() {
        mark_twins_replayed(node.dlq.as_ref(), &entry.doc_id, version);
    }
    let _ = watcher.cast(ragd_actors::source_watcher::WatchMsg::Replay(
        entry.doc_id.clone(),
        path,
    ));
    Json(json!({ "replayed": id, "doc_id": entry.doc_id })).into_response()
}

/// Marks replayed the other entries still waiting for `version` of
/// `doc_id`, which the replay of one of them reads again too: each ingest
/// node on a shared mount dead-letters a version that fails, and an entry
/// left waiting would send every copy of that content to the DLQ at once
/// (`dead_lettered_elsewhere` in the watcher). Returns how many.
fn mark_twins_replayed(dlq: &dyn DeadLetters, doc_id: &str, version: &str) -> usize {
    let mut marked = 0;
    // (Bounded: a backend that kept answering with one entry would
    // otherwise loop.)
    for _ in 0..64 {
        match dlq.pending(doc_id, version) {
            Some(twin) if dlq.mark_replayed(twin.id).is_ok() => marked += 1,
            _ => break,
        }
    }
    marked
}

/// Where a dead-lettered document is in its source now. A replay looks at
/// it afresh: indexes it if it is there, deletes it if not. The entries of
/// the stages that only remove (a deletion, a prune) carry no path, and a
/// path recorded before the source's folder moved in the config is stale:
/// the document's id (`source:uri`) says where it is. None when no
/// configured source holds that id (the watcher would drop the replay).
fn replay_path(
    sources: &[ragd_actors::source_watcher::SourceSpec],
    entry: &ragd_actors::dlq::DlqEntry,
) -> Option<std::path::PathBuf> {
    use ragd_actors::source_watcher::doc_id_at;
    let holds = |p: &std::path::Path| doc_id_at(sources, p).as_deref() == Some(&entry.doc_id);
    let recorded = entry.payload.get("path").and_then(|p| p.as_str());
    if let Some(p) = recorded.map(std::path::PathBuf::from).filter(|p| holds(p)) {
        return Some(p);
    }
    let (source, uri) = ragd_actors::source_watcher::source_of_doc(sources, &entry.doc_id)?;
    Some(source.root.join(uri)).filter(|p| holds(p))
}

async fn prometheus(
    State(node): State<Arc<Node>>,
    handle: metrics_exporter_prometheus::PrometheusHandle,
) -> Response {
    let c = node.ledger.counts();
    for (state, v) in [
        ("seen", c.seen),
        ("indexed", c.indexed),
        ("deleted", c.deleted),
        ("skipped", c.skipped),
        ("dead_lettered", c.dead_lettered),
        ("in_flight", c.in_flight),
        ("forgotten", c.forgotten),
    ] {
        metrics::gauge!("ragd_ingest_documents", "state" => state).set(v as f64);
    }
    for (path, v) in node.registry.flat() {
        metrics::gauge!("ragd_actor_queue_depth", "actor" => path.clone())
            .set(v.queue_depth as f64);
        metrics::gauge!("ragd_actor_restarts", "actor" => path.clone()).set(v.restarts as f64);
        metrics::gauge!("ragd_actor_processed", "actor" => path.clone()).set(v.processed as f64);
        // A stage waiting for its backend (see ragd_actors::pool): worth an
        // alert when it lasts.
        let paused = if v.status == "paused" { 1.0 } else { 0.0 };
        metrics::gauge!("ragd_actor_paused", "actor" => path.clone()).set(paused);
        if let Some(w) = v.workers {
            metrics::gauge!("ragd_actor_workers", "actor" => path).set(w as f64);
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragd_actors::dlq::DlqEntry;
    use ragd_actors::messages::Partition;
    use ragd_actors::source_watcher::SourceSpec;

    /// A failed query's status says whether asking again may help (503,
    /// with Retry-After) or not (500, 504), and its body gives the reason
    /// without the causes under it (backend addresses are for the log).
    #[tokio::test]
    async fn a_failed_query_says_whether_to_ask_again_and_not_where_backends_are() {
        use axum::http::header::RETRY_AFTER;
        let e = anyhow::anyhow!("connecting to http://qdrant.internal:6334")
            .context("the vector store did not answer");
        let r = failure_response(StatusCode::SERVICE_UNAVAILABLE, &e);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let why = body["error"].as_str().unwrap();
        assert!(why.contains("the vector store did not answer"), "{why}");
        assert!(!why.contains("qdrant.internal"), "{why}");
        for status in [
            StatusCode::GATEWAY_TIMEOUT,
            StatusCode::INTERNAL_SERVER_ERROR,
        ] {
            let r = failure_response(status, &anyhow::anyhow!("reranker timed out"));
            assert_eq!(r.status(), status);
            assert!(r.headers().get(RETRY_AFTER).is_none());
        }
        // The reranker's reply is its error's whole chain, as text.
        let e = rerank_failed("scoring: loading /srv/models/ce/model.safetensors: EIO".into());
        let r = failure_response(StatusCode::INTERNAL_SERVER_ERROR, &e);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("reranking failed"), "{body}");
        assert!(!body.contains("/srv/models"), "{body}");
    }

    /// Replaying one entry of a version replays the others still waiting
    /// for it (another ingest node's); other versions' and documents'
    /// entries keep waiting.
    #[test]
    fn a_replay_marks_the_other_entries_of_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let dlq = ragd_actors::dlq::FileDlq::open(dir.path().join("dlq.jsonl")).unwrap();
        let entry = |doc_id: &str, version: &str| DlqEntry {
            id: 0,
            at: 0,
            stage: "chunker".into(),
            error: "boom".into(),
            attempts: 3,
            doc_id: doc_id.into(),
            version: Some(version.into()),
            payload: json!({}),
            replayed: false,
            settled: None,
        };
        let first = dlq.push(entry("kb:a.md", "v1")).unwrap();
        let twin = dlq.push(entry("kb:a.md", "v1")).unwrap();
        let older = dlq.push(entry("kb:a.md", "v0")).unwrap();
        let other = dlq.push(entry("kb:b.md", "v1")).unwrap();
        dlq.mark_replayed(first).unwrap();
        assert_eq!(mark_twins_replayed(&dlq, "kb:a.md", "v1"), 1);
        let replayed = |id: u64| dlq.get(id).unwrap().unwrap().replayed;
        assert!(replayed(twin));
        assert!(!replayed(older) && !replayed(other));
        assert_eq!(mark_twins_replayed(&dlq, "kb:a.md", "v1"), 0);
    }

    /// Every stage's entry can be replayed: those of the stages that only
    /// remove (a deletion, a prune) carry no path, and their document's id
    /// says where it was.
    #[test]
    fn a_replay_finds_the_document_from_its_path_or_its_id() {
        let sources = [SourceSpec {
            name: "kb".into(),
            root: "/srv/kb".into(),
            partition: Partition {
                division: "eng".into(),
                access_level: "internal".into(),
            },
            rules: vec![],
            poll: None,
            mount_point: false,
        }];
        let entry = |doc_id: &str, payload: serde_json::Value| DlqEntry {
            id: 1,
            at: 0,
            stage: "version_pruner".into(),
            error: "unavailable".into(),
            attempts: 3,
            doc_id: doc_id.into(),
            version: None,
            payload,
            replayed: false,
            settled: None,
        };
        let chunker = entry("kb:a/b.md", json!({ "path": "/srv/kb/a/b.md" }));
        assert_eq!(
            replay_path(&sources, &chunker),
            Some("/srv/kb/a/b.md".into())
        );
        // Recorded before the source's folder moved: found where it is now.
        let moved = entry("kb:a/b.md", json!({ "path": "/old/kb/a/b.md" }));
        assert_eq!(replay_path(&sources, &moved), Some("/srv/kb/a/b.md".into()));
        // A name the watcher ignores would never be replayed.
        assert_eq!(replay_path(&sources, &entry("kb:a/.b.md", json!({}))), None);
        let pruner = entry(
            "kb:a/c:d.md",
            json!({ "deleted": { "doc_id": "kb:a/c:d.md" } }),
        );
        assert_eq!(
            replay_path(&sources, &pruner),
            Some("/srv/kb/a/c:d.md".into())
        );
        let deletion = entry("kb:x.md", json!({ "delete": "kb:x.md" }));
        assert_eq!(
            replay_path(&sources, &deletion),
            Some("/srv/kb/x.md".into())
        );
        // A source no longer configured: nowhere to look.
        assert_eq!(replay_path(&sources, &entry("wiki:x.md", json!({}))), None);
    }
}
