//! LLM answers: an OpenAI-compatible chat-completions client behind the
//! node's rate limits.
//!
//! * governor limits requests and (estimated) tokens per minute for the whole
//!   node: every query shares one limiter, and every attempt, retries
//!   included, takes its share before it is sent;
//! * 429 and 5xx (and timeouts / connection errors) are retried by backon:
//!   exponential backoff with jitter, `Retry-After` honoured when the server
//!   sends it, at most `max_retries` retries and never more than
//!   `retry_budget` of waiting in all; then the query gets a clear error next
//!   to its sources.

use backon::{ExponentialBuilder, Retryable};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use ragd_actors::indexer::Hit;
use serde_json::json;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Clone, Debug, PartialEq)]
pub struct LlmConfig {
    /// Base URL of an OpenAI-compatible API, e.g. `https://api.openai.com/v1`;
    /// `/chat/completions` is appended.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<crate::config::Secret>,
    pub timeout: Duration,
    pub max_tokens: u32,
    pub temperature: f32,
    pub requests_per_minute: NonZeroU32,
    pub tokens_per_minute: NonZeroU32,
    pub max_retries: usize,
    pub retry_budget: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

/// Why an answer could not be produced. The message is what the user sees.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    #[error("the LLM is rate limiting us (HTTP 429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("the LLM endpoint failed with HTTP {status}: {body}")]
    Server { status: u16, body: String },
    #[error("the LLM did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the LLM endpoint: {0}")]
    Transport(String),
    #[error("the LLM endpoint refused the request with HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("the LLM endpoint sent a response without an answer: {0}")]
    Malformed(String),
    #[error("no answer within {0:?} (the node's LLM rate limits and retries included)")]
    Deadline(Duration),
}

impl LlmError {
    /// What a principal is told: the kind of failure and its status, not
    /// the provider's response or the endpoint's address (those go to the
    /// node's log).
    pub fn public(&self) -> String {
        match self {
            LlmError::Server { status, .. } => {
                format!("the LLM endpoint failed with HTTP {status}")
            }
            LlmError::Transport(_) => "cannot reach the LLM endpoint".into(),
            LlmError::Refused { status, .. } => {
                format!("the LLM endpoint refused the request with HTTP {status}")
            }
            LlmError::Malformed(_) => "the LLM endpoint sent a response without an answer".into(),
            other => other.to_string(),
        }
    }

    fn retryable(&self) -> bool {
        matches!(
            self,
            LlmError::RateLimited { .. }
                | LlmError::Server { .. }
                | LlmError::Timeout(_)
                | LlmError::Transport(_)
        )
    }
}

/// The error the query returns once retries are spent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("no answer after {attempts} attempt(s): {last}")]
pub struct GaveUp {
    pub attempts: u32,
    pub last: LlmError,
}

impl GaveUp {
    /// [`LlmError::public`], with the attempts.
    pub fn public(&self) -> String {
        format!(
            "no answer after {} attempt(s): {}",
            self.attempts,
            self.last.public()
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub attempts: u32,
    /// False when the LLM stopped short of the end: it ran into
    /// `max_tokens` or a content filter (`finish_reason` "length" or
    /// "content_filter"). Such an answer is shown, not cached: the next
    /// asker would get the cut-off text for the cache's whole TTL.
    pub complete: bool,
}

/// The longest a 429 holds the node. A provider (or a proxy in front of
/// it) may ask for hours or, by a bug, for ever; past this the node tries
/// one request and is told again.
pub const MAX_HOLD: Duration = Duration::from_secs(3600);

pub struct Llm {
    cfg: LlmConfig,
    http: reqwest::Client,
    url: String,
    requests: DefaultDirectRateLimiter,
    tokens: DefaultDirectRateLimiter,
    tokens_burst: NonZeroU32,
    /// After a 429, no request leaves the node before this (its
    /// Retry-After, or the shortest backoff): the provider said so to the
    /// node, not only to the query that was told, and every other query
    /// sending meanwhile would be refused too, spending its retries.
    held_until: parking_lot::Mutex<Option<tokio::time::Instant>>,
    /// Attempts sent, over the node's lifetime (admin view and tests).
    pub sent: AtomicU64,
}

impl Llm {
    pub fn new(cfg: LlmConfig) -> anyhow::Result<Arc<Llm>> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            .build()?;
        // Requests may come a second's worth at a time; tokens a minute's
        // worth (one big prompt must always fit).
        let rps_burst =
            NonZeroU32::new(cfg.requests_per_minute.get() / 60).unwrap_or(NonZeroU32::MIN);
        let requests =
            RateLimiter::direct(Quota::per_minute(cfg.requests_per_minute).allow_burst(rps_burst));
        let tokens = RateLimiter::direct(Quota::per_minute(cfg.tokens_per_minute));
        let url = format!("{}/chat/completions", cfg.base_url.trim_end_matches('/'));
        Ok(Arc::new(Llm {
            tokens_burst: cfg.tokens_per_minute,
            cfg,
            http,
            url,
            requests,
            tokens,
            held_until: parking_lot::Mutex::new(None),
            sent: AtomicU64::new(0),
        }))
    }

    /// Answers `question` from `sources` (already reranked, best first).
    pub async fn answer(&self, question: &str, sources: &[Hit]) -> Result<Answer, GaveUp> {
        let body = request_body(&self.cfg, question, sources);
        // ~4 characters a token for English prose, plus what we let it write.
        let estimate = u32::try_from(body.to_string().len() / 4)
            .unwrap_or(u32::MAX)
            .saturating_add(self.cfg.max_tokens);
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let spent = parking_lot::Mutex::new(Duration::ZERO);
        let budget = self.cfg.retry_budget;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.cfg.min_backoff)
            .with_max_delay(self.cfg.max_backoff)
            .with_max_times(self.cfg.max_retries)
            .with_jitter();
        // A query waits for the LLM at most one request's timeout plus the
        // retry budget, its turn under the node's rate limits included: at
        // 60 requests a minute, the thousandth concurrent question would
        // otherwise wait a quarter of an hour, and a stopping node with it.
        let deadline = self.cfg.timeout + budget;
        let give_up_at = tokio::time::Instant::now() + deadline;
        let retried = (|| async {
            attempts.fetch_add(1, Ordering::SeqCst);
            self.once(&body, estimate, give_up_at).await
        })
        .retry(backoff)
        .when(LlmError::retryable)
        .adjust(|e, planned| {
            // backon says None when the retries are spent.
            let planned = planned?;
            let wait = match e {
                LlmError::RateLimited {
                    retry_after: Some(after),
                } => *after,
                _ => planned,
            };
            // A wait that ends past the query's deadline is given up now,
            // with this error: not slept on a query slot until the deadline
            // and then told as one.
            let now = tokio::time::Instant::now();
            if now.checked_add(wait).is_none_or(|end| end >= give_up_at) {
                return None;
            }
            let mut spent = spent.lock();
            if spent.checked_add(wait).is_none_or(|total| total > budget) {
                return None; // waiting that long would break the budget
            }
            *spent += wait;
            metrics::counter!("ragd_llm_retries_total").increment(1);
            tracing::debug!(error = %e, ?wait, "retrying the LLM call");
            Some(wait)
        });
        let result = tokio::time::timeout(deadline, retried)
            .await
            .unwrap_or(Err(LlmError::Deadline(deadline)));
        let attempts = attempts.load(Ordering::SeqCst);
        match result {
            Ok((text, complete)) => {
                let outcome = if complete { "ok" } else { "incomplete" };
                metrics::counter!("ragd_llm_answers_total", "outcome" => outcome).increment(1);
                Ok(Answer {
                    text,
                    attempts,
                    complete,
                })
            }
            Err(last) => {
                metrics::counter!("ragd_llm_answers_total", "outcome" => "failed").increment(1);
                Err(GaveUp { attempts, last })
            }
        }
    }

    /// One attempt: the answer and whether it is complete.
    async fn once(
        &self,
        body: &serde_json::Value,
        estimate: u32,
        give_up_at: tokio::time::Instant,
    ) -> Result<(String, bool), LlmError> {
        // (Looked at again after each wait: another 429 may have moved it.)
        loop {
            let until = *self.held_until.lock();
            let now = tokio::time::Instant::now();
            match until {
                // A hold that outlasts this query is the provider's answer
                // to it too: said now, with the wait (the retry budget then
                // refuses it), not after sleeping to the query's deadline
                // while it holds one of the node's query slots.
                Some(t) if t > now && t >= give_up_at => {
                    return Err(LlmError::RateLimited {
                        retry_after: Some(t - now),
                    })
                }
                Some(t) if t > now => tokio::time::sleep_until(t).await,
                _ => break,
            }
        }
        self.requests.until_ready().await;
        let n = NonZeroU32::new(estimate.min(self.tokens_burst.get())).unwrap_or(NonZeroU32::MIN);
        // Cannot fail: n is clamped to the burst.
        let _ = self.tokens.until_n_ready(n).await;
        self.sent.fetch_add(1, Ordering::SeqCst);
        let mut req = self.http.post(&self.url).json(body);
        if let Some(key) = &self.cfg.api_key {
            req = req.bearer_auth(&key.0);
        }
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        if status.as_u16() == 429 {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let hold = retry_after.unwrap_or(self.cfg.min_backoff).min(MAX_HOLD);
            let until = tokio::time::Instant::now() + hold;
            let mut held = self.held_until.lock();
            *held = Some(held.map_or(until, |t| t.max(until)));
            return Err(LlmError::RateLimited { retry_after });
        }
        let text = resp.text().await.map_err(|e| self.transport(e))?;
        if status.is_server_error() {
            return Err(LlmError::Server {
                status: status.as_u16(),
                body: snippet(&text),
            });
        }
        if !status.is_success() {
            return Err(LlmError::Refused {
                status: status.as_u16(),
                body: snippet(&text),
            });
        }
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| LlmError::Malformed(e.to_string()))?;
        let choice = &v["choices"][0];
        let content = choice["message"]["content"]
            .as_str()
            .filter(|c| !c.trim().is_empty())
            .ok_or_else(|| LlmError::Malformed(snippet(&text)))?;
        let complete = !matches!(
            choice["finish_reason"].as_str(),
            Some("length" | "content_filter")
        );
        if !complete {
            tracing::warn!(
                finish_reason = %choice["finish_reason"],
                "the LLM's answer stopped short (llm.max_tokens or a content filter)"
            );
        }
        Ok((content.to_string(), complete))
    }

    fn transport(&self, e: reqwest::Error) -> LlmError {
        if e.is_timeout() {
            LlmError::Timeout(self.cfg.timeout)
        } else {
            LlmError::Transport(e.to_string())
        }
    }
}

fn snippet(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// `Retry-After`: delta-seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        // A wait too long for a Duration is as good as forever: the retry
        // budget then refuses it.
        return (secs >= 0.0).then(|| Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

pub const SYSTEM_PROMPT: &str = "You answer questions about the company's internal documents. \
Use only the numbered sources you are given. Cite every source you use as [n]. \
If the sources do not contain the answer, say that you do not know.";

/// The chat-completions request for `question` over `sources`, numbered
/// from 1 in the order given (the reranker's).
pub fn request_body(cfg: &LlmConfig, question: &str, sources: &[Hit]) -> serde_json::Value {
    let mut user = String::from("Sources:\n");
    for (i, h) in sources.iter().enumerate() {
        user.push_str(&format!(
            "\n[{}] {} (version {}, {}/{})\n{}\n",
            i + 1,
            h.uri,
            h.version,
            h.division,
            h.access_level,
            h.text.trim()
        ));
    }
    user.push_str(&format!("\nQuestion: {question}"));
    json!({
        "model": cfg.model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
        ],
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": false,
    })
}

#[cfg(test)]
mod tests {
    //! Against a real HTTP server on loopback that plays a script of
    //! responses: the retry schedule, Retry-After, the retry budget, timeouts
    //! and the node-wide rate limit are observed from the server's side.
    use super::*;
    use ragd_actors::testkit::{FakeLlm, Step};
    use std::time::Instant;

    fn serve(steps: Vec<Step>) -> FakeLlm {
        FakeLlm::start(steps)
    }

    fn config(base_url: String) -> LlmConfig {
        LlmConfig {
            base_url,
            model: "test-model".into(),
            api_key: Some(crate::config::Secret("test-key".into())),
            timeout: Duration::from_secs(5),
            max_tokens: 64,
            temperature: 0.0,
            requests_per_minute: NonZeroU32::new(6000).unwrap(),
            tokens_per_minute: NonZeroU32::new(10_000_000).unwrap(),
            max_retries: 4,
            retry_budget: Duration::from_secs(30),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }

    fn hit() -> Hit {
        Hit {
            doc_id: "kb:hr/leave.md".into(),
            uri: "hr/leave.md".into(),
            version: "abc".into(),
            division: "hr".into(),
            access_level: "internal".into(),
            chunk_index: 0,
            text: "Parental leave is sixteen weeks.".into(),
            score: 0.9,
        }
    }

    fn gaps(s: &FakeLlm) -> Vec<Duration> {
        s.arrivals().windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[tokio::test]
    async fn retry_after_is_honoured_on_429() {
        let script = serve(vec![Step::Status(429, Some("1"))]);
        let llm = Llm::new(config(script.url.clone())).unwrap();
        let a = llm.answer("leave?", &[hit()]).await.unwrap();
        assert_eq!(a.attempts, 2);
        assert!(a.text.contains("sixteen weeks"), "{}", a.text);
        assert_eq!(script.auth_headers()[0].as_deref(), Some("Bearer test-key"));
        let g = gaps(&script);
        // The server asked for a second; backoff alone would wait 100-200 ms.
        assert!(
            g[0] >= Duration::from_millis(990) && g[0] < Duration::from_millis(1500),
            "{g:?}"
        );
    }

    #[tokio::test]
    async fn rate_limits_without_retry_after_and_5xx_back_off_exponentially() {
        let script = serve(vec![
            Step::Status(429, None),
            Step::Status(500, None),
            Step::Status(503, None),
        ]);
        let llm = Llm::new(config(script.url.clone())).unwrap();
        let a = llm.answer("leave?", &[hit()]).await.unwrap();
        assert_eq!(a.attempts, 4);
        let g = gaps(&script);
        // Delays d, 2d, 4d with d = 100 ms, each plus up to 100% jitter.
        for (gap, d) in g.iter().zip([100u64, 200, 400]) {
            assert!(
                *gap >= Duration::from_millis(d - 5) && *gap < Duration::from_millis(2 * d + 150),
                "gap {gap:?} for a {d} ms backoff; all gaps {g:?}"
            );
        }
    }

    /// A 429's Retry-After holds every query of the node, not only the one
    /// told: a query asked meanwhile sends nothing until it has passed.
    #[tokio::test]
    async fn a_429_holds_back_the_other_queries_too() {
        let script = serve(vec![Step::Status(429, Some("1"))]);
        let llm = Llm::new(config(script.url.clone())).unwrap();
        let first = {
            let llm = llm.clone();
            tokio::spawn(async move { llm.answer("leave?", &[hit()]).await })
        };
        while script.arrivals().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Only once the 429 is read is the node held.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = llm.answer("travel?", &[hit()]).await.unwrap();
        assert_eq!(second.attempts, 1);
        assert_eq!(first.await.unwrap().unwrap().attempts, 2);
        let at = script.arrivals();
        assert_eq!(at.len(), 3);
        for later in &at[1..] {
            assert!(
                *later - at[0] >= Duration::from_millis(950),
                "sent {:?} after the 429",
                *later - at[0]
            );
        }
    }

    #[tokio::test]
    async fn retries_are_capped_then_a_clear_error() {
        let script = serve(vec![Step::Status(502, None); 10]);
        let mut c = config(script.url.clone());
        c.max_retries = 2;
        let llm = Llm::new(c).unwrap();
        let e = llm.answer("leave?", &[hit()]).await.unwrap_err();
        assert_eq!(e.attempts, 3);
        assert_eq!(script.arrivals().len(), 3);
        assert!(
            matches!(e.last, LlmError::Server { status: 502, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("HTTP 502"), "{e}");
        // Principals are told the status, not the provider's response.
        assert!(e.to_string().contains("scripted failure"), "{e}");
        assert_eq!(
            e.public(),
            "no answer after 3 attempt(s): the LLM endpoint failed with HTTP 502"
        );
    }

    #[tokio::test]
    async fn the_retry_budget_stops_waiting_for_a_long_retry_after() {
        let script = serve(vec![Step::Status(429, Some("2")); 10]);
        let mut c = config(script.url.clone());
        c.retry_budget = Duration::from_secs(3);
        let llm = Llm::new(c).unwrap();
        let t = Instant::now();
        let e = llm.answer("leave?", &[hit()]).await.unwrap_err();
        // One 2 s wait fits the 3 s budget, a second does not.
        assert_eq!(e.attempts, 2);
        assert_eq!(script.arrivals().len(), 2);
        assert!(
            t.elapsed() < Duration::from_millis(2900),
            "{:?}",
            t.elapsed()
        );
        assert!(matches!(e.last, LlmError::RateLimited { .. }), "{e:?}");
    }

    /// A retry whose wait fits the retry budget but would end past the
    /// query's deadline (attempts that timed out took the time) is given
    /// up at once, with the provider's error, not slept on until the
    /// deadline and reported as one.
    #[tokio::test]
    async fn a_retry_that_would_end_past_the_deadline_is_not_waited_for() {
        let slow = Step::Slow(Duration::from_secs(3));
        let script = serve(vec![slow.clone(), slow, Step::Status(429, Some("2"))]);
        let mut c = config(script.url.clone());
        c.timeout = Duration::from_secs(1);
        c.retry_budget = Duration::from_secs(3);
        let llm = Llm::new(c).unwrap();
        let t = Instant::now();
        let e = llm.answer("leave?", &[hit()]).await.unwrap_err();
        // About 2.5 s in, a 2 s wait: within the 3 s budget, past the 4 s
        // deadline.
        assert!(
            t.elapsed() < Duration::from_millis(3500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(e.attempts, 3);
        assert!(matches!(e.last, LlmError::RateLimited { .. }), "{e:?}");
    }

    /// A Retry-After too long for an Instant (a provider's or a proxy's
    /// bug) is neither a panic nor a hold for ever, and a hold longer than
    /// a query may wait fails that query at once, without sending: it does
    /// not sit on one of the node's query slots until its deadline.
    #[tokio::test]
    async fn a_hold_past_the_deadline_fails_queries_at_once_and_is_capped() {
        for retry_after in ["1e20", "inf", "7200"] {
            let script = serve(vec![Step::Status(429, Some(retry_after))]);
            let llm = Llm::new(config(script.url.clone())).unwrap();
            for question in ["leave?", "travel?", "pager?"] {
                let t = Instant::now();
                let e = llm.answer(question, &[hit()]).await.unwrap_err();
                assert!(
                    t.elapsed() < Duration::from_secs(2),
                    "{retry_after}: {question} waited {:?}",
                    t.elapsed()
                );
                assert!(matches!(e.last, LlmError::RateLimited { .. }), "{e:?}");
            }
            assert_eq!(script.arrivals().len(), 1, "{retry_after}: sent while held");
            let until = (*llm.held_until.lock()).expect("held");
            let held = until - tokio::time::Instant::now();
            assert!(
                held > MAX_HOLD - Duration::from_secs(60) && held <= MAX_HOLD,
                "{retry_after}: held {held:?}"
            );
        }
    }

    /// An answer cut off at max_tokens or by a content filter is returned
    /// but marked incomplete (not cached); an empty one is no answer.
    #[tokio::test]
    async fn answers_cut_short_are_incomplete_and_empty_ones_malformed() {
        let script = serve(vec![
            Step::Reply("Parental leave is", "length"),
            Step::Reply("", "content_filter"),
            Step::Reply("  \n", "stop"),
            Step::Reply("Sixteen weeks [1].", "stop"),
        ]);
        let llm = Llm::new(config(script.url.clone())).unwrap();
        let cut = llm.answer("leave?", &[hit()]).await.unwrap();
        assert_eq!(
            (cut.text.as_str(), cut.complete),
            ("Parental leave is", false)
        );
        for _ in 0..2 {
            let e = llm.answer("leave?", &[hit()]).await.unwrap_err();
            assert!(matches!(e.last, LlmError::Malformed(_)), "{e:?}");
            assert_eq!(e.attempts, 1);
        }
        let whole = llm.answer("leave?", &[hit()]).await.unwrap();
        assert_eq!(
            (whole.text.as_str(), whole.complete),
            ("Sixteen weeks [1].", true)
        );
    }

    #[tokio::test]
    async fn a_slow_endpoint_times_out_and_is_retried() {
        let script = serve(vec![Step::Slow(Duration::from_secs(3))]);
        let mut c = config(script.url.clone());
        c.timeout = Duration::from_millis(400);
        let llm = Llm::new(c).unwrap();
        let a = llm.answer("leave?", &[hit()]).await.unwrap();
        assert_eq!(a.attempts, 2);
        assert_eq!(script.arrivals().len(), 2);
    }

    #[tokio::test]
    async fn a_4xx_other_than_429_is_not_retried() {
        let script = serve(vec![Step::Status(400, None)]);
        let llm = Llm::new(config(script.url.clone())).unwrap();
        let e = llm.answer("leave?", &[hit()]).await.unwrap_err();
        assert_eq!(e.attempts, 1);
        assert_eq!(script.arrivals().len(), 1);
        assert!(matches!(e.last, LlmError::Refused { status: 400, .. }));
    }

    /// A question whose turn under the node's rate limit is further off
    /// than the LLM timeout plus the retry budget gets an answer error in
    /// that time, not after the wait.
    #[tokio::test]
    async fn a_query_waits_for_the_llm_no_longer_than_timeout_plus_budget() {
        let script = serve(vec![]);
        let mut c = config(script.url.clone());
        // One a minute: the second question's turn is a minute away.
        c.requests_per_minute = NonZeroU32::new(1).unwrap();
        c.timeout = Duration::from_millis(300);
        c.retry_budget = Duration::from_millis(300);
        let llm = Llm::new(c).unwrap();
        llm.answer("leave?", &[hit()]).await.unwrap();
        let t = Instant::now();
        let e = llm.answer("travel?", &[hit()]).await.unwrap_err();
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(e.last, LlmError::Deadline(Duration::from_millis(600)));
        assert_eq!(script.arrivals().len(), 1, "the second question was sent");
    }

    #[tokio::test]
    async fn concurrent_queries_share_the_request_rate_limit() {
        let script = serve(vec![]);
        let mut c = config(script.url.clone());
        // 120 a minute: 2 a second, bursts of 2.
        c.requests_per_minute = NonZeroU32::new(120).unwrap();
        let llm = Llm::new(c).unwrap();
        let t = Instant::now();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let llm = llm.clone();
                tokio::spawn(async move { llm.answer("leave?", &[hit()]).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let seen: Vec<Duration> = script.arrivals().iter().map(|s| *s - t).collect();
        assert_eq!(seen.len(), 8);
        // 2 at once, then one every 500 ms: the 8th no sooner than 3 s.
        assert!(seen[7] >= Duration::from_millis(2950), "{seen:?}");
        let early = seen
            .iter()
            .filter(|s| **s < Duration::from_millis(400))
            .count();
        assert!(early <= 2, "{early} requests in the first 400 ms: {seen:?}");
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        // Beyond what a Duration holds: forever, not a panic.
        assert_eq!(parse_retry_after("1e20"), Some(Duration::MAX));
        assert_eq!(parse_retry_after("inf"), Some(Duration::MAX));
        let later = SystemTime::now() + Duration::from_secs(10);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            d > Duration::from_secs(8) && d <= Duration::from_secs(10),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn the_prompt_numbers_the_sources_in_rerank_order() {
        let mut second = hit();
        second.uri = "hr/benefits.md".into();
        let body = request_body(&config("http://x/v1".into()), "how long?", &[hit(), second]);
        let user = body["messages"][1]["content"].as_str().unwrap();
        let a = user.find("[1] hr/leave.md").unwrap();
        let b = user.find("[2] hr/benefits.md").unwrap();
        assert!(a < b && user.ends_with("Question: how long?"), "{user}");
        assert_eq!(body["model"], "test-model");
        assert_eq!(body["messages"][0]["role"], "system");
    }
}
