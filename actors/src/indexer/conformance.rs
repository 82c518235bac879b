//! The conformance suite every [`VectorStore`] backend must pass. Backend
//! tests call [`run_all`] on an empty store.

use super::{Hit, Removal, Scope, StoredText, StoredVersion, TextPage, VectorStore};
use crate::messages::{Chunk, DocMeta, EmbeddedDoc, Partition};

pub const DIM: usize = 8;

/// A unit vector pointing mostly along axis `axis`, nudged by `i`.
pub fn vector(axis: usize, i: u32) -> Vec<f32> {
    let mut v = [0.01f32; DIM];
    v[axis % DIM] = 1.0;
    v[(axis + 1) % DIM] += i as f32 * 0.01;
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

/// A document version with `n` chunks whose vectors point along `axis`.
pub fn doc(
    id: &str,
    version: &str,
    division: &str,
    level: &str,
    n: u32,
    axis: usize,
) -> (DocMeta, Vec<Chunk>, Vec<Vec<f32>>) {
    let meta = DocMeta {
        doc_id: id.into(),
        source: "test".into(),
        uri: format!("{id}.md"),
        path: format!("/nowhere/{id}.md").into(),
        version: version.into(),
        partition: Partition {
            division: division.into(),
            access_level: level.into(),
        },
        size: 1,
        // Later versions were seen later ("v2" after "v1").
        seq: version.trim_start_matches('v').parse::<u64>().unwrap_or(0) * 1_000,
    };
    let chunks = (0..n)
        .map(|i| Chunk {
            index: i,
            text: format!("{id} {version} chunk {i}"),
        })
        .collect();
    let vectors = (0..n).map(|i| vector(axis, i)).collect();
    (meta, chunks, vectors)
}

fn scope(divisions: &[&str], levels: &[&str]) -> Scope {
    Scope {
        divisions: divisions.iter().map(|s| s.to_string()).collect(),
        access_levels: levels.iter().map(|s| s.to_string()).collect(),
    }
}

async fn put(store: &dyn VectorStore, d: (DocMeta, Vec<Chunk>, Vec<Vec<f32>>)) {
    store.upsert(&d.0, &d.1, &d.2).await.expect("upsert");
}

pub async fn run_all(store: &dyn VectorStore) {
    assert_eq!(
        store.count(None).await.unwrap(),
        0,
        "the suite needs an empty store"
    );
    upsert_and_search(store).await;
    search_stays_inside_the_scope(store).await;
    redelivery_is_idempotent(store).await;
    version_swap_and_delete(store).await;
    bad_vectors_are_errors(store).await;
    batches(store).await;
    vectors_are_found_by_their_text(store).await;
    texts_are_read_in_pages_and_keys_set(store).await;
    hidden_points_are_in_no_search_and_keep_their_vectors(store).await;
    store.optimize().await.expect("optimize");
    // Optimising changes nothing a caller sees.
    let hits = store
        .search(&vector(0, 0), &scope(&["hr"], &["public"]), 50)
        .await
        .unwrap();
    assert!(hits
        .iter()
        .all(|h| h.division == "hr" && h.access_level == "public"));
}

async fn upsert_and_search(store: &dyn VectorStore) {
    put(store, doc("leave", "v1", "hr", "public", 3, 0)).await;
    put(store, doc("build", "v1", "eng", "internal", 2, 3)).await;
    assert_eq!(store.count(None).await.unwrap(), 5);
    assert_eq!(store.count(Some("leave")).await.unwrap(), 3);
    let all = scope(&["hr", "eng"], &["public", "internal"]);
    let hits = store.search(&vector(0, 0), &all, 10).await.unwrap();
    assert_eq!(hits.len(), 5);
    assert_eq!(hits[0].doc_id, "leave");
    assert_eq!(hits[0].chunk_index, 0);
    assert_eq!(hits[0].text, "leave v1 chunk 0");
    assert_eq!(hits[0].uri, "leave.md");
    assert_eq!(
        (hits[0].division.as_str(), hits[0].access_level.as_str()),
        ("hr", "public")
    );
    assert!(
        (hits[0].score - 1.0).abs() < 1e-3,
        "cosine of identical vectors: {}",
        hits[0].score
    );
    assert!(
        hits.windows(2).all(|w| w[0].score >= w[1].score),
        "sorted by score"
    );
    assert_eq!(store.search(&vector(0, 0), &all, 2).await.unwrap().len(), 2);
}

async fn search_stays_inside_the_scope(store: &dyn VectorStore) {
    // The secret sits exactly where the query points.
    put(store, doc("salaries", "v1", "hr", "confidential", 2, 5)).await;
    put(store, doc("roadmap", "v1", "eng", "confidential", 2, 5)).await;
    let q = vector(5, 0);
    for (divs, levels, allowed) in [
        (vec!["hr"], vec!["public"], vec![("hr", "public")]),
        (
            vec!["eng"],
            vec!["internal", "public"],
            vec![("eng", "internal")],
        ),
        (
            vec!["hr", "eng"],
            vec!["confidential"],
            vec![("hr", "confidential"), ("eng", "confidential")],
        ),
    ] {
        let s = scope(&divs, &levels);
        let hits = store.search(&q, &s, 50).await.unwrap();
        assert!(!hits.is_empty(), "scope {s:?} finds its own chunks");
        for h in &hits {
            assert!(
                allowed.contains(&(h.division.as_str(), h.access_level.as_str())),
                "scope {s:?} leaked {h:?}"
            );
        }
    }
    assert!(store
        .search(&q, &scope(&[], &["public"]), 50)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .search(&q, &scope(&["hr"], &[]), 50)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .search(&q, &scope(&["finance"], &["public"]), 50)
        .await
        .unwrap()
        .is_empty());
}

async fn redelivery_is_idempotent(store: &dyn VectorStore) {
    let before = store.count(None).await.unwrap();
    put(store, doc("leave", "v1", "hr", "public", 3, 0)).await;
    put(store, doc("leave", "v1", "hr", "public", 3, 0)).await;
    assert_eq!(store.count(None).await.unwrap(), before);
}

/// The seqs stored for a document version (one, normally).
async fn seqs_of(store: &dyn VectorStore, doc_id: &str, version: &str) -> Vec<u64> {
    let stored = store.versions_of(&[doc_id.into()]).await.unwrap();
    stored
        .into_iter()
        .filter(|v| v.version == version)
        .map(|v| v.seq)
        .collect()
}

async fn version_swap_and_delete(store: &dyn VectorStore) {
    put(store, doc("leave", "v2", "hr", "public", 2, 0)).await;
    assert_eq!(
        store.count(Some("leave")).await.unwrap(),
        5,
        "both versions present before the prune"
    );
    let mut versions = store.indexed_versions().await.unwrap();
    versions.retain(|v| v.doc_id == "leave");
    let stored = |version: &str, seq| StoredVersion {
        doc_id: "leave".into(),
        version: version.into(),
        seq,
        partition: Some(Partition {
            division: "hr".into(),
            access_level: "public".into(),
        }),
    };
    // Once per version (not per chunk), with the watcher's seq.
    assert_eq!(versions, vec![stored("v1", 1_000), stored("v2", 2_000)]);
    // The same, looked up by document (one that is not there adds nothing).
    let looked_up = store
        .versions_of(&["leave".into(), "never-written".into()])
        .await
        .unwrap();
    assert_eq!(looked_up, versions);
    assert!(store.versions_of(&[]).await.unwrap().is_empty());
    // The same version written again as seen earlier (delivered late) does
    // not make the stored copy look older; seen later, it does look newer.
    let (mut meta, chunks, vectors) = doc("leave", "v2", "hr", "public", 2, 0);
    meta.seq = 1_500;
    store.upsert(&meta, &chunks, &vectors).await.unwrap();
    assert_eq!(seqs_of(store, "leave", "v2").await, [2_000]);
    meta.seq = 2_500;
    store
        .upsert_docs(&[EmbeddedDoc {
            meta: meta.clone(),
            chunks: chunks.clone(),
            vectors: vectors.clone(),
            keys: vec![],
        }])
        .await
        .unwrap();
    assert_eq!(seqs_of(store, "leave", "v2").await, [2_500]);
    meta.seq = 2_000;
    store.upsert(&meta, &chunks, &vectors).await.unwrap();
    assert_eq!(seqs_of(store, "leave", "v2").await, [2_500]);
    // What an answer cached now would cite: chunks of both versions.
    let cited = store
        .search(&vector(0, 0), &scope(&["hr"], &["public"]), 50)
        .await
        .unwrap();
    assert!(cited.iter().any(|h| h.version == "v1"));
    assert!(store.holds_all(&cited).await.unwrap());
    assert!(store.holds_all(&[]).await.unwrap());
    let removed = store.delete_other_versions("leave", "v2").await.unwrap();
    assert_eq!(removed, vec!["v1".to_string()]);
    assert_eq!(store.count(Some("leave")).await.unwrap(), 2);
    let hits = store
        .search(&vector(0, 0), &scope(&["hr"], &["public"]), 50)
        .await
        .unwrap();
    assert!(
        hits.iter().all(|h| h.version == "v2"),
        "old version returned: {hits:?}"
    );
    // The answer citing v1 is no longer backed; one citing v2 is. (A chunk
    // index v2 lacks, of a version it has, is not there either.)
    assert!(!store.holds_all(&cited).await.unwrap());
    assert!(store.holds_all(&hits).await.unwrap());
    let mut beyond = hits[0].clone();
    beyond.chunk_index = 2;
    assert!(!store.holds_all(&[beyond]).await.unwrap());
    // Nor is one citing the chunk in a partition it is not in (its
    // document moved since the answer was cached).
    let mut moved = hits[0].clone();
    moved.access_level = "internal".into();
    assert!(!store.holds_all(&[moved]).await.unwrap());
    assert!(store
        .delete_other_versions("leave", "v2")
        .await
        .unwrap()
        .is_empty());
    let removed = store.delete_doc("build").await.unwrap();
    assert_eq!(removed, vec!["v1".to_string()]);
    assert_eq!(store.count(Some("build")).await.unwrap(), 0);
    assert!(store
        .versions_of(&["build".into()])
        .await
        .unwrap()
        .is_empty());
    assert!(store.delete_doc("build").await.unwrap().is_empty());
    assert!(store
        .indexed_versions()
        .await
        .unwrap()
        .iter()
        .all(|v| v.doc_id != "build"));
}

async fn bad_vectors_are_errors(store: &dyn VectorStore) {
    let (meta, chunks, _) = doc("bad", "v1", "hr", "public", 1, 0);
    assert!(store
        .upsert(&meta, &chunks, &[vec![1.0; DIM + 1]])
        .await
        .is_err());
    assert!(
        store.upsert(&meta, &chunks, &[]).await.is_err(),
        "one vector per chunk"
    );
    assert!(store
        .search(&[1.0; 3], &scope(&["hr"], &["public"]), 5)
        .await
        .is_err());
    assert_eq!(store.count(Some("bad")).await.unwrap(), 0);
}

fn embedded(d: (DocMeta, Vec<Chunk>, Vec<Vec<f32>>)) -> EmbeddedDoc {
    EmbeddedDoc {
        meta: d.0,
        chunks: d.1,
        vectors: d.2,
        keys: vec![],
    }
}

/// `d` with these chunk texts and text keys.
fn keyed(d: (DocMeta, Vec<Chunk>, Vec<Vec<f32>>), texts: &[(i64, &str)]) -> EmbeddedDoc {
    let mut d = embedded(d);
    assert_eq!(d.chunks.len(), texts.len());
    for (c, (_, text)) in d.chunks.iter_mut().zip(texts) {
        c.text = text.to_string();
    }
    d.keys = texts.iter().map(|(k, _)| *k).collect();
    d
}

/// The embedder finds a vector by its text key in any document and any
/// partition ([`super::stored_vectors`]): also past a text that many
/// points share, and never one whose stored text is another.
async fn vectors_are_found_by_their_text(store: &dyn VectorStore) {
    let footer = "Confidential: do not forward";
    store
        .upsert_docs(&[
            keyed(
                doc("keyed-a", "v1", "hr", "public", 2, 5),
                &[(11, "leave policy"), (12, "parental leave")],
            ),
            // Written first, in another partition: 40 points of one
            // text, more than one page of the lookup.
            keyed(
                doc("keyed-b", "v1", "eng", "secret", 40, 6),
                &vec![(13, footer); 40],
            ),
            // Another text under a key of the question's (two texts
            // whose hashes meet).
            keyed(
                doc("keyed-c", "v1", "eng", "public", 1, 7),
                &[(14, "other")],
            ),
            // Without keys: not found by any.
            embedded(doc("keyed-d", "v1", "hr", "public", 1, 5)),
        ])
        .await
        .expect("upsert with text keys");
    let wanted = [
        (11, "leave policy"),
        (12, "parental leave"),
        (13, footer),
        (14, "what was asked"),
        (15, "never stored"),
    ];
    let found = super::stored_vectors(store, &wanted).await.expect("lookup");
    let mut keys: Vec<i64> = found.keys().copied().collect();
    keys.sort();
    assert_eq!(
        keys,
        [11, 12, 13],
        "by text, across partitions, past a shared text"
    );
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
    assert!(close(&found[&11], &vector(5, 0)) && close(&found[&12], &vector(5, 1)));
    assert!((0..40).any(|i| close(&found[&13], &vector(6, i))));

    // A long document's chunks, more than one lookup takes at once, with
    // keys over the whole range (the hashes' are: negative, past 2^53).
    let texts: Vec<String> = (0..300).map(|i| format!("long chunk {i}")).collect();
    let spread = |i: usize| (i as i64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as i64);
    let long: Vec<(i64, &str)> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (spread(i), t.as_str()))
        .collect();
    assert!(long.iter().any(|(k, _)| *k < 0) && long.iter().any(|(k, _)| *k > 1 << 53));
    store
        .upsert_docs(&[keyed(doc("keyed-e", "v1", "hr", "public", 300, 1), &long)])
        .await
        .unwrap();
    let found = super::stored_vectors(store, &long).await.unwrap();
    assert_eq!(found.len(), 300, "every chunk of a long document");

    for id in ["keyed-a", "keyed-b", "keyed-c", "keyed-d", "keyed-e"] {
        store.delete_doc(id).await.unwrap();
    }
    let found = super::stored_vectors(store, &wanted).await.unwrap();
    assert!(
        found.is_empty(),
        "a deleted point is not offered: {found:?}"
    );
}

/// The model check and the text-key backfill (see
/// [`super::model_check`]) read every point once, page by page, with its
/// text and key; keys are set by point id, and a point gone meanwhile is
/// skipped, not made again.
async fn texts_are_read_in_pages_and_keys_set(store: &dyn VectorStore) {
    store
        .upsert_docs(&[
            keyed(
                doc("texts-a", "v1", "hr", "public", 2, 5),
                &[(21, "a first"), (22, "a second")],
            ),
            embedded(doc("texts-b", "v1", "eng", "secret", 3, 6)),
        ])
        .await
        .unwrap();
    let total = store.count(None).await.unwrap() as usize;
    let read = |unkeyed: bool| async move {
        let (mut all, mut from) = (vec![], None);
        loop {
            let page = TextPage {
                from,
                limit: 4,
                with_vectors: false,
                unkeyed,
            };
            let (texts, next) = store.texts(page).await.unwrap();
            assert!(texts.len() <= 4, "{} in a page of 4", texts.len());
            all.extend(texts);
            match next {
                Some(n) => from = Some(n),
                None => return all,
            }
        }
    };
    let all = read(false).await;
    assert_eq!(all.len(), total, "every point, in pages");
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "in id order, once"
    );
    let first = all.iter().find(|t| t.text == "a first").unwrap();
    assert_eq!(first.key, Some(21));
    assert_eq!(first.id, super::point_id("texts-a", "v1", 0));
    assert!(all.iter().all(|t| t.vector.is_none()), "no vectors unasked");
    let unkeyed = read(true).await;
    assert_eq!(unkeyed.len(), total - 2, "all but the keyed two");
    assert!(unkeyed.iter().all(|t| t.key.is_none()));

    let page = TextPage {
        limit: total,
        with_vectors: true,
        ..Default::default()
    };
    let (with, _) = store.texts(page).await.unwrap();
    let first = with.iter().find(|t| t.text == "a first").unwrap();
    let v = first.vector.as_ref().expect("the vector asked for");
    assert!(v
        .iter()
        .zip(vector(5, 0))
        .all(|(x, y)| (x - y).abs() < 1e-5));

    let b: Vec<&StoredText> = unkeyed
        .iter()
        .filter(|t| t.text.starts_with("texts-b"))
        .collect();
    assert_eq!(b.len(), 3);
    let mut keys: Vec<(u64, i64)> = b.iter().zip(100..).map(|(t, k)| (t.id, k)).collect();
    let gone = super::point_id("texts-gone", "v1", 0);
    keys.push((gone, 200));
    store.set_text_keys(&keys).await.expect("set keys");
    let wanted: Vec<(i64, &str)> = b
        .iter()
        .zip(100..)
        .map(|(t, k)| (k, t.text.as_str()))
        .collect();
    let found = super::stored_vectors(store, &wanted).await.unwrap();
    assert_eq!(found.len(), 3, "found by the keys set");
    assert_eq!(
        store.count(None).await.unwrap() as usize,
        total,
        "nothing made"
    );
    assert_eq!(read(true).await.len(), total - 5);

    store.delete_doc("texts-a").await.unwrap();
    store.delete_doc("texts-b").await.unwrap();
}

/// A document whose partition rule changed is hidden at start
/// ([`VectorStore::hide`]): found by no search and no cached answer's
/// check, its vectors still found by their text, until its new version is
/// written and the old one pruned.
async fn hidden_points_are_in_no_search_and_keep_their_vectors(store: &dyn VectorStore) {
    let text = "Moving house is two days of leave.";
    store
        .upsert_docs(&[keyed(
            doc("hide-a", "v1", "hr", "public", 1, 2),
            &[(31, text)],
        )])
        .await
        .unwrap();
    let everywhere = scope(&["hr", "eng"], &["public", "internal", "confidential"]);
    let hits = store.search(&vector(2, 0), &everywhere, 50).await.unwrap();
    let before: Vec<Hit> = hits.into_iter().filter(|h| h.doc_id == "hide-a").collect();
    assert_eq!(before.len(), 1);
    assert!(store.holds_all(&before).await.unwrap());

    store
        .hide(&[Removal::new("hide-a", None).seen_before(2_000)])
        .await
        .expect("hide");
    let hits = store.search(&vector(2, 0), &everywhere, 50).await.unwrap();
    assert!(hits.iter().all(|h| h.doc_id != "hide-a"), "{hits:?}");
    assert!(
        !store.holds_all(&before).await.unwrap(),
        "a cached answer citing it"
    );
    assert_eq!(store.count(Some("hide-a")).await.unwrap(), 1, "kept");
    assert_eq!(store.count_hidden().await.unwrap(), 1);
    let found = super::stored_vectors(store, &[(31, text)]).await.unwrap();
    assert_eq!(found.len(), 1, "its vector serves the new version");
    let stored = store.versions_of(&["hide-a".into()]).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].partition, Some(Partition::hidden()));

    // Its new version, in its new partition: found; the hidden one goes
    // with the prune.
    put(store, doc("hide-a", "v2", "eng", "internal", 1, 2)).await;
    let removed = store.delete_other_versions("hide-a", "v2").await.unwrap();
    assert_eq!(removed, ["v1"]);
    assert_eq!(store.count_hidden().await.unwrap(), 0);
    assert_eq!(store.count(Some("hide-a")).await.unwrap(), 1);
    let hits = store.search(&vector(2, 0), &everywhere, 50).await.unwrap();
    let now: Vec<&Hit> = hits.iter().filter(|h| h.doc_id == "hide-a").collect();
    assert_eq!(now.len(), 1);
    assert_eq!(
        (now[0].division.as_str(), now[0].version.as_str()),
        ("eng", "v2")
    );
    // A seq bound spares what was seen after it.
    put(store, doc("hide-b", "v1", "hr", "public", 1, 3)).await;
    store
        .hide(&[Removal::new("hide-b", None).seen_before(500)])
        .await
        .unwrap();
    let hits = store.search(&vector(3, 0), &everywhere, 50).await.unwrap();
    assert!(
        hits.iter().any(|h| h.doc_id == "hide-b"),
        "seen after the bound"
    );
    store.delete_doc("hide-a").await.unwrap();
    store.delete_doc("hide-b").await.unwrap();
}

/// The Indexer's and the VersionPruner's batched calls do what their
/// one-document counterparts would, in order.
async fn batches(store: &dyn VectorStore) {
    let count = |id: &'static str| async move { store.count(Some(id)).await.unwrap() };
    store
        .upsert_docs(&[
            embedded(doc("batch-a", "v1", "hr", "public", 3, 1)),
            embedded(doc("batch-b", "v1", "eng", "internal", 2, 2)),
            embedded(doc("batch-a", "v2", "hr", "public", 2, 1)),
            embedded(doc("batch-c", "v1", "eng", "public", 1, 4)),
        ])
        .await
        .expect("batched upsert");
    assert_eq!(
        (
            count("batch-a").await,
            count("batch-b").await,
            count("batch-c").await
        ),
        (5, 2, 1),
        "every document of the batch, both versions of batch-a, in both divisions"
    );
    // One bad document: the batch writes nothing (the pool then retries
    // its documents one at a time).
    let (meta, chunks, _) = doc("batch-d", "v1", "hr", "public", 1, 0);
    let bad = EmbeddedDoc {
        meta,
        chunks,
        vectors: vec![vec![1.0; DIM + 1]],
        keys: vec![],
    };
    let good = embedded(doc("batch-e", "v1", "hr", "public", 1, 0));
    assert!(store.upsert_docs(&[good, bad]).await.is_err());
    assert_eq!(count("batch-e").await, 0, "a failed batch writes nothing");

    let removal = Removal::new;
    let removed = store
        .remove(&[
            removal("batch-a", Some("v2")),
            removal("batch-b", None),
            removal("batch-c", Some("v1")),
            removal("batch-never", None),
        ])
        .await
        .expect("batched removal");
    assert_eq!(
        removed,
        vec![
            vec!["v1".to_string()],
            vec!["v1".to_string()],
            vec![],
            vec![]
        ]
    );
    assert_eq!(
        (
            count("batch-a").await,
            count("batch-b").await,
            count("batch-c").await
        ),
        (2, 0, 1)
    );
    let hits = store
        .search(&vector(1, 0), &scope(&["hr"], &["public"]), 50)
        .await
        .unwrap();
    assert!(
        hits.iter()
            .filter(|h| h.doc_id == "batch-a")
            .all(|h| h.version == "v2"),
        "old version returned after a batched prune: {hits:?}"
    );
    assert!(store.remove(&[]).await.unwrap().is_empty());

    // The prune of v2 reaches the store after v3 was written (v3 was seen
    // later): only the version seen before v2 goes.
    for v in ["v1", "v2", "v3"] {
        put(store, doc("batch-race", v, "hr", "public", 1, 6)).await;
    }
    let prune_v2 = removal("batch-race", Some("v2")).seen_before(2_000);
    let removed = store.remove(&[prune_v2]).await.unwrap();
    assert_eq!(removed, vec![vec!["v1".to_string()]]);
    let mut left: Vec<String> = store
        .indexed_versions()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.doc_id == "batch-race")
        .map(|v| v.version)
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["v2", "v3"],
        "the newer version survives the late prune"
    );
    // v3's own prune then leaves v3 alone.
    let prune_v3 = removal("batch-race", Some("v3")).seen_before(3_000);
    assert_eq!(
        store.remove(&[prune_v3]).await.unwrap(),
        vec![vec!["v2".to_string()]]
    );
    assert_eq!(store.count(Some("batch-race")).await.unwrap(), 1);
    store.remove(&[removal("batch-race", None)]).await.unwrap();
    store
        .remove(&[removal("batch-a", None), removal("batch-c", None)])
        .await
        .unwrap();
    assert_eq!(count("batch-a").await + count("batch-c").await, 0);
}
