//! The Reranker: a cross-encoder scores (question, chunk) pairs and keeps
//! the best. With no model configured it is off and says so: the vector order
//! is returned unchanged, nothing pretends to rerank.
//!
//! Under a latency budget the reranker adapts its depth: it scores only as
//! many of the best vector candidates as the time left allows, at the
//! per-pair cost it has measured, and keeps the rest in vector order behind
//! them. With time to spare it scores every candidate.

use crate::indexer::Hit;
use crate::model::AnyCrossEncoder;
use crate::stats::ActorStats;
use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct RerankRequest {
    pub question: String,
    pub hits: Vec<Hit>,
    pub top_k: usize,
    /// When the scores must be ready (the query's latency budget); None
    /// scores every candidate.
    pub deadline: Option<Instant>,
}

pub struct RerankResult {
    pub hits: Vec<Hit>,
    /// How many candidates the cross-encoder scored (0 when off); fewer than
    /// the candidates when the latency budget cut the depth.
    pub scored: usize,
    pub candidates: usize,
    /// Whether a cross-encoder is configured at all.
    pub on: bool,
}

impl RerankResult {
    /// True when the latency budget left candidates unscored.
    pub fn cut_short(&self) -> bool {
        self.on && self.scored < self.candidates
    }
}

/// The measured cost of a cross-encoder call: a fixed part per call
/// (tokenising, building the batch, launching) measured at calibration, and
/// a part per (question, passage) pair kept as an exponentially weighted
/// average over recent calls, with its mean deviation. Shared by the
/// reranker's restarts.
///
/// The fixed part matters: a first version planned with the per-pair
/// average alone (measured on 8-pair batches), underestimated small depths,
/// and overran a 200 ms budget by 30 ms at p95 (BENCHMARKS.md). So does the
/// spread: planning with the average alone, a call slower than usual
/// overruns, and on a busy 2-core machine one in several is. As TCP plans
/// its retransmission timeout (RFC 6298), depth is planned with the average
/// plus twice the mean deviation: steady costs keep the full depth, noisy
/// ones leave room for the noise.
///
/// Two guards keep one bad spell from switching the reranker off for good:
/// a call is counted at no more than [`PairCost::MAX_JUMP`] times the
/// average (one call stalled for seconds by a burst of ingest on the same
/// cores would otherwise plan every later query at depth 0), and when the
/// plan leaves no pair but there is time left, one pair is scored anyway
/// every [`PairCost::PROBE_AFTER`] (a depth of 0 measures nothing, so an
/// estimate from a slow spell would never come down). A probe is a pair
/// scored past the plan, so they are rare: one per [`PairCost::PROBE_AFTER`]
/// at most. And no call is cheaper than the fixed part: one that is lowers
/// it (a calibration stalled by a burst of ingest set it too high, and a
/// fixed part above the budget would leave no pair ever).
#[derive(Default)]
pub struct PairCost {
    state: Mutex<CostState>,
}

#[derive(Default)]
struct CostState {
    /// Seconds per call; 0 until calibrated.
    fixed: f64,
    /// Seconds per pair; None until the first measurement.
    per_pair: Option<f64>,
    /// Mean absolute deviation of the per-pair cost, seconds.
    deviation: f64,
    /// When the cost was last measured, or a probe handed out.
    looked: Option<Instant>,
}

impl PairCost {
    /// Weight of the newest measurement: recent load counts most, one odd
    /// call does not swing the depth.
    const ALPHA: f64 = 0.3;
    /// Weight of the newest deviation (RFC 6298's beta).
    const BETA: f64 = 0.25;
    /// Deviations added to the average when planning.
    const SPREAD: f64 = 2.0;
    /// Share of the time left that is planned for.
    const PLAN: f64 = 0.85;
    /// A call counts at most this many times the average per pair.
    const MAX_JUMP: f64 = 8.0;
    /// How often a plan of no pairs scores one pair anyway, to measure.
    pub const PROBE_AFTER: Duration = Duration::from_secs(5);

    /// Sets both parts from two timed calls of 1 and `n` pairs.
    pub fn calibrate(&self, one: Duration, n: usize, many: Duration) {
        let (t1, tn) = (one.as_secs_f64(), many.as_secs_f64());
        let per_pair = if n > 1 {
            ((tn - t1) / (n - 1) as f64).max(tn / n as f64 * 0.5)
        } else {
            tn
        };
        let mut s = self.state.lock();
        s.fixed = (t1 - per_pair).max(0.0);
        s.per_pair = Some(per_pair);
        s.deviation = 0.0;
        s.looked = Some(Instant::now());
    }

    pub fn observe(&self, pairs: usize, took: Duration) {
        if pairs == 0 {
            return;
        }
        let mut s = self.state.lock();
        s.fixed = s.fixed.min(took.as_secs_f64());
        let x = (took.as_secs_f64() - s.fixed) / pairs as f64;
        s.looked = Some(Instant::now());
        (s.per_pair, s.deviation) = match s.per_pair {
            None => (Some(x), 0.0),
            Some(avg) => {
                let x = x.min(avg * Self::MAX_JUMP);
                (
                    Some(avg + Self::ALPHA * (x - avg)),
                    s.deviation + Self::BETA * ((x - avg).abs() - s.deviation),
                )
            }
        };
    }

    pub fn per_pair(&self) -> Option<Duration> {
        self.state.lock().per_pair.map(Duration::from_secs_f64)
    }

    pub fn fixed(&self) -> Duration {
        Duration::from_secs_f64(self.state.lock().fixed)
    }

    /// How many of `candidates` pairs fit in `left`. No deadline: all of
    /// them. No measurement yet: all of them too (the reranker calibrates
    /// at start, so this only happens if that failed). None fit but time
    /// is left: one, as a probe, if nothing was measured for
    /// [`PairCost::PROBE_AFTER`].
    pub fn depth(&self, candidates: usize, left: Option<Duration>) -> usize {
        self.depth_at(candidates, left, Instant::now())
    }

    fn depth_at(&self, candidates: usize, left: Option<Duration>, now: Instant) -> usize {
        let mut s = self.state.lock();
        let (Some(left), Some(per_pair)) = (left, s.per_pair) else {
            return candidates;
        };
        let planned = per_pair + Self::SPREAD * s.deviation;
        if planned <= 0.0 {
            return candidates;
        }
        let usable = left.as_secs_f64() * Self::PLAN - s.fixed;
        let fit = if usable > 0.0 {
            ((usable / planned).floor() as usize).min(candidates)
        } else {
            0
        };
        let stale = s
            .looked
            .is_none_or(|t| now.saturating_duration_since(t) >= Self::PROBE_AFTER);
        if fit == 0 && candidates > 0 && !left.is_zero() && stale {
            // (Claimed: queries at the same moment do not all probe.)
            s.looked = Some(now);
            return 1;
        }
        fit
    }
}

pub enum RerankMsg {
    Rerank(RerankRequest, RpcReplyPort<Result<RerankResult, String>>),
}

pub struct Reranker;

pub struct RerankerArgs {
    pub model: Option<Arc<AnyCrossEncoder>>,
    pub cost: Arc<PairCost>,
    pub stats: Arc<ActorStats>,
}

/// Scores and orders; pure so the query path can also call it inline.
///
/// `hits` arrive in vector order, so when the budget allows only `depth`
/// pairs, the `depth` best vector candidates are scored and reordered, and
/// the others follow them unscored, in vector order (their `score` stays
/// the vector similarity).
pub fn rerank(
    model: Option<&AnyCrossEncoder>,
    cost: &PairCost,
    req: RerankRequest,
) -> anyhow::Result<RerankResult> {
    let RerankRequest {
        question,
        mut hits,
        top_k,
        deadline,
    } = req;
    let candidates = hits.len();
    let Some(model) = model else {
        hits.truncate(top_k);
        return Ok(RerankResult {
            hits,
            scored: 0,
            candidates,
            on: false,
        });
    };
    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    let depth = cost.depth(candidates, left);
    if depth > 0 {
        let passages: Vec<&str> = hits[..depth].iter().map(|h| h.text.as_str()).collect();
        let t = Instant::now();
        let scores = model.score(&question, &passages)?;
        cost.observe(depth, t.elapsed());
        for (h, s) in hits.iter_mut().zip(scores) {
            h.score = s;
        }
        hits[..depth].sort_by(|a, b| b.score.total_cmp(&a.score));
    }
    hits.truncate(top_k);
    Ok(RerankResult {
        hits,
        scored: depth,
        candidates,
        on: true,
    })
}

/// Measures the per-pair cost before the first query needs it: a few
/// passages of a typical chunk's length (~200 tokens), scored twice (the
/// first pass pays one-off costs).
pub fn calibrate(model: &AnyCrossEncoder, cost: &PairCost) -> anyhow::Result<Duration> {
    let passage = "The policy describes how employees request leave, travel and \
                   expenses through the portal, which manager approves them and \
                   how many weeks each kind of request takes to review. "
        .repeat(5);
    let passages = vec![passage.as_str(); 8];
    let q = "how do I request leave?";
    model.score(q, &passages[..1])?;
    let t = Instant::now();
    model.score(q, &passages[..1])?;
    let one = t.elapsed();
    let t = Instant::now();
    model.score(q, &passages)?;
    cost.calibrate(one, passages.len(), t.elapsed());
    Ok(cost.per_pair().unwrap_or_default())
}

impl Actor for Reranker {
    type Msg = RerankMsg;
    type State = RerankerArgs;
    type Arguments = RerankerArgs;

    async fn pre_start(
        &self,
        _: ActorRef<RerankMsg>,
        args: RerankerArgs,
    ) -> Result<RerankerArgs, ActorProcessingErr> {
        match &args.model {
            None => {
                args.stats.set_status("off");
                args.stats.set_note(
                    "reranker off: no [reranker] model configured; results keep the vector order",
                );
            }
            Some(model) if args.cost.per_pair().is_none() => {
                let (model, cost) = (model.clone(), args.cost.clone());
                let c = cost.clone();
                match tokio::task::spawn_blocking(move || calibrate(&model, &c)).await? {
                    Ok(per_pair) => args.stats.set_note(format!(
                        "measured {:.2} ms per (question, passage) pair, {:.2} ms per call",
                        per_pair.as_secs_f64() * 1e3,
                        cost.fixed().as_secs_f64() * 1e3
                    )),
                    // Not fatal: without a measurement every candidate is
                    // scored, and the first query measures it.
                    Err(e) => args.stats.set_error(format!("calibration failed: {e:#}")),
                }
                args.stats.set_status("running");
            }
            Some(_) => args.stats.set_status("running"),
        }
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<RerankMsg>,
        msg: RerankMsg,
        st: &mut RerankerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let RerankMsg::Rerank(req, reply) = msg;
        if reply.is_closed() {
            // The caller gave up (its timeout passed, or the client went):
            // scoring for nobody would only delay the queries queued
            // behind it, and under a backlog make them time out too.
            metrics::counter!("ragd_reranker_abandoned_total").increment(1);
            return Ok(());
        }
        let (model, cost) = (st.model.clone(), st.cost.clone());
        let result = tokio::task::spawn_blocking(move || rerank(model.as_deref(), &cost, req))
            .await
            .map_err(|e| format!("reranker task panicked: {e}"))
            .and_then(|r| r.map_err(|e| format!("{e:#}")));
        if let Err(e) = &result {
            st.stats.set_error(e.clone());
            st.stats
                .failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        st.stats.processed();
        let _ = reply.send(result);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BatchPolicy, Device};
    use std::path::PathBuf;

    fn tiny_cross_encoder() -> AnyCrossEncoder {
        let dir = std::env::var_os("RAGD_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
            })
            .join("tiny-cross-encoder");
        AnyCrossEncoder::load(&dir, BatchPolicy::default(), Device::Cpu).unwrap()
    }

    fn hits(n: usize) -> Vec<Hit> {
        (0..n)
            .map(|i| Hit {
                doc_id: format!("doc-{i}"),
                uri: format!("file:///doc-{i}"),
                version: "v1".into(),
                division: "general".into(),
                access_level: "public".into(),
                chunk_index: 0,
                text: format!("passage number {i} about leave, travel and expenses"),
                // Vector order: best first.
                score: 1.0 - i as f32 * 0.01,
            })
            .collect()
    }

    fn req(n: usize, top_k: usize, deadline: Option<Instant>) -> RerankRequest {
        RerankRequest {
            question: "how do I request leave?".into(),
            hits: hits(n),
            top_k,
            deadline,
        }
    }

    #[tokio::test]
    async fn a_request_whose_caller_gave_up_is_not_scored() {
        let stats = Arc::new(ActorStats::default());
        let args = RerankerArgs {
            model: Some(Arc::new(tiny_cross_encoder())),
            cost: Arc::new(PairCost::default()),
            stats: stats.clone(),
        };
        let (actor, handle) = Actor::spawn(None, Reranker, args).await.unwrap();
        let (tx, rx) = ractor::concurrency::oneshot();
        drop(rx); // the caller timed out
        actor
            .cast(RerankMsg::Rerank(req(20, 5, None), tx.into()))
            .unwrap();
        let r = ractor::call!(actor, RerankMsg::Rerank, req(20, 5, None))
            .unwrap()
            .unwrap();
        assert_eq!((r.scored, r.hits.len()), (20, 5));
        let processed = stats.processed.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(processed, 1, "the abandoned request was scored");
        actor.stop(None);
        handle.await.unwrap();
    }

    #[test]
    fn depth_follows_the_measured_cost_and_the_time_left() {
        let cost = PairCost::default();
        // Nothing measured: no basis to cut, every candidate is scored.
        assert_eq!(cost.depth(50, Some(Duration::from_millis(1))), 50);
        cost.observe(10, Duration::from_millis(20)); // 2 ms a pair
        assert_eq!(cost.depth(50, None), 50);
        // 85% of the 12 ms left is planned for: 10.2 ms, 5 pairs.
        assert_eq!(cost.depth(50, Some(Duration::from_millis(12))), 5);
        assert_eq!(cost.depth(50, Some(Duration::from_secs(1))), 50);
        assert_eq!(cost.depth(50, Some(Duration::ZERO)), 0);
        // A slower call moves the average part of the way, not all of it,
        // and the spread it shows is planned for too: 5 ms a pair on
        // average, 2.5 ms mean deviation, so 10 ms planned a pair.
        cost.observe(10, Duration::from_millis(120)); // 12 ms a pair
        let p = cost.per_pair().unwrap().as_secs_f64() * 1e3;
        assert!((p - 5.0).abs() < 1e-9, "{p}");
        assert_eq!(cost.depth(50, Some(Duration::from_millis(12))), 1);
        assert_eq!(cost.depth(50, Some(Duration::from_millis(120))), 10);
    }

    #[test]
    fn one_stalled_call_does_not_switch_the_reranker_off() {
        let cost = PairCost::default();
        for _ in 0..10 {
            cost.observe(50, Duration::from_millis(100)); // 2 ms a pair
        }
        let left = Some(Duration::from_millis(180)); // 153 ms planned
        assert_eq!(cost.depth(50, left), 50);
        // One call stalled for 10 s (200 ms a pair): counted as 16 ms a
        // pair. Counted in full, 160 ms a pair would be planned: none fit.
        cost.observe(50, Duration::from_secs(10));
        let d = cost.depth(50, left);
        assert!((10..50).contains(&d), "depth {d} after one stall");
        // Calls at the usual cost bring the full depth back.
        for _ in 0..20 {
            let d = cost.depth(50, left);
            cost.observe(d, Duration::from_millis(2) * d as u32);
        }
        assert_eq!(cost.depth(50, left), 50);
    }

    #[test]
    fn a_plan_of_no_pairs_probes_now_and_then_so_the_estimate_comes_down() {
        let cost = PairCost::default();
        cost.observe(1, Duration::from_millis(500)); // a slow spell
        let left = Some(Duration::from_millis(180));
        let now = Instant::now();
        assert_eq!(cost.depth_at(50, left, now), 0, "just measured");
        let later = now + PairCost::PROBE_AFTER;
        assert_eq!(cost.depth_at(50, left, later), 1, "a probe");
        assert_eq!(cost.depth_at(50, left, later), 0, "one probe at a time");
        // No time left: no probe (it could only overrun).
        let much_later = later + PairCost::PROBE_AFTER * 2;
        assert_eq!(cost.depth_at(50, Some(Duration::ZERO), much_later), 0);
        // A fixed part over the time left (a stalled calibration) leaves
        // no pair, and is probed too; the probe's call lowers it.
        let stalled = PairCost::default();
        stalled.calibrate(Duration::from_millis(300), 8, Duration::from_millis(800));
        assert!(stalled.fixed() > Duration::from_millis(200));
        assert_eq!(stalled.depth_at(50, left, much_later), 1, "a probe");
        stalled.observe(1, Duration::from_millis(5));
        assert!(stalled.fixed() <= Duration::from_millis(5));
        // The spell is over: the probes measure 2 ms a pair, and the depth
        // comes back.
        let mut t = much_later;
        for _ in 0..60 {
            t += PairCost::PROBE_AFTER;
            let d = cost.depth_at(50, left, t);
            if d > 0 {
                cost.observe(d, Duration::from_millis(2) * d as u32);
            }
        }
        assert_eq!(cost.depth_at(50, left, t), 50);
    }

    #[test]
    fn steady_costs_keep_the_full_depth_noisy_ones_leave_room() {
        let (steady, noisy) = (PairCost::default(), PairCost::default());
        for i in 0..40 {
            steady.observe(10, Duration::from_millis(40)); // 4 ms a pair
                                                           // 2 or 6 ms a pair: the same 4 ms on average.
            noisy.observe(10, Duration::from_millis(if i % 2 == 0 { 20 } else { 60 }));
        }
        let left = Some(Duration::from_millis(200)); // 170 ms planned
        assert_eq!(steady.depth(50, left), 42);
        let d = noisy.depth(50, left);
        assert!((15..30).contains(&d), "noisy depth {d}");
    }

    #[test]
    fn the_fixed_cost_of_a_call_is_planned_for() {
        let cost = PairCost::default();
        // 1 pair: 12 ms; 8 pairs: 26 ms → 2 ms a pair, 10 ms a call.
        cost.calibrate(Duration::from_millis(12), 8, Duration::from_millis(26));
        assert_eq!(cost.per_pair(), Some(Duration::from_millis(2)));
        assert_eq!(cost.fixed(), Duration::from_millis(10));
        // 20 ms left: 17 planned, 10 of them the call's own: 3 pairs.
        assert_eq!(cost.depth(50, Some(Duration::from_millis(20))), 3);
        // Less than the call itself: nothing.
        assert_eq!(cost.depth(50, Some(Duration::from_millis(11))), 0);
        // Observed calls update the per-pair part net of the fixed part.
        cost.observe(5, Duration::from_millis(30)); // (30 - 10) / 5 = 4 ms
        let p = cost.per_pair().unwrap().as_secs_f64() * 1e3;
        assert!((p - 2.6).abs() < 1e-9, "{p}");
    }

    #[test]
    fn without_budget_pressure_every_candidate_is_scored() {
        let model = tiny_cross_encoder();
        let cost = PairCost::default();
        calibrate(&model, &cost).unwrap();
        assert!(cost.per_pair().unwrap() > Duration::ZERO);
        let far = Instant::now() + Duration::from_secs(600);
        for deadline in [None, Some(far)] {
            let r = rerank(Some(&model), &cost, req(20, 5, deadline)).unwrap();
            assert_eq!((r.scored, r.candidates, r.cut_short()), (20, 20, false));
            assert_eq!(r.hits.len(), 5);
            // The kept five are the cross-encoder's best five, in order.
            let passages: Vec<String> = hits(20).into_iter().map(|h| h.text).collect();
            let refs: Vec<&str> = passages.iter().map(String::as_str).collect();
            let mut all = model.score("how do I request leave?", &refs).unwrap();
            all.sort_by(|a, b| b.total_cmp(a));
            let kept: Vec<f32> = r.hits.iter().map(|h| h.score).collect();
            for (k, best) in kept.iter().zip(&all) {
                assert!((k - best).abs() < 1e-5, "{kept:?} vs {all:?}");
            }
        }
    }

    #[test]
    fn a_spent_budget_keeps_the_vector_order_and_says_so() {
        let model = tiny_cross_encoder();
        let cost = PairCost::default();
        calibrate(&model, &cost).unwrap();
        let r = rerank(Some(&model), &cost, req(20, 5, Some(Instant::now()))).unwrap();
        assert_eq!((r.scored, r.candidates, r.cut_short()), (0, 20, true));
        let ids: Vec<&str> = r.hits.iter().map(|h| h.doc_id.as_str()).collect();
        assert_eq!(ids, ["doc-0", "doc-1", "doc-2", "doc-3", "doc-4"]);
    }

    #[test]
    fn a_partial_depth_reranks_the_best_vector_candidates_only() {
        let model = tiny_cross_encoder();
        let cost = PairCost::default();
        // 1 s a pair: 3 fit in the 3.4 s planned of 4 s.
        cost.observe(1, Duration::from_secs(1));
        let r = rerank(
            Some(&model),
            &cost,
            req(10, 10, Some(Instant::now() + Duration::from_millis(4000))),
        )
        .unwrap();
        assert_eq!((r.scored, r.cut_short()), (3, true));
        let mut head: Vec<&str> = r.hits[..3].iter().map(|h| h.doc_id.as_str()).collect();
        head.sort();
        assert_eq!(head, ["doc-0", "doc-1", "doc-2"]);
        let tail: Vec<&str> = r.hits[3..].iter().map(|h| h.doc_id.as_str()).collect();
        assert_eq!(
            tail,
            ["doc-3", "doc-4", "doc-5", "doc-6", "doc-7", "doc-8", "doc-9"]
        );
        // No model: off, never "cut short".
        let r = rerank(None, &cost, req(10, 5, Some(Instant::now()))).unwrap();
        assert_eq!((r.scored, r.on, r.cut_short()), (0, false, false));
    }
}
