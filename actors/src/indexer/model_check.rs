//! Whether a store holds this model's vectors, and the text keys of points
//! written without them.
//!
//! A store embedded by one model and searched with another returns
//! unrelated chunks, with nothing to tell: two MiniLM-sized models both
//! give 384 numbers. A node that searches or writes a store checks it at
//! start ([`check_model`]): a sample of points must carry this model's
//! text key for their text ([`crate::embedder::text_key`], which covers
//! the model), or, where they do not, the vector this model gives the
//! text. Points written before text keys pass the second way, and then
//! get their keys ([`rekey`]), so that their vectors are reused like
//! everyone else's.

use super::{TextPage, VectorStore};
use crate::embedder::text_key;
use std::future::Future;

/// Points the check reads (their first page, in id order: point ids are
/// hashes, so any documents). Those without this model's key are
/// embedded: at most a few hundred milliseconds of CPU.
pub const SAMPLE: usize = 32;

/// Cosine at or above which a stored vector is this model's for its text.
/// The same model on another backend (f16 on a GPU) stays above 0.999
/// (the parity tests); another model's space has nothing to do with this
/// one's.
pub const SAME_VECTOR: f32 = 0.99;

/// Points a [`rekey`] reads and writes at a time.
const REKEY_PAGE: usize = 256;

#[derive(Clone, Debug, PartialEq)]
pub enum ModelCheck {
    /// Nothing stored.
    Empty,
    /// This model's vectors; `rekey`: some points need their text key
    /// set.
    Same { rekey: Option<Rekey> },
    /// Another model's: of `checked` points read, `agreeing` have the key
    /// or vector this model gives their text; `closest` is the highest
    /// cosine among the others.
    Other {
        checked: usize,
        agreeing: usize,
        closest: f32,
    },
}

/// Which points a [`rekey`] sets keys on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rekey {
    /// Those without one (written before text keys, or a rekey cut short).
    Unkeyed,
    /// Every point whose key is not this model's: the vectors are, but
    /// the keys were made under another name for it (its files changed
    /// and the weights did not).
    All,
}

/// Checks `store` against the model named `model_id`; `embed` gives this
/// model's vectors for some texts.
pub async fn check_model<F, Fut>(
    store: &dyn VectorStore,
    model_id: &str,
    embed: F,
) -> anyhow::Result<ModelCheck>
where
    F: FnOnce(Vec<String>) -> Fut,
    Fut: Future<Output = anyhow::Result<Vec<Vec<f32>>>>,
{
    let page = TextPage {
        limit: SAMPLE,
        with_vectors: true,
        ..Default::default()
    };
    let (sample, _) = store.texts(page).await?;
    if sample.is_empty() {
        return Ok(ModelCheck::Empty);
    }
    let (keyed, rest): (Vec<_>, Vec<_>) = sample
        .iter()
        .partition(|t| t.key == Some(text_key(model_id, &t.text)));
    let mut closest = f32::NEG_INFINITY;
    let mut agreeing = keyed.len();
    if !rest.is_empty() {
        let vectors = embed(rest.iter().map(|t| t.text.clone()).collect()).await?;
        anyhow::ensure!(
            vectors.len() == rest.len(),
            "the model gave {} vectors for {} texts",
            vectors.len(),
            rest.len()
        );
        for (t, mine) in rest.iter().zip(&vectors) {
            let c = t.vector.as_deref().map_or(0.0, |v| cosine(v, mine));
            if c >= SAME_VECTOR {
                agreeing += 1;
            } else {
                closest = closest.max(c);
            }
        }
    }
    if agreeing < sample.len() {
        return Ok(ModelCheck::Other {
            checked: sample.len(),
            agreeing,
            closest,
        });
    }
    let rekey = if rest.iter().any(|t| t.key.is_some()) {
        Some(Rekey::All)
    } else if !rest.is_empty() {
        Some(Rekey::Unkeyed)
    } else {
        // The sample is keyed; a rekey cut short (by a stop) may have left
        // others without.
        let page = TextPage {
            limit: 1,
            unkeyed: true,
            ..Default::default()
        };
        let (unkeyed, _) = store.texts(page).await?;
        (!unkeyed.is_empty()).then_some(Rekey::Unkeyed)
    };
    Ok(ModelCheck::Same { rekey })
}

/// Sets this model's text key on the points `which` names, a page at a
/// time; the number of points whose key it set. Safe beside writes and
/// deletions: a point's text never changes under its id (the id names
/// the document version and chunk), and a point deleted meanwhile is
/// skipped.
pub async fn rekey(store: &dyn VectorStore, model_id: &str, which: Rekey) -> anyhow::Result<u64> {
    let mut from = None;
    let mut set = 0u64;
    loop {
        let page = TextPage {
            from,
            limit: REKEY_PAGE,
            with_vectors: false,
            unkeyed: which == Rekey::Unkeyed,
        };
        let (texts, next) = store.texts(page).await?;
        let keys: Vec<(u64, i64)> = texts
            .iter()
            .filter_map(|t| {
                let k = text_key(model_id, &t.text);
                (t.key != Some(k)).then_some((t.id, k))
            })
            .collect();
        store.set_text_keys(&keys).await?;
        set += keys.len() as u64;
        metrics::counter!("ragd_text_keys_set_total").increment(keys.len() as u64);
        match next {
            Some(n) => from = Some(n),
            None => return Ok(set),
        }
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let n = norm(a) * norm(b);
    if n > 0.0 {
        dot / n
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedder::tests::minilm;
    use crate::indexer::edge::EdgeStore;
    use crate::indexer::stored_vectors;
    use crate::messages::{Chunk, EmbeddedDoc};
    use crate::model::AnyEncoder;
    use std::sync::Arc;

    const TEXTS: [&str; 5] = [
        "Badge exceptions are signed off by the site security lead.",
        "Every office keeps its own visitor log.",
        "Lost badges are reported to the front desk within a day.",
        "Expense reports are due on the fifth working day.",
        "The VPN client updates itself every Tuesday night.",
    ];

    /// A document of `TEXTS` with these vectors and keys (none: written
    /// before text keys).
    fn doc(id: &str, vectors: Vec<Vec<f32>>, keys: Vec<i64>) -> EmbeddedDoc {
        let (meta, _, _) = crate::indexer::conformance::doc(id, "v1", "hr", "public", 0, 0);
        EmbeddedDoc {
            meta,
            chunks: TEXTS
                .iter()
                .enumerate()
                .map(|(i, t)| Chunk {
                    index: i as u32,
                    text: t.to_string(),
                })
                .collect(),
            vectors,
            keys,
        }
    }

    async fn check(store: &dyn VectorStore, encoder: &Arc<AnyEncoder>, id: &str) -> ModelCheck {
        let e = encoder.clone();
        check_model(store, id, |texts| async move {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            e.embed(&refs)
        })
        .await
        .unwrap()
    }

    /// This model's vectors pass, keyed or not, and points without this
    /// model's key get it; another model's vectors (here: this model's,
    /// each for another text) do not, whatever their keys say.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_passes_with_this_model_s_vectors_only() {
        let encoder = minilm();
        let mine = encoder.embed(&TEXTS).unwrap();
        let keys = |id: &str| TEXTS.iter().map(|t| text_key(id, t)).collect::<Vec<_>>();
        let dir = tempfile::tempdir().unwrap();
        let store = EdgeStore::open(dir.path(), 384).unwrap();
        assert_eq!(check(&store, &encoder, "minilm").await, ModelCheck::Empty);

        // Keyed by this model: passes without embedding anything.
        store
            .upsert_docs(&[doc("keyed", mine.clone(), keys("minilm"))])
            .await
            .unwrap();
        let no_embedding = check_model(&store, "minilm", |_| async {
            anyhow::bail!("nothing should be embedded")
        })
        .await
        .unwrap();
        assert_eq!(no_embedding, ModelCheck::Same { rekey: None });

        // Written before text keys: passes by its vectors; the keys are
        // then set, and the vectors found by them.
        store
            .upsert_docs(&[doc("old", mine.clone(), vec![])])
            .await
            .unwrap();
        let wanted: Vec<(i64, &str)> = keys("minilm").into_iter().zip(TEXTS).collect();
        assert_eq!(
            check(&store, &encoder, "minilm").await,
            ModelCheck::Same {
                rekey: Some(Rekey::Unkeyed)
            }
        );
        assert_eq!(rekey(&store, "minilm", Rekey::Unkeyed).await.unwrap(), 5);
        assert_eq!(
            check(&store, &encoder, "minilm").await,
            ModelCheck::Same { rekey: None }
        );
        assert_eq!(stored_vectors(&store, &wanted).await.unwrap().len(), 5);

        // The same weights under another name (its files changed): every
        // key is set again, to the new name's.
        assert_eq!(
            check(&store, &encoder, "minilm, files changed").await,
            ModelCheck::Same {
                rekey: Some(Rekey::All)
            }
        );
        assert_eq!(
            rekey(&store, "minilm, files changed", Rekey::All)
                .await
                .unwrap(),
            10
        );
        assert_eq!(
            check(&store, &encoder, "minilm, files changed").await,
            ModelCheck::Same { rekey: None }
        );

        // Another model's vectors, unkeyed or under its own keys: refused,
        // and the keys of this model's points are left alone.
        let mut other = mine.clone();
        other.rotate_left(1);
        let dir = tempfile::tempdir().unwrap();
        let foreign = EdgeStore::open(dir.path(), 384).unwrap();
        foreign
            .upsert_docs(&[
                doc("a", other.clone(), vec![]),
                doc("b", other, keys("other")),
            ])
            .await
            .unwrap();
        match check(&foreign, &encoder, "minilm").await {
            ModelCheck::Other {
                checked: 10,
                agreeing: 0,
                closest,
            } => assert!(closest < SAME_VECTOR, "{closest}"),
            other => panic!("{other:?}"),
        }
        // One point of another model's among this one's is enough.
        let mut one_off = mine.clone();
        one_off.swap(0, 1);
        store
            .upsert_docs(&[doc("mixed", one_off, vec![])])
            .await
            .unwrap();
        match check(&store, &encoder, "minilm, files changed").await {
            ModelCheck::Other {
                checked: 15,
                agreeing: 13,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
    }
}
