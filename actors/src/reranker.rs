//! The Reranker: a cross-encoder scores (question, chunk) pairs and keeps
//! the best. With no model configured it is off and says so: the vector order
//! is returned unchanged, nothing pretends to rerank.

use crate::indexer::Hit;
use crate::model::AnyCrossEncoder;
use crate::stats::ActorStats;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;

pub struct RerankRequest {
    pub question: String,
    pub hits: Vec<Hit>,
    pub top_k: usize,
}

pub struct RerankResult {
    pub hits: Vec<Hit>,
    /// How many candidates the cross-encoder scored (0 when off).
    pub scored: usize,
}

pub enum RerankMsg {
    Rerank(RerankRequest, RpcReplyPort<Result<RerankResult, String>>),
}

pub struct Reranker;

pub struct RerankerArgs {
    pub model: Option<Arc<AnyCrossEncoder>>,
    pub stats: Arc<ActorStats>,
}

/// Scores and orders; pure so the query path can also call it inline.
pub fn rerank(model: Option<&AnyCrossEncoder>, req: RerankRequest) -> anyhow::Result<RerankResult> {
    let RerankRequest {
        question,
        mut hits,
        top_k,
    } = req;
    let Some(model) = model else {
        hits.truncate(top_k);
        return Ok(RerankResult { hits, scored: 0 });
    };
    let passages: Vec<&str> = hits.iter().map(|h| h.text.as_str()).collect();
    let scores = model.score(&question, &passages)?;
    let scored = hits.len();
    for (h, s) in hits.iter_mut().zip(scores) {
        h.score = s;
    }
    hits.sort_by(|a, b| b.score.total_cmp(&a.score));
    hits.truncate(top_k);
    Ok(RerankResult { hits, scored })
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
        if args.model.is_none() {
            args.stats.set_status("off");
            args.stats.set_note(
                "reranker off: no [reranker] model configured; results keep the vector order",
            );
        } else {
            args.stats.set_status("running");
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
        let model = st.model.clone();
        let result = tokio::task::spawn_blocking(move || rerank(model.as_deref(), req))
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
